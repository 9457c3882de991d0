//! A per-source limit on failed registration attempts, so keys cannot be guessed at speed.
//!
//! Pure and in memory: the caller passes `now`, and each shard (or the control thread) keeps
//! its own [`FailureLimiter`]. With `N` shards a source spread over all of them gets at most
//! `N` times the configured rate — still far too slow to guess a 100-bit key.
//!
//! # Algorithm
//!
//! GCRA, the token bucket written as one timestamp per source: each source has a *theoretical
//! arrival time* `tat`; a failure moves it `interval = 60 s / failures_per_minute` later (from
//! `now` if it lies in the past). An attempt is allowed while `tat - now ≤ (burst - 1) ×
//! interval`, i.e. a fresh source may fail `burst` times in a row, then once per `interval`.
//! Only failures count: successful registrations and throttled attempts do not, so a user
//! behind the same NAT as an attacker is slowed down, not locked out for longer.
//!
//! Sources are IPv4 addresses and IPv6 /64 networks (one IPv6 host usually owns a whole /64);
//! IPv4-mapped IPv6 addresses count as IPv4.
//!
//! # Memory
//!
//! At most [`RateLimitConfig::max_sources`] sources are tracked (about 48 bytes each). A
//! source is forgotten once its `tat` has passed (it would be allowed a full burst again).
//! When the table is full and nothing can be forgotten, new sources share one *overflow*
//! bucket: an attacker with many addresses then slows down every new source a little, but
//! memory stays bounded and tracked sources keep their own state.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The limiter's settings (config section `[registration.rate_limit]` or similar).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Failed attempts per minute per source once the burst is used up. Default 10: a person
    /// mistyping a key is never slowed down, a guesser gets 14,400 tries a day against a
    /// 2^100 key space. 0 disables the limiter.
    pub failures_per_minute: u32,
    /// Failures in a row a fresh source may make before it is slowed down. Default 5.
    pub burst: u32,
    /// Most sources tracked at once. Default 65,536 (about 3 MiB).
    pub max_sources: usize,
}

impl Default for RateLimitConfig {
    fn default() -> RateLimitConfig {
        RateLimitConfig {
            failures_per_minute: 10,
            burst: 5,
            max_sources: 65_536,
        }
    }
}

/// An attempt refused by the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many failed attempts from this address; retry in {} s", retry_after.as_secs_f64().ceil())]
pub struct Throttled {
    /// How long until one more attempt is allowed (tell the device: it goes with
    /// [`Reason::RateLimited`](super::Reason::RateLimited)).
    pub retry_after: Duration,
}

/// The source an address is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6Net(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6Net((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Per-source failure limiter (see the module docs).
#[derive(Debug)]
pub struct FailureLimiter {
    config: RateLimitConfig,
    interval: Duration,
    tolerance: Duration,
    tats: HashMap<Source, Instant>,
    overflow: Option<Instant>,
    last_prune: Option<Instant>,
}

impl FailureLimiter {
    /// A limiter with these settings (`burst` 0 is taken as 1).
    pub fn new(config: RateLimitConfig) -> FailureLimiter {
        let interval = if config.failures_per_minute == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(60) / config.failures_per_minute
        };
        FailureLimiter {
            config,
            interval,
            tolerance: interval * config.burst.max(1).saturating_sub(1),
            tats: HashMap::new(),
            overflow: None,
            last_prune: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    fn enabled(&self) -> bool {
        self.config.failures_per_minute > 0
    }

    fn tat(&self, source: Source) -> Option<Instant> {
        self.tats.get(&source).copied().or_else(|| {
            (self.tats.len() >= self.config.max_sources)
                .then_some(self.overflow)
                .flatten()
        })
    }

    /// May `ip` make an attempt at `now`? Does not count anything; call
    /// [`record_failure`](FailureLimiter::record_failure) when the attempt fails.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Throttled> {
        if !self.enabled() {
            return Ok(());
        }
        let Some(tat) = self.tat(Source::from(ip)) else {
            return Ok(());
        };
        let ahead = tat.saturating_duration_since(now);
        if ahead <= self.tolerance {
            Ok(())
        } else {
            Err(Throttled {
                retry_after: ahead - self.tolerance,
            })
        }
    }

