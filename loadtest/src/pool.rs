//! The parent side of the `register` and `reconnect` scenarios: the common arguments, the
//! plan (which worker runs which devices from which source addresses) and the pool of worker
//! processes (start, commands, reports, signals, reaping).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command as Process};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use crate::backoff::Backoff;
use crate::creds::CredsWriter;
use crate::fleet_wire::{FleetCommand, FleetConfig, FleetProgress, FleetReport, FleetResult, Job};
use crate::plan::{DEVICES_PER_WORKER, parse_secs, split};
use crate::sources::{self, SourceSpec};
use crate::target::Target;
use crate::tls::{TlsVersions, Trust};
use crate::wire::TlsSettings;

/// Descriptors a worker needs besides one per device (a `register` device briefly holds two).
const FD_RESERVE: u64 = 64;

/// Arguments both scenarios share.
#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// Gateway device endpoint, e.g. wss://127.0.0.1:8443/usg/endpoint
    #[arg(long)]
    pub url: String,
    /// PEM root certificate(s) to trust (fleetgate: DATA_DIR/root.pem); default: system bundle
    #[arg(long, conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Accept any server certificate (handshake signatures are still checked)
    #[arg(long)]
    pub insecure: bool,
    /// TLS server name to send and check (default: the URL host)
    #[arg(long)]
    pub sni: Option<String>,
    /// TLS versions to offer
    #[arg(long, value_enum, default_value_t = TlsVersions::Any)]
    pub tls: TlsVersions,
    /// Worker processes (default: one per CPU for register, one per 18,000 devices for reconnect)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub workers: Option<u64>,
    /// Source addresses: a count (127.0.0.2, …), A-B, A,B or `none` (default: one loopback
    /// address per 5,000 devices for loopback targets)
    #[arg(long)]
    pub sources: Option<SourceSpec>,
    /// Devices in their first attempt at once, all workers together
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: u64,
    /// Cap on devices started per second, all workers together (default: unlimited)
    #[arg(long)]
    pub ramp_rate: Option<f64>,
    /// Seconds for each step (connect + TLS + upgrade + the expected message)
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub handshake_timeout: f64,
    /// Backoff base: attempt n waits uniformly in [0, min(cap, base × 2^n)] (§5.5)
    #[arg(long, value_parser = parse_secs, default_value = "1")]
    pub backoff_base: f64,
    /// Backoff cap
    #[arg(long, value_parser = parse_secs, default_value = "300")]
    pub backoff_cap: f64,
    /// PID of the gateway, to read its memory (VmRSS)
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Also write the JSON summary here
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar (a line every 5 s on stderr instead)
    #[arg(long)]
    pub no_progress: bool,
}

/// The resolved plan.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    pub target: Target,
    pub addr: SocketAddr,
    pub sources: Vec<IpAddr>,
    pub workers: Vec<FleetConfig>,
    pub warnings: Vec<String>,
}

