//! Fault controls for tests under `/_emulator/` (not part of Nomad's API).
//!
//! | Route | Effect |
//! |---|---|
//! | `POST /_emulator/stream/cut` | ends every open event stream (EOF) |
//! | `POST /_emulator/allocation/<id>/restart[?task=&exit_code=1]` | task process killed, reported as exit `exit_code`; restart policy applies |
//! | `POST /_emulator/allocation/<id>/oom[?task=]` | task OOM-killed (`Terminated` with `oom_killed=true`, exit 137); restart policy applies |
//! | `POST /_emulator/allocation/<id>/exit?code=N[&task=]` | task exits with N (0 = batch task completes) |
//! | `POST /_emulator/allocation/<id>/lose-node` | the allocation's node goes down (lost + replacement) |
//! | `POST /_emulator/node/<id>/lose`, `POST /_emulator/node/<id>/up` | node down / back up |
//! | `POST /_emulator/refuse?seconds=S` | closes the listener: connections are refused for S seconds; open streams (event streams, exec sessions: their processes run on) are cut |
//! | `POST /_emulator/delay?ms=N[&count=K]` | delays the next K (default: all) `/v1` requests by N ms; `ms=0` clears |
//! | `POST /_emulator/events/duplicate?count=N` | the next N live event lines are sent twice |
//! | `POST /_emulator/events/reorder?count=N` | each of the next N live lines is held back and sent after its successor (or after 1 s) |
//! | `POST /_emulator/reset` | clears delay/duplicate/reorder settings |
//! | `GET /_emulator/state` | summary: index, nodes, allocations with their process groups |

use crate::http::{Query, St};
use crate::state::{Shared, TaskCmd};
use axum::extract::{Path, RawQuery};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Routes of the fault-control API.
pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_emulator/stream/cut", post(cut))
        .route("/_emulator/allocation/{id}/restart", post(restart))
        .route("/_emulator/allocation/{id}/oom", post(oom))
        .route("/_emulator/allocation/{id}/exit", post(exit))
        .route(
            "/_emulator/allocation/{id}/lose-node",
            post(lose_alloc_node),
        )
        .route("/_emulator/node/{id}/lose", post(lose_node))
        .route("/_emulator/node/{id}/up", post(node_up))
        .route("/_emulator/refuse", post(refuse))
        .route("/_emulator/delay", post(delay))
        .route("/_emulator/events/duplicate", post(duplicate))
        .route("/_emulator/events/reorder", post(reorder))
        .route("/_emulator/reset", post(reset))
        .route("/_emulator/state", get(state))
}

fn num<T: std::str::FromStr>(q: &Query, key: &str, default: T) -> Result<T, Box<Response>> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            Box::new((StatusCode::BAD_REQUEST, format!("invalid {key}")).into_response())
        }),
    }
}

fn kill(shared: &Shared, id: &str, q: &Query, cmd: TaskCmd) -> Response {
    if crate::client::send_to_task(shared, id, q.get("task"), cmd) {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::NOT_FOUND, "allocation has no running task").into_response()
    }
}

/// Cuts every open event stream.
pub fn cut_streams(shared: &Shared) {
    shared.stream_cut.send_modify(|g| *g += 1);
}

async fn cut(axum::extract::State(shared): St) -> StatusCode {
    cut_streams(&shared);
    StatusCode::OK
}

async fn restart(
    axum::extract::State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = Query::parse(&raw);
    let code = match num(&q, "exit_code", 1i64) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    kill(
        &shared,
        &id,
        &q,
        TaskCmd::Kill {
            exit_code: code,
            signal: 0,
            oom: false,
        },
    )
}

async fn oom(
    axum::extract::State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = Query::parse(&raw);
    kill(
        &shared,
        &id,
        &q,
        TaskCmd::Kill {
            exit_code: 137,
            signal: 0,
            oom: true,
        },
    )
}

async fn exit(
    axum::extract::State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = Query::parse(&raw);
    let code = match num(&q, "code", 0i64) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    kill(
        &shared,
        &id,
        &q,
        TaskCmd::Kill {
            exit_code: code,
            signal: 0,
            oom: false,
        },
    )
}

async fn lose_alloc_node(axum::extract::State(shared): St, Path(id): Path<String>) -> Response {
    let node = shared.lock().allocs.get(&id).map(|a| a.node_id.clone());
    match node {
        Some(n) if crate::scheduler::lose_node(&shared, &n) => {
            Json(json!({"NodeID": n})).into_response()
        }
        _ => (StatusCode::NOT_FOUND, "alloc not found").into_response(),
    }
}

