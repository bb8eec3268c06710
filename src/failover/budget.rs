use std::fmt;
use std::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many retries the failover layer may make, as a share of recent requests, so that
/// retries cannot multiply an outage.
///
/// When a backend fails, every request to it would otherwise be sent again, adding load
/// exactly when the system is weakest; with all backends failing, `n` attempts per request
/// multiply the traffic by `n`. A budget caps retries at a percentage of the requests seen
/// in a sliding window (plus a small reserve per second for quiet periods); past it, a failure
/// is returned as is. Finagle's design, with the rules and amounts of tower's
/// [`TpsBudget`](tower::retry::budget::TpsBudget), plus counters of retries made and refused;
/// unlike tower's, recording a request takes no lock (it is on every request's path).
///
/// Share one budget (it is inside an `Arc` in the layer) between every clone of a service.
///
/// ```
/// use std::time::Duration;
/// use lbkit::failover::RetryBudget;
///
/// // Retries up to 20 % of the requests of the last 10 s, plus 10 per second.
/// let budget = RetryBudget::default();
/// budget.deposit();
/// assert!(budget.withdraw());
/// // No reserve, one retry per 10 requests.
/// let strict = RetryBudget::new(Duration::from_secs(10), 0, 0.1);
/// assert!(!strict.withdraw());
/// assert_eq!(strict.refused(), 1);
/// ```
pub struct RetryBudget {
    tps: Option<Window>,
    retries: AtomicU64,
    refused: AtomicU64,
}

