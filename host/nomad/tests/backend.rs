//! The Nomad backend against the emulator (and against a real Nomad when `NOMAD_ADDR` is set).

use bytes::Bytes;
use futures::StreamExt;
use nomad_emulator::{Emulator, EmulatorConfig};
use poseidon_core::backend::{
    Backend, BackendError, BackendEvent, Claim, ExecRequest, ListRequest, LostReason, ProcessEvent,
    RunnerBackend,
};
use poseidon_core::files::{FileCopy, FileUpdate};
use poseidon_core::{EnvironmentConfig, RunnerId};
use poseidon_nomad::{NomadBackend, NomadConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(30);

fn env(id: u64) -> EnvironmentConfig {
    EnvironmentConfig {
        id,
        image: "openhpi/docker_exec_phusion".into(),
        prewarming_pool_size: 1,
        cpu_limit: 20,
        memory_limit: 256,
        network_access: false,
        exposed_ports: vec![],
    }
}

/// The backend on the emulator, on the agentless path (the runner agent is a binary of another
/// crate; the server's tests drive the backend with the agent).
async fn setup() -> (Emulator, NomadBackend) {
    let emu = Emulator::start(EmulatorConfig::for_tests()).await.unwrap();
    let config = NomadConfig {
        address: "127.0.0.1".into(),
        port: emu.addr().port(),
        unprivilegedprefix: String::new(),
        runneragent: false,
        startuptimeoutseconds: 20,
        ..NomadConfig::default()
    };
    (emu, NomadBackend::new(config).unwrap())
}

#[derive(Debug, Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<i32>,
    failed: Option<String>,
}

async fn run(
    runner: &Arc<dyn RunnerBackend>,
    command: &str,
    env: Vec<(String, String)>,
    stdin: &[u8],
) -> Output {
    let req = ExecRequest {
        command: command.into(),
        environment: env,
        privileged: false,
        tty: true,
        time_limit: None,
    };
    let mut p = runner.execute(&req).await.expect("execute");
    if !stdin.is_empty() {
        p.stdin.send(Bytes::copy_from_slice(stdin)).await.unwrap();
    }
    let mut out = Output::default();
    let end = Instant::now() + DEADLINE;
    while Instant::now() < end {
        match tokio::time::timeout(DEADLINE, p.events.recv())
            .await
            .expect("process event in time")
        {
            Some(ProcessEvent::Stdout(d)) => out.stdout.extend_from_slice(&d),
            Some(ProcessEvent::Stderr(d)) => out.stderr.extend_from_slice(&d),
            Some(ProcessEvent::Exited(c)) => {
                out.exit = Some(c);
                return out;
            }
            Some(ProcessEvent::Failed(f)) => {
                out.failed = Some(f);
                return out;
            }
            None => return out,
        }
    }
    panic!("execution did not end");
}

#[tokio::test]
async fn environments_are_template_jobs() {
    let (_emu, backend) = setup().await;
    let e = env(7);
    backend.store_environment(&e).await.unwrap();
    let end = Instant::now() + DEADLINE;
    let mut found = Vec::new();
    // The template allocation must be running before the environment is listed (as Poseidon).
    while Instant::now() < end {
        found = backend.load_environments().await.unwrap();
        if !found.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(found, vec![e.clone()]);
    backend.remove_environment(7).await.unwrap();
    assert!(backend.load_environments().await.unwrap().is_empty());
}

#[tokio::test]
async fn runner_executes_with_a_terminal_and_separate_stderr() {
    let (_emu, backend) = setup().await;
    let e = env(8);
    let runner = backend
        .create_runner(&e, RunnerId::generate(8))
        .await
        .unwrap();
    let out = run(&runner, "echo out; echo err >&2; exit 3", vec![], b"").await;
    assert_eq!(out.exit, Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("out"),
        "{out:?}"
    );
    assert_eq!(
        out.stderr, b"err\r\n",
        "stderr has a terminal's line ends, as in Poseidon"
    );

    let out = run(
        &runner,
        "echo \"$A|$CODEOCEAN|$(env | grep -c '^NOMAD_')\"",
        vec![("A".into(), "b c".into())],
        b"",
    )
    .await;
    assert_eq!(out.exit, Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("b c|true|0"),
        "{out:?}"
    );

    let out = run(&runner, "read line; echo \"got $line\"", vec![], b"hello\n").await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("got hello"),
        "{out:?}"
    );
    runner.destroy().await.unwrap();
}

