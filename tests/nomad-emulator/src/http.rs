//! HTTP routes of the Nomad API subset (nomad-api.md §1, §2).

use crate::error::ApiError;
use crate::jobspec;
use crate::json::{now_ns, parse_go_duration};
use crate::state::{job_event, Batch, Namespace, Shared};
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, MethodRouter};
use axum::Router;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Shared state handle used by all handlers.
pub type St = State<Arc<Shared>>;

/// Parsed query string (repeatable keys kept in order).
#[derive(Debug, Default, Clone)]
pub struct Query(pub Vec<(String, String)>);

impl Query {
    /// Parses a raw query string.
    pub fn parse(raw: &Option<String>) -> Self {
        Query(
            raw.as_deref()
                .map(|r| form_urlencoded::parse(r.as_bytes()).into_owned().collect())
                .unwrap_or_default(),
        )
    }
    /// First value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// All values of `key`.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    /// Whether `key` is present.
    pub fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }
    /// `?namespace=`, default `default`.
    pub fn namespace(&self) -> String {
        self.get("namespace")
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string()
    }
    /// A Go `strconv.ParseBool` flag; absent → `default`.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(default),
            Some("") => Ok(true),
            Some(v) => parse_bool(v).ok_or_else(|| {
                ApiError::internal(format!(
                    "Failed to parse value of {key:?} ({v}) as a bool: strconv.ParseBool: parsing {v:?}: invalid syntax"
                ))
            }),
        }
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A JSON response with Nomad's read headers.
pub fn json_resp(index: u64, v: &Value, pretty: bool) -> Response {
    let body = if pretty {
        serde_json::to_vec_pretty(v)
    } else {
        serde_json::to_vec(v)
    }
    .unwrap_or_default();
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("X-Nomad-Index", HeaderValue::from(index));
    h.insert("X-Nomad-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Nomad-LastContact", HeaderValue::from_static("0"));
    r
}

fn write_resp(index: u64, v: &Value) -> Response {
    let mut r = Response::new(Body::from(serde_json::to_vec(v).unwrap_or_default()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert("X-Nomad-Index", HeaderValue::from(index));
    r
}

/// Blocking query support: waits until the global index exceeds `?index=` or `?wait=` expires.
pub async fn block(shared: &Shared, q: &Query) -> Result<(), ApiError> {
    let Some(idx) = q.get("index") else {
        return Ok(());
    };
    let idx: u64 = idx
        .parse()
        .map_err(|_| ApiError::bad_request("Invalid index"))?;
    let wait = match q.get("wait") {
        None => Duration::from_secs(300),
        Some(w) => Duration::from_nanos(
            parse_go_duration(w)
                .ok_or_else(|| ApiError::bad_request("Invalid wait time"))?
                .max(0) as u64,
        )
        .min(Duration::from_secs(300)),
    };
    if idx == 0 {
        return Ok(());
    }
    let mut rx = shared.index_watch.subscribe();
    let _ = tokio::time::timeout(wait, rx.wait_for(|i| *i > idx)).await;
    Ok(())
}

fn region_check(q: &Query) -> Result<(), ApiError> {
    match q.get("region") {
        Some(r) if !r.is_empty() && r != "global" => Err(ApiError::internal("No path to region")),
        _ => Ok(()),
    }
}

async fn invalid_method() -> Response {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Invalid method").into_response()
}

fn m(r: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    r.fallback(invalid_method)
}

/// Applies the `delay` fault to `/v1` requests.
async fn delay_layer(State(shared): St, req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/v1/") {
        let d = {
            let mut f = shared.faults();
            let d = f.delay;
            if !d.is_zero() {
                match f.delay_count {
                    Some(0) => Duration::ZERO,
                    Some(n) => {
                        f.delay_count = Some(n - 1);
                        d
                    }
                    None => d,
                }
            } else {
                d
            }
        };
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
    next.run(req).await
}

/// Builds the complete router.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/jobs", m(get(list_jobs).put(register).post(register)))
        .route(
            "/v1/jobs/parse",
            m(axum::routing::put(parse_job).post(parse_job)),
        )
        .route(
            "/v1/job/{id}",
            m(get(read_job)
                .put(register_id)
                .post(register_id)
                .delete(deregister)),
        )
        .route("/v1/job/{id}/allocations", m(get(job_allocs)))
        .route("/v1/job/{id}/evaluations", m(get(job_evals)))
        .route("/v1/allocations", m(get(list_allocs)))
        .route("/v1/allocation/{id}", m(get(read_alloc)))
        .route(
            "/v1/allocation/{id}/stop",
            m(axum::routing::put(stop_alloc).post(stop_alloc)),
        )
        .route("/v1/evaluations", m(get(list_evals)))
        .route("/v1/evaluation/{id}", m(get(read_eval)))
        .route("/v1/nodes", m(get(list_nodes)))
        .route("/v1/node/{id}", m(get(read_node)))
        .route("/v1/namespaces", m(get(list_namespaces)))
        .route(
            "/v1/namespace",
            m(axum::routing::put(upsert_namespace_body).post(upsert_namespace_body)),
        )
        .route(
            "/v1/namespace/{name}",
            m(get(read_namespace)
                .put(upsert_namespace)
                .post(upsert_namespace)
                .delete(delete_namespace)),
        )
        .route("/v1/agent/self", m(get(agent_self)))
        .route("/v1/agent/health", m(get(agent_health)))
        .route("/v1/agent/members", m(get(agent_members)))
        .route("/v1/status/leader", m(get(status_leader)))
        .route("/v1/status/peers", m(get(status_peers)))
        .route(
            "/v1/operator/scheduler/configuration",
            m(get(read_sched).put(write_sched).post(write_sched)),
        )
        .route("/v1/event/stream", m(get(crate::stream::handler)))
        .route("/v1/client/allocation/{id}/exec", any(crate::exec::handler))
        .merge(crate::faults::router())
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            delay_layer,
        ))
        .with_state(shared)
}

