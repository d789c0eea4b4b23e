//! Spare instances: the next call's fresh instance, made before the call.
//!
//! A call needs a new store and a new instance, and leaves a used store behind. Inside a
//! running server, where the CPU's caches are cold between requests, those three cost
//! about as much as the guest's own work (BENCHMARKS.md, issue 9, an instrumented build:
//! store ~5–10 µs, instantiation ~20–40 µs, drop ~12–20 µs per call; with spares a call's
//! p50 in the server dropped by 10–15 µs). So each loaded version keeps one spare: an
//! instance made by the host's keeper thread after the previous call, never called. A
//! call takes it (or, if there is none, instantiates as before), and hands its used store
//! to the keeper, which drops it and makes the next spare, off the request's path.
//!
//! Where calls come faster than the keeper makes spares (back to back, as in a loop), a
//! call that finds none makes and drops its instance itself, as without spares, and the
//! keeper makes the next spare only [`LATER`] after such a miss: the keeper working next
//! to a stream of calls would slow every one of them (contention on the instance pool and
//! on the caches: measured 2× slower, BENCHMARKS.md).
//!
//! Isolation is unchanged: every call runs in an instance no call ran in before, and a
//! used store is only dropped. The spare's budget (fuel, epoch ticks, wall-clock bounds)
//! is given when a call takes it ([`Runtime::arm`]). A used store keeps its call's
//! admission permit until the keeper has dropped it, so admission still bounds the
//! pooling allocator's slots in use (and at most [`MAX_RETIRING`] stores wait for the
//! keeper: a call finding more drops its own); spares have [`MAX_SPARES`] slots of their
//! own.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use wasmtime::Store;

use crate::error::PluginError;
use crate::loader::{LoadedPlugin, PluginInstance};
use crate::runtime::{HostState, Runtime};

/// Most spares alive at once (the pooling allocator reserves this many slots more).
pub(crate) const MAX_SPARES: u32 = 16;

/// How long after a call that found no spare the keeper makes the next one.
pub(crate) const LATER: Duration = Duration::from_millis(10);

/// A made instance and its store, not called yet.
struct Ready {
    store: Store<HostState>,
    instance: PluginInstance,
    /// Counts this spare in [`Keeper`]'s total while it is one.
    _counted: Counted,
}

/// One count in a shared total, given back on drop.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The spare of one loaded version: none, or one instance ready for a call.
#[derive(Default)]
pub(crate) struct Spare {
    ready: Mutex<Option<Ready>>,
    /// A spare is asked for [`LATER`] (at most one such request at a time).
    later: AtomicBool,
}

impl Spare {
    /// Takes the spare, if there is one.
    pub fn take(&self) -> Option<(Store<HostState>, PluginInstance)> {
        let ready = self.lock().take()?;
        Some((ready.store, ready.instance))
    }

