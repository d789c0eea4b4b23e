//! The Nomad [`Backend`]: environments are template jobs, runners are batch jobs.

use async_trait::async_trait;
use poseidon_core::agent::{AgentRunner, Sandbox};
use poseidon_core::backend::{
    Backend, BackendError, BackendEvent, MappedPort, RecoveredRunner, RunnerBackend,
};
use poseidon_core::{EnvironmentConfig, EnvironmentId, RunnerId};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentBinary;
use crate::api::{NomadClient, NomadError};
use crate::config::NomadConfig;
use crate::events::{self, Tracker};
use crate::jobs::{self, CONFIG_GROUP};
use crate::reasons;
use crate::runner::{ports_of, NomadRunner};

/// How long a file operation through the agent may take.
const FILE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long registration waits for its evaluation (Poseidon: 10 s, then assumes success).
const EVAL_WAIT: Duration = Duration::from_secs(10);

/// State shared by the backend, its runners and the event stream task.
pub struct Shared {
    pub(crate) client: NomadClient,
    pub(crate) config: NomadConfig,
    pub(crate) tracker: Mutex<Tracker>,
    destroyed: Mutex<HashSet<String>>,
    /// Mapped ports of each live runner, refreshed from the event stream when its allocation
    /// changes (a rescheduled runner gets new host ports).
    pub(crate) ports: Mutex<HashMap<String, Vec<MappedPort>>>,
    /// The runner agent put into runners.
    pub(crate) agent: AgentBinary,
}

impl Shared {
    /// Stops reporting a runner (it is being destroyed on purpose).
    pub(crate) fn forget(&self, id: &RunnerId) {
        self.ports.lock().unwrap().remove(id.as_str());
        self.mark_destroyed(id.as_str());
        crate::monitoring::job_forgotten(&mut self.tracker.lock().unwrap(), id.as_str());
    }

    pub(crate) fn mark_destroyed(&self, job: &str) {
        let mut d = self.destroyed.lock().unwrap();
        if d.len() > 10_000 {
            d.clear();
        }
        d.insert(job.to_string());
    }

    pub(crate) fn is_destroyed(&self, job: &str) -> bool {
        self.destroyed.lock().unwrap().contains(job)
    }
}

/// The Nomad backend.
pub struct NomadBackend {
    shared: Arc<Shared>,
    events: Mutex<Option<mpsc::Receiver<BackendEvent>>>,
    stop: CancellationToken,
}

impl NomadBackend {
    /// Creates the backend and starts following Nomad's event stream.
    pub fn new(config: NomadConfig) -> Result<Self, BackendError> {
        let client = NomadClient::new(&config)?;
        let config_agent = config.agentbinary.clone();
        let shared = Arc::new(Shared {
            client,
            config,
            tracker: Mutex::new(Tracker::default()),
            destroyed: Mutex::new(HashSet::new()),
            ports: Mutex::new(HashMap::new()),
            agent: AgentBinary::new(&config_agent),
        });
        let (tx, rx) = mpsc::channel(256);
        let stop = CancellationToken::new();
        tokio::spawn(events::run(shared.clone(), tx, stop.clone()));
        Ok(NomadBackend {
            shared,
            events: Mutex::new(Some(rx)),
            stop,
        })
    }

    fn client(&self) -> &NomadClient {
        &self.shared.client
    }

    fn runner(&self, id: RunnerId, alloc: &serde_json::Value) -> Arc<NomadRunner> {
        self.shared
            .ports
            .lock()
            .unwrap()
            .insert(id.as_str().to_string(), ports_of(alloc));
        Arc::new(NomadRunner {
            id,
            shared: self.shared.clone(),
            running: Mutex::new(Vec::new()),
            job_lock: tokio::sync::Mutex::new(false),
        })
    }

