//! Management clients: the certificates `fleetgate mgmt add` issues from the management CA
//! to management servers (table `management_clients`, schema version 3).
//!
//! A name is unique among the certificates that are not revoked; revoking frees it. A revoked
//! certificate that is not yet expired is listed by
//! [`Registry::revoked_credentials`](super::Registry::revoked_credentials) (reason `removed`,
//! the name in the unit column), which is how the running gateway learns to refuse it and to
//! close its open connection.

use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use super::audit::{self, NewAudit, action};
use super::{Registry, RegistryError, UnixTime};
use crate::pki::Fingerprint;

/// One issued management client certificate (a row of `management_clients`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagementClient {
    /// Row ID.
    pub id: i64,
    /// The name (the certificate's common name).
    pub name: String,
    /// SHA-256 of the certificate (DER).
    pub fingerprint: Fingerprint,
    /// Certificate serial number (big-endian bytes).
    pub serial: Vec<u8>,
    /// Certificate `notAfter`.
    pub not_after: UnixTime,
    /// When it was issued.
    pub issued_at: UnixTime,
    /// When it was revoked.
    pub revoked_at: Option<UnixTime>,
}

impl ManagementClient {
    /// `active`, `revoked` or `expired` at `now`.
    pub fn state(&self, now: UnixTime) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.not_after < now {
            "expired"
        } else {
            "active"
        }
    }
}

/// What to record for a newly issued management certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewManagementClient<'a> {
    /// The name (the certificate's CN).
    pub name: &'a str,
    /// SHA-256 of the certificate.
    pub fingerprint: Fingerprint,
    /// Its serial number.
    pub serial: &'a [u8],
    /// Its `notAfter`.
    pub not_after: UnixTime,
}

const COLUMNS: &str = "id, name, fingerprint, serial, not_after, issued_at, revoked_at";

fn row(r: &Row<'_>) -> rusqlite::Result<ManagementClient> {
    let fp: Vec<u8> = r.get(2)?;
    let fingerprint = <[u8; 32]>::try_from(fp.as_slice())
        .map(Fingerprint)
        .map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(
                2,
                rusqlite::types::Type::Blob,
                "fingerprint is not 32 bytes".into(),
            )
        })?;
    Ok(ManagementClient {
        id: r.get(0)?,
        name: r.get(1)?,
        fingerprint,
        serial: r.get(3)?,
        not_after: r.get(4)?,
        issued_at: r.get(5)?,
        revoked_at: r.get(6)?,
    })
}

/// Checks a management client name: 1–64 characters, printable, no leading or trailing white
/// space, and no `/` (it becomes a file name). Returns the name.
pub fn check_management_name(name: &str) -> Result<&str, RegistryError> {
    let bad = |reason: &'static str| RegistryError::InvalidManagementName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.chars().count() > 64 {
        return Err(bad("longer than 64 characters"));
    }
    if name.trim() != name {
        return Err(bad("leading or trailing white space"));
    }
    if name.chars().any(char::is_control) {
        return Err(bad("control characters"));
    }
    if name.contains('/') || name == "." || name == ".." || name.starts_with('.') {
        return Err(bad(
            "it must be usable as a file name (no '/', no leading '.')",
        ));
    }
    Ok(name)
}

