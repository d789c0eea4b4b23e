//! A claimed runner: its executions, its inactivity timer and its destruction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::backend::{ExecRequest, LostReason, ProcessEvent, RunnerBackend};
use crate::error::CoreError;
use crate::execution::{
    ExecEvent, ExecutionHandle, ExecutionRequest, GENERIC_EXECUTION_ERROR, OOM_KILLED,
    STOPPED_AS_EXPECTED,
};
use crate::ids::{EnvironmentId, ExecutionId, RunnerId};
use crate::utf8::Utf8Decoder;

/// How long a stored execution waits for its WebSocket.
const STORED_EXECUTION_TTL: Duration = Duration::from_secs(15 * 60);
/// Most stored executions one runner keeps; the oldest are dropped beyond.
const MAX_STORED_EXECUTIONS: usize = 256;

/// Why a runner was destroyed; decides the final message of executions still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestroyReason {
    /// `DELETE /runners/{id}`.
    ClientRequest,
    /// The inactivity timeout expired.
    InactivityTimeout,
    /// Its environment was changed.
    EnvironmentChanged,
    /// Its environment was deleted.
    EnvironmentDeleted,
    /// The backend lost it.
    Lost(LostReason),
}

impl DestroyReason {
    fn final_event(&self) -> ExecEvent {
        match self {
            Self::InactivityTimeout => ExecEvent::Timeout,
            Self::ClientRequest | Self::EnvironmentChanged | Self::EnvironmentDeleted => {
                ExecEvent::Error(STOPPED_AS_EXPECTED.to_string())
            }
            Self::Lost(LostReason::OomKilled) => ExecEvent::Error(OOM_KILLED.to_string()),
            Self::Lost(LostReason::Stopped) => ExecEvent::Error(STOPPED_AS_EXPECTED.to_string()),
            Self::Lost(_) => ExecEvent::Error(GENERIC_EXECUTION_ERROR.to_string()),
        }
    }
}

/// A runner handed out by `POST /runners`; addressable by the API until destroyed.
pub struct Runner {
    id: RunnerId,
    environment: EnvironmentId,
    backend: Arc<dyn RunnerBackend>,
    owner: Option<String>,
    executions: Mutex<HashMap<ExecutionId, (ExecutionRequest, Instant)>>,
    activity: Activity,
    destroyed: CancellationToken,
    reason: OnceLock<DestroyReason>,
    /// Cancelled when the sandbox restarts under the runner: running executions end, the runner stays.
    restarted: Mutex<CancellationToken>,
}

impl Runner {
    pub(crate) fn new(
        environment: EnvironmentId,
        backend: Arc<dyn RunnerBackend>,
        inactivity_timeout: Option<Duration>,
        owner: Option<String>,
    ) -> Self {
        Self {
            id: backend.id().clone(),
            environment,
            backend,
            owner,
            executions: Mutex::new(HashMap::new()),
            activity: Activity::new(inactivity_timeout),
            destroyed: CancellationToken::new(),
            reason: OnceLock::new(),
            restarted: Mutex::new(CancellationToken::new()),
        }
    }

    /// The runner id.
    pub fn id(&self) -> &RunnerId {
        &self.id
    }

    /// The environment it belongs to.
    pub fn environment(&self) -> EnvironmentId {
        self.environment
    }

    /// The tenant that claimed it, when an authenticator is in place; recorded with the claim, so
    /// a runner recovered after a restart keeps it. `None` for a claim without an authenticator,
    /// or one a version that recorded no owners made before the restart.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The backend's handle.
    pub(crate) fn backend(&self) -> &Arc<dyn RunnerBackend> {
        &self.backend
    }

    /// Ports of the runner reachable from outside.
    pub fn mapped_ports(&self) -> Vec<crate::backend::MappedPort> {
        self.backend.mapped_ports()
    }

    /// Deletes, then copies files (as the runner's root).
    pub async fn update_files(&self, update: &crate::files::FileUpdate) -> Result<(), CoreError> {
        Ok(self.backend.update_files(update).await?)
    }

    /// Lists files.
    pub async fn list_files(
        &self,
        request: &crate::backend::ListRequest,
    ) -> Result<Vec<crate::files::FileEntry>, CoreError> {
        Ok(self.backend.list_files(request).await?)
    }

    /// Streams one regular file.
    pub async fn download_file(
        &self,
        path: &str,
        privileged: bool,
    ) -> Result<crate::backend::FileDownload, CoreError> {
        Ok(self.backend.download_file(path, privileged).await?)
    }

    /// Counts as activity: restarts the inactivity timeout.
    pub fn touch(&self) {
        self.activity.touch();
    }

