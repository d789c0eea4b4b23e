//! Misbehaving plugins: endless loops, endless allocation, traps, corrupt and
//! incompatible files. The host must report the error and keep working.

use poseidon_core::execution::ExecutionRequest;
use poseidon_plugin_host::{AuthRequest, PluginHost, PluginKind};

use crate::common::*;

/// `test_loop` as the sizer of environment 1 (it never answers) and `demand_sizer` (headroom 4)
/// as the sizer of environment 2, in a fresh plugin directory.
fn looping_and_demand(name: &str) -> poseidon_plugin_host::PluginsConfig {
    let dir = temp_dir(name);
    install(&dir, "test_loop", "loop.wasm");
    install(&dir, "demand_sizer", "demand.wasm");
    let mut looping = entry("loop.wasm", None, &[]);
    looping.environments = Some(vec![1]);
    let mut demand = entry("demand.wasm", None, &[("headroom", "4")]);
    demand.environments = Some(vec![2]);
    config(&dir, vec![looping, demand])
}

/// [`looping_and_demand`] with one slot per plugin and calls that only `timeout_ms` stops
/// (the epoch deadline alone would allow 60 s).
fn looping_and_demand_one_slot(name: &str, timeout_ms: u64) -> poseidon_plugin_host::PluginsConfig {
    let mut cfg = looping_and_demand(name);
    cfg.limits.epoch_deadline_ticks = 6_000;
    cfg.limits.call_timeout_ms = timeout_ms;
    cfg.limits.max_concurrent_calls = 1;
    cfg
}

