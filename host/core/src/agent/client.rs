//! The gateway's side of the agent protocol: one connection, many operations multiplexed by stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use poseidon_agent_protocol::{
    encode, encode_batch, Decoder, Frame, FrameKind, Identity, ProtocolError, Reply, Request,
    Resume, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::{ExecProcess, FileDownload, ProcessEvent};
use crate::files::FileEntry;

/// How long the agent may take to answer the greeting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries one listing may have (a learner's runaway loop must not exhaust the gateway's memory).
const MAX_LISTING: usize = 1_000_000;
/// Frames buffered per operation before the connection's reader waits for its consumer.
const STREAM_BUFFER: usize = 64;
/// How much later than the gateway the agent ends an execution at its time limit.
const AGENT_TIME_LIMIT_GRACE: Duration = Duration::from_secs(2);
/// Input bytes sent to an execution and not yet taken by its program, at most (with an agent
/// that reports what it took): beyond it the gateway stops reading the client's input, so the
/// client waits as it would for a program that reads slowly, and nothing is lost.
const INPUT_WINDOW: u64 = 256 * 1024;

/// What an execution runs, and how.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment variables: the whole environment, or with `inherit_env` additions to the
    /// agent's own.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// Who it runs as.
    pub identity: Identity,
    /// Standard input and output on a terminal.
    pub tty: bool,
    /// `env` is added to the agent's own environment.
    pub inherit_env: bool,
    /// With `tty`, standard error goes to the terminal too (one stream for both).
    pub merge_stderr: bool,
    /// The agent ends the execution this long after its start by itself (if it can).
    pub time_limit: Option<Duration>,
}

/// Why talking to an agent failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The channel to the agent could not be opened or broke.
    #[error("the runner's agent is unreachable: {0}")]
    Unreachable(String),
    /// The agent broke the protocol (it is not trusted any further).
    #[error("the runner's agent broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The path does not exist or may not be accessed.
    #[error("file not found or insufficient permissions")]
    NotFound,
    /// The agent reports that the operation failed.
    #[error("{message}")]
    Failed {
        /// Why.
        message: String,
        /// Error output of a failed file update.
        stderr: String,
    },
    /// The agent did not answer in time.
    #[error("the runner's agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// Opens a new byte channel to the same agent, for reconnecting after a broken one.
pub type Connector = Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<crate::agent::SandboxChannel, String>>
        + Send
        + Sync,
>;

/// Where the frames of one operation go.
struct Route {
    tx: mpsc::Sender<Frame>,
    /// For executions: what a reconnection needs to pick them up again.
    resume: Option<Arc<ResumePoint>>,
}

/// How far an execution's output arrived, and whether the agent started it.
#[derive(Default)]
struct ResumePoint {
    received: AtomicU64,
    started: AtomicBool,
    /// The request, until the agent reports the start (sent again on a new channel: the
    /// broken one may have lost it).
    request: Mutex<Option<Frame>>,
}

type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// How a broken connection is replaced.
#[derive(Clone)]
struct Reconnect {
    connector: Connector,
    /// How long the agent may stay unreachable before running executions fail.
    window: Duration,
}

type BoxReader = std::pin::Pin<Box<dyn AsyncRead + Send>>;
type BoxWriter = std::pin::Pin<Box<dyn AsyncWrite + Send>>;

/// A connection to one agent. Cheap to clone; dropping the last clone closes it.
///
/// With a [`Connector`], a broken connection is replaced: the executions the agent had started
/// carry on, with the output the broken connection lost sent again by the agent; other
/// operations in flight fail.
#[derive(Clone)]
pub struct AgentClient {
    outbox: mpsc::Sender<Frame>,
    /// The agent reports the input its programs took ([`Reply::InputTaken`]).
    input_taken: bool,
    /// The agent holds an execution's time limit by itself.
    time_limit: bool,
    routes: Routes,
    next_stream: Arc<AtomicU32>,
    closed: CancellationToken,
    _close_on_drop: Arc<tokio_util::sync::DropGuard>,
}

impl AgentClient {
    /// Greets the agent over a byte channel and starts serving the connection.
    pub async fn connect(
        reader: impl AsyncRead + Send + 'static,
        writer: impl AsyncWrite + Send + 'static,
    ) -> Result<Self, AgentError> {
        Self::start(Box::pin(reader), Box::pin(writer), None).await
    }

