//! `fleetgate agent`: the device agent from the command line. A thin layer over
//! [`crate::agent`].
//!
//! ```text
//! fleetgate agent --gateway gw.example.com --unit-id kiosk-17      # register, then stay connected
//! fleetgate agent --email jo@example.com --unit-id kiosk-17        # gateway from DNS TXT
//! fleetgate agent                                                  # registered: just connect
//! fleetgate agent --disable | --enable                            # gateway use off / on
//! fleetgate agent --exec-hook /usr/local/lib/fleetgate/hook --receive-dir /srv/inbox
//!                 --shell /bin/bash --vnc-port 5901               # relay settings (saved)
//! ```
//!
//! The relay settings (`--receive-dir`, `--exec-hook`/`--no-exec-hook`, `--exec-timeout`,
//! `--shell`, `--vnc-port`) are saved in agent.toml before anything else happens, so they
//! also apply to later runs without the flags.
//!
//! Standard output carries exactly one line, `connection ready`, each time a session becomes
//! ready; everything else (the fingerprint question, progress, errors) goes to standard error.
//! The fingerprint parts and the missing part, and the key, are read from standard input
//! unless `--fingerprint` / `--key` are given.
//!
//! Exit codes: 0 when stopped (SIGINT/SIGTERM), after `--once`, when gateway use is disabled,
//! or after `--disable`/`--enable`; 1 on any error (a refusal prints its reason code and the
//! gateway's message).

#![forbid(unsafe_code)]

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::agent::{
    AgentError, AgentEvent, AgentOptions, AgentState, Connector, FingerprintChallenge,
    FirstContact, RegisterRequest, RunOutcome, StopHandle, prompt,
};

/// `fleetgate agent` arguments.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Gateway to register with: HOST, HOST:PORT (default port 8443, path /usg/endpoint) or a
    /// wss:// URL. Repeat for fallback gateways, in order of preference.
    #[arg(long = "gateway", value_name = "HOST[:PORT]")]
    pub gateways: Vec<String>,
    /// Find the gateway from an e-mail address: DNS TXT record `igel-cloud-gateway.<domain>`.
    #[arg(long, value_name = "USER@DOMAIN", conflicts_with = "gateways")]
    pub email: Option<String>,
    /// Name server (IP:PORT) for --email instead of the system's resolvers.
    #[arg(long, value_name = "IP:PORT", requires = "email")]
    pub dns_server: Option<SocketAddr>,
    /// The device's unit ID (needed to register; remembered in the state directory).
    #[arg(long, value_name = "ID")]
    pub unit_id: Option<String>,
    /// State directory: agent.toml, device key and credential (0600).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "fleetgate-agent",
        env = "FLEETGATE_AGENT_DIR"
    )]
    pub state_dir: PathBuf,
    /// The gateway's full root fingerprint (64 hex digits, or "Part 1: … Part 4: …"), for
    /// scripts; without it three parts are shown and the missing one is asked for.
    #[arg(long, value_name = "FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// The first-authentication key, for scripts; without it the key is asked for.
    #[arg(
        long,
        value_name = "KEY",
        env = "FLEETGATE_AGENT_KEY",
        hide_env_values = true
    )]
    pub key: Option<String>,
    /// Exit (0) once the connection is ready.
    #[arg(long)]
    pub once: bool,
    /// Switch gateway use off in agent.toml (the credential is kept) and exit.
    #[arg(long, conflicts_with = "enable")]
    pub disable: bool,
    /// Switch gateway use on in agent.toml and exit.
    #[arg(long)]
    pub enable: bool,
    /// Directory that file pushes are written into (saved in agent.toml; default
    /// STATE_DIR/received).
    #[arg(long, value_name = "DIR")]
    pub receive_dir: Option<PathBuf>,
    /// Executable run for `exec` requests, with the command name and its arguments as argv
    /// (saved in agent.toml). Without one, exec is disabled.
    #[arg(long, value_name = "PATH", conflicts_with = "no_exec_hook")]
    pub exec_hook: Option<PathBuf>,
    /// Remove the exec hook from agent.toml (exec disabled).
    #[arg(long)]
    pub no_exec_hook: bool,
    /// Time limit of one exec in seconds (saved in agent.toml; default 60).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub exec_timeout: Option<u64>,
    /// Shell of terminal sessions (saved in agent.toml; default /bin/sh).
    #[arg(long, value_name = "PATH")]
    pub shell: Option<PathBuf>,
    /// Local VNC port that shadowing connects to on 127.0.0.1 (saved in agent.toml; default
    /// 5900).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub vnc_port: Option<u16>,
    /// Reconnect backoff base in milliseconds (tests).
    #[arg(long, value_name = "MS", hide = true, default_value_t = 1000)]
    pub backoff_base_ms: u64,
    /// Reconnect backoff cap in milliseconds (tests).
    #[arg(long, value_name = "MS", hide = true, default_value_t = 300_000)]
    pub backoff_cap_ms: u64,
    /// Re-probe interval of the first gateway in milliseconds (tests).
    #[arg(long, value_name = "MS", hide = true, default_value_t = 180_000)]
    pub reprobe_ms: u64,
}

