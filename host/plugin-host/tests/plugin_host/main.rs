//! Integration tests of the plugin host against the example and test plugins.
//!
//! Build the plugins first: `plugins/build.sh`.

mod check;
mod common;
mod containment;
mod instances;
mod kinds;
mod measure;
mod reload;
mod versions;
