//! `loadtest idle` arguments and the plan made from them: which worker process runs which
//! devices from which source addresses, at what pace. Pure apart from its inputs, so it
//! can be tested without sockets.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::sources::{self, SourceSpec};
use crate::target::Target;
use crate::tls::{TlsVersions, Trust};
use crate::wire::{PingKind, PingSettings, TlsSettings, WorkerConfig};

/// Devices per worker process by default: under the 20,000-descriptor limit with headroom.
pub const DEVICES_PER_WORKER: u64 = 18_000;

/// Descriptors a worker needs besides its devices (runtime, pipes, stdio, files).
const FD_RESERVE: u64 = 64;

/// Largest WebSocket control-frame payload (RFC 6455 §5.5).
const MAX_PING_PAYLOAD: usize = 125;

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Server to load: wss://HOST:PORT/PATH (or ws://), e.g. wss://127.0.0.1:8443/usg/endpoint
    #[arg(long)]
    pub url: String,
    /// Number of simulated devices
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub devices: u64,
    /// PEM file with the root certificate(s) to trust (fleetgate: DATA_DIR/root.pem);
    /// without it the system CA bundle is used
    #[arg(long, conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Accept any server certificate (handshake signatures are still checked)
    #[arg(long)]
    pub insecure: bool,
    /// TLS server name to send and to check the certificate against (default: the URL host)
    #[arg(long)]
    pub sni: Option<String>,
    /// TLS versions to offer
    #[arg(long, value_enum, default_value_t = TlsVersions::Any)]
    pub tls: TlsVersions,
    /// Seconds between two pings of one device (first ping at a random point in the first interval)
    #[arg(long, value_parser = parse_secs, default_value = "30")]
    pub ping_interval: f64,
    /// Payload bytes per ping
    #[arg(long, default_value_t = 32)]
    pub ping_size: usize,
    /// What a ping is: a Ping frame (answered by a Pong) or a binary/text message (needs an echo endpoint)
    #[arg(long, value_enum, default_value_t = PingKind::Ping)]
    pub ping_kind: PingKind,
    /// Seconds to hold all devices after the ramp before closing them (Ctrl-C ends it early)
    #[arg(long, value_parser = parse_secs, default_value = "60")]
    pub hold: f64,
    /// Cap on new connections per second, all workers together (default: unlimited)
    #[arg(long)]
    pub ramp_rate: Option<f64>,
    /// Handshakes in flight at once, all workers together
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: u64,
    /// Source addresses to bind: a count (127.0.0.2, .3, …), a range A-B, a list A,B or
    /// `none` (default: one loopback address per 5,000 devices for loopback targets)
    #[arg(long)]
    pub sources: Option<SourceSpec>,
    /// Worker processes (default: one per 18,000 devices)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub workers: Option<u64>,
    /// PID of the server under test, to read its memory (VmRSS) before, after the ramp and at the end
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Also write the JSON summary to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seconds one device may take for TCP connect + TLS + upgrade
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub handshake_timeout: f64,
    /// Seconds to wait after the ramp before reading "RSS after ramp"
    #[arg(long, value_parser = parse_secs, default_value = "1")]
    pub settle: f64,
    /// WebSocket read buffer per device, bytes (tungstenite's default is 128 KiB)
    #[arg(long, default_value_t = 4096)]
    pub client_read_buffer: usize,
    /// No progress bar (a line every few seconds on stderr instead)
    #[arg(long)]
    pub no_progress: bool,
}

/// Facts about this machine the plan depends on.
#[derive(Debug, Clone, Copy)]
pub struct Environment {
    /// Size of the ephemeral port range, if known.
    pub port_count: Option<u64>,
    /// Hard open-file limit of a process.
    pub fd_limit: u64,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub addr: SocketAddr,
    pub sources: Vec<IpAddr>,
    pub workers: Vec<WorkerConfig>,
    pub warnings: Vec<String>,
}

