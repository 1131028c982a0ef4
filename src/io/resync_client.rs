//! The member's side of resync: a small blocking client for the TCP and HTTP resync endpoints,
//! run on its own thread so the member's event loop never waits on a connection.
//!
//! It fetches, for each message the member lacks, the signed manifest and the member's chunk
//! (about one datagram's worth per message), and hands them to the member's session, which
//! verifies them exactly as if they had come by multicast: the endpoint is not trusted. A
//! fetch is one request on either endpoint: a resync request frame over TCP, the batched
//! resync route over HTTP (whose body is the same frame stream), falling back to two requests
//! per message on an HTTP endpoint that does not know that route.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::resync::http::{LATEST_SEQ_HEADER, OLDEST_SEQ_HEADER};
use crate::wire::frame::{FrameRepr, MAX_FRAME_LEN, PREFIX_LEN};
use crate::wire::ErrorCode;

/// A resync endpoint: `tcp://HOST:PORT` (length-prefixed frames) or `http://HOST:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// The TCP frame endpoint.
    Tcp(SocketAddr),
    /// The HTTP/1.1 endpoint.
    Http(SocketAddr),
}

impl FromStr for Endpoint {
    type Err = ClientError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ClientError::BadEndpoint(text.to_string());
        let (scheme, rest) = text.split_once("://").ok_or_else(bad)?;
        let host = rest.trim_end_matches('/');
        let addr = host
            .to_socket_addrs()
            .map_err(|_| bad())?
            .next()
            .ok_or_else(bad)?;
        match scheme {
            "tcp" => Ok(Self::Tcp(addr)),
            "http" => Ok(Self::Http(addr)),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
            Self::Http(addr) => write!(f, "http://{addr}"),
        }
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The endpoint string is not `tcp://HOST:PORT` or `http://HOST:PORT`.
    #[error("bad resync endpoint {0:?}: expected tcp://HOST:PORT or http://HOST:PORT")]
    BadEndpoint(String),
    /// Connecting, reading or writing failed or timed out.
    #[error("{endpoint}")]
    Io {
        /// The endpoint.
        endpoint: Endpoint,
        /// The error.
        source: std::io::Error,
    },
    /// The endpoint answered something this client does not understand.
    #[error("{endpoint}: bad answer: {reason}")]
    Protocol {
        /// The endpoint.
        endpoint: Endpoint,
        /// What was wrong.
        reason: String,
    },
    /// The endpoint refused: rate limited or overloaded (try later or elsewhere).
    #[error("{endpoint}: refused ({reason})")]
    Refused {
        /// The endpoint.
        endpoint: Endpoint,
        /// Why.
        reason: &'static str,
    },
}

/// What a resync fetch returned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fetched {
    /// (signed manifest, chunk) for each message from the one asked for, in order.
    pub items: Vec<(Vec<u8>, Vec<u8>)>,
    /// The messages asked for left the endpoint's history: the member must re-register.
    pub beyond_history: bool,
    /// The endpoint stopped at a message it does not hold (a hole in a relay's history: a
    /// message the relay got by resync only) after serving `items`: the rest may be at the
    /// next endpoint.
    pub not_held: bool,
}

/// Fetches every message from `from_seq` to the latest for the member whose leaf has order
/// key `leaf`. `timeout` bounds each connect, read and write.
pub fn fetch_items(
    endpoint: Endpoint,
    group_id: u32,
    from_seq: u64,
    leaf: u32,
    timeout: Duration,
) -> Result<Fetched, ClientError> {
    fetch_items_from(None, endpoint, group_id, from_seq, leaf, timeout)
}

/// [`fetch_items`] from the local address `local` (the member's own address, so that the
/// endpoint's per-source limits count the member, not whatever else shares the host's
/// default source address); `None` lets the system choose.
pub fn fetch_items_from(
    local: Option<IpAddr>,
    endpoint: Endpoint,
    group_id: u32,
    from_seq: u64,
    leaf: u32,
    timeout: Duration,
) -> Result<Fetched, ClientError> {
    let dial = Dial { local, timeout };
    match endpoint {
        Endpoint::Tcp(addr) => tcp_fetch(endpoint, addr, group_id, from_seq, leaf, dial),
        Endpoint::Http(addr) => http_fetch(endpoint, addr, group_id, from_seq, leaf, dial),
    }
}

