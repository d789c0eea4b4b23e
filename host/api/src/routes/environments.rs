//! `/execution-environments`.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use poseidon_core::manager::PutOutcome;
use poseidon_core::EnvironmentConfig;

use crate::error::ApiError;
use crate::policy::Principal;
use crate::routes::environment_id;
use crate::wire::{EnvironmentBody, EnvironmentList, EnvironmentView};
use crate::{body, query, AppState};

/// `GET /execution-environments[?fetch=bool]`.
pub(crate) async fn list(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = query::params(q)?;
    if query::boolean(&params, "fetch", false)? {
        state.manager.refresh_environments().await?;
    }
    let visible = |id| principal.as_ref().is_none_or(|p| p.may_use(id));
    let execution_environments = state
        .manager
        .environments()
        .into_iter()
        .filter(|c| visible(c.id))
        .map(EnvironmentView::from)
        .collect();
    Ok(Json(EnvironmentList {
        execution_environments,
    })
    .into_response())
}

/// `GET /execution-environments/{id}[?fetch=bool]`.
pub(crate) async fn get_one(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let id = environment_id(&id)?;
    let params = query::params(q)?;
    if query::boolean(&params, "fetch", false)? {
        state.manager.refresh_environments().await?;
    }
    if principal.is_some_and(|p| !p.may_use(id)) {
        return Err(not_found());
    }
    match state.manager.environment(id) {
        Some(config) => Ok(Json(EnvironmentView::from(config)).into_response()),
        None => Err(not_found()),
    }
}

fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "execution environment not found",
        None,
    )
}

/// `PUT /execution-environments/{id}`: 201 when created, 204 when replaced.
pub(crate) async fn put(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    request_body: Body,
) -> Result<Response, ApiError> {
    let id = environment_id(&id)?;
    if principal.is_some_and(|p| !p.may_use(id)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("you may not change environment {id}"),
            None,
        ));
    }
    let body: EnvironmentBody = body::json(request_body, state.settings.max_body_bytes).await?;
    if body.image.contains('\0') {
        return Err(ApiError::bad_request(
            "image must not contain NUL characters",
        ));
    }
    let ports = body.exposed_ports;
    if ports.contains(&0) {
        return Err(ApiError::bad_request(
            "exposedPorts must be between 1 and 65535",
        ));
    }
    let config = EnvironmentConfig {
        id,
        image: body.image,
        prewarming_pool_size: body.prewarming_pool_size,
        cpu_limit: body.cpu_limit,
        memory_limit: body.memory_limit,
        network_access: body.network_access,
        exposed_ports: ports,
    };
    let status = match state.manager.put_environment(config).await? {
        PutOutcome::Created => StatusCode::CREATED,
        PutOutcome::Replaced => StatusCode::NO_CONTENT,
    };
    Ok(status.into_response())
}

/// `DELETE /execution-environments/{id}`.
pub(crate) async fn delete(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = environment_id(&id)?;
    if principal.is_some_and(|p| !p.may_use(id)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("you may not delete environment {id}"),
            None,
        ));
    }
    match state.manager.delete_environment(id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(poseidon_core::CoreError::EnvironmentNotFound) => Err(not_found()),
        Err(e) => Err(e.into()),
    }
}
