//! Making keys and certificates with rcgen: roots, intermediates, server certificates.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints as RcBasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RsaKeySize, SanType,
    SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime};

use super::cert::{CertInfo, format_time};
use super::{PkiError, country};

/// Default validity of a root CA (10 years).
pub const ROOT_DAYS: u32 = 3650;
/// Default validity of an intermediate CA (5 years).
pub const INTERMEDIATE_DAYS: u32 = 1825;
/// Default validity of a server certificate (1 year).
pub const LEAF_DAYS: u32 = 365;
/// Longest validity accepted (100 years).
pub const MAX_DAYS: u32 = 36_500;
/// New certificates start this long in the past, so devices whose clock is a little behind
/// accept a certificate issued a minute ago.
pub const BACKDATE: Duration = Duration::hours(1);

/// Key algorithm of a new key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (default: small, fast, universally supported).
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// RSA 2048 bits, PKCS#1 v1.5 with SHA-256 (for old devices).
    Rsa2048,
    /// RSA 3072 bits.
    Rsa3072,
    /// RSA 4096 bits.
    Rsa4096,
}

impl KeyType {
    /// All names accepted by [`FromStr`].
    pub const NAMES: &'static [&'static str] =
        &["ecdsa-p256", "ecdsa-p384", "rsa2048", "rsa3072", "rsa4096"];

    /// Generates a new key pair.
    pub fn generate(self) -> Result<KeyPair, PkiError> {
        let r = match self {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)
            }
            KeyType::Rsa3072 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)
            }
            KeyType::Rsa4096 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096)
            }
        };
        r.map_err(|source| PkiError::Generate {
            what: "key pair",
            source,
        })
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa2048 => "rsa2048",
            KeyType::Rsa3072 => "rsa3072",
            KeyType::Rsa4096 => "rsa4096",
        })
    }
}

impl FromStr for KeyType {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, PkiError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "p256" | "ec" | "ecdsa" => KeyType::EcdsaP256,
            "ecdsa-p384" | "p384" => KeyType::EcdsaP384,
            "rsa2048" | "rsa" => KeyType::Rsa2048,
            "rsa3072" => KeyType::Rsa3072,
            "rsa4096" => KeyType::Rsa4096,
            _ => {
                return Err(PkiError::InvalidInput(format!(
                    "unknown key type {s:?}; use one of {}",
                    KeyType::NAMES.join(", ")
                )));
            }
        })
    }
}

/// The subject of a new certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    /// CN: the certificate's display name.
    pub common_name: String,
    /// O.
    pub organization: Option<String>,
    /// L.
    pub locality: Option<String>,
    /// C: two-letter ISO 3166-1 code (checked).
    pub country: Option<String>,
}

impl Subject {
    /// A subject with only a CN.
    pub fn cn(common_name: impl Into<String>) -> Subject {
        Subject {
            common_name: common_name.into(),
            ..Subject::default()
        }
    }

