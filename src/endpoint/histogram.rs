use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two: each bucket spans a quarter of an octave.
const SUB_BITS: u32 = 2;
const SUB: u64 = 1 << SUB_BITS;
/// The power of two where the log-scale buckets start (2^10 ns, about 1 µs); bucket 0 holds
/// everything below it.
const FIRST_OCTAVE: u32 = 10;

/// How many buckets a [`LatencyHistogram`] has.
pub(crate) const BUCKETS: usize = 128;

/// The bucket of a latency of `ns` nanoseconds.
#[inline]
fn bucket_of(ns: u64) -> usize {
    if ns < 1 << FIRST_OCTAVE {
        return 0;
    }
    let msb = 63 - ns.leading_zeros();
    let sub = (ns >> (msb - SUB_BITS)) & (SUB - 1);
    let i = 1 + ((msb - FIRST_OCTAVE) as u64) * SUB + sub;
    (i as usize).min(BUCKETS - 1)
}

/// The lower and upper bounds of bucket `i`, in nanoseconds.
fn bounds(i: usize) -> (u64, u64) {
    if i == 0 {
        return (0, 1 << FIRST_OCTAVE);
    }
    let k = (i - 1) as u64;
    let msb = FIRST_OCTAVE + (k / SUB) as u32;
    let sub = k % SUB;
    let shift = msb - SUB_BITS;
    ((SUB + sub) << shift, (SUB + sub + 1) << shift)
}

/// A fixed-size latency histogram made of atomics: recording is one `fetch_add` on a bucket
/// and one on the running sum, with no lock and no allocation, so it can sit on the request
/// path.
///
/// Buckets are log-scale, four per power of two, from 1 µs up to about 36 minutes (below 1 µs
/// is one bucket; above the last bound counts in the last bucket). A quantile read from it is
/// interpolated within its bucket, so it is within 12.5 % of the true value (better in
/// practice). Every endpoint has one, fed with each request's latency when it ends; read it
/// with [`EndpointState::latency`](crate::endpoint::EndpointState::latency).
pub(crate) struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one latency.
    #[inline]
    pub fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Latencies recorded so far (the sum of the buckets).
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// A copy of the counts as plain numbers. Recording goes on meanwhile: a snapshot taken
    /// under traffic may have a request in its bucket and not yet in the sum of latencies (so
    /// in the [`mean`](HistogramSnapshot::mean)), or the other way round.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().sum(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            buckets,
        }
    }
}

/// The counts of an endpoint's latency histogram at one moment, as plain data
/// ([`EndpointState::latency`](crate::endpoint::EndpointState::latency)): log-scale buckets,
/// four per power of two, from 1 µs to about 36 minutes, so a quantile read from it is within
/// 12.5 % of the true value.
///
/// Read quantiles from it ([`quantile`](HistogramSnapshot::quantile),
/// [`summary`](HistogramSnapshot::summary)), or subtract an earlier snapshot of the same
/// histogram ([`since`](HistogramSnapshot::since)) for the latencies of an interval.
#[derive(Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    buckets: Vec<u64>,
    count: u64,
    sum_ns: u64,
}

impl fmt::Debug for HistogramSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistogramSnapshot")
            .field("count", &self.count)
            .field("summary", &self.summary())
            .finish()
    }
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        HistogramSnapshot {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum_ns: 0,
        }
    }
}

impl HistogramSnapshot {
    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The mean latency (exact, from the running sum), zero when empty.
    pub fn mean(&self) -> Duration {
        match self.count {
            0 => Duration::ZERO,
            n => Duration::from_nanos(self.sum_ns / n),
        }
    }

    /// The latency below which a share `q` (0.0 to 1.0) of the counted latencies fall,
    /// interpolated within its bucket; zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        // The rank of the wanted latency, from 1 to count.
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if below + n >= rank {
                let (lo, hi) = bounds(i);
                let within = (rank - below) as f64 / n as f64;
                return Duration::from_nanos(lo + ((hi - lo) as f64 * within) as u64);
            }
            below += n;
        }
        Duration::from_nanos(bounds(BUCKETS - 1).1)
    }

    /// The usual quantiles, the mean and the maximum (the top of the slowest non-empty
    /// bucket: an upper bound, at most a quarter octave above the true value), interpolated as in
    /// [`quantile`](Self::quantile).
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count,
            mean: self.mean(),
            p50: self.quantile(0.5),
            p90: self.quantile(0.9),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            max: self.quantile(1.0),
        }
    }

    /// The latencies counted since `earlier`, a snapshot of the same histogram taken before
    /// this one (buckets subtracted, never below zero).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .zip(earlier.buckets.iter().chain(std::iter::repeat(&0)))
            .map(|(now, then)| now.saturating_sub(*then))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().sum(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            buckets,
        }
    }

    /// The non-empty buckets: each one's lower and upper bound and its count, from the
    /// fastest up.
    pub fn buckets(&self) -> impl Iterator<Item = (Duration, Duration, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| {
                let (lo, hi) = bounds(i);
                (Duration::from_nanos(lo), Duration::from_nanos(hi), n)
            })
    }
}

