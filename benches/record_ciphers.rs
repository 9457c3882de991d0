//! The record ciphers: how fast one core seals a full TLS record (16 KiB) with AES-128-GCM,
//! aws-lc-rs against *ring*. The gateway relays every byte through this twice (open on one
//! leg, seal on the other), which is why `tls::provider` takes ring's record ciphers while
//! aws-lc-rs keeps the handshake (`docs/architecture.md`, "Crypto providers").
//!
//! A second group seals a 20-byte record: the fixed cost of a record, paid once more per frame
//! when frames are not sealed together.
//!
//! `cargo bench --bench record_ciphers`: criterion prints the throughput of each.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const RECORD: usize = 16 * 1024;

/// The tail record a 16 KiB data frame would leave if each frame were sealed alone: its
/// WebSocket and envelope headers put it 20 bytes over a record (`Conn::pump_bulk` seals the
/// frames of a turn together instead, `TlsSession::send_parts`).
const TAIL: usize = 20;

fn seal(c: &mut Criterion) {
    seal_records(c, "aes128gcm_seal_16KiB", RECORD);
    seal_records(c, "aes128gcm_seal_20B", TAIL);
}

fn seal_records(c: &mut Criterion, name: &str, len: usize) {
    let key = [7u8; 16];
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(len as u64));
    let mut buf = vec![1u8; len];
    // The two crates have the same AEAD API under different paths.
    macro_rules! seal_with {
        ($name:literal, $aead:path) => {{
            use $aead as a;
            let k = a::LessSafeKey::new(a::UnboundKey::new(&a::AES_128_GCM, &key).unwrap());
            let mut seq = 0u64;
            group.bench_function($name, |b| {
                b.iter(|| {
                    seq += 1;
                    let mut n = [0u8; 12];
                    n[4..].copy_from_slice(&seq.to_be_bytes());
                    k.seal_in_place_separate_tag(
                        a::Nonce::assume_unique_for_key(n),
                        a::Aad::from([23u8, 3, 3, 0, 0]),
                        &mut buf,
                    )
                    .unwrap()
                })
            });
        }};
    }
    seal_with!("aws-lc-rs", aws_lc_rs::aead);
    seal_with!("ring", ring::aead);
    group.finish();
}

criterion_group!(benches, seal);
criterion_main!(benches);
