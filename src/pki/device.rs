//! The device CA: the gateway's own CA for **device credentials** — client certificates that
//! registered devices present over mutual TLS on every connection after registration.
//!
//! A device registers once with a first-authentication key and sends the public key of a key
//! pair it generated itself (SubjectPublicKeyInfo DER). The gateway certifies that key with
//! [`DeviceCa::issue`]; the device keeps its private key, the gateway never sees it.
//!
//! # Files
//!
//! ```text
//! DATA_DIR/
//!   device-ca.pem          the device CA certificate (0644): the trust anchor the gateway's TLS
//!                          server gives its client-certificate verifier; public, so the TLS
//!                          layer (and operators) can read it without access to pki/
//!   pki/                   (0700)
//!     device-ca/           (0700)
//!       ca.pem             the device CA certificate (0644)
//!       ca.key             its private key, PKCS#8 (0600)
//! ```
//!
//! The device CA is separate from the CAs under `pki/ca/` on purpose: it signs only client
//! certificates (the gateway's server chain can be exchanged by a root rollover without
//! touching any device credential), and `pki issue --ca` cannot reach it.
//!
//! [`ensure_device_ca`] is idempotent: it creates the CA on the first call and loads it
//! afterwards. It is meant to run in the one gateway process at start, like
//! [`bootstrap`](super::bootstrap()); two processes creating the CA at the same instant could
//! each return a different CA (the later rename wins on disk).

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints as RcBasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
    SubjectPublicKeyInfo,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime};

use super::cert::CertInfo;
use super::create::{BACKDATE, KeyType, MAX_DAYS};
use super::fs::{MODE_PRIVATE, MODE_PRIVATE_DIR, MODE_PUBLIC, ensure_dir, write_atomic};
use super::{Fingerprint, PkiError, pem};
use crate::registry::DeviceCredential;
use crate::registry::unit::check_unit_id;

/// Validity of the device CA (20 years): when it expires every device must re-register.
pub const DEVICE_CA_DAYS: u32 = 7300;
/// Default validity of a device certificate (5 years).
pub const DEVICE_CERT_DAYS: u32 = 1825;
/// Longest unit ID that fits a device certificate: the X.520 upper bound of a common name.
/// (The registry accepts up to [`MAX_UNIT_ID_LEN`](crate::registry::unit::MAX_UNIT_ID_LEN).)
pub const MAX_DEVICE_CN_LEN: usize = 64;

/// `DATA_DIR/pki/device-ca/`.
pub fn device_ca_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki").join("device-ca")
}

/// `DATA_DIR/pki/device-ca/ca.pem`.
pub fn device_ca_cert_path(data_dir: &Path) -> PathBuf {
    device_ca_dir(data_dir).join("ca.pem")
}

/// `DATA_DIR/pki/device-ca/ca.key`.
pub fn device_ca_key_path(data_dir: &Path) -> PathBuf {
    device_ca_dir(data_dir).join("ca.key")
}

/// `DATA_DIR/device-ca.pem`: the public copy the TLS server uses as its client trust anchor.
pub fn device_ca_pem_path(data_dir: &Path) -> PathBuf {
    data_dir.join("device-ca.pem")
}

/// The device CA, loaded: its certificate and a signer for its key.
pub struct DeviceCa {
    cert: CertificateDer<'static>,
    info: CertInfo,
    issuer: Issuer<'static, KeyPair>,
    created: bool,
}

impl fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCa")
            .field("subject", &self.info.subject)
            .field("fingerprint", &self.fingerprint().hex())
            .field("created", &self.created)
            .field("key", &"<private>")
            .finish()
    }
}

/// A device certificate just issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedDevice {
    /// The certificate (DER).
    pub cert_der: CertificateDer<'static>,
    /// The certificate (PEM), what the device stores.
    pub cert_pem: String,
    /// SHA-256 of `cert_der`: what reconnects are looked up by.
    pub fingerprint: Fingerprint,
    /// The serial number, big-endian bytes (16, positive).
    pub serial: Vec<u8>,
    /// The serial number, upper-case hex (as `openssl x509 -serial` shows it).
    pub serial_hex: String,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
    /// SHA-256 of the certified SubjectPublicKeyInfo DER.
    pub public_key_sha256: [u8; 32],
}

