//! `poseidon-loadgen`: drives a running Poseidon server over HTTP and WebSocket the way CodeOcean
//! does, measures throughput and latency of claims and executions against direct-sandbox and
//! HTTP baselines taken in the same run, and the server's resident memory; prints Markdown tables
//! and writes JSON.
//!
//! Every load level is bounded in operation count and in time, and every operation in time.

#![forbid(unsafe_code)]

mod client;
mod jwt;
mod load;
mod machine;
mod memory;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::client::{Client, ClientError};
use crate::load::Latency;
use crate::machine::{effective_uid, listener_pid, Machine};
use crate::memory::Probe;
use crate::report::{Comparison, Ratio, Report, Row, Skipped};
use crate::scenarios::{Counters, Level, Program, Settings};

/// A scenario that can be selected with `--scenarios`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Direct bwrap starts and `GET /version`: the denominators of the ratios.
    Baseline,
    /// Claim and destroy runners from a warm pool.
    Claim,
    /// Claim, copy, execute, read the WebSocket to `exit`, destroy.
    Execute,
    /// Executions on runners claimed beforehand (a learner pressing "Run" again).
    Rerun,
    /// Server VmRSS idle, over repeated executions, and with many idle runners.
    Memory,
    /// Claim and execute on a server with plugins, compared to the plain one.
    Plugins,
    /// Claims while a plugin file is replaced every second.
    Reload,
    /// Claim and execute on a server running the Nomad backend.
    Nomad,
}

/// Load generator for a Poseidon server.
#[derive(Debug, Parser)]
#[command(name = "poseidon-loadgen", version, about)]
struct Args {
    /// The server under test (`http://127.0.0.1:PORT`).
    #[arg(long)]
    url: String,
    /// Its `Poseidon-Token`.
    #[arg(long, default_value = "")]
    token: String,
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "baseline,claim,execute,rerun,memory,plugins,reload,nomad"
    )]
    scenarios: Vec<Scenario>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Claims per level.
    #[arg(long, default_value_t = 500)]
    claim_count: usize,
    /// Executions per level and program.
    #[arg(long, default_value_t = 200)]
    execute_count: usize,
    /// Direct sandbox starts per level and program (`GET /version`: four times as many).
    #[arg(long, default_value_t = 100)]
    baseline_count: usize,
    /// Longest time a level starts new operations, seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Longest time one operation may take, seconds.
    #[arg(long, default_value_t = 120)]
    op_timeout: u64,
    /// Image of the environments created for the run.
    #[arg(long, default_value = "host")]
    image: String,
    /// First environment id used (the run uses the next ten and deletes them at the end).
    #[arg(long, default_value_t = 9100)]
    env_base: u64,
    /// Time limit of every execution, seconds.
    #[arg(long, default_value_t = 30)]
    time_limit: u32,
    /// The server's process id for memory readings (found through the listening port if omitted).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Idle runners for the memory reading.
    #[arg(long, default_value_t = 1000)]
    idle_runners: u32,
    /// Longest wait for that pool to fill, seconds.
    #[arg(long, default_value_t = 300)]
    idle_fill_seconds: u64,
    /// Rounds of the leak check (memory read after each).
    #[arg(long, default_value_t = 3)]
    leak_rounds: usize,
    /// Executions per leak-check round (`true`, concurrency 8).
    #[arg(long, default_value_t = 300)]
    leak_executions: usize,
    /// A second server with plugins loaded, for the `plugins` and `reload` scenarios.
    #[arg(long)]
    plugin_url: Option<String>,
    /// Token of the plugin server (default: `--token`).
    #[arg(long)]
    plugin_token: Option<String>,
    /// `Authorization: Bearer` token for the plugin server (its authenticator plugin).
    #[arg(long, conflicts_with = "plugin_jwt_key")]
    plugin_bearer: Option<String>,
    /// HS256 key of `--plugin-jwt-tenant` in the plugin server's `jwt_auth` authenticator: the
    /// generator signs its own bearer token (claims `iss` = tenant, `exp` = now + 1 day).
    #[arg(long)]
    plugin_jwt_key: Option<String>,
    /// Tenant (`iss` claim) of the signed token.
    #[arg(long, default_value = "bench")]
    plugin_jwt_tenant: String,
    /// The plugin file the server watches, replaced every second by `reload`.
    #[arg(long)]
    plugin_file: Option<PathBuf>,
    /// What is copied over `--plugin-file`; with several (comma-separated), each swap copies the
    /// next, so every swap changes the file's content (the host reloads only changed content).
    #[arg(long, value_delimiter = ',')]
    plugin_source: Vec<PathBuf>,
    /// Duration of the reload scenario, seconds.
    #[arg(long, default_value_t = 10)]
    reload_seconds: u64,
    /// Concurrency of the reload scenario.
    #[arg(long, default_value_t = 8)]
    reload_concurrency: usize,
    /// A server running the Nomad backend (over the emulator), for the `nomad` scenario.
    #[arg(long)]
    nomad_url: Option<String>,
    /// Token of the Nomad server (default: `--token`).
    #[arg(long)]
    nomad_token: Option<String>,
    /// The bubblewrap binary for the direct baseline.
    #[arg(long, default_value = "bwrap")]
    bwrap: PathBuf,
    /// Host uid of the direct baseline's sandboxes when running as root (the server gives each
    /// runner its own unprivileged uid too).
    #[arg(long, default_value_t = 65534)]
    baseline_uid: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Errors that end a run.
