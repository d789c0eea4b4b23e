//! Test plugin (WIT 0.2): a pool sizer that answers the UTC offset of the local time it
//! is given, in minutes (330 for Asia/Kolkata), or 1 if `local` disagrees with `now`.

/// Bindings of the `pool-sizer-plugin` world of `poseidon:plugins@0.2.0`.
#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({ world: "pool-sizer-plugin", path: "../../wit/v0.2" });
}

use bindings::exports::poseidon::plugins::pool_sizer::Guest;
use bindings::poseidon::plugins::types::{Environment, PoolState};

struct Sizer;

impl Guest for Sizer {
    fn wanted_idle(_environment: Environment, state: PoolState) -> u32 {
        let l = &state.local;
        // Local minute of the day minus the offset must be the UTC minute of the day.
        let local_minute = i64::from(l.hour) * 60 + i64::from(l.minute);
        let utc_minute = state.now.div_euclid(60).rem_euclid(1440);
        let offset = i64::from(l.utc_offset_seconds) / 60;
        if (local_minute - offset).rem_euclid(1440) != utc_minute || l.time_zone.is_empty() {
            return 1;
        }
        offset.max(0) as u32
    }
}

bindings::export!(Sizer with_types_in bindings);
