//! Hooks for request policies (authentication and preprocessing), implemented by the plugin host.

use async_trait::async_trait;
use poseidon_core::execution::ExecutionRequest;
use poseidon_core::files::FileUpdate;
use poseidon_core::EnvironmentId;

/// Who made a request, as an authenticator decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Tenant name; runners are only visible to the tenant that claimed them.
    pub tenant: String,
    /// Environments the tenant may use; `None` = all.
    pub environments: Option<Vec<EnvironmentId>>,
}

impl Principal {
    /// Whether the principal may use the environment.
    pub fn may_use(&self, environment: EnvironmentId) -> bool {
        self.environments
            .as_ref()
            .is_none_or(|list| list.contains(&environment))
    }
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// 401 or 403; 503 when the authenticator itself failed.
    pub status: u16,
    /// Why.
    pub message: String,
}

/// What an authenticator sees of a request.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Headers (names lower-case).
    pub headers: Vec<(String, String)>,
    /// Peer address, when known.
    pub peer: Option<String>,
}

/// Policies applied to API requests.
#[async_trait]
pub trait Policies: Send + Sync + 'static {
    /// Whether [`Policies::authenticate`] needs to be asked at all (an authenticator is
    /// configured); `false` spares every request the copy of its headers.
    fn authenticates(&self) -> bool {
        true
    }

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
