//! `fleetgate mgmt …`: management client certificates (`docs/protocol.md` §6.1).
//!
//! `mgmt add NAME --out DIR` generates an ECDSA P-256 key pair, has the gateway's management
//! CA (`DATA_DIR/pki/mgmt-ca/`) certify it with CN = NAME (TLS client authentication only),
//! records the certificate in the registry and writes:
//!
//! ```text
//! DIR/NAME.pem          the client certificate (0644)
//! DIR/NAME.key          its private key, PKCS#8 PEM (0600)
//! DIR/gateway-root.pem  the gateway's root certificate (DATA_DIR/root.pem): what the
//!                       management client trusts for the gateway's server certificate
//! ```
//!
//! `mgmt list` shows every certificate issued; `mgmt revoke NAME` revokes the active one of
//! that name: the running gateway refuses it and closes its open connections within a second.
//!
//! Exit codes: 0 success; 2 refused input (name in use, unknown name, bad name); 1 anything
//! else.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use serde::Serialize;

use crate::pki::cert::format_time;
use crate::pki::device::ensure_mgmt_ca;
use crate::pki::fs::{MODE_PRIVATE, MODE_PUBLIC, write_atomic};
use crate::registry::{ManagementClient, NewManagementClient, Registry, unix_now};

/// Default validity of a management client certificate (2 years).
pub const MGMT_CERT_DAYS: u32 = 730;

/// `fleetgate mgmt <command>`.
#[derive(Debug, Subcommand)]
pub enum MgmtCommand {
    /// Issue a client certificate for a management server: writes DIR/NAME.pem, DIR/NAME.key
    /// (0600) and DIR/gateway-root.pem (the root the client trusts), and records it in the
    /// registry. A name already in use (not revoked) is refused.
    ///
    /// Use them with `fleetgate console --gateway wss://HOST:PORT --cert DIR/NAME.pem --key
    /// DIR/NAME.key --ca DIR/gateway-root.pem …`.
    Add {
        /// The management server's name (the certificate's common name): 1–64 printable
        /// characters, usable as a file name.
        #[arg(value_name = "NAME")]
        name: String,
        /// Directory for the three files (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, value_name = "DAYS", default_value_t = MGMT_CERT_DAYS)]
        days: u32,
        /// Overwrite existing files in DIR.
        #[arg(long)]
        force: bool,
    },
    /// List the management client certificates ever issued: name, state (active, revoked,
    /// expired), issued, valid until, revoked, fingerprint (first 16 hex digits).
    List {
        /// JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke the active certificate NAME: the running gateway refuses it and disconnects it
    /// within a second. The name can then be issued again.
    Revoke {
        /// The management server's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// What [`add`] wrote.
#[derive(Debug, Clone)]
pub struct AddedClient {
    /// The registry row.
    pub client: ManagementClient,
    /// `DIR/NAME.pem`.
    pub cert_path: PathBuf,
    /// `DIR/NAME.key`.
    pub key_path: PathBuf,
    /// `DIR/gateway-root.pem`.
    pub root_path: PathBuf,
}

/// Issues and records a management client certificate and writes its files (see the
/// [module docs](self)). The registry row is written before the files; if writing a file
/// fails, the certificate is revoked again so the name stays usable.
pub fn add(
    data_dir: &Path,
    name: &str,
    out: &Path,
    days: u32,
    force: bool,
) -> anyhow::Result<AddedClient> {
    let name = crate::registry::check_management_name(name)?;
    let root_src = data_dir.join("root.pem");
    let root = std::fs::read(&root_src).with_context(|| {
        format!(
            "cannot read the gateway's root certificate {} (start the gateway once with \
             `fleetgate serve` to create it)",
            root_src.display()
        )
    })?;
    let cert_path = out.join(format!("{name}.pem"));
    let key_path = out.join(format!("{name}.key"));
    let root_path = out.join("gateway-root.pem");
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                anyhow::bail!("{} exists (use --force to overwrite)", p.display());
            }
        }
    }
    let mut reg = Registry::open_in(data_dir)?;
    if reg.management_client(name)?.is_some() {
        return Err(crate::registry::RegistryError::ManagementNameInUse(name.to_owned()).into());
    }
    let ca = ensure_mgmt_ca(data_dir).context("cannot load the management CA")?;
    let key = rcgen::KeyPair::generate().context("cannot generate a key pair")?;
    let now = time::OffsetDateTime::now_utc();
    let issued = ca
        .issue(
            name,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice(),
            days,
            now,
        )
        .context("cannot issue the management certificate")?;
    let client = reg.add_management_client(
        &NewManagementClient {
            name,
            fingerprint: issued.fingerprint,
            serial: &issued.serial,
            not_after: issued.not_after,
        },
        now.unix_timestamp(),
    )?;
    let write = || -> anyhow::Result<()> {
        create_private_dir(out)?;
        write_atomic(&key_path, key.serialize_pem().as_bytes(), MODE_PRIVATE)?;
        write_atomic(&cert_path, issued.cert_pem.as_bytes(), MODE_PUBLIC)?;
        write_atomic(&root_path, &root, MODE_PUBLIC)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = reg.revoke_management_client(name, unix_now());
        return Err(e.context(format!("cannot write the files to {}", out.display())));
    }
    Ok(AddedClient {
        client,
        cert_path,
        key_path,
        root_path,
    })
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

/// Runs a `mgmt` command against `data_dir`.
pub fn run(cmd: MgmtCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match execute(cmd, data_dir, &mut out) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(super::keys::exit_code(&e)))
        }
    }
}

