//! Poseidon's InfluxDB output, when `influxdb.url` is set: the same measurement names, tags and
//! fields (`poseidon_<route>` per request and `poseidon_file_download` from here; the periodic
//! `poseidon_poolsize`, `poseidon_environments`, `poseidon_used_runners`,
//! `poseidon_nomad_idle_runners`, `poseidon_nomad_executions`; the change points the core and
//! the Nomad backend record through `poseidon_core::monitoring`), tag `stage` on every point, written in batches by a background task in InfluxDB's line protocol to the v2
//! write API as Poseidon does (`/api/v2/write`, `Authorization: Token`) or the v1 API (`/write`).
//! A request only formats its line and hands it over without waiting: when the buffer is full
//! the point is dropped and counted, never the request slowed.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use poseidon_api::RequestSubject;
use poseidon_core::monitoring::{Field, Point, Sink};
use poseidon_core::Manager;
use tokio::sync::mpsc;

use crate::config::InfluxConfig;

/// Lines buffered before new points are dropped.
const BUFFER: usize = 100_000;
/// Most lines in one write.
const BATCH: usize = 5_000;
/// Longest time a point waits for its batch.
const FLUSH: Duration = Duration::from_secs(1);
/// Attempts of one batch before it is dropped.
const ATTEMPTS: u32 = 5;

/// The sending side, cheap to clone.
#[derive(Clone)]
pub struct Influx {
    lines: mpsc::Sender<String>,
    stage: String,
}

impl Influx {
    /// Starts the writer and the periodic pool points; `None` without `influxdb.url`.
    pub fn start(config: &InfluxConfig) -> Result<Option<Self>, String> {
        if config.url.is_empty() {
            return Ok(None);
        }
        let base = config.url.trim_end_matches('/');
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("influxdb: {e}"))?;
        let mut request = if config.api == "v1" {
            let mut r = client
                .post(format!("{base}/write"))
                .query(&[("db", config.bucket.as_str()), ("precision", "ns")]);
            if let Some((user, password)) = config.token.split_once(':') {
                r = r.basic_auth(user, Some(password));
            } else if !config.token.is_empty() {
                r = r.header("Authorization", format!("Token {}", config.token));
            }
            r
        } else {
            client.post(format!("{base}/api/v2/write")).query(&[
                ("org", config.organization.as_str()),
                ("bucket", config.bucket.as_str()),
                ("precision", "ns"),
            ])
        };
        if config.api != "v1" && !config.token.is_empty() {
            request = request.header("Authorization", format!("Token {}", config.token));
        }
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(write_batches(rx, request));
        tracing::info!(url = %config.url, api = if config.api == "v1" { "v1" } else { "v2" },
            "writing Poseidon's measurements to InfluxDB");
        Ok(Some(Self {
            lines: tx,
            stage: config.stage.clone(),
        }))
    }

    /// Queues one point with integer fields.
    fn point(&self, measurement: &str, tags: &[(&str, &str)], fields: &[(&str, i64)]) {
        let fields: Vec<(&str, Field)> = fields.iter().map(|(k, v)| (*k, Field::Int(*v))).collect();
        self.line(measurement, tags, &fields);
    }

    /// Queues one point.
    fn line(&self, measurement: &str, tags: &[(&str, &str)], fields: &[(&str, Field)]) {
        let mut line = escape(measurement, ", ");
        let stage = [("stage", self.stage.as_str())];
        for (key, value) in tags.iter().chain(stage.iter()) {
            if !value.is_empty() {
                let _ = write!(line, ",{}={}", escape(key, ", ="), escape(value, ", ="));
            }
        }
        line.push_str(&field_text(fields));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let _ = write!(line, " {now}");
        if self.lines.try_send(line).is_err() {
            metrics::counter!("poseidon_influxdb_points_dropped_total").increment(1);
        }
    }

    /// Every `period`: idle and used runners and the pool size of each environment, the
    /// number of environments, and the stored executions of each claimed runner (Poseidon's
    /// `periodically` points).
    pub fn spawn_periodic(&self, manager: Manager, period: Duration) {
        let influx = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let stats = manager.statistics();
                influx.point(
                    "poseidon_environments",
                    &[("event_type", "periodically")],
                    &[("count", stats.len() as i64)],
                );
                for s in stats {
                    let env = s.id.to_string();
                    let tags = [
                        ("event_type", "periodically"),
                        ("environment_id", env.as_str()),
                    ];
                    influx.point(
                        "poseidon_nomad_idle_runners",
                        &tags,
                        &[("count", i64::from(s.idle_runners))],
                    );
                    influx.point(
                        "poseidon_used_runners",
                        &tags,
                        &[("count", i64::from(s.used_runners))],
                    );
                    influx.point(
                        "poseidon_poolsize",
                        &[("environment_id", env.as_str())],
                        &[("prewarming_pool_size", i64::from(s.prewarming_pool_size))],
                    );
                }
                for (runner, environment, count) in manager.stored_executions() {
                    let environment = environment.to_string();
                    influx.point(
                        "poseidon_nomad_executions",
                        &[
                            ("event_type", "periodically"),
                            ("environment_id", environment.as_str()),
                            ("runner_id", runner.as_str()),
                        ],
                        &[("count", count as i64)],
                    );
                }
            }
        });
    }
}

