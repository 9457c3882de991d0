//! The device session messages of fleetgate's `/usg/endpoint` (`docs/protocol.md` §5.1): one
//! JSON object per WebSocket text message, tagged by `"type"`. A copy of the shapes in the
//! gateway's `src/proto/device.rs`, kept independent on purpose so that the load generator
//! checks the documented wire form rather than sharing the gateway's code. Unknown fields are
//! ignored, as §5.1 asks.

use serde::{Deserialize, Serialize};

/// Gateway → device messages (and `register`, so that tests can parse what we send).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    Hello {
        protocol: u32,
        /// `register` or `session`.
        mode: String,
        #[serde(default)]
        gateway: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unit_id: Option<String>,
    },
    Register {
        unit_id: String,
        key: String,
        /// PKCS#10 DER, standard base64 with padding.
        csr: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<String>,
        /// Continue this connection in session mode after `registered` (§5.3).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        session: bool,
    },
    Registered {
        reason: String,
        unit_id: String,
        /// The device certificate, PEM.
        certificate: String,
        #[serde(default)]
        device_ca: String,
    },
    Refused {
        reason: String,
        #[serde(default)]
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        #[serde(default)]
        drop_settings: bool,
    },
}

impl Message {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serializes")
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| {
            let shown: String = text.chars().take(120).collect();
            format!("unexpected message from the gateway ({e}): {shown}")
        })
    }

    /// A one-word description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Hello { mode, .. } => format!("hello (mode {mode})"),
            Self::Register { .. } => "register".to_owned(),
            Self::Registered { .. } => "registered".to_owned(),
            Self::Refused { reason, .. } => format!("refused ({reason})"),
        }
    }
}

/// Reasons after which an agent stops using its credential (§5.5): no retry.
pub fn is_terminal_session_refusal(reason: &str) -> bool {
    matches!(
        reason,
        "credential_revoked"
            | "credential_superseded"
            | "credential_unknown"
            | "credential_expired"
    )
}

/// Reasons a registration may simply be tried again (§5.6 "retry").
pub fn is_retryable_refusal(reason: &str) -> bool {
    matches!(reason, "rate_limited" | "limit_reached" | "internal_error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_wire_form() {
        let hello = Message::parse(
            r#"{"type":"hello","protocol":1,"mode":"session","gateway":"fleetgate/0.1.0","unit_id":"U1","new":true}"#,
        )
        .unwrap();
        assert_eq!(
            hello,
            Message::Hello {
                protocol: 1,
                mode: "session".into(),
                gateway: "fleetgate/0.1.0".into(),
                unit_id: Some("U1".into())
            }
        );
        let refused = Message::parse(
            r#"{"type":"refused","reason":"limit_reached","message":"m","retry_after_ms":1500}"#,
        )
        .unwrap();
        assert!(matches!(
            refused,
            Message::Refused {
                retry_after_ms: Some(1500),
                drop_settings: false,
                ..
            }
        ));
        let register = Message::Register {
            unit_id: "lt-000001".into(),
            key: "K".into(),
            csr: "AAAA".into(),
            root: None,
            session: false,
        };
        assert_eq!(
            register.to_json(),
            r#"{"type":"register","unit_id":"lt-000001","key":"K","csr":"AAAA"}"#
        );
        let stay = Message::Register {
            unit_id: "lt-000001".into(),
            key: "K".into(),
            csr: "AAAA".into(),
            root: None,
            session: true,
        };
        assert_eq!(
            stay.to_json(),
            r#"{"type":"register","unit_id":"lt-000001","key":"K","csr":"AAAA","session":true}"#
        );
        assert!(Message::parse(r#"{"type":"nope"}"#).is_err());
        assert!(is_terminal_session_refusal("credential_revoked"));
        assert!(!is_terminal_session_refusal("limit_reached"));
        assert!(is_retryable_refusal("rate_limited"));
        assert!(!is_retryable_refusal("key_used"));
    }
}
