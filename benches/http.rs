//! Micro-benchmarks of the sans-IO HTTP layer: parsing the two heads the gateway sees most
//! (a device's WebSocket upgrade, a monitoring probe), the accept-key hash, and writing the
//! 101. Everything is in memory; numbers are per call.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetgate::proto::http::{
    HttpLimits, Parsed, check_upgrade, negotiate_subprotocol, parse_request, websocket_accept,
    write_switching_protocols,
};

/// A typical device upgrade request: ~250 bytes, 8 fields.
const UPGRADE: &[u8] = b"GET /usg/endpoint?unit=00E0C5A1B2C3 HTTP/1.1\r\n\
Host: gw.example.com:8443\r\n\
User-Agent: fleetgate-agent/0.1\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Protocol: usg.v2, usg.v1\r\n\
Accept-Encoding: identity\r\n\r\n";

/// What a monitoring probe sends.
const CHECK_STATUS: &[u8] = b"GET /usg/check-status HTTP/1.1\r\n\
Host: gw.example.com:8443\r\n\
User-Agent: check_http/v2.3.3 (monitoring-plugins 2.3.3)\r\n\
Connection: close\r\n\r\n";

fn parse(c: &mut Criterion) {
    let limits = HttpLimits::default();
    let mut g = c.benchmark_group("http/parse_request");
    g.throughput(Throughput::Bytes(UPGRADE.len() as u64));
    g.bench_function("upgrade", |b| {
        b.iter(|| parse_request(black_box(UPGRADE), &limits))
    });
    g.throughput(Throughput::Bytes(CHECK_STATUS.len() as u64));
    g.bench_function("check_status", |b| {
        b.iter(|| parse_request(black_box(CHECK_STATUS), &limits))
    });
    g.finish();

    // The whole server-side handshake: parse, validate, pick a protocol, write the 101.
    let mut out = Vec::with_capacity(256);
    c.bench_function("http/handshake_total", |b| {
        b.iter(|| {
            let Ok(Parsed::Complete { head, .. }) = parse_request(black_box(UPGRADE), &limits)
            else {
                unreachable!()
            };
            let up = check_upgrade(&head).unwrap();
            let p = negotiate_subprotocol(up.protocols, &["usg.v2", "usg.v1"]);
            out.clear();
            write_switching_protocols(&mut out, &up.accept, p);
            out.len()
        })
    });
}

fn accept(c: &mut Criterion) {
    c.bench_function("http/websocket_accept", |b| {
        b.iter(|| websocket_accept(black_box("dGhlIHNhbXBsZSBub25jZQ==")))
    });
}

fn write_101(c: &mut Criterion) {
    let mut out = Vec::with_capacity(256);
    c.bench_function("http/write_switching_protocols", |b| {
        b.iter(|| {
            out.clear();
            write_switching_protocols(
                &mut out,
                black_box("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                black_box(Some("usg.v2")),
            );
            out.len()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    targets = parse, accept, write_101
}
criterion_main!(benches);
