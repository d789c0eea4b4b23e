//! Starting an execution's process: one `fork` + `exec` of the program itself, in a session of its
//! own, with the terminal (if any) as its controlling terminal, the first to go when the runner
//! runs out of memory, as the requested user.
//!
//! This is the agent's only `unsafe` code. The standard library sets the user, group, working
//! directory and standard streams safely; a new session and a controlling terminal have no safe
//! API, so they are done by a `pre_exec` hook (between `fork` and `exec`). An earlier version
//! re-executed the agent as a launcher to stay free of `unsafe`, at the cost of a second
//! `fork` + `exec` on every execution (about half of an execution's time inside the sandbox).
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;

/// Makes the process `command` starts a session leader (so that killing its session ends
/// everything it starts, and a terminal can become its controlling terminal); with `terminal`,
/// standard input (which the caller must set to the terminal's slave side) becomes its
/// controlling terminal, so that `^C` typed into it reaches the program as `SIGINT`.
pub(crate) fn in_new_session(command: &mut tokio::process::Command, terminal: bool) {
    let hook = move || -> std::io::Result<()> {
        nix::unistd::setsid()?;
        // Should the runner run out of memory, the kernel ends the learner's processes, not the
        // agent (which would take the runner with it); set before the program runs, so that
        // every process it starts inherits it. Raising it needs no privilege; a failure only
        // leaves the default.
        // SAFETY: prctl(2), open(2), write(2) and close(2) are async-signal-safe system calls;
        // the path and the bytes are static, nothing is allocated.
        unsafe {
            // The uid switch just made the process non-dumpable, which gives its /proc files
            // to root; exec makes it dumpable again anyway.
            nix::libc::prctl(nix::libc::PR_SET_DUMPABLE, 1);
            let fd = nix::libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                nix::libc::O_WRONLY | nix::libc::O_CLOEXEC,
            );
            if fd >= 0 {
                nix::libc::write(fd, b"1000".as_ptr().cast(), 4);
                nix::libc::close(fd);
            }
        }
        if terminal {
            // SAFETY: ioctl(2) on descriptor 0 with TIOCSCTTY takes an integer argument (0: do
            // not steal the terminal from another session); it touches no memory of ours.
            if unsafe { nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) } == -1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between `fork` and `exec`, where only async-signal-safe
    // operations are allowed. It only makes system calls (setsid(2) through nix, which is a
    // plain syscall wrapper, prctl/open/write/close(2) and ioctl(2)), allocates nothing, takes no lock and touches no state
    // shared with other threads; its error is built from `errno` without allocating
    // (`io::Error::last_os_error`, `From<Errno>`).
    unsafe {
        command.as_std_mut().pre_exec(hook);
    }
}
