//! Gateway side: write response heads (and small bodies) into a caller's buffer.
//!
//! Writers append to `out` and never fail. Header names and values come from the gateway
//! itself; a CR, LF or NUL in one is a bug (debug builds assert) and is written as a space,
//! so a response can never be split.

/// The standard reason phrase for `status` (RFC 9110 §15), or `""` for a code without one
/// (an empty reason phrase is valid).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Appends a complete HTTP/1.1 response: status line, `extra_headers` in order,
/// `Content-Type` when given, `Content-Length` (omitted for 1xx and 204, which must not carry
/// one; their body must be empty and is not written), `Connection: close` when `close`, then
/// `body`.
///
/// With `close` the caller must close after flushing; without it the connection may serve
/// another request. No `Date` header: the sans-IO layer has no clock (RFC 9110 §6.6.1 lets
/// a server without a reliable clock omit it).
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    extra_headers: &[(&str, &str)],
    content_type: Option<&str>,
    body: &[u8],
    close: bool,
) {
    write_head_response(
        out,
        status,
        extra_headers,
        content_type,
        body.len() as u64,
        close,
    );
    if has_content_length(status) {
        out.extend_from_slice(body);
    } else {
        debug_assert!(body.is_empty(), "status {status} cannot carry a body");
    }
}

/// Like [`write_response`] without the body: for answering `HEAD` (the `Content-Length` of
/// the body a GET would get, no body bytes).
pub fn write_head_response(
    out: &mut Vec<u8>,
    status: u16,
    extra_headers: &[(&str, &str)],
    content_type: Option<&str>,
    content_length: u64,
    close: bool,
) {
    debug_assert!(
        (100..=999).contains(&status),
        "status {status} is not 3 digits"
    );
    let status = if (100..=999).contains(&status) {
        status
    } else {
        500
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in extra_headers {
        push_header(out, name, value);
    }
    if let Some(ct) = content_type {
        push_header(out, "Content-Type", ct);
    }
    if has_content_length(status) {
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, content_length);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the `101 Switching Protocols` head that completes a WebSocket handshake
/// (RFC 6455 §4.2.2), with `Sec-WebSocket-Protocol` when a subprotocol was chosen and no
/// `Sec-WebSocket-Extensions` (we negotiate none). Frames may follow immediately.
pub fn write_switching_protocols(out: &mut Vec<u8>, accept: &str, protocol: Option<&str>) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    push_header(out, "Sec-WebSocket-Accept", accept);
    if let Some(p) = protocol {
        push_header(out, "Sec-WebSocket-Protocol", p);
    }
    out.extend_from_slice(b"\r\n");
}

/// 1xx and 204 must not carry `Content-Length` (RFC 9110 §8.6).
fn has_content_length(status: u16) -> bool {
    status >= 200 && status != 204
}

/// `name: value\r\n`, with CR/LF/NUL written as spaces.
pub(super) fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    debug_assert!(
        super::fields::is_token(name.as_bytes()),
        "bad header name {name:?}"
    );
    debug_assert!(!has_line_break(value), "bad header value {value:?}");
    push_sanitised(out, name);
    out.extend_from_slice(b": ");
    push_sanitised(out, value);
    out.extend_from_slice(b"\r\n");
}

pub(super) fn has_line_break(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

fn push_sanitised(out: &mut Vec<u8>, s: &str) {
    if has_line_break(s) {
        out.extend(s.bytes().map(|b| {
            if matches!(b, b'\r' | b'\n' | 0) {
                b' '
            } else {
                b
            }
        }));
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

/// Decimal digits of `n`, without going through `fmt`.
pub(super) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}
