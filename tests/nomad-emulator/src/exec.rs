//! Alloc exec WebSocket (`/v1/client/allocation/<id>/exec`, nomad-api.md §6): runs the argv as
//! a real process in the task directory, with a pseudo-terminal when `tty=true`.

use crate::http::{parse_bool, Query, St};
use crate::state::Shared;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{openpty, Winsize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Maximum payload bytes per output frame (raw_exec/exec use 4096).
const CHUNK: usize = 4096;

/// A session error delivered as a close frame.
struct Close {
    code: u16,
    reason: String,
}

impl Close {
    /// Close code for an underlying HTTP status: 500 → 1011, anything else → 1008.
    fn from_status(status: u16, reason: impl Into<String>) -> Self {
        Close {
            code: if status == 500 { 1011 } else { 1008 },
            reason: reason.into(),
        }
    }
}

/// The upgrade handler.
pub async fn handler(
    axum::extract::State(shared): St,
    Path(alloc_id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return crate::error::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "websocket connection not found in context",
        )
        .into_response();
    };
    let q = Query::parse(&raw);
    let header_token = headers
        .get("X-Nomad-Token")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| {
            headers
                .get("Authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(String::from)
        });
    ws.on_upgrade(move |socket| session(shared, alloc_id, q, header_token, socket))
}

struct Target {
    dir: PathBuf,
    env: BTreeMap<String, String>,
    cancel: CancellationToken,
    argv: Vec<String>,
    tty: bool,
}

fn resolve(shared: &Shared, alloc_id: &str, q: &Query) -> Result<Target, Close> {
    let task = q.get("task").unwrap_or("").to_string();
    let command = q.get("command").unwrap_or("");
    let tty = match q.get("tty") {
        None | Some("") => false,
        Some(v) => parse_bool(v).ok_or_else(|| {
            Close::from_status(
                500,
                format!(
                    "tty value is not a boolean: strconv.ParseBool: parsing {v:?}: invalid syntax"
                ),
            )
        })?,
    };
    if task.is_empty() {
        return Err(Close::from_status(400, "must provide task name"));
    }
    let argv: Vec<String> = if command.is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(command).map_err(|e| {
            Close::from_status(500, format!("failed to marshal command into json: {e}"))
        })?
    };
    if argv.is_empty() {
        return Err(Close::from_status(400, "command is not present"));
    }
    let inner = shared.lock();
    let alloc = inner
        .allocs
        .get(alloc_id)
        .ok_or_else(|| Close::from_status(404, format!("Unknown allocation \"{alloc_id}\"")))?;
    if alloc.client_terminal() {
        return Err(Close::from_status(
            400,
            format!(
                "exec not possible, client status of allocation {alloc_id} is {}",
                alloc.client_status
            ),
        ));
    }
    let known = crate::jobspec::group(&alloc.job, &alloc.task_group)
        .and_then(|g| g["Tasks"].as_array())
        .map(|ts| ts.iter().any(|t| t["Name"] == task.as_str()))
        .unwrap_or(false);
    if !known {
        return Err(Close::from_status(
            400,
            format!("unknown task name {task:?}"),
        ));
    }
    match alloc.task_states.get(&task) {
        Some(ts) if ts.state == "running" => {}
        Some(ts) if ts.state == "dead" => {
            return Err(Close::from_status(
                404,
                format!("task {task:?} is not running."),
            ))
        }
        _ => {
            return Err(Close::from_status(
                404,
                format!("task {task:?} not started yet."),
            ))
        }
    }
    let client = inner
        .clients
        .get(alloc_id)
        .ok_or_else(|| Close::from_status(404, format!("task {task:?} not started yet.")))?;
    Ok(Target {
        dir: client.dir.join(&task),
        env: client.env.get(&task).cloned().unwrap_or_default(),
        cancel: client.cancel.clone(),
        argv,
        tty,
    })
}

async fn close_with(mut socket: WebSocket, c: Close) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: c.code,
            reason: c.reason.into(),
        })))
        .await;
}

