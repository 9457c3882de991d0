//! Registration: a device presents a key and its unit ID; the key is checked and consumed and
//! the device's credential recorded, in one transaction (see the module docs of
//! [`crate::registry`] for why that makes it crash-safe).

use std::net::IpAddr;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::audit::{self, NewAudit, action};
use super::key::{self, KeyKind};
use super::unit::check_unit_id;
use super::{Reason, Registry, RegistryError, UnixTime};
use crate::pki::Fingerprint;

/// The credential the gateway issued for the device (the caller creates it; the registry only
/// stores it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredential {
    /// SHA-256 of the device certificate (DER): what reconnects are looked up by.
    pub fingerprint: Fingerprint,
    /// The certificate's serial number (big-endian bytes).
    pub serial: Vec<u8>,
    /// The certificate's `notAfter`.
    pub not_after: UnixTime,
    /// SHA-256 of the device's public key (SubjectPublicKeyInfo DER) when the device generated
    /// its own key pair. Lets a device that never received its credential retry with the same
    /// key (see [`Registry::consume_key`]). `None` disables that retry.
    pub public_key_sha256: Option<[u8; 32]>,
}

/// One registration attempt.
#[derive(Debug, Clone)]
pub struct RegistrationRequest<'a> {
    /// The key as the user typed it (any case, with or without `-`).
    pub key: &'a str,
    /// The device's unit ID.
    pub unit_id: &'a str,
    /// Where the attempt came from (audit; the devices list shows it as the address).
    pub source: Option<IpAddr>,
    /// The credential to record if the key is accepted.
    pub credential: &'a DeviceCredential,
    /// The root certificate the device was shown (recorded for root exchanges).
    pub root: Option<Fingerprint>,
    /// The time of the attempt.
    pub now: UnixTime,
}

/// An accepted registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGrant {
    /// The key that was used.
    pub key_id: i64,
    /// Its kind.
    pub kind: KeyKind,
    /// The device row now holding the credential.
    pub device_id: i64,
    /// True when this was a retry of an earlier registration of the same unit with the same key
    /// and key pair: that registration's credential was replaced.
    pub retried: bool,
    /// Credentials of the same unit that this registration made void (the unit registered
    /// again): the gateway should disconnect them.
    pub superseded: Vec<Fingerprint>,
}

/// A refused registration. [`reason`](RegistrationRefusal::reason) is what goes to the device.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistrationRefusal {
    /// No key has this value.
    #[error("unknown key")]
    UnknownKey,
    /// A one-time key (plain or unit-bound) that was already used.
    #[error("key #{key_id} was already used (by {}, at {})",
        used_by.as_deref().unwrap_or("?"), used_at.map_or("?".to_owned(), crate::pki::cert::format_time))]
    KeyUsed {
        /// The key.
        key_id: i64,
        /// The unit that used it.
        used_by: Option<String>,
        /// When.
        used_at: Option<UnixTime>,
    },
    /// A revoked key.
    #[error("key #{key_id} is revoked")]
    KeyRevoked {
        /// The key.
        key_id: i64,
    },
    /// A unit-bound key presented by another unit.
    #[error("key #{key_id} is bound to another unit")]
    WrongUnit {
        /// The key.
        key_id: i64,
    },
    /// The unit ID breaks the rules.
    #[error("invalid unit ID: {0}")]
    InvalidUnitId(&'static str),
    /// The registry failed; nothing was consumed or recorded.
    #[error("registry failure: {0}")]
    Storage(Arc<RegistryError>),
}

impl RegistrationRefusal {
    /// The wire code for the device.
    pub fn reason(&self) -> Reason {
        match self {
            RegistrationRefusal::UnknownKey => Reason::KeyUnknown,
            RegistrationRefusal::KeyUsed { .. } => Reason::KeyUsed,
            RegistrationRefusal::KeyRevoked { .. } => Reason::KeyRevoked,
            RegistrationRefusal::WrongUnit { .. } => Reason::KeyWrongUnit,
            RegistrationRefusal::InvalidUnitId(_) => Reason::UnitIdInvalid,
            RegistrationRefusal::Storage(_) => Reason::InternalError,
        }
    }

