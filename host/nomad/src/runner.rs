//! One Nomad runner: a batch job `<envId>-<uuid>` whose allocation runs the sandbox.

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use poseidon_core::backend::{
    BackendError, Claim, ExecProcess, ExecRequest, FileDownload, ListRequest, MappedPort,
    RunnerBackend,
};
use poseidon_core::files::{build_tar, FileEntry, FileUpdate};
use poseidon_core::RunnerId;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::NomadClient;
use crate::backend::Shared;
use crate::exec::{self, Frame};
use crate::jobs::{self, CONFIG_GROUP};

/// How long an operation waits for a runner's restarted allocation to run again.
const ALLOCATION_WAIT: Duration = Duration::from_secs(30);

pub use poseidon_core::scripts::parse_listing;
use poseidon_core::scripts::{DELETE_SCRIPT, DOWNLOAD_SCRIPT, LIST_SCRIPT, UPDATE_SCRIPT};

/// The content of a download: exactly `left` more bytes, then the session is told to end.
struct Body {
    pending: Option<Bytes>,
    left: u64,
    frames: mpsc::Receiver<Frame>,
    stdin: Option<mpsc::Sender<Bytes>>,
    _session: tokio::task::JoinHandle<Result<Option<i32>, exec::SessionError>>,
    kill: CancellationToken,
}

impl Body {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.left == 0 {
            self.stdin = None; // the end marker follows; closing stdin ends the script
            return None;
        }
        loop {
            let data = match self.pending.take() {
                Some(d) if !d.is_empty() => d,
                _ => match self.frames.recv().await {
                    Some(Frame::Stdout(d)) => d,
                    Some(_) => continue,
                    None => {
                        self.left = 0;
                        return Some(Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the runner's file stream ended early",
                        )));
                    }
                },
            };
            let take = data
                .len()
                .min(usize::try_from(self.left).unwrap_or(usize::MAX));
            self.left -= take as u64;
            return Some(Ok(data.slice(..take)));
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if self.left > 0 {
            self.kill.cancel(); // the client stopped reading
        }
    }
}

/// A fresh end marker for [`exec::with_end_marker`].
fn end_marker() -> String {
    format!("poseidon-end-{}", uuid::Uuid::new_v4().simple())
}

/// A runner backed by a Nomad job.
pub struct NomadRunner {
    pub(crate) id: RunnerId,
    pub(crate) shared: Arc<Shared>,
    pub(crate) running: Mutex<Vec<CancellationToken>>,
    /// Serialises writes of the runner's job; `true` once it was purged. A meta update (claim)
    /// that re-registered the job after its purge would bring the runner back as an orphan.
    pub(crate) job_lock: tokio::sync::Mutex<bool>,
}

