//! Identifiers of environments, runners and executions.

use std::fmt;

/// Id of an execution environment: a non-negative integer chosen by the client.
pub type EnvironmentId = u64;

/// Id of a stored execution: a random (v4) UUID.
pub type ExecutionId = uuid::Uuid;

/// Id of a runner: `<environmentId>-<uuid>`, as in Poseidon and Nomad job names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunnerId(String);

impl RunnerId {
    /// A fresh runner id for the given environment.
    pub fn generate(environment: EnvironmentId) -> Self {
        Self(format!("{environment}-{}", uuid::Uuid::new_v4()))
    }

    /// Wraps an id as received from a client or a backend, without checking it.
    pub fn from_raw(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    /// The environment id encoded before the first `-`, if it parses.
    pub fn environment(&self) -> Option<EnvironmentId> {
        self.0.split('-').next()?.parse().ok()
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_id_carries_its_environment() {
        let id = RunnerId::generate(29);
        assert!(id.as_str().starts_with("29-"));
        assert_eq!(id.environment(), Some(29));
        assert_eq!(RunnerId::from_raw("x-1").environment(), None);
    }
}
