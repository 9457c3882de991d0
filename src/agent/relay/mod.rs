//! The agent's side of the relay (`docs/protocol.md` §6): envelopes in a device session.
//!
//! The session thread ([`Session::poll`](super::Session::poll)) hands every binary message
//! to [`Relay::handle`] and writes what [`Relay::next_control`] and then
//! [`Relay::next_bulk`] return: control (responses, accepts, credits, closes of streams
//! without data, resets) always before bulk (stream data), so requests are answered while a
//! file is being written or a terminal streams output. Everything sent echoes the `route` and
//! `channel` of the request or stream it answers; the unit field is empty.
//!
//! * Requests (§6.4): `ping` and `info` are answered at once; `exec` (the operator's hook,
//!   [`exec`]) and `move` ([`moving`]) run on worker threads; `root.offer` and the final step
//!   of `move` change the state directory and are handed to the run loop as
//!   [`RelayAction`]s. Anything else is `unknown_method`.
//! * Streams (§6.6): `file` ([`file`]), `terminal` ([`terminal`]) and `shadow` ([`shadow`])
//!   run on their own threads and talk to the session thread through bounded channels, with
//!   credit flow control both ways (window [`DEFAULT_WINDOW`], credit granted when half of it
//!   is consumed). A stream message for an unknown `(route, channel)` is answered with
//!   `reset` `link_closed`. Dropping the [`Relay`] (the session ended) ends every stream:
//!   shells are killed, sockets shut down, temporary files deleted.

pub mod exec;
pub mod file;
mod flow;
pub mod moving;
pub mod shadow;
pub mod terminal;

use std::collections::{HashMap, VecDeque};
use std::io::Read as _;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde::Deserialize;
use serde_json::json;

use super::AgentOptions;
use super::state::{AgentState, DEFAULT_SHELL};
use crate::proto::envelope::{
    self, DEFAULT_WINDOW, ErrorBody, Header, Kind, MANAGEMENT_DOWN, RequestBody, ResponseBody,
};
pub use flow::DATA_PIECE;
use flow::{Deliver, Lanes, OutMsg, Outbound, StreamEntry};
pub use moving::{MovePlan, apply_move};

/// What the relay may do on this device (from `agent.toml`, [`RelayConfig::from_state`]).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The unit ID (for `info`).
    pub unit_id: String,
    /// File pushes are written here (created when missing, 0700).
    pub receive_dir: PathBuf,
    /// The executable `exec` runs; `None` = `exec` is refused (`not_allowed`).
    pub exec_hook: Option<PathBuf>,
    /// Time limit of one `exec`.
    pub exec_timeout: Duration,
    /// The shell of terminal streams.
    pub shell: PathBuf,
    /// Shadow streams connect to 127.0.0.1 on this port.
    pub vnc_port: u16,
    /// The receive window this agent grants per stream (default 256 KiB).
    pub window: u32,
    /// Streams open at once (more are refused with `stream_refused`; default 64).
    pub max_streams: usize,
    /// `exec` requests running at once (more are answered `busy`; default 4).
    pub max_exec: usize,
}

impl RelayConfig {
    /// The settings of `state` (`agent.toml`) for a session as `unit_id`.
    pub fn from_state(state: &AgentState, unit_id: &str) -> RelayConfig {
        let c = &state.config;
        RelayConfig {
            unit_id: unit_id.to_owned(),
            receive_dir: state.receive_dir(),
            exec_hook: c.exec_hook.clone(),
            exec_timeout: Duration::from_secs(c.exec_timeout_secs.max(1)),
            shell: c.shell.clone().unwrap_or_else(|| DEFAULT_SHELL.into()),
            vnc_port: c.vnc_port,
            window: DEFAULT_WINDOW,
            max_streams: 64,
            max_exec: 4,
        }
    }
}

/// Where to send the answer to a request: its `route` and `channel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The gateway's routing tag of the request.
    pub route: u64,
    /// The request id.
    pub channel: u32,
}

