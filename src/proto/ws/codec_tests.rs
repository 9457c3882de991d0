//! Decoder (and encoder round-trip) tests. Every byte stream is decoded whole and split into
//! chunks of 1, 2, 3, 5, 7, 13, 64 and 1000 bytes ([`Transcript::decode_every_way`]), so each
//! rule is also checked at every header and payload boundary.

use super::transcript::{Item, Transcript};
use super::*;

const KEY: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

/// A frame as a client sends it (masked).
fn cf(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    frame_with(fin, opcode, Some(KEY), payload)
}

/// A frame with an arbitrary header, bypassing the encoder's control-frame checks.
fn frame_with(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = encode_header(fin, opcode, mask, payload.len() as u64, &mut header);
    let mut out = header[..n].to_vec();
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
    out
}

fn cat(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.concat()
}

fn server(bytes: &[u8]) -> Transcript {
    Transcript::decode_every_way(Role::Server, WsLimits::default(), bytes)
}

fn server_err(bytes: &[u8]) -> WsError {
    server(bytes).error.expect("decoder should fail")
}

fn text(s: &str) -> Item {
    Item::Message {
        kind: DataKind::Text,
        data: s.as_bytes().to_vec(),
    }
}

fn binary(b: &[u8]) -> Item {
    Item::Message {
        kind: DataKind::Binary,
        data: b.to_vec(),
    }
}

/// Owned copy of an [`Event`], to compare exact event sequences.
#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Data(DataKind, Vec<u8>, bool, bool),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

/// The exact events for `bytes` given in one piece.
fn events(role: Role, bytes: &[u8]) -> Vec<Ev> {
    let mut decoder = Decoder::new(role, WsLimits::default());
    let mut buf = bytes.to_vec();
    let mut out = Vec::new();
    loop {
        let (n, event) = decoder.decode(&mut buf).expect("valid stream");
        let done = n == 0 && event.is_none();
        out.extend(event.map(|e| match e {
            Event::Data {
                kind,
                payload,
                first,
                last,
            } => Ev::Data(kind, payload.to_vec(), first, last),
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong(p) => Ev::Pong(p.to_vec()),
            Event::Close(c) => Ev::Close(c.map(|c| (c.code, c.reason.to_owned()))),
        }));
        buf.drain(..n);
        if done {
            assert!(buf.is_empty());
            return out;
        }
    }
}

#[test]
fn decoder_stays_small() {
    let size = size_of::<Decoder>();
    println!("size_of::<Decoder>() = {size}");
    assert!(
        size <= Decoder::MAX_SIZE,
        "Decoder is {size} bytes, bound {}",
        Decoder::MAX_SIZE
    );
}

#[test]
fn single_frame_messages() {
    let bytes = cat(&[
        cf(true, OpCode::Text, b"Hello"),
        cf(true, OpCode::Binary, &[0, 1, 2, 255]),
        cf(true, OpCode::Text, b""),
        cf(true, OpCode::Binary, b""),
    ]);
    let t = server(&bytes);
    assert_eq!(t.error, None);
    assert_eq!(
        t.items,
        [
            text("Hello"),
            binary(&[0, 1, 2, 255]),
            text(""),
            binary(b"")
        ]
    );
    assert_eq!(
        events(Role::Server, &bytes),
        [
            Ev::Data(DataKind::Text, b"Hello".to_vec(), true, true),
            Ev::Data(DataKind::Binary, vec![0, 1, 2, 255], true, true),
            Ev::Data(DataKind::Text, vec![], true, true),
            Ev::Data(DataKind::Binary, vec![], true, true),
        ]
    );
}

#[test]
fn one_call_per_frame_when_the_frame_is_all_there() {
    let mut buf = cf(true, OpCode::Binary, &[7; 300]);
    let len = buf.len();
    let mut decoder = Decoder::new(Role::Server, WsLimits::default());
    let (n, event) = decoder.decode(&mut buf).unwrap();
    assert_eq!(n, len);
    assert_eq!(
        event,
        Some(Event::Data {
            kind: DataKind::Binary,
            payload: &[7; 300],
            first: true,
            last: true
        })
    );
    assert_eq!(decoder.decode(&mut []).unwrap(), (0, None));
}

