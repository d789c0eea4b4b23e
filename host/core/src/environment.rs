//! Execution environment configuration.

use crate::ids::EnvironmentId;

/// The configuration of an execution environment, as set by `PUT /execution-environments/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentConfig {
    /// The environment id.
    pub id: EnvironmentId,
    /// Image name (OCI image for Nomad; mapped to a root filesystem by the local backend).
    pub image: String,
    /// Number of idle runners to keep prewarmed.
    pub prewarming_pool_size: u32,
    /// CPU limit of one runner in MHz (0 = no limit).
    pub cpu_limit: u32,
    /// Memory limit of one runner in MB (0 = no limit).
    pub memory_limit: u32,
    /// Whether runners may use the network.
    pub network_access: bool,
    /// Ports inside the runner to expose (only with network access).
    pub exposed_ports: Vec<u16>,
}

impl EnvironmentConfig {
    /// The same configuration with Poseidon's normalisation applied: ports are dropped without network.
    pub fn normalized(mut self) -> Self {
        if !self.network_access {
            self.exposed_ports.clear();
        }
        self
    }
}
