//! The operations behind `fleetgate pki …`: create, issue, import, export, install, renew and
//! root rollover, each working on a [`DataDir`]. They return reports for the caller to print;
//! they print nothing themselves.

use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::cert::CertInfo;
use super::create::{self, Host, IssuingCa, KeyType, Subject};
use super::fs::{self as pfs, MODE_PRIVATE, write_atomic};
use super::store::{DataDir, slug};
use super::verify::{self, Violation};
use super::{Fingerprint, Keystore, PkiError, pem};

/// One PEM input: its bytes and how messages name it.
#[derive(Clone, Debug)]
pub struct Input {
    /// How messages name it (`file /path/x.pem`).
    pub what: String,
    /// The bytes.
    pub data: Vec<u8>,
}

impl Input {
    /// Reads a file.
    pub fn read(path: &Path) -> Result<Input, PkiError> {
        Ok(Input {
            what: pfs::describe(path),
            data: pfs::read_input(path)?,
        })
    }

    /// Wraps bytes already in memory.
    pub fn bytes(what: impl Into<String>, data: impl Into<Vec<u8>>) -> Input {
        Input {
            what: what.into(),
            data: data.into(),
        }
    }
}

/// Now, in seconds since the Unix epoch.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// What a create/issue/import stored.
#[derive(Debug)]
pub struct Stored {
    /// Store name (slug).
    pub name: String,
    /// The certificate (chain) file.
    pub path: PathBuf,
    /// The private key file, when separate from `path` (CAs).
    pub key_path: Option<PathBuf>,
    /// The new certificate.
    pub info: CertInfo,
    /// Fingerprint of the chain's root.
    pub root_fingerprint: Fingerprint,
}

/// Result of creating something.
#[derive(Debug)]
pub struct Created {
    /// What was stored.
    pub stored: Stored,
    /// Things the operator should know.
    pub warnings: Vec<String>,
}

/// Creates a root CA and stores it (with its key) as `pki/ca/<slug of CN>`.
pub fn create_root(
    dir: &DataDir,
    subject: &Subject,
    days: u32,
    key_type: KeyType,
) -> Result<Created, PkiError> {
    let name = slug(&subject.common_name)?;
    refuse_existing_ca(dir, &name)?;
    let generated = create::create_root(subject, days, key_type)?;
    let path = dir.save_ca(&name, &generated.chain, Some(&generated.key))?;
    Ok(Created {
        stored: Stored {
            key_path: Some(dir.ca_key_path(&name)?),
            info: CertInfo::parse(&generated.chain[0])?,
            root_fingerprint: Fingerprint::of(root_of(&generated.chain)),
            name,
            path,
        },
        warnings: generated.warnings,
    })
}

/// Creates an intermediate CA signed by the stored CA `ca_name` and stores it (with its key)
/// as `pki/ca/<slug of CN>`.
pub fn create_intermediate(
    dir: &DataDir,
    ca_name: &str,
    subject: &Subject,
    days: u32,
    key_type: KeyType,
    path_len: Option<u8>,
) -> Result<Created, PkiError> {
    let name = slug(&subject.common_name)?;
    refuse_existing_ca(dir, &name)?;
    let ca = dir.ca(ca_name)?;
    let ca_key = ca.key.as_ref().ok_or_else(|| PkiError::NoCaKey {
        name: ca.name.clone(),
    })?;
    // The new CA must fit under its parents' path length limits.
    let parent_room = verify::verify_ca_chain_at(&ca.chain, None, now());
    if !parent_room.is_empty() {
        return Err(PkiError::Invalid(parent_room));
    }
    let generated = create::create_intermediate(
        &IssuingCa {
            chain: &ca.chain,
            key: ca_key,
        },
        subject,
        days,
        key_type,
        path_len,
    )?;
    let violations = verify::verify_ca_chain_at(&generated.chain, Some(&generated.key), now());
    if !violations.is_empty() {
        return Err(PkiError::Invalid(violations));
    }
    let path = dir.save_ca(&name, &generated.chain, Some(&generated.key))?;
    Ok(Created {
        stored: Stored {
            key_path: Some(dir.ca_key_path(&name)?),
            info: CertInfo::parse(&generated.chain[0])?,
            root_fingerprint: Fingerprint::of(root_of(&generated.chain)),
            name,
            path,
        },
        warnings: generated.warnings,
    })
}

