//! The HTTP layer's errors: [`HttpError`] (a head could not be parsed, or an outgoing head was
//! misused), [`UpgradeError`] (a well-formed request is not an acceptable WebSocket upgrade;
//! gateway side) and [`UpgradeResponseError`] (the server's answer to our upgrade request is
//! not acceptable; client side).
//!
//! Every error here is fatal for the connection: the gateway answers with
//! [`HttpError::status`] / [`UpgradeError::status`] (plus [`UpgradeError::headers`]) and closes;
//! a client closes.

use thiserror::Error;

/// A head could not be parsed (peer fault), or a writer was given something it cannot put on
/// the wire (local misuse).
///
/// [`status`](Self::status) is what a server answers. On the client side
/// ([`parse_response`](super::parse_response)) the status has no use: treat any error as a
/// failed handshake and close.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpError {
    /// The buffer holds more than `limit` bytes and still no complete head.
    #[error("HTTP head larger than {limit} bytes")]
    HeadTooLarge {
        /// [`HttpLimits::max_head_bytes`](super::HttpLimits::max_head_bytes) in force.
        limit: usize,
    },
    /// The head has more than `limit` header fields.
    #[error("more than {limit} header fields")]
    TooManyHeaders {
        /// [`HttpLimits::max_headers`](super::HttpLimits::max_headers) in force.
        limit: usize,
    },
    /// The bytes start like a TLS record (`0x16 0x03 …`): TLS was sent where HTTP was
    /// expected, e.g. a client that wraps TLS twice.
    #[error("TLS handshake bytes where an HTTP head was expected")]
    TlsRecord,
    /// The version is `HTTP/<digit>…` but neither 1.0 nor 1.1 (HTTP/2 prior knowledge, 1.2+).
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    /// The start line or a header field does not follow HTTP/1.1 syntax.
    #[error("malformed HTTP head: {reason}")]
    Malformed {
        /// What was wrong, for logs.
        reason: &'static str,
    },
    /// The request target is neither origin-form (`/path?query`), absolute-form
    /// (`https://host/path`) nor `*`, or is not ASCII.
    #[error("malformed request target")]
    BadTarget,
    /// A field that must appear once appeared more than once (request smuggling,
    /// ambiguous handshake).
    #[error("duplicate {name} header")]
    DuplicateHeader {
        /// Lower-case field name.
        name: &'static str,
    },
    /// A field the gateway reads has a value that does not follow its grammar.
    #[error("invalid {name} header value")]
    BadHeaderValue {
        /// Lower-case field name.
        name: &'static str,
    },
    /// `Transfer-Encoding` is present together with `Content-Length`, is present in an
    /// HTTP/1.0 request, or does not end with `chunked`: the body length is ambiguous
    /// (RFC 9112 §6.1, §6.3).
    #[error("ambiguous message body framing")]
    AmbiguousFraming,
    /// A writer was handed a value it cannot put on the wire (a CR/LF, a space in a path, a
    /// key that is not base64 of 16 bytes). Local misuse: nothing was written.
    #[error("invalid outgoing {what}")]
    InvalidOutgoing {
        /// Which argument.
        what: &'static str,
    },
}

impl HttpError {
    /// The status a server answers with: 431 for the size limits, 505 for an unsupported
    /// version, 500 for local misuse, 400 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge { .. } | Self::TooManyHeaders { .. } => 431,
            Self::UnsupportedVersion => 505,
            Self::InvalidOutgoing { .. } => 500,
            Self::TlsRecord
            | Self::Malformed { .. }
            | Self::BadTarget
            | Self::DuplicateHeader { .. }
            | Self::BadHeaderValue { .. }
            | Self::AmbiguousFraming => 400,
        }
    }

    /// True when the peer sent something wrong; false for local misuse
    /// ([`InvalidOutgoing`](Self::InvalidOutgoing)).
    pub fn is_peer_fault(&self) -> bool {
        !matches!(self, Self::InvalidOutgoing { .. })
    }
}

