//! A shard: one thread, one driver (ring or epoll), one listener, one slab of connections,
//! one timer wheel, one output-buffer pool. Nothing here is shared with other shards except
//! the read-mostly status cell and the per-shard counter blocks (each written by its owner).
//!
//! The loop: expire due timer hints → poll the driver (bounded by the next timer tick) →
//! dispatch each event to its connection → act on what the connection asks for (send, pause,
//! close) → drain commands from the control thread when woken.

pub mod conn;
mod handoff;
mod relay;
pub mod timer;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use slab::Slab;

use crate::buf::VecPool;
use crate::control::{Job, Kick, RegisterOutcome, Revocations};
use crate::driver::{ConnKey, Driver, Event};
use crate::metrics::{ErrorKind, Onboarding, ShardStats};
use crate::relay::{Directory, Mesh, MeshInbox, MeshMsg};
use crate::status::StatusCell;
use crate::tls::TlsSession;
use conn::{After, ClientCas, Conn, Cx, Request, Settings};
use timer::TimerWheel;

pub use handoff::Handoff;

/// Spare envelope buffers a shard keeps, in bytes (~240 envelopes of 17 KiB): what 16
/// streams' 256 KiB windows put in flight at once, so bulk relay in steady state allocates
/// nothing. Kept after a burst: buffers the burst already used, not added on top of its peak.
pub const POOLED_ENVELOPE_BYTES: usize = 4 << 20;

/// Small buffers from another shard in surplus (see `Shard::small_balance`) above which
/// they are sent home: far above what requests and responses in flight leave, so a balanced
/// exchange never returns any.
const SMALL_RETURN_AFTER: i64 = 64;

/// Buffers a shard may owe another that sent it envelopes before it had spares to send back.
const MAX_RECYCLE_OWED: u32 = (POOLED_ENVELOPE_BYTES / crate::buf::ENVELOPE) as u32;

/// Messages from the control thread to a shard.
#[derive(Debug)]
pub enum Command {
    /// Use this TLS configuration for new connections (certificate swap). Connections
    /// already open keep their session.
    TlsConfig(Arc<ServerConfig>),
    /// Stop accepting, close WebSockets with 1001, exit when all are closed or `drain` has
    /// passed.
    Shutdown {
        /// Longest wait for peers to answer the close.
        drain: Duration,
    },
    /// The registrar's answer to a registration.
    Registered {
        /// The connection that asked.
        conn: ConnKey,
        /// The answer.
        outcome: RegisterOutcome,
    },
    /// The mesh to the other shards (sent once, when every shard runs).
    Mesh(Arc<Mesh>),
    /// A transit envelope from the control plane for a management connection of this shard
    /// (the gateway's own responses).
    Relay {
        /// The management connection.
        to: ConnKey,
        /// The envelope (transit form).
        env: Vec<u8>,
    },
    /// A transit envelope for every management connection of this shard (events).
    Broadcast(Arc<[u8]>),
    /// A transit envelope from the control plane for a device session of this shard (the
    /// gateway's own requests, route `GATEWAY_ROUTE`).
    ToDevice {
        /// The device session.
        to: ConnKey,
        /// The envelope (transit form).
        env: Vec<u8>,
    },
    /// A new revocation list, and the sessions to close now.
    Revocations {
        /// The list for new sessions.
        set: Arc<Revocations>,
        /// Open sessions to close (if this shard holds them).
        kicks: Arc<[Kick]>,
    },
}

/// What a shard shares with the rest of the process.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Every shard's counters; this shard writes `stats[id]`.
    pub stats: Arc<[ShardStats]>,
    /// The cached health.
    pub status: Arc<StatusCell>,
    /// Registration and session figures, the device connection limit.
    pub onboarding: Arc<Onboarding>,
    /// The registrar's inbox.
    pub jobs: Sender<Job>,
}

