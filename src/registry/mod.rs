//! The device registry: first-authentication keys, registered devices and the audit log, in
//! one SQLite file (`DATA_DIR/registry.db`).
//!
//! # Who uses it
//!
//! The gateway's control thread owns one [`Registry`] (a shard never touches SQLite: it sends
//! registration and reconnect requests to the control thread and gets the outcome back). The
//! CLI (`fleetgate keys …`, `fleetgate devices …`) opens the same file from another process at
//! the same time; SQLite's locking keeps them consistent.
//!
//! # Storage settings and why
//!
//! * **WAL journal**: readers (reconnect lookups, `keys list`) never wait for the writer, and a
//!   commit is one append to the log.
//! * **`synchronous = FULL`**: a commit returns only after the log is on disk, so a consumed key
//!   and its device row survive a power cut. (WAL with `NORMAL` could lose the last commits on
//!   power loss; a device could then be told "granted" for a key the registry later forgot.)
//!   The only exception is [`Registry::touch_last_seen_many`], which runs with `NORMAL`
//!   because a lost "last seen" costs nothing.
//! * **busy timeout** (default 5 s, [`OpenOptions::busy_timeout`]): a writer waits for another
//!   process's transaction instead of failing.
//! * **`foreign_keys = ON`**: deleting a key sets `devices.key_id` to NULL.
//! * The file is created with mode 0600 (its `-wal`/`-shm` files inherit the mode); the data
//!   dir, if it has to be created, gets 0700.
//!
//! # Atomic registration and crash safety
//!
//! [`Registry::consume_key`] checks the key, marks it used, records the device credential and
//! writes the audit row in **one** `BEGIN IMMEDIATE` transaction. There is no moment at which a
//! key is consumed without its device existing: after a crash (kill -9, power loss) either the
//! whole registration is on disk or none of it is. `BEGIN IMMEDIATE` takes SQLite's write lock
//! before the key is read, so two registrations for the same key — threads or processes —
//! are serialised and the second one sees the key as used.
//!
//! The gateway must send the credential to the device only **after** `consume_key` returned
//! (the commit is durable by then). If the device never receives it (the gateway dies in
//! between, the connection drops), the device retries with the same key, unit ID and key pair:
//! when the request carries the hash of the device's public key
//! ([`DeviceCredential::public_key_sha256`]) and it matches the registration that used the key,
//! the retry is granted again and that registration's credential is replaced (not a second
//! device). Without a matching public key a used one-time key stays refused (`key_used`).
//!
//! # Outcomes
//!
//! Every registration outcome has a stable wire code, [`Reason`] (see [`reason`]); it is what
//! the device shows and what the audit log records.
//!
//! # Files in this module
//!
//! [`key`] key values · [`unit`](mod@unit) unit IDs and lists · [`schema`] migrations · [`reason`] wire
//! codes · `keys` key administration · `consume` registration · `devices` devices · `management`
//! management client certificates · `audit` the audit log · [`limiter`] the per-source failure limiter · `backup` online backup.

#![forbid(unsafe_code)]

mod audit;
mod backup;
mod consume;
mod devices;
mod error;
pub mod key;
mod keys;
pub mod limiter;
mod management;
pub mod reason;
pub mod schema;
pub mod unit;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

pub use audit::{AuditEntry, action};
pub use consume::{DeviceCredential, KeyGrant, RegistrationRefusal, RegistrationRequest};
pub use devices::{AuthRefusal, Device, DeviceState, Touch};
pub use error::RegistryError;
pub use key::{KeyKind, KeyRef};
pub use keys::{KeyFilter, KeyInfo, KeyState, NewKey};
pub use limiter::{FailureLimiter, RateLimitConfig, Throttled};
pub use management::{ManagementClient, NewManagementClient, check_management_name};
pub use reason::Reason;

/// The registry's file name inside the data dir.
pub const FILE_NAME: &str = "registry.db";
/// The most keys one `create` call makes.
pub const MAX_KEYS_PER_CREATE: usize = 100_000;

/// Seconds since 1970-01-01 UTC: every time the registry stores. The caller passes `now`, so
/// tests control the clock.
pub type UnixTime = i64;

/// The current time as [`UnixTime`].
pub fn unix_now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How to open the registry.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// How long a write waits for another connection's transaction before failing with
    /// "database is locked". Default 5 s: far longer than any registry transaction (a batch of
    /// 100,000 keys takes about a second), short enough that a stuck process is noticed.
    pub busy_timeout: Duration,
    /// Who admin actions are recorded as in the audit log (`cli`, `gateway`, `management`).
    pub actor: String,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            busy_timeout: Duration::from_secs(5),
            actor: "cli".into(),
        }
    }
}

/// An open registry database (one SQLite connection).
///
/// Not `Sync`: one thread owns it. Open one per thread or process; they coordinate through
/// SQLite's locks.
pub struct Registry {
    conn: Connection,
    path: PathBuf,
    actor: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("path", &self.path)
            .field("actor", &self.actor)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Opens (creating if needed) `DATA_DIR/registry.db` with default options.
    pub fn open_in(data_dir: &Path) -> Result<Registry, RegistryError> {
        Registry::open(&data_dir.join(FILE_NAME), &OpenOptions::default())
    }

    /// Opens (creating if needed) the registry at `path` and migrates it to the current
    /// schema ([`schema::LATEST`]).
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Registry, RegistryError> {
        prepare_file(path)?;
        let open_err = |source| RegistryError::Open {
            path: path.to_owned(),
            source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
        conn.busy_timeout(options.busy_timeout).map_err(open_err)?;
        set_wal(&conn, options.busy_timeout).map_err(open_err)?;
        // cache_size: up to 32 MiB of pages (SQLite's default is 2 MiB). With 100,000 devices
        // the file is ~50 MB, and a reconnect storm looks up and touches every credential:
        // with the default cache most of those lookups re-read pages from the file
        // (perf: pread and page parsing were ~40 % of the registrar's storm CPU).
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA cache_size = -32768;",
        )
        .map_err(open_err)?;
        match schema::migrate(&mut conn).map_err(open_err)? {
            schema::Migrated::TooNew(found) => {
                return Err(RegistryError::SchemaTooNew {
                    path: path.to_owned(),
                    found,
                    supported: schema::LATEST,
                });
            }
            schema::Migrated::From(from) => {
                tracing::info!(path = %path.display(), from, to = schema::LATEST, "registry schema migrated");
            }
            schema::Migrated::UpToDate => {}
        }
        Ok(Registry {
            conn,
            path: path.to_owned(),
            actor: options.actor.clone(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open file (always [`schema::LATEST`] after a successful open).
    pub fn schema_version(&self) -> Result<u32, RegistryError> {
        Ok(schema::version(&self.conn)?)
    }

    /// Who admin actions are recorded as.
    pub fn actor(&self) -> &str {
        &self.actor
    }
}

/// Creates the parent dir (0700) and an empty file (0600) if they do not exist, so SQLite never
/// creates the database with the umask's mode.
fn prepare_file(path: &Path) -> Result<(), RegistryError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| RegistryError::Io { path: p, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Switches to WAL. Changing the journal mode needs an exclusive lock, for which SQLite does not
/// always call the busy handler; retry while another connection holds the file.
fn set_wal(conn: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + busy_timeout;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("cannot switch to WAL (journal mode stays {mode})")),
                ));
            }
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
