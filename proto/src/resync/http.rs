//! The HTTP/1.1 resync endpoint, sans-IO: bytes in, bytes out, time as an argument.
//!
//! Routes (GET; HEAD answers the same headers without the body):
//!
//! | path                                           | 200 body                         |
//! |------------------------------------------------|----------------------------------|
//! | `/v1/groups/{group}/state`                     | the latest signed manifest       |
//! | `/v1/groups/{group}/rekeys/{seq}/manifest`     | the signed manifest of `seq`     |
//! | `/v1/groups/{group}/rekeys/{seq}/chunks/{leaf}`| the chunk of `seq` for leaf order key `leaf` |
//! | `/metrics`                                     | Prometheus text exposition       |
//! | `/healthz`                                     | `ok`                             |
//!
//! Status codes mean what they say: 400 for a request that does not parse (bad syntax closes
//! the connection; a number that does not parse does not), 404 for an unknown path, another
//! group, a sequence number not yet sent or a leaf no chunk serves, 405 (with `Allow`) for any
//! other method, 408 when a started request does not arrive whole within the header timeout,
//! 410 beyond the history window (the member must re-register), 421 for a message inside the
//! window that this endpoint does not hold (a hole in a relay's history: ask the next
//! endpoint), 413 for a request with a body,
//! 431 for a request line and headers over the size cap or too many headers, 429 and 503 when
//! the listener refuses ([`HttpConnection::refuse`]). Every response carries
//! `Content-Length`; connections are kept alive (HTTP/1.1) unless the client sends
//! `Connection: close` or speaks HTTP/1.0, and pipelined requests are answered in order.
//!
//! What is served is already signed and encrypted (DESIGN.md, security rules): nothing here
//! authenticates, and nothing here may panic on any input.
//!
//! # Calling order
//!
//! For each connection: [`HttpConnection::new`] at accept; [`HttpConnection::handle_input`]
//! with each read; write [`HttpConnection::output`] and report what the socket took with
//! [`HttpConnection::consume_output`]; at [`HttpConnection::poll_timeout`] call
//! [`HttpConnection::handle_timeout`]; close once [`HttpConnection::wants_close`] and the
//! output is empty.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::limits::Limits;
pub use super::limits::Refusal;
use super::{Lookup, ResyncSource};

/// The `Content-Type` of `/metrics` (Prometheus text exposition format 0.0.4).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The header that carries the latest sequence number sent.
pub const LATEST_SEQ_HEADER: &str = "X-Rekeycast-Latest-Seq";
/// The header that carries the oldest sequence number held.
pub const OLDEST_SEQ_HEADER: &str = "X-Rekeycast-Oldest-Seq";

const OCTET_STREAM: &str = "application/octet-stream";
const TEXT: &str = "text/plain; charset=utf-8";
/// Output already written is dropped from the front of the buffer past this many bytes.
const COMPACT_AFTER: usize = 64 * 1024;

/// Requests answered so far, by status class, and why connections were cut (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpCounters {
    /// Responses with a 2xx status.
    pub success: u64,
    /// Responses with a 4xx status (including 408 and 429).
    pub client_error: u64,
    /// Responses with a 5xx status (including 503).
    pub server_error: u64,
    /// 408 responses: a started request did not arrive whole in time.
    pub header_timeouts: u64,
    /// 429 responses.
    pub rate_limited: u64,
    /// 503 responses.
    pub overloaded: u64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: u64,
    /// Connections closed because their client did not read its responses.
    pub output_overflows: u64,
}

/// One HTTP/1.1 connection of the resync endpoint.
#[derive(Debug)]
pub struct HttpConnection {
    max_request_bytes: usize,
    max_headers: usize,
    header_timeout: Duration,
    idle_timeout: Duration,
    max_requests: u32,
    max_output_bytes: usize,
    /// Received bytes not yet part of an answered request (at most one partial request).
    input: Vec<u8>,
    /// When the first byte of the partial request in `input` arrived.
    request_started: Option<Instant>,
    /// Responses; `output[output_start..]` is still to be written.
    output: Vec<u8>,
    output_start: usize,
    /// The last input or output progress (or the decision to close).
    last_activity: Instant,
    /// No further request is read; close once the output is written.
    closing: bool,
    requests: u32,
    counters: HttpCounters,
}

