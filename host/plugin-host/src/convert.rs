//! Translations between the host's plain types ([`crate::types`]) and the generated WIT
//! types of each supported version. The records 0.1 and 0.2 share are translated by one
//! macro instantiated per version; what 0.2 added is translated next to it.

use std::time::Duration;

use poseidon_core::execution::ExecutionRequest;
use poseidon_core::files::{FileCopy, FileUpdate};
use poseidon_core::policy::{AuthRequest, Denial, Principal};
use poseidon_core::EnvironmentId;

use crate::host::Subject;
use crate::types::EnvironmentInfo;

/// An environment id a preprocessor answered, as core's.
fn core_id(id: i64) -> Result<EnvironmentId, String> {
    EnvironmentId::try_from(id).map_err(|_| format!("answered environment-id {id}"))
}

/// A time limit in whole seconds, as WIT carries it (0 = none).
fn wit_seconds(limit: Option<Duration>) -> i64 {
    limit.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// An environment id as WIT carries it (`s64`).
fn wit_id(id: EnvironmentId) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

/// What an authenticator of any version is given of a request: the method upper-case,
/// the header names lower-case (HTTP header names are case-insensitive), the peer's
/// address or "".
fn auth_parts(r: &AuthRequest) -> (String, Vec<(String, String)>, String) {
    let headers = r
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    (
        r.method.to_ascii_uppercase(),
        headers,
        r.peer_address.clone().unwrap_or_default(),
    )
}

/// Translations of the records every version has, for the `types` module `$wit`.
macro_rules! shared_records {
    ($wit:path) => {
        use $wit as wit;

        impl From<&EnvironmentInfo> for wit::Environment {
            fn from(e: &EnvironmentInfo) -> Self {
                wit::Environment {
                    id: e.id,
                    image: e.image.clone(),
                    prewarming_pool_size: e.prewarming_pool_size,
                    cpu_limit: e.cpu_limit,
                    memory_limit: e.memory_limit,
                    network_access: e.network_access,
                    exposed_ports: e.exposed_ports.clone(),
                }
            }
        }

        impl From<&Subject<ExecutionRequest>> for wit::ExecuteRequest {
            fn from(r: &Subject<ExecutionRequest>) -> Self {
                wit::ExecuteRequest {
                    command: r.body.command.clone(),
                    env: r.body.environment.clone(),
                    time_limit: wit_seconds(r.body.time_limit),
                    privileged: r.body.privileged,
                    environment_id: wit_id(r.environment),
                    principal: r.tenant.clone(),
                }
            }
        }

        /// A preprocessor's answer; a negative time limit or environment id is a bad answer.
        impl TryFrom<wit::ExecuteRequest> for Subject<ExecutionRequest> {
            type Error = String;

            fn try_from(r: wit::ExecuteRequest) -> Result<Self, String> {
                let seconds = u64::try_from(r.time_limit)
                    .map_err(|_| "answered a negative time limit".to_string())?;
                Ok(Subject {
                    environment: core_id(r.environment_id)?,
                    tenant: r.principal,
                    body: ExecutionRequest {
                        command: r.command,
                        environment: r.env,
                        time_limit: (seconds > 0).then(|| Duration::from_secs(seconds)),
                        privileged: r.privileged,
                    },
                })
            }
        }

        impl From<&Subject<FileUpdate>> for wit::FileUpdate {
            fn from(u: &Subject<FileUpdate>) -> Self {
                wit::FileUpdate {
                    copy: u
                        .body
                        .copy
                        .iter()
                        .map(|f| wit::File {
                            path: f.path.clone(),
                            content: f.content.clone(),
                        })
                        .collect(),
                    delete: u.body.delete.clone(),
                    environment_id: wit_id(u.environment),
                    principal: u.tenant.clone(),
                }
            }
        }

        /// A preprocessor's answer; a negative environment id is a bad answer.
        impl TryFrom<wit::FileUpdate> for Subject<FileUpdate> {
            type Error = String;

            fn try_from(u: wit::FileUpdate) -> Result<Self, String> {
                Ok(Subject {
                    environment: core_id(u.environment_id)?,
                    tenant: u.principal,
                    body: FileUpdate {
                        copy: u
                            .copy
                            .into_iter()
                            .map(|f| FileCopy {
                                path: f.path,
                                content: f.content,
                            })
                            .collect(),
                        delete: u.delete,
                    },
                })
            }
        }

        impl From<wit::Principal> for Principal {
            fn from(p: wit::Principal) -> Self {
                Principal {
                    tenant: p.tenant,
                    // Negative ids name no environment.
                    environments: p.environments.map(|ids| {
                        ids.into_iter()
                            .filter_map(|id| EnvironmentId::try_from(id).ok())
                            .collect()
                    }),
                }
            }
        }

        impl From<wit::Denial> for Denial {
            fn from(d: wit::Denial) -> Self {
                Denial {
                    status: d.status,
                    message: d.message,
                }
            }
        }
    };
}

/// `poseidon:plugins@0.1.0`.
pub(crate) mod v1 {
    use super::*;
    use crate::host::SizerCall;
    shared_records!(crate::bindings::v1::types);

    impl From<&SizerCall> for wit::PoolState {
        fn from(c: &SizerCall) -> Self {
            wit::PoolState {
                configured_size: c.pool.configured_size,
                idle: c.pool.idle,
                used: c.pool.used,
                starting: c.pool.starting,
                claims_per_minute: c.claims.clone(),
                empty_pool_misses: c.pool.empty_pool_misses,
                now: c.pool.now,
            }
        }
    }

    /// A 0.1 authenticator never sees the `Poseidon-Token`.
    impl From<&AuthRequest> for wit::AuthRequest {
        fn from(r: &AuthRequest) -> Self {
            let (method, headers, peer_address) = auth_parts(r);
            wit::AuthRequest {
                method,
                path: r.path.clone(),
                headers,
                peer_address,
            }
        }
    }
}

/// `poseidon:plugins@0.2.0`.
pub(crate) mod v2 {
    use super::*;
    use crate::host::SizerCall;
    use poseidon_core::policy::{ExecutionOutcome, LifecycleEvent, LifecycleKind};
    shared_records!(crate::bindings::v2::types);

    impl From<&SizerCall> for wit::PoolState {
        fn from(c: &SizerCall) -> Self {
            wit::PoolState {
                configured_size: c.pool.configured_size,
                idle: c.pool.idle,
                used: c.pool.used,
                starting: c.pool.starting,
                claims_per_minute: c.claims.clone(),
                empty_pool_misses: c.pool.empty_pool_misses,
                now: c.pool.now,
                local: local_time(c.pool.now, &c.time_zone),
            }
        }
    }

    /// `now` as civil time in `zone`, daylight saving time applied.
    pub(crate) fn local_time(now: i64, zone: &jiff::tz::TimeZone) -> wit::LocalTime {
        let at = jiff::Timestamp::from_second(now)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_zoned(zone.clone());
        wit::LocalTime {
            time_zone: zone.iana_name().unwrap_or("UTC").to_string(),
            utc_offset_seconds: at.offset().seconds(),
            year: at.year(),
            month: at.month() as u8,
            day: at.day() as u8,
            weekday: at.weekday().to_monday_zero_offset() as u8,
            hour: at.hour() as u8,
            minute: at.minute() as u8,
            second: at.second() as u8,
        }
    }

    impl From<&AuthRequest> for wit::AuthRequest {
        fn from(r: &AuthRequest) -> Self {
            let (method, headers, peer_address) = auth_parts(r);
            wit::AuthRequest {
                method,
                path: r.path.clone(),
                headers,
                peer_address,
                poseidon_token: r.poseidon_token.clone(),
            }
        }
    }

    impl From<&LifecycleEvent> for wit::LifecycleEvent {
        fn from(e: &LifecycleEvent) -> Self {
            wit::LifecycleEvent {
                at_ms: e.at_ms,
                runner: wit::RunnerRef {
                    runner_id: e.runner_id.clone(),
                    environment_id: wit_id(e.environment_id),
                    tenant: e.tenant.clone(),
                },
                kind: match &e.kind {
                    LifecycleKind::Claimed => wit::EventKind::Claimed,
                    LifecycleKind::FilesChanged {
                        copied,
                        deleted,
                        bytes,
                    } => wit::EventKind::FilesChanged(wit::FilesChanged {
                        copied: *copied,
                        deleted: *deleted,
                        bytes: *bytes,
                    }),
                    LifecycleKind::ExecutionStarted { command } => {
                        wit::EventKind::ExecutionStarted(wit::ExecutionStarted {
                            command: command.clone(),
                        })
                    }
                    LifecycleKind::ExecutionEnded {
                        outcome,
                        exit_code,
                        duration_ms,
                    } => wit::EventKind::ExecutionEnded(wit::ExecutionEnded {
                        outcome: match outcome {
                            ExecutionOutcome::Exited => wit::ExecutionOutcome::Exited,
                            ExecutionOutcome::TimedOut => wit::ExecutionOutcome::TimedOut,
                            ExecutionOutcome::Failed => wit::ExecutionOutcome::Failed,
                            ExecutionOutcome::Abandoned => wit::ExecutionOutcome::Abandoned,
                        },
                        exit_code: *exit_code,
                        duration_ms: *duration_ms,
                    }),
                    LifecycleKind::Destroyed => wit::EventKind::Destroyed,
                },
            }
        }
    }
}
