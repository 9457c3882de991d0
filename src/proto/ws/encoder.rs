//! Frame encoding: whole frames appended to a caller's `Vec<u8>`.
//!
//! Server role: pass `mask: None`. Client role: pass a fresh 4-byte key per frame, drawn by the
//! caller (RFC 6455 §5.3 wants it unpredictable; this module has no RNG). The payload is copied
//! and masked in the output, never in the caller's buffer. To stream a large payload without
//! copying it into one buffer, use [`encode_header`](super::encode_header) and
//! [`apply_mask`](super::apply_mask) with its `offset` instead.
//!
//! Control-frame rules are checked, not debug-asserted: a control payload above 125 bytes, a
//! control frame without FIN or an invalid close code is [local misuse](super::WsError) and
//! writes nothing.

use super::frame::{MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, encode_header};
use super::mask::apply_mask;
use super::{CloseCode, WsError};

/// Appends one frame. Fails (writing nothing) only for a control opcode whose payload is above
/// 125 bytes ([`WsError::ControlPayloadTooLong`]) or without `fin`
/// ([`WsError::FragmentedControlSend`]). Data frames cannot fail.
///
/// For a fragmented message send `Text`/`Binary` with `fin = false`, then `Continuation`
/// frames, the last with `fin = true`. The caller keeps text fragments valid UTF-8 as a whole.
pub fn encode_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) -> Result<(), WsError> {
    if opcode.is_control() {
        if !fin {
            return Err(WsError::FragmentedControlSend);
        }
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(WsError::ControlPayloadTooLong);
        }
    }
    push_frame(out, fin, opcode, mask, &[payload]);
    Ok(())
}

/// Appends a single-frame text message.
pub fn encode_text(out: &mut Vec<u8>, text: &str, mask: Option<[u8; 4]>) {
    push_frame(out, true, OpCode::Text, mask, &[text.as_bytes()]);
}

/// Appends a single-frame binary message.
pub fn encode_binary(out: &mut Vec<u8>, data: &[u8], mask: Option<[u8; 4]>) {
    push_frame(out, true, OpCode::Binary, mask, &[data]);
}

/// Appends a ping. Fails if `payload` is above 125 bytes.
pub fn encode_ping(
    out: &mut Vec<u8>,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Result<(), WsError> {
    encode_frame(out, true, OpCode::Ping, mask, payload)
}

/// Appends a pong (echo the ping's payload). Fails if `payload` is above 125 bytes.
pub fn encode_pong(
    out: &mut Vec<u8>,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Result<(), WsError> {
    encode_frame(out, true, OpCode::Pong, mask, payload)
}

/// Appends a close frame: empty for `None`, else the code and UTF-8 reason.
///
/// Fails for a code that may not be sent ([`WsError::InvalidCloseCodeSend`], see
/// [`CloseCode::is_valid_wire_code`]) or a reason above 123 bytes
/// ([`WsError::ControlPayloadTooLong`]).
pub fn encode_close(
    out: &mut Vec<u8>,
    close: Option<(u16, &str)>,
    mask: Option<[u8; 4]>,
) -> Result<(), WsError> {
    let Some((code, reason)) = close else {
        push_frame(out, true, OpCode::Close, mask, &[]);
        return Ok(());
    };
    if !CloseCode::is_valid_wire_code(code) {
        return Err(WsError::InvalidCloseCodeSend { code });
    }
    if 2 + reason.len() > MAX_CONTROL_PAYLOAD {
        return Err(WsError::ControlPayloadTooLong);
    }
    push_frame(
        out,
        true,
        OpCode::Close,
        mask,
        &[&code.to_be_bytes(), reason.as_bytes()],
    );
    Ok(())
}

/// Appends header + the concatenation of `parts`, masked if `mask` is set. No checks.
fn push_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    parts: &[&[u8]],
) {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    let mut header = [0u8; MAX_HEADER_LEN];
    let header_len = encode_header(fin, opcode, mask, len as u64, &mut header);
    out.reserve(header_len + len);
    out.extend_from_slice(&header[..header_len]);
    let start = out.len();
    for part in parts {
        out.extend_from_slice(part);
    }
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_examples() {
        let mut out = Vec::new();
        encode_text(&mut out, "Hello", None);
        assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        encode_text(&mut out, "Hello", Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(
            out,
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        out.clear();
        encode_ping(&mut out, b"Hello", None).unwrap();
        assert_eq!(out, [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        encode_frame(&mut out, false, OpCode::Text, None, b"Hel").unwrap();
        encode_frame(&mut out, true, OpCode::Continuation, None, b"lo").unwrap();
        assert_eq!(out, [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f]);
    }

    #[test]
    fn appends_without_touching_existing_bytes() {
        let mut out = vec![0xAA, 0xBB];
        encode_binary(&mut out, &[1, 2, 3], Some([9, 9, 9, 9]));
        assert_eq!(
            out,
            [0xAA, 0xBB, 0x82, 0x83, 9, 9, 9, 9, 1 ^ 9, 2 ^ 9, 3 ^ 9]
        );
    }

    #[test]
    fn close_frames() {
        let mut out = Vec::new();
        encode_close(&mut out, None, None).unwrap();
        assert_eq!(out, [0x88, 0x00]);
        out.clear();
        encode_close(&mut out, Some((1000, "bye")), None).unwrap();
        assert_eq!(out, [0x88, 0x05, 0x03, 0xE8, b'b', b'y', b'e']);
        out.clear();
        let longest = "x".repeat(123);
        encode_close(&mut out, Some((4999, &longest)), Some([1, 2, 3, 4])).unwrap();
        assert_eq!(out.len(), 2 + 4 + 125);
    }

    #[test]
    fn rejects_local_misuse_without_writing() {
        let mut out = Vec::new();
        let big = [0u8; 126];
        assert_eq!(
            encode_ping(&mut out, &big, None),
            Err(WsError::ControlPayloadTooLong)
        );
        assert_eq!(
            encode_pong(&mut out, &big, None),
            Err(WsError::ControlPayloadTooLong)
        );
        assert_eq!(
            encode_frame(&mut out, false, OpCode::Ping, None, b""),
            Err(WsError::FragmentedControlSend)
        );
        assert_eq!(
            encode_close(&mut out, Some((1000, &"x".repeat(124))), None),
            Err(WsError::ControlPayloadTooLong)
        );
        for code in [1005, 1006, 1015, 999, 5000] {
            assert_eq!(
                encode_close(&mut out, Some((code, "")), None),
                Err(WsError::InvalidCloseCodeSend { code })
            );
        }
        assert!(out.is_empty());
        // 125 bytes is fine; data frames have no such limit.
        encode_ping(&mut out, &big[..125], None).unwrap();
        encode_frame(&mut out, false, OpCode::Binary, None, &big).unwrap();
    }
}
