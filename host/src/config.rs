//! `configuration.yaml` and `POSEIDON_*` environment variables, with Poseidon's key names.

use std::path::{Path, PathBuf};

use poseidon_local::LocalConfig;
use serde::{Deserialize, Deserializer};

/// Errors that stop the start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key has an invalid value or is unknown.
    #[error("invalid configuration at `{key}`: {message}")]
    Invalid {
        /// Dotted key path, e.g. `server.port`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `server.*`.
    pub server: ServerConfig,
    /// `logger.*`.
    pub logger: LoggerConfig,
    /// `nomad.*` (read by the Nomad backend).
    pub nomad: NomadSection,
    /// `local.*`: the local sandbox backend.
    pub local: LocalConfig,
    /// `plugins.*` (read by the plugin host).
    pub plugins: serde_yaml::Value,
    /// `sentry.*`: only `release` is used (for `/version`).
    pub sentry: SentryConfig,
    /// Accepted for compatibility with Poseidon configuration files; not used.
    pub influxdb: serde_yaml::Value,
    /// Accepted for compatibility with Poseidon configuration files; not used.
    pub profiling: serde_yaml::Value,
    /// Accepted for compatibility; AWS environments are not supported.
    pub aws: serde_yaml::Value,
}

/// `server.*`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    #[serde(deserialize_with = "lenient_string")]
    pub address: String,
    /// Listen port (0 = any free port, printed at start).
    pub port: u16,
    /// Not supported; must stay false.
    pub systemdsocketactivation: bool,
    /// API token (`Poseidon-Token`); empty disables authentication.
    #[serde(deserialize_with = "lenient_string")]
    pub token: String,
    /// TLS settings.
    pub tls: TlsConfig,
    /// Kept for compatibility: stderr is always separated.
    pub interactivestderr: bool,
    /// Nomad template override (Nomad backend).
    #[serde(deserialize_with = "lenient_string")]
    pub templatejobfile: String,
    /// Prewarming-pool alerting.
    pub alert: AlertConfig,
    /// Accepted for compatibility; not used.
    #[serde(deserialize_with = "lenient_string")]
    pub loggingfiltertoken: String,
    /// Largest request body in bytes.
    pub maxrequestbodybytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1".into(),
            port: 7200,
            systemdsocketactivation: false,
            token: String::new(),
            tls: TlsConfig::default(),
            interactivestderr: true,
            templatejobfile: String::new(),
            alert: AlertConfig::default(),
            loggingfiltertoken: String::new(),
            maxrequestbodybytes: 64 * 1024 * 1024,
        }
    }
}

/// `server.tls.*`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Serve HTTPS.
    pub active: bool,
    /// Certificate (PEM).
    #[serde(deserialize_with = "lenient_string")]
    pub certfile: String,
    /// Key (PEM).
    #[serde(deserialize_with = "lenient_string")]
    pub keyfile: String,
    /// CA file (unused, accepted for compatibility).
    #[serde(deserialize_with = "lenient_string")]
    pub cafile: String,
}

/// `server.alert.*`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertConfig {
    /// Share of the pool that must be idle; 0 disables the `/health` alert.
    pub prewarmingpoolthreshold: f64,
    /// Accepted for compatibility (pools are reconciled continuously instead).
    pub prewarmingpoolreloadtimeout: u64,
}

/// `logger.*`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggerConfig {
    /// panic, fatal, error, warn(ing), info, debug or trace.
    #[serde(deserialize_with = "lenient_string")]
    pub level: String,
    /// `TextFormatter` or `JSONFormatter`.
    #[serde(deserialize_with = "lenient_string")]
    pub formatter: String,
}

impl Default for LoggerConfig {
    fn default() -> Self {
        Self {
            level: "INFO".into(),
            formatter: "TextFormatter".into(),
        }
    }
}

/// `nomad.*`: only `enabled` is read here; the Nomad backend reads the rest.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct NomadSection {
    /// Use the Nomad backend instead of the local one.
    pub enabled: bool,
    /// Everything else (read by the Nomad backend).
    #[serde(flatten)]
    pub rest: serde_yaml::Mapping,
}

/// `sentry.*`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SentryConfig {
    /// Release name reported by `/version`.
    #[serde(deserialize_with = "lenient_string")]
    pub release: String,
    /// Everything else (accepted, unused).
    #[serde(flatten)]
    #[allow(dead_code)]
    pub rest: serde_yaml::Mapping,
}

