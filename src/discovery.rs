//! DNS discovery of the gateway from a user's e-mail address.
//!
//! The operator publishes a TXT record named `igel-cloud-gateway` under the users' mail domain,
//! holding the gateway URL: for `user@example.com` the agent looks up TXT
//! `igel-cloud-gateway.example.com` and finds `https://gw.example.com:8443/usg/endpoint`
//! (`wss://` is accepted too). Several TXT records give several gateways, in the order the DNS
//! returns them; a record split into several strings is joined first.
//!
//! URL rules: scheme `https` or `wss`; a DNS name, IPv4 address or bracketed IPv6 address; an
//! optional port (default 443, the scheme's); an optional path (default `/usg/endpoint`); no
//! user info. Records that break them are skipped when at least one record is valid, and make
//! the whole lookup fail otherwise ([`DiscoveryError::Malformed`]).
//!
//! The lookup uses hickory's resolver: the system's resolver configuration
//! (`/etc/resolv.conf`) by default, or one name server given as `ip:port`
//! ([`DiscoveryConfig::nameserver`]). The name is queried fully qualified (no search domains).

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::{ResolveError, TokioResolver};

/// The label in front of the mail domain.
pub const RECORD_LABEL: &str = "igel-cloud-gateway";
/// The path used when a record's URL has none.
pub const DEFAULT_PATH: &str = "/usg/endpoint";

/// How to look the record up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// Ask this name server (`ip:port`) instead of the system's resolvers.
    pub nameserver: Option<SocketAddr>,
    /// Time to wait for one answer. Default 5 s (the resolv.conf default).
    pub timeout: Duration,
    /// Tries per name server. Default 2.
    pub attempts: usize,
}

impl Default for DiscoveryConfig {
    fn default() -> DiscoveryConfig {
        DiscoveryConfig {
            nameserver: None,
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

/// A gateway found in DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredGateway {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// HTTP path of the device endpoint.
    pub path: String,
}

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The input is not a usable e-mail address.
    #[error("{input:?} is not an e-mail address ({reason}); give it as user@example.com")]
    BadEmail {
        /// What was given.
        input: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The name does not exist (NXDOMAIN) or has no TXT record (NODATA).
    #[error(
        "no TXT record {name} ({detail}) — ask your administrator to publish it (value: \
         https://<gateway host>:8443/usg/endpoint), or give the gateway address instead"
    )]
    NoRecord {
        /// The name looked up.
        name: String,
        /// "the name does not exist" or "the name has no TXT record".
        detail: &'static str,
    },
    /// TXT records exist but none holds a usable gateway URL.
    #[error("TXT record {name} holds no usable gateway URL: {}", describe(.records))]
    Malformed {
        /// The name looked up.
        name: String,
        /// Each record's text and why it was refused.
        records: Vec<(String, String)>,
    },
    /// The lookup itself failed (timeout, server failure, no name server configured).
    #[error("DNS lookup of TXT {name} failed: {message}")]
    Lookup {
        /// The name looked up.
        name: String,
        /// The resolver's message.
        message: String,
    },
    /// The async runtime for the resolver could not be created.
    #[error("cannot start the DNS resolver: {0}")]
    Runtime(#[from] std::io::Error),
}

fn describe(records: &[(String, String)]) -> String {
    records
        .iter()
        .map(|(text, why)| format!("{text:?} ({why})"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The record name for an e-mail address: `user@Example.COM` → `igel-cloud-gateway.example.com`
/// (internationalised domains in their ASCII form).
pub fn record_name(email: &str) -> Result<String, DiscoveryError> {
    let bad = |reason| DiscoveryError::BadEmail {
        input: email.to_owned(),
        reason,
    };
    let email = email.trim();
    let (local, domain) = email.rsplit_once('@').ok_or_else(|| bad("no @"))?;
    if local.is_empty() {
        return Err(bad("nothing before the @"));
    }
    if local.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("spaces in the address"));
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() {
        return Err(bad("no domain after the @"));
    }
    let ascii = Name::from_utf8(domain)
        .map_err(|_| bad("the domain is not a valid DNS name"))?
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if ascii.is_empty() {
        return Err(bad("no domain after the @"));
    }
    for label in ascii.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad("the domain is not a valid DNS name"));
        }
    }
    let name = format!("{RECORD_LABEL}.{ascii}");
    if name.len() > 253 {
        return Err(bad("the domain is too long"));
    }
    Ok(name)
}

/// Parses one TXT record's text as a gateway URL (rules in the module docs).
pub fn parse_record(text: &str) -> Result<DiscoveredGateway, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let rest = ["https://", "wss://"]
        .iter()
        .find_map(|scheme| lower.starts_with(scheme).then(|| &t[scheme.len()..]))
        .ok_or("not an https:// or wss:// URL")?;
    if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("spaces in the URL".into());
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("user info in the URL".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("text after ]")?),
        };
        (addr.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if host.parse::<IpAddr>().is_err() {
        let valid = host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(format!("{host:?} is not a host name or IP address"));
        }
    }
    let port = match port {
        None => 443,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("bad port {p:?}")),
        },
    };
    let path = match path {
        "" | "/" => DEFAULT_PATH.to_owned(),
        p => p.to_owned(),
    };
    Ok(DiscoveredGateway {
        host: host.to_ascii_lowercase(),
        port,
        path,
    })
}

