//! Chains made by the openssl CLI (root → intermediate → leaf, with extension files) import
//! and verify; a root or intermediate made by openssl, imported with its key, issues
//! certificates that openssl accepts. ECDSA and RSA; PKCS#8, PKCS#1 and SEC1 keys.

#[path = "pki_util.rs"]
mod util;

use std::path::{Path, PathBuf};

use fleetgate::pki::{self, DataDir, Keystore};
use util::*;

const INTER_EXT: &str = "basicConstraints=critical,CA:TRUE,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
";
const LEAF_EXT: &str = "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:gw.example.com,DNS:*.example.org,IP:203.0.113.7
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
";

/// Makes root.pem/key, inter.pem/key, leaf.pem/key in `dir` with openssl. `newkey` is an
/// `openssl req -newkey` argument (`rsa:2048`, `ec`).
fn openssl_chain(dir: &Path, newkey: &str) {
    std::fs::write(dir.join("inter.ext"), INTER_EXT).unwrap();
    std::fs::write(dir.join("leaf.ext"), LEAF_EXT).unwrap();
    let mut key_opts: Vec<&str> = vec!["-newkey", newkey];
    if newkey == "ec" {
        key_opts.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
    }
    let req = |extra: &[&str]| {
        let mut args = vec!["req", "-nodes"];
        args.extend_from_slice(&key_opts);
        args.extend_from_slice(extra);
        openssl(dir, &args);
    };
    req(&[
        "-x509",
        "-days",
        "3650",
        "-keyout",
        "root.key",
        "-out",
        "root.pem",
        "-subj",
        "/CN=OpenSSL Test Root/O=Example Ltd/C=DE",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    req(&[
        "-keyout",
        "inter.key",
        "-out",
        "inter.csr",
        "-subj",
        "/CN=OpenSSL Test Issuing CA/O=Example Ltd/C=DE",
    ]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "inter.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "1825",
            "-extfile",
            "inter.ext",
            "-out",
            "inter.pem",
        ],
    );
    req(&[
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=gw.example.com/O=Example Ltd",
    ]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "inter.pem",
            "-CAkey",
            "inter.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.pem",
        ],
    );
    let (ok, text) = openssl_verify(
        dir,
        &dir.join("root.pem"),
        Some(&dir.join("inter.pem")),
        &dir.join("leaf.pem"),
    );
    assert!(ok, "the openssl-made chain itself must be valid: {text}");
}

fn s(p: PathBuf) -> String {
    p.to_str().unwrap().to_owned()
}

fn import_and_verify(work: &Path, key_file: &str) {
    let data = work.join("data");
    let f = |n: &str| s(work.join(n));
    let r = pki(
        &data,
        &[
            "import",
            "--root",
            &f("root.pem"),
            "--intermediate",
            &f("inter.pem"),
            "--cert",
            &f("leaf.pem"),
            "--key",
            &f(key_file),
            "--host",
            "gw.example.com;203.0.113.7",
            "--install",
        ],
    )
    .ok();
    assert!(r.out.contains("imported server certificate"), "{}", r.out);
    assert!(r.out.contains("installed"), "{}", r.out);
    let dir = DataDir::new(&data);
    let ks = dir.active_keystore().unwrap().unwrap();
    assert_eq!(ks.chain.len(), 3);
    assert!(pki::verify(&ks, &["a.example.org".into(), "203.0.113.7".into()]).is_empty());
    // The keystore always holds a PKCS#8 key, whatever the import format was.
    let text = std::fs::read_to_string(dir.keystore_path()).unwrap();
    assert!(text.contains("-----BEGIN PRIVATE KEY-----"));
    assert!(!text.contains("RSA PRIVATE KEY") && !text.contains("EC PRIVATE KEY"));
    // The root.pem it wrote is the openssl root.
    assert_eq!(
        std::fs::read_to_string(dir.root_pem_path()).unwrap().trim(),
        std::fs::read_to_string(work.join("root.pem"))
            .unwrap()
            .trim()
    );
    // openssl accepts the installed keystore's key for the installed certificate.
    let keystore = s(dir.keystore_path());
    let a = openssl(work, &["x509", "-noout", "-pubkey", "-in", &keystore]);
    let b = openssl(work, &["pkey", "-pubout", "-in", &keystore]);
    assert_eq!(a, b);

    // verify --chain, in both orders, with the key among the files.
    for order in [
        ["leaf.pem", "inter.pem", "root.pem"],
        ["root.pem", "inter.pem", "leaf.pem"],
    ] {
        let mut args = vec!["verify".to_owned(), "--chain".to_owned()];
        args.extend(order.iter().map(|n| f(n)));
        args.push(f(key_file));
        args.extend(["--host".to_owned(), "x.example.org".to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = pki(&data, &args).ok();
        assert!(r.out.starts_with("OK:"), "{}", r.text());
    }
}

#[test]
fn openssl_ecdsa_chain_imports_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    openssl_chain(tmp.path(), "ec");
    import_and_verify(tmp.path(), "leaf.key");
}

#[test]
fn openssl_ecdsa_chain_with_sec1_key() {
    let tmp = tempfile::tempdir().unwrap();
    openssl_chain(tmp.path(), "ec");
    openssl(
        tmp.path(),
        &["ec", "-in", "leaf.key", "-out", "leaf.sec1.key"],
    );
    let text = std::fs::read_to_string(tmp.path().join("leaf.sec1.key")).unwrap();
    assert!(text.contains("BEGIN EC PRIVATE KEY"), "{text}");
    import_and_verify(tmp.path(), "leaf.sec1.key");
}

#[test]
fn openssl_rsa_chain_with_pkcs1_key() {
    let tmp = tempfile::tempdir().unwrap();
    openssl_chain(tmp.path(), "rsa:2048");
    openssl(
        tmp.path(),
        &[
            "rsa",
            "-in",
            "leaf.key",
            "-traditional",
            "-out",
            "leaf.pkcs1.key",
        ],
    );
    let text = std::fs::read_to_string(tmp.path().join("leaf.pkcs1.key")).unwrap();
    assert!(text.contains("BEGIN RSA PRIVATE KEY"), "{text}");
    import_and_verify(tmp.path(), "leaf.pkcs1.key");
}

#[test]
fn fullchain_file_and_intermediates_in_any_order() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    openssl_chain(work, "ec");
    let f = |n: &str| s(work.join(n));
    let full = format!(
        "{}{}",
        std::fs::read_to_string(work.join("leaf.pem")).unwrap(),
        std::fs::read_to_string(work.join("inter.pem")).unwrap()
    );
    std::fs::write(work.join("fullchain.pem"), full).unwrap();
    let data = work.join("data");
    pki(
        &data,
        &[
            "import",
            "--root",
            &f("root.pem"),
            "--cert",
            &f("fullchain.pem"),
            "--key",
            &f("leaf.key"),
            "--name",
            "from-fullchain",
        ],
    )
    .ok();
    let ks = DataDir::new(&data).cert("from-fullchain").unwrap();
    assert_eq!(ks.chain.len(), 3);
    assert!(pki::verify(&ks, &[]).is_empty());
}

