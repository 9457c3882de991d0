//! `file` streams (`docs/protocol.md` §6.6): a push into the receive directory.
//!
//! The path must be relative, without `..`, and may not lead through a symbolic link; the
//! bytes go to a temporary file next to the target (`.NAME.<random>.part`, created new), which
//! is `fsync`ed, checked (size and SHA-256) and renamed over the target, then the directory is
//! `fsync`ed. The agent answers `close {"ok": true, "size", "sha256"}`, or `reset` with
//! `not_allowed`, `checksum_mismatch` or `io_error`. A stream that ends any other way (reset,
//! session gone) deletes its temporary file.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::Receiver;

use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::flow::{CancelHook, Inbound, StreamCtx};
use super::{OpenBody, RelayConfig};
use crate::proto::envelope::ErrorBody;

fn err(code: &str, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code: code.into(),
        message: message.into(),
    }
}

/// Checks a pushed file name: relative, normal components only (`.` is skipped), no NUL.
pub fn safe_relative(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() || path.contains('\0') {
        return Err("empty or invalid path".into());
    }
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("{path:?}: `..` is not allowed")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{path:?}: absolute paths are not allowed"));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("{path:?} names no file"));
    }
    Ok(out)
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Validates the open and starts the stream's thread.
pub(crate) fn start(
    config: &RelayConfig,
    open: &OpenBody,
    ctx: StreamCtx,
    inbound: Receiver<Inbound>,
) -> Result<Option<CancelHook>, ErrorBody> {
    let rel =
        safe_relative(open.path.as_deref().unwrap_or("")).map_err(|m| err("not_allowed", m))?;
    let size = open
        .size
        .ok_or_else(|| err("bad_request", "file: size missing"))?;
    let sha256 = open
        .sha256
        .as_deref()
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| err("bad_request", "file: sha256 must be 64 hex digits"))?
        .to_ascii_lowercase();
    let base = config.receive_dir.clone();
    std::thread::Builder::new()
        .name("agent-file".into())
        .spawn(move || {
            let mut ctx = ctx;
            let job = Job {
                base,
                rel,
                size,
                sha256,
            };
            job.run(&mut ctx, &inbound);
        })
        .map_err(|e| err("io_error", format!("file: {e}")))?;
    Ok(None)
}

/// How long data that arrives after the peer's `close` is still waited for.
const LATE_DATA: std::time::Duration = std::time::Duration::from_secs(2);

struct Job {
    base: PathBuf,
    rel: PathBuf,
    size: u64,
    sha256: String,
}

/// The temporary file; deleted on drop unless it was renamed.
struct Temp {
    path: PathBuf,
    file: Option<File>,
    keep: bool,
}

impl Temp {
    /// Deletes the file now (before the peer hears about the failure).
    fn discard(&mut self) {
        self.file = None;
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
            self.keep = true;
        }
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        self.file = None;
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Job {
    fn run(&self, ctx: &mut StreamCtx, inbound: &Receiver<Inbound>) {
        let (target, mut temp) = match self.prepare() {
            Ok(t) => t,
            Err(e) => {
                ctx.reset(&e.code, e.message);
                return;
            }
        };
        if !ctx.accept() {
            return;
        }
        let mut hasher = Sha256::new();
        let mut written: u64 = 0;
        let mut closed = false;
        loop {
            // Tolerance: a `close` that overtook its stream's last data (a relay must not
            // reorder them, but a short wait costs nothing) — wait a little for the rest.
            let next = if closed {
                if written >= self.size {
                    break;
                }
                match inbound.recv_timeout(LATE_DATA) {
                    Ok(m) => Ok(m),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                inbound.recv().map_err(|_| ())
            };
            match next {
                Ok(Inbound::Data(bytes)) => {
                    written += bytes.len() as u64;
                    if written > self.size {
                        temp.discard();
                        ctx.reset(
                            "checksum_mismatch",
                            format!("more than the announced {} bytes", self.size),
                        );
                        return;
                    }
                    let file = temp.file.as_mut().expect("open until the end");
                    if let Err(e) = file.write_all(&bytes) {
                        let message = format!("writing {}: {e}", temp.path.display());
                        temp.discard();
                        ctx.reset("io_error", message);
                        return;
                    }
                    hasher.update(&bytes);
                    ctx.consumed(bytes.len());
                }
                Ok(Inbound::Close) => closed = true,
                Ok(Inbound::Resize { .. }) => {}
                // Reset by the peer or the session ended: Temp's drop deletes the file.
                Err(()) => return,
            }
        }
        let digest = hex(&hasher.finalize());
        if written != self.size || digest != self.sha256 {
            temp.discard();
            ctx.reset(
                "checksum_mismatch",
                format!(
                    "received {written} bytes with SHA-256 {digest}, expected {} bytes with {}",
                    self.size, self.sha256
                ),
            );
            return;
        }
        if let Err(e) = finish(&mut temp, &target) {
            temp.discard();
            ctx.reset("io_error", e);
            return;
        }
        ctx.close(json!({ "ok": true, "size": written, "sha256": digest }));
    }

    /// Creates the directories (refusing symbolic links on the way) and the temporary file.
    fn prepare(&self) -> Result<(PathBuf, Temp), ErrorBody> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            err("io_error", format!("{what} {}: {e}", p.display()))
        };
        if !self.base.exists() {
            crate::pki::fs::ensure_dir(&self.base, crate::pki::fs::MODE_PRIVATE_DIR)
                .map_err(|e| err("io_error", format!("receive directory: {e}")))?;
        }
        let mut dir = self.base.clone();
        let parent = self.rel.parent().unwrap_or(Path::new(""));
        for c in parent.components() {
            dir.push(c);
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(err(
                        "not_allowed",
                        format!("{} is a symbolic link", dir.display()),
                    ));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(err(
                        "not_allowed",
                        format!("{} is not a directory", dir.display()),
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&dir).map_err(|e| io("creating", &dir, e))?;
                }
                Err(e) => return Err(io("checking", &dir, e)),
            }
        }
        let name = self
            .rel
            .file_name()
            .ok_or_else(|| err("not_allowed", "no file name"))?;
        let target = dir.join(name);
        if target.is_dir() {
            return Err(err(
                "not_allowed",
                format!("{} is a directory", target.display()),
            ));
        }
        let mut nonce = [0u8; 8];
        let _ = getrandom::fill(&mut nonce);
        let temp_path = dir.join(format!(".{}.{}.part", name.to_string_lossy(), hex(&nonce)));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(|e| io("creating", &temp_path, e))?;
        Ok((
            target,
            Temp {
                path: temp_path,
                file: Some(file),
                keep: false,
            },
        ))
    }
}

/// fsync, rename over the target, fsync the directory.
fn finish(temp: &mut Temp, target: &Path) -> Result<(), String> {
    let file = temp.file.take().expect("open until the end");
    file.sync_all()
        .map_err(|e| format!("fsync {}: {e}", temp.path.display()))?;
    drop(file);
    std::fs::rename(&temp.path, target)
        .map_err(|e| format!("renaming to {}: {e}", target.display()))?;
    temp.keep = true;
    if let Some(dir) = target.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(safe_relative("a.txt").unwrap(), PathBuf::from("a.txt"));
        assert_eq!(
            safe_relative("./d/a.txt").unwrap(),
            PathBuf::from("d/a.txt")
        );
        for bad in ["", "/etc/passwd", "../x", "d/../../x", ".", "a\0b", "d/.."] {
            assert!(safe_relative(bad).is_err(), "{bad:?}");
        }
    }
}
