//! Byte-level helpers shared by the request and response parsers and the writers: field-value
//! lists and tokens (RFC 9110 §5.6), `Content-Length` and `Transfer-Encoding` framing
//! (RFC 9112 §6), the size-limit decision and httparse error mapping.

use super::{HttpError, HttpLimits};

/// `tchar` (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A non-empty `token` (RFC 9110 §5.6.2): header names, methods, subprotocol names.
pub(super) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Strips optional whitespace (SP / HTAB) at both ends.
pub(super) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The non-empty elements of a comma-separated field value (`#element`, RFC 9110 §5.6.1),
/// each trimmed; empty elements (`a, , b`) are skipped as the RFC asks.
pub(super) fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

/// Whether a comma-separated field value contains `token` (ASCII case-insensitive).
pub(super) fn list_contains(value: &[u8], token: &str) -> bool {
    list_elements(value).any(|e| e.eq_ignore_ascii_case(token.as_bytes()))
}

/// A trimmed field value as `&str` when it is visible ASCII with inner spaces/tabs only.
pub(super) fn visible_ascii(value: &[u8]) -> Option<&str> {
    let v = trim_ows(value);
    if v.iter()
        .all(|&b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b))
    {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// Whether `s` is a plausible `uri-host [":" port]` (RFC 9110 §7.2): reg-name, IPv4 or
/// bracketed IP-literal characters only. Empty is allowed (RFC 9112 §3.2).
pub(super) fn is_host(s: &[u8]) -> bool {
    s.iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:[]".contains(&b))
}

/// `Content-Length = 1*DIGIT` (RFC 9110 §8.6), without overflow.
pub(super) fn parse_content_length(value: &[u8]) -> Option<u64> {
    let v = trim_ows(value);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Accumulates `Content-Length` and (possibly repeated) `Transfer-Encoding` fields and decides
/// the body framing once all fields are seen.
#[derive(Default)]
pub(super) struct Framing {
    content_length: Option<u64>,
    transfer_encoding_seen: bool,
    chunked_count: u32,
    last_coding_chunked: bool,
}

impl Framing {
    pub(super) fn content_length(&mut self, value: &[u8]) -> Result<(), HttpError> {
        if self.content_length.is_some() {
            // Even identical duplicates are refused: a gateway has no reason to be lenient
            // about the field request smuggling plays with.
            return Err(HttpError::DuplicateHeader {
                name: "content-length",
            });
        }
        let n = parse_content_length(value).ok_or(HttpError::BadHeaderValue {
            name: "content-length",
        })?;
        self.content_length = Some(n);
        Ok(())
    }

    pub(super) fn transfer_encoding(&mut self, value: &[u8]) {
        self.transfer_encoding_seen = true;
        for coding in list_elements(value) {
            // A coding may carry parameters (`gzip;q=…` is not valid here, but be robust).
            let name = trim_ows(coding.split(|&b| b == b';').next().unwrap_or(coding));
            self.last_coding_chunked = name.eq_ignore_ascii_case(b"chunked");
            if self.last_coding_chunked {
                self.chunked_count += 1;
            }
        }
    }

    /// `(content_length, chunked)`, or [`HttpError::AmbiguousFraming`] when
    /// `Transfer-Encoding` is present with `Content-Length`, in HTTP/1.0, or without
    /// `chunked` as its single final coding (RFC 9112 §6.1, §6.3).
    pub(super) fn finish(self, minor_version: u8) -> Result<(Option<u64>, bool), HttpError> {
        if !self.transfer_encoding_seen {
            return Ok((self.content_length, false));
        }
        if self.content_length.is_some()
            || minor_version == 0
            || !self.last_coding_chunked
            || self.chunked_count != 1
        {
            return Err(HttpError::AmbiguousFraming);
        }
        Ok((None, true))
    }
}

/// Stores a single-valued field, refusing a second occurrence and non-visible-ASCII values.
pub(super) fn set_once(
    slot: &mut Option<String>,
    value: &[u8],
    name: &'static str,
) -> Result<(), HttpError> {
    if slot.is_some() {
        return Err(HttpError::DuplicateHeader { name });
    }
    let v = visible_ascii(value).ok_or(HttpError::BadHeaderValue { name })?;
    *slot = Some(v.to_owned());
    Ok(())
}

/// Which start line a version error came from.
#[derive(Clone, Copy)]
pub(super) enum StartLine {
    /// `method SP target SP HTTP-version`: the version is the last word.
    Request,
    /// `HTTP-version SP status SP reason`: the version is the first word.
    Response,
}

/// Runs an httparse parser over at most `max_head_bytes` of `buf` and applies the limits.
///
/// `parse` gets that window and returns httparse's answer. `Ok(Some(consumed))` for a
/// complete head; `Ok(None)` for an incomplete one while `buf` fits the limit, and
/// [`HttpError::HeadTooLarge`] once it does not.
pub(super) fn parse_head<'b>(
    buf: &'b [u8],
    limits: &HttpLimits,
    line: StartLine,
    parse: impl FnOnce(&'b [u8]) -> Result<httparse::Status<usize>, httparse::Error>,
) -> Result<Option<usize>, HttpError> {
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    if window.first() == Some(&0x16) {
        return Err(HttpError::TlsRecord);
    }
    match parse(window) {
        Ok(httparse::Status::Complete(consumed)) => Ok(Some(consumed)),
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head_bytes => {
            Err(HttpError::HeadTooLarge {
                limit: limits.max_head_bytes,
            })
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(map_httparse_error(e, window, line, limits)),
    }
}

fn map_httparse_error(
    e: httparse::Error,
    window: &[u8],
    line: StartLine,
    limits: &HttpLimits,
) -> HttpError {
    let reason = match e {
        httparse::Error::TooManyHeaders => {
            return HttpError::TooManyHeaders {
                limit: limits.max_headers,
            };
        }
        httparse::Error::Version if is_other_http_version(window, line) => {
            return HttpError::UnsupportedVersion;
        }
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid start line",
    };
    HttpError::Malformed { reason }
}

/// Whether the start line names a well-formed HTTP version other than 1.0/1.1
/// (`HTTP/2`, `HTTP/2.0`, `HTTP/1.2`, `HTTP/3.0`), as opposed to garbage.
fn is_other_http_version(window: &[u8], line: StartLine) -> bool {
    // httparse skips empty lines before the start line; so do we.
    let start = window
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(window.len());
    let rest = &window[start..];
    let first_line = rest.split(|&b| b == b'\n').next().unwrap_or(rest);
    let first_line = first_line.strip_suffix(b"\r").unwrap_or(first_line);
    let mut words = first_line.split(|&b| b == b' ');
    let version = match line {
        StartLine::Request => words.next_back(),
        StartLine::Response => words.next(),
    };
    let Some(v) = version.and_then(|v| v.strip_prefix(b"HTTP/")) else {
        return false;
    };
    match v {
        [major @ b'0'..=b'9'] => *major != b'1',
        [major @ b'0'..=b'9', b'.', minor @ b'0'..=b'9'] => {
            !(*major == b'1' && (*minor == b'0' || *minor == b'1'))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_elements_trims_and_skips_empty() {
        let v: Vec<&[u8]> = list_elements(b" a ,,\tb,  , c\t").collect();
        assert_eq!(v, [&b"a"[..], b"b", b"c"]);
        assert!(list_contains(b"keep-alive, Upgrade", "upgrade"));
        assert!(!list_contains(b"keep-alive, upgrades", "upgrade"));
        assert!(!list_contains(b"", "upgrade"));
    }

    #[test]
    fn content_length_grammar() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b" 42 "), Some(42));
        assert_eq!(
            parse_content_length(b"18446744073709551615"),
            Some(u64::MAX)
        );
        assert_eq!(parse_content_length(b"18446744073709551616"), None);
        for bad in [&b""[..], b"-1", b"+1", b"1 2", b"1,1", b"0x10", b"1e3"] {
            assert_eq!(parse_content_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn framing_rules() {
        let mut f = Framing::default();
        f.transfer_encoding(b"gzip, chunked");
        assert_eq!(f.finish(1), Ok((None, true)));

        let mut f = Framing::default();
        f.transfer_encoding(b"chunked");
        f.transfer_encoding(b"gzip");
        assert_eq!(f.finish(1), Err(HttpError::AmbiguousFraming));

        let mut f = Framing::default();
        f.transfer_encoding(b"chunked, chunked");
        assert_eq!(f.finish(1), Err(HttpError::AmbiguousFraming));

        let mut f = Framing::default();
        f.transfer_encoding(b"chunked");
        assert_eq!(f.finish(0), Err(HttpError::AmbiguousFraming));

        let mut f = Framing::default();
        f.content_length(b"5").unwrap();
        f.transfer_encoding(b"chunked");
        assert_eq!(f.finish(1), Err(HttpError::AmbiguousFraming));

        let mut f = Framing::default();
        f.content_length(b"5").unwrap();
        assert_eq!(
            f.content_length(b"5"),
            Err(HttpError::DuplicateHeader {
                name: "content-length"
            })
        );
        assert_eq!(f.finish(1), Ok((Some(5), false)));
    }

    #[test]
    fn other_versions_are_recognised() {
        let r = StartLine::Request;
        assert!(is_other_http_version(b"PRI * HTTP/2.0\r\n\r\nSM", r));
        assert!(is_other_http_version(b"GET / HTTP/2", r));
        assert!(is_other_http_version(b"GET / HTTP/1.2\r\n", r));
        assert!(is_other_http_version(b"\r\nGET / HTTP/3.0\r\n", r));
        assert!(!is_other_http_version(b"GET / HTTP/1.1\r\n", r));
        assert!(!is_other_http_version(b"GET / HTTP/1\r\n", r));
        assert!(!is_other_http_version(b"GET / http/2.0\r\n", r));
        assert!(!is_other_http_version(b"GET / HTTP/x.y\r\n", r));
        assert!(is_other_http_version(
            b"HTTP/2 200 OK\r\n",
            StartLine::Response
        ));
        assert!(!is_other_http_version(
            b"HTTX/2 200 OK\r\n",
            StartLine::Response
        ));
    }
}
