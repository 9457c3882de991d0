//! The shard's half of the relay (`docs/protocol.md` §6, [`crate::relay`]): routing the
//! envelopes its connections receive, delivering envelopes from other shards, answering on a
//! peer's behalf when it is gone, and mesh backpressure.
//!
//! Envelopes travel between shards in one *transit form*: the management-side header (`unit` =
//! the device) with `route` = the management connection's tag. Delivery to a device strips
//! the unit; delivery to a management connection zeroes the route.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::Shard;
use crate::control::Job;
use crate::driver::{ConnKey, Driver};
use crate::metrics::{ErrorKind, ShardStats};
use crate::proto::envelope::{self, Header, Kind, ResponseBody};
use crate::relay::{MeshMsg, parse_route, route_of};

/// A unit ID copied out of an envelope (no allocation).
#[derive(Clone, Copy)]
struct Unit {
    buf: [u8; envelope::MAX_UNIT_LEN],
    len: usize,
}

impl Unit {
    fn new(s: &str) -> Unit {
        let mut buf = [0u8; envelope::MAX_UNIT_LEN];
        let len = s.len().min(buf.len());
        buf[..len].copy_from_slice(&s.as_bytes()[..len]);
        Unit { buf, len }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// The fixed fields of a header, copied out.
#[derive(Clone, Copy)]
struct Fields {
    kind: Kind,
    channel: u32,
    route: u64,
    unit: Unit,
}

impl Fields {
    fn header(&self) -> Header<'_> {
        Header {
            kind: self.kind,
            channel: self.channel,
            route: self.route,
            unit: self.unit.as_str(),
        }
    }
}

fn fields(env: &[u8]) -> Result<(Fields, usize), envelope::EnvelopeError> {
    let (h, n) = Header::parse(env)?;
    Ok((
        Fields {
            kind: h.kind,
            channel: h.channel,
            route: h.route,
            unit: Unit::new(h.unit),
        },
        n,
    ))
}

impl<D: Driver> Shard<D> {
    /// Routes the envelopes connection `slot` just received.
    pub(super) fn route_envelopes(&mut self, slot: usize) {
        if self.conns[slot].relay_in.is_empty() {
            return;
        }
        let key = self.key(slot);
        // Swap the connection's list with the shard's spare one (no allocation per message).
        let mut envs = std::mem::take(&mut self.relay_spare);
        std::mem::swap(&mut envs, &mut self.conns[slot].relay_in);
        let from_mgmt = self.conns[slot].management().is_some();
        let device_unit = self.conns[slot]
            .session()
            .map(|s| Unit::new(&s.unit_id))
            .filter(|_| !from_mgmt);
        for env in envs.drain(..) {
            let parsed = fields(&env);
            match parsed {
                Err(e) => {
                    tracing::debug!(shard = self.id, error = %e, "bad envelope; closing");
                    self.stats().error(ErrorKind::WebSocket);
                    let now = self.now_ms();
                    self.with_cx(now, slot, |c, cx| {
                        c.protocol_close(cx);
                    });
                    self.pool.give(env);
                    break;
                }
                Ok((f, body_at)) if from_mgmt => self.route_from_management(key, f, env, body_at),
                Ok((f, body_at)) => {
                    let unit = device_unit.unwrap_or(Unit::new(""));
                    self.route_from_device(key, unit, f, env, body_at);
                }
            }
        }
        for env in envs.drain(..) {
            self.pool.give(env);
        }
        self.relay_spare = envs;
        self.act(slot);
        if self.over_budget(1) {
            self.budget_pause(key);
        }
    }

    /// Relayed bytes held by all shards together exceed `num/4` × the memory budget.
    fn over_budget(&self, quarters: usize) -> bool {
        let budget = self.relay_limits.memory_budget;
        if budget == 0 {
            return false;
        }
        let held: u64 = self
            .shared
            .stats
            .iter()
            .map(|s| s.relay_buffered.load(Relaxed))
            .sum();
        held > (budget / 4 * quarters) as u64
    }

    /// Stops reading from a relay sender while the gateway is over its memory budget.
    fn budget_pause(&mut self, key: ConnKey) {
        if !self.live(key) {
            return;
        }
        let c = &mut self.conns[key.slot as usize];
        if c.budget_paused || c.closing {
            return;
        }
        c.budget_paused = true;
        if !c.paused {
            c.paused = true;
            self.driver.pause_recv(key);
        }
        self.budget_stalled.push(key);
        ShardStats::inc(&self.stats().budget_pauses);
    }

