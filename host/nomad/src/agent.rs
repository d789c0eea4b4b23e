//! The runner agent in a Nomad runner: put into the container through an exec session (its
//! binary streamed over stdin, so nothing is needed on the Nomad clients), started there as a
//! daemon, and reached through one long-lived exec session per runner ([`crate::bridge`]). An
//! execution is then a message to the agent, not new exec sessions; a broken session is
//! re-opened and the agent's running executions carry on (core's agent client resumes them).

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use poseidon_core::agent::{Sandbox, SandboxChannel};
use poseidon_core::backend::{BackendError, Claim, MappedPort};
use poseidon_core::RunnerId;
use tokio::sync::OnceCell;

use crate::bridge::{self, BridgeError};
use crate::exec;
use crate::runner::NomadRunner;

/// The agent's directory in the container: the task's own directory (`/local` with Docker,
/// outside the learner's workspace). Only root may list or change it and use the agent's socket
/// (mode 0600); `user` may run the binary (the agent lists and reads files as `user` through a
/// copy of itself running as `user`).
const AGENT_DIR: &str = "${NOMAD_TASK_DIR:-/tmp}/.poseidon";
/// How long installing and starting the agent may take.
const INSTALL_WAIT: Duration = Duration::from_secs(60);
/// How long a broken session to the agent is re-opened before its executions fail (a Nomad
/// client agent restarting takes seconds).
const RECONNECT_WINDOW: Duration = Duration::from_secs(60);

/// The agent binary the gateway puts into runners, read once.
#[derive(Default)]
pub struct AgentBinary {
    path: Option<PathBuf>,
    bytes: OnceCell<Bytes>,
}

impl AgentBinary {
    /// The binary at `path`, or (empty) `poseidon-agent` next to the gateway's executable.
    pub fn new(path: &str) -> Self {
        let path = if path.is_empty() {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("poseidon-agent")))
        } else {
            Some(PathBuf::from(path))
        };
        Self {
            path,
            bytes: OnceCell::new(),
        }
    }

    async fn bytes(&self) -> Result<Bytes, BackendError> {
        self.bytes
            .get_or_try_init(|| async {
                let path = self.path.clone().ok_or_else(|| {
                    BackendError::Internal("the runner agent binary was not found".into())
                })?;
                tokio::fs::read(&path).await.map(Bytes::from).map_err(|e| {
                    BackendError::Internal(format!(
                        "the runner agent {} cannot be read ({e}): build it with `cargo build -p poseidon-agent --target x86_64-unknown-linux-musl`, or set nomad.agentbinary",
                        path.display()
                    ))
                })
            })
            .await
            .cloned()
    }
}

/// Writes the binary from stdin into a fresh directory only root can change and starts it as a daemon
/// (without Nomad's variables, which executions do not see either). Whatever was in the
/// directory goes first: nothing a learner put there is run.
fn install_script() -> String {
    format!(
        r#"set -e; d="{AGENT_DIR}"; rm -rf "$d"; mkdir -m 711 "$d"; cat > "$d/agent.new"; chmod 755 "$d/agent.new"; mv -f "$d/agent.new" "$d/agent"; unset ${{!NOMAD_@}}; exec "$d/agent" --daemon "$d/agent.sock""#
    )
}

/// Carries the exec session to the running agent (no agent installed: a line saying so, exit 127).
fn bridge_script() -> String {
    format!(
        r#"d="{AGENT_DIR}"; [ -x "$d/agent" ] || {{ echo "no poseidon-agent in $d"; exit 127; }}; exec "$d/agent" --connect "$d/agent.sock""#
    )
}

fn bash(script: String) -> Vec<String> {
    vec!["/bin/bash".into(), "-c".into(), script]
}

impl NomadRunner {
    /// Installs and starts the agent in the allocation.
    async fn install_agent(&self, alloc: &str) -> Result<(), BackendError> {
        let binary = self.shared.agent.bytes().await?;
        let (_, err, code) = exec::run_captured(
            &self.shared.client,
            alloc,
            bash(install_script()),
            binary,
            INSTALL_WAIT,
        )
        .await?;
        if code != 0 {
            return Err(BackendError::Internal(format!(
                "the runner's agent could not be started (status {code}): {}",
                String::from_utf8_lossy(&err).trim()
            )));
        }
        tracing::debug!(runner = %self.id, alloc, "started the runner's agent");
        Ok(())
    }
}

impl From<BridgeError> for BackendError {
    fn from(e: BridgeError) -> Self {
        match e {
            BridgeError::Session(s) => s.into(),
            other => BackendError::Internal(other.to_string()),
        }
    }
}

#[async_trait]
impl Sandbox for NomadRunner {
    fn id(&self) -> &RunnerId {
        &self.id
    }

    fn workdir(&self) -> &str {
        // The agent runs in the task's working directory, as `docker exec` would.
        "."
    }

    fn base_environment(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    fn inherits_environment(&self) -> bool {
        true
    }

    fn identity(&self, privileged: bool) -> poseidon_core::agent::Identity {
        // Without an unprivileged prefix, commands run as the task's user (poseidon-behavior.md
        // §5.1): the agent's own identity.
        if privileged || self.shared.config.unprivilegedprefix.is_empty() {
            poseidon_core::agent::Identity::Root
        } else {
            poseidon_core::agent::Identity::User
        }
    }

    fn merges_stderr_on_terminal(&self) -> bool {
        !self.shared.config.interactive_stderr
    }

    fn reconnect_window(&self) -> Duration {
        RECONNECT_WINDOW
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.current_ports()
    }

    async fn mark_claimed(&self, claim: Option<Claim>) -> Result<(), BackendError> {
        self.record_claim(claim).await
    }

    async fn connect(&self) -> Result<SandboxChannel, BackendError> {
        let alloc = self.allocation().await?;
        let client = &self.shared.client;
        match bridge::open(client, &alloc, &bash(bridge_script())).await {
            Ok(channel) => return Ok(channel),
            Err(BridgeError::NoAgent { code, stderr }) => {
                tracing::debug!(runner = %self.id, code, stderr, "no agent running in the runner; starting one");
            }
            Err(e) => return Err(e.into()),
        }
        self.install_agent(&alloc).await?;
        Ok(bridge::open(client, &alloc, &bash(bridge_script())).await?)
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        self.remove().await
    }
}
