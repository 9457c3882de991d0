//! [`PkiError`]: everything that can go wrong in [`crate::pki`] except a chain that parses but
//! breaks a rule (that is a [`Violation`](super::Violation) list, not an error).

use std::path::PathBuf;

use super::verify::Violation;

/// The hint shown for an encrypted private key.
pub const DECRYPT_HINT: &str = "decrypt it first and import the decrypted file, e.g. \
     `openssl rsa -in encrypted.key -out decrypted.key` (RSA) or \
     `openssl pkey -in encrypted.key -out decrypted.key` (EC or any PKCS#8 key); \
     keep the decrypted file private (chmod 600)";

/// Errors of the PKI layer.
///
/// Two families, told apart by [`PkiError::is_rejection`]:
/// * **rejections** — the *input* is wrong (unreadable PEM, encrypted key, a chain that breaks a
///   rule, an incompatible renewal). The CLI exits with code 2 for these.
/// * **local faults** — I/O, a name that does not exist, bad arguments. The CLI exits with 1.
///
/// `what` fields name the input (usually `file <path>`) so that a message always says which
/// file is at fault. No variant ever carries private key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The input is empty (or whitespace only).
    #[error("{what}: the file is empty; expected PEM (-----BEGIN CERTIFICATE----- …)")]
    Empty {
        /// Which input.
        what: String,
    },
    /// The input is binary DER where PEM text was expected.
    #[error(
        "{what}: this is binary DER, not PEM; convert it first, e.g. \
         `openssl x509 -inform der -in cert.der -out cert.pem` (certificate) or \
         `openssl pkey -inform der -in key.der -out key.pem` (private key)"
    )]
    Der {
        /// Which input.
        what: String,
    },
    /// The input is not valid PEM (no section, broken base64, a section cut off…).
    #[error("{what}: not valid PEM: {message}")]
    Pem {
        /// Which input.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The private key is encrypted; fleetgate needs it decrypted.
    #[error("{what}: the private key is encrypted; {hint}", hint = DECRYPT_HINT)]
    EncryptedKey {
        /// Which input.
        what: String,
    },
    /// A certificate was expected but none was found.
    #[error("{what}: no CERTIFICATE section found")]
    NoCertificate {
        /// Which input.
        what: String,
    },
    /// A private key was expected but none was found.
    #[error(
        "{what}: no private key section found (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
    )]
    NoKey {
        /// Which input.
        what: String,
    },
    /// More than one private key where one was expected.
    #[error("{what}: {count} private keys found; expected exactly one")]
    TooManyKeys {
        /// Which input.
        what: String,
        /// How many were found.
        count: usize,
    },
    /// A CERTIFICATE section that is not a valid X.509 certificate.
    #[error("{what}: certificate #{index} is not a valid X.509 certificate: {message}")]
    Certificate {
        /// Which input.
        what: String,
        /// 1-based position in the input.
        index: usize,
        /// What the parser said.
        message: String,
    },
    /// A private key that cannot be used (malformed, unsupported algorithm).
    #[error("{what}: the private key cannot be used: {message}")]
    Key {
        /// Which input.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The chain breaks one or more rules (see [`verify`](super::verify())).
    #[error("the chain is not valid:\n{}", super::verify::format_violations(.0))]
    Invalid(Vec<Violation>),
    /// A renewal is not compatible with the active keystore (and was not forced).
    #[error("the new certificate is not compatible with the active one:\n{}", .0.iter().map(|r| format!("  - {r}")).collect::<Vec<_>>().join("\n"))]
    Incompatible(Vec<String>),
    /// An install would replace the active root (devices would stop trusting the gateway).
    #[error(
        "the new keystore has a different root (fingerprint {new}) than the active one ({active}); \
         devices registered with the active root would no longer trust the gateway. \
         Use `fleetgate pki rollover stage` to exchange the root, or pass --force to replace it anyway"
    )]
    RootChanged {
        /// Fingerprint of the active root.
        active: String,
        /// Fingerprint of the new root.
        new: String,
    },
    /// An argument is invalid (country code, host list, name, validity…).
    #[error("{0}")]
    InvalidInput(String),
    /// A named CA or certificate does not exist in the data dir.
    #[error("no {kind} named {name:?} in {}{}", dir.display(), available_list(.available))]
    NotFound {
        /// "CA" or "certificate".
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// Where it was looked for.
        dir: PathBuf,
        /// The names that do exist.
        available: Vec<String>,
    },
    /// A named CA or certificate already exists.
    #[error("a {kind} named {name:?} already exists ({})", path.display())]
    AlreadyExists {
        /// "CA" or "certificate".
        kind: &'static str,
        /// The name.
        name: String,
        /// The existing file.
        path: PathBuf,
    },
    /// The CA exists but its private key is not in the data dir.
    #[error(
        "the CA {name:?} has no private key in the data dir; import it with `fleetgate pki import --root … --ca-key …`"
    )]
    NoCaKey {
        /// The CA's name.
        name: String,
    },
    /// There is no active keystore (`DATA_DIR/keystore.pem`).
    #[error("no active keystore at {}; start the gateway once or use `fleetgate pki install`", .0.display())]
    NoActiveKeystore(PathBuf),
    /// `rollover switch`/`status` without a staged keystore.
    #[error("no keystore is staged; use `fleetgate pki rollover stage --keystore FILE` first")]
    NothingStaged,
    /// `rollover stage` with a keystore under the active root.
    #[error(
        "the staged keystore has the same root as the active one; use `fleetgate pki renew` for a new server certificate under the same root"
    )]
    SameRoot,
    /// Generating a key or certificate failed.
    #[error("generating the {what} failed: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The rcgen error.
        source: rcgen::Error,
    },
    /// A public key (SubjectPublicKeyInfo) that cannot be certified: malformed or of an
    /// unsupported algorithm.
    #[error("{what}: the public key cannot be used: {message}")]
    PublicKey {
        /// Which input.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// A certificate that parses but is not trusted for its purpose (wrong issuer, expired,
    /// wrong extended key usage…).
    #[error("{what} is not trusted: {message}")]
    Untrusted {
        /// Which certificate.
        what: String,
        /// Why (the verifier's verdict).
        message: String,
    },
    /// A small state file (rollover) is malformed.
    #[error("{}: {message}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn available_list(available: &[String]) -> String {
    if available.is_empty() {
        " (there are none)".to_owned()
    } else {
        format!(" (available: {})", available.join(", "))
    }
}

impl PkiError {
    /// True when the *input* was rejected (bad file, broken chain, incompatible renewal): the
    /// CLI exits with code 2. False for local faults (I/O, unknown names, bad arguments): 1.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            PkiError::Empty { .. }
                | PkiError::Der { .. }
                | PkiError::Pem { .. }
                | PkiError::EncryptedKey { .. }
                | PkiError::NoCertificate { .. }
                | PkiError::NoKey { .. }
                | PkiError::TooManyKeys { .. }
                | PkiError::Certificate { .. }
                | PkiError::Key { .. }
                | PkiError::Invalid(_)
                | PkiError::Incompatible(_)
                | PkiError::RootChanged { .. }
                | PkiError::SameRoot
                | PkiError::PublicKey { .. }
                | PkiError::Untrusted { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PkiError::Io {
            path: path.into(),
            source,
        }
    }
}
