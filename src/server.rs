//! Starting and stopping the gateway: data dir and certificates on first start, one listener
//! and one thread per shard, and the control loop (signals, status recomputation, keystore
//! hot-swap) on the calling thread.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rustls::ServerConfig;

use crate::config::{Config, DriverKind};
use crate::control::Job;
use crate::control::registrar::{Registrar, ShardLink};
use crate::driver::epoll::EpollDriver;
use crate::driver::probe::{self, Chosen};
use crate::driver::uring::UringDriver;
use crate::driver::{Driver, DriverConfig, Waker};
use crate::metrics::{self, ShardStats};
use crate::pki::{self, Keystore};
use crate::shard::conn::Settings;
use crate::shard::{Command, RelayLimits, Shard, ShardInit, Shared};
use crate::status::{self, Health, StatusCell};

/// Errors starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data dir, keystore or root certificate could not be set up.
    #[error("certificates in {dir}")]
    Pki {
        /// The data dir.
        dir: PathBuf,
        /// The cause.
        source: pki::PkiError,
    },
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The listening socket could not be set up.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// `--driver uring` was asked for but io_uring is unusable here.
    #[error("io_uring is not usable here ({0}); use --driver epoll or auto")]
    Uring(String),
    /// The admin socket could not be set up (or another gateway uses the data dir).
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// The device registry could not be opened.
    #[error("device registry")]
    Registry(#[from] crate::registry::RegistryError),
    /// A shard failed to start.
    #[error("shard {shard} failed to start: {message}")]
    Shard {
        /// Which shard.
        shard: usize,
        /// Why.
        message: String,
    },
}

struct ShardHandle {
    tx: Sender<Command>,
    waker: Waker,
    thread: JoinHandle<()>,
}

