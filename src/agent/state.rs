//! The agent's state directory: `agent.toml`, the device key pair and credential.
//!
//! ```text
//! STATE_DIR/            (0700)
//!   agent.toml          settings (0600): enabled, unit_id, connectors, trust, fingerprint
//!   device.key          the device's private key, PKCS#8 PEM (0600)
//!   device.pem          the device certificate issued by the gateway (0600)
//!   device-ca.pem       the gateway's device CA that issued it (0644, informational)
//!   root.pem            the pinned gateway root certificate (0644; a fallback trust anchor
//!                       when the gateway does not send its root)
//!   extra-roots.pem     further trusted roots (0644): taken with `root.offer` (root exchange)
//!   received/           default receive directory of file pushes (0700)
//! ```
//!
//! Every file is written atomically (temporary file with its final mode, fsync, rename, fsync of
//! the directory), so a crash leaves either the old or the new file.
//!
//! `agent.toml`:
//!
//! ```toml
//! enabled = true
//! unit_id = "kiosk-17"
//! connectors = ["wss://gw1.example.com:8443/usg/endpoint", "wss://gw2.example.com:8443/usg/endpoint"]
//! trust = "pinned"            # or "system" (a public-CA chain, checked against system roots)
//! fingerprint = "0123…"       # 64 hex digits: SHA-256 of the pinned root (trust = "pinned")
//! extra_roots = ["4567…"]     # further trusted roots (root exchange, move); default none
//!
//! # The relay (docs/protocol.md §6): what the gateway's management side may do here.
//! receive_dir = "/srv/inbox"  # file pushes land here only; default STATE_DIR/received
//! exec_hook = "/usr/local/lib/fleetgate/hook"  # `exec` runs it; absent = exec disabled
//! exec_timeout_secs = 60      # the hook is killed after this long (default 60)
//! shell = "/bin/sh"           # the terminal's shell (default /bin/sh)
//! vnc_port = 5900             # shadowing connects to 127.0.0.1:vnc_port (default 5900)
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{KeyPair, PublicKeyData as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use super::AgentError;
use crate::pki::Fingerprint;
use crate::pki::fs::{MODE_PRIVATE, MODE_PRIVATE_DIR, MODE_PUBLIC, write_atomic};

/// Name of the settings file in the state directory.
pub const CONFIG_FILE: &str = "agent.toml";
/// Name of the private key file (PKCS#8 PEM, 0600).
pub const KEY_FILE: &str = "device.key";
/// Name of the device certificate file (PEM, 0600).
pub const CERT_FILE: &str = "device.pem";
/// Name of the device CA certificate file (PEM, 0644).
pub const DEVICE_CA_FILE: &str = "device-ca.pem";
/// Name of the pinned root certificate file (PEM, 0644).
pub const ROOT_FILE: &str = "root.pem";
/// Name of the file with further trusted roots (PEM, 0644), from `root.offer`.
pub const EXTRA_ROOTS_FILE: &str = "extra-roots.pem";
/// Name of the default receive directory of file pushes, in the state directory.
pub const RECEIVE_DIR: &str = "received";
/// Default shell of terminal streams.
pub const DEFAULT_SHELL: &str = "/bin/sh";
/// Default local VNC port of shadow streams.
pub const DEFAULT_VNC_PORT: u16 = 5900;
/// Default time limit of the exec hook, seconds.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 60;

/// Default gateway port for `HOST` without a port.
pub const DEFAULT_PORT: u16 = 8443;
/// The device endpoint path.
pub const DEFAULT_PATH: &str = crate::discovery::DEFAULT_PATH;

/// One gateway the agent can connect to: `wss://host:port/path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Connector {
    /// DNS name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// HTTP path of the device endpoint (`/usg/endpoint`).
    pub path: String,
}

