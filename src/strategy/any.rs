use std::fmt;
use std::str::FromStr;

use super::maglev::MaglevTable;
use super::random::RandomState;
use super::ring::RingState;
use super::round_robin::Schedule;
use super::{
    Delta, LeastConnections, Maglev, PeakEwma, PickContext, PowerOfTwoChoices, Random, Ring,
    RoundRobin, Strategy,
};
use crate::endpoint::Candidates;

/// One of the built-in strategies, chosen at run time.
///
/// Parses from the names in [`AnyStrategy::NAMES`], so a command-line flag or a config file can
/// choose the strategy:
///
/// ```
/// use lbkit::strategy::AnyStrategy;
///
/// let s: AnyStrategy = "p2c".parse().unwrap();
/// assert_eq!(lbkit::strategy::Strategy::name(&s), "p2c");
/// assert!("fastest".parse::<AnyStrategy>().is_err());
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum AnyStrategy {
    /// [`RoundRobin`].
    RoundRobin(RoundRobin),
    /// [`Random`].
    Random(Random),
    /// [`LeastConnections`].
    LeastConnections(LeastConnections),
    /// [`PowerOfTwoChoices`].
    PowerOfTwoChoices(PowerOfTwoChoices),
    /// [`PeakEwma`].
    PeakEwma(PeakEwma),
    /// [`Maglev`].
    Maglev(Maglev),
    /// [`Ring`].
    Ring(Ring),
}

impl AnyStrategy {
    /// The names [`FromStr`] accepts, one per built-in strategy.
    pub const NAMES: [&'static str; 7] = [
        "round_robin",
        "random",
        "least_connections",
        "p2c",
        "peak_ewma",
        "maglev",
        "ring",
    ];
}

/// The per-snapshot state of an [`AnyStrategy`].
#[derive(Debug)]
pub enum AnyState {
    /// State of [`RoundRobin`].
    RoundRobin(Schedule),
    /// State of [`Random`], [`PowerOfTwoChoices`] and [`PeakEwma`]: the weights they sample by.
    Random(RandomState),
    /// For strategies without state.
    Stateless,
    /// State of [`Maglev`].
    Maglev(MaglevTable),
    /// State of [`Ring`].
    Ring(RingState),
}

impl Strategy for AnyStrategy {
    type State = AnyState;

    fn prepare(&self, c: &Candidates) -> AnyState {
        match self {
            AnyStrategy::RoundRobin(s) => AnyState::RoundRobin(s.prepare(c)),
            AnyStrategy::Random(s) => AnyState::Random(s.prepare(c)),
            AnyStrategy::PowerOfTwoChoices(s) => AnyState::Random(s.prepare(c)),
            AnyStrategy::PeakEwma(s) => AnyState::Random(s.prepare(c)),
            AnyStrategy::Maglev(s) => AnyState::Maglev(s.prepare(c)),
            AnyStrategy::Ring(s) => AnyState::Ring(s.prepare(c)),
            AnyStrategy::LeastConnections(_) => AnyState::Stateless,
        }
    }

    fn update(&self, previous: &AnyState, delta: &Delta<'_>) -> AnyState {
        match (self, previous) {
            (AnyStrategy::RoundRobin(s), AnyState::RoundRobin(p)) => {
                AnyState::RoundRobin(s.update(p, delta))
            }
            (AnyStrategy::Random(s), AnyState::Random(p)) => AnyState::Random(s.update(p, delta)),
            (AnyStrategy::PowerOfTwoChoices(s), AnyState::Random(p)) => {
                AnyState::Random(s.update(p, delta))
            }
            (AnyStrategy::PeakEwma(s), AnyState::Random(p)) => AnyState::Random(s.update(p, delta)),
            (AnyStrategy::Maglev(s), AnyState::Maglev(p)) => AnyState::Maglev(s.update(p, delta)),
            (AnyStrategy::Ring(s), AnyState::Ring(p)) => AnyState::Ring(s.update(p, delta)),
            _ => self.prepare(delta.after()),
        }
    }

    #[inline]
    fn pick(&self, state: &AnyState, c: &Candidates, ctx: &PickContext<'_>) -> Option<usize> {
        match (self, state) {
            (AnyStrategy::RoundRobin(s), AnyState::RoundRobin(st)) => s.pick(st, c, ctx),
            (AnyStrategy::Random(s), AnyState::Random(st)) => s.pick(st, c, ctx),
            (AnyStrategy::Maglev(s), AnyState::Maglev(st)) => s.pick(st, c, ctx),
            (AnyStrategy::Ring(s), AnyState::Ring(st)) => s.pick(st, c, ctx),
            (AnyStrategy::LeastConnections(s), _) => s.pick(&(), c, ctx),
            (AnyStrategy::PowerOfTwoChoices(s), AnyState::Random(st)) => s.pick(st, c, ctx),
            (AnyStrategy::PeakEwma(s), AnyState::Random(st)) => s.pick(st, c, ctx),
            // A state is only ever paired with the strategy that prepared it.
            _ => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            AnyStrategy::RoundRobin(s) => s.name(),
            AnyStrategy::Random(s) => s.name(),
            AnyStrategy::LeastConnections(s) => s.name(),
            AnyStrategy::PowerOfTwoChoices(s) => s.name(),
            AnyStrategy::PeakEwma(s) => s.name(),
            AnyStrategy::Maglev(s) => s.name(),
            AnyStrategy::Ring(s) => s.name(),
        }
    }
}

/// The error of parsing an unknown strategy name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownStrategy(String);

impl fmt::Display for UnknownStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown strategy {:?} (expected one of: {})",
            self.0,
            AnyStrategy::NAMES.join(", ")
        )
    }
}

impl std::error::Error for UnknownStrategy {}

impl FromStr for AnyStrategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(
            match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
                "round_robin" | "rr" => AnyStrategy::RoundRobin(RoundRobin::new()),
                "random" => AnyStrategy::Random(Random::new()),
                "least_connections" | "least_conn" => {
                    AnyStrategy::LeastConnections(LeastConnections::new())
                }
                "p2c" | "power_of_two_choices" => {
                    AnyStrategy::PowerOfTwoChoices(PowerOfTwoChoices::new())
                }
                "peak_ewma" | "ewma" => AnyStrategy::PeakEwma(PeakEwma::new()),
                "maglev" => AnyStrategy::Maglev(Maglev::new()),
                "ring" | "ring_hash" => AnyStrategy::Ring(Ring::new()),
                _ => return Err(UnknownStrategy(s.to_owned())),
            },
        )
    }
}

macro_rules! from_strategy {
    ($($t:ident),*) => {$(
        impl From<$t> for AnyStrategy {
            fn from(s: $t) -> Self {
                AnyStrategy::$t(s)
            }
        }
    )*};
}
from_strategy!(
    RoundRobin,
    Random,
    LeastConnections,
    PowerOfTwoChoices,
    PeakEwma,
    Maglev,
    Ring
);

/// A strategy in a configuration file is its name (one of [`AnyStrategy::NAMES`], or an alias
/// that [`FromStr`] accepts), with that strategy's default settings (feature `serde`).
#[cfg(feature = "serde")]
impl serde::Serialize for AnyStrategy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Reads a strategy's name; an unknown name is an error that lists the known ones
/// (feature `serde`).
#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for AnyStrategy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}
