//! Rekey scenarios over the simulated network, run on the endpoints the engine runs: one GCKS
//! ([`GcksEndpoint`]), relays ([`RelayEndpoint`]) and thousands of members
//! ([`MemberEndpoint`]), each wrapped as a simulator node by [`EndpointNode`] (jobs inline,
//! storage in memory, fetches answered from the serving node's history after a modelled
//! round trip).
//!
//! Membership changes go to the GCKS as [`GcksCommand::Changes`] and a
//! [`GcksCommand::RekeyNow`] at each rekey; joiners are admitted with the registration bundles
//! the GCKS answers with, exactly as a product admits them. Resync is the endpoints' own
//! policy: a member asks its relay, then the GCKS, with the deadlines, caps, spreading and
//! verification the engine uses. A scenario can restart the GCKS mid-message from its
//! in-memory storage ([`GcksRestart`]) and make one relay's resync endpoint hostile
//! ([`Hostility`]).
//!
//! Used by the scenario tests, by `rekeycast-bench sim` and by the `sim` subcommand. Everything
//! is seeded: the key tree's randomness, the GCKS's signing key, the churn, every member's
//! policy and every link, so a run reproduces from its [`ScenarioConfig`]. Outcomes are read
//! from the endpoints' own counters and events ([`ScenarioReport`]).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast_proto::endpoint::failover::{FailoverConfig, FailoverCounters};
use rekeycast_proto::endpoint::gcks::membership::Schedule;
pub use rekeycast_proto::endpoint::gcks::rollover::RolloverMode;
use rekeycast_proto::endpoint::gcks::{
    Change, GcksCommand, GcksEndpoint, GcksEndpointConfig, GcksEvent, GcksSetupError, WallClock,
    ANSWER_SLICE,
};
use rekeycast_proto::endpoint::member::{MemberEndpoint, MemberEndpointConfig};
use rekeycast_proto::endpoint::relay::{RelayEndpoint, RelayEndpointConfig};
use rekeycast_proto::endpoint::resync_policy::{ResyncConfig, ResyncCounters};
use rekeycast_proto::endpoint::{
    Endpoint, FetchFailure, FetchRequest, Fetched, Port, ResyncEndpoint, ResyncProtocol,
};

use super::endpoint::{
    answer_fetch, EndpointNode, EndpointNodeCounters, MemGcksStorage, MemMemberStorage, NoStorage,
    PortMap, SharedStorage,
};
use super::{Interest, LinkConfig, Network, NetworkStats, Node, NodeId, SimError, Tag, Transmit};
use crate::gsa::WrapAlgorithm;
use crate::lkh::{Degree, KeyRng, MemberId, RegistrationBundle, RelayContact, RelayDirectory};
use crate::relay::RelayConfig;
use crate::resync::ResyncSource;
use crate::session::layout::MessageParams;
use crate::session::manifest::KeyId;
use crate::session::sender::SenderCounters;
use crate::session::{self, ReceiverConfig, ReceiverCounters, ReceiverEvent, SenderConfig};

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
    /// How messages are built (SPI and timestamp are set by the GCKS endpoint).
    pub message: MessageParams,
    /// The key tree's degree.
    pub degree: u8,
    /// Round-trip time of a resync exchange: a fetch's answer arrives this long after it was
    /// asked for.
    pub resync_rtt: Duration,
    /// The window the members' resync policy spreads a resync's start over, against
    /// out-of-sync implosion (its capacity is set so that the whole initial group fits it).
    pub resync_spread: Duration,
    /// The deadline of one whole fetch (the resync policy's fetch timeout).
    pub resync_timeout: Duration,
    /// How often the scenario picks up the fetches endpoints asked for and answers them from
    /// the serving node's history (the answer still arrives [`Self::resync_rtt`] after the
    /// request, or at the pick-up if that is later).
    pub service_tick: Duration,
    /// Whether the initial members start in sync: the message that admits them is sent
    /// before any of them is in the network, then each member takes its chunk from the
    /// GCKS's history as resync would give it (through [`MemberEndpoint::apply_resync`]).
    /// For very large groups, where multicasting that first message to every simulated member
    /// costs more than all the rekeys after it. Those applications are counted in
    /// [`ScenarioReport::bootstrapped`], not as resyncs, and the traffic of that first
    /// message is not counted in the sender's and the network's figures.
    pub bootstrap_initial: bool,
    /// With [`Self::bootstrap_initial`]: the relays too come in only once the admitting
    /// message was sent (to nobody), and each takes its own chunk of it from the GCKS's
    /// history as the members do ([`RelayEndpoint::apply_resync`]). A relay then neither
    /// holds nor forwards that message: for groups whose admitting message, held by every
    /// relay and forwarded to every member, would not fit in memory or time (a million
    /// members behind a thousand relays).
    pub bootstrap_relays: bool,
    /// Relays between the GCKS and the members (0: every member receives from the GCKS).
    /// Each relay is registered as a relay (it holds a leaf), listens to the GCKS's group
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
    /// With [`Self::kill_relay`]: the relay dies this long after that rekey was asked (in the
    /// middle of its message) instead of right before it.
    pub kill_relay_after: Option<Duration>,
    /// Whether members behind relays fail over: each gets a relay directory (its relay first,
    /// then the relays after it, then the GCKS), as a GCKS's relay assignment would hand it,
    /// and moves along it when its relay goes silent ([`MemberEndpointConfig::failover`]).
    pub member_failover: bool,
    /// The members' failover settings (with [`Self::member_failover`]).
    pub failover: FailoverConfig,
    /// Whether the GCKS persists (leaves recorded, batches stored before they are released),
    /// to a storage in memory. Needed by [`Self::restart_gcks`]. Off by default: the history
    /// it stores is a second copy of the sender's, which would count in the memory figures.
    pub durable: bool,
    /// Whether members save their keys after every applied message (to a storage in memory).
    pub persist_member_keys: bool,
    /// The GCKS crashes and is restored from its storage (needs [`Self::durable`]).
    pub restart_gcks: Option<GcksRestart>,
    /// The GCKS replaces its signing key after a rekey ([`SigningKeyRoll`]).
    pub roll_signing_key: Option<SigningKeyRoll>,
    /// `(relay index, how)`: that relay's resync endpoint misbehaves; its multicast is
    /// honest.
    pub hostile_relay: Option<(usize, Hostility)>,
    /// Called as a long run goes: every [`PROGRESS_MEMBERS`] members admitted or
    /// bootstrapped, and at every second of virtual time; for progress lines (it may read
    /// the wall clock and the process's memory; the scenario does not).
    pub progress: Option<fn(&Progress)>,
    /// How the network draws link fates and whether it hands members the datagrams they
    /// drop unread.
    pub deliveries: Deliveries,
}

/// How a scenario's network delivers ([`ScenarioConfig::deliveries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Deliveries {
    /// Every datagram to every listener; each link draws from its own stream (the seeded
    /// figures of the scenario tests and benches).
    #[default]
    Streams,
    /// Every datagram to every listener; each packet draws its fates from a generator of its
    /// own ([`Network::per_packet_draws`]): the reference [`Deliveries::Filtered`] must
    /// match.
    PerPacket,
    /// As [`Deliveries::PerPacket`], but a member is not handed the symbols its session
    /// drops unread at the cost of a header read ([`crate::session::DropFilter`]: other
    /// blocks than its own once the manifest named it, finished messages), as if its socket
    /// had dropped them ([`Network::filter_deliveries`]). Every member still receives its
    /// own block, the manifests, heartbeats and NACKs, and verifies everything it uses as
    /// before (no verification is shared or skipped): the members' keys, outcomes and times
    /// are those of [`Deliveries::PerPacket`]; only the receivers' drop counters and the
    /// network's delivery count differ (the skipped copies are counted in
    /// [`NetworkStats::filtered`]). Relays and the GCKS take everything.
    Filtered,
}

/// Tags the datagrams a member's session may drop unread: symbol datagrams, by (group id and
/// SPI, sequence number, chunk block or none for a manifest symbol).
pub fn classify(bytes: &[u8]) -> Option<Tag> {
    use crate::wire::{self, DatagramType, ObjectKind, Packet};
    let packet = Packet::new_checked(bytes).ok()?;
    if packet.datagram_type() != DatagramType::Symbol {
        return None;
    }
    let symbol = wire::symbol::Packet::new_checked(packet.body()).ok()?;
    let block = match symbol.object() {
        ObjectKind::Chunks => Some(symbol.sbn()),
        ObjectKind::Manifest => None,
    };
    Some(Tag {
        stream: stream_of(packet.group_id(), packet.spi()),
        seq: packet.seq(),
        block,
    })
}

