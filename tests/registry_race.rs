//! Registration races and crash safety against a real SQLite file: threads in one process,
//! two processes on the same file, and a process killed with SIGKILL in the middle of a
//! registration storm.
//!
//! The child processes are this test binary itself, re-run with `--exact child_worker` and the
//! `FLEETGATE_TEST_CHILD` environment variable (without it, `child_worker` does nothing).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use fleetgate::pki::Fingerprint;
use fleetgate::registry::{
    DeviceCredential, KeyFilter, KeyKind, KeyRef, OpenOptions, Reason, RegistrationRequest,
    Registry, UnixTime,
};

const T0: UnixTime = 1_750_000_000;

fn credential(tag: u32, index: u32) -> DeviceCredential {
    let mut fp = [0u8; 32];
    fp[..4].copy_from_slice(&tag.to_be_bytes());
    fp[4..8].copy_from_slice(&index.to_be_bytes());
    DeviceCredential {
        fingerprint: Fingerprint(fp),
        serial: index.to_be_bytes().to_vec(),
        not_after: T0 + 365 * 86_400,
        public_key_sha256: None,
    }
}

fn open(path: &Path) -> Registry {
    Registry::open(
        path,
        &OpenOptions {
            busy_timeout: Duration::from_secs(30),
            actor: "test".into(),
        },
    )
    .unwrap()
}

fn attempt(reg: &mut Registry, key: &str, unit: &str, cred: &DeviceCredential) -> Reason {
    match reg.consume_key(&RegistrationRequest {
        key,
        unit_id: unit,
        source: None,
        credential: cred,
        root: None,
        now: T0,
    }) {
        Ok(_) => Reason::Granted,
        Err(e) => {
            if e.reason() == Reason::InternalError {
                eprintln!("attempt for {unit}: {e}");
            }
            e.reason()
        }
    }
}

/// Checks the invariants a registry must keep whatever happened to the processes using it:
/// a one-time key is used at most once; a key has exactly as many devices as it granted
/// registrations; a device exists only for a consumed key.
fn check_invariants(reg: &Registry) -> usize {
    let keys = reg.list_keys(KeyFilter::All).unwrap();
    let devices = reg.list_devices().unwrap();
    let mut granted = 0;
    for k in &keys {
        let holders = devices.iter().filter(|d| d.key_id == Some(k.id)).count();
        if k.kind != KeyKind::Mass {
            assert!(k.use_count <= 1, "key #{} used {} times", k.id, k.use_count);
        }
        assert_eq!(
            holders as u64, k.use_count,
            "key #{} used {} times but {} devices hold it",
            k.id, k.use_count, holders
        );
        granted += holders;
    }
    assert_eq!(devices.len(), granted, "devices without a consumed key");
    granted
}

#[test]
fn sixteen_threads_racing_for_one_key_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let rounds = 10;
    let keys = open(&path).create_one_time_keys(rounds, T0).unwrap();
    for (round, key) in keys.iter().enumerate() {
        let barrier = Arc::new(Barrier::new(16));
        let handles: Vec<_> = (0..16u32)
            .map(|t| {
                let (barrier, path, value) =
                    (Arc::clone(&barrier), path.clone(), key.value.clone());
                std::thread::spawn(move || {
                    // Each thread has its own connection, as separate processes would.
                    let mut reg = open(&path);
                    let cred = credential(round as u32, t);
                    barrier.wait();
                    attempt(&mut reg, &value, &format!("UNIT-{round}-{t}"), &cred)
                })
            })
            .collect();
        let reasons: Vec<Reason> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wins = reasons.iter().filter(|r| **r == Reason::Granted).count();
        assert_eq!(wins, 1, "round {round}: {reasons:?}");
        assert!(
            reasons
                .iter()
                .all(|r| matches!(r, Reason::Granted | Reason::KeyUsed)),
            "{reasons:?}"
        );
    }
    let reg = open(&path);
    assert_eq!(check_invariants(&reg), rounds);
}

