//! Helpers shared by the plugin host tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use poseidon_core::execution::ExecutionRequest;
use poseidon_plugin_host::{
    EnvironmentInfo, Limits, PluginEntry, PluginHost, PluginKind, PluginStatus, PluginsConfig,
    PoolSizerInput, PoolStateInfo, SizerBounds,
};

/// Path of a built example plugin, e.g. `plugin("demand_sizer")`.
///
/// Panics with instructions if the plugins were not built.
pub fn plugin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "plugin {} is missing: build the plugins first with `plugins/build.sh` \
         (cargo build --target wasm32-wasip2 --release in plugins/)",
        path.display()
    );
    path
}

/// A fresh, empty directory for one test.
pub fn temp_dir(test: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("plugin-host-tests")
        .join(format!("{test}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies plugin `name` into `dir` as `file`, atomically (write + rename).
pub fn install(dir: &Path, name: &str, file: &str) {
    install_bytes(dir, &std::fs::read(plugin(name)).unwrap(), file);
}

/// Writes `bytes` into `dir` as `file`, atomically (write + rename).
pub fn install_bytes(dir: &Path, bytes: &[u8], file: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// A plugin entry.
pub fn entry(file: &str, kind: Option<PluginKind>, config: &[(&str, &str)]) -> PluginEntry {
    PluginEntry {
        name: None,
        file: file.to_string(),
        kind,
        environments: None,
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        fail_open: false,
        time_zone: None,
        cache_decisions: None,
    }
}

/// Generous limits for functional tests: a loaded CI machine must not make a normal
/// call fail.
pub fn relaxed_limits() -> Limits {
    Limits {
        call_timeout_ms: 30_000,
        epoch_tick_ms: 10,
        epoch_deadline_ticks: 1_000,
        fuel: None,
        memory_mb: 64,
        max_concurrent_calls: 8,
        ..Limits::default()
    }
}

/// A configuration for `dir` with `entries`.
pub fn config(dir: &Path, entries: Vec<PluginEntry>) -> PluginsConfig {
    PluginsConfig {
        directory: dir.to_path_buf(),
        entries,
        limits: relaxed_limits(),
        sizer: SizerBounds {
            min: 0,
            max: 1000,
            hysteresis: 1,
        },
        watch: true,
        debounce_ms: 50,
        ..PluginsConfig::default()
    }
}

/// A sizer input for environment `id` with `claims` per minute in every minute.
pub fn sizer_input(id: i64, claims: u32) -> PoolSizerInput {
    PoolSizerInput {
        environment: EnvironmentInfo {
            id,
            image: "openhpi/co_execenv_python:3.8".into(),
            prewarming_pool_size: 5,
            cpu_limit: 100,
            memory_limit: 256,
            network_access: false,
            exposed_ports: vec![],
        },
        pool: PoolStateInfo {
            configured_size: 5,
            idle: 2,
            used: 1,
            starting: 0,
            claims_per_minute: vec![claims; 60],
            empty_pool_misses: 0,
            // Monday 2024-01-01 09:30 UTC.
            now: 1_704_101_400,
        },
    }
}

/// The status of plugin `name`.
pub fn status(host: &PluginHost, name: &str) -> PluginStatus {
    host.status()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no plugin named {name}"))
}

/// Polls `condition` every 10 ms until it holds; panics with `what` after 60 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An execution of `command`, nothing else set.
pub fn execution(command: &str) -> ExecutionRequest {
    ExecutionRequest {
        command: command.into(),
        environment: vec![],
        time_limit: None,
        privileged: false,
    }
}

/// An HS256 JWT over `claims` (JSON) signed with `key`.
pub fn sign(claims: &str, key: &[u8]) -> String {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64.encode(claims);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{header}.{payload}").as_bytes());
    let sig = b64.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{sig}")
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
