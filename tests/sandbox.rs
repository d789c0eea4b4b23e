//! The local sandbox: isolation between runners, read-only system, limits, clean environment.

mod support;

use serde_json::{json, Value};
use support::{eventually, host_processes_with, Options, Server, Ws};

#[tokio::test]
async fn runners_cannot_see_each_others_files_or_processes() {
    let s = Server::start().await;
    s.environment(1, 2, json!({})).await;
    let a = s.claim(1, 60).await;
    let b = s.claim(1, 60).await;
    s.copy(&a, &[("secret.txt", b"only for a")]).await;
    let out = s
        .run(&a, json!({"command": "echo a-tmp > /tmp/a-tmp; ls"}))
        .await;
    assert_eq!(out.stdout, "secret.txt\r\n");
    let out = s.run(&b, json!({"command": "ls -A /workspace /tmp; cat /workspace/secret.txt", "privilegedExecution": true})).await;
    assert!(
        !out.stdout.contains("secret") && !out.stdout.contains("a-tmp"),
        "{}",
        out.stdout
    );
    assert_ne!(out.exit(), Some(0));
    // A long-running program of runner a is invisible to runner b, and b sees only its own processes.
    let marker = format!("proc-{}", std::process::id());
    let url = s
        .execute(
            &a,
            json!({"command": format!("echo up; sleep 1000; echo {marker}")}),
        )
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("up").await;
    let out = s
        .run(
            &b,
            json!({"command": "ps -eo args", "privilegedExecution": true}),
        )
        .await;
    assert!(!out.stdout.contains(&marker), "{}", out.stdout);
    let processes = out.stdout.lines().count();
    assert!(processes <= 5, "b sees foreign processes: {}", out.stdout);
    // Neither the state directory nor the host's home is visible.
    let out = s.run(&b, json!({"command": "ls /root /var/lib 2>&1; find / -name secret.txt 2>/dev/null | head -1"})).await;
    assert!(!out.stdout.contains("secret.txt"), "{}", out.stdout);
    ws.disconnect().await;
}

#[tokio::test]
async fn system_directories_are_read_only_even_for_root() {
    let s = Server::start().await;
    s.environment(1, 1, json!({})).await;
    let r = s.claim(1, 60).await;
    for privileged in [false, true] {
        let out = s.run(&r, json!({"command": "touch /usr/x || touch /etc/x || touch /bin/x || touch /x; echo rc=$?", "privilegedExecution": privileged})).await;
        assert!(out.stdout.contains("rc=1"), "{privileged}: {}", out.stdout);
        let out = s.run(&r, json!({"command": "cat /etc/shadow >/dev/null 2>&1; echo rc=$?", "privilegedExecution": privileged})).await;
        assert!(
            out.stdout.contains("rc=1"),
            "{privileged}: /etc/shadow readable: {}",
            out.stdout
        );
    }
    // The sandbox's root has no capabilities on the host: its host uid is not 0.
    let marker = format!("uid-{}", std::process::id());
    let url = s
        .execute(
            &r,
            json!({"command": format!("sleep 1000; echo {marker}"), "privilegedExecution": true}),
        )
        .await;
    let ws = Ws::connect(&url).await;
    eventually("the sandboxed process runs", 10, || async {
        !host_processes_with(&marker).is_empty()
    })
    .await;
    for pid in host_processes_with(&marker) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid_line = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or("Uid: 1");
        assert!(
            !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
            "host root: {uid_line}"
        );
    }
    ws.disconnect().await;
}

