//! Fuzz entry points for `pki`: arbitrary bytes through every parser an operator's file can
//! reach (PEM sections, keystore, chain files, import of a CA with its key), then through
//! `show`-style inspection and verification when they parse. Must never panic.

#![forbid(unsafe_code)]

use crate::pki::ops::{self, Input};
use crate::pki::{CertInfo, Keystore, verify_ca_chain_at, verify_chain_at};

/// Fixed "now" so runs are reproducible (2030-01-01).
const NOW: i64 = 1_893_456_000;

/// Feeds `data` to the keystore/PEM parsers, and what parses to the verifier.
pub fn import(data: &[u8]) {
    let _ = crate::pki::pem::cert_pem(&data.to_vec().into());
    if let Ok(keystore) = Keystore::from_pem(data, "fuzz") {
        for cert in &keystore.chain {
            let _ = CertInfo::parse(cert);
        }
        let _ = keystore.fingerprint().to_string();
        let _ = verify_chain_at(
            &keystore.chain,
            Some(&keystore.key),
            &["gw.example.com".into(), "203.0.113.7".into()],
            NOW,
        );
        let written = keystore.to_pem();
        if written.len() <= crate::pki::pem::MAX_PEM_INPUT {
            if let Err(e) = Keystore::from_pem(written.as_bytes(), "round trip") {
                panic!("a keystore we wrote does not parse again: {e}");
            }
        }
    }
    if let Ok((chain, key)) = ops::load_chain(&[Input::bytes("fuzz", data)]) {
        let _ = verify_ca_chain_at(&chain, key.as_ref(), NOW);
    }
}
