//! `loadtest idle`: the parent process. It probes the server once, starts the workers,
//! drives them through ramp → hold → stop, reads the server's memory at each step, shows
//! progress and prints the [`Summary`].
//!
//! ```text
//! parent:  probe ─ spawn ─ (all ready) rss₀ go ─ (all ramp_done) settle rss₁ hold ─ … rss₂ stop ─ collect ─ summary
//! worker:            ready ─ connect… ─ ramp_done ─ ping… (timed) ─ close 1000 ─ finished
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command as Process};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, timeout};

use crate::device::{self, DeviceContext, IdleObserver, Phase};
use crate::plan::{self, Environment, IdleArgs, Plan};
use crate::summary::{
    self, CloseStats, GeneratorMemory, PongStats, ServerMemory, Setup, Summary, TlsSummary,
};
use crate::sys;
use crate::target::Target;
use crate::wire::{self, Command, ErrorCounts, Progress, Report, WorkerResult};

/// Entry point of `loadtest idle`.
pub fn main(args: IdleArgs) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: IdleArgs) -> Result<ExitCode> {
    let target = Target::parse(&args.url)?;
    let addr = target.resolve()?;
    let fd_limit = sys::raise_fd_limit().unwrap_or_else(|_| sys::fd_hard_limit());
    let env = Environment {
        port_count: sys::ephemeral_port_count(),
        fd_limit,
    };
    let plan = plan::plan(&args, target, addr, env)?;
    for warning in &plan.warnings {
        eprintln!("loadtest: warning: {warning}");
    }
    if let Some(pid) = args.gateway_pid
        && sys::rss_bytes(pid).is_none()
    {
        bail!("there is no process {pid} to measure (--gateway-pid): is the server running?");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async { Run::new(args, plan)?.execute().await })
}

/// One worker process as the parent sees it.
struct Worker {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    ready: bool,
    ramp_secs: Option<f64>,
    progress: Progress,
    result: Option<WorkerResult>,
    /// Its stdout closed (it exited).
    gone: bool,
}

enum Event {
    Report(Report),
    Garbage(String),
    Gone,
}

enum Step {
    Event,
    Interrupted,
    Deadline,
}

struct Run {
    args: IdleArgs,
    plan: Plan,
    workers: Vec<Worker>,
    events_tx: mpsc::UnboundedSender<(usize, Event)>,
    events: mpsc::UnboundedReceiver<(usize, Event)>,
    sigint: Signal,
    sigterm: Signal,
    interrupted: bool,
    worker_failures: Vec<String>,
    bar: ProgressBar,
    rate_window: VecDeque<(Instant, u64)>,
    last_line: Instant,
}