/// The stream of a group's Rekey SA, as tags and interests name it.
fn stream_of(group_id: u32, spi: u32) -> u64 {
    (u64::from(group_id) << 32) | u64::from(spi)
}

/// What a member's session drops unread, as an interest.
fn member_interest(member: &MemberEndpoint) -> Interest {
    match member.session().drop_filter() {
        Some(filter) => Interest::From {
            stream: stream_of(filter.group_id, filter.spi),
            seq: filter.next_seq,
            block: filter.own_block,
        },
        None => Interest::All,
    }
}

/// How many members are admitted (or bootstrapped) between two [`ScenarioConfig::progress`]
/// calls.
pub const PROGRESS_MEMBERS: usize = 50_000;

/// Where a scenario run is, handed to [`ScenarioConfig::progress`].
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// What the run is doing: `"admitting"`, `"bootstrapping"`, `"running"` (at each new
    /// second of virtual time) or `"tick"` (at every other service tick while running: a
    /// callback that prints should rate-limit these by the wall clock).
    pub phase: &'static str,
    /// Virtual time since the start.
    pub virtual_time: Duration,
    /// Messages asked for so far.
    pub messages: u64,
    /// Member nodes added so far.
    pub members_added: usize,
    /// Datagrams handed to nodes so far (since the last reset of the network's counters).
    pub delivered: u64,
    /// Datagrams in flight.
    pub in_flight: usize,
    /// Copies skipped by filtered deliveries so far ([`NetworkStats::filtered`]).
    pub filtered: u64,
}

/// When the GCKS crashes and how long it stays down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcksRestart {
    /// The message after which it crashes: 0 for the admitting message, `k` for rekey `k`.
    pub rekey: usize,
    /// How long after that message was asked for (it is then still being sent or repaired).
    pub after: Duration,
    /// How long it stays down before a new endpoint is restored from the storage; `after +
    /// down` must be shorter than the rekey interval.
    pub down: Duration,
}

/// When and how the GCKS replaces its signing key (the endpoint's
/// [`GcksEndpoint::roll_signing_key`]); the next key is drawn from the scenario's seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigningKeyRoll {
    /// The message after which the rollover starts: 0 for the admitting message, `k` for
    /// rekey `k` (a GCKS restart at the same rekey comes after it).
    pub rekey: usize,
    /// Planned (announced) or compromised (unannounced).
    pub mode: RolloverMode,
}

/// How a hostile resync endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostility {
    /// Every item and state answer with one bit flipped (in the chunk, and in the manifest of
    /// a state answer).
    Tamper,
    /// Random bytes of the same lengths in place of every manifest and chunk.
    Garbage,
    /// Nothing at all: the fetch runs into its deadline.
    Stall,
    /// Honest items, one per this interval: the fetch runs into its deadline with part of
    /// the answer delivered.
    Drip(Duration),
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
            resync_timeout: Duration::from_secs(10),
            service_tick: Duration::from_millis(5),
            bootstrap_initial: false,
            bootstrap_relays: false,
            relays: 0,
            relay_downlink: LinkConfig::lossy(super::Loss::None, Duration::from_millis(5)),
            relay_uplink: LinkConfig::lossy(super::Loss::None, Duration::from_millis(1)),
            relay_cut_through: true,
            kill_relay: None,
            kill_relay_after: None,
            member_failover: false,
            failover: FailoverConfig::default(),
            durable: false,
            persist_member_keys: false,
            restart_gcks: None,
            roll_signing_key: None,
            hostile_relay: None,
            progress: None,
            deliveries: Deliveries::Streams,
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
    /// The GCKS endpoint could not be set up or restored.
    #[error(transparent)]
    Gcks(#[from] GcksSetupError),
    /// The degree is not 2..=16.
    #[error("invalid tree degree {0}")]
    Degree(u8),
    /// A scenario field is out of range.
    #[error("invalid scenario: {0}")]
    Invalid(&'static str),
}

/// What a scenario did, from the endpoints' own counters and events.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// Messages asked for (the first one, which admits the initial members, included).
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
    /// The sender's counters (over every GCKS endpoint of the run, if it restarted).
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
    /// The members' resync policies' counters, summed (members that left included).
    pub resync: ResyncCounters,
    /// What the members' nodes did (fetches, items delivered, hostile items), summed.
    pub member_nodes: EndpointNodeCounters,
    /// The network's counters.
    pub network: NetworkStats,
    /// The round-trip time of the member paths, for expressing times in GRTTs.
    pub path_rtt: Duration,
    /// The sender's GRTT estimate at the end.
    pub grtt_estimate: Duration,
    /// The relays' side of the run (all zero without relays).
    pub relays: RelayReport,
    /// The GCKS's side of the run.
    pub gcks: GcksReport,
    /// How many block-rounds drew each number of NACKs at the (last) GCKS
    /// ([`crate::session::SenderSession::nacks_per_lost_block`]; empty without a GCKS).
    pub nacks_per_lost_block: Vec<u64>,
    /// Unicast chunk repairs the (last) GCKS sent.
    pub chunk_repairs_sent: u64,
    /// Where members received from, their moves and the killed relay's members' recovery.
    pub failover: FailoverReport,
    /// Each final member's outcome, by slot (the order members were added).
    pub member_outcomes: Vec<MemberOutcome>,
}

/// How one final member of a scenario ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberOutcome {
    /// The last message it applied.
    pub last_seq: u64,
    /// Its group key's version, and the first bytes of the key (none without a key).
    pub group_key: Option<(u32, [u8; 8])>,
    /// Messages it applied from its own source symbol, from a decoded block, by resync.
    pub applied: [u64; 3],
    /// NACKs it sent.
    pub nacks_sent: u64,
    /// Times it found itself out of sync.
    pub out_of_sync: u64,
    /// Signature checks it made.
    pub signature_checks: u64,
}

/// Members' relays and failover in a scenario.
#[derive(Debug, Clone, Default)]
pub struct FailoverReport {
    /// The final members on each relay at the end, by relay index (with failover, where each
    /// member then receives from; without, where it was placed).
    pub members_per_relay: Vec<usize>,
    /// Final members on the GCKS's contact (failover's last resort) or with no relay.
    pub members_on_gcks: usize,
    /// The members' failover counters, summed (final members).
    pub moves: FailoverCounters,
    /// Members on the killed relay when it died.
    pub killed_relay_members: usize,
    /// The longest wait of the killed relay's members (those still in the group) for a
    /// message, over the message in flight at the kill (from the kill) and every later one
    /// (from its asking, to a service tick), until all of them held it. `None`: no kill, or
    /// one such message not held by all of them within the run.
    pub kill_to_current: Option<Duration>,
    /// Fetches (resync or state) members sent to the GCKS's endpoint, and to relays'.
    pub member_fetches_to_gcks: u64,
    /// See `member_fetches_to_gcks`.
    pub member_fetches_to_relays: u64,
    /// Of the fetches to the GCKS, those the killed relay's members sent while one of them
    /// still lacked a message from the one in flight at the kill on (see `kill_to_current`).
    pub killed_members_fetches_to_gcks: u64,
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

/// What the GCKS endpoint and its storage did.
#[derive(Debug, Clone, Copy, Default)]
pub struct GcksReport {
    /// The latest message's sequence number at the end.
    pub latest_seq: u64,
    /// Times the GCKS was restored from its storage.
    pub restarts: u64,
    /// The highest sequence number committed to the storage (0 without persistence).
    pub committed_seq: u64,
    /// Commits that reused a sequence number committed before (0 for a correct GCKS).
    pub reused_seqs: u64,
    /// Joins the GCKS refused or could not answer with a bundle.
    pub join_failures: u64,
    /// Batches whose message could not be built or committed (each attempt counts).
    pub batch_failures: u64,
    /// Whether the GCKS poisoned itself.
    pub poisoned: bool,
    /// Whether the message the GCKS crashed after ([`ScenarioConfig::restart_gcks`]) had
    /// finished its initial transmission when it crashed; `None` without a crash.
    pub crashed_after_sent: Option<bool>,
    /// Members whose saved keys (with [`ScenarioConfig::persist_member_keys`]) are not those
    /// of the latest message at the end, or do not load.
    pub stale_saved_keys: usize,
    /// The GCKS's signing key at the end (its public key).
    pub signing_key: [u8; 32],
    /// Members at the end whose verifier trusts the GCKS's signing key of the end.
    pub members_on_signing_key: usize,
    /// Members (current and departed) told to re-register because a message they needed was
    /// signed with a key no message they received announced.
    pub reregister_unknown_key: u64,
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

/// The GCKS endpoint of a scenario; its tickets are the rekey numbers.
pub type SimGcks = GcksEndpoint<u64>;

/// A node of a rekey scenario.
#[derive(Debug)]
pub enum SimNode {
    /// The GCKS.
    Gcks(Box<EndpointNode<SimGcks>>),
    /// A member.
    Member(Box<MemberNode>),
    /// A relay.
    Relay(Box<EndpointNode<RelayEndpoint>>),
}

/// A member's node with what the scenario records about it.
#[derive(Debug)]
pub struct MemberNode {
    /// The member's endpoint as a node.
    pub node: EndpointNode<MemberEndpoint>,
    /// The member's index among the initial members, `None` for a later joiner.
    pub initial_index: Option<usize>,
    /// The first message the member needed.
    pub first_seq: u64,
    /// Its saved keys, when it persists them.
    storage: Option<SharedStorage<MemMemberStorage>>,
}

impl SimNode {
    /// What the node serves resync from: the GCKS's history or a relay's.
    fn resync_source(&self) -> Option<&dyn ResyncSource> {
        match self {
            Self::Gcks(node) => node.endpoint().resync_source(),
            Self::Relay(node) => node.endpoint().resync_source(),
            Self::Member(_) => None,
        }
    }

