//! Running as a daemon inside a container, and the bridge that connects a byte stream to it.
//!
//! In a Nomad runner the agent is started through an exec session that ends right afterwards, so
//! the serving agent must not depend on it: `--daemon` starts a copy of itself in a session of its
//! own with no descriptor of the exec session, and returns once that copy listens. Every later
//! exec session runs `--connect`, which carries its standard input and output to the socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use poseidon_agent_protocol::BRIDGE_BANNER;

/// The first argument of the detached copy that serves.
pub(crate) const SERVE_ARG: &str = "__serve";
/// What the detached copy prints once it listens.
const READY: &str = "poseidon-agent ready";

/// `--daemon SOCKET`: starts the serving copy and waits until it listens; 0 when it does.
pub(crate) fn start(socket: &str) -> i32 {
    let child = Command::new(crate::SELF_EXE)
        .arg(SERVE_ARG)
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("poseidon-agent: cannot start the daemon: {e}");
            return 1;
        }
    };
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.trim() == READY {
        println!("{READY}");
        0
    } else {
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("poseidon-agent: the daemon did not start");
        1
    }
}

/// In the serving copy: leaves the exec session's process session and process group (so that
/// nothing done to them reaches the agent).
pub(crate) fn detach_session() {
    let _ = nix::unistd::setsid();
}

/// In the serving copy, once it listens: tells [`start`], then lets go of its standard streams.
pub(crate) fn announce_ready() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY}");
    let _ = out.flush();
}

/// `--connect SOCKET`: carries standard input to the agent's socket and its answers to standard
/// output until either side ends; 0 when the agent ended the connection, 1 when it is unreachable.
pub(crate) fn bridge(socket: &str) -> i32 {
    let stream = match crate::socket_path::short(socket, |p| UnixStream::connect(p)) {
        Ok(s) => s,
        Err(e) => {
            // On standard output: the other end reads the first line to tell success from failure.
            println!("poseidon-agent: cannot reach the agent at {socket}: {e}");
            return 1;
        }
    };
    let Ok(mut towards_agent) = stream.try_clone() else {
        return 1;
    };
    // Tells the other end of the exec session that the agent is there (before it, the session's
    // output can only be an error).
    {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{BRIDGE_BANNER}").is_err() || out.flush().is_err() {
            return 1;
        }
    }
    // Input ends (the exec session closed): the agent sees the connection end.
    std::thread::spawn(move || {
        let mut input = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if towards_agent.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = towards_agent.shutdown(std::net::Shutdown::Both);
        std::process::exit(0);
    });
    let mut from_agent = stream;
    let mut output = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from_agent.read(&mut buf) {
            Ok(0) | Err(_) => return 0,
            Ok(n) => {
                if output.write_all(&buf[..n]).is_err() || output.flush().is_err() {
                    return 0;
                }
            }
        }
    }
}
