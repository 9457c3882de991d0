//! The gateway's configuration: one TOML file, every limit a named field with a default and the
//! reason for it. Unknown keys are refused (a typo must not silently fall back to a default).
//!
//! Precedence: built-in defaults < the TOML file (`--config`) < command-line flags.
//! `docs/configuration.md` lists every key; keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (wrong type, unknown key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and the line.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `websocket.max_frame_size`.
        key: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// Which I/O backend the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// io_uring when the kernel allows it and has every opcode we need, else epoll.
    #[default]
    Auto,
    /// io_uring only; start-up fails if it is unavailable.
    Uring,
    /// epoll (through mio); works everywhere, including containers that block io_uring.
    Epoll,
}

/// A TLS protocol version the operator can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 (older devices).
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3.
    #[serde(rename = "1.3")]
    Tls13,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listener, shards, driver, data dir.
    pub server: ServerConfig,
    /// TLS versions and handshake limits.
    pub tls: TlsConfig,
    /// HTTP/1.1 head limits.
    pub http: HttpConfig,
    /// WebSocket limits and keep-alive.
    pub websocket: WebSocketConfig,
    /// Connection and buffer limits.
    pub limits: LimitsConfig,
    /// Device registration (`/usg/endpoint` register mode).
    pub registration: RegistrationConfig,
    /// The relay between management servers and devices.
    pub relay: RelayConfig,
    /// `/usg/check-status` behaviour.
    pub status: StatusConfig,
    /// Logging.
    pub log: LogConfig,
    /// Public gateway addresses written into key hand-outs (`keys export`). When empty, the
    /// hand-out names this host and `server.listen`'s port.
    pub handout: crate::export::HandoutConfig,
    /// SMTP settings for `keys export --mail`. Absent = mail is not configured.
    pub mail: Option<crate::mail::MailConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port of the one TCP port for everything. Default `0.0.0.0:8443` (the
    /// reference product's port; 443 needs CAP_NET_BIND_SERVICE).
    pub listen: SocketAddr,
    /// Number of shards (threads, each with its own ring and listener). 0 = one per CPU.
    pub shards: usize,
    /// I/O backend: `auto`, `uring` or `epoll`.
    pub driver: DriverKind,
    /// Data directory (keystore, root certificate, registry). Default `./fleetgate-data`.
    pub data_dir: PathBuf,
    /// Serve the diagnostic echo endpoint `/usg/echo` (for conformance and load runs). Off by
    /// default: it lets anyone who can reach the port bounce traffic off the gateway.
    pub enable_echo: bool,
    /// Pin each shard thread to a CPU (shard i on CPU i mod ncpu). Default true.
    pub pin_threads: bool,
    /// How long SIGTERM/SIGINT waits for WebSocket peers to answer the 1001 close before the
    /// process exits anyway, in milliseconds. Default 1000: devices reconnect by themselves, and
    /// service managers expect a fast stop.
    pub drain_timeout_ms: u64,
    /// How often the gateway checks `keystore.pem` for a replaced file, in milliseconds
    /// (SIGHUP reloads at once). Default 1000.
    pub keystore_poll_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8443".parse().expect("static address"),
            shards: 0,
            driver: DriverKind::Auto,
            data_dir: PathBuf::from("fleetgate-data"),
            enable_echo: false,
            pin_threads: true,
            drain_timeout_ms: 1000,
            keystore_poll_ms: 1000,
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Lowest TLS version offered. Default "1.2" (older devices speak only 1.2).
    pub min_version: TlsVersion,
    /// Highest TLS version offered. Default "1.3".
    pub max_version: TlsVersion,
    /// A TLS handshake (first byte to Finished) must complete within this many milliseconds.
    /// Default 10000: generous for slow mobile links, short enough that half-open handshakes
    /// cannot pin slots.
    pub handshake_timeout_ms: u64,
    /// Stateless session tickets for resumption (TLS 1.2 and 1.3). Default true: a reconnect
    /// storm after a restart of the network costs far less CPU when devices resume.
    pub session_tickets: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
            handshake_timeout_ms: 10_000,
            session_tickets: true,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest request head (request line + headers) in bytes. Default 8192: an upgrade request
    /// is ~300 bytes; anything near 8 KiB is an attack or a misdirected client.
    pub max_head_bytes: usize,
    /// Most header lines in one request. Default 32.
    pub max_headers: usize,
    /// The request head must arrive within this many milliseconds after the TLS handshake (and
    /// between keep-alive requests). Default 10000: stops slow-loris clients.
    pub head_timeout_ms: u64,
    /// Requests served on one keep-alive connection before it is closed. Default 100.
    pub max_requests_per_connection: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_head_bytes: 8192,
            max_headers: 32,
            head_timeout_ms: 10_000,
            max_requests_per_connection: 100,
        }
    }
}

