//! Reading JSON request bodies strictly: size limit, unknown fields refused, clear messages.

use axum::body::Body;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Reads the body (413 above `limit`) and decodes it as `T` (400 with serde's message otherwise).
pub(crate) async fn json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if is_too_large(&e) {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than the limit of {limit} bytes"),
                None,
            )
        } else {
            ApiError::bad_request(format!("could not read the request body: {e}"))
        }
    })?;
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(ApiError::bad_request(
                "the request body is empty; a JSON object is expected",
            ))
        }
        // serde reads a struct from a JSON array too (fields by position); every body of the
        // contract is an object.
        Some(b'{') => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid request body: a JSON object is expected",
            ))
        }
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// Whether reading failed because of the length limit (the cause is nested in axum's error).
fn is_too_large(e: &axum::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.to_string().contains("length limit exceeded") {
            return true;
        }
        source = s.source();
    }
    false
}
