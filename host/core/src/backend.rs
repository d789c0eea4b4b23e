//! The seam between the gateway and the machinery that runs sandboxes.
//!
//! A [`Backend`] stores environment definitions and creates runners; a [`RunnerBackend`] is one
//! sandbox that can run commands and hold files. The API, the pools and the execution logic only
//! ever see these traits, never which backend serves them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::environment::EnvironmentConfig;
use crate::files::{FileEntry, FileUpdate};
use crate::ids::{EnvironmentId, RunnerId};

/// Errors a backend reports. The API maps each variant to a status and an error code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot serve this configuration (a client error).
    #[error("{0}")]
    Unsupported(String),
    /// The file or directory does not exist or cannot be read.
    #[error("file not found or insufficient permissions")]
    FileNotFound,
    /// Copying or deleting files failed inside the runner.
    #[error("file copy failed: stderr output '{stderr}' and stdout output '{stdout}'")]
    FileCopyFailed {
        /// What the copy command wrote to stderr.
        stderr: String,
        /// What the copy command wrote to stdout.
        stdout: String,
    },
    /// The scheduler (e.g. Nomad) cannot be reached.
    #[error("the scheduler is unreachable: {0}")]
    Unreachable(String),
    /// The runner's node or allocation is gone.
    #[error("the runner's node is down: {0}")]
    NodeDown(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl BackendError {
    /// Shorthand for [`BackendError::Internal`] from anything printable.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }
}

/// A port of a runner reachable from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedPort {
    /// The port inside the runner.
    pub exposed_port: u16,
    /// `host:port` where it can be reached.
    pub host_address: String,
}

/// A command to run in a runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// Shell command, run with `bash -c`.
    pub command: String,
    /// Extra environment variables (names validated by the API).
    pub environment: Vec<(String, String)>,
    /// Run as the sandbox's root instead of the unprivileged user.
    pub privileged: bool,
    /// Give the command a terminal (interactive executions) or plain pipes.
    pub tty: bool,
    /// The execution's time limit, which the gateway enforces; a backend may have it held in
    /// the runner too, as a backstop for while no gateway follows the execution.
    pub time_limit: Option<Duration>,
}

/// Output or termination of a running process, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// Bytes written to stdout (with a terminal: the terminal's output, including echo).
    Stdout(Bytes),
    /// Bytes written to stderr.
    Stderr(Bytes),
    /// The process ended with this exit code (128 + signal when killed). Always after all output.
    Exited(i32),
    /// The process could not be run or was lost; the text says why. Always last.
    Failed(String),
}

/// A process started by [`RunnerBackend::execute`].
pub struct ExecProcess {
    /// Input for the process's stdin; dropping it does not close stdin of a terminal.
    pub stdin: mpsc::Sender<Bytes>,
    /// Output, then exactly one of [`ProcessEvent::Exited`] or [`ProcessEvent::Failed`].
    pub events: mpsc::Receiver<ProcessEvent>,
    /// Cancelling kills the process and everything it started.
    pub kill: CancellationToken,
}

/// A file's content streamed from a runner.
pub struct FileDownload {
    /// Exact size in bytes of what `body` yields.
    pub size: u64,
    /// The content.
    pub body: BoxStream<'static, Result<Bytes, std::io::Error>>,
}

/// What to list with [`RunnerBackend::list_files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    /// Path to list (relative to the working directory or absolute).
    pub path: String,
    /// Descend into directories.
    pub recursive: bool,
    /// List as the sandbox's root.
    pub privileged: bool,
}

/// Why a backend lost a runner on its own (reported through [`BackendEvent::RunnerLost`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostReason {
    /// The runner ran out of memory and was killed.
    OomKilled,
    /// The runner was stopped as expected (e.g. its job was deregistered).
    Stopped,
    /// The runner was rescheduled or restarted: its files are gone.
    Restarted,
    /// Any other loss.
    Other(String),
}

