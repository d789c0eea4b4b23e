//! What outlives a connection: the running executions, the output they sent lately (to send again
//! to a gateway that lost it with a broken connection), and the way their output reaches whichever
//! gateway connection is current.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use poseidon_agent_protocol::{Frame, FrameKind, Reply, Resume};
use tokio::sync::{mpsc, watch, Notify};

/// Output bytes of an execution kept after they were sent, for a gateway that reconnects (what a
/// broken connection can lose is what sat in its buffers: far less). The agent's memory counts
/// against the runner's limit, so this stays small.
const RETAINED_OUTPUT: u64 = 256 * 1024;
/// How long an ended execution can still be resumed.
const ENDED_KEPT: Duration = Duration::from_secs(120);
/// Ended executions kept for resuming at most (the oldest go first).
const ENDED_MAX: usize = 16;

/// Input towards a running execution.
pub(crate) enum Input {
    /// Bytes for its standard input (empty: close it).
    Bytes(Bytes),
    /// A signal for its whole session.
    Signal(i32),
}

/// Shared state of the agent; cheap to clone.
#[derive(Clone)]
pub(crate) struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    attached: Notify,
    /// The current connection's generation (0: none yet).
    current: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// The current connection's outgoing frames, with its generation.
    outbox: Option<(u64, mpsc::Sender<Frame>)>,
    generation: u64,
    executions: HashMap<u32, Execution>,
}

/// An execution the gateway may still ask about.
struct Execution {
    /// Its input; `None` once it ended.
    input: Option<mpsc::UnboundedSender<Input>>,
    ended: Option<Instant>,
    journal: Journal,
}

/// The frames of an execution sent lately, with the output offset each starts at.
#[derive(Default)]
struct Journal {
    frames: VecDeque<(u64, Frame)>,
    /// Output bytes sent so far (the offset of the next output byte).
    sent: u64,
}

impl Journal {
    fn record(&mut self, frame: &Frame) {
        self.frames.push_back((self.sent, frame.clone()));
        if is_output(frame) {
            self.sent += frame.payload.len() as u64;
        }
        // Forget output frames that lie wholly before the retained window.
        while let Some((offset, first)) = self.frames.front() {
            let end = offset + first.payload.len() as u64;
            if is_output(first) && end + RETAINED_OUTPUT < self.sent {
                self.frames.pop_front();
            } else {
                break;
            }
        }
    }

    /// The frames to send again for a gateway that has `from` output bytes; `None` when part of
    /// them was forgotten already.
    fn since(&self, from: u64) -> Option<Vec<Frame>> {
        let oldest = self.frames.front().map_or(self.sent, |(o, _)| *o);
        if from < oldest || from > self.sent {
            return None;
        }
        let mut out = Vec::new();
        for (offset, frame) in &self.frames {
            if !is_output(frame) {
                // What ended the execution.
                out.push(frame.clone());
                continue;
            }
            let end = offset + frame.payload.len() as u64;
            if end <= from {
                continue;
            }
            let skip = from.saturating_sub(*offset) as usize;
            out.push(Frame::data(
                frame.kind,
                frame.stream,
                frame.payload.slice(skip..),
            ));
        }
        Some(out)
    }
}

fn is_output(frame: &Frame) -> bool {
    matches!(frame.kind, FrameKind::Stdout | FrameKind::Stderr)
}

