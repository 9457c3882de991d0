//! A minimal device for gateway-side tests, written straight from docs/protocol.md §5 with
//! tungstenite + rustls + rcgen (independent of the gateway's own codec and of the agent).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tungstenite::Message;

use super::{TlsStream, tls_connect_result};

/// A device: its key pair and, once registered, its certificate.
pub struct Device {
    pub unit: String,
    pub key: rcgen::KeyPair,
    pub cert_pem: Option<String>,
}

/// What a registration attempt got.
#[derive(Debug)]
pub enum Outcome {
    Registered {
        cert_pem: String,
        msg: Value,
    },
    Refused {
        reason: String,
        msg: Value,
        close: Option<u16>,
    },
}

impl Outcome {
    pub fn reason(&self) -> &str {
        match self {
            Outcome::Registered { .. } => "granted",
            Outcome::Refused { reason, .. } => reason,
        }
    }
}

pub type Ws = tungstenite::WebSocket<TlsStream>;

/// A registration that did not continue as a session: the answer (`registered` or
/// `refused`), the message after it if any, and the close code.
pub type NotStayed = (Value, Option<Value>, Option<u16>);

impl Device {
    pub fn new(unit: &str) -> Device {
        Device {
            unit: unit.into(),
            key: rcgen::KeyPair::generate().unwrap(),
            cert_pem: None,
        }
    }

    pub fn csr_b64(&self) -> String {
        let csr = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&self.key)
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(csr.der())
    }

    fn roots(root_pem: &Path) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(root_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }

    /// TLS config without (register) or with (session) the device certificate.
    pub fn tls_config(&self, root_pem: &Path, with_cert: bool) -> Arc<ClientConfig> {
        let b = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(Self::roots(root_pem));
        Arc::new(if with_cert {
            let chain = vec![
                CertificateDer::from_pem_slice(self.cert_pem.as_ref().unwrap().as_bytes()).unwrap(),
            ];
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
            b.with_client_auth_cert(chain, key).unwrap()
        } else {
            b.with_no_client_auth()
        })
    }

    /// Opens `/usg/endpoint` and reads the `hello`.
    pub fn open(
        &self,
        addr: SocketAddr,
        root_pem: &Path,
        with_cert: bool,
    ) -> Result<(Ws, Value), String> {
        let stream = tls_connect_result(addr, self.tls_config(root_pem, with_cert))?;
        let url = format!("wss://localhost:{}/usg/endpoint", addr.port());
        let (mut ws, resp) =
            tungstenite::client::client(url.as_str(), stream).map_err(|e| e.to_string())?;
        assert_eq!(resp.status(), 101);
        let hello = read_json(&mut ws).ok_or("no first message")?;
        Ok((ws, hello))
    }

    /// Registers with `key`; stores the certificate when granted.
    pub fn register(&mut self, addr: SocketAddr, root_pem: &Path, key: &str) -> Outcome {
        let (mut ws, hello) = self
            .open(addr, root_pem, false)
            .expect("register connection");
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["mode"], "register", "{hello}");
        let msg = serde_json::json!({
            "type": "register", "unit_id": self.unit, "key": key, "csr": self.csr_b64()
        });
        ws.send(Message::text(msg.to_string())).unwrap();
        let answer = read_json(&mut ws).expect("an answer to register");
        let close = read_close(&mut ws);
        match answer["type"].as_str() {
            Some("registered") => {
                assert_eq!(close, Some(1000), "{answer}");
                let pem = answer["certificate"].as_str().unwrap().to_owned();
                self.cert_pem = Some(pem.clone());
                Outcome::Registered {
                    cert_pem: pem,
                    msg: answer,
                }
            }
            Some("refused") => Outcome::Refused {
                reason: answer["reason"].as_str().unwrap().to_owned(),
                msg: answer,
                close,
            },
            _ => panic!("unexpected answer {answer}"),
        }
    }

    /// Registers with `key` asking to continue in session mode (`"session": true`, §5.3).
    /// `Ok((ws, registered, hello))` when the connection went on as a session;
    /// `Err((registered or refused, the message after it, close code))` otherwise. Stores
    /// the certificate when granted.
    #[allow(dead_code)]
    pub fn register_and_stay(
        &mut self,
        addr: SocketAddr,
        root_pem: &Path,
        key: &str,
    ) -> Result<(Ws, Value, Value), NotStayed> {
        let (mut ws, hello) = self
            .open(addr, root_pem, false)
            .expect("register connection");
        assert_eq!(hello["mode"], "register", "{hello}");
        let msg = serde_json::json!({
            "type": "register", "unit_id": self.unit, "key": key, "csr": self.csr_b64(),
            "session": true
        });
        ws.send(Message::text(msg.to_string())).unwrap();
        let answer = read_json(&mut ws).expect("an answer to register");
        if answer["type"] == "registered" {
            self.cert_pem = Some(answer["certificate"].as_str().unwrap().to_owned());
            let next = read_json(&mut ws);
            if let Some(h) = next.as_ref().filter(|h| h["type"] == "hello") {
                let h = h.clone();
                return Ok((ws, answer, h));
            }
            let close = read_close(&mut ws);
            return Err((answer, next, close));
        }
        let close = read_close(&mut ws);
        Err((answer, None, close))
    }

    /// Connects with the credential; `Ok(ws)` after a session `hello`, `Err(refused message)`.
    pub fn session(&self, addr: SocketAddr, root_pem: &Path) -> Result<Ws, Value> {
        let (mut ws, hello) = self
            .open(addr, root_pem, true)
            .map_err(|e| serde_json::json!({ "error": e }))?;
        match hello["type"].as_str() {
            Some("hello") => {
                assert_eq!(hello["mode"], "session", "{hello}");
                assert_eq!(hello["unit_id"], self.unit.as_str(), "{hello}");
                Ok(ws)
            }
            _ => {
                let close = read_close(&mut ws);
                let mut v = hello;
                v["close"] = serde_json::json!(close);
                Err(v)
            }
        }
    }
}

/// The next text message as JSON (pings are answered by tungstenite).
pub fn read_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(_) => return None,
            Err(_) => return None,
        }
    }
}

/// Reads until the close frame; its code.
pub fn read_close(ws: &mut Ws) -> Option<u16> {
    for _ in 0..20 {
        match ws.read() {
            Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Sets a read timeout on the socket under a WebSocket.
pub fn set_timeout(ws: &mut Ws, t: Duration) {
    ws.get_mut().sock.set_read_timeout(Some(t)).unwrap();
}
