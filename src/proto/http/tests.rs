//! Tests of the HTTP layer through its public functions, plus interop with tungstenite as an
//! independent peer.

use super::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A typical device upgrade request (~250 bytes, 8 fields).
const UPGRADE: &[u8] = b"GET /usg/endpoint?unit=00E0C5A1B2C3 HTTP/1.1\r\n\
Host: gw.example.com:8443\r\n\
User-Agent: fleetgate-agent/0.1\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Protocol: usg.v2, usg.v1\r\n\
Accept-Encoding: identity\r\n\r\n";

fn limits() -> HttpLimits {
    HttpLimits::default()
}

fn complete(buf: &[u8]) -> (RequestHead, usize) {
    match parse_request(buf, &limits()) {
        Ok(Parsed::Complete { head, consumed }) => (head, consumed),
        other => panic!("expected a complete head, got {other:?}"),
    }
}

fn request(buf: &[u8]) -> RequestHead {
    complete(buf).0
}

fn error(buf: &[u8]) -> HttpError {
    match parse_request(buf, &limits()) {
        Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// An upgrade request with `fields` in place of the usual header block.
fn upgrade_with(start_line: &str, fields: &[&str]) -> Vec<u8> {
    let mut v = format!("{start_line}\r\n").into_bytes();
    for f in fields {
        v.extend_from_slice(f.as_bytes());
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"\r\n");
    v
}

const GOOD_FIELDS: &[&str] = &[
    "Host: gw",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
];

fn fields_without(name: &str) -> Vec<&'static str> {
    GOOD_FIELDS
        .iter()
        .copied()
        .filter(|f| !f.starts_with(name))
        .collect()
}

// ---------------------------------------------------------------- accept key

#[test]
fn accept_matches_rfc6455_sample() {
    assert_eq!(websocket_accept(KEY), ACCEPT);
}

#[test]
fn accept_matches_tungstenite() {
    for key in [KEY, "AQIDBAUGBwgJCgsMDQ4PEA==", "x3JJHMbDL1EzLkh9GBhXDw=="] {
        assert_eq!(
            websocket_accept(key),
            tungstenite::handshake::derive_accept_key(key.as_bytes())
        );
    }
}

#[test]
fn key_validation() {
    assert!(is_valid_key(KEY));
    assert!(is_valid_key(&websocket_key(&[0xff; 16])));
    for bad in [
        "",
        "dGhlIHNhbXBsZSBub25jZQ",       // unpadded
        "dGhlIHNhbXBsZSBub25jZR==",     // non-zero trailing bits
        "dGhlIHNhbXBsZSBub25j",         // 15 bytes... (20 chars)
        "dGhlIHNhbXBsZSBub25jZQ==AAAA", // 19 bytes
        "dGhlIHNhbXBsZSBub25jZUE=",     // 17 bytes
        "dGhlIHNhbXBsZSBub25jZQ=!",     // not base64
        "dGhl-HNhbXBsZSBub25jZQ==",     // URL-safe alphabet
        " dGhlIHNhbXBsZSBub25jZQ==",
    ] {
        assert!(!is_valid_key(bad), "{bad:?}");
    }
}

// ---------------------------------------------------------------- parse_request

#[test]
fn parses_typical_upgrade() {
    let (h, consumed) = complete(UPGRADE);
    assert_eq!(consumed, UPGRADE.len());
    assert_eq!(h.method, Method::Get);
    assert_eq!(h.path, "/usg/endpoint");
    assert_eq!(h.query.as_deref(), Some("unit=00E0C5A1B2C3"));
    assert_eq!(h.minor_version, 1);
    assert_eq!(h.host.as_deref(), Some("gw.example.com:8443"));
    assert!(h.connection_upgrade && h.upgrade_websocket);
    assert!(!h.connection_close && h.keep_alive());
    assert_eq!(h.ws_key.as_deref(), Some(KEY));
    assert_eq!(h.ws_version.as_deref(), Some("13"));
    assert_eq!(h.ws_protocols.as_slice(), ["usg.v2", "usg.v1"]);
    assert!(!h.ws_extensions_offered);
    assert_eq!(h.content_length, None);
    assert!(!h.transfer_encoding_chunked && !h.has_body());
}

#[test]
fn split_at_every_byte_is_incomplete_until_the_end() {
    // Frames sent early must not be swallowed into the head.
    let mut with_tail = UPGRADE.to_vec();
    with_tail.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4]);
    for cut in 0..UPGRADE.len() {
        assert_eq!(
            parse_request(&UPGRADE[..cut], &limits()),
            Ok(Parsed::Incomplete),
            "cut at {cut}"
        );
    }
    for end in UPGRADE.len()..=with_tail.len() {
        let (_, consumed) = complete(&with_tail[..end]);
        assert_eq!(consumed, UPGRADE.len());
    }
}

