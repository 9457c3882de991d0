//! Gateway side: parse a request head into the owned, pre-digested [`RequestHead`].

use smallvec::SmallVec;

use super::fields::{self, Framing, StartLine};
use super::{HttpError, HttpLimits, Parsed};

/// The request method, as far as the gateway cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`: check-status, metrics and the WebSocket upgrade.
    Get,
    /// `HEAD`: answered like GET without a body.
    Head,
    /// `POST`: not served today; named so the router can answer 405 explicitly.
    Post,
    /// Any other method (methods are case-sensitive: `get` is `Other`).
    Other,
}

impl Method {
    fn from_token(m: &str) -> Self {
        match m {
            "GET" => Self::Get,
            "HEAD" => Self::Head,
            "POST" => Self::Post,
            _ => Self::Other,
        }
    }
}

/// An owned request head holding only what the gateway needs, with the upgrade-relevant
/// fields already digested. It borrows nothing from the read buffer, so the buffer can be
/// recycled as soon as [`parse_request`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The path of the target, raw (not percent-decoded), without query. `"/usg/endpoint"`
    /// for both `GET /usg/endpoint?x` and `GET https://host/usg/endpoint?x`; `"*"` for
    /// `OPTIONS *`; `"/"` for an absolute-form target without a path.
    pub path: String,
    /// The query string without the `?`, raw; `None` when the target has no `?`.
    pub query: Option<String>,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0 (other versions are [`HttpError::UnsupportedVersion`]).
    pub minor_version: u8,
    /// The `Host` value (`host[:port]`, as sent), or the authority of an absolute-form target,
    /// which takes precedence over `Host` (RFC 9112 §3.2.2). `None` when neither is present.
    pub host: Option<String>,
    /// `Connection` lists the `upgrade` option (case-insensitive, across repeated fields).
    pub connection_upgrade: bool,
    /// `Connection` lists `close`.
    pub connection_close: bool,
    /// `Connection` lists `keep-alive` (matters for HTTP/1.0 only).
    pub connection_keep_alive: bool,
    /// `Upgrade` lists the `websocket` protocol (case-insensitive).
    pub upgrade_websocket: bool,
    /// `Sec-WebSocket-Key`, trimmed, unvalidated (see [`check_upgrade`](super::check_upgrade)).
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`, trimmed, unvalidated.
    pub ws_version: Option<String>,
    /// `Sec-WebSocket-Protocol` tokens in the client's order, across repeated fields.
    pub ws_protocols: SmallVec<[String; 2]>,
    /// A non-empty `Sec-WebSocket-Extensions` was sent. We negotiate no extension, so this is
    /// informational: the 101 simply carries no `Sec-WebSocket-Extensions`.
    pub ws_extensions_offered: bool,
    /// `Content-Length`, when present (and no `Transfer-Encoding`).
    pub content_length: Option<u64>,
    /// `Transfer-Encoding` ends in `chunked`. The gateway reads no chunked bodies: answer and
    /// close.
    pub transfer_encoding_chunked: bool,
}

impl RequestHead {
    /// The request announces a body (`Content-Length` > 0 or chunked).
    pub fn has_body(&self) -> bool {
        self.transfer_encoding_chunked || self.content_length.is_some_and(|n| n > 0)
    }

    /// Whether the client allows the connection to stay open for another request after the
    /// answer (RFC 9112 §9.3): HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
    /// `Connection: keep-alive`.
    pub fn keep_alive(&self) -> bool {
        !self.connection_close && (self.minor_version >= 1 || self.connection_keep_alive)
    }
}

/// Parses one request head from the start of `buf`.
///
/// * `Ok(Parsed::Incomplete)`: more bytes are needed; nothing is consumed. Call again with
///   the same bytes plus what arrived (the parse restarts from the beginning; heads are
///   small and bounded by [`HttpLimits::max_head_bytes`]).
/// * `Ok(Parsed::Complete { head, consumed })`: the head ends at `buf[consumed]`; whatever
///   follows is a body or the next request.
/// * `Err(e)`: answer `e.status()` and close. [`HttpError::HeadTooLarge`] comes as soon as
///   `buf` exceeds the limit without a complete head; [`HttpError::TooManyHeaders`] as soon as
///   field `max_headers + 1` is seen.
///
/// Syntax is httparse's (strict: no whitespace before `:`, no obsolete line folding; bare LF
/// line endings and leading empty lines are tolerated). On top of it this rejects
/// non-ASCII or fragment-carrying targets, duplicate `Host`, `Content-Length`,
/// `Sec-WebSocket-Key` and `Sec-WebSocket-Version`, invalid `Host`, `Content-Length` and
/// `Sec-WebSocket-Protocol` values, and ambiguous body framing.
pub fn parse_request(buf: &[u8], limits: &HttpLimits) -> Result<Parsed<RequestHead>, HttpError> {
    let mut headers: SmallVec<[httparse::Header<'_>; 32]> =
        smallvec::smallvec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let Some(consumed) = fields::parse_head(buf, limits, StartLine::Request, |w| req.parse(w))?
    else {
        return Ok(Parsed::Incomplete);
    };
    // httparse fills all three on a complete parse.
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HttpError::Malformed {
            reason: "incomplete start line",
        });
    };
    let target = Target::parse(target)?;

    let mut head = RequestHead {
        method: Method::from_token(method),
        path: target.path.to_owned(),
        query: target.query.map(str::to_owned),
        minor_version,
        host: None,
        connection_upgrade: false,
        connection_close: false,
        connection_keep_alive: false,
        upgrade_websocket: false,
        ws_key: None,
        ws_version: None,
        ws_protocols: SmallVec::new(),
        ws_extensions_offered: false,
        content_length: None,
        transfer_encoding_chunked: false,
    };
    let mut framing = Framing::default();
    let mut host_header: Option<&str> = None;

    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        if name.eq_ignore_ascii_case(b"host") {
            if host_header.is_some() {
                return Err(HttpError::DuplicateHeader { name: "host" });
            }
            let v = fields::trim_ows(value);
            if !fields::is_host(v) {
                return Err(HttpError::BadHeaderValue { name: "host" });
            }
            // is_host admits ASCII only.
            host_header = std::str::from_utf8(v).ok();
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in fields::list_elements(value) {
                if option.eq_ignore_ascii_case(b"upgrade") {
                    head.connection_upgrade = true;
                } else if option.eq_ignore_ascii_case(b"close") {
                    head.connection_close = true;
                } else if option.eq_ignore_ascii_case(b"keep-alive") {
                    head.connection_keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            head.upgrade_websocket |= fields::list_contains(value, "websocket");
        } else if name.eq_ignore_ascii_case(b"sec-websocket-key") {
            fields::set_once(&mut head.ws_key, value, "sec-websocket-key")?;
        } else if name.eq_ignore_ascii_case(b"sec-websocket-version") {
            fields::set_once(&mut head.ws_version, value, "sec-websocket-version")?;
        } else if name.eq_ignore_ascii_case(b"sec-websocket-protocol") {
            for p in fields::list_elements(value) {
                if !fields::is_token(p) {
                    return Err(HttpError::BadHeaderValue {
                        name: "sec-websocket-protocol",
                    });
                }
                // Tokens are ASCII.
                head.ws_protocols
                    .push(String::from_utf8_lossy(p).into_owned());
            }
        } else if name.eq_ignore_ascii_case(b"sec-websocket-extensions") {
            head.ws_extensions_offered |= !fields::trim_ows(value).is_empty();
        } else if name.eq_ignore_ascii_case(b"content-length") {
            framing.content_length(value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            framing.transfer_encoding(value);
        }
    }

    head.host = match target.authority {
        Some(a) => Some(a.to_owned()),
        None => host_header.map(str::to_owned),
    };
    (head.content_length, head.transfer_encoding_chunked) = framing.finish(minor_version)?;
    Ok(Parsed::Complete { head, consumed })
}

/// A request target split into the parts the gateway routes on.
struct Target<'a> {
    authority: Option<&'a str>,
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> Target<'a> {
    /// Origin-form (`/p?q`), absolute-form (`http[s]://`/`ws[s]://` authority, then
    /// `/p?q`), or asterisk-form (`*`). Authority-form (CONNECT) is refused: we are no proxy.
    fn parse(target: &'a str) -> Result<Self, HttpError> {
        if !target.is_ascii() || target.contains('#') {
            return Err(HttpError::BadTarget);
        }
        if target == "*" {
            return Ok(Self {
                authority: None,
                path: "*",
                query: None,
            });
        }
        let (authority, path_and_query) = if target.starts_with('/') {
            (None, target)
        } else {
            let (scheme, rest) = target.split_once("://").ok_or(HttpError::BadTarget)?;
            if !["http", "https", "ws", "wss"]
                .iter()
                .any(|s| s.eq_ignore_ascii_case(scheme))
            {
                return Err(HttpError::BadTarget);
            }
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, path_and_query) = rest.split_at(end);
            // userinfo in a target is an error (RFC 9110 §4.2.4).
            if authority.is_empty() || !fields::is_host(authority.as_bytes()) {
                return Err(HttpError::BadTarget);
            }
            (Some(authority), path_and_query)
        };
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let path = if path.is_empty() { "/" } else { path };
        Ok(Self {
            authority,
            path,
            query,
        })
    }
}