    /// Connects through `connector`, and reconnects through it when the connection breaks,
    /// trying for up to `window` before giving up on the running executions.
    pub async fn reconnecting(connector: Connector, window: Duration) -> Result<Self, AgentError> {
        let (reader, writer) = connector().await.map_err(AgentError::Unreachable)?;
        Self::start(reader, writer, Some(Reconnect { connector, window })).await
    }

    async fn start(
        reader: BoxReader,
        writer: BoxWriter,
        reconnect: Option<Reconnect>,
    ) -> Result<Self, AgentError> {
        let (reader, decoder, writer, features) = greet(reader, writer, Vec::new()).await?;
        let has = |feature: &str| features.iter().any(|f| f == feature);
        let (input_taken, time_limit) = (
            has(poseidon_agent_protocol::FEATURE_INPUT_TAKEN),
            has(poseidon_agent_protocol::FEATURE_TIME_LIMIT),
        );
        let (outbox, outgoing) = mpsc::channel::<Frame>(256);
        let (writers_tx, writers_rx) = mpsc::channel::<WriterSwitch>(1);
        let closed = CancellationToken::new();
        let routes: Routes = Arc::default();
        let _ = writers_tx
            .send((Some(writer), tokio::sync::oneshot::channel().0))
            .await;
        tokio::spawn(write_frames(outgoing, writers_rx, closed.clone()));
        tokio::spawn(follow(
            reader,
            decoder,
            writers_tx,
            Arc::clone(&routes),
            reconnect,
            closed.clone(),
        ));
        Ok(Self {
            outbox,
            input_taken,
            time_limit,
            routes,
            // Streams of an earlier connection may still run in the agent: start elsewhere.
            next_stream: Arc::new(AtomicU32::new(
                (uuid::Uuid::new_v4().as_u128() as u32 & 0x3fff_ffff) | 1,
            )),
            closed: closed.clone(),
            _close_on_drop: Arc::new(closed.drop_guard()),
        })
    }

