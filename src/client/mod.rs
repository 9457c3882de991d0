//! The management client library: a management server's side of `docs/protocol.md` §6.
//!
//! [`ManagementClient::connect`] dials the gateway's `/usg/management` endpoint — TCP, or an
//! HTTP proxy tunnel (`CONNECT`, optional Basic auth) — does TLS with the management client
//! certificate `fleetgate mgmt add` wrote, upgrades to WebSocket and reads the gateway's
//! `hello`. From then on one **I/O thread** owns the socket; callers on any thread talk to it
//! through channels:
//!
//! * [`ManagementClient::request`]: a request to a device (by unit ID) or to the gateway
//!   itself (`unit = None`), answered by its result or a [`ClientError`] carrying the §6.8
//!   error code ([`ClientError::code`]). Requests are correlated by request id, so any number
//!   may be pending at once from any number of threads.
//! * [`ManagementClient::events`]: a channel of [`Event`]s (`device_up`, `device_down`,
//!   `device_registered`, `device_removed`, and device events).
//! * [`ManagementClient::open_stream`]: a flow-controlled stream (§6.6) as a
//!   [`StreamHandle`] (split into a [`StreamReader`] and a [`StreamWriter`] for two threads);
//!   [`ManagementClient::push_file`] sends a file over a `file` stream.
//!
//! # Flow control and priority
//!
//! Each stream grants the device [`ClientOptions::window`] bytes (default 256 KiB) at `open`
//! and more credit whenever half of it has been consumed by the reader. Writes block while
//! the device's credit is used up, so at most one window of a stream's data is ever in flight
//! or queued here. The I/O thread keeps two queues — control (everything but data) and bulk
//! (data) — and writes control first; at most one bulk message (≤ 16 KiB + header) is ahead of
//! a control message on the wire.
//!
//! # Device failures
//!
//! A request to a device that is not connected is answered by the gateway with
//! `device_offline`. When a `device_down` event arrives, the client fails that unit's pending
//! requests and streams at once ([`ClientError::DeviceDown`]). Requests also time out on their
//! own (the caller's timeout; [`DEFAULT_TIMEOUT`] is 30 s).

#![forbid(unsafe_code)]

mod connect;
mod io;
mod stream;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest as _, Sha256};

pub use connect::{GatewayUrl, Hello};
pub use stream::{StreamHandle, StreamReader, StreamWriter};

use crate::proto::envelope::{DEFAULT_WINDOW, Header, Kind};
use io::{Cmd, Link};

/// The default request timeout (30 s, `docs/protocol.md` §6.3).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of the data pieces the client sends (16 KiB, §6.2).
pub const CHUNK: usize = 16 * 1024;

/// How to reach the gateway and who we are.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `wss://host:port[/path]` (path `/usg/management` by default; a bare `host:port`
    /// works too; port 8443 by default).
    pub url: String,
    /// The management client certificate (PEM, from `fleetgate mgmt add`).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The root certificate(s) to trust for the gateway (PEM; `gateway-root.pem` from
    /// `fleetgate mgmt add`). `None`: the system roots.
    pub ca: Option<PathBuf>,
    /// An HTTP proxy to tunnel through with `CONNECT`.
    pub proxy: Option<ProxyConfig>,
    /// Connect timeout (TCP, proxy, TLS, upgrade and hello). Default 10 s.
    pub connect_timeout: Duration,
    /// The window (receive credit) each stream grants the device. Default 256 KiB.
    pub window: u32,
}

impl ClientOptions {
    /// Options with the defaults for everything but the URL and the credential.
    pub fn new(url: impl Into<String>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        ClientOptions {
            url: url.into(),
            cert: cert.into(),
            key: key.into(),
            ca: None,
            proxy: None,
            connect_timeout: Duration::from_secs(10),
            window: DEFAULT_WINDOW,
        }
    }
}

/// An HTTP proxy: `http://host:port` (port 3128 by default), with optional Basic
/// authentication — from `username`/`password`, or from `http://user:pass@host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The proxy URL.
    pub url: String,
    /// Basic auth user (overrides one in the URL).
    pub username: Option<String>,
    /// Basic auth password.
    pub password: Option<String>,
}