/// `[websocket]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest single frame payload in bytes; larger → close 1009. Default 16 MiB.
    pub max_frame_size: usize,
    /// Largest message (all fragments) in bytes; larger → close 1009. Default 64 MiB. The
    /// gateway streams messages, so this bounds abuse, not memory.
    pub max_message_size: usize,
    /// After this many seconds without a byte from the peer, the gateway sends a ping.
    /// Default 60 (NAT boxes commonly drop idle TCP flows after 2–5 minutes).
    pub ping_after_secs: u64,
    /// After this many seconds without a byte from the peer, the connection is closed
    /// (1001). Default 180: three missed keep-alives.
    pub idle_timeout_secs: u64,
    /// After sending a close frame, wait this long for the peer's close before dropping the
    /// TCP connection, in milliseconds. Default 5000.
    pub close_timeout_ms: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            ping_after_secs: 60,
            idle_timeout_secs: 180,
            close_timeout_ms: 5000,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most connections one shard holds (all kinds). Default 20000. With io_uring the shard's
    /// fixed file table has this many slots, and the kernel caps a table at `ulimit -n`.
    pub max_connections_per_shard: usize,
    /// Bytes of encrypted output queued for one connection above which the gateway stops
    /// reading from that connection until the queue drains below half. Default 1 MiB.
    pub max_queued_output: usize,
    /// Size of one receive buffer in bytes. Default 16896 (one full TLS record with overhead).
    pub recv_buffer_size: usize,
    /// Receive buffers per shard in the provided-buffer ring (power of two). Default 512
    /// (8.25 MiB per shard): only connections with bytes in flight hold one.
    pub recv_buffers_per_shard: usize,
    /// Most device sessions (authenticated devices) connected at once, all shards together.
    /// 0 (the default) = unlimited. A device over the limit is refused with `limit_reached`
    /// and the WARN line `Max connections limit has exceeded. Device [<unit>] is rejected`.
    /// Changeable at run time (`fleetgate devices limit N`, or a reload of this file).
    pub max_devices: u64,
    /// The retry hint given to a device refused by `max_devices`, in seconds: the device is
    /// told to wait a random time between half and one and a half times this. Default 60:
    /// long enough not to hammer a full gateway, short enough to get in soon after a slot frees.
    pub limit_retry_after_secs: u64,
    /// TLS handshakes in progress per shard above which the shard stops accepting until some
    /// finish (waiting clients stay in the kernel's listen queue). Default 512: paces a
    /// reconnect storm so handshakes complete instead of all timing out together.
    pub max_pending_handshakes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_shard: 20_000,
            max_queued_output: 1 << 20,
            recv_buffer_size: 16_896,
            recv_buffers_per_shard: 512,
            max_devices: 0,
            limit_retry_after_secs: 60,
            max_pending_handshakes: 512,
        }
    }
}

/// `[relay]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Output bytes queued for a device above which new requests and stream opens to it are
    /// answered `busy` instead of queued. Default 1 MiB: a device that does not read cannot
    /// make the gateway hold more than that in requests for it.
    pub max_control_queue: usize,
    /// Data bytes queued for one connection above which further data for it resets the
    /// stream with `busy`. Default 8 MiB (32 streams at the 256 KiB default window): reached
    /// only by a sender that ignores the credit it was given.
    pub max_bulk_queue: usize,
    /// The memory budget for relayed data, all shards together, in bytes: what the gateway
    /// holds queued for sending (data and control, encrypted or not) and in flight between
    /// shards. Above it, every connection that sends relay messages is paused (the gateway
    /// stops reading from it) until the total is back under three quarters of the budget.
    /// Default 1 GiB; 0 = no budget.
    pub memory_budget: usize,
    /// Spread management connections over the shards: a shard that upgrades a management
    /// connection while it holds more of them than another shard hands the new one to the
    /// shard with the fewest (before its first request). The kernel places connections on
    /// shards at accept, before anyone knows which are management ones, and each management
    /// connection's shard decrypts everything that connection sends. Default true.
    pub spread_management: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_control_queue: 1 << 20,
            max_bulk_queue: 8 << 20,
            memory_budget: 1 << 30,
            spread_management: true,
        }
    }
}