#[test]
fn bare_lf_and_leading_empty_lines_are_tolerated() {
    let h = request(b"\r\nGET /usg/check-status HTTP/1.1\nHost: gw\n\n");
    assert_eq!(h.path, "/usg/check-status");
    assert_eq!(h.host.as_deref(), Some("gw"));
}

#[test]
fn check_status_get() {
    let h = request(b"GET /usg/check-status HTTP/1.0\r\n\r\n");
    assert_eq!(
        (h.method, h.path.as_str(), h.minor_version),
        (Method::Get, "/usg/check-status", 0)
    );
    assert_eq!(h.query, None);
    assert_eq!(h.host, None);
    assert!(!h.keep_alive());
    assert!(request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive());
    assert!(!request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive());
}

#[test]
fn methods() {
    assert_eq!(request(b"HEAD / HTTP/1.1\r\n\r\n").method, Method::Head);
    assert_eq!(request(b"POST / HTTP/1.1\r\n\r\n").method, Method::Post);
    assert_eq!(request(b"DELETE / HTTP/1.1\r\n\r\n").method, Method::Other);
    assert_eq!(request(b"get / HTTP/1.1\r\n\r\n").method, Method::Other);
}

#[test]
fn head_too_large() {
    let l = HttpLimits {
        max_head_bytes: 64,
        max_headers: 32,
    };
    let mut buf = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    buf.resize(64, b'a');
    assert_eq!(parse_request(&buf, &l), Ok(Parsed::Incomplete));
    buf.push(b'a');
    assert_eq!(
        parse_request(&buf, &l),
        Err(HttpError::HeadTooLarge { limit: 64 })
    );
    assert_eq!(HttpError::HeadTooLarge { limit: 64 }.status(), 431);

    // A complete head of exactly the limit passes; one byte more does not.
    let mut head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    head.resize(60, b'a');
    head.extend_from_slice(b"\r\n\r\n");
    assert!(matches!(
        parse_request(&head, &l),
        Ok(Parsed::Complete { consumed: 64, .. })
    ));
    head.insert(20, b'a');
    assert_eq!(
        parse_request(&head, &l),
        Err(HttpError::HeadTooLarge { limit: 64 })
    );

    // The default limit, with a long stream of header bytes and no end.
    let mut big = b"GET / HTTP/1.1\r\n".to_vec();
    while big.len() <= 8192 {
        big.extend_from_slice(b"X-A: b\r\n");
    }
    let l = HttpLimits {
        max_headers: 10_000,
        ..limits()
    };
    assert_eq!(
        parse_request(&big, &l),
        Err(HttpError::HeadTooLarge { limit: 8192 })
    );
}