    /// Whether a spare is ready.
    pub fn is_ready(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Ready>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The keeper thread's work, in order of arrival.
enum Job {
    /// A call is over: drop its store, then release its admission permit.
    Retire(Store<HostState>, OwnedSemaphorePermit),
    /// Make a spare for this version if it is still loaded somewhere and has none.
    Refill(Weak<LoadedPlugin>),
    /// The same, [`LATER`].
    RefillLater(Weak<LoadedPlugin>),
}

/// The host's keeper: a thread that drops used stores and makes spares. It ends when
/// the keeper is dropped (with the host). Without spares (`limits.spareInstances:
/// false`) there is no thread and a used store is dropped where its call ran.
#[derive(Clone)]
pub(crate) struct Keeper {
    jobs: Option<mpsc::Sender<Job>>,
    /// Used stores handed to the keeper and not dropped yet.
    retiring: Arc<AtomicUsize>,
}

/// Most used stores waiting for the keeper; a call finding this many drops its own. A
/// waiting store holds its call's admission permit, so a keeper thread the scheduler keeps
/// waiting must not hold up later calls.
const MAX_RETIRING: usize = 2;

impl Keeper {
    /// Starts the keeper thread for the plugins of `runtime`, if its limits want spares.
    pub fn start(runtime: Arc<Runtime>) -> Result<Keeper, PluginError> {
        let retiring = Arc::new(AtomicUsize::new(0));
        if !runtime.limits.spare_instances {
            return Ok(Keeper {
                jobs: None,
                retiring,
            });
        }
        let (jobs, queue) = mpsc::channel();
        let dropped = Arc::clone(&retiring);
        std::thread::Builder::new()
            .name("plugin-spares".into())
            .spawn(move || keep(&runtime, &queue, &dropped))
            .map_err(|e| PluginError::Engine(format!("cannot start the spare keeper: {e}")))?;
        Ok(Keeper {
            jobs: Some(jobs),
            retiring,
        })
    }

    /// Drops `store` on the keeper thread, and `permit` after it; without a keeper thread,
    /// if it is gone, or if [`MAX_RETIRING`] stores are waiting for it already, here and now.
    pub fn retire(&self, store: Store<HostState>, permit: OwnedSemaphorePermit) {
        let job = Job::Retire(store, permit);
        let Some(jobs) = &self.jobs else {
            return drop(job);
        };
        if self.retiring.fetch_add(1, Ordering::Relaxed) >= MAX_RETIRING {
            self.retiring.fetch_sub(1, Ordering::Relaxed);
            return drop(job);
        }
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            self.retiring.fetch_sub(1, Ordering::Relaxed);
            drop(job);
        }
    }

    /// Asks for a spare for `plugin` (nothing happens if it has one, or without spares).
    pub fn refill(&self, plugin: &Arc<LoadedPlugin>) {
        if let Some(jobs) = &self.jobs {
            if !plugin.spare.is_ready() {
                let _ = jobs.send(Job::Refill(Arc::downgrade(plugin)));
            }
        }
    }

    /// Asks for a spare for `plugin` in [`LATER`], unless that is asked already.
    pub fn refill_later(&self, plugin: &Arc<LoadedPlugin>) {
        if let Some(jobs) = &self.jobs {
            if !plugin.spare.later.swap(true, Ordering::Relaxed) {
                let _ = jobs.send(Job::RefillLater(Arc::downgrade(plugin)));
            }
        }
    }
}

/// The keeper thread: runs the jobs until every sender is gone.
fn keep(runtime: &Runtime, queue: &mpsc::Receiver<Job>, retiring: &AtomicUsize) {
    let alive = Arc::new(AtomicUsize::new(0));
    // Refills asked for later, in the order they are due.
    let mut later: std::collections::VecDeque<(Instant, Weak<LoadedPlugin>)> = Default::default();
    loop {
        let received = match later.front() {
            Some((due, _)) => queue.recv_timeout(due.saturating_duration_since(Instant::now())),
            None => queue
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let job = match received {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The first refill asked for later is due.
                if let Some(plugin) = later.pop_front().and_then(|(_, p)| p.upgrade()) {
                    plugin.spare.later.store(false, Ordering::Relaxed);
                    refill(runtime, &plugin, &alive);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        match job {
            Job::Retire(store, permit) => {
                drop(store);
                drop(permit);
                retiring.fetch_sub(1, Ordering::Relaxed);
            }
            Job::Refill(plugin) => {
                if let Some(plugin) = plugin.upgrade() {
                    refill(runtime, &plugin, &alive);
                }
            }
            Job::RefillLater(plugin) => later.push_back((Instant::now() + LATER, plugin)),
        }
    }
}

/// Makes a spare for `plugin` unless it has one or [`MAX_SPARES`] are alive.
fn refill(runtime: &Runtime, plugin: &LoadedPlugin, alive: &Arc<AtomicUsize>) {
    if plugin.spare.is_ready() {
        return;
    }
    if alive.fetch_add(1, Ordering::Relaxed) >= MAX_SPARES as usize {
        alive.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let counted = Counted(Arc::clone(alive));
    // A failure is not reported here: the next call instantiates in place and reports
    // it as that call's failure.
    if let Some((store, instance)) = make(runtime, plugin) {
        *plugin.spare.lock() = Some(Ready {
            store,
            instance,
            _counted: counted,
        });
    }
}

/// A new instance of `plugin`, its start-up code bounded like a call.
fn make(runtime: &Runtime, plugin: &LoadedPlugin) -> Option<(Store<HostState>, PluginInstance)> {
    let mut store = runtime.instantiation_store(Arc::clone(&plugin.identity));
    let instance = plugin.pre.instantiate(&mut store).ok()?;
    Some((store, instance))
}
