//! The one module that touches rustls (the 0.23 line, its *unbuffered* API).
//!
//! The caller owns every buffer: received ciphertext stays in the driver's receive buffer (or,
//! when a record is cut in two, in a small per-connection `partial` buffer until it is whole);
//! encrypted output is appended to the caller's `Vec`. An idle session therefore holds no
//! read or write buffer — only rustls's own protocol state (≈ 3–4 KB).
//!
//! [`TlsSession::receive`] runs the unbuffered state machine over the received bytes and hands
//! decrypted application data to a callback, which appends any plaintext reply to a staging
//! `Vec`; the staged plaintext is encrypted as soon as rustls allows writing. Keeping the
//! rustls API behind this file means the 0.23 → 0.24 change (which replaces the unbuffered
//! API) touches nothing else.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{
    NoServerSessionStorage, ProducesTickets, ServerConfig, UnbufferedServerConnection,
};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use rustls::{CipherSuite, ProtocolVersion, SupportedCipherSuite};

use rustls_pki_types::CertificateDer;

use crate::buf::VecPool;
use crate::config::{TlsConfig, TlsVersion};
use crate::pki::Keystore;

mod records;
use records::Records;

/// TLS errors. All are fatal for the connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The peer sent something rustls refused (bad record, failed handshake, alert, …).
    #[error("TLS: {0}")]
    Peer(#[from] rustls::Error),
    /// The server configuration could not be built from the keystore (local fault).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// An unexpected state of the unbuffered API (local fault).
    #[error("TLS state: {0}")]
    State(&'static str),
}

/// Builds the server configuration: protocol range from config, AES-128-GCM preferred
/// (measurably cheaper per handshake and per byte here than AES-256), stateless session
/// tickets for resumption, ALPN `http/1.1`.
///
/// With `client_cas` (the device CA and the management CA), every handshake asks for a client
/// certificate issued by one of them but also accepts none: a device without a credential registers, one
/// with a credential is authenticated by the handshake itself (chain, validity, clientAuth).
/// A certificate from any other issuer fails the handshake.
///
/// `tickets` encrypts the session tickets; [`PersistentTicketer`] keeps its keys in the data
/// dir so that devices resume their sessions across a gateway restart. `None` uses a key that
/// lives only as long as the process.
pub fn server_config(
    keystore: &Keystore,
    cfg: &TlsConfig,
    client_cas: &[&CertificateDer<'static>],
    tickets: Option<Arc<dyn ProducesTickets>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(provider());
    let client_auth: Arc<dyn rustls::server::danger::ClientCertVerifier> = match client_cas {
        [] => rustls::server::WebPkiClientVerifier::no_client_auth(),
        cas => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                roots
                    .add((*ca).clone())
                    .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
            }
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(format!("client CA verifier: {e}")))?
        }
    };
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    if cfg.min_version <= TlsVersion::Tls13 && cfg.max_version >= TlsVersion::Tls13 {
        versions.push(&rustls::version::TLS13);
    }
    if cfg.min_version <= TlsVersion::Tls12 {
        versions.push(&rustls::version::TLS12);
    }
    let mut sc = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(client_auth)
        .with_single_cert(keystore.chain.clone(), keystore.key.clone_key())
        .map_err(|e| TlsError::Config(format!("keystore certificate/key: {e}")))?;
    sc.ignore_client_order = true;
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    // After the handshake the records are sealed and opened by `records.rs`, with the
    // traffic secrets rustls hands over.
    sc.enable_secret_extraction = true;
    if cfg.session_tickets {
        sc.ticketer = match tickets {
            Some(t) => t,
            None => rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| TlsError::Config(format!("session ticketer: {e}")))?,
        };
        // Stateless tickets only: a shared session cache would be a lock on the handshake path.
        sc.session_storage = Arc::new(NoServerSessionStorage {});
        sc.send_tls13_tickets = 1;
    } else {
        sc.session_storage = Arc::new(NoServerSessionStorage {});
        sc.send_tls13_tickets = 0;
    }
    Ok(Arc::new(sc))
}

