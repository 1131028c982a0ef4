//! A relay's event loop: one thread with a mio `Poll` over the upstream group socket, the
//! upstream unicast socket, the downstream group socket (whose unicast address takes the
//! members' feedback), the resync listeners and a waker, driving a [`RelaySession`].
//!
//! The loop: wait for a socket, a command or the next deadline -> receive until it would block
//! (upstream datagrams to `handle_upstream`; downstream ones, within their source's rate
//! limit, to `handle_downstream`) -> serve the resync endpoints from the relay's history ->
//! run due timers -> send what the session has, each datagram out of its tier's socket ->
//! act on the events: store each forwarded message, save the keys after each applied one,
//! resync the relay's own keys from upstream when it is behind, and deliver the events.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::fetch_job::{Fetch, FetchJob, FetchOutcome};
use super::resync_client::Endpoint;
use super::resync_server::Endpoints;
use super::socket::MulticastSocket;
use crate::gcks::{EngineError, LagSummary};
use crate::relay::{RelayEngineConfig, RelayEvent, RelaySession, RelayStats, Tier};
use crate::resync::limits::{Limits, RateLimiter};
use crate::resync::relay_store::RelayStore;
use crate::session::{Destination, ReceiverEvent};
use crate::sim::LossModel;

const UPSTREAM_GROUP: Token = Token(0);
const UPSTREAM_UNICAST: Token = Token(1);
const DOWNSTREAM: Token = Token(2);
const WAKER: Token = Token(3);
const RESYNC_TCP: Token = Token(4);
const RESYNC_HTTP: Token = Token(5);
/// Resync connections get tokens from here up.
const FIRST_CONNECTION: usize = 16;
/// Events held for a product that does not read them, at most.
const EVENT_QUEUE: usize = 4_096;
/// Downstream datagrams held while the socket would block, at most.
const MAX_BACKLOG: usize = 8_192;

/// What the relay's handle asks its loop.
pub(crate) enum RelayCommand {
    /// The relay's figures.
    Stats(Sender<RelayStats>),
    /// A resync or state-check thread's outcome.
    Fetched(FetchOutcome),
    /// Stop after saving the keys.
    Shutdown,
    /// Stop at once, storing and saving nothing more.
    Abort,
}

impl std::fmt::Debug for RelayCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stats(_) => "Stats",
            Self::Fetched(_) => "Fetched",
            Self::Shutdown => "Shutdown",
            Self::Abort => "Abort",
        })
    }
}

pub(crate) struct Started {
    pub(crate) commands: Sender<RelayCommand>,
    pub(crate) waker: Arc<Waker>,
    pub(crate) events: Receiver<RelayEvent>,
    pub(crate) thread: JoinHandle<Result<(), EngineError>>,
    pub(crate) upstream_addr: SocketAddr,
    pub(crate) feedback_addr: SocketAddr,
    pub(crate) resync_addrs: (Option<SocketAddr>, Option<SocketAddr>),
}

