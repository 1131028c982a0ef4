//! The TCP resync endpoint, sans-IO: the length-prefixed frames of [`crate::wire::frame`] in,
//! response frames out, time as an argument.
//!
//! A [`FrameRepr::ResyncRequest`] is answered with, for each sequence number from `from_seq`
//! to the latest sent when the request arrived, a [`FrameRepr::Manifest`] and the
//! [`FrameRepr::Chunk`] of the requested leaf (order key), then [`FrameRepr::End`]. A
//! [`FrameRepr::StateRequest`] is answered with [`FrameRepr::State`]. What cannot be served is
//! an [`FrameRepr::Error`] with a typed code and a sequence number for context:
//!
//! | code            | when                                       | context seq         |
//! |-----------------|--------------------------------------------|---------------------|
//! | `UnknownGroup`  | another group                              | 0                   |
//! | `BeyondHistory` | older than the history window (re-register) | the oldest held    |
//! | `NotYetSent`    | newer than the latest sent (or none sent)  | the latest (or 0)   |
//! | `UnknownLeaf`   | no chunk of that message serves the leaf   | that message's seq  |
//! | `NotHeld`       | a hole in the history (a relay's): ask the next endpoint | that seq |
//! | `TooLarge`      | a frame over the request size cap, or a response over the frame limit | 0 or the seq |
//! | `Malformed`     | a frame that does not parse, or that is not a request | 0        |
//! | `RateLimited`, `Overloaded` | [`TcpConnection::refuse`]      | 0                   |
//!
//! `Malformed`, `TooLarge` and the refusals close the connection; the others leave it open for
//! the next request. Pipelined requests are answered in order.
//!
//! A resync stream is generated lazily: frames are added while the unwritten output is under
//! half of `max_output_bytes`, so a 100-message resync never sits in memory at once. The
//! stream continues on the next [`TcpConnection::handle_input`], which may carry no bytes: a
//! listener calls it after writing whenever [`TcpConnection::is_streaming`] says so.
//!
//! # Calling order
//!
//! As for [`super::http::HttpConnection`]: `new` at accept, `handle_input` with each read (and
//! with no bytes after writing while `is_streaming`), write `output` and `consume_output`,
//! `handle_timeout` at `poll_timeout`, close once `wants_close` and the output is empty.

use std::time::{Duration, Instant};

use super::limits::Limits;
pub use super::limits::Refusal;
use super::{Lookup, ResyncSource};
use crate::wire::frame::{ErrorCode, FrameRepr};

/// Output already written is dropped from the front of the buffer past this many bytes.
const COMPACT_AFTER: usize = 64 * 1024;

/// Requests answered and frames sent so far (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Resync requests received.
    pub resync_requests: u64,
    /// State requests received.
    pub state_requests: u64,
    /// Messages (manifest and chunk) streamed.
    pub messages_served: u64,
    /// Resync streams completed with an end frame.
    pub streams_completed: u64,
    /// Error frames sent, any code (including refusals and malformed input).
    pub errors: u64,
    /// Frames that did not parse or were not requests.
    pub malformed: u64,
    /// Refusals with `RateLimited`.
    pub rate_limited: u64,
    /// Refusals with `Overloaded`.
    pub overloaded: u64,
    /// Connections closed because a started frame did not arrive whole in time.
    pub header_timeouts: u64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: u64,
    /// Connections closed because their client did not read its responses.
    pub output_overflows: u64,
}

/// One connection of the TCP resync endpoint.
#[derive(Debug)]
pub struct TcpConnection {
    max_request_bytes: usize,
    header_timeout: Duration,
    idle_timeout: Duration,
    max_requests: u32,
    max_output_bytes: usize,
    /// Received bytes not yet answered: a partial frame, or requests waiting behind a stream.
    input: Vec<u8>,
    /// When the first byte of the partial frame at the start of `input` arrived.
    request_started: Option<Instant>,
    /// Frames; `output[output_start..]` is still to be written.
    output: Vec<u8>,
    output_start: usize,
    /// The last input, or output progress seen by `handle_input`, or the decision to close.
    last_activity: Instant,
    /// Output was consumed since the last `handle_input`.
    output_progress: bool,
    /// The resync stream being generated.
    stream: Option<Stream>,
    /// Close once the current stream ends (the last request allowed).
    close_after_stream: bool,
    /// No further request is read; close once the output is written.
    closing: bool,
    requests: u32,
    counters: TcpCounters,
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    next_seq: u64,
    last_seq: u64,
    leaf: u32,
}

