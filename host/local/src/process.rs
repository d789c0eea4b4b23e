//! Starting sandboxed processes: with a terminal for executions, with pipes for file operations.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use poseidon_core::backend::{ExecProcess, ProcessEvent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pty::{self, PtyMaster};

/// Joins the cgroups named before `--` (by writing its own pid), then becomes the command after it.
const JOIN_CGROUPS: &str =
    r#"while [ "$1" != "--" ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#;

/// How long output may keep coming after the process ended (only leaked descriptors could delay it).
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// Builds the command line `sh → (setsid --ctty) → bwrap … -- program`.
#[derive(Debug)]
pub(crate) struct Launcher {
    pub(crate) bwrap: PathBuf,
    pub(crate) setsid: PathBuf,
}

/// A sandboxed process to start.
pub(crate) struct Launch {
    /// Host uid the sandbox runs as.
    pub(crate) uid: u32,
    /// cgroup.procs files to join.
    pub(crate) cgroup_procs: Vec<PathBuf>,
    /// bubblewrap's arguments up to `--`.
    pub(crate) bwrap_args: Vec<OsString>,
    /// The program and its arguments.
    pub(crate) program: Vec<String>,
    /// Attach a terminal.
    pub(crate) tty: bool,
}

/// Output of a process run to completion with pipes.
pub(crate) struct Captured {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

impl Launcher {
    fn command(&self, launch: &Launch) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(JOIN_CGROUPS).arg("sh");
        cmd.args(&launch.cgroup_procs).arg("--");
        if launch.tty {
            cmd.arg(&self.setsid).arg("--ctty");
        }
        cmd.arg(&self.bwrap)
            .args(&launch.bwrap_args)
            .args(&launch.program);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir("/")
            .uid(launch.uid)
            .gid(launch.uid)
            .kill_on_drop(true);
        cmd
    }

    /// Starts an interactive process: stdin and stdout on a terminal, stderr on a pipe.
    pub(crate) fn spawn_interactive(&self, launch: &Launch) -> io::Result<ExecProcess> {
        let (master, slave) = pty::open()?;
        let mut cmd = self.command(launch);
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave))
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        drop(cmd); // closes our copies of the terminal's slave side
        let stderr = child.stderr.take();
        let master = Arc::new(master);
        let (events_tx, events_rx) = mpsc::channel(32);
        let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(32);
        let kill = CancellationToken::new();
        tokio::spawn(write_input(Arc::clone(&master), stdin_rx, kill.clone()));
        let stdout_task = tokio::spawn(read_terminal(master, events_tx.clone()));
        let err_tx = events_tx.clone();
        let stderr_task = tokio::spawn(async move {
            if let Some(stderr) = stderr {
                read_pipe(stderr, err_tx, true).await;
            }
        });
        tokio::spawn(supervise(
            child,
            kill.clone(),
            events_tx,
            vec![stdout_task, stderr_task],
        ));
        Ok(ExecProcess {
            stdin: stdin_tx,
            events: events_rx,
            kill,
        })
    }

    /// Runs a process with pipes to completion, feeding `input` to its stdin.
    pub(crate) async fn run_captured(
        &self,
        launch: &Launch,
        input: Vec<u8>,
        limit: Duration,
    ) -> io::Result<Captured> {
        let mut cmd = self.command(launch);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        drop(cmd);
        let mut stdin = child.stdin.take();
        let feed = async move {
            if let Some(stdin) = stdin.as_mut() {
                // A process that exits without reading its input is not an error here.
                let _ = stdin.write_all(&input).await;
                let _ = stdin.shutdown().await;
            }
            drop(stdin);
        };
        let run = async {
            let ((), output) = tokio::join!(feed, child.wait_with_output());
            output
        };
        match tokio::time::timeout(limit, run).await {
            Ok(output) => {
                let output = output?;
                Ok(Captured {
                    status: output.status,
                    stdout: output.stdout,
                    stderr: output.stderr,
                })
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the file operation took too long",
            )),
        }
    }

    /// Starts a process whose stdout the caller reads; stderr is discarded.
    pub(crate) fn spawn_reader(&self, launch: &Launch) -> io::Result<Child> {
        let mut cmd = self.command(launch);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        cmd.spawn()
    }
}

/// Marks every descriptor this process inherited (beyond stdin, stdout, stderr) close-on-exec, so
/// that no sandbox inherits anything the server was started with.
pub(crate) fn close_inherited_descriptors_on_exec() {
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

/// The exit code as a shell reports it: the code, or 128 + the signal that killed the process.
pub(crate) fn exit_code(status: &ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

async fn supervise(
    mut child: Child,
    kill: CancellationToken,
    events: mpsc::Sender<ProcessEvent>,
    readers: Vec<tokio::task::JoinHandle<()>>,
) {
    let status = tokio::select! {
        status = child.wait() => status,
        _ = kill.cancelled() => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    if kill.is_cancelled() {
        readers.iter().for_each(|r| r.abort());
    } else {
        for reader in readers {
            let abort = reader.abort_handle();
            if tokio::time::timeout(DRAIN_WAIT, reader).await.is_err() {
                abort.abort();
            }
        }
    }
    let event = match status {
        Ok(status) => ProcessEvent::Exited(exit_code(&status)),
        Err(e) => ProcessEvent::Failed(format!("waiting for the process failed: {e}")),
    };
    let _ = events.send(event).await;
}

async fn write_input(
    master: Arc<PtyMaster>,
    mut input: mpsc::Receiver<Bytes>,
    stop: CancellationToken,
) {
    loop {
        let chunk = tokio::select! {
            c = input.recv() => c,
            _ = stop.cancelled() => None,
        };
        let Some(chunk) = chunk else { return };
        let written = tokio::select! {
            r = master.write_all(&chunk) => r,
            _ = stop.cancelled() => return,
        };
        if written.is_err() {
            return;
        }
    }
}

async fn read_terminal(master: Arc<PtyMaster>, events: mpsc::Sender<ProcessEvent>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match master.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if events
                    .send(ProcessEvent::Stdout(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Reads a pipe to its end; with `crlf`, line ends become `\r\n` as a terminal would print them.
async fn read_pipe(
    mut pipe: impl AsyncRead + Unpin,
    events: mpsc::Sender<ProcessEvent>,
    crlf: bool,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let chunk = if crlf {
                    let mut out = Vec::with_capacity(n + n / 8);
                    for &b in &buf[..n] {
                        if b == b'\n' {
                            out.push(b'\r');
                        }
                        out.push(b);
                    }
                    Bytes::from(out)
                } else {
                    Bytes::copy_from_slice(&buf[..n])
                };
                if events.send(ProcessEvent::Stderr(chunk)).await.is_err() {
                    return;
                }
            }
        }
    }
}
