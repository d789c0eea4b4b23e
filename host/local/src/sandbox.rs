//! The bubblewrap command line of one sandboxed process.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Sandbox uid of the unprivileged user (`user`), as in Poseidon's images.
pub(crate) const USER_UID: u32 = 1000;
/// The default `PATH` inside sandboxes.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Host directories a sandbox sees read-only when its image has no root filesystem of its own.
const HOST_SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// Everything that distinguishes one sandboxed process from another.
pub(crate) struct SandboxSpec<'a> {
    /// The image's root filesystem, or `None` for the host's system directories.
    pub(crate) rootfs: Option<&'a Path>,
    /// The runner's directory (holds `workspace/`, `tmp/`, `etc/`).
    pub(crate) runner_dir: &'a Path,
    /// Where the workspace appears inside.
    pub(crate) workdir: &'a str,
    /// Share the host's network.
    pub(crate) network: bool,
    /// Run as the sandbox's root.
    pub(crate) privileged: bool,
    /// Extra environment variables (after the defaults, before `CODEOCEAN=true`).
    pub(crate) environment: &'a [(String, String)],
    /// A terminal is attached: keep the session so it stays the controlling terminal.
    pub(crate) tty: bool,
}

impl SandboxSpec<'_> {
    /// Arguments for `bwrap`, up to and including `--`.
    pub(crate) fn bwrap_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::with_capacity(64);
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&[
            "--unshare-user",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--hostname",
            "runner",
        ]);
        if !self.network {
            push(&["--unshare-net"]);
        }
        if !self.tty {
            push(&["--new-session"]);
        }
        let uid = if self.privileged { 0 } else { USER_UID }.to_string();
        push(&["--uid", &uid, "--gid", &uid]);
        match self.rootfs {
            Some(root) => {
                a.push("--ro-bind".into());
                a.push(root.into());
                a.push("/".into());
            }
            None => a.extend(host_system_binds()),
        }
        let etc = self.runner_dir.join("etc");
        for file in ["passwd", "group"] {
            a.push("--ro-bind".into());
            a.push(etc.join(file).into());
            a.push(PathBuf::from("/etc").join(file).into());
        }
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&["--proc", "/proc", "--dev", "/dev"]);
        a.push("--bind".into());
        a.push(self.runner_dir.join("workspace").into());
        a.push(self.workdir.into());
        a.push("--bind".into());
        a.push(self.runner_dir.join("tmp").into());
        a.push("/tmp".into());
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        // bubblewrap builds `/` on a writable tmpfs; only the workspace and /tmp stay writable.
        push(&["--remount-ro", "/", "--chdir", self.workdir, "--clearenv"]);
        let mut setenv = |k: &str, v: &str| {
            a.push("--setenv".into());
            a.push(k.into());
            a.push(v.into());
        };
        setenv("PATH", DEFAULT_PATH);
        setenv("HOME", self.workdir);
        setenv("LANG", "C.UTF-8");
        for (k, v) in self.environment {
            setenv(k, v);
        }
        setenv("CODEOCEAN", "true");
        a.push("--".into());
        a
    }
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