/// A started gateway.
pub struct Running {
    /// The address the listeners are bound to (the real port when 0 was asked for).
    pub local_addr: SocketAddr,
    /// The backend in use: "uring" or "epoll".
    pub driver: &'static str,
    /// Where the keystore lives.
    pub keystore_path: PathBuf,
    shards: Vec<ShardHandle>,
    shared: Shared,
    config: Config,
    started: Instant,
    keystore_stamp: Mutex<Option<(SystemTime, u64)>>,
    /// The keystore being served, re-checked at every status recomputation (a certificate
    /// that expires while the gateway runs turns the status to `err`).
    active_keystore: Mutex<Keystore>,
    /// The admin socket (`DATA_DIR/admin.sock`), served by the control loop.
    admin: Option<std::os::unix::net::UnixListener>,
    data_dir: PathBuf,
    /// The device CA certificate: the client-certificate trust anchor of every TLS config.
    device_ca: rustls_pki_types::CertificateDer<'static>,
    /// The management CA certificate (the other client-certificate anchor).
    mgmt_ca: rustls_pki_types::CertificateDer<'static>,
    /// The session-ticket keys (kept across keystore reloads and restarts).
    tickets: Arc<dyn rustls::server::ProducesTickets>,
    /// The registrar's inbox (admin requests) and its thread.
    jobs: Sender<Job>,
    registrar: Option<JoinHandle<()>>,
    /// What SIGHUP re-reads besides the keystore ([`Running::set_config_source`]).
    config_source: Option<ConfigSource>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("local_addr", &self.local_addr)
            .field("driver", &self.driver)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// The names the first-start server certificate is made for.
pub fn default_hosts() -> Vec<String> {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let h = crate::sys::hostname();
    if !h.is_empty() && !hosts.contains(&h) {
        hosts.push(h);
    }
    hosts
}

/// The public gateway addresses for key hand-outs: `[handout] gateways` from the config, or
/// this host's name and the listening port when none are configured.
pub fn handout_gateways(config: &Config) -> crate::export::HandoutConfig {
    if !config.handout.gateways.is_empty() {
        return config.handout.clone();
    }
    let host = crate::sys::hostname();
    crate::export::HandoutConfig {
        gateways: vec![crate::export::PublicGateway {
            host: if host.is_empty() {
                "localhost".into()
            } else {
                host
            },
            port: config.server.listen.port(),
        }],
    }
}

/// Creates the data dir, certificates and listeners, and starts the shards.
pub fn start(config: Config) -> Result<Running, StartError> {
    let t0 = Instant::now();
    let data_dir = config.server.data_dir.clone();
    let boot = pki::bootstrap(&data_dir, &default_hosts()).map_err(|source| StartError::Pki {
        dir: data_dir.clone(),
        source,
    })?;
    if boot.created {
        tracing::info!(
            "created data dir {}: root CA, server certificate for {}; root certificate at {}",
            data_dir.display(),
            default_hosts().join(", "),
            boot.root_pem_path.display()
        );
    }
    tracing::info!(
        "root certificate fingerprint (SHA-256): {}",
        boot.fingerprint
    );
    let keystore = Keystore::load(&boot.keystore_path).map_err(|source| StartError::Pki {
        dir: data_dir.clone(),
        source,
    })?;
    tracing::debug!("keystore loaded after {:?}", t0.elapsed());
    let device_ca = pki::device::ensure_device_ca(&data_dir).map_err(|source| StartError::Pki {
        dir: data_dir.clone(),
        source,
    })?;
    if device_ca.created() {
        tracing::info!(
            "created the device CA (issues device credentials) in {}",
            pki::device::device_ca_dir(&data_dir).display()
        );
    }
    let registry = crate::registry::Registry::open(
        &data_dir.join(crate::registry::FILE_NAME),
        &crate::registry::OpenOptions {
            actor: "gateway".into(),
            ..Default::default()
        },
    )?;
    let revocations = Arc::new(crate::control::registrar::load_revocations(&registry)?);
    tracing::debug!(
        revoked = revocations.len(),
        "registry opened after {:?}",
        t0.elapsed()
    );
    let mgmt_ca = pki::device::ensure_mgmt_ca(&data_dir).map_err(|source| StartError::Pki {
        dir: data_dir.clone(),
        source,
    })?;
    let device_ca_der = device_ca.cert_der().clone();
    let mgmt_ca_der = mgmt_ca.cert_der().clone();
    let tickets: Arc<dyn rustls::server::ProducesTickets> =
        crate::tls::PersistentTicketer::load_or_create(&data_dir.join("pki").join("tickets.key"))?;
    let tls_config = crate::tls::server_config(
        &keystore,
        &config.tls,
        &[&device_ca_der, &mgmt_ca_der],
        Some(tickets.clone()),
    )?;
    tracing::debug!("TLS configuration ready after {:?}", t0.elapsed());
    tracing::debug!("certificate chain checked after {:?}", t0.elapsed());

    let nofile = crate::sys::raise_nofile_limit().unwrap_or(1024);
    let chosen = match probe::choose(config.server.driver) {
        Ok(c) => c,
        Err(why) => return Err(StartError::Uring(why)),
    };
    if let Chosen::Epoll(Some(why)) = &chosen {
        tracing::warn!("io_uring unavailable ({why}); using epoll");
    }
    tracing::debug!("driver chosen after {:?}", t0.elapsed());
    let admin = crate::admin::bind(&data_dir)?;
    let n = config.shard_count();
    let listeners = bind_listeners(config.server.listen, n)?;
    let local_addr = listeners[0]
        .local_addr()
        .map_err(|source| StartError::Listen {
            addr: config.server.listen,
            source,
        })?;

    let stats: Arc<[ShardStats]> = (0..n).map(|_| ShardStats::default()).collect();
    let onboarding = Arc::new(metrics::Onboarding::default());
    onboarding
        .max_devices
        .store(config.limits.max_devices, Ordering::Relaxed);
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let shared = Shared {
        stats,
        status: Arc::new(StatusCell::default()),
        onboarding,
        jobs: jobs_tx.clone(),
    };
    let max_handshaking = config.limits.max_pending_handshakes;
    let relay_limits = RelayLimits {
        max_control_queue: config.relay.max_control_queue,
        max_bulk_queue: config.relay.max_bulk_queue,
        memory_budget: config.relay.memory_budget,
        max_held_buffers: config.limits.recv_buffers_per_shard / 2,
        spread_management: config.relay.spread_management,
    };
    let client_cas =
        crate::shard::conn::ClientCas::new(device_ca.cert_der(), Some(mgmt_ca.cert_der()));
    let mut mesh_senders = Vec::with_capacity(n);
    let settings = Settings::from_config(&config);
    let max_conns = match chosen {
        // A ring's fixed file table cannot exceed RLIMIT_NOFILE, and its top slots are kept
        // for management connections moved from other shards (`driver::uring::ADOPT_SLOTS`).
        Chosen::Uring => config.limits.max_connections_per_shard.min(
            usize::try_from(nofile)
                .unwrap_or(usize::MAX)
                .saturating_sub(crate::driver::uring::ADOPT_SLOTS as usize)
                .max(1),
        ),
        Chosen::Epoll(_) => config.limits.max_connections_per_shard,
    };
    let dcfg = DriverConfig {
        max_connections: max_conns,
        recv_buffer_size: config.limits.recv_buffer_size,
        recv_buffers: config.limits.recv_buffers_per_shard,
    };
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut shards = Vec::with_capacity(n);
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<Waker, String>)>();
    let mut txs = Vec::new();
    for (id, listener) in listeners.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        txs.push(tx);
        let shared = shared.clone();
        let settings = settings.clone();
        let tls_config = tls_config.clone();
        let ready = ready_tx.clone();
        let (mesh_tx, mesh_rx) = mpsc::sync_channel(crate::relay::MESH_CAPACITY);
        mesh_senders.push(mesh_tx);
        let init = ShardInit {
            revocations: revocations.clone(),
            max_handshaking,
            shard_count: n,
            mesh_rx,
            relay_limits,
            client_cas: client_cas.clone(),
        };
        let uring = chosen == Chosen::Uring;
        let pin = config.server.pin_threads;
        let thread = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn(move || {
                shared.stats[id]
                    .thread
                    .store(crate::sys::thread_id(), Ordering::Relaxed);
                if crate::sys::COUNT_SHARD_THREADS.load(Ordering::Relaxed) {
                    crate::sys::CountingAlloc::count_this_thread(true);
                }
                if pin {
                    if let Err(e) = crate::sys::pin_current_thread(id % ncpu) {
                        tracing::debug!(shard = id, error = %e, "cannot pin thread");
                    }
                }
                if uring {
                    match UringDriver::new(dcfg) {
                        Ok(d) => run_shard(
                            id, d, listener, max_conns, settings, tls_config, shared, rx, ready,
                            init,
                        ),
                        Err(e) => {
                            let _ = ready.send((id, Err(format!("io_uring setup: {e}"))));
                        }
                    }
                } else {
                    match EpollDriver::new(dcfg) {
                        Ok(d) => run_shard(
                            id, d, listener, max_conns, settings, tls_config, shared, rx, ready,
                            init,
                        ),
                        Err(e) => {
                            let _ = ready.send((id, Err(format!("epoll setup: {e}"))));
                        }
                    }
                }
            })
            .map_err(|e| StartError::Shard {
                shard: id,
                message: e.to_string(),
            })?;
        shards.push((thread, None));
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok((id, Ok(waker))) => shards[id].1 = Some(waker),
            Ok((id, Err(message))) => {
                return Err(StartError::Shard { shard: id, message });
            }
            Err(_) => {
                return Err(StartError::Shard {
                    shard: 0,
                    message: "a shard thread exited during start-up".into(),
                });
            }
        }
    }
    let driver = if chosen == Chosen::Uring {
        "uring"
    } else {
        "epoll"
    };
    let shards: Vec<ShardHandle> = shards
        .into_iter()
        .zip(txs)
        .map(|((thread, waker), tx)| ShardHandle {
            tx,
            waker: waker.expect("every shard reported ready"),
            thread,
        })
        .collect();
    let mesh = Arc::new(crate::relay::Mesh {
        inboxes: mesh_senders,
        wakers: shards.iter().map(|s| s.waker.clone()).collect(),
    });
    for s in &shards {
        let _ = s.tx.send(Command::Mesh(mesh.clone()));
        s.waker.wake();
    }
    let links: Vec<ShardLink> = shards
        .iter()
        .map(|s| ShardLink {
            tx: s.tx.clone(),
            waker: s.waker.clone(),
        })
        .collect();
    let registrar = Registrar::new(
        registry,
        device_ca,
        config.registration.clone(),
        links,
        revocations,
        shared.onboarding.clone(),
    );
    let mut registrar = registrar;
    registrar.status = Some(shared.status.clone());
    registrar.shard_stats = Some(shared.stats.clone());
    registrar.handout = {
        // The real port when 0 was asked for.
        let mut c = config.clone();
        c.server.listen.set_port(local_addr.port());
        handout_gateways(&c)
    };
    registrar.root_fingerprint = Some(keystore.fingerprint());
    registrar.data_dir = data_dir.clone();
    let registrar = std::thread::Builder::new()
        .name("registrar".into())
        .spawn(move || registrar.run(jobs_rx))
        .map_err(|e| StartError::Shard {
            shard: 0,
            message: format!("registrar thread: {e}"),
        })?;
    let running = Running {
        local_addr,
        driver,
        keystore_path: boot.keystore_path.clone(),
        shards,
        shared,
        config,
        started: t0,
        keystore_stamp: Mutex::new(file_stamp(&boot.keystore_path)),
        active_keystore: Mutex::new(keystore),
        admin: Some(admin),
        data_dir,
        device_ca: device_ca_der,
        mgmt_ca: mgmt_ca_der,
        tickets,
        jobs: jobs_tx,
        registrar: Some(registrar),
        config_source: None,
    };
    running.recompute_status();
    tracing::info!(
        "listening on {local_addr} with {n} shards ({driver}), started in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    Ok(running)
}