    /// The key involved, when one was found.
    pub fn key_id(&self) -> Option<i64> {
        match self {
            RegistrationRefusal::KeyUsed { key_id, .. }
            | RegistrationRefusal::KeyRevoked { key_id }
            | RegistrationRefusal::WrongUnit { key_id } => Some(*key_id),
            _ => None,
        }
    }
}

impl From<RegistryError> for RegistrationRefusal {
    fn from(e: RegistryError) -> RegistrationRefusal {
        RegistrationRefusal::Storage(Arc::new(e))
    }
}

impl From<rusqlite::Error> for RegistrationRefusal {
    fn from(e: rusqlite::Error) -> RegistrationRefusal {
        RegistryError::Sqlite(e).into()
    }
}

/// The key row as registration needs it.
struct KeyRow {
    id: i64,
    kind: KeyKind,
    unit_id: Option<String>,
    revoked: bool,
    use_count: i64,
    last_used_by: Option<String>,
    last_used_at: Option<UnixTime>,
}

/// What [`decide`] found: the key may be used, as a fresh registration or as the retry of the
/// registration held by device row `retry_of`.
struct Decision {
    row: KeyRow,
    retry_of: Option<i64>,
}

/// The checks every attempt goes through, without writing. Outer `Err`: storage failure;
/// inner `Err`: a refusal.
fn decide(
    conn: &Connection,
    key_value: &str,
    unit: &str,
    public_key: Option<&[u8; 32]>,
) -> Result<Result<Decision, RegistrationRefusal>, RegistryError> {
    let normalized = key::normalize(key_value);
    if normalized.is_empty() || normalized.len() > key::MAX_KEY_LEN {
        return Ok(Err(RegistrationRefusal::UnknownKey));
    }
    let hash = key::key_hash(&normalized);
    let row = conn
        .prepare_cached(
            "SELECT id, kind, unit_id, revoked_at IS NOT NULL, use_count, last_used_by, last_used_at
             FROM keys WHERE key_hash = ?1",
        )?
        .query_row([&hash[..]], |r| {
            let kind: String = r.get(1)?;
            Ok(KeyRow {
                id: r.get(0)?,
                kind: KeyKind::parse(&kind).unwrap_or(KeyKind::OneTime),
                unit_id: r.get(2)?,
                revoked: r.get(3)?,
                use_count: r.get(4)?,
                last_used_by: r.get(5)?,
                last_used_at: r.get(6)?,
            })
        })
        .optional()?;
    let Some(row) = row else {
        return Ok(Err(RegistrationRefusal::UnknownKey));
    };
    if row.revoked {
        return Ok(Err(RegistrationRefusal::KeyRevoked { key_id: row.id }));
    }
    if row.kind == KeyKind::UnitBound
        && !row
            .unit_id
            .as_deref()
            .is_some_and(|bound| bound.eq_ignore_ascii_case(unit))
    {
        return Ok(Err(RegistrationRefusal::WrongUnit { key_id: row.id }));
    }
    if !(row.kind.is_single_use() && row.use_count > 0) {
        return Ok(Ok(Decision {
            row,
            retry_of: None,
        }));
    }
    // A spent single-use key: refused, unless this is the device that spent it, retrying.
    let same_unit = row
        .last_used_by
        .as_deref()
        .is_some_and(|u| u.eq_ignore_ascii_case(unit));
    let retry_of = match public_key {
        Some(pk) if same_unit => conn
            .prepare_cached(
                "SELECT id FROM devices WHERE key_id = ?1 AND unit_id = ?2 AND spki_sha256 = ?3
                 AND revoked_at IS NULL ORDER BY id DESC LIMIT 1",
            )?
            .query_row(params![row.id, unit, &pk[..]], |r| r.get::<_, i64>(0))
            .optional()?,
        _ => None,
    };
    Ok(match retry_of {
        Some(id) => Ok(Decision {
            row,
            retry_of: Some(id),
        }),
        None => Err(RegistrationRefusal::KeyUsed {
            key_id: row.id,
            used_by: row.last_used_by,
            used_at: row.last_used_at,
        }),
    })
}

