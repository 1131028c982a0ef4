//! The driver: one thread that runs any sans-IO [`Endpoint`] over real sockets, threads and
//! files, so that every policy around an endpoint is written once.
//!
//! [`Driver::spawn`] opens the sockets of the ports the [`DriverConfig`] names (and only
//! those), binds the resync listeners it asks for, and starts the loop's thread; the
//! [`DriverHandle`] it returns sends [`Control`]s (commands for the endpoint, inspections,
//! stop, abort) through a channel that wakes the loop, and joins the thread. Each turn of the
//! loop:
//!
//! 1. waits on the mio poll until a socket, the waker, a resync connection or the next
//!    deadline (the endpoint's [`Endpoint::poll_timeout`], the resync connections' timeouts)
//!    is due, and records how late it woke after a deadline in the loop-lag histogram;
//! 2. receives on each readable port, at most [`RECEIVE_BUDGET`] datagrams a port per turn
//!    (what is left is read on the next turn, which then does not sleep), so that commands
//!    and timers run under a flood; each datagram passes the receive filter (simulated loss
//!    in tests and the demo), then on [`Port::Serve`] its source's token bucket (feedback
//!    from a host over its rate is dropped and counted before anything parses it), then goes
//!    to [`Endpoint::handle_datagram`];
//! 3. serves the resync connections from [`Endpoint::resync_source`];
//! 4. handles the controls, then what came back from the other threads: finished jobs
//!    ([`Endpoint::handle_job_result`], or [`Endpoint::handle_job_panicked`]), applied store
//!    operations ([`Endpoint::handle_stored`]), streamed fetch items
//!    ([`Endpoint::handle_fetched`]); then the endpoint's timeout when it is due;
//! 5. drains the endpoint's outputs: store operations go, in order, to the one storage
//!    thread (so an fsync never stalls the loop); jobs to the worker pool; fetches each to a
//!    fetch thread that streams the answer back item by item (at most
//!    [`DriverConfig::max_fetches`] at once, the others wait in order; a fetch the endpoint
//!    cancels ([`Endpoint::poll_cancel_fetch`]) has its connection shut down and nothing more
//!    of it forwarded); datagrams to their port's
//!    socket, gathered into UDP GSO batches of up to [`BATCH_DATAGRAMS`] where the socket can,
//!    with a bounded per-port backlog, kept in order, when the socket would block; events to
//!    the [`EventSink`] (by default a bounded channel that drops and counts when full).
//!
//! The loop ends on [`Control::Stop`] (after sending what the endpoint has to send and what
//! waits in the backlogs, and after the storage thread has applied what it was given), on
//! [`Control::Abort`] (at once: nothing more is sent or stored), when the handle is gone, or
//! when the endpoint says it [`Endpoint::is_stopped`] (as for a stop).
//!
//! Counters and the loop lag are a [`DriverStats`], read with [`DriverHandle::stats`], by an
//! inspection, and by the closure that renders the resync server's `/metrics` text (at most
//! once a second). Lifecycle, storage failures, job panics and dropped events are logged with
//! `tracing`.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token, Waker};
use rekeycast_proto::endpoint::{
    Destination, Endpoint, FetchFailure, FetchId, FetchRequest, Fetched, Job, Port, Storage,
    StoreError, StoreErrorKind, StoreId, Transmit,
};
use rekeycast_proto::resync::limits::{Limits, RateLimiter};
use rekeycast_proto::resync::{Lookup, ResyncSource};

use crate::io::resync_client::{fetch_streaming_cancellable, FetchCancel};
use crate::io::resync_server::{BindError, EndpointCounters, Endpoints};
use crate::io::socket::{MulticastConfig, MulticastSocket, SocketError};
use crate::io::workers::{JobPanicked, WorkerPool};

/// Datagrams read from one port in one turn of the loop, at most.
pub const RECEIVE_BUDGET: usize = 4_096;
/// Datagrams gathered for one batched (GSO) send.
pub const BATCH_DATAGRAMS: usize = 64;
/// Batches sent in one turn of the loop, at most: a fast endpoint cannot starve receiving.
const TRANSMIT_ROUNDS: usize = 256;
/// Controls handled in one turn of the loop, at most.
const CONTROL_BUDGET: usize = 1_024;
/// The capacity of the default event channel.
pub const DEFAULT_EVENT_CAPACITY: usize = 4_096;
/// The default of [`DriverConfig::max_fetches`].
pub const DEFAULT_MAX_FETCHES: usize = 4;
/// How long [`DriverHandle::inspect`] waits for the loop's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The span of the recent loop-lag view: the last full window and the current one.
const LAG_WINDOW: Duration = Duration::from_secs(10);
/// How often dropped events are logged after the first, at most.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

const WAKER: Token = Token(3);
const RESYNC_TCP: Token = Token(4);
const RESYNC_HTTP: Token = Token(5);
/// Resync connections get tokens from here up.
const FIRST_CONNECTION: usize = 16;

/// What a [`DriverHandle`] sends its loop.
pub enum Control<E: Endpoint> {
    /// A command for the endpoint ([`Endpoint::handle_command`]).
    Command(E::Command),
    /// Runs on the loop's thread with the endpoint and the driver's figures: how a handle
    /// reads an endpoint's state or answers synchronously (through a reply channel the
    /// closure holds).
    Inspect(Inspection<E>),
    /// Sends what the endpoint has to send and what waits in the backlogs, lets the storage
    /// thread finish what it was given, then ends the loop.
    Stop,
    /// Ends the loop at once: nothing more is sent or stored.
    Abort,
}

impl<E: Endpoint> std::fmt::Debug for Control<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Command(_) => "Command",
            Self::Inspect(_) => "Inspect",
            Self::Stop => "Stop",
            Self::Abort => "Abort",
        })
    }
}

/// A closure run on the loop's thread with the endpoint and the driver's figures.
pub type Inspection<E> = Box<dyn FnOnce(&mut E, &DriverStats) + Send>;

/// Decides whether a received datagram is handed on (`true`) or dropped (`false`): how the
/// demo and tests inject simulated loss. Called with the port, the source and the bytes.
pub type ReceiveFilter = Box<dyn FnMut(Port, SocketAddr, &[u8]) -> bool + Send>;

/// Renders the resync server's `/metrics` text from the endpoint and the driver's figures.
pub type MetricsText<E> = Box<dyn FnMut(&E, &DriverStats) -> String + Send>;

/// Where an endpoint's events go: the engine's policy for them (a GCKS routes join answers to
/// their waiters, so none is ever dropped); [`ChannelSink`] is the default.
pub trait EventSink<T>: Send {
    /// Delivers `event`, or says it was dropped (counted and logged by the driver).
    fn deliver(&mut self, event: T) -> Delivery;
}

/// What became of an event handed to an [`EventSink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It was delivered (or nobody listens any more: there is no one to lose it for).
    Delivered,
    /// It was dropped: the owner does not keep up.
    Dropped,
}

/// The default [`EventSink`]: a bounded channel; an event that finds it full is dropped and
/// counted, so an owner that does not read its events costs a bounded amount of memory.
#[derive(Debug)]
pub struct ChannelSink<T> {
    sender: Sender<T>,
}

impl<T> ChannelSink<T> {
    /// A sink over `sender` (a bounded channel's, for the drop-and-count policy).
    pub fn new(sender: Sender<T>) -> Self {
        Self { sender }
    }
}

impl<T: Send> EventSink<T> for ChannelSink<T> {
    fn deliver(&mut self, event: T) -> Delivery {
        match self.sender.try_send(event) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => Delivery::Delivered,
            Err(TrySendError::Full(_)) => Delivery::Dropped,
        }
    }
}

/// A [`ChannelSink`] over a new channel holding at most `capacity` events, and the receiving
/// end for the owner.
pub fn bounded_events<T: Send>(capacity: usize) -> (ChannelSink<T>, Receiver<T>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity);
    (ChannelSink::new(sender), receiver)
}

/// A socket that sends: its multicast settings (the group is where [`Destination::Group`]
/// goes) and its local address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderPort {
    /// The group and the multicast settings.
    pub multicast: MulticastConfig,
    /// The local address to bind (port 0: the system chooses).
    pub bind: SocketAddr,
}

/// The per-source token bucket on datagrams arriving on [`Port::Serve`] (members'
/// feedback): a host over it costs one table lookup per datagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedbackLimit {
    /// The sustained rate allowed per source address. Default 2,000 datagrams a second.
    pub datagrams_per_second: f64,
    /// The burst allowed per source address. Default 4,000 datagrams.
    pub burst: u32,
}

impl Default for FeedbackLimit {
    fn default() -> Self {
        Self {
            datagrams_per_second: 2_000.0,
            burst: 4_000,
        }
    }
}

/// What a driver opens and how it behaves. [`DriverConfig::new`] gives the production
/// defaults with no port; set the ports the endpoint uses.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DriverConfig {
    /// Names the loop's thread (and, with a suffix, its other threads) and its log lines.
    pub name: String,
    /// The socket the endpoint serves a group from ([`Port::Serve`]).
    pub serve: Option<SenderPort>,
    /// The group socket the endpoint listens to ([`Port::Listen`]).
    pub listen: Option<MulticastConfig>,
    /// The unicast socket towards the listened group's sender ([`Port::Feedback`]); its
    /// [`Destination::Group`] is that group.
    pub feedback: Option<SenderPort>,
    /// The resync TCP endpoint's address, served from [`Endpoint::resync_source`].
    pub resync_tcp: Option<SocketAddr>,
    /// The resync HTTP endpoint's address.
    pub resync_http: Option<SocketAddr>,
    /// The resync endpoints' limits.
    pub resync_limits: Limits,
    /// The per-source limit on [`Port::Serve`]'s incoming datagrams; `None`: no limit.
    /// Default: [`FeedbackLimit::default`].
    pub feedback_limit: Option<FeedbackLimit>,
    /// Worker threads for jobs (started at the first job); 0: one per core. Default 0.
    pub workers: usize,
    /// The largest datagram the endpoint sends: the room each `poll_transmit` gets.
    /// Default 2,048 bytes.
    pub max_datagram_size: usize,
    /// Datagrams held per port while its socket would block, at most; beyond, they are
    /// dropped and counted (as lost on the network). Default 8,192.
    pub max_backlog: usize,
    /// How long a stop waits for the backlogs to drain. Default 2 s.
    pub stop_drain_timeout: Duration,
    /// The local address fetches connect from (so that an endpoint's per-source limits count
    /// this host's own address); `None`: the feedback port's address when it is a specific
    /// one, else the system chooses.
    pub fetch_local: Option<IpAddr>,
    /// Fetches running at once (a thread each), at most; more wait, in order, until one
    /// ends (0 counts as 1). Default [`DEFAULT_MAX_FETCHES`].
    pub max_fetches: usize,
}

