//! The lean wire of `loadtest stream` (the bulk scenario): TLS 1.3 records and WebSocket
//! frames written for throughput, so that the generator's share of the two cores goes to
//! what any client must do (one AEAD pass and one kernel copy per byte, each way) rather than
//! to copies. `--tungstenite` keeps the general path (tokio-rustls and tokio-tungstenite,
//! which copy each byte three to four more times) for comparison.
//!
//! * rustls (its unbuffered client) does the handshake. Then rustls hands over the traffic
//!   secrets through `dangerous_into_kernel_connection`, its API for record layers outside
//!   it, and the records are sealed and opened here with *ring*'s AEADs: a received record is
//!   decrypted in place in the receive buffer; outgoing plaintext is copied once, into the
//!   send buffer, and encrypted there.
//! * Frames from the gateway are parsed as they stream by, across record boundaries: the
//!   body of a data envelope (`docs/protocol.md` §6.2) is counted, never copied; any other
//!   message is gathered whole.
//! * Frames to the gateway are masked (RFC 6455 §5.3). A data frame that repeats (every full
//!   chunk of a stream) is built and masked once and sealed from there each time.
//!
//! Written from RFC 8446 §5 and RFC 6455 §5, not shared with the gateway's own record layer
//! (`src/tls/records.rs`): the generator stays an independent peer. TLS 1.3 only; no
//! re-keying (a run ends long before AES-GCM's 2^24 records), session tickets are ignored
//! (resumption is off in the generator), a `KeyUpdate` from the gateway ends the connection
//! with an error that says so.

use std::io;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::client::UnbufferedClientConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ProtocolVersion};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crate::envelope;
use crate::fleet::{Failure, FleetContext};
use crate::fleet_wire::FailKind;
use crate::messages::Message;

/// Largest plaintext of one record (RFC 8446 §5.1).
const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest ciphertext of one TLS 1.3 record (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Records per direction before the lean wire gives up rather than re-key (RFC 8446 §5.5
/// allows AES-GCM 2^24.5; at 16 KiB a record that is 256 GiB).
const RECORD_LIMIT: u64 = 1 << 24;
/// Largest message gathered whole (anything but a data envelope's body).
const MAX_MESSAGE: usize = 1 << 20;
/// Content types (RFC 8446 §5.1).
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

/// One direction's AEAD key, IV and sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => bail!("the lean wire handles AES-GCM and ChaCha20-Poly1305 only"),
        };
        Self::from_parts(alg, key.as_ref(), iv.as_ref(), seq)
    }

    fn from_parts(alg: &'static aead::Algorithm, key: &[u8], iv: &[u8], seq: u64) -> Result<Self> {
        let key = UnboundKey::new(alg, key)
            .map_err(|_| anyhow!("rustls handed over a key of the wrong length"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv: iv.try_into().context("IV length")?,
            seq,
        })
    }

    /// The next record's nonce: the IV XOR the sequence number (RFC 8446 §5.3).
    fn nonce(&mut self) -> Result<Nonce> {
        if self.seq >= RECORD_LIMIT {
            bail!("{RECORD_LIMIT} records on one connection: the lean wire does not re-key");
        }
        let mut n = self.iv;
        for (a, b) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *a ^= b;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Appends `pieces` (one plaintext, in order) to `out` as records of `content_type`,
    /// each as full as allowed.
    fn seal(&mut self, out: &mut Vec<u8>, content_type: u8, pieces: &[&[u8]]) -> Result<()> {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        out.reserve(total + total.div_ceil(MAX_PLAINTEXT) * (HEADER + 1 + TAG));
        let (mut piece, mut offset, mut left) = (0, 0, total);
        while left > 0 {
            let n = left.min(MAX_PLAINTEXT);
            let start = out.len();
            let len = (n + 1 + TAG) as u16;
            let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
            out.extend_from_slice(&header);
            let mut want = n;
            while want > 0 {
                let p = pieces[piece];
                let take = (p.len() - offset).min(want);
                out.extend_from_slice(&p[offset..offset + take]);
                (offset, want) = (offset + take, want - take);
                if offset == p.len() {
                    (piece, offset) = (piece + 1, 0);
                }
            }
            out.push(content_type);
            let nonce = self.nonce()?;
            let tag = self
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
                .map_err(|_| anyhow!("sealing a record failed"))?;
            out.extend_from_slice(tag.as_ref());
            left -= n;
        }
        Ok(())
    }

    /// Opens the complete record `rec` (header included) in place: its content type and the
    /// range of its plaintext in `rec`.
    fn open(&mut self, rec: &mut [u8]) -> Result<(u8, Range<usize>)> {
        let header: [u8; HEADER] = rec[..HEADER].try_into().expect("a whole record");
        if header[0] != APPLICATION_DATA {
            bail!(
                "a record of type {} after the handshake (RFC 8446 §5.2: always 23)",
                header[0]
            );
        }
        let nonce = self.nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), &mut rec[HEADER..])
            .map_err(|_| anyhow!("a record from the gateway failed to decrypt"))?;
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            bail!("a record from the gateway without a content type");
        };
        Ok((plain[end], HEADER..HEADER + end))
    }
}

