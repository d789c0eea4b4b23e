//! `poseidon`: the gateway server.
//!
//! `poseidon [--config PATH]` starts the server with the backend the configuration names (the
//! local bubblewrap backend by default).

#![forbid(unsafe_code)]

mod config;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use config::Config;
use poseidon_api::{ApiSettings, AppState, NoPolicies};
use poseidon_core::Manager;

/// How long a graceful shutdown waits for open requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

fn usage() -> ! {
    eprintln!("usage: poseidon [--config PATH]");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
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
    if let Err(e) = runtime.block_on(serve(config)) {
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

async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    if config.nomad.enabled {
        return Err("nomad.enabled: the Nomad backend is not part of this build yet".into());
    }
    let backend = poseidon_local::LocalBackend::new(config.local.clone()).await?;
    let keep_runners_on_exit = false;
    let manager = Manager::start(Arc::new(backend), None).await?;
    let version = if config.sentry.release.is_empty() {
        env!("CARGO_PKG_VERSION").to_string()
    } else {
        config.sentry.release.clone()
    };
    let state = AppState {
        manager: manager.clone(),
        settings: Arc::new(ApiSettings {
            token: config.server.token.clone(),
            tls: config.server.tls.active,
            prewarming_pool_threshold: config.server.alert.prewarmingpoolthreshold,
            max_body_bytes: config.server.maxrequestbodybytes,
            version,
        }),
        policies: Arc::new(NoPolicies),
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
    tracing::info!(%address, backend = manager.backend_name(), "serving the Poseidon API");
    println!("poseidon listening on http://{address}");
    let app = poseidon_api::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
    if !keep_runners_on_exit {
        manager.shutdown().await;
    }
    Ok(())
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
