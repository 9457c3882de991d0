//! `fleetgate keys …`: first-authentication keys from the command line — create, list, revoke,
//! delete, and hand out (export as text/XML/HTML, or mail). A thin layer over
//! [`crate::registry`], [`crate::export`] and [`crate::mail`].
//!
//! `keys create` prints the created keys on standard output, one per line, and nothing else
//! there (messages go to standard error), so `fleetgate keys create --one-time 10 > keys.txt`
//! or `… | fleetgate keys export - --format html` work. It is the only time a key is shown:
//! the registry stores a hash.
//!
//! Exit codes: 0 success; 2 the input was refused (unknown key, bad unit ID or CSV line, key
//! value in use, bad address, nothing configured to hand out); 1 anything else.

#![forbid(unsafe_code)]

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{ArgGroup, Args, Subcommand};

use crate::export::{self, Format, Handout, HandoutConfig};
use crate::mail::{self, MailConfig};
use crate::pki::cert::format_time;
use crate::pki::{DataDir, Fingerprint};
use crate::registry::unit::parse_unit_list;
use crate::registry::{KeyFilter, KeyInfo, KeyKind, KeyRef, Registry, RegistryError, unix_now};

/// Exit code when the input was refused.
pub const EXIT_REJECTED: u8 = 2;
/// Exit code for other failures.
pub const EXIT_FAILED: u8 = 1;

/// `fleetgate keys <command>`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create first-authentication keys; prints only the keys, one per line.
    ///
    /// Exactly one of:
    ///   --one-time N       N keys, each for any one device, once
    ///   --unit ID          a key only unit ID may use, once (repeat for several units)
    ///   --csv FILE         one unit-bound key per unit ID in FILE: one unit ID per line, or a
    ///                      CSV with a header line naming a `unit_id` column (`-`: stdin).
    ///                      Bad lines are reported by number and nothing is created.
    ///   --mass [--value V] a mass-deployment key: any device, any number of times; random,
    ///                      or V (at least 8 characters; refused if that value is in use)
    ///
    /// Unit-bound keys are printed in the order of the unit IDs given. Random keys look like
    /// K7Q2-9XM4-T3HB-WP0R-ZC8D (100 bits; case, `-` and O/0, I/L/1 do not matter when typed).
    Create(CreateArgs),

    /// List keys (never their values): ID, kind, first symbols, state, unit, use.
    List(ListArgs),

    /// Revoke a key (by value or by the ID shown in `keys list`, e.g. 12 or #12): no device can
    /// register with it any more. Devices already registered stay (see `devices remove`).
    Revoke {
        /// The key value or its ID.
        #[arg(value_name = "KEY|ID")]
        key: String,
    },

    /// Delete a key (by value or ID). Devices registered with it stay registered.
    Delete {
        /// The key value or its ID.
        #[arg(value_name = "KEY|ID")]
        key: String,
    },

    /// Hand keys out: host, port, root fingerprint (Part 1-4) and key, for every public gateway
    /// address in the config (handout.gateways).
    ///
    /// --format text (default) | xml (icg.xml) | html (icg.html, printable). Writes to --out
    /// FILE (mode 0600) or standard output. --mail "a@x.example;b@y.example" sends it through
    /// the SMTP server of the config's mail section instead (text in the body, icg.xml and
    /// icg.html attached); with --out as well, the file is written too.
    ///
    /// Give the keys as printed by `keys create`, or `-` to read them from standard input,
    /// one per line: fleetgate keys create --one-time 5 | fleetgate keys export - --format html
    /// --out icg.html. Unknown, used or revoked keys are refused.
    Export(ExportArgs),
}

/// `keys create` arguments.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["one_time", "unit", "csv", "mass"])))]
pub struct CreateArgs {
    /// Create N one-time keys.
    #[arg(long, value_name = "N")]
    pub one_time: Option<usize>,
    /// Create a key bound to this unit ID (repeatable).
    #[arg(long, value_name = "ID")]
    pub unit: Vec<String>,
    /// Create unit-bound keys for the unit IDs in FILE (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Create a mass-deployment key.
    #[arg(long)]
    pub mass: bool,
    /// The mass-deployment key's value (default: random).
    #[arg(long, value_name = "V", requires = "mass")]
    pub value: Option<String>,
}

