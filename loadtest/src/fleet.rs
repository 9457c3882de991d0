//! One fleetgate device speaking `docs/protocol.md` §5 over a real connection: a fresh key
//! pair and CSR, registration without a client certificate, sessions with the device
//! credential. Used by the `register` and `reconnect` workers.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use rustls::ClientConfig;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};

use crate::fleet_wire::{FailKind, FleetConfig};
use crate::messages::Message;

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// What every device of a worker shares.
pub struct FleetContext {
    pub addr: SocketAddr,
    pub url: String,
    pub path: String,
    /// Without a client certificate (registration).
    pub anonymous: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    pub ws_config: WebSocketConfig,
    pub handshake_timeout: Duration,
    pub close_timeout: Duration,
    pub sources: Vec<IpAddr>,
}

impl FleetContext {
    pub fn from_config(cfg: &FleetConfig) -> Result<Self> {
        let verifier: Arc<dyn ServerCertVerifier> = crate::tls::server_verifier(&cfg.tls.trust)?;
        let anonymous = Arc::new(crate::tls::device_client_config(
            verifier,
            cfg.tls.versions,
            None,
        )?);
        let server_name = ServerName::try_from(cfg.tls.server_name.clone())
            .with_context(|| format!("'{}' is not a valid TLS server name", cfg.tls.server_name))?;
        let path = crate::target::Target::parse(&cfg.url)?.path;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(cfg.read_buffer)
            .write_buffer_size(0)
            .max_write_buffer_size(64 * 1024);
        Ok(Self {
            addr: cfg.addr,
            url: cfg.url.clone(),
            path,
            anonymous,
            server_name,
            ws_config,
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
            close_timeout: Duration::from_millis(cfg.close_timeout_ms),
            sources: cfg.sources.clone(),
        })
    }

    /// The configuration presenting `credential`.
    pub fn with_credential(&self, credential: Arc<CertifiedKey>) -> Arc<ClientConfig> {
        crate::tls::with_credential(&self.anonymous, credential)
    }
}

/// Whether the TLS handshake of `ws` resumed an earlier session.
pub fn resumed(ws: &Ws) -> bool {
    ws.get_ref().get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// Why an attempt did not get what it wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Error {
        kind: FailKind,
        message: String,
    },
    Refused {
        reason: String,
        message: String,
        retry_after: Option<Duration>,
    },
}

impl Failure {
    pub fn error(kind: FailKind, message: impl Into<String>) -> Self {
        Self::Error {
            kind,
            message: message.into(),
        }
    }
}

fn from_device_error(e: crate::device::DeviceError, kind: FailKind) -> Failure {
    Failure::error(kind, e.message)
}

/// A device's key pair and its CSR (DER, standard base64), as §5.3 asks.
pub struct Identity {
    pub key: rcgen::KeyPair,
    pub csr_base64: String,
}

pub fn new_identity(unit_id: &str) -> Result<Identity> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate a P-256 key pair")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, unit_id);
    let csr = params
        .serialize_request(&key)
        .context("cannot make the CSR")?;
    let csr_base64 = base64::engine::general_purpose::STANDARD.encode(csr.der().as_ref());
    Ok(Identity { key, csr_base64 })
}

/// TCP connect (from `source`), TLS (presenting `config`'s client certificate, if any) and
/// the WebSocket upgrade, before `deadline`.
pub async fn open(
    ctx: &FleetContext,
    source: Option<IpAddr>,
    config: Arc<ClientConfig>,
    deadline: Instant,
) -> Result<Ws, Failure> {
    let tcp = tcp_connect(ctx, source, deadline).await?;
    let tls = timeout_at(
        deadline,
        TlsConnector::from(config).connect(ctx.server_name.clone(), tcp),
    )
    .await
    .map_err(|_| timed_out(ctx, "TLS handshake"))?
    .map_err(|e| {
        from_device_error(
            crate::device::tls_error(&e, &ctx.server_name),
            FailKind::Tls,
        )
    })?;
    let request = ctx
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| Failure::error(FailKind::Upgrade, format!("bad URL {}: {e}", ctx.url)))?;
    let (ws, _) = timeout_at(
        deadline,
        tokio_tungstenite::client_async_with_config(request, tls, Some(ctx.ws_config)),
    )
    .await
    .map_err(|_| timed_out(ctx, "WebSocket upgrade"))?
    .map_err(|e| ws_failure(e, Some(&ctx.path)))?;
    Ok(ws)
}

