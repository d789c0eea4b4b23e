//! The emulated scheduler: processes evaluations into plans (placements, stops, in-place
//! updates), reschedules failed allocations and replaces allocations of lost nodes
//! (nomad-api.md §5).

use crate::client;
use crate::jobspec;
use crate::json::now_ns;
use crate::state::{Alloc, Eval, Event, Inner, JobRec, Shared, TaskCmd};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// Work to do outside the lock after a plan was committed.
#[derive(Default)]
struct Effects {
    start: Vec<String>,
    stop: Vec<String>,
    lost: Vec<String>,
    evals: Vec<(String, Duration)>,
}

impl Effects {
    fn run(self, shared: &Arc<Shared>) {
        for id in self.start {
            client::start_alloc(shared.clone(), id);
        }
        for id in self.stop {
            client::send(shared, &id, TaskCmd::Stop);
        }
        for id in self.lost {
            client::send(shared, &id, TaskCmd::Lost);
        }
        for (id, delay) in self.evals {
            spawn_eval_after(shared.clone(), id, delay);
        }
    }
}

/// Processes an evaluation after the configured scheduler delay.
pub fn spawn_eval(shared: Arc<Shared>, eval_id: String) {
    let d = shared.config.scheduler_delay;
    spawn_eval_after(shared, eval_id, d);
}

fn spawn_eval_after(shared: Arc<Shared>, eval_id: String, delay: Duration) {
    tokio::spawn(async move {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let effects = {
            let mut inner = shared.lock();
            let effects = process_eval(&shared, &mut inner, &eval_id);
            shared.announce(&inner);
            effects
        };
        effects.run(&shared);
    });
}

fn process_eval(shared: &Shared, inner: &mut Inner, eval_id: &str) -> Effects {
    let Some(eval) = inner.evals.get(eval_id).cloned() else {
        return Effects::default();
    };
    if eval.terminal() || eval.status == "blocked" {
        return Effects::default();
    }
    match eval.triggered_by.as_str() {
        "alloc-failure" => reschedule_failed(shared, inner, eval),
        "alloc-reschedule" => place_reschedules(shared, inner, eval),
        _ => reconcile(shared, inner, eval),
    }
}

fn set_desired_stop(a: &mut Alloc, desc: &str, index: u64) {
    a.desired_status = "stop".into();
    a.desired_description = desc.into();
    a.modify_index = index;
    a.alloc_modify_index = index;
    a.modify_time = now_ns();
}

/// Picks the ready node with the fewest live allocations.
fn pick_node(inner: &Inner, exclude: &str) -> Option<crate::state::Node> {
    inner
        .ready_nodes()
        .into_iter()
        .filter(|n| n.id != exclude)
        .min_by_key(|n| {
            inner
                .allocs
                .values()
                .filter(|a| a.node_id == n.id && !a.terminal())
                .count()
        })
}

/// Why a group cannot be placed, as `AllocMetric` JSON.
fn placement_failure(inner: &Inner, group: &Value) -> Option<Value> {
    let nodes = inner.nodes.len();
    let ready = inner.ready_nodes().len();
    let missing_driver = group["Tasks"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .any(|t| !crate::state::DRIVERS.contains(&t["Driver"].as_str().unwrap_or("")))
        })
        .unwrap_or(false);
    if ready > 0 && !missing_driver {
        return None;
    }
    let mut constraint = Map::new();
    if missing_driver {
        constraint.insert("missing drivers".into(), json!(ready));
    }
    Some(json!({
        "NodesEvaluated": ready, "NodesFiltered": if missing_driver { ready } else { 0 },
        "NodesInPool": nodes, "NodePool": "default", "NodesAvailable": {"dc1": ready},
        "ClassFiltered": null, "ConstraintFiltered": if constraint.is_empty() { Value::Null } else { Value::Object(constraint) },
        "NodesExhausted": 0, "ClassExhausted": null, "DimensionExhausted": null, "QuotaExhausted": null,
        "ResourcesExhausted": null, "Scores": null, "ScoreMetaData": null, "AllocationTime": 12000,
        "CoalescedFailures": 0
    }))
}