/// Joins the upstream group, sets up the sockets and listeners and spawns the loop's thread.
pub(crate) fn spawn(
    session: RelaySession,
    store: Option<RelayStore>,
    config: RelayEngineConfig,
) -> Result<Started, EngineError> {
    let (upstream_group, _) = MulticastSocket::receiver(&config.upstream)?;
    let (upstream_unicast, _) = MulticastSocket::sender(&config.upstream, config.upstream_bind)?;
    let (downstream, _) = MulticastSocket::sender(&config.downstream, config.downstream_bind)?;
    let upstream_addr = upstream_unicast.local_addr()?;
    let feedback_addr = downstream.local_addr()?;
    let mut upstream_group = upstream_group.into_mio();
    let mut upstream_unicast = upstream_unicast.into_mio();
    let mut downstream = downstream;
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut upstream_group, UPSTREAM_GROUP, Interest::READABLE)?;
    poll.registry()
        .register(&mut upstream_unicast, UPSTREAM_UNICAST, Interest::READABLE)?;
    poll.registry()
        .register(&mut downstream, DOWNSTREAM, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let endpoints = Endpoints::bind(
        poll.registry(),
        config.resync_tcp,
        config.resync_http,
        (RESYNC_TCP, RESYNC_HTTP, FIRST_CONNECTION),
        config.resync_limits.clone(),
    )?;
    let resync_addrs = endpoints.local_addrs();
    let (commands, command_rx) = crossbeam_channel::unbounded();
    let own_commands = commands.clone();
    let own_waker = Arc::clone(&waker);
    let (event_tx, events) = crossbeam_channel::bounded(EVENT_QUEUE);
    let loss = match config.simulated_loss {
        Some((loss, seed)) => Some((
            LossModel::new(loss).map_err(|e| {
                EngineError::Io(std::io::Error::other(format!("simulated loss: {e}")))
            })?,
            ChaCha8Rng::seed_from_u64(seed),
        )),
        None => None,
    };
    let limiter = RateLimiter::new(&Limits {
        requests_per_second_per_source: config.downstream_datagrams_per_second,
        burst_per_source: config.downstream_burst,
        ..Limits::default()
    });
    let saved_seq = session.keys().last_seq();
    let thread = std::thread::Builder::new()
        .name("rekey-relay".into())
        .spawn(move || {
            let now = Instant::now();
            let mut state = LoopState {
                upstream_group_addr: config.upstream.group,
                downstream_group_addr: config.downstream.group,
                resync: ResyncSettings {
                    local: Some(config.upstream_bind.ip()).filter(|ip| !ip.is_unspecified()),
                    endpoints: config.upstream_resync.clone(),
                    timeout: config.resync_timeout,
                    max_delay: config.resync_max_delay,
                    attempts: config.resync_attempts.max(1),
                },
                own_commands,
                own_waker,
                fetching: false,
                deferred: None,
                poll,
                upstream_group,
                upstream_unicast,
                downstream,
                endpoints,
                metrics_text: String::new(),
                metrics_at: now,
                commands: command_rx,
                events: event_tx,
                session,
                store,
                saved_seq,
                limiter,
                loss,
                rng: ChaCha8Rng::seed_from_u64(config.session.upstream.scheduler.seed ^ 0x7E1A),
                backlog: VecDeque::new(),
                figures: Figures::default(),
                lag: Histogram::new(3).ok(),
            };
            state.session.start(now);
            state.run()
        })?;
    Ok(Started {
        commands,
        waker,
        events,
        thread,
        upstream_addr,
        feedback_addr,
        resync_addrs,
    })
}

/// What the loop needs to resync the relay's own keys.
struct ResyncSettings {
    endpoints: Vec<Endpoint>,
    local: Option<std::net::IpAddr>,
    timeout: Duration,
    max_delay: Duration,
    attempts: u32,
}

/// The loop's own counters (the session keeps the protocol's).
#[derive(Debug, Default)]
struct Figures {
    resyncs_started: u64,
    resyncs_failed: u64,
    store_failures: u64,
    key_save_failures: u64,
    upstream_received: u64,
    simulated_drops: u64,
    downstream_received: u64,
    downstream_rate_limited: u64,
    send_failures: u64,
    events_dropped: u64,
}

struct LoopState {
    upstream_group_addr: SocketAddr,
    downstream_group_addr: SocketAddr,
    resync: ResyncSettings,
    own_commands: Sender<RelayCommand>,
    own_waker: Arc<Waker>,
    /// The relay's own resync or state check is running.
    fetching: bool,
    /// A resync or state check the session asked for while a fetch was running: started when
    /// it ends (an out-of-sync request supersedes a state check).
    deferred: Option<ReceiverEvent>,
    poll: Poll,
    upstream_group: mio::net::UdpSocket,
    upstream_unicast: mio::net::UdpSocket,
    downstream: MulticastSocket,
    endpoints: Endpoints,
    /// The `/metrics` text, renewed at most once a second, and when it is due.
    metrics_text: String,
    metrics_at: Instant,
    commands: Receiver<RelayCommand>,
    events: Sender<RelayEvent>,
    session: RelaySession,
    store: Option<RelayStore>,
    /// The last message whose keys are saved (or were the starting state).
    saved_seq: u64,
    /// Per-source token buckets for what downstream hosts send.
    limiter: RateLimiter,
    loss: Option<(LossModel, ChaCha8Rng)>,
    rng: ChaCha8Rng,
    /// Downstream datagrams the socket would not take yet, in order.
    backlog: VecDeque<(Vec<u8>, SocketAddr)>,
    figures: Figures,
    lag: Option<Histogram<u64>>,
}

/// How the loop ends.
enum Stop {
    /// Save the keys, then stop.
    Clean,
    /// Stop at once, saving nothing more.
    Abort,
}

