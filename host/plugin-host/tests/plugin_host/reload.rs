//! Hot reload: replacing, breaking, removing and adding plugin files while the host
//! serves calls.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use poseidon_plugin_host::{PluginHost, PluginKind};
use sha2::Digest;

use crate::common::*;

fn digest_of(name: &str) -> String {
    sha2::Sha256::digest(std::fs::read(plugin(name)).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_break_remove_and_restore_under_load() {
    let dir = temp_dir("reload");
    install(&dir, "demand_sizer", "sizer.wasm");
    // Both sizers read their own keys: the demand sizer answers 3 (headroom, no
    // claims), the timetable sizer 7 (default, no slots).
    let cfg = config(
        &dir,
        vec![entry(
            "sizer.wasm",
            Some(PluginKind::PoolSizer),
            &[("headroom", "3"), ("default", "7")],
        )],
    );
    let host = PluginHost::start(cfg).await.unwrap();
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(3));
    let demand_digest = digest_of("demand_sizer");
    assert_eq!(status(&host, "sizer").digest, Some(demand_digest.clone()));

    // Callers that keep calling throughout the swaps.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for _ in 0..2 {
        let (host, stop, failures, calls) =
            (host.clone(), stop.clone(), failures.clone(), calls.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match host.pool_size(sizer_input(1, 0)).await {
                    Some(3) | Some(7) => calls.fetch_add(1, Ordering::Relaxed),
                    _ => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    // Replace: the new behaviour becomes visible after the swap.
    install(&dir, "timetable_sizer", "sizer.wasm");
    let timetable_digest = digest_of("timetable_sizer");
    wait_until("the timetable sizer is loaded", || {
        status(&host, "sizer").digest.as_deref() == Some(timetable_digest.as_str())
    })
    .await;
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(7));

    // Break: the old version keeps serving, the error is recorded.
    install_bytes(&dir, b"garbage, not wasm", "sizer.wasm");
    wait_until("the broken file is reported", || {
        status(&host, "sizer")
            .last_error
            .is_some_and(|e| e.contains("not a valid WebAssembly component"))
    })
    .await;
    let st = status(&host, "sizer");
    assert!(st.loaded);
    assert_eq!(st.digest, Some(timetable_digest.clone()));
    assert!(st
        .last_error
        .unwrap()
        .contains("the previous version keeps serving"));
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(7));

    // Wait for a few more calls on the kept version, then stop the callers.
    let seen = calls.load(Ordering::Relaxed);
    wait_until("callers made progress", || {
        calls.load(Ordering::Relaxed) > seen + 10
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "calls failed during reloads"
    );
    assert!(calls.load(Ordering::Relaxed) > 10);
    assert_eq!(status(&host, "sizer").failures, 0);

    // Remove: the plugin unloads, the sizer falls back.
    std::fs::remove_file(dir.join("sizer.wasm")).unwrap();
    wait_until("the plugin is unloaded", || !status(&host, "sizer").loaded).await;
    assert!(status(&host, "sizer")
        .last_error
        .unwrap()
        .contains("was removed"));
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, None);
    assert_eq!(status(&host, "sizer").failures, 1);

    // Restore: loaded again.
    install(&dir, "demand_sizer", "sizer.wasm");
    wait_until("the demand sizer is back", || {
        status(&host, "sizer").digest.as_deref() == Some(demand_digest.as_str())
    })
    .await;
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(3));
    assert_eq!(status(&host, "sizer").last_error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_that_appears_later_is_loaded() {
    let dir = temp_dir("appears");
    let cfg = config(&dir, vec![entry("late.wasm", None, &[])]);
    let host = PluginHost::start(cfg).await.unwrap();
    assert!(!status(&host, "late").loaded);
    assert!(!host.has_authenticator());
    install(&dir, "jwt_auth", "late.wasm");
    wait_until("the late plugin is loaded", || status(&host, "late").loaded).await;
    // Its kind was detected from its exports.
    assert_eq!(status(&host, "late").kind, Some(PluginKind::Authenticator));
    assert!(host.has_authenticator());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_reload_without_watcher() {
    let dir = temp_dir("manual");
    install(&dir, "demand_sizer", "s.wasm");
    let mut cfg = config(
        &dir,
        vec![entry(
            "s.wasm",
            None,
            &[("headroom", "3"), ("default", "7")],
        )],
    );
    cfg.watch = false;
    let host = PluginHost::start(cfg).await.unwrap();
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(3));
    install(&dir, "timetable_sizer", "s.wasm");
    host.reload().await;
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_config_applies_without_restart_and_without_failed_calls() {
    let dir = temp_dir("reconfigure");
    install(&dir, "submission_guard", "guard.wasm");
    let cfg = config(&dir, vec![entry("guard.wasm", None, &[("env.ROUND", "1")])]);
    let host = PluginHost::start(cfg.clone()).await.unwrap();
    let round = |host: PluginHost| async move {
        let out = host
            .preprocess_execute(1, None, execution("make"))
            .await
            .expect("no call may fail while the configuration changes");
        out.environment
            .iter()
            .find(|(k, _)| k == "ROUND")
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(round(host.clone()).await, "1");
    // Clients keep calling while the configuration changes.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let client = {
        let (host, stop, calls) = (host.clone(), stop.clone(), calls.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let seen = round(host.clone()).await;
                assert!(seen == "1" || seen == "2", "{seen}");
                calls.fetch_add(1, Ordering::Relaxed);
                // A client between requests (calls in place do not suspend).
                tokio::task::yield_now().await;
            }
        })
    };
    // The client is calling before the change …
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while calls.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never called"
        );
        tokio::task::yield_now().await;
    }
    let mut changed = cfg.clone();
    changed.entries[0]
        .config
        .insert("env.ROUND".into(), "2".into());
    let needs_restart = host.reconfigure(&changed).await;
    assert!(needs_restart.is_empty(), "{needs_restart:?}");
    assert_eq!(round(host.clone()).await, "2");
    // … and after it.
    let after = calls.load(Ordering::Relaxed);
    while calls.load(Ordering::Relaxed) <= after {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client stopped calling"
        );
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let st = status(&host, "guard");
    assert_eq!(st.failures, 0, "{st:?}");
    // What cannot change at run time (an added entry) is reported; the rest applies.
    let mut added = changed.clone();
    added.entries.push(entry("other.wasm", None, &[]));
    added.entries[0].fail_open = true;
    let needs_restart = host.reconfigure(&added).await;
    assert_eq!(needs_restart, vec!["plugin \"other\" was added"]);
    assert_eq!(round(host.clone()).await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_entry_settings_apply_without_restart_and_without_failed_calls() {
    let dir = temp_dir("reentry");
    install(&dir, "submission_guard", "guard.wasm");
    install(&dir, "test_v2_preprocessor", "v2.wasm");
    install(&dir, "test_alloc", "alloc.wasm");
    let mut pre = entry("guard.wasm", None, &[("env.ROUND", "1")]);
    pre.name = Some("pre".into());
    pre.environments = Some(vec![1]);
    let cfg = config(&dir, vec![pre]);
    let host = PluginHost::start(cfg.clone()).await.unwrap();
    let env = |host: PluginHost, environment: u64| async move {
        host.preprocess_execute(environment, None, execution("make"))
            .await
            .map(|out| out.environment)
    };
    let round = vec![("ROUND".to_string(), "1".to_string())];
    assert_eq!(env(host.clone(), 1).await.unwrap(), round);
    assert_eq!(env(host.clone(), 2).await.unwrap(), vec![]);
    // A client of environment 2 keeps calling while the entry changes: never refused.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (host, stop) = (host.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                env(host.clone(), 2)
                    .await
                    .expect("no call may fail while the entry changes");
                tokio::task::yield_now().await;
            }
        })
    };

    // environments: the plugin now applies to 2, not 1.
    let mut changed = cfg.clone();
    changed.entries[0].environments = Some(vec![2]);
    assert_eq!(host.reconfigure(&changed).await, Vec::<String>::new());
    assert_eq!(env(host.clone(), 1).await.unwrap(), vec![]);
    assert_eq!(env(host.clone(), 2).await.unwrap(), round);

    // file: another component serves the same entry once compiled.
    changed.entries[0].file = "v2.wasm".into();
    assert_eq!(host.reconfigure(&changed).await, Vec::<String>::new());
    assert_eq!(
        env(host.clone(), 2).await.unwrap(),
        vec![
            ("WIT_VERSION".to_string(), "0.2".to_string()),
            ("CALLS_IN_INSTANCE".to_string(), "1".to_string())
        ]
    );
    assert_eq!(status(&host, "pre").file, "v2.wasm");
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert_eq!(status(&host, "pre").failures, 0);

    // failOpen: a plugin whose every call fails rejects, then lets requests pass.
    changed.entries[0].file = "alloc.wasm".into();
    assert_eq!(host.reconfigure(&changed).await, Vec::<String>::new());
    assert!(env(host.clone(), 2).await.is_err());
    changed.entries[0].fail_open = true;
    assert_eq!(host.reconfigure(&changed).await, Vec::<String>::new());
    assert_eq!(env(host.clone(), 2).await.unwrap(), vec![]);

    // timeZone: an unknown zone is refused with a message and changes nothing.
    changed.entries[0].time_zone = Some("Mars/Olympus_Mons".into());
    let refused = host.reconfigure(&changed).await;
    assert!(
        refused.len() == 1 && refused[0].contains("Mars/Olympus_Mons"),
        "{refused:?}"
    );
    assert_eq!(env(host.clone(), 2).await.unwrap(), vec![]);
    // A renamed entry is another plugin: that needs a restart.
    changed.entries[0].time_zone = None;
    changed.entries[0].name = Some("renamed".into());
    assert_eq!(host.reconfigure(&changed).await.len(), 2);
}
