//! Figures, not assertions: compile time per plugin and per-call latency per kind.
//!
//! ```sh
//! plugins/build.sh
//! cargo test -p poseidon-plugin-host --test plugin_host -- --ignored --nocapture measure
//! ```

use std::time::{Duration, Instant};

use poseidon_plugin_host::{
    check_file, AuthInput, ExecuteInput, FileEntry, FilesInput, PluginHost,
};

use crate::common::*;

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let n = samples.len();
    let mean = samples.iter().sum::<Duration>() / n as u32;
    format!(
        "mean {:>7.1} µs  p50 {:>7.1} µs  p99 {:>7.1} µs  (n={n})",
        mean.as_secs_f64() * 1e6,
        samples[n / 2].as_secs_f64() * 1e6,
        samples[n * 99 / 100].as_secs_f64() * 1e6,
    )
}

async fn time<F, Fut>(n: usize, mut f: F) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    // Warm-up.
    for _ in 0..20 {
        assert!(f().await);
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        assert!(f().await);
        samples.push(t.elapsed());
    }
    summary(samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run explicitly"]
async fn measure() {
    println!("compile (check_file, no pooling):");
    for name in [
        "demand_sizer",
        "timetable_sizer",
        "submission_guard",
        "jwt_auth",
    ] {
        let d = check_file(&plugin(name)).unwrap();
        println!("  {name:<18} {:>7} bytes  {:>5} ms", d.size, d.compile_ms);
    }

    let dir = temp_dir("measure");
    install(&dir, "demand_sizer", "demand.wasm");
    install(&dir, "submission_guard", "guard.wasm");
    install(&dir, "jwt_auth", "jwt.wasm");
    let cfg = config(
        &dir,
        vec![
            entry("demand.wasm", None, &[("headroom", "2")]),
            entry(
                "guard.wasm",
                None,
                &[("maxFiles", "10"), ("env.X", "1"), ("forbiddenPaths", "**/*.so")],
            ),
            entry("jwt.wasm", None, &[("key.t", "k")]),
        ],
    );
    let started = Instant::now();
    let host = PluginHost::start(cfg).await.unwrap();
    println!(
        "start with 3 plugins (compile + pre-instantiate): {} ms",
        started.elapsed().as_millis()
    );

    let n = 500;
    let sizer = time(n, || {
        let host = host.clone();
        async move { host.pool_size(sizer_input(1, 3)).await.is_some() }
    })
    .await;
    let execute = time(n, || {
        let host = host.clone();
        async move {
            host.preprocess_execute(ExecuteInput {
                command: "python main.py".into(),
                environment_id: 1,
                ..ExecuteInput::default()
            })
            .await
            .is_ok()
        }
    })
    .await;
    let files = time(n, || {
        let host = host.clone();
        async move {
            host.preprocess_files(FilesInput {
                copy: vec![FileEntry {
                    path: "main.py".into(),
                    content: vec![b'x'; 4096],
                }],
                environment_id: 1,
                ..FilesInput::default()
            })
            .await
            .is_ok()
        }
    })
    .await;
    let auth = time(n, || {
        let host = host.clone();
        async move {
            host.authenticate(AuthInput {
                method: "GET".into(),
                path: "/api/v1/runners".into(),
                headers: vec![("authorization".into(), "Bearer a.b.c".into())],
                peer_address: "127.0.0.1:1".into(),
                poseidon_token: None,
            })
            .await
            .is_err_and(|d| d.status == 401)
        }
    })
    .await;
    // WIT 0.2 plugins in a second host: the token authenticator and a local-time sizer.
    let dir2 = temp_dir("measure-v2");
    install(&dir2, "token_tenants", "tokens.wasm");
    install(&dir2, "test_v2_sizer", "local.wasm");
    let mut local = entry("local.wasm", None, &[]);
    local.time_zone = Some("Europe/Berlin".into());
    let host2 = PluginHost::start(config(
        &dir2,
        vec![entry("tokens.wasm", None, &[("token.t", "secret")]), local],
    ))
    .await
    .unwrap();
    let sizer2 = time(n, || {
        let host = host2.clone();
        async move { host.pool_size(sizer_input(1, 3)).await.is_some() }
    })
    .await;
    let tokens = time(n, || {
        let host = host2.clone();
        async move {
            host.authenticate(AuthInput {
                method: "GET".into(),
                path: "/api/v1/runners".into(),
                headers: vec![],
                peer_address: "127.0.0.1:1".into(),
                poseidon_token: Some("secret".into()),
            })
            .await
            .is_ok()
        }
    })
    .await;
    println!("per call (fresh instance each, pooling allocator):");
    println!("  pool-sizer        {sizer}");
    println!("  preprocess-exec   {execute}");
    println!("  preprocess-files  {files} (one 4 KiB file)");
    println!("  authenticate      {auth}");
    println!("  pool-sizer 0.2    {sizer2} (local time, Europe/Berlin)");
    println!("  authenticate 0.2  {tokens} (token_tenants, accepted)");
}