impl DriverConfig {
    /// A configuration named `name` with no port, no resync endpoint and production defaults.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            serve: None,
            listen: None,
            feedback: None,
            resync_tcp: None,
            resync_http: None,
            resync_limits: Limits::default(),
            feedback_limit: Some(FeedbackLimit::default()),
            workers: 0,
            max_datagram_size: 2_048,
            max_backlog: 8_192,
            stop_drain_timeout: Duration::from_secs(2),
            fetch_local: None,
            max_fetches: DEFAULT_MAX_FETCHES,
        }
    }
}

/// Which of the driver's threads could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverThread {
    /// The loop's own thread.
    Loop,
}

/// Why a driver could not start or ended with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// A port's socket could not be opened at its address.
    #[error("opening the {port:?} socket at {addr}")]
    Bind {
        /// The port.
        port: Port,
        /// The address asked for (the group, for [`Port::Listen`]).
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: SocketError,
    },
    /// A resync listener could not be bound.
    #[error(transparent)]
    ResyncBind(#[from] BindError),
    /// The poll, its waker or a registration failed.
    #[error("the event loop's poll")]
    Poll(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("starting the driver's {thread:?} thread")]
    Spawn {
        /// Which thread.
        thread: DriverThread,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The loop has ended (or did not answer in time).
    #[error("the driver's loop has ended")]
    Gone,
    /// The loop's thread panicked.
    #[error("the driver's loop panicked")]
    Panicked,
}

/// Percentiles of how late the loop woke after a deadline, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopLag {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
    /// Samples.
    pub count: u64,
}

impl LoopLag {
    fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            p50: histogram.value_at_quantile(0.5),
            p90: histogram.value_at_quantile(0.9),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
            count: histogram.len(),
        }
    }
}

/// Counts per port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounts {
    /// On [`Port::Serve`].
    pub serve: u64,
    /// On [`Port::Listen`].
    pub listen: u64,
    /// On [`Port::Feedback`].
    pub feedback: u64,
}

impl PortCounts {
    fn slot(&mut self, index: usize) -> &mut u64 {
        match index {
            SERVE => &mut self.serve,
            LISTEN => &mut self.listen,
            _ => &mut self.feedback,
        }
    }
}

/// The driver's figures (the endpoint keeps its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Datagrams received, per port (before the filter and the feedback limit).
    pub received: PortCounts,
    /// Datagrams the receive filter dropped.
    pub filtered: u64,
    /// Datagrams on [`Port::Serve`] dropped by their source's rate limit.
    pub feedback_rate_limited: u64,
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// Sends that found a socket's buffer full.
    pub send_blocked: u64,
    /// Datagrams lost to a send error (no route, a refused unicast).
    pub send_failed: u64,
    /// Datagrams for a port without a socket (or for [`Port::Listen`]), dropped.
    pub unroutable: u64,
    /// Datagrams waiting in the backlogs now.
    pub backlog: u64,
    /// Datagrams dropped because a backlog was full (or at the end of a stop's drain).
    pub backlog_dropped: u64,
    /// Events handed to the sink.
    pub events_delivered: u64,
    /// Events the sink dropped.
    pub events_dropped: u64,
    /// Jobs started.
    pub jobs_started: u64,
    /// Jobs that panicked.
    pub jobs_panicked: u64,
    /// Store operations applied durably.
    pub stores_applied: u64,
    /// Store operations that failed.
    pub stores_failed: u64,
    /// Fetches started.
    pub fetches_started: u64,
    /// Fetches that ended in [`Fetched::Failed`].
    pub fetches_failed: u64,
    /// Fetches the endpoint cancelled ([`Endpoint::poll_cancel_fetch`]) before their end.
    pub fetches_cancelled: u64,
    /// Fetches waiting now for one of the [`DriverConfig::max_fetches`] to end.
    pub fetches_queued: u64,
    /// The loop's lag since it started.
    pub lag: LoopLag,
    /// The loop's lag over the last 10 to 20 seconds.
    pub recent_lag: LoopLag,
    /// The resync server's counters.
    pub resync: EndpointCounters,
    /// Moves of [`Port::Listen`] to another group ([`Endpoint::poll_listen`]).
    pub listen_moves: u64,
    /// Such moves whose new socket could not be opened (the old group is kept).
    pub listen_move_failures: u64,
}

/// The addresses a driver's sockets and listeners are bound to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    /// [`Port::Serve`]'s (where feedback goes).
    pub serve: Option<SocketAddr>,
    /// [`Port::Listen`]'s (the group and port, on Linux).
    pub listen: Option<SocketAddr>,
    /// [`Port::Feedback`]'s.
    pub feedback: Option<SocketAddr>,
    /// The resync TCP endpoint's.
    pub resync_tcp: Option<SocketAddr>,
    /// The resync HTTP endpoint's.
    pub resync_http: Option<SocketAddr>,
}

impl LocalAddrs {
    /// The address of `port`'s socket, if the driver opened one.
    pub fn port(&self, port: Port) -> Option<SocketAddr> {
        match port {
            Port::Serve => self.serve,
            Port::Listen => self.listen,
            Port::Feedback => self.feedback,
        }
    }
}

/// A driver ready to start: an endpoint, its configuration, its storage and its event sink.
pub struct Driver<E: Endpoint> {
    endpoint: E,
    config: DriverConfig,
    storage: Box<dyn Storage<E::StoreOp> + Send>,
    sink: Box<dyn EventSink<E::Event>>,
    metrics: Option<MetricsText<E>>,
    filter: Option<ReceiveFilter>,
    send_gate: SendGate,
}

impl<E> Driver<E>
where
    E: Endpoint + Send + 'static,
    E::Command: Send + 'static,
    E::Event: Send + 'static,
    E::StoreOp: Send + 'static,
{
    /// A driver of `endpoint` that applies its store operations with `storage` and hands its
    /// events to `sink` ([`bounded_events`] gives the default one).
    pub fn new(
        endpoint: E,
        config: DriverConfig,
        storage: impl Storage<E::StoreOp> + Send + 'static,
        sink: impl EventSink<E::Event> + 'static,
    ) -> Self {
        Self {
            endpoint,
            config,
            storage: Box::new(storage),
            sink: Box::new(sink),
            metrics: None,
            filter: None,
            send_gate: SendGate::default(),
        }
    }

    /// Renders the resync server's `/metrics` text with `metrics` (at most once a second).
    pub fn metrics(mut self, metrics: MetricsText<E>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Passes every received datagram through `filter` first (simulated loss).
    pub fn receive_filter(mut self, filter: ReceiveFilter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Makes the next `closed_for` sends (the count is read as they happen) report that the
    /// socket would block.
    #[cfg(test)]
    fn send_gate(mut self, closed_for: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        self.send_gate = SendGate { closed_for };
        self
    }

    /// Opens the sockets and listeners and starts the loop's thread.
    pub fn spawn(self) -> Result<DriverHandle<E>, DriverError> {
        let Self {
            endpoint,
            config,
            storage,
            sink,
            metrics,
            filter,
            send_gate,
        } = self;
        let poll = Poll::new().map_err(DriverError::Poll)?;
        let mut sockets: [Option<MulticastSocket>; 3] = [None, None, None];
        let mut groups: [Option<SocketAddr>; 3] = [None, None, None];
        let bind_error = |port, addr| move |source| DriverError::Bind { port, addr, source };
        if let Some(serve) = &config.serve {
            let (socket, _) = MulticastSocket::sender(&serve.multicast, serve.bind)
                .map_err(bind_error(Port::Serve, serve.bind))?;
            sockets[SERVE] = Some(socket);
            groups[SERVE] = Some(serve.multicast.group);
        }
        if let Some(listen) = &config.listen {
            let (socket, _) = MulticastSocket::receiver(listen)
                .map_err(bind_error(Port::Listen, listen.group))?;
            sockets[LISTEN] = Some(socket);
        }
        if let Some(feedback) = &config.feedback {
            let (socket, _) = MulticastSocket::sender(&feedback.multicast, feedback.bind)
                .map_err(bind_error(Port::Feedback, feedback.bind))?;
            sockets[FEEDBACK] = Some(socket);
            groups[FEEDBACK] = Some(feedback.multicast.group);
        }
        let mut addrs = LocalAddrs::default();
        for (index, socket) in sockets.iter_mut().enumerate() {
            let Some(socket) = socket else {
                continue;
            };
            let interest = if index == LISTEN {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            poll.registry()
                .register(socket, Token(index), interest)
                .map_err(DriverError::Poll)?;
            let addr = socket.local_addr().map_err(DriverError::Poll)?;
            match index {
                SERVE => addrs.serve = Some(addr),
                LISTEN => addrs.listen = Some(addr),
                _ => addrs.feedback = Some(addr),
            }
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(DriverError::Poll)?);
        let resync = if config.resync_tcp.is_some() || config.resync_http.is_some() {
            let endpoints = Endpoints::try_bind(
                poll.registry(),
                config.resync_tcp,
                config.resync_http,
                (RESYNC_TCP, RESYNC_HTTP, FIRST_CONNECTION),
                config.resync_limits.clone(),
            )?;
            (addrs.resync_tcp, addrs.resync_http) = endpoints.local_addrs();
            Some(endpoints)
        } else {
            None
        };
        let (control, controls) = crossbeam_channel::unbounded();
        let (job_results, job_results_rx) = crossbeam_channel::unbounded();
        let (stored, stored_rx) = crossbeam_channel::unbounded();
        let (fetched, fetched_rx) = crossbeam_channel::unbounded();
        let limiter = config.feedback_limit.map(|limit| {
            RateLimiter::new(&Limits {
                requests_per_second_per_source: limit.datagrams_per_second,
                burst_per_source: limit.burst,
                ..Limits::default()
            })
        });
        let fetch_local = config.fetch_local.or_else(|| {
            config
                .feedback
                .as_ref()
                .map(|port| port.bind.ip())
                .filter(|ip| !ip.is_unspecified())
        });
        let slot = config.max_datagram_size.max(1);
        let name = config.name.clone();
        let listen_config = config.listen.clone();
        let gate = send_gate;
        let loop_waker = Arc::clone(&waker);
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let now = Instant::now();
                let driver = Loop {
                    name,
                    poll,
                    waker: loop_waker,
                    controls,
                    endpoint,
                    sockets,
                    groups,
                    listen: listen_config,
                    backlogs: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
                    unread: [false; 3],
                    more_to_send: false,
                    batch: vec![0; BATCH_DATAGRAMS * slot],
                    slot,
                    carried: None,
                    resync,
                    metrics,
                    metrics_text: String::new(),
                    metrics_at: now,
                    filter,
                    limiter,
                    workers: None,
                    worker_threads: config.workers,
                    job_results,
                    job_results_rx,
                    storage: StorageState::Idle(Some(storage)),
                    stored,
                    stored_rx,
                    store_abort: Arc::new(AtomicBool::new(false)),
                    fetched,
                    fetched_rx,
                    fetch_local,
                    fetches: HashMap::new(),
                    fetch_queue: VecDeque::new(),
                    max_fetches: config.max_fetches.max(1),
                    gate,
                    sink,
                    stats: DriverStats::default(),
                    lag: new_histogram(),
                    recent_lag: [new_histogram(), new_histogram()],
                    window_started: now,
                    drops_logged_at: None,
                    unroutable_logged: false,
                    max_backlog: config.max_backlog,
                    stop_drain_timeout: config.stop_drain_timeout,
                };
                driver.run()
            })
            .map_err(|source| DriverError::Spawn {
                thread: DriverThread::Loop,
                source,
            })?;
        tracing::info!(
            driver = %config.name,
            serve = ?addrs.serve,
            listen = ?addrs.listen,
            feedback = ?addrs.feedback,
            resync_tcp = ?addrs.resync_tcp,
            resync_http = ?addrs.resync_http,
            "driver started"
        );
        Ok(DriverHandle {
            control,
            waker,
            addrs,
            thread: Some(thread),
        })
    }
}

/// The owner's end of a running driver: sends controls (waking the loop), reads its
/// addresses, stops and joins it. Dropping it stops the loop and waits for it.
pub struct DriverHandle<E: Endpoint> {
    control: Sender<Control<E>>,
    waker: Arc<Waker>,
    addrs: LocalAddrs,
    thread: Option<JoinHandle<Result<(), DriverError>>>,
}

impl<E: Endpoint> std::fmt::Debug for DriverHandle<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverHandle")
            .field("addrs", &self.addrs)
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl<E: Endpoint + 'static> DriverHandle<E> {
    /// Sends `control` and wakes the loop.
    pub fn send(&self, control: Control<E>) -> Result<(), DriverError> {
        self.control.send(control).map_err(|_| DriverError::Gone)?;
        self.waker.wake().map_err(DriverError::Poll)
    }

    /// Sends a command to the endpoint.
    pub fn command(&self, command: E::Command) -> Result<(), DriverError> {
        self.send(Control::Command(command))
    }

    /// Runs `inspect` on the loop's thread with the endpoint and the driver's figures, and
    /// returns what it returns.
    pub fn inspect<R: Send + 'static>(
        &self,
        inspect: impl FnOnce(&mut E, &DriverStats) -> R + Send + 'static,
    ) -> Result<R, DriverError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(Control::Inspect(Box::new(move |endpoint, stats| {
            let _ = reply.send(inspect(endpoint, stats));
        })))?;
        answer
            .recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| DriverError::Gone)
    }

    /// The driver's figures.
    pub fn stats(&self) -> Result<DriverStats, DriverError> {
        self.inspect(|_, stats| *stats)
    }

    /// The addresses of the sockets and listeners.
    pub fn local_addrs(&self) -> LocalAddrs {
        self.addrs
    }

    /// The address of `port`'s socket, if the driver opened one.
    pub fn local_addr(&self, port: Port) -> Option<SocketAddr> {
        self.addrs.port(port)
    }

    /// The resync listeners' addresses (TCP, HTTP).
    pub fn resync_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (self.addrs.resync_tcp, self.addrs.resync_http)
    }

    /// Whether the loop has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().map_or(true, JoinHandle::is_finished)
    }

    /// Stops the loop ([`Control::Stop`]) and waits for it; the loop's error, if it had one.
    pub fn stop(&mut self) -> Result<(), DriverError> {
        self.end(Control::Stop)
    }

    /// Ends the loop at once ([`Control::Abort`]) and waits for it.
    pub fn abort(&mut self) -> Result<(), DriverError> {
        self.end(Control::Abort)
    }

    /// Waits for the loop to end by itself (the endpoint stopped); `Ok` at once if it was
    /// already joined.
    pub fn join(&mut self) -> Result<(), DriverError> {
        match self.thread.take() {
            None => Ok(()),
            Some(thread) => thread.join().map_err(|_| DriverError::Panicked)?,
        }
    }

    fn end(&mut self, control: Control<E>) -> Result<(), DriverError> {
        if self.thread.is_none() {
            return Ok(());
        }
        // A loop that has ended already no longer takes controls: joining says how it ended.
        let _ = self.control.send(control);
        let _ = self.waker.wake();
        self.join()
    }
}

