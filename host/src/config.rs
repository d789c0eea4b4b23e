//! `configuration.yaml` and `POSEIDON_*` environment variables, with Poseidon's key names.

mod lenient;

use std::path::{Path, PathBuf};

use poseidon_local::LocalConfig;
use poseidon_nomad::NomadConfig;
use poseidon_plugin_host::PluginsConfig;
use serde::{Deserialize, Deserializer};

use lenient::Lenient;

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
    /// `nomad.*`: read as a tree first (see [`NomadSection`]).
    #[serde(rename = "nomad")]
    nomad_tree: serde_yaml::Mapping,
    /// `nomad.*`, resolved from the tree after loading.
    #[serde(skip)]
    pub nomad: NomadSection,
    /// `local.*`: the local sandbox backend.
    pub local: LocalConfig,
    /// `plugins.*`, checked here (types, unknown keys) and normalised for the plugin host.
    pub plugins: serde_yaml::Value,
    /// `sentry.*`.
    pub sentry: SentryConfig,
    /// `influxdb.*`.
    pub influxdb: InfluxConfig,
    /// `profiling.*`: Go's profiler settings, accepted and ignored.
    pub profiling: ProfilingConfig,
    /// `aws.*`: AWS environments are not supported; `enabled: true` stops the start.
    pub aws: AwsConfig,
    /// `metrics.*`: the Prometheus endpoint (this server's own section).
    pub metrics: MetricsConfig,
}

/// `metrics.*`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Record figures and serve them at `/metrics` (default true).
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
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
    /// Serve on the sockets systemd passes (`LISTEN_FDS`) instead of address and port.
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

/// `nomad.*`.
#[derive(Debug, Default)]
pub struct NomadSection {
    /// Use the Nomad backend instead of the local one.
    pub enabled: bool,
    /// The Nomad backend's settings.
    pub settings: NomadConfig,
}

/// `sentry.*`: Sentry's client options under Poseidon's (lower-cased) names.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SentryConfig {
    /// Where events go; empty disables Sentry.
    #[serde(deserialize_with = "lenient_string")]
    pub dsn: String,
    /// The environment name of events.
    #[serde(deserialize_with = "lenient_string")]
    pub environment: String,
    /// Release name of events, also reported by `/version`.
    #[serde(deserialize_with = "lenient_string")]
    pub release: String,
    /// Sentry's debug output.
    pub debug: bool,
    /// Send performance transactions.
    pub enabletracing: bool,
    /// Share of transactions sent.
    pub tracessamplerate: f64,
    /// Accepted for compatibility (Go profiling).
    pub profilessamplerate: f64,
    /// Share of error events sent.
    pub samplerate: f64,
    /// Attach stack traces to messages.
    pub attachstacktrace: bool,
    /// Server name of events (default: the host name).
    #[serde(deserialize_with = "lenient_string")]
    pub servername: String,
    /// Accepted for compatibility (sentry-go's dist).
    #[serde(deserialize_with = "lenient_string")]
    pub dist: String,
    /// Most breadcrumbs kept per event.
    pub maxbreadcrumbs: usize,
    /// Send personal data (client IP addresses).
    pub senddefaultpii: bool,
}

impl Default for SentryConfig {
    fn default() -> Self {
        Self {
            dsn: String::new(),
            environment: String::new(),
            release: String::new(),
            debug: false,
            enabletracing: false,
            tracessamplerate: 0.0,
            profilessamplerate: 0.0,
            samplerate: 1.0,
            attachstacktrace: true,
            servername: String::new(),
            dist: String::new(),
            maxbreadcrumbs: 100,
            senddefaultpii: false,
        }
    }
}

/// `influxdb.*`: Poseidon's metrics sink.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfluxConfig {
    /// Base URL of the InfluxDB server; empty disables the output.
    #[serde(deserialize_with = "lenient_string")]
    pub url: String,
    /// API token (v2) or `user:password` (v1).
    #[serde(deserialize_with = "lenient_string")]
    pub token: String,
    /// Organisation (v2 API).
    #[serde(deserialize_with = "lenient_string")]
    pub organization: String,
    /// Bucket (v2), or database (v1).
    #[serde(deserialize_with = "lenient_string")]
    pub bucket: String,
    /// Value of the `stage` tag of every point.
    #[serde(deserialize_with = "lenient_string")]
    pub stage: String,
    /// `v2` (Poseidon's `/api/v2/write`, the default) or `v1` (`/write?db=`).
    #[serde(deserialize_with = "lenient_string")]
    pub api: String,
    /// Seconds between the periodic pool points (Poseidon: a minute).
    pub periodseconds: u64,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            token: String::new(),
            organization: String::new(),
            bucket: String::new(),
            stage: String::new(),
            api: String::new(),
            periodseconds: 60,
        }
    }
}

