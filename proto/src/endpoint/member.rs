//! The member endpoint: one group member's rekey receiver as a sans-IO [`Endpoint`].
//!
//! [`MemberEndpoint`] owns a [`ReceiverSession`] and everything a member decides around it:
//!
//! - it feeds the session every datagram, sends its NACKs and probe replies, and calls it at
//!   its deadlines;
//! - it acts on the session's out-of-sync and state-check events through the one
//!   [`ResyncPolicy`] (which endpoint, in which order, spread, backoff, streamed verification),
//!   handing the driver [`FetchRequest`]s and applying what they stream back item by item;
//! - with key persistence on, it hands the driver a [`MemberStoreOp::SaveKeys`] after every
//!   applied message and holds that message's events until the save is acknowledged, so the
//!   keys are durable before the product hears of them;
//! - it answers its owner's commands: resync items and state answers the product fetched
//!   itself, a beyond-history verdict, a group-size estimate, its figures, stop.
//!
//! It owns no socket, clock, thread, file or entropy source: the time is an argument and its
//! random delays come from the seeded generator it is given.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zeroize::Zeroizing;

pub mod traffic;

use super::directive::{DirectiveError, RelayDirective};
use super::failover::{Attachment, Failover, FailoverConfig, FailoverCounters, MoveReason};
use super::resync_policy::{ResyncConfig, ResyncCounters, ResyncEvent, ResyncPolicy};
use super::{
    Destination, Endpoint, FetchId, FetchRequest, Fetched, NoJob, Port, StoreError, StoreId,
    Transmit,
};
use crate::auth::datagram::DatagramCounters;
use crate::auth::message::MessageCounters;
use crate::lkh::{MemberKeys, RegistrationBundle, RelayDirectory};
use traffic::{KeyLifeConfig, SpiSeen, TrafficKeys};

/// The shortest time between two state checks that traffic naming a later Data SA starts
/// ([`MemberEndpoint::handle_traffic_spi`]): such traffic is unauthenticated (any insider can
/// send it), so it buys at most this many checks and never changes a key.
pub const TRAFFIC_STATE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
use crate::session::receiver::{ResyncError, StateVerdict};
use crate::session::{
    ConfigError, ReceiverConfig, ReceiverCounters, ReceiverEvent, ReceiverSession, ReregisterReason,
};

/// Configuration of a [`MemberEndpoint`].
#[derive(Debug, Clone, PartialEq)]
pub struct MemberEndpointConfig {
    /// The multicast group's address: where NACKs go in the multicast feedback mode.
    pub group: SocketAddr,
    /// The receiver session's configuration; its `feedback_addr` is the GCKS's (or relay's).
    pub receiver: ReceiverConfig,
    /// The resync policy's configuration: its endpoints (none: the product resyncs the
    /// member itself, after [`ReceiverEvent::OutOfSync`] and
    /// [`ReceiverEvent::StateCheckNeeded`]), deadlines, caps, spreading and backoff.
    pub resync: ResyncConfig,
    /// Whether the member's keys are saved ([`MemberStoreOp::SaveKeys`]) after every applied
    /// message, before its events are released.
    pub persist_keys: bool,
    /// The relays (in order) and the GCKS's contact the member fails over between. Empty: the
    /// registration bundle's directory is used ([`MemberEndpoint::new`]); empty there too, the
    /// member stays on `group`, `receiver.feedback_addr` and `resync` and never fails over.
    /// Not empty, its first contact replaces those three.
    pub directory: RelayDirectory,
    /// When the member gives up on a contact and how moves are spaced.
    pub failover: FailoverConfig,
    /// The Data SAs' soft lifetime and the re-registration window ([`traffic`]).
    pub key_life: KeyLifeConfig,
}

impl MemberEndpointConfig {
    /// A member of the group at `group` sending its feedback to `feedback`, with the default
    /// receiver and resync settings, no resync endpoint and no persistence.
    pub fn new(group: SocketAddr, feedback: SocketAddr) -> Self {
        Self {
            group,
            receiver: ReceiverConfig::new(feedback),
            resync: ResyncConfig::default(),
            persist_keys: false,
            directory: RelayDirectory::default(),
            failover: FailoverConfig::default(),
            key_life: KeyLifeConfig::default(),
        }
    }
}

