//! `docs/protocol.md` is precise enough to implement from alone: `tests/peers/cleanroom.py` is a
//! device agent and a management client written in Python from that document only (standard
//! library + `cryptography`; its WebSocket framing, envelope codec, fingerprint check, CSR,
//! registration, relay requests, events, a credit-controlled file push and `management_down`
//! are its own). This test runs its scenario against the real gateway (Debian's
//! `/usr/bin/python3`; `.ci/run` installs `python3-cryptography`) and fails on any step that
//! fails.

mod common;

use std::process::Command;

use common::Gateway;

#[test]
fn a_python_agent_and_client_written_from_the_protocol_document_alone_work() {
    let gw = Gateway::start("uring", None, &[]);
    let work = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/cleanroom.py");
    let out = Command::new("/usr/bin/python3")
        .arg(script)
        .args(["--host", "127.0.0.1", "--port"])
        .arg(gw.port().to_string())
        .arg("--data-dir")
        .arg(gw.data_dir())
        .arg("--bin")
        .arg(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("--work")
        .arg(work.path())
        .output()
        .expect("/usr/bin/python3 runs (apt-get install python3 python3-cryptography)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        out.status.success() && failed.is_empty(),
        "the clean-room peer failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let passed = stdout.lines().filter(|l| l.starts_with("PASS")).count();
    assert!(passed >= 25, "only {passed} steps ran:\n{stdout}");
}
