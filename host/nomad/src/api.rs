//! A small Nomad HTTP client (nomad-api.md §1–§2): every response field is optional.

use poseidon_core::BackendError;
use serde_json::{json, Value};
use std::time::Duration;

use crate::config::NomadConfig;

/// Longest wait between stopping a job and purging it ([`NomadClient::retire`]).
pub const RETIRE_WAIT: Duration = Duration::from_secs(60);
/// How long [`NomadClient::retire_eventually`] keeps trying.
pub const RETIRE_RETRY_WINDOW: Duration = Duration::from_secs(600);

/// Errors talking to Nomad.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NomadError {
    /// No connection could be made (refused, timed out, DNS).
    #[error("Nomad is unreachable: {0}")]
    Unreachable(String),
    /// Nomad answered with a non-2xx status (Go client wording).
    #[error("Unexpected response code: {status} ({body})")]
    Status {
        /// HTTP status.
        status: u16,
        /// Plain-text body.
        body: String,
    },
    /// The answer could not be decoded.
    #[error("invalid answer from Nomad: {0}")]
    Decode(String),
    /// An evaluation failed or could not place all allocations.
    #[error("evaluation {0}")]
    Evaluation(String),
}

impl NomadError {
    /// Whether this is a 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, NomadError::Status { status: 404, .. })
    }

    /// Whether a job the request named does not exist (any more): a 404, or the 500 Nomad
    /// answers to deregistering a job purged already ("DeleteJob failed: job not found").
    pub fn is_job_gone(&self) -> bool {
        match self {
            NomadError::Status { status: 404, .. } => true,
            NomadError::Status { status: 500, body } => body.contains("job not found"),
            _ => false,
        }
    }
}

impl From<NomadError> for BackendError {
    fn from(e: NomadError) -> Self {
        match e {
            NomadError::Unreachable(m) => BackendError::Unreachable(m),
            other => BackendError::Internal(other.to_string()),
        }
    }
}

fn classify(e: reqwest::Error) -> NomadError {
    if e.is_connect() || e.is_timeout() {
        NomadError::Unreachable(e.to_string())
    } else if e.is_decode() {
        NomadError::Decode(e.to_string())
    } else {
        NomadError::Unreachable(e.to_string())
    }
}

/// Client for one Nomad agent and namespace.
#[derive(Debug, Clone)]
pub struct NomadClient {
    http: reqwest::Client,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    base: String,
    token: String,
    namespace: String,
}

impl NomadClient {
    /// Builds a client (HTTPS with the configured CA and client certificate when `nomad.tls.active`).
    pub fn new(config: &NomadConfig) -> Result<Self, NomadError> {
        let tls = if config.tls.active {
            Some(crate::tls::client_config(&config.tls)?)
        } else {
            None
        };
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(tls) = &tls {
            builder = builder.use_preconfigured_tls((**tls).clone());
        }
        let http = builder
            .build()
            .map_err(|e| NomadError::Unreachable(e.to_string()))?;
        Ok(NomadClient {
            http,
            tls,
            base: config.base_url(),
            token: config.token.clone(),
            namespace: config.namespace.clone(),
        })
    }

    /// Base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Turns an HCL job specification into Nomad's JSON (`POST /v1/jobs/parse`).
    pub async fn parse_hcl(&self, hcl: &str) -> Result<Value, NomadError> {
        let response = self
            .http
            .post(format!("{}/v1/jobs/parse", self.base))
            .header("X-Nomad-Token", &self.token)
            .json(&json!({"JobHCL": hcl, "Canonicalize": true}))
            .send()
            .await
            .map_err(|e| NomadError::Unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let body = response.text().await.unwrap_or_default();
            return Err(NomadError::Status { status, body });
        }
        response
            .json()
            .await
            .map_err(|e| NomadError::Decode(e.to_string()))
    }

