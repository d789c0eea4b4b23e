//! The results of a run: rows of figures, comparisons, memory, skipped scenarios; printed as
//! Markdown tables and written as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::load::{ErrorCount, Latency, Outcome};
use crate::machine::Machine;

/// One measured load level of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `baseline`, `claim`, `execute`, `plugins`, `reload`, `nomad`.
    pub scenario: String,
    /// What was run (`true`, `python3`, `bwrap true`, `GET /version`, `plain`, `plugins`, ...).
    pub variant: String,
    /// The server's URL, or `direct` for sandboxes started without the gateway.
    pub target: String,
    /// Operations in flight at once.
    pub concurrency: usize,
    /// Successful operations.
    pub ok: usize,
    /// Failed operations.
    pub failed: usize,
    /// `POST /runners` answers "no idle runner" that were retried.
    pub pool_empty: usize,
    /// Wall time of the level.
    pub seconds: f64,
    /// Throughput in `rate_unit`.
    pub rate: f64,
    /// `claims/s`, `exec/min`, `req/s`, `runs/s`.
    pub rate_unit: String,
    /// Latency of the whole operation.
    pub latency: Latency,
    /// Latency of each phase (execute: claim, copy, execute, websocket, destroy).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<Phase>,
    /// This row's latency divided by a baseline's, at the same concurrency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<Ratio>,
    /// Failure messages.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ErrorCount>,
    /// Scenario-specific figures (reload: swaps and latency near swaps).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

impl Row {
    /// A row from an outcome; `per` scales the per-second rate (1 for /s, 60 for /min).
    pub fn new(
        scenario: &str,
        variant: &str,
        target: &str,
        concurrency: usize,
        outcome: &Outcome,
        rate_unit: &str,
        per: f64,
    ) -> Self {
        Self {
            scenario: scenario.into(),
            variant: variant.into(),
            target: target.into(),
            concurrency,
            ok: outcome.ok(),
            failed: outcome.failed(),
            pool_empty: 0,
            seconds: outcome.elapsed.as_secs_f64(),
            rate: outcome.per_second() * per,
            rate_unit: rate_unit.into(),
            latency: outcome.latency(),
            phases: Vec::new(),
            ratio: None,
            errors: outcome.errors(),
            extra: serde_json::Value::Null,
        }
    }
}

/// Latency of one phase of an operation.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// The phase's name.
    pub name: String,
    /// Its latency.
    pub latency: Latency,
}

/// A latency ratio against a baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// The baseline's variant.
    pub against: String,
    /// p50 / baseline p50.
    pub p50: f64,
    /// p99 / baseline p99.
    pub p99: f64,
}

impl Ratio {
    /// `latency` relative to `baseline` (`None` when the baseline has no samples).
    pub fn of(against: &str, latency: &Latency, baseline: &Latency) -> Option<Self> {
        (baseline.samples > 0 && latency.samples > 0 && baseline.p50_ms > 0.0).then(|| Self {
            against: against.into(),
            p50: latency.p50_ms / baseline.p50_ms,
            p99: latency.p99_ms / baseline.p99_ms.max(f64::MIN_POSITIVE),
        })
    }
}

/// What one server adds over another for the same operation.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The scenario (`plugins`).
    pub scenario: String,
    /// The operation compared (`claim`, `execute true`).
    pub operation: String,
    /// Operations in flight at once.
    pub concurrency: usize,
    /// Latency on the plain server (the mean of its two runs, before and after the other's;
    /// or of one run interleaved with the other's).
    pub base: Latency,
    /// Latency on the other server (the mean of its two runs, between the plain server's; or
    /// of one run interleaved with the plain server's).
    pub with: Latency,
    /// `with.p50 - base.p50`, ms.
    pub added_p50_ms: f64,
    /// `with.p99 - base.p99`, ms.
    pub added_p99_ms: f64,
    /// `with.p50 / base.p50`.
    pub ratio_p50: f64,
    /// `with.p99 / base.p99`.
    pub ratio_p99: f64,
}