/// A shard's state. Generic over the backend so both compile to direct calls.
pub struct Shard<D: Driver> {
    id: usize,
    driver: D,
    conns: Slab<Conn>,
    generations: Vec<u32>,
    max_conns: usize,
    accepting: bool,
    settings: Settings,
    tls_config: Arc<ServerConfig>,
    wheel: TimerWheel,
    pool: VecPool,
    scratch: Vec<u8>,
    staged: Vec<u8>,
    shared: Shared,
    commands: Receiver<Command>,
    epoch: Instant,
    drain_until: Option<u64>,
    /// Accept errors so far (logged at powers of two, so a storm does not flood the log).
    accept_errors: u64,
    /// Credentials that must not open a session.
    revocations: Arc<Revocations>,
    /// Open device sessions of this shard by credential fingerprint.
    /// foldhash: the hash of a reconnect storm's 100,000 inserts (SipHash was ~1 % of it).
    sessions: foldhash::HashMap<[u8; 32], ConnKey>,
    /// Connections still in the TLS handshake.
    handshaking: usize,
    /// Handshakes in progress above which accepting pauses.
    max_handshaking: usize,
    /// Accepting is paused because of `max_handshaking`.
    paced: bool,
    /// Number of shards (for routing tags).
    shard_count: usize,
    /// This shard's replica of unit → session.
    directory: Directory,
    /// The other shards' inboxes (after start-up).
    mesh: Option<Arc<Mesh>>,
    /// This shard's mesh inbox.
    mesh_rx: MeshInbox,
    /// Messages another shard's full inbox did not take yet.
    mesh_backlog: VecDeque<(usize, MeshMsg)>,
    /// Shards to wake at the end of this loop turn (bit per shard).
    mesh_dirty: u64,
    /// Buffers owed to other shards: envelopes they sent that this shard could not answer with
    /// a spare buffer at the time (its pool was empty, e.g. while stream data waits in a
    /// device's queue). Paid back in `after_batch` as buffers return to the pool.
    recycle_owed: Vec<u32>,
    /// Per other shard: small buffers (requests, responses, credit) that came from it minus
    /// those that went to it. Requests and responses cross both ways and keep this near 0;
    /// credit flows one way (device → management side) and would leave the sending shard
    /// allocating one buffer per credit, so past [`SMALL_RETURN_AFTER`] the surplus goes home.
    small_balance: Vec<i64>,
    /// Connections paused until the mesh backlog drains.
    stalled: Vec<ConnKey>,
    /// Device sessions here that management connections opened streams to (see
    /// `relay::management_down`); may hold closed ones until `stream_devices_mark`.
    stream_devices: Vec<ConnKey>,
    /// Length at which `stream_devices` is next compacted.
    stream_devices_mark: usize,
    /// This shard's management connections.
    managers: Vec<ConnKey>,
    /// Relay queue caps.
    relay_limits: RelayLimits,
    /// Issuers of the two client-certificate CAs.
    client_cas: ClientCas,
    /// A spare list for the envelopes of one input (swapped with the connection's).
    relay_spare: Vec<Vec<u8>>,
    /// While the envelopes of one receive are being routed: when the shard took its bytes
    /// (`fleetgate_relay_latency_seconds`).
    rx_at: Option<Instant>,
    /// Connections paused for the memory budget, resumed once under ¾ of it.
    budget_stalled: Vec<ConnKey>,
    /// Input events of budget-paused connections, in arrival order, replayed on resume.
    budget_held: Vec<Event<D::Socket>>,
    /// Relay data frames (see [`Cx::frame_pool`]).
    frame_pool: VecPool,
    /// Management connections being handed to another shard (`handoff`).
    moving: Vec<handoff::Moving>,
}

/// The rest of what a shard starts with.
#[derive(Debug)]
pub struct ShardInit {
    /// The revocation list at start.
    pub revocations: Arc<Revocations>,
    /// `limits.max_pending_handshakes`.
    pub max_handshaking: usize,
    /// How many shards there are.
    pub shard_count: usize,
    /// This shard's mesh inbox.
    pub mesh_rx: MeshInbox,
    /// Relay queue caps.
    pub relay_limits: RelayLimits,
    /// Issuers of the client-certificate CAs.
    pub client_cas: ClientCas,
}

/// Caps on what the relay queues for one connection.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Output bytes above which requests and opens to a device are answered `busy`.
    pub max_control_queue: usize,
    /// Queued data bytes above which further data for the connection resets its stream.
    pub max_bulk_queue: usize,
    /// Relayed bytes held by all shards together above which relay senders are paused
    /// (`relay.memory_budget`; 0 = none).
    pub memory_budget: usize,
    /// Receive buffers that budget-paused connections may keep unprocessed (half the
    /// shard's receive buffers, so the other connections can still read).
    pub max_held_buffers: usize,
    /// Hand new management connections to the shard with the fewest (`relay.spread_management`).
    pub spread_management: bool,
}