/// `profiling.*`: accepted so that Poseidon's files load; Go's profiler has no counterpart.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfilingConfig {
    /// CPU profiling (Go only).
    pub cpuenabled: bool,
    /// CPU profile file (Go only).
    #[serde(deserialize_with = "lenient_string")]
    pub cpufile: String,
    /// Heap watchdog interval (Go only).
    pub memoryinterval: u64,
    /// Heap watchdog threshold (Go only).
    pub memorythreshold: u64,
}

/// `aws.*`: Poseidon's AWS Lambda executor, which this server does not have.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsConfig {
    /// Must stay false.
    pub enabled: bool,
    /// Accepted, unused.
    #[serde(deserialize_with = "lenient_string")]
    pub endpoint: String,
    /// Accepted, unused.
    pub functions: Vec<String>,
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
    "metrics",
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
            // A string, never YAML: the lenient deserializer converts it to the setting's type.
            set_path(&mut tree, &segments, serde_yaml::Value::String(value));
        }
        let mut config: Config = typed(tree, "")?;
        config.nomad = nomad_section(std::mem::take(&mut config.nomad_tree))?;
        if !config.plugins.is_null() {
            let plugins: PluginsConfig = typed(config.plugins.clone(), "plugins.")?;
            config.plugins = serde_yaml::to_value(plugins).map_err(|e| ConfigError::Invalid {
                key: "plugins".into(),
                message: e.to_string(),
            })?;
        }
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
        if !["textformatter", "jsonformatter"]
            .contains(&self.logger.formatter.to_ascii_lowercase().as_str())
        {
            return Err(invalid(
                "logger.formatter",
                "must be TextFormatter or JSONFormatter",
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
        if self.aws.enabled {
            return Err(invalid(
                "aws.enabled",
                "AWS Lambda environments are not supported by this server; remove the aws section or set enabled: false",
            ));
        }
        if self.influxdb.periodseconds == 0 {
            return Err(invalid("influxdb.periodseconds", "must be positive"));
        }
        if !["", "v1", "v2"].contains(&self.influxdb.api.as_str()) {
            return Err(invalid("influxdb.api", "must be v1 or v2"));
        }
        if !self.influxdb.url.is_empty() && self.influxdb.bucket.is_empty() {
            return Err(invalid(
                "influxdb.bucket",
                "is required when influxdb.url is set",
            ));
        }
        Ok(())
    }

    /// One line saying what this configuration will do (for `poseidon config check`).
    pub fn summary(&self) -> String {
        let backend = if self.nomad.enabled {
            format!("nomad at {}", self.nomad.settings.base_url())
        } else {
            format!("local (state in {})", self.local.statedir.display())
        };
        let listen = if self.server.systemdsocketactivation {
            "sockets passed by systemd".to_string()
        } else {
            format!("{}:{}", self.server.address, self.server.port)
        };
        let mut extras = Vec::new();
        if self.server.tls.active {
            extras.push("TLS".to_string());
        }
        if !self.server.token.is_empty() {
            extras.push("token".to_string());
        }
        if !self.plugins.is_null() {
            extras.push("plugins".to_string());
        }
        if !self.influxdb.url.is_empty() {
            extras.push(format!("InfluxDB at {}", self.influxdb.url));
        }
        if !self.sentry.dsn.is_empty() {
            extras.push("Sentry".to_string());
        }
        let extras = if extras.is_empty() {
            String::new()
        } else {
            format!("; {}", extras.join(", "))
        };
        format!("backend {backend}; listening on {listen}{extras}")
    }
}

/// Deserializes a tree with string conversion, naming the key of the first error and refusing keys
/// no setting reads (`prefix` is the dotted path of the tree, e.g. `plugins.`).
fn typed<T: serde::de::DeserializeOwned>(
    tree: serde_yaml::Value,
    prefix: &str,
) -> Result<T, ConfigError> {
    let mut unknown = None;
    let mut note = |path: serde_ignored::Path<'_>| {
        unknown.get_or_insert_with(|| path.to_string());
    };
    let value = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        Lenient(tree),
        &mut note,
    ))
    .map_err(|e| ConfigError::Invalid {
        key: format!("{prefix}{}", e.path()),
        message: e.inner().to_string(),
    })?;
    match unknown {
        Some(key) => Err(ConfigError::Invalid {
            key: format!("{prefix}{key}"),
            message: "unknown key (no setting has this name)".into(),
        }),
        None => Ok(value),
    }
}

