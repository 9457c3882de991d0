//! Each rule violation gives its own message naming the certificate and the rule, and exit code
//! 2 — never a panic. Chains with exactly one defect are built with rcgen; broken files with
//! openssl and by hand.

#[path = "pki_util.rs"]
mod util;

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};
use util::*;

struct Made {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

#[derive(Clone)]
struct Spec {
    cn: &'static str,
    ca: IsCa,
    sans: Vec<&'static str>,
    /// Validity relative to now, in days.
    from: i64,
    to: i64,
}

fn spec(cn: &'static str, ca: IsCa) -> Spec {
    Spec {
        cn,
        ca,
        sans: Vec::new(),
        from: -1,
        to: 365,
    }
}

fn ca() -> IsCa {
    IsCa::Ca(BasicConstraints::Unconstrained)
}

fn make(s: &Spec, signer: Option<&Made>) -> Made {
    let key = KeyPair::generate().unwrap();
    let sans: Vec<String> = s.sans.iter().map(|x| x.to_string()).collect();
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, s.cn);
    params.is_ca = s.ca;
    let now = OffsetDateTime::now_utc();
    params.not_before = now + Duration::days(s.from);
    params.not_after = now + Duration::days(s.to);
    if matches!(s.ca, IsCa::Ca(_)) {
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    } else {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    }
    let cert = match signer {
        Some(m) => {
            params.use_authority_key_identifier_extension = true;
            let issuer = Issuer::from_params(&m.params, &m.key);
            params.signed_by(&key, &issuer).unwrap()
        }
        None => params.self_signed(&key).unwrap(),
    };
    Made {
        pem: cert.pem(),
        params,
        key,
    }
}

fn leaf_spec() -> Spec {
    Spec {
        sans: vec!["gw.example.com", "203.0.113.7"],
        ..spec("gw.example.com", IsCa::ExplicitNoCa)
    }
}

/// Writes root.pem, inter.pem, leaf.pem, key.pem for root → inter → leaf built from the specs.
fn write_chain(dir: &Path, root: &Spec, inter: &Spec, leaf: &Spec) -> Vec<String> {
    let r = make(root, None);
    let i = make(inter, Some(&r));
    let l = make(leaf, Some(&i));
    std::fs::write(dir.join("root.pem"), &r.pem).unwrap();
    std::fs::write(dir.join("inter.pem"), &i.pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), &l.pem).unwrap();
    std::fs::write(dir.join("key.pem"), l.key.serialize_pem()).unwrap();
    ["leaf.pem", "inter.pem", "root.pem", "key.pem"]
        .iter()
        .map(|n| dir.join(n).to_str().unwrap().to_owned())
        .collect()
}

fn verify_chain(dir: &Path, files: &[String], hosts: &[&str]) -> Run {
    let mut args = vec!["verify", "--chain"];
    args.extend(files.iter().map(String::as_str));
    for h in hosts {
        args.extend(["--host", h]);
    }
    pki(&dir.join("data"), &args)
}

/// Exit 2, exactly one FAIL line, naming `subject` and `rule`, containing `words`.
#[track_caller]
fn expect_one(run: Run, subject: &str, rule: &str, words: &str) -> String {
    let run = run.rejected();
    let fails: Vec<&str> = run.out.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert_eq!(
        fails.len(),
        1,
        "expected exactly one violation:\n{}",
        run.out
    );
    let line = fails[0];
    assert!(
        line.contains(&format!("CN={subject}")),
        "subject {subject:?} not named: {line}"
    );
    assert!(
        line.contains(&format!("[rule {rule}:")),
        "rule {rule} not named: {line}"
    );
    assert!(line.contains(words), "{words:?} not in: {line}");
    line.to_owned()
}

fn root() -> Spec {
    spec("Test Root", ca())
}

fn inter() -> Spec {
    spec("Test Inter", ca())
}

#[test]
fn a_valid_chain_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_chain(tmp.path(), &root(), &inter(), &leaf_spec());
    let r = verify_chain(tmp.path(), &files, &["gw.example.com", "203.0.113.7"]).ok();
    assert!(r.out.starts_with("OK:"));
}