#[derive(Debug, thiserror::Error)]
enum LoadgenError {
    /// The server under test does not answer.
    #[error("the server at {url} does not answer: {source}")]
    Unreachable {
        /// Its URL.
        url: String,
        /// Why.
        source: ClientError,
    },
    /// The JSON could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The report could not be serialised.
    #[error("cannot serialise the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// Environment ids relative to `--env-base`.
mod env {
    pub const CLAIM: u64 = 1;
    pub const EXECUTE: u64 = 2;
    pub const LEAK: u64 = 3;
    pub const IDLE: u64 = 4;
    pub const RELOAD: u64 = 5;
    pub const RERUN: u64 = 6;
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("poseidon-loadgen: {e}");
        std::process::exit(1);
    }
}

struct Run {
    args: Args,
    settings: Settings,
    report: Report,
    counters: Arc<Counters>,
}

impl Run {
    fn wants(&self, s: Scenario) -> bool {
        self.args.scenarios.contains(&s)
    }

    fn skip(&mut self, scenario: &str, reason: impl Into<String>) {
        let reason = reason.into();
        eprintln!("{scenario}: skipped — {reason}");
        self.report.skipped.push(Skipped {
            scenario: scenario.into(),
            reason,
        });
    }

    fn push(&mut self, row: Row) {
        eprintln!(
            "  {} {} c={}: {} ok, {} failed, {:.2} {}, p50 {:.2} ms, p99 {:.2} ms",
            row.scenario,
            row.variant,
            row.concurrency,
            row.ok,
            row.failed,
            row.rate,
            row.rate_unit,
            row.latency.p50_ms,
            row.latency.p99_ms
        );
        self.report.rows.push(row);
    }

    /// The baseline row with this variant at this concurrency.
    fn baseline(&self, variant: &str, concurrency: usize) -> Option<&Row> {
        self.report.rows.iter().find(|r| {
            r.scenario == "baseline" && r.variant == variant && r.concurrency == concurrency
        })
    }

    fn with_ratio(&self, mut row: Row, against: &str) -> Row {
        if let Some(b) = self.baseline(against, row.concurrency) {
            row.ratio = Ratio::of(against, &row.latency, &b.latency);
        }
        row
    }

    /// The execution alone (phase `run`: `POST …/execute` + WebSocket to `exit`) against the
    /// direct sandbox start of the same program, p50 and p99, as the row's extra figures.
    fn run_phase_ratio(&self, row: &Row, against: &str) -> serde_json::Value {
        let (Some(run), Some(base)) = (
            row.phases.iter().find(|p| p.name == "run"),
            self.baseline(against, row.concurrency),
        ) else {
            return serde_json::Value::Null;
        };
        match Ratio::of(against, &run.latency, &base.latency) {
            Some(r) => serde_json::json!({
                "run p50 ms": run.latency.p50_ms,
                "baseline p50 ms": base.latency.p50_ms,
                "run / baseline p50": (r.p50 * 1000.0).round() / 1000.0,
                "run / baseline p99": (r.p99 * 1000.0).round() / 1000.0,
                "against": against,
            }),
            None => serde_json::Value::Null,
        }
    }

