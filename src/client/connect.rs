//! Establishing the management connection: URL, TCP (directly or through an HTTP proxy with
//! `CONNECT`), TLS with the client certificate, WebSocket upgrade, and the gateway's `hello`.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde::Deserialize;
use tungstenite::WebSocket;
use tungstenite::protocol::WebSocketConfig;

use super::{ClientError, ClientOptions, ProxyConfig};

/// The TLS stream under the WebSocket.
pub(crate) type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A parsed `wss://host:port/path` (or `host:port`, `host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUrl {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port (default 8443).
    pub port: u16,
    /// Path (default `/usg/management`).
    pub path: String,
}

impl GatewayUrl {
    /// Parses `wss://host[:port][/path]`, `https://…` (treated as `wss`), or a bare
    /// `host[:port]`. IPv6 addresses go in brackets.
    pub fn parse(input: &str) -> Result<GatewayUrl, ClientError> {
        let bad = |reason: &str| ClientError::Url {
            url: input.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = if let Some((scheme, rest)) = input.split_once("://") {
            match scheme.to_ascii_lowercase().as_str() {
                "wss" | "https" => rest,
                _ => return Err(bad("the scheme must be wss:// (TLS is required)")),
            }
        } else {
            input
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = split_host_port(authority).map_err(bad)?;
        let port = port.unwrap_or(8443);
        let path = if path.is_empty() || path == "/" {
            "/usg/management".to_owned()
        } else {
            path.to_owned()
        };
        Ok(GatewayUrl { host, port, path })
    }

    /// `host:port` with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL as `wss://authority/path`.
    pub fn url(&self) -> String {
        format!("wss://{}{}", self.authority(), self.path)
    }
}

/// Splits `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(authority: &str) -> Result<(String, Option<u16>), &'static str> {
    if authority.is_empty() {
        return Err("no host");
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '['")?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or("junk after ']'")?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err("IPv6 addresses must be in brackets"),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host");
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or("bad port")?,
        ),
    };
    Ok((host.to_owned(), port))
}

/// A parsed proxy URL: `http://[user:pass@]host[:port]` (default port 3128).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProxyTarget {
    pub host: String,
    pub port: u16,
    pub auth: Option<(String, String)>,
}

