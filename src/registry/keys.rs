//! Key administration: create, list, revoke, delete.

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::audit::{self, NewAudit, action};
use super::key::{self, KeyKind, KeyRef};
use super::unit::check_unit_id;
use super::{MAX_KEYS_PER_CREATE, Registry, RegistryError, UnixTime};

/// A key just created: the only time its full value is available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The key's ID.
    pub id: i64,
    /// Its kind.
    pub kind: KeyKind,
    /// The full value to hand out (random keys: `XXXX-XXXX-XXXX-XXXX-XXXX`; custom mass keys:
    /// the value as given).
    pub value: String,
    /// The unit a unit-bound key is for.
    pub unit_id: Option<String>,
}

/// A key as `keys list` shows it (never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's ID.
    pub id: i64,
    /// Its kind.
    pub kind: KeyKind,
    /// The first symbols of the value (`K7Q2-…`).
    pub prefix: String,
    /// The unit a unit-bound key is for.
    pub unit_id: Option<String>,
    /// When it was created.
    pub created_at: UnixTime,
    /// When it was revoked.
    pub revoked_at: Option<UnixTime>,
    /// How many registrations it granted.
    pub use_count: u64,
    /// The first registration.
    pub first_used_at: Option<UnixTime>,
    /// The last registration.
    pub last_used_at: Option<UnixTime>,
    /// The unit of the last registration (for a one-time key: *the* unit that used it).
    pub last_used_by: Option<String>,
}

/// Where a key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Never used, not revoked.
    Unused,
    /// Used at least once (a one-time key is then spent; a mass key stays usable).
    Used,
    /// Revoked by the operator.
    Revoked,
}

impl KeyState {
    /// `unused`, `used`, `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Unused => "unused",
            KeyState::Used => "used",
            KeyState::Revoked => "revoked",
        }
    }
}

impl KeyInfo {
    /// Where the key stands.
    pub fn state(&self) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if self.use_count > 0 {
            KeyState::Used
        } else {
            KeyState::Unused
        }
    }

    /// True when a device could still register with it.
    pub fn is_usable(&self) -> bool {
        match self.state() {
            KeyState::Unused => true,
            KeyState::Used => self.kind == KeyKind::Mass,
            KeyState::Revoked => false,
        }
    }
}

/// Which keys [`Registry::list_keys`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyFilter {
    /// Every key.
    #[default]
    All,
    /// Never used and not revoked.
    Unused,
    /// Used at least once (including revoked ones that were used).
    Used,
    /// Revoked.
    Revoked,
}

const KEY_COLUMNS: &str = "id, kind, prefix, unit_id, created_at, revoked_at, use_count, \
                           first_used_at, last_used_at, last_used_by";

fn key_info(r: &Row<'_>) -> rusqlite::Result<KeyInfo> {
    let kind: String = r.get(1)?;
    Ok(KeyInfo {
        id: r.get(0)?,
        kind: KeyKind::parse(&kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Text,
                format!("unknown key kind {kind:?}").into(),
            )
        })?,
        prefix: r.get(2)?,
        unit_id: r.get(3)?,
        created_at: r.get(4)?,
        revoked_at: r.get(5)?,
        use_count: r.get::<_, i64>(6)?.max(0) as u64,
        first_used_at: r.get(7)?,
        last_used_at: r.get(8)?,
        last_used_by: r.get(9)?,
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Inserts one key; `Ok(None)` when its hash already exists.
fn insert_key(
    conn: &Connection,
    actor: &str,
    kind: KeyKind,
    normalized: &str,
    unit_id: Option<&str>,
    now: UnixTime,
) -> rusqlite::Result<Option<i64>> {
    let hash = key::key_hash(normalized);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO keys (kind, key_hash, prefix, unit_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            kind.as_str(),
            &hash[..],
            key::display_prefix(normalized),
            unit_id,
            now
        ]);
    match inserted {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => return Ok(None),
        Err(e) => return Err(e),
    }
    let id = conn.last_insert_rowid();
    audit::append(
        conn,
        &NewAudit {
            at: now,
            actor,
            action: action::KEY_CREATE,
            outcome: "ok",
            unit_id,
            key_id: Some(id),
            detail: Some(kind.as_str().to_owned()),
            ..NewAudit::default()
        },
    )?;
    Ok(Some(id))
}

/// Inserts a fresh random key, drawing again on the (2^-100) chance of a collision.
fn insert_random(
    conn: &Connection,
    actor: &str,
    kind: KeyKind,
    unit_id: Option<&str>,
    now: UnixTime,
) -> rusqlite::Result<NewKey> {
    loop {
        let value = key::generate();
        if let Some(id) = insert_key(conn, actor, kind, &key::normalize(&value), unit_id, now)? {
            return Ok(NewKey {
                id,
                kind,
                value,
                unit_id: unit_id.map(str::to_owned),
            });
        }
    }
}

