//! The wasmtime side: engine, epoch ticker, linker, per-call store state, and the
//! bounded execution of one call.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::{v1, v2};
use crate::config::{Limits, PluginKind};
use crate::error::{CallError, PluginError};

/// Most bytes of guest stderr kept per call (the rest is dropped).
const STDERR_CAPTURE: usize = 16 * 1024;
/// Most `log` lines forwarded per call.
const MAX_LOG_LINES: u32 = 100;
/// Longest forwarded log message, in bytes.
const MAX_LOG_MESSAGE: usize = 4096;

/// wasmtime's compile cache in `directory` (made absolute and created if missing), or
/// `None` with a warning when it cannot be used: plugins are then compiled at every start.
fn compile_cache(directory: &Path) -> Option<wasmtime::Cache> {
    let directory = std::path::absolute(directory).unwrap_or_else(|_| directory.to_path_buf());
    let mut config = wasmtime::CacheConfig::new();
    config.with_directory(&directory);
    match wasmtime::Cache::new(config) {
        Ok(cache) => Some(cache),
        Err(e) => {
            tracing::warn!(
                directory = %directory.display(),
                error = %format!("{e:#}"),
                "the plugin compile cache is unusable; plugins are compiled at every start"
            );
            None
        }
    }
}

/// Identity of a loaded plugin version, for log lines.
#[derive(Debug)]
pub(crate) struct PluginIdentity {
    pub name: String,
    pub kind: PluginKind,
    pub digest: String,
    pub config: Arc<BTreeMap<String, String>>,
}

/// Why the guest was stopped from the epoch callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Interrupted {
    /// The call's run-time budget is used up.
    #[error("epoch deadline reached")]
    Deadline,
    /// The caller gave up (wall-clock timeout).
    #[error("call cancelled")]
    Cancelled,
}