impl Registry {
    /// Records a management certificate just issued. Refused with
    /// [`RegistryError::ManagementNameInUse`] when a certificate that is not revoked already
    /// has the name (case-insensitive). Audited as `mgmt_add`.
    pub fn add_management_client(
        &mut self,
        client: &NewManagementClient<'_>,
        now: UnixTime,
    ) -> Result<ManagementClient, RegistryError> {
        let name = check_management_name(client.name)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken: Option<i64> = tx
            .query_row(
                "SELECT id FROM management_clients WHERE name = ?1 AND revoked_at IS NULL",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        if taken.is_some() {
            return Err(RegistryError::ManagementNameInUse(name.to_owned()));
        }
        let added = tx.query_row(
            &format!(
                "INSERT INTO management_clients (name, fingerprint, serial, not_after, issued_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING {COLUMNS}"
            ),
            params![
                name,
                &client.fingerprint.0[..],
                client.serial,
                client.not_after,
                now
            ],
            row,
        )?;
        audit::append(
            &tx,
            &NewAudit {
                at: now,
                actor: &self.actor,
                action: action::MGMT_ADD,
                outcome: "ok",
                detail: Some(format!("management client {name}")),
                ..NewAudit::default()
            },
        )?;
        tx.commit()?;
        Ok(added)
    }

    /// Every management certificate ever issued, oldest first.
    pub fn list_management_clients(&self) -> Result<Vec<ManagementClient>, RegistryError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM management_clients ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([], row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The active (not revoked) certificate named `name`, if any.
    pub fn management_client(&self, name: &str) -> Result<Option<ManagementClient>, RegistryError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM management_clients WHERE name = ?1 AND revoked_at IS NULL"
            ))?
            .query_row([name], row)
            .optional()?)
    }

    /// Revokes the certificate named `name` (the one not yet revoked). The running gateway
    /// refuses it and closes its connection within a second. Returns the revoked row;
    /// [`RegistryError::ManagementClientNotFound`] when no active certificate has the name.
    /// Audited as `mgmt_revoke`.
    pub fn revoke_management_client(
        &mut self,
        name: &str,
        now: UnixTime,
    ) -> Result<ManagementClient, RegistryError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let revoked = tx
            .query_row(
                &format!(
                    "UPDATE management_clients SET revoked_at = ?1
                     WHERE name = ?2 AND revoked_at IS NULL RETURNING {COLUMNS}"
                ),
                params![now, name],
                row,
            )
            .optional()?
            .ok_or_else(|| RegistryError::ManagementClientNotFound(name.to_owned()))?;
        audit::append(
            &tx,
            &NewAudit {
                at: now,
                actor: &self.actor,
                action: action::MGMT_REVOKE,
                outcome: "ok",
                detail: Some(format!("management client {}", revoked.name)),
                ..NewAudit::default()
            },
        )?;
        tx.commit()?;
        Ok(revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: UnixTime = 1_750_000_000;
    const YEAR: i64 = 365 * 86_400;

    fn open() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open_in(dir.path()).unwrap();
        (dir, reg)
    }

    fn new(name: &str, n: u8) -> NewManagementClient<'_> {
        NewManagementClient {
            name,
            fingerprint: Fingerprint([n; 32]),
            serial: &[1, 2, 3],
            not_after: T0 + YEAR,
        }
    }

    #[test]
    fn add_list_revoke_and_reuse_a_name() {
        let (_d, mut reg) = open();
        let a = reg.add_management_client(&new("ops", 1), T0).unwrap();
        assert_eq!(a.name, "ops");
        assert_eq!(a.state(T0), "active");
        assert_eq!(a.state(T0 + 2 * YEAR), "expired");
        reg.add_management_client(&new("backup", 2), T0).unwrap();
        // In use (case-insensitive): refused, nothing recorded.
        let e = reg.add_management_client(&new("OPS", 3), T0).unwrap_err();
        assert!(
            matches!(e, RegistryError::ManagementNameInUse(ref n) if n == "OPS"),
            "{e}"
        );
        assert!(e.is_rejection());
        assert_eq!(reg.list_management_clients().unwrap().len(), 2);
        // The same certificate twice is a database error (fingerprint unique).
        assert!(reg.add_management_client(&new("other", 1), T0).is_err());

        assert!(reg.management_client("ops").unwrap().is_some());
        let r = reg.revoke_management_client("ops", T0 + 5).unwrap();
        assert_eq!(r.revoked_at, Some(T0 + 5));
        assert_eq!(r.state(T0 + 6), "revoked");
        assert!(reg.management_client("ops").unwrap().is_none());
        assert!(matches!(
            reg.revoke_management_client("ops", T0 + 6),
            Err(RegistryError::ManagementClientNotFound(_))
        ));
        // The name is free again.
        let again = reg.add_management_client(&new("ops", 4), T0 + 7).unwrap();
        assert_ne!(again.id, a.id);
        let all = reg.list_management_clients().unwrap();
        assert_eq!(
            all.iter()
                .map(|c| (c.name.as_str(), c.revoked_at.is_some()))
                .collect::<Vec<_>>(),
            vec![("ops", true), ("backup", false), ("ops", false)]
        );
        let actions: Vec<String> = reg
            .conn
            .prepare("SELECT action FROM audit ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(actions, ["mgmt_add", "mgmt_add", "mgmt_revoke", "mgmt_add"]);
    }

    #[test]
    fn revoked_management_certificates_are_in_the_revocation_list_until_they_expire() {
        let (_d, mut reg) = open();
        reg.add_management_client(&new("ops", 1), T0).unwrap();
        reg.add_management_client(&new("keep", 2), T0).unwrap();
        assert!(reg.revoked_credentials(T0).unwrap().is_empty());
        reg.revoke_management_client("ops", T0 + 1).unwrap();
        let list = reg.revoked_credentials(T0 + 2).unwrap();
        assert_eq!(
            list,
            vec![(
                Fingerprint([1; 32]),
                "ops".to_owned(),
                "management".to_owned()
            )]
        );
        // Past its notAfter the TLS handshake refuses it anyway: no longer listed.
        assert!(reg.revoked_credentials(T0 + YEAR + 1).unwrap().is_empty());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", " ops", "a/b", ".hidden", "x\u{7}", &"n".repeat(65)] {
            assert!(check_management_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_management_name("ops-1 eu").unwrap(), "ops-1 eu");
        let (_d, mut reg) = open();
        assert!(matches!(
            reg.add_management_client(&new("a/b", 1), T0),
            Err(RegistryError::InvalidManagementName { .. })
        ));
    }
}
