//! RFC 6455 §5.3 payload masking: XOR with a 4-byte key, cycling from the payload's start.
//!
//! [`apply_mask`] is the fast path (eight bytes at a time, no `unsafe`); [`apply_mask_naive`] is
//! the obvious byte loop it is tested against. Masking is its own inverse, so the same functions
//! mask (client send) and unmask (server receive).

/// XORs `buf` with `key`, where `buf[0]` is at position `offset` of the frame payload.
///
/// `offset` lets a payload be (un)masked piece by piece as it streams in: pass the number of
/// payload bytes already processed (only `offset % 4` matters).
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotate_key(key, offset);
    let [a, b, c, d] = key;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the key phase is back at 0.
    for (byte, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// The reference implementation of [`apply_mask`]: one byte at a time.
pub fn apply_mask_naive(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[(offset + i) % 4];
    }
}

/// The key as seen from payload position `offset`: byte `i` is `key[(offset + i) % 4]`.
/// (Integer rotation; `<[u8]>::rotate_left` is an out-of-line call that costs more than
/// masking a short payload.)
#[inline]
fn rotate_key(key: [u8; 4], offset: usize) -> [u8; 4] {
    let shift = 8 * (offset % 4) as u32;
    u32::from_le_bytes(key).rotate_right(shift).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (no RNG in tests either).
    fn bytes(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn rfc_example() {
        // RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d.
        let mut buf = *b"Hello";
        apply_mask(&mut buf, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(buf, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }

    #[test]
    fn fast_matches_naive_for_every_length_alignment_and_offset() {
        let key = [0xA1, 0x5C, 0x07, 0xFE];
        for len in 0..=257 {
            let data = bytes(len + 8, len as u32);
            for align in 0..8 {
                for offset in 0..8 {
                    let mut fast = data.clone();
                    let mut slow = data.clone();
                    apply_mask(&mut fast[align..align + len], key, offset);
                    apply_mask_naive(&mut slow[align..align + len], key, offset);
                    assert_eq!(fast, slow, "len {len} align {align} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn streaming_pieces_equal_one_shot() {
        let key = [1, 2, 3, 4];
        let data = bytes(100, 7);
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        for cut in [1usize, 3, 5, 8, 13] {
            let mut pieces = data.clone();
            let mut at = 0;
            while at < pieces.len() {
                let end = (at + cut).min(pieces.len());
                apply_mask(&mut pieces[at..end], key, at);
                at = end;
            }
            assert_eq!(pieces, whole, "cut {cut}");
        }
        // Masking twice restores the input.
        apply_mask(&mut whole, key, 0);
        assert_eq!(whole, data);
    }
}