impl Run {
    fn new(args: IdleArgs, plan: Plan) -> Result<Self> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let bar = if args.no_progress || !std::io::stderr().is_terminal() {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(Some(args.devices), ProgressDrawTarget::stderr())
        };
        Ok(Self {
            args,
            plan,
            workers: Vec::new(),
            events_tx,
            events,
            sigint: signal(SignalKind::interrupt())?,
            sigterm: signal(SignalKind::terminate())?,
            interrupted: false,
            worker_failures: Vec::new(),
            bar,
            rate_window: VecDeque::new(),
            last_line: Instant::now(),
        })
    }

    async fn execute(mut self) -> Result<ExitCode> {
        let probe = self.probe().await?;
        eprintln!(
            "loadtest: probe connection to {} OK ({probe}); starting {} devices over {} worker(s), {} source address(es)",
            self.plan.target.url,
            self.args.devices,
            self.plan.workers.len(),
            self.plan.sources.len()
        );
        sleep(Duration::from_millis(200)).await; // let the server release the probe
        self.spawn_workers()?;
        self.wait_for_ready().await?;

        let gateway = self.args.gateway_pid;
        let gateway_before = gateway.and_then(sys::rss_bytes);
        let workers_before = self.workers_rss();
        self.broadcast(Command::Go).await;
        let ramp_started = Instant::now();
        self.ramp().await?;
        if !self.interrupted && self.args.settle > 0.0 {
            self.pump_until(Instant::now() + Duration::from_secs_f64(self.args.settle))
                .await?;
        }
        let gateway_after_ramp = gateway.and_then(sys::rss_bytes);
        let workers_after_ramp = self.workers_rss();
        let ramp_wall = ramp_started.elapsed();

        self.broadcast(Command::Hold).await;
        let held = self.hold().await?;
        let gateway_end = gateway.and_then(sys::rss_bytes);
        let workers_end = self.workers_rss();

        self.broadcast(Command::Stop).await;
        self.collect().await?;
        self.reap().await;
        self.bar.finish_and_clear();

        let summary = self.summarize(Memory {
            gateway_before,
            gateway_after_ramp,
            gateway_end,
            workers_before,
            workers_after_ramp,
            workers_end,
            held,
            ramp_wall,
        });
        self.print_human(&summary);
        let json = serde_json::to_string_pretty(&summary)?;
        println!("{json}");
        if let Some(path) = &self.args.json {
            std::fs::write(path, format!("{json}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(if summary.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    /// One device from this process, so a wrong URL, port or CA fails fast with one clear
    /// message instead of N identical ones.
    async fn probe(&self) -> Result<String> {
        let config = &self.plan.workers[0];
        let ctx = DeviceContext::from_config(config)?;
        let source = crate::sources::source_for(&ctx.sources, config.first_device);
        let started = Instant::now();
        let connected = device::connect(&ctx, source)
            .await
            .map_err(|e| anyhow::anyhow!("the probe connection failed: {e}"))?;
        let latency = started.elapsed();
        let tls = connected
            .tls
            .clone()
            .unwrap_or_else(|| "plain ws://".to_owned());
        let (_tx, mut stop) = watch::channel(Phase::Stop);
        device::idle(connected.conn, &ctx, 0, &mut stop, &NoObserver).await;
        Ok(format!("{tls}, {:.1} ms", latency.as_secs_f64() * 1000.0))
    }

    fn spawn_workers(&mut self) -> Result<()> {
        let exe = std::env::current_exe().context("cannot find this program to start workers")?;
        for config in &self.plan.workers {
            let mut child = Process::new(&exe)
                .arg("__worker")
                .arg(serde_json::to_string(config)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                // Own process group: Ctrl-C reaches the parent only, which closes devices properly.
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
                    let event = match serde_json::from_str::<Report>(&line) {
                        Ok(report) => Event::Report(report),
                        Err(_) => Event::Garbage(line),
                    };
                    if tx.send((index, event)).is_err() {
                        return;
                    }
                }
                let _ = tx.send((index, Event::Gone));
            });
            self.workers.push(Worker {
                child,
                pid,
                stdin,
                ready: false,
                ramp_secs: None,
                progress: Progress::default(),
                result: None,
                gone: false,
            });
        }
        Ok(())
    }

    async fn wait_for_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.workers.iter().all(|w| w.ready) {
            match self.step(deadline).await? {
                Step::Event => {}
                Step::Interrupted => bail!("interrupted before the workers started"),
                Step::Deadline => bail!("the workers did not start within 30 s"),
            }
            if let Some(w) = self.workers.iter().position(|w| w.gone && !w.ready) {
                bail!("worker {w} exited during start-up");
            }
        }
        Ok(())
    }

    async fn ramp(&mut self) -> Result<()> {
        self.bar.set_style(
            ProgressStyle::with_template(
                "{spinner:.green} ramp [{elapsed_precise}] [{bar:40.cyan/blue}] {pos}/{len} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        while !self.workers.iter().all(|w| w.ramp_secs.is_some() || w.gone) {
            let tick = Instant::now() + Duration::from_millis(500);
            if let Step::Interrupted = self.step(tick).await? {
                break;
            }
            self.render_ramp();
        }
        self.render_ramp();
        self.bar.finish_and_clear();
        Ok(())
    }

    fn render_ramp(&mut self) {
        let total = self.total_progress();
        let now = Instant::now();
        self.rate_window.push_back((now, total.established));
        while self
            .rate_window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(2))
        {
            self.rate_window.pop_front();
        }
        let rate = match (self.rate_window.front(), self.rate_window.back()) {
            (Some((t0, e0)), Some((t1, e1))) if t1 > t0 => {
                (e1 - e0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let in_flight = total.launched - total.established - total.failed;
        let message = format!(
            "{rate:.0}/s · in flight {in_flight} · errors {}",
            total.errors.handshake_failures()
        );
        self.bar.set_position(total.established);
        self.bar.set_message(message.clone());
        let target = self.args.devices;
        self.maybe_line(format_args!(
            "ramp: {}/{target} established, {message}",
            total.established
        ));
    }

    /// Holds for `--hold` seconds (or until Ctrl-C, or until no device is left); returns
    /// how long it held.
    async fn hold(&mut self) -> Result<Duration> {
        let started = Instant::now();
        if self.interrupted || self.args.hold <= 0.0 {
            return Ok(Duration::ZERO);
        }
        let deadline = started + Duration::from_secs_f64(self.args.hold);
        self.bar = if self.bar.is_hidden() {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        };
        self.bar.set_style(
            ProgressStyle::with_template("{spinner:.green} hold [{elapsed_precise}] {msg}")
                .expect("valid template"),
        );
        while Instant::now() < deadline {
            let tick = deadline.min(Instant::now() + Duration::from_millis(500));
            if let Step::Interrupted = self.step(tick).await? {
                break;
            }
            let total = self.total_progress();
            let left = deadline.saturating_duration_since(Instant::now()).as_secs();
            let message = format!(
                "{} connected · {left} s left · closed early {} · pongs {}/{} · Ctrl-C ends the hold",
                total.connected, total.errors.closed_early, total.pongs_received, total.pings_sent
            );
            self.bar.set_message(message.clone());
            self.bar.tick();
            self.maybe_line(format_args!("hold: {message}"));
            if total.connected == 0 && total.established > 0 {
                break; // nothing left to observe
            }
        }
        self.bar.finish_and_clear();
        Ok(started.elapsed())
    }

    async fn collect(&mut self) -> Result<()> {
        let worst = self
            .plan
            .workers
            .iter()
            .map(|w| w.handshake_timeout_ms + w.close_timeout_ms)
            .max()
            .unwrap_or(0);
        let deadline = Instant::now() + Duration::from_millis(worst) + Duration::from_secs(10);
        while !self.workers.iter().all(|w| w.result.is_some() || w.gone) {
            if let Step::Deadline = self.step(deadline).await? {
                self.worker_failures
                    .push("some workers did not report their results in time".to_owned());
                break;
            }
        }
        Ok(())
    }

    async fn reap(&mut self) {
        for (index, w) in self.workers.iter_mut().enumerate() {
            w.stdin = None;
            match timeout(Duration::from_secs(5), w.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => self
                    .worker_failures
                    .push(format!("worker {index} exited with {status}")),
                Ok(Err(e)) => self.worker_failures.push(format!("worker {index}: {e}")),
                Err(_) => {
                    let _ = w.child.start_kill();
                    self.worker_failures
                        .push(format!("worker {index} did not exit; killed it"));
                }
            }
        }
    }

    /// Processes events until `deadline` (used for the settle pause).
    async fn pump_until(&mut self, deadline: Instant) -> Result<()> {
        while Instant::now() < deadline {
            if let Step::Interrupted = self.step(deadline).await? {
                break;
            }
        }
        Ok(())
    }

    /// Waits for one worker event, a signal or `deadline`, and applies it.
    async fn step(&mut self, deadline: Instant) -> Result<Step> {
        let (index, event) = tokio::select! {
            event = self.events.recv() => event.expect("the parent holds a sender"),
            _ = self.sigint.recv() => return self.interrupt(),
            _ = self.sigterm.recv() => return self.interrupt(),
            _ = tokio::time::sleep_until(deadline) => return Ok(Step::Deadline),
        };
        let worker = &mut self.workers[index];
        match event {
            Event::Report(Report::Ready) => worker.ready = true,
            Event::Report(Report::Progress(p)) => worker.progress = p,
            Event::Report(Report::RampDone { ramp_secs }) => worker.ramp_secs = Some(ramp_secs),
            Event::Report(Report::Finished(result)) => {
                worker.progress = result.progress.clone();
                worker.result = Some(*result);
            }
            Event::Report(Report::Fatal { message }) => {
                self.kill_all();
                bail!("worker {index} failed: {message}");
            }
            Event::Garbage(line) => {
                self.bar
                    .suspend(|| eprintln!("loadtest: worker {index} said: {line}"));
            }
            Event::Gone => {
                worker.gone = true;
                if worker.result.is_none() {
                    worker.progress.connected = 0;
                    self.worker_failures.push(format!(
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
            bail!("interrupted twice: killed the workers without closing their devices");
        }
        self.interrupted = true;
        self.bar.suspend(|| {
            eprintln!(
                "loadtest: interrupted: closing all devices (Ctrl-C again to kill the workers)"
            )
        });
        Ok(Step::Interrupted)
    }

    fn kill_all(&mut self) {
        for w in &mut self.workers {
            let _ = w.child.start_kill();
        }
    }

    async fn broadcast(&mut self, command: Command) {
        for w in &mut self.workers {
            if let Some(stdin) = &mut w.stdin {
                let sent = stdin.write_all(command.as_line().as_bytes()).await;
                if sent.is_err() || stdin.flush().await.is_err() {
                    w.stdin = None;
                }
            }
        }
    }

    fn workers_rss(&self) -> u64 {
        self.workers
            .iter()
            .filter_map(|w| sys::rss_bytes(w.pid))
            .sum()
    }

    fn total_progress(&self) -> Progress {
        let mut total = Progress::default();
        for w in &self.workers {
            let p = &w.progress;
            total.launched += p.launched;
            total.established += p.established;
            total.failed += p.failed;
            total.connected += p.connected;
            total.errors.merge(&p.errors);
            total.pings_sent += p.pings_sent;
            total.pongs_received += p.pongs_received;
        }
        total
    }

    /// Without a progress bar, a plain line every 5 s.
    fn maybe_line(&mut self, line: std::fmt::Arguments<'_>) {
        if self.bar.is_hidden() {
            let now = Instant::now();
            if now.duration_since(self.last_line) >= Duration::from_secs(5) {
                self.last_line = now;
                eprintln!("loadtest: {line}");
            }
        }
    }

    fn summarize(&self, m: Memory) -> Summary {
        let mut errors = ErrorCounts::default();
        let mut error_samples = BTreeMap::new();
        let mut handshake = wire::new_histogram();
        let mut rtt = wire::new_histogram();
        let mut per_second = Vec::new();
        let mut tls: BTreeMap<String, u64> = BTreeMap::new();
        let (mut established, mut connected, mut pings, mut pongs) = (0, 0, 0, 0);
        let (mut missing, mut clean, mut unclean) = (0, 0, 0);
        let mut ramp_secs = 0f64;
        for w in &self.workers {
            let result = w.result.clone().unwrap_or_else(|| WorkerResult {
                progress: w.progress.clone(),
                ..WorkerResult::default()
            });
            let p = &result.progress;
            errors.merge(&p.errors);
            for (kind, message) in result.error_samples {
                error_samples.entry(kind).or_insert(message);
            }
            established += p.established;
            pings += p.pings_sent;
            pongs += p.pongs_received;
            missing += result.pongs_missing;
            clean += result.closed_cleanly;
            unclean += result.close_unclean;
            // Devices still open when the hold ended = closed by us at stop.
            connected += result.closed_cleanly + result.close_unclean;
            wire::decode_histogram_into(&mut handshake, &result.handshake_us);
            wire::decode_histogram_into(&mut rtt, &result.rtt_us);
            summary::add_series(&mut per_second, &result.per_second);
            for (combo, count) in result.tls {
                *tls.entry(combo).or_default() += count;
            }
            ramp_secs = ramp_secs.max(w.ramp_secs.unwrap_or(result.ramp_secs));
        }
        if ramp_secs == 0.0 {
            ramp_secs = m.ramp_wall.as_secs_f64();
        }

        let target = self.args.devices;
        let mut problems = Vec::new();
        if established < target {
            problems.push(format!(
                "only {established} of {target} devices established"
            ));
        }
        if errors.closed_early > 0 {
            problems.push(format!(
                "{} devices lost their connection before the end of the hold",
                errors.closed_early
            ));
        }
        problems.extend(self.worker_failures.iter().cloned());
        let ok = problems.is_empty();
        let verdict = if ok {
            let early = if self.interrupted {
                " (ended early by Ctrl-C)"
            } else {
                ""
            };
            format!(
                "all {target} devices established and held for {:.0} s{early}",
                m.held.as_secs_f64()
            )
        } else {
            problems.join("; ")
        };

        let gateway = self.args.gateway_pid.map(|pid| {
            let per =
                summary::bytes_per_device(m.gateway_before, m.gateway_after_ramp, established);
            ServerMemory {
                pid,
                name: sys::process_name(pid),
                rss_before_bytes: m.gateway_before,
                rss_after_ramp_bytes: m.gateway_after_ramp,
                rss_end_bytes: m.gateway_end,
                bytes_per_idle_device: per,
                kib_per_idle_device: per.map(|b| summary::round2(b / 1024.0)),
            }
        });
        let tls_summary = tls.iter().max_by_key(|(_, n)| **n).map(|(combo, _)| {
            let mut parts = combo.split(' ').map(str::to_owned);
            TlsSummary {
                version: parts.next().unwrap_or_default(),
                cipher: parts.next().unwrap_or_default(),
                group: parts.next().unwrap_or_default(),
                negotiated: tls.clone(),
            }
        });
        let first = &self.plan.workers[0];
        Summary {
            scenario: "idle",
            url: self.plan.target.url.clone(),
            target_devices: target,
            established,
            connected_at_end: connected,
            ok,
            verdict,
            errors,
            error_samples,
            connect_rate: summary::connect_rate(&per_second, ramp_secs, established),
            handshake_ms: summary::latency_ms(&handshake),
            pong: PongStats {
                kind: format!("{:?}", self.args.ping_kind).to_lowercase(),
                pings_sent: pings,
                replies_received: pongs,
                replies_missing: missing,
                rtt_ms: summary::latency_ms(&rtt),
            },
            gateway,
            generator: GeneratorMemory {
                workers: self.workers.len(),
                workers_rss_before_bytes: m.workers_before,
                workers_rss_after_ramp_bytes: m.workers_after_ramp,
                workers_rss_end_bytes: m.workers_end,
                bytes_per_connection: summary::bytes_per_device(
                    Some(m.workers_before),
                    Some(m.workers_after_ramp),
                    established,
                ),
                parent_rss_bytes: sys::own_rss_bytes(),
            },
            tls: tls_summary,
            close: CloseStats { clean, unclean },
            setup: Setup {
                server_addr: self.plan.addr.to_string(),
                workers: self.workers.len(),
                sources: self.plan.sources.iter().map(ToString::to_string).collect(),
                ping_size: self.args.ping_size,
                ping_interval_secs: self.args.ping_interval,
                hold_secs: self.args.hold,
                held_secs: summary::round2(m.held.as_secs_f64()),
                ramp_rate: self.args.ramp_rate,
                concurrency: first.concurrency * self.workers.len(),
                handshake_timeout_secs: self.args.handshake_timeout,
                interrupted: self.interrupted,
            },
        }
    }

    fn print_human(&self, s: &Summary) {
        let r = &s.connect_rate;
        eprintln!(
            "loadtest: {}/{} devices established in {:.2} s: {:.0}/s overall, median {:.0}/s, peak {}/s; handshake p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            s.established,
            s.target_devices,
            r.ramp_secs,
            r.overall_per_sec,
            r.median_per_sec,
            r.peak_per_sec,
            s.handshake_ms.p50,
            s.handshake_ms.p99,
            s.handshake_ms.max
        );
        if let Some(g) = &s.gateway {
            let mib = |b: Option<u64>| {
                b.map_or("?".to_owned(), |b| {
                    format!("{:.1} MiB", b as f64 / 1048576.0)
                })
            };
            eprintln!(
                "loadtest: server {} (pid {}) RSS {} → {} after ramp → {} at end: {} per idle device",
                g.name.as_deref().unwrap_or("?"),
                g.pid,
                mib(g.rss_before_bytes),
                mib(g.rss_after_ramp_bytes),
                mib(g.rss_end_bytes),
                g.kib_per_idle_device
                    .map_or("?".to_owned(), |k| format!("{k:.1} KiB"))
            );
        }
        if let Some(per) = s.generator.bytes_per_connection {
            eprintln!(
                "loadtest: load generator: {:.1} KiB per connection ({} workers, {:.1} MiB after ramp)",
                per / 1024.0,
                s.generator.workers,
                s.generator.workers_rss_after_ramp_bytes as f64 / 1048576.0
            );
        }
        if s.pong.rtt_ms.samples > 0 {
            eprintln!(
                "loadtest: {} round trips during the hold: p50 {:.2} ms, p99 {:.2} ms",
                s.pong.rtt_ms.samples, s.pong.rtt_ms.p50, s.pong.rtt_ms.p99
            );
        }
        for (kind, message) in &s.error_samples {
            eprintln!("loadtest: {kind:?} errors, e.g.: {message}");
        }
        eprintln!(
            "loadtest: {}: {}",
            if s.ok { "OK" } else { "FAILED" },
            s.verdict
        );
    }
}

struct Memory {
    gateway_before: Option<u64>,
    gateway_after_ramp: Option<u64>,
    gateway_end: Option<u64>,
    workers_before: u64,
    workers_after_ramp: u64,
    workers_end: u64,
    held: Duration,
    ramp_wall: Duration,
}

struct NoObserver;

impl IdleObserver for NoObserver {
    fn ping_sent(&self) {}
    fn pong(&self, _rtt: Duration, _timed: bool) {}
    fn pong_missing(&self) {}
}