impl TcpConnection {
    /// A connection accepted at `now`.
    pub fn new(now: Instant, limits: &Limits) -> Self {
        Self {
            max_request_bytes: limits.max_request_bytes,
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            max_requests: limits.max_requests_per_connection.max(1),
            max_output_bytes: limits.max_output_bytes,
            input: Vec::new(),
            request_started: None,
            output: Vec::new(),
            output_start: 0,
            last_activity: now,
            output_progress: false,
            stream: None,
            close_after_stream: false,
            closing: false,
            requests: 0,
            counters: TcpCounters::default(),
        }
    }

    /// Bytes read from the socket (possibly none: continue a resync stream after the output
    /// drained). Answers every complete request in order; a resync stream is generated up to
    /// the output watermark and holds later requests back until it ends. `_metrics` is unused:
    /// it keeps the shape of [`super::http::HttpConnection::handle_input`].
    pub fn handle_input(
        &mut self,
        now: Instant,
        bytes: &[u8],
        source: &dyn ResyncSource,
        _metrics: &dyn Fn() -> String,
    ) {
        if self.closing {
            return;
        }
        if !bytes.is_empty() || self.output_progress {
            self.last_activity = now;
        }
        self.output_progress = false;
        let mut started = match self.request_started {
            Some(started) if !self.input.is_empty() => started,
            _ => now,
        };
        let mut input = std::mem::take(&mut self.input);
        input.extend_from_slice(bytes);
        let mut pos = 0;
        while !self.closing {
            if self.stream.is_some() {
                self.continue_stream(source);
                if self.stream.is_some() {
                    break;
                }
                continue;
            }
            let rest = &input[pos..];
            let total = match FrameRepr::peek_len(rest) {
                Ok(Some(total)) => total,
                Ok(None) => break,
                Err(_) => {
                    self.fail(now, ErrorCode::Malformed);
                    break;
                }
            };
            if total > self.max_request_bytes {
                self.fail(now, ErrorCode::TooLarge);
                break;
            }
            let Some(frame) = rest.get(..total) else {
                break;
            };
            pos += total;
            started = now;
            match FrameRepr::parse(frame) {
                Ok(FrameRepr::ResyncRequest {
                    group_id,
                    from_seq,
                    leaf,
                }) => {
                    self.counters.resync_requests += 1;
                    let last = self.count_request();
                    self.start_stream(source, group_id, from_seq, leaf);
                    if last {
                        if self.stream.is_some() {
                            self.close_after_stream = true;
                        } else {
                            self.close(now);
                        }
                    }
                }
                Ok(FrameRepr::StateRequest { group_id }) => {
                    self.counters.state_requests += 1;
                    let last = self.count_request();
                    self.answer_state(source, group_id);
                    if last {
                        self.close(now);
                    }
                }
                Ok(_) | Err(_) => self.fail(now, ErrorCode::Malformed),
            }
            if self.output_pending() > self.max_output_bytes {
                self.overflow();
            }
        }
        if self.closing {
            input.clear();
            self.request_started = None;
        } else {
            input.drain(..pos);
            if input.len() > self.max_request_bytes {
                // Requests piled up behind a stream beyond what one request may take.
                self.fail(now, ErrorCode::TooLarge);
                input.clear();
            }
            self.request_started = (!input.is_empty() && !self.closing).then_some(started);
        }
        self.input = input;
    }

