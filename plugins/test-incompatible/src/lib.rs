//! Test plugin: exports `poseidon:plugins/pool-sizer@1.0.0`, a version the 0.1 host
//! must refuse with a message naming the versions it accepts.

wit_bindgen::generate!({ world: "pool-sizer-plugin", path: "wit" });

struct Sizer;

impl exports::poseidon::plugins::pool_sizer::Guest for Sizer {
    fn wanted_idle(_environment_id: i64) -> u32 {
        1
    }
}

export!(Sizer);
