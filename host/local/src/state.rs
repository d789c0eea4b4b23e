//! What the server records about a runner in its directory, so that a restarted server can take
//! the runner back (`runner.json`, written atomically).

use std::path::Path;

use poseidon_core::EnvironmentId;

/// A port of the runner forwarded from the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ForwardedPort {
    /// The port inside the runner.
    pub(crate) exposed: u16,
    /// `host:port` where it is reachable.
    pub(crate) host_address: String,
}

/// The persisted state of one runner.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RunnerState {
    /// Its environment.
    pub(crate) environment: EnvironmentId,
    /// Host uids of the runner's root and of its `user`.
    pub(crate) uids: (u32, u32),
    /// Whether its directory is a tmpfs of its own.
    pub(crate) mounted: bool,
    /// bubblewrap's monitor process (outside the sandbox).
    pub(crate) monitor_pid: u32,
    /// The sandbox's init (PID 1 of its namespace).
    pub(crate) init_pid: u32,
    /// The user-mode network's process, if any.
    pub(crate) network_pid: Option<u32>,
    /// Forwarded ports.
    pub(crate) ports: Vec<ForwardedPort>,
    /// `Some(inactivity timeout)` while claimed.
    pub(crate) claimed: Option<i64>,
}

impl RunnerState {
    /// Processes to kill when the runner goes.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.init_pid, self.monitor_pid];
        pids.extend(self.network_pid);
        pids.retain(|p| *p > 1);
        pids
    }

    /// Writes `runner.json` into the runner's directory.
    pub(crate) async fn save(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let tmp = dir.join("runner.json.tmp");
        tokio::fs::write(&tmp, json).await?;
        tokio::fs::rename(&tmp, dir.join("runner.json")).await
    }

    /// Reads `runner.json` from a runner's directory.
    pub(crate) fn load(dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(dir.join("runner.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}
