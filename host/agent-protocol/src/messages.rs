//! The control messages: what the gateway asks ([`Request`]) and what the agent answers ([`Reply`]).

use serde::{Deserialize, Serialize};

/// The protocol version both sides must share.
pub const PROTOCOL_VERSION: u32 = 2;

/// An agent feature: it reports the input each program took ([`Reply::InputTaken`]), so the
/// gateway can hold back what the program has not read yet.
pub const FEATURE_INPUT_TAKEN: &str = "input-taken";

/// An agent feature: it ends an execution at its `time_limit_ms` by itself, so that a time limit
/// holds while no gateway follows the execution (a restart of the server).
pub const FEATURE_TIME_LIMIT: &str = "time-limit";

/// Who a process or file operation runs as inside the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Identity {
    /// The runner's root (`privilegedExecution: true`).
    Root,
    /// The unprivileged `user` (uid 1000).
    User,
}

/// A message towards the agent; the frame's stream id names the operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Request {
    /// Opens the conversation (stream 0).
    Hello {
        /// The gateway's [`PROTOCOL_VERSION`].
        version: u32,
        /// Executions of an earlier connection the gateway still follows: the agent first sends
        /// again what of their output came after `from` (and their end, if they ended), then
        /// carries on. An execution it no longer knows is answered with [`Reply::Failed`].
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        resume: Vec<Resume>,
    },
    /// Starts a process; output follows as stdout/stderr frames, then [`Reply::Exited`].
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// The complete environment of the process.
        env: Vec<(String, String)>,
        /// Working directory.
        cwd: String,
        /// Who it runs as.
        identity: Identity,
        /// Standard input and output on a terminal (standard error stays a pipe).
        tty: bool,
        /// `env` is added to the agent's own environment instead of replacing it (a container's
        /// agent inherits the image's environment, as `docker exec` gives it); for `user`, `HOME`,
        /// `USER` and `LOGNAME` then follow the runner's account of `user`.
        #[serde(default)]
        inherit_env: bool,
        /// With `tty`, standard error goes to the terminal too (one stream, in the order written).
        #[serde(default)]
        stderr_on_terminal: bool,
        /// The agent kills the execution's processes this long after their start, whatever the
        /// gateway does meanwhile (only to an agent with [`FEATURE_TIME_LIMIT`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        time_limit_ms: Option<u64>,
    },
    /// Sends a signal to every process the execution started (its whole session).
    Signal {
        /// The signal number (9 = kill).
        signal: i32,
    },
    /// Deletes paths, then extracts the tar archive that follows as data frames, as root.
    UpdateFiles {
        /// Paths to delete recursively; `./*` empties the working directory.
        delete: Vec<String>,
        /// Directory relative paths are resolved against.
        cwd: String,
        /// Whether a tar archive follows (data frames, then data-end).
        archive: bool,
    },
    /// Lists a path.
    List {
        /// The path (relative to `cwd` or absolute).
        path: String,
        /// Descend into directories.
        recursive: bool,
        /// Directory relative paths are resolved against.
        cwd: String,
        /// Whose permissions apply.
        identity: Identity,
    },
    /// Streams a regular file: [`Reply::FileSize`], data frames, data-end.
    Read {
        /// The path (relative to `cwd` or absolute).
        path: String,
        /// Directory relative paths are resolved against.
        cwd: String,
        /// Whose permissions apply.
        identity: Identity,
    },
    /// Asks for [`Reply::Pong`] (health).
    Ping,
}

/// An execution to pick up again after a broken connection ([`Request::Hello`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// The execution's stream.
    pub stream: u32,
    /// Bytes of its output (stdout and stderr frames' payloads, in order) the gateway has.
    pub from: u64,
    /// Whether the gateway saw it start: one it did not see may never have reached the agent
    /// (then the agent says nothing and the gateway sends the request again).
    pub started: bool,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Name (bare when listing one directory level, prefixed by the listed path when recursive).
    pub name: String,
    /// `ls`-style type character.
    pub entry_type: char,
    /// Target of a symbolic link.
    pub link_target: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, Unix seconds.
    pub modification_time: i64,
    /// The nine `rwx` characters (with `s`/`t` where set).
    pub permissions: String,
    /// Owner name (or number).
    pub owner: String,
    /// Group name (or number).
    pub group: String,
}

/// A message from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Reply {
    /// Answers [`Request::Hello`].
    Hello {
        /// The agent's [`PROTOCOL_VERSION`].
        version: u32,
        /// The agent's process id inside the runner.
        pid: u32,
        /// What the agent does beyond its protocol version's minimum ([`FEATURE_INPUT_TAKEN`],
        /// [`FEATURE_TIME_LIMIT`]); an older agent names none.
        #[serde(default)]
        features: Vec<String>,
    },
    /// The process of an [`Request::Exec`] runs.
    Started {
        /// Its process id inside the runner.
        pid: u32,
    },
    /// The process ended (after all its output): the exit code, or 128 + the signal.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// A file operation succeeded.
    Done,
    /// Part of a long listing of a [`Request::List`]; more parts follow, the last as
    /// [`Reply::Listing`].
    ListingPart {
        /// The entries of this part.
        entries: Vec<Entry>,
    },
    /// The listing of a [`Request::List`] (its last part).
    Listing {
        /// The entries.
        entries: Vec<Entry>,
    },
    /// The size of the file of a [`Request::Read`]; exactly that many bytes follow.
    FileSize {
        /// Bytes.
        size: u64,
    },
    /// The path does not exist or may not be read by the identity.
    NotFound,
    /// The operation failed; the text says why.
    Failed {
        /// Why.
        message: String,
        /// What a failed file update wrote as its error output.
        #[serde(default)]
        stderr: String,
    },
    /// Answers [`Request::Ping`].
    Pong,
    /// An execution's program was given input: `total` bytes of its stream's input so far.
    InputTaken {
        /// Bytes written to the program since its start.
        total: u64,
    },
}
