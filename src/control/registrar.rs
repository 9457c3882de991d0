//! The registrar thread: decides registrations in batches, issues device certificates, keeps
//! the revocation list and the live-session table. See the [module docs](super).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::FromDer as _;

use super::{Job, Kick, LiveSession, RegisterOutcome, Revocations};
use crate::config::RegistrationConfig;
use crate::driver::{ConnKey, Waker};
use crate::metrics::Onboarding;
use crate::pki::Fingerprint;
use crate::pki::device::DeviceCa;
use crate::proto::device::Register;
use crate::proto::envelope::{self, Header, Kind, RequestBody, ResponseBody};
use crate::registry::limiter::FailureLimiter;
use crate::registry::{
    DeviceCredential, Reason, RegistrationRefusal, RegistrationRequest, Registry, Touch, unix_now,
};
use crate::shard::Command;
use serde_json::{Value, json};

/// How often revocations are re-read from the registry (a CLI change shows within this).
const REFRESH_EVERY: Duration = Duration::from_millis(500);
/// How often last-seen times and the unknown-credential check are flushed.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// A throttled source gets one audit row per this period, not one per attempt.
const THROTTLE_AUDIT_EVERY: Duration = Duration::from_secs(60);

/// A shard as the registrar reaches it.
#[derive(Debug, Clone)]
pub struct ShardLink {
    /// Its command inbox.
    pub tx: Sender<Command>,
    /// Its wake-up.
    pub waker: Waker,
}

/// The registrar's state. Runs on its own thread ([`Registrar::run`]).
pub struct Registrar {
    registry: Registry,
    ca: DeviceCa,
    ca_pem: Arc<str>,
    config: RegistrationConfig,
    limiter: FailureLimiter,
    shards: Vec<ShardLink>,
    revocations: Arc<Revocations>,
    stats: Arc<Onboarding>,
    live: HashMap<[u8; 32], (LiveSession, u32)>,
    touches: Vec<Touch>,
    to_check: Vec<(usize, Fingerprint)>,
    data_version: i64,
    throttle_audited: HashMap<IpAddr, Instant>,
    /// The cached health, for the `status` method.
    pub status: Option<Arc<crate::status::StatusCell>>,
    /// Every shard's counters, for the `status` method.
    pub shard_stats: Option<Arc<[crate::metrics::ShardStats]>>,
    /// Public gateway addresses for `keys.export`.
    pub handout: crate::export::HandoutConfig,
    /// The served root's fingerprint, for `keys.export`.
    pub root_fingerprint: Option<Fingerprint>,
    /// The data dir (the staged root of a rollover).
    pub data_dir: std::path::PathBuf,
    /// A `rollover.offer` in progress.
    rollover: Option<RolloverOffer>,
    next_channel: u32,
}

/// A `rollover.offer` waiting for the devices' answers.
struct RolloverOffer {
    /// Who asked: shard, management connection, request id.
    asker: (usize, ConnKey, u32),
    /// Request id → the device's credential.
    outstanding: HashMap<u32, Fingerprint>,
    staged: Fingerprint,
    offered: usize,
    accepted: usize,
    unsupported: usize,
    deadline: Instant,
}

/// How long devices have to answer `root.offer`.
const ROLLOVER_ANSWER_TIME: Duration = Duration::from_secs(5);

fn is_method(body: &[u8], method: &str) -> bool {
    serde_json::from_slice::<RequestBody>(body).is_ok_and(|r| r.method == method)
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("registry", &self.registry)
            .field("revoked", &self.revocations.len())
            .field("live", &self.live.len())
            .finish_non_exhaustive()
    }
}

/// One registration being decided.
struct Pending {
    shard: usize,
    conn: ConnKey,
    source: Option<IpAddr>,
    msg: Box<Register>,
    credential: DeviceCredential,
    certificate: String,
    root: Option<Fingerprint>,
}

/// The revocation list as the registry has it now.
pub fn load_revocations(
    registry: &Registry,
) -> Result<Revocations, crate::registry::RegistryError> {
    let mut r = Revocations::default();
    for (fp, _, why) in registry.revoked_credentials(unix_now())? {
        r.insert(fp.0, why == "superseded");
    }
    Ok(r)
}

