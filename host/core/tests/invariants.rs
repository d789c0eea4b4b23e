//! Core's invariants with an in-memory agent: runners whose sandbox is a pipe to a scripted agent
//! speaking the real protocol, so no bubblewrap or Nomad is involved.
//!
//! The scripted agent understands commands of the form `out:TEXT;err:TEXT;exit:N` (executed in
//! order) and `hang` (runs until it is signalled).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use poseidon_agent_protocol::{encode, Decoder, Frame, FrameKind, Reply, Request};
use poseidon_core::agent::{AgentRunner, Sandbox, SandboxChannel};
use poseidon_core::backend::{Backend, BackendError, RecoveredRunner, RunnerBackend};
use poseidon_core::execution::{ExecEvent, ExecutionRequest};
use poseidon_core::runner::DestroyReason;
use poseidon_core::{CoreError, EnvironmentConfig, EnvironmentId, Manager, RunnerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counts what the backend did.
#[derive(Default)]
struct Counters {
    created: AtomicUsize,
    destroyed: Mutex<Vec<RunnerId>>,
}

struct FakeBackend {
    counters: Arc<Counters>,
}

struct FakeSandbox {
    id: RunnerId,
    counters: Arc<Counters>,
}

#[async_trait]
impl Sandbox for FakeSandbox {
    fn id(&self) -> &RunnerId {
        &self.id
    }
    fn workdir(&self) -> &str {
        "/workspace"
    }
    fn base_environment(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    async fn connect(&self) -> Result<SandboxChannel, BackendError> {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(scripted_agent(theirs));
        let (reader, writer) = tokio::io::split(ours);
        Ok((Box::pin(reader), Box::pin(writer)))
    }
    async fn destroy(&self) -> Result<(), BackendError> {
        self.counters
            .destroyed
            .lock()
            .unwrap()
            .push(self.id.clone());
        Ok(())
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn validate(&self, _config: &EnvironmentConfig) -> Result<(), BackendError> {
        Ok(())
    }
    async fn store_environment(&self, _config: &EnvironmentConfig) -> Result<(), BackendError> {
        Ok(())
    }
    async fn remove_environment(&self, _id: EnvironmentId) -> Result<(), BackendError> {
        Ok(())
    }
    async fn load_environments(&self) -> Result<Vec<EnvironmentConfig>, BackendError> {
        Ok(Vec::new())
    }
    async fn create_runner(
        &self,
        _config: &EnvironmentConfig,
        id: RunnerId,
    ) -> Result<Arc<dyn RunnerBackend>, BackendError> {
        self.counters.created.fetch_add(1, Ordering::SeqCst);
        let sandbox = Arc::new(FakeSandbox {
            id,
            counters: Arc::clone(&self.counters),
        });
        Ok(Arc::new(AgentRunner::new(
            sandbox,
            None,
            Duration::from_secs(5),
        )))
    }
    async fn recover_runners(
        &self,
        _config: &EnvironmentConfig,
    ) -> Result<Vec<RecoveredRunner>, BackendError> {
        Ok(Vec::new())
    }
}

/// The agent's side of one connection, scripted.
async fn scripted_agent(stream: tokio::io::DuplexStream) {
    let (mut reader, writer) = tokio::io::split(stream);
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let send = |frame: Frame| {
        let writer = Arc::clone(&writer);
        async move {
            let mut out = BytesMut::new();
            encode(&frame, &mut out);
            let _ = writer.lock().await.write_all(&out).await;
        }
    };
    let hanging: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 4096];
    loop {
        while let Ok(Some(frame)) = decoder.next_frame() {
            let stream = frame.stream;
            let Ok(request) = frame.parse::<Request>() else {
                continue;
            };
            match request {
                Request::Hello { version, .. } => {
                    send(Frame::control(
                        0,
                        &Reply::Hello {
                            version,
                            pid: 1,
                            features: Vec::new(),
                        },
                    ))
                    .await
                }
                Request::Ping => send(Frame::control(stream, &Reply::Pong)).await,
                Request::UpdateFiles { .. } => send(Frame::control(stream, &Reply::Done)).await,
                Request::Exec { argv, .. } => {
                    send(Frame::control(stream, &Reply::Started { pid: 2 })).await;
                    let script = argv.last().cloned().unwrap_or_default();
                    if script == "hang" {
                        hanging.lock().unwrap().insert(stream);
                        continue;
                    }
                    for step in script.split(';') {
                        match step.split_once(':') {
                            Some(("out", text)) => {
                                send(Frame::data(
                                    FrameKind::Stdout,
                                    stream,
                                    Bytes::from(text.to_string()),
                                ))
                                .await
                            }
                            Some(("err", text)) => {
                                send(Frame::data(
                                    FrameKind::Stderr,
                                    stream,
                                    Bytes::from(text.to_string()),
                                ))
                                .await
                            }
                            Some(("exit", code)) => {
                                let code = code.parse().unwrap_or(1);
                                send(Frame::control(stream, &Reply::Exited { code })).await
                            }
                            _ => {}
                        }
                    }
                }
                Request::Signal { signal } => {
                    if hanging.lock().unwrap().remove(&stream) {
                        send(Frame::control(
                            stream,
                            &Reply::Exited { code: 128 + signal },
                        ))
                        .await
                    }
                }
                Request::List { .. } | Request::Read { .. } => {
                    send(Frame::control(stream, &Reply::NotFound)).await
                }
            }
        }
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => decoder.extend(&buf[..n]),
        }
    }
}

fn environment(id: EnvironmentId, pool: u32) -> EnvironmentConfig {
    EnvironmentConfig {
        id,
        image: "fake".into(),
        prewarming_pool_size: pool,
        cpu_limit: 0,
        memory_limit: 0,
        network_access: false,
        exposed_ports: Vec::new(),
    }
}

async fn manager_with(pool: u32) -> (Manager, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let backend = Arc::new(FakeBackend {
        counters: Arc::clone(&counters),
    });
    let manager = Manager::start(backend, None).await.unwrap();
    manager.put_environment(environment(1, pool)).await.unwrap();
    (manager, counters)
}

async fn claim_when_ready(
    manager: &Manager,
    timeout: Option<Duration>,
) -> Arc<poseidon_core::runner::Runner> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match manager.claim(1, timeout, None) {
            Ok(runner) => return runner,
            Err(CoreError::PoolEmpty) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("claim failed: {e}"),
        }
    }
}

