//! Sans-IO RFC 6455 WebSocket frame codec, for both the server and the client role.
//!
//! # Contract
//!
//! * **Decoding** ([`Decoder`]): hand the decoder the bytes you have, as a mutable slice, and
//!   call [`Decoder::decode`] in a loop; each call returns how many bytes it consumed and at
//!   most one [`Event`]. Drop the consumed prefix, keep the rest, and call again until a call
//!   returns `(0, None)` — then all input has been consumed and it needs more bytes. The
//!   decoder stashes a partial frame header (≤ 14 bytes) and a split control payload
//!   (≤ 125 bytes) inside itself, so the caller never keeps bytes between reads: every received
//!   buffer can be recycled as soon as the loop ends.
//!
//!   ```
//!   # use fleetgate::proto::ws::{Decoder, Event, Role, WsLimits, WsError};
//!   fn on_bytes(decoder: &mut Decoder, mut buf: &mut [u8]) -> Result<(), WsError> {
//!       loop {
//!           let (consumed, event) = decoder.decode(buf)?;
//!           match event {
//!               Some(Event::Data { kind, payload, first, last }) => { /* relay the piece */ }
//!               Some(Event::Ping(payload)) => { /* queue a pong with `payload` */ }
//!               Some(Event::Pong(_)) => {}
//!               Some(Event::Close(close)) => { /* reply with a close frame, then stop */ }
//!               None if consumed == 0 => return Ok(()),
//!               None => {}
//!           }
//!           buf = &mut buf[consumed..];
//!       }
//!   }
//!   # let mut d = Decoder::new(Role::Server, WsLimits::default());
//!   # on_bytes(&mut d, &mut [0x81, 0x80, 1, 2, 3, 4]).unwrap();
//!   ```
//! * **What is borrowed**: data payloads are unmasked *in place* in the input slice and an
//!   [`Event::Data`] borrows that slice; control payloads borrow either the input or the
//!   decoder's inline buffer. Either way the event must be dropped before the next call.
//! * **Streaming, no reassembly**: a message is delivered piece by piece as its bytes arrive
//!   (`first` on the first piece, `last` on the final one, each exactly once per message). The
//!   decoder never buffers a message, so memory per connection does not grow with message size.
//!   Text pieces may split a UTF-8 code point; the message as a whole is validated.
//! * **Encoding** ([`encode_frame`] and friends) appends whole frames to a caller `Vec<u8>`;
//!   [`encode_header`] + [`apply_mask`] (with its `offset`) let a caller stream a large payload.
//!   Client-role masking keys are supplied by the caller: nothing here draws randomness.
//! * **Errors** ([`WsError`]): after an error the decoder keeps returning it. The caller sends a
//!   close frame with [`WsError::close_code`] and closes the connection.
//! * **Close**: after an [`Event::Close`] the decoder discards any further input (RFC 6455
//!   §5.5.1: nothing may follow a close frame); replying with a close frame is the caller's job.
//!
//! # Limits
//!
//! [`WsLimits`]: `max_frame_size` and `max_message_size` (payload bytes), checked against the
//! frame header before any payload is delivered; exceeding either is close code 1009.
//! Control frames are ≤ 125 bytes by the RFC.
//!
//! # Non-goals
//!
//! No permessage-deflate and no other extensions: every RSV bit must be 0. No subprotocol
//! logic, no handshake (that is [`crate::proto::http`]), no keep-alive timers (the caller owns
//! the clock), and no message reassembly.

#[cfg(test)]
mod codec_tests;
mod decoder;
mod encoder;
mod frame;
mod mask;
mod utf8;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod transcript;

pub use decoder::{CloseFrame, DataKind, Decoder, Event};
pub use encoder::{
    encode_binary, encode_close, encode_frame, encode_ping, encode_pong, encode_text,
};
pub use frame::{
    CloseCode, FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, encode_header, header_len,
    is_valid_wire_code,
};
pub use mask::{apply_mask, apply_mask_naive};

/// Which end of the connection this codec is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Accepted the connection: expects masked frames from the peer, sends unmasked ones.
    Server,
    /// Opened the connection: expects unmasked frames from the peer, sends masked ones.
    Client,
}

/// Size limits enforced by the [`Decoder`], in payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLimits {
    /// Largest accepted frame payload. Default 16 MiB: Autobahn case 9 sends 16 MiB messages in
    /// single frames, and the decoder streams frame payloads, so the bound costs no memory.
    pub max_frame_size: usize,
    /// Largest accepted message (sum of its frames' payloads). Default 64 MiB: above the 16 MiB
    /// Autobahn case 9 needs; the relay streams messages through, so memory is not tied to this
    /// number — it bounds how long one message may monopolise a stream.
    pub max_message_size: usize,
}

impl Default for WsLimits {
    fn default() -> Self {
        Self {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
        }
    }
}

