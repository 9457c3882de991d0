//! What `relay` and `stream` share on the parent side: the arguments, the management
//! connection (`/usg/management` with a management client certificate, `docs/protocol.md`
//! §6.1) and the pool of device worker processes ([`crate::relay_worker`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command as Process};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::fleet::{self, Failure, FleetContext, Ws};
use crate::plan::{DEVICES_PER_WORKER, parse_secs, split};
use crate::relay_wire::{DeviceCommand, DeviceReport, DeviceStats, DeviceWorkerConfig};
use crate::sources::SourceSpec;
use crate::target::Target;
use crate::tls::{TlsVersions, Trust};
use crate::wire::TlsSettings;

/// Arguments `relay` and `stream` share.
#[derive(Debug, Clone, Args)]
pub struct RelayCommon {
    /// The gateway: wss://HOST:PORT (the paths /usg/endpoint and /usg/management are added)
    #[arg(long)]
    pub url: String,
    /// PEM root certificate(s) to trust (fleetgate: DATA_DIR/root.pem)
    #[arg(long)]
    pub ca: PathBuf,
    /// Device credentials, written by `loadtest register --creds-out`
    #[arg(long)]
    pub creds: PathBuf,
    /// Management certificate (PEM), from `fleetgate mgmt add NAME --out DIR`: DIR/NAME.pem
    #[arg(long)]
    pub mgmt_cert: PathBuf,
    /// Its private key: DIR/NAME.key
    #[arg(long)]
    pub mgmt_key: PathBuf,
    /// Management connections (requests / streams are dealt over them round-robin)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub mgmt_conns: u64,
    /// TLS server name to send and check (default: the URL host)
    #[arg(long)]
    pub sni: Option<String>,
    /// TLS versions to offer
    #[arg(long, value_enum, default_value_t = TlsVersions::Any)]
    pub tls: TlsVersions,
    /// Device worker processes (default: one per 18,000 devices)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub workers: Option<u64>,
    /// Device source addresses: a count (127.0.0.2, …), A-B, A,B or `none` (default: one
    /// loopback address per 5,000 devices for loopback targets)
    #[arg(long)]
    pub sources: Option<SourceSpec>,
    /// Device connections in progress at once, all workers together
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: u64,
    /// Seconds for connect + TLS + upgrade + hello, per attempt
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub handshake_timeout: f64,
    /// PID of the gateway: its CPU time (/proc/PID/stat) and memory (VmRSS)
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Also write the JSON summary here
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `wss://HOST:PORT[/anything]` → (device URL, management URL).
pub fn endpoint_urls(url: &str) -> Result<(Target, String, String)> {
    let target = Target::parse(url)?;
    if !target.secure {
        bail!("{url} is plain ws://: device sessions and management need wss://");
    }
    let authority = if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    };
    Ok((
        target,
        format!("wss://{authority}/usg/endpoint"),
        format!("wss://{authority}/usg/management"),
    ))
}

/// A connection context: `credential` is presented as the TLS client certificate (devices
/// get theirs per connection with [`FleetContext::with_credential`]).
pub fn context(
    url: &str,
    addr: SocketAddr,
    tls: &TlsSettings,
    credential: Option<Arc<rustls::sign::CertifiedKey>>,
    read_buffer: usize,
    handshake_timeout: Duration,
    sources: Vec<IpAddr>,
) -> Result<FleetContext> {
    let verifier = crate::tls::server_verifier(&tls.trust)?;
    let config = Arc::new(crate::tls::device_client_config(
        verifier,
        tls.versions,
        credential,
    )?);
    let server_name = ServerName::try_from(tls.server_name.clone())
        .with_context(|| format!("'{}' is not a valid TLS server name", tls.server_name))?;
    let path = Target::parse(url)?.path;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX);
    Ok(FleetContext {
        addr,
        url: url.to_owned(),
        path,
        anonymous: config,
        server_name,
        ws_config,
        handshake_timeout,
        close_timeout: Duration::from_secs(5),
        sources,
    })
}

/// The resolved setup of a run.
pub struct Setup {
    pub addr: SocketAddr,
    pub device_url: String,
    pub mgmt_url: String,
    pub tls: TlsSettings,
    pub sources: Vec<IpAddr>,
}

pub fn setup(c: &RelayCommon, devices: u64) -> Result<Setup> {
    let (target, device_url, mgmt_url) = endpoint_urls(&c.url)?;
    let addr = target.resolve()?;
    let sources = c
        .sources
        .clone()
        .unwrap_or_else(|| SourceSpec::default_for(addr.ip(), devices))
        .addresses();
    crate::sources::check(
        &sources,
        addr.ip(),
        devices,
        crate::sys::ephemeral_port_count(),
    )?;
    Ok(Setup {
        addr,
        device_url,
        mgmt_url,
        tls: TlsSettings {
            trust: Trust::Ca(c.ca.clone()),
            versions: c.tls,
            server_name: c.sni.clone().unwrap_or(target.host),
        },
        sources,
    })
}

