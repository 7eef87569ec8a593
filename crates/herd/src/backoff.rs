//! Restart pacing: exponential backoff and crash-loop intensity.
//!
//! Both are pure state machines (time and randomness come in as arguments) so
//! they are tested exhaustively with proptest; the supervisor owns one of each
//! per slot.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How restarts of one slot are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The delay after the second quick failure in a row (the first restart is immediate).
    pub initial: Duration,
    /// The cap the doubling stops at; a failed slot is retried at this pace.
    pub max: Duration,
    /// A worker that stayed up this long was healthy: the next restart is immediate.
    pub stable: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            stable: Duration::from_secs(10),
        }
    }
}

/// Exponential backoff with jitter for one slot.
///
/// A worker that exits after a stable run is replaced at once (a kill -9 of a
/// healthy worker should cost milliseconds, not 100 ms). Each further exit
/// before `stable` doubles the delay: `initial`, `2·initial`, … up to `max`.
/// Jitter scales each delay into `[0.75, 1.0]` of its nominal value so a herd
/// of slots that crashed together does not restart in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    quick_failures: u32,
}

impl Backoff {
    /// A fresh backoff: the next restart is immediate.
    pub fn new(policy: BackoffPolicy) -> Self {
        Backoff {
            policy,
            quick_failures: 0,
        }
    }

    /// The delay before restarting a worker that ran for `uptime`.
    /// `jitter` is a random number in `[0, 1)`.
    pub fn next_delay(&mut self, uptime: Duration, jitter: f64) -> Duration {
        if uptime >= self.policy.stable {
            self.quick_failures = 0;
        }
        let nominal = self.nominal(self.quick_failures);
        self.quick_failures = self.quick_failures.saturating_add(1);
        let jitter = jitter.clamp(0.0, 1.0);
        nominal.mul_f64(0.75 + 0.25 * jitter).min(self.policy.max)
    }

    /// The delay at the cap, for slots marked failed.
    pub fn cap(&self) -> Duration {
        self.policy.max
    }

    fn nominal(&self, quick_failures: u32) -> Duration {
        if quick_failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (quick_failures - 1).min(32);
        self.policy
            .initial
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.policy.max)
    }
}

/// Crash-loop detection: more than `max_restarts` restarts within `within`.
#[derive(Debug, Clone)]
pub struct Intensity {
    max_restarts: u32,
    within: Duration,
    recent: VecDeque<Instant>,
}

impl Intensity {
    /// A detector that trips on the `max_restarts + 1`-th restart inside `within`.
    pub fn new(max_restarts: u32, within: Duration) -> Self {
        Intensity {
            max_restarts,
            within,
            recent: VecDeque::new(),
        }
    }

    /// Records a restart at `now`; returns true when the limit is exceeded.
    pub fn record(&mut self, now: Instant) -> bool {
        while let Some(&first) = self.recent.front() {
            if now.saturating_duration_since(first) >= self.within {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back(now);
        // Never keep more than needed to decide.
        while self.recent.len() > self.max_restarts as usize + 1 {
            self.recent.pop_front();
        }
        self.recent.len() > self.max_restarts as usize
    }

    /// Forgets past restarts (after a stable run).
    pub fn reset(&mut self) {
        self.recent.clear();
    }
}

/// A small, fast, non-cryptographic random source for jitter (xorshift64*).
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// Seeded from the clock and pid: distinct per process, no syscalls later.
    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Jitter((nanos ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    /// Seeded with `seed`: the same numbers every run (tests).
    pub fn seeded(seed: u64) -> Self {
        Jitter(seed | 1)
    }

    /// A number in `[0, 1)`.
    pub fn sample(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy::default()
    }

    #[test]
    fn doubles_from_immediate_to_the_cap() {
        let mut b = Backoff::new(policy());
        let quick = Duration::from_millis(5);
        let delays: Vec<_> = (0..12).map(|_| b.next_delay(quick, 1.0)).collect();
        assert_eq!(delays[0], Duration::ZERO);
        assert_eq!(delays[1], Duration::from_millis(100));
        assert_eq!(delays[2], Duration::from_millis(200));
        assert_eq!(delays[3], Duration::from_millis(400));
        assert_eq!(delays[11], Duration::from_secs(30));
    }

    #[test]
    fn stable_run_resets() {
        let mut b = Backoff::new(policy());
        for _ in 0..5 {
            b.next_delay(Duration::ZERO, 0.5);
        }
        assert_eq!(
            b.next_delay(Duration::from_secs(10), 0.5),
            Duration::ZERO,
            "a worker up for --stable restarts at once"
        );
        assert!(b.next_delay(Duration::ZERO, 0.0) >= Duration::from_millis(75));
    }

    #[test]
    fn intensity_trips_on_the_limit_plus_one() {
        let t0 = Instant::now();
        let mut i = Intensity::new(5, Duration::from_secs(30));
        for k in 0..5 {
            assert!(!i.record(t0 + Duration::from_secs(k)), "restart {k}");
        }
        assert!(i.record(t0 + Duration::from_secs(5)));
        // Spread out beyond the window: never trips.
        let mut i = Intensity::new(5, Duration::from_secs(30));
        for k in 0..50 {
            assert!(!i.record(t0 + Duration::from_secs(7 * k)));
        }
    }

    proptest! {
        #[test]
        fn delay_is_bounded_and_monotone(
            initial_ms in 1u64..5_000,
            max_ms in 1u64..120_000,
            jitters in proptest::collection::vec(0.0f64..1.0, 1..80),
        ) {
            let p = BackoffPolicy {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms),
                stable: Duration::from_secs(10),
            };
            let mut b = Backoff::new(p);
            let mut last_nominal = Duration::ZERO;
            for (n, j) in jitters.iter().enumerate() {
                let d = b.next_delay(Duration::from_millis(1), *j);
                prop_assert!(d <= p.max, "delay {d:?} over cap");
                let nominal = b.nominal(n as u32);
                prop_assert!(nominal >= last_nominal);
                prop_assert!(d >= nominal.mul_f64(0.75).min(p.max).saturating_sub(Duration::from_nanos(1)));
                prop_assert!(d <= nominal);
                last_nominal = nominal;
            }
        }

        #[test]
        fn intensity_matches_a_naive_count(
            max in 0u32..10,
            within_ms in 1u64..10_000,
            gaps in proptest::collection::vec(0u64..3_000, 1..100),
        ) {
            let t0 = Instant::now();
            let mut i = Intensity::new(max, Duration::from_millis(within_ms));
            let mut times = Vec::new();
            let mut t = t0;
            for g in gaps {
                t += Duration::from_millis(g);
                times.push(t);
                let in_window = times
                    .iter()
                    .filter(|&&x| t.duration_since(x) < Duration::from_millis(within_ms))
                    .count();
                prop_assert_eq!(i.record(t), in_window > max as usize);
            }
        }

        #[test]
        fn jitter_is_in_unit_interval(seed in any::<u64>()) {
            let mut j = Jitter(seed | 1);
            for _ in 0..100 {
                let x = j.sample();
                prop_assert!((0.0..1.0).contains(&x));
            }
        }
    }
}
