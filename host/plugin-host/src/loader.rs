//! Compiling, inspecting and pre-instantiating one plugin file.

use crate::decisions::DecisionCache;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use semver::Version;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use crate::bindings::{v1, v2};
use crate::config::PluginKind;
use crate::error::PluginError;
use crate::placement::Placement;
use crate::runtime::{HostState, PluginIdentity, Runtime};
use crate::spare::Spare;
use crate::WIT_VERSIONS;

/// WIT package of the plugin interfaces.
const PACKAGE: &str = "poseidon:plugins";

/// The pre-instantiated component, typed by kind and WIT version (`V1` = 0.1.x, served
/// through the 0.1 bindings and adapted; `V2` = 0.2.x).
#[derive(Clone)]
pub(crate) enum PluginPre {
    PoolSizerV1(v1::pool_sizer::PoolSizerPluginPre<HostState>),
    PoolSizerV2(v2::pool_sizer::PoolSizerPluginPre<HostState>),
    PreprocessorV1(v1::preprocessor::PreprocessorPluginPre<HostState>),
    PreprocessorV2(v2::preprocessor::PreprocessorPluginPre<HostState>),
    AuthenticatorV1(v1::authenticator::AuthenticatorPluginPre<HostState>),
    AuthenticatorV2(v2::authenticator::AuthenticatorPluginPre<HostState>),
    Observer(v2::observer::ObserverPluginPre<HostState>),
}

/// A fresh instance of a [`PluginPre`], typed like it: the exports one call may use.
pub(crate) enum PluginInstance {
    PoolSizerV1(v1::pool_sizer::PoolSizerPlugin),
    PoolSizerV2(v2::pool_sizer::PoolSizerPlugin),
    PreprocessorV1(v1::preprocessor::PreprocessorPlugin),
    PreprocessorV2(v2::preprocessor::PreprocessorPlugin),
    AuthenticatorV1(v1::authenticator::AuthenticatorPlugin),
    AuthenticatorV2(v2::authenticator::AuthenticatorPlugin),
    Observer(v2::observer::ObserverPlugin),
}

impl PluginPre {
    /// A new instance of the component in `store` (its start-up code runs now).
    pub fn instantiate(
        &self,
        store: &mut wasmtime::Store<HostState>,
    ) -> wasmtime::Result<PluginInstance> {
        Ok(match self {
            PluginPre::PoolSizerV1(p) => PluginInstance::PoolSizerV1(p.instantiate(store)?),
            PluginPre::PoolSizerV2(p) => PluginInstance::PoolSizerV2(p.instantiate(store)?),
            PluginPre::PreprocessorV1(p) => PluginInstance::PreprocessorV1(p.instantiate(store)?),
            PluginPre::PreprocessorV2(p) => PluginInstance::PreprocessorV2(p.instantiate(store)?),
            PluginPre::AuthenticatorV1(p) => PluginInstance::AuthenticatorV1(p.instantiate(store)?),
            PluginPre::AuthenticatorV2(p) => PluginInstance::AuthenticatorV2(p.instantiate(store)?),
            PluginPre::Observer(p) => PluginInstance::Observer(p.instantiate(store)?),
        })
    }
}

/// One loaded version of a plugin file.
pub(crate) struct LoadedPlugin {
    pub identity: Arc<PluginIdentity>,
    pub wit_version: Version,
    pub loaded_at: SystemTime,
    pub pre: PluginPre,
    /// Whether the machine code came from the compile cache (`None`: no cache in use).
    pub from_cache: Option<bool>,
    /// Where this version's calls run (shared with the copies a reconfiguration makes).
    pub placement: Arc<Placement>,
    /// The authenticator's decisions under this version and `config:` (empty in a copy).
    pub decisions: DecisionCache,
    /// The next call's instance, made ahead of it (empty in a copy).
    pub spare: Spare,
}

/// What a load learned besides the plugin itself.
pub(crate) struct LoadDetails {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub compile_ms: u64,
    /// Whether the machine code came from the compile cache (`None`: no cache in use).
    pub from_cache: Option<bool>,
}