/// Runs one child process of this binary in `mode`; killed (SIGKILL) when dropped.
struct ChildGuard(Child);

impl ChildGuard {
    fn spawn(mode: &str, db: &Path, keys: &Path, id: u32, go: &Path) -> ChildGuard {
        ChildGuard::spawn_with(mode, db, keys, id, go, &[])
    }

    fn spawn_with(
        mode: &str,
        db: &Path,
        keys: &Path,
        id: u32,
        go: &Path,
        extra_env: &[(&str, &str)],
    ) -> ChildGuard {
        let child = Command::new(std::env::current_exe().unwrap())
            .envs(extra_env.iter().copied())
            .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
            .env("FLEETGATE_TEST_CHILD", mode)
            .env("FLEETGATE_TEST_DB", db)
            .env("FLEETGATE_TEST_KEYS", keys)
            .env("FLEETGATE_TEST_ID", id.to_string())
            .env("FLEETGATE_TEST_GO", go)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the test binary as a child");
        ChildGuard(child)
    }

    /// Waits for the exit (bounded); panics on timeout or failure.
    fn wait_ok(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                assert!(status.success(), "child failed: {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "child did not finish within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_keys(path: &Path, keys: &[String]) {
    let mut f = std::fs::File::create(path).unwrap();
    for k in keys {
        writeln!(f, "{k}").unwrap();
    }
}

/// Reads `GRANTED <index>` lines from a child's stdout.
fn granted_lines(out: impl std::io::Read) -> Vec<usize> {
    BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| granted_index(&l))
        .collect()
}

/// The index in a `GRANTED <index>` line. The test harness may print its own text on the same
/// line first ("test child_worker ... "), so the marker is searched, not expected at the start.
fn granted_index(line: &str) -> Option<usize> {
    let at = line.find("GRANTED ")?;
    Some(line[at + 8..].trim().parse().unwrap())
}

#[test]
fn two_processes_racing_for_the_same_keys_each_key_is_granted_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.db");
    let keys_file = dir.path().join("keys.txt");
    let go = dir.path().join("go");
    let n = 150;
    let keys: Vec<String> = open(&db)
        .create_one_time_keys(n, T0)
        .unwrap()
        .into_iter()
        .map(|k| k.value)
        .collect();
    write_keys(&keys_file, &keys);

    let mut children: Vec<ChildGuard> = (0..2)
        .map(|id| ChildGuard::spawn("race", &db, &keys_file, id, &go))
        .collect();
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let out = c.0.stdout.take().unwrap();
            std::thread::spawn(move || granted_lines(out))
        })
        .collect();
    std::fs::write(&go, b"").unwrap(); // both start together
    for c in &mut children {
        c.wait_ok(Duration::from_secs(120));
    }
    let mut all: Vec<usize> = readers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..n).collect::<Vec<_>>(),
        "every key granted exactly once"
    );
    assert_eq!(check_invariants(&open(&db)), n);
}

