//! The Nomad backend under faults, over the Nomad emulator: the server must lose no runner, create
//! no duplicate, and bring every pool back to its target.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{eventually, log_tail, status_and_json, Backend, Options, Server, Ws};

async fn nomad_server() -> Server {
    Server::start_with(Options {
        backend: Backend::Nomad,
        ..Default::default()
    })
    .await
}

/// GET of a Nomad API path (`/v1/...`, with its query) on the emulator or on the real Nomad,
/// in the server's namespace.
async fn nomad_get(s: &Server, path_and_query: &str) -> Value {
    match s.real_nomad() {
        None => {
            let url = format!("{}{path_and_query}", s.emulator_url().unwrap());
            reqwest::get(url).await.unwrap().json().await.unwrap()
        }
        Some(real) => {
            let sep = if path_and_query.contains('?') {
                '&'
            } else {
                '?'
            };
            real.request(
                reqwest::Method::GET,
                &format!("{path_and_query}{sep}namespace={}", real.namespace),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
        }
    }
}

/// Ids of the runner jobs of an environment that Nomad has (not dead).
async fn runner_jobs(s: &Server, env: u64) -> Vec<String> {
    let jobs = nomad_get(s, &format!("/v1/jobs?prefix={env}-")).await;
    jobs.as_array()
        .unwrap()
        .iter()
        .filter(|j| j["Status"] != "dead")
        .map(|j| j["ID"].as_str().unwrap().to_string())
        .collect()
}

/// The (first) allocation of a runner job.
async fn allocation_of(s: &Server, job: &str) -> Value {
    let allocs = nomad_get(s, &format!("/v1/job/{job}/allocations")).await;
    allocs
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["ClientStatus"] == "running")
        .cloned()
        .unwrap_or_else(|| panic!("no running allocation of {job}: {allocs}"))
}

async fn fault(s: &Server, path: &str) {
    let r = reqwest::Client::new()
        .post(format!("{}/_emulator/{path}", s.emulator_url().unwrap()))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "fault {path}: {}", r.status());
}

async fn stats(s: &Server, env: u64) -> Value {
    let v: Value = s
        .get_json(s.url("/statistics/execution-environments"))
        .await;
    v[env.to_string()].clone()
}

