//! The scenarios: what one operation is, how the environment is prepared, and how an outcome
//! becomes a row of figures.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::{Client, ClientError};
use crate::load::{drive, interleave, Latency, Load, Outcome, Sample};
use crate::report::{Phase, Row};

/// Settings shared by all scenarios.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Operations per claim level.
    pub claim_count: usize,
    /// Operations per execute level.
    pub execute_count: usize,
    /// Operations per baseline level.
    pub baseline_count: usize,
    /// Longest time one level may start operations.
    pub duration: Duration,
    /// Longest time one operation may take.
    pub op_timeout: Duration,
    /// The image of the environments the load generator creates.
    pub image: String,
    /// Time limit of each execution, seconds.
    pub time_limit: u32,
    /// The bubblewrap binary for the direct baseline.
    pub bwrap: PathBuf,
    /// Host uid the direct baseline runs as (when this process is root).
    pub baseline_uid: Option<u32>,
}

impl Settings {
    fn load(&self, concurrency: usize, count: usize) -> Load {
        Load {
            concurrency,
            count,
            duration: self.duration,
            op_timeout: self.op_timeout,
        }
    }
}

/// Unrecorded operations before a baseline or execute level.
pub const WARMUP: usize = 2;

/// The line the Python program prints.
pub const PYTHON_LINE: &str = "Hello from Poseidon";

/// A program an execution runs.
#[derive(Debug, Clone)]
pub struct Program {
    /// Short name (`true`, `python3`).
    pub name: &'static str,
    /// The command sent to `POST /execute`.
    pub command: String,
    /// Files copied before (path, content).
    pub files: Vec<(String, Vec<u8>)>,
    /// Text stdout must contain.
    pub expect: Option<&'static str>,
    /// The same program's arguments after `bwrap ... --` for the direct baseline.
    pub direct: Vec<String>,
    /// The program whose direct bwrap start is this one's baseline (its own name, or another
    /// program's that starts the same binary).
    pub baseline: &'static str,
}

impl Program {
    /// `main.py`, padded with a comment to [`COPY_BYTES`]: the "1 KiB file copy".
    fn files() -> Vec<(String, Vec<u8>)> {
        let mut content = format!("print({PYTHON_LINE:?})\n#").into_bytes();
        content.resize(COPY_BYTES - 1, b'#');
        content.push(b'\n');
        vec![("main.py".to_string(), content)]
    }

    /// `true`: the cheapest possible execution (bash's builtin: the gateway's `bash -c`).
    pub fn true_() -> Self {
        Self {
            name: "true",
            command: "true".into(),
            files: Self::files(),
            expect: None,
            direct: vec!["true".into()],
            baseline: "true",
        }
    }

    /// `/usr/bin/true`: the baseline's own program, which bash would exec (a runner's agent may
    /// start it without bash).
    pub fn true_binary() -> Self {
        Self {
            name: "/usr/bin/true",
            command: "/usr/bin/true".into(),
            direct: vec!["/usr/bin/true".into()],
            baseline: "true",
            ..Self::true_()
        }
    }

    /// `python3 main.py` printing one line.
    pub fn python() -> Self {
        Self {
            name: "python3",
            command: "python3 main.py".into(),
            files: Self::files(),
            expect: Some(PYTHON_LINE),
            direct: vec![
                "python3".into(),
                "-c".into(),
                format!("print({PYTHON_LINE:?})"),
            ],
            baseline: "python3",
        }
    }
}

/// Counters shared across scenarios.
#[derive(Debug, Default)]
pub struct Counters {
    /// Executions finished against the main server.
    pub executions: AtomicUsize,
}

/// Errors of a direct sandbox start.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// bwrap could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The sandbox failed.
    #[error("the sandbox exited with {status}: {stderr}")]
    Failed {
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// The program did not print what it should.
    #[error("missing output {0:?}")]
    Output(&'static str),
}

/// bubblewrap arguments showing the host's system directories read-only (links stay links).
fn system_binds() -> Vec<std::ffi::OsString> {
    let mut args = Vec::new();
    for dir in [
        "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
    ] {
        let path = Path::new(dir);
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(path) {
                    args.extend(["--symlink".into(), target.into_os_string(), path.into()]);
                }
            }
            Ok(m) if m.is_dir() => args.extend(["--ro-bind".into(), path.into(), path.into()]),
            _ => {}
        }
    }
    args
}