/// The gateway's crypto: aws-lc-rs for key exchange, signatures and tickets, with *ring*'s
/// record ciphers, AES-128-GCM first in each version.
///
/// The record ciphers carry every relayed byte twice (decrypt, encrypt). On x86-64 with
/// VAES/AVX2, ring 0.17 seals 16 KiB records at 5–6 GB/s per core where aws-lc-rs 1.x (its
/// AES-NI path) manages 2.3–2.7 GB/s (`docs/benchmarks.md`, "Bulk relay: where the time
/// went"). Handshake work (ECDHE, ECDSA/RSA signatures, certificate checks) stays on
/// aws-lc-rs, whose figures the storm targets were measured with.
pub fn provider() -> CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    let rank = |s: &SupportedCipherSuite| match s.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 3,
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 4,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => 5,
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 6,
        _ => 10,
    };
    p.cipher_suites.sort_by_key(rank);
    p
}

/// Protocol version and cipher suite of an established session, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// TLS version.
    pub version: ProtocolVersion,
    /// Cipher suite.
    pub suite: CipherSuite,
}

/// What [`TlsSession::receive`] found out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The handshake completed during this call.
    pub handshake_done: bool,
    /// The peer sent close_notify.
    pub peer_closed: bool,
}

/// TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
/// Longest record body any version allows (TLS 1.2: 2^14 + 2048).
const MAX_RECORD_BODY: usize = 16_384 + 2_048;

/// Bytes of a cut record from which the buffer holding it has room for the whole record.
const HOLD_WHOLE: usize = 1024;

/// Room to ask for when the start of a record (`cut`) has to be kept until the rest arrives.
///
/// A piece of 1 KiB or more (bulk transfer, where reads cut records anywhere) gets room for the
/// whole record (the pool rounds it up to a relay envelope buffer, so it serves both); a
/// smaller piece gets a small buffer (rounded up to a power of two, at least 256 B), so a peer
/// that stops a few bytes into a record pins at most twice what it sent, or 256 B.
fn record_room(cut: &[u8]) -> usize {
    if cut.len() < HOLD_WHOLE {
        return cut.len();
    }
    let body = match cut {
        [_, _, _, hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])).min(MAX_RECORD_BODY),
        _ => MAX_RECORD_BODY,
    };
    RECORD_HEADER + body
}

/// Who protects the records: rustls until its handshake is over, then [`Records`].
enum Engine {
    /// Boxed: an established session frees these ~1.1 KB with the rustls connection.
    Handshake(Box<UnbufferedServerConnection>),
    Records(Box<Records>),
    /// Only while the one is being turned into the other, or after that failed.
    Gone,
}

