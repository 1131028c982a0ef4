//! One connection of a resync endpoint, sans-IO, whatever its protocol: the input buffer, the
//! output queue and its cap, the header and idle deadlines, the per-connection request cap,
//! refusals, the counters, and the lazy generation of resync streams. A [`Codec`] supplies
//! only the protocol: it parses requests out of bytes and encodes responses
//! ([`super::tcp::TcpCodec`] for the length-prefixed frames, [`super::http::HttpCodec`] for
//! HTTP/1.1).
//!
//! # Calling order
//!
//! For each accepted socket: [`Connection::new`] at accept; [`Connection::handle_input`] (or
//! [`Connection::handle_input_admitting`], which lets the listener charge each request) with
//! each read, and with no bytes after writing while [`Connection::has_more_to_send`]; write
//! [`Connection::output`] and report what the socket took with
//! [`Connection::consume_output`]; [`Connection::handle_end_of_input`] when the client shut its
//! side; at [`Connection::poll_timeout`] call [`Connection::handle_timeout`]; close the socket
//! once [`Connection::wants_close`] and the output is empty.
//!
//! # Rules every protocol gets from here
//!
//! - Requests are answered in order, each once; the listener may refuse any of them before it
//!   is answered (rate limit), and a refusal is answered in the protocol's terms, counted once,
//!   and closes.
//! - A connection earns its slot: its first byte must come within the silent timeout and its
//!   first request whole within the header timeout, both counted from the accept (closing
//!   without a word otherwise, or with the codec's answer once bytes came). A later request
//!   must arrive whole within the header timeout, counted from its first byte; a connection
//!   without traffic for the idle timeout closes, dropping output its client did not read.
//! - [`Connection::waiting_since`] tells the listener which connections only wait on their
//!   client, and since when they made progress, so that a full endpoint can evict the one
//!   that made progress least recently instead of refusing a new client;
//!   [`Connection::is_silent`] tells which have not sent a byte yet.
//! - A request over the size cap is rejected from what has arrived, never buffered whole.
//! - A resync stream is generated while the unwritten output is under half of
//!   `max_output_bytes`, so a 100-message resync never sits in memory at once; requests
//!   pipelined behind it wait (they are not late: the header deadline does not run while a
//!   stream does) up to the request size cap.
//! - Requests are answered while the unwritten output is under half of `max_output_bytes`;
//!   beyond it they wait, and [`Connection::wants_input`] tells the driver to stop reading, so
//!   a pipelining client that reads its answers gets every one of them. A client that stops
//!   reading is closed by the idle timeout; one answer that alone takes the output over
//!   `max_output_bytes` cuts the client off.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use super::limits::{Limits, Refusal};
use super::{Lookup, ResyncSource};
use crate::wire::frame::{ErrorCode, FrameRepr};

/// Output already written is dropped from the front of the buffer past this many bytes.
const COMPACT_AFTER: usize = 64 * 1024;

/// A resync protocol: parses requests out of bytes and encodes responses into the output. It
/// owns no buffer, deadline or counter of the connection; [`Connection`] does.
pub trait Codec: Debug {
    /// A parsed request, owned (it outlives the input it was parsed from).
    type Request;
    /// Input that cannot be answered in kind: the codec answers it (or not) and the connection
    /// closes.
    type Reject: Copy + Debug;
    /// Counters of what only this protocol has (status classes, malformed frames).
    type Counters: Debug + Clone + Copy + Default + PartialEq + Eq;

    /// The codec of a connection accepted under `limits`.
    fn new(limits: &Limits) -> Self;

    /// Whether `new_bytes`, appended to a partial request, may complete it. A partial request
    /// is parsed again only then (an HTTP head completes only at a line feed, so a client
    /// that sends one byte at a time costs no more than one parse per line).
    fn may_complete(&self, new_bytes: &[u8]) -> bool {
        let _ = new_bytes;
        true
    }

    /// Parses the request at the start of `window`, which holds the buffered input up to the
    /// request size cap.
    fn decode(&mut self, window: &[u8]) -> Decoded<Self::Request, Self::Reject>;

    /// The rejection of a request over the size cap (or of requests piled up behind a stream
    /// beyond it).
    fn too_large(&self) -> Self::Reject;

    /// The rejection written when a started request misses the header timeout, if the
    /// protocol answers one (HTTP 408); `None` closes without a word.
    fn timed_out(&self) -> Option<Self::Reject>;

    /// Writes the answer to `request` into `out`. `last` says this is the last request the
    /// connection may make (the response should say the connection closes).
    fn answer(
        &mut self,
        request: Self::Request,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
        last: bool,
        out: &mut Vec<u8>,
    ) -> Answer;

    /// Writes the answer to a rejected input into `out`.
    fn reject(&mut self, reject: Self::Reject, out: &mut Vec<u8>);

    /// Writes the answer to a refusal into `out`.
    fn refuse(&mut self, refusal: Refusal, out: &mut Vec<u8>);

