//! The local backend: environment persistence, starting and recovering runner sandboxes.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chown, Gid, Uid};
use poseidon_core::agent::{AgentRunner, Sandbox};
use poseidon_core::backend::{
    Backend, BackendError, BackendEvent, LostReason, RecoveredRunner, RunnerBackend,
};
use poseidon_core::{EnvironmentConfig, EnvironmentId, RunnerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::cgroup::{Hierarchy, Limits};
use crate::config::LocalConfig;
use crate::network::Network;
use crate::runner::LocalSandbox;
use crate::sandbox::{self, SandboxSpec, USER_UID};
use crate::state::RunnerState;
use crate::store::EnvironmentStore;
use crate::LocalError;

/// How long a new sandbox may take until its agent listens.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// State shared by the backend and its runners.
pub(crate) struct Shared {
    pub(crate) config: LocalConfig,
    pub(crate) uids: UidPool,
    pub(crate) network: Network,
    bwrap: PathBuf,
    /// `setpriv`, through which sandboxes start as their uid (see [`as_user`]), if it works here.
    setpriv: Option<PathBuf>,
    agent: PathBuf,
    /// What the agent's bash probe printed (plain commands may start without bash), if anything.
    bash_probe: Option<String>,
    hierarchy: Hierarchy,
    runners_dir: PathBuf,
    can_mount: AtomicBool,
    events: mpsc::Sender<BackendEvent>,
    /// Runners of a previous process, until their environment asks for them.
    leftovers: Mutex<Vec<(RunnerId, RunnerState)>>,
}

/// Runs runners as persistent bubblewrap sandboxes on this machine, each with an agent inside.
pub struct LocalBackend {
    shared: Arc<Shared>,
    store: EnvironmentStore,
    events: Mutex<Option<mpsc::Receiver<BackendEvent>>>,
}

impl LocalBackend {
    /// Prepares the state directory, takes stock of the runners a previous process left (to be
    /// recovered, or removed when their environment is gone) and checks that bubblewrap works.
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
        let agent = find_agent(&config)?;
        let setpriv = check_bubblewrap(&bwrap, config.uidbase).await?;
        close_inherited_descriptors_on_exec();
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
        let agent = install_agent(&agent, &state).map_err(io("copying the runner agent"))?;
        let bash_probe = probe_bash(&agent).await;
        let hierarchy = Hierarchy::detect(&config.cgroupparent);
        tracing::info!(limits = %hierarchy.describe(), "local backend resource limits");
        let network = Network::detect(&config);
        if network.available() {
            tracing::info!(network = %network.describe(), "local backend network");
        } else {
            tracing::warn!(network = %network.describe(), "local backend network");
        }
        let (events_tx, events_rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            config,
            uids: UidPool::default(),
            network,
            bwrap,
            setpriv,
            agent,
            bash_probe,
            hierarchy,
            runners_dir,
            can_mount: AtomicBool::new(true),
            events: events_tx,
            leftovers: Mutex::new(Vec::new()),
        });
        let known: HashSet<EnvironmentId> = store
            .load()
            .await
            .map_err(io("reading the environments"))?
            .into_iter()
            .map(|e| e.id)
            .collect();
        shared.take_stock(&known).await;
        Ok(Self {
            shared,
            store,
            events: Mutex::new(Some(events_rx)),
        })
    }

    /// Removes the parent cgroups if every runner is gone (after a shutdown that destroyed them).
    pub fn release(&self) {
        self.shared.hierarchy.remove_parents();
    }

    /// What the machine offers for resource limits, for logs and diagnostics.
    pub fn limits_description(&self) -> String {
        self.shared.hierarchy.describe()
    }
}