    /// Resumes the budget-paused connections once under ¾ of the budget.
    fn budget_resume(&mut self) {
        if self.budget_stalled.is_empty() || self.over_budget(3) {
            return;
        }
        let max_q = self.settings.max_queued_output;
        for key in std::mem::take(&mut self.budget_stalled) {
            if !self.live(key) {
                continue;
            }
            let c = &mut self.conns[key.slot as usize];
            c.budget_paused = false;
            if c.paused && !c.stalled && c.queued() <= max_q / 2 {
                c.paused = false;
                self.driver.resume_recv(key);
            }
        }
        // What they had received before the pause, in order (a connection paused again
        // while this runs keeps the rest: on_event holds it again).
        for ev in std::mem::take(&mut self.budget_held) {
            self.on_event(ev);
        }
    }

    /// An envelope from a management connection.
    fn route_from_management(
        &mut self,
        from: ConnKey,
        mut f: Fields,
        env: Vec<u8>,
        body_at: usize,
    ) {
        ShardStats::inc(&self.stats().relay_in);
        if f.unit.len == 0 {
            // For the gateway itself.
            if f.kind == Kind::Request {
                let _ = self.shared.jobs.send(Job::Gateway {
                    shard: self.id,
                    conn: from,
                    channel: f.channel,
                    body: env[body_at..].to_vec(),
                });
            }
            self.pool.give(env);
            return;
        }
        f.route = route_of(self.id, from);
        let Some(loc) = self.directory.get(f.unit.as_str()) else {
            self.bounce(&f, "device_offline", "the device is not connected");
            self.pool.give(env);
            return;
        };
        // The management form is the transit form but for the route: write it in place (a
        // fixed offset), so the body — up to 64 KiB of stream data — is not copied here.
        let mut env = env;
        env[8..16].copy_from_slice(&f.route.to_be_bytes());
        self.relay_to(loc.shard, loc.conn, false, env, Some(from));
    }

    /// An envelope from a device session: to the management connection named by its route,
    /// or (an event with route 0) to all of them.
    fn route_from_device(
        &mut self,
        from: ConnKey,
        unit: Unit,
        mut f: Fields,
        env: Vec<u8>,
        at: usize,
    ) {
        ShardStats::inc(&self.stats().relay_in);
        if f.route == crate::relay::GATEWAY_ROUTE {
            // An answer to the gateway's own request.
            if f.kind == Kind::Response {
                let _ = self.shared.jobs.send(Job::DeviceAnswer {
                    channel: f.channel,
                    body: env[at..].to_vec(),
                });
            }
            self.pool.give(env);
            return;
        }
        f.unit = unit;
        let transit = self.transit(&f, &env[at..]);
        self.pool.give(env);
        if f.route == 0 {
            if f.kind == Kind::Event {
                self.broadcast(transit);
            } else {
                self.pool.give(transit);
            }
            return;
        }
        let (shard, to) = parse_route(f.route);
        if shard >= self.shard_count {
            self.pool.give(transit);
            return;
        }
        self.relay_to(shard, to, true, transit, Some(from));
    }

    /// A transit-form envelope in a pooled buffer.
    fn transit(&mut self, f: &Fields, body: &[u8]) -> Vec<u8> {
        let header = f.header();
        let mut v = self.pool.take_min(header.len() + body.len());
        envelope::write(&mut v, &header, body);
        v
    }

    /// Sends a transit envelope to a connection here or on another shard. `source` is paused
    /// if the other shard's inbox is full.
    fn relay_to(
        &mut self,
        shard: usize,
        to: ConnKey,
        to_management: bool,
        env: Vec<u8>,
        source: Option<ConnKey>,
    ) {
        if shard == self.id {
            self.deliver_local(to, to_management, env, self.rx_at);
            return;
        }
        let msg = MeshMsg::Deliver {
            to,
            to_management,
            env,
            from_shard: self.id,
            received: self.rx_at,
            reply_route: 0,
        };
        self.mesh_send(shard, msg, source);
    }

