//! The `pki_import` fuzz seeds and cheap mutations of them (every prefix, byte flips, line
//! drops) through the PEM/keystore parsers and the verifier: never a panic. With
//! `--features fuzzing` the fuzz entry point itself is exercised the same way.

use fleetgate::pki::ops::{self, Input};
use fleetgate::pki::{Keystore, verify_chain_at};

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/pki_import");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(out.len() >= 3, "seeds missing in {}", dir.display());
    out
}

fn exercise(data: &[u8]) {
    if let Ok(ks) = Keystore::from_pem(data, "mutant") {
        let _ = verify_chain_at(
            &ks.chain,
            Some(&ks.key),
            &["gw.example.com".into()],
            1_893_456_000,
        );
        let _ = ks.fingerprint().parts();
    }
    let _ = ops::load_chain(&[Input::bytes("mutant", data)]);
    #[cfg(feature = "fuzzing")]
    fleetgate::fuzzing::pki::import(data);
}

fn mutants(seed: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // Prefixes (truncation) every 7 bytes, and the last few.
    for len in (0..seed.len())
        .step_by(7)
        .chain(seed.len().saturating_sub(4)..seed.len())
    {
        out.push(seed[..len].to_vec());
    }
    // Byte flips at a spread of positions.
    for i in (0..seed.len()).step_by(13) {
        let mut m = seed.to_vec();
        m[i] ^= 0x55;
        out.push(m);
        let mut m = seed.to_vec();
        m[i] = b'-';
        out.push(m);
    }
    // Each line dropped, and each line duplicated.
    let lines: Vec<&[u8]> = seed.split(|b| *b == b'\n').collect();
    for i in 0..lines.len() {
        let mut dropped: Vec<&[u8]> = lines.clone();
        dropped.remove(i);
        out.push(dropped.join(&b'\n'));
        let mut doubled = lines.clone();
        doubled.insert(i, lines[i]);
        out.push(doubled.join(&b'\n'));
    }
    // CRLF line endings and base64 of the body re-wrapped.
    out.push(
        String::from_utf8_lossy(seed)
            .replace('\n', "\r\n")
            .into_bytes(),
    );
    out
}

#[test]
fn seeds_and_mutants_never_panic() {
    let mut total = 0;
    for (name, seed) in seeds() {
        exercise(&seed);
        for m in mutants(&seed) {
            exercise(&m);
            total += 1;
        }
        eprintln!("{name}: ok");
    }
    assert!(total > 500);
}

#[test]
fn valid_seeds_parse() {
    for (name, seed) in seeds() {
        let parsed = Keystore::from_pem(&seed, &name);
        if name.ends_with("keystore-ec.pem") || name.ends_with("chain-sec1-key-first-params.pem") {
            assert_eq!(parsed.as_ref().unwrap().chain.len(), 2, "{name}");
        }
        if name.ends_with("encrypted-legacy.pem") {
            assert!(matches!(
                parsed,
                Err(fleetgate::pki::PkiError::EncryptedKey { .. })
            ));
        }
        if name.ends_with("truncated.pem") {
            assert!(matches!(parsed, Err(fleetgate::pki::PkiError::Pem { .. })));
        }
    }
}
