//! A Poseidon observer plugin (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

mod bindings {
    wit_bindgen::generate!({ world: "observer-plugin", path: "wit" });
}

use bindings::exports::poseidon::plugins::observer::Guest;
use bindings::poseidon::plugins::host;
use bindings::poseidon::plugins::types::LifecycleEvent;

struct Plugin;

impl Guest for Plugin {
    /// Logs how many events arrived.
    fn observe(events: Vec<LifecycleEvent>) {
        host::log(host::LogLevel::Info, &format!("{} events", events.len()));
    }
}

bindings::export!(Plugin with_types_in bindings);