fn run_shard<D: Driver>(
    id: usize,
    mut driver: D,
    listener: std::net::TcpListener,
    max_conns: usize,
    settings: Settings,
    tls_config: Arc<ServerConfig>,
    shared: Shared,
    rx: mpsc::Receiver<Command>,
    ready: Sender<(usize, Result<Waker, String>)>,
    init: ShardInit,
) {
    if let Err(e) = driver.listen(listener) {
        let _ = ready.send((id, Err(format!("listen: {e}"))));
        return;
    }
    let _ = ready.send((id, Ok(driver.waker())));
    drop(ready);
    Shard::new(
        id, driver, max_conns, settings, tls_config, shared, rx, init,
    )
    .run();
}

/// One `SO_REUSEPORT` listener per shard on the same address (the first bind fixes the port
/// when 0 was asked for).
fn bind_listeners(addr: SocketAddr, n: usize) -> Result<Vec<std::net::TcpListener>, StartError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| StartError::Listen { addr, source };
    // SO_REUSEPORT would let us share the port silently with another process of the same user
    // (an old gateway that did not stop, say), and the kernel would then split connections
    // between the two. Bind once without it first: that fails if anyone holds the port.
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(err)?;
        probe.set_reuse_address(true).map_err(err)?;
        probe.bind(&addr.into()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                err(std::io::Error::new(
                    e.kind(),
                    "the port is already in use (another fleetgate still running?)",
                ))
            } else {
                err(e)
            }
        })?;
        drop(probe);
    }
    let mut out = Vec::with_capacity(n);
    let mut bound = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        s.set_reuse_port(true).map_err(err)?;
        // Accepted sockets inherit TCP_NODELAY on Linux: small WebSocket messages leave at once.
        s.set_tcp_nodelay(true).map_err(err)?;
        if addr.is_ipv6() {
            let _ = s.set_only_v6(false);
        }
        s.set_nonblocking(true).map_err(err)?;
        s.bind(&bound.into()).map_err(err)?;
        s.listen(4096).map_err(err)?;
        let l: std::net::TcpListener = s.into();
        if bound.port() == 0 {
            bound = l.local_addr().map_err(err)?;
        }
        out.push(l);
    }
    Ok(out)
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Running {
    /// Counters of every shard.
    pub fn stats(&self) -> &[ShardStats] {
        &self.shared.stats
    }

    /// The cached health.
    pub fn health(&self) -> Health {
        self.shared.status.get()
    }

    /// Recomputes `/usg/check-status` now (including a check of the served chain's rules and
    /// validity period at this moment).
    pub fn recompute_status(&self) {
        let violations = pki::verify(&self.active_keystore.lock().expect("not poisoned"), &[]);
        for v in &violations {
            tracing::error!("served certificate: {v}");
        }
        let h = status::compute(status::Inputs {
            started: true,
            uptime_secs: self.started.elapsed().as_secs(),
            startup_deadline_secs: self.config.status.startup_deadline_secs,
            certificate_valid: violations.is_empty(),
            management_connections: metrics::total(&self.shared.stats, |s| &s.management),
        });
        let old = self.shared.status.get();
        self.shared.status.set(h);
        if old != h {
            tracing::info!("status {} → {}", old.as_str(), h.as_str());
        }
    }

    /// Re-reads the keystore and hands the new certificate to every shard. Open connections
    /// keep their sessions; new ones use the new certificate. On error the old one stays.
    pub fn reload_keystore(&self) -> Result<(), String> {
        *self.keystore_stamp.lock().expect("not poisoned") = file_stamp(&self.keystore_path);
        let ks = Keystore::load(&self.keystore_path).map_err(|e| e.to_string())?;
        let violations = pki::verify(&ks, &[]);
        if !violations.is_empty() {
            let msg: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
            return Err(format!("new keystore refused: {}", msg.join("; ")));
        }
        let cfg = crate::tls::server_config(
            &ks,
            &self.config.tls,
            &[&self.device_ca, &self.mgmt_ca],
            Some(self.tickets.clone()),
        )
        .map_err(|e| e.to_string())?;
        for s in &self.shards {
            let _ = s.tx.send(Command::TlsConfig(cfg.clone()));
            s.waker.wake();
        }
        let fingerprint = ks.fingerprint();
        *self.active_keystore.lock().expect("not poisoned") = ks;
        self.recompute_status();
        tracing::info!(
            "installed keystore {} (root fingerprint {})",
            self.keystore_path.display(),
            fingerprint
        );
        Ok(())
    }

    /// Sets the device connection limit (0 = unlimited) for this run. Devices already
    /// connected stay; new sessions are checked against the new limit.
    pub fn set_device_limit(&self, max_devices: u64) {
        let old = self
            .shared
            .onboarding
            .max_devices
            .swap(max_devices, Ordering::Relaxed);
        tracing::info!(
            "device connection limit {} → {}",
            limit_label(old),
            limit_label(max_devices)
        );
    }

    /// Registration and session figures.
    pub fn onboarding(&self) -> &metrics::Onboarding {
        &self.shared.onboarding
    }

    /// True when the keystore file changed since it was last loaded.
    pub fn keystore_changed(&self) -> bool {
        let now = file_stamp(&self.keystore_path);
        let last = self.keystore_stamp.lock().expect("not poisoned");
        now.is_some() && now != *last
    }

    /// Answers pending admin-socket requests.
    pub fn serve_admin(&self) {
        let Some(listener) = &self.admin else { return };
        crate::admin::serve_pending(listener, |req| match req {
            crate::admin::Request::Status => {
                let stats = &self.shared.stats;
                let ob = &self.shared.onboarding;
                crate::admin::Response {
                    ok: true,
                    status: Some(self.health().as_str().into()),
                    driver: Some(self.driver.into()),
                    shards: Some(self.shards.len()),
                    connections: Some(metrics::total(stats, |s| &s.connections)),
                    devices: Some(metrics::total(stats, |s| &s.devices)),
                    management: Some(metrics::total(stats, |s| &s.management)),
                    device_sessions: Some(ob.sessions_open.load(Ordering::Relaxed)),
                    max_devices: Some(ob.max_devices.load(Ordering::Relaxed)),
                    registrations: Some(ob.granted()),
                    registrations_refused: Some(ob.registrations_refused()),
                    limit_rejections: Some(ob.limit_rejections()),
                    rss_bytes: crate::sys::rss_bytes(),
                    ..Default::default()
                }
            }
            crate::admin::Request::Refresh => {
                let _ = self.jobs.send(Job::Refresh);
                crate::admin::Response {
                    ok: true,
                    ..Default::default()
                }
            }
            crate::admin::Request::SetLimit { max_devices } => {
                self.set_device_limit(max_devices);
                crate::admin::Response {
                    ok: true,
                    max_devices: Some(max_devices),
                    ..Default::default()
                }
            }
            crate::admin::Request::Sessions => {
                let (tx, rx) = mpsc::channel();
                let _ = self.jobs.send(Job::Sessions(tx));
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(list) => crate::admin::Response {
                        ok: true,
                        sessions: Some(list),
                        ..Default::default()
                    },
                    Err(_) => crate::admin::Response::failed("the registrar did not answer"),
                }
            }
            crate::admin::Request::Reload => {
                let keystore = self.reload_keystore().map_err(|e| {
                    tracing::error!("keystore reload (admin socket) failed: {e}");
                    format!("keystore not reloaded, the gateway kept its current keystore: {e}")
                });
                match (keystore, self.reload_config()) {
                    (Ok(()), Ok(r)) => crate::admin::Response {
                        ok: true,
                        applied: Some(r.applied),
                        restart_needed: Some(r.restart_needed),
                        ..Default::default()
                    },
                    (Err(e), Ok(_)) | (Ok(()), Err(e)) => crate::admin::Response::failed(e),
                    (Err(k), Err(c)) => crate::admin::Response::failed(format!("{k}; {c}")),
                }
            }
        });
    }

    /// Stops accepting, closes WebSockets with 1001, waits for the shards (at most the drain
    /// deadline plus a little), and returns.
    pub fn shutdown(mut self) {
        if self.admin.take().is_some() {
            let _ = std::fs::remove_file(crate::admin::socket_path(&self.data_dir));
        }
        let drain = Duration::from_millis(self.config.server.drain_timeout_ms);
        for s in &self.shards {
            let _ = s.tx.send(Command::Shutdown { drain });
            s.waker.wake();
        }
        for s in std::mem::take(&mut self.shards) {
            let _ = s.thread.join();
        }
        // The shards are gone; drop the last senders so the registrar flushes and ends.
        let (dead, _) = mpsc::channel();
        self.jobs = dead.clone();
        self.shared.jobs = dead;
        if let Some(r) = self.registrar.take() {
            let _ = r.join();
        }
    }

    /// The control loop: runs until SIGTERM or SIGINT, then shuts down. SIGHUP and
    /// `fleetgate reload` (admin socket) re-read the keystore and the configuration file
    /// ([`Running::reload_config`]); a change of the keystore file (checked every
    /// `server.keystore_poll_ms`) re-reads the keystore. The status is recomputed every
    /// `status.interval_secs`.
    pub fn run_until_signalled(self) -> std::io::Result<()> {
        let term = Arc::new(AtomicBool::new(false));
        let hup = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone())?;
        signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
        let status_every = Duration::from_secs(self.config.status.interval_secs);
        let poll_every = Duration::from_millis(self.config.server.keystore_poll_ms.max(50));
        let mut next_status = Instant::now() + status_every;
        let mut next_poll = Instant::now() + poll_every;
        while !term.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            let now = Instant::now();
            let sighup = hup.swap(false, Ordering::Relaxed);
            let reload = sighup || (now >= next_poll && self.keystore_changed());
            if now >= next_poll {
                next_poll = now + poll_every;
            }
            if reload {
                if let Err(e) = self.reload_keystore() {
                    tracing::error!("keystore reload failed, keeping the current one: {e}");
                }
            }
            if sighup {
                // Errors are logged by reload_config.
                let _ = self.reload_config();
            }
            if now >= next_status {
                next_status = now + status_every;
                self.recompute_status();
            }
            self.serve_admin();
        }
        tracing::info!("shutting down");
        let t = Instant::now();
        self.shutdown();
        tracing::info!("stopped in {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }
}

