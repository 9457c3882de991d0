//! The relay between management connections and device sessions (`docs/protocol.md` §6):
//! routing tags, the unit directory each shard keeps, and the mesh that carries envelopes
//! between shards.
//!
//! * **Routing tags.** Everything the gateway sends to a device carries, in the envelope's
//!   `route`, the management connection it came from: `shard:8 | generation:24 | slot:32`
//!   ([`route_of`]). The device echoes it, so answers find their way back without any state in
//!   the gateway; a tag whose connection is gone (the generation no longer matches) is
//!   recognised and the message dropped or answered `link_closed`.
//! * **Directory.** Management messages name a unit; every shard keeps a replica of
//!   `unit → (shard, connection)` ([`Directory`]). The shard that admits a session updates
//!   its own replica at once and tells the others over the mesh, so a message sent right
//!   after the device's `hello` already finds it; the registrar (which hears of every session)
//!   updates them again through the command inboxes, in order with the `device_up` event. A lookup is one local hash probe; the
//!   replica costs about 60 B per connected device per shard.
//! * **Mesh.** Envelopes for a connection on another shard travel over that shard's bounded
//!   inbox ([`Mesh`]; `std::sync::mpsc::sync_channel`, a lock-free bounded queue) with one
//!   eventfd wake-up per destination per loop turn. The buffers go back to the shard that
//!   filled them ([`MeshMsg::Recycle`]), so steady-state relaying allocates nothing. A full
//!   inbox is backpressure: the sending shard keeps the message, stops reading from its source
//!   and retries on its next loop turn.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use crate::driver::{ConnKey, Waker};

/// Capacity of each shard's mesh inbox (messages).
pub const MESH_CAPACITY: usize = 4096;

/// The route of requests the gateway itself sends to devices (`root.offer` for a root
/// exchange): no shard has this tag (at most 254 shards), answers go to the registrar.
pub const GATEWAY_ROUTE: u64 = u64::MAX;

/// The routing tag of a connection (never 0: the shard byte is stored plus one).
pub fn route_of(shard: usize, key: ConnKey) -> u64 {
    (((shard as u64 + 1) & 0xff) << 56)
        | (u64::from(key.generation & ConnKey::GENERATION_MASK) << 32)
        | u64::from(key.slot)
}

/// The shard and connection of a routing tag.
pub fn parse_route(route: u64) -> (usize, ConnKey) {
    (
        ((route >> 56) as usize).wrapping_sub(1),
        ConnKey {
            slot: route as u32,
            generation: ((route >> 32) as u32) & ConnKey::GENERATION_MASK,
        },
    )
}

/// Where a unit's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The shard.
    pub shard: usize,
    /// The connection on that shard.
    pub conn: ConnKey,
}

/// A shard's replica of `unit → location` (keys are ASCII-lower-cased unit IDs).
#[derive(Debug, Default)]
pub struct Directory {
    /// foldhash (randomly seeded, like std's SipHash, and cheaper on the storm path).
    map: foldhash::HashMap<Box<str>, Location>,
}

impl Directory {
    /// Records where `unit` is now.
    pub fn put(&mut self, unit: &str, at: Location) {
        self.map.insert(unit.to_ascii_lowercase().into(), at);
    }

    /// Forgets `unit` if it is still at `at` (a newer session of the unit may have replaced it).
    pub fn remove(&mut self, unit: &str, at: Location) {
        let k = unit.to_ascii_lowercase();
        if self.map.get(k.as_str()) == Some(&at) {
            self.map.remove(k.as_str());
        }
    }

    /// Where `unit` is (ASCII case ignored).
    pub fn get(&self, unit: &str) -> Option<Location> {
        if unit.bytes().any(|b| b.is_ascii_uppercase()) {
            let mut buf = [0u8; crate::proto::envelope::MAX_UNIT_LEN];
            let n = unit.len().min(buf.len());
            buf[..n].copy_from_slice(&unit.as_bytes()[..n]);
            buf[..n].make_ascii_lowercase();
            let lower = std::str::from_utf8(&buf[..n]).ok()?;
            self.map.get(lower).copied()
        } else {
            self.map.get(unit).copied()
        }
    }

