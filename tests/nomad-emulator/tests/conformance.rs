//! Behaviour found on a real Nomad that the emulator must share. Each test runs against the
//! emulator and, as the ignored `real_nomad_*` twin (`-- --ignored real_nomad` with `NOMAD_ADDR`
//! set), against that real agent too (Docker driver, the image
//! `POSEIDON_TEST_IMAGE`, default `openhpi/co_execenv_python:3.8`), so the two can be compared
//! whenever Nomad changes.

mod common;

use common::*;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Where a test runs: an emulator it started, or the real agent at `NOMAD_ADDR`.
struct Target {
    base: String,
    _emulator: Option<nomad_emulator::Emulator>,
    real: bool,
}

impl Target {
    async fn emulator() -> Target {
        let emu = emulator().await;
        Target {
            base: emu.url(),
            _emulator: Some(emu),
            real: false,
        }
    }

    /// The real agent; a test asked for without one fails saying so.
    fn real(test: &str) -> Target {
        let addr = std::env::var("NOMAD_ADDR").unwrap_or_else(|_| {
            panic!("{test} needs a real Nomad: set NOMAD_ADDR (e.g. after shared/tools/real-nomad/up.sh)")
        });
        Target {
            base: addr.trim_end_matches('/').to_string(),
            _emulator: None,
            real: true,
        }
    }

    /// A runner-like job with a unique id; on a real agent with the image of the tests.
    fn job(&self, name: &str) -> (String, Value) {
        let id = format!("conformance-{name}-{}", unique());
        let mut j = job(&id);
        if self.real {
            let image = std::env::var("POSEIDON_TEST_IMAGE")
                .unwrap_or_else(|_| "openhpi/co_execenv_python:3.8".into());
            j["Job"]["TaskGroups"][0]["Tasks"][0]["Config"]["image"] = json!(image);
            j["Job"]["TaskGroups"][0]["Tasks"][0]["Config"]["network_mode"] = json!("none");
        }
        (id, j)
    }

    /// Starts the job and returns the id of its running allocation.
    async fn running(&self, job: &(String, Value)) -> String {
        let c = http();
        register(&c, &self.base, &job.1).await;
        let a = wait_alloc(&c, &self.base, &job.0, |a| a["ClientStatus"] == "running").await;
        a["ID"].as_str().unwrap().to_string()
    }

    /// Runs a shell script in the allocation without a terminal.
    async fn sh(&self, alloc: &str, script: &str) -> ExecResult {
        exec(
            &self.base,
            alloc,
            &["/bin/sh", "-c", script],
            false,
            b"",
            false,
        )
        .await
    }

    async fn purge(&self, job: &str) {
        let _ = http()
            .delete(format!("{}/v1/job/{job}?purge=true", self.base))
            .send()
            .await;
    }
}

fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{:x}", std::process::id(), t % 0xffff_ffff)
}

/// Opens an exec session, waits for `ready` on its output, then drops the connection.
async fn start_and_abandon(base: &str, alloc: &str, argv: &[&str], tty: bool, ready: &str) {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let cmd = url_encode(&serde_json::to_string(argv).unwrap());
    let url = format!(
        "{}/v1/client/allocation/{alloc}/exec?task=default-task&tty={tty}&command={cmd}",
        base.replacen("http://", "ws://", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut seen = Vec::new();
    let end = Instant::now() + DEADLINE;
    while !String::from_utf8_lossy(&seen).contains(ready) {
        assert!(Instant::now() < end, "no {ready:?} from the exec session");
        match tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if let Some(d) = v["stdout"]["data"].as_str() {
                    use base64::Engine;
                    seen.extend(base64::engine::general_purpose::STANDARD.decode(d).unwrap());
                }
            }
            Some(Ok(_)) => {}
            other => panic!("the exec session ended early: {other:?}"),
        }
    }
    drop(ws); // TCP close without a close frame, like a gateway that went away
}

/// Real Nomad (and Docker) do not kill an exec'd process when its WebSocket closes: it runs on.
/// The process waits for a file created only after its session is gone, then leaves a proof.
async fn an_exec_process_outlives_its_closed_session(t: Target) {
    let job = t.job("outlives");
    let alloc = t.running(&job).await;
    for tty in [false, true] {
        let tag = format!("/tmp/outlive-{}-{tty}", unique());
        let script = format!(
            "echo ready; while [ ! -e {tag}.go ]; do sleep 0.05; done; echo alive > {tag}.proof"
        );
        start_and_abandon(&t.base, &alloc, &["/bin/sh", "-c", &script], tty, "ready").await;
        let r = t.sh(&alloc, &format!("touch {tag}.go")).await;
        assert_eq!(r.exit_code, Some(0), "{r:?}");
        let end = Instant::now() + DEADLINE;
        loop {
            let r = t.sh(&alloc, &format!("cat {tag}.proof 2>/dev/null")).await;
            if r.stdout == b"alive\n" {
                break;
            }
            assert!(
                Instant::now() < end,
                "the process of a closed exec session (tty={tty}) did not run on"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        t.sh(&alloc, &format!("rm -f {tag}.go {tag}.proof")).await;
    }
    t.purge(&job.0).await;
}

#[tokio::test]
async fn emulator_an_exec_process_outlives_its_closed_session() {
    an_exec_process_outlives_its_closed_session(Target::emulator().await).await;
}

#[tokio::test]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_an_exec_process_outlives_its_closed_session() {
    let t = Target::real("real_nomad_an_exec_process_outlives_its_closed_session");
    an_exec_process_outlives_its_closed_session(t).await;
}
