//! Device onboarding end to end, gateway side: real `fleetgate serve`, real TLS on loopback, a
//! device written from docs/protocol.md §5 (tests/common/device.rs: tungstenite + rustls +
//! rcgen), keys made with the real `fleetgate keys create`. Each scenario runs on both backends
//! where the I/O path matters.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::device::{Device, Outcome, read_close, read_json, set_timeout};
use common::{DRIVERS, Gateway};

fn fleetgate(gw: &Gateway, args: &[&str]) -> (bool, String, String) {
    common::run(
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(args)
            .arg("--data-dir")
            .arg(gw.data_dir()),
    )
}

fn keys(gw: &Gateway, args: &[&str]) -> Vec<String> {
    let mut a = vec!["keys", "create"];
    a.extend_from_slice(args);
    let (ok, out, err) = fleetgate(gw, &a);
    assert!(ok, "keys create: {err}");
    out.lines().map(str::to_owned).collect()
}

#[test]
fn one_time_key_works_once_then_the_credential_reconnects() {
    for driver in DRIVERS {
        let gw = Gateway::start(driver, None, &[]);
        let key = keys(&gw, &["--one-time", "1"]).remove(0);
        let mut d = Device::new("UNIT-0001");
        let out = d.register(gw.addr, &gw.root_pem(), &key);
        let Outcome::Registered { cert_pem, msg } = out else {
            panic!("{driver}: {out:?}")
        };
        assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(msg["unit_id"], "UNIT-0001");
        assert!(
            msg["device_ca"]
                .as_str()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );

        // The same key again, from another device: used.
        let mut other = Device::new("UNIT-0002");
        let out = other.register(gw.addr, &gw.root_pem(), &key);
        let Outcome::Refused { reason, msg, close } = out else {
            panic!("{out:?}")
        };
        assert_eq!(reason, "key_used");
        assert_eq!(close, Some(1008));
        assert!(
            msg["message"]
                .as_str()
                .unwrap()
                .contains("already been used")
        );

        // Reconnect with the credential, no key: session hello.
        let mut ws = d.session(gw.addr, &gw.root_pem()).expect("session");
        // The session is counted and visible to `devices list`.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (ok, out, err) = fleetgate(&gw, &["devices", "list", "--connected"]);
            assert!(ok, "{err}");
            if out.contains("UNIT-0001") {
                assert!(out.contains("127.0.0.1"), "{out}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "devices list never showed it: {out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(gw.metric("fleetgate_device_sessions"), 1);
        ws.close(None).unwrap();
        let _ = read_close(&mut ws);
    }
}

#[test]
fn twenty_devices_racing_for_one_key_exactly_one_wins() {
    // Rate limiting off, so every loser sees key_used.
    let cfg = "[registration.rate_limit]\nfailures_per_minute = 0\n";
    let gw = Gateway::start("uring", Some(cfg), &["--shards", "2"]);
    let key = keys(&gw, &["--one-time", "1"]).remove(0);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(20));
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (addr, root, key, b) = (gw.addr, gw.root_pem(), key.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut d = Device::new(&format!("RACE-{i:02}"));
                b.wait();
                d.register(addr, &root, &key).reason().to_owned()
            })
        })
        .collect();
    let reasons: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let granted = reasons.iter().filter(|r| *r == "granted").count();
    assert_eq!(granted, 1, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r == "granted" || r == "key_used"),
        "{reasons:?}"
    );
}

#[test]
fn unit_bound_key_only_for_its_unit_and_mass_key_for_many() {
    let gw = Gateway::start("epoll", None, &[]);
    let key = keys(&gw, &["--unit", "KIOSK-7"]).remove(0);
    let mut wrong = Device::new("KIOSK-8");
    assert_eq!(
        wrong.register(gw.addr, &gw.root_pem(), &key).reason(),
        "key_wrong_unit"
    );
    let mut right = Device::new("kiosk-7");
    assert_eq!(
        right.register(gw.addr, &gw.root_pem(), &key).reason(),
        "granted"
    );
    let mass = keys(&gw, &["--mass", "--value", "fleet-rollout-2026"]).remove(0);
    for i in 0..8 {
        let mut d = Device::new(&format!("MASS-{i}"));
        // Case and dashes do not matter.
        let typed = if i % 2 == 0 {
            "FLEET-ROLLOUT-2026".to_owned()
        } else {
            mass.clone()
        };
        let out = d.register(gw.addr, &gw.root_pem(), &typed);
        assert_eq!(out.reason(), "granted", "{out:?}");
        d.session(gw.addr, &gw.root_pem()).expect("session");
    }
}

