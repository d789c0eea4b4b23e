//! Glue between the plugin host (`poseidon-plugin-host`) and the server: the `plugins:`
//! configuration section, the API's [`Policies`] (authenticator, preprocessors), the
//! pools' [`PoolPolicy`] (sizer), and `poseidon plugin check FILE`.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use poseidon_api::{AuthRequest, Denial, LifecycleEvent, Policies, Principal};
use poseidon_core::execution::ExecutionRequest;
use poseidon_core::files::FileUpdate;
use poseidon_core::policy::{PoolPolicy, PoolSnapshot};
use poseidon_core::EnvironmentId;
use poseidon_plugin_host::{
    EnvironmentInfo, PluginHost, PluginsConfig, PoolSizerInput, PoolStateInfo,
};

/// Reads the `plugins:` section: absent or `null` means no plugins.
pub fn config(section: &serde_yaml::Value) -> Result<Option<PluginsConfig>, String> {
    if section.is_null() {
        return Ok(None);
    }
    serde_path_to_error::deserialize(section.clone())
        .map(Some)
        .map_err(|e| format!("invalid configuration: plugins.{}: {}", e.path(), e.inner()))
}

/// On SIGHUP, re-reads the configuration file (as at start, `POSEIDON_*` variables
/// included) and applies a changed `plugins:` section without a restart
/// ([`PluginHost::reconfigure`]: changed `config:` values at once, changed files reloaded);
/// what needs a restart is logged.
pub fn reload_on_sighup(host: PluginHost, config_path: Option<std::path::PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; plugin configuration changes need a restart");
            return;
        }
    };
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            apply_configuration_file(&host, config_path.as_deref(), Trigger::Signal).await;
        }
    });
}

/// What asked for a configuration reload.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// SIGHUP.
    Signal,
    /// The file watch saw the configuration file change.
    FileChange,
}

impl Trigger {
    /// How the log lines name it.
    fn describe(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "configuration file changed",
        }
    }

    /// The `trigger` label of `poseidon_plugin_config_reloads_total`.
    fn label(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChange => "file",
        }
    }
}

/// Watches the configuration file (its directory, for editors that replace the file) and
/// applies a changed `plugins:` section like SIGHUP does, once the file has been quiet for
/// `debounce`. Only events that can change the file's content count (not the server's own
/// reads of it), and a file whose content is what was last applied is not applied again.
/// Without a configuration file there is nothing to watch.
pub fn reload_on_file_change(
    host: PluginHost,
    config_path: Option<std::path::PathBuf>,
    debounce: Duration,
) {
    use notify::Watcher;
    let Some(path) = config_path else {
        return;
    };
    let path = std::path::absolute(&path).unwrap_or(path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let name = name.to_os_string();
    // What the file held when it was last applied: at first, what the server started with
    // (read before the watch begins, so a change from now on is not missed).
    let mut applied = std::fs::read(&path).ok();
    // Capacity 1: a pending message already means "re-read the file".
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let ours = match &event {
            Ok(event) => {
                poseidon_plugin_host::may_change_content(&event.kind)
                    && event
                        .paths
                        .iter()
                        .any(|p| p.file_name() == Some(name.as_os_str()))
            }
            Err(_) => true,
        };
        if ours {
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    let watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch the configuration file; plugin configuration changes need SIGHUP");
            return;
        }
    };
    tokio::spawn(async move {
        let _watcher = watcher;
        while poseidon_plugin_host::settled(&mut rx, debounce).await {
            let now = tokio::fs::read(&path).await.ok();
            if now.is_some() && now == applied {
                tracing::debug!(path = %path.display(), "configuration file unchanged; nothing to apply");
                continue;
            }
            apply_configuration_file(&host, Some(&path), Trigger::FileChange).await;
            applied = now;
        }
    });
}