/// `nomad.*`: `enabled` plus the Nomad backend's settings. Poseidon's default backend was Nomad;
/// ours is local, so a section that names a Nomad address but does not say `enabled` is refused
/// rather than silently ignored.
fn nomad_section(mut tree: serde_yaml::Mapping) -> Result<NomadSection, ConfigError> {
    let enabled = tree.remove("enabled");
    let enabled = match enabled {
        Some(value) => typed::<bool>(value, "nomad.enabled").map_err(|e| match e {
            ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                key: "nomad.enabled".into(),
                message,
            },
            other => other,
        })?,
        None if tree.contains_key("address") => {
            return Err(ConfigError::Invalid {
                key: "nomad.enabled".into(),
                message: "nomad.address is set but nomad.enabled is not: this server's default \
                          backend is the local one (Poseidon's default was Nomad); set \
                          nomad.enabled: true to use Nomad (or false to use the local backend)"
                    .into(),
            })
        }
        None => false,
    };
    let settings = typed(serde_yaml::Value::Mapping(tree), "nomad.")?;
    Ok(NomadSection { enabled, settings })
}

fn read(path: &Path) -> Result<serde_yaml::Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tree = serde_yaml::from_str(&text).map_err(|e| ConfigError::Invalid {
        key: e
            .location()
            .map(|l| format!("line {}", l.line()))
            .unwrap_or_else(|| "(file)".into()),
        message: e.to_string(),
    })?;
    drop_empty_keys(&mut tree);
    Ok(tree)
}

/// Removes the keys whose value is empty (`null`), at every depth: as in Poseidon, such a key
/// keeps its default — a section whose keys are all commented out (`sentry:` in Poseidon's own
/// example file) or a key left blank (`port:`).
fn drop_empty_keys(tree: &mut serde_yaml::Value) {
    if let serde_yaml::Value::Mapping(map) = tree {
        map.retain(|_, value| !value.is_null());
        for value in map.values_mut() {
            drop_empty_keys(value);
        }
    }
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

    #[test]
    fn variables_are_strings_not_yaml() {
        for token in ["#secret", "&anchor", "*alias", "null", "~", "[a]", "{a: 1}"] {
            let c = Config::load(None, env(&[("POSEIDON_SERVER_TOKEN", token)])).unwrap();
            assert_eq!(c.server.token, token);
        }
        let c = Config::load(
            None,
            env(&[
                ("POSEIDON_NOMAD_ENABLED", "true"),
                ("POSEIDON_NOMAD_TOKEN", "12345"),
                ("POSEIDON_NOMAD_PORT", "4747"),
                ("POSEIDON_NOMAD_DATACENTERS", "\"dc1 dc2\""),
            ]),
        )
        .unwrap();
        assert!(c.nomad.enabled);
        assert_eq!(c.nomad.settings.token, "12345");
        assert_eq!(c.nomad.settings.port, 4747);
        assert_eq!(c.nomad.settings.datacenters, ["dc1", "dc2"]);
    }

    #[test]
    fn unknown_keys_stop_the_start_in_every_section() {
        let dir = std::env::temp_dir().join(format!("poseidon-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (yaml, key) in [
            ("nomad:\n  enabled: true\n  adress: x\n", "nomad.adress"),
            (
                "plugins:\n  directory: /p\n  limitz: {}\n",
                "plugins.limitz",
            ),
            ("server:\n  prot: 1\n", "server.prot"),
            ("influxdb:\n  uri: x\n", "influxdb.uri"),
        ] {
            let file = dir.join("c.yaml");
            std::fs::write(&file, yaml).unwrap();
            let e = Config::load(Some(&file), env(&[])).unwrap_err();
            assert!(e.to_string().contains(key), "{yaml}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nomad_address_without_enabled_and_aws_are_refused() {
        let e = Config::load(None, env(&[("POSEIDON_NOMAD_ADDRESS", "nomad")])).unwrap_err();
        assert!(
            e.to_string().contains("default backend is the local one"),
            "{e}"
        );
        let e = Config::load(None, env(&[("POSEIDON_AWS_ENABLED", "true")])).unwrap_err();
        assert!(e.to_string().contains("aws.enabled"), "{e}");
    }
}
