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
    /// The `Poseidon-Token` header's value (not among `headers`), for authenticators that
    /// tell tenants apart by their token ([`Policies::reads_tokens`]).
    pub token: Option<String>,
}

/// Something that happened to a runner, for observers ([`Policies::observe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// When it happened.
    pub at: std::time::SystemTime,
    /// The runner's id.
    pub runner_id: String,
    /// The runner's environment.
    pub environment: EnvironmentId,
    /// The tenant that claimed the runner, when an authenticator is in use.
    pub tenant: Option<String>,
    /// What happened.
    pub kind: LifecycleKind,
}

/// What happened to a runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleKind {
    /// Claimed from its pool.
    Claimed,
    /// Files copied into it or deleted.
    FilesChanged {
        /// Files written.
        copied: u32,
        /// Paths deleted.
        deleted: u32,
        /// Bytes written.
        bytes: u64,
    },
    /// An execution started.
    ExecutionStarted {
        /// Its command line.
        command: String,
    },
    /// An execution ended.
    ExecutionEnded {
        /// How.
        outcome: ExecutionOutcome,
        /// The exit code, when it exited.
        exit_code: Option<i32>,
        /// From start to end.
        duration: std::time::Duration,
    },
    /// Destroyed: at its client's request, or by the server (inactivity timeout,
    /// environment changed or deleted, lost by the backend).
    Destroyed,
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionOutcome {
    /// The program exited.
    Exited,
    /// Its time limit ended it.
    TimedOut,
    /// The runner or the backend failed.
    Failed,
    /// The client went away first.
    Abandoned,
}

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