impl ProxyTarget {
    pub(crate) fn parse(p: &ProxyConfig) -> Result<ProxyTarget, ClientError> {
        let bad = |reason: &str| ClientError::Url {
            url: p.url.clone(),
            reason: reason.to_owned(),
        };
        let rest = match p.url.split_once("://") {
            Some((s, rest)) if s.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(bad("the proxy must be an http:// URL")),
            None => p.url.as_str(),
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, authority) = match rest.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, rest),
        };
        let (host, port) = split_host_port(authority).map_err(bad)?;
        let from_url = userinfo.map(|u| match u.split_once(':') {
            Some((user, pass)) => (percent_decode(user), percent_decode(pass)),
            None => (percent_decode(u), String::new()),
        });
        let auth = match (&p.username, &p.password) {
            (Some(u), pw) => Some((u.clone(), pw.clone().unwrap_or_default())),
            (None, _) => from_url,
        };
        Ok(ProxyTarget {
            host,
            port: port.unwrap_or(3128),
            auth,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `%XX` decoding for user info in URLs (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Connect { what, source }
}

/// TCP to `host:port`, trying each resolved address within `timeout`.
fn tcp_connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, ClientError> {
    let what = format!("{host}:{port}");
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(io_err(what.clone()))?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(ClientError::Connect { what, source: last })
}

/// Opens a tunnel through the proxy with `CONNECT`. Reads the answer byte by byte up to the
/// end of its head, so nothing of the tunnel is consumed.
pub(crate) fn proxy_connect(
    proxy: &ProxyTarget,
    target: &GatewayUrl,
    timeout: Duration,
) -> Result<TcpStream, ClientError> {
    let mut s = tcp_connect(&proxy.host, proxy.port, timeout)?;
    let what = format!("proxy {}", proxy.authority());
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(io_err(what.clone()))?;
    let mut req = format!(
        "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nUser-Agent: fleetgate/{v}\r\n",
        a = target.authority(),
        v = env!("CARGO_PKG_VERSION")
    );
    if let Some((u, p)) = &proxy.auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(io_err(what.clone()))?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(ClientError::Protocol(format!(
                "{what} sent an answer head over 16 KiB"
            )));
        }
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(ClientError::Protocol(format!(
                    "{what} closed the connection before answering CONNECT"
                )));
            }
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ClientError::Connect { what, source: e }),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status: u16 = parts.next().and_then(|c| c.parse().ok()).ok_or_else(|| {
        ClientError::Protocol(format!("{what} sent a malformed answer: {status_line:?}"))
    })?;
    if !version.starts_with("HTTP/1.") {
        return Err(ClientError::Protocol(format!(
            "{what} sent a malformed answer: {status_line:?}"
        )));
    }
    let reason = parts.next().unwrap_or("").trim().to_owned();
    match status {
        200..=299 => {
            s.set_read_timeout(None).map_err(io_err(what.clone()))?;
            s.set_write_timeout(None).map_err(io_err(what))?;
            Ok(s)
        }
        401 | 407 => Err(ClientError::ProxyAuth {
            proxy: proxy.authority(),
            status,
            sent_credentials: proxy.auth.is_some(),
        }),
        _ => Err(ClientError::Proxy {
            proxy: proxy.authority(),
            target: target.authority(),
            status,
            reason,
        }),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn pem_error(path: &Path, message: impl std::fmt::Display) -> ClientError {
    ClientError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The rustls client configuration: the client certificate chain and key, and the gateway's
/// root (`ca`) or, without one, the system roots.
pub(crate) fn tls_config(options: &ClientOptions) -> Result<Arc<ClientConfig>, ClientError> {
    let provider = Arc::new(crate::tls::provider());
    let mut roots = RootCertStore::empty();
    let ca_files: Vec<std::path::PathBuf> = match &options.ca {
        Some(p) => vec![p.clone()],
        None => match std::env::var_os("SSL_CERT_FILE") {
            Some(f) => vec![f.into()],
            None => [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .iter()
            .map(Into::into)
            .filter(|p: &std::path::PathBuf| p.exists())
            .take(1)
            .collect(),
        },
    };
    for f in &ca_files {
        let pem = read_file(f)?;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| pem_error(f, e))?;
            roots.add(c).map_err(|e| pem_error(f, e))?;
        }
    }
    if roots.is_empty() {
        return Err(ClientError::File {
            path: ca_files
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(system roots)".into()),
            message: "no CA certificate to trust the gateway with (pass --ca gateway-root.pem)"
                .into(),
        });
    }
    let cert_pem = read_file(&options.cert)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&options.cert, e))?;
    if certs.is_empty() {
        return Err(pem_error(&options.cert, "no certificate in the file"));
    }
    let key_pem = read_file(&options.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_error(&options.key, e))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls {
            host: String::new(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| pem_error(&options.key, e))?;
    Ok(Arc::new(config))
}

/// The gateway's first message on `/usg/management` (§6.1).
#[derive(Debug, Clone, Deserialize)]
pub struct Hello {
    /// Protocol version (1).
    pub protocol: u32,
    /// `management`.
    pub mode: String,
    /// `fleetgate/<version>`.
    #[serde(default)]
    pub gateway: String,
    /// The name in our certificate, as the gateway saw it.
    #[serde(default)]
    pub name: String,
}