impl Registrar {
    /// A registrar over an open registry and the device CA. `revocations` is the list the
    /// shards started with.
    pub fn new(
        registry: Registry,
        ca: DeviceCa,
        config: RegistrationConfig,
        shards: Vec<ShardLink>,
        revocations: Arc<Revocations>,
        stats: Arc<Onboarding>,
    ) -> Registrar {
        let data_version = registry.data_version().unwrap_or(0);
        Registrar {
            ca_pem: ca.cert_pem().into(),
            ca,
            limiter: FailureLimiter::new(config.rate_limit),
            config,
            registry,
            shards,
            revocations,
            stats,
            live: HashMap::new(),
            touches: Vec::new(),
            to_check: Vec::new(),
            data_version,
            throttle_audited: HashMap::new(),
            status: None,
            shard_stats: None,
            handout: crate::export::HandoutConfig::default(),
            root_fingerprint: None,
            data_dir: std::path::PathBuf::new(),
            rollover: None,
            next_channel: 1,
        }
    }

    /// Serves jobs until every sender is gone.
    pub fn run(mut self, inbox: Receiver<Job>) {
        let mut next_refresh = Instant::now() + REFRESH_EVERY;
        let mut next_flush = Instant::now() + FLUSH_EVERY;
        let mut batch: Vec<Job> = Vec::new();
        loop {
            let mut wake_at = next_flush.min(next_refresh);
            if let Some(r) = &self.rollover {
                wake_at = wake_at.min(r.deadline);
            }
            let wait = wake_at.saturating_duration_since(Instant::now());
            match inbox.recv_timeout(wait) {
                Ok(job) => {
                    batch.push(job);
                    while batch.len() < self.config.batch_max {
                        match inbox.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    self.handle(&mut batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if self.rollover.as_ref().is_some_and(|r| now >= r.deadline) {
                self.rollover_finish();
            }
            if now >= next_flush {
                next_flush = now + FLUSH_EVERY;
                self.flush_sessions();
            }
            if now >= next_refresh {
                next_refresh = now + REFRESH_EVERY;
                let v = self.registry.data_version().unwrap_or(self.data_version);
                if v != self.data_version {
                    self.data_version = v;
                    self.refresh();
                }
                self.limiter.prune(now);
                self.throttle_audited
                    .retain(|_, t| now.duration_since(*t) < THROTTLE_AUDIT_EVERY);
            }
        }
        self.flush_sessions();
        tracing::debug!("registrar stopped");
    }

    fn handle(&mut self, batch: &mut Vec<Job>) {
        let mut regs = Vec::new();
        for job in batch.drain(..) {
            match job {
                Job::Register {
                    shard,
                    conn,
                    source,
                    msg,
                } => {
                    if let Some(p) = self.prepare(shard, conn, source, msg) {
                        regs.push(p);
                    }
                }
                Job::SessionUp {
                    shard,
                    conn,
                    fingerprint,
                    unit_id,
                    source,
                    at,
                } => {
                    // The shards keep their directory replicas themselves (the session's
                    // shard tells the others over the mesh, docs/architecture.md).
                    let address = source.map(|a| a.to_string());
                    self.event(&unit_id, json!({"event": "device_up", "address": address}));
                    let e = self.live.entry(fingerprint.0).or_insert_with(|| {
                        (
                            LiveSession {
                                unit_id: unit_id.to_string(),
                                fingerprint: fingerprint.hex(),
                                since: at,
                                address: None,
                                shard,
                                conn: None,
                            },
                            0,
                        )
                    });
                    e.0.conn = Some(conn);
                    e.0.since = at;
                    e.0.shard = shard;
                    e.0.address = source.map(|a| a.to_string());
                    e.1 += 1;
                    self.touches.push(Touch {
                        fingerprint,
                        address: source,
                        at,
                    });
                    self.to_check.push((shard, fingerprint));
                }
                Job::SessionDown {
                    fingerprint,
                    unit_id,
                    ..
                } => {
                    self.event(&unit_id, json!({"event": "device_down"}));
                    if let Some(e) = self.live.get_mut(&fingerprint.0) {
                        e.1 = e.1.saturating_sub(1);
                        if e.1 == 0 {
                            self.live.remove(&fingerprint.0);
                        }
                    }
                }
                Job::SessionRefused {
                    unit_id,
                    source,
                    reason,
                } => {
                    // Counted by the shard; audited here.
                    if reason != Reason::LimitReached {
                        if let Err(e) =
                            self.registry
                                .record_refusal(Some(&unit_id), source, reason, unix_now())
                        {
                            tracing::warn!(error = %e, "cannot write the audit log");
                        }
                    }
                }
                Job::BadRegistration { source } => {
                    // Audited unless the source is already throttled (garbage floods must not
                    // turn into a disk-sync flood).
                    let throttled =
                        source.is_some_and(|ip| self.limiter.check(ip, Instant::now()).is_err());
                    if let Some(ip) = source {
                        self.limiter.record_failure(ip, Instant::now());
                    }
                    if !throttled {
                        let _ = self.registry.record_refusal(
                            None,
                            source,
                            Reason::BadRequest,
                            unix_now(),
                        );
                    }
                }
                Job::Refresh => self.refresh(),
                Job::DeviceAnswer { channel, body } => self.rollover_answer(channel, &body),
                Job::Gateway {
                    shard,
                    conn,
                    channel,
                    body,
                } if is_method(&body, "rollover.offer") => {
                    self.rollover_offer(shard, conn, channel)
                }
                Job::Gateway {
                    shard,
                    conn,
                    channel,
                    body,
                } => {
                    let answer = self.gateway_request(&body);
                    self.respond(shard, conn, channel, &answer);
                }
                Job::Sessions(reply) => {
                    let mut v: Vec<LiveSession> =
                        self.live.values().map(|(s, _)| s.clone()).collect();
                    v.sort_by(|a, b| a.unit_id.cmp(&b.unit_id));
                    let _ = reply.send(v);
                }
            }
        }
        if !regs.is_empty() {
            self.decide(regs);
        }
    }

    /// Everything that can be checked before the registry: rate limit, the CSR's signature;
    /// then the certificate is issued (the registry decides whether it is handed out).
    fn prepare(
        &mut self,
        shard: usize,
        conn: ConnKey,
        source: Option<IpAddr>,
        msg: Box<Register>,
    ) -> Option<Pending> {
        let now = Instant::now();
        if let Some(ip) = source {
            if let Err(t) = self.limiter.check(ip, now) {
                let first = !self.throttle_audited.contains_key(&ip);
                if first {
                    self.throttle_audited.insert(ip, now);
                    let _ = self.registry.record_refusal(
                        Some(&msg.unit_id),
                        source,
                        Reason::RateLimited,
                        unix_now(),
                    );
                }
                let ms = u64::try_from(t.retry_after.as_millis()).unwrap_or(u64::MAX);
                self.answer(shard, conn, refused(Reason::RateLimited, Some(ms.max(1))));
                return None;
            }
        }
        let refuse_bad = |this: &mut Registrar, why: String| {
            tracing::info!(unit = %msg.unit_id, ?source, "registration refused: {why}");
            if let Some(ip) = source {
                this.limiter.record_failure(ip, Instant::now());
            }
            let _ = this.registry.record_refusal(
                Some(&msg.unit_id),
                source,
                Reason::BadRequest,
                unix_now(),
            );
            this.answer(shard, conn, refused(Reason::BadRequest, None));
        };
        let spki = match csr_public_key(&msg.csr) {
            Ok(k) => k,
            Err(why) => {
                refuse_bad(self, why);
                return None;
            }
        };
        let root = match msg.root.as_deref().map(parse_hex32) {
            None => None,
            Some(Some(fp)) => Some(Fingerprint(fp)),
            Some(None) => {
                refuse_bad(self, "root is not 64 hex digits".into());
                return None;
            }
        };
        let issued = match self.ca.issue(
            &msg.unit_id,
            &spki,
            self.config.certificate_days,
            time::OffsetDateTime::now_utc(),
        ) {
            Ok(i) => i,
            Err(crate::pki::PkiError::InvalidInput(why)) if why.contains("unit ID") => {
                tracing::info!(unit = %msg.unit_id, ?source, "registration refused: {why}");
                if let Some(ip) = source {
                    self.limiter.record_failure(ip, Instant::now());
                }
                let _ =
                    self.registry
                        .record_refusal(None, source, Reason::UnitIdInvalid, unix_now());
                self.answer(shard, conn, refused(Reason::UnitIdInvalid, None));
                return None;
            }
            Err(e) => {
                let why = e.to_string();
                if why.contains("public key") {
                    refuse_bad(self, why);
                } else {
                    tracing::error!(error = %e, "cannot issue a device certificate");
                    self.stats.registration(Reason::InternalError);
                    self.answer(shard, conn, refused(Reason::InternalError, Some(5_000)));
                }
                return None;
            }
        };
        Some(Pending {
            shard,
            conn,
            source,
            credential: issued.credential(),
            certificate: issued.cert_pem,
            root,
            msg,
        })
    }

    /// One transaction for the whole batch, then the answers.
    fn decide(&mut self, regs: Vec<Pending>) {
        let now = unix_now();
        let reqs: Vec<RegistrationRequest<'_>> = regs
            .iter()
            .map(|p| RegistrationRequest {
                key: &p.msg.key,
                unit_id: &p.msg.unit_id,
                source: p.source,
                credential: &p.credential,
                root: p.root,
                now,
            })
            .collect();
        let t0 = Instant::now();
        let results = self.registry.consume_keys(&reqs);
        drop(reqs);
        tracing::debug!(
            n = regs.len(),
            ms = t0.elapsed().as_secs_f64() * 1000.0,
            "registration batch committed"
        );
        let mut kicks = Vec::new();
        let mut wake = HashSet::new();
        for (p, result) in regs.into_iter().zip(results) {
            wake.insert(p.shard);
            match result {
                Ok(grant) => {
                    self.stats.registration(Reason::Granted);
                    tracing::info!(
                        unit = %p.msg.unit_id,
                        source = ?p.source,
                        key = grant.key_id,
                        retried = grant.retried,
                        "device registered"
                    );
                    for fp in grant.superseded {
                        kicks.push(Kick {
                            fingerprint: fp.0,
                            reason: Reason::CredentialSuperseded,
                            drop_settings: false,
                        });
                    }
                    let unit = p.msg.unit_id.trim().to_owned();
                    self.event(&unit, json!({"event": "device_registered"}));
                    self.send(
                        p.shard,
                        Command::Registered {
                            conn: p.conn,
                            outcome: RegisterOutcome::Granted {
                                unit_id: unit,
                                certificate: p.certificate,
                                device_ca: self.ca_pem.clone(),
                                session: p.msg.session.then_some(p.credential.fingerprint.0),
                            },
                        },
                    );
                }
                Err(refusal) => {
                    let reason = refusal.reason();
                    self.stats.registration(reason);
                    if reason.is_failure() {
                        if let Some(ip) = p.source {
                            self.limiter.record_failure(ip, Instant::now());
                        }
                    }
                    match &refusal {
                        RegistrationRefusal::Storage(e) => {
                            tracing::error!(error = %e, unit = %p.msg.unit_id, "registration failed")
                        }
                        other => {
                            tracing::info!(unit = %p.msg.unit_id, source = ?p.source, "registration refused: {other}")
                        }
                    }
                    let retry = (reason == Reason::InternalError).then_some(5_000);
                    self.send(
                        p.shard,
                        Command::Registered {
                            conn: p.conn,
                            outcome: RegisterOutcome::Refused {
                                reason,
                                retry_after_ms: retry,
                            },
                        },
                    );
                }
            }
        }
        for s in wake {
            self.shards[s].waker.wake();
        }
        if !kicks.is_empty() {
            let mut set = (*self.revocations).clone();
            for k in &kicks {
                set.insert(k.fingerprint, k.reason == Reason::CredentialSuperseded);
            }
            self.publish(Arc::new(set), kicks);
        }
    }

    /// Sends an event (§6.5) about `unit` to every management connection: to the shards that
    /// hold one (a reconnect storm with no management server connected costs no wake-ups).
    fn event(&self, unit: &str, body: Value) {
        let holders = |i: usize| {
            self.shard_stats
                .as_deref()
                .and_then(|s| s.get(i))
                .is_none_or(|s| s.management.load(Relaxed) > 0)
        };
        if !(0..self.shards.len()).any(holders) {
            return;
        }
        let mut env = Vec::new();
        envelope::write(
            &mut env,
            &Header {
                kind: Kind::Event,
                channel: 0,
                route: 0,
                unit,
            },
            body.to_string().as_bytes(),
        );
        let env: Arc<[u8]> = env.into();
        for (i, s) in self.shards.iter().enumerate() {
            if holders(i) {
                let _ = s.tx.send(Command::Broadcast(env.clone()));
                s.waker.wake();
            }
        }
    }

    /// Sends a response envelope to a management connection.
    fn respond(&self, shard: usize, conn: ConnKey, channel: u32, answer: &ResponseBody) {
        let mut env = Vec::new();
        envelope::write(
            &mut env,
            &Header {
                kind: Kind::Response,
                channel,
                route: 0,
                unit: "",
            },
            &answer.to_vec(),
        );
        self.send(shard, Command::Relay { to: conn, env });
        if let Some(s) = self.shards.get(shard) {
            s.waker.wake();
        }
    }

    /// `rollover.offer`: hands the staged root to every connected device with `root.offer`,
    /// then (when all answered, or after [`ROLLOVER_ANSWER_TIME`]) reports the counts.
    fn rollover_offer(&mut self, shard: usize, conn: ConnKey, channel: u32) {
        if self.rollover.is_some() {
            let busy = ResponseBody::err("busy", "a rollover offer is already in progress");
            self.respond(shard, conn, channel, &busy);
            return;
        }
        let dir = crate::pki::DataDir::new(&self.data_dir);
        let staged = match crate::pki::ops::rollover_staged(&dir) {
            Ok(Some((ks, _))) => ks,
            Ok(None) => {
                let e = ResponseBody::err(
                    "bad_request",
                    "no root is staged (fleetgate pki rollover stage --keystore FILE)",
                );
                self.respond(shard, conn, channel, &e);
                return;
            }
            Err(e) => {
                let e = ResponseBody::err("internal_error", e.to_string());
                self.respond(shard, conn, channel, &e);
                return;
            }
        };
        let root_pem = crate::pki::pem::cert_pem(staged.root());
        let body = json!({"method": "root.offer", "params": {"root": root_pem}}).to_string();
        let mut offer = RolloverOffer {
            asker: (shard, conn, channel),
            outstanding: HashMap::new(),
            staged: staged.fingerprint(),
            offered: 0,
            accepted: 0,
            unsupported: 0,
            deadline: Instant::now() + ROLLOVER_ANSWER_TIME,
        };
        let targets: Vec<(Fingerprint, String, usize, ConnKey)> = self
            .live
            .iter()
            .filter_map(|(fp, (s, _))| {
                Some((Fingerprint(*fp), s.unit_id.clone(), s.shard, s.conn?))
            })
            .collect();
        for (fp, unit, dev_shard, dev_conn) in targets {
            let id = self.next_channel;
            self.next_channel = self.next_channel.wrapping_add(1).max(1);
            let mut env = Vec::new();
            envelope::write(
                &mut env,
                &Header {
                    kind: Kind::Request,
                    channel: id,
                    route: crate::relay::GATEWAY_ROUTE,
                    unit: &unit,
                },
                body.as_bytes(),
            );
            self.send(dev_shard, Command::ToDevice { to: dev_conn, env });
            offer.outstanding.insert(id, fp);
            offer.offered += 1;
        }
        for s in &self.shards {
            s.waker.wake();
        }
        tracing::info!(
            devices = offer.offered,
            "rollover: staged root offered to the connected devices"
        );
        self.rollover = Some(offer);
        if self
            .rollover
            .as_ref()
            .is_some_and(|r| r.outstanding.is_empty())
        {
            self.rollover_finish();
        }
    }

    fn rollover_answer(&mut self, channel: u32, body: &[u8]) {
        let Some(offer) = self.rollover.as_mut() else {
            return;
        };
        let Some(fp) = offer.outstanding.remove(&channel) else {
            return;
        };
        match serde_json::from_slice::<ResponseBody>(body) {
            Ok(r) if r.ok => {
                offer.accepted += 1;
                let staged = offer.staged;
                if let Err(e) = self.registry.set_device_root(&fp, &staged) {
                    tracing::warn!(error = %e, "cannot record a device's new root");
                }
            }
            Ok(r) if r.error.as_ref().is_some_and(|e| e.code == "unknown_method") => {
                offer.unsupported += 1;
            }
            _ => {}
        }
        if self
            .rollover
            .as_ref()
            .is_some_and(|r| r.outstanding.is_empty())
        {
            self.rollover_finish();
        }
    }

    fn rollover_finish(&mut self) {
        let Some(offer) = self.rollover.take() else {
            return;
        };
        let lacking_root = self
            .registry
            .count_devices_lacking_root(&offer.staged, unix_now())
            .unwrap_or(0);
        let answer = ResponseBody::ok(json!({
            "offered": offer.offered,
            "accepted": offer.accepted,
            "lacking_root": lacking_root,
            "lacking_feature": offer.unsupported + offer.outstanding.len(),
            "unanswered": offer.outstanding.len(),
        }));
        tracing::info!(
            offered = offer.offered,
            accepted = offer.accepted,
            lacking_root,
            "rollover offer finished"
        );
        let (shard, conn, channel) = offer.asker;
        self.respond(shard, conn, channel, &answer);
    }

    /// Answers a request to the gateway itself (§6.4, gateway methods).
    fn gateway_request(&mut self, body: &[u8]) -> ResponseBody {
        let req: RequestBody = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return ResponseBody::err("bad_request", format!("not a request: {e}")),
        };
        let p = &req.params;
        let now = unix_now();
        let r: Result<Value, (String, String)> = (|| {
            let storage = |e: crate::registry::RegistryError| {
                let code = if e.is_rejection() {
                    "bad_request"
                } else {
                    "internal_error"
                };
                (code.to_owned(), e.to_string())
            };
            let bad = |m: &str| ("bad_request".to_owned(), m.to_owned());
            Ok(match req.method.as_str() {
                "status" => {
                    let st = self
                        .status
                        .as_ref()
                        .map(|s| s.get().as_str())
                        .unwrap_or("ok");
                    let stats = self.shard_stats.as_deref().unwrap_or(&[]);
                    json!({
                        "status": st,
                        "devices": self.stats.sessions_open.load(Relaxed),
                        "management": crate::metrics::total(stats, |s| &s.management),
                        "registrations": self.stats.granted(),
                        "max_devices": self.stats.max_devices.load(Relaxed),
                    })
                }
                "devices.list" => {
                    let devices = self.registry.list_devices().map_err(storage)?;
                    let list: Vec<Value> = devices
                        .iter()
                        .filter(|d| d.state(now) == crate::registry::DeviceState::Active)
                        .map(|d| {
                            let live = self.live.get(&d.fingerprint.0).map(|(s, _)| s);
                            json!({
                                "unit_id": d.unit_id,
                                "state": d.state(now).as_str(),
                                "connected": live.is_some(),
                                "since": live.map(|s| s.since),
                                "address": live.and_then(|s| s.address.clone()).or(d.address.clone()),
                                "last_seen": d.last_seen,
                            })
                        })
                        .collect();
                    json!({ "devices": list })
                }
                "device.remove" => {
                    let unit = p["unit_id"]
                        .as_str()
                        .ok_or_else(|| bad("unit_id missing"))?;
                    let revoked = self.registry.revoke_device(unit, now).map_err(storage)?;
                    self.refresh();
                    json!({ "revoked": revoked.len() })
                }
                "limit.get" => json!({ "max_devices": self.stats.max_devices.load(Relaxed) }),
                "limit.set" => {
                    let n = p["max_devices"]
                        .as_u64()
                        .ok_or_else(|| bad("max_devices must be a number (0 = unlimited)"))?;
                    let old = self.stats.max_devices.swap(n, Relaxed);
                    tracing::info!("device connection limit {old} → {n} (management)");
                    json!({ "max_devices": n })
                }
                "keys.create" => {
                    let keys: Vec<crate::registry::NewKey> = if let Some(n) = p["one_time"].as_u64()
                    {
                        self.registry
                            .create_one_time_keys(n as usize, now)
                            .map_err(storage)?
                    } else if let Some(units) = p["units"].as_array() {
                        let units: Vec<&str> = units.iter().filter_map(Value::as_str).collect();
                        self.registry
                            .create_unit_keys(&units, now)
                            .map_err(storage)?
                    } else if p["mass"].as_bool() == Some(true) {
                        vec![
                            self.registry
                                .create_mass_key(p["value"].as_str(), now)
                                .map_err(storage)?,
                        ]
                    } else {
                        return Err(bad("give one_time, units or mass"));
                    };
                    json!({ "keys": keys.iter().map(|k| k.value.clone()).collect::<Vec<_>>() })
                }
                "keys.list" => {
                    let keys = self
                        .registry
                        .list_keys(crate::registry::KeyFilter::All)
                        .map_err(storage)?;
                    let list: Vec<Value> = keys
                        .iter()
                        .map(|k| {
                            json!({
                                "id": k.id,
                                "kind": k.kind.as_str(),
                                "state": k.state().as_str(),
                                "prefix": k.prefix,
                                "unit_id": k.unit_id,
                                "uses": k.use_count,
                                "used_by": k.last_used_by,
                                "used_at": k.last_used_at,
                            })
                        })
                        .collect();
                    json!({ "keys": list })
                }
                "keys.export" => {
                    let keys: Vec<String> = p["keys"]
                        .as_array()
                        .ok_or_else(|| bad("keys must be a list"))?
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|k| k.trim().to_owned())
                        .collect();
                    if keys.is_empty() {
                        return Err(bad("no key given"));
                    }
                    for k in &keys {
                        let info = self
                            .registry
                            .find_key(&crate::registry::KeyRef::Value(k.clone()))
                            .map_err(storage)?
                            .ok_or_else(|| bad(&format!("no such key: {k}")))?;
                        if !info.is_usable() {
                            return Err(bad(&format!(
                                "key #{} is {}",
                                info.id,
                                info.state().as_str()
                            )));
                        }
                    }
                    let format = match p["format"].as_str().unwrap_or("text") {
                        "text" => crate::export::Format::Text,
                        "xml" => crate::export::Format::Xml,
                        "html" => crate::export::Format::Html,
                        other => return Err(bad(&format!("unknown format {other:?}"))),
                    };
                    let fingerprint = self.root_fingerprint.ok_or_else(|| {
                        (
                            "internal_error".to_owned(),
                            "no root certificate".to_owned(),
                        )
                    })?;
                    let handout = crate::export::Handout {
                        gateways: &self.handout.gateways,
                        fingerprint: &fingerprint,
                        keys: &keys,
                    };
                    let content = crate::export::render(&handout, format)
                        .map_err(|e| ("bad_request".to_owned(), e.to_string()))?;
                    json!({ "content": content, "file_name": format.file_name() })
                }
                "keys.revoke" => {
                    let key = p["key"].as_str().ok_or_else(|| bad("key missing"))?;
                    self.registry
                        .revoke_key(&crate::registry::KeyRef::parse(key), now)
                        .map_err(storage)?;
                    json!({ "revoked": true })
                }
                _ => {
                    return Err((
                        "unknown_method".to_owned(),
                        format!("the gateway has no method {:?}", req.method),
                    ));
                }
            })
        })();
        match r {
            Ok(v) => ResponseBody::ok(v),
            Err((code, message)) => ResponseBody::err(&code, message),
        }
    }

    fn send(&self, shard: usize, cmd: Command) {
        if let Some(s) = self.shards.get(shard) {
            let _ = s.tx.send(cmd);
        }
    }

    fn answer(&self, shard: usize, conn: ConnKey, outcome: RegisterOutcome) {
        if let RegisterOutcome::Refused { reason, .. } = &outcome {
            self.stats.registration(*reason);
        }
        self.send(shard, Command::Registered { conn, outcome });
        if let Some(s) = self.shards.get(shard) {
            s.waker.wake();
        }
    }

    /// Hands a new revocation list (and the sessions to close) to every shard.
    fn publish(&mut self, set: Arc<Revocations>, kicks: Vec<Kick>) {
        self.revocations = set.clone();
        let kicks: Arc<[Kick]> = kicks.into();
        for s in &self.shards {
            let _ = s.tx.send(Command::Revocations {
                set: set.clone(),
                kicks: kicks.clone(),
            });
            s.waker.wake();
        }
    }

    /// Re-reads the revoked credentials; newly revoked ones are closed at once.
    fn refresh(&mut self) {
        let list = match self.registry.revoked_credentials(unix_now()) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read revocations from the registry");
                return;
            }
        };
        let mut set = Revocations::default();
        let mut kicks = Vec::new();
        for (fp, unit, why) in list {
            set.insert(fp.0, why == "superseded");
            if !self.revocations.contains(&fp.0) {
                let superseded = why == "superseded";
                let management = why == "management";
                if management {
                    tracing::info!(name = %unit, fingerprint = %fp.hex(), "management certificate revoked; closing its connection if connected");
                } else {
                    tracing::info!(unit = %unit, fingerprint = %fp.hex(), "credential {why}; closing its session if connected");
                }
                if !superseded && !management {
                    self.event(&unit, json!({"event": "device_removed"}));
                }
                kicks.push(Kick {
                    fingerprint: fp.0,
                    reason: if superseded {
                        Reason::CredentialSuperseded
                    } else {
                        Reason::CredentialRevoked
                    },
                    drop_settings: !superseded && !management,
                });
            }
        }
        if !kicks.is_empty() || set.len() != self.revocations.len() {
            self.publish(Arc::new(set), kicks);
        }
    }

