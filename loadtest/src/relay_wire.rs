//! Parent ↔ device worker messages of the `relay` and `stream` scenarios. Same transport as
//! the other scenarios: the worker is started as `loadtest __relay-worker '<config JSON>'`,
//! takes commands on stdin (`go`, `stop`, one a line; end of input = stop) and reports JSON
//! lines on stdout.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::wire::TlsSettings;

/// Everything one device worker needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceWorkerConfig {
    pub index: usize,
    /// The device endpoint, `wss://…/usg/endpoint`.
    pub url: String,
    pub addr: SocketAddr,
    pub tls: TlsSettings,
    /// Credentials file; this worker's devices are lines `first_device .. + devices`.
    pub creds: PathBuf,
    pub first_device: u64,
    pub devices: u64,
    pub sources: Vec<IpAddr>,
    /// Connections in progress at once (this worker's share).
    pub concurrency: usize,
    pub handshake_timeout_ms: u64,
    /// tungstenite read buffer per device.
    pub read_buffer: usize,
    /// Window a device grants in `accept` (bytes management may have in flight).
    pub window: u32,
    /// Slow devices: each stream is read at most this fast, bytes per second.
    pub read_rate: Option<f64>,
    /// The worker stops on its own after this long.
    pub max_runtime_secs: u64,
    /// Devices use the lean wire (`lean.rs`) instead of tokio-tungstenite.
    #[serde(default)]
    pub lean: bool,
}

/// Parent → worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCommand {
    Go,
    Stop,
}

impl DeviceCommand {
    pub fn as_line(self) -> &'static str {
        match self {
            Self::Go => "go\n",
            Self::Stop => "stop\n",
        }
    }

    pub fn parse(line: &str) -> Option<Self> {
        match line.trim() {
            "go" => Some(Self::Go),
            "stop" => Some(Self::Stop),
            _ => None,
        }
    }
}

/// Worker → parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceReport {
    /// Credentials loaded; waiting for `go`.
    Ready,
    /// Every device has its session or gave up (`failed`: device numbers, as lines of the
    /// credentials file).
    Connected {
        connected: u64,
        failed: Vec<u64>,
        secs: f64,
        samples: BTreeMap<String, String>,
    },
    Finished(DeviceStats),
    Fatal {
        message: String,
    },
}

/// What a worker's devices did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceStats {
    /// Requests received and answered.
    pub requests: u64,
    /// Streams opened by management and accepted.
    pub streams_accepted: u64,
    /// Streams management closed and the device closed back.
    pub streams_closed: u64,
    /// Streams reset by the gateway or management.
    pub streams_reset: u64,
    /// Data bytes received on streams.
    pub stream_bytes: u64,
    /// `credit` envelopes sent.
    pub credits: u64,
    /// `management_down` events (a management connection that had opened streams closed).
    #[serde(default)]
    pub management_down: u64,
    /// Envelopes of other kinds, or that did not parse.
    pub unexpected: u64,
    /// Sessions the gateway ended before `stop` (with the first reason seen).
    pub lost: u64,
    pub lost_sample: Option<String>,
    /// CPU seconds of the worker process, start to finish.
    pub cpu_secs: f64,
    pub rss_bytes: u64,
}

impl DeviceStats {
    pub fn merge(&mut self, o: &Self) {
        self.requests += o.requests;
        self.streams_accepted += o.streams_accepted;
        self.streams_closed += o.streams_closed;
        self.streams_reset += o.streams_reset;
        self.stream_bytes += o.stream_bytes;
        self.credits += o.credits;
        self.unexpected += o.unexpected;
        self.management_down += o.management_down;
        self.lost += o.lost;
        if self.lost_sample.is_none() {
            self.lost_sample.clone_from(&o.lost_sample);
        }
        self.cpu_secs += o.cpu_secs;
        self.rss_bytes += o.rss_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_reports_round_trip() {
        for c in [DeviceCommand::Go, DeviceCommand::Stop] {
            assert_eq!(DeviceCommand::parse(c.as_line()), Some(c));
        }
        let r = DeviceReport::Connected {
            connected: 3,
            failed: vec![7],
            secs: 1.5,
            samples: BTreeMap::new(),
        };
        let line = serde_json::to_string(&r).unwrap();
        let DeviceReport::Connected { failed, .. } = serde_json::from_str(&line).unwrap() else {
            panic!("{line}");
        };
        assert_eq!(failed, [7]);
        let mut a = DeviceStats {
            requests: 2,
            ..Default::default()
        };
        a.merge(&DeviceStats {
            requests: 3,
            lost: 1,
            lost_sample: Some("x".into()),
            ..Default::default()
        });
        assert_eq!(
            (a.requests, a.lost, a.lost_sample.as_deref()),
            (5, 1, Some("x"))
        );
    }
}
