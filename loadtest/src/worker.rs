//! A worker process: runs its share of the devices on one single-threaded tokio runtime,
//! obeys [`Command`]s from stdin and reports to the parent on stdout (see [`crate::wire`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinSet, LocalSet};
use tokio::time::{Instant, sleep, sleep_until};

use crate::device::{self, DeviceContext, DeviceError, IdleEnd, IdleObserver, Phase};
use crate::wire::{
    self, Command, ErrorKind, Progress, Report, WorkerConfig, WorkerResult, record_duration,
};

/// Entry point of `loadtest __worker CONFIG_JSON`.
pub fn main(config_json: &str) -> ExitCode {
    let config: WorkerConfig = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => {
            send(&Report::Fatal {
                message: format!("bad worker configuration: {e}"),
            });
            return ExitCode::from(2);
        }
    };
    if let Err(e) = crate::sys::raise_fd_limit() {
        eprintln!(
            "loadtest worker {}: cannot raise the open-file limit: {e}",
            config.index
        );
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            send(&Report::Fatal {
                message: format!("cannot start the runtime: {e}"),
            });
            return ExitCode::from(2);
        }
    };
    let code = LocalSet::new().block_on(&runtime, run(config));
    // Do not wait for the blocking stdin reader: the parent may keep the pipe open.
    runtime.shutdown_background();
    code
}

/// Writes one report line to stdout. A vanished parent is noticed through stdin instead.
fn send(report: &Report) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(report) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

async fn run(config: WorkerConfig) -> ExitCode {
    let ctx = match DeviceContext::from_config(&config) {
        Ok(ctx) => Rc::new(ctx),
        Err(e) => {
            send(&Report::Fatal {
                message: format!("{e:#}"),
            });
            return ExitCode::from(2);
        }
    };
    let (command_tx, mut commands) = mpsc::unbounded_channel();
    tokio::task::spawn_local(read_commands(command_tx));
    send(&Report::Ready);

    // Wait for `go`; a `stop` (or the parent vanishing) before it ends the worker.
    loop {
        match commands.recv().await {
            Some(Command::Go) => break,
            Some(Command::Hold) => {}
            Some(Command::Stop) | None => {
                send(&Report::Finished(Box::default()));
                return ExitCode::SUCCESS;
            }
        }
    }
    let zero = Instant::now();
    let (phase_tx, phase_rx) = watch::channel(Phase::Ramp);
    let deadline = zero + Duration::from_secs(config.max_runtime_secs);
    tokio::task::spawn_local(async move {
        loop {
            let command = tokio::select! {
                c = commands.recv() => c,
                _ = sleep_until(deadline) => None,
            };
            match command {
                Some(Command::Go) => {}
                Some(Command::Hold) => {
                    phase_tx.send_if_modified(|p| {
                        let changed = *p == Phase::Ramp;
                        if changed {
                            *p = Phase::Hold;
                        }
                        changed
                    });
                }
                Some(Command::Stop) | None => {
                    phase_tx.send_replace(Phase::Stop);
                    break;
                }
            }
        }
        // Keep the sender alive so devices see `Stop` rather than a closed channel.
        std::future::pending::<()>().await;
    });

    let stats = Rc::new(RefCell::new(Stats::new(zero)));
    let reporter = tokio::task::spawn_local({
        let stats = stats.clone();
        async move {
            loop {
                sleep(Duration::from_millis(250)).await;
                let progress = stats.borrow().progress.clone();
                send(&Report::Progress(progress));
            }
        }
    });

    // Ramp: launch every device, paced by the rate cap and the in-flight cap.
    let mut stop_rx = phase_rx.clone();
    let in_flight = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut devices = JoinSet::new();
    let mut stopped = false;
    for i in 0..config.devices {
        if let Some(rate) = config.ramp_rate {
            let due = zero + Duration::from_secs_f64(i as f64 / rate);
            tokio::select! {
                _ = sleep_until(due) => {}
                _ = stop_rx.wait_for(|p| *p == Phase::Stop) => { stopped = true; break; }
            }
        }
        let permit = tokio::select! {
            p = in_flight.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop_rx.wait_for(|p| *p == Phase::Stop) => { stopped = true; break; }
        };
        let id = config.first_device + i;
        stats.borrow_mut().progress.launched += 1;
        devices.spawn_local(run_device(
            id,
            ctx.clone(),
            stats.clone(),
            phase_rx.clone(),
            permit,
        ));
        while devices.try_join_next().is_some() {}
    }

    // Wait until every launched device has established or failed.
    if !stopped {
        loop {
            let done = {
                let s = stats.borrow();
                s.progress.established + s.progress.failed >= s.progress.launched
            };
            if done {
                break;
            }
            tokio::select! {
                _ = sleep(Duration::from_millis(20)) => {}
                _ = stop_rx.wait_for(|p| *p == Phase::Stop) => { stopped = true; break; }
            }
        }
    }
    if !stopped {
        let ramp_secs = stats.borrow().last_handshake.as_secs_f64();
        send(&Report::RampDone { ramp_secs });
    }

    // Hold until told to stop (or the deadline), then let every device close.
    let _ = stop_rx.wait_for(|p| *p == Phase::Stop).await;
    let drain = ctx.handshake_timeout + ctx.close_timeout + Duration::from_secs(2);
    let drained = tokio::time::timeout(drain, async {
        while devices.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let left = devices.len() as u64;
        devices.abort_all();
        stats.borrow_mut().close_unclean += left;
    }
    reporter.abort();
    let result = stats.borrow().result();
    send(&Report::Finished(Box::new(result)));
    ExitCode::SUCCESS
}

/// Forwards stdin lines as commands; end of input means `Stop`.
async fn read_commands(tx: mpsc::UnboundedSender<Command>) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(command) = Command::parse(&line)
            && tx.send(command).is_err()
        {
            return;
        }
    }
    let _ = tx.send(Command::Stop);
}

