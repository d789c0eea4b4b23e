//! Micro-benchmark of handling a large batch of Nomad events with `poseidon-nomad`'s public event
//! tracking (`events::Tracker`, `events::apply`).
//!
//! The stream reader itself (`events::subscribe`) is private, so its per-line work is reproduced
//! here from public pieces, step for step: parse the NDJSON line, skip heartbeats and older
//! indexes, de-duplicate events at the same index by their serialised text, apply each event.
//! The batch is 10,000 allocation events (2,500 runners going pending → running → stop →
//! complete), one event per index as Nomad sends them, with allocation payloads of a realistic
//! size (task states and an embedded job, as Nomad includes).
//!
//! `cargo bench -p poseidon-loadgen --bench nomad_events`

#[path = "../../../host/core/benches/support/mod.rs"]
mod support;

use poseidon_nomad::events::{apply, Tracker};
use serde_json::{json, Value};
use support::Bencher;

const RUNNERS: usize = 2_500;

fn allocation(i: usize, client: &str, desired: &str) -> Value {
    let job = format!("10-{i:08x}-0000-4000-8000-{i:012x}");
    json!({
        "ID": format!("{i:08x}-aaaa-4bbb-8ccc-{i:012x}"),
        "JobID": job,
        "Namespace": "poseidon",
        "TaskGroup": "default-group",
        "NodeID": "5a6b7c8d-0000-4000-8000-000000000001",
        "ClientStatus": client,
        "DesiredStatus": desired,
        "PreviousAllocation": "",
        "NextAllocation": "",
        "TaskStates": {
            "default-task": {
                "State": client,
                "Failed": false,
                "Restarts": 0,
                "Events": [
                    {"Type": "Received", "Time": 1_700_000_000_000_000_000u64, "Details": {}},
                    {"Type": "Task Setup", "Time": 1_700_000_000_100_000_000u64,
                     "Details": {"message": "Building Task Directory"}},
                    {"Type": "Started", "Time": 1_700_000_000_200_000_000u64, "Details": {}},
                ]
            }
        },
        "Job": {
            "ID": job,
            "Name": job,
            "Type": "batch",
            "Priority": 50,
            "Datacenters": ["dc1"],
            "Meta": {"environment": "10", "poseidon-runner": "true"},
            "TaskGroups": [{
                "Name": "default-group",
                "Count": 1,
                "RestartPolicy": {"Attempts": 3, "Interval": 3_600_000_000_000u64,
                                  "Delay": 15_000_000_000u64, "Mode": "fail"},
                "Tasks": [{
                    "Name": "default-task",
                    "Driver": "docker",
                    "Config": {"image": "openhpi/co_execenv_python:3.8",
                               "command": "sleep", "args": ["infinity"],
                               "force_pull": false, "network_mode": "none"},
                    "Resources": {"CPU": 100, "MemoryMB": 256, "MemoryMaxMB": 512},
                    "Env": {"CODEOCEAN": "true"}
                }]
            }]
        },
        "CreateIndex": i as u64,
        "ModifyIndex": i as u64,
        "CreateTime": 1_700_000_000_000_000_000u64,
        "ModifyTime": 1_700_000_000_300_000_000u64
    })
}

/// The batch as NDJSON lines: four events per runner, one per index, interleaved.
fn batch() -> Vec<Vec<u8>> {
    let mut lines = Vec::with_capacity(RUNNERS * 4 + RUNNERS / 100);
    let mut index = 1_000u64;
    for (client, desired) in [
        ("pending", "run"),
        ("running", "run"),
        ("running", "stop"),
        ("complete", "stop"),
    ] {
        for i in 0..RUNNERS {
            index += 1;
            let frame = json!({
                "Index": index,
                "Events": [{
                    "Topic": "Allocation",
                    "Type": "AllocationUpdated",
                    "Key": format!("{i:08x}-aaaa-4bbb-8ccc-{i:012x}"),
                    "Namespace": "poseidon",
                    "Index": index,
                    "Payload": {"Allocation": allocation(i, client, desired)}
                }]
            });
            let mut line = serde_json::to_vec(&frame).expect("serialise");
            line.push(b'\n');
            lines.push(line);
            if i % 100 == 0 {
                lines.push(b"{}\n".to_vec()); // heartbeat
            }
        }
    }
    lines
}

/// What the stream reader does with each line; returns the runners reported lost.
fn handle(lines: &[Vec<u8>]) -> usize {
    let mut tracker = Tracker::default();
    let mut lost = 0;
    for line in lines {
        let v: Value = serde_json::from_slice(line).expect("event line");
        let Some(index) = v["Index"].as_u64() else {
            continue;
        };
        let events = v["Events"].as_array().cloned().unwrap_or_default();
        if index < tracker.last_index {
            continue;
        }
        if index > tracker.last_index {
            tracker.last_index = index;
            tracker.seen_at_last.clear();
        }
        for e in &events {
            if !tracker.seen_at_last.insert(e.to_string()) {
                continue;
            }
            if apply(&mut tracker, e).is_some() {
                lost += 1;
            }
        }
    }
    lost
}

fn main() {
    let b = Bencher::from_args();
    let lines = batch();
    let bytes: usize = lines.iter().map(Vec::len).sum();
    println!(
        "batch: {} lines, {} events, {:.1} MiB, {:.1} KiB per event line",
        lines.len(),
        RUNNERS * 4,
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / 1024.0 / (RUNNERS * 4) as f64
    );
    b.run(
        "nomad events/parse 10,000 event lines",
        Some(bytes as u64),
        || {
            let mut objects = 0;
            for line in &lines {
                let v: Value = serde_json::from_slice(line).expect("line");
                objects += usize::from(v.is_object());
            }
            objects
        },
    );
    let parsed: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter(|v| v["Index"].is_u64())
        .flat_map(|v| v["Events"].as_array().cloned().unwrap_or_default())
        .collect();
    b.run("nomad events/apply 10,000 parsed events", None, || {
        let mut tracker = Tracker::default();
        parsed
            .iter()
            .filter(|e| apply(&mut tracker, e).is_some())
            .count()
    });
    b.run(
        "nomad events/stream handling of 10,000 events (parse, de-duplicate, apply)",
        Some(bytes as u64),
        || {
            // Stopping a running allocation reports its runner as stopped: one per runner.
            assert_eq!(handle(&lines), RUNNERS);
        },
    );
}
