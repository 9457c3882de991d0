//! The control plane's side of device onboarding: what shards ask the registrar, and what it
//! answers. The registrar ([`registrar`]) is a thread that owns the SQLite registry, the device
//! CA and the failure limiter; shards never touch any of them, so a slow disk sync never stalls
//! an event loop.
//!
//! ```text
//! shard ──Job (mpsc)──▶ registrar ──Command + eventfd wake──▶ shard
//! ```
//!
//! * A registration ([`Job::Register`]) is decided in a batch: every job waiting in the inbox
//!   (up to `registration.batch_max`) is checked, certified, and committed in one transaction
//!   with one disk sync, then each shard gets its answers.
//! * Authenticated sessions are admitted by the shard itself (the TLS handshake checked the
//!   certificate; the shard checks its copy of the revocation list). The registrar hears about
//!   each session afterwards ([`Job::SessionUp`]): it records last-seen in batches, keeps the
//!   live-session table for `fleetgate devices list`, and closes a session whose credential the
//!   registry does not know.
//! * Revocations (`fleetgate devices remove`, a unit registering again) reach every shard as a
//!   new [`Revocations`] list plus the sessions to close, within a second of the change (the
//!   registrar polls SQLite's `data_version`; the admin socket makes it immediate).

pub mod registrar;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::driver::ConnKey;
use crate::pki::Fingerprint;
use crate::proto::device::Register;
use crate::registry::{Reason, UnixTime};

/// The credentials that must not open a session (revoked or superseded, not yet expired).
/// Shards hold it behind an `Arc`; the registrar replaces it whole when it changes.
#[derive(Debug, Default, Clone)]
pub struct Revocations {
    /// Fingerprint → superseded (true) or removed (false).
    set: HashMap<[u8; 32], bool>,
}

impl Revocations {
    /// Whether `fingerprint` is revoked.
    pub fn contains(&self, fingerprint: &[u8; 32]) -> bool {
        self.set.contains_key(fingerprint)
    }

    /// `Some(true)` when superseded by a newer registration, `Some(false)` when removed,
    /// `None` when not revoked.
    pub fn reason(&self, fingerprint: &[u8; 32]) -> Option<bool> {
        self.set.get(fingerprint).copied()
    }

    /// Number of revoked credentials listed.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Adds one; true if it was new.
    pub fn insert(&mut self, fingerprint: [u8; 32], superseded: bool) -> bool {
        self.set.insert(fingerprint, superseded).is_none()
    }
}

/// A session a shard must close: the credential was revoked while the device was connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kick {
    /// The credential.
    pub fingerprint: [u8; 32],
    /// What to tell the device.
    pub reason: Reason,
    /// Tell the agent to forget its gateway settings (the operator removed the device).
    pub drop_settings: bool,
}

/// The registrar's answer to one registration.
#[derive(Debug, Clone)]
pub enum RegisterOutcome {
    /// Accepted: send `registered` with this certificate.
    Granted {
        /// The unit ID.
        unit_id: String,
        /// The device certificate (PEM).
        certificate: String,
        /// The device CA (PEM).
        device_ca: Arc<str>,
        /// The device asked to continue in session mode: the new credential's fingerprint.
        session: Option<[u8; 32]>,
    },
    /// Refused: send `refused`.
    Refused {
        /// The code.
        reason: Reason,
        /// The retry hint (rate limited).
        retry_after_ms: Option<u64>,
    },
}

/// What shards (and the admin socket) ask the registrar.
#[derive(Debug)]
pub enum Job {
    /// A device in register mode sent `register`.
    Register {
        /// The shard to answer.
        shard: usize,
        /// The connection to answer.
        conn: ConnKey,
        /// The peer address.
        source: Option<IpAddr>,
        /// The message.
        msg: Box<Register>,
    },
    /// A device session was admitted by a shard.
    SessionUp {
        /// The shard holding it.
        shard: usize,
        /// The connection.
        conn: ConnKey,
        /// The credential.
        fingerprint: Fingerprint,
        /// The unit ID (certificate CN).
        unit_id: Box<str>,
        /// The peer address.
        source: Option<IpAddr>,
        /// When.
        at: UnixTime,
    },
    /// A device session ended.
    SessionDown {
        /// The credential.
        fingerprint: Fingerprint,
        /// The unit ID.
        unit_id: Box<str>,
        /// The shard that held it.
        shard: usize,
        /// The connection.
        conn: ConnKey,
    },
    /// A request from a management connection to the gateway itself (§6.4).
    Gateway {
        /// The shard holding the management connection.
        shard: usize,
        /// The management connection.
        conn: ConnKey,
        /// The request id.
        channel: u32,
        /// The request body (JSON).
        body: Vec<u8>,
    },
    /// A device in register mode sent a malformed message (counted as a failed attempt of
    /// its source, audited).
    BadRegistration {
        /// The peer address.
        source: Option<IpAddr>,
    },
    /// A session was refused by a shard (audit and metrics).
    SessionRefused {
        /// The unit ID (certificate CN).
        unit_id: Box<str>,
        /// The peer address.
        source: Option<IpAddr>,
        /// Why.
        reason: Reason,
    },
    /// A device answered a request the gateway itself sent (route [`GATEWAY_ROUTE`]).
    ///
    /// [`GATEWAY_ROUTE`]: crate::relay::GATEWAY_ROUTE
    DeviceAnswer {
        /// The request id.
        channel: u32,
        /// The response body (JSON).
        body: Vec<u8>,
    },
    /// Re-read the revocations now (the admin socket, after `devices remove`).
    Refresh,
    /// The live sessions, for `fleetgate devices list`.
    Sessions(std::sync::mpsc::Sender<Vec<LiveSession>>),
}

/// One connected device, as the registrar knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveSession {
    /// The unit ID.
    pub unit_id: String,
    /// The credential's fingerprint (hex).
    pub fingerprint: String,
    /// Connected since (Unix seconds).
    pub since: UnixTime,
    /// The peer address.
    pub address: Option<String>,
    /// The shard holding the connection.
    pub shard: usize,
    /// The connection (internal).
    #[serde(skip)]
    pub conn: Option<ConnKey>,
}
