//! Operations, end to end without systemd: `packaging/install.sh --root` into a temporary root,
//! the gateway started from the installed files, `fleetgate status` and curl against it,
//! `update.sh` with a newer build while a keystore and a registry exist (both survive, a backup
//! is taken), `uninstall.sh --yes` (nothing left behind).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fleetgate::cli::status::{StatusArgs, probe};

fn packaging(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(script)
}

/// Runs a command to completion within `secs` (killed after that) and returns its output.
fn run_bounded(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{cmd:?} did not finish in {secs} s:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Runs a packaging script with `sh`; panics with its output unless it exits 0.
fn script(name: &str, args: &[&str]) -> String {
    let out = run_bounded(Command::new("sh").arg(packaging(name)).args(args), 60);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?} failed:\n{text}");
    text
}

fn script_fails(name: &str, args: &[&str]) -> String {
    let out = run_bounded(Command::new("sh").arg(packaging(name)).args(args), 60);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "{name} {args:?} should fail:\n{text}"
    );
    text
}

/// The gateway, started from the installed binary and config (data dir under the root).
struct Installed {
    child: Child,
    port: u16,
}

impl Installed {
    fn start(root: &Path) -> Installed {
        let mut child = Command::new(root.join("usr/bin/fleetgate"))
            .arg("--data-dir")
            .arg(root.join("var/lib/fleetgate"))
            .arg("serve")
            .arg("--config")
            .arg(root.join("etc/fleetgate/fleetgate.toml"))
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the installed fleetgate");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = String::new();
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log.push_str(&line);
                log.push('\n');
                if let Some(i) = line.find("listening on ") {
                    let addr = line[i + 13..].split_whitespace().next().unwrap_or("");
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(addr.to_owned()));
                    }
                }
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err(log));
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(addr)) => addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port in the listening line"),
            Ok(Err(log)) => {
                let _ = child.kill();
                panic!("the installed gateway exited before listening:\n{log}");
            }
            Err(_) => {
                let _ = child.kill();
                panic!("the installed gateway did not start within 30 s");
            }
        };
        Installed { child, port }
    }

    fn check_status_with_curl(&self, root: &Path) -> String {
        let out = run_bounded(
            Command::new("curl")
                .args(["-sS", "--max-time", "10", "--cacert"])
                .arg(root.join("var/lib/fleetgate/root.pem"))
                .arg(format!("https://127.0.0.1:{}/usg/check-status", self.port)),
            20,
        );
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// SIGTERM by PID; the gateway must exit 0 within 15 s.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "gateway exit status {st}");
                return;
            }
            assert!(Instant::now() < deadline, "gateway ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file and directory below `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn mode(p: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&p.metadata().unwrap().permissions()) & 0o7777
}

/// Adds a marker table and row to the registry (creating the file if the gateway has not).
fn mark_registry(db: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS ops_test_marker (v TEXT NOT NULL);
         INSERT INTO ops_test_marker (v) VALUES ('survives updates');",
    )
    .unwrap();
}