    fn to_dn(&self) -> Result<DistinguishedName, PkiError> {
        let cn = self.common_name.trim();
        if cn.is_empty() {
            return Err(PkiError::InvalidInput(
                "the name (CN) must not be empty".into(),
            ));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        if let Some(o) = non_empty(&self.organization) {
            dn.push(DnType::OrganizationName, o);
        }
        if let Some(l) = non_empty(&self.locality) {
            dn.push(DnType::LocalityName, l);
        }
        if let Some(c) = non_empty(&self.country) {
            let c = country::check(c)?;
            dn.push(
                DnType::CountryName,
                rcgen::DnValue::PrintableString(
                    c.try_into()
                        .map_err(|_| PkiError::InvalidInput(format!("bad country {c:?}")))?,
                ),
            );
        }
        Ok(dn)
    }
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A host of a server certificate: a DNS name (possibly `*.` wildcard) or an IP address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// DNS name, lower case.
    Dns(String),
    /// IP address.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Dns(d) => f.write_str(d),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl Host {
    /// Parses one host: an IP address (v4 or v6, brackets allowed) or a DNS name made of
    /// letters, digits, `-` and `.`, with an optional `*.` wildcard as the first label.
    pub fn parse(s: &str) -> Result<Host, PkiError> {
        let s = s.trim();
        let unbracketed = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        let name = s.trim_end_matches('.').to_ascii_lowercase();
        let bad = |why: &str| PkiError::InvalidInput(format!("invalid host {s:?}: {why}"));
        if name.is_empty() {
            return Err(bad("empty"));
        }
        if name.len() > 253 {
            return Err(bad("longer than 253 characters"));
        }
        let rest = name.strip_prefix("*.").unwrap_or(&name);
        if rest.is_empty() {
            return Err(bad("a wildcard needs a domain after `*.`"));
        }
        for label in rest.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(bad("every label must have 1 to 63 characters"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(bad(
                    "only letters, digits, `-` and a leading `*.` wildcard are allowed",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad("a label must not start or end with `-`"));
            }
        }
        Ok(Host::Dns(name))
    }

    /// Parses a `;`-separated host list (commas and spaces also separate), deduplicated in
    /// order. Fails on an empty list.
    pub fn parse_list(list: &str) -> Result<Vec<Host>, PkiError> {
        let mut hosts = Vec::new();
        for part in list.split([';', ',', ' ', '\n', '\t']) {
            if part.trim().is_empty() {
                continue;
            }
            let h = Host::parse(part)?;
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
        if hosts.is_empty() {
            return Err(PkiError::InvalidInput(
                "the host list is empty; give the DNS names and IP addresses the gateway is \
                 reached by, separated by `;`"
                    .into(),
            ));
        }
        Ok(hosts)
    }

    fn to_san(&self) -> Result<SanType, PkiError> {
        Ok(match self {
            Host::Ip(ip) => SanType::IpAddress(*ip),
            Host::Dns(d) => SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|_| PkiError::InvalidInput(format!("invalid host {d:?}")))?,
            ),
        })
    }
}

/// A new certificate with its new key, plus the chain of its issuer.
pub struct Generated {
    /// The new certificate first, then its issuer's chain up to the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The new private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// Things the operator should know (short validity, validity cut to the CA's).
    pub warnings: Vec<String>,
}

/// An issuing CA: its chain (the CA certificate first, root last) and its private key.
pub struct IssuingCa<'a> {
    /// The CA certificate first, then its issuers, root last.
    pub chain: &'a [CertificateDer<'static>],
    /// The CA's private key.
    pub key: &'a PrivateKeyDer<'static>,
}

/// Creates a self-signed root CA (cA=true, no path length limit, keyCertSign + cRLSign).
/// Warns when `days` is shorter than 10 years: an expired root forces every device to
/// re-register.
pub fn create_root(subject: &Subject, days: u32, key_type: KeyType) -> Result<Generated, PkiError> {
    check_days(days)?;
    let mut warnings = Vec::new();
    if days < ROOT_DAYS {
        warnings.push(format!(
            "the root is valid for only {days} days (less than 10 years); when it expires, \
             every device must re-register"
        ));
    }
    let key = key_type.generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject.to_dn()?;
    params.is_ca = IsCa::Ca(RcBasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days.into());
    params.serial_number = Some(serial(&key));
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            what: "root certificate",
            source,
        })?;
    Ok(Generated {
        chain: vec![cert.der().clone()],
        key: pkcs8(&key),
        warnings,
    })
}

/// Creates an intermediate CA signed by `ca`. `path_len` limits how many more intermediates may
/// follow below it (None: no limit).
pub fn create_intermediate(
    ca: &IssuingCa<'_>,
    subject: &Subject,
    days: u32,
    key_type: KeyType,
    path_len: Option<u8>,
) -> Result<Generated, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject.to_dn()?;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => RcBasicConstraints::Constrained(n),
        None => RcBasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    sign(ca, params, days, key_type, "intermediate certificate")
}

