//! Registered devices: reconnect authentication, last-seen, listing and removal.

use std::net::IpAddr;
use std::sync::Arc;

use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use super::audit::{self, NewAudit, action};
use super::unit::check_unit_id;
use super::{Reason, Registry, RegistryError, UnixTime};
use crate::pki::Fingerprint;

/// One issued device credential (a row of `devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Row ID.
    pub id: i64,
    /// The unit ID.
    pub unit_id: String,
    /// SHA-256 of the device certificate.
    pub fingerprint: Fingerprint,
    /// Certificate serial number.
    pub serial: Vec<u8>,
    /// Certificate `notAfter`.
    pub not_after: UnixTime,
    /// The key it registered with (None once that key was deleted).
    pub key_id: Option<i64>,
    /// When it registered.
    pub registered_at: UnixTime,
    /// The source address of the registration.
    pub registered_from: Option<String>,
    /// When it was last seen (registration or a reconnect recorded by
    /// [`Registry::touch_last_seen`]).
    pub last_seen: Option<UnixTime>,
    /// The address it was last seen from.
    pub address: Option<String>,
    /// When it was revoked.
    pub revoked_at: Option<UnixTime>,
    /// `removed` (by the operator) or `superseded` (the unit registered again).
    pub revoked_reason: Option<String>,
    /// The root certificate the device holds, when known.
    pub root_fingerprint: Option<Fingerprint>,
}

/// Where a device credential stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Valid.
    Active,
    /// Removed by the operator.
    Revoked,
    /// Replaced by a newer registration of the same unit.
    Superseded,
    /// Past its `not_after`.
    Expired,
}

impl DeviceState {
    /// `active`, `revoked`, `superseded`, `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Active => "active",
            DeviceState::Revoked => "revoked",
            DeviceState::Superseded => "superseded",
            DeviceState::Expired => "expired",
        }
    }
}

impl Device {
    /// Where the credential stands at `now`.
    pub fn state(&self, now: UnixTime) -> DeviceState {
        match (self.revoked_at, self.revoked_reason.as_deref()) {
            (Some(_), Some("superseded")) => DeviceState::Superseded,
            (Some(_), _) => DeviceState::Revoked,
            (None, _) if self.not_after < now => DeviceState::Expired,
            (None, _) => DeviceState::Active,
        }
    }
}

/// A reconnect refused by [`Registry::authenticate`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthRefusal {
    /// No device holds this credential.
    #[error("unknown device credential")]
    Unknown,
    /// The device was removed (or superseded, see [`AuthRefusal::reason`]).
    #[error("device {} ({}) is {}", .0.unit_id, .0.fingerprint, .0.revoked_reason.as_deref().unwrap_or("revoked"))]
    Revoked(Box<Device>),
    /// The credential is past its `not_after`.
    #[error("the credential of device {} has expired", .0.unit_id)]
    Expired(Box<Device>),
    /// The registry failed.
    #[error("registry failure: {0}")]
    Storage(Arc<RegistryError>),
}

impl AuthRefusal {
    /// The wire code for the device.
    pub fn reason(&self) -> Reason {
        match self {
            AuthRefusal::Unknown => Reason::CredentialUnknown,
            AuthRefusal::Revoked(d) if d.revoked_reason.as_deref() == Some("superseded") => {
                Reason::CredentialSuperseded
            }
            AuthRefusal::Revoked(_) => Reason::CredentialRevoked,
            AuthRefusal::Expired(_) => Reason::CredentialExpired,
            AuthRefusal::Storage(_) => Reason::InternalError,
        }
    }
}

/// One entry for [`Registry::touch_last_seen_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touch {
    /// The device credential.
    pub fingerprint: Fingerprint,
    /// Where it connected from.
    pub address: Option<IpAddr>,
    /// When.
    pub at: UnixTime,
}

const DEVICE_COLUMNS: &str = "id, unit_id, fingerprint, serial, not_after, key_id, registered_at, \
     registered_from, last_seen, address, revoked_at, revoked_reason, root_fingerprint";

