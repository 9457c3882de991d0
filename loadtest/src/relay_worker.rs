//! One device worker process of `relay` and `stream` (`loadtest __relay-worker CONFIG`): its
//! devices connect with their credentials (session mode, `docs/protocol.md` §5.4) and act as
//! a minimal agent for §6: every request is answered at once with
//! `{"ok":true,"result":{"pong":true,"time":…}}` (same channel and route, §6.3), every `open`
//! is accepted with the configured window, data is consumed (at `read_rate` for slow devices:
//! the device then reads its socket no faster) and credit granted each half window, and a
//! `close` from management is answered with `close {"ok":true,"size":n}` (the load generator
//! does not write files or check the SHA-256).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinSet, LocalSet};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};

use crate::envelope::{self, Envelope};
use crate::fleet::{self, Failure, FleetContext, Ws};
use crate::lean::{Event, LeanConn};
use crate::relay_wire::{DeviceCommand, DeviceReport, DeviceStats, DeviceWorkerConfig};

/// Attempts per device to get its first session.
const CONNECT_ATTEMPTS: u32 = 3;

/// Entry point of `loadtest __relay-worker CONFIG_JSON`.
pub fn main(config_json: &str) -> ExitCode {
    let config: DeviceWorkerConfig = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => return fatal(format!("bad worker configuration: {e}")),
    };
    if let Err(e) = crate::sys::raise_fd_limit() {
        eprintln!(
            "loadtest relay worker {}: open-file limit: {e}",
            config.index
        );
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fatal(format!("cannot start the runtime: {e}")),
    };
    let code = LocalSet::new().block_on(&runtime, run(config));
    runtime.shutdown_background();
    code
}

fn send(report: &DeviceReport) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(report) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn fatal(message: String) -> ExitCode {
    send(&DeviceReport::Fatal { message });
    ExitCode::from(2)
}

/// The device side of a worker: the shared TLS context and WebSocket settings.
pub fn device_context(cfg: &DeviceWorkerConfig) -> anyhow::Result<FleetContext> {
    crate::mgmt::context(
        &cfg.url,
        cfg.addr,
        &cfg.tls,
        None,
        cfg.read_buffer,
        Duration::from_millis(cfg.handshake_timeout_ms),
        cfg.sources.clone(),
    )
}

