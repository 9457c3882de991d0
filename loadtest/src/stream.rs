//! `loadtest stream`: K parallel file streams (`open {"kind":"file"}`, `docs/protocol.md`
//! §6.6) from management to K devices. Management sends data only as far as the devices'
//! credit allows; devices consume (optionally at a fixed, slow rate) and grant credit each
//! half window. Measures the bytes per second through the gateway, the time of each stream,
//! and the gateway's memory before, during and after, to show it stays near K × window.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};

use crate::envelope::{self, Envelope};
use crate::fleet::Ws;
use crate::lean::{Event, LeanConn};
use crate::mgmt::{self, DevicePlan, DevicePool, RelayCommon};
use crate::plan::parse_secs;
use crate::relay::{busy_cores, machine_jiffies};
use crate::relay_wire::DeviceStats;
use crate::summary::{self, round2};

/// 1 MB = 1,000,000 bytes (sizes and rates).
const MB: f64 = 1_000_000.0;

#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    #[command(flatten)]
    pub common: RelayCommon,
    /// Parallel streams, one per device (the first K credentials)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub streams: u64,
    /// Bytes per stream, in MB (1 MB = 1,000,000 bytes)
    #[arg(long)]
    pub size: f64,
    /// Slow devices: each reads its stream at most this fast, MB/s (default: as fast as it
    /// can)
    #[arg(long)]
    pub device_read_rate: Option<f64>,
    /// Window the devices grant in `accept` (and management in `open`), bytes
    #[arg(long, default_value_t = envelope::DEFAULT_WINDOW)]
    pub window: u32,
    /// Data bytes per envelope (§6.2: at most 64 KiB; 16 KiB recommended)
    #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk: u32,
    /// Device read buffer, bytes (tungstenite's, or the lean wire's receive buffer)
    #[arg(long, default_value_t = 64 * 1024)]
    pub device_read_buffer: usize,
    /// Run both sides on tokio-rustls and tokio-tungstenite instead of the lean wire (TLS 1.3
    /// records and WebSocket frames written for throughput: see loadtest/README.md). For
    /// comparison, and for TLS 1.2
    #[arg(long)]
    pub tungstenite: bool,
    /// Give up on streams still running after this many seconds
    #[arg(long, value_parser = parse_secs, default_value = "600")]
    pub timeout: f64,
    /// Seconds to wait for the devices' sessions
    #[arg(long, value_parser = parse_secs, default_value = "300")]
    pub connect_timeout: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    pub scenario: &'static str,
    pub ok: bool,
    pub verdict: String,
    pub streams: u64,
    pub completed: u64,
    /// Streams that ended with a reset or a failed close, by error code.
    pub failures: std::collections::BTreeMap<String, u64>,
    pub bytes_per_stream: u64,
    /// Data bytes management sent, all streams.
    pub bytes_total: u64,
    /// bytes_total / (first open → last device close), MB/s.
    pub aggregate_mb_per_sec: f64,
    /// MB sent by management in each second.
    pub mb_per_second: Vec<f64>,
    /// open → the device's close, seconds: min, median, max.
    pub stream_secs: StreamTimes,
    pub gateway: StreamGateway,
    pub generator_cpu_cores: f64,
    pub machine_busy_cores: Option<f64>,
    /// The gateway's own time per stream control message (credit, accept, close) during the
    /// transfer (`fleetgate_stream_control_latency_seconds`; absent for other servers).
    pub gateway_stream_control: Option<crate::gateway_hops::HopFigures>,
    /// fleetgate only: devices and management connections per shard during the transfer
    /// (throughput here depends on it).
    pub gateway_placement: Option<crate::gateway_hops::Placement>,
    /// fleetgate only: the cores each shard thread used during the transfer
    /// (`fleetgate_shard_cpu_seconds_total`): the busiest one is the serial stage.
    pub gateway_shard_cpu_cores: Option<Vec<f64>>,
    pub devices: DeviceStats,
    pub setup: StreamSetup,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamTimes {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamGateway {
    pub pid: Option<u32>,
    /// CPU seconds during the transfer / its length.
    pub cpu_cores: Option<f64>,
    /// After the devices connected, before the first `open`.
    pub rss_before_bytes: Option<u64>,
    /// Highest reading during the transfer (sampled every 100 ms).
    pub rss_peak_bytes: Option<u64>,
    /// Median of the readings during the transfer.
    pub rss_median_during_bytes: Option<u64>,
    /// 1 s after the last stream ended.
    pub rss_after_bytes: Option<u64>,
    /// peak − before.
    pub rss_growth_peak_bytes: Option<i64>,
    /// streams × window: what flow control allows the gateway to hold.
    pub window_bound_bytes: u64,
    /// growth ≤ bound + 10 %.
    pub within_bound: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamSetup {
    pub url: String,
    pub window: u32,
    pub chunk: u32,
    pub device_read_rate_mb_per_sec: Option<f64>,
    pub mgmt_connections: u64,
    pub device_workers: u64,
    /// `lean` or `tungstenite`.
    pub wire: &'static str,
}

pub fn main(args: StreamArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest stream: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest stream: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// One stream, shared by the writer and the reader of its management connection.
#[derive(Debug)]
struct St {
    unit: String,
    channel: u32,
    remaining: u64,
    credit: i64,
    accepted: bool,
    close_sent: bool,
    done: bool,
    opened: Option<Instant>,
    finished: Option<Instant>,
    error: Option<String>,
    /// This stream's data envelope of a full chunk, built once: every full chunk is a clone
    /// of it (a reference count, not a copy), so the generator spends its CPU on TLS rather
    /// than on filling fresh 16 KiB buffers.
    full_chunk: Option<Bytes>,
}

struct Shared {
    streams: Mutex<Vec<St>>,
    notify: Notify,
    sent_bytes: Arc<AtomicU64>,
}

async fn run(args: StreamArgs) -> Result<ExitCode> {
    let _ = crate::sys::raise_fd_limit();
    let c = &args.common;
    if args.size.is_nan() || args.size <= 0.0 {
        bail!("--size must be positive");
    }
    if args.chunk as usize > envelope::MAX_DATA {
        bail!("--chunk must be at most {} bytes", envelope::MAX_DATA);
    }
    if let Some(r) = args.device_read_rate
        && (r.is_nan() || r <= 0.0)
    {
        bail!("--device-read-rate must be positive");
    }
    let k = args.streams;
    let available = crate::creds::count(&c.creds)?;
    if k > available {
        bail!(
            "{} holds {available} credentials, {k} streams need one device each",
            c.creds.display()
        );
    }
    let size = (args.size * MB).round() as u64;
    let setup = mgmt::setup(c, k)?;
    let units: Vec<String> = crate::creds::read_slice(&c.creds, 0, k)?
        .into_iter()
        .map(|c| c.unit_id)
        .collect();
    let mut mctx = mgmt::context(
        &setup.mgmt_url,
        setup.addr,
        &setup.tls,
        Some(mgmt::mgmt_credential(&c.mgmt_cert, &c.mgmt_key)?),
        256 * 1024,
        Duration::from_secs_f64(c.handshake_timeout),
        Vec::new(),
    )?;
    mctx.ws_config = mgmt::mgmt_ws_config();
    let lean = !args.tungstenite;
    if lean && c.tls == crate::tls::TlsVersions::Tls12 {
        bail!("the lean wire speaks TLS 1.3 only: add --tungstenite for --tls 1.2");
    }
    if lean {
        crate::lean::enable(&mut mctx);
    }
    drop(mgmt::connect_management(&mctx).await?);

    let workers = c.workers.unwrap_or(1);
    let mut pool = DevicePool::start(
        c,
        &setup,
        &DevicePlan {
            devices: k,
            workers,
            read_buffer: args.device_read_buffer,
            window: args.window,
            read_rate: args.device_read_rate.map(|r| r * MB),
            max_runtime_secs: (args.connect_timeout + args.timeout + 120.0) as u64,
            lean,
        },
    )
    .await?;
    pool.connect_all(Duration::from_secs_f64(args.connect_timeout))
        .await?;
    if !pool.failed.is_empty() {
        let samples = pool.samples.clone();
        pool.stop().await.ok();
        bail!(
            "{} of {k} devices did not connect: {samples:?}",
            k - pool.connected
        );
    }
    eprintln!(
        "stream: {k} devices connected in {:.1} s",
        pool.connect_secs
    );
    let mut conns = Vec::new();
    for _ in 0..c.mgmt_conns {
        conns.push(if lean {
            MgmtConn::Lean(Box::new(mgmt::connect_management_lean(&mctx).await?))
        } else {
            MgmtConn::Ws(Box::new(mgmt::connect_management(&mctx).await?))
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tls = || {
        mctx.url
            .starts_with("wss:")
            .then(|| (mctx.anonymous.clone(), mctx.server_name.clone()))
    };
    let control_at =
        || crate::gateway_hops::snapshot(mctx.addr, tls(), crate::gateway_hops::STREAM_CONTROL);
    let control0 = control_at().await;
    let metrics0 = crate::gateway_hops::fetch(mctx.addr, tls()).await;
    let placement = metrics0
        .as_deref()
        .map(crate::gateway_hops::placement)
        .filter(|p| !p.devices_per_shard.is_empty());
    let shard_cpu0 = metrics0
        .as_deref()
        .map(crate::gateway_hops::shard_cpu_secs)
        .unwrap_or_default();
    let (g0, rss_before) = mgmt::gateway_sample(c.gateway_pid);
    let (w0, m0, busy0) = (
        pool.cpu_secs(),
        crate::sys::own_cpu_secs(),
        machine_jiffies(),
    );

    // Sampler: gateway RSS every 100 ms, management bytes every second.
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (sent_bytes, stop) = (sent_bytes.clone(), stop_sampling.clone());
        let pid = c.gateway_pid;
        tokio::spawn(async move {
            let (mut rss, mut per_second) = (Vec::new(), Vec::new());
            let mut last = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                if let Some(r) = pid.and_then(crate::sys::rss_bytes) {
                    rss.push(r);
                }
                n += 1;
                if n.is_multiple_of(10) {
                    let now = sent_bytes.load(Ordering::Relaxed);
                    per_second.push(round2((now - last) as f64 / MB));
                    last = now;
                }
            }
            (rss, per_second)
        })
    };

    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let mut handles = Vec::new();
    let conns_n = conns.len();
    for (ci, ws) in conns.into_iter().enumerate() {
        let mine: Vec<St> = units
            .iter()
            .enumerate()
            .filter(|(i, _)| i % conns_n == ci)
            .map(|(i, u)| St {
                unit: u.clone(),
                channel: i as u32 + 1,
                remaining: size,
                credit: 0,
                accepted: false,
                close_sent: false,
                done: false,
                opened: None,
                finished: None,
                error: None,
                full_chunk: None,
            })
            .collect();
        let shared = Arc::new(Shared {
            streams: Mutex::new(mine),
            notify: Notify::new(),
            sent_bytes: sent_bytes.clone(),
        });
        let plan = Plan {
            size,
            window: args.window,
            chunk: args.chunk as usize,
            deadline,
        };
        handles.push(match ws {
            MgmtConn::Ws(ws) => tokio::spawn(push(*ws, shared, plan)),
            MgmtConn::Lean(conn) => tokio::spawn(push_lean(*conn, shared, plan)),
        });
    }
    let mut all: Vec<St> = Vec::new();
    for h in handles {
        all.extend(h.await.context("a management task failed")??);
    }
    let transfer_end = Instant::now();
    let (g1, _) = mgmt::gateway_sample(c.gateway_pid);
    let control1 = control_at().await;
    let shard_cpu1 = crate::gateway_hops::fetch(mctx.addr, tls())
        .await
        .as_deref()
        .map(crate::gateway_hops::shard_cpu_secs)
        .unwrap_or_default();
    let (w1, m1, busy1) = (
        pool.cpu_secs(),
        crate::sys::own_cpu_secs(),
        machine_jiffies(),
    );
    stop_sampling.store(true, Ordering::Release);
    let (rss_series, mb_per_second) = sampler.await.context("sampler")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, rss_after) = mgmt::gateway_sample(c.gateway_pid);
    pool.stop().await?;

    let first_open = all.iter().filter_map(|s| s.opened).min();
    let last_end = all.iter().filter_map(|s| s.finished).max();
    let completed: Vec<&St> = all.iter().filter(|s| s.done && s.error.is_none()).collect();
    let mut failures = std::collections::BTreeMap::new();
    for s in &all {
        let code = match (&s.error, s.done) {
            (Some(e), _) => e.clone(),
            (None, false) => "timeout".to_owned(),
            (None, true) => continue,
        };
        *failures.entry(code).or_insert(0u64) += 1;
    }
    let bytes_total = sent_bytes.load(Ordering::Relaxed);
    let span = match (first_open, last_end) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => (transfer_end - first_open.unwrap_or(transfer_end))
            .as_secs_f64()
            .max(1e-9),
    };
    let mut times: Vec<f64> = completed
        .iter()
        .filter_map(|s| Some((s.finished? - s.opened?).as_secs_f64()))
        .collect();
    times.sort_by(f64::total_cmp);
    let stream_secs = if times.is_empty() {
        StreamTimes::default()
    } else {
        StreamTimes {
            min: round2(times[0]),
            median: round2(summary::median(&times).unwrap_or(0.0)),
            max: round2(times[times.len() - 1]),
        }
    };
    let transfer_secs = (transfer_end - first_open.unwrap_or(transfer_end))
        .as_secs_f64()
        .max(1e-9);
    let mut sorted_rss = rss_series.clone();
    sorted_rss.sort_unstable();
    let peak = sorted_rss.last().copied();
    let bound = k * u64::from(args.window);
    let growth = peak.zip(rss_before).map(|(p, b)| p as i64 - b as i64);
    let ok = completed.len() as u64 == k;
    let s = StreamSummary {
        scenario: "stream",
        ok,
        verdict: if ok {
            format!("all {k} streams completed")
        } else {
            format!("{} of {k} streams completed: {failures:?}", completed.len())
        },
        streams: k,
        completed: completed.len() as u64,
        failures,
        bytes_per_stream: size,
        bytes_total,
        aggregate_mb_per_sec: round2(bytes_total as f64 / MB / span),
        mb_per_second,
        stream_secs,
        gateway: StreamGateway {
            pid: c.gateway_pid,
            cpu_cores: g0.zip(g1).map(|(a, b)| round2((b - a) / transfer_secs)),
            rss_before_bytes: rss_before,
            rss_peak_bytes: peak,
            rss_median_during_bytes: (!sorted_rss.is_empty())
                .then(|| sorted_rss[sorted_rss.len() / 2]),
            rss_after_bytes: rss_after,
            rss_growth_peak_bytes: growth,
            window_bound_bytes: bound,
            within_bound: growth.map(|g| g as f64 <= bound as f64 * 1.1),
        },
        generator_cpu_cores: round2(((w1 - w0) + (m1 - m0)) / transfer_secs),
        machine_busy_cores: busy_cores(busy0, busy1),
        gateway_stream_control: control0
            .zip(control1)
            .and_then(|(a, b)| crate::gateway_hops::figures(&a, &b)),
        gateway_placement: placement,
        gateway_shard_cpu_cores: crate::gateway_hops::shard_cores(
            &shard_cpu0,
            &shard_cpu1,
            transfer_secs,
        ),
        devices: pool.stats.clone(),
        setup: StreamSetup {
            url: c.url.clone(),
            window: args.window,
            chunk: args.chunk,
            device_read_rate_mb_per_sec: args.device_read_rate,
            mgmt_connections: c.mgmt_conns,
            device_workers: workers,
            wire: if lean { "lean" } else { "tungstenite" },
        },
    };
    eprintln!(
        "stream: {} of {k} streams × {:.1} MB in {:.2} s: {} MB/s aggregate; per stream {:?} s; \
         gateway RSS before {:?}, peak {:?} (growth {:?}, bound K × window {}), after {:?}; \
         gateway CPU {:?} cores, generator {} cores, machine busy {:?} cores",
        s.completed,
        args.size,
        span,
        s.aggregate_mb_per_sec,
        s.stream_secs,
        s.gateway.rss_before_bytes,
        s.gateway.rss_peak_bytes,
        s.gateway.rss_growth_peak_bytes,
        bound,
        s.gateway.rss_after_bytes,
        s.gateway.cpu_cores,
        s.generator_cpu_cores,
        s.machine_busy_cores
    );
    if let Some(p) = &s.gateway_placement {
        eprintln!(
            "stream: gateway placement: devices per shard {:?}, management connections per \
             shard {:?}",
            p.devices_per_shard, p.management_per_shard
        );
    }
    if let Some(cores) = &s.gateway_shard_cpu_cores {
        eprintln!("stream: gateway CPU per shard (cores): {cores:?}");
    }
    if let Some(h) = &s.gateway_stream_control {
        eprintln!(
            "stream: inside the gateway, per stream control message ({} of them: credit, \
             accept, close): p50 ≤ {} ms, p90 ≤ {} ms, p99 ≤ {} ms, p99.9 ≤ {} ms, mean {} ms",
            h.hops, h.p50_le_ms, h.p90_le_ms, h.p99_le_ms, h.p999_le_ms, h.mean_ms
        );
    }
    let json = serde_json::to_string_pretty(&s)?;
    println!("{json}");
    if let Some(path) = &c.json {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if s.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The `open` body of a file stream. The load generator's devices check neither the name
/// nor the SHA-256 (the gateway relays the body untouched).
pub fn open_body(unit: &str, size: u64, window: u32) -> String {
    format!(
        r#"{{"kind":"file","window":{window},"path":"loadtest-{unit}.bin","size":{size},"sha256":"{}"}}"#,
        "0".repeat(64)
    )
}

/// Pushes every stream of one management connection: a writer that sends data as credit
/// allows (round-robin over the streams, one chunk each per turn), a reader that books
/// accepts, credit, closes and resets.
async fn push(ws: Ws, shared: Arc<Shared>, plan: Plan) -> Result<Vec<St>> {
    let (size, window, chunk, deadline) = (plan.size, plan.window, plan.chunk, plan.deadline);
    let (mut sink, mut stream) = ws.split();
    let reader = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                let frame = match timeout_at(deadline, stream.next()).await {
                    Err(_) => break,
                    Ok(Some(Ok(f))) => f,
                    Ok(Some(Err(e))) => bail!("management connection lost: {e}"),
                    Ok(None) => bail!("the gateway closed the management connection"),
                };
                let WsMessage::Binary(b) = frame else {
                    continue;
                };
                let Some(e) = Envelope::parse(&b) else {
                    continue;
                };
                let mut streams = shared.streams.lock().expect("not poisoned");
                if !book(&mut streams, &e) {
                    continue;
                }
                let all_done = streams.iter().all(|s| s.done);
                drop(streams);
                shared.notify.notify_one();
                if all_done {
                    break;
                }
            }
            shared.notify.notify_one();
            Ok::<_, anyhow::Error>(stream)
        })
    };
    let pattern = pattern(chunk);
    let opens: Vec<Vec<u8>> = {
        let mut streams = shared.streams.lock().expect("not poisoned");
        let now = Instant::now();
        streams
            .iter_mut()
            .map(|s| {
                s.opened = Some(now);
                envelope::encode(
                    envelope::OPEN,
                    s.channel,
                    0,
                    &s.unit,
                    open_body(&s.unit, size, window).as_bytes(),
                )
            })
            .collect()
    };
    for o in opens {
        sink.feed(WsMessage::Binary(Bytes::from(o))).await?;
    }
    sink.flush().await?;
    let mut rr = 0usize;
    let mut write_error = None;
    loop {
        let Batch {
            msgs: batch,
            data_bytes,
            waiting,
            finished,
        } = next_batch(
            &mut shared.streams.lock().expect("not poisoned"),
            &mut rr,
            chunk,
            &pattern,
            &mut Bytes::from,
        );
        if finished || Instant::now() >= deadline {
            break;
        }
        if batch.is_empty() {
            if let Err(e) = sink.flush().await {
                write_error = Some(e);
                break;
            }
            // Woken by the reader (accept, credit, close, reset), or re-check now and then.
            let _ = tokio::time::timeout(
                if waiting {
                    Duration::from_millis(100)
                } else {
                    Duration::from_millis(20)
                },
                shared.notify.notified(),
            )
            .await;
            continue;
        }
        for m in batch {
            if let Err(e) = sink.feed(WsMessage::Binary(m)).await {
                write_error = Some(e);
                break;
            }
        }
        if write_error.is_some() {
            break;
        }
        shared.sent_bytes.fetch_add(data_bytes, Ordering::Relaxed);
    }
    let _ = sink.flush().await;
    let stream = reader.await.context("reader task")??;
    if let Some(e) = write_error {
        bail!("sending on the management connection failed: {e}");
    }
    let mut ws = sink.reunite(stream).expect("same connection");
    let _ = tokio::time::timeout(Duration::from_secs(2), crate::fleet::close(&mut ws)).await;
    let shared = Arc::try_unwrap(shared)
        .ok()
        .context("stream state still shared")?;
    Ok(shared.streams.into_inner().expect("not poisoned"))
}

