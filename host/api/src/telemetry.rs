//! What operators see of requests: one log line per request (tower-http's trace layer, with the
//! route, the runner and the environment), a JSON 500 instead of a dropped connection when a
//! handler panics, and Prometheus figures through the `metrics` facade (the binary installs the
//! recorder; without one every figure is a no-op).

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{Response, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use tracing::field::Empty;
use tracing::Span;

use crate::error::ApiError;

/// Routes polled by machines; their lines are logged at debug level only.
fn is_polled(path: &str) -> bool {
    path == "/api/v1/health" || path == "/metrics"
}

/// The runner and environment a path names (`/runners/{id}...`, `/execution-environments/{id}`);
/// runner ids start with their environment's id (`<env>-<uuid>`).
fn ids(path: &str) -> (Option<&str>, Option<&str>) {
    let mut segments = path.trim_start_matches("/api/v1/").split('/');
    match (segments.next(), segments.next()) {
        (Some("runners"), Some(runner)) if !runner.is_empty() => {
            let environment = runner.split_once('-').map(|(e, _)| e);
            (Some(runner), environment)
        }
        (Some("execution-environments"), Some(env)) if !env.is_empty() => (None, Some(env)),
        _ => (None, None),
    }
}

/// The runner and environment a request was about, as a response extension (for the server's
/// own measurements, e.g. Poseidon's InfluxDB points).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestSubject {
    /// The runner's id, if the request concerned one.
    pub runner_id: Option<String>,
    /// The environment's id, if known.
    pub environment_id: Option<String>,
}

tokio::task_local! {
    /// The subject of the request being handled (set from the path, refined by handlers).
    static SUBJECT: std::cell::RefCell<RequestSubject>;
}

/// Records the runner (and its environment) a request turned out to be about, e.g. a claim's
/// new runner, into the request's log line, its Sentry scope and its [`RequestSubject`].
pub(crate) fn record_runner(runner: &str, environment: u64) {
    let span = Span::current();
    span.record("runner_id", runner);
    span.record("environment_id", environment);
    let _ = SUBJECT.try_with(|s| {
        let mut s = s.borrow_mut();
        s.runner_id = Some(runner.to_string());
        s.environment_id = Some(environment.to_string());
    });
    tag_sentry_scope(Some(runner), Some(&environment.to_string()));
}

/// Records the environment a request is about when only its body names it (a claim).
pub(crate) fn record_environment(environment: u64) {
    Span::current().record("environment_id", environment);
    let _ = SUBJECT.try_with(|s| s.borrow_mut().environment_id = Some(environment.to_string()));
    tag_sentry_scope(None, Some(&environment.to_string()));
}

/// Tags the request's Sentry scope (a no-op without a Sentry client), as Poseidon tags its events.
fn tag_sentry_scope(runner: Option<&str>, environment: Option<&str>) {
    sentry_core::configure_scope(|scope| {
        if let Some(runner) = runner {
            scope.set_tag("runner_id", runner);
        }
        if let Some(environment) = environment {
            scope.set_tag("environment_id", environment);
        }
    });
}

fn make_span(request: &axum::http::Request<axum::body::Body>) -> Span {
    let path = request.uri().path();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
        .unwrap_or("unmatched");
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        runner_id = Empty,
        environment_id = Empty,
    );
    let (runner, environment) = ids(path);
    tag_sentry_scope(runner, environment);
    if let Some(runner) = runner {
        span.record("runner_id", runner);
    }
    if let Some(environment) = environment {
        span.record("environment_id", environment);
    }
    span
}

fn on_response<B>(response: &Response<B>, latency: Duration, span: &Span) {
    let status = response.status().as_u16();
    let duration_ms = latency.as_secs_f64() * 1000.0;
    // The span (method, route, ids) is the line's context; polled routes only at debug level.
    if response.extensions().get::<Polled>().is_some() {
        tracing::debug!(parent: span, status, duration_ms, "request");
    } else {
        tracing::info!(parent: span, status, duration_ms, "request");
    }
}

/// Marks the response of a polled route (health checks, scrapes) for the log level.
#[derive(Clone, Copy)]
struct Polled;

/// The method as a metric label: one of HTTP's standard methods, or `OTHER` — a client may send
/// any token as a method, and each would become a series of its own.
fn method_label(method: &axum::http::Method) -> &'static str {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    STANDARD
        .into_iter()
        .find(|m| *m == method.as_str())
        .unwrap_or("OTHER")
}

/// Counts the request by route, method and status and records its duration.
async fn measure(request: Request, next: Next) -> axum::response::Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = method_label(request.method()).to_string();
    let (runner, environment) = ids(request.uri().path());
    let subject = RequestSubject {
        runner_id: runner.map(str::to_string),
        environment_id: environment.map(str::to_string),
    };
    let (mut response, subject) = SUBJECT
        .scope(std::cell::RefCell::new(subject), async move {
            let response = next.run(request).await;
            (response, SUBJECT.with(|s| s.take()))
        })
        .await;
    response.extensions_mut().insert(subject);
    let status = response.status().as_u16().to_string();
    metrics::counter!("poseidon_http_requests_total",
        "route" => route.clone(), "method" => method.clone(), "status" => status)
    .increment(1);
    metrics::histogram!("poseidon_http_request_duration_seconds",
        "route" => route.clone(), "method" => method)
    .record(started.elapsed());
    if is_polled(&route) {
        response.extensions_mut().insert(Polled);
    }
    response
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic");
    metrics::counter!("poseidon_panics_total").increment(1);
    ApiError::internal(format!("internal error: {what}")).into_response()
}

/// Wraps every route: panics become logged 500s, each request is measured and logged once; with
/// `sentry`, each request gets its own Sentry hub and transaction.
pub(crate) fn layers(router: Router, sentry: bool) -> Router {
    let router = router
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn(measure))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(make_span)
                .on_request(|_: &axum::http::Request<_>, span: &Span| {
                    tracing::debug!(parent: span, "request started");
                })
                .on_response(on_response)
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        );
    if !sentry {
        return router;
    }
    // Outermost, so that the span's tags go to the request's own hub.
    router
        .layer(sentry_tower::SentryHttpLayer::new().enable_transaction())
        .layer(sentry_tower::NewSentryLayer::<Request>::new_from_top())
}

/// Logs a server error with its cause (every 5xx the API answers passes here).
pub(crate) fn log_server_error(status: StatusCode, code: Option<&str>, message: &str) {
    metrics::counter!("poseidon_server_errors_total", "code" => code.unwrap_or("").to_string())
        .increment(1);
    tracing::error!(
        status = status.as_u16(),
        error_code = code.unwrap_or(""),
        cause = message,
        "server error"
    );
}

#[cfg(test)]
mod tests {
    use super::ids;

    #[test]
    fn paths_name_their_runner_and_environment() {
        assert_eq!(
            ids("/api/v1/runners/12-abc/files"),
            (Some("12-abc"), Some("12"))
        );
        assert_eq!(ids("/api/v1/execution-environments/7"), (None, Some("7")));
        assert_eq!(ids("/api/v1/runners"), (None, None));
        assert_eq!(ids("/api/v1/health"), (None, None));
    }
}
