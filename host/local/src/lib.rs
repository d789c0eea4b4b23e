//! The local backend: every runner is a set of bubblewrap sandboxes on this machine.
//!
//! A runner owns a directory (a size-limited tmpfs when the server may mount one) holding its
//! workspace and `/tmp`, a host uid of its own, and a cgroup that bounds memory and process count
//! of all its processes together. Each execution or file operation is one `bwrap` call that sees
//! the host's system directories (or the image's root filesystem) read-only, its own PID, IPC, UTS
//! and (without network access) network namespaces, and only its runner's files.

#![forbid(unsafe_code)]

mod backend;
mod cgroup;
mod config;
mod process;
mod pty;
mod runner;
mod sandbox;
mod store;

pub use backend::LocalBackend;
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
}