impl<D: Driver> std::fmt::Debug for Shard<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .field("driver", &self.driver.name())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl<D: Driver> Shard<D> {
    /// A shard over `driver`, which is already listening.
    pub fn new(
        id: usize,
        driver: D,
        max_conns: usize,
        settings: Settings,
        tls_config: Arc<ServerConfig>,
        shared: Shared,
        commands: Receiver<Command>,
        init: ShardInit,
    ) -> Self {
        let ShardInit {
            revocations,
            max_handshaking,
            shard_count,
            mesh_rx,
            relay_limits,
            client_cas,
        } = init;
        Self {
            id,
            driver,
            conns: Slab::new(),
            generations: Vec::new(),
            max_conns,
            accepting: true,
            settings,
            tls_config,
            wheel: TimerWheel::new(),
            pool: VecPool::new(64, 256 * 1024).keep_envelope_bytes(POOLED_ENVELOPE_BYTES),
            scratch: Vec::with_capacity(16 * 1024),
            staged: Vec::with_capacity(16 * 1024),
            shared,
            commands,
            epoch: Instant::now(),
            drain_until: None,
            accept_errors: 0,
            revocations,
            sessions: foldhash::HashMap::default(),
            handshaking: 0,
            max_handshaking: max_handshaking.max(1),
            paced: false,
            shard_count,
            directory: Directory::default(),
            mesh: None,
            mesh_rx,
            mesh_backlog: VecDeque::new(),
            mesh_dirty: 0,
            recycle_owed: vec![0; shard_count],
            small_balance: vec![0; shard_count],
            stalled: Vec::new(),
            stream_devices: Vec::new(),
            stream_devices_mark: 64,
            managers: Vec::new(),
            relay_limits,
            client_cas,
            relay_spare: Vec::with_capacity(16),
            rx_at: None,
            budget_stalled: Vec::new(),
            budget_held: Vec::new(),
            frame_pool: VecPool::new(128, 128 * 1024),
            moving: Vec::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.id]
    }

    /// Runs until shut down.
    pub fn run(mut self) {
        let mut events: Vec<Event<D::Socket>> = Vec::with_capacity(1024);
        let mut due = Vec::new();
        loop {
            let now = self.now_ms();
            self.wheel.advance(now, &mut due);
            for (slot, generation, tick) in due.drain(..) {
                self.on_timer(slot, generation, tick, now);
            }
            if let Some(until) = self.drain_until {
                if self.conns.is_empty() || now >= until {
                    break;
                }
            }
            let mut wait = self.wheel.next_wake_ms(now).unwrap_or(1000).max(1);
            if !self.budget_stalled.is_empty() {
                // Other shards' queues drain without waking this one: look again soon.
                wait = wait.min(5);
            }
            if let Err(e) = self
                .driver
                .poll(&mut events, Some(Duration::from_millis(wait)))
            {
                tracing::error!(shard = self.id, error = %e, "driver poll failed; shard stops");
                break;
            }
            for ev in events.drain(..) {
                self.on_event(ev);
            }
            self.after_batch();
        }
        tracing::debug!(shard = self.id, left = self.conns.len(), "shard stopped");
    }

    fn key(&self, slot: usize) -> ConnKey {
        ConnKey {
            slot: slot as u32,
            generation: self.generations[slot],
        }
    }

    fn live(&self, key: ConnKey) -> bool {
        let slot = key.slot as usize;
        self.conns.contains(slot) && self.generations.get(slot) == Some(&key.generation)
    }

    fn on_event(&mut self, ev: Event<D::Socket>) {
        if let Event::Data { key, .. } | Event::Eof { key } | Event::RecvError { key, .. } = &ev {
            // Received before the pause took effect (the same batch, or a receive already
            // completed): kept as it is, in its receive buffer, until the budget allows.
            if self.live(*key) && self.conns[key.slot as usize].budget_paused {
                self.budget_held.push(ev);
                if self.budget_held.len() <= self.relay_limits.max_held_buffers {
                    return;
                }
                // Too many receive buffers held: the oldest input is processed after all
                // (over the budget, by at most half the receive buffers).
                let oldest = self.budget_held.remove(0);
                self.process_event(oldest);
                return;
            }
        }
        self.process_event(ev);
    }

