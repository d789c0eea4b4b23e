//! [`PluginHost`]: the plugins as the server sees them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component as PathComponent, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::DecisionCacheConfig;
use crate::decisions::{DecisionCache, DecisionKey};
use arc_swap::ArcSwapOption;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::Store;

/// A request on its way through the preprocessors, with what they see of its runner and
/// may not change: the environment and the tenant that claimed it.
#[derive(Debug, Clone)]
pub(crate) struct Subject<T> {
    /// The runner's environment.
    pub environment: EnvironmentId,
    /// The tenant that claimed the runner.
    pub tenant: Option<String>,
    /// The request (core's execution request or file update).
    pub body: T,
}

/// What a preprocessor call gives back: the request as rewritten or the plugin's
/// rejection (inner), a bad answer (middle), or a failed call (outer).
type PreprocessOutcome<T> = Result<Result<Result<T, String>, String>, Failure>;

/// `$method` (`call_preprocess_execute` or `call_preprocess_files`) of a preprocessor of
/// either WIT version on a fresh instance, its answer translated back (a [`PreprocessCall`]).
macro_rules! preprocessor_call {
    ($method:ident) => {
        |store, instance, req| match instance {
            PluginInstance::PreprocessorV1(instance) => instance
                .poseidon_plugins_preprocessor()
                .$method(&mut *store, &req.into())
                .map(|r| r.map_or_else(|m| Ok(Err(m)), |out| out.try_into().map(Ok)))
                .map_err(Failure::Call),
            PluginInstance::PreprocessorV2(instance) => instance
                .poseidon_plugins_preprocessor()
                .$method(&mut *store, &req.into())
                .map(|r| r.map_or_else(|m| Ok(Err(m)), |out| out.try_into().map(Ok)))
                .map_err(Failure::Call),
            _ => Ok(Err("the loaded file is not a preprocessor".to_string())),
        }
    };
}

/// One preprocessor call of a chain, for either WIT version.
type PreprocessCall<T> =
    fn(&mut Store<HostState>, &PluginInstance, &Subject<T>) -> PreprocessOutcome<Subject<T>>;
use crate::bindings::v2;
use crate::config::{Limits, PluginEntry, PluginKind, PluginsConfig};
use crate::error::{CallError, PluginError};
use crate::loader::{self, LoadedPlugin, PluginInstance, PluginPre};
use crate::placement::Where;
use crate::runtime::{HostState, PluginIdentity, Runtime};
use crate::spare::{Keeper, Spare};
use crate::types::{
    ObserverStats, PluginDescription, PluginStatus, PoolSizerInput, PoolStateInfo, Rejection,
};
use poseidon_core::execution::ExecutionRequest;
use poseidon_core::files::FileUpdate;
use poseidon_core::policy::{AuthRequest, Denial, LifecycleEvent, Principal};
use poseidon_core::EnvironmentId;

/// What a pool sizer call needs, prepared once for either WIT version.
pub(crate) struct SizerCall {
    /// The pool, as the caller described it.
    pub pool: PoolStateInfo,
    /// Exactly 60 per-minute claim counts, oldest first.
    pub claims: Vec<u32>,
    /// The time zone of the local time given to 0.2 sizers.
    pub time_zone: jiff::tz::TimeZone,
}

/// Number of per-minute claim counts passed to sizers.
const CLAIM_MINUTES: usize = 60;

/// The plugin host: loaded plugins, their runtime and their watcher.
///
/// Cheap to clone; all clones share the same plugins. [`PluginHost::disabled`] gives a
/// host without plugins whose hooks are no-ops.
#[derive(Clone)]
pub struct PluginHost {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("enabled", &self.inner.is_some())
            .field("plugins", &self.status().len())
            .finish()
    }
}

pub(crate) struct Inner {
    runtime: Arc<Runtime>,
    /// Drops used stores and makes spare instances, off the calls' path.
    keeper: Keeper,
    config: PluginsConfig,
    slots: Vec<Arc<Slot>>,
    last_sizes: Mutex<HashMap<i64, u32>>,
    /// Serializes reloads (initial load, watcher, [`PluginHost::reload`]).
    reload_lock: tokio::sync::Mutex<()>,
    /// Keeps the file watcher alive as long as the host.
    pub(crate) watcher: Mutex<Option<notify::RecommendedWatcher>>,
    /// The bounded queue of lifecycle events for the observers.
    observer_tx: tokio::sync::mpsc::Sender<LifecycleEvent>,
    /// Events queued, dropped (queue full) and delivered.
    observer_queued: AtomicU64,
    observer_dropped: AtomicU64,
    observer_delivered: AtomicU64,
}

