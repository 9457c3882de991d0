//! The record layer after the handshake, done here instead of in rustls.
//!
//! rustls completes the handshake; then [`Records::take_over`] takes its traffic secrets
//! through rustls's own hand-over API for record layers outside rustls
//! (`dangerous_into_kernel_connection`, made for kernel TLS, which this host's kernel does
//! not have) and from then on this file seals and opens the records with *ring*'s AEADs:
//!
//! * received records are decrypted **in place** in the receive buffer, and the plaintext is
//!   handed on as a slice of that buffer (rustls 0.23's unbuffered API copies every record
//!   into a fresh `Vec` first);
//! * outgoing plaintext is copied once, into the output buffer, and encrypted there (rustls
//!   copies it into a fresh `Vec`, encrypts, and copies the result out again).
//!
//! Relaying a message therefore allocates nothing here and touches each byte twice fewer
//! times (`docs/benchmarks.md`, "Bulk relay: where the time went").
//!
//! What the record layer must still do itself, and does:
//! * TLS 1.3 (RFC 8446 §5.2–5.4): per-record nonce = IV ⊕ sequence number, the record header
//!   as additional data, the inner content type after the plaintext, zero padding removed.
//! * TLS 1.2 AES-GCM (RFC 5288: explicit 8-byte nonce in the record) and ChaCha20-Poly1305
//!   (RFC 7905: nonce = IV ⊕ sequence number), additional data = sequence number, type,
//!   version, plaintext length (RFC 5246 §6.2.3.3).
//! * Post-handshake messages: a TLS 1.3 `KeyUpdate` from the peer re-keys the receive side
//!   (through rustls's key schedule) and, when the peer asks, ours too. Anything else (TLS 1.2
//!   renegotiation, session tickets from a client, post-handshake authentication) is refused.
//! * Alerts: `close_notify` ends the peer's data, `user_canceled` is ignored, any other alert
//!   is fatal. A record that fails to decrypt, is too long, or has an unknown type is fatal.
//! * The AES-GCM confidentiality limit (rustls's figure for the suite): at the limit a TLS 1.3
//!   connection updates its sending key; a TLS 1.2 one is closed.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::{ConnectionTrafficSecrets, HandshakeKind, ProtocolVersion};
use rustls_pki_types::CertificateDer;

use super::{Negotiated, Progress, TlsError};

/// Largest plaintext in one record (RFC 8446 §5.1, RFC 5246 §6.2.1).
pub const MAX_PLAINTEXT: usize = 16_384;
/// Record header: type, version (2), length (2).
const HEADER: usize = 5;
/// AEAD tag (all three AEADs).
const TAG: usize = 16;
/// TLS 1.2 AES-GCM explicit nonce carried in each record.
const EXPLICIT: usize = 8;

const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

/// How records are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protection {
    /// TLS 1.3, any AEAD.
    Tls13,
    /// TLS 1.2 AES-GCM: explicit nonce in the record.
    Tls12Gcm,
    /// TLS 1.2 ChaCha20-Poly1305: implicit nonce.
    Tls12Chacha,
}

/// One direction's key, IV and record sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, TlsError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(TlsError::State("unsupported traffic secret")),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| TlsError::State("traffic key of the wrong length"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| TlsError::State("traffic IV of the wrong length"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// IV ⊕ sequence number (RFC 8446 §5.3; RFC 7905 §2; rustls's choice of the TLS 1.2
    /// AES-GCM explicit nonce too).
    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn advance(&mut self) -> Result<(), TlsError> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(TlsError::State("record sequence number exhausted"))?;
        Ok(())
    }
}

/// TLS 1.2 additional data: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9] = 3;
    a[10] = 3;
    a[11..].copy_from_slice(&(len as u16).to_be_bytes());
    a
}

/// An established session's record layer.
pub struct Records {
    kernel: KernelConnection<ServerConnectionData>,
    protection: Protection,
    rx: Direction,
    tx: Direction,
    /// Records one key may seal (the suite's confidentiality limit).
    limit: u64,
    peer_cert: Option<CertificateDer<'static>>,
    negotiated: Negotiated,
    resumed: bool,
    /// The peer sent close_notify: later records are ignored.
    peer_closed: bool,
}

