//! Policy plugins end to end: the real server with WebAssembly plugins from `plugins/`
//! (build them first with `plugins/build.sh`), driven over HTTP like CodeOcean does.

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use support::{eventually, status_and_json, Backend, Options, Server};

/// Runners claimed by tenants across a restart of the server.
#[path = "plugins/restart.rs"]
mod restart;

/// A built example plugin.
fn plugin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the plugins first with plugins/build.sh",
        path.display()
    );
    path
}

/// A plugin directory with the given plugins (example name → file name).
fn plugin_dir(plugins: &[(&str, &str)]) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "poseidon-plugins-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, file) in plugins {
        std::fs::copy(plugin(name), dir.join(file)).unwrap();
    }
    dir
}

/// Starts a server whose configuration has `plugins_yaml` (the lines inside `plugins:`).
/// A server whose submission guard sets `ROUND=first`, and a runner of its environment 9 holding
/// `main.sh`, which prints `$ROUND` (checked once).
async fn server_printing_round(dir: &Path) -> (Server, String) {
    let s = server_with_plugins(
        dir,
        "    - file: guard.wasm\n      config:\n        env.ROUND: first\n",
    )
    .await;
    s.environment(9, 1, json!({})).await;
    let runner = s.claim(9, 60).await;
    s.copy(&runner, &[("main.sh", b"echo \"$ROUND\"")]).await;
    let session = s.run(&runner, json!({"command": "sh main.sh"})).await;
    assert_eq!(session.stdout.trim(), "first", "{session:?}");
    (s, runner)
}

/// Replaces `from` by `to` in the server's configuration file, in place (as an editor saves it).
fn edit_configuration(s: &Server, from: &str, to: &str) {
    let yaml = std::fs::read_to_string(s.config_path()).unwrap();
    std::fs::write(s.config_path(), yaml.replace(from, to)).unwrap();
}

/// Runs `main.sh` until it prints `to`: every run succeeds and prints `from` until then, for at
/// most 30 s.
async fn run_until_it_prints(s: &Server, runner: &str, from: &str, to: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut runs = 0;
    loop {
        let session = s.run(runner, json!({"command": "sh main.sh"})).await;
        runs += 1;
        assert_eq!(session.exit(), Some(0), "{session:?}");
        if session.stdout.trim() == to {
            return;
        }
        assert_eq!(session.stdout.trim(), from);
        assert!(
            Instant::now() < deadline,
            "still {from:?}, not {to:?}, after {runs} executions"
        );
    }
}

async fn server_with_plugins(dir: &Path, entries_yaml: &str) -> Server {
    Server::start_with(plugin_options(Backend::Local, dir, entries_yaml)).await
}

/// The `plugins:` section with the plugins of `dir` and `entries_yaml` (the lines of its
/// `entries:`).
fn plugins_yaml(dir: &Path, entries_yaml: &str) -> String {
    format!(
        "plugins:\n  directory: {}\n  limits:\n    callTimeoutMs: 30000\n    epochDeadlineTicks: 1000\n  entries:\n{entries_yaml}",
        dir.display()
    )
}

/// Options of a server on `backend` with [`plugins_yaml`].
fn plugin_options(backend: Backend, dir: &Path, entries_yaml: &str) -> Options {
    Options {
        backend,
        extra_yaml: plugins_yaml(dir, entries_yaml),
        // Cranelift's debug log (every function it compiles) makes starting with a large
        // plugin slow on a busy machine; the server's own debug log stays on.
        env: vec![(
            "POSEIDON_LOG".into(),
            "debug,cranelift_codegen=info,wasmtime_internal_cranelift=info,wasmtime=info".into(),
        )],
        ..Options::default()
    }
}

/// Starts a server whose `plugins:` section has `dir` as its directory and then `rest` (its
/// other lines, indented by two spaces).
async fn server_with_plugin_section(dir: &Path, rest: &str) -> Server {
    Server::start_with(Options {
        extra_yaml: format!("plugins:\n  directory: {}\n{rest}", dir.display()),
        ..Options::default()
    })
    .await
}

fn sign(claims: Value, key: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64.encode(claims.to_string());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{header}.{payload}").as_bytes());
    let signature = b64.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

fn token(tenant: &str, key: &[u8]) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    sign(json!({"iss": tenant, "exp": exp}), key)
}

