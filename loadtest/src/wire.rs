//! What the parent and its worker processes tell each other.
//!
//! The parent starts each worker as `loadtest __worker '<WorkerConfig as JSON>'`, writes
//! [`Command`]s to its stdin, one per line, and reads [`Report`]s from its stdout, one JSON
//! object per line. A worker whose stdin closes stops its devices and exits, so no worker
//! outlives its parent for long.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use clap::ValueEnum;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::tls::{TlsVersions, Trust};

/// Everything a worker needs to run its share of the devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub index: usize,
    /// Request URI of the upgrade (also gives the `Host:` header).
    pub url: String,
    /// Where every device connects.
    pub addr: SocketAddr,
    /// `None` for `ws://`.
    pub tls: Option<TlsSettings>,
    /// This worker's devices are `first_device .. first_device + devices`.
    pub first_device: u64,
    pub devices: u64,
    /// Source addresses, shared by all workers; device `id` binds `sources[id % len]`.
    pub sources: Vec<IpAddr>,
    pub ping: PingSettings,
    /// This worker's share of `--ramp-rate`, in connects per second.
    pub ramp_rate: Option<f64>,
    /// This worker's share of `--concurrency` (handshakes in flight).
    pub concurrency: usize,
    pub handshake_timeout_ms: u64,
    pub close_timeout_ms: u64,
    /// tungstenite read buffer per device.
    pub read_buffer: usize,
    /// The worker stops on its own after this long, whatever the parent says.
    pub max_runtime_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsSettings {
    pub trust: Trust,
    pub versions: TlsVersions,
    /// SNI and the name the certificate is checked against (an IP literal sends no SNI).
    pub server_name: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PingSettings {
    pub kind: PingKind,
    pub size: usize,
    pub interval_ms: u64,
}

/// What a device sends every ping interval.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PingKind {
    /// A WebSocket Ping control frame; the server answers with a Pong.
    Ping,
    /// A binary message; an echo server sends it back.
    Binary,
    /// A text message; an echo server sends it back.
    Text,
}

/// Parent → worker, one per line on the worker's stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Start connecting.
    Go,
    /// Every worker has finished its ramp: pong round trips count from now on.
    Hold,
    /// Close every device (close code 1000), report and exit.
    Stop,
}

impl Command {
    pub fn as_line(self) -> &'static str {
        match self {
            Self::Go => "go\n",
            Self::Hold => "hold\n",
            Self::Stop => "stop\n",
        }
    }

    pub fn parse(line: &str) -> Option<Self> {
        match line.trim() {
            "go" => Some(Self::Go),
            "hold" => Some(Self::Hold),
            "stop" => Some(Self::Stop),
            _ => None,
        }
    }
}

/// Worker → parent, one JSON object per line on the worker's stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    /// Set up (TLS configuration loaded); waiting for [`Command::Go`].
    Ready,
    /// Running totals, a few times per second.
    Progress(Progress),
    /// Every device of this worker has either established or failed.
    RampDone { ramp_secs: f64 },
    /// Final figures; the worker exits after this.
    Finished(Box<WorkerResult>),
    /// The worker cannot run (bad configuration); it exits after this.
    Fatal { message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub launched: u64,
    pub established: u64,
    pub failed: u64,
    /// Devices connected right now.
    pub connected: u64,
    pub errors: ErrorCounts,
    pub pings_sent: u64,
    pub pongs_received: u64,
}

/// Why a device failed, by phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// TCP connect (or binding the source address) failed.
    Connect,
    /// The TLS handshake failed.
    Tls,
    /// The WebSocket upgrade was refused or broken.
    Upgrade,
    /// Connect + TLS + upgrade did not finish within `--handshake-timeout`.
    Timeout,
    /// An established device lost its connection before it was told to close.
    ClosedEarly,
}

/// Count of failures by [`ErrorKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    pub connect: u64,
    pub tls: u64,
    pub upgrade: u64,
    pub timeout: u64,
    pub closed_early: u64,
}

