//! `fleetgate status`: asks a running gateway how it is, for a human and for scripts.
//!
//! Fetches `GET /usg/check-status` and `GET /metrics` over TLS (a small blocking client:
//! rustls over a `TcpStream`, heads parsed by [`crate::proto::http::parse_response`]) and
//! prints a summary: the status, connections (devices, management), registrations and
//! rejections when the gateway counts them, TLS handshakes, errors, resident memory.
//!
//! Exit codes (Nagios plugin conventions, usable as a check command as is):
//! **0** `ok`; **1** `warn` (no management server connected) or `init` (still starting);
//! **2** `err`, an unexpected answer, or the gateway is unreachable (the reason is printed:
//! refused, timeout, certificate not trusted …) or the check cannot be made (no root
//! certificate to trust, an unreadable config file; the reason goes to stderr). Metrics that
//! cannot be read do not change the exit code; the summary says why they are missing.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, StreamOwned};

use crate::config::Config;
use crate::proto::http::{HttpLimits, Parsed, parse_response};

/// Exit code for `ok`.
pub const EXIT_OK: u8 = 0;
/// Exit code for `warn` and `init`.
pub const EXIT_WARN: u8 = 1;
/// Exit code for `err`, unexpected answers and an unreachable gateway.
pub const EXIT_ERR: u8 = 2;

/// Largest answer read (a `/metrics` page of a 256-shard gateway is ~100 KiB).
const MAX_RESPONSE: usize = 4 << 20;

/// `fleetgate status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The gateway's base URL (a path is ignored). Default: from --config's server.listen
    /// (0.0.0.0 → localhost), else https://localhost:8443.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Root certificate (PEM) to trust, e.g. a CA bundle for a public certificate.
    /// Default: DATA_DIR/root.pem (DATA_DIR from --data-dir, else --config's server.data_dir).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Do not verify the gateway's certificate (the connection is still TLS).
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,
    /// The gateway's configuration file, for the default URL and data dir (the global
    /// `--config`, filled in by `main`).
    #[arg(skip)]
    pub config: Option<PathBuf>,
    /// Seconds to wait for the connection and for each answer.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub timeout: u64,
}

/// Runs `fleetgate status`: prints the summary on stdout and returns the exit code.
/// `data_dir` is the global `--data-dir` (if given).
///
/// When the check cannot even be made (no root certificate to trust, a bad config file), the
/// reason goes to stderr and the exit code is 2: a probe that cannot check must not pass for
/// `warn`.
pub fn run(args: StatusArgs, data_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    match probe(&args, data_dir) {
        Ok(report) => {
            print!("{}", report.render());
            Ok(ExitCode::from(report.exit_code()))
        }
        Err(e) => {
            eprintln!("fleetgate status: cannot check: {e:#}");
            Ok(ExitCode::from(EXIT_ERR))
        }
    }
}

/// What the probe found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The base URL asked.
    pub url: String,
    /// The answer, or why there was none.
    pub outcome: Outcome,
}

/// The check-status answer and the metrics, or the reason the gateway could not be asked.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// `/usg/check-status` answered.
    Answered {
        /// The `status` word (`ok`, `warn`, `err`, `init`, or something unexpected).
        status: String,
        /// `/metrics`, or why it could not be read.
        metrics: Result<Metrics, String>,
    },
    /// No usable answer from `/usg/check-status`.
    Unreachable(String),
}

impl Report {
    /// 0 ok, 1 warn/init, 2 err/unexpected/unreachable.
    pub fn exit_code(&self) -> u8 {
        match &self.outcome {
            Outcome::Answered { status, .. } => match status.as_str() {
                "ok" => EXIT_OK,
                "warn" | "init" => EXIT_WARN,
                _ => EXIT_ERR,
            },
            Outcome::Unreachable(_) => EXIT_ERR,
        }
    }

