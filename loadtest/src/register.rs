//! `loadtest register`: N devices register with one-time keys (`docs/protocol.md` §5.3) and
//! connect once with the credential they got ("connection ready"); registrations per second,
//! latencies, refusals by reason; the credentials go to `--creds-out` for `reconnect`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tokio::time::{Instant, sleep};

use crate::creds::CredsWriter;
use crate::fleet::{self, FleetContext};
use crate::fleet_wire::{FailCounts, FleetCommand, Job};
use crate::pool::{self, FleetArgs, FleetPlan, Pool, Step};
use crate::summary::{self, ConnectRate, Latency};
use crate::{sys, wire};

#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Keys file: one first-authentication key per line, as `fleetgate keys create --one-time N`
    /// prints them. Device i uses line i.
    #[arg(long)]
    pub keys: PathBuf,
    /// Number of devices (at most the number of keys from --first on)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub devices: u64,
    /// First device number and key line (to use one keys file for several runs)
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Write the credentials of every ready device here (JSON lines), for `loadtest reconnect`
    #[arg(long)]
    pub creds_out: Option<PathBuf>,
    /// Unit IDs are PREFIX + the device number in 6 digits: lt-000123
    #[arg(long, default_value = "lt-")]
    pub unit_prefix: String,
    /// Attempts per device; connect failures and retryable refusals (rate_limited,
    /// limit_reached, internal_error) are retried with the backoff
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// After `registered`, close and connect again with the new credential (a second, mutual
    /// TLS handshake), as devices that do not continue in session mode do. Default: ask the
    /// gateway to continue the registration connection as the session (`"session": true`,
    /// docs/protocol.md §5.3)
    #[arg(long)]
    pub reconnect: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegisterSummary {
    pub scenario: &'static str,
    pub url: String,
    pub target_devices: u64,
    /// `registered` received.
    pub registered: u64,
    /// Session `hello` received with the new credential.
    pub ready: u64,
    pub gave_up: u64,
    pub ok: bool,
    pub verdict: String,
    /// Ready devices per second: overall = ready / secs (go → last device finished).
    pub rate: ConnectRate,
    /// Parent's wall clock from `go` to the last worker done.
    pub wall_secs: f64,
    /// `register` sent → `registered` received.
    pub register_ms: Latency,
    /// First TCP connect → session `hello` with the new credential (key generation excluded).
    pub ready_ms: Latency,
    /// Every connect → session `hello`.
    pub session_ms: Latency,
    pub attempts: u64,
    /// Ready sessions that the gateway ended before the run did.
    pub sessions_lost: u64,
    pub refusals: BTreeMap<String, u64>,
    pub errors: FailCounts,
    /// `errors.timeout` by the step that did not finish in time.
    pub timeouts_by_step: BTreeMap<String, u64>,
    pub error_samples: BTreeMap<String, String>,
    pub creds_out: Option<String>,
    pub credentials_written: u64,
    pub gateway: Option<GatewayMemory>,
    pub generator_rss_bytes: u64,
    /// CPU seconds of all workers together (key generation, TLS, JSON).
    pub generator_cpu_secs: f64,
    pub setup: RegisterSetup,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayMemory {
    pub pid: u32,
    pub rss_before_bytes: Option<u64>,
    pub rss_after_bytes: Option<u64>,
    /// CPU seconds the gateway used from `go` to the last device done.
    pub cpu_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegisterSetup {
    pub server_addr: String,
    pub workers: usize,
    pub sources: Vec<String>,
    pub concurrency: usize,
    pub ramp_rate: Option<f64>,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    pub first: u64,
    pub interrupted: bool,
}

pub fn main(args: RegisterArgs) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: RegisterArgs) -> Result<ExitCode> {
    let fd_limit = sys::raise_fd_limit().unwrap_or_else(|_| sys::fd_hard_limit());
    let keys_text = std::fs::read_to_string(&args.keys)
        .with_context(|| format!("cannot read the keys file {}", args.keys.display()))?;
    let available = crate::creds::key_lines(&keys_text).count() as u64;
    if available < args.first + args.devices {
        bail!(
            "{} holds {available} keys; --first {} --devices {} needs {}",
            args.keys.display(),
            args.first,
            args.devices,
            args.first + args.devices
        );
    }
    let job = Job::Register {
        keys: std::fs::canonicalize(&args.keys)?,
        unit_prefix: args.unit_prefix.clone(),
        max_attempts: args.max_attempts,
        stay: !args.reconnect,
    };
    let default_workers = pool::cpus().max(pool::workers_for_descriptors(args.devices));
    let workers_guess = args.fleet.workers.unwrap_or(default_workers).max(1);
    let per_worker = args.devices.div_ceil(workers_guess);
    let concurrency = args.fleet.concurrency.div_ceil(workers_guess).max(1);
    let timeout = args.fleet.handshake_timeout;
    let max_runtime = (args
        .fleet
        .ramp_rate
        .map_or(0.0, |r| args.devices as f64 / r)
        + per_worker.div_ceil(concurrency) as f64 * 2.0 * timeout * f64::from(args.max_attempts)
        + f64::from(args.max_attempts) * args.fleet.backoff_cap
        + 120.0)
        .ceil() as u64;
    let mut plan = pool::plan(
        &args.fleet,
        args.devices,
        default_workers,
        job,
        max_runtime,
        fd_limit,
        sys::ephemeral_port_count(),
    )?;
    for w in &mut plan.workers {
        w.first_device += args.first;
    }
    for warning in &plan.warnings {
        eprintln!("loadtest: warning: {warning}");
    }
    if let Some(pid) = args.fleet.gateway_pid
        && sys::rss_bytes(pid).is_none()
    {
        bail!("there is no process {pid} to measure (--gateway-pid)");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, execute(args, plan))
}

/// One connection that stops at the register-mode `hello`: a wrong port, path or CA fails
/// here once, clearly, and no key is spent.
pub async fn probe(plan: &FleetPlan, expect_mode: &str) -> Result<String> {
    let ctx = FleetContext::from_config(&plan.workers[0])?;
    let started = Instant::now();
    let deadline = started + ctx.handshake_timeout;
    let result = async {
        let mut ws = fleet::open(&ctx, None, ctx.anonymous.clone(), deadline).await?;
        let hello = fleet::expect_hello(&mut ws, deadline, expect_mode).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), fleet::close(&mut ws)).await;
        hello
    }
    .await;
    match result {
        Ok(_) => Ok(format!(
            "hello mode={expect_mode} in {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        )),
        Err(fleet::Failure::Error { message, .. }) => {
            bail!(
                "the probe connection to {} failed: {message}",
                plan.target.url
            )
        }
        Err(fleet::Failure::Refused {
            reason, message, ..
        }) => {
            bail!("the probe connection was refused: {reason} ({message})")
        }
    }
}

async fn execute(args: RegisterArgs, plan: FleetPlan) -> Result<ExitCode> {
    let probe = probe(&plan, "register").await?;
    eprintln!(
        "loadtest: probe OK ({probe}); registering {} devices over {} worker(s), {} source address(es)",
        args.devices,
        plan.workers.len(),
        plan.sources.len()
    );
    let bar = pool::progress_bar(args.fleet.no_progress, Some(args.devices));
    let mut pool = Pool::new(bar.clone())?;
    if let Some(path) = &args.creds_out {
        pool.creds = Some(CredsWriter::create(path)?);
    }
    pool.spawn(&plan.workers)?;
    pool.wait_for_ready(Duration::from_secs(60)).await?;
    let gateway_before = args.fleet.gateway_pid.and_then(sys::rss_bytes);
    let gateway_cpu_before = args.fleet.gateway_pid.and_then(sys::cpu_secs);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner:.green} register [{elapsed_precise}] [{bar:40.cyan/blue}] {pos}/{len} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pool.broadcast(FleetCommand::Go).await;
    let go = Instant::now();
    let deadline = go + Duration::from_secs(plan.workers[0].max_runtime_secs + 30);
    let mut last_line = Instant::now();
    while !pool.workers.iter().all(|w| w.ramp_secs.is_some() || w.gone) {
        let tick = Instant::now() + Duration::from_millis(500);
        match pool.step(tick.min(deadline)).await? {
            Step::Interrupted => break,
            Step::Deadline if Instant::now() >= deadline => {
                pool.failures
                    .push("the run did not finish in time".to_owned());
                break;
            }
            _ => {}
        }
        let t = pool.total();
        let message = format!(
            "ready {} · registered {} · gave up {} · refusals {} · errors {}",
            t.ready,
            t.registered,
            t.gave_up,
            t.refusals.values().sum::<u64>(),
            t.errors.total()
        );
        bar.set_position(t.ready);
        bar.set_message(message.clone());
        if bar.is_hidden() && last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            eprintln!("loadtest: {:.0} s: {message}", go.elapsed().as_secs_f64());
        }
    }
    let wall = go.elapsed();
    let gateway_after = args.fleet.gateway_pid.and_then(sys::rss_bytes);
    let gateway_cpu = match (
        gateway_cpu_before,
        args.fleet.gateway_pid.and_then(sys::cpu_secs),
    ) {
        (Some(a), Some(b)) => Some(summary::round2(b - a)),
        _ => None,
    };
    let generator_rss = pool.workers_rss();
    pool.stop_and_collect(Duration::from_secs(20)).await?;
    // Let the pipe readers deliver the last credentials.
    sleep(Duration::from_millis(100)).await;
    while let Ok(Step::Event) = pool.step(Instant::now() + Duration::from_millis(50)).await {}
    bar.finish_and_clear();
    let written = match pool.creds.take() {
        Some(w) => w.finish()?,
        None => 0,
    };
    if let Some(e) = &pool.creds_error {
        pool.failures.push(e.clone());
    }

    let summary = summarize(
        &args,
        &plan,
        &pool,
        wall,
        written,
        [gateway_before, gateway_after],
        gateway_cpu,
        generator_rss,
    );
    print_human(&summary);
    let json = serde_json::to_string_pretty(&summary)?;
    println!("{json}");
    if let Some(path) = &args.fleet.json {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if summary.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    args: &RegisterArgs,
    plan: &FleetPlan,
    pool: &Pool,
    wall: Duration,
    written: u64,
    [gateway_before, gateway_after]: [Option<u64>; 2],
    gateway_cpu: Option<f64>,
    generator_rss: u64,
) -> RegisterSummary {
    let mut total = crate::fleet_wire::FleetProgress::default();
    let mut samples = BTreeMap::new();
    let (mut register, mut ready, mut session) = (
        wire::new_histogram(),
        wire::new_histogram(),
        wire::new_histogram(),
    );
    let mut per_second = Vec::new();
    let mut secs = 0f64;
    let mut generator_cpu = 0f64;
    for r in pool.results() {
        generator_cpu += r.cpu_secs;
        pool::add_progress(&mut total, &r.progress);
        for (k, v) in r.error_samples {
            samples.entry(k).or_insert(v);
        }
        wire::decode_histogram_into(&mut register, &r.register_us);
        wire::decode_histogram_into(&mut ready, &r.ready_us);
        wire::decode_histogram_into(&mut session, &r.session_us);
        summary::add_series(&mut per_second, &r.per_second);
        secs = secs.max(r.done_secs);
    }
    if secs == 0.0 {
        secs = wall.as_secs_f64();
    }
    let mut problems = Vec::new();
    if total.ready < args.devices {
        problems.push(format!(
            "only {} of {} devices ready",
            total.ready, args.devices
        ));
    }
    if total.lost > 0 {
        problems.push(format!(
            "{} ready sessions were closed by the gateway before the end",
            total.lost
        ));
    }
    if args.creds_out.is_some() && written != total.ready {
        problems.push(format!(
            "{written} credentials written for {} ready devices",
            total.ready
        ));
    }
    problems.extend(pool.failures.iter().cloned());
    let ok = problems.is_empty();
    let rate = summary::connect_rate(&per_second, secs, total.ready);
    let verdict = if ok {
        format!(
            "all {} devices registered and ready in {:.2} s ({:.0}/s)",
            args.devices, secs, rate.overall_per_sec
        )
    } else {
        problems.join("; ")
    };
    let first = &plan.workers[0];
    RegisterSummary {
        scenario: "register",
        url: plan.target.url.clone(),
        target_devices: args.devices,
        registered: total.registered,
        ready: total.ready,
        gave_up: total.gave_up,
        ok,
        verdict,
        rate,
        wall_secs: summary::round2(wall.as_secs_f64()),
        register_ms: summary::latency_ms(&register),
        ready_ms: summary::latency_ms(&ready),
        session_ms: summary::latency_ms(&session),
        attempts: total.attempts,
        sessions_lost: total.lost,
        refusals: total.refusals,
        errors: total.errors,
        timeouts_by_step: total.timeouts,
        error_samples: samples,
        creds_out: args.creds_out.as_ref().map(|p| p.display().to_string()),
        credentials_written: written,
        gateway: args.fleet.gateway_pid.map(|pid| GatewayMemory {
            pid,
            rss_before_bytes: gateway_before,
            rss_after_bytes: gateway_after,
            cpu_secs: gateway_cpu,
        }),
        generator_rss_bytes: generator_rss,
        generator_cpu_secs: summary::round2(generator_cpu),
        setup: RegisterSetup {
            server_addr: plan.addr.to_string(),
            workers: plan.workers.len(),
            sources: plan.sources.iter().map(ToString::to_string).collect(),
            concurrency: first.concurrency * plan.workers.len(),
            ramp_rate: args.fleet.ramp_rate,
            max_attempts: args.max_attempts,
            backoff_base_ms: first.backoff.base_ms,
            backoff_cap_ms: first.backoff.cap_ms,
            first: args.first,
            interrupted: pool.interrupted,
        },
    }
}