impl<E: Endpoint> Drop for DriverHandle<E> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.control.send(Control::Stop);
            let _ = self.waker.wake();
            let _ = thread.join();
        }
    }
}

const SERVE: usize = 0;
const LISTEN: usize = 1;
const FEEDBACK: usize = 2;
const PORTS: [Port; 3] = [Port::Serve, Port::Listen, Port::Feedback];

fn index(port: Port) -> usize {
    match port {
        Port::Serve => SERVE,
        Port::Listen => LISTEN,
        Port::Feedback => FEEDBACK,
    }
}

fn new_histogram() -> Histogram<u64> {
    // Invariant: three significant figures are within hdrhistogram's 0..=5, for which `new`
    // does not fail.
    Histogram::new(3).expect("3 significant figures are valid")
}

/// How the loop ends.
enum Exit {
    Stop,
    Abort,
}

/// Where store operations go to the storage thread, in order.
type StoreQueue<Op> = Sender<(StoreId, Op)>;

/// The storage thread, started at the first store operation.
enum StorageState<Op> {
    /// Not started yet: the storage it will own.
    Idle(Option<Box<dyn Storage<Op> + Send>>),
    /// Running: where operations go, and its thread.
    Running {
        ops: StoreQueue<Op>,
        thread: JoinHandle<()>,
    },
    /// It could not start: every operation fails.
    Failed,
}

/// The loop's state, on its own thread.
struct Loop<E: Endpoint> {
    name: String,
    poll: Poll,
    waker: Arc<Waker>,
    controls: Receiver<Control<E>>,
    endpoint: E,
    sockets: [Option<MulticastSocket>; 3],
    /// Where [`Destination::Group`] goes, per port.
    groups: [Option<SocketAddr>; 3],
    /// [`Port::Listen`]'s settings, its group being the one listened to now.
    listen: Option<MulticastConfig>,
    /// Datagrams a socket would not take yet, in order, per port.
    backlogs: [VecDeque<(Vec<u8>, SocketAddr)>; 3],
    /// Ports left readable at the end of a turn (their receive budget ran out).
    unread: [bool; 3],
    /// The endpoint had more to send when the turn's transmit budget ran out.
    more_to_send: bool,
    /// Room for one batch: [`BATCH_DATAGRAMS`] slots of `slot` bytes.
    batch: Vec<u8>,
    slot: usize,
    /// A datagram polled for another socket or destination than its batch's: the first of
    /// the next batch.
    carried: Option<(usize, SocketAddr, Vec<u8>)>,
    resync: Option<Endpoints>,
    metrics: Option<MetricsText<E>>,
    metrics_text: String,
    metrics_at: Instant,
    filter: Option<ReceiveFilter>,
    limiter: Option<RateLimiter>,
    workers: Option<WorkerPool>,
    worker_threads: usize,
    job_results: Sender<Result<<E::Job as Job>::Output, JobPanicked>>,
    job_results_rx: Receiver<Result<<E::Job as Job>::Output, JobPanicked>>,
    storage: StorageState<E::StoreOp>,
    stored: Sender<(StoreId, Result<(), StoreError>)>,
    stored_rx: Receiver<(StoreId, Result<(), StoreError>)>,
    store_abort: Arc<AtomicBool>,
    fetched: Sender<(FetchId, Fetched)>,
    fetched_rx: Receiver<(FetchId, Fetched)>,
    fetch_local: Option<IpAddr>,
    /// Fetches whose thread runs (until its terminal item comes back), cancelled or not.
    fetches: HashMap<FetchId, RunningFetch>,
    /// Fetches waiting for a thread, in order.
    fetch_queue: VecDeque<FetchRequest>,
    max_fetches: usize,
    /// Makes sends would-block on demand in tests.
    gate: SendGate,
    sink: Box<dyn EventSink<E::Event>>,
    stats: DriverStats,
    lag: Histogram<u64>,
    /// The current lag window and the one before it.
    recent_lag: [Histogram<u64>; 2],
    window_started: Instant,
    /// When dropped events were last logged.
    drops_logged_at: Option<Instant>,
    unroutable_logged: bool,
    max_backlog: usize,
    stop_drain_timeout: Duration,
}

