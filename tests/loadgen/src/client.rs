//! A Poseidon API client that speaks to the server the way CodeOcean does: JSON over HTTP with the
//! `Poseidon-Token` header, and the execution WebSocket read to its final message.

use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// How long one HTTP request or WebSocket message may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request could not be sent or its answer not read.
    #[error("{what}: {source}")]
    Http {
        /// The request.
        what: &'static str,
        /// The cause.
        source: reqwest::Error,
    },
    /// The server answered with a status the request does not expect.
    #[error("{what}: status {status}: {body}")]
    Status {
        /// The request.
        what: &'static str,
        /// The HTTP status.
        status: u16,
        /// The response body (shortened).
        body: String,
    },
    /// `POST /runners` found no idle runner (500 with `NOMAD_OVERLOAD`).
    #[error("claim: no idle runner")]
    PoolEmpty,
    /// The answer was not what the API defines.
    #[error("{what}: invalid response: {detail}")]
    Invalid {
        /// The request.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    WebSocket(Box<tokio_tungstenite::tungstenite::Error>),
    /// The execution did not end with `exit` 0 (or without the expected output).
    #[error("execution: {0}")]
    Execution(String),
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for ClientError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Self::WebSocket(Box::new(e))
    }
}

/// One server: its base URL and token.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    /// `Authorization: Bearer …` for a server with an authenticator plugin.
    bearer: Option<String>,
}

/// What an execution's WebSocket delivered.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Concatenated `stdout` messages.
    pub stdout: String,
    /// The exit code of the `exit` message.
    pub exit: Option<i64>,
}

