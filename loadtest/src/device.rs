//! One simulated device: TCP connect (from a chosen source address), TLS, WebSocket
//! upgrade, then a small message every ping interval until told to close with code 1000.
//!
//! Failures come back as a [`DeviceError`] whose message says what to do about it, because a
//! run of 100,000 devices that fails with "os error 111" 100,000 times helps nobody.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, timeout, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};

use crate::wire::{ErrorKind, PingKind, PingSettings, WorkerConfig};

/// Where a worker's devices are in the run; devices watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Devices are still connecting somewhere; pongs are not timed yet.
    Ramp,
    /// Every worker finished its ramp; pong round trips are recorded.
    Hold,
    /// Close now.
    Stop,
}

/// What every device of a worker shares.
pub struct DeviceContext {
    pub addr: SocketAddr,
    pub url: String,
    pub path: String,
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    pub ws_config: WebSocketConfig,
    pub handshake_timeout: Duration,
    pub close_timeout: Duration,
    pub ping: PingSettings,
    pub sources: Vec<IpAddr>,
}

impl DeviceContext {
    pub fn from_config(cfg: &WorkerConfig) -> Result<Self> {
        let tls = match &cfg.tls {
            None => None,
            Some(settings) => {
                let config = crate::tls::client_config(&settings.trust, settings.versions)?;
                let name =
                    ServerName::try_from(settings.server_name.clone()).with_context(|| {
                        format!("'{}' is not a valid TLS server name", settings.server_name)
                    })?;
                Some((TlsConnector::from(config), name))
            }
        };
        let path = crate::target::Target::parse(&cfg.url)?.path;
        // Small buffers: this harness holds up to 100,000 devices next to the server.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(cfg.read_buffer)
            .write_buffer_size(0)
            .max_write_buffer_size(64 * 1024);
        Ok(Self {
            addr: cfg.addr,
            url: cfg.url.clone(),
            path,
            tls,
            ws_config,
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
            close_timeout: Duration::from_millis(cfg.close_timeout_ms),
            ping: cfg.ping,
            sources: cfg.sources.clone(),
        })
    }
}

/// A device that did not make it, with a message for humans.
#[derive(Debug, Clone)]
pub struct DeviceError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DeviceError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// An upgraded connection.
pub enum Conn {
    Plain(Box<WebSocketStream<TcpStream>>),
    Tls(Box<WebSocketStream<TlsStream<TcpStream>>>),
}

/// A successful connect: the connection and, for TLS, what was negotiated.
pub struct Connected {
    pub conn: Conn,
    /// e.g. "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519".
    pub tls: Option<String>,
}

/// TCP connect, TLS handshake and WebSocket upgrade, all within `handshake_timeout`.
pub async fn connect(
    ctx: &DeviceContext,
    source: Option<IpAddr>,
) -> Result<Connected, DeviceError> {
    let deadline = Instant::now() + ctx.handshake_timeout;
    let secs = ctx.handshake_timeout.as_secs_f64();
    let timed_out = |what: &str| {
        DeviceError::new(
            ErrorKind::Timeout,
            format!("{what} did not finish within {secs} s"),
        )
    };

    let socket = match ctx.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| connect_error(&e, ctx.addr, source))?;
    if let Some(source) = source {
        if source.is_ipv4() {
            // Best effort: without it connects still work, only slower past ~14k per source.
            let _ = crate::sys::bind_address_no_port(&socket);
        }
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| connect_error(&e, ctx.addr, Some(source)))?;
    }
    let tcp = timeout_at(deadline, socket.connect(ctx.addr))
        .await
        .map_err(|_| timed_out(&format!("TCP connect to {}", ctx.addr)))?
        .map_err(|e| connect_error(&e, ctx.addr, source))?;
    let _ = tcp.set_nodelay(true);

    let Some((connector, name)) = &ctx.tls else {
        let ws = upgrade(ctx, tcp, deadline)
            .await
            .map_err(|e| e.unwrap_or_else(|| timed_out("WebSocket upgrade")))?;
        return Ok(Connected {
            conn: Conn::Plain(Box::new(ws)),
            tls: None,
        });
    };
    let tls = timeout_at(deadline, connector.connect(name.clone(), tcp))
        .await
        .map_err(|_| timed_out("TLS handshake"))?
        .map_err(|e| tls_error(&e, name))?;
    let negotiated = describe_session(tls.get_ref().1);
    let ws = upgrade(ctx, tls, deadline)
        .await
        .map_err(|e| e.unwrap_or_else(|| timed_out("WebSocket upgrade")))?;
    Ok(Connected {
        conn: Conn::Tls(Box::new(ws)),
        tls: Some(negotiated),
    })
}

