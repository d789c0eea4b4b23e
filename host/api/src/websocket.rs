//! `GET /runners/{id}/websocket?executionID=`: runs a stored execution and streams it.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use poseidon_core::execution::{ExecEvent, ExecutionRequest};
use poseidon_core::runner::Runner;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::policy::Principal;
use crate::routes::runner;
use crate::wire::WsMessage;
use crate::{observe, query, AppState};

/// Checks runner, execution id and origin, then upgrades.
pub(crate) async fn connect(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let runner = runner(&state, &id, principal.as_deref())?;
    let params = query::params(q)?;
    let unknown = || ApiError::new(StatusCode::NOT_FOUND, "execution id unknown", None);
    let execution = params
        .get("executionID")
        .and_then(|e| uuid::Uuid::parse_str(e).ok())
        .ok_or_else(unknown)?;
    if !runner.has_execution(&execution) {
        return Err(unknown());
    }
    if !origin_matches(&headers) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the Origin header does not match the Host header",
            None,
        ));
    }
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!(
            "a WebSocket handshake is required: {}",
            e.body_text()
        ))
    })?;
    let request = runner.take_execution(&execution).map_err(|_| unknown())?;
    runner.touch();
    Ok(upgrade.on_upgrade(move |socket| session(socket, state, runner, request)))
}

/// Like gorilla/websocket: an `Origin`, if sent, must name the same host as `Host`.
fn origin_matches(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin_host = origin.split("://").nth(1).unwrap_or(origin);
    origin_host.eq_ignore_ascii_case(host)
}

fn text(message: &WsMessage) -> Message {
    Message::Text(serde_json::to_string(message).unwrap_or_default().into())
}

async fn session(
    socket: WebSocket,
    state: AppState,
    runner: Arc<Runner>,
    request: ExecutionRequest,
) {
    let (mut sink, mut stream) = socket.split();
    if sink.send(text(&WsMessage::Start)).await.is_err() {
        return;
    }
    let started = std::time::Instant::now();
    observe::emit(&state, &runner, || crate::LifecycleKind::ExecutionStarted {
        command: request.command.clone(),
    });
    let mut last = None;
    let environment = runner.environment().to_string();
    let mut outcome = "disconnected";
    let mut execution = runner.run(request);
    let stdin = execution.stdin.clone();
    let gone = CancellationToken::new();
    let reader_gone = gone.clone();
    // Input is read by its own task so that a program that does not read stdin cannot stall output.
    let reader = tokio::spawn(async move {
        while let Some(message) = stream.next().await {
            let data: Bytes = match message {
                Ok(Message::Text(t)) => Bytes::copy_from_slice(t.as_bytes()),
                Ok(Message::Binary(b)) => b,
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(Message::Close(_)) | Err(_) => break,
            };
            if stdin.send(data).await.is_err() {
                // The execution has ended; keep reading so that a close is still noticed.
                continue;
            }
        }
        reader_gone.cancel();
    });
    loop {
        let event = tokio::select! {
            e = execution.events.recv() => e,
            _ = gone.cancelled() => None,
        };
        let Some(event) = event else { break };
        let is_final = event.is_final();
        if is_final {
            last = Some(event.clone());
        }
        let message = match event {
            ExecEvent::Stdout(s) => WsMessage::Stdout(s),
            ExecEvent::Stderr(s) => WsMessage::Stderr(s),
            ExecEvent::Exit(code) => {
                // 137 = killed by SIGKILL, which is how the memory limit ends a program.
                outcome = if code == 137 { "oom" } else { "exit" };
                WsMessage::Exit(code)
            }
            ExecEvent::Timeout => {
                outcome = "timeout";
                WsMessage::Timeout
            }
            ExecEvent::Error(e) => {
                outcome = "error";
                WsMessage::Error(e)
            }
        };
        if sink.send(text(&message)).await.is_err() {
            break;
        }
        if is_final {
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: "".into(),
                })))
                .await;
            break;
        }
    }
    drop(execution); // ends the program if it is still running (client gone)
    observe::emit(&state, &runner, || {
        observe::ended(last.as_ref(), started.elapsed())
    });
    metrics::counter!("poseidon_executions_total",
        "environment" => environment.clone(), "outcome" => outcome)
    .increment(1);
    metrics::histogram!("poseidon_execution_duration_seconds",
        "environment" => environment, "outcome" => outcome)
    .record(started.elapsed());
    reader.abort();
    let _ = sink.close().await;
}
