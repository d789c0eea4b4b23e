//! Pool sizer: keeps as many runners idle as the recent claim rate needs, plus headroom.
//!
//! The claim rate is an exponentially weighted moving average (EWMA) over the last
//! hour's claims per minute, oldest first, so recent minutes weigh most. The answer is
//!
//! ```text
//! wanted = ceil(ewma × horizonMinutes × (1 + headroomPercent / 100)) + headroom
//!        (+ missBoost when the pool ran empty during the last hour)
//! ```
//!
//! clamped to `[min, max]`.
//!
//! Configuration (all optional):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `alpha` | `0.3` | EWMA weight of each newer minute, in (0, 1] |
//! | `horizonMinutes` | `1` | minutes of demand to keep ready (≈ runner start-up time) |
//! | `headroom` | `1` | extra idle runners, absolute |
//! | `headroomPercent` | `0` | extra idle runners, relative to the demand |
//! | `missBoost` | `0` | extra idle runners if the pool ran empty in the last hour |
//! | `min` | `0` | lower bound |
//! | `max` | unbounded | upper bound |

use poseidon_plugin_api::{config, debug, export_pool_sizer, Environment, PoolSizer, PoolState};

/// The sizer's settings, read from the plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// EWMA weight of each newer minute.
    pub alpha: f64,
    /// Minutes of demand to keep ready.
    pub horizon_minutes: f64,
    /// Absolute headroom.
    pub headroom: u32,
    /// Relative headroom in percent.
    pub headroom_percent: f64,
    /// Extra runners after empty-pool misses.
    pub miss_boost: u32,
    /// Lower bound.
    pub min: u32,
    /// Upper bound.
    pub max: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            alpha: 0.3,
            horizon_minutes: 1.0,
            headroom: 1,
            headroom_percent: 0.0,
            miss_boost: 0,
            min: 0,
            max: u32::MAX,
        }
    }
}

impl Settings {
    /// Reads the settings from the plugin configuration; invalid values keep defaults.
    pub fn from_config() -> Self {
        // One host call for all keys (each host call copies its strings across).
        let config = config::Snapshot::read();
        let d = Settings::default();
        let alpha = config
            .parse::<f64>("alpha")
            .filter(|a| *a > 0.0 && *a <= 1.0)
            .unwrap_or(d.alpha);
        Settings {
            alpha,
            horizon_minutes: config
                .parse::<f64>("horizonMinutes")
                .filter(|h| *h >= 0.0 && h.is_finite())
                .unwrap_or(d.horizon_minutes),
            headroom: config.parse("headroom").unwrap_or(d.headroom),
            headroom_percent: config
                .parse::<f64>("headroomPercent")
                .filter(|p| *p >= 0.0 && p.is_finite())
                .unwrap_or(d.headroom_percent),
            miss_boost: config.parse("missBoost").unwrap_or(d.miss_boost),
            min: config.parse("min").unwrap_or(d.min),
            max: config.parse("max").unwrap_or(d.max),
        }
    }
}

/// EWMA of `samples` (oldest first) with weight `alpha` for each newer sample.
pub fn ewma(samples: &[u32], alpha: f64) -> f64 {
    let mut iter = samples.iter().map(|&s| f64::from(s));
    let Some(first) = iter.next() else {
        return 0.0;
    };
    iter.fold(first, |avg, s| alpha * s + (1.0 - alpha) * avg)
}

/// The wanted idle count for the given claim history.
pub fn wanted(settings: &Settings, state: &PoolState) -> u32 {
    let rate = ewma(&state.claims_per_minute, settings.alpha);
    let demand = rate * settings.horizon_minutes * (1.0 + settings.headroom_percent / 100.0);
    // Round up, but not float noise (3 × 2 computed as 6.000000000000001 is 6).
    // `as` saturates for out-of-range floats.
    let mut wanted = ((demand - 1e-9).ceil().max(0.0) as u32).saturating_add(settings.headroom);
    if state.empty_pool_misses > 0 {
        wanted = wanted.saturating_add(settings.miss_boost);
    }
    wanted.clamp(settings.min, settings.max.max(settings.min))
}

/// The exported plugin.
pub struct DemandSizer;

impl PoolSizer for DemandSizer {
    fn wanted_idle(environment: Environment, state: PoolState) -> u32 {
        let settings = Settings::from_config();
        let answer = wanted(&settings, &state);
        debug!(
            "environment {}: ewma {:.2} claims/min, wanted idle {}",
            environment.id,
            ewma(&state.claims_per_minute, settings.alpha),
            answer
        );
        answer
    }
}

export_pool_sizer!(DemandSizer);

#[cfg(test)]
mod tests {
    use super::*;
    use poseidon_plugin_api::testing::set_config;

    fn state(claims: Vec<u32>, misses: u32) -> PoolState {
        PoolState {
            configured_size: 5,
            idle: 0,
            used: 0,
            starting: 0,
            claims_per_minute: claims,
            empty_pool_misses: misses,
            now: 0,
        }
    }

    fn env() -> Environment {
        Environment {
            id: 10,
            image: "python:3".into(),
            prewarming_pool_size: 5,
            cpu_limit: 100,
            memory_limit: 256,
            network_access: false,
            exposed_ports: vec![],
        }
    }

    #[test]
    fn ewma_of_constant_is_constant() {
        assert!((ewma(&[4; 60], 0.3) - 4.0).abs() < 1e-9);
        assert_eq!(ewma(&[], 0.3), 0.0);
    }

    #[test]
    fn ewma_weighs_recent_minutes_most() {
        let mut rising = vec![0; 60];
        rising[59] = 10;
        let mut old = vec![0; 60];
        old[0] = 10;
        assert!(ewma(&rising, 0.5) > ewma(&old, 0.5));
        assert!((ewma(&rising, 0.5) - 5.0).abs() < 1e-9);
    }

    #[test]
    fn quiet_pool_keeps_headroom_only() {
        let s = Settings::default();
        assert_eq!(wanted(&s, &state(vec![0; 60], 0)), 1);
    }

    #[test]
    fn steady_demand_plus_headroom() {
        let s = Settings {
            headroom: 2,
            horizon_minutes: 2.0,
            ..Settings::default()
        };
        // 3 claims/min for 2 minutes, plus 2.
        assert_eq!(wanted(&s, &state(vec![3; 60], 0)), 8);
    }

    #[test]
    fn misses_boost_and_bounds_clamp() {
        let s = Settings {
            miss_boost: 4,
            min: 2,
            max: 6,
            ..Settings::default()
        };
        assert_eq!(wanted(&s, &state(vec![0; 60], 0)), 2);
        assert_eq!(wanted(&s, &state(vec![0; 60], 1)), 5);
        assert_eq!(wanted(&s, &state(vec![50; 60], 1)), 6);
    }

    #[test]
    fn reads_configuration() {
        set_config([
            ("alpha", "0.5"),
            ("headroom", "3"),
            ("max", "7"),
            ("horizonMinutes", "nonsense"),
        ]);
        let s = Settings::from_config();
        assert_eq!(s.alpha, 0.5);
        assert_eq!(s.headroom, 3);
        assert_eq!(s.max, 7);
        assert_eq!(s.horizon_minutes, 1.0);
        assert_eq!(DemandSizer::wanted_idle(env(), state(vec![2; 60], 0)), 5);
    }
}
