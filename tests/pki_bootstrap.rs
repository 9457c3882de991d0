//! First start: `pki::bootstrap` makes a working keystore, is idempotent, and what it makes
//! verifies with our rules, rustls-webpki, and `openssl verify`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use fleetgate::pki::{self, DataDir, Keystore};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn hosts() -> Vec<String> {
    ["localhost", "127.0.0.1", "::1", "gw.test"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn bootstrap_creates_then_reuses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let b = pki::bootstrap(&data, &hosts()).unwrap();
    assert!(b.created);
    assert_eq!(b.keystore_path, data.join("keystore.pem"));
    assert_eq!(b.root_pem_path, data.join("root.pem"));
    assert_eq!(mode(&b.keystore_path), 0o600);
    assert_eq!(mode(&b.root_pem_path), 0o644);
    assert_eq!(mode(&data.join("pki")), 0o700);

    let ks = Keystore::load(&b.keystore_path).unwrap();
    assert_eq!(ks.chain.len(), 2);
    assert_eq!(ks.fingerprint(), b.fingerprint);
    let violations = pki::verify(&ks, &hosts());
    assert!(violations.is_empty(), "{violations:?}");

    // The root's key is stored so `pki issue` can issue from it later.
    let dir = DataDir::new(&data);
    let cas = dir.list_cas().unwrap();
    assert_eq!(cas.len(), 1, "{cas:?}");
    let ca = dir.ca(&cas[0]).unwrap();
    assert!(ca.key.is_some());
    assert_eq!(mode(&dir.ca_key_path(&cas[0]).unwrap()), 0o600);
    let root_info = pki::CertInfo::parse(ks.root()).unwrap();
    assert!(root_info.display_name().starts_with("fleetgate root CA "));
    assert!(root_info.not_after - root_info.not_before >= 3650 * 86400);

    // Second call: nothing new, same fingerprint; root.pem is rewritten when missing.
    std::fs::remove_file(&b.root_pem_path).unwrap();
    let b2 = pki::bootstrap(&data, &hosts()).unwrap();
    assert!(!b2.created);
    assert_eq!(b2.fingerprint, b.fingerprint);
    assert_eq!(
        std::fs::read_to_string(&b.root_pem_path).unwrap(),
        ks.root_pem()
    );

    // Keystore deleted but the root is still in pki/ca: the same root is reused.
    std::fs::remove_file(&b.keystore_path).unwrap();
    let b3 = pki::bootstrap(&data, &hosts()).unwrap();
    assert!(b3.created);
    assert_eq!(b3.fingerprint, b.fingerprint);

    // openssl agrees.
    let leaf = tmp.path().join("leaf.pem");
    std::fs::write(&leaf, pki::pem::cert_pem(ks.leaf())).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&b.root_pem_path)
        .arg(&leaf)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn keystore_save_load_round_trip_and_format() {
    let tmp = tempfile::tempdir().unwrap();
    let b = pki::bootstrap(tmp.path(), &hosts()).unwrap();
    let ks = Keystore::load(&b.keystore_path).unwrap();
    let text = std::fs::read_to_string(&b.keystore_path).unwrap();
    let labels: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("-----BEGIN "))
        .collect();
    assert_eq!(
        labels,
        [
            "-----BEGIN CERTIFICATE-----",
            "-----BEGIN CERTIFICATE-----",
            "-----BEGIN PRIVATE KEY-----"
        ]
    );
    let copy = tmp.path().join("copy.pem");
    ks.save(&copy).unwrap();
    assert_eq!(mode(&copy), 0o600);
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), text);
    // Debug never shows the key.
    let dbg = format!("{ks:?}");
    assert!(!dbg.contains("PRIVATE"), "{dbg}");
    // The key loads in rustls (what the gateway does with it).
    let key = ks.key.clone_key();
    rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).unwrap();
}
