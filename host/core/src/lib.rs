//! The gateway's domain: execution environments, their pools of prewarmed runners, claimed runners,
//! executions, and the [`Backend`] abstraction that the local and Nomad backends implement.
//!
//! Nothing in this crate knows HTTP or the wire JSON; the API crate maps these types to the protocol.

#![forbid(unsafe_code)]

pub mod agent;
pub mod backend;
pub mod environment;
pub mod error;
pub mod execution;
pub mod files;
pub mod ids;
pub mod manager;
pub mod monitoring;
pub mod policy;
mod pool;
pub mod runner;
pub mod scripts;
mod utf8;

pub use backend::{Backend, BackendError, BackendEvent, RunnerBackend};
pub use environment::EnvironmentConfig;
pub use error::CoreError;
pub use ids::{EnvironmentId, ExecutionId, RunnerId};
pub use manager::Manager;
