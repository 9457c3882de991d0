//! rustls configurations: the devices' client side (trust a given CA, the system roots, or
//! nothing) and the baseline server's side.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::{Deserialize, Serialize};

/// How devices decide to trust the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Trust {
    /// Certificates in this PEM file are the roots (fleetgate: `DATA_DIR/root.pem`).
    Ca(PathBuf),
    /// The system CA bundle (`SSL_CERT_FILE` or the usual distribution paths).
    System,
    /// Accept any certificate (still checks the handshake signatures).
    Insecure,
}

/// Which TLS versions devices offer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ValueEnum)]
pub enum TlsVersions {
    /// TLS 1.2 and 1.3 (the server picks; normally 1.3).
    Any,
    #[value(name = "1.2")]
    Tls12,
    #[value(name = "1.3")]
    Tls13,
}

const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// aws-lc-rs for the handshake, *ring*'s record ciphers (as the gateway: its VAES/AVX2
/// AES-GCM is 2–2.5 × faster on this hardware, and the generator's own TLS shares the cores
/// with the gateway in the bulk scenario).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    Arc::new(p)
}

/// The client configuration every device of a worker shares. Session resumption is off:
/// each simulated device is a distinct device, so every connect is a full handshake.
pub fn client_config(trust: &Trust, versions: TlsVersions) -> Result<Arc<ClientConfig>> {
    let versions: &[&rustls::SupportedProtocolVersion] = match versions {
        TlsVersions::Any => rustls::ALL_VERSIONS,
        TlsVersions::Tls12 => &[&rustls::version::TLS12],
        TlsVersions::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .context("TLS versions")?;
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(server_verifier(trust)?)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// How devices check the server's chain (see [`CachingVerifier`]). Share one per process:
/// the cache lives in it.
pub fn server_verifier(trust: &Trust) -> Result<Arc<dyn ServerCertVerifier>> {
    Ok(match trust {
        Trust::Insecure => Arc::new(AcceptAnyCertificate(
            provider().signature_verification_algorithms,
        )),
        Trust::Ca(path) => {
            let roots = Arc::new(load_roots(path)?);
            CachingVerifier::new(roots)?
        }
        Trust::System => {
            let path = std::env::var_os("SSL_CERT_FILE")
                .map(PathBuf::from)
                .or_else(|| {
                    SYSTEM_BUNDLES
                        .iter()
                        .map(PathBuf::from)
                        .find(|p| p.exists())
                })
                .context(
                    "no --ca given and no system CA bundle found: pass --ca FILE \
                     (fleetgate: DATA_DIR/root.pem) or --insecure",
                )?;
            let roots = Arc::new(load_roots(&path)?);
            CachingVerifier::new(roots)?
        }
    })
}

/// A device client configuration with a shared server verifier and, optionally, a client
/// certificate (the device credential, `docs/protocol.md` §5). Resumption is off, as in
/// [`client_config`].
pub fn device_client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    versions: TlsVersions,
    credential: Option<Arc<CertifiedKey>>,
) -> Result<ClientConfig> {
    let versions: &[&rustls::SupportedProtocolVersion] = match versions {
        TlsVersions::Any => rustls::ALL_VERSIONS,
        TlsVersions::Tls12 => &[&rustls::version::TLS12],
        TlsVersions::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match credential {
        Some(key) => builder.with_client_cert_resolver(Arc::new(OneCredential(key))),
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Loads a device credential once, so that each connection only clones an `Arc`.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<Arc<CertifiedKey>> {
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .context("unusable device private key")?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The same configuration with another client credential: cheap (clones and `Arc`s), so a
/// worker keeps one configuration and thousands of credentials instead of thousands of
/// configurations.
pub fn with_credential(base: &ClientConfig, key: Arc<CertifiedKey>) -> Arc<ClientConfig> {
    let mut config = base.clone();
    config.client_auth_cert_resolver = Arc::new(OneCredential(key));
    Arc::new(config)
}

/// Always presents the one device credential.
#[derive(Debug)]
struct OneCredential(Arc<CertifiedKey>);

impl ResolvesClientCert for OneCredential {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let mut count = 0;
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read CA file {}", path.display()))?
    {
        let cert = cert.with_context(|| format!("bad PEM in CA file {}", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("unusable CA certificate in {}", path.display()))?;
        count += 1;
    }
    if count == 0 {
        bail!("CA file {} holds no certificates", path.display());
    }
    Ok(roots)
}

/// The baseline server's configuration: rustls defaults (TLS 1.2 + 1.3, its cipher order).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read certificate file {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificates", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key do not fit together")?;
    Ok(Arc::new(config))
}

/// `--insecure`: trusts any certificate but still verifies handshake signatures, so the
/// server does the same cryptographic work as with a trusted client.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Full WebPKI verification of the server's chain, remembered for one minute: thousands of
/// simulated devices of one worker meet the same chain, and re-verifying it for each would
/// make the load generator, not the server, the bottleneck of a connect ramp. The
/// per-connection proof that the server holds the key (the handshake signature) is still
/// checked on every connection, so the server does exactly the work a real fleet causes.
#[derive(Debug)]
struct CachingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    last: std::sync::Mutex<Option<VerifiedChain>>,
}

#[derive(Debug)]
struct VerifiedChain {
    end_entity: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    server_name: String,
    at: std::time::Instant,
}

impl CachingVerifier {
    fn new(roots: Arc<RootCertStore>) -> Result<Arc<Self>> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .context("certificate verifier")?;
        Ok(Arc::new(Self {
            inner,
            last: std::sync::Mutex::new(None),
        }))
    }
}

impl ServerCertVerifier for CachingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = server_name.to_str();
        let cached = self
            .last
            .lock()
            .expect("not poisoned")
            .as_ref()
            .is_some_and(|c| {
                c.at.elapsed() < std::time::Duration::from_secs(60)
                    && c.end_entity == end_entity.as_ref()
                    && c.server_name == name
                    && c.intermediates.len() == intermediates.len()
                    && c.intermediates
                        .iter()
                        .zip(intermediates)
                        .all(|(a, b)| a.as_slice() == b.as_ref())
            });
        if cached {
            return Ok(ServerCertVerified::assertion());
        }
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        *self.last.lock().expect("not poisoned") = Some(VerifiedChain {
            end_entity: end_entity.to_vec(),
            intermediates: intermediates.iter().map(|c| c.to_vec()).collect(),
            server_name: name.into_owned(),
            at: std::time::Instant::now(),
        });
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