impl Comparison {
    /// What `with` adds over `base` for `operation` of `scenario` at `concurrency`.
    pub fn of(
        scenario: &str,
        operation: &str,
        concurrency: usize,
        base: Latency,
        with: Latency,
    ) -> Self {
        Self {
            scenario: scenario.into(),
            operation: operation.into(),
            concurrency,
            base,
            with,
            added_p50_ms: with.p50_ms - base.p50_ms,
            added_p99_ms: with.p99_ms - base.p99_ms,
            ratio_p50: with.p50_ms / base.p50_ms.max(1e-6),
            ratio_p99: with.p99_ms / base.p99_ms.max(1e-6),
        }
    }
}

/// One resident-memory reading of the server.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReading {
    /// When it was taken.
    pub label: String,
    /// VmRSS in KiB.
    pub rss_kib: u64,
    /// Idle runners tracked by the server at that moment (if known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_runners: Option<u64>,
    /// Executions run by this load generator so far.
    pub executions_so_far: usize,
}

/// The idle-runner memory measurement.
#[derive(Debug, Clone, Serialize)]
pub struct IdleRunners {
    /// Pool size asked for.
    pub requested: u32,
    /// Idle runners reached.
    pub reached: u64,
    /// Seconds until the pool was full (or the limit).
    pub fill_seconds: f64,
    /// Server VmRSS before the environment, KiB.
    pub rss_before_kib: u64,
    /// Server VmRSS with the runners idle, KiB.
    pub rss_with_runners_kib: u64,
    /// Server VmRSS after deleting the environment, KiB.
    pub rss_after_delete_kib: u64,
    /// Drop of the machine's MemAvailable with the runners idle (kernel: mounts, cgroups), KiB.
    pub machine_mem_used_kib: i64,
    /// Seconds until deleting the environment finished.
    pub delete_seconds: f64,
}

/// The memory section.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MemoryReport {
    /// The server's process id.
    pub pid: u32,
    /// Readings in order.
    pub readings: Vec<MemoryReading>,
    /// Growth between the leak-check rounds, KiB (last minus first reading after warm-up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growth_after_warmup_kib: Option<i64>,
    /// The idle-runner measurement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_runners: Option<IdleRunners>,
    /// Remarks (e.g. why fewer runners were measured).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A scenario that was not run.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The scenario.
    pub scenario: String,
    /// Why.
    pub reason: String,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `poseidon-loadgen`.
    pub tool: String,
    /// The load generator's version.
    pub version: String,
    /// The command line.
    pub command: Vec<String>,
    /// Start, Unix seconds.
    pub started_unix: u64,
    /// Where the run was taken.
    pub machine: Machine,
    /// The server's `/version` answer.
    pub server_version: String,
    /// Measured levels.
    pub rows: Vec<Row>,
    /// Server-against-server comparisons.
    pub comparisons: Vec<Comparison>,
    /// Memory readings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
    /// Scenarios not run.
    pub skipped: Vec<Skipped>,
}

