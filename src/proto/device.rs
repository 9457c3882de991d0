//! The device session messages on `/usg/endpoint` (`docs/protocol.md` §5): registration with a
//! first-authentication key, the session greeting, refusals. Each message is one JSON object in
//! one WebSocket **text** message, with a `"type"` field. Binary messages are reserved for the
//! relay (issue 5).
//!
//! Sans-IO: these are the types and their encoding only; the gateway's shard and the agent both
//! use them, so the two cannot drift apart.

use serde::{Deserialize, Serialize};

/// Protocol version announced in [`Hello::protocol`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest text message the gateway accepts from a device in the registration phase (a
/// `register` with a 4096-bit RSA CSR is about 1.5 KiB).
pub const MAX_REGISTER_MESSAGE: usize = 8 * 1024;

/// WebSocket close code after a refusal that will not change by retrying soon (policy).
pub const CLOSE_REFUSED: u16 = 1008;
/// WebSocket close code after a refusal the device should retry later (`retry_after_ms`).
/// From the private-use range (it mirrors 1013 "try again later", which RFC 6455 did not
/// register and strict WebSocket libraries refuse).
pub const CLOSE_TRY_LATER: u16 = 4013;
/// WebSocket close code after a completed registration (reconnect with the credential).
pub const CLOSE_REGISTERED: u16 = 1000;

/// What the connection is for, decided by the gateway from the TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No client certificate: the device must send [`Register`].
    Register,
    /// A valid device credential: the device is connected and managed.
    Session,
    /// A management server (`/usg/management`, §6.1).
    Management,
}

/// Gateway → device, first message after the 101.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Register or session.
    pub mode: Mode,
    /// `fleetgate/<version>`.
    pub gateway: String,
    /// The unit ID of the credential (session mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<String>,
    /// The management server's name, from its certificate (management mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Device → gateway, in register mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The device's unit ID (at most 64 characters; printable, no leading/trailing space).
    pub unit_id: String,
    /// The first-authentication key as the user typed it (case and `-` do not matter).
    pub key: String,
    /// A PKCS#10 certificate request for the device's own key pair, DER, standard base64 with
    /// padding. Its signature proves the device holds the private key; its subject is ignored
    /// (the gateway writes CN = unit ID).
    pub csr: String,
    /// SHA-256 of the gateway root certificate the device trusts (64 hex digits), recorded for
    /// root exchanges. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// `true`: when the key is accepted, keep this connection open and continue it in session
    /// mode (a session `hello` follows `registered`) instead of closing it, which saves the
    /// device a second TLS handshake. Optional; absent means `false` (close after the answer).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub session: bool,
}

/// Gateway → device: the key was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// Always `granted`.
    pub reason: String,
    /// The unit ID the credential is for.
    pub unit_id: String,
    /// The device certificate (PEM): present it as TLS client certificate from now on.
    pub certificate: String,
    /// The device CA certificate (PEM) that issued it.
    pub device_ca: String,
}

/// Gateway → device: the request or the session is refused; a close frame follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// A stable reason code (`docs/protocol.md` §5.6).
    pub reason: String,
    /// A sentence the agent can show its user.
    pub message: String,
    /// Wait at least this long before the next attempt (only for retryable refusals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// The operator removed this device: forget the gateway settings and the credential.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_settings: bool,
}

/// Every message of the device session, tagged by `"type"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    /// Gateway → device.
    Hello(Hello),
    /// Device → gateway.
    Register(Register),
    /// Gateway → device.
    Registered(Registered),
    /// Gateway → device.
    Refused(Refused),
}

impl Message {
    /// The JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serializes")
    }

    /// Parses one text message.
    pub fn from_json(text: &[u8]) -> Result<Message, serde_json::Error> {
        serde_json::from_slice(text)
    }
}

/// The `gateway` string of [`Hello`].
pub fn gateway_name() -> String {
    format!("fleetgate/{}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_the_documented_one() {
        let m = Message::Hello(Hello {
            protocol: 1,
            mode: Mode::Session,
            gateway: "fleetgate/0.1.0".into(),
            unit_id: Some("U1".into()),
            name: None,
        });
        assert_eq!(
            m.to_json(),
            r#"{"type":"hello","protocol":1,"mode":"session","gateway":"fleetgate/0.1.0","unit_id":"U1"}"#
        );
        let r = Message::Refused(Refused {
            reason: "key_used".into(),
            message: "m".into(),
            retry_after_ms: None,
            drop_settings: false,
        });
        assert_eq!(
            r.to_json(),
            r#"{"type":"refused","reason":"key_used","message":"m"}"#
        );
        let parsed = Message::from_json(
            br#"{"type":"register","unit_id":"U","key":"K","csr":"AAAA","extra":1}"#,
        )
        .unwrap();
        assert!(matches!(parsed, Message::Register(r) if r.unit_id == "U" && r.root.is_none()));
        assert!(Message::from_json(br#"{"type":"nope"}"#).is_err());
    }
}