/// Plans `devices` devices over the workers. `default_workers` applies without `--workers`.
pub fn plan(
    args: &FleetArgs,
    devices: u64,
    default_workers: u64,
    job: Job,
    max_runtime_secs: u64,
    fd_limit: u64,
    port_count: Option<u64>,
) -> Result<FleetPlan> {
    let target = Target::parse(&args.url)?;
    if !target.secure {
        bail!(
            "{} is plain ws://: device registration and sessions need wss://",
            target.url
        );
    }
    let addr = target.resolve()?;
    if args.handshake_timeout <= 0.0 {
        bail!("--handshake-timeout must be positive");
    }
    if args.backoff_cap < args.backoff_base {
        bail!("--backoff-cap must not be below --backoff-base");
    }
    if let Some(rate) = args.ramp_rate
        && !(rate > 0.0 && rate.is_finite())
    {
        bail!("--ramp-rate must be a positive number of devices per second");
    }
    let spec = args
        .sources
        .clone()
        .unwrap_or_else(|| SourceSpec::default_for(addr.ip(), devices));
    let sources = spec.addresses();
    let warnings = sources::check(&sources, addr.ip(), devices, port_count)?;
    let workers = args
        .workers
        .unwrap_or(default_workers)
        .clamp(1, devices.max(1));
    let shares = split(devices, workers);
    let largest = shares.iter().map(|&(_, c)| c).max().unwrap_or(0);
    if largest + FD_RESERVE > fd_limit {
        bail!(
            "each worker would hold {largest} connections, but a process may open only {fd_limit} \
             files here (ulimit -Hn): use --workers {} or more",
            devices.div_ceil(fd_limit.saturating_sub(FD_RESERVE).max(1))
        );
    }
    let tls = TlsSettings {
        trust: match (&args.ca, args.insecure) {
            (Some(ca), _) => Trust::Ca(ca.clone()),
            (None, true) => Trust::Insecure,
            (None, false) => Trust::System,
        },
        versions: args.tls,
        server_name: args.sni.clone().unwrap_or_else(|| target.host.clone()),
    };
    let backoff = Backoff {
        base_ms: (args.backoff_base * 1000.0).round() as u64,
        cap_ms: (args.backoff_cap * 1000.0).round() as u64,
    };
    let concurrency = args.concurrency.div_ceil(workers).max(1) as usize;
    let ramp_rate = args.ramp_rate.map(|r| r / workers as f64);
    let workers = shares
        .iter()
        .enumerate()
        .map(|(index, &(first_device, count))| FleetConfig {
            index,
            url: target.url.clone(),
            addr,
            tls: tls.clone(),
            first_device,
            devices: count,
            sources: sources.clone(),
            concurrency,
            ramp_rate,
            handshake_timeout_ms: (args.handshake_timeout * 1000.0).round() as u64,
            close_timeout_ms: 5_000,
            read_buffer: 4096,
            backoff,
            max_runtime_secs,
            job: job.clone(),
        })
        .collect();
    Ok(FleetPlan {
        target,
        addr,
        sources,
        workers,
        warnings,
    })
}

/// Default worker count for `reconnect` (descriptor limit) and `register` (CPU).
pub fn workers_for_descriptors(devices: u64) -> u64 {
    devices.div_ceil(DEVICES_PER_WORKER)
}

pub fn cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

pub struct PoolWorker {
    child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    pub ready: bool,
    pub ramp_secs: Option<f64>,
    pub progress: FleetProgress,
    pub result: Option<FleetResult>,
    pub gone: bool,
}

enum Event {
    Report(Box<FleetReport>),
    Garbage(String),
    Gone,
}

pub enum Step {
    Event,
    Interrupted,
    Deadline,
}

pub struct Pool {
    pub workers: Vec<PoolWorker>,
    events: mpsc::UnboundedReceiver<(usize, Event)>,
    events_tx: mpsc::UnboundedSender<(usize, Event)>,
    sigint: Signal,
    sigterm: Signal,
    pub interrupted: bool,
    pub failures: Vec<String>,
    pub creds: Option<CredsWriter>,
    pub creds_error: Option<String>,
    /// Called with messages to print above a progress bar.
    pub bar: indicatif::ProgressBar,
}

impl Pool {
    pub fn new(bar: indicatif::ProgressBar) -> Result<Self> {
        let (events_tx, events) = mpsc::unbounded_channel();
        Ok(Self {
            workers: Vec::new(),
            events,
            events_tx,
            sigint: signal(SignalKind::interrupt())?,
            sigterm: signal(SignalKind::terminate())?,
            interrupted: false,
            failures: Vec::new(),
            creds: None,
            creds_error: None,
            bar,
        })
    }

