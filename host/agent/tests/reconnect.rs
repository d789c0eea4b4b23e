//! Core's agent client against the real agent over a Unix socket whose connections the test
//! breaks: a running execution carries on with no output lost or repeated, calls made while the
//! connection is down are answered once it is back, and an agent that is gone ends the execution.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poseidon_core::agent::{AgentClient, Connector, ExecSpec, Identity};
use poseidon_core::backend::ProcessEvent;

struct Agent {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_poseidon-agent"))
            .arg("--listen")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while StdUnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the agent did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connector to the agent's socket that keeps a handle on each connection, so the test can
/// break the current one.
fn connector(socket: std::path::PathBuf) -> (Connector, Arc<Mutex<Vec<StdUnixStream>>>) {
    let opened: Arc<Mutex<Vec<StdUnixStream>>> = Arc::default();
    let handles = Arc::clone(&opened);
    let connector: Connector = Arc::new(move || {
        let socket = socket.clone();
        let handles = Arc::clone(&handles);
        Box::pin(async move {
            let stream = tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| e.to_string())?;
            let std = stream.into_std().map_err(|e| e.to_string())?;
            handles
                .lock()
                .unwrap()
                .push(std.try_clone().map_err(|e| e.to_string())?);
            std.set_nonblocking(true).map_err(|e| e.to_string())?;
            let stream = tokio::net::UnixStream::from_std(std).map_err(|e| e.to_string())?;
            let (r, w) = stream.into_split();
            Ok((
                Box::pin(r) as std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
                Box::pin(w) as std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
            ))
        })
    });
    (connector, opened)
}

fn break_current(opened: &Mutex<Vec<StdUnixStream>>) {
    if let Some(stream) = opened.lock().unwrap().last() {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
}

fn spec(script: &str) -> ExecSpec {
    ExecSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        identity: Identity::Root,
        tty: false,
        inherit_env: false,
        merge_stderr: false,
        time_limit: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_outlives_broken_connections_with_nothing_lost_or_repeated() {
    let agent = Agent::start();
    let (connector, opened) = connector(agent.socket.clone());
    let client = AgentClient::reconnecting(connector, Duration::from_secs(10))
        .await
        .unwrap();
    // Numbers 1..=300 with short pauses: output keeps coming while connections break.
    let mut process = client
        .exec(spec(
            "i=1; while [ $i -le 300 ]; do echo $i; i=$((i+1)); [ $((i % 30)) = 0 ] && sleep 0.05; done; exit 7",
        ))
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut breaks = 0;
    let code = loop {
        let event = tokio::time::timeout(Duration::from_secs(30), process.events.recv())
            .await
            .expect("the execution went silent")
            .expect("the execution ended without a final event");
        match event {
            ProcessEvent::Stdout(b) => {
                out.extend_from_slice(&b);
                if breaks < 3 && out.len() > 200 * (breaks + 1) {
                    break_current(&opened);
                    breaks += 1;
                }
            }
            ProcessEvent::Stderr(_) => {}
            ProcessEvent::Exited(code) => break code,
            ProcessEvent::Failed(m) => panic!("the execution failed: {m}"),
        }
    };
    assert_eq!(breaks, 3, "the test broke the connection three times");
    assert!(opened.lock().unwrap().len() >= 4, "the client reconnected");
    let expected: String = (1..=300).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8(out).unwrap(), expected);
    assert_eq!(code, 7);
    // A call made right after a break is answered on the next connection.
    break_current(&opened);
    let list_root = || {
        client.list(
            "/".into(),
            false,
            "/".into(),
            Identity::Root,
            Duration::from_secs(20),
        )
    };
    // Either it went out on the broken connection (an error, at once) or on the next one.
    if let Ok(entries) = list_root().await {
        assert!(entries.iter().any(|e| e.name == "usr"));
    }
    let entries = list_root().await.unwrap();
    assert!(entries.iter().any(|e| e.name == "usr"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_is_gone_ends_the_execution_with_an_error() {
    let mut agent = Agent::start();
    let (connector, _opened) = connector(agent.socket.clone());
    let client = AgentClient::reconnecting(connector, Duration::from_secs(1))
        .await
        .unwrap();
    let mut process = client.exec(spec("echo up; exec sleep 20")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), process.events.recv())
        .await
        .unwrap();
    assert!(matches!(first, Some(ProcessEvent::Stdout(_))));
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let last = tokio::time::timeout(Duration::from_secs(20), process.events.recv())
        .await
        .expect("the execution hung after its agent died");
    assert!(matches!(last, Some(ProcessEvent::Failed(_))), "{last:?}");
    assert!(client.is_closed());
}