impl IssuedDevice {
    /// What the registry records for this certificate.
    pub fn credential(&self) -> DeviceCredential {
        DeviceCredential {
            fingerprint: self.fingerprint,
            serial: self.serial.clone(),
            not_after: self.not_after,
            public_key_sha256: Some(self.public_key_sha256),
        }
    }
}

/// Creates the device CA on the first call (ECDSA P-256, [`DEVICE_CA_DAYS`], CN
/// "fleetgate device CA `<hostname>`", cA=true pathLen 0, keyCertSign + cRLSign) and loads it
/// afterwards; (re)writes `DATA_DIR/device-ca.pem` when missing or different. See the
/// [module docs](self#files) for the files.
///
/// A key without certificate (a crash between the two writes) is replaced by a new CA; a
/// certificate without key is an error ([`PkiError::NoCaKey`]), never silently replaced —
/// devices hold certificates from it.
pub fn ensure_device_ca(data_dir: &Path) -> Result<DeviceCa, PkiError> {
    ensure_ca(data_dir, &DEVICE)
}

/// Which of the gateway's own client-certificate CAs.
struct CaKind {
    /// Directory under `DATA_DIR/pki/`.
    dir: &'static str,
    /// Common name prefix (the host name follows).
    cn: &'static str,
    /// The public copy in the data dir.
    public: &'static str,
}

const DEVICE: CaKind = CaKind {
    dir: "device-ca",
    cn: "fleetgate device CA",
    public: "device-ca.pem",
};

/// The management CA: it issues the client certificates of management servers
/// (`fleetgate mgmt add`), kept apart from the device CA so that neither kind of certificate
/// is accepted on the other's endpoint. Files as for the device CA, under
/// `DATA_DIR/pki/mgmt-ca/` and `DATA_DIR/mgmt-ca.pem`.
const MGMT: CaKind = CaKind {
    dir: "mgmt-ca",
    cn: "fleetgate management CA",
    public: "mgmt-ca.pem",
};

/// [`ensure_device_ca`] for the management CA (see [`MGMT`]'s docs). [`DeviceCa::issue`]
/// issues management client certificates (CN = the management server's name).
pub fn ensure_mgmt_ca(data_dir: &Path) -> Result<DeviceCa, PkiError> {
    ensure_ca(data_dir, &MGMT)
}

/// `DATA_DIR/pki/mgmt-ca/`.
pub fn mgmt_ca_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki").join(MGMT.dir)
}

fn ensure_ca(data_dir: &Path, kind: &CaKind) -> Result<DeviceCa, PkiError> {
    let dir = data_dir.join("pki").join(kind.dir);
    std::fs::create_dir_all(data_dir).map_err(|e| PkiError::io(data_dir, e))?;
    ensure_dir(&data_dir.join("pki"), MODE_PRIVATE_DIR)?;
    ensure_dir(&dir, MODE_PRIVATE_DIR)?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    let ca = if cert_path.exists() {
        if !key_path.exists() {
            return Err(PkiError::NoCaKey {
                name: kind.dir.into(),
            });
        }
        load(&cert_path, &key_path)?
    } else {
        create(&cert_path, &key_path, kind.cn)?
    };
    let public = data_dir.join(kind.public);
    let want = pem::cert_pem(&ca.cert);
    if std::fs::read(&public).ok().as_deref() != Some(want.as_bytes()) {
        write_atomic(&public, want.as_bytes(), MODE_PUBLIC)?;
    }
    Ok(ca)
}

