//! The error type of the core crate; the API maps each variant to an HTTP status.

use crate::backend::BackendError;

/// Errors of gateway operations.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoreError {
    /// No environment with this id.
    #[error("execution environment not found")]
    EnvironmentNotFound,
    /// The runner does not exist (any more) or is not claimed.
    #[error("no runner found with this id")]
    RunnerGone,
    /// The environment has no idle runner right now.
    #[error("no runners available for this execution environment")]
    PoolEmpty,
    /// The environment has no idle runner because its runners cannot be started; the text says why.
    #[error(
        "no runners available for this execution environment: the newest runner start failed: {0}"
    )]
    PoolFailing(String),
    /// No stored execution with this id.
    #[error("execution id unknown")]
    ExecutionNotFound,
    /// The request is invalid; the text says why.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not use this environment or runner.
    #[error("{0}")]
    Forbidden(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}