    /// The human summary, one fact per line.
    pub fn render(&self) -> String {
        let (status, metrics) = match &self.outcome {
            Outcome::Unreachable(why) => {
                return format!("fleetgate {}: UNREACHABLE: {why}\n", self.url);
            }
            Outcome::Answered { status, metrics } => (status, metrics),
        };
        let meaning = match status.as_str() {
            "ok" => "up and serving, management server connected",
            "warn" => "serving, but no management server is connected",
            "err" => {
                "no valid certificate (missing, expired, not yet valid, broken chain) or start-up failed"
            }
            "init" => "still starting",
            _ => "unexpected status",
        };
        let mut o = format!(
            "fleetgate {}: {} ({meaning})\n",
            self.url,
            status.to_uppercase()
        );
        match metrics {
            Ok(m) => o.push_str(&summarise(m)),
            Err(why) => o.push_str(&format!("  metrics        unavailable: {why}\n")),
        }
        o
    }
}

fn line(o: &mut String, label: &str, text: &str) {
    o.push_str(&format!("  {label:<14} {text}\n"));
}

fn count(v: f64) -> String {
    format!("{}", v.round() as i64)
}

/// The metrics part of the summary.
fn summarise(m: &Metrics) -> String {
    let mut o = String::new();
    let shards = m.samples("fleetgate_connections").count();
    line(
        &mut o,
        "connections",
        &format!(
            "{} devices, {} management, {} TCP in all on {shards} shard{}",
            count(m.sum("fleetgate_devices_connected").unwrap_or(0.0)),
            count(m.sum("fleetgate_management_connected").unwrap_or(0.0)),
            count(m.sum("fleetgate_connections").unwrap_or(0.0)),
            if shards == 1 { "" } else { "s" }
        ),
    );
    let granted = m
        .with_label("fleetgate_registrations_total", "reason", "granted")
        .unwrap_or(0.0);
    let refused: Vec<String> = m
        .samples("fleetgate_registrations_total")
        .filter(|s| s.value > 0.0 && s.label("reason") != Some("granted"))
        .map(|s| format!("{} {}", s.label("reason").unwrap_or("?"), count(s.value)))
        .collect();
    if m.samples("fleetgate_registrations_total").next().is_some() {
        line(
            &mut o,
            "registrations",
            &format!(
                "{} granted, {} refused{}",
                count(granted),
                count(m.sum("fleetgate_registrations_total").unwrap_or(0.0) - granted),
                if refused.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", refused.join(", "))
                }
            ),
        );
    }
    let limit = m.sum("fleetgate_device_connection_limit").unwrap_or(0.0);
    let mut rejections = vec![format!(
        "{} at the device connection limit ({})",
        count(
            m.sum("fleetgate_device_connection_limit_rejections_total")
                .unwrap_or(0.0)
        ),
        if limit > 0.0 {
            format!("limit {}", count(limit))
        } else {
            "unlimited".to_owned()
        }
    )];
    rejections.extend(
        m.samples("fleetgate_device_sessions_refused_total")
            .filter(|s| s.value > 0.0 && s.label("reason") != Some("limit_reached"))
            .map(|s| format!("{} {}", s.label("reason").unwrap_or("?"), count(s.value))),
    );
    let full = m
        .with_label("fleetgate_errors_total", "kind", "shard_full")
        .unwrap_or(0.0);
    if full > 0.0 {
        rejections.push(format!("{} with a full shard", count(full)));
    }
    line(&mut o, "rejections", &rejections.join(", "));
    let tls12 = m
        .with_label("fleetgate_tls_handshakes_total", "version", "1.2")
        .unwrap_or(0.0);
    let tls13 = m
        .with_label("fleetgate_tls_handshakes_total", "version", "1.3")
        .unwrap_or(0.0);
    line(
        &mut o,
        "handshakes",
        &format!(
            "{} (TLS 1.3: {}, TLS 1.2: {}), {} accepted TCP connections",
            count(tls12 + tls13),
            count(tls13),
            count(tls12),
            count(m.sum("fleetgate_accepted_total").unwrap_or(0.0))
        ),
    );
    let errors: Vec<String> = m
        .samples("fleetgate_errors_total")
        .filter(|s| s.value > 0.0)
        .map(|s| format!("{} {}", s.label("kind").unwrap_or("?"), count(s.value)))
        .collect();
    line(
        &mut o,
        "errors",
        &if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(", ")
        },
    );
    match m.sum("fleetgate_resident_memory_bytes") {
        Some(rss) => line(&mut o, "memory", &format!("RSS {}", human_bytes(rss))),
        None => line(&mut o, "memory", "not reported"),
    }
    if let Some(info) = m.samples("fleetgate_info").next() {
        line(
            &mut o,
            "gateway",
            &format!(
                "version {}, driver {}",
                info.label("version").unwrap_or("?"),
                info.label("driver").unwrap_or("?")
            ),
        );
    }
    o
}