/// A `ResourceLimiter` that caps each linear memory and remembers a refused growth,
/// so that the resulting trap can be reported as "memory limit exceeded".
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    refused: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.max_bytes;
        if !ok {
            self.refused = true;
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Store data of one call.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    plugin: Arc<PluginIdentity>,
    log_lines: u32,
    ticks_left: u64,
    cancel: Arc<AtomicBool>,
    /// The call's wall-clock deadline, checked at every epoch tick.
    deadline: Instant,
    stderr: CappedPipe,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    fn log_line(&mut self, level: tracing::Level, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            return;
        }
        let mut message = message;
        if message.len() > MAX_LOG_MESSAGE {
            let mut cut = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let p = &self.plugin;
        let digest = &p.digest[..12.min(p.digest.len())];
        match level {
            tracing::Level::TRACE => {
                tracing::trace!(plugin = %p.name, kind = %p.kind, digest, "{message}")
            }
            tracing::Level::DEBUG => {
                tracing::debug!(plugin = %p.name, kind = %p.kind, digest, "{message}")
            }
            tracing::Level::INFO => {
                tracing::info!(plugin = %p.name, kind = %p.kind, digest, "{message}")
            }
            tracing::Level::WARN => {
                tracing::warn!(plugin = %p.name, kind = %p.kind, digest, "{message}")
            }
            tracing::Level::ERROR => {
                tracing::error!(plugin = %p.name, kind = %p.kind, digest, "{message}")
            }
        }
        if self.log_lines == MAX_LOG_LINES {
            tracing::warn!(plugin = %p.name, "further log lines of this call are dropped");
        }
    }

    fn config_value(&self, key: &str) -> Option<String> {
        self.plugin.config.get(key).cloned()
    }

    fn config_list(&self) -> Vec<(String, String)> {
        self.plugin
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// The `host` interface of one WIT version, implemented by [`HostState`]'s shared methods.
macro_rules! host_interface {
    ($version:ident) => {
        impl crate::bindings::$version::host::Host for HostState {
            fn log(&mut self, level: crate::bindings::$version::host::LogLevel, message: String) {
                use crate::bindings::$version::host::LogLevel as L;
                let level = match level {
                    L::Trace => tracing::Level::TRACE,
                    L::Debug => tracing::Level::DEBUG,
                    L::Info => tracing::Level::INFO,
                    L::Warn => tracing::Level::WARN,
                    L::Error => tracing::Level::ERROR,
                };
                self.log_line(level, message)
            }

            fn config_get(&mut self, key: String) -> Option<String> {
                self.config_value(&key)
            }

            fn config_entries(&mut self) -> Vec<(String, String)> {
                self.config_list()
            }
        }

        impl crate::bindings::$version::types::Host for HostState {}
    };
}

host_interface!(v1);
host_interface!(v2);

/// The engine and what belongs to it: linker, limits, ticker lifetime.
pub(crate) struct Runtime {
    pub engine: Engine,
    pub linker: Linker<HostState>,
    pub limits: Limits,
    /// The engine's compile cache (a handle sharing its hit counter), if one is in use.
    pub cache: Option<wasmtime::Cache>,
    /// Keeps the epoch ticker thread alive; it stops once this is dropped.
    _ticker_alive: Arc<()>,
}

impl Runtime {
    /// Creates the engine for `plugins` plugin entries (pooling if configured and possible;
    /// compiled code cached in `cache_directory` if given), the linker with WASI (nothing
    /// granted) and the host interface, and starts the epoch ticker.
    pub fn new(
        limits: &Limits,
        plugins: u32,
        cache_directory: Option<&Path>,
    ) -> Result<Runtime, PluginError> {
        let cache = cache_directory.and_then(compile_cache);
        let engine = if limits.pooling {
            match Self::engine(limits, Some(plugins), cache.clone()) {
                Ok(engine) => engine,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "pooling allocator unavailable, using on-demand allocation"
                    );
                    Self::engine(limits, None, cache.clone())?
                }
            }
        } else {
            Self::engine(limits, None, cache.clone())?
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Engine(format!("WASI: {e}")))?;
        // Both versions of the host interface: their names differ (`@0.1.0`, `@0.2.0`).
        v1::host::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("host interface 0.1: {e}")))?;
        v2::host::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("host interface 0.2: {e}")))?;
        let alive = Arc::new(());
        spawn_ticker(
            engine.clone(),
            Arc::downgrade(&alive),
            Duration::from_millis(limits.epoch_tick_ms.max(1)),
        )?;
        Ok(Runtime {
            engine,
            linker,
            limits: limits.clone(),
            cache,
            _ticker_alive: alive,
        })
    }

    /// The engine; with `pooling` (the number of plugin entries) on the pooling allocator.
    fn engine(
        limits: &Limits,
        pooling: Option<u32>,
        cache: Option<wasmtime::Cache>,
    ) -> Result<Engine, PluginError> {
        let mut config = wasmtime::Config::new();
        // wasmtime's own cache: entries are keyed by the component's bytes, the compiler's
        // version and every engine setting that affects code, so a changed file or setting
        // simply misses; nothing is deserialized that this engine did not write.
        config.cache(cache);
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.consume_fuel(limits.fuel.is_some());
        let memory_bytes = memory_limit_bytes(limits);
        if let Some(plugins) = pooling {
            // Enough for every admitted call (each plugin has its own `maxConcurrentCalls`)
            // plus loads, checks and spares, with margin: Rust components have a handful of
            // core instances and one or two memories.
            let slots = plugins
                .max(1)
                .saturating_mul(limits.max_concurrent_calls.max(1))
                .saturating_add(8 + crate::spare::MAX_SPARES);
            let keep_resident = usize::try_from(limits.keep_resident_kb.saturating_mul(1024))
                .unwrap_or(usize::MAX)
                .min(memory_bytes);
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            pool.total_component_instances(slots)
                .total_core_instances(slots.saturating_mul(16))
                .total_memories(slots.saturating_mul(2))
                .total_tables(slots.saturating_mul(8))
                .total_stacks(slots)
                .max_memories_per_component(4)
                .max_memory_size(memory_bytes)
                // Reset a freed slot's dirty pages in place (found with PAGEMAP_SCAN where the
                // kernel has it) instead of `madvise`, so the next instance does not
                // page-fault its way back into the memory a plugin touches on every call.
                .linear_memory_keep_resident(keep_resident)
                .table_keep_resident(keep_resident.min(64 * 1024))
                .pagemap_scan(if keep_resident > 0 {
                    wasmtime::Enabled::Auto
                } else {
                    wasmtime::Enabled::No
                });
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        Engine::new(&config).map_err(|e| PluginError::Engine(e.to_string()))
    }

    /// A fresh store for one call of `plugin`; the guest is stopped at the first epoch
    /// tick after `cancel` is set or `deadline` has passed.
    pub fn store(
        &self,
        plugin: Arc<PluginIdentity>,
        cancel: Arc<AtomicBool>,
        deadline: Instant,
    ) -> Store<HostState> {
        let stderr = CappedPipe::new(STDERR_CAPTURE);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: memory_limit_bytes(&self.limits),
                refused: false,
            },
            plugin,
            // Set by `arm` below.
            log_lines: 0,
            ticks_left: 0,
            cancel: Arc::clone(&cancel),
            deadline,
            stderr,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        self.arm(&mut store, cancel, deadline);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if state.cancel.load(Ordering::Relaxed) || Instant::now() >= state.deadline {
                return Err(wasmtime::Error::new(Interrupted::Cancelled));
            }
            state.ticks_left = state.ticks_left.saturating_sub(1);
            if state.ticks_left == 0 {
                return Err(wasmtime::Error::new(Interrupted::Deadline));
            }
            Ok(UpdateDeadline::Continue(1))
        });
        store
    }

    /// A store for instantiating `plugin` outside a call (the load's smoke test, a spare):
    /// its start-up code bounded like a call from now, with nobody to cancel it.
    pub fn instantiation_store(&self, plugin: Arc<PluginIdentity>) -> Store<HostState> {
        let deadline = Instant::now() + Duration::from_millis(self.limits.call_timeout_ms);
        self.store(plugin, Arc::new(AtomicBool::new(false)), deadline)
    }

    /// Gives `store` a call's full budget from now: fuel, epoch ticks, log lines, and
    /// `cancel` and `deadline` as the call's wall-clock bounds. [`Runtime::store`] arms a
    /// new store; a spare instance's store is armed again when a call takes it.
    pub fn arm(&self, store: &mut Store<HostState>, cancel: Arc<AtomicBool>, deadline: Instant) {
        let state = store.data_mut();
        state.cancel = cancel;
        state.deadline = deadline;
        state.ticks_left = self.limits.epoch_deadline_ticks.max(1);
        state.log_lines = 0;
        state.limiter.refused = false;
        if let Some(fuel) = self.limits.fuel {
            // Cannot fail: fuel is enabled in the engine whenever `limits.fuel` is set.
            let _ = store.set_fuel(fuel);
        }
        store.set_epoch_deadline(1);
    }

    /// Turns a wasmtime error of a call into a [`CallError`].
    pub fn classify(&self, store: &Store<HostState>, error: wasmtime::Error) -> CallError {
        Self::classify_with(&self.limits, store, error)
    }

    /// [`Runtime::classify`] with explicit limits (for blocking threads).
    pub fn classify_with(
        limits: &Limits,
        store: &Store<HostState>,
        error: wasmtime::Error,
    ) -> CallError {
        if let Some(i) = error.downcast_ref::<Interrupted>() {
            return match i {
                Interrupted::Deadline => CallError::Deadline(
                    limits.epoch_deadline_ticks.max(1) * limits.epoch_tick_ms.max(1),
                ),
                Interrupted::Cancelled => CallError::Timeout(limits.call_timeout_ms),
            };
        }
        if let Some(wasmtime::Trap::OutOfFuel) = error.downcast_ref::<wasmtime::Trap>() {
            return CallError::OutOfFuel(limits.fuel.unwrap_or(0));
        }
        if store.data().limiter.refused {
            return CallError::Memory(limits.memory_mb);
        }
        let mut message = match error.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => trap.to_string(),
            None => format!("{error:#}"),
        };
        if let Some(line) = last_stderr_line(store) {
            message.push_str(": ");
            message.push_str(&line);
        }
        CallError::Trap(message)
    }

    /// Forwards what the guest wrote to stderr during the call into the log.
    pub fn forward_stderr(store: &Store<HostState>) {
        let text = stderr_text(store);
        let p = &store.data().plugin;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::warn!(plugin = %p.name, kind = %p.kind, "stderr: {line}");
        }
    }
}

