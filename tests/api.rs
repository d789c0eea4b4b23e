//! The Poseidon API end to end: every route over HTTP and the execution WebSocket, against the
//! real server on the local backend.

#[macro_use]
mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{eventually, host_processes_with, status_and_json, Backend, Options, Server, Ws};

on_both_backends!(
    health_and_version_are_open_everything_else_needs_the_token,
    environments_can_be_created_read_replaced_and_deleted,
    bad_input_gets_400_with_a_message_naming_the_problem,
    runners_are_claimed_from_the_pool_and_destroyed,
    files_are_copied_listed_downloaded_and_deleted,
    executions_stream_stdout_and_stderr_apart_and_end_with_the_exit_code,
    input_goes_through_a_terminal,
    the_time_limit_ends_an_execution_with_timeout,
    the_time_limit_stops_a_program_that_prints_without_end,
    nothing_an_execution_started_outlives_it,
    a_client_that_disconnects_ends_the_program,
    megabytes_of_output_arrive_complete,
    the_inactivity_timeout_destroys_idle_runners_but_not_running_ones,
    destroying_a_runner_ends_its_execution,
    websocket_handshake_errors,
    a_listing_of_thousands_of_long_names_arrives_complete
);

/// Names in a listing, without what a Nomad task directory always has (the emulator's, and a
/// real raw_exec task's: Nomad's `executor.out` and the mount points `private/`, `secrets/`, which
/// survive `./*`).
fn test_files(list: &Value) -> Vec<&str> {
    list["files"]
        .as_array()
        .unwrap_or_else(|| panic!("not a listing: {list}"))
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .filter(|n| {
            let top = n.strip_prefix("./").unwrap_or(n);
            let top = top.split('/').next().unwrap_or(top);
            !["local", "secrets", "tmp", "executor.out", "private"].contains(&top)
        })
        .collect()
}

