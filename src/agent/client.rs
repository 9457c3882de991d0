//! One connection to the gateway: first contact (fingerprint), registration, session.

use std::io::ErrorKind;
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{HandshakeError, WebSocket};

use super::backoff::StopHandle;
use super::relay::{Relay, RelayAction, Reply};
use super::state::{AgentState, Connector, Credential, Trust, parse_device_cert};
use super::tls::{self, TlsStream, io_error};
use super::{AgentError, AgentOptions, Refusal};
use crate::pki::Fingerprint;
use crate::proto::device::{Hello, Message, Mode, Register};
use crate::proto::envelope::ResponseBody;

/// What the first contact with a gateway found (`docs/protocol.md` §5.2).
#[derive(Debug, Clone)]
pub struct FirstContact {
    /// The gateway contacted.
    pub connector: Connector,
    /// SHA-256 of the last certificate of the chain the gateway sent (its root).
    pub fingerprint: Fingerprint,
    /// That root certificate.
    pub root: CertificateDer<'static>,
    /// How many certificates the gateway sent.
    pub chain_len: usize,
    /// The chain validates against the system's public roots: no fingerprint step needed.
    pub system_trusted: bool,
}

impl FirstContact {
    /// The trust to store: [`Trust::System`] for a public-CA chain, else the pinned root.
    pub fn trust(&self) -> Trust {
        if self.system_trusted {
            Trust::System
        } else {
            Trust::Pinned(self.fingerprint)
        }
    }
}

/// First contact: connects to `connector` over TLS without verifying, takes the last
/// certificate of the chain as the root, and validates the chain with that root as the only
/// trust anchor (signatures, validity, the dialled host in the leaf's SAN). A chain that fails
/// this is an error ([`AgentError::Chain`]) unless it validates against the system roots.
///
/// The caller shows [`FirstContact::fingerprint`] to the user (see
/// [`FingerprintChallenge`](super::FingerprintChallenge)) and, once confirmed, stores it with
/// [`AgentState::adopt`].
pub fn fetch_fingerprint(
    connector: &Connector,
    options: &AgentOptions,
) -> Result<FirstContact, AgentError> {
    let verifier = Arc::new(tls::CaptureVerifier::new());
    let config = tls::capture_config(verifier.clone())?;
    let mut stream = tls::connect_tls(connector, config, options)?;
    stream.conn.send_close_notify();
    let _ = stream.conn.complete_io(&mut stream.sock);
    let chain = std::mem::take(&mut *verifier.chain.lock().unwrap_or_else(|p| p.into_inner()));
    let (leaf, rest) = chain.split_first().ok_or_else(|| AgentError::Chain {
        connector: connector.url(),
        message: "the gateway sent no certificate".into(),
    })?;
    let root = chain.last().expect("non-empty").clone();
    let fingerprint = Fingerprint::of(&root);
    let name = tls::server_name(connector)?;
    let now = UnixTime::now();
    let system_trusted = tls::system_roots()
        .ok()
        .and_then(|roots| {
            WebPkiServerVerifier::builder_with_provider(roots, tls::provider())
                .build()
                .ok()
        })
        .is_some_and(|v| v.verify_server_cert(leaf, rest, &name, &[], now).is_ok());
    if !system_trusted {
        tls::PinnedRootVerifier::new(fingerprint, None)
            .verify_server_cert(leaf, rest, &name, &[], now)
            .map_err(|e| AgentError::Chain {
                connector: connector.url(),
                message: e.to_string(),
            })?;
    }
    Ok(FirstContact {
        connector: connector.clone(),
        fingerprint,
        root,
        chain_len: chain.len(),
        system_trusted,
    })
}

impl AgentState {
    /// Trusts what a confirmed first contact found: sets the trust (pinned fingerprint or
    /// system), stores the root certificate (`root.pem`) and saves `agent.toml`.
    pub fn adopt(&mut self, contact: &FirstContact) -> Result<(), AgentError> {
        self.config.trust = Some(contact.trust());
        if !contact.system_trusted {
            self.store_root(&contact.root)?;
        }
        self.save()
    }
}

/// What to register: the gateway, the unit ID and the first-authentication key.
#[derive(Debug, Clone)]
pub struct RegisterRequest {
    /// The gateway to register with.
    pub connector: Connector,
    /// The unit ID (1–64 printable characters).
    pub unit_id: String,
    /// The first-authentication key as the user typed it.
    pub key: String,
}

