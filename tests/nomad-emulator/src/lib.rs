//! A faithful, process-backed emulator of the subset of HashiCorp Nomad's HTTP API that a
//! Poseidon-style backend uses (see `shared/spec/nomad-api.md`).
//!
//! Jobs, evaluations and allocations follow Nomad's shapes, casing, status codes, indexes
//! and event stream; every running allocation is a real local process tree and the alloc exec
//! WebSocket runs real processes (with a pseudo-terminal for `tty=true`). Test-only fault
//! controls live under `/_emulator/` (see [`faults`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), nomad_emulator::EmulatorError> {
//! let emu = nomad_emulator::Emulator::start(nomad_emulator::EmulatorConfig::for_tests()).await?;
//! println!("Nomad at {}", emu.url());
//! emu.shutdown().await;
//! # Ok(()) }
//! ```

pub mod client;
pub mod config;
pub mod error;
pub mod exec;
pub mod faults;
pub mod http;
pub mod jobspec;
pub mod json;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod stream;

pub use config::{EmulatorConfig, StreamFraming};
pub use error::{ApiError, EmulatorError};

use nix::sys::signal::Signal;
use state::Shared;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A running emulator. Dropping it stops the server and kills every process it started.
pub struct Emulator {
    shared: Arc<Shared>,
    server: Option<tokio::task::JoinHandle<()>>,
    temp_dir: Option<PathBuf>,
}

impl Emulator {
    /// Binds the listener and starts serving.
    pub async fn start(config: EmulatorConfig) -> Result<Self, EmulatorError> {
        let listener = server::bind(config.bind).map_err(|source| EmulatorError::Bind {
            addr: config.bind,
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                addr: config.bind,
                source,
            })?;
        let (data_dir, temp_dir) = match &config.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let d = std::env::temp_dir().join(format!(
                    "nomad-emulator-{}-{}",
                    std::process::id(),
                    uuid::Uuid::new_v4().simple()
                ));
                (d.clone(), Some(d))
            }
        };
        std::fs::create_dir_all(&data_dir).map_err(|source| EmulatorError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let shared = Shared::new(config, addr, data_dir);
        let app = http::router(shared.clone());
        let server = tokio::spawn(server::serve(shared.clone(), listener, app));
        Ok(Emulator {
            shared,
            server: Some(server),
            temp_dir,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The shared state (for in-process fault injection and inspection).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Ends every open event stream.
    pub fn cut_event_streams(&self) {
        faults::cut_streams(&self.shared);
    }

    /// Refuses connections for `d`.
    pub fn refuse_connections(&self, d: Duration) {
        faults::refuse_for(&self.shared, d);
    }

    /// Stops serving and kills all processes, waiting for the accept loop to end.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
    }

    fn stop(&mut self) {
        self.shared.shutdown.cancel();
        let pgids: Vec<i32> = self.shared.lock().pgids.drain().collect();
        for p in pgids {
            client::kill_group(p, Signal::SIGKILL);
        }
        client::kill_contained(&self.shared.data_dir);
        if let Some(d) = self.temp_dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}
