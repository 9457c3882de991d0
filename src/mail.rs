//! E-mailing a hand-out through SMTP (lettre, blocking, rustls).
//!
//! The message is `multipart/mixed`: a plain-text body with a short instruction and the
//! [text hand-out](crate::export::text), and the same content attached as `icg.xml` and
//! `icg.html`. Recipients are given as one string separated by `;`
//! (`"a@x.example; Jo <b@y.example>"`); every address is checked before anything is sent, and
//! a bad one is an error that names it.
//!
//! Connection security ([`MailTls`]): STARTTLS required (default), STARTTLS when offered,
//! implicit TLS (SMTPS, port 465), or none. The server certificate is checked against the
//! system's roots plus an optional `ca_file` (for a company CA). Credentials are optional.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};
use serde::{Deserialize, Serialize};

use crate::export::{self, ExportError, Format, Handout};

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MailTls {
    /// Plain connection upgraded with STARTTLS; refuse to send if the server does not offer
    /// it (port 587). The default: keys must not cross the network in clear.
    #[default]
    Starttls,
    /// STARTTLS when the server offers it, else plain (only for a relay on a trusted network).
    StarttlsOptional,
    /// TLS from the first byte (SMTPS, port 465).
    Implicit,
    /// No encryption (a local relay on the same host only).
    None,
}

/// SMTP settings (config section `[mail]`).
///
/// ```toml
/// [mail]
/// server = "smtp.example.com"
/// port = 587                   # default: 587, or 465 with tls = "implicit", 25 with "none"
/// tls = "starttls"             # "starttls" | "starttls-optional" | "implicit" | "none"
/// from = "Fleet Gateway <gateway@example.com>"
/// username = "gateway"         # optional; with password
/// password = "…"               # optional; keep the config file 0600
/// ca_file = "/etc/ssl/company-ca.pem"   # optional extra trusted root(s), PEM
/// subject = "Gateway registration"
/// timeout_secs = 30
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailConfig {
    /// SMTP server host name (also the name its certificate must carry).
    pub server: String,
    /// SMTP port; `None` picks the usual port for [`tls`](MailConfig::tls).
    #[serde(default)]
    pub port: Option<u16>,
    /// Connection security.
    #[serde(default)]
    pub tls: MailTls,
    /// Sender (`addr@domain` or `Name <addr@domain>`).
    pub from: String,
    /// SMTP user name (AUTH PLAIN/LOGIN), with `password`.
    #[serde(default)]
    pub username: Option<String>,
    /// SMTP password.
    #[serde(default)]
    pub password: Option<String>,
    /// PEM file with extra root certificates to trust for the SMTP server.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Subject line.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Name sent in EHLO; default: this machine's host name.
    #[serde(default)]
    pub helo_name: Option<String>,
    /// Connect/read/write timeout in seconds. Default 30: an SMTP server that answers slower
    /// is broken, and the CLI must not hang.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_subject() -> String {
    "Gateway registration".into()
}

fn default_timeout() -> u64 {
    30
}

impl MailConfig {
    /// A config with defaults for everything but the server and the sender.
    pub fn new(server: impl Into<String>, from: impl Into<String>) -> MailConfig {
        MailConfig {
            server: server.into(),
            port: None,
            tls: MailTls::default(),
            from: from.into(),
            username: None,
            password: None,
            ca_file: None,
            subject: default_subject(),
            helo_name: None,
            timeout_secs: default_timeout(),
        }
    }

    /// The port used: [`port`](MailConfig::port), else 587 (STARTTLS), 465 (implicit), 25
    /// (none).
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            MailTls::Starttls | MailTls::StarttlsOptional => 587,
            MailTls::Implicit => 465,
            MailTls::None => 25,
        })
    }
}

/// Why mail could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The recipient list is empty.
    #[error("no recipient given (separate several with ';')")]
    NoRecipients,
    /// A recipient is not a valid address.
    #[error("invalid recipient address {address:?}: {reason}")]
    BadRecipient {
        /// The address as given.
        address: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The configured sender is not a valid address.
    #[error("invalid sender address (mail.from) {address:?}: {reason}")]
    BadSender {
        /// The address as configured.
        address: String,
        /// Why it is invalid.
        reason: String,
    },
    /// `username` without `password` or the other way round.
    #[error("mail.username and mail.password must be set together")]
    HalfCredentials,
    /// The hand-out cannot be rendered.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The CA file cannot be read or holds no certificate.
    #[error("mail.ca_file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// TLS settings could not be built.
    #[error("TLS setup for {server}: {reason}")]
    Tls {
        /// The SMTP server.
        server: String,
        /// lettre's message.
        reason: String,
    },
    /// The message could not be built.
    #[error("cannot build the message: {0}")]
    Compose(String),
    /// The SMTP exchange failed (connection, TLS, authentication, refusal).
    #[error("sending through {server}:{port} failed: {source}")]
    Send {
        /// The SMTP server.
        server: String,
        /// Its port.
        port: u16,
        /// lettre's error (with the server's reply, when there was one).
        source: lettre::transport::smtp::Error,
    },
}

