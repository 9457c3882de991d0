//! Gateway side of the WebSocket opening handshake (RFC 6455 §4.2): validate the request,
//! compute `Sec-WebSocket-Accept`, pick a subprotocol.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest as _, Sha1};

use super::{Method, RequestHead, UpgradeError};

/// The GUID RFC 6455 §1.3 appends to the key before hashing.
pub const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `base64(SHA-1(key + GUID))`, the `Sec-WebSocket-Accept` value for `key` (RFC 6455 §4.2.2).
/// `key` is used as sent (trimmed), not decoded.
pub fn websocket_accept(key: &str) -> String {
    let mut hasher = Sha1::new();
    hasher.update(key.as_bytes());
    hasher.update(WEBSOCKET_GUID.as_bytes());
    STANDARD.encode(hasher.finalize())
}

/// Whether `key` is the canonical base64 encoding of exactly 16 bytes (RFC 6455 §4.1:
/// 24 characters ending in `==`).
pub fn is_valid_key(key: &str) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(STANDARD.decode_slice(key, &mut decoded), Ok(16))
}

/// A request that passed [`check_upgrade`]: what the gateway needs to answer 101 and route
/// the connection. Borrows from the [`RequestHead`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest<'h> {
    /// The path to route on (e.g. `/usg/endpoint`).
    pub path: &'h str,
    /// The query string, if any.
    pub query: Option<&'h str>,
    /// The host the client addressed.
    pub host: &'h str,
    /// The `Sec-WebSocket-Accept` value to send in the 101.
    pub accept: String,
    /// The subprotocols the client offered, in its order (see [`negotiate_subprotocol`]).
    pub protocols: &'h [String],
}

/// Checks a parsed request against RFC 6455 §4.2.1, in this order:
///
/// 1. method GET, else [`UpgradeError::MethodNotAllowed`] (405, `Allow: GET`);
/// 2. HTTP/1.1 or later, else [`UpgradeError::HttpVersion`] (400);
/// 3. `Upgrade: websocket`, else [`UpgradeError::NotWebSocket`] (426: the client did not ask
///    for a WebSocket at all, so tell it what this resource speaks);
/// 4. `Connection: upgrade`, else [`UpgradeError::ConnectionNotUpgrade`] (400);
/// 5. `Sec-WebSocket-Version: 13`, else [`UpgradeError::UnsupportedVersion`] (426,
///    `Sec-WebSocket-Version: 13`; checked before the key because another version may use
///    another key format);
/// 6. `Sec-WebSocket-Key`, base64 of 16 bytes, else [`UpgradeError::MissingKey`] /
///    [`UpgradeError::InvalidKey`] (400);
/// 7. a non-empty host, else [`UpgradeError::MissingHost`] (400);
/// 8. no body, else [`UpgradeError::BodyNotAllowed`] (400).
///
/// `Origin` is not checked: our clients are agents, not browsers. Extensions offered are
/// ignored (we negotiate none). The path is not checked: routing is the caller's.
pub fn check_upgrade(head: &RequestHead) -> Result<UpgradeRequest<'_>, UpgradeError> {
    if head.method != Method::Get {
        return Err(UpgradeError::MethodNotAllowed);
    }
    if head.minor_version < 1 {
        return Err(UpgradeError::HttpVersion);
    }
    if !head.upgrade_websocket {
        return Err(UpgradeError::NotWebSocket);
    }
    if !head.connection_upgrade {
        return Err(UpgradeError::ConnectionNotUpgrade);
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(UpgradeError::UnsupportedVersion);
    }
    let key = head.ws_key.as_deref().ok_or(UpgradeError::MissingKey)?;
    if !is_valid_key(key) {
        return Err(UpgradeError::InvalidKey);
    }
    let host = match head.host.as_deref() {
        Some(h) if !h.is_empty() => h,
        _ => return Err(UpgradeError::MissingHost),
    };
    if head.has_body() {
        return Err(UpgradeError::BodyNotAllowed);
    }
    Ok(UpgradeRequest {
        path: &head.path,
        query: head.query.as_deref(),
        host,
        accept: websocket_accept(key),
        protocols: &head.ws_protocols,
    })
}

/// Picks the subprotocol to answer with: the first entry of `supported` (*our* preference
/// order, most preferred first) that the client `offered`. The client's order does not
/// matter, so a client cannot steer us onto a protocol we rank lower. Names compare
/// case-sensitively, as tokens are registered. `None`: answer the 101 without
/// `Sec-WebSocket-Protocol` (RFC 6455 §4.2.2) or refuse, as the route requires.
pub fn negotiate_subprotocol<'a, S: AsRef<str>>(
    offered: &[S],
    supported: &[&'a str],
) -> Option<&'a str> {
    supported
        .iter()
        .copied()
        .find(|ours| offered.iter().any(|o| o.as_ref() == *ours))
}