impl Connector {
    /// Parses `HOST`, `HOST:PORT`, `[V6]:PORT`, a bare IPv6 address (port 8443, path
    /// `/usg/endpoint`) or a full `wss://` / `https://` URL (port 443 when the URL has none, as
    /// in a DNS TXT record).
    pub fn parse(input: &str) -> Result<Connector, AgentError> {
        let s = input.trim();
        let bad = |reason: String| AgentError::BadConnector {
            input: input.to_owned(),
            reason,
        };
        if s.contains("://") {
            let g = crate::discovery::parse_record(s).map_err(bad)?;
            return Ok(Connector {
                host: g.host,
                port: g.port,
                path: g.path,
            });
        }
        if s.is_empty() {
            return Err(bad("empty gateway address".into()));
        }
        let (authority, explicit_port) = if s.starts_with('[') {
            (s.to_owned(), s.contains("]:"))
        } else if s.matches(':').count() > 1 {
            // A bare IPv6 address.
            (format!("[{s}]"), false)
        } else {
            (s.to_owned(), s.contains(':'))
        };
        let g = crate::discovery::parse_record(&format!("wss://{authority}")).map_err(bad)?;
        Ok(Connector {
            host: g.host,
            port: if explicit_port { g.port } else { DEFAULT_PORT },
            path: g.path,
        })
    }

    /// `wss://host:port/path` (IPv6 in brackets).
    pub fn url(&self) -> String {
        self.to_string()
    }

    /// `host:port` for connecting (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wss://{}{}", self.authority(), self.path)
    }
}

impl std::str::FromStr for Connector {
    type Err = AgentError;
    fn from_str(s: &str) -> Result<Connector, AgentError> {
        Connector::parse(s)
    }
}

/// How the agent authenticates the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The chain must end in the root with this SHA-256 fingerprint (the only trust anchor).
    Pinned(Fingerprint),
    /// The chain must validate against the system's public roots (`SSL_CERT_FILE`, else
    /// `/etc/ssl/certs/ca-certificates.crt` and the other usual bundle paths).
    System,
}

/// The settings in `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Gateway use on/off (`fleetgate agent --disable/--enable`). Default on.
    pub enabled: bool,
    /// The unit ID registered (or to register) with.
    pub unit_id: Option<String>,
    /// The gateways in order of preference.
    pub connectors: Vec<Connector>,
    /// How the gateway is authenticated; `None` before the first contact.
    pub trust: Option<Trust>,
    /// Further trusted gateway roots (SHA-256), besides `trust`: roots taken with
    /// `root.offer` (root exchange) or given with `move`. Default none.
    pub extra_roots: Vec<Fingerprint>,
    /// Where file pushes are written; `None` = `STATE_DIR/received`.
    pub receive_dir: Option<PathBuf>,
    /// The executable `exec` requests run (argv: the command name, then its arguments);
    /// `None` (the default) = `exec` is refused with `not_allowed`.
    pub exec_hook: Option<PathBuf>,
    /// Time limit of one `exec`, seconds (default 60).
    pub exec_timeout_secs: u64,
    /// The terminal's shell; `None` = `/bin/sh`.
    pub shell: Option<PathBuf>,
    /// Local VNC port shadow streams connect to on 127.0.0.1 (default 5900).
    pub vnc_port: u16,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            enabled: true,
            unit_id: None,
            connectors: Vec::new(),
            trust: None,
            extra_roots: Vec::new(),
            receive_dir: None,
            exec_hook: None,
            exec_timeout_secs: DEFAULT_EXEC_TIMEOUT_SECS,
            shell: None,
            vnc_port: DEFAULT_VNC_PORT,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RawConfig {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unit_id: Option<String>,
    #[serde(default)]
    connectors: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trust: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    extra_roots: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    receive_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exec_hook: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exec_timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shell: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vnc_port: Option<u16>,
}

fn yes() -> bool {
    true
}