impl AgentArgs {
    fn options(&self) -> AgentOptions {
        let mut o = AgentOptions::default();
        o.backoff.base = Duration::from_millis(self.backoff_base_ms.max(1));
        o.backoff.cap = Duration::from_millis(self.backoff_cap_ms.max(self.backoff_base_ms));
        o.reprobe_interval = Duration::from_millis(self.reprobe_ms.max(1));
        o.once = self.once;
        o
    }
}

/// Runs `fleetgate agent` on the process's standard streams, stopping on SIGINT/SIGTERM.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let stop = StopHandle::new();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.flag()).context("signal handler")?;
    }
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    Ok(ExitCode::from(run_with(
        &args, &mut input, &mut out, &mut err, &stop,
    )))
}

/// [`run`] with explicit streams and stop handle; returns the exit code (0 or 1).
pub fn run_with(
    args: &AgentArgs,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
    stop: &StopHandle,
) -> u8 {
    match execute(args, input, out, err, stop) {
        Ok(()) => 0,
        Err(e) => {
            match e.downcast_ref::<AgentError>() {
                Some(AgentError::Refused(r)) => {
                    let _ = writeln!(err, "error: the gateway refused: {}", r.message);
                    let _ = writeln!(err, "reason: {}", r.reason);
                    if let Some(advice) = r.advice() {
                        let _ = writeln!(err, "{advice}");
                    }
                }
                _ => {
                    let _ = writeln!(err, "error: {e:#}");
                }
            }
            1
        }
    }
}

fn execute(
    args: &AgentArgs,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
    stop: &StopHandle,
) -> anyhow::Result<()> {
    let mut state = AgentState::open(&args.state_dir)?;
    let dir = args.state_dir.display();
    if apply_relay_settings(args, &mut state)? {
        state.save()?;
        writeln!(err, "relay settings saved in {dir}/agent.toml")?;
    }
    if args.disable || args.enable {
        state.set_enabled(args.enable)?;
        writeln!(
            err,
            "gateway use {} in {dir}/agent.toml{}",
            if args.enable { "enabled" } else { "disabled" },
            if state.has_credential() {
                " (the credential is kept)"
            } else {
                ""
            }
        )?;
        return Ok(());
    }
    if !state.config.enabled {
        writeln!(
            err,
            "gateway use is disabled in {dir}/agent.toml (fleetgate agent --enable turns it on); \
             not connecting"
        )?;
        return Ok(());
    }
    let options = args.options();
    // A registration that the gateway continued as the session is the first session.
    let first = if state.has_credential() {
        if !args.gateways.is_empty() || args.email.is_some() || args.key.is_some() {
            writeln!(
                err,
                "already registered (credential in {dir}); connecting to the stored gateways \
                 (--gateway, --email and --key are ignored)"
            )?;
        }
        None
    } else {
        let session = register_interactively(args, &mut state, &options, input, err, stop)?;
        if stop.is_stopped() {
            return Ok(());
        }
        session
    };
    let outcome = crate::agent::run_from(
        &mut state,
        &options,
        stop,
        &mut |event| {
            report(&event, out, err);
        },
        first,
    )?;
    match outcome {
        RunOutcome::Stopped => writeln!(err, "stopped")?,
        RunOutcome::Ready => {}
        RunOutcome::Disabled => writeln!(
            err,
            "gateway use is disabled in {dir}/agent.toml; disconnected"
        )?,
    }
    Ok(())
}

