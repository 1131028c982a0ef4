//! The relay endpoint: a [`RelaySession`] with everything a relay decides around it, sans-IO.
//!
//! [`RelayEndpoint`] receives the upstream group ([`Port::Listen`]) and what the upstream sender
//! unicasts to it ([`Port::Feedback`]), re-sends each verified message into its own group and
//! answers its members' feedback there ([`Port::Serve`]), and around the session it:
//!
//! - **persists** (when [`RelayEndpointConfig::persistent`]): each message it forwards is a
//!   [`RelayStoreOp::Message`] and the keys after the messages it applied a
//!   [`RelayStoreOp::Keys`], in that order, so a crash between the two leaves a stored message
//!   newer than the keys (which the store discards on open), never keys ahead of a message the
//!   relay claims to hold. The events a batch of input produced are released to the owner only
//!   once the operations it caused are acknowledged. A failed operation is counted and the relay
//!   goes on serving from memory; a failed key save is tried again at the next applied message
//!   and at shutdown;
//! - **resyncs its own keys** from upstream when it falls behind (its upstream side's
//!   out-of-sync and state-check requests), by the one [`ResyncPolicy`] members run too: which
//!   endpoint, when, how each streamed item is verified and what a failure does. A message the
//!   relay gets by resync only is applied but not forwarded;
//! - **serves resync** from its history ([`Endpoint::resync_source`]);
//! - keeps its own figures ([`RelayEndpoint::stats`]).
//!
//! Rate limits on what downstream hosts send, sockets, logging and the event channel are the
//! driver's.
//!
//! # Commands
//!
//! [`RelayCommand::Shutdown`] saves the keys if they moved since the last save and stops once
//! that is acknowledged; [`RelayCommand::Abort`] stops at once with nothing more stored, as a
//! crash would.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::resync_policy::{ResyncConfig, ResyncCounters, ResyncPolicy};
use super::{
    Destination, Endpoint, FetchId, FetchRequest, Fetched, NoJob, Port, StoreError, StoreId,
    TimerTable, Transmit,
};
use crate::auth::datagram::DatagramCounters;
use crate::auth::message::MessageCounters;
use crate::lkh::{MemberKeys, RegistrationBundle};
use crate::relay::{RelayConfig, RelayCounters, RelayError, RelayEvent, RelaySession, Tier};
use crate::resync::ResyncSource;
use crate::session::receiver::ResyncError;
use crate::session::{
    ConfigError, PreparedMessage, ReceiverCounters, SenderCounters, StoredMessage,
};

/// Configuration of a [`RelayEndpoint`].
#[derive(Debug, Clone, PartialEq)]
pub struct RelayEndpointConfig {
    /// The relay session: upstream receiver, downstream sender, group size, cut-through.
    pub session: RelayConfig,
    /// How the relay resyncs its own keys: the upstream endpoints (an upstream relay's first,
    /// in [`ResyncConfig::relays`], then the GCKS's in [`ResyncConfig::gcks`]), deadlines,
    /// rounds and spreading. No endpoint: the relay cannot resync, and what it misses it
    /// misses.
    pub resync: ResyncConfig,
    /// Whether the relay keeps durable state: its forwarded messages and its keys go out as
    /// store operations ([`Endpoint::poll_store`]). Off: nothing is stored.
    pub persistent: bool,
}

impl RelayEndpointConfig {
    /// A relay whose NACKs go to `upstream_feedback`, with production defaults, no upstream
    /// resync endpoint and nothing stored.
    pub fn new(upstream_feedback: SocketAddr) -> Self {
        Self {
            session: RelayConfig::new(upstream_feedback),
            resync: ResyncConfig::default(),
            persistent: false,
        }
    }

    /// Checks the session's ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.session.validate()
    }
}

/// What the owner of a [`RelayEndpoint`] asks of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RelayCommand {
    /// Save the keys (if they moved since the last save), then stop.
    Shutdown,
    /// Stop at once, storing and saving nothing more, as a crash would.
    Abort,
}