#[test]
fn openssl_root_and_intermediate_with_keys_issue_certificates_openssl_accepts() {
    for newkey in ["ec", "rsa:2048"] {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path();
        openssl_chain(work, newkey);
        let f = |n: &str| s(work.join(n));
        let data = work.join("data");

        // A root CA with its key.
        let r = pki(
            &data,
            &[
                "import",
                "--root",
                &f("root.pem"),
                "--ca-key",
                &f("root.key"),
            ],
        )
        .ok();
        assert!(r.out.contains("openssl-test-root"), "{}", r.out);
        issue(
            &data,
            "openssl-test-root",
            "from-root",
            "gw.example.com;198.51.100.1",
            &[],
        )
        .ok();
        let out = work.join("from-root.pem");
        pki(
            &data,
            &["export", "--cert", "from-root", "--out", &s(out.clone())],
        )
        .ok();
        let (leaf, inter, root) = split_keystore(&out, work);
        assert!(inter.is_none());
        let (ok, text) = openssl_verify(work, &root, None, &leaf);
        assert!(ok, "{newkey}: {text}");
        assert_eq!(
            std::fs::read_to_string(&root).unwrap().trim(),
            std::fs::read_to_string(work.join("root.pem"))
                .unwrap()
                .trim()
        );

        // An intermediate (pathlen 0) with its key: issue from it.
        pki(
            &data,
            &[
                "import",
                "--root",
                &f("root.pem"),
                "--intermediate",
                &f("inter.pem"),
                "--ca-key",
                &f("inter.key"),
            ],
        )
        .ok();
        issue(
            &data,
            "openssl-test-issuing-ca",
            "from-inter",
            "gw.example.com",
            &[],
        )
        .ok();
        let out = work.join("from-inter.pem");
        pki(
            &data,
            &["export", "--cert", "from-inter", "--out", &s(out.clone())],
        )
        .ok();
        let ks = Keystore::load(&out).unwrap();
        assert_eq!(ks.chain.len(), 3);
        let (leaf, inter, root) = split_keystore(&out, work);
        let (ok, text) = openssl_verify(work, &root, inter.as_deref(), &leaf);
        assert!(ok, "{newkey}: {text}");
        pki::verify::webpki_check(&ks.chain, &["gw.example.com".into()], pki::ops::now()).unwrap();

        // pathlen:0 leaves no room for another intermediate below it.
        let mut args = vec![
            "create-intermediate",
            "--ca",
            "openssl-test-issuing-ca",
            "--name",
            "Too Deep",
        ];
        args.extend_from_slice(&SUBJECT);
        let r = pki(&data, &args).rejected();
        assert!(r.err.contains("path-length"), "{}", r.err);
    }
}

#[test]
fn ca_key_that_does_not_match_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    openssl_chain(work, "ec");
    let f = |n: &str| s(work.join(n));
    let r = pki(
        &work.join("data"),
        &[
            "import",
            "--root",
            &f("root.pem"),
            "--ca-key",
            &f("inter.key"),
        ],
    )
    .rejected();
    assert!(r.out.is_empty());
    assert!(
        r.err.contains("key-match") && r.err.contains("OpenSSL Test Root"),
        "{}",
        r.err
    );
    assert!(
        DataDir::new(work.join("data"))
            .list_cas()
            .unwrap()
            .is_empty()
    );
}
