//! Hand-out: what an operator gives a user so a device can register — for every public
//! gateway address: host, port, the root fingerprint in four parts, and the key.
//!
//! Three renderings of the same content:
//! * **text** ([`text`]): the reference layout, one plain block per key and gateway;
//! * **`icg.xml`** ([`xml`]): for a USB stick or a script (schema below);
//! * **`icg.html`** ([`html`]): a self-contained page, readable on screen and printable (one
//!   key per printed page). It is also well-formed XML (void elements self-closed), so
//!   scripts can read it with an XML parser.
//!
//! All input is escaped for the target format; characters XML 1.0 cannot carry (most control
//! characters) are replaced by U+FFFD. Nothing is read from disk here: the caller passes the
//! gateways (from [`HandoutConfig`]), the root fingerprint and the keys.
//!
//! # `icg.xml`
//!
//! ```xml
//! <?xml version="1.0" encoding="UTF-8"?>
//! <icg version="1">
//!   <credential>
//!     <key>K7Q2-9XM4-T3HB-WP0R-ZC8D</key>
//!     <gateway>
//!       <host>gw.example.com</host>
//!       <port>8443</port>
//!       <fingerprint>
//!         <part index="1">0123456789ABCDEF</part>
//!         <part index="2">…</part>
//!         <part index="3">…</part>
//!         <part index="4">…</part>
//!       </fingerprint>
//!     </gateway>
//!     <!-- one <gateway> per public gateway address -->
//!   </credential>
//!   <!-- one <credential> per key -->
//! </icg>
//! ```

#![forbid(unsafe_code)]

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::pki::Fingerprint;

/// One address devices reach a gateway by (what goes into the hand-out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicGateway {
    /// DNS name or IP address, as devices should dial it (no brackets around IPv6).
    pub host: String,
    /// TCP port (the gateway's port as seen from outside, e.g. 8443 or 443).
    #[serde(default = "default_port")]
    pub port: u16,
}

fn default_port() -> u16 {
    8443
}

/// Hand-out settings (config section `[handout]`).
///
/// ```toml
/// [handout]
/// gateways = [
///   { host = "gw1.example.com", port = 8443 },
///   { host = "203.0.113.7", port = 443 },
/// ]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoutConfig {
    /// Every public gateway address, in the order agents should try them.
    pub gateways: Vec<PublicGateway>,
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Plain text blocks (the reference layout).
    #[default]
    Text,
    /// `icg.xml`.
    Xml,
    /// `icg.html`.
    Html,
}

impl Format {
    /// The conventional file name.
    pub fn file_name(self) -> &'static str {
        match self {
            Format::Text => "icg.txt",
            Format::Xml => "icg.xml",
            Format::Html => "icg.html",
        }
    }

    /// The MIME type.
    pub fn mime_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; charset=utf-8",
            Format::Xml => "application/xml",
            Format::Html => "text/html; charset=utf-8",
        }
    }
}

/// Why a hand-out cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// No public gateway address is configured.
    #[error(
        "no public gateway address is configured: add [[handout.gateways]] entries (host, port) to the config"
    )]
    NoGateways,
    /// No key was given.
    #[error("no key to hand out")]
    NoKeys,
    /// A configured gateway address is unusable.
    #[error("public gateway address {host:?}: {reason}")]
    BadGateway {
        /// The host as configured.
        host: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// What to render: the keys, the gateways they are valid for, and the root fingerprint.
#[derive(Debug, Clone, Copy)]
pub struct Handout<'a> {
    /// Public gateway addresses, in order.
    pub gateways: &'a [PublicGateway],
    /// The fingerprint of the root certificate devices will be shown.
    pub fingerprint: &'a Fingerprint,
    /// The keys, as printed by `keys create`.
    pub keys: &'a [String],
}