/// Re-reads the configuration file and applies its `plugins:` section; `trigger` names
/// what asked for it in the log lines and the metrics.
async fn apply_configuration_file(host: &PluginHost, path: Option<&Path>, trigger: Trigger) {
    metrics::counter!("poseidon_plugin_config_reloads_total", "trigger" => trigger.label())
        .increment(1);
    let trigger = trigger.describe();
    let section = crate::config::Config::load(path, std::env::vars())
        .map_err(|e| e.to_string())
        .and_then(|c| config(&c.plugins));
    match section {
        Ok(Some(new)) => {
            for line in host.reconfigure(&new).await {
                tracing::warn!("{line}; restart the server to apply it");
            }
            tracing::info!("{trigger}: plugin configuration reloaded");
        }
        Ok(None) => {
            tracing::warn!("{trigger}: the plugins section is gone; restart the server to apply it")
        }
        Err(e) => tracing::error!("{trigger}: configuration not reloaded: {e}"),
    }
}

/// The plugin host as the API's and the pools' policy.
pub struct PluginPolicies {
    host: PluginHost,
    misses: Mutex<HashMap<EnvironmentId, MissWindow>>,
}

impl PluginPolicies {
    /// Wraps a started plugin host.
    pub fn new(host: PluginHost) -> Self {
        Self {
            host,
            misses: Mutex::new(HashMap::new()),
        }
    }

    /// Empty-pool misses of `environment` during the last hour, from the running total
    /// the pool reports.
    fn recent_misses(&self, environment: EnvironmentId, total: u64, now: i64) -> u32 {
        let mut windows = self.misses.lock().unwrap_or_else(|e| e.into_inner());
        windows.entry(environment).or_default().recent(total, now)
    }
}

/// Samples of an environment's running miss total, to count the misses of the last hour.
#[derive(Default)]
struct MissWindow {
    samples: VecDeque<(i64, u64)>,
}

impl MissWindow {
    fn recent(&mut self, total: u64, now: i64) -> u32 {
        const HOUR: i64 = 3600;
        // Keep one sample at or before the window start as the baseline.
        while self.samples.len() >= 2 && self.samples[1].0 <= now - HOUR {
            self.samples.pop_front();
        }
        // A smaller total means the environment was recreated: start over.
        if self.samples.back().is_some_and(|&(_, t)| t > total) {
            self.samples.clear();
        }
        if self.samples.back().is_none_or(|&(t, _)| t < now) {
            self.samples.push_back((now, total));
        }
        let baseline = match self.samples.front() {
            Some(&(t, base)) if t <= now - HOUR => base,
            // History shorter than an hour: everything counted so far is recent.
            _ => 0,
        };
        u32::try_from(total.saturating_sub(baseline)).unwrap_or(u32::MAX)
    }
}

fn to_i64(id: EnvironmentId) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

#[async_trait]
impl Policies for PluginPolicies {
    fn authenticates(&self) -> bool {
        self.host.has_authenticator()
    }

    fn reads_tokens(&self) -> bool {
        self.host.authenticator_reads_tokens()
    }

    fn observes(&self) -> bool {
        self.host.has_observer()
    }

    fn observe(&self, event: LifecycleEvent) {
        self.host.observe(event);
    }

    async fn authenticate(&self, request: &AuthRequest) -> Result<Option<Principal>, Denial> {
        if !self.host.has_authenticator() {
            return Ok(None);
        }
        self.host.authenticate(request).await.map(Some)
    }

    async fn preprocess_execute(
        &self,
        environment: EnvironmentId,
        principal: Option<&Principal>,
        request: ExecutionRequest,
    ) -> Result<ExecutionRequest, String> {
        self.host
            .preprocess_execute(environment, principal, request)
            .await
            .map_err(|r| r.message)
    }

    async fn preprocess_files(
        &self,
        environment: EnvironmentId,
        principal: Option<&Principal>,
        update: FileUpdate,
    ) -> Result<FileUpdate, String> {
        self.host
            .preprocess_files(environment, principal, update)
            .await
            .map_err(|r| r.message)
    }

    fn plugins_status(&self) -> serde_json::Value {
        serde_json::to_value(self.host.status()).unwrap_or_default()
    }
}

