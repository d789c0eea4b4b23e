//! Commands through Nomad's alloc exec WebSocket (nomad-api.md §6), the command wrapping of
//! poseidon-behavior.md §5.1–§5.2 and the stderr split through a FIFO.

use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use poseidon_core::backend::{ExecProcess, ExecRequest, ProcessEvent};
use poseidon_core::BackendError;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::api::NomadClient;
use crate::jobs::DEFAULT_TASK;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Interval of `{}` heartbeats towards Nomad (the Go client's value).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Ends the processes recorded in the pid files given as arguments (and the files; a file not
/// written yet is waited for up to 2 s, as the kill can overtake the start): the recorded
/// process, its process group and session (when it leads them) and all its descendants, from a
/// snapshot of `/proc` taken three times so that children forked meanwhile are caught too. Real
/// Nomad does not kill an exec'd process when its WebSocket closes (nor does Docker), so a time
/// limit or a client that went away needs this second, short exec session.
pub const KILL_SCRIPT: &str = r#"declare -A doomed=()
roots=()
for f in "$@"; do
  for ((i = 0; i < 100; i++)); do [ -e "$f" ] && break; sleep 0.02; done
  read -r p < "$f" 2>/dev/null && [[ $p =~ ^[0-9]+$ ]] && [ "$p" -gt 1 ] && roots+=("$p")
  rm -f -- "$f"
done
[ ${#roots[@]} -gt 0 ] || exit 0
for round in 1 2 3; do
  declare -A parent=()
  for d in /proc/[0-9]*; do
    s=$(< "$d/stat") 2>/dev/null || continue
    q=${d#/proc/}; s=${s##*) }
    read -r _ ppid pgrp sid _ <<< "$s"
    parent[$q]=$ppid
    for r in "${roots[@]}"; do
      if [ "$q" = "$r" ] || [ "$pgrp" = "$r" ] || [ "$sid" = "$r" ]; then doomed[$q]=1; fi
    done
  done
  changed=1
  while [ $changed = 1 ]; do
    changed=0
    for q in "${!parent[@]}"; do
      if [ -z "${doomed[$q]}" ] && [ -n "${doomed[${parent[$q]}]}" ]; then doomed[$q]=1; changed=1; fi
    done
  done
  unset 'doomed[$$]' 'doomed[1]'
  [ ${#doomed[@]} -gt 0 ] && kill -9 "${!doomed[@]}" 2>/dev/null
  unset parent
done
exit 0"#;

/// Where the wrapper of an execution records its process id inside the runner (root-owned, in
/// the sticky `/tmp`, so the learner's program cannot redirect a kill).
fn pid_file(execution: &str, role: &str) -> String {
    format!("/tmp/poseidon-{execution}.{role}.pid")
}

/// Wraps a shell script so that it records its process id in `pid_file` first and removes the
/// file when it ends; the exit status is the script's.
fn recorded(pid_file: &str, script: &str) -> String {
    let f = shell_quote(pid_file);
    format!("echo $$ > {f}; {script}\nc=$?; rm -f {f}; exit $c")
}

/// Like [`recorded`], for a session with a terminal: after the script, prints the end marker
/// `\x1e<marker> <status>\x1e` on the terminal and waits (up to 30 s) for a line of input, the
/// gateway's acknowledgement that all output arrived (see [`with_end_marker`] for why).
fn recorded_with_end(pid_file: &str, script: &str, marker: &str) -> String {
    let f = shell_quote(pid_file);
    format!(
        "echo $$ > {f}; {script}\nc=$?; rm -f {f}; printf '\\036%s %d\\036' {m} $c; stty -echo 2>/dev/null; read -r -t 30 _; exit $c",
        m = shell_quote(marker)
    )
}

/// Finds the end marker of [`recorded_with_end`] in a terminal's output: output before it is
/// passed on at once, except a tail that may be the start of the marker; after it, nothing is.
struct EndScanner {
    /// `\x1e<marker> `.
    prefix: Vec<u8>,
    pending: Vec<u8>,
    /// The status the marker carried, once seen.
    status: Option<i32>,
}

impl EndScanner {
    fn new(marker: &str) -> Self {
        let mut prefix = vec![0x1e];
        prefix.extend_from_slice(marker.as_bytes());
        prefix.push(b' ');
        EndScanner {
            prefix,
            pending: Vec::new(),
            status: None,
        }
    }

    /// Takes output; returns what can be passed on.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.status.is_some() {
            return Vec::new(); // e.g. the echo of the acknowledgement
        }
        self.pending.extend_from_slice(data);
        if let Some(pos) = self
            .pending
            .windows(self.prefix.len())
            .position(|w| w == self.prefix.as_slice())
        {
            let rest = &self.pending[pos + self.prefix.len()..];
            if let Some(end) = rest.iter().position(|b| *b == 0x1e) {
                self.status = Some(
                    std::str::from_utf8(&rest[..end])
                        .ok()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(-1),
                );
            }
            let out = self.pending[..pos].to_vec();
            self.pending.drain(..pos);
            if self.status.is_some() {
                self.pending.clear();
            }
            return out;
        }
        let len = self.pending.len();
        let keep = (1..self.prefix.len().min(len + 1))
            .rev()
            .find(|n| self.pending.ends_with(&self.prefix[..*n]))
            .unwrap_or(0);
        self.pending.drain(..len - keep).collect()
    }

    /// What was held back, when the session ended without a marker.
    fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

/// Quotes a string for a POSIX shell (single quotes; newlines and `$` survive unchanged).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What one exec session reported.
#[derive(Debug)]
pub enum Frame {
    /// stdout bytes.
    Stdout(Bytes),
    /// stderr bytes.
    Stderr(Bytes),
    /// Exit code (missing `exit_code` = 0).
    Exited(i32),
}

/// A failed session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The WebSocket could not be opened.
    #[error("{0}")]
    Connect(String),
    /// Nomad closed the session with a reason (e.g. `Unknown allocation "..."`).
    #[error("{0}")]
    Closed(String),
    /// The connection broke before the exit frame.
    #[error("the connection to Nomad was lost before the command ended")]
    Lost,
}

impl From<SessionError> for BackendError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Connect(m) => BackendError::Unreachable(m),
            SessionError::Closed(m) if m.contains("Unknown allocation") => {
                BackendError::NodeDown(m)
            }
            other => BackendError::Internal(other.to_string()),
        }
    }
}

/// Opens an exec session.
pub async fn connect(
    client: &NomadClient,
    alloc: &str,
    argv: &[String],
    tty: bool,
) -> Result<Ws, SessionError> {
    let command = serde_json::to_string(argv).unwrap_or_default();
    let mut url = reqwest::Url::parse(&format!(
        "{}/v1/client/allocation/{alloc}/exec",
        client.base()
    ))
    .map_err(|e| SessionError::Connect(e.to_string()))?;
    url.query_pairs_mut()
        .append_pair("task", DEFAULT_TASK)
        .append_pair("tty", if tty { "true" } else { "false" })
        .append_pair("command", &command)
        .append_pair("namespace", client.namespace());
    let ws_url = url.as_str().replacen("http", "ws", 1);
    let mut req = ws_url
        .into_client_request()
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    if !client.token().is_empty() {
        if let Ok(v) = client.token().parse() {
            req.headers_mut().insert("X-Nomad-Token", v);
        }
    }
    let connector = client.tls().map(tokio_tungstenite::Connector::Rustls);
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector)
        .await
        .map_err(|e| SessionError::Connect(format!("Nomad is unreachable: {e}")))?;
    Ok(ws)
}

