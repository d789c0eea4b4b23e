//! The closed-loop driver: `concurrency` workers each run one operation after the other until the
//! count is reached or the time is up, and every operation is bounded in time.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How much load to apply.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Operations in flight at once.
    pub concurrency: usize,
    /// Operations in total (at most).
    pub count: usize,
    /// No operation starts after this much time.
    pub duration: Duration,
    /// One operation taking longer than this counts as failed.
    pub op_timeout: Duration,
}

/// What one successful operation took.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The operation as a whole.
    pub total: Duration,
    /// Its phases, in the order the scenario names them.
    pub phases: Vec<Duration>,
}

impl Sample {
    /// A sample without phases.
    pub fn total(total: Duration) -> Self {
        Self {
            total,
            phases: Vec::new(),
        }
    }
}

/// One operation's record.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it started, from the start of the run.
    pub start: Duration,
    /// What it took, or why it failed.
    pub result: Result<Sample, String>,
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Every operation, in no particular order.
    pub records: Vec<Record>,
    /// From the first start to the last end.
    pub elapsed: Duration,
}

impl Outcome {
    /// Successful samples.
    pub fn samples(&self) -> Vec<&Sample> {
        self.records
            .iter()
            .filter_map(|r| r.result.as_ref().ok())
            .collect()
    }

    /// Number of successful operations.
    pub fn ok(&self) -> usize {
        self.records.iter().filter(|r| r.result.is_ok()).count()
    }

    /// Number of failed operations.
    pub fn failed(&self) -> usize {
        self.records.len() - self.ok()
    }

    /// Failure messages with their counts (at most 10 distinct ones).
    pub fn errors(&self) -> Vec<ErrorCount> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let normalised: Vec<String> = self
            .records
            .iter()
            .filter_map(|r| r.result.as_ref().err().map(|e| normalise(e)))
            .collect();
        for e in &normalised {
            *counts.entry(e.as_str()).or_default() += 1;
        }
        let mut errors: Vec<ErrorCount> = counts
            .into_iter()
            .map(|(message, count)| ErrorCount {
                message: message.to_string(),
                count,
            })
            .collect();
        errors.sort_by_key(|e| std::cmp::Reverse(e.count));
        errors.truncate(10);
        errors
    }

    /// Successful operations per second over the run.
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok() as f64 / secs
        } else {
            0.0
        }
    }

    /// Latency of the whole operations.
    pub fn latency(&self) -> Latency {
        Latency::of(self.samples().iter().map(|s| s.total).collect())
    }

    /// Latency of phase `index`.
    pub fn phase(&self, index: usize) -> Latency {
        Latency::of(
            self.samples()
                .iter()
                .filter_map(|s| s.phases.get(index).copied())
                .collect(),
        )
    }
}

