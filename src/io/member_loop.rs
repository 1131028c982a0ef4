//! A member's event loop: one thread with a mio `Poll` over the group socket, the unicast
//! feedback socket and a waker, driving a [`ReceiverSession`].
//!
//! The loop: wait for a socket, a command or the next deadline -> receive until it would block
//! and hand each datagram to the session (after the simulated loss, when configured) -> run due
//! timers -> send the session's NACKs and probe replies -> deliver its events. Signature checks
//! (two per message at most) run inline: they cost tens of microseconds per message.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::resync_client::{fetch_items_from, fetch_state_from, Endpoint, Fetched};
use super::socket::MulticastSocket;
use crate::gcks::{EngineError, LagSummary};
use crate::member::{MemberCommand, MemberConfig, MemberStats};
use crate::session::receiver::ResyncError;
use crate::session::{Destination, ReceiverEvent, ReceiverSession};
use crate::sim::LossModel;

const GROUP: Token = Token(0);
const UNICAST: Token = Token(1);
const WAKER: Token = Token(2);

pub(crate) struct Started {
    pub(crate) commands: Sender<MemberCommand>,
    pub(crate) waker: Arc<Waker>,
    pub(crate) events: Receiver<ReceiverEvent>,
    pub(crate) thread: JoinHandle<Result<(), EngineError>>,
    pub(crate) local_addr: SocketAddr,
}

/// Joins the group, sets up the sockets and spawns the loop's thread.
pub(crate) fn spawn(
    session: ReceiverSession,
    config: MemberConfig,
) -> Result<Started, EngineError> {
    let saved_seq = session.keys().last_seq();
    let (group_socket, _) = MulticastSocket::receiver(&config.multicast)?;
    let (unicast_socket, _) = MulticastSocket::sender(&config.multicast, config.bind)?;
    let local_addr = unicast_socket.local_addr()?;
    let mut group_socket = group_socket.into_mio();
    let mut unicast_socket = unicast_socket.into_mio();
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut group_socket, GROUP, Interest::READABLE)?;
    poll.registry()
        .register(&mut unicast_socket, UNICAST, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (commands, command_rx) = crossbeam_channel::unbounded();
    let own_commands = commands.clone();
    let own_waker = Arc::clone(&waker);
    let (event_tx, events) = crossbeam_channel::unbounded();
    let loss = match config.simulated_loss {
        Some((loss, seed)) => Some((
            LossModel::new(loss).map_err(|e| {
                EngineError::Io(std::io::Error::other(format!("simulated loss: {e}")))
            })?,
            ChaCha8Rng::seed_from_u64(seed),
        )),
        None => None,
    };
    let thread = std::thread::Builder::new()
        .name("rekeycast-member".into())
        .spawn(move || {
            let mut state = LoopState {
                group: config.multicast.group,
                resync: ResyncSettings::from(&config),
                own_commands,
                own_waker,
                fetching: false,
                deferred: None,
                resyncs_started: 0,
                resyncs_failed: 0,
                state_file: config.state_file.clone(),
                state_save_failures: 0,
                saved_seq,
                rng: ChaCha8Rng::seed_from_u64(config.receiver.scheduler.seed ^ 0x5EED),
                poll,
                group_socket,
                unicast_socket,
                commands: command_rx,
                events: event_tx,
                session,
                loss,
                simulated_drops: 0,
                datagrams_received: 0,
                lag: Histogram::new(3).ok(),
            };
            state.run()
        })?;
    Ok(Started {
        commands,
        waker,
        events,
        thread,
        local_addr,
    })
}

/// What the loop needs to resync by itself.
struct ResyncSettings {
    endpoints: Vec<Endpoint>,
    local: Option<std::net::IpAddr>,
    group_size: u32,
    timeout: Duration,
    max_delay: Duration,
    capacity: f64,
    attempts: u32,
}

