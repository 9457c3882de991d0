//! Client side (device agent, management client): write the upgrade request, parse the
//! server's response head, check it against RFC 6455 §4.1.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use smallvec::SmallVec;

use super::fields::{self, Framing, StartLine};
use super::response::{has_line_break, push_header};
use super::{HttpError, HttpLimits, Parsed, UpgradeResponseError, is_valid_key, websocket_accept};

/// The `Sec-WebSocket-Key` for a 16-byte nonce. The nonce must be fresh and random for each
/// connection (RFC 6455 §4.1); the caller supplies it because this layer has no RNG.
pub fn websocket_key(nonce: &[u8; 16]) -> String {
    STANDARD.encode(nonce)
}

/// Appends a WebSocket upgrade request (RFC 6455 §4.1) for `path` (origin-form, may carry a
/// query) on `host` (`host[:port]`), with `key_b64` (see [`websocket_key`]), the offered
/// `protocols` in our preference order (none: no `Sec-WebSocket-Protocol`) and
/// `extra_headers` (e.g. `Authorization`, `User-Agent`). No extensions are offered; do not
/// pass `Sec-WebSocket-Extensions` in `extra_headers`, or [`check_upgrade_response`] will
/// refuse the server's choice.
///
/// Errors with [`HttpError::InvalidOutgoing`] (local misuse; nothing appended) when `path`
/// is not `/` followed by visible ASCII, `host` is empty or not a host, `key_b64` is not base64
/// of 16 bytes, a protocol is not a token, or an extra header has a non-token name or a
/// CR/LF/NUL in its value.
pub fn write_upgrade_request(
    out: &mut Vec<u8>,
    host: &str,
    path: &str,
    key_b64: &str,
    protocols: &[&str],
    extra_headers: &[(&str, &str)],
) -> Result<(), HttpError> {
    let bad = |what| Err(HttpError::InvalidOutgoing { what });
    if !path.starts_with('/') || !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return bad("path");
    }
    if host.is_empty() || !fields::is_host(host.as_bytes()) {
        return bad("host");
    }
    if !is_valid_key(key_b64) {
        return bad("key");
    }
    if !protocols.iter().all(|p| fields::is_token(p.as_bytes())) {
        return bad("protocol");
    }
    if !extra_headers
        .iter()
        .all(|(n, v)| fields::is_token(n.as_bytes()) && !has_line_break(v))
    {
        return bad("header");
    }

    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(out, "Host", host);
    out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    push_header(out, "Sec-WebSocket-Key", key_b64);
    out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    if let Some((first, rest)) = protocols.split_first() {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(first.as_bytes());
        for p in rest {
            out.extend_from_slice(b", ");
            out.extend_from_slice(p.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in extra_headers {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// `Retry-After` (RFC 9110 §10.2.3), as sent with 503/429 when the gateway is full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryAfter {
    /// Delay in seconds.
    Seconds(u64),
    /// An HTTP-date, kept as text: turning it into a delay needs a clock, which this layer
    /// does not have.
    Date(String),
}

/// An owned response head holding what a WebSocket client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// The reason phrase (may be empty).
    pub reason: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    /// `Upgrade` is exactly `websocket` (case-insensitive), as RFC 6455 §4.1 requires of a 101.
    pub upgrade_websocket: bool,
    /// `Connection` lists the `upgrade` option.
    pub connection_upgrade: bool,
    /// `Connection` lists `close`.
    pub connection_close: bool,
    /// `Sec-WebSocket-Accept`, trimmed.
    pub ws_accept: Option<String>,
    /// `Sec-WebSocket-Protocol`, trimmed (a single value; a second field is an error).
    pub ws_protocol: Option<String>,
    /// A non-empty `Sec-WebSocket-Extensions` was sent.
    pub ws_extensions: bool,
    /// `Content-Length` (of an error body), when present.
    pub content_length: Option<u64>,
    /// `Transfer-Encoding` ends in `chunked`.
    pub transfer_encoding_chunked: bool,
    /// `Retry-After`, when present and well-formed (an ill-formed one is ignored: it is
    /// advice, not framing).
    pub retry_after: Option<RetryAfter>,
}

/// Parses one response head from the start of `buf`, with the same contract as
/// [`parse_request`](super::parse_request): `Incomplete` consumes nothing; `Complete`
/// says where the head ends (a body, or WebSocket frames after a 101, may follow in `buf`).
/// Any error means the handshake failed; close.
pub fn parse_response(buf: &[u8], limits: &HttpLimits) -> Result<Parsed<ResponseHead>, HttpError> {
    let mut headers: SmallVec<[httparse::Header<'_>; 32]> =
        smallvec::smallvec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut resp = httparse::Response::new(&mut headers);
    let Some(consumed) = fields::parse_head(buf, limits, StartLine::Response, |w| resp.parse(w))?
    else {
        return Ok(Parsed::Incomplete);
    };
    let (Some(status), Some(minor_version)) = (resp.code, resp.version) else {
        return Err(HttpError::Malformed {
            reason: "incomplete status line",
        });
    };
    let mut head = ResponseHead {
        status,
        reason: resp.reason.unwrap_or("").to_owned(),
        minor_version,
        upgrade_websocket: false,
        connection_upgrade: false,
        connection_close: false,
        ws_accept: None,
        ws_protocol: None,
        ws_extensions: false,
        content_length: None,
        transfer_encoding_chunked: false,
        retry_after: None,
    };
    let mut framing = Framing::default();
    let mut upgrade_seen = false;

    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        if name.eq_ignore_ascii_case(b"upgrade") {
            // Two Upgrade fields make a list, which is not "exactly websocket".
            head.upgrade_websocket =
                !upgrade_seen && fields::trim_ows(value).eq_ignore_ascii_case(b"websocket");
            upgrade_seen = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in fields::list_elements(value) {
                if option.eq_ignore_ascii_case(b"upgrade") {
                    head.connection_upgrade = true;
                } else if option.eq_ignore_ascii_case(b"close") {
                    head.connection_close = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"sec-websocket-accept") {
            fields::set_once(&mut head.ws_accept, value, "sec-websocket-accept")?;
        } else if name.eq_ignore_ascii_case(b"sec-websocket-protocol") {
            fields::set_once(&mut head.ws_protocol, value, "sec-websocket-protocol")?;
        } else if name.eq_ignore_ascii_case(b"sec-websocket-extensions") {
            head.ws_extensions |= !fields::trim_ows(value).is_empty();
        } else if name.eq_ignore_ascii_case(b"content-length") {
            framing.content_length(value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            framing.transfer_encoding(value);
        } else if name.eq_ignore_ascii_case(b"retry-after") {
            head.retry_after = parse_retry_after(value);
        }
    }
    (head.content_length, head.transfer_encoding_chunked) = framing.finish(minor_version)?;
    Ok(Parsed::Complete { head, consumed })
}

fn parse_retry_after(value: &[u8]) -> Option<RetryAfter> {
    if let Some(secs) = fields::parse_content_length(value) {
        return Some(RetryAfter::Seconds(secs));
    }
    let v = fields::visible_ascii(value)?;
    (!v.is_empty()).then(|| RetryAfter::Date(v.to_owned()))
}

/// Checks the server's answer to our upgrade request (RFC 6455 §4.1): status 101,
/// `Upgrade: websocket`, `Connection: upgrade`, `Sec-WebSocket-Accept` matching `sent_key`,
/// no extensions, and a subprotocol that is one of `offered_protocols` (compared
/// case-sensitively) or none.
///
/// Returns the selected subprotocol. `Ok(None)` when the server chose none, even though we
/// offered some: whether that is acceptable is the caller's decision.
pub fn check_upgrade_response(
    resp: &ResponseHead,
    sent_key: &str,
    offered_protocols: &[&str],
) -> Result<Option<String>, UpgradeResponseError> {
    if resp.status != 101 {
        return Err(UpgradeResponseError::Status(resp.status));
    }
    if !resp.upgrade_websocket {
        return Err(UpgradeResponseError::NotWebSocket);
    }
    if !resp.connection_upgrade {
        return Err(UpgradeResponseError::ConnectionNotUpgrade);
    }
    if resp.ws_accept.as_deref() != Some(websocket_accept(sent_key).as_str()) {
        return Err(UpgradeResponseError::BadAccept);
    }
    if resp.ws_extensions {
        return Err(UpgradeResponseError::ExtensionNotOffered);
    }
    match &resp.ws_protocol {
        None => Ok(None),
        Some(p) if offered_protocols.contains(&p.as_str()) => Ok(Some(p.clone())),
        Some(p) => Err(UpgradeResponseError::ProtocolNotOffered(p.clone())),
    }
}