impl<E> Loop<E>
where
    E: Endpoint + Send + 'static,
    E::Command: Send + 'static,
    E::Event: Send + 'static,
    E::StoreOp: Send + 'static,
{
    fn run(mut self) -> Result<(), DriverError> {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 65_536];
        // Where the endpoint listens from the start (a member's first relay, from its bundle's
        // directory) may not be the configured group: move before the first datagram.
        while let Some(group) = self.endpoint.poll_listen() {
            self.move_listen(group);
        }
        loop {
            let timer = self.timer();
            let deadline = self.deadline(timer);
            let timeout = deadline.map(|at| at.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(driver = %self.name, error = %e, "driver poll failed");
                    return Err(DriverError::Poll(e));
                }
            }
            let now = Instant::now();
            if let Some(at) = timer.filter(|at| now >= *at) {
                self.record_lag(now, now - at);
            }
            for event in events.iter() {
                let token = event.token();
                if token.0 < 3 {
                    if event.is_readable() {
                        self.unread[token.0] = true;
                    }
                } else if token != WAKER {
                    self.serve_resync(now, Some(event));
                }
            }
            for port in 0..3 {
                if self.unread[port] {
                    self.receive(port, now, &mut buf);
                }
            }
            self.serve_resync(now, None);
            if let Some(resync) = self.resync.as_mut() {
                for peer in resync.take_admitted() {
                    self.endpoint.handle_resync_request(now, peer);
                }
            }
            match self.handle_controls(now) {
                Some(Exit::Stop) => return self.finish(),
                Some(Exit::Abort) => return self.abort(),
                None => {}
            }
            self.handle_results(now);
            let now = Instant::now();
            if self.endpoint.poll_timeout().is_some_and(|at| at <= now) {
                self.endpoint.handle_timeout(now);
            }
            self.drain_outputs(now);
            if self.endpoint.is_stopped() {
                return self.finish();
            }
        }
    }

    /// The next timer: the endpoint's or a resync connection's.
    fn timer(&self) -> Option<Instant> {
        let resync = self.resync.as_ref().and_then(Endpoints::poll_timeout);
        match (self.endpoint.poll_timeout(), resync) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the loop must wake by itself: at once while a port is left unread or the
    /// endpoint has more to send; soon while a backlog waits (writability wakes it too).
    fn deadline(&self, timer: Option<Instant>) -> Option<Instant> {
        let now = Instant::now();
        if self.unread.iter().any(|&unread| unread) || self.more_to_send {
            return Some(now);
        }
        if self.backlogs.iter().any(|backlog| !backlog.is_empty()) {
            let at = now + Duration::from_millis(5);
            return Some(timer.map_or(at, |timer| timer.min(at)));
        }
        timer
    }

    fn record_lag(&mut self, now: Instant, late: Duration) {
        let micros = u64::try_from(late.as_micros()).unwrap_or(u64::MAX);
        if now.saturating_duration_since(self.window_started) >= LAG_WINDOW {
            self.recent_lag.swap(0, 1);
            self.recent_lag[0].reset();
            self.window_started = now;
        }
        let _ = self.lag.record(micros);
        let _ = self.recent_lag[0].record(micros);
    }

    /// Reads up to [`RECEIVE_BUDGET`] datagrams from port `port`'s socket.
    fn receive(&mut self, port: usize, now: Instant, buf: &mut [u8]) {
        for _ in 0..RECEIVE_BUDGET {
            let Some(socket) = &self.sockets[port] else {
                self.unread[port] = false;
                return;
            };
            match socket.recv_from(buf) {
                Ok((len, from)) => {
                    *self.stats.received.slot(port) += 1;
                    let bytes = &buf[..len];
                    if let Some(filter) = self.filter.as_mut() {
                        if !filter(PORTS[port], from, bytes) {
                            self.stats.filtered += 1;
                            continue;
                        }
                    }
                    if port == SERVE {
                        // Before any parsing or MAC check: a host over its rate costs one
                        // table lookup per datagram.
                        if let Some(limiter) = self.limiter.as_mut() {
                            if !limiter.allow(now, from.ip()) {
                                self.stats.feedback_rate_limited += 1;
                                continue;
                            }
                        }
                    }
                    self.endpoint.handle_datagram(now, PORTS[port], from, bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.unread[port] = false;
                    return;
                }
                // ICMP errors of earlier sends and the like: that error is consumed, and what
                // is queued behind it is still to be read.
                Err(_) => {}
            }
        }
    }

    /// Handles a resync readiness event, or (with `None`) the connections' due timeouts.
    fn serve_resync(&mut self, now: Instant, event: Option<&mio::event::Event>) {
        let Some(resync) = self.resync.as_mut() else {
            return;
        };
        if event.is_none() && !resync.poll_timeout().is_some_and(|at| at <= now) {
            return;
        }
        if now >= self.metrics_at {
            if let Some(metrics) = self.metrics.as_mut() {
                let stats = snapshot(&self.stats, &self.lag, &self.recent_lag, Some(resync));
                self.metrics_text = metrics(&self.endpoint, &stats);
            }
            self.metrics_at = now + Duration::from_secs(1);
        }
        let source: &dyn ResyncSource = match self.endpoint.resync_source() {
            Some(source) => source,
            None => &NoHistory,
        };
        let text = &self.metrics_text;
        let metrics = || text.clone();
        match event {
            Some(event) => {
                resync.handle_event(self.poll.registry(), now, event, source, &metrics);
            }
            None => resync.handle_timeouts(self.poll.registry(), now, source, &metrics),
        }
    }

    /// Handles the controls waiting; how the loop must end, if one says so.
    fn handle_controls(&mut self, now: Instant) -> Option<Exit> {
        for _ in 0..CONTROL_BUDGET {
            match self.controls.try_recv() {
                Ok(Control::Command(command)) => self.endpoint.handle_command(now, command),
                Ok(Control::Inspect(inspect)) => {
                    let stats = self.stats();
                    inspect(&mut self.endpoint, &stats);
                }
                Ok(Control::Stop) => return Some(Exit::Stop),
                Ok(Control::Abort) => return Some(Exit::Abort),
                Err(TryRecvError::Empty) => return None,
                // The handle is gone without a word: nobody can stop the loop any more.
                Err(TryRecvError::Disconnected) => return Some(Exit::Stop),
            }
        }
        // More wait: the next turn takes them without sleeping.
        let _ = self.waker.wake();
        None
    }

    /// Hands the endpoint what came back from the workers, the storage and the fetches.
    fn handle_results(&mut self, now: Instant) {
        while let Ok(result) = self.job_results_rx.try_recv() {
            match result {
                Ok(output) => self.endpoint.handle_job_result(now, output),
                Err(JobPanicked(message)) => {
                    self.stats.jobs_panicked += 1;
                    tracing::error!(driver = %self.name, panic = %message, "job panicked");
                    self.endpoint.handle_job_panicked(now);
                }
            }
        }
        while let Ok((id, result)) = self.stored_rx.try_recv() {
            match &result {
                Ok(()) => self.stats.stores_applied += 1,
                Err(error) => {
                    self.stats.stores_failed += 1;
                    tracing::error!(driver = %self.name, store = id.0, %error, "store operation failed");
                }
            }
            self.endpoint.handle_stored(now, id, result);
        }
        while let Ok((id, item)) = self.fetched_rx.try_recv() {
            let cancelled = self.fetches.get(&id).map_or(true, |fetch| fetch.cancelled);
            if is_terminal(&item) {
                // Its thread is done: a waiting fetch takes its place.
                self.fetches.remove(&id);
            }
            if cancelled {
                // The endpoint abandoned it: nothing more of it reaches the endpoint.
                continue;
            }
            if let Fetched::Failed { reason } = &item {
                self.stats.fetches_failed += 1;
                tracing::debug!(driver = %self.name, fetch = id.0, ?reason, "fetch failed");
            }
            self.endpoint.handle_fetched(now, id, item);
        }
    }

    /// Drains the endpoint's outputs: store operations, jobs, fetches, datagrams, events.
    fn drain_outputs(&mut self, now: Instant) {
        while let Some(group) = self.endpoint.poll_listen() {
            self.move_listen(group);
        }
        while let Some((id, op)) = self.endpoint.poll_store() {
            self.store(now, id, op);
        }
        while let Some(job) = self.endpoint.poll_job() {
            self.start_job(now, job);
        }
        while let Some(request) = self.endpoint.poll_fetch() {
            self.fetch_queue.push_back(request);
        }
        while let Some(id) = self.endpoint.poll_cancel_fetch() {
            self.cancel_fetch(id);
        }
        self.start_fetches(now);
        self.transmit(now);
        self.deliver_events(now);
    }

    /// Listens to `group` instead of [`Port::Listen`]'s group: opens a socket joined to it
    /// (bound to it, on Linux), then drops the old socket, which leaves the old group. The
    /// feedback port's group follows. Without a listen port, or if the new socket cannot be
    /// opened (counted and logged), nothing changes.
    fn move_listen(&mut self, group: SocketAddr) {
        let Some(current) = &self.listen else {
            return;
        };
        if current.group == group {
            return;
        }
        let mut config = current.clone();
        config.group = group;
        // A source-specific join names the old group's sender, not the new one's.
        config.source = None;
        let opened = match MulticastSocket::receiver(&config) {
            Ok((mut socket, _)) => self
                .poll
                .registry()
                .register(&mut socket, Token(LISTEN), Interest::READABLE)
                .map(|()| socket)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match opened {
            Ok(socket) => {
                if let Some(mut old) = self.sockets[LISTEN].replace(socket) {
                    let _ = self.poll.registry().deregister(&mut old);
                }
                tracing::info!(driver = %self.name, from = %current.group, to = %group,
                    "listening to another group");
                self.listen = Some(config);
                self.groups[FEEDBACK] = self.groups[FEEDBACK].map(|_| group);
                // Whatever the old socket held is gone with it; the new one is read at the
                // next readiness event.
                self.unread[LISTEN] = false;
                self.stats.listen_moves += 1;
            }
            Err(error) => {
                self.stats.listen_move_failures += 1;
                tracing::warn!(driver = %self.name, to = %group, error = %error,
                    "cannot listen to the new group; staying on the old one");
            }
        }
    }

    fn store(&mut self, now: Instant, id: StoreId, op: E::StoreOp) {
        if let StorageState::Idle(storage) = &mut self.storage {
            self.storage = match storage.take() {
                Some(storage) => match spawn_storage(
                    &self.name,
                    storage,
                    self.stored.clone(),
                    Arc::clone(&self.waker),
                    Arc::clone(&self.store_abort),
                ) {
                    Ok((ops, thread)) => StorageState::Running { ops, thread },
                    Err(error) => {
                        tracing::error!(driver = %self.name, %error, "storage thread not started");
                        StorageState::Failed
                    }
                },
                None => StorageState::Failed,
            };
        }
        let sent = match &self.storage {
            StorageState::Running { ops, .. } => ops.send((id, op)).is_ok(),
            _ => false,
        };
        if !sent {
            self.stats.stores_failed += 1;
            tracing::error!(driver = %self.name, store = id.0, "store operation failed: no storage thread");
            self.endpoint.handle_stored(
                now,
                id,
                Err(StoreError {
                    kind: StoreErrorKind::Io,
                    detail: "the storage thread is not running".into(),
                }),
            );
        }
    }

    fn start_job(&mut self, now: Instant, job: E::Job) {
        if self.workers.is_none() {
            let threads = match self.worker_threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            };
            match WorkerPool::new(threads, &format!("{}-worker", self.name)) {
                Ok(pool) => self.workers = Some(pool),
                Err(error) => {
                    tracing::error!(driver = %self.name, %error, "worker threads not started");
                }
            }
        }
        self.stats.jobs_started += 1;
        let spawned = self.workers.as_ref().is_some_and(|pool| {
            pool.spawn(
                move || job.run(),
                self.job_results.clone(),
                Arc::clone(&self.waker),
            )
            .is_ok()
        });
        if !spawned {
            // Its output is lost as surely as if it had panicked.
            self.stats.jobs_panicked += 1;
            tracing::error!(driver = %self.name, "job not run: no worker thread");
            self.endpoint.handle_job_panicked(now);
        }
    }

    /// Starts the queued fetches that fit under [`DriverConfig::max_fetches`], in order.
    fn start_fetches(&mut self, now: Instant) {
        while self.fetches.len() < self.max_fetches {
            let Some(request) = self.fetch_queue.pop_front() else {
                break;
            };
            self.start_fetch(now, request);
        }
    }

    /// Abandons fetch `id`: a queued one is dropped, a running one's connection is shut down
    /// and nothing more of it is forwarded (its thread still counts until it ends).
    fn cancel_fetch(&mut self, id: FetchId) {
        if let Some(fetch) = self.fetches.get_mut(&id) {
            if !fetch.cancelled {
                fetch.cancelled = true;
                fetch.cancel.cancel();
                self.stats.fetches_cancelled += 1;
            }
        } else if let Some(at) = self.fetch_queue.iter().position(|r| r.id == id) {
            self.fetch_queue.remove(at);
            self.stats.fetches_cancelled += 1;
        }
    }

    /// Cancels every fetch, running or queued (the loop ends).
    fn cancel_fetches(&mut self) {
        for fetch in self.fetches.values_mut() {
            fetch.cancelled = true;
            fetch.cancel.cancel();
        }
        self.fetch_queue.clear();
    }

    fn start_fetch(&mut self, now: Instant, request: FetchRequest) {
        self.stats.fetches_started += 1;
        let results = self.fetched.clone();
        let waker = Arc::clone(&self.waker);
        let local = self.fetch_local;
        let name = self.name.clone();
        let cancel = FetchCancel::new();
        let thread_cancel = cancel.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-fetch", self.name))
            .spawn(move || run_fetch(&name, local, &request, &thread_cancel, &results, &waker));
        if spawned.is_ok() {
            self.fetches.insert(
                request.id,
                RunningFetch {
                    cancel,
                    cancelled: false,
                },
            );
        }
        if let Err(error) = spawned {
            self.stats.fetches_failed += 1;
            tracing::error!(driver = %self.name, %error, "fetch thread not started");
            self.endpoint.handle_fetched(
                now,
                request.id,
                Fetched::Failed {
                    reason: FetchFailure::Connection,
                },
            );
        }
    }

    fn deliver_events(&mut self, now: Instant) {
        while let Some(event) = self.endpoint.poll_event() {
            match self.sink.deliver(event) {
                Delivery::Delivered => self.stats.events_delivered += 1,
                Delivery::Dropped => {
                    self.stats.events_dropped += 1;
                    let due = self.drops_logged_at.map_or(true, |at| {
                        now.saturating_duration_since(at) >= DROP_LOG_INTERVAL
                    });
                    if due {
                        tracing::warn!(
                            driver = %self.name,
                            dropped = self.stats.events_dropped,
                            "events dropped: their owner does not keep up"
                        );
                        self.drops_logged_at = Some(now);
                    }
                }
            }
        }
    }

    /// Sends what the endpoint has, batch by batch, after what waits in the backlogs.
    fn transmit(&mut self, now: Instant) {
        self.more_to_send = false;
        let mut drained = true;
        for port in 0..3 {
            drained &= self.drain_backlog(port);
        }
        if !drained {
            // A socket is full: what the endpoint has waits with it (paced, nothing dropped)
            // until writability or the backlog timer brings the loop back here.
            return;
        }
        for _ in 0..TRANSMIT_ROUNDS {
            let mut lens: Vec<usize> = Vec::with_capacity(BATCH_DATAGRAMS);
            let mut key: Option<(usize, SocketAddr)> = None;
            if let Some((port, dest, bytes)) = self.carried.take() {
                self.batch[..bytes.len()].copy_from_slice(&bytes);
                key = Some((port, dest));
                lens.push(bytes.len());
            }
            let mut exhausted = false;
            while lens.len() < BATCH_DATAGRAMS {
                let offset = lens.len() * self.slot;
                let room = &mut self.batch[offset..offset + self.slot];
                let Some(transmit) = self.endpoint.poll_transmit(now, room) else {
                    exhausted = true;
                    break;
                };
                let len = transmit.len.min(self.slot);
                let Some(route) = self.route(&transmit) else {
                    continue;
                };
                match key {
                    None => key = Some(route),
                    Some(current) if current == route => {}
                    Some(_) => {
                        let bytes = self.batch[offset..offset + len].to_vec();
                        self.carried = Some((route.0, route.1, bytes));
                        break;
                    }
                }
                lens.push(len);
            }
            if let Some((port, dest)) = key {
                self.send_batch(port, dest, &lens);
            }
            if exhausted && self.carried.is_none() {
                return;
            }
        }
        self.more_to_send = true;
    }

    /// The socket and address a transmit goes to; `None` (counted) if there is none.
    fn route(&mut self, transmit: &Transmit) -> Option<(usize, SocketAddr)> {
        let port = index(transmit.port);
        let dest = match transmit.destination {
            Destination::Group => self.groups[port],
            Destination::Unicast(addr) => Some(addr),
        };
        match dest.filter(|_| port != LISTEN && self.sockets[port].is_some()) {
            Some(dest) => Some((port, dest)),
            None => {
                self.stats.unroutable += 1;
                if !self.unroutable_logged {
                    self.unroutable_logged = true;
                    tracing::warn!(
                        driver = %self.name,
                        port = ?transmit.port,
                        destination = ?transmit.destination,
                        "datagram for a port without a socket dropped"
                    );
                }
                None
            }
        }
    }

    /// Sends the batch's first `lens.len()` slots to `dest` by port `port`; what the socket
    /// does not take waits in the port's backlog.
    fn send_batch(&mut self, port: usize, dest: SocketAddr, lens: &[usize]) {
        let slot = self.slot;
        let segments: Vec<&[u8]> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| &self.batch[i * slot..i * slot + len])
            .collect();
        let sent = if self.backlogs[port].is_empty() {
            match &self.sockets[port] {
                Some(socket) => send_segments(socket, &self.gate, dest, &segments, &mut self.stats),
                None => 0,
            }
        } else {
            0
        };
        for segment in &segments[sent..] {
            if self.backlogs[port].len() < self.max_backlog {
                self.backlogs[port].push_back((segment.to_vec(), dest));
            } else {
                self.stats.backlog_dropped += 1;
            }
        }
    }

    /// Sends port `port`'s backlog in order; false if the socket would still block.
    fn drain_backlog(&mut self, port: usize) -> bool {
        let Some(socket) = &self.sockets[port] else {
            return true;
        };
        while let Some((datagram, dest)) = self.backlogs[port].pop_front() {
            if send_segments(socket, &self.gate, dest, &[&datagram], &mut self.stats) == 0 {
                self.backlogs[port].push_front((datagram, dest));
                return false;
            }
        }
        true
    }

    fn stats(&self) -> DriverStats {
        snapshot(
            &self.stats,
            &self.lag,
            &self.recent_lag,
            self.resync.as_ref(),
        )
        .with_backlog(self.backlogs.iter().map(VecDeque::len).sum())
        .with_fetches_queued(self.fetch_queue.len())
    }

    /// The end of a stop: the endpoint's last outputs, the datagrams it has to send and the
    /// backlogs (for up to the drain timeout), then the storage thread's queue.
    fn finish(mut self) -> Result<(), DriverError> {
        let now = Instant::now();
        self.drain_outputs(now);
        // Nobody will read what they bring.
        self.cancel_fetches();
        let until = now + self.stop_drain_timeout;
        let mut events = Events::with_capacity(16);
        loop {
            let now = Instant::now();
            self.transmit(now);
            let waiting = self.backlogs.iter().any(|backlog| !backlog.is_empty());
            if !(waiting || self.more_to_send) {
                break;
            }
            if now >= until {
                let dropped: usize = self.backlogs.iter().map(VecDeque::len).sum();
                self.stats.backlog_dropped += dropped as u64;
                tracing::warn!(driver = %self.name, dropped, "stop: datagrams left unsent");
                break;
            }
            if waiting {
                let wait = until
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(5));
                let _ = self.poll.poll(&mut events, Some(wait));
            }
        }
        if let StorageState::Running { ops, thread } =
            std::mem::replace(&mut self.storage, StorageState::Failed)
        {
            // Closing the channel ends the thread once it has applied what it was given.
            drop(ops);
            if thread.join().is_err() {
                tracing::error!(driver = %self.name, "storage thread panicked");
            }
        }
        tracing::info!(driver = %self.name, sent = self.stats.sent, "driver stopped");
        Ok(())
    }

    /// The end of an abort: nothing more is sent or stored, no thread is waited for.
    fn abort(mut self) -> Result<(), DriverError> {
        self.store_abort.store(true, Ordering::SeqCst);
        self.cancel_fetches();
        if let Some(pool) = self.workers.take() {
            pool.detach();
        }
        tracing::info!(driver = %self.name, "driver aborted");
        Ok(())
    }
}