#[async_trait]
impl PoolPolicy for PluginPolicies {
    async fn desired_idle(&self, snapshot: &PoolSnapshot) -> Option<u32> {
        let config = &snapshot.config;
        let input = PoolSizerInput {
            environment: EnvironmentInfo {
                id: to_i64(config.id),
                image: config.image.clone(),
                prewarming_pool_size: config.prewarming_pool_size,
                cpu_limit: config.cpu_limit,
                memory_limit: config.memory_limit,
                network_access: config.network_access,
                exposed_ports: config.exposed_ports.clone(),
            },
            pool: PoolStateInfo {
                configured_size: config.prewarming_pool_size,
                idle: snapshot.idle,
                used: snapshot.used,
                starting: snapshot.starting,
                claims_per_minute: snapshot.claims_per_minute.clone(),
                empty_pool_misses: self.recent_misses(
                    config.id,
                    snapshot.empty_pool_misses,
                    snapshot.now_unix,
                ),
                now: snapshot.now_unix,
            },
        };
        self.host.pool_size(input).await
    }
}

/// `poseidon plugin check FILE`: describes the plugin or says why it would be refused
/// (compiled once into the user's cache, as `plugin call` does). Returns the process exit code.
pub fn check_command(file: &Path) -> i32 {
    use std::io::Write;
    let cache = crate::plugin_cli::user_cache_directory();
    match poseidon_plugin_host::check_file_cached(file, cache.as_deref()) {
        Ok(d) => {
            let text = format!(
                "{}: OK\n  kind:        {}\n  wit version: poseidon:plugins@{}\n  sha256:      {}\n  size:        {} bytes\n  compiled in: {} ms\n  exports:     {}\n  imports:     {}\n",
                file.display(),
                d.kind,
                d.wit_version,
                d.digest,
                d.size,
                d.compile_ms,
                d.exports.join(", "),
                d.imports.join(", ")
            );
            // A reader that stops early (`| head`) is no error; println! panicked on it.
            match std::io::stdout().lock().write_all(text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("cannot write to stdout: {e}");
                    1
                }
                _ => 0,
            }
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// For `poseidon config check`: checks every plugin entry's file as the server would load it
/// (compiled into `cache`), and that it is of the entry's kind. One line per entry; `Err` names the entries the server would not load.
pub fn check_entries(config: &PluginsConfig, cache: Option<&Path>) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let mut refused = Vec::new();
    for entry in &config.entries {
        let path = config.directory.join(&entry.file);
        let name = entry.name.clone().unwrap_or_else(|| entry.file.clone());
        match poseidon_plugin_host::check_file_cached(&path, cache) {
            Ok(d) if entry.kind.is_some_and(|k| k != d.kind) => {
                let wanted = entry.kind.map(|k| k.to_string()).unwrap_or_default();
                refused.push(format!(
                    "plugin {name}: {} is {}, but the entry says {wanted}",
                    path.display(),
                    d.kind.with_article()
                ));
            }
            Ok(d) => lines.push(format!(
                "plugin {name}: OK ({}, poseidon:plugins@{})",
                d.kind, d.wit_version
            )),
            Err(e) => refused.push(format!("plugin {name}: {e}")),
        }
    }
    if refused.is_empty() {
        Ok(lines)
    } else {
        Err(refused.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_are_counted_over_the_last_hour() {
        let mut w = MissWindow::default();
        assert_eq!(w.recent(2, 1000), 2);
        assert_eq!(w.recent(5, 2000), 5);
        // An hour after the first sample, its total becomes the baseline.
        assert_eq!(w.recent(6, 4600), 4);
        assert_eq!(w.recent(6, 5600), 1);
        assert_eq!(w.recent(6, 9000), 0);
        // Recreated environment: its total restarted.
        assert_eq!(w.recent(1, 9100), 1);
    }

    #[test]
    fn absent_section_means_no_plugins() {
        assert_eq!(config(&serde_yaml::Value::Null), Ok(None));
        let v: serde_yaml::Value =
            serde_yaml::from_str("directory: /p\nentries: [{file: a.wasm}]").unwrap();
        let c = config(&v).unwrap().unwrap();
        assert_eq!(c.entries.len(), 1);
        let bad: serde_yaml::Value = serde_yaml::from_str("limits: {memoryMb: lots}").unwrap();
        let e = config(&bad).unwrap_err();
        assert!(e.contains("plugins.limits.memoryMb"), "{e}");
    }
}
