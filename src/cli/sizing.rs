//! `fleetgate sizing`: the memory, CPU and file-descriptor budget for a fleet, computed from
//! per-device figures that benches and load tests measured.
//!
//! Every number the computation uses is in [`FIGURES`], with its source; update a figure there
//! (and only there) after a new measurement, and the `docs/benchmarks.md` section it names.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;

use crate::cli::status::human_bytes;
use crate::config::Config;

/// A per-unit cost and where it comes from.
#[derive(Debug, Clone, Copy)]
pub struct Figure {
    /// What the figure measures.
    pub what: &'static str,
    /// The value, in `unit`.
    pub value: f64,
    /// `bytes`, `µs`, …
    pub unit: &'static str,
    /// How it was measured (the command) and where the result is recorded.
    pub source: &'static str,
}

const KIB: f64 = 1024.0;

/// The per-device figures, each with its source.
pub struct Figures {
    /// Heap + slab slot the gateway holds per idle TLS WebSocket (the floor; shown for
    /// reference, the budget uses the RSS figure, which includes allocator overhead).
    pub heap_per_idle_device: Figure,
    /// Process RSS growth per idle device under a real fleet.
    pub rss_per_idle_device: Figure,
    /// Kernel memory per idle TCP connection (socket, inode, file; outside the process RSS).
    pub kernel_per_idle_socket: Figure,
    /// RSS of a started gateway without connections, per process (plus receive buffers).
    pub process_base: Figure,
    /// Credit window per running transfer (file, VNC, terminal): bytes the gateway may hold
    /// for it.
    pub transfer_window: Figure,
    /// CPU for one full TLS handshake + WebSocket upgrade on the gateway side.
    pub cpu_full_handshake: Figure,
    /// CPU for one resumed TLS handshake (session ticket) + WebSocket upgrade.
    pub cpu_resumed_handshake: Figure,
    /// CPU for one keep-alive exchange (ping out, pong in) on an idle device.
    pub cpu_keepalive: Figure,
}

/// The one table of figures `fleetgate sizing` uses.
pub const FIGURES: Figures = Figures {
    heap_per_idle_device: Figure {
        what: "heap + slab slot per idle registered device",
        value: 3255.0,
        unit: "bytes",
        source: "`cargo bench --bench idle_memory`, TLS 1.3 with the device certificate (mutual TLS session): 1,679 B heap + 1,576 B slot; an anonymous WebSocket: 2,539 B (docs/benchmarks.md, \"In-process: the connection's own state\")",
    },
    rss_per_idle_device: Figure {
        what: "process RSS growth per idle device",
        value: 5052.0,
        unit: "bytes",
        source: "`loadtest idle`, the highest of three runs (anonymous devices): 4,286 B (io_uring, 2 shards; 4,121 B at 100k, 4,196 B epoll), plus what a registered session adds in `idle_memory` (3,255 − 2,539 = 716 B) and ≈ 50 B for the shard's fingerprint index; cross-check: 100,000 registered devices connected by `loadtest register` grew a 6-shard gateway from 22 to 551 MB, 5.3 KB each with its receive buffers (docs/benchmarks.md, \"Whole process: RSS growth per idle device\", \"In-process\" and \"100,000 devices\")",
    },
    kernel_per_idle_socket: Figure {
        what: "kernel memory per idle TCP connection",
        value: 3.9 * KIB,
        unit: "bytes",
        source: "outside the process RSS, measured beside `loadtest idle` (docs/benchmarks.md, \"Whole process: RSS growth per idle device\")",
    },
    process_base: Figure {
        what: "RSS of a started gateway without connections",
        value: 40.0 * KIB * KIB,
        unit: "bytes",
        source: "fleetgate_resident_memory_bytes right after start without the receive buffers: 7.6 MiB (release build, 2 shards, io_uring) (docs/operations.md, \"Sizing\"), plus the registry's SQLite page cache, which grows to 32 MiB with a large fleet",
    },
    transfer_window: Figure {
        what: "credit window per running transfer",
        value: 256.0 * KIB,
        unit: "bytes",
        source: "default until the relay defines its window (backpressure: docs/architecture.md, \"How a byte flows\", step 6); --window overrides",
    },
    cpu_full_handshake: Figure {
        what: "CPU per full TLS 1.3 handshake + upgrade",
        value: 400.0,
        unit: "µs",
        source: "100,000-device reconnect storm with full mutual-TLS handshakes: 40.1 s of gateway CPU = 401 µs each, TCP accept, client-certificate check and session admission included (anonymous connect ramp: 228 µs) (docs/benchmarks.md, \"100,000 devices\")",
    },
    cpu_resumed_handshake: Figure {
        what: "CPU per resumed TLS handshake + upgrade",
        value: 270.0,
        unit: "µs",
        source: "100,000-device reconnect storms with session resumption: 24.3–27.6 s of gateway CPU = 243–276 µs each, session admission and the registrar's bookkeeping included (docs/benchmarks.md, \"100,000 devices\")",
    },
    cpu_keepalive: Figure {
        what: "CPU per keep-alive ping + pong",
        value: 20.0,
        unit: "µs",
        source: "estimate: one small TLS record out (ping), one in (pong), and their I/O; to be replaced by a `loadtest idle` measurement",
    },
};