/// A durable operation of a relay, applied in the order given.
#[derive(Debug, Clone)]
pub enum RelayStoreOp {
    /// Store this message, just forwarded, so a restarted relay serves it at once; drop
    /// stored messages that left the history window.
    Message(StoredMessage),
    /// Save the relay's keys (as of the last message it applied), replacing the saved ones.
    Keys(Box<MemberKeys>),
}

/// A snapshot of a relay endpoint's figures: its session's and its own.
#[derive(Debug, Clone, Default)]
pub struct RelayEndpointStats {
    /// What the relay forwarded.
    pub relay: RelayCounters,
    /// The upstream side's counters (messages applied, NACKs sent, bad chunks).
    pub upstream: ReceiverCounters,
    /// The upstream datagram verifier's counters (header, MAC and window rejections).
    pub upstream_datagrams: DatagramCounters,
    /// The upstream message verifier's counters (signature checks made and failed).
    pub upstream_messages: MessageCounters,
    /// The downstream side's counters (what it sent, NACKs received, rejected datagrams).
    pub downstream: SenderCounters,
    /// The downstream repair aggregator's counters.
    pub downstream_repair: rekeycast_nack::AggregatorStats,
    /// The next message the relay needs from upstream.
    pub next_seq: u64,
    /// The newest and oldest messages the relay's history holds (what it serves).
    pub held: Option<(u64, u64)>,
    /// Whether the relay was told to register again (it cannot forward any more).
    pub must_reregister: bool,
    /// The relay's own resyncs and state checks with the upstream endpoints.
    pub resync: ResyncCounters,
    /// Forwarded messages whose store operation failed (the relay serves them from memory
    /// until it restarts).
    pub store_failures: u64,
    /// Key saves that failed (the store keeps the last keys saved).
    pub key_save_failures: u64,
    /// What went to the unicast relays behind this one
    /// ([`RelayConfig::unicast_relays`](crate::relay::RelayConfig::unicast_relays)).
    pub uplinks: crate::relay::uplink::UplinkCounters,
    /// The distinct member addresses that reached the relay (MAC-checked feedback, resync
    /// requests) within the tally's window, as of the latest time the endpoint was handed
    /// ([`crate::relay::members::MemberTally`]).
    pub members: u64,
    /// The member tally's counters.
    pub member_tally: crate::relay::members::MemberTallyCounters,
}

/// The relay's timers, indexes of its [`TimerTable`].
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// The session's next deadline (pacing, NACK backoff, heartbeats, silence).
    Session = 0,
    /// The resync policy's next deadline (a spread start, a backoff, a fetch's deadline).
    Resync = 1,
}

/// The number of [`Timer`]s.
const TIMERS: usize = 2;

/// What a store operation in flight was, for its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Message `seq` stored.
    Message,
    /// The keys as of message `seq` saved.
    Keys(u64),
}

/// How far the relay is in stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Relaying.
    Running,
    /// Shutting down: waits for its last store operations.
    ShuttingDown,
    /// Stopped.
    Stopped,
}

/// One relay's endpoint. See the [module docs](self).
///
/// Call order: feed [`Endpoint::handle_datagram`] (upstream datagrams on [`Port::Listen`] and
/// [`Port::Feedback`], members' feedback on [`Port::Serve`]), [`Endpoint::handle_stored`],
/// [`Endpoint::handle_fetched`] and [`Endpoint::handle_timeout`]; then drain
/// [`Endpoint::poll_transmit`], [`Endpoint::poll_store`], [`Endpoint::poll_fetch`],
/// [`Endpoint::poll_cancel_fetch`] and [`Endpoint::poll_event`], and re-read
/// [`Endpoint::poll_timeout`].
#[derive(Debug)]
pub struct RelayEndpoint {
    session: RelaySession,
    resync: ResyncPolicy,
    persistent: bool,
    timers: TimerTable<TIMERS>,
    run: Run,
    /// Store operations not yet handed out, in order.
    stores: VecDeque<(StoreId, RelayStoreOp)>,
    /// Store operations handed out or queued and not yet acknowledged.
    unacked: BTreeSet<StoreId>,
    /// What each unacknowledged operation was.
    pending: BTreeMap<StoreId, Pending>,
    next_store: u64,
    /// The last message whose keys are durably saved (or the starting state's).
    saved_seq: u64,
    /// The last message whose keys a save was asked for.
    requested_seq: u64,
    /// Events for the owner, each released once every store operation issued before it (up to
    /// its gate) is acknowledged.
    events: VecDeque<(RelayEvent, Option<StoreId>)>,
    store_failures: u64,
    key_save_failures: u64,
    /// The latest time handed to the endpoint: what [`RelayEndpoint::stats`] counts the
    /// members as of.
    latest_now: Instant,
}