    /// Whether the connection is gone for good (then every later call fails).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    async fn send(&self, frame: Frame) -> Result<(), AgentError> {
        if self.closed.is_cancelled() {
            return Err(AgentError::Unreachable("the connection is closed".into()));
        }
        self.outbox
            .send(frame)
            .await
            .map_err(|_| AgentError::Unreachable("the connection is closed".into()))
    }

    /// Opens an operation: a fresh stream id and the receiver of its frames.
    fn open(&self) -> (u32, mpsc::Receiver<Frame>) {
        let (stream, rx, _) = self.open_route(false);
        (stream, rx)
    }

    fn open_route(&self, resumable: bool) -> (u32, mpsc::Receiver<Frame>, Arc<ResumePoint>) {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let point = Arc::new(ResumePoint::default());
        let mut routes = self.routes.lock().unwrap();
        let mut stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        while stream == 0 || routes.contains_key(&stream) {
            stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        }
        let resume = resumable.then(|| Arc::clone(&point));
        routes.insert(stream, Route { tx, resume });
        (stream, rx, point)
    }

    fn close_stream(&self, stream: u32) {
        self.routes.lock().unwrap().remove(&stream);
    }

    async fn request(&self, stream: u32, request: &Request) -> Result<(), AgentError> {
        self.send(Frame::control(stream, request)).await
    }

    /// Sends `request` (then `archive`, if any, as data frames) on a new stream and waits up to
    /// `limit` for the answer; `NotFound` and `Failed` answers become errors. The stream is closed
    /// afterwards unless `keep_open` (a download, whose data follows) and the call succeeded.
    async fn call(
        &self,
        request: &Request,
        archive: Option<Bytes>,
        limit: Duration,
        keep_open: bool,
    ) -> Result<(Reply, u32, mpsc::Receiver<Frame>), AgentError> {
        let (stream, mut rx) = self.open();
        let result = async {
            self.request(stream, request).await?;
            if let Some(mut rest) = archive {
                while !rest.is_empty() {
                    let chunk = rest.split_to(rest.len().min(256 * 1024));
                    self.send(Frame::data(FrameKind::Data, stream, chunk))
                        .await?;
                }
                self.send(Frame::data(FrameKind::DataEnd, stream, Bytes::new()))
                    .await?;
            }
            let frame = tokio::time::timeout(limit, rx.recv())
                .await
                .map_err(|_| AgentError::Timeout(limit))?
                .ok_or_else(gone)?;
            match frame.parse::<Reply>()? {
                Reply::NotFound => Err(AgentError::NotFound),
                Reply::Failed { message, stderr } => Err(AgentError::Failed { message, stderr }),
                reply => Ok(reply),
            }
        }
        .await;
        if result.is_err() || !keep_open {
            self.close_stream(stream);
        }
        result.map(|reply| (reply, stream, rx))
    }

    /// Starts a process. With `tty`, standard error's line ends become `\r\n`, as a terminal would
    /// show them.
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecProcess, AgentError> {
        let (stream, rx, point) = self.open_route(true);
        let tty = spec.tty;
        let merge_stderr = spec.merge_stderr;
        let request = Request::Exec {
            argv: spec.argv,
            env: spec.env,
            cwd: spec.cwd,
            identity: spec.identity,
            tty,
            inherit_env: spec.inherit_env,
            stderr_on_terminal: merge_stderr,
            // Later than the gateway's own (which counts from the client's connection): the
            // agent's only ends what no gateway ended.
            time_limit_ms: spec
                .time_limit
                .filter(|_| self.time_limit)
                .map(|limit| (limit + AGENT_TIME_LIMIT_GRACE).as_millis() as u64),
        };
        let frame = Frame::control(stream, &request);
        *point.request.lock().unwrap() = Some(frame.clone());
        if let Err(e) = self.send(frame).await {
            self.close_stream(stream);
            return Err(e);
        }
        let (events_tx, events_rx) = mpsc::channel(32);
        let (stdin_tx, mut stdin_rx) = mpsc::channel::<Bytes>(32);
        let kill = CancellationToken::new();
        let client = self.clone();
        let kill_watch = kill.clone();
        tokio::spawn(async move {
            let relay = Relay {
                client: &client,
                stream,
                tty,
                point: &point,
                events: &events_tx,
                kill: &kill_watch,
            };
            let (final_event, ended) = relay.run(rx, &mut stdin_rx).await;
            if !ended {
                // Killed, its consumer gone, or the agent's answer unusable: the program may
                // still run (and print), so it is ended here whatever stopped the relay.
                let _ = client.request(stream, &Request::Signal { signal: 9 }).await;
            }
            client.close_stream(stream);
            let _ = events_tx.send(final_event).await;
        });
        Ok(ExecProcess {
            stdin: stdin_tx,
            events: events_rx,
            kill,
        })
    }

    /// Deletes paths, then extracts a tar archive (if not empty), as root.
    pub async fn update_files(
        &self,
        delete: Vec<String>,
        cwd: String,
        archive: Bytes,
        limit: Duration,
    ) -> Result<(), AgentError> {
        let has_archive = !archive.is_empty();
        let request = Request::UpdateFiles {
            delete,
            cwd,
            archive: has_archive,
        };
        let archive = has_archive.then_some(archive);
        match self.call(&request, archive, limit, false).await?.0 {
            Reply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Lists a path.
    pub async fn list(
        &self,
        path: String,
        recursive: bool,
        cwd: String,
        identity: Identity,
        limit: Duration,
    ) -> Result<Vec<FileEntry>, AgentError> {
        let request = Request::List {
            path,
            recursive,
            cwd,
            identity,
        };
        let deadline = tokio::time::Instant::now() + limit;
        let (mut reply, stream, mut rx) = self.call(&request, None, limit, true).await?;
        let mut all = Vec::new();
        let result = loop {
            match reply {
                Reply::Listing { entries } => {
                    all.extend(entries);
                    break Ok(all);
                }
                Reply::ListingPart { entries } if all.len() + entries.len() <= MAX_LISTING => {
                    all.extend(entries);
                }
                Reply::ListingPart { .. } => {
                    break Err(AgentError::Failed {
                        message: format!("the listing has more than {MAX_LISTING} entries"),
                        stderr: String::new(),
                    })
                }
                other => break Err(unexpected(&other)),
            }
            let next = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(frame)) => frame.parse::<Reply>().map_err(AgentError::from),
                Ok(None) => Err(gone()),
                Err(_) => Err(AgentError::Timeout(limit)),
            };
            match next {
                Ok(r) => reply = r,
                Err(e) => break Err(e),
            }
        };
        self.close_stream(stream);
        result
    }

    /// Streams a regular file: its exact size, then its content.
    pub async fn read(
        &self,
        path: String,
        cwd: String,
        identity: Identity,
        limit: Duration,
    ) -> Result<FileDownload, AgentError> {
        let request = Request::Read {
            path,
            cwd,
            identity,
        };
        let (size, stream, rx) = match self.call(&request, None, limit, true).await? {
            (Reply::FileSize { size }, stream, rx) => (size, stream, rx),
            (other, stream, _) => {
                self.close_stream(stream);
                return Err(unexpected(&other));
            }
        };
        let client = self.clone();
        let body = futures::stream::unfold(
            (rx, size, Some(client), stream),
            |(mut rx, left, client, stream)| async move {
                let client = client?;
                let frame = rx.recv().await;
                let item = match frame {
                    Some(f) if f.kind == FrameKind::Data && f.payload.len() as u64 <= left => {
                        let left = left - f.payload.len() as u64;
                        return Some((Ok(f.payload), (rx, left, Some(client), stream)));
                    }
                    Some(f) if f.kind == FrameKind::DataEnd && left == 0 => {
                        client.close_stream(stream);
                        return None;
                    }
                    Some(_) => Some(std::io::Error::other(
                        "the download does not match its size",
                    )),
                    None => Some(std::io::Error::other("the runner's agent is gone")),
                };
                client.close_stream(stream);
                item.map(|e| (Err(e), (rx, 0, None, stream)))
            },
        );
        Ok(FileDownload {
            size,
            body: body.boxed(),
        })
    }
}

