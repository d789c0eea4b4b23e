//! Plain Rust types of the plugin host's public API (no wasmtime types leak out). The
//! types it shares with the API and the core (principal, denial, authentication request,
//! lifecycle events) are core's (`poseidon_core::policy`).

use serde::{Deserialize, Serialize};

use crate::config::PluginKind;

/// An execution environment, as passed to pool sizers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvironmentInfo {
    /// Environment id.
    pub id: i64,
    /// Container image.
    pub image: String,
    /// Configured `prewarmingPoolSize`.
    pub prewarming_pool_size: u32,
    /// CPU limit in MHz.
    pub cpu_limit: u32,
    /// Memory limit in MB.
    pub memory_limit: u32,
    /// Whether runners may use the network.
    pub network_access: bool,
    /// Ports exposed by runners.
    pub exposed_ports: Vec<u16>,
}

/// The state of an environment's idle-runner pool, as passed to pool sizers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PoolStateInfo {
    /// The configured pool size.
    pub configured_size: u32,
    /// Idle runners.
    pub idle: u32,
    /// Claimed runners.
    pub used: u32,
    /// Runners being started.
    pub starting: u32,
    /// Claims per minute over the last hour, oldest first, the last entry being the
    /// current minute. The host pads (with zeros, in front) or trims (the oldest) to
    /// exactly 60 entries before calling the plugin.
    pub claims_per_minute: Vec<u32>,
    /// Claims during the last hour that found the pool empty.
    pub empty_pool_misses: u32,
    /// Current time, seconds since the Unix epoch.
    pub now: i64,
}

/// Input of [`crate::PluginHost::pool_size`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PoolSizerInput {
    /// The environment.
    pub environment: EnvironmentInfo,
    /// Its pool.
    pub pool: PoolStateInfo,
}

/// A request rejected by a preprocessor (or by a failing one, unless `failOpen`):
/// answer with HTTP 400 and `{"message": message}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    /// Name of the plugin that rejected the request.
    pub plugin: String,
    /// Message for the client.
    pub message: String,
}

/// One plugin's state, for `GET /api/v1/plugins` and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginStatus {
    /// Entry name.
    pub name: String,
    /// File name inside the plugin directory.
    pub file: String,
    /// Kind (configured, or detected from the loaded file).
    pub kind: Option<PluginKind>,
    /// Whether a version of the plugin is loaded and serving calls.
    pub loaded: bool,
    /// The loaded version's WIT package version, e.g. `0.1.0`.
    pub wit_version: Option<String>,
    /// SHA-256 of the loaded file, hex.
    pub digest: Option<String>,
    /// When the loaded version was loaded, RFC 3339 (UTC).
    pub loaded_at: Option<String>,
    /// Calls since start (all versions).
    pub calls: u64,
    /// Failed calls since start: traps, timeouts, bad answers, not loaded.
    pub failures: u64,
    /// Requests an authenticator's decision cache answered without a call, since start.
    #[serde(default)]
    pub cached_decisions: u64,
    /// The last load or call error, if any.
    pub last_error: Option<String>,
    /// Whether the loaded version's machine code came from the compile cache rather
    /// than a compilation (`None`: nothing loaded, or no cache in use).
    pub from_cache: Option<bool>,
    /// Whether the loaded version's calls run in place on the calling task (its calls
    /// have been short; see `limits.inPlaceBudgetUs`) rather than off the async workers
    /// (`None`: nothing loaded).
    #[serde(default)]
    pub in_place: Option<bool>,
    /// Whether the loaded version has a spare instance ready for its next call (made
    /// ahead, off the calls' path; `None`: nothing loaded).
    #[serde(default)]
    pub spare_ready: Option<bool>,
    /// Calls since start that ran in a spare instance instead of one made during the call.
    #[serde(default)]
    pub spare_calls: u64,
}

/// What `check_file` learned about a plugin file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginDescription {
    /// Kind, from the exported interface.
    pub kind: PluginKind,
    /// WIT package version of the exported interface.
    pub wit_version: String,
    /// SHA-256 of the file, hex.
    pub digest: String,
    /// File size in bytes.
    pub size: u64,
    /// Names of the component's imports.
    pub imports: Vec<String>,
    /// Names of the component's exports.
    pub exports: Vec<String>,
    /// Time to compile the file, milliseconds.
    pub compile_ms: u64,
    /// Whether the compiled code came from the compile cache (`None`: no cache in use).
    pub from_cache: Option<bool>,
}

/// Counters of the observer queue, for the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObserverStats {
    /// Events accepted into the queue.
    pub queued: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Events delivered to observers (per observer).
    pub delivered: u64,
}