    /// Files the rows of an interleaved comparison of `operation` (plain server first, each
    /// named "`operation`, plain|plugins (interleaved)", with its ratio `against` a baseline
    /// if given) and what the other adds, or why it failed.
    fn interleaved(
        &mut self,
        operation: &str,
        against: Option<&str>,
        rows: Result<(Row, Row), ClientError>,
    ) {
        let (base, with) = match rows {
            Ok(rows) => rows,
            Err(e) => {
                return self.skip(
                    &format!("plugins, {operation} interleaved"),
                    format!("failed: {e}"),
                )
            }
        };
        let [base, with] = [("plain", base), ("plugins", with)].map(|(variant, row)| {
            let row = Row {
                variant: format!("{operation}, {variant} (interleaved)"),
                ..row
            };
            match against {
                Some(against) => self.with_ratio(row, against),
                None => row,
            }
        });
        self.report.comparisons.push(Comparison::of(
            "plugins",
            &format!("{operation}, interleaved"),
            1,
            base.latency,
            with.latency,
        ));
        self.push(base);
        self.push(with);
    }

    fn env(&self, offset: u64) -> u64 {
        self.args.env_base + offset
    }
}

async fn run(args: Args) -> Result<(), LoadgenError> {
    let main = Client::new(&args.url, &args.token).map_err(|source| LoadgenError::Unreachable {
        url: args.url.clone(),
        source,
    })?;
    let server_version = main
        .version()
        .await
        .map_err(|source| LoadgenError::Unreachable {
            url: args.url.clone(),
            source,
        })?;
    let root = effective_uid() == Some(0);
    let settings = Settings {
        claim_count: args.claim_count,
        execute_count: args.execute_count,
        baseline_count: args.baseline_count,
        duration: Duration::from_secs(args.duration),
        op_timeout: Duration::from_secs(args.op_timeout),
        image: args.image.clone(),
        time_limit: args.time_limit,
        bwrap: args.bwrap.clone(),
        baseline_uid: root.then_some(args.baseline_uid),
    };
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut run = Run {
        settings,
        report: Report {
            tool: "poseidon-loadgen".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            command: std::env::args().collect(),
            started_unix,
            machine: Machine::detect(),
            server_version,
            rows: Vec::new(),
            comparisons: Vec::new(),
            memory: None,
            skipped: Vec::new(),
        },
        counters: Arc::new(Counters::default()),
        args,
    };
    let levels = run.args.concurrency.clone();
    let programs = [Program::true_(), Program::true_binary(), Program::python()];

    // Memory: find the server process and read it before any load.
    let mut probe = None;
    if run.wants(Scenario::Memory) {
        let pid = run.args.server_pid.or_else(|| {
            reqwest::Url::parse(&run.args.url)
                .ok()
                .and_then(|u| u.port_or_known_default())
                .and_then(listener_pid)
        });
        match pid.and_then(Probe::new) {
            Some(mut p) => {
                p.read("idle, before the run", Some(0), 0);
                probe = Some(p);
            }
            None => run.skip(
                "memory",
                "the server's process cannot be read (give --server-pid; it must run on this machine)",
            ),
        }
    }

    if run.wants(Scenario::Baseline) {
        eprintln!("baseline");
        if !root {
            run.report.skipped.push(Skipped {
                scenario: "baseline".into(),
                reason: "not root: the direct sandboxes run as this user, not as a separate uid"
                    .into(),
            });
        }
        for &c in &levels {
            for program in programs.iter().filter(|p| p.baseline == p.name) {
                let row = scenarios::baseline_direct(&run.settings, program, c).await;
                run.push(row);
            }
            let row = scenarios::baseline_http(&main, &run.settings, c).await;
            run.push(row);
        }
    }

    if run.wants(Scenario::Claim) {
        eprintln!("claim");
        let environment = run.env(env::CLAIM);
        for &c in &levels {
            match scenarios::claim(
                &main,
                &run.settings,
                "claim",
                "warm pool",
                environment,
                c,
                run.settings.claim_count,
            )
            .await
            {
                Ok(row) => {
                    let row = run.with_ratio(row, "GET /version");
                    run.push(row);
                }
                Err(e) => run.skip(&format!("claim at {c}"), format!("failed: {e}")),
            }
        }
        let _ = main.delete_environment(environment).await;
    }

    // Executions on freshly claimed runners, then on runners claimed beforehand.
    for (scenario, name, offset) in [
        (Scenario::Execute, "execute", env::EXECUTE),
        (Scenario::Rerun, "rerun", env::RERUN),
    ] {
        if !run.wants(scenario) {
            continue;
        }
        eprintln!("{name}");
        let environment = run.env(offset);
        for program in &programs {
            for &c in &levels {
                let level = Level {
                    client: &main,
                    settings: &run.settings,
                    scenario: name,
                    environment,
                    program,
                    concurrency: c,
                    count: run.settings.execute_count,
                };
                let result = if scenario == Scenario::Execute {
                    scenarios::execute(level, Some(Arc::clone(&run.counters))).await
                } else {
                    scenarios::rerun(level).await
                };
                match result {
                    Ok(row) => {
                        let against = format!("bwrap {}", program.baseline);
                        let mut row = run.with_ratio(row, &against);
                        row.extra = run.run_phase_ratio(&row, &against);
                        run.push(row);
                    }
                    Err(e) => run.skip(
                        &format!("{name} {} at {c}", program.name),
                        format!("failed: {e}"),
                    ),
                }
                if let (Scenario::Execute, Some(p)) = (scenario, probe.as_mut()) {
                    let n = run.counters.executions.load(Ordering::Relaxed);
                    p.read(&format!("after execute {} at {c}", program.name), None, n);
                }
            }
        }
        let _ = main.delete_environment(environment).await;
    }

    if let Some(mut p) = probe.take() {
        eprintln!("memory");
        memory(&mut run, &main, &mut p).await;
        run.report.memory = Some(p.report);
    }

    if run.wants(Scenario::Plugins) {
        plugins(&mut run, &main, &levels).await;
    }
    if run.wants(Scenario::Reload) {
        reload(&mut run).await;
    }
    if run.wants(Scenario::Nomad) {
        nomad(&mut run, &levels, &programs).await;
    }

    println!("{}", run.report.table());
    if let Some(path) = &run.args.json {
        let text = serde_json::to_string_pretty(&run.report)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LoadgenError::Write {
                path: path.clone(),
                source,
            })?;
        }
        std::fs::write(path, text).map_err(|source| LoadgenError::Write {
            path: path.clone(),
            source,
        })?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Leak check (rounds of executions, a reading after each) and the idle-runner reading.