/// A command running `program` as host uid and gid `uid` without supplementary groups.
///
/// Through `setpriv` when given: the server then starts it with `posix_spawn` (a vfork), where
/// `Command::uid` makes the standard library fork the whole server. A fork write-protects every
/// page of the server, which then takes a page fault on each page it writes next (tens of
/// thousands a second under load, measured with `perf stat -e page-faults`), slowing the
/// requests of every runner for each sandbox the pool starts.
fn as_user(setpriv: Option<&Path>, uid: u32, program: &Path) -> tokio::process::Command {
    match setpriv {
        Some(setpriv) => {
            let argv = setpriv_argv(setpriv, uid, program);
            let mut command = tokio::process::Command::new(&argv[0]);
            command.args(&argv[1..]);
            command
        }
        None => {
            let mut command = tokio::process::Command::new(program);
            command.uid(uid).gid(uid);
            command
        }
    }
}

/// `setpriv … -- PROGRAM`: PROGRAM (its arguments follow) as host uid and gid `uid`, without
/// supplementary groups.
fn setpriv_argv(setpriv: &Path, uid: u32, program: &Path) -> Vec<std::ffi::OsString> {
    vec![
        setpriv.into(),
        format!("--reuid={uid}").into(),
        format!("--regid={uid}").into(),
        "--clear-groups".into(),
        "--".into(),
        program.into(),
    ]
}

/// Checks that bubblewrap can start a sandbox as an unprivileged uid, and returns `setpriv` if
/// it can start it that way (see [`as_user`]); without `setpriv` the server forks to switch uid.
async fn check_bubblewrap(bwrap: &Path, uid: u32) -> Result<Option<PathBuf>, LocalError> {
    check_launchers(bwrap, uid, find_program(Path::new("setpriv"))).await
}

/// [`check_bubblewrap`] with the `setpriv` to try first.
async fn check_launchers(
    bwrap: &Path,
    uid: u32,
    setpriv: Option<PathBuf>,
) -> Result<Option<PathBuf>, LocalError> {
    let launchers = match setpriv.as_deref() {
        Some(setpriv) => vec![Some(setpriv), None],
        None => vec![None],
    };
    let mut failures = Vec::new();
    for launcher in launchers {
        match test_sandbox(bwrap, uid, launcher).await {
            Ok(()) => {
                if let Some(failure) = failures.first() {
                    tracing::warn!(error = %failure,
                        "a test sandbox started through setpriv failed; the server forks to start sandboxes instead");
                }
                return Ok(launcher.map(Path::to_path_buf));
            }
            Err(failure) => failures.push(failure),
        }
    }
    Err(LocalError::Bubblewrap(format!(
        "a test sandbox failed (are user namespaces enabled?): {}",
        failures.join("; ")
    )))
}

/// Starts a sandbox running `/bin/true` as `uid` through `launcher` (see [`as_user`]).
async fn test_sandbox(bwrap: &Path, uid: u32, launcher: Option<&Path>) -> Result<(), String> {
    let output = as_user(launcher, uid, bwrap)
        .args(["--unshare-user", "--unshare-pid"])
        .args(crate::sandbox::host_system_binds())
        .args(["--", "/bin/true"])
        .env_clear()
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
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

/// The agent binary: `local.agent`, or `poseidon-agent` next to the server's own executable.
/// An error says where it was looked for (also for `poseidon config check`).
pub fn find_agent(config: &LocalConfig) -> Result<PathBuf, LocalError> {
    let configured = config.agent.as_ref().filter(|p| !p.as_os_str().is_empty());
    let candidate = match configured {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("poseidon-agent")))
            .unwrap_or_else(|| PathBuf::from("poseidon-agent")),
    };
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(LocalError::Agent(format!(
            "the runner agent {} was not found (build it with `cargo build -p poseidon-agent`, or set local.agent)",
            candidate.display()
        )))
    }
}