async fn run(config: DeviceWorkerConfig) -> ExitCode {
    let started_cpu = crate::sys::own_cpu_secs();
    let ctx = match device_context(&config) {
        Ok(mut c) => {
            if config.lean {
                crate::lean::enable(&mut c);
            }
            Rc::new(c)
        }
        Err(e) => return fatal(format!("{e:#}")),
    };
    let creds = match load(&config) {
        Ok(c) => c,
        Err(e) => return fatal(format!("{e:#}")),
    };
    let (tx, mut commands) = mpsc::unbounded_channel();
    tokio::task::spawn_local(read_commands(tx));
    send(&DeviceReport::Ready);
    let deadline = Instant::now() + Duration::from_secs(config.max_runtime_secs);
    tokio::select! {
        c = commands.recv() => if c != Some(DeviceCommand::Go) {
            return ExitCode::SUCCESS;
        },
        _ = sleep_until(deadline) => return ExitCode::SUCCESS,
    }
    let (stop_tx, stop) = watch::channel(false);
    let stats = Rc::new(RefCell::new(DeviceStats::default()));
    let settings = Rc::new(Settings {
        window: config.window,
        read_rate: config.read_rate,
        read_buffer: config.read_buffer,
    });
    let gate = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let (done_tx, mut done) = mpsc::unbounded_channel::<(u64, Option<String>)>();
    let mut tasks = JoinSet::new();
    let go = Instant::now();
    let lean = config.lean;
    for (i, (unit, key)) in creds.into_iter().enumerate() {
        let number = config.first_device + i as u64;
        let source = crate::sources::source_for(&config.sources, number);
        let device = Device {
            ctx: ctx.clone(),
            tls: ctx.with_credential(key),
            source,
            unit,
            stop: stop.clone(),
            stats: stats.clone(),
            settings: settings.clone(),
        };
        let gate = gate.clone();
        let done_tx = done_tx.clone();
        tasks.spawn_local(async move {
            let permit = gate.acquire_owned().await.expect("never closed");
            let conn = device.connect(lean).await;
            drop(permit);
            match conn {
                Ok(conn) => {
                    let _ = done_tx.send((number, None));
                    match conn {
                        Conn::Ws(ws) => device.serve(*ws).await,
                        Conn::Lean(lean) => device.serve_lean(lean).await,
                    }
                }
                Err(why) => {
                    let _ = done_tx.send((number, Some(why)));
                }
            }
        });
    }
    drop(done_tx);
    let (mut connected, mut failed, mut samples) = (0u64, Vec::new(), BTreeMap::new());
    let mut stop_early = false;
    while connected + (failed.len() as u64) < config.devices {
        tokio::select! {
            d = done.recv() => match d {
                Some((_, None)) => connected += 1,
                Some((n, Some(why))) => {
                    failed.push(n);
                    let key = why.split_whitespace().take(4).collect::<Vec<_>>().join(" ");
                    samples.entry(key).or_insert(why);
                }
                None => break,
            },
            c = commands.recv() => if matches!(c, Some(DeviceCommand::Stop) | None) {
                stop_early = true;
                break;
            },
            _ = sleep_until(deadline) => { stop_early = true; break; }
        }
    }
    if !stop_early {
        send(&DeviceReport::Connected {
            connected,
            failed,
            secs: go.elapsed().as_secs_f64(),
            samples,
        });
        loop {
            tokio::select! {
                c = commands.recv() => if matches!(c, Some(DeviceCommand::Stop) | None) { break },
                _ = sleep_until(deadline) => break,
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let mut result = stats.borrow().clone();
    result.cpu_secs = crate::sys::own_cpu_secs() - started_cpu;
    result.rss_bytes = crate::sys::own_rss_bytes().unwrap_or(0);
    send(&DeviceReport::Finished(result));
    ExitCode::SUCCESS
}

fn load(config: &DeviceWorkerConfig) -> anyhow::Result<Vec<(String, Arc<CertifiedKey>)>> {
    let list = crate::creds::read_slice(&config.creds, config.first_device, config.devices)?;
    let mut out = Vec::with_capacity(list.len());
    for cred in list {
        let (chain, key) = cred.decode()?;
        out.push((cred.unit_id, crate::tls::certified_key(chain, &key)?));
    }
    Ok(out)
}

async fn read_commands(tx: mpsc::UnboundedSender<DeviceCommand>) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(c) = DeviceCommand::parse(&line)
            && tx.send(c).is_err()
        {
            return;
        }
    }
    let _ = tx.send(DeviceCommand::Stop);
}

struct Settings {
    window: u32,
    read_rate: Option<f64>,
    read_buffer: usize,
}

/// A device's session: on tokio-tungstenite or on the lean wire.
enum Conn {
    Ws(Box<Ws>),
    Lean(Box<LeanConn>),
}

struct Device {
    ctx: Rc<FleetContext>,
    tls: Arc<rustls::ClientConfig>,
    source: Option<std::net::IpAddr>,
    unit: String,
    stop: watch::Receiver<bool>,
    stats: Rc<RefCell<DeviceStats>>,
    settings: Rc<Settings>,
}

/// One stream management opened to this device.
struct Incoming {
    route: u64,
    received: u64,
    /// Consumed since the last `credit`.
    uncredited: u64,
}

impl Device {
    async fn connect(&self, lean: bool) -> Result<Conn, String> {
        let mut last = String::new();
        for attempt in 0..CONNECT_ATTEMPTS {
            if attempt > 0 {
                sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
            let deadline = Instant::now() + self.ctx.handshake_timeout;
            let result = async {
                if lean {
                    let (conn, hello) = LeanConn::connect(
                        &self.ctx,
                        self.source,
                        self.tls.clone(),
                        self.settings.read_buffer,
                        deadline,
                    )
                    .await?;
                    let unit = fleet::hello_in(hello, "session")?;
                    return Ok::<_, Failure>((Conn::Lean(Box::new(conn)), unit));
                }
                let mut ws =
                    fleet::open(&self.ctx, self.source, self.tls.clone(), deadline).await?;
                let unit = fleet::expect_hello(&mut ws, deadline, "session").await?;
                Ok((Conn::Ws(Box::new(ws)), unit))
            }
            .await;
            match result {
                Ok((conn, unit)) if unit.as_deref() == Some(self.unit.as_str()) => return Ok(conn),
                Ok((_, unit)) => {
                    return Err(format!(
                        "session hello for unit {unit:?}, expected {}",
                        self.unit
                    ));
                }
                Err(Failure::Refused {
                    reason, message, ..
                }) => {
                    last = format!("refused {reason}: {message}");
                    if crate::messages::is_terminal_session_refusal(&reason) {
                        break;
                    }
                }
                Err(Failure::Error { kind, message }) => last = format!("{kind:?}: {message}"),
            }
        }
        Err(last)
    }

    /// Answers requests and consumes streams until `stop` or the session ends.
    async fn serve(mut self, mut ws: Ws) {
        let mut streams: HashMap<u32, Incoming> = HashMap::new();
        let mut next_read = Instant::now();
        let mut stop = self.stop.clone();
        loop {
            let frame = tokio::select! {
                f = ws.next() => f,
                _ = stop.wait_for(|s| *s) => {
                    let _ = timeout(Duration::from_secs(2), fleet::close(&mut ws)).await;
                    return;
                }
            };
            let msg = match frame {
                Some(Ok(WsMessage::Binary(b))) => b,
                Some(Ok(WsMessage::Close(f))) => {
                    let why = f.map_or("no status".to_owned(), |f| {
                        format!("{} {}", u16::from(f.code), f.reason)
                    });
                    self.lost(format!("the gateway closed the session ({why})"));
                    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                    return;
                }
                Some(Ok(WsMessage::Text(t))) => {
                    self.lost(format!("text message: {}", t.as_str()));
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return self.lost(format!("session lost: {e}")),
                None => return self.lost("the gateway closed the connection".to_owned()),
            };
            let Some(e) = Envelope::parse(&msg) else {
                self.stats.borrow_mut().unexpected += 1;
                continue;
            };
            if e.kind == envelope::DATA
                && let Some(rate) = self.settings.read_rate
            {
                // A slow device: it takes n / rate seconds to consume this, and reads
                // nothing from its socket meanwhile.
                next_read = next_read.max(Instant::now())
                    + Duration::from_secs_f64(e.body.len() as f64 / rate);
                sleep_until(next_read).await;
            }
            let reply = self.on_envelope(&mut streams, &e, e.body.len() as u64);
            if let Some(reply) = reply
                && let Err(e) = ws.send(WsMessage::Binary(Bytes::from(reply))).await
            {
                return self.lost(format!("send failed: {e}"));
            }
        }
    }

    /// The answer to one envelope from the gateway, if any (`body_len`: the length of its
    /// body, which the lean wire does not keep for data).
    fn on_envelope(
        &self,
        streams: &mut HashMap<u32, Incoming>,
        e: &Envelope<'_>,
        body_len: u64,
    ) -> Option<Vec<u8>> {
        match e.kind {
            envelope::REQUEST => {
                self.stats.borrow_mut().requests += 1;
                Some(pong(e.channel, e.route))
            }
            envelope::OPEN => {
                streams.insert(
                    e.channel,
                    Incoming {
                        route: e.route,
                        received: 0,
                        uncredited: 0,
                    },
                );
                self.stats.borrow_mut().streams_accepted += 1;
                let body = format!(r#"{{"window":{}}}"#, self.settings.window);
                Some(envelope::encode(
                    envelope::ACCEPT,
                    e.channel,
                    e.route,
                    "",
                    body.as_bytes(),
                ))
            }
            envelope::DATA => {
                let n = body_len;
                self.stats.borrow_mut().stream_bytes += n;
                match streams.get_mut(&e.channel) {
                    Some(s) => {
                        s.received += n;
                        s.uncredited += n;
                        (s.uncredited >= u64::from(self.settings.window / 2)).then(|| {
                            let grant = s.uncredited as u32;
                            s.uncredited = 0;
                            self.stats.borrow_mut().credits += 1;
                            envelope::encode(
                                envelope::CREDIT,
                                e.channel,
                                s.route,
                                "",
                                &grant.to_be_bytes(),
                            )
                        })
                    }
                    None => {
                        self.stats.borrow_mut().unexpected += 1;
                        None
                    }
                }
            }
            envelope::CLOSE => match streams.remove(&e.channel) {
                Some(s) => {
                    self.stats.borrow_mut().streams_closed += 1;
                    let body = format!(r#"{{"ok":true,"size":{}}}"#, s.received);
                    Some(envelope::encode(
                        envelope::CLOSE,
                        e.channel,
                        s.route,
                        "",
                        body.as_bytes(),
                    ))
                }
                None => None,
            },
            envelope::RESET => {
                if streams.remove(&e.channel).is_some() {
                    self.stats.borrow_mut().streams_reset += 1;
                }
                None
            }
            envelope::CREDIT => None,
            envelope::EVENT if e.body == br#"{"event":"management_down"}"# => {
                // The management connection behind `route` closed (protocol §6.5): its
                // streams end here, unanswered.
                streams.retain(|_, s| s.route != e.route);
                self.stats.borrow_mut().management_down += 1;
                None
            }
            _ => {
                self.stats.borrow_mut().unexpected += 1;
                None
            }
        }
    }

    /// [`Self::serve`] on the lean wire.
    async fn serve_lean(mut self, mut conn: Box<LeanConn>) {
        let mut streams: HashMap<u32, Incoming> = HashMap::new();
        let mut next_read = Instant::now();
        let mut stop = self.stop.clone();
        loop {
            loop {
                let (kind, channel, route, body, body_len) = match conn.next_event() {
                    Err(e) => return self.lost(format!("session lost: {e:#}")),
                    Ok(None) => break,
                    Ok(Some(Event::Closed(code))) => {
                        self.lost(format!("the gateway closed the session ({code:?})"));
                        conn.close(Duration::from_secs(1)).await;
                        return;
                    }
                    Ok(Some(Event::Text(t))) => {
                        let t = String::from_utf8_lossy(t).into_owned();
                        self.lost(format!("text message: {t}"));
                        continue;
                    }
                    Ok(Some(Event::Binary { head, len })) => match Envelope::parse(head) {
                        Some(e) => {
                            let header = (envelope::FIXED_HEADER + e.unit.len()) as u64;
                            // A data envelope's body is not kept: only its length.
                            let body = if e.kind == envelope::DATA {
                                Vec::new()
                            } else {
                                e.body.to_vec()
                            };
                            (e.kind, e.channel, e.route, body, len - header)
                        }
                        None => {
                            self.stats.borrow_mut().unexpected += 1;
                            continue;
                        }
                    },
                };
                if kind == envelope::DATA
                    && let Some(rate) = self.settings.read_rate
                {
                    next_read = next_read.max(Instant::now())
                        + Duration::from_secs_f64(body_len as f64 / rate);
                    sleep_until(next_read).await;
                }
                let e = Envelope {
                    kind,
                    channel,
                    route,
                    unit: "",
                    body: &body,
                };
                if let Some(reply) = self.on_envelope(&mut streams, &e, body_len)
                    && let Err(e) = conn.send_frame(2, &reply)
                {
                    return self.lost(format!("send failed: {e:#}"));
                }
            }
            if let Err(e) = conn.flush().await {
                return self.lost(format!("send failed: {e}"));
            }
            tokio::select! {
                r = conn.readable() => if let Err(e) = r {
                    return self.lost(format!("session lost: {e}"));
                },
                _ = stop.wait_for(|s| *s) => {
                    conn.close(Duration::from_secs(2)).await;
                    return;
                }
            }
            match conn.try_read() {
                Ok(0) => return self.lost("the gateway closed the connection".to_owned()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return self.lost(format!("session lost: {e}")),
            }
        }
    }

    fn lost(&mut self, why: String) {
        if *self.stop.borrow() {
            return;
        }
        let mut s = self.stats.borrow_mut();
        s.lost += 1;
        if s.lost_sample.is_none() {
            s.lost_sample = Some(format!("{}: {why}", self.unit));
        }
    }
}

/// The answer to a `ping`: §6.4's result, echoing channel and route (§6.3).
pub fn pong(channel: u32, route: u64) -> Vec<u8> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let body = format!(r#"{{"ok":true,"result":{{"pong":true,"time":{secs}}}}}"#);
    envelope::encode(envelope::RESPONSE, channel, route, "", body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pong_echoes_channel_and_route() {
        let msg = pong(42, 0x0102_0304_0506_0708);
        let e = Envelope::parse(&msg).unwrap();
        assert_eq!(
            (e.kind, e.channel, e.route, e.unit),
            (envelope::RESPONSE, 42, 0x0102_0304_0506_0708, "")
        );
        assert_eq!(envelope::error_code(e.body), None);
    }
}