impl Registry {
    /// Creates `n` one-time keys (any device, once each), in one transaction.
    pub fn create_one_time_keys(
        &mut self,
        n: usize,
        now: UnixTime,
    ) -> Result<Vec<NewKey>, RegistryError> {
        if n == 0 || n > MAX_KEYS_PER_CREATE {
            return Err(RegistryError::BadCount(n));
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let keys = (0..n)
            .map(|_| insert_random(&tx, &self.actor, KeyKind::OneTime, None, now))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tx.commit()?;
        Ok(keys)
    }

    /// Creates one unit-bound key per unit ID (only that unit, once), in the order given, in one
    /// transaction. Every unit ID is checked first; with any invalid one nothing is created.
    pub fn create_unit_keys<S: AsRef<str>>(
        &mut self,
        units: &[S],
        now: UnixTime,
    ) -> Result<Vec<NewKey>, RegistryError> {
        if units.is_empty() || units.len() > MAX_KEYS_PER_CREATE {
            return Err(RegistryError::BadCount(units.len()));
        }
        let checked = units
            .iter()
            .map(|u| {
                check_unit_id(u.as_ref()).map_err(|reason| RegistryError::InvalidUnitId {
                    unit: u.as_ref().to_owned(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let keys = checked
            .into_iter()
            .map(|u| insert_random(&tx, &self.actor, KeyKind::UnitBound, Some(u), now))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tx.commit()?;
        Ok(keys)
    }

    /// Creates a mass-deployment key (any device, reusable): random, or `value` when given
    /// (rules: [`key::check_custom_value`]). A value that normalises to an existing key's value
    /// is refused with [`RegistryError::KeyValueInUse`].
    pub fn create_mass_key(
        &mut self,
        value: Option<&str>,
        now: UnixTime,
    ) -> Result<NewKey, RegistryError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let created = match value {
            None => insert_random(&tx, &self.actor, KeyKind::Mass, None, now)?,
            Some(v) => {
                let normalized =
                    key::check_custom_value(v).map_err(RegistryError::InvalidKeyValue)?;
                let id = insert_key(&tx, &self.actor, KeyKind::Mass, &normalized, None, now)?
                    .ok_or(RegistryError::KeyValueInUse)?;
                NewKey {
                    id,
                    kind: KeyKind::Mass,
                    value: v.trim().to_owned(),
                    unit_id: None,
                }
            }
        };
        tx.commit()?;
        Ok(created)
    }

    /// Keys matching `filter`, oldest first.
    pub fn list_keys(&self, filter: KeyFilter) -> Result<Vec<KeyInfo>, RegistryError> {
        let condition = match filter {
            KeyFilter::All => "1",
            KeyFilter::Unused => "revoked_at IS NULL AND use_count = 0",
            KeyFilter::Used => "use_count > 0",
            KeyFilter::Revoked => "revoked_at IS NOT NULL",
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE {condition} ORDER BY id"
        ))?;
        let rows = stmt.query_map([], key_info)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The key named by `key_ref`, if any.
    pub fn find_key(&self, key_ref: &KeyRef) -> Result<Option<KeyInfo>, RegistryError> {
        Ok(find(&self.conn, key_ref)?)
    }

    /// Revokes a key: no device can register with it any more. Devices already registered
    /// with it stay registered (remove them with [`Registry::revoke_device`]). Revoking a
    /// revoked key changes nothing. Returns the key as it is now.
    pub fn revoke_key(
        &mut self,
        key_ref: &KeyRef,
        now: UnixTime,
    ) -> Result<KeyInfo, RegistryError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let info =
            find(&tx, key_ref)?.ok_or_else(|| RegistryError::KeyNotFound(key_ref.to_string()))?;
        if info.revoked_at.is_none() {
            tx.execute(
                "UPDATE keys SET revoked_at = ?1 WHERE id = ?2",
                params![now, info.id],
            )?;
            audit::append(
                &tx,
                &NewAudit {
                    at: now,
                    actor: &self.actor,
                    action: action::KEY_REVOKE,
                    outcome: "ok",
                    key_id: Some(info.id),
                    unit_id: info.unit_id.as_deref(),
                    ..NewAudit::default()
                },
            )?;
        }
        let after = find(&tx, &KeyRef::Id(info.id))?.unwrap_or(info);
        tx.commit()?;
        Ok(after)
    }

    /// Deletes a key. Devices registered with it stay registered (their `key_id` becomes
    /// empty); the audit log keeps the key's ID. Returns the key as it was.
    pub fn delete_key(
        &mut self,
        key_ref: &KeyRef,
        now: UnixTime,
    ) -> Result<KeyInfo, RegistryError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let info =
            find(&tx, key_ref)?.ok_or_else(|| RegistryError::KeyNotFound(key_ref.to_string()))?;
        tx.execute("DELETE FROM keys WHERE id = ?1", [info.id])?;
        audit::append(
            &tx,
            &NewAudit {
                at: now,
                actor: &self.actor,
                action: action::KEY_DELETE,
                outcome: "ok",
                key_id: Some(info.id),
                unit_id: info.unit_id.as_deref(),
                detail: Some(format!("{} {}", info.kind, info.prefix)),
                ..NewAudit::default()
            },
        )?;
        tx.commit()?;
        Ok(info)
    }
}

fn find(conn: &Connection, key_ref: &KeyRef) -> rusqlite::Result<Option<KeyInfo>> {
    match key_ref {
        KeyRef::Id(id) => conn
            .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"))?
            .query_row([id], key_info)
            .optional(),
        KeyRef::Value(v) => {
            let n = key::normalize(v);
            if n.is_empty() || n.len() > key::MAX_KEY_LEN {
                return Ok(None);
            }
            let hash = key::key_hash(&n);
            conn.prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM keys WHERE key_hash = ?1"
            ))?
            .query_row([&hash[..]], key_info)
            .optional()
        }
    }
}
