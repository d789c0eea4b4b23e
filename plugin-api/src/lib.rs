//! Write policy plugins for Poseidon (Rust) in Rust.
//!
//! A plugin is a WebAssembly component built for the `wasm32-wasip2` target. It
//! implements exactly one of three kinds, each with a trait and an export macro:
//!
//! | kind | trait | export macro | world |
//! |---|---|---|---|
//! | pool sizer | [`PoolSizer`] | [`export_pool_sizer!`] | `poseidon:plugins/pool-sizer-plugin` |
//! | preprocessor | [`Preprocessor`] | [`export_preprocessor!`] | `poseidon:plugins/preprocessor-plugin` |
//! | authenticator | [`Authenticator`] | [`export_authenticator!`] | `poseidon:plugins/authenticator-plugin` |
//!
//! The host gives a plugin nothing but its own configuration values ([`config`]), a
//! logger ([`log()`] and the [`info!`]-style macros), the clocks and random numbers:
//! no files, no network, no host environment variables.
//!
//! # Example: a complete pool sizer
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "lecture-sizer"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! poseidon-plugin-api = { git = "…", package = "poseidon-plugin-api" }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use poseidon_plugin_api::{config, export_pool_sizer, info, Environment, PoolSizer, PoolState};
//!
//! /// Keeps `extra` (from the plugin's configuration) more runners idle than the
//! /// last minute's claims.
//! pub struct LectureSizer;
//!
//! impl PoolSizer for LectureSizer {
//!     fn wanted_idle(environment: Environment, state: PoolState) -> u32 {
//!         let extra: u32 = config::parse("extra").unwrap_or(2);
//!         let last_minute = state.claims_per_minute.last().copied().unwrap_or(0);
//!         info!("environment {}: {} claims in the last minute", environment.id, last_minute);
//!         last_minute + extra
//!     }
//! }
//!
//! export_pool_sizer!(LectureSizer);
//! # fn main() {
//! #     poseidon_plugin_api::testing::set_config([("extra", "3")]);
//! #     let env = Environment { id: 1, image: "python".into(), prewarming_pool_size: 5,
//! #         cpu_limit: 100, memory_limit: 256, network_access: false, exposed_ports: vec![] };
//! #     let state = PoolState { configured_size: 5, idle: 1, used: 0, starting: 0,
//! #         claims_per_minute: vec![0; 60], empty_pool_misses: 0, now: 0 };
//! #     assert_eq!(LectureSizer::wanted_idle(env, state), 3);
//! # }
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release`, check it with
//! `poseidon plugin check target/wasm32-wasip2/release/lecture_sizer.wasm`, and load it
//! through the `plugins:` section of `configuration.yaml` (see the crate's README).
//!
//! # Testing plugins natively
//!
//! The crate also compiles for the host target, so plugin logic can be unit-tested with
//! a plain `cargo test`. There, [`log()`] writes to stderr and [`config`] reads the values
//! set with [`testing::set_config`] (per thread).

#[doc(hidden)]
#[allow(unsafe_code, missing_docs, clippy::all)]
#[path = "bindings.rs"]
pub mod __bindings;

use __bindings::pool_sizer::poseidon::plugins::host as wit_host;
use __bindings::pool_sizer::poseidon::plugins::types as wit_types;

/// The version of the `poseidon:plugins` WIT package this crate implements. The host
/// accepts plugins whose version is semver-compatible with its own.
pub const WIT_VERSION: &str = "0.1.0";

/// An execution environment as configured in Poseidon.
pub type Environment = wit_types::Environment;
/// The state of an environment's pool of idle runners.
pub type PoolState = wit_types::PoolState;
/// A request to execute a command in a runner.
pub type ExecuteRequest = wit_types::ExecuteRequest;
/// A file to create or overwrite in a runner.
pub type File = wit_types::File;
/// A request to change the files of a runner.
pub type FileUpdate = wit_types::FileUpdate;
/// An incoming HTTP request to authenticate.
pub type AuthRequest = wit_types::AuthRequest;
/// Who is calling, and what they may use.
pub type Principal = wit_types::Principal;
/// A refused request: HTTP status (401 or 403) and message.
pub type Denial = wit_types::Denial;
/// Severity of a log message.
pub type LogLevel = wit_host::LogLevel;

/// A plugin that decides how many idle runners an environment keeps.
pub trait PoolSizer {
    /// Returns the wanted number of idle runners for `environment`. The host clamps
    /// the answer to its configured bounds and applies hysteresis.
    fn wanted_idle(environment: Environment, state: PoolState) -> u32;
}

/// A plugin that checks and rewrites requests before Poseidon acts on them.
///
/// Both methods default to passing the request through unchanged.
pub trait Preprocessor {
    /// Returns the (possibly changed) execute request, or `Err(message)` to reject it;
    /// the client then gets HTTP 400 with `message`.
    fn preprocess_execute(request: ExecuteRequest) -> Result<ExecuteRequest, String> {
        Ok(request)
    }

    /// Returns the (possibly changed) file update, or `Err(message)` to reject it; the
    /// client then gets HTTP 400 with `message`.
    fn preprocess_files(update: FileUpdate) -> Result<FileUpdate, String> {
        Ok(update)
    }
}

/// A plugin that authenticates API requests.
pub trait Authenticator {
    /// Returns who is calling, or why the request is refused.
    fn authenticate(request: AuthRequest) -> Result<Principal, Denial>;
}

impl PoolState {
    /// Sum of the claims in the last `minutes` minutes (including the current one).
    pub fn recent_claims(&self, minutes: usize) -> u64 {
        let n = self.claims_per_minute.len();
        self.claims_per_minute[n.saturating_sub(minutes)..]
            .iter()
            .map(|&c| u64::from(c))
            .sum()
    }
}

impl ExecuteRequest {
    /// The value of environment variable `name`, if set.
    pub fn env_var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets environment variable `name` to `value`, replacing an earlier value.
    pub fn set_env_var(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.env.iter_mut().find(|(k, _)| *k == name) {
            Some(entry) => entry.1 = value,
            None => self.env.push((name, value)),
        }
    }
}

impl FileUpdate {
    /// Total size in bytes of the files to copy.
    pub fn total_size(&self) -> u64 {
        self.copy.iter().map(|f| f.content.len() as u64).sum()
    }
}

impl AuthRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The token of an `Authorization: Bearer <token>` header.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header("authorization")?.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    }
}

impl Principal {
    /// A principal for `tenant` that may use every environment.
    pub fn tenant(tenant: impl Into<String>) -> Self {
        Principal {
            tenant: tenant.into(),
            environments: None,
        }
    }

    /// A principal for `tenant` limited to `environments`.
    pub fn with_environments(tenant: impl Into<String>, environments: Vec<i64>) -> Self {
        Principal {
            tenant: tenant.into(),
            environments: Some(environments),
        }
    }
}

impl Denial {
    /// HTTP 401: the caller is not authenticated.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Denial {
            status: 401,
            message: message.into(),
        }
    }

    /// HTTP 403: the caller is authenticated but not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Denial {
            status: 403,
            message: message.into(),
        }
    }
}

/// Writes a log line through the host, which tags it with the plugin's name.
///
/// On a native target (unit tests) the line goes to stderr.
pub fn log(level: LogLevel, message: &str) {
    #[cfg(target_arch = "wasm32")]
    wit_host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message}");
}

/// Logs a formatted message at a given level: `log!(LogLevel::Info, "x = {}", x)`.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {
        $crate::log($level, &::std::format!($($arg)+))
    };
}

/// Logs a formatted message at trace level.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Trace, $($arg)+) };
}

/// Logs a formatted message at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Debug, $($arg)+) };
}

/// Logs a formatted message at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Info, $($arg)+) };
}

/// Logs a formatted message at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Warn, $($arg)+) };
}

/// Logs a formatted message at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Error, $($arg)+) };
}

/// The plugin's own configuration: the `config:` map of its entry in Poseidon's
/// `configuration.yaml`.
pub mod config {
    /// The value of `key`, if configured.
    pub fn get(key: &str) -> Option<String> {
        #[cfg(target_arch = "wasm32")]
        return super::wit_host::config_get(key);
        #[cfg(not(target_arch = "wasm32"))]
        return super::testing::config_get(key);
    }

    /// All configured entries, sorted by key.
    pub fn entries() -> Vec<(String, String)> {
        #[cfg(target_arch = "wasm32")]
        return super::wit_host::config_entries();
        #[cfg(not(target_arch = "wasm32"))]
        return super::testing::config_entries();
    }

    /// The value of `key` parsed as `T`; `None` if missing or unparsable.
    pub fn parse<T: std::str::FromStr>(key: &str) -> Option<T> {
        get(key).and_then(|v| v.trim().parse().ok())
    }

    /// The value of `key` split at commas, each item trimmed; empty items are dropped.
    pub fn list(key: &str) -> Vec<String> {
        get(key).map(|v| split_list(&v)).unwrap_or_default()
    }

    fn split_list(value: &str) -> Vec<String> {
        value
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// The whole configuration, read with one host call.
    ///
    /// Every host call copies its strings into the plugin's memory, so a plugin that reads
    /// several keys in one call is faster reading them all at once (`Snapshot::read()`, then
    /// [`Snapshot::get`] and friends) than with one [`get`] per key. Each call of a plugin
    /// runs in a fresh instance, so a snapshot is never stale within a call.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Snapshot {
        /// The entries, sorted by key.
        entries: Vec<(String, String)>,
    }

    impl Snapshot {
        /// Reads every configured entry.
        pub fn read() -> Self {
            Self::from_entries(entries())
        }

        /// A snapshot of `entries` (in any order).
        pub fn from_entries(mut entries: Vec<(String, String)>) -> Self {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Snapshot { entries }
        }

        /// The value of `key`, if configured.
        pub fn get(&self, key: &str) -> Option<&str> {
            self.entries
                .binary_search_by(|(k, _)| k.as_str().cmp(key))
                .ok()
                .map(|i| self.entries[i].1.as_str())
        }

        /// The value of `key` parsed as `T`; `None` if missing or unparsable (as [`parse`]).
        pub fn parse<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
            self.get(key).and_then(|v| v.trim().parse().ok())
        }

        /// The value of `key` split at commas, each item trimmed, empty items dropped (as
        /// [`list`]).
        pub fn list(&self, key: &str) -> Vec<String> {
            self.get(key).map(split_list).unwrap_or_default()
        }

        /// The entries whose key starts with `prefix`, with the prefix removed, in key order.
        pub fn with_prefix<'a>(
            &'a self,
            prefix: &'a str,
        ) -> impl Iterator<Item = (&'a str, &'a str)> {
            self.entries
                .iter()
                .filter_map(move |(k, v)| k.strip_prefix(prefix).map(|rest| (rest, v.as_str())))
        }
    }
}

/// Helpers for unit-testing plugins on the native target.
pub mod testing {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        static CONFIG: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
    }

    /// Replaces this thread's configuration, as seen by [`crate::config`] on a native
    /// target. Has no effect inside WebAssembly, where the host provides the values.
    pub fn set_config<K: Into<String>, V: Into<String>>(entries: impl IntoIterator<Item = (K, V)>) {
        let map = entries
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        CONFIG.with(|c| *c.borrow_mut() = map);
    }

    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub(crate) fn config_get(key: &str) -> Option<String> {
        CONFIG.with(|c| c.borrow().get(key).cloned())
    }

    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub(crate) fn config_entries() -> Vec<(String, String)> {
        CONFIG.with(|c| {
            c.borrow()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
    }
}

/// Exports a [`PoolSizer`] implementation as the plugin's `pool-sizer` interface.
///
/// Use it once, at the top level of the plugin crate: `export_pool_sizer!(MySizer);`
#[macro_export]
macro_rules! export_pool_sizer {
    ($ty:ty) => {
        // Exports exist only in the WebAssembly build; natively (unit tests) the
        // component export names are not valid linker symbols.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __PoseidonPoolSizer;
            impl $crate::__bindings::pool_sizer::exports::poseidon::plugins::pool_sizer::Guest
                for __PoseidonPoolSizer
            {
                fn wanted_idle(environment: $crate::Environment, state: $crate::PoolState) -> u32 {
                    <$ty as $crate::PoolSizer>::wanted_idle(environment, state)
                }
            }
            $crate::__bindings::pool_sizer::__poseidon_export_pool_sizer_world!(
                __PoseidonPoolSizer with_types_in $crate::__bindings::pool_sizer
            );
        };
    };
}

/// Exports a [`Preprocessor`] implementation as the plugin's `preprocessor` interface.
///
/// Use it once, at the top level of the plugin crate: `export_preprocessor!(MyGuard);`
#[macro_export]
macro_rules! export_preprocessor {
    ($ty:ty) => {
        // Exports exist only in the WebAssembly build; natively (unit tests) the
        // component export names are not valid linker symbols.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __PoseidonPreprocessor;
            impl $crate::__bindings::preprocessor::exports::poseidon::plugins::preprocessor::Guest
                for __PoseidonPreprocessor
            {
                fn preprocess_execute(
                    request: $crate::ExecuteRequest,
                ) -> ::std::result::Result<$crate::ExecuteRequest, ::std::string::String> {
                    <$ty as $crate::Preprocessor>::preprocess_execute(request)
                }
                fn preprocess_files(
                    update: $crate::FileUpdate,
                ) -> ::std::result::Result<$crate::FileUpdate, ::std::string::String> {
                    <$ty as $crate::Preprocessor>::preprocess_files(update)
                }
            }
            $crate::__bindings::preprocessor::__poseidon_export_preprocessor_world!(
                __PoseidonPreprocessor with_types_in $crate::__bindings::preprocessor
            );
        };
    };
}

/// Exports an [`Authenticator`] implementation as the plugin's `authenticator`
/// interface.
///
/// Use it once, at the top level of the plugin crate: `export_authenticator!(MyAuth);`
#[macro_export]
macro_rules! export_authenticator {
    ($ty:ty) => {
        // Exports exist only in the WebAssembly build; natively (unit tests) the
        // component export names are not valid linker symbols.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __PoseidonAuthenticator;
            impl $crate::__bindings::authenticator::exports::poseidon::plugins::authenticator::Guest
                for __PoseidonAuthenticator
            {
                fn authenticate(
                    request: $crate::AuthRequest,
                ) -> ::std::result::Result<$crate::Principal, $crate::Denial> {
                    <$ty as $crate::Authenticator>::authenticate(request)
                }
            }
            $crate::__bindings::authenticator::__poseidon_export_authenticator_world!(
                __PoseidonAuthenticator with_types_in $crate::__bindings::authenticator
            );
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_answers_as_the_per_key_functions_do() {
        testing::set_config([
            ("b", " 7 "),
            ("a", "x, y,,z "),
            ("env.A", "1"),
            ("env.", "2"),
            ("envB", "3"),
        ]);
        let snapshot = config::Snapshot::read();
        for key in ["a", "b", "env.A", "missing"] {
            assert_eq!(
                snapshot.get(key).map(str::to_string),
                config::get(key),
                "{key}"
            );
            assert_eq!(snapshot.list(key), config::list(key), "{key}");
            assert_eq!(
                snapshot.parse::<u32>(key),
                config::parse::<u32>(key),
                "{key}"
            );
        }
        assert_eq!(snapshot.parse::<u32>("b"), Some(7));
        assert_eq!(snapshot.list("a"), vec!["x", "y", "z"]);
        assert_eq!(
            snapshot.with_prefix("env.").collect::<Vec<_>>(),
            vec![("", "2"), ("A", "1")]
        );
        let unsorted = config::Snapshot::from_entries(vec![
            ("z".into(), "1".into()),
            ("a".into(), "2".into()),
        ]);
        assert_eq!(
            (unsorted.get("a"), unsorted.get("z")),
            (Some("2"), Some("1"))
        );
    }

    #[test]
    fn bearer_token_is_parsed_case_insensitively() {
        let req = AuthRequest {
            method: "GET".into(),
            path: "/api/v1/health".into(),
            headers: vec![("Authorization".into(), "bearer  abc.def ".into())],
            peer_address: "127.0.0.1:1".into(),
        };
        assert_eq!(req.bearer_token(), Some("abc.def"));
        let basic = AuthRequest {
            headers: vec![("authorization".into(), "Basic Zm9v".into())],
            ..req
        };
        assert_eq!(basic.bearer_token(), None);
    }

    #[test]
    fn set_env_var_replaces_or_appends() {
        let mut req = ExecuteRequest {
            command: "true".into(),
            env: vec![("A".into(), "1".into())],
            time_limit: 0,
            privileged: false,
            environment_id: 1,
            principal: None,
        };
        req.set_env_var("A", "2");
        req.set_env_var("B", "3");
        assert_eq!(req.env_var("A"), Some("2"));
        assert_eq!(req.env_var("B"), Some("3"));
        assert_eq!(req.env.len(), 2);
    }

    #[test]
    fn recent_claims_sums_the_tail() {
        let mut claims = vec![0; 60];
        claims[58] = 2;
        claims[59] = 3;
        let state = PoolState {
            configured_size: 1,
            idle: 0,
            used: 0,
            starting: 0,
            claims_per_minute: claims,
            empty_pool_misses: 0,
            now: 0,
        };
        assert_eq!(state.recent_claims(1), 3);
        assert_eq!(state.recent_claims(2), 5);
        assert_eq!(state.recent_claims(100), 5);
    }

    #[test]
    fn config_reads_test_values() {
        testing::set_config([("a", " 5 "), ("list", "x, y,,z")]);
        assert_eq!(config::parse::<u32>("a"), Some(5));
        assert_eq!(config::list("list"), vec!["x", "y", "z"]);
        assert_eq!(config::get("missing"), None);
        assert_eq!(config::entries().len(), 2);
    }
}