#[test]
fn payload_streams_piece_by_piece_without_buffering() {
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let frame = cf(true, OpCode::Binary, &payload);
    let mut decoder = Decoder::new(Role::Server, WsLimits::default());
    let mut got = Vec::new();
    let mut pieces = 0;
    for chunk in frame.chunks(1000) {
        let mut buf = chunk.to_vec();
        let mut at = 0;
        loop {
            let (n, event) = decoder.decode(&mut buf[at..]).unwrap();
            if let Some(Event::Data {
                payload,
                first,
                last,
                ..
            }) = event
            {
                assert_eq!(first, pieces == 0);
                assert_eq!(last, got.len() + payload.len() == 10_000);
                got.extend_from_slice(payload);
                pieces += 1;
            }
            at += n;
            if n == 0 {
                break;
            }
        }
        assert_eq!(at, buf.len(), "all input consumed");
    }
    assert_eq!(got, payload);
    assert_eq!(pieces, 11, "one piece per chunk");
}

#[test]
fn fragmented_message_with_interleaved_control_frames() {
    let bytes = cat(&[
        cf(false, OpCode::Text, b"Hel"),
        cf(true, OpCode::Ping, b"are you there"),
        cf(false, OpCode::Continuation, b"lo, "),
        cf(true, OpCode::Pong, b""),
        cf(true, OpCode::Continuation, b"world"),
        cf(false, OpCode::Binary, &[1]),
        cf(true, OpCode::Continuation, &[2, 3]),
    ]);
    let t = server(&bytes);
    assert_eq!(t.error, None);
    assert_eq!(
        t.items,
        [
            Item::Ping(b"are you there".to_vec()),
            Item::Pong(vec![]),
            text("Hello, world"),
            binary(&[1, 2, 3]),
        ]
    );
    assert_eq!(
        events(Role::Server, &bytes),
        [
            Ev::Data(DataKind::Text, b"Hel".to_vec(), true, false),
            Ev::Ping(b"are you there".to_vec()),
            Ev::Data(DataKind::Text, b"lo, ".to_vec(), false, false),
            Ev::Pong(vec![]),
            Ev::Data(DataKind::Text, b"world".to_vec(), false, true),
            Ev::Data(DataKind::Binary, vec![1], true, false),
            Ev::Data(DataKind::Binary, vec![2, 3], false, true),
        ]
    );
}

#[test]
fn empty_frames_deliver_first_and_last_exactly_once() {
    // Empty leading frames: `first` rides on the first non-empty piece.
    let bytes = cat(&[
        cf(false, OpCode::Text, b""),
        cf(false, OpCode::Continuation, b""),
        cf(true, OpCode::Continuation, b"abc"),
    ]);
    assert_eq!(
        events(Role::Server, &bytes),
        [Ev::Data(DataKind::Text, b"abc".to_vec(), true, true)]
    );
    // Empty final continuation: an empty piece carrying `last`.
    let bytes = cat(&[
        cf(false, OpCode::Binary, b"ab"),
        cf(true, OpCode::Continuation, b""),
    ]);
    assert_eq!(
        events(Role::Server, &bytes),
        [
            Ev::Data(DataKind::Binary, b"ab".to_vec(), true, false),
            Ev::Data(DataKind::Binary, vec![], false, true),
        ]
    );
    // Entirely empty fragmented message: one empty piece with both flags.
    let bytes = cat(&[
        cf(false, OpCode::Text, b""),
        cf(true, OpCode::Continuation, b""),
    ]);
    assert_eq!(
        events(Role::Server, &bytes),
        [Ev::Data(DataKind::Text, vec![], true, true)]
    );
    assert_eq!(server(&bytes).items, [text("")]);
}