/// `what did not finish` within the handshake timeout.
pub fn timed_out(ctx: &FleetContext, what: &str) -> Failure {
    Failure::error(
        FailKind::Timeout,
        format!(
            "{what} did not finish within {} s",
            ctx.handshake_timeout.as_secs_f64()
        ),
    )
}

/// The TCP connection to the gateway (from `source`, if given), with Nagle off.
pub async fn tcp_connect(
    ctx: &FleetContext,
    source: Option<IpAddr>,
    deadline: Instant,
) -> Result<TcpStream, Failure> {
    let socket = match ctx.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| {
        from_device_error(
            crate::device::connect_error(&e, ctx.addr, source),
            FailKind::Connect,
        )
    })?;
    if let Some(source) = source {
        if source.is_ipv4() {
            let _ = crate::sys::bind_address_no_port(&socket);
        }
        socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
            from_device_error(
                crate::device::connect_error(&e, ctx.addr, Some(source)),
                FailKind::Connect,
            )
        })?;
    }
    let tcp = timeout_at(deadline, socket.connect(ctx.addr))
        .await
        .map_err(|_| timed_out(ctx, &format!("TCP connect to {}", ctx.addr)))?
        .map_err(|e| {
            from_device_error(
                crate::device::connect_error(&e, ctx.addr, source),
                FailKind::Connect,
            )
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Classifies a WebSocket-level error; a TLS alert inside it (a client certificate the
/// gateway rejected shows up after the TLS 1.3 handshake, on the first read) is `Tls`.
fn ws_failure(e: WsError, upgrade_path: Option<&str>) -> Failure {
    if let WsError::Io(io) = &e
        && let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    {
        let message = match tls {
            rustls::Error::AlertReceived(alert) => {
                format!("the gateway sent TLS alert {alert:?} (client certificate refused?)")
            }
            other => format!("TLS error: {other}"),
        };
        return Failure::error(FailKind::Tls, message);
    }
    match (upgrade_path, e) {
        (Some(path), e) => {
            from_device_error(crate::device::upgrade_error(e, path), FailKind::Upgrade)
        }
        (None, WsError::Io(io))
            if matches!(
                io.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
        {
            Failure::error(
                FailKind::Closed,
                format!("the gateway closed the connection ({io})"),
            )
        }
        (None, WsError::ConnectionClosed | WsError::AlreadyClosed) => Failure::error(
            FailKind::Closed,
            "the gateway closed the connection".to_owned(),
        ),
        (None, other) => Failure::error(FailKind::Protocol, format!("WebSocket error: {other}")),
    }
}

/// The next protocol message (one JSON text message), before `deadline`.
pub async fn next_message(
    ws: &mut Ws,
    deadline: Instant,
    waiting_for: &str,
) -> Result<Message, Failure> {
    loop {
        let frame = timeout_at(deadline, ws.next()).await.map_err(|_| {
            Failure::error(
                FailKind::Timeout,
                format!("no {waiting_for} within the handshake timeout"),
            )
        })?;
        match frame {
            Some(Ok(WsMessage::Text(text))) => {
                return Message::parse(text.as_str())
                    .map_err(|m| Failure::error(FailKind::Protocol, m));
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
            Some(Ok(WsMessage::Binary(_))) => {
                return Err(Failure::error(
                    FailKind::Protocol,
                    format!("a binary message while waiting for {waiting_for}"),
                ));
            }
            Some(Ok(WsMessage::Close(frame))) => {
                let why = frame.map_or("no status".to_owned(), |f| {
                    format!("{} {}", u16::from(f.code), f.reason)
                });
                return Err(Failure::error(
                    FailKind::Closed,
                    format!(
                        "the gateway closed the WebSocket ({}) instead of sending {waiting_for}",
                        why.trim()
                    ),
                ));
            }
            Some(Err(e)) => return Err(ws_failure(e, None)),
            None => {
                return Err(Failure::error(
                    FailKind::Closed,
                    format!("the gateway closed the connection instead of sending {waiting_for}"),
                ));
            }
        }
    }
}

fn refused(message: Message) -> Failure {
    match message {
        Message::Refused {
            reason,
            message,
            retry_after_ms,
            ..
        } => Failure::Refused {
            reason,
            message,
            retry_after: retry_after_ms.map(Duration::from_millis),
        },
        other => Failure::error(
            FailKind::Protocol,
            format!("unexpected {}", other.describe()),
        ),
    }
}

/// Waits for `hello` in `mode`; returns its unit ID.
pub async fn expect_hello(
    ws: &mut Ws,
    deadline: Instant,
    mode: &str,
) -> Result<Option<String>, Failure> {
    hello_in(
        next_message(ws, deadline, &format!("hello (mode {mode})")).await?,
        mode,
    )
}

/// The unit ID of a `hello` in `mode`; anything else is a failure (a refusal as such).
pub fn hello_in(message: Message, mode: &str) -> Result<Option<String>, Failure> {
    match message {
        Message::Hello {
            mode: got, unit_id, ..
        } if got == mode => Ok(unit_id),
        Message::Hello { mode: got, .. } => Err(Failure::error(
            FailKind::Protocol,
            format!("hello in mode {got}, expected {mode}"),
        )),
        other => Err(refused(other)),
    }
}

/// Sends `register` (with `session: stay`, §5.3); on success returns the certificate PEM.
/// With `stay`, a session `hello` (or a refusal) follows on the same connection.
pub async fn register(
    ws: &mut Ws,
    deadline: Instant,
    unit_id: &str,
    key: &str,
    csr_base64: &str,
    stay: bool,
) -> Result<String, Failure> {
    let message = Message::Register {
        unit_id: unit_id.to_owned(),
        key: key.to_owned(),
        csr: csr_base64.to_owned(),
        root: None,
        session: stay,
    };
    timeout_at(
        deadline,
        ws.send(WsMessage::Text(Utf8Bytes::from(message.to_json()))),
    )
    .await
    .map_err(|_| Failure::error(FailKind::Timeout, "sending register timed out"))?
    .map_err(|e| ws_failure(e, None))?;
    match next_message(ws, deadline, "registered").await? {
        Message::Registered {
            certificate,
            unit_id: got,
            ..
        } => {
            if got != unit_id {
                return Err(Failure::error(
                    FailKind::Protocol,
                    format!("registered for unit {got}, expected {unit_id}"),
                ));
            }
            Ok(certificate)
        }
        other => Err(refused(other)),
    }
}

/// Finishes the WebSocket close handshake in the background (bounded): the registration
/// connection after `registered`, or a session we end.
pub fn close_in_background(mut ws: Ws, close_timeout: Duration) {
    tokio::task::spawn_local(async move {
        let _ = timeout(close_timeout, close(&mut ws)).await;
    });
}

/// Sends close 1000 (unless one was already exchanged) and reads until the gateway's close.
/// Returns whether the gateway answered.
pub async fn close(ws: &mut Ws) -> bool {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: Utf8Bytes::from_static(""),
    };
    let _ = ws.close(Some(frame)).await;
    let mut answered = false;
    while let Some(Ok(message)) = ws.next().await {
        if message.is_close() {
            answered = true;
        }
    }
    answered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_verifies_and_carries_the_unit_id() {
        let id = new_identity("lt-000123").unwrap();
        let der = base64::engine::general_purpose::STANDARD
            .decode(&id.csr_base64)
            .unwrap();
        // `from_der` checks the request's signature (the proof of possession §5.3 relies on).
        let csr = rcgen::CertificateSigningRequestParams::from_der(&der.clone().into()).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(csr.public_key.der_bytes(), id.key.der_bytes());
        let cn = csr
            .params
            .distinguished_name
            .get(&rcgen::DnType::CommonName)
            .unwrap();
        assert!(matches!(cn, rcgen::DnValue::Utf8String(s) if s == "lt-000123"));
        // A flipped bit in the signature is refused.
        let mut bad = der;
        let last = bad.len() - 3;
        bad[last] ^= 1;
        assert!(rcgen::CertificateSigningRequestParams::from_der(&bad.into()).is_err());
    }

    #[test]
    fn a_generated_key_loads_as_a_client_credential() {
        let id = new_identity("lt-000001").unwrap();
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let cert = params.self_signed(&id.key).unwrap();
        let cred = crate::creds::Credential {
            unit_id: "lt-000001".into(),
            key: id.key.serialize_pem(),
            cert: cert.pem(),
        };
        let (chain, key) = cred.decode().unwrap();
        assert!(crate::tls::certified_key(chain, &key).is_ok());
    }
}
