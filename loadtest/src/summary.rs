//! The JSON summary of an `idle` run and the arithmetic behind it. Field meanings are
//! documented in `loadtest/README.md`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::wire::{ErrorCounts, ErrorKind};

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: &'static str,
    pub url: String,
    pub target_devices: u64,
    /// Devices that completed TCP + TLS + upgrade.
    pub established: u64,
    /// Devices still connected when the hold ended.
    pub connected_at_end: u64,
    pub ok: bool,
    pub verdict: String,
    pub errors: ErrorCounts,
    pub error_samples: BTreeMap<ErrorKind, String>,
    pub connect_rate: ConnectRate,
    pub handshake_ms: Latency,
    pub pong: PongStats,
    pub gateway: Option<ServerMemory>,
    pub generator: GeneratorMemory,
    pub tls: Option<TlsSummary>,
    pub close: CloseStats,
    pub setup: Setup,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectRate {
    /// established / ramp_secs.
    pub overall_per_sec: f64,
    /// Median over the full seconds of the ramp of devices established in that second.
    pub median_per_sec: f64,
    pub peak_per_sec: u64,
    /// `go` → last handshake finished (established or failed), slowest worker.
    pub ramp_secs: f64,
    /// Devices established in each second of the ramp, all workers together.
    pub per_second: Vec<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PongStats {
    pub kind: String,
    pub pings_sent: u64,
    pub replies_received: u64,
    /// A ping fell due while the previous one was still unanswered.
    pub replies_missing: u64,
    /// Round trips measured during the hold, milliseconds.
    pub rtt_ms: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerMemory {
    pub pid: u32,
    pub name: Option<String>,
    pub rss_before_bytes: Option<u64>,
    pub rss_after_ramp_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// (rss_after_ramp − rss_before) / established.
    pub bytes_per_idle_device: Option<f64>,
    pub kib_per_idle_device: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GeneratorMemory {
    pub workers: usize,
    /// Sum of the workers' RSS when ready, before connecting.
    pub workers_rss_before_bytes: u64,
    pub workers_rss_after_ramp_bytes: u64,
    pub workers_rss_end_bytes: u64,
    /// (workers_rss_after_ramp − workers_rss_before) / established.
    pub bytes_per_connection: Option<f64>,
    pub parent_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsSummary {
    pub version: String,
    pub cipher: String,
    pub group: String,
    /// "version cipher group" → devices.
    pub negotiated: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CloseStats {
    /// Sent close 1000 and got the server's close back in time.
    pub clean: u64,
    pub unclean: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Setup {
    /// The address every device connected to.
    pub server_addr: String,
    pub workers: usize,
    pub sources: Vec<String>,
    pub ping_size: usize,
    pub ping_interval_secs: f64,
    pub hold_secs: f64,
    /// How long the hold really lasted (Ctrl-C ends it early).
    pub held_secs: f64,
    pub ramp_rate: Option<f64>,
    pub concurrency: usize,
    pub handshake_timeout_secs: f64,
    pub interrupted: bool,
}

/// Median of `values` (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Connect rates from the per-second counts: the overall rate is `established / ramp_secs`;
/// the median covers only the ramp's full seconds (a partial last second would drag it
/// down); a ramp shorter than a second reports the overall rate as its median.
pub fn connect_rate(per_second: &[u64], ramp_secs: f64, established: u64) -> ConnectRate {
    let overall = if ramp_secs > 0.0 {
        established as f64 / ramp_secs
    } else {
        0.0
    };
    let full_seconds = (ramp_secs.floor() as usize).min(per_second.len());
    let rates: Vec<f64> = per_second[..full_seconds]
        .iter()
        .map(|&c| c as f64)
        .collect();
    ConnectRate {
        overall_per_sec: round2(overall),
        median_per_sec: round2(median(&rates).unwrap_or(overall)),
        peak_per_sec: per_second.iter().copied().max().unwrap_or(0),
        ramp_secs: round3(ramp_secs),
        per_second: per_second.to_vec(),
    }
}

/// Growth of a process's RSS per device; `None` without devices or readings. Negative when
/// the process shrank (it happens: allocators return memory).
pub fn bytes_per_device(before: Option<u64>, after: Option<u64>, devices: u64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (devices > 0).then(|| round2((after as f64 - before as f64) / devices as f64))
}

/// Percentiles of a microsecond histogram, in milliseconds.
pub fn latency_ms(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    let ms = |us: u64| round3(us as f64 / 1000.0);
    Latency {
        samples: h.len(),
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
        mean: round3(h.mean() / 1000.0),
    }
}

/// Adds per-second series of several workers (they share the same `go` instant).
pub fn add_series(total: &mut Vec<u64>, series: &[u64]) {
    if total.len() < series.len() {
        total.resize(series.len(), 0);
    }
    for (t, s) in total.iter_mut().zip(series) {
        *t += s;
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn connect_rate_ignores_the_partial_last_second() {
        // 3.4 s ramp: full seconds 0..3 count, the 400 in the partial 4th second do not.
        let r = connect_rate(&[2000, 3000, 2500, 400], 3.4, 7900);
        assert_eq!(r.median_per_sec, 2500.0);
        assert_eq!(r.overall_per_sec, 2323.53);
        assert_eq!(r.peak_per_sec, 3000);
    }

    #[test]
    fn short_ramp_reports_overall_rate_as_median() {
        let r = connect_rate(&[500], 0.25, 500);
        assert_eq!((r.overall_per_sec, r.median_per_sec), (2000.0, 2000.0));
        let none = connect_rate(&[], 0.0, 0);
        assert_eq!((none.overall_per_sec, none.median_per_sec), (0.0, 0.0));
    }

    #[test]
    fn bytes_per_device_is_growth_over_devices() {
        let mib = 1024 * 1024;
        assert_eq!(
            bytes_per_device(Some(10 * mib), Some(310 * mib), 2000),
            Some(157286.4)
        );
        assert_eq!(
            bytes_per_device(Some(10 * mib), Some(9 * mib), 1024),
            Some(-1024.0)
        );
        assert_eq!(bytes_per_device(Some(1), Some(2), 0), None);
        assert_eq!(bytes_per_device(None, Some(2), 10), None);
    }

    #[test]
    fn series_of_workers_add_up() {
        let mut total = vec![1, 2];
        add_series(&mut total, &[10, 20, 30]);
        assert_eq!(total, [11, 22, 30]);
    }

    #[test]
    fn latency_in_milliseconds() {
        let mut h = crate::wire::new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap(); // 10 µs .. 10 ms
        }
        let l = latency_ms(&h);
        assert_eq!(l.samples, 1000);
        assert!((l.p50 - 5.0).abs() < 0.01, "p50 {}", l.p50);
        assert!((l.p99 - 9.9).abs() < 0.01, "p99 {}", l.p99);
        assert!((l.max - 10.0).abs() < 0.01, "max {}", l.max);
    }
}