/// Where a command's answer goes: called once with it, on the driver's thread.
pub type Reply<T> = Box<dyn FnOnce(T) + Send>;

/// What a member's owner asks of it.
#[non_exhaustive]
pub enum MemberCommand {
    /// Resync items the owner fetched itself, in sequence order from the member's next
    /// message: each a signed manifest and the member's chunk. Verified like multicast
    /// traffic; the reply is the last sequence number applied, or the first refusal.
    Resync {
        /// The (manifest, chunk) pairs.
        items: Vec<(Vec<u8>, Vec<u8>)>,
        /// Gets the outcome.
        reply: Reply<Result<u64, ResyncError>>,
    },
    /// A resync endpoint's state answer the owner fetched itself (its latest signed
    /// manifest).
    StateAnswer {
        /// The signed manifest.
        manifest: Vec<u8>,
        /// Gets the verdict.
        reply: Reply<Result<StateVerdict, ResyncError>>,
    },
    /// A resync endpoint said the member's messages left its history: it must re-register.
    BeyondHistory,
    /// An estimate of the group's size, for the resync policy's spreading and backoff.
    GroupSize(u32),
    /// A GCKS's signed relay directive (its encoding): verified with the GCKS's key, then the
    /// member moves to the relay it names for the member, if any. The reply says what it did.
    Directive {
        /// The encoded directive.
        bytes: Vec<u8>,
        /// Gets the outcome: whether the member moved.
        reply: Reply<Result<bool, DirectiveError>>,
    },
    /// The member's figures.
    Figures(Reply<MemberFigures>),
    /// Stop: the keys applied since the last save are saved first.
    Stop,
}

impl std::fmt::Debug for MemberCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Resync { items, .. } => write!(f, "Resync({} items)", items.len()),
            Self::StateAnswer { .. } => f.write_str("StateAnswer"),
            Self::BeyondHistory => f.write_str("BeyondHistory"),
            Self::GroupSize(size) => write!(f, "GroupSize({size})"),
            Self::Directive { bytes, .. } => write!(f, "Directive({} bytes)", bytes.len()),
            Self::Figures(_) => f.write_str("Figures"),
            Self::Stop => f.write_str("Stop"),
        }
    }
}

/// What a member needs made durable.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum MemberStoreOp {
    /// Replace the saved keys with these: the body of a member state file
    /// ([`MemberKeys::state_body`]; the driver adds the magic number and checksum, and
    /// [`MemberKeys::from_state_bytes`] reads the whole back).
    SaveKeys {
        /// The last message the keys applied.
        last_seq: u64,
        /// The encoded keys (zeroized on drop).
        body: Zeroizing<Vec<u8>>,
    },
}

/// A snapshot of what a member endpoint counts and knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberFigures {
    /// The session's counters.
    pub receiver: ReceiverCounters,
    /// Header, MAC and window rejections.
    pub datagrams: DatagramCounters,
    /// Signature checks made and failed.
    pub messages: MessageCounters,
    /// Datagrams handed to the endpoint.
    pub datagrams_handled: u64,
    /// Of those, datagrams dropped before their header and MAC were checked (so counted in
    /// none of [`MemberFigures::datagrams`]): of a message already applied, of another
    /// block than the member's, or taken while the member stops or must register again.
    /// `datagrams_handled` = this + `datagrams.accepted` + `datagrams.rejected()`.
    pub dropped_before_mac: u64,
    /// The next message the member needs.
    pub next_seq: u64,
    /// The order key of the member's leaf.
    pub order_key: u32,
    /// The version of the member's group key, once it has one.
    pub group_key_version: Option<u32>,
    /// The resync policy's figures (resyncs and state checks started and failed, fetches,
    /// items applied and rejected).
    pub resync: ResyncCounters,
    /// Saves of the keys that failed (the member goes on; the next applied message tries
    /// again).
    pub state_save_failures: u64,
    /// Why the member must register again, once it must.
    pub must_reregister: Option<ReregisterReason>,
    /// The relay the member receives from, by its number ([`crate::lkh::RelayContact::id`]);
    /// `None` on the GCKS's contact or without a directory.
    pub relay: Option<u16>,
    /// Failover's figures (moves, and why).
    pub failover: FailoverCounters,
    /// Traffic SPIs reported that named a later Data SA than the member's
    /// ([`MemberEndpoint::handle_traffic_spi`]).
    pub later_spis_seen: u64,
    /// Of those, the ones that started a state check (the others fell within
    /// [`TRAFFIC_STATE_CHECK_INTERVAL`] of the previous one).
    pub later_spi_state_checks: u64,
}