// ---------------------------------------------------------------------------------------
// Jobs

fn job_summary(shared: &crate::state::Inner, job: &Value) -> Value {
    let ns = job["Namespace"].as_str().unwrap_or("");
    let id = job["ID"].as_str().unwrap_or("");
    let cidx = job["CreateIndex"].as_u64().unwrap_or(0);
    let mut summary = serde_json::Map::new();
    for g in job["TaskGroups"].as_array().cloned().unwrap_or_default() {
        let gname = g["Name"].as_str().unwrap_or("").to_string();
        let mut c = [0u64; 5]; // starting, running, complete, failed, lost
        for a in shared.allocs.values().filter(|a| {
            a.namespace == ns
                && a.job_id == id
                && a.task_group == gname
                && a.job_create_index == cidx
        }) {
            match a.client_status.as_str() {
                "pending" => c[0] += 1,
                "running" => c[1] += 1,
                "complete" => c[2] += 1,
                "failed" => c[3] += 1,
                "lost" => c[4] += 1,
                _ => {}
            }
        }
        summary.insert(
            gname,
            json!({"Queued":0,"Complete":c[2],"Failed":c[3],"Running":c[1],"Starting":c[0],"Lost":c[4],"Unknown":0}),
        );
    }
    json!({"JobID": id, "Namespace": ns, "Summary": summary,
           "Children": {"Pending":0,"Running":0,"Dead":0},
           "CreateIndex": job["CreateIndex"], "ModifyIndex": job["ModifyIndex"]})
}

async fn list_jobs(State(shared): St, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    region_check(&q)?;
    block(&shared, &q).await?;
    let ns = q.namespace();
    let prefix = q.get("prefix").unwrap_or("").to_string();
    let with_meta = q.flag("meta", false)?;
    let inner = shared.lock();
    let list: Vec<Value> = inner
        .jobs
        .iter()
        .filter(|((jns, id), _)| (ns == "*" || *jns == ns) && id.starts_with(&prefix))
        .map(|(_, j)| {
            let v = &j.value;
            let mut stub = json!({
                "ID": v["ID"], "ParentID": v["ParentID"], "Name": v["Name"], "Namespace": v["Namespace"],
                "Datacenters": v["Datacenters"], "NodePool": v["NodePool"], "Multiregion": v["Multiregion"],
                "Type": v["Type"], "Priority": v["Priority"], "Periodic": !v["Periodic"].is_null(),
                "ParameterizedJob": !v["ParameterizedJob"].is_null(), "Stop": v["Stop"],
                "Status": v["Status"], "StatusDescription": v["StatusDescription"],
                "JobSummary": job_summary(&inner, v),
                "CreateIndex": v["CreateIndex"], "ModifyIndex": v["ModifyIndex"],
                "JobModifyIndex": v["JobModifyIndex"], "SubmitTime": v["SubmitTime"],
            });
            if with_meta {
                stub["Meta"] = v["Meta"].clone();
            }
            stub
        })
        .collect();
    Ok(json_resp(
        inner.table("jobs"),
        &Value::Array(list),
        q.has("pretty"),
    ))
}

