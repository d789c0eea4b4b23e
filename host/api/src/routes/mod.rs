//! Route handlers, one module per resource.

pub(crate) mod environments;
pub(crate) mod files;
pub(crate) mod misc;
pub(crate) mod runners;

use axum::http::StatusCode;
use poseidon_core::{EnvironmentId, RunnerId};
use std::sync::Arc;

use crate::error::ApiError;
use crate::policy::Principal;
use crate::AppState;
use poseidon_core::runner::Runner;

/// Parses an environment id path segment: not a number → 404 (the route does not exist, as in
/// Poseidon); too large → 400.
pub(crate) fn environment_id(segment: &str) -> Result<EnvironmentId, ApiError> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not found", None));
    }
    segment
        .parse::<i64>()
        .ok()
        .and_then(|v| u64::try_from(v).ok())
        .ok_or_else(|| ApiError::bad_request(format!("environment id {segment} is too large")))
}

/// A claimed runner visible to the principal (another tenant's runner is reported as gone).
pub(crate) fn runner(
    state: &AppState,
    id: &str,
    principal: Option<&Principal>,
) -> Result<Arc<Runner>, ApiError> {
    let runner = state.manager.runner(&RunnerId::from_raw(id))?;
    if principal.is_some_and(|p| !visible(&runner, p)) {
        return Err(poseidon_core::CoreError::RunnerGone.into());
    }
    Ok(runner)
}

/// Whether the principal may use the runner: its owner may; a runner without one (claimed
/// before a restart by a version that recorded no owners, or while no authenticator was
/// configured) is left to every tenant that may use its environment, as it was before.
fn visible(runner: &Runner, principal: &Principal) -> bool {
    match runner.owner() {
        Some(owner) => owner == principal.tenant,
        None => principal.may_use(runner.environment()),
    }
}