/// A successful registration.
#[derive(Debug)]
pub struct Registered {
    /// The unit ID the credential is for (as the gateway wrote it).
    pub unit_id: String,
    /// The gateway it registered with.
    pub connector: Connector,
    /// The device certificate (PEM), stored in `device.pem`.
    pub certificate: String,
    /// End of the credential's validity (Unix seconds).
    pub not_after: i64,
    /// The registration connection, continued by the gateway as the device's session
    /// (`docs/protocol.md` §5.3, "Continuing as the session"): ready to use, like one from
    /// [`connect_session`]. `None` when the gateway closed it instead (an older gateway, or
    /// the device limit): connect with the credential.
    pub session: Option<Session>,
}

/// A PKCS#10 request for `key` with CN = `unit_id`, DER.
pub fn make_csr(key: &KeyPair, unit_id: &str) -> Result<Vec<u8>, AgentError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, unit_id);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(key)
        .map_err(|e| AgentError::Crypto(format!("certificate request: {e}")))?;
    Ok(csr.der().as_ref().to_vec())
}

/// Registers the device (`docs/protocol.md` §5.3).
///
/// Needs the trust set (by [`AgentState::adopt`] after [`fetch_fingerprint`]). Uses the key
/// pair of `device.key`, generating and storing it first if there is none, so a retry —
/// within this call or a later one — presents a CSR for the same key pair, which is what lets
/// the gateway accept a spent one-time key again when its answer was lost. Transport failures
/// (connect, TLS I/O, a connection closed before the answer) and `internal_error` are retried
/// up to `options.register_attempts` times with backoff; every other refusal is returned as
/// [`AgentError::Refused`] at once.
///
/// On success the certificate is stored (`device.pem`, 0600; `device-ca.pem`), the unit ID is
/// recorded and the connector is added to the connectors if missing; `agent.toml` is saved.
pub fn register(
    state: &mut AgentState,
    request: &RegisterRequest,
    options: &AgentOptions,
    stop: &StopHandle,
) -> Result<Registered, AgentError> {
    let trust = state.config.trust.ok_or(AgentError::NoTrust)?;
    let key = state.load_or_create_key()?;
    let csr = make_csr(&key, request.unit_id.trim())?;
    let message = Message::Register(Register {
        unit_id: request.unit_id.clone(),
        key: request.key.clone(),
        csr: base64::engine::general_purpose::STANDARD.encode(&csr),
        root: match trust {
            Trust::Pinned(fp) => Some(fp.hex()),
            Trust::System => None,
        },
        // Continue on this connection as the session: one TLS handshake instead of two.
        session: true,
    })
    .to_json();
    let config = state.tls_config(None)?;
    let attempts = options.register_attempts.max(1);
    let mut attempt = 0;
    let (answer, continued) = loop {
        let result = register_once(&request.connector, config.clone(), &message, options);
        attempt += 1;
        let retry_after = match &result {
            Ok(_) => break result?,
            Err(AgentError::Refused(r)) if r.reason == "internal_error" => r.retry_after,
            Err(e) if e.is_transient() => None,
            Err(_) => break result?,
        };
        if attempt >= attempts {
            break result?;
        }
        let delay = options.backoff.delay(attempt - 1, retry_after);
        tracing::info!(
            connector = %request.connector,
            "registration attempt failed ({}); retrying in {delay:?}",
            result.as_ref().err().map(ToString::to_string).unwrap_or_default()
        );
        if stop.sleep(delay) {
            return Err(AgentError::Stopped);
        }
    };
    let (_, cn, not_after) =
        parse_device_cert(&answer.certificate, &key).map_err(|m| AgentError::Protocol {
            connector: request.connector.url(),
            message: format!("the issued certificate is unusable: {m}"),
        })?;
    state.store_certificate(&answer.certificate, &answer.device_ca)?;
    let unit_id = if answer.unit_id.is_empty() {
        cn
    } else {
        answer.unit_id
    };
    state.config.unit_id = Some(unit_id.clone());
    if !state.config.connectors.contains(&request.connector) {
        state.config.connectors.push(request.connector.clone());
    }
    state.save()?;
    // Stored first: the session below authenticates the device by this credential from now on.
    let session = match continued {
        Some((ws, hello)) => Some(Session::new(ws, &request.connector, hello, options)?),
        None => None,
    };
    Ok(Registered {
        unit_id,
        connector: request.connector.clone(),
        certificate: answer.certificate,
        not_after,
        session,
    })
}

