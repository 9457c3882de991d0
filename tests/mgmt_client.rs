//! The management client library against an in-process mock gateway (rustls + tungstenite
//! server speaking `docs/protocol.md` §6 on `/usg/management`): request/response correlation
//! under concurrency, a 20 MB push with slow credit (the client never exceeds the window),
//! priority of requests over bulk data, events and `device_down`, `device_offline`, stream
//! resets, echo streams with the client's own flow control, and the proxy path through a real
//! tinyproxy with Basic auth (a wrong password is a clear 407 error).
//!
//! The management certificate comes from the real `fleetgate mgmt add` code (management CA in
//! a temp data dir); the mock trusts that CA.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleetgate::client::{ClientError, ClientOptions, EventKind, ManagementClient, ProxyConfig};
use fleetgate::proto::envelope::{self, Header, Kind, ResponseBody, parse_credit};
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tungstenite::Message;

/// The mock's window for file streams (small, so the 20 MB push needs many credits).
const FILE_WINDOW: u32 = 64 * 1024;
/// Bytes the mock "device" consumes per tick of file data (slow credit).
const CONSUME_PER_TICK: u64 = 48 * 1024;

#[path = "common/mock_pki.rs"]
mod mock_pki;
#[path = "common/peers.rs"]
mod peers;
use peers::{hex, write_file};
#[path = "common/tinyproxy.rs"]
mod tinyproxy;
use mock_pki::Pki;
use tinyproxy::{free_port, tinyproxy};

struct Setup {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    root: PathBuf,
    server: Arc<ServerConfig>,
    dir: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // A mock gateway's root and server certificate (its device CA is not used here).
    let pki = Pki::new();
    std::fs::write(data.join("root.pem"), pki.root_pem()).unwrap();
    // The real `mgmt add`: management CA in the data dir, registry row, three files.
    let out = dir.path().join("mgmt");
    let added = fleetgate::cli::mgmt::add(&data, "ops", &out, 30, false).unwrap();
    let mgmt_ca = std::fs::read(data.join("mgmt-ca.pem")).unwrap();
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&mgmt_ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let server = Arc::new(
        ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![pki.leaf.clone(), pki.root_der()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.leaf_key.clone())),
            )
            .unwrap(),
    );
    Setup {
        cert: added.cert_path,
        key: added.key_path,
        root: added.root_path,
        server,
        dir: dir.path().to_owned(),
        _dir: dir,
    }
}

/// What the mock saw, for assertions.
#[derive(Default)]
struct Seen {
    /// Largest (data received − credit granted) over any file stream; must stay ≤ 0.
    max_overdraft: i64,
    /// Largest bytes in flight on a file stream (received, not yet credited back).
    max_in_flight: u64,
    /// Files received: (path, size, sha256 hex).
    files: Vec<(String, u64, String)>,
    /// Management connections accepted.
    connections: usize,
}

struct Mock {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    conns: Arc<Mutex<Vec<Sender<Vec<u8>>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Mock {
    fn start(config: Arc<ServerConfig>) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let conns: Arc<Mutex<Vec<Sender<Vec<u8>>>>> = Arc::default();
        let (s2, seen2, conns2) = (stop.clone(), seen.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            let mut threads = Vec::new();
            while !s2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        tcp.set_nonblocking(false).unwrap();
                        let (tx, rx) = channel();
                        conns2.lock().unwrap().push(tx);
                        let (c, seen, stop) = (config.clone(), seen2.clone(), s2.clone());
                        threads.push(std::thread::spawn(move || {
                            let _ = serve(tcp, c, &seen, rx, &stop);
                        }));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            for t in threads {
                let _ = t.join();
            }
        });
        Mock {
            addr,
            stop,
            seen,
            conns,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("wss://localhost:{}", self.addr.port())
    }