/// One server-side TLS session with caller-owned buffers.
pub struct TlsSession {
    engine: Engine,
    /// Bytes of an incomplete record, kept until the rest arrives. `None` when idle.
    partial: Option<Vec<u8>>,
    established: bool,
    close_notify_sent: bool,
    /// The configuration allows the take-over (`enable_secret_extraction`, set by
    /// [`server_config`]); without it rustls keeps the records.
    own_records: bool,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("established", &self.established)
            .field("partial", &self.partial.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

impl TlsSession {
    /// A new session awaiting a ClientHello.
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, TlsError> {
        Ok(Self {
            own_records: config.enable_secret_extraction,
            engine: Engine::Handshake(Box::new(UnbufferedServerConnection::new(config)?)),
            partial: None,
            established: false,
            close_notify_sent: false,
        })
    }

    /// The completed handshake resumed an earlier session (a session ticket).
    pub fn resumed(&self) -> bool {
        match &self.engine {
            Engine::Handshake(c) => c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            Engine::Records(r) => r.resumed(),
            Engine::Gone => false,
        }
    }

    /// The handshake has completed.
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// The client certificate the peer presented (already verified by the handshake), if any.
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        match &self.engine {
            Engine::Handshake(c) => c.peer_certificates()?.first(),
            Engine::Records(r) => r.peer_certificate(),
            Engine::Gone => None,
        }
    }

    /// Drops the kept copy of the client certificate (after the handshake, once no more
    /// HTTP requests will be checked against it). [`TlsSession::peer_certificate`] is `None`
    /// afterwards.
    pub fn forget_peer_certificate(&mut self) {
        if let Engine::Records(r) = &mut self.engine {
            r.forget_peer_certificate();
        }
    }

    /// Bytes held for an incomplete record.
    pub fn partial_len(&self) -> usize {
        self.partial.as_ref().map_or(0, Vec::len)
    }

    /// Bytes of an incomplete record held, and the capacity holding them.
    #[cfg(test)]
    pub fn partial_len_and_capacity(&self) -> (usize, usize) {
        self.partial
            .as_ref()
            .map_or((0, 0), |p| (p.len(), p.capacity()))
    }

    /// Version and suite, once established.
    pub fn negotiated(&self) -> Option<Negotiated> {
        match &self.engine {
            Engine::Handshake(c) => Some(Negotiated {
                version: c.protocol_version()?,
                suite: c.negotiated_cipher_suite()?.suite(),
            }),
            Engine::Records(r) => Some(r.negotiated()),
            Engine::Gone => None,
        }
    }

    /// Processes received ciphertext `input` (which may be modified).
    ///
    /// Decrypted application data is passed to `on_plaintext(data, staged_out)`; whatever the
    /// callback appends to `staged_out` (plaintext) is encrypted into `out` once rustls allows
    /// writing, and `staged_out` is cleared. Handshake records are appended to `out` too.
    /// Bytes of an incomplete record are kept inside the session.
    pub fn receive(
        &mut self,
        input: &mut [u8],
        out: &mut Vec<u8>,
        staged_out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        spares: &mut VecPool,
        mut on_plaintext: impl FnMut(&mut [u8], &mut Vec<u8>, Option<&CertificateDer<'static>>),
    ) -> Result<Progress, TlsError> {
        let mut progress = Progress::default();
        let mut off = 0;
        let mut spare = None;
        if let Some(mut held) = self.partial.take() {
            // Complete the record that was cut, taking no more from `input` than it needs, so
            // the records after it are handled in place (a copy of one record, not of the
            // whole receive buffer).
            // First the header (if it was cut), then the body it announces.
            for header_known in [false, true] {
                let need = if !header_known {
                    RECORD_HEADER
                } else {
                    let len = usize::from(u16::from_be_bytes([held[3], held[4]]));
                    if len > MAX_RECORD_BODY {
                        return Err(rustls::Error::PeerSentOversizedRecord.into());
                    }
                    RECORD_HEADER + len
                };
                let take = need.saturating_sub(held.len()).min(input.len() - off);
                if header_known && held.capacity() < need && held.len() + take >= HOLD_WHOLE {
                    // Moving to a buffer with room for the whole record, so the rest of it
                    // never makes this one grow by reallocation.
                    let mut room = spares.take_min(need);
                    room.extend_from_slice(&held);
                    spares.give(std::mem::replace(&mut held, room));
                }
                held.extend_from_slice(&input[off..off + take]);
                off += take;
                if held.len() < need {
                    self.partial = Some(held);
                    return Ok(progress);
                }
            }
            let used = self.process(
                &mut held,
                out,
                staged_out,
                scratch,
                &mut on_plaintext,
                &mut progress,
            )?;
            if used < held.len() {
                // rustls left part of it (a handshake it is blocked on): keep everything.
                held.drain(..used);
                held.extend_from_slice(&input[off..]);
                self.partial = Some(held);
                return Ok(progress);
            }
            held.clear();
            spare = Some(held);
        }
        let rest = &mut input[off..];
        let used = self.process(
            rest,
            out,
            staged_out,
            scratch,
            &mut on_plaintext,
            &mut progress,
        )?;
        if used < rest.len() {
            // The buffer of the record just completed is reused for the next cut one; else a
            // pooled one with room for the whole record, so completing it never reallocates.
            let cut = &rest[used..];
            let mut held = match spare.take() {
                Some(h) => h,
                None => spares.take_min(record_room(cut)),
            };
            held.extend_from_slice(cut);
            self.partial = Some(held);
        }
        if let Some(h) = spare {
            spares.give(h);
        }
        Ok(progress)
    }

    /// Runs the state machine over `buf`; returns how many bytes were consumed.
    fn process(
        &mut self,
        buf: &mut [u8],
        out: &mut Vec<u8>,
        staged_out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        on_plaintext: &mut impl FnMut(&mut [u8], &mut Vec<u8>, Option<&CertificateDer<'static>>),
        progress: &mut Progress,
    ) -> Result<usize, TlsError> {
        let mut start = 0;
        loop {
            let conn = match &mut self.engine {
                Engine::Records(r) => {
                    let used =
                        r.open(&mut buf[start..], out, staged_out, on_plaintext, progress)?;
                    return Ok(start + used);
                }
                Engine::Gone => return Err(TlsError::State("the session was lost")),
                Engine::Handshake(c) => c,
            };
            let avail = buf.len() - start;
            let status = conn.process_tls_records(&mut buf[start..]);
            let discard = status.discard;
            let mut stop = false;
            let mut take_over = false;
            let state = status.state?;
            tracing::trace!(?state, discard, avail, "tls state");
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    // Application data means the handshake is over, even if rustls has not
                    // offered WriteTraffic yet (TLS 1.3: Finished and data in one read).
                    if !self.established {
                        self.established = true;
                        progress.handshake_done = true;
                    }
                    scratch.clear();
                    while let Some(rec) = r.next_record() {
                        scratch.extend_from_slice(rec?.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode_with(out, 2048, |dst| e.encode(dst).map_err(encode_needed))?;
                }
                ConnectionState::TransmitTlsData(t) => {
                    // The bytes are in `out`; the shard transmits them. Application data may
                    // already be allowed (TLS 1.3 server after its Finished).
                    t.done();
                }
                ConnectionState::BlockedHandshake => stop = true,
                ConnectionState::WriteTraffic(mut w) => {
                    if !self.established {
                        self.established = true;
                        progress.handshake_done = true;
                    }
                    if !staged_out.is_empty() {
                        encrypt_into(&mut w, staged_out, out)?;
                        staged_out.clear();
                    }
                    stop = true;
                    take_over = true;
                }
                ConnectionState::PeerClosed => progress.peer_closed = true,
                ConnectionState::Closed => stop = true,
                ConnectionState::ReadEarlyData(_) => {
                    return Err(TlsError::State("early data is not enabled"));
                }
                _ => return Err(TlsError::State("unknown unbuffered TLS state")),
            }
            start += discard;
            if !scratch.is_empty() {
                let peer = conn.peer_certificates().and_then(|c| c.first());
                on_plaintext(&mut scratch[..], staged_out, peer);
                scratch.clear();
                continue;
            }
            // The handshake is over and rustls has nothing left to send: the records are
            // ours from here on (records.rs), including any already received after `start`.
            if take_over && !conn.is_handshaking() && !conn.wants_write() && self.own_records {
                let Engine::Handshake(conn) = std::mem::replace(&mut self.engine, Engine::Gone)
                else {
                    unreachable!("matched above");
                };
                self.engine = Engine::Records(Box::new(Records::take_over(*conn)?));
                continue;
            }
            if stop {
                return Ok(start);
            }
        }
    }

    /// Encrypts `plain` into `out` outside of [`TlsSession::receive`] (timers, shutdown).
    pub fn send(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        if plain.is_empty() {
            return Ok(());
        }
        if let Engine::Records(r) = &mut self.engine {
            return r.seal(records::APPLICATION_DATA, plain, out);
        }
        self.with_write(|w| encrypt_into(w, plain, out))
    }

    /// Encrypts the concatenation of `parts` into `out` as full records (frames queued back to
    /// back share records; see [`records::Records::seal_parts`]).
    pub fn send_parts(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), TlsError> {
        if let Engine::Records(r) = &mut self.engine {
            return r.seal_parts(records::APPLICATION_DATA, parts, out);
        }
        parts.iter().try_for_each(|p| self.send(p, out))
    }

    /// Appends a close_notify alert to `out` (once).
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        if self.close_notify_sent || !self.established {
            return Ok(());
        }
        self.close_notify_sent = true;
        if let Engine::Records(r) = &mut self.engine {
            return r.close_notify(out);
        }
        self.with_write(|w| {
            encode_with(out, 64, |dst| {
                w.queue_close_notify(dst).map_err(encrypt_needed)
            })
        })
    }

    fn with_write(
        &mut self,
        f: impl FnOnce(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
        ) -> Result<(), TlsError>,
    ) -> Result<(), TlsError> {
        let Engine::Handshake(conn) = &mut self.engine else {
            return Err(TlsError::State("the session was lost"));
        };
        let status = conn.process_tls_records(&mut []);
        match status.state? {
            ConnectionState::WriteTraffic(mut w) => f(&mut w),
            _ => Err(TlsError::State(
                "cannot write: handshake not complete or session closed",
            )),
        }
    }
}

/// Either the required size (retry with it) or a fatal error.
enum Need {
    Size(usize),
    Fatal(TlsError),
}

fn encode_needed(e: EncodeError) -> Need {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Need::Size(required_size)
        }
        EncodeError::AlreadyEncoded => Need::Fatal(TlsError::State("record already encoded")),
    }
}