const JWT_ENTRY: &str = "    - file: jwt.wasm\n      kind: authenticator\n      config:\n        key.alpha: alpha-key\n        environments.alpha: \"7\"\n        key.beta: beta-key\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_authenticator_scopes_environments_and_runners_to_tenants() {
    let dir = plugin_dir(&[("jwt_auth", "jwt.wasm")]);
    let s = server_with_plugins(&dir, JWT_ENTRY).await;
    let alpha = token("alpha", b"alpha-key");
    let beta = token("beta", b"beta-key");

    // The Poseidon-Token alone is not enough any more.
    let (status, body) = status_and_json(
        s.http
            .get(s.url("/execution-environments"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["message"].as_str()),
        (401, Some("missing bearer token"))
    );
    let forged = token("alpha", b"wrong-key");
    let r = s
        .http
        .get(s.url("/execution-environments"))
        .bearer_auth(forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Health and version stay open.
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 204);

    // alpha may use environment 7 only.
    let env = json!({"id": 7, "image": "host", "prewarmingPoolSize": 1, "cpuLimit": 100,
        "memoryLimit": 0, "networkAccess": false, "exposedPorts": []});
    let r = s
        .http
        .put(s.url("/execution-environments/7"))
        .bearer_auth(&alpha)
        .json(&env)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut env8 = env.clone();
    env8["id"] = json!(8);
    let r = s
        .http
        .put(s.url("/execution-environments/8"))
        .bearer_auth(&alpha)
        .json(&env8)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = s
        .http
        .put(s.url("/execution-environments/8"))
        .bearer_auth(&beta)
        .json(&env8)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // alpha sees only environment 7.
    let list: Value = s
        .http
        .get(s.url("/execution-environments"))
        .bearer_auth(&alpha)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<i64> = list["executionEnvironments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![7]);

    // alpha claims a runner of 7 (once the pool has one).
    let deadline = Instant::now() + Duration::from_secs(60);
    let runner = loop {
        let (status, body) = status_and_json(
            s.http
                .post(s.url("/runners"))
                .bearer_auth(&alpha)
                .json(&json!({"executionEnvironmentId": 7, "inactivityTimeout": 60}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        if status == 200 {
            break body["runnerId"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "claim: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = s
        .http
        .post(s.url("/runners"))
        .bearer_auth(&alpha)
        .json(&json!({"executionEnvironmentId": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // beta does not see alpha's runner; alpha does.
    let files = s.url(&format!("/runners/{runner}/files"));
    let r = s.http.get(&files).bearer_auth(&beta).send().await.unwrap();
    assert_eq!(r.status(), 410);
    let r = s.http.get(&files).bearer_auth(&alpha).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // The operator route needs only the Poseidon-Token.
    let (status, plugins) =
        status_and_json(s.http.get(s.url("/plugins")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let jwt = &plugins[0];
    assert_eq!(jwt["name"], "jwt");
    assert_eq!(jwt["kind"], "authenticator");
    assert_eq!(jwt["loaded"], true);
    assert_eq!(jwt["witVersion"], "0.1.0");
    assert!(jwt["calls"].as_u64().unwrap() >= 8, "{jwt}");
    assert_eq!(jwt["failures"], 0);
    let anon = reqwest::get(s.url("/plugins")).await.unwrap();
    assert_eq!(anon.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_authenticator_answers_503_and_status_stays_reachable() {
    let dir = plugin_dir(&[("test_trap", "trap.wasm")]);
    let s = server_with_plugins(&dir, "    - file: trap.wasm\n      kind: authenticator\n").await;
    let (status, body) = status_and_json(
        s.http
            .get(s.url("/execution-environments"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 503);
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("authentication unavailable"), "{message}");
    assert!(message.contains("trapped"), "{message}");
    let (status, plugins) =
        status_and_json(s.http.get(s.url("/plugins")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(plugins[0]["failures"], 1);
    assert!(plugins[0]["lastError"]
        .as_str()
        .unwrap()
        .contains("trapped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_guard_rejects_with_400_and_injects_variables() {
    let dir = plugin_dir(&[("submission_guard", "guard.wasm")]);
    let s = server_with_plugins(
        &dir,
        "    - file: guard.wasm\n      config:\n        forbiddenCommands: \"*curl *\"\n        forbiddenPaths: \"**/*.so\"\n        maxFiles: 3\n        env.INJECTED: from-the-plugin\n",
    )
    .await;
    s.environment(5, 1, json!({})).await;
    let runner = s.claim(5, 60).await;

    let (status, body) = status_and_json(
        s.http
            .post(s.url(&format!("/runners/{runner}/execute")))
            .json(&json!({"command": "curl http://example.org"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["message"], "command refused (matches \"*curl *\")");

    let so = base64::engine::general_purpose::STANDARD.encode(b"ELF");
    let (status, body) = status_and_json(
        s.http
            .patch(s.url(&format!("/runners/{runner}/files")))
            .json(&json!({"copy": [{"path": "lib/evil.so", "content": so}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("\"lib/evil.so\" is forbidden"),
        "{body}"
    );

    s.copy(&runner, &[("main.sh", b"echo \"$INJECTED\"")]).await;
    let session = s
        .run(
            &runner,
            json!({"command": "sh main.sh", "environment": {"A": "b"}}),
        )
        .await;
    assert_eq!(session.exit(), Some(0), "{session:?}");
    assert_eq!(session.stdout.trim(), "from-the-plugin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_sizer_sets_the_pool_target() {
    let dir = plugin_dir(&[("demand_sizer", "demand.wasm")]);
    let s = server_with_plugins(
        &dir,
        "    - file: demand.wasm\n      environments: [6]\n      config: { headroom: 3 }\n",
    )
    .await;
    // Configured size 1, but the sizer wants 3 idle runners (no claims + headroom 3).
    s.environment(6, 3, json!({"prewarmingPoolSize": 1})).await;
    // Environment 9 has no sizer: its configured size holds.
    s.environment(9, 1, json!({})).await;
    let stats: Value = s
        .get_json(s.url("/statistics/execution-environments"))
        .await;
    assert_eq!(stats["6"]["prewarmingPoolSize"], 1);
    assert!(stats["6"]["idleRunners"].as_u64().unwrap() >= 3, "{stats}");
    let plugins: Value = s.get_json(s.url("/plugins")).await;
    assert!(plugins[0]["calls"].as_u64().unwrap() > 0);
    assert_eq!(plugins[0]["failures"], 0);
}

#[test]
fn plugin_check_command() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poseidon"))
        .args(["plugin", "check"])
        .arg(plugin("submission_guard"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("kind:        preprocessor"), "{stdout}");
    assert!(stdout.contains("poseidon:plugins@0.1.0"), "{stdout}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poseidon"))
        .args(["plugin", "check"])
        .arg(plugin("test_incompatible"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("accepts poseidon:plugins@0.1.x or 0.2.x"),
        "{stderr}"
    );

    // A reader that stops at once (`| head`): a quiet end, no panic.
    let out = std::process::Command::new("sh")
        .args(["-c", "\"$0\" plugin check \"$1\" | true"])
        .arg(env!("CARGO_BIN_EXE_poseidon"))
        .arg(plugin("submission_guard"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `poseidon config check` checks every plugin entry's file as the server would load it: an
/// administrator learns before a start that a file is missing or of the wrong kind.
#[test]
fn config_check_checks_the_plugin_entries() {
    let dir = plugin_dir(&[
        ("submission_guard", "guard.wasm"),
        ("jwt_auth", "auth.wasm"),
    ]);
    let check = |entries: &str, config_flag: bool| {
        let file = dir.join(format!("config-{}.yaml", entries.len()));
        let yaml = format!(
            "plugins:\n  directory: {}\n  entries:\n{entries}",
            dir.display()
        );
        std::fs::write(&file, yaml).unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_poseidon"));
        if config_flag {
            command.arg("--config").arg(&file).args(["config", "check"]);
        } else {
            command.args(["config", "check"]).arg(&file);
        }
        let out = command.output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), said)
    };
    let good = "    - file: guard.wasm\n      kind: preprocessor\n    - file: auth.wasm\n";
    let (code, said) = check(good, false);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("plugin guard.wasm: OK (preprocessor"),
        "{said}"
    );
    assert!(
        said.contains("plugin auth.wasm: OK (authenticator"),
        "{said}"
    );
    // The file named by --config when none is given after `check`.
    let (code, said) = check(good, true);
    assert_eq!(code, Some(0), "{said}");
    let bad = "    - file: guard.wasm\n    - file: gone.wasm\n    - file: auth.wasm\n      kind: preprocessor\n";
    let (code, said) = check(bad, false);
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("plugin gone.wasm"), "{said}");
    assert!(
        said.contains("is an authenticator, but the entry says preprocessor"),
        "{said}"
    );
    assert!(
        !said.contains("plugin guard.wasm:"),
        "only what the server would refuse: {said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `poseidon plugin ARGS…` without `POSEIDON_LOG`: exit code, stdout, stderr.
fn plugin_command(args: &[&str]) -> (Option<i32>, String, String) {
    plugin_command_logging(args, None)
}

/// `poseidon plugin ARGS…` with `POSEIDON_LOG` set to `log` (or unset): exit code, stdout,
/// stderr.
fn plugin_command_logging(args: &[&str], log: Option<&str>) -> (Option<i32>, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_poseidon"));
    command.arg("plugin").args(args).env_remove("POSEIDON_LOG");
    if let Some(log) = log {
        command.env("POSEIDON_LOG", log);
    }
    let out = command.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plugin_call_command_runs_one_call_without_a_server() {
    let guard = plugin("submission_guard");
    let guard = guard.to_str().unwrap();
    // A top-level shared library is refused by `**/*.so` (the globset fix).
    let (code, stdout, stderr) = plugin_command(&[
        "call",
        guard,
        "--kind",
        "preprocessor",
        "--input",
        r#"{"copy":[{"path":"x.so","content":[1]}],"environmentId":1}"#,
        "--config",
        "forbiddenPaths=**/*.so",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        answer["Err"]["message"],
        "path \"x.so\" is forbidden (matches \"**/*.so\")"
    );
    assert!(
        stderr.contains("preprocessor (WIT 0.1.0), call took"),
        "{stderr}"
    );

    // A 0.2 authenticator with its token, and an observer.
    let (code, stdout, stderr) = plugin_command(&[
        "call",
        plugin("token_tenants").to_str().unwrap(),
        "--kind",
        "authenticator",
        "--input",
        r#"{"method":"GET","path":"/","poseidonToken":"s3cret"}"#,
        "--config",
        "token.hpi=s3cret",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(r#""tenant":"hpi""#), "{stdout}");
    let (code, _, stderr) = plugin_command(&[
        "call",
        plugin("test_observer").to_str().unwrap(),
        "--kind",
        "observer",
        "--input",
        r#"{"atMs":0,"runnerId":"r","environmentId":1,"tenant":null,"kind":"claimed"}"#,
        "--config",
        "trapAlways=true",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("test-observer traps on every event"),
        "{stderr}"
    );

    // What the plugin logs and writes to stderr shows, as in a server's log.
    let claimed = r#"{"atMs":0,"runnerId":"r","environmentId":1,"tenant":null,"kind":"claimed"}"#;
    let audit = plugin("audit_observer");
    let audit = audit.to_str().unwrap();
    let (code, _, stderr) =
        plugin_command(&["call", audit, "--kind", "observer", "--input", claimed]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("runner r (environment 1) claimed"),
        "{stderr}"
    );
    let (code, _, stderr) = plugin_command(&[
        "call",
        plugin("test_trap").to_str().unwrap(),
        "--kind",
        "authenticator",
        "--input",
        r#"{"method":"GET","path":"/x"}"#,
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("stderr: thread"), "{stderr}");
    assert!(stderr.contains("panicked at"), "{stderr}");
    // POSEIDON_LOG filters them as the server's log.
    let (code, _, stderr) = plugin_command_logging(
        &["call", audit, "--kind", "observer", "--input", claimed],
        Some("error"),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("claimed"), "{stderr}");

    // Wrong kind and bad input are clear errors.
    let (code, _, stderr) =
        plugin_command(&["call", guard, "--kind", "pool-sizer", "--input", "{}"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("is a preprocessor"), "{stderr}");
    let trap = plugin("test_trap");
    let (code, _, stderr) = plugin_command(&[
        "call",
        trap.to_str().unwrap(),
        "--kind",
        "preprocessor",
        "--input",
        "{}",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("is an authenticator plugin, but the configured kind is preprocessor"),
        "{stderr}"
    );
    let (code, _, stderr) = plugin_command(&["call", guard, "--kind", "preprocessor"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--input is required"), "{stderr}");
}

#[test]
fn plugin_new_command_writes_a_project() {
    let dir = std::env::temp_dir().join(format!("poseidon-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let project = dir.join("my-observer");
    let (code, stdout, stderr) = plugin_command(&[
        "new",
        "observer",
        project.to_str().unwrap(),
        "--lang",
        "rust",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(": an observer plugin"), "{stdout}");
    assert!(
        stdout.contains("cargo build --target wasm32-wasip2 --release"),
        "{stdout}"
    );
    // Only names cargo accepts as a package name.
    let digit = dir.join("9lives");
    let (code, _, stderr) = plugin_command(&["new", "pool-sizer", digit.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("must start with a letter or _"), "{stderr}");
    assert!(!digit.exists());
    let lib = std::fs::read_to_string(project.join("src/lib.rs")).unwrap();
    assert!(lib.contains("world: \"observer-plugin\""), "{lib}");
    let wit = std::fs::read_to_string(project.join("wit/plugins.wit")).unwrap();
    assert!(wit.contains("package poseidon:plugins@0.2.0;"));
    // Not twice, and not an unknown kind or language.
    let (code, _, stderr) = plugin_command(&["new", "observer", project.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("exists already"), "{stderr}");
    let (code, _, _) = plugin_command(&["new", "sizer", dir.join("x").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    let (code, _, stderr) = plugin_command(&[
        "new",
        "observer",
        dir.join("y").to_str().unwrap(),
        "--lang",
        "cobol",
    ]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("one of rust, python"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_is_replaced_while_clients_keep_sending_requests() {
    let dir = plugin_dir(&[("demand_sizer", "sizer.wasm")]);
    // The demand sizer answers 3 (headroom, no claims); the timetable sizer 7 (its default).
    let s = server_with_plugins(
        &dir,
        "    - file: sizer.wasm\n      environments: [6]\n      config: { headroom: 3, default: 7 }\n",
    )
    .await;
    s.environment(6, 3, json!({"prewarmingPoolSize": 1})).await;
    s.environment(9, 2, json!({})).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (http, base, stop) = (s.http.clone(), s.url(""), stop.clone());
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            // Bounded: stops when told, or after 2,000 rounds at the latest.
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = http
                    .post(format!("{base}/runners"))
                    .json(&json!({"executionEnvironmentId": 9}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                match (status, body["runnerId"].as_str()) {
                    (200, Some(id)) => {
                        let d = http
                            .delete(format!("{base}/runners/{id}"))
                            .send()
                            .await
                            .unwrap()
                            .status()
                            .as_u16();
                        if d == 204 {
                            ok += 1
                        } else {
                            failed.push(d)
                        }
                    }
                    // An empty pool is the pool's business, not the swap's: CodeOcean retries.
                    (500, _) if body["errorCode"] == "NOMAD_OVERLOAD" => {}
                    _ => failed.push(status),
                }
                let st = http
                    .get(format!("{base}/statistics/execution-environments"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                if st == 200 {
                    ok += 1
                } else {
                    failed.push(st)
                }
            }
            (ok, failed)
        }));
    }
    // Swap the file the way an administrator's deployment would: write aside, rename into place.
    let staged = dir.join(".sizer.wasm.new");
    std::fs::copy(plugin("timetable_sizer"), &staged).unwrap();
    std::fs::rename(&staged, dir.join("sizer.wasm")).unwrap();
    eventually(
        "the new sizer's target shows in /statistics",
        60,
        || async {
            let stats: Value = s
                .get_json(s.url("/statistics/execution-environments"))
                .await;
            stats["6"]["idleRunners"].as_u64().unwrap_or(0) >= 7
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during the swap: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 0);
    let plugins: Value = s.get_json(s.url("/plugins")).await;
    assert_eq!(plugins[0]["failures"], 0, "{plugins}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_and_memory_hungry_plugins_are_contained() {
    let dir = plugin_dir(&[("test_loop", "loop.wasm"), ("test_alloc", "hog.wasm")]);
    let s = server_with_plugin_section(
        &dir,
        "  limits:\n    callTimeoutMs: 3000\n    epochDeadlineTicks: 100\n    memoryMb: 32\n  entries:\n    - file: loop.wasm\n      environments: [6]\n    - file: hog.wasm\n",
    )
    .await;
    // The looping sizer is stopped; the configured pool size is used instead.
    s.environment(6, 2, json!({})).await;
    let runner = s.claim(6, 0).await;
    // The preprocessor that allocates without end is stopped; the request is refused, not lost.
    let (status, err) = status_and_json(
        s.http
            .post(s.url(&format!("/runners/{runner}/execute")))
            .json(&json!({"command": "true"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(err["message"].is_string());
    assert_eq!(
        s.http.get(s.url("/health")).send().await.unwrap().status(),
        204
    );
    let plugins: Value = s.get_json(s.url("/plugins")).await;
    for p in plugins.as_array().unwrap() {
        assert!(p["failures"].as_u64().unwrap() > 0, "{p}");
        assert!(p["lastError"].is_string(), "{p}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_preprocessor_under_load_leaves_other_plugins_their_calls() {
    let dir = plugin_dir(&[
        ("token_tenants", "tokens.wasm"),
        ("test_v2_preprocessor", "spin.wasm"),
        ("submission_guard", "guard.wasm"),
    ]);
    // `spin` loops on the command `loop-forever` until its run time of 1 s; two of its calls
    // at once at most, and a call that waits for a slot longer than 1.5 s times out.
    let s = server_with_plugin_section(
        &dir,
        &format!(
            "  limits:\n    callTimeoutMs: 1500\n    epochDeadlineTicks: 100\n    maxConcurrentCalls: 2\n  entries:\n    - file: tokens.wasm\n      kind: authenticator\n      config:\n        token.ops: {}\n    - file: spin.wasm\n      environments: [21]\n    - file: guard.wasm\n      environments: [22]\n      config:\n        env.CHECKED: \"yes\"\n",
            support::TOKEN
        ),
    )
    .await;
    s.environment(21, 1, json!({})).await;
    s.environment(22, 1, json!({})).await;
    let (spinning, checked) = (s.claim(21, 60).await, s.claim(22, 60).await);
    // Four times as many calls as `spin` may run at once.
    let looping: Vec<_> = (0..8)
        .map(|_| {
            let request = s
                .http
                .post(s.url(&format!("/runners/{spinning}/execute")))
                .json(&json!({"command": "loop-forever"}));
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    eventually(
        "every looping call has passed the authenticator and started",
        30,
        || async {
            let plugins: Value = s.get_json(s.url("/plugins")).await;
            plugins[1]["calls"].as_u64().unwrap_or(0) >= 8
        },
    )
    .await;
    // While `spin` is saturated, another tenant request passes the authenticator and the
    // submission guard, and runs.
    let session = s
        .run(&checked, json!({"command": "sh -c 'echo $CHECKED'"}))
        .await;
    assert_eq!(session.stdout.trim(), "yes", "{session:?}");
    for call in looping {
        assert_eq!(call.await.unwrap(), 400);
    }
    // Only the plugin that loops is charged with the failures.
    let plugins: Value = s.get_json(s.url("/plugins")).await;
    let failures = |i: usize| plugins[i]["failures"].as_u64().unwrap();
    assert_eq!(
        (failures(0), failures(1), failures(2)),
        (0, 8, 0),
        "{plugins}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HTTP client that sends `token` as its `Poseidon-Token`, as a CodeOcean configured
/// with that token does.
fn codeocean(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Poseidon-Token", token.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Claims a runner of the environment as `client` (a tenant) and returns its id.
async fn claim_as(s: &Server, client: &reqwest::Client, env: u64, inactivity: i64) -> String {
    let (status, body) = status_and_json(
        client
            .post(s.url("/runners"))
            .json(&json!({"executionEnvironmentId": env, "inactivityTimeout": inactivity}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["runnerId"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poseidon_token_per_institution_with_an_observer_watching() {
    let dir = plugin_dir(&[
        ("token_tenants", "tokens.wasm"),
        ("audit_observer", "audit.wasm"),
    ]);
    let s = server_with_plugins(
        &dir,
        &format!(
            "    - file: tokens.wasm\n      kind: authenticator\n      config:\n        token.ops: {}\n        token.hpi: hpi-token\n        environments.hpi: \"12\"\n        token.tum: tum-token\n        environments.tum: \"13\"\n    - file: audit.wasm\n",
            support::TOKEN
        ),
    )
    .await;
    // The operator's token (the server's) is a tenant with every environment.
    s.environment(12, 2, json!({})).await;
    let hpi = codeocean("hpi-token");
    let tum = codeocean("tum-token");

    // Unmodified CodeOcean: only the Poseidon-Token says which institution calls.
    let runner = claim_as(&s, &hpi, 12, 60).await;
    let files = s.url(&format!("/runners/{runner}/files"));
    assert_eq!(hpi.get(&files).send().await.unwrap().status(), 200);
    assert_eq!(tum.get(&files).send().await.unwrap().status(), 410);
    let r = tum
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 12}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (status, body) =
        status_and_json(codeocean("guess").get(&files).send().await.unwrap()).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (401, Some("unknown Poseidon-Token"))
    );
    // Operator routes still need the server's token.
    assert_eq!(
        hpi.get(s.url("/plugins")).send().await.unwrap().status(),
        401
    );
    assert_eq!(
        hpi.delete(s.url(&format!("/runners/{runner}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );

    // A whole execution of the operator tenant, watched by the audit observer.
    let own = s.claim(12, 60).await;
    s.copy(&own, &[("main.sh", b"exit 3")]).await;
    let session = s.run(&own, json!({"command": "sh main.sh"})).await;
    assert_eq!(session.exit(), Some(3), "{session:?}");
    let expected = [
        format!("runner {runner} (environment 12, tenant hpi) claimed"),
        format!("runner {runner} (environment 12, tenant hpi) destroyed"),
        format!("runner {own} (environment 12, tenant ops) files changed: 1 written (6 bytes), 0 deleted"),
        format!("runner {own} (environment 12, tenant ops) execution started: \"sh main.sh\""),
        format!("runner {own} (environment 12, tenant ops) execution ended: exited 3 after"),
    ];
    eventually("the observer logged every event", 30, || {
        let log = s.log();
        let found = expected.iter().all(|line| log.contains(line.as_str()));
        async move { found }
    })
    .await;
    let (_, plugins) = status_and_json(s.http.get(s.url("/plugins")).send().await.unwrap()).await;
    assert_eq!(plugins[0]["witVersion"], "0.2.0");
    assert_eq!(plugins[1]["kind"], "observer");
    assert_eq!(plugins[1]["failures"], 0, "{plugins}");
}

/// The authenticator's calls and cached decisions so far, from `/plugins`.
async fn authenticator_counts(s: &Server) -> (u64, u64) {
    let (_, plugins) = status_and_json(s.http.get(s.url("/plugins")).send().await.unwrap()).await;
    let counts = (
        plugins[0]["calls"].as_u64(),
        plugins[0]["cachedDecisions"].as_u64(),
    );
    (counts.0.unwrap(), counts.1.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticators_decisions_are_reused_per_token_until_its_config_changes() {
    let dir = plugin_dir(&[("token_tenants", "tokens.wasm")]);
    let s = server_with_plugins(
        &dir,
        &format!(
            "    - file: tokens.wasm\n      kind: authenticator\n      cacheDecisions: {{ inputs: [Poseidon-Token], ttlMs: 600000 }}\n      config:\n        token.ops: {}\n        token.hpi: hpi-token\n        environments.hpi: \"12\"\n",
            support::TOKEN
        ),
    )
    .await;
    let environments = s.url("/execution-environments");
    let hpi = codeocean("hpi-token");
    let before = authenticator_counts(&s).await;
    for _ in 0..5 {
        assert_eq!(hpi.get(&environments).send().await.unwrap().status(), 200);
    }
    let after = authenticator_counts(&s).await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 4),
        "one call for five requests"
    );
    // Refusals are kept too, each token on its own.
    for _ in 0..2 {
        let r = codeocean("guess").get(&environments).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    let refused = authenticator_counts(&s).await;
    assert_eq!((refused.0 - after.0, refused.1 - after.1), (1, 1));

    // A new config: no decision made under the old one is reused.
    edit_configuration(&s, "token.hpi: hpi-token", "token.hpi: hpi-token-2");
    eventually("the old token is refused", 30, || {
        let r = hpi.get(&environments).send();
        async move { r.await.unwrap().status() == 401 }
    })
    .await;
    let renamed = codeocean("hpi-token-2");
    assert_eq!(
        renamed.get(&environments).send().await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_changed_plugin_config_without_a_restart() {
    let dir = plugin_dir(&[("submission_guard", "guard.wasm")]);
    let (s, runner) = server_printing_round(&dir).await;

    edit_configuration(&s, "env.ROUND: first", "env.ROUND: second");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    // Every execution succeeds while the change is applied; soon they see the new value.
    run_until_it_prints(&s, &runner, "first", "second").await;
    let (_, plugins) = status_and_json(s.http.get(s.url("/plugins")).send().await.unwrap()).await;
    assert_eq!(plugins[0]["failures"], 0, "{plugins}");
    // The log line follows the whole reconfiguration, which may finish after the new value shows.
    eventually("the reload is logged", 10, || async {
        s.log().contains("SIGHUP: plugin configuration reloaded")
    })
    .await;
}

/// The server's `/metrics` page.
async fn metrics_text(s: &Server) -> String {
    s.http
        .get(s.url("/metrics").replace("/api/v1", ""))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A Prometheus sample's value: the first line of `name` carrying every one of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric == name
            && labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
        .then(|| value.parse().ok())?
    })
}

/// The `name` of each plugin in `GET /plugins`, by file.
async fn plugin_names(s: &Server) -> std::collections::HashMap<String, String> {
    let plugins: Value = s.get_json(s.url("/plugins")).await;
    plugins
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["file"].as_str().unwrap().to_string(),
                p["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_calls_failures_and_latency_are_in_the_metrics() {
    let dir = plugin_dir(&[
        ("test_loop", "loop.wasm"),
        ("test_alloc", "hog.wasm"),
        ("test_trap", "trap.wasm"),
    ]);
    let s = server_with_plugin_section(
        &dir,
        "  limits:\n    callTimeoutMs: 3000\n    epochDeadlineTicks: 100\n    memoryMb: 32\n  entries:\n    - file: loop.wasm\n      environments: [6]\n    - file: hog.wasm\n",
    )
    .await;
    s.environment(6, 1, json!({})).await;
    let runner = s.claim(6, 0).await;
    let r = s
        .http
        .post(s.url(&format!("/runners/{runner}/execute")))
        .json(&json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let names = plugin_names(&s).await;
    let (sizer, hog) = (&names["loop.wasm"], &names["hog.wasm"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let t = metrics_text(&s).await;
        let failed = |plugin: &str| {
            metric(
                &t,
                "poseidon_plugin_call_failures_total",
                &[("plugin", plugin)],
            )
            .is_some()
        };
        if failed(sizer) && failed(hog) {
            break t;
        }
        assert!(Instant::now() < deadline, "no plugin failures in {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for plugin in [sizer, hog] {
        let calls = metric(&text, "poseidon_plugin_calls_total", &[("plugin", plugin)]);
        assert!(calls.is_some_and(|c| c >= 1.0), "{plugin}: {text}");
        let timed = metric(
            &text,
            "poseidon_plugin_call_duration_seconds_count",
            &[("plugin", plugin)],
        );
        assert!(timed.is_some_and(|c| c >= 1.0), "{plugin}: {text}");
        // Microsecond buckets: a call of tens of microseconds does not fall in one
        // bucket with everything up to a millisecond.
        let micro = metric(
            &text,
            "poseidon_plugin_call_duration_seconds_bucket",
            &[("plugin", plugin), ("le", "0.0001")],
        );
        assert!(micro.is_some(), "{plugin}: {text}");
    }
    let timeouts = metric(
        &text,
        "poseidon_plugin_call_failures_total",
        &[("plugin", sizer), ("reason", "timeout")],
    );
    assert!(timeouts.is_some_and(|c| c >= 1.0), "{text}");
    let memory = metric(
        &text,
        "poseidon_plugin_call_failures_total",
        &[("plugin", hog), ("reason", "memory")],
    );
    assert_eq!(memory, Some(1.0), "{text}");
    drop(s);

    // A trapping authenticator: every API request is refused, the metrics still answer.
    let s = server_with_plugins(&dir, "    - file: trap.wasm\n      kind: authenticator\n").await;
    let r = s
        .http
        .get(s.url("/execution-environments"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let text = metrics_text(&s).await;
    let traps = metric(
        &text,
        "poseidon_plugin_call_failures_total",
        &[("reason", "trap")],
    );
    assert!(traps.is_some_and(|c| c >= 1.0), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `poseidon plugin call` with its compile cache in `cache`: compiles `file` once, so that a
/// server using the same cache directory starts without compiling it again (a Python
/// component takes many seconds to compile in a debug build).
/// Returns whether the call succeeded, its stdout and its stderr.
fn warm_compile_cache(
    file: &Path,
    kind: &str,
    input: &str,
    cache: &Path,
) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poseidon"))
        .args(["plugin", "call"])
        .arg(file)
        .args(["--kind", kind, "--input", input])
        .env("POSEIDON_PLUGIN_CACHE", cache)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_pool_sizer_is_loaded_and_called_and_an_unoffered_import_is_refused() {
    let dir = plugin_dir(&[
        ("lecture_hours", "lecture.wasm"),
        ("test_unoffered_import", "secrets.wasm"),
    ]);
    let cache = dir.join("cache");
    // The sizer answers on its own first (outside lecture hours: the configured size).
    let sizer_input = r#"{"environment":{"id":6},"pool":{"configuredSize":2,"now":0}}"#;
    let (ok, answer, stderr) =
        warm_compile_cache(&dir.join("lecture.wasm"), "pool-sizer", sizer_input, &cache);
    assert!(ok, "{stderr}");
    assert_eq!(answer.trim(), "2");
    // A Python plugin importing an interface the host does not offer: refused at load with
    // a message naming the import (compiled all the same, so the server finds it cached).
    let unoffered = "imports `test:unoffered/secrets`, which this host does not offer";
    let (ok, _, stderr) =
        warm_compile_cache(&dir.join("secrets.wasm"), "pool-sizer", sizer_input, &cache);
    assert!(!ok && stderr.contains(unoffered), "{stderr}");
    let s = server_with_plugins(
        &dir,
        &format!(
            "    - file: lecture.wasm\n      environments: [6]\n      timeZone: Europe/Berlin\n      config: {{ busy: 3, hours: \"00:00-24:00\", weekdays: all }}\n    - file: secrets.wasm\n  cacheDirectory: {}\n",
            cache.display()
        ),
    )
    .await;
    // Configured size 1; the Python sizer wants 3 at any hour of any day.
    s.environment(6, 3, json!({"prewarmingPoolSize": 1})).await;
    let stats: Value = s
        .get_json(s.url("/statistics/execution-environments"))
        .await;
    assert!(stats["6"]["idleRunners"].as_u64().unwrap() >= 3, "{stats}");
    let plugins: Value = s.get_json(s.url("/plugins")).await;
    let lecture = &plugins[0];
    assert_eq!(lecture["loaded"], true, "{plugins}");
    assert_eq!(lecture["witVersion"], "0.2.0");
    assert_eq!(lecture["fromCache"], true, "{plugins}");
    assert!(lecture["calls"].as_u64().unwrap() > 0);
    assert_eq!(lecture["failures"], 0, "{plugins}");
    // The server refuses the unoffered import the same way, and serves on.
    let secrets = &plugins[1];
    assert_eq!(secrets["loaded"], false, "{plugins}");
    let error = secrets["lastError"].as_str().unwrap();
    assert!(error.contains(unoffered), "{error}");
    assert_eq!(
        s.http.get(s.url("/health")).send().await.unwrap().status(),
        204
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_plugins_are_cached_across_restarts() {
    let dir = plugin_dir(&[("demand_sizer", "demand.wasm")]);
    let cache = dir.join("compiled");
    let entries = format!(
        "    - file: demand.wasm\n  cacheDirectory: {}\n",
        cache.display()
    );
    let from_cache = |plugins: &Value| plugins[0]["fromCache"].clone();
    {
        let s = server_with_plugins(&dir, &entries).await;
        let plugins: Value = s.get_json(s.url("/plugins")).await;
        assert_eq!(plugins[0]["loaded"], true, "{plugins}");
        assert_eq!(
            from_cache(&plugins),
            false,
            "a fresh cache cannot hit: {plugins}"
        );
    }
    let files = walk_files(&cache);
    assert!(
        !files.is_empty(),
        "nothing was written to {}",
        cache.display()
    );
    // The second start finds the machine code: no compilation.
    let s = server_with_plugins(&dir, &entries).await;
    let plugins: Value = s.get_json(s.url("/plugins")).await;
    assert_eq!(plugins[0]["loaded"], true, "{plugins}");
    assert_eq!(from_cache(&plugins), true, "{plugins}");
    // Another file (different bytes) is compiled, not confused with the cached one.
    std::fs::copy(plugin("test_v2_sizer"), dir.join("demand.wasm.new")).unwrap();
    std::fs::rename(dir.join("demand.wasm.new"), dir.join("demand.wasm")).unwrap();
    eventually("the replaced file is loaded", 60, || async {
        let plugins: Value = s.get_json(s.url("/plugins")).await;
        plugins[0]["witVersion"] == "0.2.0"
    })
    .await;
    let plugins: Value = s.get_json(s.url("/plugins")).await;
    assert_eq!(from_cache(&plugins), false, "{plugins}");
}

/// Every file below `dir`.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// The componentize-py that `plugins/build.sh` installed, if it did.
fn componentize_py() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let tools = var("POSEIDON_PLUGIN_TOOLS").or_else(|| {
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".cache")))
            .map(|c| c.join("poseidon/plugin-tools"))
    })?;
    let tool = tools.join("componentize-py-0.25.1/bin/componentize-py");
    tool.is_file().then_some(tool)
}

/// Builds the project `plugin new` wrote in `project` (Rust into `rust_target`) and returns
/// the path of its component `file`.
fn build_new_project(lang: &str, project: &Path, rust_target: &Path, file: &str) -> PathBuf {
    let (mut build, wasm) = if lang == "rust" {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo
            .args(["build", "--target", "wasm32-wasip2", "--release", "--quiet"])
            .current_dir(project)
            .env("CARGO_TARGET_DIR", rust_target);
        (cargo, rust_target.join("wasm32-wasip2/release").join(file))
    } else {
        // componentize-py: the one plugins/build.sh installed, else its build.sh's own.
        let mut build = std::process::Command::new(project.join("build.sh"));
        if let Some(tool) = componentize_py() {
            build.env("COMPONENTIZE_PY", tool);
        }
        (build, project.join(file))
    };
    let out = build.output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        project.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    wasm
}

/// What `poseidon plugin new` writes, for every kind in both languages: it builds (cargo /
/// componentize-py), and the call it prints after "try:" answers. The authenticators map a
/// token to its tenant and refuse a token that differs in its last byte, a prefix of it and no
/// token (their comparison is constant-time per length; only outcomes can be asserted here).
#[test]
fn plugin_new_writes_projects_that_build_and_answer() {
    let dir = std::env::temp_dir().join(format!("poseidon-new-all-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Kept between runs: the first Rust build compiles wit-bindgen (~1 min), later ones reuse it.
    let rust_target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-templates");
    for lang in ["rust", "python"] {
        for kind in ["pool-sizer", "preprocessor", "authenticator", "observer"] {
            let name = format!("{lang}-{kind}");
            let project = dir.join(&name);
            let (code, stdout, stderr) =
                plugin_command(&["new", kind, project.to_str().unwrap(), "--lang", lang]);
            assert_eq!(code, Some(0), "{name}: {stderr}");
            let file = format!("{}.wasm", name.replace('-', "_"));
            let wasm = build_new_project(lang, &project, &rust_target, &file);
            let call = |input: &str| {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_poseidon"))
                    .args(["plugin", "call"])
                    .arg(&wasm)
                    .args(["--kind", kind, "--input", input])
                    .args([
                        "--config",
                        "token.hpi=secret-hpi",
                        "--config",
                        "token.tum=secret-tum",
                    ])
                    .env("POSEIDON_PLUGIN_CACHE", dir.join("cache"))
                    .output()
                    .unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(out.status.success(), "{name}: {stderr}");
                assert!(stderr.contains("(WIT 0.2.0)"), "{name}: {stderr}");
                serde_json::from_slice::<Value>(&out.stdout).unwrap()
            };
            // The input the "try:" line suggests.
            let suggested = stdout
                .split("--input '")
                .nth(1)
                .and_then(|rest| rest.split('\'').next())
                .unwrap_or_else(|| panic!("{name}: no suggested input in {stdout}"));
            let answer = call(suggested);
            match kind {
                // 5 configured, one more during working hours of the zone's local time.
                "pool-sizer" => {
                    assert!(answer == json!(5) || answer == json!(6), "{name}: {answer}")
                }
                "preprocessor" => {
                    assert_eq!(
                        answer["Ok"]["command"], "python main.py",
                        "{name}: {answer}"
                    );
                    let refused = call(r#"{"command":"id","privileged":true,"environmentId":1}"#);
                    assert_eq!(
                        refused["Err"]["message"], "privileged execution is not allowed",
                        "{name}: {refused}"
                    );
                }
                "authenticator" => {
                    let token = |token: Value| {
                        let input = json!({"method": "GET", "path": "/api/v1/runners", "poseidonToken": token});
                        call(&input.to_string())
                    };
                    assert_eq!(token(json!("secret-tum"))["Ok"]["tenant"], "tum", "{name}");
                    for refused in [
                        json!("secret-tuX"),
                        json!("secret-tu"),
                        json!(""),
                        Value::Null,
                    ] {
                        let answer = token(refused.clone());
                        assert_eq!(answer["Err"]["status"], 401, "{name}, {refused}: {answer}");
                    }
                }
                _ => assert_eq!(
                    (&answer["delivered"], &answer["dropped"]),
                    (&json!(1), &json!(0)),
                    "{name}: {answer}"
                ),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_in_the_file_applies_without_a_restart_or_a_signal() {
    let dir = plugin_dir(&[("submission_guard", "guard.wasm")]);
    let (s, runner) = server_printing_round(&dir).await;

    // Only the file changes (as an editor saves it: in place); no SIGHUP.
    edit_configuration(&s, "env.ROUND: first", "env.ROUND: second");
    // Every execution succeeds while the change is applied; soon they see the new value.
    run_until_it_prints(&s, &runner, "first", "second").await;
    // The entry's other settings apply live as well: its environments no longer include 9.
    let yaml = std::fs::read_to_string(s.config_path()).unwrap();
    assert!(yaml.contains("    - file: guard.wasm\n"), "{yaml}");
    edit_configuration(
        &s,
        "    - file: guard.wasm\n",
        "    - file: guard.wasm\n      environments: [10]\n",
    );
    // No preprocessor applies to environment 9 any more: `ROUND` is gone.
    run_until_it_prints(&s, &runner, "second", "").await;
    let plugins: Value = s.get_json(s.url("/plugins")).await;
    assert_eq!(plugins[0]["failures"], 0, "{plugins}");
    eventually("the reload is logged", 10, || async {
        s.log()
            .contains("configuration file changed: plugin configuration reloaded")
    })
    .await;
    assert!(!s.log().contains("SIGHUP"), "no signal was sent");
    assert!(
        !s.log().contains("restart the server"),
        "nothing needed a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_see_runners_the_server_destroys() {
    let dir = plugin_dir(&[("audit_observer", "audit.wasm")]);
    let s = server_with_plugins(&dir, "    - file: audit.wasm\n").await;
    s.environment(15, 1, json!({})).await;
    s.environment(16, 1, json!({})).await;
    // One runner ends by its inactivity timeout, one with its environment.
    let idle = s.claim(15, 1).await;
    let orphan = s.claim(16, 600).await;
    let (status, _) = status_and_json(
        s.http
            .delete(s.url("/execution-environments/16"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 204);
    let expected = [
        format!("runner {idle} (environment 15) destroyed"),
        format!("runner {orphan} (environment 16) destroyed"),
    ];
    eventually("the observer logged both destroys", 30, || {
        let log = s.log();
        let found = expected.iter().all(|line| log.contains(line.as_str()));
        async move { found }
    })
    .await;
    // Reported once each: the server's destroy is not doubled by another path.
    let log = s.log();
    for line in &expected {
        assert_eq!(log.matches(line.as_str()).count(), 1, "{line}");
    }
}

/// How often the plugin files were rescanned and the configuration file applied after it
/// changed, by the server's metrics.
async fn rescans_and_config_reloads(s: &Server) -> (f64, f64) {
    let text = metrics_text(s).await;
    let rescans = metric(&text, "poseidon_plugin_rescans_total", &[]).unwrap_or(0.0);
    let reloads = metric(
        &text,
        "poseidon_plugin_config_reloads_total",
        &[("trigger", "file")],
    )
    .unwrap_or(0.0);
    (rescans, reloads)
}

/// Replaces the plugin file `file` in `dir` by the example `example`, atomically as the docs
/// recommend, and waits until the server has loaded it (its WIT version shows in the status).
async fn replace_plugin(s: &Server, dir: &Path, file: &str, example: &str, wit_version: &str) {
    let staged = dir.join(format!(".{file}.new"));
    std::fs::copy(plugin(example), &staged).unwrap();
    std::fs::rename(&staged, dir.join(file)).unwrap();
    eventually(&format!("{example} is loaded"), 60, || async {
        let plugins: Value = s.get_json(s.url("/plugins")).await;
        plugins[0]["witVersion"] == wit_version
    })
    .await;
}

/// Replaces `from` by `to` in the server's configuration file atomically (written aside,
/// renamed into place), so that the watcher never sees half of the change.
fn replace_configuration(s: &Server, from: &str, to: &str) {
    let yaml = std::fs::read_to_string(s.config_path()).unwrap();
    let staged = s.config_path().with_extension("new");
    std::fs::write(&staged, yaml.replace(from, to)).unwrap();
    std::fs::rename(&staged, s.config_path()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_is_applied_once_and_the_watchers_ignore_their_own_reads() {
    let dir = plugin_dir(&[("submission_guard", "guard.wasm")]);
    // A short debounce: a watcher that reacted to the server's own reads of the files would
    // rescan every few milliseconds, many times between two of the changes below.
    let s = server_with_plugin_section(
        &dir,
        "  debounceMs: 5\n  entries:\n    - file: guard.wasm\n      config:\n        env.ROUND: first\n",
    )
    .await;
    // The start scans the plugin files once.
    assert_eq!(rescans_and_config_reloads(&s).await, (1.0, 0.0));
    // Each change below makes the server read the configuration file or the plugin files,
    // which inotify reports too; only the change itself may lead to a scan. A configuration
    // change re-reads the plugin files as well (one rescan each).
    replace_configuration(&s, "env.ROUND: first", "env.ROUND: second");
    eventually("the configuration change is applied", 30, || async {
        rescans_and_config_reloads(&s).await.1 >= 1.0
    })
    .await;
    // Saved again without a change: nothing to apply.
    replace_configuration(&s, "env.ROUND", "env.ROUND");
    replace_plugin(&s, &dir, "guard.wasm", "test_v2_preprocessor", "0.2.0").await;
    replace_configuration(&s, "env.ROUND: second", "env.ROUND: third");
    eventually("the second configuration change is applied", 30, || async {
        rescans_and_config_reloads(&s).await.1 >= 2.0
    })
    .await;
    replace_plugin(&s, &dir, "guard.wasm", "submission_guard", "0.1.0").await;
    // Start, two configuration changes, two replaced files: five scans, two reloads.
    assert_eq!(rescans_and_config_reloads(&s).await, (5.0, 2.0));
    assert!(!s.log().contains("cannot read plugin file"), "{}", s.log());
    let _ = std::fs::remove_dir_all(&dir);
}
