//! TLS for the agent: server verification by pinned root (or system roots), the client
//! credential, and the TCP + TLS connect with timeouts.

use std::io;
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, StreamOwned};

use super::state::{Connector, Credential, Trust};
use super::{AgentError, AgentOptions};
use crate::pki::Fingerprint;

/// The agent's TLS stream.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// The crypto provider: the gateway's ([`crate::tls::provider`]: aws-lc-rs with ring's
/// record ciphers), so file pushes decrypt at the same speed as the gateway relays them.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(crate::tls::provider())).clone()
}

/// Bundle paths tried for the system roots after `SSL_CERT_FILE`.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system's public roots: `SSL_CERT_FILE` if set, else the first bundle of
/// [`SYSTEM_BUNDLES`] that exists. Read once per process.
pub fn system_roots() -> Result<Arc<RootCertStore>, AgentError> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let candidates: Vec<std::path::PathBuf> = match std::env::var_os("SSL_CERT_FILE") {
                Some(f) => vec![f.into()],
                None => SYSTEM_BUNDLES.iter().map(Into::into).collect(),
            };
            for path in &candidates {
                let Ok(pem) = std::fs::read(path) else {
                    continue;
                };
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
                    let _ = roots.add(cert);
                }
                if !roots.is_empty() {
                    return Ok(Arc::new(roots));
                }
            }
            Err(format!(
                "no system root certificates found (tried {})",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
        .clone()
        .map_err(AgentError::Trust)
}

/// The TLS server name for a connector's host.
pub fn server_name(connector: &Connector) -> Result<ServerName<'static>, AgentError> {
    ServerName::try_from(connector.host.clone()).map_err(|_| AgentError::BadConnector {
        input: connector.url(),
        reason: "not a valid TLS server name".into(),
    })
}