impl AgentConfig {
    /// Parses the text of `agent.toml`.
    pub fn from_toml(text: &str) -> Result<AgentConfig, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let connectors = raw
            .connectors
            .iter()
            .map(|c| Connector::parse(c).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let trust = match (raw.trust.as_deref(), raw.fingerprint.as_deref()) {
            (None, None) => None,
            (Some("system"), _) => Some(Trust::System),
            (Some("pinned") | None, Some(fp)) => Some(Trust::Pinned(
                Fingerprint::from_hex(fp)
                    .ok_or_else(|| format!("fingerprint {fp:?} is not 64 hex digits"))?,
            )),
            (Some("pinned"), None) => return Err("trust = \"pinned\" needs a fingerprint".into()),
            (Some(other), _) => {
                return Err(format!(
                    "trust = {other:?}: expected \"pinned\" or \"system\""
                ));
            }
        };
        let extra_roots = raw
            .extra_roots
            .iter()
            .map(|fp| {
                Fingerprint::from_hex(fp)
                    .ok_or_else(|| format!("extra_roots: {fp:?} is not 64 hex digits"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if raw.vnc_port == Some(0) {
            return Err("vnc_port must be 1..65535".into());
        }
        if raw.exec_timeout_secs == Some(0) {
            return Err("exec_timeout_secs must be at least 1".into());
        }
        Ok(AgentConfig {
            enabled: raw.enabled,
            unit_id: raw.unit_id,
            connectors,
            trust,
            extra_roots,
            receive_dir: raw.receive_dir,
            exec_hook: raw.exec_hook,
            exec_timeout_secs: raw.exec_timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS),
            shell: raw.shell,
            vnc_port: raw.vnc_port.unwrap_or(DEFAULT_VNC_PORT),
        })
    }

    /// The text of `agent.toml`.
    pub fn to_toml(&self) -> String {
        let (trust, fingerprint) = match self.trust {
            None => (None, None),
            Some(Trust::System) => (Some("system".to_owned()), None),
            Some(Trust::Pinned(fp)) => (Some("pinned".to_owned()), Some(fp.hex())),
        };
        let raw = RawConfig {
            enabled: self.enabled,
            unit_id: self.unit_id.clone(),
            connectors: self.connectors.iter().map(Connector::url).collect(),
            trust,
            fingerprint,
            extra_roots: self.extra_roots.iter().map(|f| f.hex()).collect(),
            receive_dir: self.receive_dir.clone(),
            exec_hook: self.exec_hook.clone(),
            exec_timeout_secs: (self.exec_timeout_secs != DEFAULT_EXEC_TIMEOUT_SECS)
                .then_some(self.exec_timeout_secs),
            shell: self.shell.clone(),
            vnc_port: (self.vnc_port != DEFAULT_VNC_PORT).then_some(self.vnc_port),
        };
        format!(
            "# fleetgate agent settings (written by `fleetgate agent`)\n{}",
            toml::to_string(&raw).expect("plain data serializes")
        )
    }
}

/// The device credential: the certificate issued by the gateway and its private key.
pub struct Credential {
    /// The device certificate (DER).
    pub cert: CertificateDer<'static>,
    /// The certificate as stored (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 DER).
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The unit ID: the certificate's common name.
    pub unit_id: String,
    /// End of validity (Unix seconds).
    pub not_after: i64,
}

impl Clone for Credential {
    fn clone(&self) -> Credential {
        Credential {
            cert: self.cert.clone(),
            cert_pem: self.cert_pem.clone(),
            key: self.key.clone_key(),
            unit_id: self.unit_id.clone(),
            not_after: self.not_after,
        }
    }
}

impl Credential {
    /// The private key as rustls wants it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("unit_id", &self.unit_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The agent's state directory (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct AgentState {
    dir: PathBuf,
    /// The settings; change them and call [`AgentState::save`].
    pub config: AgentConfig,
}

impl AgentState {
    /// Opens `dir`, creating it (mode 0700) when missing; reads `agent.toml` when present,
    /// else starts from [`AgentConfig::default`] (nothing is written until [`save`](Self::save)).
    pub fn open(dir: impl Into<PathBuf>) -> Result<AgentState, AgentError> {
        let dir = dir.into();
        if !dir.exists() {
            crate::pki::fs::ensure_dir(&dir, MODE_PRIVATE_DIR)
                .map_err(|e| AgentError::state(&dir, e))?;
        }
        let path = dir.join(CONFIG_FILE);
        let config = match std::fs::read_to_string(&path) {
            Ok(text) => AgentConfig::from_toml(&text).map_err(|e| AgentError::state(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AgentConfig::default(),
            Err(e) => return Err(AgentError::state(&path, e)),
        };
        Ok(AgentState { dir, config })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a file in the state directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `agent.toml` (atomically, 0600).
    pub fn save(&self) -> Result<(), AgentError> {
        let path = self.path(CONFIG_FILE);
        write_atomic(&path, self.config.to_toml().as_bytes(), MODE_PRIVATE)
            .map_err(|e| AgentError::state(&path, e))
    }

    /// Re-reads `agent.toml` (another process may have changed it, e.g. `--disable`).
    pub fn reload(&mut self) -> Result<(), AgentError> {
        let fresh = AgentState::open(&self.dir)?;
        self.config = fresh.config;
        Ok(())
    }

    /// Turns gateway use on or off and saves; the credential is kept.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<(), AgentError> {
        self.config.enabled = enabled;
        self.save()
    }

    /// The device key pair: read from `device.key`, or generated (ECDSA P-256) and written
    /// (0600) before it is returned, so every retry of a registration — even after a restart
    /// of the agent — uses the same key pair.
    pub fn load_or_create_key(&self) -> Result<KeyPair, AgentError> {
        let path = self.path(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| AgentError::state(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| AgentError::Crypto(format!("key generation: {e}")))?;
                write_atomic(&path, key.serialize_pem().as_bytes(), MODE_PRIVATE)
                    .map_err(|e| AgentError::state(&path, e))?;
                Ok(key)
            }
            Err(e) => Err(AgentError::state(&path, e)),
        }
    }

    /// True when `device.pem` exists.
    pub fn has_credential(&self) -> bool {
        self.path(CERT_FILE).exists()
    }

    /// The stored credential, `None` when there is no `device.pem`. Errors when the files are
    /// unreadable or the certificate does not belong to `device.key`.
    pub fn credential(&self) -> Result<Option<Credential>, AgentError> {
        let cert_path = self.path(CERT_FILE);
        let cert_pem = match std::fs::read_to_string(&cert_path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AgentError::state(&cert_path, e)),
        };
        let key_path = self.path(KEY_FILE);
        let key_pem =
            std::fs::read_to_string(&key_path).map_err(|e| AgentError::state(&key_path, e))?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| AgentError::state(&key_path, format!("not a PKCS#8 key: {e}")))?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| AgentError::state(&key_path, e))?;
        let (cert, unit_id, not_after) = parse_device_cert(&cert_pem, &key_pair)
            .map_err(|e| AgentError::state(&cert_path, e))?;
        Ok(Some(Credential {
            cert,
            cert_pem,
            key,
            unit_id,
            not_after,
        }))
    }

    /// Stores a certificate issued for `device.key` (0600), and the device CA (0644).
    pub fn store_certificate(&self, cert_pem: &str, device_ca_pem: &str) -> Result<(), AgentError> {
        let path = self.path(CERT_FILE);
        write_atomic(&path, cert_pem.as_bytes(), MODE_PRIVATE)
            .map_err(|e| AgentError::state(&path, e))?;
        if !device_ca_pem.trim().is_empty() {
            let path = self.path(DEVICE_CA_FILE);
            write_atomic(&path, device_ca_pem.as_bytes(), MODE_PUBLIC)
                .map_err(|e| AgentError::state(&path, e))?;
        }
        Ok(())
    }

    /// Stores the pinned root certificate (0644).
    pub fn store_root(&self, root: &CertificateDer<'_>) -> Result<(), AgentError> {
        let path = self.path(ROOT_FILE);
        write_atomic(
            &path,
            crate::pki::pem::cert_pem(root).as_bytes(),
            MODE_PUBLIC,
        )
        .map_err(|e| AgentError::state(&path, e))
    }

    /// The stored root certificate, if any and if it matches the pinned fingerprint.
    pub fn pinned_root(&self) -> Option<CertificateDer<'static>> {
        let Some(Trust::Pinned(fp)) = self.config.trust else {
            return None;
        };
        let pem = std::fs::read(self.path(ROOT_FILE)).ok()?;
        let cert = CertificateDer::from_pem_slice(&pem).ok()?;
        (Fingerprint::of(&cert) == fp).then_some(cert)
    }