fn encrypt_needed(e: EncryptError) -> Need {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Need::Size(required_size)
        }
        EncryptError::EncryptExhausted => {
            Need::Fatal(TlsError::State("encryption limit of the session reached"))
        }
    }
}

/// Calls `f` with writable space at the end of `out`, growing it when `f` asks for more.
fn encode_with(
    out: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, Need>,
) -> Result<(), TlsError> {
    let base = out.len();
    let mut room = guess;
    loop {
        out.resize(base + room, 0);
        match f(&mut out[base..]) {
            Ok(n) => {
                out.truncate(base + n);
                return Ok(());
            }
            Err(Need::Size(required)) if required > room => room = required,
            Err(Need::Size(_)) => {
                out.truncate(base);
                return Err(TlsError::State("encoder asked for less room than it had"));
            }
            Err(Need::Fatal(e)) => {
                out.truncate(base);
                return Err(e);
            }
        }
    }
}

fn encrypt_into(
    w: &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), TlsError> {
    // One record per 16 KiB of plaintext plus ≤ 22 bytes of overhead each (TLS 1.3) or
    // 29 (TLS 1.2 GCM); 64 is a safe bound.
    let guess = plain.len() + (plain.len() / 16384 + 1) * 64;
    encode_with(out, guess, |dst| {
        w.encrypt(plain, dst).map_err(encrypt_needed)
    })
}

