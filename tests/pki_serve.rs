//! Chains made by `fleetgate pki` against a running `fleetgate serve`: real TLS clients
//! (`curl --cacert`, `openssl s_client -verify_return_error`) connect with them, for ECDSA and
//! RSA; and a compatible renewal is picked up while WebSocket connections stay open.

mod common;
#[path = "pki_util.rs"]
mod util;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate::pki::{DataDir, Fingerprint, Keystore};
use rustls_pki_types::{CertificateDer, ServerName};
use util::*;

/// Starts `fleetgate serve` (2 shards, echo on) on the data dir `tmp/data`, with an optional
/// TOML config; the shared harness of `tests/common` kills it on drop.
fn serve(tmp: tempfile::TempDir, config: Option<&str>) -> common::Gateway {
    common::Gateway::start_in(tmp, "auto", config, &["--shards", "2"])
}

/// root → server certificate for localhost/127.0.0.1 with `key_type`, installed in `data`
/// before the gateway's first start (so it serves this instead of bootstrapping).
fn prepare(data: &Path, key_type: &str) {
    create_root(data, "Serve Test Root", &["--key-type", key_type]).ok();
    issue(
        data,
        "serve-test-root",
        "serve-test",
        "localhost;127.0.0.1;::1",
        &["--key-type", key_type],
    )
    .ok();
    let ks = data.join("export.pem");
    pki(
        data,
        &[
            "export",
            "--cert",
            "serve-test",
            "--out",
            ks.to_str().unwrap(),
        ],
    )
    .ok();
    pki(data, &["install", "--keystore", ks.to_str().unwrap()]).ok();
}

fn real_clients_connect(key_type: &str, expect_sig: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare(&data, key_type);
    let gw = serve(tmp, None);
    let root = data.join("root.pem");
    let url = format!("https://localhost:{}/usg/check-status", gw.port());
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&root)
        .arg(&url)
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "curl --cacert root.pem {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\""));

    for tls in ["-tls1_2", "-tls1_3"] {
        let out = Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{}", gw.port()))
            .args([
                "-servername",
                "localhost",
                "-verify_hostname",
                "localhost",
                tls,
            ])
            .arg("-CAfile")
            .arg(&root)
            .args(["-verify_return_error", "-brief"])
            .stdin(Stdio::null())
            .output()
            .expect("openssl is installed");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "openssl s_client {tls}: {text}");
        assert!(text.contains("Verification: OK"), "{text}");
        assert!(
            text.contains(expect_sig),
            "{tls}: expected {expect_sig}: {text}"
        );
    }
}

#[test]
fn curl_and_openssl_connect_with_an_ecdsa_chain() {
    real_clients_connect("ecdsa-p256", "Signature type: ECDSA");
}

