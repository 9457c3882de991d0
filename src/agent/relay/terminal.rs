//! `terminal` streams (`docs/protocol.md` §6.6): the configured shell on a PTY.
//!
//! The shell is started with `posix_spawn` in a new session (`POSIX_SPAWN_SETSID`), opening the
//! PTY's slave as its standard streams, which makes it the controlling terminal. Data from the
//! management side is written to the PTY; what the shell prints is sent back within the
//! credit. When the shell exits the agent sends `close {"ok": true, "exit_code": n}` (128 +
//! the signal number when it was killed). A reset or the end of the session kills the shell's
//! process group.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::ffi::OsStringExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::pty::{Winsize, openpty};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, ttyname};
use serde_json::json;

use super::flow::{CancelHook, DATA_PIECE, Inbound, StreamCtx};
use super::{OpenBody, RelayConfig};
use crate::proto::envelope::ErrorBody;

/// A shell running on a PTY.
pub(crate) struct Shell {
    /// The PTY's master side.
    pub master: File,
    /// The shell's pid (= its process group and session).
    pub pid: Pid,
}

/// Starts `shell` on a new PTY of `cols` × `rows`.
pub(crate) fn spawn_shell(shell: &Path, cols: u16, rows: u16) -> Result<Shell, String> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).map_err(|e| format!("openpty: {e}"))?;
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| format!("fcntl: {e}"))?;
    }
    let tty = ttyname(&pty.slave).map_err(|e| format!("ttyname: {e}"))?;
    let mut actions = PosixSpawnFileActions::init().map_err(|e| format!("spawn: {e}"))?;
    // Opened after setsid and without O_NOCTTY: becomes the controlling terminal.
    actions
        .add_open(0, &tty, OFlag::O_RDWR, Mode::empty())
        .and_then(|()| actions.add_dup2(0, 1))
        .and_then(|()| actions.add_dup2(0, 2))
        .map_err(|e| format!("spawn: {e}"))?;
    let mut attr = PosixSpawnAttr::init().map_err(|e| format!("spawn: {e}"))?;
    let mut defaults = SigSet::empty();
    for s in [
        Signal::SIGPIPE,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        defaults.add(s);
    }
    let flags = PosixSpawnFlags::from_bits_retain(libc::POSIX_SPAWN_SETSID as libc::c_int)
        | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
        | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK;
    attr.set_flags(flags)
        .and_then(|()| attr.set_sigdefault(&defaults))
        .and_then(|()| attr.set_sigmask(&SigSet::empty()))
        .map_err(|e| format!("spawn: {e}"))?;
    let path = cstring(shell.as_os_str().to_owned())?;
    let argv = [path.clone()];
    let mut env: Vec<CString> = Vec::new();
    let mut has_term = false;
    for (k, v) in std::env::vars_os() {
        has_term |= k == "TERM";
        let mut kv = k;
        kv.push("=");
        kv.push(v);
        if let Ok(c) = cstring(kv) {
            env.push(c);
        }
    }
    if !has_term {
        env.push(CString::new("TERM=xterm-256color").expect("no NUL"));
    }
    let pid = posix_spawn(path.as_c_str(), &actions, &attr, &argv, &env)
        .map_err(|e| format!("cannot start {}: {e}", shell.display()))?;
    drop(pty.slave);
    Ok(Shell {
        master: File::from(pty.master),
        pid,
    })
}

/// Sets the PTY's window size; the kernel sends SIGWINCH to the shell's foreground job.
fn set_size(master: &File, cols: u16, rows: u16) {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    if let Err(e) = rustix::termios::tcsetwinsize(master, size) {
        tracing::debug!(error = %e, "terminal resize failed");
    }
}

fn cstring(s: OsString) -> Result<CString, String> {
    CString::new(s.into_vec()).map_err(|_| "a NUL byte in a path or variable".to_owned())
}

/// The exit code reported for a wait status.
fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => -1,
    }
}

/// Starts the shell and the stream's threads; the hook kills the shell.
pub(crate) fn start(
    config: &RelayConfig,
    open: &OpenBody,
    ctx: StreamCtx,
    inbound: Receiver<Inbound>,
) -> Result<Option<CancelHook>, ErrorBody> {
    let cols = open.cols.filter(|c| *c > 0).unwrap_or(80);
    let rows = open.rows.filter(|r| *r > 0).unwrap_or(24);
    let shell = spawn_shell(&config.shell, cols, rows).map_err(|m| ErrorBody {
        code: "stream_refused".into(),
        message: m,
    })?;
    let reaped = Arc::new(AtomicBool::new(false));
    let pid = shell.pid;
    let kill = {
        let reaped = reaped.clone();
        move || {
            if !reaped.load(Ordering::SeqCst) {
                let _ = killpg(pid, Signal::SIGKILL);
            }
        }
    };
    let failed = |e: std::io::Error| ErrorBody {
        code: "io_error".into(),
        message: format!("terminal: {e}"),
    };
    let mut writer = shell.master.try_clone().map_err(failed)?;
    let mut reader = shell.master;
    if !ctx.accept() {
        kill();
        return Err(ErrorBody {
            code: "link_closed".into(),
            message: "session gone".into(),
        });
    }
    let mut ctx = ctx;
    let sender = ctx.sender();
    let reaped_out = reaped.clone();
    // Output: PTY → management, then the exit code.
    let spawned = std::thread::Builder::new()
        .name("agent-pty-out".into())
        .spawn(move || {
            let mut buf = vec![0u8; DATA_PIECE];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if !sender.send_data(&buf[..n]) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break, // EIO: every slave side closed, the shell is gone
                }
            }
            let status = waitpid(pid, None);
            reaped_out.store(true, Ordering::SeqCst);
            if let Ok(s) = status {
                sender.close(json!({ "ok": true, "exit_code": exit_code(s) }));
            }
        });
    if let Err(e) = spawned {
        kill();
        return Err(failed(e));
    }
    // Input: management → PTY.
    let spawned = std::thread::Builder::new()
        .name("agent-pty-in".into())
        .spawn(move || {
            while let Ok(m) = inbound.recv() {
                match m {
                    Inbound::Data(bytes) => {
                        if writer.write_all(&bytes).is_err() {
                            // The shell is gone; its output side reports the exit.
                            continue;
                        }
                        ctx.consumed(bytes.len());
                    }
                    // No more input: the shell keeps running until it exits by itself.
                    Inbound::Close => {}
                    Inbound::Resize { cols, rows } => set_size(&writer, cols, rows),
                }
            }
        });
    if let Err(e) = spawned {
        kill();
        return Err(failed(e));
    }
    Ok(Some(Box::new(kill)))
}
