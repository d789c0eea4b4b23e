//! The `plugins:` section of `configuration.yaml`.
//!
//! ```yaml
//! plugins:
//!   directory: /etc/poseidon/plugins
//!   entries:
//!     - name: lecture-times          # default: the file name without `.wasm`
//!       file: timetable_sizer.wasm   # relative to `directory`
//!       kind: pool-sizer             # optional: detected from the component's exports
//!       environments: [10, 11]       # optional: default all environments
//!       config:                      # the plugin's own values (scalars)
//!         slots: "mon-fri 08:00-10:00 = 20"
//!     - file: submission_guard.wasm
//!       failOpen: false              # preprocessors only: on failure, let the request through?
//!       config: { maxFiles: 200 }
//!   limits:
//!     callTimeoutMs: 500             # wall clock per call, waiting for a free slot included
//!     epochTickMs: 10                # epoch ticker period
//!     epochDeadlineTicks: 10         # guest run time per call, in ticks
//!     fuel: null                     # optional instruction budget per call
//!     memoryMb: 64                   # per linear memory
//!     maxConcurrentCalls: 16         # admission limit of each plugin entry
//!     pooling: true                  # pooling allocator (falls back to on-demand)
//!   sizer: { min: 0, max: 100, hysteresis: 1 }
//!   watch: true                      # hot reload on file changes
//!   debounceMs: 100
//! ```
//!
//! Keys are camelCase; the all-lowercase spelling (`calltimeoutms`) is accepted too.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

/// The `plugins:` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PluginsConfig {
    /// Directory holding the plugin files; it is watched for changes.
    pub directory: PathBuf,
    /// The plugins to load, in order. For preprocessors the order is the chain order;
    /// for sizers and authenticators the first matching loaded entry is used.
    #[serde(alias = "plugins")]
    pub entries: Vec<PluginEntry>,
    /// Bounds applied to every plugin call.
    pub limits: Limits,
    /// Bounds and damping applied to pool sizer answers.
    pub sizer: SizerBounds,
    /// Reload plugin files when they change.
    pub watch: bool,
    /// Quiet period after a file change before it is reloaded, in milliseconds.
    #[serde(alias = "debouncems")]
    pub debounce_ms: u64,
    /// Lifecycle events waiting for the observers at most; an event that finds the
    /// queue full is dropped and counted, so observers never slow a request.
    #[serde(alias = "observerqueue")]
    pub observer_queue: usize,
    /// Most events handed to an observer in one call.
    #[serde(alias = "observerbatch")]
    pub observer_batch: usize,
    /// Keep compiled plugins in wasmtime's compile cache, so that a restart (or a file
    /// that comes back) does not compile them again.
    #[serde(alias = "compilecache")]
    pub compile_cache: bool,
    /// Directory of the compile cache (absolute; a relative path is taken relative to
    /// the working directory). `None`: the embedding application decides (the server
    /// uses `plugin-cache` in its state directory); without one no cache is used.
    #[serde(alias = "cachedirectory")]
    pub cache_directory: Option<PathBuf>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            directory: PathBuf::from("plugins"),
            entries: Vec::new(),
            limits: Limits::default(),
            sizer: SizerBounds::default(),
            watch: true,
            debounce_ms: 100,
            observer_queue: 4096,
            observer_batch: 64,
            compile_cache: true,
            cache_directory: None,
        }
    }
}

/// One plugin to load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginEntry {
    /// Name used in logs and the status; defaults to the file name without `.wasm`.
    #[serde(default)]
    pub name: Option<String>,
    /// File name inside the plugin directory.
    pub file: String,
    /// Expected kind; detected from the component's exports when absent.
    #[serde(default)]
    pub kind: Option<PluginKind>,
    /// Environment ids the plugin applies to (sizers and preprocessors); `None` = all.
    #[serde(default)]
    pub environments: Option<Vec<i64>>,
    /// The plugin's own configuration values, readable through `config-get`.
    #[serde(default, deserialize_with = "scalar_map")]
    pub config: BTreeMap<String, String>,
    /// Preprocessors only: when the plugin fails (trap, timeout, not loaded), let the
    /// request through unchanged instead of rejecting it.
    #[serde(default, alias = "failopen")]
    pub fail_open: bool,
    /// Pool sizers of WIT 0.2: the IANA time zone of the `local` time they are given
    /// (e.g. `Europe/Berlin`); default: the server's time zone.
    #[serde(default, alias = "timezone")]
    pub time_zone: Option<String>,
    /// Authenticators only: reuse the plugin's decision for requests that agree on the
    /// inputs it depends on, for a while (see [`DecisionCacheConfig`]). Off when absent.
    #[serde(default, alias = "cachedecisions")]
    pub cache_decisions: Option<DecisionCacheConfig>,
}