#[test]
fn control_frames() {
    let max = [0x5A; 125];
    let bytes = cat(&[
        cf(true, OpCode::Ping, b""),
        cf(true, OpCode::Ping, &max),
        cf(true, OpCode::Pong, &max[..17]),
        cf(true, OpCode::Close, &[0x03, 0xE8, b'b', b'y', b'e']),
    ]);
    let t = server(&bytes);
    assert_eq!(t.error, None);
    assert_eq!(
        t.items,
        [
            Item::Ping(vec![]),
            Item::Ping(max.to_vec()),
            Item::Pong(max[..17].to_vec()),
            Item::Close(Some((1000, "bye".into()))),
        ]
    );
    assert_eq!(
        server(&cf(true, OpCode::Close, b"")).items,
        [Item::Close(None)]
    );
}

#[test]
fn close_payload_rules() {
    let close = |payload: &[u8]| server(&cf(true, OpCode::Close, payload));
    assert_eq!(close(&[0x03]).error, Some(WsError::CloseTooShort));
    for code in [
        0u16, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 2000, 2999, 5000, 65535,
    ] {
        assert_eq!(
            close(&code.to_be_bytes()).error,
            Some(WsError::InvalidCloseCode { code }),
            "{code}"
        );
    }
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        assert_eq!(
            close(&code.to_be_bytes()).items,
            [Item::Close(Some((code, String::new())))]
        );
    }
    let mut bad_reason = 1000u16.to_be_bytes().to_vec();
    bad_reason.extend_from_slice(&[b'o', b'k', 0xFF]);
    assert_eq!(close(&bad_reason).error, Some(WsError::InvalidCloseReason));
    let mut reason = 1001u16.to_be_bytes().to_vec();
    reason.extend_from_slice("κόσμε".as_bytes());
    assert_eq!(
        close(&reason).items,
        [Item::Close(Some((1001, "κόσμε".into())))]
    );
}

#[test]
fn input_after_close_is_discarded() {
    let bytes = cat(&[
        cf(true, OpCode::Close, b""),
        vec![0xFF; 20],
        cf(true, OpCode::Text, b"x"),
    ]);
    let t = server(&bytes);
    assert_eq!((t.items, t.error), (vec![Item::Close(None)], None));
    let mut decoder = Decoder::new(Role::Server, WsLimits::default());
    let mut buf = bytes.clone();
    let (n, event) = decoder.decode(&mut buf).unwrap();
    assert_eq!((n, event), (6, Some(Event::Close(None))));
    assert!(decoder.is_closed());
    assert_eq!(
        decoder.decode(&mut buf[6..]).unwrap(),
        (bytes.len() - 6, None)
    );
}

#[test]
fn protocol_errors() {
    let mut rsv = cf(true, OpCode::Text, b"x");
    rsv[0] |= 0x40;
    assert_eq!(server_err(&rsv), WsError::ReservedBits { bits: 4 });
    for op in [3u8, 7, 0xB, 0xF] {
        let mut f = cf(true, OpCode::Binary, b"x");
        f[0] = 0x80 | op;
        assert_eq!(server_err(&f), WsError::ReservedOpcode { opcode: op });
    }
    assert_eq!(
        server_err(&cf(true, OpCode::Continuation, b"x")),
        WsError::UnexpectedContinuation
    );
    assert_eq!(
        server_err(&cf(false, OpCode::Continuation, b"")),
        WsError::UnexpectedContinuation
    );
    let two_starts = cat(&[
        cf(false, OpCode::Text, b"a"),
        cf(true, OpCode::Binary, b"b"),
    ]);
    assert_eq!(server_err(&two_starts), WsError::ExpectedContinuation);
    let two_starts = cat(&[
        cf(false, OpCode::Binary, b"a"),
        cf(false, OpCode::Binary, b"b"),
    ]);
    assert_eq!(server_err(&two_starts), WsError::ExpectedContinuation);
    // A message that ended frees the way for a new one (and a stray continuation fails).
    let after_end = cat(&[
        cf(true, OpCode::Text, b"a"),
        cf(true, OpCode::Continuation, b"b"),
    ]);
    let t = server(&after_end);
    assert_eq!(
        (t.items, t.error),
        (vec![text("a")], Some(WsError::UnexpectedContinuation))
    );
    assert_eq!(
        server_err(&cf(false, OpCode::Ping, b"")),
        WsError::FragmentedControl
    );
    assert_eq!(
        server_err(&cf(false, OpCode::Close, b"")),
        WsError::FragmentedControl
    );
    assert_eq!(
        server_err(&cf(true, OpCode::Ping, &[0; 126])),
        WsError::ControlTooLong
    );
    assert_eq!(
        server_err(&cf(true, OpCode::Pong, &[0; 70_000])),
        WsError::ControlTooLong
    );
    let top_bit = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4];
    assert_eq!(server_err(&top_bit), WsError::LengthTopBit);
    // Masking per role.
    assert_eq!(
        server_err(&frame_with(true, OpCode::Text, None, b"x")),
        WsError::UnmaskedFrame
    );
    assert_eq!(
        server_err(&frame_with(true, OpCode::Ping, None, b"")),
        WsError::UnmaskedFrame
    );
    let masked = cf(true, OpCode::Text, b"x");
    let t = Transcript::decode_every_way(Role::Client, WsLimits::default(), &masked);
    assert_eq!(t.error, Some(WsError::MaskedFrame));
    for e in [
        WsError::UnmaskedFrame,
        WsError::LengthTopBit,
        WsError::ExpectedContinuation,
    ] {
        assert_eq!(e.close_code(), CloseCode::PROTOCOL_ERROR);
    }
}