/// One registration attempt: the answer, and the connection with its session `hello` when
/// the gateway continued it as the session.
type RegisterAnswer = (
    crate::proto::device::Registered,
    Option<(WebSocket<TlsStream>, Hello)>,
);

fn register_once(
    connector: &Connector,
    config: Arc<ClientConfig>,
    register: &str,
    options: &AgentOptions,
) -> Result<RegisterAnswer, AgentError> {
    let mut ws = open(connector, config, options)?;
    let hello = read_hello(&mut ws, connector, options)?;
    if hello.mode != Mode::Register {
        return Err(AgentError::Protocol {
            connector: connector.url(),
            message: format!("expected a register-mode hello, got {:?}", hello.mode),
        });
    }
    ws.send(tungstenite::Message::text(register))
        .map_err(|e| ws_error(connector, e))?;
    let deadline = Instant::now() + options.handshake_timeout;
    loop {
        match read_incoming(&mut ws, connector)? {
            Incoming::Message(Message::Registered(r)) => {
                // A session `hello` follows when the gateway continues the connection;
                // anything else (a close, `refused` for the device limit) ends it here.
                let continued = loop {
                    match read_incoming(&mut ws, connector) {
                        Ok(Incoming::Message(Message::Hello(h))) if h.mode == Mode::Session => {
                            break Some((ws, h));
                        }
                        Ok(Incoming::Ignored | Incoming::Timeout) if Instant::now() < deadline => {}
                        _ => {
                            tracing::debug!(
                                "the gateway did not continue the registration connection"
                            );
                            close_quietly(&mut ws);
                            break None;
                        }
                    }
                };
                return Ok((r, continued));
            }
            Incoming::Message(Message::Refused(r)) => {
                close_quietly(&mut ws);
                return Err(AgentError::Refused(Refusal::from(r)));
            }
            Incoming::Message(other) => {
                return Err(AgentError::Protocol {
                    connector: connector.url(),
                    message: format!("unexpected message {}", other.to_json()),
                });
            }
            Incoming::Closed(frame) => return Err(closed_error(connector, frame, "the answer")),
            Incoming::Ignored | Incoming::Binary(_) => {}
            Incoming::Timeout if Instant::now() >= deadline => {
                return Err(AgentError::Connect {
                    connector: connector.url(),
                    message: "no answer to the registration".into(),
                });
            }
            Incoming::Timeout => {}
        }
    }
}

/// A device session: connected with the credential, greeted with a session `hello`.
///
/// With a [`Relay`] attached ([`Session::attach_relay`]), [`Session::poll`] serves the
/// relay's envelopes (`docs/protocol.md` §6): the socket is then non-blocking, and the poll
/// waits on it and on the relay's waker, so answers and stream data leave as soon as they
/// are ready.
pub struct Session {
    ws: WebSocket<TlsStream>,
    connector: Connector,
    hello: Hello,
    unit_id: String,
    poll_interval: Duration,
    relay: Option<Relay>,
    /// The socket is in non-blocking mode.
    nonblocking: bool,
    /// The last flush could not finish: wait for the socket to be writable, add no bulk.
    blocked: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("connector", &self.connector)
            .field("unit_id", &self.unit_id)
            .finish_non_exhaustive()
    }
}

/// Connects to `connector` with the device credential and waits for the session `hello`
/// (`docs/protocol.md` §5.4): that is "connection ready". A `refused` instead of the hello is
/// [`AgentError::Refused`]. The returned session's socket has a read timeout of
/// `options.poll_interval`, so [`Session::poll`] returns regularly.
pub fn connect_session(
    state: &AgentState,
    connector: &Connector,
    options: &AgentOptions,
) -> Result<Session, AgentError> {
    state.config.trust.ok_or(AgentError::NoTrust)?;
    let credential = state.credential()?.ok_or(AgentError::NotRegistered)?;
    let config = state.tls_config(Some(&credential))?;
    connect_session_with(connector, config, options)
}

/// [`connect_session`] with a prepared TLS configuration ([`tls::client_config`]).
pub fn connect_session_with(
    connector: &Connector,
    config: Arc<ClientConfig>,
    options: &AgentOptions,
) -> Result<Session, AgentError> {
    let mut ws = open(connector, config, options)?;
    let hello = read_hello(&mut ws, connector, options)?;
    if hello.mode != Mode::Session {
        close_quietly(&mut ws);
        return Err(AgentError::Protocol {
            connector: connector.url(),
            message: "the gateway greeted in register mode: it did not take the device \
                      certificate"
                .into(),
        });
    }
    Session::new(ws, connector, hello, options)
}