async fn health_and_version_are_open_everything_else_needs_the_token(backend: Backend) {
    let s = Server::on(backend).await;
    let anon = reqwest::Client::new();
    assert_eq!(
        anon.get(s.url("/health")).send().await.unwrap().status(),
        204
    );
    let v = anon.get(s.url("/version")).send().await.unwrap();
    assert_eq!(v.status(), 200);
    assert!(v.json::<Value>().await.unwrap().is_string());
    for path in [
        "/statistics/execution-environments",
        "/execution-environments",
        "/execution-environments/1",
    ] {
        let (status, body) = status_and_json(anon.get(s.url(path)).send().await.unwrap()).await;
        assert_eq!(status, 401, "{path}");
        assert!(body["message"].is_string());
        let wrong = anon
            .get(s.url(path))
            .header("Poseidon-Token", "test-tokeX")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
    }
    let r = anon
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A known path with a method it does not have is a 405 before any authentication.
    let r = anon
        .post(s.url("/execution-environments"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // Unknown routes and methods.
    assert_eq!(
        s.http.get(s.url("/nothing")).send().await.unwrap().status(),
        404
    );
    assert_eq!(
        s.http
            .get(s.url("/execution-environments/abc"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        s.http.post(s.url("/health")).send().await.unwrap().status(),
        405
    );
    assert_eq!(
        s.http
            .get(format!("{}/api/v1/execution-environments/", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

async fn environments_can_be_created_read_replaced_and_deleted(backend: Backend) {
    let s = Server::on(backend).await;
    let body = json!({"id": 7, "image": s.test_image(), "prewarmingPoolSize": 1, "cpuLimit": 20, "memoryLimit": 128, "networkAccess": false, "exposedPorts": []});
    let url = s.url("/execution-environments/7");
    assert_eq!(
        s.http.put(&url).json(&body).send().await.unwrap().status(),
        201
    );
    assert_eq!(
        s.http.put(&url).json(&body).send().await.unwrap().status(),
        204
    );
    let (status, got) = status_and_json(s.http.get(&url).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(got, body);
    let (_, list) = status_and_json(
        s.http
            .get(s.url("/execution-environments?fetch=true"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list["executionEnvironments"], json!([body]));
    let (status, err) = status_and_json(
        s.http
            .get(s.url("/execution-environments?fetch=maybe"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(err["message"].as_str().unwrap().contains("fetch"));
    s.wait_idle(7, 1).await;
    // A changed configuration replaces the pool.
    let mut changed = body.clone();
    changed["prewarmingPoolSize"] = json!(2);
    assert_eq!(
        s.http
            .put(&url)
            .json(&changed)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    s.wait_idle(7, 2).await;
    let stats: Value = s
        .get_json(s.url("/statistics/execution-environments"))
        .await;
    assert_eq!(stats["7"]["prewarmingPoolSize"], 2);
    assert_eq!(stats["7"]["usedRunners"], 0);
    assert_eq!(s.http.delete(&url).send().await.unwrap().status(), 204);
    assert_eq!(s.http.get(&url).send().await.unwrap().status(), 404);
    assert_eq!(s.http.delete(&url).send().await.unwrap().status(), 404);
    let (_, list) = status_and_json(
        s.http
            .get(s.url("/execution-environments"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list["executionEnvironments"], json!([]));
}

async fn bad_input_gets_400_with_a_message_naming_the_problem(backend: Backend) {
    let s = Server::start_with(Options {
        backend,
        server_yaml: "  maxrequestbodybytes: 4096".into(),
        ..Default::default()
    })
    .await;
    s.environment(1, 1, json!({})).await;
    let env_url = s.url("/execution-environments/2");
    let good = json!({"image": "x", "prewarmingPoolSize": 0, "cpuLimit": 1, "memoryLimit": 128, "networkAccess": false, "exposedPorts": []});
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"image": "x", "prewarmingPoolsize": 1, "cpuLimit": 1, "memoryLimit": 1, "networkAccess": false}),
            "prewarmingPoolsize",
        ),
        (
            json!({"image": "x", "cpuLimit": 1, "memoryLimit": 1, "networkAccess": false}),
            "prewarmingPoolSize",
        ),
        (
            json!({"image": 5, "prewarmingPoolSize": 1, "cpuLimit": 1, "memoryLimit": 1, "networkAccess": false}),
            "string",
        ),
        (
            json!({"image": "x", "prewarmingPoolSize": -1, "cpuLimit": 1, "memoryLimit": 1, "networkAccess": false}),
            "-1",
        ),
        (
            json!({"image": "x", "prewarmingPoolSize": 1e12, "cpuLimit": 1, "memoryLimit": 1, "networkAccess": false}),
            "",
        ),
        (
            json!({"image": "x", "prewarmingPoolSize": 1, "cpuLimit": 1.5, "memoryLimit": 1, "networkAccess": false}),
            "cpuLimit",
        ),
        (
            json!({"id": "x", "image": "x", "prewarmingPoolSize": 1, "cpuLimit": 1, "memoryLimit": 1, "networkAccess": false}),
            "\"x\"",
        ),
        (
            json!({"image": "x", "prewarmingPoolSize": 1, "cpuLimit": 1, "memoryLimit": 1, "networkAccess": true, "exposedPorts": [70000]}),
            "",
        ),
    ];
    for (body, needle) in cases {
        let (status, err) =
            status_and_json(s.http.put(&env_url).json(&body).send().await.unwrap()).await;
        assert_eq!(status, 400, "{body}");
        let message = err["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message for {body}"));
        assert!(
            message.contains(needle),
            "{message:?} should name {needle:?}"
        );
    }
    for raw in ["", "{", "[1,2]", "{\"image\": \"x\"} trailing", "null"] {
        let (status, err) =
            status_and_json(s.http.put(&env_url).body(raw).send().await.unwrap()).await;
        assert_eq!(status, 400, "{raw:?}");
        assert!(err["message"].is_string());
    }
    assert_eq!(
        s.http
            .put(&env_url)
            .json(&good)
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let (status, _) = status_and_json(
        s.http
            .put(s.url("/execution-environments/99999999999999999999"))
            .json(&good)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    // Too large.
    let (status, err) = status_and_json(
        s.http
            .put(&env_url)
            .body(vec![b' '; 10_000])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 413);
    assert!(err["message"].as_str().unwrap().contains("limit"));
    // Runners.
    for (body, needle) in [
        (json!({"inactivityTimeout": 5}), "executionEnvironmentId"),
        (json!({"executionEnvironmentId": "1"}), "string"),
        (
            json!({"executionEnvironmentId": 1, "inactivityTimeout": -5}),
            "inactivityTimeout",
        ),
        (
            json!({"executionEnvironmentId": 1, "inactivityTimeout": 99999999999i64}),
            "inactivityTimeout",
        ),
        (
            json!({"executionEnvironmentId": 1, "timeout": 5}),
            "timeout",
        ),
    ] {
        let (status, err) = status_and_json(
            s.http
                .post(s.url("/runners"))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(err["message"].as_str().unwrap().contains(needle), "{err}");
    }
    let runner = s.claim(1, 0).await;
    let exec_url = s.url(&format!("/runners/{runner}/execute"));
    for (body, needle) in [
        (json!({"timeLimit": 5}), "command"),
        (
            json!({"command": "true", "environment": {"A-B": "x"}}),
            "A-B",
        ),
        (json!({"command": "true", "environment": {"1A": "x"}}), "1A"),
        (json!({"command": "true", "timeLimit": -1}), "timeLimit"),
        (json!({"command": "true", "privileged": true}), "privileged"),
        (json!({"command": "a\u{0}b"}), "NUL"),
    ] {
        let (status, err) =
            status_and_json(s.http.post(&exec_url).json(&body).send().await.unwrap()).await;
        assert_eq!(status, 400, "{body}");
        assert!(err["message"].as_str().unwrap().contains(needle), "{err}");
    }
    let files_url = s.url(&format!("/runners/{runner}/files"));
    for (body, needle) in [
        (
            json!({"copy": [{"path": "a", "content": "not base64!"}]}),
            "base64",
        ),
        (json!({"copy": [{"content": "aGk="}]}), "path"),
        (json!({"remove": ["a"]}), "remove"),
    ] {
        let (status, err) =
            status_and_json(s.http.patch(&files_url).json(&body).send().await.unwrap()).await;
        assert_eq!(status, 400, "{body}");
        assert!(err["message"].as_str().unwrap().contains(needle), "{err}");
    }
    for query in ["recursive=perhaps", "privilegedExecution=2", "path=%FF"] {
        let (status, err) = status_and_json(
            s.http
                .get(format!("{files_url}?{query}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 400, "{query}");
        assert!(err["message"].is_string());
    }
    let (status, _) =
        status_and_json(s.http.get(format!("{files_url}/raw")).send().await.unwrap()).await;
    assert_eq!(status, 400);
    // The server is still fine.
    assert_eq!(
        s.http.get(s.url("/health")).send().await.unwrap().status(),
        204
    );
}

async fn runners_are_claimed_from_the_pool_and_destroyed(backend: Backend) {
    let s = Server::on(backend).await;
    let (status, err) = status_and_json(
        s.http
            .post(s.url("/runners"))
            .json(&json!({"executionEnvironmentId": 3}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, err["message"].as_str().unwrap()),
        (404, "execution environment not found")
    );
    s.environment(3, 0, json!({})).await;
    let (status, err) = status_and_json(
        s.http
            .post(s.url("/runners"))
            .json(&json!({"executionEnvironmentId": 3}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(err["errorCode"], "NOMAD_OVERLOAD");
    s.environment(4, 2, json!({})).await;
    let r = s
        .http
        .post(s.url("/runners"))
        .json(&json!({"executionEnvironmentId": 4, "inactivityTimeout": 60}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let runner = v["runnerId"].as_str().unwrap().to_string();
    assert!(runner.starts_with("4-"), "{runner}");
    assert_eq!(v["mappedPorts"], json!([]));
    // The pool is refilled in the background.
    s.wait_idle(4, 2).await;
    let stats: Value = s
        .get_json(s.url("/statistics/execution-environments"))
        .await;
    assert_eq!(stats["4"]["usedRunners"], 1);
    assert_eq!(
        s.http
            .delete(s.url(&format!("/runners/{runner}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    for (method, path) in [
        ("DELETE", format!("/runners/{runner}")),
        ("GET", format!("/runners/{runner}/files")),
        ("GET", format!("/runners/{runner}/files/raw?path=a")),
        ("PATCH", format!("/runners/{runner}/files")),
        ("POST", format!("/runners/{runner}/execute")),
        ("GET", "/runners/4-unknown/files".to_string()),
    ] {
        let r = s
            .http
            .request(method.parse().unwrap(), s.url(&path))
            .json(&json!({"command": "true"}))
            .send()
            .await
            .unwrap();
        let (status, err) = status_and_json(r).await;
        assert_eq!(status, 410, "{method} {path}");
        assert!(err["message"].as_str().unwrap().contains("no runner"));
    }
}

async fn files_are_copied_listed_downloaded_and_deleted(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 60).await;
    // Unique: with the emulator, /tmp of a runner is the host's.
    let tmp_file = format!("/tmp/t-{}-{backend:?}.txt", std::process::id());
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    s.copy(
        &runner,
        &[
            ("a.txt", b"hello"),
            ("dir/b.bin", &big),
            (tmp_file.as_str(), b"tmp"),
            ("empty/", b""),
        ],
    )
    .await;
    let files_url = s.url(&format!("/runners/{runner}/files"));
    let list: Value = s.get_json(&files_url).await;
    let names = test_files(&list);
    assert_eq!(names, vec!["./a.txt", "./dir", "./dir/b.bin", "./empty"]);
    let a = list["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "./a.txt")
        .unwrap();
    assert_eq!(a["entryType"], "-");
    assert_eq!(a["size"], 5);
    assert!(a["modificationTime"].as_i64().unwrap() > 0);
    assert_eq!(a["permissions"].as_str().unwrap().len(), 9);
    assert!(a["owner"].is_string() && a["group"].is_string());
    let flat: Value = s
        .get_json(format!("{files_url}?recursive=false&path=dir"))
        .await;
    assert_eq!(flat["files"][0]["name"], "b.bin");
    // A symbolic link to a directory lists that directory (on every backend), also /proc/self/cwd.
    let out = s
        .run(&runner, json!({"command": "ln -s dir dirlink"}))
        .await;
    assert_eq!(out.exit(), Some(0));
    let link: Value = s.get_json(format!("{files_url}?path=dirlink")).await;
    assert_eq!(test_files(&link), vec!["dirlink/b.bin"], "{link}");
    let cwd: Value = s.get_json(format!("{files_url}?path=/proc/self/cwd")).await;
    assert!(test_files(&cwd).contains(&"/proc/self/cwd/a.txt"), "{cwd}");
    let r = s
        .http
        .patch(&files_url)
        .json(&json!({"delete": ["dirlink"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let tmp: Value = s.get_json(format!("{files_url}?path=/tmp")).await;
    assert!(
        tmp["files"]
            .as_array()
            .unwrap_or_else(|| panic!("not a listing: {tmp}"))
            .iter()
            .any(|f| f["name"] == tmp_file.as_str()),
        "{tmp}"
    );
    let (status, err) = status_and_json(
        s.http
            .get(format!("{files_url}?path=missing"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 424);
    assert_eq!(err["message"], "file not found or insufficient permissions");
    // Raw download with an exact length.
    let r = s
        .http
        .get(format!("{files_url}/raw?path=dir/b.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        big.len().to_string().as_str()
    );
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    assert_eq!(r.bytes().await.unwrap().to_vec(), big);
    for missing in ["nope.txt", "dir"] {
        let (status, _) = status_and_json(
            s.http
                .get(format!("{files_url}/raw?path={missing}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 424, "{missing}");
    }
    // A file written by a program can be downloaded.
    let out = s
        .run(
            &runner,
            json!({"command": "printf 'from program' > out.txt"}),
        )
        .await;
    assert_eq!(out.exit(), Some(0));
    let r = s
        .http
        .get(format!("{files_url}/raw?path=out.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "from program");
    // Delete, then copy over an existing file.
    let r = s.http.patch(&files_url).json(&json!({"delete": ["dir", "./a.txt"], "copy": [{"path": "out.txt", "content": "bmV3"}]})).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let list: Value = s.get_json(&files_url).await;
    let names = test_files(&list);
    assert_eq!(names, vec!["./empty", "./out.txt"]);
    let r = s
        .http
        .get(format!("{files_url}/raw?path=out.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "new");
    // A copy that cannot succeed (a file below a regular file) fails with the tool's message.
    let (status, err) = status_and_json(
        s.http
            .patch(&files_url)
            .json(&json!({"copy": [{"path": "out.txt/inner", "content": "eA=="}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(err["errorCode"], "UNKNOWN");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("file copy failed"));
    let r = s
        .http
        .patch(&files_url)
        .json(&json!({"delete": [tmp_file]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // A FIFO is not a regular file: refused at once, not waited on for a writer.
    let out = s.run(&runner, json!({"command": "mkfifo pipe"})).await;
    assert_eq!(out.exit(), Some(0), "{:?}", out.messages);
    let r = s
        .http
        .get(format!("{files_url}/raw?path=pipe"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 424);
    let r = s
        .http
        .patch(&files_url)
        .json(&json!({"delete": ["pipe"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    // What CodeOcean sends: `delete: ["./"]` (a no-op, as in Poseidon) with the new files.
    let r = s
        .http
        .patch(&files_url)
        .json(&json!({"delete": ["./"], "copy": [{"path": "fresh.txt", "content": "ZnJlc2g="}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s
        .http
        .get(format!("{files_url}/raw?path=fresh.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "fresh");
    let list: Value = s.get_json(&files_url).await;
    assert_eq!(
        test_files(&list),
        vec!["./empty", "./fresh.txt", "./out.txt"],
        "what earlier runs left survives"
    );
    // `./*` clears the working directory.
    let r = s
        .http
        .patch(&files_url)
        .json(&json!({"delete": ["./*"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let list = s.get_json(format!("{files_url}?recursive=false")).await;
    assert_eq!(test_files(&list), Vec::<&str>::new(), "{list}");
}

async fn executions_stream_stdout_and_stderr_apart_and_end_with_the_exit_code(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 60).await;
    s.copy(
        &runner,
        &[(
            "main.py",
            b"import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)\n",
        )],
    )
    .await;
    let out = s.run(&runner, json!({"command": "python3 main.py"})).await;
    assert_eq!(out.exit(), Some(3));
    assert_eq!(out.stdout, "out\r\n");
    assert_eq!(out.stderr, "err\r\n");
    assert_eq!(out.close_code, Some(1000));
    // Environment variables, quotes and newlines in commands.
    let out = s.run(&runner, json!({"command": "echo \"$GREETING\" 'single quoted'\necho $CODEOCEAN", "environment": {"GREETING": "hello world $HOME"}})).await;
    assert_eq!(out.stdout, "hello world $HOME single quoted\r\ntrue\r\n");
    assert_eq!(out.exit(), Some(0));
    // Unprivileged by default, root of the sandbox when privileged (the emulator and Nomad's
    // exec/raw_exec drivers have no setuser).
    let docker = s.real_nomad().is_some_and(|n| n.driver == "docker");
    if backend == Backend::Local || docker {
        let out = s.run(&runner, json!({"command": "id -u; id -un"})).await;
        assert_eq!(out.stdout, "1000\r\nuser\r\n");
    }
    let out = s
        .run(
            &runner,
            json!({"command": "id -u", "privilegedExecution": true}),
        )
        .await;
    assert_eq!(out.stdout, "0\r\n");
    // A command that does not exist.
    let out = s.run(&runner, json!({"command": "no-such-command"})).await;
    assert_eq!(out.exit(), Some(127));
    assert!(out.stderr.contains("not found"));
    // Exit codes are 0-255.
    let out = s.run(&runner, json!({"command": "exit 300"})).await;
    assert_eq!(out.exit(), Some(44));
}

async fn input_goes_through_a_terminal(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 60).await;
    let url = s
        .execute(
            &runner,
            json!({"command": "read -r name; echo \"Hi $name\"; cat; echo after-eof"}),
        )
        .await;
    let mut ws = Ws::connect(&url).await;
    assert_eq!(ws.next().await.unwrap()["type"], "start");
    ws.send("Ada\n").await;
    ws.wait_stdout("Hi Ada").await;
    ws.send("line\n").await;
    ws.wait_stdout("line\r\nline").await; // echo, then cat's copy
    ws.send("\u{4}").await; // Ctrl-D: end of input for cat
    let out = ws.finish().await;
    assert!(out.stdout.starts_with("Ada\r\nHi Ada"), "{:?}", out.stdout);
    assert!(out.stdout.contains("after-eof"));
    assert_eq!(out.exit(), Some(0));
    // Ctrl-C interrupts the program.
    let url = s
        .execute(&runner, json!({"command": "echo ready; sleep 100"}))
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("ready").await;
    ws.send("\u{3}").await;
    let out = ws.finish().await;
    assert_eq!(out.exit(), Some(130), "{:?}", out.messages);
}

async fn the_time_limit_ends_an_execution_with_timeout(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 60).await;
    let marker = format!("marker-{}", std::process::id());
    let out = s
        .run(
            &runner,
            json!({"command": format!("echo started; sleep 1000; echo {marker}"), "timeLimit": 5}),
        )
        .await;
    assert_eq!(out.last, json!({"type": "timeout"}));
    assert!(out.stdout.contains("started"));
    eventually("the timed-out program ended", 10, || async {
        host_processes_with(&marker).is_empty()
    })
    .await;
    // The runner is still usable.
    let out = s.run(&runner, json!({"command": "echo still here"})).await;
    assert_eq!(out.stdout, "still here\r\n");
}

/// The commonest learner bug: a loop that prints without end, read by a client slower than
/// the program (CodeOcean relays every message). The program must stop at the limit, and the
/// runner must stay usable (its agent's memory bounded).
async fn the_time_limit_stops_a_program_that_prints_without_end(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 60).await;
    let marker = format!("flood-{}", std::process::id());
    let url = s
        .execute(
            &runner,
            json!({"command": format!("yes {marker}"), "timeLimit": 1}),
        )
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout(&marker).await;
    // A client that reads nothing for a while: every buffer on the way fills up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = ws.finish().await;
    assert_eq!(out.last, json!({"type": "timeout"}));
    eventually("the flooding program ended", 10, || async {
        host_processes_with(&marker).is_empty()
    })
    .await;
    let out = s.run(&runner, json!({"command": "echo still here"})).await;
    assert_eq!(out.stdout, "still here\r\n");
}

/// Processes that left the execution's session (`setsid`, a double fork, a daemon) end with it
/// too: when it exits, and when its time limit ends it.
async fn nothing_an_execution_started_outlives_it(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 60).await;
    // Each waits on its terminal until the test saw its daemons: one then ends by input, the
    // other by its time limit.
    for (seconds, time_limit, last) in [(4_100_000, 0, "exit"), (4_200_000, 6, "timeout")] {
        // A duration no other process here has: it marks this test's processes.
        let marker = (seconds + std::process::id()).to_string();
        let command = format!(
            "setsid sleep {marker} & (setsid sleep {marker} &); \
             python3 -c 'import os\nif os.fork() == 0:\n  os.setsid()\n  if os.fork() == 0: os.execvp(\"sleep\", [\"sleep\", \"{marker}\"])'; \
             echo started; read line"
        );
        let url = s
            .execute(
                &runner,
                json!({"command": command, "timeLimit": time_limit}),
            )
            .await;
        let mut ws = Ws::connect(&url).await;
        ws.wait_stdout("started").await;
        let sleeping = || {
            host_processes_with(&marker)
                .into_iter()
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|comm| comm.trim() == "sleep")
                })
                .count()
        };
        eventually("the daemons started", 10, || async { sleeping() == 3 }).await;
        if last == "exit" {
            ws.send("\n").await;
        }
        let out = ws.finish().await;
        assert_eq!(out.last["type"], last, "{:?}", out.messages);
        eventually("nothing of the execution runs on", 10, || async {
            host_processes_with(&marker).is_empty()
        })
        .await;
    }
    let out = s.run(&runner, json!({"command": "echo still here"})).await;
    assert_eq!(out.stdout, "still here\r\n");
}

async fn a_client_that_disconnects_ends_the_program(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 60).await;
    let marker = format!("gone-{}", std::process::id());
    let url = s
        .execute(
            &runner,
            json!({"command": format!("echo go; sleep 1000; echo {marker}")}),
        )
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("go").await;
    assert!(!host_processes_with(&marker).is_empty());
    ws.disconnect().await;
    eventually("the program of a gone client ended", 10, || async {
        host_processes_with(&marker).is_empty()
    })
    .await;
    // An execution id is used once.
    let r = s
        .http
        .get(url.replace("ws://", "http://"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

async fn megabytes_of_output_arrive_complete(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 60).await;
    let out = s
        .run(
            &runner,
            json!({"command": "head -c 5242880 /dev/zero | tr '\\0' 'x'; echo; seq 1 3 >&2"}),
        )
        .await;
    assert_eq!(out.exit(), Some(0));
    assert_eq!(out.stdout.matches('x').count(), 5 * 1024 * 1024);
    assert_eq!(out.stderr, "1\r\n2\r\n3\r\n");
    // Multi-byte characters survive arbitrary chunking.
    let out = s
        .run(
            &runner,
            json!({"command": "python3 -c \"print('é€😀' * 20000)\""}),
        )
        .await;
    assert_eq!(out.stdout.trim_end(), "é€😀".repeat(20000));
}

async fn the_inactivity_timeout_destroys_idle_runners_but_not_running_ones(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 2, json!({})).await;
    let idle_runner = s.claim(1, 1).await;
    let busy_runner = s.claim(1, 1).await;
    // The execution outlasts the inactivity timeout: it is not killed.
    let out = s
        .run(&busy_runner, json!({"command": "sleep 2.5; echo done"}))
        .await;
    assert_eq!(out.stdout, "done\r\n");
    assert_eq!(out.exit(), Some(0));
    // Polling the statistics is no activity of the runners.
    eventually("both runners expired", 15, || async {
        let stats: Value = s
            .get_json(s.url("/statistics/execution-environments"))
            .await;
        stats["1"]["usedRunners"] == 0
    })
    .await;
    for runner in [idle_runner, busy_runner] {
        let url = s.url(&format!("/runners/{runner}/files"));
        assert_eq!(s.http.get(&url).send().await.unwrap().status(), 410);
    }
}

async fn destroying_a_runner_ends_its_execution(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 0).await;
    let url = s
        .execute(&runner, json!({"command": "echo up; sleep 1000"}))
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("up").await;
    assert_eq!(
        s.http
            .delete(s.url(&format!("/runners/{runner}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let out = ws.finish().await;
    assert_eq!(
        out.last,
        json!({"type": "error", "data": "the allocation stopped as expected"})
    );
}

#[tokio::test]
async fn runners_survive_a_restart_of_the_gateway_with_their_files_and_programs() {
    let mut s = Server::start().await;
    s.environment(5, 2, json!({"memoryLimit": 256})).await;
    let runner = s.claim(5, 0).await;
    s.copy(&runner, &[("kept.txt", b"still here")]).await;
    let marker = format!("survivor-{}", std::process::id());
    let url = s
        .execute(
            &runner,
            json!({"command": format!("sleep 1000; echo {marker}")}),
        )
        .await;
    let ws = Ws::connect(&url).await;
    eventually("the program runs", 10, || async {
        !host_processes_with(&marker).is_empty()
    })
    .await;
    s.kill_and_restart().await;
    drop(ws);
    let env: Value = s.get_json(s.url("/execution-environments/5")).await;
    assert_eq!(env["memoryLimit"], 256);
    s.wait_idle(5, 2).await;
    // The claimed runner is still the client's, with its files and its running program.
    let r = s.download(&runner, "kept.txt").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "still here");
    assert!(
        !host_processes_with(&marker).is_empty(),
        "the program died across the restart: {}",
        support::log_tail(&s.log())
    );
    let out = s.run(&runner, json!({"command": "cat kept.txt"})).await;
    assert_eq!(out.stdout, "still here");
    assert_eq!(
        s.http
            .delete(s.url(&format!("/runners/{runner}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    eventually("the destroyed runner's program is gone", 10, || async {
        host_processes_with(&marker).is_empty()
    })
    .await;
}

#[tokio::test]
async fn health_reports_depleting_pools() {
    let s = Server::start_with(Options {
        server_yaml: "  alert:\n    prewarmingpoolthreshold: 0.5".into(),
        local_yaml: "  images:\n    broken: /nonexistent-rootfs".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(
        s.http.get(s.url("/health")).send().await.unwrap().status(),
        204
    );
    let r = s.http.put(s.url("/execution-environments/9")).json(&json!({"image": "broken", "prewarmingPoolSize": 1, "cpuLimit": 1, "memoryLimit": 0, "networkAccess": false, "exposedPorts": []})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let (status, err) = status_and_json(s.http.get(s.url("/health")).send().await.unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(err["errorCode"], "PREWARMING_POOL_DEPLETING");
    assert!(err["message"].as_str().unwrap().contains('9'));
    tokio::time::sleep(Duration::from_millis(1)).await;
}

async fn websocket_handshake_errors(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 0).await;
    let url = s.url(&format!(
        "/runners/{runner}/websocket?executionID=00000000-0000-4000-8000-000000000000"
    ));
    assert_eq!(s.http.get(&url).send().await.unwrap().status(), 404);
    let ws_url = s.execute(&runner, json!({"command": "true"})).await;
    let http_url = ws_url.replace("ws://", "http://");
    let (status, err) = status_and_json(s.http.get(&http_url).send().await.unwrap()).await;
    assert_eq!(status, 400, "a plain GET is not a handshake");
    assert!(err["message"].is_string());
    // Without the token.
    let anon = reqwest::Client::new();
    assert_eq!(anon.get(&http_url).send().await.unwrap().status(), 401);
    // The execution was not consumed by the failed handshakes.
    let out = Ws::connect(&ws_url).await.finish().await;
    assert_eq!(out.exit(), Some(0));
}

#[tokio::test]
async fn an_invalid_configuration_stops_the_start_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("poseidon-badconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (yaml, key) in [
        ("server:\n  port: seventy\n", "server.port"),
        ("server:\n  prot: 1\n", "prot"),
        ("logger:\n  level: loud\n", "logger.level"),
        ("local:\n  workdir: relative\n", "local.workdir"),
    ] {
        let file = dir.join("configuration.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_poseidon"))
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{yaml}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{yaml}: {stderr}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poseidon"))
        .env("POSEIDON_SERVER_PORT", "-1")
        .arg("--config")
        .arg(dir.join("missing.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn tls_serves_https_with_tls_1_3_only_and_wss_urls() {
    let dir = std::env::temp_dir().join(format!("poseidon-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is needed to make a test certificate");
    assert!(status.success());
    let s = Server::start_with(Options {
        server_yaml: format!(
            "  tls:\n    active: true\n    certfile: {}\n    keyfile: {}",
            cert.display(),
            key.display()
        ),
        ..Default::default()
    })
    .await;
    assert!(s.base.starts_with("https://"), "{}", s.base);
    let curl = |extra: &[&str], path: &str| {
        std::process::Command::new("curl")
            .args([
                "-sk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Poseidon-Token: test-token",
            ])
            .args(extra)
            .arg(s.url(path))
            .output()
            .unwrap()
    };
    assert_eq!(
        String::from_utf8_lossy(&curl(&[], "/version").stdout),
        "200"
    );
    assert_eq!(
        String::from_utf8_lossy(&curl(&[], "/execution-environments").stdout),
        "200"
    );
    let old = curl(&["--tls-max", "1.2"], "/version");
    assert_ne!(
        String::from_utf8_lossy(&old.stdout),
        "200",
        "TLS 1.2 must be refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A listing far larger than one frame of the agent protocol (12,000 entries with 200-character
/// names, ~5 MB of JSON) arrives complete, as root and as `user`.
async fn a_listing_of_thousands_of_long_names_arrives_complete(backend: Backend) {
    let s = Server::on(backend).await;
    s.environment(1, 1, json!({})).await;
    let runner = s.claim(1, 120).await;
    let name = "n".repeat(190);
    let out = s
        .run(
            &runner,
            json!({"command": format!("mkdir many && cd many && for i in $(seq 10000 21999); do : > {name}$i; done; ls | wc -l")}),
        )
        .await;
    assert_eq!(out.stdout.trim(), "12000", "{:?}", out.messages);
    for privileged in [true, false] {
        let list: Value = s
            .get_json(s.url(&format!(
                "/runners/{runner}/files?path=many&privilegedExecution={privileged}"
            )))
            .await;
        let files = list["files"]
            .as_array()
            .unwrap_or_else(|| panic!("not a listing: {list}"));
        assert_eq!(files.len(), 12000, "privileged {privileged}");
        assert!(files
            .iter()
            .any(|f| f["name"] == format!("many/{name}21999").as_str()));
    }
}

/// A time limit holds while no gateway follows the execution: a program started with one
/// before the server was killed ends at it all the same (the agent holds it too).
#[tokio::test]
async fn a_time_limit_holds_across_a_restart_of_the_gateway() {
    let mut s = Server::start().await;
    s.environment(5, 1, json!({})).await;
    let runner = s.claim(5, 0).await;
    let marker = format!("limited-{}", std::process::id());
    let url = s
        .execute(
            &runner,
            json!({"command": format!("sleep 1000; echo {marker}"), "timeLimit": 2}),
        )
        .await;
    let ws = Ws::connect(&url).await;
    eventually("the program runs", 10, || async {
        !host_processes_with(&marker).is_empty()
    })
    .await;
    s.kill_and_restart().await;
    drop(ws);
    eventually(
        "the program ended at its limit without a gateway",
        30,
        || async { host_processes_with(&marker).is_empty() },
    )
    .await;
}