impl MailError {
    /// True for input the operator must fix (addresses, config), false for delivery failures.
    pub fn is_rejection(&self) -> bool {
        !matches!(self, MailError::Send { .. } | MailError::Compose(_))
    }
}

/// Splits `list` at `;` and checks every address (`addr@domain` or `Name <addr@domain>`;
/// blanks around entries and empty entries are ignored).
pub fn parse_recipients(list: &str) -> Result<Vec<Mailbox>, MailError> {
    let mut out = Vec::new();
    for raw in list.split(';') {
        let address = raw.trim();
        if address.is_empty() {
            continue;
        }
        let mailbox: Mailbox = address
            .parse()
            .map_err(|e: lettre::address::AddressError| MailError::BadRecipient {
                address: address.to_owned(),
                reason: e.to_string(),
            })?;
        out.push(mailbox);
    }
    if out.is_empty() {
        return Err(MailError::NoRecipients);
    }
    Ok(out)
}

/// The plain-text body: instruction plus the text hand-out.
fn body_text(handout: &Handout<'_>) -> Result<String, ExportError> {
    let blocks = export::text(handout)?;
    Ok(format!(
        "Hello,\n\n\
         below are the details to register a device with the gateway. On the device, enter the\n\
         gateway's host and port, compare the fingerprint part the device asks for with the one\n\
         below, then enter the key. A one-time key works for one device, once.\n\n\
         {blocks}\n\
         The same details are attached as icg.xml and icg.html.\n"
    ))
}

/// Builds the message (exposed for tests and for a dry run).
pub fn compose(
    config: &MailConfig,
    recipients: &[Mailbox],
    handout: &Handout<'_>,
) -> Result<Message, MailError> {
    if recipients.is_empty() {
        return Err(MailError::NoRecipients);
    }
    let from: Mailbox =
        config
            .from
            .trim()
            .parse()
            .map_err(|e: lettre::address::AddressError| MailError::BadSender {
                address: config.from.clone(),
                reason: e.to_string(),
            })?;
    let text = body_text(handout)?;
    let xml = export::xml(handout)?;
    let html = export::html(handout)?;
    let mut builder = Message::builder().from(from).subject(&config.subject);
    for r in recipients {
        builder = builder.to(r.clone());
    }
    let content_type = |f: Format| {
        ContentType::parse(f.mime_type()).map_err(|e| MailError::Compose(e.to_string()))
    };
    builder
        .multipart(
            MultiPart::mixed()
                .singlepart(SinglePart::plain(text))
                .singlepart(
                    Attachment::new(Format::Xml.file_name().to_owned())
                        .body(xml, content_type(Format::Xml)?),
                )
                .singlepart(
                    Attachment::new(Format::Html.file_name().to_owned())
                        .body(html, content_type(Format::Html)?),
                ),
        )
        .map_err(|e| MailError::Compose(e.to_string()))
}

