//! Reconnect pacing as `docs/protocol.md` §5.5 prescribes for agents: attempt *n* waits a
//! uniformly random time in `[0, min(cap, base × 2^n)]` ("full jitter"), and at least the
//! `retry_after_ms` the gateway sent.

use std::time::Duration;

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Backoff {
    pub base_ms: u64,
    pub cap_ms: u64,
}

impl Backoff {
    /// Upper bound of the wait before attempt `n` (0 = the first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u64.checked_shl(attempt.min(63)).unwrap_or(u64::MAX);
        Duration::from_millis(self.base_ms.saturating_mul(factor).min(self.cap_ms))
    }

    /// The wait before attempt `n`: uniform in `[0, ceiling(n)]`, raised to `retry_after`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, rng: &mut Rng) -> Duration {
        let ceiling = self.ceiling(attempt).as_micros() as u64;
        let jittered = Duration::from_micros(rng.below(ceiling.saturating_add(1)));
        jittered.max(retry_after.unwrap_or(Duration::ZERO))
    }
}

/// A small PRNG (splitmix64): jitter needs spread, not secrecy.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Seeded from the clock, the process id and `salt` (e.g. the device id).
    pub fn seeded(salt: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self::new(
            nanos ^ u64::from(std::process::id()).rotate_left(32) ^ salt.wrapping_mul(0x9E37_79B9),
        )
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let b = Backoff {
            base_ms: 1000,
            cap_ms: 300_000,
        };
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(1), Duration::from_secs(2));
        assert_eq!(b.ceiling(5), Duration::from_secs(32));
        assert_eq!(b.ceiling(9), Duration::from_secs(300));
        assert_eq!(b.ceiling(200), Duration::from_secs(300));
    }

    #[test]
    fn delays_stay_in_bounds_and_use_the_whole_range() {
        let b = Backoff {
            base_ms: 100,
            cap_ms: 1_000,
        };
        let mut rng = Rng::new(7);
        for attempt in 0..20 {
            let ceiling = b.ceiling(attempt);
            let delays: Vec<Duration> = (0..2000)
                .map(|_| b.delay(attempt, None, &mut rng))
                .collect();
            assert!(delays.iter().all(|&d| d <= ceiling));
            let low = delays.iter().filter(|&&d| d < ceiling / 4).count();
            let high = delays.iter().filter(|&&d| d > ceiling * 3 / 4).count();
            assert!(
                (350..650).contains(&low),
                "attempt {attempt}: {low} in the lowest quarter"
            );
            assert!(
                (350..650).contains(&high),
                "attempt {attempt}: {high} in the top quarter"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let b = Backoff {
            base_ms: 100,
            cap_ms: 100,
        };
        let mut rng = Rng::new(1);
        for _ in 0..100 {
            let d = b.delay(3, Some(Duration::from_millis(1500)), &mut rng);
            assert_eq!(d, Duration::from_millis(1500));
        }
        let zero = Backoff {
            base_ms: 0,
            cap_ms: 0,
        };
        assert_eq!(zero.delay(10, None, &mut rng), Duration::ZERO);
    }
}