    pub(super) fn mesh_send(&mut self, shard: usize, msg: MeshMsg, source: Option<ConnKey>) {
        let Some(mesh) = self.mesh.clone() else {
            // Start-up has not handed this shard the mesh yet: directory updates wait for it
            // (after_batch sends them once it is there); nothing else can be routed yet.
            match msg {
                MeshMsg::Deliver { env, .. } | MeshMsg::Recycle(env) => self.pool.give(env),
                dir @ (MeshMsg::DirPut { .. } | MeshMsg::DirDel { .. }) => {
                    self.mesh_backlog.push_back((shard, dir))
                }
                MeshMsg::Broadcast(_) | MeshMsg::Adopt(_) | MeshMsg::ManagementDown(_) => {}
            }
            return;
        };
        if let MeshMsg::Deliver { env, .. } = &msg {
            // Held by this shard's gauge until the other shard takes it (on_mesh).
            ShardStats::add(&self.stats().relay_buffered, env.len() as u64);
        }
        if let MeshMsg::Deliver { env, .. } | MeshMsg::Recycle(env) = &msg {
            if env.capacity() < crate::buf::ENVELOPE {
                if let Some(b) = self.small_balance.get_mut(shard) {
                    *b -= 1;
                }
            }
        }
        let result = if self.mesh_backlog.is_empty() {
            mesh.try_send(shard, msg)
        } else {
            Err(msg)
        };
        match result {
            Ok(()) => self.mesh_dirty |= 1 << shard,
            Err(msg) => {
                // Backpressure: keep it, stop reading from whoever sent it.
                self.mesh_backlog.push_back((shard, msg));
                if let Some(src) = source {
                    self.stall(src);
                }
            }
        }
    }

    /// Pauses reading from a connection until the mesh backlog has drained.
    fn stall(&mut self, key: ConnKey) {
        if !self.live(key) {
            return;
        }
        let c = &mut self.conns[key.slot as usize];
        if !c.stalled {
            c.stalled = true;
            self.stalled.push(key);
            if !c.paused {
                c.paused = true;
                self.driver.pause_recv(key);
            }
            self.stats().error(ErrorKind::Backpressure);
        }
    }

    /// Called once per loop turn: retries the mesh backlog, resumes stalled connections once
    /// it is empty, and wakes every shard that got messages (one wake-up per shard per turn).
    pub(super) fn after_batch(&mut self) {
        self.budget_resume();
        for shard in 0..self.small_balance.len() {
            if self.small_balance[shard] > super::SMALL_RETURN_AFTER {
                while self.small_balance[shard] > 0 {
                    let Some(back) = self.pool.take_small_spare() else {
                        break;
                    };
                    self.mesh_send(shard, MeshMsg::Recycle(back), None);
                }
            }
        }
        for shard in 0..self.recycle_owed.len() {
            while self.recycle_owed[shard] > 0 {
                let Some(back) = self.pool.take_spare(crate::buf::ENVELOPE) else {
                    break;
                };
                self.recycle_owed[shard] -= 1;
                self.mesh_send(shard, MeshMsg::Recycle(back), None);
            }
        }
        if let Some(mesh) = self.mesh.clone() {
            while let Some((shard, msg)) = self.mesh_backlog.pop_front() {
                match mesh.try_send(shard, msg) {
                    Ok(()) => self.mesh_dirty |= 1 << shard,
                    Err(msg) => {
                        self.mesh_backlog.push_front((shard, msg));
                        break;
                    }
                }
            }
            if self.mesh_backlog.is_empty() && !self.stalled.is_empty() {
                for key in std::mem::take(&mut self.stalled) {
                    if self.live(key) {
                        let max_q = self.settings.max_queued_output;
                        let c = &mut self.conns[key.slot as usize];
                        if c.stalled {
                            c.stalled = false;
                            // Still paused if its own output is backed up (act() resumes it)
                            // or the gateway is over its memory budget.
                            if c.queued() <= max_q / 2 && !c.budget_paused {
                                c.paused = false;
                                self.driver.resume_recv(key);
                            }
                        }
                    }
                }
            }
            let mut dirty = std::mem::take(&mut self.mesh_dirty);
            while dirty != 0 {
                let s = dirty.trailing_zeros() as usize;
                dirty &= dirty - 1;
                if let Some(w) = mesh.wakers.get(s) {
                    w.wake();
                }
            }
        }
    }

