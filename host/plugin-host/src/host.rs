//! [`PluginHost`]: the plugins as the server sees them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component as PathComponent, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Semaphore;
use wasmtime::Store;

use crate::bindings::types as wit;

/// The preprocessor interface of a preprocessor plugin instance.
type PreprocessorGuest =
    crate::bindings::preprocessor::exports::poseidon::plugins::preprocessor::Guest;

/// The environment a request is for (preprocessors apply per environment).
trait HasEnvironment {
    fn environment_id(&self) -> i64;
}

impl HasEnvironment for ExecuteInput {
    fn environment_id(&self) -> i64 {
        self.environment_id
    }
}

impl HasEnvironment for FilesInput {
    fn environment_id(&self) -> i64 {
        self.environment_id
    }
}
use crate::config::{Limits, PluginEntry, PluginKind, PluginsConfig};
use crate::error::{CallError, PluginError};
use crate::loader::{self, LoadedPlugin, PluginPre};
use crate::runtime::{HostState, Runtime};
use crate::types::{
    AuthInput, Denial, ExecuteInput, FileEntry, FilesInput, PluginDescription, PluginStatus,
    PoolSizerInput, Principal, Rejection,
};

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
    runtime: Runtime,
    config: PluginsConfig,
    slots: Vec<Arc<Slot>>,
    admission: Arc<Semaphore>,
    last_sizes: Mutex<HashMap<i64, u32>>,
    /// Serializes reloads (initial load, watcher, [`PluginHost::reload`]).
    reload_lock: tokio::sync::Mutex<()>,
    /// Keeps the file watcher alive as long as the host.
    pub(crate) watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

