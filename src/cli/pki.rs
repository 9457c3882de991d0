//! `fleetgate pki …`: the gateway's certificates from the command line. Every command is a
//! thin wrapper over [`crate::pki`]; this file parses arguments and prints.
//!
//! Exit codes: 0 success; 2 the input was rejected (a chain that breaks a rule, an unreadable
//! or encrypted file, an incompatible renewal); 1 anything else (I/O, unknown name, bad
//! argument). Private keys are written with mode 0600 and never printed.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

use crate::pki::ops::{self, ImportRequest, Input};
use crate::pki::{
    self, CertInfo, DataDir, Fingerprint, Host, KeyType, Keystore, PkiError, Subject, create,
};

/// Exit code when the input was rejected (verification failed).
pub const EXIT_REJECTED: u8 = 2;
/// Exit code for other failures.
pub const EXIT_FAILED: u8 = 1;

/// `fleetgate pki <command>`.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a self-signed root CA and keep it (with its key) in the data dir.
    ///
    /// The root is what devices pin (by its SHA-256 fingerprint) when they register: give it a
    /// long life. Default 10 years; a shorter validity is allowed but warned about, because an
    /// expired root forces every device to re-register. Stored as DATA_DIR/pki/ca/NAME.pem
    /// (certificate) and NAME.key (private key, mode 0600), where NAME is the lower-case
    /// form of --name ("My Root" -> my-root).
    ///
    /// Example: fleetgate pki create-root --name "Example Gateway Root" --org "Example Ltd"
    /// --locality Berlin --country DE
    CreateRoot(CreateRootArgs),

    /// Create an intermediate CA signed by a CA in the data dir.
    ///
    /// Useful to keep the root's key offline: issue server certificates from the intermediate.
    /// --path-len N limits how many further intermediates may sit below it (0: it may only
    /// sign server certificates). Default validity 5 years (never beyond the issuing CA's).
    ///
    /// Example: fleetgate pki create-intermediate --ca example-gateway-root --name "Example
    /// Issuing CA" --org "Example Ltd" --locality Berlin --country DE --path-len 0
    CreateIntermediate(CreateIntermediateArgs),

    /// Issue a server (end-entity) certificate from a CA in the data dir.
    ///
    /// --hosts lists every DNS name and IP address the gateway is reached by, separated by
    /// `;` (wildcards like *.example.org allowed); they become the Subject Alternative Name.
    /// --name is the name it is stored under (DATA_DIR/pki/certs/NAME.pem, chain + key, 0600)
    /// and --holder its common name (CN); neither may equal the root's name. Default validity
    /// 1 year. Then `fleetgate pki export` and `install` (or `renew`) it.
    ///
    /// Example: fleetgate pki issue --ca example-gateway-root --name gw1-2025 --holder
    /// gw.example.com --org "Example Ltd" --locality Berlin --country DE --hosts
    /// "gw.example.com;203.0.113.7;*.example.org;2001:db8::7"
    Issue(IssueArgs),

    /// Import an existing chain, or a root CA with its key to issue from.
    ///
    /// All files are PEM. Private keys must be decrypted (PKCS#8 "PRIVATE KEY", PKCS#1 "RSA
    /// PRIVATE KEY" or SEC1 "EC PRIVATE KEY"); an encrypted key is refused with the openssl
    /// command that decrypts it. The chain is verified before anything is stored.
    ///
    /// * existing chain: --root root.pem [--intermediate inter.pem]... --cert server.pem
    ///   --key server.key  -> DATA_DIR/pki/certs/NAME.pem (add --install to make it active)
    ///
    /// * CA to issue from: --root root.pem [--intermediate inter.pem]... --ca-key ca.key
    ///   (the key of the lowest CA given) -> DATA_DIR/pki/ca/NAME.{pem,key}
    Import(ImportArgs),

    /// Check a chain against every rule; exit 0 when valid, 2 when not.
    ///
    /// Rules: root and intermediates have BasicConstraints cA=true; pathLenConstraints allow
    /// the chain below; the server certificate is not a CA and has a Subject Alternative Name
    /// covering every --host (wildcards as RFC 6125); each certificate is signed by the next
    /// and the last is a self-signed root; all are valid now; the key belongs to the server
    /// certificate; the server certificate's name differs from the root's. A chain passing
    /// these is also checked with rustls-webpki. One line per broken rule, naming the
    /// certificate and the rule.
    ///
    /// Without --keystore or --chain, the active keystore (DATA_DIR/keystore.pem) is checked.
    Verify(VerifyArgs),

    /// Show certificates: subject, issuer, validity, SANs, basic constraints, key type, and
    /// the root fingerprint (SHA-256) in four parts of 16 hex digits (Part 1 .. Part 4).
    ///
    /// Default: the active keystore. The fingerprint parts are what devices are asked for
    /// when they register.
    Show(ShowArgs),

    /// List the CAs and server certificates kept in the data dir.
    List,

    /// Write a stored server certificate (chain + key) as one keystore file (mode 0600).
    ///
    /// Keystore format: one PEM file with the server CERTIFICATE, the intermediate
    /// CERTIFICATEs, the root CERTIFICATE, then the server's PRIVATE KEY (PKCS#8).
    Export(ExportArgs),

    /// Make a keystore file the gateway's keystore (DATA_DIR/keystore.pem).
    ///
    /// `fleetgate pki install --keystore FILE --data-dir DIR` installs into another data dir
    /// (the global --data-dir option). The file is verified, then atomically replaces the active keystore; a running gateway
    /// picks it up within about a second, without restart and without dropping connected
    /// devices. Replacing the *root* is refused unless --force, because devices registered
    /// with the old root would no longer trust the gateway (use `rollover` for that).
    Install(InstallArgs),

    /// Install a renewed server certificate, if it is compatible with the active one.
    ///
    /// Compatible: same root, same set of host names/IPs, CA-signed. Otherwise it is refused
    /// with the condition that failed (exit 2); --force installs it anyway (a chain that
    /// breaks a rule, e.g. expired or a wrong key, is always refused). Connected devices stay
    /// connected; new connections get the new certificate.
    Renew(RenewArgs),

    /// Exchange the root without re-registering devices: stage, watch, switch.
    #[command(subcommand)]
    Rollover(RolloverCommand),
}

