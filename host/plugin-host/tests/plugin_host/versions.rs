//! WIT 0.1 and 0.2 side by side: a plugin of each version and kind in one host, what
//! only 0.2 plugins see (the `Poseidon-Token`, local time), and the observer kind.

use std::time::Duration;

use poseidon_plugin_host::{
    check_file, AuthRequest, ExecutionOutcome, LifecycleEvent, LifecycleKind, PluginHost,
    PluginKind,
};

use crate::common::*;

fn event(runner: &str, kind: LifecycleKind) -> LifecycleEvent {
    LifecycleEvent {
        at_ms: 1_700_000_000_000,
        runner_id: runner.into(),
        environment_id: 1,
        tenant: Some("hpi".into()),
        kind,
    }
}

fn auth(token: Option<&str>, bearer: Option<&str>) -> AuthRequest {
    AuthRequest {
        method: "POST".into(),
        path: "/api/v1/runners".into(),
        headers: bearer
            .map(|b| vec![("authorization".to_string(), format!("Bearer {b}"))])
            .unwrap_or_default(),
        peer_address: Some("127.0.0.1:5000".into()),
        poseidon_token: token.map(str::to_string),
    }
}

/// Polls `f` until it holds, for at most 30 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn check_file_reports_the_version_of_each_new_plugin() {
    for (name, kind) in [
        ("token_tenants", PluginKind::Authenticator),
        ("audit_observer", PluginKind::Observer),
        ("test_v2_sizer", PluginKind::PoolSizer),
        ("test_v2_preprocessor", PluginKind::Preprocessor),
    ] {
        let d = check_file(&plugin(name)).unwrap();
        assert_eq!((d.kind, d.wit_version.as_str()), (kind, "0.2.0"), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizers_and_preprocessors_of_both_versions_serve_side_by_side() {
    let dir = temp_dir("versions-kinds");
    install(&dir, "demand_sizer", "demand.wasm");
    install(&dir, "test_v2_sizer", "local.wasm");
    install(&dir, "submission_guard", "guard.wasm");
    install(&dir, "test_v2_preprocessor", "v2pre.wasm");
    let mut demand = entry("demand.wasm", None, &[("headroom", "4")]);
    demand.environments = Some(vec![1]);
    let mut local = entry("local.wasm", None, &[]);
    local.environments = Some(vec![2]);
    local.time_zone = Some("Asia/Kolkata".into());
    let guard = entry("guard.wasm", None, &[("env.CHECKED", "0.1")]);
    let v2pre = entry("v2pre.wasm", None, &[]);
    let host = PluginHost::start(config(&dir, vec![demand, local, guard, v2pre]))
        .await
        .unwrap();
    let versions: Vec<_> = host
        .status()
        .into_iter()
        .map(|s| (s.name, s.wit_version.unwrap_or_default()))
        .collect();
    assert_eq!(
        versions,
        [
            ("demand".to_string(), "0.1.0".to_string()),
            ("local".to_string(), "0.2.0".to_string()),
            ("guard".to_string(), "0.1.0".to_string()),
            ("v2pre".to_string(), "0.2.0".to_string()),
        ]
    );
    // 0.1 sizer: its answer as before.
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(4));
    // 0.2 sizer: the local time it got is consistent with `now` and in India (UTC+5:30).
    assert_eq!(host.pool_size(sizer_input(2, 0)).await, Some(330));
    // The chain runs a 0.1 and a 0.2 preprocessor in turn.
    let out = host
        .preprocess_execute(1, None, execution("make"))
        .await
        .unwrap();
    assert_eq!(
        out.environment,
        [
            ("CHECKED".to_string(), "0.1".to_string()),
            ("WIT_VERSION".to_string(), "0.2".to_string()),
            ("CALLS_IN_INSTANCE".to_string(), "1".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_time_follows_daylight_saving_time() {
    let dir = temp_dir("versions-dst");
    install(&dir, "test_v2_sizer", "local.wasm");
    let mut local = entry("local.wasm", None, &[]);
    local.time_zone = Some("Europe/Berlin".into());
    let host = PluginHost::start(config(&dir, vec![local])).await.unwrap();
    let mut winter = sizer_input(1, 0);
    winter.pool.now = 1_704_702_600; // 2024-01-08: CET
    let mut summer = sizer_input(1, 0);
    summer.pool.now = 1_720_427_400; // 2024-07-08: CEST
    assert_eq!(host.pool_size(winter).await, Some(60));
    assert_eq!(host.pool_size(summer).await, Some(120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_time_zone_is_a_configuration_error() {
    let dir = temp_dir("versions-tz");
    let mut local = entry("local.wasm", None, &[]);
    local.time_zone = Some("Mars/Olympus".into());
    let e = PluginHost::start(config(&dir, vec![local]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("timeZone \"Mars/Olympus\""), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_0_2_authenticator_sees_the_poseidon_token() {
    let dir = temp_dir("versions-auth");
    install(&dir, "token_tenants", "tokens.wasm");
    install(&dir, "jwt_auth", "jwt.wasm");
    let tokens = entry(
        "tokens.wasm",
        None,
        &[
            ("token.hpi", "secret-hpi"),
            ("token.tum", "secret-tum"),
            ("environments.hpi", "10,11"),
        ],
    );
    // Both load into one host; the first authenticator answers.
    let host = PluginHost::start(config(
        &dir,
        vec![tokens, entry("jwt.wasm", None, &[("key.hpi", "k")])],
    ))
    .await
    .unwrap();
    assert!(
        host.status().iter().all(|s| s.loaded),
        "{:?}",
        host.status()
    );
    let p = host
        .authenticate(&auth(Some("secret-hpi"), None))
        .await
        .unwrap();
    assert_eq!(
        (p.tenant.as_str(), p.environments),
        ("hpi", Some(vec![10, 11]))
    );
    let p = host
        .authenticate(&auth(Some("secret-tum"), None))
        .await
        .unwrap();
    assert_eq!((p.tenant.as_str(), p.environments), ("tum", None));
    let d = host
        .authenticate(&auth(Some("guess"), None))
        .await
        .unwrap_err();
    assert_eq!(
        (d.status, d.message.as_str()),
        (401, "unknown Poseidon-Token")
    );

    // A 0.1 authenticator is served through the adapter: no token, but it works as before.
    let dir = temp_dir("versions-auth-01");
    install(&dir, "jwt_auth", "jwt.wasm");
    let host = PluginHost::start(config(
        &dir,
        vec![entry("jwt.wasm", None, &[("key.hpi", "k")])],
    ))
    .await
    .unwrap();
    let d = host
        .authenticate(&auth(Some("secret-hpi"), None))
        .await
        .unwrap_err();
    assert_eq!(d.status, 401, "{d:?}");
    assert_eq!(status(&host, "jwt").failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_receive_events_and_failures_are_counted() {
    let dir = temp_dir("versions-observe");
    install(&dir, "audit_observer", "audit.wasm");
    install(&dir, "test_observer", "picky.wasm");
    let mut cfg = config(
        &dir,
        vec![
            entry("audit.wasm", None, &[]),
            entry("picky.wasm", None, &[("trapOnRunner", "bad")]),
        ],
    );
    // Calls in place once proved short: the trap below then happens on an async worker,
    // where the guest's panic message on stderr cannot be written (wasmtime-wasi blocks on
    // tokio); the host must still report the guest's own trap.
    cfg.limits.in_place_budget_us = 10_000_000;
    let host = PluginHost::start(cfg).await.unwrap();
    assert!(host.has_observer());
    host.observe(event("r1", LifecycleKind::Claimed));
    host.observe(event(
        "r1",
        LifecycleKind::ExecutionEnded {
            outcome: ExecutionOutcome::Exited,
            exit_code: Some(0),
            duration_ms: 12,
        },
    ));
    eventually("two events delivered to both observers", || {
        host.observer_stats().delivered == 4
    })
    .await;
    assert_eq!(status(&host, "picky").failures, 0);
    // The picky observer traps on the batch with runner "bad": counted, nothing else.
    host.observe(event("bad", LifecycleKind::Destroyed));
    eventually("the trap is counted", || {
        status(&host, "picky").failures == 1
    })
    .await;
    let error = status(&host, "picky").last_error.unwrap();
    assert!(error.contains("test-observer saw runner bad"), "{error}");
    // That version's calls now run off the executor; the other observer's stay in place.
    assert_eq!(status(&host, "picky").in_place, Some(false));
    assert_eq!(status(&host, "audit").in_place, Some(true));
    assert_eq!(status(&host, "audit").failures, 0);
    assert_eq!(host.observer_stats().dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_observer_never_blocks_and_a_full_queue_drops_events() {
    let dir = temp_dir("versions-trap");
    install(&dir, "test_observer", "trap.wasm");
    install(&dir, "demand_sizer", "demand.wasm");
    let mut cfg = config(
        &dir,
        vec![
            entry("trap.wasm", None, &[("trapAlways", "true")]),
            entry("demand.wasm", None, &[("headroom", "3")]),
        ],
    );
    cfg.observer_queue = 8;
    cfg.observer_batch = 2;
    let host = PluginHost::start(cfg).await.unwrap();
    // A burst far larger than the queue: `observe` returns at once every time, and what
    // does not fit is dropped and counted.
    for i in 0..1000 {
        host.observe(event(&format!("r{i}"), LifecycleKind::Claimed));
    }
    let stats = host.observer_stats();
    assert_eq!(stats.queued + stats.dropped, 1000);
    assert!(stats.dropped > 0, "{stats:?}");
    // Every delivered batch traps and is counted as a failure; other plugins keep working.
    eventually("the queued events were all attempted", || {
        let st = status(&host, "trap");
        st.calls > 0
            && st.calls == st.failures
            && host.observer_stats().delivered == 0
            && st.calls as u64 * 2 >= host.observer_stats().queued
    })
    .await;
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(3));
}