    /// Handles the deadline of [`Self::poll_timeout`]: a frame started and not complete within
    /// the header timeout closes the connection, and so does the idle timeout (dropping output
    /// its client did not read).
    pub fn handle_timeout(&mut self, now: Instant) {
        let idle_deadline = self.last_activity.checked_add(self.idle_timeout);
        if self.closing {
            if idle_deadline.is_some_and(|deadline| now >= deadline) {
                self.discard_output();
            }
            return;
        }
        let header_deadline = self.header_deadline();
        if header_deadline.is_some_and(|deadline| now >= deadline) {
            self.counters.header_timeouts += 1;
            self.close(now);
        } else if idle_deadline.is_some_and(|deadline| now >= deadline) {
            self.counters.idle_timeouts += 1;
            self.close(now);
            self.discard_output();
        }
    }

    /// The next deadline for [`Self::handle_timeout`], if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle_deadline = self.last_activity.checked_add(self.idle_timeout);
        if self.closing {
            return if self.output_pending() == 0 {
                None
            } else {
                idle_deadline
            };
        }
        match (self.header_deadline(), idle_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Bytes to write to the socket.
    pub fn output(&self) -> &[u8] {
        self.output.get(self.output_start..).unwrap_or(&[])
    }

    /// The socket took the first `n` bytes of [`Self::output`].
    pub fn consume_output(&mut self, n: usize) {
        let n = n.min(self.output_pending());
        if n == 0 {
            return;
        }
        self.output_progress = true;
        self.output_start += n;
        if self.output_start >= self.output.len() {
            self.discard_output();
        } else if self.output_start >= COMPACT_AFTER {
            self.output.drain(..self.output_start);
            self.output_start = 0;
        }
    }

    /// Answers with an error frame `RateLimited` or `Overloaded` and closes: buffered input
    /// and any stream in progress are dropped, frames already in the output are still written.
    pub fn refuse(&mut self, status: Refusal) {
        if self.closing {
            return;
        }
        self.input.clear();
        self.request_started = None;
        self.stream = None;
        let code = match status {
            Refusal::RateLimited => {
                self.counters.rate_limited += 1;
                ErrorCode::RateLimited
            }
            Refusal::Overloaded => {
                self.counters.overloaded += 1;
                ErrorCode::Overloaded
            }
        };
        self.error(code, 0);
        self.closing = true;
    }

    /// Whether the connection should be closed once [`Self::output`] is empty.
    pub fn wants_close(&self) -> bool {
        self.closing
    }

    /// Whether a resync stream is still being generated: call [`Self::handle_input`] (with no
    /// bytes) once the output has drained to continue it.
    pub fn is_streaming(&self) -> bool {
        self.stream.is_some() && !self.closing
    }

    /// Requests answered and frames sent so far.
    pub fn counters(&self) -> &TcpCounters {
        &self.counters
    }

    fn header_deadline(&self) -> Option<Instant> {
        // Requests waiting behind a stream are not late: the server is.
        if self.stream.is_some() {
            return None;
        }
        self.request_started
            .and_then(|started| started.checked_add(self.header_timeout))
    }

    /// Counts a request; whether it is the last one this connection may make.
    fn count_request(&mut self) -> bool {
        self.requests = self.requests.saturating_add(1);
        self.requests >= self.max_requests
    }

    fn output_pending(&self) -> usize {
        self.output.len() - self.output_start
    }

    fn discard_output(&mut self) {
        self.output.clear();
        self.output_start = 0;
    }

    fn close(&mut self, now: Instant) {
        self.closing = true;
        self.stream = None;
        self.input.clear();
        self.request_started = None;
        self.last_activity = now;
    }

    /// Answers with an error frame and closes.
    fn fail(&mut self, now: Instant, code: ErrorCode) {
        if code == ErrorCode::Malformed {
            self.counters.malformed += 1;
        }
        self.error(code, 0);
        self.close(now);
    }

    /// The client asks faster than it reads: drop what it did not read and close.
    fn overflow(&mut self) {
        self.counters.output_overflows += 1;
        self.discard_output();
        self.closing = true;
        self.stream = None;
    }

    fn error(&mut self, code: ErrorCode, context_seq: u64) {
        self.counters.errors += 1;
        // An error frame always fits the frame limit.
        self.emit(&FrameRepr::Error { code, context_seq });
    }

    /// Appends `frame` to the output; false if it cannot be encoded (over the frame limit).
    fn emit(&mut self, frame: &FrameRepr<'_>) -> bool {
        let start = self.output.len();
        self.output.resize(start + frame.buffer_len(), 0);
        match frame.emit(&mut self.output[start..]) {
            Ok(len) => {
                self.output.truncate(start + len);
                true
            }
            Err(_) => {
                self.output.truncate(start);
                false
            }
        }
    }

    fn start_stream(&mut self, source: &dyn ResyncSource, group_id: u32, from_seq: u64, leaf: u32) {
        if group_id != source.group_id() {
            self.error(ErrorCode::UnknownGroup, 0);
            return;
        }
        let Some((latest, _)) = source.latest() else {
            self.error(ErrorCode::NotYetSent, 0);
            return;
        };
        if from_seq > latest {
            self.error(ErrorCode::NotYetSent, latest);
            return;
        }
        if let Some(oldest) = source.oldest().filter(|&oldest| from_seq < oldest) {
            self.error(ErrorCode::BeyondHistory, oldest);
            return;
        }
        self.stream = Some(Stream {
            next_seq: from_seq,
            last_seq: latest,
            leaf,
        });
        self.continue_stream(source);
    }

    /// Adds frames of the current stream while the output is under the watermark.
    fn continue_stream(&mut self, source: &dyn ResyncSource) {
        let watermark = self.max_output_bytes / 2;
        while let Some(stream) = self.stream {
            if self.output_pending() >= watermark {
                return;
            }
            if stream.next_seq > stream.last_seq {
                self.finish_stream(stream.last_seq);
                return;
            }
            let seq = stream.next_seq;
            let manifest = source.manifest(seq);
            let chunk = source.chunk(seq, stream.leaf);
            match (manifest, chunk) {
                (Lookup::Found(manifest), Lookup::Found(chunk)) => {
                    let mark = self.output.len();
                    let fits = self.emit(&FrameRepr::Manifest { seq, manifest })
                        && self.emit(&FrameRepr::Chunk {
                            seq,
                            leaf: stream.leaf,
                            chunk,
                        });
                    if fits {
                        self.counters.messages_served += 1;
                        match seq.checked_add(1) {
                            Some(next_seq) => {
                                self.stream = Some(Stream { next_seq, ..stream });
                            }
                            // Nothing can follow the last sequence number.
                            None => self.finish_stream(seq),
                        }
                    } else {
                        self.output.truncate(mark);
                        self.end_stream(ErrorCode::TooLarge, seq);
                    }
                }
                (Lookup::BeyondHistory { oldest }, _) | (_, Lookup::BeyondHistory { oldest }) => {
                    // The window moved past the stream while it was being sent.
                    self.end_stream(ErrorCode::BeyondHistory, oldest);
                }
                (Lookup::NotYetSent { latest }, _) | (_, Lookup::NotYetSent { latest }) => {
                    self.end_stream(ErrorCode::NotYetSent, latest);
                }
                (Lookup::Found(_), Lookup::NotFound) => {
                    self.end_stream(ErrorCode::UnknownLeaf, seq);
                }
                (Lookup::NotFound, _) => {
                    // A hole in the history (a relay's: a message it got by resync only, or
                    // from before it started): the member cannot get past it here, but the
                    // next endpoint may hold it.
                    self.end_stream(ErrorCode::NotHeld, seq);
                }
            }
        }
    }

    /// Ends the current stream with its end frame.
    fn finish_stream(&mut self, last_seq: u64) {
        self.emit(&FrameRepr::End { last_seq });
        self.counters.streams_completed += 1;
        self.stream = None;
        if self.close_after_stream {
            self.closing = true;
        }
    }

    /// Ends the current stream with an error frame.
    fn end_stream(&mut self, code: ErrorCode, context_seq: u64) {
        self.error(code, context_seq);
        self.stream = None;
        if self.close_after_stream {
            self.closing = true;
        }
    }

    fn answer_state(&mut self, source: &dyn ResyncSource, group_id: u32) {
        if group_id != source.group_id() {
            self.error(ErrorCode::UnknownGroup, 0);
            return;
        }
        let Some((latest, manifest)) = source.latest() else {
            self.error(ErrorCode::NotYetSent, 0);
            return;
        };
        let state = FrameRepr::State {
            latest_seq: latest,
            oldest_seq: source.oldest().unwrap_or(latest),
            manifest,
        };
        if !self.emit(&state) {
            self.error(ErrorCode::TooLarge, latest);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::resync::test_source::VecSource;
    use crate::wire::frame::PREFIX_LEN;

    const GROUP: u32 = 7;

    fn metrics() -> String {
        String::new()
    }

    fn encode(frame: &FrameRepr<'_>) -> Vec<u8> {
        let mut buf = vec![0u8; frame.buffer_len()];
        frame.emit(&mut buf).unwrap();
        buf
    }

    fn resync(group_id: u32, from_seq: u64, leaf: u32) -> Vec<u8> {
        encode(&FrameRepr::ResyncRequest {
            group_id,
            from_seq,
            leaf,
        })
    }

    fn state(group_id: u32) -> Vec<u8> {
        encode(&FrameRepr::StateRequest { group_id })
    }

    /// An owned frame, for comparisons.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Frame {
        Manifest(u64, Vec<u8>),
        Chunk(u64, u32, Vec<u8>),
        State(u64, u64, Vec<u8>),
        End(u64),
        Error(ErrorCode, u64),
    }

    /// Splits output into frames; panics on anything that is not a whole response frame.
    fn frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let len = FrameRepr::peek_len(bytes).unwrap().unwrap();
            let frame = match FrameRepr::parse(&bytes[..len]).unwrap() {
                FrameRepr::Manifest { seq, manifest } => Frame::Manifest(seq, manifest.to_vec()),
                FrameRepr::Chunk { seq, leaf, chunk } => Frame::Chunk(seq, leaf, chunk.to_vec()),
                FrameRepr::State {
                    latest_seq,
                    oldest_seq,
                    manifest,
                } => Frame::State(latest_seq, oldest_seq, manifest.to_vec()),
                FrameRepr::End { last_seq } => Frame::End(last_seq),
                FrameRepr::Error { code, context_seq } => Frame::Error(code, context_seq),
                request => panic!("a request in the output: {request:?}"),
            };
            frames.push(frame);
            bytes = &bytes[len..];
        }
        frames
    }

