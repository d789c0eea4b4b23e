//! Poseidon's InfluxDB measurements, written by the real server to a real InfluxDB (Debian's
//! `influxdb` package, the v1 API), started by the test on loopback, and queried back.

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

async fn start_influxd(binary: &Path) -> Influxd {
    let dir = std::env::temp_dir().join(format!("poseidon-influxd-{}", std::process::id()));
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
    let influx = start_influxd(&binary).await;
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
    let r = s
        .http
        .get(s.url(&format!("/runners/{runner}/files/raw?path=x.txt")))
        .send()
        .await
        .unwrap();
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
            && idle.iter().any(|p| p["environment_id"] == "3")
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
            let periodic = idle.iter().find(|p| p["environment_id"] == "3").unwrap();
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
