//! Test harness: starts the real `poseidon` binary on a free loopback port with its own state
//! directory, and talks to it over HTTP and WebSocket like CodeOcean does.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Runs each named scenario (an `async fn(Backend)` of the invoking module) once per backend,
/// with the same assertions: `local::*`, `nomad::*` over the emulator, and `real_nomad::*`,
/// ignored unless asked for with `NOMAD_ADDR` set.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($crate::support::Backend::Local).await
            })*
        }
        mod nomad {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($crate::support::Backend::Nomad).await
            })*
        }
        mod real_nomad {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
            async fn $name() {
                $crate::support::require_real_nomad(stringify!($name));
                super::$name($crate::support::Backend::RealNomad).await
            })*
        }
    };
}

/// The token every test server is configured with.
pub const TOKEN: &str = "test-token";

/// A running server.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    state: PathBuf,
    config: PathBuf,
    cgroup: String,
    env: Vec<(String, String)>,
    /// HTTP client with the token set.
    pub http: reqwest::Client,
    /// The backend in use.
    pub backend: Backend,
    emulator: Option<nomad_emulator::Emulator>,
    /// On a real Nomad: the namespace of this server's jobs, purged and deleted when it is dropped.
    real_nomad: Option<RealNomad>,
}

/// A real Nomad agent (`NOMAD_ADDR`, `NOMAD_TOKEN`) and the namespace one test server uses on it,
/// so that tests sharing the cluster never see each other's environments or runners.
#[derive(Debug, Clone)]
pub struct RealNomad {
    /// `http://host:port`.
    pub addr: String,
    /// ACL token (empty without ACLs).
    pub token: String,
    /// The test's own namespace.
    pub namespace: String,
    /// Task driver of the runners (`POSEIDON_TEST_NOMAD_DRIVER`, default docker).
    pub driver: String,
}

impl RealNomad {
    /// Creates a fresh namespace on the agent at `NOMAD_ADDR`.
    pub async fn create() -> RealNomad {
        let addr = std::env::var("NOMAD_ADDR")
            .expect("NOMAD_ADDR")
            .trim_end_matches('/')
            .to_string();
        let real = RealNomad {
            addr,
            token: std::env::var("NOMAD_TOKEN").unwrap_or_default(),
            namespace: format!("poseidon-test-{}", unique()),
            driver: std::env::var("POSEIDON_TEST_NOMAD_DRIVER").unwrap_or_else(|_| "docker".into()),
        };
        let r = real
            .request(
                reqwest::Method::PUT,
                &format!("/v1/namespace/{}", real.namespace),
            )
            .json(&json!({"Name": real.namespace, "Description": "Poseidon (Rust) test"}))
            .send()
            .await
            .expect("real Nomad answers");
        assert!(
            r.status().is_success(),
            "cannot create namespace {}: {}",
            real.namespace,
            r.text().await.unwrap_or_default()
        );
        real
    }