/// One configured plugin entry and its currently loaded version.
struct Slot {
    /// The entry's name: an entry with another name is another plugin.
    name: String,
    /// The entry's other settings; replaced by [`PluginHost::reconfigure`].
    settings: arc_swap::ArcSwap<SlotSettings>,
    /// The entry's `config:` values; replaced by [`PluginHost::reconfigure`].
    config: arc_swap::ArcSwap<BTreeMap<String, String>>,
    current: ArcSwapOption<LoadedPlugin>,
    /// The entry's own admission bound (`maxConcurrentCalls` calls at once): a plugin that
    /// runs long can only exhaust its own slots, never another plugin's.
    admission: Arc<Semaphore>,
    /// Digest of the last file version that failed to load (not retried until changed).
    failed_digest: Mutex<Option<String>>,
    calls: AtomicU64,
    failures: AtomicU64,
    /// Requests answered from the authenticator's decision cache (all versions).
    cached_decisions: AtomicU64,
    /// Calls that ran in a spare instance (all versions).
    spare_calls: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What a plugin entry says besides its `config:` values, ready for use.
struct SlotSettings {
    entry: PluginEntry,
    /// The plugin file.
    path: PathBuf,
    /// The zone of the local time given to 0.2 pool sizers.
    time_zone: jiff::tz::TimeZone,
    /// The authenticator's decision cache, input names in lower case; `None`: off.
    decisions: Option<DecisionCacheConfig>,
}

impl SlotSettings {
    /// The settings of `entry` in the plugin directory `directory`; fails on an unknown
    /// time zone or an unusable `cacheDecisions`.
    fn new(entry: &PluginEntry, directory: &Path) -> Result<SlotSettings, PluginError> {
        let decisions = match &entry.cache_decisions {
            None => None,
            Some(_) if entry.kind.is_some_and(|k| k != PluginKind::Authenticator) => {
                return Err(PluginError::Config(format!(
                    "plugin {:?}: cacheDecisions is for authenticators",
                    entry.display_name()
                )))
            }
            Some(cache) => Some(cache.validated().map_err(|e| {
                PluginError::Config(format!("plugin {:?}: {e}", entry.display_name()))
            })?),
        };
        let time_zone = match &entry.time_zone {
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|e| {
                PluginError::Config(format!(
                    "plugin {:?}: timeZone {name:?} is not a known time zone: {e}",
                    entry.display_name()
                ))
            })?,
            None => jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC),
        };
        Ok(SlotSettings {
            entry: entry.clone(),
            path: directory.join(&entry.file),
            time_zone,
            decisions,
        })
    }
}

impl Slot {
    /// The configured kind, or else the kind of the loaded version.
    fn kind(&self) -> Option<PluginKind> {
        self.settings
            .load()
            .entry
            .kind
            .or_else(|| self.current.load().as_ref().map(|p| p.identity.kind))
    }

    /// Whether the entry applies to environment `id`.
    fn applies_to(&self, id: i64) -> bool {
        self.settings.load().entry.applies_to(id)
    }

    fn set_error(&self, message: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn validate(config: &PluginsConfig) -> Result<(), PluginError> {
    let mut names = HashSet::new();
    for entry in &config.entries {
        let file = Path::new(&entry.file);
        let plain = file.components().count() == 1
            && matches!(file.components().next(), Some(PathComponent::Normal(_)));
        if !plain {
            return Err(PluginError::Config(format!(
                "plugin file {:?} must be a file name inside the plugin directory",
                entry.file
            )));
        }
        let name = entry.display_name();
        if !names.insert(name.clone()) {
            return Err(PluginError::Config(format!(
                "two plugin entries are named {name:?}; give them distinct `name`s"
            )));
        }
    }
    let limits = &config.limits;
    if limits.call_timeout_ms == 0 || limits.epoch_deadline_ticks == 0 || limits.memory_mb == 0 {
        return Err(PluginError::Config(
            "limits callTimeoutMs, epochDeadlineTicks and memoryMb must be positive".into(),
        ));
    }
    if limits.max_concurrent_calls == 0 {
        return Err(PluginError::Config(
            "limits.maxConcurrentCalls must be positive".into(),
        ));
    }
    if config.observer_queue == 0 || config.observer_batch == 0 {
        return Err(PluginError::Config(
            "observerQueue and observerBatch must be positive".into(),
        ));
    }
    if config.sizer.min > config.sizer.max {
        return Err(PluginError::Config(format!(
            "sizer.min ({}) is larger than sizer.max ({})",
            config.sizer.min, config.sizer.max
        )));
    }
    Ok(())
}

/// Whether guest calls may run on the calling worker thread (`block_in_place`): only on
/// tokio's multi-threaded runtime; elsewhere they go to the blocking pool.
fn inline_calls_possible() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Whether a call's guest was stopped by its deadline or timeout.
fn stopped<R>(result: &Result<R, CallError>) -> bool {
    matches!(result, Err(CallError::Deadline(_) | CallError::Timeout(_)))
}

/// Runs a call, turning a panic into a failed call.
fn catch_panic<R>(run: impl FnOnce() -> Result<R, CallError>) -> Result<R, CallError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(CallError::Host("call panicked".into())))
}

/// The outcome of one attempt to call a guest export, before classification.
enum Failure {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
}

/// One attempt of a call: its outcome, the used store, whether its instance was the
/// version's spare, and whether the version could be instantiated (else no spare is made
/// for it).
struct Attempted<R> {
    result: Result<R, CallError>,
    store: Store<HostState>,
    spared: bool,
    instantiated: bool,
}