impl RelayEndpoint {
    /// A relay registered with `bundle` (like a member; the GCKS knows it as a relay), with
    /// nothing forwarded yet, started at `now`.
    pub fn new(
        bundle: &RegistrationBundle,
        config: RelayEndpointConfig,
        now: Instant,
    ) -> Result<Self, RelayError> {
        let session = RelaySession::new(bundle, config.session.clone(), now)?;
        Ok(Self::assemble(session, config, now))
    }

    /// A relay back after its own restart at `now`: its saved keys and the messages it stored
    /// (ascending, each no newer than the keys), which it serves at once. Messages it missed
    /// while down come by resync (it cannot forward those).
    pub fn resume(
        keys: MemberKeys,
        history: Vec<PreparedMessage>,
        config: RelayEndpointConfig,
        now: Instant,
    ) -> Result<Self, RelayError> {
        let session = RelaySession::resume(keys, history, config.session.clone(), now)?;
        Ok(Self::assemble(session, config, now))
    }

    fn assemble(mut session: RelaySession, config: RelayEndpointConfig, now: Instant) -> Self {
        // Seeded from the configuration, so runs reproduce; apart from the session's own
        // scheduler, which uses the same seed.
        let rng = ChaCha8Rng::seed_from_u64(config.session.upstream.scheduler.seed ^ 0x7E1A);
        session.start(now);
        let saved_seq = session.keys().last_seq();
        let mut endpoint = Self {
            session,
            resync: ResyncPolicy::new(config.resync, rng),
            persistent: config.persistent,
            timers: TimerTable::new(),
            run: Run::Running,
            stores: VecDeque::new(),
            unacked: BTreeSet::new(),
            pending: BTreeMap::new(),
            next_store: 0,
            saved_seq,
            requested_seq: saved_seq,
            events: VecDeque::new(),
            store_failures: 0,
            key_save_failures: 0,
            latest_now: now,
        };
        // A resumed session may have events already (its history restored).
        endpoint.after_input(now);
        endpoint
    }

    /// The relay's figures.
    pub fn stats(&self) -> RelayEndpointStats {
        let s = &self.session;
        RelayEndpointStats {
            relay: *s.counters(),
            upstream: *s.upstream_counters(),
            upstream_datagrams: *s.upstream_datagram_counters(),
            upstream_messages: *s.upstream_message_counters(),
            downstream: *s.downstream_counters(),
            downstream_repair: s.downstream_repair_stats(),
            next_seq: s.next_seq(),
            held: s.downstream().latest_seq().zip(s.downstream().oldest_seq()),
            must_reregister: s.must_reregister(),
            resync: *self.resync.counters(),
            store_failures: self.store_failures,
            key_save_failures: self.key_save_failures,
            uplinks: *s.uplink_counters(),
            members: s.members(self.latest_now),
            member_tally: s.member_counters(),
        }
    }

    /// The relay session (its keys, history and counters).
    pub fn session(&self) -> &RelaySession {
        &self.session
    }