impl LoopState {
    fn run(&mut self) -> Result<(), EngineError> {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 65_536];
        loop {
            let deadline = self.deadline();
            let timeout = deadline.map(|at| at.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let now = Instant::now();
            if let (Some(at), Some(lag)) = (deadline, self.lag.as_mut()) {
                if now >= at {
                    let _ = lag.record(micros(now - at));
                }
            }
            for event in events.iter() {
                match event.token() {
                    UPSTREAM_GROUP => self.receive_upstream(now, &mut buf, true),
                    UPSTREAM_UNICAST => self.receive_upstream(now, &mut buf, false),
                    DOWNSTREAM => self.receive_downstream(now, &mut buf),
                    token if self.endpoints.owns(token) => {
                        self.refresh_metrics(now);
                        let text = &self.metrics_text;
                        self.endpoints.handle_event(
                            self.poll.registry(),
                            now,
                            event,
                            &self.session,
                            &|| text.clone(),
                        );
                    }
                    _ => {}
                }
            }
            if self.endpoints.poll_timeout().is_some_and(|at| at <= now) {
                let text = &self.metrics_text;
                self.endpoints
                    .handle_timeouts(self.poll.registry(), now, &self.session, &|| text.clone());
            }
            match self.handle_commands(now) {
                Some(Stop::Clean) => {
                    self.save_keys();
                    return Ok(());
                }
                Some(Stop::Abort) => return Ok(()),
                None => {}
            }
            let now = Instant::now();
            if self.session.poll_timeout().is_some_and(|at| at <= now) {
                self.session.handle_timeout(now);
            }
            self.transmit(now, &mut buf);
            self.handle_events();
        }
    }