/// An authenticator's decision cache (`cacheDecisions:`). Declaring `inputs` is a promise
/// about the plugin: its decision depends on nothing else (but the time, which `ttlMs`
/// bounds). CodeOcean sends the same token with every request of a run, so a token-reading
/// authenticator is called once per token and `ttlMs` instead of once per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DecisionCacheConfig {
    /// What the decision depends on: header names, `poseidon-token` (the `Poseidon-Token`
    /// the authenticator is given), `:method`, `:path`, `:peer`.
    pub inputs: Vec<String>,
    /// How long a decision is reused, in milliseconds (at most an hour).
    #[serde(alias = "ttlms")]
    pub ttl_ms: u64,
    /// Most decisions kept; when full, expired ones go first, then all.
    #[serde(default = "default_max_entries", alias = "maxentries")]
    pub max_entries: usize,
}

fn default_max_entries() -> usize {
    10_000
}

impl DecisionCacheConfig {
    /// The configuration with input names in lower case, or why it is unusable.
    pub(crate) fn validated(&self) -> Result<DecisionCacheConfig, String> {
        if self.inputs.is_empty() {
            return Err("cacheDecisions.inputs must name what the decision depends on".into());
        }
        if self.ttl_ms == 0 || self.ttl_ms > 3_600_000 {
            return Err("cacheDecisions.ttlMs must be between 1 and 3600000".into());
        }
        let inputs = self
            .inputs
            .iter()
            .map(|input| {
                let input = input.trim().to_ascii_lowercase();
                let pseudo = [":method", ":path", ":peer"].contains(&input.as_str());
                let header = !input.is_empty()
                    && input.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if pseudo || header {
                    Ok(input)
                } else {
                    Err(format!(
                        "cacheDecisions.inputs: {input:?} is neither a header name nor one of :method, :path, :peer"
                    ))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(DecisionCacheConfig {
            inputs,
            ttl_ms: self.ttl_ms,
            max_entries: self.max_entries,
        })
    }
}

impl PluginEntry {
    /// The entry's name: `name`, or the file name without its `.wasm` extension.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.file
                .strip_suffix(".wasm")
                .unwrap_or(&self.file)
                .to_string()
        })
    }

    /// Whether the entry applies to environment `id`.
    pub fn applies_to(&self, id: i64) -> bool {
        self.environments
            .as_ref()
            .is_none_or(|envs| envs.contains(&id))
    }
}

/// The kinds of plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PluginKind {
    /// Decides how many idle runners an environment keeps (`pool-sizer` world).
    #[serde(rename = "pool-sizer", alias = "poolSizer", alias = "sizer")]
    PoolSizer,
    /// Checks and rewrites execute and file requests (`preprocessor` world).
    #[serde(rename = "preprocessor")]
    Preprocessor,
    /// Authenticates API requests (`authenticator` world).
    #[serde(rename = "authenticator")]
    Authenticator,
    /// Receives runner lifecycle events (`observer` world, WIT 0.2 and later).
    #[serde(rename = "observer")]
    Observer,
}

impl PluginKind {
    /// All kinds.
    pub const ALL: [PluginKind; 4] = [
        PluginKind::PoolSizer,
        PluginKind::Preprocessor,
        PluginKind::Authenticator,
        PluginKind::Observer,
    ];

    /// The WIT interface a plugin of this kind exports (without package and version).
    pub fn interface(self) -> &'static str {
        match self {
            PluginKind::PoolSizer => "pool-sizer",
            PluginKind::Preprocessor => "preprocessor",
            PluginKind::Authenticator => "authenticator",
            PluginKind::Observer => "observer",
        }
    }

    /// The kind's name with its indefinite article, for messages: "a pool-sizer", "an
    /// authenticator".
    pub fn with_article(self) -> &'static str {
        match self {
            PluginKind::PoolSizer => "a pool-sizer",
            PluginKind::Preprocessor => "a preprocessor",
            PluginKind::Authenticator => "an authenticator",
            PluginKind::Observer => "an observer",
        }
    }

    /// The WIT world a plugin of this kind targets.
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::PoolSizer => "pool-sizer-plugin",
            PluginKind::Preprocessor => "preprocessor-plugin",
            PluginKind::Authenticator => "authenticator-plugin",
            PluginKind::Observer => "observer-plugin",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.interface())
    }
}

