//! Prometheus `/metrics`: the `metrics` recorder (counters and histograms the API and the core
//! record as things happen) plus pool gauges read from the manager at scrape time, so that no
//! request pays for them.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use poseidon_core::Manager;

/// Histogram buckets in seconds: from a fast claim (1 ms) to a long execution (5 min).
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets of a plugin call, in seconds: a call takes microseconds (10 µs) up to its
/// timeout (`callTimeoutMs`, 500 ms by default); with [`BUCKETS`] all would fall in one.
const PLUGIN_CALL_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.000075, 0.0001, 0.00015, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The per-environment gauges.
const GAUGES: &[&str] = &[
    "poseidon_idle_runners",
    "poseidon_used_runners",
    "poseidon_starting_runners",
    "poseidon_pool_target",
    "poseidon_prewarming_pool_size",
];

/// The installed recorder and what the scrape reads.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    manager: Arc<std::sync::OnceLock<Manager>>,
    /// Environments reported by the last scrape (a removed one is reported as empty).
    reported: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Metrics {
    /// Installs the process-wide recorder. Call once, before anything records.
    pub fn install() -> Result<Self, String> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .map_err(|e| format!("metrics: {e}"))?
            // A full name is matched before a suffix.
            .set_buckets_for_metric(
                Matcher::Full(poseidon_plugin_host::CALL_DURATION_METRIC.into()),
                PLUGIN_CALL_BUCKETS,
            )
            .map_err(|e| format!("metrics: {e}"))?
            .install_recorder()
            .map_err(|e| format!("metrics: {e}"))?;
        let upkeep = handle.clone();
        // Histograms are drained into their buckets by upkeep; without it they grow unbounded.
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            })
            .map_err(|e| format!("metrics: {e}"))?;
        metrics::describe_counter!(
            "poseidon_http_requests_total",
            "Requests by route, method and status"
        );
        metrics::describe_histogram!(
            "poseidon_http_request_duration_seconds",
            metrics::Unit::Seconds,
            "Request duration by route and method (a WebSocket request ends at the upgrade)"
        );
        metrics::describe_counter!("poseidon_runner_claims_total", "Runners claimed");
        metrics::describe_counter!(
            "poseidon_empty_pool_misses_total",
            "Claims that found no idle runner"
        );
        metrics::describe_counter!(
            "poseidon_executions_total",
            "Executions by outcome (exit, oom, timeout, error, disconnected)"
        );
        metrics::describe_histogram!(
            "poseidon_execution_duration_seconds",
            metrics::Unit::Seconds,
            "Execution duration by outcome"
        );
        metrics::describe_histogram!(
            "poseidon_runner_start_duration_seconds",
            metrics::Unit::Seconds,
            "Time to start a runner, by outcome"
        );
        metrics::describe_counter!(
            "poseidon_file_bytes_copied_total",
            metrics::Unit::Bytes,
            "Bytes copied into runners"
        );
        metrics::describe_counter!(
            "poseidon_file_bytes_downloaded_total",
            metrics::Unit::Bytes,
            "Bytes downloaded from runners"
        );
        metrics::describe_counter!(
            "poseidon_server_errors_total",
            "5xx answers by Poseidon error code"
        );
        Ok(Self {
            handle,
            manager: Arc::new(std::sync::OnceLock::new()),
            reported: Arc::default(),
        })
    }

    /// Gives the scrape the manager whose pools it reports.
    pub fn set_manager(&self, manager: Manager) {
        let _ = self.manager.set(manager);
    }

    /// The `/metrics` route and the status page built on it (`/status`).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/metrics", get(scrape))
            .route("/status", get(status_page))
            .with_state(self.clone())
    }

    /// The exposition text: pool gauges as of now plus everything recorded.
    pub fn render(&self) -> String {
        if let Some(manager) = self.manager.get() {
            let stats = manager.statistics();
            metrics::gauge!("poseidon_environments").set(stats.len() as f64);
            let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            let now: std::collections::BTreeSet<String> =
                stats.iter().map(|s| s.id.to_string()).collect();
            for gone in reported.difference(&now) {
                for name in GAUGES {
                    metrics::gauge!(*name, "environment" => gone.clone()).set(0.0);
                }
            }
            *reported = now;
            for s in stats {
                let env = s.id.to_string();
                metrics::gauge!("poseidon_idle_runners", "environment" => env.clone())
                    .set(s.idle_runners);
                metrics::gauge!("poseidon_used_runners", "environment" => env.clone())
                    .set(s.used_runners);
                metrics::gauge!("poseidon_starting_runners", "environment" => env.clone())
                    .set(s.starting_runners);
                metrics::gauge!("poseidon_pool_target", "environment" => env.clone()).set(s.target);
                metrics::gauge!("poseidon_prewarming_pool_size", "environment" => env)
                    .set(s.prewarming_pool_size);
            }
        }
        self.handle.render()
    }
}

async fn scrape(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
}

/// A page for people: pools over time, executions per minute, runner start times, plugin health.
/// Self-contained (inline script and SVG, no build step, nothing fetched from elsewhere); it reads
/// `/metrics` from the browser and keeps the history itself.
const STATUS_PAGE: &str = include_str!("status.html");

async fn status_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        STATUS_PAGE,
    )
}