/// One member's rekey receiver and resync policy. See the [module docs](self).
#[derive(Debug)]
pub struct MemberEndpoint {
    group: SocketAddr,
    session: ReceiverSession,
    policy: ResyncPolicy,
    persist_keys: bool,
    /// The last message whose keys a save was asked for (or the starting state).
    save_asked_seq: u64,
    /// The save in flight and the message it covers.
    saving: Option<(StoreId, u64)>,
    next_store_id: u64,
    stores: VecDeque<(StoreId, MemberStoreOp)>,
    /// Events waiting for the save in flight.
    held: VecDeque<ReceiverEvent>,
    /// Events for the owner.
    ready: VecDeque<ReceiverEvent>,
    datagrams_handled: u64,
    dropped_before_mac: u64,
    state_save_failures: u64,
    stopping: bool,
    /// Failover between the directory's contacts; `None` without a directory.
    failover: Option<Failover>,
    /// The feedback address the session was configured with: its unicast transmits there go
    /// to the current contact's.
    session_feedback: SocketAddr,
    /// The latest directive applied (its issue number).
    directive_issued: Option<u64>,
    /// The endpoint of each fetch running (with a directory): a connection failure to the
    /// current relay's moves the member.
    fetching: Vec<(FetchId, super::ResyncEndpoint)>,
    /// A unicast member's side of multi-unicast (its bundle's `unicast` flag): deliveries in,
    /// acknowledgements out. `None` for a multicast member.
    unicast: Option<crate::session::unicast::UnicastReceiver>,
    /// The traffic keys: which SA to send under, which to accept, their lifetimes.
    traffic: TrafficKeys,
    /// The re-registration window, and the generator of its jitter.
    reregister_window: std::time::Duration,
    reregister_rng: ChaCha8Rng,
    /// When [`ReceiverEvent::ReregisterNow`] is due, once the member must re-register.
    reregister_at: Option<Instant>,
    reregister_raised: bool,
    /// When traffic naming a later SA last started a state check, and the counts of
    /// [`MemberFigures::later_spis_seen`] and [`MemberFigures::later_spi_state_checks`].
    later_spi_checked_at: Option<Instant>,
    later_spis_seen: u64,
    later_spi_state_checks: u64,
}

/// How often a unicast member tells its sender where it is until its first delivery arrives.
pub const UNICAST_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);

impl MemberEndpoint {
    /// The endpoint of a member that registered with `bundle`, started at `now`; its random
    /// delays come from `rng`. Fails on an invalid configuration or bundle.
    pub fn new(
        bundle: &RegistrationBundle,
        config: MemberEndpointConfig,
        rng: ChaCha8Rng,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        let mut config = config;
        if config.directory.is_empty() {
            config.directory = bundle.directory.clone();
        }
        config.key_life.validate()?;
        let session = ReceiverSession::new(bundle, config.receiver.clone())?;
        let mut endpoint = Self::with_session(session, config, rng, now);
        if bundle.unicast {
            endpoint.set_unicast(now);
        }
        Ok(endpoint)
    }

    /// Makes the member a unicast member (RFC 4046 5.1, multi-unicast): it takes each
    /// message's delivery from its contact by unicast and acknowledges it
    /// ([`crate::session::unicast`]). Set from the bundle by [`Self::new`]; for a resumed
    /// member, call it after [`Self::resume`].
    pub fn set_unicast(&mut self, now: Instant) {
        let server = self.unicast_server();
        self.unicast = Some(crate::session::unicast::UnicastReceiver::new(
            now,
            server,
            UNICAST_ANNOUNCE_INTERVAL,
        ));
    }