    /// The runner as core drives it: through its agent (started now when `start`, so that a
    /// runner in the pool is ready), or through exec sessions per operation without
    /// `runneragent`.
    async fn with_agent(
        &self,
        runner: Arc<NomadRunner>,
        start: bool,
    ) -> Result<Arc<dyn RunnerBackend>, BackendError> {
        if !self.shared.config.runneragent {
            return Ok(runner);
        }
        let sandbox: Arc<dyn Sandbox> = runner;
        let client = if start {
            Some(AgentRunner::connect(&sandbox).await.map_err(|e| {
                BackendError::Internal(format!("the runner's agent did not start: {e}"))
            })?)
        } else {
            None
        };
        Ok(Arc::new(AgentRunner::new(sandbox, client, FILE_TIMEOUT)))
    }

    /// Waits until the newest allocation of `job` runs.
    async fn wait_running(&self, job: &str) -> Result<serde_json::Value, BackendError> {
        let timeout = Duration::from_secs(self.shared.config.startuptimeoutseconds.max(1));
        let deadline = tokio::time::Instant::now() + timeout;
        let mut index = 0;
        let mut progress = None;
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let block = (index > 0).then_some((index, left.min(Duration::from_secs(30))));
            let (list, idx) = self.client().job_allocations(job, block).await?;
            index = idx.max(1);
            if let Some(a) = jobs::current_allocation(&list) {
                match a["ClientStatus"].as_str().unwrap_or("") {
                    "running" => {
                        let id = a["ID"].as_str().unwrap_or("");
                        let full = self.client().allocation(id).await?;
                        crate::monitoring::seeded(&mut self.shared.tracker.lock().unwrap(), &full);
                        return Ok(full);
                    }
                    // A runner whose first allocation failed (image pull, driver, restarts used
                    // up) has failed to start: Nomad's reschedule, a minute later, is not waited for.
                    status @ ("failed" | "lost" | "complete")
                        if status == "failed"
                            || a["NextAllocation"].as_str().unwrap_or("").is_empty() =>
                    {
                        let why = reasons::allocation_failure(a)
                            .or_else(|| a["ClientDescription"].as_str().map(String::from))
                            .unwrap_or_else(|| "Nomad gave no reason".into());
                        return Err(BackendError::Internal(format!(
                            "the allocation of {job} ended with status {}: {why}",
                            a["ClientStatus"].as_str().unwrap_or("")
                        )));
                    }
                    _ => progress = reasons::allocation_progress(a),
                }
            }
        }
        Err(BackendError::Internal(format!(
            "the allocation of {job} did not start within {} s{}",
            timeout.as_secs(),
            progress
                .map(|p| format!(" (Nomad's last word: {p})"))
                .unwrap_or_default()
        )))
    }
}

impl Drop for NomadBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn eval_error(e: NomadError) -> BackendError {
    match e {
        NomadError::Evaluation(m) => {
            BackendError::Internal(format!("Nomad could not place the job: {m}"))
        }
        other => other.into(),
    }
}

