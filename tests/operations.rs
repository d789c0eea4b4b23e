//! Running the real binary as an operator does: the command line, configuration checks, and
//! what the server does with `POSEIDON_*` variables and configuration mistakes.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use support::{Options, Server, TOKEN};

fn poseidon(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_poseidon"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cannot run poseidon")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A configuration file in a fresh directory.
fn config_file(yaml: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "poseidon-ops-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("configuration.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

#[test]
fn help_and_version_describe_the_command_line() {
    let out = poseidon(&["--help"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let help = text(&out);
    for word in ["--config", "config", "plugin", "serve"] {
        assert!(
            help.contains(word),
            "--help does not mention {word}: {help}"
        );
    }
    let out = poseidon(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        text(&out).trim(),
        format!("poseidon {}", env!("CARGO_PKG_VERSION"))
    );
    let out = poseidon(&["config", "--help"], &[]);
    assert!(text(&out).contains("check"), "{}", text(&out));
    let out = poseidon(&["--no-such-flag"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--no-such-flag"), "{}", text(&out));
}

#[test]
fn config_check_accepts_a_good_file_and_names_the_bad_key() {
    let good = config_file(
        "server:\n  address: 127.0.0.1\n  port: 7345\nnomad:\n  enabled: true\n  address: nomad.example\n  port: 4747\ninfluxdb:\n  url: http://influx:8086\n  bucket: poseidon\n",
    );
    let out = poseidon(&["config", "check", good.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("nomad at http://nomad.example:4747"),
        "{said}"
    );
    assert!(said.contains("127.0.0.1:7345"), "{said}");

    for (yaml, key) in [
        ("server:\n  prot: 1\n", "server.prot"),
        ("nomad:\n  enabled: true\n  adress: x\n", "nomad.adress"),
        (
            "nomad:\n  enabled: true\n  tls:\n    actve: true\n",
            "nomad.tls.actve",
        ),
        (
            "plugins:\n  directory: /tmp\n  limits:\n    calltimeout: 5\n",
            "plugins.limits.calltimeout",
        ),
        ("sentry:\n  dns: https://x\n", "sentry.dns"),
        ("logger:\n  formatter: Pretty\n", "logger.formatter"),
        ("aws:\n  enabled: true\n", "aws.enabled"),
        ("server:\n  port: 99999\n", "server.port"),
    ] {
        let file = config_file(yaml);
        let out = poseidon(&["config", "check", file.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(2), "{yaml}: {}", text(&out));
        assert!(text(&out).contains(key), "{yaml}: {}", text(&out));
    }
    // Variables are applied as the server would apply them.
    let out = poseidon(
        &["config", "check", good.to_str().unwrap()],
        &[("POSEIDON_SERVER_PORT", "not-a-port")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("server.port"), "{}", text(&out));
}

#[test]
fn a_nomad_address_without_enabled_stops_the_start_explaining_the_default() {
    let file = config_file("nomad:\n  address: nomad.example\n");
    let out = poseidon(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("nomad.enabled"), "{said}");
    assert!(said.contains("local"), "{said}");
    // Poseidon's single-dash flag works too.
    let out = poseidon(&["-config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("nomad.enabled"), "{}", text(&out));
}

#[test]
fn unknown_plugin_keys_stop_the_start() {
    let file = config_file("plugins:\n  directory: /tmp\n  watchh: false\n");
    let out = poseidon(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("plugins.watchh"), "{}", text(&out));
}

/// A token that YAML would read as a comment, an anchor, an alias or null works as a token, and
/// a numeric Nomad token stays a string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poseidon_variables_are_strings_not_yaml() {
    for token in ["#not-a-comment", "&anchor", "*alias", "null", "12345"] {
        let s = Server::start_with(Options {
            env: vec![("POSEIDON_SERVER_TOKEN".into(), token.into())],
            ..Default::default()
        })
        .await;
        let stats = s.url("/statistics/execution-environments");
        let with = reqwest::Client::new()
            .get(&stats)
            .header("Poseidon-Token", token)
            .send()
            .await
            .unwrap();
        assert_eq!(with.status(), 200, "token {token:?}");
        // The harness's client sends the file's token, which the variable replaced.
        let old = s.http.get(&stats).send().await.unwrap();
        assert_eq!(old.status(), 401, "token {token:?} (file token {TOKEN})");
    }
    let file = config_file("nomad:\n  enabled: true\n");
    let out = poseidon(
        &["config", "check", file.to_str().unwrap()],
        &[
            ("POSEIDON_NOMAD_TOKEN", "12345"),
            ("POSEIDON_NOMAD_PORT", "4999"),
            ("POSEIDON_NOMAD_DATACENTERS", "dc1 dc2"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(":4999"), "{}", text(&out));
}
