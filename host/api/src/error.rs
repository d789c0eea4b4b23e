//! The one error type of the API, mapped to Poseidon's statuses, bodies and error codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use poseidon_core::{BackendError, CoreError};

/// An error response: status, `{"message": ...}` and, for server errors, an `errorCode`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// Poseidon's machine-readable code (5xx only).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, None)
    }

    /// Any status with a message and optional code.
    pub fn new(status: StatusCode, message: impl Into<String>, code: Option<&'static str>) -> Self {
        Self {
            status,
            message: message.into(),
            code,
        }
    }

    /// 500 with `errorCode` `UNKNOWN`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message, Some("UNKNOWN"))
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let message = e.to_string();
        match e {
            CoreError::EnvironmentNotFound | CoreError::ExecutionNotFound => {
                Self::new(StatusCode::NOT_FOUND, message, None)
            }
            CoreError::RunnerGone => Self::new(StatusCode::GONE, message, None),
            CoreError::PoolEmpty | CoreError::PoolFailing(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                message,
                Some("NOMAD_OVERLOAD"),
            ),
            CoreError::Invalid(_) => Self::bad_request(message),
            CoreError::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, message, None),
            CoreError::Backend(b) => b.into(),
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let message = e.to_string();
        match e {
            BackendError::Unsupported(_) => Self::bad_request(message),
            BackendError::FileNotFound => Self::new(StatusCode::FAILED_DEPENDENCY, message, None),
            BackendError::Unreachable(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                message,
                Some("NOMAD_UNREACHABLE"),
            ),
            BackendError::NodeDown(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                message,
                Some("NOMAD_INTERNAL_SERVER_ERROR"),
            ),
            BackendError::FileCopyFailed { .. } | BackendError::Internal(_) => {
                Self::internal(message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            crate::telemetry::log_server_error(self.status, self.code, &self.message);
        }
        let body = match self.code {
            Some(code) => serde_json::json!({"message": self.message, "errorCode": code}),
            None => serde_json::json!({"message": self.message}),
        };
        (self.status, axum::Json(body)).into_response()
    }
}
