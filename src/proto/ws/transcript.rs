//! Test and fuzzing support: drive a [`Decoder`] like a connection would and record what it
//! produced as owned values, checking the event-stream invariants on the way.
//!
//! Compiled only for tests and with the `fuzzing` feature. Any broken invariant panics, so the
//! fuzzer reports it:
//! * `first` is set exactly on the first piece of each message, `last` exactly on the final one;
//!   every piece of a message has the same kind; only a `last` piece may be empty;
//! * every completed text message is valid UTF-8;
//! * the decoder consumes all input it is given (the caller never has to keep bytes);
//! * after an error, the decoder returns the same error again.

use super::{DataKind, Decoder, Event, Role, WsError, WsLimits};

/// One completed decoder output, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A whole data message, reassembled from its pieces.
    Message {
        /// Text or binary.
        kind: DataKind,
        /// The unmasked payload.
        data: Vec<u8>,
    },
    /// A ping payload.
    Ping(Vec<u8>),
    /// A pong payload.
    Pong(Vec<u8>),
    /// A close frame's code and reason.
    Close(Option<(u16, String)>),
}

/// Everything a decoder produced for one byte stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transcript {
    /// Completed messages and control frames, in order.
    pub items: Vec<Item>,
    /// The message in progress when the input ended (or failed), if any.
    pub partial: Option<(DataKind, Vec<u8>)>,
    /// The error the decoder failed with, if it did.
    pub error: Option<WsError>,
    /// Number of data events (pieces) delivered.
    pub pieces: usize,
}

impl Transcript {
    /// Decodes `bytes` delivered in chunks of `chunk` bytes (0 = all at once).
    pub fn decode(role: Role, limits: WsLimits, bytes: &[u8], chunk: usize) -> Self {
        let chunk = if chunk == 0 {
            bytes.len().max(1)
        } else {
            chunk
        };
        let mut decoder = Decoder::new(role, limits);
        let mut transcript = Self::default();
        let mut pending: Vec<u8> = Vec::new();
        for piece in bytes.chunks(chunk) {
            pending.extend_from_slice(piece);
            if let Err(e) = transcript.drain(&mut decoder, &mut pending) {
                transcript.error = Some(e);
                let mut more = bytes.to_vec();
                assert_eq!(
                    decoder.decode(&mut more).map(|_| ()),
                    Err(e),
                    "error is sticky"
                );
                assert_eq!(decoder.error(), Some(e));
                break;
            }
            assert!(
                pending.is_empty(),
                "decoder left {} bytes unconsumed",
                pending.len()
            );
        }
        transcript
    }

    /// Runs the decode loop on `pending` until the decoder needs more input.
    fn drain(&mut self, decoder: &mut Decoder, pending: &mut Vec<u8>) -> Result<(), WsError> {
        loop {
            let (consumed, event) = decoder.decode(pending)?;
            let progressed = consumed > 0 || event.is_some();
            if let Some(event) = event {
                self.record(event);
            }
            pending.drain(..consumed);
            if !progressed {
                return Ok(());
            }
        }
    }

    fn record(&mut self, event: Event<'_>) {
        match event {
            Event::Data {
                kind,
                payload,
                first,
                last,
            } => {
                self.pieces += 1;
                assert!(!payload.is_empty() || last, "empty piece without last");
                match (&mut self.partial, first) {
                    (None, true) => self.partial = Some((kind, payload.to_vec())),
                    (Some((k, data)), false) => {
                        assert_eq!(*k, kind, "kind changed inside a message");
                        data.extend_from_slice(payload);
                    }
                    (None, false) => panic!("piece without first outside a message"),
                    (Some(_), true) => panic!("first inside a message"),
                }
                if last {
                    let (kind, data) = self.partial.take().expect("message in progress");
                    if kind == DataKind::Text {
                        assert!(
                            std::str::from_utf8(&data).is_ok(),
                            "completed text is not UTF-8"
                        );
                    }
                    self.items.push(Item::Message { kind, data });
                }
            }
            Event::Ping(p) => self.items.push(Item::Ping(p.to_vec())),
            Event::Pong(p) => self.items.push(Item::Pong(p.to_vec())),
            Event::Close(c) => {
                self.items
                    .push(Item::Close(c.map(|c| (c.code, c.reason.to_owned()))));
            }
        }
    }

    /// Decodes `bytes` whole and in chunks of 1, 2, 3, 5, 7, 13, 64 and 1000 bytes, asserts all
    /// runs agree on the completed items and the error, and returns the whole-input transcript.
    pub fn decode_every_way(role: Role, limits: WsLimits, bytes: &[u8]) -> Self {
        let whole = Self::decode(role, limits, bytes, 0);
        for chunk in [1, 2, 3, 5, 7, 13, 64, 1000] {
            let split = Self::decode(role, limits, bytes, chunk);
            assert_eq!(split.items, whole.items, "chunk {chunk}");
            assert_eq!(split.error, whole.error, "chunk {chunk}");
            if whole.error.is_none() {
                assert_eq!(split.partial, whole.partial, "chunk {chunk}");
            }
        }
        whole
    }
}
