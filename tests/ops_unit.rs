//! The systemd unit: `systemd-analyze verify` accepts it without a single warning, and it keeps
//! the properties the operations brief requires (unprivileged user, only
//! CAP_NET_BIND_SERVICE, raised LimitNOFILE, hardening that leaves io_uring usable).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/fleetgate.service")
}

fn unit() -> String {
    std::fs::read_to_string(unit_path()).unwrap()
}

/// `systemd-analyze verify FILE` with a time limit: (success, stderr).
fn verify(file: &Path) -> Option<(bool, String)> {
    let mut child = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(file)
        .env("SYSTEMD_LOG_COLOR", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "\n\n*** SKIPPED: systemd-analyze cannot run here ({e}); install the Debian package `systemd` ***\n"
            );
            return None;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("systemd-analyze verify hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

#[test]
fn systemd_analyze_verify_passes_without_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    // The unit as shipped names /usr/bin/fleetgate, which `verify` requires to exist; the copy
    // points at this build instead and is otherwise byte for byte the shipped unit.
    let text = unit();
    assert!(
        text.contains(
            "ExecStart=/usr/bin/fleetgate serve --config /etc/fleetgate/fleetgate.toml\n"
        )
    );
    let copy = tmp.path().join("fleetgate.service");
    std::fs::write(
        &copy,
        text.replace("/usr/bin/fleetgate", env!("CARGO_BIN_EXE_fleetgate")),
    )
    .unwrap();
    let Some((ok, out)) = verify(&copy) else {
        return;
    };
    assert!(ok, "systemd-analyze verify failed:\n{out}");
    assert_eq!(out.trim(), "", "systemd-analyze verify warned");

    // The shipped file itself: the only complaint allowed is the binary not being installed.
    let (ok, out) = verify(&unit_path()).unwrap();
    let installed = Path::new("/usr/bin/fleetgate").exists();
    let other: Vec<&str> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            installed
                || !l.contains(
                    "Command /usr/bin/fleetgate is not executable: No such file or directory",
                )
        })
        .collect();
    assert!(
        other.is_empty(),
        "systemd-analyze verify on the shipped unit:\n{out}"
    );
    assert!(ok || !installed, "{out}");
}

fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn unit_runs_unprivileged_hardened_and_io_uring_capable() {
    let u = unit();
    let one = |k: &str| {
        let v = values(&u, k);
        assert_eq!(v.len(), 1, "{k}: {v:?}");
        v[0].clone()
    };
    assert_eq!(one("Type"), "simple");
    assert_eq!(one("User"), "fleetgate");
    assert_eq!(one("Group"), "fleetgate");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("LimitNOFILE"), "1048576");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("StateDirectory"), "fleetgate");
    assert_eq!(one("ConfigurationDirectory"), "fleetgate");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert!(one("TimeoutStopSec").ends_with('s'));
    // A system-call allow list must name the io_uring calls, or io_uring is unavailable; deny
    // lists (~…) must not name them.
    for f in values(&u, "SystemCallFilter") {
        if let Some(deny) = f.strip_prefix('~') {
            assert!(!deny.contains("io_uring") && !deny.contains("@aio"), "{f}");
        } else {
            for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
                assert!(f.contains(call), "allow list without {call}: {f}");
            }
        }
    }
}
