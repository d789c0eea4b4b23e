//! A Poseidon preprocessor plugin (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

mod bindings {
    wit_bindgen::generate!({ world: "preprocessor-plugin", path: "wit" });
}

use bindings::exports::poseidon::plugins::preprocessor::Guest;
use bindings::poseidon::plugins::types::{ExecuteRequest, FileUpdate};

struct Plugin;

impl Guest for Plugin {
    /// Refuses privileged executions, passes everything else.
    fn preprocess_execute(request: ExecuteRequest) -> Result<ExecuteRequest, String> {
        if request.privileged {
            return Err("privileged execution is not allowed".into());
        }
        Ok(request)
    }

    /// Passes file updates unchanged.
    fn preprocess_files(update: FileUpdate) -> Result<FileUpdate, String> {
        Ok(update)
    }
}

bindings::export!(Plugin with_types_in bindings);
