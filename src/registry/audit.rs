//! The audit log: one row per registration attempt that reached the registry and per admin
//! action. Rows are only appended (and pruned by age with [`Registry::prune_audit`]).

use std::net::IpAddr;

use rusqlite::{Connection, params};

use super::{Reason, Registry, RegistryError, UnixTime};

/// The `action` column's values (stable: scripts filter on them).
pub mod action {
    /// A device presented a key (`outcome` is a [`Reason`](crate::registry::Reason) code).
    pub const REGISTER: &str = "register";
    /// A key was created (`detail`: its kind).
    pub const KEY_CREATE: &str = "key_create";
    /// A key was revoked.
    pub const KEY_REVOKE: &str = "key_revoke";
    /// A key was deleted.
    pub const KEY_DELETE: &str = "key_delete";
    /// A device credential was revoked (`detail`: `removed` or `superseded`).
    pub const DEVICE_REVOKE: &str = "device_revoke";
    /// A management client certificate was issued (`detail`: its name).
    pub const MGMT_ADD: &str = "mgmt_add";
    /// A management client certificate was revoked (`detail`: its name).
    pub const MGMT_REVOKE: &str = "mgmt_revoke";
    /// An online backup was written (`detail`: the destination).
    pub const BACKUP: &str = "backup";
}

/// One audit row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Row ID (increasing).
    pub id: i64,
    /// When.
    pub at: UnixTime,
    /// Who: `device` for registration attempts, else the registry's actor (`cli`, `gateway`…).
    pub actor: String,
    /// What (see [`action`]).
    pub action: String,
    /// `ok` for admin actions, a [`Reason`] code for registration attempts.
    pub outcome: String,
    /// The unit involved.
    pub unit_id: Option<String>,
    /// The source address of a registration attempt.
    pub address: Option<String>,
    /// The key involved.
    pub key_id: Option<i64>,
    /// The device row involved.
    pub device_id: Option<i64>,
    /// Free text.
    pub detail: Option<String>,
}

/// A row to append (internal).
#[derive(Debug, Default)]
pub(crate) struct NewAudit<'a> {
    pub at: UnixTime,
    pub actor: &'a str,
    pub action: &'a str,
    pub outcome: &'a str,
    pub unit_id: Option<&'a str>,
    pub address: Option<String>,
    pub key_id: Option<i64>,
    pub device_id: Option<i64>,
    pub detail: Option<String>,
}

pub(crate) fn append(conn: &Connection, row: &NewAudit<'_>) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO audit (at, actor, action, outcome, unit_id, address, key_id, device_id, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        row.at,
        row.actor,
        row.action,
        row.outcome,
        row.unit_id,
        row.address,
        row.key_id,
        row.device_id,
        row.detail
    ])?;
    Ok(())
}

impl Registry {
    /// Records a registration attempt refused *before* it reached the registry — typically
    /// [`Reason::RateLimited`] from the shard's [`FailureLimiter`](super::FailureLimiter), or
    /// a connection-limit refusal. A throttled source can send many attempts: the gateway
    /// should record the first refusal per source and period, not each one.
    pub fn record_refusal(
        &mut self,
        unit_id: Option<&str>,
        source: Option<IpAddr>,
        reason: Reason,
        now: UnixTime,
    ) -> Result<(), RegistryError> {
        let unit = unit_id.map(|u| truncate(u, 128));
        append(
            &self.conn,
            &NewAudit {
                at: now,
                actor: "device",
                action: action::REGISTER,
                outcome: reason.as_str(),
                unit_id: unit.as_deref(),
                address: source.map(|a| a.to_string()),
                ..NewAudit::default()
            },
        )?;
        Ok(())
    }

    /// The newest `limit` audit rows, newest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, RegistryError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, at, actor, action, outcome, unit_id, address, key_id, device_id, detail
             FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                at: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                outcome: r.get(4)?,
                unit_id: r.get(5)?,
                address: r.get(6)?,
                key_id: r.get(7)?,
                device_id: r.get(8)?,
                detail: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes audit rows older than `before`; returns how many.
    pub fn prune_audit(&mut self, before: UnixTime) -> Result<usize, RegistryError> {
        Ok(self
            .conn
            .execute("DELETE FROM audit WHERE at < ?1", [before])?)
    }
}

/// At most `max` characters of `s`, with control characters escaped (audit rows are shown on
/// terminals).
pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}