/// `fleetgate pki rollover <command>`.
#[derive(Debug, Subcommand)]
pub enum RolloverCommand {
    /// Stage a keystore under a new root beside the active one.
    ///
    /// The gateway hands the new root to connected devices whose agent supports it and reports
    /// how many lack it; watch that with `rollover status`, then `rollover switch`.
    Stage {
        /// The keystore under the new root (keystore format, see `pki export --help`).
        #[arg(long, value_name = "FILE")]
        keystore: PathBuf,
    },
    /// Show the active and staged roots and how many devices lack the new root.
    Status,
    /// Make the staged keystore the active one.
    ///
    /// Devices holding the new root reconnect by themselves; the rest become unreachable and
    /// are reported. The replaced keystore is kept as DATA_DIR/pki/rollover/previous.pem.
    Switch,
}

/// Key algorithm of a new key.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KeyTypeArg {
    /// RSA 2048 bits
    Rsa2048,
    /// RSA 3072 bits
    Rsa3072,
    /// RSA 4096 bits
    Rsa4096,
    /// ECDSA on P-256 (default)
    EcdsaP256,
    /// ECDSA on P-384
    EcdsaP384,
}

impl From<KeyTypeArg> for KeyType {
    fn from(k: KeyTypeArg) -> KeyType {
        match k {
            KeyTypeArg::Rsa2048 => KeyType::Rsa2048,
            KeyTypeArg::Rsa3072 => KeyType::Rsa3072,
            KeyTypeArg::Rsa4096 => KeyType::Rsa4096,
            KeyTypeArg::EcdsaP256 => KeyType::EcdsaP256,
            KeyTypeArg::EcdsaP384 => KeyType::EcdsaP384,
        }
    }
}