/// Copies the agent into the state directory, where every runner's uid can reach it (the build
/// or install directory may not be traversable for them). A new file each time, so that agents of
/// running sandboxes keep their own copy.
/// Asks the agent whether the host's bash lets plain commands start without it (see the agent's
/// `simple_command`); its answer goes to every sandbox that shows the host's system.
async fn probe_bash(agent: &Path) -> Option<String> {
    let output = tokio::process::Command::new(agent)
        .arg(poseidon_agent_protocol::PROBE_BASH_ARG)
        .env_clear()
        .env("PATH", sandbox::DEFAULT_PATH)
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    let answer = String::from_utf8(output.stdout).ok()?;
    let answer = answer.trim();
    let plain =
        output.status.success() && !answer.is_empty() && answer.bytes().all(|b| b.is_ascii_digit());
    if plain {
        tracing::info!("plain commands start without bash (the host's bash was probed)");
        Some(answer.to_string())
    } else {
        tracing::info!(
            stderr = %String::from_utf8_lossy(&output.stderr).trim(),
            "every command goes through bash (the host's bash probe did not confirm)"
        );
        None
    }
}

fn install_agent(agent: &Path, state: &Path) -> std::io::Result<PathBuf> {
    let dir = state.join("agent");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let target = dir.join("poseidon-agent");
    let tmp = dir.join(format!("poseidon-agent.{}", std::process::id()));
    std::fs::copy(agent, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &target)?;
    Ok(target)
}

/// Marks every descriptor this process inherited (beyond stdin, stdout, stderr) close-on-exec, so
/// that no sandbox inherits anything the server was started with.
fn close_inherited_descriptors_on_exec() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        if let Ok(flags) = fcntl(fd, FcntlArg::F_GETFD) {
            let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
            let _ = fcntl(fd, FcntlArg::F_SETFD(flags));
        }
    }
}

impl Shared {
    pub(crate) fn file_timeout(&self) -> Duration {
        Duration::from_secs(self.config.filetimeoutseconds.max(1))
    }

