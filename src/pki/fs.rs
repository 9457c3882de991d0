//! File helpers: every file the PKI writes goes through [`write_atomic`] (temp file in the same
//! directory with the final mode, fsync, rename, fsync of the directory), so a reader — the
//! running gateway watching `keystore.pem` — sees either the old or the new file, never half.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::PkiError;

/// Mode of files holding private keys.
pub const MODE_PRIVATE: u32 = 0o600;
/// Mode of public files (certificates).
pub const MODE_PUBLIC: u32 = 0o644;
/// Mode of directories holding private keys.
pub const MODE_PRIVATE_DIR: u32 = 0o700;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `contents` to `path` atomically with permission bits `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| PkiError::InvalidInput(format!("{} is not a file path", path.display())))?;
    let temp = dir.join(format!(
        ".{}.tmp.{}.{}",
        file_name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(|e| PkiError::io(&temp, e))?;
        // The umask may have cleared bits of `mode` (0644 under umask 077); set them exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| PkiError::io(&temp, e))?;
        file.write_all(contents)
            .map_err(|e| PkiError::io(&temp, e))?;
        file.sync_all().map_err(|e| PkiError::io(&temp, e))?;
        drop(file);
        fs::rename(&temp, path).map_err(|e| PkiError::io(path, e))?;
        // Make the rename durable; failure here does not undo the (visible) replacement.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Creates `dir` (and parents) if missing and sets its mode.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|e| PkiError::io(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(|e| PkiError::io(dir, e))
}

/// Reads a file the operator named, refusing anything absurdly large.
pub fn read_input(path: &Path) -> Result<Vec<u8>, PkiError> {
    let meta = fs::metadata(path).map_err(|e| PkiError::io(path, e))?;
    if meta.is_dir() {
        return Err(PkiError::InvalidInput(format!(
            "{} is a directory, expected a PEM file",
            path.display()
        )));
    }
    if meta.len() > super::pem::MAX_PEM_INPUT as u64 {
        return Err(PkiError::Pem {
            what: describe(path),
            message: format!(
                "the file is larger than {} bytes",
                super::pem::MAX_PEM_INPUT
            ),
        });
    }
    fs::read(path).map_err(|e| PkiError::io(path, e))
}

/// How error messages name a file.
pub fn describe(path: &Path) -> String {
    format!("file {}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_atomic(&p, b"one", MODE_PRIVATE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_atomic(&p, b"two", MODE_PUBLIC).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
