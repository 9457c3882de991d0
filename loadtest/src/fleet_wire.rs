//! Parent ↔ worker messages of the `register` and `reconnect` scenarios. Same transport as
//! `idle` (see [`crate::wire`]): the worker is started as `loadtest __fleet-worker
//! '<FleetConfig JSON>'`, takes commands on stdin (`go`, `mark`, `stop`, one a line) and
//! reports JSON lines on stdout.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::creds::Credential;
use crate::wire::TlsSettings;

/// Everything one worker needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetConfig {
    pub index: usize,
    pub url: String,
    pub addr: SocketAddr,
    pub tls: TlsSettings,
    /// This worker's devices are `first_device .. first_device + devices` (lines of the keys
    /// or credentials file, and the number in the unit ID).
    pub first_device: u64,
    pub devices: u64,
    pub sources: Vec<IpAddr>,
    /// Devices in their first connection attempt at once (this worker's share).
    pub concurrency: usize,
    /// This worker's share of the start rate cap, devices per second.
    pub ramp_rate: Option<f64>,
    pub handshake_timeout_ms: u64,
    pub close_timeout_ms: u64,
    pub read_buffer: usize,
    pub backoff: Backoff,
    /// The worker stops on its own after this long.
    pub max_runtime_secs: u64,
    pub job: Job,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Job {
    /// Register with one-time keys, then connect once with the new credential.
    Register {
        keys: PathBuf,
        unit_prefix: String,
        /// Attempts per device (connect failures and retryable refusals are retried).
        max_attempts: u32,
        /// Continue the registration connection as the session (`"session": true`) instead
        /// of reconnecting with the credential.
        stay: bool,
    },
    /// Connect with stored credentials and stay connected, reconnecting with backoff.
    Reconnect {
        creds: PathBuf,
        /// Reconnect attempts in flight at once in this worker (`None`: no cap).
        #[serde(default)]
        attempt_cap: Option<usize>,
        /// Keep each device's TLS client configuration (and its session tickets) across
        /// reconnects and resume, as the fleetgate agent does.
        #[serde(default)]
        resume: bool,
    },
}

/// Parent → worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetCommand {
    /// Start.
    Go,
    /// From now on, sessions whose connect starts count as re-authentications.
    Mark,
    /// Close everything, report, exit.
    Stop,
}

impl FleetCommand {
    pub fn as_line(self) -> &'static str {
        match self {
            Self::Go => "go\n",
            Self::Mark => "mark\n",
            Self::Stop => "stop\n",
        }
    }

    pub fn parse(line: &str) -> Option<Self> {
        match line.trim() {
            "go" => Some(Self::Go),
            "mark" => Some(Self::Mark),
            "stop" => Some(Self::Stop),
            _ => None,
        }
    }
}

/// Worker → parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FleetReport {
    Ready,
    Progress(FleetProgress),
    /// `register`: every device finished (ready or gave up). `reconnect`: every device had its
    /// first session (or gave up).
    RampDone {
        secs: f64,
    },
    /// `register`: a device is ready; its credential for the file.
    Credential(Credential),
    Finished(Box<FleetResult>),
    Fatal {
        message: String,
    },
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    /// TCP connect failed (refused while the gateway is down, no ports, …).
    Connect,
    /// TLS handshake failed or a TLS alert arrived (e.g. a rejected client certificate).
    Tls,
    /// HTTP upgrade refused or broken.
    Upgrade,
    /// The step did not finish within `--handshake-timeout`.
    Timeout,
    /// An unexpected or malformed message.
    Protocol,
    /// The gateway closed the connection before the expected message.
    Closed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailCounts {
    pub connect: u64,
    pub tls: u64,
    pub upgrade: u64,
    pub timeout: u64,
    pub protocol: u64,
    pub closed: u64,
}

impl FailCounts {
    pub fn add(&mut self, kind: FailKind) {
        *match kind {
            FailKind::Connect => &mut self.connect,
            FailKind::Tls => &mut self.tls,
            FailKind::Upgrade => &mut self.upgrade,
            FailKind::Timeout => &mut self.timeout,
            FailKind::Protocol => &mut self.protocol,
            FailKind::Closed => &mut self.closed,
        } += 1;
    }