/// A well-formed request that the gateway cannot accept as a WebSocket upgrade
/// (RFC 6455 §4.2.1). Always a peer fault; answer with [`status`](Self::status) and
/// [`headers`](Self::headers), then close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum UpgradeError {
    /// The method is not GET.
    #[error("WebSocket upgrade needs GET")]
    MethodNotAllowed,
    /// HTTP/1.0: an upgrade needs HTTP/1.1 or later.
    #[error("WebSocket upgrade needs HTTP/1.1")]
    HttpVersion,
    /// No `Upgrade: websocket`: the client did not ask for a WebSocket.
    #[error("no Upgrade: websocket")]
    NotWebSocket,
    /// `Upgrade: websocket` without the `upgrade` option in `Connection`.
    #[error("Upgrade: websocket without Connection: upgrade")]
    ConnectionNotUpgrade,
    /// `Sec-WebSocket-Version` is missing or not 13.
    #[error("Sec-WebSocket-Version missing or not 13")]
    UnsupportedVersion,
    /// No `Sec-WebSocket-Key`.
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    /// `Sec-WebSocket-Key` is not the base64 encoding of exactly 16 bytes.
    #[error("Sec-WebSocket-Key is not base64 of 16 bytes")]
    InvalidKey,
    /// No (or an empty) `Host`, and no authority in an absolute-form target.
    #[error("missing Host")]
    MissingHost,
    /// The upgrade request announces a body (`Content-Length` > 0 or chunked).
    #[error("WebSocket upgrade request with a body")]
    BodyNotAllowed,
}

/// Extra headers for a 426 answer: name the protocol and version we speak.
const UPGRADE_REQUIRED_HEADERS: &[(&str, &str)] = &[
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
];

impl UpgradeError {
    /// The status to answer with: 405, 426 or 400.
    pub fn status(&self) -> u16 {
        match self {
            Self::MethodNotAllowed => 405,
            Self::NotWebSocket | Self::UnsupportedVersion => 426,
            Self::HttpVersion
            | Self::ConnectionNotUpgrade
            | Self::MissingKey
            | Self::InvalidKey
            | Self::MissingHost
            | Self::BodyNotAllowed => 400,
        }
    }

    /// Extra headers the answer must carry: `Allow: GET` with 405; `Upgrade: websocket`,
    /// `Connection: Upgrade` and `Sec-WebSocket-Version: 13` with 426 (RFC 9110 §15.5.22,
    /// RFC 6455 §4.4). Pass them to [`write_response`](super::write_response).
    pub fn headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::MethodNotAllowed => &[("Allow", "GET")],
            Self::NotWebSocket | Self::UnsupportedVersion => UPGRADE_REQUIRED_HEADERS,
            _ => &[],
        }
    }
}

/// The server's answer to our upgrade request is not an acceptable WebSocket handshake
/// (RFC 6455 §4.1, client side). Always a peer fault: the client must close ("_Fail the
/// WebSocket Connection_").
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UpgradeResponseError {
    /// The status is not 101. Look at the [`ResponseHead`](super::ResponseHead) for
    /// `retry_after` and the body length.
    #[error("server answered {0} instead of 101")]
    Status(u16),
    /// `Upgrade` is missing or not `websocket`.
    #[error("101 without Upgrade: websocket")]
    NotWebSocket,
    /// `Connection` lacks the `upgrade` option.
    #[error("101 without Connection: upgrade")]
    ConnectionNotUpgrade,
    /// `Sec-WebSocket-Accept` is missing or does not match the key we sent.
    #[error("Sec-WebSocket-Accept missing or wrong")]
    BadAccept,
    /// The server picked a subprotocol we did not offer (or sent a list).
    #[error("server selected subprotocol {0:?}, which was not offered")]
    ProtocolNotOffered(String),
    /// The server answered with extensions; we offer none.
    #[error("server selected an extension we did not offer")]
    ExtensionNotOffered,
}