    /// Counts a failed attempt from `ip` at `now`.
    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) {
        if !self.enabled() {
            return;
        }
        let source = Source::from(ip);
        let interval = self.interval;
        let next = move |tat: Option<Instant>| tat.map_or(now, |t| t.max(now)) + interval;
        if let Some(tat) = self.tats.get_mut(&source) {
            *tat = next(Some(*tat));
            return;
        }
        if self.tats.len() >= self.config.max_sources {
            self.prune_at_most_once_a_second(now);
        }
        if self.tats.len() < self.config.max_sources {
            self.tats.insert(source, next(None));
        } else {
            self.overflow = Some(next(self.overflow));
        }
    }

    /// Forgets sources whose failures have all expired. Cheap enough to call every few
    /// seconds; [`record_failure`](FailureLimiter::record_failure) also calls it when the
    /// table is full.
    pub fn prune(&mut self, now: Instant) {
        self.tats.retain(|_, tat| *tat > now);
        if self.overflow.is_some_and(|t| t <= now) {
            self.overflow = None;
        }
        self.last_prune = Some(now);
    }

    fn prune_at_most_once_a_second(&mut self, now: Instant) {
        if self
            .last_prune
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.prune(now);
        }
    }

    /// How many sources are tracked.
    pub fn tracked(&self) -> usize {
        self.tats.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limiter(per_minute: u32, burst: u32, max_sources: usize) -> FailureLimiter {
        FailureLimiter::new(RateLimitConfig {
            failures_per_minute: per_minute,
            burst,
            max_sources,
        })
    }

    #[test]
    fn a_burst_then_one_per_interval() {
        let mut l = limiter(6, 3, 100); // interval 10 s
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            l.check(a, t0).unwrap();
            l.record_failure(a, t0);
        }
        let t = l.check(a, t0).unwrap_err();
        assert_eq!(t.retry_after, Duration::from_secs(10));
        // Another address is not affected.
        l.check(ip("192.0.2.2"), t0).unwrap();
        // Just before the interval: still refused, with the remaining wait.
        assert_eq!(
            l.check(a, t0 + Duration::from_secs(4))
                .unwrap_err()
                .retry_after,
            Duration::from_secs(6)
        );
        // After it: one attempt, then refused again.
        let t1 = t0 + Duration::from_secs(10);
        l.check(a, t1).unwrap();
        l.record_failure(a, t1);
        assert_eq!(
            l.check(a, t1).unwrap_err().retry_after,
            Duration::from_secs(10)
        );
        // After a long pause the full burst is back.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            l.check(a, t2).unwrap();
            l.record_failure(a, t2);
        }
        assert!(l.check(a, t2).is_err());
    }

    #[test]
    fn throttled_attempts_do_not_extend_the_wait() {
        let mut l = limiter(60, 1, 100); // interval 1 s, burst 1
        let t0 = Instant::now();
        let a = ip("198.51.100.7");
        l.record_failure(a, t0);
        for ms in [0, 100, 500, 900] {
            assert!(l.check(a, t0 + Duration::from_millis(ms)).is_err());
        }
        l.check(a, t0 + Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let mut l = limiter(1, 1, 100);
        let t0 = Instant::now();
        l.record_failure(ip("2001:db8:1:2::1"), t0);
        assert!(l.check(ip("2001:db8:1:2:ffff::9"), t0).is_err());
        l.check(ip("2001:db8:1:3::1"), t0).unwrap();
        l.record_failure(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)), t0);
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 5).to_ipv6_mapped());
        assert!(l.check(mapped, t0).is_err());
        assert!(l.check(IpAddr::V6(Ipv6Addr::LOCALHOST), t0).is_ok());
    }

    #[test]
    fn memory_is_bounded_and_recovered() {
        let mut l = limiter(60, 1, 4);
        let t0 = Instant::now();
        for i in 0..4u8 {
            l.record_failure(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)), t0);
        }
        assert_eq!(l.tracked(), 4);
        // A fifth source goes to the shared overflow bucket.
        let fifth = ip("10.0.0.99");
        l.check(fifth, t0).unwrap();
        l.record_failure(fifth, t0);
        assert_eq!(l.tracked(), 4);
        assert!(l.check(fifth, t0).is_err());
        assert!(l.check(ip("10.0.0.100"), t0).is_err(), "overflow is shared");
        // Tracked sources keep their own state.
        assert!(l.check(ip("10.0.0.1"), t0).is_err());
        // Once their failures expire, sources are forgotten and new ones tracked again.
        let later = t0 + Duration::from_secs(2);
        l.record_failure(ip("10.0.0.200"), later);
        assert_eq!(l.tracked(), 1);
        l.check(ip("10.0.0.100"), later).unwrap();
    }

    #[test]
    fn zero_disables() {
        let mut l = limiter(0, 0, 0);
        let t0 = Instant::now();
        for _ in 0..1000 {
            l.record_failure(ip("192.0.2.1"), t0);
        }
        l.check(ip("192.0.2.1"), t0).unwrap();
        assert_eq!(l.tracked(), 0);
    }
}