impl DriverStats {
    fn with_backlog(mut self, backlog: usize) -> Self {
        self.backlog = backlog as u64;
        self
    }

    fn with_fetches_queued(mut self, queued: usize) -> Self {
        self.fetches_queued = queued as u64;
        self
    }
}

/// The figures as of now.
fn snapshot(
    stats: &DriverStats,
    lag: &Histogram<u64>,
    recent: &[Histogram<u64>; 2],
    resync: Option<&Endpoints>,
) -> DriverStats {
    let mut window = recent[0].clone();
    let _ = window.add(&recent[1]);
    DriverStats {
        lag: LoopLag::of(lag),
        recent_lag: LoopLag::of(&window),
        resync: resync.map(Endpoints::counters).unwrap_or_default(),
        ..*stats
    }
}

/// Sends `segments` to `dest`; returns how many went (the rest would block).
fn send_segments(
    socket: &MulticastSocket,
    gate: &SendGate,
    dest: SocketAddr,
    segments: &[&[u8]],
    stats: &mut DriverStats,
) -> usize {
    let mut sent = 0;
    while sent < segments.len() {
        let outcome = if gate.would_block() {
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            socket.send_batch(dest, &segments[sent..])
        };
        match outcome {
            Ok(count) => {
                sent += count;
                stats.sent += count as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stats.send_blocked += 1;
                return sent;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A send error (no route, a refused unicast) loses this datagram only; repair and
            // resync cover it as they cover any loss.
            Err(_) => {
                stats.send_failed += 1;
                sent += 1;
            }
        }
    }
    sent
}

/// Starts the storage thread: it applies each operation in the order received, sends the
/// result back and wakes the loop; it ends when the channel closes, or before the next
/// operation once `abort` is set.
fn spawn_storage<Op: Send + 'static>(
    name: &str,
    mut storage: Box<dyn Storage<Op> + Send>,
    results: Sender<(StoreId, Result<(), StoreError>)>,
    waker: Arc<Waker>,
    abort: Arc<AtomicBool>,
) -> std::io::Result<(StoreQueue<Op>, JoinHandle<()>)> {
    let (ops, queue) = crossbeam_channel::unbounded::<(StoreId, Op)>();
    let thread = std::thread::Builder::new()
        .name(format!("{name}-storage"))
        .spawn(move || {
            while let Ok((id, op)) = queue.recv() {
                if abort.load(Ordering::SeqCst) {
                    return;
                }
                let result =
                    catch_unwind(AssertUnwindSafe(|| storage.apply(&op))).unwrap_or_else(|_| {
                        Err(StoreError {
                            kind: StoreErrorKind::Io,
                            detail: "the storage panicked".into(),
                        })
                    });
                if results.send((id, result)).is_ok() {
                    let _ = waker.wake();
                }
            }
        })?;
    Ok((ops, thread))
}

/// Performs one fetch on the current (fetch) thread, streaming each item back.
fn run_fetch(
    name: &str,
    local: Option<IpAddr>,
    request: &FetchRequest,
    cancel: &FetchCancel,
    results: &Sender<(FetchId, Fetched)>,
    waker: &Waker,
) {
    stream_fetch(name, request.id, results, waker, |deliver| {
        fetch_streaming_cancellable(local, request, cancel, deliver);
    });
}

/// A fetch whose thread runs.
struct RunningFetch {
    cancel: FetchCancel,
    /// The endpoint abandoned it: what still comes of it is dropped.
    cancelled: bool,
}

/// Makes sends report that they would block, on demand: how tests fill a socket. A
/// production driver's gate never closes.
#[derive(Debug, Clone, Default)]
struct SendGate {
    /// Sends still to be refused.
    #[cfg(test)]
    closed_for: Arc<std::sync::atomic::AtomicUsize>,
}

impl SendGate {
    /// Whether the next send must report that it would block.
    fn would_block(&self) -> bool {
        #[cfg(test)]
        {
            let refuse = self
                .closed_for
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if refuse.is_ok() {
                return true;
            }
        }
        false
    }
}

