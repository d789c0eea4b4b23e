//! `/runners`: claim, destroy, execute.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use poseidon_core::execution::ExecutionRequest;
use poseidon_core::runner::DestroyReason;

use crate::error::ApiError;
use crate::policy::Principal;
use crate::routes::runner;
use crate::wire::{ClaimBody, ClaimView, ExecuteBody, ExecuteView, MappedPortView};
use crate::{body, AppState};

/// Longest inactivity timeout or time limit accepted, in seconds (about 68 years).
const MAX_SECONDS: i64 = i32::MAX as i64;

/// `POST /runners`.
pub(crate) async fn claim(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    request_body: Body,
) -> Result<Response, ApiError> {
    let body: ClaimBody = body::json(request_body, state.settings.max_body_bytes).await?;
    let timeout = seconds("inactivityTimeout", body.inactivity_timeout)?;
    let environment = body.execution_environment_id;
    crate::telemetry::record_environment(environment);
    if let Some(p) = principal.as_deref() {
        if !p.may_use(environment) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("tenant {} may not use environment {environment}", p.tenant),
                None,
            ));
        }
    }
    let owner = principal.map(|p| p.0.tenant);
    let label = environment.to_string();
    let runner = match state.manager.claim(environment, timeout, owner) {
        Ok(runner) => runner,
        Err(e) => {
            if matches!(e, poseidon_core::CoreError::PoolEmpty) {
                metrics::counter!("poseidon_empty_pool_misses_total", "environment" => label)
                    .increment(1);
            }
            return Err(e.into());
        }
    };
    metrics::counter!("poseidon_runner_claims_total", "environment" => label).increment(1);
    crate::telemetry::record_runner(&runner.id().to_string(), environment);
    crate::observe::emit(&state, &runner, || crate::LifecycleKind::Claimed);
    crate::observe::destroyed_by_server(&state, &runner);
    let view = ClaimView {
        runner_id: runner.id().to_string(),
        mapped_ports: runner
            .mapped_ports()
            .into_iter()
            .map(MappedPortView::from)
            .collect(),
    };
    Ok(Json(view).into_response())
}

/// A duration in seconds from the API: 0 = none, negative or huge = 400.
fn seconds(name: &str, value: i64) -> Result<Option<Duration>, ApiError> {
    match value {
        0 => Ok(None),
        v if v < 0 => Err(ApiError::bad_request(format!(
            "{name} must not be negative"
        ))),
        v if v > MAX_SECONDS => Err(ApiError::bad_request(format!(
            "{name} must be at most {MAX_SECONDS} seconds"
        ))),
        v => Ok(Some(Duration::from_secs(v as u64))),
    }
}

/// `DELETE /runners/{id}`.
pub(crate) async fn destroy(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let runner = runner(&state, &id, principal.as_deref())?;
    match state
        .manager
        .destroy_runner(runner.id(), DestroyReason::ClientRequest)
        .await
    {
        Ok(()) => {
            crate::observe::emit(&state, &runner, || crate::LifecycleKind::Destroyed);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Err(poseidon_core::CoreError::Backend(e)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot destroy runner: {e}"),
            Some("NOMAD_INTERNAL_SERVER_ERROR"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Whether an environment variable name is valid for a shell.
fn valid_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `POST /runners/{id}/execute`: stores the request, answers with the WebSocket URL.
pub(crate) async fn execute(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    request_body: Body,
) -> Result<Response, ApiError> {
    let runner = runner(&state, &id, principal.as_deref())?;
    let body: ExecuteBody = body::json(request_body, state.settings.max_body_bytes).await?;
    if body.command.contains('\0') {
        return Err(ApiError::bad_request(
            "command must not contain NUL characters",
        ));
    }
    let time_limit = seconds("timeLimit", body.time_limit)?;
    let mut environment = Vec::new();
    for (name, value) in body.environment {
        if !valid_variable_name(&name) {
            return Err(ApiError::bad_request(format!(
                "invalid environment variable name {name:?}: it must match [a-zA-Z_][a-zA-Z0-9_]*"
            )));
        }
        if value.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "environment variable {name} must not contain NUL characters"
            )));
        }
        environment.push((name, value));
    }
    let request = ExecutionRequest {
        command: body.command,
        environment,
        time_limit,
        privileged: body.privileged_execution,
    };
    let request = state
        .policies
        .preprocess_execute(runner.environment(), principal.as_deref(), request)
        .await
        .map_err(ApiError::bad_request)?;
    runner.touch();
    let execution = runner.store_execution(request);
    let scheme = if state.settings.tls { "wss" } else { "ws" };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let websocket_url = format!(
        "{scheme}://{host}/api/v1/runners/{}/websocket?executionID={execution}",
        runner.id()
    );
    Ok(Json(ExecuteView { websocket_url }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_names() {
        assert!(valid_variable_name("A"));
        assert!(valid_variable_name("_x1"));
        assert!(!valid_variable_name("1A"));
        assert!(!valid_variable_name("A-B"));
        assert!(!valid_variable_name(""));
        assert!(!valid_variable_name("A=B"));
    }
}
