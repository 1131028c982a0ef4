//! The resync endpoints on real sockets: a TCP listener (length-prefixed frames) and an HTTP
//! listener, inside the event loop that owns the history (the GCKS's or a relay's). One driver
//! serves both: each connection is a sans-IO [`crate::resync::connection::Connection`] with
//! its protocol's codec, behind [`AnyConnection`]; this module only accepts, reads, writes,
//! charges requests to their source and closes.
//!
//! What protects the endpoint (DESIGN.md, security rules): connections must earn their slots.
//! Each endpoint (TCP, HTTP) has its own connection budget and a smaller one for connections
//! that have sent nothing yet; a new connection beyond either evicts the connection that made
//! progress least recently among those waiting on their client (the oldest silent one for the
//! silent budget), and is refused (503 / `Overloaded`) only when every slot is busy answering.
//! A source address beyond its own cap is refused. A connection is read at once when
//! accepted, so a client that sends its request with the connect is never silent. Its first
//! byte and its first request have deadlines from the accept (silent and header timeouts),
//! later requests the header timeout from their first byte, and quiet connections the idle
//! timeout (slowloris). A token bucket per source address is charged for every request (429 /
//! `RateLimited`), requests have size caps and the output a cap for clients that ask and
//! never read. Everything served is already signed, so nothing is authenticated here.
//!
//! Deadlines and eviction candidates are kept in ordered sets updated after each event of a
//! connection, so no event costs a scan of all connections.

use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use rekeycast_proto::endpoint::ResyncProtocol;

use crate::resync::connection::{AnyConnection, Counters};
use crate::resync::http::HttpConnection;
use crate::resync::limits::{Limits, RateLimiter};
use crate::resync::tcp::TcpConnection;
use crate::resync::Refusal;
use crate::resync::ResyncSource;

/// Counters of the endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections refused at accept (the per-source cap, or an endpoint full of connections
    /// being answered): answered 503 / `Overloaded`.
    pub refused_overloaded: u64,
    /// Connections closed to make room for a new one (the endpoint's or its silent budget
    /// was full): the ones that made progress least recently, or the oldest silent one.
    pub evicted: u64,
    /// Connections closed because they sent nothing by the silent timeout.
    pub silent_timeouts: u64,
    /// Connections closed because a request (the first one counted from the accept) did not
    /// arrive whole by the header timeout.
    pub header_timeouts: u64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: u64,
    /// Requests rejected as malformed or too large (each closes its connection).
    pub rejected: u64,
    /// Requests refused by the per-source rate limit (each request is charged, pipelined or
    /// not).
    pub rate_limited: u64,
    /// Requests answered, TCP and HTTP: a member's resync is one request on either endpoint
    /// (a connection may carry many). Requests refused by the rate limit are counted in
    /// [`Self::rate_limited`], malformed ones in [`Self::rejected`].
    pub requests: u64,
    /// Resync streams sent to their end (the resyncs served in full).
    pub streams_completed: u64,
    /// Messages (manifest and chunk) sent in resync streams.
    pub messages_served: u64,
    /// Connections closed (by the client, a timeout or an error).
    pub closed: u64,
    /// Connections open now.
    pub open: u64,
}

/// The accept queue of each listener (the system clamps it to `net.core.somaxconn`). Deeper
/// than the usual 128, so that a flood of connections does not overflow it and drop a member's
/// connection attempt (its retry would come a second later).
const LISTEN_BACKLOG: i32 = 4_096;

/// A non-blocking listener on `addr` (address reuse on, as mio's) with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// A resync listener could not be bound or registered.
#[derive(Debug, thiserror::Error)]
#[error("binding the resync {protocol:?} endpoint {addr}")]
pub struct BindError {
    /// The endpoint's protocol.
    pub protocol: ResyncProtocol,
    /// The address asked for.
    pub addr: SocketAddr,
    /// What the system said.
    #[source]
    pub source: std::io::Error,
}