/// One configured plugin entry and its currently loaded version.
struct Slot {
    entry: PluginEntry,
    name: String,
    path: PathBuf,
    config: Arc<BTreeMap<String, String>>,
    current: ArcSwapOption<LoadedPlugin>,
    /// Digest of the last file version that failed to load (not retried until changed).
    failed_digest: Mutex<Option<String>>,
    calls: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Slot {
    /// The configured kind, or else the kind of the loaded version.
    fn kind(&self) -> Option<PluginKind> {
        self.entry
            .kind
            .or_else(|| self.current.load().as_ref().map(|p| p.identity.kind))
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

/// The outcome of one attempt to call a guest export, before classification.
enum Failure {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
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
        let runtime = Runtime::new(&config.limits)?;
        let slots = config
            .entries
            .iter()
            .map(|entry| {
                Arc::new(Slot {
                    name: entry.display_name(),
                    path: config.directory.join(&entry.file),
                    config: Arc::new(entry.config.clone()),
                    entry: entry.clone(),
                    current: ArcSwapOption::empty(),
                    failed_digest: Mutex::new(None),
                    calls: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                })
            })
            .collect();
        let inner = Arc::new(Inner {
            admission: Arc::new(Semaphore::new(config.limits.max_concurrent_calls as usize)),
            runtime,
            config,
            slots,
            last_sizes: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            watcher: Mutex::new(None),
        });
        inner.reload_all().await;
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
            .find(|s| s.kind() == Some(PluginKind::PoolSizer) && s.entry.applies_to(env_id))?;
        let environment = wit::Environment {
            id: input.environment.id,
            image: input.environment.image,
            prewarming_pool_size: input.environment.prewarming_pool_size,
            cpu_limit: input.environment.cpu_limit,
            memory_limit: input.environment.memory_limit,
            network_access: input.environment.network_access,
            exposed_ports: input.environment.exposed_ports,
        };
        let mut claims = input.pool.claims_per_minute;
        if claims.len() > CLAIM_MINUTES {
            claims.drain(..claims.len() - CLAIM_MINUTES);
        }
        if claims.len() < CLAIM_MINUTES {
            let mut padded = vec![0; CLAIM_MINUTES - claims.len()];
            padded.extend(claims);
            claims = padded;
        }
        let state = wit::PoolState {
            configured_size: input.pool.configured_size,
            idle: input.pool.idle,
            used: input.pool.used,
            starting: input.pool.starting,
            claims_per_minute: claims,
            empty_pool_misses: input.pool.empty_pool_misses,
            now: input.pool.now,
        };
        let answer = inner
            .call(slot, move |store, pre| match pre {
                PluginPre::PoolSizer(pre) => {
                    let instance = pre.instantiate(&mut *store).map_err(Failure::Instantiate)?;
                    instance
                        .poseidon_plugins_pool_sizer()
                        .call_wanted_idle(&mut *store, &environment, &state)
                        .map_err(Failure::Call)
                        .map(Ok)
                }
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

    /// Runs an execute request through the preprocessors that apply to its
    /// environment, in configuration order. `Err` means: answer HTTP 400 with the
    /// rejection's message.
    pub async fn preprocess_execute(&self, req: ExecuteInput) -> Result<ExecuteInput, Rejection> {
        let Some(inner) = &self.inner else {
            return Ok(req);
        };
        inner
            .preprocess(
                req,
                |req| wit::ExecuteRequest {
                    command: req.command.clone(),
                    env: req.env.clone(),
                    time_limit: req.time_limit,
                    privileged: req.privileged,
                    environment_id: req.environment_id,
                    principal: req.principal.clone(),
                },
                |guest, store, request| guest.call_preprocess_execute(store, request),
                |req, out| {
                    if out.environment_id != req.environment_id || out.principal != req.principal {
                        return Err("changed environment-id or principal");
                    }
                    if out.time_limit < 0 {
                        return Err("answered a negative time limit");
                    }
                    Ok(ExecuteInput {
                        command: out.command,
                        env: out.env,
                        time_limit: out.time_limit,
                        privileged: out.privileged,
                        environment_id: req.environment_id,
                        principal: req.principal.clone(),
                    })
                },
            )
            .await
    }

    /// Runs a file update through the preprocessors that apply to its environment, in
    /// configuration order. `Err` means: answer HTTP 400 with the rejection's message.
    pub async fn preprocess_files(&self, req: FilesInput) -> Result<FilesInput, Rejection> {
        let Some(inner) = &self.inner else {
            return Ok(req);
        };
        inner
            .preprocess(
                req,
                |req| wit::FileUpdate {
                    copy: req
                        .copy
                        .iter()
                        .map(|f| wit::File {
                            path: f.path.clone(),
                            content: f.content.clone(),
                        })
                        .collect(),
                    delete: req.delete.clone(),
                    environment_id: req.environment_id,
                    principal: req.principal.clone(),
                },
                |guest, store, update| guest.call_preprocess_files(store, update),
                |req, out| {
                    if out.environment_id != req.environment_id || out.principal != req.principal {
                        return Err("changed environment-id or principal");
                    }
                    Ok(FilesInput {
                        copy: out
                            .copy
                            .into_iter()
                            .map(|f| FileEntry {
                                path: f.path,
                                content: f.content,
                            })
                            .collect(),
                        delete: out.delete,
                        environment_id: req.environment_id,
                        principal: req.principal.clone(),
                    })
                },
            )
            .await
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
    pub async fn authenticate(&self, req: AuthInput) -> Result<Principal, Denial> {
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
        let request = wit::AuthRequest {
            method: req.method.to_ascii_uppercase(),
            path: req.path,
            headers: req
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            peer_address: req.peer_address,
        };
        let result = inner
            .call(slot, move |store, pre| match pre {
                PluginPre::Authenticator(pre) => {
                    let instance = pre.instantiate(&mut *store).map_err(Failure::Instantiate)?;
                    instance
                        .poseidon_plugins_authenticator()
                        .call_authenticate(&mut *store, &request)
                        .map_err(Failure::Call)
                        .map(Ok)
                }
                _ => Ok(Err("the loaded file is not an authenticator".to_string())),
            })
            .await;
        let unavailable = |e: &CallError| Denial {
            status: 503,
            message: format!("authentication unavailable: plugin {:?} {e}", slot.name),
        };
        match result {
            Ok(Ok(p)) => Ok(Principal {
                tenant: p.tenant,
                environments: p.environments,
            }),
            Ok(Err(d)) if d.status == 401 || d.status == 403 => Err(Denial {
                status: d.status,
                message: d.message,
            }),
            Ok(Err(d)) => {
                let e = CallError::BadAnswer(format!(
                    "denial status {} (only 401 and 403 are allowed)",
                    d.status
                ));
                inner.record_failure(slot, e.clone());
                Err(unavailable(&e))
            }
            Err(e) => Err(unavailable(&e)),
        }
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
                    file: slot.entry.file.clone(),
                    kind: slot.kind(),
                    loaded: current.is_some(),
                    wit_version: current.as_ref().map(|p| p.wit_version.to_string()),
                    digest: current.as_ref().map(|p| p.identity.digest.clone()),
                    loaded_at: current
                        .as_ref()
                        .map(|p| humantime::format_rfc3339_seconds(p.loaded_at).to_string()),
                    calls: slot.calls.load(Ordering::Relaxed),
                    failures: slot.failures.load(Ordering::Relaxed),
                    last_error: lock(&slot.last_error).clone(),
                }
            })
            .collect()
    }
}

impl Inner {
    fn preprocessors(&self, env_id: i64) -> Vec<Arc<Slot>> {
        self.slots
            .iter()
            .filter(|s| s.kind() == Some(PluginKind::Preprocessor) && s.entry.applies_to(env_id))
            .cloned()
            .collect()
    }

    /// After a failed preprocessor call: `Ok` to go on (fail open), `Err` to reject.
    /// The chain both preprocessor hooks share: every preprocessor that applies, in configuration
    /// order, sees the request as the previous one left it. A rejection ends the chain (HTTP 400);
    /// a failed call or an answer `accept` refuses follows the plugin's `failOpen`.
    async fn preprocess<T, W>(
        &self,
        mut req: T,
        to_wit: impl Fn(&T) -> W,
        invoke: impl Fn(&PreprocessorGuest, &mut Store<HostState>, &W) -> wasmtime::Result<Result<W, String>>
            + Copy
            + Send
            + 'static,
        accept: impl Fn(&T, W) -> Result<T, &'static str>,
    ) -> Result<T, Rejection>
    where
        T: HasEnvironment,
        W: Send + 'static,
    {
        for slot in self.preprocessors(req.environment_id()) {
            let request = to_wit(&req);
            let result = self
                .call(&slot, move |store, pre| match pre {
                    PluginPre::Preprocessor(pre) => {
                        let instance =
                            pre.instantiate(&mut *store).map_err(Failure::Instantiate)?;
                        invoke(instance.poseidon_plugins_preprocessor(), store, &request)
                            .map_err(Failure::Call)
                            .map(Ok)
                    }
                    _ => Ok(Err("the loaded file is not a preprocessor".to_string())),
                })
                .await;
            match result {
                Ok(Ok(out)) => match accept(&req, out) {
                    Ok(next) => req = next,
                    Err(why) => {
                        self.record_failure(&slot, CallError::BadAnswer(why.into()));
                        self.fail_preprocessor(&slot, why)?;
                    }
                },
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
        if slot.entry.fail_open {
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
        tracing::warn!(plugin = %slot.name, error = %error, "plugin call failed");
        slot.set_error(format!("call {error}"));
    }

    /// Runs `f` against a fresh instance of the slot's current version, on a blocking
    /// thread, within the call limits. `Ok(Err(message))` from `f` is a bad answer.
    async fn call<R, F>(&self, slot: &Arc<Slot>, f: F) -> Result<R, CallError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store<HostState>, &PluginPre) -> Result<Result<R, String>, Failure>
            + Send
            + 'static,
    {
        slot.calls.fetch_add(1, Ordering::Relaxed);
        let result = self.call_inner(slot, f).await;
        if let Err(e) = &result {
            self.record_failure(slot, e.clone());
        }
        result
    }

    async fn call_inner<R, F>(&self, slot: &Arc<Slot>, f: F) -> Result<R, CallError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store<HostState>, &PluginPre) -> Result<Result<R, String>, Failure>
            + Send
            + 'static,
    {
        let Some(plugin) = slot.current.load_full() else {
            return Err(CallError::NotLoaded);
        };
        let limits: &Limits = &self.runtime.limits;
        let timeout_ms = limits.call_timeout_ms;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        let permit =
            match tokio::time::timeout_at(deadline, self.admission.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(CallError::Host("admission semaphore closed".into())),
                Err(_) => return Err(CallError::Timeout(timeout_ms)),
            };
        let cancel = Arc::new(AtomicBool::new(false));
        let store =
            self.runtime
                .store(plugin.identity.clone(), cancel.clone(), deadline.into_std());
        let runtime_limits = limits.clone();
        let run = move || {
            // The permit is held until the guest has really stopped.
            let _permit = permit;
            let mut store = store;
            let outcome = f(&mut store, &plugin.pre);
            let result = match outcome {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(message)) => Err(CallError::BadAnswer(message)),
                Err(Failure::Call(e)) => Err(Runtime::classify_with(&runtime_limits, &store, e)),
                Err(Failure::Instantiate(e)) => {
                    let classified = Runtime::classify_with(&runtime_limits, &store, e);
                    Err(match classified {
                        CallError::Trap(m) => CallError::Instantiate(m),
                        other => other,
                    })
                }
            };
            Runtime::forward_stderr(&store);
            result
        };
        if inline_calls_possible() {
            // On the multi-threaded runtime the guest runs right here: `block_in_place` hands
            // this worker's other tasks to another thread first, so the executor keeps serving,
            // and the call costs no thread switch (a hop to the blocking pool and back waits
            // for the scheduler twice, which on a busy machine is most of a call's time). The
            // wall-clock deadline is enforced by the store's epoch callback.
            return tokio::task::block_in_place(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                    .unwrap_or_else(|_| Err(CallError::Host("call panicked".into())))
            });
        }
        let task = tokio::task::spawn_blocking(run);
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(CallError::Host(format!("call panicked: {join}"))),
            Err(_) => {
                // The guest stops at its next epoch check.
                cancel.store(true, Ordering::Relaxed);
                Err(CallError::Timeout(timeout_ms))
            }
        }
    }

    /// Re-reads every plugin file and reloads those that changed.
    pub(crate) async fn reload_all(self: &Arc<Self>) {
        let _guard = self.reload_lock.lock().await;
        for slot in &self.slots {
            self.reload_slot(slot).await;
        }
    }

    async fn reload_slot(self: &Arc<Self>, slot: &Arc<Slot>) {
        let bytes = match tokio::fs::read(&slot.path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if slot.current.swap(None).is_some() {
                    tracing::info!(plugin = %slot.name, path = %slot.path.display(), "plugin file removed; plugin unloaded");
                    slot.set_error(format!("file {} was removed", slot.path.display()));
                } else if lock(&slot.last_error).is_none() {
                    tracing::warn!(plugin = %slot.name, path = %slot.path.display(), "plugin file not found");
                    slot.set_error(format!("file {} not found", slot.path.display()));
                }
                *lock(&slot.failed_digest) = None;
                return;
            }
            Err(e) => {
                let e = PluginError::Read {
                    path: slot.path.clone(),
                    source: e,
                };
                tracing::error!(plugin = %slot.name, error = %e, "cannot read plugin file");
                slot.set_error(e.to_string());
                return;
            }
        };
        let digest = loader::sha256_hex(&bytes);
        if slot
            .current
            .load()
            .as_ref()
            .is_some_and(|p| p.identity.digest == digest)
            || lock(&slot.failed_digest).as_deref() == Some(digest.as_str())
        {
            return;
        }
        let path = slot.path.clone();
        let expected = slot.entry.kind;
        let name = slot.name.clone();
        let config = slot.config.clone();
        let inner = Arc::clone(self);
        // Compilation is CPU-bound: keep it off the async executor.
        let loaded = tokio::task::spawn_blocking(move || {
            loader::load(&inner.runtime, &path, &bytes, expected, name, config)
        })
        .await
        .unwrap_or_else(|join| {
            Err(PluginError::Compile {
                path: slot.path.clone(),
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
                    "plugin loaded"
                );
                slot.current.store(Some(Arc::new(plugin)));
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
            .filter_map(|s| s.path.file_name().map(|n| n.to_os_string()))
            .collect()
    }
}

/// Describes a plugin file: compiles it and checks it as a load would (kind, WIT
/// version, imports satisfiable, instantiable). For `poseidon plugin check FILE`.
pub fn check_file(path: &Path) -> Result<PluginDescription, PluginError> {
    let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let limits = Limits {
        pooling: false,
        ..Limits::default()
    };
    let runtime = Runtime::new(&limits)?;
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
    })
}