#[test]
fn removing_a_device_disconnects_it_and_it_cannot_come_back() {
    for driver in DRIVERS {
        let gw = Gateway::start(driver, None, &[]);
        let key = keys(&gw, &["--one-time", "1"]).remove(0);
        let mut d = Device::new("LAPTOP-42");
        assert_eq!(
            d.register(gw.addr, &gw.root_pem(), &key).reason(),
            "granted"
        );
        let mut ws = d.session(gw.addr, &gw.root_pem()).expect("session");
        set_timeout(&mut ws, Duration::from_secs(5));
        let t = Instant::now();
        let (ok, out, err) = fleetgate(&gw, &["devices", "remove", "LAPTOP-42"]);
        assert!(ok, "{err}");
        assert!(out.contains("disconnects it now"), "{out}");
        let msg = read_json(&mut ws).expect("a refusal while connected");
        assert_eq!(msg["type"], "refused", "{msg}");
        assert_eq!(msg["reason"], "credential_revoked", "{msg}");
        assert_eq!(msg["drop_settings"], true, "{msg}");
        assert_eq!(read_close(&mut ws), Some(1008));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        // Coming back with the same credential: refused at once.
        let refused = d.session(gw.addr, &gw.root_pem()).unwrap_err();
        assert_eq!(refused["reason"], "credential_revoked", "{refused}");
        assert_eq!(refused["close"], 1008, "{refused}");
    }
}