/// Loads the management certificate and key.
pub fn mgmt_credential(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;
    crate::tls::certified_key(chain, &key)
}

/// A management connection: TLS with the management certificate, upgrade on
/// `/usg/management`, the management `hello`.
pub async fn connect_management(ctx: &FleetContext) -> Result<Ws> {
    let deadline = Instant::now() + ctx.handshake_timeout;
    let what = |f| mgmt_error(ctx, f);
    let mut ws = fleet::open(ctx, None, ctx.anonymous.clone(), deadline)
        .await
        .map_err(what)?;
    fleet::expect_hello(&mut ws, deadline, "management")
        .await
        .map_err(what)?;
    Ok(ws)
}

/// [`connect_management`] on the lean wire (`lean.rs`; `ctx` passed through
/// [`crate::lean::enable`]).
pub async fn connect_management_lean(ctx: &FleetContext) -> Result<crate::lean::LeanConn> {
    let deadline = Instant::now() + ctx.handshake_timeout;
    let what = |f| mgmt_error(ctx, f);
    let (conn, hello) =
        crate::lean::LeanConn::connect(ctx, None, ctx.anonymous.clone(), 256 * 1024, deadline)
            .await
            .map_err(what)?;
    fleet::hello_in(hello, "management").map_err(what)?;
    Ok(conn)
}

fn mgmt_error(ctx: &FleetContext, f: Failure) -> anyhow::Error {
    match f {
        Failure::Error { kind, message } => {
            anyhow::anyhow!("management connection to {}: {kind:?}: {message}", ctx.url)
        }
        Failure::Refused {
            reason, message, ..
        } => anyhow::anyhow!("management connection refused: {reason}: {message}"),
    }
}

/// The WebSocket settings of a management connection: large buffers (it carries the load of
/// every device).
pub fn mgmt_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(256 * 1024)
        .write_buffer_size(256 * 1024)
        .max_write_buffer_size(usize::MAX)
}

struct PoolWorker {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
}

/// The device worker processes.
pub struct DevicePool {
    workers: Vec<PoolWorker>,
    events: mpsc::UnboundedReceiver<(usize, Option<DeviceReport>)>,
    pub connected: u64,
    pub failed: Vec<u64>,
    pub connect_secs: f64,
    pub samples: BTreeMap<String, String>,
    pub stats: DeviceStats,
}

/// How the device side of a run is set up.
pub struct DevicePlan {
    pub devices: u64,
    pub workers: u64,
    pub read_buffer: usize,
    pub window: u32,
    pub read_rate: Option<f64>,
    pub max_runtime_secs: u64,
    /// The lean wire (`lean.rs`) instead of tokio-tungstenite.
    pub lean: bool,
}