/// Starts the program once in a bwrap sandbox directly, without the gateway.
pub async fn run_direct(
    bwrap: &Path,
    program: &Program,
    uid: Option<u32>,
) -> Result<Sample, DirectError> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(bwrap);
    // The system directories only, as the gateway's sandboxes see them: binding all of `/` would
    // also copy every other mount (and fail when one disappears meanwhile).
    cmd.arg("--unshare-all")
        .args(system_binds())
        .arg("--")
        .args(&program.direct)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let output = cmd.output().await.map_err(|source| DirectError::Spawn {
        program: bwrap.display().to_string(),
        source,
    })?;
    let total = started.elapsed();
    if !output.status.success() {
        return Err(DirectError::Failed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    if let Some(expect) = program.expect {
        if !String::from_utf8_lossy(&output.stdout).contains(expect) {
            return Err(DirectError::Output(expect));
        }
    }
    Ok(Sample::total(total))
}

/// Direct sandbox starts at one concurrency: the baseline of the execute scenario.
pub async fn baseline_direct(settings: &Settings, program: &Program, concurrency: usize) -> Row {
    let bwrap = settings.bwrap.clone();
    let uid = settings.baseline_uid;
    // Warm-up (not recorded): the first start of a program pays for cold caches.
    for _ in 0..WARMUP {
        let _ = run_direct(&bwrap, program, uid).await;
    }
    let p = program.clone();
    let outcome = drive(
        settings.load(concurrency, settings.baseline_count),
        move || {
            let bwrap = bwrap.clone();
            let p = p.clone();
            async move { run_direct(&bwrap, &p, uid).await }
        },
    )
    .await;
    let target = match uid {
        Some(uid) => format!("direct, uid {uid}"),
        None => "direct, as this user".to_string(),
    };
    Row::new(
        "baseline",
        &format!("bwrap {}", program.name),
        &target,
        concurrency,
        &outcome,
        "runs/s",
        1.0,
    )
}

/// `GET /version` at one concurrency: the HTTP floor, the baseline of the claim scenario.
pub async fn baseline_http(client: &Client, settings: &Settings, concurrency: usize) -> Row {
    let c = client.clone();
    let outcome = drive(
        settings.load(concurrency, settings.baseline_count * 4),
        move || {
            let c = c.clone();
            async move {
                let started = Instant::now();
                c.version().await?;
                Ok::<_, ClientError>(Sample::total(started.elapsed()))
            }
        },
    )
    .await;
    Row::new(
        "baseline",
        "GET /version",
        client.base(),
        concurrency,
        &outcome,
        "req/s",
        1.0,
    )
}

/// First and longest pause before claiming again from an empty pool.
const RETRY_PAUSE: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(100));

