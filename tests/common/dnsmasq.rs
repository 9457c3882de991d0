//! A real DNS server for tests: dnsmasq (Debian package `dnsmasq-base`) on 127.0.0.1 and a
//! free port, authoritative for `example.test`, with the TXT records a test gives it. Its
//! query log (`--log-queries`) proves the lookups really went over the wire.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetgate::discovery::DiscoveryConfig;

/// A dnsmasq process; killed (by PID) when dropped, also when the test panics.
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

fn dnsmasq_binary() -> &'static str {
    for candidate in ["/usr/sbin/dnsmasq", "dnsmasq"] {
        if Command::new(candidate)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return candidate;
        }
    }
    panic!("these tests need dnsmasq: apt-get install -y dnsmasq-base");
}

/// A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both).
pub fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Dnsmasq {
    /// Starts dnsmasq with `records` (dnsmasq options such as `--txt-record=…`).
    pub fn start(dir: &Path, records: &[&str]) -> Dnsmasq {
        let binary = dnsmasq_binary();
        for attempt in 0..5 {
            let port = free_port();
            let log = dir.join(format!("dnsmasq-{attempt}.log"));
            let logfile = std::fs::File::create(&log).unwrap();
            let child = Command::new(binary)
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    "--local=/example.test/",
                    "--log-queries",
                    "--log-facility=-",
                    "--user=nobody",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
                .args(records)
                .stdout(Stdio::from(logfile.try_clone().unwrap()))
                .stderr(Stdio::from(logfile))
                .spawn()
                .expect("start dnsmasq");
            let mut server = Dnsmasq {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                log,
            };
            if server.wait_started() {
                return server;
            }
            // Lost a race for the port (or another start-up failure): try another port.
            eprintln!("dnsmasq did not start: {}", server.log_text());
        }
        panic!("dnsmasq failed to start 5 times");
    }

    /// True once dnsmasq logged its start; false if it exited. Bounded to 20 s.
    fn wait_started(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.log_text().contains("started, version") {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 10 s) for a query for `name` in the log.
    pub fn assert_queried(&self, name: &str) {
        let needle = format!("query[TXT] {name} from 127.0.0.1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains(&needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the dnsmasq log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn config(&self) -> DiscoveryConfig {
        DiscoveryConfig {
            nameserver: Some(self.addr),
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