/// Creates a new allocation of `group` (not inserted).
fn make_alloc(
    inner: &mut Inner,
    job: &JobRec,
    group: &Value,
    name_index: u64,
    eval_id: &str,
    node: &crate::state::Node,
    index: u64,
) -> Alloc {
    let gname = group["Name"].as_str().unwrap_or("").to_string();
    let oversub = inner.sched.value["MemoryOversubscriptionEnabled"]
        .as_bool()
        .unwrap_or(false);
    let mut tasks = Map::new();
    let mut lifecycles = Map::new();
    for t in group["Tasks"].as_array().cloned().unwrap_or_default() {
        let r = &t["Resources"];
        tasks.insert(
            t["Name"].as_str().unwrap_or("").to_string(),
            json!({"Cpu":{"CpuShares":r["CPU"],"ReservedCores":null},
                   "Memory":{"MemoryMB":r["MemoryMB"],"MemoryMaxMB": if oversub { r["MemoryMaxMB"].clone() } else { json!(0) }},
                   "Networks":null,"Devices":null}),
        );
        lifecycles.insert(t["Name"].as_str().unwrap_or("").to_string(), Value::Null);
    }
    let mut networks = Vec::new();
    let mut ports = Vec::new();
    for n in group["Networks"].as_array().cloned().unwrap_or_default() {
        let mut dyn_ports = Vec::new();
        for p in n["DynamicPorts"].as_array().cloned().unwrap_or_default() {
            let value = inner.next_port;
            inner.next_port = if inner.next_port >= 32000 {
                20000
            } else {
                inner.next_port + 1
            };
            let to = p["To"].as_i64().unwrap_or(0);
            let to = if to == -1 { i64::from(value) } else { to };
            let label = p["Label"].as_str().unwrap_or("").to_string();
            dyn_ports
                .push(json!({"Label": label, "Value": value, "To": to, "HostNetwork": "default"}));
            ports.push(json!({"Label": label, "Value": value, "To": to, "HostIP": "127.0.0.1"}));
        }
        for p in n["ReservedPorts"].as_array().cloned().unwrap_or_default() {
            let label = p["Label"].as_str().unwrap_or("").to_string();
            ports.push(json!({"Label": label, "Value": p["Value"], "To": p["To"].as_i64().unwrap_or(0), "HostIP": "127.0.0.1"}));
        }
        let mut net = json!({"Mode": n["Mode"].as_str().filter(|m| !m.is_empty()).unwrap_or("host"), "IP": "127.0.0.1"});
        if !dyn_ports.is_empty() {
            net["DynamicPorts"] = Value::Array(dyn_ports);
        }
        networks.push(net);
    }
    let mut shared_res = json!({"DiskMB": group["EphemeralDisk"]["SizeMB"]});
    if !networks.is_empty() {
        shared_res["Networks"] = Value::Array(networks);
    }
    if !ports.is_empty() {
        shared_res["Ports"] = Value::Array(ports);
    }
    let now = now_ns();
    Alloc {
        id: uuid::Uuid::new_v4().to_string(),
        namespace: job.value["Namespace"].as_str().unwrap_or("").into(),
        eval_id: eval_id.into(),
        name: format!("{}.{}[{}]", job.id(), gname, name_index),
        name_index,
        node_id: node.id.clone(),
        node_name: node.name.clone(),
        job_id: job.id().into(),
        job: job.value.clone(),
        job_create_index: job.create_index(),
        task_group: gname,
        allocated_resources: json!({"Tasks": tasks, "TaskLifecycles": lifecycles, "Shared": shared_res}),
        desired_status: "run".into(),
        client_status: "pending".into(),
        create_index: index,
        modify_index: index,
        alloc_modify_index: index,
        create_time: now,
        modify_time: now,
        reschedule_tracker: Value::Null,
        ..Alloc::default()
    }
}