#[test]
fn intermediate_with_ca_false() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_chain(
        tmp.path(),
        &root(),
        &spec("Test Inter", IsCa::ExplicitNoCa),
        &leaf_spec(),
    );
    expect_one(
        verify_chain(tmp.path(), &files, &[]),
        "Test Inter",
        "ca-flag",
        "cA=false",
    );
}

#[test]
fn path_len_zero_with_an_intermediate_below() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_chain(
        tmp.path(),
        &spec("Test Root", IsCa::Ca(BasicConstraints::Constrained(0))),
        &inter(),
        &leaf_spec(),
    );
    expect_one(
        verify_chain(tmp.path(), &files, &[]),
        "Test Root",
        "path-length",
        "pathLenConstraint=0",
    );
}

#[test]
fn leaf_with_ca_true() {
    let tmp = tempfile::tempdir().unwrap();
    let leaf = Spec {
        ca: ca(),
        ..leaf_spec()
    };
    let files = write_chain(tmp.path(), &root(), &inter(), &leaf);
    expect_one(
        verify_chain(tmp.path(), &files, &[]),
        "gw.example.com",
        "end-entity-not-ca",
        "cA=true",
    );
}

#[test]
fn leaf_without_san() {
    let tmp = tempfile::tempdir().unwrap();
    let leaf = Spec {
        sans: vec![],
        ..leaf_spec()
    };
    let files = write_chain(tmp.path(), &root(), &inter(), &leaf);
    expect_one(
        verify_chain(tmp.path(), &files, &[]),
        "gw.example.com",
        "san-present",
        "no Subject Alternative Name",
    );
}

#[test]
fn host_not_in_san() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_chain(tmp.path(), &root(), &inter(), &leaf_spec());
    let line = expect_one(
        verify_chain(tmp.path(), &files, &["gw.example.com", "other.example.com"]),
        "gw.example.com",
        "host-covered",
        "\"other.example.com\"",
    );
    assert!(
        line.contains("DNS:gw.example.com, IP:203.0.113.7"),
        "{line}"
    );
    // An IP that is not listed is its own message too.
    expect_one(
        verify_chain(tmp.path(), &files, &["203.0.113.8"]),
        "gw.example.com",
        "host-covered",
        "203.0.113.8",
    );
}

#[test]
fn expired() {
    let tmp = tempfile::tempdir().unwrap();
    let leaf = Spec {
        from: -400,
        to: -2,
        ..leaf_spec()
    };
    let files = write_chain(tmp.path(), &root(), &inter(), &leaf);
    expect_one(
        verify_chain(tmp.path(), &files, &[]),
        "gw.example.com",
        "validity",
        "expired on",
    );
}

#[test]
fn not_yet_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let i = Spec {
        from: 3,
        to: 400,
        ..inter()
    };
    let files = write_chain(tmp.path(), &root(), &i, &leaf_spec());
    expect_one(
        verify_chain(tmp.path(), &files, &[]),
        "Test Inter",
        "validity",
        "not yet valid",
    );
}

#[test]
fn key_that_belongs_to_another_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = write_chain(tmp.path(), &root(), &inter(), &leaf_spec());
    let other = tmp.path().join("other.key");
    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    files[3] = other.to_str().unwrap().to_owned();
    expect_one(
        verify_chain(tmp.path(), &files, &[]),
        "gw.example.com",
        "key-match",
        "belongs to another certificate",
    );
    // import refuses it the same way, and stores nothing.
    let r = pki(
        &tmp.path().join("data"),
        &[
            "import",
            "--root",
            &files[2],
            "--intermediate",
            &files[1],
            "--cert",
            &files[0],
            "--key",
            &files[3],
        ],
    )
    .rejected();
    assert!(r.err.contains("[rule key-match:"), "{}", r.err);
}

