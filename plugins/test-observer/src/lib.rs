//! Test plugin (WIT 0.2): an observer that traps on every batch (`trapAlways: true`) or
//! on a batch holding an event of runner `trapOnRunner`, and otherwise accepts events.

/// Bindings of the `observer-plugin` world of `poseidon:plugins@0.2.0`.
#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({ world: "observer-plugin", path: "../../wit/v0.2" });
}

use bindings::exports::poseidon::plugins::observer::Guest;
use bindings::poseidon::plugins::host;
use bindings::poseidon::plugins::types::LifecycleEvent;

struct TestObserver;

impl Guest for TestObserver {
    fn observe(events: Vec<LifecycleEvent>) {
        if host::config_get("trapAlways").as_deref() == Some("true") {
            panic!("test-observer traps on every event");
        }
        if let Some(runner) = host::config_get("trapOnRunner") {
            if events.iter().any(|e| e.runner.runner_id == runner) {
                panic!("test-observer saw runner {runner}");
            }
        }
    }
}

bindings::export!(TestObserver with_types_in bindings);