async fn read_job(
    State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    region_check(&q)?;
    block(&shared, &q).await?;
    let inner = shared.lock();
    let job = inner
        .jobs
        .get(&(q.namespace(), id))
        .ok_or_else(|| ApiError::not_found("job not found"))?;
    Ok(json_resp(job.modify_index(), &job.value, q.has("pretty")))
}

async fn parse_job(body: Bytes) -> Result<Response, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("Request body is empty"));
    }
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "HCL parsing is not supported by the Nomad emulator; submit JSON jobs",
    ))
}

async fn register(
    State(shared): St,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    do_register(&shared, &Query::parse(&raw), None, &body)
}

async fn register_id(
    State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    do_register(&shared, &Query::parse(&raw), Some(id), &body)
}

fn do_register(
    shared: &Arc<Shared>,
    q: &Query,
    path_id: Option<String>,
    body: &[u8],
) -> Result<Response, ApiError> {
    region_check(q)?;
    let req = jobspec::decode_register(body)?;
    let mut job = req.job;
    let id = job["ID"].as_str().unwrap_or("").to_string();
    if let Some(p) = path_id {
        if p != id {
            return Err(ApiError::bad_request("Job ID does not match name"));
        }
    }
    let ns = q
        .get("namespace")
        .filter(|s| !s.is_empty())
        .map(String::from)
        .or(req.namespace)
        .or_else(|| {
            job["Namespace"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(String::from)
        })
        .unwrap_or_else(|| "default".into());
    job["Namespace"] = Value::from(ns.clone());
    let oversub = shared.lock().sched.value["MemoryOversubscriptionEnabled"]
        .as_bool()
        .unwrap_or(false);
    let warnings = jobspec::validate(&job, oversub)?;
    let (eval_id, index, jmi) = {
        let mut inner = shared.lock();
        if !inner.namespaces.contains_key(&ns) {
            return Err(ApiError::internal(crate::json::multierror(&[format!(
                "job {id:?} is in nonexistent namespace {ns:?}"
            )])));
        }
        if inner.sched.value["RejectJobRegistration"]
            .as_bool()
            .unwrap_or(false)
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "Job registration, dispatch, and scale are disabled by the scheduler configuration",
            ));
        }
        let key = (ns.clone(), id.clone());
        let existing = inner.jobs.get(&key).cloned();
        if req.enforce_index {
            let cur = existing
                .as_ref()
                .map(|j| j.value["JobModifyIndex"].as_u64().unwrap_or(0));
            let err = match (req.job_modify_index, cur) {
                (0, Some(_)) => Some("Enforcing job modify index 0: job already exists".to_string()),
                (n, None) if n != 0 => Some(format!("Enforcing job modify index {n}: job does not exist")),
                (n, Some(m)) if n != 0 && n != m => Some(format!(
                    "Enforcing job modify index {n}: job exists with conflicting job modify index: {m}"
                )),
                _ => None,
            };
            if let Some(e) = err {
                return Err(ApiError::internal(e));
            }
        }
        let index = inner.next_index();
        let prio = job["Priority"].as_i64().unwrap_or(50);
        let typ = job["Type"].as_str().unwrap_or("service").to_string();
        let identical = existing
            .as_ref()
            .map(|e| jobspec::spec_of(&e.value) == jobspec::spec_of(&job))
            .unwrap_or(false);
        if let (true, Some(e)) = (identical, existing.as_ref()) {
            let jmi = e.modify_index();
            let eval = inner.new_eval(&ns, &id, &typ, "job-register", prio, jmi, index);
            let mut events = vec![eval.event("EvaluationUpdated", index)];
            inner.refresh_job_status(&ns, &id, "EvaluationUpdated", index, &mut events);
            shared.publish(&mut inner, Batch { index, events });
            shared.announce(&inner);
            (eval.id, index, jmi)
        } else {
            let (version, create_index) = match &existing {
                Some(e) => (e.version() + 1, e.create_index()),
                None => (0, index),
            };
            job["Version"] = Value::from(version);
            job["CreateIndex"] = Value::from(create_index);
            job["ModifyIndex"] = Value::from(index);
            job["JobModifyIndex"] = Value::from(index);
            job["SubmitTime"] = Value::from(now_ns());
            job["Status"] = Value::from(
                existing
                    .as_ref()
                    .map(|e| e.status().to_string())
                    .unwrap_or_else(|| "pending".into()),
            );
            inner.jobs.insert(key, crate::state::JobRec { value: job });
            let eval = inner.new_eval(&ns, &id, &typ, "job-register", prio, index, index);
            let status = inner.compute_job_status(&ns, &id);
            let jr = inner.jobs.get_mut(&(ns.clone(), id.clone())).unwrap();
            jr.value["Status"] = Value::from(status);
            let jv = jr.value.clone();
            inner.touch("jobs", index);
            shared.publish(
                &mut inner,
                Batch {
                    index,
                    events: vec![job_event(&jv, "JobRegistered", index, false)],
                },
            );
            shared.publish(
                &mut inner,
                Batch {
                    index,
                    events: vec![eval.event("JobRegistered", index)],
                },
            );
            shared.announce(&inner);
            (eval.id, index, index)
        }
    };
    crate::scheduler::spawn_eval(shared.clone(), eval_id.clone());
    Ok(write_resp(
        index,
        &json!({"EvalID": eval_id, "EvalCreateIndex": index, "JobModifyIndex": jmi,
                "Warnings": jobspec::render_warnings(&warnings), "Index": index,
                "LastContact": 0, "KnownLeader": false, "NextToken": ""}),
    ))
}