impl Figures {
    /// Every figure, for printing.
    pub fn all(&self) -> [&Figure; 8] {
        [
            &self.heap_per_idle_device,
            &self.rss_per_idle_device,
            &self.kernel_per_idle_socket,
            &self.process_base,
            &self.transfer_window,
            &self.cpu_full_handshake,
            &self.cpu_resumed_handshake,
            &self.cpu_keepalive,
        ]
    }
}

/// Spare connection slots per shard: `SO_REUSEPORT` spreads connections by a hash, so shards
/// are not filled exactly evenly.
const SHARD_MARGIN: f64 = 1.2;
/// Headroom on the memory total for fragmentation, bursts and measurement error.
const MEMORY_HEADROOM: f64 = 1.25;
/// File descriptors beyond the connections: listeners, rings, eventfds, files, the registry.
const SPARE_FDS: u64 = 256;

/// `fleetgate sizing`.
#[derive(Debug, Clone, clap::Args)]
pub struct SizingArgs {
    /// Devices connected at the same time.
    #[arg(long, value_name = "N")]
    pub devices: u64,
    /// Transfers (files, remote shadowing, terminal sessions) running at the same time.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub transfers: u64,
    /// Credit window per transfer, in bytes (suffixes KiB, MiB allowed).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub window: Option<u64>,
    /// CPU cores of the gateway host (one shard each). Default: this machine's, or
    /// server.shards from --config.
    #[arg(long, value_name = "C")]
    pub cores: Option<usize>,
    /// Management server connections.
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub management: u64,
    /// Take receive buffers, keep-alive interval and connection limits from this config.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `256KiB`, `1MiB`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        u => return Err(format!("unknown unit {u:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The computed budget.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Shards (= cores).
    pub shards: u64,
    /// Devices + management connections.
    pub connections: u64,
    /// Process RSS: base.
    pub base: f64,
    /// Process RSS: every shard's receive buffers.
    pub recv_buffers: f64,
    /// Process RSS: idle devices.
    pub devices: f64,
    /// Process RSS: transfer windows.
    pub transfers: f64,
    /// Kernel socket memory.
    pub kernel: f64,
    /// Keep-alive exchanges per second.
    pub pings_per_sec: f64,
    /// Cores busy with keep-alives.
    pub keepalive_cores: f64,
    /// Seconds for the whole fleet to reconnect with full handshakes, all cores busy.
    pub storm_full_secs: f64,
    /// The same with resumed handshakes.
    pub storm_resumed_secs: f64,
    /// `limits.max_connections_per_shard` needed.
    pub per_shard: u64,
    /// `RLIMIT_NOFILE` needed with io_uring (per-ring fixed tables).
    pub nofile_uring: u64,
    /// `RLIMIT_NOFILE` needed with epoll (one fd per connection).
    pub nofile_epoll: u64,
}

impl Budget {
    /// Process RSS.
    pub fn process(&self) -> f64 {
        self.base + self.recv_buffers + self.devices + self.transfers
    }

    /// Process + kernel.
    pub fn total(&self) -> f64 {
        self.process() + self.kernel
    }
}