impl Handout<'_> {
    /// Checks there is something to render and every gateway address is usable.
    pub fn validate(&self) -> Result<(), ExportError> {
        if self.gateways.is_empty() {
            return Err(ExportError::NoGateways);
        }
        if self.keys.is_empty() {
            return Err(ExportError::NoKeys);
        }
        for g in self.gateways {
            let bad = |reason| ExportError::BadGateway {
                host: g.host.clone(),
                reason,
            };
            if g.host.is_empty() {
                return Err(bad("empty host"));
            }
            if g.host.len() > 253 || !g.host.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(
                    "a host is a DNS name or an IP address (printable ASCII, at most 253 characters)",
                ));
            }
            if g.port == 0 {
                return Err(bad("port 0"));
            }
        }
        Ok(())
    }
}

/// Renders `handout` in `format`.
pub fn render(handout: &Handout<'_>, format: Format) -> Result<String, ExportError> {
    match format {
        Format::Text => text(handout),
        Format::Xml => xml(handout),
        Format::Html => html(handout),
    }
}

/// The text layout: for every key and every gateway a block of
/// `Host`, `Port`, `Fingerprint Part 1` … `Fingerprint Part 4`, `Key`, blocks separated by a
/// blank line.
pub fn text(handout: &Handout<'_>) -> Result<String, ExportError> {
    handout.validate()?;
    let parts = handout.fingerprint.parts();
    let mut out = String::new();
    for key in handout.keys {
        for g in handout.gateways {
            if !out.is_empty() {
                out.push('\n');
            }
            let _ = writeln!(out, "Host: {}", one_line(&g.host));
            let _ = writeln!(out, "Port: {}", g.port);
            for (i, p) in parts.iter().enumerate() {
                let _ = writeln!(out, "Fingerprint Part {}: {p}", i + 1);
            }
            let _ = writeln!(out, "Key: {}", one_line(key));
        }
    }
    Ok(out)
}

/// `icg.xml` (see the module docs for the layout).
pub fn xml(handout: &Handout<'_>) -> Result<String, ExportError> {
    handout.validate()?;
    let parts = handout.fingerprint.parts();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<icg version=\"1\">\n");
    for key in handout.keys {
        out.push_str("  <credential>\n");
        let _ = writeln!(out, "    <key>{}</key>", xml_escape(key));
        for g in handout.gateways {
            out.push_str("    <gateway>\n");
            let _ = writeln!(out, "      <host>{}</host>", xml_escape(&g.host));
            let _ = writeln!(out, "      <port>{}</port>", g.port);
            out.push_str("      <fingerprint>\n");
            for (i, p) in parts.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "        <part index=\"{}\">{}</part>",
                    i + 1,
                    xml_escape(p)
                );
            }
            out.push_str("      </fingerprint>\n    </gateway>\n");
        }
        out.push_str("  </credential>\n");
    }
    out.push_str("</icg>\n");
    Ok(out)
}

const HTML_HEAD: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1"/>
<title>Gateway registration</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem; color: #111; }
h1 { font-size: 1.4rem; }
p.how { max-width: 40rem; }
section { margin: 0 0 2.5rem; }
h2 { font-size: 1.1rem; margin-bottom: .4rem; }
table { border-collapse: collapse; min-width: 32rem; }
th, td { border: 1px solid #555; padding: .35rem .7rem; text-align: left; }
th { background: #eee; font-weight: 600; width: 11rem; }
th.gw { background: #ddd; text-align: center; }
td.v { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 1.05rem; letter-spacing: .03em; }
td.key { font-weight: 700; }
@media print {
  body { margin: 0; }
  p.how { font-size: .9rem; }
  th { background: none; }
  section { page-break-after: always; break-after: page; page-break-inside: avoid; break-inside: avoid; }
  section:last-of-type { page-break-after: auto; break-after: auto; }
}
</style>
</head>
<body>
<h1>Gateway registration</h1>
<p class="how">To connect the device: enter the gateway host and port, compare the certificate
fingerprint part the device asks for with the one below, then enter the key. A one-time key
works for one device, once. Keep this page private.</p>
"#;

/// `icg.html`: a self-contained printable page with one table per key.
pub fn html(handout: &Handout<'_>) -> Result<String, ExportError> {
    handout.validate()?;
    let parts = handout.fingerprint.parts();
    let mut out = String::from(HTML_HEAD);
    let many_gateways = handout.gateways.len() > 1;
    for (n, key) in handout.keys.iter().enumerate() {
        let _ = writeln!(out, "<section>\n<h2>Key {}</h2>\n<table>", n + 1);
        let _ = writeln!(
            out,
            "<tr><th>Key</th><td class=\"v key\">{}</td></tr>",
            html_escape(key)
        );
        for (i, g) in handout.gateways.iter().enumerate() {
            if many_gateways {
                let _ = writeln!(
                    out,
                    "<tr><th class=\"gw\" colspan=\"2\">Gateway {}</th></tr>",
                    i + 1
                );
            }
            let _ = writeln!(
                out,
                "<tr><th>Host</th><td class=\"v\">{}</td></tr>\n<tr><th>Port</th><td class=\"v\">{}</td></tr>",
                html_escape(&g.host),
                g.port
            );
            for (j, p) in parts.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "<tr><th>Fingerprint Part {}</th><td class=\"v\">{}</td></tr>",
                    j + 1,
                    html_escape(p)
                );
            }
        }
        out.push_str("</table>\n</section>\n");
    }
    out.push_str("</body>\n</html>\n");
    Ok(out)
}

/// Replaces characters XML 1.0 cannot carry (C0 controls other than tab/LF/CR, U+FFFE/U+FFFF).
fn xml_char(c: char) -> char {
    match c {
        '\t' | '\n' | '\r' => c,
        c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => '\u{FFFD}',
        c => c,
    }
}

/// Escapes text for XML element content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().map(xml_char) {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    xml_escape(s).replace("&apos;", "&#39;")
}