#[async_trait]
impl Backend for NomadBackend {
    fn name(&self) -> &'static str {
        "nomad"
    }

    fn validate(&self, config: &EnvironmentConfig) -> Result<(), BackendError> {
        if config.cpu_limit == 0 {
            return Err(BackendError::Unsupported(
                "cpuLimit must be at least 1".into(),
            ));
        }
        // Nomad refuses a memory_max below the reserved memory, which is at least 10 MB.
        if (1..10).contains(&config.memory_limit) {
            return Err(BackendError::Unsupported(
                "memoryLimit must be 0 (no limit) or at least 10 MB on the Nomad backend".into(),
            ));
        }
        Ok(())
    }

    async fn store_environment(&self, config: &EnvironmentConfig) -> Result<(), BackendError> {
        let job = jobs::template_job(config, &self.shared.config);
        let eval = self.client().register(&job).await?;
        self.client()
            .wait_evaluation(&eval, EVAL_WAIT)
            .await
            .map_err(eval_error)
    }

    async fn remove_environment(&self, id: EnvironmentId) -> Result<(), BackendError> {
        let runners = self.client().list_jobs(&format!("{id}-")).await?;
        let deletions = runners
            .iter()
            .filter_map(|j| Some((j["ID"].as_str()?, j)))
            .map(|(job, stub)| async move {
                self.shared.mark_destroyed(job);
                // A stopped job (whose purge a gateway did not live to do) is purged at once.
                if stub["Status"] == "dead" {
                    self.client().deregister(job, true).await
                } else {
                    self.client().retire(job).await
                }
            });
        for r in futures::future::join_all(deletions).await {
            r?;
        }
        self.client()
            .deregister(&jobs::template_job_id(id), true)
            .await?;
        Ok(())
    }

    async fn load_environments(&self) -> Result<Vec<EnvironmentConfig>, BackendError> {
        let mut out = Vec::new();
        for stub in self.client().list_jobs("template-").await? {
            if stub["Status"] != "running" {
                continue;
            }
            let Some(id) = stub["ID"].as_str() else {
                continue;
            };
            if let Some(job) = self.client().job(id).await? {
                if let Some(env) = jobs::environment_from_job(&job) {
                    out.push(env);
                }
            }
        }
        out.sort_by_key(|e| e.id);
        Ok(out)
    }

    async fn create_runner(
        &self,
        config: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<Arc<dyn RunnerBackend>, BackendError> {
        let job = jobs::runner_job(config, id.as_str(), &self.shared.config);
        let eval = self.client().register(&job).await?;
        let ready = async {
            self.client()
                .wait_evaluation(&eval, EVAL_WAIT)
                .await
                .map_err(eval_error)?;
            self.wait_running(id.as_str()).await
        };
        let ready = async {
            let runner = self.runner(id.clone(), &ready.await?);
            self.with_agent(runner, true).await
        };
        match ready.await {
            Ok(runner) => Ok(runner),
            Err(e) => {
                self.shared.mark_destroyed(id.as_str());
                self.client().retire_eventually(id.as_str());
                Err(e)
            }
        }
    }

    async fn recover_runners(
        &self,
        config: &EnvironmentConfig,
    ) -> Result<Vec<RecoveredRunner>, BackendError> {
        let mut out = Vec::new();
        for stub in self.client().list_jobs(&format!("{}-", config.id)).await? {
            if stub["Status"] == "dead" {
                // A runner stopped by a gateway that died before purging it.
                if let Some(id) = stub["ID"].as_str() {
                    let _ = self.client().deregister(id, true).await;
                }
                continue;
            }
            let Some(id) = stub["ID"].as_str() else {
                continue;
            };
            let Some(job) = self.client().job(id).await? else {
                continue;
            };
            let Some(meta) = jobs::config_meta(&job).cloned().or_else(|| {
                job["TaskGroups"]
                    .as_array()?
                    .iter()
                    .any(|g| g["Name"] == CONFIG_GROUP)
                    .then(serde_json::Map::new)
            }) else {
                continue;
            };
            let (allocs, _) = self.client().job_allocations(id, None).await?;
            let Some(first) = jobs::current_allocation(&allocs) else {
                continue;
            };
            let alloc = self
                .client()
                .allocation(first["ID"].as_str().unwrap_or(""))
                .await?;
            crate::monitoring::seeded(&mut self.shared.tracker.lock().unwrap(), &alloc);
            let claimed = jobs::recorded_claim(&meta);
            let runner = self.runner(RunnerId::from_raw(id), &alloc);
            out.push(RecoveredRunner {
                // The agent is reached (or started again) on the runner's next operation.
                runner: self.with_agent(runner, false).await?,
                claimed,
            });
        }
        Ok(out)
    }

    fn take_events(&self) -> Option<mpsc::Receiver<BackendEvent>> {
        self.events.lock().unwrap().take()
    }
}
