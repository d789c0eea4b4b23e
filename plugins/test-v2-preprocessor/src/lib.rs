//! Test plugin (WIT 0.2): a preprocessor that sets `WIT_VERSION=0.2` on every execution
//! and passes file updates unchanged.

/// Bindings of the `preprocessor-plugin` world of `poseidon:plugins@0.2.0`.
#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({ world: "preprocessor-plugin", path: "../../wit/v0.2" });
}

use bindings::exports::poseidon::plugins::preprocessor::Guest;
use bindings::poseidon::plugins::types::{ExecuteRequest, FileUpdate};

struct Pre;

impl Guest for Pre {
    fn preprocess_execute(mut request: ExecuteRequest) -> Result<ExecuteRequest, String> {
        request.env.retain(|(k, _)| k != "WIT_VERSION");
        request.env.push(("WIT_VERSION".into(), "0.2".into()));
        Ok(request)
    }

    fn preprocess_files(update: FileUpdate) -> Result<FileUpdate, String> {
        Ok(update)
    }
}

bindings::export!(Pre with_types_in bindings);