/// The upgrade; `Err(None)` means the deadline passed.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &DeviceContext,
    stream: S,
    deadline: Instant,
) -> Result<WebSocketStream<S>, Option<DeviceError>> {
    let request = ctx.url.as_str().into_client_request().map_err(|e| {
        Some(DeviceError::new(
            ErrorKind::Upgrade,
            format!("bad request URL {}: {e}", ctx.url),
        ))
    })?;
    let (ws, _response) = timeout_at(
        deadline,
        tokio_tungstenite::client_async_with_config(request, stream, Some(ctx.ws_config)),
    )
    .await
    .map_err(|_| None)?
    .map_err(|e| Some(upgrade_error(e, &ctx.path)))?;
    Ok(ws)
}

fn describe_session(conn: &rustls::ClientConnection) -> String {
    let version = conn
        .protocol_version()
        .map_or("?".to_owned(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map_or("?".to_owned(), |s| format!("{:?}", s.suite()));
    let group = conn
        .negotiated_key_exchange_group()
        .map_or("?".to_owned(), |g| format!("{:?}", g.name()));
    format!("{version} {suite} {group}")
}

pub(crate) fn connect_error(
    e: &io::Error,
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> DeviceError {
    let from = source.map(|s| format!(" from {s}")).unwrap_or_default();
    let message = match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::ConnectionRefused, _) => {
            format!("connection refused at {addr} — is the server running (and listening there)?")
        }
        (io::ErrorKind::AddrNotAvailable, _) => format!(
            "cannot connect{from} to {addr}: no free local port or unusable source address \
             ({e}) — spread devices over more --sources"
        ),
        (io::ErrorKind::AddrInUse, _) => {
            format!("no free local port{from} ({e}) — spread devices over more --sources")
        }
        (_, Some(24)) => format!(
            "too many open files in this worker ({e}) — use more --workers (each process may \
             hold `ulimit -Hn` descriptors)"
        ),
        (io::ErrorKind::ConnectionReset, _) => format!(
            "connection reset by {addr} while connecting — server overloaded or its listen \
             backlog is full?"
        ),
        (io::ErrorKind::TimedOut, _) => format!("TCP connect to {addr} timed out ({e})"),
        (io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable, _) => {
            format!("{addr} is unreachable{from} ({e})")
        }
        _ => format!("TCP connect{from} to {addr} failed: {e}"),
    };
    DeviceError::new(ErrorKind::Connect, message)
}

pub(crate) fn tls_error(e: &io::Error, name: &ServerName<'_>) -> DeviceError {
    let name = name.to_str();
    let message = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(cert)) => {
            use rustls::CertificateError as C;
            match cert {
                C::UnknownIssuer => "server certificate is not trusted (unknown issuer) — pass \
                     --ca with the server's root (fleetgate: DATA_DIR/root.pem) or --insecure"
                    .to_owned(),
                C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                    "server certificate does not cover '{name}' — use a host its SAN lists, or --sni"
                ),
                C::Expired | C::ExpiredContext { .. } => {
                    "server certificate has expired".to_owned()
                }
                C::NotValidYet | C::NotValidYetContext { .. } => {
                    "server certificate is not valid yet (clock skew?)".to_owned()
                }
                other if format!("{other:?}").contains("CaUsedAsEndEntity") => {
                    "the server presents a CA certificate as its own; it needs an end-entity \
                     certificate signed by that CA"
                        .to_owned()
                }
                other => format!("server certificate rejected: {other:?}"),
            }
        }
        Some(rustls::Error::InvalidMessage(_))
        | Some(rustls::Error::InappropriateMessage { .. }) => {
            format!("the server did not answer with TLS ({e}) — is this a ws:// (plain) port?")
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the server refused the TLS handshake with alert {alert:?}")
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None if e.kind() == io::ErrorKind::UnexpectedEof => "the server closed the connection \
             during the TLS handshake — not a TLS port, or at its connection limit?"
            .to_owned(),
        None if e.kind() == io::ErrorKind::ConnectionReset => {
            "connection reset during the TLS handshake — server overloaded or at its limit?"
                .to_owned()
        }
        None => format!("TLS handshake failed: {e}"),
    };
    DeviceError::new(ErrorKind::Tls, message)
}