    /// Applies resync items its owner fetched, not the relay's own policy (a simulator
    /// starting a relay in sync with a group's admitting message): each a manifest and the
    /// relay's own chunk, in sequence order from its next message. Verified like multicast
    /// traffic; those messages are not forwarded. The last sequence number applied, or the
    /// first refusal.
    pub fn apply_resync(
        &mut self,
        now: Instant,
        items: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<u64, ResyncError> {
        let mut outcome = Err(ResyncError::MalformedManifest);
        for (manifest, chunk) in items {
            outcome = self.session.handle_resync(now, manifest, chunk);
            if outcome.is_err() {
                break;
            }
        }
        self.after_input(now);
        outcome
    }

    /// Whether the relay still takes input: not shutting down or stopped.
    fn running(&self) -> bool {
        self.run == Run::Running
    }

    /// Acts on what the session and the policy produced, and re-arms the timers: after every
    /// input.
    fn after_input(&mut self, now: Instant) {
        let first_new = self.events.len();
        // The policy's calls into the session (applying resync items) make session events, and
        // the session's events make policy requests: until both are quiet.
        loop {
            let mut progressed = false;
            while let Some(event) = self.session.poll_event() {
                progressed = true;
                self.act_on(now, &event);
                self.events.push_back((event, None));
            }
            while let Some(event) = self.resync.poll_event() {
                progressed = true;
                self.events.push_back((RelayEvent::Resync(event), None));
            }
            if !progressed {
                break;
            }
        }
        if self.events.len() > first_new {
            // After the messages the events forwarded are stored.
            self.save_keys_if_moved();
            let gate = self.last_store_issued();
            for (_, slot) in self.events.iter_mut().skip(first_new) {
                *slot = gate;
            }
        }
        self.rearm();
    }

    /// Stores what `event` reports forwarded, and hands resync requests to the policy.
    fn act_on(&mut self, now: Instant, event: &RelayEvent) {
        match event {
            RelayEvent::Forwarded { seq, .. } if self.persistent => {
                if let Some(message) = self.session.message(*seq) {
                    let op = RelayStoreOp::Message(StoredMessage::from_prepared(message));
                    self.issue(op, Pending::Message);
                }
            }
            RelayEvent::Upstream(upstream) => {
                self.resync.handle_event(now, upstream, &self.session);
            }
            _ => {}
        }
    }

    /// Asks for the keys to be saved when a message was applied since the last request.
    fn save_keys_if_moved(&mut self) {
        let seq = self.session.keys().last_seq();
        if self.persistent && seq > self.requested_seq {
            self.requested_seq = seq;
            let keys = self.session.keys().clone();
            self.issue(RelayStoreOp::Keys(Box::new(keys)), Pending::Keys(seq));
        }
    }

    fn issue(&mut self, op: RelayStoreOp, what: Pending) {
        let id = StoreId(self.next_store);
        self.next_store += 1;
        self.unacked.insert(id);
        self.pending.insert(id, what);
        self.stores.push_back((id, op));
    }

    fn last_store_issued(&self) -> Option<StoreId> {
        self.next_store.checked_sub(1).map(StoreId)
    }

    fn rearm(&mut self) {
        let running = self.running();
        for (timer, at) in [
            (Timer::Session, self.session.poll_timeout()),
            (Timer::Resync, self.resync.poll_timeout()),
        ] {
            match at.filter(|_| running) {
                Some(at) => self.timers.set(timer as usize, at),
                None => self.timers.stop(timer as usize),
            }
        }
    }

    /// Whether `gate` (the last store operation an event waits for) is acknowledged.
    fn released(&self, gate: Option<StoreId>) -> bool {
        match (gate, self.unacked.first()) {
            (Some(gate), Some(first)) => *first > gate,
            _ => true,
        }
    }
}

impl Endpoint for RelayEndpoint {
    type Command = RelayCommand;
    type Event = RelayEvent;
    type Job = NoJob;
    type StoreOp = RelayStoreOp;

    fn handle_datagram(&mut self, now: Instant, port: Port, from: SocketAddr, bytes: &[u8]) {
        self.latest_now = self.latest_now.max(now);
        if !self.running() {
            return;
        }
        match port {
            Port::Listen | Port::Feedback => self.session.handle_upstream(now, from, bytes),
            Port::Serve => self.session.handle_downstream(now, from, bytes),
        }
        self.after_input(now);
    }

    fn handle_resync_request(&mut self, now: Instant, peer: std::net::IpAddr) {
        self.latest_now = self.latest_now.max(now);
        self.session.resync_request(now, peer);
    }