impl Session {
    /// A session on `ws`, which has just received the session `hello`.
    fn new(
        ws: WebSocket<TlsStream>,
        connector: &Connector,
        hello: Hello,
        options: &AgentOptions,
    ) -> Result<Session, AgentError> {
        tls::set_timeouts(ws.get_ref().get_ref(), options.poll_interval)
            .map_err(|e| io_error(connector, e))?;
        let unit_id = hello.unit_id.clone().unwrap_or_default();
        Ok(Session {
            ws,
            connector: connector.clone(),
            hello,
            unit_id,
            poll_interval: options.poll_interval,
            relay: None,
            nonblocking: false,
            blocked: false,
        })
    }

    /// The gateway this session is with.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The unit ID the gateway greeted with.
    pub fn unit_id(&self) -> &str {
        &self.unit_id
    }

    /// The gateway's `hello`.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Serves the relay (`docs/protocol.md` §6) in this session from now on.
    pub fn attach_relay(&mut self, relay: Relay) {
        self.relay = Some(relay);
    }

    /// The relay, if attached.
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    /// The next request the run loop must finish ([`RelayAction`]).
    pub fn take_action(&mut self) -> Option<RelayAction> {
        self.relay.as_mut()?.take_action()
    }

    /// Queues the answer to a request (sent by the next [`poll`](Self::poll) or
    /// [`flush_relay`](Self::flush_relay)).
    pub fn respond(&mut self, reply: Reply, body: &ResponseBody) {
        if let Some(r) = self.relay.as_mut() {
            r.respond(reply, body);
        }
    }

    /// Waits up to the poll interval for traffic (pings are answered on the way). `Ok(())`
    /// while the session lives; an error when it ended: [`AgentError::Refused`] when the
    /// gateway refused it (device removed, superseded, …), [`AgentError::Closed`] for a close
    /// frame, another error for a broken connection.
    ///
    /// With a relay attached, binary messages are handed to it and what it has to send is
    /// written (control before bulk).
    pub fn poll(&mut self) -> Result<(), AgentError> {
        if self.relay.is_none() {
            return match read_incoming(&mut self.ws, &self.connector)? {
                Incoming::Closed(frame) => Err(closed_error(&self.connector, frame, "")),
                Incoming::Message(m) => self.text(m),
                Incoming::Binary(_) | Incoming::Ignored | Incoming::Timeout => Ok(()),
            };
        }
        if !self.nonblocking {
            self.ws
                .get_ref()
                .get_ref()
                .set_nonblocking(true)
                .map_err(|e| io_error(&self.connector, e))?;
            self.nonblocking = true;
        }
        let more = self.pump()?;
        self.wait(if more {
            Duration::ZERO
        } else {
            self.poll_interval
        })?;
        if let Some(r) = &self.relay {
            r.drain_waker();
        }
        if !self.blocked {
            // A bounded batch, then the outbound side gets its turn.
            for _ in 0..256 {
                match read_incoming(&mut self.ws, &self.connector)? {
                    Incoming::Binary(b) => {
                        if let Some(r) = self.relay.as_mut() {
                            r.handle(&b);
                        }
                    }
                    Incoming::Message(m) => self.text(m)?,
                    Incoming::Closed(frame) => {
                        return Err(closed_error(&self.connector, frame, ""));
                    }
                    Incoming::Ignored => {}
                    Incoming::Timeout => break,
                }
            }
        }
        self.pump()?;
        Ok(())
    }

    fn text(&mut self, m: Message) -> Result<(), AgentError> {
        match m {
            Message::Refused(r) => {
                close_quietly(&mut self.ws);
                Err(AgentError::Refused(Refusal::from(r)))
            }
            other => {
                tracing::debug!(message = %other.to_json(), "ignoring a message in the session");
                Ok(())
            }
        }
    }