/// Something went wrong. [`ClientError::code`] gives the protocol's error code when there is
/// one.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway or proxy URL does not parse.
    #[error("invalid URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A certificate, key or local file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// TCP connect (or I/O before TLS) failed.
    #[error("cannot connect to {what}: {source}")]
    Connect {
        /// The peer (`host:port` or `proxy host:port`).
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The proxy wants (other) credentials: `407 Proxy Authentication Required` (some
    /// proxies, tinyproxy among them, answer `CONNECT` with `401` instead).
    #[error(
        "proxy {proxy} refused the tunnel: {status} {} ({})",
        if *status == 407 { "Proxy Authentication Required" } else { "Unauthorized" },
        if *sent_credentials { "wrong user name or password" } else { "the proxy needs a user name and password" }
    )]
    ProxyAuth {
        /// The proxy.
        proxy: String,
        /// 407 (or 401).
        status: u16,
        /// Whether we sent credentials (then they were wrong).
        sent_credentials: bool,
    },
    /// The proxy refused `CONNECT` with another status.
    #[error("proxy {proxy} refused CONNECT {target}: {status} {reason}")]
    Proxy {
        /// The proxy.
        proxy: String,
        /// The gateway we asked for.
        target: String,
        /// The HTTP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// The TLS handshake failed (untrusted gateway certificate, client certificate refused…).
    #[error("TLS with {host} failed: {message}")]
    Tls {
        /// The gateway.
        host: String,
        /// rustls's explanation.
        message: String,
    },
    /// The gateway answered the WebSocket upgrade with an HTTP error.
    #[error("the gateway refused the WebSocket upgrade with HTTP {status}{hint}")]
    Upgrade {
        /// The HTTP status (403: our certificate is not accepted).
        status: u16,
        /// An explanation.
        hint: String,
    },
    /// A WebSocket-level failure.
    #[error("WebSocket: {0}")]
    WebSocket(String),
    /// The gateway broke the protocol (bad hello, malformed envelope).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The gateway or the device answered with an error (`code` is one of §6.8, or a code
    /// this client does not know, shown as it is).
    #[error("{code}: {message}")]
    Remote {
        /// The stable error code (`device_offline`, `busy`, `unknown_method`, …).
        code: String,
        /// A sentence for people.
        message: String,
    },
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The device went down (`device_down` event) while the request or stream was pending.
    #[error("device {0} went offline (device_down)")]
    DeviceDown(String),
    /// The connection to the gateway is closed.
    #[error("connection to the gateway closed: {0}")]
    Closed(String),
    /// A local I/O error (reading a file to push, …).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl ClientError {
    /// The protocol error code: the remote `code`, `device_offline` for
    /// [`DeviceDown`](ClientError::DeviceDown), `link_closed` for
    /// [`Closed`](ClientError::Closed); `None` for local failures.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Remote { code, .. } => Some(code),
            ClientError::DeviceDown(_) => Some("device_offline"),
            ClientError::Closed(_) => Some("link_closed"),
            _ => None,
        }
    }

    fn remote(e: crate::proto::envelope::ErrorBody) -> ClientError {
        ClientError::Remote {
            code: e.code,
            message: e.message,
        }
    }
}

/// What kind of event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A device connected (`address` in the body).
    DeviceUp,
    /// A device disconnected.
    DeviceDown,
    /// A device registered.
    DeviceRegistered,
    /// A device was removed.
    DeviceRemoved,
    /// Any other event name (events a device sends, future gateway events).
    Other(String),
}

impl EventKind {
    fn parse(name: &str) -> EventKind {
        match name {
            "device_up" => EventKind::DeviceUp,
            "device_down" => EventKind::DeviceDown,
            "device_registered" => EventKind::DeviceRegistered,
            "device_removed" => EventKind::DeviceRemoved,
            other => EventKind::Other(other.to_owned()),
        }
    }

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::DeviceUp => "device_up",
            EventKind::DeviceDown => "device_down",
            EventKind::DeviceRegistered => "device_registered",
            EventKind::DeviceRemoved => "device_removed",
            EventKind::Other(s) => s,
        }
    }
}

