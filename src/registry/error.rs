//! The registry's error type.

use std::path::PathBuf;

/// A registry operation failed.
///
/// [`is_rejection`](RegistryError::is_rejection) separates *input the operator must fix* (a bad
/// unit ID, a CSV with bad lines, a key value already in use, an unknown key) from *local
/// failures* (I/O, a broken or locked database), which are worth retrying or investigating.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The data dir or the database file could not be created.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// SQLite refused to open the database or to set it up (not a database, locked, read-only).
    #[error("cannot open registry database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer fleetgate.
    #[error(
        "registry database {path} has schema version {found}, newer than this fleetgate \
         understands ({supported}); run the newer fleetgate or restore a backup"
    )]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` of the file.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// A statement failed (I/O error, disk full, database busy beyond the busy timeout, …).
    #[error("registry database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// No key matches the given key value or key ID.
    #[error("no such key: {0}")]
    KeyNotFound(String),
    /// A custom mass-deployment key value equals a key that already exists.
    #[error("that key value is already in use; choose another value")]
    KeyValueInUse,
    /// A custom key value breaks the rules (see [`crate::registry::key::check_custom_value`]).
    #[error("invalid key value: {0}")]
    InvalidKeyValue(&'static str),
    /// A unit ID breaks the rules (see [`crate::registry::unit::check_unit_id`]).
    #[error("invalid unit ID {unit:?}: {reason}")]
    InvalidUnitId {
        /// The offending unit ID (as given).
        unit: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A unit-ID list (CSV or one per line) has bad lines; nothing was imported.
    #[error("{0}")]
    UnitList(#[from] crate::registry::unit::UnitListError),
    /// A requested number of keys is outside `1..=MAX_KEYS_PER_CREATE`.
    #[error("cannot create {0} keys at once (allowed: 1 to {max})", max = crate::registry::MAX_KEYS_PER_CREATE)]
    BadCount(usize),
    /// No device (active or revoked) has this unit ID.
    #[error("no device with unit ID {0}")]
    DeviceNotFound(String),
    /// A management client name breaks the rules (see
    /// [`check_management_name`](crate::registry::check_management_name)).
    #[error("invalid management client name {name:?}: {reason}")]
    InvalidManagementName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A management certificate that is not revoked already has this name.
    #[error(
        "a management client named {0:?} already exists; revoke it first or choose another name"
    )]
    ManagementNameInUse(String),
    /// No active (not revoked) management certificate has this name.
    #[error("no active management client named {0:?}")]
    ManagementClientNotFound(String),
    /// The database contradicts an invariant the registry keeps (a bug or outside tampering).
    #[error("registry inconsistency: {0}")]
    Inconsistent(String),
    /// The online backup failed.
    #[error("backup to {path} failed: {message}")]
    Backup {
        /// The destination.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl RegistryError {
    /// True when the operator's input was refused (exit code 2 in the CLI), false for local
    /// failures (exit code 1).
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            RegistryError::KeyNotFound(_)
                | RegistryError::KeyValueInUse
                | RegistryError::InvalidKeyValue(_)
                | RegistryError::InvalidUnitId { .. }
                | RegistryError::UnitList(_)
                | RegistryError::BadCount(_)
                | RegistryError::DeviceNotFound(_)
                | RegistryError::InvalidManagementName { .. }
                | RegistryError::ManagementNameInUse(_)
                | RegistryError::ManagementClientNotFound(_)
        )
    }
}
