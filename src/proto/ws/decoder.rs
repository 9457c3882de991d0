//! The streaming frame decoder: bytes in, [`Event`]s out, payloads unmasked in place.
//!
//! See the [module contract](super) for the call loop. Internally the decoder is a small state
//! machine over [`Phase`]: `ExpectHeader` → `DataPayload` | `ControlPayload` → `ExpectHeader`,
//! and `Closed` after a close frame. The phase is kept as a `Result`, so an error is sticky.

use super::frame::{
    FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, header_len_from_second_byte,
};
use super::mask::apply_mask;
use super::utf8::Utf8Validator;
use super::{CloseCode, Role, WsError, WsLimits};

/// The type of a data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataKind {
    /// UTF-8 text (validated by the decoder across the whole message).
    Text,
    /// Arbitrary bytes.
    Binary,
}

/// The body of a close frame that carried a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    /// A code for which [`CloseCode::is_valid_wire_code`] holds.
    pub code: u16,
    /// The UTF-8 reason (≤ 123 bytes, possibly empty).
    pub reason: &'a str,
}

impl<'a> CloseFrame<'a> {
    /// Parses a close payload (already unmasked): `Ok(None)` if empty, otherwise a valid code
    /// and a UTF-8 reason. Errors: [`WsError::CloseTooShort`] (1 byte),
    /// [`WsError::InvalidCloseCode`], [`WsError::InvalidCloseReason`].
    pub fn parse(payload: &'a [u8]) -> Result<Option<Self>, WsError> {
        match payload {
            [] => Ok(None),
            [_] => Err(WsError::CloseTooShort),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !CloseCode::is_valid_wire_code(code) {
                    return Err(WsError::InvalidCloseCode { code });
                }
                let reason =
                    std::str::from_utf8(reason).map_err(|_| WsError::InvalidCloseReason)?;
                Ok(Some(Self { code, reason }))
            }
        }
    }
}