fn gone() -> AgentError {
    AgentError::Unreachable("the connection closed".into())
}

fn unexpected(reply: &Reply) -> AgentError {
    AgentError::Protocol(ProtocolError::Unexpected(format!("{reply:?}")))
}

/// Says hello on a fresh channel (asking the agent to resume `resume`) and checks the answer;
/// returns the channel with the decoder holding whatever followed the answer.
/// Greets the agent; returns the channel and the features the agent named.
async fn greet(
    mut reader: BoxReader,
    mut writer: BoxWriter,
    resume: Vec<Resume>,
) -> Result<(BoxReader, Decoder, BoxWriter, Vec<String>), AgentError> {
    let hello = Frame::control(
        0,
        &Request::Hello {
            version: PROTOCOL_VERSION,
            resume,
        },
    );
    let mut out = BytesMut::new();
    encode(&hello, &mut out);
    let mut decoder = Decoder::default();
    let answer = async {
        writer
            .write_all(&out)
            .await
            .map_err(|e| AgentError::Unreachable(e.to_string()))?;
        writer
            .flush()
            .await
            .map_err(|e| AgentError::Unreachable(e.to_string()))?;
        loop {
            if let Some(frame) = decoder.next_frame()? {
                if frame.stream == 0 {
                    return Ok::<_, AgentError>(frame);
                }
                continue;
            }
            let buffer = decoder.buffer_mut();
            buffer.reserve(64 * 1024);
            match reader.read_buf(buffer).await {
                Ok(0) => return Err(AgentError::Unreachable("closed during the greeting".into())),
                Err(e) => return Err(AgentError::Unreachable(e.to_string())),
                Ok(_) => {}
            }
        }
    };
    let answer = tokio::time::timeout(HELLO_TIMEOUT, answer)
        .await
        .map_err(|_| AgentError::Timeout(HELLO_TIMEOUT))??;
    match answer.parse::<Reply>()? {
        Reply::Hello {
            version, features, ..
        } if version == PROTOCOL_VERSION => Ok((reader, decoder, writer, features)),
        Reply::Hello { version, .. } => Err(ProtocolError::Version {
            theirs: version,
            ours: PROTOCOL_VERSION,
        }
        .into()),
        other => Err(ProtocolError::Unexpected(format!("{other:?} instead of hello")).into()),
    }
}

/// A new channel for the writer (`None`: none while one is being opened; frames wait), and the
/// writer's acknowledgement that nothing more goes to the previous one.
type WriterSwitch = (Option<BoxWriter>, tokio::sync::oneshot::Sender<()>);

/// Writes the outgoing frames to the current channel until `writers` replaces it.
async fn write_frames(
    mut outgoing: mpsc::Receiver<Frame>,
    mut writers: mpsc::Receiver<WriterSwitch>,
    closed: CancellationToken,
) {
    let mut writer: Option<BoxWriter> = None;
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let frame = tokio::select! {
            f = outgoing.recv(), if writer.is_some() => f,
            w = writers.recv() => match w {
                Some((w, switched)) => { writer = w; let _ = switched.send(()); continue; }
                None => None,
            },
            _ = closed.cancelled() => None,
        };
        let (Some(frame), Some(current)) = (frame, writer.as_mut()) else {
            break;
        };
        encode_batch(&frame, || outgoing.try_recv().ok(), &mut out);
        // A broken channel loses what was written to it; the reader notices and reconnects
        // (executions whose start was not confirmed are sent again).
        let _ = async {
            current.write_all(&out).await?;
            current.flush().await
        }
        .await;
        out.clear();
    }
    closed.cancel();
    if let Some(mut writer) = writer {
        let _ = writer.shutdown().await;
    }
}

