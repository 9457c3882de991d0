//! `fleetgate devices …`: registered devices from the command line. A thin layer over
//! [`crate::registry`].
//!
//! `devices remove` revokes in the registry file, then tells a gateway running on the same
//! data dir through its admin socket (`DATA_DIR/admin.sock`): the device is disconnected at
//! once and told to drop its gateway settings. (Without the admin socket the gateway notices
//! the change within a second anyway.) `devices list` asks the running gateway which devices
//! are connected; `devices limit` reads or sets its device connection limit.
//!
//! Exit codes: 0 success; 2 unknown or invalid unit ID; 1 anything else.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::admin;
use crate::control::LiveSession;

use crate::pki::cert::format_time;
use crate::registry::{Device, DeviceState, Registry, unix_now};

/// `fleetgate devices <command>`.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List devices: unit ID, state (active, revoked, superseded, expired), registered,
    /// last seen, address, key used, credential fingerprint (first 16 hex digits).
    List(ListArgs),

    /// Remove a device: revoke every credential its unit holds, disconnect it if connected,
    /// and tell its agent to drop its gateway settings. It cannot reconnect with them; it can
    /// register again only with a new key.
    Remove {
        /// The unit ID.
        #[arg(value_name = "UNIT")]
        unit: String,
    },

    /// Show or set the running gateway's device connection limit (0 = unlimited). A set limit
    /// lasts until the gateway restarts; put `[limits] max_devices` in the config to keep it.
    /// Devices over the limit are refused with `limit_reached` and a retry hint.
    Limit {
        /// The new limit; omit it to show the current one.
        #[arg(value_name = "N")]
        max_devices: Option<u64>,
    },
}

/// `devices list` arguments.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only devices that can connect (not revoked, superseded or expired).
    #[arg(long)]
    pub active: bool,
    /// Only devices connected to the running gateway now.
    #[arg(long)]
    pub connected: bool,
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
    if let DevicesCommand::Limit { max_devices } = cmd {
        return limit(data_dir, max_devices, out);
    }
    let mut reg = Registry::open_in(data_dir)?;
    let now = unix_now();
    match cmd {
        DevicesCommand::List(a) => {
            // Live sessions from the running gateway, if there is one.
            let live: HashMap<String, LiveSession> =
                match admin::request(data_dir, &admin::Request::Sessions) {
                    Ok(r) => r
                        .sessions
                        .unwrap_or_default()
                        .into_iter()
                        .map(|s| (s.fingerprint.clone(), s))
                        .collect(),
                    Err(_) => HashMap::new(),
                };
            let devices: Vec<Device> = reg
                .list_devices()?
                .into_iter()
                .filter(|d| !a.active || d.state(now) == DeviceState::Active)
                .filter(|d| !a.connected || live.contains_key(&d.fingerprint.hex()))
                .collect();
            print_devices(out, &devices, &live, now)?;
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
                match admin::request(data_dir, &admin::Request::Refresh) {
                    Ok(r) if r.ok => writeln!(
                        out,
                        "the running gateway disconnects it now and tells it to drop its gateway settings"
                    )?,
                    Ok(r) => writeln!(
                        out,
                        "the running gateway did not take the change at once ({}); it will within a second",
                        r.error.unwrap_or_default()
                    )?,
                    Err(_) => writeln!(
                        out,
                        "no gateway is running on this data dir; it will refuse the device when it starts"
                    )?,
                }
            }
        }
        DevicesCommand::Limit { .. } => unreachable!("handled above"),
    }
    Ok(())
}

fn limit(data_dir: &Path, max_devices: Option<u64>, out: &mut dyn Write) -> anyhow::Result<()> {
    let req = match max_devices {
        Some(n) => admin::Request::SetLimit { max_devices: n },
        None => admin::Request::Status,
    };
    let r = admin::request(data_dir, &req)
        .context("the device limit is a setting of the running gateway")?;
    if !r.ok {
        anyhow::bail!("the gateway refused: {}", r.error.unwrap_or_default());
    }
    let label = |n: u64| {
        if n == 0 {
            "unlimited".to_owned()
        } else {
            n.to_string()
        }
    };
    let max = r.max_devices.unwrap_or(0);
    match max_devices {
        Some(_) => writeln!(out, "device connection limit set to {}", label(max))?,
        None => writeln!(
            out,
            "device connection limit: {}; devices connected: {}; rejected by the limit since start: {}",
            label(max),
            r.device_sessions.unwrap_or(0),
            r.limit_rejections.unwrap_or(0)
        )?,
    }
    Ok(())
}

fn print_devices(
    out: &mut dyn Write,
    devices: &[Device],
    live: &HashMap<String, LiveSession>,
    now: i64,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<20}  {:<10}  {:<23}  {:<23}  {:<23}  {:<39}  {:>5}  FINGERPRINT",
        "UNIT", "STATE", "CONNECTED SINCE", "REGISTERED", "LAST SEEN", "ADDRESS", "KEY"
    )?;
    for d in devices {
        let session = live.get(&d.fingerprint.hex());
        writeln!(
            out,
            "{:<20}  {:<10}  {:<23}  {:<23}  {:<23}  {:<39}  {:>5}  {}",
            d.unit_id,
            d.state(now).as_str(),
            session.map_or_else(|| "-".to_owned(), |s| format_time(s.since)),
            format_time(d.registered_at),
            d.last_seen.map_or_else(|| "-".to_owned(), format_time),
            session
                .and_then(|s| s.address.as_deref())
                .or(d.address.as_deref())
                .unwrap_or("-"),
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
        let (code, out, _) = run(DevicesCommand::List(ListArgs {
            active: false,
            connected: false,
        }));
        assert_eq!(code, 0);
        assert_eq!(out.lines().count(), 3, "{out}");
        assert!(out.contains("UNIT-A") && out.contains("192.0.2.1") && out.contains("active"));

        let (code, out, _) = run(DevicesCommand::Remove {
            unit: "unit-a".into(),
        });
        assert_eq!(code, 0);
        assert!(
            out.starts_with("removed unit unit-a: 1 credential(s) revoked\nno gateway is running"),
            "{out}"
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

        let (_, out, _) = run(DevicesCommand::List(ListArgs {
            active: true,
            connected: false,
        }));
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains("UNIT-A"));
        let (_, out, _) = run(DevicesCommand::List(ListArgs {
            active: false,
            connected: false,
        }));
        assert!(out.contains("revoked"));
    }
}