/// Verifies the gateway's chain with pinned roots as the only trust anchors.
///
/// A root is found among the certificates the gateway presents (it sends its root as the
/// last certificate of the chain) by its SHA-256; when the gateway does not send it, a
/// `fallback` root (the agent's stored `root.pem`, or a root taken with `root.offer`) is used
/// if it has a pinned fingerprint. The chain is then validated by rustls-webpki as usual
/// (signatures, validity, the host name in the leaf's SAN) against a root store holding that
/// root alone.
///
/// Several fingerprints may be pinned (the first-contact root plus roots added by a root
/// exchange or a move, `docs/protocol.md` §6.4); any of them is accepted. With `system`, a
/// chain without a pinned root is checked against the system roots instead.
#[derive(Debug)]
pub struct PinnedRootVerifier {
    fingerprints: Vec<Fingerprint>,
    fallbacks: Vec<CertificateDer<'static>>,
    system: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl PinnedRootVerifier {
    /// A verifier pinning `fingerprint`.
    pub fn new(fingerprint: Fingerprint, fallback: Option<CertificateDer<'static>>) -> Self {
        Self::with_roots(vec![fingerprint], fallback.into_iter().collect(), None)
    }

    /// A verifier pinning every fingerprint of `fingerprints` (fallback certificates that
    /// match none are dropped), and accepting system-trusted chains when `system` is given.
    pub fn with_roots(
        fingerprints: Vec<Fingerprint>,
        fallbacks: Vec<CertificateDer<'static>>,
        system: Option<Arc<WebPkiServerVerifier>>,
    ) -> Self {
        let fallbacks = fallbacks
            .into_iter()
            .filter(|c| fingerprints.contains(&Fingerprint::of(c)))
            .collect();
        PinnedRootVerifier {
            fingerprints,
            fallbacks,
            system,
            provider: provider(),
        }
    }

    fn is_pinned(&self, cert: &CertificateDer<'_>) -> bool {
        self.fingerprints.contains(&Fingerprint::of(cert))
    }
}

impl ServerCertVerifier for PinnedRootVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = intermediates
            .iter()
            .chain(std::iter::once(end_entity))
            .find(|c| self.is_pinned(c))
            .map(|c| c.clone().into_owned());
        let candidates: Vec<CertificateDer<'static>> = match presented {
            Some(root) => vec![root],
            None => self.fallbacks.clone(),
        };
        if candidates.is_empty() {
            if let Some(system) = &self.system {
                return system.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                );
            }
            let pinned: Vec<String> = self.fingerprints.iter().map(|f| f.hex()).collect();
            return Err(rustls::Error::General(format!(
                "the gateway's certificate chain does not contain the pinned root {}",
                pinned.join(" or ")
            )));
        }
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| !self.is_pinned(c))
            .cloned()
            .collect();
        let mut last = None;
        for root in candidates {
            let mut roots = RootCertStore::empty();
            roots
                .add(root)
                .map_err(|e| rustls::Error::General(format!("the pinned root is unusable: {e}")))?;
            let inner =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            match inner.verify_server_cert(end_entity, &rest, server_name, ocsp_response, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        if let Some(system) = &self.system
            && system
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .is_ok()
        {
            return Ok(ServerCertVerified::assertion());
        }
        Err(last.expect("at least one candidate"))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// First contact: accepts any chain (the handshake signatures are still checked) and keeps it,
/// so the agent can show the root's fingerprint and validate the chain afterwards.
#[derive(Debug)]
pub(crate) struct CaptureVerifier {
    provider: Arc<CryptoProvider>,
    pub(crate) chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl CaptureVerifier {
    pub(crate) fn new() -> CaptureVerifier {
        CaptureVerifier {
            provider: provider(),
            chain: Mutex::new(Vec::new()),
        }
    }
}

impl ServerCertVerifier for CaptureVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls client configuration for `trust`, presenting `credential` when given (session
/// mode) and nothing otherwise (register mode). `fallback_root` is the stored root for
/// [`PinnedRootVerifier`].
pub fn client_config(
    trust: &Trust,
    fallback_root: Option<CertificateDer<'static>>,
    credential: Option<&Credential>,
) -> Result<Arc<ClientConfig>, AgentError> {
    client_config_with(trust, &[], fallback_root.into_iter().collect(), credential)
}

/// [`client_config`] with additional pinned roots (`extra_roots`, from a root exchange or a
/// move) and every stored root certificate as a fallback anchor.
pub fn client_config_with(
    trust: &Trust,
    extra_roots: &[Fingerprint],
    fallbacks: Vec<CertificateDer<'static>>,
    credential: Option<&Credential>,
) -> Result<Arc<ClientConfig>, AgentError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Trust(format!("TLS set-up: {e}")))?;
    let builder = match trust {
        Trust::System if extra_roots.is_empty() => builder.with_root_certificates(system_roots()?),
        Trust::System => {
            let system = WebPkiServerVerifier::builder_with_provider(system_roots()?, provider())
                .build()
                .map_err(|e| AgentError::Trust(format!("system roots: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedRootVerifier::with_roots(
                    extra_roots.to_vec(),
                    fallbacks,
                    Some(system),
                )))
        }
        Trust::Pinned(fp) => {
            let mut pins = vec![*fp];
            pins.extend(extra_roots.iter().filter(|f| *f != fp).copied());
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedRootVerifier::with_roots(
                    pins, fallbacks, None,
                )))
        }
    };
    let mut config = match credential {
        Some(c) => builder
            .with_client_auth_cert(vec![c.cert.clone()], c.private_key())
            .map_err(|e| AgentError::Credential(format!("unusable device credential: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The first-contact configuration: no client certificate, any chain accepted and captured.
pub(crate) fn capture_config(
    verifier: Arc<CaptureVerifier>,
) -> Result<Arc<ClientConfig>, AgentError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Trust(format!("TLS set-up: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// TCP connect (each resolved address in turn, `options.connect_timeout` each) and TLS
/// handshake; the socket is left with read/write timeouts of `options.handshake_timeout`.
pub fn connect_tls(
    connector: &Connector,
    config: Arc<ClientConfig>,
    options: &AgentOptions,
) -> Result<TlsStream, AgentError> {
    let name = server_name(connector)?;
    let addrs = connector
        .authority()
        .to_socket_addrs()
        .map_err(|e| AgentError::Connect {
            connector: connector.url(),
            message: format!("cannot resolve {}: {e}", connector.host),
        })?;
    let mut last = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, options.connect_timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    let tcp = tcp.ok_or_else(|| AgentError::Connect {
        connector: connector.url(),
        message: last.unwrap_or_else(|| format!("{} resolves to no address", connector.host)),
    })?;
    let io_err = |e: io::Error| io_error(connector, e);
    tcp.set_nodelay(true).map_err(io_err)?;
    set_timeouts(&tcp, options.handshake_timeout).map_err(io_err)?;
    let conn = ClientConnection::new(config, name).map_err(|e| AgentError::Tls {
        connector: connector.url(),
        source: e,
    })?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).map_err(io_err)?;
    }
    Ok(stream)
}

/// Sets both socket timeouts.
pub(crate) fn set_timeouts(tcp: &TcpStream, t: Duration) -> io::Result<()> {
    let t = Some(t.max(Duration::from_millis(1)));
    tcp.set_read_timeout(t)?;
    tcp.set_write_timeout(t)
}

/// Maps an I/O error of the connection: a rustls error inside becomes [`AgentError::Tls`].
pub(crate) fn io_error(connector: &Connector, e: io::Error) -> AgentError {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return AgentError::Tls {
            connector: connector.url(),
            source: tls.clone(),
        };
    }
    let message = match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_owned(),
        io::ErrorKind::UnexpectedEof => "the gateway closed the connection".to_owned(),
        _ => e.to_string(),
    };
    AgentError::Connect {
        connector: connector.url(),
        message,
    }
}