async fn deregister(
    State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    region_check(&q)?;
    let purge = q.flag("purge", false)?;
    q.flag("global", false)?;
    let ns = q.namespace();
    let result = {
        let mut inner = shared.lock();
        let key = (ns.clone(), id.clone());
        match inner.jobs.get(&key).cloned() {
            None => None,
            Some(job) => {
                let index = inner.next_index();
                let mut jv = job.value.clone();
                let job_line = if purge {
                    inner.jobs.remove(&key);
                    job_event(&jv, "JobDeregistered", index, true)
                } else {
                    if !job.stopped() {
                        jv["Version"] = Value::from(job.version() + 1);
                    }
                    jv["Stop"] = Value::Bool(true);
                    jv["ModifyIndex"] = Value::from(index);
                    jv["JobModifyIndex"] = Value::from(index);
                    jv["SubmitTime"] = Value::from(now_ns());
                    inner
                        .jobs
                        .insert(key, crate::state::JobRec { value: jv.clone() });
                    job_event(&jv, "JobDeregistered", index, false)
                };
                let prio = jv["Priority"].as_i64().unwrap_or(50);
                let eval =
                    inner.new_eval(&ns, &id, "service", "job-deregister", prio, index, index);
                inner.touch("jobs", index);
                shared.publish(
                    &mut inner,
                    Batch {
                        index,
                        events: vec![job_line],
                    },
                );
                shared.publish(
                    &mut inner,
                    Batch {
                        index,
                        events: vec![eval.event("JobDeregistered", index)],
                    },
                );
                shared.announce(&inner);
                Some((eval.id, index))
            }
        }
    };
    let (eval_id, index) = match result {
        Some((e, i)) => {
            crate::scheduler::spawn_eval(shared.clone(), e.clone());
            (e, i)
        }
        None => (String::new(), 0),
    };
    Ok(write_resp(
        index,
        &json!({"EvalID": eval_id, "EvalCreateIndex": index, "JobModifyIndex": index,
                "VolumeEvalID": "", "VolumeEvalIndex": 0, "Index": index, "LastContact": 0,
                "KnownLeader": false, "NextToken": ""}),
    ))
}

async fn job_allocs(
    State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    region_check(&q)?;
    block(&shared, &q).await?;
    let ns = q.namespace();
    let all = q.flag("all", false)?;
    let inner = shared.lock();
    let cidx = inner
        .jobs
        .get(&(ns.clone(), id.clone()))
        .map(|j| j.create_index());
    let mut list: Vec<&crate::state::Alloc> = inner
        .allocs
        .values()
        .filter(|a| a.namespace == ns && a.job_id == id)
        .filter(|a| all || Some(a.job_create_index) == cidx)
        .collect();
    list.sort_by_key(|a| std::cmp::Reverse(a.create_index));
    let v: Vec<Value> = list.iter().map(|a| a.stub(true, false)).collect();
    Ok(json_resp(
        inner.table("allocs"),
        &Value::Array(v),
        q.has("pretty"),
    ))
}

