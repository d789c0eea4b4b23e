//! The launcher: the agent re-executes itself to start a process in a session of its own, with the
//! terminal as its controlling terminal, as the requested user. Doing this in a fresh process keeps
//! the agent free of code between `fork` and `exec`.

use std::os::unix::process::CommandExt;

/// The first argument that selects the launcher.
pub(crate) const LAUNCH_ARG: &str = "__launch";

/// `__launch TTY UID GID -- PROGRAM ARGS...` (TTY is `-` for none): becomes PROGRAM.
pub(crate) fn run(args: &[String]) -> i32 {
    let (Some(tty), Some(uid), Some(gid), Some("--")) = (
        args.first(),
        args.get(1).and_then(|u| u.parse::<u32>().ok()),
        args.get(2).and_then(|g| g.parse::<u32>().ok()),
        args.get(3).map(String::as_str),
    ) else {
        eprintln!("poseidon-agent: bad launch arguments");
        return 125;
    };
    let argv = &args[4..];
    if argv.is_empty() {
        eprintln!("poseidon-agent: nothing to launch");
        return 125;
    }
    if let Err(e) = nix::unistd::setsid() {
        eprintln!("poseidon-agent: setsid: {e}");
        return 125;
    }
    if tty != "-" {
        // A session leader without a terminal that opens one (without O_NOCTTY) makes it its
        // controlling terminal.
        let terminal = match std::fs::OpenOptions::new().read(true).write(true).open(tty) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("poseidon-agent: opening the terminal: {e}");
                return 125;
            }
        };
        use std::os::fd::AsRawFd;
        for target in [0, 1] {
            if let Err(e) = nix::unistd::dup2(terminal.as_raw_fd(), target) {
                eprintln!("poseidon-agent: dup2: {e}");
                return 125;
            }
        }
    }
    let error = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .uid(uid)
        .gid(gid)
        .exec();
    eprintln!("{}: {error}", argv[0]);
    if error.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}
