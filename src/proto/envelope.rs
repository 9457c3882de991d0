//! The relay envelope (`docs/protocol.md` §6): one envelope per WebSocket **binary** message on
//! `/usg/endpoint` (device sessions) and `/usg/management`.
//!
//! ```text
//!  0        1        2        3
//! +--------+--------+--------+--------+
//! |  kind  | flags  |   unit length   |   unit length: u16 big-endian, 0..=64
//! +--------+--------+--------+--------+
//! |          channel (u32 BE)         |   request id or stream id, chosen by the opener
//! +--------+--------+--------+--------+
//! |                                   |
//! +          route (u64 BE)           +   set by the gateway, echoed by devices
//! |                                   |
//! +--------+--------+--------+--------+
//! |  unit ID (unit length bytes, UTF-8)|
//! +-----------------------------------+
//! |  body (the rest of the message)   |
//! +-----------------------------------+
//! ```
//!
//! Sans-IO and allocation-free: [`Header::parse`] reads a header from a byte slice,
//! [`Header::write`] appends one to a `Vec`. Bodies are JSON for requests, responses, events,
//! opens, accepts, closes and resets ([`Body`] helpers), raw bytes for data, and a `u32` for
//! credit. Nothing here decides routing; that is the relay's job.

use serde::{Deserialize, Serialize};

/// Bytes of the fixed part of the header.
pub const FIXED_HEADER: usize = 16;
/// Longest unit ID (the device certificate's common name limit).
pub const MAX_UNIT_LEN: usize = 64;
/// Longest header.
pub const MAX_HEADER: usize = FIXED_HEADER + MAX_UNIT_LEN;
/// Largest body of a `data` envelope the gateway relays (64 KiB). Senders should use 16 KiB.
pub const MAX_DATA: usize = 64 * 1024;
/// Largest envelope (header + body) the gateway relays; a bigger message closes the
/// connection with 1009.
pub const MAX_ENVELOPE: usize = MAX_HEADER + MAX_DATA;
/// Default stream window (bytes of credit granted at open/accept): 256 KiB.
pub const DEFAULT_WINDOW: u32 = 256 * 1024;
/// The event the gateway sends a device, on the `route` of a management connection that is
/// gone, when that connection had opened streams to it (`docs/protocol.md` §6.5): the device
/// ends every stream of that route.
pub const MANAGEMENT_DOWN: &str = "management_down";

/// What an envelope is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A request (`channel` = request id); body JSON `{"method", "params"}`.
    Request = 0x01,
    /// The answer to a request (same `channel`); body JSON `{"ok", "result" | "error"}`.
    Response = 0x02,
    /// A notification; body JSON `{"event", …}`. Gateway → management, device → management,
    /// and gateway → device ([`MANAGEMENT_DOWN`]).
    Event = 0x03,
    /// Opens a stream (`channel` = stream id); body JSON `{"kind", "window", …}`.
    Open = 0x10,
    /// The peer accepted the stream; body JSON `{"window"}`.
    Accept = 0x11,
    /// Stream bytes.
    Data = 0x12,
    /// More credit: body = u32 BE, bytes the sender of `credit` is ready to receive.
    Credit = 0x13,
    /// This side will send no more on the stream (half-close); body JSON `{"ok", …}`.
    Close = 0x14,
    /// Abort the stream in both directions; body JSON `{"error"}`.
    Reset = 0x15,
}

impl Kind {
    /// From the wire byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::Request,
            0x02 => Kind::Response,
            0x03 => Kind::Event,
            0x10 => Kind::Open,
            0x11 => Kind::Accept,
            0x12 => Kind::Data,
            0x13 => Kind::Credit,
            0x14 => Kind::Close,
            0x15 => Kind::Reset,
            _ => return None,
        })
    }

    /// Bulk (stream data) travels in the low-priority lane; everything else never waits
    /// behind it.
    pub fn is_bulk(self) -> bool {
        self == Kind::Data
    }

    /// Kinds that belong to a stream.
    pub fn is_stream(self) -> bool {
        (self as u8) >= 0x10
    }
}

