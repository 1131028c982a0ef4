//! Rekey scenarios over the simulated network: one GCKS ([`SenderSession`] fed by an LKH
//! [`KeyTree`]) and thousands of members ([`ReceiverSession`]), with batched joins and leaves,
//! per-link loss, and resync served from the sender's history as a resync endpoint would
//! serve it (the engine puts TCP and HTTP under it; here it is a delayed, reliable exchange).
//!
//! Used by the scenario tests, by `rekeycast-bench sim` and by the `sim` subcommand. Everything
//! is seeded: the key tree's randomness, the GCKS's signing key, the churn and every link, so a
//! run reproduces from its [`ScenarioConfig`]. Outcomes are read from the sessions' own
//! counters and events ([`ScenarioReport`]).

use std::cell::RefCell;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{LinkConfig, Network, NetworkStats, Node, NodeId, SimError, Transmit};
use crate::gsa::{RekeySa, WrapAlgorithm};
use crate::lkh::{Degree, KeyRng, KeyTree, MemberId};
use crate::relay::{RelayConfig, RelayEvent, RelaySession};
use crate::resync::{Lookup, ResyncSource};
use crate::session::layout::{build_message, MessageParams};
use crate::session::sender::{PreparedMessage, SenderCounters};
use crate::session::{
    self, ReceiverConfig, ReceiverCounters, ReceiverEvent, ReceiverSession, SenderConfig,
    SenderSession,
};

/// The group id of simulated groups.
pub const GROUP_ID: u32 = 0x5E55_1011;
/// The SPI of simulated groups' Rekey SA.
pub const SPI: u32 = 7;

/// A whole scenario.
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    /// The seed of everything random.
    pub seed: u64,
    /// Members at the start (they join in the first message).
    pub members: usize,
    /// Rekey messages after the first one.
    pub rekeys: usize,
    /// Fraction of the members that leave in each rekey; as many new members join.
    pub churn: f64,
    /// Time between rekeys.
    pub rekey_interval: Duration,
    /// The longest time after the last rekey for repair and resync to finish; the run stops
    /// earlier once every member has the latest message.
    pub settle: Duration,
    /// Every member's downlink (from the switch), unless overridden.
    pub member_downlink: LinkConfig,
    /// Every member's uplink (to the switch).
    pub member_uplink: LinkConfig,
    /// Downlinks of some initial members, by index: `(indices, link)`, later entries win.
    pub downlink_overrides: Vec<(Range<usize>, LinkConfig)>,
    /// The GCKS's uplink and downlink.
    pub sender_link: LinkConfig,
    /// The GCKS's session configuration.
    pub sender: SenderConfig,
    /// The members' session configuration (the feedback address is set by the scenario).
    pub receiver: ReceiverConfig,
    /// How messages are built (SPI, epoch and timestamp are set by the scenario).
    pub message: MessageParams,
    /// The key tree's degree.
    pub degree: u8,
    /// Round-trip time of a resync exchange (a TCP connection and a request per message).
    pub resync_rtt: Duration,
    /// Members wait a uniform random delay in `[0, resync_spread]` before resyncing, against
    /// out-of-sync implosion.
    pub resync_spread: Duration,
    /// How often the scenario serves members' state-check and resync requests.
    pub service_tick: Duration,
    /// Whether the initial members start in sync: the message that admits them goes into the
    /// sender's history without being multicast and each member takes its chunk as resync
    /// would give it. For very large groups, where multicasting that first message to every
    /// simulated member costs more than all the rekeys after it. Those applications are
    /// counted in [`ScenarioReport::bootstrapped`], not as resyncs.
    pub bootstrap_initial: bool,
    /// Relays between the GCKS and the members (0: every member receives from the GCKS).
    /// Each relay is registered like a member (it holds a leaf), listens to the GCKS's group
    /// and sends into a group of its own; member `i` (by slot) is behind relay `i % relays`,
    /// NACKs to it and resyncs from it first, then from the GCKS. The relays' upstream side
    /// takes [`Self::receiver`], their downstream side [`Self::sender`].
    pub relays: usize,
    /// Every relay's downlink: the upstream tier's loss.
    pub relay_downlink: LinkConfig,
    /// Every relay's uplink (its downstream multicast crosses it once, before the members'
    /// downlinks).
    pub relay_uplink: LinkConfig,
    /// Whether relays forward cut-through ([`RelayConfig::cut_through`]).
    pub relay_cut_through: bool,
    /// `(relay index, rekey)`: that relay dies (its node is removed for good) right before
    /// that rekey (1 for the first rekey after the admitting message). Its members hear
    /// nothing more, ask for the group's state after [`ReceiverConfig::silence_timeout`] and
    /// resync from the next endpoint, the GCKS.
    pub kill_relay: Option<(usize, usize)>,
}