/// Text output stays one line per field: control characters become U+FFFD.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(host: &str, port: u16) -> PublicGateway {
        PublicGateway {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn text_is_the_reference_layout() {
        let fp = Fingerprint([0xAB; 32]);
        let gateways = [gw("gw.example.com", 8443)];
        let keys = ["K7Q2-9XM4-T3HB-WP0R-ZC8D".to_owned()];
        let got = text(&Handout {
            gateways: &gateways,
            fingerprint: &fp,
            keys: &keys,
        })
        .unwrap();
        let part = "ABABABABABABABAB";
        assert_eq!(
            got,
            format!(
                "Host: gw.example.com\nPort: 8443\nFingerprint Part 1: {part}\nFingerprint Part 2: {part}\n\
                 Fingerprint Part 3: {part}\nFingerprint Part 4: {part}\nKey: K7Q2-9XM4-T3HB-WP0R-ZC8D\n"
            )
        );
    }

    #[test]
    fn nothing_to_hand_out_is_an_error() {
        let fp = Fingerprint([0; 32]);
        let keys = ["K".to_owned()];
        let none = Handout {
            gateways: &[],
            fingerprint: &fp,
            keys: &keys,
        };
        assert_eq!(text(&none).unwrap_err(), ExportError::NoGateways);
        let gateways = [gw("a", 1)];
        let no_keys = Handout {
            gateways: &gateways,
            fingerprint: &fp,
            keys: &[],
        };
        assert_eq!(xml(&no_keys).unwrap_err(), ExportError::NoKeys);
        for bad in [gw("", 1), gw("a b", 1), gw("a", 0)] {
            let gateways = [bad];
            let h = Handout {
                gateways: &gateways,
                fingerprint: &fp,
                keys: &keys,
            };
            assert!(matches!(
                html(&h).unwrap_err(),
                ExportError::BadGateway { .. }
            ));
        }
    }

    #[test]
    fn escaping() {
        assert_eq!(
            xml_escape("a<b>&\"'\u{1}"),
            "a&lt;b&gt;&amp;&quot;&apos;\u{FFFD}"
        );
        assert_eq!(html_escape("'"), "&#39;");
        assert_eq!(one_line("a\nb"), "a\u{FFFD}b");
    }

    #[test]
    fn config_parses_from_toml() {
        let cfg: HandoutConfig = toml::from_str(
            "gateways = [{ host = \"gw.example.com\" }, { host = \"203.0.113.7\", port = 443 }]",
        )
        .unwrap();
        assert_eq!(
            cfg.gateways,
            [gw("gw.example.com", 8443), gw("203.0.113.7", 443)]
        );
        assert!(toml::from_str::<HandoutConfig>("gateway = []").is_err());
    }
}
