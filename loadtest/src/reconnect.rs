//! `loadtest reconnect`: N registered devices connect with their credentials and stay
//! connected; the gateway is restarted (by this harness or by the operator); the devices
//! reconnect with exponential backoff and full jitter (§5.5), honouring `retry_after_ms`.
//! Measures the time from the gateway listening again until every device has its session
//! `hello` again, and the re-authentication rate second by second.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::process::Command as Process;
use tokio::time::{Instant, timeout};

use crate::fleet::{self, FleetContext};
use crate::fleet_wire::{FailCounts, FleetCommand, Job, unix_ms};
use crate::pool::{self, FleetArgs, FleetPlan, Pool, Step};
use crate::summary::{self, Latency};
use crate::{sys, wire};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopSignal {
    Term,
    Kill,
    Int,
}

#[derive(Debug, Clone, Args)]
pub struct ReconnectArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Credentials file written by `loadtest register --creds-out`
    #[arg(long)]
    pub creds: PathBuf,
    /// Use the first N credentials (default: all)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub devices: Option<u64>,
    /// Restart by this harness: send --signal to --gateway-pid, wait for it to exit, then run
    /// this shell command (`sh -c`), which must start the gateway again (e.g.
    /// "exec fleetgate serve --data-dir …"). It is left running when loadtest exits.
    #[arg(long, requires = "gateway_pid", conflicts_with = "restart_cmd")]
    pub start_cmd: Option<String>,
    /// Restart by a shell command that does it all (e.g. "systemctl restart fleetgate")
    #[arg(long)]
    pub restart_cmd: Option<String>,
    /// Signal for --start-cmd mode
    #[arg(long, value_enum, default_value_t = StopSignal::Term)]
    pub signal: StopSignal,
    /// Output of --start-cmd / --restart-cmd (default: discarded)
    #[arg(long)]
    pub start_log: Option<PathBuf>,
    /// Seconds to wait for the old gateway to exit (--start-cmd), or for the gateway to go
    /// down and listen again (--restart-cmd, or the operator when neither is given)
    #[arg(long, value_parser = crate::plan::parse_secs, default_value = "120")]
    pub restart_wait: f64,
    /// Seconds after the gateway listens again to wait for every device to re-authenticate
    #[arg(long, value_parser = crate::plan::parse_secs, default_value = "120")]
    pub storm_timeout: f64,
    /// The target: every device re-authenticated within this many seconds of listening again
    #[arg(long, value_parser = crate::plan::parse_secs, default_value = "30")]
    pub target: f64,
    /// Seconds to wait for every device's first session before the restart
    #[arg(long, value_parser = crate::plan::parse_secs, default_value = "600")]
    pub connect_timeout: f64,
    /// Cap on reconnect attempts in flight at once, all workers together (default: none).
    /// With a cap, devices beyond it wait inside the generator instead of all handshaking at
    /// once in lockstep (a generator artifact: a real fleet has a CPU per device); their
    /// handshake timeout starts when they get their turn
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub attempt_cap: Option<u64>,
    /// Resume TLS sessions across reconnects (each device keeps its session tickets, as the
    /// fleetgate agent does); default: a full handshake every time, the worst case
    #[arg(long)]
    pub tls_resume: bool,
    /// Seconds to keep everyone connected after the storm (to see that sessions stay up)
    #[arg(long, value_parser = crate::plan::parse_secs, default_value = "0")]
    pub hold: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReconnectSummary {
    pub scenario: &'static str,
    pub url: String,
    pub target_devices: u64,
    /// Sessions open just before the restart.
    pub connected_before_restart: u64,
    /// Devices that got a session `hello` on a connection begun after the restart started.
    pub reauthenticated: u64,
    pub gave_up: u64,
    pub ok: bool,
    pub within_target: bool,
    pub verdict: String,
    /// Gateway listening again → every device connected with a new session, seconds.
    pub time_to_all_reauthenticated_secs: Option<f64>,
    pub target_secs: f64,
    pub restart: RestartTimes,
    /// First session `hello` per device after the restart, per second after `listening`.
    pub reauth_per_second: Vec<u64>,
    pub reauth_peak_per_sec: u64,
    /// Loss of its session → new session `hello`, per device.
    pub downtime_ms: Latency,
    /// TCP connect → session `hello`, every session of the run.
    pub session_ms: Latency,
    /// Connect attempts per device after the restart began (1 = came back at the first try).
    pub attempts_per_device: Latency,
    /// Sessions (whole run) whose TLS handshake resumed an earlier one (`--tls-resume`).
    pub resumed_sessions: u64,
    pub refusals: BTreeMap<String, u64>,
    /// Whole run; `connect` includes the refusals while the gateway was down (expected).
    pub errors: FailCounts,
    /// `errors.timeout` by the step that did not finish in time.
    pub timeouts_by_step: BTreeMap<String, u64>,
    pub error_samples: BTreeMap<String, String>,
    pub gateway_rss_bytes: Option<u64>,
    /// CPU seconds of the new gateway from its start to the end of the storm
    /// (`--start-cmd` mode only).
    pub gateway_storm_cpu_secs: Option<f64>,
    pub generator_rss_bytes: u64,
    /// CPU seconds of all workers: the whole run, and from the restart to the end of the storm.
    pub generator_cpu_secs: f64,
    pub generator_storm_cpu_secs: Option<f64>,
    pub setup: ReconnectSetup,
}