/// `[registration]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// How long a device in register mode has to send its `register` message after the
    /// WebSocket upgrade, in milliseconds. Default 30000.
    pub timeout_ms: u64,
    /// Validity of an issued device certificate, in days. Default 1825 (5 years): devices
    /// re-register only when it runs out.
    pub certificate_days: u32,
    /// Most registrations decided in one database transaction (one disk sync). Default 256.
    pub batch_max: usize,
    /// Per-source limit on failed attempts (key guessing).
    pub rate_limit: crate::registry::limiter::RateLimitConfig,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 30_000,
            certificate_days: crate::pki::device::DEVICE_CERT_DAYS,
            batch_max: 256,
            rate_limit: crate::registry::limiter::RateLimitConfig::default(),
        }
    }
}

/// `[status]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// `/usg/check-status` is recomputed at most this often, in seconds. Default 30 (as the
    /// reference product). The end of start-up triggers one recomputation at once.
    pub interval_secs: u64,
    /// If start-up has not finished within this many seconds, the status becomes `err`.
    /// Default 30.
    pub startup_deadline_secs: u64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            interval_secs: 30,
            startup_deadline_secs: 30,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Log filter in `tracing` EnvFilter syntax: a default level, then per-module overrides,
    /// e.g. `info` or `warn,fleetgate::shard=debug,rustls=off`. Levels: `off`, `error`, `warn`,
    /// `info`, `debug`, `trace`. `RUST_LOG` overrides it. Default `info`. Applied on reload
    /// (SIGHUP) too.
    pub level: String,
    /// Log file. Empty (the default): log to stderr, which journald collects under systemd
    /// (with each line's priority, so `journalctl -p warning` works). A path: append to that
    /// file and rotate it by size (`fleetgate.log` → `fleetgate.log.1` …). A relative path is
    /// relative to the working directory (the systemd unit's is `/var/lib/fleetgate`; the unit
    /// makes `/var/log/fleetgate` writable).
    pub file: PathBuf,
    /// With `file`: rotate when the file would grow past this many MiB. Default 100.
    pub max_size_mb: u64,
    /// With `file`: rotated files kept (`.1` newest … `.N` oldest; older ones are deleted).
    /// 0 keeps none: a full file is deleted and started afresh. Default 5: with
    /// `max_size_mb` 100 the logs never take more than 600 MiB of disk.
    pub keep: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            file: PathBuf::new(),
            max_size_mb: 100,
            keep: 5,
        }
    }
}