impl ScenarioConfig {
    /// A scenario of `members` members and `rekeys` rekeys with `churn`, every member link
    /// losing packets by `loss` with a 10 ms one-way delay and 2 ms of jitter, and defaults for
    /// everything else.
    pub fn new(seed: u64, members: usize, rekeys: usize, churn: f64, loss: super::Loss) -> Self {
        let delay = Duration::from_millis(10);
        let link = LinkConfig {
            jitter: Duration::from_millis(2),
            ..LinkConfig::lossy(loss, delay)
        };
        let placeholder = SocketAddr::from(([198, 18, 0, 1], super::NODE_PORT));
        let mut receiver = ReceiverConfig::new(placeholder);
        receiver.scheduler.grtt = Duration::from_millis(50);
        let mut sender = SenderConfig::default();
        sender.grtt.initial = Duration::from_millis(50);
        Self {
            seed,
            members,
            rekeys,
            churn,
            rekey_interval: Duration::from_secs(2),
            settle: Duration::from_secs(30),
            member_downlink: link.clone(),
            member_uplink: link,
            downlink_overrides: Vec::new(),
            sender_link: LinkConfig::lossy(super::Loss::None, Duration::from_millis(1)),
            sender,
            receiver,
            message: MessageParams::default(),
            degree: 4,
            resync_rtt: Duration::from_millis(40),
            resync_spread: Duration::from_millis(500),
            service_tick: Duration::from_millis(5),
            bootstrap_initial: false,
            relays: 0,
            relay_downlink: LinkConfig::lossy(super::Loss::None, Duration::from_millis(5)),
            relay_uplink: LinkConfig::lossy(super::Loss::None, Duration::from_millis(1)),
            relay_cut_through: true,
            kill_relay: None,
        }
    }
}