/// A response to write.
struct Reply<'a> {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Cow<'a, [u8]>,
}

impl<'a> Reply<'a> {
    fn new(status: u16, content_type: &'static str, body: impl Into<Cow<'a, [u8]>>) -> Self {
        Self {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A short text error.
    fn error(status: u16) -> Self {
        let text: &'static str = match status {
            400 => "bad request\n",
            404 => "not found\n",
            405 => "method not allowed\n",
            408 => "request timeout\n",
            410 => "beyond the history window: re-register\n",
            421 => "not held here: ask another endpoint\n",
            413 => "request bodies are not accepted\n",
            429 => "rate limited\n",
            431 => "request header fields too large\n",
            503 => "overloaded\n",
            _ => "error\n",
        };
        Self::new(status, TEXT, text.as_bytes())
    }

    fn header(mut self, name: &'static str, value: impl ToString) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }
}

/// What the head of a complete request says, once it is known to be well-formed.
struct RequestHead<'b> {
    head_only: bool,
    method_allowed: bool,
    path: &'b str,
    close: bool,
    has_body: bool,
}

enum Parsed<'b> {
    Complete(usize, RequestHead<'b>),
    Partial,
    /// A request that cannot be answered in kind: answer with this status and close.
    Reject(u16),
}

impl HttpConnection {
    /// A connection accepted at `now`.
    pub fn new(now: Instant, limits: &Limits) -> Self {
        Self {
            max_request_bytes: limits.max_request_bytes,
            max_headers: limits.max_headers.max(1),
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            max_requests: limits.max_requests_per_connection.max(1),
            max_output_bytes: limits.max_output_bytes,
            input: Vec::new(),
            request_started: None,
            output: Vec::new(),
            output_start: 0,
            last_activity: now,
            closing: false,
            requests: 0,
            counters: HttpCounters::default(),
        }
    }

