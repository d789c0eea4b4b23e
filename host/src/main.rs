//! `poseidon`: the gateway server.
//!
//! `poseidon [--config PATH]` starts the server with the backend the configuration names (the
//! local bubblewrap backend by default) and the policy plugins of its `plugins:` section.
//! `poseidon config check FILE` checks a configuration file, `poseidon plugin check FILE` a
//! plugin file, the way the server would read them. `poseidon --help` lists everything.

#![forbid(unsafe_code)]

mod config;
mod influx;
mod metrics;
mod plugin_cli;
mod plugins;
mod reporting;
mod systemd;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use config::Config;
use poseidon_api::{ApiSettings, AppState, NoPolicies, Policies};
use poseidon_core::policy::PoolPolicy;
use poseidon_core::{Backend, Manager};
use poseidon_local::LocalBackend;
use poseidon_nomad::NomadBackend;
use poseidon_plugin_host::PluginHost;

/// How long a graceful shutdown waits for open requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// Poseidon (Rust): the gateway that gives CodeOcean sandboxes ("runners") to run code in.
#[derive(Debug, clap::Parser)]
#[command(name = "poseidon", version, about, long_about = None)]
struct Cli {
    /// The configuration file (default: ./configuration.yaml if it exists). `POSEIDON_*`
    /// variables override its values.
    #[arg(short, long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Start the server (the default).
    Serve,
    /// Work with the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Work with policy plugins: `check FILE`, `call FILE --kind KIND --input JSON
    /// [--config KEY=VALUE]...`, `new KIND NAME [--lang rust|python]` (no server, no root).
    Plugin {
        /// The plugin command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 1..)]
        args: Vec<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
enum ConfigCommand {
    /// Check a configuration file (with the `POSEIDON_*` variables of this environment applied)
    /// the way the server reads it; exits 0 and prints what it would do, or 2 and names the key.
    Check {
        /// The configuration file (default: `--config`, else `./configuration.yaml`).
        file: Option<PathBuf>,
    },
}

/// Poseidon's flag was Go's `-config`; clap reads only `--config` and `-c`.
fn arguments() -> Vec<std::ffi::OsString> {
    std::env::args_os()
        .map(|a| if a == "-config" { "--config".into() } else { a })
        .collect()
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, config::ConfigError> {
    Config::load(path, std::env::vars())
}

/// `poseidon config check FILE`: the configuration as the server reads it, and every plugin
/// entry's file as the server would load it. Returns the exit code (2: the server would refuse
/// the configuration or a plugin).
fn config_check(file: &std::path::Path) -> i32 {
    let checked = load_config(Some(file)).and_then(|c| {
        let plugins =
            plugins::config(&c.plugins).map_err(|message| config::ConfigError::Invalid {
                key: "plugins".into(),
                message,
            })?;
        Ok((c, plugins))
    });
    let (config, plugins) = match checked {
        Ok(checked) => checked,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return 2;
        }
    };
    // What the configuration names must exist, or the start stops at it.
    let mut missing = Vec::new();
    if config.server.tls.active {
        for (key, path) in [
            ("server.tls.certfile", &config.server.tls.certfile),
            ("server.tls.keyfile", &config.server.tls.keyfile),
        ] {
            if let Err(e) = std::fs::File::open(path) {
                missing.push(format!("{key} {path}: {e}"));
            }
        }
    }
    if !config.nomad.enabled {
        if let Err(e) = poseidon_local::find_agent(&config.local) {
            missing.push(format!("local.agent: {e}"));
        }
    }
    if !missing.is_empty() {
        eprintln!("{}: {}", file.display(), missing.join("; "));
        return 2;
    }
    println!("{}: OK: {}", file.display(), config.summary());
    let Some(plugins) = plugins else { return 0 };
    // Compiled into the user's cache, as `plugin check` does: checking again is quick.
    let cache = plugin_cli::user_cache_directory();
    match plugins::check_entries(&plugins, cache.as_deref()) {
        Ok(lines) => {
            for line in lines {
                println!("  {line}");
            }
            0
        }
        Err(refused) => {
            eprintln!("{}: {refused}", file.display());
            2
        }
    }
}

/// Without plugins there is nothing SIGHUP reloads; its default action would end the server.
fn ignore_sighup() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP: nothing to reload (it reloads the plugins section, and there is none)");
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
    }
}

