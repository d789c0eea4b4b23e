//! Authentication: the `Poseidon-Token` (constant-time) and, if configured, a plugin authenticator.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::policy::AuthRequest;
use crate::AppState;

/// Checks the token and runs the authenticator; the principal goes into the request extensions.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    // An authenticator that reads tokens decides about tokens other than `server.token`.
    let delegate = state.policies.authenticates() && state.policies.reads_tokens();
    if let Err(refused) = check_caller(&state, &request, delegate) {
        return refused.into_response();
    }
    if !state.policies.authenticates() {
        return next.run(request).await;
    }
    let auth = AuthRequest {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
        headers: request
            .headers()
            .iter()
            .filter(|(name, _)| !name.as_str().eq_ignore_ascii_case("poseidon-token"))
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        peer_address: request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.to_string()),
        poseidon_token: request
            .headers()
            .get("Poseidon-Token")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    };
    match state.policies.authenticate(&auth).await {
        Ok(principal) => {
            if let Some(principal) = principal {
                request.extensions_mut().insert(principal);
            }
            next.run(request).await
        }
        Err(denial) => {
            // 401/403 from the plugin; 503 when the authenticator itself failed.
            let status = StatusCode::from_u16(denial.status)
                .ok()
                .filter(|s| s.is_client_error() || *s == StatusCode::SERVICE_UNAVAILABLE)
                .unwrap_or(StatusCode::UNAUTHORIZED);
            ApiError::new(status, denial.message, None).into_response()
        }
    }
}

/// Only the `Poseidon-Token` (and the sandbox check): for operator routes such as
/// `/api/v1/plugins`, which must work even when an authenticator plugin fails.
pub(crate) async fn token_only(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match check_caller(&state, &request, false) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// The `Poseidon-Token` check and the refusal of requests from sandboxes. With
/// `delegate_token`, a token other than `server.token` is left to the authenticator.
fn check_caller(state: &AppState, request: &Request, delegate_token: bool) -> Result<(), ApiError> {
    let expected = state.settings.token.as_bytes();
    if !expected.is_empty() && !delegate_token {
        let given = request
            .headers()
            .get("Poseidon-Token")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Different lengths compare unequal; equal lengths are compared in constant time.
        if !bool::from(given.ct_eq(expected)) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong Poseidon-Token header",
                None,
            ));
        }
    }
    // Only sandboxes with network access can reach the API; without any, skip the socket lookup.
    let sandboxes_online = state.manager.any_network_access();
    if let Some(uids) = state
        .settings
        .sandbox_uids
        .as_ref()
        .filter(|_| sandboxes_online)
    {
        let peer = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0);
        let local = state.settings.listen_address;
        if peer.is_some_and(|p| crate::peer::from_sandbox(p, local, uids)) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "runners may not use the gateway's API",
                None,
            ));
        }
    }
    Ok(())
}
