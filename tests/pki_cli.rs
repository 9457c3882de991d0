//! `fleetgate pki …` end to end (in-process): create → issue → export → verify → install →
//! renew → rollover, for ECDSA and RSA; every chain also checked with `openssl verify` and
//! rustls-webpki.

#[path = "pki_util.rs"]
mod util;

use std::path::Path;

use fleetgate::pki::{self, DataDir, Keystore};
use util::*;

const HOSTS: &str = "gw.example.com;203.0.113.7;*.example.org;2001:db8::7";

/// root → intermediate (pathLen 0) → server certificate, all with `key_type`; returns the
/// exported keystore path.
fn make_chain(data: &Path, work: &Path, key_type: &str, tag: &str) -> std::path::PathBuf {
    let root = format!("Root {tag}");
    create_root(data, &root, &["--key-type", key_type]).ok();
    let mut args = vec![
        "create-intermediate",
        "--ca",
        &root,
        "--name",
        "Issuing CA",
        "--path-len",
        "0",
        "--key-type",
        key_type,
    ];
    let inter = format!("Issuing {tag}");
    args[4] = &inter;
    args.extend_from_slice(&SUBJECT);
    pki(data, &args).ok();
    let leaf = format!("gw {tag}");
    let r = issue(data, &inter, &leaf, HOSTS, &["--key-type", key_type]).ok();
    assert!(r.out.contains("DNS:*.example.org"), "{}", r.text());
    let out = work.join(format!("{tag}.keystore.pem"));
    pki(
        data,
        &["export", "--cert", &leaf, "--out", out.to_str().unwrap()],
    )
    .ok();
    assert_eq!(mode(&out), 0o600);
    out
}