fn short(text: &str) -> String {
    let mut s: String = text.chars().take(200).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

impl Client {
    /// A client for the server at `base` (`http://HOST:PORT`, without `/api/v1`).
    pub fn new(base: &str, token: &str) -> Result<Self, ClientError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if !token.is_empty() {
            let value = token.parse().map_err(|_| ClientError::Invalid {
                what: "token",
                detail: "not a valid header value".into(),
            })?;
            headers.insert("Poseidon-Token", value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|source| ClientError::Http {
                what: "building the HTTP client",
                source,
            })?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            bearer: None,
        })
    }

    /// The same server, with `Authorization: Bearer {bearer}` on every request and WebSocket
    /// (for an authenticator plugin such as `jwt_auth`).
    pub fn with_bearer(base: &str, token: &str, bearer: &str) -> Result<Self, ClientError> {
        let authorization: reqwest::header::HeaderValue = format!("Bearer {bearer}")
            .parse()
            .map_err(|_| ClientError::Invalid {
                what: "bearer token",
                detail: "not a valid header value".into(),
            })?;
        let mut headers = reqwest::header::HeaderMap::new();
        if !token.is_empty() {
            let value = token.parse().map_err(|_| ClientError::Invalid {
                what: "token",
                detail: "not a valid header value".into(),
            })?;
            headers.insert("Poseidon-Token", value);
        }
        headers.insert(reqwest::header::AUTHORIZATION, authorization);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|source| ClientError::Http {
                what: "building the HTTP client",
                source,
            })?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            bearer: Some(bearer.to_string()),
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn send(
        &self,
        what: &'static str,
        request: reqwest::RequestBuilder,
        expected: &[u16],
    ) -> Result<reqwest::Response, ClientError> {
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Http { what, source })?;
        let status = response.status().as_u16();
        if expected.contains(&status) {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        if status == 500 && body.contains("NOMAD_OVERLOAD") {
            return Err(ClientError::PoolEmpty);
        }
        Err(ClientError::Status {
            what,
            status,
            body: short(&body),
        })
    }

    async fn json(what: &'static str, response: reqwest::Response) -> Result<Value, ClientError> {
        response
            .json()
            .await
            .map_err(|source| ClientError::Http { what, source })
    }

    /// `GET /version`: the cheapest authenticated-free round trip, the HTTP floor.
    pub async fn version(&self) -> Result<String, ClientError> {
        let r = self
            .send("GET /version", self.http.get(self.url("/version")), &[200])
            .await?;
        r.text().await.map_err(|source| ClientError::Http {
            what: "GET /version",
            source,
        })
    }

    /// `PUT /execution-environments/{id}` with the given pool size (creates or updates).
    pub async fn put_environment(
        &self,
        id: u64,
        pool: u32,
        image: &str,
    ) -> Result<(), ClientError> {
        let body = json!({
            "id": id, "image": image, "prewarmingPoolSize": pool, "cpuLimit": 100,
            "memoryLimit": 0, "networkAccess": false, "exposedPorts": []
        });
        self.send(
            "PUT /execution-environments",
            self.http
                .put(self.url(&format!("/execution-environments/{id}")))
                .json(&body),
            &[201, 204],
        )
        .await?;
        Ok(())
    }

    /// `DELETE /execution-environments/{id}` (a missing environment is fine).
    pub async fn delete_environment(&self, id: u64) -> Result<(), ClientError> {
        self.send(
            "DELETE /execution-environments",
            self.http
                .delete(self.url(&format!("/execution-environments/{id}"))),
            &[204, 404],
        )
        .await?;
        Ok(())
    }

    /// Idle runners of the environment, from `GET /statistics/execution-environments`.
    pub async fn idle_runners(&self, id: u64) -> Result<u64, ClientError> {
        let what = "GET /statistics/execution-environments";
        let r = self
            .send(
                what,
                self.http
                    .get(self.url("/statistics/execution-environments")),
                &[200],
            )
            .await?;
        let stats = Self::json(what, r).await?;
        Ok(stats[id.to_string()]["idleRunners"].as_u64().unwrap_or(0))
    }

    /// Polls the statistics until the environment has at least `n` idle runners.
    pub async fn wait_idle(&self, id: u64, n: u32, limit: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + limit;
        loop {
            let idle = self.idle_runners(id).await?;
            if idle >= u64::from(n) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(format!(
                    "environment {id} has {idle} of {n} idle runners after {} s",
                    limit.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `POST /runners`: claims a runner and returns its id.
    pub async fn claim(&self, environment: u64) -> Result<String, ClientError> {
        let what = "POST /runners";
        let r = self
            .send(
                what,
                self.http
                    .post(self.url("/runners"))
                    .json(&json!({"executionEnvironmentId": environment, "inactivityTimeout": 60})),
                &[200],
            )
            .await?;
        let v = Self::json(what, r).await?;
        v["runnerId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClientError::Invalid {
                what,
                detail: format!("no runnerId in {v}"),
            })
    }

    /// `DELETE /runners/{id}`.
    pub async fn destroy(&self, runner: &str) -> Result<(), ClientError> {
        self.send(
            "DELETE /runners",
            self.http.delete(self.url(&format!("/runners/{runner}"))),
            &[204],
        )
        .await?;
        Ok(())
    }

    /// `PATCH /runners/{id}/files`: copies files (path, content).
    pub async fn copy(&self, runner: &str, files: &[(String, Vec<u8>)]) -> Result<(), ClientError> {
        let copy: Vec<Value> = files
            .iter()
            .map(|(path, content)| {
                json!({"path": path, "content": base64::engine::general_purpose::STANDARD.encode(content)})
            })
            .collect();
        self.send(
            "PATCH /runners/files",
            self.http
                .patch(self.url(&format!("/runners/{runner}/files")))
                .json(&json!({"copy": copy})),
            &[204],
        )
        .await?;
        Ok(())
    }

    /// `POST /runners/{id}/execute`: stores an execution and returns its WebSocket URL.
    pub async fn execute(
        &self,
        runner: &str,
        command: &str,
        time_limit: u32,
    ) -> Result<String, ClientError> {
        let what = "POST /runners/execute";
        let r = self
            .send(
                what,
                self.http
                    .post(self.url(&format!("/runners/{runner}/execute")))
                    .json(&json!({"command": command, "timeLimit": time_limit})),
                &[200],
            )
            .await?;
        let v = Self::json(what, r).await?;
        v["websocketUrl"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClientError::Invalid {
                what,
                detail: format!("no websocketUrl in {v}"),
            })
    }

    /// Connects to an execution's WebSocket and reads it up to its final message.
    pub async fn run_websocket(&self, url: &str) -> Result<Transcript, ClientError> {
        let mut request = url.into_client_request()?;
        if !self.token.is_empty() {
            let value = self.token.parse().map_err(|_| ClientError::Invalid {
                what: "token",
                detail: "not a valid header value".into(),
            })?;
            request.headers_mut().insert("Poseidon-Token", value);
        }
        if let Some(bearer) = &self.bearer {
            let value = format!("Bearer {bearer}")
                .parse()
                .map_err(|_| ClientError::Invalid {
                    what: "bearer token",
                    detail: "not a valid header value".into(),
                })?;
            request.headers_mut().insert("Authorization", value);
        }
        let (mut stream, _) =
            tokio::time::timeout(REQUEST_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .map_err(|_| ClientError::Timeout("websocket connect".into()))??;
        let mut transcript = Transcript::default();
        loop {
            let message = tokio::time::timeout(REQUEST_TIMEOUT, stream.next())
                .await
                .map_err(|_| ClientError::Timeout("websocket message".into()))?;
            let text = match message {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None => {
                    return Err(ClientError::Execution(
                        "the WebSocket closed before the final message".into(),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
            };
            let v: Value = serde_json::from_str(&text).map_err(|e| ClientError::Invalid {
                what: "websocket message",
                detail: e.to_string(),
            })?;
            match v["type"].as_str() {
                Some("stdout") => transcript.stdout.push_str(v["data"].as_str().unwrap_or("")),
                Some("exit") => {
                    transcript.exit = v["data"].as_i64();
                    let _ = stream.close(None).await;
                    return Ok(transcript);
                }
                Some("timeout") => return Err(ClientError::Execution("timeout".into())),
                Some("error") => {
                    return Err(ClientError::Execution(format!(
                        "error: {}",
                        v["data"].as_str().unwrap_or("")
                    )))
                }
                _ => {}
            }
        }
    }
}