impl ErrorCounts {
    pub fn add(&mut self, kind: ErrorKind) {
        *self.slot(kind) += 1;
    }

    fn slot(&mut self, kind: ErrorKind) -> &mut u64 {
        match kind {
            ErrorKind::Connect => &mut self.connect,
            ErrorKind::Tls => &mut self.tls,
            ErrorKind::Upgrade => &mut self.upgrade,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::ClosedEarly => &mut self.closed_early,
        }
    }

    pub fn merge(&mut self, other: &Self) {
        self.connect += other.connect;
        self.tls += other.tls;
        self.upgrade += other.upgrade;
        self.timeout += other.timeout;
        self.closed_early += other.closed_early;
    }

    /// Devices that never established (every kind but `closed_early`).
    pub fn handshake_failures(&self) -> u64 {
        self.connect + self.tls + self.upgrade + self.timeout
    }
}

/// A worker's final figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub progress: Progress,
    /// The first error message of each kind.
    pub error_samples: BTreeMap<ErrorKind, String>,
    /// Connect → upgrade complete, microseconds, as (value, count) pairs.
    pub handshake_us: Vec<(u64, u64)>,
    /// Ping → pong during the hold, microseconds, as (value, count) pairs.
    pub rtt_us: Vec<(u64, u64)>,
    /// Devices established in each second after `go`.
    pub per_second: Vec<u64>,
    /// `go` → last handshake finished (established or failed).
    pub ramp_secs: f64,
    /// "TLSv1_3 TLS13_AES_128_GCM_SHA256" → devices.
    pub tls: BTreeMap<String, u64>,
    /// A ping was due while the previous one was still unanswered.
    pub pongs_missing: u64,
    /// Devices that sent close 1000 and got the server's close back.
    pub closed_cleanly: u64,
    /// Devices whose close handshake failed or timed out.
    pub close_unclean: u64,
}

/// Upper bound of the latency histograms: 10 minutes in microseconds.
pub const HISTOGRAM_MAX_US: u64 = 600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("valid histogram bounds")
}

/// A histogram as (value, count) pairs: compact, exact up to the histogram's precision.
pub fn encode_histogram(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn decode_histogram_into(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        h.saturating_record_n(value, count);
    }
}

/// Records a duration in microseconds, clamped into the histogram's range.
pub fn record_duration(h: &mut Histogram<u64>, d: std::time::Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    h.saturating_record(us.clamp(1, HISTOGRAM_MAX_US));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_survives_the_pipe() {
        let mut h = new_histogram();
        for us in [150, 900, 1_200, 1_250, 80_000, 2_000_000] {
            h.record(us).unwrap();
        }
        let json = serde_json::to_string(&encode_histogram(&h)).unwrap();
        let pairs: Vec<(u64, u64)> = serde_json::from_str(&json).unwrap();
        let mut back = new_histogram();
        decode_histogram_into(&mut back, &pairs);
        assert_eq!(back.len(), 6);
        for q in [0.0, 0.5, 0.99, 1.0] {
            assert_eq!(
                back.value_at_quantile(q),
                h.value_at_quantile(q),
                "quantile {q}"
            );
        }
    }

    #[test]
    fn reports_round_trip_as_json_lines() {
        let report = Report::RampDone { ramp_secs: 1.5 };
        let line = serde_json::to_string(&report).unwrap();
        assert_eq!(line, r#"{"type":"ramp_done","ramp_secs":1.5}"#);
        assert!(matches!(
            serde_json::from_str::<Report>(&line).unwrap(),
            Report::RampDone { ramp_secs } if ramp_secs == 1.5
        ));
        assert_eq!(Command::parse(Command::Hold.as_line()), Some(Command::Hold));
    }

    #[test]
    fn error_counts_split_handshake_failures_from_drops() {
        let mut e = ErrorCounts::default();
        e.add(ErrorKind::Connect);
        e.add(ErrorKind::Timeout);
        e.add(ErrorKind::ClosedEarly);
        assert_eq!((e.handshake_failures(), e.closed_early), (2, 1));
    }
}