/// Subject fields shared by the create commands.
#[derive(Debug, Args)]
pub struct SubjectArgs {
    /// Organisation (O).
    #[arg(long, value_name = "O")]
    pub org: String,
    /// Locality / city (L).
    #[arg(long, value_name = "L")]
    pub locality: String,
    /// Two-letter ISO 3166 country code (C), e.g. DE, US, GB.
    #[arg(long, value_name = "CC", value_parser = parse_country)]
    pub country: String,
}

/// Arguments of `create-root`.
#[derive(Debug, Args)]
pub struct CreateRootArgs {
    /// The root's name (its CN, shown to operators).
    #[arg(long, value_name = "N")]
    pub name: String,
    #[command(flatten)]
    pub subject: SubjectArgs,
    /// Validity in days (default 3650 = 10 years).
    #[arg(long, value_name = "D", default_value_t = create::ROOT_DAYS)]
    pub days: u32,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "ecdsa-p256")]
    pub key_type: KeyTypeArg,
}

/// Arguments of `create-intermediate`.
#[derive(Debug, Args)]
pub struct CreateIntermediateArgs {
    /// The issuing CA (a name from `fleetgate pki list`).
    #[arg(long, value_name = "NAME")]
    pub ca: String,
    /// The intermediate's name (its CN).
    #[arg(long, value_name = "N")]
    pub name: String,
    #[command(flatten)]
    pub subject: SubjectArgs,
    /// Validity in days (default 1825 = 5 years).
    #[arg(long, value_name = "D", default_value_t = create::INTERMEDIATE_DAYS)]
    pub days: u32,
    /// How many intermediates may follow below this one (default: no limit).
    #[arg(long, value_name = "N")]
    pub path_len: Option<u8>,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "ecdsa-p256")]
    pub key_type: KeyTypeArg,
}

/// Arguments of `issue`.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The issuing CA (a name from `fleetgate pki list`).
    #[arg(long, value_name = "NAME")]
    pub ca: String,
    /// The name the certificate is stored under (must differ from the root's).
    #[arg(long, value_name = "N")]
    pub name: String,
    /// The holder: the certificate's common name (CN), usually the main host name.
    #[arg(long, value_name = "CN")]
    pub holder: String,
    #[command(flatten)]
    pub subject: SubjectArgs,
    /// DNS names and IP addresses, separated by `;`.
    #[arg(long, value_name = "H1;H2;...")]
    pub hosts: String,
    /// Validity in days (default 365).
    #[arg(long, value_name = "D", default_value_t = create::LEAF_DAYS)]
    pub days: u32,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "ecdsa-p256")]
    pub key_type: KeyTypeArg,
}

/// Arguments of `import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The root CA certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub root: PathBuf,
    /// An intermediate CA certificate (PEM); repeat for several, any order.
    #[arg(long, value_name = "FILE")]
    pub intermediate: Vec<PathBuf>,
    /// The server certificate (PEM; a fullchain file is fine).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The server certificate's decrypted private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The decrypted private key of the lowest CA given, to issue from it.
    #[arg(long, value_name = "FILE")]
    pub ca_key: Option<PathBuf>,
    /// Store name of the server certificate (default: derived from its CN).
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// A host the server certificate must cover (repeatable, or `;`-separated).
    #[arg(long, value_name = "H")]
    pub host: Vec<String>,
    /// Also make the imported chain the gateway's keystore (like `install`).
    #[arg(long, requires = "cert")]
    pub install: bool,
    /// With --install: replace the active root too.
    #[arg(long, requires = "install")]
    pub force: bool,
}

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A keystore file (chain + key).
    #[arg(long, value_name = "FILE", conflicts_with = "chain")]
    pub keystore: Option<PathBuf>,
    /// PEM files holding the chain, server certificate first and root last (a chain given root
    /// first is reversed); a private key among them is checked against the server certificate.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub chain: Vec<PathBuf>,
    /// A host name or IP the gateway is reached by (repeatable, or `;`-separated).
    #[arg(long, value_name = "H")]
    pub host: Vec<String>,
}