/// The SMTP transport for `config`.
pub fn transport(config: &MailConfig) -> Result<SmtpTransport, MailError> {
    let port = config.effective_port();
    let mut builder = SmtpTransport::builder_dangerous(config.server.clone())
        .port(port)
        .timeout(Some(Duration::from_secs(config.timeout_secs.max(1))));
    if config.tls != MailTls::None {
        let mut params = TlsParameters::builder(config.server.clone());
        if let Some(path) = &config.ca_file {
            let ca_err = |reason: String| MailError::CaFile {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            let certs = rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
                .collect::<Result<Vec<rustls_pki_types::CertificateDer<'static>>, _>>()
                .map_err(|e| ca_err(format!("not PEM: {e}")))?;
            if certs.is_empty() {
                return Err(ca_err("no CERTIFICATE in the file".into()));
            }
            for der in certs {
                let cert =
                    Certificate::from_der(der.to_vec()).map_err(|e| ca_err(e.to_string()))?;
                params = params.add_root_certificate(cert);
            }
        }
        let params = params.build().map_err(|e| MailError::Tls {
            server: config.server.clone(),
            reason: e.to_string(),
        })?;
        builder = builder.tls(match config.tls {
            MailTls::Starttls => Tls::Required(params),
            MailTls::StarttlsOptional => Tls::Opportunistic(params),
            MailTls::Implicit => Tls::Wrapper(params),
            MailTls::None => Tls::None,
        });
    }
    match (&config.username, &config.password) {
        (Some(u), Some(p)) => builder = builder.credentials(Credentials::new(u.clone(), p.clone())),
        (None, None) => {}
        _ => return Err(MailError::HalfCredentials),
    }
    let helo = config
        .helo_name
        .clone()
        .or_else(|| Some(crate::sys::hostname()).filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "localhost".to_owned());
    builder = builder.hello_name(ClientId::Domain(helo));
    Ok(builder.build())
}

/// Sends `handout` to the `;`-separated `recipients`. Returns the recipients it went to.
pub fn send_handout(
    config: &MailConfig,
    recipients: &str,
    handout: &Handout<'_>,
) -> Result<Vec<Mailbox>, MailError> {
    let to = parse_recipients(recipients)?;
    let message = compose(config, &to, handout)?;
    let transport = transport(config)?;
    transport.send(&message).map_err(|source| MailError::Send {
        server: config.server.clone(),
        port: config.effective_port(),
        source,
    })?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::PublicGateway;
    use crate::pki::Fingerprint;

    #[test]
    fn recipients_are_split_and_each_is_checked() {
        let r = parse_recipients(" a@x.example ;Jo Smith <b@y.example>;; ").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].email.to_string(), "b@y.example");
        let err = parse_recipients("a@x.example;not-an-address;c@z.example").unwrap_err();
        assert!(
            matches!(&err, MailError::BadRecipient { address, .. } if address == "not-an-address"),
            "{err}"
        );
        assert!(err.to_string().contains("\"not-an-address\""));
        assert!(matches!(
            parse_recipients(" ; "),
            Err(MailError::NoRecipients)
        ));
        assert!(matches!(
            parse_recipients("a@x.example, b@y.example"),
            Err(MailError::BadRecipient { .. })
        ));
    }

    #[test]
    fn config_from_toml_with_defaults() {
        let c: MailConfig =
            toml::from_str("server = \"smtp.example.com\"\nfrom = \"gw@example.com\"").unwrap();
        assert_eq!(c, MailConfig::new("smtp.example.com", "gw@example.com"));
        assert_eq!(c.effective_port(), 587);
        let c: MailConfig = toml::from_str(
            "server = \"s\"\nfrom = \"f@x\"\ntls = \"implicit\"\nusername = \"u\"\npassword = \"p\"",
        )
        .unwrap();
        assert_eq!((c.tls, c.effective_port()), (MailTls::Implicit, 465));
        assert!(
            toml::from_str::<MailConfig>("server = \"s\"\nfrom = \"f@x\"\nstarttls = true")
                .is_err()
        );
        let half = MailConfig {
            username: Some("u".into()),
            ..MailConfig::new("s", "f@x.example")
        };
        assert!(matches!(transport(&half), Err(MailError::HalfCredentials)));
    }

    #[test]
    fn the_message_carries_the_handout() {
        let gateways = [PublicGateway {
            host: "gw.example.com".into(),
            port: 8443,
        }];
        let fp = Fingerprint([0x5A; 32]);
        let keys = ["K7Q2-9XM4-T3HB-WP0R-ZC8D".to_owned()];
        let h = Handout {
            gateways: &gateways,
            fingerprint: &fp,
            keys: &keys,
        };
        let cfg = MailConfig::new("smtp.example.com", "Gateway <gw@example.com>");
        let to = parse_recipients("a@x.example;b@y.example").unwrap();
        let raw = String::from_utf8(compose(&cfg, &to, &h).unwrap().formatted()).unwrap();
        assert!(raw.contains("To: a@x.example, b@y.example"), "{raw}");
        assert!(raw.contains("Subject: Gateway registration"));
        assert!(raw.contains("Key: K7Q2-9XM4-T3HB-WP0R-ZC8D"));
        assert!(raw.contains("filename=\"icg.xml\"") && raw.contains("filename=\"icg.html\""));
        let bad = MailConfig::new("s", "nobody");
        assert!(matches!(
            compose(&bad, &to, &h),
            Err(MailError::BadSender { .. })
        ));
    }
}