/// Version name for logs and metric labels.
pub fn version_label(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::TLSv1_3 => "1.3",
        ProtocolVersion::TLSv1_2 => "1.2",
        _ => "other",
    }
}

/// Session-ticket keys that survive a restart, so a fleet reconnecting after a gateway
/// restart resumes its TLS sessions (no certificate signatures on either side) instead of
/// running full handshakes: the expensive part of a reconnect storm.
///
/// Tickets are AES-256-GCM: `key id (4) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`, the key id as
/// additional data. Two keys are kept, the current one (encrypts) and the previous one (still
/// decrypts); the current key is replaced every [`TICKET_ROTATE_SECS`], so a ticket is usable
/// for at most twice that, and a stolen key file exposes at most that window of resumed
/// sessions (TLS 1.3 resumption still runs a fresh ECDHE; 0-RTT is off).
///
/// The keys live in one file (mode 0600, replaced atomically):
/// `fleetgate-ticket-keys v1`, the Unix time of the last rotation, the current key and the
/// previous key (hex, `-` for none), one per line. A missing or unreadable file gets new keys
/// (devices then do one full handshake).
pub struct PersistentTicketer {
    path: std::path::PathBuf,
    keys: std::sync::RwLock<TicketKeys>,
}

/// How often the ticket key is replaced (12 hours).
pub const TICKET_ROTATE_SECS: u64 = 12 * 3600;

struct TicketKey {
    raw: [u8; 32],
    id: [u8; 4],
    aead: aws_lc_rs::aead::LessSafeKey,
}

struct TicketKeys {
    rotated_at: u64,
    current: TicketKey,
    previous: Option<TicketKey>,
}

