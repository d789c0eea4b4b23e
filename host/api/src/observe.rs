//! Lifecycle events for observer policies, built only when a policy observes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use poseidon_core::execution::ExecEvent;
use poseidon_core::runner::{DestroyReason, Runner};

use crate::policy::{ExecutionOutcome, LifecycleEvent, LifecycleKind};
use crate::AppState;

/// Hands `kind` about `runner` to the policies, if they observe (never waits).
pub(crate) fn emit(state: &AppState, runner: &Runner, kind: impl FnOnce() -> LifecycleKind) {
    if !state.policies.observes() {
        return;
    }
    state.policies.observe(LifecycleEvent {
        at_ms: LifecycleEvent::unix_ms(SystemTime::now()),
        runner_id: runner.id().to_string(),
        environment_id: runner.environment(),
        tenant: runner.owner().map(str::to_string),
        kind: kind(),
    });
}

/// Reports the `destroyed` event of a claimed runner that the server destroys by itself
/// (inactivity timeout, environment changed or deleted, lost by the backend); the route of
/// `DELETE /runners/{id}` reports its own. Nothing is spawned unless a policy observes.
pub(crate) fn destroyed_by_server(state: &AppState, runner: &Arc<Runner>) {
    if !state.policies.observes() {
        return;
    }
    let (state, runner) = (state.clone(), Arc::clone(runner));
    tokio::spawn(async move {
        match runner.destroyed().await {
            Some(DestroyReason::ClientRequest) | None => {}
            Some(_) => emit(&state, &runner, || LifecycleKind::Destroyed),
        }
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
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    }
}
