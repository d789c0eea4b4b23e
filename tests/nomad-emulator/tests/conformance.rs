//! Behaviour found on a real Nomad that the emulator must share. Each test runs against the
//! emulator and, as the ignored `real_nomad::*` twin (`-- --ignored real_nomad` with `NOMAD_ADDR`
//! set), against that real agent too (Docker driver, the image
//! `POSEIDON_TEST_IMAGE`, default `openhpi/co_execenv_python:3.8`), so the two can be compared
//! whenever Nomad changes.

mod common;

use common::*;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Each check runs twice, as `emulator::NAME` and as `real_nomad::NAME` (ignored without a real
/// Nomad), in the shape of `tests/api.rs`'s `on_both_backends!`.
macro_rules! on_the_emulator_and_a_real_nomad {
    ($($name:ident),* $(,)?) => {
        mod emulator {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Target::emulator().await).await
            })*
        }
        mod real_nomad {
            $(#[tokio::test]
            #[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
            async fn $name() {
                super::$name(super::Target::real(concat!("real_nomad::", stringify!($name)))).await
            })*
        }
    };
}

on_the_emulator_and_a_real_nomad!(
    an_exec_process_outlives_its_closed_session,
    exec_streams_output_and_exit_codes,
    http_errors_are_plain_text_with_nomad_status_codes,
    in_place_meta_update_keeps_the_allocation,
);

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

    /// A guard that purges `job` from a real cluster when the test ends, also when it fails (a
    /// failed test left its job running there). The emulator ends with the test anyway.
    fn purge_at_end(&self, job: &str) -> PurgeAtEnd {
        PurgeAtEnd {
            url: self
                .real
                .then(|| format!("{}/v1/job/{job}?purge=true", self.base)),
        }
    }
}

/// Purges a job of a real cluster when dropped; see [`Target::purge_at_end`].
struct PurgeAtEnd {
    url: Option<String>,
}

impl Drop for PurgeAtEnd {
    fn drop(&mut self) {
        let Some(url) = self.url.take() else {
            return;
        };
        // A `drop` cannot await and runs inside the test's runtime: a thread of its own, with
        // a runtime of its own (the agent is another process, so nothing here waits on the
        // test's runtime), and a bounded request.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                http()
                    .delete(url)
                    .timeout(std::time::Duration::from_secs(10))
                    .send()
                    .await
                    .ok()
            })
        })
        .join();
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
    let _purge = t.purge_at_end(&job.0);
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
}

/// Exec sessions: separate output streams, exit codes (0 omitted), stdin and its close, a terminal,
/// deaths by a signal, and errors as close frames with Nomad's reasons.
async fn exec_streams_output_and_exit_codes(t: Target) {
    let job = t.job("exec");
    let _purge = t.purge_at_end(&job.0);
    let id = &t.running(&job).await;
    let base = &t.base;

    let r = exec(
        base,
        id,
        &["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
        b"",
        false,
    )
    .await;
    assert_eq!(r.stdout, b"out\n");
    assert_eq!(r.stderr, b"err\n");
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.exit_frame.unwrap()["result"], json!({"exit_code": 3}));
    let n = r.frames.len();
    assert_eq!(r.frames[n - 3], json!({"stdout": {"close": true}}));
    assert_eq!(r.frames[n - 2], json!({"stderr": {"close": true}}));

    // Exit code 0 is omitted.
    let r = exec(base, id, &["true"], false, b"", false).await;
    assert_eq!(r.exit_frame.unwrap(), json!({"exited": true, "result": {}}));

    // stdin and stdin close.
    let r = exec(base, id, &["cat"], false, b"hello stdin", true).await;
    assert_eq!(r.stdout, b"hello stdin");
    assert_eq!(r.exit_code, Some(0));

    // With a TTY: a real terminal, stderr merged into stdout.
    let r = exec(
        base,
        id,
        &["/bin/bash", "-c", "tty; echo e >&2; exit 4"],
        true,
        b"",
        false,
    )
    .await;
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("e\r\n"), "{out}");
    assert!(r.stderr.is_empty());
    assert_eq!(r.exit_code, Some(4));

    // Signal deaths report 128 + signal.
    let r = exec(
        base,
        id,
        &["/bin/sh", "-c", "kill -9 $$"],
        false,
        b"",
        false,
    )
    .await;
    assert_eq!(r.exit_code, Some(137));

    // Errors arrive as close frames with Nomad's reasons.
    let r = exec(
        base,
        "00000000-0000-0000-0000-000000000000",
        &["true"],
        false,
        b"",
        false,
    )
    .await;
    assert_eq!(
        r.close,
        Some((
            1008,
            "Unknown allocation \"00000000-0000-0000-0000-000000000000\"".into()
        ))
    );
    let r = exec(base, id, &[], false, b"", false).await;
    assert_eq!(r.close, Some((1008, "command is not present".into())));
}

