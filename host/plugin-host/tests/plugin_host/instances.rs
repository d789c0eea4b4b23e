//! Every call runs in an instance no call ran in before, whether the instance was made
//! during the call or ahead of it (the version's spare, made by the host's keeper).

use poseidon_plugin_host::PluginHost;

use crate::common::*;

/// The value of `name` in an execution's environment after the preprocessors.
fn env_value(env: &[(String, String)], name: &str) -> Option<String> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_gets_a_fresh_instance_made_ahead_of_it() {
    let dir = temp_dir("instances");
    install(&dir, "test_v2_preprocessor", "pre.wasm");
    let host = PluginHost::start(config(&dir, vec![entry("pre.wasm", None, &[])]))
        .await
        .unwrap();
    for call in 1..=5u64 {
        // The keeper makes a spare after the load and after every call.
        wait_until("the plugin has a spare instance", || {
            status(&host, "pre").spare_ready == Some(true)
        })
        .await;
        let out = host
            .preprocess_execute(1, None, execution("make"))
            .await
            .unwrap();
        assert_eq!(
            env_value(&out.environment, "CALLS_IN_INSTANCE").as_deref(),
            Some("1"),
            "call {call}"
        );
        assert_eq!(status(&host, "pre").spare_calls, call);
    }
    // Calls that do not wait for the keeper, several at once: each still gets an
    // instance of its own, made ahead or during the call.
    let calls = (0..12).map(|_| {
        let host = host.clone();
        tokio::spawn(async move { host.preprocess_execute(1, None, execution("make")).await })
    });
    for call in calls {
        let out = call.await.unwrap().unwrap();
        assert_eq!(
            env_value(&out.environment, "CALLS_IN_INSTANCE").as_deref(),
            Some("1")
        );
    }
    assert_eq!(status(&host, "pre").failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_made_under_the_old_configuration_is_not_used_after_a_change() {
    let dir = temp_dir("instances-config");
    install(&dir, "submission_guard", "guard.wasm");
    let mut cfg = config(
        &dir,
        vec![entry("guard.wasm", None, &[("env.STAGE", "old")])],
    );
    let host = PluginHost::start(cfg.clone()).await.unwrap();
    let stage = |host: PluginHost| async move {
        let out = host
            .preprocess_execute(1, None, execution("make"))
            .await
            .unwrap();
        env_value(&out.environment, "STAGE")
    };
    assert_eq!(stage(host.clone()).await.as_deref(), Some("old"));
    wait_until("the plugin has a spare instance", || {
        status(&host, "guard").spare_ready == Some(true)
    })
    .await;
    cfg.entries[0].config = [("env.STAGE".to_string(), "new".to_string())].into();
    assert_eq!(host.reconfigure(&cfg).await, Vec::<String>::new());
    assert_eq!(stage(host.clone()).await.as_deref(), Some("new"));
}
