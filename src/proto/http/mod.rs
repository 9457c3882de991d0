//! Sans-IO HTTP/1.1: just enough HTTP for the gateway port and for our WebSocket clients.
//!
//! Pure functions over byte slices: no sockets, no clocks, no randomness, no `unsafe`.
//!
//! # Gateway side
//! 1. Append what arrived to the connection's read buffer and call [`parse_request`]. It
//!    answers [`Parsed::Incomplete`] (consumes nothing: call again when more bytes arrive),
//!    [`Parsed::Complete`] with an owned [`RequestHead`] and the number of bytes the head
//!    took, or an [`HttpError`] whose [`status`](HttpError::status) to answer before closing.
//! 2. Route on [`RequestHead::path`]. For the WebSocket endpoints call [`check_upgrade`]; on
//!    success pick a subprotocol with [`negotiate_subprotocol`], answer with
//!    [`write_switching_protocols`] and hand the bytes after `consumed` to the frame decoder
//!    (a client must wait for the 101, so there should be none, but do not drop them). On
//!    failure answer [`UpgradeError::status`] with [`UpgradeError::headers`] via
//!    [`write_response`] and close.
//! 3. Anything else (`GET /usg/check-status`, 404, 405): answer with [`write_response`]
//!    ([`write_head_response`] for HEAD).
//!
//! # Client side (device agent, management client)
//! [`write_upgrade_request`] with a fresh [`websocket_key`], then [`parse_response`] until
//! complete, then [`check_upgrade_response`]. Bytes after `consumed` are already WebSocket
//! frames.
//!
//! # Limits ([`HttpLimits`])
//! A head larger than [`HttpLimits::max_head_bytes`] or with more than
//! [`HttpLimits::max_headers`] fields is refused with 431 as soon as the limit is crossed, so
//! a slow or hostile client never makes the gateway buffer more than that. The caller still
//! owns the handshake *timeout* (this layer has no clock).
//!
//! Each call re-parses from the start of the buffer (nothing is kept between calls), so a
//! client trickling a head byte by byte costs O(n²) in `max_head_bytes` over the
//! connection's life. The caller can make that O(n) by calling again only when the newly
//! arrived bytes contain `\n` (a head can only complete, or gain a field, at a line end);
//! garbage is then refused at the next line end or at the size limit instead of at once.
//!
//! # Not supported (on purpose)
//! * **Request bodies.** The gateway serves GETs only. [`RequestHead::has_body`] tells the
//!   caller a body was announced: answer (400 on an upgrade path, 405/413 elsewhere) with
//!   `close`, because a chunked body cannot be skipped without a chunk decoder and skipping a
//!   `Content-Length` body is not worth the code. `Transfer-Encoding` with `Content-Length`,
//!   in HTTP/1.0, or not ending in `chunked` is refused outright ([`HttpError::AmbiguousFraming`]).
//! * **Pipelining.** One request at a time. After a non-upgrade GET the caller may keep
//!   the connection if [`RequestHead::keep_alive`] allows (and the request had no body):
//!   drain `consumed` bytes, write the answer, and parse the next head from what remains.
//!   Do not parse a second head before the first answer is written. Before an upgrade,
//!   exactly one request is read: the 101 ends HTTP on that connection.
//! * HTTP/2 and HTTP/1.2+ ([`HttpError::UnsupportedVersion`], 505; RFC 9112 would let us
//!   treat 1.2 as 1.1, but no real client sends it and a loud refusal is clearer),
//!   `CONNECT`/authority-form targets, `Expect: 100-continue`, obsolete line folding,
//!   WebSocket extensions (permessage-deflate is never negotiated), percent-decoding
//!   (paths are compared raw), `Date` headers.
//! * HTTP/1.0 is parsed (monitoring probes still use it) but cannot upgrade.

mod client;
mod error;
mod fields;
mod request;
mod response;
mod upgrade;

#[cfg(test)]
mod tests;

pub use client::{
    ResponseHead, RetryAfter, check_upgrade_response, parse_response, websocket_key,
    write_upgrade_request,
};
pub use error::{HttpError, UpgradeError, UpgradeResponseError};
pub use request::{Method, RequestHead, parse_request};
pub use response::{reason_phrase, write_head_response, write_response, write_switching_protocols};
pub use upgrade::{
    UpgradeRequest, WEBSOCKET_GUID, check_upgrade, is_valid_key, negotiate_subprotocol,
    websocket_accept,
};

/// Size limits for one HTTP head. Both are checked while the head is still arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest head accepted, request line and all fields with their line endings.
    /// Default **8192**. Our clients' upgrade requests are about 250 bytes; 8 KiB leaves room
    /// for long tokens in `Authorization` or cookies added by proxies, matches what common
    /// servers allow per header line (nginx, Apache), and bounds the read buffer every
    /// not-yet-upgraded connection may hold, which matters at 100,000 devices.
    pub max_head_bytes: usize,
    /// Most header fields accepted. Default **32**. An upgrade request has about 8, proxies
    /// add a few; 32 keeps httparse's field array on the stack (1 KiB, no allocation per
    /// parse; a larger value allocates it) and bounds the work per parse.
    pub max_headers: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_head_bytes: 8192,
            max_headers: 32,
        }
    }
}

/// The result of an incremental parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The head is not complete yet; nothing was consumed.
    Incomplete,
    /// A complete head, which took the first `consumed` bytes of the buffer.
    Complete {
        /// The parsed head.
        head: T,
        /// Bytes of the buffer the head took (including the empty line).
        consumed: usize,
    },
}