    /// A request to the agent with the token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = reqwest::Client::new().request(method, format!("{}{path}", self.addr));
        if !self.token.is_empty() {
            r = r.header("X-Nomad-Token", &self.token);
        }
        r
    }

    /// Jobs of the namespace (stubs), dead ones included.
    pub async fn jobs(&self) -> Vec<Value> {
        let r = self
            .request(reqwest::Method::GET, "/v1/jobs")
            .query(&[("namespace", self.namespace.as_str())])
            .send()
            .await
            .expect("real Nomad answers");
        r.json::<Value>()
            .await
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Stops every job of the namespace, waits until their allocations ended (purging at once can
    /// leave a container behind that Docker was still creating), purges them and deletes the
    /// namespace.
    pub async fn clean_up(&self) {
        let ids: Vec<String> = self
            .jobs()
            .await
            .iter()
            .filter_map(|j| j["ID"].as_str().map(String::from))
            .collect();
        for purge in ["false", "true"] {
            for id in &ids {
                let _ = self
                    .request(reqwest::Method::DELETE, &format!("/v1/job/{id}"))
                    .query(&[("namespace", self.namespace.as_str()), ("purge", purge)])
                    .send()
                    .await;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while purge == "false" && Instant::now() < deadline {
                let allocs: Value = match self
                    .request(reqwest::Method::GET, "/v1/allocations")
                    .query(&[("namespace", self.namespace.as_str())])
                    .send()
                    .await
                {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => break,
                };
                let live = allocs.as_array().into_iter().flatten().any(|a| {
                    !matches!(
                        a["ClientStatus"].as_str(),
                        Some("complete" | "failed" | "lost")
                    )
                });
                if !live {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Nomad refuses to delete a namespace while it still has (non-terminal) jobs: one
        // registered after the listing above (a server stopping while its request was on the
        // way) is purged here, before the next attempt.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self
                .request(
                    reqwest::Method::DELETE,
                    &format!("/v1/namespace/{}", self.namespace),
                )
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) || Instant::now() > deadline {
                return;
            }
            for job in self.jobs().await {
                if let Some(id) = job["ID"].as_str() {
                    let _ = self
                        .request(reqwest::Method::DELETE, &format!("/v1/job/{id}"))
                        .query(&[("namespace", self.namespace.as_str()), ("purge", "true")])
                        .send()
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The Docker container of a runner's running allocation (Nomad names it
    /// `default-task-<allocation id>`).
    pub async fn container_of(&self, runner: &str) -> String {
        let allocs: Value = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/job/{runner}/allocations"),
            )
            .query(&[("namespace", self.namespace.as_str())])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let alloc = allocs
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["ClientStatus"] == "running")
            .unwrap_or_else(|| panic!("no running allocation of {runner}: {allocs}"))["ID"]
            .as_str()
            .unwrap()
            .to_string();
        format!("default-task-{alloc}")
    }

    /// The image of environments on this agent (`POSEIDON_TEST_IMAGE`, default the CodeOcean-like
    /// image that `real-nomad/up.sh` builds).
    pub fn image() -> String {
        std::env::var("POSEIDON_TEST_IMAGE")
            .unwrap_or_else(|_| "openhpi/co_execenv_python:3.8".into())
    }
}

/// Which backend a test server uses.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The local bubblewrap backend.
    #[default]
    Local,
    /// The Nomad backend, over the project's Nomad emulator.
    Nomad,
    /// The Nomad backend against the real Nomad at `NOMAD_ADDR` (docker driver unless
    /// `POSEIDON_TEST_NOMAD_DRIVER` says otherwise).
    RealNomad,
}

/// Stops a real-Nomad test that was asked for (`--ignored`) without a real Nomad configured.
/// Without `--ignored` these tests are counted as ignored, never as passed.
pub fn require_real_nomad(test: &str) {
    assert!(
        std::env::var_os("NOMAD_ADDR").is_some(),
        "{test} needs a real Nomad: set NOMAD_ADDR (e.g. after shared/tools/real-nomad/up.sh)"
    );
}

/// Options for [`Server::start_with`].
#[derive(Default, Clone)]
pub struct Options {
    /// The backend.
    pub backend: Backend,
    /// Extra YAML appended to the configuration (top-level sections other than `server`/`local`).
    pub extra_yaml: String,
    /// Extra lines inside `server:` (indented by the caller with 2 spaces).
    pub server_yaml: String,
    /// Extra lines inside `local:`.
    pub local_yaml: String,
    /// Extra environment variables of the server process.
    pub env: Vec<(String, String)>,
    /// Extra lines inside `nomad:` (Nomad backends only; indented by the caller with 2 spaces).
    pub nomad_yaml: String,
    /// On a real Nomad: reach it through this `host:port` (e.g. a [`TcpGate`]) instead.
    pub real_nomad_via: Option<String>,
}

/// A TCP forwarder on a loopback port that can be closed for a while: connections are cut and
/// new ones refused, as when Nomad is unreachable, without touching the agent others use.
pub struct TcpGate {
    /// `127.0.0.1:PORT` to connect to.
    pub addr: String,
    closed_until: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    cut: std::sync::Arc<tokio::sync::Notify>,
}

impl TcpGate {
    /// Forwards a new loopback port to `target` (`host:port`).
    pub async fn open(target: String) -> TcpGate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let closed_until = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
        let cut = std::sync::Arc::new(tokio::sync::Notify::new());
        let (closed, cut2) = (closed_until.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let shut = closed.lock().unwrap().is_some_and(|t| Instant::now() < t);
                if shut {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                let target = target.clone();
                let cut = cut2.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        TcpGate {
            addr,
            closed_until,
            cut,
        }
    }

    /// Cuts every connection and refuses new ones for `d`.
    pub fn close_for(&self, d: Duration) {
        *self.closed_until.lock().unwrap() = Some(Instant::now() + d);
        self.cut.notify_waiters();
    }
}

fn unique() -> String {
    format!("{}-{}", std::process::id(), uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{n}", t % 0xffff_ffff)
}

impl Server {
    /// Starts a server with default options.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// Starts a server on the given backend.
    pub async fn on(backend: Backend) -> Self {
        Self::start_with(Options {
            backend,
            ..Default::default()
        })
        .await
    }

    /// Starts a server with the given options.
    pub async fn start_with(options: Options) -> Self {
        let id = unique();
        let state = std::env::temp_dir().join(format!("poseidon-test-{id}"));
        std::fs::create_dir_all(&state).unwrap();
        let cgroup = format!("poseidon-test-{id}");
        let uid_base = 300_000
            + (std::process::id() % 100) * 20_000
            + (uuid_like().len() as u32 * 37 % 1000) * 10;
        let config = state.join("configuration.yaml");
        let mut emulator = None;
        let mut extra = options.extra_yaml.clone();
        if options.backend == Backend::Nomad {
            let emu = nomad_emulator::Emulator::start(nomad_emulator::EmulatorConfig::for_tests())
                .await
                .expect("cannot start the Nomad emulator");
            extra.push_str(&format!(
                "\nnomad:\n  enabled: true\n  address: 127.0.0.1\n  port: {}\n  unprivilegedprefix: \"\"\n",

                emu.addr().port()
            ));
            emulator = Some(emu);
        }
        let mut real_nomad = None;
        if options.backend == Backend::RealNomad {
            let real = RealNomad::create().await;
            let hostport = match &options.real_nomad_via {
                Some(gate) => gate.clone(),
                None => real.addr.split("://").last().unwrap().to_string(),
            };
            let (host, port) = hostport.rsplit_once(':').unwrap_or((&hostport, "4646"));
            // Docker runs commands as the image's `user` through /sbin/setuser, as in production;
            // exec/raw_exec have no such user and run them as the task's user.
            let prefix = if real.driver == "docker" {
                "/sbin/setuser user"
            } else {
                ""
            };
            // The test image exists only on this machine: Nomad must not try to pull it.
            extra.push_str(&format!(
                "\nnomad:\n  enabled: true\n  address: {host}\n  port: {port}\n  token: \"{token}\"\n  namespace: {ns}\n  driver: {driver}\n  disableforcepull: true\n  unprivilegedprefix: \"{prefix}\"\n{more}",
                token = real.token,
                ns = real.namespace,
                driver = real.driver,
                more = options.nomad_yaml,
            ));
            real_nomad = Some(real);
        } else if options.backend == Backend::Nomad {
            extra.push_str(&options.nomad_yaml);
        }
        let yaml = format!(
            "server:\n  address: 127.0.0.1\n  port: 0\n  token: {TOKEN}\n{server}\nlogger:\n  level: debug\nlocal:\n  statedir: {state}\n  cgroupparent: {cgroup}\n  uidbase: {uid_base}\n  uidcount: 5000\n{local}\n{extra}\n",
            server = options.server_yaml,
            state = state.join("state").display(),
            local = options.local_yaml,
            extra = extra,
        );
        std::fs::write(&config, yaml).unwrap();
        let mut server = Self {
            child: None,
            base: String::new(),
            addr: String::new(),
            state,
            config,
            cgroup,
            env: options.env,
            http: client(),
            backend: options.backend,
            emulator,
            real_nomad,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_poseidon"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("SECRET_CANARY", "server-secret-value")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.state.join("server.log"))
                    .unwrap(),
            ));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("cannot start poseidon");
        let stdout = child.stdout.take().unwrap();
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
            .unwrap_or_else(|_| panic!("server did not start; log: {}", self.log()));
        let base = line.rsplit(' ').next().unwrap().to_string();
        self.addr = base.trim_start_matches("http://").to_string();
        self.base = base;
        self.child = Some(child);
    }

    /// `http://addr` of the Nomad emulator, when the server uses it.
    pub fn emulator_url(&self) -> Option<String> {
        self.emulator.as_ref().map(|e| e.url())
    }

    /// The real Nomad and namespace the server uses, if any.
    pub fn real_nomad(&self) -> Option<&RealNomad> {
        self.real_nomad.as_ref()
    }

    /// The image environments of tests use: none for the local backend and the emulator
    /// (`host`), the CodeOcean-like test image on a real Nomad.
    pub fn test_image(&self) -> String {
        match self.backend {
            Backend::RealNomad => RealNomad::image(),
            _ => "host".into(),
        }
    }

    /// How long a pool may take to fill: a real Nomad starts containers (vfs copies images).
    fn fill_deadline(&self) -> Duration {
        match self.backend {
            Backend::RealNomad => Duration::from_secs(180),
            // Generous: the cgroup v2 VM runs the tests under software emulation.
            _ => Duration::from_secs(60),
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("server.log")).unwrap_or_default()
    }

    /// Kills the server with SIGKILL and starts it again on the same state.
    pub async fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Kills the server with SIGKILL (its runners live on); [`Server::start_again`] starts it on
    /// the same state, e.g. after a change of its configuration file.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again on the same state and configuration file.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server still runs");
        self.spawn();
    }

    /// The claim the backend recorded durably for a runner (where a restarted server reads it):
    /// `None` while none is recorded, else `Some(owner)`. Local backend: the runner's
    /// `runner.json`; Nomad: its job's config meta.
    pub async fn recorded_claim(&self, runner: &str) -> Option<Option<String>> {
        let (claimed, owner) = match self.backend {
            Backend::Local => {
                let path = self
                    .state
                    .join("state/runners")
                    .join(runner)
                    .join("runner.json");
                let text = std::fs::read_to_string(path).ok()?;
                let state: Value = serde_json::from_str(&text).ok()?;
                (!state["claimed"].is_null(), state["owner"].clone())
            }
            Backend::Nomad | Backend::RealNomad => {
                let path = format!("/v1/job/{runner}");
                let request = match &self.real_nomad {
                    Some(real) => real
                        .request(reqwest::Method::GET, &path)
                        .query(&[("namespace", real.namespace.as_str())]),
                    None => reqwest::Client::new()
                        .get(format!("{}{path}", self.emulator_url().unwrap())),
                };
                let job: Value = request.send().await.ok()?.json().await.ok()?;
                let config = job["TaskGroups"]
                    .as_array()?
                    .iter()
                    .find(|g| g["Name"] == "config")?;
                let meta = &config["Meta"];
                (meta["used"] == "true", meta["owner"].clone())
            }
        };
        claimed.then(|| owner.as_str().map(str::to_string))
    }

    /// `base` + path.
    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    /// GETs a URL with the token and decodes the JSON answer.
    pub async fn get_json(&self, url: impl AsRef<str>) -> Value {
        let url = url.as_ref();
        let response = self.http.get(url).send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {url}: {status}, not JSON ({e}): {text}"))
    }

    /// The server's configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("the server runs")
    }

    /// Creates an environment and waits until its pool has `pool` idle runners.
    pub async fn environment(&self, id: u64, pool: u32, body: Value) -> Value {
        let mut env = json!({
            "id": id, "image": self.test_image(), "prewarmingPoolSize": pool, "cpuLimit": 100,
            "memoryLimit": 0, "networkAccess": false, "exposedPorts": []
        });
        for (k, v) in body.as_object().unwrap() {
            env[k] = v.clone();
        }
        let r = self
            .http
            .put(self.url(&format!("/execution-environments/{id}")))
            .json(&env)
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 201 || r.status() == 204,
            "PUT environment: {}",
            r.status()
        );
        self.wait_idle(id, pool).await;
        env
    }

    /// Polls the statistics until the environment has at least `n` idle runners.
    pub async fn wait_idle(&self, id: u64, n: u32) {
        let deadline = Instant::now() + self.fill_deadline();
        loop {
            let stats: Value = self
                .http
                .get(self.url("/statistics/execution-environments"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if stats[id.to_string()]["idleRunners"].as_u64().unwrap_or(0) >= u64::from(n) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pool of {id} not filled: {stats}\nserver log (last lines):\n{}",
                    log_tail(&self.log())
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Claims a runner and returns its id.
    pub async fn claim(&self, env: u64, inactivity: i64) -> String {
        let r = self
            .http
            .post(self.url("/runners"))
            .json(&json!({"executionEnvironmentId": env, "inactivityTimeout": inactivity}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "claim");
        let v: Value = r.json().await.unwrap();
        v["runnerId"].as_str().unwrap().to_string()
    }

    /// Copies files (path, content) into a runner.
    pub async fn copy(&self, runner: &str, files: &[(&str, &[u8])]) {
        use base64::Engine;
        let copy: Vec<Value> = files
            .iter()
            .map(|(p, c)| json!({"path": p, "content": base64::engine::general_purpose::STANDARD.encode(c)}))
            .collect();
        let r = self
            .http
            .patch(self.url(&format!("/runners/{runner}/files")))
            .json(&json!({"copy": copy}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "copy: {}", r.text().await.unwrap());
    }

    /// `GET /runners/{runner}/files/raw?path=PATH`: the answer as it came.
    pub async fn download(&self, runner: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/runners/{runner}/files/raw?path={path}")))
            .send()
            .await
            .unwrap()
    }

    /// The local backend's directory of runner `id` on the host.
    pub fn runner_dir(&self, id: &str) -> PathBuf {
        self.state.join("state/runners").join(id)
    }

    /// Stores an execution and returns its WebSocket URL.
    pub async fn execute(&self, runner: &str, body: Value) -> String {
        let r = self
            .http
            .post(self.url(&format!("/runners/{runner}/execute")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "execute");
        let v: Value = r.json().await.unwrap();
        v["websocketUrl"].as_str().unwrap().to_string()
    }

    /// Runs a command to its end and returns the session.
    pub async fn run(&self, runner: &str, body: Value) -> Session {
        let url = self.execute(runner, body).await;
        let ws = Ws::connect(&url).await;
        ws.finish().await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix_term(child.id());
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        if let Some(real) = self.real_nomad.take() {
            // Not on the test's runtime: Drop may run inside it.
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(real.clean_up())
            })
            .join();
        }
        // Runners outlive the server (for the next process to recover): end their sandboxes,
        // then remove mounts, files and cgroups.
        end_runners(&self.state.join("state/runners"));
        if std::env::var_os("POSEIDON_TEST_KEEP_STATE").is_none() {
            let _ = std::fs::remove_dir_all(&self.state);
        }
        remove_cgroups(&self.cgroup);
    }
}

/// Removes a stopped server's parent cgroup `name` and its runners' groups (emptied by
/// [`end_runners`]), on cgroup v1 (memory, pids, cpu) and v2.
pub fn remove_cgroups(name: &str) {
    for c in ["memory", "pids", "cpu", ""] {
        let dir = PathBuf::from("/sys/fs/cgroup").join(c).join(name);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    remove_cgroup_dir(&e.path());
                }
            }
        }
        remove_cgroup_dir(&dir);
    }
}

/// Removes one cgroup directory, waiting (up to 2 s) while the kernel still counts a process
/// that was just killed in it (`EBUSY`): a runner group removed right after its sandbox's kill
/// was otherwise left behind now and then.
fn remove_cgroup_dir(dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => return,
        }
    }
}

/// Ends the sandboxes of a stopped server's runners (they outlive it) and unmounts their
/// directories: the processes each `runner.json` names, and those whose command line names the
/// runners directory (a sandbox whose start the stopping server interrupted has no runner.json).
pub fn end_runners(runners: &std::path::Path) {
    let kill = |pid: u64| {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    };
    for pid in host_processes_with(&runners.to_string_lossy()) {
        kill(u64::from(pid));
    }
    let Ok(entries) = std::fs::read_dir(runners) else {
        return;
    };
    for entry in entries.flatten() {
        let state: Value = std::fs::read_to_string(entry.path().join("runner.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        for key in ["init_pid", "monitor_pid", "network_pid"] {
            if let Some(pid) = state[key].as_u64().filter(|p| *p > 1) {
                kill(pid);
            }
        }
        let _ = Command::new("umount").arg("-l").arg(entry.path()).status();
    }
}

fn nix_term(pid: u32) -> std::io::Result<std::process::ExitStatus> {
    Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
}

/// The last lines of a log, for assertion messages.
pub fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// An HTTP client that sends the token.
pub fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Poseidon-Token", TOKEN.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// The status of an answer and its body as JSON (`Null` when it has none).
pub async fn status_and_json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Messages of a finished execution.
#[derive(Debug, Default)]
pub struct Session {
    /// Every message in order.
    pub messages: Vec<Value>,
    /// Concatenated stdout.
    pub stdout: String,
    /// Concatenated stderr.
    pub stderr: String,
    /// The final message.
    pub last: Value,
    /// Close code received, if any.
    pub close_code: Option<u16>,
}

impl Session {
    /// The exit code, if the execution exited.
    pub fn exit(&self) -> Option<i64> {
        (self.last["type"] == "exit").then(|| self.last["data"].as_i64().unwrap())
    }
}

/// A WebSocket client connection to an execution.
pub struct Ws {
    stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// Collected so far.
    pub session: Session,
}

impl Ws {
    /// Connects with the token header.
    pub async fn connect(url: &str) -> Self {
        Self::connect_with_token(url, TOKEN).await
    }

    /// Connects with `token` as the `Poseidon-Token` (a tenant's, with an authenticator that
    /// reads tokens).
    pub async fn connect_with_token(url: &str, token: &str) -> Self {
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Poseidon-Token", token.parse().unwrap());
        let (stream, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connect");
        Self {
            stream,
            session: Session::default(),
        }
    }

    /// Sends stdin.
    pub async fn send(&mut self, text: &str) {
        self.stream.send(Message::Text(text.into())).await.unwrap();
    }

    /// Reads the next message (JSON), `None` on close. Panics after 60 s.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), self.stream.next())
                .await
                .expect("no WebSocket message within 60 s");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    match v["type"].as_str() {
                        Some("stdout") => self.session.stdout.push_str(v["data"].as_str().unwrap()),
                        Some("stderr") => self.session.stderr.push_str(v["data"].as_str().unwrap()),
                        _ => {}
                    }
                    self.session.messages.push(v.clone());
                    return Some(v);
                }
                Some(Ok(Message::Close(frame))) => {
                    self.session.close_code = frame.map(|f| u16::from(f.code));
                    return None;
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Reads until stdout contains `needle`.
    pub async fn wait_stdout(&mut self, needle: &str) {
        while !self.session.stdout.contains(needle) {
            assert!(
                self.next().await.is_some(),
                "closed before {needle:?}; got {:?}",
                self.session.messages
            );
        }
    }

    /// Reads to the end; checks the protocol's shape (start first, exactly one final message last).
    pub async fn finish(mut self) -> Session {
        while self.next().await.is_some() {}
        let s = &mut self.session;
        assert_eq!(
            s.messages.first().map(|m| m["type"].clone()),
            Some(json!("start")),
            "{:?}",
            s.messages
        );
        let finals: Vec<_> = s
            .messages
            .iter()
            .filter(|m| matches!(m["type"].as_str(), Some("exit" | "timeout" | "error")))
            .collect();
        assert_eq!(
            finals.len(),
            1,
            "exactly one final message: {:?}",
            s.messages
        );
        s.last = s.messages.last().unwrap().clone();
        assert_eq!(&s.last, finals[0], "the final message is last");
        self.session
    }

    /// Drops the connection abruptly.
    pub async fn disconnect(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// Polls `check` until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, seconds: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Host processes whose command line contains `marker`.
pub fn host_processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(marker) && pid != std::process::id() {
                found.push(pid);
            }
        }
    }
    found
}
