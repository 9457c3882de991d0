//! The `fleetgate` command: the gateway daemon and its tools.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fleetgate::config::{Config, DriverKind};

/// fleetgate — a TLS WebSocket gateway between a fleet of devices and its management server.
///
/// Devices and the management server dial out to the gateway; it authenticates both and
/// relays between them. Start it with `fleetgate serve`: on first start it creates its data
/// directory, a root CA and a server certificate, and listens on 0.0.0.0:8443.
#[derive(Debug, Parser)]
#[command(name = "fleetgate", version, propagate_version = true)]
struct Cli {
    /// Data directory: keystore, root certificate, CA keys, registry.
    /// [default: ./fleetgate-data, or server.data_dir from --config]
    #[arg(long, global = true, env = "FLEETGATE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// TOML configuration file (every key is optional; see docs/configuration.md).
    #[arg(long, global = true, value_name = "FILE", env = "FLEETGATE_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway in the foreground until SIGTERM/SIGINT (SIGHUP re-reads the keystore
    /// and the config file).
    ///
    /// Routes on the one TLS port: GET /usg/check-status (JSON health), GET /metrics
    /// (Prometheus), WebSocket upgrades on /usg/endpoint (devices) and /usg/management
    /// (management servers), and /usg/echo when enabled.
    Serve(ServeArgs),
    /// Create, import, verify, export, renew and roll over the gateway's certificates.
    #[command(subcommand)]
    Pki(fleetgate::cli::pki::PkiCommand),
    /// First-authentication keys: create, list, revoke, delete, hand out (text, XML, HTML, mail).
    #[command(subcommand)]
    Keys(fleetgate::cli::keys::KeysCommand),
    /// Registered devices: list, remove.
    #[command(subcommand)]
    Devices(fleetgate::cli::devices::DevicesCommand),
    /// Ask a running gateway how it is (exit 0 ok, 1 warn/init, 2 err or unreachable).
    Status(fleetgate::cli::status::StatusArgs),
    /// Memory, CPU and file-descriptor budget for a fleet.
    Sizing(fleetgate::cli::sizing::SizingArgs),
    /// Make the gateway running on this data dir re-read its keystore and configuration file
    /// now (through DATA_DIR/admin.sock; the same as SIGHUP). Exit 0 when both were taken, 1
    /// when either was refused (the gateway then keeps the old one).
    Reload,
    /// The device registry (SQLite): online backup, schema migration.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The device agent: register this device with a gateway (fingerprint check, key), then
    /// stay connected with its credential. Prints `connection ready` on standard output each
    /// time the session is ready; everything else goes to standard error.
    Agent(fleetgate::cli::agent::AgentArgs),
    /// Management client certificates: add (writes NAME.pem, NAME.key, gateway-root.pem),
    /// list, revoke.
    #[command(subcommand)]
    Mgmt(fleetgate::cli::mgmt::MgmtCommand),
    /// The management console: talk to a gateway over /usg/management with a management
    /// client certificate (devices, commands, files, terminal, screen shadowing, keys, limits).
    Console(fleetgate::cli::console::ConsoleArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address and port to listen on [default: 0.0.0.0:8443].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Number of shards (threads with their own ring and listener) [default: one per CPU].
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// I/O backend: auto (io_uring if usable, else epoll), uring, or epoll.
    #[arg(long, value_enum, value_name = "DRIVER")]
    driver: Option<DriverKind>,
    /// Serve the diagnostic WebSocket echo on /usg/echo (for conformance and load tests).
    #[arg(long)]
    enable_echo: bool,
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Write a consistent copy of DATA_DIR/registry.db to FILE while the gateway runs
    /// (SQLite's online backup; the copy is checked and written with mode 0600).
    Backup {
        /// Where to write the copy.
        file: PathBuf,
    },
    /// Open the registry and run any pending schema migrations (the gateway also does this
    /// at start-up).
    Migrate,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file: every error with its key and line. Exit 0 when valid.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the built-in defaults as TOML.
    Defaults,
}

/// The configuration file (if any) with `--data-dir` applied on top.
fn load_config(path: Option<&PathBuf>, data_dir: Option<PathBuf>) -> anyhow::Result<Config> {
    let mut config = match path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = data_dir {
        config.server.data_dir = d;
    }
    Ok(config)
}

fn serve(args: ServeArgs, path: Option<PathBuf>, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let overrides = fleetgate::config::Overrides {
        listen: args.listen,
        shards: args.shards,
        driver: args.driver,
        enable_echo: args.enable_echo,
        data_dir,
    };
    let config = overrides.load(path.as_deref())?;
    let log = fleetgate::logging::init(&config.log)?;
    let listen = config.server.listen;
    let mut running = fleetgate::server::start(config)
        .with_context(|| format!("cannot start the gateway on {listen}"))?;
    // SIGHUP and `fleetgate reload` re-read the same file with the same flags.
    running.set_config_source(path, overrides, Some(log.level_handle()));
    running.run_until_signalled()?;
    drop(log);
    Ok(())
}

fn registry_command(cmd: RegistryCommand, data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let db = data_dir.join("registry.db");
    if !db.exists() {
        anyhow::bail!("no registry at {} (nothing to do)", db.display());
    }
    let mut reg = fleetgate::registry::Registry::open_in(data_dir)
        .with_context(|| format!("cannot open {}", db.display()))?;
    match cmd {
        RegistryCommand::Backup { file } => {
            reg.backup_to(&file, fleetgate::registry::unix_now())
                .with_context(|| format!("backup to {}", file.display()))?;
            eprintln!("backed up {} to {}", db.display(), file.display());
        }
        RegistryCommand::Migrate => eprintln!("{} is at the current schema", db.display()),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args, cli.config, cli.data_dir).map(|()| ExitCode::SUCCESS),
        Command::Pki(cmd) => load_config(cli.config.as_ref(), cli.data_dir)
            .and_then(|c| fleetgate::cli::pki::run(cmd, &c.server.data_dir)),
        Command::Keys(cmd) => load_config(cli.config.as_ref(), cli.data_dir).and_then(|c| {
            let handout = fleetgate::server::handout_gateways(&c);
            fleetgate::cli::keys::run(cmd, &c.server.data_dir, &handout, c.mail.as_ref())
        }),
        Command::Devices(cmd) => load_config(cli.config.as_ref(), cli.data_dir)
            .and_then(|c| fleetgate::cli::devices::run(cmd, &c.server.data_dir)),
        Command::Status(mut args) => {
            args.config = cli.config.clone();
            fleetgate::cli::status::run(args, cli.data_dir.as_deref())
        }
        Command::Sizing(args) => fleetgate::cli::sizing::run(args),
        Command::Reload => load_config(cli.config.as_ref(), cli.data_dir).and_then(|c| {
            let answer =
                fleetgate::admin::request(&c.server.data_dir, &fleetgate::admin::Request::Reload)?;
            if answer.ok {
                eprintln!("keystore and configuration re-read");
                let applied = answer.applied.unwrap_or_default();
                if !applied.is_empty() {
                    eprintln!("applied: {}", applied.join(", "));
                }
                let restart = answer.restart_needed.unwrap_or_default();
                if !restart.is_empty() {
                    eprintln!(
                        "warning: changed but take effect only after a restart: {}",
                        restart.join(", ")
                    );
                }
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error: {}", answer.error.unwrap_or_default());
                Ok(ExitCode::FAILURE)
            }
        }),
        Command::Registry(cmd) => load_config(cli.config.as_ref(), cli.data_dir)
            .and_then(|c| registry_command(cmd, &c.server.data_dir)),
        Command::Config(ConfigCommand::Check { file }) => match Config::load(&file) {
            Ok(_) => {
                println!("{}: OK", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Agent(args) => fleetgate::cli::agent::run(args),
        Command::Mgmt(cmd) => load_config(cli.config.as_ref(), cli.data_dir)
            .and_then(|c| fleetgate::cli::mgmt::run(cmd, &c.server.data_dir)),
        Command::Console(args) => fleetgate::cli::console::run(args),
        Command::Config(ConfigCommand::Defaults) => {
            match toml::to_string_pretty(&Config::default()) {
                Ok(s) => {
                    print!("{s}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