#[tokio::test]
async fn executions_see_only_their_own_environment_and_no_inherited_descriptors() {
    let s = Server::start().await;
    s.environment(1, 1, json!({})).await;
    let r = s.claim(1, 60).await;
    let out = s
        .run(&r, json!({"command": "env", "environment": {"MINE": "1"}}))
        .await;
    let keys: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split('=').next())
        .collect();
    assert!(
        !out.stdout.contains("server-secret-value"),
        "{}",
        out.stdout
    );
    for key in &keys {
        assert!(
            [
                "PATH",
                "HOME",
                "LANG",
                "CODEOCEAN",
                "MINE",
                "PWD",
                "SHLVL",
                "TERM",
                "USER",
                "LOGNAME",
                "_"
            ]
            .contains(key),
            "unexpected variable {key}: {}",
            out.stdout
        );
    }
    assert!(keys.contains(&"MINE") && keys.contains(&"CODEOCEAN"));
    // What a container's terminal exec gives (`clear`, `tput`, curses need TERM), and the
    // name `setuser user` gives.
    for line in ["TERM=xterm", "USER=user", "LOGNAME=user"] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "{line}: {}",
            out.stdout
        );
    }
    let out = s.run(&r, json!({"command": "tput cols >/dev/null && ls -ld /dev/shm && python3 -c 'import multiprocessing as m; print(sum(m.Pool(2).map(abs, [-1, -2])))'"})).await;
    assert_eq!(out.exit(), Some(0), "{:?}", out.messages);
    assert!(
        out.stdout.starts_with("drwxrwxrwt"),
        "/dev/shm as on any Linux: {}",
        out.stdout
    );
    assert!(
        out.stdout.ends_with("3\r\n"),
        "multiprocessing works: {}",
        out.stdout
    );
    // Standard error can be opened again by name, as a terminal's can.
    let out = s
        .run(&r, json!({"command": "echo apart > /dev/stderr"}))
        .await;
    assert_eq!(out.exit(), Some(0), "{:?}", out.messages);
    assert_eq!(out.stderr, "apart\r\n");
    // Its own name resolves, as in a container (Java's InetAddress.getLocalHost() needs it).
    let out = s.run(&r, json!({"command": "cat /etc/hostname; python3 -c 'import socket; print(socket.gethostbyname(socket.gethostname()))'"})).await;
    assert_eq!(out.stdout, "runner\r\n127.0.1.1\r\n", "{:?}", out.messages);
    let out = s
        .run(&r, json!({"command": "ls /proc/self/fd | tr '\\n' ' '"}))
        .await;
    let fds: Vec<u32> = out
        .stdout
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert!(
        fds.iter().all(|fd| *fd <= 3),
        "inherited descriptors: {fds:?}"
    );
}