/// The data of every chunk.
fn pattern(chunk: usize) -> Vec<u8> {
    (0..chunk).map(|i| (i % 251) as u8).collect()
}

/// Books an `accept`, `credit`, `close` or `reset` from the gateway; `false` if it is none of
/// these or for no stream of ours.
fn book(streams: &mut [St], e: &Envelope<'_>) -> bool {
    let Some(s) = streams.iter_mut().find(|s| s.channel == e.channel) else {
        return false;
    };
    match e.kind {
        envelope::ACCEPT => {
            s.accepted = true;
            s.credit += accept_window(e.body).unwrap_or(0) as i64;
        }
        envelope::CREDIT => s.credit += i64::from(e.credit().unwrap_or(0)),
        envelope::CLOSE => {
            s.done = true;
            s.finished = Some(Instant::now());
            if let Some(code) = envelope::error_code(e.body) {
                s.error = Some(code);
            }
        }
        envelope::RESET => {
            s.done = true;
            s.finished = Some(Instant::now());
            s.error = Some(envelope::error_code(e.body).unwrap_or_default());
        }
        _ => return false,
    }
    true
}

/// What each management connection pushes: `size` bytes per stream in data envelopes of
/// `chunk` bytes, with `window` granted for the device's direction, until `deadline`.
#[derive(Debug, Clone, Copy)]
struct Plan {
    size: u64,
    window: u32,
    chunk: usize,
    deadline: Instant,
}