impl ResyncSettings {
    fn from(config: &MemberConfig) -> Self {
        Self {
            endpoints: config.resync_endpoints.clone(),
            local: Some(config.bind.ip()).filter(|ip| !ip.is_unspecified()),
            group_size: config.receiver.scheduler.group_size,
            timeout: config.resync_timeout,
            max_delay: config.resync_max_delay,
            capacity: config.resync_capacity,
            attempts: config.resync_attempts.max(1),
        }
    }
}

struct LoopState {
    group: SocketAddr,
    resync: ResyncSettings,
    own_commands: Sender<MemberCommand>,
    own_waker: Arc<Waker>,
    /// A resync or state-check thread is running.
    fetching: bool,
    /// A resync or state check the session asked for while a fetch was running: started when
    /// it ends (an out-of-sync request supersedes a state check).
    deferred: Option<ReceiverEvent>,
    resyncs_started: u64,
    resyncs_failed: u64,
    /// Where the keys are saved after every applied message.
    state_file: Option<PathBuf>,
    state_save_failures: u64,
    /// The last message whose keys are saved (or were the starting state).
    saved_seq: u64,
    rng: ChaCha8Rng,
    poll: Poll,
    group_socket: mio::net::UdpSocket,
    unicast_socket: mio::net::UdpSocket,
    commands: Receiver<MemberCommand>,
    events: Sender<ReceiverEvent>,
    session: ReceiverSession,
    loss: Option<(LossModel, ChaCha8Rng)>,
    simulated_drops: u64,
    datagrams_received: u64,
    lag: Option<Histogram<u64>>,
}