/// What [`Frames::feed`] stopped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ready {
    Message,
    Ping,
    Close,
}

/// A streaming parser of the frames from the gateway (unmasked, RFC 6455 §5.2).
#[derive(Default)]
struct Frames {
    head: [u8; 10],
    head_len: usize,
    /// Header bytes needed: 2, then 4 or 10 with an extended length.
    head_need: usize,
    in_frame: bool,
    /// Payload bytes of the current frame still to come.
    left: u64,
    fin: bool,
    /// Opcode of the current frame (0 = continuation).
    opcode: u8,
    /// Opcode of the message in progress (1 text, 2 binary), 0 if none.
    msg_opcode: u8,
    /// The message gathered so far (of a data envelope: its header only).
    msg: Vec<u8>,
    /// All payload bytes of the message so far.
    msg_len: u64,
    /// The message is a data envelope whose header is complete: the rest is only counted.
    counting: bool,
    /// The message was handed out: clear it before the next byte.
    emitted: bool,
    /// Payload of the control frame being read.
    control: Vec<u8>,
}

impl Frames {
    fn new() -> Self {
        Self {
            head_need: 2,
            ..Self::default()
        }
    }

    /// Takes bytes of `data` until a message, ping or close is complete or `data` is used
    /// up; returns how many it took.
    fn feed(&mut self, data: &[u8]) -> Result<(usize, Option<Ready>)> {
        if self.emitted {
            self.emitted = false;
            self.msg.clear();
            self.msg_len = 0;
            self.msg_opcode = 0;
            self.counting = false;
        }
        let mut i = 0;
        while i < data.len() {
            if !self.in_frame {
                let take = (self.head_need - self.head_len).min(data.len() - i);
                self.head[self.head_len..self.head_len + take].copy_from_slice(&data[i..i + take]);
                self.head_len += take;
                i += take;
                if self.head_len < self.head_need {
                    break;
                }
                if self.head_need == 2 {
                    if self.head[1] & 0x80 != 0 {
                        bail!("the gateway sent a masked frame (RFC 6455 §5.1 forbids it)");
                    }
                    self.head_need = match self.head[1] & 0x7f {
                        126 => 4,
                        127 => 10,
                        _ => 2,
                    };
                    if self.head_need > 2 {
                        continue;
                    }
                }
                let len = match self.head_need {
                    2 => u64::from(self.head[1] & 0x7f),
                    4 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                    _ => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
                };
                (self.head_len, self.head_need) = (0, 2);
                self.start_frame(self.head[0], len)?;
                if self.left == 0
                    && let Some(r) = self.frame_done()
                {
                    return Ok((i, Some(r)));
                }
                continue;
            }
            let take = usize::try_from(self.left)
                .unwrap_or(usize::MAX)
                .min(data.len() - i);
            self.payload(&data[i..i + take])?;
            i += take;
            self.left -= take as u64;
            if self.left == 0
                && let Some(r) = self.frame_done()
            {
                return Ok((i, Some(r)));
            }
        }
        Ok((i, None))
    }

    fn start_frame(&mut self, b0: u8, len: u64) -> Result<()> {
        if b0 & 0x70 != 0 {
            bail!("the gateway set RSV bits without an extension (RFC 6455 §5.2)");
        }
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
        match opcode {
            0 if self.msg_opcode == 0 => bail!("a continuation frame without a message"),
            1 | 2 if self.msg_opcode != 0 => bail!("a new message inside a fragmented one"),
            0..=2 => {}
            8..=10 => {
                if !fin || len > 125 {
                    bail!("a fragmented or long control frame (RFC 6455 §5.5)");
                }
                self.control.clear();
            }
            _ => bail!("unknown opcode {opcode}"),
        }
        if matches!(opcode, 1 | 2) {
            self.msg_opcode = opcode;
        }
        (self.in_frame, self.fin, self.opcode, self.left) = (true, fin, opcode, len);
        Ok(())
    }