/// Bounds applied to every plugin call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Limits {
    /// Wall-clock bound of a call in milliseconds, from the request until the answer,
    /// waiting for a free call slot included.
    #[serde(alias = "calltimeoutms")]
    pub call_timeout_ms: u64,
    /// Period of the epoch ticker in milliseconds.
    #[serde(alias = "epochtickms")]
    pub epoch_tick_ms: u64,
    /// Guest run time per call, in epoch ticks; the guest traps when it is used up.
    #[serde(alias = "epochdeadlineticks")]
    pub epoch_deadline_ticks: u64,
    /// Optional instruction budget ("fuel") per call; deterministic, but slower code.
    pub fuel: Option<u64>,
    /// Size limit of each linear memory of a plugin instance, in MiB.
    #[serde(alias = "memorymb")]
    pub memory_mb: u64,
    /// Most calls of one plugin entry running at once (admission control, per entry: a
    /// plugin that runs long exhausts only its own slots); later calls of that plugin wait
    /// for a slot within their timeout.
    #[serde(alias = "maxconcurrentcalls")]
    pub max_concurrent_calls: u32,
    /// Use wasmtime's pooling allocator (faster instantiation); falls back to
    /// on-demand allocation if the address space cannot be reserved.
    pub pooling: bool,
    /// Pooling only: KiB of each linear memory kept resident between calls. A freed slot's
    /// dirty pages (found with the kernel's `PAGEMAP_SCAN` where available, Linux 6.7+)
    /// are reset in place instead of being returned to the kernel, so the next call does
    /// not page-fault its way back into its stack and heap. `0` = always `madvise`.
    #[serde(alias = "keepresidentkb")]
    pub keep_resident_kb: u64,
    /// Run guest calls on the calling worker thread instead of hopping to tokio's blocking
    /// pool (the hop waits for the scheduler twice per call): in place on the calling task
    /// once a version's calls have proved short (see `inPlaceBudgetUs`), otherwise inside
    /// `block_in_place`. `false`: every call hops to the blocking pool.
    #[serde(alias = "inlinecalls")]
    pub inline_calls: bool,
    /// Longest call, in microseconds, that lets a version's calls run in place on the
    /// calling async task (no thread hand-off). A version's first call runs off the
    /// executor; when it took at most this long, later calls run in place; a call that
    /// takes longer, or is stopped by its deadline or timeout, moves the version off the
    /// executor for good. `0` (the default) = never in place: measured at the server level
    /// (BENCHMARKS.md, issue 9) in place saved ~0.15 ms per authenticated claim but cost
    /// executions under concurrency, where `block_in_place` lets the worker's other tasks
    /// go on while a guest runs.
    #[serde(alias = "inplacebudgetus")]
    pub in_place_budget_us: u64,
    /// Keep one spare instance per loaded version, made ahead of its next call on the
    /// host's keeper thread, which also drops the used ones: a call then pays for neither
    /// making nor dropping its instance (each call still gets an instance of its own).
    /// Costs one instance slot per plugin. `false`: every call makes and drops its own.
    #[serde(alias = "spareinstances")]
    pub spare_instances: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_timeout_ms: 500,
            epoch_tick_ms: 10,
            epoch_deadline_ticks: 10,
            fuel: None,
            memory_mb: 64,
            max_concurrent_calls: 16,
            pooling: true,
            keep_resident_kb: 2048,
            inline_calls: true,
            in_place_budget_us: 0,
            spare_instances: true,
        }
    }
}

/// Bounds and damping applied to pool sizer answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SizerBounds {
    /// Smallest answer passed on.
    pub min: u32,
    /// Largest answer passed on.
    pub max: u32,
    /// A new answer replaces the previous one for the same environment only if it
    /// differs by at least this much (or reaches `min`/`max`); `0` and `1` disable
    /// damping.
    pub hysteresis: u32,
}

impl Default for SizerBounds {
    fn default() -> Self {
        SizerBounds {
            min: 0,
            max: 1000,
            hysteresis: 1,
        }
    }
}

