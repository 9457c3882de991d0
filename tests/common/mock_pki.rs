//! What the mock gateways of `tests/agent_mock.rs`, `tests/agent_relay_mock.rs` and
//! `tests/mgmt_client.rs` share: their PKI (a root, a server certificate for localhost /
//! 127.0.0.1 under it, and a device CA that issues credentials from the agent's CSR, built with
//! rcgen, independent of the gateway's own PKI) and their accept loop.
#![allow(dead_code)]

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use fleetgate::pki::Fingerprint;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use x509_parser::prelude::FromDer as _;

/// A gateway's PKI: root → server certificate (localhost, 127.0.0.1), and a device CA.
pub struct Pki {
    pub root: CertifiedIssuer<'static, KeyPair>,
    pub leaf: CertificateDer<'static>,
    pub leaf_key: Vec<u8>,
    pub device_ca: CertifiedIssuer<'static, KeyPair>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

impl Pki {
    pub fn new() -> Arc<Pki> {
        let root =
            CertifiedIssuer::self_signed(ca_params("mock root"), KeyPair::generate().unwrap())
                .unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut lp = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        lp.distinguished_name
            .push(DnType::CommonName, "mock gateway");
        let leaf = lp.signed_by(&leaf_key, &root).unwrap();
        let device_ca =
            CertifiedIssuer::self_signed(ca_params("mock device CA"), KeyPair::generate().unwrap())
                .unwrap();
        Arc::new(Pki {
            root,
            leaf: leaf.der().clone(),
            leaf_key: leaf_key.serialize_der(),
            device_ca,
        })
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        let c: &rcgen::Certificate = self.root.as_ref();
        c.der().clone()
    }

    pub fn root_pem(&self) -> String {
        let c: &rcgen::Certificate = self.root.as_ref();
        c.pem()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.root_der())
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        let ca: &rcgen::Certificate = self.device_ca.as_ref();
        roots.add(ca.der().clone()).unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .unwrap();
        Arc::new(
            ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    vec![self.leaf.clone(), self.root_der()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.clone())),
                )
                .unwrap(),
        )
    }

    /// Issues a device certificate from a base64 CSR (after checking its signature).
    pub fn issue(&self, unit: &str, csr_b64: &str) -> (String, Vec<u8>) {
        let der = base64::engine::general_purpose::STANDARD
            .decode(csr_b64)
            .unwrap();
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        csr.verify_signature().unwrap();
        let spki = csr.certification_request_info.subject_pki.raw.to_vec();
        let mut params = CertificateSigningRequestParams::from_der(&der.into()).unwrap();
        params.params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .params
            .distinguished_name
            .push(DnType::CommonName, unit);
        params.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&self.device_ca).unwrap();
        (cert.pem(), spki)
    }
}

/// Accepts on `listener` until `stop` is set, each connection on its own thread running
/// `handle`; the returned thread joins them all before it ends.
pub fn accept_until_stopped(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) -> JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((tcp, _)) => {
                    let h = handle.clone();
                    conns.push(std::thread::spawn(move || h(tcp)));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        drop(listener);
        for c in conns {
            let _ = c.join();
        }
    })
}