impl PluginHost {
    /// Loads the configured plugins and, if `watch` is on, starts watching the plugin
    /// directory for changes.
    ///
    /// Fails on an invalid configuration, if the engine cannot be created, or if the
    /// directory cannot be watched. A plugin file that is missing or broken does not
    /// fail the start: its error is logged and shown in [`PluginHost::status`], and the
    /// file is loaded once it appears or is fixed.
    pub async fn start(config: PluginsConfig) -> Result<PluginHost, PluginError> {
        validate(&config)?;
        let cache = config
            .cache_directory
            .as_deref()
            .filter(|_| config.compile_cache);
        let plugins = u32::try_from(config.entries.len()).unwrap_or(u32::MAX);
        let runtime = Arc::new(Runtime::new(&config.limits, plugins, cache)?);
        let keeper = Keeper::start(Arc::clone(&runtime))?;
        let slots = config
            .entries
            .iter()
            .map(|entry| {
                Ok(Arc::new(Slot {
                    name: entry.display_name(),
                    settings: arc_swap::ArcSwap::from_pointee(SlotSettings::new(
                        entry,
                        &config.directory,
                    )?),
                    config: arc_swap::ArcSwap::from_pointee(entry.config.clone()),
                    current: ArcSwapOption::empty(),
                    admission: Arc::new(Semaphore::new(
                        config.limits.max_concurrent_calls as usize,
                    )),
                    failed_digest: Mutex::new(None),
                    calls: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    cached_decisions: AtomicU64::new(0),
                    spare_calls: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                }))
            })
            .collect::<Result<Vec<_>, PluginError>>()?;
        let (observer_tx, observer_rx) = tokio::sync::mpsc::channel(config.observer_queue);
        let inner = Arc::new(Inner {
            observer_tx,
            observer_queued: AtomicU64::new(0),
            observer_dropped: AtomicU64::new(0),
            observer_delivered: AtomicU64::new(0),
            runtime,
            keeper,
            config,
            slots,
            last_sizes: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            watcher: Mutex::new(None),
        });
        inner.reload_all().await;
        tokio::spawn(deliver_events(Arc::downgrade(&inner), observer_rx));
        if inner.config.watch && !inner.slots.is_empty() {
            crate::watch::start(&inner)?;
        }
        Ok(PluginHost { inner: Some(inner) })
    }

    /// A host without plugins: every hook is a no-op (`pool_size` → `None`, requests
    /// pass unchanged, `has_authenticator` → false).
    pub fn disabled() -> PluginHost {
        PluginHost { inner: None }
    }

    /// Whether plugins are configured at all.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Re-reads every plugin file now and reloads the changed ones (what the watcher
    /// does after a change; useful on SIGHUP or where file events are unreliable).
    pub async fn reload(&self) {
        if let Some(inner) = &self.inner {
            inner.reload_all().await;
        }
    }

    /// The wanted number of idle runners for an environment, from the first loaded
    /// pool sizer whose `environments` include it, clamped to `sizer.min..=sizer.max`
    /// and damped by `sizer.hysteresis`.
    ///
    /// `None` when no sizer applies or the sizer failed: the caller keeps the
    /// configured pool size.
    pub async fn pool_size(&self, input: PoolSizerInput) -> Option<u32> {
        let inner = self.inner.as_ref()?;
        let env_id = input.environment.id;
        let slot = inner
            .slots
            .iter()
            .find(|s| s.kind() == Some(PluginKind::PoolSizer) && s.applies_to(env_id))?;
        let mut claims = input.pool.claims_per_minute.clone();
        if claims.len() > CLAIM_MINUTES {
            claims.drain(..claims.len() - CLAIM_MINUTES);
        }
        if claims.len() < CLAIM_MINUTES {
            let mut padded = vec![0; CLAIM_MINUTES - claims.len()];
            padded.extend(claims);
            claims = padded;
        }
        let call = SizerCall {
            pool: input.pool,
            claims,
            time_zone: slot.settings.load().time_zone.clone(),
        };
        let environment = input.environment;
        let answer = inner
            .call(slot, move |store, instance| match instance {
                PluginInstance::PoolSizerV1(instance) => instance
                    .poseidon_plugins_pool_sizer()
                    .call_wanted_idle(&mut *store, &(&environment).into(), &(&call).into())
                    .map_err(Failure::Call)
                    .map(Ok),
                PluginInstance::PoolSizerV2(instance) => instance
                    .poseidon_plugins_pool_sizer()
                    .call_wanted_idle(&mut *store, &(&environment).into(), &(&call).into())
                    .map_err(Failure::Call)
                    .map(Ok),
                _ => Ok(Err("the loaded file is not a pool sizer".to_string())),
            })
            .await
            .ok()?;
        let bounds = &inner.config.sizer;
        let clamped = answer.clamp(bounds.min, bounds.max);
        let mut last = lock(&inner.last_sizes);
        let value = match last.get(&env_id) {
            Some(&prev)
                if bounds.hysteresis > 1
                    && clamped != bounds.min
                    && clamped != bounds.max
                    && prev.abs_diff(clamped) < bounds.hysteresis =>
            {
                prev
            }
            _ => clamped,
        };
        last.insert(env_id, value);
        Some(value)
    }

    /// Runs an execute request for a runner of `environment` claimed by `principal`
    /// through the preprocessors that apply to the environment, in configuration order.
    /// `Err` means: answer HTTP 400 with the rejection's message.
    pub async fn preprocess_execute(
        &self,
        environment: EnvironmentId,
        principal: Option<&Principal>,
        request: ExecutionRequest,
    ) -> Result<ExecutionRequest, Rejection> {
        let invoke: PreprocessCall<ExecutionRequest> = preprocessor_call!(call_preprocess_execute);
        self.preprocess(environment, principal, request, invoke)
            .await
    }

    /// Runs a file update for a runner of `environment` claimed by `principal` through
    /// the preprocessors that apply to the environment, in configuration order. `Err`
    /// means: answer HTTP 400 with the rejection's message.
    pub async fn preprocess_files(
        &self,
        environment: EnvironmentId,
        principal: Option<&Principal>,
        update: FileUpdate,
    ) -> Result<FileUpdate, Rejection> {
        let invoke: PreprocessCall<FileUpdate> = preprocessor_call!(call_preprocess_files);
        self.preprocess(environment, principal, update, invoke)
            .await
    }

