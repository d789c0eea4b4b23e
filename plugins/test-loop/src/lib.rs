//! Test plugin: a pool sizer whose `wanted-idle` never returns (for the host's
//! containment tests: the epoch deadline or the call timeout must stop it).

use poseidon_plugin_api::{export_pool_sizer, Environment, PoolSizer, PoolState};

/// The exported plugin.
pub struct Loop;

impl PoolSizer for Loop {
    fn wanted_idle(_environment: Environment, state: PoolState) -> u32 {
        let mut n = state.idle;
        loop {
            // `black_box` keeps the optimiser from reasoning about the loop.
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export_pool_sizer!(Loop);