    /// Waits until the socket is readable (or writable while blocked), the relay's waker
    /// fires, or `timeout` passes.
    fn wait(&mut self, timeout: Duration) -> Result<(), AgentError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let sock = self.ws.get_ref().get_ref().as_fd();
        let interest = if self.blocked {
            PollFlags::POLLOUT
        } else {
            PollFlags::POLLIN
        };
        let mut fds = vec![PollFd::new(sock, interest)];
        if let Some(r) = &self.relay {
            fds.push(PollFd::new(r.waker(), PollFlags::POLLIN));
        }
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, t) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(io_error(&self.connector, e.into())),
        }
    }

    /// Writes what the relay has queued: control first, bulk only while the socket keeps up.
    /// True when more is waiting (the batch limit was reached).
    fn pump(&mut self) -> Result<bool, AgentError> {
        if self.blocked {
            match self.ws.flush() {
                Ok(()) => self.blocked = false,
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    return Ok(false);
                }
                Err(e) => return Err(ws_error(&self.connector, e)),
            }
        }
        let Some(relay) = self.relay.as_mut() else {
            return Ok(false);
        };
        let mut wrote = false;
        let mut more = false;
        let mut count = 0;
        loop {
            if count == 64 {
                more = true;
                break;
            }
            let Some(msg) = relay.next_control().or_else(|| relay.next_bulk()) else {
                break;
            };
            count += 1;
            wrote = true;
            match self.ws.write(tungstenite::Message::binary(msg)) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    // Kept in tungstenite's buffer; wait until the socket takes more.
                    self.blocked = true;
                    return Ok(false);
                }
                Err(e) => return Err(ws_error(&self.connector, e)),
            }
        }
        if wrote {
            match self.ws.flush() {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    self.blocked = true;
                }
                Err(e) => return Err(ws_error(&self.connector, e)),
            }
        }
        Ok(more)
    }

    /// Sends what the relay has queued (answers first), for up to `limit`: before closing
    /// the session after a `move`.
    pub fn flush_relay(&mut self, limit: Duration) -> Result<(), AgentError> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            self.pump()?;
            let idle = self.relay.as_ref().is_none_or(Relay::idle);
            if idle && !self.blocked {
                return Ok(());
            }
            self.wait(Duration::from_millis(20))?;
        }
        Ok(())
    }

    /// Closes the session (close code 1000), waiting briefly for the gateway's answer.
    pub fn close(mut self) {
        // The relay's streams end first (shells killed, sockets shut, temp files deleted).
        self.relay = None;
        if self.nonblocking {
            let sock = self.ws.get_ref().get_ref();
            let _ = sock.set_nonblocking(false);
            let _ = tls::set_timeouts(sock, Duration::from_millis(100));
        }
        let _ = self.ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "agent stopping".into(),
        }));
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        let stream = self.ws.get_mut();
        stream.conn.send_close_notify();
        let _ = stream.conn.complete_io(&mut stream.sock);
    }
}

/// TCP + TLS + WebSocket upgrade on the connector's path.
fn open(
    connector: &Connector,
    config: Arc<ClientConfig>,
    options: &AgentOptions,
) -> Result<WebSocket<TlsStream>, AgentError> {
    let stream = tls::connect_tls(connector, config, options)?;
    match tungstenite::client::client(connector.url().as_str(), stream) {
        Ok((ws, _response)) => Ok(ws),
        Err(HandshakeError::Interrupted(_)) => Err(AgentError::Connect {
            connector: connector.url(),
            message: "timed out in the WebSocket upgrade".into(),
        }),
        Err(HandshakeError::Failure(e)) => Err(ws_error(connector, e)),
    }
}

fn read_hello(
    ws: &mut WebSocket<TlsStream>,
    connector: &Connector,
    options: &AgentOptions,
) -> Result<Hello, AgentError> {
    let deadline = Instant::now() + options.handshake_timeout;
    loop {
        match read_incoming(ws, connector)? {
            Incoming::Message(Message::Hello(h)) => return Ok(h),
            Incoming::Message(Message::Refused(r)) => {
                close_quietly(ws);
                return Err(AgentError::Refused(Refusal::from(r)));
            }
            Incoming::Message(other) => {
                return Err(AgentError::Protocol {
                    connector: connector.url(),
                    message: format!("expected hello, got {}", other.to_json()),
                });
            }
            Incoming::Closed(frame) => return Err(closed_error(connector, frame, "hello")),
            Incoming::Ignored | Incoming::Binary(_) => {}
            Incoming::Timeout if Instant::now() >= deadline => {
                return Err(AgentError::Connect {
                    connector: connector.url(),
                    message: "no hello from the gateway".into(),
                });
            }
            Incoming::Timeout => {}
        }
    }
}

enum Incoming {
    Message(Message),
    /// A binary message: a relay envelope.
    Binary(tungstenite::Bytes),
    Closed(Option<CloseFrame>),
    /// Control frames, unknown message types.
    Ignored,
    Timeout,
}

