//! The local backend: every runner is a persistent bubblewrap sandbox on this machine with the
//! runner agent (`poseidon-agent`) inside; core drives executions and files through the agent.
//!
//! A runner owns a directory (a size-limited tmpfs when the server may mount one) holding its
//! workspace, `/tmp` and the agent's socket, two host uids of its own (its root and its `user`,
//! mapped in its user namespace), a cgroup that bounds memory, process count and CPU weight of all
//! its processes together, and its own PID, IPC, UTS and network namespaces. The sandbox is started
//! once when the runner is created (for the pool, in the background) and outlives a restart of the
//! server, which takes it back from `runner.json`.

#![forbid(unsafe_code)]

mod backend;
mod cgroup;
mod config;
mod network;
mod runner;
mod sandbox;
mod state;
mod store;

pub use backend::{find_agent, LocalBackend};
pub use config::LocalConfig;

/// Errors while setting up the local backend.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A file system operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// bubblewrap is missing or does not work here.
    #[error("bubblewrap is not usable: {0}")]
    Bubblewrap(String),
    /// The runner agent binary is missing.
    #[error("{0}")]
    Agent(String),
}