/// Runs `fetch`, sending each item it delivers back as fetch `id`'s and waking the loop:
/// nothing after the first terminal item goes, and a panic is caught and reported as
/// [`Fetched::Failed`] unless the terminal item went already, so that exactly one terminal
/// item reaches the endpoint.
fn stream_fetch(
    name: &str,
    id: FetchId,
    results: &Sender<(FetchId, Fetched)>,
    waker: &Waker,
    fetch: impl FnOnce(&mut dyn FnMut(Fetched)),
) {
    let mut ended = false;
    let send = |item: Fetched| {
        if results.send((id, item)).is_ok() {
            let _ = waker.wake();
        }
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        fetch(&mut |item| {
            if !ended {
                ended = is_terminal(&item);
                send(item);
            }
        });
    }));
    if outcome.is_err() {
        tracing::error!(driver = %name, fetch = id.0, "fetch panicked");
        if !ended {
            // The answer that made the client panic was not one it could read.
            send(Fetched::Failed {
                reason: FetchFailure::Malformed,
            });
        }
    }
}

/// Whether `item` ends its fetch.
fn is_terminal(item: &Fetched) -> bool {
    !matches!(item, Fetched::State(_) | Fetched::Item { .. })
}

/// The history of an endpoint that serves none: every lookup finds nothing.
struct NoHistory;

impl ResyncSource for NoHistory {
    fn group_id(&self) -> u32 {
        0
    }

    fn latest(&self) -> Option<(u64, &[u8])> {
        None
    }

    fn oldest(&self) -> Option<u64> {
        None
    }

    fn manifest(&self, _seq: u64) -> Lookup<&[u8]> {
        Lookup::NotFound
    }

    fn chunk(&self, _seq: u64, _leaf: u32) -> Lookup<&[u8]> {
        Lookup::NotFound
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
    use std::sync::Mutex;

    use rekeycast_proto::endpoint::{FetchWhat, ResyncEndpoint, ResyncProtocol};

    use super::*;

    /// A job value that makes the job panic.
    const PANIC: u64 = u64::MAX;
    /// A store operation value the recording storage refuses.
    const FAIL: u64 = 13;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum ToyEvent {
        Datagram {
            port: Port,
            from: SocketAddr,
            bytes: Vec<u8>,
        },
        JobDone(u64),
        JobPanicked,
        Stored(StoreId, Result<(), StoreErrorKind>),
        Fetched(FetchId, Fetched),
        Emitted(usize),
        Tick,
    }

    enum ToyCommand {
        Send {
            port: Port,
            destination: Destination,
            bytes: Vec<u8>,
            count: usize,
        },
        Job(u64),
        Store(u64),
        Emit(usize),
        Fetch(FetchRequest),
        CancelFetch(FetchId),
        TickIn(Duration),
        Listen(SocketAddr),
        Stop,
    }

    struct ToyJob(u64);

    impl Job for ToyJob {
        type Output = u64;
        fn run(self) -> u64 {
            assert!(self.0 != PANIC, "injected job panic");
            self.0 * 2
        }
    }

    /// A history of `messages` (sequence numbers from 1), each message's manifest and one
    /// chunk for every leaf.
    struct History {
        group_id: u32,
        messages: Vec<(Vec<u8>, Vec<u8>)>,
    }

    impl ResyncSource for History {
        fn group_id(&self) -> u32 {
            self.group_id
        }
        fn latest(&self) -> Option<(u64, &[u8])> {
            self.messages
                .last()
                .map(|(manifest, _)| (self.messages.len() as u64, manifest.as_slice()))
        }
        fn oldest(&self) -> Option<u64> {
            (!self.messages.is_empty()).then_some(1)
        }
        fn manifest(&self, seq: u64) -> Lookup<&[u8]> {
            self.lookup(seq).map(|(manifest, _)| manifest.as_slice())
        }
        fn chunk(&self, seq: u64, _leaf: u32) -> Lookup<&[u8]> {
            self.lookup(seq).map(|(_, chunk)| chunk.as_slice())
        }
    }

    impl History {
        fn lookup(&self, seq: u64) -> Lookup<&(Vec<u8>, Vec<u8>)> {
            let latest = self.messages.len() as u64;
            match seq {
                0 => Lookup::BeyondHistory { oldest: 1 },
                seq if seq > latest => Lookup::NotYetSent { latest },
                seq => match self.messages.get((seq - 1) as usize) {
                    Some(message) => Lookup::Found(message),
                    None => Lookup::NotFound,
                },
            }
        }
    }

    /// An echo endpoint: reports everything as events, answers "ping..." with "pong..." on
    /// the port it came by, and does what its commands say.
    #[derive(Default)]
    struct Toy {
        transmits: VecDeque<(Port, Destination, Vec<u8>)>,
        jobs: VecDeque<ToyJob>,
        stores: VecDeque<(StoreId, u64)>,
        next_store: u64,
        fetches: VecDeque<FetchRequest>,
        cancels: VecDeque<FetchId>,
        events: VecDeque<ToyEvent>,
        tick_at: Option<Instant>,
        stopped: bool,
        history: Option<History>,
        /// Groups to listen to instead, in order ([`Endpoint::poll_listen`]).
        listen_to: VecDeque<SocketAddr>,
    }

    impl Endpoint for Toy {
        type Command = ToyCommand;
        type Event = ToyEvent;
        type Job = ToyJob;
        type StoreOp = u64;

        fn handle_datagram(&mut self, _now: Instant, port: Port, from: SocketAddr, bytes: &[u8]) {
            if let Some(rest) = bytes.strip_prefix(b"ping") {
                let reply_port = if port == Port::Listen {
                    Port::Feedback
                } else {
                    port
                };
                let mut pong = b"pong".to_vec();
                pong.extend_from_slice(rest);
                self.transmits
                    .push_back((reply_port, Destination::Unicast(from), pong));
            }
            self.events.push_back(ToyEvent::Datagram {
                port,
                from,
                bytes: bytes.to_vec(),
            });
        }
        fn handle_command(&mut self, now: Instant, command: ToyCommand) {
            match command {
                ToyCommand::Send {
                    port,
                    destination,
                    bytes,
                    count,
                } => {
                    for i in 0..count {
                        let mut datagram = bytes.clone();
                        datagram.extend_from_slice(&(i as u32).to_be_bytes());
                        self.transmits.push_back((port, destination, datagram));
                    }
                }
                ToyCommand::Job(value) => self.jobs.push_back(ToyJob(value)),
                ToyCommand::Store(value) => {
                    self.next_store += 1;
                    self.stores.push_back((StoreId(self.next_store), value));
                }
                ToyCommand::Emit(count) => {
                    self.events.extend((0..count).map(ToyEvent::Emitted));
                }
                ToyCommand::Fetch(request) => self.fetches.push_back(request),
                ToyCommand::CancelFetch(id) => self.cancels.push_back(id),
                ToyCommand::TickIn(delay) => self.tick_at = Some(now + delay),
                ToyCommand::Listen(group) => self.listen_to.push_back(group),
                ToyCommand::Stop => self.stopped = true,
            }
        }
        fn handle_job_result(&mut self, _now: Instant, result: u64) {
            self.events.push_back(ToyEvent::JobDone(result));
        }
        fn handle_job_panicked(&mut self, _now: Instant) {
            self.events.push_back(ToyEvent::JobPanicked);
        }
        fn handle_stored(&mut self, _now: Instant, id: StoreId, result: Result<(), StoreError>) {
            self.events
                .push_back(ToyEvent::Stored(id, result.map_err(|e| e.kind)));
        }
        fn handle_fetched(&mut self, _now: Instant, id: FetchId, item: Fetched) {
            self.events.push_back(ToyEvent::Fetched(id, item));
        }
        fn handle_timeout(&mut self, now: Instant) {
            if self.tick_at.is_some_and(|at| at <= now) {
                self.tick_at = None;
                self.events.push_back(ToyEvent::Tick);
            }
        }
        fn poll_transmit(&mut self, _now: Instant, buf: &mut [u8]) -> Option<Transmit> {
            let (port, destination, bytes) = self.transmits.pop_front()?;
            buf[..bytes.len()].copy_from_slice(&bytes);
            Some(Transmit {
                port,
                destination,
                len: bytes.len(),
            })
        }
        fn poll_job(&mut self) -> Option<ToyJob> {
            self.jobs.pop_front()
        }
        fn poll_store(&mut self) -> Option<(StoreId, u64)> {
            self.stores.pop_front()
        }
        fn poll_fetch(&mut self) -> Option<FetchRequest> {
            self.fetches.pop_front()
        }
        fn poll_cancel_fetch(&mut self) -> Option<FetchId> {
            self.cancels.pop_front()
        }
        fn poll_event(&mut self) -> Option<ToyEvent> {
            self.events.pop_front()
        }
        fn poll_listen(&mut self) -> Option<SocketAddr> {
            self.listen_to.pop_front()
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.tick_at
        }
        fn resync_source(&self) -> Option<&dyn ResyncSource> {
            self.history.as_ref().map(|h| h as &dyn ResyncSource)
        }
        fn is_stopped(&self) -> bool {
            self.stopped
        }
    }

    /// Records every operation applied; refuses [`FAIL`].
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<u64>>>);

    impl Storage<u64> for Recorder {
        fn apply(&mut self, op: &u64) -> Result<(), StoreError> {
            if *op == FAIL {
                return Err(StoreError {
                    kind: StoreErrorKind::NoSpace,
                    detail: "refused".into(),
                });
            }
            self.0.lock().unwrap().push(*op);
            Ok(())
        }
    }