    /// The unicast side's counters, for a unicast member.
    pub fn unicast_counters(&self) -> Option<&crate::session::unicast::UnicastReceiverCounters> {
        self.unicast.as_ref().map(|u| u.counters())
    }

    /// Where a unicast member's acknowledgements go: its current contact's feedback address.
    fn unicast_server(&self) -> SocketAddr {
        self.failover
            .as_ref()
            .map_or(self.session_feedback, |f| f.contact().feedback)
    }

    /// The endpoint of a member coming back after its own restart from the keys it saved
    /// ([`MemberStoreOp::SaveKeys`]), started at `now`. See [`ReceiverSession::resume`].
    pub fn resume(
        keys: MemberKeys,
        config: MemberEndpointConfig,
        rng: ChaCha8Rng,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        config.key_life.validate()?;
        let session = ReceiverSession::resume(keys, config.receiver.clone())?;
        Ok(Self::with_session(session, config, rng, now))
    }

    /// The endpoint over a session built by the caller, started at `now`.
    pub fn with_session(
        mut session: ReceiverSession,
        config: MemberEndpointConfig,
        rng: ChaCha8Rng,
        now: Instant,
    ) -> Self {
        // The silence timer runs from the start: a member that never hears anything (its
        // relay died before it registered) asks for the group's state too.
        session.start(now);
        let group_size = config
            .resync
            .group_size
            .max(config.receiver.scheduler.group_size);
        let mut rng = rng;
        let failover_seed: u64 = rng.gen();
        let failover_rng = ChaCha8Rng::seed_from_u64(failover_seed);
        // Derived from the same draw, so the policy's and failover's draws stay as they were.
        let reregister_rng = ChaCha8Rng::seed_from_u64(failover_seed ^ 0x7265_7265_6769_7374);
        let failover = Failover::new(config.directory, config.failover, failover_rng, now);
        let mut resync = config.resync;
        let mut group = config.group;
        if let Some(failover) = &failover {
            (resync.relays, resync.gcks) = failover.resync_order();
            group = failover.contact().group;
        }
        let mut policy = ResyncPolicy::new(resync, rng);
        policy.set_group_size(group_size);
        let mut endpoint = Self {
            traffic: TrafficKeys::new(config.key_life),
            reregister_window: config.key_life.reregister_window,
            reregister_rng,
            reregister_at: None,
            reregister_raised: false,
            later_spi_checked_at: None,
            later_spis_seen: 0,
            later_spi_state_checks: 0,
            failover,
            session_feedback: config.receiver.feedback_addr,
            directive_issued: None,
            fetching: Vec::new(),
            unicast: None,
            group,
            save_asked_seq: session.keys().last_seq(),
            session,
            policy,
            persist_keys: config.persist_keys,
            saving: None,
            next_store_id: 0,
            stores: VecDeque::new(),
            held: VecDeque::new(),
            ready: VecDeque::new(),
            datagrams_handled: 0,
            dropped_before_mac: 0,
            state_save_failures: 0,
            stopping: false,
        };
        // A resumed session announces the Data SA in force.
        endpoint.pump(now);
        endpoint
    }

    /// The receiver session.
    pub fn session(&self) -> &ReceiverSession {
        &self.session
    }

    /// The traffic keys: the Data SA to send under ([`TrafficKeys::sending`]), those to
    /// accept ([`TrafficKeys::receiving`]), the next one's activation.
    pub fn traffic_keys(&self) -> &TrafficKeys {
        &self.traffic
    }

