//! The HTTP/1.1 resync endpoint's protocol, sans-IO: [`HttpCodec`] parses requests and
//! encodes responses; [`super::connection::Connection`] owns the buffers, deadlines, caps,
//! counters and refusals ([`HttpConnection`]).
//!
//! Routes (GET; HEAD answers the same headers without the body):
//!
//! | path                                           | 200 body                         |
//! |------------------------------------------------|----------------------------------|
//! | `/v1/groups/{group}/resync?from={seq}&leaf={leaf}` | every held message from `seq` to the latest: its manifest and the chunk of leaf order key `leaf`, as resync frames (below) |
//! | `/v1/groups/{group}/state`                     | the latest signed manifest       |
//! | `/v1/groups/{group}/rekeys/{seq}/manifest`     | the signed manifest of `seq`     |
//! | `/v1/groups/{group}/rekeys/{seq}/chunks/{leaf}`| the chunk of `seq` for leaf order key `leaf` |
//! | `/metrics`                                     | Prometheus text exposition       |
//! | `/healthz`                                     | `ok`                             |
//!
//! # The batched resync route
//!
//! `GET /v1/groups/{group}/resync?from={seq}&leaf={leaf}` answers a member's whole resync in
//! one response: its body ([`RESYNC_CONTENT_TYPE`]) is the stream the TCP endpoint sends for a
//! resync request ([`crate::wire::frame`]): for each message from `from` to the latest sent
//! when the request arrived, a manifest frame and a chunk frame (each carrying its sequence
//! number), then an end frame, or an error frame where the stream stops early (`NotHeld` at a
//! hole in a relay's history, `BeyondHistory` if the window moves past the stream while it is
//! sent, `UnknownLeaf`, `TooLarge`). A client verifies and applies the messages one by one as
//! they arrive. The body is sent with `Transfer-Encoding: chunked` (one HTTP chunk per
//! message), generated as the client reads (see [`super::connection`]), so it is bounded by the
//! history window and never held whole; to an HTTP/1.0 client it is delimited by the close of
//! the connection.
//!
//! The headers say what the endpoint holds: [`LATEST_SEQ_HEADER`] the last message of the
//! stream and [`OLDEST_SEQ_HEADER`] the oldest message held. When `from` is older than the
//! history window, the response is still 200 and the stream starts at the oldest message held:
//! the messages from `from` to [`OLDEST_SEQ_HEADER`] - 1 are not held (a member missing them
//! must re-register). `from` after the latest is 404 with [`LATEST_SEQ_HEADER`] (0 when
//! nothing was sent). Both query parameters are required, each once, in decimal; any other
//! parameter, or a number that does not parse, is 400.
//!
//! # Status codes
//!
//! Status codes mean what they say: 400 for a request that does not parse (bad syntax closes
//! the connection; a number or query that does not parse does not) and for an HTTP/1.1
//! request without a `Host` header or any request with more than one (RFC 9112, 3.2; this
//! also closes), 404 for an unknown path,
//! another group, a sequence number not yet sent or a leaf no chunk serves, 405 (with `Allow`)
//! for any other method, 408 when a started request does not arrive whole within the header
//! timeout, 410 beyond the history window (the member must re-register), 421 for a message
//! inside the window that this endpoint does not hold (a hole in a relay's history: ask the
//! next endpoint), 413 for a request with a body, 431 for a request line and headers over the
//! size cap or too many headers (or pipelined requests piled up behind a resync stream beyond
//! it), 429 and 503 when the listener refuses ([`Connection::refuse`]). Every response but the
//! batched route's carries `Content-Length`; connections are kept alive (HTTP/1.1) unless the
//! client sends `Connection: close` or speaks HTTP/1.0, and pipelined requests are answered in
//! order.
//!
//! What is served is already signed and encrypted (DESIGN.md, security rules): nothing here
//! authenticates, and nothing here may panic on any input.

use std::borrow::Cow;
use std::fmt::Write as _;