async fn run_device(
    id: u64,
    ctx: Rc<DeviceContext>,
    stats: Rc<RefCell<Stats>>,
    mut phase: watch::Receiver<Phase>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let source = crate::sources::source_for(&ctx.sources, id);
    let started = Instant::now();
    let result = device::connect(&ctx, source).await;
    drop(permit);
    let connected = match result {
        Ok(c) => c,
        Err(e) => {
            stats.borrow_mut().failed(&e);
            return;
        }
    };
    stats
        .borrow_mut()
        .established(started.elapsed(), connected.tls.as_deref());
    let end = device::idle(connected.conn, &ctx, id, &mut phase, &StatsObserver(&stats)).await;
    stats.borrow_mut().ended(end);
}

struct StatsObserver<'a>(&'a RefCell<Stats>);

impl IdleObserver for StatsObserver<'_> {
    fn ping_sent(&self) {
        self.0.borrow_mut().progress.pings_sent += 1;
    }

    fn pong(&self, rtt: Duration, timed: bool) {
        let mut s = self.0.borrow_mut();
        s.progress.pongs_received += 1;
        if timed {
            record_duration(&mut s.rtt_us, rtt);
        }
    }

    fn pong_missing(&self) {
        self.0.borrow_mut().pongs_missing += 1;
    }
}

/// A worker's running figures.
struct Stats {
    zero: Instant,
    progress: Progress,
    error_samples: BTreeMap<ErrorKind, String>,
    handshake_us: Histogram<u64>,
    rtt_us: Histogram<u64>,
    per_second: Vec<u64>,
    last_handshake: Duration,
    tls: BTreeMap<String, u64>,
    pongs_missing: u64,
    closed_cleanly: u64,
    close_unclean: u64,
}

impl Stats {
    fn new(zero: Instant) -> Self {
        Self {
            zero,
            progress: Progress::default(),
            error_samples: BTreeMap::new(),
            handshake_us: wire::new_histogram(),
            rtt_us: wire::new_histogram(),
            per_second: Vec::new(),
            last_handshake: Duration::ZERO,
            tls: BTreeMap::new(),
            pongs_missing: 0,
            closed_cleanly: 0,
            close_unclean: 0,
        }
    }

    fn handshake_finished(&mut self) {
        self.last_handshake = self.zero.elapsed();
    }

    fn error(&mut self, kind: ErrorKind, message: &str) {
        self.progress.errors.add(kind);
        self.error_samples
            .entry(kind)
            .or_insert_with(|| message.to_owned());
    }

    fn failed(&mut self, e: &DeviceError) {
        self.handshake_finished();
        self.progress.failed += 1;
        self.error(e.kind, &e.message);
    }

    fn established(&mut self, latency: Duration, tls: Option<&str>) {
        self.handshake_finished();
        self.progress.established += 1;
        self.progress.connected += 1;
        record_duration(&mut self.handshake_us, latency);
        let second = self.last_handshake.as_secs() as usize;
        if self.per_second.len() <= second {
            self.per_second.resize(second + 1, 0);
        }
        self.per_second[second] += 1;
        if let Some(tls) = tls {
            *self.tls.entry(tls.to_owned()).or_default() += 1;
        }
    }

    fn ended(&mut self, end: IdleEnd) {
        self.progress.connected -= 1;
        match end {
            IdleEnd::Closed { clean: true } => self.closed_cleanly += 1,
            IdleEnd::Closed { clean: false } => self.close_unclean += 1,
            IdleEnd::Lost(message) => self.error(ErrorKind::ClosedEarly, &message),
        }
    }

    fn result(&self) -> WorkerResult {
        WorkerResult {
            progress: self.progress.clone(),
            error_samples: self.error_samples.clone(),
            handshake_us: wire::encode_histogram(&self.handshake_us),
            rtt_us: wire::encode_histogram(&self.rtt_us),
            per_second: self.per_second.clone(),
            ramp_secs: self.last_handshake.as_secs_f64(),
            tls: self.tls.clone(),
            pongs_missing: self.pongs_missing,
            closed_cleanly: self.closed_cleanly,
            close_unclean: self.close_unclean,
        }
    }
}
