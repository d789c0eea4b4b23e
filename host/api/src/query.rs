//! Query parameters: Go-style booleans and clear errors for anything malformed.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;

use crate::error::ApiError;

/// Decoded query parameters (400 if the query string is not valid UTF-8 or malformed).
pub(crate) fn params(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))
}

/// A boolean parameter parsed like Go's `strconv.ParseBool`; absent or empty gives `default`.
pub(crate) fn boolean(
    params: &HashMap<String, String>,
    name: &str,
    default: bool,
) -> Result<bool, ApiError> {
    match params.get(name).map(String::as_str) {
        None | Some("") => Ok(default),
        Some("1" | "t" | "T" | "TRUE" | "true" | "True") => Ok(true),
        Some("0" | "f" | "F" | "FALSE" | "false" | "False") => Ok(false),
        Some(other) => Err(ApiError::bad_request(format!(
            "could not parse {name} parameter: {other:?} is not a boolean"
        ))),
    }
}
