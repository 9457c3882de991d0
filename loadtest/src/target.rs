//! The server under test: a `ws://` or `wss://` URL, parsed once and resolved to one
//! socket address that every simulated device connects to.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use anyhow::{Context, Result, bail};

/// A parsed WebSocket URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given; it is also the WebSocket request URI (its host goes into `Host:`).
    pub url: String,
    /// `wss://` (TLS) or `ws://` (plain TCP).
    pub secure: bool,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Target {
    /// Parses `ws[s]://host[:port][/path][?query]`.
    pub fn parse(url: &str) -> Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .with_context(|| format!("'{url}' is not a URL: expected wss://HOST:PORT/PATH"))?;
        let secure = match scheme.to_ascii_lowercase().as_str() {
            "wss" => true,
            "ws" => false,
            other => bail!("unsupported scheme '{other}://' in '{url}': use wss:// or ws://"),
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        if authority.contains('@') {
            bail!("user information in '{url}' is not supported");
        }
        let default_port = if secure { 443 } else { 80 };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .with_context(|| format!("unclosed '[' in '{url}'"))?;
            let port = match after {
                "" => default_port,
                p => parse_port(p.strip_prefix(':').unwrap_or(p), url)?,
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), parse_port(port, url)?),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            bail!("no host in '{url}'");
        }
        Ok(Self {
            url: url.to_owned(),
            secure,
            host,
            port,
            path,
        })
    }

    /// `host[:port]` as the `Host:` header wants it: IPv6 in brackets, the port only when it
    /// is not the scheme's default.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.secure, self.port) {
            (true, 443) | (false, 80) => host,
            (_, port) => format!("{host}:{port}"),
        }
    }

    /// Resolves the host, preferring IPv4 (the source-address ranges are IPv4).
    pub fn resolve(&self) -> Result<SocketAddr> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve host '{}'", self.host))?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .with_context(|| format!("host '{}' has no addresses", self.host))
    }
}

fn parse_port(port: &str, url: &str) -> Result<u16> {
    port.parse()
        .ok()
        .filter(|&p| p != 0)
        .with_context(|| format!("bad port '{port}' in '{url}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wss_url_with_port_and_path() {
        let t = Target::parse("wss://127.0.0.1:8443/usg/endpoint").unwrap();
        assert!(t.secure);
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8443));
        assert_eq!(t.path, "/usg/endpoint");
    }

    #[test]
    fn defaults_port_and_path() {
        let t = Target::parse("ws://localhost").unwrap();
        assert!(!t.secure);
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("localhost", 80, "/")
        );
        let t = Target::parse("wss://[::1]/x?y=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 443, "/x?y=1")
        );
        let t = Target::parse("wss://[::1]:9443").unwrap();
        assert_eq!(t.port, 9443);
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "https://x/",
            "127.0.0.1:8443",
            "wss://:8443/",
            "wss://h:0/",
            "wss://h:x/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn resolves_ip_literal_without_dns() {
        let t = Target::parse("wss://127.0.0.1:8443/").unwrap();
        assert_eq!(t.resolve().unwrap(), "127.0.0.1:8443".parse().unwrap());
    }
}