async fn job_evals(
    State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    block(&shared, &q).await?;
    let ns = q.namespace();
    let inner = shared.lock();
    let v: Vec<Value> = inner
        .evals
        .values()
        .filter(|e| e.namespace == ns && e.job_id == id)
        .map(|e| e.to_json())
        .collect();
    Ok(json_resp(
        inner.table("evals"),
        &Value::Array(v),
        q.has("pretty"),
    ))
}

// ---------------------------------------------------------------------------------------
// Allocations and evaluations

async fn list_allocs(State(shared): St, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    region_check(&q)?;
    block(&shared, &q).await?;
    let ns = q.namespace();
    let prefix = q.get("prefix").unwrap_or("").to_string();
    let resources = q.flag("resources", false)?;
    let task_states = q.flag("task_states", true)?;
    let inner = shared.lock();
    let v: Vec<Value> = inner
        .allocs
        .values()
        .filter(|a| (ns == "*" || a.namespace == ns) && a.id.starts_with(&prefix))
        .map(|a| a.stub(task_states, resources))
        .collect();
    Ok(json_resp(
        inner.table("allocs"),
        &Value::Array(v),
        q.has("pretty"),
    ))
}

/// Nomad looks allocations and evaluations up by UUID: an id that is not 36 characters long is a
/// 500 naming the index error, not a 404 (seen on Nomad 2.0).
fn uuid_check(id: &str, what: &str) -> Result<(), ApiError> {
    if id.len() == 36 {
        Ok(())
    } else {
        Err(ApiError::internal(format!(
            "{what}: index error: UUID must be 36 characters"
        )))
    }
}

async fn read_alloc(
    State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    region_check(&q)?;
    uuid_check(&id, "alloc lookup failed")?;
    block(&shared, &q).await?;
    let inner = shared.lock();
    let a = inner
        .allocs
        .get(&id)
        .ok_or_else(|| ApiError::not_found("alloc not found"))?;
    Ok(json_resp(a.modify_index, &a.to_json(true), q.has("pretty")))
}

async fn stop_alloc(
    State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    let (eval_id, index) = {
        let mut inner = shared.lock();
        let a = inner
            .allocs
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("alloc not found"))?;
        let _ = q;
        let index = inner.next_index();
        let typ = a.job["Type"].as_str().unwrap_or("batch").to_string();
        let prio = a.job["Priority"].as_i64().unwrap_or(50);
        let eval = inner.new_eval(&a.namespace, &a.job_id, &typ, "alloc-stop", prio, 0, index);
        let alloc = inner.allocs.get_mut(&id).unwrap();
        alloc.desired_status = "stop".into();
        alloc.desired_description = "alloc is being migrated".into();
        alloc.modify_index = index;
        alloc.alloc_modify_index = index;
        alloc.modify_time = now_ns();
        let ev = alloc.event("AllocationUpdateDesiredStatus", index);
        let events = vec![ev, eval.event("AllocationUpdateDesiredStatus", index)];
        inner.touch("allocs", index);
        shared.publish(&mut inner, Batch { index, events });
        shared.announce(&inner);
        (eval.id, index)
    };
    crate::client::send(&shared, &id, crate::state::TaskCmd::Stop);
    crate::scheduler::spawn_eval(shared.clone(), eval_id.clone());
    Ok(write_resp(
        index,
        &json!({"EvalID": eval_id, "Index": index}),
    ))
}

async fn list_evals(State(shared): St, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    block(&shared, &q).await?;
    let ns = q.namespace();
    let prefix = q.get("prefix").unwrap_or("").to_string();
    let inner = shared.lock();
    let v: Vec<Value> = inner
        .evals
        .values()
        .filter(|e| (ns == "*" || e.namespace == ns) && e.id.starts_with(&prefix))
        .map(|e| e.to_json())
        .collect();
    Ok(json_resp(
        inner.table("evals"),
        &Value::Array(v),
        q.has("pretty"),
    ))
}

