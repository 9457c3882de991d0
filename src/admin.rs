//! The local admin socket: `DATA_DIR/admin.sock`, a Unix stream socket (mode 0600) served by
//! the gateway's control thread, so commands on the same host reach a running gateway at once.
//!
//! Protocol: the client sends one JSON object on one line, the gateway answers one JSON object
//! on one line and closes. Requests: `{"cmd":"status"}`, `{"cmd":"reload"}` (re-read the
//! keystore and the configuration file now, like SIGHUP). Answers always carry `"ok": true|false`; failures carry
//! `"error"`. Only the owner of the data dir can connect (file mode), which is the
//! authentication.
//!
//! The socket also guards the data dir: a second gateway started on the same data dir finds a
//! live socket and refuses to start.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// File name of the socket inside the data dir.
pub const SOCKET_NAME: &str = "admin.sock";

/// Errors of the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Another gateway answers on this data dir's socket.
    #[error("another gateway is already running with data dir {0} (its admin socket answers)")]
    InUse(PathBuf),
    /// No gateway is listening on the socket.
    #[error("no gateway is running with data dir {dir} ({reason})")]
    NotRunning {
        /// The data dir.
        dir: PathBuf,
        /// Why the connection failed.
        reason: std::io::Error,
    },
    /// Socket I/O failed.
    #[error("admin socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The answer was not understood.
    #[error("admin socket: bad answer: {0}")]
    BadAnswer(String),
}

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Health and counters.
    Status,
    /// Re-read the keystore and the configuration file now.
    Reload,
    /// Re-read the revoked device credentials now and close their sessions (after
    /// `fleetgate devices remove`).
    Refresh,
    /// Set the device connection limit (0 = unlimited) until the next restart.
    SetLimit {
        /// The new limit.
        max_devices: u64,
    },
    /// The connected devices.
    Sessions,
}

/// An answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response {
    /// Whether the command succeeded.
    pub ok: bool,
    /// Why not, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `/usg/check-status` value (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Backend in use (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Number of shards (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
    /// Open TCP connections (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// Open device WebSockets (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<u64>,
    /// Open management WebSockets (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management: Option<u64>,
    /// Authenticated device sessions (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_sessions: Option<u64>,
    /// The device connection limit, 0 = unlimited (status, set-limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_devices: Option<u64>,
    /// Registrations granted since start (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registrations: Option<u64>,
    /// Registrations refused since start (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registrations_refused: Option<u64>,
    /// Devices rejected by the connection limit since start (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_rejections: Option<u64>,
    /// Resident memory in bytes (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// The connected devices (sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<crate::control::LiveSession>>,
    /// Configuration keys changed and applied live (reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<Vec<String>>,
    /// Configuration keys changed that need a restart (reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_needed: Option<Vec<String>>,
}

impl Response {
    /// A failure answer.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            ..Self::default()
        }
    }
}

/// The socket path for a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Binds the admin socket (non-blocking, mode 0600). A stale socket file left by a crash is
/// replaced; a live one means another gateway uses this data dir.
pub fn bind(data_dir: &Path) -> Result<UnixListener, AdminError> {
    let path = socket_path(data_dir);
    let io = |source| AdminError::Io {
        path: path.clone(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(AdminError::InUse(data_dir.to_owned()));
        }
        std::fs::remove_file(&path).map_err(io)?;
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    Ok(listener)
}

/// Serves every pending connection on `listener` with `handle` (never blocks for long: each
/// client gets one second to send its line).
pub fn serve_pending(listener: &UnixListener, mut handle: impl FnMut(Request) -> Response) {
    while let Ok((stream, _)) = listener.accept() {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        let answer = match reader.read_line(&mut line) {
            Ok(0) => continue,
            Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(req) => handle(req),
                Err(e) => Response::failed(format!("bad request: {e}")),
            },
            Err(e) => Response::failed(format!("cannot read the request: {e}")),
        };
        let mut w = &stream;
        let mut text = serde_json::to_string(&answer).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        let _ = w.write_all(text.as_bytes());
    }
}

/// Sends one request to the gateway running on `data_dir` and returns its answer.
pub fn request(data_dir: &Path, req: &Request) -> Result<Response, AdminError> {
    let path = socket_path(data_dir);
    let stream = UnixStream::connect(&path).map_err(|reason| AdminError::NotRunning {
        dir: data_dir.to_owned(),
        reason,
    })?;
    let io = |source| AdminError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut text = serde_json::to_string(req).map_err(|e| AdminError::BadAnswer(e.to_string()))?;
    text.push('\n');
    (&stream).write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    serde_json::from_str(line.trim()).map_err(|e| AdminError::BadAnswer(format!("{e}: {line}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_answer_round_trip_and_a_live_socket_guards_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        let listener = bind(dir.path()).unwrap();
        let mode = std::fs::metadata(socket_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(bind(dir.path()), Err(AdminError::InUse(_))));
        let d = dir.path().to_owned();
        let client = std::thread::spawn(move || request(&d, &Request::Status).unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !client.is_finished() && std::time::Instant::now() < deadline {
            serve_pending(&listener, |req| {
                assert_eq!(req, Request::Status);
                Response {
                    ok: true,
                    status: Some("warn".into()),
                    ..Response::default()
                }
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        let answer = client.join().unwrap();
        assert!(answer.ok);
        assert_eq!(answer.status.as_deref(), Some("warn"));
        // A stale socket (no listener) is replaced.
        drop(listener);
        bind(dir.path()).unwrap();
    }

    #[test]
    fn no_gateway_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = request(dir.path(), &Request::Reload).unwrap_err();
        assert!(err.to_string().contains("no gateway is running"), "{err}");
    }
}