#[test]
fn kill_9_during_a_registration_storm_loses_nothing_committed_and_grants_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.db");
    let keys_file = dir.path().join("keys.txt");
    let go = dir.path().join("go");
    std::fs::write(&go, b"").unwrap();
    let n = 2_000;
    let (keys, mass) = {
        let mut reg = open(&db);
        let keys: Vec<String> = reg
            .create_one_time_keys(n, T0)
            .unwrap()
            .into_iter()
            .map(|k| k.value)
            .collect();
        (keys, reg.create_mass_key(None, T0).unwrap().value)
    };
    write_keys(&keys_file, &keys);

    // The child registers with every one-time key, then with the mass key for ever: whenever
    // the kill lands, a write transaction is in progress or about to be.
    let mut child = ChildGuard::spawn_with(
        "storm",
        &db,
        &keys_file,
        7,
        &go,
        &[("FLEETGATE_TEST_MASS", &mass)],
    );
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut reported = Vec::new();
    let mut line = String::new();
    while reported.len() < 200 {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child ended early");
        if let Some(i) = granted_index(&line) {
            reported.push(i);
        }
    }
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    reported.extend(granted_lines(out));

    // Reopen (SQLite recovers the WAL) and check.
    let mut reg = open(&db);
    let granted = check_invariants(&reg);
    assert!(granted >= reported.len());
    for &i in &reported {
        // Every registration the child was told about is durable: its device authenticates,
        // and its key is refused from now on.
        let cred = credential(7, i as u32);
        reg.authenticate(&cred.fingerprint, T0).unwrap();
        let other = credential(8, i as u32);
        assert_eq!(
            attempt(&mut reg, &keys[i], "SOMEONE-ELSE", &other),
            Reason::KeyUsed
        );
    }
    // The registry still works: an untouched key registers, or (if the child used them all)
    // the mass key does.
    let unused = reg.list_keys(KeyFilter::Unused).unwrap();
    let key = match unused.first() {
        Some(u) => keys
            .iter()
            .find(|k| reg.find_key(&KeyRef::parse(k)).unwrap().unwrap().id == u.id)
            .unwrap()
            .clone(),
        None => mass,
    };
    assert_eq!(
        attempt(&mut reg, &key, "LATE-UNIT", &credential(9, 0)),
        Reason::Granted
    );
    check_invariants(&reg);
}

/// The child side of the multi-process tests (does nothing in a normal test run).
#[test]
fn child_worker() {
    let Ok(mode) = std::env::var("FLEETGATE_TEST_CHILD") else {
        return;
    };
    let env = |k: &str| PathBuf::from(std::env::var(k).unwrap());
    let (db, keys_file, go) = (
        env("FLEETGATE_TEST_DB"),
        env("FLEETGATE_TEST_KEYS"),
        env("FLEETGATE_TEST_GO"),
    );
    let id: u32 = std::env::var("FLEETGATE_TEST_ID").unwrap().parse().unwrap();
    let keys: Vec<String> = std::fs::read_to_string(&keys_file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !go.exists() {
        assert!(Instant::now() < deadline, "no go signal");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stdout = std::io::stdout();
    match mode.as_str() {
        // Two threads per process, each walking every key: four contenders per key.
        "race" => {
            let handles: Vec<_> = (0..2u32)
                .map(|t| {
                    let (db, keys) = (db.clone(), keys.clone());
                    let tag = id * 2 + t;
                    std::thread::spawn(move || {
                        let mut reg = open(&db);
                        let mut won = Vec::new();
                        for (i, k) in keys.iter().enumerate() {
                            let unit = format!("P{tag}-{i}");
                            if attempt(&mut reg, k, &unit, &credential(tag, i as u32))
                                == Reason::Granted
                            {
                                won.push(i);
                            }
                        }
                        won
                    })
                })
                .collect();
            let mut lock = stdout.lock();
            for h in handles {
                for i in h.join().unwrap() {
                    writeln!(lock, "GRANTED {i}").unwrap();
                }
            }
        }
        // One registration after another, each reported as soon as it returned; then the
        // mass key for ever (until killed; bounded to 10 minutes).
        "storm" => {
            let mass = std::env::var("FLEETGATE_TEST_MASS").unwrap();
            let mut reg = open(&db);
            let mut lock = stdout.lock();
            for (i, k) in keys.iter().enumerate() {
                if attempt(&mut reg, k, &format!("S-{i}"), &credential(id, i as u32))
                    == Reason::Granted
                {
                    writeln!(lock, "GRANTED {i}").unwrap();
                    lock.flush().unwrap();
                }
            }
            let until = Instant::now() + Duration::from_secs(600);
            let mut j = 0u32;
            while Instant::now() < until {
                let cred = credential(id + 1_000, j);
                assert_eq!(
                    attempt(&mut reg, &mass, &format!("M-{j}"), &cred),
                    Reason::Granted
                );
                j += 1;
            }
        }
        other => panic!("unknown child mode {other}"),
    }
}