    fn payload(&mut self, mut d: &[u8]) -> Result<()> {
        if self.opcode >= 8 {
            self.control.extend_from_slice(d);
            return Ok(());
        }
        self.msg_len += d.len() as u64;
        if self.counting {
            return Ok(());
        }
        if self.msg_opcode == 2 {
            // A data envelope: gather its header only (kind, then the unit length).
            if self.msg.len() < 4 {
                let take = (4 - self.msg.len()).min(d.len());
                self.msg.extend_from_slice(&d[..take]);
                d = &d[take..];
            }
            if self.msg.len() >= 4 && self.msg[0] == envelope::DATA {
                let header = envelope::FIXED_HEADER
                    + usize::from(u16::from_be_bytes([self.msg[2], self.msg[3]]));
                let take = header.saturating_sub(self.msg.len()).min(d.len());
                self.msg.extend_from_slice(&d[..take]);
                self.counting = self.msg.len() == header;
                return Ok(());
            }
        }
        if self.msg.len() + d.len() > MAX_MESSAGE {
            bail!("a message from the gateway over {MAX_MESSAGE} bytes");
        }
        self.msg.extend_from_slice(d);
        Ok(())
    }

    fn frame_done(&mut self) -> Option<Ready> {
        self.in_frame = false;
        match self.opcode {
            9 => Some(Ready::Ping),
            8 => Some(Ready::Close),
            10 => None,
            _ if self.fin => {
                self.emitted = true;
                Some(Ready::Message)
            }
            _ => None,
        }
    }
}

/// A message from the gateway.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A binary message: all of it, or of a data envelope its header only; `len` counts all
    /// its bytes.
    Binary {
        head: &'a [u8],
        len: u64,
    },
    Text(&'a [u8]),
    /// A close frame (its status code, if any) or the TLS `close_notify`.
    Closed(Option<u16>),
}

/// One connection on the lean wire.
pub struct LeanConn {
    tcp: TcpStream,
    rx: Direction,
    tx: Direction,
    /// Received bytes: `[pos, end)` not yet opened; `plain` the unparsed plaintext of the
    /// record opened last.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    plain: Range<usize>,
    frames: Frames,
    /// During the upgrade: the HTTP response so far.
    http: Option<Vec<u8>>,
    /// Sealed bytes; `out[sent..]` still to be written.
    out: Vec<u8>,
    sent: usize,
    mask: u64,
    closed: bool,
}