/// What one [`Decoder::decode`] call produced. Borrows the input slice or the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A piece of a data message, unmasked.
    ///
    /// Pieces arrive in order; `first` is set on the first piece of a message and `last` on the
    /// final one (both on a message delivered in one piece). A piece may be empty only when it
    /// carries `last` (an empty message, or an empty final frame). Text pieces may end in the
    /// middle of a UTF-8 code point; the message as a whole is valid UTF-8 once `last` arrives.
    Data {
        /// Text or binary; the same for every piece of a message.
        kind: DataKind,
        /// This piece's bytes.
        payload: &'a [u8],
        /// This piece starts a message.
        first: bool,
        /// The message is complete after this piece.
        last: bool,
    },
    /// A ping with its (≤ 125-byte) payload; the caller should answer with a pong.
    Ping(&'a [u8]),
    /// A pong with its (≤ 125-byte) payload.
    Pong(&'a [u8]),
    /// A close frame, with its code and reason if it had any. The decoder is now closed.
    Close(Option<CloseFrame<'a>>),
}

/// Where the decoder is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Expecting a frame header; `scratch[..scratch_len]` holds the part received so far.
    ExpectHeader,
    /// Inside the payload of a data frame belonging to a message of this kind.
    DataPayload(DataKind),
    /// Inside a control frame's payload; `scratch[..scratch_len]` holds the part received.
    ControlPayload(Control),
    /// A close frame was received; further input is discarded.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Close,
    Ping,
    Pong,
}

impl Control {
    /// The phase after this control frame's payload: nothing follows a close frame.
    fn next_phase(self) -> Phase {
        match self {
            Self::Close => Phase::Closed,
            Self::Ping | Self::Pong => Phase::ExpectHeader,
        }
    }
}

/// Streaming RFC 6455 decoder for one connection. See the [module contract](super).
///
/// Small by design, since every idle connection holds one: it stores no message data, only
/// the current frame's cursor, the message's UTF-8 carry (≤ 3 bytes) and one 125-byte scratch
/// buffer shared by a split frame header and a split control payload (never needed at the same
/// time). `size_of::<Decoder>()` is ≤ [`Decoder::MAX_SIZE`] (tested).
#[derive(Debug, Clone)]
pub struct Decoder {
    state: Result<Phase, WsError>,
    role: Role,
    limits: WsLimits,
    /// FIN of the current frame.
    fin: bool,
    /// Masking key of the current frame.
    mask: Option<[u8; 4]>,
    /// Payload position of the current frame, modulo 4 (the masking key phase).
    mask_phase: u8,
    /// Payload bytes of the current frame not yet consumed.
    remaining: u64,
    /// Kind of the fragmented message in progress, if any.
    message: Option<DataKind>,
    /// The next data event is the first of its message.
    first_pending: bool,
    /// Payload bytes of the message in progress, including the current frame.
    message_len: u64,
    utf8: Utf8Validator,
    scratch_len: u8,
    scratch: [u8; MAX_CONTROL_PAYLOAD],
}

const _: () = assert!(MAX_HEADER_LEN <= MAX_CONTROL_PAYLOAD);

impl Decoder {
    /// Upper bound on `size_of::<Decoder>()` on 64-bit targets, checked by a unit test. The
    /// 125-byte control scratch buffer is most of it.
    pub const MAX_SIZE: usize = 192;

    /// A decoder for the given role, at the start of a connection's frame stream.
    pub fn new(role: Role, limits: WsLimits) -> Self {
        Self {
            state: Ok(Phase::ExpectHeader),
            role,
            limits,
            fin: false,
            mask: None,
            mask_phase: 0,
            remaining: 0,
            message: None,
            first_pending: false,
            message_len: 0,
            utf8: Utf8Validator::default(),
            scratch_len: 0,
            scratch: [0; MAX_CONTROL_PAYLOAD],
        }
    }

    /// This decoder's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// This decoder's limits.
    pub fn limits(&self) -> WsLimits {
        self.limits
    }

    /// The error the decoder failed with, if it did.
    pub fn error(&self) -> Option<WsError> {
        self.state.err()
    }

    /// Whether a close frame has been received (further input is discarded).
    pub fn is_closed(&self) -> bool {
        self.state == Ok(Phase::Closed)
    }

    /// Whether a data message has started and not yet ended.
    pub fn in_message(&self) -> bool {
        self.message.is_some()
    }

    /// Decodes from `input`, returning the number of bytes consumed and at most one event.
    ///
    /// Unmasks data payloads in place in `input`. Call again with the unconsumed rest (and any
    /// newly received bytes) until it returns `(0, None)`: then all of `input` has been consumed
    /// and the decoder needs more bytes. Returns the same error on every call after a failure.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a mut [u8],
    ) -> Result<(usize, Option<Event<'a>>), WsError> {
        let mut pos = 0;
        loop {
            match self.state? {
                Phase::Closed => return Ok((input.len(), None)),
                Phase::ExpectHeader => {
                    if pos == input.len() {
                        return Ok((pos, None));
                    }
                    match self.read_header(&input[pos..]) {
                        Ok(Some((header, used))) => {
                            pos += used;
                            if let Err(e) = self.start_frame(header) {
                                return Err(self.fail(e));
                            }
                        }
                        Ok(None) => return Ok((input.len(), None)),
                        Err(e) => return Err(self.fail(e)),
                    }
                }
                Phase::DataPayload(kind) => {
                    let avail = input.len() - pos;
                    let n = usize::try_from(self.remaining).map_or(avail, |r| r.min(avail));
                    if n == 0 && self.remaining > 0 {
                        return Ok((pos, None));
                    }
                    let start = pos;
                    pos += n;
                    if let Some(key) = self.mask {
                        apply_mask(&mut input[start..pos], key, usize::from(self.mask_phase));
                        self.mask_phase = ((usize::from(self.mask_phase) + n) % 4) as u8;
                    }
                    self.remaining -= n as u64;
                    let frame_done = self.remaining == 0;
                    let last = frame_done && self.fin;
                    if frame_done {
                        self.state = Ok(Phase::ExpectHeader);
                    }
                    if n == 0 && !last {
                        // An empty non-final frame: nothing to report.
                        continue;
                    }
                    if kind == DataKind::Text {
                        let valid = self.utf8.feed(&input[start..pos]).is_ok()
                            && (!last || self.utf8.finish().is_ok());
                        if !valid {
                            return Err(self.fail(WsError::InvalidUtf8));
                        }
                    }
                    let first = std::mem::take(&mut self.first_pending);
                    if last {
                        self.message = None;
                        self.message_len = 0;
                    }
                    let payload = &input[start..pos];
                    return Ok((
                        pos,
                        Some(Event::Data {
                            kind,
                            payload,
                            first,
                            last,
                        }),
                    ));
                }
                Phase::ControlPayload(control) => {
                    let avail = input.len() - pos;
                    let need = self.remaining as usize; // ≤ 125, checked by the header parser
                    let have = usize::from(self.scratch_len);
                    if have == 0 && avail >= need {
                        // The whole payload is here: unmask it in place, no copy.
                        let start = pos;
                        pos += need;
                        self.remaining = 0;
                        if let Some(key) = self.mask {
                            apply_mask(&mut input[start..pos], key, 0);
                        }
                        self.state = Ok(control.next_phase());
                        return match control_event(control, &input[start..pos]) {
                            Ok(event) => Ok((pos, Some(event))),
                            Err(e) => Err(self.fail(e)),
                        };
                    }
                    let take = need.min(avail);
                    self.scratch[have..have + take].copy_from_slice(&input[pos..pos + take]);
                    self.scratch_len = (have + take) as u8;
                    pos += take;
                    self.remaining -= take as u64;
                    if self.remaining > 0 {
                        return Ok((pos, None));
                    }
                    let len = have + take;
                    self.scratch_len = 0;
                    if let Some(key) = self.mask {
                        apply_mask(&mut self.scratch[..len], key, 0);
                    }
                    self.state = Ok(control.next_phase());
                    // Not `self.fail`: the event may borrow `self.scratch`.
                    return match control_event(control, &self.scratch[..len]) {
                        Ok(event) => Ok((pos, Some(event))),
                        Err(e) => {
                            self.state = Err(e);
                            Err(e)
                        }
                    };
                }
            }
        }
    }

    /// Records a fatal error and returns it.
    fn fail(&mut self, e: WsError) -> WsError {
        self.state = Err(e);
        e
    }

    /// Parses a header from `rest` (non-empty), continuing a stashed partial header if any.
    ///
    /// `Ok(Some((header, used)))` with the number of bytes of `rest` used, or `Ok(None)` when
    /// all of `rest` went into the stash and the header is still incomplete.
    fn read_header(&mut self, rest: &[u8]) -> Result<Option<(FrameHeader, usize)>, WsError> {
        if self.scratch_len == 0 {
            // Fast path: parse straight from the input.
            if let Some(parsed) = FrameHeader::parse(rest)? {
                return Ok(Some(parsed));
            }
            // `parse` only wants more when `rest` is shorter than a header (≤ 14 bytes).
            self.scratch[..rest.len()].copy_from_slice(rest);
            self.scratch_len = rest.len() as u8;
            return Ok(None);
        }
        let mut used = 0;
        loop {
            let have = usize::from(self.scratch_len);
            let need = if have < 2 {
                2
            } else {
                header_len_from_second_byte(self.scratch[1])
            };
            let take = (need - have).min(rest.len() - used);
            self.scratch[have..have + take].copy_from_slice(&rest[used..used + take]);
            self.scratch_len = (have + take) as u8;
            used += take;
            if let Some((header, len)) = FrameHeader::parse(&self.scratch[..have + take])? {
                debug_assert_eq!(len, have + take);
                self.scratch_len = 0;
                return Ok(Some((header, used)));
            }
            if used == rest.len() {
                return Ok(None);
            }
        }
    }

    /// Applies the stateful rules to a parsed header and enters its payload phase.
    fn start_frame(&mut self, header: FrameHeader) -> Result<(), WsError> {
        match (self.role, header.mask) {
            (Role::Server, None) => return Err(WsError::UnmaskedFrame),
            (Role::Client, Some(_)) => return Err(WsError::MaskedFrame),
            _ => {}
        }
        self.fin = header.fin;
        self.mask = header.mask;
        self.mask_phase = 0;
        self.remaining = header.payload_len;
        let new_message = match header.opcode {
            OpCode::Text => Some(DataKind::Text),
            OpCode::Binary => Some(DataKind::Binary),
            OpCode::Continuation => None,
            OpCode::Close | OpCode::Ping | OpCode::Pong => {
                let control = match header.opcode {
                    OpCode::Close => Control::Close,
                    OpCode::Ping => Control::Ping,
                    _ => Control::Pong,
                };
                self.state = Ok(Phase::ControlPayload(control));
                return Ok(());
            }
        };
        let kind = match (new_message, self.message) {
            (None, None) => return Err(WsError::UnexpectedContinuation),
            (Some(_), Some(_)) => return Err(WsError::ExpectedContinuation),
            (None, Some(kind)) | (Some(kind), None) => kind,
        };
        if header.payload_len > self.limits.max_frame_size as u64 {
            return Err(WsError::FrameTooLarge);
        }
        let before = if new_message.is_some() {
            0
        } else {
            self.message_len
        };
        let message_len = before.saturating_add(header.payload_len);
        if message_len > self.limits.max_message_size as u64 {
            return Err(WsError::MessageTooLarge);
        }
        if new_message.is_some() {
            self.message = Some(kind);
            self.first_pending = true;
            self.utf8 = Utf8Validator::default();
        }
        self.message_len = message_len;
        self.state = Ok(Phase::DataPayload(kind));
        Ok(())
    }
}

/// The event for a complete (unmasked) control payload.
fn control_event(control: Control, payload: &[u8]) -> Result<Event<'_>, WsError> {
    Ok(match control {
        Control::Ping => Event::Ping(payload),
        Control::Pong => Event::Pong(payload),
        Control::Close => Event::Close(CloseFrame::parse(payload)?),
    })
}