/// `12.3 MiB`
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Asks the gateway. Errors only for local problems (unreadable CA file, bad URL, bad
/// config); an unreachable gateway is an [`Outcome::Unreachable`].
pub fn probe(args: &StatusArgs, data_dir: Option<&Path>) -> anyhow::Result<Report> {
    let config = match &args.config {
        Some(p) => Some(Config::load(p)?),
        None => None,
    };
    let url = match (&args.url, &config) {
        (Some(u), _) => u.clone(),
        (None, Some(c)) => url_for_listen(c.server.listen),
        (None, None) => "https://localhost:8443".to_owned(),
    };
    let target = Target::parse(&url)?;
    let tls = if args.insecure {
        insecure_config()
    } else {
        let ca = match (&args.ca, data_dir, &config) {
            (Some(ca), _, _) => ca.clone(),
            (None, Some(d), _) => d.join("root.pem"),
            (None, None, Some(c)) => c.server.data_dir.join("root.pem"),
            (None, None, None) => Config::default().server.data_dir.join("root.pem"),
        };
        verifying_config(&ca)?
    };
    let timeout = Duration::from_secs(args.timeout.max(1));
    let outcome = match fetch(&target, &tls, "/usg/check-status", timeout) {
        Err(e) => Outcome::Unreachable(format!("{e:#}")),
        Ok((200, body)) => match parse_status(&body) {
            Some(status) => {
                let metrics = match fetch(&target, &tls, "/metrics", timeout) {
                    Ok((200, body)) => Ok(Metrics::parse(&String::from_utf8_lossy(&body))),
                    Ok((code, _)) => Err(format!("/metrics answered HTTP {code}")),
                    Err(e) => Err(format!("{e:#}")),
                };
                Outcome::Answered { status, metrics }
            }
            None => Outcome::Unreachable(format!(
                "/usg/check-status answered {:?}, not {{\"status\":\"…\"}}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
        },
        Ok((code, _)) => Outcome::Unreachable(format!(
            "/usg/check-status answered HTTP {code} (is this a fleetgate gateway?)"
        )),
    };
    Ok(Report {
        url: target.base(),
        outcome,
    })
}

/// `https://<listen>`, with an unspecified address (0.0.0.0, ::) turned into `localhost`.
fn url_for_listen(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("https://localhost:{}", listen.port())
    } else {
        format!("https://{listen}")
    }
}

/// `{"status":"ok"}` → `ok`.
fn parse_status(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("status")?.as_str().map(str::to_owned)
}

/// Where to connect: host (name or IP, without brackets) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
}

impl Target {
    /// Accepts `https://host[:port][/path]`, `host[:port]`, with `[v6]` literals.
    fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = match url.split_once("://") {
            Some(("https" | "wss", rest)) => rest,
            Some((scheme, _)) => {
                bail!("--url {url:?}: the gateway speaks TLS only; use https://, not {scheme}://")
            }
            None => url,
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| anyhow!("--url {url:?}: unclosed '['"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            bail!("--url {url:?}: no host");
        }
        let port = match port {
            None => 443,
            Some(p) => p
                .parse()
                .with_context(|| format!("--url {url:?}: bad port {p:?}"))?,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// `https://host:port` (brackets around IPv6).
    fn base(&self) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{}", self.host, self.port)
        } else {
            format!("https://{}:{}", self.host, self.port)
        }
    }

    /// The `Host` header value.
    fn authority(&self) -> String {
        self.base()["https://".len()..].to_owned()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn verifying_config(ca: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).with_context(|| {
        format!(
            "cannot read the CA certificate {} (give --ca FILE, --data-dir DIR, --config FILE, \
             or --insecure)",
            ca.display()
        )
    })?;
    for cert in certs {
        let cert = cert.with_context(|| format!("{}: not a PEM certificate", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{}: unusable certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate in the file", ca.display());
    }
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS client set-up")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

fn insecure_config() -> Arc<ClientConfig> {
    let provider = provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.dangerous()
        .set_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)));
    Arc::new(cfg)
}

/// `--insecure`: accepts any certificate, but still checks the handshake signatures so the
/// session is at least with the holder of that certificate's key.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One `GET` on a fresh connection (`Connection: close`); returns the status and the body.
fn fetch(
    target: &Target,
    tls: &Arc<ClientConfig>,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let tcp = connect(target, timeout)?;
    let name = ServerName::try_from(target.host.clone())
        .with_context(|| format!("{:?} is not a host name or IP address", target.host))?;
    let conn = ClientConnection::new(tls.clone(), name).context("TLS client set-up")?;
    let mut s = StreamOwned::new(conn, tcp);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fleetgate-status/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        target.authority(),
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(request.as_bytes())
        .and_then(|()| s.flush())
        .map_err(|e| explain(e, target))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16384];
    let limits = HttpLimits::default();
    let (status, head_len, content_length) = loop {
        if let Parsed::Complete { head, consumed } =
            parse_response(&buf, &limits).map_err(|e| anyhow!("{path}: bad HTTP answer: {e}"))?
        {
            break (head.status, consumed, head.content_length);
        }
        let n = s.read(&mut chunk).map_err(|e| explain(e, target))?;
        if n == 0 {
            bail!("{path}: the connection closed before an answer");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let want = content_length.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    loop {
        let have = buf.len() - head_len;
        if want.is_some_and(|w| have >= w) || buf.len() > MAX_RESPONSE {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // The gateway may close without close_notify once the body is complete.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && want.is_none() => break,
            Err(e) => return Err(explain(e, target)),
        }
    }
    let mut body = buf.split_off(head_len);
    if let Some(w) = want {
        if body.len() < w {
            bail!("{path}: answer cut short ({} of {w} bytes)", body.len());
        }
        body.truncate(w);
    }
    Ok((status, body))
}

fn connect(target: &Target, timeout: Duration) -> anyhow::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", target.host))?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(tcp) => {
                tcp.set_read_timeout(Some(timeout))?;
                tcp.set_write_timeout(Some(timeout))?;
                tcp.set_nodelay(true)?;
                return Ok(tcp);
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    match last {
        Some((addr, e)) => Err(anyhow!(
            "cannot connect to {addr}: {e}{}",
            match e.kind() {
                std::io::ErrorKind::ConnectionRefused =>
                    " (is the gateway running and listening on this port?)",
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock =>
                    " (a firewall, or the wrong host?)",
                _ => "",
            }
        )),
        None => Err(anyhow!("{} resolves to no address", target.host)),
    }
}

/// Adds a hint to TLS and timeout errors.
fn explain(e: std::io::Error, target: &Target) -> anyhow::Error {
    let hint = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
        | Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForNameContext { .. },
        )) => format!(
            " (the certificate does not list {:?}: use --url with a name from its SAN, see `fleetgate pki show`)",
            target.host
        ),
        Some(rustls::Error::InvalidCertificate(_)) => {
            " (give the gateway's root with --ca FILE, or --insecure to skip the check)".to_owned()
        }
        Some(_) => String::new(),
        None => match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                " (no answer in time)".to_owned()
            }
            _ => String::new(),
        },
    };
    anyhow!("TLS/HTTP with {}: {e}{hint}", target.base())
}

