//! The device agent (`fleetgate::agent` and `fleetgate agent`) against the real gateway over
//! real TLS on loopback: first contact and fingerprint, registration, "connection ready",
//! reconnect after a gateway restart (resuming the TLS session with the gateway's persisted
//! ticket keys), removal, and DNS TXT discovery against a real dnsmasq.

mod common;

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Gateway;
use common::dnsmasq::{Dnsmasq, free_port};
use fleetgate::agent::{
    self, AgentEvent, AgentOptions, AgentState, Connector, RegisterRequest, StopHandle,
};

fn fleetgate_cmd(data_dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    common::run(
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(args)
            .arg("--data-dir")
            .arg(data_dir),
    )
}

fn one_time_key(gw: &Gateway) -> String {
    let (ok, out, err) = fleetgate_cmd(&gw.data_dir(), &["keys", "create", "--one-time", "1"]);
    assert!(ok, "{err}");
    out.trim().to_owned()
}

/// The root fingerprint as `fleetgate pki show` prints it (64 hex digits).
fn root_fingerprint_hex(gw: &Gateway) -> String {
    use sha2::Digest as _;
    let pem = std::fs::read(gw.root_pem()).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    sha2::Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

use rustls::pki_types::pem::PemObject as _;

fn wait_for(
    rx: &mpsc::Receiver<AgentEvent>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&AgentEvent) -> bool,
) -> AgentEvent {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) if pred(&e) => return e,
            Ok(_) => {}
            Err(_) => panic!("no {what} within {timeout:?}"),
        }
    }
}

#[test]
fn agent_registers_survives_a_gateway_restart_resuming_and_is_removed() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut gw = Gateway::start("uring", None, &["--listen", &listen, "--shards", "2"]);
    let key = one_time_key(&gw);
    let connector = Connector::parse(&listen).unwrap();
    let opts = AgentOptions::fast();
    let stop = StopHandle::new();

    // First contact: the fingerprint the agent sees is the gateway's root.
    let state_dir = tempfile::tempdir().unwrap();
    let mut state = AgentState::open(state_dir.path().join("agent")).unwrap();
    let contact = agent::fetch_fingerprint(&connector, &opts).unwrap();
    assert_eq!(contact.fingerprint.hex(), root_fingerprint_hex(&gw));
    state.adopt(&contact).unwrap();
    state.config.unit_id = Some("AGENT-1".into());
    state.config.connectors = vec![connector.clone()];
    state.save().unwrap();
    let req = RegisterRequest {
        connector: connector.clone(),
        unit_id: "AGENT-1".into(),
        key: key.clone(),
    };
    agent::register(&mut state, &req, &opts, &stop).expect("registered");
    assert!(state.has_credential());

    // The same one-time key on another device: key_used, with the gateway's message.
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = AgentState::open(other_dir.path()).unwrap();
    other.adopt(&contact).unwrap();
    let err = agent::register(
        &mut other,
        &RegisterRequest {
            unit_id: "AGENT-2".into(),
            ..req.clone()
        },
        &opts,
        &stop,
    )
    .unwrap_err();
    assert_eq!(
        err.refusal().expect("a refusal").reason,
        "key_used",
        "{err}"
    );

    // Run: connection ready.
    let (tx, rx) = mpsc::channel();
    let run_stop = stop.clone();
    let runner = std::thread::spawn(move || {
        let mut on_event = |e: AgentEvent| {
            let _ = tx.send(e);
        };
        agent::run(&mut state, &AgentOptions::fast(), &run_stop, &mut on_event)
    });
    wait_for(
        &rx,
        "ready",
        Duration::from_secs(10),
        |e| matches!(e, AgentEvent::Ready { unit_id, .. } if unit_id == "AGENT-1"),
    );

    // Restart the gateway on the same data dir and port: the agent comes back by itself, and
    // resumes its TLS session (the ticket keys are in the data dir).
    let dir = std::mem::replace(&mut gw.dir, tempfile::tempdir().unwrap());
    let (status, _) = gw.terminate();
    let gw = Gateway::start_in(dir, "epoll", None, &["--listen", &listen]);
    assert!(status.success());
    wait_for(&rx, "disconnect", Duration::from_secs(10), |e| {
        matches!(e, AgentEvent::Disconnected { .. })
    });
    wait_for(&rx, "ready again", Duration::from_secs(15), |e| {
        matches!(e, AgentEvent::Ready { .. })
    });
    assert!(
        gw.metric("fleetgate_tls_resumptions_total") >= 1,
        "the reconnect did not resume its TLS session"
    );
    assert_eq!(gw.metric("fleetgate_device_sessions"), 1);

    // Removal: the agent is told, drops its settings and stops.
    let (ok, out, err) = fleetgate_cmd(&gw.data_dir(), &["devices", "remove", "AGENT-1"]);
    assert!(ok, "{out}{err}");
    wait_for(&rx, "settings dropped", Duration::from_secs(5), |e| {
        matches!(e, AgentEvent::SettingsDropped)
    });
    let outcome = runner.join().unwrap();
    assert!(
        matches!(outcome, Err(ref e) if e.refusal().is_some_and(|r| r.reason == "credential_revoked")),
        "{outcome:?}"
    );
    let state = AgentState::open(state_dir.path().join("agent")).unwrap();
    assert!(!state.has_credential());
    assert!(state.config.connectors.is_empty());
}