async fn memory(run: &mut Run, main: &Client, probe: &mut Probe) {
    let environment = run.env(env::LEAK);
    let true_ = Program::true_();
    let mut after_rounds = Vec::new();
    for round in 1..=run.args.leak_rounds {
        let level = Level {
            client: main,
            settings: &run.settings,
            scenario: "memory",
            environment,
            program: &true_,
            concurrency: 8,
            count: run.args.leak_executions,
        };
        match scenarios::execute(level, Some(Arc::clone(&run.counters))).await {
            Ok(row) if row.failed == 0 => {
                let n = run.counters.executions.load(Ordering::Relaxed);
                after_rounds
                    .push(probe.read(&format!("after leak-check round {round}"), None, n) as i64);
            }
            Ok(row) => {
                probe.report.notes.push(format!(
                    "leak-check round {round}: {} of {} executions failed",
                    row.failed,
                    row.ok + row.failed
                ));
                break;
            }
            Err(e) => {
                probe
                    .report
                    .notes
                    .push(format!("leak-check round {round} failed: {e}"));
                break;
            }
        }
    }
    let _ = main.delete_environment(environment).await;
    if after_rounds.len() >= 2 {
        probe.report.growth_after_warmup_kib =
            Some(after_rounds[after_rounds.len() - 1] - after_rounds[0]);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = run.counters.executions.load(Ordering::Relaxed);
    probe.read("idle, after all executions", Some(0), n);
    if run.args.idle_runners > 0 {
        if let Err(e) = probe
            .idle_runners(
                main,
                run.env(env::IDLE),
                run.args.idle_runners,
                &run.settings.image,
                Duration::from_secs(run.args.idle_fill_seconds),
                n,
            )
            .await
        {
            probe
                .report
                .notes
                .push(format!("idle-runner reading failed: {e}"));
            let _ = main.delete_environment(run.env(env::IDLE)).await;
        }
    }
}

fn other_client(url: &str, token: &str) -> Result<Client, ClientError> {
    Client::new(url, token)
}

/// A client for the plugin server: its token, and the bearer token if one is given or signed.
fn plugin_client(args: &Args, url: &str, token: &str) -> Result<Client, ClientError> {
    let bearer = match (&args.plugin_bearer, &args.plugin_jwt_key) {
        (Some(bearer), _) => Some(bearer.clone()),
        (None, Some(key)) => Some(jwt::hs256(
            &args.plugin_jwt_tenant,
            key.as_bytes(),
            24 * 3600,
        )),
        (None, None) => None,
    };
    match bearer {
        Some(bearer) => Client::with_bearer(url, token, &bearer),
        None => Client::new(url, token),
    }
}

async fn plugins(run: &mut Run, main: &Client, levels: &[usize]) {
    let Some(url) = run.args.plugin_url.clone() else {
        run.skip(
            "plugins",
            "no --plugin-url given (a server with plugins loaded)",
        );
        return;
    };
    eprintln!("plugins");
    let token = run
        .args
        .plugin_token
        .clone()
        .unwrap_or_else(|| run.args.token.clone());
    let plugged = match plugin_client(&run.args, &url, &token) {
        Ok(c) => c,
        Err(e) => return run.skip("plugins", format!("failed: {e}")),
    };
    if let Err(e) = plugged.version().await {
        return run.skip("plugins", format!("{url} does not answer: {e}"));
    }
    let program = Program::true_();
    for &c in levels {
        // Plain, plugins, plugins, plain: whichever server runs second pays for what the
        // first left behind (the kernel still tearing down its sandboxes); an A/A run with two
        // plain servers in one order showed the second 0.3-1 ms slower per execution and up
        // to 20 % fewer claims. Each variant's figure is the mean of its two runs.
        let mut measured: Vec<(&str, Latency, Latency, Latency)> = Vec::new();
        let order = [
            ("plain", main, ""),
            ("plugins", &plugged, ""),
            ("plugins", &plugged, " (again)"),
            ("plain", main, " (again)"),
        ];
        for (variant, client, again) in order {
            let claim = scenarios::claim(
                client,
                &run.settings,
                "plugins",
                &format!("claim, {variant}{again}"),
                run.env(env::CLAIM),
                c,
                run.settings.claim_count,
            )
            .await;
            let level = Level {
                client,
                settings: &run.settings,
                scenario: "plugins",
                environment: run.env(env::EXECUTE),
                program: &program,
                concurrency: c,
                count: run.settings.execute_count,
            };
            let named = |operation: &str| {
                let variant = format!("{operation}, {variant}{again}");
                move |row: Row| Row { variant, ..row }
            };
            let execute = scenarios::execute(level, None)
                .await
                .map(named("execute true"));
            // The execution alone on a claimed runner: the plugins' share of an execution
            // without a claim or a pool refill next to it.
            let rerun = scenarios::rerun(Level {
                environment: run.env(env::RERUN),
                ..level
            })
            .await
            .map(named("rerun true"));
            match (claim, execute, rerun) {
                (Ok(claim), Ok(execute), Ok(rerun)) => {
                    let execute = run.with_ratio(execute, "bwrap true");
                    let rerun = run.with_ratio(rerun, "bwrap true");
                    measured.push((variant, claim.latency, execute.latency, rerun.latency));
                    run.push(claim);
                    run.push(execute);
                    run.push(rerun);
                }
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    run.skip(
                        &format!("plugins at {c} ({variant})"),
                        format!("failed: {e}"),
                    );
                }
            }
        }
        let both = |name: &str| {
            let runs: Vec<_> = measured.iter().filter(|m| m.0 == name).collect();
            match runs[..] {
                [a, b] => Some((
                    Latency::mean_of(&a.1, &b.1),
                    Latency::mean_of(&a.2, &b.2),
                    Latency::mean_of(&a.3, &b.3),
                )),
                _ => None,
            }
        };
        if let (
            Some((base_claim, base_exec, base_rerun)),
            Some((with_claim, with_exec, with_rerun)),
        ) = (both("plain"), both("plugins"))
        {
            for (operation, base, with) in [
                ("claim", base_claim, with_claim),
                ("execute true", base_exec, with_exec),
                ("rerun true", base_rerun, with_rerun),
            ] {
                run.report
                    .comparisons
                    .push(Comparison::of("plugins", operation, c, base, with));
            }
        }
    }
    // The same executions with both servers up at once, alternating one by one: the most
    // precise A/B this machine allows (see `scenarios::rerun_interleaved`).
    let level = |client| Level {
        client,
        settings: &run.settings,
        scenario: "plugins",
        environment: run.env(env::RERUN),
        program: &program,
        concurrency: 1,
        count: run.settings.execute_count,
    };
    let rerun = scenarios::rerun_interleaved(level(main), level(&plugged)).await;
    run.interleaved("rerun true", Some("bwrap true"), rerun);
    let claims = scenarios::claim_interleaved(
        [main, &plugged],
        &run.settings,
        "plugins",
        run.env(env::CLAIM),
        run.settings.claim_count,
    )
    .await;
    run.interleaved("claim", None, claims);
    for client in [main, &plugged] {
        let _ = client.delete_environment(run.env(env::CLAIM)).await;
        let _ = client.delete_environment(run.env(env::EXECUTE)).await;
        let _ = client.delete_environment(run.env(env::RERUN)).await;
    }
}

