//! Serving one byte stream: the handshake, then frames dispatched to executions and file operations.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

use bytes::{Bytes, BytesMut};
use poseidon_agent_protocol::{
    encode_batch, Decoder, Frame, FrameKind, ProtocolError, Reply, Request, Resume,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::session::{Input, Session};
use crate::{environment, exec, files};

/// Largest tar archive one file update may carry.
const MAX_ARCHIVE: usize = 1024 * 1024 * 1024;

/// Listens on a Unix socket (mode 0600), calls `listening`, and serves each connection; a new
/// connection replaces the current one.
pub(crate) async fn serve_socket(
    path: &str,
    session: Session,
    listening: impl FnOnce(),
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = crate::socket_path::short(path, |p| std::os::unix::net::UnixListener::bind(p))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listening();
    loop {
        let (stream, _) = listener.accept().await?;
        let (reader, writer) = stream.into_split();
        tokio::spawn(serve_stream(reader, writer, session.clone()));
    }
}

/// Serves one connection until it ends or breaks the protocol.
pub(crate) async fn serve_stream(
    mut reader: impl AsyncRead + Unpin,
    writer: impl AsyncWrite + Unpin + Send + 'static,
    session: Session,
) {
    let (tx, rx) = mpsc::channel::<Frame>(256);
    let writer_task = tokio::spawn(write_frames(writer, rx));
    let mut decoder = Decoder::default();
    let resume = match handshake(&mut reader, &mut decoder, &tx).await {
        Ok(resume) => resume,
        Err(e) => {
            eprintln!("poseidon-agent: handshake failed: {e}");
            drop(tx);
            let _ = writer_task.await;
            return;
        }
    };
    // Not dumpable from the first gateway on (before it, the backend may still join the
    // agent's namespaces, as pasta does, which needs it dumpable; no learner's program runs
    // before it): no process of the runner, root's included, may then trace the agent, read
    // its memory or change its /proc settings (a stopped agent froze its runner). Programs
    // the agent starts are dumpable again from their exec on.
    let _ = nix::sys::prctl::set_dumpable(false);
    // What the gateway lost with its previous connection goes first, then everything new.
    let (generation, replay) = session.begin_attach(&resume);
    for frame in replay {
        let _ = tx.send(frame).await;
    }
    session.finish_attach(generation, tx.clone());
    let mut uploads: HashMap<u32, Upload> = HashMap::new();
    let result = loop {
        let frame = tokio::select! {
            frame = next_frame(&mut reader, &mut decoder) => frame,
            // A newer connection took over: this one ends (its bridge process with it).
            _ = session.superseded(generation) => break Ok(()),
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if let Err(e) = dispatch(frame, &session, &tx, &mut uploads) {
            break Err(e);
        }
    };
    if let Err(e) = result {
        eprintln!("poseidon-agent: dropping the connection: {e}");
    }
    session.detach(generation);
    drop(tx);
    let _ = writer_task.await;
}

struct Upload {
    delete: Vec<String>,
    cwd: String,
    archive: BytesMut,
}

async fn handshake(
    reader: &mut (impl AsyncRead + Unpin),
    decoder: &mut Decoder,
    tx: &mpsc::Sender<Frame>,
) -> Result<Vec<Resume>, ProtocolError> {
    let frame = next_frame(reader, decoder)
        .await?
        .ok_or_else(|| ProtocolError::Unexpected("connection closed before hello".into()))?;
    let hello: Request = frame.parse()?;
    let reply = Reply::Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        features: vec![
            poseidon_agent_protocol::FEATURE_INPUT_TAKEN.to_string(),
            poseidon_agent_protocol::FEATURE_TIME_LIMIT.to_string(),
        ],
    };
    let _ = tx.send(Frame::control(0, &reply)).await;
    match hello {
        Request::Hello { version, resume } if version == PROTOCOL_VERSION => Ok(resume),
        Request::Hello { version, .. } => Err(ProtocolError::Version {
            theirs: version,
            ours: PROTOCOL_VERSION,
        }),
        other => Err(ProtocolError::Unexpected(format!("{other:?} before hello"))),
    }
}

async fn next_frame(
    reader: &mut (impl AsyncRead + Unpin),
    decoder: &mut Decoder,
) -> Result<Option<Frame>, ProtocolError> {
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(Some(frame));
        }
        let buffer = decoder.buffer_mut();
        buffer.reserve(64 * 1024);
        match reader.read_buf(buffer).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

async fn write_frames(mut writer: impl AsyncWrite + Unpin, mut rx: mpsc::Receiver<Frame>) {
    let mut out = BytesMut::with_capacity(64 * 1024);
    while let Some(frame) = rx.recv().await {
        // What is already queued goes out in the same write.
        encode_batch(&frame, || rx.try_recv().ok(), &mut out);
        if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        out.clear();
    }
}

/// Replies on a stream from a task of its own (the reader never waits for the writer).
pub(crate) fn reply(tx: &mpsc::Sender<Frame>, stream: u32, reply: Reply) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let _ = tx.send(Frame::control(stream, &reply)).await;
    });
}

