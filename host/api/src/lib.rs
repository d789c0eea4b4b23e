//! The Poseidon API (`/api/v1`) over HTTP and WebSocket.
//!
//! This is the only crate that knows the wire JSON: requests are parsed and validated here into
//! core types, core results and errors are turned into Poseidon's responses here.

#![forbid(unsafe_code)]

pub mod auth;
mod body;
mod error;
mod observe;
mod peer;
mod policy;
mod query;
mod routes;
mod telemetry;
mod websocket;
mod wire;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use poseidon_core::Manager;

pub use error::ApiError;
pub use policy::{
    AuthRequest, Denial, ExecutionOutcome, LifecycleEvent, LifecycleKind, NoPolicies, Policies,
    Principal,
};
pub use telemetry::RequestSubject;

/// Settings of the API layer.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// `server.token`: required in the `Poseidon-Token` header when not empty.
    pub token: String,
    /// Whether the server itself serves TLS (WebSocket URLs then use `wss`).
    pub tls: bool,
    /// `server.alert.prewarmingpoolthreshold` (0 disables the health alert).
    pub prewarming_pool_threshold: f64,
    /// Largest accepted request body in bytes (larger ones get 413).
    pub max_body_bytes: usize,
    /// What `/version` answers.
    pub version: String,
    /// Host uids of sandboxes: API requests from processes with these uids are refused.
    pub sandbox_uids: Option<std::ops::Range<u32>>,
    /// The address the server listens on (to look up the client's socket of a connection).
    pub listen_address: Option<std::net::SocketAddr>,
    /// Whether a Sentry client is installed: requests then get a Sentry hub (scope tagged with
    /// runner and environment) and a transaction.
    pub sentry: bool,
}

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    /// The manager of environments and runners.
    pub manager: Manager,
    /// API settings.
    pub settings: Arc<ApiSettings>,
    /// Authentication and preprocessing policies (plugins).
    pub policies: Arc<dyn Policies>,
}

/// The complete router: every route of `/api/v1`, logged and measured.
pub fn router(state: AppState) -> Router {
    router_with(state, Router::new())
}

/// [`router`] plus the server's own routes (e.g. `/metrics`), logged and measured like the API.
pub fn router_with(state: AppState, extra: Router) -> Router {
    use routes::{environments, files, misc, runners};
    let open = Router::new()
        .route("/api/v1/health", get(misc::health))
        .route("/api/v1/version", get(misc::version))
        .route("/api/v1/openapi.yaml", get(misc::openapi));
    // Authentication wraps each method's handler, not the routes: a known path asked with a
    // method it does not have is a 405 without authentication (as Poseidon's router answers).
    let auth = axum::middleware::from_fn_with_state(state.clone(), auth::authenticate);
    let protected = Router::new()
        .route(
            "/api/v1/statistics/execution-environments",
            get(misc::statistics).route_layer(auth.clone()),
        )
        .route(
            "/api/v1/execution-environments",
            get(environments::list).route_layer(auth.clone()),
        )
        .route(
            "/api/v1/execution-environments/{id}",
            get(environments::get_one)
                .put(environments::put)
                .delete(environments::delete)
                .route_layer(auth.clone()),
        )
        .route(
            "/api/v1/runners",
            post(runners::claim).route_layer(auth.clone()),
        )
        .route(
            "/api/v1/runners/{runner}",
            axum::routing::delete(runners::destroy).route_layer(auth.clone()),
        )
        .route(
            "/api/v1/runners/{runner}/files",
            get(files::list)
                .patch(files::update)
                .route_layer(auth.clone()),
        )
        .route(
            "/api/v1/runners/{runner}/files/raw",
            get(files::download).route_layer(auth.clone()),
        )
        .route(
            "/api/v1/runners/{runner}/execute",
            post(runners::execute).route_layer(auth.clone()),
        )
        .route(
            "/api/v1/runners/{runner}/websocket",
            get(websocket::connect).route_layer(auth),
        );
    // Operator routes: the Poseidon-Token only, so they work while an authenticator fails.
    let operator = Router::new().route(
        "/api/v1/plugins",
        get(misc::plugins).route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::token_only,
        )),
    );
    let sentry = state.settings.sentry;
    telemetry::layers(
        open.merge(protected)
            .merge(operator)
            .with_state(state)
            .merge(extra),
        sentry,
    )
}
