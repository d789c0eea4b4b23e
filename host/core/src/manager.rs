//! The manager: owner of all environments, their pools and all claimed runners.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use crate::backend::{Backend, BackendEvent, Claim, RunnerBackend};
use crate::environment::EnvironmentConfig;
use crate::error::CoreError;
use crate::ids::{EnvironmentId, RunnerId};
use crate::policy::PoolPolicy;
use crate::pool::{reconcile, Environment};
use crate::runner::{DestroyReason, Runner};

/// How long destroying a runner in the backend may take before the API stops waiting.
const DESTROY_WAIT: Duration = Duration::from_secs(10);

/// Result of `PUT /execution-environments/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The environment did not exist.
    Created,
    /// The environment existed and was replaced (or was already identical).
    Replaced,
}

/// Pool figures of one environment (`/statistics/execution-environments`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentStatistics {
    /// Environment id.
    pub id: EnvironmentId,
    /// Configured pool size.
    pub prewarming_pool_size: u32,
    /// Current target of idle runners (differs from the configured size under a sizing policy).
    pub target: u32,
    /// Idle runners.
    pub idle_runners: u32,
    /// Claimed runners.
    pub used_runners: u32,
    /// Why the newest runner start failed (the backend's words), while no start has succeeded since.
    pub start_failure: Option<String>,
    /// Runners being started.
    pub starting_runners: u32,
}

/// Poseidon's `poseidon_used_runners` point: a runner was claimed or released (`count`: all
/// claimed runners after the change).
fn used_point(runner: &Runner, created: bool, count: usize) {
    crate::monitoring::storage_change(
        "poseidon_used_runners",
        runner.id().as_str(),
        created,
        count,
        || vec![("environment_id", runner.environment().to_string())],
    );
}

/// Owns environments, pools and claimed runners; every API operation goes through it.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    policy: Option<Arc<dyn PoolPolicy>>,
    environments: RwLock<HashMap<EnvironmentId, Arc<Environment>>>,
    runners: RwLock<HashMap<RunnerId, Arc<Runner>>>,
    /// Serialises environment changes so two PUTs of one id cannot interleave.
    changes: tokio::sync::Mutex<()>,
}

impl Inner {
    /// The environments now (a snapshot; the lock is not held afterwards).
    fn environment_list(&self) -> Vec<Arc<Environment>> {
        self.environments
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect()
    }

    /// Claimed runners of one environment.
    fn used_in(&self, id: EnvironmentId) -> u32 {
        self.runners
            .read()
            .unwrap()
            .values()
            .filter(|r| r.environment() == id)
            .count() as u32
    }
}