fn f(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl Report {
    /// The report as Markdown tables.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "machine: {} cores ({}), {} memory, kernel {}; server {}\n",
            m.cores,
            m.cpu,
            mib(m.mem_total_kib),
            m.kernel,
            self.server_version.trim()
        );
        if !self.rows.is_empty() {
            let _ = writeln!(
                out,
                "| scenario | variant | conc | ok | failed | pool empty | rate | p50 ms | p90 ms | p99 ms | max ms | ratio p50 / p99 |"
            );
            let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
        }
        for r in &self.rows {
            let ratio = r
                .ratio
                .as_ref()
                .map(|x| format!("{}× / {}× {}", f(x.p50), f(x.p99), x.against))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.variant,
                r.concurrency,
                r.ok,
                r.failed,
                r.pool_empty,
                f(r.rate),
                r.rate_unit,
                f(r.latency.p50_ms),
                f(r.latency.p90_ms),
                f(r.latency.p99_ms),
                f(r.latency.max_ms),
                ratio
            );
        }
        let mut phase_sets: Vec<Vec<&str>> = Vec::new();
        for r in self.rows.iter().filter(|r| !r.phases.is_empty()) {
            let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
            if !phase_sets.contains(&names) {
                phase_sets.push(names);
            }
        }
        for names in phase_sets {
            let _ = writeln!(
                out,
                "\nphases, p50 / p99 ms:\n\n| scenario | variant | conc | {} |",
                names.join(" | ")
            );
            let _ = writeln!(out, "|---|---|--:|{}", "--:|".repeat(names.len()));
            for r in self.rows.iter().filter(|r| {
                r.phases
                    .iter()
                    .map(|p| p.name.as_str())
                    .eq(names.iter().copied())
            }) {
                let cells: Vec<String> = r
                    .phases
                    .iter()
                    .map(|p| format!("{} / {}", f(p.latency.p50_ms), f(p.latency.p99_ms)))
                    .collect();
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    r.scenario,
                    r.variant,
                    r.concurrency,
                    cells.join(" | ")
                );
            }
        }
        for r in self.rows.iter().filter(|r| !r.errors.is_empty()) {
            let _ = writeln!(
                out,
                "\nfailures of {} {} at {}:",
                r.scenario, r.variant, r.concurrency
            );
            for e in &r.errors {
                let _ = writeln!(out, "  {} × {}", e.count, e.message);
            }
        }
        for r in self.rows.iter().filter(|r| !r.extra.is_null()) {
            let _ = writeln!(
                out,
                "\n{} {} at {}: {}",
                r.scenario, r.variant, r.concurrency, r.extra
            );
        }
        if !self.comparisons.is_empty() {
            let _ = writeln!(
                out,
                "\n| comparison | operation | conc | base p50 | with p50 | added p50 ms | base p99 | with p99 | added p99 ms | ratio p50 / p99 |"
            );
            let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|---|");
            for c in &self.comparisons {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2}× / {:.2}× |",
                    c.scenario,
                    c.operation,
                    c.concurrency,
                    f(c.base.p50_ms),
                    f(c.with.p50_ms),
                    f(c.added_p50_ms),
                    f(c.base.p99_ms),
                    f(c.with.p99_ms),
                    f(c.added_p99_ms),
                    c.ratio_p50,
                    c.ratio_p99
                );
            }
        }
        if let Some(mem) = &self.memory {
            let _ = writeln!(
                out,
                "\nserver memory (pid {}):\n\n| when | VmRSS | idle runners | executions so far |\n|---|--:|--:|--:|",
                mem.pid
            );
            for r in &mem.readings {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    r.label,
                    mib(r.rss_kib),
                    r.idle_runners.map(|n| n.to_string()).unwrap_or_default(),
                    r.executions_so_far
                );
            }
            if let Some(g) = mem.growth_after_warmup_kib {
                let _ = writeln!(out, "\ngrowth over the leak-check rounds: {g} KiB");
            }
            if let Some(i) = &mem.idle_runners {
                let _ = writeln!(
                    out,
                    "\nidle runners: {} of {} in {:.1} s; server VmRSS {} → {} (+{:.1} KiB per runner) → {} after deleting them ({:.1} s); machine memory used by them {}",
                    i.reached,
                    i.requested,
                    i.fill_seconds,
                    mib(i.rss_before_kib),
                    mib(i.rss_with_runners_kib),
                    (i.rss_with_runners_kib as f64 - i.rss_before_kib as f64) / i.reached.max(1) as f64,
                    mib(i.rss_after_delete_kib),
                    i.delete_seconds,
                    mib(i.machine_mem_used_kib.max(0) as u64)
                );
            }
            for n in &mem.notes {
                let _ = writeln!(out, "note: {n}");
            }
        }
        for s in &self.skipped {
            let _ = writeln!(out, "\n{}: skipped — {}", s.scenario, s.reason);
        }
        out
    }
}