/// Accepts string, number and boolean values and keeps them as strings, so that
/// `maxFiles: 200` works as well as `maxFiles: "200"`.
fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Bool(bool),
        Int(i64),
        Uint(u64),
        Float(f64),
        Text(String),
    }
    let raw: Option<BTreeMap<String, Scalar>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::Bool(b) => b.to_string(),
                Scalar::Int(i) => i.to_string(),
                Scalar::Uint(u) => u.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Text(s) => s,
            };
            (k, v)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let yaml = r#"
directory: /etc/poseidon/plugins
entries:
  - name: lecture-times
    file: timetable_sizer.wasm
    kind: pool-sizer
    environments: [10, 11]
    config:
      slots: "mon-fri 08:00-10:00 = 20"
  - file: submission_guard.wasm
    failOpen: false
    config: { maxFiles: 200, denyPrivileged: true, ratio: 0.5 }
limits:
  callTimeoutMs: 500
  epochTickMs: 10
  epochDeadlineTicks: 10
  fuel: null
  memoryMb: 64
  maxConcurrentCalls: 16
  pooling: true
sizer: { min: 0, max: 100, hysteresis: 1 }
watch: true
debounceMs: 100
"#;
        let c: PluginsConfig = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(c.directory, PathBuf::from("/etc/poseidon/plugins"));
        assert_eq!(c.entries.len(), 2);
        assert_eq!(c.entries[0].display_name(), "lecture-times");
        assert_eq!(c.entries[0].kind, Some(PluginKind::PoolSizer));
        assert!(c.entries[0].applies_to(10) && !c.entries[0].applies_to(12));
        assert_eq!(c.entries[1].display_name(), "submission_guard");
        assert!(c.entries[1].applies_to(12));
        assert_eq!(c.entries[1].config["maxFiles"], "200");
        assert_eq!(c.entries[1].config["denyPrivileged"], "true");
        assert_eq!(c.entries[1].config["ratio"], "0.5");
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.sizer.max, 100);
    }

    #[test]
    fn defaults_aliases_and_lowercase_keys() {
        let c: PluginsConfig = serde_yaml::from_str(
            "directory: p\nplugins:\n  - {file: a.wasm, kind: poolSizer, failopen: true}\nlimits: {calltimeoutms: 50, memorymb: 8}\n",
        )
        .unwrap();
        assert_eq!(c.entries[0].kind, Some(PluginKind::PoolSizer));
        assert!(c.entries[0].fail_open);
        assert_eq!(c.limits.call_timeout_ms, 50);
        assert_eq!(c.limits.memory_mb, 8);
        assert_eq!(c.limits.epoch_tick_ms, 10);
        assert!(c.watch);
        let empty: PluginsConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(empty, PluginsConfig::default());
    }

    #[test]
    fn a_decision_cache_names_its_inputs_in_lower_case_and_refuses_nonsense() {
        let c: PluginsConfig = serde_yaml::from_str(
            "entries:\n  - {file: a.wasm, cacheDecisions: {inputs: [Authorization, Poseidon-Token, ':path'], ttlMs: 1000}}\n",
        )
        .unwrap();
        let cache = c.entries[0].cache_decisions.as_ref().unwrap();
        assert_eq!(cache.max_entries, 10_000);
        let valid = cache.validated().unwrap();
        assert_eq!(valid.inputs, ["authorization", "poseidon-token", ":path"]);
        let refused = |yaml: &str| {
            let c: PluginsConfig = serde_yaml::from_str(yaml).unwrap();
            c.entries[0]
                .cache_decisions
                .as_ref()
                .unwrap()
                .validated()
                .unwrap_err()
        };
        for (cache, named) in [
            ("{inputs: [], ttlMs: 5}", "inputs"),
            ("{inputs: [x], ttlMs: 0}", "ttlMs"),
            ("{inputs: [':body'], ttlMs: 5}", ":body"),
            ("{inputs: ['a b'], ttlMs: 5}", "a b"),
        ] {
            let error = refused(&format!("entries: [{{file: a, cacheDecisions: {cache}}}]"));
            assert!(error.contains(named), "{cache}: {error}");
        }
        // An unknown key is refused, not ignored.
        assert!(serde_yaml::from_str::<PluginsConfig>(
            "entries: [{file: a, cacheDecisions: {inputs: [x], ttlMs: 5, ttl: 9}}]"
        )
        .is_err());
    }
}
