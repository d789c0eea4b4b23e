//! One Nomad runner: a batch job `<envId>-<uuid>` whose allocation runs the sandbox.

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use poseidon_core::backend::{
    BackendError, ExecProcess, ExecRequest, FileDownload, ListRequest, MappedPort, RunnerBackend,
};
use poseidon_core::files::{build_tar, FileEntry, FileUpdate};
use poseidon_core::RunnerId;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::NomadClient;
use crate::backend::Shared;
use crate::exec::{self, Frame};
use crate::jobs::CONFIG_GROUP;

pub use poseidon_core::scripts::parse_listing;
use poseidon_core::scripts::{DELETE_SCRIPT, DOWNLOAD_SCRIPT, LIST_SCRIPT, UPDATE_SCRIPT};

/// A runner backed by a Nomad job.
pub struct NomadRunner {
    pub(crate) id: RunnerId,
    pub(crate) shared: Arc<Shared>,
    pub(crate) ports: Mutex<Vec<MappedPort>>,
    pub(crate) running: Mutex<Vec<CancellationToken>>,
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

    /// The allocation to exec into: the first (newest) allocation of the job, like Poseidon.
    async fn allocation(&self) -> Result<String, BackendError> {
        let (list, _) = self
            .client()
            .job_allocations(self.id.as_str(), None)
            .await?;
        list.first()
            .and_then(|a| a["ID"].as_str())
            .map(String::from)
            .ok_or_else(|| BackendError::NodeDown(format!("runner {} has no allocation", self.id)))
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
}

#[async_trait]
impl RunnerBackend for NomadRunner {
    fn id(&self) -> &RunnerId {
        &self.id
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        self.ports.lock().unwrap().clone()
    }

    async fn mark_claimed(&self, inactivity_timeout: Option<i64>) -> Result<(), BackendError> {
        let client = self.client();
        let Some(mut job) = client.job(self.id.as_str()).await? else {
            return Err(BackendError::NodeDown(format!(
                "runner job {} is gone",
                self.id
            )));
        };
        let meta = match inactivity_timeout {
            Some(t) => json!({"used": "true", "timeout": t.to_string()}),
            None => json!({"used": "false"}),
        };
        if let Some(groups) = job["TaskGroups"].as_array_mut() {
            for g in groups.iter_mut().filter(|g| g["Name"] == CONFIG_GROUP) {
                g["Meta"] = meta.clone();
            }
        }
        client.register(&job).await?;
        Ok(())
    }

    async fn execute(&self, request: &ExecRequest) -> Result<ExecProcess, BackendError> {
        let alloc = self.allocation().await?;
        let p = exec::start(
            self.client().clone(),
            alloc,
            request,
            &self.shared.config.unprivilegedprefix,
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
        let (out, err, code) =
            exec::run_captured(self.client(), &alloc, argv, input, self.file_timeout()).await?;
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
        let argv = self.as_user(
            Self::script(LIST_SCRIPT, [request.path.clone(), recursive.to_string()]),
            request.privileged,
        );
        let (out, _, code) =
            exec::run_captured(self.client(), &alloc, argv, Vec::new(), self.file_timeout())
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
        let argv = self.as_user(
            Self::script(DOWNLOAD_SCRIPT, [path.to_string()]),
            privileged,
        );
        let ws = exec::connect(self.client(), &alloc, &argv, false).await?;
        let (_in_tx, in_rx) = mpsc::channel(1);
        let (out_tx, mut out_rx) = mpsc::channel::<Frame>(16);
        let kill = CancellationToken::new();
        let session = tokio::spawn(exec::drive(ws, in_rx, true, out_tx, kill.clone()));
        drop(_in_tx);
        // First line: the size.
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
                    let _ = session.await;
                    return Err(BackendError::FileNotFound);
                }
                Err(_) => {
                    kill.cancel();
                    return Err(BackendError::Internal(
                        "the download did not start in time".into(),
                    ));
                }
            }
        };
        let size: u64 = std::str::from_utf8(&head)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or(BackendError::FileNotFound)?;
        let first = futures::stream::iter((!rest.is_empty()).then(|| Ok(Bytes::from(rest))));
        let tail = futures::stream::unfold((out_rx, session), |(mut rx, session)| async move {
            loop {
                match rx.recv().await {
                    Some(Frame::Stdout(d)) => return Some((Ok(d), (rx, session))),
                    Some(_) => continue,
                    None => return None,
                }
            }
        });
        Ok(FileDownload {
            size,
            body: first.chain(tail).boxed(),
        })
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        for t in self.running.lock().unwrap().drain(..) {
            t.cancel();
        }
        self.shared.forget(&self.id);
        let mut last = None;
        for attempt in 0..3u32 {
            match self.client().deregister(self.id.as_str(), true).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
                }
            }
        }
        Err(last
            .map(BackendError::from)
            .unwrap_or_else(|| BackendError::internal("deregister failed")))
    }
}
