//! A small timing harness for `harness = false` benches, on `std::time` only.
//!
//! `cargo bench` passes `--bench`: each case is calibrated to batches of at least 5 ms and timed
//! over 20 batches; the median, fastest and slowest time per iteration are printed. Without
//! `--bench` (`cargo test --benches`) each case runs once, as a smoke test. A non-flag argument
//! filters cases by substring. Also used by `host/local/benches` (included by path).

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Batches timed per case.
const SAMPLES: usize = 20;
/// Shortest batch.
const MIN_BATCH: Duration = Duration::from_millis(5);

/// Runs and prints cases.
pub struct Bencher {
    full: bool,
    filter: Option<String>,
}

/// What one case measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Median time per iteration.
    pub median: Duration,
    /// Fastest batch, per iteration.
    pub min: Duration,
    /// Slowest batch, per iteration.
    pub max: Duration,
}

/// Formats a duration with a fitting unit.
pub fn human(d: Duration) -> String {
    let ns = d.as_secs_f64() * 1e9;
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

impl Bencher {
    /// Reads the mode and the filter from the command line.
    pub fn from_args() -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        Self {
            full: args.iter().any(|a| a == "--bench"),
            filter: args.into_iter().find(|a| !a.starts_with('-')),
        }
    }

    /// Whether the case is selected.
    pub fn wants(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| name.contains(f))
    }

    /// Times `f`; `bytes` (per iteration) adds a throughput.
    pub fn run<T>(
        &self,
        name: &str,
        bytes: Option<u64>,
        mut f: impl FnMut() -> T,
    ) -> Option<Measured> {
        if !self.wants(name) {
            return None;
        }
        if !self.full {
            std::hint::black_box(f());
            println!("{name}: ok (run once; `cargo bench` times it)");
            return None;
        }
        let mut iterations: u64 = 1;
        loop {
            let started = Instant::now();
            for _ in 0..iterations {
                std::hint::black_box(f());
            }
            if started.elapsed() >= MIN_BATCH || iterations >= 1 << 30 {
                break;
            }
            iterations *= 2;
        }
        let mut per_iteration: Vec<Duration> = (0..SAMPLES)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..iterations {
                    std::hint::black_box(f());
                }
                started.elapsed() / iterations as u32
            })
            .collect();
        per_iteration.sort_unstable();
        let measured = Measured {
            median: per_iteration[SAMPLES / 2],
            min: per_iteration[0],
            max: per_iteration[SAMPLES - 1],
        };
        let throughput = bytes
            .map(|b| {
                format!(
                    ", {:.1} MiB/s",
                    b as f64 / measured.median.as_secs_f64() / (1024.0 * 1024.0)
                )
            })
            .unwrap_or_default();
        println!(
            "{name}: median {} per iteration (min {}, max {}; {SAMPLES} × {iterations}){throughput}",
            human(measured.median),
            human(measured.min),
            human(measured.max),
        );
        Some(measured)
    }

    /// Says that a case is not measured, and why.
    pub fn skip(&self, name: &str, reason: &str) {
        if self.wants(name) {
            println!("{name}: skipped — {reason}");
        }
    }
}
