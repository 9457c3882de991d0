//! Buffers: a per-shard pool of output `Vec`s, so connections borrow a send buffer only while
//! they have something to send and an idle connection holds none.

/// Capacity from which a pooled vector counts as envelope-sized: room for a full relay data
/// envelope (16 KiB of data plus its header).
pub const LARGE: usize = 16 * 1024;

/// Buffer size for a relay envelope that is not known to be small: a 16 KiB data envelope (the
/// size the protocol recommends) with the longest header fits.
pub const ENVELOPE: usize = 17 * 1024;

/// Capacity from which a pooled vector counts as big (bulk output: several records at once).
const BIG: usize = 2 * ENVELOPE;

/// A bounded free list of `Vec<u8>`s, kept in three size classes: small (output for control
/// messages), envelope-sized (relay data envelopes, cut TLS records) and big (bulk output).
///
/// A taker that needs room gets a vector of the class that has it, never a small one that
/// would grow by reallocation (a copy and an allocation per message in steady state), and
/// envelopes do not use up the big output buffers or the other way round.
#[derive(Debug)]
pub struct VecPool {
    small: Vec<Vec<u8>>,
    envelopes: Vec<Vec<u8>>,
    big: Vec<Vec<u8>>,
    max_pooled: usize,
    max_capacity: usize,
    /// How many envelope-sized vectors are kept (`max_pooled` unless set).
    max_envelopes: usize,
}

impl VecPool {
    /// Keeps at most `max_pooled` vectors of each class, of at most `max_capacity` bytes each.
    pub fn new(max_pooled: usize, max_capacity: usize) -> Self {
        Self {
            small: Vec::new(),
            envelopes: Vec::new(),
            big: Vec::new(),
            max_pooled,
            max_capacity,
            max_envelopes: max_pooled,
        }
    }

    /// Keeps up to `bytes` of envelope-sized vectors instead: a relay shard keeps as many as a
    /// burst of data in flight needs, so steady-state relay allocates nothing, and no more than
    /// `bytes` (at most twice that in capacity) once the burst is over.
    pub fn keep_envelope_bytes(mut self, bytes: usize) -> Self {
        self.max_envelopes = bytes / ENVELOPE;
        self
    }

    fn class(&mut self, capacity: usize) -> (&mut Vec<Vec<u8>>, usize) {
        if capacity < LARGE {
            (&mut self.small, self.max_pooled)
        } else if capacity < BIG {
            (&mut self.envelopes, self.max_envelopes)
        } else {
            (&mut self.big, self.max_pooled)
        }
    }

    /// An empty vector (with capacity when one was pooled), for output of unknown size.
    pub fn take(&mut self) -> Vec<u8> {
        self.small
            .pop()
            .or_else(|| self.envelopes.pop())
            .or_else(|| self.big.pop())
            .unwrap_or_default()
    }

    /// An empty vector with room for at least `need` bytes: a pooled one of `need`'s class
    /// that fits (for envelope-sized and big needs, a bigger class will do), else a new one
    /// rounded up within its class, so that needs of slightly different sizes soon all fit the
    /// vectors pooled: a small need to the next power of two (at least 256 B), an
    /// envelope-sized one to [`ENVELOPE`]; a big one is allocated exactly.
    pub fn take_min(&mut self, need: usize) -> Vec<u8> {
        let fits = |class: &mut Vec<Vec<u8>>| {
            let n = class.len();
            let i = (n.saturating_sub(8)..n)
                .rev()
                .find(|&i| class[i].capacity() >= need)?;
            Some(class.swap_remove(i))
        };
        if need < LARGE {
            // Not a large one: it would travel with a small message and be missed where
            // envelopes and bulk output need it.
            return fits(&mut self.small)
                .unwrap_or_else(|| Vec::with_capacity(need.next_power_of_two().max(256)));
        }
        if need < BIG
            && let Some(v) = fits(&mut self.envelopes)
        {
            return v;
        }
        fits(&mut self.big).unwrap_or_else(|| {
            Vec::with_capacity(if need < BIG { need.max(ENVELOPE) } else { need })
        })
    }

    /// A pooled envelope-sized vector with room for `need` bytes, if there is one (e.g. to send
    /// home to the shard that allocated it).
    pub fn take_spare(&mut self, need: usize) -> Option<Vec<u8>> {
        let n = self.envelopes.len();
        (n.saturating_sub(8)..n)
            .rev()
            .find(|&i| self.envelopes[i].capacity() >= need)
            .map(|i| self.envelopes.swap_remove(i))
    }

    /// A pooled small vector, if there is one (to send home to the shard that allocated it).
    pub fn take_small_spare(&mut self) -> Option<Vec<u8>> {
        self.small.pop()
    }