/// Replaces ids (runs of 20 or more hex digits and dashes) by `…`, so that the same failure of
/// different runners counts as one message.
fn normalise(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 20 {
            out.push('…');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for ch in message.chars() {
        if ch.is_ascii_hexdigit() || ch == '-' {
            run.push(ch);
        } else {
            flush(&mut run, &mut out);
            out.push(ch);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// A failure message and how often it happened.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorCount {
    /// The message.
    pub message: String,
    /// How often.
    pub count: usize,
}

/// Latency percentiles in milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// How many samples.
    pub samples: usize,
    /// Arithmetic mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

impl Latency {
    /// Percentiles of the samples (all zero without samples).
    pub fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let rank = |p: f64| {
            let index = ((p / 100.0) * n as f64).ceil() as usize;
            ms(samples[index.clamp(1, n) - 1])
        };
        Self {
            samples: n,
            mean_ms: samples.iter().map(|d| ms(*d)).sum::<f64>() / n as f64,
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
            max_ms: ms(samples[n - 1]),
        }
    }

    /// The mean of two runs' figures, field by field (samples: both runs'), for a comparison
    /// measured twice in opposite orders.
    pub fn mean_of(a: &Latency, b: &Latency) -> Self {
        let mean = |x: f64, y: f64| (x + y) / 2.0;
        Self {
            samples: a.samples + b.samples,
            mean_ms: mean(a.mean_ms, b.mean_ms),
            p50_ms: mean(a.p50_ms, b.p50_ms),
            p90_ms: mean(a.p90_ms, b.p90_ms),
            p99_ms: mean(a.p99_ms, b.p99_ms),
            max_ms: a.max_ms.max(b.max_ms),
        }
    }
}

/// Runs `op` under `load` and records every operation.
pub async fn drive<F, Fut, E>(load: Load, op: F) -> Outcome
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Sample, E>> + Send + 'static,
    E: std::fmt::Display,
{
    let op = Arc::new(op);
    let tickets = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut workers = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency.max(1) {
        let op = Arc::clone(&op);
        let tickets = Arc::clone(&tickets);
        workers.push(tokio::spawn(async move {
            let mut records = Vec::new();
            while tickets.fetch_add(1, Ordering::SeqCst) < load.count && Instant::now() < deadline {
                let began = Instant::now();
                let result = bounded(load.op_timeout, op()).await;
                records.push(Record {
                    start: began - start,
                    result,
                });
            }
            records
        }));
    }
    let mut outcome = Outcome::default();
    for worker in workers {
        match worker.await {
            Ok(records) => outcome.records.extend(records),
            Err(e) => outcome.records.push(Record {
                start: Duration::ZERO,
                result: Err(format!("worker failed: {e}")),
            }),
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// `op`'s sample, or why it failed (its error, or taking longer than `op_timeout`).
async fn bounded<Fut, E>(op_timeout: Duration, op: Fut) -> Result<Sample, String>
where
    Fut: Future<Output = Result<Sample, E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(op_timeout, op).await {
        Ok(Ok(sample)) => Ok(sample),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "operation took longer than {} s",
            op_timeout.as_secs()
        )),
    }
}

/// Runs `op(0)` and `op(1)` in turn, one at a time, `load.count` times each, the order
/// alternating (A B, B A, …) so that neither side always follows the other; every operation
/// is bounded by `load.op_timeout` and none starts after `load.duration` (`load.concurrency`
/// is not used). Each outcome's `elapsed` is the time of its own operations, so its rate is
/// per second of that side's own time.
pub async fn interleave<F, Fut, E>(load: Load, mut op: F) -> [Outcome; 2]
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<Sample, E>>,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let mut outcomes = [Outcome::default(), Outcome::default()];
    for i in 0..load.count {
        if start.elapsed() >= load.duration {
            break;
        }
        for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let began = Instant::now();
            let result = bounded(load.op_timeout, op(side)).await;
            outcomes[side].elapsed += began.elapsed();
            outcomes[side].records.push(Record {
                start: began - start,
                result,
            });
        }
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(samples);
        assert_eq!(l.samples, 100);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p90_ms, 90.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        assert!((l.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(Latency::of(Vec::new()).samples, 0);
        let one = Latency::of(vec![Duration::from_millis(7)]);
        assert_eq!((one.p50_ms, one.p99_ms, one.max_ms), (7.0, 7.0, 7.0));
    }

    #[tokio::test]
    async fn drive_stops_at_the_count_and_records_failures() {
        let counter = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&counter);
        let load = Load {
            concurrency: 3,
            count: 10,
            duration: Duration::from_secs(30),
            op_timeout: Duration::from_secs(5),
        };
        let outcome = drive(load, move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err("boom")
                } else {
                    Ok(Sample::total(Duration::from_millis(1)))
                }
            }
        })
        .await;
        assert_eq!(outcome.records.len(), 10);
        assert_eq!(outcome.failed(), 2);
        assert_eq!(outcome.errors()[0].count, 2);
    }

    #[tokio::test]
    async fn interleave_alternates_the_order_and_counts_each_side_its_own_time() {
        let load = Load {
            concurrency: 1,
            count: 3,
            duration: Duration::from_secs(30),
            op_timeout: Duration::from_secs(5),
        };
        let mut order = Vec::new();
        let began = Instant::now();
        let outcomes = interleave(load, |side| {
            order.push(side);
            async move {
                if side == 1 {
                    Err("refused")
                } else {
                    Ok(Sample::total(Duration::from_millis(1)))
                }
            }
        })
        .await;
        assert_eq!(order, [0, 1, 1, 0, 0, 1]);
        assert_eq!((outcomes[0].ok(), outcomes[0].failed()), (3, 0));
        assert_eq!((outcomes[1].ok(), outcomes[1].failed()), (0, 3));
        // Each side's own time, not the whole run's.
        assert!(outcomes[0].elapsed + outcomes[1].elapsed <= began.elapsed());
    }

    #[test]
    fn normalises_runner_ids() {
        assert_eq!(
            normalise("runner 9102-053e1570-6151-47cf-aedf-ae1113d495fd/etc: denied"),
            "runner …/etc: denied"
        );
        assert_eq!(normalise("status 500"), "status 500");
    }
}
