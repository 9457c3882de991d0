//! The gateway's PKI: create, import, verify, export, install, renew and exchange the
//! certificate chain the gateway serves. The `fleetgate pki …` CLI ([`crate::cli::pki`]) is a
//! thin layer over these functions.
//!
//! # The keystore file
//!
//! One PEM file (mode 0600), in this order:
//!
//! ```text
//! -----BEGIN CERTIFICATE-----   the server (end-entity) certificate
//! -----BEGIN CERTIFICATE-----   intermediate CA(s), each signing the one before (zero or more)
//! -----BEGIN CERTIFICATE-----   the root CA (self-signed)
//! -----BEGIN PRIVATE KEY-----   the server certificate's private key, PKCS#8, unencrypted
//! ```
//!
//! [`Keystore::load`] also accepts the key anywhere in the file and as `RSA PRIVATE KEY`
//! (PKCS#1) or `EC PRIVATE KEY` (SEC1); it is converted to PKCS#8 and written back as such.
//! Text outside the PEM sections is ignored. Encrypted keys are refused (with the `openssl`
//! command that decrypts them).
//!
//! # Data-dir layout
//!
//! ```text
//! DATA_DIR/
//!   keystore.pem            the ACTIVE keystore (0600). The gateway serves it and watches it;
//!                           it is only ever replaced by rename (never written in place)
//!   root.pem                the active root certificate (0644), for clients and devices
//!   device-ca.pem           the device CA certificate (0644): the trust anchor of the TLS
//!                           server's client-certificate verifier (module `device`)
//!   pki/                    (0700)
//!     device-ca/ca.pem      the device CA, which issues device client certificates (0644)
//!     device-ca/ca.key      its private key, PKCS#8 (0600; directory 0700)
//!     ca/<name>.pem         a CA's certificate chain: the CA first, root last (0644)
//!     ca/<name>.key         that CA's private key, PKCS#8 (0600); absent for CAs imported
//!                           without a key (they cannot issue)
//!     certs/<name>.pem      a server certificate issued or imported here, keystore format (0600)
//!     rollover/staged.pem   the keystore staged for a root exchange (0600)
//!     rollover/state.json   when it was staged and the fingerprints involved
//!     rollover/devices.json device hand-over counts, written by the gateway (optional)
//!     rollover/previous.pem the keystore replaced by the last `rollover switch` (0600)
//! ```
//!
//! `<name>` is the [slug](store::slug) of the name given on creation (lower case, runs of
//! other characters as one `-`): "fleetgate root CA gw1" is stored as
//! `fleetgate-root-ca-gw1`; the CLI accepts either form.
//!
//! # Files are written atomically
//!
//! Every write goes to a temporary file in the same directory, created with its final mode,
//! fsynced, then renamed over the target ([`fs::write_atomic`]).
//!
//! # Verification
//!
//! [`verify()`] returns one [`Violation`] per broken rule (see [`Rule`]), never an error: an
//! invalid chain is a result, not a failure. Unreadable *input* (garbage, truncated or empty
//! files, DER where PEM was expected, encrypted keys) is a [`PkiError`] whose
//! [`is_rejection`](PkiError::is_rejection) is true.

#![forbid(unsafe_code)]

mod bootstrap;
pub mod cert;
pub mod country;
pub mod create;
mod der;
pub mod device;
mod error;
pub mod fs;
mod keystore;
pub mod ops;
pub mod pem;
pub mod store;
pub mod verify;

pub use bootstrap::{Bootstrap, bootstrap, hostname};
pub use cert::{BasicConstraints, CertInfo, San};
pub use create::{Generated, Host, IssuingCa, KeyType, Subject};
pub use device::{DeviceCa, IssuedDevice, ensure_device_ca, verify_device_cert};
pub use error::{DECRYPT_HINT, PkiError};
pub use keystore::{Fingerprint, Keystore};
pub use store::{DataDir, StoredCa};
pub use verify::{Rule, Violation, verify, verify_ca_chain_at, verify_chain, verify_chain_at};