/// Computes the budget for `devices` + `management` connections, `transfers` transfers of
/// `window` bytes, on `shards` shards configured as `cfg`.
pub fn budget(
    devices: u64,
    management: u64,
    transfers: u64,
    window: u64,
    shards: u64,
    cfg: &Config,
) -> Budget {
    let f = &FIGURES;
    let shards = shards.max(1);
    let connections = devices + management;
    let n = connections as f64;
    let recv_ring = (cfg.limits.recv_buffer_size * cfg.limits.recv_buffers_per_shard) as f64;
    let pings_per_sec = devices as f64 / cfg.websocket.ping_after_secs.max(1) as f64;
    let per_shard = ((n / shards as f64) * SHARD_MARGIN).ceil() as u64;
    Budget {
        shards,
        connections,
        base: f.process_base.value,
        recv_buffers: shards as f64 * recv_ring,
        devices: devices as f64 * f.rss_per_idle_device.value,
        transfers: transfers as f64 * window as f64,
        kernel: n * f.kernel_per_idle_socket.value,
        pings_per_sec,
        keepalive_cores: pings_per_sec * f.cpu_keepalive.value / 1e6,
        storm_full_secs: n * f.cpu_full_handshake.value / 1e6 / shards as f64,
        storm_resumed_secs: n * f.cpu_resumed_handshake.value / 1e6 / shards as f64,
        per_shard,
        nofile_uring: per_shard + SPARE_FDS,
        nofile_epoll: connections + SPARE_FDS,
    }
}

/// Runs `fleetgate sizing`.
pub fn run(args: SizingArgs) -> anyhow::Result<ExitCode> {
    print!("{}", report(&args)?);
    Ok(ExitCode::SUCCESS)
}

