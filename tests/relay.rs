//! The relay end to end, gateway side (docs/protocol.md §6): real `fleetgate serve`, real TLS,
//! a management client and devices written from the spec (tests/common/{mgmt,device}.rs),
//! on both backends and across shards.

mod common;
#[path = "pki_util.rs"]
mod pki_util;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::device::Device;
use common::mgmt::{self, Env, MgmtCert};
use common::{DRIVERS, Gateway, per_shard};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn mass_key(gw: &Gateway) -> String {
    let (ok, out, err) = common::run(
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["keys", "create", "--mass", "--data-dir"])
            .arg(gw.data_dir()),
    );
    assert!(ok, "{err}");
    out.trim().to_owned()
}

/// A registered device with an open session.
fn device(gw: &Gateway, key: &str, unit: &str) -> (Device, mgmt::Ws) {
    let mut d = Device::new(unit);
    assert_eq!(d.register(gw.addr, &gw.root_pem(), key).reason(), "granted");
    let ws = d.session(gw.addr, &gw.root_pem()).expect("session");
    (d, ws)
}

/// A management certificate made the way an operator makes one (`fleetgate mgmt add`), so
/// that `mgmt revoke NAME` applies to it.
fn mgmt_add(gw: &Gateway, name: &str) -> MgmtCert {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = common::run(
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["mgmt", "add", name, "--out"])
            .arg(dir.path())
            .arg("--data-dir")
            .arg(gw.data_dir()),
    );
    assert!(ok, "{err}");
    let pem = std::fs::read(dir.path().join(format!("{name}.pem"))).unwrap();
    let key_pem = std::fs::read_to_string(dir.path().join(format!("{name}.key"))).unwrap();
    MgmtCert {
        cert: rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap(),
        key: rcgen::KeyPair::from_pem(&key_pem).unwrap(),
    }
}

/// Answers one request on a device socket the way an agent would.
fn serve_one(dev: &mut mgmt::Ws) -> Env {
    let req = mgmt::recv(dev, T).expect("a request at the device");
    assert_eq!(req.kind, mgmt::REQUEST);
    assert_eq!(req.unit, "", "device links carry no unit");
    assert_ne!(req.route, 0, "the gateway sets a route");
    let method = req.json()["method"].as_str().unwrap().to_owned();
    let reply = Env {
        kind: mgmt::RESPONSE,
        channel: req.channel,
        route: req.route,
        unit: String::new(),
        body: json!({"ok": true, "result": {"pong": true, "method": method}})
            .to_string()
            .into_bytes(),
    };
    mgmt::send(dev, &reply);
    req
}

/// `GET /metrics` over TLS with curl.
fn metrics(gw: &Gateway) -> String {
    let (ok, metrics, _) = common::run(
        Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(gw.root_pem())
            .arg(format!("https://localhost:{}/metrics", gw.port())),
    );
    assert!(ok);
    metrics
}

/// The value of the first metric line starting with `prefix`.
fn value(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
}

