//! DNS discovery against a real DNS server started by the test: dnsmasq (Debian package
//! `dnsmasq-base`) on 127.0.0.1 and a free port, authoritative for `example.test`. Its query
//! log (`--log-queries`) proves the lookups really went over the wire.

mod common;

use std::time::Duration;

use std::net::SocketAddr;

use common::dnsmasq::{Dnsmasq, free_port};
use fleetgate::discovery::{self, DiscoveredGateway, DiscoveryConfig, DiscoveryError};

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
    let dns = Dnsmasq::start(dir.path(), RECORDS);
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
