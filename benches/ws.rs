//! Micro-benchmarks of the sans-IO WebSocket codec: header parsing for each length encoding,
//! decoding whole frames (unmask + UTF-8 check), encoding in both roles, and the masking fast
//! path against the byte loop. Everything is in memory; numbers are per call.
//!
//! Binary-frame decode benches decode the same buffer over and over: unmasking in place flips
//! the payload between its masked and unmasked form, which is harmless for binary payloads and
//! keeps buffer copies out of the measurement. The text bench restores the masked frame with
//! `iter_batched_ref` (set-up not timed).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fleetgate::proto::ws::{
    Decoder, Event, FrameHeader, OpCode, Role, WsLimits, apply_mask, apply_mask_naive,
    encode_binary, encode_frame,
};

const KEY: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, true, opcode, Some(KEY), payload).expect("data frame");
    out
}

fn header_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws/header_parse");
    for (name, len) in [
        ("small_7bit", 32usize),
        ("medium_16bit", 1024),
        ("large_64bit", 1 << 20),
    ] {
        let frame = client_frame(OpCode::Binary, &vec![0; len]);
        let header = &frame[..frame.len() - len];
        g.bench_function(name, |b| b.iter(|| FrameHeader::parse(black_box(header))));
    }
    g.finish();
}

/// Decodes one whole frame; returns the delivered payload length.
fn decode_one(decoder: &mut Decoder, frame: &mut [u8]) -> usize {
    match decoder.decode(frame) {
        Ok((_, Some(Event::Data { payload, .. }))) => payload.len(),
        other => panic!("{other:?}"),
    }
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws/decode_masked");
    for (name, len) in [("binary_32B", 32usize), ("binary_16KiB", 16 << 10)] {
        let mut frame = client_frame(OpCode::Binary, &vec![0xA5; len]);
        let mut decoder = Decoder::new(Role::Server, WsLimits::default());
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(name, |b| {
            b.iter(|| decode_one(&mut decoder, black_box(&mut frame)))
        });
    }
    // JSON-like ASCII (std's UTF-8 check has a word-at-a-time ASCII path) and Greek text.
    for (name, sample) in [
        ("text_ascii_16KiB", "{\"unit\":\"00E0C5\",\"v\":1} "),
        ("text_greek_16KiB", "κόσμε "),
    ] {
        let text: String = sample.chars().cycle().take(16 << 10).collect();
        let frame = client_frame(OpCode::Text, text.as_bytes());
        let mut decoder = Decoder::new(Role::Server, WsLimits::default());
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || frame.clone(),
                |frame| decode_one(&mut decoder, frame),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws/encode");
    for len in [32usize, 16 << 10] {
        let payload = vec![0x5A; len];
        let mut out = Vec::with_capacity(len + 14);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(
            BenchmarkId::new("server_unmasked", len),
            &payload,
            |b, p| {
                b.iter(|| {
                    out.clear();
                    encode_binary(&mut out, black_box(p), None);
                    out.len()
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("client_masked", len), &payload, |b, p| {
            b.iter(|| {
                out.clear();
                encode_binary(&mut out, black_box(p), Some(KEY));
                out.len()
            })
        });
    }
    g.finish();
}

fn mask(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws/mask");
    for size in [32usize, 1 << 10, 16 << 10, 64 << 10] {
        let mut buf = vec![0x42u8; size + 8];
        g.throughput(Throughput::Bytes(size as u64));
        // `align` shifts the slice start (memory alignment) and the key phase together.
        for align in [0usize, 3] {
            let id = format!("{size}B/align{align}");
            g.bench_function(BenchmarkId::new("fast", &id), |b| {
                b.iter(|| apply_mask(black_box(&mut buf[align..align + size]), KEY, align))
            });
            g.bench_function(BenchmarkId::new("naive", &id), |b| {
                b.iter(|| apply_mask_naive(black_box(&mut buf[align..align + size]), KEY, align))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_millis(1500))
        .warm_up_time(Duration::from_millis(500));
    targets = header_parse, decode, encode, mask
}
criterion_main!(benches);