    /// The product saw traffic (or a datagram) under the Data SA `spi` at `now`: a later SA
    /// than the member's newest means it missed a rekey. That costs no signature: the claim is
    /// unauthenticated (an insider can send anything under any SPI), so it starts at most one
    /// state check per [`TRAFFIC_STATE_CHECK_INTERVAL`] (a [`ReceiverEvent::StateCheckNeeded`]
    /// and the resync policy's check, whose answer is a signed manifest) and never changes a
    /// key. Returns what the SPI says.
    pub fn handle_traffic_spi(&mut self, now: Instant, spi: u32) -> SpiSeen {
        let seen = self.traffic.classify(spi);
        if seen != SpiSeen::Later || self.stopping || self.session.reregister_reason().is_some() {
            return seen;
        }
        self.later_spis_seen += 1;
        let due = match self.later_spi_checked_at {
            Some(at) => now.saturating_duration_since(at) >= TRAFFIC_STATE_CHECK_INTERVAL,
            None => true,
        };
        if due {
            self.later_spi_checked_at = Some(now);
            self.later_spi_state_checks += 1;
            let check = ReceiverEvent::StateCheckNeeded {
                claimed_seq: self.session.next_seq(),
            };
            self.policy.handle_event(now, &check, &self.session);
            self.held.push_back(check);
            self.pump(now);
        }
        seen
    }

    /// When [`ReceiverEvent::ReregisterNow`] is (or was) due, once the member must
    /// re-register.
    pub fn reregister_at(&self) -> Option<Instant> {
        self.reregister_at
    }

    /// The resync policy.
    pub fn policy(&self) -> &ResyncPolicy {
        &self.policy
    }

    /// The member's figures.
    pub fn figures(&self) -> MemberFigures {
        let session = &self.session;
        MemberFigures {
            receiver: *session.counters(),
            datagrams: *session.datagram_counters(),
            messages: *session.message_counters(),
            datagrams_handled: self.datagrams_handled,
            dropped_before_mac: self.dropped_before_mac,
            next_seq: session.next_seq(),
            order_key: session.order_key(),
            group_key_version: session.group_key().map(|k| k.version),
            resync: *self.policy.counters(),
            state_save_failures: self.state_save_failures,
            must_reregister: session.reregister_reason(),
            relay: self.failover.as_ref().and_then(|f| match f.current_ref() {
                super::directive::RelayRef::Relay(id) => Some(id),
                super::directive::RelayRef::Gcks => None,
            }),
            failover: self
                .failover
                .as_ref()
                .map(|f| *f.counters())
                .unwrap_or_default(),
            later_spis_seen: self.later_spis_seen,
            later_spi_state_checks: self.later_spi_state_checks,
        }
    }

    /// Failover's state, with a directory.
    pub fn failover(&self) -> Option<&Failover> {
        self.failover.as_ref()
    }

    /// Where the member must now listen, once after each move (and once at the start, with a
    /// directory): the driver joins `contact.group` and leaves the group it listened to.
    pub fn poll_attachment(&mut self) -> Option<Attachment> {
        self.failover.as_mut()?.poll_attachment()
    }

    /// Applies a GCKS's signed relay directive (see [`MemberCommand::Directive`]): returns
    /// whether the member moved.
    pub fn apply_directive(&mut self, now: Instant, bytes: &[u8]) -> Result<bool, DirectiveError> {
        let keys = self.session.keys();
        let sa = keys.rekey_sa();
        let directive = RelayDirective::verify(bytes, sa.group_id, &sa.gcks_public_key)?;
        if self
            .directive_issued
            .is_some_and(|issued| directive.issued <= issued)
        {
            return Err(DirectiveError::Stale {
                issued: directive.issued,
            });
        }
        self.directive_issued = Some(directive.issued);
        let Some(failover) = self.failover.as_mut() else {
            return Ok(false);
        };
        let member = self.session.keys().member().0;
        let Some(target) = directive.target_of(failover.current_ref(), member) else {
            return Ok(false);
        };
        let before = failover.relay();
        let known = failover.move_to(now, target);
        let moved = known && failover.relay() != before;
        if moved {
            self.moved(now, MoveReason::Ordered);
        }
        Ok(moved)
    }

