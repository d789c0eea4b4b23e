//! Smoke test of the load generator: starts the real `poseidon` server (the harness pattern of
//! `tests/support/mod.rs`), runs every scenario with a handful of requests and checks that figures
//! are produced. It never asserts how fast anything is.
//!
//! The plain server stands in for the Nomad server here: the test checks the load generator's
//! mechanics, not that server. For the plugin server it starts a second server with the example
//! plugins `jwt_auth` (authenticator) and `submission_guard` (preprocessor) when
//! `plugins/build.sh` has built them; otherwise the plain server stands in for it too.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const TOKEN: &str = "loadgen-smoke-token";
const JWT_KEY: &str = "loadgen-smoke-jwt-key";

/// The example plugins' build directory (`plugins/build.sh`).
fn wasm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/target/wasm32-wasip2/release")
}

/// The `poseidon` binary: `POSEIDON_BIN`, else the workspace's debug build (built if missing).
fn poseidon_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("POSEIDON_BIN") {
        return bin.into();
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("debug/poseidon");
    if !bin.is_file() || !target.join("debug/poseidon-agent").is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-p",
                "poseidon",
                "--bin",
                "poseidon",
                "-p",
                "poseidon-agent",
            ])
            .current_dir(&workspace)
            .status()
            .expect("cannot run cargo");
        assert!(status.success(), "building poseidon failed");
    }
    bin
}

/// A running server with its own state directory and cgroup parent.
struct Server {
    child: Child,
    url: String,
    state: PathBuf,
    cgroup: String,
}

impl Server {
    fn start() -> Self {
        Self::start_with(false)
    }

