//! Poseidon's InfluxDB measurements, written by the real server to a real InfluxDB (Debian's
//! `influxdb` package, the v1 API), started by the test on loopback, and queried back: per
//! request, file downloads, the periodic pool points, and the change points of environments,
//! idle and used runners, runner start-ups and executions (local backend), and Nomad's events,
//! jobs and allocations (Nomad backend over the emulator). The v2 write API has no real server
//! here (Debian's InfluxDB 1.6 lacks `/api/v2/write`): its request is checked against a
//! listener that records it, which is all that test claims.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Options, Server};

/// An `influxd` with its own directories, stopped when dropped.
struct Influxd {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Influxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn find(program: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

async fn start_influxd(binary: &Path, name: &str) -> Influxd {
    let dir = std::env::temp_dir().join(format!("poseidon-influxd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (http, rpc) = (free_port(), free_port());
    let config = dir.join("influxdb.conf");
    std::fs::write(
        &config,
        format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n[meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n[http]\n  bind-address = \"127.0.0.1:{http}\"\n  log-enabled = false\n[monitor]\n  store-enabled = false\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(binary)
        .arg("-config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("influxd.log")).unwrap())
        .spawn()
        .expect("cannot start influxd");
    let influx = Influxd {
        child,
        dir,
        url: format!("http://127.0.0.1:{http}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(format!("{}/ping", influx.url)).await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "influxd did not start: {}",
            std::fs::read_to_string(influx.dir.join("influxd.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    influx
}

async fn query(influx: &Influxd, q: &str) -> Value {
    reqwest::Client::new()
        .post(format!("{}/query", influx.url))
        .query(&[("db", "poseidon"), ("q", q)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The points of a measurement as objects (column → value).
async fn points(influx: &Influxd, measurement: &str) -> Vec<serde_json::Map<String, Value>> {
    let answer = query(influx, &format!("SELECT * FROM \"{measurement}\"")).await;
    let Some(series) = answer["results"][0]["series"].as_array() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for s in series {
        let columns: Vec<String> = s["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        for row in s["values"].as_array().unwrap() {
            out.push(
                columns
                    .iter()
                    .cloned()
                    .zip(row.as_array().unwrap().iter().cloned())
                    .collect(),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poseidons_measurements_reach_a_real_influxdb() {
    let Some(binary) = find("influxd") else {
        println!("skipped: influxd (Debian's influxdb package) is not installed");
        return;
    };
    let influx = start_influxd(&binary, "local").await;
    let created = query(&influx, "CREATE DATABASE poseidon").await;
    assert!(created["results"][0].get("error").is_none(), "{created}");

    let s = Server::start_with(Options {
        extra_yaml: format!(
            "influxdb:\n  url: {}\n  bucket: poseidon\n  api: v1\n  stage: ci\n  periodseconds: 1\n",
            influx.url
        ),
        ..Default::default()
    })
    .await;
    s.environment(3, 1, json!({})).await;
    let runner = s.claim(3, 0).await;
    s.copy(&runner, &[("x.txt", b"hi")]).await;
    let r = s.download(&runner, "x.txt").await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"hi");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let claims = points(&influx, "poseidon_provideRunner").await;
        let copies = points(&influx, "poseidon_/files").await;
        let downloads = points(&influx, "poseidon_file_download").await;
        let idle = points(&influx, "poseidon_nomad_idle_runners").await;
        let pool = points(&influx, "poseidon_poolsize").await;
        let done = !claims.is_empty()
            && !copies.is_empty()
            && !downloads.is_empty()
            && idle
                .iter()
                .any(|p| p["environment_id"] == "3" && p["event_type"] == "periodically")
            && pool.iter().any(|p| p["environment_id"] == "3");
        if done {
            let claim = &claims[0];
            assert_eq!(claim["stage"], "ci", "{claim:?}");
            assert_eq!(claim["status"], "200", "{claim:?}");
            assert_eq!(claim["runner_id"], runner.as_str(), "{claim:?}");
            assert_eq!(claim["environment_id"], "3", "{claim:?}");
            assert!(claim["duration"].as_i64().unwrap() > 0, "{claim:?}");
            assert!(
                copies[0]["request_size"].as_i64().unwrap() > 0,
                "{:?}",
                copies[0]
            );
            assert_eq!(copies[0]["runner_id"], runner.as_str());
            assert_eq!(downloads[0]["expected_length"], 2, "{:?}", downloads[0]);
            assert_eq!(downloads[0]["actual_length"], 2);
            let periodic = idle
                .iter()
                .find(|p| p["environment_id"] == "3" && p["event_type"] == "periodically")
                .unwrap();
            assert_eq!(periodic["event_type"], "periodically");
            assert_eq!(periodic["stage"], "ci");
            let size = pool.iter().find(|p| p["environment_id"] == "3").unwrap();
            assert_eq!(size["prewarming_pool_size"], 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "points missing: claims {claims:?} copies {copies:?} downloads {downloads:?} idle {idle:?}; log: {}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a point of `measurement` satisfies `check` and returns it (bounded).
async fn point_where(
    influx: &Influxd,
    server: &Server,
    measurement: &str,
    check: impl Fn(&serde_json::Map<String, Value>) -> bool,
) -> serde_json::Map<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = points(influx, measurement).await;
        if let Some(p) = all.iter().find(|p| check(p)) {
            return p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no matching {measurement} point among {all:?}; log: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn is(p: &serde_json::Map<String, Value>, key: &str, value: &str) -> bool {
    p.get(key).and_then(Value::as_str) == Some(value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_runner_and_execution_changes_are_written_as_poseidon_does() {
    let Some(binary) = find("influxd") else {
        println!("skipped: influxd (Debian's influxdb package) is not installed");
        return;
    };
    let influx = start_influxd(&binary, "changes").await;
    query(&influx, "CREATE DATABASE poseidon").await;
    let s = Server::start_with(Options {
        extra_yaml: format!(
            "influxdb:\n  url: {}\n  bucket: poseidon\n  api: v1\n  stage: ci\n  periodseconds: 1\n",
            influx.url
        ),
        ..Default::default()
    })
    .await;
    s.environment(4, 1, json!({"cpuLimit": 50, "memoryLimit": 128}))
        .await;
    s.wait_idle(4, 1).await;
    let runner = s.claim(4, 0).await;
    let session = s.run(&runner, json!({"command": "true"})).await;
    assert_eq!(session.exit(), Some(0));

    let env = point_where(&influx, &s, "poseidon_environments", |p| {
        is(p, "id", "4") && is(p, "event_type", "creation")
    })
    .await;
    assert!(
        is(&env, "memory_limit", "128") && is(&env, "cpu_limit", "50"),
        "{env:?}"
    );
    assert!(
        is(&env, "network_access", "false") && is(&env, "stage", "ci"),
        "{env:?}"
    );
    assert_eq!(env["count"], 1, "{env:?}");
    let started = point_where(&influx, &s, "poseidon_nomad_idle_runners", |p| {
        is(p, "runner_id", &runner)
    })
    .await;
    assert!(is(&started, "environment_id", "4"), "{started:?}");
    assert!(
        started["startup_duration"].as_i64().unwrap() > 0,
        "{started:?}"
    );
    point_where(&influx, &s, "poseidon_nomad_idle_runners", |p| {
        is(p, "id", &runner) && is(p, "event_type", "creation") && is(p, "environment_id", "4")
    })
    .await;
    point_where(&influx, &s, "poseidon_nomad_idle_runners", |p| {
        is(p, "id", &runner) && is(p, "event_type", "deletion")
    })
    .await;
    let used = point_where(&influx, &s, "poseidon_used_runners", |p| {
        is(p, "id", &runner) && is(p, "event_type", "creation")
    })
    .await;
    assert!(is(&used, "environment_id", "4"), "{used:?}");
    assert_eq!(used["count"], 1, "{used:?}");
    let stored = point_where(&influx, &s, "poseidon_nomad_executions", |p| {
        is(p, "event_type", "creation") && is(p, "runner_id", &runner)
    })
    .await;
    assert!(is(&stored, "environment_id", "4"), "{stored:?}");
    let execution = stored["id"].as_str().unwrap().to_string();
    let consumed = point_where(&influx, &s, "poseidon_nomad_executions", |p| {
        is(p, "event_type", "deletion") && is(p, "id", &execution)
    })
    .await;
    assert_eq!(consumed["count"], 0, "{consumed:?}");
    // A stored execution shows in the periodic points of its runner.
    s.execute(&runner, json!({"command": "true"})).await;
    point_where(&influx, &s, "poseidon_nomad_executions", |p| {
        is(p, "event_type", "periodically")
            && is(p, "runner_id", &runner)
            && is(p, "environment_id", "4")
            && p["count"] == 1
    })
    .await;

    let r = s
        .http
        .delete(s.url(&format!("/runners/{runner}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let released = point_where(&influx, &s, "poseidon_used_runners", |p| {
        is(p, "id", &runner) && is(p, "event_type", "deletion")
    })
    .await;
    assert_eq!(released["count"], 0, "{released:?}");
    let r = s
        .http
        .delete(s.url("/execution-environments/4"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let gone = point_where(&influx, &s, "poseidon_environments", |p| {
        is(p, "id", "4") && is(p, "event_type", "deletion")
    })
    .await;
    assert_eq!(gone["count"], 0, "{gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomad_events_jobs_and_allocations_are_written_as_poseidon_does() {
    let Some(binary) = find("influxd") else {
        println!("skipped: influxd (Debian's influxdb package) is not installed");
        return;
    };
    let influx = start_influxd(&binary, "nomad").await;
    query(&influx, "CREATE DATABASE poseidon").await;
    let s = Server::start_with(Options {
        backend: support::Backend::Nomad,
        extra_yaml: format!(
            "influxdb:\n  url: {}\n  bucket: poseidon\n  api: v1\n  stage: ci\n",
            influx.url
        ),
        ..Default::default()
    })
    .await;
    s.environment(5, 1, json!({})).await;
    s.wait_idle(5, 1).await;
    let runner = s.claim(5, 0).await;

    let event = point_where(&influx, &s, "poseidon_nomad_events", |p| {
        is(p, "topic", "Allocation") && p["payload"].as_str().is_some_and(|t| t.contains(&runner))
    })
    .await;
    assert!(
        event["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{event:?}"
    );
    assert!(
        event["key"].as_str().is_some_and(|t| !t.is_empty()),
        "{event:?}"
    );
    assert!(event["timestamp"].as_str().is_some(), "{event:?}");
    serde_json::from_str::<Value>(event["payload"].as_str().unwrap()).expect("payload is JSON");
    let alloc = point_where(&influx, &s, "poseidon_nomad_allocations", |p| {
        is(p, "job_id", &runner) && is(p, "event_type", "creation")
    })
    .await;
    assert!(is(&alloc, "stage", "ci"), "{alloc:?}");
    assert!(alloc["client_status"].as_str().is_some(), "{alloc:?}");
    let allocation = alloc["id"].as_str().unwrap().to_string();
    point_where(&influx, &s, "poseidon_nomad_jobs", |p| {
        is(p, "id", &runner)
            && is(p, "allocation_id", &allocation)
            && is(p, "event_type", "creation")
    })
    .await;

    let r = s
        .http
        .delete(s.url(&format!("/runners/{runner}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    point_where(&influx, &s, "poseidon_nomad_allocations", |p| {
        is(p, "id", &allocation) && is(p, "event_type", "deletion")
    })
    .await;
    point_where(&influx, &s, "poseidon_nomad_jobs", |p| {
        is(p, "id", &runner) && is(p, "event_type", "deletion")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v2_write_request_is_shaped_as_poseidon_sends_it() {
    // No InfluxDB v2 server is available here (Debian has 1.6, without /api/v2/write): this
    // checks the request against a listener that records it, not against InfluxDB itself.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buf = [0u8; 65536];
                loop {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&data).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if data.len() >= end + 4 + length {
                            seen.lock().unwrap().push(text);
                            data.clear();
                            let _ = conn
                                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                                .await;
                        }
                    }
                }
            });
        }
    });
    let s = Server::start_with(Options {
        extra_yaml: format!(
            "influxdb:\n  url: {url}\n  token: secret-token\n  organization: openHPI\n  bucket: poseidon\n  stage: ci\n"
        ),
        ..Default::default()
    })
    .await;
    let r = s.http.get(s.url("/version")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let request = loop {
        let found = requests
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.contains("poseidon_/version"))
            .cloned();
        if let Some(r) = found {
            break r;
        }
        assert!(Instant::now() < deadline, "no write; log: {}", s.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first = request.lines().next().unwrap();
    assert!(first.starts_with("POST /api/v2/write?"), "{first}");
    for part in ["org=openHPI", "bucket=poseidon", "precision=ns"] {
        assert!(first.contains(part), "{first}");
    }
    assert!(
        request
            .lines()
            .any(|l| l.eq_ignore_ascii_case("authorization: Token secret-token")),
        "{request}"
    );
    let line = request
        .lines()
        .find(|l| l.starts_with("poseidon_/version,"))
        .unwrap();
    assert!(
        line.contains("status=200") && line.contains("stage=ci"),
        "{line}"
    );
    assert!(line.contains(" duration="), "{line}");
}