fn read_incoming(
    ws: &mut WebSocket<TlsStream>,
    connector: &Connector,
) -> Result<Incoming, AgentError> {
    match ws.read() {
        Ok(tungstenite::Message::Text(t)) => match Message::from_json(t.as_bytes()) {
            Ok(m) => Ok(Incoming::Message(m)),
            Err(e) => {
                tracing::debug!(text = %t.as_str(), "ignoring an unreadable message: {e}");
                Ok(Incoming::Ignored)
            }
        },
        Ok(tungstenite::Message::Binary(b)) => Ok(Incoming::Binary(b)),
        Ok(tungstenite::Message::Close(frame)) => {
            // tungstenite queued the answering close; send it.
            let _ = ws.flush();
            Ok(Incoming::Closed(frame))
        }
        Ok(_) => Ok(Incoming::Ignored),
        Err(tungstenite::Error::Io(e))
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
        {
            Ok(Incoming::Timeout)
        }
        Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
            Ok(Incoming::Closed(None))
        }
        Err(e) => Err(ws_error(connector, e)),
    }
}

fn close_quietly(ws: &mut WebSocket<TlsStream>) {
    let _ = ws.close(None);
    let _ = ws.flush();
}

fn closed_error(connector: &Connector, frame: Option<CloseFrame>, waiting_for: &str) -> AgentError {
    let (code, reason) = match frame {
        Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
        None => (None, String::new()),
    };
    AgentError::Closed {
        connector: connector.url(),
        code,
        reason: if waiting_for.is_empty() {
            reason
        } else if reason.is_empty() {
            format!("before {waiting_for}")
        } else {
            format!("{reason} (before {waiting_for})")
        },
    }
}

fn ws_error(connector: &Connector, e: tungstenite::Error) -> AgentError {
    match e {
        tungstenite::Error::Io(e) => io_error(connector, e),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            AgentError::Closed {
                connector: connector.url(),
                code: None,
                reason: String::new(),
            }
        }
        tungstenite::Error::Http(resp) => AgentError::Protocol {
            connector: connector.url(),
            message: format!("the WebSocket upgrade was refused: HTTP {}", resp.status()),
        },
        other => AgentError::Protocol {
            connector: connector.url(),
            message: other.to_string(),
        },
    }
}

/// The credential check the agent makes before connecting: not expired.
pub(crate) fn check_expiry(credential: &Credential) -> Result<(), AgentError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if credential.not_after <= now {
        let when = crate::pki::cert::format_time(credential.not_after);
        return Err(AgentError::Refused(Refusal {
            reason: "credential_expired".into(),
            message: format!("the device credential expired on {when}; register again"),
            retry_after: None,
            drop_settings: false,
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::FromDer as _;

    use super::*;

    #[test]
    fn the_csr_is_signed_by_the_device_key() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = make_csr(&key, "kiosk-17").unwrap();
        let (rest, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        assert!(rest.is_empty());
        csr.verify_signature().expect("the CSR signature verifies");
        assert_eq!(
            csr.certification_request_info.subject_pki.raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        let cn = csr
            .certification_request_info
            .subject
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "kiosk-17");
        // Base64 as sent in `register` decodes back.
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
            der
        );
        // Tampering breaks the signature.
        let mut bad = der.clone();
        let n = bad.len();
        bad[n - 5] ^= 1;
        if let Ok((_, c)) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&bad)
        {
            assert!(c.verify_signature().is_err());
        }
    }

    #[test]
    fn refusals_that_stop() {
        let r = |reason: &str, drop_settings| Refusal {
            reason: reason.into(),
            message: "m".into(),
            retry_after: None,
            drop_settings,
        };
        for code in [
            "credential_revoked",
            "credential_superseded",
            "credential_unknown",
            "credential_expired",
        ] {
            assert!(r(code, false).stops_agent(), "{code}");
        }
        for code in [
            "limit_reached",
            "internal_error",
            "rate_limited",
            "whatever",
        ] {
            assert!(!r(code, false).stops_agent(), "{code}");
        }
        assert!(r("whatever", true).stops_agent());
        let e = AgentError::Refused(Refusal {
            retry_after: Some(Duration::from_millis(1500)),
            ..r("limit_reached", false)
        });
        assert_eq!(
            e.to_string(),
            "the gateway refused: m (limit_reached); retry after 1500 ms"
        );
    }
}
