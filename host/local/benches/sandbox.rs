//! Micro-benchmarks of the local backend through its public API (`LocalBackend`, `RunnerBackend`):
//! one runner's file update, listing and command execution, each one bubblewrap sandbox.
//!
//! `list_files` is measured end to end: the difference between listing 1,000 entries and listing 1
//! is the per-entry cost of `find` inside the sandbox, the transfer and the parsing together (the
//! parser alone: `poseidon-core`'s `listing` bench).
//!
//! Needs root and bubblewrap (as the server does); otherwise every case says it is skipped.
//! `cargo bench -p poseidon-local --bench sandbox`

#[path = "../../core/benches/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::sync::Arc;

use poseidon_core::backend::{Backend, ExecRequest, ListRequest, ProcessEvent, RunnerBackend};
use poseidon_core::files::{FileCopy, FileUpdate};
use poseidon_core::{EnvironmentConfig, RunnerId};
use poseidon_local::{LocalBackend, LocalConfig};
use support::{human, Bencher};

const CASES: [&str; 4] = [
    "update_files/1 file of 30 B",
    "list_files/directory with 1 file",
    "list_files/directory with 1000 files, recursive",
    "execute/true (with a terminal, as every execution)",
];

/// Destroys the runner and removes the state even when a case panics.
struct Cleanup<'a> {
    rt: &'a tokio::runtime::Runtime,
    backend: &'a LocalBackend,
    runner: Arc<dyn RunnerBackend>,
    state: PathBuf,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.runner.destroy());
        self.backend.release();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn copies(dir: &str, count: usize) -> FileUpdate {
    FileUpdate {
        delete: Vec::new(),
        copy: (0..count)
            .map(|i| FileCopy {
                path: format!("{dir}/file-{i}.py"),
                content: b"print('hello')\n".to_vec(),
            })
            .collect(),
    }
}

async fn run_to_exit(runner: &Arc<dyn RunnerBackend>) {
    let request = ExecRequest {
        command: "true".into(),
        environment: Vec::new(),
        privileged: false,
        tty: true,
        time_limit: None,
    };
    let mut process = runner.execute(&request).await.expect("execute");
    while let Some(event) = process.events.recv().await {
        match event {
            ProcessEvent::Exited(0) => return,
            ProcessEvent::Exited(code) => panic!("true exited with {code}"),
            ProcessEvent::Failed(why) => panic!("execution failed: {why}"),
            _ => {}
        }
    }
    panic!("no exit event");
}

fn main() {
    let b = Bencher::from_args();
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false);
    if !root {
        for case in CASES {
            b.skip(case, "needs root, as the local backend does");
        }
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let state: PathBuf =
        std::env::temp_dir().join(format!("poseidon-local-bench-{}", std::process::id()));
    let config = LocalConfig {
        statedir: state.join("state"),
        cgroupparent: format!("poseidon-local-bench-{}", std::process::id()),
        uidbase: 4_200_000,
        uidcount: 100,
        ..LocalConfig::default()
    };
    let backend = match rt.block_on(LocalBackend::new(config)) {
        Ok(backend) => backend,
        Err(e) => {
            for case in CASES {
                b.skip(case, &format!("the local backend cannot start here: {e}"));
            }
            let _ = std::fs::remove_dir_all(&state);
            return;
        }
    };
    let environment = EnvironmentConfig {
        id: 1,
        image: "host".into(),
        prewarming_pool_size: 0,
        cpu_limit: 0,
        memory_limit: 0,
        network_access: false,
        exposed_ports: Vec::new(),
    };
    let runner = rt
        .block_on(backend.create_runner(&environment, RunnerId::generate(1)))
        .expect("create a runner");
    let _cleanup = Cleanup {
        rt: &rt,
        backend: &backend,
        runner: Arc::clone(&runner),
        state: state.clone(),
    };
    rt.block_on(async {
        runner.update_files(&copies("one", 1)).await.expect("copy");
        runner
            .update_files(&copies("many", 1000))
            .await
            .expect("copy 1000 files");
    });

    let small = copies(".", 1);
    b.run(CASES[0], None, || {
        rt.block_on(runner.update_files(&small)).expect("copy")
    });
    let (rt_ref, runner_ref) = (&rt, &runner);
    let list = |path: &str, expected: usize| {
        let request = ListRequest {
            path: path.into(),
            recursive: true,
            privileged: false,
        };
        move || {
            let entries = rt_ref
                .block_on(runner_ref.list_files(&request))
                .expect("list");
            assert_eq!(entries.len(), expected);
        }
    };
    let one = b.run(CASES[1], None, list("one", 1));
    let many = b.run(CASES[2], None, list("many", 1000));
    if let (Some(one), Some(many)) = (one, many) {
        let per_entry = many.median.saturating_sub(one.median) / 999;
        println!(
            "list_files/per entry (find in the sandbox, transfer and parsing): {}",
            human(per_entry)
        );
    }
    b.run(CASES[3], None, || rt.block_on(run_to_exit(&runner)));
}