/// Errors of the HTTP API: plain text with Nomad's status codes and messages; namespaces.
async fn http_errors_are_plain_text_with_nomad_status_codes(t: Target) {
    let base = &t.base;
    let c = http();
    let ns = format!("conformance-{}", unique());
    let (y, mut y_job) = t.job("y");
    let r = c.get(format!("{base}/v1/job/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), "job not found");
    let r = c
        .get(format!("{base}/v1/allocation/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (
            500,
            "alloc lookup failed: index error: UUID must be 36 characters".into()
        )
    );
    let r = c
        .get(format!(
            "{base}/v1/allocation/00000000-0000-0000-0000-000000000000"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (404, "alloc not found".into())
    );
    let r = c
        .get(format!("{base}/v1/evaluation/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (
            500,
            "failed to lookup eval: eval lookup failed: index error: UUID must be 36 characters"
                .into()
        )
    );
    let r = c
        .get(format!(
            "{base}/v1/evaluation/00000000-0000-0000-0000-000000000000"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (404, "eval not found".into())
    );
    let r = c.patch(format!("{base}/v1/jobs")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (405, "Invalid method".into())
    );
    // Deleting a missing job is 200 with a zero body.
    let r = c
        .delete(format!("{base}/v1/job/nope?purge=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["EvalID"].as_str(), v["Index"].as_u64()),
        (Some(""), Some(0))
    );
    let r = c
        .delete(format!("{base}/v1/job/nope?purge=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    // Validation failure is 500 with a multierror.
    let bad = json!({"Job": {"ID": "x", "Type": "batch", "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t"}]}]}});
    let r = c
        .put(format!("{base}/v1/jobs"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert!(r.text().await.unwrap().contains("* Missing task driver"));
    let r = c
        .put(format!("{base}/v1/jobs"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (400, "Job must be specified".into())
    );
    // Nonexistent namespace → 500.
    let r = c
        .put(format!("{base}/v1/jobs?namespace={ns}"))
        .json(&y_job)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains(&format!("nonexistent namespace \"{ns}\"")));
    // Namespaces can be created; then the register succeeds.
    let r = c
        .put(format!("{base}/v1/namespace/{ns}"))
        .json(&json!({"Name": ns}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    y_job["Job"]["Namespace"] = json!(ns);
    let r = c
        .put(format!("{base}/v1/jobs?namespace={ns}"))
        .json(&y_job)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = c
        .get(format!("{base}/v1/jobs?namespace={ns}&prefix={y}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["Namespace"], json!(ns));
    let list: Value = c
        .get(format!("{base}/v1/jobs?prefix={y}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list, json!([]));
    // Unknown paths: 404 with an empty body.
    let r = c.get(format!("{base}/v2/nothing")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (404, String::new())
    );
    let _ = c
        .delete(format!("{base}/v1/job/{y}?purge=true&namespace={ns}"))
        .send()
        .await;
    let _ = c.delete(format!("{base}/v1/namespace/{ns}")).send().await;
}

/// A changed meta of the count-0 `config` group is a new job version on the same allocation (how
/// a claim is recorded); an identical re-register only makes an evaluation.
async fn in_place_meta_update_keeps_the_allocation(t: Target) {
    let base = &t.base;
    let c = http();
    let (id, h_job) = t.job("meta");
    let _purge = t.purge_at_end(&id);
    register(&c, base, &h_job).await;
    let alloc = wait_alloc(&c, base, &id, |a| a["ClientStatus"] == "running").await;
    // Identical re-register: only an eval.
    let again = register(&c, base, &h_job).await;
    let job_before: Value = c
        .get(format!("{base}/v1/job/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job_before["Version"], 0);
    assert!(again["EvalCreateIndex"].as_u64() > again["JobModifyIndex"].as_u64());
    // Change the config group's meta: new version, same allocation.
    let mut j = h_job.clone();
    j["Job"]["TaskGroups"][1]["Meta"]["used"] = json!("true");
    register(&c, base, &j).await;
    let job_after: Value = c
        .get(format!("{base}/v1/job/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job_after["Version"], 1);
    let updated = wait_alloc(&c, base, &id, |a| a["JobVersion"] == 1).await;
    assert_eq!(updated["ID"], alloc["ID"]);
    assert_eq!(updated["ClientStatus"], "running");
}