fn print_human(s: &RegisterSummary) {
    eprintln!(
        "loadtest: {}/{} devices ready ({} registered) in {:.2} s: {:.0}/s overall, median {:.0}/s, peak {}/s",
        s.ready,
        s.target_devices,
        s.registered,
        s.rate.ramp_secs,
        s.rate.overall_per_sec,
        s.rate.median_per_sec,
        s.rate.peak_per_sec
    );
    eprintln!(
        "loadtest: register→registered p50 {:.1} ms, p99 {:.1} ms; registration→ready p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        s.register_ms.p50, s.register_ms.p99, s.ready_ms.p50, s.ready_ms.p99, s.ready_ms.max
    );
    eprintln!(
        "loadtest: CPU: gateway {} s, load generator {:.2} s",
        s.gateway
            .as_ref()
            .and_then(|g| g.cpu_secs)
            .map_or("?".to_owned(), |c| format!("{c:.2}")),
        s.generator_cpu_secs
    );
    if !s.refusals.is_empty() {
        eprintln!("loadtest: refusals: {:?}", s.refusals);
    }
    for (kind, message) in &s.error_samples {
        eprintln!("loadtest: {kind}, e.g.: {message}");
    }
    eprintln!(
        "loadtest: {}: {}",
        if s.ok { "OK" } else { "FAILED" },
        s.verdict
    );
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: RegisterArgs,
    }

    fn parse(line: &str) -> Result<RegisterArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(line.split_whitespace())).map(|c| c.a)
    }

    #[test]
    fn parses_the_documented_command_line() {
        let a = parse(
            "--url wss://127.0.0.1:8443/usg/endpoint --ca /tmp/lt/root.pem --keys /tmp/keys.txt \
             --devices 10000 --creds-out /tmp/creds.jsonl --workers 2 --json r.json",
        )
        .unwrap();
        assert_eq!(a.devices, 10_000);
        assert_eq!(a.first, 0);
        assert_eq!(a.unit_prefix, "lt-");
        assert_eq!(a.max_attempts, 5);
        assert_eq!(a.fleet.workers, Some(2));
        assert_eq!(a.fleet.concurrency, 256);
        assert_eq!((a.fleet.backoff_base, a.fleet.backoff_cap), (1.0, 300.0));
        assert_eq!(
            a.creds_out.as_deref(),
            Some(std::path::Path::new("/tmp/creds.jsonl"))
        );
    }

    #[test]
    fn rejects_missing_or_bad_arguments() {
        assert!(parse("--url wss://h/ --devices 1").is_err()); // no --keys
        assert!(parse("--url wss://h/ --keys k --devices 0").is_err());
        assert!(parse("--url wss://h/ --keys k --devices 1 --max-attempts 0").is_err());
        assert!(parse("--url wss://h/ --keys k --devices 1 --ca c --insecure").is_err());
        assert!(parse("--url wss://h/ --keys k --devices 1 --backoff-base soon").is_err());
    }
}