#[test]
fn non_minimal_length_encodings_are_accepted() {
    // "abc" with a 16-bit length, then "de" with a 64-bit length.
    let mut bytes = vec![0x81, 0xFE, 0x00, 0x03];
    bytes.extend_from_slice(&KEY);
    let start = bytes.len();
    bytes.extend_from_slice(b"abc");
    apply_mask(&mut bytes[start..], KEY, 0);
    bytes.extend_from_slice(&[0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0, 2]);
    bytes.extend_from_slice(&KEY);
    let start = bytes.len();
    bytes.extend_from_slice(b"de");
    apply_mask(&mut bytes[start..], KEY, 0);
    assert_eq!(server(&bytes).items, [text("abc"), binary(b"de")]);
}

#[test]
fn client_role_reads_unmasked_frames() {
    let mut bytes = Vec::new();
    encode_text(&mut bytes, "from server", None);
    encode_ping(&mut bytes, b"p", None).unwrap();
    encode_close(&mut bytes, Some((1001, "going")), None).unwrap();
    let t = Transcript::decode_every_way(Role::Client, WsLimits::default(), &bytes);
    assert_eq!(t.error, None);
    assert_eq!(
        t.items,
        [
            text("from server"),
            Item::Ping(b"p".to_vec()),
            Item::Close(Some((1001, "going".into())))
        ]
    );
}

#[test]
fn size_limits() {
    let limits = WsLimits {
        max_frame_size: 10,
        max_message_size: 25,
    };
    let run = |bytes: &[u8]| Transcript::decode_every_way(Role::Server, limits, bytes);
    assert_eq!(
        run(&cf(true, OpCode::Binary, &[0; 10])).items,
        [binary(&[0; 10])]
    );
    assert_eq!(
        run(&cf(true, OpCode::Binary, &[0; 11])).error,
        Some(WsError::FrameTooLarge)
    );
    // The limit is checked on the header: no piece of the frame is delivered.
    let t = run(&cf(true, OpCode::Text, &[b'a'; 11]));
    assert_eq!((t.pieces, t.error), (0, Some(WsError::FrameTooLarge)));
    let at_limit = cat(&[
        cf(false, OpCode::Text, &[b'a'; 10]),
        cf(false, OpCode::Continuation, &[b'b'; 10]),
        cf(true, OpCode::Continuation, &[b'c'; 5]),
    ]);
    assert_eq!(
        run(&at_limit).items,
        [text(&format!("{}{}ccccc", "a".repeat(10), "b".repeat(10)))]
    );
    let over = cat(&[
        cf(false, OpCode::Text, &[b'a'; 10]),
        cf(false, OpCode::Continuation, &[b'b'; 10]),
        cf(true, OpCode::Continuation, &[b'c'; 6]),
    ]);
    assert_eq!(run(&over).error, Some(WsError::MessageTooLarge));
    // The count restarts with each message; control frames do not count.
    let two = cat(&[
        cf(true, OpCode::Binary, &[1; 10]),
        cf(false, OpCode::Binary, &[2; 10]),
        cf(true, OpCode::Ping, &[0; 100]),
        cf(true, OpCode::Continuation, &[3; 10]),
    ]);
    let t = run(&two);
    assert_eq!(t.error, None);
    assert_eq!(t.items.len(), 3);
    assert_eq!(WsError::MessageTooLarge.close_code(), CloseCode::TOO_BIG);
}