#[tokio::test]
async fn files_are_copied_listed_and_downloaded() {
    let (_emu, backend) = setup().await;
    let runner = backend
        .create_runner(&env(9), RunnerId::generate(9))
        .await
        .unwrap();
    let update = FileUpdate {
        delete: vec![],
        copy: vec![
            FileCopy {
                path: "a.txt".into(),
                content: b"hello".to_vec(),
            },
            FileCopy {
                path: "dir/".into(),
                content: vec![],
            },
            FileCopy {
                path: "dir/b.txt".into(),
                content: b"bb".to_vec(),
            },
        ],
    };
    runner.update_files(&update).await.unwrap();
    let list = runner
        .list_files(&ListRequest {
            path: ".".into(),
            recursive: false,
            privileged: false,
        })
        .await
        .unwrap();
    let a = list
        .iter()
        .find(|f| f.name == "a.txt")
        .expect("a.txt listed");
    assert_eq!(
        (a.entry_type, a.size, a.permissions.as_str()),
        ('-', 5, "rwxr--r--")
    );
    let d = list.iter().find(|f| f.name == "dir").expect("dir listed");
    assert_eq!(d.entry_type, 'd');
    let rec = runner
        .list_files(&ListRequest {
            path: ".".into(),
            recursive: true,
            privileged: false,
        })
        .await
        .unwrap();
    assert!(rec.iter().any(|f| f.name == "./dir/b.txt"), "{rec:?}");

    let dl = runner.download_file("a.txt", false).await.unwrap();
    assert_eq!(dl.size, 5);
    let body: Vec<u8> = dl.body.map(|c| c.unwrap().to_vec()).concat().await;
    assert_eq!(body, b"hello");
    assert!(matches!(
        runner.download_file("missing", false).await,
        Err(BackendError::FileNotFound)
    ));
    assert!(matches!(
        runner
            .list_files(&ListRequest {
                path: "missing".into(),
                recursive: false,
                privileged: false
            })
            .await,
        Err(BackendError::FileNotFound)
    ));

    let del = FileUpdate {
        delete: vec!["a.txt".into()],
        copy: vec![],
    };
    runner.update_files(&del).await.unwrap();
    let list = runner
        .list_files(&ListRequest {
            path: ".".into(),
            recursive: false,
            privileged: false,
        })
        .await
        .unwrap();
    assert!(!list.iter().any(|f| f.name == "a.txt"));
}

#[tokio::test]
async fn claimed_runners_are_recovered_with_their_timeout_and_owner() {
    let (_emu, backend) = setup().await;
    let e = env(11);
    let id = RunnerId::generate(11);
    let runner = backend.create_runner(&e, id.clone()).await.unwrap();
    let claim = Claim {
        inactivity_timeout: 30,
        owner: Some("hpi".into()),
    };
    runner.mark_claimed(Some(claim.clone())).await.unwrap();
    let other = backend
        .create_runner(&e, RunnerId::generate(11))
        .await
        .unwrap();
    let recovered = backend.recover_runners(&e).await.unwrap();
    assert_eq!(recovered.len(), 2);
    let mine = recovered.iter().find(|r| r.runner.id() == &id).unwrap();
    assert_eq!(mine.claimed, Some(claim));
    let idle = recovered
        .iter()
        .find(|r| r.runner.id() == other.id())
        .unwrap();
    assert_eq!(idle.claimed, None);
}