use super::connection::{Answer, Codec, Connection, Decoded, StreamStart};
use super::limits::Limits;
pub use super::limits::Refusal;
use super::{Lookup, ResyncSource};
use crate::wire::frame::FrameRepr;

/// One HTTP/1.1 connection of the resync endpoint.
pub type HttpConnection = Connection<HttpCodec>;

/// The `Content-Type` of `/metrics` (Prometheus text exposition format 0.0.4).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of the batched resync route: resync frames ([`crate::wire::frame`]).
pub const RESYNC_CONTENT_TYPE: &str = "application/vnd.rekeycast.resync-frames";
/// The header that carries the latest sequence number sent.
pub const LATEST_SEQ_HEADER: &str = "X-Rekeycast-Latest-Seq";
/// The header that carries the oldest sequence number held.
pub const OLDEST_SEQ_HEADER: &str = "X-Rekeycast-Oldest-Seq";

const OCTET_STREAM: &str = "application/octet-stream";
const TEXT: &str = "text/plain; charset=utf-8";
/// The width of a chunk-size line's hexadecimal length: a message's two frames are at most
/// 2 x (4 + 65,536) bytes, well within eight digits (leading zeros are allowed, RFC 9112 7.1).
const CHUNK_SIZE_DIGITS: usize = 8;

/// Responses by status class, per connection (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpCounters {
    /// Responses with a 2xx status.
    pub success: u64,
    /// Responses with a 4xx status (including 408 and 429).
    pub client_error: u64,
    /// Responses with a 5xx status (including 503).
    pub server_error: u64,
    /// Batched resync responses (200 on the resync route).
    pub resync_streams: u64,
}

/// A request whose head parsed, with its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    head_only: bool,
    method_allowed: bool,
    route: Route,
    close: bool,
    has_body: bool,
    http_1_0: bool,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Healthz,
    Metrics,
    State {
        group: u32,
    },
    Manifest {
        group: u32,
        seq: u64,
    },
    Chunk {
        group: u32,
        seq: u64,
        leaf: u32,
    },
    Resync {
        group: u32,
        from: u64,
        leaf: u32,
    },
    /// A path or query whose numbers do not parse: 400, keep-alive.
    BadRequest,
    NotFound,
}

/// The codec of HTTP/1.1.
#[derive(Debug)]
pub struct HttpCodec {
    max_headers: usize,
    /// The resync body being sent is chunked (HTTP/1.1) rather than delimited by the close.
    chunked: bool,
    counters: HttpCounters,
}

/// How a response's body is delimited.
enum Body<'a> {
    Whole(&'a [u8]),
    Chunked,
    UntilClose,
}

impl Codec for HttpCodec {
    type Request = HttpRequest;
    /// A status code.
    type Reject = u16;
    type Counters = HttpCounters;

    fn new(limits: &Limits) -> Self {
        Self {
            max_headers: limits.max_headers.max(1),
            chunked: true,
            counters: HttpCounters::default(),
        }
    }

    fn may_complete(&self, new_bytes: &[u8]) -> bool {
        new_bytes.contains(&b'\n')
    }

    fn decode(&mut self, window: &[u8]) -> Decoded<HttpRequest, u16> {
        parse(window, self.max_headers)
    }

    fn too_large(&self) -> u16 {
        431
    }

    fn timed_out(&self) -> Option<u16> {
        Some(408)
    }

    fn answer(
        &mut self,
        request: HttpRequest,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
        last: bool,
        out: &mut Vec<u8>,
    ) -> Answer {
        let close = request.close || request.has_body || last;
        if !request.method_allowed {
            let reply = Reply::error(405).header("Allow", "GET, HEAD");
            self.write(out, &reply, request.head_only, close);
        } else if request.has_body {
            self.write(out, &Reply::error(413), request.head_only, close);
        } else if let Route::Resync { group, from, leaf } = request.route {
            return self.answer_resync(&request, source, (group, from, leaf), close, out);
        } else {
            let reply = route(request.route, source, metrics);
            self.write(out, &reply, request.head_only, close);
        }
        Answer {
            close,
            stream: None,
        }
    }

