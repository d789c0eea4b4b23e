//! The protocol between the gateway and the runner agent.
//!
//! One byte stream (a Unix socket, a pipe, an exec session) carries frames in both directions:
//!
//! ```text
//! ┌──────────────┬──────────┬────────────────┬───────────────────────┐
//! │ length: u32  │ kind: u8 │ stream: u32    │ payload (length − 5)  │
//! │ little endian│          │ little endian  │                       │
//! └──────────────┴──────────┴────────────────┴───────────────────────┘
//! ```
//!
//! `kind` says what the payload is: a JSON control message ([`Request`] towards the agent,
//! [`Reply`] from it) or raw bytes (standard input, output, file data). `stream` ties frames to one
//! operation, so several executions and file operations share one connection. The gateway picks
//! stream ids; stream 0 is the connection itself (hello, ping).
//!
//! Both sides start with [`Request::Hello`] / [`Reply::Hello`] and refuse a peer of another
//! [`PROTOCOL_VERSION`]. A frame longer than [`MAX_FRAME`] or of an unknown kind is a protocol
//! error: the decoder reports it and the connection is dropped, never trusted further.
#![forbid(unsafe_code)]

mod codec;
mod messages;

pub use codec::{
    encode, encode_batch, Decoder, Frame, FrameKind, ProtocolError, BATCH_BYTES, HEADER_LEN,
    MAX_FRAME,
};
pub use messages::{
    Entry, Identity, Reply, Request, Resume, FEATURE_INPUT_TAKEN, FEATURE_TIME_LIMIT,
    PROTOCOL_VERSION,
};

/// The flag after `poseidon-agent --listen SOCKET`, followed by what [`PROBE_BASH_ARG`] printed,
/// that lets the agent start a `bash -c` of one plain command without bash, as bash itself would
/// exec it. Only for a runner whose bash is the one the probe ran.
pub const DIRECT_SIMPLE_COMMANDS_ARG: &str = "--direct-simple-commands";

/// `poseidon-agent --probe-bash` has `/bin/bash` exec the agent and checks that it exported
/// exactly what the agent adds when it starts a plain command itself; prints the `SHLVL` bash left
/// (exit 0), or exits 1 when bash did something else.
pub const PROBE_BASH_ARG: &str = "--probe-bash";

/// `poseidon-agent --exec-in-cgroups PROCS... -- PROGRAM ARGS...` (run as host root, by the
/// local backend) moves itself into the cgroups whose `cgroup.procs` files are given, then
/// becomes PROGRAM: a sandbox started so is born in its runner's cgroups, and the cgroup
/// namespace it creates is rooted there (as a container's is).
pub const EXEC_IN_CGROUPS_ARG: &str = "--exec-in-cgroups";

/// The line `poseidon-agent --connect SOCKET` prints once it reached the agent (an exec session
/// into a container carries the protocol after it; before it, the session's output is an error).
pub const BRIDGE_BANNER: &str = "poseidon-agent connected";