/// Issues a server (end-entity) certificate from `ca`: cA=false, serverAuth, SANs = `hosts`.
/// Its CN must differ from the root's CN.
pub fn issue_server(
    ca: &IssuingCa<'_>,
    subject: &Subject,
    hosts: &[Host],
    days: u32,
    key_type: KeyType,
) -> Result<Generated, PkiError> {
    if hosts.is_empty() {
        return Err(PkiError::InvalidInput(
            "a server certificate needs at least one host (DNS name or IP address)".into(),
        ));
    }
    let root = ca
        .chain
        .last()
        .ok_or_else(|| PkiError::InvalidInput("empty CA chain".into()))?;
    let root_info = CertInfo::parse(root)?;
    if root_info
        .display_name()
        .eq_ignore_ascii_case(subject.common_name.trim())
    {
        return Err(PkiError::InvalidInput(format!(
            "the server certificate's name {:?} must differ from the root's name",
            subject.common_name.trim()
        )));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = subject.to_dn()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.subject_alt_names = hosts.iter().map(Host::to_san).collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if matches!(
        key_type,
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096
    ) {
        // TLS 1.2 RSA key exchange is off in rustls, but old clients check the bit anyway.
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sign(ca, params, days, key_type, "server certificate")
}

fn sign(
    ca: &IssuingCa<'_>,
    mut params: CertificateParams,
    days: u32,
    key_type: KeyType,
    what: &'static str,
) -> Result<Generated, PkiError> {
    check_days(days)?;
    let ca_cert = ca
        .chain
        .first()
        .ok_or_else(|| PkiError::InvalidInput("empty CA chain".into()))?;
    let ca_info = CertInfo::parse(ca_cert)?;
    let mut warnings = Vec::new();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days.into());
    if params.not_after.unix_timestamp() > ca_info.not_after {
        params.not_after = OffsetDateTime::from_unix_timestamp(ca_info.not_after)
            .map_err(|_| PkiError::InvalidInput("the CA's notAfter is out of range".into()))?;
        warnings.push(format!(
            "the {what} would outlive its CA; its validity ends with the CA's on {}",
            format_time(ca_info.not_after)
        ));
    }
    if ca_info.not_after < now.unix_timestamp() {
        return Err(PkiError::InvalidInput(format!(
            "the CA {:?} expired on {}",
            ca_info.display_name(),
            format_time(ca_info.not_after)
        )));
    }
    params.use_authority_key_identifier_extension = true;
    let ca_key = KeyPair::try_from(ca.key).map_err(|source| PkiError::Generate {
        what: "CA key",
        source,
    })?;
    let issuer =
        Issuer::from_ca_cert_der(ca_cert, ca_key).map_err(|source| PkiError::Generate {
            what: "issuer from the CA certificate",
            source,
        })?;
    let key = key_type.generate()?;
    params.serial_number = Some(serial(&key));
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Generate { what, source })?;
    let mut chain = vec![cert.der().clone()];
    chain.extend(ca.chain.iter().cloned());
    Ok(Generated {
        chain,
        key: pkcs8(&key),
        warnings,
    })
}

fn check_days(days: u32) -> Result<(), PkiError> {
    if days == 0 || days > MAX_DAYS {
        return Err(PkiError::InvalidInput(format!(
            "validity must be between 1 and {MAX_DAYS} days, not {days}"
        )));
    }
    Ok(())
}

fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// A 16-byte positive serial, unique per certificate (hash of the public key, the time and a
/// counter — rcgen's default hashes the key only, which repeats when a key is re-certified).
fn serial(key: &KeyPair) -> SerialNumber {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(key.public_key_raw());
    h.update(
        OffsetDateTime::now_utc()
            .unix_timestamp_nanos()
            .to_be_bytes(),
    );
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    h.update(std::process::id().to_be_bytes());
    let digest = h.finalize();
    let mut bytes = digest[..16].to_vec();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte: always 16 bytes
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse() {
        let h =
            Host::parse_list("gw.example.com;203.0.113.7; *.example.org ;2001:db8::7;").unwrap();
        assert_eq!(
            h,
            vec![
                Host::Dns("gw.example.com".into()),
                Host::Ip("203.0.113.7".parse().unwrap()),
                Host::Dns("*.example.org".into()),
                Host::Ip("2001:db8::7".parse().unwrap()),
            ]
        );
        assert!(Host::parse_list(" ; ").is_err());
        assert!(Host::parse("a..b").is_err());
        assert!(Host::parse("*.").is_err());
        assert!(Host::parse("foo*.example.org").is_err());
        assert!(Host::parse("-a.example").is_err());
        assert_eq!(
            Host::parse("[::1]").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
    }

    #[test]
    fn key_type_names_round_trip() {
        for name in KeyType::NAMES {
            assert_eq!(name.parse::<KeyType>().unwrap().to_string(), *name);
        }
        assert!("dsa".parse::<KeyType>().is_err());
    }
}
