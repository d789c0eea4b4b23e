//! The gateway's side of the agent protocol: one connection, many operations multiplexed by stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use poseidon_agent_protocol::{
    encode, Decoder, Frame, FrameKind, Identity, ProtocolError, Reply, Request, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::{ExecProcess, FileDownload, ProcessEvent};
use crate::files::FileEntry;

/// How long the agent may take to answer the greeting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames buffered per operation before the connection's reader waits for its consumer.
const STREAM_BUFFER: usize = 64;

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

type Routes = Arc<Mutex<HashMap<u32, mpsc::Sender<Frame>>>>;

/// A connection to one agent. Cheap to clone; dropping the last clone closes it.
#[derive(Clone)]
pub struct AgentClient {
    outbox: mpsc::Sender<Frame>,
    routes: Routes,
    next_stream: Arc<AtomicU32>,
    closed: CancellationToken,
    _close_on_drop: Arc<tokio_util::sync::DropGuard>,
}

impl AgentClient {
    /// Greets the agent over a byte channel and starts serving the connection.
    pub async fn connect(
        reader: impl AsyncRead + Unpin + Send + 'static,
        writer: impl AsyncWrite + Unpin + Send + 'static,
    ) -> Result<Self, AgentError> {
        let (outbox, outgoing) = mpsc::channel::<Frame>(256);
        let closed = CancellationToken::new();
        let routes: Routes = Arc::default();
        let (hello_tx, mut hello_rx) = mpsc::channel(1);
        routes.lock().unwrap().insert(0, hello_tx);
        tokio::spawn(write_frames(writer, outgoing, closed.clone()));
        tokio::spawn(read_frames(reader, Arc::clone(&routes), closed.clone()));
        let client = Self {
            outbox,
            routes,
            // Streams of an earlier connection may still run in the agent: start elsewhere.
            next_stream: Arc::new(AtomicU32::new(
                (uuid::Uuid::new_v4().as_u128() as u32 & 0x3fff_ffff) | 1,
            )),
            closed: closed.clone(),
            _close_on_drop: Arc::new(closed.clone().drop_guard()),
        };
        client
            .send(Frame::control(
                0,
                &Request::Hello {
                    version: PROTOCOL_VERSION,
                },
            ))
            .await?;
        let answer = tokio::time::timeout(HELLO_TIMEOUT, hello_rx.recv())
            .await
            .map_err(|_| AgentError::Timeout(HELLO_TIMEOUT))?
            .ok_or_else(|| AgentError::Unreachable("closed during the greeting".into()))?;
        match answer.parse::<Reply>()? {
            Reply::Hello { version, .. } if version == PROTOCOL_VERSION => {}
            Reply::Hello { version, .. } => {
                closed.cancel();
                return Err(ProtocolError::Version {
                    theirs: version,
                    ours: PROTOCOL_VERSION,
                }
                .into());
            }
            other => {
                closed.cancel();
                return Err(
                    ProtocolError::Unexpected(format!("{other:?} instead of hello")).into(),
                );
            }
        }
        client.routes.lock().unwrap().remove(&0);
        Ok(client)
    }

    /// Whether the connection is gone (then every later call fails).
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
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut routes = self.routes.lock().unwrap();
        let mut stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        while stream == 0 || routes.contains_key(&stream) {
            stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        }
        routes.insert(stream, tx);
        (stream, rx)
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
    pub async fn exec(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: String,
        identity: Identity,
        tty: bool,
    ) -> Result<ExecProcess, AgentError> {
        let (stream, mut rx) = self.open();
        let request = Request::Exec {
            argv,
            env,
            cwd,
            identity,
            tty,
        };
        if let Err(e) = self.request(stream, &request).await {
            self.close_stream(stream);
            return Err(e);
        }
        let (events_tx, events_rx) = mpsc::channel(32);
        let (stdin_tx, mut stdin_rx) = mpsc::channel::<Bytes>(32);
        let kill = CancellationToken::new();
        let client = self.clone();
        let kill_watch = kill.clone();
        tokio::spawn(async move {
            let mut crlf = Crlf::default();
            let mut stdin_open = true;
            let final_event = loop {
                tokio::select! {
                    frame = rx.recv() => {
                        let Some(frame) = frame else {
                            break ProcessEvent::Failed("the runner's agent is gone".into());
                        };
                        match frame.kind {
                            FrameKind::Stdout => {
                                if events_tx.send(ProcessEvent::Stdout(frame.payload)).await.is_err() { break ProcessEvent::Failed(String::new()); }
                            }
                            FrameKind::Stderr => {
                                let bytes = if tty { crlf.convert(&frame.payload) } else { frame.payload };
                                if events_tx.send(ProcessEvent::Stderr(bytes)).await.is_err() { break ProcessEvent::Failed(String::new()); }
                            }
                            FrameKind::Control => match frame.parse::<Reply>() {
                                Ok(Reply::Started { .. }) => {}
                                Ok(Reply::Exited { code }) => break ProcessEvent::Exited(code),
                                Ok(Reply::Failed { message, .. }) => break ProcessEvent::Failed(message),
                                Ok(other) => break ProcessEvent::Failed(unexpected(&other).to_string()),
                                Err(e) => break ProcessEvent::Failed(AgentError::from(e).to_string()),
                            },
                            other => break ProcessEvent::Failed(format!("the runner's agent sent an unexpected {other:?} frame")),
                        }
                    }
                    chunk = stdin_rx.recv(), if stdin_open => match chunk {
                        Some(chunk) if !chunk.is_empty() => {
                            let _ = client.send(Frame::data(FrameKind::Stdin, stream, chunk)).await;
                        }
                        _ => stdin_open = false,
                    },
                    _ = kill_watch.cancelled() => {
                        let _ = client.request(stream, &Request::Signal { signal: 9 }).await;
                        break ProcessEvent::Exited(137);
                    }
                }
            };
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
        match self.call(&request, None, limit, false).await?.0 {
            Reply::Listing { entries } => Ok(entries),
            other => Err(unexpected(&other)),
        }
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

async fn write_frames(
    mut writer: impl AsyncWrite + Unpin,
    mut outgoing: mpsc::Receiver<Frame>,
    closed: CancellationToken,
) {
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let frame = tokio::select! {
            f = outgoing.recv() => f,
            _ = closed.cancelled() => None,
        };
        let Some(frame) = frame else { break };
        encode(&frame, &mut out);
        while out.len() < 256 * 1024 {
            match outgoing.try_recv() {
                Ok(frame) => encode(&frame, &mut out),
                Err(_) => break,
            }
        }
        if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
            break;
        }
        out.clear();
    }
    closed.cancel();
    let _ = writer.shutdown().await;
}

async fn read_frames(
    mut reader: impl AsyncRead + Unpin,
    routes: Routes,
    closed: CancellationToken,
) {
    let mut decoder = Decoder::default();
    'connection: loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let route = routes.lock().unwrap().get(&frame.stream).cloned();
                    // Frames of operations nobody waits for any more are dropped.
                    if let Some(route) = route {
                        tokio::select! {
                            _ = route.send(frame) => {}
                            _ = closed.cancelled() => break 'connection,
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping the connection to a runner's agent");
                    break 'connection;
                }
            }
        }
        let buffer = decoder.buffer_mut();
        buffer.reserve(64 * 1024);
        let read = tokio::select! {
            r = reader.read_buf(buffer) => r,
            _ = closed.cancelled() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    closed.cancel();
    // Every waiting operation sees its channel close.
    routes.lock().unwrap().clear();
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