async fn session(
    shared: Arc<Shared>,
    alloc_id: String,
    q: Query,
    header_token: Option<String>,
    mut socket: WebSocket,
) {
    if q.flag("ws_handshake", false).unwrap_or(false) {
        let first = socket.recv().await;
        let Some(Ok(Message::Text(t))) = first else {
            return;
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
        let version = v["version"].as_i64().unwrap_or(0);
        if version != 1 {
            return close_with(
                socket,
                Close::from_status(400, format!("unexpected handshake value: {version}")),
            )
            .await;
        }
        let token = v["auth_token"].as_str().unwrap_or("");
        if let Some(h) = &header_token {
            if !token.is_empty() && h != token {
                return close_with(
                    socket,
                    Close::from_status(400, "handshake auth token mismatched auth header token"),
                )
                .await;
            }
        }
    }
    let target = match resolve(&shared, &alloc_id, &q) {
        Ok(t) => t,
        Err(c) => return close_with(socket, c).await,
    };
    let result = if target.tty {
        run_tty(&shared, target, socket).await
    } else {
        run_pipes(&shared, target, socket).await
    };
    if let Err(e) = result {
        tracing::debug!("exec session ended: {e}");
    }
}

fn frame(kind: &str, data: &[u8]) -> Message {
    Message::Text(
        json!({ kind: {"data": B64.encode(data)} })
            .to_string()
            .into(),
    )
}

fn close_frame(kind: &str) -> Message {
    Message::Text(json!({ kind: {"close": true} }).to_string().into())
}

fn exit_frame(code: i64) -> Message {
    let result = if code == 0 {
        json!({})
    } else {
        json!({"exit_code": code})
    };
    Message::Text(json!({"exited": true, "result": result}).to_string().into())
}

/// Client input decoded from a frame.
enum Input {
    Data(Vec<u8>),
    Close,
    Resize(u16, u16),
    Nothing,
}

fn decode_input(m: &Message) -> Option<Input> {
    let text = match m {
        Message::Text(t) => t.as_str().to_string(),
        Message::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        Message::Close(_) => return None,
        _ => return Some(Input::Nothing),
    };
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if let Some(stdin) = v.get("stdin") {
        if stdin["close"].as_bool() == Some(true) {
            return Some(Input::Close);
        }
        if let Some(d) = stdin["data"].as_str() {
            return Some(Input::Data(B64.decode(d).unwrap_or_default()));
        }
    }
    if let Some(sz) = v.get("tty_size") {
        let h = sz["height"].as_u64().unwrap_or(24) as u16;
        let w = sz["width"].as_u64().unwrap_or(80) as u16;
        return Some(Input::Resize(h, w));
    }
    Some(Input::Nothing)
}

fn exit_code(status: io::Result<std::process::ExitStatus>) -> i64 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => i64::from(c),
            (None, Some(sig)) => 128 + i64::from(sig),
            _ => -2,
        },
        Err(_) => -2,
    }
}

fn base_command(t: &Target, program: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(&t.dir)
        .envs(&t.env)
        .kill_on_drop(true);
    cmd
}

/// Forwards output as frames; once the client is gone, keeps reading and discards it, so that the
/// process never blocks on a full pipe (Nomad and Docker keep an exec'd process running, and its
/// output flowing, after the exec stream closed).
async fn pump<R: AsyncRead + Unpin>(mut r: R, kind: &'static str, out: mpsc::Sender<Message>) {
    let mut buf = vec![0u8; CHUNK];
    let mut connected = true;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if connected && out.send(frame(kind, &buf[..n])).await.is_err() {
                    connected = false;
                }
            }
        }
    }
}

/// What real Nomad does when an exec stream closes before the process ended: nothing to the
/// process. It runs on (stdin at EOF, output discarded) until it exits or its allocation stops.
/// `keep` (e.g. the terminal) stays open as long as the process runs.
fn detach<K: Send + 'static>(
    shared: &Arc<Shared>,
    mut child: tokio::process::Child,
    pgid: i32,
    cancel: CancellationToken,
    keep: K,
) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let _keep = keep;
        tokio::select! {
            _ = child.wait() => {}
            _ = cancel.cancelled() => {
                crate::client::kill_group(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait().await;
            }
        }
        shared.lock().pgids.remove(&pgid);
    });
}

async fn run_pipes(shared: &Arc<Shared>, t: Target, socket: WebSocket) -> io::Result<()> {
    let mut cmd = base_command(&t, &t.argv[0], &t.argv[1..]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut sink, mut stream) = socket.split();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            // Like a failed exec: message on stderr-less channel, exit code 127 / 126.
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let _ = sink
                .send(frame("stderr", format!("{e}\n").as_bytes()))
                .await;
            let _ = sink.send(close_frame("stdout")).await;
            let _ = sink.send(close_frame("stderr")).await;
            let _ = sink.send(exit_frame(code)).await;
            return Ok(());
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    shared.lock().pgids.insert(pgid);
    let (tx, mut rx) = mpsc::channel::<Message>(32);
    let mut out = tokio::spawn(pump(child.stdout.take().unwrap(), "stdout", tx.clone()));
    let mut err = tokio::spawn(pump(child.stderr.take().unwrap(), "stderr", tx));
    let mut stdin = child.stdin.take();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
        sink
    });
    let mut outage = shared.outage.subscribe();
    let mut killed = false;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            // Kill once: a cancelled token stays ready, and select! must not spin on it.
            _ = t.cancel.cancelled(), if !killed => { killed = true; crate::client::kill_group(pgid, nix::sys::signal::Signal::SIGKILL); }
            m = next_input(&mut stream, &mut outage) => match m {
                None => {
                    // Client went away (or the connection was cut): the process runs on, as on
                    // Nomad.
                    writer.abort();
                    drop(stdin);
                    if !killed {
                        detach(shared, child, pgid, t.cancel.clone(), ());
                    } else {
                        let _ = child.wait().await;
                        shared.lock().pgids.remove(&pgid);
                    }
                    return Ok(());
                }
                Some(Input::Data(d)) => {
                    if let Some(s) = stdin.as_mut() {
                        if s.write_all(&d).await.is_err() { stdin = None; }
                    }
                }
                Some(Input::Close) => { stdin = None; }
                Some(_) => {}
            }
        }
    };
    shared.lock().pgids.remove(&pgid);
    drop(stdin);
    // Drain what the process wrote; background children holding the pipes are not waited for.
    if tokio::time::timeout(Duration::from_millis(500), async {
        let _ = (&mut out).await;
        let _ = (&mut err).await;
    })
    .await
    .is_err()
    {
        out.abort();
        err.abort();
    }
    let mut sink = writer.await.map_err(io::Error::other)?;
    sink.send(close_frame("stdout"))
        .await
        .map_err(io::Error::other)?;
    sink.send(close_frame("stderr"))
        .await
        .map_err(io::Error::other)?;
    sink.send(exit_frame(exit_code(status)))
        .await
        .map_err(io::Error::other)?;
    // Nomad closes the TCP connection without a close frame: dropping the socket does that.
    Ok(())
}

