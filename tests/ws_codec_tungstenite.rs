//! Interoperability: fleetgate's sans-IO WebSocket codec against tungstenite 0.30, in memory.
//!
//! A tungstenite `WebSocket` runs over an in-memory duplex stream (two byte queues); our side
//! is a `Decoder` plus the `encode_*` functions over the other ends of the same queues. Every
//! scenario runs twice: tungstenite as server with our codec as client, and the reverse. Our
//! decoder is fed in odd-sized chunks, so frames straddle reads as they would on a socket.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;

use fleetgate::proto::ws::{
    self, CloseCode, DataKind, Decoder, Event, OpCode, Role, WsError, WsLimits,
};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode as TOpCode};
use tungstenite::protocol::frame::{CloseFrame as TCloseFrame, Frame, FrameHeader};
use tungstenite::protocol::{Role as TRole, WebSocket};
use tungstenite::{Error as TError, Message};

type Pipe = Rc<RefCell<VecDeque<u8>>>;

/// Tungstenite's end of the duplex link. Reading an empty queue is `WouldBlock`, like a
/// non-blocking socket with nothing to read.
struct PeerStream {
    rx: Pipe,
    tx: Pipe,
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = self.rx.borrow_mut();
        if rx.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rx.len().min(buf.len());
        for (dst, src) in buf.iter_mut().zip(rx.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.borrow_mut().extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What our decoder delivered, owned and reassembled.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

/// Our end: the codec under test over the other ends of the pipes.
struct Ours {
    role: Role,
    decoder: Decoder,
    rx: Pipe,
    tx: Pipe,
    partial: Option<(DataKind, Vec<u8>)>,
    key_state: u32,
    /// Bytes per simulated socket read.
    chunk: usize,
}

impl Ours {
    /// The masking key for our next frame: client role only. Deterministic here; a real client
    /// draws it from a CSPRNG.
    fn key(&mut self) -> Option<[u8; 4]> {
        match self.role {
            Role::Server => None,
            Role::Client => {
                self.key_state = self
                    .key_state
                    .wrapping_mul(747_796_405)
                    .wrapping_add(2_891_336_453);
                Some(self.key_state.to_le_bytes())
            }
        }
    }

    fn send(&mut self, encode: impl FnOnce(&mut Vec<u8>, Option<[u8; 4]>)) {
        let key = self.key();
        let mut out = Vec::new();
        encode(&mut out, key);
        self.tx.borrow_mut().extend(out);
    }

    /// Decodes everything the peer has written so far: what was delivered, and the error that
    /// stopped decoding, if any.
    fn recv_until_error(&mut self) -> (Vec<Got>, Result<(), WsError>) {
        let mut got = Vec::new();
        let result = self.recv_into(&mut got);
        (got, result)
    }

    /// Decodes everything the peer has written so far, which must be valid.
    fn recv(&mut self) -> Vec<Got> {
        let (got, result) = self.recv_until_error();
        result.expect("valid stream");
        got
    }

    fn recv_into(&mut self, got: &mut Vec<Got>) -> Result<(), WsError> {
        let bytes: Vec<u8> = self.rx.borrow_mut().drain(..).collect();
        for piece in bytes.chunks(self.chunk) {
            let mut buf = piece.to_vec();
            let mut at = 0;
            loop {
                let (n, event) = self.decoder.decode(&mut buf[at..])?;
                at += n;
                match event {
                    Some(event) => record(event, &mut self.partial, got),
                    None if n == 0 => break,
                    None => {}
                }
            }
            assert_eq!(at, buf.len(), "the decoder consumes all input");
        }
        Ok(())
    }
}

fn record(event: Event<'_>, partial: &mut Option<(DataKind, Vec<u8>)>, got: &mut Vec<Got>) {
    match event {
        Event::Data {
            kind,
            payload,
            first,
            last,
        } => {
            assert_eq!(first, partial.is_none(), "first flag");
            let (k, data) = partial.get_or_insert_with(|| (kind, Vec::new()));
            assert_eq!(*k, kind);
            data.extend_from_slice(payload);
            if last {
                let (kind, data) = partial.take().unwrap();
                got.push(match kind {
                    DataKind::Text => Got::Text(String::from_utf8(data).unwrap()),
                    DataKind::Binary => Got::Binary(data),
                });
            }
        }
        Event::Ping(p) => got.push(Got::Ping(p.to_vec())),
        Event::Pong(p) => got.push(Got::Pong(p.to_vec())),
        Event::Close(c) => got.push(Got::Close(c.map(|c| (c.code, c.reason.to_owned())))),
    }
}

/// Our codec in `role`, tungstenite in the other role, over fresh pipes.
fn pair(role: Role, limits: WsLimits) -> (Ours, WebSocket<PeerStream>) {
    let to_peer: Pipe = Rc::default();
    let to_us: Pipe = Rc::default();
    let peer_role = match role {
        Role::Server => TRole::Client,
        Role::Client => TRole::Server,
    };
    let stream = PeerStream {
        rx: to_peer.clone(),
        tx: to_us.clone(),
    };
    let peer = WebSocket::from_raw_socket(stream, peer_role, None);
    let ours = Ours {
        role,
        decoder: Decoder::new(role, limits),
        rx: to_us,
        tx: to_peer,
        partial: None,
        key_state: 0x1234_5678,
        chunk: 1371,
    };
    (ours, peer)
}

const ROLES: [Role; 2] = [Role::Server, Role::Client];

fn big_payload() -> Vec<u8> {
    (0..1_048_576u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

#[test]
fn our_messages_are_read_by_tungstenite() {
    for role in ROLES {
        let (mut ours, mut peer) = pair(role, WsLimits::default());
        let big = big_payload();
        ours.send(|out, key| ws::encode_text(out, "hello, tungstenite", key));
        ours.send(|out, key| ws::encode_binary(out, &[0, 1, 2, 0xFF], key));
        ours.send(|out, key| ws::encode_text(out, "", key));
        ours.send(|out, key| ws::encode_binary(out, &big, key));
        // A fragmented text message whose fragments split "€" (E2 82 AC).
        let euro = "price: 5€".as_bytes();
        ours.send(|out, key| ws::encode_frame(out, false, OpCode::Text, key, &euro[..8]).unwrap());
        ours.send(|out, key| {
            ws::encode_frame(out, false, OpCode::Continuation, key, &euro[8..10]).unwrap();
        });
        ours.send(|out, key| {
            ws::encode_frame(out, true, OpCode::Continuation, key, &euro[10..]).unwrap();
        });
        assert_eq!(
            peer.read().unwrap(),
            Message::text("hello, tungstenite"),
            "{role:?}"
        );
        assert_eq!(peer.read().unwrap(), Message::binary(vec![0, 1, 2, 0xFF]));
        assert_eq!(peer.read().unwrap(), Message::text(""));
        assert_eq!(peer.read().unwrap(), Message::binary(big));
        assert_eq!(peer.read().unwrap(), Message::text("price: 5€"));
        assert!(matches!(peer.read(), Err(TError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock));
    }
}

#[test]
fn tungstenite_messages_are_read_by_us() {
    for role in ROLES {
        let (mut ours, mut peer) = pair(role, WsLimits::default());
        let big = big_payload();
        peer.send(Message::text("hello, fleetgate")).unwrap();
        peer.send(Message::binary(vec![9, 8, 7])).unwrap();
        peer.send(Message::binary(Vec::new())).unwrap();
        peer.send(Message::binary(big.clone())).unwrap();
        // Fragmented by tungstenite, with a ping between fragments.
        let text = |data: &[u8], op, fin| Message::Frame(Frame::message(data.to_vec(), op, fin));
        peer.send(text("κό".as_bytes(), TOpCode::Data(Data::Text), false))
            .unwrap();
        peer.send(Message::Ping(b"mid".to_vec().into())).unwrap();
        peer.send(text(
            &"σμε".as_bytes()[..3],
            TOpCode::Data(Data::Continue),
            false,
        ))
        .unwrap();
        peer.send(text(
            &"σμε".as_bytes()[3..],
            TOpCode::Data(Data::Continue),
            true,
        ))
        .unwrap();
        assert_eq!(
            ours.recv(),
            [
                Got::Text("hello, fleetgate".into()),
                Got::Binary(vec![9, 8, 7]),
                Got::Binary(vec![]),
                Got::Binary(big),
                Got::Ping(b"mid".to_vec()),
                Got::Text("κόσμε".into()),
            ],
            "{role:?}"
        );
    }
}

#[test]
fn ping_pong_both_ways() {
    for role in ROLES {
        let (mut ours, mut peer) = pair(role, WsLimits::default());
        // We ping; tungstenite reports it and answers with a pong on its next flush.
        ours.send(|out, key| ws::encode_ping(out, b"are you there?", key).unwrap());
        assert_eq!(
            peer.read().unwrap(),
            Message::Ping(b"are you there?".to_vec().into())
        );
        peer.flush().unwrap();
        assert_eq!(
            ours.recv(),
            [Got::Pong(b"are you there?".to_vec())],
            "{role:?}"
        );
        // Tungstenite pings; we answer with a pong carrying the same payload.
        let payload = vec![0xA5; 125];
        peer.send(Message::Ping(payload.clone().into())).unwrap();
        let got = ours.recv();
        assert_eq!(got, [Got::Ping(payload.clone())]);
        ours.send(|out, key| ws::encode_pong(out, &payload, key).unwrap());
        assert_eq!(peer.read().unwrap(), Message::Pong(payload.into()));
        // An empty ping.
        ours.send(|out, key| ws::encode_ping(out, b"", key).unwrap());
        assert_eq!(peer.read().unwrap(), Message::Ping(Vec::new().into()));
    }
}

fn close_frame(code: u16, reason: &str) -> TCloseFrame {
    TCloseFrame {
        code: code.into(),
        reason: reason.into(),
    }
}

#[test]
fn close_handshake_started_by_us() {
    for role in ROLES {
        let (mut ours, mut peer) = pair(role, WsLimits::default());
        ours.send(|out, key| {
            ws::encode_close(out, Some((CloseCode::GOING_AWAY, "bye")), key).unwrap()
        });
        assert_eq!(
            peer.read().unwrap(),
            Message::Close(Some(close_frame(1001, "bye"))),
            "{role:?}"
        );
        // Tungstenite echoes the close; as a server it then reports the connection closed.
        match peer.flush() {
            Ok(()) | Err(TError::ConnectionClosed) => {}
            Err(e) => panic!("{e}"),
        }
        assert_eq!(ours.recv(), [Got::Close(Some((1001, "bye".into())))]);
        assert!(ours.decoder.is_closed());
    }
}

#[test]
fn close_handshake_started_by_tungstenite() {
    for role in ROLES {
        let (mut ours, mut peer) = pair(role, WsLimits::default());
        peer.send(Message::text("last words")).unwrap();
        peer.close(Some(close_frame(4001, "maintenance ✓")))
            .unwrap();
        assert_eq!(
            ours.recv(),
            [
                Got::Text("last words".into()),
                Got::Close(Some((4001, "maintenance ✓".into())))
            ],
            "{role:?}"
        );
        ours.send(|out, key| ws::encode_close(out, Some((4001, "")), key).unwrap());
        match peer.read() {
            Ok(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 4001),
            Err(TError::ConnectionClosed) => {}
            other => panic!("{other:?}"),
        }
        // An empty close frame too.
        let (mut ours, mut peer) = pair(role, WsLimits::default());
        peer.close(None).unwrap();
        assert_eq!(ours.recv(), [Got::Close(None)]);
    }
}

/// Tungstenite sends `frame` (made invalid by hand); our decoder fails with `expected`, and
/// the close frame we send back carries the matching code.
fn expect_rejected(role: Role, limits: WsLimits, frame: Frame, expected: WsError) {
    let (mut ours, mut peer) = pair(role, limits);
    peer.send(Message::text("valid first")).unwrap();
    peer.send(Message::Frame(frame)).unwrap();
    let (decoded, result) = ours.recv_until_error();
    let err = result.expect_err("the decoder must reject the frame");
    assert_eq!(err, expected, "{role:?}");
    assert_eq!(decoded, [Got::Text("valid first".into())]);
    assert!(err.is_peer_fault());
    assert_eq!(ours.decoder.error(), Some(err));
    ours.send(|out, key| ws::encode_close(out, Some((err.close_code(), "")), key).unwrap());
    assert_eq!(
        peer.read().unwrap(),
        Message::Close(Some(close_frame(err.close_code(), ""))),
        "{role:?} {expected:?}"
    );
}

#[test]
fn invalid_frames_from_tungstenite_are_rejected() {
    for role in ROLES {
        let limits = WsLimits::default();
        let data = |payload: &[u8], op| Frame::message(payload.to_vec(), TOpCode::Data(op), true);

        let mut rsv = data(b"compressed?", Data::Binary);
        rsv.header_mut().rsv1 = true;
        expect_rejected(role, limits, rsv, WsError::ReservedBits { bits: 4 });

        let reserved = data(b"x", Data::Reserved(3));
        expect_rejected(
            role,
            limits,
            reserved,
            WsError::ReservedOpcode { opcode: 3 },
        );

        let header = FrameHeader {
            opcode: TOpCode::Control(Control::Reserved(0xB)),
            ..FrameHeader::default()
        };
        let reserved = Frame::from_payload(header, b"x".to_vec().into());
        expect_rejected(
            role,
            limits,
            reserved,
            WsError::ReservedOpcode { opcode: 0xB },
        );

        let bad_utf8 = data(&[b'o', b'k', 0xC0, 0xAF], Data::Text);
        expect_rejected(role, limits, bad_utf8, WsError::InvalidUtf8);

        let stray = data(b"orphan", Data::Continue);
        expect_rejected(role, limits, stray, WsError::UnexpectedContinuation);

        let mut fragmented_ping = Frame::ping(b"p".to_vec());
        fragmented_ping.header_mut().is_final = false;
        expect_rejected(role, limits, fragmented_ping, WsError::FragmentedControl);

        let reserved_code = Frame::close(Some(close_frame(1005, "")));
        expect_rejected(
            role,
            limits,
            reserved_code,
            WsError::InvalidCloseCode { code: 1005 },
        );

        let small = WsLimits {
            max_frame_size: 1 << 20,
            ..limits
        };
        let too_big = data(&vec![0; (1 << 20) + 1], Data::Binary);
        expect_rejected(role, small, too_big, WsError::FrameTooLarge);

        // A server must not mask; a client must. Tungstenite masks client frames itself, so
        // only the masked-frame-from-server case can be produced.
        if role == Role::Client {
            let mut masked = data(b"masked", Data::Binary);
            masked.header_mut().mask = Some([1, 2, 3, 4]);
            expect_rejected(role, limits, masked, WsError::MaskedFrame);
        }
    }
}

#[test]
fn our_decoder_agrees_with_tungstenite_on_a_long_mixed_stream() {
    for role in ROLES {
        for chunk in [1, 7, 4096] {
            let (mut ours, mut peer) = pair(role, WsLimits::default());
            ours.chunk = chunk;
            let mut expected = Vec::new();
            for i in 0..200usize {
                let len = [0, 1, 125, 126, 127, 65_535, 65_536][i % 7] + i;
                if i % 3 == 0 {
                    let s: String = "aé€😀".chars().cycle().take(len / 2).collect();
                    peer.send(Message::text(s.clone())).unwrap();
                    expected.push(Got::Text(s));
                } else {
                    let b: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
                    peer.send(Message::binary(b.clone())).unwrap();
                    expected.push(Got::Binary(b));
                }
                if i % 5 == 0 {
                    peer.send(Message::Pong(vec![i as u8; i % 126].into()))
                        .unwrap();
                    expected.push(Got::Pong(vec![i as u8; i % 126]));
                }
                if chunk == 1 && i == 40 {
                    break; // byte-at-a-time over a shorter stream keeps the test fast
                }
            }
            assert_eq!(ours.recv(), expected, "{role:?} chunk {chunk}");
        }
    }
}
