//! Hooks through which policies (e.g. WebAssembly plugins) steer the pools.

use async_trait::async_trait;

use crate::environment::EnvironmentConfig;

/// What a pool-sizing policy sees of one environment.
#[derive(Debug, Clone)]
pub struct PoolSnapshot {
    /// The environment's configuration (its `prewarming_pool_size` is the configured size).
    pub config: EnvironmentConfig,
    /// Idle runners now.
    pub idle: u32,
    /// Claimed runners now.
    pub used: u32,
    /// Runners being started.
    pub starting: u32,
    /// Claims per minute over the last hour, oldest first (60 values, the last is the current minute).
    pub claims_per_minute: Vec<u32>,
    /// Claims that found the pool empty since the environment was created.
    pub empty_pool_misses: u64,
    /// Unix time in seconds.
    pub now_unix: i64,
}

/// Decides how many idle runners an environment should keep.
#[async_trait]
pub trait PoolPolicy: Send + Sync + 'static {
    /// The wanted number of idle runners, or `None` to use the configured pool size.
    async fn desired_idle(&self, snapshot: &PoolSnapshot) -> Option<u32>;
}
