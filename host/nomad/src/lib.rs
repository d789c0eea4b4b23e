//! Nomad backend of Poseidon (Rust): environments are template jobs `template-<id>`, runners are
//! batch jobs `<envId>-<uuid>` (poseidon-behavior.md §4), commands run through the alloc exec
//! WebSocket (§5) and the event stream reports lost runners (§6). With `runneragent` (the default),
//! a runner agent in each runner serves executions and files over one long-lived exec session.

pub mod agent;
pub mod api;
pub mod backend;
pub mod bridge;
pub mod config;
pub mod events;
pub mod exec;
pub mod jobs;
pub mod monitoring;
pub mod reasons;
pub mod runner;
pub mod template;
pub mod tls;

pub use backend::NomadBackend;
pub use config::NomadConfig;