async fn read_eval(
    State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    uuid_check(&id, "failed to lookup eval: eval lookup failed")?;
    block(&shared, &q).await?;
    let inner = shared.lock();
    let e = inner
        .evals
        .get(&id)
        .ok_or_else(|| ApiError::not_found("eval not found"))?;
    let mut v = e.to_json();
    if q.flag("related", false)? {
        let related: Vec<Value> = inner
            .evals
            .values()
            .filter(|o| o.job_id == e.job_id && o.id != e.id && (o.previous_eval == e.id || e.previous_eval == o.id))
            .map(|o| json!({"ID": o.id, "Namespace": o.namespace, "JobID": o.job_id, "Status": o.status,
                             "TriggeredBy": o.triggered_by, "CreateIndex": o.create_index, "ModifyIndex": o.modify_index}))
            .collect();
        if !related.is_empty() {
            v["RelatedEvals"] = Value::Array(related);
        }
    }
    Ok(json_resp(e.modify_index, &v, q.has("pretty")))
}

// ---------------------------------------------------------------------------------------
// Nodes, namespaces, agent, scheduler configuration

async fn list_nodes(State(shared): St, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    block(&shared, &q).await?;
    let inner = shared.lock();
    let v: Vec<Value> = inner.nodes.iter().map(|n| n.stub(shared.addr)).collect();
    Ok(json_resp(
        inner.table("nodes"),
        &Value::Array(v),
        q.has("pretty"),
    ))
}

async fn read_node(
    State(shared): St,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    block(&shared, &q).await?;
    let inner = shared.lock();
    let n = inner
        .nodes
        .iter()
        .find(|n| n.id == id)
        .ok_or_else(|| ApiError::not_found("node not found"))?;
    Ok(json_resp(
        n.modify_index,
        &n.full(shared.addr),
        q.has("pretty"),
    ))
}

async fn list_namespaces(State(shared): St, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    block(&shared, &q).await?;
    let inner = shared.lock();
    let v: Vec<Value> = inner.namespaces.values().map(Namespace::to_json).collect();
    Ok(json_resp(
        inner.table("namespaces"),
        &Value::Array(v),
        q.has("pretty"),
    ))
}

async fn read_namespace(
    State(shared): St,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    let inner = shared.lock();
    let n = inner
        .namespaces
        .get(&name)
        .ok_or_else(|| ApiError::not_found("Namespace not found"))?;
    Ok(json_resp(n.modify_index, &n.to_json(), q.has("pretty")))
}

fn namespace_upsert(
    shared: &Shared,
    path: Option<String>,
    body: &[u8],
) -> Result<Response, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("Request body is empty"));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let obj = v.as_object().cloned().unwrap_or_default();
    let name = crate::json::ci_get(&obj, "Name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let desc = crate::json::ci_get(&obj, "Description")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if let Some(p) = path {
        if p != name {
            return Err(ApiError::bad_request(
                "Namespace name does not match request path",
            ));
        }
    }
    if name.is_empty() {
        return Err(ApiError::internal(crate::json::multierror(&[
            "invalid name \"\". Must match regex ^[a-zA-Z0-9-]{1,128}$".into(),
        ])));
    }
    let mut inner = shared.lock();
    let index = inner.next_index();
    let create = inner
        .namespaces
        .get(&name)
        .map(|n| n.create_index)
        .unwrap_or(index);
    inner.namespaces.insert(
        name.clone(),
        Namespace {
            name,
            description: desc,
            create_index: create,
            modify_index: index,
        },
    );
    inner.touch("namespaces", index);
    shared.announce(&inner);
    let mut r = Response::new(Body::empty());
    r.headers_mut()
        .insert("X-Nomad-Index", HeaderValue::from(index));
    Ok(r)
}

async fn upsert_namespace(
    State(shared): St,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    namespace_upsert(&shared, Some(name), &body)
}

async fn upsert_namespace_body(State(shared): St, body: Bytes) -> Result<Response, ApiError> {
    namespace_upsert(&shared, None, &body)
}

async fn delete_namespace(
    State(shared): St,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let mut inner = shared.lock();
    if name == "default" {
        return Err(ApiError::internal("default namespace can not be deleted"));
    }
    if inner.jobs.keys().any(|(ns, _)| *ns == name) {
        return Err(ApiError::internal(format!(
            "namespace {name:?} has non-terminal jobs in regions: [global]"
        )));
    }
    let index = inner.next_index();
    inner.namespaces.remove(&name);
    inner.touch("namespaces", index);
    shared.announce(&inner);
    let mut r = Response::new(Body::empty());
    r.headers_mut()
        .insert("X-Nomad-Index", HeaderValue::from(index));
    Ok(r)
}