    /// Sends an event (from `unit`) to every management connection.
    fn event(&self, unit: &str, body: Value) {
        let frame = frame(Kind::Event, 0, unit, body.to_string().as_bytes());
        self.conns
            .lock()
            .unwrap()
            .retain(|c| c.send(frame.clone()).is_ok());
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

fn frame(kind: Kind, channel: u32, unit: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    envelope::write(
        &mut out,
        &Header {
            kind,
            channel,
            route: 0,
            unit,
        },
        body,
    );
    out
}

/// A stream as the mock device sees it.
struct MockStream {
    unit: String,
    kind: String,
    // file
    path: String,
    size: u64,
    sha256: String,
    hasher: Sha256,
    received: u64,
    granted: u64,
    unconsumed: u64,
    consumed_since_grant: u64,
    // echo
    echo: VecDeque<u8>,
    send_credit: u64,
    client_closed: bool,
}

type Ws = tungstenite::WebSocket<StreamOwned<ServerConnection, TcpStream>>;

fn serve(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    seen: &Mutex<Seen>,
    events: Receiver<Vec<u8>>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let tls = StreamOwned::new(ServerConnection::new(config)?, tcp);
    let mut ws: Ws = tungstenite::accept(tls).map_err(|e| anyhow::anyhow!("accept: {e}"))?;
    seen.lock().unwrap().connections += 1;
    ws.send(Message::text(
        json!({"type":"hello","protocol":1,"mode":"management","gateway":"mock/1","name":"ops"})
            .to_string(),
    ))?;
    ws.get_ref()
        .sock
        .set_read_timeout(Some(Duration::from_millis(2)))?;
    let mut delayed: Vec<(Instant, Vec<u8>)> = Vec::new();
    let mut streams: HashMap<u32, MockStream> = HashMap::new();
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        while let Ok(f) = events.try_recv() {
            ws.send(Message::binary(f))?;
        }
        match ws.read() {
            Ok(Message::Binary(b)) => handle(&mut ws, &b, &mut delayed, &mut streams, seen)?,
            Ok(Message::Close(_)) => {}
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let now = Instant::now();
        let mut i = 0;
        while i < delayed.len() {
            if delayed[i].0 <= now {
                let (_, f) = delayed.swap_remove(i);
                ws.write(Message::binary(f))?;
            } else {
                i += 1;
            }
        }
        if now.duration_since(last_tick) >= Duration::from_millis(2) {
            last_tick = now;
            tick(&mut ws, &mut streams)?;
        }
        ws.flush()?;
    }
    Ok(())
}

fn respond(unit: &str, id: u32, r: &ResponseBody) -> Vec<u8> {
    frame(Kind::Response, id, unit, &r.to_vec())
}

fn handle(
    ws: &mut Ws,
    msg: &[u8],
    delayed: &mut Vec<(Instant, Vec<u8>)>,
    streams: &mut HashMap<u32, MockStream>,
    seen: &Mutex<Seen>,
) -> anyhow::Result<()> {
    let (h, n) = Header::parse(msg)?;
    assert_eq!(h.route, 0, "management servers send route 0");
    let body = &msg[n..];
    let unit = h.unit.to_owned();
    let id = h.channel;
    let online = ["DEV1", "DEV2", "DEV3"].contains(&unit.as_str());
    match h.kind {
        Kind::Request => {
            let req: envelope::RequestBody = serde_json::from_slice(body)?;
            let answer = match (unit.as_str(), req.method.as_str()) {
                ("", "status") => Some(ResponseBody::ok(
                    json!({"status":"ok","devices":3,"management":1,"registrations":0,"max_devices":0}),
                )),
                ("", "devices.list") => Some(ResponseBody::ok(json!({"devices": [
                    {"unit_id":"DEV1","state":"active","connected":true,"since":1750000000,"address":"192.0.2.1"}
                ]}))),
                ("", m) => Some(ResponseBody::err(
                    "unknown_method",
                    format!("no method {m}"),
                )),
                (_, _) if !online => Some(ResponseBody::err(
                    "device_offline",
                    format!("{unit} is not connected"),
                )),
                (_, "never") => None,
                (_, "ping") => Some(ResponseBody::ok(json!({"pong": true, "time": 1}))),
                (_, "echo") => {
                    let delay = req.params["delay_ms"].as_u64().unwrap_or(0);
                    let f = respond(&unit, id, &ResponseBody::ok(req.params.clone()));
                    delayed.push((Instant::now() + Duration::from_millis(delay), f));
                    None
                }
                (_, m) => Some(ResponseBody::err(
                    "unknown_method",
                    format!("no method {m}"),
                )),
            };
            if let Some(a) = answer {
                ws.write(Message::binary(respond(&unit, id, &a)))?;
            }
        }
        Kind::Open => {
            let open: Value = serde_json::from_slice(body)?;
            let kind = open["kind"].as_str().unwrap_or("").to_owned();
            let path = open["path"].as_str().unwrap_or("").to_owned();
            if path.contains("..") || !online {
                let r = if online {
                    json!({"error":{"code":"not_allowed","message":"outside the directory"}})
                } else {
                    json!({"error":{"code":"device_offline","message":"not connected"}})
                };
                ws.write(Message::binary(frame(
                    Kind::Reset,
                    id,
                    &unit,
                    r.to_string().as_bytes(),
                )))?;
                return Ok(());
            }
            let window = if kind == "file" {
                FILE_WINDOW
            } else {
                64 * 1024
            };
            streams.insert(
                id,
                MockStream {
                    unit: unit.clone(),
                    kind,
                    path,
                    size: open["size"].as_u64().unwrap_or(0),
                    sha256: open["sha256"].as_str().unwrap_or("").to_owned(),
                    hasher: Sha256::new(),
                    received: 0,
                    granted: u64::from(window),
                    unconsumed: 0,
                    consumed_since_grant: 0,
                    echo: VecDeque::new(),
                    send_credit: open["window"].as_u64().unwrap(),
                    client_closed: false,
                },
            );
            ws.write(Message::binary(frame(
                Kind::Accept,
                id,
                &unit,
                json!({"window": window}).to_string().as_bytes(),
            )))?;
        }
        Kind::Data => {
            let s = streams.get_mut(&id).expect("data on an open stream");
            assert!(body.len() <= 16 * 1024, "pieces of at most 16 KiB");
            s.received += body.len() as u64;
            let mut g = seen.lock().unwrap();
            g.max_overdraft = g.max_overdraft.max(s.received as i64 - s.granted as i64);
            if s.kind == "file" {
                s.hasher.update(body);
                s.unconsumed += body.len() as u64;
                g.max_in_flight = g.max_in_flight.max(s.unconsumed + s.consumed_since_grant);
            } else {
                s.echo.extend(body);
                // An echo device consumes at once.
                s.granted += body.len() as u64;
                ws.write(Message::binary(frame(
                    Kind::Credit,
                    id,
                    &unit,
                    &(body.len() as u32).to_be_bytes(),
                )))?;
            }
        }
        Kind::Credit => {
            if let Some(s) = streams.get_mut(&id) {
                s.send_credit += u64::from(parse_credit(body)?);
            }
        }
        Kind::Close => {
            let Some(s) = streams.get_mut(&id) else {
                return Ok(());
            };
            s.client_closed = true;
            if s.kind == "file" {
                let s = streams.remove(&id).unwrap();
                let sha = hex(&s.hasher.finalize());
                seen.lock()
                    .unwrap()
                    .files
                    .push((s.path.clone(), s.received, sha.clone()));
                let body = if s.received == s.size && sha == s.sha256 {
                    (
                        Kind::Close,
                        json!({"ok": true, "size": s.received, "sha256": sha}),
                    )
                } else {
                    (
                        Kind::Reset,
                        json!({"error":{"code":"checksum_mismatch","message":"size or sha256 differ"}}),
                    )
                };
                ws.write(Message::binary(frame(
                    body.0,
                    id,
                    &s.unit,
                    body.1.to_string().as_bytes(),
                )))?;
            }
        }
        Kind::Reset => {
            streams.remove(&id);
        }
        other => panic!("unexpected {other:?} from the management client"),
    }
    Ok(())
}

/// Slow consumption of file data (credit back when half the window is consumed); echo data
/// back within the client's credit; finish echo streams.
fn tick(ws: &mut Ws, streams: &mut HashMap<u32, MockStream>) -> anyhow::Result<()> {
    let mut done = Vec::new();
    for (&id, s) in streams.iter_mut() {
        if s.kind == "file" {
            let n = s.unconsumed.min(CONSUME_PER_TICK);
            s.unconsumed -= n;
            s.consumed_since_grant += n;
            if s.consumed_since_grant >= u64::from(FILE_WINDOW / 2) {
                let g = s.consumed_since_grant;
                s.consumed_since_grant = 0;
                s.granted += g;
                ws.write(Message::binary(frame(
                    Kind::Credit,
                    id,
                    &s.unit,
                    &(g as u32).to_be_bytes(),
                )))?;
            }
        } else {
            while !s.echo.is_empty() && s.send_credit > 0 {
                let n = s.echo.len().min(16 * 1024).min(s.send_credit as usize);
                let piece: Vec<u8> = s.echo.drain(..n).collect();
                s.send_credit -= n as u64;
                ws.write(Message::binary(frame(Kind::Data, id, &s.unit, &piece)))?;
            }
            if s.client_closed && s.echo.is_empty() {
                ws.write(Message::binary(frame(
                    Kind::Close,
                    id,
                    &s.unit,
                    json!({"ok": true, "exit_code": 0}).to_string().as_bytes(),
                )))?;
                done.push(id);
            }
        }
    }
    for id in done {
        streams.remove(&id);
    }
    Ok(())
}

fn options(s: &Setup, url: &str) -> ClientOptions {
    let mut o = ClientOptions::new(url, &s.cert, &s.key);
    o.ca = Some(s.root.clone());
    o.connect_timeout = Duration::from_secs(5);
    o
}

const T: Duration = Duration::from_secs(10);

#[test]
fn hello_gateway_methods_and_device_offline() {
    let s = setup();
    let mock = Mock::start(s.server.clone());
    let c = ManagementClient::connect(options(&s, &mock.url())).unwrap();
    assert_eq!(c.hello().mode, "management");
    assert_eq!(c.hello().name, "ops");
    let st = c.request(None, "status", json!({}), T).unwrap();
    assert_eq!(st["status"], "ok");
    let d = c.request(None, "devices.list", json!({}), T).unwrap();
    assert_eq!(d["devices"][0]["unit_id"], "DEV1");
    let e = c.request(Some("GONE"), "ping", json!({}), T).unwrap_err();
    assert_eq!(e.code(), Some("device_offline"), "{e}");
    let e = c.request(Some("DEV1"), "nope", json!({}), T).unwrap_err();
    assert_eq!(e.code(), Some("unknown_method"));
    let e = c
        .request(Some("DEV1"), "never", json!({}), Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)), "{e}");
    // The connection still works after a timeout.
    assert_eq!(
        c.request(Some("DEV1"), "ping", json!({}), T).unwrap()["pong"],
        true
    );
    c.close();
}

