//! Shared helpers for the emulator's integration tests.
#![allow(dead_code)]

use futures::{SinkExt, StreamExt};
use nomad_emulator::{Emulator, EmulatorConfig};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for any single wait in these tests (no timing assertions are made).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Upper bound for an allocation to reach the state a test waits for: a real agent that was just
/// restarted registers its node again before it places anything (24 s seen), then Docker starts
/// the container.
pub const ALLOCATION_DEADLINE: Duration = Duration::from_secs(90);

/// Starts an emulator with the test profile.
pub async fn emulator() -> Emulator {
    Emulator::start(EmulatorConfig::for_tests())
        .await
        .expect("emulator starts")
}

/// A plain HTTP client.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// A Poseidon-like batch job: `default-group` running `sleep infinity`, count-0 `config` group.
pub fn job(id: &str) -> Value {
    json!({"Job": {
    "ID": id, "Type": "batch",
    "TaskGroups": [
        {"Name": "default-group", "Count": 1,
         "RestartPolicy": {"Attempts": 3, "Interval": 3_600_000_000_000i64, "Delay": 15_000_000_000i64, "Mode": "fail"},
         "ReschedulePolicy": {"Attempts": 3, "Interval": 21_600_000_000_000i64, "Delay": 60_000_000_000i64,
                              "DelayFunction": "exponential", "MaxDelay": 240_000_000_000i64, "Unlimited": false},
         "EphemeralDisk": {"SizeMB": 10},
         "Tasks": [{"Name": "default-task", "Driver": "docker",
                    "Config": {"image": "openhpi/docker_exec_phusion", "command": "sleep", "args": ["infinity"]},
                    "Resources": {"CPU": 40, "MemoryMB": 50, "MemoryMaxMB": 512},
                    "KillTimeout": 0, "KillSignal": "SIGKILL",
                    "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1}}]},
        {"Name": "config", "Count": 0, "Meta": {"used": "false", "prewarmingPoolSize": "1"},
         "Tasks": [{"Name": "config", "Driver": "exec", "Config": {"command": "true"},
                    "Resources": {"CPU": 1, "MemoryMB": 10},
                    "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1}}]}
    ]}})
}

/// Registers a job and returns the response body.
pub async fn register(c: &reqwest::Client, base: &str, body: &Value) -> Value {
    let r = c
        .put(format!("{base}/v1/jobs"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "register failed");
    r.json().await.unwrap()
}

/// Reads NDJSON lines of an event stream in the background.
pub struct Events {
    rx: mpsc::UnboundedReceiver<Option<Value>>,
    /// Every line seen so far (heartbeats included).
    pub seen: Vec<Value>,
}

impl Events {
    /// Opens `/v1/event/stream?<query>`.
    pub async fn open(base: &str, query: &str) -> Events {
        let resp = http()
            .get(format!("{base}/v1/event/stream?{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = Vec::new();
            while let Some(chunk) = body.next().await {
                let Ok(chunk) = chunk else { break };
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let v: Value = serde_json::from_slice(&line).expect("each line is JSON");
                    if tx.send(Some(v)).is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send(None);
        });
        Events {
            rx,
            seen: Vec::new(),
        }
    }

    /// Next line, `None` at EOF. Panics after [`DEADLINE`].
    pub async fn next_line(&mut self) -> Option<Value> {
        let v = tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("event stream line within deadline")
            .flatten();
        if let Some(v) = &v {
            self.seen.push(v.clone());
        }
        v
    }

    /// Waits for an event (not a line) matching `pred`; returns the event and its line index.
    pub async fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            match self.next_line().await {
                None => panic!("stream ended while waiting for {what}"),
                Some(line) => {
                    if let Some(evs) = line["Events"].as_array() {
                        if let Some(e) = evs.iter().find(|e| pred(e)) {
                            return e.clone();
                        }
                    }
                }
            }
        }
        panic!("no event {what} before deadline");
    }

    /// Waits until the stream ends.
    pub async fn wait_eof(&mut self) {
        for _ in 0..10_000 {
            if self.next_line().await.is_none() {
                return;
            }
        }
        panic!("stream did not end");
    }
}

/// Matches an allocation event by job, client status and desired status.
pub fn alloc_ev(e: &Value, job: &str, client: &str, desired: &str) -> bool {
    e["Topic"] == "Allocation"
        && e["Payload"]["Allocation"]["JobID"] == job
        && e["Payload"]["Allocation"]["ClientStatus"] == client
        && e["Payload"]["Allocation"]["DesiredStatus"] == desired
}

/// Polls `GET /v1/job/<id>/allocations` until an allocation satisfies `pred` (at most
/// [`ALLOCATION_DEADLINE`]).
pub async fn wait_alloc(
    c: &reqwest::Client,
    base: &str,
    job: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + ALLOCATION_DEADLINE;
    while Instant::now() < end {
        let list: Value = c
            .get(format!("{base}/v1/job/{job}/allocations"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(a) = list.as_array().and_then(|l| l.iter().find(|a| pred(a))) {
            return a.clone();
        }
        // Blocking query on the global index instead of a fixed sleep.
        let _ = c
            .get(format!(
                "{base}/v1/allocations?index={}&wait=1s",
                index_of(c, base).await
            ))
            .send()
            .await;
    }
    panic!("no matching allocation of {job}");
}

async fn index_of(c: &reqwest::Client, base: &str) -> u64 {
    let r = c
        .get(format!("{base}/v1/allocations"))
        .send()
        .await
        .unwrap();
    r.headers()["X-Nomad-Index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Result of an exec session.
#[derive(Debug, Default)]
pub struct ExecResult {
    /// Concatenated stdout.
    pub stdout: Vec<u8>,
    /// Concatenated stderr.
    pub stderr: Vec<u8>,
    /// Exit code (missing → 0).
    pub exit_code: Option<i64>,
    /// Raw exit frame.
    pub exit_frame: Option<Value>,
    /// Close frame (code, reason) if the server closed with an error.
    pub close: Option<(u16, String)>,
    /// Frames in order.
    pub frames: Vec<Value>,
}

/// Runs an exec session, sending `stdin` then closing stdin when `close_stdin`.
pub async fn exec(
    base: &str,
    alloc: &str,
    argv: &[&str],
    tty: bool,
    stdin: &[u8],
    close_stdin: bool,
) -> ExecResult {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let cmd = serde_json::to_string(argv).unwrap();
    let enc: String = url_encode(&cmd);
    let url = format!(
        "{}/v1/client/allocation/{alloc}/exec?task=default-task&tty={tty}&command={enc}",
        base.replacen("http://", "ws://", 1)
    );
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects");
    let (mut tx, mut rx) = ws.split();
    if !stdin.is_empty() {
        tx.send(Message::Text(
            json!({"stdin": {"data": b64.encode(stdin)}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    }
    if close_stdin {
        tx.send(Message::Text(
            json!({"stdin": {"close": true}}).to_string().into(),
        ))
        .await
        .unwrap();
    }
    tx.send(Message::Text("{}".into())).await.unwrap();
    let mut res = ExecResult::default();
    let end = Instant::now() + DEADLINE;
    while Instant::now() < end {
        let m = tokio::time::timeout(DEADLINE, rx.next())
            .await
            .expect("exec frame within deadline");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                res.frames.push(v.clone());
                if let Some(d) = v["stdout"]["data"].as_str() {
                    res.stdout.extend(b64.decode(d).unwrap());
                }
                if let Some(d) = v["stderr"]["data"].as_str() {
                    res.stderr.extend(b64.decode(d).unwrap());
                }
                if v["exited"] == true {
                    res.exit_code = Some(v["result"]["exit_code"].as_i64().unwrap_or(0));
                    res.exit_frame = Some(v);
                }
            }
            Some(Ok(Message::Close(Some(f)))) => {
                res.close = Some((u16::from(f.code), f.reason.to_string()));
                return res;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return res,
        }
    }
    panic!("exec did not finish");
}

/// Percent-encodes a query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
