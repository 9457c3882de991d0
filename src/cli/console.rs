//! `fleetgate console …`: the management console, a command-line management server over
//! [`crate::client`].
//!
//! ```text
//! fleetgate console --gateway wss://gw:8443 --cert ops.pem --key ops.key --ca gateway-root.pem devices
//! fleetgate console … send 00E0C5A1B2C3 ping
//! fleetgate console … send 00E0C5A1B2C3 '{"method":"exec","params":{"command":"reboot"}}'
//! fleetgate console … terminal 00E0C5A1B2C3
//! fleetgate console … shadow 00E0C5A1B2C3 --listen 127.0.0.1:5901
//! fleetgate console … push 00E0C5A1B2C3 firmware.bin firmware/next.bin
//! fleetgate console --gateway wss://gw1 --gateway wss://gw2 … limit 5000 --global
//! ```
//!
//! Human output on standard output by default, `--json` for scripts (one JSON document, or
//! JSON lines for `events`). Errors go to standard error with their protocol code; the exit
//! code is 1.

#![forbid(unsafe_code)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::client::{ClientOptions, ManagementClient, ProxyConfig};

/// `fleetgate console` options and command.
#[derive(Debug, Args)]
#[command(
    after_help = "Certificates come from `fleetgate mgmt add NAME --out DIR` on the gateway \
host: --cert DIR/NAME.pem --key DIR/NAME.key --ca DIR/gateway-root.pem."
)]
pub struct ConsoleArgs {
    /// The gateway: wss://HOST[:PORT][/PATH] (port 8443 and path /usg/management by default).
    /// Repeat it for `limit --global`; other commands use the first one. The connection
    /// options (--gateway, --cert, --key, --ca, --proxy, --proxy-user) go before the command.
    #[arg(long = "gateway", value_name = "URL", env = "FLEETGATE_GATEWAY")]
    pub gateways: Vec<String>,
    /// The management client certificate (PEM).
    #[arg(long, value_name = "FILE", env = "FLEETGATE_MGMT_CERT")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", env = "FLEETGATE_MGMT_KEY")]
    pub key: Option<PathBuf>,
    /// The gateway's root certificate to trust (gateway-root.pem) [default: the system roots].
    #[arg(long, value_name = "FILE", env = "FLEETGATE_MGMT_CA")]
    pub ca: Option<PathBuf>,
    /// Reach the gateway through this HTTP proxy (CONNECT): http://[USER:PASS@]HOST:PORT.
    #[arg(long, value_name = "URL", env = "FLEETGATE_PROXY")]
    pub proxy: Option<String>,
    /// Basic authentication for the proxy, USER:PASS (instead of putting it in --proxy).
    #[arg(long, value_name = "USER:PASS", env = "FLEETGATE_PROXY_USER")]
    pub proxy_user: Option<String>,
    /// Machine-readable output: JSON (JSON lines for `events`).
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for an answer.
    #[arg(long, value_name = "SECS", default_value_t = 30, global = true)]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: ConsoleCommand,
}

/// A console command.
#[derive(Debug, Subcommand)]
pub enum ConsoleCommand {
    /// List devices: unit ID, state, connected, since, address.
    Devices,
    /// Send a request to a device and print its answer. REQUEST is a method name (`ping`,
    /// `info`) or JSON {"method": "...", "params": {...}}.
    Send {
        /// The device's unit ID.
        unit: String,
        /// A method name or a JSON request.
        request: String,
    },
    /// Open an interactive terminal (a shell on a PTY on the device). The local terminal is
    /// put in raw mode until the session ends; Ctrl-] ends it from this side.
    Terminal {
        /// The device's unit ID.
        unit: String,
    },
    /// Forward a local TCP port to the device's VNC server (127.0.0.1:5900 on the device): each
    /// connection to --listen is one shadowing stream. Runs until Ctrl-C.
    Shadow {
        /// The device's unit ID.
        unit: String,
        /// Local address to listen on (point the VNC viewer there).
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:5901")]
        listen: SocketAddr,
    },
    /// Push a file to a device (streamed, SHA-256 checked, atomically renamed on the device).
    Push {
        /// The device's unit ID.
        unit: String,
        /// The local file.
        file: PathBuf,
        /// The file name on the device, relative to its receive directory.
        dest: String,
    },
    /// Move a device to another gateway. The agent first connects and authenticates there;
    /// if that fails it stays here and the error says why.
    Move {
        /// The device's unit ID.
        unit: String,
        /// The new gateway (HOST[:PORT] or wss:// URL).
        #[arg(long, value_name = "GATEWAY")]
        to: String,
        /// The new gateway's root fingerprint (64 hex digits).
        #[arg(long, value_name = "FP")]
        fingerprint: Option<String>,
        /// A first-authentication key to register with at the new gateway.
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
    },
    /// Remove a device: revoke its credential, disconnect it; its agent drops its settings.
    Remove {
        /// The device's unit ID.
        unit: String,
    },
    /// Show or set the device connection limit (0 = unlimited; lasts until the gateway
    /// restarts).
    Limit {
        /// The new limit; omit to show it.
        max_devices: Option<u64>,
        /// Apply to (or show for) every gateway given with --gateway.
        #[arg(long)]
        global: bool,
    },
    /// First-authentication keys on the gateway.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The gateway's status: health, devices, management connections, limit.
    Status,
    /// Print events (device up, down, registered, removed) as they happen until Ctrl-C.
    Events,
    /// Root exchange: hand the staged root to every connected agent that supports it and
    /// report how many devices lack the new root or the feature.
    Rollover,
}

