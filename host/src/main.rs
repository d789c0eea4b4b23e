//! `poseidon`: the gateway server.
//!
//! `poseidon [--config PATH]` starts the server with the backend the configuration names (the
//! local bubblewrap backend by default) and the policy plugins of its `plugins:` section.
//! `poseidon plugin check FILE` checks a plugin file the way the server would load it.

#![forbid(unsafe_code)]

mod config;
mod plugin_cli;
mod plugins;
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
use poseidon_nomad::{NomadBackend, NomadConfig};
use poseidon_plugin_host::PluginHost;

/// How long a graceful shutdown waits for open requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

fn usage() -> ! {
    eprintln!("usage: poseidon [--config PATH]\n{}", plugin_cli::USAGE);
    std::process::exit(2);
}

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some("plugin") {
        std::process::exit(plugin_cli::run(all.get(1..).unwrap_or_default()));
    }
    let mut args = all.into_iter();
    let mut config_path: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-config" | "-c" => {
                config_path = Some(args.next().unwrap_or_else(|| usage()).into())
            }
            "--help" | "-h" => usage(),
            "--version" => {
                println!("poseidon {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}");
                usage();
            }
        }
    }
    let config = match Config::load(config_path.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("poseidon: {e}");
            std::process::exit(2);
        }
    };
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    if let Err(e) = runtime.block_on(serve(config, config_path)) {
        tracing::error!("{e}");
        eprintln!("poseidon: {e}");
        std::process::exit(1);
    }
}

fn init_logging(config: &Config) {
    let level = match config.logger.level.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSEIDON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config
        .logger
        .formatter
        .eq_ignore_ascii_case("JSONFormatter")
    {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

async fn serve(
    config: Config,
    config_path: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let (backend, local): (Arc<dyn Backend>, Option<Arc<LocalBackend>>) = if config.nomad.enabled {
        let mut nomad = NomadConfig::from_yaml(&config.nomad.rest)
            .map_err(|e| format!("invalid configuration: {e}"))?;
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
        Some(plugin_config) => {
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
            plugins::reload_on_sighup(host.clone(), config_path);
            Some(Arc::new(plugins::PluginPolicies::new(host)))
        }
        None => None,
    };
    let pool_policy = policies.clone().map(|p| p as Arc<dyn PoolPolicy>);
    let manager = Manager::start(backend, pool_policy).await?;
    // Only the local backend's sandboxes run as host uids of their own.
    let sandbox_uids = local
        .is_some()
        .then(|| config.local.uidbase..config.local.uidbase.saturating_add(config.local.uidcount));
    let version = if config.sentry.release.is_empty() {
        env!("CARGO_PKG_VERSION").to_string()
    } else {
        config.sentry.release.clone()
    };
    let listener =
        tokio::net::TcpListener::bind((config.server.address.as_str(), config.server.port))
            .await
            .map_err(|e| {
                format!(
                    "cannot listen on {}:{}: {e}",
                    config.server.address, config.server.port
                )
            })?;
    let address = listener.local_addr()?;
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
    let app = poseidon_api::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let std_listener = listener.into_std()?;
    let server = if config.server.tls.active {
        let tls = tls::server_config(&config.server.tls.certfile, &config.server.tls.keyfile)?;
        let rustls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls));
        let server = axum_server::from_tcp_rustls(std_listener, rustls)?.handle(handle.clone());
        tokio::spawn(async move { server.serve(app).await })
    } else {
        let server = axum_server::from_tcp(std_listener)?.handle(handle.clone());
        tokio::spawn(async move { server.serve(app).await })
    };
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        result = server => {
            release(&manager, local.as_deref()).await;
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("the server stopped: {e}").into()),
                Err(e) => Err(format!("the server stopped: {e}").into()),
            };
        }
    }
    handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
    release(&manager, local.as_deref()).await;
    Ok(())
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