    fn group(salt: u8) -> SocketAddr {
        let pid = std::process::id();
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(239, 86, salt, pid as u8),
            30_000 + (pid % 10_000) as u16 + u16::from(salt),
        ))
    }

    fn loopback_port(salt: u8) -> SenderPort {
        SenderPort {
            multicast: MulticastConfig::loopback_v4(group(salt)),
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        }
    }

    fn start(
        toy: Toy,
        config: DriverConfig,
        filter: Option<ReceiveFilter>,
        capacity: usize,
    ) -> (DriverHandle<Toy>, Receiver<ToyEvent>, Recorder) {
        let recorder = Recorder::default();
        let (sink, events) = bounded_events(capacity);
        let mut driver = Driver::new(toy, config, recorder.clone(), sink);
        if let Some(filter) = filter {
            driver = driver.receive_filter(filter);
        }
        (driver.spawn().unwrap(), events, recorder)
    }

    /// The next event `wanted` accepts, skipping others, within 20 s.
    fn wait_for(events: &Receiver<ToyEvent>, wanted: impl Fn(&ToyEvent) -> bool) -> ToyEvent {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(event) if wanted(&event) => return event,
                Ok(_) => {}
                Err(_) => panic!("no such event within 20 s"),
            }
        }
    }

    /// The driver's figures once `done` holds, within 20 s.
    fn stats_when(handle: &DriverHandle<Toy>, done: impl Fn(&DriverStats) -> bool) -> DriverStats {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let stats = handle.stats().unwrap();
            if done(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "not reached within 20 s: {stats:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn test_socket() -> UdpSocket {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        socket
    }

    fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 2_048];
        let (len, from) = socket.recv_from(&mut buf).unwrap();
        (buf[..len].to_vec(), from)
    }

    #[test]
    fn transmits_leave_by_their_port() {
        let mut config = DriverConfig::new("test-ports");
        config.serve = Some(loopback_port(1));
        config.feedback = Some(loopback_port(2));
        let (mut handle, events, _) = start(Toy::default(), config, None, 1_024);
        let addrs = handle.local_addrs();
        let (serve, feedback) = (addrs.serve.unwrap(), addrs.feedback.unwrap());
        assert_eq!(
            (addrs.listen, addrs.resync_tcp, addrs.resync_http),
            (None, None, None)
        );
        assert_ne!(serve, feedback);
        let peer = test_socket();
        peer.send_to(b"ping-serve", serve).unwrap();
        assert_eq!(recv(&peer), (b"pong-serve".to_vec(), serve));
        peer.send_to(b"ping-feedback", feedback).unwrap();
        assert_eq!(recv(&peer), (b"pong-feedback".to_vec(), feedback));
        let seen = wait_for(&events, |e| matches!(e, ToyEvent::Datagram { .. }));
        assert_eq!(
            seen,
            ToyEvent::Datagram {
                port: Port::Serve,
                from: peer.local_addr().unwrap(),
                bytes: b"ping-serve".to_vec()
            }
        );
        // The group, by the serve port, in order.
        let (listener, _) =
            MulticastSocket::receiver(&MulticastConfig::loopback_v4(group(1))).unwrap();
        handle
            .command(ToyCommand::Send {
                port: Port::Serve,
                destination: Destination::Group,
                bytes: b"group".to_vec(),
                count: 100,
            })
            .unwrap();
        let mut buf = [0u8; 2_048];
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.len() < 100 && Instant::now() < deadline {
            match listener.recv_from(&mut buf) {
                Ok((len, from)) => {
                    assert_eq!(from, serve);
                    got.push(buf[..len].to_vec());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let wanted: Vec<Vec<u8>> = (0..100u32)
            .map(|i| [&b"group"[..], &i.to_be_bytes()].concat())
            .collect();
        assert_eq!(got, wanted);
        // A port without a socket: dropped and counted.
        handle
            .command(ToyCommand::Send {
                port: Port::Listen,
                destination: Destination::Group,
                bytes: b"nowhere".to_vec(),
                count: 2,
            })
            .unwrap();
        let stats = stats_when(&handle, |s| s.unroutable == 2);
        assert_eq!(stats.received.serve, 1);
        assert_eq!(stats.received.feedback, 1);
        assert_eq!(stats.sent, 102);
        handle.stop().unwrap();
    }

    #[test]
    fn jobs_and_store_operations_come_back_in_order() {
        let mut config = DriverConfig::new("test-jobs");
        config.workers = 1;
        let (mut handle, events, recorder) = start(Toy::default(), config, None, 1_024);
        for value in [1, 2, 3] {
            handle.command(ToyCommand::Job(value)).unwrap();
        }
        for value in [10, 11, 12, FAIL, 14] {
            handle.command(ToyCommand::Store(value)).unwrap();
        }
        let mut jobs = Vec::new();
        let mut stored = Vec::new();
        while jobs.len() < 3 || stored.len() < 5 {
            match wait_for(&events, |_| true) {
                ToyEvent::JobDone(value) => jobs.push(value),
                ToyEvent::Stored(id, result) => stored.push((id.0, result)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(jobs, vec![2, 4, 6]);
        assert_eq!(
            stored,
            vec![
                (1, Ok(())),
                (2, Ok(())),
                (3, Ok(())),
                (4, Err(StoreErrorKind::NoSpace)),
                (5, Ok(()))
            ]
        );
        assert_eq!(*recorder.0.lock().unwrap(), vec![10, 11, 12, 14]);
        let stats = handle.stats().unwrap();
        assert_eq!(
            (
                stats.jobs_started,
                stats.stores_applied,
                stats.stores_failed
            ),
            (3, 4, 1)
        );
        handle.stop().unwrap();
    }

    #[test]
    fn a_panicking_job_reaches_handle_job_panicked() {
        let mut config = DriverConfig::new("test-panic");
        config.workers = 1;
        let (mut handle, events, _) = start(Toy::default(), config, None, 1_024);
        handle.command(ToyCommand::Job(PANIC)).unwrap();
        handle.command(ToyCommand::Job(5)).unwrap();
        assert_eq!(wait_for(&events, |_| true), ToyEvent::JobPanicked);
        // The worker survives it.
        assert_eq!(wait_for(&events, |_| true), ToyEvent::JobDone(10));
        assert_eq!(handle.stats().unwrap().jobs_panicked, 1);
        handle.stop().unwrap();
    }

    #[test]
    fn events_beyond_the_bound_are_dropped_and_counted() {
        let (mut handle, events, _) =
            start(Toy::default(), DriverConfig::new("test-drop"), None, 4);
        handle.command(ToyCommand::Emit(10)).unwrap();
        let stats = stats_when(&handle, |s| s.events_delivered + s.events_dropped == 10);
        assert_eq!((stats.events_delivered, stats.events_dropped), (4, 6));
        let kept: Vec<ToyEvent> = events.try_iter().collect();
        assert_eq!(kept, (0..4).map(ToyEvent::Emitted).collect::<Vec<_>>());
        handle.stop().unwrap();
    }

    /// Sends `bytes` to loopback multicast group `group` until `events` shows it arrived on
    /// [`Port::Listen`] (IGMP joins are not instantaneous), within 20 s; returns the other
    /// datagrams heard meanwhile.
    fn multicast_until_heard(
        events: &Receiver<ToyEvent>,
        group: SocketAddr,
        bytes: &[u8],
    ) -> Vec<Vec<u8>> {
        let sender = rekeycast_testkit::addr::multicast_sender();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut others = Vec::new();
        loop {
            sender.send_to(bytes, group).unwrap();
            while let Ok(event) = events.recv_timeout(Duration::from_millis(50)) {
                if let ToyEvent::Datagram { bytes: heard, .. } = event {
                    if heard == bytes {
                        return others;
                    }
                    others.push(heard);
                }
            }
            assert!(
                Instant::now() < deadline,
                "{bytes:?} never heard on {group}"
            );
        }
    }

    #[test]
    fn the_endpoint_moves_the_listen_port_to_another_group_from_the_start_and_later() {
        let (configured, first, second) = (group(20), group(21), group(22));
        let mut config = DriverConfig::new("test-listen");
        config.listen = Some(MulticastConfig::loopback_v4(configured));
        // Its first group is not the configured one, and nothing else wakes the loop: the
        // move must come before the first datagram.
        let toy = Toy {
            listen_to: VecDeque::from([first]),
            ..Toy::default()
        };
        let (mut handle, events, _) = start(toy, config, None, 1_024);
        multicast_until_heard(&events, first, b"to-first");
        assert_eq!(handle.stats().unwrap().listen_moves, 1);
        handle.command(ToyCommand::Listen(second)).unwrap();
        multicast_until_heard(&events, second, b"to-second");
        // The old group is left: what is sent there no longer arrives.
        let sender = rekeycast_testkit::addr::multicast_sender();
        sender.send_to(b"to-first-again", first).unwrap();
        let others = multicast_until_heard(&events, second, b"to-second-again");
        assert!(
            !others.iter().any(|bytes| bytes == b"to-first-again"),
            "{others:?}"
        );
        let stats = handle.stats().unwrap();
        assert_eq!((stats.listen_moves, stats.listen_move_failures), (2, 0));
        handle.stop().unwrap();
    }

    #[test]
    fn the_receive_filter_drops() {
        let mut config = DriverConfig::new("test-filter");
        config.serve = Some(loopback_port(3));
        let filter: ReceiveFilter = Box::new(|port, _, bytes| {
            assert_eq!(port, Port::Serve);
            !bytes.starts_with(b"drop")
        });
        let (mut handle, events, _) = start(Toy::default(), config, Some(filter), 1_024);
        let serve = handle.local_addr(Port::Serve).unwrap();
        let peer = test_socket();
        peer.send_to(b"drop-me", serve).unwrap();
        peer.send_to(b"keep-me", serve).unwrap();
        let seen = wait_for(&events, |_| true);
        assert!(
            matches!(&seen, ToyEvent::Datagram { bytes, .. } if bytes == b"keep-me"),
            "{seen:?}"
        );
        let stats = stats_when(&handle, |s| s.received.serve == 2);
        assert_eq!(stats.filtered, 1);
        handle.stop().unwrap();
    }

    #[test]
    fn feedback_over_its_source_rate_is_dropped_and_counted() {
        let mut config = DriverConfig::new("test-rate");
        config.serve = Some(loopback_port(4));
        config.feedback_limit = Some(FeedbackLimit {
            datagrams_per_second: 1e-9,
            burst: 5,
        });
        let (mut handle, events, _) = start(Toy::default(), config, None, 1_024);
        let serve = handle.local_addr(Port::Serve).unwrap();
        let peer = test_socket();
        for i in 0..20u8 {
            peer.send_to(&[b'n', i], serve).unwrap();
        }
        let stats = stats_when(&handle, |s| s.received.serve == 20);
        assert_eq!(stats.feedback_rate_limited, 15);
        let passed: Vec<ToyEvent> = events.try_iter().collect();
        assert_eq!(passed.len(), 5, "{passed:?}");
        handle.stop().unwrap();
    }

    #[test]
    fn stop_sends_what_the_endpoint_has_before_ending() {
        let mut config = DriverConfig::new("test-stop");
        config.feedback = Some(loopback_port(5));
        let (mut handle, _events, _) = start(Toy::default(), config, None, 1_024);
        let peer = test_socket();
        let to = Destination::Unicast(peer.local_addr().unwrap());
        // Queued and stopped in one turn of the loop: only the stop's drain sends them.
        handle
            .command(ToyCommand::Send {
                port: Port::Feedback,
                destination: to,
                bytes: b"last".to_vec(),
                count: 200,
            })
            .unwrap();
        handle.stop().unwrap();
        for i in 0..200u32 {
            assert_eq!(recv(&peer).0, [&b"last"[..], &i.to_be_bytes()].concat());
        }
        assert!(handle.is_finished());
        assert!(matches!(handle.stats(), Err(DriverError::Gone)));
    }

    #[test]
    fn an_endpoint_that_stops_ends_the_loop() {
        let (mut handle, _events, _) =
            start(Toy::default(), DriverConfig::new("test-stopped"), None, 16);
        handle.command(ToyCommand::Stop).unwrap();
        handle.join().unwrap();
        assert!(handle.is_finished());
    }

    #[test]
    fn deadlines_wake_the_loop_and_its_lag_is_recorded() {
        let (mut handle, events, _) =
            start(Toy::default(), DriverConfig::new("test-timer"), None, 16);
        handle
            .command(ToyCommand::TickIn(Duration::from_millis(20)))
            .unwrap();
        assert_eq!(wait_for(&events, |_| true), ToyEvent::Tick);
        let stats = handle.stats().unwrap();
        assert!(stats.lag.count >= 1, "{stats:?}");
        assert_eq!(stats.lag.count, stats.recent_lag.count);
        handle.stop().unwrap();
    }

    /// Messages as (manifest, chunk).
    type Messages = Vec<(Vec<u8>, Vec<u8>)>;

    fn server() -> (DriverHandle<Toy>, u32, Messages) {
        let group_id = 77;
        let messages: Messages = (1..=5u8)
            .map(|seq| (vec![seq; 40], vec![seq + 100; 30]))
            .collect();
        let toy = Toy {
            history: Some(History {
                group_id,
                messages: messages.clone(),
            }),
            ..Toy::default()
        };
        let mut config = DriverConfig::new("test-server");
        config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let (handle, _, _) = start(toy, config, None, 16);
        (handle, group_id, messages)
    }

    fn fetch(
        client: &DriverHandle<Toy>,
        events: &Receiver<ToyEvent>,
        request: FetchRequest,
    ) -> Vec<Fetched> {
        client.command(ToyCommand::Fetch(request)).unwrap();
        let mut items = Vec::new();
        loop {
            let ToyEvent::Fetched(id, item) =
                wait_for(events, |e| matches!(e, ToyEvent::Fetched(..)))
            else {
                unreachable!()
            };
            assert_eq!(id, request.id);
            let terminal = is_terminal(&item);
            items.push(item);
            if terminal {
                return items;
            }
        }
    }

    #[test]
    fn a_fetch_streams_the_items_of_a_real_resync_server() {
        let (mut server, group_id, messages) = server();
        let (tcp, http) = server.resync_addrs();
        let (mut client, events, _) = start(
            Toy::default(),
            DriverConfig::new("test-client"),
            None,
            1_024,
        );
        let wanted: Vec<Fetched> = messages[1..]
            .iter()
            .map(|(manifest, chunk)| Fetched::Item {
                manifest: manifest.clone(),
                chunk: chunk.clone(),
            })
            .chain([Fetched::End])
            .collect();
        for (n, (protocol, addr)) in [
            (ResyncProtocol::Tcp, tcp.unwrap()),
            (ResyncProtocol::Http, http.unwrap()),
        ]
        .into_iter()
        .enumerate()
        {
            let request = FetchRequest {
                id: FetchId(n as u64),
                group_id,
                endpoint: ResyncEndpoint { protocol, addr },
                what: FetchWhat::Items {
                    from_seq: 2,
                    leaf: 0,
                },
                deadline: Instant::now() + Duration::from_secs(20),
                max_bytes: 1 << 20,
            };
            assert_eq!(fetch(&client, &events, request), wanted, "{protocol:?}");
            let state = FetchRequest {
                id: FetchId(10 + n as u64),
                what: FetchWhat::State,
                ..request
            };
            assert_eq!(
                fetch(&client, &events, state),
                vec![Fetched::State(messages[4].0.clone()), Fetched::End],
                "{protocol:?}"
            );
            // Over the byte cap: the items that fit, then the failure.
            let capped = FetchRequest {
                id: FetchId(20 + n as u64),
                max_bytes: 150,
                ..request
            };
            let items = fetch(&client, &events, capped);
            assert_eq!(
                items.last(),
                Some(&Fetched::Failed {
                    reason: FetchFailure::TooLarge
                }),
                "{protocol:?}: {items:?}"
            );
            assert!(items.len() < wanted.len(), "{items:?}");
        }
        let stats = client.stats().unwrap();
        assert_eq!((stats.fetches_started, stats.fetches_failed), (6, 2));
        let served = server.stats().unwrap().resync;
        assert!(served.requests >= 6, "{served:?}");
        client.stop().unwrap();
        server.stop().unwrap();
    }

    #[test]
    fn a_fetch_that_outlives_its_deadline_fails_once() {
        // Accepts and never answers.
        let silent = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = silent.local_addr().unwrap();
        let (mut client, events, _) = start(
            Toy::default(),
            DriverConfig::new("test-deadline"),
            None,
            1_024,
        );
        let started = Instant::now();
        let request = FetchRequest {
            id: FetchId(1),
            group_id: 1,
            endpoint: ResyncEndpoint {
                protocol: ResyncProtocol::Tcp,
                addr,
            },
            what: FetchWhat::Items {
                from_seq: 1,
                leaf: 0,
            },
            deadline: started + Duration::from_millis(300),
            max_bytes: 1 << 20,
        };
        assert_eq!(
            fetch(&client, &events, request),
            vec![Fetched::Failed {
                reason: FetchFailure::Deadline
            }]
        );
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        client.stop().unwrap();
        drop(silent);
    }

    #[test]
    fn a_panicking_fetch_ends_with_exactly_one_terminal_item() {
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), WAKER).unwrap();
        let item = Fetched::Item {
            manifest: vec![1],
            chunk: vec![2],
        };
        let cases: [(Vec<Fetched>, Vec<Fetched>); 3] = [
            // Panics after an item: the failure ends it.
            (
                vec![item.clone()],
                vec![
                    item.clone(),
                    Fetched::Failed {
                        reason: FetchFailure::Malformed,
                    },
                ],
            ),
            // Panics after its terminal item: nothing more.
            (
                vec![item.clone(), Fetched::End],
                vec![item.clone(), Fetched::End],
            ),
            // Items after a terminal one are not passed on.
            (
                vec![Fetched::NotHeld, item.clone(), Fetched::End],
                vec![Fetched::NotHeld],
            ),
        ];
        for (n, (delivered, wanted)) in cases.into_iter().enumerate() {
            let (results, received) = crossbeam_channel::unbounded();
            let panics = n < 2;
            stream_fetch("test", FetchId(7), &results, &waker, |deliver| {
                for item in delivered {
                    deliver(item);
                }
                assert!(!panics, "injected fetch panic");
            });
            let got: Vec<Fetched> = received
                .try_iter()
                .map(|(id, item)| {
                    assert_eq!(id, FetchId(7));
                    item
                })
                .collect();
            assert_eq!(got, wanted, "case {n}");
        }
    }

    #[test]
    fn a_taken_address_is_named() {
        let taken = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = taken.local_addr().unwrap();
        let mut config = DriverConfig::new("test-taken");
        config.serve = Some(SenderPort {
            bind: addr,
            ..loopback_port(6)
        });
        let recorder = Recorder::default();
        let (sink, _events) = bounded_events(4);
        match Driver::new(Toy::default(), config, recorder, sink).spawn() {
            Err(DriverError::Bind {
                port, addr: named, ..
            }) => {
                assert_eq!((port, named), (Port::Serve, addr));
            }
            other => panic!("{other:?}"),
        }
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let tcp = listener.local_addr().unwrap();
        let mut config = DriverConfig::new("test-taken-resync");
        config.resync_tcp = Some(tcp);
        let (sink, _events) = bounded_events(4);
        match Driver::new(Toy::default(), config, Recorder::default(), sink).spawn() {
            Err(DriverError::ResyncBind(error)) => {
                assert_eq!((error.protocol, error.addr), (ResyncProtocol::Tcp, tcp));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_socket_that_would_block_keeps_a_backlog_and_sends_it_later_in_order() {
        let mut config = DriverConfig::new("test-would-block");
        config.serve = Some(loopback_port(7));
        let closed_for = Arc::new(std::sync::atomic::AtomicUsize::new(3));
        let recorder = Recorder::default();
        let (sink, _events) = bounded_events(1_024);
        let mut handle = Driver::new(Toy::default(), config, recorder, sink)
            .send_gate(Arc::clone(&closed_for))
            .spawn()
            .unwrap();
        let peer = test_socket();
        let to = peer.local_addr().unwrap();
        handle
            .command(ToyCommand::Send {
                port: Port::Serve,
                destination: Destination::Unicast(to),
                bytes: b"d".to_vec(),
                count: 200,
            })
            .unwrap();
        let got: Vec<Vec<u8>> = (0..200).map(|_| recv(&peer).0).collect();
        let wanted: Vec<Vec<u8>> = (0..200u32)
            .map(|i| [&b"d"[..], &i.to_be_bytes()].concat())
            .collect();
        assert_eq!(got, wanted, "every datagram, in order");
        let stats = stats_when(&handle, |s| s.sent == 200);
        assert_eq!(closed_for.load(Ordering::SeqCst), 0);
        assert_eq!(stats.send_blocked, 3);
        assert_eq!((stats.backlog, stats.backlog_dropped), (0, 0));
        handle.stop().unwrap();
    }

    /// Accepts one connection on `listener` (non-blocking) within 20 s.
    fn accept_within(listener: &std::net::TcpListener) -> std::net::TcpStream {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(20)))
                        .unwrap();
                    return stream;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no connection within 20 s");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    #[test]
    fn fetches_wait_for_a_slot_and_a_cancelled_one_is_shut_down_and_forwards_nothing() {
        // Accepts and never answers.
        let silent = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = silent.local_addr().unwrap();
        let mut config = DriverConfig::new("test-cancel");
        config.max_fetches = 1;
        let (mut client, events, _) = start(Toy::default(), config, None, 1_024);
        let request = |id| FetchRequest {
            id: FetchId(id),
            group_id: 1,
            endpoint: ResyncEndpoint {
                protocol: ResyncProtocol::Tcp,
                addr,
            },
            what: FetchWhat::State,
            deadline: Instant::now() + Duration::from_secs(60),
            max_bytes: 1 << 20,
        };
        client.command(ToyCommand::Fetch(request(1))).unwrap();
        let mut first = accept_within(&silent);
        client.command(ToyCommand::Fetch(request(2))).unwrap();
        // One slot: the second waits, queued, not dropped.
        let stats = stats_when(&client, |s| s.fetches_queued == 1);
        assert_eq!(stats.fetches_started, 1);
        client.command(ToyCommand::CancelFetch(FetchId(1))).unwrap();
        // The cancel shuts the connection down: the server reads its end.
        let mut buf = [0u8; 64];
        let mut read = 0;
        loop {
            match std::io::Read::read(&mut first, &mut buf) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(e) => panic!("the cancelled fetch's connection stayed open: {e}"),
            }
        }
        assert!(read > 0, "the state request was sent");
        // Its thread ended: the waiting fetch takes the slot.
        let second = accept_within(&silent);
        let stats = stats_when(&client, |s| s.fetches_started == 2);
        assert_eq!((stats.fetches_cancelled, stats.fetches_queued), (1, 0));
        // The second ends when its server hangs up; nothing of the first came before it.
        drop(second);
        let ToyEvent::Fetched(id, item) = wait_for(&events, |e| matches!(e, ToyEvent::Fetched(..)))
        else {
            unreachable!()
        };
        assert_eq!(id, FetchId(2), "{item:?}");
        assert!(is_terminal(&item), "{item:?}");
        client.stop().unwrap();
    }
}