/// Raises the soft limit of open files to the hard one, as Go programs (Poseidon) do at start:
/// every runner holds descriptors, and 1024 (systemd's default soft limit) runs out at a few
/// hundred runners. Sandboxes get the usual soft limit back (`poseidon-agent --exec-in-cgroups`).
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn main() {
    use clap::Parser;
    let cli = Cli::parse_from(arguments());
    match cli.command {
        Some(Command::Plugin { args }) => std::process::exit(plugin_cli::run(&args)),
        Some(Command::Config(ConfigCommand::Check { file })) => {
            let file = file
                .or(cli.config)
                .unwrap_or_else(|| PathBuf::from("configuration.yaml"));
            std::process::exit(config_check(&file))
        }
        Some(Command::Serve) | None => {}
    }
    let config = match load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("poseidon: {e}");
            std::process::exit(2);
        }
    };
    let sentry = match reporting::init(&config.sentry, &release_name(&config)) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("poseidon: {e}");
            std::process::exit(2);
        }
    };
    init_logging(&config, sentry.is_some());
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    let result = runtime.block_on(serve(config, sentry.is_some(), cli.config.clone()));
    if let Err(e) = &result {
        tracing::error!("{e}");
        eprintln!("poseidon: {e}");
    }
    drop(sentry); // flushes queued events
    if result.is_err() {
        std::process::exit(1);
    }
}

fn init_logging(config: &Config, sentry: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = match config.logger.level.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSEIDON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let json = config
        .logger
        .formatter
        .eq_ignore_ascii_case("JSONFormatter");
    type Base = tracing_subscriber::layer::Layered<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >;
    let mut layers: Vec<Box<dyn tracing_subscriber::Layer<Base> + Send + Sync>> = Vec::new();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        layers.push(Box::new(fmt.json()));
    } else {
        layers.push(Box::new(fmt.with_ansi(false)));
    }
    if sentry {
        layers.push(Box::new(reporting::layer()));
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .init();
}

/// What `/version` answers and Sentry reports: `sentry.release`, else the crate version.
fn release_name(config: &Config) -> String {
    if config.sentry.release.is_empty() {
        env!("CARGO_PKG_VERSION").to_string()
    } else {
        config.sentry.release.clone()
    }
}