impl Session {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                attached: Notify::new(),
                current: watch::channel(0).0,
            }),
        }
    }

    /// Starts attaching a new connection: the previous one gets nothing more, and executions
    /// wait. Returns the new generation and the frames to send it first (for each execution in
    /// `resume`: what it sent after the gateway's offset, or a failure if that is gone).
    pub(crate) fn begin_attach(&self, resume: &[Resume]) -> (u64, Vec<Frame>) {
        let mut state = self.inner.state.lock().unwrap();
        state.generation += 1;
        let generation = state.generation;
        state.outbox = None;
        let mut frames = Vec::new();
        for r in resume {
            let known = state.executions.get(&r.stream);
            if known.is_none() && !r.started {
                // Its request never arrived; the gateway sends it again.
                continue;
            }
            match known.and_then(|e| e.journal.since(r.from)) {
                Some(replay) => frames.extend(replay),
                None => frames.push(Frame::control(
                    r.stream,
                    &Reply::Failed {
                        message: "the runner's agent no longer has this execution's output".into(),
                        stderr: String::new(),
                    },
                )),
            }
        }
        drop(state);
        self.inner.current.send_replace(generation);
        (generation, frames)
    }

    /// Makes `outbox` the current connection, unless a newer one began attaching meanwhile.
    pub(crate) fn finish_attach(&self, generation: u64, outbox: mpsc::Sender<Frame>) {
        let mut state = self.inner.state.lock().unwrap();
        if state.generation == generation {
            state.outbox = Some((generation, outbox));
        }
        drop(state);
        self.inner.attached.notify_waiters();
    }

    /// Resolves once a connection newer than `generation` began attaching.
    pub(crate) async fn superseded(&self, generation: u64) {
        let mut current = self.inner.current.subscribe();
        let _ = current.wait_for(|g| *g > generation).await;
    }

    /// Forgets the connection of this generation if it is still the current one.
    pub(crate) fn detach(&self, generation: u64) {
        let mut state = self.inner.state.lock().unwrap();
        if state.outbox.as_ref().is_some_and(|(g, _)| *g == generation) {
            state.outbox = None;
        }
    }

    /// Sends a frame to the current connection, waiting while there is none (so output produced
    /// while the gateway reconnects is held back, not dropped). An execution's frames are kept
    /// (the last [`RETAINED_OUTPUT`] bytes) for a gateway that lost them with its connection.
    pub(crate) async fn send(&self, frame: Frame) {
        self.deliver(frame, true).await
    }

    /// Sends a frame a gateway that resumes has no use for (`Started`, `InputTaken`): not kept
    /// (kept in front of the output, it would also keep the journal's window from moving).
    pub(crate) async fn send_news(&self, frame: Frame) {
        self.deliver(frame, false).await
    }

    async fn deliver(&self, frame: Frame, keep: bool) {
        loop {
            let attached = self.inner.attached.notified();
            tokio::pin!(attached);
            attached.as_mut().enable();
            let outbox = {
                let mut state = self.inner.state.lock().unwrap();
                let outbox = state.outbox.as_ref().map(|(_, tx)| tx.clone());
                if outbox.is_some() && keep {
                    if let Some(execution) = state.executions.get_mut(&frame.stream) {
                        execution.journal.record(&frame);
                    }
                }
                outbox
            };
            match outbox {
                Some(tx) => {
                    let _ = tx.send(frame).await;
                    return;
                }
                None => attached.await,
            }
        }
    }

    /// Registers a running execution; false if the stream id is taken (by a running execution,
    /// or one that ended lately and may still be resumed).
    pub(crate) fn add_execution(&self, stream: u32, input: mpsc::UnboundedSender<Input>) -> bool {
        let mut state = self.inner.state.lock().unwrap();
        state
            .executions
            .retain(|_, e| e.ended.is_none_or(|t| t.elapsed() < ENDED_KEPT));
        let mut ended: Vec<(Instant, u32)> = state
            .executions
            .iter()
            .filter_map(|(stream, e)| e.ended.map(|t| (t, *stream)))
            .collect();
        if ended.len() > ENDED_MAX {
            ended.sort();
            for (_, stream) in &ended[..ended.len() - ENDED_MAX] {
                state.executions.remove(stream);
            }
        }
        if state.executions.contains_key(&stream) {
            return false;
        }
        state.executions.insert(
            stream,
            Execution {
                input: Some(input),
                ended: None,
                journal: Journal::default(),
            },
        );
        true
    }

    /// Records that an execution ended: it takes no more input; its last frames stay resumable
    /// for a while.
    pub(crate) fn remove_execution(&self, stream: u32) {
        if let Some(e) = self.inner.state.lock().unwrap().executions.get_mut(&stream) {
            e.input = None;
            e.ended = Some(Instant::now());
        }
    }

    /// Passes input to a running execution; false if there is none on that stream. (What waits
    /// is bounded by the gateway, which sends no more than its window beyond what the program
    /// took: see [`Reply::InputTaken`].)
    pub(crate) fn input(&self, stream: u32, input: Input) -> bool {
        let state = self.inner.state.lock().unwrap();
        match state.executions.get(&stream).and_then(|e| e.input.as_ref()) {
            Some(tx) => tx.send(input).is_ok(),
            None => false,
        }
    }

    /// Whether an execution other than `stream` is running.
    pub(crate) fn others_running(&self, stream: u32) -> bool {
        let state = self.inner.state.lock().unwrap();
        state
            .executions
            .iter()
            .any(|(s, e)| *s != stream && e.input.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(n: usize, byte: u8) -> Frame {
        Frame::data(FrameKind::Stdout, 5, Bytes::from(vec![byte; n]))
    }

    #[test]
    fn only_the_newest_ended_executions_stay_resumable() {
        let session = Session::new();
        for stream in 1..=(ENDED_MAX as u32 + 4) {
            let (tx, _rx) = mpsc::unbounded_channel();
            assert!(session.add_execution(stream, tx));
            session.remove_execution(stream);
        }
        let (tx, _rx) = mpsc::unbounded_channel();
        assert!(session.add_execution(1000, tx));
        let state = session.inner.state.lock().unwrap();
        assert_eq!(state.executions.len(), ENDED_MAX + 1);
        assert!(
            !state.executions.contains_key(&1),
            "the oldest ended one went first"
        );
        assert!(state.executions.contains_key(&(ENDED_MAX as u32 + 4)));
    }

    #[test]
    fn the_journal_sends_again_exactly_what_came_after_the_offset() {
        // What an execution keeps: its output and its end (`Started` is sent as news).
        let mut j = Journal::default();
        j.record(&out(3, b'a'));
        j.record(&out(2, b'b'));
        j.record(&Frame::control(5, &Reply::Exited { code: 0 }));
        let again = j.since(4).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(&again[0].payload[..], b"b");
        assert!(matches!(
            again[1].parse::<Reply>(),
            Ok(Reply::Exited { code: 0 })
        ));
        assert_eq!(j.since(5).unwrap().len(), 1);
        assert!(j.since(6).is_none(), "an offset beyond what was sent");
    }

    #[tokio::test]
    async fn the_journal_keeps_a_bounded_window_and_says_when_output_is_gone() {
        let session = Session::new();
        let (tx, _input) = mpsc::unbounded_channel();
        assert!(session.add_execution(5, tx));
        let (outbox, mut gateway) = mpsc::channel(64);
        let (generation, _) = session.begin_attach(&[]);
        session.finish_attach(generation, outbox);
        tokio::spawn(async move { while gateway.recv().await.is_some() {} });
        // As an execution sends it: `Started` first, then output without end.
        session
            .send_news(Frame::control(5, &Reply::Started { pid: 9 }))
            .await;
        for _ in 0..20 {
            session.send(out(64 * 1024, b'x')).await;
        }
        let state = session.inner.state.lock().unwrap();
        let j = &state.executions[&5].journal;
        let kept: u64 = j.frames.iter().map(|(_, f)| f.payload.len() as u64).sum();
        assert!(kept <= RETAINED_OUTPUT + 64 * 1024, "kept {kept}");
        assert!(j.since(0).is_none());
        let tail = j.since(j.sent - 10).unwrap();
        assert_eq!(tail.iter().map(|f| f.payload.len()).sum::<usize>(), 10);
    }
}