    /// Writes frames of the current resync stream into `out`: one message (its manifest and
    /// chunk frames), or the frame that ends the stream (an end or an error frame). False if
    /// they cannot be encoded (over the frame limit); then `out` is as it was.
    fn stream_frames(&mut self, frames: &[FrameRepr<'_>], out: &mut Vec<u8>) -> bool;

    /// Writes what closes the current resync stream after its last frame (HTTP: the last
    /// chunk of a chunked body).
    fn stream_end(&mut self, out: &mut Vec<u8>);

    /// A refusal or a rejection cuts the current resync stream short: writes what the
    /// protocol needs to end it, and says whether the refusal's or rejection's own answer may
    /// follow (a frame may follow frames; an HTTP response may not follow an unfinished body).
    fn interrupt_stream(&mut self, out: &mut Vec<u8>) -> bool {
        let _ = out;
        true
    }

    /// This protocol's counters.
    fn counters(&self) -> &Self::Counters;
}

/// What [`Codec::decode`] found at the start of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<R, J> {
    /// A whole request of `len` bytes.
    Request {
        /// Its length in the input.
        len: usize,
        /// The request.
        request: R,
    },
    /// The request is not whole yet.
    Partial,
    /// Input that cannot be answered in kind: answer it and close.
    Reject(J),
}

/// What answering a request left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[must_use]
pub struct Answer {
    /// Close once this answer (and its stream) is written.
    pub close: bool,
    /// A resync stream to generate after what [`Codec::answer`] wrote.
    pub stream: Option<ResyncStream>,
}

/// A resync stream: every held message from `next_seq` to `last_seq` (the latest when the
/// request arrived), each as its manifest and the chunk of leaf order key `leaf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncStream {
    /// The next message to send.
    pub next_seq: u64,
    /// The last message to send.
    pub last_seq: u64,
    /// The leaf order key whose chunks are sent.
    pub leaf: u32,
}

/// Where a resync of `from_seq` for `leaf` can start in `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    /// Another group.
    UnknownGroup,
    /// Nothing sent yet, or `from_seq` is after the latest (given, or 0 if nothing was sent).
    NotYetSent {
        /// The latest sequence number sent (0 if none).
        latest: u64,
    },
    /// `from_seq` is older than the history window.
    BeyondHistory {
        /// The oldest sequence number held.
        oldest: u64,
    },
    /// The stream to send.
    Stream(ResyncStream),
}

impl StreamStart {
    /// Checks a resync request against `source`.
    pub fn check(source: &dyn ResyncSource, group_id: u32, from_seq: u64, leaf: u32) -> Self {
        if group_id != source.group_id() {
            return Self::UnknownGroup;
        }
        let Some((latest, _)) = source.latest() else {
            return Self::NotYetSent { latest: 0 };
        };
        if from_seq > latest {
            return Self::NotYetSent { latest };
        }
        if let Some(oldest) = source.oldest().filter(|&oldest| from_seq < oldest) {
            return Self::BeyondHistory { oldest };
        }
        Self::Stream(ResyncStream {
            next_seq: from_seq,
            last_seq: latest,
            leaf,
        })
    }
}

/// Counters every protocol has, for one connection (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests parsed whole and admitted (answered or being answered).
    pub requests: u64,
    /// Messages (manifest and chunk) streamed.
    pub messages_served: u64,
    /// Resync streams sent to their end.
    pub streams_completed: u64,
    /// Input rejected as malformed or too large.
    pub rejected: u64,
    /// Refusals because the source is over its rate limit.
    pub rate_limited: u64,
    /// Refusals because the endpoint is at a connection cap.
    pub overloaded: u64,
    /// Connections closed because a started request did not arrive whole in time.
    pub header_timeouts: u64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: u64,
    /// Connections closed because they sent nothing within the silent timeout (counted apart
    /// from [`Self::header_timeouts`]).
    pub silent_timeouts: u64,
    /// Connections closed because their client did not read its responses.
    pub output_overflows: u64,
}

impl Counters {
    /// Adds `other` to these counters.
    pub fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        self.messages_served += other.messages_served;
        self.streams_completed += other.streams_completed;
        self.rejected += other.rejected;
        self.rate_limited += other.rate_limited;
        self.overloaded += other.overloaded;
        self.header_timeouts += other.header_timeouts;
        self.idle_timeouts += other.idle_timeouts;
        self.silent_timeouts += other.silent_timeouts;
        self.output_overflows += other.output_overflows;
    }
}

/// One connection of a resync endpoint, speaking the protocol of codec `C`.
#[derive(Debug)]
pub struct Connection<C: Codec> {
    codec: C,
    max_request_bytes: usize,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// When the connection was accepted.
    accepted: Instant,
    /// The first byte must come by this; `None` once it came.
    silent_deadline: Option<Instant>,
    /// The first request must be whole by this; `None` once one was.
    first_request_deadline: Option<Instant>,
    /// The accept, or the last request completed, or output taken by the client.
    last_progress: Instant,
    max_requests: u32,
    max_output_bytes: usize,
    /// Received bytes not yet answered: a partial request, or requests waiting behind a
    /// stream.
    input: Vec<u8>,
    /// When the first byte of the partial request at the start of `input` arrived.
    request_started: Option<Instant>,
    /// The input holds requests that were not parsed because a stream was being generated.
    parse_pending: bool,
    /// Responses; `output[output_start..]` is still to be written.
    output: Vec<u8>,
    output_start: usize,
    /// The last input, or output progress seen by `handle_input`, or the decision to close.
    last_activity: Instant,
    /// Output was consumed since the last `handle_input`.
    output_progress: bool,
    /// The resync stream being generated.
    stream: Option<ResyncStream>,
    /// Close once the current stream ends.
    close_after_stream: bool,
    /// The client shut its side: close once everything received is answered.
    end_of_input: bool,
    /// No further request is read; close once the output is written.
    closing: bool,
    requests: u32,
    counters: Counters,
}