struct Connection {
    stream: TcpStream,
    peer: IpAddr,
    kind: Kind,
    handler: Box<dyn AnyConnection>,
    writable_registered: bool,
    /// The deadline entered in [`Endpoints::deadlines`].
    deadline: Option<Instant>,
    /// The key entered in its budget's `waiting` set.
    waiting: Option<Instant>,
    /// Entered in its budget's `silent` set (under its accept time).
    silent: bool,
}

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Http,
}

impl Kind {
    fn index(self) -> usize {
        match self {
            Self::Tcp => 0,
            Self::Http => 1,
        }
    }
}

/// One endpoint's connections, as its budgets see them.
#[derive(Debug, Default)]
struct Budget {
    /// Connections open.
    open: usize,
    /// Connections that sent nothing yet, by accept time.
    silent: BTreeSet<(Instant, Token)>,
    /// Connections waiting on their client, by their last progress: eviction candidates.
    waiting: BTreeSet<(Instant, Token)>,
}

/// The resync listeners and their connections, for one event loop.
pub(crate) struct Endpoints {
    tcp: Option<TcpListener>,
    http: Option<TcpListener>,
    tcp_token: Token,
    http_token: Token,
    next_token: usize,
    connections: HashMap<Token, Connection>,
    per_source: HashMap<IpAddr, usize>,
    /// The TCP and the HTTP endpoint's budgets ([`Kind::index`]).
    budgets: [Budget; 2],
    /// Every connection's next deadline.
    deadlines: BTreeSet<(Instant, Token)>,
    limits: Limits,
    limiter: RateLimiter,
    counters: EndpointCounters,
    /// The counters of the connections closed so far.
    closed_connections: Counters,
    /// The sources of the requests admitted since the last [`Endpoints::take_admitted`], at
    /// most [`MAX_ADMITTED_HELD`].
    admitted: Vec<IpAddr>,
}

/// Admitted requests' sources held for the loop between two turns, at most.
const MAX_ADMITTED_HELD: usize = 4_096;

impl Endpoints {
    /// Binds the listeners (either may be absent) and registers them with `registry` under
    /// `tcp_token` and `http_token`; connections get tokens from the third token up.
    /// The error's message names the endpoint and its address.
    #[cfg(test)]
    pub(crate) fn bind(
        registry: &Registry,
        tcp: Option<SocketAddr>,
        http: Option<SocketAddr>,
        tokens: (Token, Token, usize),
        limits: Limits,
    ) -> std::io::Result<Self> {
        Self::try_bind(registry, tcp, http, tokens, limits).map_err(|error| {
            let name = match error.protocol {
                ResyncProtocol::Tcp => "TCP",
                ResyncProtocol::Http => "HTTP",
            };
            // The kind stays; the message names the endpoint and its address.
            std::io::Error::new(
                error.source.kind(),
                format!(
                    "binding the resync {name} endpoint {}: {}",
                    error.addr, error.source
                ),
            )
        })
    }

    /// [`Endpoints::bind`] with a typed error: which listener failed, at which address.
    pub(crate) fn try_bind(
        registry: &Registry,
        tcp: Option<SocketAddr>,
        http: Option<SocketAddr>,
        tokens: (Token, Token, usize),
        limits: Limits,
    ) -> Result<Self, BindError> {
        let bind = |addr: Option<SocketAddr>, token: Token, protocol| {
            addr.map(|addr| {
                let failed = |source| BindError {
                    protocol,
                    addr,
                    source,
                };
                let mut listener = listen(addr).map_err(failed)?;
                registry
                    .register(&mut listener, token, Interest::READABLE)
                    .map_err(failed)?;
                Ok(listener)
            })
            .transpose()
        };
        let tcp = bind(tcp, tokens.0, ResyncProtocol::Tcp)?;
        let http = bind(http, tokens.1, ResyncProtocol::Http)?;
        Ok(Self {
            tcp,
            http,
            tcp_token: tokens.0,
            http_token: tokens.1,
            next_token: tokens.2,
            connections: HashMap::new(),
            per_source: HashMap::new(),
            budgets: Default::default(),
            deadlines: BTreeSet::new(),
            limiter: RateLimiter::new(&limits),
            limits,
            counters: EndpointCounters::default(),
            admitted: Vec::new(),
            closed_connections: Counters::default(),
        })
    }

