//! Hooks for request policies (authentication and preprocessing), implemented by the plugin host.

use async_trait::async_trait;
use poseidon_core::execution::ExecutionRequest;
use poseidon_core::files::FileUpdate;
use poseidon_core::EnvironmentId;

/// The policy types are core's, shared with the plugin host.
pub use poseidon_core::policy::{
    AuthRequest, Denial, ExecutionOutcome, LifecycleEvent, LifecycleKind, Principal,
};

/// Policies applied to API requests.
#[async_trait]
pub trait Policies: Send + Sync + 'static {
    /// Whether [`Policies::authenticate`] needs to be asked at all (an authenticator is
    /// configured); `false` spares every request the copy of its headers.
    fn authenticates(&self) -> bool {
        true
    }

    /// Whether the authenticator tells tenants apart by their `Poseidon-Token`: then a
    /// token other than `server.token` is not refused by the server but handed to the
    /// authenticator (operator routes such as `/plugins` still need `server.token`).
    fn reads_tokens(&self) -> bool {
        false
    }

    /// Whether [`Policies::observe`] wants events at all.
    fn observes(&self) -> bool {
        false
    }

    /// Takes a lifecycle event; must return at once (queue it, never wait).
    fn observe(&self, _event: LifecycleEvent) {}

    /// `Ok(None)` when no authenticator is configured.
    async fn authenticate(&self, request: &AuthRequest) -> Result<Option<Principal>, Denial>;

    /// Checks or rewrites an execution; `Err(message)` rejects it with 400.
    async fn preprocess_execute(
        &self,
        environment: EnvironmentId,
        principal: Option<&Principal>,
        request: ExecutionRequest,
    ) -> Result<ExecutionRequest, String>;

    /// Checks or rewrites a file update; `Err(message)` rejects it with 400.
    async fn preprocess_files(
        &self,
        environment: EnvironmentId,
        principal: Option<&Principal>,
        update: FileUpdate,
    ) -> Result<FileUpdate, String>;

    /// What `GET /api/v1/plugins` answers: the state of every plugin (a JSON array).
    fn plugins_status(&self) -> serde_json::Value {
        serde_json::Value::Array(Vec::new())
    }
}

/// No policies: everything passes unchanged.
pub struct NoPolicies;

#[async_trait]
impl Policies for NoPolicies {
    fn authenticates(&self) -> bool {
        false
    }

    async fn authenticate(&self, _request: &AuthRequest) -> Result<Option<Principal>, Denial> {
        Ok(None)
    }

    async fn preprocess_execute(
        &self,
        _environment: EnvironmentId,
        _principal: Option<&Principal>,
        request: ExecutionRequest,
    ) -> Result<ExecutionRequest, String> {
        Ok(request)
    }

    async fn preprocess_files(
        &self,
        _environment: EnvironmentId,
        _principal: Option<&Principal>,
        update: FileUpdate,
    ) -> Result<FileUpdate, String> {
        Ok(update)
    }
}
