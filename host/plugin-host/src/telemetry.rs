//! Plugin calls in the process's `metrics` recorder (Prometheus `/metrics` when the server
//! installed one; without a recorder these are no-ops): calls and their duration per plugin,
//! failures per plugin and reason; rescans of the plugin files.

use std::time::Duration;

use crate::error::CallError;

/// The histogram of plugin call durations (seconds, label `plugin`); the server gives it
/// buckets of its own.
pub const CALL_DURATION_METRIC: &str = "poseidon_plugin_call_duration_seconds";

/// Records one rescan of the plugin files (`poseidon_plugin_rescans_total`: at start, after
/// file events, on [`crate::PluginHost::reload`] and [`crate::PluginHost::reconfigure`]).
pub(crate) fn rescan() {
    metrics::counter!("poseidon_plugin_rescans_total").increment(1);
}

/// Records one finished call of `plugin` (whatever its outcome).
pub(crate) fn call(plugin: &str, duration: Duration) {
    metrics::counter!("poseidon_plugin_calls_total", "plugin" => plugin.to_string()).increment(1);
    metrics::histogram!(CALL_DURATION_METRIC, "plugin" => plugin.to_string()).record(duration);
}

/// Records one request `plugin`'s decision cache answered without a call.
pub(crate) fn cached_decision(plugin: &str) {
    metrics::counter!("poseidon_plugin_cached_decisions_total", "plugin" => plugin.to_string())
        .increment(1);
}

/// Records one failed call of `plugin`, by reason.
pub(crate) fn failure(plugin: &str, error: &CallError) {
    metrics::counter!("poseidon_plugin_call_failures_total",
        "plugin" => plugin.to_string(), "reason" => reason(error))
    .increment(1);
}

/// The `reason` label: `trap`, `timeout` (wall clock or epoch deadline), `fuel`, `memory`,
/// `instantiate`, `bad_answer`, `not_loaded`, `host`.
fn reason(error: &CallError) -> &'static str {
    match error {
        CallError::NotLoaded => "not_loaded",
        CallError::Timeout(_) | CallError::Deadline(_) => "timeout",
        CallError::OutOfFuel(_) => "fuel",
        CallError::Memory(_) => "memory",
        CallError::Trap(_) => "trap",
        CallError::Instantiate(_) => "instantiate",
        CallError::BadAnswer(_) => "bad_answer",
        CallError::Host(_) => "host",
    }
}
