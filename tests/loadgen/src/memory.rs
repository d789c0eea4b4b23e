//! Resident memory of the server: idle, during and after executions, and with many idle runners.

use std::time::{Duration, Instant};

use crate::client::{Client, ClientError};
use crate::machine::{meminfo, rss_kib};
use crate::report::{IdleRunners, MemoryReading, MemoryReport};

/// Takes readings of one server process.
#[derive(Debug)]
pub struct Probe {
    /// What was read so far.
    pub report: MemoryReport,
}

impl Probe {
    /// A probe of the process `pid` (`None` if it cannot be read).
    pub fn new(pid: u32) -> Option<Self> {
        rss_kib(pid)?;
        Some(Self {
            report: MemoryReport {
                pid,
                ..MemoryReport::default()
            },
        })
    }

    /// Current VmRSS, KiB (0 if the process is gone).
    pub fn rss(&self) -> u64 {
        rss_kib(self.report.pid).unwrap_or(0)
    }

    /// Records a reading.
    pub fn read(&mut self, label: &str, idle_runners: Option<u64>, executions: usize) -> u64 {
        let rss_kib = self.rss();
        self.report.readings.push(MemoryReading {
            label: label.to_string(),
            rss_kib,
            idle_runners,
            executions_so_far: executions,
        });
        rss_kib
    }

    /// Creates an environment with `requested` prewarmed runners, reads the memory with them idle,
    /// deletes the environment and reads again.
    pub async fn idle_runners(
        &mut self,
        client: &Client,
        environment: u64,
        requested: u32,
        image: &str,
        fill_limit: Duration,
        executions: usize,
    ) -> Result<(), ClientError> {
        let rss_before_kib = self.rss();
        let available_before = meminfo("MemAvailable").unwrap_or(0) as i64;
        let started = Instant::now();
        client
            .put_environment(environment, requested, image)
            .await?;
        let reached = match client.wait_idle(environment, requested, fill_limit).await {
            Ok(()) => u64::from(requested),
            Err(ClientError::Timeout(_)) => {
                let reached = client.idle_runners(environment).await?;
                self.report.notes.push(format!(
                    "the pool of {requested} reached only {reached} idle runners within {} s",
                    fill_limit.as_secs()
                ));
                reached
            }
            Err(e) => return Err(e),
        };
        let fill_seconds = started.elapsed().as_secs_f64();
        // Let the reconciler and the allocator settle before reading.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_with_runners_kib = self.read(
            &format!("{reached} idle runners"),
            Some(reached),
            executions,
        );
        let available_with = meminfo("MemAvailable").unwrap_or(0) as i64;
        let deleting = Instant::now();
        client.delete_environment(environment).await?;
        let delete_seconds = deleting.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_after_delete_kib =
            self.read("after deleting the idle runners", Some(0), executions);
        self.report.idle_runners = Some(IdleRunners {
            requested,
            reached,
            fill_seconds,
            rss_before_kib,
            rss_with_runners_kib,
            rss_after_delete_kib,
            machine_mem_used_kib: available_before - available_with,
            delete_seconds,
        });
        Ok(())
    }
}