/// Latency quantiles, mean and maximum, as plain numbers: what the pool's statistics
/// ([`HistogramSnapshot::summary`], bucketed) and the simulator's reports (exact, over every
/// recorded latency) say about a set of requests. All zero when nothing was counted.
///
/// With the `serde` feature it serialises as a table of durations in human form
/// (`"1ms 250us"`, humantime's format).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct LatencySummary {
    /// Latencies counted.
    pub count: u64,
    /// The mean.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub mean: Duration,
    /// The median.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub p50: Duration,
    /// The 90th percentile.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub p90: Duration,
    /// The 99th percentile.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub p99: Duration,
    /// The 99.9th percentile.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub p999: Duration,
    /// The largest.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max: Duration,
}

impl LatencySummary {
    /// The exact summary of `nanos` (sorted in place): nearest-rank quantiles (the smallest
    /// value with at least a share q at or below it), the exact mean and maximum.
    #[cfg(feature = "sim")]
    pub(crate) fn exact(nanos: &mut [u64]) -> Self {
        if nanos.is_empty() {
            return LatencySummary::default();
        }
        nanos.sort_unstable();
        let n = nanos.len();
        let at = |q: f64| {
            let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
            Duration::from_nanos(nanos[rank - 1])
        };
        let sum: u128 = nanos.iter().map(|&x| u128::from(x)).sum();
        LatencySummary {
            count: n as u64,
            mean: Duration::from_nanos((sum / n as u128) as u64),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_nanos(nanos[n - 1]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_increasing() {
        let mut prev_hi = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bounds(i);
            assert_eq!(lo, prev_hi, "bucket {i} starts where {} ends", i.max(1) - 1);
            assert!(hi > lo);
            prev_hi = hi;
        }
        for ns in [
            0,
            1,
            1023,
            1024,
            1279,
            1280,
            5_000,
            1_000_000,
            123_456_789_012,
        ] {
            let (lo, hi) = bounds(bucket_of(ns));
            assert!(lo <= ns && ns < hi, "{ns} in [{lo}, {hi})");
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = LatencyHistogram::new();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 10_000);
        for (q, want_us) in [(0.5, 5_000.0), (0.9, 9_000.0), (0.99, 9_900.0)] {
            let got = s.quantile(q).as_nanos() as f64 / 1e3;
            assert!(
                (got - want_us).abs() / want_us < 0.125,
                "q{q}: {got} µs, want {want_us}"
            );
        }
        assert_eq!(s.mean(), Duration::from_nanos(5_000_500));
        let empty = HistogramSnapshot::default();
        assert_eq!(empty.quantile(0.99), Duration::ZERO);
        assert_eq!(s.since(&s).count(), 0);
        assert_eq!(s.since(&empty), s);
    }

    #[test]
    fn summary_max_bounds_the_slowest() {
        let h = LatencyHistogram::new();
        for ms in [1, 2, 300] {
            h.record(Duration::from_millis(ms));
        }
        let s = h.snapshot().summary();
        assert_eq!(s.count, 3);
        assert!(s.max >= Duration::from_millis(300), "{:?}", s.max);
        assert!(s.max <= Duration::from_millis(300) * 5 / 4, "{:?}", s.max);
        assert_eq!(
            HistogramSnapshot::default().summary(),
            LatencySummary::default()
        );
    }

    #[cfg(feature = "sim")]
    #[test]
    fn exact_summary_takes_nearest_ranks() {
        let mut nanos: Vec<u64> = (1..=1000).rev().collect();
        let s = LatencySummary::exact(&mut nanos);
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50, Duration::from_nanos(500));
        assert_eq!(s.p999, Duration::from_nanos(999));
        assert_eq!(s.max, Duration::from_nanos(1000));
        assert_eq!(s.mean, Duration::from_nanos(500));
        assert_eq!(LatencySummary::exact(&mut []), LatencySummary::default());
    }
}
