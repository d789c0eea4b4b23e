//! Poseidon's InfluxDB measurements of the Nomad backend, recorded through
//! `poseidon_core::monitoring`: `poseidon_nomad_events` (every event received, its payload as
//! JSON), and `poseidon_nomad_allocations` / `poseidon_nomad_jobs` (the allocation tracking:
//! an allocation tracked, its client status changed, or forgotten). The tracking itself
//! (`events.rs`) does not know about them: its changes are found by comparing the tracked
//! state of the allocations an event concerns before and after it is applied.

use std::collections::HashMap;

use poseidon_core::monitoring::{self, Field, Point};
use serde_json::Value;

use crate::events::{Tracked, Tracker};

/// Applies `event` with `apply`, recording the event and the tracking changes it caused.
pub fn applied<R>(
    tracker: &mut Tracker,
    event: &Value,
    apply: impl FnOnce(&mut Tracker, &Value) -> R,
) -> R {
    if !monitoring::enabled() {
        return apply(tracker, event);
    }
    monitoring::record(|| Point {
        measurement: "poseidon_nomad_events",
        tags: vec![
            ("topic", text(&event["Topic"])),
            ("type", text(&event["Type"])),
            ("key", text(&event["Key"])),
            ("timestamp", time_of_day()),
        ],
        fields: vec![("payload", Field::Text(event["Payload"].to_string()))],
    });
    let alloc = &event["Payload"]["Allocation"];
    let mut concerned: Vec<String> = [&alloc["ID"], &alloc["PreviousAllocation"]]
        .iter()
        .filter_map(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if event["Topic"] == "Job" {
        if let Some(job) = event["Key"].as_str() {
            concerned.extend(
                tracker
                    .allocs
                    .iter()
                    .filter(|(_, t)| t.job == job)
                    .map(|(id, _)| id.clone()),
            );
        }
    }
    let before = snapshot_of(tracker, concerned.iter().map(String::as_str));
    let result = apply(tracker, event);
    let node = text(&alloc["NodeName"]);
    changes(&before, tracker, |_| node.clone());
    result
}

/// Starts tracking an allocation (`Tracker::seed`), recording it.
pub fn seeded(tracker: &mut Tracker, alloc: &Value) {
    let id = text(&alloc["ID"]);
    let before = snapshot_of(tracker, std::iter::once(id.as_str()));
    tracker.seed(alloc);
    if monitoring::enabled() {
        changes(&before, tracker, |_| text(&alloc["NodeName"]));
    }
}

/// Forgets a job's allocations (`Tracker::forget_job`), recording them.
pub fn job_forgotten(tracker: &mut Tracker, job: &str) {
    let before = if monitoring::enabled() {
        let ids = tracker.allocs.iter().filter(|(_, t)| t.job == job);
        snapshot_of(tracker, ids.map(|(id, _)| id.as_str()))
    } else {
        HashMap::new()
    };
    tracker.forget_job(job);
    changes(&before, tracker, |_| String::new());
}

/// The tracked state of every allocation, for [`resynced`] (empty without a sink).
pub fn snapshot(tracker: &Tracker) -> HashMap<String, Option<Tracked>> {
    if !monitoring::enabled() {
        return HashMap::new();
    }
    snapshot_of(tracker, tracker.allocs.keys().map(String::as_str))
}

/// Records what a resynchronisation changed: allocations forgotten and newly tracked.
pub fn resynced(before: &HashMap<String, Option<Tracked>>, tracker: &Tracker, list: &[Value]) {
    if !monitoring::enabled() {
        return;
    }
    let mut all = before.clone();
    for id in tracker.allocs.keys() {
        all.entry(id.clone()).or_insert(None);
    }
    let nodes: HashMap<&str, String> = list
        .iter()
        .filter_map(|a| Some((a["ID"].as_str()?, text(&a["NodeName"]))))
        .collect();
    changes(&all, tracker, |id| {
        nodes.get(id).cloned().unwrap_or_default()
    });
}

fn snapshot_of<'a>(
    tracker: &Tracker,
    ids: impl Iterator<Item = &'a str>,
) -> HashMap<String, Option<Tracked>> {
    ids.map(|id| (id.to_string(), tracker.allocs.get(id).cloned()))
        .collect()
}

/// Points for every allocation of `before` whose tracked state differs now.
fn changes(
    before: &HashMap<String, Option<Tracked>>,
    tracker: &Tracker,
    node: impl Fn(&str) -> String,
) {
    let count = tracker.allocs.len();
    for (id, was) in before {
        let now = tracker.allocs.get(id);
        let (created, state) = match (was, now) {
            (None, Some(now)) => (true, now),
            (Some(was), Some(now)) if was.client != now.client => (true, now),
            (Some(was), None) => (false, was),
            _ => continue,
        };
        monitoring::storage_change("poseidon_nomad_allocations", id, created, count, || {
            vec![
                ("job_id", state.job.clone()),
                ("client_status", state.client.clone()),
                ("nomad_agent", node(id)),
            ]
        });
        if was.is_none() || now.is_none() {
            monitoring::storage_change("poseidon_nomad_jobs", &state.job, created, count, || {
                vec![("allocation_id", id.clone())]
            });
        }
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

/// The time of day (UTC) with nanoseconds, `HH:MM:SS.nnnnnnnnn`: the `timestamp` tag.
fn time_of_day() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:09}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_nanos()
    )
}