#[test]
fn too_many_headers() {
    let mut ok = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..32 {
        ok.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    let mut over = ok.clone();
    ok.extend_from_slice(b"\r\n");
    assert!(matches!(
        parse_request(&ok, &limits()),
        Ok(Parsed::Complete { .. })
    ));
    // Field 33 is refused before the head is even complete.
    over.extend_from_slice(b"X-32: v\r\n");
    let e = error(&over);
    assert_eq!(e, HttpError::TooManyHeaders { limit: 32 });
    assert_eq!(e.status(), 431);
    // A larger limit (heap-allocated field array) works too.
    let l = HttpLimits {
        max_headers: 40,
        ..limits()
    };
    over.extend_from_slice(b"\r\n");
    assert!(matches!(
        parse_request(&over, &l),
        Ok(Parsed::Complete { .. })
    ));
}

#[test]
fn header_names_are_case_insensitive() {
    let h = request(
        b"GET /usg/endpoint HTTP/1.1\r\nhOsT: gw\r\nUPGRADE: WebSocket\r\nconnection: UPGRADE\r\n\
sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nSEC-WEBSOCKET-VERSION: 13\r\n\
Sec-Websocket-Protocol: a\r\nSEC-WEBSOCKET-EXTENSIONS: permessage-deflate\r\n\r\n",
    );
    assert_eq!(h.host.as_deref(), Some("gw"));
    assert!(h.upgrade_websocket && h.connection_upgrade);
    assert_eq!(h.ws_key.as_deref(), Some(KEY));
    assert_eq!(h.ws_version.as_deref(), Some("13"));
    assert_eq!(h.ws_protocols.as_slice(), ["a"]);
    assert!(h.ws_extensions_offered);
    assert!(check_upgrade(&h).is_ok());
}

#[test]
fn repeated_connection_and_protocol_headers() {
    let h = request(
        b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection: , Upgrade\r\n\
Sec-WebSocket-Protocol: a, b\r\nSec-WebSocket-Protocol: c\r\nUpgrade: h2c, websocket\r\n\r\n",
    );
    assert!(h.connection_upgrade && h.connection_keep_alive);
    assert!(h.upgrade_websocket);
    assert_eq!(h.ws_protocols.as_slice(), ["a", "b", "c"]);

    let h = request(
        b"GET / HTTP/1.1\r\nConnection: upgraded, keep-alive\r\nUpgrade: websockets\r\n\r\n",
    );
    assert!(!h.connection_upgrade && !h.upgrade_websocket);
}

#[test]
fn garbage_is_a_400_not_a_panic() {
    for g in [
        &b"\x00\x01\x02\x03\r\n\r\n"[..],
        b"hello world\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nName : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"GET / http/1.1\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
    ] {
        let e = error(g);
        assert_eq!(e.status(), 400, "{g:?} -> {e:?}");
        assert!(e.is_peer_fault());
    }
    // Deterministic pseudo-random bytes: never a panic, never a strange status.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..2000 {
        let buf: Vec<u8> = (0..len % 300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if let Err(e) = parse_request(&buf, &limits()) {
            assert!(matches!(e.status(), 400 | 431 | 505), "{e:?}");
        }
    }
}

#[test]
fn tls_client_hello_on_plain_http() {
    let hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0xaa, 0xbb,
    ];
    for n in 1..=hello.len() {
        let e = error(&hello[..n]);
        assert_eq!(e, HttpError::TlsRecord);
        assert_eq!(e.status(), 400);
    }
}

#[test]
fn absolute_form_targets_take_the_path() {
    let h = request(
        b"GET https://gw.example.com:8443/usg/endpoint?x=1 HTTP/1.1\r\nHost: other\r\n\r\n",
    );
    assert_eq!(h.path, "/usg/endpoint");
    assert_eq!(h.query.as_deref(), Some("x=1"));
    // The target's authority wins over Host (RFC 9112 §3.2.2).
    assert_eq!(h.host.as_deref(), Some("gw.example.com:8443"));

    let h = request(b"GET WSS://[::1]:8443 HTTP/1.1\r\n\r\n");
    assert_eq!(
        (h.path.as_str(), h.host.as_deref()),
        ("/", Some("[::1]:8443"))
    );
    let h = request(b"GET http://gw?q HTTP/1.1\r\n\r\n");
    assert_eq!((h.path.as_str(), h.query.as_deref()), ("/", Some("q")));
    let h = request(b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n");
    assert_eq!(h.path, "*");
    let h = request(b"GET /a?b?c HTTP/1.1\r\n\r\n");
    assert_eq!((h.path.as_str(), h.query.as_deref()), ("/a", Some("b?c")));
    let h = request(b"GET /a? HTTP/1.1\r\n\r\n");
    assert_eq!(h.query.as_deref(), Some(""));

    for bad in [
        &b"GET usg/endpoint HTTP/1.1\r\n\r\n"[..],
        b"CONNECT gw:443 HTTP/1.1\r\n\r\n",
        b"GET ftp://gw/x HTTP/1.1\r\n\r\n",
        b"GET https:///x HTTP/1.1\r\n\r\n",
        b"GET https://user@gw/x HTTP/1.1\r\n\r\n",
        b"GET /x#frag HTTP/1.1\r\n\r\n",
        "GET /caf\u{e9} HTTP/1.1\r\n\r\n".as_bytes(),
    ] {
        assert_eq!(error(bad), HttpError::BadTarget, "{bad:?}");
    }
}

#[test]
fn versions() {
    for v in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        b"GET / HTTP/2\r\n\r\n",
        b"GET / HTTP/1.2\r\n\r\n",
        b"GET / HTTP/3.0\r\nHost: gw\r\n\r\n",
    ] {
        let e = error(v);
        assert_eq!(e, HttpError::UnsupportedVersion, "{v:?}");
        assert_eq!(e.status(), 505);
    }
    assert_eq!(error(b"GET / HTTP/1.x\r\n\r\n").status(), 400);
    assert_eq!(request(b"GET / HTTP/1.0\r\n\r\n").minor_version, 0);
}