    fn process_event(&mut self, ev: Event<D::Socket>) {
        match ev {
            Event::Accepted { sock, peer } => self.on_accept(sock, peer),
            Event::AcceptError(e) => {
                self.stats().error(ErrorKind::Accept);
                let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                if out_of_fds {
                    // Out of descriptors (fd limit or a full fixed table): stop accepting
                    // until a connection closes, instead of spinning on the error. Waiting
                    // clients stay in the listen backlog.
                    self.accepting = false;
                    self.driver.set_accepting(false);
                }
                self.accept_errors += 1;
                if self.accept_errors.is_power_of_two() {
                    tracing::warn!(
                        shard = self.id,
                        error = %e,
                        count = self.accept_errors,
                        connections = self.conns.len(),
                        "accept failed{}",
                        if out_of_fds {
                            "; pausing accepts until a connection closes (this shard's \
                             descriptors are used up: at most RLIMIT_NOFILE − 256 and \
                             limits.max_connections_per_shard; `fleetgate sizing` gives both)"
                        } else {
                            ""
                        }
                    );
                }
            }
            Event::Data { key, buf, len } => {
                if !self.live(key) || self.conns[key.slot as usize].closing {
                    self.driver.recycle(buf);
                    return;
                }
                if let Some(i) = self.moving_index(key) {
                    // Kept for the shard that will own the connection (`handoff`).
                    ShardStats::add(&self.shared.stats[self.id].bytes_in, len as u64);
                    let bytes = self.driver.buf_mut(buf, len);
                    self.moving[i].held.extend_from_slice(bytes);
                    self.driver.recycle(buf);
                    return;
                }
                ShardStats::add(&self.shared.stats[self.id].bytes_in, len as u64);
                self.rx_at = Some(Instant::now());
                let now = self.now_ms();
                let Self {
                    driver,
                    conns,
                    settings,
                    shared,
                    scratch,
                    staged,
                    pool,
                    frame_pool,
                    id,
                    revocations,
                    client_cas,
                    ..
                } = self;
                let name = driver.name();
                let input = driver.buf_mut(buf, len);
                let mut cx = Cx {
                    now_ms: now,
                    settings,
                    stats: &shared.stats[*id],
                    all_stats: &shared.stats,
                    status: &shared.status,
                    driver: name,
                    scratch,
                    staged,
                    pool,
                    frame_pool,
                    onboarding: &shared.onboarding,
                    revocations,
                    client_cas,
                };
                conns[key.slot as usize].on_data(input, &mut cx);
                self.driver.recycle(buf);
                self.take_request(key.slot as usize);
                self.route_envelopes(key.slot as usize);
                self.rx_at = None;
                self.act(key.slot as usize);
            }
            Event::Eof { key } => {
                if self.live(key) && self.moving_mut(key).is_none() {
                    // (A moving connection's new shard reads the end of stream again.)
                    self.conns[key.slot as usize].on_eof();
                    self.act(key.slot as usize);
                }
            }
            Event::RecvError { key, err } => {
                if self.live(key) {
                    tracing::debug!(shard = self.id, error = %err, "receive failed");
                    self.stats().error(ErrorKind::Recv);
                    self.abort(key.slot as usize);
                }
            }
            Event::SendDone { key, buf, result } => {
                self.pool.give(buf);
                if !self.live(key) {
                    return;
                }
                self.conns[key.slot as usize].in_flight = 0;
                match result {
                    Ok(()) => {
                        let slot = key.slot as usize;
                        if self.conns[slot].bulk_bytes > 0 {
                            let now = self.now_ms();
                            self.with_cx(now, slot, |c, cx| c.pump_bulk(cx));
                        }
                        self.act(slot);
                    }
                    Err(e) => {
                        tracing::debug!(shard = self.id, error = %e, "send failed");
                        self.stats().error(ErrorKind::Send);
                        self.abort(key.slot as usize);
                    }
                }
            }
            Event::Closed { key } => {
                if self.live(key) {
                    if !self.moving.is_empty() {
                        self.moving.retain(|m| m.key != key);
                    }
                    let slot = key.slot as usize;
                    let conn = self.conns.remove(slot);
                    self.generations[slot] =
                        (self.generations[slot] + 1) & ConnKey::GENERATION_MASK;
                    conn::uncount(self.stats(), conn.endpoint());
                    if conn.handshake_counted {
                        self.handshake_ended();
                    }
                    if let Some(s) = conn.session() {
                        if self.sessions.get(&s.fingerprint) == Some(&key) {
                            self.sessions.remove(&s.fingerprint);
                        }
                        if conn.management().is_some() {
                            self.managers.retain(|k| *k != key);
                            self.management_closed(key);
                        } else {
                            self.shared.onboarding.close_session();
                            self.directory_update(&s.unit_id, key, false);
                            let _ = self.shared.jobs.send(Job::SessionDown {
                                fingerprint: crate::pki::Fingerprint(s.fingerprint),
                                unit_id: s.unit_id.clone(),
                                shard: self.id,
                                conn: key,
                            });
                        }
                    }
                    let mut conn = conn;
                    if conn.accounted > 0 {
                        self.shared.stats[self.id]
                            .relay_buffered
                            .fetch_sub(conn.accounted as u64, Relaxed);
                    }
                    conn.clear_bulk(&mut self.frame_pool);
                    ShardStats::dec(&self.stats().connections);
                    if let Some(b) = (conn.out.capacity() > 0).then_some(conn.out) {
                        self.pool.give(b);
                    }
                    self.slot_freed();
                }
            }
            Event::Wake => self.on_commands(),
            Event::Detached { key, result } => self.on_detached(key, result),
        }
    }