/// SHA-256 of `bytes`, lower-case hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The versions of `poseidon:plugins` this host accepts, for messages (`0.1.x or 0.2.x`).
pub(crate) fn accepted_versions() -> String {
    WIT_VERSIONS
        .iter()
        .map(|v| {
            let v = Version::parse(v).expect("WIT_VERSIONS are valid semver versions");
            if v.major == 0 {
                format!("0.{}.x", v.minor)
            } else {
                format!("{}.x", v.major)
            }
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Which of the host's WIT versions serves a plugin built for `version`: the one with
/// the same minor version for 0.x, the same major version from 1.0 on. `None` if none.
pub(crate) fn compatible(version: &Version) -> Option<u64> {
    WIT_VERSIONS
        .iter()
        .map(|v| Version::parse(v).expect("WIT_VERSIONS are valid semver versions"))
        .find(|host| {
            if host.major == 0 {
                version.major == 0 && version.minor == host.minor
            } else {
                version.major == host.major
            }
        })
        .map(|host| {
            if host.major == 0 {
                host.minor
            } else {
                host.major * 100
            }
        })
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
    match compatible(&version) {
        None => Err(incompatible(&version.to_string())),
        // The observer interface exists from 0.2 on.
        Some(1) if kind == PluginKind::Observer => Err(incompatible(&version.to_string())),
        Some(_) => Ok((kind, version)),
    }
}

/// The first bytes of every WebAssembly binary, module or component.
const WASM_MAGIC: &[u8] = b"\0asm";

/// `message` on one line (a compiler message may embed a multi-line dump), so that a log
/// line and the status's `lastError` stay one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
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
    // Loads are serialised (the host's reload lock), so a hit counted during this compile
    // is this file's.
    let hits_before = runtime.cache.as_ref().map(|c| c.cache_hits());
    if !bytes.starts_with(WASM_MAGIC) {
        return Err(PluginError::Compile {
            path: path.to_path_buf(),
            message: "it does not start with the WebAssembly magic bytes \\0asm".into(),
        });
    }
    let component = Component::new(&runtime.engine, bytes).map_err(|e| PluginError::Compile {
        path: path.to_path_buf(),
        message: one_line(&format!("{e:#}")),
    })?;
    let compile_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let from_cache = runtime
        .cache
        .as_ref()
        .zip(hits_before)
        .map(|(c, before)| c.cache_hits() > before);
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
        message: link_message(&e),
    };
    let instance_pre = runtime
        .linker
        .instantiate_pre(&component)
        .map_err(link_error)?;
    let v1 = compatible(&wit_version) == Some(1);
    let pre = match (kind, v1) {
        (PluginKind::PoolSizer, true) => PluginPre::PoolSizerV1(
            v1::pool_sizer::PoolSizerPluginPre::new(instance_pre).map_err(link_error)?,
        ),
        (PluginKind::PoolSizer, false) => PluginPre::PoolSizerV2(
            v2::pool_sizer::PoolSizerPluginPre::new(instance_pre).map_err(link_error)?,
        ),
        (PluginKind::Preprocessor, true) => PluginPre::PreprocessorV1(
            v1::preprocessor::PreprocessorPluginPre::new(instance_pre).map_err(link_error)?,
        ),
        (PluginKind::Preprocessor, false) => PluginPre::PreprocessorV2(
            v2::preprocessor::PreprocessorPluginPre::new(instance_pre).map_err(link_error)?,
        ),
        (PluginKind::Authenticator, true) => PluginPre::AuthenticatorV1(
            v1::authenticator::AuthenticatorPluginPre::new(instance_pre).map_err(link_error)?,
        ),
        (PluginKind::Authenticator, false) => PluginPre::AuthenticatorV2(
            v2::authenticator::AuthenticatorPluginPre::new(instance_pre).map_err(link_error)?,
        ),
        (PluginKind::Observer, _) => PluginPre::Observer(
            v2::observer::ObserverPluginPre::new(instance_pre).map_err(link_error)?,
        ),
    };
    let identity = Arc::new(PluginIdentity {
        name,
        kind,
        digest,
        config,
    });
    // Smoke test: the instance must fit the limits and its start-up code must not trap.
    let mut store = runtime.instantiation_store(identity.clone());
    if let Err(e) = pre.instantiate(&mut store) {
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
            from_cache,
            placement: Arc::default(),
            decisions: DecisionCache::default(),
            spare: Spare::default(),
        },
        LoadDetails {
            imports,
            exports,
            compile_ms,
            from_cache,
        },
    ))
}

/// The linker's complaint, led by what is missing when the component imports an
/// interface the host does not offer (a plugin built against a world with more imports,
/// e.g. a Python plugin importing `wasi:http`).
fn link_message(error: &wasmtime::Error) -> String {
    let full = format!("{error:#}");
    let missing = full
        .split("component imports instance `")
        .nth(1)
        .and_then(|rest| rest.split('`').next());
    match missing {
        Some(name) => format!(
            "it imports `{name}`, which this host does not offer (plugins may import WASI 0.2 \
             and poseidon:plugins/host only; rebuild it against one of the plugin worlds) \
             [{full}]"
        ),
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_compatibility_follows_semver() {
        assert_eq!(compatible(&Version::new(0, 1, 0)), Some(1));
        assert_eq!(compatible(&Version::new(0, 1, 7)), Some(1));
        assert_eq!(compatible(&Version::new(0, 2, 0)), Some(2));
        assert_eq!(compatible(&Version::new(0, 2, 3)), Some(2));
        assert_eq!(compatible(&Version::new(0, 3, 0)), None);
        assert_eq!(compatible(&Version::new(1, 0, 0)), None);
        assert_eq!(accepted_versions(), "0.1.x or 0.2.x");
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
            e.to_string()
                .contains("accepts poseidon:plugins@0.1.x or 0.2.x"),
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
        let ok = inspect(p, &["poseidon:plugins/observer@0.2.0".into()]).unwrap();
        assert_eq!(ok, (PluginKind::Observer, Version::new(0, 2, 0)));
        let e = inspect(p, &["poseidon:plugins/observer@0.1.0".into()]).unwrap_err();
        assert!(matches!(e, PluginError::IncompatibleVersion { .. }), "{e}");
    }
}