    struct Harness {
        now: Instant,
        conn: TcpConnection,
        source: VecSource,
    }

    impl Harness {
        fn with_limits(limits: Limits) -> Self {
            // Any instant will do as the origin: the time goes on only as the code advances it.
            #[allow(clippy::disallowed_methods)]
            let now = Instant::now();
            Self {
                now,
                conn: TcpConnection::new(now, &limits),
                // Messages 10..=14 of group 7, four leaves each.
                source: VecSource::new(GROUP, 10, 5, 4),
            }
        }

        fn new() -> Self {
            Self::with_limits(Limits::default())
        }

        fn send(&mut self, bytes: &[u8]) {
            self.conn
                .handle_input(self.now, bytes, &self.source, &metrics);
        }

        /// Writes everything, continuing streams, and returns the frames.
        fn take(&mut self) -> Vec<Frame> {
            let mut out = Vec::new();
            loop {
                let len = self.conn.output().len();
                out.extend_from_slice(self.conn.output());
                self.conn.consume_output(len);
                if !self.conn.is_streaming() {
                    break;
                }
                self.send(&[]);
            }
            frames(&out)
        }
    }

    fn message(seq: u64, leaf: u32) -> [Frame; 2] {
        [
            Frame::Manifest(seq, format!("manifest-{seq}").into_bytes()),
            Frame::Chunk(seq, leaf, format!("chunk-{seq}-{leaf}").into_bytes()),
        ]
    }