#[test]
fn agent_command_prints_connection_ready_and_keeps_its_files_private() {
    let gw = Gateway::start("epoll", None, &[]);
    let key = one_time_key(&gw);
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("agent");
    // Connections accepted (counted at accept, so each /metrics read counts itself).
    let accepted_before = gw.metric("fleetgate_accepted_total");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "agent",
            "--gateway",
            &gw.addr.to_string(),
            "--unit-id",
            "CLI-7",
        ])
        .arg("--state-dir")
        .arg(&dir)
        .args([
            "--fingerprint",
            &root_fingerprint_hex(&gw),
            "--key",
            &key,
            "--once",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "connection ready\n", "stderr: {stderr}");
    // First contact (the fingerprint) and the registration, which the gateway continued as
    // the session: two connections, not a third one with the new certificate.
    assert_eq!(
        gw.metric("fleetgate_accepted_total") - accepted_before,
        2 + 1,
        "stderr: {stderr}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    for f in ["device.key", "device.pem"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // Registered: the next start needs neither key nor fingerprint.
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["agent", "--state-dir"])
        .arg(&dir)
        .arg("--once")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "connection ready\n");
    // A wrong fingerprint part stops the registration before the key is sent.
    let key2 = one_time_key(&gw);
    let mut wrong = root_fingerprint_hex(&gw);
    wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "agent",
            "--gateway",
            &gw.addr.to_string(),
            "--unit-id",
            "CLI-8",
        ])
        .arg("--state-dir")
        .arg(state.path().join("other"))
        .args(["--fingerprint", &wrong, "--key", &key2, "--once"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    let (_, list, _) = fleetgate_cmd(&gw.data_dir(), &["keys", "list"]);
    assert!(
        list.lines().filter(|l| l.contains("unused")).count() >= 1,
        "{list}"
    );
}

#[test]
fn agent_finds_the_gateway_by_dns_txt_discovery() {
    let gw = Gateway::start("uring", None, &[]);
    let key = one_time_key(&gw);
    let tmp = tempfile::tempdir().unwrap();
    let record = format!(
        "--txt-record=igel-cloud-gateway.example.test,https://127.0.0.1:{}/usg/endpoint",
        gw.port()
    );
    let dns = Dnsmasq::start(tmp.path(), &[record.as_str()]);
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["agent", "--email", "jo.smith@example.test", "--dns-server"])
        .arg(dns.addr.to_string())
        .args(["--unit-id", "DNS-1", "--state-dir"])
        .arg(tmp.path().join("agent"))
        .args([
            "--fingerprint",
            &root_fingerprint_hex(&gw),
            "--key",
            &key,
            "--once",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "connection ready\n");
    dns.assert_queried("igel-cloud-gateway.example.test");
    // No record for the domain: a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "agent",
            "--email",
            "jo@nowhere.example.test",
            "--dns-server",
        ])
        .arg(dns.addr.to_string())
        .args(["--unit-id", "DNS-2", "--state-dir"])
        .arg(tmp.path().join("agent2"))
        .args([
            "--fingerprint",
            &root_fingerprint_hex(&gw),
            "--key",
            &key,
            "--once",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("igel-cloud-gateway.nowhere.example.test"),
        "{err}"
    );
}