/// Issues a server certificate from the stored CA `ca_name` and stores it (chain + key, keystore
/// format) as `pki/certs/<slug of name>`. `name` is the store name, `subject.common_name` the
/// holder (CN); neither may equal the root's name. The result is verified for `hosts` before it
/// is stored.
pub fn issue(
    dir: &DataDir,
    ca_name: &str,
    name: &str,
    subject: &Subject,
    hosts: &[Host],
    days: u32,
    key_type: KeyType,
) -> Result<Created, PkiError> {
    let store_name = slug(name)?;
    let path = dir.cert_path(&store_name)?;
    if path.exists() {
        return Err(PkiError::AlreadyExists {
            kind: "certificate",
            name: store_name,
            path,
        });
    }
    let ca = dir.ca(ca_name)?;
    let ca_key = ca.key.as_ref().ok_or_else(|| PkiError::NoCaKey {
        name: ca.name.clone(),
    })?;
    let root_info = CertInfo::parse(root_of(&ca.chain))?;
    if root_info.display_name().eq_ignore_ascii_case(name.trim()) {
        return Err(PkiError::InvalidInput(format!(
            "the certificate's name {name:?} must differ from the root's name"
        )));
    }
    let generated = create::issue_server(
        &IssuingCa {
            chain: &ca.chain,
            key: ca_key,
        },
        subject,
        hosts,
        days,
        key_type,
    )?;
    let keystore = Keystore {
        chain: generated.chain,
        key: generated.key,
    };
    let host_strings: Vec<String> = hosts
        .iter()
        .filter(|h| !matches!(h, Host::Dns(d) if d.starts_with("*.")))
        .map(ToString::to_string)
        .collect();
    let violations = verify::verify(&keystore, &host_strings);
    if !violations.is_empty() {
        return Err(PkiError::Invalid(violations));
    }
    let path = dir.save_cert(&store_name, &keystore)?;
    Ok(Created {
        stored: Stored {
            name: store_name,
            path,
            key_path: None,
            info: CertInfo::parse(keystore.leaf())?,
            root_fingerprint: keystore.fingerprint(),
        },
        warnings: generated.warnings,
    })
}

fn refuse_existing_ca(dir: &DataDir, name: &str) -> Result<(), PkiError> {
    let path = dir.ca_cert_path(name)?;
    if path.exists() {
        return Err(PkiError::AlreadyExists {
            kind: "CA",
            name: name.into(),
            path,
        });
    }
    Ok(())
}

fn root_of<'a>(chain: &'a [CertificateDer<'static>]) -> &'a CertificateDer<'static> {
    &chain[chain.len() - 1]
}

/// The inputs of an import (all PEM).
#[derive(Debug, Default)]
pub struct ImportRequest {
    /// The root CA certificate. Extra certificates in this input are treated as intermediates.
    pub root: Option<Input>,
    /// Intermediate CA certificates, in any order (ordered by issuer → subject).
    pub intermediates: Vec<Input>,
    /// The server certificate (first certificate of the input; further ones are treated as
    /// intermediates, so a `fullchain.pem` works).
    pub cert: Option<Input>,
    /// The server certificate's decrypted private key.
    pub key: Option<Input>,
    /// The decrypted private key of the lowest CA given (the last intermediate, or the root) —
    /// to issue from it.
    pub ca_key: Option<Input>,
    /// Store name of the server certificate (default: slug of its CN).
    pub name: Option<String>,
    /// Hosts the server certificate must cover.
    pub hosts: Vec<String>,
}

/// What an import stored.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// The server certificate, as `pki/certs/<name>.pem` (keystore format).
    pub cert: Option<Stored>,
    /// The CA (with its key) as `pki/ca/<name>.{pem,key}`.
    pub ca: Option<Stored>,
}

