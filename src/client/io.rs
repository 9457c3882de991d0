//! The I/O thread: owns the WebSocket, writes control before bulk, reads and dispatches
//! envelopes (responses to their waiting callers, stream messages to their streams, events to
//! subscribers). Non-blocking socket driven by mio; callers wake it through a [`mio::Waker`].

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use super::connect::Tls;
use super::stream::{Failure, Incoming, StreamShared};
use super::{ClientError, Event, EventKind, Ids};
use crate::proto::envelope::{ErrorBody, Header, Kind, ResponseBody, parse_credit};

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);

/// A request's answer channel.
pub(crate) type Reply = Sender<Result<Value, ClientError>>;

/// What callers ask the I/O thread to do.
pub(crate) enum Cmd {
    /// Register a pending request, then send its envelope.
    Request {
        id: u32,
        unit: String,
        frame: Vec<u8>,
        reply: Reply,
    },
    /// Forget a pending request (the caller timed out).
    Cancel { id: u32 },
    /// Register a stream, then send its `open`.
    Open {
        id: u32,
        unit: String,
        frame: Vec<u8>,
        shared: Arc<StreamShared>,
        incoming: Sender<Incoming>,
        accept: Reply,
    },
    /// Send a stream envelope (data in the bulk lane, the rest in the control lane).
    Send { frame: Vec<u8> },
    /// Deliver events to this channel.
    Subscribe(Sender<Event>),
    /// Close the connection.
    Shutdown,
}

/// The callers' side of the I/O thread.
pub(crate) struct Link {
    tx: Mutex<Sender<Cmd>>,
    waker: Waker,
    ids: Ids,
    closed: AtomicBool,
    reason: Mutex<String>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Hands a command to the I/O thread.
    pub(crate) fn send(&self, cmd: Cmd) -> Result<(), ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed(self.close_reason()));
        }
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(cmd)
            .map_err(|_| ClientError::Closed(self.close_reason()))?;
        let _ = self.waker.wake();
        Ok(())
    }

    /// A fresh request or stream id.
    pub(crate) fn next_id(&self) -> u32 {
        self.ids.next()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn close_reason(&self) -> String {
        let r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_empty() {
            "closed".into()
        } else {
            r.clone()
        }
    }

    fn set_closed(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.closed.store(true, Ordering::Release);
    }
}

/// Switches the socket to non-blocking and starts the I/O thread.
pub(crate) fn start(
    ws: WebSocket<Tls>,
    peer: String,
) -> Result<(Arc<Link>, JoinHandle<()>), ClientError> {
    let io_err = |source| ClientError::Connect {
        what: peer.clone(),
        source,
    };
    let sock = &ws.get_ref().sock;
    sock.set_read_timeout(None).map_err(io_err)?;
    sock.set_write_timeout(None).map_err(io_err)?;
    sock.set_nonblocking(true).map_err(io_err)?;
    let poll = Poll::new().map_err(io_err)?;
    let fd = sock.as_raw_fd();
    poll.registry()
        .register(
            &mut SourceFd(&fd),
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        )
        .map_err(io_err)?;
    let waker = Waker::new(poll.registry(), WAKER).map_err(io_err)?;
    let (tx, rx) = channel();
    let link = Arc::new(Link {
        tx: Mutex::new(tx),
        waker,
        ids: Ids::default(),
        closed: AtomicBool::new(false),
        reason: Mutex::new(String::new()),
    });
    let l2 = link.clone();
    let thread = std::thread::Builder::new()
        .name("fleetgate-mgmt-io".into())
        .spawn(move || {
            let mut io = Io {
                ws,
                poll,
                rx,
                link: l2,
                control: VecDeque::new(),
                bulk: VecDeque::new(),
                pending: HashMap::new(),
                streams: HashMap::new(),
                subscribers: Vec::new(),
                close_reason: None,
            };
            let reason = io.run();
            io.fail_all(reason);
        })
        .map_err(|e| ClientError::Io {
            context: "cannot start the I/O thread".into(),
            source: e,
        })?;
    Ok((link, thread))
}