    #[test]
    fn streams_every_message_from_from_seq_to_latest_then_end() {
        let mut h = Harness::new();
        h.send(&resync(GROUP, 11, 2));
        let mut expected: Vec<Frame> = (11..=14).flat_map(|seq| message(seq, 2)).collect();
        expected.push(Frame::End(14));
        assert_eq!(h.take(), expected);
        assert!(!h.conn.wants_close());
        assert_eq!(h.conn.counters().messages_served, 4);
        assert_eq!(h.conn.counters().streams_completed, 1);
        // From the latest: one message.
        h.send(&resync(GROUP, 14, 0));
        let mut expected = message(14, 0).to_vec();
        expected.push(Frame::End(14));
        assert_eq!(h.take(), expected);
    }

    #[test]
    fn each_error_code_with_its_context() {
        let cases = [
            (resync(8, 11, 0), Frame::Error(ErrorCode::UnknownGroup, 0)),
            (
                resync(GROUP, 9, 0),
                Frame::Error(ErrorCode::BeyondHistory, 10),
            ),
            (
                resync(GROUP, 0, 0),
                Frame::Error(ErrorCode::BeyondHistory, 10),
            ),
            (
                resync(GROUP, 15, 0),
                Frame::Error(ErrorCode::NotYetSent, 14),
            ),
            (
                resync(GROUP, u64::MAX, 0),
                Frame::Error(ErrorCode::NotYetSent, 14),
            ),
            (
                resync(GROUP, 12, 4),
                Frame::Error(ErrorCode::UnknownLeaf, 12),
            ),
            (state(8), Frame::Error(ErrorCode::UnknownGroup, 0)),
        ];
        let mut h = Harness::new();
        for (request, error) in cases {
            h.send(&request);
            assert_eq!(h.take(), vec![error.clone()], "{error:?}");
            // These errors leave the connection open.
            assert!(!h.conn.wants_close());
        }
        // Nothing sent yet.
        let mut h = Harness::new();
        h.source = VecSource::new(GROUP, 1, 0, 1);
        h.send(&resync(GROUP, 1, 0));
        h.send(&state(GROUP));
        assert_eq!(
            h.take(),
            vec![
                Frame::Error(ErrorCode::NotYetSent, 0),
                Frame::Error(ErrorCode::NotYetSent, 0)
            ]
        );
    }