/// Where the configuration came from, so SIGHUP can read it again: the file, the command-line
/// overrides, the log filter handle, and the configuration in force.
#[derive(Debug)]
struct ConfigSource {
    path: Option<PathBuf>,
    overrides: crate::config::Overrides,
    level: Option<crate::logging::LevelHandle>,
    /// The values in force: the start-up configuration with every key applied live since.
    current: Mutex<Config>,
}

/// What [`Running::reload_config`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigReload {
    /// Changed keys now in force (`limits.max_devices`, `log.level`).
    pub applied: Vec<String>,
    /// Changed keys that take effect only after a restart.
    pub restart_needed: Vec<String>,
}

impl Running {
    /// Tells the gateway which file it was started with (`None`: defaults only), the
    /// command-line overrides to re-apply on every reload, and the handle that changes the
    /// log filter. Without this, SIGHUP re-reads only the keystore.
    pub fn set_config_source(
        &mut self,
        path: Option<PathBuf>,
        overrides: crate::config::Overrides,
        level: Option<crate::logging::LevelHandle>,
    ) {
        self.config_source = Some(ConfigSource {
            path,
            overrides,
            level,
            current: Mutex::new(self.config.clone()),
        });
    }

    /// Re-reads the configuration file, re-applies the command-line overrides and validates
    /// the result. A valid file: changed keys that can change live are applied
    /// (`limits.max_devices`, as with [`Running::set_device_limit`]; `log.level`, unless
    /// `RUST_LOG` is set), every other changed key is named in one WARN as needing a restart;
    /// connections are not touched. An invalid file: logged at ERROR (key and line), nothing
    /// changes, and the message is returned.
    pub fn reload_config(&self) -> Result<ConfigReload, String> {
        let Some(src) = &self.config_source else {
            return Ok(ConfigReload::default());
        };
        let shown = src.path.as_ref().map_or_else(
            || "(no file: defaults)".to_owned(),
            |p| p.display().to_string(),
        );
        let new = match src.overrides.load(src.path.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("configuration not reloaded, keeping the current one: {e}");
                tracing::error!("{msg}");
                return Err(msg);
            }
        };
        let mut current = src.current.lock().expect("not poisoned");
        let mut out = ConfigReload::default();
        for key in current.changed_keys(&new) {
            match key.as_str() {
                "limits.max_devices" => {
                    self.set_device_limit(new.limits.max_devices);
                    current.limits.max_devices = new.limits.max_devices;
                    out.applied.push(key);
                }
                "log.level" => {
                    use crate::logging::LevelChange;
                    match src.level.as_ref().map(|h| h.set(&new.log.level)) {
                        Some(Ok(LevelChange::Applied)) => {
                            current.log.level.clone_from(&new.log.level);
                            tracing::info!("log.level {:?} in force", new.log.level);
                            out.applied.push(key);
                        }
                        Some(Ok(LevelChange::OverriddenByEnv)) => tracing::warn!(
                            "log.level changed to {:?}, but RUST_LOG is set and wins; \
                             unset RUST_LOG and restart to use log.level",
                            new.log.level
                        ),
                        Some(Err(e)) => tracing::error!("{e}"),
                        None => out.restart_needed.push(key),
                    }
                }
                _ => out.restart_needed.push(key),
            }
        }
        if !out.restart_needed.is_empty() {
            tracing::warn!(
                "configuration {shown}: {} changed but take effect only after a restart \
                 (systemctl restart fleetgate); the old values stay in force",
                out.restart_needed.join(", ")
            );
        }
        tracing::info!(
            "configuration {shown} re-read: {}",
            if out.applied.is_empty() {
                "nothing to change live".to_owned()
            } else {
                format!("applied {}", out.applied.join(", "))
            }
        );
        Ok(out)
    }
}

fn limit_label(n: u64) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

/// The driver that `auto` resolves to here (for `--help` and diagnostics).
pub fn describe_driver_choice(kind: DriverKind) -> String {
    match probe::choose(kind) {
        Ok(Chosen::Uring) => "uring".into(),
        Ok(Chosen::Epoll(None)) => "epoll".into(),
        Ok(Chosen::Epoll(Some(why))) => format!("epoll ({why})"),
        Err(why) => format!("unusable: {why}"),
    }
}
