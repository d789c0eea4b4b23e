//! One environment's pool of idle runners and the reconciler that keeps it at its target size.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, RunnerBackend};
use crate::environment::EnvironmentConfig;
use crate::ids::RunnerId;
use crate::policy::{PoolPolicy, PoolSnapshot};

/// How often the reconciler re-checks a pool without being woken.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);
/// Most runners started at once for one environment.
const MAX_PARALLEL_STARTS: usize = 4;
/// Longest wait after repeated start failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// An environment with its idle pool. Idle runners are owned by the pool until claimed.
pub(crate) struct Environment {
    pub(crate) config: EnvironmentConfig,
    idle: Mutex<VecDeque<Arc<dyn RunnerBackend>>>,
    starting: AtomicUsize,
    target: AtomicU32,
    wake: Notify,
    stop: CancellationToken,
    claims: Mutex<ClaimHistory>,
    misses: AtomicU64,
    /// Runners the backend reported lost while they were still starting.
    lost_while_starting: Mutex<std::collections::HashSet<RunnerId>>,
    /// Why the newest runner start failed; cleared by the next successful start.
    start_failure: Mutex<Option<String>>,
}

impl Environment {
    pub(crate) fn new(config: EnvironmentConfig) -> Arc<Self> {
        let target = config.prewarming_pool_size;
        Arc::new(Self {
            config,
            idle: Mutex::new(VecDeque::new()),
            starting: AtomicUsize::new(0),
            target: AtomicU32::new(target),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            claims: Mutex::new(ClaimHistory::default()),
            misses: AtomicU64::new(0),
            lost_while_starting: Mutex::new(std::collections::HashSet::new()),
            start_failure: Mutex::new(None),
        })
    }

    /// Adds a runner to the idle pool, or hands it back when the environment is shut down.
    ///
    /// Checked under the idle lock that [`Environment::shut_down`] drains with, after it cancelled:
    /// a runner is either drained by the shutdown or handed back here, never left in a dead pool.
    pub(crate) fn add_idle(
        &self,
        runner: Arc<dyn RunnerBackend>,
    ) -> Result<(), Arc<dyn RunnerBackend>> {
        let mut idle = self.idle.lock().unwrap();
        if self.stop.is_cancelled() {
            return Err(runner);
        }
        idle.push_back(runner);
        self.idle_point(idle.back().map(|r| r.id()), true, idle.len());
        Ok(())
    }

    /// Poseidon's `poseidon_nomad_idle_runners` point: a runner joined or left the idle pool.
    fn idle_point(&self, runner: Option<&RunnerId>, created: bool, count: usize) {
        let Some(runner) = runner else { return };
        crate::monitoring::storage_change(
            "poseidon_nomad_idle_runners",
            runner.as_str(),
            created,
            count,
            || vec![("environment_id", self.config.id.to_string())],
        );
    }

