//! `loadtest stream` end to end against the real gateway (this workspace's `fleetgate`
//! binary, which `cargo test --workspace` builds next to `loadtest`): devices registered with
//! `loadtest register`, a management certificate from `fleetgate mgmt add`, then file streams
//! on the lean wire (the default) and on tokio-tungstenite. Every byte must arrive, every
//! stream must end with the device's `close`, and the summary must say which wire ran.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A binary of this workspace's target directory.
fn binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_loadtest")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo test --workspace` does)",
        path.display()
    );
    path
}

struct Gateway {
    child: Child,
    addr: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gateway(data: &Path) -> Gateway {
    let mut child = Command::new(binary("fleetgate"))
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--shards", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fleetgate serve");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(i) = line.find("listening on ")
                && let Some(tx) = tx.take()
            {
                let addr = line[i + 13..].split_whitespace().next().unwrap_or("");
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the gateway did not start within 30 s");
    Gateway { child, addr }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn every_byte_arrives_on_the_lean_wire_and_on_tungstenite() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = dir.path().join("data");
    let gw = start_gateway(&data);
    let fleetgate = binary("fleetgate");
    let loadtest = binary("loadtest");
    let keys = run(Command::new(&fleetgate)
        .args(["keys", "create", "--one-time", "3", "--data-dir"])
        .arg(&data));
    std::fs::write(dir.path().join("keys.txt"), keys).unwrap();
    run(Command::new(&fleetgate)
        .args(["mgmt", "add", "lt", "--out"])
        .arg(dir.path().join("mgmt"))
        .arg("--data-dir")
        .arg(&data));
    let root = data.join("root.pem");
    let creds = dir.path().join("creds.jsonl");
    run(Command::new(&loadtest)
        .arg("register")
        .arg("--url")
        .arg(format!("wss://{}/usg/endpoint", gw.addr))
        .arg("--ca")
        .arg(&root)
        .arg("--keys")
        .arg(dir.path().join("keys.txt"))
        .args(["--devices", "3", "--creds-out"])
        .arg(&creds));

    for (wire, extra) in [("lean", &[][..]), ("tungstenite", &["--tungstenite"][..])] {
        let json = dir.path().join(format!("stream-{wire}.json"));
        // 3 streams of 2.5 MB with a 64 KiB window: credit goes round many times, and the
        // last chunk of each stream is a short one (2,500,000 is not a multiple of 16 KiB).
        run(Command::new(&loadtest)
            .arg("stream")
            .arg("--url")
            .arg(format!("wss://{}", gw.addr))
            .arg("--ca")
            .arg(&root)
            .arg("--creds")
            .arg(&creds)
            .arg("--mgmt-cert")
            .arg(dir.path().join("mgmt/lt.pem"))
            .arg("--mgmt-key")
            .arg(dir.path().join("mgmt/lt.key"))
            .args(["--streams", "3", "--size", "2.5", "--window", "65536"])
            .args(["--timeout", "120", "--json"])
            .arg(&json)
            .args(extra));
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(s["setup"]["wire"], wire, "{s:#}");
        assert_eq!(s["ok"], true, "{s:#}");
        assert_eq!(s["completed"], 3, "{s:#}");
        assert_eq!(s["bytes_total"], 7_500_000u64, "{s:#}");
        let devices = &s["devices"];
        assert_eq!(devices["stream_bytes"], 7_500_000u64, "{s:#}");
        assert_eq!(devices["streams_closed"], 3, "{s:#}");
        assert_eq!(devices["unexpected"], 0, "{s:#}");
        assert_eq!(devices["lost"], 0, "{s:#}");
        // The gateway's own figures: where the connections were, how long credit took.
        let sum = |v: &serde_json::Value| -> u64 {
            v.as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
                .sum()
        };
        let placement = &s["gateway_placement"];
        assert_eq!(sum(&placement["devices_per_shard"]), 3, "{s:#}");
        assert_eq!(sum(&placement["management_per_shard"]), 1, "{s:#}");
        assert!(
            s["gateway_stream_control"]["hops"].as_u64().unwrap() >= 3 * 76,
            "{s:#}"
        );
        // Credit each half window: at least 2,500,000 / 32,768 grants per stream.
        assert!(devices["credits"].as_u64().unwrap() >= 3 * 76, "{s:#}");
    }
}