#[test]
fn curl_and_openssl_connect_with_an_rsa_chain() {
    real_clients_connect("rsa2048", "Signature type: RSA");
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;
type Ws = tungstenite::WebSocket<Tls>;

fn tls_config(root_pem: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let ks_root =
        fleetgate::pki::ops::load_chain(&[fleetgate::pki::ops::Input::read(root_pem).unwrap()])
            .unwrap()
            .0;
    for c in ks_root {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS connection (verified against `config`'s root) and the leaf certificate it got.
fn tls_connect(port: u16, config: &Arc<rustls::ClientConfig>) -> (Tls, CertificateDer<'static>) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    let leaf = tls.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    (tls, leaf)
}

fn ws_connect(port: u16, config: &Arc<rustls::ClientConfig>) -> (Ws, CertificateDer<'static>) {
    let (tls, leaf) = tls_connect(port, config);
    let url = format!("wss://localhost:{port}/usg/echo");
    let (ws, _) = tungstenite::client(url.as_str(), tls).expect("WebSocket upgrade on /usg/echo");
    (ws, leaf)
}

fn echo(ws: &mut Ws, text: &str) {
    ws.send(tungstenite::Message::text(text)).unwrap();
    loop {
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => {
                assert_eq!(t.as_str(), text);
                return;
            }
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn export(data: &Path, name: &str) -> PathBuf {
    let out = data.join(format!("{name}.export.pem"));
    pki(
        data,
        &["export", "--cert", name, "--out", out.to_str().unwrap()],
    )
    .ok();
    out
}

#[test]
fn renewal_under_load_keeps_connections_and_new_ones_see_the_new_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare(&data, "ecdsa-p256");
    let gw = serve(tmp, None);
    let config = tls_config(&data.join("root.pem"));
    let old_leaf = Keystore::load(&DataDir::new(&data).keystore_path())
        .unwrap()
        .leaf()
        .clone();

    let mut held: Vec<Ws> = (0..20)
        .map(|i| {
            let (mut ws, leaf) = ws_connect(gw.port(), &config);
            assert_eq!(leaf, old_leaf);
            echo(&mut ws, &format!("before {i}"));
            ws
        })
        .collect();

    // A compatible certificate (same root, same hosts), installed with `pki renew`.
    issue(
        &data,
        "serve-test-root",
        "serve-test-2",
        "localhost;127.0.0.1;::1",
        &[],
    )
    .ok();
    let renewed = export(&data, "serve-test-2");
    let new_leaf = Keystore::load(&renewed).unwrap().leaf().clone();
    pki(&data, &["renew", "--keystore", renewed.to_str().unwrap()]).ok();

    // New connections get the new certificate within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, leaf) = tls_connect(gw.port(), &config);
        if leaf == new_leaf {
            break;
        }
        assert_eq!(leaf, old_leaf);
        assert!(
            Instant::now() < deadline,
            "the gateway did not pick up the renewed keystore"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mut fresh, leaf) = ws_connect(gw.port(), &config);
    assert_eq!(
        Fingerprint::of(&leaf),
        Fingerprint::of(&new_leaf),
        "new WebSocket connections see the new certificate"
    );
    echo(&mut fresh, "after, new connection");

    // Every connection opened before the renewal is still open and working.
    for (i, ws) in held.iter_mut().enumerate() {
        echo(ws, &format!("after {i}"));
    }
    for ws in held.iter_mut() {
        let _ = ws.close(None);
    }
}

#[test]
fn rollover_switch_is_served_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare(&data, "ecdsa-p256");
    let gw = serve(tmp, None);
    let old_config = tls_config(&data.join("root.pem"));
    let (mut held, _) = ws_connect(gw.port(), &old_config);

    create_root(&data, "Serve Test Root 2", &[]).ok();
    issue(
        &data,
        "serve-test-root-2",
        "serve-next",
        "localhost;127.0.0.1;::1",
        &[],
    )
    .ok();
    let next = export(&data, "serve-next");
    pki(
        &data,
        &["rollover", "stage", "--keystore", next.to_str().unwrap()],
    )
    .ok();
    // Staging changes nothing for clients.
    std::thread::sleep(Duration::from_millis(1500));
    tls_connect(gw.port(), &old_config);

    pki(&data, &["rollover", "switch"]).ok();
    let new_config = tls_config(&data.join("root.pem"));
    let new_leaf = Keystore::load(&next).unwrap().leaf().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tcp = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
        let conn = rustls::ClientConnection::new(
            new_config.clone(),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut ok = true;
        while tls.conn.is_handshaking() {
            if tls.conn.complete_io(&mut tls.sock).is_err() {
                ok = false;
                break;
            }
        }
        if ok && tls.conn.peer_certificates().unwrap()[0] == new_leaf {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the switched keystore was not served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The connection opened under the old root is still served.
    echo(&mut held, "still here");
}

/// Issues a compatible server certificate `name` (same root, same hosts) and copies its
/// keystore over `DATA_DIR/keystore.pem` by hand, as an operator's own tooling would; returns
/// the new leaf. Nothing tells the gateway: the caller does (SIGHUP, `fleetgate reload`).
fn replace_keystore_by_hand(data: &Path, name: &str) -> CertificateDer<'static> {
    issue(
        data,
        "serve-test-root",
        name,
        "localhost;127.0.0.1;::1",
        &[],
    )
    .ok();
    let renewed = export(data, name);
    let new_leaf = Keystore::load(&renewed).unwrap().leaf().clone();
    std::fs::copy(&renewed, DataDir::new(data).keystore_path()).unwrap();
    new_leaf
}

#[test]
fn sighup_installs_a_replaced_keystore_without_dropping_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare(&data, "ecdsa-p256");
    // Polling of the keystore file is effectively off: only SIGHUP can install it.
    let gw = serve(tmp, Some("[server]\nkeystore_poll_ms = 3600000\n"));
    let config = tls_config(&data.join("root.pem"));
    let (mut held, old_leaf) = ws_connect(gw.port(), &config);
    echo(&mut held, "before");

    let new_leaf = replace_keystore_by_hand(&data, "serve-hup");
    assert_ne!(new_leaf, old_leaf);
    std::thread::sleep(Duration::from_millis(300));
    let (_, leaf) = tls_connect(gw.port(), &config);
    assert_eq!(leaf, old_leaf, "not installed before the signal");
    let ok = Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, leaf) = tls_connect(gw.port(), &config);
        if leaf == new_leaf {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not install the keystore"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    echo(&mut held, "after");
}

#[test]
fn fleetgate_reload_installs_a_replaced_keystore_through_the_admin_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    prepare(&data, "ecdsa-p256");
    let gw = serve(tmp, Some("[server]\nkeystore_poll_ms = 3600000\n"));
    let config = tls_config(&data.join("root.pem"));
    let (_, old_leaf) = tls_connect(gw.port(), &config);

    // A second gateway on the same data dir is refused: the admin socket answers.
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another gateway is already running with data dir"),
        "{err}"
    );

    let new_leaf = replace_keystore_by_hand(&data, "serve-reload");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("--data-dir")
        .arg(&data)
        .arg("reload")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Installed when `reload` returns: the very next connection sees it.
    let (_, leaf) = tls_connect(gw.port(), &config);
    assert_eq!(leaf, new_leaf);
    assert_ne!(leaf, old_leaf);

    // A broken keystore is refused and the served one stays.
    std::fs::write(DataDir::new(&data).keystore_path(), b"garbage").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("--data-dir")
        .arg(&data)
        .arg("reload")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kept its current keystore"), "{err}");
    let (_, leaf) = tls_connect(gw.port(), &config);
    assert_eq!(leaf, new_leaf);
}