    /// Records last-seen for new sessions and closes those whose credential the registry does
    /// not know (or no longer accepts).
    fn flush_sessions(&mut self) {
        if !self.touches.is_empty() {
            let touches = std::mem::take(&mut self.touches);
            if let Err(e) = self.registry.touch_last_seen_many(&touches) {
                tracing::warn!(error = %e, n = touches.len(), "cannot record last-seen times");
            }
        }
        if self.to_check.is_empty() {
            return;
        }
        let now = unix_now();
        let mut kicks = Vec::new();
        for (_, fp) in std::mem::take(&mut self.to_check) {
            match self.registry.authenticate(&fp, now) {
                Ok(_) => {}
                Err(crate::registry::AuthRefusal::Storage(e)) => {
                    tracing::warn!(error = %e, "cannot check a device credential");
                }
                Err(refusal) => {
                    let reason = refusal.reason();
                    tracing::warn!(fingerprint = %fp.hex(), "closing a device session: {refusal}");
                    self.stats.session_refused(reason);
                    kicks.push(Kick {
                        fingerprint: fp.0,
                        reason,
                        drop_settings: reason == Reason::CredentialRevoked,
                    });
                }
            }
        }
        if !kicks.is_empty() {
            let kicks: Arc<[Kick]> = kicks.into();
            for s in &self.shards {
                let _ = s.tx.send(Command::Revocations {
                    set: self.revocations.clone(),
                    kicks: kicks.clone(),
                });
                s.waker.wake();
            }
        }
    }
}

