//! Emulator configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the event stream body is framed on the wire (nomad-api.md §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFraming {
    /// Nomad 1.10.x: a normal chunked HTTP/1.1 streaming response (the version Poseidon pins).
    Chunked,
    /// Nomad 2.0.x: raw body, `Connection: close`, no chunked encoding, ends at EOF.
    /// Only possible on a fresh connection whose first request is the event stream; on a
    /// reused keep-alive connection the emulator falls back to chunked framing.
    Raw,
}

/// Settings of one emulator instance. `Default` gives Nomad's timings except where noted.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Address to bind; use port 0 for an ephemeral port. Must be a loopback address in tests.
    pub bind: SocketAddr,
    /// Directory under which allocation directories are created. `None`: a fresh temporary
    /// directory that is removed on shutdown.
    pub data_dir: Option<PathBuf>,
    /// Interval of `{}` heartbeat lines on the event stream (Nomad: 10 s in 1.x docs, 30 s in code).
    pub stream_heartbeat: Duration,
    /// Number of commits kept for replay on the event stream (Nomad default 100).
    pub event_buffer_size: usize,
    /// Delay between an evaluation being created and the scheduler processing it.
    pub scheduler_delay: Duration,
    /// Delay between a placement and the client picking the allocation up.
    pub client_delay: Duration,
    /// Caps restart and reschedule delays (Poseidon's template says 15 s / 1 min). `None` is
    /// faithful; tests usually set a small cap. Nomad's random jitter is never applied.
    pub max_policy_delay: Option<Duration>,
    /// Number of client nodes (the dev agent has one; node-loss tests need two).
    pub nodes: usize,
    /// Initial `MemoryOversubscriptionEnabled` of the scheduler configuration.
    pub memory_oversubscription: bool,
    /// Event stream framing.
    pub stream_framing: StreamFraming,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: None,
            stream_heartbeat: Duration::from_secs(10),
            event_buffer_size: 100,
            scheduler_delay: Duration::from_millis(20),
            client_delay: Duration::from_millis(50),
            max_policy_delay: None,
            nodes: 1,
            memory_oversubscription: false,
            stream_framing: StreamFraming::Chunked,
        }
    }
}

impl EmulatorConfig {
    /// A configuration suited for fast tests: short heartbeats, capped policy delays,
    /// two nodes and memory oversubscription enabled (as in Poseidon's CI).
    pub fn for_tests() -> Self {
        EmulatorConfig {
            stream_heartbeat: Duration::from_millis(500),
            scheduler_delay: Duration::from_millis(5),
            client_delay: Duration::from_millis(10),
            max_policy_delay: Some(Duration::from_millis(200)),
            nodes: 2,
            memory_oversubscription: true,
            ..EmulatorConfig::default()
        }
    }

    /// Applies [`EmulatorConfig::max_policy_delay`] to a policy delay in nanoseconds.
    pub fn policy_delay(&self, ns: i64) -> Duration {
        let d = Duration::from_nanos(ns.max(0) as u64);
        match self.max_policy_delay {
            Some(cap) if cap < d => cap,
            _ => d,
        }
    }
}
