//! The slow-start ramp as data: the curve of [`SlowStart`] and the weight a ramping endpoint
//! gets in a snapshot. The task that runs it lives in [`health`](crate::health), which is where
//! users find `SlowStart`; the pool only needs the curve, so it lives here, below both.

use std::time::Duration;

/// While an endpoint of a snapshot ramps up, every weight of that snapshot is multiplied by
/// this, so a ramp has room below an endpoint of weight 1.
pub(crate) const RAMP_SCALE: u32 = 10;

/// Slow start: a weight ramp for endpoints that come (back) up, so a cold server is not
/// flooded with its full share at once.
///
/// Once spawned on a pool, an endpoint ramps up when it becomes healthy again (its down mark
/// or its ejection is cleared) and when it joins a pool that already had endpoints. During
/// the ramp its weight is `weight × max(min_share, (elapsed / window) ^ (1 / aggression))`, as
/// in Envoy's slow start; the task republishes the pool's snapshot ten times per window, so
/// the weight climbs in steps of a tenth. While any endpoint of a snapshot ramps, every weight
/// in it is scaled by ten (proportions kept) so that an endpoint of weight 1 can ramp too;
/// [`Candidate::weight`](crate::endpoint::Candidate::weight) shows the scaled weight. Every
/// built-in strategy honours weights; with Maglev and the ring, a ramp moves keys onto the
/// endpoint in steps.
///
/// ```
/// use std::time::Duration;
/// use lbkit::{Endpoint, Pool, health::SlowStart, strategy::RoundRobin};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let pool = Pool::new(RoundRobin::new(), |ep: &Endpoint| ep.id().clone());
/// pool.extend([Endpoint::new("a"), Endpoint::new("b")]);
/// // An endpoint that comes back starts at 10 % of its weight and has all of it after 30 s.
/// SlowStart::new(Duration::from_secs(30)).spawn(&pool);
///
/// pool.insert(Endpoint::new("c")); // joins a running pool: ramps up
/// let weights: Vec<u32> = pool.snapshot().eligible().iter().map(|c| c.weight()).collect();
/// assert_eq!(weights, [10, 10, 1]);
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    window: Duration,
    min_share: f64,
    aggression: f64,
}

impl SlowStart {
    /// A ramp over `window`, starting at 10 % of the weight and climbing linearly (Envoy's
    /// defaults for `min_weight_percent` and `aggression`).
    pub fn new(window: Duration) -> Self {
        SlowStart {
            window,
            min_share: 0.1,
            aggression: 1.0,
        }
    }

    /// Sets the share of its weight an endpoint gets at the start of its ramp, from 0.0 to 1.0
    /// (default 0.1). The weight never goes below 1 whatever the share.
    pub fn min_share(mut self, share: f64) -> Self {
        self.min_share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            0.1
        };
        self
    }

    /// Sets the aggression of the ramp (default 1.0, linear): above 1 the weight climbs fast
    /// at first and slowly near the end, below 1 the other way round. Non-positive values are
    /// taken as 1.
    pub fn aggression(mut self, aggression: f64) -> Self {
        self.aggression = if aggression.is_finite() && aggression > 0.0 {
            aggression
        } else {
            1.0
        };
        self
    }

    /// The ramp window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The share of its weight an endpoint has after `elapsed` of its ramp; `None` once the
    /// ramp is over.
    pub fn share_after(&self, elapsed: Duration) -> Option<f64> {
        if elapsed >= self.window {
            return None;
        }
        let t = elapsed.as_secs_f64() / self.window.as_secs_f64();
        Some(t.powf(1.0 / self.aggression).max(self.min_share).min(1.0))
    }

    /// How often the snapshot is republished during a ramp: a tenth of the window.
    pub(crate) fn step(&self) -> Duration {
        (self.window / 10).max(Duration::from_millis(1))
    }
}

/// The weight of a ramping endpoint: `weight × share`, on the scale of [`RAMP_SCALE`].
pub(crate) fn ramped_weight(weight: u32, share: Option<f64>) -> u32 {
    let full = weight.saturating_mul(RAMP_SCALE);
    match share {
        Some(s) => ((f64::from(full) * s).round() as u32).clamp(1, full.max(1)),
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_climbs_from_min_to_full() {
        let s = SlowStart::new(Duration::from_secs(10));
        assert_eq!(s.share_after(Duration::ZERO), Some(0.1));
        assert_eq!(s.share_after(Duration::from_millis(500)), Some(0.1));
        assert_eq!(s.share_after(Duration::from_secs(5)), Some(0.5));
        assert_eq!(s.share_after(Duration::from_secs(10)), None);
        let fast = s.aggression(2.0);
        let half = fast.share_after(Duration::from_millis(2500)).unwrap();
        assert!((half - 0.5).abs() < 1e-9, "sqrt(0.25) = 0.5, got {half}");
    }

    #[test]
    fn ramped_weights_have_room_below_one() {
        assert_eq!(ramped_weight(1, None), 10);
        assert_eq!(ramped_weight(1, Some(0.1)), 1);
        assert_eq!(ramped_weight(1, Some(0.0)), 1);
        assert_eq!(ramped_weight(3, Some(0.5)), 15);
    }
}