    pub fn merge(&mut self, o: &Self) {
        self.connect += o.connect;
        self.tls += o.tls;
        self.upgrade += o.upgrade;
        self.timeout += o.timeout;
        self.protocol += o.protocol;
        self.closed += o.closed;
    }

    pub fn total(&self) -> u64 {
        self.connect + self.tls + self.upgrade + self.timeout + self.protocol + self.closed
    }
}

/// Running totals of a worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetProgress {
    /// Devices started.
    pub launched: u64,
    /// `register`: `registered` received.
    pub registered: u64,
    /// `register`: session `hello` received with the new credential.
    pub ready: u64,
    /// Devices that gave up (attempts exhausted or a terminal refusal).
    pub gave_up: u64,
    /// Connection attempts (TCP connects started).
    pub attempts: u64,
    /// `reconnect`: sessions open now.
    pub connected: u64,
    /// `reconnect`: devices that had at least one session.
    pub first_sessions: u64,
    /// Sessions whose TLS handshake was a resumption.
    pub resumed: u64,
    /// `reconnect`: sessions that ended without us closing them.
    pub lost: u64,
    /// `reconnect`: connected now with a session whose connect started after `mark`.
    pub reauthed: u64,
    /// `reconnect`: when `reauthed` last reached the devices still trying (unix ms); `None`
    /// while it is below.
    pub all_reauthed_at_ms: Option<u64>,
    /// Refusals by reason code.
    pub refusals: BTreeMap<String, u64>,
    pub errors: FailCounts,
    /// Timeouts by the step that did not finish (`TCP connect`, `TLS handshake`,
    /// `WebSocket upgrade`, `hello`, …).
    #[serde(default)]
    pub timeouts: BTreeMap<String, u64>,
}

/// A worker's final figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetResult {
    pub progress: FleetProgress,
    /// First message of each failure kind and of each refusal reason.
    pub error_samples: BTreeMap<String, String>,
    /// `register` sent → `registered` received, µs, (value, count) pairs.
    pub register_us: Vec<(u64, u64)>,
    /// `register`: first TCP connect → session `hello` with the new credential, µs.
    pub ready_us: Vec<(u64, u64)>,
    /// TCP connect → session `hello`, every successful session, µs.
    pub session_us: Vec<(u64, u64)>,
    /// `reconnect`: loss of the session after `mark` → next session `hello`, µs.
    pub downtime_us: Vec<(u64, u64)>,
    /// `register`: devices ready in each second after `go`.
    pub per_second: Vec<u64>,
    /// `go` → last device finished.
    pub done_secs: f64,
    /// `reconnect`: unix ms of each device's first session `hello` after `mark`.
    pub reauth_at_ms: Vec<u64>,
    /// `reconnect`: unix ms of the first and the last session loss after `mark`.
    pub first_loss_ms: Option<u64>,
    pub last_loss_ms: Option<u64>,
    /// `reconnect`: connect attempts per device after `mark`, (value, count) pairs.
    pub attempts_after_mark: Vec<(u64, u64)>,
    /// CPU seconds the worker used (user + system), start to finish.
    #[serde(default)]
    pub cpu_secs: f64,
}

/// Milliseconds since the Unix epoch: the clock the parent and its workers share.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_reports_round_trip() {
        for c in [FleetCommand::Go, FleetCommand::Mark, FleetCommand::Stop] {
            assert_eq!(FleetCommand::parse(c.as_line()), Some(c));
        }
        let mut p = FleetProgress::default();
        p.refusals.insert("limit_reached".into(), 3);
        p.errors.add(FailKind::Connect);
        let line = serde_json::to_string(&FleetReport::Progress(p)).unwrap();
        let FleetReport::Progress(back) = serde_json::from_str(&line).unwrap() else {
            panic!("not progress: {line}");
        };
        assert_eq!(back.refusals["limit_reached"], 3);
        assert_eq!(back.errors.total(), 1);
    }
}