fn check_with_real_tools(keystore: &Path, work: &Path) {
    let ks = Keystore::load(keystore).unwrap();
    assert_eq!(ks.chain.len(), 3);
    // rustls-webpki, directly, for every host.
    let hosts: Vec<String> = [
        "gw.example.com",
        "203.0.113.7",
        "a.example.org",
        "2001:db8::7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    pki::verify::webpki_check(&ks.chain, &hosts, pki::ops::now()).unwrap();
    // openssl verify -CAfile root.pem -untrusted inter.pem leaf.pem
    let (leaf, inter, root) = split_keystore(keystore, work);
    let (ok, text) = openssl_verify(work, &root, inter.as_deref(), &leaf);
    assert!(ok, "openssl verify failed: {text}");
    assert!(text.contains(": OK"), "{text}");
    // openssl also agrees on the host names and the IP.
    for (flag, value) in [
        ("-verify_hostname", "gw.example.com"),
        ("-verify_hostname", "x.example.org"),
        ("-verify_ip", "203.0.113.7"),
        ("-verify_ip", "2001:db8::7"),
    ] {
        let out = std::process::Command::new("openssl")
            .args(["verify", "-purpose", "sslserver", flag, value, "-CAfile"])
            .arg(&root)
            .arg("-untrusted")
            .arg(inter.as_ref().unwrap())
            .arg(&leaf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {flag} {value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And the private key matches the certificate according to openssl.
    let key_path = work.join("split-key.pem");
    std::fs::write(
        &key_path,
        pki::pem::encode("PRIVATE KEY", ks.key.secret_der()),
    )
    .unwrap();
    let from_cert = openssl(
        work,
        &["x509", "-noout", "-pubkey", "-in", leaf.to_str().unwrap()],
    );
    let from_key = openssl(
        work,
        &["pkey", "-pubout", "-in", key_path.to_str().unwrap()],
    );
    assert_eq!(from_cert, from_key);
}

#[test]
fn ecdsa_chain_verifies_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ks = make_chain(&data, tmp.path(), "ecdsa-p256", "ec");
    check_with_real_tools(&ks, tmp.path());
    let r = pki(
        &data,
        &[
            "verify",
            "--keystore",
            ks.to_str().unwrap(),
            "--host",
            "gw.example.com",
            "--host",
            "a.example.org;203.0.113.7",
        ],
    )
    .ok();
    assert!(r.out.starts_with("OK:"), "{}", r.text());
    // P-384 too.
    let ks = make_chain(&data, tmp.path(), "ecdsa-p384", "ec384");
    check_with_real_tools(&ks, tmp.path());
}

#[test]
fn rsa_chain_verifies_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ks = make_chain(&data, tmp.path(), "rsa2048", "rsa");
    check_with_real_tools(&ks, tmp.path());
    let r = pki(&data, &["show", "--keystore", ks.to_str().unwrap()]).ok();
    assert!(r.out.contains("RSA 2048"), "{}", r.out);
}

#[test]
fn files_modes_show_and_list() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let r = create_root(&data, "Example Root", &[]).ok();
    assert!(r.out.contains("example-root"), "{}", r.out);
    let dir = DataDir::new(&data);
    assert_eq!(mode(&dir.ca_key_path("example-root").unwrap()), 0o600);
    assert_eq!(mode(&dir.pki_dir()), 0o700);
    // Same name twice: refused (exit 1, not a panic).
    let again = create_root(&data, "Example Root", &[]);
    assert_eq!(again.code, 1, "{}", again.text());
    assert!(again.err.contains("already exists"));

    issue(&data, "Example Root", "gw", "gw.example.com", &[]).ok();
    let ks_path = tmp.path().join("ks.pem");
    pki(
        &data,
        &["export", "--cert", "gw", "--out", ks_path.to_str().unwrap()],
    )
    .ok();
    pki(&data, &["install", "--keystore", ks_path.to_str().unwrap()]).ok();
    assert_eq!(mode(&dir.keystore_path()), 0o600);
    assert_eq!(mode(&dir.root_pem_path()), 0o644);

    let show = pki(&data, &["show"]).ok();
    for needle in [
        "Subject:",
        "CN=gw",
        "Issuer:",
        "Validity:",
        "SANs:              DNS:gw.example.com",
        "Basic constraints: cA=false",
        "Basic constraints: cA=true",
        "Key type:          ECDSA P-256",
        "Part 1: ",
        "Part 4: ",
        "matches certificate 1",
    ] {
        assert!(
            show.out.contains(needle),
            "{needle:?} missing:\n{}",
            show.out
        );
    }
    let fp = Keystore::load(&dir.keystore_path()).unwrap().fingerprint();
    for part in fp.parts() {
        assert!(show.out.contains(&part));
    }
    // Private keys are never printed, by any command.
    for args in [
        vec!["show"],
        vec!["show", "--ca", "example-root"],
        vec!["show", "--cert", "gw"],
        vec!["list"],
        vec!["verify"],
    ] {
        let r = pki(&data, &args).ok();
        assert!(!r.text().contains("PRIVATE KEY"), "{args:?}: {}", r.text());
    }
    let list = pki(&data, &["list"]).ok();
    assert!(list.out.contains("example-root") && list.out.contains("can issue"));
    assert!(list.out.contains("gw:"));

    // Unknown names list the ones that exist.
    let r = issue(&data, "nope", "gw2", "gw.example.com", &[]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("available: example-root"), "{}", r.err);
}

#[test]
fn short_root_validity_warns_and_bad_arguments_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let r = create_root(tmp.path(), "Short Root", &["--days", "365"]).ok();
    assert!(
        r.err.contains("warning:") && r.err.contains("re-register"),
        "{}",
        r.err
    );
    // The server certificate's name must differ from the root's.
    let r = issue(
        tmp.path(),
        "Short Root",
        "Short Root",
        "gw.example.com",
        &[],
    );
    assert_eq!(r.code, 1);
    assert!(r.err.contains("must differ from the root"), "{}", r.err);
    // Bad hosts, bad days, bad country.
    let r = issue(tmp.path(), "short-root", "gw", "gw..example.com", &[]);
    assert_eq!(r.code, 1, "{}", r.text());
    let r = issue(tmp.path(), "short-root", "gw", "", &[]);
    assert_eq!(r.code, 1, "{}", r.text());
    let r = create_root(tmp.path(), "Zero", &["--days", "0"]);
    assert_eq!(r.code, 1, "{}", r.text());
    let r = pki(
        tmp.path(),
        &[
            "create-root",
            "--name",
            "X",
            "--org",
            "O",
            "--locality",
            "L",
            "--country",
            "UK",
        ],
    );
    assert_ne!(r.code, 0);
    assert!(r.err.contains("ISO 3166"), "{}", r.err);
    // A server certificate issued from a 1-year root outlives it: cut, with a warning.
    let r = issue(
        tmp.path(),
        "short-root",
        "gw",
        "gw.example.com",
        &["--days", "800"],
    )
    .ok();
    assert!(r.err.contains("outlive its CA"), "{}", r.err);
}

