//! The TCP resync endpoint's protocol, sans-IO: the length-prefixed frames of
//! [`crate::wire::frame`] in, response frames out. [`TcpCodec`] parses and encodes;
//! [`super::connection::Connection`] owns the buffers, deadlines, caps, counters and refusals
//! ([`TcpConnection`]).
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
//! | `RateLimited`, `Overloaded` | [`Connection::refuse`]         | 0                   |
//!
//! `Malformed`, `TooLarge` and the refusals close the connection; the others leave it open for
//! the next request. Pipelined requests are answered in order. A started frame that does not
//! arrive whole within the header timeout closes the connection without an answer.
//!
//! A resync stream is generated lazily (see [`super::connection`]): a listener calls
//! [`Connection::handle_input`] with no bytes after writing whenever
//! [`Connection::has_more_to_send`] says so.

use super::connection::{Answer, Codec, Connection, Decoded, StreamStart};
use super::limits::Limits;
pub use super::limits::Refusal;
use super::ResyncSource;
use crate::wire::frame::{ErrorCode, FrameRepr};

/// One connection of the TCP resync endpoint.
pub type TcpConnection = Connection<TcpCodec>;

/// What only the TCP endpoint counts, per connection (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Resync requests received.
    pub resync_requests: u64,
    /// State requests received.
    pub state_requests: u64,
    /// Error frames sent, any code (including refusals and malformed input).
    pub errors: u64,
    /// Frames that did not parse or were not requests.
    pub malformed: u64,
}

/// A request frame, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpRequest {
    /// [`FrameRepr::ResyncRequest`].
    Resync {
        /// The group.
        group_id: u32,
        /// The first message wanted.
        from_seq: u64,
        /// The leaf order key whose chunks are wanted.
        leaf: u32,
    },
    /// [`FrameRepr::StateRequest`].
    State {
        /// The group.
        group_id: u32,
    },
}

/// The codec of the TCP frame protocol.
#[derive(Debug)]
pub struct TcpCodec {
    max_request_bytes: usize,
    counters: TcpCounters,
}

impl Codec for TcpCodec {
    type Request = TcpRequest;
    type Reject = ErrorCode;
    type Counters = TcpCounters;

    fn new(limits: &Limits) -> Self {
        Self {
            max_request_bytes: limits.max_request_bytes,
            counters: TcpCounters::default(),
        }
    }

    fn decode(&mut self, window: &[u8]) -> Decoded<TcpRequest, ErrorCode> {
        let total = match FrameRepr::peek_len(window) {
            Ok(Some(total)) => total,
            Ok(None) => return Decoded::Partial,
            Err(_) => return Decoded::Reject(ErrorCode::Malformed),
        };
        if total > self.max_request_bytes {
            // Refused from its prefix, without buffering it.
            return Decoded::Reject(ErrorCode::TooLarge);
        }
        let Some(frame) = window.get(..total) else {
            return Decoded::Partial;
        };
        let request = match FrameRepr::parse(frame) {
            Ok(FrameRepr::ResyncRequest {
                group_id,
                from_seq,
                leaf,
            }) => TcpRequest::Resync {
                group_id,
                from_seq,
                leaf,
            },
            Ok(FrameRepr::StateRequest { group_id }) => TcpRequest::State { group_id },
            Ok(_) | Err(_) => return Decoded::Reject(ErrorCode::Malformed),
        };
        Decoded::Request {
            len: total,
            request,
        }
    }

    fn too_large(&self) -> ErrorCode {
        ErrorCode::TooLarge
    }

    fn timed_out(&self) -> Option<ErrorCode> {
        None
    }