/// Claims a runner, retrying (with a growing pause) while the pool is empty; returns the id and the successful
/// request's own latency.
async fn claim_retrying(
    client: &Client,
    environment: u64,
    empties: &AtomicUsize,
) -> Result<(String, Duration), ClientError> {
    let mut pause = RETRY_PAUSE.0;
    loop {
        let started = Instant::now();
        match client.claim(environment).await {
            Ok(id) => return Ok((id, started.elapsed())),
            Err(ClientError::PoolEmpty) => {
                empties.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_PAUSE.1);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The pool size the claim scenario gives its environment at a concurrency.
pub fn claim_pool(concurrency: usize) -> u32 {
    (concurrency * 4).max(16) as u32
}

/// The pool size the execute scenario gives its environment at a concurrency.
pub fn execute_pool(concurrency: usize) -> u32 {
    (concurrency * 2).max(8) as u32
}

/// Creates (or resizes) the environment and waits until its pool is full.
pub async fn prepare(
    client: &Client,
    environment: u64,
    pool: u32,
    image: &str,
) -> Result<(), ClientError> {
    client.put_environment(environment, pool, image).await?;
    client
        .wait_idle(environment, pool, Duration::from_secs(180))
        .await
}

/// Claims and destroys runners from a warm pool at one concurrency.
pub async fn claim(
    client: &Client,
    settings: &Settings,
    scenario: &str,
    variant: &str,
    environment: u64,
    concurrency: usize,
    count: usize,
) -> Result<Row, ClientError> {
    prepare(
        client,
        environment,
        claim_pool(concurrency),
        &settings.image,
    )
    .await?;
    let empties = Arc::new(AtomicUsize::new(0));
    let c = client.clone();
    let e = Arc::clone(&empties);
    let outcome = drive(settings.load(concurrency, count), move || {
        let c = c.clone();
        let e = Arc::clone(&e);
        async move { claim_once(&c, environment, &e).await }
    })
    .await;
    Ok(claim_row(
        scenario,
        variant,
        client,
        concurrency,
        &outcome,
        &empties,
    ))
}

/// One operation of the claim scenario: a claim (retried while the pool is empty), then
/// the runner's destroy.
async fn claim_once(
    client: &Client,
    environment: u64,
    empties: &AtomicUsize,
) -> Result<Sample, ClientError> {
    let (runner, claimed) = claim_retrying(client, environment, empties).await?;
    let started = Instant::now();
    client.destroy(&runner).await?;
    Ok(Sample {
        total: claimed,
        phases: vec![claimed, started.elapsed()],
    })
}

/// The row of a claim scenario: claims per second, the claim's latency, its phases.
fn claim_row(
    scenario: &str,
    variant: &str,
    client: &Client,
    concurrency: usize,
    outcome: &Outcome,
    empties: &AtomicUsize,
) -> Row {
    let mut row = Row::new(
        scenario,
        variant,
        client.base(),
        concurrency,
        outcome,
        "claims/s",
        1.0,
    );
    row.pool_empty = empties.load(Ordering::Relaxed);
    row.phases = phases(outcome, &["claim", "destroy"]);
    row
}

fn phases(outcome: &Outcome, names: &[&str]) -> Vec<Phase> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| Phase {
            name: name.to_string(),
            latency: outcome.phase(i),
        })
        .collect()
}

/// One CodeOcean-like execution: claim, copy the program, execute, read the WebSocket to `exit`,
/// destroy.
async fn execute_once(
    client: &Client,
    environment: u64,
    program: &Program,
    time_limit: u32,
    empties: &AtomicUsize,
) -> Result<Sample, ClientError> {
    let t0 = Instant::now();
    let (runner, _) = claim_retrying(client, environment, empties).await?;
    let t1 = Instant::now();
    let work = async {
        client.copy(&runner, &program.files).await?;
        let t2 = Instant::now();
        let run = execute_on(client, &runner, program, time_limit).await?;
        Ok::<_, ClientError>((t2, run))
    }
    .await;
    let t4 = Instant::now();
    let destroyed = client.destroy(&runner).await;
    let t5 = Instant::now();
    let (t2, run) = work?;
    destroyed?;
    let (execute, websocket) = (run.phases[0], run.phases[1]);
    Ok(Sample {
        total: t5 - t0,
        phases: vec![t1 - t0, t2 - t1, execute, websocket, t5 - t4, run.total],
    })
}

/// The names of the execute scenario's phases; `run` is `execute` + `websocket` of the same
/// sample (the execution itself: `POST …/execute`, then the WebSocket up to `exit`).
pub const EXECUTE_PHASES: [&str; 6] = ["claim", "copy", "execute", "websocket", "destroy", "run"];
/// Size of the file the execute scenario copies.
pub const COPY_BYTES: usize = 1024;

/// One level of an execution scenario: the server, the name its row is filed under, the
/// environment, the program, and how much load.
#[derive(Clone, Copy)]
pub struct Level<'a> {
    /// The server under test.
    pub client: &'a Client,
    /// Settings shared by all scenarios.
    pub settings: &'a Settings,
    /// The scenario name of the row.
    pub scenario: &'a str,
    /// The environment the level uses (created or resized to its pool).
    pub environment: u64,
    /// What each execution runs.
    pub program: &'a Program,
    /// Executions in flight at once.
    pub concurrency: usize,
    /// Executions in total (at most).
    pub count: usize,
}