#[test]
fn renew_compatible_incompatible_and_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_owned();
    create_root(&data, "Root A", &[]).ok();
    create_root(&data, "Root B", &[]).ok();
    issue(&data, "root-a", "gw1", "gw.example.com;10.0.0.1", &[]).ok();
    issue(
        &data,
        "root-a",
        "gw2",
        "GW.example.com;10.0.0.1",
        &["--key-type", "rsa2048"],
    )
    .ok();
    issue(&data, "root-a", "gw3", "gw.example.com;10.0.0.2", &[]).ok();
    issue(&data, "root-b", "gw4", "gw.example.com;10.0.0.1", &[]).ok();
    for n in ["gw1", "gw2", "gw3", "gw4"] {
        pki(&data, &["export", "--cert", n, "--out", &p(n)]).ok();
    }
    // Renewal without an active keystore: a clear error.
    let r = pki(&data, &["renew", "--keystore", &p("gw2")]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("no active keystore"), "{}", r.err);

    pki(&data, &["install", "--keystore", &p("gw1")]).ok();
    let dir = DataDir::new(&data);
    let fp_a = dir.active_keystore().unwrap().unwrap().fingerprint();

    // Compatible: same root, same hosts (case-insensitive), CA-signed; key type may change.
    let r = pki(&data, &["renew", "--keystore", &p("gw2")]).ok();
    assert!(r.out.contains("renewed"), "{}", r.out);
    let active = dir.active_keystore().unwrap().unwrap();
    assert_eq!(
        pki::CertInfo::parse(active.leaf()).unwrap().key_type,
        "RSA 2048"
    );

    // Different host set.
    let r = pki(&data, &["renew", "--keystore", &p("gw3")]).rejected();
    assert!(r.err.contains("different host set"), "{}", r.err);
    assert!(r.err.contains("missing 10.0.0.1") && r.err.contains("added 10.0.0.2"));
    // Different root.
    let r = pki(&data, &["renew", "--keystore", &p("gw4")]).rejected();
    assert!(r.err.contains("different root"), "{}", r.err);
    // Nothing was installed by the refusals.
    assert_eq!(
        dir.active_keystore().unwrap().unwrap().leaf(),
        active.leaf()
    );
    // --force overrides compatibility.
    let r = pki(&data, &["renew", "--force", "--keystore", &p("gw3")]).ok();
    assert!(r.err.contains("forced despite"), "{}", r.text());

    // install refuses a root change unless forced.
    let r = pki(&data, &["install", "--keystore", &p("gw4")]).rejected();
    assert!(r.err.contains("different root"), "{}", r.err);
    assert!(r.err.contains("rollover"), "{}", r.err);
    assert_eq!(dir.active_keystore().unwrap().unwrap().fingerprint(), fp_a);
    // install --data-dir DIR installs elsewhere.
    let other = tmp.path().join("other");
    pki(
        &data,
        &[
            "install",
            "--keystore",
            &p("gw4"),
            "--data-dir",
            other.to_str().unwrap(),
        ],
    )
    .ok();
    assert!(other.join("keystore.pem").exists() && other.join("root.pem").exists());
}