impl LoopState {
    fn run(&mut self) -> Result<(), EngineError> {
        let mut events = Events::with_capacity(64);
        let mut buf = vec![0u8; 65_536];
        // The silence timer runs from the start: a member that never hears anything (its
        // relay died before it registered) asks for the group's state too.
        self.session.start(Instant::now());
        loop {
            let deadline = self.session.poll_timeout();
            let timeout = deadline.map(|at| at.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            let now = Instant::now();
            if let (Some(at), Some(lag)) = (deadline, self.lag.as_mut()) {
                if now >= at {
                    let micros = u64::try_from((now - at).as_micros()).unwrap_or(u64::MAX);
                    let _ = lag.record(micros);
                }
            }
            for event in events.iter() {
                match event.token() {
                    GROUP => self.receive(now, &mut buf, true),
                    UNICAST => self.receive(now, &mut buf, false),
                    _ => {}
                }
            }
            if self.handle_commands(now) {
                // Messages applied since the last save (their events are not delivered).
                self.save_state();
                return Ok(());
            }
            let now = Instant::now();
            if self.session.poll_timeout().is_some_and(|at| at <= now) {
                self.session.handle_timeout(now);
            }
            self.transmit(now, &mut buf);
            let mut ready = Vec::new();
            while let Some(event) = self.session.poll_event() {
                ready.push(event);
            }
            // The keys are on disk before the product hears of the messages that made them.
            self.save_state();
            for event in ready {
                self.act_on(&event);
                if self.events.send(event).is_err() {
                    // The product dropped its handle's receiver: nobody listens any more.
                    return Ok(());
                }
            }
        }
    }

    fn receive(&mut self, now: Instant, buf: &mut [u8], group: bool) {
        for _ in 0..4_096 {
            let socket = if group {
                &self.group_socket
            } else {
                &self.unicast_socket
            };
            match socket.recv_from(buf) {
                Ok((len, from)) => {
                    self.datagrams_received += 1;
                    if group {
                        if let Some((model, rng)) = self.loss.as_mut() {
                            if model.lose(rng) {
                                self.simulated_drops += 1;
                                continue;
                            }
                        }
                    }
                    self.session.handle_datagram(now, from, &buf[..len]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    /// Returns true on shutdown.
    fn handle_commands(&mut self, now: Instant) -> bool {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                MemberCommand::Stats(reply) => {
                    let _ = reply.send(self.stats());
                }
                MemberCommand::Resync(items, reply) => {
                    let mut outcome = Err(ResyncError::MalformedManifest);
                    for (manifest, chunk) in &items {
                        outcome = self.session.handle_resync(now, manifest, chunk);
                        if outcome.is_err() {
                            break;
                        }
                    }
                    let _ = reply.send(outcome);
                }
                MemberCommand::StateAnswer(manifest, reply) => {
                    let _ = reply.send(self.session.handle_state_answer(now, &manifest));
                }
                MemberCommand::BeyondHistory => self.session.handle_beyond_history(now),
                MemberCommand::Fetched(fetched) => {
                    self.fetching = false;
                    for (manifest, chunk) in &fetched.items {
                        if self.session.handle_resync(now, manifest, chunk).is_err() {
                            break;
                        }
                    }
                    if fetched.beyond_history {
                        self.session.handle_beyond_history(now);
                    }
                }
                MemberCommand::StateFetched(manifest) => {
                    self.fetching = false;
                    let _ = self.session.handle_state_answer(now, &manifest);
                }
                MemberCommand::FetchFailed => {
                    self.fetching = false;
                    self.resyncs_failed += 1;
                }
                MemberCommand::Shutdown => return true,
            }
        }
        let next_seq = self.session.next_seq();
        if let Some(event) = take_deferred(&mut self.deferred, self.fetching, next_seq) {
            self.act_on(&event);
        }
        false
    }

    /// Starts a resync or state check with the endpoints, on its own thread, when the session
    /// asks for one and the member has endpoints and is not fetching already.
    fn act_on(&mut self, event: &ReceiverEvent) {
        // A member that must register again has nothing to fetch: its keys are no longer
        // the group's (or cannot reach what it lacks).
        if self.resync.endpoints.is_empty() || self.session.must_reregister() {
            return;
        }
        if self.fetching {
            defer(&mut self.deferred, event);
            return;
        }
        let request = match event {
            ReceiverEvent::OutOfSync { from_seq } => Fetch::Items {
                from_seq: *from_seq,
                leaf: self.session.order_key(),
            },
            ReceiverEvent::StateCheckNeeded { .. } => Fetch::State,
            _ => return,
        };
        self.fetching = true;
        self.resyncs_started += 1;
        // Against out-of-sync implosion (ALGORITHMS.md): spread the group's requests over
        // group size / capacity seconds, at most the configured bound.
        let spread = (f64::from(self.resync.group_size) / self.resync.capacity.max(1.0))
            .min(self.resync.max_delay.as_secs_f64())
            .max(0.0);
        let delay = match request {
            Fetch::Items { .. } => Duration::from_secs_f64(spread * self.rng.gen::<f64>()),
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
            wrap: MemberCommand::from_fetch,
            waker: Arc::clone(&self.own_waker),
        };
        let spawned = job.spawn("rekeycast-resync");
        if spawned.is_err() {
            self.fetching = false;
            self.resyncs_failed += 1;
        }
    }

    /// Saves the member's keys to the state file, when configured and a message was applied
    /// since the last save; a failure is counted and the loop goes on (the file keeps the last
    /// state saved, and the next applied message tries again).
    fn save_state(&mut self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let keys = self.session.keys();
        if keys.last_seq() <= self.saved_seq {
            return;
        }
        match crate::persist::save_member_keys(keys, path) {
            Ok(()) => self.saved_seq = keys.last_seq(),
            Err(_) => self.state_save_failures += 1,
        }
    }

    fn stats(&self) -> MemberStats {
        MemberStats {
            receiver: *self.session.counters(),
            datagrams: *self.session.datagram_counters(),
            messages: *self.session.message_counters(),
            next_seq: self.session.next_seq(),
            order_key: self.session.order_key(),
            group_key_version: self.session.group_key().map(|k| k.version),
            simulated_drops: self.simulated_drops,
            datagrams_received: self.datagrams_received,
            loop_lag_us: LagSummary::from_histogram(self.lag.as_ref()),
            resyncs_started: self.resyncs_started,
            resyncs_failed: self.resyncs_failed,
            state_save_failures: self.state_save_failures,
            must_reregister: self.session.reregister_reason(),
        }
    }

    fn transmit(&mut self, now: Instant, buf: &mut [u8]) {
        // A member sends a few NACKs and probe replies at most; a datagram the socket will not
        // take is dropped like a lost one (the NACK timers ask again).
        for _ in 0..1_024 {
            let Some(transmit) = self.session.poll_transmit(now, buf) else {
                return;
            };
            let dest = match transmit.destination {
                Destination::Group => self.group,
                Destination::Unicast(addr) => addr,
            };
            let _ = self.unicast_socket.send_to(&buf[..transmit.len], dest);
        }
    }
}

/// What a [`FetchJob`] asks the endpoints for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fetch {
    /// The manifest and own chunk of every message from `from_seq` on.
    Items {
        /// The first message wanted.
        from_seq: u64,
        /// The order key of the asker's leaf.
        leaf: u32,
    },
    /// The latest signed manifest (a state check).
    State,
}

/// What a [`FetchJob`] found, posted to its loop.
#[derive(Debug)]
pub(crate) enum FetchOutcome {
    /// Resync items, in order, gathered from one or more endpoints.
    Fetched(crate::io::resync_client::Fetched),
    /// An endpoint's state answer.
    State(Vec<u8>),
    /// Every endpoint failed on every round.
    Failed,
}

impl MemberCommand {
    fn from_fetch(outcome: FetchOutcome) -> Self {
        match outcome {
            FetchOutcome::Fetched(fetched) => Self::Fetched(fetched),
            FetchOutcome::State(manifest) => Self::StateFetched(manifest),
            FetchOutcome::Failed => Self::FetchFailed,
        }
    }
}

/// A resync or state check against the endpoints, run on its own thread: waits its delay,
/// then tries each endpoint in order, rounds apart by an exponential backoff, and posts the
/// outcome to its loop (a member's or a relay's) as the command `wrap` makes of it.
///
/// A resync goes on at the next endpoint when one cannot serve the next message the asker
/// needs: it served nothing (it has not got that message: a relay behind, or its history
/// starts later) or stopped at a message it does not hold (a relay's gap: a message it got
/// by resync only). The items already fetched are kept and the next endpoint is asked from
/// the message after them, so a member behind a relay with a gap gets what the relay holds
/// from the relay and the rest from the GCKS. Only an answer that served through to the
/// endpoint's latest message, or said the messages left the group's history (which only the
/// GCKS says), ends the resync early.
pub(crate) struct FetchJob<C> {
    pub(crate) request: Fetch,
    pub(crate) delay: Duration,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) group_id: u32,
    /// The asker's own address, where it is a specific one: resync connections come from it.
    pub(crate) local: Option<std::net::IpAddr>,
    pub(crate) timeout: Duration,
    pub(crate) attempts: u32,
    pub(crate) commands: Sender<C>,
    pub(crate) wrap: fn(FetchOutcome) -> C,
    pub(crate) waker: Arc<Waker>,
}

impl<C: Send + 'static> FetchJob<C> {
    /// Runs the job on a thread of its own named `name`.
    pub(crate) fn spawn(self, name: &str) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || self.run())
    }

    fn run(self) {
        std::thread::sleep(self.delay);
        let outcome = match self.request {
            Fetch::Items { from_seq, leaf } => self.items(from_seq, leaf),
            Fetch::State => self.state(),
        };
        if self.commands.send((self.wrap)(outcome)).is_ok() {
            let _ = self.waker.wake();
        }
    }

    fn state(&self) -> FetchOutcome {
        let mut backoff = Duration::from_millis(200);
        for _ in 0..self.attempts {
            let mut failed = false;
            for &endpoint in &self.endpoints {
                // No manifest yet (an endpoint that has sent nothing) or a failure: the next
                // endpoint may know more.
                match fetch_state_from(self.local, endpoint, self.group_id, self.timeout) {
                    Ok(Some(manifest)) => return FetchOutcome::State(manifest),
                    Ok(None) => {}
                    Err(_) => failed = true,
                }
            }
            if !failed {
                // Every endpoint answered and none has sent anything yet.
                return FetchOutcome::Failed;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        FetchOutcome::Failed
    }

    fn items(&self, from_seq: u64, leaf: u32) -> FetchOutcome {
        let mut backoff = Duration::from_millis(200);
        let mut gathered = Fetched::default();
        for _ in 0..self.attempts {
            // Whether an endpoint failed outright this round (worth another round), as opposed
            // to answering that it does not hold what is needed.
            let mut failed = false;
            let mut answered = false;
            for &endpoint in &self.endpoints {
                let next = from_seq.saturating_add(gathered.items.len() as u64);
                match fetch_items_from(
                    self.local,
                    endpoint,
                    self.group_id,
                    next,
                    leaf,
                    self.timeout,
                ) {
                    Ok(fetched) => {
                        answered = true;
                        let served = !fetched.items.is_empty();
                        gathered.items.extend(fetched.items);
                        if fetched.beyond_history {
                            gathered.beyond_history = true;
                            return FetchOutcome::Fetched(gathered);
                        }
                        if served && !fetched.not_held {
                            return FetchOutcome::Fetched(gathered);
                        }
                    }
                    Err(_) => failed = true,
                }
            }
            if answered && !failed {
                // Every endpoint answered and none holds more: nothing to retry.
                return FetchOutcome::Fetched(gathered);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        if gathered.items.is_empty() {
            FetchOutcome::Failed
        } else {
            FetchOutcome::Fetched(gathered)
        }
    }
}

/// Remembers a resync or state check asked for while a fetch runs (an out-of-sync request
/// supersedes a state check), instead of dropping it: a dropped request left a member behind
/// until its next silence.
pub(crate) fn defer(deferred: &mut Option<ReceiverEvent>, event: &ReceiverEvent) {
    match event {
        ReceiverEvent::OutOfSync { .. } => *deferred = Some(event.clone()),
        ReceiverEvent::StateCheckNeeded { .. } if deferred.is_none() => {
            *deferred = Some(event.clone());
        }
        _ => {}
    }
}

/// The deferred request to start once no fetch runs: a resync from where the session stands
/// now (`next_seq`), or the state check.
pub(crate) fn take_deferred(
    deferred: &mut Option<ReceiverEvent>,
    fetching: bool,
    next_seq: u64,
) -> Option<ReceiverEvent> {
    if fetching {
        return None;
    }
    match deferred.take()? {
        ReceiverEvent::OutOfSync { .. } => Some(ReceiverEvent::OutOfSync { from_seq: next_seq }),
        other => Some(other),
    }
}

#[cfg(test)]
mod deferred_tests {
    use super::*;

    #[test]
    fn a_request_made_while_fetching_is_kept_and_started_afterwards() {
        let mut deferred = None;
        defer(
            &mut deferred,
            &ReceiverEvent::StateCheckNeeded { claimed_seq: 9 },
        );
        // An out-of-sync request supersedes the state check; a later state check does not
        // replace it.
        defer(&mut deferred, &ReceiverEvent::OutOfSync { from_seq: 4 });
        defer(
            &mut deferred,
            &ReceiverEvent::StateCheckNeeded { claimed_seq: 10 },
        );
        assert_eq!(
            take_deferred(&mut deferred, true, 6),
            None,
            "still fetching"
        );
        // Started from where the session stands once the fetch ended.
        assert_eq!(
            take_deferred(&mut deferred, false, 6),
            Some(ReceiverEvent::OutOfSync { from_seq: 6 })
        );
        assert_eq!(take_deferred(&mut deferred, false, 6), None, "once");
        defer(
            &mut deferred,
            &ReceiverEvent::GroupKeyUpdated { seq: 1, version: 1 },
        );
        assert_eq!(deferred, None, "only fetch requests are kept");
    }
}
