use std::fmt;
use std::time::Duration;

/// A distribution of service times for a simulated endpoint.
///
/// Each simulated request carries two uniform random numbers drawn from the scenario's seed;
/// an endpoint turns them into a latency through its distribution. So the same request is
/// "heavy" or "light" wherever it is sent, and two strategies compared on one scenario see
/// the same requests (common random numbers), which makes their difference show with fewer
/// requests.
///
/// ```
/// use std::time::Duration;
/// use lbkit::sim::Latency;
///
/// let fast = Latency::log_normal(Duration::from_millis(20), 0.3);
/// let slow = fast.times(10.0);
/// assert_eq!(slow, Latency::log_normal(Duration::from_millis(200), 0.3));
/// ```
#[derive(Clone, Copy, PartialEq)]
pub struct Latency(Kind);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Constant(Duration),
    Uniform(Duration, Duration),
    Exponential(Duration),
    LogNormal(Duration, f64),
    Pareto(Duration, f64),
}

impl Latency {
    /// Always `latency`.
    pub fn constant(latency: Duration) -> Self {
        Latency(Kind::Constant(latency))
    }

    /// Uniform between `min` and `max`.
    pub fn uniform(min: Duration, max: Duration) -> Self {
        Latency(Kind::Uniform(min.min(max), max.max(min)))
    }

    /// Exponential with mean `mean` (memoryless: many short, a few long).
    pub fn exponential(mean: Duration) -> Self {
        Latency(Kind::Exponential(mean))
    }

    /// Log-normal with median `median` and shape `sigma` (the standard deviation of the
    /// logarithm): the usual shape of real service times. With `sigma` 0.5 the p99 is about
    /// 3.2 × the median; with 1.0, about 10 ×.
    pub fn log_normal(median: Duration, sigma: f64) -> Self {
        Latency(Kind::LogNormal(median, finite_or(sigma, 0.0).max(0.0)))
    }

    /// Pareto with minimum `min` and tail index `shape` (a heavy tail: the smaller the shape,
    /// the heavier; above 1 the mean is finite, `min × shape / (shape − 1)`).
    pub fn pareto(min: Duration, shape: f64) -> Self {
        let shape = finite_or(shape, 2.0);
        Latency(Kind::Pareto(min, if shape > 0.0 { shape } else { 2.0 }))
    }

    /// The same distribution with every latency multiplied by `factor` (a slower copy).
    pub fn times(self, factor: f64) -> Self {
        let f = finite_or(factor, 1.0).max(0.0);
        Latency(match self.0 {
            Kind::Constant(d) => Kind::Constant(d.mul_f64(f)),
            Kind::Uniform(a, b) => Kind::Uniform(a.mul_f64(f), b.mul_f64(f)),
            Kind::Exponential(m) => Kind::Exponential(m.mul_f64(f)),
            Kind::LogNormal(m, s) => Kind::LogNormal(m.mul_f64(f), s),
            Kind::Pareto(m, a) => Kind::Pareto(m.mul_f64(f), a),
        })
    }

    /// The latency of a request whose random numbers are `u1` and `u2`, each uniform in
    /// `[0, 1)`.
    pub(crate) fn sample(&self, u1: f64, u2: f64) -> Duration {
        // 1 − u is in (0, 1]: safe to take a logarithm of.
        let open = 1.0 - u1;
        let secs = match self.0 {
            Kind::Constant(d) => return d,
            Kind::Uniform(a, b) => a.as_secs_f64() + (b - a).as_secs_f64() * u1,
            Kind::Exponential(m) => -m.as_secs_f64() * open.ln(),
            Kind::LogNormal(m, s) => {
                // Box–Muller: a standard normal from two uniforms.
                let z = (-2.0 * open.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                m.as_secs_f64() * (s * z).exp()
            }
            Kind::Pareto(m, a) => m.as_secs_f64() / open.powf(1.0 / a),
        };
        // An hour caps the tail: far beyond any scenario, and safe to convert.
        Duration::from_secs_f64(secs.clamp(0.0, 3600.0))
    }
}

fn finite_or(x: f64, default: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        default
    }
}

impl fmt::Debug for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Kind::Constant(d) => write!(f, "constant({d:?})"),
            Kind::Uniform(a, b) => write!(f, "uniform({a:?}..{b:?})"),
            Kind::Exponential(m) => write!(f, "exponential(mean {m:?})"),
            Kind::LogNormal(m, s) => write!(f, "log-normal(median {m:?}, sigma {s})"),
            Kind::Pareto(m, a) => write!(f, "pareto(min {m:?}, shape {a})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn samples_follow_the_distribution() {
        assert_eq!(Latency::constant(ms(5)).sample(0.3, 0.9), ms(5));
        assert_eq!(Latency::uniform(ms(10), ms(20)).sample(0.5, 0.0), ms(15));
        // The median of an exponential is mean × ln 2.
        let e = Latency::exponential(ms(100)).sample(0.5, 0.0);
        assert!((e.as_secs_f64() - 0.1 * 2f64.ln()).abs() < 1e-9);
        // u2 = 0.25 makes cos(2π u2) = 0: z = 0, the median.
        let l = Latency::log_normal(ms(20), 0.5).sample(0.7, 0.25);
        assert!((l.as_secs_f64() - 0.02).abs() < 1e-9);
        assert_eq!(Latency::pareto(ms(10), 2.0).sample(0.0, 0.0), ms(10));
        assert_eq!(Latency::pareto(ms(10), 1.0).sample(0.5, 0.0), ms(20));
    }
}