fn refused(reason: Reason, retry_after_ms: Option<u64>) -> RegisterOutcome {
    RegisterOutcome::Refused {
        reason,
        retry_after_ms,
    }
}

/// The public key (SubjectPublicKeyInfo DER) of a base64 PKCS#10 request whose signature
/// verifies.
pub fn csr_public_key(b64: &str) -> Result<Vec<u8>, String> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("csr is not base64: {e}"))?;
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| format!("csr is not a PKCS#10 request: {e}"))?;
    if !rest.is_empty() {
        return Err("csr has trailing bytes".into());
    }
    csr.verify_signature()
        .map_err(|e| format!("csr signature does not verify: {e}"))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-'))
        .collect();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// SHA-256 of a certificate's DER (its fingerprint).
pub fn fingerprint_of(der: &[u8]) -> Fingerprint {
    Fingerprint(Sha256::digest(der).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_signature_is_checked() {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(csr.der());
        let spki = csr_public_key(&b64).unwrap();
        assert_eq!(spki, rcgen::PublicKeyData::subject_public_key_info(&key));
        // Flip a byte of the signature (the end of the DER).
        let mut der = csr.der().to_vec();
        let n = der.len();
        der[n - 3] ^= 0x55;
        let bad = base64::engine::general_purpose::STANDARD.encode(&der);
        assert!(csr_public_key(&bad).unwrap_err().contains("signature"));
        assert!(csr_public_key("!!!").unwrap_err().contains("base64"));
        assert!(csr_public_key("AAAA").is_err());
    }

    #[test]
    fn hex_fingerprints_parse() {
        let hex = "AB".repeat(32);
        assert_eq!(parse_hex32(&hex), Some([0xab; 32]));
        assert_eq!(parse_hex32("ab"), None);
        assert_eq!(parse_hex32(&"zz".repeat(32)), None);
    }
}
