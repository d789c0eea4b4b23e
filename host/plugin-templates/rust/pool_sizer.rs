//! A Poseidon pool-sizer plugin (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

mod bindings {
    wit_bindgen::generate!({ world: "pool-sizer-plugin", path: "wit" });
}

use bindings::exports::poseidon::plugins::pool_sizer::Guest;
use bindings::poseidon::plugins::types::{Environment, PoolState};

struct Plugin;

impl Guest for Plugin {
    /// Keeps one more idle runner than configured during working hours (local time).
    fn wanted_idle(_environment: Environment, state: PoolState) -> u32 {
        let working = state.local.weekday < 5 && (8..18).contains(&state.local.hour);
        state.configured_size + u32::from(working)
    }
}

bindings::export!(Plugin with_types_in bindings);