fn create(cert_path: &Path, key_path: &Path, cn: &str) -> Result<DeviceCa, PkiError> {
    let key = KeyType::EcdsaP256.generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{cn} {}", super::hostname()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(RcBasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(DEVICE_CA_DAYS.into());
    params.serial_number = Some(random_serial()?);
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            what: "device CA certificate",
            source,
        })?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    // Key first: a key without certificate is recreated, a certificate without key is not.
    write_atomic(key_path, pem::key_pem(&key_der).as_bytes(), MODE_PRIVATE)?;
    write_atomic(cert_path, pem::cert_pem(cert.der()).as_bytes(), MODE_PUBLIC)?;
    let mut ca = DeviceCa::new(cert.der().clone(), key)?;
    ca.created = true;
    Ok(ca)
}

fn load(cert_path: &Path, key_path: &Path) -> Result<DeviceCa, PkiError> {
    let what = super::fs::describe(cert_path);
    let mut certs = pem::bundle(&super::fs::read_input(cert_path)?, &what)?.certs;
    if certs.len() != 1 {
        return Err(PkiError::Certificate {
            what,
            index: 1,
            message: format!("expected exactly one certificate, found {}", certs.len()),
        });
    }
    let cert = certs.remove(0);
    let what = super::fs::describe(key_path);
    let mut keys = pem::bundle(&super::fs::read_input(key_path)?, &what)?.keys;
    if keys.len() != 1 {
        return Err(PkiError::NoKey { what });
    }
    let key = KeyPair::try_from(&keys.remove(0)).map_err(|e| PkiError::Key {
        what: what.clone(),
        message: e.to_string(),
    })?;
    DeviceCa::new(cert, key)
}

impl DeviceCa {
    fn new(cert: CertificateDer<'static>, key: KeyPair) -> Result<DeviceCa, PkiError> {
        let info = CertInfo::parse(&cert)?;
        if !info.is_ca() {
            return Err(PkiError::InvalidInput(format!(
                "the device CA certificate {:?} is not a CA",
                info.display_name()
            )));
        }
        if info.public_key != key.public_key_raw() {
            return Err(PkiError::Key {
                what: "the device CA key".into(),
                message: "it does not belong to the device CA certificate".into(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|source| PkiError::Generate {
            what: "issuer from the device CA certificate",
            source,
        })?;
        Ok(DeviceCa {
            cert,
            info,
            issuer,
            created: false,
        })
    }

    /// The device CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The device CA certificate (PEM): the content of `DATA_DIR/device-ca.pem`.
    pub fn cert_pem(&self) -> String {
        pem::cert_pem(&self.cert)
    }

    /// SHA-256 of the device CA certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.info.fingerprint
    }

    /// The parsed device CA certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// True when [`ensure_device_ca`] created the CA in this call.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Issues a device certificate for `unit_id` certifying `device_public_key_der` (the
    /// device's SubjectPublicKeyInfo, DER; ECDSA P-256/P-384, Ed25519 or RSA): CN = the unit ID,
    /// cA=false, digitalSignature, extended key usage clientAuth only, a random 128-bit serial,
    /// valid from `now` − 1 hour to `now` + `days` (callers use [`DEVICE_CERT_DAYS`]), cut to
    /// the CA's own `notAfter`.
    ///
    /// The unit ID follows the registry's rules
    /// ([`check_unit_id`]; surrounding white space is
    /// trimmed) and must fit a common name ([`MAX_DEVICE_CN_LEN`] characters).
    pub fn issue(
        &self,
        unit_id: &str,
        device_public_key_der: &[u8],
        days: u32,
        now: OffsetDateTime,
    ) -> Result<IssuedDevice, PkiError> {
        let unit = check_device_unit_id(unit_id)?;
        if days == 0 || days > MAX_DAYS {
            return Err(PkiError::InvalidInput(format!(
                "validity must be between 1 and {MAX_DAYS} days, not {days}"
            )));
        }
        let spki = SubjectPublicKeyInfo::from_der(device_public_key_der).map_err(|e| {
            PkiError::PublicKey {
                what: "the device public key".into(),
                message: e.to_string(),
            }
        })?;
        if now.unix_timestamp() >= self.info.not_after {
            return Err(PkiError::InvalidInput(format!(
                "the device CA {:?} expired on {}",
                self.info.display_name(),
                super::cert::format_time(self.info.not_after)
            )));
        }
        let ca_end = OffsetDateTime::from_unix_timestamp(self.info.not_after).map_err(|_| {
            PkiError::InvalidInput("the device CA's notAfter is out of range".into())
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, unit);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - BACKDATE;
        params.not_after = (now + Duration::days(days.into())).min(ca_end);
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        let serial_bytes = serial.to_bytes();
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(&spki, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "device certificate",
                source,
            })?;
        let cert_der = cert.der().clone();
        Ok(IssuedDevice {
            cert_pem: pem::cert_pem(&cert_der),
            fingerprint: Fingerprint::of(&cert_der),
            serial_hex: serial_bytes.iter().map(|b| format!("{b:02X}")).collect(),
            serial: serial_bytes,
            not_after: params.not_after.unix_timestamp(),
            public_key_sha256: Sha256::digest(device_public_key_der).into(),
            cert_der,
        })
    }
}

/// The registry's unit-ID rules plus the common-name length limit; returns the trimmed ID.
fn check_device_unit_id(unit_id: &str) -> Result<&str, PkiError> {
    let unit = check_unit_id(unit_id)
        .map_err(|why| PkiError::InvalidInput(format!("invalid unit ID {unit_id:?}: {why}")))?;
    if unit.len() > MAX_DEVICE_CN_LEN {
        return Err(PkiError::InvalidInput(format!(
            "invalid unit ID {unit_id:?}: longer than {MAX_DEVICE_CN_LEN} characters (the \
             limit of a certificate's common name)"
        )));
    }
    Ok(unit)
}

/// Checks that `cert_der` is a device certificate issued by `ca`, valid at `now`, for TLS
/// client authentication — the check rustls-webpki's client verifier makes in the handshake.
pub fn verify_device_cert(
    ca: &DeviceCa,
    cert_der: &[u8],
    now: OffsetDateTime,
) -> Result<(), PkiError> {
    let what = "the device certificate";
    let reject = |message: String| PkiError::Untrusted {
        what: what.into(),
        message,
    };
    let anchor = webpki::anchor_from_trusted_cert(&ca.cert)
        .map_err(|e| reject(format!("the device CA cannot be a trust anchor: {e}")))?;
    let cert = CertificateDer::from(cert_der);
    let ee = webpki::EndEntityCert::try_from(&cert).map_err(|e| PkiError::Certificate {
        what: what.into(),
        index: 1,
        message: e.to_string(),
    })?;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now.unix_timestamp()).unwrap_or(0),
    ));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| reject(e.to_string()))
}