/// Commits the plan (if it changed anything) and completes the eval.
#[allow(clippy::too_many_arguments)]
fn commit_plan(
    shared: &Shared,
    inner: &mut Inner,
    mut eval: Eval,
    index: u64,
    changed: Vec<String>,
    failed_tg: Map<String, Value>,
    queued: Map<String, Value>,
    extra_events: Vec<Event>,
) {
    let ns = eval.namespace.clone();
    let job_id = eval.job_id.clone();
    if !changed.is_empty() {
        let mut events = Vec::new();
        eval.modify_index = index;
        eval.modify_time = now_ns();
        inner.evals.insert(eval.id.clone(), eval.clone());
        events.push(eval.event("PlanResult", index));
        events.extend(extra_events);
        for id in &changed {
            if let Some(a) = inner.allocs.get(id) {
                events.push(a.event("PlanResult", index));
            }
        }
        inner.touch("allocs", index);
        inner.refresh_job_status(&ns, &job_id, "PlanResult", index, &mut events);
        shared.publish(inner, crate::state::Batch { index, events });
    }
    // Worker completes the evaluation.
    let index = inner.next_index();
    let mut events = Vec::new();
    if !failed_tg.is_empty() {
        let mut blocked = inner.new_eval(
            &ns,
            &job_id,
            &eval.typ,
            "queued-allocs",
            eval.priority,
            eval.job_modify_index,
            index,
        );
        blocked.status = "blocked".into();
        blocked.previous_eval = eval.id.clone();
        inner.evals.insert(blocked.id.clone(), blocked.clone());
        events.push(blocked.event("EvaluationUpdated", index));
        eval.blocked_eval = blocked.id.clone();
        eval.failed_tg_allocs = Value::Object(failed_tg);
    }
    eval.status = "complete".into();
    eval.queued_allocations = Value::Object(queued);
    eval.modify_index = index;
    eval.modify_time = now_ns();
    inner.evals.insert(eval.id.clone(), eval.clone());
    inner.touch("evals", index);
    events.insert(0, eval.event("EvaluationUpdated", index));
    inner.refresh_job_status(&ns, &job_id, "EvaluationUpdated", index, &mut events);
    shared.publish(inner, crate::state::Batch { index, events });
}