/// `console keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create keys: --one-time N, --unit UNIT (repeatable), or --mass [--value V].
    Create {
        /// N one-time keys.
        #[arg(long, value_name = "N", conflicts_with_all = ["units", "mass"])]
        one_time: Option<u64>,
        /// A key bound to this unit (repeat for several).
        #[arg(long = "unit", value_name = "UNIT", conflicts_with = "mass")]
        units: Vec<String>,
        /// A mass-deployment key.
        #[arg(long)]
        mass: bool,
        /// The mass-deployment key's value (random if omitted).
        #[arg(long, requires = "mass")]
        value: Option<String>,
    },
    /// List keys.
    List,
    /// Revoke a key (its value, or #ID).
    Revoke {
        /// The key value or #ID.
        #[arg(value_name = "KEY")]
        key_ref: String,
    },
    /// Export keys as a hand-out.
    Export {
        /// Key values or #IDs.
        #[arg(required = true)]
        keys: Vec<String>,
        /// Format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Text)]
        format: ExportFormat,
        /// Write to FILE instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// Hand-out formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// Plain text.
    Text,
    /// XML.
    Xml,
    /// HTML.
    Html,
}

impl ConsoleArgs {
    fn options(&self, url: &str) -> anyhow::Result<ClientOptions> {
        let cert = self
            .cert
            .clone()
            .context("--cert is required (the management certificate from `fleetgate mgmt add`)")?;
        let key = self.key.clone().context("--key is required")?;
        let mut o = ClientOptions::new(url, cert, key);
        o.ca = self.ca.clone();
        o.proxy = match &self.proxy {
            Some(url) => {
                let (username, password) = match &self.proxy_user {
                    Some(up) => match up.split_once(':') {
                        Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
                        None => (Some(up.clone()), Some(String::new())),
                    },
                    None => (None, None),
                };
                Some(ProxyConfig {
                    url: url.clone(),
                    username,
                    password,
                })
            }
            None => None,
        };
        Ok(o)
    }

    fn connect(&self, url: &str) -> anyhow::Result<ManagementClient> {
        ManagementClient::connect(self.options(url)?)
            .with_context(|| format!("cannot connect to {url}"))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout.max(1))
    }
}

/// Runs `fleetgate console`.
pub fn run(args: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let first = args
        .gateways
        .first()
        .cloned()
        .context("--gateway is required")?;
    match &args.command {
        ConsoleCommand::Limit {
            max_devices,
            global,
        } => limit(&args, *max_devices, *global),
        ConsoleCommand::Terminal { unit } => {
            let c = args.connect(&first)?;
            terminal(&c, unit)
        }
        ConsoleCommand::Shadow { unit, listen } => {
            let c = Arc::new(args.connect(&first)?);
            shadow(c, unit, *listen)
        }
        ConsoleCommand::Events => {
            let c = args.connect(&first)?;
            events(&c, args.json)
        }
        ConsoleCommand::Push { unit, file, dest } => {
            let c = args.connect(&first)?;
            push(&c, unit, file, dest, args.json)
        }
        _ => {
            let c = args.connect(&first)?;
            simple(&args, &c)
        }
    }
}