impl DevicePool {
    /// Starts the workers and waits until each has loaded its credentials.
    pub async fn start(c: &RelayCommon, s: &Setup, p: &DevicePlan) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find this program to start workers")?;
        let fd_limit = crate::sys::fd_hard_limit();
        let shares = split(p.devices, p.workers.clamp(1, p.devices.max(1)));
        if let Some(&(_, largest)) = shares.iter().max_by_key(|s| s.1)
            && largest + 64 > fd_limit
        {
            bail!(
                "a worker would hold {largest} connections but may open only {fd_limit} files \
                 (ulimit -Hn): use more --workers"
            );
        }
        let (tx, events) = mpsc::unbounded_channel();
        let mut workers = Vec::new();
        for (index, &(first_device, devices)) in shares.iter().enumerate() {
            let config = DeviceWorkerConfig {
                index,
                url: s.device_url.clone(),
                addr: s.addr,
                tls: s.tls.clone(),
                creds: std::fs::canonicalize(&c.creds)?,
                first_device,
                devices,
                sources: s.sources.clone(),
                concurrency: c.concurrency.div_ceil(shares.len() as u64).max(1) as usize,
                handshake_timeout_ms: (c.handshake_timeout * 1000.0).round() as u64,
                read_buffer: p.read_buffer,
                window: p.window,
                read_rate: p.read_rate,
                max_runtime_secs: p.max_runtime_secs,
                lean: p.lean,
            };
            let mut child = Process::new(&exe)
                .arg("__relay-worker")
                .arg(serde_json::to_string(&config)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start device worker {index}"))?;
            let pid = child.id().unwrap_or(0);
            let stdout = child.stdout.take().expect("piped");
            let stdin = child.stdin.take();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<DeviceReport>(&line) {
                        Ok(r) => {
                            let _ = tx.send((index, Some(r)));
                        }
                        Err(_) => eprintln!("device worker {index}: {line}"),
                    }
                }
                let _ = tx.send((index, None));
            });
            workers.push(PoolWorker { child, pid, stdin });
        }
        let mut pool = Self {
            workers,
            events,
            connected: 0,
            failed: Vec::new(),
            connect_secs: 0.0,
            samples: BTreeMap::new(),
            stats: DeviceStats::default(),
        };
        let mut ready = 0;
        let deadline = Instant::now() + Duration::from_secs(300);
        while ready < pool.workers.len() {
            match pool.next(deadline).await? {
                (_, DeviceReport::Ready) => ready += 1,
                (i, other) => bail!("device worker {i}: unexpected {other:?}"),
            }
        }
        Ok(pool)
    }

    async fn next(&mut self, deadline: Instant) -> Result<(usize, DeviceReport)> {
        let event = tokio::time::timeout_at(deadline, self.events.recv())
            .await
            .context("the device workers did not report in time")?;
        match event {
            Some((i, Some(DeviceReport::Fatal { message }))) => {
                bail!("device worker {i}: {message}")
            }
            Some((i, Some(r))) => Ok((i, r)),
            Some((i, None)) => bail!("device worker {i} exited early"),
            None => bail!("the device workers are gone"),
        }
    }

    async fn broadcast(&mut self, c: DeviceCommand) {
        for w in &mut self.workers {
            if let Some(stdin) = &mut w.stdin {
                let _ = stdin.write_all(c.as_line().as_bytes()).await;
                let _ = stdin.flush().await;
            }
        }
    }

    /// Connects every device; returns when all have their session or gave up.
    pub async fn connect_all(&mut self, limit: Duration) -> Result<()> {
        self.broadcast(DeviceCommand::Go).await;
        let deadline = Instant::now() + limit;
        let mut done = 0;
        while done < self.workers.len() {
            match self.next(deadline).await? {
                (
                    _,
                    DeviceReport::Connected {
                        connected,
                        failed,
                        secs,
                        samples,
                    },
                ) => {
                    done += 1;
                    self.connected += connected;
                    self.failed.extend(failed);
                    self.connect_secs = self.connect_secs.max(secs);
                    for (k, v) in samples {
                        self.samples.entry(k).or_insert(v);
                    }
                }
                (i, other) => bail!("device worker {i}: unexpected {other:?}"),
            }
        }
        Ok(())
    }

    /// The workers' CPU seconds so far (from /proc).
    pub fn cpu_secs(&self) -> f64 {
        self.workers
            .iter()
            .filter_map(|w| crate::sys::cpu_secs(w.pid))
            .sum()
    }

    /// Stops the devices and collects their figures.
    pub async fn stop(&mut self) -> Result<()> {
        self.broadcast(DeviceCommand::Stop).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut finished = vec![false; self.workers.len()];
        while finished.iter().any(|f| !f) {
            let event = tokio::time::timeout_at(deadline, self.events.recv()).await;
            match event {
                Ok(Some((i, Some(DeviceReport::Finished(s))))) => {
                    finished[i] = true;
                    self.stats.merge(&s);
                }
                Ok(Some((i, None))) if finished[i] => {}
                Ok(Some((_, Some(_)))) => {}
                other => {
                    for w in &mut self.workers {
                        let _ = w.child.start_kill();
                    }
                    bail!(
                        "device workers did not all report their figures ({})",
                        match other {
                            Ok(Some((i, _))) => format!("worker {i} exited early"),
                            Ok(None) => "all gone".to_owned(),
                            Err(_) => "timeout".to_owned(),
                        }
                    );
                }
            }
        }
        for w in &mut self.workers {
            let _ = tokio::time::timeout(Duration::from_secs(5), w.child.wait()).await;
        }
        Ok(())
    }
}

/// Default device workers: one per 18,000 devices.
pub fn default_workers(devices: u64) -> u64 {
    devices.div_ceil(DEVICES_PER_WORKER).max(1)
}

/// The gateway's CPU seconds and RSS now (`None` without `--gateway-pid`).
pub fn gateway_sample(pid: Option<u32>) -> (Option<f64>, Option<u64>) {
    match pid {
        Some(pid) => (crate::sys::cpu_secs(pid), crate::sys::rss_bytes(pid)),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_from_a_base() {
        let (t, d, m) = endpoint_urls("wss://127.0.0.1:28443").unwrap();
        assert_eq!(t.port, 28443);
        assert_eq!(d, "wss://127.0.0.1:28443/usg/endpoint");
        assert_eq!(m, "wss://127.0.0.1:28443/usg/management");
        let (_, d, _) = endpoint_urls("wss://gw.example/usg/endpoint").unwrap();
        assert_eq!(d, "wss://gw.example:443/usg/endpoint");
        assert!(endpoint_urls("ws://127.0.0.1:1").is_err());
    }
}
