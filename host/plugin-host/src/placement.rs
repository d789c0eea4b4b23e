//! Where a plugin version's calls run: in place on the calling async task, or off the
//! executor's workers.
//!
//! A call in place costs no thread hand-off (the guest runs like any other short piece of
//! a request handler), but it holds its worker for as long as it runs. So only a version
//! whose calls have proved short runs in place: its first call runs off the executor
//! (`block_in_place`, or the blocking pool where that is unavailable); when it ended within
//! the budget (`limits.inPlaceBudgetUs`) the later calls run in place; and any call that
//! runs longer than the budget or is stopped by its deadline or timeout moves the version
//! off the executor for good. A worker is thus held by a guest at most once per version,
//! and never longer than the call's own bounds (epoch deadline, wall-clock timeout).
//!
//! Opt-in: with the default budget 0 every call runs off the executor (measured at the
//! server level, in place cost executions under concurrency more than it saved; see
//! BENCHMARKS.md).

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// Where the next call of a version runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Where {
    /// On the calling task: the version's calls have all been short.
    InPlace,
    /// Off the executor: untried, or a call was too long.
    OffExecutor,
}

const UNTRIED: u8 = 0;
const IN_PLACE: u8 = 1;
const OFF_EXECUTOR: u8 = 2;

/// The placement state of one loaded version (shared by the copies a reconfiguration makes).
#[derive(Debug, Default)]
pub(crate) struct Placement(AtomicU8);

impl Placement {
    /// Where the next call runs.
    pub fn next(&self) -> Where {
        match self.0.load(Ordering::Relaxed) {
            IN_PLACE => Where::InPlace,
            _ => Where::OffExecutor,
        }
    }

    /// Whether calls run in place now.
    pub fn in_place(&self) -> bool {
        self.next() == Where::InPlace
    }

    /// Records a finished call that ran for `took` (`stopped`: by its deadline or
    /// timeout). Returns true when this call moved the version off the executor.
    pub fn record(&self, took: Duration, budget: Duration, stopped: bool) -> bool {
        if stopped || took > budget {
            return self.0.swap(OFF_EXECUTOR, Ordering::Relaxed) != OFF_EXECUTOR;
        }
        // Only an untried version is promoted; one moved off stays off.
        let _ = self
            .0
            .compare_exchange(UNTRIED, IN_PLACE, Ordering::Relaxed, Ordering::Relaxed);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_millis(1);

    #[test]
    fn a_short_first_call_lets_later_calls_run_in_place() {
        let p = Placement::default();
        assert_eq!(p.next(), Where::OffExecutor);
        assert!(!p.record(Duration::from_micros(20), BUDGET, false));
        assert_eq!(p.next(), Where::InPlace);
    }

    #[test]
    fn a_long_or_stopped_call_moves_the_version_off_for_good() {
        let p = Placement::default();
        p.record(Duration::from_micros(20), BUDGET, false);
        assert!(p.record(Duration::from_millis(5), BUDGET, false));
        assert_eq!(p.next(), Where::OffExecutor);
        // Short calls afterwards do not bring it back.
        assert!(!p.record(Duration::from_micros(20), BUDGET, false));
        assert_eq!(p.next(), Where::OffExecutor);

        let q = Placement::default();
        assert!(q.record(Duration::from_micros(20), BUDGET, true));
        assert_eq!(q.next(), Where::OffExecutor);
    }
}