#[test]
fn requests_responses_and_events_between_management_and_devices() {
    for driver in DRIVERS {
        let gw = Gateway::start(driver, Some("[status]\ninterval_secs = 1\n"), &[]);
        let key = mass_key(&gw);
        let cert = MgmtCert::issue(&gw.data_dir(), "ops");
        let (mut m, hello) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
        assert_eq!(hello["mode"], "management", "{hello}");
        assert_eq!(hello["name"], "ops", "{hello}");

        let (_d, mut dev) = device(&gw, &key, "KIOSK-1");
        let up = mgmt::recv_until(&mut m, T, |e| {
            e.kind == mgmt::EVENT && e.json()["event"] == "device_up"
        })
        .expect("device_up event");
        assert_eq!(up.unit, "KIOSK-1");

        // A request to the device and its answer, correlated.
        mgmt::send(&mut m, &mgmt::request(7, "kiosk-1", "ping", json!({})));
        let seen = serve_one(&mut dev);
        assert_eq!(seen.channel, 7);
        let resp = mgmt::recv_until(&mut m, T, |e| e.kind == mgmt::RESPONSE).unwrap();
        assert_eq!(
            (resp.channel, resp.unit.as_str(), resp.route),
            (7, "KIOSK-1", 0)
        );
        assert_eq!(resp.json()["result"]["pong"], true);

        // A device that is not connected: the gateway answers for it.
        mgmt::send(&mut m, &mgmt::request(8, "NOBODY", "ping", json!({})));
        let resp = mgmt::recv_until(&mut m, T, |e| e.kind == mgmt::RESPONSE).unwrap();
        assert_eq!(resp.channel, 8);
        assert_eq!(
            resp.json()["error"]["code"],
            "device_offline",
            "{}",
            resp.json()
        );

        // Requests to the gateway itself.
        mgmt::send(
            &mut m,
            &mgmt::request(9, "", "limit.set", json!({"max_devices": 500})),
        );
        let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 9).unwrap();
        assert_eq!(resp.json()["result"]["max_devices"], 500);
        mgmt::send(&mut m, &mgmt::request(10, "", "devices.list", json!({})));
        let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 10).unwrap();
        let list = resp.json()["result"]["devices"].clone();
        assert_eq!(list[0]["unit_id"], "KIOSK-1", "{list}");
        assert_eq!(list[0]["connected"], true, "{list}");
        mgmt::send(
            &mut m,
            &mgmt::request(11, "", "keys.create", json!({"one_time": 2})),
        );
        let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 11).unwrap();
        assert_eq!(resp.json()["result"]["keys"].as_array().unwrap().len(), 2);
        mgmt::send(&mut m, &mgmt::request(12, "", "nope", json!({})));
        let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 12).unwrap();
        assert_eq!(resp.json()["error"]["code"], "unknown_method");

        // The status turns ok while a management server is connected.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            mgmt::send(&mut m, &mgmt::request(13, "", "status", json!({})));
            let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 13).unwrap();
            if resp.json()["result"]["status"] == "ok" {
                assert_eq!(resp.json()["result"]["devices"], 1);
                break;
            }
            assert!(Instant::now() < deadline, "{}", resp.json());
            std::thread::sleep(Duration::from_millis(200));
        }

        // The device goes away: device_down.
        drop(dev);
        let down = mgmt::recv_until(&mut m, T, |e| {
            e.kind == mgmt::EVENT && e.json()["event"] == "device_down"
        })
        .expect("device_down event");
        assert_eq!(down.unit, "KIOSK-1");
    }
}

#[test]
fn management_needs_its_own_certificate() {
    let gw = Gateway::start("uring", None, &[]);
    // No client certificate: 403.
    let body = common::raw_exchange(
        &gw,
        common::upgrade_request("/usg/management", "").as_bytes(),
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("fleetgate mgmt add"), "{text}");
    // A device certificate is not a management certificate.
    let key = mass_key(&gw);
    let mut d = Device::new("DEV-1");
    assert_eq!(
        d.register(gw.addr, &gw.root_pem(), &key).reason(),
        "granted"
    );
    let err = mgmt::connect(&gw, d.tls_config(&gw.root_pem(), true)).unwrap_err();
    assert!(err.contains("403"), "{err}");
    // …and a management certificate is not a device credential.
    let cert = MgmtCert::issue(&gw.data_dir(), "ops");
    let stream = common::tls_connect_result(gw.addr, cert.config(&gw.root_pem())).unwrap();
    let url = format!("wss://localhost:{}/usg/endpoint", gw.port());
    let (mut ws, _) = tungstenite::client::client(url.as_str(), stream).unwrap();
    let first = common::device::read_json(&mut ws).unwrap();
    assert_eq!(first["type"], "refused", "{first}");
    assert_eq!(first["reason"], "credential_unknown", "{first}");
}