fn exec_request() -> ExecutionRequest {
    execution("make run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_loop_hits_the_epoch_deadline_and_others_keep_working() {
    let mut cfg = looping_and_demand("loop");
    cfg.limits.epoch_deadline_ticks = 5;
    let host = PluginHost::start(cfg).await.unwrap();

    assert_eq!(host.pool_size(sizer_input(1, 1)).await, None);
    let st = status(&host, "loop");
    assert_eq!((st.calls, st.failures), (1, 1));
    let error = st.last_error.unwrap();
    assert!(error.contains("exceeded its run time of 50 ms"), "{error}");
    // The host keeps serving: the same plugin fails the same way, others work.
    assert_eq!(host.pool_size(sizer_input(1, 1)).await, None);
    assert_eq!(host.pool_size(sizer_input(2, 0)).await, Some(4));
    assert!(status(&host, "loop").loaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_timeout_answers_at_once_and_stops_the_guest() {
    // The call timeout is what fires. One slot per plugin: the looping plugin's next call
    // can only run once the cancelled guest has really stopped.
    let cfg = looping_and_demand_one_slot("timeout", 200);
    let host = PluginHost::start(cfg).await.unwrap();

    assert_eq!(host.pool_size(sizer_input(1, 1)).await, None);
    let error = status(&host, "loop").last_error.unwrap();
    assert!(error.contains("timed out after 200 ms"), "{error}");
    // The cancelled guest gives its slot back at its next epoch check, long before
    // its 60 s run time would end; then the same plugin answers an environment whose
    // image is `quick` at once. Retry within 30 s (each try may itself time out on a
    // very busy machine).
    let mut quick = sizer_input(1, 1);
    quick.environment.image = "quick".into();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut answer = None;
    while answer.is_none() && tokio::time::Instant::now() < deadline {
        answer = host.pool_size(quick.clone()).await;
    }
    assert_eq!(answer, Some(1), "the looping guest was not stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_looping_plugin_does_not_hold_up_another_plugins_calls() {
    // Each looping call holds its plugin's one slot until its 2 s timeout.
    let cfg = looping_and_demand_one_slot("saturated", 2_000);
    let host = PluginHost::start(cfg).await.unwrap();
    let looping: Vec<_> = (0..3)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move { host.pool_size(sizer_input(1, 1)).await })
        })
        .collect();
    // Every looping call has started: one holds the looping plugin's slot, two wait for it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while status(&host, "loop").calls < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the looping calls did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The demand sizer has a slot of its own.
    assert_eq!(host.pool_size(sizer_input(2, 0)).await, Some(4));
    for call in looping {
        assert_eq!(call.await.unwrap(), None);
    }
    let (demand, looping) = (status(&host, "demand"), status(&host, "loop"));
    assert_eq!((demand.calls, demand.failures), (1, 0), "{demand:?}");
    assert_eq!(looping.failures, 3, "{looping:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_stops_an_endless_loop_deterministically() {
    let dir = temp_dir("fuel");
    install(&dir, "test_loop", "loop.wasm");
    let mut cfg = config(&dir, vec![entry("loop.wasm", None, &[])]);
    cfg.limits.fuel = Some(1_000_000);
    let host = PluginHost::start(cfg).await.unwrap();
    assert_eq!(host.pool_size(sizer_input(1, 1)).await, None);
    let error = status(&host, "loop").last_error.unwrap();
    assert!(error.contains("ran out of fuel (1000000 units)"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_allocation_hits_the_memory_limit() {
    let dir = temp_dir("alloc");
    install(&dir, "test_alloc", "hog.wasm");
    let mut cfg = config(
        &dir,
        vec![entry("hog.wasm", Some(PluginKind::Preprocessor), &[])],
    );
    cfg.limits.memory_mb = 16;
    let host = PluginHost::start(cfg).await.unwrap();

    let rejection = host
        .preprocess_execute(1, None, exec_request())
        .await
        .unwrap_err();
    assert_eq!(rejection.plugin, "hog");
    assert!(
        rejection
            .message
            .contains("exceeded the memory limit of 16 MiB"),
        "{rejection:?}"
    );
    assert!(
        rejection
            .message
            .starts_with("request could not be checked"),
        "{rejection:?}"
    );
    let st = status(&host, "hog");
    assert_eq!((st.calls, st.failures), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_lets_requests_pass_a_failing_preprocessor() {
    let dir = temp_dir("failopen");
    install(&dir, "test_alloc", "hog.wasm");
    install(&dir, "submission_guard", "guard.wasm");
    let mut hog = entry("hog.wasm", None, &[]);
    hog.fail_open = true;
    let guard = entry("guard.wasm", None, &[("env.CHECKED", "yes")]);
    let mut cfg = config(&dir, vec![hog, guard]);
    cfg.limits.memory_mb = 16;
    let host = PluginHost::start(cfg).await.unwrap();

    // The hog fails (fail open), the guard after it in the chain still runs.
    let out = host
        .preprocess_execute(1, None, exec_request())
        .await
        .unwrap();
    assert_eq!(
        out.environment,
        vec![("CHECKED".to_string(), "yes".to_string())]
    );
    assert_eq!(status(&host, "hog").failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_authenticator_denies_with_503() {
    let dir = temp_dir("trap");
    install(&dir, "test_trap", "trap.wasm");
    let cfg = config(&dir, vec![entry("trap.wasm", None, &[])]);
    let host = PluginHost::start(cfg).await.unwrap();
    assert!(host.has_authenticator());

    let denial = host
        .authenticate(&AuthRequest {
            method: "GET".into(),
            path: "/api/v1/runners".into(),
            ..AuthRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denial.status, 503);
    assert!(
        denial.message.contains("authentication unavailable"),
        "{denial:?}"
    );
    // The guest's panic message (from its stderr) is part of the error.
    assert!(
        denial
            .message
            .contains("test-trap: refusing to work on /api/v1/runners"),
        "{denial:?}"
    );
    // Fresh instance per call: the next call works.
    let ok = host
        .authenticate(&AuthRequest {
            path: "/ok".into(),
            ..AuthRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(ok.tenant, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_file_is_reported_and_not_loaded() {
    let dir = temp_dir("corrupt");
    install_bytes(
        &dir,
        b"\0asm\x0d\0\x01\0 definitely not a component",
        "bad.wasm",
    );
    // Not WebAssembly at all.
    install_bytes(&dir, b"\xc1\x8c\x10\x6b random bytes", "noise.wasm");
    install(&dir, "demand_sizer", "demand.wasm");
    let mut bad = entry("bad.wasm", Some(PluginKind::PoolSizer), &[]);
    bad.environments = Some(vec![1]);
    let mut noise = entry("noise.wasm", Some(PluginKind::PoolSizer), &[]);
    noise.environments = Some(vec![1]);
    let cfg = config(&dir, vec![bad, noise, entry("demand.wasm", None, &[])]);
    let host = PluginHost::start(cfg).await.unwrap();
    // One line, fit for a log line and `lastError`.
    let error = status(&host, "noise").last_error.unwrap();
    assert!(
        error.ends_with(
            "noise.wasm: not a valid WebAssembly component: it does not start with the WebAssembly magic bytes \\0asm"
        ),
        "{error}"
    );

    let st = status(&host, "bad");
    assert!(!st.loaded);
    let error = st.last_error.unwrap();
    assert!(
        error.contains("not a valid WebAssembly component"),
        "{error}"
    );
    // Environment 1 is the broken sizer's: fallback. Others use the demand sizer.
    assert_eq!(host.pool_size(sizer_input(1, 1)).await, None);
    assert_eq!(
        status(&host, "bad").last_error.unwrap(),
        "call plugin is not loaded"
    );
    assert_eq!(host.pool_size(sizer_input(2, 0)).await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_version_and_wrong_kind_are_refused() {
    let dir = temp_dir("incompatible");
    install(&dir, "test_incompatible", "future.wasm");
    install(&dir, "demand_sizer", "sizer.wasm");
    install(&dir, "jwt_auth", "auth.wasm");
    let cfg = config(
        &dir,
        vec![
            entry("future.wasm", None, &[]),
            entry("sizer.wasm", Some(PluginKind::Preprocessor), &[]),
            entry("auth.wasm", Some(PluginKind::Authenticator), &[]),
        ],
    );
    let host = PluginHost::start(cfg).await.unwrap();
    let st = status(&host, "future");
    assert!(!st.loaded);
    let error = st.last_error.unwrap();
    assert!(
        error.contains("built for poseidon:plugins@1.0.0"),
        "{error}"
    );
    assert!(
        error.contains("accepts poseidon:plugins@0.1.x or 0.2.x"),
        "{error}"
    );
    let error = status(&host, "sizer").last_error.unwrap();
    assert!(
        error.contains("is a pool-sizer plugin, but the configured kind is preprocessor"),
        "{error}"
    );
    // A configured preprocessor that is not loaded rejects (fail closed).
    let r = host
        .preprocess_execute(1, None, exec_request())
        .await
        .unwrap_err();
    assert!(r.message.contains("plugin is not loaded"), "{r:?}");
    assert!(status(&host, "auth").loaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_authenticator_fails_closed() {
    let dir = temp_dir("noauth");
    let cfg = config(
        &dir,
        vec![entry("absent.wasm", Some(PluginKind::Authenticator), &[])],
    );
    let host = PluginHost::start(cfg).await.unwrap();
    assert!(host.has_authenticator());
    let st = status(&host, "absent");
    assert!(st.last_error.unwrap().contains("not found"));
    let d = host
        .authenticate(&AuthRequest::default())
        .await
        .unwrap_err();
    assert_eq!(d.status, 503);
    assert!(
        d.message.contains("\"absent\" plugin is not loaded"),
        "{d:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_refused() {
    let dir = temp_dir("badconfig");
    let cfg = config(&dir, vec![entry("../escape.wasm", None, &[])]);
    let e = PluginHost::start(cfg).await.unwrap_err();
    assert!(e.to_string().contains("must be a file name"), "{e}");
    let cfg = config(
        &dir,
        vec![entry("a.wasm", None, &[]), entry("a.wasm", None, &[])],
    );
    let e = PluginHost::start(cfg).await.unwrap_err();
    assert!(
        e.to_string().contains("two plugin entries are named \"a\""),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_component_is_refused_with_a_message_and_others_load() {
    let dir = temp_dir("truncated");
    let bytes = std::fs::read(plugin("token_tenants")).unwrap();
    install_bytes(&dir, &bytes[..bytes.len() / 2], "cut.wasm");
    install(&dir, "test_v2_sizer", "local.wasm");
    let host = PluginHost::start(config(
        &dir,
        vec![entry("cut.wasm", None, &[]), entry("local.wasm", None, &[])],
    ))
    .await
    .unwrap();
    let cut = status(&host, "cut");
    assert!(!cut.loaded);
    let error = cut.last_error.unwrap();
    assert!(
        error.contains("cut.wasm: not a valid WebAssembly component"),
        "{error}"
    );
    assert!(status(&host, "local").loaded);
    assert!(host.pool_size(sizer_input(1, 0)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_versions_whose_calls_proved_short_run_in_place() {
    let mut cfg = looping_and_demand("in-place");
    cfg.limits.epoch_deadline_ticks = 5;
    // A budget no short call misses on a busy machine; the endless call is stopped by its
    // deadline (50 ms), which moves its version off whatever the budget.
    cfg.limits.in_place_budget_us = 10_000_000;
    let host = PluginHost::start(cfg).await.unwrap();
    let quick = || {
        let mut input = sizer_input(1, 1);
        input.environment.image = "quick".into();
        input
    };

    // Loaded, not yet called: off the executor.
    assert_eq!(status(&host, "loop").in_place, Some(false));
    assert_eq!(host.pool_size(sizer_input(2, 0)).await, Some(4));
    assert_eq!(status(&host, "demand").in_place, Some(true));
    // A short first call lets the version run in place …
    assert_eq!(host.pool_size(quick()).await, Some(1));
    assert_eq!(status(&host, "loop").in_place, Some(true));
    // … until a call of it has to be stopped: it is still stopped (in place, by its
    // epoch deadline), and the version's later calls run off the executor, short or not.
    assert_eq!(host.pool_size(sizer_input(1, 1)).await, None);
    let st = status(&host, "loop");
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("exceeded its run time of 50 ms"),
        "{st:?}"
    );
    assert_eq!(st.in_place, Some(false));
    assert_eq!(host.pool_size(quick()).await, Some(1));
    assert_eq!(host.pool_size(sizer_input(1, 1)).await, None);
    assert_eq!(status(&host, "loop").in_place, Some(false));
    // The other plugin is unaffected.
    assert_eq!(host.pool_size(sizer_input(2, 0)).await, Some(4));
    assert_eq!(status(&host, "demand").in_place, Some(true));
}