impl Records {
    /// Takes over from rustls once its handshake is complete and everything it had to send
    /// has been written out. The rustls connection is consumed.
    pub fn take_over(conn: UnbufferedServerConnection) -> Result<Self, TlsError> {
        let peer_cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
        let suite = conn
            .negotiated_cipher_suite()
            .ok_or(TlsError::State("no cipher suite after the handshake"))?;
        let version = conn
            .protocol_version()
            .ok_or(TlsError::State("no protocol version after the handshake"))?;
        let (secrets, kernel) = conn.dangerous_into_kernel_connection()?;
        let protection = match (version, &secrets.tx.1) {
            (ProtocolVersion::TLSv1_3, _) => Protection::Tls13,
            (ProtocolVersion::TLSv1_2, ConnectionTrafficSecrets::Chacha20Poly1305 { .. }) => {
                Protection::Tls12Chacha
            }
            (ProtocolVersion::TLSv1_2, _) => Protection::Tls12Gcm,
            _ => return Err(TlsError::State("unsupported protocol version")),
        };
        Ok(Self {
            limit: match suite {
                rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
                rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
            },
            protection,
            rx: Direction::new(secrets.rx.0, secrets.rx.1)?,
            tx: Direction::new(secrets.tx.0, secrets.tx.1)?,
            kernel,
            peer_cert,
            negotiated: Negotiated {
                version,
                suite: suite.suite(),
            },
            resumed,
            peer_closed: false,
        })
    }

    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.peer_cert.as_ref()
    }

    pub fn forget_peer_certificate(&mut self) {
        self.peer_cert = None;
    }

    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Decrypts and handles the complete records at the start of `buf`, in place; returns how
    /// many bytes were used (an incomplete record at the end is left for later).
    /// Application data goes to `on_plaintext` as a slice of `buf`; what it stages is sealed
    /// into `out`, as are replies to post-handshake messages.
    pub fn open(
        &mut self,
        buf: &mut [u8],
        out: &mut Vec<u8>,
        staged: &mut Vec<u8>,
        on_plaintext: &mut impl FnMut(&mut [u8], &mut Vec<u8>, Option<&CertificateDer<'static>>),
        progress: &mut Progress,
    ) -> Result<usize, TlsError> {
        let mut pos = 0;
        while buf.len() - pos >= HEADER {
            if self.peer_closed {
                // Nothing after close_notify counts (RFC 8446 §6.1).
                pos = buf.len();
                break;
            }
            let len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
            if len > MAX_PLAINTEXT + 256 + EXPLICIT {
                return Err(rustls::Error::PeerSentOversizedRecord.into());
            }
            if buf.len() - pos < HEADER + len {
                break;
            }
            let record = &mut buf[pos..pos + HEADER + len];
            let (typ, start, end) = self.decrypt(record)?;
            let (start, end) = (pos + start, pos + end);
            pos += HEADER + len;
            match typ {
                APPLICATION_DATA => {
                    if start < end {
                        on_plaintext(&mut buf[start..end], staged, self.peer_cert.as_ref());
                    }
                }
                ALERT => self.alert(&buf[start..end], progress)?,
                HANDSHAKE => self.handshake(&buf[start..end], out)?,
                _ => {
                    return Err(rustls::Error::InappropriateMessage {
                        expect_types: vec![rustls::ContentType::ApplicationData],
                        got_type: rustls::ContentType::from(typ),
                    }
                    .into());
                }
            }
        }
        if !staged.is_empty() {
            self.seal(APPLICATION_DATA, staged, out)?;
            staged.clear();
        }
        Ok(pos)
    }

    /// Decrypts one whole record in place; returns its content type and the plaintext's range
    /// within `record`.
    fn decrypt(&mut self, record: &mut [u8]) -> Result<(u8, usize, usize), TlsError> {
        let outer = record[0];
        let (head, body) = record.split_at_mut(HEADER);
        let bad = || TlsError::Peer(rustls::Error::DecryptError);
        let result = match self.protection {
            Protection::Tls13 => {
                if outer != APPLICATION_DATA {
                    // Post-handshake, every TLS 1.3 record is protected application_data
                    // (a change_cipher_spec is only allowed during the handshake, §5).
                    return Err(rustls::Error::InappropriateMessage {
                        expect_types: vec![rustls::ContentType::ApplicationData],
                        got_type: rustls::ContentType::from(outer),
                    }
                    .into());
                }
                let nonce = Nonce::assume_unique_for_key(self.rx.nonce());
                let aad: [u8; HEADER] = (&*head).try_into().expect("5 bytes");
                let plain = self
                    .rx
                    .key
                    .open_in_place(nonce, Aad::from(aad), body)
                    .map_err(|_| bad())?;
                // Inner plaintext: content, content type, zero padding (§5.2).
                let Some(type_at) = plain.iter().rposition(|&b| b != 0) else {
                    return Err(rustls::Error::PeerMisbehaved(
                        rustls::PeerMisbehaved::IllegalTlsInnerPlaintext,
                    )
                    .into());
                };
                if type_at > MAX_PLAINTEXT {
                    return Err(rustls::Error::PeerSentOversizedRecord.into());
                }
                (plain[type_at], HEADER, HEADER + type_at)
            }
            Protection::Tls12Gcm => {
                if body.len() < EXPLICIT + TAG {
                    return Err(bad());
                }
                let mut n = [0u8; 12];
                n[..4].copy_from_slice(&self.rx.iv[..4]);
                n[4..].copy_from_slice(&body[..EXPLICIT]);
                let aad = tls12_aad(self.rx.seq, outer, body.len() - EXPLICIT - TAG);
                let plain = self
                    .rx
                    .key
                    .open_in_place(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(aad),
                        &mut body[EXPLICIT..],
                    )
                    .map_err(|_| bad())?;
                let plen = plain.len();
                if plen > MAX_PLAINTEXT {
                    return Err(rustls::Error::PeerSentOversizedRecord.into());
                }
                (outer, HEADER + EXPLICIT, HEADER + EXPLICIT + plen)
            }
            Protection::Tls12Chacha => {
                if body.len() < TAG {
                    return Err(bad());
                }
                let nonce = Nonce::assume_unique_for_key(self.rx.nonce());
                let aad = tls12_aad(self.rx.seq, outer, body.len() - TAG);
                let plen = self
                    .rx
                    .key
                    .open_in_place(nonce, Aad::from(aad), body)
                    .map_err(|_| bad())?
                    .len();
                if plen > MAX_PLAINTEXT {
                    return Err(rustls::Error::PeerSentOversizedRecord.into());
                }
                (outer, HEADER, HEADER + plen)
            }
        };
        self.rx.advance()?;
        Ok(result)
    }

    fn alert(&mut self, body: &[u8], progress: &mut Progress) -> Result<(), TlsError> {
        let &[_level, description] = body else {
            return Err(
                rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooShort).into(),
            );
        };
        match description {
            CLOSE_NOTIFY => {
                self.peer_closed = true;
                progress.peer_closed = true;
                Ok(())
            }
            USER_CANCELED => Ok(()),
            d => Err(rustls::Error::AlertReceived(rustls::AlertDescription::from(d)).into()),
        }
    }

    /// Post-handshake handshake messages: only a TLS 1.3 KeyUpdate is accepted.
    fn handshake(&mut self, mut body: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        let refuse = || {
            TlsError::Peer(rustls::Error::InappropriateHandshakeMessage {
                expect_types: vec![rustls::HandshakeType::KeyUpdate],
                got_type: rustls::HandshakeType::Unknown(0),
            })
        };
        if self.protection != Protection::Tls13 {
            // TLS 1.2 renegotiation is not supported.
            return Err(refuse());
        }
        // A record may carry several messages; a message split across records is not
        // accepted (a KeyUpdate is 5 bytes).
        while !body.is_empty() {
            let &[typ, l0, l1, l2, ref rest @ ..] = body else {
                return Err(refuse());
            };
            let len = u32::from_be_bytes([0, l0, l1, l2]) as usize;
            if typ != KEY_UPDATE || len != 1 || rest.is_empty() {
                return Err(refuse());
            }
            let requested = match rest[0] {
                0 => false,
                1 => true,
                _ => {
                    return Err(rustls::Error::InvalidMessage(
                        rustls::InvalidMessage::InvalidKeyUpdate,
                    )
                    .into());
                }
            };
            let (seq, secrets) = self.kernel.update_rx_secret()?;
            self.rx = Direction::new(seq, secrets)?;
            if requested {
                self.update_tx(out)?;
            }
            body = &rest[1..];
        }
        Ok(())
    }

    /// Sends a KeyUpdate (not requesting one back) under the current key, then switches to
    /// the next sending key.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_one(HANDSHAKE, 5, out, |out| {
            out.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0])
        })?;
        let (seq, secrets) = self.kernel.update_tx_secret()?;
        self.tx = Direction::new(seq, secrets)?;
        Ok(())
    }

    /// Seals `plain` (of content type `typ`) into records appended to `out`.
    pub fn seal(&mut self, typ: u8, plain: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_parts(typ, &[plain], out)
    }

    /// Seals the concatenation of `parts` (one plaintext, in order) into records appended to
    /// `out`, each as full as allowed: WebSocket frames queued back to back share records
    /// instead of each ending in a short one (a 16 KiB data frame is 20 bytes over a record).
    pub fn seal_parts(
        &mut self,
        typ: u8,
        parts: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<(), TlsError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let records = total.div_ceil(MAX_PLAINTEXT);
        out.reserve(total + records * (HEADER + EXPLICIT + 1 + TAG));
        let (mut part, mut offset, mut left) = (0, 0, total);
        while left > 0 {
            let n = left.min(MAX_PLAINTEXT);
            self.seal_one(typ, n, out, |out| {
                let mut want = n;
                while want > 0 {
                    let p = parts[part];
                    let take = (p.len() - offset).min(want);
                    out.extend_from_slice(&p[offset..offset + take]);
                    (offset, want) = (offset + take, want - take);
                    if offset == p.len() {
                        (part, offset) = (part + 1, 0);
                    }
                }
            })?;
            left -= n;
        }
        Ok(())
    }

    /// Appends a close_notify alert.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_one(ALERT, 2, out, |out| {
            out.extend_from_slice(&[1, CLOSE_NOTIFY])
        })
    }

    /// Appends one record of `typ` whose `len` plaintext bytes `fill` appends to `out`.
    fn seal_one(
        &mut self,
        typ: u8,
        len: usize,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), TlsError> {
        // The KeyUpdate itself (HANDSHAKE) still goes out under the old key.
        if self.tx.seq >= self.limit && typ != HANDSHAKE {
            if self.protection == Protection::Tls13 {
                self.update_tx(out)?;
            } else {
                return Err(TlsError::State(
                    "the key's confidentiality limit is reached (TLS 1.2 cannot re-key)",
                ));
            }
        }
        let base = out.len();
        let nonce = self.tx.nonce();
        let sealed = match self.protection {
            Protection::Tls13 => {
                let wire = len + 1 + TAG;
                let head = [APPLICATION_DATA, 3, 3, (wire >> 8) as u8, wire as u8];
                out.extend_from_slice(&head);
                fill(out);
                out.push(typ);
                self.tx.key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(head),
                    &mut out[base + HEADER..],
                )
            }
            Protection::Tls12Gcm => {
                let wire = EXPLICIT + len + TAG;
                out.extend_from_slice(&[typ, 3, 3, (wire >> 8) as u8, wire as u8]);
                out.extend_from_slice(&nonce[4..]);
                fill(out);
                self.tx.key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(tls12_aad(self.tx.seq, typ, len)),
                    &mut out[base + HEADER + EXPLICIT..],
                )
            }
            Protection::Tls12Chacha => {
                let wire = len + TAG;
                out.extend_from_slice(&[typ, 3, 3, (wire >> 8) as u8, wire as u8]);
                fill(out);
                self.tx.key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(tls12_aad(self.tx.seq, typ, len)),
                    &mut out[base + HEADER..],
                )
            }
        };
        match sealed {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            Err(_) => {
                out.truncate(base);
                return Err(TlsError::State("sealing a record failed"));
            }
        }
        self.tx.advance()
    }
}