/// A management connection of either wire.
enum MgmtConn {
    Ws(Box<Ws>),
    Lean(Box<LeanConn>),
}

/// [`push`] on the lean wire: one task writes data as credit allows and books what the
/// gateway sends, without a lock. A batch is sealed only when the previous one is written
/// (the kernel's socket buffer keeps the gateway fed meanwhile).
async fn push_lean(mut conn: LeanConn, shared: Arc<Shared>, plan: Plan) -> Result<Vec<St>> {
    let (size, window, chunk, deadline) = (plan.size, plan.window, plan.chunk, plan.deadline);
    let mut streams = std::mem::take(&mut *shared.streams.lock().expect("not poisoned"));
    let pattern = pattern(chunk);
    let now = Instant::now();
    for s in &mut streams {
        s.opened = Some(now);
        let open = envelope::encode(
            envelope::OPEN,
            s.channel,
            0,
            &s.unit,
            open_body(&s.unit, size, window).as_bytes(),
        );
        conn.send_frame(2, &open)?;
    }
    let mut rr = 0usize;
    let mut refs: Vec<Bytes> = Vec::new();
    loop {
        // What the gateway sent: accepts, credit, closes, resets.
        loop {
            match conn.try_read() {
                Ok(0) => bail!("the gateway closed the management connection"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => bail!("management connection lost: {e}"),
            }
            while let Some(ev) = conn.next_event()? {
                match ev {
                    Event::Binary { head, .. } => {
                        if let Some(e) = Envelope::parse(head) {
                            book(&mut streams, &e);
                        }
                    }
                    Event::Text(_) => {}
                    Event::Closed(code) => {
                        bail!("the gateway closed the management connection ({code:?})")
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        // Nothing to send: no stream has credit (and the last batch is written).
        let mut starved = false;
        if conn.pending() == 0 {
            let b = {
                let conn = &mut conn;
                next_batch(&mut streams, &mut rr, chunk, &pattern, &mut |m: Vec<u8>| {
                    Bytes::from(crate::lean::client_frame(2, &m, conn.next_mask()))
                })
            };
            if b.finished {
                break;
            }
            starved = b.msgs.is_empty();
            if !starved {
                refs.clear();
                refs.extend(b.msgs);
                let frames: Vec<&[u8]> = refs.iter().map(|m| &m[..]).collect();
                conn.send_frames(&frames)?;
                shared.sent_bytes.fetch_add(b.data_bytes, Ordering::Relaxed);
            }
        }
        let flushed = conn
            .try_flush()
            .context("sending on the management connection failed")?;
        if flushed && !starved {
            // Written: seal the next batch at once.
            continue;
        }
        // The socket is full (wait until it takes more, or credit comes), or there is no
        // credit (wait for it).
        let wait = async {
            if flushed {
                conn.readable().await
            } else {
                tokio::select! {
                    r = conn.readable() => r,
                    w = conn.writable() => w,
                }
            }
        };
        match timeout_at(deadline, wait).await {
            Ok(r) => r.context("management connection")?,
            Err(_) => break,
        }
    }
    let _ = conn.flush().await;
    conn.close(Duration::from_secs(2)).await;
    Ok(streams)
}

/// What the writer sends next.
struct Batch {
    msgs: Vec<Bytes>,
    data_bytes: u64,
    /// Some stream has not sent its close yet.
    waiting: bool,
    /// Every stream is over.
    finished: bool,
}

/// Up to 16 envelopes: one data chunk per stream that has the credit for it (round-robin from
/// `rr`), and the `close` of every accepted stream whose bytes are all sent. Never sends more
/// than a stream's credit. `wire` turns an envelope into what is sent (the envelope itself
/// for tungstenite, a masked frame on the lean wire); a full chunk is built once per stream.
fn next_batch(
    streams: &mut [St],
    rr: &mut usize,
    chunk: usize,
    pattern: &[u8],
    wire: &mut impl FnMut(Vec<u8>) -> Bytes,
) -> Batch {
    let mut b = Batch {
        msgs: Vec::new(),
        data_bytes: 0,
        waiting: false,
        finished: true,
    };
    let n = streams.len();
    for k in 0..n {
        let i = (*rr + k) % n;
        let s = &mut streams[i];
        if s.done {
            continue;
        }
        b.finished = false;
        if s.close_sent {
            continue;
        }
        b.waiting = true;
        if !s.accepted {
            continue;
        }
        if s.remaining == 0 {
            s.close_sent = true;
            b.msgs.push(wire(envelope::encode(
                envelope::CLOSE,
                s.channel,
                0,
                &s.unit,
                br#"{"ok":true}"#,
            )));
            continue;
        }
        let len = (chunk as u64).min(s.remaining);
        if s.credit < len as i64 {
            continue;
        }
        s.credit -= len as i64;
        s.remaining -= len;
        let mut data = |len: usize| {
            let mut msg = Vec::with_capacity(envelope::FIXED_HEADER + s.unit.len() + len);
            envelope::write_header(&mut msg, envelope::DATA, s.channel, 0, &s.unit);
            msg.extend_from_slice(&pattern[..len]);
            wire(msg)
        };
        let msg = if len as usize == chunk {
            match &s.full_chunk {
                Some(m) => m.clone(),
                None => s.full_chunk.insert(data(chunk)).clone(),
            }
        } else {
            data(len as usize)
        };
        b.msgs.push(msg);
        b.data_bytes += len;
        if b.msgs.len() >= 16 {
            *rr = i + 1;
            break;
        }
    }
    b
}

/// The `window` of an `accept` body.
fn accept_window(body: &[u8]) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct Accept {
        window: u32,
    }
    serde_json::from_slice::<Accept>(body)
        .ok()
        .map(|a| a.window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(channel: u32, remaining: u64) -> St {
        St {
            unit: format!("lt-{channel:06}"),
            channel,
            remaining,
            credit: 0,
            accepted: false,
            close_sent: false,
            done: false,
            opened: None,
            finished: None,
            error: None,
            full_chunk: None,
        }
    }

    #[test]
    fn the_writer_never_exceeds_credit_and_closes_after_the_last_byte() {
        let pattern = vec![7u8; 16384];
        let mut streams = vec![stream(1, 40_000), stream(2, 100_000)];
        let mut rr = 0;
        // Nothing before accept.
        let b = next_batch(&mut streams, &mut rr, 16384, &pattern, &mut Bytes::from);
        assert!(b.msgs.is_empty() && b.waiting && !b.finished);
        // Stream 1: accepted with a 20,000-byte window: one chunk fits, a second does not.
        streams[0].accepted = true;
        streams[0].credit = 20_000;
        let b = next_batch(&mut streams, &mut rr, 16384, &pattern, &mut Bytes::from);
        assert_eq!((b.msgs.len(), b.data_bytes), (1, 16384));
        let e = Envelope::parse(&b.msgs[0]).unwrap();
        assert_eq!(
            (e.kind, e.channel, e.unit, e.body.len()),
            (envelope::DATA, 1, "lt-000001", 16384)
        );
        assert!(
            next_batch(&mut streams, &mut rr, 16384, &pattern, &mut Bytes::from)
                .msgs
                .is_empty()
        );
        // Credit for the rest: the last piece is short, then the close.
        streams[0].credit += 30_000;
        let mut sent = 0;
        let mut closed = false;
        for _ in 0..5 {
            for m in next_batch(&mut streams, &mut rr, 16384, &pattern, &mut Bytes::from).msgs {
                let e = Envelope::parse(&m).unwrap();
                match e.kind {
                    envelope::DATA => sent += e.body.len(),
                    envelope::CLOSE => closed = true,
                    k => panic!("kind {k}"),
                }
            }
        }
        assert_eq!(sent, 40_000 - 16384);
        assert!(closed && streams[0].close_sent);
        assert!(streams[0].credit >= 0);
        // Both streams over: finished.
        streams[0].done = true;
        streams[1].done = true;
        assert!(next_batch(&mut streams, &mut rr, 16384, &pattern, &mut Bytes::from).finished);
    }

    #[test]
    fn open_and_accept_bodies() {
        let b = open_body("lt-000001", 50_000_000, 262_144);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["kind"], "file");
        assert_eq!(v["window"], 262_144);
        assert_eq!(v["size"], 50_000_000);
        assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(accept_window(br#"{"window":131072}"#), Some(131_072));
        assert_eq!(accept_window(b"{}"), None);
    }
}