/// A request the run loop finishes, because it changes the agent's state; answer it with
/// [`Session::respond`](super::Session::respond).
#[derive(Debug)]
pub enum RelayAction {
    /// `root.offer`: add `root` to the trusted roots ([`AgentState::add_root`]), answer
    /// `{"accepted": true}`.
    RootOffer {
        /// Where the answer goes.
        reply: Reply,
        /// The offered root.
        root: CertificateDer<'static>,
    },
    /// `move`: the new gateway accepted this device; switch to it ([`apply_move`]), answer
    /// `{"moved": true}` and reconnect there.
    Move {
        /// Where the answer goes.
        reply: Reply,
        /// What was proven to work.
        plan: MovePlan,
    },
}

/// The relay of one device session. Not `Sync`; lives on the session thread.
pub struct Relay {
    config: Arc<RelayConfig>,
    state: AgentState,
    options: AgentOptions,
    out: Outbound,
    lanes: Lanes,
    /// Envelopes from the session thread itself (answers), sent before the lanes.
    local: VecDeque<Vec<u8>>,
    streams: HashMap<(u64, u32), StreamEntry>,
    actions_tx: Sender<RelayAction>,
    actions_rx: Receiver<RelayAction>,
    exec_running: Arc<AtomicUsize>,
    moving: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay with `config`; `state` and `options` are what `move` connects with.
    pub fn new(
        config: RelayConfig,
        state: AgentState,
        options: AgentOptions,
    ) -> std::io::Result<Relay> {
        let (out, lanes) = flow::lanes()?;
        let (actions_tx, actions_rx) = std::sync::mpsc::channel();
        Ok(Relay {
            config: Arc::new(config),
            state,
            options,
            out,
            lanes,
            local: VecDeque::new(),
            streams: HashMap::new(),
            actions_tx,
            actions_rx,
            exec_running: Arc::new(AtomicUsize::new(0)),
            moving: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The waker: readable when a stream or worker thread queued something.
    pub fn waker(&self) -> BorrowedFd<'_> {
        self.lanes.waker.as_fd()
    }

    /// Empties the waker (call after it polled readable).
    pub fn drain_waker(&self) {
        let mut buf = [0u8; 256];
        while matches!((&self.lanes.waker).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Open streams.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The next finished request for the run loop.
    pub fn take_action(&mut self) -> Option<RelayAction> {
        self.actions_rx.try_recv().ok()
    }

    /// Queues a response (control lane).
    pub fn respond(&mut self, reply: Reply, body: &ResponseBody) {
        self.push_local(Kind::Response, reply.route, reply.channel, &body.to_vec());
    }

    fn push_local(&mut self, kind: Kind, route: u64, channel: u32, body: &[u8]) {
        self.local.push_back(encode(kind, route, channel, body));
    }

    fn reset(&mut self, route: u64, channel: u32, code: &str, message: &str) {
        let body = json!({ "error": ErrorBody { code: code.into(), message: message.into() } });
        self.push_local(Kind::Reset, route, channel, body.to_string().as_bytes());
    }

    /// True when nothing is queued for sending.
    pub fn idle(&self) -> bool {
        self.local.is_empty()
    }

    /// The next control envelope to send (answers, accepts, credits, resets, and closes).
    pub fn next_control(&mut self) -> Option<Vec<u8>> {
        if let Some(m) = self.local.pop_front() {
            return Some(m);
        }
        loop {
            let m = match self.lanes.control.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return None,
            };
            if let Some(bytes) = self.outgoing(m) {
                return Some(bytes);
            }
        }
    }

    /// The next bulk envelope to send (stream data, and a stream's `close` after its data).
    pub fn next_bulk(&mut self) -> Option<Vec<u8>> {
        loop {
            let m = match self.lanes.bulk.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return None,
            };
            if let Some(bytes) = self.outgoing(m) {
                return Some(bytes);
            }
        }
    }

    /// Bookkeeping of a message leaving: stream messages of streams that are over are
    /// dropped; a `close` or `reset` ends our side.
    fn outgoing(&mut self, m: OutMsg) -> Option<Vec<u8>> {
        let key = (m.route, m.channel);
        if m.kind.is_stream() {
            let entry = self.streams.get_mut(&key)?;
            if entry.local_closed {
                return None;
            }
            match m.kind {
                Kind::Reset => {
                    self.streams.remove(&key);
                }
                Kind::Close => {
                    entry.local_closed = true;
                    if entry.remote_closed {
                        self.streams.remove(&key);
                    }
                }
                _ => {}
            }
        }
        Some(encode(m.kind, m.route, m.channel, &m.body))
    }

    /// Serves one binary message from the gateway.
    pub fn handle(&mut self, msg: &[u8]) {
        let (header, n) = match Header::parse(msg) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("ignoring an unreadable envelope: {e}");
                return;
            }
        };
        let body = &msg[n..];
        let (route, channel) = (header.route, header.channel);
        let key = (route, channel);
        match header.kind {
            Kind::Request => self.request(Reply { route, channel }, body),
            Kind::Event if is_management_down(body) => {
                // The management connection behind `route` is gone (§6.5): its streams end
                // here (shells killed, sockets shut, partial files deleted), unanswered.
                let before = self.streams.len();
                self.streams.retain(|(r, _), _| *r != route);
                tracing::info!(
                    route = format_args!("{route:#x}"),
                    streams = before - self.streams.len(),
                    "management connection gone: its streams ended"
                );
            }
            Kind::Response | Kind::Event => {
                tracing::debug!(kind = ?header.kind, "ignoring a {:?} from the gateway", header.kind);
            }
            Kind::Open => self.open(route, channel, body),
            Kind::Reset => {
                // Never answered; the stream (if any) ends.
                self.streams.remove(&key);
            }
            kind => {
                let Some(entry) = self.streams.get_mut(&key) else {
                    self.reset(
                        route,
                        channel,
                        "link_closed",
                        "no such stream on this device",
                    );
                    return;
                };
                let delivered = match kind {
                    Kind::Data => entry.data(body),
                    Kind::Credit => match envelope::parse_credit(body) {
                        Ok(n) => {
                            entry.credit(n);
                            Deliver::Ok
                        }
                        Err(_) => {
                            self.streams.remove(&key);
                            self.reset(
                                route,
                                channel,
                                "bad_request",
                                "credit body must be 4 bytes",
                            );
                            return;
                        }
                    },
                    Kind::Close => {
                        let d = entry.close();
                        if entry.local_closed {
                            self.streams.remove(&key);
                        }
                        d
                    }
                    _ => {
                        // `accept`: this agent opens no streams.
                        self.streams.remove(&key);
                        self.reset(route, channel, "bad_request", "unexpected accept");
                        return;
                    }
                };
                if delivered == Deliver::Overrun {
                    self.streams.remove(&key);
                    self.reset(
                        route,
                        channel,
                        "bad_request",
                        "more data than the credit granted",
                    );
                }
            }
        }
    }