/// Milliseconds after the restart began (signal sent / command started / first loss seen).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestartTimes {
    pub mode: String,
    pub old_pid: Option<u32>,
    pub new_pid: Option<u32>,
    pub old_exited_ms: Option<u64>,
    pub start_cmd_ms: Option<u64>,
    pub listening_ms: Option<u64>,
    pub first_loss_ms: Option<i64>,
    pub last_loss_ms: Option<i64>,
    pub all_reauthenticated_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReconnectSetup {
    pub server_addr: String,
    pub workers: usize,
    pub sources: Vec<String>,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    pub concurrency_first_connect: usize,
    pub handshake_timeout_secs: f64,
    pub tls_resume: bool,
    pub attempt_cap: Option<u64>,
    pub initial_connect_secs: f64,
    pub interrupted: bool,
}

pub fn main(args: ReconnectArgs) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: ReconnectArgs) -> Result<ExitCode> {
    let fd_limit = sys::raise_fd_limit().unwrap_or_else(|_| sys::fd_hard_limit());
    let available = crate::creds::count(&args.creds)?;
    let devices = args.devices.unwrap_or(available);
    if devices == 0 || devices > available {
        bail!(
            "{} holds {available} credentials, {devices} asked for",
            args.creds.display()
        );
    }
    let workers_guess = args
        .fleet
        .workers
        .unwrap_or_else(|| pool::workers_for_descriptors(devices).max(pool::cpus()))
        .clamp(1, devices);
    let job = Job::Reconnect {
        attempt_cap: args
            .attempt_cap
            .map(|c| c.div_ceil(workers_guess).max(1) as usize),
        creds: std::fs::canonicalize(&args.creds)?,
        resume: args.tls_resume,
    };
    let max_runtime =
        (args.connect_timeout + args.restart_wait * 2.0 + args.storm_timeout + args.hold + 300.0)
            .ceil() as u64;
    let plan = pool::plan(
        &args.fleet,
        devices,
        // Descriptors, and at least one worker per CPU: the storm is CPU-bound in the
        // generator too (a single-threaded worker makes every ClientHello in turn).
        pool::workers_for_descriptors(devices).max(pool::cpus()),
        job,
        max_runtime,
        fd_limit,
        sys::ephemeral_port_count(),
    )?;
    for warning in &plan.warnings {
        eprintln!("loadtest: warning: {warning}");
    }
    if let Some(pid) = args.fleet.gateway_pid
        && sys::rss_bytes(pid).is_none()
    {
        bail!("there is no process {pid} (--gateway-pid): is the gateway running?");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, execute(args, plan, devices))
}

