//! Event stream handling (poseidon-behavior.md §6.4, §6.6): NDJSON lines, heartbeats, index
//! following with de-duplication, allocation tracking, reconnect with backoff and state rebuild.

use futures::StreamExt;
use poseidon_core::backend::{BackendEvent, LostReason};
use poseidon_core::RunnerId;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::Shared;
use crate::jobs::DEFAULT_TASK;

/// Nomad sends `{}` at least every 30 s; three missed heartbeats end the subscription.
const IDLE_LIMIT: Duration = Duration::from_secs(90);
/// First and maximum reconnect delay.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// What is known about one allocation of a runner job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// Client status.
    pub client: String,
    /// Desired status.
    pub desired: String,
    /// Job (= runner id).
    pub job: String,
    /// `ModifyIndex` of the state seen last: older events are stale and ignored.
    pub modify_index: u64,
}

/// Allocation tracking and the stream position.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Allocation id → state.
    pub allocs: HashMap<String, Tracked>,
    /// Highest index processed.
    pub last_index: u64,
    /// Events (serialised) already processed at `last_index`: the resume index is inclusive
    /// and Nomad may deliver an event twice.
    pub seen_at_last: HashSet<String>,
    /// Failed or lost allocations whose replacement is on its way.
    pub replaced: HashSet<String>,
}

impl Tracker {
    /// Starts tracking an allocation (from a listing).
    pub fn seed(&mut self, alloc: &Value) {
        let (Some(id), Some(job)) = (alloc["ID"].as_str(), alloc["JobID"].as_str()) else {
            return;
        };
        if job.starts_with("template-") {
            return;
        }
        let client = alloc["ClientStatus"].as_str().unwrap_or("").to_string();
        let desired = alloc["DesiredStatus"].as_str().unwrap_or("").to_string();
        if desired == "run" && (client == "pending" || client == "running") {
            let modify_index = alloc["ModifyIndex"].as_u64().unwrap_or(0);
            self.allocs.insert(
                id.to_string(),
                Tracked {
                    client,
                    desired,
                    job: job.to_string(),
                    modify_index,
                },
            );
        }
    }

    /// Forgets every allocation of a job.
    pub fn forget_job(&mut self, job: &str) {
        self.allocs.retain(|_, t| t.job != job);
    }
}

fn oom_killed(alloc: &Value) -> bool {
    alloc["TaskStates"][DEFAULT_TASK]["Events"]
        .as_array()
        .and_then(|evs| evs.iter().rev().find(|e| e["Type"] == "Terminated"))
        .map(|e| e["Details"]["oom_killed"] == "true")
        .unwrap_or(false)
}

/// `what`, with Nomad's explanation from the allocation's task events when it has one.
fn with_reason(what: &str, alloc: &Value) -> String {
    match crate::reasons::allocation_failure(alloc) {
        Some(why) => format!("{what}: {why}"),
        None => what.to_string(),
    }
}