fn reconcile(shared: &Shared, inner: &mut Inner, eval: Eval) -> Effects {
    let mut fx = Effects::default();
    let ns = eval.namespace.clone();
    let key = (ns.clone(), eval.job_id.clone());
    let job = inner.jobs.get(&key).cloned();
    let index = inner.next_index();
    let mut changed = Vec::new();
    let mut failed_tg = Map::new();
    let mut queued = Map::new();
    let job_allocs: Vec<String> = inner
        .allocs
        .values()
        .filter(|a| a.namespace == ns && a.job_id == eval.job_id && a.desired_status == "run")
        .map(|a| a.id.clone())
        .collect();
    match job {
        Some(job) if !job.stopped() => {
            let cidx = job.create_index();
            let groups = job.value["TaskGroups"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for id in &job_allocs {
                let a = &inner.allocs[id];
                let known = groups.iter().any(|g| g["Name"] == a.task_group.as_str());
                if a.job_create_index != cidx || !known {
                    let a = inner.allocs.get_mut(id).unwrap();
                    set_desired_stop(a, "alloc not needed due to job update", index);
                    changed.push(id.clone());
                    if !a.client_terminal() {
                        fx.stop.push(id.clone());
                    }
                }
            }
            for g in &groups {
                let gname = g["Name"].as_str().unwrap_or("");
                let count = g["Count"].as_u64().unwrap_or(0);
                queued.insert(gname.into(), json!(0));
                let mut live: Vec<String> = job_allocs
                    .iter()
                    .filter(|id| {
                        let a = &inner.allocs[*id];
                        a.task_group == gname
                            && a.job_create_index == cidx
                            && a.desired_status == "run"
                    })
                    .cloned()
                    .collect();
                live.sort_by_key(|id| inner.allocs[id].name_index);
                let mut covered = std::collections::BTreeSet::new();
                let mut to_place = Vec::new();
                for id in &live {
                    let a = inner.allocs.get_mut(id).unwrap();
                    if a.name_index >= count {
                        set_desired_stop(a, "alloc not needed due to job update", index);
                        changed.push(id.clone());
                        if !a.client_terminal() {
                            fx.stop.push(id.clone());
                        }
                        continue;
                    }
                    covered.insert(a.name_index);
                    if a.job["Version"] == job.value["Version"] || a.client_terminal() {
                        continue;
                    }
                    if jobspec::group_destructively_changed(&a.job, &job.value, gname) {
                        set_desired_stop(a, "alloc not needed due to job update", index);
                        changed.push(id.clone());
                        fx.stop.push(id.clone());
                        to_place.push(a.name_index);
                    } else {
                        a.job = job.value.clone();
                        a.modify_index = index;
                        a.alloc_modify_index = index;
                        a.modify_time = now_ns();
                        changed.push(id.clone());
                    }
                }
                for i in 0..count {
                    if !covered.contains(&i) {
                        to_place.push(i);
                    }
                }
                if to_place.is_empty() {
                    continue;
                }
                if let Some(metric) = placement_failure(inner, g) {
                    queued.insert(gname.into(), json!(to_place.len()));
                    let mut metric = metric;
                    metric["CoalescedFailures"] = json!(to_place.len() - 1);
                    failed_tg.insert(gname.into(), metric);
                    continue;
                }
                for i in to_place {
                    let Some(node) = pick_node(inner, "") else {
                        break;
                    };
                    let a = make_alloc(inner, &job, g, i, &eval.id, &node, index);
                    changed.push(a.id.clone());
                    fx.start.push(a.id.clone());
                    inner.allocs.insert(a.id.clone(), a);
                }
            }
        }
        _ => {
            for id in &job_allocs {
                let a = inner.allocs.get_mut(id).unwrap();
                if a.client_terminal() {
                    continue;
                }
                set_desired_stop(a, "alloc not needed due to job update", index);
                changed.push(id.clone());
                fx.stop.push(id.clone());
            }
        }
    }
    commit_plan(
        shared,
        inner,
        eval,
        index,
        changed,
        failed_tg,
        queued,
        Vec::new(),
    );
    fx
}

/// Whether the reschedule policy of the alloc's group allows another attempt; returns the delay.
fn reschedule_delay(a: &Alloc) -> Option<i64> {
    let g = jobspec::group(&a.job, &a.task_group)?;
    let p = &g["ReschedulePolicy"];
    let attempts = p["Attempts"].as_i64().unwrap_or(0);
    let interval = p["Interval"].as_i64().unwrap_or(0);
    let unlimited = p["Unlimited"].as_bool().unwrap_or(false);
    let delay = p["Delay"].as_i64().unwrap_or(0);
    let max = p["MaxDelay"].as_i64().unwrap_or(0);
    let now = now_ns();
    let events = a.reschedule_tracker["Events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let recent = events
        .iter()
        .filter(|e| now - e["RescheduleTime"].as_i64().unwrap_or(0) < interval)
        .count() as i64;
    if !unlimited && recent >= attempts {
        return None;
    }
    let n = events.len() as u32;
    let d = match p["DelayFunction"].as_str().unwrap_or("constant") {
        "exponential" => delay.saturating_mul(1i64 << n.min(30)),
        "fibonacci" => {
            let (mut x, mut y) = (delay, delay);
            for _ in 1..n {
                let z = x.saturating_add(y);
                x = y;
                y = z;
            }
            y
        }
        _ => delay,
    };
    Some(if max > 0 { d.min(max) } else { d })
}

/// Whether a failed allocation can still be rescheduled (used by the client when it fails).
pub fn can_reschedule(a: &Alloc) -> bool {
    reschedule_delay(a).is_some()
}

fn reschedule_failed(shared: &Shared, inner: &mut Inner, eval: Eval) -> Effects {
    let mut fx = Effects::default();
    let candidates: Vec<String> = inner
        .allocs
        .values()
        .filter(|a| {
            a.namespace == eval.namespace
                && a.job_id == eval.job_id
                && a.client_status == "failed"
                && a.desired_status == "run"
                && a.next_allocation.is_empty()
                && a.followup_eval_id.is_empty()
        })
        .map(|a| a.id.clone())
        .collect();
    let index = inner.next_index();
    let mut changed = Vec::new();
    let mut extra = Vec::new();
    let mut immediate = Vec::new();
    for id in candidates {
        let Some(delay) = reschedule_delay(&inner.allocs[&id]) else {
            continue;
        };
        if delay <= 0 {
            immediate.push(id);
            continue;
        }
        let mut follow = inner.new_eval(
            &eval.namespace,
            &eval.job_id,
            &eval.typ,
            "alloc-reschedule",
            eval.priority,
            eval.job_modify_index,
            index,
        );
        follow.wait_until = Some(now_ns() + delay);
        follow.previous_eval = eval.id.clone();
        inner.evals.insert(follow.id.clone(), follow.clone());
        extra.push(follow.event("PlanResult", index));
        let a = inner.allocs.get_mut(&id).unwrap();
        a.followup_eval_id = follow.id.clone();
        a.modify_index = index;
        a.alloc_modify_index = index;
        changed.push(id);
        fx.evals
            .push((follow.id, shared.config.policy_delay(delay)));
    }
    if !immediate.is_empty() {
        for id in &immediate {
            if let Some(a) = inner.allocs.get_mut(id) {
                a.followup_eval_id = eval.id.clone();
            }
        }
        let sub = place_reschedules_inner(inner, &eval, index, &mut changed);
        fx.start.extend(sub);
    }
    commit_plan(
        shared,
        inner,
        eval,
        index,
        changed,
        Map::new(),
        Map::new(),
        extra,
    );
    fx
}

fn place_reschedules(shared: &Shared, inner: &mut Inner, eval: Eval) -> Effects {
    let mut fx = Effects::default();
    let index = inner.next_index();
    let mut changed = Vec::new();
    fx.start = place_reschedules_inner(inner, &eval, index, &mut changed);
    commit_plan(
        shared,
        inner,
        eval,
        index,
        changed,
        Map::new(),
        Map::new(),
        Vec::new(),
    );
    fx
}

fn place_reschedules_inner(
    inner: &mut Inner,
    eval: &Eval,
    index: u64,
    changed: &mut Vec<String>,
) -> Vec<String> {
    let mut started = Vec::new();
    let olds: Vec<String> = inner
        .allocs
        .values()
        .filter(|a| a.followup_eval_id == eval.id && a.next_allocation.is_empty())
        .map(|a| a.id.clone())
        .collect();
    for old_id in olds {
        let old = inner.allocs[&old_id].clone();
        let key = (old.namespace.clone(), old.job_id.clone());
        let Some(job) = inner.jobs.get(&key).cloned() else {
            continue;
        };
        if job.stopped() || job.create_index() != old.job_create_index {
            continue;
        }
        let Some(group) = jobspec::group(&job.value, &old.task_group).cloned() else {
            continue;
        };
        let Some(node) = pick_node(inner, "") else {
            continue;
        };
        let delay = reschedule_delay(&old).unwrap_or(0);
        let mut new = make_alloc(inner, &job, &group, old.name_index, &eval.id, &node, index);
        let mut events = old.reschedule_tracker["Events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        events.push(json!({"RescheduleTime": now_ns(), "PrevAllocID": old.id, "PrevNodeID": old.node_id, "Delay": delay}));
        new.reschedule_tracker = json!({"Events": events, "LastReschedule": "ok"});
        new.previous_allocation = old.id.clone();
        let o = inner.allocs.get_mut(&old_id).unwrap();
        set_desired_stop(o, "alloc was rescheduled because it failed", index);
        o.next_allocation = new.id.clone();
        changed.push(old_id.clone());
        changed.push(new.id.clone());
        started.push(new.id.clone());
        inner.allocs.insert(new.id.clone(), new);
    }
    started
}

/// Marks a node as down and replaces its allocations (nomad-api.md §5.5).
pub fn lose_node(shared: &Arc<Shared>, node_id: &str) -> bool {
    let fx = {
        let mut inner = shared.lock();
        let Some(pos) = inner.nodes.iter().position(|n| n.id == node_id) else {
            return false;
        };
        let mut fx = Effects::default();
        // 1. Node goes down.
        let index = inner.next_index();
        inner.nodes[pos].status = "down".into();
        inner.nodes[pos].modify_index = index;
        inner.touch("nodes", index);
        let ev = inner.nodes[pos].event("NodeStreamEvent", index, shared.addr);
        shared.publish(
            &mut inner,
            crate::state::Batch {
                index,
                events: vec![ev],
            },
        );
        // 2. Node evals for every affected job.
        let affected: Vec<String> = inner
            .allocs
            .values()
            .filter(|a| a.node_id == node_id && !a.client_terminal() && a.desired_status == "run")
            .map(|a| a.id.clone())
            .collect();
        let mut jobs: Vec<(String, String)> = affected
            .iter()
            .map(|id| {
                (
                    inner.allocs[id].namespace.clone(),
                    inner.allocs[id].job_id.clone(),
                )
            })
            .collect();
        jobs.sort();
        jobs.dedup();
        let index = inner.next_index();
        let mut evals = Vec::new();
        let mut events = Vec::new();
        for (ns, job) in &jobs {
            let (typ, prio, jmi) = inner
                .jobs
                .get(&(ns.clone(), job.clone()))
                .map(|j| {
                    (
                        j.typ().to_string(),
                        j.value["Priority"].as_i64().unwrap_or(50),
                        j.value["JobModifyIndex"].as_u64().unwrap_or(0),
                    )
                })
                .unwrap_or(("batch".into(), 50, 0));
            let mut e = inner.new_eval(ns, job, &typ, "node-update", prio, jmi, index);
            e.node_id = node_id.to_string();
            inner.evals.insert(e.id.clone(), e.clone());
            events.push(e.event("EvaluationUpdated", index));
            evals.push(e);
        }
        if !events.is_empty() {
            shared.publish(&mut inner, crate::state::Batch { index, events });
        }
        // 3. One plan per eval: lost + replacement.
        for eval in evals {
            let index = inner.next_index();
            let mut changed = Vec::new();
            let mut failed_tg = Map::new();
            let ids: Vec<String> = affected
                .iter()
                .filter(|id| {
                    inner.allocs[*id].job_id == eval.job_id
                        && inner.allocs[*id].namespace == eval.namespace
                })
                .cloned()
                .collect();
            for id in ids {
                let old = inner.allocs[&id].clone();
                let job = inner
                    .jobs
                    .get(&(old.namespace.clone(), old.job_id.clone()))
                    .cloned();
                let group = job
                    .as_ref()
                    .and_then(|j| jobspec::group(&j.value, &old.task_group).cloned());
                let mut next = String::new();
                if let (Some(job), Some(group)) = (job, group) {
                    if !job.stopped() && job.create_index() == old.job_create_index {
                        match pick_node(&inner, node_id) {
                            Some(node) => {
                                let mut new = make_alloc(
                                    &mut inner,
                                    &job,
                                    &group,
                                    old.name_index,
                                    &eval.id,
                                    &node,
                                    index,
                                );
                                new.previous_allocation = old.id.clone();
                                next = new.id.clone();
                                changed.push(new.id.clone());
                                fx.start.push(new.id.clone());
                                inner.allocs.insert(new.id.clone(), new);
                            }
                            None => {
                                if let Some(m) = placement_failure(&inner, &group) {
                                    failed_tg.insert(old.task_group.clone(), m);
                                } else {
                                    failed_tg.insert(
                                        old.task_group.clone(),
                                        json!({"NodesEvaluated":0,"NodesInPool":inner.nodes.len()}),
                                    );
                                }
                            }
                        }
                    }
                }
                let o = inner.allocs.get_mut(&id).unwrap();
                set_desired_stop(o, "alloc is lost since its node is down", index);
                o.client_status = "lost".into();
                o.next_allocation = next;
                for ts in o.task_states.values_mut() {
                    if ts.state != "dead" {
                        ts.state = "dead".into();
                        ts.finished_at = Some(now_ns());
                    }
                }
                changed.push(id.clone());
                fx.lost.push(id);
            }
            commit_plan(
                shared,
                &mut inner,
                eval,
                index,
                changed,
                failed_tg,
                Map::new(),
                Vec::new(),
            );
        }
        shared.announce(&inner);
        fx
    };
    fx.run(shared);
    true
}

/// Brings a node back up and retries blocked evaluations.
pub fn restore_node(shared: &Arc<Shared>, node_id: &str) -> bool {
    let blocked: Vec<String> = {
        let mut inner = shared.lock();
        let Some(pos) = inner.nodes.iter().position(|n| n.id == node_id) else {
            return false;
        };
        let index = inner.next_index();
        inner.nodes[pos].status = "ready".into();
        inner.nodes[pos].modify_index = index;
        inner.touch("nodes", index);
        let ev = inner.nodes[pos].event("NodeStreamEvent", index, shared.addr);
        shared.publish(
            &mut inner,
            crate::state::Batch {
                index,
                events: vec![ev],
            },
        );
        let ids: Vec<String> = inner
            .evals
            .values()
            .filter(|e| e.status == "blocked")
            .map(|e| e.id.clone())
            .collect();
        let index = inner.next_index();
        let mut events = Vec::new();
        for id in &ids {
            let e = inner.evals.get_mut(id).unwrap();
            e.status = "pending".into();
            e.modify_index = index;
            events.push(e.event("EvaluationUpdated", index));
        }
        shared.publish(&mut inner, crate::state::Batch { index, events });
        shared.announce(&inner);
        ids
    };
    for id in blocked {
        spawn_eval(shared.clone(), id);
    }
    true
}
