//! What the server records about a runner in its directory, so that a restarted server can take
//! the runner back (`runner.json`, written atomically).

use std::path::Path;

use poseidon_core::backend::Claim;
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
    /// Who claimed it (core's opaque owner), while claimed by someone. Absent in the files of
    /// versions that recorded no owners, and left out when there is none, as they wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) owner: Option<String>,
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

    /// The claim it records, if it is claimed.
    pub(crate) fn claim(&self) -> Option<Claim> {
        self.claimed.map(|inactivity_timeout| Claim {
            inactivity_timeout,
            owner: self.owner.clone(),
        })
    }

    /// Records `claim` (or that the runner is idle again).
    pub(crate) fn set_claim(&mut self, claim: Option<Claim>) {
        let (claimed, owner) = match claim {
            Some(c) => (Some(c.inactivity_timeout), c.owner),
            None => (None, None),
        };
        self.claimed = claimed;
        self.owner = owner;
    }

    /// Reads `runner.json` from a runner's directory.
    pub(crate) fn load(dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(dir.join("runner.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> RunnerState {
        RunnerState {
            environment: 7,
            uids: (300_000, 300_001),
            mounted: true,
            monitor_pid: 10,
            init_pid: 11,
            network_pid: None,
            ports: Vec::new(),
            claimed: None,
            owner: None,
        }
    }

    #[tokio::test]
    async fn a_claim_keeps_its_owner_across_a_save_and_a_load() {
        let dir = std::env::temp_dir().join(format!("poseidon-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = state();
        let claim = Claim {
            inactivity_timeout: 60,
            owner: Some("hpi".into()),
        };
        s.set_claim(Some(claim.clone()));
        s.save(&dir).await.unwrap();
        let loaded = RunnerState::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.claim(), Some(claim));
        let mut idle = loaded;
        idle.set_claim(None);
        assert_eq!((idle.claimed, idle.owner), (None, None));
    }

    #[test]
    fn a_file_of_a_version_without_owners_reads_as_an_ownerless_claim() {
        let old = r#"{"environment":7,"uids":[300000,300001],"mounted":true,"monitor_pid":10,
            "init_pid":11,"network_pid":null,"ports":[],"claimed":60}"#;
        let s: RunnerState = serde_json::from_str(old).unwrap();
        assert_eq!(
            s.claim(),
            Some(Claim {
                inactivity_timeout: 60,
                owner: None
            })
        );
        // And an ownerless claim is written as that version wrote it.
        let written = serde_json::to_value(&s).unwrap();
        assert!(written.get("owner").is_none(), "{written}");
    }
}
