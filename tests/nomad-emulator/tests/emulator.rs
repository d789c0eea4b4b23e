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