/// Connects and upgrades; returns the WebSocket (still blocking) and the hello.
pub(crate) fn establish(
    options: &ClientOptions,
) -> Result<(WebSocket<Tls>, Hello, GatewayUrl), ClientError> {
    let url = GatewayUrl::parse(&options.url)?;
    let config = tls_config(options)?;
    let deadline = Instant::now() + options.connect_timeout;
    let tcp = match &options.proxy {
        Some(p) => proxy_connect(&ProxyTarget::parse(p)?, &url, options.connect_timeout)?,
        None => tcp_connect(&url.host, url.port, options.connect_timeout)?,
    };
    let what = url.authority();
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    tcp.set_read_timeout(Some(left))
        .and_then(|()| tcp.set_write_timeout(Some(left)))
        .map_err(io_err(what.clone()))?;
    let name = ServerName::try_from(url.host.clone()).map_err(|_| ClientError::Url {
        url: options.url.clone(),
        reason: "not a valid TLS server name".into(),
    })?;
    let conn = ClientConnection::new(config, name).map_err(|e| ClientError::Tls {
        host: what.clone(),
        message: e.to_string(),
    })?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| ClientError::Tls {
                host: what.clone(),
                message: e.to_string(),
            })?;
    }
    let ws_config = WebSocketConfig::default()
        .write_buffer_size(0)
        .max_message_size(Some(crate::proto::envelope::MAX_ENVELOPE + 1024))
        .max_frame_size(Some(crate::proto::envelope::MAX_ENVELOPE + 1024));
    let (mut ws, _resp) = tungstenite::client::client_with_config(url.url(), tls, Some(ws_config))
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                ClientError::Upgrade {
                    status,
                    hint: match status {
                        403 => " (the gateway did not accept our client certificate: not issued by its management CA, or revoked)".into(),
                        404 => " (no such endpoint: check the path, /usg/management)".into(),
                        _ => String::new(),
                    },
                }
            }
            tungstenite::HandshakeError::Failure(e) => classify_ws(&what, e),
            tungstenite::HandshakeError::Interrupted(_) => ClientError::WebSocket(
                "the WebSocket handshake timed out".into(),
            ),
        })?;
    // The hello: the first message.
    let hello = loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let h: Hello = serde_json::from_str(t.as_str()).map_err(|e| {
                    ClientError::Protocol(format!("bad hello from the gateway: {e}: {t}"))
                })?;
                if h.mode != "management" {
                    return Err(ClientError::Protocol(format!(
                        "the gateway answered in mode {:?}, not management: {t}",
                        h.mode
                    )));
                }
                break h;
            }
            Ok(tungstenite::Message::Close(f)) => {
                return Err(ClientError::Closed(match f {
                    Some(f) => format!("{} {}", u16::from(f.code), f.reason),
                    None => "closed before hello".into(),
                }));
            }
            Ok(_) => continue,
            Err(e) => return Err(classify_ws(&what, e)),
        }
    };
    Ok((ws, hello, url))
}

/// Maps a tungstenite error during connection set-up.
pub(crate) fn classify_ws(what: &str, e: tungstenite::Error) -> ClientError {
    match e {
        tungstenite::Error::Io(e) => {
            // rustls reports alerts as InvalidData with a rustls::Error inside.
            if e.kind() == io::ErrorKind::InvalidData {
                ClientError::Tls {
                    host: what.to_owned(),
                    message: e.to_string(),
                }
            } else {
                ClientError::Connect {
                    what: what.to_owned(),
                    source: e,
                }
            }
        }
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            ClientError::Closed("the gateway closed the connection".into())
        }
        other => ClientError::WebSocket(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_urls() {
        let u = GatewayUrl::parse("wss://gw.example.com:9443").unwrap();
        assert_eq!(u.url(), "wss://gw.example.com:9443/usg/management");
        let u = GatewayUrl::parse("gw.example.com").unwrap();
        assert_eq!((u.port, u.path.as_str()), (8443, "/usg/management"));
        let u = GatewayUrl::parse("wss://[::1]:1/x/y").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 1, "/x/y")
        );
        assert_eq!(u.authority(), "[::1]:1");
        assert!(GatewayUrl::parse("ws://h:1").is_err());
        assert!(GatewayUrl::parse("wss://h:0").is_err());
        assert!(GatewayUrl::parse("wss://::1:5").is_err());
        assert!(GatewayUrl::parse("wss://").is_err());
    }

    #[test]
    fn proxy_urls() {
        let p = |url: &str| ProxyConfig {
            url: url.into(),
            username: None,
            password: None,
        };
        let t = ProxyTarget::parse(&p("http://u%40x:p%3Aw@proxy:8080/")).unwrap();
        assert_eq!(t.host, "proxy");
        assert_eq!(t.port, 8080);
        assert_eq!(t.auth, Some(("u@x".into(), "p:w".into())));
        let t = ProxyTarget::parse(&p("proxy")).unwrap();
        assert_eq!((t.port, t.auth), (3128, None));
        let mut c = p("http://a:b@proxy:1");
        c.username = Some("user".into());
        c.password = Some("pass".into());
        assert_eq!(
            ProxyTarget::parse(&c).unwrap().auth,
            Some(("user".into(), "pass".into()))
        );
        assert!(ProxyTarget::parse(&p("socks5://proxy:1")).is_err());
    }
}
