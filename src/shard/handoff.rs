//! Spreading management connections over the shards (`relay.spread_management`).
//!
//! The kernel places a connection on a shard at accept (the `SO_REUSEPORT` hash), before
//! anyone knows whether it is a device or a management server. A management connection's
//! shard decrypts and routes everything that connection sends, so with two management
//! connections on one shard, one CPU does the work of both while the other has none of it.
//! A shard that upgrades a management connection while it holds at least two more of them
//! than another shard hands the new one over:
//!
//! 1. At the upgrade the connection is marked moving ([`Moving`]). It is not listed as a
//!    manager here (no events, no revocation lookups), its timers are ignored, and bytes that
//!    arrive for it are kept as they came (ciphertext), unprocessed.
//! 2. Once the `101` and `hello` are sent (nothing queued, nothing in flight) the driver
//!    detaches the socket ([`crate::driver::Driver::detach`]).
//! 3. The connection's state (TLS record keys and sequence numbers, WebSocket decoder), its
//!    socket and the kept bytes travel to the other shard over the mesh
//!    ([`MeshMsg::Adopt`]).
//! 4. That shard adopts the socket, counts the connection (its own gauge first, then the
//!    old shard's down, so the total never dips), lists it as a manager and feeds it the kept
//!    bytes before anything its socket receives next.
//!
//! Nothing the connection sends is processed before step 4, so every routing tag it is ever
//! given names its final shard: answers need no forwarding. If the detach fails (a kernel
//! without `IORING_OP_FIXED_FD_INSTALL`), the connection stays where it is and the kept bytes
//! are processed there.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::Shard;
use super::conn::Conn;
use crate::driver::{ConnKey, Driver};
use crate::metrics::ShardStats;
use crate::relay::MeshMsg;

/// A management connection this shard is handing to another.
#[derive(Debug)]
pub(super) struct Moving {
    /// The connection (still in this shard's slab).
    pub key: ConnKey,
    /// The shard it goes to.
    pub to: usize,
    /// Bytes received for it since the upgrade, unprocessed.
    pub held: Vec<u8>,
    /// The driver has been asked to detach it.
    pub detaching: bool,
}

/// A management connection travelling between shards ([`MeshMsg::Adopt`]).
#[derive(Debug)]
pub struct Handoff {
    conn: Conn,
    fd: OwnedFd,
    held: Vec<u8>,
    from: usize,
}

impl<D: Driver> Shard<D> {
    /// The shard a newly upgraded management connection should go to, if moving it makes
    /// the spread more even.
    pub(super) fn spread_target(&self) -> Option<usize> {
        if !self.relay_limits.spread_management
            || self.shard_count < 2
            || self.mesh.is_none()
            || self.drain_until.is_some()
        {
            return None;
        }
        let stats = &self.shared.stats;
        let incoming = |i: usize| self.moving.iter().filter(|m| m.to == i).count() as u64;
        // Connections on their way out are still counted here.
        let mine = stats[self.id]
            .management
            .load(Relaxed)
            .saturating_sub(self.moving.len() as u64);
        let (best, n) = (0..self.shard_count.min(stats.len()))
            .filter(|&i| i != self.id)
            .map(|i| (i, stats[i].management.load(Relaxed) + incoming(i)))
            .min_by_key(|&(i, n)| (n, i))?;
        (n + 1 < mine).then_some(best)
    }

    /// Where `key` is in [`Shard::moving`], if it is being handed over.
    pub(super) fn moving_index(&self, key: ConnKey) -> Option<usize> {
        if self.moving.is_empty() {
            return None;
        }
        self.moving.iter().position(|m| m.key == key)
    }

    /// The moving entry of `key`, if it is being handed over.
    pub(super) fn moving_mut(&mut self, key: ConnKey) -> Option<&mut Moving> {
        let i = self.moving_index(key)?;
        self.moving.get_mut(i)
    }

    /// Asks the driver to detach a moving connection once its output is all sent.
    pub(super) fn maybe_detach(&mut self, slot: usize) {
        let key = self.key(slot);
        let c = &self.conns[slot];
        let ready = !c.closing && c.in_flight == 0 && c.out.is_empty() && c.bulk_bytes == 0;
        let draining = self.drain_until.is_some();
        let Some(m) = self.moving_mut(key) else {
            return;
        };
        if m.detaching || !ready || draining {
            return;
        }
        m.detaching = true;
        self.driver.detach(key);
    }