/// Runs executions of the program at one concurrency.
pub async fn execute(
    level: Level<'_>,
    counters: Option<Arc<Counters>>,
) -> Result<Row, ClientError> {
    let (client, settings, program) = (level.client, level.settings, level.program);
    let (environment, concurrency) = (level.environment, level.concurrency);
    prepare(
        client,
        environment,
        execute_pool(concurrency),
        &settings.image,
    )
    .await?;
    let empties = Arc::new(AtomicUsize::new(0));
    let time_limit = settings.time_limit;
    // Warm-up (not recorded), then wait for the pool to be full again.
    for _ in 0..WARMUP {
        let _ = execute_once(client, environment, program, time_limit, &empties).await;
    }
    client
        .wait_idle(
            environment,
            execute_pool(concurrency),
            Duration::from_secs(180),
        )
        .await?;
    empties.store(0, Ordering::Relaxed);
    let c = client.clone();
    let e = Arc::clone(&empties);
    let p = program.clone();
    let outcome = drive(settings.load(concurrency, level.count), move || {
        let c = c.clone();
        let e = Arc::clone(&e);
        let p = p.clone();
        let counters = counters.clone();
        async move {
            let sample = execute_once(&c, environment, &p, time_limit, &e).await;
            if let Some(counters) = counters {
                counters.executions.fetch_add(1, Ordering::Relaxed);
            }
            sample
        }
    })
    .await;
    let mut row = execution_row(&level, &outcome, &EXECUTE_PHASES);
    row.pool_empty = empties.load(Ordering::Relaxed);
    Ok(row)
}

/// The names of the rerun scenario's phases (`run` is the whole sample).
pub const RERUN_PHASES: [&str; 3] = ["execute", "websocket", "run"];

/// One execution on an already claimed runner: `POST …/execute`, then the WebSocket to `exit`.
async fn execute_on(
    client: &Client,
    runner: &str,
    program: &Program,
    time_limit: u32,
) -> Result<Sample, ClientError> {
    let t0 = Instant::now();
    let url = client.execute(runner, &program.command, time_limit).await?;
    let t1 = Instant::now();
    let transcript = client.run_websocket(&url).await?;
    let t2 = Instant::now();
    if transcript.exit != Some(0) {
        return Err(ClientError::Execution(format!(
            "exit code {:?}, stdout {:?}",
            transcript.exit, transcript.stdout
        )));
    }
    if let Some(expect) = program.expect {
        if !transcript.stdout.contains(expect) {
            return Err(ClientError::Execution(format!(
                "stdout {:?} lacks {expect:?}",
                transcript.stdout
            )));
        }
    }
    Ok(Sample {
        total: t2 - t0,
        phases: vec![t1 - t0, t2 - t1, t2 - t0],
    })
}

