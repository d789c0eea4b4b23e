//! Points of Poseidon's InfluxDB measurements, recorded where things change (an environment
//! stored, a runner joining or leaving a pool, an execution stored or consumed, a Nomad event
//! seen) and handed to whatever [`Sink`] the binary installed — a facade like the `metrics`
//! crate's, so that the crates recording points do not know where they go. Without a sink
//! (no `influxdb.url`) recording costs one atomic load and builds nothing.

use std::sync::OnceLock;

/// A field value: Poseidon writes integers (`count`, durations, lengths) and one string
/// (`payload` of `poseidon_nomad_events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// An integer field.
    Int(i64),
    /// A string field.
    Text(String),
}

/// One point: measurement, tags (empty values are left out by the sink) and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// Measurement name, e.g. `poseidon_used_runners`.
    pub measurement: &'static str,
    /// Tag keys and values.
    pub tags: Vec<(&'static str, String)>,
    /// Field keys and values (at least one).
    pub fields: Vec<(&'static str, Field)>,
}

/// Where points go (the binary's InfluxDB writer). Must not block.
pub trait Sink: Send + Sync {
    /// Queues one point.
    fn point(&self, point: Point);
}

static SINK: OnceLock<Box<dyn Sink>> = OnceLock::new();

/// Installs the process-wide sink; later calls are ignored (the first sink stays).
pub fn set_sink(sink: Box<dyn Sink>) {
    let _ = SINK.set(sink);
}

/// Whether a sink is installed (to skip preparing points nobody receives).
pub fn enabled() -> bool {
    SINK.get().is_some()
}

/// Records the point `build` makes, if a sink is installed (otherwise `build` is not called).
pub fn record(build: impl FnOnce() -> Point) {
    if let Some(sink) = SINK.get() {
        sink.point(build());
    }
}

/// Poseidon's storage points: `id`, `event_type` (`creation`, `deletion`) and the storage's
/// `count` after the change, plus `tags`.
pub fn storage_change(
    measurement: &'static str,
    id: &str,
    created: bool,
    count: usize,
    tags: impl FnOnce() -> Vec<(&'static str, String)>,
) {
    record(|| {
        let mut all = vec![
            ("id", id.to_string()),
            (
                "event_type",
                if created { "creation" } else { "deletion" }.to_string(),
            ),
        ];
        all.extend(tags());
        Point {
            measurement,
            tags: all,
            fields: vec![(
                "count",
                Field::Int(i64::try_from(count).unwrap_or(i64::MAX)),
            )],
        }
    });
}
