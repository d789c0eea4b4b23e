//! What outlives a connection: the running executions, and the way their output reaches whichever
//! gateway connection is current.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use poseidon_agent_protocol::Frame;
use tokio::sync::{mpsc, Notify};

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
}

#[derive(Default)]
struct State {
    /// The current connection's outgoing frames, with its generation.
    outbox: Option<(u64, mpsc::Sender<Frame>)>,
    generation: u64,
    executions: HashMap<u32, mpsc::UnboundedSender<Input>>,
}

impl Session {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                attached: Notify::new(),
            }),
        }
    }

    /// Makes `outbox` the current connection (the previous one gets nothing more); returns its
    /// generation for [`Session::detach`].
    pub(crate) fn attach(&self, outbox: mpsc::Sender<Frame>) -> u64 {
        let mut state = self.inner.state.lock().unwrap();
        state.generation += 1;
        let generation = state.generation;
        state.outbox = Some((generation, outbox));
        drop(state);
        self.inner.attached.notify_waiters();
        generation
    }

    /// Forgets the connection of this generation if it is still the current one.
    pub(crate) fn detach(&self, generation: u64) {
        let mut state = self.inner.state.lock().unwrap();
        if state.outbox.as_ref().is_some_and(|(g, _)| *g == generation) {
            state.outbox = None;
        }
    }

    /// Sends a frame to the current connection, waiting while there is none (so output produced
    /// while the gateway reconnects is held back, not dropped). A frame whose connection breaks
    /// while it is being sent is lost with that connection.
    pub(crate) async fn send(&self, frame: Frame) {
        loop {
            let attached = self.inner.attached.notified();
            tokio::pin!(attached);
            attached.as_mut().enable();
            let outbox = self
                .inner
                .state
                .lock()
                .unwrap()
                .outbox
                .as_ref()
                .map(|(_, tx)| tx.clone());
            match outbox {
                Some(tx) => {
                    let _ = tx.send(frame).await;
                    return;
                }
                None => attached.await,
            }
        }
    }

    /// Registers a running execution; false if the stream id is taken.
    pub(crate) fn add_execution(&self, stream: u32, input: mpsc::UnboundedSender<Input>) -> bool {
        let mut state = self.inner.state.lock().unwrap();
        if state.executions.contains_key(&stream) {
            return false;
        }
        state.executions.insert(stream, input);
        true
    }

    /// Forgets an execution that ended.
    pub(crate) fn remove_execution(&self, stream: u32) {
        self.inner.state.lock().unwrap().executions.remove(&stream);
    }

    /// Passes input to a running execution; false if there is none on that stream.
    pub(crate) fn input(&self, stream: u32, input: Input) -> bool {
        let state = self.inner.state.lock().unwrap();
        match state.executions.get(&stream) {
            Some(tx) => tx.send(input).is_ok(),
            None => false,
        }
    }
}