/// The points the core and the backends record (`poseidon_core::monitoring`): environments,
/// idle and used runners, executions, runner start-ups, Nomad events, jobs and allocations.
impl Sink for Influx {
    fn point(&self, point: Point) {
        let tags: Vec<(&str, &str)> = point.tags.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.line(point.measurement, &tags, &point.fields);
    }
}

/// Poseidon's name of a route (`poseidon_<name>`); `None` for routes Poseidon does not have.
fn route_name(method: &str, route: &str) -> Option<&'static str> {
    Some(match (method, route.trim_start_matches("/api/v1")) {
        ("GET", "/health") => "/health",
        ("GET", "/version") => "/version",
        ("GET", "/statistics/execution-environments") => "/execution-environments",
        ("POST", "/runners") => "provideRunner",
        ("DELETE", "/runners/{runner}") => "deleteRunner",
        ("GET", "/runners/{runner}/files") => "/files_list",
        ("PATCH", "/runners/{runner}/files") => "/files",
        ("GET", "/runners/{runner}/files/raw") => "/files/raw",
        ("POST", "/runners/{runner}/execute") => "/execute",
        ("GET", "/runners/{runner}/websocket") => "/websocket",
        ("GET", "/execution-environments") => "list",
        ("GET", "/execution-environments/{id}") => "get",
        ("PUT", "/execution-environments/{id}") => "createOrUpdate",
        ("DELETE", "/execution-environments/{id}") => "delete",
        _ => return None,
    })
}

/// The per-request measurement, as Poseidon's InfluxDB middleware writes it.
pub async fn measure(State(influx): State<Influx>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let method = request.method().as_str().to_string();
    let request_size = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let response = next.run(request).await;
    let Some(name) = route.as_deref().and_then(|r| route_name(&method, r)) else {
        return response;
    };
    let duration = i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX);
    let subject = response
        .extensions()
        .get::<RequestSubject>()
        .cloned()
        .unwrap_or_default();
    let status = response.status().as_u16().to_string();
    let tags = [
        ("status", status.as_str()),
        ("runner_id", subject.runner_id.as_deref().unwrap_or("")),
        (
            "environment_id",
            subject.environment_id.as_deref().unwrap_or(""),
        ),
    ];
    let mut fields = vec![("duration", duration)];
    if name == "/files" {
        fields.push(("request_size", request_size.unwrap_or(0)));
    }
    influx.point(&format!("poseidon_{name}"), &tags, &fields);
    if name == "/files/raw" && response.status().is_success() {
        let length = response
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        // The body is streamed exactly at its announced length (stat -L), so both agree.
        influx.point(
            "poseidon_file_download",
            &tags[1..],
            &[("expected_length", length), ("actual_length", length)],
        );
    }
    response
}

/// The field set of a line, with its leading space: integers as `key=1i`, text quoted with
/// `"` and `\` escaped.
fn field_text(fields: &[(&str, Field)]) -> String {
    let mut out = String::new();
    for (i, (key, value)) in fields.iter().enumerate() {
        let sep = if i == 0 { ' ' } else { ',' };
        let key = escape(key, ", =");
        let _ = match value {
            Field::Int(value) => write!(out, "{sep}{key}={value}i"),
            Field::Text(text) => write!(out, "{sep}{key}=\"{}\"", escape(text, "\"\\")),
        };
    }
    out
}

/// Line protocol escaping: a backslash before each of `special`.
fn escape(text: &str, special: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if special.contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

async fn write_batches(mut rx: mpsc::Receiver<String>, request: reqwest::RequestBuilder) {
    let mut batch: Vec<String> = Vec::new();
    loop {
        let deadline = tokio::time::sleep(FLUSH);
        tokio::pin!(deadline);
        let closed = loop {
            tokio::select! {
                line = rx.recv() => match line {
                    Some(line) => {
                        batch.push(line);
                        if batch.len() >= BATCH {
                            break false;
                        }
                    }
                    None => break true,
                },
                _ = &mut deadline => break false,
            }
        };
        if !batch.is_empty() {
            send(&request, batch.join("\n")).await;
            batch.clear();
        }
        if closed {
            return;
        }
    }
}

async fn send(request: &reqwest::RequestBuilder, body: String) {
    for attempt in 1..=ATTEMPTS {
        let Some(r) = request.try_clone() else { return };
        match r.body(body.clone()).send().await {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                tracing::warn!(%status, answer = %text, attempt, "InfluxDB refused a write");
                if status.is_client_error() {
                    break; // the same batch would be refused again
                }
            }
            Err(e) => tracing::warn!(error = %e, attempt, "could not write to InfluxDB"),
        }
        tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
    }
    metrics::counter!("poseidon_influxdb_batches_dropped_total").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_escaping_follow_poseidon_and_the_line_protocol() {
        assert_eq!(route_name("POST", "/api/v1/runners"), Some("provideRunner"));
        assert_eq!(
            route_name("GET", "/api/v1/runners/{runner}/files"),
            Some("/files_list")
        );
        assert_eq!(route_name("GET", "/api/v1/plugins"), None);
        assert_eq!(
            field_text(&[("payload", Field::Text(r#"{"a":"b\\c"}"#.into()))]),
            r#" payload="{\"a\":\"b\\\\c\"}""#
        );
        assert_eq!(field_text(&[("count", Field::Int(3))]), " count=3i");
        assert_eq!(escape("a b,c=d", ", ="), "a\\ b\\,c\\=d");
    }
}