    /// Bytes read from the socket. Parses every complete request in the buffer and appends
    /// each response to the output, in order. Bytes received after the connection decided to
    /// close are ignored.
    pub fn handle_input(
        &mut self,
        now: Instant,
        bytes: &[u8],
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        if self.closing || bytes.is_empty() {
            return;
        }
        self.last_activity = now;
        let mut started = match self.request_started {
            Some(started) if !self.input.is_empty() => started,
            _ => now,
        };
        // A request head can only complete at a line feed: without one in the new bytes, a
        // partial request is not parsed again, so a client that sends one byte at a time
        // costs no more than one parse per line (and lines are capped by max_headers).
        let parse_again = self.input.is_empty() || bytes.contains(&b'\n');
        let mut input = std::mem::take(&mut self.input);
        input.extend_from_slice(bytes);
        if !parse_again && input.len() >= self.max_request_bytes {
            self.reject(now, 431);
        }
        let mut pos = 0;
        while parse_again && !self.closing && pos < input.len() {
            let window_end = input.len().min(pos + self.max_request_bytes);
            match parse(&input[pos..window_end], self.max_headers) {
                Parsed::Complete(len, head) => {
                    pos += len;
                    started = now;
                    self.answer(now, &head, source, metrics);
                }
                Parsed::Partial => {
                    if window_end - pos >= self.max_request_bytes {
                        self.reject(now, 431);
                    }
                    break;
                }
                Parsed::Reject(status) => self.reject(now, status),
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
            self.request_started = (!input.is_empty()).then_some(started);
        }
        self.input = input;
    }

    /// Handles the deadline of [`Self::poll_timeout`]: a request started and not complete
    /// within the header timeout is answered 408 and the connection closes; a connection
    /// without traffic for the idle timeout closes (dropping output its client did not read).
    pub fn handle_timeout(&mut self, now: Instant) {
        let idle_deadline = self.last_activity.checked_add(self.idle_timeout);
        if self.closing {
            if idle_deadline.is_some_and(|deadline| now >= deadline) {
                self.discard_output();
            }
            return;
        }
        let header_deadline = self
            .request_started
            .and_then(|started| started.checked_add(self.header_timeout));
        if header_deadline.is_some_and(|deadline| now >= deadline) {
            self.counters.header_timeouts += 1;
            self.input.clear();
            self.request_started = None;
            self.reject(now, 408);
        } else if idle_deadline.is_some_and(|deadline| now >= deadline) {
            self.counters.idle_timeouts += 1;
            self.closing = true;
            self.input.clear();
            self.request_started = None;
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
        let header_deadline = self
            .request_started
            .and_then(|started| started.checked_add(self.header_timeout));
        match (header_deadline, idle_deadline) {
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
        self.output_start += n;
        if self.output_start >= self.output.len() {
            self.output.clear();
            self.output_start = 0;
        } else if self.output_start >= COMPACT_AFTER {
            self.output.drain(..self.output_start);
            self.output_start = 0;
        }
    }

    /// Answers the current request(s) with 429 ([`Refusal::RateLimited`]) or 503
    /// ([`Refusal::Overloaded`]) and closes: buffered input is dropped, responses already in
    /// the output are still written.
    pub fn refuse(&mut self, status: Refusal) {
        if self.closing {
            return;
        }
        self.input.clear();
        self.request_started = None;
        let reply = match status {
            Refusal::RateLimited => {
                self.counters.rate_limited += 1;
                Reply::error(429)
            }
            Refusal::Overloaded => {
                self.counters.overloaded += 1;
                Reply::error(503)
            }
        };
        self.write(reply.header("Retry-After", 1), false, true);
        self.closing = true;
    }

    /// Whether the connection should be closed once [`Self::output`] is empty.
    pub fn wants_close(&self) -> bool {
        self.closing
    }

    /// Requests answered so far, by status class.
    pub fn counters(&self) -> &HttpCounters {
        &self.counters
    }

    fn output_pending(&self) -> usize {
        self.output.len() - self.output_start
    }

    fn discard_output(&mut self) {
        self.output.clear();
        self.output_start = 0;
    }

    /// The client asks faster than it reads: drop what it did not read and close.
    fn overflow(&mut self) {
        self.counters.output_overflows += 1;
        self.discard_output();
        self.closing = true;
    }

    /// Answers with an error status and closes.
    fn reject(&mut self, now: Instant, status: u16) {
        self.write(Reply::error(status), false, true);
        self.closing = true;
        self.last_activity = now;
    }

    fn answer(
        &mut self,
        now: Instant,
        head: &RequestHead<'_>,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        self.requests = self.requests.saturating_add(1);
        let close = head.close || head.has_body || self.requests >= self.max_requests;
        let reply = if !head.method_allowed {
            Reply::error(405).header("Allow", "GET, HEAD")
        } else if head.has_body {
            Reply::error(413)
        } else {
            route(head.path, source, metrics)
        };
        self.write(reply, head.head_only, close);
        if close {
            self.closing = true;
            self.last_activity = now;
        }
    }

    fn write(&mut self, reply: Reply<'_>, head_only: bool, close: bool) {
        match reply.status {
            200..=299 => self.counters.success += 1,
            400..=499 => self.counters.client_error += 1,
            _ => self.counters.server_error += 1,
        }
        let mut head = String::with_capacity(192);
        // Writing into a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            reply.status,
            reason(reply.status),
            reply.content_type,
            reply.body.len()
        );
        for (name, value) in &reply.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        if self.output_start > 0 && self.output_start == self.output.len() {
            self.discard_output();
        }
        self.output.extend_from_slice(head.as_bytes());
        if !head_only {
            self.output.extend_from_slice(&reply.body);
        }
    }
}

/// Parses the request at the start of `window` (at most the request size cap).
fn parse(window: &[u8], max_headers: usize) -> Parsed<'_> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Reject(431),
        Err(_) => return Parsed::Reject(400),
    };
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version)
    else {
        return Parsed::Reject(400);
    };
    let mut close = version == 0;
    let mut has_body = false;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("connection") {
            let value = String::from_utf8_lossy(header.value);
            if value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
            {
                close = true;
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(header.value)
                .ok()
                .and_then(|value| decimal::<u64>(value.trim()))
            {
                Some(0) => {}
                Some(_) => has_body = true,
                None => return Parsed::Reject(400),
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        }
    }
    Parsed::Complete(
        len,
        RequestHead {
            head_only: method == "HEAD",
            method_allowed: method == "GET" || method == "HEAD",
            path,
            close,
            has_body,
        },
    )
}

/// The reply to a GET of `path`.
fn route<'s>(path: &str, source: &'s dyn ResyncSource, metrics: &dyn Fn() -> String) -> Reply<'s> {
    let path = path.split_once('?').map_or(path, |(path, _query)| path);
    let Some(path) = path.strip_prefix('/') else {
        return Reply::error(400);
    };
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["healthz"] => Reply::new(200, TEXT, b"ok".as_slice()),
        ["metrics"] => Reply::new(200, METRICS_CONTENT_TYPE, metrics().into_bytes()),
        ["v1", "groups", group, "state"] => {
            let Some(group) = decimal::<u32>(group) else {
                return Reply::error(400);
            };
            if group != source.group_id() {
                return Reply::error(404);
            }
            match source.latest() {
                Some((latest, manifest)) => Reply::new(200, OCTET_STREAM, manifest)
                    .header(LATEST_SEQ_HEADER, latest)
                    .header(OLDEST_SEQ_HEADER, source.oldest().unwrap_or(latest)),
                None => Reply::error(404),
            }
        }
        ["v1", "groups", group, "rekeys", seq, "manifest"] => {
            let (Some(group), Some(seq)) = (decimal::<u32>(group), decimal::<u64>(seq)) else {
                return Reply::error(400);
            };
            if group != source.group_id() {
                return Reply::error(404);
            }
            match source.manifest(seq) {
                // A hole in the history (a relay's): the message exists, elsewhere.
                Lookup::NotFound => Reply::error(421),
                lookup => lookup_reply(lookup),
            }
        }
        ["v1", "groups", group, "rekeys", seq, "chunks", leaf] => {
            let (Some(group), Some(seq), Some(leaf)) = (
                decimal::<u32>(group),
                decimal::<u64>(seq),
                decimal::<u32>(leaf),
            ) else {
                return Reply::error(400);
            };
            if group != source.group_id() {
                return Reply::error(404);
            }
            lookup_reply(source.chunk(seq, leaf))
        }
        _ => Reply::error(404),
    }
}

