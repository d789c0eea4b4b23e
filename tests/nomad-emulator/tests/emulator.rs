//! Integration tests of the Nomad emulator over real HTTP/WebSocket connections.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn register_emits_nomad_event_sequence_and_runs_a_real_process() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
    let mut ev = Events::open(&base, "topic=Job&topic=Evaluation&topic=Allocation").await;
    assert_eq!(
        ev.next_line().await.unwrap(),
        json!({}),
        "first line is a heartbeat"
    );

    let resp = register(&c, &base, &job("template-1")).await;
    let eval_id = resp["EvalID"].as_str().unwrap().to_string();
    assert_eq!(resp["Warnings"], "");
    let index = resp["Index"].as_u64().unwrap();

    // Two lines with the same index: Job then Evaluation, both typed JobRegistered.
    let l1 = ev.next_line().await.unwrap();
    let l2 = ev.next_line().await.unwrap();
    assert_eq!(l1["Index"], index);
    assert_eq!(l2["Index"], index);
    assert_eq!(l1["Events"][0]["Topic"], "Job");
    assert_eq!(l1["Events"][0]["Type"], "JobRegistered");
    assert_eq!(l1["Events"][0]["Payload"]["Job"]["Status"], "pending");
    assert_eq!(l1["Events"][0]["FilterKeys"], Value::Null);
    assert_eq!(l2["Events"][0]["Topic"], "Evaluation");
    assert_eq!(l2["Events"][0]["Type"], "JobRegistered");
    assert_eq!(
        l2["Events"][0]["Payload"]["Evaluation"]["TriggeredBy"],
        "job-register"
    );

    let placed = ev
        .wait_event("PlanResult placement", |e| {
            e["Type"] == "PlanResult" && alloc_ev(e, "template-1", "pending", "run")
        })
        .await;
    let alloc = &placed["Payload"]["Allocation"];
    assert_eq!(placed["FilterKeys"], json!(["template-1", ""]));
    assert!(
        alloc.get("Job").is_none(),
        "events carry no denormalised job"
    );
    assert!(alloc.get("NextAllocation").is_none(), "omitempty");
    assert!(
        alloc.get("TaskStates").is_none(),
        "no task states before the client runs"
    );
    assert_eq!(alloc["Name"], "template-1.default-group[0]");
    let alloc_id = alloc["ID"].as_str().unwrap().to_string();

    let done = ev
        .wait_event("eval complete", |e| {
            e["Type"] == "EvaluationUpdated" && e["Payload"]["Evaluation"]["ID"] == eval_id.as_str()
        })
        .await;
    assert_eq!(done["Payload"]["Evaluation"]["Status"], "complete");

    let running = ev
        .wait_event("running", |e| {
            e["Type"] == "AllocationUpdated" && alloc_ev(e, "template-1", "running", "run")
        })
        .await;
    let ts = &running["Payload"]["Allocation"]["TaskStates"]["default-task"];
    assert_eq!(ts["State"], "running");
    assert_eq!(ts["FinishedAt"], Value::Null);
    let types: Vec<&str> = ts["Events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Received", "Task Setup", "Driver", "Started"]);

    // The count-0 config group has no allocation; the job is running.
    let job: Value = c
        .get(format!("{base}/v1/job/template-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["Status"], "running");
    assert_eq!(
        job["TaskGroups"][0]["RestartPolicy"]["Delay"],
        15_000_000_000i64
    );
    assert_eq!(job["TaskGroups"][1]["Meta"]["used"], "false");
    let list: Value = c
        .get(format!("{base}/v1/job/template-1/allocations"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);

    // A real process runs in the allocation.
    let r = exec(
        &base,
        &alloc_id,
        &[
            "/bin/sh",
            "-c",
            "pgrep -f -x 'sleep infinity' >/dev/null && pwd",
        ],
        false,
        b"",
        false,
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert!(String::from_utf8_lossy(&r.stdout)
        .trim_end()
        .ends_with(&format!("{alloc_id}/default-task")));
}

#[tokio::test]
async fn exec_streams_output_and_exit_codes() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
    register(&c, &base, &job("runner-a")).await;
    let alloc = wait_alloc(&c, &base, "runner-a", |a| a["ClientStatus"] == "running").await;
    let id = alloc["ID"].as_str().unwrap();

    let r = exec(
        &base,
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
    let r = exec(&base, id, &["true"], false, b"", false).await;
    assert_eq!(r.exit_frame.unwrap(), json!({"exited": true, "result": {}}));

    // stdin and stdin close.
    let r = exec(&base, id, &["cat"], false, b"hello stdin", true).await;
    assert_eq!(r.stdout, b"hello stdin");
    assert_eq!(r.exit_code, Some(0));

    // With a TTY: a real terminal, stderr merged into stdout.
    let r = exec(
        &base,
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
        &base,
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
        &base,
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
    let r = exec(&base, id, &[], false, b"", false).await;
    assert_eq!(r.close, Some((1008, "command is not present".into())));
}

#[tokio::test]
async fn http_errors_are_plain_text_with_nomad_status_codes() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
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
        (404, "alloc not found".into())
    );
    let r = c
        .get(format!("{base}/v1/evaluation/nope"))
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
        .put(format!("{base}/v1/jobs?namespace=poseidon"))
        .json(&job("y"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("nonexistent namespace \"poseidon\""));
    // Namespaces can be created; then the register succeeds.
    let r = c
        .put(format!("{base}/v1/namespace/poseidon"))
        .json(&json!({"Name": "poseidon"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .put(format!("{base}/v1/jobs?namespace=poseidon"))
        .json(&job("y"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = c
        .get(format!("{base}/v1/jobs?namespace=poseidon&prefix=y"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["Namespace"], "poseidon");
    let list: Value = c
        .get(format!("{base}/v1/jobs?prefix=y"))
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
}

#[tokio::test]
async fn deregister_with_purge_stops_the_process() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
    register(&c, &base, &job("runner-b")).await;
    let alloc = wait_alloc(&c, &base, "runner-b", |a| a["ClientStatus"] == "running").await;
    let id = alloc["ID"].as_str().unwrap().to_string();
    let mut ev = Events::open(
        &base,
        "topic=Job:runner-b&topic=Allocation:runner-b&index=999999",
    )
    .await;
    let r = c
        .delete(format!("{base}/v1/job/runner-b?purge=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let dereg = ev
        .wait_event("JobDeregistered", |e| {
            e["Type"] == "JobDeregistered" && e["Topic"] == "Job"
        })
        .await;
    assert_eq!(dereg["Payload"]["Deleted"], true);
    let stop = ev
        .wait_event("desired stop", |e| {
            alloc_ev(e, "runner-b", "running", "stop")
        })
        .await;
    assert_eq!(
        stop["Payload"]["Allocation"]["DesiredDescription"],
        "alloc not needed due to job update"
    );
    let done = ev
        .wait_event("complete", |e| alloc_ev(e, "runner-b", "complete", "stop"))
        .await;
    let types: Vec<&str> = done["Payload"]["Allocation"]["TaskStates"]["default-task"]["Events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Type"].as_str().unwrap())
        .collect();
    assert!(
        types.ends_with(&["Killing", "Terminated", "Killed"]),
        "{types:?}"
    );
    let r = c
        .get(format!("{base}/v1/job/runner-b"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Exec into a completed allocation is refused.
    let r = exec(&base, &id, &["true"], false, b"", false).await;
    assert_eq!(
        r.close,
        Some((
            1008,
            format!("exec not possible, client status of allocation {id} is complete")
        ))
    );
    let state: Value = c
        .get(format!("{base}/_emulator/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["ProcessGroups"], json!([]));
}

#[tokio::test]
async fn oom_kill_restarts_the_task_in_place() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
    register(&c, &base, &job("runner-c")).await;
    let alloc = wait_alloc(&c, &base, "runner-c", |a| a["ClientStatus"] == "running").await;
    let id = alloc["ID"].as_str().unwrap().to_string();
    let mut ev = Events::open(&base, "topic=Allocation:runner-c&index=999999").await;
    let r = c
        .post(format!("{base}/_emulator/allocation/{id}/oom"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pending = ev
        .wait_event("restart pending", |e| {
            alloc_ev(e, "runner-c", "pending", "run")
        })
        .await;
    let ts = &pending["Payload"]["Allocation"]["TaskStates"]["default-task"];
    let term = ts["Events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Type"] == "Terminated")
        .unwrap();
    assert_eq!(term["Details"]["oom_killed"], "true");
    assert_eq!(term["ExitCode"], 137);
    assert_eq!(ts["Restarts"], 1);
    let running = ev
        .wait_event("running again", |e| {
            alloc_ev(e, "runner-c", "running", "run")
        })
        .await;
    assert_eq!(running["Payload"]["Allocation"]["ID"], id.as_str());
}

#[tokio::test]
async fn lost_node_replaces_allocation_with_previous_allocation() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
    register(&c, &base, &job("runner-d")).await;
    let alloc = wait_alloc(&c, &base, "runner-d", |a| a["ClientStatus"] == "running").await;
    let old = alloc["ID"].as_str().unwrap().to_string();
    let mut ev = Events::open(&base, "topic=Allocation&topic=Node&index=999999").await;
    let r = c
        .post(format!("{base}/_emulator/allocation/{old}/lose-node"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lost = ev
        .wait_event("lost", |e| alloc_ev(e, "runner-d", "lost", "stop"))
        .await;
    let next = lost["Payload"]["Allocation"]["NextAllocation"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        lost["Payload"]["Allocation"]["DesiredDescription"],
        "alloc is lost since its node is down"
    );
    let new = ev
        .wait_event("replacement", |e| {
            alloc_ev(e, "runner-d", "pending", "run") && e["Key"] == next.as_str()
        })
        .await;
    assert_eq!(
        new["Payload"]["Allocation"]["PreviousAllocation"],
        old.as_str()
    );
    ev.wait_event("replacement running", |e| {
        alloc_ev(e, "runner-d", "running", "run") && e["Key"] == next.as_str()
    })
    .await;
}

#[tokio::test]
async fn event_stream_cut_and_refused_connections() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
    register(&c, &base, &job("runner-e")).await;
    let mut ev = Events::open(&base, "topic=Job").await;
    // index=0 replays the buffer.
    ev.wait_event("replayed JobRegistered", |e| e["Type"] == "JobRegistered")
        .await;
    c.post(format!("{base}/_emulator/stream/cut"))
        .send()
        .await
        .unwrap();
    ev.wait_eof().await;

    // Refuse: the listener is closed, then re-opened.
    c.post(format!("{base}/_emulator/refuse?seconds=1"))
        .send()
        .await
        .unwrap();
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut refused = false;
    let mut back = false;
    for _ in 0..400 {
        match fresh.get(format!("{base}/v1/agent/health")).send().await {
            Err(e) if e.is_connect() => refused = true,
            Ok(r) if r.status() == 200 && refused => {
                back = true;
                break;
            }
            _ => {}
        }
        // Bounded polling interval (the loop is capped at 400 rounds); nothing is timed.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "connections were refused");
    assert!(back, "connections accepted again");
}

#[tokio::test]
async fn duplicate_fault_and_index_rules() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
    let first = register(&c, &base, &job("runner-f")).await;
    let idx = first["Index"].as_u64().unwrap();
    // index=N is inclusive.
    let mut ev = Events::open(&base, &format!("topic=Job:runner-f&index={idx}")).await;
    assert_eq!(ev.next_line().await.unwrap(), json!({}));
    let l = ev.next_line().await.unwrap();
    assert_eq!(l["Index"], idx);
    // Duplicate the next live line (once runner-f has settled, so the fault hits runner-g).
    wait_alloc(&c, &base, "runner-f", |a| a["ClientStatus"] == "running").await;
    c.post(format!("{base}/_emulator/events/duplicate?count=1"))
        .send()
        .await
        .unwrap();
    let mut live = Events::open(&base, "topic=Job:runner-g&index=999999999").await;
    register(&c, &base, &job("runner-g")).await;
    let a = live
        .wait_event("job registered", |e| e["Type"] == "JobRegistered")
        .await;
    let b = live
        .wait_event("duplicate", |e| e["Type"] == "JobRegistered")
        .await;
    assert_eq!(a, b);
}

#[tokio::test]
async fn in_place_meta_update_keeps_the_allocation() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
    register(&c, &base, &job("runner-h")).await;
    let alloc = wait_alloc(&c, &base, "runner-h", |a| a["ClientStatus"] == "running").await;
    // Identical re-register: only an eval.
    let again = register(&c, &base, &job("runner-h")).await;
    let job_before: Value = c
        .get(format!("{base}/v1/job/runner-h"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job_before["Version"], 0);
    assert!(again["EvalCreateIndex"].as_u64() > again["JobModifyIndex"].as_u64());
    // Change the config group's meta: new version, same allocation.
    let mut j = job("runner-h");
    j["Job"]["TaskGroups"][1]["Meta"]["used"] = json!("true");
    register(&c, &base, &j).await;
    let job_after: Value = c
        .get(format!("{base}/v1/job/runner-h"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job_after["Version"], 1);
    let updated = wait_alloc(&c, &base, "runner-h", |a| a["JobVersion"] == 1).await;
    assert_eq!(updated["ID"], alloc["ID"]);
    assert_eq!(updated["ClientStatus"], "running");
}

#[tokio::test]
async fn reorder_fault_swaps_consecutive_lines() {
    let emu = emulator().await;
    let base = emu.url();
    let c = http();
    let mut ev = Events::open(
        &base,
        "topic=Job:runner-i&topic=Evaluation:runner-i&index=999999999",
    )
    .await;
    assert_eq!(ev.next_line().await.unwrap(), json!({}));
    c.post(format!("{base}/_emulator/events/reorder?count=1"))
        .send()
        .await
        .unwrap();
    register(&c, &base, &job("runner-i")).await;
    // Nomad sends the Job line first; the fault delivers the Evaluation line first.
    let mut first = ev.next_line().await.unwrap();
    while first == json!({}) {
        first = ev.next_line().await.unwrap();
    }
    assert_eq!(first["Events"][0]["Topic"], "Evaluation");
    let second = ev
        .wait_event("held job line", |e| e["Topic"] == "Job")
        .await;
    assert_eq!(second["Type"], "JobRegistered");
}

#[tokio::test]
async fn raw_framing_closes_the_connection_instead_of_chunking() {
    let config = nomad_emulator::EmulatorConfig {
        stream_framing: nomad_emulator::StreamFraming::Raw,
        ..nomad_emulator::EmulatorConfig::for_tests()
    };
    let emu = nomad_emulator::Emulator::start(config).await.unwrap();
    let resp = http()
        .get(format!("{}/v1/event/stream?topic=Job", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["connection"], "close");
    assert!(resp.headers().get("transfer-encoding").is_none());
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    let first = tokio::time::timeout(DEADLINE, body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"{}\n");
    emu.cut_event_streams();
    let end = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
    assert!(end.is_ok(), "the body ends at EOF after a cut");
    // Errors before the stream starts are plain HTTP errors.
    let r = http()
        .get(format!("{}/v1/event/stream?topic=a:b:c", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().starts_with("Invalid topic query"));
}