pub(crate) fn upgrade_error(e: WsError, path: &str) -> DeviceError {
    let message = match e {
        WsError::Http(response) => {
            let status = response.status();
            let hint = match status.as_u16() {
                404 => format!(
                    " — is '{path}' the right path (fleetgate: /usg/endpoint, /usg/echo with --enable-echo)?"
                ),
                503 => " — server at its connection limit?".to_owned(),
                _ => String::new(),
            };
            format!("WebSocket upgrade refused: HTTP {status}{hint}")
        }
        WsError::Protocol(ProtocolError::HandshakeIncomplete) => {
            "the server closed the connection during the WebSocket upgrade (a wss:// port \
             given as ws://?)"
                .to_owned()
        }
        WsError::Protocol(p) => format!("WebSocket upgrade failed: {p}"),
        WsError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            "the server closed the connection during the WebSocket upgrade".to_owned()
        }
        other => format!("WebSocket upgrade failed: {other}"),
    };
    DeviceError::new(ErrorKind::Upgrade, message)
}

/// Callbacks from an idle device into the worker's figures.
pub trait IdleObserver {
    fn ping_sent(&self);
    /// A reply matched the outstanding ping; `timed` is whether it falls in the hold.
    fn pong(&self, rtt: Duration, timed: bool);
    /// A ping was due while the previous one was unanswered.
    fn pong_missing(&self);
}

/// How an idle device ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdleEnd {
    /// We sent close 1000; `clean` if the server answered the close handshake in time.
    Closed { clean: bool },
    /// The connection ended before we were told to close.
    Lost(String),
}

/// Keeps an established device alive until the phase turns to [`Phase::Stop`].
pub async fn idle(
    conn: Conn,
    ctx: &DeviceContext,
    id: u64,
    phase: &mut watch::Receiver<Phase>,
    observer: &impl IdleObserver,
) -> IdleEnd {
    match conn {
        Conn::Plain(mut ws) => idle_loop(&mut *ws, ctx, id, phase, observer).await,
        Conn::Tls(mut ws) => idle_loop(&mut *ws, ctx, id, phase, observer).await,
    }
}

async fn idle_loop<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    ctx: &DeviceContext,
    id: u64,
    phase: &mut watch::Receiver<Phase>,
    observer: &impl IdleObserver,
) -> IdleEnd {
    let interval = Duration::from_millis(ctx.ping.interval_ms.max(1));
    // Spread the first ping over the interval so the fleet does not ping in lockstep.
    let mut ticker = tokio::time::interval_at(Instant::now() + jitter(id, interval), interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut outstanding: Option<(Bytes, Instant)> = None;
    loop {
        if *phase.borrow_and_update() == Phase::Stop {
            return close(ws, ctx).await;
        }
        tokio::select! {
            _ = ticker.tick() => {
                if outstanding.is_some() {
                    observer.pong_missing();
                }
                seq += 1;
                let payload = ping_payload(id, seq, ctx.ping.size);
                let message = match ctx.ping.kind {
                    PingKind::Ping => Message::Ping(payload.clone()),
                    PingKind::Binary => Message::Binary(payload.clone()),
                    PingKind::Text => match Utf8Bytes::try_from(payload.clone()) {
                        Ok(text) => Message::Text(text),
                        Err(_) => unreachable!("ping payloads are ASCII"),
                    },
                };
                if let Err(e) = ws.send(message).await {
                    return IdleEnd::Lost(describe_lost(&e));
                }
                observer.ping_sent();
                outstanding = Some((payload, Instant::now()));
            }
            message = ws.next() => match message {
                Some(Ok(Message::Pong(data) | Message::Binary(data))) => {
                    check_reply(&mut outstanding, &data, phase, observer);
                }
                Some(Ok(Message::Text(text))) => {
                    check_reply(&mut outstanding, text.as_bytes(), phase, observer);
                }
                Some(Ok(Message::Ping(_) | Message::Frame(_))) => {} // tungstenite answers pings
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map_or("no status".to_owned(), |f| {
                        format!("{} {}", u16::from(f.code), f.reason)
                    });
                    return IdleEnd::Lost(format!("the server closed the WebSocket ({})", why.trim()));
                }
                Some(Err(e)) => return IdleEnd::Lost(describe_lost(&e)),
                None => return IdleEnd::Lost("the server closed the connection".to_owned()),
            },
            changed = phase.changed() => {
                if changed.is_err() {
                    return close(ws, ctx).await;
                }
            }
        }
    }
}

