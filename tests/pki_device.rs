//! Device credentials: certificates from the device CA are accepted by `openssl verify` for
//! TLS clients only, and by a rustls server doing mutual TLS with the device CA as its client
//! trust anchor; certificates from another CA are refused.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use fleetgate::pki::{self, DeviceCa, Fingerprint, IssuedDevice, PkiError};
use rcgen::{KeyPair, PublicKeyData as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use time::{Duration, OffsetDateTime};

fn issue(ca: &DeviceCa, unit: &str) -> (IssuedDevice, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let dev = ca
        .issue(
            unit,
            &key.subject_public_key_info(),
            pki::device::DEVICE_CERT_DAYS,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    (dev, key)
}

fn openssl_verify(dir: &Path, ca: &Path, cert: &Path, purpose: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(ca)
        .args(["-purpose", purpose])
        .arg(cert)
        .output()
        .expect("openssl is installed");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn openssl_accepts_device_certs_for_clients_only() {
    let data = tempfile::tempdir().unwrap();
    let ca = pki::ensure_device_ca(data.path()).unwrap();
    let (dev, _key) = issue(&ca, "00E0C5A1B2C3");
    let work = tempfile::tempdir().unwrap();
    let cert = work.path().join("cert.pem");
    std::fs::write(&cert, &dev.cert_pem).unwrap();
    let ca_pem = pki::device::device_ca_pem_path(data.path());

    let (ok, text) = openssl_verify(work.path(), &ca_pem, &cert, "sslclient");
    assert!(ok, "openssl verify -purpose sslclient failed: {text}");
    let (ok, text) = openssl_verify(work.path(), &ca_pem, &cert, "sslserver");
    assert!(
        !ok,
        "a device certificate must not pass as a server: {text}"
    );
    assert!(text.contains("unsuitable certificate purpose"), "{text}");

    // Subject and serial as openssl reads them.
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-serial", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CN = 00E0C5A1B2C3"), "{text}");
    assert!(
        text.contains(&format!("serial={}", dev.serial_hex)),
        "{text}"
    );

    // A certificate from another device CA is refused.
    let other_dir = tempfile::tempdir().unwrap();
    let other = pki::ensure_device_ca(other_dir.path()).unwrap();
    let (foreign, _) = issue(&other, "00E0C5A1B2C3");
    let foreign_path = work.path().join("foreign.pem");
    std::fs::write(&foreign_path, &foreign.cert_pem).unwrap();
    let (ok, _) = openssl_verify(work.path(), &ca_pem, &foreign_path, "sslclient");
    assert!(!ok);
}

#[test]
fn verify_device_cert_checks_issuer_and_time() {
    let data = tempfile::tempdir().unwrap();
    let ca = pki::ensure_device_ca(data.path()).unwrap();
    let (dev, _) = issue(&ca, "unit-1");
    let now = OffsetDateTime::now_utc();
    pki::verify_device_cert(&ca, &dev.cert_der, now).unwrap();

    let other_dir = tempfile::tempdir().unwrap();
    let other = pki::ensure_device_ca(other_dir.path()).unwrap();
    let (foreign, _) = issue(&other, "unit-1");
    let e = pki::verify_device_cert(&ca, &foreign.cert_der, now).unwrap_err();
    assert!(matches!(e, PkiError::Untrusted { .. }), "{e}");

    let e = pki::verify_device_cert(&ca, &dev.cert_der, now + Duration::days(6 * 365)).unwrap_err();
    assert!(matches!(e, PkiError::Untrusted { .. }), "{e}");
    // Not yet valid (more than the one hour of backdating before issue).
    let e = pki::verify_device_cert(&ca, &dev.cert_der, now - Duration::hours(2)).unwrap_err();
    assert!(matches!(e, PkiError::Untrusted { .. }), "{e}");
    // The CA itself is not a device certificate.
    assert!(pki::verify_device_cert(&ca, ca.cert_der(), now).is_err());
}

// ---- mutual TLS with rustls ----

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server certificate for "localhost" (self-signed; the client trusts it directly).
struct ServerId {
    cert: CertificateDer<'static>,
    key: KeyPair,
}

fn server_id() -> ServerId {
    let key = KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    ServerId {
        cert: cert.der().clone(),
        key,
    }
}

/// The gateway side: mutual TLS with the device CA (read from `DATA_DIR/device-ca.pem`, as the
/// TLS server will) as the only client trust anchor.
fn server_config(data_dir: &Path, id: &ServerId) -> Arc<rustls::ServerConfig> {
    let pem = std::fs::read_to_string(pki::device::device_ca_pem_path(data_dir)).unwrap();
    let der = pem_cert_der(&pem);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![id.cert.clone()],
                PrivateKeyDer::Pkcs8(id.key.serialize_der().into()),
            )
            .unwrap(),
    )
}