async fn reload(run: &mut Run) {
    let (Some(file), false) = (
        run.args.plugin_file.clone(),
        run.args.plugin_source.is_empty(),
    ) else {
        run.skip(
            "reload",
            "no --plugin-file and --plugin-source given (the plugin file a server watches, and what to copy over it)",
        );
        return;
    };
    let sources = run.args.plugin_source.clone();
    if let Some(missing) = sources.iter().find(|s| !s.is_file()) {
        return run.skip("reload", format!("{} is not a file", missing.display()));
    }
    let (url, token) = match &run.args.plugin_url {
        Some(url) => (
            url.clone(),
            run.args
                .plugin_token
                .clone()
                .unwrap_or_else(|| run.args.token.clone()),
        ),
        None => (run.args.url.clone(), run.args.token.clone()),
    };
    eprintln!("reload (against {url})");
    let client = match run.args.plugin_url.is_some() {
        true => plugin_client(&run.args, &url, &token),
        false => other_client(&url, &token),
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => return run.skip("reload", format!("failed: {e}")),
    };
    let environment = run.env(env::RELOAD);
    match scenarios::reload(
        &client,
        &run.settings,
        environment,
        &file,
        &sources,
        run.args.reload_concurrency,
        run.args.reload_seconds,
    )
    .await
    {
        Ok(row) => {
            let row = run.with_ratio(row, "GET /version");
            run.push(row);
        }
        Err(e) => run.skip("reload", format!("failed: {e}")),
    }
    let _ = client.delete_environment(environment).await;
}