/// Reads frames and routes them to their operations; when the channel breaks, reconnects (if it
/// may) and asks the agent to resume the executions it had started.
async fn follow(
    mut reader: BoxReader,
    mut decoder: Decoder,
    writers: mpsc::Sender<WriterSwitch>,
    routes: Routes,
    reconnect: Option<Reconnect>,
    closed: CancellationToken,
) {
    loop {
        read_frames(&mut reader, &mut decoder, &routes, &closed).await;
        if closed.is_cancelled() {
            break;
        }
        let Some(reconnect) = &reconnect else { break };
        tracing::info!("the connection to a runner's agent broke; reconnecting");
        // Nothing more goes to the broken channel; what went there may be lost: one-answer
        // operations sent so far fail at once (rather than wait for their time limit), later
        // ones wait for the next channel, executions are resumed on it.
        if !switch_writer(&writers, None).await {
            break;
        }
        routes.lock().unwrap().retain(|_, r| r.resume.is_some());
        match replace_channel(reconnect, &routes, &closed).await {
            Some((r, d, w)) => {
                reader = r;
                decoder = d;
                if !switch_writer(&writers, Some(w)).await {
                    break;
                }
            }
            None => break,
        }
    }
    closed.cancel();
    // Every waiting operation sees its channel close.
    routes.lock().unwrap().clear();
}

/// Gives the writer its next channel and waits until it took it; false if the writer is gone.
async fn switch_writer(writers: &mpsc::Sender<WriterSwitch>, writer: Option<BoxWriter>) -> bool {
    let (switched, taken) = tokio::sync::oneshot::channel();
    writers.send((writer, switched)).await.is_ok() && taken.await.is_ok()
}