/// A Prometheus text page, parsed just enough to read samples.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<Sample>,
}

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels in order.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// A label's value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl Metrics {
    /// Parses the text format; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Self {
        Self {
            samples: text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(parse_sample)
                .collect(),
        }
    }

    /// Every sample of `name`.
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// Sum over every sample of `name`; `None` when there is none.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut it = self.samples(name).peekable();
        it.peek()?;
        Some(it.map(|s| s.value).sum())
    }

    /// Sum over the samples of `name` whose label `key` is `value`.
    pub fn with_label(&self, name: &str, key: &str, value: &str) -> Option<f64> {
        let mut it = self
            .samples(name)
            .filter(|s| s.label(key) == Some(value))
            .peekable();
        it.peek()?;
        Some(it.map(|s| s.value).sum())
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices();
        let mut key = String::new();
        let mut value = String::new();
        let mut in_value = false;
        let mut escaped = false;
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if in_value {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false;
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        labels.push((std::mem::take(&mut key), std::mem::take(&mut value)));
                        in_value = false;
                    }
                    (false, c) => value.push(c),
                }
            } else {
                match c {
                    '}' => {
                        end = Some(i);
                        break;
                    }
                    '=' => {
                        if chars.next()?.1 != '"' {
                            return None;
                        }
                        in_value = true;
                    }
                    ',' | ' ' => {}
                    c => key.push(c),
                }
            }
        }
        rest = &after[end? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP fleetgate_connections Open TCP connections per shard.\n\
# TYPE fleetgate_connections gauge\n\
fleetgate_connections{shard=\"0\"} 3\n\
fleetgate_connections{shard=\"1\"} 4\n\
fleetgate_devices_connected{shard=\"0\"} 2\n\
fleetgate_devices_connected{shard=\"1\"} 3\n\
fleetgate_management_connected{shard=\"0\"} 0\n\
fleetgate_management_connected{shard=\"1\"} 1\n\
fleetgate_accepted_total 12\n\
fleetgate_tls_handshakes_total{version=\"1.2\"} 2\n\
fleetgate_tls_handshakes_total{version=\"1.3\"} 9\n\
fleetgate_errors_total{kind=\"tls\"} 1\n\
fleetgate_errors_total{kind=\"shard_full\"} 5\n\
fleetgate_errors_total{kind=\"http\"} 0\n\
fleetgate_registrations_total{reason=\"granted\"} 4\n\
fleetgate_registrations_total{reason=\"key_used\"} 2\n\
fleetgate_device_connection_limit_rejections_total 3\n\
fleetgate_device_connection_limit 100\n\
fleetgate_info{version=\"0.1.0\",driver=\"uring\",shards=\"2\"} 1\n\
fleetgate_resident_memory_bytes 25165824\n";

    #[test]
    fn parses_samples_with_and_without_labels() {
        let m = Metrics::parse(PAGE);
        assert_eq!(m.sum("fleetgate_connections"), Some(7.0));
        assert_eq!(m.sum("nothing"), None);
        assert_eq!(
            m.with_label("fleetgate_tls_handshakes_total", "version", "1.3"),
            Some(9.0)
        );
        let info = m.samples("fleetgate_info").next().unwrap();
        assert_eq!(info.label("driver"), Some("uring"));
        let s = parse_sample(r#"x{a="q\"uo,te}",b="2"} 1.5e3"#).unwrap();
        assert_eq!(s.labels[0], ("a".into(), "q\"uo,te}".into()));
        assert_eq!(s.label("b"), Some("2"));
        assert_eq!(s.value, 1500.0);
        assert!(parse_sample("broken{a=1} 2").is_none());
    }

    #[test]
    fn summary_and_exit_codes() {
        let report = |status: &str| Report {
            url: "https://localhost:8443".into(),
            outcome: Outcome::Answered {
                status: status.into(),
                metrics: Ok(Metrics::parse(PAGE)),
            },
        };
        let text = report("warn").render();
        assert!(
            text.starts_with("fleetgate https://localhost:8443: WARN (serving, but no management")
        );
        assert!(
            text.contains("5 devices, 1 management, 7 TCP in all on 2 shards"),
            "{text}"
        );
        assert!(
            text.contains("registrations  4 granted, 2 refused (key_used 2)"),
            "{text}"
        );
        assert!(
            text.contains("3 at the device connection limit (limit 100), 5 with a full shard"),
            "{text}"
        );
        assert!(text.contains("11 (TLS 1.3: 9, TLS 1.2: 2)"), "{text}");
        assert!(
            text.contains("errors         tls 1, shard_full 5\n"),
            "{text}"
        );
        assert!(text.contains("RSS 24.0 MiB"), "{text}");
        assert!(text.contains("version 0.1.0, driver uring"), "{text}");
        assert_eq!(report("ok").exit_code(), 0);
        assert_eq!(report("warn").exit_code(), 1);
        assert_eq!(report("init").exit_code(), 1);
        assert_eq!(report("err").exit_code(), 2);
        assert_eq!(report("bogus").exit_code(), 2);
        let down = Report {
            url: "https://x:1".into(),
            outcome: Outcome::Unreachable("refused".into()),
        };
        assert_eq!(down.exit_code(), 2);
        assert_eq!(
            down.render(),
            "fleetgate https://x:1: UNREACHABLE: refused\n"
        );
    }

    #[test]
    fn urls() {
        let t = Target::parse("https://gw.example.com:8443/usg/endpoint").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("gw.example.com", 8443));
        let t = Target::parse("https://[::1]:9000").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        assert_eq!(t.base(), "https://[::1]:9000");
        assert_eq!(t.authority(), "[::1]:9000");
        assert_eq!(Target::parse("example.org").unwrap().port, 443);
        assert!(Target::parse("http://localhost:8443").is_err());
        assert!(Target::parse("https://:8443").is_err());
        assert_eq!(
            url_for_listen("0.0.0.0:443".parse().unwrap()),
            "https://localhost:443"
        );
        assert_eq!(
            url_for_listen("10.0.0.1:8443".parse().unwrap()),
            "https://10.0.0.1:8443"
        );
        assert_eq!(parse_status(br#"{"status":"ok"}"#).as_deref(), Some("ok"));
        assert_eq!(parse_status(b"nope"), None);
    }

    #[test]
    fn command_line() {
        use clap::{CommandFactory as _, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            status: StatusArgs,
        }
        Cli::command().debug_assert();
        let c = Cli::try_parse_from(["status", "--url", "https://gw:9443", "--insecure"]).unwrap();
        assert_eq!(c.status.url.as_deref(), Some("https://gw:9443"));
        assert!(c.status.insecure && c.status.ca.is_none());
        assert_eq!(c.status.timeout, 5);
        assert!(Cli::try_parse_from(["status", "--ca", "x.pem", "--insecure"]).is_err());
    }

    #[test]
    fn unreachable_port_is_exit_2_with_a_reason() {
        // A port nobody listens on: bind, learn the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args = StatusArgs {
            url: Some(format!("https://127.0.0.1:{port}")),
            ca: None,
            insecure: true,
            config: None,
            timeout: 2,
        };
        let r = probe(&args, None).unwrap();
        assert_eq!(r.exit_code(), 2);
        assert!(r.render().contains("refused"), "{}", r.render());
    }
}
