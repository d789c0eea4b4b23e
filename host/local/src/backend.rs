//! The local backend: environment persistence, runner creation and crash cleanup.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chown, Gid, Uid};
use poseidon_core::backend::{Backend, BackendError, RecoveredRunner, RunnerBackend};
use poseidon_core::{EnvironmentConfig, EnvironmentId, RunnerId};

use crate::cgroup::{Hierarchy, Limits};
use crate::config::LocalConfig;
use crate::process::Launcher;
use crate::runner::LocalRunner;
use crate::sandbox;
use crate::store::EnvironmentStore;
use crate::LocalError;

/// State shared by the backend and its runners.
pub(crate) struct Shared {
    pub(crate) config: LocalConfig,
    pub(crate) launcher: Launcher,
    pub(crate) uids: UidPool,
    hierarchy: Hierarchy,
    runners_dir: PathBuf,
    can_mount: AtomicBool,
}

/// Runs runners as bubblewrap sandboxes on this machine.
pub struct LocalBackend {
    shared: Arc<Shared>,
    store: EnvironmentStore,
}

impl LocalBackend {
    /// Prepares the state directory, removes what a previous process left behind and checks that
    /// bubblewrap works.
    pub async fn new(config: LocalConfig) -> Result<Self, LocalError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| LocalError::Io { what, source }
        };
        let bwrap = find_program(&config.bwrap).ok_or_else(|| {
            LocalError::Bubblewrap(format!(
                "`{}` was not found (apt-get install bubblewrap)",
                config.bwrap.display()
            ))
        })?;
        let setsid = find_program(Path::new("setsid"))
            .ok_or_else(|| LocalError::Bubblewrap("`setsid` (util-linux) was not found".into()))?;
        crate::process::close_inherited_descriptors_on_exec();
        let state = config.statedir.clone();
        std::fs::create_dir_all(&state).map_err(io("creating the state directory"))?;
        let runners_dir = state.join("runners");
        std::fs::create_dir_all(&runners_dir).map_err(io("creating the runners directory"))?;
        for dir in [&state, &runners_dir] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                .map_err(io("setting permissions of the state directory"))?;
        }
        let store = EnvironmentStore::open(state.join("environments"))
            .map_err(io("opening the environment store"))?;
        let hierarchy = Hierarchy::detect(&config.cgroupparent);
        tracing::info!(limits = %hierarchy.describe(), "local backend resource limits");
        let shared = Arc::new(Shared {
            config,
            launcher: Launcher { bwrap, setsid },
            uids: UidPool::default(),
            hierarchy,
            runners_dir,
            can_mount: AtomicBool::new(true),
        });
        shared.clean_leftovers().await;
        shared.check_bubblewrap().await?;
        Ok(Self { shared, store })
    }

    /// Removes the parent cgroups after every runner is gone (graceful shutdown).
    pub fn release(&self) {
        self.shared.hierarchy.remove_parents();
    }

    /// What the machine offers for resource limits, for logs and diagnostics.
    pub fn limits_description(&self) -> String {
        self.shared.hierarchy.describe()
    }
}