fn request(command: &str, time_limit: Option<Duration>) -> ExecutionRequest {
    ExecutionRequest {
        command: command.into(),
        environment: Vec::new(),
        time_limit,
        privileged: false,
    }
}

/// Every event until the channel closes.
async fn all_events(mut handle: poseidon_core::execution::ExecutionHandle) -> Vec<ExecEvent> {
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(10), handle.events.recv())
        .await
        .expect("the execution never ended")
    {
        events.push(event);
    }
    events
}

#[tokio::test]
async fn an_execution_sends_its_output_then_exactly_one_final_event() {
    let (manager, _) = manager_with(1).await;
    let runner = claim_when_ready(&manager, None).await;
    let events = all_events(runner.run(request("out:hello;err:oops;exit:3", None))).await;
    let finals: Vec<_> = events.iter().filter(|e| e.is_final()).collect();
    assert_eq!(finals, vec![&ExecEvent::Exit(3)]);
    assert!(events.last().unwrap().is_final());
    assert!(events.contains(&ExecEvent::Stdout("hello".into())));
    assert!(events.contains(&ExecEvent::Stderr("oops".into())));
}

#[tokio::test]
async fn the_time_limit_ends_a_hanging_execution_once_with_timeout() {
    let (manager, _) = manager_with(1).await;
    let runner = claim_when_ready(&manager, None).await;
    let events = all_events(runner.run(request("hang", Some(Duration::from_millis(50))))).await;
    assert_eq!(events, vec![ExecEvent::Timeout]);
}

#[tokio::test]
async fn the_inactivity_timer_is_paused_while_an_execution_runs() {
    let (manager, _) = manager_with(1).await;
    let runner = claim_when_ready(&manager, Some(Duration::from_millis(100))).await;
    let handle = runner.run(request("hang", None));
    // Several timeouts long, the running execution keeps the runner.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!runner.is_destroyed());
    assert!(manager.runner(runner.id()).is_ok());
    drop(handle);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while manager.runner(runner.id()).is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "never timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(runner.is_destroyed());
}

#[tokio::test]
async fn a_runner_is_destroyed_exactly_once() {
    let (manager, counters) = manager_with(1).await;
    let runner = claim_when_ready(&manager, None).await;
    let id = runner.id().clone();
    let handle = runner.run(request("hang", None));
    let (a, b) = tokio::join!(
        manager.destroy_runner(&id, DestroyReason::ClientRequest),
        manager.destroy_runner(&id, DestroyReason::InactivityTimeout),
    );
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one destroy succeeds: {a:?} {b:?}"
    );
    let events = all_events(handle).await;
    assert_eq!(events.iter().filter(|e| e.is_final()).count(), 1);
    let destroyed = counters.destroyed.lock().unwrap().clone();
    assert_eq!(destroyed.iter().filter(|d| **d == id).count(), 1);
}

#[tokio::test]
async fn claims_hand_out_each_runner_once() {
    let (manager, _) = manager_with(5).await;
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let runner = claim_when_ready(&manager, None).await;
        assert!(
            seen.insert(runner.id().clone()),
            "{} handed out twice",
            runner.id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_racing_an_environment_delete_leave_no_runner_behind() {
    for _ in 0..20 {
        let (manager, counters) = manager_with(8).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while manager.statistics().first().map_or(0, |s| s.idle_runners) < 8 {
            assert!(tokio::time::Instant::now() < deadline, "pool never filled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let manager = Arc::new(manager);
        let claims: Vec<_> = (0..8)
            .map(|_| {
                let manager = Arc::clone(&manager);
                tokio::spawn(async move { manager.claim(1, None, None).ok() })
            })
            .collect();
        let delete = {
            let manager = Arc::clone(&manager);
            tokio::spawn(async move { manager.delete_environment(1).await })
        };
        delete.await.unwrap().unwrap();
        let claimed: Vec<_> = futures::future::join_all(claims)
            .await
            .into_iter()
            .filter_map(|c| c.unwrap())
            .collect();
        // No runner of the deleted environment is still addressable, and every runner the backend
        // created is destroyed exactly once.
        for runner in &claimed {
            assert!(
                manager.runner(runner.id()).is_err(),
                "{} survived",
                runner.id()
            );
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let destroyed = counters.destroyed.lock().unwrap().clone();
            let unique: HashSet<_> = destroyed.iter().collect();
            assert_eq!(
                unique.len(),
                destroyed.len(),
                "a runner was destroyed twice"
            );
            if destroyed.len() == counters.created.load(Ordering::SeqCst) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "runners left behind"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