    /// Puts an item of a fetch the node asked for into its inbox.
    fn deliver(&mut self, at: Instant, request: &FetchRequest, item: Fetched, hostile: bool) {
        match self {
            Self::Member(member) => member.node.deliver_fetched(at, request.id, item, hostile),
            Self::Relay(relay) => relay.deliver_fetched(at, request.id, item, hostile),
            Self::Gcks(gcks) => gcks.deliver_fetched(at, request.id, item, hostile),
        }
    }
}

impl Node for SimNode {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        match self {
            Self::Gcks(node) => node.handle_datagram(now, from, bytes),
            Self::Member(member) => member.node.handle_datagram(now, from, bytes),
            Self::Relay(node) => node.handle_datagram(now, from, bytes),
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Self::Gcks(node) => node.handle_timeout(now),
            Self::Member(member) => member.node.handle_timeout(now),
            Self::Relay(node) => node.handle_timeout(now),
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        match self {
            Self::Gcks(node) => node.poll_transmit(now, buf),
            Self::Member(member) => member.node.poll_transmit(now, buf),
            Self::Relay(node) => node.poll_transmit(now, buf),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Gcks(node) => node.poll_timeout(),
            Self::Member(member) => member.node.poll_timeout(),
            Self::Relay(node) => node.poll_timeout(),
        }
    }

