//! `check_file`, behind `poseidon plugin check FILE`.

use poseidon_plugin_host::{check_file, PluginError, PluginKind};

use crate::common::*;

#[test]
fn describes_each_example_plugin() {
    for (name, kind) in [
        ("demand_sizer", PluginKind::PoolSizer),
        ("timetable_sizer", PluginKind::PoolSizer),
        ("submission_guard", PluginKind::Preprocessor),
        ("jwt_auth", PluginKind::Authenticator),
    ] {
        let d = check_file(&plugin(name)).unwrap();
        assert_eq!(d.kind, kind, "{name}");
        assert_eq!(d.wit_version, "0.1.0", "{name}");
        assert_eq!(d.digest.len(), 64);
        assert!(d.size > 0);
        assert!(
            d.exports
                .iter()
                .any(|e| e == &format!("poseidon:plugins/{}@0.1.0", kind.interface())),
            "{name}: {:?}",
            d.exports
        );
        // The only host interface a plugin sees besides WASI.
        assert!(
            d.imports
                .iter()
                .all(|i| i.starts_with("wasi:") || i.starts_with("poseidon:plugins/")),
            "{name}: {:?}",
            d.imports
        );
    }
}

#[test]
fn refuses_bad_files() {
    let e = check_file(&plugin("test_incompatible")).unwrap_err();
    assert!(matches!(e, PluginError::IncompatibleVersion { .. }), "{e}");
    let dir = temp_dir("check");
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"garbage").unwrap();
    let e = check_file(&garbage).unwrap_err();
    assert!(matches!(e, PluginError::Compile { .. }), "{e}");
    let e = check_file(&dir.join("missing.wasm")).unwrap_err();
    assert!(matches!(e, PluginError::Read { .. }), "{e}");
}