/// Executions on runners claimed beforehand, as a learner presses "Run" again: `concurrency`
/// runners are claimed and given the program's files, then each operation executes on one of
/// them (no claim, no copy, no pool refill next to it), and the runners are destroyed at the end.
pub async fn rerun(level: Level<'_>) -> Result<Row, ClientError> {
    let (client, settings, program) = (level.client, level.settings, level.program);
    let pool = level.concurrency as u32;
    prepare(client, level.environment, pool, &settings.image).await?;
    let mut runners = Vec::with_capacity(level.concurrency);
    let measured = async {
        let empties = AtomicUsize::new(0);
        for _ in 0..level.concurrency {
            runners.push(claim_retrying(client, level.environment, &empties).await?.0);
        }
        for runner in &runners {
            client.copy(runner, &program.files).await?;
            for _ in 0..WARMUP {
                execute_on(client, runner, program, settings.time_limit).await?;
            }
        }
        // The replacements of the claimed runners start in the background: wait for them, so
        // that no sandbox start runs next to the measured executions.
        client
            .wait_idle(level.environment, pool, Duration::from_secs(180))
            .await?;
        let free = Arc::new(Mutex::new(runners.clone()));
        let c = client.clone();
        let p = program.clone();
        let time_limit = settings.time_limit;
        let outcome = drive(settings.load(level.concurrency, level.count), move || {
            let c = c.clone();
            let p = p.clone();
            let free = Arc::clone(&free);
            async move {
                let runner = free
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop()
                    .ok_or_else(|| ClientError::Execution("no free runner".into()))?;
                let sample = execute_on(&c, &runner, &p, time_limit).await;
                free.lock().unwrap_or_else(|e| e.into_inner()).push(runner);
                sample
            }
        })
        .await;
        Ok::<_, ClientError>(outcome)
    }
    .await;
    // Also the runners of a run that failed half-way.
    for r in &runners {
        let _ = client.destroy(r).await;
    }
    Ok(execution_row(&level, &measured?, &RERUN_PHASES))
}

/// [`rerun`] on two servers at once, interleaved: one runner is claimed on each (`a`'s and
/// `b`'s own client, environment and program), then the executions alternate between them
/// (A B, B A, A B, …, [`interleave`]) one at a time, `a.count` each. Whatever the machine does
/// meanwhile (the kernel tearing down earlier sandboxes, another process) falls on both alike,
/// which two runs one after the other cannot promise. Returns `a`'s row and `b`'s (variant:
/// the program's name); their rates are per second of each server's own executions.
pub async fn rerun_interleaved(a: Level<'_>, b: Level<'_>) -> Result<(Row, Row), ClientError> {
    let sides = [a, b];
    for side in &sides {
        prepare(side.client, side.environment, 1, &side.settings.image).await?;
    }
    let mut runners: Vec<String> = Vec::with_capacity(2);
    let measured = async {
        let empties = AtomicUsize::new(0);
        for side in &sides {
            let runner = claim_retrying(side.client, side.environment, &empties)
                .await?
                .0;
            runners.push(runner.clone());
            side.client.copy(&runner, &side.program.files).await?;
            for _ in 0..WARMUP {
                execute_on(side.client, &runner, side.program, side.settings.time_limit).await?;
            }
        }
        for side in &sides {
            side.client
                .wait_idle(side.environment, 1, Duration::from_secs(180))
                .await?;
        }
        let runners = &runners;
        Ok::<_, ClientError>(
            interleave(a.settings.load(1, a.count), |s| {
                let side = &sides[s];
                execute_on(
                    side.client,
                    &runners[s],
                    side.program,
                    side.settings.time_limit,
                )
            })
            .await,
        )
    }
    .await;
    // Also the runners of a run that failed half-way.
    for (side, runner) in sides.iter().zip(&runners) {
        let _ = side.client.destroy(runner).await;
    }
    let [outcome_a, outcome_b] = measured?;
    Ok((
        execution_row(&a, &outcome_a, &RERUN_PHASES),
        execution_row(&b, &outcome_b, &RERUN_PHASES),
    ))
}

/// [`claim`] on two servers at once, interleaved: each `environment` (the same id on both)
/// gets its claim pool, then claims with their destroys alternate between the servers
/// (A B, B A, …, [`interleave`]) one at a time, `count` each. Returns the two rows
/// (variant `claim`); their rates are claims per second of each server's own claims and
/// destroys (at concurrency 1 what a client gets, without the other server's share of the
/// machine in one of them only).
pub async fn claim_interleaved(
    clients: [&Client; 2],
    settings: &Settings,
    scenario: &str,
    environment: u64,
    count: usize,
) -> Result<(Row, Row), ClientError> {
    for client in clients {
        prepare(client, environment, claim_pool(1), &settings.image).await?;
    }
    let empties = [AtomicUsize::new(0), AtomicUsize::new(0)];
    let [a, b] = interleave(settings.load(1, count), |s| {
        claim_once(clients[s], environment, &empties[s])
    })
    .await;
    let row = |s: usize, outcome: &Outcome| {
        claim_row(scenario, "claim", clients[s], 1, outcome, &empties[s])
    };
    Ok((row(0, &a), row(1, &b)))
}