fn check_reply(
    outstanding: &mut Option<(Bytes, Instant)>,
    data: &[u8],
    phase: &watch::Receiver<Phase>,
    observer: &impl IdleObserver,
) {
    if let Some((payload, sent)) = outstanding
        && payload.as_ref() == data
    {
        observer.pong(sent.elapsed(), *phase.borrow() == Phase::Hold);
        *outstanding = None;
    }
}

/// Sends close 1000 and waits (bounded) for the server's close frame. Clean means the
/// server answered the close handshake; how it ends TCP/TLS afterwards (many servers skip
/// TLS close_notify) does not matter.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    ctx: &DeviceContext,
) -> IdleEnd {
    let mut answered = false;
    let handshake = async {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: Utf8Bytes::from_static(""),
        };
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                answered = true;
            }
        }
    };
    let _ = timeout(ctx.close_timeout, handshake).await;
    IdleEnd::Closed { clean: answered }
}

fn describe_lost(e: &WsError) -> String {
    match e {
        WsError::Io(io) if io.kind() == io::ErrorKind::ConnectionReset => {
            "connection reset by the server".to_owned()
        }
        WsError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            "the server closed the connection without a close frame".to_owned()
        }
        WsError::Protocol(p) => format!("WebSocket protocol error from the server: {p}"),
        other => format!("connection lost: {other}"),
    }
}

/// ASCII payload of exactly `size` bytes, unique per (device, sequence) as far as it fits.
pub fn ping_payload(id: u64, seq: u64, size: usize) -> Bytes {
    let tag = format!("{seq:x}.{id:x}.");
    let mut payload: Vec<u8> = tag
        .bytes()
        .chain(std::iter::repeat(b'-'))
        .take(size)
        .collect();
    payload.truncate(size);
    Bytes::from(payload)
}

/// Deterministic per-device offset in `0..interval` (splitmix64 of the id).
pub fn jitter(id: u64, interval: Duration) -> Duration {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let nanos = interval.as_nanos().max(1) as u64;
    Duration::from_nanos(z % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_exact_size_and_is_ascii() {
        for size in [0, 1, 8, 32, 125] {
            let p = ping_payload(123_456, 7, size);
            assert_eq!(p.len(), size);
            assert!(p.is_ascii());
        }
        assert_ne!(ping_payload(1, 1, 32), ping_payload(1, 2, 32));
        assert_ne!(ping_payload(1, 1, 32), ping_payload(2, 1, 32));
    }

    #[test]
    fn jitter_stays_inside_the_interval_and_spreads() {
        let interval = Duration::from_secs(30);
        let offsets: Vec<Duration> = (0..1000).map(|id| jitter(id, interval)).collect();
        assert!(offsets.iter().all(|&o| o < interval));
        let first_half = offsets.iter().filter(|&&o| o < interval / 2).count();
        assert!(
            (400..600).contains(&first_half),
            "{first_half} of 1000 in the first half"
        );
    }
}