#[test]
fn single_valued_fields_must_not_repeat() {
    for (field, name) in [
        ("Host: b", "host"),
        (
            "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==",
            "sec-websocket-key",
        ),
        ("Sec-WebSocket-Version: 13", "sec-websocket-version"),
    ] {
        let mut f = GOOD_FIELDS.to_vec();
        f.push(field);
        let e = error(&upgrade_with("GET / HTTP/1.1", &f));
        assert_eq!(e, HttpError::DuplicateHeader { name });
        assert_eq!(e.status(), 400);
    }
    assert_eq!(
        error(b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"),
        HttpError::DuplicateHeader {
            name: "content-length"
        }
    );
}

#[test]
fn field_values_are_validated() {
    for (raw, name) in [
        (&b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"[..], "host"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "host"),
        (b"GET / HTTP/1.1\r\nHost: u@h\r\n\r\n", "host"),
        (
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "content-length",
        ),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
            "content-length",
        ),
        (
            b"GET / HTTP/1.1\r\nSec-WebSocket-Protocol: a b\r\n\r\n",
            "sec-websocket-protocol",
        ),
        (
            b"GET / HTTP/1.1\r\nSec-WebSocket-Protocol: a/b\r\n\r\n",
            "sec-websocket-protocol",
        ),
        (
            b"GET / HTTP/1.1\r\nSec-WebSocket-Key: \xc3\xa9\r\n\r\n",
            "sec-websocket-key",
        ),
    ] {
        assert_eq!(error(raw), HttpError::BadHeaderValue { name }, "{raw:?}");
    }
    // Non-ASCII in fields we do not read is fine.
    assert!(matches!(
        parse_request(
            b"GET / HTTP/1.1\r\nUser-Agent: caf\xc3\xa9\r\n\r\n",
            &limits()
        ),
        Ok(Parsed::Complete { .. })
    ));
}

#[test]
fn body_framing() {
    let h = request(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n");
    assert_eq!(h.content_length, Some(12));
    assert!(h.has_body());
    let h = request(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
    assert!(h.transfer_encoding_chunked && h.has_body());
    assert_eq!(h.content_length, None);
    assert!(!request(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").has_body());
    for bad in [
        &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n",
    ] {
        let e = error(bad);
        assert_eq!(e, HttpError::AmbiguousFraming, "{bad:?}");
        assert_eq!(e.status(), 400);
    }
}

// ---------------------------------------------------------------- check_upgrade

fn upgrade_error(start_line: &str, fields: &[&str]) -> UpgradeError {
    let h = request(&upgrade_with(start_line, fields));
    check_upgrade(&h).expect_err("should be refused")
}

#[test]
fn upgrade_accepted() {
    let h = request(UPGRADE);
    let up = check_upgrade(&h).unwrap();
    assert_eq!(up.path, "/usg/endpoint");
    assert_eq!(up.query, Some("unit=00E0C5A1B2C3"));
    assert_eq!(up.host, "gw.example.com:8443");
    assert_eq!(up.accept, ACCEPT);
    assert_eq!(up.protocols, ["usg.v2", "usg.v1"]);
}

#[test]
fn upgrade_needs_get() {
    for m in ["POST", "HEAD", "PUT"] {
        let e = upgrade_error(&format!("{m} / HTTP/1.1"), GOOD_FIELDS);
        assert_eq!(e, UpgradeError::MethodNotAllowed);
        assert_eq!(e.status(), 405);
        assert_eq!(e.headers(), [("Allow", "GET")]);
    }
}

#[test]
fn upgrade_needs_http_1_1() {
    let e = upgrade_error("GET / HTTP/1.0", GOOD_FIELDS);
    assert_eq!((e, e.status()), (UpgradeError::HttpVersion, 400));
}

#[test]
fn upgrade_missing_entirely_is_426() {
    let f = fields_without("Upgrade");
    let f: Vec<&str> = f
        .into_iter()
        .filter(|f| !f.starts_with("Connection"))
        .collect();
    for fields in [
        &f[..],
        &fields_without("Upgrade")[..],
        &["Host: gw", "Upgrade: h2c", "Connection: Upgrade"][..],
    ] {
        let e = upgrade_error("GET / HTTP/1.1", fields);
        assert_eq!(e, UpgradeError::NotWebSocket);
        assert_eq!(e.status(), 426);
        assert!(e.headers().contains(&("Upgrade", "websocket")));
        assert!(e.headers().contains(&("Sec-WebSocket-Version", "13")));
    }
}

#[test]
fn upgrade_without_connection_upgrade_is_400() {
    let mut f = fields_without("Connection");
    let e = upgrade_error("GET / HTTP/1.1", &f);
    assert_eq!((e, e.status()), (UpgradeError::ConnectionNotUpgrade, 400));
    f.push("Connection: keep-alive");
    assert_eq!(
        upgrade_error("GET / HTTP/1.1", &f),
        UpgradeError::ConnectionNotUpgrade
    );
}

#[test]
fn upgrade_version_must_be_13() {
    let mut f = fields_without("Sec-WebSocket-Version");
    let e = upgrade_error("GET / HTTP/1.1", &f);
    assert_eq!((e, e.status()), (UpgradeError::UnsupportedVersion, 426));
    assert!(e.headers().contains(&("Sec-WebSocket-Version", "13")));
    for v in ["8", "13, 8", "013", ""] {
        f.push(Box::leak(
            format!("Sec-WebSocket-Version: {v}").into_boxed_str(),
        ));
        assert_eq!(
            upgrade_error("GET / HTTP/1.1", &f),
            UpgradeError::UnsupportedVersion,
            "{v:?}"
        );
        f.pop();
    }
}

#[test]
fn upgrade_key_rules() {
    let mut f = fields_without("Sec-WebSocket-Key");
    let e = upgrade_error("GET / HTTP/1.1", &f);
    assert_eq!((e, e.status()), (UpgradeError::MissingKey, 400));
    for k in ["abc", "dGhlIHNhbXBsZSBub25jZUE=", "dGhlIHNhbXBsZSBub25jZQ"] {
        f.push(Box::leak(
            format!("Sec-WebSocket-Key: {k}").into_boxed_str(),
        ));
        let e = upgrade_error("GET / HTTP/1.1", &f);
        assert_eq!((e, e.status()), (UpgradeError::InvalidKey, 400), "{k:?}");
        f.pop();
    }
}

#[test]
fn upgrade_needs_host() {
    let e = upgrade_error("GET / HTTP/1.1", &fields_without("Host"));
    assert_eq!((e, e.status()), (UpgradeError::MissingHost, 400));
    let mut f = fields_without("Host");
    f.push("Host:");
    assert_eq!(
        upgrade_error("GET / HTTP/1.1", &f),
        UpgradeError::MissingHost
    );
    // An absolute-form target supplies the host.
    let h = request(&upgrade_with(
        "GET wss://gw/usg/endpoint HTTP/1.1",
        &fields_without("Host"),
    ));
    assert_eq!(check_upgrade(&h).unwrap().host, "gw");
}

#[test]
fn upgrade_must_not_have_a_body() {
    for extra in ["Content-Length: 5", "Transfer-Encoding: chunked"] {
        let mut f = GOOD_FIELDS.to_vec();
        f.push(extra);
        let e = upgrade_error("GET / HTTP/1.1", &f);
        assert_eq!((e, e.status()), (UpgradeError::BodyNotAllowed, 400));
    }
    let mut f = GOOD_FIELDS.to_vec();
    f.push("Content-Length: 0");
    assert!(check_upgrade(&request(&upgrade_with("GET / HTTP/1.1", &f))).is_ok());
}

#[test]
fn subprotocol_follows_our_preference() {
    let ours = ["usg.v2", "usg.v1"];
    assert_eq!(
        negotiate_subprotocol(&["usg.v1", "usg.v2"], &ours),
        Some("usg.v2")
    );
    assert_eq!(
        negotiate_subprotocol(&["x", "usg.v1"], &ours),
        Some("usg.v1")
    );
    assert_eq!(negotiate_subprotocol(&["USG.V2"], &ours), None);
    assert_eq!(negotiate_subprotocol::<&str>(&[], &ours), None);
    assert_eq!(negotiate_subprotocol(&["usg.v1"], &[]), None);
    let h = request(UPGRADE);
    assert_eq!(
        negotiate_subprotocol(&h.ws_protocols, &["usg.v1"]),
        Some("usg.v1")
    );
}

// ---------------------------------------------------------------- writers

#[test]
fn write_response_bytes() {
    let mut out = b"prefix".to_vec();
    write_response(
        &mut out,
        200,
        &[],
        Some("application/json"),
        br#"{"status":"ok"}"#,
        false,
    );
    assert_eq!(
        out,
        b"prefixHTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}"
    );

    let mut out = Vec::new();
    let e = UpgradeError::MethodNotAllowed;
    write_response(&mut out, e.status(), e.headers(), None, b"", true);
    assert_eq!(
        out,
        b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );

    let mut out = Vec::new();
    write_response(&mut out, 204, &[], None, b"", false);
    assert_eq!(out, b"HTTP/1.1 204 No Content\r\n\r\n");

    let mut out = Vec::new();
    write_response(&mut out, 599, &[], None, b"x", false);
    assert_eq!(out, b"HTTP/1.1 599 \r\nContent-Length: 1\r\n\r\nx");

    let mut out = Vec::new();
    write_head_response(&mut out, 404, &[], Some("text/plain"), 9, false);
    assert_eq!(
        out,
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\n"
    );
}

#[test]
fn every_reason_phrase_is_a_valid_status_line() {
    for status in 100..=999u16 {
        let mut out = Vec::new();
        write_response(&mut out, status, &[("Retry-After", "5")], None, b"", true);
        let r = match parse_response(&out, &limits()) {
            Ok(Parsed::Complete { head, consumed }) => {
                assert_eq!(consumed, out.len());
                head
            }
            other => panic!("{status}: {other:?}"),
        };
        assert_eq!(r.status, status);
        assert_eq!(r.reason, reason_phrase(status));
        assert!(r.connection_close);
        assert_eq!(r.retry_after, Some(RetryAfter::Seconds(5)));
        assert_eq!(
            r.content_length,
            (status >= 200 && status != 204).then_some(0)
        );
    }
}

#[test]
fn upgrade_error_answers_parse_back() {
    let mut out = Vec::new();
    let e = UpgradeError::UnsupportedVersion;
    write_response(
        &mut out,
        e.status(),
        e.headers(),
        Some("text/plain"),
        b"need 13",
        true,
    );
    let Ok(Parsed::Complete { head, .. }) = parse_response(&out, &limits()) else {
        panic!("{out:?}")
    };
    assert_eq!(head.status, 426);
    assert!(head.upgrade_websocket && head.connection_upgrade && head.connection_close);
    assert_eq!(head.content_length, Some(7));
}

#[test]
fn switching_protocols_bytes() {
    let mut out = Vec::new();
    write_switching_protocols(&mut out, ACCEPT, Some("usg.v2"));
    assert_eq!(
        out,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: usg.v2\r\n\r\n"
    );
    let mut out = Vec::new();
    write_switching_protocols(&mut out, ACCEPT, None);
    assert!(!out.windows(22).any(|w| w == b"Sec-WebSocket-Protocol"));
    assert!(out.ends_with(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"));
}

// ---------------------------------------------------------------- client side

fn response(buf: &[u8]) -> ResponseHead {
    match parse_response(buf, &limits()) {
        Ok(Parsed::Complete { head, .. }) => head,
        other => panic!("expected a complete head, got {other:?}"),
    }
}

#[test]
fn upgrade_request_bytes_and_round_trip() {
    let mut out = Vec::new();
    write_upgrade_request(
        &mut out,
        "gw.example.com:8443",
        "/usg/endpoint?unit=1",
        KEY,
        &["usg.v2", "usg.v1"],
        &[("User-Agent", "fleetgate-agent/0.1")],
    )
    .unwrap();
    assert_eq!(
        out,
        b"GET /usg/endpoint?unit=1 HTTP/1.1\r\nHost: gw.example.com:8443\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Protocol: usg.v2, usg.v1\r\nUser-Agent: fleetgate-agent/0.1\r\n\r\n"
    );
    // Our own server side accepts it, and our client accepts our server's answer.
    let h = request(&out);
    let up = check_upgrade(&h).unwrap();
    let chosen = negotiate_subprotocol(up.protocols, &["usg.v1", "usg.v2"]);
    let mut resp = Vec::new();
    write_switching_protocols(&mut resp, &up.accept, chosen);
    let r = response(&resp);
    assert_eq!(
        check_upgrade_response(&r, KEY, &["usg.v2", "usg.v1"]),
        Ok(Some("usg.v1".to_owned()))
    );
}

/// `write_upgrade_request` arguments and the argument it should name.
type BadRequestCase<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a [&'a str],
    &'a [(&'a str, &'a str)],
    &'a str,
);

#[test]
fn upgrade_request_refuses_bad_input() {
    let cases: [BadRequestCase<'_>; 8] = [
        ("gw", "usg", KEY, &[], &[], "path"),
        ("gw", "/a b", KEY, &[], &[], "path"),
        ("gw", "/a\r\nX: y", KEY, &[], &[], "path"),
        ("", "/", KEY, &[], &[], "host"),
        ("gw\r\n", "/", KEY, &[], &[], "host"),
        ("gw", "/", "short", &[], &[], "key"),
        ("gw", "/", KEY, &["a b"], &[], "protocol"),
        ("gw", "/", KEY, &[], &[("X", "a\r\nInjected: 1")], "header"),
    ];
    for (host, path, key, protocols, extra, what) in cases {
        let mut out = b"keep".to_vec();
        let e = write_upgrade_request(&mut out, host, path, key, protocols, extra).unwrap_err();
        assert_eq!(e, HttpError::InvalidOutgoing { what });
        assert!(!e.is_peer_fault());
        assert_eq!(out, b"keep", "nothing appended on error");
    }
}

const RESPONSE_101: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
Sec-WebSocket-Protocol: usg.v1\r\n\r\n";

#[test]
fn parse_response_split_at_every_byte() {
    let mut with_frame = RESPONSE_101.to_vec();
    with_frame.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
    for cut in 0..RESPONSE_101.len() {
        assert_eq!(
            parse_response(&RESPONSE_101[..cut], &limits()),
            Ok(Parsed::Incomplete)
        );
    }
    let Ok(Parsed::Complete { head, consumed }) = parse_response(&with_frame, &limits()) else {
        panic!()
    };
    assert_eq!(consumed, RESPONSE_101.len());
    assert_eq!(head.status, 101);
    assert_eq!(head.reason, "Switching Protocols");
    assert_eq!(
        check_upgrade_response(&head, KEY, &["usg.v2", "usg.v1"]),
        Ok(Some("usg.v1".to_owned()))
    );
}

#[test]
fn parse_response_limits_and_errors() {
    let l = HttpLimits {
        max_head_bytes: 16,
        max_headers: 1,
    };
    assert_eq!(
        parse_response(b"HTTP/1.1 200 OK\r\nX", &l),
        Err(HttpError::HeadTooLarge { limit: 16 })
    );
    let l = HttpLimits {
        max_headers: 1,
        ..limits()
    };
    assert_eq!(
        parse_response(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n", &l),
        Err(HttpError::TooManyHeaders { limit: 1 })
    );
    assert_eq!(
        parse_response(b"HTTP/2 200\r\n\r\n", &limits()),
        Err(HttpError::UnsupportedVersion)
    );
    assert_eq!(
        parse_response(b"\x16\x03\x03\x00", &limits()),
        Err(HttpError::TlsRecord)
    );
    assert!(matches!(
        parse_response(b"HTTP/1.1 20 OK\r\n\r\n", &limits()),
        Err(HttpError::Malformed { .. })
    ));
    assert_eq!(
        parse_response(
            b"HTTP/1.1 101 x\r\nSec-WebSocket-Protocol: a\r\nSec-WebSocket-Protocol: b\r\n\r\n",
            &limits()
        ),
        Err(HttpError::DuplicateHeader {
            name: "sec-websocket-protocol"
        })
    );
}

#[test]
fn parse_response_fields() {
    let r = response(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 120\r\nContent-Length: 4\r\nconnection: close\r\n\r\nfull");
    assert_eq!(r.status, 503);
    assert_eq!(r.retry_after, Some(RetryAfter::Seconds(120)));
    assert_eq!(r.content_length, Some(4));
    assert!(r.connection_close);
    let r = response(b"HTTP/1.1 429 Too Many\r\nRetry-After: Fri, 31 Dec 1999 23:59:59 GMT\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert!(r.transfer_encoding_chunked);
    assert_eq!(
        r.retry_after,
        Some(RetryAfter::Date("Fri, 31 Dec 1999 23:59:59 GMT".to_owned()))
    );
    // HTTP/1.0 + chunked is ambiguous for responses too.
    assert!(
        parse_response(
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            &limits()
        )
        .is_err()
    );
    let r = response(b"HTTP/1.1 200 OK\r\nRetry-After: \xff\r\n\r\n");
    assert_eq!(r.retry_after, None);
}

#[test]
fn check_upgrade_response_rules() {
    let good = response(RESPONSE_101);
    let offered = ["usg.v1"];
    assert_eq!(
        check_upgrade_response(&good, KEY, &offered),
        Ok(Some("usg.v1".into()))
    );

    let mut r = good.clone();
    r.status = 200;
    assert_eq!(
        check_upgrade_response(&r, KEY, &offered),
        Err(UpgradeResponseError::Status(200))
    );

    let r = response(b"HTTP/1.1 101 S\r\nUpgrade: websocket, h2c\r\nConnection: upgrade\r\n\r\n");
    assert_eq!(
        check_upgrade_response(&r, KEY, &[]),
        Err(UpgradeResponseError::NotWebSocket)
    );
    let r = response(b"HTTP/1.1 101 S\r\nUpgrade: websocket\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
    assert_eq!(
        check_upgrade_response(&r, KEY, &[]),
        Err(UpgradeResponseError::NotWebSocket)
    );

    let r = response(b"HTTP/1.1 101 S\r\nUPGRADE: WebSocket\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(
        check_upgrade_response(&r, KEY, &[]),
        Err(UpgradeResponseError::ConnectionNotUpgrade)
    );

    let mut r = good.clone();
    r.ws_accept = None;
    assert_eq!(
        check_upgrade_response(&r, KEY, &offered),
        Err(UpgradeResponseError::BadAccept)
    );
    assert_eq!(
        check_upgrade_response(&good, "AQIDBAUGBwgJCgsMDQ4PEA==", &offered),
        Err(UpgradeResponseError::BadAccept)
    );

    let mut r = good.clone();
    r.ws_extensions = true;
    assert_eq!(
        check_upgrade_response(&r, KEY, &offered),
        Err(UpgradeResponseError::ExtensionNotOffered)
    );

    assert_eq!(
        check_upgrade_response(&good, KEY, &["usg.v2"]),
        Err(UpgradeResponseError::ProtocolNotOffered("usg.v1".into()))
    );
    assert_eq!(
        check_upgrade_response(&good, KEY, &[]),
        Err(UpgradeResponseError::ProtocolNotOffered("usg.v1".into()))
    );
    let mut r = good.clone();
    r.ws_protocol = None;
    assert_eq!(check_upgrade_response(&r, KEY, &offered), Ok(None));
}

// ---------------------------------------------------------------- interop with tungstenite

/// An in-memory stream: reads what the test put in `input` (then `WouldBlock`), records
/// what is written.
#[derive(Default)]
struct Pipe {
    input: Vec<u8>,
    read: usize,
    output: Vec<u8>,
}

impl std::io::Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.input[self.read..];
        if rest.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.read += n;
        Ok(n)
    }
}

impl std::io::Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn tungstenite_client_against_our_server_side() {
    use tungstenite::client::IntoClientRequest as _;
    use tungstenite::handshake::HandshakeError;

    let mut req = "ws://gw.example.com:8443/usg/endpoint?unit=7"
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "usg.v1, usg.v2".parse().unwrap());
    let mut mid = match tungstenite::client(req, Pipe::default()) {
        Err(HandshakeError::Interrupted(mid)) => mid,
        Err(HandshakeError::Failure(e)) => panic!("{e}"),
        Ok(_) => panic!("handshake cannot finish without a response"),
    };
    let sent = std::mem::take(&mut mid.get_mut().get_mut().output);

    let (h, consumed) = complete(&sent);
    assert_eq!(consumed, sent.len());
    let up = check_upgrade(&h).unwrap();
    assert_eq!(
        (up.path, up.query, up.host),
        ("/usg/endpoint", Some("unit=7"), "gw.example.com:8443")
    );
    let chosen = negotiate_subprotocol(up.protocols, &["usg.v2", "usg.v1"]);
    assert_eq!(chosen, Some("usg.v2"));
    let mut resp = Vec::new();
    write_switching_protocols(&mut resp, &up.accept, chosen);

    mid.get_mut().get_mut().input = resp;
    let (_ws, response) = match mid.handshake() {
        Ok(done) => done,
        Err(HandshakeError::Failure(e)) => panic!("tungstenite refused our 101: {e}"),
        Err(HandshakeError::Interrupted(_)) => panic!("tungstenite wants more bytes"),
    };
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["Sec-WebSocket-Protocol"], "usg.v2");
}

#[test]
fn our_client_side_against_tungstenite_server() {
    let mut request_bytes = Vec::new();
    let key = websocket_key(&[7; 16]);
    write_upgrade_request(
        &mut request_bytes,
        "gw:8443",
        "/usg/endpoint",
        &key,
        &[],
        &[],
    )
    .unwrap();
    let pipe = Pipe {
        input: request_bytes,
        ..Pipe::default()
    };
    let ws = match tungstenite::accept(pipe) {
        Ok(ws) => ws,
        Err(tungstenite::HandshakeError::Failure(e)) => {
            panic!("tungstenite refused our request: {e}")
        }
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("tungstenite wants more bytes"),
    };
    let answer = &ws.get_ref().output;
    let r = response(answer);
    assert_eq!(check_upgrade_response(&r, &key, &[]), Ok(None));
}
