//! The wake-up probe of `loadtest relay`: a thread of its own that sleeps 1 ms at a time
//! during the measurement and records how late it wakes. It does nothing else, so its
//! lateness is the machine's (timer, scheduler, and on a VM the hypervisor): the floor under
//! every wake-up in a round trip. A round trip wakes four or more threads (the management
//! sender and reader, a gateway shard or two, a device worker), so when this probe is late by
//! milliseconds at its 99.9th percentile, the round trip's p99 cannot be under that.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How late the probe woke, in ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WakeupFigures {
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Wake-ups more than 2 ms late, and the time they lost beyond the 1 ms asked for.
    pub late_over_2ms: u64,
    pub lost_in_those_ms: f64,
}

/// Starts the probe: it waits until `from`, then sleeps 1 ms at a time until `until`.
pub fn start(from: Instant, until: Instant) -> JoinHandle<WakeupFigures> {
    std::thread::Builder::new()
        .name("wakeup-probe".to_owned())
        .spawn(move || {
            if let Some(d) = from.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            let mut late = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                late.push(t.elapsed().saturating_sub(Duration::from_millis(1)));
            }
            figures(late)
        })
        .expect("spawn the wake-up probe")
}

fn figures(mut late: Vec<Duration>) -> WakeupFigures {
    if late.is_empty() {
        return WakeupFigures::default();
    }
    late.sort_unstable();
    let ms = |d: Duration| crate::summary::round3(d.as_secs_f64() * 1000.0);
    let at = |q: f64| late[((late.len() as f64 * q) as usize).min(late.len() - 1)];
    let over: Vec<&Duration> = late
        .iter()
        .filter(|d| **d > Duration::from_millis(2))
        .collect();
    WakeupFigures {
        samples: late.len() as u64,
        p50_ms: ms(at(0.50)),
        p99_ms: ms(at(0.99)),
        p999_ms: ms(at(0.999)),
        max_ms: ms(late[late.len() - 1]),
        late_over_2ms: over.len() as u64,
        lost_in_those_ms: crate::summary::round2(
            over.iter().map(|d| d.as_secs_f64() * 1000.0).sum(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_known_lateness() {
        let mut late: Vec<Duration> = (0..1000).map(|_| Duration::from_micros(50)).collect();
        late[10] = Duration::from_millis(15);
        late[20] = Duration::from_millis(3);
        late[30] = Duration::from_micros(1500);
        let f = figures(late);
        assert_eq!(f.samples, 1000);
        assert_eq!(f.p50_ms, 0.05);
        assert_eq!(f.p999_ms, 15.0);
        assert_eq!(f.max_ms, 15.0);
        assert_eq!((f.late_over_2ms, f.lost_in_those_ms), (2, 18.0));
        assert_eq!(figures(Vec::new()).samples, 0);
    }

    #[test]
    fn the_probe_runs_for_its_window() {
        let now = Instant::now();
        let f = start(now, now + Duration::from_millis(30)).join().unwrap();
        // At most 30 sleeps of at least 1 ms, and at least one.
        assert!((1..=30).contains(&f.samples), "{f:?}");
    }
}
