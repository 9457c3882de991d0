//! `loadtest`: simulates fleets of devices against fleetgate or any other `ws://`/`wss://`
//! server and measures what they cost it. See `loadtest/README.md`.

/// mimalloc for small blocks, glibc for large ones: see `alloc.rs` (storms make millions of
/// small allocations, bulk streams one 16 KiB buffer per TLS record). The gateway keeps the
/// system allocator: its per-connection memory figures are measured with it.
#[global_allocator]
static GLOBAL: alloc::SplitAlloc = alloc::SplitAlloc;

mod alloc;
mod backoff;
mod baseline;
mod creds;
mod device;
mod envelope;
mod fleet;
mod fleet_wire;
mod fleet_worker;
mod gateway_hops;
mod idle;
mod lean;
mod messages;
mod mgmt;
mod plan;
mod pool;
mod reconnect;
mod register;
mod relay;
mod relay_wire;
mod relay_worker;
mod sources;
mod stream;
mod summary;
mod sys;
mod target;
mod tls;
mod wakeup;
mod wire;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Load generator for WebSocket gateways: fleetgate, or any ws:// / wss:// server for comparison"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N devices connect (TCP + TLS + WebSocket upgrade), ping now and then, hold, close;
    /// prints a JSON summary (connect rate, latency, server bytes per idle device)
    Idle(plan::IdleArgs),
    /// N devices register with one-time keys (fleetgate §5.3) and connect once with their new
    /// credential; registrations per second, latencies, refusals; writes the credentials
    Register(register::RegisterArgs),
    /// N registered devices connect, the gateway restarts, they reconnect with backoff and
    /// full jitter; time until every device has its session again
    Reconnect(reconnect::ReconnectArgs),
    /// N registered devices answer requests; management connections send M requests/s to
    /// random devices; round-trip times (management → device → management), errors, CPU
    Relay(relay::RelayArgs),
    /// K parallel file streams from management to K devices with credit flow control
    /// (optionally slow devices); MB/s through the gateway and its memory
    Stream(stream::StreamArgs),
    /// A tokio + tokio-rustls + tokio-tungstenite echo server with default settings, as the
    /// reference point for side-by-side runs
    BaselineServer(baseline::BaselineArgs),
    /// Internal: one worker process of `idle` (started by the parent)
    #[command(name = "__worker", hide = true)]
    Worker { config: String },
    /// Internal: one worker process of `register` / `reconnect`
    #[command(name = "__fleet-worker", hide = true)]
    FleetWorker { config: String },
    /// Internal: one device worker process of `relay` / `stream`
    #[command(name = "__relay-worker", hide = true)]
    RelayWorker { config: String },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Idle(args) => idle::main(args),
        Command::BaselineServer(args) => baseline::main(args),
        Command::Register(args) => register::main(args),
        Command::Reconnect(args) => reconnect::main(args),
        Command::Worker { config } => worker::main(&config),
        Command::FleetWorker { config } => fleet_worker::main(&config),
        Command::Relay(args) => relay::main(args),
        Command::Stream(args) => stream::main(args),
        Command::RelayWorker { config } => relay_worker::main(&config),
    }
}