    /// Sorts what a previous process left: runners of known environments wait to be recovered,
    /// everything else is removed.
    async fn take_stock(self: &Arc<Self>, known: &HashSet<EnvironmentId>) {
        let mut keep = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.runners_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let state = RunnerState::load(&entry.path());
                match (Some(RunnerId::from_raw(name.clone())), state) {
                    (Some(id), Some(state)) if known.contains(&state.environment) => {
                        self.uids.claim(state.uids.0);
                        keep.push((id, state));
                    }
                    (Some(id), Some(state)) => {
                        tracing::info!(runner = %name, "removing a runner of a deleted environment");
                        let _ = self.adopt(id, state).destroy().await;
                    }
                    _ => {
                        tracing::info!(runner = %name, "removing a runner directory left by a previous process");
                        self.remove_runner_dir(&entry.path(), true).await;
                    }
                }
            }
        }
        let kept: HashSet<String> = keep.iter().map(|(id, _)| id.as_str().to_string()).collect();
        for group in self.hierarchy.existing_groups() {
            if !kept.contains(&group.name()) {
                group.kill_and_remove().await;
            }
        }
        *self.leftovers.lock().unwrap() = keep;
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

    fn create_runner_dir(
        &self,
        id: &RunnerId,
        uids: (u32, u32),
    ) -> std::io::Result<(PathBuf, bool)> {
        let dir = self.runners_dir.join(id.as_str());
        std::fs::create_dir(&dir)?;
        let mut mounted = false;
        if self.can_mount.load(Ordering::Relaxed) {
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
                    self.can_mount.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot mount a tmpfs per runner: runner disk use is NOT limited");
                }
            }
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        let root = (Some(Uid::from_raw(uids.0)), Some(Gid::from_raw(uids.0)));
        let user = (Some(Uid::from_raw(uids.1)), Some(Gid::from_raw(uids.1)));
        // The workspace belongs to `user` (so learners' programs may write it); /tmp and /dev/shm
        // are shared and sticky; the control directory (the agent's socket) is the runner root's alone.
        for (name, mode, owner) in [
            ("workspace", 0o755, user),
            ("tmp", 0o1777, root),
            ("shm", 0o1777, root),
            ("ctl", 0o700, root),
        ] {
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
        std::fs::write(etc.join("hosts"), sandbox::HOSTS)?;
        std::fs::write(etc.join("hostname"), format!("{}\n", sandbox::HOSTNAME))?;
        for file in ["passwd", "group", "hosts", "hostname"] {
            std::fs::set_permissions(etc.join(file), std::fs::Permissions::from_mode(0o644))?;
        }
        Ok((dir, mounted))
    }

    /// A sandbox object for a runner recorded in its directory (after a restart).
    pub(crate) fn adopt(self: &Arc<Self>, id: RunnerId, state: RunnerState) -> LocalSandbox {
        LocalSandbox {
            dir: self.runners_dir.join(id.as_str()),
            cgroup: self.hierarchy.group(id.as_str()),
            id,
            state: Mutex::new(state),
            shared: Arc::clone(self),
            destroyed: AtomicBool::new(false),
        }
    }

    /// Creates the runner's directory and cgroup and starts its sandbox with the agent inside.
    pub(crate) async fn start_sandbox(
        self: &Arc<Self>,
        config: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<LocalSandbox, BackendError> {
        // Checked before anything is created: a missing image must not cost a mount and cgroups.
        let rootfs = self.config.images.get(&config.image).cloned();
        if let Some(root) = &rootfs {
            if !root.join("bin").exists() && !root.join("usr").exists() {
                return Err(BackendError::Internal(format!(
                    "the root filesystem {} of image {} is missing or empty",
                    root.display(),
                    config.image
                )));
            }
        }
        let uids = self
            .uids
            .allocate(self.config.uidbase, self.config.uidcount)
            .ok_or_else(|| BackendError::Internal("no free host uids for another runner".into()))?;
        let memory_mb = match config.memory_limit {
            0 => self.config.defaultmemorylimitmb,
            mb => u64::from(mb),
        };
        let limits = Limits {
            memory_bytes: (memory_mb > 0).then(|| memory_mb * 1024 * 1024),
            pids: (self.config.pidslimit > 0).then_some(self.config.pidslimit),
            cpu_weight_mhz: (config.cpu_limit > 0).then(|| u64::from(config.cpu_limit)),
        };
        // Directory and cgroups on the blocking pool: cgroup file system operations can wait
        // for the kernel's other cgroup work, and a runtime worker must not wait with them.
        let (dir, mounted, cgroup) = {
            let shared = Arc::clone(self);
            let id = id.clone();
            tokio::task::spawn_blocking(move || {
                let (dir, mounted) = shared.create_runner_dir(&id, uids).inspect_err(|_| {
                    // Whatever of it was made (a mount, directories) goes again now, not at
                    // the next start (no descriptors left, a full disk).
                    let dir = shared.runners_dir.join(id.as_str());
                    let _ = umount2(&dir, MntFlags::MNT_DETACH);
                    let _ = std::fs::remove_dir_all(&dir);
                })?;
                Ok::<_, std::io::Error>((
                    dir,
                    mounted,
                    shared.hierarchy.create(id.as_str(), limits),
                ))
            })
            .await
            .map_err(BackendError::internal)?
            .map_err(|e| {
                self.uids.release(uids.0);
                BackendError::Internal(format!("could not create the runner directory: {e}"))
            })?
        };
        let sandbox = LocalSandbox {
            id: id.clone(),
            dir: dir.clone(),
            cgroup,
            state: Mutex::new(RunnerState {
                environment: config.id,
                uids,
                mounted,
                monitor_pid: 0,
                init_pid: 0,
                network_pid: None,
                ports: Vec::new(),
                claimed: None,
                owner: None,
            }),
            shared: Arc::clone(self),
            destroyed: AtomicBool::new(false),
        };
        if let Err(e) = self.launch(&sandbox, rootfs.as_deref(), config).await {
            let log = sandbox.startup_log().await;
            let _ = sandbox.destroy().await;
            return Err(BackendError::Internal(format!(
                "could not start the runner's sandbox: {e}{log}"
            )));
        }
        Ok(sandbox)
    }

    async fn launch(
        &self,
        sandbox: &LocalSandbox,
        rootfs: Option<&Path>,
        config: &EnvironmentConfig,
    ) -> Result<(), String> {
        let uids = sandbox.state.lock().unwrap().uids;
        let user_network = self.network.available();
        // Born in its cgroups (through the agent as launcher, then setpriv), the sandbox sees
        // its own limits under /sys/fs/cgroup as a container does; without setpriv it is placed
        // there after its start and shows none.
        let procs = sandbox.cgroup.procs_files();
        let born_in_cgroups = self.setpriv.is_some() && !procs.is_empty();
        let cgroups = if born_in_cgroups {
            self.hierarchy.sandbox_binds(&sandbox.cgroup)
        } else {
            Vec::new()
        };
        let spec = SandboxSpec {
            rootfs,
            runner_dir: &sandbox.dir,
            workdir: &self.config.workdir,
            agent: &self.agent,
            bash_probe: self.bash_probe.as_deref(),
            cgroups: &cgroups,
        };
        let log = std::fs::File::create(sandbox.dir.join("sandbox.log"))
            .map_err(|e| format!("creating the sandbox log: {e}"))?;
        let mut command = match self.setpriv.as_deref() {
            Some(setpriv) if born_in_cgroups => {
                let mut command = tokio::process::Command::new(&self.agent);
                command
                    .arg(poseidon_agent_protocol::EXEC_IN_CGROUPS_ARG)
                    .args(&procs)
                    .arg("--")
                    .args(setpriv_argv(setpriv, uids.0, &self.bwrap));
                command
            }
            _ => as_user(self.setpriv.as_deref(), uids.0, &self.bwrap),
        };
        let mut child = command
            .args(spec.bwrap_args())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir("/")
            .process_group(0)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting bubblewrap: {e}"))?;
        let monitor_pid = child.id().unwrap_or(0);
        sandbox.state.lock().unwrap().monitor_pid = monitor_pid;
        let mut block = child.stdin.take().ok_or("no pipe to bubblewrap")?;
        let mut info = child.stdout.take().ok_or("no pipe from bubblewrap")?;
        let init_pid = tokio::time::timeout(START_TIMEOUT, read_child_pid(&mut info))
            .await
            .map_err(|_| "bubblewrap did not report its sandbox in time".to_string())??;
        sandbox.state.lock().unwrap().init_pid = init_pid;
        // Placed by root before anything runs inside: every process of the runner inherits the
        // cgroup (an unprivileged process could not move itself on cgroup v2). Moving a process
        // between cgroups waits for an RCU grace period (~10 ms here), so it happens on the
        // blocking pool: on a runtime worker it held up the requests queued behind it, such as
        // the first execution on the runner whose claim started this one.
        let cgroup = sandbox.cgroup.clone();
        tokio::task::spawn_blocking(move || {
            if !born_in_cgroups {
                cgroup
                    .place(&[monitor_pid, init_pid])
                    .map_err(|e| format!("placing the sandbox in its cgroup: {e}"))?;
            }
            let map = format!("0 {} 1\n{USER_UID} {} 1\n", uids.0, uids.1);
            for file in ["uid_map", "gid_map"] {
                std::fs::write(format!("/proc/{init_pid}/{file}"), &map)
                    .map_err(|e| format!("writing the sandbox's {file}: {e}"))?;
            }
            Ok::<_, String>(())
        })
        .await
        .map_err(|e| format!("placing the sandbox: {e}"))??;
        block
            .write_all(b"1")
            .await
            .map_err(|e| format!("releasing the sandbox: {e}"))?;
        drop(block);
        drop(info);
        if config.network_access && user_network {
            let (pid, ports) = self
                .network
                .attach(init_pid, uids.0, &config.exposed_ports)
                .await
                .map_err(|e| format!("connecting the sandbox to the network: {e}"))?;
            let mut state = sandbox.state.lock().unwrap();
            state.network_pid = Some(pid);
            state.ports = ports;
        }
        let state = sandbox.state.lock().unwrap().clone();
        state
            .save(&sandbox.dir)
            .await
            .map_err(|e| format!("recording the runner: {e}"))?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let socket = sandbox.socket();
        let mut pause = Duration::from_micros(500);
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the sandbox ended at start ({status})"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("the agent did not listen in time".into());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        // The monitor is reaped here; the sandbox outlives it only if the server restarts.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }

    /// Reports the runner lost when its sandbox ends without being destroyed.
    pub(crate) fn supervise(self: &Arc<Self>, sandbox: Arc<LocalSandbox>) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let (init_pid, uid) = {
                let state = sandbox.state.lock().unwrap();
                (state.init_pid, state.uids.0)
            };
            let mut pause = Duration::from_millis(50);
            loop {
                if sandbox.is_destroyed() {
                    return;
                }
                if !crate::runner::owned_by(init_pid, uid) {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            tracing::warn!(runner = %sandbox.id, "the runner's sandbox ended");
            // What is left of it (the tmpfs with its files, its cgroups, the helpers outside)
            // is of no use any more: it goes now, not at the server's next start.
            let _ = poseidon_core::agent::Sandbox::destroy(&*sandbox).await;
            let _ = events
                .send(BackendEvent::RunnerLost {
                    runner: sandbox.id.clone(),
                    reason: LostReason::Other("the runner's sandbox ended".into()),
                })
                .await;
        });
    }
}

