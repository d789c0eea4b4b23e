//! Test plugin: a preprocessor that allocates memory without end (for the host's
//! containment tests: the memory limit must stop it).

use poseidon_plugin_api::{export_preprocessor, ExecuteRequest, FileUpdate, Preprocessor};

/// The exported plugin.
pub struct Hog;

fn hog() -> ! {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        // Touch every page so the memory is really used.
        chunks.push(std::hint::black_box(vec![1u8; 1 << 20]));
    }
}

impl Preprocessor for Hog {
    fn preprocess_execute(_request: ExecuteRequest) -> Result<ExecuteRequest, String> {
        hog()
    }

    fn preprocess_files(_update: FileUpdate) -> Result<FileUpdate, String> {
        hog()
    }
}

export_preprocessor!(Hog);