    fn reject(&mut self, status: u16, out: &mut Vec<u8>) {
        self.write(out, &Reply::error(status), false, true);
    }

    fn refuse(&mut self, refusal: Refusal, out: &mut Vec<u8>) {
        let status = match refusal {
            Refusal::RateLimited => 429,
            Refusal::Overloaded => 503,
        };
        self.write(
            out,
            &Reply::error(status).header("Retry-After", 1),
            false,
            true,
        );
    }

    fn stream_frames(&mut self, frames: &[FrameRepr<'_>], out: &mut Vec<u8>) -> bool {
        let mark = out.len();
        if self.chunked {
            out.extend_from_slice(&[b'0'; CHUNK_SIZE_DIGITS]);
            out.extend_from_slice(b"\r\n");
        }
        let body_start = out.len();
        for frame in frames {
            if !super::tcp::emit(out, frame) {
                out.truncate(mark);
                return false;
            }
        }
        if self.chunked {
            let size = format!(
                "{:0width$x}",
                out.len() - body_start,
                width = CHUNK_SIZE_DIGITS
            );
            if size.len() != CHUNK_SIZE_DIGITS {
                out.truncate(mark);
                return false;
            }
            out[mark..mark + CHUNK_SIZE_DIGITS].copy_from_slice(size.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        true
    }

    fn stream_end(&mut self, out: &mut Vec<u8>) {
        if self.chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }

    fn interrupt_stream(&mut self, out: &mut Vec<u8>) -> bool {
        // End the body where it is: its frames lack the end frame, which tells the client the
        // stream was cut. No response may follow in the same connection.
        self.stream_end(out);
        false
    }

    fn counters(&self) -> &HttpCounters {
        &self.counters
    }
}

impl HttpCodec {
    /// The batched resync route: the head, and the stream to follow it.
    fn answer_resync(
        &mut self,
        request: &HttpRequest,
        source: &dyn ResyncSource,
        (group, from, leaf): (u32, u64, u32),
        close: bool,
        out: &mut Vec<u8>,
    ) -> Answer {
        // What is older than the window is not held: the stream starts at the oldest held,
        // and the headers say so.
        let oldest = source.oldest();
        let start = oldest.map_or(from, |oldest| from.max(oldest));
        let (reply, stream) = match StreamStart::check(source, group, start, leaf) {
            StreamStart::UnknownGroup => (Reply::error(404), None),
            StreamStart::NotYetSent { latest } => {
                (Reply::error(404).header(LATEST_SEQ_HEADER, latest), None)
            }
            StreamStart::BeyondHistory { oldest } => {
                (Reply::error(410).header(OLDEST_SEQ_HEADER, oldest), None)
            }
            StreamStart::Stream(stream) => {
                let reply = Reply::new(200, RESYNC_CONTENT_TYPE, Vec::new())
                    .header(LATEST_SEQ_HEADER, stream.last_seq)
                    .header(OLDEST_SEQ_HEADER, oldest.unwrap_or(stream.next_seq));
                (reply, Some(stream))
            }
        };
        let Some(stream) = stream else {
            self.write(out, &reply, request.head_only, close);
            return Answer {
                close,
                stream: None,
            };
        };
        self.counters.resync_streams += 1;
        self.chunked = !request.http_1_0;
        let body = if self.chunked {
            Body::Chunked
        } else {
            Body::UntilClose
        };
        // A body delimited by the close ends the connection.
        let close = close || !self.chunked;
        self.write_head(out, &reply, body, close);
        Answer {
            close,
            stream: (!request.head_only).then_some(stream),
        }
    }

    fn write(&mut self, out: &mut Vec<u8>, reply: &Reply<'_>, head_only: bool, close: bool) {
        self.write_head(out, reply, Body::Whole(&reply.body), close);
        if !head_only {
            out.extend_from_slice(&reply.body);
        }
    }

    fn write_head(&mut self, out: &mut Vec<u8>, reply: &Reply<'_>, body: Body<'_>, close: bool) {
        match reply.status {
            200..=299 => self.counters.success += 1,
            400..=499 => self.counters.client_error += 1,
            _ => self.counters.server_error += 1,
        }
        let mut head = String::with_capacity(192);
        // Writing into a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\n",
            reply.status,
            reason(reply.status),
            reply.content_type,
        );
        match body {
            Body::Whole(bytes) => {
                let _ = write!(head, "Content-Length: {}\r\n", bytes.len());
            }
            Body::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
            Body::UntilClose => {}
        }
        for (name, value) in &reply.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        out.extend_from_slice(head.as_bytes());
    }
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

/// Parses the request at the start of `window` (at most the request size cap).
fn parse(window: &[u8], max_headers: usize) -> Decoded<HttpRequest, u16> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Decoded::Partial,
        Err(httparse::Error::TooManyHeaders) => return Decoded::Reject(431),
        Err(_) => return Decoded::Reject(400),
    };
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version)
    else {
        return Decoded::Reject(400);
    };
    let mut close = version == 0;
    let mut has_body = false;
    let mut hosts = 0_usize;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if header.name.eq_ignore_ascii_case("connection") {
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
                None => return Decoded::Reject(400),
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        }
    }
    // RFC 9112, 3.2: an HTTP/1.1 request names its host exactly once; HTTP/1.0 may omit it.
    if hosts > 1 || (hosts == 0 && version != 0) {
        return Decoded::Reject(400);
    }
    Decoded::Request {
        len,
        request: HttpRequest {
            head_only: method == "HEAD",
            method_allowed: method == "GET" || method == "HEAD",
            route: parse_route(path),
            close,
            has_body,
            http_1_0: version == 0,
        },
    }
}