    pub fn spawn(&mut self, configs: &[FleetConfig]) -> Result<()> {
        let exe = std::env::current_exe().context("cannot find this program to start workers")?;
        for config in configs {
            let mut child = Process::new(&exe)
                .arg("__fleet-worker")
                .arg(serde_json::to_string(config)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start worker {}", config.index))?;
            let pid = child.id().unwrap_or(0);
            let stdout = child.stdout.take().expect("stdout is piped");
            let stdin = child.stdin.take();
            let tx = self.events_tx.clone();
            let index = config.index;
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let event = match serde_json::from_str::<FleetReport>(&line) {
                        Ok(report) => Event::Report(Box::new(report)),
                        Err(_) => Event::Garbage(line),
                    };
                    if tx.send((index, event)).is_err() {
                        return;
                    }
                }
                let _ = tx.send((index, Event::Gone));
            });
            self.workers.push(PoolWorker {
                child,
                pid,
                stdin,
                ready: false,
                ramp_secs: None,
                progress: FleetProgress::default(),
                result: None,
                gone: false,
            });
        }
        Ok(())
    }

    pub async fn wait_for_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !self.workers.iter().all(|w| w.ready) {
            match self.step(deadline).await? {
                Step::Event => {}
                Step::Interrupted => bail!("interrupted before the workers started"),
                Step::Deadline => bail!("the workers did not start within {} s", limit.as_secs()),
            }
            if let Some(w) = self.workers.iter().position(|w| w.gone && !w.ready) {
                bail!("worker {w} exited during start-up");
            }
        }
        Ok(())
    }

    /// Waits for one worker event, a signal or `deadline`.
    pub async fn step(&mut self, deadline: Instant) -> Result<Step> {
        let (index, event) = tokio::select! {
            event = self.events.recv() => event.expect("the pool holds a sender"),
            _ = self.sigint.recv() => return self.interrupt(),
            _ = self.sigterm.recv() => return self.interrupt(),
            _ = tokio::time::sleep_until(deadline) => return Ok(Step::Deadline),
        };
        let worker = &mut self.workers[index];
        match event {
            Event::Report(report) => match *report {
                FleetReport::Ready => worker.ready = true,
                FleetReport::Progress(p) => worker.progress = p,
                FleetReport::RampDone { secs } => worker.ramp_secs = Some(secs),
                FleetReport::Credential(cred) => {
                    if let Some(out) = &mut self.creds
                        && let Err(e) = out.write(&cred)
                        && self.creds_error.is_none()
                    {
                        self.creds_error = Some(format!("cannot write the credentials file: {e}"));
                    }
                }
                FleetReport::Finished(result) => {
                    worker.progress = result.progress.clone();
                    worker.result = Some(*result);
                }
                FleetReport::Fatal { message } => {
                    self.kill_all();
                    bail!("worker {index} failed: {message}");
                }
            },
            Event::Garbage(line) => {
                self.bar
                    .suspend(|| eprintln!("loadtest: worker {index} said: {line}"));
            }
            Event::Gone => {
                worker.gone = true;
                if worker.result.is_none() {
                    worker.progress.connected = 0;
                    self.failures.push(format!(
                        "worker {index} exited before reporting its results (its figures are partial)"
                    ));
                }
            }
        }
        Ok(Step::Event)
    }

    fn interrupt(&mut self) -> Result<Step> {
        if self.interrupted {
            self.kill_all();
            bail!("interrupted twice: killed the workers");
        }
        self.interrupted = true;
        self.bar.suspend(|| {
            eprintln!(
                "loadtest: interrupted: closing all devices (Ctrl-C again to kill the workers)"
            )
        });
        Ok(Step::Interrupted)
    }

    pub fn kill_all(&mut self) {
        for w in &mut self.workers {
            let _ = w.child.start_kill();
        }
    }

    pub async fn broadcast(&mut self, command: FleetCommand) {
        for w in &mut self.workers {
            if let Some(stdin) = &mut w.stdin {
                let sent = stdin.write_all(command.as_line().as_bytes()).await;
                if sent.is_err() || stdin.flush().await.is_err() {
                    w.stdin = None;
                }
            }
        }
    }

    /// Sends `stop` and waits (bounded) for every worker's result.
    pub async fn stop_and_collect(&mut self, limit: Duration) -> Result<()> {
        self.broadcast(FleetCommand::Stop).await;
        let deadline = Instant::now() + limit;
        while !self.workers.iter().all(|w| w.result.is_some() || w.gone) {
            match self.step(deadline).await? {
                Step::Deadline => {
                    self.failures
                        .push("some workers did not report their results in time".to_owned());
                    break;
                }
                Step::Event | Step::Interrupted => {}
            }
        }
        for (index, w) in self.workers.iter_mut().enumerate() {
            w.stdin = None;
            match timeout(Duration::from_secs(5), w.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => self
                    .failures
                    .push(format!("worker {index} exited with {status}")),
                Ok(Err(e)) => self.failures.push(format!("worker {index}: {e}")),
                Err(_) => {
                    let _ = w.child.start_kill();
                    self.failures
                        .push(format!("worker {index} did not exit; killed it"));
                }
            }
        }
        Ok(())
    }

    pub fn total(&self) -> FleetProgress {
        let mut t = FleetProgress::default();
        for w in &self.workers {
            add_progress(&mut t, &w.progress);
        }
        t
    }

    /// Every worker's result (its last progress if it reported none).
    pub fn results(&self) -> Vec<FleetResult> {
        self.workers
            .iter()
            .map(|w| {
                w.result.clone().unwrap_or_else(|| FleetResult {
                    progress: w.progress.clone(),
                    ..FleetResult::default()
                })
            })
            .collect()
    }

    pub fn workers_rss(&self) -> u64 {
        self.workers
            .iter()
            .filter_map(|w| crate::sys::rss_bytes(w.pid))
            .sum()
    }
}

