//! Lifecycle events for observer policies, built only when a policy observes.

use std::time::{Duration, SystemTime};

use poseidon_core::execution::ExecEvent;
use poseidon_core::runner::Runner;

use crate::policy::{ExecutionOutcome, LifecycleEvent, LifecycleKind};
use crate::AppState;

/// Hands `kind` about `runner` to the policies, if they observe (never waits).
pub(crate) fn emit(state: &AppState, runner: &Runner, kind: impl FnOnce() -> LifecycleKind) {
    if !state.policies.observes() {
        return;
    }
    state.policies.observe(LifecycleEvent {
        at: SystemTime::now(),
        runner_id: runner.id().to_string(),
        environment: runner.environment(),
        tenant: runner.owner().map(str::to_string),
        kind: kind(),
    });
}

/// The `execution ended` event for the final event of an execution (`None`: the client
/// went away before the end).
pub(crate) fn ended(last: Option<&ExecEvent>, duration: Duration) -> LifecycleKind {
    let (outcome, exit_code) = match last {
        Some(ExecEvent::Exit(code)) => (ExecutionOutcome::Exited, Some(i32::from(*code))),
        Some(ExecEvent::Timeout) => (ExecutionOutcome::TimedOut, None),
        Some(ExecEvent::Error(_)) => (ExecutionOutcome::Failed, None),
        _ => (ExecutionOutcome::Abandoned, None),
    };
    LifecycleKind::ExecutionEnded {
        outcome,
        exit_code,
        duration,
    }
}
