//! Error types.

use std::path::PathBuf;

/// Why a plugin (or the plugin host) could not be loaded or checked.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file could not be read.
    #[error("cannot read plugin file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid WebAssembly component (or failed to compile).
    #[error("{}: not a valid WebAssembly component: {message}", path.display())]
    Compile {
        /// The file.
        path: PathBuf,
        /// Compiler message.
        message: String,
    },
    /// The component exports none of the plugin interfaces.
    #[error(
        "{}: exports no poseidon:plugins interface (its exports: {exports}); \
         a plugin exports one of poseidon:plugins/{{pool-sizer,preprocessor,authenticator}}@{accepted}",
        path.display()
    )]
    NotAPlugin {
        /// The file.
        path: PathBuf,
        /// The component's exports, comma-separated.
        exports: String,
        /// The accepted versions, e.g. `0.1.x`.
        accepted: String,
    },
    /// The component exports more than one plugin interface.
    #[error("{}: exports several plugin interfaces ({exports}); a plugin has exactly one kind", path.display())]
    SeveralKinds {
        /// The file.
        path: PathBuf,
        /// The plugin interfaces found.
        exports: String,
    },
    /// The component is of another kind than configured (its entry's `kind`, or `--kind`).
    #[error(
        "{}: is {} plugin, but the configured kind is {expected}",
        path.display(),
        found.with_article()
    )]
    WrongKind {
        /// The file.
        path: PathBuf,
        /// Kind found in the component.
        found: crate::PluginKind,
        /// Kind in the configuration entry.
        expected: crate::PluginKind,
    },
    /// The component was built against an incompatible WIT package version.
    #[error(
        "{}: built for poseidon:plugins@{found}, which this host does not support; \
         it accepts poseidon:plugins@{accepted} (rebuild the plugin against a compatible poseidon-plugin-api)",
        path.display()
    )]
    IncompatibleVersion {
        /// The file.
        path: PathBuf,
        /// Version found in the component.
        found: String,
        /// The accepted versions, e.g. `0.1.x`.
        accepted: String,
    },
    /// The component's imports cannot be satisfied (it wants something the host does
    /// not offer), or its exports do not match the world.
    #[error("{}: cannot be linked: {message}", path.display())]
    Link {
        /// The file.
        path: PathBuf,
        /// Linker message.
        message: String,
    },
    /// The `plugins:` configuration is invalid.
    #[error("invalid plugin configuration: {0}")]
    Config(String),
    /// The WebAssembly engine could not be created.
    #[error("cannot create the WebAssembly engine: {0}")]
    Engine(String),
    /// The plugin directory cannot be watched.
    #[error("cannot watch plugin directory {}: {message}", path.display())]
    Watch {
        /// The directory.
        path: PathBuf,
        /// Watcher message.
        message: String,
    },
}

/// Why one plugin call failed. Its `Display` text ends up in logs, in the status'
/// `lastError` and (for preprocessors and authenticators) in the client's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No version of the plugin is loaded.
    #[error("plugin is not loaded")]
    NotLoaded,
    /// The call did not finish within the wall-clock timeout.
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// The guest used up its run time (epoch deadline).
    #[error("exceeded its run time of {0} ms")]
    Deadline(u64),
    /// The guest used up its fuel.
    #[error("ran out of fuel ({0} units)")]
    OutOfFuel(u64),
    /// The guest hit the memory limit.
    #[error("exceeded the memory limit of {0} MiB")]
    Memory(u64),
    /// The guest trapped (panicked, hit `unreachable`, ...).
    #[error("trapped: {0}")]
    Trap(String),
    /// The instance could not be created.
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    /// The plugin answered something the host cannot accept.
    #[error("gave a bad answer: {0}")]
    BadAnswer(String),
    /// The host itself failed while running the call.
    #[error("host error: {0}")]
    Host(String),
}
