//! Buffers: a per-shard pool of output `Vec`s, so connections borrow a send buffer only while
//! they have something to send and an idle connection holds none.

/// A bounded free list of `Vec<u8>`s.
#[derive(Debug)]
pub struct VecPool {
    free: Vec<Vec<u8>>,
    max_pooled: usize,
    max_capacity: usize,
}

impl VecPool {
    /// Keeps at most `max_pooled` vectors of at most `max_capacity` bytes each.
    pub fn new(max_pooled: usize, max_capacity: usize) -> Self {
        Self {
            free: Vec::new(),
            max_pooled,
            max_capacity,
        }
    }

    /// An empty vector (with capacity when one was pooled).
    pub fn take(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_default()
    }

    /// Returns a vector for reuse (dropped if the pool is full or it grew too big).
    pub fn give(&mut self, mut v: Vec<u8>) {
        if v.capacity() == 0 || self.free.len() >= self.max_pooled {
            return;
        }
        if v.capacity() > self.max_capacity {
            v = Vec::new();
            if v.capacity() == 0 {
                return;
            }
        }
        v.clear();
        self.free.push(v);
    }

    /// A vector with room for `need` bytes and at most twice that: one of the last few pooled
    /// that fits, or a new one of exactly `need`. For buffers that stay queued (relay data
    /// frames), so a small frame never pins a large buffer.
    pub fn take_fitting(&mut self, need: usize) -> Vec<u8> {
        let n = self.free.len();
        for i in (n.saturating_sub(8)..n).rev() {
            let c = self.free[i].capacity();
            if c >= need && c <= need.saturating_mul(2) {
                return self.free.swap_remove(i);
            }
        }
        Vec::with_capacity(need)
    }

    /// Vectors currently pooled.
    pub fn len(&self) -> usize {
        self.free.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
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