    /// Takes an idle runner, recording the claim (or the miss).
    pub(crate) fn take_idle(&self) -> Option<Arc<dyn RunnerBackend>> {
        let runner = {
            let mut idle = self.idle.lock().unwrap();
            let runner = idle.pop_front();
            self.idle_point(runner.as_ref().map(|r| r.id()), false, idle.len());
            runner
        };
        match runner {
            Some(_) => self.claims.lock().unwrap().record(Instant::now()),
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.wake.notify_one();
        runner
    }

    /// Removes a specific idle runner (the backend lost it).
    pub(crate) fn remove_idle(&self, id: &RunnerId) -> Option<Arc<dyn RunnerBackend>> {
        let mut idle = self.idle.lock().unwrap();
        let position = idle.iter().position(|r| r.id() == id)?;
        let runner = idle.remove(position);
        self.idle_point(Some(id), false, idle.len());
        drop(idle);
        self.wake.notify_one();
        runner
    }

    /// Records a loss reported for a runner this pool does not hold (yet): if it is still
    /// starting, it must not join the pool when its start returns.
    pub(crate) fn note_lost(&self, id: &RunnerId) {
        if self.starting_count() > 0 {
            let mut lost = self.lost_while_starting.lock().unwrap();
            if lost.len() < 1024 {
                lost.insert(id.clone());
            }
        }
    }

    /// Why the newest runner start failed, while no start has succeeded since.
    pub(crate) fn start_failure(&self) -> Option<String> {
        self.start_failure.lock().unwrap().clone()
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().len()
    }

    pub(crate) fn starting_count(&self) -> usize {
        self.starting.load(Ordering::Relaxed)
    }

    /// Current target of idle runners (configured size or the policy's answer).
    pub(crate) fn target(&self) -> u32 {
        self.target.load(Ordering::Relaxed)
    }

    /// Whether [`Environment::shut_down`] was called.
    pub(crate) fn is_shut_down(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Stops the reconciler and hands back the idle runners for destruction.
    pub(crate) fn shut_down(&self) -> Vec<Arc<dyn RunnerBackend>> {
        self.stop.cancel();
        self.wake.notify_one();
        let drained: Vec<_> = self.idle.lock().unwrap().drain(..).collect();
        for runner in &drained {
            self.idle_point(Some(runner.id()), false, 0);
        }
        drained
    }

    fn snapshot(&self, used: u32) -> PoolSnapshot {
        PoolSnapshot {
            config: self.config.clone(),
            idle: self.idle_count() as u32,
            used,
            starting: self.starting_count() as u32,
            claims_per_minute: self.claims.lock().unwrap().per_minute(Instant::now()),
            empty_pool_misses: self.misses.load(Ordering::Relaxed),
            now_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        }
    }
}

/// Keeps `env`'s pool at its target until the environment is shut down.
pub(crate) async fn reconcile(
    env: Arc<Environment>,
    backend: Arc<dyn Backend>,
    policy: Option<Arc<dyn PoolPolicy>>,
    used: impl Fn() -> u32 + Send + Sync + 'static,
) {
    let mut failures: u32 = 0;
    let mut retry_at = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    loop {
        if env.stop.is_cancelled() {
            return;
        }
        let configured = env.config.prewarming_pool_size;
        let target = match &policy {
            Some(policy) => policy
                .desired_idle(&env.snapshot(used()))
                .await
                .unwrap_or(configured),
            None => configured,
        };
        env.target.store(target, Ordering::Relaxed);
        let target = target as usize;
        let idle = env.idle_count();
        let starting = env.starting_count();
        if idle + starting < target && Instant::now() >= retry_at {
            let room = MAX_PARALLEL_STARTS.saturating_sub(starting);
            for _ in 0..(target - idle - starting).min(room) {
                env.starting.fetch_add(1, Ordering::Relaxed);
                let env = Arc::clone(&env);
                let backend = Arc::clone(&backend);
                let done = done_tx.clone();
                tokio::spawn(async move {
                    let id = RunnerId::generate(env.config.id);
                    let started = Instant::now();
                    let result = backend.create_runner(&env.config, id).await;
                    let ok = result.is_ok();
                    *env.start_failure.lock().unwrap() =
                        result.as_ref().err().map(ToString::to_string);
                    if let Ok(runner) = &result {
                        crate::monitoring::record(|| crate::monitoring::Point {
                            measurement: "poseidon_nomad_idle_runners",
                            tags: vec![
                                ("environment_id", env.config.id.to_string()),
                                ("runner_id", runner.id().to_string()),
                            ],
                            fields: vec![(
                                "startup_duration",
                                crate::monitoring::Field::Int(
                                    i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX),
                                ),
                            )],
                        });
                    }
                    metrics::histogram!("poseidon_runner_start_duration_seconds",
                        "environment" => env.config.id.to_string(),
                        "outcome" => if ok { "ok" } else { "error" })
                    .record(started.elapsed());
                    match result {
                        Ok(runner)
                            if env.lost_while_starting.lock().unwrap().remove(runner.id()) =>
                        {
                            tracing::info!(runner = %runner.id(), "a runner was lost while starting");
                            let _ = runner.destroy().await;
                        }
                        Ok(runner) => {
                            if let Err(runner) = env.add_idle(runner) {
                                if let Err(e) = runner.destroy().await {
                                    tracing::warn!(error = %e, "could not destroy a runner of a removed environment");
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(environment = env.config.id, error = %e, "could not start a runner")
                        }
                    }
                    env.starting.fetch_sub(1, Ordering::Relaxed);
                    let _ = done.send(ok);
                    env.wake.notify_one();
                });
            }
        } else if idle > target {
            let extra: Vec<_> = {
                let mut pool = env.idle.lock().unwrap();
                let keep = target.min(pool.len());
                pool.drain(keep..).collect()
            };
            for runner in extra {
                tokio::spawn(async move {
                    if let Err(e) = runner.destroy().await {
                        tracing::warn!(error = %e, "could not destroy a surplus runner");
                    }
                });
            }
        }
        let wait = retry_at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
            .min(RECONCILE_INTERVAL);
        tokio::select! {
            _ = env.stop.cancelled() => return,
            _ = env.wake.notified() => {}
            Some(ok) = done_rx.recv() => {
                if ok {
                    failures = 0;
                    retry_at = Instant::now();
                } else {
                    failures = failures.saturating_add(1);
                    let backoff = Duration::from_millis(250u64 << failures.min(7)).min(MAX_BACKOFF);
                    retry_at = Instant::now() + backoff;
                }
            }
            _ = tokio::time::sleep(if idle + starting < target { wait } else { RECONCILE_INTERVAL }) => {}
        }
    }
}

/// Claims per minute over the last hour.
#[derive(Default)]
struct ClaimHistory {
    /// (minute index since start, count), oldest first.
    minutes: VecDeque<(u64, u32)>,
    origin: Option<Instant>,
}

impl ClaimHistory {
    fn minute(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        now.duration_since(origin).as_secs() / 60
    }

    fn record(&mut self, now: Instant) {
        let minute = self.minute(now);
        match self.minutes.back_mut() {
            Some((m, count)) if *m == minute => *count += 1,
            _ => self.minutes.push_back((minute, 1)),
        }
        while self.minutes.front().is_some_and(|(m, _)| *m + 60 <= minute) {
            self.minutes.pop_front();
        }
    }

    fn per_minute(&mut self, now: Instant) -> Vec<u32> {
        let current = self.minute(now);
        (0..60u64)
            .map(|back| {
                let m = current.checked_sub(59 - back);
                m.and_then(|m| self.minutes.iter().find(|(k, _)| *k == m).map(|(_, c)| *c))
                    .unwrap_or(0)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_history_counts_the_current_minute_last() {
        let mut h = ClaimHistory::default();
        let now = Instant::now();
        h.record(now);
        h.record(now);
        let v = h.per_minute(now);
        assert_eq!(v.len(), 60);
        assert_eq!(v[59], 2);
        assert_eq!(v.iter().sum::<u32>(), 2);
    }

    /// A sandbox that is never used: the pool only holds and hands back runners.
    struct Idle(RunnerId);

    #[async_trait::async_trait]
    impl crate::agent::Sandbox for Idle {
        fn id(&self) -> &RunnerId {
            &self.0
        }
        fn workdir(&self) -> &str {
            "/workspace"
        }
        fn base_environment(&self) -> Vec<(String, String)> {
            Vec::new()
        }
        async fn connect(
            &self,
        ) -> Result<crate::agent::SandboxChannel, crate::backend::BackendError> {
            Err(crate::backend::BackendError::Unreachable("unused".into()))
        }
        async fn destroy(&self) -> Result<(), crate::backend::BackendError> {
            Ok(())
        }
    }

    fn runner() -> Arc<dyn RunnerBackend> {
        Arc::new(crate::agent::AgentRunner::new(
            Arc::new(Idle(RunnerId::generate(1))),
            None,
            Duration::from_secs(1),
        ))
    }

    #[test]
    fn a_runner_started_after_the_shutdown_is_handed_back_not_pooled() {
        let env = Environment::new(EnvironmentConfig {
            id: 1,
            image: "i".into(),
            prewarming_pool_size: 2,
            cpu_limit: 0,
            memory_limit: 0,
            network_access: false,
            exposed_ports: Vec::new(),
        });
        assert!(env.add_idle(runner()).is_ok());
        assert_eq!(env.shut_down().len(), 1);
        let late = runner();
        let id = late.id().clone();
        let back = env
            .add_idle(late)
            .expect_err("a shut-down pool takes no runner");
        assert_eq!(back.id(), &id);
        assert_eq!(env.idle_count(), 0);
        assert!(env.take_idle().is_none());
    }
}
