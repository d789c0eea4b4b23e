//! [`AgentRunner`]: a [`RunnerBackend`] made of a backend's [`Sandbox`] and the agent inside it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use poseidon_agent_protocol::Identity;
use tokio::io::{AsyncRead, AsyncWrite};

use super::client::{AgentClient, AgentError, Connector, ExecSpec};
use crate::backend::{
    BackendError, Claim, ExecProcess, ExecRequest, FileDownload, ListRequest, MappedPort,
    RunnerBackend,
};
use crate::files::{build_tar, FileEntry, FileUpdate};
use crate::ids::RunnerId;

/// The two halves of a byte channel to an agent.
pub type SandboxChannel = (
    Pin<Box<dyn AsyncRead + Send>>,
    Pin<Box<dyn AsyncWrite + Send>>,
);

/// What a backend provides for a runner with an agent: the sandbox's life cycle and a channel.
#[async_trait]
pub trait Sandbox: Send + Sync + 'static {
    /// The runner id.
    fn id(&self) -> &RunnerId;

    /// The working directory of executions and relative paths.
    fn workdir(&self) -> &str;

    /// Environment variables every execution starts with (before the request's own).
    fn base_environment(&self) -> Vec<(String, String)>;

    /// Ports reachable from outside.
    fn mapped_ports(&self) -> Vec<MappedPort> {
        Vec::new()
    }

    /// Records durably that the runner is claimed (`Some`) or idle again (`None`).
    async fn mark_claimed(&self, _claim: Option<Claim>) -> Result<(), BackendError> {
        Ok(())
    }

    /// Whether executions inherit the agent's own environment ([`Sandbox::base_environment`]
    /// and the request's variables are added to it), as in a container whose image sets it.
    fn inherits_environment(&self) -> bool {
        false
    }

    /// Who an execution or file operation runs as.
    fn identity(&self, privileged: bool) -> Identity {
        if privileged {
            Identity::Root
        } else {
            Identity::User
        }
    }

    /// Whether an execution with a terminal reports standard error as standard output (Poseidon's
    /// `interactivestderr: false`).
    fn merges_stderr_on_terminal(&self) -> bool {
        false
    }

    /// How long a broken channel to the agent is re-opened before running executions fail.
    fn reconnect_window(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// Opens a new byte channel to the agent.
    async fn connect(&self) -> Result<SandboxChannel, BackendError>;

    /// Ends every process of the sandbox and removes it.
    async fn destroy(&self) -> Result<(), BackendError>;
}

/// A runner whose operations are messages to its agent.
pub struct AgentRunner {
    sandbox: Arc<dyn Sandbox>,
    client: tokio::sync::Mutex<Option<AgentClient>>,
    file_timeout: Duration,
}

impl AgentRunner {
    /// Wraps a sandbox; `client` is a connection already made (e.g. to check the agent at start).
    pub fn new(
        sandbox: Arc<dyn Sandbox>,
        client: Option<AgentClient>,
        file_timeout: Duration,
    ) -> Self {
        Self {
            sandbox,
            client: tokio::sync::Mutex::new(client),
            file_timeout,
        }
    }

    /// Connects to the agent; a connection that breaks later is re-opened through the sandbox.
    pub async fn connect(sandbox: &Arc<dyn Sandbox>) -> Result<AgentClient, AgentError> {
        let target = Arc::clone(sandbox);
        let connector: Connector = Arc::new(move || {
            let sandbox = Arc::clone(&target);
            Box::pin(async move { sandbox.connect().await.map_err(|e| e.to_string()) })
        });
        AgentClient::reconnecting(connector, sandbox.reconnect_window()).await
    }

    /// The current connection, re-opened once if it broke.
    async fn client(&self) -> Result<AgentClient, BackendError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = Self::connect(&self.sandbox).await.map_err(to_backend)?;
        *slot = Some(client.clone());
        Ok(client)
    }
}

fn to_backend(e: AgentError) -> BackendError {
    match e {
        AgentError::NotFound => BackendError::FileNotFound,
        AgentError::Failed { message, stderr } => BackendError::FileCopyFailed {
            stderr: if stderr.is_empty() { message } else { stderr },
            stdout: String::new(),
        },
        other => BackendError::Internal(other.to_string()),
    }
}

#[async_trait]
impl RunnerBackend for AgentRunner {
    fn id(&self) -> &RunnerId {
        self.sandbox.id()
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.sandbox.mapped_ports()
    }

    async fn mark_claimed(&self, claim: Option<Claim>) -> Result<(), BackendError> {
        self.sandbox.mark_claimed(claim).await
    }

    async fn execute(&self, request: &ExecRequest) -> Result<ExecProcess, BackendError> {
        let client = self.client().await?;
        let mut env = self.sandbox.base_environment();
        env.extend(request.environment.iter().cloned());
        env.push(("CODEOCEAN".into(), "true".into()));
        let argv = vec!["/bin/bash".into(), "-c".into(), request.command.clone()];
        client
            .exec(ExecSpec {
                argv,
                env,
                cwd: self.sandbox.workdir().to_string(),
                identity: self.sandbox.identity(request.privileged),
                tty: request.tty,
                inherit_env: self.sandbox.inherits_environment(),
                merge_stderr: request.tty && self.sandbox.merges_stderr_on_terminal(),
                time_limit: request.time_limit,
            })
            .await
            .map_err(to_backend)
    }

    async fn update_files(&self, update: &FileUpdate) -> Result<(), BackendError> {
        let client = self.client().await?;
        let archive = if update.copy.is_empty() {
            Bytes::new()
        } else {
            Bytes::from(build_tar(&update.copy))
        };
        client
            .update_files(
                update.delete.clone(),
                self.sandbox.workdir().to_string(),
                archive,
                self.file_timeout,
            )
            .await
            .map_err(to_backend)
    }

    async fn list_files(&self, request: &ListRequest) -> Result<Vec<FileEntry>, BackendError> {
        let client = self.client().await?;
        client
            .list(
                request.path.clone(),
                request.recursive,
                self.sandbox.workdir().to_string(),
                self.sandbox.identity(request.privileged),
                self.file_timeout,
            )
            .await
            .map_err(to_backend)
    }

    async fn download_file(
        &self,
        path: &str,
        privileged: bool,
    ) -> Result<FileDownload, BackendError> {
        let client = self.client().await?;
        client
            .read(
                path.to_string(),
                self.sandbox.workdir().to_string(),
                self.sandbox.identity(privileged),
                self.file_timeout,
            )
            .await
            .map_err(to_backend)
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        self.client.lock().await.take();
        self.sandbox.destroy().await
    }
}
