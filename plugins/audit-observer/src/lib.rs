//! Observer (WIT `poseidon:plugins@0.2.0`): writes every runner lifecycle event to the
//! server's log, one line per event, e.g.
//! `runner 29-0f3c… (environment 29, tenant hpi) execution ended: exited 0 after 412 ms`.
//!
//! | key | meaning |
//! |---|---|
//! | `level` | `info` (default) or `debug` |
//!
//! Observers see events after the fact, in batches from a bounded queue; they cannot
//! slow or change a request.

/// Bindings of the `observer-plugin` world of `poseidon:plugins@0.2.0`.
#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({ world: "observer-plugin", path: "../../wit/v0.2" });
}

use bindings::exports::poseidon::plugins::observer::Guest;
use bindings::poseidon::plugins::host;
use bindings::poseidon::plugins::types::{EventKind, ExecutionOutcome, LifecycleEvent};

/// One log line for `event`.
pub fn describe(event: &LifecycleEvent) -> String {
    let r = &event.runner;
    let who = match &r.tenant {
        Some(t) => format!(
            "runner {} (environment {}, tenant {t})",
            r.runner_id, r.environment_id
        ),
        None => format!("runner {} (environment {})", r.runner_id, r.environment_id),
    };
    let what = match &event.kind {
        EventKind::Claimed => "claimed".to_string(),
        EventKind::FilesChanged(f) => format!(
            "files changed: {} written ({} bytes), {} deleted",
            f.copied, f.bytes, f.deleted
        ),
        EventKind::ExecutionStarted(s) => format!("execution started: {:?}", s.command),
        EventKind::ExecutionEnded(e) => {
            let how = match (e.outcome, e.exit_code) {
                (ExecutionOutcome::Exited, Some(code)) => format!("exited {code}"),
                (ExecutionOutcome::Exited, None) => "exited".to_string(),
                (ExecutionOutcome::TimedOut, _) => "timed out".to_string(),
                (ExecutionOutcome::Failed, _) => "failed".to_string(),
                (ExecutionOutcome::Abandoned, _) => "abandoned by the client".to_string(),
            };
            format!("execution ended: {how} after {} ms", e.duration_ms)
        }
        EventKind::Destroyed => "destroyed".to_string(),
    };
    format!("{who} {what}")
}

struct AuditObserver;

impl Guest for AuditObserver {
    fn observe(events: Vec<LifecycleEvent>) {
        let level = match host::config_get("level").as_deref() {
            Some("debug") => host::LogLevel::Debug,
            _ => host::LogLevel::Info,
        };
        for event in &events {
            host::log(level, &describe(event));
        }
    }
}

// Natively (unit tests) there is no component to export from.
#[cfg(target_arch = "wasm32")]
bindings::export!(AuditObserver with_types_in bindings);

#[cfg(test)]
mod tests {
    use super::*;
    use bindings::poseidon::plugins::types::{ExecutionEnded, RunnerRef};

    #[test]
    fn lines_name_runner_tenant_and_outcome() {
        let event = LifecycleEvent {
            at_ms: 0,
            runner: RunnerRef {
                runner_id: "29-a".into(),
                environment_id: 29,
                tenant: Some("hpi".into()),
            },
            kind: EventKind::ExecutionEnded(ExecutionEnded {
                outcome: ExecutionOutcome::Exited,
                exit_code: Some(3),
                duration_ms: 41,
            }),
        };
        assert_eq!(
            describe(&event),
            "runner 29-a (environment 29, tenant hpi) execution ended: exited 3 after 41 ms"
        );
    }
}