    #[test]
    fn a_hole_in_the_history_ends_the_stream_with_not_held() {
        // A relay's history: message 12 came to it by resync only, it does not hold it.
        let mut h = Harness::new();
        h.source.messages.remove(2);
        h.send(&resync(GROUP, 10, 1));
        let mut expected: Vec<Frame> = (10..=11).flat_map(|seq| message(seq, 1)).collect();
        expected.push(Frame::Error(ErrorCode::NotHeld, 12));
        assert_eq!(h.take(), expected);
        // Asked from the hole on: at once, and the connection stays open.
        h.send(&resync(GROUP, 12, 1));
        assert_eq!(h.take(), vec![Frame::Error(ErrorCode::NotHeld, 12)]);
        assert!(!h.conn.wants_close());
    }

    #[test]
    fn a_leaf_missing_mid_stream_ends_it_with_unknown_leaf() {
        let mut h = Harness::new();
        h.source.messages[2].chunks.truncate(1);
        h.send(&resync(GROUP, 10, 3));
        let mut expected: Vec<Frame> = (10..=11).flat_map(|seq| message(seq, 3)).collect();
        expected.push(Frame::Error(ErrorCode::UnknownLeaf, 12));
        assert_eq!(h.take(), expected);
    }

    #[test]
    fn state_request_gets_the_latest_manifest() {
        let mut h = Harness::new();
        h.send(&state(GROUP));
        assert_eq!(
            h.take(),
            vec![Frame::State(14, 10, b"manifest-14".to_vec())]
        );
        assert_eq!(h.conn.counters().state_requests, 1);
    }