    fn request(&mut self, reply: Reply, body: &[u8]) {
        let req: RequestBody = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                self.respond(
                    reply,
                    &ResponseBody::err("bad_request", format!("bad request: {e}")),
                );
                return;
            }
        };
        let answer = match req.method.as_str() {
            "ping" => ResponseBody::ok(json!({ "pong": true, "time": unix_now() })),
            "info" => ResponseBody::ok(info(&self.config.unit_id)),
            "exec" => match self.exec(reply, &req.params) {
                Some(a) => a,
                None => return,
            },
            "move" => match self.start_move(reply, &req.params) {
                Some(a) => a,
                None => return,
            },
            "terminal.resize" => self.resize(reply, &req.params),
            "root.offer" => match parse_root_offer(&req.params) {
                Ok(root) => {
                    let _ = self.actions_tx.send(RelayAction::RootOffer { reply, root });
                    return;
                }
                Err(e) => ResponseBody::err("bad_request", e),
            },
            other => ResponseBody::err(
                "unknown_method",
                format!("this agent has no method {other:?}"),
            ),
        };
        self.respond(reply, &answer);
    }

    /// `terminal.resize {"channel", "cols", "rows"}`: the stream `channel` of the asking
    /// management connection gets a new size (a terminal applies it; other kinds ignore it).
    fn resize(&mut self, reply: Reply, params: &serde_json::Value) -> ResponseBody {
        #[derive(serde::Deserialize)]
        struct Resize {
            channel: u32,
            cols: u16,
            rows: u16,
        }
        let p = match serde_json::from_value::<Resize>(params.clone()) {
            Ok(p) if p.cols > 0 && p.rows > 0 => p,
            Ok(_) => {
                return ResponseBody::err(
                    "bad_request",
                    "terminal.resize: cols and rows must be > 0",
                );
            }
            Err(e) => return ResponseBody::err("bad_request", format!("terminal.resize: {e}")),
        };
        match self.streams.get_mut(&(reply.route, p.channel)) {
            Some(s) => {
                let _ = s.resize(p.cols, p.rows);
                ResponseBody::ok(json!({ "cols": p.cols, "rows": p.rows }))
            }
            None => ResponseBody::err(
                "bad_request",
                format!(
                    "terminal.resize: no stream {} of this connection",
                    p.channel
                ),
            ),
        }
    }

    /// Starts an `exec` on a worker; `Some` = the answer now (refused).
    fn exec(&mut self, reply: Reply, params: &serde_json::Value) -> Option<ResponseBody> {
        let Some(hook) = self.config.exec_hook.clone() else {
            return Some(ResponseBody::err(
                "not_allowed",
                "exec is disabled on this device (no exec_hook configured)",
            ));
        };
        let params: exec::ExecParams = match serde_json::from_value(params.clone()) {
            Ok(p) => p,
            Err(e) => return Some(ResponseBody::err("bad_request", format!("exec: {e}"))),
        };
        if params.command.is_empty() || params.command.contains('\0') {
            return Some(ResponseBody::err(
                "bad_request",
                "exec: empty or invalid command",
            ));
        }
        let running = self.exec_running.clone();
        if running.fetch_add(1, Ordering::SeqCst) >= self.config.max_exec {
            running.fetch_sub(1, Ordering::SeqCst);
            return Some(ResponseBody::err("busy", "too many commands running"));
        }
        let out = self.out.clone();
        let timeout = self.config.exec_timeout;
        let spawned = std::thread::Builder::new()
            .name("agent-exec".into())
            .spawn(move || {
                let answer = exec::run_hook(&hook, &params, timeout);
                running.fetch_sub(1, Ordering::SeqCst);
                out.control(OutMsg {
                    kind: Kind::Response,
                    route: reply.route,
                    channel: reply.channel,
                    body: answer.to_vec(),
                });
            });
        match spawned {
            Ok(_) => None,
            Err(e) => {
                self.exec_running.fetch_sub(1, Ordering::SeqCst);
                Some(ResponseBody::err("internal_error", format!("exec: {e}")))
            }
        }
    }

    /// Starts a `move` on a worker; `Some` = the answer now (refused).
    fn start_move(&mut self, reply: Reply, params: &serde_json::Value) -> Option<ResponseBody> {
        let params = match moving::MoveParams::parse(params) {
            Ok(p) => p,
            Err(e) => return Some(ResponseBody::err("bad_request", e)),
        };
        if self.moving.fetch_add(1, Ordering::SeqCst) > 0 {
            self.moving.fetch_sub(1, Ordering::SeqCst);
            return Some(ResponseBody::err("busy", "a move is already in progress"));
        }
        let (state, options, out, actions, moving) = (
            self.state.clone(),
            self.options.clone(),
            self.out.clone(),
            self.actions_tx.clone(),
            self.moving.clone(),
        );
        let unit_id = self.config.unit_id.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-move".into())
            .spawn(move || {
                match moving::prove(&state, &unit_id, &params, &options) {
                    Ok(plan) => {
                        let _ = actions.send(RelayAction::Move { reply, plan });
                        out.wake();
                    }
                    Err(reason) => {
                        out.control(OutMsg {
                            kind: Kind::Response,
                            route: reply.route,
                            channel: reply.channel,
                            body: ResponseBody::err("move_failed", reason).to_vec(),
                        });
                    }
                }
                moving.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(_) => None,
            Err(e) => {
                self.moving.fetch_sub(1, Ordering::SeqCst);
                Some(ResponseBody::err("internal_error", format!("move: {e}")))
            }
        }
    }

    fn open(&mut self, route: u64, channel: u32, body: &[u8]) {
        let key = (route, channel);
        if self.streams.remove(&key).is_some() {
            self.reset(route, channel, "stream_refused", "stream id already in use");
            return;
        }
        let open: OpenBody = match serde_json::from_slice(body) {
            Ok(o) => o,
            Err(e) => {
                self.reset(route, channel, "bad_request", &format!("bad open: {e}"));
                return;
            }
        };
        if self.streams.len() >= self.config.max_streams {
            self.reset(route, channel, "stream_refused", "too many streams open");
            return;
        }
        let send_window = open.window.unwrap_or(DEFAULT_WINDOW);
        let (mut entry, ctx, inbound) =
            flow::stream(route, channel, &self.out, send_window, self.config.window);
        let started = match open.kind.as_str() {
            "file" => file::start(&self.config, &open, ctx, inbound),
            "terminal" => terminal::start(&self.config, &open, ctx, inbound),
            "shadow" => shadow::start(&self.config, ctx, inbound),
            other => Err(ErrorBody {
                code: "stream_refused".into(),
                message: format!("unknown stream kind {other:?}"),
            }),
        };
        match started {
            Ok(hook) => {
                if let Some(h) = hook {
                    entry.on_cancel(h);
                }
                self.streams.insert(key, entry);
            }
            Err(e) => {
                drop(entry);
                self.reset(route, channel, &e.code, &e.message);
            }
        }
    }
}