    /// The preprocessor chain for `body` (see [`Inner::preprocess`]); unchanged without plugins.
    async fn preprocess<T: Clone + Send + Sync + 'static>(
        &self,
        environment: EnvironmentId,
        principal: Option<&Principal>,
        body: T,
        invoke: PreprocessCall<T>,
    ) -> Result<T, Rejection> {
        let Some(inner) = &self.inner else {
            return Ok(body);
        };
        let subject = Subject {
            environment,
            tenant: principal.map(|p| p.tenant.clone()),
            body,
        };
        inner.preprocess(subject, invoke).await.map(|s| s.body)
    }

    /// Whether an authenticator is configured (loaded or not). If so, the server must
    /// call [`PluginHost::authenticate`] for API requests; a configured authenticator
    /// that is not loaded denies everything (fail closed).
    pub fn has_authenticator(&self) -> bool {
        self.inner.as_ref().is_some_and(|inner| {
            inner
                .slots
                .iter()
                .any(|s| s.kind() == Some(PluginKind::Authenticator))
        })
    }

    /// Authenticates a request with the first authenticator entry.
    ///
    /// `Err` carries the HTTP status and message to answer with: 401/403 from the
    /// plugin, 503 if the plugin failed (trap, timeout, bad answer, not loaded).
    /// Without an authenticator every request is let through as tenant `""` with all
    /// environments.
    pub async fn authenticate(&self, request: &AuthRequest) -> Result<Principal, Denial> {
        let everyone = Principal {
            tenant: String::new(),
            environments: None,
        };
        let Some(inner) = &self.inner else {
            return Ok(everyone);
        };
        let Some(slot) = inner
            .slots
            .iter()
            .find(|s| s.kind() == Some(PluginKind::Authenticator))
        else {
            return Ok(everyone);
        };
        // A decision kept for the same inputs (see `cacheDecisions`) answers at once.
        let settings = slot.settings.load_full();
        let cached = match (&settings.decisions, slot.current.load_full()) {
            (Some(config), Some(plugin)) => {
                DecisionKey::of(config, request).map(|key| (config, plugin, key))
            }
            _ => None,
        };
        if let Some((_, plugin, key)) = &cached {
            if let Some(decision) = plugin.decisions.get(key, std::time::Instant::now()) {
                slot.cached_decisions.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::cached_decision(&slot.name);
                return decision;
            }
        }
        // One copy, owned by the call (it may run on another thread); translated to the
        // loaded version's WIT record inside the call.
        let request = request.clone();
        let result = inner
            .call(slot, move |store, instance| match instance {
                PluginInstance::AuthenticatorV1(instance) => instance
                    .poseidon_plugins_authenticator()
                    .call_authenticate(&mut *store, &(&request).into())
                    .map(|r| Ok(r.map(Principal::from).map_err(Denial::from)))
                    .map_err(Failure::Call),
                PluginInstance::AuthenticatorV2(instance) => instance
                    .poseidon_plugins_authenticator()
                    .call_authenticate(&mut *store, &(&request).into())
                    .map(|r| Ok(r.map(Principal::from).map_err(Denial::from)))
                    .map_err(Failure::Call),
                _ => Ok(Err("the loaded file is not an authenticator".to_string())),
            })
            .await;
        let unavailable = |e: &CallError| Denial {
            status: 503,
            message: format!("authentication unavailable: plugin {:?} {e}", slot.name),
        };
        let decision = match result {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(d)) if d.status == 401 || d.status == 403 => Err(d),
            Ok(Err(d)) => {
                let e = CallError::BadAnswer(format!(
                    "denial status {} (only 401 and 403 are allowed)",
                    d.status
                ));
                inner.record_failure(slot, e.clone());
                return Err(unavailable(&e));
            }
            Err(e) => return Err(unavailable(&e)),
        };
        // Only the plugin's own answers are kept, in the cache of the version that was
        // current before the call (a reload during the call drops it with that version).
        if let Some((config, plugin, key)) = cached {
            plugin
                .decisions
                .put(key, decision.clone(), std::time::Instant::now(), config);
        }
        decision
    }

    /// Applies a changed `plugins:` section without a restart. An entry (matched by name)
    /// whose `config:` values changed gets them at once — its loaded version is re-issued
    /// with the new values (same compiled code, swapped atomically: calls running finish
    /// with the old values, no call fails). An entry whose `file`, `kind`, `environments`,
    /// `failOpen` or `timeZone` changed gets them at once too; a changed file or kind is
    /// compiled and swapped in like a replaced file, the old version serving until then.
    /// Then every file is re-read as by [`PluginHost::reload`]. Returns what could not be
    /// applied and needs a restart (added or removed entries — an entry without `name:` is
    /// named after its file —, changed directory, limits or sizer bounds, an invalid
    /// section or an unknown time zone), one line each.
    pub async fn reconfigure(&self, new: &PluginsConfig) -> Vec<String> {
        let Some(inner) = &self.inner else {
            return vec!["plugins were not enabled at start".into()];
        };
        if let Err(e) = validate(new) {
            return vec![format!("{e}; nothing was applied")];
        }
        let mut restart = Vec::new();
        let old = &inner.config;
        if old.directory != new.directory || old.limits != new.limits || old.sizer != new.sizer {
            restart.push("plugins.directory, limits or sizer changed".to_string());
        }
        let names: HashSet<String> = new.entries.iter().map(|e| e.display_name()).collect();
        for slot in &inner.slots {
            if !names.contains(&slot.name) {
                restart.push(format!("plugin {:?} was removed", slot.name));
            }
        }
        for entry in &new.entries {
            let name = entry.display_name();
            let Some(slot) = inner.slots.iter().find(|s| s.name == name) else {
                restart.push(format!("plugin {name:?} was added"));
                continue;
            };
            let old = slot.settings.load_full();
            let same_but_config = PluginEntry {
                config: old.entry.config.clone(),
                ..entry.clone()
            };
            let settings_changed = same_but_config != old.entry;
            if settings_changed {
                // file, kind, environments, failOpen, timeZone: swapped at once (a call
                // running keeps what it started with); a changed file or kind is loaded
                // by the reload below, the old version serving until it is ready.
                match SlotSettings::new(entry, &inner.config.directory) {
                    Ok(settings) => {
                        slot.settings.store(Arc::new(settings));
                        *lock(&slot.failed_digest) = None;
                        tracing::info!(plugin = %name, "plugin entry changed; applied");
                    }
                    Err(e) => {
                        restart.push(format!("{e}; the entry's change was not applied"));
                        continue;
                    }
                }
            }
            let config_changed = **slot.config.load() != entry.config;
            if !config_changed && !settings_changed {
                continue;
            }
            let config = Arc::new(entry.config.clone());
            slot.config.store(Arc::clone(&config));
            // Re-issued with the new values, an empty decision cache and no spare: no
            // decision or instance made under the old values or settings is reused.
            if let Some(current) = slot.current.load_full() {
                let identity = Arc::new(PluginIdentity {
                    config,
                    name: current.identity.name.clone(),
                    kind: current.identity.kind,
                    digest: current.identity.digest.clone(),
                });
                let copy = Arc::new(LoadedPlugin {
                    identity,
                    wit_version: current.wit_version.clone(),
                    loaded_at: std::time::SystemTime::now(),
                    pre: current.pre.clone(),
                    from_cache: current.from_cache,
                    placement: Arc::clone(&current.placement),
                    decisions: DecisionCache::default(),
                    spare: Spare::default(),
                });
                inner.keeper.refill(&copy);
                slot.current.store(Some(copy));
            }
            if config_changed {
                tracing::info!(plugin = %name, "plugin configuration changed; applied");
            }
        }
        inner.reload_all().await;
        restart
    }

    /// Whether the authenticator in use sees the `Poseidon-Token` (it is loaded and built
    /// for WIT 0.2 or later), so the server may leave unknown tokens to it.
    pub fn authenticator_reads_tokens(&self) -> bool {
        self.inner.as_ref().is_some_and(|inner| {
            inner
                .slots
                .iter()
                .find(|s| s.kind() == Some(PluginKind::Authenticator))
                .and_then(|s| s.current.load_full())
                .is_some_and(|p| matches!(p.pre, PluginPre::AuthenticatorV2(_)))
        })
    }

    /// Whether an observer is configured (loaded or not); without one, [`PluginHost::observe`]
    /// does nothing and callers may skip building events.
    pub fn has_observer(&self) -> bool {
        self.inner.as_ref().is_some_and(|inner| {
            inner
                .slots
                .iter()
                .any(|s| s.kind() == Some(PluginKind::Observer))
        })
    }

    /// Queues a lifecycle event for the observers and returns at once. When the queue is
    /// full the event is dropped and counted ([`PluginHost::observer_stats`]): observers
    /// never slow a request.
    pub fn observe(&self, event: LifecycleEvent) {
        let Some(inner) = &self.inner else {
            return;
        };
        if !self.has_observer() {
            return;
        }
        match inner.observer_tx.try_send(event) {
            Ok(()) => {
                inner.observer_queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                let dropped = inner.observer_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(dropped, "observer queue full; lifecycle events dropped");
                }
            }
        }
    }

    /// Counters of the observer queue.
    pub fn observer_stats(&self) -> ObserverStats {
        self.inner
            .as_ref()
            .map(|inner| ObserverStats {
                queued: inner.observer_queued.load(Ordering::Relaxed),
                dropped: inner.observer_dropped.load(Ordering::Relaxed),
                delivered: inner.observer_delivered.load(Ordering::Relaxed),
            })
            .unwrap_or_default()
    }

    /// The state of every configured plugin, in configuration order.
    pub fn status(&self) -> Vec<PluginStatus> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        inner
            .slots
            .iter()
            .map(|slot| {
                let current = slot.current.load_full();
                PluginStatus {
                    name: slot.name.clone(),
                    file: slot.settings.load().entry.file.clone(),
                    kind: slot.kind(),
                    loaded: current.is_some(),
                    wit_version: current.as_ref().map(|p| p.wit_version.to_string()),
                    digest: current.as_ref().map(|p| p.identity.digest.clone()),
                    loaded_at: current
                        .as_ref()
                        .map(|p| humantime::format_rfc3339_seconds(p.loaded_at).to_string()),
                    calls: slot.calls.load(Ordering::Relaxed),
                    failures: slot.failures.load(Ordering::Relaxed),
                    cached_decisions: slot.cached_decisions.load(Ordering::Relaxed),
                    last_error: lock(&slot.last_error).clone(),
                    from_cache: current.as_ref().and_then(|p| p.from_cache),
                    in_place: current.as_ref().map(|p| p.placement.in_place()),
                    spare_ready: current.as_ref().map(|p| p.spare.is_ready()),
                    spare_calls: slot.spare_calls.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

impl Inner {
    fn preprocessors(&self, env_id: i64) -> Vec<Arc<Slot>> {
        self.slots
            .iter()
            .filter(|s| s.kind() == Some(PluginKind::Preprocessor) && s.applies_to(env_id))
            .cloned()
            .collect()
    }

    /// The chain both preprocessor hooks share: every preprocessor that applies, in configuration
    /// order, sees the request as the previous one left it. A rejection ends the chain (HTTP 400);
    /// a failed call or a bad answer (one that changes the environment or the tenant, or
    /// cannot be translated back) follows the plugin's `failOpen`.
    async fn preprocess<T>(
        &self,
        mut req: Subject<T>,
        invoke: PreprocessCall<T>,
    ) -> Result<Subject<T>, Rejection>
    where
        T: Clone + Send + Sync + 'static,
    {
        let env_id = i64::try_from(req.environment).unwrap_or(i64::MAX);
        for slot in self.preprocessors(env_id) {
            let request = req.clone();
            let result = self
                .call(&slot, move |store, pre| invoke(store, pre, &request))
                .await;
            match result {
                Ok(Ok(out)) => {
                    let checked = if out.environment != req.environment || out.tenant != req.tenant
                    {
                        Err("changed environment-id or principal")
                    } else {
                        Ok(out)
                    };
                    match checked {
                        Ok(next) => req = next,
                        Err(why) => {
                            self.record_failure(&slot, CallError::BadAnswer(why.into()));
                            self.fail_preprocessor(&slot, why)?;
                        }
                    }
                }
                Ok(Err(message)) => {
                    return Err(Rejection {
                        plugin: slot.name.clone(),
                        message,
                    })
                }
                Err(e) => self.fail_preprocessor(&slot, &e.to_string())?,
            }
        }
        Ok(req)
    }

    fn fail_preprocessor(&self, slot: &Slot, why: &str) -> Result<(), Rejection> {
        if slot.settings.load().entry.fail_open {
            tracing::warn!(plugin = %slot.name, "preprocessor failed ({why}); failOpen: request passes unchanged");
            Ok(())
        } else {
            Err(Rejection {
                plugin: slot.name.clone(),
                message: format!("request could not be checked: plugin {:?} {why}", slot.name),
            })
        }
    }

    fn record_failure(&self, slot: &Slot, error: CallError) {
        slot.failures.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::failure(&slot.name, &error);
        tracing::warn!(plugin = %slot.name, error = %error, "plugin call failed");
        slot.set_error(format!("call {error}"));
    }

    /// Runs `f` against a fresh instance of the slot's current version, on a blocking
    /// thread, within the call limits. `Ok(Err(message))` from `f` is a bad answer.
    async fn call<R, F>(&self, slot: &Arc<Slot>, f: F) -> Result<R, CallError>
    where
        R: Send + 'static,
        F: Fn(&mut Store<HostState>, &PluginInstance) -> Result<Result<R, String>, Failure>
            + Send
            + Sync
            + 'static,
    {
        slot.calls.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = self.call_inner(slot, f).await;
        crate::telemetry::call(&slot.name, started.elapsed());
        if let Err(e) = &result {
            self.record_failure(slot, e.clone());
        }
        result
    }

    async fn call_inner<R, F>(&self, slot: &Arc<Slot>, f: F) -> Result<R, CallError>
    where
        R: Send + 'static,
        F: Fn(&mut Store<HostState>, &PluginInstance) -> Result<Result<R, String>, Failure>
            + Send
            + Sync
            + 'static,
    {
        let Some(plugin) = slot.current.load_full() else {
            return Err(CallError::NotLoaded);
        };
        let limits: &Limits = &self.runtime.limits;
        let timeout_ms = limits.call_timeout_ms;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        // The plugin's own slots. A free one is taken without arming a timer; only a wait is
        // bounded by one.
        let permit = match slot.admission.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                match tokio::time::timeout_at(deadline, slot.admission.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(CallError::Host("admission semaphore closed".into())),
                    Err(_) => return Err(CallError::Timeout(timeout_ms)),
                }
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let placement = Arc::clone(&plugin.placement);
        // A store, and an instance if the version has a spare (armed for this call), for
        // one attempt.
        let prepare = {
            let (plugin, runtime) = (Arc::clone(&plugin), Arc::clone(&self.runtime));
            let (cancel, deadline, slot) = (cancel.clone(), deadline.into_std(), slot.clone());
            move || match plugin.spare.take() {
                Some((mut store, instance)) => {
                    slot.spare_calls.fetch_add(1, Ordering::Relaxed);
                    runtime.arm(&mut store, cancel.clone(), deadline);
                    (store, Some(instance))
                }
                None => {
                    let identity = Arc::clone(&plugin.identity);
                    (runtime.store(identity, cancel.clone(), deadline), None)
                }
            }
        };
        // One attempt: the instance (made now if there was no spare), the export called,
        // the outcome classified; the used store comes back.
        let attempt = {
            let limits = limits.clone();
            let f = Arc::new(f);
            let plugin = Arc::clone(&plugin);
            move |(mut store, instance): (Store<HostState>, Option<PluginInstance>)| {
                let spared = instance.is_some();
                let instance = match instance {
                    Some(instance) => Ok(instance),
                    None => plugin.pre.instantiate(&mut store),
                };
                let instantiated = instance.is_ok();
                let answer = match instance {
                    Ok(instance) => f(&mut store, &instance),
                    Err(e) => Err(Failure::Instantiate(e)),
                };
                let result = match answer {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(message)) => Err(CallError::BadAnswer(message)),
                    Err(Failure::Call(e)) => Err(Runtime::classify_with(&limits, &store, e)),
                    Err(Failure::Instantiate(e)) => {
                        let classified = Runtime::classify_with(&limits, &store, e);
                        Err(match classified {
                            CallError::Trap(m) => CallError::Instantiate(m),
                            other => other,
                        })
                    }
                };
                Runtime::forward_stderr(&store);
                Attempted {
                    result,
                    store,
                    spared,
                    instantiated,
                }
            }
        };
        // After an attempt in a spare: the keeper drops the used store (then releases the
        // permit) and makes the next spare. After one that found none (calls come faster
        // than spares are made): the store is dropped here, and the next spare made later,
        // unless this version could not be instantiated at all.
        let finish = {
            let (keeper, plugin) = (self.keeper.clone(), Arc::clone(&plugin));
            move |attempted: Attempted<R>, permit: OwnedSemaphorePermit| {
                if attempted.spared {
                    keeper.retire(attempted.store, permit);
                    keeper.refill(&plugin);
                } else {
                    drop(attempted.store);
                    drop(permit);
                    if attempted.instantiated {
                        keeper.refill_later(&plugin);
                    }
                }
                attempted.result
            }
        };
        if !limits.inline_calls {
            let (prepared, run, finish) = (prepare(), attempt.clone(), finish.clone());
            return self
                .call_in_blocking_pool(move || finish(run(prepared), permit), deadline, cancel)
                .await;
        }
        // In place for a version whose calls have proved short: no thread hand-off at all
        // (on a busy machine every hand-off waits for the scheduler). Otherwise off the
        // executor. Either way the wall-clock deadline is enforced by the store's epoch
        // callback.
        let budget = Duration::from_micros(limits.in_place_budget_us);
        let started = std::time::Instant::now();
        if placement.next() == Where::InPlace {
            let prepared = prepare();
            let run = attempt.clone();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || run(prepared))) {
                Ok(attempted) => {
                    let result = finish.clone()(attempted, permit);
                    let took = started.elapsed();
                    if placement.record(took, budget, stopped(&result)) {
                        tracing::warn!(
                            plugin = %slot.name,
                            took_us = took.as_micros() as u64,
                            budget_us = limits.in_place_budget_us,
                            "a plugin call ran longer than the in-place budget; this version's calls now run off the async workers"
                        );
                    }
                    return result;
                }
                Err(_) => {
                    // wasmtime-wasi's synchronous WASI functions that wait (stdio streams,
                    // `poll`: e.g. a guest's panic message on stderr) block on tokio, which
                    // panics on an async worker. The instance is gone with its store; the
                    // call runs again off the executor, where they work, and so do all
                    // later calls of this version.
                    placement.record(Duration::MAX, budget, true);
                    tracing::warn!(
                        plugin = %slot.name,
                        "a plugin call used a WASI function that waits (stdio, poll); this version's calls now run off the async workers"
                    );
                }
            }
        }
        let (prepared, run) = (prepare(), attempt.clone());
        let result = if inline_calls_possible() {
            // `block_in_place` hands this worker's other tasks to another thread first, so
            // the executor keeps serving while the guest runs here.
            tokio::task::block_in_place(move || catch_panic(move || finish(run(prepared), permit)))
        } else {
            self.call_in_blocking_pool(move || finish(run(prepared), permit), deadline, cancel)
                .await
        };
        placement.record(started.elapsed(), budget, stopped(&result));
        result
    }

    /// Runs `run` on tokio's blocking pool, giving up at `deadline` (the guest then stops at
    /// its next epoch check). `run` holds the call's admission permit until the guest has
    /// really stopped.
    async fn call_in_blocking_pool<R: Send + 'static>(
        &self,
        run: impl FnOnce() -> Result<R, CallError> + Send + 'static,
        deadline: tokio::time::Instant,
        cancel: Arc<AtomicBool>,
    ) -> Result<R, CallError> {
        let task = tokio::task::spawn_blocking(run);
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(CallError::Host(format!("call panicked: {join}"))),
            Err(_) => {
                // The guest stops at its next epoch check.
                cancel.store(true, Ordering::Relaxed);
                Err(CallError::Timeout(self.runtime.limits.call_timeout_ms))
            }
        }
    }

    /// Re-reads every plugin file and reloads those that changed.
    pub(crate) async fn reload_all(self: &Arc<Self>) {
        let _guard = self.reload_lock.lock().await;
        crate::telemetry::rescan();
        for slot in &self.slots {
            self.reload_slot(slot).await;
        }
    }

    async fn reload_slot(self: &Arc<Self>, slot: &Arc<Slot>) {
        let settings = slot.settings.load_full();
        let bytes = match tokio::fs::read(&settings.path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if slot.current.swap(None).is_some() {
                    tracing::info!(plugin = %slot.name, path = %settings.path.display(), "plugin file removed; plugin unloaded");
                    slot.set_error(format!("file {} was removed", settings.path.display()));
                } else if lock(&slot.last_error).is_none() {
                    tracing::warn!(plugin = %slot.name, path = %settings.path.display(), "plugin file not found");
                    slot.set_error(format!("file {} not found", settings.path.display()));
                }
                *lock(&slot.failed_digest) = None;
                return;
            }
            Err(e) => {
                let e = PluginError::Read {
                    path: settings.path.clone(),
                    source: e,
                };
                tracing::error!(plugin = %slot.name, error = %e, "cannot read plugin file");
                slot.set_error(e.to_string());
                return;
            }
        };
        let digest = loader::sha256_hex(&bytes);
        let expected = settings.entry.kind;
        if slot.current.load().as_ref().is_some_and(|p| {
            p.identity.digest == digest && expected.is_none_or(|k| k == p.identity.kind)
        }) || lock(&slot.failed_digest).as_deref() == Some(digest.as_str())
        {
            return;
        }
        let path = settings.path.clone();
        let name = slot.name.clone();
        let config = slot.config.load_full();
        let inner = Arc::clone(self);
        // Compilation is CPU-bound: keep it off the async executor.
        let loaded = tokio::task::spawn_blocking(move || {
            loader::load(&inner.runtime, &path, &bytes, expected, name, config)
        })
        .await
        .unwrap_or_else(|join| {
            Err(PluginError::Compile {
                path: settings.path.clone(),
                message: format!("compilation panicked: {join}"),
            })
        });
        match loaded {
            Ok((plugin, details)) => {
                tracing::info!(
                    plugin = %slot.name,
                    kind = %plugin.identity.kind,
                    wit_version = %plugin.wit_version,
                    digest = %plugin.identity.digest,
                    compile_ms = details.compile_ms,
                    from_cache = ?details.from_cache,
                    "plugin loaded"
                );
                let plugin = Arc::new(plugin);
                self.keeper.refill(&plugin);
                slot.current.store(Some(plugin));
                *lock(&slot.failed_digest) = None;
                *lock(&slot.last_error) = None;
            }
            Err(e) => {
                let keeping = if slot.current.load().is_some() {
                    "; the previous version keeps serving"
                } else {
                    ""
                };
                tracing::error!(plugin = %slot.name, error = %e, "plugin not loaded{keeping}");
                slot.set_error(format!("{e}{keeping}"));
                *lock(&slot.failed_digest) = Some(digest);
            }
        }
    }

    pub(crate) fn directory(&self) -> &Path {
        &self.config.directory
    }

    pub(crate) fn debounce(&self) -> Duration {
        Duration::from_millis(self.config.debounce_ms)
    }

    /// The file names of the configured plugins.
    pub(crate) fn file_names(&self) -> HashSet<std::ffi::OsString> {
        self.slots
            .iter()
            .filter_map(|s| s.settings.load().path.file_name().map(|n| n.to_os_string()))
            .collect()
    }
}

