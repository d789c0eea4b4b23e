//! The bubblewrap command line of a runner's sandbox: started once, with the agent as its only
//! program, and alive as long as the runner.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Sandbox uid of the unprivileged user (`user`), as in Poseidon's images.
pub(crate) const USER_UID: u32 = 1000;
/// The host name inside every sandbox.
pub(crate) const HOSTNAME: &str = "runner";
/// `/etc/hosts` of a sandbox: the loopback names and its own name, as a container's has (so
/// that a program resolving its host name — Java's `InetAddress.getLocalHost()` — finds it).
pub(crate) const HOSTS: &str =
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\trunner\n";
/// The default `PATH` inside sandboxes.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the agent binary appears inside a sandbox.
pub(crate) const AGENT_PATH: &str = "/.poseidon/agent";
/// Where the runner's control directory (the agent's socket) appears inside a sandbox.
pub(crate) const CONTROL_DIR: &str = "/.poseidon/ctl";
/// The agent's socket inside a sandbox.
pub(crate) const AGENT_SOCKET: &str = "/.poseidon/ctl/agent.sock";

/// Capabilities the runner's root keeps inside its user namespace (Docker's default set): they
/// act on the runner's own files and processes only, never on the host's.
const ROOT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

/// Host directories a sandbox sees read-only when its image has no root filesystem of its own.
const HOST_SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// Everything that distinguishes one runner's sandbox from another's.
pub(crate) struct SandboxSpec<'a> {
    /// The image's root filesystem, or `None` for the host's system directories.
    pub(crate) rootfs: Option<&'a Path>,
    /// The runner's directory (holds `workspace/`, `tmp/`, `shm/`, `etc/`, `ctl/`).
    pub(crate) runner_dir: &'a Path,
    /// Where the workspace appears inside.
    pub(crate) workdir: &'a str,
    /// The agent binary on the host.
    pub(crate) agent: &'a Path,
    /// What `poseidon-agent --probe-bash` printed for the host's bash, if it allows plain
    /// commands to start without bash (used only when the sandbox shows the host's system).
    pub(crate) bash_probe: Option<&'a str>,
    /// The runner's cgroup directories on the host and where each appears inside, read-only
    /// (only for a sandbox born in them, whose cgroup namespace is rooted there).
    pub(crate) cgroups: &'a [(PathBuf, String)],
}