    /// Delivers a transit envelope to a connection of this shard, or answers for it.
    pub(super) fn deliver_local(
        &mut self,
        to: ConnKey,
        to_management: bool,
        env: Vec<u8>,
        received: Option<std::time::Instant>,
    ) {
        let Ok((f, at)) = fields(&env) else {
            self.pool.give(env);
            return;
        };
        let ok_target = self.live(to) && {
            let c = &self.conns[to.slot as usize];
            !c.closing && c.accepts_relay() && (c.management().is_some() == to_management)
        };
        if !ok_target {
            if to_management {
                self.bounce_to_device(&f, "link_closed", "the management connection is gone");
            } else {
                self.bounce(&f, "device_offline", "the device is not connected");
            }
            self.pool.give(env);
            return;
        }
        let slot = to.slot as usize;
        // Control beyond the cap: a request is answered `busy` instead of queued.
        let c = &self.conns[slot];
        if !to_management
            && matches!(f.kind, Kind::Request | Kind::Open)
            && c.queued() + c.bulk_bytes > self.relay_limits.max_control_queue
        {
            self.bounce(&f, "busy", "the device is not reading; try again later");
            self.pool.give(env);
            return;
        }
        if f.kind.is_bulk() && c.bulk_bytes > self.relay_limits.max_bulk_queue {
            // A sender that ignores credit: its stream is reset.
            ShardStats::inc(&self.stats().relay_dropped);
            if to_management {
                self.bounce_to_device(&f, "busy", "stream over its window");
            } else {
                self.bounce(&f, "busy", "stream over its window");
            }
            self.pool.give(env);
            return;
        }
        let mut h = f.header();
        if to_management {
            h.route = 0;
        } else {
            h.unit = "";
        }
        if !to_management && f.kind == Kind::Open {
            self.note_stream_route(to, f.route);
        }
        let now = self.now_ms();
        let mut left = Some(env);
        if !to_management && f.kind == Kind::Data {
            // Stream data to a device is queued in its own buffer (no copy of the body).
            self.with_cx(now, slot, |c, cx| {
                if let Some(env) = left.take() {
                    left = c.deliver_in_place(&h, env, at, cx).err();
                }
            });
        }
        if let Some(env) = left {
            let body = &env[at..];
            self.with_cx(now, slot, |c, cx| {
                c.deliver(&h, body, cx);
            });
            self.pool.give(env);
        }
        ShardStats::inc(&self.stats().relay_out);
        if let Some(t) = received {
            match f.kind {
                Kind::Request | Kind::Response => self.stats().relay_latency.record(t.elapsed()),
                Kind::Open | Kind::Accept | Kind::Credit | Kind::Close | Kind::Reset => {
                    self.stats().stream_control_latency.record(t.elapsed())
                }
                Kind::Data | Kind::Event => {}
            }
        }
        self.act(slot);
    }

    /// Answers the management side for a message that could not reach its device: a request
    /// gets a response with `code`, a stream message a reset (a reset itself is dropped).
    fn bounce(&mut self, f: &Fields, code: &str, message: &str) {
        let kind = match f.kind {
            Kind::Request => Kind::Response,
            Kind::Open | Kind::Accept | Kind::Data | Kind::Credit | Kind::Close => Kind::Reset,
            Kind::Reset | Kind::Response | Kind::Event => return,
        };
        let body = if kind == Kind::Response {
            ResponseBody::err(code, message).to_vec()
        } else {
            reset_body(code, message)
        };
        let reply = Fields { kind, ..*f };
        let env = self.transit(&reply, &body);
        let (shard, to) = parse_route(f.route);
        if f.route == 0 || shard >= self.shard_count {
            self.pool.give(env);
            return;
        }
        self.relay_to(shard, to, true, env, None);
    }

    /// Answers a device for a stream message whose management connection is gone.
    fn bounce_to_device(&mut self, f: &Fields, code: &str, message: &str) {
        if !f.kind.is_stream() || f.kind == Kind::Reset {
            return;
        }
        let Some(loc) = self.directory.get(f.unit.as_str()) else {
            return;
        };
        let reply = Fields {
            kind: Kind::Reset,
            ..*f
        };
        let env = self.transit(&reply, &reset_body(code, message));
        self.relay_to(loc.shard, loc.conn, false, env, None);
    }

    /// A device session started (`up`) or ended here: this shard's directory replica now,
    /// every other shard's over the mesh.
    pub(super) fn directory_update(&mut self, unit: &str, conn: ConnKey, up: bool) {
        let loc = crate::relay::Location {
            shard: self.id,
            conn,
        };
        if up {
            self.directory.put(unit, loc);
        } else {
            self.directory.remove(unit, loc);
        }
        for s in 0..self.shard_count {
            if s != self.id {
                let unit: Box<str> = unit.into();
                let msg = if up {
                    MeshMsg::DirPut { unit, loc }
                } else {
                    MeshMsg::DirDel { unit, loc }
                };
                self.mesh_send(s, msg, None);
            }
        }
    }

    /// Sends a transit envelope to every management connection of every shard.
    pub(super) fn broadcast(&mut self, env: Vec<u8>) {
        let shared: Arc<[u8]> = env.as_slice().into();
        self.pool.give(env);
        self.broadcast_local(&shared);
        for s in 0..self.shard_count {
            if s != self.id {
                self.mesh_send(s, MeshMsg::Broadcast(shared.clone()), None);
            }
        }
    }