/// Where and how long to connect.
#[derive(Debug, Clone, Copy)]
struct Dial {
    local: Option<IpAddr>,
    timeout: Duration,
}

/// Fetches the endpoint's latest signed manifest (its state answer).
pub fn fetch_state(
    endpoint: Endpoint,
    group_id: u32,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, ClientError> {
    fetch_state_from(None, endpoint, group_id, timeout)
}

/// [`fetch_state`] from the local address `local` (see [`fetch_items_from`]).
pub fn fetch_state_from(
    local: Option<IpAddr>,
    endpoint: Endpoint,
    group_id: u32,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, ClientError> {
    let dial = Dial { local, timeout };
    match endpoint {
        Endpoint::Tcp(addr) => {
            let mut stream = connect(endpoint, addr, dial)?;
            send_frame(endpoint, &mut stream, &FrameRepr::StateRequest { group_id })?;
            let mut reader = FrameReader::default();
            let frame = reader.next(endpoint, &mut stream)?;
            match FrameRepr::parse(&frame).map_err(|e| protocol(endpoint, e))? {
                FrameRepr::State { manifest, .. } => Ok(Some(manifest.to_vec())),
                FrameRepr::Error {
                    code: ErrorCode::NotYetSent,
                    ..
                } => Ok(None),
                FrameRepr::Error { code, .. } => Err(refusal(endpoint, code)),
                _ => Err(protocol(endpoint, "unexpected frame")),
            }
        }
        Endpoint::Http(addr) => {
            let path = format!("/v1/groups/{group_id}/state");
            let mut stream = connect(endpoint, addr, dial)?;
            match http_get(endpoint, &mut stream, addr, &path, true)? {
                (200, body) => Ok(Some(body)),
                (404, _) => Ok(None),
                (status, _) => Err(http_refusal(endpoint, status)),
            }
        }
    }
}

fn tcp_fetch(
    endpoint: Endpoint,
    addr: SocketAddr,
    group_id: u32,
    from_seq: u64,
    leaf: u32,
    dial: Dial,
) -> Result<Fetched, ClientError> {
    let mut stream = connect(endpoint, addr, dial)?;
    let request = FrameRepr::ResyncRequest {
        group_id,
        from_seq,
        leaf,
    };
    send_frame(endpoint, &mut stream, &request)?;
    read_stream(endpoint, &mut stream)
}

/// Reads a resync stream (manifest and chunk frames, then an end or an error frame) to its end:
/// the TCP endpoint's answer to a resync request, and the body of the HTTP endpoint's batched
/// resync route.
fn read_stream(endpoint: Endpoint, stream: &mut impl Read) -> Result<Fetched, ClientError> {
    let mut reader = FrameReader::default();
    let mut fetched = Fetched::default();
    let mut manifest: Option<(u64, Vec<u8>)> = None;
    // Bounded: a hostile endpoint cannot keep a member reading forever.
    for _ in 0..100_000 {
        let frame = reader.next(endpoint, stream)?;
        match FrameRepr::parse(&frame).map_err(|e| protocol(endpoint, e))? {
            FrameRepr::Manifest { seq, manifest: m } => manifest = Some((seq, m.to_vec())),
            FrameRepr::Chunk { seq, chunk, .. } => match manifest.take() {
                Some((manifest_seq, manifest)) if manifest_seq == seq => {
                    fetched.items.push((manifest, chunk.to_vec()));
                }
                _ => return Err(protocol(endpoint, "chunk without its manifest")),
            },
            FrameRepr::End { .. } => return Ok(fetched),
            FrameRepr::Error {
                code: ErrorCode::BeyondHistory,
                ..
            } => {
                fetched.beyond_history = true;
                return Ok(fetched);
            }
            FrameRepr::Error {
                code: ErrorCode::NotYetSent,
                ..
            } => return Ok(fetched),
            // A hole in the endpoint's (a relay's) history: keep what came before it; with
            // nothing, the next endpoint is asked.
            FrameRepr::Error {
                code: ErrorCode::NotHeld,
                ..
            } if !fetched.items.is_empty() => {
                fetched.not_held = true;
                return Ok(fetched);
            }
            FrameRepr::Error { code, .. } => return Err(refusal(endpoint, code)),
            _ => return Err(protocol(endpoint, "unexpected frame")),
        }
    }
    Err(protocol(endpoint, "endless stream"))
}

/// The batched route: one request, one streamed response holding every message.
fn http_fetch(
    endpoint: Endpoint,
    addr: SocketAddr,
    group_id: u32,
    from_seq: u64,
    leaf: u32,
    dial: Dial,
) -> Result<Fetched, ClientError> {
    let io = |source| ClientError::Io { endpoint, source };
    let mut stream = connect(endpoint, addr, dial)?;
    let path = format!("/v1/groups/{group_id}/resync?from={from_seq}&leaf={leaf}");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    let head = read_head(endpoint, &mut stream)?;
    let number = |name: &str| {
        head.header(name)
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    match head.status {
        200 => {
            if number(OLDEST_SEQ_HEADER).is_some_and(|oldest| oldest > from_seq) {
                // The first messages wanted are not held: the member must re-register, and
                // what follows them is of no use to it.
                return Ok(Fetched {
                    beyond_history: true,
                    ..Fetched::default()
                });
            }
            let chunked = head
                .header("transfer-encoding")
                .is_some_and(|value| value.trim().eq_ignore_ascii_case("chunked"));
            let length = number("content-length");
            let mut body = std::io::Cursor::new(head.rest).chain(&mut stream);
            if chunked {
                read_stream(endpoint, &mut ChunkedBody::new(BufReader::new(body)))
            } else {
                // Delimited by a length, or by the close.
                match length {
                    Some(length) => read_stream(endpoint, &mut body.take(length)),
                    None => read_stream(endpoint, &mut body),
                }
            }
        }
        // Nothing newer than what the member has.
        404 if number(LATEST_SEQ_HEADER).is_some() => Ok(Fetched::default()),
        // An endpoint that does not know the batched route (an older relay).
        404 => http_fetch_per_message(endpoint, addr, group_id, from_seq, leaf, dial),
        410 => Ok(Fetched {
            beyond_history: true,
            ..Fetched::default()
        }),
        status => Err(http_refusal(endpoint, status)),
    }
}

/// The per-message routes, two requests per message on one keep-alive connection, for an
/// endpoint without the batched route.
fn http_fetch_per_message(
    endpoint: Endpoint,
    addr: SocketAddr,
    group_id: u32,
    from_seq: u64,
    leaf: u32,
    dial: Dial,
) -> Result<Fetched, ClientError> {
    let mut stream = connect(endpoint, addr, dial)?;
    let mut fetched = Fetched::default();
    // One keep-alive connection, two requests per message, until the endpoint has no more.
    for seq in from_seq..from_seq.saturating_add(100_000) {
        let base = format!("/v1/groups/{group_id}/rekeys/{seq}");
        let manifest = match http_get(
            endpoint,
            &mut stream,
            addr,
            &format!("{base}/manifest"),
            false,
        )? {
            (200, body) => body,
            (404, _) => return Ok(fetched),
            // A hole in the endpoint's (a relay's) history: keep what came before it; with
            // nothing, the next endpoint is asked.
            (421, _) if !fetched.items.is_empty() => {
                fetched.not_held = true;
                return Ok(fetched);
            }
            (410, _) => {
                fetched.beyond_history = true;
                return Ok(fetched);
            }
            (status, _) => return Err(http_refusal(endpoint, status)),
        };
        let chunk = match http_get(
            endpoint,
            &mut stream,
            addr,
            &format!("{base}/chunks/{leaf}"),
            false,
        )? {
            (200, body) => body,
            (410, _) => {
                fetched.beyond_history = true;
                return Ok(fetched);
            }
            (status, _) => return Err(http_refusal(endpoint, status)),
        };
        fetched.items.push((manifest, chunk));
    }
    Ok(fetched)
}

fn connect(endpoint: Endpoint, addr: SocketAddr, dial: Dial) -> Result<TcpStream, ClientError> {
    let io = |source| ClientError::Io { endpoint, source };
    let stream = match dial.local {
        None => TcpStream::connect_timeout(&addr, dial.timeout).map_err(io)?,
        Some(local) => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .map_err(io)?;
            socket.bind(&SocketAddr::new(local, 0).into()).map_err(io)?;
            socket
                .connect_timeout(&addr.into(), dial.timeout)
                .map_err(io)?;
            socket.into()
        }
    };
    stream.set_read_timeout(Some(dial.timeout)).map_err(io)?;
    stream.set_write_timeout(Some(dial.timeout)).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    Ok(stream)
}

fn send_frame(
    endpoint: Endpoint,
    stream: &mut TcpStream,
    frame: &FrameRepr<'_>,
) -> Result<(), ClientError> {
    let mut buf = vec![0u8; frame.buffer_len()];
    let len = frame.emit(&mut buf).map_err(|e| protocol(endpoint, e))?;
    stream
        .write_all(&buf[..len])
        .map_err(|source| ClientError::Io { endpoint, source })
}

/// Reads whole frames off a stream, never buffering more than one maximal frame.
#[derive(Default)]
struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    fn next(&mut self, endpoint: Endpoint, stream: &mut impl Read) -> Result<Vec<u8>, ClientError> {
        let mut chunk = [0u8; 4_096];
        loop {
            if let Some(len) = FrameRepr::peek_len(&self.buf).map_err(|e| protocol(endpoint, e))? {
                if self.buf.len() >= len {
                    let rest = self.buf.split_off(len);
                    return Ok(std::mem::replace(&mut self.buf, rest));
                }
            }
            if self.buf.len() > PREFIX_LEN + MAX_FRAME_LEN as usize {
                return Err(protocol(endpoint, "oversized frame"));
            }
            let n = stream
                .read(&mut chunk)
                .map_err(|source| ClientError::Io { endpoint, source })?;
            if n == 0 {
                return Err(protocol(endpoint, "connection closed mid-stream"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The largest HTTP response this client reads (a manifest or a chunk is a datagram's worth).
const MAX_HTTP_RESPONSE: usize = 256 * 1024;

/// One GET on a keep-alive connection: returns the status and the body.
fn http_get(
    endpoint: Endpoint,
    stream: &mut TcpStream,
    addr: SocketAddr,
    path: &str,
    close: bool,
) -> Result<(u16, Vec<u8>), ClientError> {
    let io = |source| ClientError::Io { endpoint, source };
    let connection = if close { "close" } else { "keep-alive" };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    let head = read_head(endpoint, stream)?;
    let length = head
        .header("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| protocol(endpoint, "no Content-Length"))?;
    if length > MAX_HTTP_RESPONSE {
        return Err(protocol(endpoint, "response too large"));
    }
    let mut body = head.rest;
    let mut chunk = [0u8; 4_096];
    while body.len() < length {
        let n = stream.read(&mut chunk).map_err(io)?;
        if n == 0 {
            return Err(protocol(endpoint, "connection closed mid-body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    // A keep-alive connection: what follows the body belongs to no request of this client.
    body.truncate(length);
    Ok((head.status, body))
}

/// A response head, and the bytes read past it.
struct ResponseHead {
    status: u16,
    headers: Vec<(String, String)>,
    rest: Vec<u8>,
}

impl ResponseHead {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a response head.
fn read_head(endpoint: Endpoint, stream: &mut TcpStream) -> Result<ResponseHead, ClientError> {
    let io = |source| ClientError::Io { endpoint, source };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4_096];
    let started = Instant::now();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head)) => {
                return Ok(ResponseHead {
                    status: response.code.unwrap_or(0),
                    headers: response
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    rest: buf[head..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(protocol(endpoint, e)),
        }
        if buf.len() > MAX_HTTP_RESPONSE || started.elapsed() > Duration::from_secs(60) {
            return Err(protocol(endpoint, "response head too large or too slow"));
        }
        let n = stream.read(&mut chunk).map_err(io)?;
        if n == 0 {
            return Err(protocol(endpoint, "connection closed mid-head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A chunked body (RFC 9112 7.1) read as the bytes it carries; ends at its last chunk.
struct ChunkedBody<R> {
    inner: R,
    /// Bytes left in the current chunk.
    remaining: u64,
    /// The current chunk's data is read: its CRLF comes next.
    after_data: bool,
    done: bool,
}

/// The longest chunk-size line (with extensions) or trailer line read.
const MAX_CHUNK_LINE: u64 = 1_024;

impl<R: BufRead> ChunkedBody<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            remaining: 0,
            after_data: false,
            done: false,
        }
    }

    fn line(&mut self) -> std::io::Result<Vec<u8>> {
        let mut line = Vec::new();
        (&mut self.inner)
            .take(MAX_CHUNK_LINE)
            .read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(invalid_body("chunk line not ended by CRLF"));
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }
}

impl<R: BufRead> Read for ChunkedBody<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            if self.remaining > 0 {
                let want = buf
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                let n = self.inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                self.remaining -= n as u64;
                self.after_data = self.remaining == 0;
                return Ok(n);
            }
            if self.after_data {
                if !self.line()?.is_empty() {
                    return Err(invalid_body("chunk data longer than its size"));
                }
                self.after_data = false;
            }
            let line = self.line()?;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .map(str::trim)
                .filter(|text| !text.is_empty() && text.len() <= 16)
                .and_then(|text| u64::from_str_radix(text, 16).ok())
                .ok_or_else(|| invalid_body("bad chunk size"))?;
            if size == 0 {
                // Trailer fields, up to the empty line.
                for _ in 0..64 {
                    if self.line()?.is_empty() {
                        self.done = true;
                        return Ok(0);
                    }
                }
                return Err(invalid_body("too many trailer fields"));
            }
            self.remaining = size;
        }
    }
}

fn invalid_body(reason: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, reason)
}

fn protocol(endpoint: Endpoint, reason: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol {
        endpoint,
        reason: reason.to_string(),
    }
}

fn refusal(endpoint: Endpoint, code: ErrorCode) -> ClientError {
    match code {
        ErrorCode::RateLimited => ClientError::Refused {
            endpoint,
            reason: "rate limited",
        },
        ErrorCode::Overloaded => ClientError::Refused {
            endpoint,
            reason: "overloaded",
        },
        other => protocol(endpoint, format!("error frame {other:?}")),
    }
}

fn http_refusal(endpoint: Endpoint, status: u16) -> ClientError {
    match status {
        429 => ClientError::Refused {
            endpoint,
            reason: "rate limited",
        },
        503 => ClientError::Refused {
            endpoint,
            reason: "overloaded",
        },
        other => protocol(endpoint, format!("HTTP status {other}")),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::ChunkedBody;

    fn dechunk(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        ChunkedBody::new(bytes).read_to_end(&mut body)?;
        Ok(body)
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        assert_eq!(dechunk(b"00000003\r\nabc\r\n0\r\n\r\n").unwrap(), b"abc");
        assert_eq!(
            dechunk(b"3;x=y\r\nabc\r\nA\r\n0123456789\r\n0\r\nT: v\r\n\r\nnext").unwrap(),
            b"abc0123456789"
        );
        // Read in small pieces.
        let mut body = ChunkedBody::new(&b"5\r\nhello\r\n2\r\n!!\r\n0\r\n\r\n"[..]);
        let mut out = Vec::new();
        let mut piece = [0u8; 2];
        loop {
            let n = body.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&piece[..n]);
        }
        assert_eq!(out, b"hello!!");
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b""[..],
            b"3\r\nab",
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"x\r\nabc\r\n0\r\n\r\n",
            b"\r\n",
            b"3\nabc\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"3\r\nabc\r\n0\r\n",
        ] {
            assert!(dechunk(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