/// The WebSocket frame of `payload` as a client sends it: masked with `mask`.
pub fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads into `buf[end..]` from `tcp` (waiting for it), before `deadline`.
async fn read_more(
    tcp: &TcpStream,
    buf: &mut [u8],
    end: &mut usize,
    deadline: Instant,
) -> io::Result<usize> {
    loop {
        match tcp.try_read(&mut buf[*end..]) {
            Ok(n) => {
                *end += n;
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                timeout_at(deadline, tcp.readable())
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))??;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The context's client configuration with secret extraction on (rustls hands over the
/// traffic secrets only when asked in advance). Per-device configurations made from it
/// inherit the flag.
pub fn enable(ctx: &mut FleetContext) {
    let mut c = ClientConfig::clone(&ctx.anonymous);
    c.enable_secret_extraction = true;
    ctx.anonymous = Arc::new(c);
}

impl LeanConn {
    /// TCP, the TLS handshake (presenting `config`'s client certificate), the upgrade to
    /// `ctx.url` and the first protocol message (`hello` or a refusal), before `deadline`.
    /// `config` must come from a context passed through [`enable`].
    pub async fn connect(
        ctx: &FleetContext,
        source: Option<IpAddr>,
        config: Arc<ClientConfig>,
        read_buffer: usize,
        deadline: Instant,
    ) -> Result<(Self, Message), Failure> {
        let tls = |e: &dyn std::fmt::Display| Failure::error(FailKind::Tls, format!("{e}"));
        let tcp = crate::fleet::tcp_connect(ctx, source, deadline).await?;
        let mut conn = UnbufferedClientConnection::new(config, ctx.server_name.clone())
            .map_err(|e| tls(&e))?;
        let mut buf = vec![0u8; read_buffer.max(4 * (HEADER + MAX_CIPHERTEXT))];
        let (mut pos, mut end) = (0usize, 0usize);
        let mut out = Vec::new();
        loop {
            let status = conn.process_tls_records(&mut buf[pos..end]);
            let discard = status.discard;
            let mut done = false;
            match status.state.map_err(|e| tls(&e))? {
                ConnectionState::EncodeTlsData(mut e) => {
                    let start = out.len();
                    out.resize(start + 4096, 0);
                    let n = match e.encode(&mut out[start..]) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        })) => {
                            out.resize(start + required_size, 0);
                            e.encode(&mut out[start..]).map_err(|e| tls(&e))?
                        }
                        Err(e) => return Err(tls(&e)),
                    };
                    out.truncate(start + n);
                }
                ConnectionState::TransmitTlsData(t) => {
                    timeout_at(deadline, write_all(&tcp, &out))
                        .await
                        .map_err(|_| crate::fleet::timed_out(ctx, "TLS handshake"))?
                        .map_err(|e| Failure::error(FailKind::Tls, format!("send: {e}")))?;
                    out.clear();
                    t.done();
                }
                ConnectionState::BlockedHandshake => {
                    if pos > 0 {
                        buf.copy_within(pos..end, 0);
                        (pos, end) = (0, end - pos);
                    }
                    let n = read_more(&tcp, &mut buf, &mut end, deadline)
                        .await
                        .map_err(|e| match e.kind() {
                            io::ErrorKind::TimedOut => {
                                crate::fleet::timed_out(ctx, "TLS handshake")
                            }
                            _ => Failure::error(FailKind::Tls, format!("receive: {e}")),
                        })?;
                    if n == 0 {
                        return Err(Failure::error(
                            FailKind::Tls,
                            "the gateway closed the connection during the TLS handshake \
                             (client certificate refused?)",
                        ));
                    }
                }
                ConnectionState::WriteTraffic(_) | ConnectionState::ReadTraffic(_) => {
                    done = true;
                }
                ConnectionState::Closed | ConnectionState::PeerClosed => {
                    return Err(Failure::error(
                        FailKind::Tls,
                        "the gateway closed TLS during the handshake",
                    ));
                }
                other => return Err(tls(&format!("unexpected TLS state {other:?}"))),
            }
            pos += discard;
            if done && !conn.is_handshaking() && !conn.wants_write() {
                break;
            }
        }
        if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
            return Err(tls(
                &"the lean wire needs TLS 1.3 (use --tungstenite for 1.2)",
            ));
        }
        let (secrets, _kernel) = conn.dangerous_into_kernel_connection().map_err(|e| {
            tls(&format!(
                "rustls did not hand over the traffic secrets: {e}"
            ))
        })?;
        let keys = (|| {
            Ok::<_, anyhow::Error>((
                Direction::new(secrets.rx.0, &secrets.rx.1)?,
                Direction::new(secrets.tx.0, &secrets.tx.1)?,
            ))
        })()
        .map_err(|e| tls(&e))?;
        let mut seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| tls(&"no random bytes for the WebSocket key"))?;
        let mut lean = Self {
            tcp,
            rx: keys.0,
            tx: keys.1,
            buf,
            pos,
            end,
            plain: 0..0,
            frames: Frames::new(),
            http: Some(Vec::new()),
            out: Vec::new(),
            sent: 0,
            mask: u64::from_le_bytes(seed) | 1,
            closed: false,
        };
        let upgrade = |e: anyhow::Error| Failure::error(FailKind::Upgrade, format!("{e:#}"));
        let key = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            lean.next_mask_bytes(16),
        );
        let host = crate::target::Target::parse(&ctx.url)
            .map_err(upgrade)?
            .authority();
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            ctx.path
        );
        lean.tx
            .seal(&mut lean.out, APPLICATION_DATA, &[request.as_bytes()])
            .map_err(upgrade)?;
        timeout_at(deadline, lean.flush())
            .await
            .map_err(|_| crate::fleet::timed_out(ctx, "WebSocket upgrade"))?
            .map_err(|e| upgrade(e.into()))?;
        let response = lean
            .next_owned(deadline, ctx, "WebSocket upgrade")
            .await?
            .ok_or_else(|| {
                Failure::error(
                    FailKind::Upgrade,
                    "the gateway closed before answering the upgrade",
                )
            })?;
        let Owned::Response(response) = response else {
            unreachable!("the upgrade is answered first")
        };
        check_upgrade(&response, &key, &ctx.path).map_err(upgrade)?;
        let first = lean
            .next_owned(deadline, ctx, "the first protocol message")
            .await?;
        let protocol = |m: String| Failure::error(FailKind::Protocol, m);
        let message = match first {
            Some(Owned::Text(t)) => Message::parse(&t).map_err(protocol)?,
            Some(Owned::Closed(code)) => {
                return Err(Failure::error(
                    FailKind::Closed,
                    format!("the gateway closed the connection ({code:?}) before hello"),
                ));
            }
            Some(other) => return Err(protocol(format!("expected hello, got {other:?}"))),
            None => {
                return Err(Failure::error(
                    FailKind::Closed,
                    "the gateway closed the connection before hello",
                ));
            }
        };
        Ok((lean, message))
    }

    /// The next event as owned data, reading as needed (set-up only).
    async fn next_owned(
        &mut self,
        deadline: Instant,
        ctx: &FleetContext,
        what: &str,
    ) -> Result<Option<Owned>, Failure> {
        loop {
            let ev = self
                .next_raw()
                .map_err(|e| Failure::error(FailKind::Protocol, format!("{e:#}")))?;
            if let Some(ev) = ev {
                return Ok(Some(ev));
            }
            self.flush().await.ok();
            let n = read_more(&self.tcp, &mut self.buf, &mut self.end, deadline)
                .await
                .map_err(|e| match e.kind() {
                    io::ErrorKind::TimedOut => crate::fleet::timed_out(ctx, what),
                    _ => Failure::error(FailKind::Closed, format!("{what}: {e}")),
                })?;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// `next_event` for the set-up: the upgrade response, then messages, owned.
    fn next_raw(&mut self) -> Result<Option<Owned>> {
        if self.http.is_some() {
            while let Some(record) = self.next_plaintext()? {
                let http = self.http.as_mut().expect("checked");
                let Some(range) = record else {
                    continue;
                };
                let old = http.len();
                http.extend_from_slice(&self.buf[range.clone()]);
                if let Some(at) = http.windows(4).position(|w| w == b"\r\n\r\n") {
                    http.truncate(at + 4);
                    self.plain = range.start + (at + 4 - old)..range.end;
                    let response = self.http.take().expect("checked");
                    return Ok(Some(Owned::Response(response)));
                }
                if http.len() > 16 * 1024 {
                    bail!("an upgrade response over 16 KiB");
                }
            }
            return Ok(self.closed.then_some(Owned::Closed(None)));
        }
        Ok(self.next_event()?.map(|e| match e {
            Event::Binary { .. } => Owned::Binary,
            Event::Text(t) => Owned::Text(String::from_utf8_lossy(t).into_owned()),
            Event::Closed(c) => Owned::Closed(c),
        }))
    }

    /// Opens the next complete record: `Some(Some(plaintext range))` for application data,
    /// `Some(None)` for a record handled here (a session ticket, `close_notify`), `None` when
    /// no complete record is buffered.
    fn next_plaintext(&mut self) -> Result<Option<Option<Range<usize>>>> {
        let avail = self.end - self.pos;
        let len = if avail >= HEADER {
            usize::from(u16::from_be_bytes([
                self.buf[self.pos + 3],
                self.buf[self.pos + 4],
            ]))
        } else {
            0
        };
        if len > MAX_CIPHERTEXT {
            bail!("a record of {len} bytes from the gateway (RFC 8446 §5.2: at most 2^14 + 256)");
        }
        if avail < HEADER || avail < HEADER + len {
            // Room for a whole record at the end of the buffer.
            if self.pos == self.end {
                (self.pos, self.end) = (0, 0);
            } else if self.buf.len() - self.pos < HEADER + MAX_CIPHERTEXT {
                self.buf.copy_within(self.pos..self.end, 0);
                (self.pos, self.end) = (0, self.end - self.pos);
            }
            return Ok(None);
        }
        let base = self.pos;
        let (content_type, range) = self.rx.open(&mut self.buf[base..base + HEADER + len])?;
        self.pos += HEADER + len;
        let plain = &self.buf[base + range.start..base + range.end];
        match content_type {
            APPLICATION_DATA => Ok(Some(Some(base + range.start..base + range.end))),
            ALERT if plain == [1, 0] || plain == [2, 0] => {
                self.closed = true;
                Ok(Some(None))
            }
            ALERT => bail!(
                "the gateway sent TLS alert {}",
                plain.get(1).copied().unwrap_or(0)
            ),
            HANDSHAKE => {
                // Post-handshake messages: type u8, length u24 (RFC 8446 §4).
                let mut rest = plain;
                while rest.len() >= 4 {
                    let n = usize::from(rest[1]) << 16
                        | usize::from(rest[2]) << 8
                        | usize::from(rest[3]);
                    match rest[0] {
                        4 => {} // NewSessionTicket: resumption is off
                        24 => {
                            bail!("the gateway sent a TLS KeyUpdate; the lean wire does not re-key")
                        }
                        t => bail!("an unexpected post-handshake message of type {t}"),
                    }
                    rest = rest.get(4 + n..).unwrap_or_default();
                }
                Ok(Some(None))
            }
            t => bail!("an unexpected record content type {t}"),
        }
    }

    /// The next message among the bytes received so far (`None`: read more).
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>> {
        loop {
            if !self.plain.is_empty() {
                let (used, ready) = self.frames.feed(&self.buf[self.plain.clone()])?;
                self.plain.start += used;
                match ready {
                    None => continue,
                    Some(Ready::Ping) => {
                        let payload = std::mem::take(&mut self.frames.control);
                        self.send_frame(10, &payload)?;
                        self.frames.control = payload;
                        continue;
                    }
                    Some(Ready::Close) => {
                        self.closed = true;
                        let c = &self.frames.control;
                        let code = (c.len() >= 2).then(|| u16::from_be_bytes([c[0], c[1]]));
                        return Ok(Some(Event::Closed(code)));
                    }
                    Some(Ready::Message) => {
                        let f = &self.frames;
                        return Ok(Some(if f.msg_opcode == 1 {
                            Event::Text(&f.msg)
                        } else {
                            Event::Binary {
                                head: &f.msg,
                                len: f.msg_len,
                            }
                        }));
                    }
                }
            }
            match self.next_plaintext()? {
                Some(Some(range)) => self.plain = range,
                Some(None) if self.closed => return Ok(Some(Event::Closed(None))),
                Some(None) => {}
                None => return Ok(None),
            }
        }
    }

    /// Reads what the socket has: `Ok(0)` is the end of the connection; `WouldBlock` if
    /// nothing is there.
    pub fn try_read(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            return Err(io::Error::other(
                "receive buffer full (a bug in the lean wire)",
            ));
        }
        let n = self.tcp.try_read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Waits until the socket has something to read.
    pub async fn readable(&self) -> io::Result<()> {
        self.tcp.readable().await
    }

    /// Waits until the socket takes more bytes.
    pub async fn writable(&self) -> io::Result<()> {
        self.tcp.writable().await
    }

    fn next_mask_bytes(&mut self, n: usize) -> Vec<u8> {
        // xorshift64 from a random seed: the masks need only be unpredictable to a
        // cross-protocol attacker (RFC 6455 §10.3), which a load generator does not face.
        (0..n)
            .map(|_| {
                self.mask ^= self.mask << 13;
                self.mask ^= self.mask >> 7;
                self.mask ^= self.mask << 17;
                self.mask as u8
            })
            .collect()
    }

    /// A fresh masking key.
    pub fn next_mask(&mut self) -> [u8; 4] {
        self.next_mask_bytes(4).try_into().expect("4 bytes")
    }

    /// Seals a frame of `payload` into the send buffer (masked here).
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        let mask = self.next_mask();
        let frame = client_frame(opcode, payload, mask);
        self.tx.seal(&mut self.out, APPLICATION_DATA, &[&frame])
    }

    /// Seals whole, already masked frames into the send buffer, packed into full records.
    pub fn send_frames(&mut self, frames: &[&[u8]]) -> Result<()> {
        self.tx.seal(&mut self.out, APPLICATION_DATA, frames)
    }

    /// Bytes sealed and not yet written.
    pub fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Writes what the socket takes; `true` when everything is written.
    pub fn try_flush(&mut self) -> io::Result<bool> {
        while self.sent < self.out.len() {
            match self.tcp.try_write(&self.out[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.sent = 0;
        Ok(true)
    }

    /// Writes everything sealed.
    pub async fn flush(&mut self) -> io::Result<()> {
        while !self.try_flush()? {
            self.tcp.writable().await?;
        }
        Ok(())
    }

    /// Close frame (1000), `close_notify`, then waits up to `wait` for the gateway to close.
    pub async fn close(&mut self, wait: std::time::Duration) {
        let deadline = Instant::now() + wait;
        let _ = self.send_frame(8, &1000u16.to_be_bytes());
        let _ = self.tx.seal(&mut self.out, ALERT, &[&[1, 0]]);
        if timeout_at(deadline, self.flush()).await.is_err() {
            return;
        }
        while !self.closed {
            loop {
                match self.next_event() {
                    Ok(Some(Event::Closed(_))) | Err(_) => return,
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                }
            }
            match read_more(&self.tcp, &mut self.buf, &mut self.end, deadline).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    }
}

/// A set-up event, owned.
#[derive(Debug)]
enum Owned {
    Response(Vec<u8>),
    Binary,
    Text(String),
    Closed(Option<u16>),
}

/// Checks the upgrade response: status 101 and the `Sec-WebSocket-Accept` of `key`
/// (RFC 6455 §4.1).
fn check_upgrade(response: &[u8], key: &str, path: &str) -> Result<()> {
    let text = String::from_utf8_lossy(response);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("101") {
        bail!("the upgrade on {path} was answered {status:?}");
    }
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, v)| v.trim().to_owned())
        .context("no Sec-WebSocket-Accept in the upgrade response")?;
    let want = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if accept != want {
        bail!("Sec-WebSocket-Accept {accept:?}, expected {want:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `bytes` in pieces of `step`, collecting (ready, message, length).
    fn parse_all(bytes: &[u8], step: usize) -> Vec<(Ready, Vec<u8>, u64)> {
        let mut f = Frames::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(step) {
            let mut at = 0;
            while at < piece.len() {
                let (used, ready) = f.feed(&piece[at..]).unwrap();
                at += used;
                match ready {
                    Some(Ready::Message) => got.push((Ready::Message, f.msg.clone(), f.msg_len)),
                    Some(r) => got.push((r, f.control.clone(), 0)),
                    None => assert_eq!(at, piece.len()),
                }
            }
        }
        got
    }

    #[test]
    fn frames_are_parsed_across_any_cut_and_data_bodies_are_only_counted() {
        let data = envelope::encode(envelope::DATA, 3, 9, "dev-1", &vec![0xab; 70_000]);
        let credit = envelope::encode(envelope::CREDIT, 3, 9, "", &131_072u32.to_be_bytes());
        let mut stream = server_frame(1, true, br#"{"type":"hello"}"#);
        stream.extend(server_frame(2, true, &data));
        stream.extend(server_frame(9, true, b"pi"));
        // A fragmented binary message with a ping between its fragments.
        stream.extend(server_frame(2, false, &credit[..5]));
        stream.extend(server_frame(9, true, b""));
        stream.extend(server_frame(0, true, &credit[5..]));
        stream.extend(server_frame(8, true, &1000u16.to_be_bytes()));
        for step in [1, 2, 3, 7, 126, 16_384, stream.len()] {
            let got = parse_all(&stream, step);
            assert_eq!(got.len(), 6, "step {step}");
            assert_eq!(got[0].1, br#"{"type":"hello"}"#);
            // The data envelope: its header only, the length of all of it.
            assert_eq!(got[1].1, &data[..envelope::FIXED_HEADER + 5], "step {step}");
            assert_eq!(got[1].2, data.len() as u64);
            assert_eq!((got[2].0, &got[2].1[..]), (Ready::Ping, &b"pi"[..]));
            assert_eq!(got[3].0, Ready::Ping);
            assert_eq!(
                (got[4].1.clone(), got[4].2),
                (credit.clone(), credit.len() as u64)
            );
            assert_eq!((got[5].0, &got[5].1[..]), (Ready::Close, &[3u8, 232][..]));
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut f = Frames::new();
        assert!(f.feed(&[0x82, 0x81, 0, 0, 0, 0, 0]).is_err(), "masked");
        let mut f = Frames::new();
        assert!(f.feed(&[0xc2, 0]).is_err(), "RSV1");
        let mut f = Frames::new();
        assert!(f.feed(&[0x80, 0]).is_err(), "continuation first");
        let mut f = Frames::new();
        assert!(f.feed(&[0x09, 0]).is_err(), "fragmented ping");
        let mut f = Frames::new();
        assert!(f.feed(&[0x83, 0]).is_err(), "opcode 3");
    }

    #[test]
    fn client_frames_are_masked_and_sized() {
        let f = client_frame(2, b"abc", [1, 2, 3, 4]);
        assert_eq!(f, [0x82, 0x83, 1, 2, 3, 4, b'a' ^ 1, b'b' ^ 2, b'c' ^ 3]);
        let f = client_frame(2, &[0; 300], [0; 4]);
        assert_eq!(&f[..4], &[0x82, 0x80 | 126, 1, 44]);
        let f = client_frame(2, &vec![0; 70_000], [0; 4]);
        assert_eq!(&f[..2], &[0x82, 0x80 | 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
    }

    #[test]
    fn records_round_trip_across_pieces_and_tampering_is_caught() {
        for alg in [
            &aead::AES_128_GCM,
            &aead::AES_256_GCM,
            &aead::CHACHA20_POLY1305,
        ] {
            let key = vec![7u8; alg.key_len()];
            let pair = || Direction::from_parts(alg, &key, &[9; 12], 5).unwrap();
            let (mut tx, mut rx) = (pair(), pair());
            let a: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
            let b = vec![0x55u8; 30_000];
            let mut out = Vec::new();
            tx.seal(&mut out, APPLICATION_DATA, &[&a, &[], &b]).unwrap();
            // 50,000 bytes: records of 16,384, 16,384, 16,384 and 848.
            let mut plain = Vec::new();
            let mut at = 0;
            let mut records = 0;
            while at < out.len() {
                let len = usize::from(u16::from_be_bytes([out[at + 3], out[at + 4]]));
                let (ty, r) = rx.open(&mut out[at..at + HEADER + len]).unwrap();
                assert_eq!(ty, APPLICATION_DATA);
                plain.extend_from_slice(&out[at + r.start..at + r.end]);
                at += HEADER + len;
                records += 1;
            }
            assert_eq!(records, 4);
            assert_eq!(plain, [a.clone(), b.clone()].concat());
            assert_eq!((tx.seq, rx.seq), (9, 9));
            // One flipped bit fails; so does a replay (the sequence number moved on).
            let mut out = Vec::new();
            tx.seal(&mut out, APPLICATION_DATA, &[b"hello"]).unwrap();
            let mut bad = out.clone();
            bad[7] ^= 1;
            assert!(pair().open(&mut bad).is_err());
            let mut again = out.clone();
            rx.open(&mut out).unwrap();
            assert!(rx.open(&mut again).is_err());
        }
    }

    /// The whole lean wire against an independent server: rustls's own server and
    /// tungstenite's server side, over TCP: TLS 1.3 handshake (with the session tickets rustls
    /// sends after it), upgrade, hello, masked frames both ways, a message of many records,
    /// ping/pong and the closing handshake.
    #[tokio::test]
    async fn talks_to_rustls_and_tungstenite() {
        use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
        )
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let big = envelope::encode(envelope::DATA, 1, 2, "u", &vec![0xcd; 100_000]);
        let server = std::thread::spawn({
            let big = big.clone();
            move || {
                let (tcp, _) = listener.accept().unwrap();
                let tls = rustls::StreamOwned::new(
                    rustls::ServerConnection::new(Arc::new(server)).unwrap(),
                    tcp,
                );
                let mut ws = tungstenite::accept(tls).unwrap();
                ws.send(WsMessage::text(
                    r#"{"type":"hello","protocol":1,"mode":"session","unit_id":"u"}"#,
                ))
                .unwrap();
                let mut echoed = 0;
                loop {
                    match ws.read() {
                        Ok(WsMessage::Binary(b)) => {
                            echoed += b.len();
                            ws.send(WsMessage::Ping(b"are you there".to_vec().into()))
                                .unwrap();
                            ws.send(WsMessage::Binary(b)).unwrap();
                            ws.send(WsMessage::Binary(big.clone().into())).unwrap();
                        }
                        Ok(WsMessage::Pong(p)) => assert_eq!(&p[..], b"are you there"),
                        Ok(WsMessage::Close(f)) => {
                            assert_eq!(u16::from(f.unwrap().code), 1000);
                            let _ = ws.flush();
                            return echoed;
                        }
                        Ok(other) => panic!("unexpected {other:?}"),
                        Err(e) => panic!("server: {e}"),
                    }
                }
            }
        });
        let tls = crate::wire::TlsSettings {
            trust: crate::tls::Trust::Insecure,
            versions: crate::tls::TlsVersions::Tls13,
            server_name: "localhost".to_owned(),
        };
        let mut ctx = crate::mgmt::context(
            &format!("wss://localhost:{}/usg/endpoint", addr.port()),
            addr,
            &tls,
            None,
            64 * 1024,
            std::time::Duration::from_secs(10),
            Vec::new(),
        )
        .unwrap();
        enable(&mut ctx);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let (mut conn, hello) =
            LeanConn::connect(&ctx, None, ctx.anonymous.clone(), 64 * 1024, deadline)
                .await
                .map_err(|e| format!("{e:?}"))
                .unwrap();
        assert!(matches!(hello, Message::Hello { ref mode, .. } if mode == "session"));
        // A prebuilt frame, sealed twice in one go, then a frame masked on the way.
        let payload = envelope::encode(envelope::DATA, 1, 0, "u", &vec![0x11; 40_000]);
        let frame = client_frame(2, &payload, conn.next_mask());
        conn.send_frames(&[&frame, &frame]).unwrap();
        conn.send_frame(2, b"short").unwrap();
        conn.flush().await.unwrap();
        let mut got = Vec::new();
        while got.len() < 6 {
            while let Some(ev) = conn.next_event().unwrap() {
                got.push(match ev {
                    Event::Binary { head, len } => (head.to_vec(), len),
                    other => panic!("unexpected {other:?}"),
                });
            }
            conn.flush().await.unwrap(); // the pongs
            conn.readable().await.unwrap();
            match conn.try_read() {
                Ok(n) => assert!(n > 0, "the server closed early"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let header = envelope::FIXED_HEADER + 1;
        for pair in got.chunks(2).take(2) {
            // The echo of a data envelope: counted; the server's big one: counted.
            assert_eq!(pair[0], (payload[..header].to_vec(), payload.len() as u64));
            assert_eq!(pair[1], (big[..header].to_vec(), big.len() as u64));
        }
        assert_eq!(got[4], (b"short".to_vec(), 5));
        assert_eq!(got[5], (big[..header].to_vec(), big.len() as u64));
        conn.close(std::time::Duration::from_secs(5)).await;
        assert!(conn.closed);
        assert_eq!(server.join().unwrap(), 2 * payload.len() + 5);
    }
}
