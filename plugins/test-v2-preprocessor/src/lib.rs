//! Test plugin (WIT 0.2): a preprocessor that sets `WIT_VERSION=0.2` on every execution,
//! and `CALLS_IN_INSTANCE` to the number of calls its instance has served (always 1 where
//! every call gets a fresh instance); it passes file updates unchanged. An execution of the
//! command `loop-forever` never returns (a runaway plugin: its deadline must stop it).

/// Bindings of the `preprocessor-plugin` world of `poseidon:plugins@0.2.0`.
#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({ world: "preprocessor-plugin", path: "../../wit/v0.2" });
}

use std::sync::atomic::{AtomicU32, Ordering};

use bindings::exports::poseidon::plugins::preprocessor::Guest;
use bindings::poseidon::plugins::types::{ExecuteRequest, FileUpdate};

/// Calls this instance has served.
static CALLS: AtomicU32 = AtomicU32::new(0);

struct Pre;

impl Guest for Pre {
    fn preprocess_execute(mut request: ExecuteRequest) -> Result<ExecuteRequest, String> {
        if request.command == "loop-forever" {
            let mut n = 0u64;
            loop {
                // `black_box` keeps the optimiser from reasoning about the loop.
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        request
            .env
            .retain(|(k, _)| k != "WIT_VERSION" && k != "CALLS_IN_INSTANCE");
        request.env.push(("WIT_VERSION".into(), "0.2".into()));
        request
            .env
            .push(("CALLS_IN_INSTANCE".into(), calls.to_string()));
        Ok(request)
    }

    fn preprocess_files(update: FileUpdate) -> Result<FileUpdate, String> {
        Ok(update)
    }
}

bindings::export!(Pre with_types_in bindings);