impl Manager {
    /// Creates the manager and recovers environments and runners from the backend.
    pub async fn start(
        backend: Arc<dyn Backend>,
        policy: Option<Arc<dyn PoolPolicy>>,
    ) -> Result<Self, CoreError> {
        let manager = Self {
            inner: Arc::new(Inner {
                backend: Arc::clone(&backend),
                policy,
                environments: RwLock::new(HashMap::new()),
                runners: RwLock::new(HashMap::new()),
                changes: tokio::sync::Mutex::new(()),
            }),
        };
        match backend.load_environments().await {
            Ok(configs) => {
                for config in configs {
                    manager.install_environment(config).await;
                }
            }
            Err(e) => {
                // Serve anyway (claims fail until then) and keep trying in the background.
                tracing::warn!(error = %e, "cannot load environments from the backend yet; retrying");
                let weak = Arc::downgrade(&manager.inner);
                tokio::spawn(async move {
                    let mut delay = Duration::from_secs(1);
                    loop {
                        tokio::time::sleep(delay).await;
                        let Some(inner) = weak.upgrade() else { return };
                        let manager = Manager { inner };
                        match manager.refresh_environments().await {
                            Ok(()) => {
                                tracing::info!("environments loaded from the backend");
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot load environments from the backend yet; retrying")
                            }
                        }
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                });
            }
        }
        if let Some(mut events) = backend.take_events() {
            let weak = Arc::downgrade(&manager.inner);
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    let Some(inner) = weak.upgrade() else { return };
                    Manager { inner }.handle_backend_event(event).await;
                }
            });
        }
        Ok(manager)
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    async fn install_environment(&self, config: EnvironmentConfig) {
        let env = Environment::new(config.clone());
        match self.inner.backend.recover_runners(&config).await {
            Ok(recovered) => {
                for r in recovered {
                    match r.claimed {
                        // A new environment is not shut down: the runner always joins.
                        None => drop(env.add_idle(r.runner)),
                        Some(claim) => {
                            let timeout = (claim.inactivity_timeout > 0)
                                .then(|| Duration::from_secs(claim.inactivity_timeout as u64));
                            self.adopt_claimed(config.id, r.runner, timeout, claim.owner);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(environment = config.id, error = %e, "could not recover runners")
            }
        }
        let count = {
            let mut environments = self.inner.environments.write().unwrap();
            environments.insert(config.id, Arc::clone(&env));
            environments.len()
        };
        crate::monitoring::storage_change(
            "poseidon_environments",
            &config.id.to_string(),
            true,
            count,
            || {
                vec![
                    ("image", config.image.clone()),
                    ("cpu_limit", config.cpu_limit.to_string()),
                    ("memory_limit", config.memory_limit.to_string()),
                    ("network_access", config.network_access.to_string()),
                ]
            },
        );
        self.spawn_reconciler(env);
    }

    fn spawn_reconciler(&self, env: Arc<Environment>) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let id = env.config.id;
        let used = move || weak.upgrade().map_or(0, |inner| inner.used_in(id));
        tokio::spawn(reconcile(
            env,
            Arc::clone(&self.inner.backend),
            self.inner.policy.clone(),
            used,
        ));
    }

    /// All environment configurations, ordered by id.
    pub fn environments(&self) -> Vec<EnvironmentConfig> {
        let mut list: Vec<_> = self
            .inner
            .environments
            .read()
            .unwrap()
            .values()
            .map(|e| e.config.clone())
            .collect();
        list.sort_by_key(|c| c.id);
        list
    }

    /// Whether any environment gives its runners network access.
    pub fn any_network_access(&self) -> bool {
        self.inner
            .environments
            .read()
            .unwrap()
            .values()
            .any(|e| e.config.network_access)
    }

    /// One environment's configuration.
    pub fn environment(&self, id: EnvironmentId) -> Option<EnvironmentConfig> {
        self.inner
            .environments
            .read()
            .unwrap()
            .get(&id)
            .map(|e| e.config.clone())
    }

    /// Re-reads environments from the backend: new ones are added, changed ones replaced, ones the
    /// backend no longer has are deleted with their runners.
    pub async fn refresh_environments(&self) -> Result<(), CoreError> {
        let stored = self.inner.backend.load_environments().await?;
        let _guard = self.inner.changes.lock().await;
        let stored: HashMap<_, _> = stored.into_iter().map(|c| (c.id, c)).collect();
        let known: Vec<_> = self.environments();
        for config in &known {
            match stored.get(&config.id) {
                None => {
                    self.teardown(config.id, DestroyReason::EnvironmentDeleted)
                        .await
                }
                Some(fresh) if fresh != config => {
                    self.teardown(config.id, DestroyReason::EnvironmentChanged)
                        .await;
                    self.install_environment(fresh.clone()).await;
                }
                Some(_) => {}
            }
        }
        for (id, config) in stored {
            if !known.iter().any(|k| k.id == id) {
                self.install_environment(config).await;
            }
        }
        Ok(())
    }

    /// Creates or replaces an environment. An identical configuration keeps its runners.
    pub async fn put_environment(
        &self,
        config: EnvironmentConfig,
    ) -> Result<PutOutcome, CoreError> {
        let config = config.normalized();
        self.inner
            .backend
            .validate(&config)
            .map_err(|e| CoreError::Invalid(e.to_string()))?;
        let _guard = self.inner.changes.lock().await;
        let existing = self.environment(config.id);
        if existing.as_ref() == Some(&config) {
            return Ok(PutOutcome::Replaced);
        }
        self.inner.backend.store_environment(&config).await?;
        let outcome = if existing.is_some() {
            self.teardown(config.id, DestroyReason::EnvironmentChanged)
                .await;
            PutOutcome::Replaced
        } else {
            PutOutcome::Created
        };
        self.install_environment(config).await;
        Ok(outcome)
    }

    /// Deletes an environment with all its runners.
    pub async fn delete_environment(&self, id: EnvironmentId) -> Result<(), CoreError> {
        let _guard = self.inner.changes.lock().await;
        if self.environment(id).is_none() {
            return Err(CoreError::EnvironmentNotFound);
        }
        self.inner.backend.remove_environment(id).await?;
        self.teardown(id, DestroyReason::EnvironmentDeleted).await;
        Ok(())
    }

    /// Removes an environment locally and destroys its idle and claimed runners.
    async fn teardown(&self, id: EnvironmentId, reason: DestroyReason) {
        let (env, count) = {
            let mut environments = self.inner.environments.write().unwrap();
            (environments.remove(&id), environments.len())
        };
        if env.is_some() {
            crate::monitoring::storage_change(
                "poseidon_environments",
                &id.to_string(),
                false,
                count,
                Vec::new,
            );
        }
        let mut doomed: Vec<Arc<dyn RunnerBackend>> = Vec::new();
        if let Some(env) = env {
            doomed.extend(env.shut_down());
        }
        let claimed: Vec<Arc<Runner>> = {
            let mut runners = self.inner.runners.write().unwrap();
            let ids: Vec<RunnerId> = runners
                .values()
                .filter(|r| r.environment() == id)
                .map(|r| r.id().clone())
                .collect();
            let claimed: Vec<_> = ids.iter().filter_map(|i| runners.remove(i)).collect();
            for runner in &claimed {
                used_point(runner, false, runners.len());
            }
            claimed
        };
        for runner in claimed {
            runner.mark_destroyed(reason.clone());
            doomed.push(Arc::clone(runner.backend()));
        }
        let destroys = doomed.into_iter().map(|r| async move {
            if let Err(e) = r.destroy().await {
                tracing::warn!(runner = %r.id(), error = %e, "could not destroy runner");
            }
        });
        let _ = tokio::time::timeout(DESTROY_WAIT, futures::future::join_all(destroys)).await;
    }

    /// Claims an idle runner of the environment for `owner` (the tenant, when an authenticator
    /// is in place); the backend records the claim, owner included, in the background.
    pub fn claim(
        &self,
        environment: EnvironmentId,
        inactivity_timeout: Option<Duration>,
        owner: Option<String>,
    ) -> Result<Arc<Runner>, CoreError> {
        let env = self
            .inner
            .environments
            .read()
            .unwrap()
            .get(&environment)
            .cloned()
            .ok_or(CoreError::EnvironmentNotFound)?;
        let backend = env.take_idle().ok_or_else(|| match env.start_failure() {
            Some(why) => CoreError::PoolFailing(why),
            None => CoreError::PoolEmpty,
        })?;
        let claim = Claim {
            inactivity_timeout: inactivity_timeout.map(|d| d.as_secs() as i64).unwrap_or(0),
            owner: owner.clone(),
        };
        let runner = Arc::new(Runner::new(environment, backend, inactivity_timeout, owner));
        {
            let mut runners = self.inner.runners.write().unwrap();
            // Checked under the lock that a teardown sweeps the claimed runners with, after it shut
            // the environment down: a runner is either swept by the teardown or never registered.
            if env.is_shut_down() {
                drop(runners);
                let backend = Arc::clone(runner.backend());
                tokio::spawn(async move {
                    let _ = backend.destroy().await;
                });
                return Err(CoreError::EnvironmentNotFound);
            }
            runners.insert(runner.id().clone(), Arc::clone(&runner));
            used_point(&runner, true, runners.len());
        }
        let marker = Arc::clone(runner.backend());
        tokio::spawn(async move {
            if let Err(e) = marker.mark_claimed(Some(claim)).await {
                tracing::warn!(runner = %marker.id(), error = %e, "could not record the claim");
            }
        });
        self.watch_inactivity(&runner);
        Ok(runner)
    }

    fn adopt_claimed(
        &self,
        environment: EnvironmentId,
        backend: Arc<dyn RunnerBackend>,
        inactivity_timeout: Option<Duration>,
        owner: Option<String>,
    ) -> Arc<Runner> {
        let runner = Arc::new(Runner::new(environment, backend, inactivity_timeout, owner));
        {
            let mut runners = self.inner.runners.write().unwrap();
            runners.insert(runner.id().clone(), Arc::clone(&runner));
            used_point(&runner, true, runners.len());
        }
        self.watch_inactivity(&runner);
        runner
    }

    /// Destroys the runner when its inactivity timeout expires.
    fn watch_inactivity(&self, runner: &Arc<Runner>) {
        let weak = Arc::downgrade(&self.inner);
        let watched = Arc::clone(runner);
        tokio::spawn(async move {
            if watched.inactivity_expired().await {
                if let Some(inner) = weak.upgrade() {
                    tracing::info!(runner = %watched.id(), "inactivity timeout");
                    let _ = Manager { inner }
                        .destroy_runner(watched.id(), DestroyReason::InactivityTimeout)
                        .await;
                }
            }
        });
    }

    /// A claimed runner.
    pub fn runner(&self, id: &RunnerId) -> Result<Arc<Runner>, CoreError> {
        self.inner
            .runners
            .read()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or(CoreError::RunnerGone)
    }

    /// Destroys a claimed runner.
    pub async fn destroy_runner(
        &self,
        id: &RunnerId,
        reason: DestroyReason,
    ) -> Result<(), CoreError> {
        let runner = {
            let mut runners = self.inner.runners.write().unwrap();
            let runner = runners.remove(id).ok_or(CoreError::RunnerGone)?;
            used_point(&runner, false, runners.len());
            runner
        };
        runner.mark_destroyed(reason);
        match tokio::time::timeout(DESTROY_WAIT, runner.backend().destroy()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CoreError::Backend(e)),
            Err(_) => {
                tracing::warn!(runner = %id, "destroying the runner takes long; continuing in the background");
                Ok(())
            }
        }
    }

    async fn handle_backend_event(&self, event: BackendEvent) {
        match event {
            BackendEvent::RunnerLost { runner, reason } => {
                let claimed = {
                    let mut runners = self.inner.runners.write().unwrap();
                    let claimed = runners.remove(&runner);
                    if let Some(claimed) = &claimed {
                        used_point(claimed, false, runners.len());
                    }
                    claimed
                };
                if let Some(claimed) = claimed {
                    claimed.mark_destroyed(DestroyReason::Lost(reason));
                    return;
                }
                let envs = self.inner.environment_list();
                for env in &envs {
                    if env.remove_idle(&runner).is_some() {
                        return;
                    }
                }
                if let Some(env) = envs
                    .iter()
                    .find(|e| Some(e.config.id) == runner.environment())
                {
                    env.note_lost(&runner);
                }
            }
            BackendEvent::RunnerRestarted { runner } => {
                // A claimed runner stays its client's (its files are gone); an idle one stays idle.
                let claimed = self.inner.runners.read().unwrap().get(&runner).cloned();
                if let Some(claimed) = claimed {
                    tracing::info!(runner = %runner, "the runner's sandbox restarted; it stays claimed");
                    claimed.interrupt_executions();
                }
            }
            BackendEvent::EnvironmentsChanged => {
                if let Err(e) = self.refresh_environments().await {
                    tracing::warn!(error = %e, "could not re-read environments");
                }
            }
        }
    }

    /// Every claimed runner with its environment and its number of stored executions.
    pub fn stored_executions(&self) -> Vec<(RunnerId, EnvironmentId, usize)> {
        let runners: Vec<Arc<Runner>> = self
            .inner
            .runners
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect();
        runners
            .iter()
            .map(|r| (r.id().clone(), r.environment(), r.stored_execution_count()))
            .collect()
    }

    /// Pool figures of every environment, ordered by id.
    pub fn statistics(&self) -> Vec<EnvironmentStatistics> {
        // One pass over the claimed runners, not one per environment.
        let mut used: HashMap<EnvironmentId, u32> = HashMap::new();
        for runner in self.inner.runners.read().unwrap().values() {
            *used.entry(runner.environment()).or_default() += 1;
        }
        let mut stats: Vec<_> = self
            .inner
            .environment_list()
            .iter()
            .map(|env| EnvironmentStatistics {
                id: env.config.id,
                prewarming_pool_size: env.config.prewarming_pool_size,
                target: env.target(),
                idle_runners: env.idle_count() as u32,
                used_runners: used.get(&env.config.id).copied().unwrap_or(0),
                start_failure: env.start_failure(),
                starting_runners: env.starting_count() as u32,
            })
            .collect();
        stats.sort_by_key(|s| s.id);
        stats
    }

    /// Environments whose idle share is below `threshold` (0 disables the check), with the reason
    /// their runners cannot be started when the newest start failed.
    pub fn depleting_environments(&self, threshold: f64) -> Vec<(EnvironmentId, Option<String>)> {
        if threshold <= 0.0 {
            return Vec::new();
        }
        self.statistics()
            .into_iter()
            .filter(|s| {
                s.prewarming_pool_size > 0
                    && f64::from(s.idle_runners) / f64::from(s.prewarming_pool_size) < threshold
            })
            .map(|s| (s.id, s.start_failure))
            .collect()
    }

    /// Destroys every claimed and idle runner (graceful shutdown of a backend that does not keep them).
    pub async fn shutdown(&self) {
        let ids: Vec<EnvironmentId> = self
            .inner
            .environments
            .read()
            .unwrap()
            .keys()
            .copied()
            .collect();
        for id in ids {
            self.teardown(id, DestroyReason::EnvironmentDeleted).await;
        }
    }
}