/// Accepts strings, numbers and booleans for string settings (environment variables are untyped).
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_yaml::Value::deserialize(d)? {
        serde_yaml::Value::String(s) => Ok(s),
        serde_yaml::Value::Number(n) => Ok(n.to_string()),
        serde_yaml::Value::Bool(b) => Ok(b.to_string()),
        serde_yaml::Value::Null => Ok(String::new()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string, found {other:?}"
        ))),
    }
}

const SECTIONS: &[&str] = &[
    "server",
    "logger",
    "nomad",
    "local",
    "plugins",
    "sentry",
    "influxdb",
    "profiling",
    "aws",
];

impl Config {
    /// Reads the file (if it exists; an explicitly named file must exist), applies `POSEIDON_*`
    /// variables and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let default_path = Path::new("configuration.yaml");
        let mut tree = match path {
            Some(p) => read(p)?,
            None if default_path.exists() => read(default_path)?,
            None => serde_yaml::Value::Mapping(Default::default()),
        };
        if tree.is_null() {
            tree = serde_yaml::Value::Mapping(Default::default());
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("POSEIDON_") else {
                continue;
            };
            let segments: Vec<String> = rest.split('_').map(str::to_lowercase).collect();
            if !SECTIONS.contains(&segments[0].as_str()) || segments.len() < 2 {
                continue;
            }
            set_path(&mut tree, &segments, parse_scalar(&value));
        }
        let config: Config =
            serde_path_to_error::deserialize(tree).map_err(|e| ConfigError::Invalid {
                key: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        };
        let level = self.logger.level.to_ascii_lowercase();
        if ![
            "panic", "fatal", "error", "warn", "warning", "info", "debug", "trace",
        ]
        .contains(&level.as_str())
        {
            return Err(invalid(
                "logger.level",
                "must be one of panic, fatal, error, warn, info, debug, trace",
            ));
        }
        if self.server.address.is_empty() {
            return Err(invalid("server.address", "must not be empty"));
        }
        if self.server.tls.active
            && (self.server.tls.certfile.is_empty() || self.server.tls.keyfile.is_empty())
        {
            return Err(invalid(
                "server.tls",
                "certfile and keyfile are required when active is true",
            ));
        }
        if self.server.systemdsocketactivation {
            return Err(invalid(
                "server.systemdsocketactivation",
                "systemd socket activation is not supported",
            ));
        }
        let t = self.server.alert.prewarmingpoolthreshold;
        if !(0.0..=1.0).contains(&t) {
            return Err(invalid(
                "server.alert.prewarmingpoolthreshold",
                "must be between 0 and 1",
            ));
        }
        if self.server.maxrequestbodybytes == 0 {
            return Err(invalid("server.maxrequestbodybytes", "must be positive"));
        }
        if !self.local.workdir.starts_with('/') {
            return Err(invalid("local.workdir", "must be an absolute path"));
        }
        Ok(())
    }
}

fn read(path: &Path) -> Result<serde_yaml::Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|e| ConfigError::Invalid {
        key: e
            .location()
            .map(|l| format!("line {}", l.line()))
            .unwrap_or_else(|| "(file)".into()),
        message: e.to_string(),
    })
}

fn parse_scalar(value: &str) -> serde_yaml::Value {
    serde_yaml::from_str::<serde_yaml::Value>(value)
        .ok()
        .filter(|v| {
            !matches!(
                v,
                serde_yaml::Value::Mapping(_) | serde_yaml::Value::Sequence(_)
            )
        })
        .unwrap_or_else(|| serde_yaml::Value::String(value.to_string()))
}

fn set_path(tree: &mut serde_yaml::Value, path: &[String], value: serde_yaml::Value) {
    let mut node = tree;
    for (i, key) in path.iter().enumerate() {
        if !node.is_mapping() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().expect("just made a mapping");
        let key = serde_yaml::Value::String(key.clone());
        if i + 1 == path.len() {
            map.insert(key, value);
            return;
        }
        node = map.entry(key).or_insert(serde_yaml::Value::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_and_types() {
        let c = Config::load(
            None,
            env(&[
                ("POSEIDON_SERVER_PORT", "7300"),
                ("POSEIDON_SERVER_TOKEN", "12345"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.port, 7300);
        assert_eq!(c.server.token, "12345");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::load(None, env(&[("POSEIDON_SERVER_PORT", "abc")])).unwrap_err();
        assert!(e.to_string().contains("server.port"), "{e}");
        let e = Config::load(None, env(&[("POSEIDON_LOGGER_LEVEL", "loud")])).unwrap_err();
        assert!(e.to_string().contains("logger.level"), "{e}");
    }
}
