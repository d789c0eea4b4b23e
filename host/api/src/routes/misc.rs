//! `/health`, `/version`, `/openapi.yaml`, `/statistics/execution-environments` and `/plugins`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::error::ApiError;
use crate::policy::Principal;
use crate::wire;
use crate::AppState;

/// 204, or 503 `PREWARMING_POOL_DEPLETING` when a pool is below the alert threshold (naming why
/// its runners cannot be started, when they cannot).
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    let depleting = state
        .manager
        .depleting_environments(state.settings.prewarming_pool_threshold);
    if depleting.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    let ids: Vec<String> = depleting
        .iter()
        .map(|(id, why)| match why {
            Some(why) => format!("{id} (runners cannot be started: {why})"),
            None => id.to_string(),
        })
        .collect();
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the prewarming pool is depleting: environments {}",
            ids.join(", ")
        ),
        Some("PREWARMING_POOL_DEPLETING"),
    )
    .into_response()
}

/// The release as a JSON string.
pub(crate) async fn version(State(state): State<AppState>) -> Response {
    Json(state.settings.version.clone()).into_response()
}

/// Pool figures per environment, keyed by id.
pub(crate) async fn statistics(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
) -> Response {
    let stats = state
        .manager
        .statistics()
        .into_iter()
        .filter(|s| principal.as_ref().is_none_or(|p| p.may_use(s.id)))
        .collect();
    Json(wire::statistics(stats)).into_response()
}

/// The state of every policy plugin (an empty array without plugins).
pub(crate) async fn plugins(State(state): State<AppState>) -> Response {
    Json(state.policies.plugins_status()).into_response()
}

/// This server's OpenAPI document: the Poseidon contract as implemented here plus its own routes.
pub(crate) const OPENAPI: &str = include_str!("../../openapi.yaml");

/// The OpenAPI document (YAML).
pub(crate) async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/yaml")],
        OPENAPI,
    )
        .into_response()
}