    /// The next time the loop must wake by itself.
    fn deadline(&self) -> Option<Instant> {
        let mut deadline = self.session.poll_timeout();
        if let Some(at) = self.endpoints.poll_timeout() {
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        if !self.backlog.is_empty() {
            // Waiting for the socket to drain; wake now and then in case no event comes.
            let at = Instant::now() + Duration::from_millis(1);
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        deadline
    }

    fn receive_upstream(&mut self, now: Instant, buf: &mut [u8], group: bool) {
        // Bounded per wake-up, so commands, timers and the other sockets still run under a
        // flood.
        for _ in 0..4_096 {
            let socket = if group {
                &self.upstream_group
            } else {
                &self.upstream_unicast
            };
            match socket.recv_from(buf) {
                Ok((len, from)) => {
                    self.figures.upstream_received += 1;
                    if group {
                        if let Some((model, rng)) = self.loss.as_mut() {
                            if model.lose(rng) {
                                self.figures.simulated_drops += 1;
                                continue;
                            }
                        }
                    }
                    self.session.handle_upstream(now, from, &buf[..len]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // ICMP errors of earlier sends and the like: the datagram is gone, go on.
                Err(_) => return,
            }
        }
    }

    fn receive_downstream(&mut self, now: Instant, buf: &mut [u8]) {
        for _ in 0..4_096 {
            match self.downstream.recv_from(buf) {
                Ok((len, from)) => {
                    self.figures.downstream_received += 1;
                    // Before any parsing or MAC check: a host over its rate costs one table
                    // lookup per datagram.
                    if !self.limiter.allow(now, from.ip()) {
                        self.figures.downstream_rate_limited += 1;
                        continue;
                    }
                    self.session.handle_downstream(now, from, &buf[..len]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    /// Renews the `/metrics` text at most once a second (it is built from every counter).
    fn refresh_metrics(&mut self, now: Instant) {
        if now >= self.metrics_at {
            self.metrics_text = self.stats().prometheus_text();
            self.metrics_at = now + Duration::from_secs(1);
        }
    }

    /// How the loop must stop, if a command said so.
    fn handle_commands(&mut self, now: Instant) -> Option<Stop> {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                RelayCommand::Stats(reply) => {
                    let _ = reply.send(self.stats());
                }
                RelayCommand::Fetched(outcome) => {
                    self.fetching = false;
                    match outcome {
                        FetchOutcome::Fetched(fetched) => {
                            for (manifest, chunk) in &fetched.items {
                                if let Err(error) = self.session.handle_resync(now, manifest, chunk)
                                {
                                    tracing::warn!(error = %crate::report::Chain(&error), "relay resync item refused");
                                    break;
                                }
                            }
                            if fetched.beyond_history {
                                self.session.handle_beyond_history(now);
                            }
                        }
                        FetchOutcome::State(manifest) => {
                            if let Err(error) = self.session.handle_state_answer(now, &manifest) {
                                tracing::warn!(error = %crate::report::Chain(&error), "relay state answer refused");
                            }
                        }
                        FetchOutcome::Failed => {
                            self.figures.resyncs_failed += 1;
                            tracing::warn!("relay resync failed on every upstream endpoint");
                        }
                    }
                }
                RelayCommand::Shutdown => return Some(Stop::Clean),
                RelayCommand::Abort => return Some(Stop::Abort),
            }
        }
        let next_seq = self.session.next_seq();
        if let Some(event) =
            crate::io::fetch_job::take_deferred(&mut self.deferred, self.fetching, next_seq)
        {
            self.act_on(&event);
        }
        None
    }

    /// Acts on the session's events and hands them to the product, once the messages they
    /// report are stored and the keys they made are saved.
    fn handle_events(&mut self) {
        let mut ready = Vec::new();
        while let Some(event) = self.session.poll_event() {
            match &event {
                RelayEvent::Forwarded { seq, chunks } => {
                    tracing::debug!(seq, chunks, "message forwarded");
                    self.store_message(*seq);
                }
                RelayEvent::NotForwarded { seq } => tracing::info!(
                    seq,
                    "message applied by resync only: not forwarded; members get it from their \
                     next resync endpoint"
                ),
                RelayEvent::ForwardFailed { seq, reason } => {
                    tracing::error!(seq, reason, "verified message not forwarded");
                }
                RelayEvent::Upstream(upstream) => self.act_on(upstream),
                _ => {}
            }
            ready.push(event);
        }
        // After the messages it forwarded are stored: a crash in between leaves a stored
        // message newer than the keys, which the store discards on open.
        self.save_keys();
        for event in ready {
            match self.events.try_send(event) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => self.figures.events_dropped += 1,
            }
        }
    }

    /// Stores message `seq` (just forwarded) in the state directory; a failure is logged and
    /// counted, and the relay goes on serving it from memory.
    fn store_message(&mut self, seq: u64) {
        let Some(store) = &self.store else {
            return;
        };
        let Some(message) = self.session.message(seq) else {
            return;
        };
        if let Err(error) = store.store_message(message) {
            self.figures.store_failures += 1;
            tracing::error!(seq, error = %crate::report::Chain(&error), "forwarded message not stored");
        }
    }

    /// Saves the relay's keys when a message was applied since the last save; a failure is
    /// counted and logged, and the next applied message tries again.
    fn save_keys(&mut self) {
        let Some(store) = &self.store else {
            return;
        };
        let keys = self.session.keys();
        if keys.last_seq() <= self.saved_seq {
            return;
        }
        match store.save_keys(keys) {
            Ok(()) => self.saved_seq = keys.last_seq(),
            Err(error) => {
                self.figures.key_save_failures += 1;
                tracing::error!(error = %crate::report::Chain(&error), "relay keys not saved");
            }
        }
    }

    /// Starts the relay's own resync or state check with the upstream endpoints when the
    /// upstream side asks for one (as a member's loop does).
    fn act_on(&mut self, event: &ReceiverEvent) {
        let request = match event {
            ReceiverEvent::OutOfSync { from_seq } => {
                tracing::warn!(from_seq, "relay out of sync: resyncing its own keys");
                Fetch::Items {
                    from_seq: *from_seq,
                    leaf: self.session.order_key(),
                }
            }
            ReceiverEvent::StateCheckNeeded { claimed_seq } => {
                tracing::info!(claimed_seq, "relay asks upstream for the group's state");
                Fetch::State
            }
            ReceiverEvent::KeysCannotOpen { seq, error } => {
                tracing::error!(
                    seq,
                    error = %crate::report::Chain(error),
                    "the relay's keys cannot open its own authenticated chunk: its bundle or \
                     saved keys are corrupt or not the GCKS's"
                );
                return;
            }
            ReceiverEvent::MustReregister => {
                let reason = self.session.reregister_reason();
                tracing::error!(
                    reason = reason.map(|r| r.to_string()),
                    "the relay must register again; it keeps serving its history"
                );
                return;
            }
            ReceiverEvent::GroupKeyUpdated { seq, version } => {
                tracing::debug!(seq, version, "relay keys updated");
                return;
            }
            _ => return,
        };
        // A relay that must register again has nothing to fetch.
        if self.resync.endpoints.is_empty() || self.session.must_reregister() {
            return;
        }
        if self.fetching {
            crate::io::fetch_job::defer(&mut self.deferred, event);
            return;
        }
        let delay = match request {
            Fetch::Items { .. } => self.resync.max_delay.mul_f64(self.rng.gen::<f64>()),
            Fetch::State => Duration::ZERO,
        };
        let job = FetchJob {
            request,
            delay,
            endpoints: self.resync.endpoints.clone(),
            group_id: self.session.keys().rekey_sa().group_id,
            local: self.resync.local,
            timeout: self.resync.timeout,
            attempts: self.resync.attempts,
            commands: self.own_commands.clone(),
            wrap: RelayCommand::Fetched,
            waker: Arc::clone(&self.own_waker),
        };
        self.fetching = true;
        self.figures.resyncs_started += 1;
        if job.spawn("rekey-relay-resync").is_err() {
            self.fetching = false;
            self.figures.resyncs_failed += 1;
        }
    }

    fn stats(&self) -> RelayStats {
        let s = &self.session;
        let f = &self.figures;
        RelayStats {
            relay: *s.counters(),
            upstream: *s.upstream_counters(),
            upstream_datagrams: *s.upstream_datagram_counters(),
            upstream_messages: *s.upstream_message_counters(),
            downstream: *s.downstream_counters(),
            downstream_repair: s.downstream_repair_stats(),
            next_seq: s.next_seq(),
            held: s.downstream().latest_seq().zip(s.downstream().oldest_seq()),
            must_reregister: s.must_reregister(),
            resync: self.endpoints.counters(),
            resyncs_started: f.resyncs_started,
            resyncs_failed: f.resyncs_failed,
            store_failures: f.store_failures,
            key_save_failures: f.key_save_failures,
            upstream_received: f.upstream_received,
            simulated_drops: f.simulated_drops,
            downstream_received: f.downstream_received,
            downstream_rate_limited: f.downstream_rate_limited,
            send_failures: f.send_failures,
            events_dropped: f.events_dropped,
            loop_lag_us: LagSummary::from_histogram(self.lag.as_ref()),
        }
    }

    /// Sends what the session has, each datagram out of its tier's socket. Upstream datagrams
    /// (a few NACKs and probe replies) that the socket will not take are dropped like lost
    /// ones (the NACK timers ask again); downstream ones wait in order in a bounded backlog.
    fn transmit(&mut self, now: Instant, buf: &mut [u8]) {
        if !self.drain_backlog() {
            return;
        }
        // Bounded per wake-up so that a fast session cannot starve receiving.
        for _ in 0..4_096 {
            let Some(transmit) = self.session.poll_transmit(now, buf) else {
                return;
            };
            let datagram = &buf[..transmit.len];
            match transmit.tier {
                Tier::Upstream => {
                    let dest = match transmit.destination {
                        Destination::Group => self.upstream_group_addr,
                        Destination::Unicast(addr) => addr,
                    };
                    if self.upstream_unicast.send_to(datagram, dest).is_err() {
                        self.figures.send_failures += 1;
                    }
                }
                Tier::Downstream => {
                    let dest = match transmit.destination {
                        Destination::Group => self.downstream_group_addr,
                        Destination::Unicast(addr) => addr,
                    };
                    if !self.backlog.is_empty() {
                        self.hold(datagram.to_vec(), dest);
                        continue;
                    }
                    match self.downstream.send_to(datagram, dest) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            self.hold(datagram.to_vec(), dest);
                        }
                        // No route, a refused unicast: this datagram is lost, as on the
                        // network; repair and resync cover it.
                        Err(_) => self.figures.send_failures += 1,
                    }
                }
            }
        }
    }

    fn hold(&mut self, datagram: Vec<u8>, dest: SocketAddr) {
        if self.backlog.len() < MAX_BACKLOG {
            self.backlog.push_back((datagram, dest));
        } else {
            self.figures.send_failures += 1;
        }
    }

    /// Sends the backlog in order; false if the socket would still block.
    fn drain_backlog(&mut self) -> bool {
        while let Some((datagram, dest)) = self.backlog.pop_front() {
            match self.downstream.send_to(&datagram, dest) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.backlog.push_front((datagram, dest));
                    return false;
                }
                Err(_) => self.figures.send_failures += 1,
            }
        }
        true
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