fn lookup_reply(lookup: Lookup<&[u8]>) -> Reply<'_> {
    match lookup {
        Lookup::Found(bytes) => Reply::new(200, OCTET_STREAM, bytes),
        Lookup::BeyondHistory { oldest } => Reply::error(410).header(OLDEST_SEQ_HEADER, oldest),
        Lookup::NotYetSent { latest } => Reply::error(404).header(LATEST_SEQ_HEADER, latest),
        Lookup::NotFound => Reply::error(404),
    }
}

/// A decimal number of ASCII digits only (no sign, no spaces), within the type's range.
fn decimal<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        421 => "Misdirected Request",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz_support::{parse_http_responses, HttpResponse};
    use crate::resync::test_source::VecSource;

    const GROUP: u32 = 7;

    /// Messages 10..=14 of group 7, four leaves each.
    fn source() -> VecSource {
        VecSource::new(GROUP, 10, 5, 4)
    }

    fn metrics() -> String {
        "# TYPE rekeycast_test counter\nrekeycast_test 3\n".to_string()
    }

    struct Harness {
        now: Instant,
        conn: HttpConnection,
        source: VecSource,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_limits(Limits::default())
        }

        fn with_limits(limits: Limits) -> Self {
            // Any instant will do as the origin: the time goes on only as the code advances it.
            #[allow(clippy::disallowed_methods)]
            let now = Instant::now();
            Self {
                now,
                conn: HttpConnection::new(now, &limits),
                source: source(),
            }
        }

        fn send(&mut self, bytes: &[u8]) {
            self.conn
                .handle_input(self.now, bytes, &self.source, &metrics);
        }

        /// Everything written so far, parsed.
        fn take(&mut self) -> Vec<HttpResponse> {
            let out = self.conn.output().to_vec();
            self.conn.consume_output(out.len());
            parse_http_responses(&out).unwrap()
        }

        fn get(&mut self, path: &str) -> HttpResponse {
            self.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
            let mut responses = self.take();
            assert_eq!(responses.len(), 1, "{path}");
            responses.remove(0)
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            if self.conn.poll_timeout().is_some_and(|at| at <= self.now) {
                self.conn.handle_timeout(self.now);
            }
        }
    }

    #[test]
    fn state_serves_the_latest_manifest() {
        let mut h = Harness::new();
        let r = h.get("/v1/groups/7/state");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"manifest-14");
        assert_eq!(r.header("content-type"), Some(OCTET_STREAM));
        assert_eq!(r.header("x-rekeycast-latest-seq"), Some("14"));
        assert_eq!(r.header("x-rekeycast-oldest-seq"), Some("10"));
        assert_eq!(r.header("content-length"), Some("11"));
        assert!(!h.conn.wants_close());
    }

    #[test]
    fn state_without_any_message_is_404() {
        let mut h = Harness::new();
        h.source = VecSource::new(GROUP, 1, 0, 1);
        assert_eq!(h.get("/v1/groups/7/state").status, 404);
    }

    #[test]
    fn manifest_and_chunk_routes() {
        let mut h = Harness::new();
        let r = h.get("/v1/groups/7/rekeys/12/manifest");
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, b"manifest-12".as_slice())
        );
        let r = h.get("/v1/groups/7/rekeys/12/chunks/3");
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, b"chunk-12-3".as_slice())
        );
        // A query string is ignored.
        assert_eq!(h.get("/v1/groups/7/rekeys/10/manifest?x=1").status, 200);
        // Leaf 4 has no chunk.
        assert_eq!(h.get("/v1/groups/7/rekeys/12/chunks/4").status, 404);
        assert_eq!(h.conn.counters().success, 3);
        assert_eq!(h.conn.counters().client_error, 1);
    }

    #[test]
    fn beyond_history_is_410_with_the_oldest() {
        let mut h = Harness::new();
        for path in [
            "/v1/groups/7/rekeys/9/manifest",
            "/v1/groups/7/rekeys/3/chunks/0",
        ] {
            let r = h.get(path);
            assert_eq!(r.status, 410, "{path}");
            assert_eq!(r.header("x-rekeycast-oldest-seq"), Some("10"));
        }
        assert!(!h.conn.wants_close());
    }

    #[test]
    fn not_yet_sent_is_404_with_the_latest() {
        let mut h = Harness::new();
        for path in [
            "/v1/groups/7/rekeys/15/manifest",
            "/v1/groups/7/rekeys/99/chunks/0",
        ] {
            let r = h.get(path);
            assert_eq!(r.status, 404, "{path}");
            assert_eq!(r.header("x-rekeycast-latest-seq"), Some("14"));
        }
    }

    #[test]
    fn a_hole_in_the_history_is_421() {
        // A relay's history: message 12 came to it by resync only.
        let mut h = Harness::new();
        h.source.messages.remove(2);
        assert_eq!(h.get("/v1/groups/7/rekeys/12/manifest").status, 421);
        assert_eq!(h.get("/v1/groups/7/rekeys/11/manifest").status, 200);
        assert_eq!(h.get("/v1/groups/7/rekeys/13/manifest").status, 200);
    }

    #[test]
    fn wrong_group_and_unknown_paths_are_404() {
        let mut h = Harness::new();
        for path in [
            "/v1/groups/8/state",
            "/v1/groups/8/rekeys/12/manifest",
            "/v1/groups/8/rekeys/12/chunks/0",
            "/",
            "/v1/groups/7",
            "/v1/groups/7/rekeys/12",
            "/v1/groups/7/state/",
            "/healthz/x",
        ] {
            assert_eq!(h.get(path).status, 404, "{path}");
        }
        assert!(!h.conn.wants_close());
    }

    #[test]
    fn numbers_that_do_not_parse_are_400_and_keep_alive() {
        let mut h = Harness::new();
        for path in [
            "/v1/groups/x/state",
            "/v1/groups/+7/state",
            "/v1/groups/4294967296/state",
            "/v1/groups/7/rekeys/-1/manifest",
            "/v1/groups/7/rekeys/18446744073709551616/manifest",
            "/v1/groups/7/rekeys/12/chunks/",
            "/v1/groups/7/rekeys/12/chunks/0x1",
            "*",
        ] {
            assert_eq!(h.get(path).status, 400, "{path}");
        }
        assert!(!h.conn.wants_close());
    }

    #[test]
    fn metrics_and_healthz() {
        let mut h = Harness::new();
        let r = h.get("/metrics");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(METRICS_CONTENT_TYPE));
        assert_eq!(r.body, metrics().as_bytes());
        let r = h.get("/healthz");
        assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()));
    }

    #[test]
    fn head_has_the_headers_without_the_body() {
        let mut h = Harness::new();
        h.send(b"HEAD /v1/groups/7/state HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n");
        let out = h.conn.output().to_vec();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 11\r\n"), "{text}");
        assert!(!text.contains("manifest-14"), "{text}");
        assert!(text.ends_with("\r\n\r\nok"), "{text}");
    }

    #[test]
    fn other_methods_are_405_with_allow() {
        let mut h = Harness::new();
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "BREW"] {
            h.send(format!("{method} /healthz HTTP/1.1\r\n\r\n").as_bytes());
            let r = h.take().remove(0);
            assert_eq!(r.status, 405, "{method}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"));
        }
        assert!(!h.conn.wants_close());
        // With a body the connection cannot continue: 405 and close.
        h.send(b"POST /healthz HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(h.take()[0].status, 405);
        assert!(h.conn.wants_close());
    }

    #[test]
    fn two_pipelined_requests_in_one_read_are_answered_in_order() {
        let mut h = Harness::new();
        h.send(
            b"GET /v1/groups/7/rekeys/11/manifest HTTP/1.1\r\nHost: a\r\n\r\n\
              GET /v1/groups/7/rekeys/11/chunks/2 HTTP/1.1\r\nHost: a\r\n\r\nGET /heal",
        );
        let responses = h.take();
        assert_eq!(responses.len(), 2);
        assert_eq!(responses[0].body, b"manifest-11");
        assert_eq!(responses[1].body, b"chunk-11-2");
        // The third request completes with the next read.
        h.send(b"thz HTTP/1.1\r\n\r\n");
        assert_eq!(h.take()[0].body, b"ok");
        assert!(!h.conn.wants_close());
    }

    #[test]
    fn a_request_split_into_single_bytes() {
        let mut h = Harness::new();
        let request =
            b"GET /v1/groups/7/rekeys/13/chunks/1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n";
        for byte in request.chunks(1) {
            assert!(h.conn.output().is_empty());
            h.now += Duration::from_millis(10);
            h.send(byte);
        }
        let r = h.take().remove(0);
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, b"chunk-13-1".as_slice())
        );
    }

    #[test]
    fn header_timeout_answers_408_and_closes() {
        let mut h = Harness::new();
        h.send(b"GET /healthz HTTP/1.1\r\nHost");
        let deadline = h.conn.poll_timeout().unwrap();
        assert_eq!(deadline, h.now + Duration::from_secs(5));
        // Slowloris: more bytes of the same request do not push the deadline.
        h.advance(Duration::from_secs(4));
        h.send(b": a\r\n");
        assert_eq!(h.conn.poll_timeout(), Some(deadline));
        h.advance(Duration::from_secs(1));
        let r = h.take().remove(0);
        assert_eq!(r.status, 408);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(h.conn.wants_close());
        assert_eq!(h.conn.counters().header_timeouts, 1);
        assert_eq!(h.conn.poll_timeout(), None);
    }

    #[test]
    fn idle_timeout_closes_silently() {
        let mut h = Harness::new();
        assert_eq!(h.conn.poll_timeout(), Some(h.now + Duration::from_secs(30)));
        h.get("/healthz");
        h.advance(Duration::from_secs(29));
        assert!(!h.conn.wants_close());
        h.advance(Duration::from_secs(1));
        assert!(h.conn.wants_close());
        assert!(h.conn.output().is_empty());
        assert_eq!(h.conn.counters().idle_timeouts, 1);
        // Nothing is read after the close.
        h.send(b"GET /healthz HTTP/1.1\r\n\r\n");
        assert!(h.conn.output().is_empty());
    }

    #[test]
    fn oversized_headers_are_431() {
        let mut h = Harness::new();
        let big = format!(
            "GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(9000)
        );
        h.send(big.as_bytes());
        let r = h.take().remove(0);
        assert_eq!(r.status, 431);
        assert!(h.conn.wants_close());
        // Also when the oversized head arrives in pieces, with no end in sight.
        let mut h = Harness::new();
        h.send(b"GET /healthz HTTP/1.1\r\n");
        for _ in 0..150 {
            h.send(b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(h.take()[0].status, 431);
        assert!(h.conn.input.is_empty());
        // And when a request line never ends.
        let mut h = Harness::new();
        h.send(b"GET /");
        for _ in 0..100 {
            h.send(&[b'a'; 100]);
        }
        assert_eq!(h.take()[0].status, 431);
        assert!(h.conn.wants_close());
    }

    #[test]
    fn too_many_headers_are_431() {
        let mut h = Harness::new();
        let mut request = String::from("GET /healthz HTTP/1.1\r\n");
        for i in 0..33 {
            request.push_str(&format!("X-H{i}: v\r\n"));
        }
        request.push_str("\r\n");
        h.send(request.as_bytes());
        assert_eq!(h.take()[0].status, 431);
        assert!(h.conn.wants_close());
        // 32 are fine.
        let mut h = Harness::new();
        let mut request = String::from("GET /healthz HTTP/1.1\r\n");
        for i in 0..32 {
            request.push_str(&format!("X-H{i}: v\r\n"));
        }
        request.push_str("\r\n");
        h.send(request.as_bytes());
        assert_eq!(h.take()[0].status, 200);
    }

    #[test]
    fn a_body_is_413_and_closes() {
        for extra in ["Content-Length: 5", "Transfer-Encoding: chunked"] {
            let mut h = Harness::new();
            h.send(format!("GET /healthz HTTP/1.1\r\n{extra}\r\n\r\nhello").as_bytes());
            let responses = h.take();
            assert_eq!(responses.len(), 1, "{extra}");
            assert_eq!(responses[0].status, 413, "{extra}");
            assert!(h.conn.wants_close());
        }
        // Content-Length: 0 is no body.
        let mut h = Harness::new();
        h.send(b"GET /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.take()[0].status, 200);
        // An unparsable length is 400.
        h.send(b"GET /healthz HTTP/1.1\r\nContent-Length: x\r\n\r\n");
        assert_eq!(h.take()[0].status, 400);
        assert!(h.conn.wants_close());
    }

    #[test]
    fn bad_syntax_is_400_and_closes() {
        for garbage in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /healthz HTTP/9.9\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n",
            b"\x00\x01\x02\x03\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            let mut h = Harness::new();
            h.send(garbage);
            let responses = h.take();
            assert_eq!(responses.len(), 1, "{garbage:?}");
            assert_eq!(responses[0].status, 400, "{garbage:?}");
            assert!(h.conn.wants_close());
        }
    }

    #[test]
    fn connection_close_and_http_1_0_close_after_the_response() {
        let mut h = Harness::new();
        h.send(b"GET /healthz HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n");
        let responses = h.take();
        assert_eq!(responses.len(), 1);
        assert_eq!(responses[0].header("connection"), Some("close"));
        assert!(h.conn.wants_close());
        let mut h = Harness::new();
        h.send(b"GET /healthz HTTP/1.0\r\n\r\n");
        let r = h.take().remove(0);
        assert_eq!(r.status, 200);
        assert!(h.conn.wants_close());
        assert_eq!(h.conn.poll_timeout(), None);
    }

    #[test]
    fn refusals_are_429_and_503_and_close() {
        for (refusal, status) in [(Refusal::RateLimited, 429), (Refusal::Overloaded, 503)] {
            let mut h = Harness::new();
            h.send(b"GET /heal");
            h.conn.refuse(refusal);
            let r = h.take().remove(0);
            assert_eq!(r.status, status);
            assert_eq!(r.header("retry-after"), Some("1"));
            assert!(h.conn.wants_close());
            // A second refusal adds nothing.
            h.conn.refuse(refusal);
            assert!(h.conn.output().is_empty());
        }
    }

    #[test]
    fn max_requests_per_connection_closes_after_the_last() {
        let mut h = Harness::with_limits(Limits {
            max_requests_per_connection: 2,
            ..Limits::default()
        });
        h.send(b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n");
        let responses = h.take();
        assert_eq!(responses.len(), 2);
        assert_eq!(responses[1].header("connection"), Some("close"));
        assert!(h.conn.wants_close());
    }

    #[test]
    fn a_client_that_does_not_read_is_cut_off() {
        let mut h = Harness::with_limits(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        let request = b"GET /v1/groups/7/rekeys/12/manifest HTTP/1.1\r\n\r\n";
        for _ in 0..100 {
            h.send(request);
        }
        assert!(h.conn.wants_close());
        assert!(h.conn.output().is_empty());
        assert_eq!(h.conn.counters().output_overflows, 1);
    }

    #[test]
    fn partial_writes_and_a_final_response_a_client_never_reads() {
        let mut h = Harness::new();
        h.send(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
        let total = h.conn.output().len();
        h.conn.consume_output(5);
        assert_eq!(h.conn.output().len(), total - 5);
        assert!(h.conn.output().starts_with(b"1.1 200"));
        // The client stops reading: the connection lingers until the idle timeout, then drops
        // what is left.
        assert!(h.conn.poll_timeout().is_some());
        h.advance(Duration::from_secs(30));
        assert!(h.conn.output().is_empty());
        assert_eq!(h.conn.poll_timeout(), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes in any split: no panic, and the output is always whole HTTP/1.1
        /// responses.
        #[test]
        fn any_input_in_any_split_gives_well_formed_responses(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..600),
                "(GET|HEAD|POST) /(healthz|metrics|v1/groups/[0-9]{1,2}/(state|rekeys/[0-9]{1,2}/(manifest|chunks/[0-9]))) HTTP/1\\.[01]\r\n(Connection: close\r\n|Content-Length: [0-9]\r\n|X: y\r\n){0,3}\r\n"
                    .prop_map(String::into_bytes),
                proptest::collection::vec(
                    "(GET /healthz HTTP/1.1\r\n\r\n|GET /v1/groups/7/state HTTP/1.1\r\n\r\n|\r\n|[ -~]{0,8})",
                    1..10
                ).prop_map(|parts| parts.concat().into_bytes()),
            ],
            splits in proptest::collection::vec(1usize..50, 1..20),
            timeout_secs in proptest::option::of(0u64..40),
        ) {
            let mut h = Harness::with_limits(Limits {
                max_request_bytes: 256,
                max_headers: 4,
                ..Limits::default()
            });
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
                h.advance(Duration::from_secs(secs));
            }
            out.extend_from_slice(h.conn.output());
            let parsed = parse_http_responses(&out);
            prop_assert!(parsed.is_ok(), "{:?} for {:?}", parsed, String::from_utf8_lossy(&out));
            prop_assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 "));
        }
    }
}
