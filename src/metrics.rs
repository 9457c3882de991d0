//! Counters and gauges, one block per shard, rendered in the Prometheus text format on
//! `GET /metrics`.
//!
//! Each shard writes only its own block (relaxed atomics, no contention; the block is
//! cache-line aligned so shards never share a line); any shard can read all blocks to answer
//! a scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::status::Health;

/// Error kinds counted in `fleetgate_errors_total{kind=…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum ErrorKind {
    /// Accept failed.
    Accept = 0,
    /// TLS handshake or record error.
    Tls,
    /// Malformed or refused HTTP request.
    Http,
    /// WebSocket protocol violation by the peer.
    WebSocket,
    /// TLS handshake timeout.
    HandshakeTimeout,
    /// HTTP head timeout (slow loris).
    HeadTimeout,
    /// WebSocket idle timeout.
    IdleTimeout,
    /// Socket receive error (reset, …).
    Recv,
    /// Socket send error.
    Send,
    /// Connection refused because the shard was full.
    ShardFull,
    /// Receiving paused because a peer did not read its output.
    Backpressure,
}

/// A metric name, its help text and how to read it from a shard's block.
type Field = (&'static str, &'static str, fn(&ShardStats) -> &AtomicU64);

const ERROR_KINDS: [(&str, ErrorKind); 11] = [
    ("accept", ErrorKind::Accept),
    ("tls", ErrorKind::Tls),
    ("http", ErrorKind::Http),
    ("websocket", ErrorKind::WebSocket),
    ("handshake_timeout", ErrorKind::HandshakeTimeout),
    ("head_timeout", ErrorKind::HeadTimeout),
    ("idle_timeout", ErrorKind::IdleTimeout),
    ("recv", ErrorKind::Recv),
    ("send", ErrorKind::Send),
    ("shard_full", ErrorKind::ShardFull),
    ("backpressure", ErrorKind::Backpressure),
];

/// One shard's counters.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct ShardStats {
    /// Open TCP connections (gauge).
    pub connections: AtomicU64,
    /// Open device WebSockets (gauge).
    pub devices: AtomicU64,
    /// Open management WebSockets (gauge).
    pub management: AtomicU64,
    /// Open echo WebSockets (gauge).
    pub echo: AtomicU64,
    /// Accepted TCP connections.
    pub accepted: AtomicU64,
    /// Completed TLS 1.2 handshakes.
    pub handshakes_tls12: AtomicU64,
    /// Completed TLS 1.3 handshakes.
    pub handshakes_tls13: AtomicU64,
    /// Completed handshakes that resumed a session (tickets).
    pub handshakes_resumed: AtomicU64,
    /// HTTP requests answered without an upgrade.
    pub http_requests: AtomicU64,
    /// WebSocket upgrades.
    pub upgrades: AtomicU64,
    /// Bytes received (ciphertext).
    pub bytes_in: AtomicU64,
    /// Bytes sent (ciphertext).
    pub bytes_out: AtomicU64,
    /// WebSocket messages received.
    pub ws_messages_in: AtomicU64,
    /// Relay envelopes received from management connections and devices.
    pub relay_in: AtomicU64,
    /// Relay envelopes delivered to a connection.
    pub relay_out: AtomicU64,
    /// Relay data dropped (a stream over its window was reset).
    pub relay_dropped: AtomicU64,
    /// Bytes of relayed data this shard holds queued for its connections, plus what it sent
    /// to other shards that they have not taken yet (gauge; the memory budget's measure).
    pub relay_buffered: AtomicU64,
    /// Connections paused because the gateway was over its memory budget.
    pub budget_pauses: AtomicU64,
    /// Management connections this shard handed to another shard after their upgrade.
    pub management_moves: AtomicU64,
    /// The shard thread's kernel thread ID, for its CPU time (0 until it runs).
    pub thread: AtomicU64,
    /// Errors by kind.
    pub errors: [AtomicU64; 11],
    /// Requests and responses by time inside the gateway.
    pub relay_latency: LatencyHistogram,
    /// Stream control messages (open, accept, credit, close, reset) by time inside the
    /// gateway: do they overtake bulk data (`docs/protocol.md` §6.7)?
    pub stream_control_latency: LatencyHistogram,
}

