//! Fuzz entry points for `proto::ws`.

use crate::proto::ws::transcript::{Item, Transcript};
use crate::proto::ws::{
    DataKind, OpCode, Role, WsLimits, encode_close, encode_frame, encode_ping, encode_pong,
};

/// Small limits, so the 1009 paths are reachable with fuzzer-sized inputs.
const LIMITS: WsLimits = WsLimits {
    max_frame_size: 4096,
    max_message_size: 16_384,
};

/// Decodes `data` as a frame stream in both roles and checks the properties the connection
/// state machine relies on:
///
/// * no panic; decoding whole and in chunks of 1, 2, 3, 5, 7, 13, 64 and 1000 bytes gives the
///   same completed messages, control frames and error;
/// * the event-stream invariants of [`Transcript`]: `first`/`last` exactly once per message,
///   one kind per message, completed text is UTF-8, all input consumed, sticky errors;
/// * whatever was decoded, re-encoded as the peer would send it, decodes to the same items
///   without error.
pub fn decoder(data: &[u8]) {
    for role in [Role::Server, Role::Client] {
        let transcript = Transcript::decode_every_way(role, LIMITS, data);
        let reencoded = reencode(role, &transcript.items);
        let again = Transcript::decode(role, LIMITS, &reencoded, 0);
        assert_eq!(again.error, None);
        assert_eq!(again.items, transcript.items);
    }
}

/// Encodes `items` as the peer of a `role` decoder would: masked towards a server.
fn reencode(role: Role, items: &[Item]) -> Vec<u8> {
    let mask = match role {
        Role::Server => Some([0x5A, 0x01, 0xC3, 0x7E]),
        Role::Client => None,
    };
    let mut out = Vec::new();
    for item in items {
        match item {
            Item::Message { kind, data } => {
                let opcode = match kind {
                    DataKind::Text => OpCode::Text,
                    DataKind::Binary => OpCode::Binary,
                };
                // Fragments within the frame limit; an empty message is one empty frame.
                let mut frames = data.chunks(LIMITS.max_frame_size).peekable();
                if frames.peek().is_none() {
                    encode_frame(&mut out, true, opcode, mask, &[]).expect("data frame");
                }
                let mut op = opcode;
                while let Some(frame) = frames.next() {
                    let fin = frames.peek().is_none();
                    encode_frame(&mut out, fin, op, mask, frame).expect("data frame");
                    op = OpCode::Continuation;
                }
            }
            Item::Ping(p) => encode_ping(&mut out, p, mask).expect("decoded ping fits"),
            Item::Pong(p) => encode_pong(&mut out, p, mask).expect("decoded pong fits"),
            Item::Close(c) => {
                let close = c.as_ref().map(|(code, reason)| (*code, reason.as_str()));
                encode_close(&mut out, close, mask).expect("decoded close is valid");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_pass() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/ws_decoder");
        let mut count = 0;
        for entry in std::fs::read_dir(dir).expect("seed directory") {
            let data = std::fs::read(entry.expect("entry").path()).expect("seed");
            super::decoder(&data);
            count += 1;
        }
        assert!(count >= 10, "{count} seeds");
    }
}
