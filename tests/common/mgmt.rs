//! A minimal management client for gateway-side relay tests, written from docs/protocol.md §6
//! with tungstenite + rustls (independent of the gateway's codec and of `fleetgate::client`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tungstenite::Message;

use super::{Gateway, TlsStream, tls_connect_result};

/// A management certificate made with the gateway's management CA (as `fleetgate mgmt add`
/// does).
pub struct MgmtCert {
    pub cert: CertificateDer<'static>,
    pub key: rcgen::KeyPair,
}

impl MgmtCert {
    pub fn issue(data_dir: &Path, name: &str) -> MgmtCert {
        let ca = fleetgate::pki::device::ensure_mgmt_ca(data_dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let issued = ca
            .issue(
                name,
                &rcgen::PublicKeyData::subject_public_key_info(&key),
                30,
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
        MgmtCert {
            cert: issued.cert_der,
            key,
        }
    }

    pub fn config(&self, root_pem: &Path) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(root_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der())),
            )
            .unwrap(),
        )
    }
}

pub type Ws = tungstenite::WebSocket<TlsStream>;

/// One envelope, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Env {
    pub kind: u8,
    pub channel: u32,
    pub route: u64,
    pub unit: String,
    pub body: Vec<u8>,
}

impl Env {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.kind, 0];
        v.extend_from_slice(&(self.unit.len() as u16).to_be_bytes());
        v.extend_from_slice(&self.channel.to_be_bytes());
        v.extend_from_slice(&self.route.to_be_bytes());
        v.extend_from_slice(self.unit.as_bytes());
        v.extend_from_slice(&self.body);
        v
    }

    pub fn decode(b: &[u8]) -> Env {
        let unit_len = u16::from_be_bytes([b[2], b[3]]) as usize;
        Env {
            kind: b[0],
            channel: u32::from_be_bytes(b[4..8].try_into().unwrap()),
            route: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            unit: String::from_utf8(b[16..16 + unit_len].to_vec()).unwrap(),
            body: b[16 + unit_len..].to_vec(),
        }
    }
}

pub const REQUEST: u8 = 0x01;
pub const RESPONSE: u8 = 0x02;
pub const EVENT: u8 = 0x03;
pub const OPEN: u8 = 0x10;
pub const ACCEPT: u8 = 0x11;
pub const DATA: u8 = 0x12;
pub const CREDIT: u8 = 0x13;
pub const CLOSE: u8 = 0x14;
pub const RESET: u8 = 0x15;

pub fn request(channel: u32, unit: &str, method: &str, params: Value) -> Env {
    Env {
        kind: REQUEST,
        channel,
        route: 0,
        unit: unit.into(),
        body: serde_json::json!({"method": method, "params": params})
            .to_string()
            .into_bytes(),
    }
}

/// Connects to /usg/management; returns the socket and the hello (or the HTTP error text).
pub fn connect(gw: &Gateway, cfg: Arc<ClientConfig>) -> Result<(Ws, Value), String> {
    let stream = tls_connect_result(gw.addr, cfg)?;
    let url = format!("wss://localhost:{}/usg/management", gw.port());
    let (mut ws, _) =
        tungstenite::client::client(url.as_str(), stream).map_err(|e| e.to_string())?;
    let hello = match ws.read() {
        Ok(Message::Text(t)) => serde_json::from_str(t.as_str()).unwrap(),
        other => return Err(format!("no hello: {other:?}")),
    };
    Ok((ws, hello))
}

pub fn send(ws: &mut Ws, e: &Env) {
    ws.send(Message::binary(e.encode())).unwrap();
}

/// The next envelope (text messages and pings skipped); None on timeout or close.
pub fn recv(ws: &mut Ws, timeout: Duration) -> Option<Env> {
    ws.get_mut().sock.set_read_timeout(Some(timeout)).unwrap();
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) => return Some(Env::decode(&b)),
            Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

/// The next envelope that matches `pred` (others are dropped), within `timeout`.
pub fn recv_until(ws: &mut Ws, timeout: Duration, pred: impl Fn(&Env) -> bool) -> Option<Env> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        let e = recv(ws, left)?;
        if pred(&e) {
            return Some(e);
        }
    }
}
