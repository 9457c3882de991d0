//! Issue 6, the unit's reload action: SIGHUP (and `fleetgate reload`) re-read the keystore and
//! the configuration file without dropping connections. Live keys (`limits.max_devices`,
//! `log.level`) apply at once, other changed keys are named in a WARN as needing a restart,
//! and a broken file is refused with its key and line while the gateway keeps running.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{DRIVERS, Gateway, run, ws_connect};
use tungstenite::Message;

const START: &str = "[server]\nshards = 1\n\n[log]\nlevel = \"info\"\n";

const CHANGED: &str = "[server]\nshards = 1\n\n[log]\nlevel = \"debug\"\n\n\
                       [limits]\nmax_devices = 7\n\n[http]\nmax_headers = 40\n";

/// Line 8 holds the wrong type.
const WRONG_TYPE: &str = "[server]\nshards = 1\n\n[log]\nlevel = \"debug\"\n\n\
                          [limits]\nmax_devices = \"many\"\n";

/// Line 4 holds the out-of-range value.
const OUT_OF_RANGE: &str = "[server]\nshards = 1\n[http]\nmax_headers = 1000\n";

fn fleetgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetgate"));
    c.env_remove("FLEETGATE_CONFIG")
        .env_remove("FLEETGATE_DATA_DIR");
    c
}

/// Waits until the log, from byte `from` on, has a line satisfying `pred`; returns that line.
fn wait_line(gw: &Gateway, from: usize, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = gw.log();
        if let Some(l) = log[from.min(log.len())..].lines().find(|l| pred(l)) {
            return l.to_owned();
        }
        assert!(Instant::now() < deadline, "no {what} in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pings over the management WebSocket and waits for the pong: the connection survived.
fn ping_pong(ws: &mut tungstenite::WebSocket<common::TlsStream>, payload: &'static [u8]) {
    ws.send(Message::Ping(payload.into())).expect("send ping");
    loop {
        match ws.read() {
            Ok(Message::Pong(p)) if p.as_ref() == payload => return,
            Ok(Message::Ping(_)) => {}
            other => panic!("expected the pong, got {other:?}"),
        }
    }
}

fn device_limit(gw: &Gateway) -> String {
    let data = gw.data_dir();
    let (ok, out, err) = run(fleetgate()
        .args(["devices", "limit", "--data-dir"])
        .arg(&data));
    assert!(ok, "devices limit: {out}{err}");
    format!("{out}{err}")
}

#[test]
fn sighup_rereads_the_config_without_dropping_connections() {
    for driver in DRIVERS {
        let gw = Gateway::start_with_env(
            tempfile::tempdir().unwrap(),
            driver,
            Some(START),
            &[],
            // An empty RUST_LOG does not override log.level.
            &[("RUST_LOG", "")],
        );
        let config = gw.dir.path().join("fleetgate.toml");
        let mut ws = ws_connect(&gw, "/usg/echo");
        ping_pong(&mut ws, b"before");
        assert!(device_limit(&gw).contains("unlimited"));
        assert!(!gw.log().contains(" DEBUG "), "{}", gw.log());

        // Live keys, and one that needs a restart.
        std::fs::write(&config, CHANGED).unwrap();
        let mark = gw.log().len();
        gw.signal("HUP");
        let applied = wait_line(&gw, mark, "reload summary", |l| {
            l.contains("re-read: applied")
        });
        assert!(
            applied.contains("limits.max_devices") && applied.contains("log.level"),
            "{applied}"
        );
        let warn = wait_line(&gw, mark, "restart WARN", |l| {
            l.contains(" WARN ") && l.contains("http.max_headers")
        });
        assert!(warn.contains("restart"), "{warn}");
        assert!(
            !warn.contains("limits.max_devices") && !warn.contains("log.level"),
            "live keys are not listed as needing a restart: {warn}"
        );
        ping_pong(&mut ws, b"after reload");
        let limit = device_limit(&gw);
        assert!(limit.contains("limit: 7"), "{limit}");

        // The debug level is in force: a TLS error from a shard is now logged at DEBUG.
        let mark_debug = gw.log().len();
        let mut tcp = TcpStream::connect(gw.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.write_all(b"this is not a TLS client hello\r\n\r\n")
            .unwrap();
        let _ = tcp.read(&mut [0u8; 256]);
        wait_line(&gw, mark_debug, "DEBUG line", |l| l.contains(" DEBUG "));

        // A file with a wrong type: refused with its line, nothing changes.
        std::fs::write(&config, WRONG_TYPE).unwrap();
        let mark = gw.log().len();
        gw.signal("HUP");
        let err = wait_line(&gw, mark, "refused config", |l| {
            l.contains(" ERROR ") && l.contains("configuration not reloaded")
        });
        let log = gw.log();
        let tail = &log[mark..];
        assert!(
            tail.contains("line 8") && tail.contains("max_devices"),
            "the error names the key and line:\n{tail}"
        );
        assert!(err.contains("keeping the current one"), "{err}");
        ping_pong(&mut ws, b"after a refused reload");
        assert!(device_limit(&gw).contains("limit: 7"));

        // `fleetgate reload` (admin socket): exit 1 with the message.
        std::fs::write(&config, OUT_OF_RANGE).unwrap();
        let out = fleetgate()
            .args(["reload", "--data-dir"])
            .arg(gw.data_dir())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("http.max_headers") && stderr.contains("(line 4)"),
            "{stderr}"
        );
        // …and a good file through the same path: exit 0, the keys it applied.
        std::fs::write(&config, START).unwrap();
        let out = fleetgate()
            .args(["reload", "--data-dir"])
            .arg(gw.data_dir())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("applied: limits.max_devices, log.level"),
            "{stderr}"
        );
        assert!(device_limit(&gw).contains("unlimited"));
        ping_pong(&mut ws, b"still here");
        let (status, _) = gw.terminate();
        assert!(status.success(), "{status:?}");
    }
}

#[test]
fn rust_log_still_wins_over_a_reloaded_level() {
    // Gateway::start sets RUST_LOG=info.
    let gw = Gateway::start("epoll", Some(START), &[]);
    let config = gw.dir.path().join("fleetgate.toml");
    std::fs::write(&config, CHANGED).unwrap();
    let mark = gw.log().len();
    gw.signal("HUP");
    wait_line(&gw, mark, "RUST_LOG warning", |l| {
        l.contains(" WARN ") && l.contains("RUST_LOG is set")
    });
    let summary = wait_line(&gw, mark, "reload summary", |l| l.contains("re-read:"));
    assert!(
        summary.contains("limits.max_devices") && !summary.contains("log.level"),
        "{summary}"
    );
}