/// Why a header did not parse. Fatal for the connection (close 1002/1009).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than its header.
    #[error("envelope shorter than its header")]
    Truncated,
    /// Unknown kind byte.
    #[error("unknown envelope kind 0x{0:02x}")]
    UnknownKind(u8),
    /// Flags must be zero in version 1.
    #[error("envelope flags must be 0")]
    Flags,
    /// Unit ID longer than 64 bytes or not UTF-8.
    #[error("bad unit ID in envelope")]
    Unit,
    /// A `credit` body that is not 4 bytes.
    #[error("credit body must be 4 bytes")]
    Credit,
    /// Bigger than [`MAX_ENVELOPE`].
    #[error("envelope larger than {MAX_ENVELOPE} bytes")]
    TooLarge,
}

/// A parsed header, borrowing the unit ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The kind.
    pub kind: Kind,
    /// Request or stream id.
    pub channel: u32,
    /// The gateway's routing tag.
    pub route: u64,
    /// The unit ID (target from management, source to management; empty on device links).
    pub unit: &'a str,
}

impl<'a> Header<'a> {
    /// Parses the header at the start of `msg`; returns it and the header length (the body
    /// starts there). `msg` must be the whole envelope (its length is checked against
    /// [`MAX_ENVELOPE`]).
    pub fn parse(msg: &'a [u8]) -> Result<(Header<'a>, usize), EnvelopeError> {
        if msg.len() > MAX_ENVELOPE {
            return Err(EnvelopeError::TooLarge);
        }
        Self::parse_prefix(msg)
    }

    /// Parses a header from the first bytes of an envelope whose total length is not known
    /// yet (`Err(Truncated)` = need more bytes).
    pub fn parse_prefix(msg: &'a [u8]) -> Result<(Header<'a>, usize), EnvelopeError> {
        if msg.len() < FIXED_HEADER {
            return Err(EnvelopeError::Truncated);
        }
        let kind = Kind::from_u8(msg[0]).ok_or(EnvelopeError::UnknownKind(msg[0]))?;
        if msg[1] != 0 {
            return Err(EnvelopeError::Flags);
        }
        let unit_len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
        if unit_len > MAX_UNIT_LEN {
            return Err(EnvelopeError::Unit);
        }
        let channel = u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]);
        let mut r = [0u8; 8];
        r.copy_from_slice(&msg[8..16]);
        let route = u64::from_be_bytes(r);
        let end = FIXED_HEADER + unit_len;
        if msg.len() < end {
            return Err(EnvelopeError::Truncated);
        }
        let unit = std::str::from_utf8(&msg[FIXED_HEADER..end]).map_err(|_| EnvelopeError::Unit)?;
        Ok((
            Header {
                kind,
                channel,
                route,
                unit,
            },
            end,
        ))
    }

    /// The encoded length.
    pub fn len(&self) -> usize {
        FIXED_HEADER + self.unit.len()
    }

    /// Never empty (for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Appends the encoded header to `out`. The unit ID is cut at 64 bytes (callers pass
    /// checked unit IDs).
    pub fn write(&self, out: &mut Vec<u8>) {
        let unit = &self.unit.as_bytes()[..self.unit.len().min(MAX_UNIT_LEN)];
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&(unit.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.channel.to_be_bytes());
        out.extend_from_slice(&self.route.to_be_bytes());
        out.extend_from_slice(unit);
    }
}

/// The body of a `credit` envelope.
pub fn parse_credit(body: &[u8]) -> Result<u32, EnvelopeError> {
    let b: [u8; 4] = body.try_into().map_err(|_| EnvelopeError::Credit)?;
    Ok(u32::from_be_bytes(b))
}

/// Appends a whole envelope (header + body) to `out`.
pub fn write(out: &mut Vec<u8>, header: &Header<'_>, body: &[u8]) {
    header.write(out);
    out.extend_from_slice(body);
}

/// An error in a response, close or reset body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable code (`docs/protocol.md` §6.6).
    pub code: String,
    /// A sentence for people.
    pub message: String,
}