    /// With `plugins`: `jwt_auth.wasm` and `submission_guard.wasm` from [`wasm_dir`] in
    /// `STATE/plugins`, the authenticator's tenant `bench` with [`JWT_KEY`].
    fn start_with(plugins: bool) -> Self {
        let id = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                % 0xffff_ffff
        );
        let state = std::env::temp_dir().join(format!("poseidon-loadgen-smoke-{id}"));
        std::fs::create_dir_all(&state).unwrap();
        let cgroup = format!("poseidon-loadgen-smoke-{id}");
        let uid_base =
            3_000_000 + (std::process::id() % 1000) * 2_000 + if plugins { 1_000 } else { 0 };
        let config = state.join("configuration.yaml");
        let mut yaml = format!(
            "server:\n  address: 127.0.0.1\n  port: 0\n  token: {TOKEN}\nlogger:\n  level: info\nlocal:\n  statedir: {}\n  cgroupparent: {cgroup}\n  uidbase: {uid_base}\n  uidcount: 1000\n",
            state.join("state").display()
        );
        if plugins {
            let dir = state.join("plugins");
            std::fs::create_dir_all(&dir).unwrap();
            for file in ["jwt_auth.wasm", "submission_guard.wasm"] {
                std::fs::copy(wasm_dir().join(file), dir.join(file)).unwrap();
            }
            yaml.push_str(&format!(
                "plugins:\n  directory: {}\n  entries:\n    - file: jwt_auth.wasm\n      kind: authenticator\n      config: {{ key.bench: \"{JWT_KEY}\", environments.bench: \"9101,9102,9103,9104,9105,9106\" }}\n    - file: submission_guard.wasm\n      config: {{ maxFiles: 50, forbiddenPaths: \"**/*.so\", maxTimeLimit: 60 }}\n",
                dir.display()
            ));
        }
        std::fs::write(&config, yaml).unwrap();
        let log = std::fs::File::create(state.join("server.log")).unwrap();
        let mut child = Command::new(poseidon_binary())
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("cannot start poseidon");
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
            .unwrap_or_else(|_| {
                panic!(
                    "server did not start: {}",
                    std::fs::read_to_string(state.join("server.log")).unwrap_or_default()
                )
            });
        assert!(line.starts_with("poseidon listening on http://"), "{line}");
        let url = line.rsplit(' ').next().unwrap().to_string();
        Self {
            child,
            url,
            state,
            cgroup,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // Runners outlive the server (a restarted one would recover them): end them here.
        if let Ok(entries) = std::fs::read_dir(self.state.join("state/runners")) {
            for e in entries.flatten() {
                let state = std::fs::read_to_string(e.path().join("runner.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
                for key in ["init_pid", "monitor_pid", "network_pid"] {
                    if let Some(pid) = state
                        .as_ref()
                        .and_then(|s| s[key].as_u64())
                        .filter(|p| *p > 1)
                    {
                        let _ = Command::new("kill")
                            .arg("-KILL")
                            .arg(pid.to_string())
                            .stderr(std::process::Stdio::null())
                            .status();
                    }
                }
                let _ = Command::new("umount").arg("-l").arg(e.path()).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
        for c in ["memory", "pids", "cpu"] {
            let dir = PathBuf::from("/sys/fs/cgroup").join(c).join(&self.cgroup);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

fn loadgen(args: &[&str]) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_poseidon-loadgen"))
        .args(args)
        .output()
        .expect("cannot run poseidon-loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "poseidon-loadgen failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

fn rows<'a>(report: &'a Value, scenario: &str) -> Vec<&'a Value> {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["scenario"] == scenario)
        .collect()
}

#[test]
fn every_scenario_produces_figures() {
    let server = Server::start();
    let dir = server.state.join("loadgen");
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("results.json");
    // The plugin server: the example plugins if built, else the plain server again.
    let built = wasm_dir().join("jwt_auth.wasm").is_file()
        && wasm_dir().join("submission_guard.wasm").is_file();
    let plugged = built.then(|| Server::start_with(true));
    let (plugin_url, plugin_file, plugin_sources) = match &plugged {
        Some(p) => {
            // Two builds with different content: the second has an extra custom section.
            let a = dir.join("jwt_auth-a.wasm");
            let b = dir.join("jwt_auth-b.wasm");
            std::fs::copy(wasm_dir().join("jwt_auth.wasm"), &a).unwrap();
            let mut bytes = std::fs::read(&a).unwrap();
            bytes.extend_from_slice(b"\x00\x07\x05benchb");
            std::fs::write(&b, bytes).unwrap();
            (
                p.url.clone(),
                p.state.join("plugins/jwt_auth.wasm"),
                format!("{},{}", b.display(), a.display()),
            )
        }
        None => {
            let source = dir.join("plugin-source.wasm");
            std::fs::write(&source, b"not really a component").unwrap();
            (
                server.url.clone(),
                dir.join("plugin.wasm"),
                source.display().to_string(),
            )
        }
    };
    let pid = server.child.id().to_string();
    let mut args = vec![
        "--url",
        &server.url,
        "--token",
        TOKEN,
        "--server-pid",
        &pid,
        "--concurrency",
        "1,2",
        "--claim-count",
        "4",
        "--execute-count",
        "3",
        "--baseline-count",
        "3",
        "--idle-runners",
        "10",
        "--leak-rounds",
        "2",
        "--leak-executions",
        "3",
        "--plugin-url",
        &plugin_url,
        "--plugin-file",
        plugin_file.to_str().unwrap(),
        "--plugin-source",
        &plugin_sources,
        "--reload-seconds",
        "2",
        "--reload-concurrency",
        "2",
        "--nomad-url",
        &server.url,
        "--json",
        json.to_str().unwrap(),
    ];
    if plugged.is_some() {
        args.extend(["--plugin-jwt-key", JWT_KEY]);
    }
    let (table, _) = loadgen(&args);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    for scenario in [
        "baseline", "claim", "execute", "rerun", "plugins", "reload", "nomad",
    ] {
        let found = rows(&report, scenario);
        assert!(!found.is_empty(), "no {scenario} rows: {report}");
        for row in found {
            assert!(row["ok"].as_u64().unwrap() > 0, "{row}");
            assert_eq!(row["failed"], 0, "{row}");
            assert!(row["rate"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["latency"]["p50_ms"].as_f64().unwrap() > 0.0, "{row}");
            assert!(
                row["latency"]["max_ms"].as_f64() >= row["latency"]["p99_ms"].as_f64(),
                "{row}"
            );
        }
    }
    // Each execute level has its phases and a ratio against the direct sandbox.
    for row in rows(&report, "execute") {
        // claim, copy, execute, websocket, destroy, and run (= execute + websocket):
        // `scenarios::EXECUTE_PHASES`.
        assert_eq!(row["phases"].as_array().unwrap().len(), 6, "{row}");
        assert!(row["ratio"]["p50"].as_f64().unwrap() > 0.0, "{row}");
    }
    let variants: Vec<&str> = rows(&report, "execute")
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert!(variants.contains(&"true") && variants.contains(&"python3"));
    // Each rerun level: execute, websocket and run (`scenarios::RERUN_PHASES`), and a ratio.
    for row in rows(&report, "rerun") {
        assert_eq!(row["phases"].as_array().unwrap().len(), 3, "{row}");
        assert!(row["ratio"]["p50"].as_f64().unwrap() > 0.0, "{row}");
    }
    // The plugins scenario compares both servers at both levels, for claims, executions and
    // executions on claimed runners, and executions and claims once more with the two servers
    // interleaved.
    assert_eq!(report["comparisons"].as_array().unwrap().len(), 8);
    let interleaved: Vec<&str> = rows(&report, "plugins")
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .filter(|v| v.ends_with("(interleaved)"))
        .collect();
    assert_eq!(
        interleaved,
        [
            "rerun true, plain (interleaved)",
            "rerun true, plugins (interleaved)",
            "claim, plain (interleaved)",
            "claim, plugins (interleaved)"
        ]
    );
    // The reload scenario swapped the file.
    let reload = rows(&report, "reload")[0];
    assert!(reload["extra"]["swaps"].as_u64().unwrap() >= 1, "{reload}");
    let swapped_in = std::fs::read(&plugin_file).unwrap();
    assert!(plugin_sources
        .split(',')
        .any(|source| std::fs::read(source).unwrap() == swapped_in));
    // Memory readings: idle, after executions, with idle runners.
    let memory = &report["memory"];
    assert!(
        memory["readings"].as_array().unwrap().len() >= 5,
        "{memory}"
    );
    assert!(memory["readings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["rss_kib"].as_u64().unwrap() > 0));
    assert_eq!(memory["idle_runners"]["reached"], 10, "{memory}");
    assert!(memory["growth_after_warmup_kib"].is_i64(), "{memory}");
    assert!(report["skipped"].as_array().unwrap().is_empty(), "{report}");
    assert!(table.contains("| execute | python3 | 2 |"), "{table}");

    // Without the optional servers, those scenarios say why they are skipped.
    let (table, _) = loadgen(&[
        "--url",
        &server.url,
        "--token",
        TOKEN,
        "--scenarios",
        "plugins,reload,nomad",
    ]);
    for scenario in ["plugins", "reload", "nomad"] {
        assert!(
            table.contains(&format!("{scenario}: skipped — no --")),
            "{table}"
        );
    }
}