#[test]
fn rollover_stage_status_switch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_owned();
    let dir = DataDir::new(&data);
    let boot = pki::bootstrap(&data, &["gw.example.com".into(), "127.0.0.1".into()]).unwrap();

    let r = pki(&data, &["rollover", "switch"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("no keystore is staged"), "{}", r.err);

    create_root(&data, "New Root", &[]).ok();
    issue(&data, "new-root", "gw-new", "gw.example.com;127.0.0.1", &[]).ok();
    issue(&data, "new-root", "gw-narrow", "gw.example.com", &[]).ok();
    pki(&data, &["export", "--cert", "gw-new", "--out", &p("new")]).ok();
    pki(
        &data,
        &["export", "--cert", "gw-narrow", "--out", &p("narrow")],
    )
    .ok();

    // Same root: that is a renewal, not a rollover.
    let r = pki(
        &data,
        &[
            "rollover",
            "stage",
            "--keystore",
            boot.keystore_path.to_str().unwrap(),
        ],
    )
    .rejected();
    assert!(r.err.contains("same root"), "{}", r.err);
    // The staged keystore must cover the active hosts.
    let r = pki(&data, &["rollover", "stage", "--keystore", &p("narrow")]).rejected();
    assert!(
        r.err.contains("127.0.0.1") && r.err.contains("host-covered"),
        "{}",
        r.err
    );

    let r = pki(&data, &["rollover", "stage", "--keystore", &p("new")]).ok();
    let new_fp = Keystore::load(Path::new(&p("new"))).unwrap().fingerprint();
    assert!(r.out.contains(&new_fp.to_string()), "{}", r.out);
    // Staging does not touch the active keystore.
    assert_eq!(
        dir.active_keystore().unwrap().unwrap().fingerprint(),
        boot.fingerprint
    );

    let r = pki(&data, &["rollover", "status"]).ok();
    assert!(r.out.contains("no report from the gateway"), "{}", r.out);
    assert!(r.out.contains(&boot.fingerprint.to_string()));
    pki::ops::write_device_report(
        &dir,
        &pki::ops::DeviceReport {
            updated_at: pki::ops::now(),
            staged_fingerprint: new_fp.hex(),
            connected: 10,
            have_new_root: 7,
            lack_new_root: 2,
            lack_feature: 1,
        },
    )
    .unwrap();
    let r = pki(&data, &["rollover", "status"]).ok();
    assert!(
        r.out
            .contains("10 connected, 7 hold the new root, 2 lack the new root, 1 lack the feature"),
        "{}",
        r.out
    );
    pki(&data, &["show", "--staged"]).ok();

    let r = pki(&data, &["rollover", "switch"]).ok();
    assert!(r.out.contains("3 device(s)"), "{}", r.out);
    assert_eq!(
        dir.active_keystore().unwrap().unwrap().fingerprint(),
        new_fp
    );
    assert_eq!(
        std::fs::read_to_string(dir.root_pem_path()).unwrap(),
        Keystore::load(Path::new(&p("new"))).unwrap().root_pem()
    );
    let previous = dir.rollover_dir().join("previous.pem");
    assert_eq!(
        Keystore::load(&previous).unwrap().fingerprint(),
        boot.fingerprint
    );
    assert_eq!(mode(&previous), 0o600);
    let r = pki(&data, &["rollover", "status"]).ok();
    assert!(r.out.contains("staged: nothing"), "{}", r.out);
}

#[test]
fn install_replaces_by_rename_never_in_place() {
    // A reader holding the old file open keeps seeing the old content: the file was replaced by
    // rename (new inode), which is what the gateway's watcher relies on.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    pki::bootstrap(&data, &["gw.example.com".into()]).unwrap();
    let dir = DataDir::new(&data);
    let before = std::fs::read(dir.keystore_path()).unwrap();
    let held = std::fs::File::open(dir.keystore_path()).unwrap();
    let ca = dir.list_cas().unwrap().remove(0);
    issue(&data, &ca, "renewed", "gw.example.com", &[]).ok();
    let out = tmp.path().join("renewed.pem");
    pki(
        &data,
        &[
            "export",
            "--cert",
            "renewed",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .ok();
    pki(&data, &["renew", "--keystore", out.to_str().unwrap()]).ok();
    use std::io::Read as _;
    let mut old = Vec::new();
    (&held).read_to_end(&mut old).unwrap();
    assert_eq!(old, before);
    assert_ne!(std::fs::read(dir.keystore_path()).unwrap(), before);
}