/// A response body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseBody {
    /// Success.
    pub ok: bool,
    /// The result when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl ResponseBody {
    /// A success.
    pub fn ok(result: serde_json::Value) -> ResponseBody {
        ResponseBody {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failure.
    pub fn err(code: &str, message: impl Into<String>) -> ResponseBody {
        ResponseBody {
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code: code.into(),
                message: message.into(),
            }),
        }
    }

    /// The JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serializes")
    }
}

/// A request body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestBody {
    /// The method (`docs/protocol.md` §6.4, §6.5).
    pub method: String,
    /// Its parameters.
    #[serde(default)]
    pub params: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_matches_the_documented_layout() {
        let h = Header {
            kind: Kind::Request,
            channel: 7,
            route: 0x0102_0304_0506_0708,
            unit: "UNIT-1",
        };
        let mut out = Vec::new();
        write(&mut out, &h, br#"{"method":"ping"}"#);
        assert_eq!(
            &out[..22],
            &[
                0x01, 0, 0, 6, 0, 0, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8, b'U', b'N', b'I', b'T', b'-',
                b'1'
            ]
        );
        let (p, n) = Header::parse(&out).unwrap();
        assert_eq!((p, n), (h, 22));
        assert_eq!(&out[n..], br#"{"method":"ping"}"#);
    }

    #[test]
    fn bad_headers_are_refused_not_panicked_on() {
        assert_eq!(Header::parse(&[1, 0, 0]), Err(EnvelopeError::Truncated));
        let mut m = vec![0x99, 0, 0, 0];
        m.extend([0; 12]);
        assert_eq!(Header::parse(&m), Err(EnvelopeError::UnknownKind(0x99)));
        m[0] = 1;
        m[1] = 1;
        assert_eq!(Header::parse(&m), Err(EnvelopeError::Flags));
        m[1] = 0;
        m[3] = 65;
        assert_eq!(Header::parse(&m), Err(EnvelopeError::Unit));
        m[3] = 2;
        assert_eq!(Header::parse(&m), Err(EnvelopeError::Truncated));
        m.extend([0xff, 0xfe]);
        assert_eq!(Header::parse(&m), Err(EnvelopeError::Unit));
        assert_eq!(parse_credit(&[0, 1, 0, 0]), Ok(65536));
        assert_eq!(parse_credit(&[0, 1]), Err(EnvelopeError::Credit));
        assert_eq!(
            Header::parse(&vec![1u8; MAX_ENVELOPE + 1]),
            Err(EnvelopeError::TooLarge)
        );
    }

    #[test]
    fn json_bodies() {
        let r = ResponseBody::err("device_offline", "UNIT-1 is not connected");
        assert_eq!(
            String::from_utf8(r.to_vec()).unwrap(),
            r#"{"ok":false,"error":{"code":"device_offline","message":"UNIT-1 is not connected"}}"#
        );
        let q: RequestBody = serde_json::from_slice(br#"{"method":"ping"}"#).unwrap();
        assert_eq!(q.method, "ping");
        assert!(q.params.is_null());
    }

    /// The committed fuzz seeds and cheap mutations of them (prefixes, byte flips): parse
    /// never panics, and what parses re-encodes to the same bytes (the fuzz target's property).
    #[test]
    fn fuzz_seeds_and_mutants_round_trip() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/envelope");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let seed = std::fs::read(entry.unwrap().path()).unwrap();
            let mut mutants = vec![seed.clone()];
            mutants.extend((0..seed.len()).map(|l| seed[..l].to_vec()));
            for i in 0..seed.len().min(40) {
                for bit in [0x01, 0x80] {
                    let mut m = seed.clone();
                    m[i] ^= bit;
                    mutants.push(m);
                }
            }
            for m in mutants {
                if let Ok((h, len)) = Header::parse(&m) {
                    let mut out = Vec::new();
                    write(&mut out, &h, &m[len..]);
                    assert_eq!(out, m);
                    n += 1;
                }
            }
        }
        assert!(n > 100, "{n}");
    }
}
