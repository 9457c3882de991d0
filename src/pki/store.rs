//! [`DataDir`]: where the PKI keeps its files (layout in the [module docs](super#data-dir-layout)).

use std::fs;
use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::fs::{MODE_PRIVATE, MODE_PRIVATE_DIR, MODE_PUBLIC, ensure_dir, write_atomic};
use super::{Keystore, PkiError, pem};

/// A CA stored in the data dir.
pub struct StoredCa {
    /// Its store name (slug).
    pub name: String,
    /// The CA certificate first, then its issuers, root last.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key, when the data dir holds it (needed to issue).
    pub key: Option<PrivateKeyDer<'static>>,
}

/// The data directory. Cheap to create; all paths derive from the root path.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data dir at `path` (nothing is created until something is written).
    pub fn new(path: impl Into<PathBuf>) -> DataDir {
        DataDir { root: path.into() }
    }

    /// The data dir itself.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `DATA_DIR/keystore.pem`: the active keystore, which the gateway serves and watches.
    pub fn keystore_path(&self) -> PathBuf {
        self.root.join("keystore.pem")
    }

    /// `DATA_DIR/root.pem`: the active root certificate (public).
    pub fn root_pem_path(&self) -> PathBuf {
        self.root.join("root.pem")
    }

    /// `DATA_DIR/pki/` (mode 0700).
    pub fn pki_dir(&self) -> PathBuf {
        self.root.join("pki")
    }

    /// `DATA_DIR/pki/ca/`: named CAs.
    pub fn ca_dir(&self) -> PathBuf {
        self.pki_dir().join("ca")
    }

    /// `DATA_DIR/pki/certs/`: named server certificates (keystore format).
    pub fn certs_dir(&self) -> PathBuf {
        self.pki_dir().join("certs")
    }

    /// `DATA_DIR/pki/rollover/`: the staged keystore and the rollover state.
    pub fn rollover_dir(&self) -> PathBuf {
        self.pki_dir().join("rollover")
    }

    /// Creates `pki/` and its subdirectories with mode 0700.
    pub fn ensure_pki_dirs(&self) -> Result<(), PkiError> {
        fs::create_dir_all(&self.root).map_err(|e| PkiError::io(&self.root, e))?;
        for dir in [
            self.pki_dir(),
            self.ca_dir(),
            self.certs_dir(),
            self.rollover_dir(),
        ] {
            ensure_dir(&dir, MODE_PRIVATE_DIR)?;
        }
        Ok(())
    }

    /// Certificate file of a CA: `pki/ca/<slug>.pem`.
    pub fn ca_cert_path(&self, name: &str) -> Result<PathBuf, PkiError> {
        Ok(self.ca_dir().join(format!("{}.pem", slug(name)?)))
    }

    /// Key file of a CA: `pki/ca/<slug>.key`.
    pub fn ca_key_path(&self, name: &str) -> Result<PathBuf, PkiError> {
        Ok(self.ca_dir().join(format!("{}.key", slug(name)?)))
    }

    /// Keystore file of a server certificate: `pki/certs/<slug>.pem`.
    pub fn cert_path(&self, name: &str) -> Result<PathBuf, PkiError> {
        Ok(self.certs_dir().join(format!("{}.pem", slug(name)?)))
    }

    /// Stores a CA. Refuses to overwrite an existing one.
    pub fn save_ca(
        &self,
        name: &str,
        chain: &[CertificateDer<'static>],
        key: Option<&PrivateKeyDer<'static>>,
    ) -> Result<PathBuf, PkiError> {
        self.ensure_pki_dirs()?;
        let cert_path = self.ca_cert_path(name)?;
        if cert_path.exists() {
            return Err(PkiError::AlreadyExists {
                kind: "CA",
                name: slug(name)?,
                path: cert_path,
            });
        }
        // Key first: a CA certificate without its key is a legal state, the reverse is not.
        if let Some(key) = key {
            write_atomic(
                &self.ca_key_path(name)?,
                pem::key_pem(key).as_bytes(),
                MODE_PRIVATE,
            )?;
        }
        let text: String = chain.iter().map(pem::cert_pem).collect();
        write_atomic(&cert_path, text.as_bytes(), MODE_PUBLIC)?;
        Ok(cert_path)
    }

    /// Loads a stored CA by name.
    pub fn ca(&self, name: &str) -> Result<StoredCa, PkiError> {
        let cert_path = self.ca_cert_path(name)?;
        if !cert_path.exists() {
            return Err(PkiError::NotFound {
                kind: "CA",
                name: name.into(),
                dir: self.ca_dir(),
                available: self.list_cas()?,
            });
        }
        let data = super::fs::read_input(&cert_path)?;
        let what = super::fs::describe(&cert_path);
        let bundle = pem::bundle(&data, &what)?;
        if bundle.certs.is_empty() {
            return Err(PkiError::NoCertificate { what });
        }
        let key_path = self.ca_key_path(name)?;
        let key = if key_path.exists() {
            let data = super::fs::read_input(&key_path)?;
            let what = super::fs::describe(&key_path);
            let mut keys = pem::bundle(&data, &what)?.keys;
            if keys.len() != 1 {
                return Err(PkiError::NoKey { what });
            }
            Some(keys.remove(0))
        } else {
            None
        };
        Ok(StoredCa {
            name: slug(name)?,
            chain: bundle.certs,
            key,
        })
    }

    /// Stores a server certificate with its key (keystore format, 0600). Refuses to overwrite.
    pub fn save_cert(&self, name: &str, keystore: &Keystore) -> Result<PathBuf, PkiError> {
        self.ensure_pki_dirs()?;
        let path = self.cert_path(name)?;
        if path.exists() {
            return Err(PkiError::AlreadyExists {
                kind: "certificate",
                name: slug(name)?,
                path,
            });
        }
        keystore.save(&path)?;
        Ok(path)
    }

    /// Loads a stored server certificate (as a keystore) by name.
    pub fn cert(&self, name: &str) -> Result<Keystore, PkiError> {
        let path = self.cert_path(name)?;
        if !path.exists() {
            return Err(PkiError::NotFound {
                kind: "certificate",
                name: name.into(),
                dir: self.certs_dir(),
                available: self.list_certs()?,
            });
        }
        Keystore::load(&path)
    }

    /// Names of the stored CAs, sorted.
    pub fn list_cas(&self) -> Result<Vec<String>, PkiError> {
        list(&self.ca_dir(), "pem")
    }

    /// Names of the stored server certificates, sorted.
    pub fn list_certs(&self) -> Result<Vec<String>, PkiError> {
        list(&self.certs_dir(), "pem")
    }

    /// The active keystore, or `None` when `keystore.pem` does not exist.
    pub fn active_keystore(&self) -> Result<Option<Keystore>, PkiError> {
        let path = self.keystore_path();
        if !path.exists() {
            return Ok(None);
        }
        Keystore::load(&path).map(Some)
    }

    /// Makes `keystore` the active one: atomically replaces `keystore.pem` (0600; a running
    /// gateway notices and reloads it), then `root.pem` (0644).
    pub fn activate(&self, keystore: &Keystore) -> Result<(), PkiError> {
        fs::create_dir_all(&self.root).map_err(|e| PkiError::io(&self.root, e))?;
        keystore.save(&self.keystore_path())?;
        self.write_root_pem(keystore)
    }

    /// Writes `root.pem` from the keystore's root when it is missing or differs.
    pub fn write_root_pem(&self, keystore: &Keystore) -> Result<(), PkiError> {
        let path = self.root_pem_path();
        let want = keystore.root_pem();
        if fs::read(&path).ok().as_deref() != Some(want.as_bytes()) {
            write_atomic(&path, want.as_bytes(), MODE_PUBLIC)?;
        }
        Ok(())
    }
}

fn list(dir: &Path, ext: &str) -> Result<Vec<String>, PkiError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PkiError::io(dir, e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(&format!(".{ext}"))?;
            (!stem.starts_with('.')).then(|| stem.to_owned())
        })
        .collect();
    names.sort();
    Ok(names)
}

/// The store name of a CA or certificate: lower case, runs of anything but letters and digits
/// become one `-` ("fleetgate root CA gw1" → "fleetgate-root-ca-gw1"). Lookups go through the
/// same function, so the display name and the slug both work on the command line.
pub fn slug(name: &str) -> Result<String, PkiError> {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        return Err(PkiError::InvalidInput(format!(
            "the name {name:?} needs at least one letter or digit"
        )));
    }
    if out.len() > 100 {
        out.truncate(100);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert_eq!(
            slug("fleetgate root CA gw1").unwrap(),
            "fleetgate-root-ca-gw1"
        );
        assert_eq!(slug("  My/Root..CA ").unwrap(), "my-root-ca");
        assert_eq!(slug("../../etc/passwd").unwrap(), "etc-passwd");
        assert!(slug("///").is_err());
    }
}