/// Reads bubblewrap's `--info-fd` JSON up to its end and returns the sandbox's pid.
async fn read_child_pid(info: &mut tokio::process::ChildStdout) -> Result<u32, String> {
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = info
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading bubblewrap's report: {e}"))?;
        if n == 0 {
            return Err("bubblewrap ended before reporting its sandbox".into());
        }
        text.extend_from_slice(&buf[..n]);
        if text.contains(&b'}') {
            break;
        }
    }
    let value: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("bubblewrap's report is not JSON: {e}"))?;
    value["child-pid"]
        .as_u64()
        .map(|p| p as u32)
        .ok_or_else(|| "bubblewrap's report has no child-pid".to_string())
}

#[async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn validate(&self, config: &EnvironmentConfig) -> Result<(), BackendError> {
        if !config.exposed_ports.is_empty() && !self.shared.network.available() {
            return Err(BackendError::Unsupported(
                "exposedPorts need a user-mode network on the local backend (apt-get install passt); use the nomad backend or send no exposedPorts".into(),
            ));
        }
        Ok(())
    }

    async fn store_environment(&self, config: &EnvironmentConfig) -> Result<(), BackendError> {
        if config.network_access && !self.shared.network.available() {
            tracing::warn!(
                environment = %config.id,
                network = %self.shared.network.describe(),
                "this environment's runners get no network although it asks for networkAccess"
            );
        }
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
        let sandbox = shared.start_sandbox(config, id).await?;
        let sandbox = Arc::new(sandbox);
        let channel: Arc<dyn Sandbox> = sandbox.clone();
        let client = match AgentRunner::connect(&channel).await {
            Ok(client) => client,
            Err(e) => {
                let log = sandbox.startup_log().await;
                let _ = sandbox.destroy().await;
                return Err(BackendError::Internal(format!(
                    "the runner's agent did not start: {e}{log}"
                )));
            }
        };
        shared.supervise(Arc::clone(&sandbox));
        Ok(Arc::new(AgentRunner::new(
            sandbox,
            Some(client),
            shared.file_timeout(),
        )))
    }

    async fn recover_runners(
        &self,
        config: &EnvironmentConfig,
    ) -> Result<Vec<RecoveredRunner>, BackendError> {
        let found: Vec<(RunnerId, RunnerState)> = {
            let mut left = self.shared.leftovers.lock().unwrap();
            let (mine, others): (Vec<_>, Vec<_>) = left
                .drain(..)
                .partition(|(_, s)| s.environment == config.id);
            *left = others;
            mine
        };
        let mut recovered = Vec::new();
        for (id, state) in found {
            let sandbox = Arc::new(self.shared.adopt(id.clone(), state.clone()));
            let channel: Arc<dyn Sandbox> = sandbox.clone();
            match AgentRunner::connect(&channel).await {
                Ok(client) => {
                    tracing::info!(runner = %id, claimed = state.claimed.is_some(), owner = ?state.owner, "recovered a runner");
                    self.shared.supervise(Arc::clone(&sandbox));
                    recovered.push(RecoveredRunner {
                        runner: Arc::new(AgentRunner::new(
                            sandbox,
                            Some(client),
                            self.shared.file_timeout(),
                        )),
                        claimed: state.claim(),
                    });
                }
                Err(e) => {
                    tracing::info!(runner = %id, error = %e, "removing a runner whose agent is gone");
                    let _ = sandbox.destroy().await;
                }
            }
        }
        Ok(recovered)
    }

    fn take_events(&self) -> Option<mpsc::Receiver<BackendEvent>> {
        self.events.lock().unwrap().take()
    }
}

