//! Runners with an agent inside: every operation on the runner is a message to its agent over one
//! byte channel ([`client::AgentClient`]), so executions, file operations, time limits and kills are
//! implemented once, here, for every backend that can put an agent into its sandboxes.
//!
//! A backend implements [`Sandbox`] (create, open a channel to the agent, destroy) and wraps it in an
//! [`AgentRunner`], which is the [`crate::backend::RunnerBackend`] core works with.

pub mod client;
mod runner;

pub use client::{AgentClient, AgentError, Connector, ExecSpec};
pub use poseidon_agent_protocol::Identity;
pub use runner::{AgentRunner, Sandbox, SandboxChannel};