/// A random positive 128-bit serial, always 16 bytes (no leading zero byte).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| PkiError::Io {
        path: PathBuf::from("<random generator>"),
        source: std::io::Error::other(e.to_string()),
    })?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rcgen::PublicKeyData as _;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn device_key() -> KeyPair {
        KeyPair::generate().unwrap()
    }

    #[test]
    fn ensure_is_idempotent_with_documented_files() {
        let tmp = tempfile::tempdir().unwrap();
        let a = ensure_device_ca(tmp.path()).unwrap();
        assert!(a.created());
        let b = ensure_device_ca(tmp.path()).unwrap();
        assert!(!b.created());
        assert_eq!(a.fingerprint(), b.fingerprint());
        let d = tmp.path();
        assert_eq!(mode(&d.join("pki")), 0o700);
        assert_eq!(mode(&device_ca_dir(d)), 0o700);
        assert_eq!(mode(&device_ca_cert_path(d)), 0o644);
        assert_eq!(mode(&device_ca_key_path(d)), 0o600);
        assert_eq!(mode(&device_ca_pem_path(d)), 0o644);
        assert_eq!(
            std::fs::read_to_string(device_ca_pem_path(d)).unwrap(),
            a.cert_pem()
        );
        // A deleted public copy is rewritten from the stored CA.
        std::fs::remove_file(device_ca_pem_path(d)).unwrap();
        let c = ensure_device_ca(d).unwrap();
        assert_eq!(c.fingerprint(), a.fingerprint());
        assert_eq!(
            std::fs::read_to_string(device_ca_pem_path(d)).unwrap(),
            a.cert_pem()
        );
        let info = a.info();
        assert!(
            info.common_name
                .as_deref()
                .unwrap()
                .starts_with("fleetgate device CA ")
        );
        assert_eq!(
            info.basic_constraints,
            Some(super::super::BasicConstraints {
                ca: true,
                path_len: Some(0)
            })
        );
        assert_eq!(info.key_type, "ECDSA P-256");
        assert!(info.not_after - info.not_before >= i64::from(DEVICE_CA_DAYS) * 86_400);
    }

    #[test]
    fn cert_without_key_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        ensure_device_ca(tmp.path()).unwrap();
        std::fs::remove_file(device_ca_key_path(tmp.path())).unwrap();
        assert!(matches!(
            ensure_device_ca(tmp.path()),
            Err(PkiError::NoCaKey { .. })
        ));
    }

    #[test]
    fn issue_and_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = ensure_device_ca(tmp.path()).unwrap();
        let key = device_key();
        let now = OffsetDateTime::now_utc();
        let dev = ca
            .issue(
                " 00E0C5A1B2C3 ",
                &key.subject_public_key_info(),
                DEVICE_CERT_DAYS,
                now,
            )
            .unwrap();
        assert_eq!(dev.fingerprint, Fingerprint::of(&dev.cert_der));
        assert_eq!(dev.serial.len(), 16);
        assert_eq!(dev.serial_hex.len(), 32);
        let info = CertInfo::parse(&dev.cert_der).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("00E0C5A1B2C3"));
        assert!(!info.is_ca());
        assert_eq!(info.serial.replace(':', "").to_uppercase(), dev.serial_hex);
        assert_eq!(info.not_after, dev.not_after);
        assert_eq!(
            dev.not_after,
            (now + Duration::days(DEVICE_CERT_DAYS.into())).unix_timestamp()
        );
        assert_eq!(info.public_key, key.public_key_raw());
        let cred = dev.credential();
        assert_eq!(cred.fingerprint, dev.fingerprint);
        assert_eq!(
            cred.public_key_sha256,
            Some(<[u8; 32]>::from(Sha256::digest(
                key.subject_public_key_info()
            )))
        );
        verify_device_cert(&ca, &dev.cert_der, now).unwrap();
        // Expired.
        let later = now + Duration::days(i64::from(DEVICE_CERT_DAYS) + 1);
        assert!(matches!(
            verify_device_cert(&ca, &dev.cert_der, later),
            Err(PkiError::Untrusted { .. })
        ));
        // Two certificates for the same key get different serials.
        let again = ca
            .issue("00E0C5A1B2C3", &key.subject_public_key_info(), 30, now)
            .unwrap();
        assert_ne!(again.serial, dev.serial);
    }

    #[test]
    fn bad_input_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = ensure_device_ca(tmp.path()).unwrap();
        let spki = device_key().subject_public_key_info();
        let now = OffsetDateTime::now_utc();
        for unit in ["", "   ", "a\u{7}b", "tab\there", &"x".repeat(65), "é"] {
            let e = ca.issue(unit, &spki, 30, now).unwrap_err();
            assert!(matches!(e, PkiError::InvalidInput(_)), "{unit:?}: {e}");
        }
        assert!(ca.issue(&"x".repeat(64), &spki, 30, now).is_ok());
        for garbage in [&b""[..], b"\x30\x03\x02\x01\x00", b"not DER at all"] {
            let e = ca.issue("unit1", garbage, 30, now).unwrap_err();
            assert!(matches!(e, PkiError::PublicKey { .. }), "{e}");
            assert!(e.is_rejection());
        }
        let mut truncated = spki.clone();
        truncated.pop();
        assert!(ca.issue("unit1", &truncated, 30, now).is_err());
        assert!(ca.issue("unit1", &spki, 0, now).is_err());
        assert!(matches!(
            verify_device_cert(&ca, b"garbage", now),
            Err(PkiError::Certificate { .. })
        ));
    }
}
