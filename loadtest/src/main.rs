//! `loadtest`: simulates fleets of devices against fleetgate or any other `ws://`/`wss://`
//! server and measures what they cost it. See `loadtest/README.md`.

mod baseline;
mod device;
mod idle;
mod plan;
mod sources;
mod summary;
mod sys;
mod target;
mod tls;
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
    /// A tokio + tokio-rustls + tokio-tungstenite echo server with default settings, as the
    /// reference point for side-by-side runs
    BaselineServer(baseline::BaselineArgs),
    /// Internal: one worker process of `idle` (started by the parent)
    #[command(name = "__worker", hide = true)]
    Worker { config: String },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Idle(args) => idle::main(args),
        Command::BaselineServer(args) => baseline::main(args),
        Command::Worker { config } => worker::main(&config),
    }
}
