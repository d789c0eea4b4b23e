//! Sentry, when `sentry.dsn` is set: warnings and errors become events (info lines become
//! breadcrumbs), panics are reported, and each API request has its own scope tagged with
//! `runner_id` and `environment_id` (set by the API's telemetry layer), as Poseidon does.

use crate::config::SentryConfig;

/// Starts the Sentry client; `None` without a DSN. Keep the guard for the process's lifetime
/// (dropping it flushes queued events).
pub fn init(
    config: &SentryConfig,
    release: &str,
) -> Result<Option<sentry::ClientInitGuard>, String> {
    if config.dsn.is_empty() {
        return Ok(None);
    }
    let dsn = config
        .dsn
        .parse::<sentry::types::Dsn>()
        .map_err(|e| format!("invalid configuration at `sentry.dsn`: {e}"))?;
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string().into());
    let options = sentry::ClientOptions {
        dsn: Some(dsn),
        release: Some(release.to_string().into()),
        environment: non_empty(&config.environment),
        server_name: non_empty(&config.servername),
        debug: config.debug,
        sample_rate: config.samplerate as f32,
        traces_sample_rate: if config.enabletracing {
            config.tracessamplerate as f32
        } else {
            0.0
        },
        attach_stacktrace: config.attachstacktrace,
        max_breadcrumbs: config.maxbreadcrumbs,
        send_default_pii: config.senddefaultpii,
        before_send: Some(std::sync::Arc::new(|mut event| {
            scrub_credentials(&mut event);
            Some(event)
        })),
        ..Default::default()
    };
    Ok(Some(sentry::init(options)))
}

/// The tracing layer that turns log lines into Sentry events and breadcrumbs.
pub fn layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use sentry::integrations::tracing::EventFilter;
    sentry::integrations::tracing::layer().event_filter(|metadata| match *metadata.level() {
        tracing::Level::ERROR | tracing::Level::WARN => EventFilter::Event,
        tracing::Level::INFO => EventFilter::Breadcrumb,
        _ => EventFilter::Ignore,
    })
}

/// Headers that carry credentials: never sent to Sentry.
const SECRET_HEADERS: &[&str] = &["poseidon-token", "authorization", "cookie", "x-nomad-token"];

fn scrub_credentials(event: &mut sentry::protocol::Event<'static>) {
    if let Some(request) = event.request.as_mut() {
        request
            .headers
            .retain(|name, _| !SECRET_HEADERS.contains(&name.to_ascii_lowercase().as_str()));
    }
}
