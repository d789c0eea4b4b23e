//! One local runner: a persistent bubblewrap sandbox with the agent inside, its directory, its two
//! host uids and its cgroup.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use poseidon_core::agent::{Sandbox, SandboxChannel};
use poseidon_core::backend::{BackendError, Claim, MappedPort};
use poseidon_core::RunnerId;

use crate::backend::Shared;
use crate::cgroup::RunnerCgroup;
use crate::state::RunnerState;

/// The sandbox of a local runner.
pub(crate) struct LocalSandbox {
    pub(crate) id: RunnerId,
    pub(crate) dir: PathBuf,
    pub(crate) cgroup: RunnerCgroup,
    pub(crate) state: std::sync::Mutex<RunnerState>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) destroyed: AtomicBool,
}

impl LocalSandbox {
    /// The agent's socket on the host.
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join("ctl").join("agent.sock")
    }

    /// Whether [`Sandbox::destroy`] was called.
    pub(crate) fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Sandbox for LocalSandbox {
    fn id(&self) -> &RunnerId {
        &self.id
    }

    fn workdir(&self) -> &str {
        &self.shared.config.workdir
    }

    fn base_environment(&self) -> Vec<(String, String)> {
        crate::sandbox::base_environment(&self.shared.config.workdir)
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.state
            .lock()
            .unwrap()
            .ports
            .iter()
            .map(|p| MappedPort {
                exposed_port: p.exposed,
                host_address: p.host_address.clone(),
            })
            .collect()
    }

    async fn mark_claimed(&self, claim: Option<Claim>) -> Result<(), BackendError> {
        let claimed = claim.is_some();
        let state = {
            let mut state = self.state.lock().unwrap();
            state.set_claim(claim);
            state.clone()
        };
        let saved = state.save(&self.dir).await;
        if let (Err(e), true) = (&saved, claimed) {
            // The record still says idle: a server started after this one would give the
            // runner, with this client's files, to the next claim. Without a record it is
            // removed at that start instead (unlinking needs no descriptor, nor space).
            let _ = std::fs::remove_file(self.dir.join("runner.json"));
            tracing::warn!(runner = %self.id, error = %e, "the claim could not be recorded: the runner will be removed, not recovered, at the next start");
        }
        saved.map_err(|e| BackendError::Internal(format!("could not record the claim: {e}")))
    }

    async fn connect(&self) -> Result<SandboxChannel, BackendError> {
        if self.is_destroyed() {
            return Err(BackendError::Internal("the runner was destroyed".into()));
        }
        // A socket path is limited to 108 bytes and the state directory may be deep: connect
        // through a descriptor of the control directory instead.
        let unreachable = |e: std::io::Error| {
            BackendError::Internal(format!("cannot reach the runner's agent: {e}"))
        };
        let control = std::fs::File::open(self.dir.join("ctl")).map_err(unreachable)?;
        let short = format!(
            "/proc/self/fd/{}/agent.sock",
            std::os::fd::AsRawFd::as_raw_fd(&control)
        );
        let stream = tokio::net::UnixStream::connect(short)
            .await
            .map_err(unreachable)?;
        drop(control);
        // The socket's directory is the runner root's: a privileged execution can put a link
        // to another runner's socket (or to any socket of the host) in its place. Only a peer
        // running as this runner's root is its agent.
        let expected = self.state.lock().unwrap().uids.0;
        let peer = stream.peer_cred().map_err(unreachable)?.uid();
        if peer != expected {
            return Err(BackendError::Internal(format!(
                "cannot reach the runner's agent: its socket leads to a process of uid {peer}, not the runner's {expected}"
            )));
        }
        let (reader, writer) = stream.into_split();
        Ok((Box::pin(reader), Box::pin(writer)))
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let state = self.state.lock().unwrap().clone();
        // Killing the PID namespace's init ends every process of the sandbox, with or without
        // cgroups; the helpers outside the namespace (bubblewrap's monitor, the network) follow.
        for pid in state.pids() {
            // A pid recorded before a restart may belong to another process by now.
            if owned_by(pid, state.uids.0) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        self.cgroup.kill_and_remove().await;
        self.shared
            .remove_runner_dir(&self.dir, state.mounted)
            .await;
        self.shared.uids.release(state.uids.0);
        Ok(())
    }
}

/// Whether process `pid` exists and runs as host uid `uid` (its real uid: `/proc/PID` itself
/// belongs to root for a process that is not dumpable, as the agent is not).
pub(crate) fn owned_by(pid: u32, uid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next()?.parse::<u32>().ok())
            == Some(uid)
    })
}

impl LocalSandbox {
    /// The sandbox's own error output at start, for error messages (`: …`, or nothing).
    pub(crate) async fn startup_log(&self) -> String {
        match tokio::fs::read_to_string(self.dir.join("sandbox.log")).await {
            Ok(text) if !text.trim().is_empty() => {
                let text = text.trim();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(500)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!(": {tail}")
            }
            _ => String::new(),
        }
    }
}