/// Host uids given to runners, one per live runner.
#[derive(Default)]
pub(crate) struct UidPool {
    state: Mutex<(u32, HashSet<u32>)>,
}

impl UidPool {
    /// A free pair of consecutive host uids (the runner's root, then its `user`).
    pub(crate) fn allocate(&self, base: u32, count: u32) -> Option<(u32, u32)> {
        let slots = (count / 2).max(1);
        let mut state = self.state.lock().unwrap();
        for _ in 0..slots {
            let candidate = base + 2 * (state.0 % slots);
            state.0 = state.0.wrapping_add(1);
            if state.1.insert(candidate) {
                return Some((candidate, candidate + 1));
            }
        }
        None
    }

    /// Marks a pair as used (a runner recovered after a restart).
    pub(crate) fn claim(&self, first: u32) {
        self.state.lock().unwrap().1.insert(first);
    }

    /// Frees the pair starting at `uid`.
    pub(crate) fn release(&self, uid: u32) {
        self.state.lock().unwrap().1.remove(&uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `id` prints when started by [`as_user`] through `launcher`.
    async fn identity(launcher: Option<&Path>, uid: u32) -> String {
        let output = as_user(launcher, uid, Path::new("/usr/bin/id"))
            .env_clear()
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    // Needs root, as the server does (the tests run as root).
    #[tokio::test]
    async fn both_launchers_start_a_program_as_the_uid_without_other_groups() {
        let uid = 4_999_990;
        let expected = format!("uid={uid} gid={uid} groups={uid}\n");
        assert_eq!(identity(None, uid).await, expected);
        let setpriv = find_program(Path::new("setpriv")).expect("setpriv (util-linux)");
        assert_eq!(identity(Some(&setpriv), uid).await, expected);
    }

    // Needs root and bubblewrap, as the server does.
    #[tokio::test]
    async fn sandboxes_start_through_setpriv_where_it_works_and_without_it_otherwise() {
        let bwrap = find_program(Path::new("bwrap")).expect("bubblewrap");
        let uid = 4_999_990;
        let setpriv = find_program(Path::new("setpriv")).expect("setpriv (util-linux)");
        let chosen = check_launchers(&bwrap, uid, Some(setpriv.clone())).await;
        assert_eq!(chosen.unwrap(), Some(setpriv));
        // A launcher that fails its test sandbox is not used; the fork is.
        let broken = check_launchers(&bwrap, uid, Some(PathBuf::from("/bin/false"))).await;
        assert_eq!(broken.unwrap(), None);
        assert_eq!(check_launchers(&bwrap, uid, None).await.unwrap(), None);
    }
}