/// The `open` body (`docs/protocol.md` §6.6); fields by kind.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct OpenBody {
    pub kind: String,
    #[serde(default)]
    pub window: Option<u32>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub cols: Option<u16>,
    #[serde(default)]
    pub rows: Option<u16>,
}

fn encode(kind: Kind, route: u64, channel: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(envelope::FIXED_HEADER + body.len());
    envelope::write(
        &mut out,
        &Header {
            kind,
            channel,
            route,
            unit: "",
        },
        body,
    );
    out
}

/// Whether an event from the gateway is `{"event": "management_down"}` (§6.5).
fn is_management_down(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Event<'a> {
        #[serde(borrow)]
        event: &'a str,
    }
    serde_json::from_slice::<Event<'_>>(body).is_ok_and(|e| e.event == MANAGEMENT_DOWN)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `info` result.
fn info(unit_id: &str) -> serde_json::Value {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_else(|| std::env::consts::OS.to_owned());
    let uptime_secs = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| s as u64)
        .unwrap_or(0);
    json!({
        "unit_id": unit_id,
        "agent": format!("fleetgate-agent/{}", env!("CARGO_PKG_VERSION")),
        "hostname": hostname,
        "os": os,
        "arch": std::env::consts::ARCH,
        "uptime_secs": uptime_secs,
        "features": ["exec", "file", "terminal", "shadow", "move", "root.offer"],
    })
}

