//! Whether this thread runs a simulation, and so whether lbkit reads tokio's (paused) clock: a
//! leaf that the endpoint state (which reads the clock) and the simulator (which sets it) both
//! import.

use std::cell::Cell;

thread_local! {
    static SIMULATED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread runs a simulation.
#[inline]
pub(crate) fn is_simulated() -> bool {
    SIMULATED.try_with(Cell::get).unwrap_or(false)
}

/// Marks this thread as running a simulation until dropped.
pub(crate) struct Simulated(());

impl Simulated {
    pub(crate) fn enter() -> Self {
        SIMULATED.with(|s| s.set(true));
        Simulated(())
    }
}

impl Drop for Simulated {
    fn drop(&mut self) {
        let _ = SIMULATED.try_with(|s| s.set(false));
    }
}