impl LogConfig {
    /// Checks the `[log]` values (called by [`Config::validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.level) {
            return Err(ConfigError::Invalid {
                key: "log.level",
                message: format!(
                    "not a valid filter ({e}); use e.g. \"info\" or \"info,fleetgate::shard=debug\""
                ),
            });
        }
        if !(1..=1 << 20).contains(&self.max_size_mb) {
            return Err(ConfigError::Invalid {
                key: "log.max_size_mb",
                message: "must be between 1 and 1048576".into(),
            });
        }
        if self.keep > 1000 {
            return Err(ConfigError::Invalid {
                key: "log.keep",
                message: "must be between 0 and 1000".into(),
            });
        }
        Ok(())
    }

    /// `max_size_mb` in bytes.
    pub fn max_size_bytes(&self) -> u64 {
        self.max_size_mb.saturating_mul(1 << 20)
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|e| match e {
            ConfigError::Invalid { key, message } => ConfigError::Invalid {
                key,
                message: match line_of(text, key) {
                    Some(n) => format!("{message} (line {n})"),
                    None => message,
                },
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Checks ranges and relations between values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        }
        if self.tls.min_version > self.tls.max_version {
            return bad("tls.min_version", "must not be above tls.max_version");
        }
        if self.server.shards > 254 {
            // The relay's routing tag stores the shard number plus one in one byte.
            return bad("server.shards", "at most 254");
        }
        if !(512..=1 << 20).contains(&self.http.max_head_bytes) {
            return bad("http.max_head_bytes", "must be between 512 and 1048576");
        }
        if !(4..=256).contains(&self.http.max_headers) {
            return bad("http.max_headers", "must be between 4 and 256");
        }
        if self.websocket.max_frame_size < 125 {
            return bad("websocket.max_frame_size", "must be at least 125");
        }
        if self.websocket.max_message_size < self.websocket.max_frame_size {
            return bad(
                "websocket.max_message_size",
                "must be at least websocket.max_frame_size",
            );
        }
        if self.websocket.idle_timeout_secs == 0 {
            return bad("websocket.idle_timeout_secs", "must be at least 1");
        }
        if self.websocket.ping_after_secs >= self.websocket.idle_timeout_secs {
            return bad(
                "websocket.ping_after_secs",
                "must be below websocket.idle_timeout_secs",
            );
        }
        if self.limits.max_connections_per_shard == 0
            || self.limits.max_connections_per_shard > 1 << 24
        {
            return bad(
                "limits.max_connections_per_shard",
                "must be between 1 and 16777216",
            );
        }
        if !(4096..=1 << 20).contains(&self.limits.recv_buffer_size) {
            return bad(
                "limits.recv_buffer_size",
                "must be between 4096 and 1048576",
            );
        }
        let n = self.limits.recv_buffers_per_shard;
        if !(8..=32768).contains(&n) || !n.is_power_of_two() {
            return bad(
                "limits.recv_buffers_per_shard",
                "must be a power of two between 8 and 32768",
            );
        }
        if self.limits.max_queued_output < 64 * 1024 {
            return bad("limits.max_queued_output", "must be at least 65536");
        }
        if self.tls.handshake_timeout_ms == 0 || self.http.head_timeout_ms == 0 {
            return bad("tls.handshake_timeout_ms", "timeouts must be at least 1 ms");
        }
        if self.limits.max_pending_handshakes == 0 {
            return bad("limits.max_pending_handshakes", "must be at least 1");
        }
        if self.limits.limit_retry_after_secs == 0 || self.limits.limit_retry_after_secs > 86_400 {
            return bad(
                "limits.limit_retry_after_secs",
                "must be between 1 and 86400",
            );
        }
        if self.relay.max_control_queue < 64 * 1024 {
            return bad("relay.max_control_queue", "must be at least 65536");
        }
        if self.relay.max_bulk_queue < 256 * 1024 {
            return bad("relay.max_bulk_queue", "must be at least 262144");
        }
        if self.relay.memory_budget != 0 && self.relay.memory_budget < 1 << 20 {
            return bad(
                "relay.memory_budget",
                "must be 0 (no budget) or at least 1048576 (1 MiB)",
            );
        }
        if self.registration.timeout_ms == 0 {
            return bad("registration.timeout_ms", "must be at least 1");
        }
        if self.registration.certificate_days == 0 || self.registration.certificate_days > 36_500 {
            return bad(
                "registration.certificate_days",
                "must be between 1 and 36500",
            );
        }
        if !(1..=10_000).contains(&self.registration.batch_max) {
            return bad("registration.batch_max", "must be between 1 and 10000");
        }
        if self.status.interval_secs == 0 {
            return bad("status.interval_secs", "must be at least 1");
        }
        self.log.validate()?;
        Ok(())
    }

    /// Number of shards to run: the configured value, or one per CPU.
    pub fn shard_count(&self) -> usize {
        if self.server.shards > 0 {
            self.server.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(254))
        }
    }

    /// `tls.handshake_timeout_ms` as a Duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls.handshake_timeout_ms)
    }
}

/// The command-line flags of `fleetgate serve` that override the file: applied after every
/// load, at start-up and when SIGHUP re-reads the file, so a reload never undoes a flag.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--shards`
    pub shards: Option<usize>,
    /// `--driver`
    pub driver: Option<DriverKind>,
    /// `--enable-echo` (only ever turns the echo on)
    pub enable_echo: bool,
    /// `--data-dir` / `FLEETGATE_DATA_DIR`
    pub data_dir: Option<PathBuf>,
}