/// The observer worker: takes batches of events from the queue and hands each batch to
/// every observer in turn (each call bounded like any other). Ends when the host is gone.
async fn deliver_events(
    inner: std::sync::Weak<Inner>,
    mut rx: tokio::sync::mpsc::Receiver<LifecycleEvent>,
) {
    let mut batch = Vec::new();
    loop {
        let limit = match inner.upgrade() {
            Some(inner) => inner.config.observer_batch,
            None => return,
        };
        batch.clear();
        if rx.recv_many(&mut batch, limit).await == 0 {
            return;
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let events: Arc<Vec<v2::types::LifecycleEvent>> =
            Arc::new(batch.iter().map(Into::into).collect());
        for slot in inner
            .slots
            .iter()
            .filter(|s| s.kind() == Some(PluginKind::Observer))
        {
            let count = events.len() as u64;
            let events = Arc::clone(&events);
            let delivered = inner
                .call(slot, move |store, instance| match instance {
                    PluginInstance::Observer(instance) => instance
                        .poseidon_plugins_observer()
                        .call_observe(&mut *store, &events)
                        .map(Ok)
                        .map_err(Failure::Call),
                    _ => Ok(Err("the loaded file is not an observer".to_string())),
                })
                .await;
            if delivered.is_ok() {
                inner.observer_delivered.fetch_add(count, Ordering::Relaxed);
            }
        }
    }
}

/// Describes a plugin file: compiles it and checks it as a load would (kind, WIT
/// version, imports satisfiable, instantiable). For `poseidon plugin check FILE`.
pub fn check_file(path: &Path) -> Result<PluginDescription, PluginError> {
    check_file_cached(path, None)
}

/// [`check_file`] with wasmtime's compile cache in `cache_directory`, so that checking
/// an unchanged file again does not compile it again.
pub fn check_file_cached(
    path: &Path,
    cache_directory: Option<&Path>,
) -> Result<PluginDescription, PluginError> {
    let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let limits = Limits {
        pooling: false,
        ..Limits::default()
    };
    let runtime = Runtime::new(&limits, 1, cache_directory)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (plugin, details) = loader::load(
        &runtime,
        path,
        &bytes,
        None,
        name,
        Arc::new(BTreeMap::new()),
    )?;
    Ok(PluginDescription {
        kind: plugin.identity.kind,
        wit_version: plugin.wit_version.to_string(),
        digest: plugin.identity.digest.clone(),
        size: bytes.len() as u64,
        imports: details.imports,
        exports: details.exports,
        compile_ms: details.compile_ms,
        from_cache: details.from_cache,
    })
}
