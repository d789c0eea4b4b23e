//! Executions: a process per [`ExecSpec`], its output streamed as frames, its whole session killed
//! on request and when it ends.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use poseidon_agent_protocol::{Frame, FrameKind, Identity, Reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::orphans::{self, OwnChild};
use crate::pty::{self, PtyMaster};
use crate::session::{Input, Session};
use crate::simple_command;
use crate::spawn;
use crate::USER_ID;

/// How long output may keep coming after the session was killed (only a descriptor passed to a
/// process outside the session could hold it open).
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// What to run.
pub(crate) struct ExecSpec {
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: String,
    pub(crate) identity: Identity,
    pub(crate) tty: bool,
    /// Standard error goes to the terminal too.
    pub(crate) stderr_on_terminal: bool,
    /// The execution's processes are killed this long after the start.
    pub(crate) time_limit: Option<Duration>,
}

enum Stdin {
    Terminal(Arc<PtyMaster>),
    Pipe(Option<ChildStdin>),
}

/// Starts the execution of `stream` in the background.
/// The execution is registered before this returns, so input sent right after the request
/// reaches it.
pub(crate) fn start(session: Session, stream: u32, spec: ExecSpec) {
    let (input_tx, input_rx) = mpsc::unbounded_channel();
    let registered = session.add_execution(stream, input_tx);
    tokio::spawn(async move {
        if !registered {
            // The gateway sends an execution again when it cannot know whether the request
            // arrived before a connection broke: the one that did arrive goes on.
            return;
        }
        let code = match run(&session, stream, spec, input_rx).await {
            Ok(code) => Reply::Exited { code },
            Err(e) => Reply::Failed {
                message: format!("the process could not be started: {e}"),
                stderr: String::new(),
            },
        };
        session.remove_execution(stream);
        session.send(Frame::control(stream, &code)).await;
    });
}

async fn run(
    session: &Session,
    stream: u32,
    spec: ExecSpec,
    mut input: mpsc::UnboundedReceiver<Input>,
) -> std::io::Result<i32> {
    let (mut child, _own, stdin, mut readers, slave) = spawn(session, stream, &spec)?;
    let pid = child.id().unwrap_or(0);
    session
        .send_news(Frame::control(stream, &Reply::Started { pid }))
        .await;
    let mut stdin = stdin;
    let mut taken = 0u64;
    // Held even while no gateway follows the execution (a restart of the server).
    let time_limit = async {
        match spec.time_limit {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(time_limit);
    let mut expired = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = &mut time_limit, if !expired => {
                expired = true;
                kill_session(pid, 9);
            }
            next = input.recv() => match next {
                Some(Input::Bytes(bytes)) => {
                    let len = bytes.len();
                    write_input(&mut stdin, bytes).await;
                    // The gateway holds back what the program has not taken yet.
                    taken += len as u64;
                    let frame = Frame::control(stream, &Reply::InputTaken { total: taken });
                    session.send_news(frame).await;
                }
                Some(Input::Signal(signal)) => kill_session(pid, signal),
                // The session forgot the execution: nobody can reach it any more.
                None => kill_session(pid, 9),
            },
        }
    };
    // Whatever the program left running in its session ends with it, so its output ends too;
    // once no other execution runs, so does whatever any execution left outside its session
    // (which includes this session: the main process is gone, its children are the agent's).
    if session.others_running(stream) {
        kill_session(pid, 9);
    } else {
        orphans::end_leftovers();
    }
    drop(slave);
    for reader in readers.drain(..) {
        let abort = reader.abort_handle();
        if tokio::time::timeout(DRAIN_WAIT, reader).await.is_err() {
            abort.abort();
        }
    }
    Ok(status.map(|s| exit_code(&s)).unwrap_or(255))
}

type Spawned = (
    Child,
    OwnChild,
    Stdin,
    Vec<tokio::task::JoinHandle<()>>,
    Option<std::fs::File>,
);

fn spawn(session: &Session, stream: u32, spec: &ExecSpec) -> std::io::Result<Spawned> {
    let id = match spec.identity {
        Identity::Root => 0,
        Identity::User => USER_ID,
    };
    // Only when the backend enabled it for this runner's bash (see `simple_command`).
    let started = match simple_command::plan(&spec.argv, &spec.env, &spec.cwd, id) {
        // A program that cannot be started directly (a script without `#!`, say) is bash's.
        Some(direct) => start_process(
            &direct.program,
            &direct.argv[0],
            &direct.argv[1..],
            &direct.env,
            id,
            spec,
        )
        .or_else(|_| start_argv(id, spec)),
        None => start_argv(id, spec),
    };
    let (mut child, own, master, slave, own_stderr) = started?;
    let mut readers = Vec::new();
    if let Some(stderr) = own_stderr {
        readers.push(tokio::spawn(forward(
            session.clone(),
            stream,
            FrameKind::Stderr,
            stderr,
        )));
    }
    let stdin = match master {
        Some(master) => {
            readers.push(tokio::spawn(forward_terminal(
                session.clone(),
                stream,
                Arc::clone(&master),
            )));
            Stdin::Terminal(master)
        }
        None => {
            if let Some(stdout) = child.stdout.take() {
                readers.push(tokio::spawn(forward(
                    session.clone(),
                    stream,
                    FrameKind::Stdout,
                    stdout,
                )));
            }
            Stdin::Pipe(child.stdin.take())
        }
    };
    Ok((child, own, stdin, readers, slave))
}

