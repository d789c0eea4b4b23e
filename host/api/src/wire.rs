//! The JSON of the API: request bodies (strict: unknown fields refused) and response bodies.

use std::collections::BTreeMap;

use poseidon_core::backend::MappedPort;
use poseidon_core::files::FileEntry;
use poseidon_core::manager::EnvironmentStatistics;
use poseidon_core::EnvironmentConfig;
use serde::{Deserialize, Deserializer, Serialize};

/// Body of `PUT /execution-environments/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct EnvironmentBody {
    /// Checked as an integer, then ignored: the path's id wins (as in Poseidon).
    #[allow(dead_code)]
    pub(crate) id: Option<i64>,
    pub(crate) image: String,
    pub(crate) prewarming_pool_size: u32,
    #[serde(deserialize_with = "whole_number")]
    pub(crate) cpu_limit: u32,
    pub(crate) memory_limit: u32,
    pub(crate) network_access: bool,
    /// Required by the contract; `null` is refused like any other non-array.
    pub(crate) exposed_ports: Vec<u16>,
}

/// Accepts `100` and `100.0` (the contract says `number`), refuses fractions and negatives.
fn whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    if let Some(v) = n.as_u64() {
        return u32::try_from(v)
            .map_err(|_| serde::de::Error::custom(format!("cpuLimit {v} is too large")));
    }
    match n.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= f64::from(u32::MAX) => Ok(f as u32),
        _ => Err(serde::de::Error::custom(format!(
            "cpuLimit must be a non-negative whole number of MHz, not {n}"
        ))),
    }
}

/// An environment as returned by GET (Poseidon's key order, id last).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EnvironmentView {
    prewarming_pool_size: u32,
    cpu_limit: u32,
    memory_limit: u32,
    image: String,
    network_access: bool,
    exposed_ports: Vec<u16>,
    id: u64,
}

impl From<EnvironmentConfig> for EnvironmentView {
    fn from(c: EnvironmentConfig) -> Self {
        Self {
            prewarming_pool_size: c.prewarming_pool_size,
            cpu_limit: c.cpu_limit,
            memory_limit: c.memory_limit,
            image: c.image,
            network_access: c.network_access,
            exposed_ports: c.exposed_ports,
            id: c.id,
        }
    }
}

/// `GET /execution-environments`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EnvironmentList {
    pub(crate) execution_environments: Vec<EnvironmentView>,
}

/// One entry of `/statistics/execution-environments`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatisticsView {
    id: u64,
    prewarming_pool_size: u32,
    idle_runners: u32,
    used_runners: u32,
    /// Not in Poseidon: why the newest runner start failed, while none has succeeded since.
    #[serde(skip_serializing_if = "Option::is_none")]
    start_failure: Option<String>,
}

/// `/statistics/execution-environments`: keyed by the id as a string.
pub(crate) fn statistics(stats: Vec<EnvironmentStatistics>) -> BTreeMap<String, StatisticsView> {
    stats
        .into_iter()
        .map(|s| {
            (
                s.id.to_string(),
                StatisticsView {
                    id: s.id,
                    prewarming_pool_size: s.prewarming_pool_size,
                    idle_runners: s.idle_runners,
                    used_runners: s.used_runners,
                    start_failure: s.start_failure,
                },
            )
        })
        .collect()
}

/// Body of `POST /runners`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ClaimBody {
    pub(crate) execution_environment_id: u64,
    #[serde(default)]
    pub(crate) inactivity_timeout: i64,
}

/// Response of `POST /runners`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClaimView {
    pub(crate) runner_id: String,
    pub(crate) mapped_ports: Vec<MappedPortView>,
}

/// A mapped port.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MappedPortView {
    exposed_port: u16,
    host_address: String,
}

impl From<MappedPort> for MappedPortView {
    fn from(p: MappedPort) -> Self {
        Self {
            exposed_port: p.exposed_port,
            host_address: p.host_address,
        }
    }
}

/// Body of `POST /runners/{id}/execute`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ExecuteBody {
    pub(crate) command: String,
    #[serde(default)]
    pub(crate) privileged_execution: bool,
    #[serde(default)]
    pub(crate) time_limit: i64,
    /// Absent: empty; `null` is refused (the contract's type is not nullable).
    #[serde(default)]
    pub(crate) environment: BTreeMap<String, String>,
}

/// Response of `POST /runners/{id}/execute`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExecuteView {
    pub(crate) websocket_url: String,
}

/// Body of `PATCH /runners/{id}/files`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilesBody {
    /// Absent: empty; `null` is refused (the contract's type is not nullable).
    #[serde(default)]
    pub(crate) delete: Vec<String>,
    /// Absent: empty; `null` is refused (the contract's type is not nullable).
    #[serde(default)]
    pub(crate) copy: Vec<CopyBody>,
}

/// One file of a `PATCH /files` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CopyBody {
    pub(crate) path: String,
    #[serde(default)]
    pub(crate) content: Option<String>,
}

/// One entry of a listing.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileView {
    name: String,
    entry_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_target: Option<String>,
    size: u64,
    modification_time: i64,
    permissions: String,
    owner: String,
    group: String,
}

impl From<FileEntry> for FileView {
    fn from(e: FileEntry) -> Self {
        Self {
            name: e.name,
            entry_type: e.entry_type.to_string(),
            link_target: e.link_target,
            size: e.size,
            modification_time: e.modification_time,
            permissions: e.permissions,
            owner: e.owner,
            group: e.group,
        }
    }
}

/// `GET /runners/{id}/files`.
#[derive(Debug, Serialize)]
pub(crate) struct FileList {
    pub(crate) files: Vec<FileView>,
}

/// A server → client WebSocket message.
#[derive(Debug, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub(crate) enum WsMessage {
    Start,
    Stdout(String),
    Stderr(String),
    Exit(u8),
    Timeout,
    Error(String),
}
