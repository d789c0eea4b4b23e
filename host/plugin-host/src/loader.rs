//! Compiling, inspecting and pre-instantiating one plugin file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use semver::Version;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use crate::bindings::authenticator::AuthenticatorPluginPre;
use crate::bindings::pool_sizer::PoolSizerPluginPre;
use crate::bindings::preprocessor::PreprocessorPluginPre;
use crate::config::PluginKind;
use crate::error::PluginError;
use crate::runtime::{HostState, PluginIdentity, Runtime};
use crate::WIT_VERSION;

/// WIT package of the plugin interfaces.
const PACKAGE: &str = "poseidon:plugins";

/// The pre-instantiated component, typed by kind.
pub(crate) enum PluginPre {
    PoolSizer(PoolSizerPluginPre<HostState>),
    Preprocessor(PreprocessorPluginPre<HostState>),
    Authenticator(AuthenticatorPluginPre<HostState>),
}

/// One loaded version of a plugin file.
pub(crate) struct LoadedPlugin {
    pub identity: Arc<PluginIdentity>,
    pub wit_version: Version,
    pub loaded_at: SystemTime,
    pub pre: PluginPre,
}

/// What a load learned besides the plugin itself.
pub(crate) struct LoadDetails {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub compile_ms: u64,
}

/// SHA-256 of `bytes`, lower-case hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The versions of `poseidon:plugins` this host accepts, for messages (`0.1.x`).
pub(crate) fn accepted_versions() -> String {
    let host = host_version();
    if host.major == 0 {
        format!("0.{}.x", host.minor)
    } else {
        format!("{}.x", host.major)
    }
}

fn host_version() -> Version {
    Version::parse(WIT_VERSION).expect("WIT_VERSION is a valid semver version")
}

/// Whether a plugin built for `version` can be served by this host: the same minor
/// version for 0.x, the same major version from 1.0 on.
pub(crate) fn compatible(version: &Version) -> bool {
    let host = host_version();
    if host.major == 0 {
        version.major == 0 && version.minor == host.minor
    } else {
        version.major == host.major
    }
}

/// Splits an export name `poseidon:plugins/<interface>@<version>` into interface and
/// version (the version may be absent).
fn parse_export(name: &str) -> Option<(&str, Option<&str>)> {
    let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
    Some(match rest.split_once('@') {
        Some((iface, version)) => (iface, Some(version)),
        None => (rest, None),
    })
}

