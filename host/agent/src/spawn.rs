//! Starting an execution's process: one `fork` + `exec` of the program itself, in a session of its
//! own, with the terminal (if any) as its controlling terminal, as the requested user.
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
    // operations are allowed. It only makes two system calls (setsid(2) through nix, which is a
    // plain syscall wrapper, and ioctl(2)), allocates nothing, takes no lock and touches no state
    // shared with other threads; its error is built from `errno` without allocating
    // (`io::Error::last_os_error`, `From<Errno>`).
    unsafe {
        command.as_std_mut().pre_exec(hook);
    }
}