#[test]
fn streams_relay_with_credit_and_a_gone_peer_is_reset() {
    let gw = Gateway::start("epoll", None, &[]);
    let key = mass_key(&gw);
    let cert = MgmtCert::issue(&gw.data_dir(), "ops");
    let (mut m, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    let (_d, mut dev) = device(&gw, &key, "PC-9");
    mgmt::recv_until(&mut m, T, |e| {
        e.kind == mgmt::EVENT && e.json()["event"] == "device_up"
    })
    .unwrap();
    // open → accept → data both ways → credit → close both ways.
    let open = Env {
        kind: mgmt::OPEN,
        channel: 3,
        route: 0,
        unit: "PC-9".into(),
        body: json!({"kind": "shadow", "window": 65536})
            .to_string()
            .into_bytes(),
    };
    mgmt::send(&mut m, &open);
    let at_dev = mgmt::recv(&mut dev, T).unwrap();
    assert_eq!((at_dev.kind, at_dev.channel), (mgmt::OPEN, 3));
    let route = at_dev.route;
    let reply = |kind, body: Vec<u8>| Env {
        kind,
        channel: 3,
        route,
        unit: String::new(),
        body,
    };
    mgmt::send(
        &mut dev,
        &reply(mgmt::ACCEPT, br#"{"window":65536}"#.to_vec()),
    );
    assert_eq!(mgmt::recv(&mut m, T).unwrap().kind, mgmt::ACCEPT);
    let payload: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let mut data = open.clone();
    data.kind = mgmt::DATA;
    data.body = payload.clone();
    mgmt::send(&mut m, &data);
    let got = mgmt::recv(&mut dev, T).unwrap();
    assert_eq!((got.kind, got.body.len()), (mgmt::DATA, payload.len()));
    assert_eq!(got.body, payload);
    mgmt::send(
        &mut dev,
        &reply(mgmt::CREDIT, 40_000u32.to_be_bytes().to_vec()),
    );
    let credit = mgmt::recv(&mut m, T).unwrap();
    assert_eq!(
        (credit.kind, credit.body.as_slice()),
        (mgmt::CREDIT, &40_000u32.to_be_bytes()[..])
    );
    mgmt::send(&mut dev, &reply(mgmt::DATA, b"RFB 003.008\n".to_vec()));
    let back = mgmt::recv(&mut m, T).unwrap();
    assert_eq!(
        (back.kind, back.unit.as_str(), back.body.as_slice()),
        (mgmt::DATA, "PC-9", &b"RFB 003.008\n"[..])
    );
    // The stream's control messages (open, accept, credit) were timed inside the gateway,
    // in their own histogram; data is not timed, and there was no request.
    let m_text = metrics(&gw);
    assert_eq!(
        value(&m_text, "fleetgate_stream_control_latency_seconds_count "),
        3.0,
        "{m_text}"
    );
    assert_eq!(
        value(
            &m_text,
            "fleetgate_stream_control_latency_seconds_bucket{le=\"+Inf\"}"
        ),
        3.0
    );
    assert!(value(&m_text, "fleetgate_stream_control_latency_seconds_sum ") > 0.0);
    assert_eq!(
        value(&m_text, "fleetgate_relay_latency_seconds_count "),
        0.0
    );
    // An envelope above the size limit closes the sender's connection with 1009.
    // (Tested on a throwaway connection below.)

    // The management connection goes away: the device hears it (it had a stream from it),
    // and its next stream message on that route is reset.
    drop(m);
    let down = mgmt::recv(&mut dev, T).expect("management_down");
    assert_eq!(
        (down.kind, down.channel, down.route),
        (mgmt::EVENT, 0, route)
    );
    assert_eq!(down.json()["event"], "management_down");
    mgmt::send(&mut dev, &reply(mgmt::DATA, b"more".to_vec()));
    let reset = mgmt::recv(&mut dev, T).expect("a reset");
    assert_eq!(
        (reset.kind, reset.channel, reset.route),
        (mgmt::RESET, 3, route)
    );
    assert_eq!(reset.json()["error"]["code"], "link_closed");

    // Oversize envelope.
    let (mut m2, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    let mut big = open.clone();
    big.kind = mgmt::DATA;
    big.body = vec![0u8; 70_000];
    mgmt::send(&mut m2, &big);
    m2.get_mut().sock.set_read_timeout(Some(T)).unwrap();
    let mut code = None;
    for _ in 0..10 {
        match m2.read() {
            Ok(tungstenite::Message::Close(f)) => {
                code = f.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert_eq!(code, Some(1009));
}

#[test]
fn devices_on_every_shard_are_reached_and_answers_go_to_the_asker() {
    let gw = Gateway::start("uring", None, &["--shards", "3"]);
    let key = mass_key(&gw);
    let cert = MgmtCert::issue(&gw.data_dir(), "ops");
    let (mut m1, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    let (mut m2, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    // Enough devices that the kernel spreads them over all shards.
    let mut devs: Vec<(String, mgmt::Ws)> = (0..12)
        .map(|i| {
            let unit = format!("SHARD-{i:02}");
            let (_, ws) = device(&gw, &key, &unit);
            (unit, ws)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Which shard holds which (from the registrar's view) is not visible here; instead every
    // device must be reachable from both management connections, and each answer must go to
    // the connection that asked.
    let mut ids = HashSet::new();
    for (i, (unit, dev)) in devs.iter_mut().enumerate() {
        let (asker, other) = if i % 2 == 0 {
            (&mut m1, &mut m2)
        } else {
            (&mut m2, &mut m1)
        };
        let id = 100 + i as u32;
        mgmt::send(asker, &mgmt::request(id, unit, "info", json!({})));
        serve_one(dev);
        let resp = mgmt::recv_until(asker, T, |e| e.kind == mgmt::RESPONSE)
            .unwrap_or_else(|| panic!("no answer for {unit}"));
        assert_eq!((resp.channel, resp.unit.as_str()), (id, unit.as_str()));
        ids.insert(id);
        // The other connection got no response (events are fine).
        let stray = mgmt::recv_until(other, Duration::from_millis(50), |e| {
            e.kind == mgmt::RESPONSE
        });
        assert!(stray.is_none(), "{stray:?}");
    }
    assert_eq!(ids.len(), 12);
    let metrics = metrics(&gw);
    let shards_with_devices = metrics
        .lines()
        .filter(|l| l.starts_with("fleetgate_devices_connected{") && !l.ends_with(" 0"))
        .count();
    assert!(
        shards_with_devices >= 2,
        "devices all on one shard:\n{metrics}"
    );
    // Every request and every response was timed inside the gateway: 12 of each, in a
    // well-formed histogram (cumulative buckets ending in +Inf = count).
    let value = |prefix: &str| value(&metrics, prefix);
    let count = value("fleetgate_relay_latency_seconds_count ");
    assert_eq!(count, 24.0, "{metrics}");
    assert_eq!(
        value("fleetgate_relay_latency_seconds_bucket{le=\"+Inf\"}"),
        count
    );
    let sum = value("fleetgate_relay_latency_seconds_sum ");
    assert!(sum > 0.0 && sum < 24.0 * 0.5, "sum {sum}");
    let buckets: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("fleetgate_relay_latency_seconds_bucket"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
}

#[test]
fn devices_hear_when_the_management_connection_behind_their_streams_goes() {
    let gw = Gateway::start("uring", None, &["--shards", "2"]);
    let key = mass_key(&gw);
    let cert = MgmtCert::issue(&gw.data_dir(), "ops");
    let (mut m1, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    let (mut m2, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    let mut devs: Vec<(String, mgmt::Ws)> = (0..8)
        .map(|i| {
            let unit = format!("DOWN-{i}");
            let (_, ws) = device(&gw, &key, &unit);
            (unit, ws)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let text = metrics(&gw);
    let devices = per_shard(&text, "fleetgate_devices_connected");
    let managers = per_shard(&text, "fleetgate_management_connected");
    assert!(
        devices.iter().all(|&n| n > 0),
        "devices on both shards: {devices:?}"
    );
    assert_eq!(managers, [1, 1], "one management link per shard");
    let open = |unit: &str, channel: u32| Env {
        kind: mgmt::OPEN,
        channel,
        route: 0,
        unit: unit.into(),
        body: br#"{"kind":"shadow","window":65536}"#.to_vec(),
    };
    // m1 opens a stream to every device, m2 one to device 0 and only a request to device 1.
    let mut r1 = None;
    for (i, (unit, dev)) in devs.iter_mut().enumerate() {
        mgmt::send(&mut m1, &open(unit, 10 + i as u32));
        let got = mgmt::recv(dev, T).expect("the open");
        assert_eq!((got.kind, got.channel), (mgmt::OPEN, 10 + i as u32));
        assert_eq!(
            *r1.get_or_insert(got.route),
            got.route,
            "one route per link"
        );
    }
    mgmt::send(&mut m2, &open(&devs[0].0, 7));
    let r2 = mgmt::recv(&mut devs[0].1, T).expect("m2's open").route;
    mgmt::send(&mut m2, &mgmt::request(8, &devs[1].0, "ping", json!({})));
    assert_eq!(serve_one(&mut devs[1].1).channel, 8);
    let r1 = r1.unwrap();
    assert_ne!(r1, r2);
    let is_down = |e: &Env, route: u64| {
        e.kind == mgmt::EVENT
            && e.channel == 0
            && e.route == route
            && e.json() == json!({"event": "management_down"})
    };
    // m1 goes: every device (on both shards) hears it, on m1's route.
    drop(m1);
    for (unit, dev) in devs.iter_mut() {
        let e = mgmt::recv(dev, T).unwrap_or_else(|| panic!("{unit}: no management_down"));
        assert!(is_down(&e, r1), "{unit}: {e:?}");
    }
    // m2 goes: only device 0 had a stream from it.
    drop(m2);
    let e = mgmt::recv(&mut devs[0].1, T).expect("device 0: management_down for m2");
    assert!(is_down(&e, r2), "{e:?}");
    // Nobody else hears anything: the next message at device 1 is a new link's request.
    let (mut m3, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    for (i, (unit, dev)) in devs.iter_mut().enumerate().skip(1) {
        mgmt::send(
            &mut m3,
            &mgmt::request(20 + i as u32, unit, "ping", json!({})),
        );
        assert_eq!(serve_one(dev).channel, 20 + i as u32, "{unit}");
    }
}

/// Waits until a management link is closed by the gateway (close frame, or the connection
/// ends); false if it stays open for `T`.
fn closed_by_gateway(m: &mut mgmt::Ws) -> bool {
    m.get_mut().sock.set_read_timeout(Some(T)).unwrap();
    for _ in 0..100 {
        match m.read() {
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Ok(tungstenite::Message::Close(_)) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
    false
}

#[test]
fn management_connections_are_spread_over_the_shards_and_work_after_the_move() {
    const LINKS: usize = 8;
    for (driver, shards) in [("uring", 2), ("epoll", 2), ("uring", 3)] {
        let gw = Gateway::start(driver, None, &["--shards", &shards.to_string()]);
        let key = mass_key(&gw);
        let cert = mgmt_add(&gw, "cluster");
        let mut links = Vec::new();
        for i in 0..LINKS {
            let (mut m, hello) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
            assert_eq!(hello["mode"], "management", "{hello}");
            // A request sent right after `hello`, while the connection may be on its way to
            // the other shard: answered all the same.
            mgmt::send(&mut m, &mgmt::request(1, "", "status", json!({})));
            let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 1)
                .unwrap_or_else(|| panic!("{driver}: link {i}: no answer to its first request"));
            assert!(
                resp.json()["result"]["status"].is_string(),
                "{}",
                resp.json()
            );
            links.push(m);
            // Wherever the kernel put it, the shards never differ by more than one.
            let m = metrics(&gw);
            let spread = per_shard(&m, "fleetgate_management_connected");
            assert_eq!(spread.len(), shards, "{m}");
            assert_eq!(
                spread.iter().sum::<u64>(),
                i as u64 + 1,
                "{driver}: {spread:?}"
            );
            let (lo, hi) = (spread.iter().min().unwrap(), spread.iter().max().unwrap());
            assert!(hi - lo <= 1, "{driver}: after {} links: {spread:?}", i + 1);
        }
        let m = metrics(&gw);
        let moves = value(&m, "fleetgate_management_moves_total ") as u64;
        assert!(moves <= LINKS as u64 / 2 + 1, "{driver}: {moves} moves");
        // Events reach every link, moved or not; each link's request is answered to it.
        let (_d, mut dev) = device(&gw, &key, "SPREAD-1");
        for (i, m) in links.iter_mut().enumerate() {
            let up = mgmt::recv_until(m, T, |e| {
                e.kind == mgmt::EVENT && e.json()["event"] == "device_up"
            });
            assert!(up.is_some(), "{driver}: link {i} got no device_up");
        }
        for (i, m) in links.iter_mut().enumerate() {
            let id = 10 + i as u32;
            mgmt::send(m, &mgmt::request(id, "SPREAD-1", "ping", json!({})));
            serve_one(&mut dev);
            let resp = mgmt::recv_until(m, T, |e| e.kind == mgmt::RESPONSE)
                .unwrap_or_else(|| panic!("{driver}: link {i}: no answer"));
            assert_eq!(resp.channel, id);
            assert_eq!(resp.json()["result"]["pong"], true);
        }
        // Revoking the certificate closes every link, on whichever shard it ended up.
        let (ok, _, err) = common::run(
            Command::new(env!("CARGO_BIN_EXE_fleetgate"))
                .args(["mgmt", "revoke", "cluster", "--data-dir"])
                .arg(gw.data_dir()),
        );
        assert!(ok, "{err}");
        for (i, m) in links.iter_mut().enumerate() {
            assert!(closed_by_gateway(m), "{driver}: link {i} stayed open");
        }
        drop(links);
        let deadline = Instant::now() + T;
        loop {
            let spread = per_shard(&metrics(&gw), "fleetgate_management_connected");
            if spread.iter().sum::<u64>() == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{driver}: still counted: {spread:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A management link opened the impatient way: the upgrade request and a first request
/// envelope in one write, before the `101`. Returns the link once `hello` has been read.
fn pipelined_link(gw: &Gateway, cert: &MgmtCert, channel: u32) -> mgmt::Ws {
    use std::io::{Read, Write};
    let mut tls = common::tls_connect(gw.addr, cert.config(&gw.root_pem()));
    let mut bytes = format!(
        "GET /usg/management HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        gw.port()
    )
    .into_bytes();
    // One masked binary frame (RFC 6455 §5.2) carrying the request envelope.
    let payload = mgmt::request(channel, "", "status", json!({})).encode();
    assert!(payload.len() < 126);
    let mask = [0x5a, 0x17, 0xc3, 0x88];
    bytes.extend_from_slice(&[0x82, 0x80 | payload.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    tls.write_all(&bytes).unwrap();
    tls.flush().unwrap();
    // The response head, byte by byte, so nothing after it is consumed here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut ws =
        tungstenite::WebSocket::from_raw_socket(tls, tungstenite::protocol::Role::Client, None);
    match ws.read() {
        Ok(tungstenite::Message::Text(_)) => {}
        other => panic!("no hello: {other:?}"),
    }
    ws
}

#[test]
fn management_connections_racing_the_hand_over_lose_nothing() {
    for driver in DRIVERS {
        let gw = Gateway::start(driver, None, &["--shards", "2"]);
        let cert = MgmtCert::issue(&gw.data_dir(), "ops");
        // Pipelined links are routed from the shard that upgraded them (they never move), so
        // the shards drift apart and later links face a hand-over decision; each link's first
        // request must still be answered to it.
        let mut kept = Vec::new();
        for i in 0..6u32 {
            let mut m = pipelined_link(&gw, &cert, 40 + i);
            let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 40 + i)
                .unwrap_or_else(|| panic!("{driver}: pipelined link {i}: no answer"));
            assert!(
                resp.json()["result"]["status"].is_string(),
                "{}",
                resp.json()
            );
            kept.push(m);
        }
        // Links from 12 threads at once; half of them send a request and hang up at once (while
        // they may be on their way to the other shard), half wait for the answer.
        let threads: Vec<_> = (0..12u32)
            .map(|i| {
                let root = gw.root_pem();
                let cfg = cert.config(&root);
                let addr = gw.addr;
                let port = gw.port();
                std::thread::spawn(move || {
                    let stream = common::tls_connect(addr, cfg);
                    let url = format!("wss://localhost:{port}/usg/management");
                    let (mut m, _) = tungstenite::client::client(url.as_str(), stream).unwrap();
                    mgmt::send(&mut m, &mgmt::request(100 + i, "", "status", json!({})));
                    if i % 2 == 0 {
                        drop(m);
                        return true;
                    }
                    mgmt::recv_until(&mut m, T, |e| e.channel == 100 + i).is_some()
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            assert!(t.join().unwrap(), "{driver}: link {i} got no answer");
        }
        // The gateway still serves, and once everyone has left nothing is counted.
        drop(kept);
        let deadline = Instant::now() + T;
        loop {
            let m = metrics(&gw);
            let mgmt_open: u64 = per_shard(&m, "fleetgate_management_connected").iter().sum();
            let conns: u64 = per_shard(&m, "fleetgate_connections").iter().sum();
            // (curl's own connection is the one left.)
            if mgmt_open == 0 && conns <= 1 {
                break;
            }
            assert!(Instant::now() < deadline, "{driver}: still counted:\n{m}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn management_connections_stay_put_when_spreading_is_off() {
    let gw = Gateway::start(
        "uring",
        Some("[relay]\nspread_management = false\n"),
        &["--shards", "2"],
    );
    let cert = MgmtCert::issue(&gw.data_dir(), "ops");
    let mut links = Vec::new();
    for _ in 0..6 {
        let (mut m, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
        mgmt::send(&mut m, &mgmt::request(1, "", "status", json!({})));
        assert!(mgmt::recv_until(&mut m, T, |e| e.channel == 1).is_some());
        links.push(m);
    }
    let m = metrics(&gw);
    assert_eq!(value(&m, "fleetgate_management_moves_total "), 0.0, "{m}");
    assert_eq!(
        per_shard(&m, "fleetgate_management_connected")
            .iter()
            .sum::<u64>(),
        6
    );
}

#[test]
fn a_stream_close_never_overtakes_its_data_to_a_slow_reader() {
    let gw = Gateway::start(
        &std::env::var("RELAY_TEST_DRIVER").unwrap_or("uring".into()),
        None,
        &[
            "--shards",
            &std::env::var("RELAY_TEST_SHARDS").unwrap_or("2".into()),
        ],
    );
    let key = mass_key(&gw);
    let cert = MgmtCert::issue(&gw.data_dir(), "ops");
    let (mut m, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    let (_d, mut dev) = device(&gw, &key, "SLOW-1");
    // (No wait for `device_up`: the shard that admitted the session updates every shard's
    // directory before the device even reads its `hello`.)
    // 2 MiB of data then close, while the device does not read: the gateway queues it.
    let piece = vec![7u8; 16 * 1024];
    for _ in 0..128 {
        mgmt::send(
            &mut m,
            &Env {
                kind: mgmt::DATA,
                channel: 5,
                route: 0,
                unit: "SLOW-1".into(),
                body: piece.clone(),
            },
        );
    }
    mgmt::send(
        &mut m,
        &Env {
            kind: mgmt::CLOSE,
            channel: 5,
            route: 0,
            unit: "SLOW-1".into(),
            body: br#"{"ok":true}"#.to_vec(),
        },
    );
    // A request sent after the data overtakes it (control lane)…
    if std::env::var("RELAY_TEST_NO_REQUEST").is_err() {
        mgmt::send(&mut m, &mgmt::request(77, "SLOW-1", "ping", json!({})));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut got = 0usize;
    let mut saw_request_before_end = false;
    loop {
        let e = mgmt::recv(&mut dev, T).expect("envelope");
        match e.kind {
            mgmt::DATA => got += e.body.len(),
            mgmt::REQUEST => saw_request_before_end = got < 128 * 16 * 1024,
            mgmt::CLOSE => break,
            other => panic!("unexpected kind {other}"),
        }
    }
    // …but the close comes after every byte of its stream.
    assert_eq!(
        got,
        128 * 16 * 1024,
        "close before all of its stream's data"
    );
    let _ = saw_request_before_end;
}

#[test]
fn a_revoked_management_certificate_is_disconnected_and_keys_export_works() {
    let gw = Gateway::start("epoll", None, &[]);
    let cert = mgmt_add(&gw, "ops");
    let (mut m, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    let (mut watcher, _) = mgmt::connect(
        &gw,
        MgmtCert::issue(&gw.data_dir(), "watcher").config(&gw.root_pem()),
    )
    .unwrap();
    // keys.export through the management link.
    let (_, out, _) = common::run(
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["keys", "create", "--one-time", "1", "--data-dir"])
            .arg(gw.data_dir()),
    );
    let k = out.trim().to_owned();
    mgmt::send(
        &mut m,
        &mgmt::request(1, "", "keys.export", json!({"keys": [k], "format": "xml"})),
    );
    let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 1).unwrap();
    let content = resp.json()["result"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", resp.json()))
        .to_owned();
    assert!(content.contains(&k) && content.contains("<"), "{content}");
    // Revoke: the open connection is closed within a second, and no device event goes out.
    let (ok, _, err) = common::run(
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["mgmt", "revoke", "ops", "--data-dir"])
            .arg(gw.data_dir()),
    );
    assert!(ok, "{err}");
    m.get_mut().sock.set_read_timeout(Some(T)).unwrap();
    let t = Instant::now();
    let mut closed = false;
    for _ in 0..10 {
        match m.read() {
            Ok(tungstenite::Message::Close(_)) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => continue,
        }
    }
    assert!(
        closed && t.elapsed() < Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    let stray = mgmt::recv_until(&mut watcher, Duration::from_millis(500), |e| {
        e.kind == mgmt::EVENT
    });
    assert!(stray.is_none(), "{stray:?}");
    assert!(
        mgmt::connect(&gw, cert.config(&gw.root_pem()))
            .unwrap_err()
            .contains("403")
    );
}

#[test]
fn rollover_offer_hands_the_staged_root_to_connected_devices_and_counts() {
    let gw = Gateway::start("uring", None, &[]);
    let key = mass_key(&gw);
    let cert = MgmtCert::issue(&gw.data_dir(), "ops");
    let (mut m, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
    let (_a, mut dev_a) = device(&gw, &key, "ROOT-A");
    let (_b, mut dev_b) = device(&gw, &key, "ROOT-B");
    for _ in 0..2 {
        mgmt::recv_until(&mut m, T, |e| {
            e.kind == mgmt::EVENT && e.json()["event"] == "device_up"
        })
        .expect("device_up");
    }
    // Nothing staged yet: a clear refusal.
    mgmt::send(&mut m, &mgmt::request(1, "", "rollover.offer", json!({})));
    let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 1).unwrap();
    assert_eq!(
        resp.json()["error"]["code"],
        "bad_request",
        "{}",
        resp.json()
    );
    // Stage a new root (as `fleetgate pki rollover stage` does).
    let data = gw.data_dir();
    pki_util::create_root(&data, "Relay Test Root 2", &[]).ok();
    let hosts = fleetgate::server::default_hosts().join(";");
    pki_util::issue(&data, "relay-test-root-2", "relay-next", &hosts, &[]).ok();
    let out = data.join("relay-next.pem");
    pki_util::pki(
        &data,
        &[
            "export",
            "--cert",
            "relay-next",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .ok();
    pki_util::pki(
        &data,
        &["rollover", "stage", "--keystore", out.to_str().unwrap()],
    )
    .ok();
    mgmt::send(&mut m, &mgmt::request(2, "", "rollover.offer", json!({})));
    // Device A supports it, device B is an older agent.
    for (dev, supports) in [(&mut dev_a, true), (&mut dev_b, false)] {
        let req = mgmt::recv(dev, T).expect("root.offer at the device");
        assert_eq!(req.kind, mgmt::REQUEST);
        assert_eq!(req.json()["method"], "root.offer");
        assert!(
            req.json()["params"]["root"]
                .as_str()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        let body = if supports {
            json!({"ok": true, "result": {"accepted": true}})
        } else {
            json!({"ok": false, "error": {"code": "unknown_method", "message": "?"}})
        };
        mgmt::send(
            dev,
            &Env {
                kind: mgmt::RESPONSE,
                channel: req.channel,
                route: req.route,
                unit: String::new(),
                body: body.to_string().into_bytes(),
            },
        );
    }
    let resp = mgmt::recv_until(&mut m, T, |e| e.channel == 2).expect("the offer's report");
    let r = resp.json()["result"].clone();
    assert_eq!(r["offered"], 2, "{r}");
    assert_eq!(r["accepted"], 1, "{r}");
    assert_eq!(r["lacking_feature"], 1, "{r}");
    assert_eq!(r["lacking_root"], 1, "{r}");
}

#[test]
fn the_memory_budget_stops_reading_instead_of_buffering_and_loses_nothing() {
    // 1 MiB budget; the per-connection data cap raised out of the way, so that without the
    // budget the gateway would queue most of the 24 MiB for a device that does not read
    // (measured: 24.8 MB held with `memory_budget = 0`).
    // 64 receive buffers per shard: a budget-paused connection keeps at most half of them
    // unprocessed, and the rest (what the kernel had already received) is processed over
    // the budget, so the bound is the budget + 32 receive buffers per shard.
    const BUDGET: u64 = 1 << 20;
    const OVER: u64 = 2 * 32 * 16_896 + 64 * 1024;
    let cfg = format!(
        "[relay]\nmemory_budget = {BUDGET}\nmax_bulk_queue = 67108864\n\
         [limits]\nrecv_buffers_per_shard = 64\n"
    );
    for driver in DRIVERS {
        let gw = Gateway::start(driver, Some(&cfg), &["--shards", "2"]);
        let key = mass_key(&gw);
        let cert = MgmtCert::issue(&gw.data_dir(), "ops");
        let (mut m, _) = mgmt::connect(&gw, cert.config(&gw.root_pem())).unwrap();
        let (_d, mut dev) = device(&gw, &key, "BUDGET-1");
        let piece: Vec<u8> = (0..16 * 1024u32).map(|i| (i % 253) as u8).collect();
        let pieces = 1536usize; // 24 MiB
        let sender = {
            let piece = piece.clone();
            std::thread::spawn(move || {
                for _ in 0..pieces {
                    mgmt::send(
                        &mut m,
                        &Env {
                            kind: mgmt::DATA,
                            channel: 9,
                            route: 0,
                            unit: "BUDGET-1".into(),
                            body: piece.clone(),
                        },
                    );
                }
                mgmt::send(
                    &mut m,
                    &Env {
                        kind: mgmt::CLOSE,
                        channel: 9,
                        route: 0,
                        unit: "BUDGET-1".into(),
                        body: br#"{"ok":true}"#.to_vec(),
                    },
                );
                m
            })
        };
        // The device does not read for 2 s: what the gateway holds stays near the budget.
        let mut peak = 0;
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            peak = peak.max(gw.metric("fleetgate_relay_buffered_bytes"));
            std::thread::sleep(Duration::from_millis(50));
        }
        let pauses = gw.metric("fleetgate_memory_budget_pauses_total");
        assert!(pauses >= 1, "{driver}: never paused (peak {peak} B)");
        assert!(
            peak <= BUDGET + OVER,
            "{driver}: the gateway held {peak} B with a budget of {BUDGET} B"
        );
        // Now the device reads: every byte arrives, in order, then the close.
        let mut got = 0usize;
        loop {
            let e = mgmt::recv(&mut dev, T).expect("envelope");
            match e.kind {
                mgmt::DATA => {
                    assert_eq!(e.body, piece, "{driver}: data changed at byte {got}");
                    got += e.body.len();
                }
                mgmt::CLOSE => break,
                other => panic!("{driver}: unexpected kind {other}"),
            }
        }
        assert_eq!(got, pieces * piece.len(), "{driver}: data lost");
        let _m = sender.join().expect("the sender finished");
        assert_eq!(gw.metric("fleetgate_relay_dropped_total"), 0);
    }
}
