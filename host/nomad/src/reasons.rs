//! Nomad's own explanations of why an allocation failed or does not start (task events) and why a
//! job could not be placed (allocation metrics), condensed into one line for logs and API errors.

use serde_json::Value;

/// Task event types that explain a failure or a restart (Nomad's `structs.TaskEvent` types).
const FAILURE_EVENTS: &[&str] = &[
    "Driver Failure",
    "Setup Failure",
    "Failed Validation",
    "Failed Artifact Download",
    "Failed Restoring Task",
    "Failed Registering",
    "Task hook failed",
    "Sibling Task Failed",
    "Terminated",
    "Not Restarting",
    "Killed",
    "Alloc Unhealthy",
];

/// Most distinct messages a summary keeps (the newest).
const MAX_MESSAGES: usize = 4;

fn event_text(e: &Value) -> Option<String> {
    let kind = e["Type"].as_str()?;
    let mut text = e["DisplayMessage"]
        .as_str()
        .filter(|m| !m.is_empty())
        .map(String::from)
        .unwrap_or_else(|| {
            [
                "DriverError",
                "SetupError",
                "ValidationError",
                "KillError",
                "Message",
                "RestartReason",
            ]
            .iter()
            .find_map(|k| e[*k].as_str().filter(|m| !m.is_empty()))
            .unwrap_or("")
            .to_string()
        });
    let details = &e["Details"];
    if kind == "Terminated" {
        if details["oom_killed"] == "true" && !text.contains("OOM") {
            text = format!("{text} (OOM killed)");
        }
        if text.is_empty() {
            text = format!(
                "exit code {}",
                details["exit_code"]
                    .as_str()
                    .map(String::from)
                    .or_else(|| e["ExitCode"].as_i64().map(|c| c.to_string()))
                    .unwrap_or_default()
            );
        }
    }
    Some(if text.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {}", text.trim())
    })
}

/// The failure messages of an allocation's task events, oldest first, repeated ones counted
/// (`Driver Failure: Failed to pull ... (3 times)`); `None` when the events explain nothing.
pub fn allocation_failure(alloc: &Value) -> Option<String> {
    let mut messages: Vec<(String, usize)> = Vec::new();
    for state in alloc["TaskStates"].as_object().into_iter().flatten() {
        for e in state.1["Events"].as_array().into_iter().flatten() {
            let kind = e["Type"].as_str().unwrap_or("");
            let fails = e["FailsTask"] == true;
            if !fails && !FAILURE_EVENTS.contains(&kind) {
                continue;
            }
            // A `Terminated` with exit code 0 and no OOM is an ordinary end.
            if kind == "Terminated"
                && e["Details"]["exit_code"].as_str().unwrap_or("0") == "0"
                && e["Details"]["oom_killed"] != "true"
                && e["Details"]["signal"].as_str().unwrap_or("0") == "0"
            {
                continue;
            }
            let Some(text) = event_text(e) else { continue };
            match messages.iter_mut().find(|(m, _)| *m == text) {
                Some((_, n)) => *n += 1,
                None => messages.push((text, 1)),
            }
        }
    }
    if messages.is_empty() {
        return None;
    }
    let start = messages.len().saturating_sub(MAX_MESSAGES);
    Some(
        messages[start..]
            .iter()
            .map(|(m, n)| {
                if *n > 1 {
                    format!("{m} ({n} times)")
                } else {
                    m.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// What an allocation that has not started yet is doing: its newest task event
/// (`Driver: Downloading image`, `Restarting: Task restarting in 16s`), plus any failures so far.
pub fn allocation_progress(alloc: &Value) -> Option<String> {
    let newest = alloc["TaskStates"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, s)| s["Events"].as_array()?.last())
        .max_by_key(|e| e["Time"].as_i64().unwrap_or(0))
        .and_then(event_text);
    match (newest, allocation_failure(alloc)) {
        (Some(n), Some(f)) if !f.contains(&n) => Some(format!("{n}; earlier: {f}")),
        (_, Some(f)) => Some(f),
        (n, None) => n,
    }
}

/// Why the scheduler could not place a task group, from its `AllocMetric`
/// (`FailedTGAllocs[group]`): filtered constraints, exhausted dimensions (memory, cpu, ports).
pub fn placement_failure(metric: &Value) -> String {
    let mut parts = Vec::new();
    let evaluated = metric["NodesEvaluated"].as_u64().unwrap_or(0);
    if evaluated == 0 {
        parts.push("no node is eligible (none in the job's datacenters and node pool)".to_string());
    }
    for (key, what) in [
        ("ConstraintFiltered", "filtered by"),
        ("ClassFiltered", "class filtered"),
        ("DimensionExhausted", "exhausted"),
        ("ClassExhausted", "class exhausted"),
        ("QuotaExhausted", "quota exhausted"),
    ] {
        match &metric[key] {
            Value::Object(m) => {
                for (reason, n) in m {
                    parts.push(format!("{what} {reason} on {n} node(s)"));
                }
            }
            Value::Array(list) => {
                for reason in list.iter().filter_map(Value::as_str) {
                    parts.push(format!("{what} {reason}"));
                }
            }
            _ => {}
        }
    }
    if parts.is_empty() {
        format!("{evaluated} node(s) evaluated, none could take it")
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_image_pull_failure_is_named_once_with_its_count() {
        let pull = json!({"Type": "Driver Failure", "DisplayMessage": "Failed to pull `x:1`: not found", "FailsTask": false});
        let alloc = json!({"TaskStates": {"default-task": {"Events": [
            {"Type": "Received", "DisplayMessage": "Task received by client"},
            pull, {"Type": "Restarting", "DisplayMessage": "Task restarting in 16s"}, pull,
            {"Type": "Not Restarting", "DisplayMessage": "Exceeded allowed attempts 3 in interval 1h0m0s and mode is \"fail\""}
        ]}}});
        assert_eq!(
            allocation_failure(&alloc).unwrap(),
            "Driver Failure: Failed to pull `x:1`: not found (2 times); Not Restarting: Exceeded allowed attempts 3 in interval 1h0m0s and mode is \"fail\""
        );
        assert!(allocation_progress(&alloc)
            .unwrap()
            .starts_with("Driver Failure"));
    }

    #[test]
    fn an_oom_kill_and_an_ordinary_end_are_told_apart() {
        let alloc = json!({"TaskStates": {"t": {"Events": [
            {"Type": "Terminated", "DisplayMessage": "Exit Code: 0", "Details": {"exit_code": "0"}},
            {"Type": "Terminated", "DisplayMessage": "Exit Code: 137", "Details": {"exit_code": "137", "oom_killed": "true"}}
        ]}}});
        assert_eq!(
            allocation_failure(&alloc).unwrap(),
            "Terminated: Exit Code: 137 (OOM killed)"
        );
        assert_eq!(allocation_failure(&json!({})), None);
    }

    #[test]
    fn placement_failures_name_the_exhausted_dimension() {
        let metric = json!({"NodesEvaluated": 1, "DimensionExhausted": {"network: reserved port collision static=8080": 1},
                            "ConstraintFiltered": null});
        assert_eq!(
            placement_failure(&metric),
            "exhausted network: reserved port collision static=8080 on 1 node(s)"
        );
        assert!(placement_failure(&json!({"NodesEvaluated": 0})).contains("no node"));
    }
}
