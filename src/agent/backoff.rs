//! Reconnect pacing (`docs/protocol.md` §5.5): exponential backoff with full jitter, and a stop
//! handle that interrupts the waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Exponential backoff with full jitter: attempt *n* waits a uniformly random time in
/// `[0, min(cap, base × 2^n)]`, and at least `retry_after` when the gateway sent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// `base` (the fleetgate agent: 1 s).
    pub base: Duration,
    /// `cap` (the fleetgate agent: 5 min).
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The upper bound for attempt `attempt` (0-based): `min(cap, base × 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random wait for attempt `attempt`, at least `retry_after`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let jitter = self.ceiling(attempt).mul_f64(random_unit());
        jitter.max(retry_after.unwrap_or_default())
    }
}

/// A uniformly random number in `[0, 1]` (from the OS random source; 0.5 if it fails).
pub fn random_unit() -> f64 {
    match getrandom::u64() {
        Ok(v) => (v >> 11) as f64 / ((1u64 << 53) - 1) as f64,
        Err(_) => 0.5,
    }
}

/// A random index below `n` (`n` > 0).
pub fn random_index(n: usize) -> usize {
    match getrandom::u64() {
        Ok(v) => (v % n as u64) as usize,
        Err(_) => 0,
    }
}

/// Stops a running agent: [`StopHandle::stop`] from any thread (or a signal handler through
/// [`StopHandle::flag`]); the agent notices within its poll interval (default 250 ms), closes
/// its session with close code 1000 and returns.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// A fresh handle (not stopped).
    pub fn new() -> StopHandle {
        StopHandle::default()
    }

    /// A handle over an existing flag (e.g. one registered with `signal_hook::flag`).
    pub fn from_flag(flag: Arc<AtomicBool>) -> StopHandle {
        StopHandle(flag)
    }

    /// The underlying flag.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Asks the agent to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Sleeps `d` in slices of at most 50 ms; returns `true` early when stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.is_stopped() {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(1), Duration::from_secs(2));
        assert_eq!(b.ceiling(8), Duration::from_secs(256));
        assert_eq!(b.ceiling(9), Duration::from_secs(300));
        assert_eq!(b.ceiling(40), Duration::from_secs(300));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn delays_stay_in_bounds_and_spread() {
        let b = Backoff::default();
        for attempt in 0..12 {
            let mut min = Duration::MAX;
            let mut max = Duration::ZERO;
            for _ in 0..200 {
                let d = b.delay(attempt, None);
                assert!(d <= b.ceiling(attempt), "{d:?} > {:?}", b.ceiling(attempt));
                min = min.min(d);
                max = max.max(d);
            }
            // Full jitter: the 200 draws cover most of [0, ceiling].
            assert!(
                min < b.ceiling(attempt) / 4,
                "attempt {attempt}: min {min:?}"
            );
            assert!(
                max > b.ceiling(attempt) * 3 / 4,
                "attempt {attempt}: max {max:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let b = Backoff::default();
        for _ in 0..100 {
            assert!(b.delay(0, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
        }
        let fast = Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(40),
        };
        assert_eq!(fast.ceiling(5), Duration::from_millis(40));
        assert!(fast.delay(5, None) <= Duration::from_millis(40));
    }

    #[test]
    fn random_index_in_range() {
        let mut seen = [false; 4];
        for _ in 0..400 {
            seen[random_index(4)] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn stop_interrupts_sleep() {
        let s = StopHandle::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            s2.stop();
        });
        let start = Instant::now();
        assert!(s.sleep(Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(2));
        t.join().unwrap();
        assert!(!StopHandle::new().sleep(Duration::from_millis(1)));
    }
}
