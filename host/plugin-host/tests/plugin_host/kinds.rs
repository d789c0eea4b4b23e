//! Each plugin kind, through the real example plugins.

use std::time::Duration;

use poseidon_core::execution::ExecutionRequest;
use poseidon_core::files::{FileCopy, FileUpdate};
use poseidon_plugin_host::{
    AuthRequest, PluginHost, PluginKind, PluginsConfig, Principal, SizerBounds,
};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_host_is_a_no_op() {
    let host = PluginHost::disabled();
    assert!(!host.is_enabled());
    assert_eq!(host.pool_size(sizer_input(1, 3)).await, None);
    assert!(!host.has_authenticator());
    let req = execution("ls");
    assert_eq!(host.preprocess_execute(1, None, req.clone()).await, Ok(req));
    assert!(host.status().is_empty());
    let p = host.authenticate(&AuthRequest::default()).await.unwrap();
    assert_eq!(p.environments, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_sizer_answers_and_host_clamps() {
    let dir = temp_dir("demand");
    install(&dir, "demand_sizer", "demand.wasm");
    let mut entry = entry(
        "demand.wasm",
        Some(PluginKind::PoolSizer),
        &[("headroom", "2"), ("horizonMinutes", "2")],
    );
    entry.environments = Some(vec![10, 11]);
    let mut cfg = config(&dir, vec![entry]);
    cfg.sizer = SizerBounds {
        min: 1,
        max: 20,
        hysteresis: 1,
    };
    let host = PluginHost::start(cfg).await.unwrap();
    let st = status(&host, "demand");
    assert!(st.loaded, "{st:?}");
    assert_eq!(st.wit_version.as_deref(), Some("0.1.0"));
    assert_eq!(st.kind, Some(PluginKind::PoolSizer));
    assert_eq!(st.digest.as_ref().map(String::len), Some(64));

    // 3 claims/min × 2 minutes + 2 headroom.
    assert_eq!(host.pool_size(sizer_input(10, 3)).await, Some(8));
    // Clamped to max 20.
    assert_eq!(host.pool_size(sizer_input(11, 50)).await, Some(20));
    // Environment 12 has no sizer.
    assert_eq!(host.pool_size(sizer_input(12, 3)).await, None);
    // Short claim histories are padded: 1 minute of 60 claims smooths to 18.
    let mut input = sizer_input(10, 0);
    input.pool.claims_per_minute = vec![60];
    assert_eq!(host.pool_size(input).await, Some(20));
    let st = status(&host, "demand");
    assert_eq!((st.calls, st.failures), (3, 0), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hysteresis_damps_small_changes() {
    let dir = temp_dir("hysteresis");
    install(&dir, "demand_sizer", "demand.wasm");
    let mut cfg = config(&dir, vec![entry("demand.wasm", None, &[("headroom", "0")])]);
    cfg.sizer = SizerBounds {
        min: 0,
        max: 100,
        hysteresis: 3,
    };
    let host = PluginHost::start(cfg).await.unwrap();
    assert_eq!(host.pool_size(sizer_input(1, 10)).await, Some(10));
    // 12 differs by less than 3: keep 10.
    assert_eq!(host.pool_size(sizer_input(1, 12)).await, Some(10));
    assert_eq!(host.pool_size(sizer_input(1, 13)).await, Some(13));
    // Reaching the bound always passes.
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(0));
    assert_eq!(host.pool_size(sizer_input(1, 1)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timetable_sizer_follows_the_timetable() {
    let dir = temp_dir("timetable");
    install(&dir, "timetable_sizer", "timetable.wasm");
    let cfg = config(
        &dir,
        vec![entry(
            "timetable.wasm",
            None,
            &[
                ("slots", "mon-fri 10:00-12:00 = 25"),
                ("utcOffsetMinutes", "60"),
                ("default", "3"),
            ],
        )],
    );
    let host = PluginHost::start(cfg).await.unwrap();
    // Monday 09:30 UTC = 10:30 local: in the slot.
    assert_eq!(host.pool_size(sizer_input(1, 0)).await, Some(25));
    let mut evening = sizer_input(1, 0);
    evening.pool.now += 10 * 3600;
    assert_eq!(host.pool_size(evening).await, Some(3));
}

fn guard_config(dir: &std::path::Path) -> PluginsConfig {
    install(dir, "submission_guard", "guard.wasm");
    config(
        dir,
        vec![entry(
            "guard.wasm",
            Some(PluginKind::Preprocessor),
            &[
                ("maxFiles", "2"),
                ("forbiddenPaths", "**/*.so"),
                ("forbiddenCommands", "*curl *"),
                ("maxTimeLimit", "20"),
                ("env.PYTHONUNBUFFERED", "1"),
            ],
        )],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_guard_rewrites_and_rejects() {
    let dir = temp_dir("guard");
    let host = PluginHost::start(guard_config(&dir)).await.unwrap();
    let req = ExecutionRequest {
        command: "python main.py".into(),
        environment: vec![("A".into(), "b".into())],
        time_limit: None,
        privileged: false,
    };
    let tenant = Principal {
        tenant: "tenant-a".into(),
        environments: None,
    };
    let out = host
        .preprocess_execute(10, Some(&tenant), req.clone())
        .await
        .unwrap();
    assert_eq!(out.time_limit, Some(Duration::from_secs(20)));
    assert_eq!(
        out.environment,
        vec![
            ("A".to_string(), "b".to_string()),
            ("PYTHONUNBUFFERED".to_string(), "1".to_string())
        ]
    );

    let bad = ExecutionRequest {
        command: "curl http://example.org".into(),
        ..req
    };
    let rejection = host
        .preprocess_execute(10, Some(&tenant), bad)
        .await
        .unwrap_err();
    assert_eq!(rejection.plugin, "guard");
    assert!(
        rejection.message.contains("command refused"),
        "{rejection:?}"
    );

    let files = FileUpdate {
        copy: vec![FileCopy {
            path: "main.py".into(),
            content: b"print(1)".to_vec(),
        }],
        delete: vec!["old.py".into()],
    };
    assert_eq!(
        host.preprocess_files(10, None, files.clone()).await,
        Ok(files.clone())
    );
    let mut too_many = files.clone();
    too_many.copy = vec![too_many.copy[0].clone(); 3];
    let r = host.preprocess_files(10, None, too_many).await.unwrap_err();
    assert!(r.message.contains("too many files"), "{r:?}");
    let mut so = files;
    so.copy[0].path = "lib/evil.so".into();
    let r = host.preprocess_files(10, None, so).await.unwrap_err();
    assert!(r.message.contains("forbidden"), "{r:?}");
    // Rejections are answers, not failures.
    assert_eq!(status(&host, "guard").failures, 0);
}

fn auth_request(token: Option<&str>) -> AuthRequest {
    AuthRequest {
        method: "post".into(),
        path: "/api/v1/runners".into(),
        headers: token
            .map(|t| vec![("Authorization".to_string(), format!("Bearer {t}"))])
            .unwrap_or_default(),
        peer_address: Some("127.0.0.1:5000".into()),
        poseidon_token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_authenticates_tenants() {
    let dir = temp_dir("jwt");
    install(&dir, "jwt_auth", "jwt.wasm");
    let cfg = config(
        &dir,
        vec![entry(
            "jwt.wasm",
            Some(PluginKind::Authenticator),
            &[
                ("key.codeocean", "s3cret"),
                ("environments.codeocean", "10, 11"),
                ("key.other", "other-key"),
            ],
        )],
    );
    let host = PluginHost::start(cfg).await.unwrap();
    assert!(host.has_authenticator());
    let exp = unix_now() + 300;
    let token = sign(&format!(r#"{{"iss":"codeocean","exp":{exp}}}"#), b"s3cret");
    let p = host
        .authenticate(&auth_request(Some(&token)))
        .await
        .unwrap();
    assert_eq!(p.tenant, "codeocean");
    assert_eq!(p.environments, Some(vec![10, 11]));
    assert!(p.may_use(10) && !p.may_use(12));

    let other = sign(&format!(r#"{{"iss":"other","exp":{exp}}}"#), b"other-key");
    let p = host
        .authenticate(&auth_request(Some(&other)))
        .await
        .unwrap();
    assert_eq!((p.tenant.as_str(), p.environments), ("other", None));

    let d = host.authenticate(&auth_request(None)).await.unwrap_err();
    assert_eq!(
        (d.status, d.message.as_str()),
        (401, "missing bearer token")
    );
    let forged = sign(&format!(r#"{{"iss":"codeocean","exp":{exp}}}"#), b"wrong");
    let d = host
        .authenticate(&auth_request(Some(&forged)))
        .await
        .unwrap_err();
    assert_eq!(d.status, 401);
    let expired = sign(r#"{"iss":"codeocean","exp":1000}"#, b"s3cret");
    let d = host
        .authenticate(&auth_request(Some(&expired)))
        .await
        .unwrap_err();
    assert_eq!((d.status, d.message.as_str()), (401, "token expired"));
    assert_eq!(status(&host, "jwt").failures, 0);
}