    /// A slab slot was freed: accept again if the shard was full.
    fn slot_freed(&mut self) {
        if !self.accepting && self.drain_until.is_none() {
            self.accepting = true;
            if !self.paced {
                self.driver.set_accepting(true);
            }
        }
    }

    fn on_accept(&mut self, sock: D::Socket, peer: Option<std::net::SocketAddr>) {
        if self.drain_until.is_some() {
            self.driver.reject(sock);
            return;
        }
        if self.conns.len() >= self.max_conns {
            self.stats().error(ErrorKind::ShardFull);
            self.driver.reject(sock);
            self.accepting = false;
            self.driver.set_accepting(false);
            return;
        }
        let tls = match TlsSession::new(self.tls_config.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a TLS session");
                self.driver.reject(sock);
                return;
            }
        };
        let now = self.now_ms();
        let mut conn = Conn::new(tls, now);
        conn.peer = peer.map(|p| p.ip());
        conn.handshake_counted = true;
        let slot = self.conns.insert(conn);
        if self.generations.len() <= slot {
            self.generations.resize(slot + 1, 0);
        }
        let key = self.key(slot);
        if let Err(e) = self.driver.attach(key, sock) {
            tracing::warn!(error = %e, "cannot register connection");
            self.conns.remove(slot);
            return;
        }
        ShardStats::inc(&self.stats().accepted);
        ShardStats::inc(&self.stats().connections);
        self.handshaking += 1;
        if self.handshaking >= self.max_handshaking && !self.paced {
            // Pace a storm: let the handshakes under way finish before taking more; the
            // waiting clients stay in the listen queue.
            self.paced = true;
            if self.accepting {
                self.driver.set_accepting(false);
            }
        }
        tracing::trace!(shard = self.id, ?peer, slot, "accepted");
        self.act(slot);
        if self.conns.len() >= self.max_conns {
            self.accepting = false;
            self.driver.set_accepting(false);
        }
    }

    fn on_timer(&mut self, slot: u32, generation: u32, tick: u64, now: u64) {
        let key = ConnKey { slot, generation };
        if !self.live(key) {
            return;
        }
        let slot = slot as usize;
        {
            let c = &mut self.conns[slot];
            if c.closing {
                return;
            }
            if c.hint_tick != tick {
                return; // a stale duplicate; an earlier or later hint is pending
            }
            c.hint_tick = u64::MAX;
        }
        if self.moving_mut(key).is_some() {
            return; // its new shard keeps the time from now on
        }
        self.with_cx(now, slot, |c, cx| {
            c.on_timer(cx);
        });
        self.act(slot);
    }

    fn with_cx(&mut self, now: u64, slot: usize, f: impl FnOnce(&mut Conn, &mut Cx<'_>)) {
        let Self {
            driver,
            conns,
            settings,
            shared,
            scratch,
            staged,
            pool,
            frame_pool,
            id,
            revocations,
            client_cas,
            ..
        } = self;
        let mut cx = Cx {
            now_ms: now,
            settings,
            stats: &shared.stats[*id],
            all_stats: &shared.stats,
            status: &shared.status,
            driver: driver.name(),
            scratch,
            staged,
            pool,
            frame_pool,
            onboarding: &shared.onboarding,
            revocations,
            client_cas,
        };
        f(&mut conns[slot], &mut cx);
    }

    /// A connection left the TLS handshake (done or closed): resume paced accepts.
    fn handshake_ended(&mut self) {
        self.handshaking = self.handshaking.saturating_sub(1);
        if self.paced && self.handshaking < self.max_handshaking * 3 / 4 + 1 {
            self.paced = false;
            if self.accepting && self.drain_until.is_none() {
                self.driver.set_accepting(true);
            }
        }
    }

    /// Passes what the connection asked for to the registrar, and indexes new sessions.
    fn take_request(&mut self, slot: usize) {
        let key = self.key(slot);
        let c = &mut self.conns[slot];
        let Some(req) = c.take_request() else { return };
        let source = c.peer;
        let job = match req {
            Request::Register(msg) => Job::Register {
                shard: self.id,
                conn: key,
                source,
                msg,
            },
            Request::SessionUp => {
                let Some(s) = c.session() else { return };
                let fp = s.fingerprint;
                let job = Job::SessionUp {
                    shard: self.id,
                    conn: key,
                    fingerprint: crate::pki::Fingerprint(fp),
                    unit_id: s.unit_id.clone(),
                    source,
                    at: crate::registry::unix_now(),
                };
                tracing::debug!(shard = self.id, unit = %s.unit_id, "device session open");
                let unit = s.unit_id.clone();
                self.sessions.insert(fp, key);
                self.directory_update(&unit, key, true);
                job
            }
            Request::BadRegistration => Job::BadRegistration { source },
            Request::ManagementUp => {
                // A client that sent envelopes along with its upgrade request (before reading
                // the 101) stays: those are routed from here, with this shard's tags.
                let pipelined = !c.relay_in.is_empty();
                if let Some(to) = self.spread_target().filter(|_| !pipelined) {
                    tracing::debug!(shard = self.id, to, "handing a management connection over");
                    self.moving.push(handoff::Moving {
                        key,
                        to,
                        held: Vec::new(),
                        detaching: false,
                    });
                } else {
                    // (Not in `sessions`: several management connections may share a
                    // certificate; revocations look through `managers`.)
                    self.managers.push(key);
                }
                return;
            }
            Request::SessionRefused { unit_id, reason } => Job::SessionRefused {
                unit_id,
                source,
                reason,
            },
        };
        let _ = self.shared.jobs.send(job);
    }

    fn abort(&mut self, slot: usize) {
        let key = self.key(slot);
        let c = &mut self.conns[slot];
        if !c.closing {
            c.closing = true;
            self.driver.close(key);
        }
    }

    /// Does what the connection asks for: send, pause/resume, close, re-arm its timer.
    fn act(&mut self, slot: usize) {
        let key = self.key(slot);
        let max_q = self.settings.max_queued_output;
        {
            let c = &mut self.conns[slot];
            if c.handshake_counted && !c.is_handshaking() {
                c.handshake_counted = false;
                self.handshake_ended();
            }
        }
        let c = &mut self.conns[slot];
        let held = c.held();
        if held != c.accounted {
            let gauge = &self.shared.stats[self.id].relay_buffered;
            if held > c.accounted {
                gauge.fetch_add((held - c.accounted) as u64, Relaxed);
            } else {
                gauge.fetch_sub((c.accounted - held) as u64, Relaxed);
            }
            c.accounted = held;
        }
        if c.closing {
            return;
        }
        let after = c.after();
        if after == After::Abort {
            c.closing = true;
            self.driver.close(key);
            return;
        }
        if c.in_flight == 0 && !c.out.is_empty() {
            let buf = std::mem::take(&mut c.out);
            c.in_flight = buf.len();
            ShardStats::add(&self.shared.stats[self.id].bytes_out, buf.len() as u64);
            self.driver.send(key, buf);
        }
        let c = &mut self.conns[slot];
        if after == After::CloseAfterFlush && c.in_flight == 0 && c.out.is_empty() {
            c.closing = true;
            self.driver.close(key);
            return;
        }
        if !c.paused && c.queued() > max_q {
            c.paused = true;
            self.shared.stats[self.id].error(ErrorKind::Backpressure);
            self.driver.pause_recv(key);
        } else if c.paused && !c.stalled && !c.budget_paused && c.queued() <= max_q / 2 {
            c.paused = false;
            self.driver.resume_recv(key);
        }
        let deadline = c.deadline(&self.settings);
        if self.wheel.tick_of(deadline) < c.hint_tick {
            c.hint_tick = self.wheel.insert(deadline, key.slot, key.generation);
        }
        if !self.moving.is_empty() {
            self.maybe_detach(slot);
        }
    }

    fn on_commands(&mut self) {
        // The mesh first: its inbox is bounded, the senders wait on it.
        for _ in 0..crate::relay::MESH_CAPACITY {
            match self.mesh_rx.try_recv() {
                Ok(m) => self.on_mesh(m),
                Err(_) => break,
            }
        }
        loop {
            match self.commands.try_recv() {
                Ok(Command::TlsConfig(cfg)) => {
                    tracing::debug!(shard = self.id, "new TLS configuration");
                    self.tls_config = cfg;
                }
                Ok(Command::Shutdown { drain }) => self.begin_shutdown(drain),
                Ok(Command::Mesh(m)) => self.mesh = Some(m),
                Ok(Command::Relay { to, env }) => self.deliver_local(to, true, env, None),
                Ok(Command::Broadcast(env)) => self.broadcast_local(&env),
                Ok(Command::ToDevice { to, env }) => self.deliver_local(to, false, env, None),
                Ok(Command::Registered { conn, outcome }) => {
                    if self.live(conn) && !self.conns[conn.slot as usize].closing {
                        let now = self.now_ms();
                        let slot = conn.slot as usize;
                        self.with_cx(now, slot, |c, cx| {
                            c.on_registered(outcome, cx);
                        });
                        // A registration that continues as a session is indexed now.
                        self.take_request(slot);
                        self.act(slot);
                    }
                }
                Ok(Command::Revocations { set, kicks }) => {
                    self.revocations = set;
                    let now = self.now_ms();
                    for k in kicks.iter() {
                        // A device credential has one session; a management certificate may
                        // be shared by several connections (a cluster): all of them go.
                        let device = self.sessions.get(&k.fingerprint).copied();
                        let managers: Vec<ConnKey> = self
                            .managers
                            .iter()
                            .copied()
                            .filter(|m| {
                                self.conns[m.slot as usize]
                                    .session()
                                    .is_some_and(|s| s.fingerprint == k.fingerprint)
                            })
                            .collect();
                        for key in device.into_iter().chain(managers) {
                            if !self.live(key) || self.conns[key.slot as usize].closing {
                                continue;
                            }
                            let slot = key.slot as usize;
                            tracing::info!(shard = self.id, reason = %k.reason, "closing a session");
                            self.with_cx(now, slot, |c, cx| {
                                c.kick(k, cx);
                            });
                            self.act(slot);
                        }
                    }
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    // The control thread is gone: shut down.
                    if self.drain_until.is_none() {
                        self.begin_shutdown(Duration::from_millis(500));
                    }
                    return;
                }
            }
        }
    }

    fn begin_shutdown(&mut self, drain: Duration) {
        if self.drain_until.is_some() {
            return;
        }
        let now = self.now_ms();
        self.drain_until = Some(now + drain.as_millis() as u64);
        self.accepting = false;
        self.driver.close_listener();
        // Hand-overs not yet under way are called off: those connections close from here.
        let (stay, under_way): (Vec<handoff::Moving>, Vec<handoff::Moving>) =
            std::mem::take(&mut self.moving)
                .into_iter()
                .partition(|m| !m.detaching);
        self.moving = under_way;
        for m in stay {
            if self.live(m.key) {
                self.settle(m.key.slot as usize, m.held);
            }
        }
        let slots: Vec<usize> = self.conns.iter().map(|(s, _)| s).collect();
        for slot in slots {
            if self.conns[slot].closing {
                continue;
            }
            self.with_cx(now, slot, |c, cx| {
                c.shutdown(cx);
            });
            self.act(slot);
        }
    }
}
