//! Chain verification: every rule of SPEC.md "Certificates", each failure a [`Violation`] that
//! names the certificate (subject) and the [`Rule`].
//!
//! The rules are checked one by one with x509-parser (so each failure gets its own message),
//! then — when none failed — the chain is cross-checked with rustls-webpki, the verifier rustls
//! clients use, for server authentication and every host; a webpki rejection that our rules
//! missed becomes a [`Rule::Webpki`] violation.

use std::fmt;
use std::net::IpAddr;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::Keystore;
use super::cert::{CertInfo, San, format_time, parse_x509};

/// A rule of the chain (SPEC.md "Certificates").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// Every certificate must parse as X.509.
    Parse,
    /// The chain holds an end-entity and a root CA (at least two certificates).
    ChainShape,
    /// Root and intermediates have BasicConstraints cA=true.
    CaFlag,
    /// A pathLenConstraint, where present, allows the intermediates below it.
    PathLength,
    /// The end-entity is not a CA.
    EndEntityNotCa,
    /// The end-entity carries a Subject Alternative Name.
    SanPresent,
    /// Every host the gateway is reached by is covered by a SAN (wildcards as RFC 6125).
    HostCovered,
    /// Each certificate is issued and signed by the next one.
    Signature,
    /// The last certificate is a self-signed root.
    SelfSignedRoot,
    /// Now is within every certificate's validity period.
    Validity,
    /// The private key belongs to the end-entity.
    KeyMatch,
    /// The server certificate's display name (CN) differs from the root's.
    DistinctName,
    /// rustls-webpki accepts the chain for server authentication.
    Webpki,
}

impl Rule {
    /// Short stable identifier (`ca-flag`, `path-length`, …) for scripts and logs.
    pub fn id(self) -> &'static str {
        match self {
            Rule::Parse => "parse",
            Rule::ChainShape => "chain-shape",
            Rule::CaFlag => "ca-flag",
            Rule::PathLength => "path-length",
            Rule::EndEntityNotCa => "end-entity-not-ca",
            Rule::SanPresent => "san-present",
            Rule::HostCovered => "host-covered",
            Rule::Signature => "signature",
            Rule::SelfSignedRoot => "self-signed-root",
            Rule::Validity => "validity",
            Rule::KeyMatch => "key-match",
            Rule::DistinctName => "distinct-name",
            Rule::Webpki => "webpki",
        }
    }

    /// The rule in words.
    pub fn description(self) -> &'static str {
        match self {
            Rule::Parse => "every certificate must be valid X.509",
            Rule::ChainShape => "the chain must hold the server certificate and its root CA",
            Rule::CaFlag => "root and intermediates must have BasicConstraints cA=true",
            Rule::PathLength => "a pathLenConstraint must allow the chain below it",
            Rule::EndEntityNotCa => "the server certificate must not be a CA",
            Rule::SanPresent => "the server certificate must carry a Subject Alternative Name",
            Rule::HostCovered => "every host the gateway is reached by must be in the SAN",
            Rule::Signature => "each certificate must be signed by the next one in the chain",
            Rule::SelfSignedRoot => "the chain must end with a self-signed root",
            Rule::Validity => "every certificate must be valid now",
            Rule::KeyMatch => "the private key must belong to the server certificate",
            Rule::DistinctName => "the server certificate's name must differ from the root's",
            Rule::Webpki => "rustls-webpki must accept the chain for server authentication",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Subject of the certificate at fault (`CN=…, O=…`), or `certificate #n` when unparsable.
    pub subject: String,
    /// The rule.
    pub rule: Rule,
    /// What exactly is wrong.
    pub message: String,
}

impl fmt::Display for Violation {
    /// `<subject>: <message> [rule <id>: <description>]`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} [rule {}: {}]",
            self.subject,
            self.message,
            self.rule.id(),
            self.rule.description()
        )
    }
}