    /// The member moved to its failover's current contact: its multicast-feedback group and
    /// resync order follow, and it asks the new contact for the group's state at once (what
    /// it lacks comes from there, not from the GCKS; a state check the receiver's silence
    /// raised at the same time is absorbed by this one).
    fn moved(&mut self, now: Instant, reason: MoveReason) {
        let _ = reason;
        let Some(failover) = &self.failover else {
            return;
        };
        self.group = failover.contact().group;
        let (relays, gcks) = failover.resync_order();
        self.policy.set_endpoints(relays, gcks);
        let event = ReceiverEvent::StateCheckNeeded {
            claimed_seq: self.session.next_seq(),
        };
        self.policy.handle_event(now, &event, &self.session);
    }

    /// Datagrams the session's datagram verifier has counted, accepted or rejected.
    fn datagrams_checked(&self) -> u64 {
        let counters = self.session.datagram_counters();
        counters.accepted + counters.rejected()
    }

    /// The next event of the resync policy (endpoint failures, rejected items, resyncs that
    /// gave up), for logs; the policy keeps the latest few.
    pub fn poll_resync_event(&mut self) -> Option<ResyncEvent> {
        self.policy.poll_event()
    }

    /// Applies resync items the owner fetched itself (see [`MemberCommand::Resync`]).
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
            if let Some(unicast) = &mut self.unicast {
                unicast.handle_resynced();
            }
        }
        self.pump(now);
        outcome
    }

    /// Applies a state answer the owner fetched itself (see [`MemberCommand::StateAnswer`]).
    pub fn apply_state_answer(
        &mut self,
        now: Instant,
        manifest: &[u8],
    ) -> Result<StateVerdict, ResyncError> {
        let verdict = self.session.handle_state_answer(now, manifest);
        self.pump(now);
        verdict
    }

    /// Moves the session's events through the resync policy and the key save to the owner.
    fn pump(&mut self, now: Instant) {
        while let Some(event) = self.session.poll_event() {
            if !self.stopping {
                self.policy.handle_event(now, &event, &self.session);
            }
            match &event {
                ReceiverEvent::NewDataSa { data_sa, .. } => {
                    self.traffic.install(now, data_sa.clone());
                }
                ReceiverEvent::MustReregister if self.reregister_at.is_none() => {
                    let window = self.reregister_window;
                    let delay = if window.is_zero() {
                        std::time::Duration::ZERO
                    } else {
                        window.mul_f64(self.reregister_rng.gen::<f64>())
                    };
                    self.reregister_at = Some(now + delay);
                }
                _ => {}
            }
            self.held.push_back(event);
            self.timed_events(now);
        }
        self.timed_events(now);
        self.save_keys();
        if self.saving.is_none() {
            self.ready.append(&mut self.held);
        }
    }

    /// Moves the traffic keys' events that are due at `now` (and a due re-registration) to the
    /// held events; a soft lifetime with no replacement makes the member check state.
    fn timed_events(&mut self, now: Instant) {
        self.traffic.handle_timeout(now);
        while let Some(event) = self.traffic.poll_event() {
            let soft = matches!(event, ReceiverEvent::DataSaSoftLifetime { .. });
            self.held.push_back(event);
            if soft && !self.stopping && self.session.reregister_reason().is_none() {
                // As after a silence: the policy asks a resync endpoint, and a product that
                // resyncs the member itself hears it.
                let check = ReceiverEvent::StateCheckNeeded {
                    claimed_seq: self.session.next_seq(),
                };
                self.policy.handle_event(now, &check, &self.session);
                self.held.push_back(check);
            }
        }
        if !self.reregister_raised && self.reregister_at.is_some_and(|at| at <= now) {
            self.reregister_raised = true;
            self.held.push_back(ReceiverEvent::ReregisterNow);
        }
    }

    /// Asks for a save of the keys when a message was applied since the last one asked and
    /// none is in flight.
    fn save_keys(&mut self) {
        if !self.persist_keys || self.saving.is_some() {
            return;
        }
        let keys = self.session.keys();
        let last_seq = keys.last_seq();
        if last_seq <= self.save_asked_seq {
            return;
        }
        self.save_asked_seq = last_seq;
        match keys.state_body() {
            Ok(body) => {
                let id = StoreId(self.next_store_id);
                self.next_store_id += 1;
                self.stores
                    .push_back((id, MemberStoreOp::SaveKeys { last_seq, body }));
                self.saving = Some((id, last_seq));
            }
            // Not expected (the encoding of keys in memory); counted like a failed write.
            Err(_) => self.state_save_failures += 1,
        }
    }
}