fn find_program(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

impl Shared {
    async fn clean_leftovers(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.runners_dir) {
            for entry in entries.flatten() {
                tracing::info!(runner = %entry.file_name().to_string_lossy(), "removing a runner left by a previous process");
                self.remove_runner_dir(&entry.path(), true).await;
            }
        }
        for group in self.hierarchy.existing_groups() {
            group.kill_and_remove().await;
        }
    }

    async fn check_bubblewrap(&self) -> Result<(), LocalError> {
        let output = tokio::process::Command::new(&self.launcher.bwrap)
            .args(["--unshare-user", "--unshare-pid"])
            .args(crate::sandbox::host_system_binds())
            .args(["--", "/bin/true"])
            .uid(self.config.uidbase)
            .gid(self.config.uidbase)
            .env_clear()
            .output()
            .await
            .map_err(|e| LocalError::Bubblewrap(e.to_string()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(LocalError::Bubblewrap(format!(
                "a test sandbox failed (are user namespaces enabled?): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }

    /// Unmounts (if mounted) and deletes a runner directory without following links.
    pub(crate) async fn remove_runner_dir(&self, dir: &Path, mounted: bool) {
        let dir = dir.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            if mounted {
                let _ = umount2(&dir, MntFlags::MNT_DETACH);
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove a runner directory");
                }
            }
        })
        .await;
    }

    fn create_runner_dir(&self, id: &RunnerId, uid: u32) -> std::io::Result<(PathBuf, bool)> {
        let dir = self.runners_dir.join(id.as_str());
        std::fs::create_dir(&dir)?;
        let mut mounted = false;
        if self.can_mount.load(std::sync::atomic::Ordering::Relaxed) {
            let options = format!("size={}m,mode=0711", self.config.workspacesizemb.max(1));
            match mount(
                Some("tmpfs"),
                &dir,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(options.as_str()),
            ) {
                Ok(()) => mounted = true,
                Err(e) => {
                    self.can_mount
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot mount a tmpfs per runner: runner disk use is NOT limited");
                }
            }
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)));
        for (name, mode) in [("workspace", 0o755), ("tmp", 0o1777)] {
            let sub = dir.join(name);
            std::fs::create_dir(&sub)?;
            std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(mode))?;
            chown(&sub, owner.0, owner.1).map_err(std::io::Error::from)?;
        }
        let etc = dir.join("etc");
        std::fs::create_dir(&etc)?;
        std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(etc.join("passwd"), sandbox::passwd(&self.config.workdir))?;
        std::fs::write(etc.join("group"), sandbox::group())?;
        for file in ["passwd", "group"] {
            std::fs::set_permissions(etc.join(file), std::fs::Permissions::from_mode(0o644))?;
        }
        Ok((dir, mounted))
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn validate(&self, config: &EnvironmentConfig) -> Result<(), BackendError> {
        if !config.exposed_ports.is_empty() {
            return Err(BackendError::Unsupported(
                "the local backend does not support exposedPorts: runners share the host's network namespace, so ports cannot be mapped; use the nomad backend or send no exposedPorts".into(),
            ));
        }
        Ok(())
    }

    async fn store_environment(&self, config: &EnvironmentConfig) -> Result<(), BackendError> {
        self.store
            .save(config)
            .await
            .map_err(|e| BackendError::Internal(format!("could not persist the environment: {e}")))
    }

    async fn remove_environment(&self, id: EnvironmentId) -> Result<(), BackendError> {
        self.store
            .remove(id)
            .await
            .map_err(|e| BackendError::Internal(format!("could not delete the environment: {e}")))
    }

    async fn load_environments(&self) -> Result<Vec<EnvironmentConfig>, BackendError> {
        self.store
            .load()
            .await
            .map_err(|e| BackendError::Internal(format!("could not read the environments: {e}")))
    }

    async fn create_runner(
        &self,
        config: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<Arc<dyn RunnerBackend>, BackendError> {
        let shared = Arc::clone(&self.shared);
        // Checked before anything is created: a missing image must not cost a mount and cgroups.
        let rootfs = shared.config.images.get(&config.image).cloned();
        if let Some(root) = &rootfs {
            if !root.join("bin").exists() && !root.join("usr").exists() {
                return Err(BackendError::Internal(format!(
                    "the root filesystem {} of image {} is missing or empty",
                    root.display(),
                    config.image
                )));
            }
        }
        let uid = shared
            .uids
            .allocate(shared.config.uidbase, shared.config.uidcount)
            .ok_or_else(|| BackendError::Internal("no free host uid for another runner".into()))?;
        let (dir, mounted) = {
            let shared = Arc::clone(&shared);
            let id = id.clone();
            tokio::task::spawn_blocking(move || shared.create_runner_dir(&id, uid))
                .await
                .map_err(BackendError::internal)?
                .map_err(|e| {
                    self.shared.uids.release(uid);
                    BackendError::Internal(format!("could not create the runner directory: {e}"))
                })?
        };
        let memory_mb = match config.memory_limit {
            0 => shared.config.defaultmemorylimitmb,
            mb => u64::from(mb),
        };
        let limits = Limits {
            memory_bytes: (memory_mb > 0).then(|| memory_mb * 1024 * 1024),
            pids: (shared.config.pidslimit > 0).then_some(shared.config.pidslimit),
            cpu_weight_mhz: (config.cpu_limit > 0).then(|| u64::from(config.cpu_limit)),
        };
        let cgroup = shared.hierarchy.create(id.as_str(), limits, uid);
        Ok(Arc::new(LocalRunner {
            id,
            dir,
            uid,
            cgroup,
            rootfs,
            network: config.network_access,
            mounted,
            shared,
            running: Mutex::new(Vec::new()),
            destroyed: AtomicBool::new(false),
        }))
    }

    async fn recover_runners(
        &self,
        _config: &EnvironmentConfig,
    ) -> Result<Vec<RecoveredRunner>, BackendError> {
        // Runners of a previous process were removed at start: their processes died with it.
        Ok(Vec::new())
    }
}

/// Host uids given to runners, one per live runner.
#[derive(Default)]
pub(crate) struct UidPool {
    state: Mutex<(u32, HashSet<u32>)>,
}

impl UidPool {
    pub(crate) fn allocate(&self, base: u32, count: u32) -> Option<u32> {
        let mut state = self.state.lock().unwrap();
        for _ in 0..count {
            let candidate = base + state.0 % count.max(1);
            state.0 = state.0.wrapping_add(1);
            if state.1.insert(candidate) {
                return Some(candidate);
            }
        }
        None
    }

    pub(crate) fn release(&self, uid: u32) {
        self.state.lock().unwrap().1.remove(&uid);
    }
}