fn failed(message: impl Into<String>) -> Reply {
    Reply::Failed {
        message: message.into(),
        stderr: String::new(),
    }
}

fn dispatch(
    frame: Frame,
    session: &Session,
    tx: &mpsc::Sender<Frame>,
    uploads: &mut HashMap<u32, Upload>,
) -> Result<(), ProtocolError> {
    let stream = frame.stream;
    match frame.kind {
        FrameKind::Control => match frame.parse::<Request>()? {
            Request::Hello { .. } => reply(tx, stream, failed("already greeted")),
            Request::Ping => reply(tx, stream, Reply::Pong),
            Request::Exec {
                argv,
                env,
                cwd,
                identity,
                tty,
                inherit_env,
                stderr_on_terminal,
                time_limit_ms,
            } => {
                let mut env = if inherit_env {
                    environment::inherited(env, identity)
                } else {
                    env
                };
                environment::complete(&mut env, identity, tty);
                let spec = exec::ExecSpec {
                    argv,
                    env,
                    cwd,
                    identity,
                    tty,
                    stderr_on_terminal: tty && stderr_on_terminal,
                    time_limit: time_limit_ms.map(std::time::Duration::from_millis),
                };
                exec::start(session.clone(), stream, spec);
            }
            Request::Signal { signal } => {
                session.input(stream, Input::Signal(signal));
            }
            Request::UpdateFiles {
                delete,
                cwd,
                archive,
            } => {
                if archive {
                    uploads.insert(
                        stream,
                        Upload {
                            delete,
                            cwd,
                            archive: BytesMut::new(),
                        },
                    );
                } else {
                    files::spawn_update(tx.clone(), stream, delete, cwd, Bytes::new());
                }
            }
            Request::List {
                path,
                recursive,
                cwd,
                identity,
            } => files::spawn_list(tx.clone(), stream, path, recursive, cwd, identity),
            Request::Read {
                path,
                cwd,
                identity,
            } => files::spawn_read(tx.clone(), stream, path, cwd, identity),
        },
        FrameKind::Stdin => {
            session.input(stream, Input::Bytes(frame.payload));
        }
        FrameKind::Data => {
            let Some(upload) = uploads.get_mut(&stream) else {
                return Err(ProtocolError::Unexpected(format!(
                    "data for stream {stream} without an update"
                )));
            };
            if upload.archive.len() + frame.payload.len() > MAX_ARCHIVE {
                uploads.remove(&stream);
                reply(tx, stream, failed("the archive is too large"));
            } else {
                upload.archive.extend_from_slice(&frame.payload);
            }
        }
        FrameKind::DataEnd => {
            if let Some(upload) = uploads.remove(&stream) {
                files::spawn_update(
                    tx.clone(),
                    stream,
                    upload.delete,
                    upload.cwd,
                    upload.archive.freeze(),
                );
            }
        }
        FrameKind::Stdout | FrameKind::Stderr => {
            return Err(ProtocolError::Unexpected(format!(
                "{:?} frame sent to the agent",
                frame.kind
            )))
        }
    }
    Ok(())
}