/// Copies the relay flags into `state.config`; true when anything was given.
fn apply_relay_settings(args: &AgentArgs, state: &mut AgentState) -> anyhow::Result<bool> {
    let absolute = |p: &PathBuf, what: &str| -> anyhow::Result<PathBuf> {
        std::path::absolute(p).with_context(|| format!("{what} {}", p.display()))
    };
    let mut changed = false;
    let c = &mut state.config;
    if let Some(d) = &args.receive_dir {
        c.receive_dir = Some(absolute(d, "--receive-dir")?);
        changed = true;
    }
    if let Some(h) = &args.exec_hook {
        let h = absolute(h, "--exec-hook")?;
        if !h.is_file() {
            bail!("--exec-hook {}: no such file", h.display());
        }
        c.exec_hook = Some(h);
        changed = true;
    }
    if args.no_exec_hook {
        c.exec_hook = None;
        changed = true;
    }
    if let Some(t) = args.exec_timeout {
        c.exec_timeout_secs = t;
        changed = true;
    }
    if let Some(sh) = &args.shell {
        c.shell = Some(absolute(sh, "--shell")?);
        changed = true;
    }
    if let Some(p) = args.vnc_port {
        c.vnc_port = p;
        changed = true;
    }
    Ok(changed)
}

fn report(event: &AgentEvent, out: &mut dyn Write, err: &mut dyn Write) {
    let _ = match event {
        AgentEvent::Ready { unit_id, connector } => {
            let _ = writeln!(out, "connection ready");
            let _ = out.flush();
            writeln!(err, "connected to {connector} as {unit_id}")
        }
        AgentEvent::Connecting { connector } => writeln!(err, "connecting to {connector}"),
        AgentEvent::ConnectFailed { error, .. } => writeln!(err, "connection failed: {error}"),
        AgentEvent::Refused { connector, refusal } => {
            writeln!(err, "{connector} refused: {refusal}")
        }
        AgentEvent::Disconnected { connector, reason } => {
            writeln!(err, "disconnected from {connector}: {reason}")
        }
        AgentEvent::Waiting { delay } => {
            writeln!(err, "retrying in {:.1} s", delay.as_secs_f64())
        }
        AgentEvent::SettingsDropped => writeln!(
            err,
            "the device was removed: gateway settings and credential deleted"
        ),
        AgentEvent::CredentialDropped => writeln!(err, "the device credential was deleted"),
        AgentEvent::Disabled => Ok(()),
    };
}

/// The connectors from --gateway / --email, else the stored ones.
fn connectors(args: &AgentArgs, state: &AgentState) -> anyhow::Result<Vec<Connector>> {
    if let Some(email) = &args.email {
        let config = crate::discovery::DiscoveryConfig {
            nameserver: args.dns_server,
            ..Default::default()
        };
        let found = crate::discovery::discover(email, &config)?;
        return Ok(found
            .into_iter()
            .map(|g| Connector {
                host: g.host,
                port: g.port,
                path: g.path,
            })
            .collect());
    }
    if !args.gateways.is_empty() {
        let mut list: Vec<Connector> = Vec::new();
        for g in &args.gateways {
            let c = Connector::parse(g)?;
            if !list.contains(&c) {
                list.push(c);
            }
        }
        return Ok(list);
    }
    if state.config.connectors.is_empty() {
        return Err(AgentError::NoConnectors.into());
    }
    Ok(state.config.connectors.clone())
}