    /// Every stored root certificate whose fingerprint is trusted: `root.pem` (when it has
    /// the pinned fingerprint) and the roots of `extra-roots.pem` listed in `extra_roots`.
    pub fn trusted_roots(&self) -> Vec<CertificateDer<'static>> {
        let mut roots: Vec<CertificateDer<'static>> = self.pinned_root().into_iter().collect();
        if let Ok(pem) = std::fs::read(self.path(EXTRA_ROOTS_FILE)) {
            roots.extend(
                CertificateDer::pem_slice_iter(&pem)
                    .flatten()
                    .filter(|c| self.config.extra_roots.contains(&Fingerprint::of(c))),
            );
        }
        roots
    }

    /// The TLS configuration for the stored trust (pinned root, further roots, or the system
    /// roots), presenting `credential` when given.
    pub fn tls_config(
        &self,
        credential: Option<&Credential>,
    ) -> Result<std::sync::Arc<rustls::ClientConfig>, AgentError> {
        let trust = self.config.trust.ok_or(AgentError::NoTrust)?;
        super::tls::client_config_with(
            &trust,
            &self.config.extra_roots,
            self.trusted_roots(),
            credential,
        )
    }

    /// Adds `root` as a further trusted root (root exchange, `docs/protocol.md` §6.4
    /// `root.offer`): appends it to `extra-roots.pem` and its fingerprint to `extra_roots`,
    /// and saves `agent.toml`. Returns its fingerprint and whether it was new (a root already
    /// trusted is not added twice).
    pub fn add_root(
        &mut self,
        root: &CertificateDer<'_>,
    ) -> Result<(Fingerprint, bool), AgentError> {
        let fp = Fingerprint::of(root);
        let already = self.config.trust == Some(Trust::Pinned(fp))
            || (self.config.extra_roots.contains(&fp)
                && self
                    .trusted_roots()
                    .iter()
                    .any(|c| Fingerprint::of(c) == fp));
        if already {
            return Ok((fp, false));
        }
        let path = self.path(EXTRA_ROOTS_FILE);
        let mut pem = match std::fs::read_to_string(&path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(AgentError::state(&path, e)),
        };
        pem.push_str(&crate::pki::pem::cert_pem(root));
        write_atomic(&path, pem.as_bytes(), MODE_PUBLIC)
            .map_err(|e| AgentError::state(&path, e))?;
        if !self.config.extra_roots.contains(&fp) {
            self.config.extra_roots.push(fp);
        }
        self.save()?;
        Ok((fp, true))
    }

    /// The receive directory of file pushes: `receive_dir`, else `STATE_DIR/received`.
    pub fn receive_dir(&self) -> PathBuf {
        self.config
            .receive_dir
            .clone()
            .unwrap_or_else(|| self.path(RECEIVE_DIR))
    }

    /// Deletes the device certificate (the key pair is kept for a new registration).
    pub fn drop_credential(&self) -> Result<(), AgentError> {
        for name in [CERT_FILE, DEVICE_CA_FILE] {
            remove_if_exists(&self.path(name))?;
        }
        Ok(())
    }

    /// Deletes the certificate only if it is still `cert_pem` (a newer registration may have
    /// replaced it meanwhile). Returns whether it was deleted.
    pub fn drop_credential_if(&self, cert_pem: &str) -> Result<bool, AgentError> {
        match std::fs::read_to_string(self.path(CERT_FILE)) {
            Ok(current) if current == cert_pem => {
                self.drop_credential()?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// What the gateway asks for with `drop_settings` (the device was removed): forget the
    /// connectors, the trust and the credential (certificate and key). The unit ID and the
    /// enabled flag stay.
    pub fn drop_settings(&mut self) -> Result<(), AgentError> {
        self.config.connectors.clear();
        self.config.trust = None;
        self.config.extra_roots.clear();
        self.save()?;
        for name in [
            CERT_FILE,
            DEVICE_CA_FILE,
            KEY_FILE,
            ROOT_FILE,
            EXTRA_ROOTS_FILE,
        ] {
            remove_if_exists(&self.path(name))?;
        }
        Ok(())
    }
}

fn remove_if_exists(path: &Path) -> Result<(), AgentError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::state(path, e)),
    }
}

