//! The asking side of resync: a small blocking client for the TCP and HTTP resync endpoints,
//! run on a thread of its own so that an event loop never waits on a connection.
//!
//! [`fetch_streaming`] performs one [`FetchRequest`] of an endpoint (the driver's fetches):
//! each item is handed on as it arrives, one deadline bounds the whole fetch and one byte cap
//! everything read, and exactly one terminal item ends it. [`fetch_items`] and
//! [`fetch_state`] gather a whole answer, each operation bounded by a timeout.
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rekeycast_proto::endpoint::{
    FetchFailure, FetchRequest, FetchWhat, Fetched as Item, ResyncProtocol,
};

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
    /// The whole fetch's deadline passed before it ended.
    #[error("{endpoint}: the fetch's deadline passed")]
    Deadline {
        /// The endpoint.
        endpoint: Endpoint,
    },
    /// The answer exceeded the fetch's byte cap.
    #[error("{endpoint}: the answer exceeded the fetch's byte cap")]
    TooLarge {
        /// The endpoint.
        endpoint: Endpoint,
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
    let dial = Dial::per_operation(local, timeout);
    let mut fetched = Fetched::default();
    let what = FetchWhat::Items { from_seq, leaf };
    let end = fetch_core(&dial, endpoint, group_id, what, &mut |item| {
        if let Item::Item { manifest, chunk } = item {
            fetched.items.push((manifest, chunk));
        }
    })?;
    match end {
        Terminal::End => {}
        Terminal::BeyondHistory => fetched.beyond_history = true,
        // A hole in the endpoint's (a relay's) history: keep what came before it; with
        // nothing, the next endpoint is asked.
        Terminal::NotHeld if !fetched.items.is_empty() => fetched.not_held = true,
        Terminal::NotHeld => return Err(refusal(endpoint, ErrorCode::NotHeld)),
    }
    Ok(fetched)
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
    let dial = Dial::per_operation(local, timeout);
    let mut state = None;
    fetch_core(&dial, endpoint, group_id, FetchWhat::State, &mut |item| {
        if let Item::State(manifest) = item {
            state = Some(manifest);
        }
    })?;
    Ok(state)
}

/// Performs `request` from the local address `local` (`None`: the system chooses), handing
/// each item to `deliver` as it arrives, then exactly one terminal item ([`Item::End`],
/// [`Item::BeyondHistory`], [`Item::NotHeld`] or [`Item::Failed`]).
///
/// The request's `deadline` bounds the whole fetch (connect, request, every item) and its
/// `max_bytes` every byte read; past either the fetch fails with [`FetchFailure::Deadline`] or
/// [`FetchFailure::TooLarge`]. Items delivered before a failure stay delivered: the endpoint
/// that asked verifies each on its own.
pub fn fetch_streaming(
    local: Option<IpAddr>,
    request: &FetchRequest,
    deliver: &mut dyn FnMut(Item),
) {
    fetch_streaming_cancellable(local, request, &FetchCancel::new(), deliver);
}

/// A handle that cancels a running fetch from another thread: the fetch's connections are
/// shut down (a read blocked on one returns at once) and a connection made after the cancel
/// fails at once, so the fetch ends with [`Item::Failed`] soon after.
#[derive(Debug, Clone, Default)]
pub struct FetchCancel(Arc<Mutex<CancelState>>);

#[derive(Debug, Default)]
struct CancelState {
    cancelled: bool,
    /// Clones of the fetch's open connections, to shut them down.
    streams: Vec<TcpStream>,
}

/// A cancelled fetch's connection: carried inside the `std::io::Error` it fails with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the fetch was cancelled")]
struct Cancelled;