/// Something the backend noticed on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEvent {
    /// A runner is gone (allocation failed, OOM killed, node lost, ...).
    RunnerLost {
        /// Which runner.
        runner: RunnerId,
        /// Why.
        reason: LostReason,
    },
    /// The runner's sandbox was restarted or moved (e.g. rescheduled to another node): the runner
    /// still exists under its id, but its files and processes are gone.
    RunnerRestarted {
        /// Which runner.
        runner: RunnerId,
    },
    /// The backend's view of environments changed; the manager should re-read them.
    EnvironmentsChanged,
}

/// What a backend records about a claimed runner, so that a restarted gateway gives the runner
/// back to the client that claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Inactivity timeout in seconds (0 or less: none).
    pub inactivity_timeout: i64,
    /// Who claimed it, an opaque name the backend keeps and gives back unchanged (the tenant an
    /// authenticator named); `None` when the claim named nobody, and for claims recorded by a
    /// version that did not record owners.
    pub owner: Option<String>,
}

/// A runner that survived a restart of the gateway.
pub struct RecoveredRunner {
    /// The runner.
    pub runner: Arc<dyn RunnerBackend>,
    /// `Some(the claim)` if it was claimed; `None` if it is idle.
    pub claimed: Option<Claim>,
}

/// Stores environments and creates runners.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs (`local`, `nomad`).
    fn name(&self) -> &'static str;

    /// Rejects configurations this backend cannot serve (e.g. exposed ports on the local backend).
    fn validate(&self, config: &EnvironmentConfig) -> Result<(), BackendError>;

    /// Persists an environment definition (local: state directory; Nomad: the template job).
    async fn store_environment(&self, config: &EnvironmentConfig) -> Result<(), BackendError>;

    /// Removes a persisted environment definition.
    async fn remove_environment(&self, id: EnvironmentId) -> Result<(), BackendError>;

    /// Reads all persisted environment definitions (on start and on `fetch=true`).
    async fn load_environments(&self) -> Result<Vec<EnvironmentConfig>, BackendError>;

    /// Starts a new runner of the environment and returns once it can execute commands.
    async fn create_runner(
        &self,
        config: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<Arc<dyn RunnerBackend>, BackendError>;

    /// Runners of the environment that outlived a previous gateway process and can be used again.
    async fn recover_runners(
        &self,
        config: &EnvironmentConfig,
    ) -> Result<Vec<RecoveredRunner>, BackendError>;

    /// Events the backend noticed on its own; called once, at start. `None` if it has none.
    fn take_events(&self) -> Option<mpsc::Receiver<BackendEvent>> {
        None
    }
}

/// One sandbox. Owned by exactly one pool or one claimed runner at a time.
#[async_trait]
pub trait RunnerBackend: Send + Sync + 'static {
    /// The runner id.
    fn id(&self) -> &RunnerId;

    /// Ports reachable from outside.
    fn mapped_ports(&self) -> Vec<MappedPort> {
        Vec::new()
    }

    /// Records durably that the runner is claimed (`Some`) or idle again (`None`), so that
    /// [`Backend::recover_runners`] can give the claim back after a restart.
    async fn mark_claimed(&self, _claim: Option<Claim>) -> Result<(), BackendError> {
        Ok(())
    }

    /// Starts a command.
    async fn execute(&self, request: &ExecRequest) -> Result<ExecProcess, BackendError>;

    /// Deletes, then copies files (as the sandbox's root).
    async fn update_files(&self, update: &FileUpdate) -> Result<(), BackendError>;

    /// Lists files.
    async fn list_files(&self, request: &ListRequest) -> Result<Vec<FileEntry>, BackendError>;

    /// Streams one regular file.
    async fn download_file(
        &self,
        path: &str,
        privileged: bool,
    ) -> Result<FileDownload, BackendError>;

    /// Ends every process of the runner and removes it.
    async fn destroy(&self) -> Result<(), BackendError>;
}