#[test]
fn utf8_across_pieces_and_frames() {
    let s = "aκόσμε€𝄞z";
    let bytes = s.as_bytes();
    // Split into two or three frames at every pair of byte positions, with a ping between.
    for a in 0..=bytes.len() {
        for b in a..=bytes.len() {
            let stream = cat(&[
                cf(false, OpCode::Text, &bytes[..a]),
                cf(false, OpCode::Continuation, &bytes[a..b]),
                cf(true, OpCode::Ping, b""),
                cf(true, OpCode::Continuation, &bytes[b..]),
            ]);
            let t = server(&stream);
            assert_eq!(t.error, None, "{a} {b}");
            assert_eq!(t.items, [Item::Ping(vec![]), text(s)]);
        }
    }
}

#[test]
fn invalid_utf8_fails_fast_with_1007() {
    assert_eq!(
        server_err(&cf(true, OpCode::Text, &[b'a', 0xFF, b'b'])),
        WsError::InvalidUtf8
    );
    // Surrogate (ED A0 80): invalid on its second byte, before the message ends.
    let first_frame_only = cf(false, OpCode::Text, &[b'o', b'k', 0xED, 0xA0]);
    assert_eq!(server_err(&first_frame_only), WsError::InvalidUtf8);
    // Above U+10FFFF, split across frames: fails on the continuation's first byte.
    let split = cat(&[
        cf(false, OpCode::Text, &[0xF4]),
        cf(false, OpCode::Continuation, &[0x90]),
    ]);
    assert_eq!(server_err(&split), WsError::InvalidUtf8);
    // A message that ends inside a code point.
    let truncated = cat(&[
        cf(false, OpCode::Text, &[0xE2, 0x82]),
        cf(true, OpCode::Continuation, b""),
    ]);
    assert_eq!(server_err(&truncated), WsError::InvalidUtf8);
    assert_eq!(
        server_err(&cf(true, OpCode::Text, &[0xF0, 0x9F, 0x98])),
        WsError::InvalidUtf8
    );
    // A valid prefix alone is fine until the message ends.
    let t = server(&cf(false, OpCode::Text, &[b'a', 0xF0, 0x9F, 0x98]));
    assert_eq!(t.error, None);
    assert_eq!(t.partial.map(|p| p.1.len()), Some(4));
    // Binary messages are not validated.
    assert_eq!(
        server(&cf(true, OpCode::Binary, &[0xFF])).items,
        [binary(&[0xFF])]
    );
    assert_eq!(WsError::InvalidUtf8.close_code(), CloseCode::INVALID_DATA);
}

#[test]
fn errors_are_sticky() {
    let mut decoder = Decoder::new(Role::Server, WsLimits::default());
    let mut bad = frame_with(true, OpCode::Text, None, b"x");
    assert_eq!(decoder.decode(&mut bad), Err(WsError::UnmaskedFrame));
    let mut good = cf(true, OpCode::Text, b"x");
    assert_eq!(decoder.decode(&mut good), Err(WsError::UnmaskedFrame));
    assert_eq!(decoder.decode(&mut []), Err(WsError::UnmaskedFrame));
    assert_eq!(decoder.error(), Some(WsError::UnmaskedFrame));
}