#[cfg(test)]
mod tests {
    //! The record layer against an independent TLS client (rustls's own buffered client, which
    //! keeps its record layer), in memory: every supported version and AEAD, data both ways
    //! across many records, a key update, close_notify, and a tampered record.
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{CipherSuite, ClientConfig, ClientConnection, RootCertStore, ServerConfig};

    use super::super::{Engine, TlsSession};
    use super::*;

    struct Pair {
        client: ClientConnection,
        server: TlsSession,
        /// Plaintext the server received.
        got: Vec<u8>,
        /// Plaintext the client received.
        down: Vec<u8>,
        peer_closed: bool,
    }

    /// AES-128-GCM under TLS 1.3 and under TLS 1.2.
    const AES128_GCM_BOTH_VERSIONS: [(&rustls::SupportedProtocolVersion, CipherSuite); 2] = [
        (
            &rustls::version::TLS13,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ];

    fn pair(version: &'static rustls::SupportedProtocolVersion, suite: CipherSuite) -> Pair {
        let ck = rcgen::generate_simple_self_signed(vec!["gw.test".into()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let provider = Arc::new(super::super::provider());
        let mut sc = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        sc.enable_secret_extraction = true;
        let mut client_provider = super::super::provider();
        client_provider.cipher_suites.retain(|s| s.suite() == suite);
        assert_eq!(
            client_provider.cipher_suites.len(),
            1,
            "{suite:?} is offered"
        );
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let cc = ClientConfig::builder_with_provider(Arc::new(client_provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            ClientConnection::new(Arc::new(cc), ServerName::try_from("gw.test").unwrap()).unwrap();
        client.set_buffer_limit(None);
        let server = TlsSession::new(Arc::new(sc)).unwrap();
        let mut p = Pair {
            client,
            server,
            got: Vec::new(),
            down: Vec::new(),
            peer_closed: false,
        };
        for _ in 0..10 {
            p.pump().unwrap();
            if !p.client.is_handshaking() {
                break;
            }
        }
        assert!(!p.client.is_handshaking(), "handshake completes");
        p
    }

    impl Pair {
        /// Moves the client's bytes to the server and the server's answer back.
        fn pump(&mut self) -> Result<(), TlsError> {
            let mut wire = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut wire).unwrap();
            }
            let mut out = Vec::new();
            let (mut staged, mut scratch) = (Vec::new(), Vec::new());
            let mut spares = crate::buf::VecPool::new(4, 1 << 20);
            let got = &mut self.got;
            let progress = self.server.receive(
                &mut wire,
                &mut out,
                &mut staged,
                &mut scratch,
                &mut spares,
                |plain, _staged, _peer| got.extend_from_slice(plain),
            )?;
            self.peer_closed |= progress.peer_closed;
            self.deliver_to_client(&out);
            Ok(())
        }

        fn deliver_to_client(&mut self, mut bytes: &[u8]) {
            while !bytes.is_empty() {
                self.client.read_tls(&mut bytes).unwrap();
                self.client.process_new_packets().unwrap();
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = self.client.reader().read(&mut chunk) {
                    self.down.extend_from_slice(&chunk[..n]);
                }
            }
        }

        fn client_reads(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.down)
        }

        fn owns_records(&self) -> bool {
            matches!(self.server.engine, Engine::Records(_))
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn exchange(version: &'static rustls::SupportedProtocolVersion, suite: CipherSuite) {
        let mut p = pair(version, suite);
        // Client → server, several records (one write of 100 kB is 7 records).
        let up = pattern(100_000, 1);
        p.client.writer().write_all(&up).unwrap();
        p.pump().unwrap();
        assert!(p.owns_records(), "{suite:?}: the record layer took over");
        assert_eq!(p.got, up, "{suite:?}: client → server");
        // Server → client.
        let down = pattern(70_000, 2);
        let mut out = Vec::new();
        p.server.send(&down, &mut out).unwrap();
        assert_eq!(out.len().div_ceil(MAX_PLAINTEXT + 40), 5, "five records");
        p.deliver_to_client(&out);
        assert_eq!(p.client_reads(), down, "{suite:?}: server → client");
        // Frames queued back to back share records: three 16 KiB data frames (each 20 bytes
        // over a record) and a short one are 4 records, not 7.
        let frames = [
            pattern(16_404, 3),
            pattern(16_404, 4),
            Vec::new(),
            pattern(20, 5),
            pattern(16_404, 6),
        ];
        let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        p.server.send_parts(&parts, &mut out).unwrap();
        let mut lens = Vec::new();
        let mut rest = &out[..];
        while rest.len() >= HEADER {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            lens.push(len);
            rest = &rest[HEADER + len..];
        }
        assert!(rest.is_empty(), "{suite:?}: whole records");
        let total: usize = frames.iter().map(Vec::len).sum();
        assert_eq!(
            lens.len(),
            total.div_ceil(MAX_PLAINTEXT),
            "{suite:?}: {lens:?}"
        );
        p.deliver_to_client(&out);
        assert_eq!(
            p.client_reads(),
            frames.concat(),
            "{suite:?}: parts in order"
        );
        if version == &rustls::version::TLS13 {
            // KeyUpdate from the client (rustls asks for one back): both directions re-key.
            p.client.refresh_traffic_keys().unwrap();
            p.got.clear();
            p.client
                .writer()
                .write_all(b"after the key update")
                .unwrap();
            p.pump().unwrap();
            assert_eq!(p.got, b"after the key update");
            let mut out = Vec::new();
            p.server.send(b"new keys both ways", &mut out).unwrap();
            p.deliver_to_client(&out);
            assert_eq!(p.client_reads(), b"new keys both ways");
        }
        // close_notify both ways.
        let mut out = Vec::new();
        p.server.close_notify(&mut out).unwrap();
        p.deliver_to_client(&out);
        let mut buf = [0u8; 8];
        assert_eq!(p.client.reader().read(&mut buf).unwrap(), 0, "clean EOF");
        p.client.send_close_notify();
        p.pump().unwrap();
        assert!(
            p.peer_closed,
            "{suite:?}: the client's close_notify is seen"
        );
    }

    /// One test per version and AEAD, each running [`exchange`].
    macro_rules! suites {
        ($($name:ident: $version:ident $suite:ident;)*) => {$(
            #[test]
            fn $name() {
                exchange(&rustls::version::$version, CipherSuite::$suite);
            }
        )*};
    }

    suites! {
        tls13_aes128_gcm: TLS13 TLS13_AES_128_GCM_SHA256;
        tls13_aes256_gcm: TLS13 TLS13_AES_256_GCM_SHA384;
        tls13_chacha20_poly1305: TLS13 TLS13_CHACHA20_POLY1305_SHA256;
        tls12_aes128_gcm: TLS12 TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256;
        tls12_aes256_gcm: TLS12 TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384;
        tls12_chacha20_poly1305: TLS12 TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256;
    }

    #[test]
    fn at_the_confidentiality_limit_tls13_rekeys_and_tls12_closes() {
        for (version, suite) in AES128_GCM_BOTH_VERSIONS {
            let mut p = pair(version, suite);
            p.client.writer().write_all(b"x").unwrap();
            p.pump().unwrap();
            let Engine::Records(r) = &mut p.server.engine else {
                panic!("the record layer took over");
            };
            // Two more records under this key, then the limit.
            r.limit = r.tx.seq + 2;
            let data = pattern(5 * MAX_PLAINTEXT, 4);
            let mut out = Vec::new();
            let sent = p.server.send(&data, &mut out);
            if version == &rustls::version::TLS13 {
                sent.unwrap();
                p.deliver_to_client(&out);
                assert_eq!(
                    p.client_reads(),
                    data,
                    "read across the server's key update"
                );
                // And the session goes on under the new key, both ways.
                let mut out = Vec::new();
                p.server.send(b"more", &mut out).unwrap();
                p.deliver_to_client(&out);
                assert_eq!(p.client_reads(), b"more");
            } else {
                assert!(matches!(sent, Err(TlsError::State(_))), "{sent:?}");
            }
        }
    }

    #[test]
    fn a_tampered_record_is_fatal() {
        for (version, suite) in AES128_GCM_BOTH_VERSIONS {
            let mut p = pair(version, suite);
            p.client.writer().write_all(b"first").unwrap();
            p.pump().unwrap();
            assert!(p.owns_records());
            p.client.writer().write_all(b"second").unwrap();
            let mut wire = Vec::new();
            p.client.write_tls(&mut wire).unwrap();
            let last = wire.len() - 3;
            wire[last] ^= 0x40;
            let (mut out, mut staged, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
            let mut spares = crate::buf::VecPool::new(4, 1 << 20);
            let r = p.server.receive(
                &mut wire,
                &mut out,
                &mut staged,
                &mut scratch,
                &mut spares,
                |_, _, _| panic!("no plaintext from a tampered record"),
            );
            assert!(
                matches!(r, Err(TlsError::Peer(rustls::Error::DecryptError))),
                "{suite:?}: {r:?}"
            );
        }
    }

    #[test]
    fn an_empty_record_cut_after_its_header_is_an_error() {
        let mut p = pair(
            &rustls::version::TLS13,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        );
        p.client.writer().write_all(b"x").unwrap();
        p.pump().unwrap();
        assert!(p.owns_records());
        let (mut out, mut staged, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        let mut spares = crate::buf::VecPool::new(4, 1 << 20);
        let mut first = [APPLICATION_DATA, 3, 3, 0];
        p.server
            .receive(
                &mut first,
                &mut out,
                &mut staged,
                &mut scratch,
                &mut spares,
                |_, _, _| {},
            )
            .unwrap();
        let r = p.server.receive(
            &mut [0u8],
            &mut out,
            &mut staged,
            &mut scratch,
            &mut spares,
            |_, _, _| {},
        );
        assert!(matches!(r, Err(TlsError::Peer(_))), "{r:?}");
    }

    #[test]
    fn a_record_cut_anywhere_is_reassembled() {
        let mut p = pair(
            &rustls::version::TLS13,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        );
        p.client.writer().write_all(b"x").unwrap();
        p.pump().unwrap();
        assert!(p.owns_records());
        let data = pattern(40_000, 3);
        p.client.writer().write_all(&data).unwrap();
        let mut wire = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut wire).unwrap();
        }
        p.got.clear();
        // Feed it in odd-sized pieces, as a socket might deliver it: every record cut
        // somewhere, headers included.
        let (head, tail) = wire.split_at_mut(40);
        let pieces = head
            .chunks_mut(3)
            .chain(tail.chunks_mut(1_777))
            .collect::<Vec<_>>();
        let mut spares = crate::buf::VecPool::new(4, 1 << 20);
        for piece in pieces {
            let (mut out, mut staged, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
            let got = &mut p.got;
            p.server
                .receive(
                    piece,
                    &mut out,
                    &mut staged,
                    &mut scratch,
                    &mut spares,
                    |plain, _, _| got.extend_from_slice(plain),
                )
                .unwrap();
            let (held, room) = p.server.partial_len_and_capacity();
            if held >= 1024 {
                // 16,384 bytes of data + type + tag + header: completing it never reallocates.
                assert!(room >= 16_406, "{held} bytes held in a buffer of {room}");
            }
        }
        assert_eq!(p.got, data);
        assert_eq!(p.server.partial_len_and_capacity().0, 0);
        assert!(
            spares.take_spare(crate::buf::ENVELOPE).is_some(),
            "the held record's buffer went back to the pool"
        );
    }
}