/// `keys list` arguments.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("filter").args(["unused", "used", "revoked"])))]
pub struct ListArgs {
    /// Only keys never used and not revoked.
    #[arg(long)]
    pub unused: bool,
    /// Only keys used at least once.
    #[arg(long)]
    pub used: bool,
    /// Only revoked keys.
    #[arg(long)]
    pub revoked: bool,
}

/// `keys export` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The keys (`-`: read them from standard input, one per line).
    #[arg(required = true, value_name = "KEY")]
    pub keys: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write to FILE (mode 0600) instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Send by e-mail to these addresses, separated by `;`.
    #[arg(long, value_name = "ADDRESSES")]
    pub mail: Option<String>,
}

/// Input the operator must fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// Runs a `keys` command against `data_dir`. `handout` and `mail` come from the config file
/// (`[handout]`, `[mail]`); only `keys export` uses them.
pub fn run(
    cmd: KeysCommand,
    data_dir: &Path,
    handout: &HandoutConfig,
    mail: Option<&MailConfig>,
) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let mut input = std::io::stdin().lock();
    Ok(ExitCode::from(run_with(
        cmd, data_dir, handout, mail, &mut input, &mut out, &mut err,
    )))
}

/// [`run`] with explicit streams; returns the exit code (0, 1 or 2).
pub fn run_with(
    cmd: KeysCommand,
    data_dir: &Path,
    handout: &HandoutConfig,
    mail: Option<&MailConfig>,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    match execute(cmd, data_dir, handout, mail, input, out, err) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(err, "error: {e:#}");
            exit_code(&e)
        }
    }
}

/// 2 for refused input, 1 for other failures.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let rejected = e.chain().any(|cause| {
        cause.is::<Rejected>()
            || cause.is::<export::ExportError>()
            || cause
                .downcast_ref::<RegistryError>()
                .is_some_and(RegistryError::is_rejection)
            || cause
                .downcast_ref::<mail::MailError>()
                .is_some_and(mail::MailError::is_rejection)
    });
    if rejected { EXIT_REJECTED } else { EXIT_FAILED }
}

fn execute(
    cmd: KeysCommand,
    data_dir: &Path,
    handout: &HandoutConfig,
    mail_config: Option<&MailConfig>,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut reg = Registry::open_in(data_dir)?;
    let now = unix_now();
    match cmd {
        KeysCommand::Create(a) => {
            let created = if let Some(n) = a.one_time {
                reg.create_one_time_keys(n, now)?
            } else if !a.unit.is_empty() {
                reg.create_unit_keys(&a.unit, now)?
            } else if let Some(path) = &a.csv {
                let text = read_text(path, input)?;
                let units = parse_unit_list(&text)
                    .map_err(|e| Rejected(format!("{}: {e}", describe(path))))?;
                reg.create_unit_keys(&units, now)?
            } else {
                vec![reg.create_mass_key(a.value.as_deref(), now)?]
            };
            for k in &created {
                writeln!(out, "{}", k.value)?;
            }
            out.flush()?;
            let kind = created.first().map_or(KeyKind::OneTime, |k| k.kind);
            let note = match kind {
                KeyKind::UnitBound => " (in the order of the unit IDs)",
                _ => "",
            };
            writeln!(
                err,
                "created {} {} key(s){note}; this is the only time they are shown",
                created.len(),
                kind
            )?;
        }
        KeysCommand::List(a) => {
            let filter = if a.unused {
                KeyFilter::Unused
            } else if a.used {
                KeyFilter::Used
            } else if a.revoked {
                KeyFilter::Revoked
            } else {
                KeyFilter::All
            };
            print_keys(out, &reg.list_keys(filter)?)?;
        }
        KeysCommand::Revoke { key } => {
            let k = reg.revoke_key(&KeyRef::parse(&key), now)?;
            writeln!(out, "revoked key #{} ({} {})", k.id, k.kind, k.prefix)?;
        }
        KeysCommand::Delete { key } => {
            let k = reg.delete_key(&KeyRef::parse(&key), now)?;
            writeln!(out, "deleted key #{} ({} {})", k.id, k.kind, k.prefix)?;
        }
        KeysCommand::Export(a) => {
            export_keys(a, &reg, data_dir, handout, mail_config, input, out, err)?
        }
    }
    Ok(())
}

