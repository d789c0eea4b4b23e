//! The runner agent: a small program that lives inside a runner for as long as the runner lives and
//! does everything the gateway asks of the runner — start processes (with a terminal or pipes, as
//! root or as `user`), stream their output, kill them, write, delete, list and read files — over
//! one byte stream speaking `poseidon-agent-protocol`.
//!
//! ```text
//! poseidon-agent --listen PATH [--direct-simple-commands SHLVL]
//!                                serve on a Unix socket (one gateway connection at a time;
//!                                a new connection replaces the old, executions keep running);
//!                                with the flag, `bash -c` of one plain command starts the
//!                                program without bash (`simple_command`)
//! poseidon-agent --probe-bash    check what bash gives a program it execs; print the SHLVL
//!                                for `--direct-simple-commands`
//! poseidon-agent --stdio         serve on standard input and output
//! poseidon-agent --daemon PATH   serve on a Unix socket from a detached copy (in a container,
//!                                started by an exec session that ends); returns once it listens
//! poseidon-agent --connect PATH  carry standard input and output to the agent at PATH (the
//!                                gateway's long-lived exec session into a container)
//! poseidon-agent --exec-in-cgroups PROCS... -- PROGRAM ARGS...
//!                                join the cgroups, then become PROGRAM (the local backend's
//!                                sandbox launcher, on the host)
//! ```
//!
//! The agent runs as the runner's root inside the runner's namespaces; everything it touches is the
//! runner's own. It trusts nothing it receives: a malformed frame ends the connection, never the agent.
// `spawn` holds the agent's only `unsafe` (a `pre_exec` hook); everything else stays forbidden.
#![deny(unsafe_code)]

mod connection;
mod daemon;
mod environment;
mod exec;
mod files;
mod launch;
mod orphans;
mod pty;
mod session;
mod simple_command;
mod socket_path;
mod spawn;
mod users;

/// Uid and gid of the unprivileged `user` inside a runner.
pub const USER_ID: u32 = 1000;

/// How the agent starts copies of itself (file operations as `user`): through the
/// kernel's link to its own binary, which stays valid when the file was replaced on disk since
/// (a newer agent installed while this runner lives on).
pub(crate) const SELF_EXE: &str = "/proc/self/exe";

/// Runs the agent with these command-line arguments; returns the process's exit code.
pub fn main_with_args(args: Vec<String>) -> i32 {
    match args.get(1).map(String::as_str) {
        Some(files::AS_USER_ARG) => files::run_as_user(&args[2..]),
        Some("--listen") if args.len() == 3 => serve(Listen::Socket(args[2].clone())),
        Some("--listen")
            if args.len() == 5
                && args[3] == poseidon_agent_protocol::DIRECT_SIMPLE_COMMANDS_ARG =>
        {
            simple_command::enable(&args[4]);
            serve(Listen::Socket(args[2].clone()))
        }
        Some(poseidon_agent_protocol::PROBE_BASH_ARG) => simple_command::probe_bash(),
        Some(simple_command::ENV_PROBE_ARG) => simple_command::print_environment(),
        Some("--stdio") => serve(Listen::Stdio),
        Some("--daemon") if args.len() == 3 => daemon::start(&args[2]),
        Some(daemon::SERVE_ARG) if args.len() == 3 => {
            daemon::detach_session();
            serve(Listen::Daemon(args[2].clone()))
        }
        Some("--connect") if args.len() == 3 => daemon::bridge(&args[2]),
        Some(poseidon_agent_protocol::EXEC_IN_CGROUPS_ARG) => launch::exec_in_cgroups(&args[2..]),
        Some("--version") => {
            println!("poseidon-agent {}", env!("CARGO_PKG_VERSION"));
            0
        }
        _ => {
            eprintln!(
                "usage: poseidon-agent --listen SOCKET | --stdio | --daemon SOCKET | --connect SOCKET"
            );
            2
        }
    }
}

enum Listen {
    Socket(String),
    /// A socket, announcing on standard output once it listens.
    Daemon(String),
    Stdio,
}

fn serve(listen: Listen) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("poseidon-agent: cannot start: {e}");
            return 1;
        }
    };
    let result = runtime.block_on(async move {
        orphans::start_reaping();
        if let Listen::Socket(_) = listen {
            detach_standard_streams();
        }
        let session = session::Session::new();
        match listen {
            Listen::Socket(path) => connection::serve_socket(&path, session, || {}).await,
            Listen::Daemon(path) => {
                connection::serve_socket(&path, session, || {
                    daemon::announce_ready();
                    // Also standard error: an exec session (Nomad's raw_exec) ends only once
                    // every copy of its output descriptors is closed.
                    detach(&[0, 1, 2]);
                })
                .await
            }
            Listen::Stdio => {
                connection::serve_stream(tokio::io::stdin(), tokio::io::stdout(), session).await;
                Ok(())
            }
        }
    });
    // Blocking reads of standard input would keep a normal shutdown waiting forever.
    runtime.shutdown_background();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("poseidon-agent: {e}");
            1
        }
    }
}

/// Points standard input and output at `/dev/null`: a socket-serving agent has no use for what it
/// was started with (bubblewrap's set-up pipes), and must not keep them open.
fn detach_standard_streams() {
    detach(&[0, 1]);
}

/// Points the given standard descriptors at `/dev/null`.
fn detach(descriptors: &[i32]) {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for &fd in descriptors {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
}
