//! RFC 6455 §5.2 frame header: [`OpCode`], [`FrameHeader`] parse/encode, and [`CloseCode`].
//!
//! The parser checks every rule that needs no connection state (RSV bits, reserved opcodes,
//! control-frame length and FIN, the 64-bit length's top bit). Rules that depend on the role or
//! on the message in progress (masking, continuation order, size limits) live in the decoder.

use super::WsError;

/// The longest possible frame header: 2 fixed bytes, an 8-byte extended length and a 4-byte
/// masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// The largest payload a control frame (close, ping, pong) may carry (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Frame opcode (RFC 6455 §5.2). Reserved opcodes (3–7, 0xB–0xF) have no variant: the parser
/// rejects them with [`WsError::ReservedOpcode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// Continues a fragmented text or binary message.
    Continuation = 0x0,
    /// First frame of a text message.
    Text = 0x1,
    /// First frame of a binary message.
    Binary = 0x2,
    /// Connection close (control).
    Close = 0x8,
    /// Ping (control).
    Ping = 0x9,
    /// Pong (control).
    Pong = 0xA,
}

impl OpCode {
    /// The opcode for a 4-bit wire value, `None` if it is reserved.
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0x0 => Some(Self::Continuation),
            0x1 => Some(Self::Text),
            0x2 => Some(Self::Binary),
            0x8 => Some(Self::Close),
            0x9 => Some(Self::Ping),
            0xA => Some(Self::Pong),
            _ => None,
        }
    }

    /// Close, ping and pong are control frames: ≤ 125 bytes, never fragmented.
    pub const fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Close status codes (RFC 6455 §7.4.1) that fleetgate uses, and the wire validity rule.
///
/// A namespace, not a value type: codes are plain `u16` everywhere (as in
/// [`CloseFrame::code`](super::CloseFrame::code)), so they compare and log without conversion.
pub enum CloseCode {}

impl CloseCode {
    /// 1000: the purpose of the connection has been fulfilled.
    pub const NORMAL: u16 = 1000;
    /// 1001: the endpoint is going away (shutdown, navigation).
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: the peer violated the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1003: a data type the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// 1007: message data inconsistent with its type (invalid UTF-8 in text).
    pub const INVALID_DATA: u16 = 1007;
    /// 1008: a message violated the endpoint's policy.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// 1009: a frame or message is too big to process.
    pub const TOO_BIG: u16 = 1009;
    /// 1011: an unexpected condition inside the endpoint.
    pub const INTERNAL_ERROR: u16 = 1011;

    /// Whether `code` may appear in a close frame on the wire: 1000–1003, 1007–1011 and
    /// 3000–4999. 1004 (reserved), 1005/1006/1015 (must never be sent) and every other code
    /// below 3000 — including 1012–1014, registered with IANA after RFC 6455 — are invalid
    /// and get a 1002 from the decoder.
    pub const fn is_valid_wire_code(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
    }
}

/// Free-function form of [`CloseCode::is_valid_wire_code`].
pub const fn is_valid_wire_code(code: u16) -> bool {
    CloseCode::is_valid_wire_code(code)
}

/// A parsed frame header. RSV bits are not represented: no extension is negotiated, so they are
/// always zero on a header that parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN: this is the last frame of its message (always true for control frames).
    pub fin: bool,
    /// The frame's opcode.
    pub opcode: OpCode,
    /// The masking key, if the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes (< 2^63).
    pub payload_len: u64,
}

impl FrameHeader {
    /// Parses a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` if `buf` holds only part of a header (nothing is consumed), or
    /// `Ok(Some((header, header_len)))`. Checks that need only the first byte run as soon as it
    /// is present, so a bad frame fails on its first byte. Errors: [`WsError::ReservedBits`],
    /// [`WsError::ReservedOpcode`], [`WsError::FragmentedControl`],
    /// [`WsError::ControlTooLong`], [`WsError::LengthTopBit`]. Non-minimal length encodings
    /// are accepted, as RFC 6455 allows.
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, WsError> {
        let Some(&b0) = buf.first() else {
            return Ok(None);
        };
        let rsv = (b0 >> 4) & 0x7;
        if rsv != 0 {
            return Err(WsError::ReservedBits { bits: rsv });
        }
        let opcode =
            OpCode::from_u8(b0 & 0xF).ok_or(WsError::ReservedOpcode { opcode: b0 & 0xF })?;
        let fin = b0 & 0x80 != 0;
        if opcode.is_control() && !fin {
            return Err(WsError::FragmentedControl);
        }
        let Some(&b1) = buf.get(1) else {
            return Ok(None);
        };
        let len7 = b1 & 0x7F;
        if opcode.is_control() && usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(WsError::ControlTooLong);
        }
        let masked = b1 & 0x80 != 0;
        let total = header_len_from_second_byte(b1);
        if buf.len() < total {
            return Ok(None);
        }
        let (payload_len, mut at) = match len7 {
            126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(WsError::LengthTopBit);
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            let key = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
            at += 4;
            Some(key)
        } else {
            None
        };
        debug_assert_eq!(at, total);
        Ok(Some((
            Self {
                fin,
                opcode,
                mask,
                payload_len,
            },
            total,
        )))
    }

    /// Writes the header into `out` and returns its length (2–14 bytes).
    ///
    /// Uses the minimal length encoding. `payload_len` must be below 2^63 (debug-asserted);
    /// control-frame rules are the caller's business (the `encode_*` helpers check them).
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        debug_assert!(
            self.payload_len >> 63 == 0,
            "payload length must be below 2^63"
        );
        out[0] = (u8::from(self.fin) << 7) | self.opcode as u8;
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut at = 2;
        match self.payload_len {
            len @ 0..=125 => out[1] = mask_bit | len as u8,
            len @ 126..=0xFFFF => {
                out[1] = mask_bit | 126;
                out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                at = 4;
            }
            len => {
                out[1] = mask_bit | 127;
                out[2..10].copy_from_slice(&len.to_be_bytes());
                at = 10;
            }
        }
        if let Some(key) = self.mask {
            out[at..at + 4].copy_from_slice(&key);
            at += 4;
        }
        at
    }
}