async fn lose_node(axum::extract::State(shared): St, Path(id): Path<String>) -> Response {
    if crate::scheduler::lose_node(&shared, &id) {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::NOT_FOUND, "node not found").into_response()
    }
}

async fn node_up(axum::extract::State(shared): St, Path(id): Path<String>) -> Response {
    if crate::scheduler::restore_node(&shared, &id) {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::NOT_FOUND, "node not found").into_response()
    }
}

/// Refuses connections for `d` (closes the listening socket, cuts streams).
pub fn refuse_for(shared: &Shared, d: Duration) {
    shared.faults().refuse_until = Some(Instant::now() + d);
    cut_streams(shared);
    shared.outage.send_modify(|generation| *generation += 1);
    shared.refuse.notify_one();
}

async fn refuse(axum::extract::State(shared): St, RawQuery(raw): RawQuery) -> Response {
    let q = Query::parse(&raw);
    let secs = match num(&q, "seconds", 1.0f64) {
        Ok(s) if (0.0..=3600.0).contains(&s) => s,
        Ok(_) => return (StatusCode::BAD_REQUEST, "invalid seconds").into_response(),
        Err(r) => return *r,
    };
    refuse_for(&shared, Duration::from_secs_f64(secs));
    StatusCode::OK.into_response()
}

async fn delay(axum::extract::State(shared): St, RawQuery(raw): RawQuery) -> Response {
    let q = Query::parse(&raw);
    let ms = match num(&q, "ms", 0u64) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let count = match q.get("count") {
        None => None,
        Some(c) => match c.parse::<u64>() {
            Ok(c) => Some(c),
            Err(_) => return (StatusCode::BAD_REQUEST, "invalid count").into_response(),
        },
    };
    let mut f = shared.faults();
    f.delay = Duration::from_millis(ms);
    f.delay_count = count;
    StatusCode::OK.into_response()
}

async fn duplicate(axum::extract::State(shared): St, RawQuery(raw): RawQuery) -> Response {
    let q = Query::parse(&raw);
    match num(&q, "count", 1u64) {
        Ok(c) => {
            shared.faults().duplicate = c;
            StatusCode::OK.into_response()
        }
        Err(r) => *r,
    }
}

async fn reorder(axum::extract::State(shared): St, RawQuery(raw): RawQuery) -> Response {
    let q = Query::parse(&raw);
    let c = match num(&q, "count", 1u64) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    shared.faults().reorder = c;
    // Release a held batch that has no successor within a second.
    let s = shared.clone();
    tokio::spawn(async move {
        let mut last: Option<u64> = None;
        for _ in 0..3600 {
            tokio::select! {
                _ = s.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let (held, pending) = {
                let f = s.faults();
                (f.held.as_ref().map(|b| b.index), f.reorder)
            };
            if held.is_some() && held == last {
                s.flush_held();
            }
            if held.is_none() && pending == 0 {
                return;
            }
            last = held;
        }
    });
    StatusCode::OK.into_response()
}

async fn reset(axum::extract::State(shared): St) -> StatusCode {
    {
        let mut f = shared.faults();
        f.delay = Duration::ZERO;
        f.delay_count = None;
        f.duplicate = 0;
        f.reorder = 0;
    }
    shared.flush_held();
    StatusCode::OK
}

async fn state(axum::extract::State(shared): St) -> Json<serde_json::Value> {
    let inner = shared.lock();
    let allocs: Vec<_> = inner
        .allocs
        .values()
        .map(|a| {
            json!({"ID": a.id, "JobID": a.job_id, "Namespace": a.namespace, "NodeID": a.node_id,
                   "ClientStatus": a.client_status, "DesiredStatus": a.desired_status,
                   "Dir": inner.clients.get(&a.id).map(|c| c.dir.display().to_string())})
        })
        .collect();
    let nodes: Vec<_> = inner
        .nodes
        .iter()
        .map(|n| json!({"ID": n.id, "Name": n.name, "Status": n.status}))
        .collect();
    Json(
        json!({"Index": inner.index, "Nodes": nodes, "Allocations": allocs,
                "ProcessGroups": inner.pgids.iter().collect::<Vec<_>>()}),
    )
}
