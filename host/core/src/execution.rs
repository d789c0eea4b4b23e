//! Executions as the client sees them: a stored request, then a run that yields [`ExecEvent`]s.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

/// An execution request stored by `POST /runners/{id}/execute` until its WebSocket connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionRequest {
    /// The shell command.
    pub command: String,
    /// Extra environment variables.
    pub environment: Vec<(String, String)>,
    /// Time limit counted from the start of the run; `None` = no limit.
    pub time_limit: Option<Duration>,
    /// Run as the sandbox's root.
    pub privileged: bool,
}

/// What the client of a running execution is told, in order: output, then exactly one final event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Text the program wrote to its terminal (stdout).
    Stdout(String),
    /// Text the program wrote to stderr.
    Stderr(String),
    /// The program ended with this exit code (final).
    Exit(u8),
    /// The time limit was reached (final).
    Timeout,
    /// The execution ended abnormally (final).
    Error(String),
}

impl ExecEvent {
    /// Whether this event ends the execution.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Exit(_) | Self::Timeout | Self::Error(_))
    }
}

/// A running execution. Dropping it (the client went away) kills the program.
pub struct ExecutionHandle {
    /// Events for the client; the channel closes after the final event.
    pub events: mpsc::Receiver<ExecEvent>,
    /// Input for the program's terminal.
    pub stdin: mpsc::Sender<Bytes>,
    pub(crate) _cancel_on_drop: DropGuard,
}

impl ExecutionHandle {
    pub(crate) fn new(
        events: mpsc::Receiver<ExecEvent>,
        stdin: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            events,
            stdin,
            _cancel_on_drop: cancel.drop_guard(),
        }
    }
}

/// Error message for failures Poseidon reports generically.
pub const GENERIC_EXECUTION_ERROR: &str = "Error executing the request";
/// Error message when a runner is stopped by its client or its environment.
pub const STOPPED_AS_EXPECTED: &str = "the allocation stopped as expected";
/// Error message when a runner ran out of memory.
pub const OOM_KILLED: &str = "the allocation was OOM Killed";
