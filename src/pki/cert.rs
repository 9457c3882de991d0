//! [`CertInfo`]: what we need to know about one certificate (for `show`, `verify`, renewal),
//! read with x509-parser into owned values.

use std::fmt;
use std::net::IpAddr;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{Fingerprint, PkiError};

/// One Subject Alternative Name entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum San {
    /// `DNS:` name (as written in the certificate; may be a wildcard `*.example.org`).
    Dns(String),
    /// `IP:` address.
    Ip(IpAddr),
    /// Any other kind (e-mail, URI…), rendered for display; never matches a host.
    Other(String),
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(d) => write!(f, "DNS:{d}"),
            San::Ip(ip) => write!(f, "IP:{ip}"),
            San::Other(o) => f.write_str(o),
        }
    }
}

/// The BasicConstraints extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BasicConstraints {
    /// cA flag.
    pub ca: bool,
    /// pathLenConstraint, when present.
    pub path_len: Option<u32>,
}

/// A parsed certificate, owned.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// Subject as `CN=…, O=…, L=…, C=…`.
    pub subject: String,
    /// Issuer, same form.
    pub issuer: String,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// Raw DER of the subject and issuer names (for exact chaining).
    pub subject_raw: Vec<u8>,
    /// See `subject_raw`.
    pub issuer_raw: Vec<u8>,
    /// Serial number, hex.
    pub serial: String,
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// Subject Alternative Names (empty when the extension is absent).
    pub sans: Vec<San>,
    /// The SAN extension is present (possibly empty).
    pub has_san_extension: bool,
    /// BasicConstraints, when present.
    pub basic_constraints: Option<BasicConstraints>,
    /// "ECDSA P-256", "RSA 2048", "Ed25519", …
    pub key_type: String,
    /// The subjectPublicKey bits (EC point, RSAPublicKey DER, Ed25519 key).
    pub public_key: Vec<u8>,
    /// SHA-256 of the DER.
    pub fingerprint: Fingerprint,
}

impl CertInfo {
    /// Parses a certificate. `what` names it in the error.
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertInfo, PkiError> {
        let (_, x509) =
            X509Certificate::from_der(der.as_ref()).map_err(|e| PkiError::Certificate {
                what: "certificate".into(),
                index: 1,
                message: e.to_string(),
            })?;
        Ok(CertInfo::from_x509(&x509, der))
    }

    fn from_x509(x509: &X509Certificate<'_>, der: &CertificateDer<'_>) -> CertInfo {
        let common_name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let (has_san_extension, sans) = match x509.subject_alternative_name() {
            Ok(Some(ext)) => (
                true,
                ext.value
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::DNSName(d) => San::Dns((*d).to_owned()),
                        GeneralName::IPAddress(b) => match ip_from_bytes(b) {
                            Some(ip) => San::Ip(ip),
                            None => San::Other(format!("IP:<{} bytes>", b.len())),
                        },
                        other => San::Other(other.to_string()),
                    })
                    .collect(),
            ),
            // A malformed or duplicated SAN extension counts as present but unusable.
            Err(_) => (true, Vec::new()),
            Ok(None) => (false, Vec::new()),
        };
        let basic_constraints = match x509.basic_constraints() {
            Ok(Some(bc)) => Some(BasicConstraints {
                ca: bc.value.ca,
                path_len: bc.value.path_len_constraint,
            }),
            _ => None,
        };
        CertInfo {
            subject: x509.subject().to_string(),
            issuer: x509.issuer().to_string(),
            common_name,
            subject_raw: x509.subject().as_raw().to_vec(),
            issuer_raw: x509.issuer().as_raw().to_vec(),
            serial: x509.raw_serial_as_string(),
            not_before: x509.validity().not_before.timestamp(),
            not_after: x509.validity().not_after.timestamp(),
            sans,
            has_san_extension,
            basic_constraints,
            key_type: key_type(x509),
            public_key: x509.public_key().subject_public_key.data.to_vec(),
            fingerprint: Fingerprint::of(der),
        }
    }

    /// The name shown for the certificate: its CN, or the whole subject when there is no CN.
    pub fn display_name(&self) -> &str {
        self.common_name.as_deref().unwrap_or(&self.subject)
    }

    /// Subject for messages: the full subject, or `(empty subject)`.
    pub fn label(&self) -> String {
        if self.subject.is_empty() {
            "(empty subject)".to_owned()
        } else {
            self.subject.clone()
        }
    }

    /// cA=true in BasicConstraints.
    pub fn is_ca(&self) -> bool {
        self.basic_constraints.is_some_and(|bc| bc.ca)
    }

    /// Issuer name equals subject name.
    pub fn is_self_issued(&self) -> bool {
        self.subject_raw == self.issuer_raw
    }

    /// The DNS and IP SANs, normalised (lower case, no trailing dot), sorted and deduplicated:
    /// the "host set" compared on renewal.
    pub fn host_set(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .sans
            .iter()
            .filter_map(|s| match s {
                San::Dns(d) => Some(d.trim_end_matches('.').to_ascii_lowercase()),
                San::Ip(ip) => Some(ip.to_string()),
                San::Other(_) => None,
            })
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }
}

/// Parses a certificate with x509-parser (for callers that need the full structure).
pub(crate) fn parse_x509<'a>(
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, x509_parser::nom::Err<x509_parser::error::X509Error>> {
    X509Certificate::from_der(der.as_ref()).map(|(_, c)| c)
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

fn key_type(x509: &X509Certificate<'_>) -> String {
    let spki = x509.public_key();
    match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.113549.1.1.1" => match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
            _ => "RSA".to_owned(),
        },
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => "ECDSA P-256".to_owned(),
                Some("1.3.132.0.34") => "ECDSA P-384".to_owned(),
                Some("1.3.132.0.35") => "ECDSA P-521".to_owned(),
                Some(other) => format!("ECDSA (curve {other})"),
                None => "ECDSA".to_owned(),
            }
        }
        "1.3.101.112" => "Ed25519".to_owned(),
        other => format!("unknown ({other})"),
    }
}

/// `2034-05-01 12:00:00 UTC`.
pub fn format_time(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix} (seconds since 1970)"),
    }
}