/// One session with the first credential: wrong URL, CA or credentials fail here, once.
async fn probe(plan: &FleetPlan, args: &ReconnectArgs) -> Result<String> {
    let ctx = FleetContext::from_config(&plan.workers[0])?;
    let cred = crate::creds::read_slice(&args.creds, 0, 1)?.remove(0);
    let (chain, key) = cred.decode()?;
    let config = ctx.with_credential(crate::tls::certified_key(chain, &key)?);
    let started = Instant::now();
    let deadline = started + ctx.handshake_timeout;
    let result = async {
        let mut ws = fleet::open(&ctx, None, config, deadline).await?;
        let hello = fleet::expect_hello(&mut ws, deadline, "session").await;
        let _ = timeout(Duration::from_secs(2), fleet::close(&mut ws)).await;
        hello
    }
    .await;
    match result {
        Ok(unit) => Ok(format!(
            "session hello for {} in {:.1} ms",
            unit.unwrap_or(cred.unit_id),
            started.elapsed().as_secs_f64() * 1000.0
        )),
        Err(fleet::Failure::Error { message, .. }) => {
            bail!("the probe session ({}) failed: {message}", cred.unit_id)
        }
        Err(fleet::Failure::Refused {
            reason, message, ..
        }) => bail!(
            "the probe session ({}) was refused: {reason} ({message}) — were these credentials \
             registered with this gateway (and not superseded by a later run)?",
            cred.unit_id
        ),
    }
}

