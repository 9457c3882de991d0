//! Sending the hand-out to a real SMTP server started by the test: aiosmtpd (Debian package
//! `python3-aiosmtpd`) storing mail in a Maildir. The stored message is parsed with Python's
//! `email` package and its parts compared with the hand-out.
//!
//! Cases: plain SMTP, STARTTLS (certificate from a test CA given as `ca_file`), implicit TLS
//! (SMTPS), STARTTLS required but not offered (refused, nothing sent), an untrusted server
//! certificate (refused), a bad recipient (named, nothing sent).

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetgate::export::{self, Handout, PublicGateway};
use fleetgate::mail::{self, MailConfig, MailError, MailTls};
use fleetgate::pki::Fingerprint;

/// A Python interpreter that has aiosmtpd (the Debian one; a pyenv `python3` may lack it).
fn python() -> &'static str {
    for candidate in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(candidate)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return candidate;
        }
    }
    panic!(
        "these tests need the aiosmtpd SMTP server: apt-get install -y python3-aiosmtpd \
         (no python3 with `import aiosmtpd` found)"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An aiosmtpd process; killed (by PID) when dropped, also when the test panics.
struct SmtpServer {
    child: Child,
    port: u16,
    maildir: PathBuf,
    log: PathBuf,
}

enum ServerTls<'a> {
    None,
    /// STARTTLS offered and required by the server.
    Starttls(&'a Path, &'a Path),
    /// SMTPS.
    Implicit(&'a Path, &'a Path),
}

impl SmtpServer {
    fn start(dir: &Path, tls: ServerTls<'_>) -> SmtpServer {
        let maildir = dir.join("maildir");
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        let port = free_port();
        let log = dir.join(format!("aiosmtpd-{port}.log"));
        let mut cmd = Command::new(python());
        cmd.args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"));
        match tls {
            ServerTls::None => {}
            ServerTls::Starttls(cert, key) => {
                cmd.arg("--tlscert").arg(cert).arg("--tlskey").arg(key);
            }
            ServerTls::Implicit(cert, key) => {
                cmd.arg("--smtpscert").arg(cert).arg("--smtpskey").arg(key);
            }
        }
        cmd.args(["-c", "aiosmtpd.handlers.Mailbox"]).arg(&maildir);
        let logfile = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::from(logfile.try_clone().unwrap()))
            .stderr(Stdio::from(logfile))
            .spawn()
            .expect("start aiosmtpd");
        let mut server = SmtpServer {
            child,
            port,
            maildir,
            log,
        };
        server.wait_listening();
        server
    }

    /// Waits (at most 20 s) until the port accepts connections.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("aiosmtpd exited ({status}): {}", self.log_text());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not listen within 20 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Messages stored so far.
    fn stored(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.maildir.join("new"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a server certificate for 127.0.0.1/localhost, as PEM files in `dir`:
/// (ca.pem, server.pem, server.key).
fn make_certs(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("SMTP test CA {tag}"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let paths = (
        dir.join(format!("ca-{tag}.pem")),
        dir.join(format!("server-{tag}.pem")),
        dir.join(format!("server-{tag}.key")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

struct Fixture {
    gateways: Vec<PublicGateway>,
    fingerprint: Fingerprint,
    keys: Vec<String>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            gateways: vec![
                PublicGateway {
                    host: "gw1.example.test".into(),
                    port: 8443,
                },
                PublicGateway {
                    host: "198.51.100.20".into(),
                    port: 443,
                },
            ],
            fingerprint: Fingerprint([0x3C; 32]),
            keys: vec![
                "K7Q2-9XM4-T3HB-WP0R-ZC8D".into(),
                "AB12-CD34-EF56-GH78-JK90".into(),
            ],
        }
    }

    fn handout(&self) -> Handout<'_> {
        Handout {
            gateways: &self.gateways,
            fingerprint: &self.fingerprint,
            keys: &self.keys,
        }
    }
}

fn config(server: &SmtpServer, tls: MailTls) -> MailConfig {
    MailConfig {
        port: Some(server.port),
        tls,
        timeout_secs: 20,
        ..MailConfig::new("127.0.0.1", "Fleet Gateway <gateway@example.test>")
    }
}

/// One part of a stored message, decoded by Python's `email` package.
#[derive(Debug)]
struct Part {
    content_type: String,
    filename: Option<String>,
    text: String,
}

/// Parses a stored message: (headers we check, parts).
fn parse_message(path: &Path) -> (Vec<(String, String)>, Vec<Part>) {
    const SCRIPT: &str = r#"
import sys, email, email.policy
msg = email.message_from_binary_file(open(sys.argv[1], 'rb'), policy=email.policy.default)
for h in ('From', 'To', 'Subject', 'X-RcptTo'):
    print('H', h, '=', msg.get(h, ''))
for part in msg.walk():
    if part.is_multipart():
        continue
    body = part.get_content()
    if isinstance(body, bytes):
        body = body.decode('utf-8')
    print('P', part.get_content_type(), part.get_filename() or '-', len(body.encode('utf-8')))
    sys.stdout.write(body)
    print()
"#;
    let out = Command::new(python())
        .args(["-c", SCRIPT])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut reader = BufReader::new(&out.stdout[..]);
    let (mut headers, mut parts) = (Vec::new(), Vec::new());
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(h) = line.strip_prefix("H ") {
            let (name, value) = h.trim_end().split_once(" = ").unwrap();
            headers.push((name.to_owned(), value.to_owned()));
        } else if let Some(p) = line.strip_prefix("P ") {
            let fields: Vec<&str> = p.split_whitespace().collect();
            let len: usize = fields[2].parse().unwrap();
            let mut body = vec![0u8; len + 1];
            reader.read_exact(&mut body).unwrap();
            body.pop();
            parts.push(Part {
                content_type: fields[0].to_owned(),
                filename: (fields[1] != "-").then(|| fields[1].to_owned()),
                text: String::from_utf8(body).unwrap(),
            });
        }
    }
    (headers, parts)
}

/// Checks the one stored message is the hand-out for `to`.
fn assert_stored_handout(server: &SmtpServer, fx: &Fixture, to: &[&str]) {
    let stored = server.stored();
    assert_eq!(stored.len(), 1, "one message stored: {}", server.log_text());
    let (headers, parts) = parse_message(&stored[0]);
    let header = |n: &str| headers.iter().find(|h| h.0 == n).unwrap().1.clone();
    assert_eq!(header("From"), "Fleet Gateway <gateway@example.test>");
    assert_eq!(header("Subject"), "Gateway registration");
    for addr in to {
        assert!(header("To").contains(addr), "To: {}", header("To"));
        assert!(
            header("X-RcptTo").contains(addr),
            "envelope: {}",
            header("X-RcptTo")
        );
    }
    assert_eq!(parts.len(), 3, "{parts:?}");

    // The body holds the text hand-out exactly.
    let body = &parts[0];
    assert_eq!(body.content_type, "text/plain");
    assert!(body.filename.is_none());
    let text = export::text(&fx.handout()).unwrap();
    assert!(
        body.text.replace("\r\n", "\n").contains(&text),
        "body:\n{}\nexpected to contain:\n{text}",
        body.text
    );
    for part in fx.fingerprint.parts() {
        assert!(body.text.contains(&part));
    }
    for key in &fx.keys {
        assert!(body.text.contains(&format!("Key: {key}")));
    }

    // The attachments are the XML and HTML hand-outs, byte for byte (line ends aside).
    let xml = &parts[1];
    assert_eq!(xml.filename.as_deref(), Some("icg.xml"));
    assert_eq!(xml.content_type, "application/xml");
    assert_eq!(
        xml.text.replace("\r\n", "\n"),
        export::xml(&fx.handout()).unwrap()
    );
    let html = &parts[2];
    assert_eq!(html.filename.as_deref(), Some("icg.html"));
    assert_eq!(html.content_type, "text/html");
    assert_eq!(
        html.text.replace("\r\n", "\n"),
        export::html(&fx.handout()).unwrap()
    );
}

#[test]
fn plain_smtp_delivers_the_handout_to_every_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start(dir.path(), ServerTls::None);
    let fx = Fixture::new();
    let sent = mail::send_handout(
        &config(&server, MailTls::None),
        "owner@example.test; Second Person <second@example.test>",
        &fx.handout(),
    )
    .unwrap();
    assert_eq!(sent.len(), 2);
    assert_stored_handout(&server, &fx, &["owner@example.test", "second@example.test"]);
}

#[test]
fn starttls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path(), "a");
    let server = SmtpServer::start(dir.path(), ServerTls::Starttls(&cert, &key));
    let fx = Fixture::new();
    let cfg = MailConfig {
        ca_file: Some(ca),
        ..config(&server, MailTls::Starttls)
    };
    mail::send_handout(&cfg, "owner@example.test", &fx.handout()).unwrap();
    assert_stored_handout(&server, &fx, &["owner@example.test"]);

    // "starttls-optional" also upgrades when the server offers it (the server requires TLS,
    // so a plain attempt would have been refused).
    let cfg = MailConfig {
        tls: MailTls::StarttlsOptional,
        ..cfg
    };
    mail::send_handout(&cfg, "third@example.test", &fx.handout()).unwrap();
    assert_eq!(server.stored().len(), 2);
}

