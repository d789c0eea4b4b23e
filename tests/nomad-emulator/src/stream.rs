//! `GET /v1/event/stream`: NDJSON lines, `{}` heartbeats, topic/key and namespace filtering,
//! replay from the bounded buffer with Nomad's index rules (nomad-api.md §3).

use crate::error::ApiError;
use crate::http::{Query, St};
use crate::state::{Batch, Event, Shared};
use axum::body::{Body, Bytes};
use axum::extract::RawQuery;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};

/// A parsed subscription.
#[derive(Debug, Clone)]
pub struct Subscription {
    topics: BTreeMap<String, Vec<String>>,
    namespace: String,
    index: u64,
}

impl Subscription {
    /// Parses `topic`, `index` and `namespace` query parameters.
    pub fn parse(q: &Query) -> Result<Self, ApiError> {
        let mut topics: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in q.all("topic") {
            let parts: Vec<&str> = t.split(':').collect();
            let (topic, key) = match parts.as_slice() {
                [topic] => (*topic, "*"),
                [topic, key] => (*topic, *key),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "Invalid topic query: error parsing topics: Invalid key value pair for topic, topic: {t}"
                    )))
                }
            };
            topics
                .entry(topic.to_string())
                .or_default()
                .push(key.to_string());
        }
        if topics.is_empty() {
            topics.insert("*".into(), vec!["*".into()]);
        }
        let index = match q.get("index") {
            None => 0,
            Some(i) => i.parse::<u64>().map_err(|e| {
                ApiError::bad_request(format!(
                    "Unable to parse index: strconv.ParseUint: parsing {i:?}: {e}"
                ))
            })?,
        };
        Ok(Subscription {
            topics,
            namespace: q.namespace(),
            index,
        })
    }

    /// How many times the event matches (a quirk: two matching keys deliver it twice).
    fn matches(&self, e: &Event) -> usize {
        if !(self.namespace == "*" || e.namespace.is_empty() || e.namespace == self.namespace) {
            return 0;
        }
        let keys = match self.topics.get(e.topic).or_else(|| self.topics.get("*")) {
            Some(k) => k,
            None => return 0,
        };
        if keys.len() == 1 && keys[0] == "*" {
            return 1;
        }
        keys.iter()
            .filter(|k| {
                **k == e.key
                    || e.filter_keys
                        .as_ref()
                        .map(|fk| fk.iter().any(|f| f == *k))
                        .unwrap_or(false)
            })
            .count()
    }

    /// Renders a batch as one NDJSON line, or `None` if no event matches.
    fn line(&self, b: &Batch) -> Option<Bytes> {
        let mut events = Vec::new();
        for e in &b.events {
            for _ in 0..self.matches(e) {
                events.push(e.to_json());
            }
        }
        if events.is_empty() {
            return None;
        }
        let mut s = serde_json::to_vec(&json!({"Index": b.index, "Events": Value::Array(events)}))
            .unwrap_or_default();
        s.push(b'\n');
        Some(Bytes::from(s))
    }
}

/// Opens a subscription and returns a channel of NDJSON chunks; the channel closes when the
/// stream ends (cut fault, shutdown, slow reader, client gone).
pub fn open(shared: Arc<Shared>, sub: Subscription) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (replay, mut live) = {
        let inner = shared.lock();
        let live = shared.live.subscribe();
        let buf: Vec<Arc<Batch>> = inner.buffer.iter().cloned().collect();
        let mut replay: Vec<Arc<Batch>> = buf
            .iter()
            .filter(|b| b.index >= sub.index)
            .cloned()
            .collect();
        if replay.is_empty() && sub.index > 0 {
            if let Some(last) = buf.last() {
                replay.push(last.clone());
            }
        }
        (replay, live)
    };
    let mut cut = shared.stream_cut.subscribe();
    cut.mark_unchanged();
    let heartbeat = shared.config.stream_heartbeat;
    tokio::spawn(async move {
        let hb = Bytes::from_static(b"{}\n");
        if tx.send(hb.clone()).await.is_err() {
            return;
        }
        for b in replay {
            if let Some(line) = sub.line(&b) {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        }
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = cut.changed() => return,
                _ = ticker.tick() => {
                    if tx.send(hb.clone()).await.is_err() { return; }
                }
                r = live.recv() => match r {
                    Ok(b) => {
                        if let Some(line) = sub.line(&b) {
                            if tx.send(line).await.is_err() { return; }
                        }
                    }
                    // A slow reader whose items were dropped loses its subscription (as Nomad).
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    rx
}

/// The HTTP handler (chunked framing, like Nomad 1.10).
pub async fn handler(
    axum::extract::State(shared): St,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    let sub = Subscription::parse(&q)?;
    let rx = open(shared, sub);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}
