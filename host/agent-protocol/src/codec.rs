//! Framing: turning frames into bytes and bytes (in any split) back into frames.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes before a frame's payload: length (4), kind (1), stream (4).
pub const HEADER_LEN: usize = 9;
/// Largest payload a frame may carry; larger frames are a protocol error.
pub const MAX_FRAME: usize = 1024 * 1024;

/// What a frame's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON [`crate::Request`] (towards the agent) or [`crate::Reply`] (from it).
    Control = 1,
    /// Bytes for a process's standard input; an empty payload closes it.
    Stdin = 2,
    /// Bytes a process wrote to standard output (or its terminal).
    Stdout = 3,
    /// Bytes a process wrote to standard error.
    Stderr = 4,
    /// A piece of a file's content (an upload towards the agent, a download from it).
    Data = 5,
    /// The end of the [`FrameKind::Data`] frames of a stream.
    DataEnd = 6,
}

impl FrameKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Control,
            2 => Self::Stdin,
            3 => Self::Stdout,
            4 => Self::Stderr,
            5 => Self::Data,
            6 => Self::DataEnd,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The operation it belongs to.
    pub stream: u32,
    /// The payload.
    pub payload: Bytes,
}

impl Frame {
    /// A control frame carrying `message` as JSON.
    pub fn control(stream: u32, message: &impl serde::Serialize) -> Self {
        let json = serde_json::to_vec(message).expect("protocol messages always serialise");
        Self {
            kind: FrameKind::Control,
            stream,
            payload: Bytes::from(json),
        }
    }

    /// A frame of raw bytes.
    pub fn data(kind: FrameKind, stream: u32, payload: Bytes) -> Self {
        Self {
            kind,
            stream,
            payload,
        }
    }

    /// Parses the payload of a control frame.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        if self.kind != FrameKind::Control {
            return Err(ProtocolError::Unexpected(format!(
                "{:?} frame where a control message was expected",
                self.kind
            )));
        }
        serde_json::from_slice(&self.payload).map_err(|e| ProtocolError::BadMessage(e.to_string()))
    }
}

/// Why a byte stream is not valid protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame announced a payload larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// A frame's length cannot even hold its header.
    #[error("frame length {0} is shorter than a header")]
    TooShort(usize),
    /// A frame of a kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A control message that is not valid JSON of the expected shape.
    #[error("malformed control message: {0}")]
    BadMessage(String),
    /// A well-formed frame that makes no sense at this point.
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    /// The peer speaks another protocol version.
    #[error("the agent speaks protocol version {theirs}, the gateway {ours}")]
    Version {
        /// The peer's version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
}

/// Appends one frame to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let len = frame.payload.len() + HEADER_LEN - 4;
    out.reserve(len + 4);
    out.put_u32_le(len as u32);
    out.put_u8(frame.kind as u8);
    out.put_u32_le(frame.stream);
    out.put_slice(&frame.payload);
}

/// Bytes a writer gathers at most before one write ([`encode_batch`]).
pub const BATCH_BYTES: usize = 256 * 1024;

/// Appends `first` and then, for one write, the frames `next` has ready at once, until
/// [`BATCH_BYTES`] are gathered or `next` has none.
pub fn encode_batch(first: &Frame, mut next: impl FnMut() -> Option<Frame>, out: &mut BytesMut) {
    encode(first, out);
    while out.len() < BATCH_BYTES {
        match next() {
            Some(frame) => encode(&frame, out),
            None => break,
        }
    }
}

/// Reassembles frames from bytes that arrive in arbitrary pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: BytesMut,
}