impl FetchCancel {
    /// A handle for one fetch, not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the fetch: its connections are shut down, and it makes no other.
    pub fn cancel(&self) {
        let mut state = self.lock();
        state.cancelled = true;
        for stream in state.streams.drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether [`FetchCancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        // The state stays valid whatever a panicking holder did: a flag and a list.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a clone of `stream` to shut down at a cancel; an error if already cancelled.
    fn register(&self, stream: &TcpStream) -> std::io::Result<()> {
        let mut state = self.lock();
        if state.cancelled {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                Cancelled,
            ));
        }
        state.streams.push(stream.try_clone()?);
        Ok(())
    }
}

/// [`fetch_streaming`] that `cancel` can end early: once cancelled, the fetch stops reading
/// and ends with [`Item::Failed`] (what it delivers after the cancel is for nobody: a driver
/// that cancels stops forwarding its items).
pub fn fetch_streaming_cancellable(
    local: Option<IpAddr>,
    request: &FetchRequest,
    cancel: &FetchCancel,
    deliver: &mut dyn FnMut(Item),
) {
    let endpoint = match request.endpoint.protocol {
        ResyncProtocol::Tcp => Endpoint::Tcp(request.endpoint.addr),
        ResyncProtocol::Http => Endpoint::Http(request.endpoint.addr),
    };
    let dial = Dial {
        local,
        per_operation: None,
        deadline: Some(request.deadline),
        max_bytes: request.max_bytes,
        cancel: Some(cancel.clone()),
    };
    let terminal = match fetch_core(&dial, endpoint, request.group_id, request.what, deliver) {
        Ok(Terminal::End) => Item::End,
        Ok(Terminal::BeyondHistory) => Item::BeyondHistory,
        Ok(Terminal::NotHeld) => Item::NotHeld,
        Err(error) => Item::Failed {
            reason: error.failure(),
        },
    };
    deliver(terminal);
}

impl ClientError {
    /// The class of this error, as a fetch reports it.
    pub fn failure(&self) -> FetchFailure {
        match self {
            Self::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                    FetchFailure::Deadline
                }
                _ => FetchFailure::Connection,
            },
            Self::Deadline { .. } => FetchFailure::Deadline,
            Self::TooLarge { .. } => FetchFailure::TooLarge,
            Self::Refused { .. } => FetchFailure::Refused,
            Self::BadEndpoint(_) | Self::Protocol { .. } => FetchFailure::Malformed,
        }
    }
}

/// How a resync stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    /// Everything up to the endpoint's latest message (or its state answer) was served.
    End,
    /// The messages asked for left the endpoint's history.
    BeyondHistory,
    /// The endpoint does not hold the next message asked for.
    NotHeld,
}

/// Where to connect from, and what bounds the fetch.
#[derive(Debug, Clone)]
struct Dial {
    local: Option<IpAddr>,
    /// Bounds each connect, read and write.
    per_operation: Option<Duration>,
    /// Bounds the whole fetch.
    deadline: Option<Instant>,
    /// Bounds every byte read, in all.
    max_bytes: usize,
    /// Shuts the fetch's connections down when cancelled.
    cancel: Option<FetchCancel>,
}

impl Dial {
    fn per_operation(local: Option<IpAddr>, timeout: Duration) -> Self {
        Self {
            local,
            per_operation: Some(timeout),
            deadline: None,
            max_bytes: usize::MAX,
            cancel: None,
        }
    }
}

/// One fetch of `what` from `endpoint`: each item to `deliver`, the way it ended returned.
fn fetch_core(
    dial: &Dial,
    endpoint: Endpoint,
    group_id: u32,
    what: FetchWhat,
    deliver: &mut dyn FnMut(Item),
) -> Result<Terminal, ClientError> {
    // One byte budget for every connection of the fetch (the per-message HTTP fallback opens
    // a second one).
    let mut budget = dial.max_bytes;
    match (endpoint, what) {
        (Endpoint::Tcp(addr), FetchWhat::State) => {
            let mut stream = connect(endpoint, addr, dial, &mut budget)?;
            send_frame(endpoint, &mut stream, &FrameRepr::StateRequest { group_id })?;
            let mut reader = FrameReader::default();
            let frame = reader.next(endpoint, &mut stream)?;
            match FrameRepr::parse(&frame).map_err(|e| protocol(endpoint, e))? {
                FrameRepr::State { manifest, .. } => {
                    deliver(Item::State(manifest.to_vec()));
                    Ok(Terminal::End)
                }
                FrameRepr::Error {
                    code: ErrorCode::NotYetSent,
                    ..
                } => Ok(Terminal::End),
                FrameRepr::Error { code, .. } => Err(refusal(endpoint, code)),
                _ => Err(protocol(endpoint, "unexpected frame")),
            }
        }
        (Endpoint::Http(addr), FetchWhat::State) => {
            let path = format!("/v1/groups/{group_id}/state");
            let mut stream = connect(endpoint, addr, dial, &mut budget)?;
            match http_get(endpoint, &mut stream, addr, &path, true)? {
                (200, body) => {
                    deliver(Item::State(body));
                    Ok(Terminal::End)
                }
                (404, _) => Ok(Terminal::End),
                (status, _) => Err(http_refusal(endpoint, status)),
            }
        }
        (Endpoint::Tcp(addr), FetchWhat::Items { from_seq, leaf }) => {
            let mut stream = connect(endpoint, addr, dial, &mut budget)?;
            let request = FrameRepr::ResyncRequest {
                group_id,
                from_seq,
                leaf,
            };
            send_frame(endpoint, &mut stream, &request)?;
            read_stream(endpoint, &mut stream, deliver)
        }
        (Endpoint::Http(addr), FetchWhat::Items { from_seq, leaf }) => {
            let at = HttpFetch {
                endpoint,
                addr,
                group_id,
                from_seq,
                leaf,
            };
            http_fetch(&at, dial, &mut budget, deliver)
        }
    }
}

/// Reads a resync stream (manifest and chunk frames, then an end or an error frame) to its end,
/// handing each message to `deliver` as it completes: the TCP endpoint's answer to a resync
/// request, and the body of the HTTP endpoint's batched resync route.
fn read_stream(
    endpoint: Endpoint,
    stream: &mut impl Read,
    deliver: &mut dyn FnMut(Item),
) -> Result<Terminal, ClientError> {
    let mut reader = FrameReader::default();
    let mut manifest: Option<(u64, Vec<u8>)> = None;
    // Bounded: a hostile endpoint cannot keep a member reading forever.
    for _ in 0..100_000 {
        let frame = reader.next(endpoint, stream)?;
        match FrameRepr::parse(&frame).map_err(|e| protocol(endpoint, e))? {
            FrameRepr::Manifest { seq, manifest: m } => manifest = Some((seq, m.to_vec())),
            FrameRepr::Chunk { seq, chunk, .. } => match manifest.take() {
                Some((manifest_seq, manifest)) if manifest_seq == seq => {
                    deliver(Item::Item {
                        manifest,
                        chunk: chunk.to_vec(),
                    });
                }
                _ => return Err(protocol(endpoint, "chunk without its manifest")),
            },
            FrameRepr::End { .. } => return Ok(Terminal::End),
            FrameRepr::Error {
                code: ErrorCode::BeyondHistory,
                ..
            } => return Ok(Terminal::BeyondHistory),
            FrameRepr::Error {
                code: ErrorCode::NotYetSent,
                ..
            } => return Ok(Terminal::End),
            FrameRepr::Error {
                code: ErrorCode::NotHeld,
                ..
            } => return Ok(Terminal::NotHeld),
            FrameRepr::Error { code, .. } => return Err(refusal(endpoint, code)),
            _ => return Err(protocol(endpoint, "unexpected frame")),
        }
    }
    Err(protocol(endpoint, "endless stream"))
}

/// What an HTTP resync fetch asks, and of whom.
#[derive(Debug, Clone, Copy)]
struct HttpFetch {
    endpoint: Endpoint,
    addr: SocketAddr,
    group_id: u32,
    from_seq: u64,
    leaf: u32,
}

/// The batched route: one request, one streamed response holding every message.
fn http_fetch(
    at: &HttpFetch,
    dial: &Dial,
    budget: &mut usize,
    deliver: &mut dyn FnMut(Item),
) -> Result<Terminal, ClientError> {
    let HttpFetch {
        endpoint,
        addr,
        group_id,
        from_seq,
        leaf,
    } = *at;
    let mut stream = connect(endpoint, addr, dial, budget)?;
    let path = format!("/v1/groups/{group_id}/resync?from={from_seq}&leaf={leaf}");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|source| io_error(endpoint, source))?;
    let head = read_head(endpoint, &mut stream)?;
    let number = |name: &str| {
        head.header(name)
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    let outcome = match head.status {
        200 => {
            if number(OLDEST_SEQ_HEADER).is_some_and(|oldest| oldest > from_seq) {
                // The first messages wanted are not held: the member must re-register, and
                // what follows them is of no use to it.
                return Ok(Terminal::BeyondHistory);
            }
            let chunked = head
                .header("transfer-encoding")
                .is_some_and(|value| value.trim().eq_ignore_ascii_case("chunked"));
            let length = number("content-length");
            let mut body = std::io::Cursor::new(head.rest).chain(&mut stream);
            if chunked {
                read_stream(
                    endpoint,
                    &mut ChunkedBody::new(BufReader::new(body)),
                    deliver,
                )
            } else {
                // Delimited by a length, or by the close.
                match length {
                    Some(length) => read_stream(endpoint, &mut body.take(length), deliver),
                    None => read_stream(endpoint, &mut body, deliver),
                }
            }
        }
        // Nothing newer than what the member has.
        404 if number(LATEST_SEQ_HEADER).is_some() => Ok(Terminal::End),
        // An endpoint that does not know the batched route (an older relay).
        404 => {
            *budget = stream.budget;
            drop(stream);
            return http_fetch_per_message(at, dial, budget, deliver);
        }
        410 => Ok(Terminal::BeyondHistory),
        status => Err(http_refusal(endpoint, status)),
    };
    *budget = stream.budget;
    outcome
}

/// The per-message routes, two requests per message on one keep-alive connection, for an
/// endpoint without the batched route.
fn http_fetch_per_message(
    at: &HttpFetch,
    dial: &Dial,
    budget: &mut usize,
    deliver: &mut dyn FnMut(Item),
) -> Result<Terminal, ClientError> {
    let HttpFetch {
        endpoint,
        addr,
        group_id,
        from_seq,
        leaf,
    } = *at;
    let mut stream = connect(endpoint, addr, dial, budget)?;
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
            (404, _) => return Ok(Terminal::End),
            // A hole in the endpoint's (a relay's) history.
            (421, _) => return Ok(Terminal::NotHeld),
            (410, _) => return Ok(Terminal::BeyondHistory),
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
            (410, _) => return Ok(Terminal::BeyondHistory),
            (status, _) => return Err(http_refusal(endpoint, status)),
        };
        deliver(Item::Item { manifest, chunk });
    }
    Ok(Terminal::End)
}

/// A connection to a resync endpoint that enforces the fetch's bounds on every read and
/// write: the per-operation timeout, the whole fetch's deadline and its byte budget.
struct Bounded {
    stream: TcpStream,
    per_operation: Option<Duration>,
    deadline: Option<Instant>,
    /// Bytes that may still be read.
    budget: usize,
    /// The read and write timeouts last set on the socket: set again only when the time left
    /// falls below them by more than [`TIMEOUT_SLACK`] (a system call saved per read).
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

/// How far past the deadline one blocking read or write may go, at most.
const TIMEOUT_SLACK: Duration = Duration::from_millis(10);

/// Sets `stream`'s timeout through `set` when `wanted` is shorter than `current` by more than
/// [`TIMEOUT_SLACK`] (or longer at all, or was never set).
fn refresh_timeout(
    current: &mut Option<Duration>,
    wanted: Duration,
    set: impl FnOnce(Option<Duration>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let stale = current.map_or(true, |current| {
        current < wanted || current > wanted + TIMEOUT_SLACK
    });
    if stale {
        set(Some(wanted))?;
        *current = Some(wanted);
    }
    Ok(())
}

/// A fetch's bound was reached: carried inside the `std::io::Error` a read or write returns,
/// so that it keeps its class through the readers stacked on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Exceeded {
    #[error("the fetch's deadline passed")]
    Deadline,
    #[error("the fetch's byte cap was reached")]
    Bytes,
}

impl Bounded {
    /// The time the next operation may take.
    fn timeout(&self) -> std::io::Result<Duration> {
        operation_timeout(self.per_operation, self.deadline)
    }
}

/// The time the next operation may take: the per-operation timeout, cut to what is left
/// before the deadline; an error once the deadline has passed.
fn operation_timeout(
    per_operation: Option<Duration>,
    deadline: Option<Instant>,
) -> std::io::Result<Duration> {
    let left = deadline.map(|at| at.saturating_duration_since(Instant::now()));
    let timeout = match (per_operation, left) {
        (Some(op), Some(left)) => op.min(left),
        (Some(op), None) => op,
        (None, Some(left)) => left,
        // Neither bound: a blocking read may wait an hour, no longer.
        (None, None) => Duration::from_secs(3_600),
    };
    if timeout.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            Exceeded::Deadline,
        ));
    }
    Ok(timeout)
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.budget == 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                Exceeded::Bytes,
            ));
        }
        let timeout = self.timeout()?;
        let stream = &self.stream;
        refresh_timeout(&mut self.read_timeout, timeout, |t| {
            stream.set_read_timeout(t)
        })?;
        let want = buf.len().min(self.budget);
        match self.stream.read(&mut buf[..want]) {
            Ok(n) => {
                self.budget -= n;
                Ok(n)
            }
            Err(e) if is_timeout(&e) && self.deadline.is_some_and(|at| Instant::now() >= at) => {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    Exceeded::Deadline,
                ))
            }
            Err(e) => Err(e),
        }
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let timeout = self.timeout()?;
        let stream = &self.stream;
        refresh_timeout(&mut self.write_timeout, timeout, |t| {
            stream.set_write_timeout(t)
        })?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Whether `error` is a socket timeout (reported as `WouldBlock` on some systems).
fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// The [`ClientError`] of an I/O error, keeping a reached bound's class.
fn io_error(endpoint: Endpoint, source: std::io::Error) -> ClientError {
    match source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Exceeded>())
    {
        Some(Exceeded::Deadline) => ClientError::Deadline { endpoint },
        Some(Exceeded::Bytes) => ClientError::TooLarge { endpoint },
        None => ClientError::Io { endpoint, source },
    }
}

fn connect(
    endpoint: Endpoint,
    addr: SocketAddr,
    dial: &Dial,
    budget: &mut usize,
) -> Result<Bounded, ClientError> {
    let io = |source| io_error(endpoint, source);
    let timeout = operation_timeout(dial.per_operation, dial.deadline).map_err(io)?;
    let stream = match dial.local {
        None => TcpStream::connect_timeout(&addr, timeout).map_err(io)?,
        Some(local) => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .map_err(io)?;
            socket.bind(&SocketAddr::new(local, 0).into()).map_err(io)?;
            socket.connect_timeout(&addr.into(), timeout).map_err(io)?;
            socket.into()
        }
    };
    stream.set_nodelay(true).map_err(io)?;
    if let Some(cancel) = &dial.cancel {
        cancel.register(&stream).map_err(io)?;
    }
    Ok(Bounded {
        stream,
        per_operation: dial.per_operation,
        deadline: dial.deadline,
        budget: *budget,
        read_timeout: None,
        write_timeout: None,
    })
}

fn send_frame(
    endpoint: Endpoint,
    stream: &mut impl Write,
    frame: &FrameRepr<'_>,
) -> Result<(), ClientError> {
    let mut buf = vec![0u8; frame.buffer_len()];
    let len = frame.emit(&mut buf).map_err(|e| protocol(endpoint, e))?;
    stream
        .write_all(&buf[..len])
        .map_err(|source| io_error(endpoint, source))
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
                .map_err(|source| io_error(endpoint, source))?;
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
    stream: &mut (impl Read + Write),
    addr: SocketAddr,
    path: &str,
    close: bool,
) -> Result<(u16, Vec<u8>), ClientError> {
    let io = |source| io_error(endpoint, source);
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
fn read_head(endpoint: Endpoint, stream: &mut impl Read) -> Result<ResponseHead, ClientError> {
    let io = |source| io_error(endpoint, source);
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
