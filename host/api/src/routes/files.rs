//! `/runners/{id}/files`: update, list, download.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use poseidon_core::backend::ListRequest;
use poseidon_core::files::{clean_path, FileCopy, FileUpdate};

use crate::error::ApiError;
use crate::policy::Principal;
use crate::routes::runner;
use crate::wire::{FileList, FileView, FilesBody};
use crate::{body, query, AppState};

/// `PATCH /runners/{id}/files`: delete, then copy.
pub(crate) async fn update(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    request_body: Body,
) -> Result<Response, ApiError> {
    let runner = runner(&state, &id, principal.as_deref())?;
    let body: FilesBody = body::json(request_body, state.settings.max_body_bytes).await?;
    let mut update = FileUpdate::default();
    for path in body.delete {
        check_path(&path)?;
        update.delete.push(if path == "./*" {
            path
        } else {
            clean_path(&path)
        });
    }
    for copy in body.copy {
        check_path(&copy.path)?;
        let content = match copy.content {
            None => Vec::new(),
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| {
                    ApiError::bad_request(format!(
                        "the content of {:?} is not valid base64: {e}",
                        copy.path
                    ))
                })?,
        };
        update.copy.push(FileCopy {
            path: copy.path,
            content,
        });
    }
    let update = state
        .policies
        .preprocess_files(runner.environment(), principal.as_deref(), update)
        .await
        .map_err(ApiError::bad_request)?;
    runner.touch();
    let bytes: usize = update.copy.iter().map(|c| c.content.len()).sum();
    let result = runner.update_files(&update).await;
    runner.touch();
    result?;
    crate::observe::emit(&state, &runner, || crate::LifecycleKind::FilesChanged {
        copied: u32::try_from(update.copy.len()).unwrap_or(u32::MAX),
        deleted: u32::try_from(update.delete.len()).unwrap_or(u32::MAX),
        bytes: update.copy.iter().map(|f| f.content.len() as u64).sum(),
    });
    metrics::counter!("poseidon_file_bytes_copied_total",
        "environment" => runner.environment().to_string())
    .increment(bytes as u64);
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn check_path(path: &str) -> Result<(), ApiError> {
    if path.is_empty() {
        return Err(ApiError::bad_request("a file path must not be empty"));
    }
    if path.contains('\0') {
        return Err(ApiError::bad_request(
            "a file path must not contain NUL characters",
        ));
    }
    Ok(())
}

/// `GET /runners/{id}/files[?path=&recursive=&privilegedExecution=]`.
pub(crate) async fn list(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let runner = runner(&state, &id, principal.as_deref())?;
    let params = query::params(q)?;
    let recursive = query::boolean(&params, "recursive", true)?;
    let privileged = query::boolean(&params, "privilegedExecution", false)?;
    let path = match params.get("path").map(String::as_str) {
        None | Some("") => "./".to_string(),
        Some(p) => p.to_string(),
    };
    check_path(&path)?;
    runner.touch();
    let entries = runner
        .list_files(&ListRequest {
            path,
            recursive,
            privileged,
        })
        .await?;
    runner.touch();
    Ok(Json(FileList {
        files: entries.into_iter().map(FileView::from).collect(),
    })
    .into_response())
}

/// `GET /runners/{id}/files/raw?path=`: the file with its exact `Content-Length`.
pub(crate) async fn download(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let runner = runner(&state, &id, principal.as_deref())?;
    let params = query::params(q)?;
    let privileged = query::boolean(&params, "privilegedExecution", false)?;
    let path = params
        .get("path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad_request("the query parameter path is required"))?
        .clone();
    check_path(&path)?;
    runner.touch();
    let download = runner.download_file(&path, privileged).await?;
    runner.touch();
    metrics::counter!("poseidon_file_bytes_downloaded_total",
        "environment" => runner.environment().to_string())
    .increment(download.size);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, download.size)
        .header(header::CONTENT_DISPOSITION, content_disposition(&path))
        .body(Body::from_stream(download.body))
        .map_err(|e| ApiError::internal(format!("could not build the response: {e}")))
}

/// `attachment; filename="…"` with quotes, backslashes and control characters made harmless.
fn content_disposition(path: &str) -> String {
    let name: String = path
        .chars()
        .map(|c| match c {
            '"' | '\\' => '_',
            c if c.is_control() => '_',
            c if !c.is_ascii() => '_',
            c => c,
        })
        .collect();
    format!("attachment; filename=\"{name}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disposition_is_escaped() {
        assert_eq!(
            content_disposition("a\"b\n.txt"),
            "attachment; filename=\"a_b_.txt\""
        );
    }
}