/// Reads the port mappings of an allocation (`AllocatedResources.Shared.Ports`).
pub fn ports_of(alloc: &Value) -> Vec<MappedPort> {
    alloc["AllocatedResources"]["Shared"]["Ports"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    Some(MappedPort {
                        exposed_port: u16::try_from(p["To"].as_u64()?).ok()?,
                        host_address: format!(
                            "{}:{}",
                            p["HostIP"].as_str().unwrap_or(""),
                            p["Value"].as_u64()?
                        ),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

impl NomadRunner {
    fn client(&self) -> &NomadClient {
        &self.shared.client
    }

    /// The allocation to exec into: the running one (Poseidon takes the first listed, which after a
    /// reschedule can be the dead one). A replacement that is still starting is waited for.
    pub(crate) async fn allocation(&self) -> Result<String, BackendError> {
        let deadline = tokio::time::Instant::now() + ALLOCATION_WAIT;
        loop {
            let (list, _) = self
                .client()
                .job_allocations(self.id.as_str(), None)
                .await?;
            let current = crate::jobs::current_allocation(&list);
            let starting = current.is_some_and(|a| a["ClientStatus"] == "pending");
            if !starting || tokio::time::Instant::now() >= deadline {
                return current
                    .and_then(|a| a["ID"].as_str())
                    .map(String::from)
                    .ok_or_else(|| {
                        BackendError::NodeDown(format!("runner {} has no allocation", self.id))
                    });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn script(script: &str, args: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut argv = vec![
            "/bin/bash".into(),
            "-c".into(),
            script.into(),
            "bash".into(),
        ];
        argv.extend(args);
        argv
    }

    fn as_user(&self, argv: Vec<String>, privileged: bool) -> Vec<String> {
        let prefix = &self.shared.config.unprivilegedprefix;
        if privileged || prefix.is_empty() {
            return argv;
        }
        let mut out: Vec<String> = prefix.split_whitespace().map(String::from).collect();
        out.extend(argv);
        out
    }

    fn file_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// The runner's mapped ports, as the event stream last reported them.
    pub(crate) fn current_ports(&self) -> Vec<MappedPort> {
        let ports = self.shared.ports.lock().unwrap();
        ports.get(self.id.as_str()).cloned().unwrap_or_default()
    }

    /// Records in the runner's job that it is claimed (with its inactivity timeout and owner) or
    /// idle.
    pub(crate) async fn record_claim(&self, claim: Option<Claim>) -> Result<(), BackendError> {
        let purged = self.job_lock.lock().await;
        if *purged {
            return Ok(());
        }
        let client = self.client();
        let Some(mut job) = client.job(self.id.as_str()).await? else {
            return Err(BackendError::NodeDown(format!(
                "runner job {} is gone",
                self.id
            )));
        };
        if let Some(groups) = job["TaskGroups"].as_array_mut() {
            for g in groups.iter_mut().filter(|g| g["Name"] == CONFIG_GROUP) {
                let mut meta = g["Meta"].as_object().cloned().unwrap_or_default();
                jobs::record_claim(&mut meta, claim.as_ref());
                g["Meta"] = Value::Object(meta);
            }
        }
        client.register(&job).await?;
        Ok(())
    }

    /// Purges the runner's job (its allocation and every process in it end).
    pub(crate) async fn remove(&self) -> Result<(), BackendError> {
        self.shared.forget(&self.id);
        let mut purged = self.job_lock.lock().await;
        *purged = true;
        let mut last = None;
        for attempt in 0..3u32 {
            match self.client().retire(self.id.as_str()).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
                }
            }
        }
        // Nomad is away for longer: the job goes once it is back.
        self.client().retire_eventually(self.id.as_str());
        Err(last
            .map(BackendError::from)
            .unwrap_or_else(|| BackendError::internal("deregister failed")))
    }
}

#[async_trait]
impl RunnerBackend for NomadRunner {
    fn id(&self) -> &RunnerId {
        &self.id
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.current_ports()
    }

    async fn mark_claimed(&self, claim: Option<Claim>) -> Result<(), BackendError> {
        self.record_claim(claim).await
    }

    async fn execute(&self, request: &ExecRequest) -> Result<ExecProcess, BackendError> {
        let alloc = self.allocation().await?;
        let p = exec::start(
            self.client().clone(),
            alloc,
            request,
            &self.shared.config.unprivilegedprefix,
            self.shared.config.interactive_stderr,
        )
        .await?;
        let mut running = self.running.lock().unwrap();
        running.retain(|t| !t.is_cancelled());
        running.push(p.kill.clone());
        Ok(p)
    }

    async fn update_files(&self, update: &FileUpdate) -> Result<(), BackendError> {
        let alloc = self.allocation().await?;
        let (script, input) = if update.copy.is_empty() {
            (DELETE_SCRIPT, Vec::new())
        } else {
            (UPDATE_SCRIPT, build_tar(&update.copy))
        };
        let argv = Self::script(script, update.delete.iter().cloned());
        let (out, err, code) = exec::run_captured(
            self.client(),
            &alloc,
            argv,
            Bytes::from(input),
            self.file_timeout(),
        )
        .await?;
        if code == 0 {
            Ok(())
        } else {
            Err(BackendError::FileCopyFailed {
                stderr: String::from_utf8_lossy(&err).into_owned(),
                stdout: String::from_utf8_lossy(&out).into_owned(),
            })
        }
    }

    async fn list_files(&self, request: &ListRequest) -> Result<Vec<FileEntry>, BackendError> {
        let alloc = self.allocation().await?;
        let recursive = if request.recursive { "1" } else { "0" };
        let marker = end_marker();
        let argv = self.as_user(
            Self::script(
                &exec::with_end_marker(LIST_SCRIPT, &marker),
                [request.path.clone(), recursive.to_string()],
            ),
            request.privileged,
        );
        let (out, _, code) =
            exec::run_until_end_marker(self.client(), &alloc, argv, &marker, self.file_timeout())
                .await?;
        if code != 0 && out.is_empty() {
            return Err(BackendError::FileNotFound);
        }
        Ok(parse_listing(&out))
    }

    async fn download_file(
        &self,
        path: &str,
        privileged: bool,
    ) -> Result<FileDownload, BackendError> {
        let alloc = self.allocation().await?;
        // The size line, exactly `size` bytes, then the end marker: the body is complete once
        // `size` bytes arrived, whatever Nomad's Docker driver does with the end of the stream.
        let marker = end_marker();
        let argv = self.as_user(
            Self::script(
                &exec::with_end_marker(DOWNLOAD_SCRIPT, &marker),
                [path.to_string()],
            ),
            privileged,
        );
        let ws = exec::connect(self.client(), &alloc, &argv, false).await?;
        let (in_tx, in_rx) = mpsc::channel(1);
        let (out_tx, mut out_rx) = mpsc::channel::<Frame>(16);
        let kill = CancellationToken::new();
        let session = tokio::spawn(exec::drive(ws, in_rx, true, out_tx, kill.clone()));
        // First line: the size (or, for a missing file, directly the end marker).
        let mut head = Vec::new();
        let rest = loop {
            match tokio::time::timeout(self.file_timeout(), out_rx.recv()).await {
                Ok(Some(Frame::Stdout(d))) => {
                    head.extend_from_slice(&d);
                    if let Some(pos) = head.iter().position(|b| *b == b'\n') {
                        break head.split_off(pos + 1);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    // Nomad refused the session (e.g. the task is restarting): say so, not 424.
                    return Err(match session.await {
                        Ok(Err(e @ exec::SessionError::Closed(_))) => e.into(),
                        _ => BackendError::FileNotFound,
                    });
                }
                Err(_) => {
                    kill.cancel();
                    return Err(BackendError::Internal(
                        "the download did not start in time".into(),
                    ));
                }
            }
        };
        let Some(size) = std::str::from_utf8(&head)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        else {
            kill.cancel();
            return Err(BackendError::FileNotFound);
        };
        let body = Body {
            pending: Some(Bytes::from(rest)),
            left: size,
            frames: out_rx,
            stdin: Some(in_tx),
            _session: session,
            kill,
        };
        let stream =
            futures::stream::unfold(
                body,
                |mut b| async move { b.next_chunk().await.map(|c| (c, b)) },
            );
        Ok(FileDownload {
            size,
            body: stream.boxed(),
        })
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        for t in self.running.lock().unwrap().drain(..) {
            t.cancel();
        }
        self.remove().await
    }
}
