//! The gateway's own share of a round trip: its `fleetgate_relay_latency_seconds` histogram
//! (`GET /metrics`), read before and after the measurement, so a run can tell the time spent
//! inside the gateway apart from the network's and the generator's. The bulk scenario reads
//! `fleetgate_stream_control_latency_seconds` the same way: how long credit (and the other
//! stream control messages) spent inside the gateway while data flowed.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Requests and responses.
pub const RELAY: &str = "fleetgate_relay_latency_seconds";
/// Stream control messages: open, accept, credit, close, reset.
pub const STREAM_CONTROL: &str = "fleetgate_stream_control_latency_seconds";

/// Cumulative counts by upper bound (seconds; +Inf as infinity) and the sum, as `/metrics`
/// shows them.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum_secs: f64,
}

/// The hops timed inside the gateway during the measurement. Quantiles are bucket bounds: the
/// smallest bound with at least that share of the hops at or below it.
#[derive(Debug, Clone, Serialize)]
pub struct HopFigures {
    pub hops: u64,
    pub mean_ms: f64,
    pub p50_le_ms: f64,
    pub p90_le_ms: f64,
    pub p99_le_ms: f64,
    pub p999_le_ms: f64,
}

/// Reads the histogram `metric`; `None` if the server has no such metric (not fleetgate, or
/// older).
pub async fn snapshot(
    addr: std::net::SocketAddr,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    metric: &str,
) -> Option<Snapshot> {
    parse(&fetch(addr, tls).await?, metric)
}

/// `GET /metrics`: the whole answer (headers included), or `None` if it could not be had.
pub async fn fetch(
    addr: std::net::SocketAddr,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
) -> Option<String> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let request = b"GET /metrics HTTP/1.1\r\nHost: fleetgate\r\nConnection: close\r\n\r\n";
    let mut text = Vec::new();
    match tls {
        Some((config, name)) => {
            let mut s = TlsConnector::from(config).connect(name, tcp).await.ok()?;
            s.write_all(request).await.ok()?;
            // The answer is complete even if the close is not clean.
            let _ = s.read_to_end(&mut text).await;
        }
        None => {
            let mut s = tcp;
            s.write_all(request).await.ok()?;
            let _ = s.read_to_end(&mut text).await;
        }
    }
    Some(String::from_utf8_lossy(&text).into_owned())
}

/// Where the connections are: per shard, in shard order, the values of the gauges
/// `fleetgate_devices_connected{shard}` and `fleetgate_management_connected{shard}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub devices_per_shard: Vec<u64>,
    pub management_per_shard: Vec<u64>,
}

pub fn placement(text: &str) -> Placement {
    Placement {
        devices_per_shard: per_shard(text, "fleetgate_devices_connected"),
        management_per_shard: per_shard(text, "fleetgate_management_connected"),
    }
}