impl SandboxSpec<'_> {
    /// The complete bubblewrap arguments. The user namespace's id maps are written by the
    /// server while bubblewrap waits on its standard input (`--userns-block-fd 0`); it reports its
    /// child's pid on standard output (`--info-fd 1`).
    pub(crate) fn bwrap_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::with_capacity(96);
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&[
            "--unshare-user",
            "--unshare-ipc",
            "--unshare-pid",
            // The agent is the namespace's init: no signal from inside reaches it (a learner's
            // `kill -9 -1` as root), and every orphan becomes its child (see the agent's
            // `orphans`). bubblewrap's own init would be a process the agent cannot protect.
            "--as-pid-1",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            HOSTNAME,
            "--userns-block-fd",
            "0",
            "--info-fd",
            "1",
            "--new-session",
            "--uid",
            "0",
            "--gid",
            "0",
        ]);
        // Never the host's network: its loopback services (the gateway, databases) stay out of
        // reach; `networkAccess` goes through a user-mode network attached from outside.
        push(&["--unshare-net"]);
        for cap in ROOT_CAPABILITIES {
            push(&["--cap-add", cap]);
        }
        match self.rootfs {
            Some(root) => {
                a.push("--ro-bind".into());
                a.push(root.into());
                a.push("/".into());
            }
            None => a.extend(host_system_binds()),
        }
        let etc = self.runner_dir.join("etc");
        for file in ["passwd", "group", "hosts", "hostname"] {
            // Runners made before hosts and hostname existed, and systems without them (an
            // image's root or the host's /etc: read-only, no mount point can be made in it) go
            // without.
            let inside = PathBuf::from("/etc").join(file);
            let fits = self
                .rootfs
                .unwrap_or(Path::new("/"))
                .join("etc")
                .join(file)
                .is_file();
            if fits && (matches!(file, "passwd" | "group") || etc.join(file).is_file()) {
                a.push("--ro-bind".into());
                a.push(etc.join(file).into());
                a.push(inside.into());
            }
        }
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&["--proc", "/proc", "--dev", "/dev"]);
        if self.rootfs.is_none() && !self.cgroups.is_empty() {
            // Made by bubblewrap on its tmpfs root, with the server's umask otherwise.
            for dir in ["/sys", "/sys/fs", "/sys/fs/cgroup"] {
                a.extend(["--perms", "0755", "--dir", dir].map(OsString::from));
            }
        }
        for (host, inside) in self.cgroups {
            // An image without the mount point stays without (its root is read-only).
            let fits = self
                .rootfs
                .is_none_or(|root| root.join(inside.trim_start_matches('/')).is_dir());
            if fits {
                a.extend([
                    OsString::from("--ro-bind"),
                    host.into(),
                    OsString::from(inside),
                ]);
            }
        }
        let mut bind = |kind: &str, from: PathBuf, to: &str| {
            a.push(kind.into());
            a.push(from.into());
            a.push(to.into());
        };
        bind("--bind", self.runner_dir.join("workspace"), self.workdir);
        bind("--bind", self.runner_dir.join("tmp"), "/tmp");
        // POSIX shared memory and semaphores (Python's multiprocessing) live in /dev/shm, which
        // is world-writable on any Linux; here it counts against the runner's disk limit.
        bind("--bind", self.runner_dir.join("shm"), "/dev/shm");
        a.extend(["--perms", "0755", "--dir", "/.poseidon"].map(OsString::from));
        let mut bind = |kind: &str, from: PathBuf, to: &str| {
            a.push(kind.into());
            a.push(from.into());
            a.push(to.into());
        };
        bind("--ro-bind", self.agent.to_path_buf(), AGENT_PATH);
        bind("--bind", self.runner_dir.join("ctl"), CONTROL_DIR);
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        // bubblewrap builds `/` on a writable tmpfs; only the workspace and /tmp stay writable.
        push(&["--remount-ro", "/", "--chdir", self.workdir, "--clearenv"]);
        push(&["--setenv", "PATH", DEFAULT_PATH]);
        push(&["--", AGENT_PATH, "--listen", AGENT_SOCKET]);
        // The probe ran the host's bash: it speaks for a sandbox that shows the host's system.
        if let (None, Some(probe)) = (self.rootfs, self.bash_probe) {
            push(&[poseidon_agent_protocol::DIRECT_SIMPLE_COMMANDS_ARG, probe]);
        }
        a
    }
}

/// The environment every execution starts with (the request's variables and `CODEOCEAN` follow).
pub(crate) fn base_environment(workdir: &str) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), workdir.into()),
        ("LANG".into(), "C.UTF-8".into()),
    ]
}

/// bubblewrap arguments that show the host's system directories read-only (links stay links).
pub(crate) fn host_system_binds() -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    for dir in HOST_SYSTEM_DIRS {
        let path = Path::new(dir);
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(path) {
                    a.push("--symlink".into());
                    a.push(target.into());
                    a.push(path.into());
                }
            }
            Ok(m) if m.is_dir() => {
                a.push("--ro-bind".into());
                a.push(path.into());
                a.push(path.into());
            }
            _ => {}
        }
    }
    a
}

/// `/etc/passwd` of a sandbox: `root` and the unprivileged `user`.
pub(crate) fn passwd(workdir: &str) -> String {
    format!(
        "root:x:0:0:root:/root:/bin/bash\nuser:x:{USER_UID}:{USER_UID}:user:{workdir}:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
}

/// `/etc/group` of a sandbox.
pub(crate) fn group() -> String {
    format!("root:x:0:\nuser:x:{USER_UID}:\nnogroup:x:65534:\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_never_shares_the_hosts_network_and_has_a_writable_shm() {
        let spec = SandboxSpec {
            rootfs: None,
            runner_dir: Path::new("/state/runners/1-x"),
            workdir: "/workspace",
            agent: Path::new("/state/agent"),
            bash_probe: None,
            cgroups: &[],
        };
        let args: Vec<String> = spec
            .bwrap_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.iter().any(|a| a == "--unshare-net"), "{args:?}");
        let shm = args
            .windows(3)
            .any(|w| w[0] == "--bind" && w[1] == "/state/runners/1-x/shm" && w[2] == "/dev/shm");
        assert!(shm, "{args:?}");
        // The /dev/shm bind must come after the fresh /dev it lands in.
        let dev = args.iter().position(|a| a == "--dev").unwrap();
        let bound = args.iter().position(|a| a == "/dev/shm").unwrap();
        assert!(dev < bound);
    }
}
