//! systemd integration with the real binary: readiness and watchdog notifications on a
//! `NOTIFY_SOCKET` the test listens on, socket activation through Debian's
//! `systemd-socket-activate`, and a graceful shutdown that finishes requests in flight.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, stopped with SIGTERM (then SIGKILL) when dropped.
struct Proc {
    child: Child,
    dir: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Waits for the process to end (bounded) and returns its exit code.
    fn wait(&mut self, seconds: u64) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            term(self.child.id());
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        support::end_runners(&self.dir.join("state/runners"));
        let _ = std::fs::remove_dir_all(&self.dir);
        support::remove_cgroups(&self.dir.file_name().unwrap().to_string_lossy());
    }
}

fn term(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("poseidon-systemd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A configuration for the local backend in `dir`, with extra `server:` lines.
fn config(dir: &Path, server: &str, uid_base: u32) -> PathBuf {
    let file = dir.join("configuration.yaml");
    std::fs::write(
        &file,
        format!(
            "server:\n  address: 127.0.0.1\n  port: 0\n{server}\nlogger:\n  level: debug\nlocal:\n  statedir: {}\n  cgroupparent: {}\n  uidbase: {uid_base}\n  uidcount: 100\n",
            dir.join("state").display(),
            dir.file_name().unwrap().to_string_lossy(),
        ),
    )
    .unwrap();
    file
}

/// Starts `program args` with `env`, and waits for the server's "listening on URL" line.
fn start(dir: &Path, program: &str, args: &[&str], env: &[(&str, String)]) -> (Proc, String) {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cannot start the server");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc {
        child,
        dir: dir.to_path_buf(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the server did not start: {}", proc.log()));
    let url = line.rsplit(' ').next().unwrap().to_string();
    (proc, url)
}

fn poseidon() -> &'static str {
    env!("CARGO_BIN_EXE_poseidon")
}

/// Messages received on the notify socket until `done` says enough (bounded).
fn receive_until(
    socket: &UnixDatagram,
    seconds: u64,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&messages) {
        assert!(
            Instant::now() < deadline,
            "notifications so far: {messages:?}"
        );
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                messages.push(line.to_string());
            }
        }
    }
    messages
}