/// Applies one event; returns the runner that was lost, if any.
pub fn apply(tracker: &mut Tracker, event: &Value) -> Option<(String, LostReason)> {
    metrics::counter!("poseidon_nomad_events_total",
        "topic" => event["Topic"].as_str().unwrap_or("").to_string(),
        "type" => event["Type"].as_str().unwrap_or("").to_string())
    .increment(1);
    match event["Topic"].as_str()? {
        "Job" => {
            let job = event["Key"].as_str()?;
            if event["Type"] == "JobDeregistered" && tracker.allocs.values().any(|t| t.job == job) {
                tracker.forget_job(job);
                return Some((job.to_string(), LostReason::Stopped));
            }
            None
        }
        "Allocation" => {
            let a = &event["Payload"]["Allocation"];
            let id = a["ID"].as_str()?.to_string();
            let job = a["JobID"].as_str()?.to_string();
            if job.starts_with("template-") {
                return None;
            }
            let client = a["ClientStatus"].as_str().unwrap_or("").to_string();
            let desired = a["DesiredStatus"].as_str().unwrap_or("").to_string();
            let modify_index = a["ModifyIndex"].as_u64().unwrap_or(0);
            let prev = tracker.allocs.get(&id).cloned();
            if let Some(p) = &prev {
                if p.client == client && p.desired == desired {
                    return None; // duplicate or in-place update
                }
                if modify_index != 0 && modify_index <= p.modify_index {
                    return None; // older than what a listing already showed: stale, out of order
                }
            }
            let track = |t: &mut Tracker| {
                t.allocs.insert(
                    id.clone(),
                    Tracked {
                        client: client.clone(),
                        desired: desired.clone(),
                        job: job.clone(),
                        modify_index,
                    },
                )
            };
            match (client.as_str(), desired.as_str()) {
                ("pending", "run") => {
                    if let Some(p) = prev {
                        track(tracker);
                        if p.client == "running" {
                            tracing::info!(
                                runner = %job,
                                reason = %crate::reasons::allocation_failure(a).unwrap_or_default(),
                                "Nomad restarts the runner's task"
                            );
                            let reason = if oom_killed(a) {
                                LostReason::OomKilled
                            } else {
                                LostReason::Restarted
                            };
                            return Some((job, reason));
                        }
                        return None;
                    }
                    let previous = a["PreviousAllocation"].as_str().unwrap_or("");
                    let rescheduled = !previous.is_empty()
                        && (tracker.allocs.remove(previous).is_some()
                            || tracker.replaced.remove(previous));
                    track(tracker);
                    if rescheduled {
                        return Some((job, LostReason::Restarted));
                    }
                    None
                }
                ("running", "run") => {
                    track(tracker);
                    None
                }
                (_, "stop") | (_, "evict") if client == "pending" || client == "running" => {
                    tracker.allocs.remove(&id);
                    prev.filter(|p| p.client == "running")
                        .map(|_| (job, LostReason::Stopped))
                }
                ("complete", _) => {
                    tracker.allocs.remove(&id);
                    prev.filter(|p| p.desired == "run").map(|_| {
                        (
                            job,
                            LostReason::Other(with_reason("the runner's main process exited", a)),
                        )
                    })
                }
                ("failed", _) | ("lost", _) => {
                    tracker.allocs.remove(&id);
                    prev.as_ref()?;
                    if a["NextAllocation"].as_str().is_some_and(|n| !n.is_empty()) {
                        // The replacement's pending event reports the loss.
                        tracker.replaced.insert(id);
                        return None;
                    }
                    Some((
                        job,
                        LostReason::Other(with_reason("the runner stopped unexpectedly", a)),
                    ))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Takes the host ports of a runner's running allocation (a rescheduled runner has new ones).
fn refresh_ports(shared: &Shared, event: &Value) {
    let a = &event["Payload"]["Allocation"];
    if event["Topic"] != "Allocation" || a["ClientStatus"] != "running" {
        return;
    }
    let (Some(job), Some(_)) = (
        a["JobID"].as_str(),
        a["AllocatedResources"]["Shared"]["Ports"].as_array(),
    ) else {
        return;
    };
    if let Some(ports) = shared.ports.lock().unwrap().get_mut(job) {
        let fresh = crate::runner::ports_of(a);
        if *ports != fresh {
            tracing::info!(runner = %job, ports = ?fresh, "the runner's mapped ports changed");
            *ports = fresh;
        }
    }
}

/// Re-reads `GET /v1/allocations` after (re)connecting: allocations that disappeared are
/// lost, new ones are tracked; known ones keep their state so that the replayed events
/// (resuming at the last processed index) are applied to it. Returns the lost runners and
/// the index to resume from.
async fn resync(shared: &Shared) -> Result<(Vec<String>, u64), crate::api::NomadError> {
    let (list, index) = shared.client.allocations().await?;
    let mut fresh = Tracker::default();
    for a in &list {
        fresh.seed(a);
    }
    let present: HashSet<&str> = list.iter().filter_map(|a| a["ID"].as_str()).collect();
    let mut t = shared.tracker.lock().unwrap();
    let before = crate::monitoring::snapshot(&t);
    let live_jobs: HashSet<String> = fresh.allocs.values().map(|x| x.job.clone()).collect();
    let mut lost = Vec::new();
    t.allocs.retain(|id, x| {
        let keep = present.contains(id.as_str());
        if !keep && !live_jobs.contains(&x.job) {
            lost.push(x.job.clone());
        }
        keep
    });
    for (id, x) in fresh.allocs {
        t.allocs.entry(id).or_insert(x);
    }
    crate::monitoring::resynced(&before, &t, &list);
    lost.sort();
    lost.dedup();
    let resume = if t.last_index > 0 {
        t.last_index
    } else {
        index + 1
    };
    Ok((lost, resume))
}

async fn report(
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<BackendEvent>,
    job: String,
    reason: LostReason,
) {
    if shared.is_destroyed(&job) {
        return;
    }
    if reason == LostReason::Restarted {
        // Restarted or rescheduled: the job lives on with a fresh allocation (Poseidon's docs
        // promise this; its code purged restarted runners, §8.33).
        tracing::info!(runner = %job, "runner restarted");
        let _ = tx
            .send(BackendEvent::RunnerRestarted {
                runner: RunnerId::from_raw(job),
            })
            .await;
        return;
    }
    tracing::info!(runner = %job, ?reason, "runner lost");
    shared.ports.lock().unwrap().remove(&job);
    let _ = tx
        .send(BackendEvent::RunnerLost {
            runner: RunnerId::from_raw(job.clone()),
            reason,
        })
        .await;
    // The runner's files are gone; purge its job so nothing is left running (like Poseidon for
    // unexpected stops).
    shared.mark_destroyed(&job);
    shared.client.retire_eventually(&job);
}

/// One subscription: returns when the stream ends or fails.
async fn subscribe(
    shared: &Arc<Shared>,
    tx: &mpsc::Sender<BackendEvent>,
    index: u64,
    stop: &CancellationToken,
) -> Result<bool, String> {
    let resp = shared
        .client
        .event_stream(index)
        .await
        .map_err(|e| e.to_string())?;
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut got_line = false;
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => return Ok(got_line),
            c = tokio::time::timeout(IDLE_LIMIT, body.next()) => c,
        };
        let chunk = match chunk {
            Err(_) => return Err("no heartbeat from Nomad".into()),
            Ok(None) => {
                return if got_line {
                    Ok(true)
                } else {
                    Err("the event stream ended before its first line".into())
                }
            }
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(c))) => c,
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            got_line = true;
            let v: Value =
                serde_json::from_slice(&line).map_err(|e| format!("bad event line: {e}"))?;
            let Some(idx) = v["Index"].as_u64() else {
                continue;
            }; // heartbeat
            let events = v["Events"].as_array().cloned().unwrap_or_default();
            let mut lost = Vec::new();
            {
                let mut t = shared.tracker.lock().unwrap();
                if idx < t.last_index {
                    continue; // replayed or reordered older batch
                }
                if idx > t.last_index {
                    t.last_index = idx;
                    t.seen_at_last.clear();
                }
                for e in &events {
                    if !t.seen_at_last.insert(e.to_string()) {
                        continue; // duplicate delivery
                    }
                    refresh_ports(shared, e);
                    if let Some(l) = crate::monitoring::applied(&mut t, e, apply) {
                        lost.push(l);
                    }
                }
            }
            for (job, reason) in lost {
                report(shared, tx, job, reason).await;
            }
        }
    }
}

/// Runs the subscription loop until `stop` is cancelled or the receiver is gone.
pub async fn run(shared: Arc<Shared>, tx: mpsc::Sender<BackendEvent>, stop: CancellationToken) {
    let mut delay = BACKOFF.0;
    let mut first = true;
    for _ in 0..u64::MAX {
        if stop.is_cancelled() || tx.is_closed() {
            return;
        }
        match resync(&shared).await {
            Ok((lost, index)) => {
                for job in lost {
                    report(
                        &shared,
                        &tx,
                        job,
                        LostReason::Other(
                            "the runner was lost while Nomad's event stream was down".into(),
                        ),
                    )
                    .await;
                }
                if !first {
                    metrics::counter!("poseidon_nomad_event_stream_reconnects_total").increment(1);
                    let _ = tx.send(BackendEvent::EnvironmentsChanged).await;
                }
                first = false;
                match subscribe(&shared, &tx, index, &stop).await {
                    Ok(true) => delay = BACKOFF.0,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "Nomad event stream failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot resynchronise with Nomad"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(BACKOFF.1);
    }
}
