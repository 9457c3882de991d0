//! `exec` (`docs/protocol.md` §6.4): runs the operator's hook, never a shell.
//!
//! argv is `[hook, command, args…]`; standard input is empty; standard output and error are
//! captured up to [`OUTPUT_CAP`] bytes each (the rest is read and dropped, `"truncated":
//! true`), and the hook's process group is killed after the timeout (`"timed_out": true`,
//! `"exit_code": null`). The result always fits in one envelope.

use std::io::Read;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::json;

use crate::proto::envelope::{MAX_DATA, ResponseBody};

/// Bytes of standard output (and of standard error) kept.
pub const OUTPUT_CAP: usize = 24 * 1024;

/// The parameters of `exec`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExecParams {
    /// The command name, the hook's first argument.
    pub command: String,
    /// Further arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Reads `r` to its end, keeping at most `cap` bytes; returns them and whether more came.
fn capture(mut r: impl Read, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    let mut truncated = false;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (kept, truncated)
}

/// Runs `hook command args…` and builds the response.
pub fn run_hook(hook: &Path, params: &ExecParams, timeout: Duration) -> ResponseBody {
    let child = Command::new(hook)
        .arg(&params.command)
        .args(&params.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return ResponseBody::err(
                "internal_error",
                format!("cannot run the exec hook {}: {e}", hook.display()),
            );
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    let out = child
        .stdout
        .take()
        .map(|s| std::thread::spawn(move || capture(s, OUTPUT_CAP)));
    let err = child
        .stderr
        .take()
        .map(|s| std::thread::spawn(move || capture(s, OUTPUT_CAP)));
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = killpg(pid, Signal::SIGKILL);
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break None,
        }
    };
    if !timed_out {
        // Whatever the hook left running in its group must not keep the pipes open.
        let _ = killpg(pid, Signal::SIGKILL);
    }
    let join = |h: Option<std::thread::JoinHandle<(Vec<u8>, bool)>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    let (stdout, t1) = join(out);
    let (stderr, t2) = join(err);
    let exit_code = if timed_out {
        None
    } else {
        status.and_then(|s| s.code().or_else(|| s.signal().map(|sig| 128 + sig)))
    };
    fit(exit_code, &stdout, &stderr, t1 || t2, timed_out)
}

/// The result JSON, with the output cut until it fits in one envelope.
fn fit(
    exit_code: Option<i32>,
    stdout: &[u8],
    stderr: &[u8],
    truncated: bool,
    timed_out: bool,
) -> ResponseBody {
    let mut cap = OUTPUT_CAP;
    loop {
        let (o, e) = (
            &stdout[..stdout.len().min(cap)],
            &stderr[..stderr.len().min(cap)],
        );
        let body = ResponseBody::ok(json!({
            "exit_code": exit_code,
            "stdout": String::from_utf8_lossy(o),
            "stderr": String::from_utf8_lossy(e),
            "truncated": truncated || o.len() < stdout.len() || e.len() < stderr.len(),
            "timed_out": timed_out,
        }));
        if body.to_vec().len() <= MAX_DATA - 1024 || cap == 0 {
            return body;
        }
        cap /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_fits_an_envelope() {
        let nasty = vec![1u8; OUTPUT_CAP]; // \u0001 each: 6 bytes of JSON per byte
        let body = fit(Some(0), &nasty, &nasty, false, false).to_vec();
        assert!(body.len() <= MAX_DATA - 1024, "{}", body.len());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["result"]["truncated"], true);
    }

    #[test]
    fn runs_argv_without_a_shell_with_a_timeout() {
        let p = |c: &str, a: &[&str]| ExecParams {
            command: c.into(),
            args: a.iter().map(|s| s.to_string()).collect(),
        };
        let r = run_hook(
            Path::new("/bin/echo"),
            &p("a;b", &["$HOME", "x y"]),
            Duration::from_secs(5),
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["result"]["stdout"], "a;b $HOME x y\n");
        assert_eq!(v["result"]["exit_code"], 0);
        let started = Instant::now();
        let r = run_hook(
            Path::new("/bin/sleep"),
            &p("10", &[]),
            Duration::from_millis(200),
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["result"]["timed_out"], true);
        assert!(v["result"]["exit_code"].is_null());
        assert!(started.elapsed() < Duration::from_secs(5));
        let r = run_hook(
            Path::new("/nonexistent/hook"),
            &p("x", &[]),
            Duration::from_secs(1),
        );
        assert_eq!(r.error.unwrap().code, "internal_error");
    }
}