/// The client's next input; `None` when it went away, or when an outage fault cuts the
/// connection (as Nomad going down does: the exec'd process is not told).
async fn next_input(
    stream: &mut futures::stream::SplitStream<WebSocket>,
    outage: &mut tokio::sync::watch::Receiver<u64>,
) -> Option<Input> {
    tokio::select! {
        m = stream.next() => m.and_then(|m| m.ok()).as_ref().and_then(decode_input),
        _ = outage.changed() => None,
    }
}

async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| {
            nix::unistd::read(inner.get_ref().as_raw_fd(), buf).map_err(io::Error::from)
        }) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn write_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

async fn run_tty(shared: &Arc<Shared>, t: Target, socket: WebSocket) -> io::Result<()> {
    let ws = Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(&ws, None).map_err(io::Error::from)?;
    let pts_path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))?;
    let mut args = vec!["--ctty".to_string(), "--wait".to_string()];
    args.extend(t.argv.iter().cloned());
    let mut cmd = base_command(&t, "setsid", &args);
    if !t.env.contains_key("TERM") {
        cmd.env("TERM", "xterm");
    }
    cmd.stdin(Stdio::from(pty.slave.try_clone()?))
        .stdout(Stdio::from(pty.slave.try_clone()?))
        .stderr(Stdio::from(pty.slave));
    let spawned = cmd.spawn();
    drop(cmd); // closes our copies of the slave so the master sees EIO at the end
    let (mut sink, mut stream) = socket.split();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = sink
                .send(frame("stdout", format!("{e}\r\n").as_bytes()))
                .await;
            let _ = sink.send(close_frame("stdout")).await;
            let _ = sink.send(exit_frame(126)).await;
            return Ok(());
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    shared.lock().pgids.insert(pgid);
    fcntl(pty.master.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    // `AsyncFd::new` is deprecated because a generic `T: AsRawFd` need not own its descriptor;
    // here `T` is an `OwnedFd` that the AsyncFd owns exclusively, so the safe constructor is
    // sound (the replacement `register` is `unsafe`, which this workspace forbids).
    #[allow(deprecated)]
    let master = Arc::new(AsyncFd::new(pty.master)?);
    let (tx, mut rx) = mpsc::channel::<Message>(32);
    let mut reader = {
        let master = master.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut connected = true;
            loop {
                match read_fd(&master, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        // After the client left, the output is drained and dropped.
                        if connected && tx.send(frame("stdout", &buf[..n])).await.is_err() {
                            connected = false;
                        }
                    }
                }
            }
        })
    };
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
        sink
    });
    let mut outage = shared.outage.subscribe();
    let mut killed = false;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            // Kill once: a cancelled token stays ready, and select! must not spin on it.
            _ = t.cancel.cancelled(), if !killed => { killed = true; crate::client::kill_group(pgid, nix::sys::signal::Signal::SIGKILL); }
            m = next_input(&mut stream, &mut outage) => match m {
                None => {
                    writer.abort();
                    // Client went away: the process keeps its terminal and runs on, as on Nomad
                    // (the reader goes on draining the terminal until the process ends).
                    detach(shared, child, pgid, t.cancel.clone(), master.clone());
                    return Ok(());
                }
                Some(Input::Data(d)) => { let _ = write_fd(&master, &d).await; }
                // With a terminal, end-of-input is the EOF character.
                Some(Input::Close) => { let _ = write_fd(&master, &[0x04]).await; }
                Some(Input::Resize(h, w)) => {
                    let _ = Command::new("stty")
                        .arg("-F").arg(&pts_path)
                        .args(["rows", &h.to_string(), "cols", &w.to_string()])
                        .stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null())
                        .status().await;
                }
                Some(Input::Nothing) => {}
            }
        }
    };
    shared.lock().pgids.remove(&pgid);
    if tokio::time::timeout(Duration::from_millis(500), &mut reader)
        .await
        .is_err()
    {
        reader.abort();
    }
    let mut sink = writer.await.map_err(io::Error::other)?;
    sink.send(close_frame("stdout"))
        .await
        .map_err(io::Error::other)?;
    sink.send(exit_frame(exit_code(status)))
        .await
        .map_err(io::Error::other)?;
    Ok(())
}