    fn interest(&self) -> Interest {
        match self {
            Self::Member(member) => member.node.interest(),
            Self::Gcks(_) | Self::Relay(_) => Interest::All,
        }
    }
}

/// What the endpoints' hooks record for the scenario.
#[derive(Debug, Default)]
struct Shared {
    queued_at: BTreeMap<u64, Instant>,
    time_to_key_us: Vec<u64>,
    out_of_sync: Vec<(Option<usize>, u64)>,
    /// Bundles the GCKS answered joins with, not yet admitted.
    bundles: Vec<RegistrationBundle>,
    join_failures: u64,
    batch_failures: u64,
    /// Messages whose initial transmission is done.
    sent: BTreeSet<u64>,
    poisoned: bool,
    /// Fetches asked for and not answered yet: (asking node, when, request).
    fetches: Vec<(NodeId, Instant, FetchRequest)>,
}

/// Runs a scenario to its end and reports.
pub fn run(config: &ScenarioConfig) -> Result<ScenarioReport, ScenarioError> {
    Scenario::new(config)?.run()
}

struct Scenario<'c> {
    config: &'c ScenarioConfig,
    net: Network<SimNode>,
    gcks: NodeId,
    gcks_config: GcksEndpointConfig,
    signing_key: SigningKey,
    /// The key of a rollover under way ([`ScenarioConfig::roll_signing_key`]).
    next_signing_key: Option<SigningKey>,
    /// Members told to re-register for a key they were never told of (departed ones).
    reregister_unknown_key: u64,
    storage: SharedStorage<MemGcksStorage>,
    /// The counters of GCKS endpoints that crashed, and of the bootstrap (subtracted).
    sender_base: SenderCounters,
    sender_bootstrap: SenderCounters,
    repair_orders_base: u64,
    restarts: u64,
    crashed_after_sent: Option<bool>,
    /// The relays' nodes, by relay index.
    relays: Vec<NodeId>,
    relays_killed: usize,
    /// The relay each member node was placed behind.
    placed: HashMap<NodeId, usize>,
    /// The failover figures being gathered.
    failover: FailoverReport,
    /// When the relay was killed, and its members then.
    killed: Option<(Instant, Vec<NodeId>)>,
    /// Messages the killed relay's members do not all hold yet: (since, seq).
    kill_pending: Vec<(Instant, u64)>,
    /// The latest message watched so, and the waits of those all held.
    kill_watched_seq: u64,
    kill_waits: Vec<Duration>,
    /// Member slots: (member id, node id); a slot is never reused.
    slots: Vec<(MemberId, NodeId)>,
    /// Slots of current members.
    current: Vec<usize>,
    shared: Rc<RefCell<Shared>>,
    rng: ChaCha8Rng,
    /// Draws the hostile endpoint's garbage (apart, so it does not shift the scenario's own
    /// draws).
    hostile_rng: ChaCha8Rng,
    next_member_id: u64,
    /// Counters of members that left (their nodes are gone).
    departed: ReceiverCounters,
    departed_signatures: (u64, u64),
    departed_resync: ResyncCounters,
    departed_nodes: EndpointNodeCounters,
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
        if let Some(restart) = config.restart_gcks {
            if !config.durable {
                return Err(ScenarioError::Invalid(
                    "a GCKS restart needs durable storage",
                ));
            }
            if restart.after + restart.down >= config.rekey_interval {
                return Err(ScenarioError::Invalid(
                    "a GCKS restart must end before the next rekey",
                ));
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let signing_key = SigningKey::from_bytes(&rng.gen());
        let degree =
            Degree::new(config.degree).map_err(|_| ScenarioError::Degree(config.degree))?;
        let gcks_config = GcksEndpointConfig {
            group_id: GROUP_ID,
            spi: SPI,
            degree,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            data_sa_lifetime_secs: 3600,
            lifetimes: Default::default(),
            sender: config.sender.clone(),
            message: config.message,
            // Batches only when the scenario asks (RekeyNow), as the old fixed schedule did.
            schedule: Schedule::new(Duration::from_secs(10 * 365 * 24 * 3600), usize::MAX),
            admission_delay: Duration::ZERO,
            durable: config.durable,
        };
        let tree_rng = KeyRng::seeded_for_simulation(rng.gen());
        let mut net = Network::with_config(super::NetworkConfig::new(rng.gen()))?;
        match config.deliveries {
            Deliveries::Streams => {}
            Deliveries::PerPacket => net.per_packet_draws()?,
            Deliveries::Filtered => net.filter_deliveries(classify)?,
        }
        let start = net.start();
        let instance: u32 = rng.gen();
        let hostile_rng = ChaCha8Rng::seed_from_u64(rng.gen());
        let clock = WallClock {
            unix_micros: 0,
            at: start,
        };
        let endpoint = GcksEndpoint::new(
            gcks_config.clone(),
            signing_key.clone(),
            tree_rng,
            instance,
            clock,
            start,
        )?;
        let shared = Rc::new(RefCell::new(Shared::default()));
        let storage = SharedStorage(Rc::new(RefCell::new(MemGcksStorage::new(
            config.sender.history,
        ))));
        let node = gcks_node(endpoint, &storage, &shared, next_id(&net)?);
        let gcks = net.add_node(
            SimNode::Gcks(Box::new(node)),
            config.sender_link.clone(),
            config.sender_link.clone(),
        )?;
        Ok(Self {
            config,
            net,
            gcks,
            gcks_config,
            signing_key,
            next_signing_key: None,
            reregister_unknown_key: 0,
            storage,
            sender_base: SenderCounters::default(),
            sender_bootstrap: SenderCounters::default(),
            repair_orders_base: 0,
            restarts: 0,
            crashed_after_sent: None,
            relays: Vec::new(),
            relays_killed: 0,
            placed: HashMap::new(),
            failover: FailoverReport::default(),
            killed: None,
            kill_pending: Vec::new(),
            kill_watched_seq: 0,
            kill_waits: Vec::new(),
            slots: Vec::new(),
            current: Vec::new(),
            shared,
            rng,
            hostile_rng,
            next_member_id: 0,
            departed: ReceiverCounters::default(),
            departed_signatures: (0, 0),
            departed_resync: ResyncCounters::default(),
            departed_nodes: EndpointNodeCounters::default(),
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
        let initial: Vec<MemberId> = (0..self.config.members)
            .map(|_| self.new_member_id())
            .collect();
        self.rekey(&relays, &initial, &[], true)?;
        self.roll_if_due(0)?;
        let mut spent = self.restart_if_due(0)?;
        for rekey in 1..=self.config.rekeys {
            self.advance(self.config.rekey_interval.saturating_sub(spent))?;
            let kill = self
                .config
                .kill_relay
                .filter(|&(_, at)| at == rekey)
                .map(|(index, _)| index);
            if let (Some(index), None) = (kill, self.config.kill_relay_after) {
                self.kill_relay(index)?;
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
            self.rekey(&[], &joins, &leaves, false)?;
            self.roll_if_due(rekey)?;
            spent = self.restart_if_due(rekey)?;
            if let (Some(index), Some(after)) = (kill, self.config.kill_relay_after) {
                self.advance(after)?;
                self.kill_relay(index)?;
                spent += after;
            }
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

    /// Crashes and restores the GCKS if the configuration says so after message `rekey`;
    /// returns the time that took from the rekey interval.
    fn restart_if_due(&mut self, rekey: usize) -> Result<Duration, ScenarioError> {
        let Some(restart) = self.config.restart_gcks.filter(|r| r.rekey == rekey) else {
            return Ok(Duration::ZERO);
        };
        self.advance(restart.after)?;
        let seq = self.latest_seq();
        self.crashed_after_sent = Some(self.shared.borrow().sent.contains(&seq));
        // The process dies: what was not stored is gone.
        if let Some(SimNode::Gcks(old)) = self.net.remove_node(self.gcks)? {
            let stats = old.endpoint().stats();
            add_sender_counters(&mut self.sender_base, &stats.sender);
            self.repair_orders_base += stats.repair_orders;
        }
        self.advance(restart.down)?;
        let now = self.net.now();
        let restored = self
            .storage
            .0
            .borrow_mut()
            .restored(KeyRng::seeded_for_simulation(self.rng.gen()))
            .ok_or(ScenarioError::Invalid(
                "the GCKS crashed before its first commit",
            ))?;
        let clock = WallClock {
            unix_micros: session::micros(now.saturating_duration_since(self.net.start())),
            at: now,
        };
        // The stored tree names the key that signed its message: a rollover that took effect
        // before the crash restarts under the next key, as the engine's key files do.
        let stored_key = restored.tree.rekey_sa().gcks_public_key;
        if let Some(next) = self
            .next_signing_key
            .take_if(|next| next.verifying_key() == stored_key)
        {
            self.signing_key = next;
        }
        let mut endpoint = GcksEndpoint::restore(
            self.gcks_config.clone(),
            self.signing_key.clone(),
            restored,
            self.rng.gen(),
            clock,
            now,
        )?;
        if let Some(next) = &self.next_signing_key {
            // Announced and not yet in effect: resumed (else it was never announced).
            if endpoint.resume_rollover(now, next.clone()).is_err() {
                self.next_signing_key = None;
            }
        }
        let node = gcks_node(endpoint, &self.storage, &self.shared, self.gcks);
        self.net
            .replace_node(self.gcks, SimNode::Gcks(Box::new(node)))?;
        self.net.touch(self.gcks)?;
        self.restarts += 1;
        Ok(restart.after + restart.down)
    }

    /// Starts the GCKS's signing-key rollover if the configuration says so after message
    /// `rekey`.
    fn roll_if_due(&mut self, rekey: usize) -> Result<(), ScenarioError> {
        let Some(roll) = self.config.roll_signing_key.filter(|r| r.rekey == rekey) else {
            return Ok(());
        };
        let next = SigningKey::from_bytes(&self.rng.gen());
        let now = self.net.now();
        let Some(SimNode::Gcks(node)) = self.net.node_mut(self.gcks) else {
            return Err(ScenarioError::Invalid("no GCKS to roll the signing key of"));
        };
        node.endpoint_mut()
            .roll_signing_key(now, next.clone(), roll.mode)
            .map_err(|_| ScenarioError::Invalid("the GCKS refused the rollover"))?;
        node.pump(now);
        self.net.touch(self.gcks)?;
        self.next_signing_key = Some(next);
        Ok(())
    }

    /// Relay `index` dies: its node is removed for good; its members are watched until they
    /// hold the latest message.
    fn kill_relay(&mut self, index: usize) -> Result<(), ScenarioError> {
        let Some(&id) = self.relays.get(index) else {
            return Ok(());
        };
        self.net.remove_node(id)?;
        self.relays_killed += 1;
        let members: Vec<NodeId> = self
            .current
            .iter()
            .map(|&slot| self.slots[slot].1)
            .filter(|&node| self.relay_of(node) == Some(index))
            .collect();
        self.failover.killed_relay_members = members.len();
        let now = self.net.now();
        let latest = self.latest_seq();
        self.killed = Some((now, members));
        self.kill_pending.push((now, latest));
        self.kill_watched_seq = latest;
        Ok(())
    }

    /// The relay member `node` receives from: where failover has it, or where it was placed.
    fn relay_of(&self, node: NodeId) -> Option<usize> {
        match self.net.node(node) {
            Some(SimNode::Member(member)) if self.config.member_failover => {
                member.node.endpoint().figures().relay.map(usize::from)
            }
            Some(SimNode::Member(_)) => self.placed.get(&node).copied(),
            _ => None,
        }
    }

    /// Members that moved listen to their new contact's group from now on; the killed
    /// relay's members are checked for the latest message.
    fn follow_failover(&mut self) -> Result<(), ScenarioError> {
        if self.config.member_failover {
            for &slot in &self.current {
                let id = self.slots[slot].1;
                let attachment = match self.net.node_mut(id) {
                    Some(SimNode::Member(member)) => member.node.endpoint_mut().poll_attachment(),
                    _ => None,
                };
                if let Some(attachment) = attachment {
                    let group = group_number(attachment.contact.group);
                    self.net.set_groups(id, group, group)?;
                }
            }
        }
        if let Some((_, members)) = &self.killed {
            let now = self.net.now();
            let latest = self.latest_seq();
            if latest > self.kill_watched_seq {
                self.kill_pending.push((now, latest));
                self.kill_watched_seq = latest;
            }
            // The oldest next message any of them lacks.
            let lowest = members
                .iter()
                .filter_map(|&id| match self.net.node(id) {
                    Some(SimNode::Member(member)) => {
                        Some(member.node.endpoint().session().next_seq())
                    }
                    _ => None,
                })
                .min()
                .unwrap_or(u64::MAX);
            let waits = &mut self.kill_waits;
            self.kill_pending.retain(|&(since, seq)| {
                let held = lowest > seq;
                if held {
                    waits.push(now - since);
                }
                !held
            });
        }
        Ok(())
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

    /// Submits a batch to the GCKS and asks for it now; admits the joiners it answers as new
    /// nodes (relays first), before its message goes out.
    fn rekey(
        &mut self,
        relays: &[MemberId],
        joins: &[MemberId],
        leaves: &[MemberId],
        initial: bool,
    ) -> Result<(), ScenarioError> {
        let mut changes: Vec<Change> = leaves.iter().map(|&m| Change::Leave(m)).collect();
        changes.extend(relays.iter().map(|&m| Change::JoinRelay(m)));
        changes.extend(joins.iter().map(|&m| Change::Join(m)));
        let ticket = self.messages;
        let now = self.net.now();
        // Not `with_node`: its transmits are drained only once the joiners are in the
        // network. With no admission delay the message is queued within the command, and the
        // joiners (who join the multicast group the instant they have their bundle here) must
        // not miss its first datagrams.
        match self.net.node_mut(self.gcks) {
            Some(SimNode::Gcks(gcks)) => {
                let slices = changes.len() / ANSWER_SLICE + 2;
                gcks.command(now, GcksCommand::Changes { changes, ticket });
                gcks.command(now, GcksCommand::RekeyNow);
                // A big batch's answers come a slice at a time, the next slice due at once:
                // take them all at this instant, as the driver's next turns would.
                for _ in 0..slices {
                    match gcks.poll_timeout() {
                        Some(at) if at <= now => gcks.handle_timeout(now),
                        _ => break,
                    }
                }
            }
            _ => {
                return Err(ScenarioError::Invalid(
                    "a rekey fell while the GCKS was down",
                ))
            }
        }
        self.messages += 1;
        let mut bundles: HashMap<MemberId, RegistrationBundle> =
            std::mem::take(&mut self.shared.borrow_mut().bundles)
                .into_iter()
                .map(|bundle| (bundle.member, bundle))
                .collect();
        let bootstrap = initial && self.config.bootstrap_initial;
        let late_relays = bootstrap && self.config.bootstrap_relays;
        let relay_bundles: Vec<RegistrationBundle> = relays
            .iter()
            .filter_map(|member| bundles.remove(member))
            .collect();
        if !late_relays {
            for bundle in &relay_bundles {
                self.add_relay(bundle)?;
            }
        }
        let joiners: Vec<(Option<usize>, RegistrationBundle)> = joins
            .iter()
            .enumerate()
            .filter_map(|(i, member)| Some((initial.then_some(i), bundles.remove(member)?)))
            .collect();
        if bootstrap {
            self.net.touch(self.gcks)?;
            let late = if late_relays {
                relay_bundles
            } else {
                Vec::new()
            };
            return self.bootstrap(joiners, late);
        }
        for (initial_index, bundle) in joiners {
            self.add_member(&bundle, initial_index)?;
            if self.slots.len() % PROGRESS_MEMBERS == 0 {
                self.progress("admitting");
            }
        }
        self.net.touch(self.gcks)?;
        Ok(())
    }

    /// The initial members come in once the admitting message was sent to nobody but the
    /// relays (or to nobody, with [`ScenarioConfig::bootstrap_relays`]: then `late_relays`
    /// come in first and take their chunks the same way), and each takes its chunk from the
    /// GCKS's history through its endpoint's own resync command; that message's traffic is
    /// not counted. (Multicasting a message of
    /// tens of thousands of chunks to 100,000 simulated members costs billions of
    /// deliveries.)
    fn bootstrap(
        &mut self,
        joiners: Vec<(Option<usize>, RegistrationBundle)>,
        late_relays: Vec<RegistrationBundle>,
    ) -> Result<(), ScenarioError> {
        let seq = self.latest_seq();
        let deadline = self.net.now() + self.config.settle;
        while !self.shared.borrow().sent.contains(&seq) && self.net.now() < deadline {
            self.advance(self.config.service_tick)?;
        }
        // Relays that come in late take their chunk as the members do, before any member is
        // behind them: they neither hold nor forward the admitting message.
        for bundle in &late_relays {
            let id = self.add_relay(bundle)?;
            let order_key = match self.net.node(id) {
                Some(SimNode::Relay(relay)) => relay.endpoint().session().order_key(),
                _ => continue,
            };
            let Some(item) = self.gcks_resync_item(seq, order_key) else {
                continue;
            };
            self.net.with_node(id, |node, now| {
                if let SimNode::Relay(relay) = node {
                    let _ = relay
                        .endpoint_mut()
                        .apply_resync(now, std::slice::from_ref(&item));
                    relay.pump(now);
                }
            });
        }
        // The bootstrap's own key events are not time-to-key samples.
        self.shared.borrow_mut().queued_at.remove(&seq);
        for (initial_index, bundle) in joiners {
            let id = self.add_member(&bundle, initial_index)?;
            let order_key = match self.net.node(id) {
                Some(SimNode::Member(member)) => member.node.endpoint().session().order_key(),
                _ => continue,
            };
            let item = self.gcks_resync_item(seq, order_key);
            let Some(item) = item else {
                continue;
            };
            let applied = self.net.with_node(id, |node, now| match node {
                SimNode::Member(member) => {
                    let applied = member
                        .node
                        .endpoint_mut()
                        .apply_resync(now, std::slice::from_ref(&item))
                        .is_ok();
                    member.node.pump(now);
                    applied
                }
                _ => false,
            });
            if applied == Some(true) {
                self.bootstrapped += 1;
            }
            if self.slots.len() % PROGRESS_MEMBERS == 0 {
                self.progress("bootstrapping");
            }
        }
        if let Some(SimNode::Gcks(gcks)) = self.net.node(self.gcks) {
            self.sender_bootstrap = gcks.endpoint().stats().sender;
        }
        self.net.reset_stats();
        Ok(())
    }

    /// The resync policy's settings for a member behind `relay` (or a relay, with `None`).
    fn resync_config(&self, relay: Option<NodeId>, group_size: u32) -> ResyncConfig {
        let endpoint = |addr| ResyncEndpoint {
            protocol: ResyncProtocol::Tcp,
            addr,
        };
        let spread = self.config.resync_spread.as_secs_f64();
        // The whole initial group spreads over `resync_spread`.
        let capacity = if spread > 0.0 {
            self.config.members.max(1) as f64 / spread
        } else {
            f64::MAX
        };
        ResyncConfig {
            relays: relay
                .map(|id| endpoint(self.net.addr(id)))
                .into_iter()
                .collect(),
            gcks: vec![endpoint(self.net.addr(self.gcks))],
            fetch_timeout: self.config.resync_timeout,
            group_size,
            capacity,
            max_spread: self.config.resync_spread,
            ..ResyncConfig::default()
        }
    }

    /// The directory a member placed behind relay `first` gets: that relay, the live relays
    /// after it (wrapping), the GCKS.
    fn directory(&self, first: usize) -> RelayDirectory {
        let endpoint = |addr| ResyncEndpoint {
            protocol: ResyncProtocol::Tcp,
            addr,
        };
        let count = self.relays.len();
        let relays = (0..count)
            .map(|k| (first + k) % count)
            .filter(|&index| self.net.is_present(self.relays[index]))
            .map(|index| {
                let addr = self.net.addr(self.relays[index]);
                RelayContact {
                    id: u16::try_from(index).unwrap_or(u16::MAX),
                    group: group_addr(relay_group(index)),
                    feedback: addr,
                    resync: vec![endpoint(addr)],
                }
            })
            .collect();
        let gcks = self.net.addr(self.gcks);
        RelayDirectory {
            relays,
            gcks: Some(RelayContact {
                id: 0,
                group: group_addr(0),
                feedback: gcks,
                resync: vec![endpoint(gcks)],
            }),
        }
    }

    /// The group size the GCKS's committed tree holds.
    fn group_size(&self) -> u32 {
        match self.net.node(self.gcks) {
            Some(SimNode::Gcks(gcks)) => {
                u32::try_from(gcks.endpoint().tree().member_count()).unwrap_or(u32::MAX)
            }
            _ => 1,
        }
    }

    fn add_relay(&mut self, bundle: &RegistrationBundle) -> Result<NodeId, ScenarioError> {
        let now = self.net.now();
        let upstream = self.net.addr(self.gcks);
        let group_size = self.group_size();
        let mut session = RelayConfig::new(upstream);
        session.upstream = self.config.receiver.clone();
        session.upstream.feedback_addr = upstream;
        session.upstream.scheduler.group_size = group_size;
        session.upstream.scheduler.seed = self.rng.gen();
        session.downstream = self.config.sender.clone();
        session.cut_through = self.config.relay_cut_through;
        let per_relay = self.config.members.div_ceil(self.config.relays.max(1));
        session.downstream_group_size = Some(u32::try_from(per_relay.max(1)).unwrap_or(1));
        let config = RelayEndpointConfig {
            session,
            resync: self.resync_config(None, group_size),
            persistent: false,
        };
        let index = self.relays.len();
        let endpoint = RelayEndpoint::new(bundle, config, now).map_err(|e| match e {
            crate::relay::RelayError::Config(e) => ScenarioError::Config(e),
            _ => ScenarioError::Invalid("relay could not start"),
        })?;
        let id = next_id(&self.net)?;
        let ports = PortMap {
            default: Port::Serve,
            upstream: Some(upstream),
            group: None,
        };
        let node = EndpointNode::new(
            endpoint,
            Box::new(NoStorage),
            ports,
            Box::new(|_, _| {}),
            fetch_hook(&self.shared, id),
        )
        .with_progress(|relay| relay.session().next_seq());
        let added = self.net.add_node(
            SimNode::Relay(Box::new(node)),
            self.config.relay_uplink.clone(),
            self.config.relay_downlink.clone(),
        )?;
        debug_assert_eq!(added, id);
        // The relay listens to the GCKS's group (0) and sends into its own.
        self.net.set_groups(id, relay_group(index), 0)?;
        self.net.touch(id)?;
        self.relays.push(id);
        Ok(id)
    }

    fn add_member(
        &mut self,
        bundle: &RegistrationBundle,
        initial_index: Option<usize>,
    ) -> Result<NodeId, ScenarioError> {
        let now = self.net.now();
        let slot = self.slots.len();
        let relay = self.relay_for_joiner(slot);
        let relay_index = relay.and_then(|r| self.relays.iter().position(|&x| x == r));
        let group_size = self.group_size();
        let mut receiver = self.config.receiver.clone();
        receiver.feedback_addr = relay.map_or(self.net.addr(self.gcks), |id| self.net.addr(id));
        receiver.scheduler.group_size = group_size;
        receiver.scheduler.seed = self.rng.gen();
        let group = group_addr(relay_index.map_or(0, relay_group));
        let directory = match relay_index {
            Some(first) if self.config.member_failover => self.directory(first),
            _ => RelayDirectory::default(),
        };
        let config = MemberEndpointConfig {
            group,
            receiver,
            resync: self.resync_config(relay, group_size),
            persist_keys: self.config.persist_member_keys,
            directory,
            failover: self.config.failover.clone(),
            key_life: Default::default(),
        };
        let endpoint = MemberEndpoint::new(
            bundle,
            config,
            ChaCha8Rng::seed_from_u64(self.rng.gen()),
            now,
        )?;
        let id = next_id(&self.net)?;
        let storage = self
            .config
            .persist_member_keys
            .then(|| SharedStorage(Rc::new(RefCell::new(MemMemberStorage::default()))));
        let boxed_storage: Box<dyn rekeycast_proto::endpoint::Storage<_>> = match &storage {
            Some(storage) => Box::new(storage.clone()),
            None => Box::new(NoStorage),
        };
        let ports = PortMap {
            default: Port::Listen,
            upstream: None,
            group: Some(group),
        };
        let node = EndpointNode::new(
            endpoint,
            boxed_storage,
            ports,
            member_event_hook(&self.shared, initial_index),
            fetch_hook(&self.shared, id),
        )
        .with_progress(|member| member.session().next_seq())
        .with_interest(member_interest);
        let node = SimNode::Member(Box::new(MemberNode {
            node,
            initial_index,
            first_seq: bundle.first_seq,
            storage,
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
        let added = self
            .net
            .add_node(node, self.config.member_uplink.clone(), downlink)?;
        debug_assert_eq!(added, id);
        if let Some(index) = relay_index {
            let group = relay_group(index);
            self.net.set_groups(id, group, group)?;
            self.placed.insert(id, index);
        }
        // The endpoint's first attachment is where it was placed.
        if let Some(SimNode::Member(member)) = self.net.node_mut(id) {
            member.node.endpoint_mut().poll_attachment();
        }
        self.net.touch(id)?;
        self.slots.push((bundle.member, id));
        self.current.push(slot);
        Ok(id)
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
        let session = member.node.endpoint().session();
        let c = session.counters();
        add_counters(&mut self.departed, c);
        let m = session.message_counters();
        self.departed_signatures.0 += m.signature_checks;
        self.departed_signatures.1 += m.signature_failures;
        add_resync_counters(
            &mut self.departed_resync,
            member.node.endpoint().policy().counters(),
        );
        add_node_counters(&mut self.departed_nodes, member.node.counters());
        // A departing member may leave in the middle of the latest message (its departure is
        // decided by the next batch, not by its progress): what it applied is what it needed.
        self.member_messages += c.messages_applied;
        self.must_reregister += u64::from(session.must_reregister());
        self.reregister_unknown_key += u64::from(unknown_key(session));
    }

    /// Runs the network for `duration`, answering the fetches endpoints asked for every
    /// service tick.
    fn advance(&mut self, duration: Duration) -> Result<(), ScenarioError> {
        let end = self.net.now() + duration;
        let mut now = self.net.now();
        while now < end {
            let next = (now + self.config.service_tick).min(end);
            let second = |t: Instant| t.saturating_duration_since(self.net.start()).as_secs();
            let new_second = second(next) > second(now);
            self.net.run_until(next);
            now = next;
            self.serve(now)?;
            self.follow_failover()?;
            self.progress(if new_second { "running" } else { "tick" });
        }
        Ok(())
    }

    /// Tells the progress hook where the run is.
    fn progress(&self, phase: &'static str) {
        if let Some(progress) = self.config.progress {
            progress(&Progress {
                phase,
                virtual_time: self.net.now().saturating_duration_since(self.net.start()),
                messages: self.messages,
                members_added: self.slots.len(),
                delivered: self.net.stats().delivered,
                filtered: self.net.stats().filtered,
                in_flight: self.net.in_flight(),
            });
        }
    }

    /// Answers every fetch asked for so far from the serving node's history as it stands now;
    /// the answer reaches the asking node's inbox with its arrival times.
    fn serve(&mut self, now: Instant) -> Result<(), ScenarioError> {
        let fetches = std::mem::take(&mut self.shared.borrow_mut().fetches);
        for (asker, asked_at, request) in fetches {
            let arrival = (asked_at + self.config.resync_rtt).max(now);
            let server = self.net.node_id(request.endpoint.addr);
            if matches!(self.net.node(asker), Some(SimNode::Member(_))) {
                if server == Some(self.gcks) {
                    self.failover.member_fetches_to_gcks += 1;
                    if !self.kill_pending.is_empty()
                        && self
                            .killed
                            .as_ref()
                            .is_some_and(|(_, members)| members.contains(&asker))
                    {
                        self.failover.killed_members_fetches_to_gcks += 1;
                    }
                } else {
                    self.failover.member_fetches_to_relays += 1;
                }
            }
            let hostility = self.config.hostile_relay.and_then(|(index, how)| {
                (server.is_some() && self.relays.get(index).copied() == server).then_some(how)
            });
            let answer = match server.and_then(|id| self.net.node(id)) {
                Some(node) => answer_fetch(node.resync_source(), &request),
                // Nobody listens there (a dead relay, a GCKS down): refused at once.
                None => vec![Fetched::Failed {
                    reason: FetchFailure::Connection,
                }],
            };
            let timed = self.schedule_answer(answer, arrival, &request, hostility);
            let hostile = hostility.is_some();
            if let Some(node) = self.net.node_mut(asker) {
                for (at, item) in timed {
                    node.deliver(at, &request, item, hostile);
                }
            }
            self.net.touch(asker)?;
        }
        Ok(())
    }

    /// When each item of an answer arrives: all at `arrival` from an honest endpoint; as the
    /// hostile endpoint makes it otherwise. Nothing arrives after the request's deadline:
    /// the fetch fails there, as the driver's fetch client does.
    fn schedule_answer(
        &mut self,
        answer: Vec<Fetched>,
        arrival: Instant,
        request: &FetchRequest,
        hostility: Option<Hostility>,
    ) -> Vec<(Instant, Fetched)> {
        let timed: Vec<(Instant, Fetched)> = match hostility {
            None => answer.into_iter().map(|item| (arrival, item)).collect(),
            Some(Hostility::Stall) => Vec::new(),
            Some(Hostility::Drip(interval)) => answer
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let steps = u32::try_from(i + 1).unwrap_or(u32::MAX);
                    (arrival + interval.saturating_mul(steps), item)
                })
                .collect(),
            Some(how @ (Hostility::Tamper | Hostility::Garbage)) => answer
                .into_iter()
                .map(|item| (arrival, self.corrupt(item, how)))
                .collect(),
        };
        let mut out = Vec::with_capacity(timed.len() + 1);
        for (at, item) in timed {
            if at > request.deadline {
                break;
            }
            out.push((at, item));
        }
        let ended = out
            .last()
            .is_some_and(|(_, item)| !matches!(item, Fetched::Item { .. } | Fetched::State(_)));
        if !ended {
            out.push((
                request.deadline.max(arrival),
                Fetched::Failed {
                    reason: FetchFailure::Deadline,
                },
            ));
        }
        out
    }

    /// A hostile endpoint's version of an answer's item.
    fn corrupt(&mut self, item: Fetched, how: Hostility) -> Fetched {
        let flip = |mut bytes: Vec<u8>| {
            let middle = bytes.len() / 2;
            if let Some(byte) = bytes.get_mut(middle) {
                *byte ^= 0x10;
            }
            bytes
        };
        match (item, how) {
            (Fetched::Item { manifest, chunk }, Hostility::Tamper) => Fetched::Item {
                manifest,
                chunk: flip(chunk),
            },
            (Fetched::State(manifest), Hostility::Tamper) => Fetched::State(flip(manifest)),
            (Fetched::Item { manifest, chunk }, _) => Fetched::Item {
                manifest: self.garbage(manifest.len()),
                chunk: self.garbage(chunk.len()),
            },
            (Fetched::State(manifest), _) => Fetched::State(self.garbage(manifest.len())),
            (terminal, _) => terminal,
        }
    }

    fn garbage(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.hostile_rng.gen()).collect()
    }

    /// The latest message's sequence number: the GCKS's, or what its storage committed while
    /// it is down.
    fn latest_seq(&self) -> u64 {
        match self.net.node(self.gcks) {
            Some(SimNode::Gcks(gcks)) => gcks.endpoint().tree().seq(),
            _ => self.storage.0.borrow().last_committed(),
        }
    }

    /// The resync item (manifest, chunk) of message `seq` for the leaf with `order_key`, from
    /// the GCKS's history.
    fn gcks_resync_item(&self, seq: u64, order_key: u32) -> Option<(Vec<u8>, Vec<u8>)> {
        match self.net.node(self.gcks) {
            Some(SimNode::Gcks(gcks)) => gcks
                .endpoint()
                .session()
                .resync_item(seq, order_key)
                .ok()
                .map(|item| (item.manifest.to_vec(), item.chunk.to_vec())),
            _ => None,
        }
    }

    /// Whether every current member has applied the latest message.
    fn all_current(&self) -> bool {
        let latest = self.latest_seq();
        self.current
            .iter()
            .all(|&slot| match self.net.node(self.slots[slot].1) {
                Some(SimNode::Member(member)) => {
                    member.node.endpoint().session().next_seq() > latest
                }
                _ => true,
            })
    }

    fn report(self) -> ScenarioReport {
        let latest = self.latest_seq();
        let gcks = match self.net.node(self.gcks) {
            Some(SimNode::Gcks(gcks)) => Some(gcks.endpoint()),
            _ => None,
        };
        let group_key = gcks.map(|gcks| {
            let (version, key) = gcks.tree().group_key();
            (version, key.clone())
        });
        let holds_group_key = |key: Option<&crate::lkh::member::VersionedKey>| {
            matches!((key, &group_key), (Some(k), Some((version, key)))
                if k.version == *version && k.key.as_bytes() == key.as_bytes())
        };
        let mut receivers = self.departed;
        let (mut signature_checks, mut signature_failures) = self.departed_signatures;
        let mut resync = self.departed_resync;
        let mut member_nodes = self.departed_nodes;
        let mut converged = 0;
        let mut member_messages = self.member_messages;
        let mut must_reregister = self.must_reregister;
        let mut reregister_unknown_key = self.reregister_unknown_key;
        let mut members_on_signing_key = 0;
        let gcks_key = match self.net.node(self.gcks) {
            Some(SimNode::Gcks(node)) => node.endpoint().signing_key_id(),
            _ => KeyId::of(&self.signing_key.verifying_key()),
        };
        let signing_key = [
            self.signing_key.verifying_key(),
            self.next_signing_key
                .as_ref()
                .map_or(self.signing_key.verifying_key(), SigningKey::verifying_key),
        ]
        .into_iter()
        .find(|key| KeyId::of(key) == gcks_key)
        .map_or([0; 32], |key| key.to_bytes());
        let mut stale_saved_keys = 0;
        let mut member_outcomes = Vec::with_capacity(self.current.len());
        for &slot in &self.current {
            let Some(SimNode::Member(member)) = self.net.node(self.slots[slot].1) else {
                continue;
            };
            let endpoint = member.node.endpoint();
            let session = endpoint.session();
            let counters = session.counters();
            member_outcomes.push(MemberOutcome {
                last_seq: session.keys().last_seq(),
                group_key: session.group_key().map(|k| {
                    let mut head = [0; 8];
                    head.copy_from_slice(&k.key.as_bytes()[..8]);
                    (k.version, head)
                }),
                applied: [
                    counters.applied_from_source,
                    counters.applied_from_decode,
                    counters.applied_from_resync,
                ],
                nacks_sent: counters.nacks_sent,
                out_of_sync: counters.out_of_sync,
                signature_checks: session.message_counters().signature_checks,
            });
            add_counters(&mut receivers, session.counters());
            signature_checks += session.message_counters().signature_checks;
            signature_failures += session.message_counters().signature_failures;
            add_resync_counters(&mut resync, endpoint.policy().counters());
            add_node_counters(&mut member_nodes, member.node.counters());
            member_messages += (latest + 1).saturating_sub(member.first_seq);
            must_reregister += u64::from(session.must_reregister());
            reregister_unknown_key += u64::from(unknown_key(session));
            if KeyId::of(session.gcks_signing_key()) == gcks_key {
                members_on_signing_key += 1;
            }
            if holds_group_key(session.group_key()) {
                converged += 1;
            }
            if let Some(storage) = &member.storage {
                let storage = storage.0.borrow();
                let loads = storage
                    .load()
                    .is_some_and(|keys| keys.last_seq() == session.keys().last_seq());
                if storage.saved_seq() != Some(latest) || !loads {
                    stale_saved_keys += 1;
                }
            }
        }
        // Bootstrapped applications are not member-messages of the run.
        receivers.messages_applied = receivers.messages_applied.saturating_sub(self.bootstrapped);
        receivers.applied_from_resync = receivers
            .applied_from_resync
            .saturating_sub(self.bootstrapped);
        let mut sender = self.sender_base;
        let mut repair_orders = self.repair_orders_base;
        let mut grtt_estimate = Duration::ZERO;
        let mut nacks_per_lost_block = Vec::new();
        let mut chunk_repairs_sent = 0;
        if let Some(gcks) = gcks {
            nacks_per_lost_block = gcks.session().nacks_per_lost_block();
            chunk_repairs_sent = gcks.session().chunk_repair_counters().repairs_sent;
            let stats = gcks.stats();
            add_sender_counters(&mut sender, &stats.sender);
            repair_orders += stats.repair_orders;
            grtt_estimate = gcks.session().grtt();
        }
        sub_sender_counters(&mut sender, &self.sender_bootstrap);
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
            let session = relay.endpoint().session();
            relays.forwarded += session.counters().forwarded;
            relays.not_forwarded += session.counters().not_forwarded;
            relays.upstream_nacks += session.upstream_counters().nacks_sent;
            relays.bad_chunks += session.upstream_counters().bad_chunks;
            relays.signature_checks += session.upstream_message_counters().signature_checks;
            add_sender_counters(&mut relays.downstream, session.downstream_counters());
            if holds_group_key(session.keys().group_key()) {
                relays.converged += 1;
            }
        }
        let mut failover = self.failover.clone();
        if self.killed.is_some() && self.kill_pending.is_empty() {
            failover.kill_to_current = self.kill_waits.iter().copied().max();
        }
        failover.members_per_relay = vec![0; self.relays.len()];
        for &slot in &self.current {
            let id = self.slots[slot].1;
            match self.relay_of(id) {
                Some(index) if index < self.relays.len() => failover.members_per_relay[index] += 1,
                _ => failover.members_on_gcks += 1,
            }
            if let Some(SimNode::Member(member)) = self.net.node(id) {
                let c = member.node.endpoint().figures().failover;
                failover.moves.nack_moves += c.nack_moves;
                failover.moves.silence_moves += c.silence_moves;
                failover.moves.ordered_moves += c.ordered_moves;
                failover.moves.unreachable_moves += c.unreachable_moves;
                failover.moves.moves_held += c.moves_held;
            }
        }
        let storage = self.storage.0.borrow();
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
            resync,
            member_nodes,
            network: self.net.stats().clone(),
            path_rtt,
            grtt_estimate,
            relays,
            gcks: GcksReport {
                latest_seq: latest,
                restarts: self.restarts,
                committed_seq: storage.last_committed(),
                reused_seqs: storage.reused_seqs(),
                join_failures: shared.join_failures,
                batch_failures: shared.batch_failures,
                poisoned: shared.poisoned,
                crashed_after_sent: self.crashed_after_sent,
                stale_saved_keys,
                signing_key,
                members_on_signing_key,
                reregister_unknown_key,
            },
            nacks_per_lost_block,
            chunk_repairs_sent,
            failover,
            member_outcomes,
        }
    }
}

/// The id the next node added to `net` gets (ids are handed out in order).
fn next_id(net: &Network<SimNode>) -> Result<NodeId, ScenarioError> {
    NodeId::from_index(net.id_count()).ok_or(ScenarioError::Sim(SimError::TooManyNodes))
}

/// The GCKS endpoint as node `id`, storing to `storage` and reporting to `shared`.
/// Whether `session` must re-register because a message it needed was signed with a key it
/// was never told of.
fn unknown_key(session: &session::ReceiverSession) -> bool {
    matches!(
        session.reregister_reason(),
        Some(session::ReregisterReason::UnknownSigningKey { .. })
    )
}

fn gcks_node(
    endpoint: SimGcks,
    storage: &SharedStorage<MemGcksStorage>,
    shared: &Rc<RefCell<Shared>>,
    id: NodeId,
) -> EndpointNode<SimGcks> {
    let events = Rc::clone(shared);
    let on_event = Box::new(move |now: Instant, event: GcksEvent<u64>| {
        let mut shared = events.borrow_mut();
        match event {
            GcksEvent::JoinAnswered { result, .. } => match result {
                Ok(bundle) => shared.bundles.push(bundle),
                Err(_) => shared.join_failures += 1,
            },
            // A message queued again after a restart keeps its first queueing time.
            GcksEvent::Queued { seq } => {
                shared.queued_at.entry(seq).or_insert(now);
            }
            GcksEvent::Sent { seq } => {
                shared.sent.insert(seq);
            }
            GcksEvent::Poisoned { .. } => shared.poisoned = true,
            GcksEvent::BatchFailed { .. } => shared.batch_failures += 1,
            _ => {}
        }
    });
    EndpointNode::new(
        endpoint,
        Box::new(storage.clone()),
        PortMap::on(Port::Serve),
        on_event,
        fetch_hook(shared, id),
    )
}

/// Records node `id`'s fetches for the scenario to answer.
fn fetch_hook(shared: &Rc<RefCell<Shared>>, id: NodeId) -> Box<dyn FnMut(Instant, FetchRequest)> {
    let shared = Rc::clone(shared);
    Box::new(move |now, request| shared.borrow_mut().fetches.push((id, now, request)))
}

/// Records a member's key updates (time to key) and out-of-sync reports.
fn member_event_hook(
    shared: &Rc<RefCell<Shared>>,
    initial_index: Option<usize>,
) -> Box<dyn FnMut(Instant, ReceiverEvent)> {
    let shared = Rc::clone(shared);
    Box::new(move |now, event| {
        let mut shared = shared.borrow_mut();
        match event {
            ReceiverEvent::GroupKeyUpdated { seq, .. } => {
                if let Some(queued) = shared.queued_at.get(&seq) {
                    let us = now.saturating_duration_since(*queued).as_micros();
                    let us = u64::try_from(us).unwrap_or(u64::MAX);
                    shared.time_to_key_us.push(us);
                }
            }
            ReceiverEvent::OutOfSync { from_seq } => {
                shared.out_of_sync.push((initial_index, from_seq));
            }
            _ => {}
        }
    })
}

/// The simulated multicast group relay `index` sends into (the GCKS's is 0).
fn relay_group(index: usize) -> u32 {
    u32::try_from(index + 1).unwrap_or(u32::MAX)
}

/// The simulated multicast group of the address [`group_addr`] gives.
fn group_number(addr: SocketAddr) -> u32 {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            let [_, a, b, c] = ip.octets();
            u32::from_be_bytes([0, a, b, c])
        }
        std::net::IpAddr::V6(_) => 0,
    }
}

/// The address endpoints know simulated multicast group `group` by.
fn group_addr(group: u32) -> SocketAddr {
    let [_, a, b, c] = group.to_be_bytes();
    SocketAddr::from(([239, a, b, c], super::NODE_PORT))
}

/// Applies `f` to each pair of fields of two [`SenderCounters`].
fn zip_sender_counters(total: &mut SenderCounters, c: &SenderCounters, f: fn(u64, u64) -> u64) {
    total.manifests_sent = f(total.manifests_sent, c.manifests_sent);
    total.source_symbols_sent = f(total.source_symbols_sent, c.source_symbols_sent);
    total.proactive_symbols_sent = f(total.proactive_symbols_sent, c.proactive_symbols_sent);
    total.repair_symbols_sent = f(total.repair_symbols_sent, c.repair_symbols_sent);
    total.heartbeats_sent = f(total.heartbeats_sent, c.heartbeats_sent);
    total.advertisements_sent = f(total.advertisements_sent, c.advertisements_sent);
    total.bytes_sent = f(total.bytes_sent, c.bytes_sent);
    total.source_bytes_sent = f(total.source_bytes_sent, c.source_bytes_sent);
    total.nacks_received = f(total.nacks_received, c.nacks_received);
    total.probe_replies_received = f(total.probe_replies_received, c.probe_replies_received);
    total.replayed_feedback = f(total.replayed_feedback, c.replayed_feedback);
    total.stale_feedback = f(total.stale_feedback, c.stale_feedback);
    total.repair_orders = f(total.repair_orders, c.repair_orders);
    total.rejected = f(total.rejected, c.rejected);
    total.ignored = f(total.ignored, c.ignored);
    total.buffer_too_small = f(total.buffer_too_small, c.buffer_too_small);
    total.fec_errors = f(total.fec_errors, c.fec_errors);
}

fn add_sender_counters(total: &mut SenderCounters, c: &SenderCounters) {
    zip_sender_counters(total, c, u64::saturating_add);
}

fn sub_sender_counters(total: &mut SenderCounters, c: &SenderCounters) {
    zip_sender_counters(total, c, u64::saturating_sub);
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

fn add_resync_counters(total: &mut ResyncCounters, c: &ResyncCounters) {
    total.resyncs_started += c.resyncs_started;
    total.resyncs_failed += c.resyncs_failed;
    total.state_checks_started += c.state_checks_started;
    total.state_checks_failed += c.state_checks_failed;
    total.requests_coalesced += c.requests_coalesced;
    total.fetches += c.fetches;
    total.fetch_failures += c.fetch_failures;
    total.items_applied += c.items_applied;
    total.items_rejected += c.items_rejected;
}

fn add_node_counters(total: &mut EndpointNodeCounters, c: &EndpointNodeCounters) {
    total.jobs += c.jobs;
    total.stores_applied += c.stores_applied;
    total.stores_failed += c.stores_failed;
    total.fetches += c.fetches;
    total.fetches_cancelled += c.fetches_cancelled;
    total.items_delivered += c.items_delivered;
    total.hostile_items += c.hostile_items;
    total.hostile_items_applied += c.hostile_items_applied;
    total.fetches_failed += c.fetches_failed;
}
