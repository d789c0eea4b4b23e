//! Policies (e.g. WebAssembly plugins): the hook through which they steer the pools, and
//! the one set of types the API, the core and the plugin host share for authentication and
//! lifecycle events.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::environment::EnvironmentConfig;
use crate::EnvironmentId;

/// What a pool-sizing policy sees of one environment.
#[derive(Debug, Clone)]
pub struct PoolSnapshot {
    /// The environment's configuration (its `prewarming_pool_size` is the configured size).
    pub config: EnvironmentConfig,
    /// Idle runners now.
    pub idle: u32,
    /// Claimed runners now.
    pub used: u32,
    /// Runners being started.
    pub starting: u32,
    /// Claims per minute over the last hour, oldest first (60 values, the last is the current minute).
    pub claims_per_minute: Vec<u32>,
    /// Claims that found the pool empty since the environment was created.
    pub empty_pool_misses: u64,
    /// Unix time in seconds.
    pub now_unix: i64,
}

/// Decides how many idle runners an environment should keep.
#[async_trait]
pub trait PoolPolicy: Send + Sync + 'static {
    /// The wanted number of idle runners, or `None` to use the configured pool size.
    async fn desired_idle(&self, snapshot: &PoolSnapshot) -> Option<u32>;
}

/// Who made a request, as an authenticator decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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

/// A refused request: answer with `status` and `{"message": message}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// 401 or 403 from the authenticator; 503 when the authenticator itself failed
    /// (trap, timeout, not loaded).
    pub status: u16,
    /// Why, for the client.
    pub message: String,
}

/// What an authenticator sees of a request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthRequest {
    /// HTTP method.
    pub method: String,
    /// Request path, without the query.
    pub path: String,
    /// Headers, names lower-case, without the `Poseidon-Token`.
    pub headers: Vec<(String, String)>,
    /// The peer's address, e.g. `127.0.0.1:50000`, when known.
    pub peer_address: Option<String>,
    /// The `Poseidon-Token` header's value, for authenticators that tell tenants apart by
    /// their token (plugins of WIT 0.2 and later; 0.1 authenticators never see it).
    pub poseidon_token: Option<String>,
}

/// Something that happened to a runner, for observers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleEvent {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The runner's id.
    pub runner_id: String,
    /// The runner's environment.
    pub environment_id: EnvironmentId,
    /// The tenant that claimed the runner, when an authenticator is in use.
    pub tenant: Option<String>,
    /// What happened.
    pub kind: LifecycleKind,
}

impl LifecycleEvent {
    /// Milliseconds since the Unix epoch of `at` (0 before the epoch).
    pub fn unix_ms(at: std::time::SystemTime) -> i64 {
        at.duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// What happened to a runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
        /// From start to end, in milliseconds.
        duration_ms: u64,
    },
    /// Destroyed: at its client's request, or by the server (inactivity timeout,
    /// environment changed or deleted, lost by the backend).
    Destroyed,
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
