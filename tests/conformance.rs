//! RFC 6455 conformance: the Autobahn|Testsuite fuzzing client (cases 1–10) against the
//! gateway's echo endpoint over real TLS, on both backends' default (auto). Every case must be
//! OK, NON-STRICT or INFORMATIONAL (`loadtest/conformance/autobahn_summary.py` decides).
//!
//! Needs Python 2.7 (pyenv's 2.7.18 on these machines) and PyPI for the first install; set
//! `FLEETGATE_SKIP_AUTOBAHN=1` to skip it on a machine without them (it then says so loudly).

mod common;

use std::process::Command;

#[test]
fn autobahn_cases_1_to_10_pass_on_the_echo_endpoint() {
    if std::env::var_os("FLEETGATE_SKIP_AUTOBAHN").is_some() {
        eprintln!("SKIPPED: FLEETGATE_SKIP_AUTOBAHN is set");
        return;
    }
    let gw = common::Gateway::start("auto", None, &[]);
    let out = gw.dir.path().join("autobahn");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/loadtest/conformance/autobahn.sh"
    );
    let status = Command::new("bash")
        .arg(script)
        .arg("--out")
        .arg(&out)
        .arg("--ca")
        .arg(gw.root_pem())
        .args(["--hostname", "localhost", "--timeout", "600"])
        .arg(format!("wss://127.0.0.1:{}/usg/echo", gw.port()))
        .status()
        .expect("run autobahn.sh");
    assert!(
        status.success(),
        "Autobahn found failures (see the summary above; reports in {})",
        out.display()
    );
}
