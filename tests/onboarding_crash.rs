//! Crash safety of registration: `kill -9` the gateway in the middle of a registration storm,
//! start it again on the same data dir, and check that no one-time key was accepted twice and
//! that every device that reached "connection ready" reconnects with its credential.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Gateway;
use common::device::{Device, Outcome};

const KEYS: usize = 150;

#[test]
fn kill_9_during_a_registration_storm_loses_nothing_and_grants_nothing_twice() {
    let cfg = "[registration.rate_limit]\nfailures_per_minute = 0\n";
    let mut gw = Gateway::start("uring", Some(cfg), &["--shards", "2"]);
    let (ok, out, err) = common::run(
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args([
                "keys",
                "create",
                "--one-time",
                &KEYS.to_string(),
                "--data-dir",
            ])
            .arg(gw.data_dir()),
    );
    assert!(ok, "{err}");
    let keys: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(keys.len(), KEYS);

    // Devices panic on the I/O errors the kill causes; keep those quiet (restored below).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // Two devices per key, racing: at most one may ever be granted it.
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ready: Arc<Mutex<Vec<Device>>> = Arc::default();
    let granted_not_ready: Arc<Mutex<Vec<(Device, String)>>> = Arc::default();
    let grants: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let addr = gw.addr;
    let root = gw.root_pem();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (next, stop, ready, gnr, grants, keys, root) = (
                next.clone(),
                stop.clone(),
                ready.clone(),
                granted_not_ready.clone(),
                grants.clone(),
                keys.clone(),
                root.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= 2 * KEYS {
                        break;
                    }
                    let key = &keys[i / 2];
                    let mut d = Device::new(&format!("CRASH-{w}-{i:04}"));
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        d.register(addr, &root, key)
                    }));
                    match out {
                        Ok(Outcome::Registered { .. }) => {
                            grants
                                .lock()
                                .unwrap()
                                .entry(key.clone())
                                .or_default()
                                .push(d.unit.clone());
                            match d.session(addr, &root) {
                                Ok(_) => ready.lock().unwrap().push(d),
                                Err(_) => gnr.lock().unwrap().push((d, key.clone())),
                            }
                        }
                        Ok(Outcome::Refused { .. }) => {}
                        Err(_) => break, // the gateway is gone
                    }
                }
            })
        })
        .collect();
    // Let the storm run, then kill -9 in the middle of it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.lock().unwrap().len() < 30 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    gw.child.kill().unwrap(); // SIGKILL
    gw.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    std::panic::set_hook(hook);
    let attempted = next.load(Ordering::Relaxed).min(2 * KEYS);
    assert!(
        attempted < 2 * KEYS,
        "the storm finished before the kill; raise KEYS"
    );

    // Restart on the same data dir.
    let dir = std::mem::replace(&mut gw.dir, tempfile::tempdir().unwrap());
    drop(gw);
    let gw = Gateway::start_in(dir, "epoll", Some(cfg), &[]);

    // No key was granted to two devices, as the devices saw it…
    for (key, units) in grants.lock().unwrap().iter() {
        assert_eq!(units.len(), 1, "key {key} granted to {units:?}");
    }
    // …and as the registry recorded it.
    let reg = fleetgate::registry::Registry::open_in(&gw.data_dir()).unwrap();
    let devices = reg.list_devices().unwrap();
    let mut per_key: HashMap<i64, usize> = HashMap::new();
    for d in &devices {
        *per_key.entry(d.key_id.unwrap()).or_default() += 1;
    }
    assert!(per_key.values().all(|&n| n == 1), "{per_key:?}");
    // Every device that got "connection ready" comes back with its credential.
    let ready = std::mem::take(&mut *ready.lock().unwrap());
    assert!(ready.len() >= 30, "{}", ready.len());
    for d in &ready {
        d.session(gw.addr, &gw.root_pem())
            .unwrap_or_else(|e| panic!("{} cannot reconnect: {e}", d.unit));
    }
    // A device that was granted but never got ready (killed in between) may retry with the
    // same key pair and key: the registry gives it its credential again.
    for (mut d, key) in std::mem::take(&mut *granted_not_ready.lock().unwrap()) {
        let out = d.register(gw.addr, &gw.root_pem(), &key);
        assert_eq!(out.reason(), "granted", "{}: {out:?}", d.unit);
        d.session(gw.addr, &gw.root_pem())
            .expect("session after retry");
    }
    // Every registration the devices saw is in the registry (nothing granted was lost).
    let recorded: std::collections::HashSet<&str> =
        devices.iter().map(|d| d.unit_id.as_str()).collect();
    for units in grants.lock().unwrap().values() {
        for u in units {
            assert!(recorded.contains(u.as_str()), "{u} lost");
        }
    }
    eprintln!(
        "attempted {attempted}, granted {}, ready {}",
        devices.len(),
        ready.len()
    );
}
