use std::time::Duration;

use crate::strategy::fast_rand;

/// How long the failover layer waits before each retry.
///
/// Retrying at once turns a brief hiccup (a backend restarting, a full accept queue) into a
/// burst of traffic at the moment the fleet is weakest, and many proxies retrying in lockstep
/// make it worse. The default is Envoy's: a fully jittered exponential back-off with a 25 ms
/// base and a 250 ms cap, so the `n`-th retry waits a random time in
/// `0 .. min(250 ms, 25 ms × (2ⁿ − 1))`: under 25 ms, then under 75 ms, under 175 ms, then
/// under 250 ms. Full jitter spreads the retries of many requests evenly over that range.
///
/// A wait never outlives the request: when the [deadline](super::FailoverLayer::deadline)
/// would pass before the wait ends, the request ends at once with
/// [`Error::is_deadline`](super::Error::is_deadline) instead of sleeping past it. Retries are
/// still granted by the [`RetryBudget`](super::RetryBudget) first.
///
/// ```
/// use std::time::Duration;
/// use lbkit::failover::Backoff;
///
/// let envoy = Backoff::default();
/// assert_eq!(envoy.max_delay(1), Duration::from_millis(25));
/// assert_eq!(envoy.max_delay(2), Duration::from_millis(75));
/// assert_eq!(envoy.max_delay(4), Duration::from_millis(250));
/// assert!(envoy.delay(3) < Duration::from_millis(175));
///
/// assert_eq!(Backoff::none().delay(5), Duration::ZERO);
/// assert_eq!(Backoff::fixed(Duration::from_millis(10)).delay(7), Duration::from_millis(10));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: bool,
}

impl Backoff {
    /// A fully jittered exponential back-off: the `n`-th retry (from 1) waits a random time in
    /// `0 .. min(max, base × (2ⁿ − 1))`. `max` below `base` is raised to `base`.
    pub fn exponential(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            jitter: true,
        }
    }

    /// The same wait, `delay`, before every retry, without jitter (as HAProxy's fixed
    /// turn-around time).
    pub fn fixed(delay: Duration) -> Self {
        Backoff {
            base: delay,
            max: delay,
            jitter: false,
        }
    }

    /// No wait: retries are sent at once (lbkit's behaviour before back-off existed).
    pub fn none() -> Self {
        Backoff::fixed(Duration::ZERO)
    }

    /// Whether a retry waits at all.
    pub fn is_none(&self) -> bool {
        self.max.is_zero()
    }

    /// The longest the `retry`-th retry (from 1) may wait: `min(max, base × (2ⁿ − 1))`, or
    /// the fixed delay.
    pub fn max_delay(&self, retry: u32) -> Duration {
        if !self.jitter {
            return self.base;
        }
        // 2ⁿ − 1 grows past any cap quickly: stop doubling once there.
        let factor = 1u32
            .checked_shl(retry.min(31))
            .map_or(u32::MAX, |f| f.saturating_sub(1));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The wait before the `retry`-th retry (from 1): uniformly random below
    /// [`max_delay`](Backoff::max_delay) with jitter, exactly it without.
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, fast_rand::u64())
    }

    /// [`delay`](Backoff::delay) with the random draw given: `random` spread over
    /// `0 .. max_delay` (a pure function, for tests).
    fn delay_with(&self, retry: u32, random: u64) -> Duration {
        let max = self.max_delay(retry);
        if !self.jitter || max.is_zero() {
            return max;
        }
        // Nanoseconds fit in u64 for any cap below 584 years.
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(((u128::from(random) * u128::from(nanos)) >> 64) as u64)
    }
}

impl Default for Backoff {
    /// Envoy's default: 25 ms base, 250 ms cap, full jitter.
    fn default() -> Self {
        Backoff::exponential(Duration::from_millis(25), Duration::from_millis(250))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn envoy_ranges_grow_then_cap() {
        let b = Backoff::default();
        let caps: Vec<_> = (1..=6).map(|n| b.max_delay(n)).collect();
        assert_eq!(
            caps,
            [25 * MS, 75 * MS, 175 * MS, 250 * MS, 250 * MS, 250 * MS]
        );
        // No overflow however many retries.
        assert_eq!(b.max_delay(u32::MAX), 250 * MS);
        assert_eq!(Backoff::exponential(MS, Duration::ZERO).max_delay(3), MS);
    }

    #[test]
    fn full_jitter_spans_the_range_and_stays_below_it() {
        let b = Backoff::default();
        for retry in 1..=5 {
            let max = b.max_delay(retry);
            // The extremes of the draw map to the ends of the range.
            assert_eq!(b.delay_with(retry, 0), Duration::ZERO);
            assert!(b.delay_with(retry, u64::MAX) < max);
            assert!(b.delay_with(retry, u64::MAX) >= max - Duration::from_nanos(1));
            assert_eq!(b.delay_with(retry, 1 << 63), max / 2);
            // Real draws: always in range, and spread over it (10 000 draws, quarters hit).
            let mut quarters = [0u32; 4];
            for _ in 0..10_000 {
                let d = b.delay(retry);
                assert!(d < max, "retry {retry}: {d:?} >= {max:?}");
                quarters[(d.as_nanos() * 4 / max.as_nanos()) as usize] += 1;
            }
            assert!(quarters.iter().all(|&q| q > 1_000), "{quarters:?}");
        }
    }

    #[test]
    fn fixed_and_none() {
        let f = Backoff::fixed(40 * MS);
        assert!((1..10).all(|n| f.delay(n) == 40 * MS && f.max_delay(n) == 40 * MS));
        assert!(!f.is_none());
        let none = Backoff::none();
        assert!(none.is_none() && none.delay(1) == Duration::ZERO);
        assert!(Backoff::exponential(Duration::ZERO, Duration::ZERO).is_none());
        assert!(!Backoff::default().is_none());
    }
}
