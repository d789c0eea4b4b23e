//! A byte channel to a runner's agent through one long-lived alloc exec session running
//! `poseidon-agent --connect` (nomad-api.md §6): the session's stdin and stdout frames carry the
//! agent protocol's bytes.

use std::time::Duration;

use bytes::Bytes;
use poseidon_agent_protocol::BRIDGE_BANNER;
use poseidon_core::agent::SandboxChannel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::NomadClient;
use crate::exec::{self, Frame, SessionError};

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
/// once the bridge printed [`BRIDGE_BANNER`]. The session itself is [`exec::drive`]'s.
pub async fn open(
    client: &NomadClient,
    alloc: &str,
    argv: &[String],
) -> Result<SandboxChannel, BridgeError> {
    let ws = exec::connect(client, alloc, argv, false).await?;
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(64);
    let kill = CancellationToken::new();
    let mut session = tokio::spawn(exec::drive(ws, stdin_rx, true, out_tx, kill.clone()));
    let banner = format!("{BRIDGE_BANNER}\n");
    let mut head: Vec<u8> = Vec::new();
    let mut stderr: Vec<u8> = Vec::new();
    // The first line decides (some drivers, e.g. raw_exec, report the exit only once stdin is
    // closed, so a failing bridge says so on stdout too).
    let waiting = async {
        while let Some(frame) = out_rx.recv().await {
            match frame {
                Frame::Stdout(d) => {
                    head.extend_from_slice(&d);
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
                Frame::Stderr(d) => stderr.extend_from_slice(&d),
                Frame::Exited(_) => {}
            }
        }
        // The session ended before the banner.
        match (&mut session).await {
            Ok(Ok(code)) => Err(BridgeError::NoAgent {
                code: code.unwrap_or(-1),
                stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
            }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SessionError::Lost.into()),
        }
    };
    let rest = match tokio::time::timeout(BANNER_WAIT, waiting).await {
        Ok(Ok(rest)) => rest,
        Ok(Err(e)) => {
            kill.cancel();
            return Err(e);
        }
        Err(_) => {
            kill.cancel();
            return Err(BridgeError::Timeout(BANNER_WAIT));
        }
    };
    let (ours, theirs) = tokio::io::duplex(BUFFER);
    let (mut from_client, mut to_client) = tokio::io::split(theirs);
    // Input from the client; its end closes the session's stdin, which ends the bridge.
    let input = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from_client.read(&mut buf).await {
            if n == 0
                || stdin_tx
                    .send(Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .is_err()
            {
                break;
            }
        }
    });
    // Output towards the client until the session ends; then both halves of the client's peer
    // go (the input task holds the other), which is the client's end of file.
    tokio::spawn(async move {
        if rest.is_empty() || to_client.write_all(&rest).await.is_ok() {
            while let Some(frame) = out_rx.recv().await {
                if let Frame::Stdout(d) = frame {
                    if to_client.write_all(&d).await.is_err() {
                        break;
                    }
                }
            }
        }
        input.abort();
    });
    let (reader, writer) = tokio::io::split(ours);
    Ok((Box::pin(reader), Box::pin(writer)))
}