#[test]
fn concurrent_requests_are_correlated_by_id() {
    let s = setup();
    let mock = Mock::start(s.server.clone());
    let c = Arc::new(ManagementClient::connect(options(&s, &mock.url())).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..25u64 {
                    // Answers come back out of order: later requests often answer first.
                    let delay = (t * 7 + i * 13) % 23;
                    let unit = ["DEV1", "DEV2", "DEV3"][(i % 3) as usize];
                    let p = json!({"thread": t, "i": i, "delay_ms": delay, "unit": unit});
                    let r = c.request(Some(unit), "echo", p.clone(), T).unwrap();
                    assert_eq!(r, p);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_20_mb_push_with_slow_credit_stays_within_the_window_and_requests_overtake_it() {
    let s = setup();
    let mock = Mock::start(s.server.clone());
    let c = Arc::new(ManagementClient::connect(options(&s, &mock.url())).unwrap());
    let file = s.dir.join("big.bin");
    let len = 20 * 1024 * 1024;
    let sha = write_file(&file, len);
    let pushing = Arc::new(AtomicBool::new(true));
    let last = Arc::new(AtomicU64::new(0));
    // Requests during the push: control goes ahead of bulk data.
    let (c2, p2) = (c.clone(), pushing.clone());
    let pinger = std::thread::spawn(move || {
        let mut worst = Duration::ZERO;
        let mut n = 0;
        while p2.load(Ordering::SeqCst) {
            let t0 = Instant::now();
            c2.request(Some("DEV1"), "ping", json!({}), T).unwrap();
            worst = worst.max(t0.elapsed());
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        (n, worst)
    });
    let t0 = Instant::now();
    let l2 = last.clone();
    let r = c
        .push_file("DEV1", &file, "firmware/next.bin", move |sent, total| {
            assert_eq!(total, len as u64);
            assert!(sent >= l2.load(Ordering::SeqCst), "progress goes forward");
            l2.store(sent, Ordering::SeqCst);
        })
        .unwrap();
    let took = t0.elapsed();
    pushing.store(false, Ordering::SeqCst);
    let (pings, worst) = pinger.join().unwrap();
    assert_eq!(last.load(Ordering::SeqCst), len as u64);
    assert_eq!(r.size, len as u64);
    assert_eq!(r.sha256, sha);
    assert_eq!(r.remote["sha256"], sha.as_str());
    assert_eq!(r.remote["ok"], true);
    let seen = mock.seen.lock().unwrap();
    assert_eq!(
        seen.files,
        vec![("firmware/next.bin".to_owned(), len as u64, sha.clone())]
    );
    assert!(
        seen.max_overdraft <= 0,
        "the client sent {} bytes beyond the credit",
        seen.max_overdraft
    );
    assert!(seen.max_in_flight <= u64::from(FILE_WINDOW));
    eprintln!(
        "20 MB in {took:?}; max in flight {} B (window {FILE_WINDOW}); {pings} pings during \
         the push, slowest {worst:?}",
        seen.max_in_flight
    );
    assert!(pings > 3);
    assert!(
        worst < Duration::from_secs(1),
        "a request waited {worst:?} behind bulk data"
    );
}

#[test]
fn events_reach_subscribers_and_device_down_fails_pending_work() {
    let s = setup();
    let mock = Mock::start(s.server.clone());
    let c = Arc::new(ManagementClient::connect(options(&s, &mock.url())).unwrap());
    let events = c.events();
    // A pending request and an open stream on DEV2.
    let c2 = c.clone();
    let pending = std::thread::spawn(move || c2.request(Some("DEV2"), "never", json!({}), T));
    let stream = c.open_stream("DEV2", "shadow", json!({}), T).unwrap();
    let (mut reader, _writer) = stream.split();
    // And one on DEV1 that must survive.
    let c3 = c.clone();
    let other =
        std::thread::spawn(move || c3.request(Some("DEV1"), "echo", json!({"delay_ms": 400}), T));
    std::thread::sleep(Duration::from_millis(150));
    mock.event(
        "DEV3",
        json!({"event": "device_up", "address": "192.0.2.3"}),
    );
    let ev = events.recv_timeout(T).unwrap();
    assert_eq!(ev.kind, EventKind::DeviceUp);
    assert_eq!(ev.unit, "DEV3");
    assert_eq!(ev.body["address"], "192.0.2.3");
    let t0 = Instant::now();
    mock.event("DEV2", json!({"event": "device_down"}));
    let e = pending.join().unwrap().unwrap_err();
    assert!(
        matches!(&e, ClientError::DeviceDown(u) if u == "DEV2"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
    let e = reader.read(&mut [0u8; 16]).unwrap_err();
    assert!(matches!(e, ClientError::DeviceDown(_)), "{e}");
    assert_eq!(events.recv_timeout(T).unwrap().kind, EventKind::DeviceDown);
    assert!(other.join().unwrap().is_ok());
    for (name, kind) in [
        ("device_registered", EventKind::DeviceRegistered),
        ("device_removed", EventKind::DeviceRemoved),
        ("custom", EventKind::Other("custom".into())),
    ] {
        mock.event("DEV1", json!({"event": name}));
        assert_eq!(events.recv_timeout(T).unwrap().kind, kind);
    }
}

#[test]
fn echo_stream_both_ways_with_the_clients_window_and_a_reset_stream() {
    let s = setup();
    let mock = Mock::start(s.server.clone());
    let mut o = options(&s, &mock.url());
    o.window = 32 * 1024; // the mock may send at most this much before we grant credit
    let c = ManagementClient::connect(o).unwrap();
    let stream = c.open_stream("DEV1", "shadow", json!({}), T).unwrap();
    assert_eq!(stream.accept()["window"], 64 * 1024);
    let (mut reader, mut writer) = stream.split();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let d2 = data.clone();
    let w = std::thread::spawn(move || {
        writer.write_all(&d2).unwrap();
        writer.close(json!({"ok": true})).unwrap();
    });
    let mut back = Vec::new();
    let mut buf = [0u8; 7000];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    w.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data);
    assert_eq!(reader.close_body().unwrap()["exit_code"], 0);
    // A refused stream.
    let file = s.dir.join("small.bin");
    write_file(&file, 1000);
    let e = c
        .push_file("DEV1", &file, "../etc/passwd", |_, _| {})
        .unwrap_err();
    assert_eq!(e.code(), Some("not_allowed"), "{e}");
    let e = c.open_stream("GONE", "shadow", json!({}), T).unwrap_err();
    assert_eq!(e.code(), Some("device_offline"), "{e}");
}

#[test]
fn a_certificate_from_another_ca_is_refused_by_tls() {
    let s = setup();
    let mock = Mock::start(s.server.clone());
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "intruder");
    let cert = p.self_signed(&key).unwrap();
    std::fs::write(s.dir.join("x.pem"), cert.pem()).unwrap();
    std::fs::write(s.dir.join("x.key"), key.serialize_pem()).unwrap();
    let mut o = options(&s, &mock.url());
    o.cert = s.dir.join("x.pem");
    o.key = s.dir.join("x.key");
    let e = ManagementClient::connect(o).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Tls { .. } | ClientError::Connect { .. } | ClientError::Closed(_)
        ),
        "{e}"
    );
    // And a gateway we do not trust: our root is not its root.
    let mut o = options(&s, &mock.url());
    o.ca = Some(s.cert.clone());
    let e = ManagementClient::connect(o).unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e}");
}

#[test]
fn through_a_real_http_proxy_with_basic_auth() {
    let s = setup();
    let mock = Mock::start(s.server.clone());
    let proxy = tinyproxy(&s.dir, mock.addr.port());
    let url = format!("wss://127.0.0.1:{}", mock.addr.port());
    let with = |user: Option<&str>, pass: Option<&str>| {
        let mut o = options(&s, &url);
        o.proxy = Some(ProxyConfig {
            url: format!("http://127.0.0.1:{}", proxy.port),
            username: user.map(Into::into),
            password: pass.map(Into::into),
        });
        o
    };
    let c = ManagementClient::connect(with(Some("user"), Some("pass"))).unwrap();
    assert_eq!(
        c.request(Some("DEV1"), "ping", json!({}), T).unwrap()["pong"],
        true
    );
    let file = s.dir.join("p.bin");
    let sha = write_file(&file, 2 * 1024 * 1024);
    assert_eq!(
        c.push_file("DEV1", &file, "p.bin", |_, _| {})
            .unwrap()
            .sha256,
        sha
    );
    c.close();
    // Credentials in the URL work too.
    let mut o = options(&s, &url);
    o.proxy = Some(ProxyConfig {
        url: format!("http://user:pass@127.0.0.1:{}", proxy.port),
        username: None,
        password: None,
    });
    ManagementClient::connect(o).unwrap().close();
    // Wrong password: 407 (tinyproxy 1.11 says 401 to CONNECT), said clearly.
    let e = ManagementClient::connect(with(Some("user"), Some("wrong"))).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::ProxyAuth {
                sent_credentials: true,
                status: 401 | 407,
                ..
            }
        ),
        "{e}"
    );
    let text = e.to_string();
    assert!(text.contains("wrong user name or password"), "{text}");
    eprintln!("wrong password: {text}");
    // No credentials at all.
    let e = ManagementClient::connect(with(None, None)).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::ProxyAuth {
                sent_credentials: false,
                ..
            }
        ),
        "{e}"
    );
    // A port the proxy does not tunnel to: a clear refusal with the status.
    let mut o = with(Some("user"), Some("pass"));
    o.url = "wss://127.0.0.1:1".into();
    let e = ManagementClient::connect(o).unwrap_err();
    assert!(matches!(e, ClientError::Proxy { status: 403, .. }), "{e}");
    assert_eq!(mock.seen.lock().unwrap().connections, 2);
}

