//! The relay envelope of `docs/protocol.md` §6.2, written from the document (not shared with
//! the gateway's `src/proto/envelope.rs`, like [`crate::messages`]): one envelope per
//! WebSocket binary message on `/usg/endpoint` (device sessions) and `/usg/management`.
//!
//! ```text
//! kind u8 | flags u8 (0) | unit length u16 BE | channel u32 BE | route u64 BE | unit | body
//! ```

/// Bytes of the fixed part of the header.
pub const FIXED_HEADER: usize = 16;
/// Longest unit ID.
pub const MAX_UNIT_LEN: usize = 64;
/// Largest data body the gateway relays (§6.2).
pub const MAX_DATA: usize = 64 * 1024;
/// Default stream window, 256 KiB (§6.6).
pub const DEFAULT_WINDOW: u32 = 256 * 1024;

pub const REQUEST: u8 = 0x01;
pub const RESPONSE: u8 = 0x02;
pub const EVENT: u8 = 0x03;
pub const OPEN: u8 = 0x10;
pub const ACCEPT: u8 = 0x11;
pub const DATA: u8 = 0x12;
pub const CREDIT: u8 = 0x13;
pub const CLOSE: u8 = 0x14;
pub const RESET: u8 = 0x15;

/// A parsed envelope, borrowing the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub kind: u8,
    pub channel: u32,
    pub route: u64,
    pub unit: &'a str,
    pub body: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Parses one binary message; `None` if it is shorter than its header, has flags set, an
    /// unknown kind or a bad unit ID.
    pub fn parse(msg: &'a [u8]) -> Option<Self> {
        if msg.len() < FIXED_HEADER || msg[1] != 0 {
            return None;
        }
        let kind = msg[0];
        if !matches!(kind, 0x01..=0x03 | 0x10..=0x15) {
            return None;
        }
        let unit_len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
        if unit_len > MAX_UNIT_LEN || msg.len() < FIXED_HEADER + unit_len {
            return None;
        }
        let channel = u32::from_be_bytes(msg[4..8].try_into().ok()?);
        let route = u64::from_be_bytes(msg[8..16].try_into().ok()?);
        let unit = std::str::from_utf8(&msg[FIXED_HEADER..FIXED_HEADER + unit_len]).ok()?;
        Some(Self {
            kind,
            channel,
            route,
            unit,
            body: &msg[FIXED_HEADER + unit_len..],
        })
    }

    /// The body of a `credit` envelope.
    pub fn credit(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.body.try_into().ok()?))
    }
}

/// Appends a header to `out` (the body follows it in the same buffer).
pub fn write_header(out: &mut Vec<u8>, kind: u8, channel: u32, route: u64, unit: &str) {
    let unit = &unit.as_bytes()[..unit.len().min(MAX_UNIT_LEN)];
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&(unit.len() as u16).to_be_bytes());
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&route.to_be_bytes());
    out.extend_from_slice(unit);
}

/// One whole envelope.
pub fn encode(kind: u8, channel: u32, route: u64, unit: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_HEADER + unit.len() + body.len());
    write_header(&mut out, kind, channel, route, unit);
    out.extend_from_slice(body);
    out
}

/// The error code of a response or reset body (`{"ok":false,"error":{"code":…}}` or
/// `{"error":{"code":…}}`); `None` for a successful response.
pub fn error_code(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Error {
        #[serde(default)]
        code: String,
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(default)]
        ok: Option<bool>,
        #[serde(default)]
        error: Option<Error>,
    }
    match serde_json::from_slice::<Reply>(body) {
        Ok(Reply { ok: Some(true), .. }) => None,
        Ok(Reply {
            error: Some(Error { code }),
            ..
        }) if !code.is_empty() => Some(code),
        Ok(_) => Some("no_error_code".to_owned()),
        Err(_) => Some("bad_json".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ping_example_of_the_protocol_document() {
        // §6.3: management asks 00E0C5A1B2C3 to ping, request id 7.
        let body = br#"{"method":"ping","params":{}}"#;
        let msg = encode(REQUEST, 7, 0, "00E0C5A1B2C3", body);
        assert_eq!(
            &msg[..16],
            &[1, 0, 0, 12, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&msg[16..28], b"00E0C5A1B2C3");
        let e = Envelope::parse(&msg).unwrap();
        assert_eq!(
            (e.kind, e.channel, e.route, e.unit, e.body),
            (REQUEST, 7, 0, "00E0C5A1B2C3", &body[..])
        );
        // The device's answer echoes channel and route, with an empty unit.
        let answer = encode(RESPONSE, 7, 0xdead_beef_0102_0304, "", b"{}");
        let a = Envelope::parse(&answer).unwrap();
        assert_eq!(
            (a.kind, a.route, a.unit),
            (RESPONSE, 0xdead_beef_0102_0304, "")
        );
    }

    #[test]
    fn refuses_bad_headers_and_reads_credit() {
        assert!(Envelope::parse(&[1, 0, 0]).is_none());
        let mut bad = encode(REQUEST, 1, 0, "u", b"");
        bad[1] = 1;
        assert!(Envelope::parse(&bad).is_none());
        assert!(Envelope::parse(&encode(0x7f, 1, 0, "", b"")).is_none());
        let mut long = encode(REQUEST, 1, 0, "", b"");
        long[3] = 65;
        assert!(Envelope::parse(&long).is_none());
        let c = encode(CREDIT, 3, 9, "", &131_072u32.to_be_bytes());
        assert_eq!(Envelope::parse(&c).unwrap().credit(), Some(131_072));
    }

    #[test]
    fn error_codes_of_responses() {
        assert_eq!(error_code(br#"{"ok":true,"result":{"pong":true}}"#), None);
        assert_eq!(
            error_code(br#"{"ok":false,"error":{"code":"device_offline","message":"x"}}"#)
                .as_deref(),
            Some("device_offline")
        );
        assert_eq!(
            error_code(br#"{"error":{"code":"link_closed"}}"#).as_deref(),
            Some("link_closed")
        );
        assert_eq!(error_code(b"nope").as_deref(), Some("bad_json"));
    }
}