impl RetryBudget {
    /// A budget over a window of `ttl` (1 to 60 s) that allows `retry_percent` retries per
    /// request (0.2 = one retry for every five requests; up to 1000) plus `min_per_sec` retries
    /// per second whatever the traffic.
    ///
    /// # Panics
    ///
    /// If `ttl` is not between 1 and 60 seconds or `retry_percent` not between 0 and 1000
    /// (as tower's [`TpsBudget::new`](tower::retry::budget::TpsBudget::new)).
    pub fn new(ttl: Duration, min_per_sec: u32, retry_percent: f32) -> Self {
        RetryBudget {
            tps: Some(Window::new(ttl, min_per_sec, retry_percent)),
            retries: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// No limit: every failure that the policy allows is retried. For tests and for callers
    /// with a limit of their own.
    pub fn unlimited() -> Self {
        RetryBudget {
            tps: None,
            retries: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Records a request (the failover layer calls it once per request, not per retry).
    #[inline]
    pub fn deposit(&self) {
        if let Some(b) = &self.tps {
            b.put(b.deposit_amount);
        }
    }

    /// Takes one retry from the budget; `false` if there is none left.
    pub fn withdraw(&self) -> bool {
        let ok = match &self.tps {
            Some(b) => b.try_take(b.withdraw_amount),
            None => true,
        };
        let counter = if ok { &self.retries } else { &self.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        ok
    }

    /// Retries granted so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Retries refused so far (failures returned because the budget was spent).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Counters of one thread group, on a cache line of their own.
#[repr(align(64))]
#[derive(Debug, Default)]
struct Stripe(AtomicIsize);

/// How many stripes deposits are spread over (threads pick one each).
const STRIPES: usize = 8;
/// How many slots the window is cut into.
const SLOTS: usize = 10;

/// Finagle's (and tower's `TpsBudget`'s) sliding window of deposits and withdrawals, with the
/// same rules and amounts, built so that the per-request `put` takes no lock and writes no
/// cache line shared by all threads: it adds to its thread's stripe, and a lock is taken only
/// to move the stripes into the window's next slot, once per slot length (a tenth of the
/// window). tower's takes a mutex and bumps one shared counter on every deposit.
#[derive(Debug)]
struct Window {
    /// What was added and taken since the current slot began, per stripe.
    stripes: [Stripe; STRIPES],
    /// The committed slots of the window.
    slots: [AtomicIsize; SLOTS],
    /// Nanoseconds since `base` when the current slot ends.
    next_rotation: AtomicU64,
    /// The slot being filled and when it began; locked only to rotate.
    generation: Mutex<(usize, Instant)>,
    base: Instant,
    slot_len: Duration,
    reserve: isize,
    deposit_amount: isize,
    withdraw_amount: isize,
}

impl Window {
    fn new(ttl: Duration, min_per_sec: u32, retry_percent: f32) -> Self {
        // The limits and amounts of tower's `TpsBudget`, itself Finagle's.
        assert!(ttl >= Duration::from_secs(1) && ttl <= Duration::from_secs(60));
        assert!((0.0..=1000.0).contains(&retry_percent));
        assert!(min_per_sec < i32::MAX as u32);
        let (deposit_amount, withdraw_amount) = if retry_percent == 0.0 {
            (0, 1)
        } else if retry_percent <= 1.0 {
            (1, (1.0 / retry_percent) as isize)
        } else {
            (1000, (1000.0 / retry_percent) as isize)
        };
        let reserve = (min_per_sec as isize)
            .saturating_mul(ttl.as_secs() as isize)
            .saturating_mul(withdraw_amount);
        let base = Instant::now();
        let slot_len = ttl / SLOTS as u32;
        Window {
            stripes: Default::default(),
            slots: Default::default(),
            next_rotation: AtomicU64::new(slot_len.as_nanos() as u64),
            generation: Mutex::new((0, base)),
            base,
            slot_len,
            reserve,
            deposit_amount,
            withdraw_amount,
        }
    }

    fn stripe(&self) -> &AtomicIsize {
        thread_local! {
            static STRIPE: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
            };
        }
        &self.stripes[STRIPE.with(|s| *s)].0
    }

    /// Moves the stripes into the current slot and clears the slots that have expired, when
    /// the current slot's time is over.
    fn expire(&self) {
        self.expire_at(Instant::now());
    }

    /// [`expire`](Window::expire) as of `now`.
    fn expire_at(&self, now: Instant) {
        let at = now.saturating_duration_since(self.base).as_nanos() as u64;
        if at < self.next_rotation.load(Ordering::Acquire) {
            return;
        }
        // Another thread rotating does the same work: no need to wait for it.
        let Ok(mut gen) = self.generation.try_lock() else {
            return;
        };
        let (index, since) = &mut *gen;
        let elapsed = now.saturating_duration_since(*since);
        if elapsed < self.slot_len {
            return;
        }
        let committed: isize = self
            .stripes
            .iter()
            .map(|s| s.0.swap(0, Ordering::AcqRel))
            .sum();
        self.slots[*index].fetch_add(committed, Ordering::AcqRel);
        // Move on by as many slots as have ended (at least the current one), clearing each:
        // what they held is older than the window.
        let passed = elapsed.as_nanos() / self.slot_len.as_nanos();
        for _ in 0..passed.min(SLOTS as u128) {
            *index = (*index + 1) % SLOTS;
            self.slots[*index].store(0, Ordering::Release);
        }
        // The new slot began when the last one ended, not now: slots stay one length each.
        let into_slot =
            Duration::from_nanos((elapsed.as_nanos() % self.slot_len.as_nanos()) as u64);
        *since = now.checked_sub(into_slot).unwrap_or(now);
        let next_at = since.saturating_duration_since(self.base) + self.slot_len;
        self.next_rotation
            .store(next_at.as_nanos() as u64, Ordering::Release);
    }

    fn sum(&self) -> isize {
        let pending: isize = self
            .stripes
            .iter()
            .map(|s| s.0.load(Ordering::Acquire))
            .sum();
        let committed = self
            .slots
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .fold(0, isize::saturating_add);
        pending
            .saturating_add(committed)
            .saturating_add(self.reserve)
    }

    #[inline]
    fn put(&self, amount: isize) {
        self.expire();
        self.stripe().fetch_add(amount, Ordering::Relaxed);
    }

    fn try_take(&self, amount: isize) -> bool {
        self.expire();
        if self.sum() >= amount {
            self.stripe().fetch_sub(amount, Ordering::AcqRel);
            true
        } else {
            false
        }
    }
}

impl Default for RetryBudget {
    /// 20 % of the requests of the last 10 seconds, plus 10 retries per second (tower's and
    /// Finagle's default).
    fn default() -> Self {
        RetryBudget::new(Duration::from_secs(10), 10, 0.2)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("budget", &self.tps)
            .field("retries", &self.retries())
            .field("refused", &self.refused())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deposits_from_many_threads_buy_their_share_of_retries() {
        // A 60 s window (6 s slots): nothing expires while the test runs, however slow.
        let budget = std::sync::Arc::new(RetryBudget::new(Duration::from_secs(60), 0, 0.2));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = budget.clone();
                std::thread::spawn(move || (0..250).for_each(|_| b.deposit()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        // 1 000 requests at 20 %: 200 retries, then none.
        assert!((0..200).all(|_| budget.withdraw()));
        assert!(!budget.withdraw());
        assert_eq!((budget.retries(), budget.refused()), (200, 1));
    }

    #[test]
    fn the_reserve_allows_retries_without_traffic() {
        let budget = RetryBudget::new(Duration::from_secs(10), 2, 0.2);
        // 2 per second over 10 s.
        assert_eq!((0..25).filter(|_| budget.withdraw()).count(), 20);
        let none = RetryBudget::new(Duration::from_secs(1), 0, 0.0);
        none.deposit();
        assert!(!none.withdraw());
    }

    #[test]
    fn every_slot_of_the_window_keeps_its_deposits() {
        // Deposit 1, withdraw 1: the sum is the number of deposits in the window.
        let w = Window::new(Duration::from_secs(10), 0, 1.0);
        let slot = w.slot_len;
        let tick = |k: u32| w.base + slot * k + Duration::from_millis(1);
        // 100 deposits in each of ten slots in a row: all within the 10 s window.
        for k in 1..=10 {
            w.expire_at(tick(k));
            w.stripe().fetch_add(100, Ordering::Relaxed);
        }
        assert_eq!(w.sum(), 1_000);
        // One slot later the oldest hundred have left the window, and so on.
        w.expire_at(tick(11));
        assert_eq!(w.sum(), 900);
        // A rotation late by half a slot keeps the slots aligned: the next one still ends on
        // the boundary.
        w.expire_at(tick(12) + slot / 2);
        assert_eq!(w.sum(), 800);
        w.expire_at(tick(13));
        assert_eq!(w.sum(), 700);
        // Idle for longer than the window: nothing is left.
        w.expire_at(tick(40));
        assert_eq!(w.sum(), 0);
    }

    #[test]
    fn deposits_older_than_the_window_buy_nothing() {
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.5);
        (0..10).for_each(|_| budget.deposit());
        // Past the 1 s window (however late this thread wakes), they have expired.
        std::thread::sleep(Duration::from_millis(1_200));
        assert!(!budget.withdraw());
        (0..4).for_each(|_| budget.deposit());
        assert!(budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw());
    }
}