/// The full header length implied by the second header byte (MASK bit and 7-bit length).
pub(crate) const fn header_len_from_second_byte(b1: u8) -> usize {
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// The length of a header with the given payload length and masking, as
/// [`FrameHeader::encode`] would write it. Useful to reserve capacity.
pub const fn header_len(payload_len: u64, masked: bool) -> usize {
    let len = match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    };
    if masked { len + 4 } else { len }
}

/// Writes a frame header into `out`, returning its length. See [`FrameHeader::encode`].
///
/// Together with [`apply_mask`](super::apply_mask)'s `offset` this lets a caller stream a large
/// payload without copying it into one frame buffer.
pub fn encode_header(
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    payload_len: u64,
    out: &mut [u8; MAX_HEADER_LEN],
) -> usize {
    FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
    }
    .encode(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, len: u64) -> Vec<u8> {
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = encode_header(fin, opcode, mask, len, &mut out);
        assert_eq!(n, header_len(len, mask.is_some()));
        out[..n].to_vec()
    }

    #[test]
    fn opcode_round_trip_and_reserved() {
        for v in 0u8..16 {
            match OpCode::from_u8(v) {
                Some(op) => assert_eq!(op as u8, v),
                None => assert!(matches!(v, 3..=7 | 0xB..=0xF), "{v}"),
            }
        }
        assert!(OpCode::Close.is_control() && OpCode::Ping.is_control());
        assert!(OpCode::Pong.is_control());
        assert!(!OpCode::Text.is_control() && !OpCode::Continuation.is_control());
    }

    #[test]
    fn encodes_rfc_examples() {
        // RFC 6455 §5.7: unmasked "Hello" and masked "Hello".
        assert_eq!(enc(true, OpCode::Text, None, 5), [0x81, 0x05]);
        assert_eq!(
            enc(true, OpCode::Text, Some([0x37, 0xfa, 0x21, 0x3d]), 5),
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d]
        );
        // 256-byte binary uses 16-bit length; 64 KiB uses 64-bit length.
        assert_eq!(
            enc(true, OpCode::Binary, None, 256),
            [0x82, 0x7E, 0x01, 0x00]
        );
        assert_eq!(
            enc(true, OpCode::Binary, None, 65536),
            [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]
        );
        assert_eq!(enc(false, OpCode::Continuation, None, 0), [0x00, 0x00]);
    }

    #[test]
    fn parse_round_trips_all_length_classes() {
        for len in [
            0u64,
            1,
            125,
            126,
            127,
            0xFFFF,
            0x1_0000,
            1 << 40,
            (1 << 63) - 1,
        ] {
            for mask in [None, Some([1, 2, 3, 4])] {
                for (fin, op) in [(true, OpCode::Text), (false, OpCode::Binary)] {
                    let bytes = enc(fin, op, mask, len);
                    let (h, n) = FrameHeader::parse(&bytes).unwrap().unwrap();
                    assert_eq!(n, bytes.len());
                    assert_eq!(
                        h,
                        FrameHeader {
                            fin,
                            opcode: op,
                            mask,
                            payload_len: len
                        }
                    );
                    // Every strict prefix is "need more", never an error.
                    for cut in 0..bytes.len() {
                        assert_eq!(FrameHeader::parse(&bytes[..cut]).unwrap(), None, "{cut}");
                    }
                }
            }
        }
    }

    #[test]
    fn parse_accepts_non_minimal_lengths() {
        let (h, n) = FrameHeader::parse(&[0x82, 0x7E, 0x00, 0x05])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, n), (5, 4));
        let (h, n) = FrameHeader::parse(&[0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0, 7])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, n), (7, 10));
    }

    #[test]
    fn parse_rejects_context_free_violations() {
        for rsv in 1u8..8 {
            let b0 = 0x81 | (rsv << 4);
            assert_eq!(
                FrameHeader::parse(&[b0]),
                Err(WsError::ReservedBits { bits: rsv })
            );
        }
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                FrameHeader::parse(&[0x80 | op]),
                Err(WsError::ReservedOpcode { opcode: op })
            );
        }
        for op in [0x8u8, 0x9, 0xA] {
            assert_eq!(FrameHeader::parse(&[op]), Err(WsError::FragmentedControl));
            assert_eq!(
                FrameHeader::parse(&[0x80 | op, 126]),
                Err(WsError::ControlTooLong)
            );
            assert_eq!(
                FrameHeader::parse(&[0x80 | op, 127]),
                Err(WsError::ControlTooLong)
            );
            let (h, _) = FrameHeader::parse(&[0x80 | op, 125]).unwrap().unwrap();
            assert_eq!(h.payload_len, 125);
        }
        let top = [0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(FrameHeader::parse(&top), Err(WsError::LengthTopBit));
    }

    #[test]
    fn close_code_validity() {
        let valid: Vec<u16> = (0..=u16::MAX).filter(|&c| is_valid_wire_code(c)).collect();
        let expected: Vec<u16> = (1000..=1003)
            .chain(1007..=1011)
            .chain(3000..=4999)
            .collect();
        assert_eq!(valid, expected);
        for c in [1004, 1005, 1006, 1012, 1015, 999, 2999, 5000] {
            assert!(!is_valid_wire_code(c), "{c}");
        }
    }
}