fn memory_limit_bytes(limits: &Limits) -> usize {
    usize::try_from(limits.memory_mb.max(1).saturating_mul(1 << 20)).unwrap_or(usize::MAX)
}

fn stderr_text(store: &Store<HostState>) -> String {
    // The capture is shared by all clones of the pipe handed to the WASI context.
    String::from_utf8_lossy(&store.data().stderr.contents()).into_owned()
}

fn last_stderr_line(store: &Store<HostState>) -> Option<String> {
    let text = stderr_text(store);
    // The last meaningful line: for a Rust panic, its message (the line after
    // "thread '..' panicked at file:line:"), not the RUST_BACKTRACE hint.
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .map(|l| l.trim().chars().take(500).collect())
}

/// Spawns the thread that advances the engine's epoch every `tick`, until `alive`
/// can no longer be upgraded.
fn spawn_ticker(engine: Engine, alive: Weak<()>, tick: Duration) -> Result<(), PluginError> {
    std::thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || {
            while alive.upgrade().is_some() {
                std::thread::sleep(tick);
                engine.increment_epoch();
            }
        })
        .map(|_| ())
        .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))
}

/// A WASI output stream that keeps the first `capacity` bytes and silently drops the
/// rest, so a chatty guest neither grows host memory nor fails its writes.
#[derive(Clone)]
pub(crate) struct CappedPipe {
    capacity: usize,
    buffer: Arc<Mutex<Vec<u8>>>,
}

