//! Running the real binary as an operator does: the command line, configuration checks, and
//! what the server does with `POSEIDON_*` variables and configuration mistakes.

mod support;

use std::path::{Path, PathBuf};
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
    // Poseidon's own example file: numbers with digit separators, sections whose keys are all
    // commented out, keys left blank — each keeps its default, as in Poseidon.
    let poseidon_style = config_file(
        "server:\n  address: 127.0.0.1\n  port:\nprofiling:\n  memoryinterval: 30_000\nsentry:\n  # dsn: https://x\ninfluxdb:\n",
    );
    let out = poseidon(&["config", "check", poseidon_style.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("127.0.0.1:7200"), "{}", text(&out));
    // What the configuration names must exist: the start would stop at it.
    for (yaml, key) in [
        (
            "server:\n  tls:\n    active: true\n    certfile: /nonexistent.crt\n    keyfile: /nonexistent.key\n",
            "server.tls.certfile /nonexistent.crt",
        ),
        ("local:\n  agent: /nonexistent/poseidon-agent\n", "local.agent"),
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

/// The server's log as JSON lines.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_log_line_and_server_errors_carry_their_cause() {
    let s = Server::start_with(Options {
        env: vec![("POSEIDON_LOGGER_FORMATTER".into(), "JSONFormatter".into())],
        ..Default::default()
    })
    .await;
    s.environment(7, 1, serde_json::json!({})).await;
    s.environment(8, 0, serde_json::json!({})).await;
    let runner = s.claim(7, 0).await;
    // An empty pool: 500 NOMAD_OVERLOAD.
    let r = s
        .http
        .post(s.url("/runners"))
        .json(&serde_json::json!({"executionEnvironmentId": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let r = s
        .http
        .get(s.url(&format!("/runners/{runner}/files")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    support::eventually("the request lines are logged", 10, || {
        let lines = json_lines(&s.log());
        let request = |route: &str, status: u64| {
            lines.iter().find(|l| {
                l["fields"]["message"] == "request"
                    && l["span"]["route"] == route
                    && l["fields"]["status"] == status
            })
        };
        let claim = request("/api/v1/runners", 200).cloned();
        let files = request("/api/v1/runners/{runner}/files", 200).cloned();
        let failed = request("/api/v1/runners", 500).cloned();
        let cause = lines
            .iter()
            .find(|l| l["fields"]["message"] == "server error")
            .cloned();
        let runner = runner.clone();
        async move {
            let (Some(claim), Some(files), Some(failed), Some(cause)) =
                (claim, files, failed, cause)
            else {
                return false;
            };
            assert_eq!(claim["span"]["method"], "POST");
            assert_eq!(claim["span"]["runner_id"], runner.as_str());
            assert_eq!(claim["span"]["environment_id"], 7);
            assert!(claim["fields"]["duration_ms"].as_f64().is_some(), "{claim}");
            assert_eq!(files["span"]["runner_id"], runner.as_str());
            assert_eq!(files["span"]["environment_id"], "7");
            assert_eq!(failed["span"]["method"], "POST");
            assert_eq!(cause["fields"]["status"], 500);
            assert_eq!(cause["fields"]["error_code"], "NOMAD_OVERLOAD");
            assert!(
                !cause["fields"]["cause"].as_str().unwrap().is_empty(),
                "{cause}"
            );
            // The cause is logged inside the request's span.
            assert_eq!(cause["span"]["route"], "/api/v1/runners");
            true
        }
    })
    .await;
}

/// A Prometheus text line's value: `name{labels} value`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            return None;
        }
        labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_claims_executions_files_and_pools() {
    let s = Server::start().await;
    s.environment(9, 2, serde_json::json!({})).await;
    let runner = s.claim(9, 0).await;
    s.copy(&runner, &[("a.txt", b"hello world")]).await;
    let session = s
        .run(&runner, serde_json::json!({"command": "cat a.txt; exit 3"}))
        .await;
    assert_eq!(session.exit(), Some(3));
    let r = s.download(&runner, "a.txt").await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"hello world");
    let r = s
        .http
        .post(s.url("/runners"))
        .json(&serde_json::json!({"executionEnvironmentId": 9, "bad": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Methods a client makes up count as OTHER: each would be a series of its own.
    for made_up in ["FOO", "BAR"] {
        let method = reqwest::Method::from_bytes(made_up.as_bytes()).unwrap();
        let r = s
            .http
            .request(method, s.url("/runners"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
    }

    let metrics_url = format!("{}/metrics", s.base);
    support::eventually("the pool is refilled and everything counted", 20, || {
        let url = metrics_url.clone();
        async move {
            let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
            let env = [("environment", "9")];
            let get = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
            if get("poseidon_idle_runners", &env) != Some(2.0) {
                return false;
            }
            assert_eq!(get("poseidon_used_runners", &env), Some(1.0), "{text}");
            assert_eq!(get("poseidon_pool_target", &env), Some(2.0), "{text}");
            assert_eq!(get("poseidon_starting_runners", &env), Some(0.0), "{text}");
            assert_eq!(
                get("poseidon_runner_claims_total", &env),
                Some(1.0),
                "{text}"
            );
            assert_eq!(
                get(
                    "poseidon_executions_total",
                    &[("environment", "9"), ("outcome", "exit")]
                ),
                Some(1.0),
                "{text}"
            );
            assert_eq!(get("poseidon_file_bytes_copied_total", &env), Some(11.0));
            assert_eq!(
                get("poseidon_file_bytes_downloaded_total", &env),
                Some(11.0)
            );
            assert!(
                get(
                    "poseidon_runner_start_duration_seconds_count",
                    &[("environment", "9"), ("outcome", "ok")]
                )
                .is_some_and(|n| n >= 3.0),
                "{text}"
            );
            assert_eq!(
                get(
                    "poseidon_http_requests_total",
                    &[
                        ("route", "/api/v1/runners"),
                        ("method", "POST"),
                        ("status", "400")
                    ]
                ),
                Some(1.0),
                "{text}"
            );
            assert!(get(
                "poseidon_http_request_duration_seconds_bucket",
                &[("route", "/api/v1/runners"), ("le", "+Inf")]
            )
            .is_some_and(|n| n >= 2.0));
            assert_eq!(
                get(
                    "poseidon_http_requests_total",
                    &[
                        ("route", "/api/v1/runners"),
                        ("method", "OTHER"),
                        ("status", "405")
                    ]
                ),
                Some(2.0),
                "{text}"
            );
            assert!(!text.contains("FOO") && !text.contains("BAR"), "{text}");
            true
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_switched_off() {
    let s = Server::start_with(Options {
        env: vec![("POSEIDON_METRICS_ENABLED".into(), "false".into())],
        ..Default::default()
    })
    .await;
    let r = reqwest::get(format!("{}/metrics", s.base)).await.unwrap();
    assert_eq!(r.status(), 404);
}

/// A Sentry ingest endpoint in the test: collects the envelopes the server sends.
async fn sentry_endpoint() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::routing::post;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = received.clone();
    let app = axum::Router::new().route(
        "/api/1/envelope/",
        post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                store
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://public@{addr}/1"), received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_go_to_sentry_tagged_with_their_environment_without_credentials() {
    let (dsn, received) = sentry_endpoint().await;
    let s = Server::start_with(Options {
        env: vec![
            ("POSEIDON_SENTRY_DSN".into(), dsn),
            ("POSEIDON_SENTRY_RELEASE".into(), "ops-test-release".into()),
        ],
        ..Default::default()
    })
    .await;
    s.environment(6, 0, serde_json::json!({})).await;
    let r = s
        .http
        .post(s.url("/runners"))
        .json(&serde_json::json!({"executionEnvironmentId": 6}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    // A 4xx on a runner path is not an event.
    let r = s
        .http
        .get(s.url("/runners/6-0000/files"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    support::eventually("the server error reaches Sentry", 20, || {
        let envelopes = received.lock().unwrap().clone();
        async move {
            let Some(event) = envelopes.iter().find(|e| e.contains("server error")) else {
                return false;
            };
            let item = event
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "server error")
                .unwrap_or_else(|| panic!("no event item in {envelopes:?}"));
            // Error is the default level, which Sentry's protocol omits.
            assert!(item.get("level").is_none_or(|l| l == "error"), "{item}");
            assert!(
                !event.contains(support::TOKEN),
                "the API token went to Sentry: {event}"
            );
            assert_eq!(item["tags"]["environment_id"], "6", "{item}");
            assert_eq!(item["release"], "ops-test-release", "{item}");
            true
        }
    })
    .await;
    // 4xx answers are not events.
    assert!(
        !received
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("/runners/6-0000/files")),
        "a 410 was reported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomad_requests_events_and_stream_reconnects_are_counted() {
    let s = Server::on(support::Backend::Nomad).await;
    s.environment(12, 1, serde_json::json!({})).await;
    let _runner = s.claim(12, 0).await;
    let emulator = s.emulator_url().unwrap();
    let r = reqwest::Client::new()
        .post(format!("{emulator}/_emulator/stream/cut"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let metrics_url = format!("{}/metrics", s.base);
    support::eventually("Nomad figures", 30, || {
        let url = metrics_url.clone();
        async move {
            let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
            let ok = sample(&text, "poseidon_nomad_requests_total", &[("status", "2xx")]);
            let allocations = text
                .lines()
                .filter(|l| {
                    l.starts_with("poseidon_nomad_events_total{")
                        && l.contains("topic=\"Allocation\"")
                })
                .count();
            let reconnects = sample(&text, "poseidon_nomad_event_stream_reconnects_total", &[]);
            ok.is_some_and(|n| n > 0.0) && allocations > 0 && reconnects.is_some_and(|n| n >= 1.0)
        }
    })
    .await;
}

#[test]
fn the_shipped_configuration_and_units_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    let config = root.join("configuration.yaml");
    let out = poseidon(&["config", "check", config.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("backend local"), "{}", text(&out));
    let service = std::fs::read_to_string(root.join("poseidon.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "ExecStart=/usr/bin/poseidon --config /etc/poseidon/configuration.yaml",
        "POSEIDON_SERVER_SYSTEMDSOCKETACTIVATION=true",
    ] {
        assert!(service.contains(line), "poseidon.service lacks {line}");
    }
    let socket = std::fs::read_to_string(root.join("poseidon.socket")).unwrap();
    assert!(socket.contains("ListenStream=127.0.0.1:7200"));
}

/// SIGHUP reloads the plugins section; without one it must not end the server (its default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_plugins_leaves_the_server_running() {
    let s = Server::start().await;
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    support::eventually("the server says it has nothing to reload", 10, || async {
        s.log().contains("SIGHUP: nothing to reload")
    })
    .await;
    let health = reqwest::get(s.url("/health")).await.unwrap();
    assert_eq!(health.status(), 204);
}