/// The values of a per-shard metric (`NAME{shard="i"} value` lines), in shard order.
fn per_shard<T: std::str::FromStr + Copy>(text: &str, name: &str) -> Vec<T> {
    let mut v: Vec<(u64, T)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix("{shard=\"")?;
            let (shard, value) = rest.split_once("\"} ")?;
            Some((shard.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect();
    v.sort_unstable_by_key(|(shard, _)| *shard);
    v.into_iter().map(|(_, n)| n).collect()
}

/// Each shard thread's CPU seconds so far (`fleetgate_shard_cpu_seconds_total{shard}`), in
/// shard order; empty for a gateway that does not report them.
pub fn shard_cpu_secs(text: &str) -> Vec<f64> {
    per_shard(text, "fleetgate_shard_cpu_seconds_total")
}

/// Cores each shard used between two [`shard_cpu_secs`] readings `secs` apart (rounded to
/// 0.01); `None` when either reading is missing or they differ in shard count.
pub fn shard_cores(before: &[f64], after: &[f64], secs: f64) -> Option<Vec<f64>> {
    (!before.is_empty() && before.len() == after.len() && secs > 0.0).then(|| {
        before
            .iter()
            .zip(after)
            .map(|(a, b)| ((b - a) / secs * 100.0).round() / 100.0)
            .collect()
    })
}

pub fn parse(text: &str, metric: &str) -> Option<Snapshot> {
    let mut buckets = Vec::new();
    let mut sum_secs = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let value = line.rsplit(' ').next()?;
        if let Some(b) = rest.strip_prefix("_bucket{le=\"") {
            let le = b.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            buckets.push((le, value.parse().ok()?));
        } else if rest.starts_with("_sum ") {
            sum_secs = value.parse().ok();
        }
    }
    (!buckets.is_empty()).then(|| Snapshot {
        buckets,
        sum_secs: sum_secs.unwrap_or(0.0),
    })
}

/// What happened between two snapshots.
pub fn figures(before: &Snapshot, after: &Snapshot) -> Option<HopFigures> {
    if before.buckets.len() != after.buckets.len() {
        return None;
    }
    let counts: Vec<(f64, u64)> = before
        .buckets
        .iter()
        .zip(&after.buckets)
        .map(|(&(le, a), &(_, b))| (le, b.saturating_sub(a)))
        .collect();
    let hops = counts.last()?.1;
    if hops == 0 {
        return None;
    }
    let q = |share: f64| -> f64 {
        let need = (share * hops as f64).ceil() as u64;
        let le = counts
            .iter()
            .find(|&&(_, c)| c >= need)
            .map_or(f64::INFINITY, |&(le, _)| le);
        crate::summary::round3(le * 1e3)
    };
    Some(HopFigures {
        hops,
        mean_ms: crate::summary::round3((after.sum_secs - before.sum_secs) / hops as f64 * 1e3),
        p50_le_ms: q(0.5),
        p90_le_ms: q(0.9),
        p99_le_ms: q(0.99),
        p999_le_ms: q(0.999),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(counts: &[u64], sum: f64) -> String {
        let bounds = ["0.00001", "0.0001", "0.001", "+Inf"];
        let mut t = String::from("# TYPE fleetgate_relay_latency_seconds histogram\n");
        for (b, c) in bounds.iter().zip(counts) {
            t += &format!("{RELAY}_bucket{{le=\"{b}\"}} {c}\n");
        }
        t += &format!("{RELAY}_sum {sum}\n{RELAY}_count {}\n", counts[3]);
        t
    }

    #[test]
    fn quantiles_are_bucket_bounds_of_the_difference() {
        let before = parse(&text(&[10, 10, 10, 10], 0.001), RELAY).unwrap();
        // 1000 new hops: 500 ≤ 10 µs, 400 more ≤ 100 µs, 95 more ≤ 1 ms, 5 beyond.
        let after = parse(&text(&[510, 910, 1005, 1010], 0.101), RELAY).unwrap();
        let f = figures(&before, &after).unwrap();
        assert_eq!(f.hops, 1000);
        assert_eq!((f.p50_le_ms, f.p90_le_ms, f.p99_le_ms), (0.01, 0.1, 1.0));
        assert!(f.p999_le_ms.is_infinite());
        assert_eq!(f.mean_ms, 0.1);
    }

    #[test]
    fn cores_per_shard_from_two_readings() {
        let t0 = "fleetgate_shard_cpu_seconds_total{shard=\"1\"} 2.5\n\
                  fleetgate_shard_cpu_seconds_total{shard=\"0\"} 1\n";
        let t1 = "fleetgate_shard_cpu_seconds_total{shard=\"0\"} 2\n\
                  fleetgate_shard_cpu_seconds_total{shard=\"1\"} 8.5\n";
        let (a, b) = (shard_cpu_secs(t0), shard_cpu_secs(t1));
        assert_eq!(a, [1.0, 2.5]);
        assert_eq!(shard_cores(&a, &b, 10.0), Some(vec![0.1, 0.6]));
        assert_eq!(shard_cores(&[], &b, 10.0), None);
        assert_eq!(shard_cores(&a, &b[..1], 10.0), None);
    }

    #[test]
    fn placement_by_shard() {
        let t = "fleetgate_devices_connected{shard=\"1\"} 7\n\
                 fleetgate_devices_connected{shard=\"0\"} 9\n\
                 fleetgate_management_connected{shard=\"0\"} 0\n\
                 fleetgate_management_connected{shard=\"1\"} 1\n\
                 fleetgate_devices_connected_total 3\n";
        assert_eq!(
            placement(t),
            Placement {
                devices_per_shard: vec![9, 7],
                management_per_shard: vec![0, 1],
            }
        );
        assert_eq!(placement(""), Placement::default());
    }

    #[test]
    fn no_metric_no_figures() {
        assert!(parse("fleetgate_accepted_total 3\n", RELAY).is_none());
        // The other histogram of the same shape is not this one.
        assert!(parse(&text(&[1, 2, 3, 4], 0.0), STREAM_CONTROL).is_none());
        let s = parse(&text(&[1, 2, 3, 4], 0.0), RELAY).unwrap();
        assert!(figures(&s, &s).is_none(), "no hops in between");
    }
}