async fn alloc_of(emu: &Emulator, job: &str) -> String {
    let list: serde_json::Value = reqwest::get(format!("{}/v1/job/{job}/allocations", emu.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list[0]["ID"].as_str().unwrap().to_string()
}

async fn next_lost(
    events: &mut tokio::sync::mpsc::Receiver<BackendEvent>,
) -> (RunnerId, LostReason) {
    let end = Instant::now() + DEADLINE;
    while Instant::now() < end {
        match tokio::time::timeout(DEADLINE, events.recv())
            .await
            .expect("backend event in time")
        {
            Some(BackendEvent::RunnerLost { runner, reason }) => return (runner, reason),
            Some(_) => continue,
            None => panic!("event channel closed"),
        }
    }
    panic!("no RunnerLost");
}

#[tokio::test]
async fn oom_kill_is_reported_even_after_a_stream_cut() {
    let (emu, backend) = setup().await;
    let mut events = backend.take_events().unwrap();
    let id = RunnerId::generate(12);
    let runner = backend.create_runner(&env(12), id.clone()).await.unwrap();
    // Break the stream; the backend reconnects (backoff) and resynchronises.
    emu.cut_event_streams();
    let alloc = alloc_of(&emu, id.as_str()).await;
    let r = reqwest::Client::new()
        .post(format!("{}/_emulator/allocation/{alloc}/oom", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (lost, reason) = next_lost(&mut events).await;
    assert_eq!(lost, id);
    assert_eq!(reason, LostReason::OomKilled);
    drop(runner);
}

#[tokio::test]
async fn node_loss_is_reported_as_a_restart_and_the_runner_lives_on() {
    let (emu, backend) = setup().await;
    let mut events = backend.take_events().unwrap();
    let id = RunnerId::generate(13);
    let _runner = backend.create_runner(&env(13), id.clone()).await.unwrap();
    let alloc = alloc_of(&emu, id.as_str()).await;
    reqwest::Client::new()
        .post(format!(
            "{}/_emulator/allocation/{alloc}/lose-node",
            emu.url()
        ))
        .send()
        .await
        .unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        let event =
            tokio::time::timeout(end.saturating_duration_since(Instant::now()), events.recv())
                .await
                .expect("a RunnerRestarted event in time");
        match event {
            Some(BackendEvent::RunnerRestarted { runner }) => {
                assert_eq!(runner, id);
                break;
            }
            Some(BackendEvent::RunnerLost { runner, reason }) => {
                panic!("{runner} reported lost ({reason:?}) instead of restarted")
            }
            Some(_) => continue,
            None => panic!("event channel closed"),
        }
    }
    // The job was not purged: it runs on a new allocation.
    let jobs: serde_json::Value = reqwest::get(format!("{}/v1/jobs?prefix={id}", emu.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
}

#[tokio::test]
async fn unreachable_nomad_is_reported_as_unreachable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let backend = NomadBackend::new(NomadConfig {
        address: "127.0.0.1".into(),
        port,
        ..NomadConfig::default()
    })
    .unwrap();
    let err = backend.load_environments().await.unwrap_err();
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
    let err = backend
        .create_runner(&env(1), RunnerId::generate(1))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
}

/// Runs against a real Nomad (dev agent with docker) at `NOMAD_ADDR`.
#[tokio::test]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_smoke_test() {
    let addr = std::env::var("NOMAD_ADDR")
        .expect("real_nomad_smoke_test needs a real Nomad: set NOMAD_ADDR");
    let url = reqwest::Url::parse(&addr).expect("NOMAD_ADDR is a URL");
    let backend = NomadBackend::new(NomadConfig {
        address: url.host_str().unwrap_or("127.0.0.1").into(),
        port: url.port().unwrap_or(4646),
        token: std::env::var("NOMAD_TOKEN").unwrap_or_default(),
        namespace: std::env::var("NOMAD_NAMESPACE").unwrap_or_else(|_| "default".into()),
        // The test image is built locally by real-nomad/up.sh: there is nothing to pull.
        disableforcepull: true,
        // The agentless path, as in the emulator tests above: the agent is a binary of another
        // crate, not next to this test's executable (the server's real-Nomad tests use it).
        runneragent: false,
        ..NomadConfig::default()
    })
    .unwrap();
    let mut e = env(990_001);
    e.image = std::env::var("POSEIDON_TEST_IMAGE")
        .unwrap_or_else(|_| "openhpi/co_execenv_python:3.8".into());
    backend.store_environment(&e).await.unwrap();
    let runner = backend
        .create_runner(&e, RunnerId::generate(e.id))
        .await
        .unwrap();
    let out = run(&runner, "echo hi; exit 2", vec![], b"").await;
    assert_eq!(out.exit, Some(2));
    runner.destroy().await.unwrap();
    // Runner jobs are stopped first and purged once stopped: leave no job behind.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        backend.remove_environment(e.id).await.unwrap();
        let left: serde_json::Value = reqwest::get(format!(
            "{}/v1/jobs?prefix={}-",
            addr.trim_end_matches('/'),
            e.id
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        if left.as_array().is_some_and(|l| l.is_empty()) || Instant::now() > end {
            assert_eq!(left, serde_json::json!([]), "jobs left behind");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