    #[test]
    fn malformed_frames_get_malformed_and_close() {
        let mut trailing = resync(GROUP, 11, 0);
        trailing[PREFIX_LEN - 1] += 1;
        trailing.push(0);
        let response = encode(&FrameRepr::End { last_seq: 3 });
        for bad in [
            vec![0, 0, 0, 0],          // length 0
            vec![0, 1, 0, 1, 0],       // length over the frame limit
            vec![0, 0, 0, 1, 0x42],    // unknown type
            vec![0, 0, 0, 2, 0x02, 0], // truncated state request
            trailing,                  // request with trailing bytes
            response,                  // a response frame sent as a request
        ] {
            let mut h = Harness::new();
            h.send(&bad);
            assert_eq!(
                h.take(),
                vec![Frame::Error(ErrorCode::Malformed, 0)],
                "{bad:?}"
            );
            assert!(h.conn.wants_close());
            assert_eq!(h.conn.poll_timeout(), None);
            // Nothing more is read.
            h.send(&state(GROUP));
            assert!(h.conn.output().is_empty());
        }
    }

    #[test]
    fn a_frame_over_the_request_cap_is_too_large() {
        let mut h = Harness::new();
        // A well-formed length of 60,000: refused from its prefix, without buffering it.
        h.send(&[0, 0, 0xEA, 0x60, 0x01]);
        assert_eq!(h.take(), vec![Frame::Error(ErrorCode::TooLarge, 0)]);
        assert!(h.conn.wants_close());
    }

    #[test]
    fn split_input_and_pipelined_requests() {
        let mut h = Harness::new();
        let mut bytes = resync(GROUP, 13, 1);
        bytes.extend(state(GROUP));
        bytes.extend(resync(GROUP, 99, 1));
        for byte in bytes.chunks(1) {
            h.now += Duration::from_millis(1);
            h.send(byte);
        }
        let mut expected: Vec<Frame> = (13..=14).flat_map(|seq| message(seq, 1)).collect();
        expected.push(Frame::End(14));
        expected.push(Frame::State(14, 10, b"manifest-14".to_vec()));
        expected.push(Frame::Error(ErrorCode::NotYetSent, 14));
        assert_eq!(h.take(), expected);
        // Pipelined in one read.
        let mut h = Harness::new();
        h.send(&bytes);
        assert_eq!(h.take(), expected);
    }

    #[test]
    fn long_streams_are_generated_as_the_output_drains() {
        let mut h = Harness::with_limits(Limits {
            max_output_bytes: 8192,
            ..Limits::default()
        });
        h.source = VecSource::new(GROUP, 1, 100, 2);
        for message in &mut h.source.messages {
            message.manifest = vec![message.seq as u8; 1000];
        }
        h.send(&resync(GROUP, 1, 1));
        h.send(&state(GROUP));
        // About half the output cap at a time, not 100 kB.
        assert!(h.conn.output().len() < 8192, "{}", h.conn.output().len());
        assert!(h.conn.is_streaming());
        let frames = h.take();
        assert_eq!(frames.len(), 2 * 100 + 2);
        assert_eq!(frames[200], Frame::End(100));
        assert!(matches!(frames[201], Frame::State(100, 1, _)));
        assert!(!h.conn.wants_close());
        assert_eq!(h.conn.counters().output_overflows, 0);
    }