/// Checks a `root.offer`: one PEM certificate, a CA, self-signed.
fn parse_root_offer(params: &serde_json::Value) -> Result<CertificateDer<'static>, String> {
    let pem = params
        .get("root")
        .and_then(|v| v.as_str())
        .ok_or("root.offer needs {\"root\": \"<PEM>\"}")?;
    let cert = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("root.offer: not a PEM certificate: {e}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("root.offer: unreadable certificate: {e}"))?;
    if !parsed.is_ca() {
        return Err("root.offer: the certificate is not a CA".into());
    }
    parsed
        .verify_signature(None)
        .map_err(|_| "root.offer: the certificate is not self-signed".to_owned())?;
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(dir: &std::path::Path) -> Relay {
        let state = AgentState::open(dir.join("state")).unwrap();
        let mut config = RelayConfig::from_state(&state, "U1");
        config.receive_dir = dir.join("inbox");
        Relay::new(config, state, AgentOptions::fast()).unwrap()
    }

    fn req(route: u64, channel: u32, body: &str) -> Vec<u8> {
        encode(Kind::Request, route, channel, body.as_bytes())
    }

    fn answer(r: &mut Relay) -> (Header<'static>, serde_json::Value) {
        let m = r.next_control().expect("an answer");
        let (h, n) = Header::parse(&m).unwrap();
        let h = Header {
            kind: h.kind,
            channel: h.channel,
            route: h.route,
            unit: "",
        };
        (h, serde_json::from_slice(&m[n..]).unwrap())
    }

    #[test]
    fn requests_echo_route_and_channel() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = relay(dir.path());
        r.handle(&req(0xAB, 7, r#"{"method":"ping","params":{}}"#));
        let (h, v) = answer(&mut r);
        assert_eq!((h.kind, h.route, h.channel), (Kind::Response, 0xAB, 7));
        assert_eq!(v["ok"], true);
        assert_eq!(v["result"]["pong"], true);
        r.handle(&req(1, 8, r#"{"method":"info"}"#));
        let (_, v) = answer(&mut r);
        assert_eq!(v["result"]["unit_id"], "U1");
        r.handle(&req(1, 9, r#"{"method":"reboot"}"#));
        assert_eq!(answer(&mut r).1["error"]["code"], "unknown_method");
        r.handle(&req(1, 10, r#"{"method":"exec","params":{"command":"x"}}"#));
        assert_eq!(answer(&mut r).1["error"]["code"], "not_allowed");
        r.handle(&req(1, 11, "nope"));
        assert_eq!(answer(&mut r).1["error"]["code"], "bad_request");
        r.handle(&req(
            1,
            12,
            r#"{"method":"root.offer","params":{"root":"x"}}"#,
        ));
        assert_eq!(answer(&mut r).1["error"]["code"], "bad_request");
        // Stream messages for unknown streams: reset link_closed; a reset is not answered.
        r.handle(&encode(Kind::Data, 5, 6, b"abc"));
        let (h, v) = answer(&mut r);
        assert_eq!((h.kind, h.route, h.channel), (Kind::Reset, 5, 6));
        assert_eq!(v["error"]["code"], "link_closed");
        r.handle(&encode(Kind::Reset, 5, 6, b"{}"));
        assert!(r.next_control().is_none());
        r.handle(&encode(Kind::Open, 5, 6, br#"{"kind":"teleport"}"#));
        assert_eq!(answer(&mut r).1["error"]["code"], "stream_refused");
    }

    #[test]
    fn management_down_ends_the_streams_of_that_route_only() {
        use std::io::Read as _;
        let dir = tempfile::tempdir().unwrap();
        let vnc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let state = AgentState::open(dir.path().join("state")).unwrap();
        let mut config = RelayConfig::from_state(&state, "U1");
        config.vnc_port = vnc.local_addr().unwrap().port();
        let mut r = Relay::new(config, state, AgentOptions::fast()).unwrap();
        // Two shadow streams, from two management connections (routes 5 and 9).
        for route in [5, 9] {
            r.handle(&encode(Kind::Open, route, 6, br#"{"kind":"shadow"}"#));
        }
        let mut socks: Vec<std::net::TcpStream> = (0..2)
            .map(|_| {
                let (s, _) = vnc.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                s
            })
            .collect();
        assert_eq!(r.open_streams(), 2);
        // An unrelated event changes nothing; management_down for route 5 ends its stream.
        r.handle(&encode(Kind::Event, 5, 0, br#"{"event":"something_else"}"#));
        assert_eq!(r.open_streams(), 2);
        r.handle(&encode(
            Kind::Event,
            5,
            0,
            br#"{"event":"management_down"}"#,
        ));
        assert_eq!(r.open_streams(), 1, "route 9's stream stays");
        // Exactly one VNC socket was shut down (the other stays open and silent).
        let mut ended = 0;
        for s in &mut socks {
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Ok(0) => ended += 1,
                Ok(n) => panic!("unexpected {n} bytes"),
                Err(e) => assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "{e}"
                ),
            }
        }
        assert_eq!(ended, 1);
        // Nothing goes to the gateway for the ended stream (not even its accept, still
        // queued when the event came): only route 9's accept.
        let mut sent = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !sent.contains(&(Kind::Accept, 9)) && std::time::Instant::now() < deadline {
            match r.next_control() {
                Some(m) => {
                    let h = Header::parse(&m).unwrap().0;
                    sent.push((h.kind, h.route));
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        assert_eq!(sent, [(Kind::Accept, 9)]);
    }
}