// ---- the command line ----

fn fleetgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(args)
        .env_remove("FLEETGATE_DATA_DIR")
        .env_remove("FLEETGATE_CONFIG")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn mgmt_add_list_revoke_on_the_command_line() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = setup(); // data dir with root.pem and management client "ops"
    let data = s.dir.join("data");
    let d = data.to_str().unwrap();
    let out = s.dir.join("certs");
    let o = out.to_str().unwrap();
    let r = fleetgate(&["mgmt", "add", "backup", "--out", o, "--data-dir", d]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(text(&r.stdout).contains("management client backup added"));
    let mode = std::fs::metadata(out.join("backup.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read(out.join("gateway-root.pem")).unwrap(),
        std::fs::read(data.join("root.pem")).unwrap()
    );
    // In use: refused with exit 2, files untouched.
    let r = fleetgate(&[
        "mgmt",
        "add",
        "backup",
        "--out",
        o,
        "--data-dir",
        d,
        "--force",
    ]);
    assert_eq!(r.status.code(), Some(2), "{}", text(&r.stderr));
    assert!(text(&r.stderr).contains("already exists"));
    let r = fleetgate(&["mgmt", "list", "--json", "--data-dir", d]);
    let list: Value = serde_json::from_slice(&r.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ops", "backup"]);
    assert_eq!(list[1]["state"], "active");
    let r = fleetgate(&["mgmt", "revoke", "backup", "--data-dir", d]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let r = fleetgate(&["mgmt", "revoke", "backup", "--data-dir", d]);
    assert_eq!(r.status.code(), Some(2));
    let r = fleetgate(&["mgmt", "list", "--data-dir", d]);
    let t = text(&r.stdout);
    assert!(
        t.lines()
            .any(|l| l.starts_with("backup") && l.contains("revoked")),
        "{t}"
    );
    // The revocation list the running gateway polls names it.
    let reg = fleetgate::registry::Registry::open_in(&data).unwrap();
    let revoked = reg
        .revoked_credentials(fleetgate::registry::unix_now())
        .unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(
        (revoked[0].1.as_str(), revoked[0].2.as_str()),
        ("backup", "management")
    );
    // The name can be issued again.
    let r = fleetgate(&[
        "mgmt",
        "add",
        "backup",
        "--out",
        o,
        "--data-dir",
        d,
        "--force",
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
}

#[test]
fn console_commands_against_the_mock() {
    let s = setup();
    let mock = Mock::start(s.server.clone());
    let url = mock.url();
    let common = [
        "console",
        "--gateway",
        url.as_str(),
        "--cert",
        s.cert.to_str().unwrap(),
        "--key",
        s.key.to_str().unwrap(),
        "--ca",
        s.root.to_str().unwrap(),
    ];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = common.to_vec();
        a.extend_from_slice(extra);
        fleetgate(&a)
    };
    let r = run(&["devices"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let t = text(&r.stdout);
    assert!(
        t.contains("UNIT") && t.contains("DEV1") && t.contains("192.0.2.1"),
        "{t}"
    );
    let r = run(&["--json", "send", "DEV1", "ping"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let v: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["pong"], true);
    let r = run(&["send", "DEV1", r#"{"method":"echo","params":{"x":1}}"#]);
    assert!(text(&r.stdout).contains("\"x\": 1"), "{}", text(&r.stdout));
    let r = run(&["send", "GONE", "ping"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        text(&r.stderr).contains("device_offline"),
        "{}",
        text(&r.stderr)
    );
    let r = run(&["status"]);
    assert!(
        text(&r.stdout).contains("status        ok"),
        "{}",
        text(&r.stdout)
    );
    let file = s.dir.join("c.bin");
    let sha = write_file(&file, 300_000);
    let r = run(&["--json", "push", "DEV1", file.to_str().unwrap(), "c.bin"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let v: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["sha256"], sha.as_str());
    assert_eq!(v["device"]["ok"], true);
    // Shadow: a local listener; each connection is one stream (the mock echoes).
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut a: Vec<&str> = common.to_vec();
    a.extend_from_slice(&["shadow", "DEV1", "--listen", &listen]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tcp = loop {
        match TcpStream::connect(&listen) {
            Ok(t) => break t,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("shadow listener: {e}"),
        }
    };
    tcp.set_read_timeout(Some(T)).unwrap();
    tcp.write_all(b"RFB 003.008\n").unwrap();
    let mut got = [0u8; 12];
    std::io::Read::read_exact(&mut tcp, &mut got).unwrap();
    assert_eq!(&got, b"RFB 003.008\n");
    drop(tcp);
    let _ = child.kill();
    let _ = child.wait();
    // Help texts.
    let r = fleetgate(&["console", "--help"]);
    let t = text(&r.stdout);
    for cmd in [
        "devices", "send", "terminal", "shadow", "push", "move", "remove", "limit", "keys",
        "status", "events",
    ] {
        assert!(t.contains(cmd), "console --help lacks {cmd}: {t}");
    }
}