/// Inside the caller's transaction: the whole registration. `Err` = storage failure (the
/// caller rolls back); `Ok(Err(_))` = a refusal, already audited.
fn register(
    conn: &Connection,
    req: &RegistrationRequest<'_>,
) -> Result<Result<KeyGrant, RegistrationRefusal>, RegistryError> {
    let source = req.source.map(|a| a.to_string());
    let refuse = |refusal: RegistrationRefusal, unit: Option<&str>| {
        audit::append(
            conn,
            &NewAudit {
                at: req.now,
                actor: "device",
                action: action::REGISTER,
                outcome: refusal.reason().as_str(),
                unit_id: unit,
                address: source.clone(),
                key_id: refusal.key_id(),
                detail: match &refusal {
                    RegistrationRefusal::InvalidUnitId(why) => {
                        Some(format!("{why}: {:?}", audit::truncate(req.unit_id, 64)))
                    }
                    _ => None,
                },
                ..NewAudit::default()
            },
        )?;
        Ok(Err(refusal))
    };

    let unit = match check_unit_id(req.unit_id) {
        Ok(u) => u,
        Err(why) => return refuse(RegistrationRefusal::InvalidUnitId(why), None),
    };
    let cred = req.credential;
    let Decision { row, retry_of } =
        match decide(conn, req.key, unit, cred.public_key_sha256.as_ref())? {
            Ok(d) => d,
            Err(refusal) => return refuse(refusal, Some(unit)),
        };

    let root = req.root.map(|f| f.0);
    let (device_id, superseded) = if let Some(device_id) = retry_of {
        // Same unit, same key, same key pair: replace the undelivered credential in place.
        conn.prepare_cached(
            "UPDATE devices SET fingerprint = ?1, serial = ?2, not_after = ?3, registered_at = ?4,
             registered_from = ?5, last_seen = ?4, address = ?5, root_fingerprint = ?6
             WHERE id = ?7",
        )?
        .execute(params![
            &cred.fingerprint.0[..],
            cred.serial,
            cred.not_after,
            req.now,
            source,
            root.as_ref().map(|r| &r[..]),
            device_id
        ])?;
        (device_id, Vec::new())
    } else {
        let updated = conn
            .prepare_cached(
                "UPDATE keys SET use_count = use_count + 1,
                 first_used_at = coalesce(first_used_at, ?1), last_used_at = ?1, last_used_by = ?2
                 WHERE id = ?3 AND revoked_at IS NULL AND (kind = 'mass' OR use_count = 0)",
            )?
            .execute(params![req.now, unit, row.id])?;
        if updated != 1 {
            // Unreachable under BEGIN IMMEDIATE (nobody else can write between the check and
            // this update); kept so a future change cannot consume a key twice silently.
            return Err(RegistryError::Inconsistent(format!(
                "key #{} changed during registration",
                row.id
            )));
        }
        let superseded = supersede(conn, unit, req.now)?;
        conn.prepare_cached(
            "INSERT INTO devices (unit_id, fingerprint, serial, not_after, key_id, registered_at,
             registered_from, last_seen, address, root_fingerprint, spki_sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            unit,
            &cred.fingerprint.0[..],
            cred.serial,
            cred.not_after,
            row.id,
            req.now,
            source,
            root.as_ref().map(|r| &r[..]),
            cred.public_key_sha256.as_ref().map(|p| &p[..]),
        ])?;
        (conn.last_insert_rowid(), superseded)
    };
    audit::append(
        conn,
        &NewAudit {
            at: req.now,
            actor: "device",
            action: action::REGISTER,
            outcome: Reason::Granted.as_str(),
            unit_id: Some(unit),
            address: source.clone(),
            key_id: Some(row.id),
            device_id: Some(device_id),
            detail: retry_of.map(|_| "retry: credential replaced".to_owned()),
        },
    )?;
    Ok(Ok(KeyGrant {
        key_id: row.id,
        kind: row.kind,
        device_id,
        retried: retry_of.is_some(),
        superseded,
    }))
}