impl Overrides {
    /// Sets the overridden fields of `config`.
    pub fn apply(&self, config: &mut Config) {
        if let Some(l) = self.listen {
            config.server.listen = l;
        }
        if let Some(s) = self.shards {
            config.server.shards = s;
        }
        if let Some(d) = self.driver {
            config.server.driver = d;
        }
        if self.enable_echo {
            config.server.enable_echo = true;
        }
        if let Some(d) = &self.data_dir {
            config.server.data_dir.clone_from(d);
        }
    }

    /// Reads `path` (or takes the defaults when there is none), applies the overrides and
    /// validates the result.
    pub fn load(&self, path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        self.apply(&mut config);
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    /// The dotted keys (`limits.max_devices`, `mail.host`, `handout.gateways` …) whose values
    /// differ between `self` and `other`, sorted. A whole table present in one and absent in
    /// the other (`[mail]`) is one key.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        fn walk(
            prefix: &str,
            a: Option<&toml::Value>,
            b: Option<&toml::Value>,
            out: &mut Vec<String>,
        ) {
            match (a, b) {
                (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                    let keys: std::collections::BTreeSet<&String> =
                        a.keys().chain(b.keys()).collect();
                    for k in keys {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, a.get(k), b.get(k), out);
                    }
                }
                (a, b) if a != b => out.push(prefix.to_owned()),
                _ => {}
            }
        }
        let a = toml::Value::try_from(self).ok();
        let b = toml::Value::try_from(other).ok();
        let mut out = Vec::new();
        walk("", a.as_ref(), b.as_ref(), &mut out);
        out
    }
}

/// The 1-based line where `section.key` is set in `text`, if it is.
fn line_of(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.split_once('.')?;
    let mut current = "";
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[') {
            current = h.split(']').next().unwrap_or("").trim();
        } else if current == section && t.split('=').next().map(str::trim) == Some(key) {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn unknown_key_is_refused_with_its_name_and_line() {
        let err = Config::from_toml(
            "[server]\nlisten = \"127.0.0.1:1\"\nshardz = 2\n",
            "x".as_ref(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("shardz"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn wrong_type_and_range_are_refused() {
        let err = Config::from_toml("[server]\nshards = \"two\"\n", "x".as_ref()).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = Config::from_toml(
            "[server]\nshards = 2\n[limits]\nrecv_buffers_per_shard = 100\n",
            "x".as_ref(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("power of two"), "{err}");
        assert!(err.to_string().contains("(line 4)"), "{err}");
        let err = Config::from_toml(
            "[tls]\nmin_version = \"1.3\"\nmax_version = \"1.2\"\n",
            "x".as_ref(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("tls.min_version"), "{err}");
    }

    #[test]
    fn changed_keys_names_each_leaf() {
        let a = Config::default();
        assert!(a.changed_keys(&a.clone()).is_empty());
        let b = Config::from_toml(
            "[limits]\nmax_devices = 7\n[http]\nmax_headers = 40\n[mail]\nserver = \"m\"\nfrom = \"a@b\"\n",
            "x".as_ref(),
        )
        .unwrap();
        let keys = a.changed_keys(&b);
        assert!(keys.contains(&"limits.max_devices".to_owned()), "{keys:?}");
        assert!(keys.contains(&"http.max_headers".to_owned()), "{keys:?}");
        assert!(keys.contains(&"mail".to_owned()), "{keys:?}");
        assert_eq!(keys.len(), 3, "{keys:?}");
    }

    #[test]
    fn overrides_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[server]\nshards = 3\nlisten = \"127.0.0.1:9\"\n").unwrap();
        let o = Overrides {
            shards: Some(1),
            data_dir: Some("/x".into()),
            ..Overrides::default()
        };
        let c = o.load(Some(&path)).unwrap();
        assert_eq!(c.server.shards, 1);
        assert_eq!(c.server.listen.port(), 9);
        assert_eq!(c.server.data_dir, PathBuf::from("/x"));
    }

    #[test]
    fn tls_versions_parse() {
        let c = Config::from_toml("[tls]\nmin_version = \"1.3\"\n", "x".as_ref()).unwrap();
        assert_eq!(c.tls.min_version, TlsVersion::Tls13);
    }
}
