//! The relay end to end with all three real parts at once (docs/protocol.md §6): the real
//! gateway (`fleetgate serve`, io_uring with 2 shards, and epoll), real device agents
//! (`fleetgate::agent` in-process: `register` with a key from `fleetgate keys create`, then
//! `run`), and the real management client library (`fleetgate::client`) with a certificate
//! from `fleetgate mgmt add`, all over real TLS on loopback.
//!
//! Requests (`ping`, `info`, `devices.list`), a 20 MB file push with pings overtaking it, a
//! terminal on a PTY, shadowing to a local TCP echo server standing in for VNC, events and
//! answers with two management links, devices on both shards, `management_down` killing an
//! idle shell (§6.5), and the proxy path through a real tinyproxy with Basic auth.
//!
//! Each agent's shard is read from `/metrics` as it connects, so the stream tests pick a
//! device on the other shard than the management link: every stream crosses the shard mesh.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::peers::{alive, echo_server, hex, write_file};
use common::tinyproxy::tinyproxy;
use common::{Gateway, per_shard};
use fleetgate::agent::{
    AgentError, AgentEvent, AgentOptions, AgentState, Connector, RegisterRequest, RunOutcome,
    StopHandle, fetch_fingerprint, register, run,
};
use fleetgate::client::{
    ClientError, ClientOptions, Event, EventKind, ManagementClient, ProxyConfig, StreamReader,
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The bound of every single wait.
const T: Duration = Duration::from_secs(10);
/// Agents added at most while looking for one on a given shard.
const MAX_AGENTS: usize = 24;

// ---------------------------------------------------------------------------------------------
// The fleet: one gateway, its management certificate, and agents.

/// Runs `fleetgate ARGS --data-dir DIR` and returns its stdout (panics on failure).
fn fleetgate(data_dir: &Path, args: &[&str]) -> String {
    let (ok, out, err) = common::run(
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(args)
            .arg("--data-dir")
            .arg(data_dir),
    );
    assert!(ok, "fleetgate {args:?}: {out}{err}");
    out
}

/// A running agent (its `run` loop on a thread).
struct Agent {
    unit: String,
    /// The gateway shard its session is on.
    shard: usize,
    inbox: PathBuf,
    stop: StopHandle,
    events: Receiver<AgentEvent>,
    thread: Option<JoinHandle<Result<RunOutcome, AgentError>>>,
}

impl Agent {
    /// Disconnections the agent reported since the last call.
    fn disconnects(&self) -> Vec<String> {
        self.events
            .try_iter()
            .filter_map(|e| match e {
                AgentEvent::Disconnected { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
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

struct Fleet {
    // Dropped in this order: agents first, then the gateway.
    agents: Vec<Agent>,
    /// `fleetgate mgmt add ops` output: ops.pem, ops.key, gateway-root.pem.
    mgmt: PathBuf,
    /// A mass key for every agent.
    key: String,
    /// The `vnc_port` of agents added from now on.
    vnc_port: u16,
    /// Devices per shard after the last agent connected.
    counts: Vec<u64>,
    tmp: tempfile::TempDir,
    gw: Gateway,
}

impl Fleet {
    /// A gateway with 2 shards on `driver`, a mass key and the management certificate `ops`.
    fn start(driver: &str) -> Fleet {
        let gw = Gateway::start(driver, None, &["--shards", "2"]);
        let key = fleetgate(&gw.data_dir(), &["keys", "create", "--mass"])
            .trim()
            .to_owned();
        let tmp = tempfile::tempdir().unwrap();
        let mgmt = tmp.path().join("mgmt");
        let out = fleetgate(
            &gw.data_dir(),
            &["mgmt", "add", "ops", "--out", mgmt.to_str().unwrap()],
        );
        assert!(out.contains("ops"), "{out}");
        Fleet {
            agents: Vec::new(),
            mgmt,
            key,
            vnc_port: fleetgate::agent::state::DEFAULT_VNC_PORT,
            counts: vec![0, 0],
            tmp,
            gw,
        }
    }

    fn options(&self) -> ClientOptions {
        let mut o = ClientOptions::new(
            format!("wss://127.0.0.1:{}", self.gw.port()),
            self.mgmt.join("ops.pem"),
            self.mgmt.join("ops.key"),
        );
        o.ca = Some(self.mgmt.join("gateway-root.pem"));
        o.connect_timeout = Duration::from_secs(5);
        o
    }

    /// A management link; returns it and the shard it is on (the only link at that moment).
    fn connect_only(&self) -> (ManagementClient, usize) {
        let c = ManagementClient::connect(self.options()).expect("management connect");
        assert_eq!(c.hello().mode, "management");
        assert_eq!(c.hello().name, "ops");
        let per = wait_metric(&self.gw, "fleetgate_management_connected", 1);
        let shard = per.iter().position(|&n| n == 1).unwrap();
        (c, shard)
    }

    /// Registers and runs agent `unit` (receive dir, `/bin/sh`, the fleet's `vnc_port`), waits
    /// for its "connection ready" and finds its shard.
    fn add_agent(&mut self, unit: &str) -> &Agent {
        let options = AgentOptions::fast();
        let connector = Connector::parse(&self.gw.addr.to_string()).unwrap();
        let dir = self.tmp.path().join(unit);
        let inbox = dir.join("inbox");
        let mut state = AgentState::open(dir.join("state")).unwrap();
        let contact = fetch_fingerprint(&connector, &options).expect("fingerprint");
        state.adopt(&contact).unwrap();
        state.config.unit_id = Some(unit.into());
        state.config.connectors = vec![connector.clone()];
        state.save().unwrap();
        let req = RegisterRequest {
            connector,
            unit_id: unit.into(),
            key: self.key.clone(),
        };
        register(&mut state, &req, &options, &StopHandle::new()).expect("registered");
        state.config.receive_dir = Some(inbox.clone());
        state.config.shell = Some("/bin/sh".into());
        state.config.vnc_port = self.vnc_port;
        state.save().unwrap();

        let stop = StopHandle::new();
        let (tx, events) = channel();
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            run(&mut state, &AgentOptions::fast(), &s2, &mut |e| {
                let _ = tx.send(e);
            })
        });
        let deadline = Instant::now() + T;
        loop {
            match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(AgentEvent::Ready { unit_id, .. }) => {
                    assert_eq!(unit_id, unit);
                    break;
                }
                Ok(_) => {}
                Err(_) => panic!("agent {unit}: not ready within {T:?}"),
            }
        }
        let total: u64 = self.counts.iter().sum::<u64>() + 1;
        let now = wait_metric(&self.gw, "fleetgate_devices_connected", total);
        let shard = (0..now.len())
            .find(|&i| now[i] > self.counts.get(i).copied().unwrap_or(0))
            .unwrap();
        self.counts = now;
        self.agents.push(Agent {
            unit: unit.to_owned(),
            shard,
            inbox,
            stop,
            events,
            thread: Some(thread),
        });
        self.agents.last().unwrap()
    }

    /// Adds agents `PREFIX-n` until one is on a shard other than `shard`; returns its index.
    fn add_agent_off(&mut self, prefix: &str, shard: usize) -> usize {
        for n in 0..MAX_AGENTS {
            if self.add_agent(&format!("{prefix}-{n}")).shard != shard {
                return self.agents.len() - 1;
            }
        }
        panic!("{MAX_AGENTS} agents, all on shard {shard}");
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Stop them all at once; each Agent's drop then only joins.
        for a in &self.agents {
            a.stop.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// `GET /metrics` over TLS.
fn metrics(gw: &Gateway) -> String {
    let mut s = gw.tls();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    String::from_utf8_lossy(&common::read_all(&mut s)).into_owned()
}

/// Waits until the per-shard metric `name` sums to `total`; returns it by shard.
fn wait_metric(gw: &Gateway, name: &str, total: u64) -> Vec<u64> {
    let deadline = Instant::now() + T;
    loop {
        let text = metrics(gw);
        let per = per_shard(&text, name);
        if per.iter().sum::<u64>() == total {
            assert_eq!(per.len(), 2, "two shards:\n{text}");
            return per;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never summed to {total}: {per:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ping(c: &ManagementClient, unit: &str) -> Value {
    c.request(Some(unit), "ping", json!({}), T)
        .unwrap_or_else(|e| panic!("ping {unit}: {e}"))
}

fn info(c: &ManagementClient, unit: &str) -> Value {
    c.request(Some(unit), "info", json!({}), T)
        .unwrap_or_else(|e| panic!("info {unit}: {e}"))
}

/// The next event of `kind` from `unit` (others are skipped).
fn wait_event(rx: &Receiver<Event>, kind: EventKind, unit: &str) -> Event {
    let deadline = Instant::now() + T;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(e) if e.kind == kind && e.unit.eq_ignore_ascii_case(unit) => return e,
            Ok(_) => {}
            Err(_) => panic!("no {kind:?} for {unit} within {T:?}"),
        }
    }
}

/// Reads a stream until `done(bytes so far)` holds or the device closes (`Ok(0)`); panics
/// after `T` or on an error.
fn read_until(r: &mut StreamReader, out: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) {
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 16 * 1024];
    while !done(out) {
        let left = deadline.saturating_duration_since(Instant::now());
        match r.read_timeout(&mut buf, left) {
            Ok(0) => return,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{e}; so far {:?}", String::from_utf8_lossy(out)),
        }
    }
}

/// The number between `before` and `after` in `text` (skips the PTY's echo of the command,
/// where a shell expression stands instead).
fn number_between(text: &str, before: &str, after: &str) -> Option<u32> {
    text.match_indices(before).find_map(|(i, _)| {
        let rest = &text[i + before.len()..];
        let end = rest.find(after)?;
        rest[..end].parse().ok()
    })
}

// ---------------------------------------------------------------------------------------------
// Tests.

fn command_round_trip(driver: &str) {
    let mut fleet = Fleet::start(driver);
    let units = ["E2E-A", "E2E-B", "E2E-C"];
    for u in units {
        fleet.add_agent(u);
    }
    let c = ManagementClient::connect(fleet.options()).expect("management connect");
    for u in units {
        let p = ping(&c, u);
        assert_eq!(p["pong"], true, "{p}");
        assert!(p["time"].as_u64().unwrap() > 1_600_000_000, "{p}");
        let i = info(&c, u);
        assert_eq!(i["unit_id"], u, "{i}");
        assert!(
            i["agent"].as_str().unwrap().starts_with("fleetgate-agent/"),
            "{i}"
        );
        // The unit ID is matched without regard to case.
        assert_eq!(info(&c, &u.to_ascii_lowercase())["unit_id"], u);
    }
    let list = c.request(None, "devices.list", json!({}), T).unwrap();
    for u in units {
        let d = list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["unit_id"] == u)
            .unwrap_or_else(|| panic!("{u} not in {list}"));
        assert_eq!(d["connected"], true, "{d}");
        assert_eq!(d["state"], "active", "{d}");
        assert_eq!(d["address"], "127.0.0.1", "the source IP (§6.4): {d}");
    }
    let status = c.request(None, "status", json!({}), T).unwrap();
    assert_eq!(status["devices"], 3, "{status}");
    assert_eq!(status["management"], 1, "{status}");
    let e = c
        .request(Some("E2E-NOBODY"), "ping", json!({}), T)
        .unwrap_err();
    assert_eq!(e.code(), Some("device_offline"), "{e}");
    let e = c.request(Some("E2E-A"), "nope", json!({}), T).unwrap_err();
    assert_eq!(e.code(), Some("unknown_method"), "{e}");
}

#[test]
fn ping_info_and_devices_list_through_the_gateway_uring() {
    command_round_trip("uring");
}

#[test]
fn ping_info_and_devices_list_through_the_gateway_epoll() {
    command_round_trip("epoll");
}

#[test]
fn a_20_mb_push_lands_in_the_receive_dir_while_pings_overtake_it() {
    let mut fleet = Fleet::start("uring");
    let (c, shard) = fleet.connect_only();
    let i = fleet.add_agent_off("PUSH", shard);
    let (unit, inbox) = (fleet.agents[i].unit.clone(), fleet.agents[i].inbox.clone());
    let c = Arc::new(c);
    let file = fleet.tmp.path().join("big.bin");
    let len = 20 * 1024 * 1024;
    let sha = write_file(&file, len);

    // Pings to the same device while the push runs: control overtakes bulk data.
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (c2, s2, d2, u2) = (c.clone(), sent.clone(), done.clone(), unit.clone());
    let pinger = std::thread::spawn(move || {
        let deadline = Instant::now() + T;
        while s2.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let (mut during, mut worst) = (0, Duration::ZERO);
        while !d2.load(Ordering::SeqCst) {
            let t0 = Instant::now();
            assert_eq!(ping(&c2, &u2)["pong"], true);
            if !d2.load(Ordering::SeqCst) {
                during += 1;
                worst = worst.max(t0.elapsed());
            }
        }
        (during, worst)
    });
    let t0 = Instant::now();
    let r = c
        .push_file(&unit, &file, "e2e/big.bin", |n, total| {
            assert_eq!(total, len as u64);
            sent.store(n.max(1), Ordering::SeqCst);
        })
        .expect("push");
    let took = t0.elapsed();
    done.store(true, Ordering::SeqCst);
    let (during, worst) = pinger.join().unwrap();
    assert_eq!(r.size, len as u64);
    assert_eq!(r.sha256, sha);
    assert_eq!(r.remote["ok"], true, "{}", r.remote);
    assert_eq!(r.remote["sha256"], sha.as_str());
    assert_eq!(r.remote["size"], len);
    let got = std::fs::read(inbox.join("e2e/big.bin")).expect("the pushed file");
    assert_eq!(got.len(), len);
    assert_eq!(hex(&Sha256::digest(&got)), sha);
    eprintln!("20 MB in {took:?}; {during} pings answered during the push, slowest {worst:?}");
    assert!(during >= 1, "no ping was answered while the push ran");
}

#[test]
fn a_terminal_runs_a_shell_command_and_reports_exit_code_0() {
    let mut fleet = Fleet::start("uring");
    let (c, shard) = fleet.connect_only();
    let i = fleet.add_agent_off("TERM", shard);
    let unit = fleet.agents[i].unit.clone();
    let stream = c
        .open_stream(&unit, "terminal", json!({"cols": 100, "rows": 30}), T)
        .expect("terminal");
    let (mut reader, mut writer) = stream.split();
    writer.write_all(b"echo hello-e2e-$((6*7))\n").unwrap();
    writer.write_all(b"exit\n").unwrap();
    let mut out = Vec::new();
    read_until(&mut reader, &mut out, |_| false);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("hello-e2e-42"), "{text:?}");
    let close = reader.close_body().expect("the device's close").clone();
    assert_eq!(close["ok"], true, "{close}");
    assert_eq!(close["exit_code"], 0, "{close}");
    writer.close(json!({"ok": true})).unwrap();
    // The link still carries requests.
    assert_eq!(ping(&c, &unit)["pong"], true);
}

#[test]
fn shadow_relays_more_than_a_window_to_the_local_vnc_port_and_back() {
    let mut fleet = Fleet::start("uring");
    let (c, shard) = fleet.connect_only();
    fleet.vnc_port = echo_server();
    let i = fleet.add_agent_off("SHADOW", shard);
    let unit = fleet.agents[i].unit.clone();
    let stream = c
        .open_stream(&unit, "shadow", json!({}), T)
        .expect("shadow");
    let (mut reader, mut writer) = stream.split();
    // 300 KB: more than one window (256 KiB) each way.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let p2 = payload.clone();
    let w = std::thread::spawn(move || {
        writer.write_all(&p2).unwrap();
        writer
    });
    let mut back = Vec::new();
    read_until(&mut reader, &mut back, |b| b.len() >= payload.len());
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "the echoed bytes differ");
    // Our close: the echo server sees EOF and closes, then the agent closes its side.
    let mut writer = w.join().unwrap();
    writer.close(json!({"ok": true})).unwrap();
    let close = reader.wait_close(T).expect("the device's close");
    assert_eq!(close["ok"], true, "{close}");
    // The echo server is gone (it served one connection): connect_failed.
    let e = c.open_stream(&unit, "shadow", json!({}), T).unwrap_err();
    assert_eq!(e.code(), Some("connect_failed"), "{e}");
}

#[test]
fn two_management_links_both_get_events_and_each_only_its_own_answers() {
    let mut fleet = Fleet::start("uring");
    for n in 0..4 {
        fleet.add_agent(&format!("PAIR-{n}"));
    }
    let a = Arc::new(ManagementClient::connect(fleet.options()).unwrap());
    let b = Arc::new(ManagementClient::connect(fleet.options()).unwrap());
    wait_metric(&fleet.gw, "fleetgate_management_connected", 2);
    let (ev_a, ev_b) = (a.events(), b.events());
    // A round trip on each after subscribing: the I/O threads have taken the subscriptions.
    for c in [&a, &b] {
        c.request(None, "status", json!({}), T).unwrap();
    }
    // A new device: both links hear it.
    fleet.add_agent("PAIR-NEW");
    for rx in [&ev_a, &ev_b] {
        let up = wait_event(rx, EventKind::DeviceUp, "PAIR-NEW");
        assert!(up.body["address"].as_str().is_some(), "{:?}", up.body);
    }
    // Both links ask at once with the same request ids (each client counts from 1 and both
    // have made the same requests), each a different device. An answer that reached the
    // other link would answer that link's own pending request with the wrong unit_id, or
    // leave the asker waiting.
    let units: Vec<String> = fleet.agents.iter().map(|a| a.unit.clone()).collect();
    for round in 0..units.len() {
        let ask = |c: &Arc<ManagementClient>, unit: String| {
            let c = c.clone();
            std::thread::spawn(move || (info(&c, &unit)["unit_id"].clone(), unit))
        };
        let ta = ask(&a, units[round].clone());
        let tb = ask(&b, units[(round + 1) % units.len()].clone());
        for t in [ta, tb] {
            let (got, asked) = t.join().unwrap();
            assert_eq!(got, asked.as_str(), "an answer went to the other link");
        }
    }
    // A device that leaves: both links hear device_down.
    let gone = fleet.agents.remove(0);
    let unit = gone.unit.clone();
    drop(gone);
    for rx in [&ev_a, &ev_b] {
        wait_event(rx, EventKind::DeviceDown, &unit);
    }
    let e = a.request(Some(&unit), "ping", json!({}), T).unwrap_err();
    assert_eq!(e.code(), Some("device_offline"), "{e}");
}

#[test]
fn devices_on_both_shards_all_answer_the_management_link() {
    let mut fleet = Fleet::start("uring");
    let (c, shard) = fleet.connect_only();
    // At least 6 agents, and more until both shards hold devices.
    let mut n = 0;
    while n < 6 || fleet.counts.contains(&0) {
        assert!(
            n < MAX_AGENTS,
            "{n} agents, devices by shard {:?}",
            fleet.counts
        );
        fleet.add_agent(&format!("SHARD-{n:02}"));
        n += 1;
    }
    let text = metrics(&fleet.gw);
    let devices = per_shard(&text, "fleetgate_devices_connected");
    assert!(
        devices.iter().all(|&d| d > 0),
        "devices by shard {devices:?}"
    );
    assert_eq!(devices.iter().sum::<u64>(), n as u64);
    let managers = per_shard(&text, "fleetgate_management_connected");
    assert_eq!(managers[shard], 1, "{managers:?}");
    let remote = fleet.agents.iter().filter(|a| a.shard != shard).count();
    assert!(remote >= 1);
    // Every device answers, from both shards (answers from `remote` devices crossed shards).
    for a in &fleet.agents {
        assert_eq!(ping(&c, &a.unit)["pong"], true);
        assert_eq!(info(&c, &a.unit)["unit_id"], a.unit.as_str());
    }
    eprintln!("{n} agents, devices by shard {devices:?}, management on shard {shard}");
}

#[test]
fn an_idle_terminal_shell_dies_when_its_management_link_closes() {
    let mut fleet = Fleet::start("uring");
    let (c, shard) = fleet.connect_only();
    let i = fleet.add_agent_off("IDLE", shard);
    let unit = fleet.agents[i].unit.clone();
    let stream = c
        .open_stream(&unit, "terminal", json!({"cols": 80, "rows": 24}), T)
        .expect("terminal");
    let (mut reader, mut writer) = stream.split();
    writer.write_all(b"echo \"pid-$$-end\"\n").unwrap();
    let mut out = Vec::new();
    read_until(&mut reader, &mut out, |b| {
        number_between(&String::from_utf8_lossy(b), "pid-", "-end").is_some()
    });
    let pid = number_between(&String::from_utf8_lossy(&out), "pid-", "-end")
        .unwrap_or_else(|| panic!("no pid in {:?}", String::from_utf8_lossy(&out)));
    assert!(alive(pid), "the shell {pid} runs");
    // Idle now; the management link goes.
    let _ = fleet.agents[i].disconnects();
    drop((reader, writer));
    c.close();
    wait_metric(&fleet.gw, "fleetgate_management_connected", 0);
    let deadline = Instant::now() + T;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "the shell {pid} outlived its management link");
    // It was management_down, not the end of the device's session.
    assert!(
        fleet.agents[i].disconnects().is_empty(),
        "the agent's session ended"
    );
    let (c2, _) = fleet.connect_only();
    assert_eq!(ping(&c2, &unit)["pong"], true);
}

// ---- through a real HTTP proxy ----

#[test]
fn through_tinyproxy_with_basic_auth_to_a_real_agent() {
    let mut fleet = Fleet::start("uring");
    fleet.add_agent("PROXIED-1");
    let proxy = tinyproxy(fleet.tmp.path(), fleet.gw.port());
    let with = |pass: &str| {
        let mut o = fleet.options();
        o.proxy = Some(ProxyConfig {
            url: format!("http://127.0.0.1:{}", proxy.port),
            username: Some("user".into()),
            password: Some(pass.into()),
        });
        o
    };
    let c = ManagementClient::connect(with("pass")).expect("through the proxy");
    assert_eq!(ping(&c, "PROXIED-1")["pong"], true);
    assert_eq!(info(&c, "PROXIED-1")["unit_id"], "PROXIED-1");
    c.close();
    let e = ManagementClient::connect(with("wrong")).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::ProxyAuth {
                sent_credentials: true,
                ..
            }
        ),
        "{e}"
    );
}