fn parse_frame(text: &str) -> Option<Frame> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v["exited"] == true {
        return Some(Frame::Exited(
            v["result"]["exit_code"].as_i64().unwrap_or(0) as i32,
        ));
    }
    for (k, f) in [("stdout", true), ("stderr", false)] {
        if let Some(d) = v[k]["data"].as_str() {
            let data = Bytes::from(B64.decode(d).unwrap_or_default());
            return Some(if f {
                Frame::Stdout(data)
            } else {
                Frame::Stderr(data)
            });
        }
    }
    None
}

/// Drives one session: forwards `stdin` (EOF when the sender is dropped and `close_stdin`),
/// sends heartbeats, reports frames to `out`. Ends at the exit frame, on `kill`, or on error.
pub async fn drive(
    ws: Ws,
    mut stdin: mpsc::Receiver<Bytes>,
    close_stdin: bool,
    out: mpsc::Sender<Frame>,
    kill: CancellationToken,
) -> Result<Option<i32>, SessionError> {
    let (mut sink, mut stream) = ws.split();
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    let mut stdin_open = true;
    loop {
        tokio::select! {
            _ = kill.cancelled() => {
                let _ = sink.close().await;
                return Ok(None);
            }
            _ = heartbeat.tick() => {
                if sink.send(Message::Text("{}".into())).await.is_err() { return Err(SessionError::Lost); }
            }
            data = stdin.recv(), if stdin_open => match data {
                Some(d) => {
                    let m = json!({"stdin": {"data": B64.encode(&d)}}).to_string();
                    if sink.send(Message::Text(m.into())).await.is_err() { return Err(SessionError::Lost); }
                }
                None => {
                    stdin_open = false;
                    if close_stdin {
                        let m = json!({"stdin": {"close": true}}).to_string();
                        if sink.send(Message::Text(m.into())).await.is_err() { return Err(SessionError::Lost); }
                    }
                }
            },
            m = stream.next() => match m {
                Some(Ok(Message::Text(t))) => match parse_frame(t.as_str()) {
                    Some(Frame::Exited(code)) => return Ok(Some(code)),
                    Some(f) => { let _ = out.send(f).await; }
                    None => {}
                },
                Some(Ok(Message::Close(Some(f)))) if !f.reason.is_empty() => {
                    return Err(SessionError::Closed(f.reason.to_string()))
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Err(SessionError::Lost),
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Runs a non-interactive command and collects its output.
pub async fn run_captured(
    client: &NomadClient,
    alloc: &str,
    argv: Vec<String>,
    input: Bytes,
    timeout: Duration,
) -> Result<(Vec<u8>, Vec<u8>, i32), BackendError> {
    let ws = connect(client, alloc, &argv, false).await?;
    let (in_tx, in_rx) = mpsc::channel(4);
    let (out_tx, mut out_rx) = mpsc::channel(64);
    let kill = CancellationToken::new();
    let session = tokio::spawn(drive(ws, in_rx, true, out_tx, kill.clone()));
    tokio::spawn(async move {
        let mut rest = input;
        while !rest.is_empty() {
            let chunk = rest.split_to(rest.len().min(64 * 1024));
            if in_tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let collect = async {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        while let Some(f) = out_rx.recv().await {
            match f {
                Frame::Stdout(d) => o.extend_from_slice(&d),
                Frame::Stderr(d) => e.extend_from_slice(&d),
                Frame::Exited(_) => {}
            }
        }
        (o, e)
    };
    match tokio::time::timeout(timeout, collect).await {
        Ok((o, e)) => {
            let code = session.await.map_err(BackendError::internal)??;
            Ok((o, e, code.unwrap_or(-1)))
        }
        Err(_) => {
            kill.cancel();
            Err(BackendError::Internal(
                "the file operation timed out".into(),
            ))
        }
    }
}

/// Nomad's Docker driver ends an exec session as soon as Docker reports the process gone (it polls
/// every 100 ms) and closes the attach stream then, so the last output of a short command can be
/// lost, or arrive after the exit frame (seen under load: `cat` of a file just copied answered
/// nothing). A script run with [`run_until_end_marker`] therefore prints an end marker with its exit
/// status after its output and waits for stdin to close before it exits: once the marker arrived,
/// all output before it has.
pub fn with_end_marker(script: &str, marker: &str) -> String {
    format!(
        "( {script}\n) </dev/null; c=$?; printf '\\n%s %d\\n' {m} $c; read -r -t 30 _; exit $c",
        m = shell_quote(marker)
    )
}

/// Finds `\n<marker> <code>\n` at the end of `out`; returns the output before it and the code.
fn split_end_marker<'a>(out: &'a [u8], marker: &str) -> Option<(&'a [u8], i32)> {
    if !out.ends_with(b"\n") {
        return None;
    }
    let body = &out[..out.len() - 1];
    let line_start = body.iter().rposition(|b| *b == b'\n')?;
    let line = std::str::from_utf8(&body[line_start + 1..]).ok()?;
    let code = line.strip_prefix(marker)?.strip_prefix(' ')?.parse().ok()?;
    Some((&out[..line_start], code))
}

/// Runs `argv`, whose script was wrapped with [`with_end_marker`] (the caller passes the same
/// `marker`), without input; returns stdout before the marker, stderr and the script's status.
pub async fn run_until_end_marker(
    client: &NomadClient,
    alloc: &str,
    argv: Vec<String>,
    marker: &str,
    timeout: Duration,
) -> Result<(Vec<u8>, Vec<u8>, i32), BackendError> {
    let ws = connect(client, alloc, &argv, false).await?;
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(1);
    let (out_tx, mut out_rx) = mpsc::channel(64);
    let kill = CancellationToken::new();
    let session = tokio::spawn(drive(ws, in_rx, true, out_tx, kill.clone()));
    let collect = async {
        let mut in_tx = Some(in_tx);
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let mut marked = None;
        while let Some(f) = out_rx.recv().await {
            match f {
                Frame::Stdout(d) => o.extend_from_slice(&d),
                Frame::Stderr(d) => e.extend_from_slice(&d),
                Frame::Exited(_) => {}
            }
            if marked.is_none() {
                if let Some((body, code)) = split_end_marker(&o, marker) {
                    marked = Some((body.len(), code));
                    in_tx = None; // closing stdin lets the script exit
                }
            }
        }
        drop(in_tx);
        (o, e, marked)
    };
    let (mut o, e, marked) = match tokio::time::timeout(timeout, collect).await {
        Ok(r) => r,
        Err(_) => {
            kill.cancel();
            return Err(BackendError::Internal(
                "the file operation timed out".into(),
            ));
        }
    };
    let ended = session.await.map_err(BackendError::internal)?;
    match marked {
        Some((len, code)) => {
            o.truncate(len);
            Ok((o, e, code))
        }
        // Without the marker the output may be incomplete: an error, never a silent truncation.
        None => match ended {
            Err(e) => Err(e.into()),
            Ok(code) => Err(BackendError::Internal(format!(
                "the command in the runner ended (status {}) before its output was complete",
                code.unwrap_or(-1)
            ))),
        },
    }
}

/// The shell command of an execution request (poseidon-behavior.md §5.1): `env CODEOCEAN=true`
/// and the variables, the command under `bash -c`, optionally run as the unprivileged user.
pub fn full_command(req: &ExecRequest, unprivileged_prefix: &str) -> String {
    let mut s = String::from("env CODEOCEAN=true");
    for (k, v) in &req.environment {
        if k != "CODEOCEAN" {
            s.push(' ');
            s.push_str(&shell_quote(&format!("{k}={v}")));
        }
    }
    s.push_str(" /bin/bash -c ");
    s.push_str(&shell_quote(&req.command));
    if !req.privileged && !unprivileged_prefix.is_empty() {
        s = format!("{unprivileged_prefix} {s}");
    }
    s
}

/// Ends an execution's processes through a short root exec session running [`KILL_SCRIPT`].
async fn kill_remote(client: &NomadClient, alloc: &str, pid_files: &[String]) {
    let mut argv = vec![
        "/bin/bash".to_string(),
        "-c".to_string(),
        KILL_SCRIPT.to_string(),
        "bash".to_string(),
    ];
    argv.extend(pid_files.iter().cloned());
    match run_captured(client, alloc, argv, Bytes::new(), KILL_WAIT).await {
        Ok((_, _, 0)) => tracing::debug!(alloc, "killed an execution's processes"),
        Ok((_, err, code)) => tracing::warn!(
            alloc,
            code,
            stderr = %String::from_utf8_lossy(&err),
            "the kill session of an execution failed"
        ),
        Err(e) => tracing::warn!(alloc, error = %e, "could not kill an execution's processes"),
    }
}

/// How long an exit by a signal (status > 128) waits for Nomad to tell whether the runner's
/// container died with it (`docker kill`, a restart): Poseidon holds such exits for 1 s too.
const SANDBOX_DEATH_WAIT: Duration = Duration::from_millis(1500);

/// Nanoseconds since the Unix epoch (Nomad's task event times).
fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Whether the runner's task ended or restarted since `since_ns` (then the exit by a signal was
/// the container's death, not the program's own): Nomad's reason, if so.
async fn sandbox_death(client: &NomadClient, alloc: &str, since_ns: i64) -> Option<String> {
    let deadline = tokio::time::Instant::now() + SANDBOX_DEATH_WAIT;
    loop {
        if let Ok(a) = client.allocation(alloc).await {
            let state = &a["TaskStates"][DEFAULT_TASK];
            let died = state["Events"].as_array().into_iter().flatten().any(|e| {
                e["Time"].as_i64().unwrap_or(0) >= since_ns
                    && matches!(
                        e["Type"].as_str(),
                        Some("Terminated" | "Killing" | "Restarting" | "Not Restarting")
                    )
            });
            if died || a["ClientStatus"] != "running" {
                return Some(
                    crate::reasons::allocation_failure(&a)
                        .unwrap_or_else(|| "the runner's task stopped".into()),
                );
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The final event of an execution that exited with `code`: an exit by a signal because the
/// runner's container died is a failure of the runner, not the program's exit code.
async fn final_event(client: &NomadClient, alloc: &str, since_ns: i64, code: i32) -> ProcessEvent {
    if code > 128 {
        if let Some(why) = sandbox_death(client, alloc, since_ns).await {
            return ProcessEvent::Failed(format!("the runner's container ended: {why}"));
        }
    }
    ProcessEvent::Exited(code)
}

/// Longest a kill session may take.
const KILL_WAIT: Duration = Duration::from_secs(15);

/// Kills the execution's processes in the runner when `kill` is cancelled before the execution
/// ended on its own (`finished`): a time limit, a client that went away, a broken session.
fn kill_when_cancelled(
    client: NomadClient,
    alloc: String,
    pid_files: Vec<String>,
    kill: CancellationToken,
    finished: Arc<AtomicBool>,
) {
    tokio::spawn(async move {
        kill.cancelled().await;
        if !finished.load(Ordering::SeqCst) {
            kill_remote(&client, &alloc, &pid_files).await;
        }
    });
}

/// Starts an execution. With a terminal, stderr is split off through a FIFO read by a second
/// session, as Poseidon does (§5.2); the exit code is the user command's. The command runs under a
/// wrapper that records its process id, so that cancelling `kill` ends it in the runner too.
pub async fn start(
    client: NomadClient,
    alloc: String,
    req: &ExecRequest,
    unprivileged_prefix: &str,
    interactive_stderr: bool,
) -> Result<ExecProcess, BackendError> {
    let command = full_command(req, unprivileged_prefix);
    let execution = uuid::Uuid::new_v4().simple().to_string();
    let started_ns = now_ns();
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(64);
    let (ev_tx, ev_rx) = mpsc::channel::<ProcessEvent>(256);
    let kill = CancellationToken::new();
    let finished = Arc::new(AtomicBool::new(false));
    if !req.tty {
        let main_pid = pid_file(&execution, "main");
        let argv = vec![
            "/bin/bash".into(),
            "-c".into(),
            recorded(&main_pid, &format!("unset ${{!NOMAD_@}}; {command}")),
        ];
        let ws = connect(&client, &alloc, &argv, false).await?;
        kill_when_cancelled(
            client.clone(),
            alloc.clone(),
            vec![main_pid],
            kill.clone(),
            finished.clone(),
        );
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let session = tokio::spawn(drive(ws, stdin_rx, true, out_tx, kill.clone()));
        let k = kill.clone();
        tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                let ev = match f {
                    Frame::Stdout(d) => ProcessEvent::Stdout(d),
                    Frame::Stderr(d) => ProcessEvent::Stderr(d),
                    Frame::Exited(_) => continue,
                };
                if ev_tx.send(ev).await.is_err() {
                    k.cancel();
                }
            }
            let last = match session.await {
                Ok(Ok(Some(code))) => {
                    finished.store(true, Ordering::SeqCst);
                    final_event(&client, &alloc, started_ns, code).await
                }
                Ok(Ok(None)) => ProcessEvent::Failed("the execution was killed".into()),
                Ok(Err(e)) => ProcessEvent::Failed(e.to_string()),
                Err(e) => ProcessEvent::Failed(e.to_string()),
            };
            let _ = ev_tx.send(last).await;
        });
        return Ok(ExecProcess {
            stdin: stdin_tx,
            events: ev_rx,
            kill,
        });
    }
    let fifo = format!("/tmp/poseidon-stderr-{execution}.fifo");
    let (main_pid, helper_pid) = (pid_file(&execution, "main"), pid_file(&execution, "stderr"));
    let marker = format!("poseidon-end-{execution}");
    let helper_cmd = recorded_with_end(
        &helper_pid,
        &format!(
            "mkfifo {f} && chmod 666 {f} && cat {f}; rm -f {f}",
            f = shell_quote(&fifo)
        ),
        &marker,
    );
    let main_script = if interactive_stderr {
        format!(
            "unset ${{!NOMAD_@}}; i=0; until [ -e {f} ] || [ $i -ge 1000 ]; do sleep 0.01; i=$((i+1)); done; {command} 2> {f}",
            f = shell_quote(&fifo)
        )
    } else {
        // `server.interactivestderr: false`: one session; stderr shares the terminal with stdout.
        format!("unset ${{!NOMAD_@}}; {command}")
    };
    let main_cmd = recorded_with_end(&main_pid, &main_script, &marker);
    let helper_argv = vec!["/bin/bash".into(), "-c".into(), helper_cmd];
    let main_argv = vec!["/bin/bash".into(), "-c".into(), main_cmd];
    // Like Poseidon, the helper has a terminal too, so stderr line ends are `\r\n` as on stdout.
    let helper = match interactive_stderr {
        true => Some(connect(&client, &alloc, &helper_argv, true).await?),
        false => None,
    };
    let main = match connect(&client, &alloc, &main_argv, true).await {
        Ok(main) => main,
        Err(e) => {
            if helper.is_some() {
                kill_remote(&client, &alloc, &[helper_pid]).await;
            }
            return Err(e.into());
        }
    };
    let mut pid_files = vec![main_pid];
    if helper.is_some() {
        pid_files.push(helper_pid);
    }
    kill_when_cancelled(
        client.clone(),
        alloc.clone(),
        pid_files,
        kill.clone(),
        finished.clone(),
    );
    let (helper_in_tx, helper_in_rx) = mpsc::channel::<Bytes>(1);
    // The main session's input: the client's, and the gateway's acknowledgement of the end marker.
    let (main_in_tx, main_in_rx) = mpsc::channel::<Bytes>(64);
    let main_ack = main_in_tx.clone();
    tokio::spawn(async move {
        let mut client_input = stdin_rx;
        while let Some(d) = client_input.recv().await {
            if main_in_tx.send(d).await.is_err() {
                return;
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::channel(64);
    let (err_tx, mut err_rx) = mpsc::channel(64);
    let helper_kill = CancellationToken::new();
    let main_task = tokio::spawn(drive(main, main_in_rx, false, out_tx, kill.clone()));
    let helper_task = match helper {
        Some(helper) => tokio::spawn(drive(
            helper,
            helper_in_rx,
            false,
            err_tx,
            helper_kill.clone(),
        )),
        // Without a helper session its output channel is closed and its task done at once.
        None => tokio::spawn(async move {
            drop((err_tx, helper_in_rx));
            Ok(None)
        }),
    };
    let k = kill.clone();
    tokio::spawn(async move {
        let mut main_ack = Some(main_ack);
        let mut helper_ack = Some(helper_in_tx);
        let mut out_scan = EndScanner::new(&marker);
        let mut err_scan = EndScanner::new(&marker);
        let mut main_task = main_task;
        let mut helper_task = helper_task;
        let mut main_done: Option<Result<Option<i32>, SessionError>> = None;
        let mut helper_done = false;
        // A background process holding the FIFO must not keep the execution open forever.
        let mut helper_deadline: Option<tokio::time::Instant> = None;
        let mut out_open = true;
        let mut err_open = true;
        loop {
            tokio::select! {
                f = out_rx.recv(), if out_open => match f {
                    Some(Frame::Stdout(d)) | Some(Frame::Stderr(d)) => {
                        let pass = out_scan.feed(&d);
                        if !pass.is_empty() && ev_tx.send(ProcessEvent::Stdout(pass.into())).await.is_err() { k.cancel(); }
                        if out_scan.status.is_some() {
                            if let Some(ack) = main_ack.take() {
                                finished.store(true, Ordering::SeqCst);
                                let _ = ack.send(Bytes::from_static(b"\n")).await;
                                helper_deadline.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(2));
                            }
                        }
                    }
                    Some(Frame::Exited(_)) => {}
                    None => {
                        out_open = false;
                        let held = out_scan.flush();
                        if !held.is_empty() { let _ = ev_tx.send(ProcessEvent::Stdout(held.into())).await; }
                    }
                },
                f = err_rx.recv(), if err_open => match f {
                    Some(Frame::Stdout(d)) | Some(Frame::Stderr(d)) => {
                        let pass = err_scan.feed(&d);
                        if !pass.is_empty() && ev_tx.send(ProcessEvent::Stderr(pass.into())).await.is_err() { k.cancel(); }
                        if err_scan.status.is_some() {
                            if let Some(ack) = helper_ack.take() {
                                let _ = ack.send(Bytes::from_static(b"\n")).await;
                            }
                        }
                    }
                    Some(Frame::Exited(_)) => {}
                    None => {
                        err_open = false;
                        let held = err_scan.flush();
                        if !held.is_empty() { let _ = ev_tx.send(ProcessEvent::Stderr(held.into())).await; }
                    }
                },
                r = &mut main_task, if main_done.is_none() => {
                    main_done = Some(r.unwrap_or(Err(SessionError::Lost)));
                    if matches!(main_done, Some(Ok(Some(_)))) || out_scan.status.is_some() {
                        helper_deadline.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(2));
                    } else {
                        helper_kill.cancel();
                    }
                }
                _ = async { if let Some(d) = helper_deadline { tokio::time::sleep_until(d).await } }, if helper_deadline.is_some() && !helper_done => {
                    helper_kill.cancel();
                    helper_deadline = None;
                }
                _ = &mut helper_task, if !helper_done => { helper_done = true; }
                _ = k.cancelled(), if !helper_kill.is_cancelled() => { helper_kill.cancel(); }
            }
            if main_done.is_some() && helper_done && !out_open && !err_open {
                break;
            }
        }
        // The marker's status is the command's even when the session broke after it.
        let last = match (out_scan.status, main_done) {
            (Some(code), _) | (None, Some(Ok(Some(code)))) => {
                finished.store(true, Ordering::SeqCst);
                final_event(&client, &alloc, started_ns, code).await
            }
            (None, Some(Ok(None))) => ProcessEvent::Failed("the execution was killed".into()),
            (None, Some(Err(e))) => ProcessEvent::Failed(e.to_string()),
            (None, None) => ProcessEvent::Failed("the execution ended unexpectedly".into()),
        };
        let _ = ev_tx.send(last).await;
    });
    Ok(ExecProcess {
        stdin: stdin_tx,
        events: ev_rx,
        kill,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_terminal_end_marker_is_cut_out_across_chunks() {
        let mut scan = EndScanner::new("poseidon-end-1");
        let mut out = scan.feed(b"hello\r\n\x1eposeid");
        assert_eq!(out, b"hello\r\n");
        assert_eq!(scan.status, None);
        out = scan.feed(b"on-end-1 4");
        assert!(out.is_empty());
        out = scan.feed(b"2\x1e\r\n");
        assert!(out.is_empty());
        assert_eq!(scan.status, Some(42));
        assert!(scan.feed(b"late echo").is_empty());
        // A lone record separator in the output is passed on once it cannot be the marker.
        let mut scan = EndScanner::new("m");
        assert_eq!(scan.feed(b"a\x1e"), b"a");
        assert_eq!(scan.feed(b"b"), b"\x1eb");
        assert_eq!(scan.flush(), b"");
    }

    #[test]
    fn the_end_marker_is_found_only_at_the_end() {
        let m = "poseidon-end-abc";
        assert_eq!(
            split_end_marker(b"a\0b\0\nposeidon-end-abc 2\n", m),
            Some((&b"a\0b\0"[..], 2))
        );
        assert_eq!(
            split_end_marker(b"\nposeidon-end-abc 0\n", m),
            Some((&b""[..], 0))
        );
        assert_eq!(split_end_marker(b"x\nposeidon-end-abc 0\nmore\n", m), None);
        assert_eq!(split_end_marker(b"x\nposeidon-end-abc 0", m), None);
        assert!(with_end_marker("exec find \"$1\"", m).starts_with("( exec find"));
    }

    #[test]
    fn wraps_like_poseidon_but_quotes_safely() {
        let req = ExecRequest {
            command: "echo \"$HOME\"\necho 'x'".into(),
            environment: vec![
                ("A".into(), "b c".into()),
                ("CODEOCEAN".into(), "no".into()),
            ],
            privileged: false,
            tty: true,
            time_limit: None,
        };
        assert_eq!(
            full_command(&req, "/sbin/setuser user"),
            "/sbin/setuser user env CODEOCEAN=true 'A=b c' /bin/bash -c 'echo \"$HOME\"\necho '\\''x'\\'''"
        );
    }
}