    /// The listeners' bound addresses (TCP, HTTP).
    pub(crate) fn local_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        (addr(&self.tcp), addr(&self.http))
    }

    /// The counters.
    pub(crate) fn counters(&self) -> EndpointCounters {
        let mut connections = self.closed_connections;
        for connection in self.connections.values() {
            connections.add(connection.handler.counters());
        }
        EndpointCounters {
            open: self.connections.len() as u64,
            requests: connections.requests,
            streams_completed: connections.streams_completed,
            messages_served: connections.messages_served,
            silent_timeouts: connections.silent_timeouts,
            header_timeouts: connections.header_timeouts,
            idle_timeouts: connections.idle_timeouts,
            rejected: connections.rejected,
            ..self.counters
        }
    }

    /// The sources of the requests admitted since the last call, in order.
    pub(crate) fn take_admitted(&mut self) -> Vec<IpAddr> {
        std::mem::take(&mut self.admitted)
    }

    /// Handles a readiness event of one of this set's tokens.
    pub(crate) fn handle_event(
        &mut self,
        registry: &Registry,
        now: Instant,
        event: &mio::event::Event,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        let token = event.token();
        if token == self.tcp_token {
            self.accept(registry, now, Kind::Tcp, source, metrics);
        } else if token == self.http_token {
            self.accept(registry, now, Kind::Http, source, metrics);
        } else {
            self.service(registry, now, token, source, metrics);
        }
    }

    /// Runs the connections' timers that are due.
    pub(crate) fn handle_timeouts(
        &mut self,
        registry: &Registry,
        now: Instant,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        let mut due = Vec::new();
        while let Some(&(at, token)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(connection) = self.connections.get_mut(&token) {
                connection.deadline = None;
                due.push(token);
            }
        }
        for token in due {
            if let Some(connection) = self.connections.get_mut(&token) {
                connection.handler.handle_timeout(now);
            }
            self.flush(registry, token, now, source, metrics);
            self.refresh(token);
        }
    }

    /// The earliest connection deadline.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(at, _)| at)
    }

    /// Enters the connection's current deadline, eviction rank and silence in the ordered
    /// sets, after anything that may have changed them.
    fn refresh(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        let budget = &mut self.budgets[connection.kind.index()];
        let deadline = connection.handler.poll_timeout();
        if deadline != connection.deadline {
            if let Some(old) = connection.deadline {
                self.deadlines.remove(&(old, token));
            }
            if let Some(new) = deadline {
                self.deadlines.insert((new, token));
            }
            connection.deadline = deadline;
        }
        let waiting = connection.handler.waiting_since();
        if waiting != connection.waiting {
            if let Some(old) = connection.waiting {
                budget.waiting.remove(&(old, token));
            }
            if let Some(new) = waiting {
                budget.waiting.insert((new, token));
            }
            connection.waiting = waiting;
        }
        let silent = connection.handler.is_silent();
        if silent != connection.silent {
            let key = (connection.handler.accepted_at(), token);
            if silent {
                budget.silent.insert(key);
            } else {
                budget.silent.remove(&key);
            }
            connection.silent = silent;
        }
    }

    /// Makes room in `kind`'s budgets for a new connection, evicting what must go; false if
    /// the endpoint is full of connections being answered.
    fn make_room(&mut self, registry: &Registry, kind: Kind) -> bool {
        let budget = &self.budgets[kind.index()];
        if budget.silent.len() >= self.limits.max_silent_connections {
            if let Some(&(_, oldest)) = budget.silent.first() {
                self.evict(registry, oldest);
            }
        }
        let budget = &self.budgets[kind.index()];
        if budget.open < self.limits.max_connections {
            return true;
        }
        match budget.waiting.first() {
            Some(&(_, stalest)) => {
                self.evict(registry, stalest);
                true
            }
            None => false,
        }
    }

    fn evict(&mut self, registry: &Registry, token: Token) {
        self.counters.evicted += 1;
        self.close(registry, token);
    }

    fn accept(
        &mut self,
        registry: &Registry,
        now: Instant,
        kind: Kind,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        // Bounded per wake-up; the listener stays readable and the next poll continues.
        for _ in 0..1_024 {
            let listener = match kind {
                Kind::Tcp => self.tcp.as_ref(),
                Kind::Http => self.http.as_ref(),
            };
            let Some(listener) = listener else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Out of descriptors and the like: stop accepting for this wake-up.
                Err(_) => return,
            };
            let peer = peer.ip();
            let handler: Box<dyn AnyConnection> = match kind {
                Kind::Http => Box::new(HttpConnection::new(now, &self.limits)),
                Kind::Tcp => Box::new(TcpConnection::new(now, &self.limits)),
            };
            let token = Token(self.next_token);
            self.next_token += 1;
            let mut connection = Connection {
                stream,
                peer,
                kind,
                handler,
                writable_registered: false,
                deadline: None,
                waiting: None,
                silent: false,
            };
            let from_source = self.per_source.get(&peer).copied().unwrap_or(0);
            let overloaded = from_source >= self.limits.max_connections_per_source
                || !self.make_room(registry, kind);
            if overloaded {
                // Answer once, best effort, and close: the client tries another endpoint.
                self.counters.refused_overloaded += 1;
                connection.handler.refuse(Refusal::Overloaded);
                let _ = connection.stream.write(connection.handler.output());
                continue;
            }
            if registry
                .register(&mut connection.stream, token, Interest::READABLE)
                .is_err()
            {
                continue;
            }
            self.counters.accepted += 1;
            *self.per_source.entry(peer).or_insert(0) += 1;
            self.budgets[kind.index()].open += 1;
            self.connections.insert(token, connection);
            // Read at once: a request sent with the connect is served now, and its connection
            // never counts as silent.
            self.service(registry, now, token, source, metrics);
        }
    }

    /// Reads, answers and writes what a connection's readiness allows, then enters its new
    /// state in the ordered sets.
    fn service(
        &mut self,
        registry: &Registry,
        now: Instant,
        token: Token,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        self.service_io(registry, now, token, source, metrics);
        self.refresh(token);
    }

    fn service_io(
        &mut self,
        registry: &Registry,
        now: Instant,
        token: Token,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        let mut buf = [0u8; 4_096];
        // Bounded reads per wake-up; a fast client cannot monopolise the loop.
        let mut reads = 0;
        loop {
            // Reading stops while the connection has answers to write: a pipelining client's
            // requests wait in its socket, not in memory here. Readiness is edge-triggered, so
            // once the answers are written, reading resumes here, not at the next event.
            let mut paused = false;
            while reads < 64 {
                let Some(connection) = self.connections.get_mut(&token) else {
                    return;
                };
                if !connection.handler.wants_input() {
                    paused = !connection.handler.wants_close();
                    break;
                }
                reads += 1;
                match connection.stream.read(&mut buf) {
                    Ok(0) => {
                        // The client shut its side: what it asked before is still answered.
                        connection.handler.handle_end_of_input(now);
                        break;
                    }
                    Ok(n) => {
                        // Every request is charged to its source, however many one read holds.
                        let (limiter, counters, peer, admitted) = (
                            &mut self.limiter,
                            &mut self.counters,
                            connection.peer,
                            &mut self.admitted,
                        );
                        let mut admit = || {
                            if limiter.allow(now, peer) {
                                if admitted.len() < MAX_ADMITTED_HELD {
                                    admitted.push(peer);
                                }
                                Ok(())
                            } else {
                                counters.rate_limited += 1;
                                Err(Refusal::RateLimited)
                            }
                        };
                        connection.handler.handle_input_admitting(
                            now,
                            &buf[..n],
                            source,
                            metrics,
                            &mut admit,
                        );
                        if connection.handler.output().len() > self.limits.max_output_bytes {
                            // One answer over the output cap.
                            self.close(registry, token);
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.close(registry, token);
                        return;
                    }
                }
            }
            self.flush(registry, token, now, source, metrics);
            let Some(connection) = self.connections.get_mut(&token) else {
                return;
            };
            if !(paused || reads >= 64) || !connection.handler.wants_input() {
                return;
            }
            if reads >= 64 {
                // This wake-up's read budget is spent and bytes may be left: re-arm the
                // readiness so that the next poll comes back here after the other connections.
                let interest = if connection.writable_registered {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                let _ = registry.reregister(&mut connection.stream, token, interest);
                return;
            }
        }
    }

    /// Writes what the handler has (continuing a TCP resync stream as its output drains),
    /// closes when it is done, and waits for writability when the socket is full.
    fn flush(
        &mut self,
        registry: &Registry,
        token: Token,
        now: Instant,
        source: &dyn ResyncSource,
        metrics: &dyn Fn() -> String,
    ) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        loop {
            if connection.handler.output().is_empty() && connection.handler.has_more_to_send() {
                // Continuing a stream answers no new request: nothing to charge.
                connection.handler.handle_input_admitting(
                    now,
                    &[],
                    source,
                    metrics,
                    &mut || Ok(()),
                );
            }
            let output = connection.handler.output();
            if output.is_empty() {
                break;
            }
            match connection.stream.write(output) {
                Ok(0) => {
                    self.close(registry, token);
                    return;
                }
                Ok(n) => connection.handler.consume_output(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if !connection.writable_registered {
                        connection.writable_registered = registry
                            .reregister(
                                &mut connection.stream,
                                token,
                                Interest::READABLE | Interest::WRITABLE,
                            )
                            .is_ok();
                    }
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(registry, token);
                    return;
                }
            }
        }
        if connection.handler.wants_close() {
            self.close(registry, token);
        } else if connection.writable_registered {
            connection.writable_registered = registry
                .reregister(&mut connection.stream, token, Interest::READABLE)
                .is_err();
        }
    }

    fn close(&mut self, registry: &Registry, token: Token) {
        if let Some(mut connection) = self.connections.remove(&token) {
            let _ = registry.deregister(&mut connection.stream);
            let budget = &mut self.budgets[connection.kind.index()];
            budget.open = budget.open.saturating_sub(1);
            if let Some(at) = connection.deadline {
                self.deadlines.remove(&(at, token));
            }
            if let Some(at) = connection.waiting {
                budget.waiting.remove(&(at, token));
            }
            if connection.silent {
                budget
                    .silent
                    .remove(&(connection.handler.accepted_at(), token));
            }
            self.counters.closed += 1;
            self.closed_connections.add(connection.handler.counters());
            if let Some(count) = self.per_source.get_mut(&connection.peer) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_source.remove(&connection.peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_address_is_named_with_its_endpoint() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let poll = mio::Poll::new().unwrap();
        let tokens = (Token(0), Token(1), 2);
        for (tcp, http, name) in [(Some(addr), None, "TCP"), (None, Some(addr), "HTTP")] {
            let Err(error) = Endpoints::bind(poll.registry(), tcp, http, tokens, Limits::default())
            else {
                panic!("{addr} bound twice");
            };
            let text = crate::report::Chain(&error).to_string();
            assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{text}");
            assert!(
                text.starts_with(&format!("binding the resync {name} endpoint {addr}: ")),
                "{text}"
            );
            assert_eq!(text.matches("in use").count(), 1, "{text}");
        }
    }
}
