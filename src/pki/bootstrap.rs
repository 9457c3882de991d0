//! First start: give a fresh data dir a root CA and a server certificate.

use std::path::{Path, PathBuf};

use super::create::{self, Host, IssuingCa, KeyType, Subject};
use super::store::{DataDir, slug};
use super::{Fingerprint, Keystore, PkiError};

/// What [`bootstrap`] found or made.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    /// `DATA_DIR/keystore.pem`.
    pub keystore_path: PathBuf,
    /// `DATA_DIR/root.pem`.
    pub root_pem_path: PathBuf,
    /// Fingerprint of the active root.
    pub fingerprint: Fingerprint,
    /// True when this call created the keystore.
    pub created: bool,
}

/// Idempotent first-start set-up of `data_dir`.
///
/// * If `DATA_DIR/keystore.pem` exists, it is loaded (an unreadable keystore is an error, never
///   silently replaced) and `DATA_DIR/root.pem` is (re)written when missing or different.
/// * Otherwise a root CA "fleetgate root CA `<hostname>`" (ECDSA P-256, 10 years) is created —
///   or, when `pki/ca/` already holds that root *with its key* (the keystore was deleted),
///   reused, so registered devices keep trusting the gateway — and a server certificate
///   "fleetgate `<hostname>`" (ECDSA P-256, 1 year, SANs = `hosts`; the host name and
///   `localhost` when `hosts` is empty) is issued from it. Written: the root under
///   `pki/ca/<slug>.{pem,key}` (key 0600, dir 0700) so `pki issue --ca <slug>` works later,
///   the server certificate under `pki/certs/<slug>.pem`, then `keystore.pem` (0600) and
///   `root.pem` (0644).
///
/// `<hostname>` is the kernel host name (`/proc/sys/kernel/hostname`), `localhost` if unknown.
pub fn bootstrap(data_dir: &Path, hosts: &[String]) -> Result<Bootstrap, PkiError> {
    let dir = DataDir::new(data_dir);
    std::fs::create_dir_all(data_dir).map_err(|e| PkiError::io(data_dir, e))?;
    if let Some(keystore) = dir.active_keystore()? {
        dir.write_root_pem(&keystore)?;
        return Ok(Bootstrap {
            keystore_path: dir.keystore_path(),
            root_pem_path: dir.root_pem_path(),
            fingerprint: keystore.fingerprint(),
            created: false,
        });
    }

    let hostname = hostname();
    let mut host_list = Vec::new();
    let wanted: Vec<String> = if hosts.is_empty() {
        vec![hostname.clone(), "localhost".into()]
    } else {
        hosts.to_vec()
    };
    for h in &wanted {
        let h = Host::parse(h)?;
        if !host_list.contains(&h) {
            host_list.push(h);
        }
    }

    dir.ensure_pki_dirs()?;
    let root_name = format!("fleetgate root CA {hostname}");
    let root_slug = slug(&root_name)?;
    let (root_chain, root_key) = if dir.list_cas()?.contains(&root_slug) {
        let ca = dir.ca(&root_slug)?;
        match ca.key {
            Some(key) => (ca.chain, key),
            None => return Err(PkiError::NoCaKey { name: root_slug }),
        }
    } else {
        let root = create::create_root(
            &Subject::cn(root_name.clone()),
            create::ROOT_DAYS,
            KeyType::EcdsaP256,
        )?;
        dir.save_ca(&root_slug, &root.chain, Some(&root.key))?;
        (root.chain, root.key)
    };

    let server_name = format!("fleetgate {hostname}");
    let leaf = create::issue_server(
        &IssuingCa {
            chain: &root_chain,
            key: &root_key,
        },
        &Subject::cn(server_name.clone()),
        &host_list,
        create::LEAF_DAYS,
        KeyType::EcdsaP256,
    )?;
    let keystore = Keystore {
        chain: leaf.chain,
        key: leaf.key,
    };
    // Keep a named copy for `pki export`; a leftover from an earlier bootstrap is replaced.
    let cert_path = dir.cert_path(&server_name)?;
    keystore.save(&cert_path)?;
    dir.activate(&keystore)?;
    Ok(Bootstrap {
        keystore_path: dir.keystore_path(),
        root_pem_path: dir.root_pem_path(),
        fingerprint: keystore.fingerprint(),
        created: true,
    })
}

/// The kernel host name, `localhost` when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && Host::parse(s).is_ok())
        .unwrap_or_else(|| "localhost".to_owned())
}