    /// Delivers a transit envelope to this shard's management connections.
    pub(super) fn broadcast_local(&mut self, env: &[u8]) {
        let Ok((f, at)) = fields(env) else { return };
        let mut h = f.header();
        h.route = 0;
        let now = self.now_ms();
        for i in 0..self.managers.len() {
            let key = self.managers[i];
            if !self.live(key) {
                continue;
            }
            let slot = key.slot as usize;
            self.with_cx(now, slot, |c, cx| {
                c.deliver(&h, &env[at..], cx);
            });
            self.act(slot);
        }
    }

    /// Handles one message from another shard's mesh.
    pub(super) fn on_mesh(&mut self, msg: MeshMsg) {
        match msg {
            MeshMsg::Deliver {
                to,
                to_management,
                env,
                from_shard,
                received,
                ..
            } => {
                if let Some(s) = self.shared.stats.get(from_shard) {
                    s.relay_buffered.fetch_sub(env.len() as u64, Relaxed);
                }
                // The buffer joins our pool; for an envelope-sized one (stream data), one of
                // ours goes home in exchange, so neither shard allocates in steady state.
                // Small ones need no exchange: requests and their responses cross both ways.
                let large = env.capacity() >= crate::buf::ENVELOPE;
                if from_shard != self.id && !large {
                    if let Some(b) = self.small_balance.get_mut(from_shard) {
                        *b += 1;
                    }
                }
                self.deliver_local(to, to_management, env, received);
                if from_shard != self.id && large {
                    if let Some(back) = self.pool.take_spare(crate::buf::ENVELOPE) {
                        self.mesh_send(from_shard, MeshMsg::Recycle(back), None);
                    } else if let Some(owed) = self.recycle_owed.get_mut(from_shard) {
                        // Paid back by after_batch once buffers come home (bounded: a shard
                        // is never owed more than a pool holds).
                        *owed = (*owed + 1).min(super::MAX_RECYCLE_OWED);
                    }
                }
            }
            MeshMsg::Broadcast(env) => self.broadcast_local(&env),
            MeshMsg::DirPut { unit, loc } => self.directory.put(&unit, loc),
            MeshMsg::DirDel { unit, loc } => self.directory.remove(&unit, loc),
            MeshMsg::Recycle(buf) => self.pool.give(buf),
            MeshMsg::Adopt(h) => self.adopt(h),
            MeshMsg::ManagementDown(route) => self.management_down(route),
        }
    }

    /// A stream `open` reached device `to` from the management connection `route`: list the
    /// device for that connection's `management_down`.
    fn note_stream_route(&mut self, to: ConnKey, route: u64) {
        if !self.conns[to.slot as usize].note_stream_route(route) {
            return;
        }
        if self.stream_devices.len() >= self.stream_devices_mark {
            // Devices that closed, or whose routes all went, leave the list here (amortised:
            // the mark doubles with what stays).
            let mut list = std::mem::take(&mut self.stream_devices);
            list.retain(|k| self.live(*k) && self.conns[k.slot as usize].has_stream_routes());
            self.stream_devices_mark = (2 * list.len()).max(64);
            self.stream_devices = list;
        }
        self.stream_devices.push(to);
    }

    /// The management connection `route` is gone (it was on this shard or another): every
    /// device here that it opened streams to gets the event `management_down` on that route,
    /// so that the agent ends those streams (a terminal's shell, a shadow's socket) instead
    /// of waiting for traffic that will not come.
    pub(super) fn management_down(&mut self, route: u64) {
        let body = format!(r#"{{"event":"{}"}}"#, envelope::MANAGEMENT_DOWN);
        let h = Header {
            kind: Kind::Event,
            channel: 0,
            route,
            unit: "",
        };
        let now = self.now_ms();
        let mut i = 0;
        while i < self.stream_devices.len() {
            let key = self.stream_devices[i];
            if !self.live(key) {
                self.stream_devices.swap_remove(i);
                continue;
            }
            let slot = key.slot as usize;
            if self.conns[slot].forget_stream_route(route) {
                self.with_cx(now, slot, |c, cx| {
                    c.deliver(&h, body.as_bytes(), cx);
                });
                self.act(slot);
            }
            if self.live(key) && self.conns[slot].has_stream_routes() {
                i += 1;
            } else {
                self.stream_devices.swap_remove(i);
            }
        }
    }

    /// A management connection of this shard closed: every shard's devices hear of it.
    pub(super) fn management_closed(&mut self, key: ConnKey) {
        let route = route_of(self.id, key);
        self.management_down(route);
        for s in 0..self.shard_count {
            if s != self.id {
                self.mesh_send(s, MeshMsg::ManagementDown(route), None);
            }
        }
    }
}

fn reset_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "error": { "code": code, "message": message }
    }))
    .unwrap_or_default()
}
