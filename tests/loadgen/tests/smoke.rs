//! Smoke test of the load generator: starts the real `poseidon` server (the harness pattern of
//! `tests/support/mod.rs`), runs every scenario with a handful of requests and checks that figures
//! are produced. It never asserts how fast anything is.
//!
//! The plain server stands in for the plugin and the Nomad server here: the test checks the load
//! generator's mechanics, not those servers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const TOKEN: &str = "loadgen-smoke-token";

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
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "poseidon", "--bin", "poseidon"])
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
        let uid_base = 3_000_000 + (std::process::id() % 1000) * 1_000;
        let config = state.join("configuration.yaml");
        std::fs::write(
            &config,
            format!(
                "server:\n  address: 127.0.0.1\n  port: 0\n  token: {TOKEN}\nlogger:\n  level: info\nlocal:\n  statedir: {}\n  cgroupparent: {cgroup}\n  uidbase: {uid_base}\n  uidcount: 1000\n",
                state.join("state").display()
            ),
        )
        .unwrap();
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
        if let Ok(entries) = std::fs::read_dir(self.state.join("state/runners")) {
            for e in entries.flatten() {
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
    let plugin_file = dir.join("plugin.wasm");
    let plugin_source = dir.join("plugin-source.wasm");
    std::fs::write(&plugin_source, b"not really a component").unwrap();
    let pid = server.child.id().to_string();
    let (table, _) = loadgen(&[
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
        &server.url,
        "--plugin-file",
        plugin_file.to_str().unwrap(),
        "--plugin-source",
        plugin_source.to_str().unwrap(),
        "--reload-seconds",
        "2",
        "--reload-concurrency",
        "2",
        "--nomad-url",
        &server.url,
        "--json",
        json.to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    for scenario in ["baseline", "claim", "execute", "plugins", "reload", "nomad"] {
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
        assert_eq!(row["phases"].as_array().unwrap().len(), 5, "{row}");
        assert!(row["ratio"]["p50"].as_f64().unwrap() > 0.0, "{row}");
    }
    let variants: Vec<&str> = rows(&report, "execute")
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert!(variants.contains(&"true") && variants.contains(&"python3"));
    // The plugins scenario compares both servers at both levels, for claims and executions.
    assert_eq!(report["comparisons"].as_array().unwrap().len(), 4);
    // The reload scenario swapped the file.
    let reload = rows(&report, "reload")[0];
    assert!(reload["extra"]["swaps"].as_u64().unwrap() >= 1, "{reload}");
    assert_eq!(
        std::fs::read(&plugin_file).unwrap(),
        std::fs::read(&plugin_source).unwrap()
    );
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