async fn nomad(run: &mut Run, levels: &[usize], programs: &[Program]) {
    let Some(url) = run.args.nomad_url.clone() else {
        run.skip(
            "nomad",
            "no --nomad-url given (a server running the Nomad backend over the emulator)",
        );
        return;
    };
    eprintln!("nomad");
    let token = run
        .args
        .nomad_token
        .clone()
        .unwrap_or_else(|| run.args.token.clone());
    let client = match other_client(&url, &token) {
        Ok(c) => c,
        Err(e) => return run.skip("nomad", format!("failed: {e}")),
    };
    if let Err(e) = client.version().await {
        return run.skip("nomad", format!("{url} does not answer: {e}"));
    }
    // Once the server cannot even prepare a level, the later levels are skipped at once instead
    // of each waiting for its own time-outs.
    let mut broken: Option<String> = None;
    for &c in levels {
        if let Some(why) = &broken {
            run.skip(&format!("nomad claim at {c}"), why.clone());
            continue;
        }
        match scenarios::claim(
            &client,
            &run.settings,
            "nomad",
            "claim",
            run.env(env::CLAIM),
            c,
            run.settings.claim_count,
        )
        .await
        {
            Ok(row) => {
                let row = run.with_ratio(row, "GET /version");
                run.push(row);
            }
            Err(e) => {
                run.skip(&format!("nomad claim at {c}"), format!("failed: {e}"));
                broken = Some(format!("not run: an earlier level failed ({e})"));
            }
        }
    }
    for program in programs {
        for &c in levels {
            if let Some(why) = &broken {
                run.skip(
                    &format!("nomad execute {} at {c}", program.name),
                    why.clone(),
                );
                continue;
            }
            let level = Level {
                client: &client,
                settings: &run.settings,
                scenario: "nomad",
                environment: run.env(env::EXECUTE),
                program,
                concurrency: c,
                count: run.settings.execute_count,
            };
            match scenarios::execute(level, None).await {
                Ok(mut row) => {
                    row.variant = format!("execute {}", program.name);
                    let row = run.with_ratio(row, &format!("bwrap {}", program.baseline));
                    run.push(row);
                }
                Err(e) => {
                    run.skip(
                        &format!("nomad execute {} at {c}", program.name),
                        format!("failed: {e}"),
                    );
                    broken = Some(format!("not run: an earlier level failed ({e})"));
                }
            }
        }
    }
    let _ = client.delete_environment(run.env(env::CLAIM)).await;
    let _ = client.delete_environment(run.env(env::EXECUTE)).await;
}
