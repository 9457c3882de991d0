//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! The validator keeps at most the 3 leading bytes of a code point split across pieces. It
//! fails as soon as a sequence is certainly invalid (an invalid byte, an overlong or surrogate
//! prefix, a code point above U+10FFFF) — the "fail fast" behaviour Autobahn case 6 checks —
//! and [`Utf8Validator::finish`] fails if the message ends inside a code point. Validation itself
//! is `std::str::from_utf8`, so the common all-ASCII case runs at its speed.

use std::str;

/// Streaming UTF-8 validator state: the incomplete tail of the previous piece.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Utf8Validator {
    carry: [u8; 3],
    carry_len: u8,
}

/// The input is not valid UTF-8 (or, at [`Utf8Validator::finish`], ends inside a code point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid;

impl Utf8Validator {
    /// Validates the next piece. `Err` as soon as the bytes so far cannot be valid UTF-8.
    pub(crate) fn feed(&mut self, mut piece: &[u8]) -> Result<(), Invalid> {
        if self.carry_len > 0 {
            let have = usize::from(self.carry_len);
            let width = sequence_width(self.carry[0]);
            let take = (width - have).min(piece.len());
            let mut buf = [0u8; 4];
            buf[..have].copy_from_slice(&self.carry[..have]);
            buf[have..have + take].copy_from_slice(&piece[..take]);
            match str::from_utf8(&buf[..have + take]) {
                Ok(_) => self.carry_len = 0,
                // Still a valid prefix and the piece is used up: keep carrying.
                Err(e) if e.error_len().is_none() => {
                    self.carry[..have + take].copy_from_slice(&buf[..have + take]);
                    self.carry_len = (have + take) as u8;
                    return Ok(());
                }
                Err(_) => return Err(Invalid),
            }
            piece = &piece[take..];
        }
        match str::from_utf8(piece) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &piece[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(Invalid),
        }
    }

    /// Ends the message: `Err` if it stopped inside a code point. Resets the validator.
    pub(crate) fn finish(&mut self) -> Result<(), Invalid> {
        let complete = self.carry_len == 0;
        self.carry_len = 0;
        if complete { Ok(()) } else { Err(Invalid) }
    }
}

/// The length of the sequence a lead byte starts. Only called on a carried lead byte, which
/// `from_utf8` has already accepted as the start of a valid prefix (0xC2..=0xF4).
fn sequence_width(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` split at every pair of cut points; the verdict must equal `from_utf8`'s.
    fn check_all_splits(bytes: &[u8]) {
        let expected = str::from_utf8(bytes).is_ok();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let mut v = Utf8Validator::default();
                let ok = v.feed(&bytes[..a]).is_ok()
                    && v.feed(&bytes[a..b]).is_ok()
                    && v.feed(&bytes[b..]).is_ok()
                    && v.finish().is_ok();
                assert_eq!(ok, expected, "{bytes:02x?} split at {a},{b}");
            }
        }
    }

    #[test]
    fn agrees_with_std_on_every_split() {
        let cases: &[&[u8]] = &[
            b"",
            b"hello",
            "κόσμε".as_bytes(),
            "a€b𝄞c\u{7FF}\u{800}\u{FFFF}\u{10000}\u{10FFFF}".as_bytes(),
            &[0xC0, 0x80],             // overlong
            &[0xE0, 0x80, 0x80],       // overlong
            &[0xED, 0xA0, 0x80],       // surrogate
            &[0xF4, 0x90, 0x80, 0x80], // > U+10FFFF
            &[0xF5],
            &[0xFF],
            &[0x80],
            &[0xE2, 0x82],       // truncated
            &[b'a', 0xF0, 0x9F], // truncated
            &[
                0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5, 0xED, 0xA0, 0x80,
            ],
        ];
        for case in cases {
            check_all_splits(case);
        }
    }

    #[test]
    fn fails_fast_on_first_impossible_byte() {
        // Each of these is invalid after the shown prefix, before the code point could end.
        for bad in [
            &[0xF4u8, 0x90][..],
            &[0xE0, 0x80],
            &[0xED, 0xA0],
            &[0xC0],
            &[0xF8],
        ] {
            let mut v = Utf8Validator::default();
            let mut failed = false;
            for &b in bad {
                failed |= v.feed(&[b]).is_err();
            }
            assert!(failed, "{bad:02x?}");
        }
        // A valid prefix alone is not an error until finish().
        let mut v = Utf8Validator::default();
        assert!(v.feed(&[0xF0, 0x9F, 0x98]).is_ok());
        assert_eq!(v.finish(), Err(Invalid));
        assert_eq!(v.finish(), Ok(()), "finish resets");
    }
}