impl Endpoint for MemberEndpoint {
    type Command = MemberCommand;
    type Event = ReceiverEvent;
    type Job = NoJob;
    type StoreOp = MemberStoreOp;

    fn handle_datagram(&mut self, now: Instant, port: Port, from: SocketAddr, bytes: &[u8]) {
        let _ = port;
        self.datagrams_handled += 1;
        let checked = self.datagrams_checked();
        let mut unicast_counted = false;
        if !self.stopping {
            let accepted = self.session.datagram_counters().accepted;
            let delivery = match &mut self.unicast {
                Some(unicast) => unicast.handle_datagram(now, &mut self.session, from, bytes),
                None => crate::session::unicast::DeliveryOutcome::NotDelivery,
            };
            match delivery {
                crate::session::unicast::DeliveryOutcome::NotDelivery => {
                    self.session.handle_datagram(now, from, bytes);
                }
                crate::session::unicast::DeliveryOutcome::Applied { .. }
                | crate::session::unicast::DeliveryOutcome::Half
                | crate::session::unicast::DeliveryOutcome::Duplicate => {
                    // A delivery checked under the message's MAC key: the contact is alive.
                    unicast_counted = true;
                    if let Some(failover) = &mut self.failover {
                        failover.heard(now);
                    }
                }
                // Counted by the unicast side (a delivery ahead went to the session).
                crate::session::unicast::DeliveryOutcome::Dropped => unicast_counted = true,
                crate::session::unicast::DeliveryOutcome::Ahead => {}
            }
            if self.session.datagram_counters().accepted > accepted {
                if let Some(failover) = &mut self.failover {
                    failover.heard(now);
                }
            }
            self.pump(now);
        }
        // Every datagram is counted once: by the datagram verifier (accepted or one of its
        // rejections), or here, dropped before the verifier saw it.
        if self.datagrams_checked() == checked && !unicast_counted {
            self.dropped_before_mac += 1;
        }
    }

    fn handle_command(&mut self, now: Instant, command: MemberCommand) {
        match command {
            MemberCommand::Resync { items, reply } => reply(self.apply_resync(now, &items)),
            MemberCommand::StateAnswer { manifest, reply } => {
                reply(self.apply_state_answer(now, &manifest));
            }
            MemberCommand::BeyondHistory => {
                self.session.handle_beyond_history(now);
                self.pump(now);
            }
            MemberCommand::GroupSize(size) => self.policy.set_group_size(size),
            MemberCommand::Directive { bytes, reply } => {
                let outcome = self.apply_directive(now, &bytes);
                self.pump(now);
                reply(outcome);
            }
            MemberCommand::Figures(reply) => reply(self.figures()),
            MemberCommand::Stop => {
                self.stopping = true;
                self.pump(now);
            }
        }
    }

    fn handle_job_result(&mut self, now: Instant, result: NoJob) {
        let _ = now;
        match result {}
    }

    fn handle_job_panicked(&mut self, now: Instant) {
        // A member hands out no job.
        let _ = now;
    }

    fn handle_stored(&mut self, now: Instant, id: StoreId, result: Result<(), StoreError>) {
        if self.saving.is_some_and(|(saving, _)| saving == id) {
            self.saving = None;
            if result.is_err() {
                self.state_save_failures += 1;
            }
        }
        self.pump(now);
    }