/// Where `path` (with its query, if any) goes.
fn parse_route(path: &str) -> Route {
    let (path, query) = match path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path, None),
    };
    let Some(path) = path.strip_prefix('/') else {
        return Route::BadRequest;
    };
    let segments: Vec<&str> = path.split('/').collect();
    let parsed = match segments.as_slice() {
        ["healthz"] => Some(Route::Healthz),
        ["metrics"] => Some(Route::Metrics),
        ["v1", "groups", group, "state"] => decimal(group).map(|group| Route::State { group }),
        ["v1", "groups", group, "resync"] => decimal(group)
            .zip(resync_query(query))
            .map(|(group, (from, leaf))| Route::Resync { group, from, leaf }),
        ["v1", "groups", group, "rekeys", seq, "manifest"] => decimal(group)
            .zip(decimal(seq))
            .map(|(group, seq)| Route::Manifest { group, seq }),
        ["v1", "groups", group, "rekeys", seq, "chunks", leaf] => decimal(group)
            .zip(decimal(seq))
            .zip(decimal(leaf))
            .map(|((group, seq), leaf)| Route::Chunk { group, seq, leaf }),
        _ => return Route::NotFound,
    };
    parsed.unwrap_or(Route::BadRequest)
}

/// The query of the batched resync route: `from` and `leaf`, each exactly once, in decimal,
/// and nothing else.
fn resync_query(query: Option<&str>) -> Option<(u64, u32)> {
    let (mut from, mut leaf) = (None, None);
    for pair in query?.split('&') {
        let (name, value) = pair.split_once('=')?;
        match name {
            "from" if from.is_none() => from = Some(decimal::<u64>(value)?),
            "leaf" if leaf.is_none() => leaf = Some(decimal::<u32>(value)?),
            _ => return None,
        }
    }
    from.zip(leaf)
}