pub(crate) fn format_violations(v: &[Violation]) -> String {
    v.iter()
        .map(|v| format!("  - {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Verifies a keystore now against `hosts` (see [`verify_chain_at`]).
pub fn verify(keystore: &Keystore, hosts: &[String]) -> Vec<Violation> {
    verify_chain(&keystore.chain, Some(&keystore.key), hosts)
}

/// Verifies a chain (leaf first, root last) now.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    key: Option<&PrivateKeyDer<'_>>,
    hosts: &[String],
) -> Vec<Violation> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    verify_chain_at(chain, key, hosts, now)
}

/// Verifies a chain (leaf first, root last) at `now` (seconds since the Unix epoch) and
/// returns every broken rule (empty: valid). `key` is the leaf's private key (skipped when
/// None); `hosts` are the DNS names/IPs the gateway is reached by.
pub fn verify_chain_at(
    chain: &[CertificateDer<'_>],
    key: Option<&PrivateKeyDer<'_>>,
    hosts: &[String],
    now: i64,
) -> Vec<Violation> {
    check(chain, key, hosts, now, Target::Server)
}

/// Verifies a CA's chain (the CA first, root last; a root alone is fine) at `now`: what
/// `import --ca-key` and `create-intermediate` need. Same rules as [`verify_chain_at`] except
/// the end-entity ones: the first certificate must itself be a CA, its pathLenConstraint and
/// those above must leave room for it, and `key` (when given) must belong to it.
pub fn verify_ca_chain_at(
    chain: &[CertificateDer<'_>],
    key: Option<&PrivateKeyDer<'_>>,
    now: i64,
) -> Vec<Violation> {
    check(chain, key, &[], now, Target::Ca)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// chain[0] is the gateway's server certificate.
    Server,
    /// chain[0] is a CA that will issue.
    Ca,
}

fn check(
    chain: &[CertificateDer<'_>],
    key: Option<&PrivateKeyDer<'_>>,
    hosts: &[String],
    now: i64,
    target: Target,
) -> Vec<Violation> {
    let mut out = Vec::new();
    if chain.is_empty() {
        out.push(Violation {
            subject: "(no certificate)".into(),
            rule: Rule::ChainShape,
            message: "the chain is empty".into(),
        });
        return out;
    }
    let mut parsed = Vec::with_capacity(chain.len());
    for (i, der) in chain.iter().enumerate() {
        match parse_x509(der) {
            Ok(x) => parsed.push(x),
            Err(e) => out.push(Violation {
                subject: format!("certificate #{}", i + 1),
                rule: Rule::Parse,
                message: format!("not a valid X.509 certificate: {e}"),
            }),
        }
    }
    if !out.is_empty() {
        return out;
    }
    let infos: Vec<CertInfo> = chain
        .iter()
        .map(|der| CertInfo::parse(der))
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    if infos.len() != chain.len() {
        return out;
    }
    let n = chain.len();
    let leaf = &infos[0];
    let root = &infos[n - 1];
    let v = |out: &mut Vec<Violation>, info: &CertInfo, rule: Rule, message: String| {
        out.push(Violation {
            subject: info.label(),
            rule,
            message,
        });
    };

    if n == 1 && target == Target::Server {
        v(
            &mut out,
            leaf,
            Rule::ChainShape,
            if leaf.is_self_issued() {
                "the chain has only this self-signed certificate; issue the server certificate \
                 from a root CA and include that root"
                    .into()
            } else {
                format!(
                    "the chain has only the server certificate; its issuer {:?} (and the root) \
                     are missing",
                    leaf.issuer
                )
            },
        );
    }

    // Validity of every certificate.
    for info in &infos {
        if now < info.not_before {
            v(
                &mut out,
                info,
                Rule::Validity,
                format!("not yet valid: valid from {}", format_time(info.not_before)),
            );
        } else if now > info.not_after {
            v(
                &mut out,
                info,
                Rule::Validity,
                format!("expired on {}", format_time(info.not_after)),
            );
        }
    }

    // CA flags and path lengths of root and intermediates.
    let first_ca = match target {
        Target::Server => 1,
        Target::Ca => 0,
    };
    for (i, info) in infos.iter().enumerate().skip(first_ca) {
        let issues = if i == 0 {
            "is to issue certificates".to_owned()
        } else {
            format!("issues {:?}", infos[i - 1].subject)
        };
        match info.basic_constraints {
            None => v(
                &mut out,
                info,
                Rule::CaFlag,
                format!("has no BasicConstraints extension but {issues}; a CA needs cA=true"),
            ),
            Some(bc) if !bc.ca => v(
                &mut out,
                info,
                Rule::CaFlag,
                format!("has BasicConstraints cA=false but {issues}; a CA needs cA=true"),
            ),
            Some(bc) => {
                // CAs between this one and the end-entity.
                let intermediates_below = (i - first_ca) as u64;
                if let Some(p) = bc.path_len {
                    if u64::from(p) < intermediates_below {
                        v(
                            &mut out,
                            info,
                            Rule::PathLength,
                            format!(
                                "has pathLenConstraint={p}, which allows {p} intermediate CA(s) \
                                 below it, but the chain has {intermediates_below}"
                            ),
                        );
                    }
                }
            }
        }
    }

    // The end-entity.
    if target == Target::Server && (n > 1 || !leaf.is_self_issued()) {
        if leaf.is_ca() {
            v(
                &mut out,
                leaf,
                Rule::EndEntityNotCa,
                "has BasicConstraints cA=true; the server certificate must not be a CA".into(),
            );
        }
        let san_hosts: Vec<&San> = leaf
            .sans
            .iter()
            .filter(|s| matches!(s, San::Dns(_) | San::Ip(_)))
            .collect();
        if !leaf.has_san_extension || san_hosts.is_empty() {
            v(
                &mut out,
                leaf,
                Rule::SanPresent,
                if leaf.has_san_extension {
                    "its Subject Alternative Name lists no DNS name or IP address".into()
                } else {
                    "has no Subject Alternative Name; clients ignore the CN, so list every \
                     DNS name and IP address of the gateway in the SAN"
                        .into()
                },
            );
        }
        for host in hosts {
            let host = host.trim();
            if host.is_empty() {
                continue;
            }
            if !leaf.sans.iter().any(|san| san_covers(san, host)) {
                let list = if leaf.sans.is_empty() {
                    "none".to_owned()
                } else {
                    leaf.sans
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                v(
                    &mut out,
                    leaf,
                    Rule::HostCovered,
                    format!("does not cover host {host:?} (SAN: {list})"),
                );
            }
        }
    }

    // Issuer names and signatures: each certificate by the next, the root by itself.
    for i in 0..n {
        let info = &infos[i];
        let (signer_x509, signer) = if i + 1 < n {
            (&parsed[i + 1], &infos[i + 1])
        } else {
            (&parsed[i], &infos[i])
        };
        let is_root = i + 1 == n;
        if info.issuer_raw != signer.subject_raw {
            if is_root {
                if n > 1 {
                    v(
                        &mut out,
                        info,
                        Rule::SelfSignedRoot,
                        format!(
                            "the last certificate is not self-signed (issuer {:?}); the chain \
                             must end with the root CA",
                            info.issuer
                        ),
                    );
                }
            } else {
                v(
                    &mut out,
                    info,
                    Rule::Signature,
                    format!(
                        "is issued by {:?}, but the next certificate in the chain is {:?}",
                        info.issuer, signer.subject
                    ),
                );
            }
            continue;
        }
        if let Err(e) = parsed[i].verify_signature(Some(signer_x509.public_key())) {
            let rule = if is_root && n > 1 {
                Rule::SelfSignedRoot
            } else {
                Rule::Signature
            };
            let message = if is_root {
                format!("its self-signature does not verify ({e})")
            } else {
                format!(
                    "its signature does not verify with the public key of {:?} ({e})",
                    signer.subject
                )
            };
            v(&mut out, info, rule, message);
        }
    }

    // The key.
    if let Some(key) = key {
        match rcgen::KeyPair::try_from(key) {
            Ok(kp) if kp.public_key_raw() == leaf.public_key.as_slice() => {}
            Ok(_) => v(
                &mut out,
                leaf,
                Rule::KeyMatch,
                "the private key belongs to another certificate (its public key differs from \
                 this certificate's)"
                    .into(),
            ),
            Err(e) => v(
                &mut out,
                leaf,
                Rule::KeyMatch,
                format!("the private key cannot be used: {e}"),
            ),
        }
    }

    // Display names.
    if target == Target::Server
        && n > 1
        && leaf
            .display_name()
            .eq_ignore_ascii_case(root.display_name())
    {
        v(
            &mut out,
            leaf,
            Rule::DistinctName,
            format!(
                "has the same name {:?} as the root; give the server certificate its own name",
                leaf.display_name()
            ),
        );
    }

    if out.is_empty() && n > 1 && target == Target::Server {
        if let Err(message) = webpki_check(chain, hosts, now) {
            v(&mut out, leaf, Rule::Webpki, message);
        }
    }
    out
}

/// The rustls-webpki verdict for the chain (root as the only trust anchor), server
/// authentication at `now`, and every host.
pub fn webpki_check(
    chain: &[CertificateDer<'_>],
    hosts: &[String],
    now: i64,
) -> Result<(), String> {
    let n = chain.len();
    if n < 2 {
        return Err("the chain needs a root CA".into());
    }
    let root = &chain[n - 1];
    let anchor = webpki::anchor_from_trusted_cert(root)
        .map_err(|e| format!("the root cannot be a trust anchor: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| format!("rejected the server certificate: {e}"))?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..n - 1].to_vec();
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now).unwrap_or(0),
    ));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &intermediates,
        time,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| format!("rejected the chain: {e}"))?;
    for host in hosts {
        let host = host.trim();
        // A wildcard is a pattern, not a name a client connects to; our own rule covers it.
        if host.is_empty() || host.contains('*') {
            continue;
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let name = ServerName::try_from(host)
            .map_err(|e| format!("host {host:?} is not a valid server name: {e}"))?;
        ee.verify_is_valid_for_subject_name(&name)
            .map_err(|e| format!("rejected host {host:?}: {e}"))?;
    }
    Ok(())
}

/// Does a SAN entry cover `host` (RFC 6125: case-insensitive, a `*` only as the whole
/// left-most label, matching exactly one label; IP addresses only match IP SANs)?
pub fn san_covers(san: &San, host: &str) -> bool {
    let host = host.trim();
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return matches!(san, San::Ip(s) if *s == ip);
    }
    match san {
        San::Dns(pattern) => dns_matches(pattern, host),
        _ => false,
    }
}

fn dns_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if pattern.is_empty() || host.is_empty() {
        return false;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) => match host.split_once('.') {
            Some((first, rest)) => {
                !first.is_empty() && !suffix.is_empty() && !suffix.contains('*') && rest == suffix
            }
            None => false,
        },
        None => !pattern.contains('*') && pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6125_wildcards() {
        let w = San::Dns("*.Example.org".into());
        assert!(san_covers(&w, "gw.example.org"));
        assert!(san_covers(&w, "GW.example.org."));
        assert!(!san_covers(&w, "example.org"));
        assert!(!san_covers(&w, "a.b.example.org"));
        assert!(!san_covers(&w, ".example.org"));
        let d = San::Dns("gw.example.com".into());
        assert!(san_covers(&d, "gw.example.com"));
        assert!(!san_covers(&d, "gw2.example.com"));
        assert!(!san_covers(
            &San::Dns("f*.example.com".into()),
            "foo.example.com"
        ));
        let ip = San::Ip("2001:db8::7".parse().unwrap());
        assert!(san_covers(&ip, "2001:DB8:0::7"));
        assert!(san_covers(&ip, "[2001:db8::7]"));
        assert!(!san_covers(&San::Dns("127.0.0.1".into()), "127.0.0.1"));
    }

    #[test]
    fn verifies_a_generated_chain_for_wildcards_and_bracketed_ips() {
        use crate::pki::create::{self, Host, IssuingCa, KeyType, Subject};
        let root = create::create_root(&Subject::cn("r"), 3650, KeyType::EcdsaP256).unwrap();
        let leaf = create::issue_server(
            &IssuingCa {
                chain: &root.chain,
                key: &root.key,
            },
            &Subject::cn("l"),
            &Host::parse_list("*.example.org;::1").unwrap(),
            365,
            KeyType::EcdsaP256,
        )
        .unwrap();
        let hosts: Vec<String> = ["*.example.org", "a.example.org", "[::1]", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let v = verify_chain(&leaf.chain, Some(&leaf.key), &hosts);
        assert!(v.is_empty(), "{v:?}");
        let v = verify_chain(&leaf.chain, Some(&root.key), &[]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].rule, Rule::KeyMatch);
    }
}