/// Whether something accepts TCP connections at the gateway's address.
async fn listening(addr: std::net::SocketAddr) -> bool {
    matches!(
        timeout(Duration::from_millis(250), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

fn shell(cmd: &str, log: Option<&PathBuf>) -> Result<tokio::process::Child> {
    let (out, err) = match log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            (Stdio::from(file.try_clone()?), Stdio::from(file))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    Process::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: Ctrl-C on loadtest does not reach the new gateway.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run `{cmd}`"))
}

/// Pumps worker events for up to `d`.
async fn pump(pool: &mut Pool, d: Duration) -> Result<bool> {
    let until = Instant::now() + d;
    loop {
        match pool.step(until).await? {
            Step::Event => {}
            Step::Deadline => return Ok(true),
            Step::Interrupted => return Ok(false),
        }
    }
}

async fn execute(args: ReconnectArgs, plan: FleetPlan, devices: u64) -> Result<ExitCode> {
    let probe = probe(&plan, &args).await?;
    eprintln!(
        "loadtest: probe OK ({probe}); connecting {devices} devices over {} worker(s), {} source address(es)",
        plan.workers.len(),
        plan.sources.len()
    );
    let bar = pool::progress_bar(args.fleet.no_progress, Some(devices));
    let mut pool = Pool::new(bar.clone())?;
    pool.spawn(&plan.workers)?;
    pool.wait_for_ready(Duration::from_secs(120)).await?;
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner:.green} {prefix} [{elapsed_precise}] [{bar:40.cyan/blue}] {pos}/{len} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix("connect");
    pool.broadcast(FleetCommand::Go).await;
    let go = Instant::now();
    let connect_deadline = go + Duration::from_secs_f64(args.connect_timeout);
    let mut last_line = Instant::now();
    let mut aborted = None;
    while !pool.workers.iter().all(|w| w.ramp_secs.is_some() || w.gone) {
        match pool
            .step((Instant::now() + Duration::from_millis(500)).min(connect_deadline))
            .await?
        {
            Step::Interrupted => {
                aborted = Some("interrupted".to_owned());
                break;
            }
            Step::Deadline if Instant::now() >= connect_deadline => {
                aborted = Some(format!(
                    "not every device connected within --connect-timeout {} s",
                    args.connect_timeout
                ));
                break;
            }
            _ => {}
        }
        let t = pool.total();
        let message = format!(
            "connected {} · refusals {} · errors {}",
            t.connected,
            t.refusals.values().sum::<u64>(),
            t.errors.total()
        );
        bar.set_position(t.first_sessions);
        bar.set_message(message.clone());
        if bar.is_hidden() && last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            eprintln!(
                "loadtest: connect: {} of {devices} had a session; {message}",
                t.first_sessions
            );
        }
    }
    let initial_connect = go.elapsed();
    let mut times = RestartTimes::default();
    let mut connected_before = 0;
    let mut t_stop = unix_ms();
    let mut listen_at: Option<u64> = None;
    let mut generator_cpu_at_mark: Option<f64> = None;
    if aborted.is_none() && pump(&mut pool, Duration::from_secs(1)).await? {
        connected_before = pool.total().connected;
        eprintln!(
            "loadtest: {connected_before} devices connected in {:.1} s; restarting the gateway",
            initial_connect.as_secs_f64()
        );
        generator_cpu_at_mark = Some(
            pool.workers
                .iter()
                .filter_map(|w| sys::cpu_secs(w.pid))
                .sum(),
        );
        match restart(&args, &plan, &mut pool, &mut times).await {
            Ok((stop, listen)) => {
                t_stop = stop;
                listen_at = Some(listen);
            }
            Err(e) => aborted = Some(format!("{e:#}")),
        }
    }

    // The storm: until every device has a new session, or the timeout.
    let mut all_at: Option<u64> = None;
    if let (None, Some(listen)) = (&aborted, listen_at) {
        bar.set_prefix("storm");
        bar.set_position(0);
        let storm_deadline = Instant::now()
            + Duration::from_secs_f64(args.storm_timeout)
                .saturating_sub(Duration::from_millis(unix_ms().saturating_sub(listen)));
        loop {
            let full: Option<u64> = pool
                .workers
                .iter()
                .map(|w| w.progress.all_reauthed_at_ms)
                .try_fold(0u64, |m, t| t.map(|t| m.max(t)));
            if full.is_some() {
                all_at = full;
                break;
            }
            match pool
                .step((Instant::now() + Duration::from_millis(250)).min(storm_deadline))
                .await?
            {
                Step::Interrupted => break,
                Step::Deadline if Instant::now() >= storm_deadline => break,
                _ => {}
            }
            let t = pool.total();
            let message = format!(
                "re-authenticated {} · {:.1} s since listening · refusals {} · connect errors {} · other errors {}",
                t.reauthed,
                unix_ms().saturating_sub(listen) as f64 / 1000.0,
                t.refusals.values().sum::<u64>(),
                t.errors.connect,
                t.errors.total() - t.errors.connect
            );
            bar.set_position(t.reauthed);
            bar.set_message(message.clone());
            if bar.is_hidden() && last_line.elapsed() >= Duration::from_secs(2) {
                last_line = Instant::now();
                eprintln!("loadtest: storm: {message}");
            }
        }
        if all_at.is_some() && args.hold > 0.0 {
            pump(&mut pool, Duration::from_secs_f64(args.hold)).await?;
        }
    }
    let gateway_storm_cpu = times.new_pid.and_then(sys::cpu_secs);
    let generator_storm_cpu = generator_cpu_at_mark.map(|before| {
        let now: f64 = pool
            .workers
            .iter()
            .filter_map(|w| sys::cpu_secs(w.pid))
            .sum();
        summary::round2(now - before)
    });
    let gateway_rss = times
        .new_pid
        .or(if times.mode == "pid" {
            None
        } else {
            args.fleet.gateway_pid
        })
        .and_then(sys::rss_bytes);
    let generator_rss = pool.workers_rss();
    pool.stop_and_collect(Duration::from_secs(30)).await?;
    bar.finish_and_clear();

    let summary = summarize(
        &args,
        &plan,
        &pool,
        devices,
        connected_before,
        times,
        t_stop,
        listen_at,
        all_at,
        aborted,
        gateway_rss,
        generator_rss,
        initial_connect,
    );
    let summary = ReconnectSummary {
        gateway_storm_cpu_secs: gateway_storm_cpu.map(summary::round2),
        generator_storm_cpu_secs: generator_storm_cpu,
        ..summary
    };
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

/// Marks the workers, restarts the gateway (or waits for the operator to), and returns the
/// unix ms at which the restart began and at which the gateway listened again.
async fn restart(
    args: &ReconnectArgs,
    plan: &FleetPlan,
    pool: &mut Pool,
    times: &mut RestartTimes,
) -> Result<(u64, u64)> {
    let wait = Duration::from_secs_f64(args.restart_wait);
    pool.broadcast(FleetCommand::Mark).await;
    // Let the workers take the mark before anything drops.
    pump(pool, Duration::from_millis(100)).await?;
    let addr = plan.addr;
    if let Some(start) = &args.start_cmd {
        times.mode = "pid".into();
        let pid = args.fleet.gateway_pid.expect("clap requires --gateway-pid");
        times.old_pid = Some(pid);
        let signal = match args.signal {
            StopSignal::Term => nix::sys::signal::Signal::SIGTERM,
            StopSignal::Kill => nix::sys::signal::Signal::SIGKILL,
            StopSignal::Int => nix::sys::signal::Signal::SIGINT,
        };
        let t_stop = unix_ms();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .with_context(|| format!("cannot signal the gateway (pid {pid})"))?;
        let deadline = Instant::now() + wait;
        while !exited(pid) {
            if Instant::now() >= deadline {
                bail!(
                    "the gateway (pid {pid}) did not exit within {} s of {:?}",
                    wait.as_secs(),
                    args.signal
                );
            }
            if !pump(pool, Duration::from_millis(10)).await? {
                bail!("interrupted during the restart");
            }
        }
        times.old_exited_ms = Some(unix_ms() - t_stop);
        let child = shell(start, args.start_log.as_ref())?;
        times.start_cmd_ms = Some(unix_ms() - t_stop);
        times.new_pid = child.id();
        eprintln!(
            "loadtest: old gateway exited after {} ms; started `{start}` (pid {})",
            times.old_exited_ms.unwrap_or(0),
            child.id().map_or("?".to_owned(), |p| p.to_string())
        );
        // Not waited for: the new gateway outlives this run (its pid is in the summary).
        drop(child);
        let listen = wait_listening(pool, addr, Instant::now() + wait).await?;
        times.listening_ms = Some(listen - t_stop);
        return Ok((t_stop, listen));
    }
    let mut child = None;
    let lost_before = pool.total().lost;
    let mut t_stop = unix_ms();
    if let Some(cmd) = &args.restart_cmd {
        times.mode = "command".into();
        child = Some(shell(cmd, args.start_log.as_ref())?);
    } else {
        times.mode = "watch".into();
        eprintln!(
            "loadtest: restart the gateway now (waiting up to {} s)",
            wait.as_secs()
        );
    }
    // "Down" is seen through the devices losing their sessions, not by probing the port of a
    // gateway that is up (each probe would be one more connection for it to accept and
    // drop). From then on, probe until it accepts again.
    let deadline = Instant::now() + wait;
    let mut down = false;
    let mut command_done = false;
    loop {
        if let Some(c) = &mut child
            && !command_done
            && let Ok(Some(status)) = c.try_wait()
        {
            command_done = true;
            if !status.success() {
                eprintln!("loadtest: warning: the restart command exited with {status}");
            }
        }
        if !down && pool.total().lost > lost_before {
            down = true;
            if times.mode == "watch" {
                t_stop = unix_ms();
            }
        }
        if (down || command_done) && listening(addr).await {
            let listen = unix_ms();
            times.listening_ms = Some(listen - t_stop);
            return Ok((t_stop, listen));
        }
        if Instant::now() >= deadline {
            bail!(
                "the gateway was not restarted, or did not listen again, within {} s",
                wait.as_secs()
            );
        }
        if !pump(pool, Duration::from_millis(10)).await? {
            bail!("interrupted during the restart");
        }
    }
}

async fn wait_listening(
    pool: &mut Pool,
    addr: std::net::SocketAddr,
    deadline: Instant,
) -> Result<u64> {
    loop {
        if listening(addr).await {
            return Ok(unix_ms());
        }
        if Instant::now() >= deadline {
            bail!("the new gateway did not listen on {addr} in time (see --start-log)");
        }
        if !pump(pool, Duration::from_millis(10)).await? {
            bail!("interrupted while waiting for the new gateway");
        }
    }
}

/// Per-second counts of `timestamps` (unix ms) from `zero` on; earlier ones count in second 0.
pub fn per_second_after(timestamps: &[u64], zero: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &t in timestamps {
        let s = (t.saturating_sub(zero) / 1000) as usize;
        if out.len() <= s {
            out.resize(s + 1, 0);
        }
        out[s] += 1;
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    args: &ReconnectArgs,
    plan: &FleetPlan,
    pool: &Pool,
    devices: u64,
    connected_before: u64,
    times: RestartTimes,
    t_stop: u64,
    listen_at: Option<u64>,
    all_at: Option<u64>,
    aborted: Option<String>,
    gateway_rss: Option<u64>,
    generator_rss: u64,
    initial_connect: Duration,
) -> ReconnectSummary {
    let mut total = crate::fleet_wire::FleetProgress::default();
    let mut samples = BTreeMap::new();
    let (mut downtime, mut session) = (wire::new_histogram(), wire::new_histogram());
    let mut attempts = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1_000_000, 3)
        .expect("valid histogram bounds");
    let mut reauth_at = Vec::new();
    let mut generator_cpu = 0f64;
    let (mut first_loss, mut last_loss): (Option<u64>, Option<u64>) = (None, None);
    for r in pool.results() {
        pool::add_progress(&mut total, &r.progress);
        generator_cpu += r.cpu_secs;
        for (k, v) in r.error_samples {
            samples.entry(k).or_insert(v);
        }
        wire::decode_histogram_into(&mut downtime, &r.downtime_us);
        wire::decode_histogram_into(&mut session, &r.session_us);
        wire::decode_histogram_into(&mut attempts, &r.attempts_after_mark);
        reauth_at.extend(r.reauth_at_ms);
        first_loss = match (first_loss, r.first_loss_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last_loss = last_loss.max(r.last_loss_ms);
    }
    let rel = |t: u64| t as i64 - t_stop as i64;
    let mut times = times;
    times.first_loss_ms = first_loss.map(rel);
    times.last_loss_ms = last_loss.map(rel);
    times.all_reauthenticated_ms = all_at.map(rel);
    let time_to_all = match (listen_at, all_at) {
        (Some(l), Some(a)) => Some(summary::round2(a.saturating_sub(l) as f64 / 1000.0)),
        _ => None,
    };
    let per_second = listen_at.map_or_else(Vec::new, |l| per_second_after(&reauth_at, l));
    let within_target = time_to_all.is_some_and(|t| t <= args.target);
    let mut problems = Vec::new();
    if let Some(a) = aborted {
        problems.push(a);
    }
    if listen_at.is_some() && all_at.is_none() {
        problems.push(format!(
            "only {} of {} devices re-authenticated within --storm-timeout {} s",
            reauth_at.len(),
            devices,
            args.storm_timeout
        ));
    }
    problems.extend(pool.failures.iter().cloned());
    let ok = problems.is_empty();
    let verdict = if ok {
        format!(
            "all {} devices re-authenticated {:.2} s after the gateway listened again ({} the {} s target)",
            devices - total.gave_up,
            time_to_all.unwrap_or(0.0),
            if within_target { "within" } else { "beyond" },
            args.target
        )
    } else {
        problems.join("; ")
    };
    let attempts_latency = if attempts.is_empty() {
        Latency::default()
    } else {
        Latency {
            samples: attempts.len(),
            p50: attempts.value_at_quantile(0.5) as f64,
            p90: attempts.value_at_quantile(0.9) as f64,
            p99: attempts.value_at_quantile(0.99) as f64,
            max: attempts.max() as f64,
            mean: summary::round2(attempts.mean()),
        }
    };
    let first = &plan.workers[0];
    ReconnectSummary {
        scenario: "reconnect",
        url: plan.target.url.clone(),
        target_devices: devices,
        connected_before_restart: connected_before,
        reauthenticated: reauth_at.len() as u64,
        gave_up: total.gave_up,
        ok,
        within_target,
        verdict,
        time_to_all_reauthenticated_secs: time_to_all,
        target_secs: args.target,
        restart: times,
        reauth_peak_per_sec: per_second.iter().copied().max().unwrap_or(0),
        reauth_per_second: per_second,
        downtime_ms: summary::latency_ms(&downtime),
        session_ms: summary::latency_ms(&session),
        attempts_per_device: attempts_latency,
        resumed_sessions: total.resumed,
        refusals: total.refusals,
        errors: total.errors,
        timeouts_by_step: total.timeouts,
        error_samples: samples,
        gateway_rss_bytes: gateway_rss,
        gateway_storm_cpu_secs: None,
        generator_rss_bytes: generator_rss,
        generator_cpu_secs: summary::round2(generator_cpu),
        generator_storm_cpu_secs: None,
        setup: ReconnectSetup {
            server_addr: plan.addr.to_string(),
            workers: plan.workers.len(),
            sources: plan.sources.iter().map(ToString::to_string).collect(),
            backoff_base_ms: first.backoff.base_ms,
            backoff_cap_ms: first.backoff.cap_ms,
            concurrency_first_connect: first.concurrency * plan.workers.len(),
            handshake_timeout_secs: args.fleet.handshake_timeout,
            tls_resume: args.tls_resume,
            attempt_cap: args.attempt_cap,
            initial_connect_secs: summary::round2(initial_connect.as_secs_f64()),
            interrupted: pool.interrupted,
        },
    }
}

fn print_human(s: &ReconnectSummary) {
    let r = &s.restart;
    eprintln!(
        "loadtest: restart ({}): old gateway exited +{} ms, listening +{} ms, first loss {} ms, all re-authenticated +{} ms",
        r.mode,
        r.old_exited_ms.map_or("?".into(), |v| v.to_string()),
        r.listening_ms.map_or("?".into(), |v| v.to_string()),
        r.first_loss_ms.map_or("?".into(), |v| format!("{v:+}")),
        r.all_reauthenticated_ms
            .map_or("?".into(), |v| v.to_string()),
    );
    eprintln!(
        "loadtest: {}/{} re-authenticated; {} s from listening to all; peak {}/s; per second: {:?}",
        s.reauthenticated,
        s.target_devices,
        s.time_to_all_reauthenticated_secs
            .map_or("?".into(), |t| format!("{t:.2}")),
        s.reauth_peak_per_sec,
        s.reauth_per_second
    );
    eprintln!(
        "loadtest: downtime per device p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; attempts per device p50 {} max {}",
        s.downtime_ms.p50,
        s.downtime_ms.p99,
        s.downtime_ms.max,
        s.attempts_per_device.p50,
        s.attempts_per_device.max
    );
    eprintln!(
        "loadtest: CPU during the storm: new gateway {} s, load generator {} s",
        s.gateway_storm_cpu_secs
            .map_or("?".to_owned(), |c| format!("{c:.2}")),
        s.generator_storm_cpu_secs
            .map_or("?".to_owned(), |c| format!("{c:.2}"))
    );
    if !s.refusals.is_empty() {
        eprintln!("loadtest: refusals: {:?}", s.refusals);
    }
    eprintln!(
        "loadtest: errors: {:?}; timeouts by step: {:?}",
        s.errors, s.timeouts_by_step
    );
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
    use super::*;

    #[test]
    fn per_second_counts_from_listening() {
        let zero = 1_000_000;
        let series = per_second_after(
            &[zero - 5, zero + 10, zero + 999, zero + 1000, zero + 3500],
            zero,
        );
        assert_eq!(series, [3, 1, 0, 1]);
        assert!(per_second_after(&[], zero).is_empty());
    }

    #[test]
    fn parses_the_restart_options() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: ReconnectArgs,
        }
        let parse = |line: &str| {
            Cli::try_parse_from(std::iter::once("x").chain(line.split_whitespace())).map(|c| c.a)
        };
        let a = parse(
            "--url wss://127.0.0.1:18443/usg/endpoint --ca r.pem --creds c.jsonl --gateway-pid 7 \
             --start-cmd true --backoff-base 250ms --backoff-cap 20 --target 30",
        )
        .unwrap();
        assert_eq!(a.start_cmd.as_deref(), Some("true"));
        assert_eq!(a.signal, StopSignal::Term);
        assert_eq!((a.fleet.backoff_base, a.fleet.backoff_cap), (0.25, 20.0));
        // --start-cmd needs the pid of the gateway to stop, and excludes --restart-cmd.
        assert!(parse("--url wss://h/ --creds c --start-cmd true").is_err());
        assert!(
            parse("--url wss://h/ --creds c --gateway-pid 1 --start-cmd a --restart-cmd b")
                .is_err()
        );
        assert!(parse("--url wss://h/ --creds c --restart-cmd b").is_ok());
    }

    #[test]
    fn a_missing_process_counts_as_exited() {
        assert!(!exited(std::process::id()));
        assert!(exited(u32::MAX - 1));
    }
}
