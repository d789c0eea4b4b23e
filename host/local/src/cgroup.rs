//! Per-runner cgroups: memory, process count and CPU weight for all of a runner's processes.
//!
//! cgroup v1 (separate `memory`, `pids`, `cpu` hierarchies) and v2 (unified) are supported. A
//! runner's sandbox is born in its cgroups (its launcher, run by the server as root, joins them)
//! or placed there by the server before anything runs inside, so every process of the runner
//! inherits them; nothing inside the sandbox ever moves itself (which cgroup v2
//! refuses to unprivileged processes). Where no controller is writable, the limits are not
//! enforced and a warning says so once.

use std::path::{Path, PathBuf};

/// Where the cgroup hierarchies are mounted, on the host and inside a sandbox alike.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Which cgroup layout the machine offers.
#[derive(Debug, Clone)]
pub(crate) enum Hierarchy {
    /// cgroup v1: one parent directory per available controller.
    V1(Vec<(&'static str, PathBuf)>),
    /// cgroup v2: the parent directory in the unified hierarchy.
    V2(PathBuf),
    /// No usable controller.
    None,
}

/// Limits for one runner.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Limits {
    pub(crate) memory_bytes: Option<u64>,
    pub(crate) pids: Option<u64>,
    pub(crate) cpu_weight_mhz: Option<u64>,
}

impl Hierarchy {
    /// Detects the layout and creates the `poseidon` parent groups.
    pub(crate) fn detect(group: &str) -> Self {
        let root = Path::new(CGROUP_ROOT);
        if root.join("cgroup.controllers").exists() {
            let parent = root.join(group);
            if std::fs::create_dir_all(&parent).is_ok() {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids +cpu");
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +pids +cpu");
                return Self::V2(parent);
            }
            return Self::None;
        }
        let mut found = Vec::new();
        for controller in ["memory", "pids", "cpu"] {
            let parent = root.join(controller).join(group);
            if std::fs::create_dir_all(&parent).is_ok() {
                found.push((controller, parent));
            }
        }
        if found.is_empty() {
            Self::None
        } else {
            Self::V1(found)
        }
    }

