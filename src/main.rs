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

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway in the foreground until SIGTERM/SIGINT (SIGHUP re-reads the keystore).
    ///
    /// Routes on the one TLS port: GET /usg/check-status (JSON health), GET /metrics
    /// (Prometheus), WebSocket upgrades on /usg/endpoint (devices) and /usg/management
    /// (management servers), and /usg/echo when enabled.
    Serve(ServeArgs),
    /// Create, import, verify, export, renew and roll over the gateway's certificates.
    #[command(subcommand)]
    Pki(fleetgate::cli::pki::PkiCommand),
    /// Check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file (every key is optional; see docs/configuration.md).
    #[arg(long, value_name = "FILE", env = "FLEETGATE_CONFIG")]
    config: Option<PathBuf>,
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
enum ConfigCommand {
    /// Validate a configuration file: every error with its key and line. Exit 0 when valid.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the built-in defaults as TOML.
    Defaults,
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn serve(args: ServeArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = data_dir {
        config.server.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    if let Some(s) = args.shards {
        config.server.shards = s;
    }
    if let Some(d) = args.driver {
        config.server.driver = d;
    }
    if args.enable_echo {
        config.server.enable_echo = true;
    }
    config.validate()?;
    init_logging(&config.log.level);
    let listen = config.server.listen;
    let running = fleetgate::server::start(config)
        .with_context(|| format!("cannot start the gateway on {listen}"))?;
    running.run_until_signalled()?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args, cli.data_dir).map(|()| ExitCode::SUCCESS),
        Command::Pki(cmd) => {
            let dir = cli
                .data_dir
                .unwrap_or_else(|| Config::default().server.data_dir);
            fleetgate::cli::pki::run(cmd, &dir)
        }
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