struct Slot {
    unit: String,
    shared: Arc<StreamShared>,
    incoming: Sender<Incoming>,
    accept: Option<Reply>,
    local_closed: bool,
    remote_closed: bool,
}

struct Io {
    ws: WebSocket<Tls>,
    poll: Poll,
    rx: Receiver<Cmd>,
    link: Arc<Link>,
    control: VecDeque<Vec<u8>>,
    bulk: VecDeque<Vec<u8>>,
    pending: HashMap<u32, (String, Reply)>,
    streams: HashMap<u32, Slot>,
    subscribers: Vec<Sender<Event>>,
    /// What the gateway said when it closed (close frame, `refused`).
    close_reason: Option<String>,
}

enum Flow {
    Continue,
    Stop(String),
}

impl Io {
    /// The loop; returns why it ended.
    fn run(&mut self) -> String {
        let mut events = Events::with_capacity(8);
        loop {
            if let Flow::Stop(r) = self.commands() {
                return r;
            }
            if let Flow::Stop(r) = self.write() {
                return r;
            }
            if let Flow::Stop(r) = self.read() {
                return r;
            }
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() != ErrorKind::Interrupted {
                    return format!("poll failed: {e}");
                }
            }
        }
    }

    fn commands(&mut self) -> Flow {
        loop {
            match self.rx.try_recv() {
                Ok(Cmd::Request {
                    id,
                    unit,
                    frame,
                    reply,
                }) => {
                    self.pending.insert(id, (unit, reply));
                    self.control.push_back(frame);
                }
                Ok(Cmd::Cancel { id }) => {
                    self.pending.remove(&id);
                }
                Ok(Cmd::Open {
                    id,
                    unit,
                    frame,
                    shared,
                    incoming,
                    accept,
                }) => {
                    self.streams.insert(
                        id,
                        Slot {
                            unit,
                            shared,
                            incoming,
                            accept: Some(accept),
                            local_closed: false,
                            remote_closed: false,
                        },
                    );
                    self.control.push_back(frame);
                }
                Ok(Cmd::Send { frame }) => self.queue(frame),
                Ok(Cmd::Subscribe(tx)) => self.subscribers.push(tx),
                Ok(Cmd::Shutdown) => {
                    self.goodbye();
                    return Flow::Stop("closed by the client".into());
                }
                Err(TryRecvError::Empty) => return Flow::Continue,
                Err(TryRecvError::Disconnected) => {
                    self.goodbye();
                    return Flow::Stop("closed by the client".into());
                }
            }
        }
    }

    /// Queues an outgoing stream envelope, noting half-closes and resets.
    fn queue(&mut self, frame: Vec<u8>) {
        let Ok((h, _)) = Header::parse(&frame) else {
            return;
        };
        match h.kind {
            Kind::Data => {
                self.bulk.push_back(frame);
                return;
            }
            Kind::Close => {
                if let Some(s) = self.streams.get_mut(&h.channel) {
                    s.local_closed = true;
                    if s.remote_closed {
                        self.streams.remove(&h.channel);
                    }
                }
                // A half-close ends the stream's bytes: it must not overtake its own data.
                let ch = h.channel;
                if self
                    .bulk
                    .iter()
                    .any(|f| Header::parse(f).is_ok_and(|(h, _)| h.channel == ch))
                {
                    self.bulk.push_back(frame);
                    return;
                }
            }
            Kind::Reset => {
                if let Some(s) = self.streams.remove(&h.channel) {
                    s.shared.fail(Failure::Local);
                    let _ = s.incoming.send(Incoming::Failed(ClientError::Closed(
                        "the stream was reset by this side".into(),
                    )));
                    // Queued data of the stream is useless now.
                    let ch = h.channel;
                    self.bulk.retain(|f| {
                        Header::parse(f)
                            .map(|(h, _)| h.channel != ch)
                            .unwrap_or(false)
                    });
                }
            }
            _ => {}
        }
        self.control.push_back(frame);
    }

    fn write(&mut self) -> Flow {
        loop {
            match self.ws.flush() {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    return Flow::Continue;
                }
                Err(e) => return Flow::Stop(self.describe(e)),
            }
            let Some(frame) = self.control.pop_front().or_else(|| self.bulk.pop_front()) else {
                return Flow::Continue;
            };
            match self.ws.write(Message::Binary(frame.into())) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Flow::Stop(self.describe(e)),
            }
        }
    }

    fn read(&mut self) -> Flow {
        loop {
            match self.ws.read() {
                Ok(Message::Binary(b)) => {
                    if let Err(e) = self.dispatch(&b) {
                        let _ = self.ws.close(Some(CloseFrame {
                            code: CloseCode::Protocol,
                            reason: "bad envelope".into(),
                        }));
                        let _ = self.ws.flush();
                        return Flow::Stop(format!("the gateway sent a bad envelope: {e}"));
                    }
                }
                Ok(Message::Text(t)) => {
                    // A `refused` before the close (revoked credential).
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                        if v["type"] == "refused" {
                            self.close_reason = Some(format!(
                                "refused: {} {}",
                                v["reason"].as_str().unwrap_or(""),
                                v["message"].as_str().unwrap_or("")
                            ));
                        }
                    }
                }
                Ok(Message::Close(f)) => {
                    let said = match f {
                        Some(f) => format!("gateway closed: {} {}", u16::from(f.code), f.reason),
                        None => "gateway closed".into(),
                    };
                    self.close_reason = Some(match self.close_reason.take() {
                        Some(r) => format!("{r} ({said})"),
                        None => said,
                    });
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    return Flow::Continue;
                }
                Err(e) => return Flow::Stop(self.describe(e)),
            }
        }
    }

    fn describe(&mut self, e: tungstenite::Error) -> String {
        let base = match e {
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                "connection closed".to_owned()
            }
            tungstenite::Error::Io(e) if e.kind() == ErrorKind::UnexpectedEof => {
                "the gateway closed the connection".to_owned()
            }
            other => other.to_string(),
        };
        match self.close_reason.take() {
            Some(r) => r,
            None => base,
        }
    }

    fn dispatch(&mut self, msg: &[u8]) -> Result<(), String> {
        let (h, n) = Header::parse(msg).map_err(|e| e.to_string())?;
        let body = &msg[n..];
        let ch = h.channel;
        match h.kind {
            Kind::Response => {
                if let Some((_, reply)) = self.pending.remove(&ch) {
                    let r: ResponseBody = serde_json::from_slice(body)
                        .map_err(|e| format!("bad response body: {e}"))?;
                    let _ = reply.send(if r.ok {
                        Ok(r.result.unwrap_or(Value::Null))
                    } else {
                        Err(ClientError::remote(r.error.unwrap_or_else(|| ErrorBody {
                            code: "internal_error".into(),
                            message: "error response without an error".into(),
                        })))
                    });
                }
            }
            Kind::Event => {
                let v: Value =
                    serde_json::from_slice(body).map_err(|e| format!("bad event body: {e}"))?;
                let kind = EventKind::parse(v["event"].as_str().unwrap_or(""));
                let unit = h.unit.to_owned();
                if kind == EventKind::DeviceDown {
                    self.device_down(&unit);
                }
                let ev = Event {
                    kind,
                    unit,
                    body: v,
                };
                self.subscribers.retain(|s| s.send(ev.clone()).is_ok());
            }
            Kind::Accept => {
                if let Some(s) = self.streams.get_mut(&ch) {
                    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                    let window = v["window"]
                        .as_u64()
                        .unwrap_or(u64::from(crate::proto::envelope::DEFAULT_WINDOW));
                    s.shared.grant(window);
                    if let Some(a) = s.accept.take() {
                        let _ = a.send(Ok(v));
                    }
                }
            }
            Kind::Data => {
                if let Some(s) = self.streams.get(&ch) {
                    let _ = s.incoming.send(Incoming::Data(body.to_vec()));
                }
            }
            Kind::Credit => {
                let n = parse_credit(body).map_err(|e| e.to_string())?;
                if let Some(s) = self.streams.get(&ch) {
                    s.shared.grant(u64::from(n));
                }
            }
            Kind::Close => {
                if let Some(s) = self.streams.get_mut(&ch) {
                    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                    let _ = s.incoming.send(Incoming::Close(v));
                    s.remote_closed = true;
                    if s.local_closed {
                        self.streams.remove(&ch);
                    }
                }
            }
            Kind::Reset => {
                if let Some(s) = self.streams.remove(&ch) {
                    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                    let err = ErrorBody {
                        code: v["error"]["code"].as_str().unwrap_or("reset").to_owned(),
                        message: v["error"]["message"].as_str().unwrap_or("").to_owned(),
                    };
                    s.shared.fail(Failure::Remote {
                        code: err.code.clone(),
                        message: err.message.clone(),
                    });
                    match s.accept {
                        Some(a) => {
                            let _ = a.send(Err(ClientError::remote(err)));
                        }
                        None => {
                            let _ = s.incoming.send(Incoming::Failed(ClientError::remote(err)));
                        }
                    }
                    self.bulk.retain(|f| {
                        Header::parse(f)
                            .map(|(h, _)| h.channel != ch)
                            .unwrap_or(false)
                    });
                }
            }
            // Requests and opens towards a management server are not defined: ignored.
            Kind::Request | Kind::Open => {}
        }
        Ok(())
    }

    /// Fails everything pending on `unit`.
    fn device_down(&mut self, unit: &str) {
        let same = |u: &str| u.eq_ignore_ascii_case(unit);
        let ids: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, (u, _))| same(u))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((_, reply)) = self.pending.remove(&id) {
                let _ = reply.send(Err(ClientError::DeviceDown(unit.to_owned())));
            }
        }
        let ids: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| same(&s.unit))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(s) = self.streams.remove(&id) {
                s.shared.fail(Failure::DeviceDown(unit.to_owned()));
                match s.accept {
                    Some(a) => {
                        let _ = a.send(Err(ClientError::DeviceDown(unit.to_owned())));
                    }
                    None => {
                        let _ = s
                            .incoming
                            .send(Incoming::Failed(ClientError::DeviceDown(unit.to_owned())));
                    }
                }
            }
            self.bulk.retain(|f| {
                Header::parse(f)
                    .map(|(h, _)| h.channel != id)
                    .unwrap_or(false)
            });
        }
    }

    /// Close 1000, flushed with a short blocking wait for the gateway's close.
    fn goodbye(&mut self) {
        let sock = &self.ws.get_ref().sock;
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = self.ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }));
        let _ = self.ws.flush();
        for _ in 0..64 {
            if self.ws.read().is_err() {
                break;
            }
        }
    }

    /// The connection is gone: everybody waiting learns why.
    fn fail_all(&mut self, reason: String) {
        self.link.set_closed(reason.clone());
        for (_, (_, reply)) in self.pending.drain() {
            let _ = reply.send(Err(ClientError::Closed(reason.clone())));
        }
        for (_, s) in self.streams.drain() {
            s.shared.fail(Failure::Closed(reason.clone()));
            match s.accept {
                Some(a) => {
                    let _ = a.send(Err(ClientError::Closed(reason.clone())));
                }
                None => {
                    let _ = s
                        .incoming
                        .send(Incoming::Failed(ClientError::Closed(reason.clone())));
                }
            }
        }
        self.subscribers.clear();
        // Commands that raced with the end.
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Request { reply, .. } => {
                    let _ = reply.send(Err(ClientError::Closed(reason.clone())));
                }
                Cmd::Open { accept, shared, .. } => {
                    shared.fail(Failure::Closed(reason.clone()));
                    let _ = accept.send(Err(ClientError::Closed(reason.clone())));
                }
                _ => {}
            }
        }
    }
}