#[test]
fn a_revocation_without_the_admin_socket_is_noticed_within_a_second() {
    let gw = Gateway::start("uring", None, &[]);
    let key = keys(&gw, &["--one-time", "1"]).remove(0);
    let mut d = Device::new("POLL-1");
    assert_eq!(
        d.register(gw.addr, &gw.root_pem(), &key).reason(),
        "granted"
    );
    let mut ws = d.session(gw.addr, &gw.root_pem()).expect("session");
    set_timeout(&mut ws, Duration::from_secs(5));
    // Revoke through the library (as another tool would), not through the CLI.
    let mut reg = fleetgate::registry::Registry::open_in(&gw.data_dir()).unwrap();
    let t = Instant::now();
    reg.revoke_device("POLL-1", fleetgate::registry::unix_now())
        .unwrap();
    let msg = read_json(&mut ws).expect("refused");
    assert_eq!(msg["reason"], "credential_revoked");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn registering_again_supersedes_the_old_credential() {
    let gw = Gateway::start("epoll", None, &[]);
    let k = keys(&gw, &["--one-time", "2"]);
    let mut first = Device::new("DUP-1");
    assert_eq!(
        first.register(gw.addr, &gw.root_pem(), &k[0]).reason(),
        "granted"
    );
    let mut ws = first.session(gw.addr, &gw.root_pem()).expect("session");
    set_timeout(&mut ws, Duration::from_secs(5));
    let mut again = Device::new("DUP-1");
    assert_eq!(
        again.register(gw.addr, &gw.root_pem(), &k[1]).reason(),
        "granted"
    );
    let msg = read_json(&mut ws).expect("the old session is closed");
    assert_eq!(msg["reason"], "credential_superseded", "{msg}");
    assert!(msg.get("drop_settings").is_none(), "{msg}");
    let refused = first.session(gw.addr, &gw.root_pem()).unwrap_err();
    assert_eq!(refused["reason"], "credential_superseded");
    again
        .session(gw.addr, &gw.root_pem())
        .expect("the new one works");
}

#[test]
fn key_guessing_is_throttled_per_source() {
    // One failure a minute after a burst of 3, so the test does not depend on its speed.
    let cfg = "[registration.rate_limit]\nfailures_per_minute = 1\nburst = 3\n";
    let gw = Gateway::start("uring", Some(cfg), &[]);
    let mut d = Device::new("GUESSER");
    let mut reasons = Vec::new();
    for i in 0..8 {
        reasons.push(
            d.register(gw.addr, &gw.root_pem(), &format!("WRONG-KEY-{i:04}"))
                .reason()
                .to_owned(),
        );
    }
    // Burst 3, then 1 a minute: the 4th attempt is throttled.
    assert_eq!(&reasons[..3], ["key_unknown"; 3], "{reasons:?}");
    assert!(
        reasons[3..].iter().all(|r| r == "rate_limited"),
        "{reasons:?}"
    );
    let out = d.register(gw.addr, &gw.root_pem(), "still-wrong");
    let Outcome::Refused { msg, close, .. } = out else {
        panic!()
    };
    assert_eq!(close, Some(4013));
    assert!(msg["retry_after_ms"].as_u64().unwrap() > 1000, "{msg}");
    // Even a right key waits now (the key is not even looked at).
    let key = keys(&gw, &["--one-time", "1"]).remove(0);
    assert_eq!(
        d.register(gw.addr, &gw.root_pem(), &key).reason(),
        "rate_limited"
    );
    // Failures are counted and audited.
    assert_eq!(
        gw.metric("fleetgate_registrations_total{reason=\"key_unknown\"}"),
        3
    );
    let (_, out, _) = fleetgate(&gw, &["keys", "list"]);
    assert!(out.contains("unused"), "{out}");
}

#[test]
fn a_registration_can_continue_as_the_session_on_the_same_connection() {
    for driver in DRIVERS {
        let cfg = "[limits]\nmax_devices = 1\nlimit_retry_after_secs = 30\n";
        let gw = Gateway::start(driver, Some(cfg), &[]);
        let k = keys(&gw, &["--one-time", "2"]);
        let mut d = Device::new("STAY-1");
        let (mut ws, registered, hello) = d
            .register_and_stay(gw.addr, &gw.root_pem(), &k[0])
            .unwrap_or_else(|e| panic!("{driver}: {e:?}"));
        assert_eq!(registered["reason"], "granted", "{registered}");
        assert_eq!(hello["mode"], "session", "{hello}");
        assert_eq!(hello["unit_id"], "STAY-1", "{hello}");
        // It is a real session: listed as connected, counted under the limit, and removing
        // the device closes this very connection.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (ok, out, _) = fleetgate(&gw, &["devices", "list", "--connected"]);
            if ok && out.lines().any(|l| l.starts_with("STAY-1 ")) {
                break;
            }
            assert!(Instant::now() < deadline, "{driver}: not listed:\n{out}");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The limit (1) is taken by it: a second device that stays gets its credential but
        // the session is refused, and the credential works once there is room.
        let mut other = Device::new("STAY-2");
        let (answer, next, close) = other
            .register_and_stay(gw.addr, &gw.root_pem(), &k[1])
            .map(|_| ())
            .expect_err("over the limit");
        assert_eq!(answer["type"], "registered", "{answer}");
        let next = next.expect("a refusal after registered");
        assert_eq!(next["reason"], "limit_reached", "{next}");
        assert!(next["retry_after_ms"].as_u64().is_some(), "{next}");
        assert_eq!(close, Some(4013));
        set_timeout(&mut ws, Duration::from_secs(5));
        let (ok, _, err) = fleetgate(&gw, &["devices", "remove", "STAY-1"]);
        assert!(ok, "{err}");
        let msg = read_json(&mut ws).expect("a refusal while connected");
        assert_eq!(msg["reason"], "credential_revoked", "{driver}: {msg}");
        assert_eq!(read_close(&mut ws), Some(1008));
        drop(ws);
        let deadline = Instant::now() + Duration::from_secs(5);
        let _s = loop {
            match other.session(gw.addr, &gw.root_pem()) {
                Ok(ws) => break ws,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{driver}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
    }
}

#[test]
fn the_connection_limit_refuses_with_the_exact_log_line() {
    for driver in DRIVERS {
        let cfg = "[limits]\nmax_devices = 2\nlimit_retry_after_secs = 30\n";
        let gw = Gateway::start(driver, Some(cfg), &[]);
        let key = keys(&gw, &["--mass"]).remove(0);
        let mut devices: Vec<Device> = (0..3).map(|i| Device::new(&format!("LIM-{i}"))).collect();
        for d in &mut devices {
            assert_eq!(
                d.register(gw.addr, &gw.root_pem(), &key).reason(),
                "granted"
            );
        }
        let _a = devices[0].session(gw.addr, &gw.root_pem()).expect("first");
        let _b = devices[1].session(gw.addr, &gw.root_pem()).expect("second");
        let refused = devices[2].session(gw.addr, &gw.root_pem()).unwrap_err();
        assert_eq!(refused["reason"], "limit_reached", "{refused}");
        assert_eq!(refused["close"], 4013);
        let retry = refused["retry_after_ms"].as_u64().unwrap();
        assert!((15_000..=45_000).contains(&retry), "{retry}");
        let line = "Max connections limit has exceeded. Device [LIM-2] is rejected";
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gw.log().contains(line) {
            assert!(Instant::now() < deadline, "log:\n{}", gw.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        let logged = gw
            .log()
            .lines()
            .find(|l| l.contains(line))
            .unwrap()
            .to_owned();
        assert!(logged.contains("WARN"), "{logged}");
        assert_eq!(
            gw.metric("fleetgate_device_connection_limit_rejections_total"),
            1
        );
        // Raised at run time: the device gets in.
        let (ok, out, err) = fleetgate(&gw, &["devices", "limit", "3"]);
        assert!(ok && out.contains("set to 3"), "{out}{err}");
        let _c = devices[2].session(gw.addr, &gw.root_pem()).expect("third");
        let (ok, out, _) = fleetgate(&gw, &["devices", "limit"]);
        assert!(
            ok && out.contains("limit: 3; devices connected: 3"),
            "{out}"
        );
    }
}

#[test]
fn malformed_registrations_and_foreign_certificates_are_refused() {
    let gw = Gateway::start("uring", None, &[]);
    let key = keys(&gw, &["--one-time", "1"]).remove(0);
    let d = Device::new("BAD-1");
    // A CSR whose signature does not verify: bad_request; the key is not spent.
    let (mut ws, _) = d.open(gw.addr, &gw.root_pem(), false).unwrap();
    let mut csr = base64_decode(&d.csr_b64());
    let n = csr.len();
    csr[n - 4] ^= 0x5a;
    let msg = serde_json::json!({"type":"register","unit_id":"BAD-1","key":key,
        "csr": base64_encode(&csr)});
    ws.send(tungstenite::Message::text(msg.to_string()))
        .unwrap();
    let answer = read_json(&mut ws).unwrap();
    assert_eq!(answer["reason"], "bad_request", "{answer}");
    // Not JSON: bad_request.
    let (mut ws, _) = d.open(gw.addr, &gw.root_pem(), false).unwrap();
    ws.send(tungstenite::Message::text("hello?")).unwrap();
    assert_eq!(read_json(&mut ws).unwrap()["reason"], "bad_request");
    // A binary message in register mode: bad_request.
    let (mut ws, _) = d.open(gw.addr, &gw.root_pem(), false).unwrap();
    ws.send(tungstenite::Message::binary(vec![1u8, 2, 3]))
        .unwrap();
    assert_eq!(read_json(&mut ws).unwrap()["reason"], "bad_request");
    // The key still works.
    let mut d = d;
    assert_eq!(
        d.register(gw.addr, &gw.root_pem(), &key).reason(),
        "granted"
    );

    // A client certificate from another CA fails the TLS handshake.
    let mut stranger = Device::new("STRANGER");
    let ca = rcgen::CertificateParams::new(vec![]).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = ca;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "STRANGER");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&stranger.key, &issuer).unwrap();
    drop(ca_cert);
    stranger.cert_pem = Some(cert.pem());
    let err = stranger.session(gw.addr, &gw.root_pem()).unwrap_err();
    assert!(err.get("error").is_some(), "{err}");
    // Unknown paths still 404 and status still works without a client certificate.
    let body = common::raw_exchange(
        &gw,
        b"GET /usg/check-status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(String::from_utf8_lossy(&body).contains("{\"status\":"));
}

#[test]
fn a_silent_device_in_register_mode_is_closed_after_the_timeout() {
    let gw = Gateway::start("epoll", Some("[registration]\ntimeout_ms = 500\n"), &[]);
    let d = Device::new("SILENT");
    let (mut ws, hello) = d.open(gw.addr, &gw.root_pem(), false).unwrap();
    assert_eq!(hello["mode"], "register");
    let t = Instant::now();
    assert_eq!(read_close(&mut ws), Some(1008));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