    fn handle_command(&mut self, _now: Instant, command: RelayCommand) {
        match command {
            RelayCommand::Shutdown if self.running() => {
                self.run = Run::ShuttingDown;
                let seq = self.session.keys().last_seq();
                // A failed save is tried once more; one in flight for these keys is enough.
                let in_flight = self.pending.values().any(|p| *p == Pending::Keys(seq));
                if self.persistent && seq > self.saved_seq && !in_flight {
                    self.requested_seq = seq;
                    let keys = self.session.keys().clone();
                    self.issue(RelayStoreOp::Keys(Box::new(keys)), Pending::Keys(seq));
                }
                if self.unacked.is_empty() {
                    self.run = Run::Stopped;
                }
            }
            RelayCommand::Shutdown => {}
            RelayCommand::Abort => {
                self.run = Run::Stopped;
                self.stores.clear();
                self.unacked.clear();
                self.pending.clear();
                self.events.clear();
            }
        }
        self.rearm();
    }

    fn handle_job_result(&mut self, _now: Instant, result: NoJob) {
        match result {}
    }

    fn handle_job_panicked(&mut self, _now: Instant) {
        // The relay hands out no job, so none can panic.
    }

    fn handle_stored(&mut self, _now: Instant, id: StoreId, result: Result<(), StoreError>) {
        if !self.unacked.remove(&id) {
            return;
        }
        match (self.pending.remove(&id), result) {
            (Some(Pending::Keys(seq)), Ok(())) => self.saved_seq = self.saved_seq.max(seq),
            (Some(Pending::Keys(_)), Err(_)) => self.key_save_failures += 1,
            (Some(Pending::Message), Err(_)) => self.store_failures += 1,
            _ => {}
        }
        if self.run == Run::ShuttingDown && self.unacked.is_empty() {
            self.run = Run::Stopped;
        }
        self.rearm();
    }

    fn handle_fetched(&mut self, now: Instant, id: FetchId, item: Fetched) {
        if !self.running() {
            return;
        }
        self.resync.handle_fetched(now, id, item, &mut self.session);
        self.after_input(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.latest_now = self.latest_now.max(now);
        if !self.running() {
            return;
        }
        while let Some(timer) = self.timers.expire_before(now) {
            if timer == Timer::Session as usize {
                self.session.handle_timeout(now);
            } else if timer == Timer::Resync as usize {
                self.resync.handle_timeout(now, &mut self.session);
            }
        }
        self.after_input(now);
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if !self.running() {
            return None;
        }
        let transmit = self.session.poll_transmit(now, buf)?;
        // Sending moves the session's pacing and heartbeat deadlines.
        self.rearm();
        // An upstream datagram to the group (the multicast feedback mode) goes to the
        // listened group, out of the feedback socket.
        let port = match transmit.tier {
            Tier::Upstream => Port::Feedback,
            Tier::Downstream => Port::Serve,
        };
        let destination = match transmit.destination {
            crate::session::Destination::Group => Destination::Group,
            crate::session::Destination::Unicast(addr) => Destination::Unicast(addr),
        };
        Some(Transmit {
            port,
            destination,
            len: transmit.len,
        })
    }

    fn poll_job(&mut self) -> Option<NoJob> {
        None
    }

    fn poll_store(&mut self) -> Option<(StoreId, RelayStoreOp)> {
        self.stores.pop_front()
    }

    fn poll_fetch(&mut self) -> Option<FetchRequest> {
        if !self.running() {
            return None;
        }
        self.resync.poll_fetch()
    }

    fn poll_cancel_fetch(&mut self) -> Option<FetchId> {
        self.resync.poll_cancel()
    }

    fn poll_event(&mut self) -> Option<RelayEvent> {
        let (_, gate) = self.events.front()?;
        if !self.released(*gate) {
            return None;
        }
        self.events.pop_front().map(|(event, _)| event)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_timeout()
    }

    fn resync_source(&self) -> Option<&dyn ResyncSource> {
        Some(&self.session)
    }

    fn is_stopped(&self) -> bool {
        self.run == Run::Stopped
    }
}

#[cfg(test)]
mod tests;
