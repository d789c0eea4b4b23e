//! A byte channel to a runner's agent through one long-lived alloc exec session running
//! `poseidon-agent --connect` (nomad-api.md §6): the session's stdin and stdout frames carry the
//! agent protocol's bytes.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use poseidon_agent_protocol::BRIDGE_BANNER;
use poseidon_core::agent::SandboxChannel;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::api::NomadClient;
use crate::exec::{self, Frame, SessionError};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Interval of `{}` heartbeats towards Nomad (the Go client's value).
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long the bridge may take to report that it reached the agent.
const BANNER_WAIT: Duration = Duration::from_secs(20);
/// Bytes buffered between the exec session and the agent client in each direction.
const BUFFER: usize = 256 * 1024;

/// Why no channel was opened.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The exec session could not be opened or broke.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The session ended before the bridge reached the agent (no agent in the runner, or it is
    /// not running): its exit code and error output.
    #[error("the runner's agent is not running (the bridge exited with {code}: {stderr})")]
    NoAgent {
        /// Exit code of the bridge command.
        code: i32,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// The bridge did not answer in time.
    #[error("the runner's agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// Runs `argv` (the bridge command) in the allocation and returns its stdin/stdout as a channel,
/// once the bridge printed [`BRIDGE_BANNER`].
pub async fn open(
    client: &NomadClient,
    alloc: &str,
    argv: &[String],
) -> Result<SandboxChannel, BridgeError> {
    let ws = exec::connect(client, alloc, argv, false).await?;
    let (mut sink, mut stream) = ws.split();
    let banner = format!("{BRIDGE_BANNER}\n");
    let mut head: Vec<u8> = Vec::new();
    let mut stderr: Vec<u8> = Vec::new();
    let waiting = async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => match exec::parse_frame(t.as_str()) {
                    Some(Frame::Stdout(d)) => {
                        head.extend_from_slice(&d);
                        // The first line decides (some drivers, e.g. raw_exec, report the exit
                        // only once stdin is closed, so a failing bridge says so on stdout too).
                        if let Some(end) = head.iter().position(|b| *b == b'\n') {
                            if head[..=end] == *banner.as_bytes() {
                                return Ok(head.split_off(end + 1));
                            }
                            return Err(BridgeError::NoAgent {
                                code: -1,
                                stderr: String::from_utf8_lossy(&head[..end]).into_owned(),
                            });
                        }
                    }
                    Some(Frame::Stderr(d)) => stderr.extend_from_slice(&d),
                    Some(Frame::Exited(code)) => {
                        return Err(BridgeError::NoAgent {
                            code,
                            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
                        })
                    }
                    None => {}
                },
                Some(Ok(Message::Close(Some(f)))) if !f.reason.is_empty() => {
                    return Err(SessionError::Closed(f.reason.to_string()).into())
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    return Err(SessionError::Lost.into())
                }
                Some(Ok(_)) => {}
            }
        }
    };
    let rest = tokio::time::timeout(BANNER_WAIT, waiting)
        .await
        .map_err(|_| BridgeError::Timeout(BANNER_WAIT))??;
    let (ours, theirs) = tokio::io::duplex(BUFFER);
    let (mut from_client, mut to_client) = tokio::io::split(theirs);
    tokio::spawn(async move {
        if !rest.is_empty() && to_client.write_all(&rest).await.is_err() {
            return;
        }
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(Ok(Message::Text(t))) => match exec::parse_frame(t.as_str()) {
                        Some(Frame::Stdout(d)) if to_client.write_all(&d).await.is_err() => break,
                        Some(Frame::Exited(_)) => break,
                        _ => {}
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                read = from_client.read(&mut buf) => match read {
                    Ok(0) | Err(_) => {
                        let close = json!({"stdin": {"close": true}}).to_string();
                        let _ = sink.send(Message::Text(close.into())).await;
                        let _ = sink.close().await;
                        break;
                    }
                    Ok(n) => {
                        let data = json!({"stdin": {"data": B64.encode(Bytes::copy_from_slice(&buf[..n]))}}).to_string();
                        if sink.send(Message::Text(data.into())).await.is_err() { break; }
                    }
                },
                _ = heartbeat.tick() => {
                    if sink.send(Message::Text("{}".into())).await.is_err() { break; }
                }
            }
        }
        // Dropping both halves ends the client's channel.
    });
    let (reader, writer) = tokio::io::split(ours);
    Ok((Box::pin(reader), Box::pin(writer)))
}
