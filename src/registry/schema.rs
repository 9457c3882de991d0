//! The registry's schema and its migrations.
//!
//! The schema version is `PRAGMA user_version` (0 = empty file). `MIGRATIONS[n]` takes a
//! database from version `n` to `n + 1`; [`migrate`] runs the missing ones inside one
//! `BEGIN IMMEDIATE` transaction and sets `user_version`, so a crash mid-migration leaves the
//! old version intact and two processes opening a fresh file do not both migrate it.
//!
//! Rules for a new migration: append a function, never edit a released one (a database
//! migrated by the old text would differ from a fresh one); add a test that opens a database
//! of the previous version (`tests/registry_migrate.rs` keeps a frozen copy of v1).
//!
//! # Version 1
//!
//! * `keys` — one row per first-authentication key: `kind` (`one-time`, `unit`, `mass`),
//!   `key_hash` (SHA-256, see [`key_hash`](super::key::key_hash)), `prefix` (display),
//!   `unit_id` (unit-bound keys only), `created_at`, `revoked_at`, `use_count`,
//!   `first_used_at`, `last_used_at`, `last_used_by` (unit ID).
//! * `devices` — one row per issued device credential: `unit_id`, `fingerprint` (SHA-256 of
//!   the device certificate, unique, so lookups on reconnect use its index), `serial`,
//!   `not_after`, `key_id` (the key used; NULL once the key is deleted), `registered_at`,
//!   `registered_from`, `last_seen`, `address`, `revoked_at`, `revoked_reason`
//!   (`removed` or `superseded`), `spki_sha256` (SHA-256 of the device's public key, for the
//!   retry rule of [`consume_key`](super::Registry::consume_key)).
//! * `audit` — append-only: `at`, `actor`, `action`, `outcome`, `unit_id`, `address`, `key_id`,
//!   `device_id`, `detail`.
//!
//! # Version 2
//!
//! * `devices.root_fingerprint` — the root certificate (SHA-256) the device holds; set at
//!   registration and when the device acknowledges a new root during a root exchange, so the
//!   gateway can report how many devices still lack the new root. NULL for devices registered
//!   before version 2 (unknown).
//!
//! # Version 3
//!
//! * `management_clients` — one row per management client certificate issued by
//!   `fleetgate mgmt add` (the management CA): `name` (the certificate's CN, unique, case
//!   insensitive), `fingerprint` (SHA-256 of the certificate, unique), `serial`, `not_after`,
//!   `issued_at`, `revoked_at` (`fleetgate mgmt revoke`; a revoked name may be reused).

use rusqlite::{Connection, Transaction, TransactionBehavior};

/// The schema version this build writes.
pub const LATEST: u32 = MIGRATIONS.len() as u32;

type Migration = fn(&Transaction<'_>) -> rusqlite::Result<()>;

/// `MIGRATIONS[n]`: version `n` → `n + 1`.
const MIGRATIONS: &[Migration] = &[v0_to_v1, v1_to_v2, v2_to_v3];

fn v0_to_v1(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE keys (
            id            INTEGER PRIMARY KEY,
            kind          TEXT    NOT NULL CHECK (kind IN ('one-time', 'unit', 'mass')),
            key_hash      BLOB    NOT NULL UNIQUE CHECK (length(key_hash) = 32),
            prefix        TEXT    NOT NULL,
            unit_id       TEXT    COLLATE NOCASE CHECK ((kind = 'unit') = (unit_id IS NOT NULL)),
            created_at    INTEGER NOT NULL,
            revoked_at    INTEGER,
            use_count     INTEGER NOT NULL DEFAULT 0,
            first_used_at INTEGER,
            last_used_at  INTEGER,
            last_used_by  TEXT
        );
        CREATE TABLE devices (
            id              INTEGER PRIMARY KEY,
            unit_id         TEXT    NOT NULL COLLATE NOCASE,
            fingerprint     BLOB    NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
            serial          BLOB    NOT NULL,
            not_after       INTEGER NOT NULL,
            key_id          INTEGER REFERENCES keys (id) ON DELETE SET NULL,
            registered_at   INTEGER NOT NULL,
            registered_from TEXT,
            last_seen       INTEGER,
            address         TEXT,
            revoked_at      INTEGER,
            revoked_reason  TEXT,
            spki_sha256     BLOB
        );
        CREATE INDEX devices_by_unit ON devices (unit_id);
        CREATE INDEX devices_by_key ON devices (key_id);
        CREATE TABLE audit (
            id        INTEGER PRIMARY KEY,
            at        INTEGER NOT NULL,
            actor     TEXT    NOT NULL,
            action    TEXT    NOT NULL,
            outcome   TEXT    NOT NULL,
            unit_id   TEXT,
            address   TEXT,
            key_id    INTEGER,
            device_id INTEGER,
            detail    TEXT
        );
        CREATE INDEX audit_by_time ON audit (at);",
    )
}

fn v1_to_v2(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch("ALTER TABLE devices ADD COLUMN root_fingerprint BLOB;")
}

fn v2_to_v3(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    // `name` is unique only among certificates not revoked (a revoked name may be issued
    // again); the partial index enforces it. Every name ever issued stays listed.
    tx.execute_batch(
        "CREATE TABLE management_clients (
            id          INTEGER PRIMARY KEY,
            name        TEXT    NOT NULL COLLATE NOCASE,
            fingerprint BLOB    NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
            serial      BLOB    NOT NULL,
            not_after   INTEGER NOT NULL,
            issued_at   INTEGER NOT NULL,
            revoked_at  INTEGER
        );
        CREATE UNIQUE INDEX management_clients_active_name
            ON management_clients (name) WHERE revoked_at IS NULL;",
    )
}

/// The outcome of [`migrate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrated {
    /// Already at [`LATEST`].
    UpToDate,
    /// Migrated from this version to [`LATEST`].
    From(u32),
    /// The file is newer than this build (nothing was changed).
    TooNew(u32),
}

/// Brings the database to [`LATEST`] in one immediate transaction.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<Migrated> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > LATEST {
        return Ok(Migrated::TooNew(found));
    }
    if found == LATEST {
        return Ok(Migrated::UpToDate);
    }
    for step in &MIGRATIONS[found as usize..] {
        step(&tx)?;
    }
    // PRAGMA takes no bound parameters; LATEST is a constant.
    tx.execute_batch(&format!("PRAGMA user_version = {LATEST}"))?;
    tx.commit()?;
    Ok(Migrated::From(found))
}

/// The schema version of an open database.
pub fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}