    #[test]
    fn history_moving_past_a_stream_ends_it_with_beyond_history() {
        let mut h = Harness::with_limits(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        h.source = VecSource::new(GROUP, 1, 50, 1);
        for message in &mut h.source.messages {
            message.manifest = vec![1; 1000];
        }
        h.send(&resync(GROUP, 1, 0));
        let first = frames(h.conn.output());
        assert_eq!(first.len(), 4, "two messages up to the watermark");
        let len = h.conn.output().len();
        h.conn.consume_output(len);
        // The window moves far ahead while the client reads.
        h.source.messages.drain(..40);
        h.send(&[]);
        let rest = h.take();
        assert_eq!(rest, vec![Frame::Error(ErrorCode::BeyondHistory, 41)]);
    }

    #[test]
    fn a_client_that_requests_and_never_reads_is_cut_off() {
        let mut h = Harness::with_limits(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        for message in &mut h.source.messages {
            message.manifest = vec![1; 1000];
        }
        for _ in 0..10 {
            h.send(&state(GROUP));
        }
        assert!(h.conn.wants_close());
        assert!(h.conn.output().is_empty());
        assert_eq!(h.conn.counters().output_overflows, 1);
        // A stream that is never read stays at the watermark and is closed by the idle
        // timeout.
        let mut h = Harness::with_limits(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        h.source = VecSource::new(GROUP, 1, 100, 1);
        h.send(&resync(GROUP, 1, 0));
        h.send(&[]);
        assert!(h.conn.output().len() < 4096);
        h.now += Duration::from_secs(30);
        h.conn.handle_timeout(h.now);
        assert!(h.conn.wants_close());
        assert!(h.conn.output().is_empty());
    }

    #[test]
    fn header_and_idle_timeouts_close() {
        let mut h = Harness::new();
        let request = resync(GROUP, 11, 0);
        h.send(&request[..5]);
        assert_eq!(h.conn.poll_timeout(), Some(h.now + Duration::from_secs(5)));
        h.now += Duration::from_secs(5);
        h.conn.handle_timeout(h.now);
        assert!(h.conn.wants_close());
        assert!(h.conn.output().is_empty());
        assert_eq!(h.conn.counters().header_timeouts, 1);

        let mut h = Harness::new();
        h.send(&state(GROUP));
        h.take();
        assert_eq!(h.conn.poll_timeout(), Some(h.now + Duration::from_secs(30)));
        h.now += Duration::from_secs(29);
        h.conn.handle_timeout(h.now);
        assert!(!h.conn.wants_close());
        h.now += Duration::from_secs(1);
        h.conn.handle_timeout(h.now);
        assert!(h.conn.wants_close());
        assert_eq!(h.conn.counters().idle_timeouts, 1);
        assert_eq!(h.conn.poll_timeout(), None);
    }

    #[test]
    fn refusals_and_the_request_cap() {
        for (refusal, code) in [
            (Refusal::RateLimited, ErrorCode::RateLimited),
            (Refusal::Overloaded, ErrorCode::Overloaded),
        ] {
            let mut h = Harness::new();
            h.conn.refuse(refusal);
            assert_eq!(h.take(), vec![Frame::Error(code, 0)]);
            assert!(h.conn.wants_close());
        }
        let mut h = Harness::with_limits(Limits {
            max_requests_per_connection: 2,
            ..Limits::default()
        });
        h.send(&[state(GROUP), resync(GROUP, 14, 0), state(GROUP)].concat());
        let mut expected = vec![Frame::State(14, 10, b"manifest-14".to_vec())];
        expected.extend(message(14, 0));
        expected.push(Frame::End(14));
        assert_eq!(h.take(), expected);
        assert!(h.conn.wants_close());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes in any split: no panic, and the output is whole response frames.
        #[test]
        fn any_input_in_any_split_gives_whole_frames(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..200),
                proptest::collection::vec(
                    (0u8..4, 5u64..20, 0u32..6).prop_map(|(kind, seq, leaf)| match kind {
                        0 => resync(GROUP, seq, leaf),
                        1 => state(GROUP),
                        2 => resync(leaf, seq, leaf),
                        _ => vec![0, 0, 0, (seq % 4) as u8, leaf as u8],
                    }),
                    1..8,
                ).prop_map(|parts| parts.concat()),
            ],
            splits in proptest::collection::vec(1usize..30, 1..10),
            timeout_secs in proptest::option::of(0u64..40),
        ) {
            let mut h = Harness::new();
            let mut out = Vec::new();
            let mut rest = bytes.as_slice();
            let mut i = 0;
            while !rest.is_empty() {
                let n = splits[i % splits.len()].min(rest.len());
                i += 1;
                h.send(&rest[..n]);
                rest = &rest[n..];
                h.now += Duration::from_millis(100);
                out.extend_from_slice(h.conn.output());
                let len = h.conn.output().len();
                h.conn.consume_output(len);
            }
            if let Some(secs) = timeout_secs {
                h.now += Duration::from_secs(secs);
                h.conn.handle_timeout(h.now);
            }
            let len = h.conn.output().len();
            out.extend_from_slice(h.conn.output());
            h.conn.consume_output(len);
            while h.conn.is_streaming() {
                h.send(&[]);
                out.extend_from_slice(h.conn.output());
                let len = h.conn.output().len();
                h.conn.consume_output(len);
            }
            frames(&out);
        }
    }
}
