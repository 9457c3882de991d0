//! The agent's side of the relay (`docs/protocol.md` §6) against an in-process mock gateway
//! (rustls + tungstenite, mutual TLS with a test device CA, as in `tests/agent_mock.rs`): the
//! mock hands each device session to the test, which sends envelopes and checks the answers —
//! requests, `exec` with and without a hook, a 20 MB file push under credit flow control, path
//! traversal and bad checksums, a terminal on a PTY, shadowing to a local TCP echo server,
//! `move` and `root.offer`.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleetgate::agent::{
    AgentError, AgentEvent, AgentOptions, AgentState, Connector, RegisterRequest, RunOutcome,
    StopHandle, fetch_fingerprint, register, run,
};
use fleetgate::pki::Fingerprint;
use fleetgate::proto::device::{Message, Registered};
use fleetgate::proto::envelope::{self, DEFAULT_WINDOW, Header, Kind};
use rcgen::{CertificateParams, KeyPair};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

#[path = "common/mock_pki.rs"]
mod mock_pki;
#[path = "common/peers.rs"]
mod peers;
use mock_pki::{Pki, accept_until_stopped};

// ---------------------------------------------------------------------------------------------
// The mock gateway: registers devices, and hands every device session to the test as a Link.

/// One device session, seen from the gateway: send envelopes, receive the agent's.
struct Link {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    /// Envelopes received but not yet taken by `expect`.
    pending: Vec<Vec<u8>>,
}

/// A decoded envelope from the agent.
#[derive(Debug, Clone)]
struct Env {
    kind: Kind,
    channel: u32,
    route: u64,
    unit_len: usize,
    body: Vec<u8>,
}

impl Env {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn decode(m: &[u8]) -> Env {
    let (h, n) = Header::parse(m).expect("the agent sends valid envelopes");
    Env {
        kind: h.kind,
        channel: h.channel,
        route: h.route,
        unit_len: h.unit.len(),
        body: m[n..].to_vec(),
    }
}

const ROUTE: u64 = 0x1122_3344_5566_7788;

impl Link {
    fn send(&self, kind: Kind, channel: u32, body: &[u8]) {
        let mut out = Vec::new();
        envelope::write(
            &mut out,
            &Header {
                kind,
                channel,
                route: ROUTE,
                unit: "",
            },
            body,
        );
        self.tx.send(out).expect("mock session alive");
    }

    fn request(&self, channel: u32, method: &str, params: Value) {
        let body = json!({ "method": method, "params": params }).to_string();
        self.send(Kind::Request, channel, body.as_bytes());
    }