fn register_interactively(
    args: &AgentArgs,
    state: &mut AgentState,
    options: &AgentOptions,
    input: &mut dyn BufRead,
    err: &mut dyn Write,
    stop: &StopHandle,
) -> anyhow::Result<Option<crate::agent::Session>> {
    let connectors = connectors(args, state)?;
    let unit_id = match args.unit_id.as_deref().or(state.config.unit_id.as_deref()) {
        Some(u) if !u.trim().is_empty() => u.trim().to_owned(),
        _ => bail!("--unit-id is required to register this device"),
    };

    // First contact: the first gateway that answers.
    let mut contact: Option<FirstContact> = None;
    let mut failures = Vec::new();
    for c in &connectors {
        writeln!(err, "connecting to {c}")?;
        match crate::agent::fetch_fingerprint(c, options) {
            Ok(found) => {
                contact = Some(found);
                break;
            }
            Err(e @ AgentError::Chain { .. }) => return Err(e.into()),
            Err(e) => {
                writeln!(err, "  {e}")?;
                failures.push(e.to_string());
            }
        }
    }
    let Some(contact) = contact else {
        bail!("no gateway answered: {}", failures.join("; "));
    };
    confirm(args, state, &contact, input, err)?;
    state.adopt(&contact)?;
    // The order given is the order of preference, whichever answered first now.
    state.config.connectors = connectors;
    state.config.unit_id = Some(unit_id.clone());
    state.save()?;

    let interactive_key = args.key.is_none();
    for attempt in 1..=3 {
        let key = match &args.key {
            Some(k) => k.clone(),
            None => ask(input, err, "Key: ")?,
        };
        if key.trim().is_empty() {
            bail!("no key given");
        }
        let request = RegisterRequest {
            connector: contact.connector.clone(),
            unit_id: unit_id.clone(),
            key,
        };
        match crate::agent::register(state, &request, options, stop) {
            Ok(r) => {
                writeln!(
                    err,
                    "registered as {} with {} (credential valid until {})",
                    r.unit_id,
                    r.connector,
                    crate::pki::cert::format_time(r.not_after)
                )?;
                return Ok(r.session);
            }
            Err(AgentError::Stopped) => return Ok(None),
            Err(AgentError::Refused(r))
                if interactive_key && r.reason == "key_unknown" && attempt < 3 =>
            {
                writeln!(err, "{} ({}); type it again", r.message, r.reason)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// The fingerprint step (§5.2): nothing for a system-trusted chain or an already pinned root,
/// a comparison for --fingerprint, else the question for a random part.
fn confirm(
    args: &AgentArgs,
    state: &AgentState,
    contact: &FirstContact,
    input: &mut dyn BufRead,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    if contact.system_trusted {
        writeln!(
            err,
            "the gateway's certificate is trusted by the system's roots (no fingerprint check)"
        )?;
        return Ok(());
    }
    let mismatch = || AgentError::FingerprintMismatch {
        presented: contact.fingerprint.to_string(),
    };
    if let Some(given) = &args.fingerprint {
        if prompt::parse_full(given).is_none() {
            bail!("--fingerprint {given:?} is not 64 hex digits");
        }
        if !prompt::matches_full(&contact.fingerprint, given) {
            return Err(mismatch().into());
        }
        return Ok(());
    }
    if state.config.trust == Some(contact.trust()) {
        writeln!(err, "the gateway's root is the one pinned before")?;
        return Ok(());
    }
    let challenge = FingerprintChallenge::random(contact.fingerprint);
    if !challenge.ask(input, err)? {
        return Err(mismatch().into());
    }
    Ok(())
}

fn ask(input: &mut dyn BufRead, err: &mut dyn Write, question: &str) -> anyhow::Result<String> {
    write!(err, "{question}")?;
    err.flush()?;
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        bail!("no answer on standard input (use --key for scripts)");
    }
    Ok(line.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn parse(argv: &[&str]) -> Result<AgentArgs, clap::Error> {
        Wrap::try_parse_from(std::iter::once("agent").chain(argv.iter().copied())).map(|w| w.args)
    }

    #[test]
    fn arguments() {
        let a = parse(&[
            "--gateway",
            "gw1",
            "--gateway",
            "gw2:9443",
            "--unit-id",
            "U",
        ])
        .unwrap();
        assert_eq!(a.gateways, ["gw1", "gw2:9443"]);
        assert_eq!(a.state_dir, PathBuf::from("fleetgate-agent"));
        assert!(parse(&["--gateway", "gw", "--email", "a@b.example"]).is_err());
        assert!(parse(&["--disable", "--enable"]).is_err());
        assert!(parse(&["--dns-server", "127.0.0.1:53"]).is_err());
        let o = parse(&["--backoff-base-ms", "10", "--once"])
            .unwrap()
            .options();
        assert_eq!(o.backoff.base, Duration::from_millis(10));
        assert!(o.once);
    }

    #[test]
    fn disable_enable_and_disabled_run() {
        let dir = tempfile::tempdir().unwrap();
        let sd = dir.path().join("st");
        let sds = sd.to_str().unwrap();
        let stop = StopHandle::new();
        let run = |argv: &[&str]| {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = run_with(
                &parse(argv).unwrap(),
                &mut "".as_bytes(),
                &mut out,
                &mut err,
                &stop,
            );
            (
                code,
                String::from_utf8(out).unwrap(),
                String::from_utf8(err).unwrap(),
            )
        };
        let (code, out, err) = run(&["--state-dir", sds, "--disable"]);
        assert_eq!((code, out.as_str()), (0, ""), "{err}");
        assert!(err.contains("disabled"), "{err}");
        let (code, out, err) = run(&["--state-dir", sds, "--gateway", "127.0.0.1:1"]);
        assert_eq!((code, out.as_str()), (0, ""));
        assert!(err.contains("gateway use is disabled"), "{err}");
        let (code, _, _) = run(&["--state-dir", sds, "--enable"]);
        assert_eq!(code, 0);
        assert!(AgentState::open(&sd).unwrap().config.enabled);
        // Relay settings are saved (here with --enable, which exits right after).
        let hook = dir.path().join("hook");
        std::fs::write(&hook, "#!/bin/sh\n").unwrap();
        let inbox = dir.path().join("inbox");
        let (code, _, err) = run(&[
            "--state-dir",
            sds,
            "--enable",
            "--exec-hook",
            hook.to_str().unwrap(),
            "--receive-dir",
            inbox.to_str().unwrap(),
            "--shell",
            "/bin/bash",
            "--vnc-port",
            "5999",
            "--exec-timeout",
            "7",
        ]);
        assert_eq!(code, 0, "{err}");
        let c = AgentState::open(&sd).unwrap().config;
        assert_eq!(c.exec_hook.as_deref(), Some(hook.as_path()));
        assert_eq!(c.receive_dir.as_deref(), Some(inbox.as_path()));
        assert_eq!(c.shell.as_deref(), Some(std::path::Path::new("/bin/bash")));
        assert_eq!((c.vnc_port, c.exec_timeout_secs), (5999, 7));
        let (code, _, _) = run(&["--state-dir", sds, "--enable", "--no-exec-hook"]);
        assert_eq!(code, 0);
        assert_eq!(AgentState::open(&sd).unwrap().config.exec_hook, None);
        let (code, _, err) = run(&[
            "--state-dir",
            sds,
            "--enable",
            "--exec-hook",
            "/nonexistent/x",
        ]);
        assert_eq!(code, 1);
        assert!(err.contains("no such file"), "{err}");
        // Enabled, not registered, no unit ID: a clear error.
        let (code, out, err) = run(&["--state-dir", sds, "--gateway", "127.0.0.1:1"]);
        assert_eq!((code, out.as_str()), (1, ""));
        assert!(err.contains("--unit-id is required"), "{err}");
        // No gateway at all.
        let (code, _, err) = run(&["--state-dir", sds, "--unit-id", "U"]);
        assert_eq!(code, 1);
        assert!(err.contains("no gateway configured"), "{err}");
    }
}