#[test]
fn header_split_at_every_byte_is_stashed() {
    // A 14-byte header (64-bit length, masked) fed one byte per call: each call consumes it.
    let payload = vec![9u8; 70_000];
    let frame = cf(true, OpCode::Binary, &payload);
    let mut decoder = Decoder::new(Role::Server, WsLimits::default());
    for (i, &byte) in frame[..MAX_HEADER_LEN].iter().enumerate() {
        let mut one = [byte];
        assert_eq!(
            decoder.decode(&mut one).unwrap(),
            (1, None),
            "header byte {i}"
        );
    }
    let mut rest = frame[MAX_HEADER_LEN..].to_vec();
    let (n, event) = decoder.decode(&mut rest).unwrap();
    assert_eq!(n, 70_000);
    assert!(
        matches!(event, Some(Event::Data { payload, first: true, last: true, .. }) if payload.len() == 70_000)
    );
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Deterministic xorshift, so the mixed-stream test is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }
}

#[test]
fn mixed_streams_round_trip_through_encoder_and_decoder() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let alphabet: Vec<char> = "aZ0 κό€𝄞\u{7FF}\u{10FFFF}".chars().collect();
    for round in 0..40 {
        for role in [Role::Server, Role::Client] {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            let key = |rng: &mut Rng| match role {
                Role::Server => Some((rng.next() as u32).to_ne_bytes()),
                Role::Client => None,
            };
            for _ in 0..rng.below(6) + 1 {
                // Every length encoding; the 64-bit one rarely, to keep the test fast.
                let len = match rng.below(40) {
                    0 => 65_536 + rng.below(100),
                    n => [0, 1, 5, 125, 126, 127, 300, 2000][n % 8],
                };
                let (opcode, data) = if rng.below(2) == 0 {
                    let s: String = (0..len)
                        .map(|_| alphabet[rng.below(alphabet.len() as u64)])
                        .collect();
                    (OpCode::Text, s.into_bytes())
                } else {
                    (
                        OpCode::Binary,
                        (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>(),
                    )
                };
                // Fragment at random byte positions (text may split code points).
                let mut cuts: Vec<usize> = (0..rng.below(4))
                    .map(|_| rng.below(data.len() as u64 + 1))
                    .collect();
                cuts.sort_unstable();
                cuts.push(data.len());
                let kind = if opcode == OpCode::Text {
                    DataKind::Text
                } else {
                    DataKind::Binary
                };
                let mut message = Some(Item::Message {
                    kind,
                    data: data.clone(),
                });
                let mut at = 0;
                for (i, &cut) in cuts.iter().enumerate() {
                    let op = if i == 0 { opcode } else { OpCode::Continuation };
                    let fin = i + 1 == cuts.len();
                    encode_frame(&mut stream, fin, op, key(&mut rng), &data[at..cut]).unwrap();
                    at = cut;
                    if fin {
                        expected.extend(message.take());
                    }
                    if rng.below(3) == 0 {
                        let ping: Vec<u8> = (0..rng.below(126)).map(|_| rng.next() as u8).collect();
                        encode_ping(&mut stream, &ping, key(&mut rng)).unwrap();
                        expected.push(Item::Ping(ping));
                    }
                }
            }
            encode_close(&mut stream, Some((4000, "done")), key(&mut rng)).unwrap();
            expected.push(Item::Close(Some((4000, "done".into()))));
            let t = Transcript::decode_every_way(role, WsLimits::default(), &stream);
            assert_eq!(t.error, None, "round {round} {role:?}");
            // Compare without dumping megabytes on failure.
            let summary = |items: &[Item]| -> Vec<String> {
                items
                    .iter()
                    .map(|i| match i {
                        Item::Message { kind, data } => {
                            format!("{kind:?}({}, {:x})", data.len(), checksum(data))
                        }
                        other => format!("{other:?}"),
                    })
                    .collect()
            };
            assert_eq!(
                summary(&t.items),
                summary(&expected),
                "round {round} {role:?}"
            );
            assert!(t.items == expected, "round {round} {role:?}");
        }
    }
}
