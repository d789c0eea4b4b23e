//! One local runner: a directory, a host uid and a cgroup; every operation is a fresh sandbox.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use poseidon_core::backend::{
    BackendError, ExecProcess, ExecRequest, FileDownload, ListRequest, RunnerBackend,
};
use poseidon_core::files::{build_tar, FileEntry, FileUpdate};
use poseidon_core::RunnerId;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use crate::backend::Shared;
use crate::cgroup::RunnerCgroup;
use crate::process::{exit_code, Launch};
use crate::sandbox::SandboxSpec;
use poseidon_core::scripts::{
    parse_listing, DELETE_SCRIPT, DOWNLOAD_SCRIPT, LIST_SCRIPT, UPDATE_SCRIPT,
};

/// A runner of the local backend.
pub(crate) struct LocalRunner {
    pub(crate) id: RunnerId,
    pub(crate) dir: PathBuf,
    pub(crate) uid: u32,
    pub(crate) cgroup: RunnerCgroup,
    pub(crate) rootfs: Option<PathBuf>,
    pub(crate) network: bool,
    pub(crate) mounted: bool,
    pub(crate) shared: Arc<Shared>,
    pub(crate) running: Mutex<Vec<CancellationToken>>,
    pub(crate) destroyed: AtomicBool,
}

impl LocalRunner {
    fn launch(
        &self,
        privileged: bool,
        tty: bool,
        env: &[(String, String)],
        program: Vec<String>,
    ) -> Launch {
        let spec = SandboxSpec {
            rootfs: self.rootfs.as_deref(),
            runner_dir: &self.dir,
            workdir: &self.shared.config.workdir,
            network: self.network,
            privileged,
            environment: env,
            tty,
        };
        Launch {
            uid: self.uid,
            cgroup_procs: self.cgroup.procs_files(),
            bwrap_args: spec.bwrap_args(),
            program,
            tty,
        }
    }

    fn check_alive(&self) -> Result<(), BackendError> {
        if self.destroyed.load(Ordering::SeqCst) {
            Err(BackendError::Internal("the runner was destroyed".into()))
        } else {
            Ok(())
        }
    }

    fn file_timeout(&self) -> Duration {
        Duration::from_secs(self.shared.config.filetimeoutseconds.max(1))
    }

    fn script(script: &str, args: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut program = vec![
            "/bin/bash".to_string(),
            "-c".to_string(),
            script.to_string(),
            "bash".to_string(),
        ];
        program.extend(args);
        program
    }
}

#[async_trait]
impl RunnerBackend for LocalRunner {
    fn id(&self) -> &RunnerId {
        &self.id
    }

    async fn execute(&self, request: &ExecRequest) -> Result<ExecProcess, BackendError> {
        self.check_alive()?;
        let program = vec![
            "/bin/bash".to_string(),
            "-c".to_string(),
            request.command.clone(),
        ];
        let launch = self.launch(
            request.privileged,
            request.tty,
            &request.environment,
            program,
        );
        let process = if request.tty {
            self.shared.launcher.spawn_interactive(&launch)
        } else {
            return Err(BackendError::Unsupported(
                "non-interactive executions are not offered".into(),
            ));
        }
        .map_err(|e| BackendError::Internal(format!("could not start the sandbox: {e}")))?;
        let mut running = self.running.lock().unwrap();
        running.retain(|t| !t.is_cancelled());
        running.push(process.kill.clone());
        Ok(process)
    }

    async fn update_files(&self, update: &FileUpdate) -> Result<(), BackendError> {
        self.check_alive()?;
        let (script, input) = if update.copy.is_empty() {
            (DELETE_SCRIPT, Vec::new())
        } else {
            (UPDATE_SCRIPT, build_tar(&update.copy))
        };
        let launch = self.launch(
            true,
            false,
            &[],
            Self::script(script, update.delete.iter().cloned()),
        );
        let out = self
            .shared
            .launcher
            .run_captured(&launch, input, self.file_timeout())
            .await
            .map_err(BackendError::internal)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(BackendError::FileCopyFailed {
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            })
        }
    }

    async fn list_files(&self, request: &ListRequest) -> Result<Vec<FileEntry>, BackendError> {
        self.check_alive()?;
        let recursive = if request.recursive { "1" } else { "0" };
        let program = Self::script(LIST_SCRIPT, [request.path.clone(), recursive.to_string()]);
        let launch = self.launch(request.privileged, false, &[], program);
        let out = self
            .shared
            .launcher
            .run_captured(&launch, Vec::new(), self.file_timeout())
            .await
            .map_err(BackendError::internal)?;
        if !out.status.success() && out.stdout.is_empty() {
            return Err(BackendError::FileNotFound);
        }
        Ok(parse_listing(&out.stdout))
    }

    async fn download_file(
        &self,
        path: &str,
        privileged: bool,
    ) -> Result<FileDownload, BackendError> {
        self.check_alive()?;
        let program = Self::script(DOWNLOAD_SCRIPT, [path.to_string()]);
        let launch = self.launch(privileged, false, &[], program);
        let mut child = self
            .shared
            .launcher
            .spawn_reader(&launch)
            .map_err(BackendError::internal)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BackendError::Internal("no output of the download".into()))?;
        let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, stdout);
        let mut first = String::new();
        let read = tokio::time::timeout(self.file_timeout(), reader.read_line(&mut first)).await;
        let size: u64 = match read {
            Ok(Ok(n)) if n > 0 => first
                .trim()
                .parse()
                .map_err(|_| BackendError::FileNotFound)?,
            Ok(_) => {
                let status = child.wait().await.map_err(BackendError::internal)?;
                tracing::debug!(code = exit_code(&status), "download refused");
                return Err(BackendError::FileNotFound);
            }
            Err(_) => {
                return Err(BackendError::Internal(
                    "the download did not start in time".into(),
                ))
            }
        };
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let body = tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024)
            .map(|chunk: std::io::Result<Bytes>| chunk);
        Ok(FileDownload {
            size,
            body: body.boxed(),
        })
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        for token in self.running.lock().unwrap().drain(..) {
            token.cancel();
        }
        self.cgroup.kill_and_remove().await;
        self.shared.remove_runner_dir(&self.dir, self.mounted).await;
        self.shared.uids.release(self.uid);
        Ok(())
    }
}