impl Decoder {
    /// Adds received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The buffer to read into directly (then call nothing else: the bytes are already added).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buffer
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or an error that poisons the
    /// stream (the caller must drop the connection).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if self.buffer.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buffer[..4].try_into().expect("4 bytes")) as usize;
        if len < HEADER_LEN - 4 {
            return Err(ProtocolError::TooShort(len));
        }
        let payload_len = len - (HEADER_LEN - 4);
        if payload_len > MAX_FRAME {
            return Err(ProtocolError::TooLarge(payload_len));
        }
        if self.buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind =
            FrameKind::from_u8(self.buffer[4]).ok_or(ProtocolError::UnknownKind(self.buffer[4]))?;
        if self.buffer.len() < len + 4 {
            self.buffer.reserve(len + 4 - self.buffer.len());
            return Ok(None);
        }
        let mut frame = self.buffer.split_to(len + 4);
        frame.advance(4 + 1);
        let stream = frame.get_u32_le();
        Ok(Some(Frame {
            kind,
            stream,
            payload: frame.freeze(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_batch_takes_what_is_ready_up_to_its_size_in_order() {
        let frame = |i: u32| Frame::data(FrameKind::Stdout, i, Bytes::from(vec![b'x'; 100 * 1024]));
        let mut queued: std::collections::VecDeque<Frame> = (1..10).map(frame).collect();
        let mut out = BytesMut::new();
        encode_batch(&frame(0), || queued.pop_front(), &mut out);
        // 100 KiB frames: the third crosses the limit, the fourth waits for the next write.
        let mut decoder = Decoder::default();
        decoder.extend(&out);
        let mut streams = Vec::new();
        while let Some(f) = decoder.next_frame().unwrap() {
            streams.push(f.stream);
        }
        assert_eq!(streams, [0, 1, 2]);
        assert_eq!(queued.front().map(|f| f.stream), Some(3));
        let mut out = BytesMut::new();
        encode_batch(&frame(0), || None, &mut out);
        assert_eq!(out.len(), HEADER_LEN + 100 * 1024);
    }

    fn kind_strategy() -> impl Strategy<Value = FrameKind> {
        prop_oneof![
            Just(FrameKind::Control),
            Just(FrameKind::Stdin),
            Just(FrameKind::Stdout),
            Just(FrameKind::Stderr),
            Just(FrameKind::Data),
            Just(FrameKind::DataEnd),
        ]
    }

    proptest! {
        /// Frames survive encoding and any split of the byte stream.
        #[test]
        fn round_trip_in_any_pieces(
            frames in proptest::collection::vec((kind_strategy(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..8),
            split in 1usize..64,
        ) {
            let frames: Vec<Frame> = frames.into_iter().map(|(k, s, p)| Frame::data(k, s, Bytes::from(p))).collect();
            let mut bytes = BytesMut::new();
            for f in &frames { encode(f, &mut bytes); }
            let mut decoder = Decoder::default();
            let mut out = Vec::new();
            for piece in bytes.chunks(split) {
                decoder.extend(piece);
                while let Some(f) = decoder.next_frame().unwrap() { out.push(f); }
            }
            prop_assert_eq!(out, frames);
        }

        /// Arbitrary bytes never panic the decoder: they yield frames, ask for more, or fail.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut decoder = Decoder::default();
            decoder.extend(&bytes);
            for _ in 0..bytes.len() + 1 {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        prop_assert!(frame.payload.len() <= MAX_FRAME);
                        let _ = frame.parse::<crate::Request>();
                        let _ = frame.parse::<crate::Reply>();
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering_it() {
        let mut decoder = Decoder::default();
        decoder.extend(&((MAX_FRAME + 100) as u32).to_le_bytes());
        assert_eq!(
            decoder.next_frame(),
            Err(ProtocolError::TooLarge(MAX_FRAME + 95))
        );
    }

    #[test]
    fn unknown_kind_and_short_length_are_errors() {
        let mut decoder = Decoder::default();
        decoder.extend(&[5, 0, 0, 0, 99, 0, 0, 0, 0]);
        assert_eq!(decoder.next_frame(), Err(ProtocolError::UnknownKind(99)));
        let mut decoder = Decoder::default();
        decoder.extend(&[2, 0, 0, 0, 1, 0]);
        assert_eq!(decoder.next_frame(), Err(ProtocolError::TooShort(2)));
    }

    #[test]
    fn control_frames_parse_into_messages() {
        let frame = Frame::control(7, &crate::Request::Ping);
        assert_eq!(frame.parse::<crate::Request>(), Ok(crate::Request::Ping));
        let data = Frame::data(FrameKind::Stdout, 7, Bytes::from_static(b"{}"));
        assert!(matches!(
            data.parse::<crate::Request>(),
            Err(ProtocolError::Unexpected(_))
        ));
        let garbage = Frame {
            kind: FrameKind::Control,
            stream: 1,
            payload: Bytes::from_static(b"{\"nope\":1}"),
        };
        assert!(matches!(
            garbage.parse::<crate::Request>(),
            Err(ProtocolError::BadMessage(_))
        ));
    }
}