fn marker(db: &Path) -> Vec<String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut st = conn.prepare("SELECT v FROM ops_test_marker").unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn install_run_update_uninstall_in_a_temporary_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_fleetgate");

    // Install, twice (idempotent); the second run keeps a changed config.
    let out = script("install.sh", &["--root", root_s, "--binary", bin]);
    assert!(out.contains("installed /usr/bin/fleetgate"), "{out}");
    assert!(
        out.contains("would run: systemctl enable fleetgate.service"),
        "{out}"
    );
    let conf = root.join("etc/fleetgate/fleetgate.toml");
    let data = root.join("var/lib/fleetgate");
    assert_eq!(mode(&root.join("usr/bin/fleetgate")), 0o755);
    assert_eq!(mode(&conf), 0o640);
    assert_eq!(mode(&data), 0o750);
    assert!(root.join("etc/systemd/system/fleetgate.service").is_file());
    assert!(root.join("etc/fleetgate/fleetgate.toml.example").is_file());
    assert!(root.join("var/log/fleetgate").is_dir());
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\n# changed by the operator\n");
    std::fs::write(&conf, &text).unwrap();
    let out = script("install.sh", &["--root", root_s, "--binary", bin]);
    assert!(out.contains("already this build"), "{out}");
    assert!(
        out.contains("kept the existing /etc/fleetgate/fleetgate.toml"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);

    // A different build is not silently installed over this one: that is update.sh's job.
    let newer = tmp.path().join("fleetgate-newer");
    let mut bytes = std::fs::read(bin).unwrap();
    bytes.extend_from_slice(b"\0newer build\0"); // trailing bytes: still the same runnable ELF
    std::fs::write(&newer, &bytes).unwrap();
    std::fs::set_permissions(&newer, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let newer_s = newer.to_str().unwrap();
    let out = script_fails("install.sh", &["--root", root_s, "--binary", newer_s]);
    assert!(out.contains("update.sh"), "{out}");

    // Run it from the installed files; first start creates the keystore.
    let gw = Installed::start(&root);
    let body = gw.check_status_with_curl(&root);
    assert!(
        body == r#"{"status":"warn"}"# || body == r#"{"status":"init"}"#,
        "{body}"
    );
    let report = probe(
        &StatusArgs {
            url: Some(format!("https://127.0.0.1:{}", gw.port)),
            ca: None,
            insecure: false,
            config: Some(conf.clone()),
            timeout: 10,
        },
        Some(&data),
    )
    .unwrap();
    let summary = report.render();
    assert_eq!(report.exit_code(), 1, "{summary}");
    assert!(summary.contains(": WARN ("), "{summary}");
    assert!(summary.contains("0 devices, 0 management"), "{summary}");
    assert!(summary.contains("memory         RSS "), "{summary}");
    gw.stop();

    // State that an update must keep.
    let keystore = data.join("keystore.pem");
    let db = data.join("registry.db");
    mark_registry(&db);
    let keystore_before = std::fs::read(&keystore).expect("keystore after first start");
    let db_before = std::fs::read(&db).unwrap();

    // Update with the newer build.
    let out = script("update.sh", &["--root", root_s, "--binary", newer_s]);
    assert!(out.contains("registry backed up"), "{out}");
    assert_eq!(
        std::fs::read(root.join("usr/bin/fleetgate")).unwrap(),
        bytes
    );
    assert_eq!(std::fs::read(&keystore).unwrap(), keystore_before);
    if out.contains("fleetgate registry backup") {
        // fleetgate's own online backup records itself in the audit log: same rows plus one.
        assert_eq!(marker(&db), ["survives updates"]);
    } else {
        assert_eq!(std::fs::read(&db).unwrap(), db_before);
    }
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);
    let backups: Vec<PathBuf> = std::fs::read_dir(data.join("backups"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    let backup = &backups[0];
    assert!(
        backup
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("update-"),
        "{backup:?}"
    );
    assert_eq!(mode(backup), 0o700);
    assert_eq!(marker(&backup.join("registry.db")), ["survives updates"]);
    assert_eq!(
        std::fs::read(backup.join("keystore.pem")).unwrap(),
        keystore_before
    );
    assert_eq!(
        std::fs::read(backup.join("fleetgate")).unwrap(),
        std::fs::read(bin).unwrap()
    );

    // The updated installation starts and serves with the same certificate; the registry
    // keeps its rows (and is migrated if this build opens it).
    let gw = Installed::start(&root);
    let body = gw.check_status_with_curl(&root);
    assert!(body.contains("\"status\""), "{body}");
    gw.stop();
    assert_eq!(std::fs::read(&keystore).unwrap(), keystore_before);
    assert_eq!(marker(&db), ["survives updates"]);

    // Uninstall: refuses without confirmation, then removes everything below the root.
    let out = script_fails("uninstall.sh", &["--root", root_s]);
    assert!(out.contains("--yes"), "{out}");
    assert!(keystore.exists());
    let out = script("uninstall.sh", &["--root", root_s, "--yes"]);
    assert!(out.contains("fleetgate is uninstalled"), "{out}");
    assert_eq!(tree(&root), Vec::<String>::new(), "left behind");
}

#[test]
fn scripts_explain_their_options_and_refuse_unknown_ones() {
    for s in ["install.sh", "update.sh", "uninstall.sh"] {
        let out = script(s, &["--help"]);
        assert!(out.contains("--root DIR"), "{s}: {out}");
        let out = script_fails(s, &["--bogus"]);
        assert!(out.contains("unknown argument: --bogus"), "{s}: {out}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_str().unwrap();
    let out = script_fails(
        "update.sh",
        &["--root", root, "--binary", env!("CARGO_BIN_EXE_fleetgate")],
    );
    assert!(out.contains("not installed"), "{out}");
    let out = script_fails(
        "install.sh",
        &["--root", root, "--binary", "/nonexistent/fleetgate"],
    );
    assert!(out.contains("no binary at /nonexistent/fleetgate"), "{out}");
}