/// Arguments of `show`.
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct ShowArgs {
    /// A keystore or any PEM file with certificates.
    #[arg(long, value_name = "FILE")]
    pub keystore: Option<PathBuf>,
    /// A stored server certificate.
    #[arg(long, value_name = "NAME")]
    pub cert: Option<String>,
    /// A stored CA.
    #[arg(long, value_name = "NAME")]
    pub ca: Option<String>,
    /// The keystore staged for a root rollover.
    #[arg(long)]
    pub staged: bool,
}

/// Arguments of `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The stored server certificate (a name from `fleetgate pki list`).
    #[arg(long, value_name = "NAME")]
    pub cert: String,
    /// Where to write the keystore (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Arguments of `install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The keystore file (see `fleetgate pki export --help` for the format).
    #[arg(long, value_name = "FILE")]
    pub keystore: PathBuf,
    /// A host the server certificate must cover (repeatable, or `;`-separated).
    #[arg(long, value_name = "H")]
    pub host: Vec<String>,
    /// Replace the active root (devices registered with it will no longer trust the gateway).
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `renew`.
#[derive(Debug, Args)]
pub struct RenewArgs {
    /// The keystore with the renewed server certificate.
    #[arg(long, value_name = "FILE")]
    pub keystore: PathBuf,
    /// Install even when not compatible (different root or host set, self-signed).
    #[arg(long)]
    pub force: bool,
}

fn parse_country(s: &str) -> Result<String, String> {
    pki::country::check(s)
        .map(str::to_owned)
        .map_err(|e| e.to_string())
}

/// Runs a `pki` command against `data_dir`, printing to stdout/stderr.
pub fn run(cmd: PkiCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    Ok(ExitCode::from(run_with(cmd, data_dir, &mut out, &mut err)))
}

/// Runs a `pki` command, writing to `out` and `err`; returns the exit code (0, 1 or 2).
pub fn run_with(cmd: PkiCommand, data_dir: &Path, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match execute(cmd, data_dir, out, err) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            if e.is_rejection() {
                EXIT_REJECTED
            } else {
                EXIT_FAILED
            }
        }
    }
}