    fn handle_fetched(&mut self, now: Instant, id: FetchId, item: Fetched) {
        if let Some(at) = self.fetching.iter().position(|(fetch, _)| *fetch == id) {
            if matches!(item, Fetched::Failed { .. } | Fetched::End) {
                let (_, endpoint) = self.fetching.swap_remove(at);
                // Moved before the policy picks its next endpoint: the new relay, not the GCKS.
                if let Fetched::Failed {
                    reason: super::FetchFailure::Connection,
                } = item
                {
                    if let Some(reason) = self
                        .failover
                        .as_mut()
                        .and_then(|f| f.unreachable(now, &endpoint))
                    {
                        self.moved(now, reason);
                    }
                }
            }
        }
        let next = self.session.next_seq();
        self.policy.handle_fetched(now, id, item, &mut self.session);
        if self.session.next_seq() > next {
            if let Some(unicast) = &mut self.unicast {
                unicast.handle_resynced();
            }
        }
        self.pump(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.session.poll_timeout().is_some_and(|at| at <= now) {
            let silences = self.session.counters().silences;
            self.session.handle_timeout(now);
            // Moved before the silence's state check reaches the policy: it asks the new
            // contact.
            if self.session.counters().silences > silences && !self.stopping {
                if let Some(reason) = self.failover.as_mut().and_then(|f| f.silence(now)) {
                    self.moved(now, reason);
                }
            }
        }
        if !self.stopping {
            if let Some(reason) = self.failover.as_mut().and_then(|f| f.handle_timeout(now)) {
                self.moved(now, reason);
            }
        }
        self.policy.handle_timeout(now, &mut self.session);
        if let Some(unicast) = &mut self.unicast {
            unicast.handle_timeout(now);
        }
        self.pump(now);
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if self.stopping {
            return None;
        }
        if self.unicast.is_some() {
            let server = self.unicast_server();
            if let Some(unicast) = &mut self.unicast {
                if unicast.server() != server {
                    unicast.set_server(server);
                }
                if let Some(ack) = unicast.poll_transmit(now, &self.session, buf) {
                    return Some(Transmit {
                        port: Port::Feedback,
                        destination: Destination::Unicast(server),
                        len: ack.len,
                    });
                }
            }
        }
        let nacks = self.session.counters().nacks_sent;
        let transmit = self.session.poll_transmit(now, buf)?;
        let failover = self.failover.as_mut();
        let destination = match (transmit.destination, failover) {
            (crate::session::Destination::Group, _) => self.group,
            (crate::session::Destination::Unicast(addr), Some(failover))
                if addr == self.session_feedback =>
            {
                if self.session.counters().nacks_sent > nacks {
                    failover.nack_sent(now);
                }
                failover.contact().feedback
            }
            (crate::session::Destination::Unicast(addr), _) => addr,
        };
        Some(Transmit {
            port: Port::Feedback,
            destination: Destination::Unicast(destination),
            len: transmit.len,
        })
    }

    fn poll_job(&mut self) -> Option<NoJob> {
        None
    }

    fn poll_store(&mut self) -> Option<(StoreId, MemberStoreOp)> {
        self.stores.pop_front()
    }

    fn poll_fetch(&mut self) -> Option<FetchRequest> {
        if self.stopping {
            return None;
        }
        let fetch = self.policy.poll_fetch()?;
        if self.failover.is_some() {
            // Bounded by the policy's one fetch at a time (and cancelled ones ending).
            if self.fetching.len() >= 16 {
                self.fetching.remove(0);
            }
            self.fetching.push((fetch.id, fetch.endpoint));
        }
        Some(fetch)
    }

    fn poll_cancel_fetch(&mut self) -> Option<FetchId> {
        self.policy.poll_cancel()
    }

    fn poll_listen(&mut self) -> Option<SocketAddr> {
        self.poll_attachment()
            .map(|attachment| attachment.contact.group)
    }

    fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.ready.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        if self.stopping {
            return None;
        }
        [
            self.session.poll_timeout(),
            self.policy.poll_timeout(),
            self.failover.as_ref().and_then(Failover::poll_timeout),
            self.unicast.as_ref().and_then(|u| u.poll_timeout()),
            self.traffic.poll_timeout(),
            self.reregister_at.filter(|_| !self.reregister_raised),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn is_stopped(&self) -> bool {
        self.stopping && self.saving.is_none() && self.stores.is_empty()
    }
}

#[cfg(test)]
mod tests;