#[test]
fn signature_order_root_and_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A leaf signed by a different key under the same issuer name.
    let r = make(&root(), None);
    let i = make(&inter(), Some(&r));
    let impostor = make(&inter(), Some(&r));
    let l = make(&leaf_spec(), Some(&impostor));
    std::fs::write(dir.join("root.pem"), &r.pem).unwrap();
    std::fs::write(dir.join("inter.pem"), &i.pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), &l.pem).unwrap();
    let f = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    expect_one(
        verify_chain(dir, &[f("leaf.pem"), f("inter.pem"), f("root.pem")], &[]),
        "gw.example.com",
        "signature",
        "does not verify with the public key of",
    );
    // Wrong order.
    let files = write_chain(dir, &root(), &inter(), &leaf_spec());
    let r = verify_chain(
        dir,
        &[files[1].clone(), files[0].clone(), files[2].clone()],
        &[],
    )
    .rejected();
    assert!(r.out.contains("[rule signature:"), "{}", r.out);
    // Root missing.
    expect_one(
        verify_chain(dir, &[files[0].clone(), files[1].clone()], &[]),
        "Test Inter",
        "self-signed-root",
        "not self-signed",
    );
    // Only the server certificate.
    let r = verify_chain(dir, &[files[0].clone()], &[]).rejected();
    assert!(r.out.contains("[rule chain-shape:"), "{}", r.out);
    // Server certificate named like the root.
    let leaf = Spec {
        cn: "Test Root",
        ..leaf_spec()
    };
    let files = write_chain(dir, &root(), &inter(), &leaf);
    expect_one(
        verify_chain(dir, &files, &[]),
        "Test Root",
        "distinct-name",
        "same name",
    );
}

#[test]
fn every_violation_has_its_own_message() {
    // All defects at once: each is reported, one line each, with distinct texts.
    let tmp = tempfile::tempdir().unwrap();
    let leaf = Spec {
        ca: ca(),
        sans: vec![],
        from: -400,
        to: -1,
        ..leaf_spec()
    };
    let mut files = write_chain(
        tmp.path(),
        &spec("Test Root", IsCa::Ca(BasicConstraints::Constrained(0))),
        &spec("Test Inter", IsCa::ExplicitNoCa),
        &leaf,
    );
    let other = tmp.path().join("other.key");
    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    files[3] = other.to_str().unwrap().to_owned();
    let r = verify_chain(tmp.path(), &files, &["gw.example.com"]).rejected();
    let fails: Vec<&str> = r.out.lines().filter(|l| l.starts_with("FAIL ")).collect();
    for rule in [
        "validity",
        "ca-flag",
        "end-entity-not-ca",
        "san-present",
        "host-covered",
        "key-match",
    ] {
        assert!(
            fails.iter().any(|l| l.contains(&format!("[rule {rule}:"))),
            "{rule} missing:\n{}",
            r.out
        );
    }
    let mut unique = fails.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), fails.len());
}

fn broken_inputs(dir: &Path) -> Vec<(&'static str, PathBuf, &'static str)> {
    let files = write_chain(dir, &root(), &inter(), &leaf_spec());
    let leaf_pem = std::fs::read_to_string(&files[0]).unwrap();
    let w = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    // openssl-encrypted keys: PKCS#8 and legacy PEM encryption.
    openssl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-in",
            &files[3],
            "-passout",
            "pass:secret",
            "-out",
            "enc8.key",
        ],
    );
    openssl(dir, &["genrsa", "-out", "rsa.key", "2048"]);
    openssl(
        dir,
        &[
            "rsa",
            "-in",
            "rsa.key",
            "-aes256",
            "-traditional",
            "-passout",
            "pass:secret",
            "-out",
            "enc-legacy.key",
        ],
    );
    openssl(
        dir,
        &[
            "x509", "-in", &files[0], "-outform", "der", "-out", "leaf.der",
        ],
    );
    openssl(
        dir,
        &[
            "pkey", "-in", &files[3], "-outform", "der", "-out", "key.der",
        ],
    );
    let garbage_b64 = "-----BEGIN CERTIFICATE-----\nTUlJQmdhcmJhZ2U=\n-----END CERTIFICATE-----\n";
    let mut bad_b64 = leaf_pem.clone();
    bad_b64.insert_str(40, "!!");
    vec![
        (
            "encrypted PKCS#8 key",
            dir.join("enc8.key"),
            "openssl rsa -in encrypted.key -out decrypted.key",
        ),
        (
            "encrypted legacy key",
            dir.join("enc-legacy.key"),
            "openssl pkey -in encrypted.key",
        ),
        (
            "garbage",
            w("garbage.pem", b"this is not a certificate\n"),
            "not valid PEM",
        ),
        (
            "garbage base64 content",
            w("garbage2.pem", garbage_b64.as_bytes()),
            "not a valid X.509",
        ),
        (
            "bad base64",
            w("bad64.pem", bad_b64.as_bytes()),
            "invalid base64",
        ),
        (
            "truncated",
            w("truncated.pem", &leaf_pem.as_bytes()[..leaf_pem.len() / 2]),
            "truncated",
        ),
        ("empty", w("empty.pem", b""), "empty"),
        ("DER certificate", dir.join("leaf.der"), "binary DER"),
        ("DER key", dir.join("key.der"), "binary DER"),
        (
            "random bytes",
            w("random.bin", &[0x00, 0xff, 0x13, 0x37, 0x80, 0x0a]),
            "not valid PEM",
        ),
    ]
}