/// Time inside the gateway by [`RELAY_LATENCY_BUCKETS_US`] (the last is +Inf), and the sum.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    pub buckets: [AtomicU64; RELAY_LATENCY_BUCKETS_US.len() + 1],
    /// Sum of the times, nanoseconds.
    pub sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Counts one message that spent `elapsed` inside the gateway.
    pub fn record(&self, elapsed: std::time::Duration) {
        let us = elapsed.as_micros() as u64;
        let i = RELAY_LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(RELAY_LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Upper bounds of the relay-latency histogram, microseconds.
pub const RELAY_LATENCY_BUCKETS_US: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000,
];

impl ShardStats {
    /// Adds 1 to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts 1 from a gauge.
    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts an error.
    pub fn error(&self, kind: ErrorKind) {
        Self::inc(&self.errors[kind as usize]);
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Sum of a gauge or counter over all shards.
pub fn total(shards: &[ShardStats], f: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
    shards.iter().map(|s| get(f(s))).sum()
}

/// Renders all shards' counters plus process-wide facts in the Prometheus text format.
/// One histogram of [`LatencyHistogram`]s, summed over the shards.
fn histogram(
    o: &mut String,
    name: &str,
    help: &str,
    shards: &[ShardStats],
    h: impl Fn(&ShardStats) -> &LatencyHistogram,
) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, le) in RELAY_LATENCY_BUCKETS_US
        .iter()
        .map(|us| format!("{}", *us as f64 / 1e6))
        .chain(std::iter::once("+Inf".to_string()))
        .enumerate()
    {
        cumulative += shards.iter().map(|s| get(&h(s).buckets[i])).sum::<u64>();
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let sum_ns: u64 = shards.iter().map(|s| get(&h(s).sum_ns)).sum();
    let _ = writeln!(o, "{name}_sum {}", sum_ns as f64 / 1e9);
    let _ = writeln!(o, "{name}_count {cumulative}");
}

pub fn render(shards: &[ShardStats], health: Health, driver: &str, rss: Option<u64>) -> String {
    let mut o = String::with_capacity(4096);
    let per_shard: [Field; 5] = [
        (
            "fleetgate_connections",
            "Open TCP connections per shard.",
            |s| &s.connections,
        ),
        (
            "fleetgate_devices_connected",
            "Open device WebSockets per shard.",
            |s| &s.devices,
        ),
        (
            "fleetgate_management_connected",
            "Open management WebSockets per shard.",
            |s| &s.management,
        ),
        (
            "fleetgate_echo_connected",
            "Open diagnostic echo WebSockets per shard.",
            |s| &s.echo,
        ),
        (
            "fleetgate_relay_buffered_bytes",
            "Relayed bytes held per shard: queued for its connections and in flight to other shards (relay.memory_budget counts their sum).",
            |s| &s.relay_buffered,
        ),
    ];
    for (name, help, f) in per_shard {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(o, "{name}{{shard=\"{i}\"}} {}", get(f(s)));
        }
    }
    let name = "fleetgate_shard_cpu_seconds_total";
    let _ = writeln!(
        o,
        "# HELP {name} CPU time used by each shard's thread (user + system). A shard near one second per second while others idle is the serial stage, e.g. the one holding a busy management connection.\n# TYPE {name} counter"
    );
    for (i, s) in shards.iter().enumerate() {
        let tid = get(&s.thread);
        if let Some(secs) = (tid != 0)
            .then(|| crate::sys::thread_cpu_seconds(tid))
            .flatten()
        {
            let _ = writeln!(o, "{name}{{shard=\"{i}\"}} {secs}");
        }
    }
    let counters: [Field; 6] = [
        (
            "fleetgate_accepted_total",
            "Accepted TCP connections.",
            |s| &s.accepted,
        ),
        (
            "fleetgate_http_requests_total",
            "HTTP requests answered without an upgrade.",
            |s| &s.http_requests,
        ),
        (
            "fleetgate_websocket_upgrades_total",
            "WebSocket upgrades.",
            |s| &s.upgrades,
        ),
        (
            "fleetgate_websocket_messages_received_total",
            "WebSocket messages received.",
            |s| &s.ws_messages_in,
        ),
        (
            "fleetgate_received_bytes_total",
            "Bytes received (TLS records).",
            |s| &s.bytes_in,
        ),
        (
            "fleetgate_sent_bytes_total",
            "Bytes sent (TLS records).",
            |s| &s.bytes_out,
        ),
    ];
    for (name, help, f) in counters {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        let _ = writeln!(o, "{name} {}", total(shards, f));
    }
    let name = "fleetgate_tls_handshakes_total";
    let _ = writeln!(
        o,
        "# HELP {name} Completed TLS handshakes by version.\n# TYPE {name} counter"
    );
    let _ = writeln!(
        o,
        "{name}{{version=\"1.2\"}} {}",
        total(shards, |s| &s.handshakes_tls12)
    );
    let _ = writeln!(
        o,
        "{name}{{version=\"1.3\"}} {}",
        total(shards, |s| &s.handshakes_tls13)
    );
    for (name, help, f) in [
        (
            "fleetgate_relay_received_total",
            "Relay envelopes received from management connections and devices.",
            (|s| &s.relay_in) as fn(&ShardStats) -> &AtomicU64,
        ),
        (
            "fleetgate_relay_delivered_total",
            "Relay envelopes delivered.",
            |s| &s.relay_out,
        ),
        (
            "fleetgate_relay_dropped_total",
            "Relay data dropped because a stream exceeded its window (stream reset).",
            |s| &s.relay_dropped,
        ),
        (
            "fleetgate_memory_budget_pauses_total",
            "Connections whose reading was paused because relayed data exceeded relay.memory_budget.",
            |s| &s.budget_pauses,
        ),
        (
            "fleetgate_management_moves_total",
            "Management connections handed to another shard after their upgrade, to spread them over the shards (counted by the shard they left).",
            |s| &s.management_moves,
        ),
    ] {
        let _ = writeln!(
            o,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            total(shards, f)
        );
    }
    histogram(
        &mut o,
        "fleetgate_relay_latency_seconds",
        "Requests and responses: from the shard taking the received bytes to the envelope encrypted for its receiver (across shards included).",
        shards,
        |s| &s.relay_latency,
    );
    histogram(
        &mut o,
        "fleetgate_stream_control_latency_seconds",
        "Stream control messages (open, accept, credit, close, reset), measured as fleetgate_relay_latency_seconds: the control lane's time under bulk data.",
        shards,
        |s| &s.stream_control_latency,
    );
    let name = "fleetgate_tls_resumptions_total";
    let _ = writeln!(
        o,
        "# HELP {name} TLS handshakes that resumed a session (ticket).\n# TYPE {name} counter\n{name} {}",
        total(shards, |s| &s.handshakes_resumed)
    );
    let name = "fleetgate_errors_total";
    let _ = writeln!(o, "# HELP {name} Errors by kind.\n# TYPE {name} counter");
    for (label, kind) in ERROR_KINDS {
        let n: u64 = shards.iter().map(|s| get(&s.errors[kind as usize])).sum();
        let _ = writeln!(o, "{name}{{kind=\"{label}\"}} {n}");
    }
    let name = "fleetgate_status";
    let _ = writeln!(
        o,
        "# HELP {name} 1 for the current /usg/check-status value.\n# TYPE {name} gauge"
    );
    for h in [Health::Init, Health::Ok, Health::Warn, Health::Err] {
        let v = u8::from(h == health);
        let _ = writeln!(o, "{name}{{status=\"{}\"}} {v}", h.as_str());
    }
    let _ = writeln!(
        o,
        "# HELP fleetgate_info Build and backend.\n# TYPE fleetgate_info gauge\nfleetgate_info{{version=\"{}\",driver=\"{driver}\",shards=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        shards.len()
    );
    if let Some(rss) = rss {
        let _ = writeln!(
            o,
            "# HELP fleetgate_resident_memory_bytes Resident set size of the process.\n# TYPE fleetgate_resident_memory_bytes gauge\nfleetgate_resident_memory_bytes {rss}"
        );
    }
    o
}

/// Process-wide onboarding figures: registration and session outcomes by reason code, the
/// device connection limit. Written by the shards and the registrar (relaxed atomics; these
/// change once per connection, not per message).
#[derive(Debug, Default)]
pub struct Onboarding {
    /// Registration outcomes by [`Reason`](crate::registry::Reason) (index in `Reason::ALL`).
    pub registrations: [AtomicU64; crate::registry::Reason::ALL.len()],
    /// Session refusals by reason (revoked, superseded, unknown, limit).
    pub session_refusals: [AtomicU64; crate::registry::Reason::ALL.len()],
    /// Device sessions accepted.
    pub sessions_accepted: AtomicU64,
    /// Device sessions open now, all shards (what the limit is checked against).
    pub sessions_open: AtomicU64,
    /// The device connection limit (0 = unlimited).
    pub max_devices: AtomicU64,
}

fn reason_index(r: crate::registry::Reason) -> usize {
    crate::registry::Reason::ALL
        .iter()
        .position(|x| *x == r)
        .unwrap_or(0)
}

impl Onboarding {
    /// Counts a registration outcome.
    pub fn registration(&self, r: crate::registry::Reason) {
        ShardStats::inc(&self.registrations[reason_index(r)]);
    }

    /// Counts a refused session.
    pub fn session_refused(&self, r: crate::registry::Reason) {
        ShardStats::inc(&self.session_refusals[reason_index(r)]);
    }

    /// Takes a device-session slot if the limit allows; false = over the limit.
    pub fn try_open_session(&self) -> bool {
        let prev = self.sessions_open.fetch_add(1, Ordering::AcqRel);
        let max = self.max_devices.load(Ordering::Relaxed);
        if max > 0 && prev >= max {
            self.sessions_open.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        ShardStats::inc(&self.sessions_accepted);
        true
    }

    /// Gives a device-session slot back.
    pub fn close_session(&self) {
        self.sessions_open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Registrations granted so far.
    pub fn granted(&self) -> u64 {
        get(&self.registrations[reason_index(crate::registry::Reason::Granted)])
    }

    /// Refused registrations so far (every reason but `granted`).
    pub fn registrations_refused(&self) -> u64 {
        let all: u64 = self.registrations.iter().map(get).sum();
        all - self.granted()
    }

    /// Sessions refused because of the limit.
    pub fn limit_rejections(&self) -> u64 {
        get(&self.session_refusals[reason_index(crate::registry::Reason::LimitReached)])
    }

    /// Appends the Prometheus text of these figures to `o`.
    pub fn render_into(&self, o: &mut String) {
        let name = "fleetgate_registrations_total";
        let _ = writeln!(
            o,
            "# HELP {name} Device registration attempts by outcome.\n# TYPE {name} counter"
        );
        for (i, r) in crate::registry::Reason::ALL.iter().enumerate() {
            let _ = writeln!(
                o,
                "{name}{{reason=\"{r}\"}} {}",
                get(&self.registrations[i])
            );
        }
        let name = "fleetgate_device_sessions_refused_total";
        let _ = writeln!(
            o,
            "# HELP {name} Device sessions refused, by reason (limit_reached: the connection limit).\n# TYPE {name} counter"
        );
        for (i, r) in crate::registry::Reason::ALL.iter().enumerate() {
            if r.as_str().starts_with("credential_") || *r == crate::registry::Reason::LimitReached
            {
                let _ = writeln!(
                    o,
                    "{name}{{reason=\"{r}\"}} {}",
                    get(&self.session_refusals[i])
                );
            }
        }
        let _ = writeln!(
            o,
            "# HELP fleetgate_device_connection_limit_rejections_total Devices rejected because the connection limit was reached.\n# TYPE fleetgate_device_connection_limit_rejections_total counter\nfleetgate_device_connection_limit_rejections_total {}",
            self.limit_rejections()
        );
        let _ = writeln!(
            o,
            "# HELP fleetgate_device_sessions_accepted_total Authenticated device sessions accepted.\n# TYPE fleetgate_device_sessions_accepted_total counter\nfleetgate_device_sessions_accepted_total {}",
            get(&self.sessions_accepted)
        );
        let _ = writeln!(
            o,
            "# HELP fleetgate_device_sessions Authenticated device sessions open.\n# TYPE fleetgate_device_sessions gauge\nfleetgate_device_sessions {}",
            get(&self.sessions_open)
        );
        let _ = writeln!(
            o,
            "# HELP fleetgate_device_connection_limit The device connection limit (0 = unlimited).\n# TYPE fleetgate_device_connection_limit gauge\nfleetgate_device_connection_limit {}",
            get(&self.max_devices)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sums_and_labels() {
        let shards: Vec<ShardStats> = (0..2).map(|_| ShardStats::default()).collect();
        ShardStats::inc(&shards[0].connections);
        ShardStats::add(&shards[1].connections, 2);
        ShardStats::inc(&shards[1].accepted);
        shards[0].error(ErrorKind::Tls);
        let text = render(&shards, Health::Warn, "epoll", Some(1234));
        assert!(
            text.contains("fleetgate_connections{shard=\"0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetgate_connections{shard=\"1\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("fleetgate_accepted_total 1\n"));
        assert!(text.contains("fleetgate_errors_total{kind=\"tls\"} 1\n"));
        assert!(text.contains("fleetgate_status{status=\"warn\"} 1\n"));
        assert!(text.contains("fleetgate_status{status=\"ok\"} 0\n"));
        assert!(text.contains("fleetgate_resident_memory_bytes 1234\n"));
        assert_eq!(align_of::<ShardStats>(), 64);
    }
}
