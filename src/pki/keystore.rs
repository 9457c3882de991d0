//! [`Keystore`] (the chain + key the gateway serves) and [`Fingerprint`] (how devices pin the
//! root).

use std::fmt;
use std::path::Path;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

use super::{PkiError, fs, pem};

/// A certificate chain with the end-entity's private key: what the gateway serves.
///
/// Contract: `chain` is non-empty, ordered leaf first, then intermediates, root last (a chain of
/// one certificate is a self-signed leaf that is its own root); every entry parses as X.509;
/// `key` is PKCS#8 (keys read as PKCS#1 or SEC1 are converted on load). Whether the chain is
/// *valid* (signatures, dates, key matching the leaf…) is [`verify`](super::verify())'s job,
/// not this type's.
///
/// On disk it is one PEM file, see the [module docs](super#the-keystore-file).
pub struct Keystore {
    /// Leaf first, then intermediates, root last.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Keystore {
    fn clone(&self) -> Self {
        Keystore {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Keystore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keystore")
            .field("chain_len", &self.chain.len())
            .field("root_fingerprint", &self.fingerprint().hex())
            .field("key", &"<private>")
            .finish()
    }
}

impl Keystore {
    /// Reads and parses a keystore file (see [`Keystore::from_pem`]).
    pub fn load(path: &Path) -> Result<Keystore, PkiError> {
        let data = fs::read_input(path)?;
        Keystore::from_pem(&data, &fs::describe(path))
    }

    /// Parses a keystore from PEM text: one or more certificates (leaf first, root last) and
    /// exactly one private key (PKCS#8, PKCS#1 RSA or SEC1 EC; anywhere in the file).
    /// `what` names the input in error messages.
    pub fn from_pem(data: &[u8], what: &str) -> Result<Keystore, PkiError> {
        let bundle = pem::bundle(data, what)?;
        if bundle.certs.is_empty() {
            return Err(PkiError::NoCertificate { what: what.into() });
        }
        let mut keys = bundle.keys;
        match keys.len() {
            0 => Err(PkiError::NoKey { what: what.into() }),
            1 => Ok(Keystore {
                chain: bundle.certs,
                key: keys.remove(0),
            }),
            count => Err(PkiError::TooManyKeys {
                what: what.into(),
                count,
            }),
        }
    }

    /// The keystore as PEM text (the file format). Contains the private key: never log it.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for cert in &self.chain {
            out.push_str(&pem::cert_pem(cert));
        }
        out.push_str(&pem::key_pem(&self.key));
        out
    }

    /// Writes the keystore to `path` atomically (temp file in the same directory, mode 0600,
    /// fsync, rename): a process watching `path` never sees a half-written file.
    pub fn save(&self, path: &Path) -> Result<(), PkiError> {
        fs::write_atomic(path, self.to_pem().as_bytes(), fs::MODE_PRIVATE)
    }

    /// The end-entity (server) certificate. Panics if `chain` is empty, which [`Keystore::load`]
    /// and [`Keystore::from_pem`] never produce.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The root certificate (the last of the chain). Panics if `chain` is empty (see
    /// [`Keystore::leaf`]).
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.chain[self.chain.len() - 1]
    }

    /// The certificates between leaf and root (possibly none).
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        if self.chain.len() <= 2 {
            &[]
        } else {
            &self.chain[1..self.chain.len() - 1]
        }
    }

    /// SHA-256 fingerprint of the root certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self.root())
    }

    /// The root certificate as PEM (the content of `DATA_DIR/root.pem`).
    pub fn root_pem(&self) -> String {
        pem::cert_pem(self.root())
    }
}

/// SHA-256 of a certificate's DER — for the root, what devices check at registration.
///
/// Shown in four parts of 16 upper-case hex digits. `Display` is one line:
/// `Part 1: 0123456789ABCDEF Part 2: … Part 3: … Part 4: …`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(Sha256::digest(cert.as_ref()).into())
    }

    /// All 64 upper-case hex digits.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02X}")).collect()
    }

    /// The four parts of 16 upper-case hex digits (Part 1 … Part 4).
    pub fn parts(&self) -> [String; 4] {
        let hex = self.hex();
        std::array::from_fn(|i| hex[i * 16..(i + 1) * 16].to_owned())
    }

    /// Parses 64 hex digits (any case; spaces, colons and `-` ignored).
    pub fn from_hex(s: &str) -> Option<Fingerprint> {
        let digits: Vec<u8> = s
            .bytes()
            .filter(|b| !matches!(b, b' ' | b':' | b'-'))
            .collect();
        if digits.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [p1, p2, p3, p4] = self.parts();
        write!(f, "Part 1: {p1} Part 2: {p2} Part 3: {p3} Part 4: {p4}")
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_parts_and_display() {
        let fp = Fingerprint(std::array::from_fn(|i| i as u8));
        let parts = fp.parts();
        assert_eq!(parts[0], "0001020304050607");
        assert_eq!(parts[3], "18191A1B1C1D1E1F");
        assert_eq!(
            fp.to_string(),
            "Part 1: 0001020304050607 Part 2: 08090A0B0C0D0E0F \
             Part 3: 1011121314151617 Part 4: 18191A1B1C1D1E1F"
        );
        assert_eq!(Fingerprint::from_hex(&fp.hex()), Some(fp));
        assert_eq!(
            Fingerprint::from_hex(&parts.join(" ").to_lowercase()),
            Some(fp)
        );
        assert_eq!(Fingerprint::from_hex("zz"), None);
    }

    #[test]
    fn sha256_of_der() {
        // SHA-256("abc")
        let fp = Fingerprint::of(&CertificateDer::from(b"abc".to_vec()));
        assert_eq!(
            fp.hex(),
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
        );
    }
}