/// An event from the gateway or a device (§6.5).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The device (empty for the gateway's own events).
    pub unit: String,
    /// The whole event body (`{"event": …, …}`).
    pub body: Value,
}

/// What [`ManagementClient::push_file`] achieved.
#[derive(Debug, Clone, PartialEq)]
pub struct PushResult {
    /// Bytes sent.
    pub size: u64,
    /// SHA-256 of the bytes sent (64 lower-case hex digits).
    pub sha256: String,
    /// The device's `close` body (`{"ok": true, "size", "sha256"}`).
    pub remote: Value,
}

/// A connection to a gateway's management endpoint. Cheap to share between threads
/// (`&ManagementClient` is `Sync`); dropping it closes the connection.
#[derive(Debug)]
pub struct ManagementClient {
    link: Arc<Link>,
    hello: Hello,
    url: GatewayUrl,
    window: u32,
    io: Option<JoinHandle<()>>,
}

impl ManagementClient {
    /// Connects, authenticates and reads the gateway's hello; starts the I/O thread.
    pub fn connect(options: ClientOptions) -> Result<ManagementClient, ClientError> {
        let (ws, hello, url) = connect::establish(&options)?;
        let (link, io) = io::start(ws, url.authority())?;
        Ok(ManagementClient {
            link,
            hello,
            url,
            window: options.window.max(1024),
            io: Some(io),
        })
    }

    /// The gateway's hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The gateway's URL.
    pub fn url(&self) -> &GatewayUrl {
        &self.url
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        !self.link.is_closed()
    }

