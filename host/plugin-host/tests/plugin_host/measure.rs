//! Figures, not assertions: compile time per plugin and per-call latency per kind, A/B in one
//! run: "no spares" = every call makes and drops its own instance (`spareInstances: false`),
//! "spares, back to back" = the default, calls one right after the other (the keeper thread
//! making the next spare races the next call), "spares, paced" = the default, each call made
//! once its plugin's spare is ready (calls further apart than the keeper's work, as in a
//! server; the wait is not timed).
//!
//! ```sh
//! plugins/build.sh
//! cargo test --release -p poseidon-plugin-host --test plugin_host -- --ignored --nocapture measure
//! ```

use std::time::{Duration, Instant};

use poseidon_core::files::{FileCopy, FileUpdate};
use poseidon_plugin_host::{check_file, AuthRequest, Limits, PluginHost};

use crate::common::*;

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let n = samples.len();
    let mean = samples.iter().sum::<Duration>() / n as u32;
    format!(
        "mean {:>7.1} µs  p50 {:>6.1} µs  p99 {:>7.1} µs",
        mean.as_secs_f64() * 1e6,
        samples[n / 2].as_secs_f64() * 1e6,
        samples[n * 99 / 100].as_secs_f64() * 1e6,
    )
}

/// A request as CodeOcean with a JWT sends it: `authorization` = "Bearer …".
fn bearer(authorization: impl Into<String>) -> AuthRequest {
    AuthRequest {
        method: "GET".into(),
        path: "/api/v1/runners".into(),
        headers: vec![("authorization".into(), authorization.into())],
        peer_address: Some("127.0.0.1:1".into()),
        poseidon_token: None,
    }
}

/// Configuration entries of 50 tenants `t0`…`t49`: `SECRET.tN` = "the SECRET of tenant N"
/// and each tenant's environments.
fn fifty_tenants(secret: &str) -> Vec<(String, String)> {
    (0..50)
        .flat_map(|i| {
            [
                (
                    format!("{secret}.t{i}"),
                    format!("the {secret} of tenant {i}"),
                ),
                (format!("environments.t{i}"), "10, 11, 12".to_string()),
            ]
        })
        .collect()
}

/// `entries` as the pairs of `&str` that [`entry`] takes.
fn borrowed(entries: &[(String, String)]) -> Vec<(&str, &str)> {
    entries
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// A JWT of `tenant` signed with `key`, valid for an hour.
fn valid_token(tenant: &str, key: &[u8]) -> String {
    sign(
        &format!(r#"{{"iss":"{tenant}","exp":{}}}"#, unix_now() + 3600),
        key,
    )
}

/// Whether `host` accepts the JWT `token`.
async fn accepts(host: PluginHost, token: &str) -> bool {
    let request = bearer(format!("Bearer {token}"));
    host.authenticate(&request).await.is_ok()
}

/// Whether `host` accepts `Poseidon-Token: token`.
async fn accepts_poseidon_token(host: PluginHost, token: &str) -> bool {
    let request = AuthRequest {
        method: "GET".into(),
        path: "/api/v1/runners".into(),
        poseidon_token: Some(token.into()),
        ..AuthRequest::default()
    };
    host.authenticate(&request).await.is_ok()
}

/// `n` timed calls of `f` after a warm-up; with `pace`, each call only once plugin
/// `pace.1` of host `pace.0` has its spare instance ready (the wait is not timed).
async fn time<F, Fut>(n: usize, pace: Option<(&PluginHost, &str)>, mut f: F) -> String
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
        if let Some((host, name)) = pace {
            // Spinning keeps this core awake (a sleep would let it idle, and a call after
            // an idle core is slower for reasons of its own); the keeper has the other.
            let deadline = Instant::now() + Duration::from_secs(10);
            while status(host, name).spare_ready != Some(true) {
                assert!(Instant::now() < deadline, "no spare for {name} within 10 s");
                std::hint::spin_loop();
            }
        }
        let t = Instant::now();
        assert!(f().await);
        samples.push(t.elapsed());
    }
    summary(samples)
}

