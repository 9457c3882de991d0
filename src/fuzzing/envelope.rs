//! Fuzz entry point for `proto::envelope`.

use crate::proto::envelope::{Header, Kind, parse_credit, write};

/// Parses `data` as an envelope and checks what the relay relies on: no panic; a header that
/// parses re-encodes to exactly the bytes it came from (so rewriting `route` or `unit` and
/// re-encoding never changes the body); its length is what `parse` said; a prefix parse agrees
/// with the whole parse; credit bodies parse only when 4 bytes long.
pub fn decoder(data: &[u8]) {
    let Ok((h, n)) = Header::parse(data) else {
        return;
    };
    assert_eq!(h.len(), n);
    assert!(n <= data.len());
    let mut out = Vec::new();
    write(&mut out, &h, &data[n..]);
    assert_eq!(out, data);
    let (p, m) = Header::parse_prefix(&data[..n]).expect("the header alone parses");
    assert_eq!((p, m), (h, n));
    // Rewriting the header as the gateway does keeps the body intact.
    let moved = Header {
        unit: "",
        route: h.route ^ 1,
        ..h
    };
    let mut out = Vec::new();
    write(&mut out, &moved, &data[n..]);
    let (q, k) = Header::parse(&out).expect("a rewritten header parses");
    assert_eq!(&out[k..], &data[n..]);
    assert_eq!(q.kind, h.kind);
    if h.kind == Kind::Credit {
        assert_eq!(parse_credit(&data[n..]).is_ok(), data.len() - n == 4);
    }
}
