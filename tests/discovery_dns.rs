//! DNS discovery against a real DNS server started by the test: dnsmasq (Debian package
//! `dnsmasq-base`) on 127.0.0.1 and a free port, authoritative for `example.test`. Its query
//! log (`--log-queries`) proves the lookups really went over the wire.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetgate::discovery::{self, DiscoveredGateway, DiscoveryConfig, DiscoveryError};

/// A dnsmasq process; killed (by PID) when dropped, also when the test panics.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
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
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

const RECORDS: &[&str] = &[
    "--txt-record=igel-cloud-gateway.example.test,https://gw.example.test:8443/usg/endpoint",
    // Two records: two gateways.
    "--txt-record=igel-cloud-gateway.multi.example.test,wss://[2001:db8::7]:9443/usg/endpoint",
    "--txt-record=igel-cloud-gateway.multi.example.test,https://gw2.multi.example.test",
    // One record in two strings: joined.
    "--txt-record=igel-cloud-gateway.split.example.test,https://gw.split.exam,ple.test:8443/usg/endpoint",
    // Not a URL.
    "--txt-record=igel-cloud-gateway.bad.example.test,hello world",
    // The name exists but has no TXT record (NODATA).
    "--host-record=igel-cloud-gateway.nodata.example.test,192.0.2.1",
];

impl Dnsmasq {
    fn start(dir: &Path) -> Dnsmasq {
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
                .args(RECORDS)
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

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 10 s) for a query for `name` in the log.
    fn assert_queried(&self, name: &str) {
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

    fn config(&self) -> DiscoveryConfig {
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

fn gw(host: &str, port: u16, path: &str) -> DiscoveredGateway {
    DiscoveredGateway {
        host: host.into(),
        port,
        path: path.into(),
    }
}

#[test]
fn discovery_against_dnsmasq() {
    let dir = tempfile::tempdir().unwrap();
    let dns = Dnsmasq::start(dir.path());
    let cfg = dns.config();

    // The plain case.
    let found = discovery::discover("jo.smith@Example.test", &cfg).unwrap();
    assert_eq!(found, [gw("gw.example.test", 8443, "/usg/endpoint")]);
    dns.assert_queried("igel-cloud-gateway.example.test");

    // Two records, two gateways (DNS does not promise an order).
    let mut found = discovery::discover("a@multi.example.test", &cfg).unwrap();
    found.sort_by(|a, b| a.host.cmp(&b.host));
    assert_eq!(
        found,
        [
            gw("2001:db8::7", 9443, "/usg/endpoint"),
            gw("gw2.multi.example.test", 443, "/usg/endpoint")
        ]
    );

    // A record in several strings.
    let found = discovery::discover("a@split.example.test", &cfg).unwrap();
    assert_eq!(found, [gw("gw.split.example.test", 8443, "/usg/endpoint")]);

    // NXDOMAIN: a clear message naming the record.
    let err = discovery::discover("user@nosuch.example.test", &cfg).unwrap_err();
    assert!(
        matches!(&err, DiscoveryError::NoRecord { name, detail }
            if name == "igel-cloud-gateway.nosuch.example.test" && detail.contains("does not exist")),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("no TXT record igel-cloud-gateway.nosuch.example.test")
            && msg.contains("ask your administrator"),
        "{msg}"
    );
    dns.assert_queried("igel-cloud-gateway.nosuch.example.test");

    // NODATA: the name exists without TXT.
    let err = discovery::discover("user@nodata.example.test", &cfg).unwrap_err();
    assert!(
        matches!(&err, DiscoveryError::NoRecord { detail, .. } if detail.contains("no TXT record")),
        "{err}"
    );
    dns.assert_queried("igel-cloud-gateway.nodata.example.test");

    // A record that is not a gateway URL.
    let err = discovery::discover("user@bad.example.test", &cfg).unwrap_err();
    assert!(
        matches!(&err, DiscoveryError::Malformed { records, .. } if records[0].0 == "hello world"),
        "{err}"
    );
    assert!(err.to_string().contains("\"hello world\""), "{err}");

    // A bad e-mail address never reaches the DNS.
    let err = discovery::discover("not-an-email.example.test", &cfg).unwrap_err();
    assert!(matches!(err, DiscoveryError::BadEmail { .. }), "{err}");
    assert!(!dns.log_text().contains("not-an-email"));
}

#[test]
fn an_unreachable_name_server_is_a_lookup_error() {
    // Nothing listens on this port (bound and dropped); the resolver gives up after its retries.
    let port = free_port();
    let cfg = DiscoveryConfig {
        nameserver: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        timeout: Duration::from_millis(300),
        attempts: 1,
    };
    let err = discovery::discover("user@example.test", &cfg).unwrap_err();
    assert!(
        matches!(&err, DiscoveryError::Lookup { name, .. } if name == "igel-cloud-gateway.example.test"),
        "{err}"
    );
}