#[test]
fn implicit_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path(), "b");
    let server = SmtpServer::start(dir.path(), ServerTls::Implicit(&cert, &key));
    let fx = Fixture::new();
    let cfg = MailConfig {
        ca_file: Some(ca),
        ..config(&server, MailTls::Implicit)
    };
    mail::send_handout(&cfg, "owner@example.test", &fx.handout()).unwrap();
    assert_stored_handout(&server, &fx, &["owner@example.test"]);
}

#[test]
fn starttls_required_but_not_offered_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start(dir.path(), ServerTls::None);
    let fx = Fixture::new();
    let err = mail::send_handout(
        &config(&server, MailTls::Starttls),
        "owner@example.test",
        &fx.handout(),
    )
    .unwrap_err();
    assert!(matches!(err, MailError::Send { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", server.port))
    );
    assert!(err.to_string().contains("STARTTLS"), "{err}");
    assert!(server.stored().is_empty());
}

#[test]
fn an_untrusted_server_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cert, key) = make_certs(dir.path(), "c");
    let (other_ca, _, _) = make_certs(dir.path(), "d");
    let server = SmtpServer::start(dir.path(), ServerTls::Starttls(&cert, &key));
    let fx = Fixture::new();
    let cfg = MailConfig {
        ca_file: Some(other_ca),
        ..config(&server, MailTls::Starttls)
    };
    let err = mail::send_handout(&cfg, "owner@example.test", &fx.handout()).unwrap_err();
    assert!(matches!(err, MailError::Send { .. }), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(server.stored().is_empty());
}

#[test]
fn a_bad_recipient_is_named_and_nothing_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start(dir.path(), ServerTls::None);
    let fx = Fixture::new();
    let err = mail::send_handout(
        &config(&server, MailTls::None),
        "owner@example.test;owner.example.test;x@y.test",
        &fx.handout(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, MailError::BadRecipient { address, .. } if address == "owner.example.test"),
        "{err}"
    );
    assert!(err.to_string().contains("owner.example.test"));
    assert!(server.stored().is_empty());
}