fn count(messages: &[String], what: &str) -> usize {
    messages.iter().filter(|m| *m == what).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_watchdog_are_notified_on_the_notify_socket() {
    let dir = fresh_dir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let file = config(&dir, "", 470_000);
    // systemd sets WATCHDOG_PID to the service's pid: the shell's, which execs the server.
    let (mut proc, url) = start(
        &dir,
        "sh",
        &[
            "-c",
            "WATCHDOG_PID=$$ exec \"$0\" \"$@\"",
            poseidon(),
            "--config",
            file.to_str().unwrap(),
        ],
        &[
            ("NOTIFY_SOCKET", socket_path.display().to_string()),
            ("WATCHDOG_USEC", "300000".into()),
        ],
    );
    let messages = receive_until(&socket, 30, |m| count(m, "WATCHDOG=1") >= 2);
    let ready = messages.iter().position(|m| m == "READY=1");
    let first_ping = messages.iter().position(|m| m == "WATCHDOG=1");
    assert!(
        ready.is_some() && ready < first_ping,
        "READY=1 must come first: {messages:?}"
    );
    // Ready means serving.
    let r = reqwest::get(format!("{url}/api/v1/health")).await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(
        proc.log().contains("systemd watchdog enabled"),
        "{}",
        proc.log()
    );

    term(proc.pid());
    receive_until(&socket, 30, |m| count(m, "STOPPING=1") == 1);
    assert_eq!(proc.wait(30), Some(0), "{}", proc.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_socket_systemd_passes() {
    let Ok(activate) = which("systemd-socket-activate") else {
        println!("skipped: systemd-socket-activate (Debian's systemd package) is not installed");
        return;
    };
    let dir = fresh_dir("activate");
    let file = config(&dir, "  systemdsocketactivation: true", 471_000);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    // systemd-socket-activate listens itself and starts the server at the first connection.
    let connect = tokio::spawn({
        let listen = listen.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match reqwest::get(format!("http://{listen}/api/v1/version")).await {
                    Ok(r) => return (r.status().as_u16(), r.text().await.unwrap()),
                    Err(e) if Instant::now() > deadline => panic!("no answer: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    });
    let (_proc, url) = start(
        &dir,
        &activate,
        &[
            "-l",
            &listen,
            poseidon(),
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(
        url,
        format!("http://{listen}"),
        "served on the passed socket"
    );
    let (status, body) = connect.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, format!("\"{}\"", env!("CARGO_PKG_VERSION")));

    // Without passed sockets the start stops with a message.
    let out = Command::new(poseidon())
        .args(["--config", file.to_str().unwrap()])
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("systemd passed no sockets"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which(program: &str) -> Result<String, ()> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .ok_or(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_refuses_new_ones() {
    let dir = fresh_dir("shutdown");
    let file = config(&dir, "", 472_000);
    let (mut proc, url) = start(&dir, poseidon(), &["--config", file.to_str().unwrap()], &[]);
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{url}/api/v1/execution-environments/5"))
        .json(
            &serde_json::json!({"image": "host", "prewarmingPoolSize": 1, "cpuLimit": 100,
            "memoryLimit": 0, "networkAccess": false, "exposedPorts": []}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    let runner = loop {
        let r = http
            .post(format!("{url}/api/v1/runners"))
            .json(&serde_json::json!({"executionEnvironmentId": 5}))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            let v: serde_json::Value = r.json().await.unwrap();
            break v["runnerId"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no idle runner");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A PATCH whose body arrives in two parts, the second after the server got SIGTERM.
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let request = tokio::spawn(
        http.patch(format!("{url}/api/v1/runners/{runner}/files"))
            .header("Content-Type", "application/json")
            .body(reqwest::Body::wrap_stream(rx))
            .send(),
    );
    use futures::SinkExt;
    tx.send(Ok(br#"{"copy": [{"path": "late.txt", "#.to_vec()))
        .await
        .unwrap();
    // In flight: the server has the request's headers (logged at debug level).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proc
        .log()
        .lines()
        .any(|l| l.contains("request started") && l.contains("PATCH"))
    {
        assert!(
            Instant::now() < deadline,
            "the PATCH did not arrive: {}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    term(proc.pid());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proc.log().contains("shutting down") {
        assert!(Instant::now() < deadline, "no shutdown: {}", proc.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New connections are refused while the old request is still open.
    let refused = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("{url}/api/v1/health"))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a new connection was served during the shutdown"
    );
    tx.send(Ok(br#""content": "aGk="}]}"#.to_vec()))
        .await
        .unwrap();
    drop(tx);
    let response = request
        .await
        .unwrap()
        .expect("the request in flight was dropped");
    assert_eq!(response.status(), 204, "{}", proc.log());
    assert_eq!(proc.wait(30), Some(0), "{}", proc.log());
}

/// Sets the soft open-file limit of `pid` (util-linux's `prlimit`).
fn set_open_file_limit(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .expect("prlimit (util-linux) is needed");
    assert!(status.success());
}

fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_stops_while_the_server_cannot_serve_and_resumes_after() {
    let dir = fresh_dir("unhealthy");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let file = config(&dir, "", 473_000);
    let (proc, url) = start(
        &dir,
        "sh",
        &[
            "-c",
            "WATCHDOG_PID=$$ exec \"$0\" \"$@\"",
            poseidon(),
            "--config",
            file.to_str().unwrap(),
        ],
        &[
            ("NOTIFY_SOCKET", socket_path.display().to_string()),
            ("WATCHDOG_USEC", "300000".into()),
        ],
    );
    receive_until(&socket, 30, |m| count(m, "WATCHDOG=1") >= 2);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proc.pid())).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();

    // Out of file descriptors (a real production failure): the server cannot accept a
    // connection, so its own /health check fails and systemd gets no more pings.
    let failed = "watchdog self-check failed";
    // A limit of 3: the descriptors it has stay usable, every new one (numbered 3 or more,
    // as 0-2 are taken) fails with EMFILE.
    set_open_file_limit(proc.pid(), "3");
    let deadline = Instant::now() + Duration::from_secs(30);
    while count_lines(&proc.log(), failed) < 1 {
        assert!(Instant::now() < deadline, "no failed check: {}", proc.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Checks run one after the other: every ping sent before the first failure is queued now.
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    while socket.recv(&mut buf).is_ok() {}
    let seen = count_lines(&proc.log(), failed);
    while count_lines(&proc.log(), failed) < seen + 2 {
        assert!(Instant::now() < deadline, "checks stopped: {}", proc.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut during = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        during.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(
        !during.iter().any(|m| m.contains("WATCHDOG=1")),
        "pinged while unable to serve: {during:?}"
    );
    assert!(
        reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap()
            .get(format!("{url}/api/v1/health"))
            .send()
            .await
            .is_err(),
        "the server answered a new connection"
    );

    // Healthy again: pings resume.
    socket.set_nonblocking(false).unwrap();
    set_open_file_limit(proc.pid(), &soft);
    receive_until(&socket, 30, |m| count(m, "WATCHDOG=1") >= 2);
    let r = reqwest::get(format!("{url}/api/v1/health")).await.unwrap();
    assert_eq!(r.status(), 204);
}