#[test]
fn broken_files_are_rejected_with_exit_2_and_a_clear_message_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    fleetgate::pki::bootstrap(&data, &["gw.example.com".into()]).unwrap();
    let good: Vec<String> = ["leaf.pem", "inter.pem", "root.pem", "key.pem"]
        .iter()
        .map(|n| dir.join(n).to_str().unwrap().to_owned())
        .collect();
    for (case, path, words) in broken_inputs(dir) {
        let bad = path.to_str().unwrap();
        let commands: Vec<Vec<&str>> = vec![
            vec!["verify", "--keystore", bad],
            vec!["verify", "--chain", bad],
            vec!["show", "--keystore", bad],
            vec!["install", "--keystore", bad],
            vec!["renew", "--keystore", bad],
            vec!["rollover", "stage", "--keystore", bad],
            vec!["import", "--root", bad],
            vec![
                "import",
                "--root",
                &good[2],
                "--intermediate",
                &good[1],
                "--cert",
                &good[0],
                "--key",
                bad,
            ],
            vec!["import", "--root", &good[2], "--ca-key", bad],
        ];
        for args in commands {
            let r = pki(&data, &args);
            assert_eq!(r.code, 2, "{case}: {args:?}: {}", r.text());
            assert!(
                r.err.contains(bad) && r.err.contains(words),
                "{case}: {args:?}: expected the file name and {words:?} in:\n{}",
                r.err
            );
        }
    }
    // Nothing was stored or installed by any of that.
    let dir = fleetgate::pki::DataDir::new(&data);
    assert_eq!(dir.list_cas().unwrap().len(), 1);
    assert_eq!(dir.list_certs().unwrap().len(), 1);
}

#[test]
fn encrypted_key_message_shows_how_to_decrypt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let inputs = broken_inputs(dir);
    let (_, enc, _) = &inputs[0];
    let f = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    let r = pki(
        &dir.join("data"),
        &[
            "import",
            "--root",
            &f("root.pem"),
            "--intermediate",
            &f("inter.pem"),
            "--cert",
            &f("leaf.pem"),
            "--key",
            enc.to_str().unwrap(),
        ],
    )
    .rejected();
    assert!(r.err.contains("the private key is encrypted"), "{}", r.err);
    assert!(
        r.err
            .contains("openssl rsa -in encrypted.key -out decrypted.key")
    );
    assert!(
        r.err
            .contains("openssl pkey -in encrypted.key -out decrypted.key")
    );
    // Following the advice works.
    openssl(
        dir,
        &[
            "pkey",
            "-in",
            enc.to_str().unwrap(),
            "-passin",
            "pass:secret",
            "-out",
            "decrypted.key",
        ],
    );
    pki(
        &dir.join("data"),
        &[
            "import",
            "--root",
            &f("root.pem"),
            "--intermediate",
            &f("inter.pem"),
            "--cert",
            &f("leaf.pem"),
            "--key",
            &f("decrypted.key"),
        ],
    )
    .ok();
}
