//! Online backup through SQLite's backup API.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::audit::{self, NewAudit, action};
use super::{Registry, RegistryError, UnixTime};

impl Registry {
    /// Writes a consistent copy of the registry to `dest` while the gateway keeps running.
    ///
    /// The whole database is copied in one backup step, i.e. from one read snapshot (in WAL
    /// mode a reader does not block the writer, so registrations continue meanwhile). The copy
    /// goes to a temporary file beside `dest` (mode 0600), is checked with
    /// `PRAGMA quick_check`, synced, and renamed over `dest`: `dest` is either the old file or
    /// a complete new backup. The copy is an ordinary registry file: restore it by stopping the
    /// gateway and putting it in place of `DATA_DIR/registry.db` (remove `registry.db-wal` and
    /// `registry.db-shm`).
    pub fn backup_to(&mut self, dest: &Path, now: UnixTime) -> Result<(), RegistryError> {
        let fail = |message: String| RegistryError::Backup {
            path: dest.to_owned(),
            message,
        };
        let name = dest
            .file_name()
            .ok_or_else(|| fail("the destination has no file name".into()))?;
        let tmp = dest.with_file_name(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let result = copy_to(&self.conn, &tmp).and_then(|()| {
            std::fs::rename(&tmp, dest).map_err(|e| format!("rename: {e}"))?;
            if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("sync {}: {e}", dir.display()))?;
            }
            Ok(())
        });
        if let Err(message) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(message));
        }
        audit::append(
            &self.conn,
            &NewAudit {
                at: now,
                actor: &self.actor,
                action: action::BACKUP,
                outcome: "ok",
                detail: Some(dest.display().to_string()),
                ..NewAudit::default()
            },
        )?;
        Ok(())
    }
}

fn copy_to(src: &Connection, tmp: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let mut dst = Connection::open_with_flags(
        tmp,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("open {}: {e}", tmp.display()))?;
    {
        let backup = Backup::new(src, &mut dst).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // -1: every page in one step, from one snapshot.
            match backup.step(-1).map_err(|e| e.to_string())? {
                StepResult::Done => break,
                StepResult::More | StepResult::Busy | StepResult::Locked
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return Err(format!("backup did not finish: {other:?}")),
            }
        }
    }
    let check: String = dst
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| format!("check of the copy: {e}"))?;
    if check != "ok" {
        return Err(format!("the copy failed its integrity check: {check}"));
    }
    // A single-file copy: no WAL beside it.
    dst.query_row("PRAGMA journal_mode = DELETE", [], |r| {
        r.get::<_, String>(0)
    })
    .map_err(|e| format!("journal mode of the copy: {e}"))?;
    drop(dst);
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("sync {}: {e}", tmp.display()))?;
    Ok(())
}
