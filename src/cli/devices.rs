//! `fleetgate devices …`: registered devices from the command line. A thin layer over
//! [`crate::registry`].
//!
//! `devices remove` works on the registry file; a running gateway refuses the removed
//! credential at its next connection (live disconnection comes with the admin socket).
//!
//! Exit codes: 0 success; 2 unknown or invalid unit ID; 1 anything else.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::pki::cert::format_time;
use crate::registry::{Device, DeviceState, Registry, unix_now};

/// `fleetgate devices <command>`.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List devices: unit ID, state (active, revoked, superseded, expired), registered,
    /// last seen, address, key used, credential fingerprint (first 16 hex digits).
    List(ListArgs),

    /// Remove a device: revoke every credential its unit holds. It cannot reconnect with them;
    /// it can register again only with a new key.
    Remove {
        /// The unit ID.
        #[arg(value_name = "UNIT")]
        unit: String,
    },
}

/// `devices list` arguments.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only devices that can connect (not revoked, superseded or expired).
    #[arg(long)]
    pub active: bool,
}

/// Runs a `devices` command against `data_dir`.
pub fn run(cmd: DevicesCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    Ok(ExitCode::from(run_with(cmd, data_dir, &mut out, &mut err)))
}

/// [`run`] with explicit streams; returns the exit code (0, 1 or 2).
pub fn run_with(
    cmd: DevicesCommand,
    data_dir: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    match execute(cmd, data_dir, out) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(err, "error: {e:#}");
            super::keys::exit_code(&e)
        }
    }
}

fn execute(cmd: DevicesCommand, data_dir: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut reg = Registry::open_in(data_dir)?;
    let now = unix_now();
    match cmd {
        DevicesCommand::List(a) => {
            let devices: Vec<Device> = reg
                .list_devices()?
                .into_iter()
                .filter(|d| !a.active || d.state(now) == DeviceState::Active)
                .collect();
            print_devices(out, &devices, now)?;
        }
        DevicesCommand::Remove { unit } => {
            let revoked = reg.revoke_device(&unit, now)?;
            if revoked.is_empty() {
                writeln!(out, "unit {} was already removed", unit.trim())?;
            } else {
                writeln!(
                    out,
                    "removed unit {}: {} credential(s) revoked",
                    unit.trim(),
                    revoked.len()
                )?;
            }
        }
    }
    Ok(())
}

fn print_devices(out: &mut dyn Write, devices: &[Device], now: i64) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<20}  {:<10}  {:<23}  {:<23}  {:<39}  {:>5}  FINGERPRINT",
        "UNIT", "STATE", "REGISTERED", "LAST SEEN", "ADDRESS", "KEY"
    )?;
    for d in devices {
        writeln!(
            out,
            "{:<20}  {:<10}  {:<23}  {:<23}  {:<39}  {:>5}  {}",
            d.unit_id,
            d.state(now).as_str(),
            format_time(d.registered_at),
            d.last_seen.map_or_else(|| "-".to_owned(), format_time),
            d.address.as_deref().unwrap_or("-"),
            d.key_id.map_or_else(|| "-".to_owned(), |k| format!("#{k}")),
            &d.fingerprint.hex()[..16],
        )?;
    }
    if devices.is_empty() {
        writeln!(out, "(no devices)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Fingerprint;
    use crate::registry::{DeviceCredential, RegistrationRequest};

    #[test]
    fn list_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut reg = Registry::open_in(dir.path()).unwrap();
            let k = reg.create_mass_key(None, unix_now()).unwrap();
            for (i, unit) in ["UNIT-A", "UNIT-B"].iter().enumerate() {
                let cred = DeviceCredential {
                    fingerprint: Fingerprint([i as u8 + 1; 32]),
                    serial: vec![1],
                    not_after: unix_now() + 86_400,
                    public_key_sha256: None,
                };
                reg.consume_key(&RegistrationRequest {
                    key: &k.value,
                    unit_id: unit,
                    source: Some("192.0.2.1".parse().unwrap()),
                    credential: &cred,
                    root: None,
                    now: unix_now(),
                })
                .unwrap();
            }
        }
        let run = |cmd| {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = run_with(cmd, dir.path(), &mut out, &mut err);
            (
                code,
                String::from_utf8(out).unwrap(),
                String::from_utf8(err).unwrap(),
            )
        };
        let (code, out, _) = run(DevicesCommand::List(ListArgs { active: false }));
        assert_eq!(code, 0);
        assert_eq!(out.lines().count(), 3, "{out}");
        assert!(out.contains("UNIT-A") && out.contains("192.0.2.1") && out.contains("active"));

        let (code, out, _) = run(DevicesCommand::Remove {
            unit: "unit-a".into(),
        });
        assert_eq!(
            (code, out.as_str()),
            (0, "removed unit unit-a: 1 credential(s) revoked\n")
        );
        let (_, out, _) = run(DevicesCommand::Remove {
            unit: "UNIT-A".into(),
        });
        assert!(out.contains("already removed"));
        let (code, _, err) = run(DevicesCommand::Remove {
            unit: "NOPE".into(),
        });
        assert_eq!(code, 2);
        assert!(err.contains("no device with unit ID NOPE"), "{err}");

        let (_, out, _) = run(DevicesCommand::List(ListArgs { active: true }));
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains("UNIT-A"));
        let (_, out, _) = run(DevicesCommand::List(ListArgs { active: false }));
        assert!(out.contains("revoked"));
    }
}