    /// Number of units.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What travels between shards.
#[derive(Debug)]
pub enum MeshMsg {
    /// Deliver an envelope (already rewritten for its receiver) to a connection.
    Deliver {
        /// The receiving connection.
        to: ConnKey,
        /// The receiver must be a management connection (else a device session).
        to_management: bool,
        /// The envelope; goes back to `from_shard` afterwards.
        env: Vec<u8>,
        /// The shard that filled `env`.
        from_shard: usize,
        /// When the sending shard took the bytes this envelope came in (relay latency);
        /// `None` for envelopes the gateway made itself.
        received: Option<std::time::Instant>,
        /// Where to send `link_closed` if the receiver is gone: the sender's route (for a
        /// device sender) — 0 for none.
        reply_route: u64,
    },
    /// A buffer coming home.
    Recycle(Vec<u8>),
    /// A transit envelope for every management connection of the shard (events).
    Broadcast(std::sync::Arc<[u8]>),
    /// A device session started on the sending shard: update the directory replica at once
    /// (the registrar's own update follows, in order with the `device_up` event).
    DirPut {
        /// The unit ID.
        unit: Box<str>,
        /// Where.
        loc: Location,
    },
    /// A device session ended on the sending shard.
    DirDel {
        /// The unit ID.
        unit: Box<str>,
        /// Where it was.
        loc: Location,
    },
    /// A management connection handed over to the receiving shard, with its socket.
    Adopt(Box<crate::shard::Handoff>),
    /// The management connection with this route closed: tell the devices of the receiving
    /// shard that it had opened streams to (`management_down`, `docs/protocol.md` §6.5).
    ManagementDown(u64),
}

/// Every shard's mesh inbox and wake-up. Built once all shards run, handed to each.
#[derive(Debug)]
pub struct Mesh {
    /// Inboxes, by shard.
    pub inboxes: Vec<SyncSender<MeshMsg>>,
    /// Wake-ups, by shard.
    pub wakers: Vec<Waker>,
}

impl Mesh {
    /// Queues `msg` for `shard`; gives it back when that inbox is full.
    pub fn try_send(&self, shard: usize, msg: MeshMsg) -> Result<(), MeshMsg> {
        match self.inboxes[shard].try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => Err(m),
        }
    }
}

/// A shard's inbox end.
pub type MeshInbox = Receiver<MeshMsg>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_round_trip() {
        let k = ConnKey {
            slot: 123_456,
            generation: 0x00ab_cdef,
        };
        let r = route_of(5, k);
        assert_eq!(parse_route(r), (5, k));
        assert_ne!(
            route_of(
                0,
                ConnKey {
                    slot: 0,
                    generation: 0
                }
            ),
            0
        );
        assert!(parse_route(0).0 > 255, "route 0 names no shard");
    }

    #[test]
    fn directory_ignores_ascii_case_and_keeps_newer_sessions() {
        let mut d = Directory::default();
        let a = Location {
            shard: 0,
            conn: ConnKey {
                slot: 1,
                generation: 1,
            },
        };
        let b = Location {
            shard: 1,
            conn: ConnKey {
                slot: 2,
                generation: 1,
            },
        };
        d.put("00E0C5A1B2C3", a);
        assert_eq!(d.get("00e0c5a1b2c3"), Some(a));
        assert_eq!(d.get("00E0C5A1B2C3"), Some(a));
        d.put("00E0C5A1B2C3", b);
        d.remove("00E0C5A1B2C3", a);
        assert_eq!(d.get("00E0C5A1B2C3"), Some(b));
        d.remove("00e0c5a1b2c3", b);
        assert!(d.is_empty());
    }
}
