//! `--exec-in-cgroups`: the local backend starts a runner's sandbox through this, on the host and
//! as root, so that the sandbox is born in its runner's cgroups. A cgroup namespace is rooted at
//! the cgroup its creator is in, so the sandbox's own (bubblewrap's `--unshare-cgroup-try`) then
//! shows the runner's cgroup as `/`, and the runner's limits under `/sys/fs/cgroup` (bound there
//! read-only), as a container does: runtimes that size themselves to the memory they may use
//! (the JVM's heap, .NET, Go's GOMEMLIMIT tools) find the runner's limit, not the host's memory.

use std::os::unix::process::CommandExt;

/// The soft limit of open files a sandbox starts with: what a login on a Linux machine gets.
const DEFAULT_OPEN_FILES: u64 = 1024;

/// `PROCS... -- PROGRAM ARGS...`: writes this process's pid into every `cgroup.procs` given, then
/// executes PROGRAM. Returns only on failure (exit code 127, with a message on stderr).
pub(crate) fn exec_in_cgroups(args: &[String]) -> i32 {
    let Some(split) = args.iter().position(|a| a == "--") else {
        eprintln!("poseidon-agent: --exec-in-cgroups PROCS... -- PROGRAM ARGS...");
        return 2;
    };
    let (procs, command) = (&args[..split], &args[split + 1..]);
    let Some((program, program_args)) = command.split_first() else {
        eprintln!("poseidon-agent: --exec-in-cgroups: no program");
        return 2;
    };
    // The server raised its own limit of open files; a learner's program gets the usual one.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((DEFAULT_OPEN_FILES, DEFAULT_OPEN_FILES));
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        DEFAULT_OPEN_FILES.min(hard),
        hard,
    );
    let me = std::process::id().to_string();
    for file in procs {
        if let Err(e) = std::fs::write(file, &me) {
            eprintln!("poseidon-agent: joining the cgroup {file}: {e}");
            return 127;
        }
    }
    let e = std::process::Command::new(program)
        .args(program_args)
        .exec();
    eprintln!("poseidon-agent: starting {program}: {e}");
    127
}