pub fn plan(args: &IdleArgs, target: Target, addr: SocketAddr, env: Environment) -> Result<Plan> {
    let mut warnings = Vec::new();
    let n = args.devices;
    if args.ping_kind == PingKind::Ping && args.ping_size > MAX_PING_PAYLOAD {
        bail!(
            "a WebSocket ping carries at most {MAX_PING_PAYLOAD} bytes (--ping-size {}); \
             use --ping-kind binary for bigger messages",
            args.ping_size
        );
    }
    if args.ping_interval <= 0.0 {
        bail!("--ping-interval must be positive");
    }
    if args.handshake_timeout <= 0.0 {
        bail!("--handshake-timeout must be positive");
    }
    if let Some(rate) = args.ramp_rate
        && !(rate > 0.0 && rate.is_finite())
    {
        bail!("--ramp-rate must be a positive number of connects per second");
    }
    if !target.secure && (args.ca.is_some() || args.insecure || args.sni.is_some()) {
        warnings.push(format!(
            "{} is plain ws://: --ca, --insecure and --sni are ignored",
            target.url
        ));
    }

    let spec = args
        .sources
        .clone()
        .unwrap_or_else(|| SourceSpec::default_for(addr.ip(), n));
    let sources = spec.addresses();
    warnings.extend(sources::check(&sources, addr.ip(), n, env.port_count)?);

    let workers = args
        .workers
        .unwrap_or_else(|| n.div_ceil(DEVICES_PER_WORKER))
        .clamp(1, n);
    let shares = split(n, workers);
    let largest = shares.iter().map(|&(_, count)| count).max().unwrap_or(0);
    if largest + FD_RESERVE > env.fd_limit {
        bail!(
            "each worker would hold {largest} connections, but a process may open only {} files \
             here (ulimit -Hn): use --workers {} or more",
            env.fd_limit,
            n.div_ceil(env.fd_limit.saturating_sub(FD_RESERVE).max(1))
        );
    }

    let concurrency = args.concurrency.div_ceil(workers).max(1);
    let ramp_rate = args.ramp_rate.map(|r| r / workers as f64);
    let tls = target.secure.then(|| TlsSettings {
        trust: match (&args.ca, args.insecure) {
            (Some(ca), _) => Trust::Ca(ca.clone()),
            (None, true) => Trust::Insecure,
            (None, false) => Trust::System,
        },
        versions: args.tls,
        server_name: args.sni.clone().unwrap_or_else(|| target.host.clone()),
    });
    // A worker stops on its own after the longest run the plan allows, should its parent
    // fail to tell it: every device paced, every handshake timing out, the whole hold.
    let ramp_bound = ramp_rate.map_or(0.0, |r| largest as f64 / r)
        + largest.div_ceil(concurrency) as f64 * args.handshake_timeout;
    let max_runtime_secs = (ramp_bound + args.settle + args.hold + 120.0).ceil() as u64;

    let workers = shares
        .iter()
        .enumerate()
        .map(|(index, &(first_device, devices))| WorkerConfig {
            index,
            url: target.url.clone(),
            addr,
            tls: tls.clone(),
            first_device,
            devices,
            sources: sources.clone(),
            ping: PingSettings {
                kind: args.ping_kind,
                size: args.ping_size,
                interval_ms: (args.ping_interval * 1000.0).round().max(1.0) as u64,
            },
            ramp_rate,
            concurrency: concurrency as usize,
            handshake_timeout_ms: (args.handshake_timeout * 1000.0).round() as u64,
            close_timeout_ms: 5_000,
            read_buffer: args.client_read_buffer.max(256),
            max_runtime_secs,
        })
        .collect();
    Ok(Plan {
        target,
        addr,
        sources,
        workers,
        warnings,
    })
}

/// Splits `n` devices into `workers` contiguous shares as (first id, count), sizes differing
/// by at most one.
pub fn split(n: u64, workers: u64) -> Vec<(u64, u64)> {
    let (base, extra) = (n / workers, n % workers);
    let mut first = 0;
    (0..workers)
        .map(|w| {
            let count = base + u64::from(w < extra);
            let share = (first, count);
            first += count;
            share
        })
        .collect()
}