impl std::fmt::Debug for PersistentTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentTicketer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TicketKey {
    fn from_raw(raw: [u8; 32]) -> Option<TicketKey> {
        use sha2::Digest as _;
        let unbound = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &raw).ok()?;
        let digest = sha2::Sha256::digest(raw);
        Some(TicketKey {
            raw,
            id: [digest[0], digest[1], digest[2], digest[3]],
            aead: aws_lc_rs::aead::LessSafeKey::new(unbound),
        })
    }

    fn random() -> Result<TicketKey, TlsError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| TlsError::Config(format!("random: {e}")))?;
        TicketKey::from_raw(raw).ok_or(TlsError::Config("AES-256-GCM key".into()))
    }

    fn hex(&self) -> String {
        self.raw.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn parse_key(line: &str) -> Option<TicketKey> {
    let line = line.trim();
    if line.len() != 64 {
        return None;
    }
    let mut raw = [0u8; 32];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(line.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    TicketKey::from_raw(raw)
}

impl PersistentTicketer {
    /// Loads the keys from `path` (rotating them if they are due), or creates new ones.
    pub fn load_or_create(path: &std::path::Path) -> Result<Arc<PersistentTicketer>, TlsError> {
        let now = unix_secs();
        let loaded = std::fs::read_to_string(path).ok().and_then(|text| {
            let mut lines = text.lines();
            if lines.next()? != "fleetgate-ticket-keys v1" {
                return None;
            }
            let rotated_at: u64 = lines.next()?.trim().parse().ok()?;
            let current = parse_key(lines.next()?)?;
            let previous = lines.next().and_then(parse_key);
            Some(TicketKeys {
                rotated_at,
                current,
                previous,
            })
        });
        let fresh = loaded.is_none();
        let keys = match loaded {
            Some(k) => k,
            None => TicketKeys {
                rotated_at: now,
                current: TicketKey::random()?,
                previous: None,
            },
        };
        let t = PersistentTicketer {
            path: path.to_owned(),
            keys: std::sync::RwLock::new(keys),
        };
        if fresh {
            t.save().map_err(|e| {
                TlsError::Config(format!("session ticket keys {}: {e}", path.display()))
            })?;
        }
        t.rotate_if_due(now);
        Ok(Arc::new(t))
    }

    fn save(&self) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let text = {
            let k = self.keys.read().unwrap_or_else(|e| e.into_inner());
            format!(
                "fleetgate-ticket-keys v1\n{}\n{}\n{}\n",
                k.rotated_at,
                k.current.hex(),
                k.previous
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), TicketKey::hex)
            )
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Replaces the current key when it is older than [`TICKET_ROTATE_SECS`].
    fn rotate_if_due(&self, now: u64) {
        {
            let k = self.keys.read().unwrap_or_else(|e| e.into_inner());
            if now < k.rotated_at + TICKET_ROTATE_SECS {
                return;
            }
        }
        let Ok(new) = TicketKey::random() else { return };
        {
            let mut k = self.keys.write().unwrap_or_else(|e| e.into_inner());
            if now < k.rotated_at + TICKET_ROTATE_SECS {
                return; // another thread rotated meanwhile
            }
            let old = std::mem::replace(&mut k.current, new);
            k.previous = Some(old);
            k.rotated_at = now;
        }
        if let Err(e) = self.save() {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot save the rotated session ticket keys; tickets will not survive a restart");
        }
    }
}

impl ProducesTickets for PersistentTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_ROTATE_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.rotate_if_due(unix_secs());
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).ok()?;
        let k = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(4 + 12 + plain.len() + 16);
        out.extend_from_slice(&k.current.id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        k.current
            .aead
            .seal_in_place_append_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(k.current.id),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < 4 + 12 + 16 {
            return None;
        }
        let id: [u8; 4] = cipher[..4].try_into().ok()?;
        let nonce: [u8; 12] = cipher[4..16].try_into().ok()?;
        let k = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = [Some(&k.current), k.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|key| key.id == id)?;
        let mut body = cipher[16..].to_vec();
        let plain = key
            .aead
            .open_in_place(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(id),
                &mut body,
            )
            .ok()?;
        let n = plain.len();
        body.truncate(n);
        Some(body)
    }
}

#[cfg(test)]
mod ticket_tests {
    use super::*;

    #[test]
    fn tickets_survive_a_reload_and_rotation_keeps_the_previous_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tickets.key");
        let a = PersistentTicketer::load_or_create(&path).unwrap();
        let t = a.encrypt(b"session state").unwrap();
        assert_eq!(a.decrypt(&t).unwrap(), b"session state");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A restart: same keys from the file.
        let b = PersistentTicketer::load_or_create(&path).unwrap();
        assert_eq!(b.decrypt(&t).unwrap(), b"session state");
        // Tampering and truncation are refused.
        let mut bad = t.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(b.decrypt(&bad).is_none());
        assert!(b.decrypt(&t[..20]).is_none());
        // One rotation: old tickets still open; two: they do not.
        b.rotate_if_due(unix_secs() + TICKET_ROTATE_SECS + 1);
        assert_eq!(b.decrypt(&t).unwrap(), b"session state");
        let c = PersistentTicketer::load_or_create(&path).unwrap();
        assert_eq!(
            c.decrypt(&t).unwrap(),
            b"session state",
            "rotation was saved"
        );
        c.rotate_if_due(unix_secs() + 3 * TICKET_ROTATE_SECS);
        assert!(c.decrypt(&t).is_none());
        // A broken file gets new keys.
        std::fs::write(&path, "garbage").unwrap();
        let d = PersistentTicketer::load_or_create(&path).unwrap();
        assert!(d.decrypt(&t).is_none());
        assert!(d.decrypt(&d.encrypt(b"x").unwrap()).is_some());
    }
}
