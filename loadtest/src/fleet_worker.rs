//! A worker process of the `register` and `reconnect` scenarios: its share of the devices on
//! one single-threaded tokio runtime (see [`crate::fleet_wire`] for the parent protocol).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{JoinSet, LocalSet};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::backoff::{Backoff, Rng};
use crate::creds::Credential;
use crate::fleet::{self, Failure, FleetContext, Ws};
use crate::fleet_wire::{
    FailKind, FleetCommand, FleetConfig, FleetProgress, FleetReport, FleetResult, Job, unix_ms,
};
use crate::messages::{self, Message};
use crate::wire::{self, record_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Run,
    Stop,
}

/// Entry point of `loadtest __fleet-worker CONFIG_JSON`.
pub fn main(config_json: &str) -> ExitCode {
    let config: FleetConfig = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => {
            send(&FleetReport::Fatal {
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
            send(&FleetReport::Fatal {
                message: format!("cannot start the runtime: {e}"),
            });
            return ExitCode::from(2);
        }
    };
    let code = LocalSet::new().block_on(&runtime, run(config));
    runtime.shutdown_background();
    code
}

fn send(report: &FleetReport) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(report) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn fatal(message: String) -> ExitCode {
    send(&FleetReport::Fatal { message });
    ExitCode::from(2)
}

/// What each device of the job starts with.
enum Inputs {
    Register {
        keys: Vec<String>,
        prefix: String,
        max_attempts: u32,
        stay: bool,
    },
    Reconnect {
        creds: Vec<(String, Arc<CertifiedKey>)>,
        resume: bool,
        /// `--attempt-cap`: attempts in flight at once (after the first connection).
        attempts: Option<Arc<Semaphore>>,
    },
}

fn load_inputs(config: &FleetConfig) -> anyhow::Result<Inputs> {
    Ok(match &config.job {
        Job::Register {
            keys,
            unit_prefix,
            max_attempts,
            stay,
        } => Inputs::Register {
            keys: crate::creds::read_keys(keys, config.first_device, config.devices)?,
            prefix: unit_prefix.clone(),
            max_attempts: (*max_attempts).max(1),
            stay: *stay,
        },
        Job::Reconnect {
            creds,
            resume,
            attempt_cap,
        } => {
            let list = crate::creds::read_slice(creds, config.first_device, config.devices)?;
            let mut out = Vec::with_capacity(list.len());
            for cred in list {
                let (chain, key) = cred.decode()?;
                out.push((cred.unit_id, crate::tls::certified_key(chain, &key)?));
            }
            Inputs::Reconnect {
                creds: out,
                resume: *resume,
                attempts: attempt_cap.map(|c| Arc::new(Semaphore::new(c.max(1)))),
            }
        }
    })
}

async fn run(config: FleetConfig) -> ExitCode {
    let ctx = match FleetContext::from_config(&config) {
        Ok(ctx) => Rc::new(ctx),
        Err(e) => return fatal(format!("{e:#}")),
    };
    let inputs = match load_inputs(&config) {
        Ok(i) => i,
        Err(e) => return fatal(format!("{e:#}")),
    };
    let (command_tx, mut commands) = mpsc::unbounded_channel();
    tokio::task::spawn_local(read_commands(command_tx));
    send(&FleetReport::Ready);
    loop {
        match commands.recv().await {
            Some(FleetCommand::Go) => break,
            Some(FleetCommand::Mark) => {}
            Some(FleetCommand::Stop) | None => {
                send(&FleetReport::Finished(Box::default()));
                return ExitCode::SUCCESS;
            }
        }
    }

    let zero = Instant::now();
    let stats = Rc::new(RefCell::new(Stats::new(zero, config.devices)));
    let mark: Rc<Cell<Option<u64>>> = Rc::new(Cell::new(None));
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let deadline = zero + Duration::from_secs(config.max_runtime_secs);
    tokio::task::spawn_local({
        let mark = mark.clone();
        let stats = stats.clone();
        async move {
            loop {
                let command = tokio::select! {
                    c = commands.recv() => c,
                    _ = sleep_until(deadline) => None,
                };
                match command {
                    Some(FleetCommand::Go) => {}
                    Some(FleetCommand::Mark) => {
                        if mark.get().is_none() {
                            mark.set(Some(unix_ms()));
                            let mut s = stats.borrow_mut();
                            s.marked = true;
                            s.update_full();
                        }
                    }
                    Some(FleetCommand::Stop) | None => {
                        phase_tx.send_replace(Phase::Stop);
                        break;
                    }
                }
            }
            std::future::pending::<()>().await;
        }
    });
    let reporter = tokio::task::spawn_local({
        let stats = stats.clone();
        async move {
            loop {
                sleep(Duration::from_millis(250)).await;
                let progress = stats.borrow().progress.clone();
                send(&FleetReport::Progress(progress));
            }
        }
    });

    let mut stop_rx = phase_rx.clone();
    let in_flight = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut devices = JoinSet::new();
    let mut stopped = false;
    let inputs = Rc::new(inputs);
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
        let device = Device {
            id,
            index: i as usize,
            ctx: ctx.clone(),
            stats: stats.clone(),
            phase: phase_rx.clone(),
            backoff: config.backoff,
            rng: Rng::seeded(id),
        };
        match &*inputs {
            Inputs::Register { .. } => {
                devices.spawn_local(register_device(device, inputs.clone(), permit))
            }
            Inputs::Reconnect { .. } => {
                devices.spawn_local(session_device(device, inputs.clone(), mark.clone(), permit))
            }
        };
        while devices.try_join_next().is_some() {}
    }

    if !stopped {
        loop {
            let done = {
                let s = stats.borrow();
                let p = &s.progress;
                match &*inputs {
                    Inputs::Register { .. } => p.ready + p.gave_up >= p.launched,
                    Inputs::Reconnect { .. } => p.first_sessions + p.gave_up >= p.launched,
                }
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
        let secs = stats.borrow().last_done.as_secs_f64();
        send(&FleetReport::RampDone { secs });
    }
    // Sessions stay open until `stop`, then close with 1000.
    let _ = stop_rx.wait_for(|p| *p == Phase::Stop).await;
    let drain = ctx.handshake_timeout + ctx.close_timeout + Duration::from_secs(2);
    let drained = timeout(drain, async {
        while devices.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        devices.abort_all();
    }
    // Let background close handshakes finish (bounded by their own timeout).
    sleep(Duration::from_millis(50)).await;
    reporter.abort();
    let result = stats.borrow().result();
    send(&FleetReport::Finished(Box::new(result)));
    ExitCode::SUCCESS
}

async fn read_commands(tx: mpsc::UnboundedSender<FleetCommand>) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(command) = FleetCommand::parse(&line)
            && tx.send(command).is_err()
        {
            return;
        }
    }
    let _ = tx.send(FleetCommand::Stop);
}

struct Device {
    id: u64,
    /// Index into this worker's inputs.
    index: usize,
    ctx: Rc<FleetContext>,
    stats: Rc<RefCell<Stats>>,
    phase: watch::Receiver<Phase>,
    backoff: Backoff,
    rng: Rng,
}

impl Device {
    /// Sleeps `wait` unless told to stop first; returns false on stop.
    async fn pause(&mut self, wait: Duration) -> bool {
        tokio::select! {
            _ = sleep(wait) => true,
            _ = self.phase.wait_for(|p| *p == Phase::Stop) => false,
        }
    }

    fn stopping(&self) -> bool {
        *self.phase.borrow() == Phase::Stop
    }
}

/// `register`: key pair + CSR, register without a client certificate, then the session
/// ("connection ready"): on the same connection (`stay`), or a new one with the credential
/// (also after a session refusal that followed `registered`); it stays until the run ends.
async fn register_device(mut d: Device, inputs: Rc<Inputs>, permit: OwnedSemaphorePermit) {
    let Inputs::Register {
        keys,
        prefix,
        max_attempts,
        stay,
    } = &*inputs
    else {
        return;
    };
    let unit_id = format!("{prefix}{:06}", d.id);
    let key = &keys[d.index];
    let identity = match fleet::new_identity(&unit_id) {
        Ok(i) => i,
        Err(e) => {
            let mut s = d.stats.borrow_mut();
            s.fail(FailKind::Protocol, &format!("{e:#}"));
            s.gave_up();
            return;
        }
    };
    let source = crate::sources::source_for(&d.ctx.sources, d.id);
    let started = Instant::now();
    let mut credential: Option<(Arc<CertifiedKey>, String)> = None;
    let mut attempt = 0u32;
    loop {
        if d.stopping() {
            d.stats.borrow_mut().gave_up();
            return;
        }
        attempt += 1;
        d.stats.borrow_mut().progress.attempts += 1;
        let result = async {
            if credential.is_none() {
                let deadline = Instant::now() + d.ctx.handshake_timeout;
                let mut ws = fleet::open(&d.ctx, source, d.ctx.anonymous.clone(), deadline).await?;
                fleet::expect_hello(&mut ws, deadline, "register").await?;
                let sent = Instant::now();
                let cert = fleet::register(
                    &mut ws,
                    deadline,
                    &unit_id,
                    key,
                    &identity.csr_base64,
                    *stay,
                )
                .await?;
                let took = sent.elapsed();
                let certified =
                    credential_from(&identity.key, &cert).map_err(|m| Failure::Error {
                        kind: FailKind::Protocol,
                        message: m,
                    })?;
                {
                    let mut s = d.stats.borrow_mut();
                    s.progress.registered += 1;
                    record_duration(&mut s.register_us, took);
                }
                credential = Some((certified, cert));
                if *stay {
                    // The session follows on this connection (or a refusal, after which the
                    // next attempt connects with the credential).
                    let unit = fleet::expect_hello(&mut ws, deadline, "session").await?;
                    check_unit(unit.as_deref(), &unit_id)?;
                    return Ok(ws);
                }
                fleet::close_in_background(ws, d.ctx.close_timeout);
                d.stats.borrow_mut().progress.attempts += 1;
            }
            let (certified, _) = credential.as_ref().expect("set above");
            let deadline = Instant::now() + d.ctx.handshake_timeout;
            let config = d.ctx.with_credential(certified.clone());
            let mut ws = fleet::open(&d.ctx, source, config, deadline).await?;
            let unit = fleet::expect_hello(&mut ws, deadline, "session").await?;
            check_unit(unit.as_deref(), &unit_id)?;
            Ok(ws)
        }
        .await;
        let retry_after = match result {
            Ok(mut ws) => {
                let (_, cert) = credential.take().expect("registered before ready");
                {
                    let mut s = d.stats.borrow_mut();
                    s.ready(started.elapsed());
                    s.progress.connected += 1;
                }
                send(&FleetReport::Credential(Credential {
                    unit_id: unit_id.clone(),
                    key: identity.key.serialize_pem(),
                    cert,
                }));
                drop(permit);
                // Stay connected, as an agent does after "connection ready", until the run
                // ends: closing now would put the close handshakes into the measurement.
                let end = hold(&mut ws, &mut d.phase, d.ctx.close_timeout).await;
                let mut s = d.stats.borrow_mut();
                s.progress.connected -= 1;
                match end {
                    HoldEnd::Stopped => {}
                    HoldEnd::Lost(message) => {
                        s.progress.lost += 1;
                        s.sample("lost", &message);
                    }
                    HoldEnd::Refused {
                        reason, message, ..
                    } => {
                        s.progress.lost += 1;
                        s.refusal(&reason, &message);
                    }
                }
                return;
            }
            Err(Failure::Refused {
                reason,
                message,
                retry_after,
            }) => {
                d.stats.borrow_mut().refusal(&reason, &message);
                if !messages::is_retryable_refusal(&reason) {
                    d.stats.borrow_mut().gave_up();
                    return;
                }
                retry_after
            }
            Err(Failure::Error { kind, message }) => {
                d.stats.borrow_mut().fail(kind, &message);
                None
            }
        };
        if attempt >= *max_attempts {
            d.stats.borrow_mut().gave_up();
            return;
        }
        let wait = d.backoff.delay(attempt - 1, retry_after, &mut d.rng);
        if !d.pause(wait).await {
            d.stats.borrow_mut().gave_up();
            return;
        }
    }
}

/// The session `hello` names the unit that registered.
fn check_unit(got: Option<&str>, unit_id: &str) -> Result<(), Failure> {
    match got {
        Some(u) if u != unit_id => Err(Failure::Error {
            kind: FailKind::Protocol,
            message: format!("session hello for unit {u:?}, expected {unit_id}"),
        }),
        _ => Ok(()),
    }
}

fn credential_from(key: &rcgen::KeyPair, cert_pem: &str) -> Result<Arc<CertifiedKey>, String> {
    let cred = Credential {
        unit_id: String::new(),
        key: key.serialize_pem(),
        cert: cert_pem.to_owned(),
    };
    let (chain, key) = cred.decode().map_err(|e| format!("{e:#}"))?;
    crate::tls::certified_key(chain, &key).map_err(|e| format!("{e:#}"))
}

/// `reconnect`: stays connected with its credential and reconnects with backoff + full jitter
/// whenever the session ends, until `stop`.
async fn session_device(
    mut d: Device,
    inputs: Rc<Inputs>,
    mark: Rc<Cell<Option<u64>>>,
    permit: OwnedSemaphorePermit,
) {
    let Inputs::Reconnect {
        creds,
        resume,
        attempts: attempt_cap,
    } = &*inputs
    else {
        return;
    };
    let (unit_id, certified) = &creds[d.index];
    // With --tls-resume one configuration for the device's whole life, so that its session
    // cache carries tickets from one connection to the next.
    let kept = resume.then(|| {
        let mut config = (*d.ctx.with_credential(certified.clone())).clone();
        config.resumption = rustls::client::Resumption::in_memory_sessions(2);
        Arc::new(config)
    });
    let source = crate::sources::source_for(&d.ctx.sources, d.id);
    let mut permit = Some(permit);
    let mut attempt = 0u32;
    let mut had_session = false;
    let mut counted_reauth = false;
    let mut attempts_after_mark = 0u64;
    let mut loss_after_mark: Option<u64> = None;
    loop {
        if d.stopping() {
            break;
        }
        // With --attempt-cap, reconnects (not the first connection) wait for a turn.
        let turn = match (attempt_cap, &permit) {
            (Some(cap), None) => {
                let mut phase = d.phase.clone();
                tokio::select! {
                    p = cap.clone().acquire_owned() => Some(p.expect("semaphore never closed")),
                    _ = phase.wait_for(|p| *p == Phase::Stop) => break,
                }
            }
            _ => None,
        };
        let connect_ms = unix_ms();
        let marked_attempt = mark.get().is_some_and(|m| connect_ms >= m);
        if marked_attempt {
            attempts_after_mark += 1;
        }
        d.stats.borrow_mut().progress.attempts += 1;
        let started = Instant::now();
        let deadline = started + d.ctx.handshake_timeout;
        let config = kept
            .clone()
            .unwrap_or_else(|| d.ctx.with_credential(certified.clone()));
        let mut phase = d.phase.clone();
        let result = tokio::select! {
            r = async {
                let mut ws = fleet::open(&d.ctx, source, config, deadline).await?;
                let unit = fleet::expect_hello(&mut ws, deadline, "session").await?;
                if unit.as_deref().is_some_and(|u| u != unit_id) {
                    return Err(Failure::Error {
                        kind: FailKind::Protocol,
                        message: format!("session hello for unit {unit:?}, expected {unit_id}"),
                    });
                }
                Ok(ws)
            } => Some(r),
            _ = phase.wait_for(|p| *p == Phase::Stop) => None,
        };
        drop(permit.take());
        drop(turn);
        let Some(result) = result else { break };
        let retry_after = match result {
            Ok(mut ws) => {
                attempt = 0;
                let now = unix_ms();
                let reauth = marked_attempt;
                {
                    let mut s = d.stats.borrow_mut();
                    record_duration(&mut s.session_us, started.elapsed());
                    s.progress.connected += 1;
                    if fleet::resumed(&ws) {
                        s.progress.resumed += 1;
                    }
                    if !had_session {
                        had_session = true;
                        s.progress.first_sessions += 1;
                        s.touch();
                    }
                    if reauth {
                        s.progress.reauthed += 1;
                        if !counted_reauth {
                            counted_reauth = true;
                            s.reauth_at_ms.push(now);
                            s.attempts_after_mark
                                .saturating_record(attempts_after_mark.max(1));
                        }
                        if let Some(lost) = loss_after_mark.take() {
                            record_duration(
                                &mut s.downtime_us,
                                Duration::from_millis(now.saturating_sub(lost)),
                            );
                        }
                        s.update_full();
                    }
                }
                let end = hold(&mut ws, &mut d.phase, d.ctx.close_timeout).await;
                let mut s = d.stats.borrow_mut();
                s.progress.connected -= 1;
                if reauth {
                    s.progress.reauthed -= 1;
                    s.update_full();
                }
                match end {
                    HoldEnd::Stopped => break,
                    HoldEnd::Lost(message) => {
                        s.progress.lost += 1;
                        s.sample("lost", &message);
                        if mark.get().is_some() {
                            let now = unix_ms();
                            loss_after_mark.get_or_insert(now);
                            s.loss(now);
                        }
                        None
                    }
                    HoldEnd::Refused {
                        reason,
                        message,
                        retry_after,
                    } => {
                        s.progress.lost += 1;
                        s.refusal(&reason, &message);
                        if messages::is_terminal_session_refusal(&reason) {
                            s.gave_up();
                            s.update_full();
                            return;
                        }
                        retry_after
                    }
                }
            }
            Err(Failure::Refused {
                reason,
                message,
                retry_after,
            }) => {
                let mut s = d.stats.borrow_mut();
                s.refusal(&reason, &message);
                if messages::is_terminal_session_refusal(&reason) {
                    s.gave_up();
                    s.update_full();
                    return;
                }
                retry_after
            }
            Err(Failure::Error { kind, message }) => {
                d.stats.borrow_mut().fail(kind, &message);
                None
            }
        };
        let wait = d.backoff.delay(attempt, retry_after, &mut d.rng);
        attempt = attempt.saturating_add(1);
        if !d.pause(wait).await {
            break;
        }
    }
    drop(permit);
}

enum HoldEnd {
    Stopped,
    Lost(String),
    Refused {
        reason: String,
        message: String,
        retry_after: Option<Duration>,
    },
}

/// Keeps a session open (tungstenite answers the gateway's pings) until it ends or `stop`.
async fn hold(ws: &mut Ws, phase: &mut watch::Receiver<Phase>, close_timeout: Duration) -> HoldEnd {
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(WsMessage::Text(text))) => {
                    if let Ok(Message::Refused { reason, message, retry_after_ms, .. }) =
                        Message::parse(text.as_str())
                    {
                        drain(ws, close_timeout).await;
                        return HoldEnd::Refused {
                            reason,
                            message,
                            retry_after: retry_after_ms.map(Duration::from_millis),
                        };
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    // Answer promptly: a gateway shutting down waits for our close.
                    drain(ws, close_timeout).await;
                    let why = frame.map_or("no status".to_owned(), |f| {
                        format!("{} {}", u16::from(f.code), f.reason)
                    });
                    return HoldEnd::Lost(format!("the gateway closed the session ({})", why.trim()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return HoldEnd::Lost(format!("session lost: {e}")),
                None => return HoldEnd::Lost("the gateway closed the connection".to_owned()),
            },
            _ = phase.wait_for(|p| *p == Phase::Stop) => {
                let _ = timeout(close_timeout, fleet::close(ws)).await;
                return HoldEnd::Stopped;
            }
        }
    }
}

/// Reads (bounded) until the connection ends, which sends our close reply.
async fn drain(ws: &mut Ws, limit: Duration) {
    let _ = timeout(limit.min(Duration::from_secs(2)), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// The step a timeout message names: "TLS handshake did not finish …" → "TLS handshake",
/// "no hello (mode session) within …" → "hello (mode session)".
fn timeout_step(message: &str) -> String {
    if let Some((step, _)) = message.split_once(" did not finish") {
        return step.split(" to ").next().unwrap_or(step).to_owned();
    }
    if let Some(rest) = message.strip_prefix("no ")
        && let Some((step, _)) = rest.split_once(" within")
    {
        return step.to_owned();
    }
    message
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A worker's running figures.
struct Stats {
    zero: Instant,
    devices: u64,
    /// `mark` arrived.
    marked: bool,
    progress: FleetProgress,
    error_samples: BTreeMap<String, String>,
    register_us: Histogram<u64>,
    ready_us: Histogram<u64>,
    session_us: Histogram<u64>,
    downtime_us: Histogram<u64>,
    attempts_after_mark: Histogram<u64>,
    per_second: Vec<u64>,
    last_done: Duration,
    reauth_at_ms: Vec<u64>,
    first_loss_ms: Option<u64>,
    last_loss_ms: Option<u64>,
}

impl Stats {
    fn new(zero: Instant, devices: u64) -> Self {
        Self {
            zero,
            devices,
            marked: false,
            progress: FleetProgress::default(),
            error_samples: BTreeMap::new(),
            register_us: wire::new_histogram(),
            ready_us: wire::new_histogram(),
            session_us: wire::new_histogram(),
            downtime_us: wire::new_histogram(),
            attempts_after_mark: Histogram::new_with_bounds(1, 1_000_000, 3)
                .expect("valid histogram bounds"),
            per_second: Vec::new(),
            last_done: Duration::ZERO,
            reauth_at_ms: Vec::new(),
            first_loss_ms: None,
            last_loss_ms: None,
        }
    }

    fn touch(&mut self) {
        self.last_done = self.zero.elapsed();
    }

    fn sample(&mut self, key: &str, message: &str) {
        self.error_samples
            .entry(key.to_owned())
            .or_insert_with(|| message.to_owned());
    }

    fn fail(&mut self, kind: FailKind, message: &str) {
        self.progress.errors.add(kind);
        if kind == FailKind::Timeout {
            *self
                .progress
                .timeouts
                .entry(timeout_step(message))
                .or_default() += 1;
        }
        let key = serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.sample(&key, message);
    }

    fn refusal(&mut self, reason: &str, message: &str) {
        *self.progress.refusals.entry(reason.to_owned()).or_default() += 1;
        self.sample(&format!("refused:{reason}"), message);
    }

    fn gave_up(&mut self) {
        self.progress.gave_up += 1;
        self.touch();
    }

    fn ready(&mut self, latency: Duration) {
        self.touch();
        self.progress.ready += 1;
        record_duration(&mut self.ready_us, latency);
        let second = self.last_done.as_secs() as usize;
        if self.per_second.len() <= second {
            self.per_second.resize(second + 1, 0);
        }
        self.per_second[second] += 1;
    }

    fn loss(&mut self, now: u64) {
        self.first_loss_ms = Some(self.first_loss_ms.map_or(now, |f| f.min(now)));
        self.last_loss_ms = Some(self.last_loss_ms.map_or(now, |l| l.max(now)));
    }

    /// Keeps `all_reauthed_at_ms` current: set when every device still trying is connected
    /// with a session begun after `mark`.
    fn update_full(&mut self) {
        let alive = self.devices.saturating_sub(self.progress.gave_up);
        let full = self.marked
            && self.progress.launched == self.devices
            && self.progress.reauthed >= alive;
        match (full, self.progress.all_reauthed_at_ms) {
            (true, None) => self.progress.all_reauthed_at_ms = Some(unix_ms()),
            (false, Some(_)) => self.progress.all_reauthed_at_ms = None,
            _ => {}
        }
    }

    fn result(&self) -> FleetResult {
        FleetResult {
            progress: self.progress.clone(),
            error_samples: self.error_samples.clone(),
            register_us: wire::encode_histogram(&self.register_us),
            ready_us: wire::encode_histogram(&self.ready_us),
            session_us: wire::encode_histogram(&self.session_us),
            downtime_us: wire::encode_histogram(&self.downtime_us),
            per_second: self.per_second.clone(),
            done_secs: self.last_done.as_secs_f64(),
            reauth_at_ms: self.reauth_at_ms.clone(),
            first_loss_ms: self.first_loss_ms,
            last_loss_ms: self.last_loss_ms,
            attempts_after_mark: wire::encode_histogram(&self.attempts_after_mark),
            cpu_secs: crate::sys::own_cpu_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_keyed_by_step() {
        assert_eq!(
            timeout_step("TCP connect to 127.0.0.1:8443 did not finish within 10 s"),
            "TCP connect"
        );
        assert_eq!(
            timeout_step("TLS handshake did not finish within 10 s"),
            "TLS handshake"
        );
        assert_eq!(
            timeout_step("no hello (mode session) within the handshake timeout"),
            "hello (mode session)"
        );
    }
}