#[derive(Serialize)]
struct ListRow<'a> {
    name: &'a str,
    state: &'static str,
    fingerprint: String,
    serial: String,
    issued_at: i64,
    not_after: i64,
    revoked_at: Option<i64>,
}

fn execute(cmd: MgmtCommand, data_dir: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        MgmtCommand::Add {
            name,
            out: dir,
            days,
            force,
        } => {
            let a = add(data_dir, &name, &dir, days, force)?;
            writeln!(
                out,
                "management client {} added (valid until {}, fingerprint {})",
                a.client.name,
                format_time(a.client.not_after),
                a.client.fingerprint.hex()
            )?;
            writeln!(out, "  certificate  {}", a.cert_path.display())?;
            writeln!(out, "  private key  {}", a.key_path.display())?;
            writeln!(out, "  gateway root {}", a.root_path.display())?;
        }
        MgmtCommand::List { json } => {
            let reg = Registry::open_in(data_dir)?;
            let now = unix_now();
            let list = reg.list_management_clients()?;
            if json {
                let rows: Vec<ListRow<'_>> = list
                    .iter()
                    .map(|c| ListRow {
                        name: &c.name,
                        state: c.state(now),
                        fingerprint: c.fingerprint.hex(),
                        serial: c.serial.iter().map(|b| format!("{b:02X}")).collect(),
                        issued_at: c.issued_at,
                        not_after: c.not_after,
                        revoked_at: c.revoked_at,
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else if list.is_empty() {
                writeln!(
                    out,
                    "no management clients (add one with `fleetgate mgmt add`)"
                )?;
            } else {
                writeln!(
                    out,
                    "{:<24} {:<8} {:<20} {:<20} {:<20} FINGERPRINT",
                    "NAME", "STATE", "ISSUED", "VALID UNTIL", "REVOKED"
                )?;
                for c in &list {
                    writeln!(
                        out,
                        "{:<24} {:<8} {:<20} {:<20} {:<20} {}",
                        c.name,
                        c.state(now),
                        format_time(c.issued_at),
                        format_time(c.not_after),
                        c.revoked_at.map(format_time).unwrap_or_else(|| "-".into()),
                        &c.fingerprint.hex()[..16]
                    )?;
                }
            }
        }
        MgmtCommand::Revoke { name } => {
            let mut reg = Registry::open_in(data_dir)?;
            let c = reg.revoke_management_client(&name, unix_now())?;
            writeln!(
                out,
                "management client {} revoked; a running gateway refuses it and closes its \
                 connections within a second",
                c.name
            )?;
        }
    }
    Ok(())
}