/// Looks up the gateways for `email` (blocking: runs a small single-thread runtime).
pub fn discover(
    email: &str,
    config: &DiscoveryConfig,
) -> Result<Vec<DiscoveredGateway>, DiscoveryError> {
    let name = record_name(email)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(lookup(name, config))
}

/// [`discover`] for callers already inside a tokio runtime.
pub async fn discover_async(
    email: &str,
    config: &DiscoveryConfig,
) -> Result<Vec<DiscoveredGateway>, DiscoveryError> {
    let name = record_name(email)?;
    lookup(name, config).await
}

fn resolver(config: &DiscoveryConfig, name: &str) -> Result<TokioResolver, DiscoveryError> {
    let provider = TokioConnectionProvider::default();
    let mut builder = match config.nameserver {
        Some(ns) => TokioResolver::builder_with_config(
            ResolverConfig::from_parts(
                None,
                Vec::new(),
                NameServerConfigGroup::from_ips_clear(&[ns.ip()], ns.port(), true),
            ),
            provider,
        ),
        None => TokioResolver::builder(provider).map_err(|e| DiscoveryError::Lookup {
            name: name.to_owned(),
            message: format!("cannot read the system's resolver configuration: {e}"),
        })?,
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = config.timeout;
    opts.attempts = config.attempts.max(1);
    opts.use_hosts_file = ResolveHosts::Never;
    opts.cache_size = 0;
    Ok(builder.build())
}

async fn lookup(
    name: String,
    config: &DiscoveryConfig,
) -> Result<Vec<DiscoveredGateway>, DiscoveryError> {
    let resolver = resolver(config, &name)?;
    let fqdn = Name::from_ascii(format!("{name}.")).map_err(|e| DiscoveryError::Lookup {
        name: name.clone(),
        message: e.to_string(),
    })?;
    let answer = resolver
        .txt_lookup(fqdn)
        .await
        .map_err(|e| lookup_error(&name, e))?;
    let mut found = Vec::new();
    let mut refused = Vec::new();
    for txt in answer.iter() {
        let text: String = txt
            .txt_data()
            .iter()
            .map(|s| String::from_utf8_lossy(s))
            .collect();
        match parse_record(&text) {
            Ok(g) => found.push(g),
            Err(why) => refused.push((text, why)),
        }
    }
    if found.is_empty() {
        if refused.is_empty() {
            return Err(DiscoveryError::NoRecord {
                name,
                detail: "the name has no TXT record",
            });
        }
        return Err(DiscoveryError::Malformed {
            name,
            records: refused,
        });
    }
    for (text, why) in &refused {
        tracing::warn!(record = %name, text = %text, "ignoring TXT record: {why}");
    }
    Ok(found)
}

fn lookup_error(name: &str, e: ResolveError) -> DiscoveryError {
    if e.is_nx_domain() {
        DiscoveryError::NoRecord {
            name: name.to_owned(),
            detail: "the name does not exist",
        }
    } else if e.is_no_records_found() {
        DiscoveryError::NoRecord {
            name: name.to_owned(),
            detail: "the name has no TXT record",
        }
    } else {
        DiscoveryError::Lookup {
            name: name.to_owned(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(host: &str, port: u16, path: &str) -> DiscoveredGateway {
        DiscoveredGateway {
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn record_names() {
        assert_eq!(
            record_name(" Jo.Smith@Example.COM ").unwrap(),
            "igel-cloud-gateway.example.com"
        );
        assert_eq!(
            record_name("a@b.example.").unwrap(),
            "igel-cloud-gateway.b.example"
        );
        assert_eq!(
            record_name("user@bücher.example").unwrap(),
            "igel-cloud-gateway.xn--bcher-kva.example"
        );
        for bad in [
            "example.com",
            "@example.com",
            "user@",
            "user@exa mple.com",
            "user@-x.com",
            "user@a..b",
            "us er@example.com",
        ] {
            let err = record_name(bad).unwrap_err();
            assert!(
                matches!(err, DiscoveryError::BadEmail { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_record("https://gw.example.com:8443/usg/endpoint").unwrap(),
            gw("gw.example.com", 8443, "/usg/endpoint")
        );
        assert_eq!(
            parse_record(" WSS://GW.Example.com ").unwrap(),
            gw("gw.example.com", 443, "/usg/endpoint")
        );
        assert_eq!(
            parse_record("https://[2001:db8::7]:9443/other").unwrap(),
            gw("2001:db8::7", 9443, "/other")
        );
        assert_eq!(
            parse_record("https://203.0.113.7/").unwrap(),
            gw("203.0.113.7", 443, "/usg/endpoint")
        );
        for bad in [
            "http://gw.example.com/usg/endpoint",
            "gw.example.com:8443",
            "https://",
            "https://:8443/x",
            "https://gw.example.com:0/",
            "https://gw.example.com:99999/",
            "https://gw.example.com:port/",
            "https://user@gw.example.com/",
            "https://[2001:db8::7/",
            "https://[nothex]:1/",
            "https://gw example.com/",
            "https://gw..example.com/",
            "v=spf1 -all",
        ] {
            assert!(parse_record(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_no_record_message_says_what_to_do() {
        let e = DiscoveryError::NoRecord {
            name: "igel-cloud-gateway.example.com".into(),
            detail: "the name does not exist",
        };
        let s = e.to_string();
        assert!(s.starts_with("no TXT record igel-cloud-gateway.example.com"));
        assert!(s.contains("ask your administrator"));
    }
}