type Started = (
    Child,
    OwnChild,
    Option<Arc<PtyMaster>>,
    Option<std::fs::File>,
    Option<tokio::net::unix::pipe::Receiver>,
);

/// Starts `spec.argv` as it is.
fn start_argv(id: u32, spec: &ExecSpec) -> std::io::Result<Started> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no program to run",
        ));
    };
    start_process(Path::new(program), program, args, &spec.env, id, spec)
}

/// Starts `program` as `id` in a session of its own, with a terminal or pipes as `spec` says.
fn start_process(
    program: &Path,
    arg0: &str,
    args: &[String],
    env: &[(String, String)],
    id: u32,
    spec: &ExecSpec,
) -> std::io::Result<Started> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg0(arg0)
        .args(args)
        .uid(id)
        .gid(id)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd);
    let (master, slave) = if spec.tty {
        let (master, slave) = pty::open()?;
        cmd.stdin(slave.try_clone()?).stdout(slave.try_clone()?);
        (Some(Arc::new(master)), Some(slave))
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        (None, None)
    };
    // Standard error: the terminal, or a pipe of the program's own.
    let own_stderr = match &slave {
        Some(slave) if spec.stderr_on_terminal => {
            cmd.stderr(slave.try_clone()?);
            None
        }
        _ => {
            let (reader, writer) = stderr_pipe(id)?;
            cmd.stderr(writer);
            Some(reader)
        }
    };
    spawn::in_new_session(&mut cmd, spec.tty);
    let (child, own) = orphans::spawn(&mut cmd)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{arg0}: {e}")))?;
    Ok((child, own, master, slave, own_stderr))
}

/// A pipe for standard error that belongs to the program's user, as a terminal does: a program
/// may open it again by name (`echo x > /dev/stderr`), which a pipe of the agent's (root, 0600)
/// refused to `user`.
fn stderr_pipe(uid: u32) -> std::io::Result<(tokio::net::unix::pipe::Receiver, Stdio)> {
    let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // An agent that may not give it away (not root) keeps it: the program can still write it.
    let _ = nix::unistd::fchown(
        std::os::fd::AsRawFd::as_raw_fd(&writer),
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    );
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(reader)?;
    Ok((reader, Stdio::from(writer)))
}

async fn write_input(stdin: &mut Stdin, bytes: Bytes) {
    match stdin {
        Stdin::Terminal(master) => {
            let _ = master.write_all(&bytes).await;
        }
        Stdin::Pipe(pipe) => {
            if bytes.is_empty() {
                *pipe = None;
            } else if let Some(p) = pipe.as_mut() {
                if p.write_all(&bytes).await.is_err() {
                    *pipe = None;
                }
            }
        }
    }
}

async fn forward(session: Session, stream: u32, kind: FrameKind, mut from: impl AsyncRead + Unpin) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let frame = Frame::data(kind, stream, Bytes::copy_from_slice(&buf[..n]));
                session.send(frame).await;
            }
        }
    }
}

async fn forward_terminal(session: Session, stream: u32, master: Arc<PtyMaster>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match master.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let frame =
                    Frame::data(FrameKind::Stdout, stream, Bytes::copy_from_slice(&buf[..n]));
                session.send(frame).await;
            }
        }
    }
}

/// The exit code as a shell reports it: the code, or 128 + the signal that killed the process.
fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Sends `signal` to every process of the session `sid` (the launched process made one).
pub(crate) fn kill_session(sid: u32, signal: i32) {
    let Ok(signal) = nix::sys::signal::Signal::try_from(signal) else {
        return;
    };
    if sid == 0 {
        return;
    }
    for pid in session_members(sid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

/// Processes whose session id is `sid`, from `/proc`.
fn session_members(sid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![sid];
    };
    let mut members = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if session_of(&stat) == Some(sid) {
            members.push(pid);
        }
    }
    members
}

/// The session id field of a `/proc/PID/stat` line (the command name may contain anything).
fn session_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // state ppid pgrp session
    rest.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_field_survives_odd_command_names() {
        let stat = "1234 (a) b (c)) S 1 1234 77 0 -1 4194560";
        assert_eq!(session_of(stat), Some(77));
        assert_eq!(session_of("garbage"), None);
    }
}