fn gateway_call(
    c: &ManagementClient,
    method: &str,
    params: Value,
    timeout: Duration,
) -> anyhow::Result<Value> {
    c.request(None, method, params, timeout)
        .with_context(|| format!("{method} failed"))
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn simple(args: &ConsoleArgs, c: &ManagementClient) -> anyhow::Result<ExitCode> {
    let t = args.timeout();
    let json = args.json;
    let mut out = std::io::stdout().lock();
    match &args.command {
        ConsoleCommand::Devices => {
            let r = gateway_call(c, "devices.list", json!({}), t)?;
            if json {
                return print_json(&r).map(|()| ExitCode::SUCCESS);
            }
            let list = r["devices"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                writeln!(out, "no devices")?;
            } else {
                writeln!(
                    out,
                    "{:<24} {:<11} {:<9} {:<20} ADDRESS",
                    "UNIT", "STATE", "CONNECTED", "SINCE"
                )?;
                for d in &list {
                    let since = match &d["since"] {
                        Value::Number(n) => n
                            .as_i64()
                            .map(crate::pki::cert::format_time)
                            .unwrap_or_else(|| n.to_string()),
                        other => s(other),
                    };
                    writeln!(
                        out,
                        "{:<24} {:<11} {:<9} {:<20} {}",
                        s(&d["unit_id"]),
                        s(&d["state"]),
                        if d["connected"].as_bool() == Some(true) {
                            "yes"
                        } else {
                            "no"
                        },
                        since,
                        s(&d["address"])
                    )?;
                }
            }
        }
        ConsoleCommand::Send { unit, request } => {
            let (method, params) = parse_request(request)?;
            let r = c
                .request(Some(unit), &method, params, t)
                .with_context(|| format!("{method} on {unit} failed"))?;
            if json {
                print_json(&r)?;
            } else {
                match &r {
                    Value::Object(m) if m.contains_key("stdout") => {
                        // exec: show the output as it is.
                        write!(out, "{}", r["stdout"].as_str().unwrap_or(""))?;
                        eprint!("{}", r["stderr"].as_str().unwrap_or(""));
                        if let Some(code) = r["exit_code"].as_i64() {
                            if code != 0 {
                                eprintln!("(exit code {code})");
                                return Ok(ExitCode::from(code.clamp(1, 255) as u8));
                            }
                        }
                    }
                    _ => print_json(&r)?,
                }
            }
        }
        ConsoleCommand::Move {
            unit,
            to,
            fingerprint,
            key,
        } => {
            let mut p = json!({"gateway": to});
            if let Some(f) = fingerprint {
                p["fingerprint"] = json!(f.replace([' ', ':', '-'], ""));
            }
            if let Some(k) = key {
                p["key"] = json!(k);
            }
            // The agent connects and authenticates at the new gateway before it answers.
            let r = c
                .request(Some(unit), "move", p, t.max(Duration::from_secs(120)))
                .with_context(|| format!("moving {unit} to {to} failed; it stays here"))?;
            if json {
                print_json(&r)?;
            } else {
                writeln!(out, "{unit} moved to {to}")?;
            }
        }
        ConsoleCommand::Remove { unit } => {
            let r = gateway_call(c, "device.remove", json!({"unit_id": unit}), t)?;
            if json {
                print_json(&r)?;
            } else {
                writeln!(
                    out,
                    "removed {unit}: {} credential(s) revoked",
                    s(&r["revoked"])
                )?;
            }
        }
        ConsoleCommand::Keys(k) => keys(c, k, json, t, &mut out)?,
        ConsoleCommand::Status => {
            let r = gateway_call(c, "status", json!({}), t)?;
            if json {
                print_json(&r)?;
            } else if let Value::Object(m) = &r {
                writeln!(out, "gateway       {}", c.hello().gateway)?;
                for (k, v) in m {
                    writeln!(out, "{k:<13} {}", s(v))?;
                }
                // The status word is /usg/check-status's, recomputed at most every 30 s.
                if m.get("status").and_then(Value::as_str) == Some("warn")
                    && m.get("management").and_then(Value::as_u64).unwrap_or(0) > 0
                {
                    writeln!(
                        out,
                        "(the status is recomputed at most every 30 s: `warn` means no management \
                         server was connected at the last check; it turns `ok` at the next one)"
                    )?;
                }
            } else {
                print_json(&r)?;
            }
        }
        ConsoleCommand::Rollover => {
            let r = gateway_call(c, "rollover.offer", json!({}), t)?;
            if json {
                print_json(&r)?;
            } else {
                writeln!(
                    out,
                    "offered the staged root to {} agent(s); {} device(s) lack the new root, {} lack the feature",
                    s(&r["offered"]),
                    s(&r["lacking_root"]),
                    s(&r["lacking_feature"])
                )?;
            }
        }
        _ => unreachable!("handled in run"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `ping` → (`ping`, {}); `{"method": "exec", "params": {…}}` → as given.
pub fn parse_request(input: &str) -> anyhow::Result<(String, Value)> {
    let t = input.trim();
    if t.starts_with('{') {
        let v: Value = serde_json::from_str(t).context("the request is not valid JSON")?;
        let method = v["method"]
            .as_str()
            .context("the JSON request needs a \"method\" string")?
            .to_owned();
        let params = match v.get("params") {
            None | Some(Value::Null) => json!({}),
            Some(p) => p.clone(),
        };
        Ok((method, params))
    } else if !t.is_empty() && !t.contains(char::is_whitespace) {
        Ok((t.to_owned(), json!({})))
    } else {
        anyhow::bail!("expected a method name or a JSON request, not {input:?}")
    }
}

fn keys(
    c: &ManagementClient,
    k: &KeysCommand,
    json: bool,
    t: Duration,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    match k {
        KeysCommand::Create {
            one_time,
            units,
            mass,
            value,
        } => {
            let params = if let Some(n) = one_time {
                json!({"one_time": n})
            } else if !units.is_empty() {
                json!({"units": units})
            } else if *mass {
                match value {
                    Some(v) => json!({"mass": true, "value": v}),
                    None => json!({"mass": true}),
                }
            } else {
                anyhow::bail!("say which keys: --one-time N, --unit UNIT or --mass");
            };
            let r = gateway_call(c, "keys.create", params, t)?;
            if json {
                print_json(&r)?;
            } else {
                for key in r["keys"].as_array().into_iter().flatten() {
                    writeln!(out, "{}", s(key))?;
                }
            }
        }
        KeysCommand::List => {
            let r = gateway_call(c, "keys.list", json!({}), t)?;
            if json {
                print_json(&r)?;
            } else {
                writeln!(
                    out,
                    "{:<6} {:<9} {:<9} {:<20} {:<20} USED AT",
                    "ID", "KIND", "STATE", "UNIT", "USED BY"
                )?;
                for key in r["keys"].as_array().into_iter().flatten() {
                    let used_at = match &key["used_at"] {
                        Value::Number(n) => n
                            .as_i64()
                            .map(crate::pki::cert::format_time)
                            .unwrap_or_default(),
                        other => s(other),
                    };
                    writeln!(
                        out,
                        "{:<6} {:<9} {:<9} {:<20} {:<20} {}",
                        s(&key["id"]),
                        s(&key["kind"]),
                        s(&key["state"]),
                        s(&key["unit_id"]),
                        s(&key["used_by"]),
                        used_at
                    )?;
                }
            }
        }
        KeysCommand::Revoke { key_ref } => {
            let r = gateway_call(c, "keys.revoke", json!({"key": key_ref}), t)?;
            if json {
                print_json(&r)?;
            } else {
                writeln!(out, "key {key_ref} revoked")?;
            }
        }
        KeysCommand::Export {
            keys,
            format,
            out: file,
        } => {
            let f = match format {
                ExportFormat::Text => "text",
                ExportFormat::Xml => "xml",
                ExportFormat::Html => "html",
            };
            let r = gateway_call(c, "keys.export", json!({"keys": keys, "format": f}), t)?;
            let content = r["content"].as_str().unwrap_or_default();
            match file {
                Some(p) => {
                    std::fs::write(p, content)
                        .with_context(|| format!("cannot write {}", p.display()))?;
                    if !json {
                        writeln!(out, "hand-out written to {}", p.display())?;
                    }
                }
                None if json => print_json(&r)?,
                None => write!(out, "{content}")?,
            }
        }
    }
    Ok(())
}

fn limit(args: &ConsoleArgs, n: Option<u64>, global: bool) -> anyhow::Result<ExitCode> {
    let targets: Vec<&String> = if global {
        args.gateways.iter().collect()
    } else {
        if args.gateways.len() > 1 {
            anyhow::bail!(
                "several --gateway given: add --global to apply the limit to all of them"
            );
        }
        args.gateways.iter().take(1).collect()
    };
    let mut results = Vec::new();
    let mut failed = false;
    for url in targets {
        let r = args.connect(url).and_then(|c| match n {
            Some(n) => gateway_call(&c, "limit.set", json!({"max_devices": n}), args.timeout()),
            None => gateway_call(&c, "limit.get", json!({}), args.timeout()),
        });
        match r {
            Ok(v) => {
                if !args.json {
                    let m = v["max_devices"].as_u64().unwrap_or(0);
                    let shown = if m == 0 {
                        "unlimited".to_owned()
                    } else {
                        m.to_string()
                    };
                    println!(
                        "{url}: device limit {shown}{}",
                        if n.is_some() { " (set)" } else { "" }
                    );
                }
                results.push(json!({"gateway": url, "ok": true, "result": v}));
            }
            Err(e) => {
                failed = true;
                if !args.json {
                    eprintln!("{url}: error: {e:#}");
                }
                results.push(json!({"gateway": url, "ok": false, "error": format!("{e:#}")}));
            }
        }
    }
    if args.json {
        print_json(&Value::Array(results))?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn events(c: &ManagementClient, json_out: bool) -> anyhow::Result<ExitCode> {
    let rx = c.events();
    if !json_out {
        eprintln!(
            "connected to {} — printing events (Ctrl-C to stop)",
            c.url().url()
        );
    }
    let mut out = std::io::stdout().lock();
    for ev in rx {
        if json_out {
            let mut v = ev.body.clone();
            if let Value::Object(m) = &mut v {
                m.insert("unit".into(), json!(ev.unit));
                m.insert("at".into(), json!(crate::registry::unix_now()));
            }
            writeln!(out, "{v}")?;
        } else {
            let extra = match ev.body.get("address") {
                Some(a) => format!(" from {}", s(a)),
                None => String::new(),
            };
            writeln!(
                out,
                "{} {:<18} {}{extra}",
                crate::pki::cert::format_time(crate::registry::unix_now()),
                ev.kind.as_str(),
                if ev.unit.is_empty() {
                    "(gateway)"
                } else {
                    &ev.unit
                }
            )?;
        }
        out.flush()?;
    }
    anyhow::bail!("the connection to the gateway closed")
}

fn push(
    c: &ManagementClient,
    unit: &str,
    file: &std::path::Path,
    dest: &str,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{} → {unit}:{dest}", file.display()));
    let r = c.push_file(unit, file, dest, |sent, total| {
        bar.set_length(total);
        bar.set_position(sent);
    });
    match r {
        Ok(r) => {
            bar.finish();
            if json_out {
                print_json(&json!({"size": r.size, "sha256": r.sha256, "device": r.remote}))?;
            } else {
                println!(
                    "pushed {} bytes to {unit}:{dest} (sha256 {}) — confirmed by the device",
                    r.size, r.sha256
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            bar.abandon();
            Err(e).with_context(|| format!("push of {} to {unit} failed", file.display()))
        }
    }
}

/// Restores the terminal's settings when dropped.
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            // Not a terminal (a pipe): nothing to do.
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// Ctrl-]: ends a terminal session from this side.
const ESCAPE: u8 = 0x1d;

/// The local terminal's size (columns, rows), with a floor for odd values.
fn term_size() -> (u16, u16) {
    let (rows, cols) = ::console::Term::stdout().size();
    (cols.max(20), rows.max(5))
}

fn terminal(c: &ManagementClient, unit: &str) -> anyhow::Result<ExitCode> {
    let (cols, rows) = term_size();
    let stream = c
        .open_stream(
            unit,
            "terminal",
            json!({"cols": cols, "rows": rows}),
            Duration::from_secs(30),
        )
        .with_context(|| format!("cannot open a terminal on {unit}"))?;
    let channel = stream.id();
    let (mut reader, mut writer) = stream.split();
    eprintln!("terminal on {unit} ({cols}x{rows}); Ctrl-] ends the session\r");
    let raw = RawMode::enter();
    let ended_here = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended = ended_here.clone();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = writer.close(json!({"ok": true}));
                    return;
                }
                Ok(n) => {
                    let data = &buf[..n];
                    if let Some(i) = data.iter().position(|&b| b == ESCAPE) {
                        let _ = writer.write_all(&data[..i]);
                        ended.store(true, std::sync::atomic::Ordering::SeqCst);
                        writer.reset("closed", "the console ended the session");
                        return;
                    }
                    if writer.write_all(data).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let done = std::sync::atomic::AtomicBool::new(false);
    let outcome = std::thread::scope(|s| {
        // A window resized here is resized on the device (`terminal.resize`, a request on the
        // control lane; an older agent answers unknown_method, which is ignored).
        s.spawn(|| {
            let mut size = (cols, rows);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(250));
                let now = term_size();
                if now != size {
                    size = now;
                    let params = json!({"channel": channel, "cols": now.0, "rows": now.1});
                    let _ = c.request(
                        Some(unit),
                        "terminal.resize",
                        params,
                        Duration::from_secs(5),
                    );
                }
            }
        });
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 16 * 1024];
        let outcome = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(reader.close_body().cloned().unwrap_or(Value::Null)),
                Ok(n) => {
                    let _ = stdout.write_all(&buf[..n]);
                    let _ = stdout.flush();
                }
                Err(e) => break Err(e),
            }
        };
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        outcome
    });
    drop(raw);
    match outcome {
        Ok(close) => {
            let code = close["exit_code"].as_i64().unwrap_or(0);
            eprintln!("\nsession on {unit} ended (exit code {code})");
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Err(_) if ended_here.load(std::sync::atomic::Ordering::SeqCst) => {
            eprintln!("\nsession on {unit} ended");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e).context("the terminal session failed"),
    }
}

fn shadow(c: Arc<ManagementClient>, unit: &str, listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!(
        "shadowing {unit}: point the VNC viewer at {} (Ctrl-C to stop)",
        listener.local_addr()?
    );
    for conn in listener.incoming() {
        let tcp = match conn {
            Ok(t) => t,
            Err(e) => {
                eprintln!("accept failed: {e}");
                continue;
            }
        };
        if !c.is_connected() {
            anyhow::bail!("the connection to the gateway closed");
        }
        let (c, unit) = (c.clone(), unit.to_owned());
        std::thread::spawn(move || {
            if let Err(e) = shadow_one(&c, &unit, tcp) {
                eprintln!("shadow connection ended: {e:#}");
            }
        });
    }
    Ok(ExitCode::SUCCESS)
}

/// One local connection ⇄ one shadow stream.
pub fn shadow_one(c: &ManagementClient, unit: &str, tcp: TcpStream) -> anyhow::Result<()> {
    let peer = tcp.peer_addr().ok();
    let _ = tcp.set_nodelay(true);
    let stream = c
        .open_stream(unit, "shadow", json!({}), Duration::from_secs(30))
        .with_context(|| format!("cannot open a shadow stream to {unit}"))?;
    let (mut reader, mut writer) = stream.split();
    let mut tcp_in = tcp.try_clone().context("socket clone")?;
    let up = std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match tcp_in.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = writer.close(json!({"ok": true}));
                    return;
                }
                Ok(n) => {
                    if writer.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut tcp_out = tcp;
    let mut buf = [0u8; 16 * 1024];
    let r = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if tcp_out.write_all(&buf[..n]).is_err() {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    let _ = tcp_out.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    if let Some(p) = peer {
        eprintln!("shadow connection from {p} closed");
    }
    r.map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConsoleArgs,
    }

    fn parse(extra: &[&str]) -> ConsoleArgs {
        use clap::Parser as _;
        let mut a = vec![
            "console",
            "--gateway",
            "wss://gw",
            "--cert",
            "c.pem",
            "--key",
            "c.key",
        ];
        a.extend_from_slice(extra);
        Cli::try_parse_from(a).unwrap().args
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        // The command's own `--key` and KEY do not clash with the connection's --key.
        let a = parse(&["move", "U1", "--to", "gw2:8443", "--key", "ABCD-EFGH"]);
        assert_eq!(a.key.as_deref(), Some(std::path::Path::new("c.key")));
        assert!(
            matches!(a.command, ConsoleCommand::Move { key: Some(ref k), .. } if k == "ABCD-EFGH")
        );
        let a = parse(&["keys", "revoke", "#3", "--json"]);
        assert!(a.json);
        assert!(
            matches!(a.command, ConsoleCommand::Keys(KeysCommand::Revoke { ref key_ref }) if key_ref == "#3")
        );
        let a = parse(&["--gateway", "wss://gw2", "limit", "5", "--global"]);
        assert_eq!(a.gateways, ["wss://gw", "wss://gw2"]);
    }

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request("ping").unwrap(), ("ping".into(), json!({})));
        assert_eq!(
            parse_request(r#"{"method":"exec","params":{"command":"x"}}"#).unwrap(),
            ("exec".into(), json!({"command":"x"}))
        );
        assert_eq!(
            parse_request(r#"{"method":"info"}"#).unwrap(),
            ("info".into(), json!({}))
        );
        assert!(parse_request("two words").is_err());
        assert!(parse_request("{bad").is_err());
        assert!(parse_request(r#"{"params":{}}"#).is_err());
    }
}