    /// Returns a vector for reuse (dropped if its class is full or it grew too big).
    pub fn give(&mut self, mut v: Vec<u8>) {
        let cap = v.capacity();
        if cap == 0 || cap > self.max_capacity {
            return;
        }
        let (class, max) = self.class(cap);
        if class.len() < max {
            v.clear();
            class.push(v);
        }
    }

    /// A vector with room for `need` bytes and at most twice that: one of the last few pooled
    /// that fits, or a new one of exactly `need`. For buffers that stay queued (relay data
    /// frames), so a small frame never pins a large buffer.
    pub fn take_fitting(&mut self, need: usize) -> Vec<u8> {
        let fits = |c: usize| c >= need && c <= need.saturating_mul(2);
        for class in [&mut self.envelopes, &mut self.big, &mut self.small] {
            let n = class.len();
            if let Some(i) = (n.saturating_sub(8)..n)
                .rev()
                .find(|&i| fits(class[i].capacity()))
            {
                return class.swap_remove(i);
            }
        }
        Vec::with_capacity(need)
    }

    /// Vectors currently pooled.
    pub fn len(&self) -> usize {
        self.small.len() + self.envelopes.len() + self.big.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_fitting_never_hands_out_a_much_larger_buffer() {
        let mut p = VecPool::new(16, 1 << 20);
        p.give(Vec::with_capacity(256 * 1024));
        let v = p.take_fitting(16 * 1024);
        assert!(v.capacity() >= 16 * 1024 && v.capacity() <= 32 * 1024);
        assert_eq!(p.len(), 1, "the big buffer stays pooled");
        p.give(v);
        let w = p.take_fitting(16 * 1024 + 10);
        assert!(w.capacity() >= 16 * 1024 + 10 && w.capacity() <= 2 * (16 * 1024 + 10));
    }

    #[test]
    fn take_min_uses_the_class_that_has_room() {
        let mut p = VecPool::new(16, 1 << 20);
        p.give(Vec::with_capacity(84 * 1024));
        p.give(Vec::with_capacity(ENVELOPE));
        p.give(Vec::with_capacity(200));
        p.give(Vec::with_capacity(300));
        assert_eq!(
            p.take_min(ENVELOPE).capacity(),
            ENVELOPE,
            "not a small one grown"
        );
        assert_eq!(
            p.take_min(ENVELOPE).capacity(),
            84 * 1024,
            "a bigger class when empty"
        );
        assert_eq!(
            p.take_min(LARGE).capacity(),
            ENVELOPE,
            "then a new one, rounded up"
        );
        assert_eq!(p.len(), 2, "the small ones stay pooled");
        assert!(p.take_min(250).capacity() >= 250);
        assert_eq!(p.len(), 1);
        p.give(Vec::with_capacity(ENVELOPE));
        let v = p.take_min(400);
        assert_eq!(
            v.capacity(),
            512,
            "a new small one, not the envelope buffer"
        );
        assert_eq!(p.len(), 2);
        p.take_min(ENVELOPE);

        p.give(Vec::with_capacity(84 * 1024));
        p.give(Vec::with_capacity(ENVELOPE));
        assert_eq!(
            p.take_spare(ENVELOPE).map(|v| v.capacity()),
            Some(ENVELOPE),
            "a spare is an envelope-sized one"
        );
        assert!(
            p.take_spare(ENVELOPE).is_none(),
            "never the big output buffer"
        );
        assert_eq!(p.take_min(80 * 1024).capacity(), 84 * 1024);
    }

    #[test]
    fn small_spares_come_only_from_the_small_class() {
        let mut p = VecPool::new(4, 1 << 20);
        assert!(p.take_small_spare().is_none());
        p.give(Vec::with_capacity(ENVELOPE));
        assert!(
            p.take_small_spare().is_none(),
            "an envelope is not a small spare"
        );
        p.give(Vec::with_capacity(300));
        assert_eq!(p.take_small_spare().map(|v| v.capacity()), Some(300));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn each_class_is_bounded_on_its_own() {
        let mut p = VecPool::new(2, 1 << 20);
        for cap in [100, ENVELOPE, BIG] {
            for _ in 0..3 {
                p.give(Vec::with_capacity(cap));
            }
        }
        assert_eq!(p.len(), 6, "two of each class");

        let mut p = VecPool::new(2, 1 << 20).keep_envelope_bytes(5 * ENVELOPE);
        for _ in 0..8 {
            p.give(Vec::with_capacity(ENVELOPE));
        }
        assert_eq!(p.len(), 5, "envelope buffers are bounded by bytes");
    }

    #[test]
    fn reuses_and_bounds() {
        let mut p = VecPool::new(1, 1024);
        p.give(Vec::with_capacity(100));
        p.give(Vec::with_capacity(100));
        assert_eq!(p.len(), 1);
        assert!(p.take().capacity() >= 100);
        p.give(Vec::with_capacity(4096));
        assert!(p.is_empty(), "too big to keep");
    }
}