    /// The next envelope matching `pred` (others are kept for later).
    fn expect(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Env) -> bool) -> Env {
        if let Some(i) = self.pending.iter().position(|m| pred(&decode(m))) {
            return decode(&self.pending.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) => {
                    let e = decode(&m);
                    assert_eq!(e.unit_len, 0, "the agent leaves the unit empty");
                    if pred(&e) {
                        return e;
                    }
                    self.pending.push(m);
                }
                Err(_) => panic!(
                    "no {what} within {timeout:?}; got {:?}",
                    self.pending.iter().map(|m| decode(m)).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// The response to request `channel` (checks the route echo).
    fn response(&mut self, channel: u32, timeout: Duration) -> Value {
        let e = self.expect("response", timeout, |e| {
            e.kind == Kind::Response && e.channel == channel
        });
        assert_eq!(e.route, ROUTE, "the route is echoed");
        e.json()
    }

    /// The next message of stream `channel`.
    fn stream_msg(&mut self, channel: u32, timeout: Duration) -> Env {
        let e = self.expect("stream message", timeout, |e| {
            e.kind.is_stream() && e.channel == channel
        });
        assert_eq!(e.route, ROUTE, "the route is echoed");
        e
    }
}

struct Mock {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    sessions: Receiver<Link>,
    thread: Option<JoinHandle<()>>,
}

impl Mock {
    fn start(pki: &Arc<Pki>) -> Mock {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let config = pki.server_config();
        let (sessions_tx, sessions) = channel();
        let (pki2, stop2) = (pki.clone(), stop.clone());
        let thread = accept_until_stopped(listener, stop.clone(), move |tcp| {
            serve(tcp, config.clone(), &pki2, &stop2, &sessions_tx)
        });
        Mock {
            addr,
            stop,
            sessions,
            thread: Some(thread),
        }
    }

    fn connector(&self) -> Connector {
        Connector::parse(&format!("localhost:{}", self.addr.port())).unwrap()
    }

    /// The next device session.
    fn session(&self) -> Link {
        let (tx, rx) = self
            .sessions
            .recv_timeout(Duration::from_secs(15))
            .map(|l| (l.tx, l.rx))
            .expect("a device session");
        Link {
            tx,
            rx,
            pending: Vec::new(),
        }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

fn serve(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    pki: &Pki,
    stop: &AtomicBool,
    sessions: &Sender<Link>,
) {
    tcp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut tls = StreamOwned::new(ServerConnection::new(config).unwrap(), tcp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tls.conn.is_handshaking() {
        match tls.conn.complete_io(&mut tls.sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() > deadline || stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let session_unit = tls.conn.peer_certificates().map(|certs| {
        let (_, c) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
        let cn = c.subject().iter_common_name().next().unwrap();
        cn.as_str().unwrap().to_owned()
    });
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let Ok(mut ws) = tungstenite::accept(tls) else {
        return;
    };
    let Some(unit) = session_unit else {
        // Register mode.
        ws.send(tungstenite::Message::text(
            json!({"type": "hello", "protocol": 1, "mode": "register", "gateway": "mock/1"})
                .to_string(),
        ))
        .unwrap();
        let text = loop {
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) => break t.to_string(),
                Ok(_) => {}
                Err(_) => return,
            }
        };
        let Ok(Message::Register(reg)) = Message::from_json(text.as_bytes()) else {
            panic!("expected register, got {text}");
        };
        let (cert, _) = pki.issue(&reg.unit_id, &reg.csr);
        let ca: &rcgen::Certificate = pki.device_ca.as_ref();
        let answer = Message::Registered(Registered {
            reason: "granted".into(),
            unit_id: reg.unit_id,
            certificate: cert,
            device_ca: ca.pem(),
        });
        let _ = ws.send(tungstenite::Message::text(answer.to_json()));
        let _ = ws.close(None);
        let _ = ws.flush();
        return;
    };
    ws.send(tungstenite::Message::text(
        json!({"type": "hello", "protocol": 1, "mode": "session", "gateway": "mock/1",
               "unit_id": unit})
        .to_string(),
    ))
    .unwrap();
    ws.get_ref()
        .sock
        .set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    ws.get_ref()
        .sock
        .set_write_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    let (to_agent_tx, to_agent) = channel::<Vec<u8>>();
    let (from_agent, from_agent_rx) = channel::<Vec<u8>>();
    let _ = sessions.send(Link {
        tx: to_agent_tx,
        rx: from_agent_rx,
        pending: Vec::new(),
    });
    let mut unflushed = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut queued = 0;
        while queued < 64 {
            match to_agent.try_recv() {
                Ok(m) => {
                    queued += 1;
                    match ws.write(tungstenite::Message::binary(m)) {
                        Ok(()) => {}
                        Err(e) if would_block(&e) => {}
                        Err(_) => return,
                    }
                    unflushed = true;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                // The test dropped its link: the gateway closes the session.
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    let _ = ws.close(None);
                    let _ = ws.flush();
                    return;
                }
            }
        }
        if unflushed {
            match ws.flush() {
                Ok(()) => unflushed = false,
                Err(e) if would_block(&e) => {}
                Err(_) => return,
            }
        }
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => {
                let _ = from_agent.send(b.to_vec());
            }
            Ok(tungstenite::Message::Close(_)) => {
                let _ = ws.flush();
                return;
            }
            Ok(_) => {}
            Err(e) if would_block(&e) => {}
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agents.

/// A state dir registered as `unit` with `mock`, with `configure` applied to agent.toml.
fn registered(
    dir: &Path,
    mock: &Mock,
    unit: &str,
    configure: impl FnOnce(&mut AgentState),
) -> AgentState {
    let options = AgentOptions::fast();
    let mut state = AgentState::open(dir).unwrap();
    let contact = fetch_fingerprint(&mock.connector(), &options).unwrap();
    state.adopt(&contact).unwrap();
    let req = RegisterRequest {
        connector: mock.connector(),
        unit_id: unit.into(),
        key: "K".into(),
    };
    register(&mut state, &req, &options, &StopHandle::new()).unwrap();
    configure(&mut state);
    state.save().unwrap();
    state
}

struct Agent {
    stop: StopHandle,
    events: Receiver<AgentEvent>,
    thread: Option<JoinHandle<Result<RunOutcome, AgentError>>>,
}

impl Agent {
    fn spawn(mut state: AgentState) -> Agent {
        let stop = StopHandle::new();
        let (tx, events) = channel();
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            run(&mut state, &AgentOptions::fast(), &s2, &mut |e| {
                let _ = tx.send(e);
            })
        });
        Agent {
            stop,
            events,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> RunOutcome {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Mock + registered agent running, and its first session.
fn setup(
    unit: &str,
    configure: impl FnOnce(&mut AgentState),
) -> (Mock, tempfile::TempDir, Agent, Link) {
    let pki = Pki::new();
    let mock = Mock::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let state = registered(&dir.path().join("state"), &mock, unit, configure);
    let agent = Agent::spawn(state);
    let link = mock.session();
    (mock, dir, agent, link)
}

const T: Duration = Duration::from_secs(10);

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn ping_info_unknown_method_and_refused_exec() {
    let (_mock, _dir, agent, mut link) = setup("relay-1", |_| {});
    link.request(7, "ping", json!({}));
    let v = link.response(7, T);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["result"]["pong"], true);
    assert!(v["result"]["time"].as_u64().unwrap() > 1_600_000_000);

    link.request(8, "info", json!({}));
    let v = link.response(8, T);
    assert_eq!(v["result"]["unit_id"], "relay-1", "{v}");
    assert!(
        v["result"]["agent"]
            .as_str()
            .unwrap()
            .starts_with("fleetgate-agent/")
    );
    for k in ["hostname", "os", "uptime_secs"] {
        assert!(!v["result"][k].is_null(), "{k} in {v}");
    }

    link.request(9, "format.disk", json!({}));
    let v = link.response(9, T);
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["code"], "unknown_method");

    link.request(10, "exec", json!({"command": "id"}));
    let v = link.response(10, T);
    assert_eq!(v["error"]["code"], "not_allowed", "{v}");

    // A stream message for a stream that does not exist.
    link.send(Kind::Data, 99, b"stray");
    let e = link.stream_msg(99, T);
    assert_eq!(e.kind, Kind::Reset);
    assert_eq!(e.json()["error"]["code"], "link_closed");

    assert_eq!(agent.stop(), RunOutcome::Stopped);
}

#[test]
fn exec_runs_the_hook_with_argv_not_a_shell() {
    let tmp = tempfile::tempdir().unwrap();
    let hook = tmp.path().join("hook.sh");
    std::fs::write(
        &hook,
        "#!/bin/sh\necho \"cmd=$1\"\nshift\nfor a in \"$@\"; do echo \"arg=$a\"; done\n\
         echo oops >&2\nexit 3\n",
    )
    .unwrap();
    let mut perms = std::fs::metadata(&hook).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&hook, perms).unwrap();
    let h = hook.clone();
    let (_mock, _dir, agent, mut link) = setup("relay-2", move |s| {
        s.config.exec_hook = Some(h);
    });
    link.request(
        1,
        "exec",
        json!({"command": "status", "args": ["a b", "$(reboot); x", "*"]}),
    );
    let v = link.response(1, T);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        v["result"]["stdout"],
        "cmd=status\narg=a b\narg=$(reboot); x\narg=*\n"
    );
    assert_eq!(v["result"]["stderr"], "oops\n");
    assert_eq!(v["result"]["exit_code"], 3);
    assert_eq!(v["result"]["timed_out"], false);
    link.request(2, "exec", json!({"args": []}));
    assert_eq!(link.response(2, T)["error"]["code"], "bad_request");
    assert_eq!(agent.stop(), RunOutcome::Stopped);
}

/// Pushes `data` as stream `channel`, honouring the agent's credit; asserts the mock never
/// has more than the window outstanding. Calls `midway` once about half is sent.
fn push(
    link: &mut Link,
    channel: u32,
    path: &str,
    data: &[u8],
    sha256: &str,
    mut midway: impl FnMut(&mut Link),
) -> Env {
    let open = json!({"kind": "file", "window": DEFAULT_WINDOW, "path": path,
                      "size": data.len(), "sha256": sha256});
    link.send(Kind::Open, channel, open.to_string().as_bytes());
    let e = link.stream_msg(channel, T);
    if e.kind == Kind::Reset {
        return e;
    }
    assert_eq!(e.kind, Kind::Accept, "{e:?}");
    let window = e.json()["window"].as_u64().unwrap();
    assert_eq!(window, u64::from(DEFAULT_WINDOW));
    let mut granted = window;
    let mut sent: u64 = 0;
    let mut max_outstanding = 0;
    let mut called = false;
    for piece in data.chunks(16 * 1024) {
        while sent + piece.len() as u64 > granted {
            let e = link.stream_msg(channel, T);
            match e.kind {
                Kind::Credit => {
                    granted += u64::from(envelope::parse_credit(&e.body).unwrap());
                }
                _ => return e,
            }
        }
        link.send(Kind::Data, channel, piece);
        sent += piece.len() as u64;
        max_outstanding = max_outstanding.max(sent - (granted - window));
        assert!(sent <= granted, "the mock stays within the credit");
        if !called && sent >= data.len() as u64 / 2 {
            called = true;
            midway(link);
        }
    }
    assert!(max_outstanding <= window, "{max_outstanding} > {window}");
    link.send(Kind::Close, channel, br#"{"ok":true}"#);
    loop {
        let e = link.stream_msg(channel, Duration::from_secs(30));
        if e.kind != Kind::Credit {
            return e;
        }
    }
}

#[test]
fn a_20_mb_push_arrives_atomically_with_its_checksum_while_requests_are_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let inbox = tmp.path().join("inbox");
    let ib = inbox.clone();
    let (_mock, _dir, agent, mut link) = setup("relay-3", move |s| {
        s.config.receive_dir = Some(ib);
    });
    // Deterministic pseudo-random content.
    let mut data = vec![0u8; 20 * 1024 * 1024];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let sha = sha256_hex(&data);
    let target = inbox.join("sub/image.bin");
    let started = Instant::now();
    let ib = inbox.clone();
    let e = push(&mut link, 5, "sub/image.bin", &data, &sha, |link| {
        // Halfway: the file is not there yet (only the temporary), and a ping is answered
        // while the push is going on.
        assert!(!target.exists());
        let parts = files_in(&ib.join("sub"));
        assert!(parts.len() == 1 && parts[0].ends_with(".part"), "{parts:?}");
        let asked = Instant::now();
        link.request(77, "ping", json!({}));
        let v = link.response(77, T);
        assert_eq!(v["ok"], true);
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    });
    assert_eq!(
        e.kind,
        Kind::Close,
        "{e:?} {}",
        String::from_utf8_lossy(&e.body)
    );
    let v = e.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["size"], data.len());
    assert_eq!(v["sha256"], sha);
    let written = std::fs::read(&target).unwrap();
    assert!(written == data, "content differs");
    assert_eq!(files_in(&inbox.join("sub")), vec!["image.bin".to_owned()]);
    eprintln!("20 MB push took {:?}", started.elapsed());
    assert_eq!(agent.stop(), RunOutcome::Stopped);
}

#[test]
fn traversal_is_refused_and_a_bad_checksum_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let inbox = tmp.path().join("inbox");
    let ib = inbox.clone();
    let (_mock, _dir, agent, mut link) = setup("relay-4", move |s| {
        s.config.receive_dir = Some(ib);
    });
    let data = b"hello world".repeat(1000);
    let sha = sha256_hex(&data);
    for (i, bad) in ["../escape.txt", "/tmp/abs.txt", "a/../../b"]
        .iter()
        .enumerate()
    {
        let e = push(&mut link, 10 + i as u32, bad, &data, &sha, |_| {});
        assert_eq!(e.kind, Kind::Reset, "{bad}");
        assert_eq!(e.json()["error"]["code"], "not_allowed", "{bad}");
    }
    assert!(!tmp.path().join("escape.txt").exists());

    let wrong = sha256_hex(b"something else");
    let e = push(&mut link, 20, "f.txt", &data, &wrong, |_| {});
    assert_eq!(e.kind, Kind::Reset);
    assert_eq!(e.json()["error"]["code"], "checksum_mismatch");
    assert!(files_in(&inbox).is_empty(), "{:?}", files_in(&inbox));

    // A `close` that overtakes the last data (a reordering relay) is tolerated.
    let small = b"0123456789".repeat(300);
    let open = json!({"kind": "file", "path": "late.txt", "size": small.len(),
                      "sha256": sha256_hex(&small)});
    link.send(Kind::Open, 23, open.to_string().as_bytes());
    assert_eq!(link.stream_msg(23, T).kind, Kind::Accept);
    link.send(Kind::Data, 23, &small[..2000]);
    link.send(Kind::Close, 23, br#"{"ok":true}"#);
    std::thread::sleep(Duration::from_millis(100));
    link.send(Kind::Data, 23, &small[2000..]);
    let e = link.stream_msg(23, T);
    assert_eq!(e.kind, Kind::Close, "{}", String::from_utf8_lossy(&e.body));
    assert_eq!(std::fs::read(inbox.join("late.txt")).unwrap(), small);
    std::fs::remove_file(inbox.join("late.txt")).unwrap();

    // The right checksum works; then a reset mid-push deletes the temporary file.
    let e = push(&mut link, 21, "f.txt", &data, &sha, |_| {});
    assert_eq!(e.kind, Kind::Close);
    assert_eq!(std::fs::read(inbox.join("f.txt")).unwrap(), data);
    let open = json!({"kind": "file", "path": "g.txt", "size": 100, "sha256": sha});
    link.send(Kind::Open, 22, open.to_string().as_bytes());
    assert_eq!(link.stream_msg(22, T).kind, Kind::Accept);
    link.send(Kind::Data, 22, &[1; 50]);
    std::thread::sleep(Duration::from_millis(200));
    link.send(
        Kind::Reset,
        22,
        br#"{"error":{"code":"link_closed","message":"gone"}}"#,
    );
    let deadline = Instant::now() + T;
    while files_in(&inbox) != vec!["f.txt".to_owned()] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(files_in(&inbox), vec!["f.txt".to_owned()]);
    assert_eq!(agent.stop(), RunOutcome::Stopped);
}

/// Reads terminal output of stream `channel` until `close`, granting credit (small window).
fn terminal_output(link: &mut Link, channel: u32, window: u32) -> (Vec<u8>, Value) {
    let mut out = Vec::new();
    let mut outstanding: u64 = 0;
    let mut granted = u64::from(window);
    loop {
        let e = link.stream_msg(channel, T);
        match e.kind {
            Kind::Data => {
                outstanding += e.body.len() as u64;
                assert!(outstanding <= granted, "the agent stays within our credit");
                out.extend_from_slice(&e.body);
                let grant = e.body.len() as u32;
                link.send(Kind::Credit, channel, &grant.to_be_bytes());
                granted += u64::from(grant);
            }
            Kind::Close => return (out, e.json()),
            Kind::Credit => {}
            other => panic!("unexpected {other:?}: {}", String::from_utf8_lossy(&e.body)),
        }
    }
}

#[test]
fn a_terminal_runs_echo_through_a_pty_and_reports_the_exit_code() {
    let (_mock, _dir, agent, mut link) = setup("relay-5", |_| {});
    let open = json!({"kind": "terminal", "window": 64, "cols": 100, "rows": 30});
    link.send(Kind::Open, 3, open.to_string().as_bytes());
    let e = link.stream_msg(3, T);
    assert_eq!(e.kind, Kind::Accept, "{}", String::from_utf8_lossy(&e.body));
    link.send(
        Kind::Data,
        3,
        b"tty -s && echo \"is-$((40+2))-tty\"; exit 3\n",
    );
    let (out, close) = terminal_output(&mut link, 3, 64);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("is-42-tty"), "{text:?}");
    assert_eq!(close["ok"], true);
    assert_eq!(close["exit_code"], 3, "{close}");
    link.send(Kind::Close, 3, br#"{"ok":true}"#);

    // The window size: the one of the open, then what `terminal.resize` sets.
    let open = json!({"kind": "terminal", "window": DEFAULT_WINDOW, "cols": 100, "rows": 30});
    link.send(Kind::Open, 6, open.to_string().as_bytes());
    assert_eq!(link.stream_msg(6, T).kind, Kind::Accept);
    link.send(Kind::Data, 6, b"echo size=$(stty size)=\n");
    let mut text = String::new();
    let deadline = Instant::now() + T;
    while !text.contains("size=30 100=") {
        assert!(Instant::now() < deadline, "{text:?}");
        let e = link.stream_msg(6, T);
        if e.kind == Kind::Data {
            text.push_str(&String::from_utf8_lossy(&e.body));
            link.send(Kind::Credit, 6, &(e.body.len() as u32).to_be_bytes());
        }
    }
    link.request(
        90,
        "terminal.resize",
        json!({"channel": 6, "cols": 132, "rows": 43}),
    );
    assert_eq!(
        link.response(90, T)["result"],
        json!({"cols": 132, "rows": 43})
    );
    link.request(
        91,
        "terminal.resize",
        json!({"channel": 77, "cols": 1, "rows": 1}),
    );
    assert_eq!(link.response(91, T)["error"]["code"], "bad_request");
    link.send(Kind::Data, 6, b"echo size=$(stty size)=; exit 0\n");
    let (out, close) = terminal_output(&mut link, 6, DEFAULT_WINDOW);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("size=43 132="), "{text:?}");
    assert_eq!(close["exit_code"], 0, "{close}");
    link.send(Kind::Close, 6, br#"{"ok":true}"#);

    // A reset kills the shell; so does the end of the session.
    let open = json!({"kind": "terminal", "window": DEFAULT_WINDOW});
    for channel in [4u32, 5] {
        link.send(Kind::Open, channel, open.to_string().as_bytes());
        assert_eq!(link.stream_msg(channel, T).kind, Kind::Accept);
        link.send(Kind::Data, channel, b"echo pid=$$\n");
    }
    let pid_of = |link: &mut Link, channel: u32| -> u32 {
        let mut text = String::new();
        let deadline = Instant::now() + T;
        loop {
            assert!(Instant::now() < deadline, "{text:?}");
            let e = link.stream_msg(channel, T);
            if e.kind == Kind::Data {
                text.push_str(&String::from_utf8_lossy(&e.body));
                link.send(Kind::Credit, channel, &(e.body.len() as u32).to_be_bytes());
            }
            if let Some(rest) = text.split("pid=").nth(2)
                && let Some(line) = rest.lines().next()
                && rest.contains('\n')
            {
                return line.trim().parse().unwrap();
            }
        }
    };
    let p4 = pid_of(&mut link, 4);
    let p5 = pid_of(&mut link, 5);
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    };
    assert!(alive(p4) && alive(p5));
    link.send(
        Kind::Reset,
        4,
        br#"{"error":{"code":"link_closed","message":"bye"}}"#,
    );
    let deadline = Instant::now() + T;
    while alive(p4) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(p4), "the shell of a reset stream is killed");
    assert!(alive(p5));
    assert_eq!(agent.stop(), RunOutcome::Stopped);
    let deadline = Instant::now() + T;
    while alive(p5) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(p5), "the session's end kills its shells");
}

#[test]
fn shadow_carries_bytes_both_ways_to_the_local_vnc_port() {
    // A TCP echo server stands in for VNC (one connection; then the port refuses).
    let port = peers::echo_server();
    let (_mock, _dir, agent, mut link) = setup("relay-6", move |s| {
        s.config.vnc_port = port;
    });
    let open = json!({"kind": "shadow", "window": 1024});
    link.send(Kind::Open, 1, open.to_string().as_bytes());
    assert_eq!(link.stream_msg(1, T).kind, Kind::Accept);
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    for piece in payload.chunks(10_000) {
        link.send(Kind::Data, 1, piece);
    }
    let mut back = Vec::new();
    let mut granted: u64 = 1024;
    while back.len() < payload.len() {
        let e = link.stream_msg(1, T);
        match e.kind {
            Kind::Data => {
                back.extend_from_slice(&e.body);
                assert!(back.len() as u64 <= granted, "within our credit");
                link.send(Kind::Credit, 1, &(e.body.len() as u32).to_be_bytes());
                granted += e.body.len() as u64;
            }
            Kind::Credit => {}
            other => panic!("{other:?} {}", String::from_utf8_lossy(&e.body)),
        }
    }
    assert!(back == payload, "echoed bytes differ");
    // Our close: the echo server sees EOF, closes, and the agent closes its side.
    link.send(Kind::Close, 1, br#"{"ok":true}"#);
    let e = link.expect("close", T, |e| e.channel == 1 && e.kind == Kind::Close);
    assert_eq!(e.json()["ok"], true);

    // Nothing listens any more: connect_failed.
    link.send(Kind::Open, 2, open.to_string().as_bytes());
    let e = link.stream_msg(2, T);
    assert_eq!(e.kind, Kind::Reset);
    assert_eq!(e.json()["error"]["code"], "connect_failed");
    assert_eq!(agent.stop(), RunOutcome::Stopped);
}

#[test]
fn move_to_an_unreachable_gateway_fails_and_stays_then_a_working_one_switches() {
    let pki = Pki::new();
    let mock = Mock::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let sd: PathBuf = dir.path().join("state");
    let state = registered(&sd, &mock, "relay-7", |_| {});
    let agent = Agent::spawn(state);
    let mut link = mock.session();

    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    link.request(1, "move", json!({"gateway": format!("localhost:{dead}")}));
    let v = link.response(1, T);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["code"], "move_failed");
    assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    // Still here, and agent.toml unchanged.
    link.request(2, "ping", json!({}));
    assert_eq!(link.response(2, T)["ok"], true);
    assert_eq!(
        AgentState::open(&sd).unwrap().config.connectors,
        vec![mock.connector()]
    );
    link.request(3, "move", json!({"gateway": "x", "fingerprint": "12"}));
    assert_eq!(link.response(3, T)["error"]["code"], "bad_request");

    // A gateway with another root, pinned by fingerprint, that does not know the device:
    // the TLS handshake fails; the agent stays.
    let other_pki = Pki::new();
    let other = Mock::start(&other_pki);
    let fp = Fingerprint::of(&other_pki.root_der()).hex();
    link.request(
        4,
        "move",
        json!({"gateway": other.connector().url(), "fingerprint": fp}),
    );
    let v = link.response(4, T);
    assert_eq!(v["error"]["code"], "move_failed", "{v}");
    // With a key it registers there first, then moves (new credential, new root trusted).
    link.request(
        5,
        "move",
        json!({"gateway": other.connector().url(), "fingerprint": fp, "key": "K2"}),
    );
    let v = link.response(5, T);
    assert_eq!(v, json!({"ok": true, "result": {"moved": true}}));
    let _proving = other.session(); // the session that proved the new gateway works
    // The agent reconnects to the new gateway.
    let deadline = Instant::now() + T;
    let mut ready = false;
    while Instant::now() < deadline && !ready {
        if let Ok(AgentEvent::Ready { connector, .. }) =
            agent.events.recv_timeout(Duration::from_millis(100))
        {
            ready = connector == other.connector();
        }
    }
    assert!(ready, "ready at the new gateway");
    // The proving session was closed; the next one is the agent's.
    let mut moved_link = other.session();
    moved_link.request(1, "ping", json!({}));
    assert_eq!(moved_link.response(1, T)["ok"], true);
    let config = AgentState::open(&sd).unwrap().config;
    assert_eq!(config.connectors, vec![other.connector(), mock.connector()]);
    assert!(
        config
            .extra_roots
            .contains(&Fingerprint::of(&other_pki.root_der()))
    );
    assert_eq!(agent.stop(), RunOutcome::Stopped);
}

#[test]
fn root_offer_adds_a_trusted_root() {
    let (_mock, dir, agent, mut link) = setup("relay-8", |_| {});
    let next = Pki::new();
    link.request(1, "root.offer", json!({"root": next.root_pem()}));
    let v = link.response(1, T);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["result"]["accepted"], true);
    let fp = Fingerprint::of(&next.root_der());
    assert_eq!(v["result"]["fingerprint"], fp.hex());
    let state = AgentState::open(dir.path().join("state")).unwrap();
    assert_eq!(state.config.extra_roots, vec![fp]);
    assert!(
        state
            .trusted_roots()
            .iter()
            .any(|c| Fingerprint::of(c) == fp)
    );
    // A leaf (not a CA) is refused.
    let leaf_pem = {
        let key = KeyPair::generate().unwrap();
        CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem()
    };
    link.request(2, "root.offer", json!({"root": leaf_pem}));
    assert_eq!(link.response(2, T)["error"]["code"], "bad_request");
    assert_eq!(agent.stop(), RunOutcome::Stopped);
}