async fn agent_self(State(shared): St) -> Response {
    let addr = shared.addr;
    json_resp(
        0,
        &json!({
            "config": {"Region": "global", "Datacenter": "dc1", "NodeName": "emulator",
                       "Version": {"Version": "1.10.5", "VersionPrerelease": "", "VersionMetadata": "emulator"},
                       "ACL": {"Enabled": false}, "Server": {"Enabled": true}, "Client": {"Enabled": true}},
            "member": {"Name": "emulator.global", "Addr": addr.ip().to_string(), "Port": 4648,
                       "Tags": {"region": "global", "dc": "dc1", "build": "1.10.5"}, "Status": "alive"},
            "stats": {"nomad": {"leader": "true", "server": "true"}},
        }),
        false,
    )
}

async fn agent_health() -> Response {
    json_resp(
        0,
        &json!({"client":{"ok":true,"message":"ok"},"server":{"ok":true,"message":"ok"}}),
        false,
    )
}

async fn agent_members(State(shared): St) -> Response {
    json_resp(
        0,
        &json!({"ServerName":"emulator","ServerRegion":"global","ServerDC":"dc1",
                "Members":[{"Name":"emulator.global","Addr":shared.addr.ip().to_string(),"Port":4648,"Status":"alive",
                            "Tags":{"region":"global","dc":"dc1"}}]}),
        false,
    )
}

async fn status_leader(State(shared): St) -> Response {
    json_resp(0, &json!(format!("{}:4647", shared.addr.ip())), false)
}

async fn status_peers(State(shared): St) -> Response {
    json_resp(0, &json!([format!("{}:4647", shared.addr.ip())]), false)
}

async fn read_sched(State(shared): St) -> Response {
    let inner = shared.lock();
    let c = inner.sched.value.clone();
    let idx = c["ModifyIndex"].as_u64().unwrap_or(1);
    json_resp(
        idx,
        &json!({"SchedulerConfig": c, "Index": idx, "LastContact": 0, "KnownLeader": true, "NextToken": ""}),
        false,
    )
}

async fn write_sched(
    State(shared): St,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let q = Query::parse(&raw);
    if body.is_empty() {
        return Err(ApiError::bad_request("Request body is empty"));
    }
    let v: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let obj = v.as_object().cloned().unwrap_or_default();
    let get = |k: &str| crate::json::ci_get(&obj, k).cloned();
    let alg = get("SchedulerAlgorithm")
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    if !alg.is_empty() && alg != "binpack" && alg != "spread" {
        return Err(ApiError::bad_request(format!(
            "invalid scheduler algorithm: {alg}"
        )));
    }
    let mut inner = shared.lock();
    if let Some(cas) = q.get("cas") {
        let cas: u64 = cas
            .parse()
            .map_err(|_| ApiError::bad_request("Invalid cas index"))?;
        if cas != inner.sched.value["ModifyIndex"].as_u64().unwrap_or(0) {
            let idx = inner.index;
            return Ok(write_resp(idx, &json!({"Updated": false, "Index": idx})));
        }
    }
    let index = inner.next_index();
    let create = inner.sched.value["CreateIndex"].clone();
    let b = |k: &str| get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let pc = get("PreemptionConfig")
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let pb = |k: &str| {
        crate::json::ci_get(&pc, k)
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    inner.sched.value = json!({
        "SchedulerAlgorithm": if alg.is_empty() { "binpack".to_string() } else { alg },
        "PreemptionConfig": {"SystemSchedulerEnabled": pb("SystemSchedulerEnabled"),
            "SysBatchSchedulerEnabled": pb("SysBatchSchedulerEnabled"),
            "BatchSchedulerEnabled": pb("BatchSchedulerEnabled"),
            "ServiceSchedulerEnabled": pb("ServiceSchedulerEnabled")},
        "MemoryOversubscriptionEnabled": b("MemoryOversubscriptionEnabled"),
        "RejectJobRegistration": b("RejectJobRegistration"),
        "PauseEvalBroker": b("PauseEvalBroker"),
        "NodeLimitForFeasibilityChecks": get("NodeLimitForFeasibilityChecks").and_then(|v| v.as_i64()).unwrap_or(0),
        "CreateIndex": create, "ModifyIndex": index,
    });
    shared.announce(&inner);
    Ok(write_resp(index, &json!({"Updated": true, "Index": index})))
}