/// Every kind under `limits`: (row name, figures).
async fn per_kind(limits: Limits, paced: bool, n: usize) -> Vec<(&'static str, String)> {
    let dir = temp_dir("measure");
    install(&dir, "demand_sizer", "demand.wasm");
    install(&dir, "submission_guard", "guard.wasm");
    install(&dir, "jwt_auth", "jwt.wasm");
    let mut cfg = config(
        &dir,
        vec![
            entry("demand.wasm", None, &[("headroom", "2")]),
            entry(
                "guard.wasm",
                None,
                &[
                    ("maxFiles", "10"),
                    ("env.X", "1"),
                    ("forbiddenPaths", "**/*.so"),
                ],
            ),
            entry("jwt.wasm", None, &[("key.t", "k")]),
        ],
    );
    cfg.limits = limits.clone();
    let host = PluginHost::start(cfg).await.unwrap();
    // WIT 0.2 plugins in a second host: the token authenticator and a local-time sizer.
    let dir2 = temp_dir("measure-v2");
    install(&dir2, "token_tenants", "tokens.wasm");
    install(&dir2, "test_v2_sizer", "local.wasm");
    let mut local = entry("local.wasm", None, &[]);
    local.time_zone = Some("Europe/Berlin".into());
    let mut cfg2 = config(
        &dir2,
        vec![entry("tokens.wasm", None, &[("token.t", "secret")]), local],
    );
    cfg2.limits = limits.clone();
    let host2 = PluginHost::start(cfg2).await.unwrap();
    // Each authenticator as a shared server has it (in a host of its own: a host asks all its
    // authenticators): 50 tenants, each with a key (jwt_auth) or a Poseidon-Token
    // (token_tenants), and its environments.
    let shared = |file: &'static str, name: &'static str, secret: &'static str| {
        let dir = temp_dir("measure-tenants");
        install(&dir, name, file);
        let mut cfg = config(
            &dir,
            vec![entry(file, None, &borrowed(&fifty_tenants(secret)))],
        );
        cfg.limits = limits.clone();
        PluginHost::start(cfg)
    };
    let host3 = shared("jwt.wasm", "jwt_auth", "key").await.unwrap();
    let host4 = shared("tokens.wasm", "token_tenants", "token")
        .await
        .unwrap();

    let sizer = time(n, paced.then_some((&host, "demand")), || {
        let host = host.clone();
        async move { host.pool_size(sizer_input(1, 3)).await.is_some() }
    })
    .await;
    let execute = time(n, paced.then_some((&host, "guard")), || {
        let host = host.clone();
        async move {
            host.preprocess_execute(1, None, execution("python main.py"))
                .await
                .is_ok()
        }
    })
    .await;
    let files = time(n, paced.then_some((&host, "guard")), || {
        let host = host.clone();
        async move {
            host.preprocess_files(
                1,
                None,
                FileUpdate {
                    copy: vec![FileCopy {
                        path: "main.py".into(),
                        content: vec![b'x'; 4096],
                    }],
                    delete: vec![],
                },
            )
            .await
            .is_ok()
        }
    })
    .await;
    let auth = time(n, paced.then_some((&host, "jwt")), || {
        let host = host.clone();
        async move {
            host.authenticate(&bearer("Bearer a.b.c"))
                .await
                .is_err_and(|d| d.status == 401)
        }
    })
    .await;
    // As a server sees it: a valid token of a configured tenant (HMAC checked, claims read).
    let token = valid_token("t", b"k");
    let accepted = time(n, paced.then_some((&host, "jwt")), || {
        accepts(host.clone(), &token)
    })
    .await;
    let token49 = valid_token("t49", b"the key of tenant 49");
    let tenants = time(n, paced.then_some((&host3, "jwt")), || {
        accepts(host3.clone(), &token49)
    })
    .await;
    let sizer2 = time(n, paced.then_some((&host2, "local")), || {
        let host = host2.clone();
        async move { host.pool_size(sizer_input(1, 3)).await.is_some() }
    })
    .await;
    let tokens = time(n, paced.then_some((&host2, "tokens")), || {
        accepts_poseidon_token(host2.clone(), "secret")
    })
    .await;
    let tokens50 = time(n, paced.then_some((&host4, "tokens")), || {
        accepts_poseidon_token(host4.clone(), "the token of tenant 49")
    })
    .await;
    vec![
        ("pool-sizer 0.1 (demand_sizer)", sizer),
        ("preprocess-execute 0.1 (submission_guard)", execute),
        ("preprocess-files 0.1 (one 4 KiB file)", files),
        ("authenticate 0.1 (jwt_auth, refusal)", auth),
        ("authenticate 0.1 (jwt_auth, accepted)", accepted),
        ("authenticate 0.1 (jwt_auth, 50 tenants)", tenants),
        ("pool-sizer 0.2 (local time, Europe/Berlin)", sizer2),
        ("authenticate 0.2 (token_tenants, accepted)", tokens),
        ("authenticate 0.2 (token_tenants, 50 tenants)", tokens50),
    ]
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
        "token_tenants",
        "audit_observer",
    ] {
        let d = check_file(&plugin(name)).unwrap();
        println!("  {name:<18} {:>7} bytes  {:>5} ms", d.size, d.compile_ms);
    }
    let n = 2000;
    let without = Limits {
        spare_instances: false,
        ..relaxed_limits()
    };
    // Alternate the variants twice, so a change in the machine's load shows as a
    // difference between the two rounds of the same variant.
    for round in 1..=2 {
        for (variant, limits, paced) in [
            ("no spares", without.clone(), false),
            ("spares, back to back", relaxed_limits(), false),
            ("spares, paced", relaxed_limits(), true),
        ] {
            println!("round {round}, {variant} (n={n} per kind, fresh instance per call):");
            for (row, figures) in per_kind(limits, paced, n).await {
                println!("  {row:<44} {figures}");
            }
        }
    }
}