impl<C: Codec> Connection<C> {
    /// A connection accepted at `now`.
    pub fn new(now: Instant, limits: &Limits) -> Self {
        Self {
            codec: C::new(limits),
            max_request_bytes: limits.max_request_bytes.max(1),
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            accepted: now,
            silent_deadline: now.checked_add(limits.silent_timeout),
            first_request_deadline: now.checked_add(limits.header_timeout),
            last_progress: now,
            max_requests: limits.max_requests_per_connection.max(1),
            max_output_bytes: limits.max_output_bytes,
            input: Vec::new(),
            request_started: None,
            parse_pending: false,
            output: Vec::new(),
            output_start: 0,
            last_activity: now,
            output_progress: false,
            stream: None,
            close_after_stream: false,
            end_of_input: false,
            closing: false,
            requests: 0,
            counters: Counters::default(),
        }
    }

    /// Bytes read from the socket (possibly none: continue a resync stream after the output
    /// drained). Answers every complete request in order; a resync stream is generated up to
    /// the output watermark and holds later requests back until it ends. Bytes received after
    /// the connection decided to close are ignored.
    pub fn handle_input(
        &mut self,
        now: Instant,
        bytes: &[u8],
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        self.handle_input_admitting(now, bytes, source, metrics, &mut || Ok(()));
    }

    /// [`Self::handle_input`], asking `admit` before answering each request: the listener
    /// charges the request to its client there (a per-source rate limit), and a refusal is
    /// answered in the protocol's terms and closes the connection.
    pub fn handle_input_admitting(
        &mut self,
        now: Instant,
        bytes: &[u8],
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
        admit: &mut dyn FnMut() -> Result<(), Refusal>,
    ) {
        if self.closing {
            return;
        }
        if !bytes.is_empty() || self.output_progress {
            self.last_activity = now;
        }
        if !bytes.is_empty() {
            self.silent_deadline = None;
        }
        if self.output_progress {
            self.last_progress = now;
        }
        self.output_progress = false;
        let mut started = match self.request_started {
            Some(started) if !self.input.is_empty() => started,
            _ => now,
        };
        // Bytes beyond what was asked for (fed while reading should have stopped) may not
        // pile up past the request size cap.
        let backed_up = !bytes.is_empty() && !self.wants_input();
        let parse_again =
            self.input.is_empty() || self.parse_pending || self.codec.may_complete(bytes);
        let mut input = std::mem::take(&mut self.input);
        input.extend_from_slice(bytes);
        if !parse_again && input.len() >= self.max_request_bytes {
            let too_large = self.codec.too_large();
            self.reject(now, too_large);
        }
        let mut pos = 0;
        while !self.closing {
            if self.stream.is_some() {
                self.continue_stream(now, source);
                if self.stream.is_some() {
                    break;
                }
                continue;
            }
            if !parse_again || pos >= input.len() || self.output_pending() >= self.watermark() {
                // Requests wait for the output to drain rather than overflow it.
                break;
            }
            let window_end = input.len().min(pos + self.max_request_bytes);
            match self.codec.decode(&input[pos..window_end]) {
                Decoded::Request { len, request } => {
                    pos += len.max(1);
                    started = now;
                    self.first_request_deadline = None;
                    self.last_progress = now;
                    match admit() {
                        Ok(()) => self.answer(now, request, source, metrics),
                        Err(refusal) => self.refuse(refusal),
                    }
                }
                Decoded::Partial => {
                    if window_end - pos >= self.max_request_bytes {
                        let too_large = self.codec.too_large();
                        self.reject(now, too_large);
                    }
                    break;
                }
                Decoded::Reject(reject) => self.reject(now, reject),
            }
            if self.output_pending() > self.max_output_bytes {
                self.overflow();
            }
        }
        if self.closing {
            input.clear();
        } else {
            input.drain(..pos.min(input.len()));
            if backed_up && input.len() > self.max_request_bytes {
                // Requests piled up behind a stream, or behind output the client does not
                // read, beyond what one request may take.
                let too_large = self.codec.too_large();
                self.reject(now, too_large);
                input.clear();
            }
        }
        self.request_started = (!input.is_empty()).then_some(started);
        self.parse_pending = !input.is_empty()
            && (self.stream.is_some() || self.output_pending() >= self.watermark());
        self.input = input;
        if self.end_of_input && self.stream.is_none() && !self.parse_pending && !self.closing {
            // Every whole request is answered; what is left is a partial one that cannot
            // complete.
            self.close(now);
        }
    }

    /// The client shut its side (a read returned end of file): no request follows. What was
    /// asked before is still answered, a resync stream and the requests pipelined behind it
    /// included; the connection closes once that is written. A partial request is dropped.
    pub fn handle_end_of_input(&mut self, now: Instant) {
        if self.closing {
            return;
        }
        self.end_of_input = true;
        if self.stream.is_none() && !self.parse_pending {
            // Without a stream, every whole request received is answered already.
            self.close(now);
        }
    }