/// Errors of the WebSocket codec.
///
/// Every variant except the *local misuse* ones is a **peer fault**: the peer sent something
/// RFC 6455 (or our limits) forbid. All decoder errors are fatal for the connection: the
/// decoder keeps returning the error, and the caller should send a close frame with
/// [`close_code`](Self::close_code) and stop reading. Local-misuse variants come only from the
/// encoder, write nothing, and leave the connection usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// Peer fault (1002): an RSV bit is set, but no extension was negotiated.
    #[error("reserved bits {bits:#05b} set without a negotiated extension")]
    ReservedBits {
        /// RSV1..RSV3 as a 3-bit value.
        bits: u8,
    },
    /// Peer fault (1002): opcode 3–7 or 0xB–0xF.
    #[error("reserved opcode {opcode:#x}")]
    ReservedOpcode {
        /// The 4-bit opcode.
        opcode: u8,
    },
    /// Peer fault (1002): a control frame without FIN.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// Peer fault (1002): a control frame with more than 125 payload bytes.
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    /// Peer fault (1002): a 64-bit payload length with the most significant bit set.
    #[error("64-bit payload length with the top bit set")]
    LengthTopBit,
    /// Peer fault (1002): a client sent an unmasked frame to us (server role).
    #[error("unmasked frame from a client")]
    UnmaskedFrame,
    /// Peer fault (1002): a server sent a masked frame to us (client role).
    #[error("masked frame from a server")]
    MaskedFrame,
    /// Peer fault (1002): a continuation frame with no fragmented message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// Peer fault (1002): a new text/binary frame while a fragmented message is in progress.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// Peer fault (1009): a frame payload above [`WsLimits::max_frame_size`].
    #[error("frame larger than max_frame_size")]
    FrameTooLarge,
    /// Peer fault (1009): a message above [`WsLimits::max_message_size`].
    #[error("message larger than max_message_size")]
    MessageTooLarge,
    /// Peer fault (1007): a text message is not valid UTF-8.
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    /// Peer fault (1002): a close frame with a 1-byte payload.
    #[error("close frame payload of 1 byte")]
    CloseTooShort,
    /// Peer fault (1002): a close code that may not appear on the wire.
    #[error("invalid close code {code}")]
    InvalidCloseCode {
        /// The code received.
        code: u16,
    },
    /// Peer fault (1007): a close reason that is not valid UTF-8.
    #[error("invalid UTF-8 in a close reason")]
    InvalidCloseReason,
    /// Local misuse (encoder): a control payload above 125 bytes (for close: code + reason).
    #[error("control payload longer than 125 bytes (local misuse)")]
    ControlPayloadTooLong,
    /// Local misuse (encoder): a control frame without FIN.
    #[error("attempt to send a fragmented control frame (local misuse)")]
    FragmentedControlSend,
    /// Local misuse (encoder): a close code that may not be sent.
    #[error("attempt to send invalid close code {code} (local misuse)")]
    InvalidCloseCodeSend {
        /// The code the caller passed.
        code: u16,
    },
}

impl WsError {
    /// The close code to send to the peer for this error: 1002 protocol error, 1007 invalid
    /// data, 1009 too big; 1011 for local misuse (which normally never reaches the peer).
    pub const fn close_code(&self) -> u16 {
        match self {
            Self::ReservedBits { .. }
            | Self::ReservedOpcode { .. }
            | Self::FragmentedControl
            | Self::ControlTooLong
            | Self::LengthTopBit
            | Self::UnmaskedFrame
            | Self::MaskedFrame
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::CloseTooShort
            | Self::InvalidCloseCode { .. } => CloseCode::PROTOCOL_ERROR,
            Self::InvalidUtf8 | Self::InvalidCloseReason => CloseCode::INVALID_DATA,
            Self::FrameTooLarge | Self::MessageTooLarge => CloseCode::TOO_BIG,
            Self::ControlPayloadTooLong
            | Self::FragmentedControlSend
            | Self::InvalidCloseCodeSend { .. } => CloseCode::INTERNAL_ERROR,
        }
    }

    /// Whether the peer caused this error (every decoder error), as opposed to local misuse of
    /// the encoder.
    pub const fn is_peer_fault(&self) -> bool {
        !matches!(
            self,
            Self::ControlPayloadTooLong
                | Self::FragmentedControlSend
                | Self::InvalidCloseCodeSend { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_and_fault_sides() {
        assert_eq!(WsError::ReservedBits { bits: 4 }.close_code(), 1002);
        assert_eq!(WsError::UnmaskedFrame.close_code(), 1002);
        assert_eq!(WsError::InvalidUtf8.close_code(), 1007);
        assert_eq!(WsError::InvalidCloseReason.close_code(), 1007);
        assert_eq!(WsError::FrameTooLarge.close_code(), 1009);
        assert_eq!(WsError::MessageTooLarge.close_code(), 1009);
        assert!(WsError::InvalidCloseCode { code: 1005 }.is_peer_fault());
        assert!(!WsError::ControlPayloadTooLong.is_peer_fault());
        assert_eq!(WsError::ControlPayloadTooLong.close_code(), 1011);
        // Small enough to return by value on every decode call.
        assert!(size_of::<WsError>() <= 4, "{}", size_of::<WsError>());
    }

    #[test]
    fn default_limits() {
        let l = WsLimits::default();
        assert_eq!((l.max_frame_size, l.max_message_size), (16 << 20, 64 << 20));
    }
}