    /// A human-readable description for logs and the README.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::V1(c) => format!(
                "cgroup v1 controllers: {}",
                c.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
            Self::V2(_) => "cgroup v2".to_string(),
            Self::None => {
                "no writable cgroup controller: memory and process limits are NOT enforced"
                    .to_string()
            }
        }
    }

    /// Removes the (empty) parent groups.
    pub(crate) fn remove_parents(&self) {
        match self {
            Self::V1(c) => c.iter().for_each(|(_, p)| {
                let _ = std::fs::remove_dir(p);
            }),
            Self::V2(p) => {
                let _ = std::fs::remove_dir(p);
            }
            Self::None => {}
        }
    }

    /// Directories of every runner group that exists (for cleanup after a crash).
    pub(crate) fn existing_groups(&self) -> Vec<RunnerCgroup> {
        let parents: Vec<PathBuf> = match self {
            Self::V1(c) => c.iter().map(|(_, p)| p.clone()).collect(),
            Self::V2(p) => vec![p.clone()],
            Self::None => vec![],
        };
        let mut groups = Vec::new();
        for parent in parents {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for entry in entries.flatten() {
                    if entry.path().is_dir() {
                        groups.push(RunnerCgroup {
                            dirs: vec![entry.path()],
                        });
                    }
                }
            }
        }
        groups
    }

    /// The groups of one runner by name (existing or not), e.g. for a runner recovered after a restart.
    pub(crate) fn group(&self, name: &str) -> RunnerCgroup {
        let dirs = match self {
            Self::V1(c) => c.iter().map(|(_, p)| p.join(name)).collect(),
            Self::V2(p) => vec![p.join(name)],
            Self::None => vec![],
        };
        RunnerCgroup { dirs }
    }

    /// Where each group of a runner appears inside its sandbox, read-only, as in a container:
    /// `/sys/fs/cgroup` on cgroup v2, `/sys/fs/cgroup/CONTROLLER` on v1.
    pub(crate) fn sandbox_binds(&self, cgroup: &RunnerCgroup) -> Vec<(PathBuf, String)> {
        match self {
            Self::V1(controllers) => cgroup
                .dirs
                .iter()
                .filter_map(|dir| {
                    let (controller, _) = controllers.iter().find(|(_, p)| dir.starts_with(p))?;
                    Some((dir.clone(), format!("{CGROUP_ROOT}/{controller}")))
                })
                .collect(),
            Self::V2(_) => cgroup
                .dirs
                .iter()
                .map(|dir| (dir.clone(), CGROUP_ROOT.to_string()))
                .collect(),
            Self::None => Vec::new(),
        }
    }

    /// Creates the groups of one runner with its limits.
    pub(crate) fn create(&self, name: &str, limits: Limits) -> RunnerCgroup {
        let mut dirs = Vec::new();
        match self {
            Self::V1(controllers) => {
                for (controller, parent) in controllers {
                    let dir = parent.join(name);
                    if std::fs::create_dir_all(&dir).is_err() {
                        continue;
                    }
                    match *controller {
                        "memory" => {
                            if let Some(bytes) = limits.memory_bytes {
                                write(&dir, "memory.limit_in_bytes", bytes);
                                if dir.join("memory.memsw.limit_in_bytes").exists() {
                                    write(&dir, "memory.memsw.limit_in_bytes", bytes);
                                }
                            }
                        }
                        "pids" => {
                            if let Some(pids) = limits.pids {
                                write(&dir, "pids.max", pids);
                            }
                        }
                        "cpu" => {
                            if let Some(mhz) = limits.cpu_weight_mhz {
                                write(&dir, "cpu.shares", mhz.max(2));
                            }
                        }
                        _ => {}
                    }
                    dirs.push(dir);
                }
            }
            Self::V2(parent) => {
                let dir = parent.join(name);
                if std::fs::create_dir_all(&dir).is_ok() {
                    if let Some(bytes) = limits.memory_bytes {
                        write(&dir, "memory.max", bytes);
                        write(&dir, "memory.swap.max", 0);
                    }
                    if let Some(pids) = limits.pids {
                        write(&dir, "pids.max", pids);
                    }
                    if let Some(mhz) = limits.cpu_weight_mhz {
                        write(&dir, "cpu.weight", (mhz / 10).clamp(1, 10_000));
                    }
                    dirs.push(dir);
                }
            }
            Self::None => {}
        }
        RunnerCgroup { dirs }
    }
}

fn write(dir: &Path, file: &str, value: u64) {
    if let Err(e) = std::fs::write(dir.join(file), value.to_string()) {
        tracing::warn!(file = %dir.join(file).display(), error = %e, "could not set a cgroup limit");
    }
}

/// The cgroup directories of one runner.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunnerCgroup {
    dirs: Vec<PathBuf>,
}

impl RunnerCgroup {
    /// The runner's name (the groups' directory name).
    pub(crate) fn name(&self) -> String {
        self.dirs
            .first()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The `cgroup.procs` file of every group of the runner (a process that writes its pid
    /// there joins the group).
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Moves processes into every group of the runner (as root).
    pub(crate) fn place(&self, pids: &[u32]) -> std::io::Result<()> {
        for dir in &self.dirs {
            for pid in pids {
                std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
            }
        }
        Ok(())
    }

    /// Kills every process in the groups (repeatedly, until they are empty) and removes them.
    pub(crate) async fn kill_and_remove(&self) {
        for dir in &self.dirs {
            // cgroup v2 (Linux 5.14+) kills the whole group at once.
            let _ = tokio::fs::write(dir.join("cgroup.kill"), "1").await;
        }
        for attempt in 0..50 {
            let mut any = false;
            for dir in &self.dirs {
                if let Ok(text) = tokio::fs::read_to_string(dir.join("cgroup.procs")).await {
                    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        any = true;
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
            let mut all_removed = true;
            for dir in &self.dirs {
                if tokio::fs::remove_dir(dir).await.is_err() && dir.exists() {
                    all_removed = false;
                }
            }
            if all_removed {
                return;
            }
            if attempt > 0 || any {
                // Killed processes are gone within a millisecond or two: poll fast, then slower.
                let pause = std::time::Duration::from_micros(500 << attempt.min(5));
                tokio::time::sleep(pause).await;
            }
        }
        tracing::warn!(groups = ?self.dirs, "could not remove a runner's cgroups");
    }
}