/// Why a scenario could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The network refused a configuration or call.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// A session configuration is invalid.
    #[error(transparent)]
    Config(#[from] session::ConfigError),
    /// The key tree refused a batch.
    #[error(transparent)]
    Lkh(#[from] crate::lkh::LkhError),
    /// A message could not be built.
    #[error(transparent)]
    Build(#[from] crate::session::layout::BuildError),
    /// A message could not be queued.
    #[error(transparent)]
    Queue(#[from] crate::session::sender::QueueError),
    /// The degree is not 2..=16.
    #[error("invalid tree degree {0}")]
    Degree(u8),
    /// A scenario field is out of range.
    #[error("invalid scenario: {0}")]
    Invalid(&'static str),
}

/// What a scenario did, from the sessions' own counters and events.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// Messages sent (the first one, which admits the initial members, included).
    pub messages: u64,
    /// Members at the end.
    pub final_members: usize,
    /// Members at the end whose group key is the GCKS's.
    pub converged: usize,
    /// Member-messages: messages each member needed, summed: from its first to the last for
    /// the final members, what it applied for members that left (they leave mid-message).
    pub member_messages: u64,
    /// Member-messages applied from the member's own source symbol.
    pub applied_from_source: u64,
    /// Member-messages applied from a decoded block.
    pub applied_from_decode: u64,
    /// Member-messages applied through resync (bootstrap excluded).
    pub applied_from_resync: u64,
    /// Initial members put in sync by [`ScenarioConfig::bootstrap_initial`] (not counted in
    /// `member_messages` or `applied_from_resync`).
    pub bootstrapped: u64,
    /// Every out-of-sync event: `(initial member index or None for a joiner, from_seq)`.
    pub out_of_sync: Vec<(Option<usize>, u64)>,
    /// Members told to re-register.
    pub must_reregister: u64,
    /// State checks members asked for.
    pub state_checks: u64,
    /// Time from a message's queueing to each member's key update, microseconds, sorted.
    pub time_to_key_us: Vec<u64>,
    /// The sender's counters.
    pub sender: SenderCounters,
    /// Repair orders the sender's aggregator made.
    pub repair_orders: u64,
    /// NACKs members sent.
    pub nacks_sent: u64,
    /// Signature checks members made, and of those failed.
    pub signature_checks: u64,
    /// Failed signature checks.
    pub signature_failures: u64,
    /// The members' session counters, summed (members that left included).
    pub receivers: ReceiverCounters,
    /// The network's counters.
    pub network: NetworkStats,
    /// The round-trip time of the member paths, for expressing times in GRTTs.
    pub path_rtt: Duration,
    /// The sender's GRTT estimate at the end.
    pub grtt_estimate: Duration,
    /// The relays' side of the run (all zero without relays).
    pub relays: RelayReport,
}

/// What the relays of a scenario did, summed over the relays.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayReport {
    /// Relays in the scenario at the end (killed ones are not counted).
    pub relays: usize,
    /// Relays holding the GCKS's group key at the end.
    pub converged: usize,
    /// Messages forwarded downstream (each relay counts its own).
    pub forwarded: u64,
    /// Messages a relay got by resync only and could not forward.
    pub not_forwarded: u64,
    /// NACKs the relays sent upstream.
    pub upstream_nacks: u64,
    /// Chunks that failed authentication at a relay.
    pub bad_chunks: u64,
    /// Signature checks the relays made.
    pub signature_checks: u64,
    /// The relays' downstream sides' counters, summed.
    pub downstream: SenderCounters,
}

impl ScenarioReport {
    /// Fraction of member-messages completed without resync.
    pub fn without_resync(&self) -> f64 {
        if self.member_messages == 0 {
            return 1.0;
        }
        1.0 - self.applied_from_resync as f64 / self.member_messages as f64
    }

    /// Time to key at quantile `q` (0..=1), microseconds.
    pub fn time_to_key_quantile_us(&self, q: f64) -> u64 {
        quantile(&self.time_to_key_us, q)
    }

    /// Multicast bytes the sender sent per byte of source symbols.
    pub fn wire_per_source(&self) -> f64 {
        self.sender.bytes_sent as f64 / self.sender.source_bytes_sent.max(1) as f64
    }
}

/// The value at quantile `q` of sorted `values` (0 when empty).
pub fn quantile(values: &[u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let rank = ((values.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// A node of a rekey scenario.
#[derive(Debug)]
pub enum SimNode {
    /// The GCKS.
    Sender(Box<SenderSession>),
    /// A member.
    Member(Box<MemberNode>),
    /// A relay.
    Relay(Box<RelayNode>),
}

/// A relay's session with what the scenario needs of it.
#[derive(Debug)]
pub struct RelayNode {
    /// The session.
    pub session: RelaySession,
    /// The GCKS's address: datagrams from it are upstream traffic, the rest downstream.
    upstream: SocketAddr,
    index: usize,
    shared: Rc<RefCell<Shared>>,
}

impl RelayNode {
    fn drain_events(&mut self) {
        let mut shared = self.shared.borrow_mut();
        while let Some(event) = self.session.poll_event() {
            if let RelayEvent::Upstream(
                event @ (ReceiverEvent::OutOfSync { .. }
                | ReceiverEvent::StateCheckNeeded { .. }
                | ReceiverEvent::MustReregister),
            ) = event
            {
                shared.relay_actions.push((self.index, event));
            }
        }
    }
}

/// A member's session with what the scenario records about it.
#[derive(Debug)]
pub struct MemberNode {
    /// The session.
    pub session: ReceiverSession,
    /// The member's index among the initial members, `None` for a later joiner.
    pub initial_index: Option<usize>,
    /// The first message the member needed.
    pub first_seq: u64,
    slot: usize,
    shared: Rc<RefCell<Shared>>,
}

#[derive(Debug, Default)]
struct Shared {
    queued_at: BTreeMap<u64, Instant>,
    time_to_key_us: Vec<u64>,
    /// Events the scenario must act on: (member slot, event).
    actions: Vec<(usize, ReceiverEvent)>,
    /// Events of relays the scenario must act on: (relay index, event).
    relay_actions: Vec<(usize, ReceiverEvent)>,
    out_of_sync: Vec<(Option<usize>, u64)>,
}

impl MemberNode {
    fn drain_events(&mut self, now: Instant) {
        let mut shared = self.shared.borrow_mut();
        while let Some(event) = self.session.poll_event() {
            match event {
                ReceiverEvent::GroupKeyUpdated { seq, .. } => {
                    if let Some(queued) = shared.queued_at.get(&seq) {
                        let us = now.saturating_duration_since(*queued).as_micros();
                        let us = u64::try_from(us).unwrap_or(u64::MAX);
                        shared.time_to_key_us.push(us);
                    }
                }
                ReceiverEvent::NewDataSa { .. } => {}
                ReceiverEvent::OutOfSync { from_seq } => {
                    shared.out_of_sync.push((self.initial_index, from_seq));
                    shared.actions.push((self.slot, event));
                }
                other => shared.actions.push((self.slot, other)),
            }
        }
    }
}

impl SimNode {
    /// Hands a resync endpoint's state answer to a member or relay.
    fn state_answer(&mut self, now: Instant, manifest: &[u8]) {
        match self {
            Self::Member(member) => {
                let _verdict = member.session.handle_state_answer(now, manifest);
                member.drain_events(now);
            }
            Self::Relay(relay) => {
                let _verdict = relay.session.handle_state_answer(now, manifest);
                relay.drain_events();
            }
            Self::Sender(_) => {}
        }
    }

    /// Hands one resync item to a member or relay; whether it was applied.
    fn resync(&mut self, now: Instant, manifest: &[u8], chunk: &[u8]) -> bool {
        match self {
            Self::Member(member) => {
                let applied = member.session.handle_resync(now, manifest, chunk).is_ok();
                member.drain_events(now);
                applied
            }
            Self::Relay(relay) => {
                let applied = relay.session.handle_resync(now, manifest, chunk).is_ok();
                relay.drain_events();
                applied
            }
            Self::Sender(_) => false,
        }
    }

    /// Tells a member or relay that what it lacks left the history.
    fn beyond_history(&mut self, now: Instant) {
        match self {
            Self::Member(member) => {
                member.session.handle_beyond_history(now);
                member.drain_events(now);
            }
            Self::Relay(relay) => {
                relay.session.handle_beyond_history(now);
                relay.drain_events();
            }
            Self::Sender(_) => {}
        }
    }
}

impl Node for SimNode {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        match self {
            Self::Sender(sender) => sender.handle_datagram(now, from, bytes),
            Self::Member(member) => {
                member.session.handle_datagram(now, from, bytes);
                member.drain_events(now);
            }
            Self::Relay(relay) => {
                if from == relay.upstream {
                    relay.session.handle_upstream(now, from, bytes);
                } else {
                    relay.session.handle_downstream(now, from, bytes);
                }
                relay.drain_events();
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Self::Sender(sender) => sender.handle_timeout(now),
            Self::Member(member) => {
                member.session.handle_timeout(now);
                member.drain_events(now);
            }
            Self::Relay(relay) => {
                relay.session.handle_timeout(now);
                relay.drain_events();
            }
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        match self {
            Self::Sender(sender) => sender.poll_transmit(now, buf),
            Self::Member(member) => member.session.poll_transmit(now, buf),
            Self::Relay(relay) => relay.session.poll_transmit(now, buf).map(|t| Transmit {
                destination: t.destination,
                len: t.len,
            }),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Sender(sender) => sender.poll_timeout(),
            Self::Member(member) => member.session.poll_timeout(),
            Self::Relay(relay) => relay.session.poll_timeout(),
        }
    }
}

/// A resync-endpoint action the scenario performs for a member at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    StateAnswer,
    Resync,
    /// The same for the relay of that index.
    RelayStateAnswer,
    RelayResync,
}

/// Runs a scenario to its end and reports.
pub fn run(config: &ScenarioConfig) -> Result<ScenarioReport, ScenarioError> {
    Scenario::new(config)?.run()
}

struct Scenario<'c> {
    config: &'c ScenarioConfig,
    net: Network<SimNode>,
    tree: KeyTree,
    signing_key: SigningKey,
    sender: NodeId,
    /// The relays' nodes, by relay index.
    relays: Vec<NodeId>,
    /// Relays' member ids, joined in the first message.
    pending_relays: Vec<MemberId>,
    relays_killed: usize,
    /// Each member slot's relay (as given when it joined).
    member_relays: Vec<Option<NodeId>>,
    /// Member slots: (member id, node id); a slot is never reused.
    slots: Vec<(MemberId, NodeId)>,
    /// Slots of current members.
    current: Vec<usize>,
    shared: Rc<RefCell<Shared>>,
    rng: ChaCha8Rng,
    next_member_id: u64,
    /// Scheduled endpoint actions: (time, tie-breaker, slot, action), earliest first.
    scheduled: BinaryHeap<std::cmp::Reverse<(Instant, u64, usize, Action)>>,
    scheduled_count: u64,
    /// Counters of members that left (their nodes are gone).
    departed: ReceiverCounters,
    departed_signatures: (u64, u64),
    member_messages: u64,
    must_reregister: u64,
    messages: u64,
    bootstrapped: u64,
}

impl<'c> Scenario<'c> {
    fn new(config: &'c ScenarioConfig) -> Result<Self, ScenarioError> {
        if !(0.0..=1.0).contains(&config.churn) || config.members == 0 {
            return Err(ScenarioError::Invalid(
                "members must be >= 1 and churn in [0, 1]",
            ));
        }
        if config.service_tick.is_zero() {
            return Err(ScenarioError::Invalid("service_tick must be positive"));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let signing_key = SigningKey::from_bytes(&rng.gen());
        let degree =
            Degree::new(config.degree).map_err(|_| ScenarioError::Degree(config.degree))?;
        let sa = RekeySa {
            group_id: GROUP_ID,
            spi: SPI,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree,
            gcks_public_key: signing_key.verifying_key(),
            data_sa_lifetime_secs: 3600,
        };
        let tree = KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(rng.gen()));
        let mut net = Network::with_config(super::NetworkConfig::new(rng.gen()))?;
        let start = net.start();
        let sender = SenderSession::new(config.sender.clone(), GROUP_ID, SPI, start)?;
        let sender = net.add_node(
            SimNode::Sender(Box::new(sender)),
            config.sender_link.clone(),
            config.sender_link.clone(),
        )?;
        Ok(Self {
            config,
            net,
            tree,
            signing_key,
            sender,
            relays: Vec::new(),
            pending_relays: Vec::new(),
            relays_killed: 0,
            member_relays: Vec::new(),
            slots: Vec::new(),
            current: Vec::new(),
            shared: Rc::new(RefCell::new(Shared::default())),
            rng,
            next_member_id: 0,
            scheduled: BinaryHeap::new(),
            scheduled_count: 0,
            departed: ReceiverCounters::default(),
            departed_signatures: (0, 0),
            member_messages: 0,
            must_reregister: 0,
            messages: 0,
            bootstrapped: 0,
        })
    }

    fn run(mut self) -> Result<ScenarioReport, ScenarioError> {
        let relays: Vec<MemberId> = (0..self.config.relays)
            .map(|_| self.new_member_id())
            .collect();
        self.pending_relays = relays;
        let initial: Vec<MemberId> = (0..self.config.members)
            .map(|_| self.new_member_id())
            .collect();
        self.rekey(&initial, &[], true)?;
        for rekey in 1..=self.config.rekeys {
            self.advance(self.config.rekey_interval)?;
            if let Some((index, at)) = self.config.kill_relay {
                if at == rekey {
                    if let Some(&id) = self.relays.get(index) {
                        self.net.remove_node(id)?;
                        self.relays_killed += 1;
                    }
                }
            }
            let count = ((self.current.len() as f64) * self.config.churn).round() as usize;
            let count = count.min(self.current.len().saturating_sub(1));
            let picks = sample(&mut self.rng, self.current.len(), count).into_vec();
            let mut leaving_slots: Vec<usize> = picks.iter().map(|&i| self.current[i]).collect();
            leaving_slots.sort_unstable();
            let leaves: Vec<MemberId> = leaving_slots.iter().map(|&s| self.slots[s].0).collect();
            let joins: Vec<MemberId> = (0..count).map(|_| self.new_member_id()).collect();
            for &slot in &leaving_slots {
                self.depart(slot)?;
            }
            self.current
                .retain(|slot| leaving_slots.binary_search(slot).is_err());
            self.rekey(&joins, &leaves, false)?;
        }
        // Settle: repair and resync finish; stop early once every member has the latest
        // message (checked once a second of virtual time).
        let deadline = self.net.now() + self.config.settle;
        while self.net.now() < deadline && !self.all_current() {
            let step = Duration::from_secs(1).min(deadline - self.net.now());
            self.advance(step)?;
        }
        Ok(self.report())
    }

    /// The relay member slot `slot` is behind, if the scenario has relays: the one it was
    /// given when it joined.
    fn relay_of(&self, slot: usize) -> Option<NodeId> {
        self.member_relays.get(slot).copied().flatten()
    }

    /// The relay a member joining in slot `slot` is given: relay `slot % relays`, or the next
    /// one still running (registration hands out live relays).
    fn relay_for_joiner(&self, slot: usize) -> Option<NodeId> {
        let count = self.relays.len();
        (0..count)
            .map(|offset| self.relays[(slot + offset) % count])
            .find(|&id| self.net.is_present(id))
    }

    fn new_member_id(&mut self) -> MemberId {
        self.next_member_id += 1;
        MemberId(self.next_member_id)
    }

    /// Applies a batch, admits the joiners as new nodes, builds and queues the message.
    fn rekey(
        &mut self,
        joins: &[MemberId],
        leaves: &[MemberId],
        initial: bool,
    ) -> Result<(), ScenarioError> {
        let relay_ids = std::mem::take(&mut self.pending_relays);
        let all_joins: Vec<MemberId> = relay_ids.iter().chain(joins).copied().collect();
        let batch = self.tree.apply_batch(&all_joins, leaves)?;
        let now = self.net.now();
        let params = MessageParams {
            spi: SPI,
            epoch: 0,
            timestamp_us: session::micros(now.saturating_duration_since(self.net.start())),
            ..self.config.message
        };
        let built = build_message(
            &batch,
            &self.tree.leaves_in_order(),
            &self.signing_key,
            &params,
        )?;
        let prepared = PreparedMessage::new(built, batch.mac_key.clone())?;
        let seq = prepared.seq();
        let upstream = self.net.addr(self.sender);
        for &relay in &relay_ids {
            let bundle = self.tree.join(relay)?;
            let mut config = RelayConfig::new(upstream);
            config.upstream = self.config.receiver.clone();
            config.upstream.feedback_addr = upstream;
            config.upstream.scheduler.group_size =
                u32::try_from(self.tree.member_count()).unwrap_or(u32::MAX);
            config.upstream.scheduler.seed = self.rng.gen();
            config.downstream = self.config.sender.clone();
            config.cut_through = self.config.relay_cut_through;
            let per_relay = self.config.members.div_ceil(self.config.relays.max(1));
            config.downstream_group_size = Some(u32::try_from(per_relay.max(1)).unwrap_or(1));
            let index = self.relays.len();
            let session = RelaySession::new(&bundle, config, now).map_err(|e| match e {
                crate::relay::RelayError::Config(e) => ScenarioError::Config(e),
                _ => ScenarioError::Invalid("relay could not start"),
            })?;
            let node = SimNode::Relay(Box::new(RelayNode {
                session,
                upstream,
                index,
                shared: Rc::clone(&self.shared),
            }));
            let id = self.net.add_node(
                node,
                self.config.relay_uplink.clone(),
                self.config.relay_downlink.clone(),
            )?;
            // The relay listens to the GCKS's group (0) and sends into its own.
            self.net.set_groups(id, relay_group(index), 0)?;
            self.net.with_node(id, |node, now| {
                if let SimNode::Relay(relay) = node {
                    relay.session.start(now);
                }
            });
            self.relays.push(id);
        }
        for (i, &member) in joins.iter().enumerate() {
            let bundle = self.tree.join(member)?;
            let mut receiver_config = self.config.receiver.clone();
            let slot = self.slots.len();
            let relay = self.relay_for_joiner(slot);
            receiver_config.feedback_addr = relay.map_or(upstream, |id| self.net.addr(id));
            receiver_config.scheduler.group_size =
                u32::try_from(self.tree.member_count()).unwrap_or(u32::MAX);
            receiver_config.scheduler.seed = self.rng.gen();
            let session = ReceiverSession::new(&bundle, receiver_config)?;
            let initial_index = initial.then_some(i);
            let node = SimNode::Member(Box::new(MemberNode {
                session,
                initial_index,
                first_seq: bundle.first_seq,
                slot,
                shared: Rc::clone(&self.shared),
            }));
            let downlink = initial_index
                .and_then(|index| {
                    self.config
                        .downlink_overrides
                        .iter()
                        .rev()
                        .find(|(range, _)| range.contains(&index))
                        .map(|(_, link)| link.clone())
                })
                .unwrap_or_else(|| self.config.member_downlink.clone());
            let id = self
                .net
                .add_node(node, self.config.member_uplink.clone(), downlink)?;
            if let Some(index) = relay.and_then(|r| self.relays.iter().position(|&x| x == r)) {
                let group = relay_group(index);
                self.net.set_groups(id, group, group)?;
            }
            // The driver arms the member's silence timer when it starts.
            self.net.with_node(id, |node, now| {
                if let SimNode::Member(member) = node {
                    member.session.start(now);
                }
            });
            self.member_relays.push(relay);
            self.slots.push((member, id));
            self.current.push(slot);
        }
        self.messages += 1;
        if initial && self.config.bootstrap_initial {
            return self.bootstrap(now, prepared);
        }
        self.shared.borrow_mut().queued_at.insert(seq, now);
        if let Some(SimNode::Sender(sender)) = self.net.node_mut(self.sender) {
            sender.queue_message(now, prepared)?;
        }
        self.net.touch(self.sender)?;
        Ok(())
    }

    /// The message admitting the initial members goes into the sender's history without being
    /// multicast, and each initial member takes its chunk through the resync path: the run
    /// starts with a group in sync and measures the rekeys after it. (Multicasting a message
    /// of tens of thousands of chunks to 100,000 simulated members costs billions of
    /// deliveries.)
    fn bootstrap(&mut self, now: Instant, prepared: PreparedMessage) -> Result<(), ScenarioError> {
        let seq = prepared.seq();
        if let Some(SimNode::Sender(sender)) = self.net.node_mut(self.sender) {
            sender.restore_message(now, prepared)?;
        }
        for index in 0..self.relays.len() {
            let id = self.relays[index];
            let item = match (self.net.node(self.sender), self.net.node(id)) {
                (Some(SimNode::Sender(sender)), Some(SimNode::Relay(relay))) => sender
                    .resync_item(relay.session.next_seq(), relay.session.order_key())
                    .map(|item| (item.manifest.to_vec(), item.chunk.to_vec()))
                    .ok(),
                _ => None,
            };
            if let (Some((manifest, chunk)), Some(SimNode::Relay(relay))) =
                (item, self.net.node_mut(id))
            {
                let _ = relay.session.handle_resync(now, &manifest, &chunk);
                while relay.session.poll_event().is_some() {}
            }
            self.net.touch(id)?;
        }
        for slot in self.current.clone() {
            let id = self.slots[slot].1;
            let Some((next, key)) = self.resync_position(id) else {
                continue;
            };
            let Some(SimNode::Sender(sender)) = self.net.node(self.sender) else {
                break;
            };
            let Ok(item) = sender.resync_item(next, key) else {
                continue;
            };
            let (manifest, chunk) = (item.manifest.to_vec(), item.chunk.to_vec());
            if let Some(SimNode::Member(member)) = self.net.node_mut(id) {
                if member.session.handle_resync(now, &manifest, &chunk).is_ok() {
                    self.bootstrapped += 1;
                }
                // The bootstrap's own key event is not a time-to-key sample.
                while member.session.poll_event().is_some() {}
            }
            self.net.touch(id)?;
        }
        let _ = seq;
        Ok(())
    }

    /// A member leaves: its node is removed and its counters kept.
    fn depart(&mut self, slot: usize) -> Result<(), ScenarioError> {
        let id = self.slots[slot].1;
        if let Some(SimNode::Member(member)) = self.net.remove_node(id)? {
            self.account(&member);
        }
        Ok(())
    }

    fn account(&mut self, member: &MemberNode) {
        let c = member.session.counters();
        add_counters(&mut self.departed, c);
        let m = member.session.message_counters();
        self.departed_signatures.0 += m.signature_checks;
        self.departed_signatures.1 += m.signature_failures;
        // A departing member may leave in the middle of the latest message (its departure is
        // decided by the next batch, not by its progress): what it applied is what it needed.
        self.member_messages += c.messages_applied;
        self.must_reregister += u64::from(member.session.must_reregister());
    }

    /// Runs the network for `duration`, serving members' requests every service tick.
    fn advance(&mut self, duration: Duration) -> Result<(), ScenarioError> {
        let end = self.net.now() + duration;
        let mut now = self.net.now();
        while now < end {
            let next = (now + self.config.service_tick).min(end);
            self.net.run_until(next);
            now = next;
            self.serve(now)?;
        }
        Ok(())
    }

    /// Schedules what members asked for and performs what is due.
    fn serve(&mut self, now: Instant) -> Result<(), ScenarioError> {
        let relay_actions = std::mem::take(&mut self.shared.borrow_mut().relay_actions);
        for (index, event) in relay_actions {
            match event {
                ReceiverEvent::StateCheckNeeded { .. } => {
                    self.schedule(
                        now + self.config.resync_rtt,
                        index,
                        Action::RelayStateAnswer,
                    );
                }
                ReceiverEvent::OutOfSync { .. } => {
                    self.schedule(now + self.config.resync_rtt, index, Action::RelayResync);
                }
                _ => {}
            }
        }
        let actions = std::mem::take(&mut self.shared.borrow_mut().actions);
        for (slot, event) in actions {
            match event {
                ReceiverEvent::StateCheckNeeded { .. } => {
                    self.schedule(now + self.config.resync_rtt, slot, Action::StateAnswer);
                }
                ReceiverEvent::OutOfSync { .. } => {
                    let spread = self.config.resync_spread.mul_f64(self.rng.gen::<f64>());
                    self.schedule(now + spread + self.config.resync_rtt, slot, Action::Resync);
                }
                _ => {}
            }
        }
        while let Some(std::cmp::Reverse((at, _, slot, action))) = self.scheduled.peek().copied() {
            if at > now {
                break;
            }
            self.scheduled.pop();
            self.perform(now, slot, action)?;
        }
        Ok(())
    }

    fn schedule(&mut self, at: Instant, slot: usize, action: Action) {
        self.scheduled_count += 1;
        self.scheduled
            .push(std::cmp::Reverse((at, self.scheduled_count, slot, action)));
    }

    /// One exchange with the resync endpoints for a member (its relay first, if it has one,
    /// then the GCKS) or for a relay (the GCKS).
    fn perform(&mut self, now: Instant, index: usize, action: Action) -> Result<(), ScenarioError> {
        let (id, endpoints) = match action {
            Action::StateAnswer | Action::Resync => {
                let mut endpoints: Vec<NodeId> = self.relay_of(index).into_iter().collect();
                endpoints.push(self.sender);
                (self.slots[index].1, endpoints)
            }
            Action::RelayStateAnswer | Action::RelayResync => {
                (self.relays[index], vec![self.sender])
            }
        };
        if !self.net.is_present(id) {
            return Ok(());
        }
        match action {
            Action::StateAnswer | Action::RelayStateAnswer => {
                let manifest = endpoints.iter().find_map(|&endpoint| {
                    let (_, manifest) = self.source(endpoint)?.latest()?;
                    Some(manifest.to_vec())
                });
                if let (Some(manifest), Some(node)) = (manifest, self.net.node_mut(id)) {
                    // A behind member raises OutOfSync, which the next service tick schedules;
                    // a bad answer changes nothing.
                    node.state_answer(now, &manifest);
                }
            }
            Action::Resync | Action::RelayResync => {
                // Fetch and apply in order until the member has the latest message; each item
                // is one request on the resync connection.
                while let Some((seq, key)) = self.resync_position(id) {
                    let item = self.fetch(&endpoints, seq, key);
                    let Some(node) = self.net.node_mut(id) else {
                        break;
                    };
                    let more = match item {
                        Lookup::Found((manifest, chunk)) => node.resync(now, &manifest, &chunk),
                        Lookup::BeyondHistory { .. } => {
                            node.beyond_history(now);
                            false
                        }
                        Lookup::NotYetSent { .. } | Lookup::NotFound => false,
                    };
                    if !more {
                        break;
                    }
                }
            }
        }
        self.net.touch(id)?;
        Ok(())
    }

    /// What a node serves resync from: the GCKS's history or a relay's.
    fn source(&self, id: NodeId) -> Option<&dyn ResyncSource> {
        match self.net.node(id)? {
            SimNode::Sender(sender) => Some(sender.as_ref()),
            SimNode::Relay(relay) => Some(&relay.session),
            SimNode::Member(_) => None,
        }
    }

    /// Message `seq`'s manifest and the chunk of order key `key` from the first endpoint that
    /// has them, or the last endpoint's answer.
    fn fetch(&self, endpoints: &[NodeId], seq: u64, key: u32) -> Lookup<(Vec<u8>, Vec<u8>)> {
        let mut outcome = Lookup::NotFound;
        for &endpoint in endpoints {
            let Some(source) = self.source(endpoint) else {
                continue;
            };
            outcome = match (source.manifest(seq), source.chunk(seq, key)) {
                (Lookup::Found(manifest), Lookup::Found(chunk)) => {
                    return Lookup::Found((manifest.to_vec(), chunk.to_vec()));
                }
                (Lookup::Found(_), other) => other.map(|_| (Vec::new(), Vec::new())),
                (other, _) => other.map(|_| (Vec::new(), Vec::new())),
            };
        }
        outcome
    }

    /// Whether every current member has applied the latest message.
    fn all_current(&self) -> bool {
        let latest = self.tree.seq();
        self.current
            .iter()
            .all(|&slot| match self.net.node(self.slots[slot].1) {
                Some(SimNode::Member(member)) => member.session.next_seq() > latest,
                _ => true,
            })
    }

    /// Where a member stands for resync: the message it needs next and its order key.
    fn resync_position(&self, id: NodeId) -> Option<(u64, u32)> {
        match self.net.node(id) {
            Some(SimNode::Member(member)) if !member.session.must_reregister() => {
                Some((member.session.next_seq(), member.session.order_key()))
            }
            Some(SimNode::Relay(relay)) if !relay.session.must_reregister() => {
                Some((relay.session.next_seq(), relay.session.order_key()))
            }
            _ => None,
        }
    }

    fn report(self) -> ScenarioReport {
        let (group_version, group_key) = self.tree.group_key();
        let latest = self.tree.seq();
        let mut receivers = self.departed;
        let (mut signature_checks, mut signature_failures) = self.departed_signatures;
        let mut converged = 0;
        let mut member_messages = self.member_messages;
        let mut must_reregister = self.must_reregister;
        for &slot in &self.current {
            let Some(SimNode::Member(member)) = self.net.node(self.slots[slot].1) else {
                continue;
            };
            let session = &member.session;
            add_counters(&mut receivers, session.counters());
            signature_checks += session.message_counters().signature_checks;
            signature_failures += session.message_counters().signature_failures;
            member_messages += (latest + 1).saturating_sub(member.first_seq);
            must_reregister += u64::from(session.must_reregister());
            if session.group_key().is_some_and(|k| {
                k.version == group_version && k.key.as_bytes() == group_key.as_bytes()
            }) {
                converged += 1;
            }
        }
        // Bootstrapped applications are not member-messages of the run.
        receivers.messages_applied = receivers.messages_applied.saturating_sub(self.bootstrapped);
        receivers.applied_from_resync = receivers
            .applied_from_resync
            .saturating_sub(self.bootstrapped);
        let (sender, repair_orders, grtt_estimate) = match self.net.node(self.sender) {
            Some(SimNode::Sender(sender)) => (
                *sender.counters(),
                sender.repair_stats().orders,
                sender.grtt(),
            ),
            _ => Default::default(),
        };
        let path_rtt = 2 * (self.config.sender_link.delay + self.config.member_downlink.delay)
            + self.config.member_downlink.jitter;
        let mut relays = RelayReport {
            relays: self.relays.len() - self.relays_killed,
            ..RelayReport::default()
        };
        for &id in &self.relays {
            let Some(SimNode::Relay(relay)) = self.net.node(id) else {
                continue;
            };
            let session = &relay.session;
            relays.forwarded += session.counters().forwarded;
            relays.not_forwarded += session.counters().not_forwarded;
            relays.upstream_nacks += session.upstream_counters().nacks_sent;
            relays.bad_chunks += session.upstream_counters().bad_chunks;
            relays.signature_checks += session.upstream_message_counters().signature_checks;
            add_sender_counters(&mut relays.downstream, session.downstream_counters());
            if session.keys().group_key().is_some_and(|k| {
                k.version == group_version && k.key.as_bytes() == group_key.as_bytes()
            }) {
                relays.converged += 1;
            }
        }
        let mut shared = self.shared.borrow_mut();
        shared.time_to_key_us.sort_unstable();
        ScenarioReport {
            messages: self.messages,
            final_members: self.current.len(),
            converged,
            member_messages: member_messages.saturating_sub(self.bootstrapped),
            applied_from_source: receivers.applied_from_source,
            applied_from_decode: receivers.applied_from_decode,
            applied_from_resync: receivers.applied_from_resync,
            bootstrapped: self.bootstrapped,
            out_of_sync: std::mem::take(&mut shared.out_of_sync),
            must_reregister,
            state_checks: receivers.state_checks,
            time_to_key_us: std::mem::take(&mut shared.time_to_key_us),
            sender,
            repair_orders,
            nacks_sent: receivers.nacks_sent,
            signature_checks,
            signature_failures,
            receivers,
            network: self.net.stats().clone(),
            path_rtt,
            grtt_estimate,
            relays,
        }
    }
}

/// The simulated multicast group relay `index` sends into (the GCKS's is 0).
fn relay_group(index: usize) -> u32 {
    u32::try_from(index + 1).unwrap_or(u32::MAX)
}

fn add_sender_counters(total: &mut SenderCounters, c: &SenderCounters) {
    total.manifests_sent += c.manifests_sent;
    total.source_symbols_sent += c.source_symbols_sent;
    total.proactive_symbols_sent += c.proactive_symbols_sent;
    total.repair_symbols_sent += c.repair_symbols_sent;
    total.heartbeats_sent += c.heartbeats_sent;
    total.advertisements_sent += c.advertisements_sent;
    total.bytes_sent += c.bytes_sent;
    total.source_bytes_sent += c.source_bytes_sent;
    total.nacks_received += c.nacks_received;
    total.probe_replies_received += c.probe_replies_received;
    total.replayed_feedback += c.replayed_feedback;
    total.stale_feedback += c.stale_feedback;
    total.repair_orders += c.repair_orders;
    total.rejected += c.rejected;
    total.ignored += c.ignored;
    total.buffer_too_small += c.buffer_too_small;
    total.fec_errors += c.fec_errors;
}

fn add_counters(total: &mut ReceiverCounters, c: &ReceiverCounters) {
    total.dropped_finished += c.dropped_finished;
    total.dropped_other_block += c.dropped_other_block;
    total.buffered += c.buffered;
    total.buffer_full += c.buffer_full;
    total.symbols_pushed += c.symbols_pushed;
    total.decoder_refused += c.decoder_refused;
    total.messages_applied += c.messages_applied;
    total.applied_from_source += c.applied_from_source;
    total.applied_from_decode += c.applied_from_decode;
    total.applied_from_resync += c.applied_from_resync;
    total.decode_failures += c.decode_failures;
    total.bad_own_chunks += c.bad_own_chunks;
    total.apply_failures += c.apply_failures;
    total.nacks_sent += c.nacks_sent;
    total.probe_replies_sent += c.probe_replies_sent;
    total.state_checks += c.state_checks;
    total.out_of_sync += c.out_of_sync;
    total.silences += c.silences;
    total.bad_chunks += c.bad_chunks;
    total.buffer_too_small += c.buffer_too_small;
}