fn fingerprint_of(bytes: Vec<u8>, col: usize) -> rusqlite::Result<Fingerprint> {
    <[u8; 32]>::try_from(bytes.as_slice())
        .map(Fingerprint)
        .map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(
                col,
                rusqlite::types::Type::Blob,
                "fingerprint is not 32 bytes".into(),
            )
        })
}

fn device(r: &Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        id: r.get(0)?,
        unit_id: r.get(1)?,
        fingerprint: fingerprint_of(r.get(2)?, 2)?,
        serial: r.get(3)?,
        not_after: r.get(4)?,
        key_id: r.get(5)?,
        registered_at: r.get(6)?,
        registered_from: r.get(7)?,
        last_seen: r.get(8)?,
        address: r.get(9)?,
        revoked_at: r.get(10)?,
        revoked_reason: r.get(11)?,
        root_fingerprint: r
            .get::<_, Option<Vec<u8>>>(12)?
            .map(|b| fingerprint_of(b, 12))
            .transpose()?,
    })
}

impl Registry {
    /// The device holding the credential with this fingerprint, in any state. One indexed
    /// lookup (`devices.fingerprint` is UNIQUE).
    pub fn device_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
    ) -> Result<Option<Device>, RegistryError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE fingerprint = ?1"
            ))?
            .query_row([&fingerprint.0[..]], device)
            .optional()?)
    }

    /// Reconnect check: the device holding this credential if it is active at `now`, else why
    /// not (each refusal has a [`Reason`]). Read-only.
    pub fn authenticate(
        &self,
        fingerprint: &Fingerprint,
        now: UnixTime,
    ) -> Result<Device, AuthRefusal> {
        let found = self
            .device_by_fingerprint(fingerprint)
            .map_err(|e| AuthRefusal::Storage(Arc::new(e)))?;
        let Some(d) = found else {
            return Err(AuthRefusal::Unknown);
        };
        match d.state(now) {
            DeviceState::Active => Ok(d),
            DeviceState::Expired => Err(AuthRefusal::Expired(Box::new(d))),
            DeviceState::Revoked | DeviceState::Superseded => {
                Err(AuthRefusal::Revoked(Box::new(d)))
            }
        }
    }

    /// Every device credential (all states), ordered by unit ID then registration.
    pub fn list_devices(&self) -> Result<Vec<Device>, RegistryError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY unit_id, id"
        ))?;
        let rows = stmt.query_map([], device)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The credentials of one unit (all states), oldest first.
    pub fn devices_of_unit(&self, unit_id: &str) -> Result<Vec<Device>, RegistryError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE unit_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([unit_id.trim()], device)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes a unit: revokes every active credential it holds (reason `removed`). Returns the
    /// credentials revoked now — the gateway disconnects them; an empty list means the unit was
    /// already removed. [`RegistryError::DeviceNotFound`] if the unit never registered.
    pub fn revoke_device(
        &mut self,
        unit_id: &str,
        now: UnixTime,
    ) -> Result<Vec<Device>, RegistryError> {
        let unit = check_unit_id(unit_id).map_err(|reason| RegistryError::InvalidUnitId {
            unit: unit_id.to_owned(),
            reason,
        })?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let known: i64 = tx.query_row(
            "SELECT count(*) FROM devices WHERE unit_id = ?1",
            [unit],
            |r| r.get(0),
        )?;
        if known == 0 {
            return Err(RegistryError::DeviceNotFound(unit.to_owned()));
        }
        let revoked = tx
            .prepare(&format!(
                "UPDATE devices SET revoked_at = ?1, revoked_reason = 'removed'
                 WHERE unit_id = ?2 AND revoked_at IS NULL RETURNING {DEVICE_COLUMNS}"
            ))?
            .query_map(params![now, unit], device)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for d in &revoked {
            audit::append(
                &tx,
                &NewAudit {
                    at: now,
                    actor: &self.actor,
                    action: action::DEVICE_REVOKE,
                    outcome: "ok",
                    unit_id: Some(&d.unit_id),
                    device_id: Some(d.id),
                    key_id: d.key_id,
                    detail: Some("removed".into()),
                    ..NewAudit::default()
                },
            )?;
        }
        tx.commit()?;
        Ok(revoked)
    }

    /// Records that an active device connected: `last_seen = at`, `address`. Returns false if
    /// no active device holds the credential.
    pub fn touch_last_seen(
        &mut self,
        fingerprint: &Fingerprint,
        address: Option<IpAddr>,
        at: UnixTime,
    ) -> Result<bool, RegistryError> {
        Ok(self.touch_last_seen_many(&[Touch {
            fingerprint: *fingerprint,
            address,
            at,
        }])? == 1)
    }

    /// [`touch_last_seen`](Registry::touch_last_seen) for many devices in one transaction
    /// (a reconnect storm: batch them). Runs with `synchronous = NORMAL`: a power cut may lose
    /// the newest last-seen times, which is harmless, and the storm does not wait for a disk
    /// sync per device. Returns how many devices were updated.
    pub fn touch_last_seen_many(&mut self, touches: &[Touch]) -> Result<usize, RegistryError> {
        if touches.is_empty() {
            return Ok(0);
        }
        self.conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut n = 0;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE devices SET last_seen = max(coalesce(last_seen, ?1), ?1), address = ?2
                     WHERE fingerprint = ?3 AND revoked_at IS NULL",
                )?;
                for t in touches {
                    n += stmt.execute(params![
                        t.at,
                        t.address.map(|a| a.to_string()),
                        &t.fingerprint.0[..]
                    ])?;
                }
            }
            tx.commit()?;
            Ok::<_, RegistryError>(n)
        })();
        // Back to FULL whatever happened: registration must never run with NORMAL.
        let restored = self.conn.execute_batch("PRAGMA synchronous = FULL");
        let n = result?;
        restored?;
        Ok(n)
    }

    /// Records the root certificate a device now holds (after a root exchange hand-over).
    /// Returns false if no device holds the credential.
    pub fn set_device_root(
        &mut self,
        fingerprint: &Fingerprint,
        root: &Fingerprint,
    ) -> Result<bool, RegistryError> {
        Ok(self.conn.execute(
            "UPDATE devices SET root_fingerprint = ?1 WHERE fingerprint = ?2",
            params![&root.0[..], &fingerprint.0[..]],
        )? == 1)
    }

    /// How many active devices are not known to hold `root` (never acknowledged it, or
    /// registered before the registry recorded roots).
    pub fn count_devices_lacking_root(
        &self,
        root: &Fingerprint,
        now: UnixTime,
    ) -> Result<u64, RegistryError> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM devices WHERE revoked_at IS NULL AND not_after >= ?1
             AND (root_fingerprint IS NULL OR root_fingerprint <> ?2)",
            params![now, &root.0[..]],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// Every revoked credential (removed or superseded) that is not yet past its `not_after`:
    /// the gateway's in-memory revocation list. (An expired certificate fails the TLS
    /// handshake anyway, so it need not be listed.) One scan of `devices`, plus the revoked
    /// management client certificates (`fleetgate mgmt revoke`): reason `management`, the
    /// management client's name in the unit column.
    pub fn revoked_credentials(
        &self,
        now: UnixTime,
    ) -> Result<Vec<(Fingerprint, String, String)>, RegistryError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT fingerprint, unit_id, coalesce(revoked_reason, 'removed') FROM devices
             WHERE revoked_at IS NOT NULL AND not_after >= ?1
             UNION ALL
             SELECT fingerprint, name, 'management' FROM management_clients
             WHERE revoked_at IS NOT NULL AND not_after >= ?1",
        )?;
        let rows = stmt
            .query_map([now], |r| {
                Ok((fingerprint_of(r.get(0)?, 0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// SQLite's `PRAGMA data_version`: changes whenever *another* connection (a CLI command)
    /// commits to the database. Cheap; the gateway polls it to notice removals.
    pub fn data_version(&self) -> Result<i64, RegistryError> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }
}