/// Determines kind and WIT version from the component's exports.
pub(crate) fn inspect(
    path: &Path,
    exports: &[String],
) -> Result<(PluginKind, Version), PluginError> {
    let found: Vec<(PluginKind, Option<&str>)> = exports
        .iter()
        .filter_map(|name| parse_export(name))
        .filter_map(|(iface, version)| {
            PluginKind::ALL
                .into_iter()
                .find(|k| k.interface() == iface)
                .map(|k| (k, version))
        })
        .collect();
    let (kind, version) = match found.as_slice() {
        [] => {
            return Err(PluginError::NotAPlugin {
                path: path.to_path_buf(),
                exports: if exports.is_empty() {
                    "none".to_string()
                } else {
                    exports.join(", ")
                },
                accepted: accepted_versions(),
            })
        }
        [one] => *one,
        several => {
            return Err(PluginError::SeveralKinds {
                path: path.to_path_buf(),
                exports: several
                    .iter()
                    .map(|(k, _)| k.interface())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    let incompatible = |found: &str| PluginError::IncompatibleVersion {
        path: path.to_path_buf(),
        found: found.to_string(),
        accepted: accepted_versions(),
    };
    let version = version.ok_or_else(|| incompatible("(no version)"))?;
    let version = Version::parse(version).map_err(|_| incompatible(version))?;
    if !compatible(&version) {
        return Err(incompatible(&version.to_string()));
    }
    Ok((kind, version))
}

/// Compiles `bytes`, checks that they are a compatible plugin (of `expected` kind, if
/// given), pre-instantiates them against the host's linker and instantiates them once
/// as a smoke test. Blocking: run it on a blocking thread.
pub(crate) fn load(
    runtime: &Runtime,
    path: &Path,
    bytes: &[u8],
    expected: Option<PluginKind>,
    name: String,
    config: Arc<BTreeMap<String, String>>,
) -> Result<(LoadedPlugin, LoadDetails), PluginError> {
    let digest = sha256_hex(bytes);
    let started = Instant::now();
    let component = Component::new(&runtime.engine, bytes).map_err(|e| PluginError::Compile {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    })?;
    let compile_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let ty = component.component_type();
    let exports: Vec<String> = ty
        .exports(&runtime.engine)
        .map(|(n, _)| n.to_string())
        .collect();
    let imports: Vec<String> = ty
        .imports(&runtime.engine)
        .map(|(n, _)| n.to_string())
        .collect();
    let (kind, wit_version) = inspect(path, &exports)?;
    if let Some(expected) = expected {
        if expected != kind {
            return Err(PluginError::WrongKind {
                path: path.to_path_buf(),
                found: kind,
                expected,
            });
        }
    }
    let link_error = |e: wasmtime::Error| PluginError::Link {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    };
    let instance_pre = runtime
        .linker
        .instantiate_pre(&component)
        .map_err(link_error)?;
    let pre = match kind {
        PluginKind::PoolSizer => {
            PluginPre::PoolSizer(PoolSizerPluginPre::new(instance_pre).map_err(link_error)?)
        }
        PluginKind::Preprocessor => {
            PluginPre::Preprocessor(PreprocessorPluginPre::new(instance_pre).map_err(link_error)?)
        }
        PluginKind::Authenticator => {
            PluginPre::Authenticator(AuthenticatorPluginPre::new(instance_pre).map_err(link_error)?)
        }
    };
    let identity = Arc::new(PluginIdentity {
        name,
        kind,
        digest,
        config,
    });
    // Smoke test: the instance must fit the limits and its start-up code must not trap.
    let deadline = Instant::now() + Duration::from_millis(runtime.limits.call_timeout_ms);
    let mut store = runtime.store(identity.clone(), Arc::new(AtomicBool::new(false)), deadline);
    let smoke = match &pre {
        PluginPre::PoolSizer(p) => p.instantiate(&mut store).map(drop),
        PluginPre::Preprocessor(p) => p.instantiate(&mut store).map(drop),
        PluginPre::Authenticator(p) => p.instantiate(&mut store).map(drop),
    };
    if let Err(e) = smoke {
        let message = runtime.classify(&store, e).to_string();
        return Err(PluginError::Link {
            path: path.to_path_buf(),
            message: format!("instantiation failed: {message}"),
        });
    }
    Ok((
        LoadedPlugin {
            identity,
            wit_version,
            loaded_at: SystemTime::now(),
            pre,
        },
        LoadDetails {
            imports,
            exports,
            compile_ms,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_compatibility_follows_semver() {
        assert!(compatible(&Version::new(0, 1, 0)));
        assert!(compatible(&Version::new(0, 1, 7)));
        assert!(!compatible(&Version::new(0, 2, 0)));
        assert!(!compatible(&Version::new(1, 0, 0)));
        assert_eq!(accepted_versions(), "0.1.x");
    }

    #[test]
    fn export_names_are_parsed() {
        assert_eq!(
            parse_export("poseidon:plugins/pool-sizer@0.1.0"),
            Some(("pool-sizer", Some("0.1.0")))
        );
        assert_eq!(
            parse_export("poseidon:plugins/authenticator"),
            Some(("authenticator", None))
        );
        assert_eq!(parse_export("wasi:cli/run@0.2.0"), None);
    }

    #[test]
    fn inspect_reports_kind_version_and_problems() {
        let p = Path::new("x.wasm");
        let ok = inspect(p, &["poseidon:plugins/preprocessor@0.1.3".into()]).unwrap();
        assert_eq!(ok, (PluginKind::Preprocessor, Version::new(0, 1, 3)));
        let e = inspect(p, &["poseidon:plugins/pool-sizer@1.0.0".into()]).unwrap_err();
        assert!(e.to_string().contains("poseidon:plugins@1.0.0"), "{e}");
        assert!(
            e.to_string().contains("accepts poseidon:plugins@0.1.x"),
            "{e}"
        );
        let e = inspect(p, &["wasi:cli/run@0.2.0".into()]).unwrap_err();
        assert!(matches!(e, PluginError::NotAPlugin { .. }), "{e}");
        let e = inspect(
            p,
            &[
                "poseidon:plugins/pool-sizer@0.1.0".into(),
                "poseidon:plugins/authenticator@0.1.0".into(),
            ],
        )
        .unwrap_err();
        assert!(matches!(e, PluginError::SeveralKinds { .. }), "{e}");
    }
}