    /// Stores an execution request and returns its id.
    pub fn store_execution(&self, request: ExecutionRequest) -> ExecutionId {
        let id = uuid::Uuid::new_v4();
        let mut executions = self.executions.lock().unwrap();
        let now = Instant::now();
        executions.retain(|_, (_, at)| now.duration_since(*at) < STORED_EXECUTION_TTL);
        if executions.len() >= MAX_STORED_EXECUTIONS {
            if let Some(oldest) = executions
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k)
            {
                executions.remove(&oldest);
                self.execution_point(&oldest, false, executions.len());
            }
        }
        executions.insert(id, (request, now));
        self.execution_point(&id, true, executions.len());
        id
    }

    /// Poseidon's `poseidon_nomad_executions` point: an execution stored or consumed.
    fn execution_point(&self, id: &ExecutionId, created: bool, count: usize) {
        crate::monitoring::storage_change(
            "poseidon_nomad_executions",
            &id.to_string(),
            created,
            count,
            || {
                vec![
                    ("environment_id", self.environment.to_string()),
                    ("runner_id", self.id().to_string()),
                ]
            },
        );
    }

    /// Executions stored and not yet consumed (expired ones included until the next store).
    pub fn stored_execution_count(&self) -> usize {
        self.executions.lock().unwrap().len()
    }

    /// Whether an execution with this id is stored.
    pub fn has_execution(&self, id: &ExecutionId) -> bool {
        self.executions.lock().unwrap().contains_key(id)
    }

    /// Removes a stored execution atomically: only one caller gets it.
    pub fn take_execution(&self, id: &ExecutionId) -> Result<ExecutionRequest, CoreError> {
        let mut executions = self.executions.lock().unwrap();
        let taken = executions.remove(id);
        if taken.is_some() {
            self.execution_point(id, false, executions.len());
        }
        match taken {
            Some((request, at)) if at.elapsed() < STORED_EXECUTION_TTL => Ok(request),
            _ => Err(CoreError::ExecutionNotFound),
        }
    }

    /// Starts an execution; events arrive on the returned handle.
    pub fn run(self: &Arc<Self>, request: ExecutionRequest) -> ExecutionHandle {
        let (events_tx, events_rx) = mpsc::channel(64);
        let (stdin_tx, stdin_rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let runner = Arc::clone(self);
        let client_gone = cancel.clone();
        tokio::spawn(async move {
            runner
                .drive(request, events_tx, stdin_rx, client_gone)
                .await;
        });
        ExecutionHandle::new(events_rx, stdin_tx, cancel)
    }

    /// Ends the running executions (with [`GENERIC_EXECUTION_ERROR`]) because the sandbox restarted;
    /// the runner itself stays claimed.
    pub(crate) fn interrupt_executions(&self) {
        let mut token = self.restarted.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    async fn drive(
        self: Arc<Self>,
        request: ExecutionRequest,
        events: mpsc::Sender<ExecEvent>,
        stdin: mpsc::Receiver<Bytes>,
        client_gone: CancellationToken,
    ) {
        let _running = self.activity.begin();
        let restarted = self.restarted.lock().unwrap().clone();
        let exec = ExecRequest {
            command: request.command,
            environment: request.environment,
            privileged: request.privileged,
            tty: true,
            time_limit: request.time_limit,
        };
        // The time limit counts from the connection, so a backend slow to start uses it up too.
        let deadline = request
            .time_limit
            .and_then(|limit| tokio::time::Instant::now().checked_add(limit));
        let time_limit = async move {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(time_limit);
        let started = tokio::select! {
            r = self.backend.execute(&exec) => r,
            _ = self.destroyed.cancelled() => {
                let _ = events.send(self.final_event()).await;
                return;
            }
            _ = &mut time_limit => {
                let _ = events.send(ExecEvent::Timeout).await;
                return;
            }
            _ = client_gone.cancelled() => return,
        };
        let process = match started {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(runner = %self.id, error = %e, "execution could not start");
                let _ = events
                    .send(ExecEvent::Error(GENERIC_EXECUTION_ERROR.to_string()))
                    .await;
                return;
            }
        };
        let kill = process.kill.clone();
        let _kill_on_exit = kill.clone().drop_guard();
        tokio::spawn(forward_input(stdin, process.stdin.clone(), kill.clone()));
        let last = tokio::select! {
            last = forward_output(process.events, &events) => last,
            _ = &mut time_limit => Some(ExecEvent::Timeout),
            _ = self.destroyed.cancelled() => Some(self.final_event()),
            _ = restarted.cancelled() => Some(ExecEvent::Error(GENERIC_EXECUTION_ERROR.to_string())),
            _ = client_gone.cancelled() => None,
        };
        kill.cancel();
        // Destroying the runner also breaks its process's output: the reason wins over that.
        let last = match last {
            Some(ExecEvent::Error(_)) if self.destroyed.is_cancelled() => Some(self.final_event()),
            other => other,
        };
        if let Some(last) = last {
            let _ = events.send(last).await;
        }
    }

    fn final_event(&self) -> ExecEvent {
        self.reason
            .get()
            .map(DestroyReason::final_event)
            .unwrap_or_else(|| ExecEvent::Error(GENERIC_EXECUTION_ERROR.to_string()))
    }

    /// Marks the runner destroyed (first reason wins) and ends its executions and timer.
    pub(crate) fn mark_destroyed(&self, reason: DestroyReason) {
        let _ = self.reason.set(reason);
        self.destroyed.cancel();
    }

    /// Waits until the runner is destroyed — by its client, or by the server itself
    /// (inactivity timeout, environment changed or deleted, lost by the backend) — and
    /// returns why.
    pub async fn destroyed(&self) -> Option<DestroyReason> {
        self.destroyed.cancelled().await;
        self.reason.get().cloned()
    }

    /// Whether the runner has been destroyed.
    pub fn is_destroyed(&self) -> bool {
        self.destroyed.is_cancelled()
    }

    /// Runs until the inactivity timeout expires (never, without a timeout) or the runner is destroyed.
    /// Returns true if it expired.
    pub(crate) async fn inactivity_expired(&self) -> bool {
        tokio::select! {
            _ = self.activity.expired() => true,
            _ = self.destroyed.cancelled() => false,
        }
    }
}

async fn forward_input(
    mut from: mpsc::Receiver<Bytes>,
    to: mpsc::Sender<Bytes>,
    stop: CancellationToken,
) {
    loop {
        let chunk = tokio::select! {
            c = from.recv() => c,
            _ = stop.cancelled() => None,
        };
        let Some(chunk) = chunk else { return };
        tokio::select! {
            r = to.send(chunk) => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// Forwards output; returns the final event, or `None` if the client is gone.
async fn forward_output(
    mut from: mpsc::Receiver<ProcessEvent>,
    to: &mpsc::Sender<ExecEvent>,
) -> Option<ExecEvent> {
    let mut stdout = Utf8Decoder::default();
    let mut stderr = Utf8Decoder::default();
    loop {
        let event = match from.recv().await {
            Some(ProcessEvent::Stdout(b)) => ExecEvent::Stdout(stdout.decode(&b)),
            Some(ProcessEvent::Stderr(b)) => ExecEvent::Stderr(stderr.decode(&b)),
            Some(ProcessEvent::Exited(code)) => {
                flush(&mut stdout, &mut stderr, to).await?;
                return Some(ExecEvent::Exit((code & 0xff) as u8));
            }
            Some(ProcessEvent::Failed(message)) => {
                flush(&mut stdout, &mut stderr, to).await?;
                return Some(ExecEvent::Error(message));
            }
            None => {
                flush(&mut stdout, &mut stderr, to).await?;
                return Some(ExecEvent::Error(GENERIC_EXECUTION_ERROR.to_string()));
            }
        };
        if matches!(&event, ExecEvent::Stdout(s) | ExecEvent::Stderr(s) if s.is_empty()) {
            continue;
        }
        to.send(event).await.ok()?;
    }
}

async fn flush(
    stdout: &mut Utf8Decoder,
    stderr: &mut Utf8Decoder,
    to: &mpsc::Sender<ExecEvent>,
) -> Option<()> {
    let out = stdout.finish();
    if !out.is_empty() {
        to.send(ExecEvent::Stdout(out)).await.ok()?;
    }
    let err = stderr.finish();
    if !err.is_empty() {
        to.send(ExecEvent::Stderr(err)).await.ok()?;
    }
    Some(())
}

/// The inactivity timer: restarted by activity, paused while executions run.
struct Activity {
    timeout: Option<Duration>,
    state: Mutex<ActivityState>,
    changed: Notify,
}

struct ActivityState {
    last: Instant,
    running: usize,
}

/// Keeps the timer paused while alive.
struct RunningGuard<'a>(&'a Activity);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap();
        state.running -= 1;
        state.last = Instant::now();
        drop(state);
        self.0.changed.notify_waiters();
    }
}

impl Activity {
    fn new(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            state: Mutex::new(ActivityState {
                last: Instant::now(),
                running: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn touch(&self) {
        self.state.lock().unwrap().last = Instant::now();
        self.changed.notify_waiters();
    }

    fn begin(&self) -> RunningGuard<'_> {
        let mut state = self.state.lock().unwrap();
        state.running += 1;
        state.last = Instant::now();
        drop(state);
        self.changed.notify_waiters();
        RunningGuard(self)
    }

    async fn expired(&self) {
        let Some(timeout) = self.timeout else {
            return std::future::pending().await;
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let deadline = {
                let state = self.state.lock().unwrap();
                if state.running > 0 {
                    None
                } else {
                    Some(state.last.checked_add(timeout))
                }
            };
            match deadline {
                None | Some(None) => changed.await,
                Some(Some(deadline)) => {
                    if Instant::now() >= deadline {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline.into()) => {}
                        _ = changed => {}
                    }
                }
            }
        }
    }
}