impl CappedPipe {
    fn new(capacity: usize) -> Self {
        CappedPipe {
            capacity,
            buffer: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut buf = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.capacity.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn contents(&self) -> Vec<u8> {
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arming_a_store_gives_it_a_whole_new_budget() {
        let limits = Limits {
            pooling: false,
            fuel: Some(1_000),
            ..Limits::default()
        };
        let runtime = Runtime::new(&limits, 1, None).unwrap();
        let identity = Arc::new(PluginIdentity {
            name: "p".into(),
            kind: PluginKind::Preprocessor,
            digest: "d".into(),
            config: Arc::default(),
        });
        // A spare's store, made long ago and used up: deadline passed, ticks and fuel
        // spent, log lines counted, a refused growth remembered.
        let past = Instant::now();
        let mut store = runtime.store(identity, Arc::new(AtomicBool::new(true)), past);
        store.set_fuel(3).unwrap();
        let state = store.data_mut();
        state.ticks_left = 0;
        state.log_lines = MAX_LOG_LINES;
        state.limiter.refused = true;

        let cancel = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(60);
        runtime.arm(&mut store, Arc::clone(&cancel), deadline);
        let state = store.data();
        assert!(Arc::ptr_eq(&state.cancel, &cancel));
        assert_eq!(state.deadline, deadline);
        assert_eq!(state.ticks_left, limits.epoch_deadline_ticks);
        assert_eq!(state.log_lines, 0);
        assert!(!state.limiter.refused);
        assert_eq!(store.get_fuel().unwrap(), 1_000);
    }
}