/// A plain command may start without bash (the agent does what bash would); the program must not
/// be able to tell: the same environment as under bash, scripts without `#!` still run, and a
/// file that is not executable still fails as bash reports it.
#[tokio::test]
async fn plain_commands_run_as_under_bash() {
    let s = Server::start().await;
    s.environment(1, 1, json!({})).await;
    let r = s.claim(1, 60).await;
    let sorted = |text: &str| {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    for privileged in [false, true] {
        let body = |command: &str| json!({"command": command, "environment": {"MINE": "1"}, "privilegedExecution": privileged});
        // Quotes make the second one bash's to run; both end as bash's exec of `env`.
        let plain = s.run(&r, body("env")).await;
        let quoted = s.run(&r, body("\"env\"")).await;
        assert_eq!(plain.last["data"], 0, "{:?}", plain.messages);
        assert_eq!(sorted(&plain.stdout), sorted(&quoted.stdout));
        assert!(plain.stdout.contains("SHLVL="), "{}", plain.stdout);
    }
    let made = s
        .run(
            &r,
            json!({"command": "printf 'echo from a script\\n' > script && chmod 755 script && printf 'x' > data"}),
        )
        .await;
    assert_eq!(made.last["data"], 0, "{:?}", made.messages);
    let script = s.run(&r, json!({"command": "./script"})).await;
    assert_eq!(script.last["data"], 0, "{:?}", script.messages);
    assert!(script.stdout.contains("from a script"), "{}", script.stdout);
    let not_executable = s.run(&r, json!({"command": "./data"})).await;
    assert_eq!(
        not_executable.last["data"], 126,
        "{:?}",
        not_executable.messages
    );
    assert!(
        format!("{}{}", not_executable.stdout, not_executable.stderr).contains("Permission denied"),
        "{:?}",
        not_executable.messages
    );
}

#[tokio::test]
async fn network_is_off_unless_allowed_and_never_reaches_host_loopback() {
    let s = Server::start().await;
    s.environment(1, 1, json!({})).await;
    s.environment(2, 1, json!({"networkAccess": true})).await;
    let offline = s.claim(1, 60).await;
    let online = s.claim(2, 60).await;
    let port = s.addr.rsplit(':').next().unwrap();
    let probe = format!(
        "python3 -c \"import urllib.request as u\ntry:\n  u.urlopen('http://127.0.0.1:{port}/api/v1/execution-environments', timeout=5)\nexcept Exception as e:\n  print(type(e).__name__, getattr(e, 'code', ''))\""
    );
    let out = s.run(&offline, json!({"command": probe})).await;
    assert!(
        out.stdout.contains("URLError"),
        "offline runner reached the API: {}",
        out.stdout
    );
    // Network access goes out through a user-mode network: an interface and a default route of
    // its own, but never the host's loopback services (the gateway itself here).
    let out = s.run(&online, json!({"command": probe})).await;
    assert!(
        out.stdout.contains("URLError"),
        "online runner reached the host's loopback: {}",
        out.stdout
    );
    let route = "ls /sys/class/net | grep -vx lo | head -1; awk '$2 == \"00000000\" {print \"default via\", $1}' /proc/net/route";
    let out = s.run(&online, json!({"command": route})).await;
    assert!(
        out.stdout.contains("default via"),
        "online runner has no default route: {}",
        out.stdout
    );
    let out = s.run(&offline, json!({"command": route})).await;
    assert!(
        !out.stdout.contains("default via"),
        "offline runner has a route out: {}",
        out.stdout
    );
}

#[tokio::test]
async fn memory_processes_and_disk_are_bounded_per_runner() {
    let s = Server::start_with(Options {
        local_yaml: "  pidslimit: 64\n  workspacesizemb: 16".into(),
        ..Default::default()
    })
    .await;
    s.environment(1, 1, json!({"memoryLimit": 64})).await;
    let r = s.claim(1, 60).await;
    // Out of memory, the kernel picks the learner's processes, all of them, before the agent.
    let out = s
        .run(
            &r,
            json!({"command": "cat /proc/self/oom_score_adj; (cat /proc/self/oom_score_adj) | cat"}),
        )
        .await;
    assert_eq!(out.stdout, "1000\r\n1000\r\n");
    let out = s
        .run(
            &r,
            json!({"command": "python3 -c \"x = bytearray(256*1024*1024); print('allocated')\""}),
        )
        .await;
    assert!(
        !out.stdout.contains("allocated"),
        "memory limit not enforced: {:?}",
        out.messages
    );
    assert_ne!(out.exit(), Some(0));
    let fork = "python3 -c \"import os, time\nn = 0\ntry:\n  for i in range(200):\n    if os.fork() == 0:\n      time.sleep(30)\n      os._exit(0)\n    n += 1\nexcept OSError:\n  pass\nprint(n)\"";
    let out = s.run(&r, json!({"command": fork})).await;
    let started: u32 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{:?}", out.messages));
    assert!(started < 200, "process limit not enforced: {started}");
    let out = s
        .run(
            &r,
            json!({"command": "head -c 40000000 /dev/zero > big; echo rc=$?; rm -f big"}),
        )
        .await;
    assert!(
        out.stdout.contains("rc=1"),
        "disk limit not enforced: {:?}",
        out.messages
    );
    assert!(out.stderr.contains("No space left"), "{}", out.stderr);
    // The runner still works after hitting every limit.
    let out = s.run(&r, json!({"command": "echo ok"})).await;
    assert_eq!(out.stdout, "ok\r\n");
}

#[tokio::test]
async fn files_persist_between_executions_and_processes_end_with_the_runner() {
    let s = Server::start().await;
    s.environment(1, 1, json!({})).await;
    let r = s.claim(1, 0).await;
    let out = s
        .run(
            &r,
            json!({"command": "echo 1 > state; mkdir -p d; echo 2 > /tmp/t"}),
        )
        .await;
    assert_eq!(out.exit(), Some(0));
    let out = s.run(&r, json!({"command": "cat state /tmp/t"})).await;
    assert_eq!(out.stdout, "1\r\n2\r\n");
    let marker = format!("end-{}", std::process::id());
    let url = s
        .execute(&r, json!({"command": format!("sleep 1000; echo {marker}")}))
        .await;
    let ws = Ws::connect(&url).await;
    eventually("the program runs", 10, || async {
        !host_processes_with(&marker).is_empty()
    })
    .await;
    assert_eq!(
        s.http
            .delete(s.url(&format!("/runners/{r}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    eventually(
        "every process of the destroyed runner ended",
        10,
        || async { host_processes_with(&marker).is_empty() },
    )
    .await;
    drop(ws);
    let stats: Value = s
        .get_json(s.url("/statistics/execution-environments"))
        .await;
    assert_eq!(stats["1"]["usedRunners"], 0);
}

#[tokio::test]
async fn root_and_user_are_two_identities_so_roots_files_are_protected() {
    let s = Server::start().await;
    s.environment(1, 1, json!({})).await;
    let r = s.claim(1, 60).await;
    let out = s
        .run(
            &r,
            json!({"command": "echo top > secret && chmod 600 secret && mkdir -p locked && chmod 700 locked && id -u", "privilegedExecution": true}),
        )
        .await;
    assert_eq!(out.stdout.trim(), "0", "{:?}", out.messages);
    let out = s
        .run(
            &r,
            json!({"command": "id -u; cat secret; touch locked/x; echo mine > own.txt; stat -c '%U %n' secret own.txt"}),
        )
        .await;
    assert!(out.stdout.starts_with("1000"), "{:?}", out.messages);
    assert!(
        !out.stdout.contains("top"),
        "user read root's file: {:?}",
        out.messages
    );
    assert!(
        out.stderr.contains("Permission denied"),
        "{:?}",
        out.messages
    );
    assert!(
        out.stdout.contains("root secret") && out.stdout.contains("user own.txt"),
        "{:?}",
        out.messages
    );
    // Listings show the real owners.
    let list: Value = s
        .get_json(s.url(&format!("/runners/{r}/files?privilegedExecution=true")))
        .await;
    let owner = |name: &str| {
        list["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["owner"].as_str().unwrap().to_string())
    };
    assert_eq!(owner("./secret").as_deref(), Some("root"));
    assert_eq!(owner("./own.txt").as_deref(), Some("user"));
    // Downloading root's protected file as user is refused; as root it works.
    let url = s.url(&format!("/runners/{r}/files/raw?path=secret"));
    assert_eq!(s.http.get(&url).send().await.unwrap().status(), 424);
    let r2 = s
        .http
        .get(format!("{url}&privilegedExecution=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r2.text().await.unwrap(), "top\n");
}

#[tokio::test]
async fn exposed_ports_are_forwarded_and_reported() {
    let s = Server::start().await;
    s.environment(3, 1, json!({"networkAccess": true, "exposedPorts": [8080]}))
        .await;
    let claim: Value = support::status_and_json(
        s.http
            .post(s.url("/runners"))
            .json(&json!({"executionEnvironmentId": 3, "inactivityTimeout": 60}))
            .send()
            .await
            .unwrap(),
    )
    .await
    .1;
    let runner = claim["runnerId"].as_str().unwrap().to_string();
    let mapped = claim["mappedPorts"].as_array().unwrap();
    assert_eq!(mapped.len(), 1, "{claim}");
    assert_eq!(mapped[0]["exposedPort"], 8080);
    let address = mapped[0]["hostAddress"].as_str().unwrap().to_string();
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    s.copy(&runner, &[("index.html", b"served from the runner")])
        .await;
    let url = s
        .execute(
            &runner,
            json!({"command": "echo serving; exec python3 -m http.server 8080 --bind 0.0.0.0"}),
        )
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("serving").await;
    let http = reqwest::Client::new();
    let page = format!("http://{address}/index.html");
    eventually("the runner's server answers on the mapped port", 20, || {
        let request = http.get(&page).send();
        async move { request.await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let body = http.get(&page).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "served from the runner");
}

/// As in a container, a program finds its runner's limits where runtimes look for them (the
/// JVM sizes its heap from them): its cgroup is `/` of its own namespace, and the runner's
/// group is under /sys/fs/cgroup (read-only).
#[tokio::test]
async fn a_program_sees_its_runners_memory_limit_as_in_a_container() {
    let s = Server::start().await;
    s.environment(1, 1, json!({"memoryLimit": 100})).await;
    let r = s.claim(1, 60).await;
    let probe = "cat /proc/self/cgroup; cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes; (echo x > /sys/fs/cgroup/probe) 2>/dev/null && echo writable; true";
    let out = s.run(&r, json!({"command": probe})).await;
    assert_eq!(out.exit(), Some(0), "{:?}", out.messages);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines.iter().any(|l| l.trim() == "104857600"),
        "the limit of 100 MB: {}",
        out.stdout
    );
    for line in lines.iter().filter(|l| l.contains(':')) {
        assert!(
            line.trim().ends_with(":/"),
            "a cgroup of its own namespace: {line}"
        );
    }
    assert!(!out.stdout.contains("writable"), "{}", out.stdout);
}

/// What the previous test is for: a JVM in a runner sizes its heap from the runner's memory
/// limit (a quarter by default), not from the host's memory. The JVM reads cgroup v2 (on v1 it
/// also wants groups the runner does not have); tests/cgroup2/run.sh runs this in its cgroup-v2
/// VM with a JVM (`POSEIDON_TEST_JAVA`, a jlink'ed runtime under /opt).
#[tokio::test]
#[ignore = "needs cgroup v2 and a JVM: tests/cgroup2/run.sh runs it"]
async fn the_jvm_sizes_its_heap_from_the_runners_memory_limit() {
    let java = std::env::var("POSEIDON_TEST_JAVA").unwrap_or_else(|_| "java".into());
    let s = Server::start().await;
    s.environment(1, 1, json!({"memoryLimit": 100})).await;
    let r = s.claim(1, 60).await;
    let command = format!(
        "{java} -XX:+PrintFlagsFinal -version 2>/dev/null | awk '$2 == \"MaxHeapSize\" {{print $4}}'"
    );
    let out = s.run(&r, json!({"command": command})).await;
    let heap: u64 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{:?}", out.messages));
    assert!(
        heap <= 100 * 1024 * 1024,
        "MaxHeapSize {heap} in a 100 MB runner"
    );
}

#[tokio::test]
async fn a_learner_cannot_kill_the_runners_agent() {
    let s = Server::start().await;
    s.environment(1, 1, json!({})).await;
    let r = s.claim(1, 60).await;
    // Root inside the runner: the agent is the namespace's init, which no signal from inside
    // reaches (`kill -1` spares init; SIGKILL to init from its own namespace is ignored).
    let out = s
        .run(
            &r,
            json!({"command": "kill -9 $(pgrep -x agent) && kill -9 -1; echo survived", "privilegedExecution": true}),
        )
        .await;
    assert_eq!(out.exit(), Some(0), "{:?}", out.messages);
    assert_eq!(out.stdout, "survived\r\n");
    let out = s.run(&r, json!({"command": "echo still usable"})).await;
    assert_eq!(out.stdout, "still usable\r\n");
}

/// A sandbox that ends by itself (here its agent killed from the host, as the kernel's OOM
/// killer might) takes only its own runner, which is removed at once with its files.
#[tokio::test]
async fn a_runner_whose_sandbox_ends_is_removed_with_its_files() {
    let s = Server::start().await;
    s.environment(1, 2, json!({})).await;
    let victim = s.claim(1, 60).await;
    let other = s.claim(1, 60).await;
    let marker = format!("victim-{}", std::process::id());
    s.copy(&victim, &[(marker.as_str(), b"x")]).await;
    let agents = host_processes_with("/.poseidon/agent");
    let agent = agents
        .iter()
        .find(|pid| std::path::Path::new(&format!("/proc/{pid}/root/workspace/{marker}")).exists())
        .unwrap_or_else(|| panic!("no agent sees the victim's workspace among {agents:?}"));
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &agent.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    eventually("the broken runner is gone", 20, || async {
        s.http
            .get(s.url(&format!("/runners/{victim}/files")))
            .send()
            .await
            .unwrap()
            .status()
            == 410
    })
    .await;
    eventually("its directory (and tmpfs) is removed", 20, || async {
        !s.runner_dir(&victim).exists()
    })
    .await;
    let out = s.run(&other, json!({"command": "echo fine"})).await;
    assert_eq!(out.stdout, "fine\r\n");
    s.wait_idle(1, 2).await;
}

/// Orphans become the agent's children; those that die must be reaped, or their zombies would
/// use up the runner's process limit.
#[tokio::test]
async fn orphans_that_end_are_reaped() {
    let s = Server::start_with(Options {
        local_yaml: "  pidslimit: 64".into(),
        ..Default::default()
    })
    .await;
    s.environment(1, 1, json!({})).await;
    let r = s.claim(1, 60).await;
    // 200 orphans, each ending at once, against a limit of 64 processes.
    let command = "for i in $(seq 200); do (sleep 0.001 &) || exit 1; done; echo all started";
    let out = s.run(&r, json!({"command": command})).await;
    assert_eq!(out.exit(), Some(0), "{:?}", out.messages);
    assert!(out.stdout.contains("all started"));
}

/// A client that sends far more input than the program reads must not fill the runner's
/// memory (the agent would be killed and the runner lost): the gateway holds input back.
#[tokio::test]
async fn input_the_program_does_not_read_is_bounded() {
    let s = Server::start().await;
    s.environment(1, 1, json!({"memoryLimit": 64})).await;
    let r = s.claim(1, 60).await;
    let url = s
        .execute(&r, json!({"command": "echo waiting; sleep 1000"}))
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("waiting").await;
    // The client's sends block once the gateway stops reading: they run on their own.
    let flood = tokio::spawn(async move {
        let chunk = "y".repeat(1024 * 1024);
        for _ in 0..128 {
            ws.send(&chunk).await;
        }
        ws
    });
    // The agent is alive: another execution in the same runner works.
    let out = s.run(&r, json!({"command": "echo alive"})).await;
    assert_eq!(out.stdout, "alive\r\n", "{:?}", out.messages);
    flood.abort();
}

/// Input a program reads, however much and however fast the client sends it, arrives whole.
#[tokio::test]
async fn input_arrives_complete_however_fast_it_is_sent() {
    let s = Server::start().await;
    s.environment(1, 1, json!({"memoryLimit": 64})).await;
    let r = s.claim(1, 60).await;
    let url = s
        .execute(&r, json!({"command": "stty -echo; echo ready; wc -c"}))
        .await;
    let mut ws = Ws::connect(&url).await;
    ws.wait_stdout("ready").await;
    // 8 MiB in lines of 1 KiB (a terminal takes a line of at most 4 KiB), 64 lines a message.
    let line = format!("{}\n", "y".repeat(1023));
    let message = line.repeat(64);
    for _ in 0..128 {
        ws.send(&message).await;
    }
    ws.send("\u{4}").await;
    let out = ws.finish().await;
    assert_eq!(out.exit(), Some(0), "{:?}", out.last);
    assert!(
        out.stdout.lines().any(|l| l.trim() == "8388608"),
        "all 8 MiB read: {}",
        out.stdout
    );
}

/// A claim that could not be recorded (a full disk, no descriptors left) must not let a later
/// server give the runner, with its client's files, to someone else: it removes the runner.
#[tokio::test]
async fn a_claim_that_could_not_be_recorded_is_never_handed_out_again() {
    let mut s = Server::start().await;
    s.environment(1, 1, json!({})).await;
    s.wait_idle(1, 1).await;
    // The only idle runner: its claim record cannot be written (a directory where the record's
    // temporary file goes).
    let runners = s.runner_dir("x").parent().unwrap().to_path_buf();
    let idle: Vec<_> = std::fs::read_dir(&runners).unwrap().flatten().collect();
    assert_eq!(idle.len(), 1);
    std::fs::create_dir(idle[0].path().join("runner.json.tmp")).unwrap();
    let first = s.claim(1, 600).await;
    assert_eq!(idle[0].file_name().to_string_lossy(), first);
    s.copy(&first, &[("secret.txt", b"the first learner's")])
        .await;
    eventually("the claim was tried and the record removed", 20, || async {
        !s.runner_dir(&first).join("runner.json").exists()
    })
    .await;
    s.kill();
    s.start_again();
    s.wait_idle(1, 1).await;
    let second = s.claim(1, 600).await;
    assert_ne!(
        second, first,
        "the first learner's runner was handed out again"
    );
    let r = s.download(&second, "secret.txt").await;
    assert_eq!(r.status(), 424);
}

/// The server raises its own limit of open files (every runner holds descriptors); a learner's
/// program gets the usual soft limit of a Linux login.
#[tokio::test]
async fn the_server_raises_its_open_file_limit_and_programs_get_the_usual_one() {
    let s = Server::start().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(open_files[0], open_files[1], "soft = hard: {limits}");
    s.environment(1, 1, json!({})).await;
    let r = s.claim(1, 60).await;
    let out = s.run(&r, json!({"command": "ulimit -n"})).await;
    let expected = open_files[1].parse::<u64>().unwrap().min(1024);
    assert_eq!(out.stdout, format!("{expected}\r\n"));
}

/// The agent's socket lies in a directory the runner's root may write: a privileged execution
/// that links it to another runner's socket must not lead the server to that runner.
#[tokio::test]
async fn a_runner_cannot_lead_the_server_to_another_runners_agent() {
    let mut s = Server::start().await;
    s.environment(1, 2, json!({})).await;
    let attacker = s.claim(1, 600).await;
    let victim = s.claim(1, 600).await;
    s.copy(&victim, &[("secret.txt", b"the victim's")]).await;
    let victims_socket = s.runner_dir(&victim).join("ctl/agent.sock");
    let out = s
        .run(
            &attacker,
            json!({"command": format!("rm /.poseidon/ctl/agent.sock && ln -s {} /.poseidon/ctl/agent.sock", victims_socket.display()), "privilegedExecution": true}),
        )
        .await;
    assert_eq!(out.exit(), Some(0), "{:?}", out.messages);
    // The next start connects to every runner anew.
    s.kill_and_restart().await;
    s.wait_idle(1, 2).await;
    // Its socket leads to a process that is not its agent: the runner is removed, not
    // recovered as a window into the victim's runner.
    let r = s.download(&attacker, "secret.txt").await;
    assert_eq!(r.status(), 410, "{}", support::log_tail(&s.log()));
    let r = s.download(&victim, "secret.txt").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "the victim's");
}

/// The runner's root cannot trace its agent: a stopped agent froze the runner.
#[tokio::test]
async fn the_runners_root_cannot_trace_its_agent() {
    let s = Server::start().await;
    s.environment(1, 1, json!({})).await;
    let r = s.claim(1, 60).await;
    let probe =
        "python3 -c 'import ctypes; print(\"attach\", ctypes.CDLL(None).ptrace(16, 1, 0, 0))'";
    let out = s
        .run(&r, json!({"command": probe, "privilegedExecution": true}))
        .await;
    assert!(out.stdout.contains("attach -1"), "{:?}", out.messages);
    let out = s.run(&r, json!({"command": "echo still answering"})).await;
    assert_eq!(out.stdout, "still answering\r\n");
}