async fn serve(
    config: Config,
    sentry: bool,
    config_path: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = if config.metrics.enabled {
        Some(metrics::Metrics::install()?)
    } else {
        None
    };
    let (backend, local): (Arc<dyn Backend>, Option<Arc<LocalBackend>>) = if config.nomad.enabled {
        let mut nomad = config.nomad.settings.clone();
        nomad.interactive_stderr = config.server.interactivestderr;
        if !config.server.templatejobfile.is_empty() {
            let path = std::path::Path::new(&config.server.templatejobfile);
            poseidon_nomad::template::load(&mut nomad, path)
                .await
                .map_err(|e| format!("server.templatejobfile {}: {e}", path.display()))?;
        }
        tracing::info!(address = %nomad.base_url(), "using the Nomad backend");
        (Arc::new(NomadBackend::new(nomad)?), None)
    } else {
        let local = Arc::new(LocalBackend::new(config.local.clone()).await?);
        (local.clone(), Some(local))
    };
    let plugin_config = plugins::config(&config.plugins)?;
    let policies: Option<Arc<plugins::PluginPolicies>> = match plugin_config {
        Some(mut plugin_config) => {
            let (watch_config, debounce) = (
                plugin_config.watch,
                std::time::Duration::from_millis(plugin_config.debounce_ms),
            );
            if plugin_config.cache_directory.is_none() {
                plugin_config.cache_directory = Some(config.local.statedir.join("plugin-cache"));
            }
            let host = PluginHost::start(plugin_config)
                .await
                .map_err(|e| format!("plugins: {e}"))?;
            for status in host.status() {
                tracing::info!(
                    plugin = %status.name,
                    loaded = status.loaded,
                    error = status.last_error.as_deref().unwrap_or(""),
                    "plugin"
                );
            }
            if watch_config {
                plugins::reload_on_file_change(host.clone(), config_path.clone(), debounce);
            }
            plugins::reload_on_sighup(host.clone(), config_path);
            Some(Arc::new(plugins::PluginPolicies::new(host)))
        }
        None => {
            ignore_sighup();
            None
        }
    };
    let pool_policy = policies.clone().map(|p| p as Arc<dyn PoolPolicy>);
    // Before the manager starts, so that the environments and runners it recovers are recorded.
    let influx = influx::Influx::start(&config.influxdb)?;
    if let Some(influx) = &influx {
        poseidon_core::monitoring::set_sink(Box::new(influx.clone()));
    }
    let manager = Manager::start(backend, pool_policy).await?;
    if let Some(metrics) = &metrics {
        metrics.set_manager(manager.clone());
    }
    if let Some(influx) = &influx {
        influx.spawn_periodic(
            manager.clone(),
            Duration::from_secs(config.influxdb.periodseconds),
        );
    }
    // Only the local backend's sandboxes run as host uids of their own.
    let sandbox_uids = local
        .is_some()
        .then(|| config.local.uidbase..config.local.uidbase.saturating_add(config.local.uidcount));
    let version = release_name(&config);
    let listeners = listeners(&config).await?;
    let address = listeners[0].local_addr()?;
    let state = AppState {
        manager: manager.clone(),
        settings: Arc::new(ApiSettings {
            token: config.server.token.clone(),
            tls: config.server.tls.active,
            prewarming_pool_threshold: config.server.alert.prewarmingpoolthreshold,
            max_body_bytes: config.server.maxrequestbodybytes,
            version,
            sandbox_uids,
            listen_address: Some(address),
            sentry,
        }),
        policies: match policies {
            Some(p) => p as Arc<dyn Policies>,
            None => Arc::new(NoPolicies),
        },
    };
    tracing::info!(%address, backend = manager.backend_name(), "serving the Poseidon API");
    let scheme = if config.server.tls.active {
        "https"
    } else {
        "http"
    };
    println!("poseidon listening on {scheme}://{address}");
    let extra = metrics
        .as_ref()
        .map(metrics::Metrics::router)
        .unwrap_or_default();
    let mut router = poseidon_api::router_with(state, extra);
    if let Some(influx) = influx {
        router = router.layer(axum::middleware::from_fn_with_state(
            influx,
            influx::measure,
        ));
    }
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let rustls = if config.server.tls.active {
        let tls = tls::server_config(&config.server.tls.certfile, &config.server.tls.keyfile)?;
        Some(axum_server::tls_rustls::RustlsConfig::from_config(
            Arc::new(tls),
        ))
    } else {
        None
    };
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let app = app.clone();
        if let Some(rustls) = &rustls {
            let server =
                axum_server::from_tcp_rustls(listener, rustls.clone())?.handle(handle.clone());
            servers.spawn(async move { server.serve(app).await });
        } else {
            let server = axum_server::from_tcp(listener)?.handle(handle.clone());
            servers.spawn(async move { server.serve(app).await });
        }
    }
    systemd::ready();
    systemd::spawn_watchdog(address, config.server.tls.active);
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        Some(result) = servers.join_next() => {
            systemd::stopping();
            handle.shutdown();
            release(&manager, local.as_deref()).await;
            return match result {
                Ok(Ok(())) => Err("the server stopped".into()),
                Ok(Err(e)) => Err(format!("the server stopped: {e}").into()),
                Err(e) => Err(format!("the server stopped: {e}").into()),
            };
        }
    }
    systemd::stopping();
    // No new connections; requests in flight get up to the grace period (WebSocket sessions,
    // like Poseidon's hijacked connections, are not waited for beyond it).
    handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests were still open when the grace period ended");
    }
    release(&manager, local.as_deref()).await;
    tracing::info!("stopped");
    Ok(())
}

/// The listening sockets: those systemd passed, or one bound to `server.address:server.port`.
async fn listeners(config: &Config) -> Result<Vec<std::net::TcpListener>, String> {
    if config.server.systemdsocketactivation {
        return systemd::passed_listeners();
    }
    let listener =
        tokio::net::TcpListener::bind((config.server.address.as_str(), config.server.port))
            .await
            .map_err(|e| {
                format!(
                    "cannot listen on {}:{}: {e}",
                    config.server.address, config.server.port
                )
            })?;
    listener
        .into_std()
        .map(|l| vec![l])
        .map_err(|e| format!("cannot listen: {e}"))
}

/// Runners outlive the process on both backends, so that a restart (a deploy) does not end any
/// learner's session: the next process recovers them (local: from the state directory; Nomad:
/// from the jobs).
async fn release(_manager: &Manager, local: Option<&LocalBackend>) {
    if let Some(local) = local {
        local.release();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");
    let mut int = signal(SignalKind::interrupt()).expect("cannot listen for SIGINT");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