    /// TLS client configuration, when `nomad.tls.active`.
    pub fn tls(&self) -> Option<std::sync::Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// Namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// ACL token.
    pub fn token(&self) -> &str {
        &self.token
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .query(&[("namespace", self.namespace.as_str())]);
        if !self.token.is_empty() {
            r = r.header("X-Nomad-Token", &self.token);
        }
        r
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<(Value, u64), NomadError> {
        let resp = match r.send().await {
            Ok(resp) => resp,
            Err(e) => {
                metrics::counter!("poseidon_nomad_requests_total", "status" => "error")
                    .increment(1);
                return Err(classify(e));
            }
        };
        let status = resp.status().as_u16();
        let class = match status {
            200..=299 => "2xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        metrics::counter!("poseidon_nomad_requests_total", "status" => class).increment(1);
        let index = resp
            .headers()
            .get("X-Nomad-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = resp.bytes().await.map_err(classify)?;
        if !(200..300).contains(&status) {
            return Err(NomadError::Status {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        if body.is_empty() {
            return Ok((Value::Null, index));
        }
        let v = serde_json::from_slice(&body).map_err(|e| NomadError::Decode(e.to_string()))?;
        Ok((v, index))
    }

    /// `GET /v1/jobs?prefix=`.
    pub async fn list_jobs(&self, prefix: &str) -> Result<Vec<Value>, NomadError> {
        let (v, _) = self
            .send(
                self.req(reqwest::Method::GET, "/v1/jobs")
                    .query(&[("prefix", prefix)]),
            )
            .await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// `GET /v1/job/<id>`; `None` on 404.
    pub async fn job(&self, id: &str) -> Result<Option<Value>, NomadError> {
        match self
            .send(self.req(reqwest::Method::GET, &format!("/v1/job/{id}")))
            .await
        {
            Ok((v, _)) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT /v1/jobs`; returns the evaluation id.
    pub async fn register(&self, job: &Value) -> Result<String, NomadError> {
        let (v, _) = self
            .send(
                self.req(reqwest::Method::PUT, "/v1/jobs")
                    .json(&json!({ "Job": job })),
            )
            .await?;
        Ok(v["EvalID"].as_str().unwrap_or("").to_string())
    }

    /// `DELETE /v1/job/<id>?purge=`.
    pub async fn deregister(&self, id: &str, purge: bool) -> Result<(), NomadError> {
        self.send(
            self.req(reqwest::Method::DELETE, &format!("/v1/job/{id}"))
                .query(&[("purge", if purge { "true" } else { "false" })]),
        )
        .await
        .map(|_| ())
    }

    /// Removes a job without racing Nomad: stops it (its allocations are killed the ordinary
    /// way), then purges it in the background once no allocation of it is running any more, at
    /// most [`RETIRE_WAIT`] later. Purging at once can leave a container behind that Docker was
    /// still creating: the client forgets the allocation while the driver starts it.
    pub async fn retire(&self, id: &str) -> Result<(), NomadError> {
        self.deregister(id, false).await?;
        let client = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + RETIRE_WAIT;
            let mut index = 0;
            while tokio::time::Instant::now() < deadline {
                let block = (index > 0).then_some((index, Duration::from_secs(5)));
                match client.job_allocations(&id, block).await {
                    Ok((allocs, idx)) => {
                        let live = allocs.iter().any(|a| {
                            !matches!(
                                a["ClientStatus"].as_str(),
                                Some("complete" | "failed" | "lost")
                            )
                        });
                        if !live {
                            break;
                        }
                        index = idx.max(1);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            match client.deregister(&id, true).await {
                // Retired twice (an environment's removal, then its runners' destruction):
                // the other purge came first.
                Err(e) if e.is_job_gone() => {
                    tracing::debug!(job = %id, "a stopped job was purged already")
                }
                Err(e) => tracing::warn!(job = %id, error = %e, "could not purge a stopped job"),
                Ok(()) => {}
            }
        });
        Ok(())
    }

    /// [`NomadClient::retire`] from the background, tried again (1 s, doubling to 30 s) while
    /// Nomad cannot be reached, for up to [`RETIRE_RETRY_WINDOW`]: a job the gateway gave up must
    /// not outlive a Nomad outage (a runner whose start failed because Nomad went away, a lost
    /// runner, a destroy during a restart of Nomad).
    pub fn retire_eventually(&self, id: &str) {
        let client = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + RETIRE_RETRY_WINDOW;
            let mut delay = Duration::from_secs(1);
            loop {
                match client.retire(&id).await {
                    Ok(()) => return,
                    Err(e) if e.is_not_found() => return,
                    Err(e) if tokio::time::Instant::now() + delay >= deadline => {
                        tracing::warn!(job = %id, error = %e, "gave up removing a runner job");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(job = %id, error = %e, "removing a runner job failed; trying again")
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        });
    }

    /// `GET /v1/job/<id>/allocations` (newest first), optionally as a blocking query.
    pub async fn job_allocations(
        &self,
        id: &str,
        block: Option<(u64, Duration)>,
    ) -> Result<(Vec<Value>, u64), NomadError> {
        let mut r = self.req(reqwest::Method::GET, &format!("/v1/job/{id}/allocations"));
        if let Some((index, wait)) = block {
            r = r.query(&[
                ("index", index.to_string()),
                ("wait", format!("{}ms", wait.as_millis())),
            ]);
        }
        let (v, index) = self.send(r).await?;
        let mut list = v.as_array().cloned().unwrap_or_default();
        list.sort_by_key(|a| std::cmp::Reverse(a["CreateIndex"].as_u64().unwrap_or(0)));
        Ok((list, index))
    }

    /// `GET /v1/allocations` with the table index.
    pub async fn allocations(&self) -> Result<(Vec<Value>, u64), NomadError> {
        let (v, index) = self
            .send(self.req(reqwest::Method::GET, "/v1/allocations"))
            .await?;
        Ok((v.as_array().cloned().unwrap_or_default(), index))
    }

    /// `GET /v1/allocation/<id>`.
    pub async fn allocation(&self, id: &str) -> Result<Value, NomadError> {
        self.send(self.req(reqwest::Method::GET, &format!("/v1/allocation/{id}")))
            .await
            .map(|(v, _)| v)
    }

    /// `GET /v1/evaluation/<id>` as a blocking query.
    pub async fn evaluation(
        &self,
        id: &str,
        block: Option<(u64, Duration)>,
    ) -> Result<(Value, u64), NomadError> {
        let mut r = self.req(reqwest::Method::GET, &format!("/v1/evaluation/{id}"));
        if let Some((index, wait)) = block {
            r = r.query(&[
                ("index", index.to_string()),
                ("wait", format!("{}ms", wait.as_millis())),
            ]);
        }
        self.send(r).await
    }

    /// Opens the event stream (`index` inclusive) for Job, Evaluation and Allocation topics.
    pub async fn event_stream(&self, index: u64) -> Result<reqwest::Response, NomadError> {
        let mut r = self
            .http
            .get(format!("{}/v1/event/stream", self.base))
            .query(&[
                ("index", index.to_string()),
                ("namespace", self.namespace.clone()),
                ("topic", "Evaluation:*".into()),
                ("topic", "Allocation:*".into()),
                ("topic", "Job:*".into()),
            ]);
        if !self.token.is_empty() {
            r = r.header("X-Nomad-Token", &self.token);
        }
        let resp = r.send().await.map_err(classify)?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            return Err(NomadError::Status { status, body });
        }
        Ok(resp)
    }

    /// Waits until the evaluation is terminal; errors when it failed or left groups unplaced.
    pub async fn wait_evaluation(&self, id: &str, timeout: Duration) -> Result<(), NomadError> {
        if id.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut index = 0;
        for _ in 0..1000 {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                // Like Poseidon: a slow placement is not an error.
                return Ok(());
            }
            let (eval, idx) = self.evaluation(id, Some((index, left))).await?;
            index = idx;
            match eval["Status"].as_str().unwrap_or("") {
                "complete" => {
                    let failed = eval["FailedTGAllocs"].as_object().filter(|m| !m.is_empty());
                    return match failed {
                        None => Ok(()),
                        Some(groups) => Err(NomadError::Evaluation(format!(
                            "{id} could not place {}{}",
                            groups
                                .iter()
                                .map(|(g, metric)| format!(
                                    "{g} ({})",
                                    crate::reasons::placement_failure(metric)
                                ))
                                .collect::<Vec<_>>()
                                .join(", "),
                            eval["BlockedEval"]
                                .as_str()
                                .map(|b| format!(" (blocked evaluation {b})"))
                                .unwrap_or_default()
                        ))),
                    };
                }
                "failed" | "canceled" => {
                    return Err(NomadError::Evaluation(format!(
                        "{id} ended with status {}: {}",
                        eval["Status"].as_str().unwrap_or(""),
                        eval["StatusDescription"].as_str().unwrap_or("")
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::NomadError;

    #[test]
    fn a_job_purged_already_is_gone_and_other_failures_are_not() {
        let status = |status, body: &str| NomadError::Status {
            status,
            body: body.to_string(),
        };
        assert!(status(404, "").is_job_gone());
        assert!(status(500, "DeleteJob failed: job not found").is_job_gone());
        assert!(!status(500, "rpc error: No cluster leader").is_job_gone());
        assert!(!NomadError::Unreachable("refused".into()).is_job_gone());
    }
}