    /// Handles the deadline of [`Self::poll_timeout`]: a request started and not complete
    /// within the header timeout closes the connection (with the codec's answer, if it has
    /// one), and so does the idle timeout (dropping output its client did not read).
    pub fn handle_timeout(&mut self, now: Instant) {
        let idle_deadline = self.last_activity.checked_add(self.idle_timeout);
        if self.closing {
            if idle_deadline.is_some_and(|deadline| now >= deadline) {
                self.discard_output();
            }
            return;
        }
        if self
            .header_deadline()
            .is_some_and(|deadline| now >= deadline)
        {
            if self.is_silent() {
                // Nothing was asked: nothing to answer.
                self.counters.silent_timeouts += 1;
                self.close(now);
                return;
            }
            self.counters.header_timeouts += 1;
            self.input.clear();
            self.request_started = None;
            match self.codec.timed_out() {
                Some(reject) => self.write_reject(now, reject),
                None => self.close(now),
            }
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

    /// Refuses the client ([`Refusal::RateLimited`], [`Refusal::Overloaded`]) in the
    /// protocol's terms and closes: buffered input and any stream in progress are dropped,
    /// responses already in the output are still written. Counted once; a refusal of a
    /// connection already closing adds nothing.
    pub fn refuse(&mut self, refusal: Refusal) {
        if self.closing {
            return;
        }
        self.input.clear();
        self.request_started = None;
        self.parse_pending = false;
        match refusal {
            Refusal::RateLimited => self.counters.rate_limited += 1,
            Refusal::Overloaded => self.counters.overloaded += 1,
        }
        if self.cut_stream() {
            self.codec.refuse(refusal, &mut self.output);
        }
        self.closing = true;
    }

    /// Whether the connection should be closed once [`Self::output`] is empty.
    pub fn wants_close(&self) -> bool {
        self.closing
    }

    /// Whether more output comes without new input: a resync stream is being generated, or
    /// received requests wait for the output to drain. Call [`Self::handle_input`] with no
    /// bytes once the output has drained to continue.
    pub fn has_more_to_send(&self) -> bool {
        !self.closing && (self.stream.is_some() || self.parse_pending)
    }

    /// Whether the driver should read from the socket now. False while the connection closes,
    /// while a resync stream is generated, while received requests wait, and while the output
    /// holds half its cap or more: reading stops instead of the client being cut off, and its
    /// sends back up in its own socket (TCP flow control). Feed at most one read per call while
    /// this is true; bytes fed while it is false count against the request size cap.
    pub fn wants_input(&self) -> bool {
        !self.closing
            && self.stream.is_none()
            && !self.parse_pending
            && self.output_pending() < self.watermark()
    }

    /// Whether the client has sent nothing since the accept.
    pub fn is_silent(&self) -> bool {
        self.silent_deadline.is_some()
    }

    /// When the connection was accepted.
    pub fn accepted_at(&self) -> Instant {
        self.accepted
    }

    /// If the connection only waits on its client (nothing sent yet, idle between requests,
    /// or a request still arriving: no answer being written or generated, not closing), the
    /// last time it made progress (the accept, the last request completed, or output the
    /// client took); `None` while it is being answered or closes. A full endpoint evicts the
    /// connection with the earliest such time.
    pub fn waiting_since(&self) -> Option<Instant> {
        let busy = self.closing
            || self.stream.is_some()
            || self.parse_pending
            || self.output_pending() > 0;
        (!busy).then_some(self.last_progress)
    }

    /// What this connection did so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// What this connection's protocol counted so far.
    pub fn protocol_counters(&self) -> &C::Counters {
        self.codec.counters()
    }

    /// Bytes received and not yet answered.
    #[cfg(test)]
    pub(crate) fn buffered_input(&self) -> usize {
        self.input.len()
    }

    fn header_deadline(&self) -> Option<Instant> {
        // Requests waiting behind a stream or for the output to drain are not late: the
        // server (or the client's reading) is.
        if self.stream.is_some() || self.parse_pending {
            return None;
        }
        [
            self.request_started
                .and_then(|started| started.checked_add(self.header_timeout)),
            self.first_request_deadline,
            self.silent_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn output_pending(&self) -> usize {
        self.output.len() - self.output_start
    }

    /// Answers are generated while the unwritten output is under this.
    fn watermark(&self) -> usize {
        self.max_output_bytes / 2
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
        self.parse_pending = false;
        self.last_activity = now;
    }

    /// Answers rejected input and closes.
    fn reject(&mut self, now: Instant, reject: C::Reject) {
        self.counters.rejected += 1;
        self.write_reject(now, reject);
    }

    fn write_reject(&mut self, now: Instant, reject: C::Reject) {
        if self.cut_stream() {
            self.codec.reject(reject, &mut self.output);
        }
        self.close(now);
    }

    /// Ends the stream in progress, if any, before a refusal or a rejection; whether that
    /// answer may be written.
    fn cut_stream(&mut self) -> bool {
        match self.stream.take() {
            Some(_) => self.codec.interrupt_stream(&mut self.output),
            None => true,
        }
    }

    /// The client asks faster than it reads: drop what it did not read and close.
    fn overflow(&mut self) {
        self.counters.output_overflows += 1;
        self.discard_output();
        self.closing = true;
        self.stream = None;
    }

    fn answer(
        &mut self,
        now: Instant,
        request: C::Request,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        self.requests = self.requests.saturating_add(1);
        self.counters.requests += 1;
        let last = self.requests >= self.max_requests;
        let answer = self
            .codec
            .answer(request, source, metrics, last, &mut self.output);
        let close = answer.close || last;
        match answer.stream {
            Some(stream) => {
                self.stream = Some(stream);
                self.close_after_stream = close;
            }
            None if close => self.close(now),
            None => {}
        }
    }

    /// Adds frames of the current stream while the output is under the watermark.
    fn continue_stream(&mut self, now: Instant, source: &dyn ResyncSource) {
        let watermark = self.watermark();
        while let Some(stream) = self.stream {
            if self.output_pending() >= watermark {
                return;
            }
            if stream.next_seq > stream.last_seq {
                self.end_stream(
                    now,
                    &FrameRepr::End {
                        last_seq: stream.last_seq,
                    },
                );
                return;
            }
            let seq = stream.next_seq;
            let manifest = source.manifest(seq);
            let chunk = source.chunk(seq, stream.leaf);
            let error = match (manifest, chunk) {
                (Lookup::Found(manifest), Lookup::Found(chunk)) => {
                    let frames = [
                        FrameRepr::Manifest { seq, manifest },
                        FrameRepr::Chunk {
                            seq,
                            leaf: stream.leaf,
                            chunk,
                        },
                    ];
                    if self.codec.stream_frames(&frames, &mut self.output) {
                        self.counters.messages_served += 1;
                        match seq.checked_add(1) {
                            Some(next_seq) => {
                                self.stream = Some(ResyncStream { next_seq, ..stream });
                                continue;
                            }
                            // Nothing can follow the last sequence number.
                            None => {
                                self.end_stream(now, &FrameRepr::End { last_seq: seq });
                                return;
                            }
                        }
                    }
                    (ErrorCode::TooLarge, seq)
                }
                // The window moved past the stream while it was being sent.
                (Lookup::BeyondHistory { oldest }, _) | (_, Lookup::BeyondHistory { oldest }) => {
                    (ErrorCode::BeyondHistory, oldest)
                }
                (Lookup::NotYetSent { latest }, _) | (_, Lookup::NotYetSent { latest }) => {
                    (ErrorCode::NotYetSent, latest)
                }
                (Lookup::Found(_), Lookup::NotFound) => (ErrorCode::UnknownLeaf, seq),
                // A hole in the history (a relay's: a message it got by resync only, or from
                // before it started): the member cannot get past it here, but the next
                // endpoint may hold it.
                (Lookup::NotFound, _) => (ErrorCode::NotHeld, seq),
            };
            let (code, context_seq) = error;
            self.end_stream(now, &FrameRepr::Error { code, context_seq });
        }
    }

    /// Ends the current stream with `last` (an end or an error frame, which always fits).
    fn end_stream(&mut self, now: Instant, last: &FrameRepr<'_>) {
        let _ = self
            .codec
            .stream_frames(std::slice::from_ref(last), &mut self.output);
        self.codec.stream_end(&mut self.output);
        if matches!(last, FrameRepr::End { .. }) {
            self.counters.streams_completed += 1;
        }
        self.stream = None;
        if self.close_after_stream {
            self.close(now);
        }
    }
}

/// A connection of either protocol, for a listener that serves both with one driver.
pub trait AnyConnection: Send + Debug {
    /// [`Connection::handle_input_admitting`].
    fn handle_input_admitting(
        &mut self,
        now: Instant,
        bytes: &[u8],
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
        admit: &mut dyn FnMut() -> Result<(), Refusal>,
    );
    /// [`Connection::handle_end_of_input`].
    fn handle_end_of_input(&mut self, now: Instant);
    /// [`Connection::handle_timeout`].
    fn handle_timeout(&mut self, now: Instant);
    /// [`Connection::poll_timeout`].
    fn poll_timeout(&self) -> Option<Instant>;
    /// [`Connection::output`].
    fn output(&self) -> &[u8];
    /// [`Connection::consume_output`].
    fn consume_output(&mut self, n: usize);
    /// [`Connection::refuse`].
    fn refuse(&mut self, refusal: Refusal);
    /// [`Connection::wants_close`].
    fn wants_close(&self) -> bool;
    /// [`Connection::has_more_to_send`].
    fn has_more_to_send(&self) -> bool;
    /// [`Connection::wants_input`].
    fn wants_input(&self) -> bool;
    /// [`Connection::counters`].
    fn counters(&self) -> &Counters;
    /// [`Connection::is_silent`].
    fn is_silent(&self) -> bool;
    /// [`Connection::accepted_at`].
    fn accepted_at(&self) -> Instant;
    /// [`Connection::waiting_since`].
    fn waiting_since(&self) -> Option<Instant>;
}

impl<C: Codec + Send> AnyConnection for Connection<C> {
    fn handle_input_admitting(
        &mut self,
        now: Instant,
        bytes: &[u8],
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
        admit: &mut dyn FnMut() -> Result<(), Refusal>,
    ) {
        Connection::handle_input_admitting(self, now, bytes, source, metrics, admit);
    }
    fn handle_end_of_input(&mut self, now: Instant) {
        Connection::handle_end_of_input(self, now);
    }
    fn handle_timeout(&mut self, now: Instant) {
        Connection::handle_timeout(self, now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Connection::poll_timeout(self)
    }
    fn output(&self) -> &[u8] {
        Connection::output(self)
    }
    fn consume_output(&mut self, n: usize) {
        Connection::consume_output(self, n);
    }
    fn refuse(&mut self, refusal: Refusal) {
        Connection::refuse(self, refusal);
    }
    fn wants_close(&self) -> bool {
        Connection::wants_close(self)
    }
    fn has_more_to_send(&self) -> bool {
        Connection::has_more_to_send(self)
    }
    fn wants_input(&self) -> bool {
        Connection::wants_input(self)
    }
    fn counters(&self) -> &Counters {
        Connection::counters(self)
    }
    fn is_silent(&self) -> bool {
        Connection::is_silent(self)
    }
    fn accepted_at(&self) -> Instant {
        Connection::accepted_at(self)
    }
    fn waiting_since(&self) -> Option<Instant> {
        Connection::waiting_since(self)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::fuzz_support::parse_http_responses;
    use crate::resync::http::HttpCodec;
    use crate::resync::tcp::TcpCodec;
    use crate::resync::test_source::VecSource;

    const GROUP: u32 = 7;

    fn metrics() -> String {
        String::new()
    }

    fn frame(frame: &FrameRepr<'_>) -> Vec<u8> {
        let mut buf = Vec::new();
        assert!(super::super::tcp::emit(&mut buf, frame));
        buf
    }

    /// One request of each protocol, asking the state, and one asking a resync of every
    /// message (10..=14) for leaf 1.
    trait Requests: Codec + Send + 'static {
        fn state() -> Vec<u8>;
        fn resync() -> Vec<u8>;
        /// Splits the output into answers: (kind, body) per frame or per response.
        fn answers(output: &[u8]) -> Vec<String>;
    }

    impl Requests for TcpCodec {
        fn state() -> Vec<u8> {
            frame(&FrameRepr::StateRequest { group_id: GROUP })
        }
        fn resync() -> Vec<u8> {
            frame(&FrameRepr::ResyncRequest {
                group_id: GROUP,
                from_seq: 10,
                leaf: 1,
            })
        }
        fn answers(mut output: &[u8]) -> Vec<String> {
            let mut answers = Vec::new();
            while !output.is_empty() {
                let len = FrameRepr::peek_len(output).unwrap().unwrap();
                answers.push(match FrameRepr::parse(&output[..len]).unwrap() {
                    FrameRepr::Error { code, .. } => format!("error {code:?}"),
                    FrameRepr::State { .. } => "state".to_string(),
                    FrameRepr::Manifest { seq, .. } => format!("manifest {seq}"),
                    FrameRepr::Chunk { seq, .. } => format!("chunk {seq}"),
                    FrameRepr::End { last_seq } => format!("end {last_seq}"),
                    other => panic!("{other:?}"),
                });
                output = &output[len..];
            }
            answers
        }
    }

    impl Requests for HttpCodec {
        fn state() -> Vec<u8> {
            b"GET /v1/groups/7/state HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()
        }
        fn resync() -> Vec<u8> {
            b"GET /v1/groups/7/resync?from=10&leaf=1 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()
        }
        fn answers(output: &[u8]) -> Vec<String> {
            parse_http_responses(output)
                .unwrap()
                .into_iter()
                .map(|r| format!("{} {}", r.status, r.body.len()))
                .collect()
        }
    }

    struct Harness<C: Codec> {
        now: Instant,
        conn: Connection<C>,
        source: VecSource,
        admitted: usize,
        refuse_after: usize,
    }

    impl<C: Requests> Harness<C> {
        fn new(limits: Limits) -> Self {
            // Any instant will do as the origin: the time goes on only as the code advances it.
            #[allow(clippy::disallowed_methods)]
            let now = Instant::now();
            Self {
                now,
                conn: Connection::new(now, &limits),
                source: VecSource::new(GROUP, 10, 5, 4),
                admitted: 0,
                refuse_after: usize::MAX,
            }
        }

        fn send(&mut self, bytes: &[u8]) {
            let (admitted, refuse_after) = (&mut self.admitted, self.refuse_after);
            let mut admit = || {
                if *admitted >= refuse_after {
                    return Err(Refusal::RateLimited);
                }
                *admitted += 1;
                Ok(())
            };
            self.conn
                .handle_input_admitting(self.now, bytes, &self.source, &metrics, &mut admit);
        }

        /// Writes everything, continuing streams.
        fn take(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            loop {
                out.extend_from_slice(self.conn.output());
                let len = self.conn.output().len();
                self.conn.consume_output(len);
                if !self.conn.has_more_to_send() {
                    return out;
                }
                self.send(&[]);
            }
        }
    }

    fn a_refusal_is_answered_once_and_counted_once<C: Requests>() {
        let mut h = Harness::<C>::new(Limits::default());
        h.send(&C::state()[..3]);
        h.conn.refuse(Refusal::RateLimited);
        h.conn.refuse(Refusal::RateLimited);
        h.conn.refuse(Refusal::Overloaded);
        assert_eq!(C::answers(&h.take()).len(), 1);
        assert_eq!(h.conn.counters().rate_limited, 1);
        assert_eq!(h.conn.counters().overloaded, 0);
        assert!(h.conn.wants_close());
        // Nothing is read after it.
        h.send(&C::state());
        assert!(h.conn.output().is_empty());
    }

    #[test]
    fn a_refusal_is_answered_once_and_counted_once_in_both_protocols() {
        a_refusal_is_answered_once_and_counted_once::<TcpCodec>();
        a_refusal_is_answered_once_and_counted_once::<HttpCodec>();
    }

    fn the_header_deadline_runs_from_the_first_byte<C: Requests>(answer: Option<&str>) {
        let mut h = Harness::<C>::new(Limits::default());
        let request = C::state();
        h.send(&request[..2]);
        let deadline = h.now + Duration::from_secs(5);
        assert_eq!(h.conn.poll_timeout(), Some(deadline));
        // More bytes of the same request do not push the deadline.
        h.now += Duration::from_secs(4);
        h.send(&request[2..3]);
        assert_eq!(h.conn.poll_timeout(), Some(deadline));
        h.now = deadline;
        h.conn.handle_timeout(h.now);
        assert!(h.conn.wants_close());
        assert_eq!(h.conn.counters().header_timeouts, 1);
        let answers = C::answers(&h.take());
        assert_eq!(answers.first().map(String::as_str), answer);
        assert_eq!(h.conn.poll_timeout(), None);
    }

    #[test]
    fn the_header_deadline_runs_from_the_first_byte_in_both_protocols() {
        the_header_deadline_runs_from_the_first_byte::<TcpCodec>(None);
        the_header_deadline_runs_from_the_first_byte::<HttpCodec>(Some("408 16"));
    }

    fn a_pipelining_client_waits_for_its_answers<C: Requests>() {
        let mut h = Harness::<C>::new(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        for message in &mut h.source.messages {
            message.manifest = vec![1; 1000];
        }
        let pipelined: Vec<u8> = (0..10).flat_map(|_| C::state()).collect();
        h.send(&pipelined);
        assert!(!h.conn.wants_input());
        assert!(h.conn.has_more_to_send());
        assert!(h.conn.output().len() < 4096);
        // Waiting for the client to read is not a late request.
        assert_eq!(h.conn.poll_timeout(), Some(h.now + Duration::from_secs(30)));
        assert_eq!(C::answers(&h.take()).len(), 10);
        assert_eq!(h.conn.counters().requests, 10);
        assert_eq!(h.conn.counters().output_overflows, 0);
        assert!(h.conn.wants_input());
        // A client that never reads is closed by the idle timeout, dropping its answers.
        h.send(&pipelined);
        h.now += Duration::from_secs(30);
        h.conn.handle_timeout(h.now);
        assert!(h.conn.wants_close());
        assert!(h.conn.output().is_empty());
        assert_eq!(h.conn.counters().idle_timeouts, 1);
        // One answer over the output cap cuts the client off.
        let mut h = Harness::<C>::new(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        h.source.messages[4].manifest = vec![1; 5000];
        h.send(&C::state());
        assert!(h.conn.wants_close());
        assert!(h.conn.output().is_empty());
        assert_eq!(h.conn.counters().output_overflows, 1);
        // A resync stream is only generated up to half the cap, however long.
        let mut h = Harness::<C>::new(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        h.source = VecSource::new(GROUP, 10, 100, 2);
        h.send(&C::resync());
        assert!(h.conn.has_more_to_send());
        assert!(h.conn.output().len() < 4096);
        assert_eq!(h.conn.poll_timeout(), Some(h.now + Duration::from_secs(30)));
        h.take();
        assert_eq!(h.conn.counters().messages_served, 100);
        assert_eq!(h.conn.counters().streams_completed, 1);
        assert_eq!(h.conn.counters().output_overflows, 0);
    }

    #[test]
    fn a_pipelining_client_waits_for_its_answers_in_both_protocols() {
        a_pipelining_client_waits_for_its_answers::<TcpCodec>();
        a_pipelining_client_waits_for_its_answers::<HttpCodec>();
    }

    fn every_pipelined_request_is_charged<C: Requests>() {
        let mut h = Harness::<C>::new(Limits::default());
        h.refuse_after = 3;
        let pipelined: Vec<u8> = (0..10).flat_map(|_| C::state()).collect();
        h.send(&pipelined);
        let answers = C::answers(&h.take());
        // Three answered, the fourth refused, and nothing after.
        assert_eq!(answers.len(), 4, "{answers:?}");
        assert_eq!(h.admitted, 3);
        assert_eq!(h.conn.counters().requests, 3);
        assert_eq!(h.conn.counters().rate_limited, 1);
        assert!(h.conn.wants_close());
    }

    #[test]
    fn every_pipelined_request_is_charged_in_both_protocols() {
        every_pipelined_request_is_charged::<TcpCodec>();
        every_pipelined_request_is_charged::<HttpCodec>();
    }

    fn end_of_input_answers_what_was_asked<C: Requests>() {
        // A request, then the client shuts its side at once.
        let mut h = Harness::<C>::new(Limits::default());
        h.send(&C::state());
        h.conn.handle_end_of_input(h.now);
        assert!(h.conn.wants_close());
        assert_eq!(C::answers(&h.take()).len(), 1);
        // A resync stream is sent to its end first.
        let mut h = Harness::<C>::new(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        h.source = VecSource::new(GROUP, 10, 100, 2);
        h.send(&[C::resync(), C::state()].concat());
        h.send(&C::state()[..3]);
        h.conn.handle_end_of_input(h.now);
        assert!(!h.conn.wants_close());
        let answers = C::answers(&h.take());
        assert!(h.conn.wants_close());
        assert_eq!(h.conn.counters().streams_completed, 1);
        // The state request pipelined behind the stream is answered too; the partial one
        // after it is not.
        assert_eq!(h.conn.counters().requests, 2);
        assert!(answers.len() >= 2, "{answers:?}");
        // A partial request is dropped.
        let mut h = Harness::<C>::new(Limits::default());
        h.send(&C::state()[..3]);
        h.conn.handle_end_of_input(h.now);
        assert!(h.conn.wants_close());
        assert!(h.take().is_empty());
    }

    #[test]
    fn end_of_input_answers_what_was_asked_in_both_protocols() {
        end_of_input_answers_what_was_asked::<TcpCodec>();
        end_of_input_answers_what_was_asked::<HttpCodec>();
    }

    fn a_connection_earns_its_slot<C: Requests>(answer: Option<&str>) {
        let limits = Limits {
            silent_timeout: Duration::from_secs(1),
            header_timeout: Duration::from_secs(3),
            ..Limits::default()
        };
        // Silent: closed without a word at the silent timeout, not the idle timeout.
        let mut h = Harness::<C>::new(limits.clone());
        let accepted = h.now;
        assert!(h.conn.is_silent());
        assert_eq!(h.conn.waiting_since(), Some(accepted));
        assert_eq!(
            h.conn.poll_timeout(),
            Some(accepted + Duration::from_secs(1))
        );
        h.now += Duration::from_secs(1);
        h.conn.handle_timeout(h.now);
        assert!(h.conn.wants_close());
        assert!(h.take().is_empty());
        assert_eq!(h.conn.counters().silent_timeouts, 1);
        assert_eq!(h.conn.counters().header_timeouts, 0);
        assert_eq!(h.conn.waiting_since(), None);
        // A first byte late in the silent window: the first request is still due by the
        // header timeout from the accept, not from that byte.
        let mut h = Harness::<C>::new(limits.clone());
        h.now += Duration::from_millis(900);
        h.send(&C::state()[..2]);
        assert!(!h.conn.is_silent());
        assert_eq!(h.conn.poll_timeout(), Some(accepted_plus(&h, 3)));
        assert_eq!(h.conn.waiting_since(), Some(h.conn.accepted_at()));
        h.now = accepted_plus(&h, 3);
        h.conn.handle_timeout(h.now);
        assert!(h.conn.wants_close());
        assert_eq!(h.conn.counters().header_timeouts, 1);
        let answers = C::answers(&h.take());
        assert_eq!(answers.first().map(String::as_str), answer);
        // A whole first request: then only the idle timeout runs, and the connection ranks
        // by its last request.
        let mut h = Harness::<C>::new(limits);
        h.now += Duration::from_millis(500);
        h.send(&C::state());
        assert_eq!(h.conn.waiting_since(), None, "being answered");
        h.take();
        assert_eq!(h.conn.waiting_since(), Some(h.now));
        assert_eq!(h.conn.poll_timeout(), Some(h.now + Duration::from_secs(30)));
        // A long stream is not evictable while it is generated.
        h.source = VecSource::new(GROUP, 10, 100, 2);
        h.conn = Connection::new(
            h.now,
            &Limits {
                max_output_bytes: 4096,
                ..Limits::default()
            },
        );
        h.send(&C::resync());
        assert!(h.conn.has_more_to_send());
        assert_eq!(h.conn.waiting_since(), None);
    }

    fn accepted_plus<C: Requests>(h: &Harness<C>, secs: u64) -> Instant {
        h.conn.accepted_at() + Duration::from_secs(secs)
    }

    #[test]
    fn a_connection_earns_its_slot_in_both_protocols() {
        a_connection_earns_its_slot::<TcpCodec>(None);
        a_connection_earns_its_slot::<HttpCodec>(Some("408 16"));
    }

    #[test]
    fn requests_piled_behind_a_stream_past_the_cap_end_it_cleanly() {
        // TCP: the stream's frames, then TooLarge.
        let limits = Limits {
            max_output_bytes: 4096,
            max_request_bytes: 256,
            ..Limits::default()
        };
        let mut h = Harness::<TcpCodec>::new(limits.clone());
        h.source = VecSource::new(GROUP, 10, 100, 2);
        h.send(&TcpCodec::resync());
        let piled: Vec<u8> = (0..40).flat_map(|_| TcpCodec::state()).collect();
        h.send(&piled);
        let answers = TcpCodec::answers(&h.take());
        assert_eq!(answers.last().map(String::as_str), Some("error TooLarge"));
        assert!(h.conn.wants_close());
        // HTTP: the chunked body is ended, and no response follows inside it.
        let mut h = Harness::<HttpCodec>::new(limits);
        h.source = VecSource::new(GROUP, 10, 100, 2);
        h.send(&HttpCodec::resync());
        let piled: Vec<u8> = (0..20).flat_map(|_| HttpCodec::state()).collect();
        h.send(&piled);
        let responses = parse_http_responses(&h.take()).unwrap();
        assert_eq!(responses.len(), 1);
        assert_eq!(responses[0].status, 200);
        assert!(h.conn.wants_close());
    }
}