/// The row of an execution scenario: executions per minute, latency and the named phases.
fn execution_row(level: &Level<'_>, outcome: &Outcome, phase_names: &[&str]) -> Row {
    let mut row = Row::new(
        level.scenario,
        level.program.name,
        level.client.base(),
        level.concurrency,
        outcome,
        "exec/min",
        60.0,
    );
    row.phases = phases(outcome, phase_names);
    row
}

/// How long after a plugin swap a request still counts as "during the swap".
pub const SWAP_WINDOW: Duration = Duration::from_millis(250);

/// The claim scenario while `sources` are copied over `file` every second, in turn.
#[allow(clippy::too_many_arguments)]
pub async fn reload(
    client: &Client,
    settings: &Settings,
    environment: u64,
    file: &Path,
    sources: &[PathBuf],
    concurrency: usize,
    seconds: u64,
) -> Result<Row, ClientError> {
    prepare(
        client,
        environment,
        claim_pool(concurrency),
        &settings.image,
    )
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let swaps: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let swap_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let start = Instant::now();
    let swapper = {
        let (stop, swaps, swap_errors) = (
            Arc::clone(&stop),
            Arc::clone(&swaps),
            Arc::clone(&swap_errors),
        );
        let (file, sources) = (file.to_path_buf(), sources.to_vec());
        tokio::spawn(async move {
            for next in 0.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let at = start.elapsed();
                let source = &sources[next % sources.len()];
                match tokio::fs::copy(source, &file).await {
                    Ok(_) => swaps.lock().unwrap().push(at),
                    Err(e) => swap_errors.lock().unwrap().push(e.to_string()),
                }
            }
        })
    };
    let empties = Arc::new(AtomicUsize::new(0));
    let c = client.clone();
    let e = Arc::clone(&empties);
    let load = Load {
        concurrency,
        count: usize::MAX / 2,
        duration: Duration::from_secs(seconds),
        op_timeout: settings.op_timeout,
    };
    let outcome = drive(load, move || {
        let c = c.clone();
        let e = Arc::clone(&e);
        async move {
            let (runner, claimed) = claim_retrying(&c, environment, &e).await?;
            c.destroy(&runner).await?;
            Ok::<_, ClientError>(Sample::total(claimed))
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let _ = swapper.await;
    // `drive` started a few microseconds after `start`: negligible against the window.
    let swaps = swaps.lock().unwrap().clone();
    let near = |started: Duration, took: Duration| {
        swaps
            .iter()
            .any(|s| started <= *s + SWAP_WINDOW && started + took >= *s)
    };
    let near_swap: Vec<Duration> = outcome
        .records
        .iter()
        .filter_map(|r| r.result.as_ref().ok().map(|s| (r.start, s.total)))
        .filter(|(started, took)| near(*started, *took))
        .map(|(_, took)| took)
        .collect();
    let failed_near_swap = outcome
        .records
        .iter()
        .filter(|r| r.result.is_err() && near(r.start, Duration::ZERO))
        .count();
    let mut row = Row::new(
        "reload",
        "claim while swapping",
        client.base(),
        concurrency,
        &outcome,
        "claims/s",
        1.0,
    );
    row.pool_empty = empties.load(Ordering::Relaxed);
    row.extra = json!({
        "swaps": swaps.len(),
        "swap_errors": swap_errors.lock().unwrap().clone(),
        "window_ms": SWAP_WINDOW.as_millis(),
        "near_swap": Latency::of(near_swap),
        "failed_near_swap": failed_near_swap,
    });
    Ok(row)
}