/// Imports an existing chain and/or a CA with its key. Everything is verified before anything
/// is stored; a broken chain is refused with its violations ([`PkiError::Invalid`]).
pub fn import(dir: &DataDir, req: ImportRequest) -> Result<ImportReport, PkiError> {
    let Some(root_input) = &req.root else {
        return Err(PkiError::InvalidInput(
            "--root is required: the root CA certificate (PEM)".into(),
        ));
    };
    if req.cert.is_some() != req.key.is_some() {
        return Err(PkiError::InvalidInput(
            "--cert and --key go together: the server certificate and its decrypted private key"
                .into(),
        ));
    }
    // Certificates from all inputs.
    let root_certs = certs_of(root_input)?;
    let (root, mut pool) = pick_root(root_certs);
    for input in &req.intermediates {
        pool.extend(certs_of(input)?);
    }
    let leaf = match &req.cert {
        Some(input) => {
            let mut certs = certs_of(input)?.into_iter();
            let leaf = certs.next();
            pool.extend(certs);
            leaf
        }
        None => None,
    };
    let root_fp = Fingerprint::of(&root);
    pool.retain(|c| Fingerprint::of(c) != root_fp);
    dedup(&mut pool);
    if let Some(l) = &leaf {
        let fp = Fingerprint::of(l);
        pool.retain(|c| Fingerprint::of(c) != fp);
    }
    let key = match &req.key {
        Some(input) => Some(one_key(input)?),
        None => None,
    };
    let ca_key = match &req.ca_key {
        Some(input) => Some(one_key(input)?),
        None => None,
    };

    let mut report = ImportReport::default();
    let now = now();

    // The CA chain: lowest intermediate first, root last.
    let ca_chain = {
        let lowest = lowest_ca(&pool);
        let mut chain = match lowest {
            Some(i) => order_from(pool[i].clone(), &pool, &root),
            None => Vec::new(),
        };
        chain.push(root.clone());
        chain
    };

    // Check everything first, store afterwards.
    let server = match (leaf, key) {
        (Some(leaf), Some(key)) => {
            let mut chain = order_from(leaf, &pool, &root);
            chain.push(root.clone());
            let keystore = Keystore { chain, key };
            let violations =
                verify::verify_chain_at(&keystore.chain, Some(&keystore.key), &req.hosts, now);
            if !violations.is_empty() {
                return Err(PkiError::Invalid(violations));
            }
            Some(keystore)
        }
        _ => None,
    };
    if let Some(ca_key) = &ca_key {
        let violations = verify::verify_ca_chain_at(&ca_chain, Some(ca_key), now);
        if !violations.is_empty() {
            return Err(PkiError::Invalid(violations));
        }
    } else if server.is_none() {
        let violations = verify::verify_ca_chain_at(&ca_chain, None, now);
        if !violations.is_empty() {
            return Err(PkiError::Invalid(violations));
        }
    }

    if let Some(keystore) = server {
        let info = CertInfo::parse(keystore.leaf())?;
        let name = slug(req.name.as_deref().unwrap_or(info.display_name()))?;
        let path = dir.save_cert(&name, &keystore)?;
        report.cert = Some(Stored {
            name,
            path,
            key_path: None,
            info,
            root_fingerprint: keystore.fingerprint(),
        });
    }
    if ca_key.is_some() || report.cert.is_none() {
        let info = CertInfo::parse(&ca_chain[0])?;
        let name = slug(info.display_name())?;
        let path = dir.save_ca(&name, &ca_chain, ca_key.as_ref())?;
        report.ca = Some(Stored {
            key_path: ca_key
                .as_ref()
                .map(|_| dir.ca_key_path(&name))
                .transpose()?,
            name,
            path,
            info,
            root_fingerprint: root_fp,
        });
    }
    Ok(report)
}

fn certs_of(input: &Input) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bundle = pem::bundle(&input.data, &input.what)?;
    if bundle.certs.is_empty() {
        return Err(PkiError::NoCertificate {
            what: input.what.clone(),
        });
    }
    Ok(bundle.certs)
}

fn one_key(input: &Input) -> Result<PrivateKeyDer<'static>, PkiError> {
    let mut keys = pem::bundle(&input.data, &input.what)?.keys;
    match keys.len() {
        0 => Err(PkiError::NoKey {
            what: input.what.clone(),
        }),
        1 => Ok(keys.remove(0)),
        count => Err(PkiError::TooManyKeys {
            what: input.what.clone(),
            count,
        }),
    }
}