/// Waits until the pool is at its target and Nomad holds exactly idle + used runner jobs.
async fn settled(s: &Server, env: u64, pool: u64, used: u64) {
    let wait = if s.real_nomad().is_some() { 180 } else { 30 };
    let deadline = std::time::Instant::now() + Duration::from_secs(wait);
    loop {
        let st = stats(s, env).await;
        let jobs = runner_jobs(s, env).await;
        if st["idleRunners"] == pool
            && st["usedRunners"] == used
            && jobs.len() as u64 == pool + used
        {
            return;
        }
        if std::time::Instant::now() >= deadline {
            for job in &jobs {
                let allocs = nomad_get(s, &format!("/v1/job/{job}/allocations")).await;
                let states: Vec<String> = allocs
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| format!("{}/{}", a["ClientStatus"], a["DesiredStatus"]))
                    .collect();
                let in_log = s.log().lines().filter(|l| l.contains(job.as_str())).count();
                eprintln!("job {job}: allocations {states:?}, {in_log} log lines mention it");
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pool of {env} not settled at {pool} idle + {used} used: statistics {st}, runner jobs in Nomad {jobs:?}\nserver log (end):\n{}",
            s.log().lines().filter(|l| l.contains("poseidon")).rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_recovers_used_and_idle_runners() {
    a_killed_server_recovers_used_and_idle_runners_on(Backend::Nomad).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_a_killed_server_recovers_used_and_idle_runners() {
    support::require_real_nomad("real_nomad_a_killed_server_recovers_used_and_idle_runners");
    a_killed_server_recovers_used_and_idle_runners_on(Backend::RealNomad).await;
}

/// Clients that keep claiming runners (counted in `claims`), copying into them and giving them
/// back, until `stop`; returns the runners they still hold.
fn keep_busy(
    s: &Server,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    claims: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..3)
        .map(|_| {
            let http = s.http.clone();
            let api = s.url("");
            let stop = stop.clone();
            let claims = claims.clone();
            tokio::spawn(async move {
                let mut held = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let claim = http
                        .post(format!("{api}/runners"))
                        .json(&json!({"executionEnvironmentId": 1, "inactivityTimeout": 120}))
                        .send()
                        .await;
                    let Ok(r) = claim else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Some(id) = r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["runnerId"].as_str().map(String::from))
                    else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    held.push(id.clone());
                    claims.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = http
                        .patch(format!("{api}/runners/{id}/files"))
                        .json(&json!({"copy": [{"path": "load.txt", "content": "bG9hZA=="}]}))
                        .send()
                        .await;
                    if let Ok(r) = http.delete(format!("{api}/runners/{id}")).send().await {
                        if r.status() == 204 {
                            held.retain(|h| h != &id);
                        }
                    }
                }
                held
            })
        })
        .collect()
}

/// kill -9 of the gateway under load (clients claiming, copying and giving back runners) while a
/// runner is claimed: after the restart, no runner is lost, leaked or duplicated, and the claimed
/// one keeps its files.
async fn a_killed_server_recovers_used_and_idle_runners_on(backend: Backend) {
    let mut s = Server::on(backend).await;
    s.environment(1, 2, json!({})).await;
    let runner = s.claim(1, 600).await;
    s.copy(&runner, &[("kept.txt", b"still here")]).await;
    settled(&s, 1, 2, 1).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let claims = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = keep_busy(&s, stop.clone(), claims.clone());
    // The server dies while the clients are at it: once they have claimed a few runners.
    eventually("the clients claimed runners", 120, || async {
        claims.load(std::sync::atomic::Ordering::Relaxed) >= 3
    })
    .await;
    s.kill_and_restart().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // What the clients still held when the server died is given back now.
    for task in load {
        for id in task.await.unwrap() {
            let _ = s.http.delete(s.url(&format!("/runners/{id}"))).send().await;
        }
    }
    // The used runner keeps its id and its files; the pool is recognised, not recreated.
    let r = s.download(&runner, "kept.txt").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "still here");
    settled(&s, 1, 2, 1).await;
    let out = s.run(&runner, json!({"command": "echo alive"})).await;
    assert_eq!(out.stdout, "alive\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_cut_mid_execution_loses_nothing() {
    let s = nomad_server().await;
    s.environment(2, 2, json!({})).await;
    let runner = s.claim(2, 600).await;
    let url = s
        .execute(&runner, json!({"command": "echo begin; sleep 1; echo end"}))
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("begin").await;
    fault(&s, "stream/cut").await;
    let out = ws.finish().await;
    assert_eq!(out.exit(), Some(0));
    assert!(out.stdout.contains("end"));
    settled(&s, 2, 2, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_ends_the_execution_and_the_pool_is_refilled() {
    let s = nomad_server().await;
    s.environment(3, 1, json!({"memoryLimit": 128})).await;
    let runner = s.claim(3, 600).await;
    let url = s
        .execute(&runner, json!({"command": "echo up; sleep 100"}))
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("up").await;
    let alloc = allocation_of(&s, &runner).await;
    fault(
        &s,
        &format!("allocation/{}/oom", alloc["ID"].as_str().unwrap()),
    )
    .await;
    let out = ws.finish().await;
    assert_eq!(
        out.last,
        json!({"type": "error", "data": "the allocation was OOM Killed"})
    );
    eventually("the OOM-killed runner is gone", 10, || async {
        s.http
            .get(s.url(&format!("/runners/{runner}/files")))
            .send()
            .await
            .unwrap()
            .status()
            == 410
    })
    .await;
    eventually("the pool is back at its target", 30, || async {
        stats(&s, 3).await["idleRunners"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_and_lost_idle_runners_are_replaced_without_duplicates() {
    let s = nomad_server().await;
    s.environment(4, 3, json!({})).await;
    let jobs = runner_jobs(&s, 4).await;
    assert_eq!(jobs.len(), 3);
    let restarted = allocation_of(&s, &jobs[0]).await;
    fault(
        &s,
        &format!("allocation/{}/restart", restarted["ID"].as_str().unwrap()),
    )
    .await;
    let lost = allocation_of(&s, &jobs[1]).await;
    fault(
        &s,
        &format!("allocation/{}/lose-node", lost["ID"].as_str().unwrap()),
    )
    .await;
    settled(&s, 4, 3, 0).await;
    // Claims still work and are replaced.
    let runner = s.claim(4, 0).await;
    let out = s.run(&runner, json!({"command": "echo ok"})).await;
    assert_eq!(out.stdout, "ok\r\n");
    settled(&s, 4, 3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_nomad_refuses_connections_claims_work_and_the_rest_says_nomad_unreachable() {
    let s = nomad_server().await;
    s.environment(5, 2, json!({})).await;
    fault(&s, "refuse?seconds=10").await;
    nomad_unreachable_for_a_while(&s).await;
}

/// A server on the real Nomad at `NOMAD_ADDR`, reaching it through a [`support::TcpGate`] the
/// test can close.
async fn server_behind_a_gate() -> (support::TcpGate, Server) {
    let agent = std::env::var("NOMAD_ADDR").unwrap();
    let gate = support::TcpGate::open(
        agent
            .split("://")
            .last()
            .unwrap()
            .trim_end_matches('/')
            .to_string(),
    )
    .await;
    let s = Server::start_with(Options {
        backend: Backend::RealNomad,
        real_nomad_via: Some(gate.addr.clone()),
        ..Default::default()
    })
    .await;
    (gate, s)
}

/// 10 s of Nomad unreachable on a real cluster: the gateway reaches the agent through a TCP gate
/// that cuts every connection (event stream, exec sessions) and refuses new ones for 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_while_nomad_is_unreachable_claims_work_and_the_rest_says_nomad_unreachable() {
    support::require_real_nomad(
        "real_nomad_while_nomad_is_unreachable_claims_work_and_the_rest_says_nomad_unreachable",
    );
    let (gate, s) = server_behind_a_gate().await;
    s.environment(5, 2, json!({})).await;
    gate.close_for(Duration::from_secs(10));
    nomad_unreachable_for_a_while(&s).await;
}

/// While Nomad is unreachable (for about 10 s): claims are served from the pool, changes get
/// `NOMAD_UNREACHABLE`; afterwards everything resumes, with no runner lost, leaked or duplicated.
async fn nomad_unreachable_for_a_while(s: &Server) {
    // Claims are served from the warm pool.
    let runner = s.claim(5, 0).await;
    assert!(runner.starts_with("5-"));
    let body = json!({"image": s.test_image(), "prewarmingPoolSize": 1, "cpuLimit": 10, "memoryLimit": 0, "networkAccess": false, "exposedPorts": []});
    let r = s
        .http
        .put(s.url("/execution-environments/6"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["errorCode"], "NOMAD_UNREACHABLE", "{err}");
    // Everything resumes by itself once Nomad is back.
    eventually("Nomad accepts environments again", 30, || async {
        s.http
            .put(s.url("/execution-environments/6"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            == 201
    })
    .await;
    settled(s, 5, 2, 1).await;
    s.wait_idle(6, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_out_of_order_events_change_nothing() {
    let s = nomad_server().await;
    fault(&s, "events/duplicate?count=200").await;
    fault(&s, "events/reorder?count=200").await;
    s.environment(7, 3, json!({})).await;
    let a = s.claim(7, 0).await;
    let b = s.claim(7, 0).await;
    assert_eq!(
        s.http
            .delete(s.url(&format!("/runners/{a}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    settled(&s, 7, 3, 1).await;
    let out = s.run(&b, json!({"command": "echo fine"})).await;
    assert_eq!(out.stdout, "fine\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_deletes_environments_whose_template_job_is_gone() {
    let s = nomad_server().await;
    s.environment(8, 2, json!({})).await;
    s.environment(9, 1, json!({})).await;
    let runner = s.claim(8, 0).await;
    // Someone removes the template job in Nomad behind the gateway's back.
    let r = reqwest::Client::new()
        .delete(format!(
            "{}/v1/job/template-8?purge=true",
            s.emulator_url().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let r = s
        .http
        .get(s.url("/execution-environments/8?fetch=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let list: Value = s.get_json(s.url("/execution-environments")).await;
    let ids: Vec<u64> = list["executionEnvironments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![9]);
    assert_eq!(
        s.http
            .get(s.url(&format!("/runners/{runner}/files")))
            .send()
            .await
            .unwrap()
            .status(),
        410
    );
    eventually(
        "the deleted environment's runner jobs are purged",
        30,
        || async { runner_jobs(&s, 8).await.is_empty() },
    )
    .await;
    settled(&s, 9, 1, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescheduled_runner_in_use_stays_the_learners_with_its_files_gone() {
    let s = nomad_server().await;
    s.environment(10, 1, json!({})).await;
    let runner = s.claim(10, 600).await;
    s.copy(&runner, &[("work.txt", b"before")]).await;
    let url = s
        .execute(&runner, json!({"command": "echo up; sleep 100"}))
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("up").await;
    let alloc = allocation_of(&s, &runner).await;
    fault(
        &s,
        &format!("allocation/{}/lose-node", alloc["ID"].as_str().unwrap()),
    )
    .await;
    let out = ws.finish().await;
    // The killed program (137), the restart event or the container's death (both errors) ends it,
    // whichever arrives first.
    assert!(
        out.last["type"] == "error" || out.last == json!({"type": "exit", "data": 137}),
        "{:?}",
        out.messages
    );
    // Same runner id, a fresh sandbox: the file is gone, commands run again.
    eventually("the runner runs on its new allocation", 30, || async {
        let r = s.download(&runner, "work.txt").await;
        r.status() == 424
    })
    .await;
    let out = s.run(&runner, json!({"command": "echo again"})).await;
    assert_eq!(out.stdout, "again\r\n");
    settled(&s, 10, 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrators_template_job_shapes_every_job() {
    let dir = std::env::temp_dir().join(format!("poseidon-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("template.json");
    let template = json!({"Job": {"Datacenters": ["dc1"], "Meta": {"owner": "course-admins"},
        "TaskGroups": [{"Name": "default-group", "Tasks": [{"Name": "default-task", "Driver": "docker",
            "Config": {"image": "ignored", "labels": {"team": "grading"}}, "Resources": {"MemoryMB": 20}}]}]}});
    std::fs::write(&file, template.to_string()).unwrap();
    let s = Server::start_with(Options {
        backend: Backend::Nomad,
        server_yaml: format!("  templatejobfile: {}", file.display()),
        ..Default::default()
    })
    .await;
    s.environment(11, 1, json!({"memoryLimit": 128})).await;
    let emulator = s.emulator_url().unwrap();
    let jobs = runner_jobs(&s, 11).await;
    for id in ["template-11".to_string(), jobs[0].clone()] {
        let job: Value = reqwest::get(format!("{emulator}/v1/job/{id}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(job["Meta"]["owner"], "course-admins", "{id}");
        let task = &job["TaskGroups"][0]["Tasks"][0];
        assert_eq!(task["Config"]["labels"]["team"], "grading", "{id}");
        assert_eq!(
            task["Config"]["image"], "host",
            "the environment's image wins: {id}"
        );
        assert_eq!(task["Resources"]["MemoryMaxMB"], 128, "{id}");
    }
    let env: Value = s.get_json(s.url("/execution-environments/11")).await;
    assert_eq!(env["memoryLimit"], 128);
    let runner = s.claim(11, 0).await;
    let out = s.run(&runner, json!({"command": "echo templated"})).await;
    assert_eq!(out.stdout, "templated\r\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An environment whose image cannot be pulled: the pool stays empty, and the statistics, a claim
/// and `/health` all carry Nomad's reason (the emulator treats `missing/*` images as unpullable;
/// a real agent without that image and without registry access fails the same way).
async fn a_pool_that_cannot_be_filled_says_why(backend: Backend) {
    let s = Server::start_with(Options {
        backend,
        server_yaml: "  alert:\n    prewarmingpoolthreshold: 0.5".into(),
        ..Default::default()
    })
    .await;
    let body = json!({"image": "missing/python", "prewarmingPoolSize": 1, "cpuLimit": 20,
        "memoryLimit": 64, "networkAccess": false, "exposedPorts": []});
    let r = s
        .http
        .put(s.url("/execution-environments/21"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let reason = "Failed to pull `missing/python`";
    eventually("the statistics name the start failure", 240, || async {
        let st = stats(&s, 21).await;
        st["idleRunners"] == 0
            && st["startFailure"]
                .as_str()
                .is_some_and(|m| m.contains(reason))
    })
    .await;
    let (status, err) = status_and_json(
        s.http
            .post(s.url("/runners"))
            .json(&json!({"executionEnvironmentId": 21}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(err["errorCode"], "NOMAD_OVERLOAD");
    assert!(err["message"].as_str().unwrap().contains(reason), "{err}");
    let (status, err) = status_and_json(s.http.get(s.url("/health")).send().await.unwrap()).await;
    assert_eq!(status, 503);
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("21") && message.contains(reason), "{err}");
    assert!(
        s.log().contains(reason),
        "the log names Nomad's reason: {}",
        log_tail(&s.log())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_cannot_be_filled_says_why_on_the_emulator() {
    a_pool_that_cannot_be_filled_says_why(Backend::Nomad).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_a_pool_that_cannot_be_filled_says_why() {
    support::require_real_nomad("real_nomad_a_pool_that_cannot_be_filled_says_why");
    a_pool_that_cannot_be_filled_says_why(Backend::RealNomad).await;
}

/// `server.interactivestderr: false` (Poseidon's setting): one exec session per execution, stderr
/// shares the terminal with stdout; the exit code and the time limit work as with two sessions.
async fn without_interactive_stderr_one_terminal_carries_both_streams(backend: Backend) {
    let s = Server::start_with(Options {
        backend,
        server_yaml: "  interactivestderr: false".into(),
        ..Default::default()
    })
    .await;
    s.environment(22, 1, json!({})).await;
    let runner = s.claim(22, 60).await;
    let out = s
        .run(
            &runner,
            json!({"command": "echo out; echo err >&2; exit 5"}),
        )
        .await;
    assert_eq!(out.exit(), Some(5));
    assert_eq!(out.stdout, "out\r\nerr\r\n");
    assert_eq!(out.stderr, "");
    let marker = format!("single-{}", std::process::id());
    let out = s
        .run(
            &runner,
            json!({"command": format!("echo started; sleep 1000 # {marker}"), "timeLimit": 1}),
        )
        .await;
    assert_eq!(out.last, json!({"type": "timeout"}));
    eventually("the timed-out program ended", 20, || async {
        support::host_processes_with(&marker).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_interactive_stderr_one_terminal_carries_both_streams_on_the_emulator() {
    without_interactive_stderr_one_terminal_carries_both_streams(Backend::Nomad).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_without_interactive_stderr_one_terminal_carries_both_streams() {
    support::require_real_nomad(
        "real_nomad_without_interactive_stderr_one_terminal_carries_both_streams",
    );
    without_interactive_stderr_one_terminal_carries_both_streams(Backend::RealNomad).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_runner_rescheduled_to_another_node_reports_its_new_ports() {
    let s = nomad_server().await;
    s.environment(
        23,
        1,
        json!({"networkAccess": true, "exposedPorts": [8080]}),
    )
    .await;
    let jobs = runner_jobs(&s, 23).await;
    assert_eq!(jobs.len(), 1);
    let before = allocation_of(&s, &jobs[0]).await;
    let full = nomad_get(
        &s,
        &format!("/v1/allocation/{}", before["ID"].as_str().unwrap()),
    )
    .await;
    let old_port = full["AllocatedResources"]["Shared"]["Ports"][0]["Value"].clone();
    assert!(old_port.is_u64(), "{full}");
    fault(
        &s,
        &format!("allocation/{}/lose-node", before["ID"].as_str().unwrap()),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let new_port = loop {
        let allocs = nomad_get(&s, &format!("/v1/job/{}/allocations", jobs[0])).await;
        if let Some(a) = allocs
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["ClientStatus"] == "running" && a["ID"] != before["ID"])
        {
            let full =
                nomad_get(&s, &format!("/v1/allocation/{}", a["ID"].as_str().unwrap())).await;
            break full["AllocatedResources"]["Shared"]["Ports"][0]["Value"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new allocation: {allocs}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_ne!(old_port, new_port);
    s.wait_idle(23, 1).await;
    // The event stream delivers the new allocation; the claim reports its port.
    eventually("the server took the new allocation's ports", 30, || async {
        s.log()
            .lines()
            .any(|l| l.contains("mapped ports changed") && l.contains(jobs[0].as_str()))
    })
    .await;
    let v: Value = s
        .http
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 23}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["runnerId"], jobs[0].as_str());
    let mapped = &v["mappedPorts"];
    assert!(
        mapped[0]["hostAddress"]
            .as_str()
            .is_some_and(|h| h.ends_with(&format!(":{new_port}"))),
        "{v}"
    );
    assert_eq!(mapped[0]["exposedPort"], 8080, "{mapped}");
}

/// Docker with Nomad's `bridge` network (CNI): a runner with network access serves an exposed
/// port that the client reaches at the mapped host address; the DNS setting reaches the runner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_network_access_maps_exposed_ports_through_a_bridge() {
    support::require_real_nomad("real_nomad_network_access_maps_exposed_ports_through_a_bridge");
    let s = Server::start_with(Options {
        backend: Backend::RealNomad,
        nomad_yaml: "  network:\n    mode: bridge\n    dns:\n      servers: [192.0.2.53]\n".into(),
        ..Default::default()
    })
    .await;
    s.environment(
        24,
        1,
        json!({"networkAccess": true, "exposedPorts": [8080]}),
    )
    .await;
    let v: Value = s
        .http
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 24, "inactivityTimeout": 120}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let runner = v["runnerId"].as_str().unwrap().to_string();
    let ports = v["mappedPorts"].as_array().unwrap();
    assert_eq!(ports.len(), 1, "{v}");
    assert_eq!(ports[0]["exposedPort"], 8080);
    let host = ports[0]["hostAddress"].as_str().unwrap().to_string();
    let out = s
        .run(&runner, json!({"command": "cat /etc/resolv.conf"}))
        .await;
    assert!(out.stdout.contains("192.0.2.53"), "{}", out.stdout);
    let url = s
        .execute(
            &runner,
            json!({"command": "cd /tmp && echo served > index.html && exec python3 -m http.server 8080"}),
        )
        .await;
    let _server = Ws::connect(&url).await;
    eventually(
        "the runner's port answers at its mapped address",
        60,
        || async {
            match reqwest::get(format!("http://{host}/index.html")).await {
                Ok(r) => r.text().await.unwrap_or_default().contains("served"),
                Err(_) => false,
            }
        },
    )
    .await;
}

/// `docker kill` of a claimed runner's container: the execution ends with an error, Nomad
/// restarts the task, and the runner comes back under its id, clean (its files are gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_a_killed_container_ends_the_execution_and_the_runner_comes_back_clean() {
    support::require_real_nomad(
        "real_nomad_a_killed_container_ends_the_execution_and_the_runner_comes_back_clean",
    );
    let s = Server::on(Backend::RealNomad).await;
    s.environment(25, 1, json!({})).await;
    let runner = s.claim(25, 600).await;
    s.copy(&runner, &[("work.txt", b"before the kill")]).await;
    let url = s
        .execute(&runner, json!({"command": "echo up; sleep 1000"}))
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("up").await;
    let container = s.real_nomad().unwrap().container_of(&runner).await;
    let killed = std::process::Command::new("docker")
        .args(["kill", &container])
        .output()
        .expect("docker runs");
    assert!(killed.status.success(), "{killed:?}");
    let out = ws.finish().await;
    assert_eq!(out.last["type"], "error", "{:?}", out.messages);
    // Nomad restarts the task in a new container (after the restart policy's delay).
    eventually("the runner runs commands again", 120, || async {
        let out = s.run(&runner, json!({"command": "echo again"})).await;
        out.exit() == Some(0) && out.stdout == "again\r\n"
    })
    .await;
    let r = s.download(&runner, "work.txt").await;
    assert_eq!(
        r.status(),
        424,
        "the new container has none of the old files"
    );
    settled(&s, 25, 1, 1).await;
}

/// An execution that exceeds the memory limit: the kernel kills that program (exit 137), the
/// container and the runner live on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_an_oom_kill_in_an_execution_ends_only_that_program() {
    support::require_real_nomad("real_nomad_an_oom_kill_in_an_execution_ends_only_that_program");
    let s = Server::on(Backend::RealNomad).await;
    s.environment(26, 1, json!({"memoryLimit": 64})).await;
    let runner = s.claim(26, 600).await;
    let out = s
        .run(
            &runner,
            json!({"command": "python3 -c 'x = bytearray(512 * 1024 * 1024); print(len(x))'"}),
        )
        .await;
    assert_eq!(out.exit(), Some(137), "{:?}", out.messages);
    let out = s.run(&runner, json!({"command": "echo alive"})).await;
    assert_eq!(out.stdout, "alive\r\n");
    settled(&s, 26, 1, 1).await;
}

/// The exec session that carries a runner's agent breaks (here: every connection between the
/// gateway and Nomad is cut for a few seconds, as a restarting Nomad server or client agent does):
/// the gateway reconnects to the agent, which kept the program running, and the learner gets all
/// of its output, once, and its exit code.
async fn an_execution_outlives_a_cut_connection_to_nomad(
    s: &Server,
    cut: impl std::future::Future<Output = ()>,
) {
    s.environment(23, 1, json!({})).await;
    let runner = s.claim(23, 120).await;
    let url = s
        .execute(
            &runner,
            json!({"command": "for i in $(seq 1 40); do echo line-$i; sleep 0.25; done; exit 3"}),
        )
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("line-4").await;
    cut.await;
    let out = ws.finish().await;
    let expected: String = (1..=40).map(|i| format!("line-{i}\r\n")).collect();
    assert_eq!(out.stdout, expected, "{:?}", out.messages);
    assert_eq!(out.exit(), Some(3), "{:?}", out.messages);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_outlives_a_cut_connection_to_nomad_on_the_emulator() {
    let s = nomad_server().await;
    an_execution_outlives_a_cut_connection_to_nomad(&s, fault(&s, "refuse?seconds=3")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_an_execution_outlives_a_cut_connection_to_nomad() {
    support::require_real_nomad("real_nomad_an_execution_outlives_a_cut_connection_to_nomad");
    let (gate, s) = server_behind_a_gate().await;
    an_execution_outlives_a_cut_connection_to_nomad(&s, async {
        gate.close_for(Duration::from_secs(3))
    })
    .await;
}

/// A learner who kills the runner's agent (as root in their runner) only breaks their own
/// execution: it ends with an error, and the next one runs with a fresh agent.
async fn a_learner_who_kills_the_agent_gets_a_fresh_one(s: &Server) {
    s.environment(24, 1, json!({})).await;
    let runner = s.claim(24, 120).await;
    let out = s
        .run(
            &runner,
            json!({"command": "echo bye; kill -9 $PPID; sleep 30", "privilegedExecution": true}),
        )
        .await;
    assert_eq!(out.last["type"], "error", "{:?}", out.messages);
    let out = s.run(&runner, json!({"command": "echo again"})).await;
    assert_eq!(out.stdout, "again\r\n", "{:?}", out.messages);
    assert_eq!(out.exit(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_who_kills_the_agent_gets_a_fresh_one_on_the_emulator() {
    a_learner_who_kills_the_agent_gets_a_fresh_one(&nomad_server().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Nomad: NOMAD_ADDR=http://127.0.0.1:4646 cargo test -- --ignored real_nomad"]
async fn real_nomad_a_learner_who_kills_the_agent_gets_a_fresh_one() {
    support::require_real_nomad("real_nomad_a_learner_who_kills_the_agent_gets_a_fresh_one");
    a_learner_who_kills_the_agent_gets_a_fresh_one(&Server::on(Backend::RealNomad).await).await;
}

/// `nomad.runneragent: false` (images the agent cannot run in): executions, files and time limits
/// still work, through exec sessions per operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agentless_path_runs_commands_and_files() {
    let s = Server::start_with(Options {
        backend: Backend::Nomad,
        nomad_yaml: "  runneragent: false\n".into(),
        ..Default::default()
    })
    .await;
    s.environment(25, 1, json!({})).await;
    let runner = s.claim(25, 120).await;
    s.copy(&runner, &[("in.txt", b"agentless")]).await;
    let out = s
        .run(
            &runner,
            json!({"command": "cat in.txt; echo; echo err >&2; exit 4"}),
        )
        .await;
    assert_eq!(out.stdout, "agentless\r\n");
    assert_eq!(out.stderr, "err\r\n");
    assert_eq!(out.exit(), Some(4));
    let r = s.download(&runner, "in.txt").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "agentless");
    let out = s
        .run(&runner, json!({"command": "sleep 100", "timeLimit": 1}))
        .await;
    assert_eq!(out.last, json!({"type": "timeout"}));
}

/// Runs the shell command in the environment variable `var` (a restart of a real system this
/// machine runs) and waits for it; panics when it is not set or fails.
async fn run_restart_command(var: &str) {
    let command = std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: it must name the command that restarts it (see docs/nomad.md)")
    });
    let status = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&command)
        .status()
        .await
        .unwrap();
    assert!(status.success(), "{var} ({command}) failed: {status}");
}

/// A restart of the Nomad agent (server and client) while a learner's program runs: the event
/// stream and every exec session break. Nothing is lost: the program's output arrives complete,
/// the runner keeps its files, the pool is full again without duplicates. Needs a Nomad that keeps
/// its state (`REAL_NOMAD_DEV=0 up.sh`) and, in `POSEIDON_TEST_NOMAD_RESTART`, the command that
/// restarts it and returns once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the real Nomad: NOMAD_ADDR=... POSEIDON_TEST_NOMAD_RESTART=... cargo test -- --ignored cluster_restart"]
async fn cluster_restart_of_nomad_loses_no_output_runner_or_file() {
    support::require_real_nomad("cluster_restart_of_nomad_loses_no_output_runner_or_file");
    let s = Server::on(Backend::RealNomad).await;
    s.environment(26, 2, json!({})).await;
    let runner = s.claim(26, 600).await;
    s.copy(&runner, &[("kept.txt", b"still here")]).await;
    let url = s
        .execute(
            &runner,
            json!({"command": "for i in $(seq 1 90); do echo line-$i; sleep 0.5; done; exit 6"}),
        )
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("line-3").await;
    run_restart_command("POSEIDON_TEST_NOMAD_RESTART").await;
    let out = ws.finish().await;
    let expected: String = (1..=90).map(|i| format!("line-{i}\r\n")).collect();
    assert_eq!(out.stdout, expected, "{:?}", out.messages);
    assert_eq!(out.exit(), Some(6));
    let r = s.download(&runner, "kept.txt").await;
    assert_eq!(r.text().await.unwrap(), "still here");
    settled(&s, 26, 2, 1).await;
}

/// A restart of dockerd while a learner's program runs: every container ends and Nomad starts the
/// tasks again. The learner is told (an error), keeps the runner (its files are gone), and runs
/// again; the pool is full again with clean runners, no runner lost or duplicated. Needs
/// `POSEIDON_TEST_DOCKERD_RESTART`: the command that restarts dockerd and returns once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts dockerd: NOMAD_ADDR=... POSEIDON_TEST_DOCKERD_RESTART=... cargo test -- --ignored cluster_restart"]
async fn cluster_restart_of_dockerd_ends_executions_and_keeps_runners() {
    support::require_real_nomad("cluster_restart_of_dockerd_ends_executions_and_keeps_runners");
    let s = Server::on(Backend::RealNomad).await;
    s.environment(27, 2, json!({})).await;
    let runner = s.claim(27, 600).await;
    s.copy(&runner, &[("gone.txt", b"before")]).await;
    let url = s
        .execute(&runner, json!({"command": "echo up; sleep 300"}))
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("up").await;
    run_restart_command("POSEIDON_TEST_DOCKERD_RESTART").await;
    let out = ws.finish().await;
    assert!(
        out.last["type"] == "error" || out.last == json!({"type": "exit", "data": 137}),
        "{:?}",
        out.messages
    );
    eventually("the runner runs in its new container", 180, || async {
        s.download(&runner, "gone.txt").await.status() == 424
    })
    .await;
    let out = s.run(&runner, json!({"command": "echo again"})).await;
    assert_eq!(out.stdout, "again\r\n");
    settled(&s, 27, 2, 1).await;
    let fresh = s.claim(27, 60).await;
    let list: Value = s.get_json(s.url(&format!("/runners/{fresh}/files"))).await;
    assert_eq!(list["files"], json!([]), "an idle runner is clean: {list}");
}
