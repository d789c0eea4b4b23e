//! Configuration of the local backend (the `local:` section of `configuration.yaml`).

use std::collections::HashMap;
use std::path::PathBuf;

/// Settings of the local backend. Keys are lower-case like Poseidon's.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// Where environments are persisted and runner directories live.
    pub statedir: PathBuf,
    /// The working directory of executions inside the sandbox.
    pub workdir: String,
    /// Size limit of a runner's files (workspace and `/tmp` together), in MB.
    pub workspacesizemb: u64,
    /// Most processes and threads one runner may have at once.
    pub pidslimit: u64,
    /// Memory limit in MB for environments whose `memoryLimit` is 0, so that no runner is unbounded
    /// by default (0 = none; Nomad would apply the template's reservation instead).
    pub defaultmemorylimitmb: u64,
    /// Image name → root filesystem directory; unmapped images use the host's system directories.
    pub images: HashMap<String, PathBuf>,
    /// The bubblewrap binary.
    pub bwrap: PathBuf,
    /// First host uid given to runners (each runner gets its own).
    pub uidbase: u32,
    /// How many host uids runners may use.
    pub uidcount: u32,
    /// Longest time a file operation may take, in seconds.
    pub filetimeoutseconds: u64,
    /// Name of the parent cgroup of all runners (one per server instance on a machine).
    pub cgroupparent: String,
    /// The runner agent binary (default: `poseidon-agent` next to the server's executable).
    pub agent: Option<PathBuf>,
    /// Host address that exposed ports of runners are bound to.
    pub portaddress: String,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            statedir: PathBuf::from("/var/lib/poseidon"),
            workdir: "/workspace".to_string(),
            workspacesizemb: 512,
            pidslimit: 512,
            defaultmemorylimitmb: 1024,
            images: HashMap::new(),
            bwrap: PathBuf::from("bwrap"),
            uidbase: 200_000,
            uidcount: 100_000,
            filetimeoutseconds: 60,
            cgroupparent: "poseidon".to_string(),
            agent: None,
            portaddress: "127.0.0.1".to_string(),
        }
    }
}
