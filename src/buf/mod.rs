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