/// Parses a device certificate PEM and checks it certifies `key`: returns (DER, CN, notAfter).
pub(crate) fn parse_device_cert(
    cert_pem: &str,
    key: &KeyPair,
) -> Result<(CertificateDer<'static>, String, i64), String> {
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err("the certificate is not for the device's key pair".into());
    }
    let unit_id = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    let not_after = parsed.validity().not_after.timestamp();
    Ok((cert, unit_id, not_after))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn connectors_parse_and_print() {
        let c = |s: &str| Connector::parse(s).unwrap().url();
        assert_eq!(
            c("gw.example.com"),
            "wss://gw.example.com:8443/usg/endpoint"
        );
        assert_eq!(
            c("GW.example.com:9443"),
            "wss://gw.example.com:9443/usg/endpoint"
        );
        assert_eq!(c("127.0.0.1"), "wss://127.0.0.1:8443/usg/endpoint");
        assert_eq!(c("::1"), "wss://[::1]:8443/usg/endpoint");
        assert_eq!(c("[::1]:18443"), "wss://[::1]:18443/usg/endpoint");
        assert_eq!(c("[::1]"), "wss://[::1]:8443/usg/endpoint");
        assert_eq!(c("wss://gw:1234/x"), "wss://gw:1234/x");
        assert_eq!(c("https://gw/"), "wss://gw:443/usg/endpoint");
        for bad in ["", "gw:0", "gw:x", "http://gw", "a b", "gw:99999"] {
            assert!(Connector::parse(bad).is_err(), "{bad}");
        }
        let parsed = Connector::parse("[::1]:18443").unwrap();
        assert_eq!(parsed.host, "::1");
        assert_eq!(parsed.authority(), "[::1]:18443");
        assert_eq!(Connector::parse(&parsed.url()).unwrap(), parsed);
    }

    #[test]
    fn config_round_trip() {
        let fp = Fingerprint(std::array::from_fn(|i| i as u8));
        let config = AgentConfig {
            enabled: false,
            unit_id: Some("kiosk-17".into()),
            connectors: vec![
                Connector::parse("gw1").unwrap(),
                Connector::parse("gw2:9443").unwrap(),
            ],
            trust: Some(Trust::Pinned(fp)),
            extra_roots: vec![Fingerprint([9; 32])],
            receive_dir: Some("/srv/inbox".into()),
            exec_hook: Some("/usr/lib/hook".into()),
            exec_timeout_secs: 5,
            shell: Some("/bin/bash".into()),
            vnc_port: 5901,
        };
        let text = config.to_toml();
        assert!(text.contains("trust = \"pinned\""), "{text}");
        assert!(text.contains(&fp.hex()), "{text}");
        assert_eq!(AgentConfig::from_toml(&text).unwrap(), config);
        let system = AgentConfig {
            trust: Some(Trust::System),
            ..AgentConfig::default()
        };
        assert_eq!(AgentConfig::from_toml(&system.to_toml()).unwrap(), system);
        assert_eq!(AgentConfig::from_toml("").unwrap(), AgentConfig::default());
        assert!(AgentConfig::from_toml("trust = \"pinned\"").is_err());
        assert!(AgentConfig::from_toml("trust = \"maybe\"").is_err());
        assert!(AgentConfig::from_toml("fingerprint = \"12\"").is_err());
        assert!(AgentConfig::from_toml("connectors = [\"http://x\"]").is_err());
        assert!(AgentConfig::from_toml("vnc_port = 0").is_err());
        assert!(AgentConfig::from_toml("extra_roots = [\"12\"]").is_err());
        // Defaults are not written out.
        let plain = AgentConfig::default().to_toml();
        assert!(
            !plain.contains("vnc_port") && !plain.contains("exec"),
            "{plain}"
        );
    }

    #[test]
    fn state_files_modes_and_atomic_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("agent");
        let mut state = AgentState::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert!(
            !state.path(CONFIG_FILE).exists(),
            "nothing written before save"
        );
        state.config.unit_id = Some("U1".into());
        state.config.connectors = vec![Connector::parse("gw").unwrap()];
        state.save().unwrap();
        assert_eq!(mode(&state.path(CONFIG_FILE)), 0o600);
        assert_eq!(AgentState::open(&dir).unwrap().config, state.config);

        let key = state.load_or_create_key().unwrap();
        assert_eq!(mode(&state.path(KEY_FILE)), 0o600);
        let pem = std::fs::read_to_string(state.path(KEY_FILE)).unwrap();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "PKCS#8: {pem}"
        );
        // The same key pair every time.
        let again = state.load_or_create_key().unwrap();
        assert_eq!(key.public_key_pem(), again.public_key_pem());

        // A certificate for the key (self-signed stands in for the gateway's).
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "U1");
        let cert = params.self_signed(&key).unwrap();
        assert!(!state.has_credential());
        assert!(state.credential().unwrap().is_none());
        state.store_certificate(&cert.pem(), &cert.pem()).unwrap();
        assert_eq!(mode(&state.path(CERT_FILE)), 0o600);
        assert_eq!(mode(&state.path(DEVICE_CA_FILE)), 0o644);
        let cred = state.credential().unwrap().unwrap();
        assert_eq!(cred.unit_id, "U1");
        assert_eq!(cred.cert.as_ref(), cert.der().as_ref());

        // A certificate for another key is refused.
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let foreign = params.self_signed(&other).unwrap();
        state.store_certificate(&foreign.pem(), "").unwrap();
        let e = state.credential().unwrap_err().to_string();
        assert!(e.contains("not for the device's key pair"), "{e}");
        state.store_certificate(&cert.pem(), "").unwrap();

        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // Only the certificate that was used is dropped.
        assert!(!state.drop_credential_if("something else").unwrap());
        assert!(state.has_credential());
        assert!(state.drop_credential_if(&cert.pem()).unwrap());
        assert!(!state.has_credential());
        assert!(state.path(KEY_FILE).exists(), "the key pair is kept");

        // drop_settings forgets the gateway but keeps unit ID and the enabled flag.
        state.store_certificate(&cert.pem(), "").unwrap();
        state.config.trust = Some(Trust::System);
        state.drop_settings().unwrap();
        let reread = AgentState::open(&dir).unwrap();
        assert!(reread.config.connectors.is_empty());
        assert_eq!(reread.config.trust, None);
        assert_eq!(reread.config.unit_id.as_deref(), Some("U1"));
        assert!(!reread.has_credential());
        assert!(!reread.path(KEY_FILE).exists());

        // --disable keeps the credential.
        let mut state = reread;
        state.store_certificate(&cert.pem(), "").unwrap();
        state.set_enabled(false).unwrap();
        let reread = AgentState::open(&dir).unwrap();
        assert!(!reread.config.enabled);
        assert!(reread.has_credential());
    }

    #[test]
    fn the_pinned_root_file_must_match_the_fingerprint() {
        let tmp = tempfile::tempdir().unwrap();
        let mut state = AgentState::open(tmp.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let root = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = root.der().clone();
        state.store_root(&der).unwrap();
        assert!(state.pinned_root().is_none(), "nothing pinned yet");
        state.config.trust = Some(Trust::Pinned(Fingerprint::of(&der)));
        assert_eq!(state.pinned_root().as_ref(), Some(&der));
        state.config.trust = Some(Trust::Pinned(Fingerprint([1; 32])));
        assert!(state.pinned_root().is_none());
    }
}