pub fn add_progress(t: &mut FleetProgress, p: &FleetProgress) {
    t.launched += p.launched;
    t.registered += p.registered;
    t.ready += p.ready;
    t.gave_up += p.gave_up;
    t.attempts += p.attempts;
    t.connected += p.connected;
    t.first_sessions += p.first_sessions;
    t.lost += p.lost;
    t.resumed += p.resumed;
    t.reauthed += p.reauthed;
    for (reason, n) in &p.refusals {
        *t.refusals.entry(reason.clone()).or_default() += n;
    }
    t.errors.merge(&p.errors);
    for (step, n) in &p.timeouts {
        *t.timeouts.entry(step.clone()).or_default() += n;
    }
}

/// A progress bar on a terminal, hidden otherwise (then callers print a line now and then).
pub fn progress_bar(no_progress: bool, len: Option<u64>) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if no_progress || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::stderr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_register_over_cpus_and_refuses_plain_ws() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: FleetArgs,
        }
        use clap::Parser;
        let a = Cli::try_parse_from([
            "x",
            "--url",
            "wss://127.0.0.1:8443/usg/endpoint",
            "--ca",
            "/tmp/root.pem",
            "--backoff-base",
            "500ms",
            "--backoff-cap",
            "30",
        ])
        .unwrap()
        .a;
        let job = Job::Reconnect {
            creds: "/tmp/c".into(),
            attempt_cap: None,
            resume: false,
        };
        let p = plan(
            &a,
            100_000,
            workers_for_descriptors(100_000),
            job.clone(),
            60,
            20_000,
            Some(28_232),
        )
        .unwrap();
        assert_eq!(p.workers.len(), 6);
        assert_eq!(p.sources.len(), 20);
        assert_eq!(
            p.workers[0].backoff,
            Backoff {
                base_ms: 500,
                cap_ms: 30_000
            }
        );
        assert_eq!(p.workers.iter().map(|w| w.devices).sum::<u64>(), 100_000);
        assert!(plan(&a, 100_000, 2, job.clone(), 60, 20_000, None).is_err());
        let mut plain = a.clone();
        plain.url = "ws://127.0.0.1:8443/usg/endpoint".into();
        assert!(plan(&plain, 10, 1, job.clone(), 60, 20_000, None).is_err());
        let mut bad = a;
        bad.backoff_cap = 0.1;
        assert!(plan(&bad, 10, 1, job, 60, 20_000, None).is_err());
    }
}