/// The root is the self-issued certificate of the root input (the last one if several); the
/// others go to the intermediate pool (so a bundle works as `--root`).
fn pick_root(
    mut certs: Vec<CertificateDer<'static>>,
) -> (CertificateDer<'static>, Vec<CertificateDer<'static>>) {
    let idx = certs
        .iter()
        .rposition(|c| CertInfo::parse(c).is_ok_and(|i| i.is_self_issued()))
        .unwrap_or(certs.len() - 1);
    let root = certs.remove(idx);
    (root, certs)
}

fn dedup(pool: &mut Vec<CertificateDer<'static>>) {
    let mut seen = Vec::new();
    pool.retain(|c| {
        let fp = Fingerprint::of(c);
        if seen.contains(&fp) {
            false
        } else {
            seen.push(fp);
            true
        }
    });
}

/// The pool certificate that issues no other pool certificate (the one right above the leaf).
fn lowest_ca(pool: &[CertificateDer<'static>]) -> Option<usize> {
    let infos: Vec<Option<CertInfo>> = pool.iter().map(|c| CertInfo::parse(c).ok()).collect();
    (0..pool.len()).find(|&i| {
        let Some(me) = &infos[i] else { return false };
        !infos.iter().enumerate().any(|(j, other)| {
            j != i
                && other
                    .as_ref()
                    .is_some_and(|o| o.issuer_raw == me.subject_raw && !o.is_self_issued())
        })
    })
}

/// `start`, then the pool certificates in issuer order until the root's subject is reached;
/// pool certificates that do not fit are appended in their given order (verification then
/// names them).
fn order_from(
    start: CertificateDer<'static>,
    pool: &[CertificateDer<'static>],
    root: &CertificateDer<'static>,
) -> Vec<CertificateDer<'static>> {
    let root_subject = CertInfo::parse(root).map(|i| i.subject_raw).ok();
    let infos: Vec<Option<CertInfo>> = pool.iter().map(|c| CertInfo::parse(c).ok()).collect();
    let start_fp = Fingerprint::of(&start);
    let mut used = vec![false; pool.len()];
    for (i, c) in pool.iter().enumerate() {
        if Fingerprint::of(c) == start_fp {
            used[i] = true;
        }
    }
    let mut chain = vec![start];
    while let Ok(current) = CertInfo::parse(&chain[chain.len() - 1]) {
        if Some(&current.issuer_raw) == root_subject.as_ref() || current.is_self_issued() {
            break;
        }
        let next = (0..pool.len()).find(|&i| {
            !used[i]
                && infos[i]
                    .as_ref()
                    .is_some_and(|info| info.subject_raw == current.issuer_raw)
        });
        match next {
            Some(i) => {
                used[i] = true;
                chain.push(pool[i].clone());
            }
            None => break,
        }
    }
    for (i, c) in pool.iter().enumerate() {
        if !used[i] {
            chain.push(c.clone());
        }
    }
    chain
}

/// Reads a chain for `verify --chain`: all certificates of all inputs in order (leaf first,
/// root last; a chain given root first is reversed) and the private key if one is present.
pub fn load_chain(
    inputs: &[Input],
) -> Result<(Vec<CertificateDer<'static>>, Option<PrivateKeyDer<'static>>), PkiError> {
    let mut certs = Vec::new();
    let mut keys = Vec::new();
    for input in inputs {
        let bundle = pem::bundle(&input.data, &input.what)?;
        certs.extend(bundle.certs);
        keys.extend(bundle.keys);
    }
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            what: inputs
                .iter()
                .map(|i| i.what.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let self_issued = |c: &CertificateDer<'_>| CertInfo::parse(c).is_ok_and(|i| i.is_self_issued());
    if certs.len() > 1 && self_issued(&certs[0]) && !self_issued(&certs[certs.len() - 1]) {
        certs.reverse();
    }
    match keys.len() {
        0 => Ok((certs, None)),
        1 => Ok((certs, keys.pop())),
        count => Err(PkiError::TooManyKeys {
            what: "the chain files".into(),
            count,
        }),
    }
}

/// Writes the stored server certificate `name` as a keystore file (0600) at `out`.
pub fn export(dir: &DataDir, name: &str, out: &Path) -> Result<Keystore, PkiError> {
    let keystore = dir.cert(name)?;
    keystore.save(out)?;
    Ok(keystore)
}

/// What an install did.
#[derive(Debug)]
pub struct InstallReport {
    /// Where it was installed (`DATA_DIR/keystore.pem`).
    pub path: PathBuf,
    /// The new server certificate.
    pub leaf: CertInfo,
    /// Fingerprint of the new root.
    pub fingerprint: Fingerprint,
    /// Fingerprint of the root it replaced, if any.
    pub previous: Option<Fingerprint>,
}

/// Makes `keystore` the gateway's keystore (atomic replace of `DATA_DIR/keystore.pem`; a
/// running gateway reloads it without restart and keeps its connections). The chain must pass
/// [`verify`](verify::verify) for `hosts`. Replacing the active *root* is refused unless
/// `force` (devices pinned to the old root would be locked out; see [`rollover_stage`]).
pub fn install(
    dir: &DataDir,
    keystore: &Keystore,
    hosts: &[String],
    force: bool,
) -> Result<InstallReport, PkiError> {
    let violations = verify::verify(keystore, hosts);
    if !violations.is_empty() {
        return Err(PkiError::Invalid(violations));
    }
    let previous = dir.active_keystore()?.map(|k| k.fingerprint());
    if let Some(active) = previous {
        if active != keystore.fingerprint() && !force {
            return Err(PkiError::RootChanged {
                active: active.to_string(),
                new: keystore.fingerprint().to_string(),
            });
        }
    }
    dir.activate(keystore)?;
    Ok(InstallReport {
        path: dir.keystore_path(),
        leaf: CertInfo::parse(keystore.leaf())?,
        fingerprint: keystore.fingerprint(),
        previous,
    })
}

/// Why a new keystore is not a compatible renewal of `active`; empty when it is: same root,
/// same set of host names/IPs, and a CA-signed (not self-signed) server certificate.
pub fn renewal_incompatibilities(active: &Keystore, new: &Keystore) -> Vec<String> {
    let mut reasons = Vec::new();
    if active.fingerprint() != new.fingerprint() {
        reasons.push(format!(
            "different root: the active root is {}, the new one is {} \
             (to exchange the root use `fleetgate pki rollover`)",
            active.fingerprint(),
            new.fingerprint()
        ));
    }
    match (CertInfo::parse(active.leaf()), CertInfo::parse(new.leaf())) {
        (Ok(old), Ok(newer)) => {
            let (old_hosts, new_hosts) = (old.host_set(), newer.host_set());
            if old_hosts != new_hosts {
                let missing: Vec<&String> = old_hosts
                    .iter()
                    .filter(|h| !new_hosts.contains(h))
                    .collect();
                let added: Vec<&String> = new_hosts
                    .iter()
                    .filter(|h| !old_hosts.contains(h))
                    .collect();
                let mut parts = Vec::new();
                if !missing.is_empty() {
                    parts.push(format!(
                        "missing {}",
                        missing
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if !added.is_empty() {
                    parts.push(format!(
                        "added {}",
                        added
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                reasons.push(format!(
                    "different host set: {} (active: {})",
                    parts.join("; "),
                    old_hosts.join(", ")
                ));
            }
            if new.chain.len() < 2 || newer.is_self_issued() {
                reasons.push("the new server certificate is self-signed, not CA-signed".into());
            }
        }
        _ => reasons.push("a certificate cannot be parsed".into()),
    }
    reasons
}

/// What a renewal did.
#[derive(Debug)]
pub struct RenewReport {
    /// The server certificate that was replaced.
    pub old_leaf: CertInfo,
    /// The new one.
    pub new_leaf: CertInfo,
    /// Compatibility conditions that failed and were overridden by `force`.
    pub forced_over: Vec<String>,
}

/// Installs `new` as a renewal of the active keystore: refused when the chain breaks a rule
/// (never overridable) or when it is not compatible ([`renewal_incompatibilities`]) unless
/// `force`.
pub fn renew(dir: &DataDir, new: &Keystore, force: bool) -> Result<RenewReport, PkiError> {
    let active = dir
        .active_keystore()?
        .ok_or_else(|| PkiError::NoActiveKeystore(dir.keystore_path()))?;
    let old_leaf = CertInfo::parse(active.leaf())?;
    // Host coverage is a compatibility condition (below), overridable by `force`; every other
    // rule is not.
    let violations = verify::verify(new, &[]);
    if !violations.is_empty() {
        return Err(PkiError::Invalid(violations));
    }
    let reasons = renewal_incompatibilities(&active, new);
    if !reasons.is_empty() && !force {
        return Err(PkiError::Incompatible(reasons));
    }
    dir.activate(new)?;
    Ok(RenewReport {
        old_leaf,
        new_leaf: CertInfo::parse(new.leaf())?,
        forced_over: reasons,
    })
}

/// `pki/rollover/state.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RolloverState {
    /// When the keystore was staged (seconds since the Unix epoch).
    pub staged_at: i64,
    /// Root fingerprint (64 hex digits) of the keystore active when staging.
    pub active_fingerprint: String,
    /// Root fingerprint of the staged keystore.
    pub staged_fingerprint: String,
}

/// Device hand-over counts for a staged root, written by the gateway (relay/onboarding) to
/// `pki/rollover/devices.json` with [`write_device_report`] and read by `rollover status` and
/// `rollover switch`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceReport {
    /// When the counts were taken (seconds since the Unix epoch).
    pub updated_at: i64,
    /// Root fingerprint (hex) these counts are about.
    pub staged_fingerprint: String,
    /// Devices connected now.
    pub connected: u64,
    /// Devices that hold the new root.
    pub have_new_root: u64,
    /// Devices whose agent supports the hand-over but do not hold the new root yet.
    pub lack_new_root: u64,
    /// Devices whose agent does not support the hand-over at all.
    pub lack_feature: u64,
}

/// Writes the device hand-over counts (for the gateway's control thread).
pub fn write_device_report(dir: &DataDir, report: &DeviceReport) -> Result<(), PkiError> {
    let path = dir.rollover_dir().join("devices.json");
    dir.ensure_pki_dirs()?;
    let json = serde_json::to_vec_pretty(report).map_err(|e| PkiError::State {
        path: path.clone(),
        message: e.to_string(),
    })?;
    write_atomic(&path, &json, pfs::MODE_PUBLIC)
}

/// The rollover state.
#[derive(Debug)]
pub struct RolloverStatus {
    /// Root fingerprint of the active keystore.
    pub active: Option<Fingerprint>,
    /// The staged keystore, if any.
    pub staged: Option<Staged>,
    /// Device hand-over counts for the staged root, when the gateway has reported them.
    pub devices: Option<DeviceReport>,
}

/// A staged keystore.
#[derive(Debug)]
pub struct Staged {
    /// The state file.
    pub state: RolloverState,
    /// Its server certificate.
    pub leaf: CertInfo,
    /// Its root.
    pub root: CertInfo,
    /// Rules it breaks *now* (e.g. expired since staging); switch refuses while non-empty.
    pub violations: Vec<Violation>,
}

fn staged_path(dir: &DataDir) -> PathBuf {
    dir.rollover_dir().join("staged.pem")
}

fn state_path(dir: &DataDir) -> PathBuf {
    dir.rollover_dir().join("state.json")
}

fn devices_path(dir: &DataDir) -> PathBuf {
    dir.rollover_dir().join("devices.json")
}

/// Stages `new` — a keystore under a *new* root — beside the active one, to switch to later.
/// It must pass verification for the active host names/IPs. Replaces an earlier staging.
pub fn rollover_stage(dir: &DataDir, new: &Keystore) -> Result<RolloverState, PkiError> {
    let active = dir
        .active_keystore()?
        .ok_or_else(|| PkiError::NoActiveKeystore(dir.keystore_path()))?;
    if active.fingerprint() == new.fingerprint() {
        return Err(PkiError::SameRoot);
    }
    let hosts: Vec<String> = CertInfo::parse(active.leaf())?
        .host_set()
        .into_iter()
        .filter(|h| !h.contains('*'))
        .collect();
    let violations = verify::verify(new, &hosts);
    if !violations.is_empty() {
        return Err(PkiError::Invalid(violations));
    }
    dir.ensure_pki_dirs()?;
    new.save(&staged_path(dir))?;
    let state = RolloverState {
        staged_at: now(),
        active_fingerprint: active.fingerprint().hex(),
        staged_fingerprint: new.fingerprint().hex(),
    };
    let json = serde_json::to_vec_pretty(&state).map_err(|e| PkiError::State {
        path: state_path(dir),
        message: e.to_string(),
    })?;
    write_atomic(&state_path(dir), &json, MODE_PRIVATE)?;
    // Counts about an earlier staging are meaningless now.
    let _ = std::fs::remove_file(devices_path(dir));
    Ok(state)
}

/// The staged keystore and its state, if any.
pub fn rollover_staged(dir: &DataDir) -> Result<Option<(Keystore, RolloverState)>, PkiError> {
    let path = staged_path(dir);
    if !path.exists() {
        return Ok(None);
    }
    let keystore = Keystore::load(&path)?;
    let state = read_json::<RolloverState>(&state_path(dir))?.unwrap_or(RolloverState {
        staged_at: 0,
        active_fingerprint: String::new(),
        staged_fingerprint: keystore.fingerprint().hex(),
    });
    Ok(Some((keystore, state)))
}

/// Reports the rollover state.
pub fn rollover_status(dir: &DataDir) -> Result<RolloverStatus, PkiError> {
    let active = dir.active_keystore()?.map(|k| k.fingerprint());
    let staged = match rollover_staged(dir)? {
        Some((keystore, state)) => Some(Staged {
            leaf: CertInfo::parse(keystore.leaf())?,
            root: CertInfo::parse(keystore.root())?,
            violations: verify::verify(&keystore, &[]),
            state,
        }),
        None => None,
    };
    let devices = read_json::<DeviceReport>(&devices_path(dir))?.filter(|d| {
        staged.as_ref().is_some_and(|s| {
            s.state
                .staged_fingerprint
                .eq_ignore_ascii_case(&d.staged_fingerprint)
        })
    });
    Ok(RolloverStatus {
        active,
        staged,
        devices,
    })
}

/// What a switch did.
#[derive(Debug)]
pub struct SwitchReport {
    /// The root that was replaced.
    pub previous: Option<Fingerprint>,
    /// The new active root.
    pub fingerprint: Fingerprint,
    /// Where the replaced keystore was kept (`pki/rollover/previous.pem`).
    pub previous_path: Option<PathBuf>,
    /// The last device counts: devices that lack the new root will be unreachable.
    pub devices: Option<DeviceReport>,
}

/// Switches to the staged keystore: keeps the active one as `pki/rollover/previous.pem`, then
/// atomically replaces `keystore.pem` (the gateway reloads it; devices holding the new root
/// reconnect by themselves) and clears the staging.
pub fn rollover_switch(dir: &DataDir) -> Result<SwitchReport, PkiError> {
    let (staged, _state) = rollover_staged(dir)?.ok_or(PkiError::NothingStaged)?;
    let violations = verify::verify(&staged, &[]);
    if !violations.is_empty() {
        return Err(PkiError::Invalid(violations));
    }
    let status = rollover_status(dir)?;
    let active = dir.active_keystore()?;
    let previous_path = match &active {
        Some(k) => {
            let p = dir.rollover_dir().join("previous.pem");
            k.save(&p)?;
            Some(p)
        }
        None => None,
    };
    dir.activate(&staged)?;
    let _ = std::fs::remove_file(staged_path(dir));
    let _ = std::fs::remove_file(state_path(dir));
    let _ = std::fs::remove_file(devices_path(dir));
    Ok(SwitchReport {
        previous: active.map(|k| k.fingerprint()),
        fingerprint: staged.fingerprint(),
        previous_path,
        devices: status.devices,
    })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, PkiError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| PkiError::State {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PkiError::io(path, e)),
    }
}