/// The device side: trusts the server certificate, presents `cert` with the device's own key.
fn client_config(id: &ServerId, cert: &IssuedDevice, key: &KeyPair) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.cert.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![cert.cert_der.clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap(),
    )
}

fn pem_cert_der(pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn connect(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> (
    rustls::ClientConnection,
    rustls::ServerConnection,
    Result<(), rustls::Error>,
) {
    let mut c =
        rustls::ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
    let r = handshake(&mut c, &mut s);
    (c, s, r)
}

#[test]
fn mutual_tls_with_device_certificate() {
    let data = tempfile::tempdir().unwrap();
    let ca = pki::ensure_device_ca(data.path()).unwrap();
    let id = server_id();
    let server = server_config(data.path(), &id);

    let (dev, key) = issue(&ca, "00E0C5A1B2C3");
    let (mut c, mut s, r) = connect(&server, &client_config(&id, &dev, &key));
    r.expect("the handshake with a device certificate succeeds");
    let peer = s
        .peer_certificates()
        .expect("the server sees the client certificate");
    assert_eq!(Fingerprint::of(&peer[0]), dev.fingerprint);
    assert_eq!(dev.credential().fingerprint, dev.fingerprint);

    // Application data flows.
    use std::io::{Read as _, Write as _};
    c.writer().write_all(b"hello").unwrap();
    handshake(&mut c, &mut s).unwrap();
    let mut got = [0u8; 5];
    s.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    // TLS 1.2 as well.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.cert.clone()).unwrap();
    let tls12 = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![dev.cert_der.clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap(),
    );
    let (_, s, r) = connect(&server, &tls12);
    r.expect("TLS 1.2 handshake");
    assert_eq!(
        Fingerprint::of(&s.peer_certificates().unwrap()[0]),
        dev.fingerprint
    );
}

#[test]
fn mutual_tls_refuses_foreign_and_missing_certificates() {
    let data = tempfile::tempdir().unwrap();
    pki::ensure_device_ca(data.path()).unwrap();
    let id = server_id();
    let server = server_config(data.path(), &id);

    // Same CN, same unit ID, but another device CA.
    let other_dir = tempfile::tempdir().unwrap();
    let other = pki::ensure_device_ca(other_dir.path()).unwrap();
    let (foreign, key) = issue(&other, "00E0C5A1B2C3");
    let (_, _, r) = connect(&server, &client_config(&id, &foreign, &key));
    let e = r.expect_err("a certificate from another CA is refused");
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature
            )
        ),
        "unexpected error {e:?}"
    );

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.cert.clone()).unwrap();
    let anonymous = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let (_, _, r) = connect(&server, &anonymous);
    assert!(r.is_err(), "a client without certificate is refused");
}

/// Runs the handshake over in-memory buffers; returns the server's error, if any.
fn handshake(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
) -> Result<(), rustls::Error> {
    for _ in 0..20 {
        let mut progressed = false;
        while client.wants_write() {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets()?;
            progressed = true;
        }
        while server.wants_write() {
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut &buf[..]).unwrap();
            client.process_new_packets()?;
            progressed = true;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
        if !progressed {
            break;
        }
    }
    Err(rustls::Error::General("the handshake stalled".into()))
}