/// Seconds: `30`, `2.5`, `30s`, `500ms`, `2m`, `1h`.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v * scale),
        _ => Err(format!("'{s}' is not a duration (e.g. 30, 2.5, 500ms, 2m)")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        idle: IdleArgs,
    }

    fn args(line: &str) -> IdleArgs {
        let argv = std::iter::once("loadtest").chain(line.split_whitespace());
        Cli::try_parse_from(argv).expect("arguments parse").idle
    }

    fn make(line: &str) -> Result<Plan> {
        let a = args(line);
        let target = Target::parse(&a.url)?;
        let addr = target.resolve()?;
        let env = Environment {
            port_count: Some(28_232),
            fd_limit: 20_000,
        };
        plan(&a, target, addr, env)
    }

    #[test]
    fn parses_the_documented_command_line() {
        let a = args(
            "--url wss://127.0.0.1:8443/usg/endpoint --devices 2000 --ca /tmp/root.pem \
             --ping-interval 30 --ping-size 32 --hold 20 --ramp-rate 500 --concurrency 64 \
             --sources 127.0.0.2-127.0.0.3 --workers 2 --gateway-pid 42 --json out.json",
        );
        assert_eq!(a.devices, 2000);
        assert_eq!(a.hold, 20.0);
        assert_eq!(a.ramp_rate, Some(500.0));
        assert_eq!(a.gateway_pid, Some(42));
        assert_eq!(a.ping_kind, PingKind::Ping);
        assert!(matches!(a.sources, Some(SourceSpec::Range(..))));
    }

    #[test]
    fn rejects_conflicting_or_bad_arguments() {
        let cli = |line: &str| {
            Cli::try_parse_from(std::iter::once("loadtest").chain(line.split_whitespace()))
        };
        assert!(cli("--url wss://h/ --devices 1 --ca x --insecure").is_err());
        assert!(cli("--url wss://h/ --devices 0").is_err());
        assert!(cli("--url wss://h/ --devices 1 --hold forever").is_err());
        assert!(cli("--url wss://h/ --devices 1 --sources 127.0.0.9-127.0.0.2").is_err());
        assert!(make("--url wss://127.0.0.1:1/ --devices 1 --ping-size 126").is_err());
        assert!(
            make("--url wss://127.0.0.1:1/ --devices 1 --ping-size 126 --ping-kind binary").is_ok()
        );
    }

    #[test]
    fn default_plan_spreads_100k_devices() {
        let p = make("--url wss://127.0.0.1:8443/usg/endpoint --devices 100000 --ramp-rate 3000")
            .unwrap();
        assert_eq!(p.workers.len(), 6);
        assert_eq!(p.sources.len(), 20);
        assert_eq!(p.workers.iter().map(|w| w.devices).sum::<u64>(), 100_000);
        assert!(p.workers.iter().all(|w| w.devices <= 18_000));
        assert_eq!(p.workers[0].ramp_rate, Some(500.0));
        assert_eq!(p.workers[0].concurrency, 43);
        assert_eq!(p.workers[5].first_device + p.workers[5].devices, 100_000);
        let tls = p.workers[0].tls.as_ref().unwrap();
        assert_eq!(tls.server_name, "127.0.0.1");
        assert_eq!(tls.trust, Trust::System);
    }

    #[test]
    fn refuses_a_worker_beyond_the_fd_limit() {
        let e = make("--url wss://127.0.0.1:8443/ --devices 40000 --workers 2").unwrap_err();
        assert!(e.to_string().contains("--workers 3"), "{e}");
        assert!(make("--url wss://127.0.0.1:8443/ --devices 40000 --workers 3").is_ok());
    }

    #[test]
    fn splits_evenly() {
        assert_eq!(split(10, 3), [(0, 4), (4, 3), (7, 3)]);
        assert_eq!(split(2, 2), [(0, 1), (1, 1)]);
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_secs("30"), Ok(30.0));
        assert_eq!(parse_secs("2.5s"), Ok(2.5));
        assert_eq!(parse_secs("500ms"), Ok(0.5));
        assert_eq!(parse_secs("2m"), Ok(120.0));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("soon").is_err());
    }
}
