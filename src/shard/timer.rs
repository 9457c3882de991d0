//! A hashed timer wheel for connection deadlines (handshake, head, idle, close).
//!
//! Entries are hints, not the truth: a connection keeps its own deadline and the wheel only
//! says "look at this connection around then". Pushing a deadline later (every received byte
//! does, for the idle timeout) therefore costs nothing; when the hint fires the shard
//! re-checks and re-inserts if the deadline moved. Resolution is one tick (100 ms); deadlines
//! beyond the wheel's span wait in the farthest slot and are re-inserted.

/// Milliseconds per tick.
pub const TICK_MS: u64 = 100;
const SLOTS: usize = 1024;

/// See the module docs.
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<(u32, u32)>>,
    /// The next tick to expire.
    next_tick: u64,
}

impl Default for TimerWheel {
    fn default() -> Self {
        Self::new()
    }
}

impl TimerWheel {
    /// An empty wheel at time 0.
    pub fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            next_tick: 0,
        }
    }

    /// The tick a deadline (ms) falls in, never before the next tick to expire.
    pub fn tick_of(&self, deadline_ms: u64) -> u64 {
        deadline_ms.div_ceil(TICK_MS).max(self.next_tick)
    }

    /// Adds a hint for `(slot, generation)` at `deadline_ms`; returns the tick it went to.
    pub fn insert(&mut self, deadline_ms: u64, slot: u32, generation: u32) -> u64 {
        let tick = self
            .tick_of(deadline_ms)
            .min(self.next_tick + SLOTS as u64 - 1);
        self.slots[(tick % SLOTS as u64) as usize].push((slot, generation));
        tick
    }

    /// Moves time to `now_ms`, appending `(slot, generation, tick)` of every due hint.
    pub fn advance(&mut self, now_ms: u64, due: &mut Vec<(u32, u32, u64)>) {
        let now_tick = now_ms / TICK_MS;
        while self.next_tick <= now_tick {
            let t = self.next_tick;
            let slot = &mut self.slots[(t % SLOTS as u64) as usize];
            due.extend(slot.drain(..).map(|(s, g)| (s, g, t)));
            if slot.capacity() > 4096 {
                slot.shrink_to(64);
            }
            self.next_tick += 1;
        }
    }

    /// Milliseconds from `now_ms` until the next tick boundary worth waking for, if any hint
    /// is pending (bounded by one second so the loop also notices other deadlines).
    pub fn next_wake_ms(&self, now_ms: u64) -> Option<u64> {
        let pending = self.slots.iter().any(|s| !s.is_empty());
        pending.then(|| (self.next_tick * TICK_MS).saturating_sub(now_ms).min(1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_or_after_deadline_never_before() {
        let mut w = TimerWheel::new();
        w.insert(250, 1, 0);
        w.insert(1000, 2, 0);
        let mut due = Vec::new();
        w.advance(200, &mut due);
        assert!(due.is_empty());
        w.advance(300, &mut due);
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1]);
        due.clear();
        w.advance(999, &mut due);
        assert!(due.is_empty());
        w.advance(1000, &mut due);
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn far_deadlines_wait_in_the_last_slot() {
        let mut w = TimerWheel::new();
        let t = w.insert(10_000_000, 7, 3);
        assert_eq!(t, SLOTS as u64 - 1);
        let mut due = Vec::new();
        w.advance(TICK_MS * SLOTS as u64, &mut due);
        assert_eq!(due, vec![(7, 3, SLOTS as u64 - 1)]);
    }

    #[test]
    fn past_deadlines_fire_on_the_next_advance() {
        let mut w = TimerWheel::new();
        let mut due = Vec::new();
        w.advance(5000, &mut due);
        w.insert(10, 1, 1);
        w.advance(5000, &mut due);
        assert!(due.is_empty(), "goes to the next tick");
        w.advance(5100, &mut due);
        assert_eq!(due.len(), 1);
    }
}