/// Marks the unit's active credentials as superseded; returns their fingerprints.
fn supersede(conn: &Connection, unit: &str, now: UnixTime) -> rusqlite::Result<Vec<Fingerprint>> {
    let mut stmt = conn.prepare_cached(
        "UPDATE devices SET revoked_at = ?1, revoked_reason = 'superseded'
         WHERE unit_id = ?2 AND revoked_at IS NULL RETURNING id, fingerprint",
    )?;
    let rows = stmt
        .query_map(params![now, unit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, fp) in rows {
        audit::append(
            conn,
            &NewAudit {
                at: now,
                actor: "device",
                action: action::DEVICE_REVOKE,
                outcome: "ok",
                unit_id: Some(unit),
                device_id: Some(id),
                detail: Some("superseded".into()),
                ..NewAudit::default()
            },
        )?;
        if let Ok(bytes) = <[u8; 32]>::try_from(fp.as_slice()) {
            out.push(Fingerprint(bytes));
        }
    }
    Ok(out)
}

impl Registry {
    /// Registers a device: checks the key, consumes it and records the credential, all in one
    /// `BEGIN IMMEDIATE` transaction with a durable commit.
    ///
    /// * one-time key: granted once; every later attempt is `key_used` — even when many
    ///   threads or processes race (the write lock is taken before the key is read);
    /// * unit-bound key: only for its unit (ASCII case ignored), once;
    /// * mass key: again and again;
    /// * a revoked key: `key_revoked`; an unknown one: `key_unknown`.
    ///
    /// Every outcome is written to the audit log. A unit that registers again voids its older
    /// credentials ([`KeyGrant::superseded`]).
    ///
    /// **Retry.** A spent single-use key is granted again only to the same unit with the same
    /// device key pair ([`DeviceCredential::public_key_sha256`]) as the registration that spent
    /// it, and replaces that registration's credential: that is the device that never received
    /// its credential, not a second device.
    ///
    /// Send the credential to the device only after this returns `Ok`.
    pub fn consume_key(
        &mut self,
        req: &RegistrationRequest<'_>,
    ) -> Result<KeyGrant, RegistrationRefusal> {
        self.consume_keys(std::slice::from_ref(req))
            .pop()
            .unwrap_or_else(|| Err(RegistrationRefusal::UnknownKey))
    }

    /// [`consume_key`](Registry::consume_key) for several attempts in one transaction (one
    /// disk sync for the batch: the control thread can drain its inbox this way). Attempts are
    /// decided in order, each exactly as if alone (a storage failure of one attempt rolls back
    /// only that attempt); the results are in the same order. If the final commit fails, every
    /// attempt is refused with [`Reason::InternalError`] and nothing was recorded.
    pub fn consume_keys(
        &mut self,
        reqs: &[RegistrationRequest<'_>],
    ) -> Vec<Result<KeyGrant, RegistrationRefusal>> {
        let fail_all = |e: RegistryError| {
            let e = Arc::new(e);
            reqs.iter()
                .map(|_| Err(RegistrationRefusal::Storage(Arc::clone(&e))))
                .collect()
        };
        let mut tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => return fail_all(e.into()),
        };
        let mut results = Vec::with_capacity(reqs.len());
        for req in reqs {
            let outcome = (|| {
                let sp = tx.savepoint()?;
                let out = register(&sp, req)?;
                sp.commit()?;
                Ok::<_, RegistryError>(out)
            })();
            results.push(outcome.unwrap_or_else(|e| Err(e.into())));
        }
        match tx.commit() {
            Ok(()) => results,
            Err(e) => fail_all(e.into()),
        }
    }

    /// A read-only pre-check: would `key` be accepted for `unit_id` (and this device key pair,
    /// for the retry rule) right now? Lets the gateway refuse a wrong key before it spends work
    /// on a certificate. Not binding: only [`consume_key`](Registry::consume_key) decides (the
    /// key may be taken in between). Nothing is written, not even the audit row.
    pub fn check_key(
        &self,
        key: &str,
        unit_id: &str,
        public_key_sha256: Option<&[u8; 32]>,
    ) -> Result<KeyKind, RegistrationRefusal> {
        let unit = check_unit_id(unit_id).map_err(RegistrationRefusal::InvalidUnitId)?;
        decide(&self.conn, key, unit, public_key_sha256)?.map(|d| d.row.kind)
    }
}