fn execute(
    cmd: PkiCommand,
    data_dir: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u8, PkiError> {
    let dir = DataDir::new(data_dir);
    match cmd {
        PkiCommand::CreateRoot(a) => {
            let subject = subject(a.name, a.subject);
            let created = ops::create_root(&dir, &subject, a.days, a.key_type.into())?;
            warn_all(err, &created.warnings);
            print_created(out, "root CA", &created);
            Ok(0)
        }
        PkiCommand::CreateIntermediate(a) => {
            let subject = subject(a.name, a.subject);
            let created = ops::create_intermediate(
                &dir,
                &a.ca,
                &subject,
                a.days,
                a.key_type.into(),
                a.path_len,
            )?;
            warn_all(err, &created.warnings);
            print_created(out, "intermediate CA", &created);
            Ok(0)
        }
        PkiCommand::Issue(a) => {
            let hosts = Host::parse_list(&a.hosts)?;
            let subject = subject(a.holder, a.subject);
            let created = ops::issue(
                &dir,
                &a.ca,
                &a.name,
                &subject,
                &hosts,
                a.days,
                a.key_type.into(),
            )?;
            warn_all(err, &created.warnings);
            print_created(out, "server certificate", &created);
            let _ = writeln!(
                out,
                "next: fleetgate pki export --cert {} --out keystore.pem, then \
                 `fleetgate pki install --keystore keystore.pem` (or `renew`)",
                created.stored.name
            );
            Ok(0)
        }
        PkiCommand::Import(a) => {
            let req = ImportRequest {
                root: Some(Input::read(&a.root)?),
                intermediates: a
                    .intermediate
                    .iter()
                    .map(|p| Input::read(p))
                    .collect::<Result<_, _>>()?,
                cert: a.cert.as_deref().map(Input::read).transpose()?,
                key: a.key.as_deref().map(Input::read).transpose()?,
                ca_key: a.ca_key.as_deref().map(Input::read).transpose()?,
                name: a.name,
                hosts: split_hosts(&a.host),
            };
            let report = ops::import(&dir, req)?;
            if let Some(ca) = &report.ca {
                let _ = writeln!(
                    out,
                    "imported CA {:?} as {}\n  certificate: {}",
                    ca.info.display_name(),
                    ca.name,
                    ca.path.display()
                );
                match &ca.key_path {
                    Some(k) => {
                        let _ = writeln!(
                            out,
                            "  private key: {} (mode 0600)\n  issue from it with: fleetgate pki issue --ca {} …",
                            k.display(),
                            ca.name
                        );
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "  no private key: this CA cannot issue (add --ca-key to import one)"
                        );
                    }
                }
                let _ = writeln!(out, "  root fingerprint: {}", ca.root_fingerprint);
            }
            if let Some(cert) = &report.cert {
                let _ = writeln!(
                    out,
                    "imported server certificate {:?} as {}\n  keystore: {} (mode 0600)\n  root fingerprint: {}",
                    cert.info.display_name(),
                    cert.name,
                    cert.path.display(),
                    cert.root_fingerprint
                );
                if a.install {
                    let keystore = dir.cert(&cert.name)?;
                    let report = ops::install(&dir, &keystore, &split_hosts(&a.host), a.force)?;
                    print_installed(out, &report);
                } else {
                    let _ = writeln!(
                        out,
                        "next: fleetgate pki export --cert {} --out keystore.pem && fleetgate pki install --keystore keystore.pem",
                        cert.name
                    );
                }
            }
            Ok(0)
        }
        PkiCommand::Verify(a) => {
            let hosts = split_hosts(&a.host);
            let (chain, key, source) = if !a.chain.is_empty() {
                let inputs = a
                    .chain
                    .iter()
                    .map(|p| Input::read(p))
                    .collect::<Result<Vec<_>, _>>()?;
                let (chain, key) = ops::load_chain(&inputs)?;
                let names: Vec<String> = a.chain.iter().map(|p| p.display().to_string()).collect();
                (chain, key, names.join(", "))
            } else {
                let path = a.keystore.unwrap_or_else(|| dir.keystore_path());
                let ks = Keystore::load(&path)?;
                (ks.chain, Some(ks.key), path.display().to_string())
            };
            let violations = pki::verify_chain(&chain, key.as_ref(), &hosts);
            if key.is_none() {
                let _ = writeln!(
                    err,
                    "note: no private key given; the key-match rule was not checked"
                );
            }
            if violations.is_empty() {
                let leaf = CertInfo::parse(&chain[0])?;
                let _ = writeln!(
                    out,
                    "OK: {source}: chain of {} certificates is valid (server {:?}{})",
                    chain.len(),
                    leaf.display_name(),
                    if hosts.is_empty() {
                        String::new()
                    } else {
                        format!(", hosts {}", hosts.join(", "))
                    }
                );
                Ok(0)
            } else {
                for v in &violations {
                    let _ = writeln!(out, "FAIL {v}");
                }
                let _ = writeln!(
                    out,
                    "{source}: {} rule violation(s); the chain is NOT valid",
                    violations.len()
                );
                Ok(EXIT_REJECTED)
            }
        }
        PkiCommand::Show(a) => {
            show(&dir, a, out)?;
            Ok(0)
        }
        PkiCommand::List => {
            let _ = writeln!(out, "CAs (DATA_DIR/pki/ca):");
            let cas = dir.list_cas()?;
            if cas.is_empty() {
                let _ = writeln!(out, "  (none)");
            }
            for name in cas {
                match dir.ca(&name) {
                    Ok(ca) => {
                        let info = CertInfo::parse(&ca.chain[0])?;
                        let _ = writeln!(
                            out,
                            "  {name}: {:?}, valid until {}, {}",
                            info.display_name(),
                            pki::cert::format_time(info.not_after),
                            if ca.key.is_some() {
                                "can issue"
                            } else {
                                "no key"
                            }
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(out, "  {name}: unreadable: {e}");
                    }
                }
            }
            let _ = writeln!(out, "Server certificates (DATA_DIR/pki/certs):");
            let certs = dir.list_certs()?;
            if certs.is_empty() {
                let _ = writeln!(out, "  (none)");
            }
            for name in certs {
                match dir.cert(&name) {
                    Ok(ks) => {
                        let info = CertInfo::parse(ks.leaf())?;
                        let _ = writeln!(
                            out,
                            "  {name}: {:?}, valid until {}, hosts {}",
                            info.display_name(),
                            pki::cert::format_time(info.not_after),
                            info.host_set().join(", ")
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(out, "  {name}: unreadable: {e}");
                    }
                }
            }
            Ok(0)
        }
        PkiCommand::Export(a) => {
            let ks = ops::export(&dir, &a.cert, &a.out)?;
            let _ = writeln!(
                out,
                "wrote keystore {} (mode 0600): {} certificate(s) + private key\n  root fingerprint: {}",
                a.out.display(),
                ks.chain.len(),
                ks.fingerprint()
            );
            Ok(0)
        }
        PkiCommand::Install(a) => {
            let ks = Keystore::load(&a.keystore)?;
            let report = ops::install(&dir, &ks, &split_hosts(&a.host), a.force)?;
            print_installed(out, &report);
            Ok(0)
        }
        PkiCommand::Renew(a) => {
            let ks = Keystore::load(&a.keystore)?;
            let report = ops::renew(&dir, &ks, a.force)?;
            for reason in &report.forced_over {
                let _ = writeln!(err, "warning: forced despite: {reason}");
            }
            let _ = writeln!(
                out,
                "renewed: {:?} (valid until {}) replaces {:?} (valid until {})\n  installed as {}; a running gateway reloads it without dropping connections",
                report.new_leaf.display_name(),
                pki::cert::format_time(report.new_leaf.not_after),
                report.old_leaf.display_name(),
                pki::cert::format_time(report.old_leaf.not_after),
                dir.keystore_path().display()
            );
            Ok(0)
        }
        PkiCommand::Rollover(r) => rollover(&dir, r, out, err),
    }
}

fn rollover(
    dir: &DataDir,
    cmd: RolloverCommand,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u8, PkiError> {
    match cmd {
        RolloverCommand::Stage { keystore } => {
            let ks = Keystore::load(&keystore)?;
            let state = ops::rollover_stage(dir, &ks)?;
            let _ = writeln!(
                out,
                "staged a keystore under the new root\n  new root fingerprint: {}\n  active root fingerprint: {}\n\
                 hand the new root to the connected devices from the management side \
                 (`fleetgate console … rollover`, repeat as devices come online), check progress with \
                 `fleetgate pki rollover status`, then `fleetgate pki rollover switch`",
                ks.fingerprint(),
                fp_hex(&state.active_fingerprint)
            );
            Ok(0)
        }
        RolloverCommand::Status => {
            let status = ops::rollover_status(dir)?;
            match &status.active {
                Some(fp) => {
                    let _ = writeln!(out, "active root: {fp}");
                }
                None => {
                    let _ = writeln!(out, "active root: (no active keystore)");
                }
            }
            let Some(staged) = &status.staged else {
                let _ = writeln!(out, "staged: nothing (use `fleetgate pki rollover stage`)");
                return Ok(0);
            };
            let _ = writeln!(
                out,
                "staged root: {}\n  root: {:?}, valid until {}\n  server certificate: {:?}, valid until {}\n  staged at: {}",
                staged.root.fingerprint,
                staged.root.display_name(),
                pki::cert::format_time(staged.root.not_after),
                staged.leaf.display_name(),
                pki::cert::format_time(staged.leaf.not_after),
                pki::cert::format_time(staged.state.staged_at)
            );
            for v in &staged.violations {
                let _ = writeln!(err, "warning: the staged keystore now fails: {v}");
            }
            match &status.devices {
                Some(d) => {
                    let _ = writeln!(
                        out,
                        "devices (as of {}): {} connected, {} hold the new root, {} lack the new root, {} lack the feature (cannot receive it)",
                        pki::cert::format_time(d.updated_at),
                        d.connected,
                        d.have_new_root,
                        d.lack_new_root,
                        d.lack_feature
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "devices: no report from the gateway yet (it writes DATA_DIR/pki/rollover/devices.json)"
                    );
                }
            }
            Ok(0)
        }
        RolloverCommand::Switch => {
            let report = ops::rollover_switch(dir)?;
            let _ = writeln!(
                out,
                "switched: the active root is now {}",
                report.fingerprint
            );
            if let Some(prev) = &report.previous_path {
                let _ = writeln!(out, "  the previous keystore is kept as {}", prev.display());
            }
            match &report.devices {
                Some(d) => {
                    let unreachable = d.lack_new_root + d.lack_feature;
                    let _ = writeln!(
                        out,
                        "  {} device(s) hold the new root and reconnect by themselves; {} device(s) \
                         ({} without the new root, {} without the feature) will be unreachable",
                        d.have_new_root, unreachable, d.lack_new_root, d.lack_feature
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  no device report was available: devices without the new root will be unreachable"
                    );
                }
            }
            Ok(0)
        }
    }
}

fn show(dir: &DataDir, a: ShowArgs, out: &mut dyn Write) -> Result<(), PkiError> {
    let (title, chain, key) = if let Some(path) = a.keystore {
        let input = Input::read(&path)?;
        let (chain, key) = ops::load_chain(std::slice::from_ref(&input))?;
        (path.display().to_string(), chain, key)
    } else if let Some(name) = a.cert {
        let ks = dir.cert(&name)?;
        (format!("server certificate {name}"), ks.chain, Some(ks.key))
    } else if let Some(name) = a.ca {
        let ca = dir.ca(&name)?;
        (format!("CA {}", ca.name), ca.chain, ca.key)
    } else if a.staged {
        let (ks, _) = ops::rollover_staged(dir)?.ok_or(PkiError::NothingStaged)?;
        ("staged keystore".to_owned(), ks.chain, Some(ks.key))
    } else {
        let path = dir.keystore_path();
        if !path.exists() {
            return Err(PkiError::NoActiveKeystore(path));
        }
        let ks = Keystore::load(&path)?;
        (path.display().to_string(), ks.chain, Some(ks.key))
    };
    let _ = writeln!(out, "{title}: {} certificate(s)", chain.len());
    let n = chain.len();
    let now = ops::now();
    for (i, der) in chain.iter().enumerate() {
        let info = CertInfo::parse(der)?;
        let role = if n == 1 {
            ""
        } else if i == 0 {
            " (server certificate)"
        } else if i + 1 == n {
            " (root)"
        } else {
            " (intermediate)"
        };
        let _ = writeln!(out, "\nCertificate {} of {n}{role}", i + 1);
        let _ = writeln!(out, "  Subject:           {}", info.label());
        let _ = writeln!(out, "  Issuer:            {}", info.issuer);
        let state = if now < info.not_before {
            "NOT YET VALID".to_owned()
        } else if now > info.not_after {
            "EXPIRED".to_owned()
        } else {
            format!("{} days left", (info.not_after - now) / 86_400)
        };
        let _ = writeln!(
            out,
            "  Validity:          {} to {} ({state})",
            pki::cert::format_time(info.not_before),
            pki::cert::format_time(info.not_after)
        );
        let sans = if info.sans.is_empty() {
            "(none)".to_owned()
        } else {
            info.sans
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(out, "  SANs:              {sans}");
        let bc = match info.basic_constraints {
            None => "(absent)".to_owned(),
            Some(bc) => match (bc.ca, bc.path_len) {
                (true, Some(p)) => format!("cA=true, pathLenConstraint={p}"),
                (true, None) => "cA=true".to_owned(),
                (false, _) => "cA=false".to_owned(),
            },
        };
        let _ = writeln!(out, "  Basic constraints: {bc}");
        let _ = writeln!(out, "  Key type:          {}", info.key_type);
        let _ = writeln!(out, "  Serial:            {}", info.serial);
        let _ = writeln!(out, "  SHA-256:           {}", info.fingerprint.hex());
    }
    if let Some(key) = key {
        let leaf = CertInfo::parse(&chain[0])?;
        let matches = rcgen::KeyPair::try_from(&key)
            .is_ok_and(|kp| kp.public_key_raw() == leaf.public_key.as_slice());
        let _ = writeln!(
            out,
            "\nPrivate key: present (not shown), {}",
            if matches {
                "matches certificate 1"
            } else {
                "does NOT match certificate 1"
            }
        );
    }
    let fp = Fingerprint::of(&chain[n - 1]);
    let _ = writeln!(out, "\nRoot fingerprint (SHA-256):");
    for (i, part) in fp.parts().iter().enumerate() {
        let _ = writeln!(out, "  Part {}: {part}", i + 1);
    }
    Ok(())
}

fn subject(cn: String, s: SubjectArgs) -> Subject {
    Subject {
        common_name: cn,
        organization: Some(s.org),
        locality: Some(s.locality),
        country: Some(s.country),
    }
}

fn split_hosts(hosts: &[String]) -> Vec<String> {
    hosts
        .iter()
        .flat_map(|h| h.split([';', ',']))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect()
}

fn warn_all(err: &mut dyn Write, warnings: &[String]) {
    for w in warnings {
        let _ = writeln!(err, "warning: {w}");
    }
}

fn print_created(out: &mut dyn Write, kind: &str, created: &ops::Created) {
    let s = &created.stored;
    let _ = writeln!(
        out,
        "created {kind} {:?} (name: {})\n  subject: {}\n  valid until: {}",
        s.info.display_name(),
        s.name,
        s.info.label(),
        pki::cert::format_time(s.info.not_after)
    );
    if !s.info.sans.is_empty() {
        let sans: Vec<String> = s.info.sans.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "  SANs: {}", sans.join(", "));
    }
    match &s.key_path {
        Some(k) => {
            let _ = writeln!(
                out,
                "  certificate: {}\n  private key: {} (mode 0600)",
                s.path.display(),
                k.display()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  stored (chain + key, mode 0600): {}",
                s.path.display()
            );
        }
    }
    let _ = writeln!(out, "  root fingerprint: {}", s.root_fingerprint);
}

fn print_installed(out: &mut dyn Write, report: &ops::InstallReport) {
    let _ = writeln!(
        out,
        "installed {:?} (valid until {}) as {}\n  root fingerprint: {}{}\n  a running gateway reloads it without restart",
        report.leaf.display_name(),
        pki::cert::format_time(report.leaf.not_after),
        report.path.display(),
        report.fingerprint,
        match report.previous {
            Some(p) if p != report.fingerprint => " (the root CHANGED)",
            _ => "",
        }
    );
}

fn fp_hex(hex: &str) -> String {
    Fingerprint::from_hex(hex)
        .map(|f| f.to_string())
        .unwrap_or_else(|| hex.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    /// Mirrors `main.rs`: a global `--data-dir`.
    #[derive(Parser, Debug)]
    struct Wrapper {
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Subcommand, Debug)]
    enum Top {
        #[command(subcommand)]
        Pki(PkiCommand),
    }

    #[test]
    fn clap_definition_is_consistent() {
        Wrapper::command().debug_assert();
    }

    #[test]
    fn parses_the_issue_examples() {
        let w = Wrapper::try_parse_from([
            "fleetgate",
            "pki",
            "issue",
            "--ca",
            "r",
            "--name",
            "n",
            "--holder",
            "h",
            "--org",
            "o",
            "--locality",
            "l",
            "--country",
            "de",
            "--hosts",
            "gw.example.com;203.0.113.7;*.example.org;2001:db8::7",
        ])
        .unwrap();
        assert!(matches!(w.cmd, Top::Pki(PkiCommand::Issue(_))));
        assert!(
            Wrapper::try_parse_from([
                "fleetgate",
                "pki",
                "create-root",
                "--name",
                "n",
                "--org",
                "o",
                "--locality",
                "l",
                "--country",
                "XX"
            ])
            .is_err()
        );
        let w = Wrapper::try_parse_from([
            "fleetgate",
            "pki",
            "install",
            "--keystore",
            "k.pem",
            "--data-dir",
            "/d",
        ])
        .unwrap();
        assert!(matches!(w.cmd, Top::Pki(PkiCommand::Install(_))));
        assert_eq!(w.data_dir.as_deref(), Some(Path::new("/d")));
        Wrapper::try_parse_from(["fleetgate", "pki", "rollover", "status"]).unwrap();
    }
}
