//! WebAssembly policy plugins for Poseidon (Rust).
//!
//! Plugins are WebAssembly components (see the `poseidon:plugins` WIT package in `wit/`
//! and the `poseidon-plugin-api` crate for authors) of three kinds:
//!
//! - **pool sizers** decide how many idle runners an environment keeps
//!   ([`PluginHost::pool_size`]);
//! - **preprocessors** check and rewrite execute requests and file updates
//!   ([`PluginHost::preprocess_execute`], [`PluginHost::preprocess_files`]);
//! - **authenticators** decide who is calling ([`PluginHost::authenticate`]).
//!
//! # How calls run
//!
//! Each plugin file is compiled once per version (on a blocking thread), checked
//! (it must export one plugin interface of a compatible WIT version, and its imports
//! must be satisfiable by the host) and pre-instantiated. Every call then runs in an
//! instance of its own, in its own `Store`: made ahead of the call by the host's keeper
//! thread where the version has a spare ready (see `spare.rs`), else during the call.
//! Guest code runs inside `block_in_place` (or on the blocking pool), never on the async
//! executor as such, unless `inPlaceBudgetUs` lets a version's short calls run in place.
//! Each call is bounded three ways:
//!
//! 1. an **epoch deadline**: a ticker thread advances the engine's epoch every
//!    `epochTickMs`; after `epochDeadlineTicks` ticks the guest traps;
//! 2. a **wall-clock timeout** (`callTimeoutMs`) around the whole call, waiting for an
//!    admission slot included; on expiry the caller gets its fallback at once and the
//!    guest is stopped at its next epoch check;
//! 3. a **memory limit** (`memoryMb`) per linear memory (a `ResourceLimiter`, and the
//!    pooling allocator's slot size).
//!
//! Optionally `fuel` adds a deterministic instruction budget. At most
//! `maxConcurrentCalls` calls of each plugin entry run at once (a semaphore per entry,
//! taken before instantiation), so a runaway plugin cannot hold up another's calls.
//!
//! A plugin that traps, times out, runs out of memory or answers nonsense never takes
//! the server down; the call falls back per kind:
//!
//! | kind | fallback |
//! |---|---|
//! | pool sizer | `None`: the caller keeps the configured pool size |
//! | preprocessor | reject with a message, or pass through unchanged with `failOpen: true` |
//! | authenticator | deny with HTTP 503 and a message naming the plugin and the failure |
//!
//! # Hot reload
//!
//! The plugin directory is watched (debounced). A changed file is compiled and checked
//! in the background and then swapped in atomically; calls already running finish on
//! the old version. A broken file keeps the old version serving and records the error
//! in the status; a removed file unloads its plugin.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), poseidon_plugin_host::PluginError> {
//! use poseidon_plugin_host::{PluginHost, PluginsConfig};
//! let config: PluginsConfig = PluginsConfig {
//!     directory: "/etc/poseidon/plugins".into(),
//!     ..PluginsConfig::default()
//! };
//! let plugins = PluginHost::start(config).await?;
//! for status in plugins.status() {
//!     println!("{} loaded={} error={:?}", status.name, status.loaded, status.last_error);
//! }
//! # Ok(()) }
//! ```

#[allow(unsafe_code, missing_docs, unused, clippy::all)]
mod bindings;
mod config;
mod convert;
mod decisions;
mod error;
mod host;
mod loader;
mod placement;
mod runtime;
mod spare;
mod telemetry;
mod types;
mod watch;

pub use config::{
    DecisionCacheConfig, Limits, PluginEntry, PluginKind, PluginsConfig, SizerBounds,
};
pub use error::{CallError, PluginError};
pub use host::{check_file, check_file_cached, PluginHost};
pub use poseidon_core::policy::{
    AuthRequest, Denial, ExecutionOutcome, LifecycleEvent, LifecycleKind, Principal,
};
pub use telemetry::CALL_DURATION_METRIC;
pub use types::{
    EnvironmentInfo, ObserverStats, PluginDescription, PluginStatus, PoolSizerInput, PoolStateInfo,
    Rejection,
};
pub use watch::{may_change_content, settled};

/// The newest version of the `poseidon:plugins` WIT package this host implements.
pub const WIT_VERSION: &str = "0.2.0";

/// Every version of the `poseidon:plugins` WIT package this host implements, oldest
/// first; components of all of them load side by side (0.1 components through adapted
/// inputs: no `Poseidon-Token`, no local time). A plugin built for a semver-compatible
/// version is accepted: the same minor version while the package is 0.x, the same
/// major version from 1.0 on.
pub const WIT_VERSIONS: [&str; 2] = ["0.1.0", "0.2.0"];