    /// Sends a request to device `unit` (or to the gateway, `None`) and waits up to `timeout`
    /// for its answer: the `result` on success, else [`ClientError::Remote`] with the code
    /// (`device_offline`, `busy`, `unknown_method`, …), [`ClientError::DeviceDown`],
    /// [`ClientError::Timeout`] or [`ClientError::Closed`].
    pub fn request(
        &self,
        unit: Option<&str>,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let unit = unit.unwrap_or("");
        check_unit(unit)?;
        let id = self.link.next_id();
        let body = serde_json::to_vec(&serde_json::json!({"method": method, "params": params}))
            .expect("JSON values serialize");
        let frame = envelope(Kind::Request, id, unit, &body);
        let (tx, rx) = channel();
        self.link.send(Cmd::Request {
            id,
            unit: unit.to_owned(),
            frame,
            reply: tx,
        })?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = self.link.send(Cmd::Cancel { id });
                Err(ClientError::Timeout(timeout))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(ClientError::Closed(self.link.close_reason()))
            }
        }
    }

    /// A new channel that receives every event from now on (each call makes its own
    /// subscription). The channel ends when the connection closes.
    pub fn events(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        let _ = self.link.send(Cmd::Subscribe(tx));
        rx
    }

    /// Opens a stream of `kind` (`file`, `terminal`, `shadow`) to device `unit`; `params` (a
    /// JSON object) are merged into the `open` body next to `kind` and `window`. Waits up to
    /// `timeout` for the device's `accept`; a `reset` is returned as
    /// [`ClientError::Remote`].
    pub fn open_stream(
        &self,
        unit: &str,
        kind: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<StreamHandle, ClientError> {
        check_unit(unit)?;
        if unit.is_empty() {
            return Err(ClientError::Protocol(
                "a stream needs a device unit ID".into(),
            ));
        }
        let mut body = match params {
            Value::Object(m) => m,
            Value::Null => serde_json::Map::new(),
            other => {
                return Err(ClientError::Protocol(format!(
                    "stream parameters must be a JSON object, not {other}"
                )));
            }
        };
        body.insert("kind".into(), Value::from(kind));
        body.insert("window".into(), Value::from(self.window));
        let id = self.link.next_id();
        let frame = envelope(
            Kind::Open,
            id,
            unit,
            &serde_json::to_vec(&Value::Object(body)).expect("JSON values serialize"),
        );
        let (handle, accept_rx) = stream::open(self.link.clone(), id, unit, self.window, frame)?;
        match accept_rx.recv_timeout(timeout) {
            Ok(Ok(accept)) => {
                let mut h = handle;
                h.accept = accept;
                Ok(h)
            }
            Ok(Err(e)) => Err(e),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                handle.reset("timeout", "no accept in time");
                Err(ClientError::Timeout(timeout))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(ClientError::Closed(self.link.close_reason()))
            }
        }
    }

    /// Pushes the file `local` to device `unit` as `dest` (a name relative to the device's
    /// receive directory, §6.6 `file`). Two passes over the file: SHA-256 and size first, then
    /// the bytes in 16 KiB pieces as the device grants credit (the file is never read whole
    /// into memory). `progress(sent, total)` is called after every piece. Returns when the
    /// device confirmed (its `close`); a `reset` (`checksum_mismatch`, `io_error`,
    /// `not_allowed`) is an error.
    pub fn push_file(
        &self,
        unit: &str,
        local: &std::path::Path,
        dest: &str,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<PushResult, ClientError> {
        use std::io::Read as _;
        let io_err = |context: String| move |source| ClientError::Io { context, source };
        let open = || {
            std::fs::File::open(local).map_err(io_err(format!("cannot open {}", local.display())))
        };
        let mut file = open()?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(io_err(format!("cannot read {}", local.display())))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let sha256 = hex(&hasher.finalize());
        let stream = self.open_stream(
            unit,
            "file",
            serde_json::json!({"path": dest, "size": size, "sha256": sha256}),
            DEFAULT_TIMEOUT,
        )?;
        let (mut reader, mut writer) = stream.split();
        let mut file = open()?;
        let mut sent = 0u64;
        progress(0, size);
        while sent < size {
            let want = CHUNK.min((size - sent) as usize);
            let n = file
                .read(&mut buf[..want])
                .map_err(io_err(format!("cannot read {}", local.display())))?;
            if n == 0 {
                writer.reset("io_error", "the file shrank while it was sent");
                return Err(ClientError::Io {
                    context: format!("{} shrank while it was sent", local.display()),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            if let Err(e) = writer.write_all(&buf[..n]) {
                // The device may have said why (reset) before we noticed.
                return Err(reader.take_error().unwrap_or(e));
            }
            sent += n as u64;
            progress(sent, size);
        }
        writer.close(serde_json::json!({"ok": true}))?;
        let remote = reader.wait_close(DEFAULT_TIMEOUT)?;
        Ok(PushResult {
            size,
            sha256,
            remote,
        })
    }

    /// Closes the connection (WebSocket close 1000) and waits for the I/O thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.link.send(Cmd::Shutdown);
        if let Some(t) = self.io.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ManagementClient {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn check_unit(unit: &str) -> Result<(), ClientError> {
    if unit.len() > crate::proto::envelope::MAX_UNIT_LEN {
        return Err(ClientError::Protocol(format!(
            "unit ID {unit:?} is longer than {} bytes",
            crate::proto::envelope::MAX_UNIT_LEN
        )));
    }
    Ok(())
}

/// One envelope as bytes.
pub(crate) fn envelope(kind: Kind, channel: u32, unit: &str, body: &[u8]) -> Vec<u8> {
    let h = Header {
        kind,
        channel,
        route: 0,
        unit,
    };
    let mut out = Vec::with_capacity(h.len() + body.len());
    crate::proto::envelope::write(&mut out, &h, body);
    out
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Request and stream ids: one counter for both, never 0.
#[derive(Debug, Default)]
pub(crate) struct Ids(AtomicU32);

impl Ids {
    pub(crate) fn next(&self) -> u32 {
        loop {
            let id = self.0.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if id != 0 {
                return id;
            }
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<ManagementClient>();
    is::<Sender<Cmd>>();
}