/// The printed report.
pub fn report(args: &SizingArgs) -> anyhow::Result<String> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let shards = match (args.cores, cfg.server.shards) {
        (Some(0), _) => bail!("--cores must be at least 1"),
        (Some(c), _) => c,
        (None, 0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        (None, s) => s,
    } as u64;
    let window = args.window.unwrap_or(FIGURES.transfer_window.value as u64);
    let b = budget(
        args.devices,
        args.management,
        args.transfers,
        window,
        shards,
        &cfg,
    );
    let f = &FIGURES;
    let hb = human_bytes;
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "fleetgate sizing: {} devices + {} management, {} transfers of {} window, {} shard{} (one per core)\n",
        args.devices,
        args.management,
        args.transfers,
        hb(window as f64),
        shards,
        if shards == 1 { "" } else { "s" }
    );
    let _ = writeln!(w, "Memory");
    let row = |w: &mut String, what: &str, v: f64, how: String| {
        let line = format!("  {what:<30} {:>11}   {how}", hb(v));
        let _ = writeln!(w, "{}", line.trim_end());
    };
    row(w, "process base", b.base, String::new());
    row(
        w,
        "receive buffers",
        b.recv_buffers,
        format!(
            "{shards} × {} × {} (limits.recv_buffers_per_shard × recv_buffer_size)",
            cfg.limits.recv_buffers_per_shard,
            hb(cfg.limits.recv_buffer_size as f64)
        ),
    );
    row(
        w,
        "idle devices",
        b.devices,
        format!("{} × {}", args.devices, hb(f.rss_per_idle_device.value)),
    );
    row(
        w,
        "transfers",
        b.transfers,
        format!("{} × {}", args.transfers, hb(window as f64)),
    );
    row(w, "= gateway process (RSS)", b.process(), String::new());
    row(
        w,
        "kernel TCP sockets",
        b.kernel,
        format!(
            "{} × {} (not in the process RSS)",
            b.connections,
            hb(f.kernel_per_idle_socket.value)
        ),
    );
    row(
        w,
        "= total",
        b.total(),
        format!(
            "with {:.0}% headroom: {}; plus the OS",
            (MEMORY_HEADROOM - 1.0) * 100.0,
            hb(b.total() * MEMORY_HEADROOM)
        ),
    );
    if args.transfers > 0 {
        let _ = writeln!(
            w,
            "  (busy sockets also hold kernel buffers, up to the maximum of net.ipv4.tcp_rmem/tcp_wmem each)"
        );
    }
    let _ = writeln!(w, "\nCPU");
    let _ = writeln!(
        w,
        "  {:<30} {:>11}   {:.0} pings/s (websocket.ping_after_secs {}), {:.0} µs each",
        "keep-alive",
        format!("{:.2} cores", b.keepalive_cores),
        b.pings_per_sec,
        cfg.websocket.ping_after_secs,
        f.cpu_keepalive.value
    );
    let _ = writeln!(
        w,
        "  {:<30} {:>11}   all {shards} cores busy; {:.0} µs per full handshake",
        "whole fleet reconnects (CPU)",
        format!("{:.1} s", b.storm_full_secs),
        f.cpu_full_handshake.value
    );
    let _ = writeln!(
        w,
        "  {:<30} {:>11}   with session tickets (tls.session_tickets), {:.0} µs each",
        "… resuming sessions",
        format!("{:.1} s", b.storm_resumed_secs),
        f.cpu_resumed_handshake.value
    );
    let _ = writeln!(w, "\nConnections and file descriptors");
    let limit = cfg.limits.max_connections_per_shard as u64;
    let _ = writeln!(
        w,
        "  limits.max_connections_per_shard ≥ {}   ({} connections / {shards} shards + {:.0}% for uneven spreading){}",
        b.per_shard,
        b.connections,
        (SHARD_MARGIN - 1.0) * 100.0,
        if limit < b.per_shard {
            format!("; configured {limit}: RAISE IT")
        } else {
            format!("; configured {limit}: ok")
        }
    );
    let _ = writeln!(
        w,
        "  io_uring: LimitNOFILE ≥ {}   each shard's fixed file table holds up to RLIMIT_NOFILE sockets (its connections plus 256 slots for management connections moved between shards); sockets take no ordinary fd",
        b.nofile_uring
    );
    let _ = writeln!(
        w,
        "  epoll:    LimitNOFILE ≥ {}   one fd per connection, all shards together",
        b.nofile_epoll
    );
    let _ = writeln!(
        w,
        "  system:   fs.file-max ≥ {} (every socket is a kernel file on both backends); fs.nr_open ≥ LimitNOFILE; the unit sets LimitNOFILE=1048576",
        b.connections + SPARE_FDS
    );
    let _ = writeln!(w, "\nFigures used (src/cli/sizing.rs, FIGURES)");
    for fig in f.all() {
        let v = if fig.unit == "bytes" {
            hb(fig.value)
        } else {
            format!("{} {}", fig.value, fig.unit)
        };
        let _ = writeln!(w, "  {:<58} {:>9}   {}", fig.what, v, fig.source);
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hundred_thousand_devices_on_two_cores() {
        let cfg = Config::default();
        let b = budget(100_000, 1, 10, 256 << 10, 2, &cfg);
        assert_eq!(b.connections, 100_001);
        assert_eq!(b.recv_buffers, 2.0 * 512.0 * 16896.0);
        assert_eq!(b.devices, 100_000.0 * 5052.0);
        assert_eq!(b.transfers, 10.0 * 256.0 * 1024.0);
        assert_eq!(b.per_shard, 60_001);
        assert_eq!(b.nofile_epoll, 100_001 + SPARE_FDS);
        assert!(b.nofile_uring < b.nofile_epoll);
        // The brief's goal: one 2-CPU / 4 GB host for 100k devices.
        assert!(b.total() * MEMORY_HEADROOM < 3.0 * 1024.0 * 1024.0 * 1024.0);
        assert!((b.pings_per_sec - 100_000.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn report_names_the_limits_and_sources() {
        let args = SizingArgs {
            devices: 100_000,
            transfers: 0,
            window: None,
            cores: Some(2),
            management: 1,
            config: None,
        };
        let text = report(&args).unwrap();
        assert!(
            text.contains("limits.max_connections_per_shard ≥ 60001"),
            "{text}"
        );
        assert!(text.contains("RAISE IT"), "{text}");
        assert!(text.contains("docs/benchmarks.md"), "{text}");
        assert!(text.contains("LimitNOFILE ≥ 100257"), "{text}");
        let small = SizingArgs {
            devices: 1000,
            ..args
        };
        assert!(report(&small).unwrap().contains("configured 20000: ok"));
    }

    #[test]
    fn command_line() {
        use clap::{CommandFactory as _, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            sizing: SizingArgs,
        }
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "sizing",
            "--devices",
            "5000",
            "--transfers",
            "3",
            "--window",
            "1MiB",
        ])
        .unwrap();
        assert_eq!(c.sizing.devices, 5000);
        assert_eq!(c.sizing.window, Some(1 << 20));
        assert!(
            Cli::try_parse_from(["sizing"]).is_err(),
            "--devices is required"
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("256KiB"), Ok(256 << 10));
        assert_eq!(parse_bytes("1 MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("12XB").is_err());
        assert!(parse_bytes("MiB").is_err());
    }
}
