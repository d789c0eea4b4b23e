//! Speed of the Nomad backend on a real cluster (prints figures, asserts nothing about time):
//! pool fill time for 20 runners, claim latency, and execution latency in a claimed runner (through
//! the runner agent, and on the agentless path) next to a bare `docker exec` into the same runner's
//! container, measured in the same run.
//!
//! ```sh
//! NOMAD_ADDR=http://127.0.0.1:4646 cargo test -p poseidon --test nomad_speed -- --ignored --nocapture
//! ```

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Backend, Server, Ws};

/// Runners in the pool whose fill time is measured.
const POOL: u32 = 20;
/// Claims measured.
const CLAIMS: usize = 20;
/// Executions measured (and as many bare `docker exec`s).
const EXECUTIONS: usize = 20;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i.min(samples.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn row(what: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.5);
    let p90 = percentile(samples, 0.9);
    println!(
        "| {what} | {} | {} | {} | {} |",
        samples.len(),
        ms(p50),
        ms(p90),
        ms(*samples.iter().max().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; needs a real Nomad with Docker: NOMAD_ADDR=... cargo test -- --ignored --nocapture"]
async fn speed_on_a_nomad_cluster() {
    support::require_real_nomad("speed_on_a_nomad_cluster");
    let s = Server::on(Backend::RealNomad).await;
    let version: Value = s
        .real_nomad()
        .unwrap()
        .request(reqwest::Method::GET, "/v1/agent/self")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    println!(
        "Nomad {}{} ({} driver)",
        version["config"]["Version"]["Version"]
            .as_str()
            .unwrap_or("?"),
        version["config"]["Version"]["VersionPrerelease"]
            .as_str()
            .map(|p| format!("-{p}"))
            .unwrap_or_default(),
        s.real_nomad().unwrap().driver
    );
    println!("| measurement | n | p50 | p90 | max |\n|---|---|---|---|---|");

    let started = Instant::now();
    s.environment(31, POOL, json!({"cpuLimit": 20, "memoryLimit": 64}))
        .await;
    println!(
        "| pool fill: {POOL} idle runners after PUT | 1 | {} | | |",
        ms(started.elapsed())
    );

    let mut claims = Vec::new();
    let mut runners = Vec::new();
    for _ in 0..CLAIMS {
        let t = Instant::now();
        let r = s
            .http
            .post(s.url("/runners"))
            .json(&json!({"executionEnvironmentId": 31, "inactivityTimeout": 300}))
            .send()
            .await
            .unwrap();
        claims.push(t.elapsed());
        assert_eq!(r.status(), 200);
        runners.push(
            r.json::<Value>().await.unwrap()["runnerId"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    row("claim (POST /runners)", &mut claims);

    let runner = &runners[0];
    let container = s.real_nomad().unwrap().container_of(runner).await;
    let mut gateway = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..EXECUTIONS {
        let t = Instant::now();
        let url = s.execute(runner, json!({"command": "echo hi"})).await;
        let out = Ws::connect(&url).await.finish().await;
        gateway.push(t.elapsed());
        assert_eq!(out.stdout, "hi\r\n");
        bare.push(bare_docker_exec(&container).await);
    }
    row(
        "execution `echo hi` through the runner agent (POST execute + WebSocket to exit)",
        &mut gateway,
    );
    row("bare `docker exec -t` of the same command", &mut bare);
    println!(
        "ratio p50 gateway / bare docker exec: {:.2}",
        percentile(&mut gateway, 0.5).as_secs_f64() / percentile(&mut bare, 0.5).as_secs_f64()
    );
    for runner in &runners {
        let _ = s
            .http
            .delete(s.url(&format!("/runners/{runner}")))
            .send()
            .await;
    }
    drop(s);

    // `nomad.runneragent: false`: exec sessions per execution (two with a terminal), as Poseidon.
    let agentless = Server::start_with(support::Options {
        backend: Backend::RealNomad,
        nomad_yaml: "  runneragent: false\n".into(),
        ..Default::default()
    })
    .await;
    agentless
        .environment(32, 1, json!({"cpuLimit": 20, "memoryLimit": 64}))
        .await;
    let runner = agentless.claim(32, 300).await;
    let container = agentless.real_nomad().unwrap().container_of(&runner).await;
    let (mut sessions, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..EXECUTIONS {
        let t = Instant::now();
        let url = agentless
            .execute(&runner, json!({"command": "echo hi"}))
            .await;
        let out = Ws::connect(&url).await.finish().await;
        sessions.push(t.elapsed());
        assert_eq!(out.stdout, "hi\r\n");
        bare.push(bare_docker_exec(&container).await);
    }
    row(
        "execution `echo hi`, `runneragent: false` (exec sessions per execution)",
        &mut sessions,
    );
    row("bare `docker exec -t` of the same command", &mut bare);
    println!(
        "ratio p50 gateway (agentless) / bare docker exec: {:.2}",
        percentile(&mut sessions, 0.5).as_secs_f64() / percentile(&mut bare, 0.5).as_secs_f64()
    );
}

/// Runs `echo hi` as the image's user with `docker exec -t`; returns how long it took.
async fn bare_docker_exec(container: &str) -> Duration {
    let t = Instant::now();
    let o = tokio::process::Command::new("docker")
        .args([
            "exec",
            "-t",
            container,
            "/sbin/setuser",
            "user",
            "bash",
            "-c",
            "echo hi",
        ])
        .output()
        .await
        .expect("docker runs");
    let took = t.elapsed();
    assert!(o.status.success(), "{o:?}");
    took
}