/// Opens and greets a new channel, trying until the reconnect window has passed.
async fn replace_channel(
    reconnect: &Reconnect,
    routes: &Routes,
    closed: &CancellationToken,
) -> Option<(BoxReader, Decoder, BoxWriter)> {
    let deadline = tokio::time::Instant::now() + reconnect.window;
    let mut delay = Duration::from_millis(50);
    loop {
        let resume: Vec<Resume> = routes
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(stream, route)| {
                let point = route.resume.as_ref()?;
                Some(Resume {
                    stream: *stream,
                    from: point.received.load(Ordering::Relaxed),
                    started: point.started.load(Ordering::Relaxed),
                })
            })
            .collect();
        // Requests of executions whose start was not confirmed go again, right after the hello
        // (the agent ignores one it has already).
        let again: Vec<Frame> = routes
            .lock()
            .unwrap()
            .values()
            .filter_map(|route| route.resume.as_ref()?.request.lock().unwrap().clone())
            .collect();
        let attempt = async {
            let (r, w) = (reconnect.connector)()
                .await
                .map_err(AgentError::Unreachable)?;
            // The same agent again: what it reports is what it reported at first.
            let (r, d, mut w, _) = greet(r, w, resume).await?;
            let mut out = BytesMut::new();
            for frame in &again {
                encode(frame, &mut out);
            }
            w.write_all(&out)
                .await
                .map_err(|e| AgentError::Unreachable(e.to_string()))?;
            Ok::<_, AgentError>((r, d, w))
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::select! {
            result = tokio::time::timeout(left.max(Duration::from_millis(1)), attempt) => match result {
                Ok(Ok(channel)) => {
                    tracing::info!("reconnected to a runner's agent");
                    return Some(channel);
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "reconnecting to a runner's agent failed"),
                Err(_) => {}
            },
            _ = closed.cancelled() => return None,
        }
        if tokio::time::Instant::now() + delay >= deadline {
            tracing::warn!("a runner's agent stayed unreachable; its executions end");
            return None;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Routes frames until the channel ends, breaks the protocol, or the client closes.
async fn read_frames(
    reader: &mut BoxReader,
    decoder: &mut Decoder,
    routes: &Routes,
    closed: &CancellationToken,
) {
    loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let route = routes.lock().unwrap().get(&frame.stream).map(|r| {
                        if let Some(point) = &r.resume {
                            if matches!(frame.kind, FrameKind::Stdout | FrameKind::Stderr) {
                                point
                                    .received
                                    .fetch_add(frame.payload.len() as u64, Ordering::Relaxed);
                            }
                        }
                        r.tx.clone()
                    });
                    // Frames of operations nobody waits for any more are dropped.
                    if let Some(route) = route {
                        tokio::select! {
                            _ = route.send(frame) => {}
                            _ = closed.cancelled() => return,
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping the connection to a runner's agent");
                    return;
                }
            }
        }
        let buffer = decoder.buffer_mut();
        buffer.reserve(64 * 1024);
        let read = tokio::select! {
            r = reader.read_buf(buffer) => r,
            _ = closed.cancelled() => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Turns `\n` into `\r\n` (a lone `\n` only: `\r\n` stays as it is).
#[derive(Default)]
struct Crlf {
    last_was_cr: bool,
}

impl Crlf {
    fn convert(&mut self, bytes: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 8);
        for &b in bytes {
            if b == b'\n' && !self.last_was_cr {
                out.push(b'\r');
            }
            out.push(b);
            self.last_was_cr = b == b'\r';
        }
        Bytes::from(out)
    }
}

/// Carries one execution's frames from its stream to its consumer, and its input the other way.
struct Relay<'a> {
    client: &'a AgentClient,
    stream: u32,
    /// Standard error's line ends become `\r\n`, as a terminal shows them.
    tty: bool,
    point: &'a ResumePoint,
    events: &'a mpsc::Sender<ProcessEvent>,
    kill: &'a CancellationToken,
}

impl Relay<'_> {
    /// Relays until the execution ends, is killed or its consumer goes. Returns the final
    /// event and whether it came from the agent (the program is known to have ended: the
    /// agent said so, or the agent itself is gone).
    async fn run(
        &self,
        mut frames: mpsc::Receiver<Frame>,
        stdin: &mut mpsc::Receiver<Bytes>,
    ) -> (ProcessEvent, bool) {
        let mut crlf = Crlf::default();
        let mut stdin_open = true;
        // Input sent, and taken by the program as far as the agent reported.
        let (mut sent, mut taken) = (0u64, 0u64);
        loop {
            let room = !self.client.input_taken || sent - taken < INPUT_WINDOW;
            let frame = tokio::select! {
                frame = frames.recv() => frame,
                chunk = stdin.recv(), if stdin_open && room => {
                    match chunk {
                        Some(chunk) if !chunk.is_empty() => {
                            sent += chunk.len() as u64;
                            let frame = Frame::data(FrameKind::Stdin, self.stream, chunk);
                            let _ = self.client.send(frame).await;
                        }
                        _ => stdin_open = false,
                    }
                    continue;
                }
                _ = self.kill.cancelled() => return (ProcessEvent::Exited(137), false),
            };
            let Some(frame) = frame else {
                return (
                    ProcessEvent::Failed("the runner's agent is gone".into()),
                    true,
                );
            };
            let output = match frame.kind {
                FrameKind::Stdout => ProcessEvent::Stdout(frame.payload),
                FrameKind::Stderr if self.tty => ProcessEvent::Stderr(crlf.convert(&frame.payload)),
                FrameKind::Stderr => ProcessEvent::Stderr(frame.payload),
                FrameKind::Control => match frame.parse::<Reply>() {
                    Ok(Reply::Started { .. }) => {
                        self.point.started.store(true, Ordering::Relaxed);
                        self.point.request.lock().unwrap().take();
                        continue;
                    }
                    Ok(Reply::InputTaken { total }) => {
                        taken = taken.max(total).min(sent);
                        continue;
                    }
                    Ok(Reply::Exited { code }) => return (ProcessEvent::Exited(code), true),
                    Ok(Reply::Failed { message, .. }) => {
                        return (ProcessEvent::Failed(message), true)
                    }
                    Ok(other) => {
                        return (ProcessEvent::Failed(unexpected(&other).to_string()), false)
                    }
                    Err(e) => {
                        return (ProcessEvent::Failed(AgentError::from(e).to_string()), false)
                    }
                },
                other => {
                    let message = format!("the runner's agent sent an unexpected {other:?} frame");
                    return (ProcessEvent::Failed(message), false);
                }
            };
            // A consumer that stopped reading must not keep a kill from being seen.
            tokio::select! {
                sent = self.events.send(output) => if sent.is_err() {
                    return (ProcessEvent::Failed(String::new()), false);
                },
                _ = self.kill.cancelled() => return (ProcessEvent::Exited(137), false),
            }
        }
    }
}