fn export_keys(
    a: ExportArgs,
    reg: &Registry,
    data_dir: &Path,
    handout: &HandoutConfig,
    mail_config: Option<&MailConfig>,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut keys = Vec::new();
    for k in &a.keys {
        if k == "-" {
            let mut text = String::new();
            input.read_to_string(&mut text)?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
        } else {
            keys.push(k.trim().to_owned());
        }
    }
    if keys.is_empty() {
        return Err(Rejected("no key given".into()).into());
    }
    for k in &keys {
        let key_ref = KeyRef::Value(k.clone());
        let info = reg
            .find_key(&key_ref)?
            .ok_or_else(|| Rejected(format!("no such key: {key_ref}")))?;
        if !info.is_usable() {
            return Err(Rejected(format!(
                "key #{} ({}) is {}: handing it out is pointless",
                info.id,
                info.prefix,
                info.state().as_str()
            ))
            .into());
        }
    }
    let fingerprint = root_fingerprint(data_dir)?;
    let h = Handout {
        gateways: &handout.gateways,
        fingerprint: &fingerprint,
        keys: &keys,
    };
    let rendered = export::render(&h, a.format)?;
    if let Some(path) = &a.out {
        crate::pki::fs::write_atomic(path, rendered.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(err, "wrote {} key(s) to {}", keys.len(), path.display())?;
    }
    if let Some(list) = &a.mail {
        let cfg = mail_config.ok_or_else(|| {
            Rejected("--mail needs the SMTP settings: add a [mail] section to the config".into())
        })?;
        let sent = mail::send_handout(cfg, list, &h)?;
        let names: Vec<String> = sent.iter().map(|m| m.email.to_string()).collect();
        writeln!(err, "sent {} key(s) to {}", keys.len(), names.join(", "))?;
    }
    if a.out.is_none() && a.mail.is_none() {
        out.write_all(rendered.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

/// The active root's fingerprint (what devices are shown).
fn root_fingerprint(data_dir: &Path) -> anyhow::Result<Fingerprint> {
    let dir = DataDir::new(data_dir);
    match dir.active_keystore()? {
        Some(ks) => Ok(ks.fingerprint()),
        None => Err(Rejected(format!(
            "no keystore in {}: start the gateway once or install one (fleetgate pki install) \
             so the hand-out can carry the root fingerprint",
            data_dir.display()
        ))
        .into()),
    }
}

fn read_text(path: &Path, stdin: &mut dyn BufRead) -> anyhow::Result<String> {
    let mut text = String::new();
    if path == Path::new("-") {
        stdin.read_to_string(&mut text)?;
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| Rejected(format!("cannot read {}: {e}", path.display())))?;
    }
    Ok(text)
}

fn describe(path: &Path) -> String {
    if path == Path::new("-") {
        "standard input".into()
    } else {
        path.display().to_string()
    }
}

fn print_keys(out: &mut dyn Write, keys: &[KeyInfo]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>5}  {:<8}  {:<8}  {:<8}  {:<16}  {:<23}  {:>5}  {:<16}  LAST USED AT",
        "ID", "KIND", "KEY", "STATE", "UNIT", "CREATED", "USES", "LAST USED BY"
    )?;
    for k in keys {
        let state = match (k.state(), k.kind) {
            (crate::registry::KeyState::Used, KeyKind::Mass) => "in use",
            (s, _) => s.as_str(),
        };
        writeln!(
            out,
            "{:>5}  {:<8}  {:<8}  {:<8}  {:<16}  {:<23}  {:>5}  {:<16}  {}",
            k.id,
            k.kind.as_str(),
            k.prefix,
            state,
            k.unit_id.as_deref().unwrap_or("-"),
            format_time(k.created_at),
            k.use_count,
            k.last_used_by.as_deref().unwrap_or("-"),
            k.last_used_at.map_or_else(|| "-".to_owned(), format_time),
        )?;
    }
    if keys.is_empty() {
        writeln!(out, "(no keys)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;
    use crate::export::PublicGateway;

    #[derive(Parser, Debug)]
    struct Wrapper {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Subcommand, Debug)]
    enum Top {
        #[command(subcommand)]
        Keys(KeysCommand),
    }

    fn parse(args: &[&str]) -> Result<KeysCommand, clap::Error> {
        let mut all = vec!["fleetgate", "keys"];
        all.extend_from_slice(args);
        Wrapper::try_parse_from(all).map(|w| match w.cmd {
            Top::Keys(k) => k,
        })
    }

    struct Run {
        code: u8,
        out: String,
        err: String,
    }

    fn run_in(dir: &Path, args: &[&str], stdin: &str, handout: &HandoutConfig) -> Run {
        let cmd = parse(args).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_with(
            cmd,
            dir,
            handout,
            None,
            &mut stdin.as_bytes(),
            &mut out,
            &mut err,
        );
        Run {
            code,
            out: String::from_utf8(out).unwrap(),
            err: String::from_utf8(err).unwrap(),
        }
    }

    fn no_handout() -> HandoutConfig {
        HandoutConfig::default()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Wrapper::command().debug_assert();
        assert!(parse(&["create"]).is_err(), "one of the kinds is required");
        assert!(parse(&["create", "--one-time", "2", "--mass"]).is_err());
        assert!(
            parse(&["create", "--value", "x"]).is_err(),
            "--value needs --mass"
        );
        assert!(parse(&["create", "--unit", "A", "--unit", "B"]).is_ok());
        assert!(parse(&["list", "--used", "--revoked"]).is_err());
        assert!(parse(&["export"]).is_err());
        assert!(parse(&["export", "K", "--format", "pdf"]).is_err());
    }

    #[test]
    fn create_prints_only_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let r = run_in(
            dir.path(),
            &["create", "--one-time", "3"],
            "",
            &no_handout(),
        );
        assert_eq!(r.code, 0, "{}", r.err);
        let lines: Vec<&str> = r.out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines
                .iter()
                .all(|l| l.len() == 24 && l.matches('-').count() == 4)
        );
        assert!(r.err.contains("created 3 one-time key(s)"));

        let r = run_in(
            dir.path(),
            &["create", "--unit", "00E0C5000001", "--unit", "00E0C5000002"],
            "",
            &no_handout(),
        );
        assert_eq!((r.code, r.out.lines().count()), (0, 2), "{}", r.err);
        let r = run_in(
            dir.path(),
            &["create", "--mass", "--value", "Kiosk-Rollout-2025"],
            "",
            &no_handout(),
        );
        assert_eq!((r.code, r.out.as_str()), (0, "Kiosk-Rollout-2025\n"));
        // The same value again is refused with exit code 2, and nothing goes to stdout.
        let r = run_in(
            dir.path(),
            &["create", "--mass", "--value", "kiosk rollout 2025"],
            "",
            &no_handout(),
        );
        assert_eq!((r.code, r.out.as_str()), (2, ""));
        assert!(r.err.contains("already in use"), "{}", r.err);

        let r = run_in(dir.path(), &["list"], "", &no_handout());
        assert_eq!(r.code, 0);
        assert_eq!(r.out.lines().count(), 1 + 6, "{}", r.out);
        assert!(r.out.contains("00E0C5000002") && r.out.contains("mass"));
    }

    #[test]
    fn csv_import_reports_bad_lines_and_imports_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("units.csv");
        std::fs::write(
            &csv,
            "site,unit_id\nBerlin,U-1\nParis,\nRome,U 3\nOslo,U-4\n",
        )
        .unwrap();
        let r = run_in(
            dir.path(),
            &["create", "--csv", csv.to_str().unwrap()],
            "",
            &no_handout(),
        );
        assert_eq!((r.code, r.out.as_str()), (2, ""), "{}", r.err);
        assert!(
            r.err.contains("line 3:") && r.err.contains("line 4:"),
            "{}",
            r.err
        );
        assert!(!r.err.contains("line 2:") && !r.err.contains("line 5:"));
        let list = run_in(dir.path(), &["list"], "", &no_handout());
        assert!(list.out.contains("(no keys)"), "{}", list.out);

        // From stdin, one per line.
        let r = run_in(
            dir.path(),
            &["create", "--csv", "-"],
            "U-1\nU-2\n",
            &no_handout(),
        );
        assert_eq!((r.code, r.out.lines().count()), (0, 2), "{}", r.err);
    }

    #[test]
    fn revoke_and_delete_by_value_or_id() {
        let dir = tempfile::tempdir().unwrap();
        let r = run_in(
            dir.path(),
            &["create", "--one-time", "2"],
            "",
            &no_handout(),
        );
        let keys: Vec<&str> = r.out.lines().collect();
        let r = run_in(dir.path(), &["revoke", keys[0]], "", &no_handout());
        assert_eq!(r.code, 0, "{}", r.err);
        assert!(r.out.starts_with("revoked key #1"));
        let r = run_in(dir.path(), &["delete", "#2"], "", &no_handout());
        assert!(r.out.starts_with("deleted key #2"), "{}", r.err);
        let r = run_in(dir.path(), &["delete", "2"], "", &no_handout());
        assert_eq!(r.code, 2);
        assert!(r.err.contains("no such key: #2"));
        let r = run_in(dir.path(), &["list", "--revoked"], "", &no_handout());
        assert_eq!(r.out.lines().count(), 2, "{}", r.out);
    }

    #[test]
    fn export_checks_keys_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let created = run_in(
            dir.path(),
            &["create", "--one-time", "2"],
            "",
            &no_handout(),
        );
        let keys: Vec<String> = created.out.lines().map(str::to_owned).collect();
        let handout = HandoutConfig {
            gateways: vec![PublicGateway {
                host: "gw.example.com".into(),
                port: 8443,
            }],
        };
        // No keystore yet: a clear refusal.
        let r = run_in(dir.path(), &["export", &keys[0]], "", &handout);
        assert_eq!(r.code, 2);
        assert!(r.err.contains("no keystore"), "{}", r.err);

        let boot = crate::pki::bootstrap(dir.path(), &[]).unwrap();
        // No gateways configured.
        let r = run_in(dir.path(), &["export", &keys[0]], "", &no_handout());
        assert_eq!(r.code, 2);
        assert!(r.err.contains("no public gateway address"), "{}", r.err);
        // Unknown key.
        let r = run_in(
            dir.path(),
            &["export", "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ"],
            "",
            &handout,
        );
        assert_eq!(r.code, 2);
        assert!(r.err.contains("no such key: ZZZZ-…"), "{}", r.err);

        // Text to stdout, keys from stdin.
        let r = run_in(dir.path(), &["export", "-"], &created.out, &handout);
        assert_eq!(r.code, 0, "{}", r.err);
        let parts = boot.fingerprint.parts();
        assert!(r.out.contains(&format!("Fingerprint Part 3: {}", parts[2])));
        assert!(r.out.contains(&format!("Key: {}", keys[1])));
        assert_eq!(r.out.matches("Host: gw.example.com").count(), 2);

        // XML to a private file.
        let file = dir.path().join("icg.xml");
        let r = run_in(
            dir.path(),
            &[
                "export",
                &keys[0],
                "--format",
                "xml",
                "--out",
                file.to_str().unwrap(),
            ],
            "",
            &handout,
        );
        assert_eq!((r.code, r.out.as_str()), (0, ""), "{}", r.err);
        let xml = std::fs::read_to_string(&file).unwrap();
        assert!(xml.contains(&format!("<key>{}</key>", keys[0])));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // --mail without a [mail] section.
        let r = run_in(
            dir.path(),
            &["export", &keys[0], "--mail", "a@x.example"],
            "",
            &handout,
        );
        assert_eq!(r.code, 2);
        assert!(r.err.contains("[mail]"), "{}", r.err);

        // A revoked key is not handed out.
        run_in(dir.path(), &["revoke", &keys[1]], "", &handout);
        let r = run_in(dir.path(), &["export", &keys[1]], "", &handout);
        assert_eq!(r.code, 2);
        assert!(r.err.contains("is revoked"), "{}", r.err);
    }
}
