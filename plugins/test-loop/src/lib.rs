//! Test plugin: a pool sizer whose `wanted-idle` never returns (for the host's
//! containment tests: the epoch deadline or the call timeout must stop it) — except for
//! an environment whose image is `quick`, for which it answers 1 at once (so a test can
//! make one version's calls short first and endless later).

use poseidon_plugin_api::{export_pool_sizer, Environment, PoolSizer, PoolState};

/// The exported plugin.
pub struct Loop;

impl PoolSizer for Loop {
    fn wanted_idle(environment: Environment, state: PoolState) -> u32 {
        if environment.image == "quick" {
            return 1;
        }
        let mut n = state.idle;
        loop {
            // `black_box` keeps the optimiser from reasoning about the loop.
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export_pool_sizer!(Loop);