    fn answer(
        &mut self,
        request: TcpRequest,
        source: &dyn ResyncSource,
        _metrics: &dyn Fn() -> String,
        _last: bool,
        out: &mut Vec<u8>,
    ) -> Answer {
        match request {
            TcpRequest::Resync {
                group_id,
                from_seq,
                leaf,
            } => {
                self.counters.resync_requests += 1;
                match StreamStart::check(source, group_id, from_seq, leaf) {
                    StreamStart::Stream(stream) => {
                        return Answer {
                            close: false,
                            stream: Some(stream),
                        }
                    }
                    StreamStart::UnknownGroup => self.error(out, ErrorCode::UnknownGroup, 0),
                    StreamStart::NotYetSent { latest } => {
                        self.error(out, ErrorCode::NotYetSent, latest);
                    }
                    StreamStart::BeyondHistory { oldest } => {
                        self.error(out, ErrorCode::BeyondHistory, oldest);
                    }
                }
            }
            TcpRequest::State { group_id } => {
                self.counters.state_requests += 1;
                self.answer_state(source, group_id, out);
            }
        }
        Answer::default()
    }

    fn reject(&mut self, reject: ErrorCode, out: &mut Vec<u8>) {
        if reject == ErrorCode::Malformed {
            self.counters.malformed += 1;
        }
        self.error(out, reject, 0);
    }

    fn refuse(&mut self, refusal: Refusal, out: &mut Vec<u8>) {
        let code = match refusal {
            Refusal::RateLimited => ErrorCode::RateLimited,
            Refusal::Overloaded => ErrorCode::Overloaded,
        };
        self.error(out, code, 0);
    }

    fn stream_frames(&mut self, frames: &[FrameRepr<'_>], out: &mut Vec<u8>) -> bool {
        let mark = out.len();
        for frame in frames {
            if !emit(out, frame) {
                out.truncate(mark);
                return false;
            }
            if matches!(frame, FrameRepr::Error { .. }) {
                self.counters.errors += 1;
            }
        }
        true
    }

    fn stream_end(&mut self, _out: &mut Vec<u8>) {}

    fn counters(&self) -> &TcpCounters {
        &self.counters
    }
}

impl TcpCodec {
    fn error(&mut self, out: &mut Vec<u8>, code: ErrorCode, context_seq: u64) {
        self.counters.errors += 1;
        // An error frame always fits the frame limit.
        emit(out, &FrameRepr::Error { code, context_seq });
    }

    fn answer_state(&mut self, source: &dyn ResyncSource, group_id: u32, out: &mut Vec<u8>) {
        if group_id != source.group_id() {
            self.error(out, ErrorCode::UnknownGroup, 0);
            return;
        }
        let Some((latest, manifest)) = source.latest() else {
            self.error(out, ErrorCode::NotYetSent, 0);
            return;
        };
        let state = FrameRepr::State {
            latest_seq: latest,
            oldest_seq: source.oldest().unwrap_or(latest),
            manifest,
        };
        if !emit(out, &state) {
            self.error(out, ErrorCode::TooLarge, latest);
        }
    }
}

/// Appends `frame` to `out`; false (and `out` unchanged) if it cannot be encoded (over the
/// frame limit).
pub(crate) fn emit(out: &mut Vec<u8>, frame: &FrameRepr<'_>) -> bool {
    let start = out.len();
    out.resize(start + frame.buffer_len(), 0);
    match frame.emit(&mut out[start..]) {
        Ok(len) => {
            out.truncate(start + len);
            true
        }
        Err(_) => {
            out.truncate(start);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

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
                if !self.conn.has_more_to_send() {
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
        assert_eq!(h.conn.protocol_counters().state_requests, 1);
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
        assert!(h.conn.has_more_to_send());
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
    fn a_client_that_never_reads_is_cut_off_and_one_that_reads_late_gets_every_answer() {
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
        // Answered up to half the output cap; the rest wait, and reading should stop.
        assert!(!h.conn.wants_close());
        assert!(!h.conn.wants_input());
        assert!(h.conn.output().len() < 4096);
        let answers = h.take();
        assert_eq!(answers.len(), 10);
        assert_eq!(h.conn.counters().output_overflows, 0);
        // One answer over the output cap cuts the client off.
        let mut h = Harness::with_limits(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        h.source.messages[4].manifest = vec![1; 5000];
        h.send(&state(GROUP));
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
            while h.conn.has_more_to_send() {
                h.send(&[]);
                out.extend_from_slice(h.conn.output());
                let len = h.conn.output().len();
                h.conn.consume_output(len);
            }
            frames(&out);
        }
    }
}