    /// The driver finished detaching `key`: send it on, or keep it here.
    pub(super) fn on_detached(&mut self, key: ConnKey, result: std::io::Result<OwnedFd>) {
        let Some(i) = self.moving.iter().position(|m| m.key == key) else {
            return; // not ours to move (the descriptor, if any, is closed on drop)
        };
        let m = self.moving.swap_remove(i);
        if !self.live(key) {
            return;
        }
        let slot = key.slot as usize;
        let fd = match result {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(shard = self.id, error = %e, "cannot hand over a management connection; it stays");
                self.settle(slot, m.held);
                return;
            }
        };
        let mut conn = self.conns.remove(slot);
        self.generations[slot] = (self.generations[slot] + 1) & ConnKey::GENERATION_MASK;
        ShardStats::dec(&self.stats().connections);
        if conn.accounted > 0 {
            self.stats()
                .relay_buffered
                .fetch_sub(conn.accounted as u64, Relaxed);
            conn.accounted = 0;
        }
        ShardStats::inc(&self.stats().management_moves);
        self.slot_freed();
        tracing::debug!(
            shard = self.id,
            to = m.to,
            "management connection handed over"
        );
        let msg = MeshMsg::Adopt(Box::new(Handoff {
            conn,
            fd,
            held: m.held,
            from: self.id,
        }));
        self.mesh_send(m.to, msg, None);
    }

    /// A management connection handed over by another shard.
    pub(super) fn adopt(&mut self, h: Box<Handoff>) {
        let Handoff {
            mut conn,
            fd,
            held,
            from,
        } = *h;
        // The other shard's bookkeeping stays there; this shard's starts afresh.
        conn.hint_tick = u64::MAX;
        conn.accounted = 0;
        conn.paused = false;
        conn.stalled = false;
        conn.budget_paused = false;
        let fingerprint = conn.session().map(|s| s.fingerprint);
        let slot = self.conns.insert(conn);
        if self.generations.len() <= slot {
            self.generations.resize(slot + 1, 0);
        }
        let key = self.key(slot);
        let all = self.shared.stats.clone();
        let from_stats = all.get(from).unwrap_or(&all[self.id]);
        if let Err(e) = self.driver.adopt(key, fd) {
            tracing::warn!(shard = self.id, error = %e, "cannot take over a management connection; closing it");
            self.conns.remove(slot);
            self.generations[slot] = (self.generations[slot] + 1) & ConnKey::GENERATION_MASK;
            ShardStats::dec(&from_stats.management);
            return;
        }
        ShardStats::inc(&self.stats().connections);
        // Ours first, then theirs: the gateway-wide count (status: `ok`) never dips.
        ShardStats::inc(&self.stats().management);
        ShardStats::dec(&from_stats.management);
        if let Some(fp) = fingerprint {
            if self.revocations.contains(&fp) {
                // Revoked while it travelled (the kick went to the shards that listed it).
                tracing::info!(shard = self.id, "closing a revoked management connection");
                self.abort(slot);
                return;
            }
        }
        if self.drain_until.is_some() {
            let now = self.now_ms();
            self.with_cx(now, slot, |c, cx| {
                c.shutdown(cx);
            });
            self.act(slot);
            return;
        }
        self.settle(slot, held);
    }

    /// A management connection stays on this shard (adopted, or not movable): list it, then
    /// process what arrived for it meanwhile.
    pub(super) fn settle(&mut self, slot: usize, mut held: Vec<u8>) {
        let key = self.key(slot);
        self.managers.push(key);
        if !held.is_empty() && !self.conns[slot].closing {
            let now = self.now_ms();
            self.rx_at = Some(Instant::now());
            self.with_cx(now, slot, |c, cx| {
                c.on_data(&mut held, cx);
            });
            self.take_request(slot);
            self.route_envelopes(slot);
            self.rx_at = None;
        }
        self.act(slot);
    }
}