/// The reply to a GET of `route` (any route but the batched resync).
fn route<'s>(
    route: Route,
    source: &'s dyn ResyncSource,
    metrics: &dyn Fn() -> String,
) -> Reply<'s> {
    match route {
        Route::Healthz => Reply::new(200, TEXT, b"ok".as_slice()),
        Route::Metrics => Reply::new(200, METRICS_CONTENT_TYPE, metrics().into_bytes()),
        Route::State { group } => {
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
        Route::Manifest { group, seq } => {
            if group != source.group_id() {
                return Reply::error(404);
            }
            match source.manifest(seq) {
                // A hole in the history (a relay's): the message exists, elsewhere.
                Lookup::NotFound => Reply::error(421),
                lookup => lookup_reply(lookup),
            }
        }
        Route::Chunk { group, seq, leaf } => {
            if group != source.group_id() {
                return Reply::error(404);
            }
            lookup_reply(source.chunk(seq, leaf))
        }
        Route::BadRequest => Reply::error(400),
        Route::Resync { .. } | Route::NotFound => Reply::error(404),
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
    use std::time::{Duration, Instant};

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

    /// Frames of a resync body, as (kind, seq, bytes).
    fn body_frames(mut body: &[u8]) -> Vec<(&'static str, u64, Vec<u8>)> {
        let mut frames = Vec::new();
        while !body.is_empty() {
            let len = FrameRepr::peek_len(body).unwrap().unwrap();
            frames.push(match FrameRepr::parse(&body[..len]).unwrap() {
                FrameRepr::Manifest { seq, manifest } => ("manifest", seq, manifest.to_vec()),
                FrameRepr::Chunk { seq, chunk, .. } => ("chunk", seq, chunk.to_vec()),
                FrameRepr::End { last_seq } => ("end", last_seq, Vec::new()),
                FrameRepr::Error { code, context_seq } => {
                    ("error", context_seq, format!("{code:?}").into_bytes())
                }
                other => panic!("{other:?}"),
            });
            body = &body[len..];
        }
        frames
    }

    impl Harness {
        /// Writes everything, continuing streams, and parses it.
        fn take_streamed(&mut self) -> Vec<HttpResponse> {
            let mut out = Vec::new();
            loop {
                out.extend_from_slice(self.conn.output());
                let len = self.conn.output().len();
                self.conn.consume_output(len);
                if !self.conn.has_more_to_send() {
                    break;
                }
                self.send(&[]);
            }
            parse_http_responses(&out).unwrap()
        }

        fn get_streamed(&mut self, path: &str) -> HttpResponse {
            self.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
            let mut responses = self.take_streamed();
            assert_eq!(responses.len(), 1, "{path}");
            responses.remove(0)
        }
    }

    #[test]
    fn the_batched_route_serves_what_the_per_message_routes_serve() {
        let mut h = Harness::new();
        let mut expected = Vec::new();
        for seq in 11..=14 {
            let manifest = h.get(&format!("/v1/groups/7/rekeys/{seq}/manifest"));
            let chunk = h.get(&format!("/v1/groups/7/rekeys/{seq}/chunks/2"));
            expected.push(("manifest", seq, manifest.body));
            expected.push(("chunk", seq, chunk.body));
        }
        expected.push(("end", 14, Vec::new()));
        let r = h.get_streamed("/v1/groups/7/resync?from=11&leaf=2");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(RESYNC_CONTENT_TYPE));
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.header("x-rekeycast-latest-seq"), Some("14"));
        assert_eq!(r.header("x-rekeycast-oldest-seq"), Some("10"));
        assert_eq!(body_frames(&r.body), expected);
        assert!(!h.conn.wants_close());
        assert_eq!(h.conn.counters().messages_served, 4);
        assert_eq!(h.conn.counters().streams_completed, 1);
        assert_eq!(h.conn.protocol_counters().resync_streams, 1);
        // The parameters in either order; the connection serves the next request.
        let r = h.get_streamed("/v1/groups/7/resync?leaf=0&from=14");
        assert_eq!(body_frames(&r.body).len(), 3);
        assert_eq!(h.get("/healthz").status, 200);
    }

    #[test]
    fn a_malformed_batched_query_is_400_and_keeps_alive() {
        let mut h = Harness::new();
        for path in [
            "/v1/groups/7/resync",
            "/v1/groups/7/resync?",
            "/v1/groups/7/resync?from=11",
            "/v1/groups/7/resync?leaf=1",
            "/v1/groups/7/resync?from=11&leaf=1&leaf=1",
            "/v1/groups/7/resync?from=11&from=12&leaf=1",
            "/v1/groups/7/resync?from=11&leaf=1&x=1",
            "/v1/groups/7/resync?from=11&leaf=1&",
            "/v1/groups/7/resync?from=&leaf=1",
            "/v1/groups/7/resync?from=-1&leaf=1",
            "/v1/groups/7/resync?from=0x1&leaf=1",
            "/v1/groups/7/resync?from=18446744073709551616&leaf=1",
            "/v1/groups/7/resync?from=11&leaf=4294967296",
            "/v1/groups/7/resync?from=11&leaf",
            "/v1/groups/7/resync?from%3D11&leaf=1",
            "/v1/groups/7/resync?from=1%31&leaf=1",
            "/v1/groups/x/resync?from=11&leaf=1",
        ] {
            assert_eq!(h.get(path).status, 400, "{path}");
        }
        assert!(!h.conn.wants_close());
        assert_eq!(h.conn.counters().messages_served, 0);
        assert_eq!(h.get("/v1/groups/7/resync/x?from=11&leaf=1").status, 404);
    }

    #[test]
    fn a_batched_range_crossing_the_window_start_serves_what_is_held_and_says_so() {
        let mut h = Harness::new();
        let r = h.get_streamed("/v1/groups/7/resync?from=3&leaf=1");
        assert_eq!(r.status, 200);
        // Messages 3..=9 are not held.
        assert_eq!(r.header("x-rekeycast-oldest-seq"), Some("10"));
        let frames = body_frames(&r.body);
        assert_eq!(frames.first().map(|f| (f.0, f.1)), Some(("manifest", 10)));
        assert_eq!(frames.len(), 2 * 5 + 1);
        assert_eq!(frames.last().map(|f| (f.0, f.1)), Some(("end", 14)));
    }

    #[test]
    fn the_batched_route_outside_the_window_and_at_a_hole() {
        let mut h = Harness::new();
        // Nothing newer: 404 with the latest.
        let r = h.get("/v1/groups/7/resync?from=15&leaf=1");
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-rekeycast-latest-seq"), Some("14"));
        assert_eq!(h.get("/v1/groups/8/resync?from=11&leaf=1").status, 404);
        // A hole in a relay's history ends the stream with NotHeld.
        h.source.messages.remove(2);
        let r = h.get_streamed("/v1/groups/7/resync?from=10&leaf=1");
        assert_eq!(r.status, 200);
        let frames = body_frames(&r.body);
        assert_eq!(frames.len(), 5);
        assert_eq!(frames[4], ("error", 12, b"NotHeld".to_vec()));
        // A leaf no chunk serves.
        let r = h.get_streamed("/v1/groups/7/resync?from=13&leaf=9");
        assert_eq!(
            body_frames(&r.body),
            vec![("error", 13, b"UnknownLeaf".to_vec())]
        );
        // Nothing sent at all: 404 with latest 0.
        h.source = VecSource::new(GROUP, 1, 0, 1);
        let r = h.get("/v1/groups/7/resync?from=1&leaf=0");
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-rekeycast-latest-seq"), Some("0"));
    }

    #[test]
    fn the_batched_route_for_head_and_http_1_0() {
        let mut h = Harness::new();
        h.send(b"HEAD /v1/groups/7/resync?from=11&leaf=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(!h.conn.has_more_to_send());
        let text = String::from_utf8(h.conn.output().to_vec()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Transfer-Encoding: chunked\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nok"), "{text}");
        // HTTP/1.0 has no chunked encoding: the body ends with the connection.
        let mut h = Harness::new();
        h.send(b"GET /v1/groups/7/resync?from=13&leaf=1 HTTP/1.0\r\n\r\n");
        let r = h.take_streamed().remove(0);
        assert_eq!(r.header("transfer-encoding"), None);
        assert_eq!(r.header("connection"), Some("close"));
        assert_eq!(body_frames(&r.body).len(), 5);
        assert!(h.conn.wants_close());
    }

    #[test]
    fn a_long_batched_stream_is_generated_as_the_output_drains() {
        let mut h = Harness::with_limits(Limits {
            max_output_bytes: 8192,
            ..Limits::default()
        });
        h.source = VecSource::new(GROUP, 1, 100, 2);
        for message in &mut h.source.messages {
            message.manifest = vec![message.seq as u8; 1000];
        }
        h.send(
            b"GET /v1/groups/7/resync?from=1&leaf=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(h.conn.output().len() < 8192, "{}", h.conn.output().len());
        assert!(h.conn.has_more_to_send());
        let responses = h.take_streamed();
        assert_eq!(responses.len(), 2);
        let frames = body_frames(&responses[0].body);
        assert_eq!(frames.len(), 2 * 100 + 1);
        assert_eq!(frames[0], ("manifest", 1, vec![1; 1000]));
        assert_eq!(responses[1].body, b"ok");
        assert_eq!(h.conn.counters().output_overflows, 0);
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
        assert_eq!(h.conn.protocol_counters().success, 3);
        assert_eq!(h.conn.protocol_counters().client_error, 1);
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
        h.send(b"HEAD /v1/groups/7/state HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
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
            h.send(format!("{method} /healthz HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
            let r = h.take().remove(0);
            assert_eq!(r.status, 405, "{method}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"));
        }
        assert!(!h.conn.wants_close());
        // With a body the connection cannot continue: 405 and close.
        h.send(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
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
        h.send(b"thz HTTP/1.1\r\nHost: x\r\n\r\n");
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
        // Before its first byte, a connection has the silent timeout from the accept.
        assert_eq!(h.conn.poll_timeout(), Some(h.now + Duration::from_secs(2)));
        h.get("/healthz");
        assert_eq!(h.conn.poll_timeout(), Some(h.now + Duration::from_secs(30)));
        h.advance(Duration::from_secs(29));
        assert!(!h.conn.wants_close());
        h.advance(Duration::from_secs(1));
        assert!(h.conn.wants_close());
        assert!(h.conn.output().is_empty());
        assert_eq!(h.conn.counters().idle_timeouts, 1);
        // Nothing is read after the close.
        h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(h.conn.output().is_empty());
    }

    #[test]
    fn oversized_headers_are_431() {
        let mut h = Harness::new();
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(9000)
        );
        h.send(big.as_bytes());
        let r = h.take().remove(0);
        assert_eq!(r.status, 431);
        assert!(h.conn.wants_close());
        // Also when the oversized head arrives in pieces, with no end in sight.
        let mut h = Harness::new();
        h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
        for _ in 0..150 {
            h.send(b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(h.take()[0].status, 431);
        assert_eq!(h.conn.buffered_input(), 0);
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
        let mut request = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
        for i in 0..33 {
            request.push_str(&format!("X-H{i}: v\r\n"));
        }
        request.push_str("\r\n");
        h.send(request.as_bytes());
        assert_eq!(h.take()[0].status, 431);
        assert!(h.conn.wants_close());
        // 32 are fine (`Host` and 31 others).
        let mut h = Harness::new();
        let mut request = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
        for i in 0..31 {
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
            h.send(format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{extra}\r\n\r\nhello").as_bytes());
            let responses = h.take();
            assert_eq!(responses.len(), 1, "{extra}");
            assert_eq!(responses[0].status, 413, "{extra}");
            assert!(h.conn.wants_close());
        }
        // Content-Length: 0 is no body.
        let mut h = Harness::new();
        h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.take()[0].status, 200);
        // An unparsable length is 400.
        h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n");
        assert_eq!(h.take()[0].status, 400);
        assert!(h.conn.wants_close());
    }

    #[test]
    fn bad_syntax_is_400_and_closes() {
        for garbage in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /healthz HTTP/9.9\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
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
        h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
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
    fn an_http_1_1_request_names_its_host_exactly_once() {
        let without = b"GET /healthz HTTP/1.1\r\n\r\n".as_slice();
        let twice = b"GET /healthz HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n".as_slice();
        let twice_1_0 = b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n".as_slice();
        for request in [without, twice, twice_1_0] {
            let mut h = Harness::new();
            h.send(request);
            let text = String::from_utf8_lossy(request);
            assert_eq!(h.take()[0].status, 400, "{text}");
            assert!(h.conn.wants_close(), "{text}");
            assert_eq!(h.conn.counters().rejected, 1, "{text}");
            assert_eq!(h.conn.counters().requests, 0, "{text}");
            assert_eq!(h.conn.protocol_counters().client_error, 1, "{text}");
        }
        // Once, in any case, is fine; HTTP/1.0 may leave it out.
        for request in [
            b"GET /healthz HTTP/1.1\r\nhOsT: a\r\n\r\n".as_slice(),
            b"GET /healthz HTTP/1.0\r\n\r\n".as_slice(),
        ] {
            let mut h = Harness::new();
            h.send(request);
            let text = String::from_utf8_lossy(request);
            assert_eq!(h.take()[0].status, 200, "{text}");
            assert_eq!(h.conn.counters().rejected, 0, "{text}");
        }
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
        h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        let responses = h.take();
        assert_eq!(responses.len(), 2);
        assert_eq!(responses[1].header("connection"), Some("close"));
        assert!(h.conn.wants_close());
    }

    #[test]
    fn a_pipelining_client_waits_for_its_answers_and_one_that_never_reads_times_out() {
        let mut h = Harness::with_limits(Limits {
            max_output_bytes: 4096,
            ..Limits::default()
        });
        let request = b"GET /v1/groups/7/rekeys/12/manifest HTTP/1.1\r\nHost: x\r\n\r\n";
        for _ in 0..100 {
            h.send(request);
        }
        // Answered up to half the output cap; the rest wait, and reading should stop.
        assert!(!h.conn.wants_close());
        assert!(!h.conn.wants_input());
        assert!(h.conn.output().len() < 4096);
        assert_eq!(h.conn.counters().output_overflows, 0);
        let responses = h.take_streamed();
        assert_eq!(responses.len(), 100);
        assert!(responses.iter().all(|r| r.body == b"manifest-12"));
        assert!(h.conn.wants_input());
        // A client that never reads is closed by the idle timeout.
        for _ in 0..100 {
            h.send(request);
        }
        h.advance(Duration::from_secs(30));
        assert!(h.conn.wants_close());
        assert!(h.conn.output().is_empty());
        assert_eq!(h.conn.counters().idle_timeouts, 1);
    }

    #[test]
    fn partial_writes_and_a_final_response_a_client_never_reads() {
        let mut h = Harness::new();
        h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
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
                "(GET|HEAD|POST) /(healthz|metrics|v1/groups/[0-9]{1,2}/(state|resync\\?(from=[0-9]{1,2}&)?leaf=[0-9]|rekeys/[0-9]{1,2}/(manifest|chunks/[0-9]))) HTTP/1\\.[01]\r\n(Connection: close\r\n|Content-Length: [0-9]\r\n|X: y\r\n){0,3}\r\n"
                    .prop_map(String::into_bytes),
                proptest::collection::vec(
                    "(GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n|GET /v1/groups/7/state HTTP/1.1\r\nHost: x\r\n\r\n|\r\n|[ -~]{0,8})",
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
