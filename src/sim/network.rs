//! The simulated network: nodes, links, the event queues and the loop that drives them.

use std::cmp::{Ordering, Reverse};
use std::collections::binary_heap::PeekMut;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::link::{nanos, Direction, Fate, LinkState};
use super::{Classifier, Interest, Loss, Tag};
use super::{Destination, LinkConfig, Node, SimError};

/// The UDP port of every node's address.
pub const NODE_PORT: u16 = 7000;

/// The most nodes a network holds: one per host address of 198.18.0.0/15 (the first
/// 131,070 nodes), then of 100.64.0.0/10 (4,194,302 more), without each block's first and
/// last address.
pub const MAX_NODES: usize = FIRST_BLOCK_NODES + SECOND_BLOCK_NODES;

/// Nodes addressed in 198.18.0.0/15 (the first ones added).
const FIRST_BLOCK_NODES: usize = (1 << 17) - 2;

/// Nodes addressed in 100.64.0.0/10, after the first block is full (a network of a million
/// members).
const SECOND_BLOCK_NODES: usize = (1 << 22) - 2;

/// How many times in a row a node's timer may fire at one instant and still be due right after
/// `handle_timeout` (the node did not consume it). Beyond this the simulator drops that
/// deadline (counted in [`NetworkStats::stalled_timers`]) instead of spinning; it is armed
/// again as soon as `poll_timeout` returns a different value.
pub const MAX_TIMER_REFIRES: u32 = 64;

/// 198.18.0.0, the base of the first node address block.
const ADDRESS_BASE: u32 = 0xC612_0000;

/// 100.64.0.0, the base of the second node address block.
const SECOND_ADDRESS_BASE: u32 = 0x6440_0000;

/// Tags a sender index as an entry of the table of external (injected) source addresses.
/// Node indices stay far below it ([`MAX_NODES`] < 2^23).
const EXTERNAL: u32 = 1 << 31;

/// The virtual-time horizon, in nanoseconds since the start (about 100 years). Offsets are
/// capped to it, so `start + offset` never overflows an `Instant` on any supported platform.
const MAX_HORIZON: u64 = 100 * 365 * 24 * 60 * 60 * 1_000_000_000;

/// A node's identity in its network: stable for the network's lifetime, also across the node's
/// removal and replacement. Its address is [`Network::addr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

impl NodeId {
    /// The index of the node, in the order nodes were added (0 for the first).
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The id of the node added `index`-th (0 for the first), for harnesses that number their
    /// nodes rather than keep ids; `None` beyond [`MAX_NODES`]. Whether a network has such a
    /// node is for the network to say ([`Network::id_count`]).
    pub fn from_index(index: usize) -> Option<Self> {
        (index < MAX_NODES).then_some(Self(index as u32))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Settings of a whole network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The one seed every link's RNG derives from.
    pub seed: u64,
    /// The size of the buffer handed to `poll_transmit`: the largest datagram a node can send.
    pub max_datagram_size: usize,
    /// How many transmits the simulator drains from a node per interaction before it stops
    /// (counted in [`NetworkStats::transmit_overflows`]); the rest wait for the node's next
    /// interaction. Guards against a node that never returns `None`.
    pub max_transmits_per_interaction: usize,
    /// How many events may be processed at one virtual instant before the simulator decides
    /// that nodes are bouncing datagrams over zero-delay links forever: it then discards the
    /// datagrams still scheduled at that instant (counted in [`NetworkStats::livelocks`] and
    /// [`NetworkStats::dropped_livelock`]) so that time can advance.
    pub max_events_per_instant: u64,
}

impl NetworkConfig {
    /// The default limits with this seed.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            max_datagram_size: 65_535,
            max_transmits_per_interaction: 1_000_000,
            max_events_per_instant: 20_000_000,
        }
    }

    /// Checks that every limit is at least 1 and the datagram size at most 1 MiB.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.max_datagram_size == 0 || self.max_datagram_size > 1 << 20 {
            return Err(SimError::InvalidConfig {
                field: "max_datagram_size",
                reason: "must be in [1, 1 MiB]",
            });
        }
        if self.max_transmits_per_interaction == 0 {
            return Err(SimError::InvalidConfig {
                field: "max_transmits_per_interaction",
                reason: "must be at least 1",
            });
        }
        if self.max_events_per_instant == 0 {
            return Err(SimError::InvalidConfig {
                field: "max_events_per_instant",
                reason: "must be at least 1",
            });
        }
        Ok(())
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self::new(0)
    }
}

/// Counters of one node (kept while the node is absent, and across its replacement).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Datagrams the node transmitted (a multicast counts once).
    pub datagrams_sent: u64,
    /// Bytes the node transmitted.
    pub bytes_sent: u64,
    /// Datagrams handed to the node's `handle_datagram`.
    pub datagrams_received: u64,
    /// Bytes handed to the node's `handle_datagram`.
    pub bytes_received: u64,
}

/// Counters of the whole network. A multicast counts once where it is sent and once per
/// receiver where it is delivered or dropped on a downlink; a drop on the sender's uplink
/// counts once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetworkStats {
    /// Datagrams nodes sent to [`Destination::Group`].
    pub group_sent: u64,
    /// Datagrams nodes sent to a [`Destination::Unicast`] address.
    pub unicast_sent: u64,
    /// Bytes nodes sent to the group (the wire bytes of the sender's uplink).
    pub group_bytes_sent: u64,
    /// Bytes nodes sent by unicast.
    pub unicast_bytes_sent: u64,
    /// Datagrams put into the switch from outside with [`Network::inject`].
    pub injected: u64,
    /// Datagrams handed to a node's `handle_datagram`, duplicates included.
    pub delivered: u64,
    /// Bytes handed to nodes' `handle_datagram`.
    pub bytes_delivered: u64,
    /// Link traversals dropped by a loss model.
    pub dropped_loss: u64,
    /// Link traversals dropped by an outage.
    pub dropped_outage: u64,
    /// Unicast datagrams to an address that is no node of the network.
    pub dropped_unknown_destination: u64,
    /// Datagrams to a node that was absent (removed) when they were sent or when they arrived.
    pub dropped_absent: u64,
    /// Datagrams discarded to break a zero-delay loop (see [`NetworkConfig::max_events_per_instant`]).
    pub dropped_livelock: u64,
    /// Extra copies made by duplication.
    pub duplicated: u64,
    /// Copies with a bit flipped (on an uplink, the copy all receivers share counts once).
    pub corrupted: u64,
    /// Copies held back by the explicit reorder delay.
    pub reordered: u64,
    /// Calls of nodes' `handle_timeout`.
    pub timers_fired: u64,
    /// Interactions after which the simulator stopped draining a node's transmits at the cap
    /// ([`NetworkConfig::max_transmits_per_interaction`]).
    pub transmit_overflows: u64,
    /// Transmits whose length exceeded the buffer; they were skipped.
    pub invalid_transmits: u64,
    /// Deadlines dropped because the node's timer stayed due at one instant (see
    /// [`MAX_TIMER_REFIRES`]).
    pub stalled_timers: u64,
    /// Times the per-instant event cap was hit.
    pub livelocks: u64,
    /// Multicast copies skipped because the receiver's [`Interest`] excludes them (with
    /// [`Network::filter_deliveries`]): when the datagram is sent (counted before the
    /// downlink, so copies the downlink would have lost are among them, and so are copies to
    /// absent nodes still listed in the group), or when it arrives (the receiver's interest
    /// narrowed in between). Unfiltered, such a copy would have been delivered (or lost) and
    /// dropped unread by the receiver.
    pub filtered: u64,
}

impl NetworkStats {
    /// Datagrams nodes sent, group and unicast.
    pub fn sent(&self) -> u64 {
        self.group_sent + self.unicast_sent
    }

    /// Bytes nodes sent, group and unicast.
    pub fn bytes_sent(&self) -> u64 {
        self.group_bytes_sent + self.unicast_bytes_sent
    }
}

/// A deterministic discrete-event simulation of nodes around an impairment switch.
///
/// Each node has an uplink (node -> switch) and a downlink (switch -> node), each with its own
/// [`LinkConfig`] and RNG. A [`Destination::Group`] datagram crosses the sender's uplink once
/// (a loss there drops it for everybody), then the downlink of every other node present when
/// it is sent (the set of receivers is fixed at send time). A [`Destination::Unicast`]
/// datagram crosses the sender's uplink, then the target's downlink; one to an address that is
/// no node is counted and dropped. A multicast's bytes are shared by its receivers; only a
/// corrupted copy is copied.
///
/// Time is virtual: the start is read once with `Instant::now()` at construction and every
/// other instant is the start plus a duration. Events are datagram arrivals, ordered by (time,
/// insertion order), and node timers, ordered by (deadline, node index); at equal times
/// arrivals come first. A multicast's copies (each with its own loss, delay and duplicate
/// draws, made when it is sent) wait in the heap as one entry, ordered by its next copy, so
/// that the heap holds one entry per datagram in flight rather than one per receiver; the
/// copies still come out in (time, insertion order) among all arrivals, exactly as separate
/// events would. After each interaction with a node (a datagram, a timeout, a
/// [`Network::touch`]) the simulator drains its `poll_transmit` into the network and re-reads
/// its `poll_timeout`. Timers are kept lazily (a heap entry is skipped when the node's deadline
/// changed since), so no step scans the nodes.
///
/// The methods, by kind: building ([`Network::new`], [`Network::with_config`]); membership
/// ([`Network::add_node`], [`Network::remove_node`], [`Network::replace_node`]); getters
/// ([`Network::addr`], [`Network::node`], [`Network::node_ids`], [`Network::stats`], ...);
/// inputs from the harness ([`Network::node_mut`] then [`Network::touch`], or
/// [`Network::with_node`]; [`Network::inject`]; [`Network::set_uplink`]); driving
/// ([`Network::run_until`], [`Network::run_until_idle`]).
///
/// Guards, so that a misbehaving node cannot hang a run (each is counted in
/// [`NetworkStats`]): at most [`NetworkConfig::max_transmits_per_interaction`] transmits are
/// drained per interaction; a timer still due after [`MAX_TIMER_REFIRES`] fires in a row at
/// one instant is dropped until the node's deadline changes; datagrams bouncing over zero-delay
/// links at one instant are cut off after [`NetworkConfig::max_events_per_instant`] events.
///
/// ```
/// use std::net::SocketAddr;
/// use std::time::{Duration, Instant};
///
/// use rekeycast::sim::{Destination, LinkConfig, Loss, Network, Node, Transmit};
///
/// /// Multicasts one datagram when touched, counts what it receives.
/// #[derive(Default)]
/// struct Hello {
///     pending: bool,
///     received: usize,
/// }
///
/// impl Node for Hello {
///     fn handle_datagram(&mut self, _: Instant, _: SocketAddr, _: &[u8]) {
///         self.received += 1;
///     }
///     fn handle_timeout(&mut self, _: Instant) {}
///     fn poll_transmit(&mut self, _: Instant, buf: &mut [u8]) -> Option<Transmit> {
///         std::mem::take(&mut self.pending).then(|| {
///             buf[..5].copy_from_slice(b"hello");
///             Transmit { destination: Destination::Group, len: 5 }
///         })
///     }
///     fn poll_timeout(&self) -> Option<Instant> {
///         None
///     }
/// }
///
/// let mut net = Network::new(42);
/// let lossy = LinkConfig::lossy(Loss::Bernoulli { p: 0.1 }, Duration::from_millis(5));
/// let sender = net.add_node(Hello::default(), LinkConfig::ideal(), lossy.clone())?;
/// for _ in 0..100 {
///     net.add_node(Hello::default(), LinkConfig::ideal(), lossy.clone())?;
/// }
/// net.node_mut(sender).map(|node| node.pending = true);
/// net.touch(sender)?;
/// assert!(net.run_until_idle(net.start() + Duration::from_secs(1)));
/// let stats = net.stats();
/// assert_eq!(stats.group_sent, 1);
/// assert_eq!(stats.delivered + stats.dropped_loss, 100);
/// # Ok::<(), rekeycast::sim::SimError>(())
/// ```
pub struct Network<N> {
    config: NetworkConfig,
    start: Instant,
    /// Nanoseconds since `start`; never decreases.
    now: u64,
    slots: Vec<Slot<N>>,
    present: usize,
    /// The node indices listening to each multicast group, ascending (absent nodes stay
    /// listed and are skipped): a group datagram visits only its group's listeners.
    listeners: HashMap<u32, Vec<u32>>,
    /// The distinct link configurations; links refer to them by index.
    links: Vec<LinkConfig>,
    /// Datagrams on their way, by their next arrival: a unicast or a corrupted copy alone, a
    /// multicast's copies to its receivers as one batch ([`Flight`]).
    arrivals: BinaryHeap<Flight>,
    /// Copies scheduled and not yet delivered or discarded.
    in_flight: usize,
    /// Whether a multicast's copies go into the heap as one fanout (always, but for the test
    /// that checks the order is the same without).
    batch_multicast: bool,
    /// (deadline, node index, generation); valid while it equals the node's armed timer.
    timers: BinaryHeap<Reverse<(u64, u32, u32)>>,
    /// Insertion counter of arrivals: ties in time go in insertion order.
    sequence: u64,
    /// Source addresses of injected datagrams that are no node's address.
    externals: Vec<SocketAddr>,
    external_index: HashMap<SocketAddr, u32>,
    /// The buffer handed to `poll_transmit`.
    scratch: Vec<u8>,
    /// The instant of the last event processed and how many events ran at it.
    instant_events: (u64, u64),
    stats: NetworkStats,
    /// Whether each packet draws its fates from its own generator (see
    /// [`Network::per_packet_draws`]).
    per_packet: bool,
    /// Packets routed so far: the number of the next one is this plus one.
    packets: u64,
    /// With [`Network::filter_deliveries`]: how datagrams are tagged, and each group's
    /// listeners by interest.
    classifier: Option<Classifier>,
    interests: HashMap<u32, GroupInterests>,
    /// Scratch list of a filtered multicast's receivers.
    wanted: Vec<u32>,
}

/// The listeners of one group by their [`Interest`], to find a tagged datagram's receivers
/// without visiting the others.
#[derive(Debug, Default)]
struct GroupInterests {
    all: BTreeSet<u32>,
    /// By (stream, first message).
    from: BTreeMap<(u64, u64), SeqInterests>,
}

/// The listeners whose interest starts at one message of one stream.
#[derive(Debug, Default)]
struct SeqInterests {
    /// Those that do not know their block yet.
    any: BTreeSet<u32>,
    /// Those that do, by block.
    blocks: BTreeMap<u8, BTreeSet<u32>>,
}

impl SeqInterests {
    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.blocks.is_empty()
    }

    fn extend_all(&self, out: &mut Vec<u32>) {
        out.extend(self.any.iter().copied());
        for set in self.blocks.values() {
            out.extend(set.iter().copied());
        }
    }
}

impl GroupInterests {
    fn insert(&mut self, index: u32, interest: Interest) {
        match interest {
            Interest::All => {
                self.all.insert(index);
            }
            Interest::From { stream, seq, block } => {
                let entry = self.from.entry((stream, seq)).or_default();
                match block {
                    None => entry.any.insert(index),
                    Some(block) => entry.blocks.entry(block).or_default().insert(index),
                };
            }
        }
    }

    fn remove(&mut self, index: u32, interest: Interest) {
        match interest {
            Interest::All => {
                self.all.remove(&index);
            }
            Interest::From { stream, seq, block } => {
                let Some(entry) = self.from.get_mut(&(stream, seq)) else {
                    return;
                };
                match block {
                    None => {
                        entry.any.remove(&index);
                    }
                    Some(block) => {
                        if let Some(set) = entry.blocks.get_mut(&block) {
                            set.remove(&index);
                            if set.is_empty() {
                                entry.blocks.remove(&block);
                            }
                        }
                    }
                }
                if entry.is_empty() {
                    self.from.remove(&(stream, seq));
                }
            }
        }
    }

    /// The listeners that take a datagram tagged `tag`, ascending, into `out` (cleared).
    fn wanted(&self, tag: &Tag, out: &mut Vec<u32>) {
        out.clear();
        out.extend(self.all.iter().copied());
        for (&(stream, seq), entry) in &self.from {
            if stream != tag.stream || tag.seq > seq {
                entry.extend_all(out);
            } else if tag.seq == seq {
                out.extend(entry.any.iter().copied());
                match tag.block {
                    None => {
                        for set in entry.blocks.values() {
                            out.extend(set.iter().copied());
                        }
                    }
                    Some(block) => {
                        if let Some(set) = entry.blocks.get(&block) {
                            out.extend(set.iter().copied());
                        }
                    }
                }
            }
        }
        out.sort_unstable();
    }

    fn len(&self) -> usize {
        self.all.len()
            + self
                .from
                .values()
                .map(|e| e.any.len() + e.blocks.values().map(BTreeSet::len).sum::<usize>())
                .sum::<usize>()
    }
}

/// Everything the network keeps per node index.
struct Slot<N> {
    node: Option<N>,
    uplink: LinkState,
    downlink: LinkState,
    /// The group its [`Destination::Group`] datagrams go to.
    send_group: u32,
    /// The group whose datagrams it receives.
    listen_group: u32,
    timer: TimerState,
    stats: NodeStats,
    /// The node's interest as last read (with a classifier only), as indexed in its group.
    interest: Interest,
}

/// The lazily invalidated timer of one node.
#[derive(Debug, Default)]
struct TimerState {
    /// The heap entry (key, generation) that is valid, if any.
    armed: Option<(u64, u32)>,
    /// The deadline last read from `poll_timeout`.
    deadline: Option<Instant>,
    /// The deadline was dropped as stalled; stays so until `poll_timeout` changes.
    ignored: bool,
    generation: u32,
    /// The instant of the last fire and how many fires in a row left the timer still due.
    last_fire: u64,
    refires: u32,
}

/// A datagram on its way to a node.
struct Arrival {
    at: u64,
    sequence: u64,
    to: u32,
    /// Node index, or [`EXTERNAL`] | index into the table of external sources.
    from: u32,
    payload: Arc<[u8]>,
    /// The classifier's tag of a filtered multicast's copy: checked again on arrival.
    tag: Option<Tag>,
}

/// One receiver's copy of a multicast datagram, in a [`Fanout`].
#[derive(Debug, Clone, Copy)]
struct FanoutCopy {
    at: u64,
    /// Offset of its sequence number from the fanout's base.
    offset: u32,
    to: u32,
}

/// The copies of one multicast datagram (one uplink copy of it) on their way to its
/// receivers, sharing their bytes: one heap entry for all of them instead of one per
/// receiver. Each copy keeps the (time, sequence) it would have had as an arrival of its own,
/// so the copies leave the heap in exactly the order single arrivals would (the heap's
/// minimum over fanout heads is the minimum over all copies).
struct Fanout {
    from: u32,
    payload: Arc<[u8]>,
    /// The classifier's tag (with filtered deliveries).
    tag: Option<Tag>,
    base: u64,
    /// Sorted by (time, sequence), the next at `next`.
    copies: Vec<FanoutCopy>,
    next: usize,
}

impl Fanout {
    fn head(&self) -> Option<(u64, u64)> {
        let copy = self.copies.get(self.next)?;
        Some((copy.at, self.base + u64::from(copy.offset)))
    }
}

/// An entry of the arrival heap.
enum Flight {
    /// A unicast datagram, or a copy with its own bytes (corrupted on a downlink).
    One(Arrival),
    /// A multicast datagram's copies that share its bytes (never empty in the heap), with
    /// the (time, sequence) of the next one kept here, so that ordering the heap does not
    /// chase the fanout's pointer.
    Many((u64, u64), Box<Fanout>),
}

impl Flight {
    /// The (time, sequence) of the next copy to arrive.
    fn key(&self) -> (u64, u64) {
        match self {
            Self::One(arrival) => (arrival.at, arrival.sequence),
            Self::Many(key, _) => *key,
        }
    }
}

impl PartialEq for Flight {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Flight {}

impl PartialOrd for Flight {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Flight {
    /// Reversed, so that the max-heap pops the earliest (time, sequence) first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
    }
}

/// A copy leaving a link: its exit time and bytes (`None`: no such copy).
type LinkExit = Option<(u64, Arc<[u8]>)>;

/// Why the event loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// No event left.
    Idle,
    /// The next event is after the limit.
    Limit,
}

impl<N: Node> Network<N> {
    /// An empty network with this seed and the default limits.
    pub fn new(seed: u64) -> Self {
        Self::build(NetworkConfig::new(seed))
    }

    /// An empty network with these settings.
    pub fn with_config(config: NetworkConfig) -> Result<Self, SimError> {
        config.validate()?;
        Ok(Self::build(config))
    }

    fn build(config: NetworkConfig) -> Self {
        let scratch = vec![0; config.max_datagram_size];
        Self {
            config,
            start: Instant::now(),
            now: 0,
            slots: Vec::new(),
            present: 0,
            listeners: HashMap::new(),
            links: Vec::new(),
            arrivals: BinaryHeap::new(),
            in_flight: 0,
            batch_multicast: true,
            timers: BinaryHeap::new(),
            sequence: 0,
            externals: Vec::new(),
            external_index: HashMap::new(),
            scratch,
            instant_events: (0, 0),
            stats: NetworkStats::default(),
            per_packet: false,
            packets: 0,
            classifier: None,
            interests: HashMap::new(),
            wanted: Vec::new(),
        }
    }

    /// Makes every packet draw its fate on each link (loss, delay, reordering, duplication,
    /// corruption) from a generator of its own, keyed by the network's seed, the link and the
    /// packet's number (datagrams sent or injected, in order), instead of from the link's one
    /// stream: a packet's fate then does not depend on which other packets crossed the link.
    /// The figures of a seeded run differ from those of the default draws (same
    /// distributions, other samples). Only on a network without nodes yet.
    pub fn per_packet_draws(&mut self) -> Result<(), SimError> {
        if !self.slots.is_empty() {
            return Err(SimError::InvalidConfig {
                field: "per_packet_draws",
                reason: "must be chosen before any node is added",
            });
        }
        self.per_packet = true;
        Ok(())
    }

    /// Filters deliveries: a multicast datagram that `classifier` tags goes only to the
    /// listeners whose [`Node::interest`] takes it; the others would have dropped it unread.
    /// The senders' figures are those of an unfiltered run (nothing changes on the senders'
    /// side); receivers do not see (nor count) the datagrams they would have dropped;
    /// [`NetworkStats::filtered`] counts the copies skipped. Per-packet draws
    /// ([`Network::per_packet_draws`]) are switched on, so that the datagrams a node does take
    /// have the fates they would have had unfiltered, and a run filtered and one not filtered
    /// (both with per-packet draws) deliver the same datagrams at the same times to every node,
    /// as long as a node that drops a datagram by its interest when it is sent would still
    /// drop it when it arrives. The interest is checked again on arrival (with the one the
    /// node has then), so a copy sent before the node knew its block is skipped too.
    /// Links must then have memoryless loss (a Gilbert-Elliott link's state would advance
    /// only with the packets it carries). Unicast datagrams are never filtered. Only on a
    /// network without nodes yet.
    pub fn filter_deliveries(&mut self, classifier: Classifier) -> Result<(), SimError> {
        self.per_packet_draws()?;
        if self
            .links
            .iter()
            .any(|c| matches!(c.loss, Loss::GilbertElliott { .. }))
        {
            return Err(SimError::InvalidConfig {
                field: "loss",
                reason: "filtered deliveries need memoryless loss on every link",
            });
        }
        self.classifier = Some(classifier);
        Ok(())
    }

    /// The settings.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The instant the simulation started at (read once, at construction).
    pub fn start(&self) -> Instant {
        self.start
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.instant(self.now)
    }

    /// The counters.
    pub fn stats(&self) -> &NetworkStats {
        &self.stats
    }

    /// Zeroes the network counters (not the nodes' own), to measure one phase of a run.
    pub fn reset_stats(&mut self) {
        self.stats = NetworkStats::default();
    }

    /// Adds a node with these links; it is present at once and receives what is sent from now
    /// on. Its timer is read; its pending transmits are not drained until its first interaction
    /// (call [`Network::touch`] to send them now).
    pub fn add_node(
        &mut self,
        node: N,
        uplink: LinkConfig,
        downlink: LinkConfig,
    ) -> Result<NodeId, SimError> {
        if self.slots.len() >= MAX_NODES {
            return Err(SimError::TooManyNodes);
        }
        let uplink = self.intern(uplink)?;
        let downlink = self.intern(downlink)?;
        let index = u32::try_from(self.slots.len()).map_err(|_| SimError::TooManyNodes)?;
        self.slots.push(Slot {
            node: Some(node),
            uplink: LinkState::new(uplink),
            downlink: LinkState::new(downlink),
            send_group: 0,
            listen_group: 0,
            timer: TimerState::default(),
            stats: NodeStats::default(),
            interest: Interest::All,
        });
        self.present += 1;
        self.listeners.entry(0).or_default().push(index);
        if self.classifier.is_some() {
            self.interests
                .entry(0)
                .or_default()
                .insert(index, Interest::All);
        }
        self.refresh_timer(index as usize, false);
        self.refresh_interest(index as usize);
        Ok(NodeId(index))
    }

    /// Puts a node in multicast groups: its [`Destination::Group`] datagrams go to the nodes
    /// listening to `send`, and it receives those sent to `listen`. Every node starts in group
    /// 0 for both. Groups model separate multicast segments, as a relay's: it listens to its
    /// upstream group and sends into its own.
    pub fn set_groups(&mut self, id: NodeId, send: u32, listen: u32) -> Result<(), SimError> {
        let index = id.0;
        let slot = self
            .slots
            .get_mut(id.index())
            .ok_or(SimError::UnknownNode(id))?;
        let old = slot.listen_group;
        slot.send_group = send;
        slot.listen_group = listen;
        if old != listen {
            let interest = slot.interest;
            if let Some(list) = self.listeners.get_mut(&old) {
                list.retain(|&i| i != index);
            }
            let list = self.listeners.entry(listen).or_default();
            let at = list.partition_point(|&i| i < index);
            list.insert(at, index);
            if self.classifier.is_some() {
                if let Some(group) = self.interests.get_mut(&old) {
                    group.remove(index, interest);
                }
                self.interests
                    .entry(listen)
                    .or_default()
                    .insert(index, interest);
            }
        }
        Ok(())
    }

    /// The address of a node: 198.18.0.0 plus (index + 1) for the first 131,070 nodes, then
    /// 100.64.0.0 plus (index - 131,070 + 1); port [`NODE_PORT`].
    pub fn addr(&self, id: NodeId) -> SocketAddr {
        let first = FIRST_BLOCK_NODES as u32;
        let ip = if id.0 < first {
            Ipv4Addr::from(ADDRESS_BASE + id.0 + 1)
        } else {
            Ipv4Addr::from(SECOND_ADDRESS_BASE + (id.0 - first) + 1)
        };
        SocketAddr::V4(SocketAddrV4::new(ip, NODE_PORT))
    }

    /// The node that has this address, present or not.
    pub fn node_id(&self, addr: SocketAddr) -> Option<NodeId> {
        let SocketAddr::V4(v4) = addr else {
            return None;
        };
        if v4.port() != NODE_PORT {
            return None;
        }
        let ip = u32::from(*v4.ip());
        let index = match ip.checked_sub(ADDRESS_BASE + 1) {
            Some(host) if (host as usize) < FIRST_BLOCK_NODES => host as usize,
            _ => {
                let host = ip.checked_sub(SECOND_ADDRESS_BASE + 1)? as usize;
                (host < SECOND_BLOCK_NODES).then_some(FIRST_BLOCK_NODES + host)?
            }
        };
        (index < self.slots.len()).then_some(NodeId(index as u32))
    }

    /// The node with this id, if it is present.
    pub fn node(&self, id: NodeId) -> Option<&N> {
        self.slots.get(id.index())?.node.as_ref()
    }

    /// The node with this id, if it is present. After changing it, call [`Network::touch`] so
    /// that its transmits are sent and its timer re-read (or use [`Network::with_node`]).
    pub fn node_mut(&mut self, id: NodeId) -> Option<&mut N> {
        self.slots.get_mut(id.index())?.node.as_mut()
    }

    /// Runs `f` on a present node with the current time, then touches it (drains its
    /// transmits, re-reads its timer). `None` when the node is absent.
    pub fn with_node<R>(&mut self, id: NodeId, f: impl FnOnce(&mut N, Instant) -> R) -> Option<R> {
        let now = self.now();
        let result = f(self.node_mut(id)?, now);
        self.interacted(id.index(), false);
        Some(result)
    }

    /// The ids of the present nodes, in index order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.node.is_some())
            .map(|(index, _)| NodeId(index as u32))
    }

    /// How many node ids were handed out (present or not): ids are `0..id_count()`.
    pub fn id_count(&self) -> usize {
        self.slots.len()
    }

    /// How many nodes are present.
    pub fn present_count(&self) -> usize {
        self.present
    }

    /// Whether the node is present.
    pub fn is_present(&self, id: NodeId) -> bool {
        self.node(id).is_some()
    }

    /// Removes a node, keeping its id, address, links and counters: nothing is delivered to
    /// the id until a node is put back with [`Network::replace_node`] (datagrams in flight to
    /// it are dropped on arrival and counted as [`NetworkStats::dropped_absent`]). Returns the
    /// node that was there.
    pub fn remove_node(&mut self, id: NodeId) -> Result<Option<N>, SimError> {
        let slot = self
            .slots
            .get_mut(id.index())
            .ok_or(SimError::UnknownNode(id))?;
        let old = slot.node.take();
        slot.timer.armed = None;
        slot.timer.deadline = None;
        slot.timer.ignored = false;
        if old.is_some() {
            self.present -= 1;
        }
        Ok(old)
    }

    /// Puts `node` at `id` (a member leaving and another joining at the same address, or the
    /// same member restarting), returning the node that was there. Like a real network,
    /// datagrams already in flight to the address reach the new node. Its timer is read; its
    /// transmits wait for [`Network::touch`] or its first interaction. The address keeps its
    /// links and its multicast groups ([`Network::set_groups`]).
    pub fn replace_node(&mut self, id: NodeId, node: N) -> Result<Option<N>, SimError> {
        let old = self.remove_node(id)?;
        if let Some(slot) = self.slots.get_mut(id.index()) {
            slot.node = Some(node);
            self.present += 1;
        }
        self.refresh_timer(id.index(), false);
        self.refresh_interest(id.index());
        Ok(old)
    }

    /// Changes a node's uplink. The loss state restarts (from its stationary distribution); the
    /// link's RNG stream continues. Datagrams already in flight are not affected.
    pub fn set_uplink(&mut self, id: NodeId, config: LinkConfig) -> Result<(), SimError> {
        if id.index() >= self.slots.len() {
            return Err(SimError::UnknownNode(id));
        }
        let config = self.intern(config)?;
        self.slots[id.index()].uplink.reconfigure(config);
        Ok(())
    }

    /// Changes a node's downlink, like [`Network::set_uplink`].
    pub fn set_downlink(&mut self, id: NodeId, config: LinkConfig) -> Result<(), SimError> {
        if id.index() >= self.slots.len() {
            return Err(SimError::UnknownNode(id));
        }
        let config = self.intern(config)?;
        self.slots[id.index()].downlink.reconfigure(config);
        Ok(())
    }

    /// The counters of a node (present or not).
    pub fn node_stats(&self, id: NodeId) -> Option<NodeStats> {
        self.slots.get(id.index()).map(|slot| slot.stats)
    }

    /// For the harness, after it changed a node from outside (through [`Network::node_mut`]):
    /// drains the node's transmits into the network at the current time and re-reads its
    /// timer. Does nothing for an absent node.
    pub fn touch(&mut self, id: NodeId) -> Result<(), SimError> {
        if id.index() >= self.slots.len() {
            return Err(SimError::UnknownNode(id));
        }
        self.interacted(id.index(), false);
        Ok(())
    }

    /// Puts a datagram into the switch at the current time as if it came from `from` (any
    /// address: a node's, to spoof it, or an outsider's); it crosses no uplink, then the
    /// downlinks of its destination like any other datagram. A group datagram is not delivered
    /// to the node whose address is `from`. For floods and forgeries in scenario tests.
    pub fn inject(&mut self, from: SocketAddr, destination: Destination, bytes: &[u8]) {
        // A spoofed node's datagram goes to that node's group, an outsider's to group 0.
        let group = self
            .node_id(from)
            .and_then(|id| self.slots.get(id.index()))
            .map_or(0, |slot| slot.send_group);
        self.inject_into(group, from, destination, bytes);
    }

    /// [`Network::inject`] into multicast group `group` (see [`Network::set_groups`]) when
    /// `destination` is [`Destination::Group`].
    pub fn inject_into(
        &mut self,
        group: u32,
        from: SocketAddr,
        destination: Destination,
        bytes: &[u8],
    ) {
        let sender = match self.node_id(from) {
            Some(id) => id.0,
            None => {
                let next = self.externals.len() as u32 | EXTERNAL;
                let index = *self.external_index.entry(from).or_insert(next);
                if index == next {
                    self.externals.push(from);
                }
                index
            }
        };
        self.stats.injected += 1;
        self.route_in(group, sender, false, destination, bytes);
    }

    /// Processes, in time order, every arrival and timer up to `t`, then sets the time to `t`
    /// (the time never goes back: a `t` before [`Network::now`] does nothing).
    pub fn run_until(&mut self, t: Instant) {
        let limit = self.offset(t);
        self.run(limit);
        self.now = self.now.max(limit);
    }

    /// Processes events in time order until none is left (returns true; the time is that of
    /// the last event) or the next one is after `limit` (returns false; the time is `limit`).
    pub fn run_until_idle(&mut self, limit: Instant) -> bool {
        let limit = self.offset(limit);
        match self.run(limit) {
            Stop::Idle => true,
            Stop::Limit => {
                self.now = self.now.max(limit);
                false
            }
        }
    }

    /// The time of the next event (arrival or timer), if any.
    pub fn next_event_time(&mut self) -> Option<Instant> {
        self.next_event().map(|(at, _)| self.instant(at))
    }

    /// Datagrams in flight (scheduled arrivals; a multicast counts once per receiver).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    // ---- helpers ----

    /// Virtual nanoseconds of an instant, capped to the horizon.
    fn offset(&self, t: Instant) -> u64 {
        offset_from(self.start, t)
    }

    fn instant(&self, offset: u64) -> Instant {
        // Invariant: offsets are capped at MAX_HORIZON (100 years), and an `Instant` plus 100
        // years does not overflow on any supported platform, so this addition cannot panic.
        self.start + Duration::from_nanos(offset.min(MAX_HORIZON))
    }

    /// The index of `config` in the table of distinct configurations, adding it if it is not
    /// among the last few (nodes added in a loop usually share one).
    fn intern(&mut self, config: LinkConfig) -> Result<u32, SimError> {
        config.validate()?;
        if self.classifier.is_some() && matches!(config.loss, Loss::GilbertElliott { .. }) {
            return Err(SimError::InvalidConfig {
                field: "loss",
                reason: "filtered deliveries need memoryless loss on every link",
            });
        }
        let recent = self.links.len().saturating_sub(4);
        let index = match self.links[recent..].iter().position(|c| *c == config) {
            Some(position) => recent + position,
            None => {
                self.links.push(config);
                self.links.len() - 1
            }
        };
        u32::try_from(index).map_err(|_| SimError::InvalidConfig {
            field: "link",
            reason: "too many distinct link configurations",
        })
    }

    fn source_addr(&self, from: u32) -> SocketAddr {
        if from & EXTERNAL != 0 {
            // Invariant: external tags are only made by `inject`, which pushes the address.
            self.externals[(from & !EXTERNAL) as usize]
        } else {
            self.addr(NodeId(from))
        }
    }

    /// The next event: its time and whether it is an arrival. Drops stale timer entries.
    fn next_event(&mut self) -> Option<(u64, bool)> {
        let timer = loop {
            let Some(&Reverse((key, node, generation))) = self.timers.peek() else {
                break None;
            };
            let valid = self
                .slots
                .get(node as usize)
                .is_some_and(|slot| slot.timer.armed == Some((key, generation)));
            if valid {
                break Some(key);
            }
            self.timers.pop();
        };
        match (self.arrivals.peek().map(|a| a.key().0), timer) {
            (None, None) => None,
            (Some(arrival), None) => Some((arrival, true)),
            (None, Some(timer)) => Some((timer, false)),
            (Some(arrival), Some(timer)) if arrival <= timer => Some((arrival, true)),
            (Some(_), Some(timer)) => Some((timer, false)),
        }
    }

    fn run(&mut self, limit: u64) -> Stop {
        loop {
            let Some((at, is_arrival)) = self.next_event() else {
                return Stop::Idle;
            };
            if at > limit {
                return Stop::Limit;
            }
            // Events are never scheduled before the time they are scheduled at.
            self.now = self.now.max(at);
            if self.instant_events.0 == self.now {
                self.instant_events.1 += 1;
            } else {
                self.instant_events = (self.now, 1);
            }
            if self.instant_events.1 > self.config.max_events_per_instant {
                self.break_livelock();
                continue;
            }
            if is_arrival {
                if let Some(arrival) = self.pop_arrival() {
                    self.deliver(arrival);
                }
            } else if let Some(Reverse((_, node, _))) = self.timers.pop() {
                self.fire(node as usize);
            }
        }
    }

    /// Discards every datagram scheduled at the current instant.
    fn break_livelock(&mut self) {
        self.stats.livelocks += 1;
        while self.arrivals.peek().is_some_and(|a| a.key().0 <= self.now) {
            self.pop_arrival();
            self.stats.dropped_livelock += 1;
        }
        // Timers at this instant are bounded by MAX_TIMER_REFIRES; let them run.
        self.instant_events.1 = 0;
    }

    /// Schedules each multicast copy as an arrival of its own (the reference the fanouts
    /// must match).
    #[cfg(test)]
    pub(super) fn unbatched(mut self) -> Self {
        self.batch_multicast = false;
        self
    }

    /// Takes the earliest copy off the heap: a single arrival, or the head of a fanout (which
    /// goes back into the heap by its next copy, if it has one).
    fn pop_arrival(&mut self) -> Option<Arrival> {
        let mut top = self.arrivals.peek_mut()?;
        let arrival = match &mut *top {
            Flight::One(_) => match PeekMut::pop(top) {
                Flight::One(arrival) => arrival,
                // Invariant: the entry just matched as `One`.
                Flight::Many(..) => return None,
            },
            Flight::Many(key, fanout) => {
                let copy = *fanout.copies.get(fanout.next)?;
                fanout.next += 1;
                let arrival = Arrival {
                    at: copy.at,
                    sequence: fanout.base + u64::from(copy.offset),
                    to: copy.to,
                    from: fanout.from,
                    payload: Arc::clone(&fanout.payload),
                    tag: fanout.tag,
                };
                match fanout.head() {
                    // Dropping `top` moves the fanout to its place for its next copy.
                    Some(next) => *key = next,
                    None => drop(PeekMut::pop(top)),
                }
                arrival
            }
        };
        self.in_flight -= 1;
        Some(arrival)
    }

    fn deliver(&mut self, arrival: Arrival) {
        let now = self.now();
        let from = self.source_addr(arrival.from);
        let to = arrival.to as usize;
        let Some(slot) = self.slots.get_mut(to) else {
            return;
        };
        let Some(node) = slot.node.as_mut() else {
            self.stats.dropped_absent += 1;
            return;
        };
        // The receiver's interest may have narrowed since the copy was sent (it learned its
        // block): skip what it now drops unread.
        if let Some(tag) = &arrival.tag {
            if !slot.interest.takes(tag) {
                self.stats.filtered += 1;
                return;
            }
        }
        node.handle_datagram(now, from, &arrival.payload);
        let len = arrival.payload.len() as u64;
        slot.stats.datagrams_received += 1;
        slot.stats.bytes_received += len;
        self.stats.delivered += 1;
        self.stats.bytes_delivered += len;
        self.interacted(to, false);
    }

    fn fire(&mut self, index: usize) {
        let now = self.now;
        let instant = self.now();
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Some(node) = slot.node.as_mut() else {
            return;
        };
        let timer = &mut slot.timer;
        // A deadline that moved later while its entry waited in the heap (see
        // `refresh_timer`): re-arm at the new deadline instead of firing early.
        if let Some(deadline) = timer.deadline {
            let key = offset_from(self.start, deadline);
            if key > now {
                timer.generation = timer.generation.wrapping_add(1);
                self.timers
                    .push(Reverse((key, index as u32, timer.generation)));
                timer.armed = Some((key, timer.generation));
                return;
            }
        }
        timer.armed = None;
        timer.deadline = None;
        if timer.last_fire != now {
            timer.last_fire = now;
            timer.refires = 0;
        }
        node.handle_timeout(instant);
        self.stats.timers_fired += 1;
        self.interacted(index, true);
    }

    /// After any input to a node: drain its transmits, then re-read its timer.
    fn interacted(&mut self, index: usize, after_fire: bool) {
        self.drain(index);
        self.refresh_timer(index, after_fire);
        self.refresh_interest(index);
    }

    /// Re-reads a node's interest (when deliveries are filtered) and re-indexes it.
    fn refresh_interest(&mut self, index: usize) {
        if self.classifier.is_none() {
            return;
        }
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Some(node) = slot.node.as_ref() else {
            return;
        };
        let interest = node.interest();
        if interest == slot.interest {
            return;
        }
        let old = std::mem::replace(&mut slot.interest, interest);
        let group = self.interests.entry(slot.listen_group).or_default();
        group.remove(index as u32, old);
        group.insert(index as u32, interest);
    }

    fn drain(&mut self, index: usize) {
        let now = self.now();
        let mut buf = std::mem::take(&mut self.scratch);
        let mut drained = 0;
        loop {
            if drained == self.config.max_transmits_per_interaction {
                self.stats.transmit_overflows += 1;
                break;
            }
            let Some(node) = self.slots.get_mut(index).and_then(|s| s.node.as_mut()) else {
                break;
            };
            let Some(transmit) = node.poll_transmit(now, &mut buf) else {
                break;
            };
            drained += 1;
            let Some(bytes) = buf.get(..transmit.len) else {
                self.stats.invalid_transmits += 1;
                continue;
            };
            let len = bytes.len() as u64;
            let slot = &mut self.slots[index];
            slot.stats.datagrams_sent += 1;
            slot.stats.bytes_sent += len;
            match transmit.destination {
                Destination::Group => {
                    self.stats.group_sent += 1;
                    self.stats.group_bytes_sent += len;
                }
                Destination::Unicast(_) => {
                    self.stats.unicast_sent += 1;
                    self.stats.unicast_bytes_sent += len;
                }
            }
            self.route(index as u32, true, transmit.destination, bytes);
        }
        self.scratch = buf;
    }

    /// Re-reads a node's `poll_timeout` and arms its timer if the deadline changed.
    fn refresh_timer(&mut self, index: usize, after_fire: bool) {
        let now = self.now;
        let start = self.start;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let timer = &mut slot.timer;
        let Some(node) = slot.node.as_ref() else {
            timer.armed = None;
            return;
        };
        let deadline = node.poll_timeout();
        if after_fire {
            let due = deadline.is_some_and(|d| offset_from(start, d) <= now);
            timer.refires = if due { timer.refires + 1 } else { 0 };
            if due && timer.refires > MAX_TIMER_REFIRES {
                self.stats.stalled_timers += 1;
                timer.armed = None;
                timer.deadline = deadline;
                timer.ignored = true;
                return;
            }
        } else if deadline == timer.deadline && (timer.armed.is_some() || timer.ignored) {
            return;
        }
        // A deadline that only moved later keeps its heap entry: when that entry comes up,
        // `fire` re-arms it at the new deadline. Sessions move their deadlines later on every
        // datagram (an idle timer), and a new entry each time grew the heap by one entry per
        // delivery: tens of millions for 100,000 members, most of them stale.
        if !after_fire && !timer.ignored {
            if let (Some((armed_key, _)), Some(new)) = (timer.armed, deadline) {
                if armed_key <= offset_from(start, new).max(now) {
                    timer.deadline = deadline;
                    return;
                }
            }
        }
        timer.deadline = deadline;
        timer.ignored = false;
        timer.armed = match deadline {
            None => None,
            Some(deadline) => {
                let key = offset_from(start, deadline).max(now);
                timer.generation = timer.generation.wrapping_add(1);
                self.timers
                    .push(Reverse((key, index as u32, timer.generation)));
                Some((key, timer.generation))
            }
        };
    }

    /// Sends `bytes` from `sender` (a node index, or an external tag) to `destination`, across
    /// the sender's uplink when `uplink` is set, then the receivers' downlinks.
    fn route(&mut self, sender: u32, uplink: bool, destination: Destination, bytes: &[u8]) {
        let group = self
            .slots
            .get(sender as usize)
            .map_or(0, |slot| slot.send_group);
        self.route_in(group, sender, uplink, destination, bytes);
    }

    /// [`Self::route`] with group datagrams going to the listeners of `group`.
    fn route_in(
        &mut self,
        group: u32,
        sender: u32,
        uplink: bool,
        destination: Destination,
        bytes: &[u8],
    ) {
        self.packets += 1;
        let packet = self.per_packet.then_some(self.packets);
        // Resolve a unicast target before the uplink: the switch drops unknown ones, and the
        // uplink's draws need not depend on it.
        let target = match destination {
            Destination::Group => None,
            Destination::Unicast(addr) => match self.node_id(addr) {
                None => {
                    self.stats.dropped_unknown_destination += 1;
                    return;
                }
                Some(id) if self.slots[id.index()].node.is_none() => {
                    self.stats.dropped_absent += 1;
                    return;
                }
                Some(id) => Some(id.0),
            },
        };
        let payload: Arc<[u8]> = Arc::from(bytes);
        let copies = if uplink {
            let index = sender as usize;
            let config = &self.links[self.slots[index].uplink.config as usize];
            let fate = self.slots[index].uplink.traverse(
                config,
                self.now,
                bytes.len(),
                self.config.seed,
                (sender, Direction::Up),
                packet.map(|p| p << 1),
            );
            match self.apply(fate, self.now, payload) {
                Some(copies) => copies,
                None => return,
            }
        } else {
            [Some((self.now, payload)), None]
        };
        let tag = match (target, self.classifier) {
            (None, Some(classify)) => classify(bytes),
            _ => None,
        };
        for (copy, (at, payload)) in copies.into_iter().flatten().enumerate() {
            // Each copy leaving the uplink has draws of its own on the downlinks.
            let packet = packet.map(|p| (p << 1) | copy as u64);
            match target {
                Some(target) => self.downlink(target, sender, at, &payload, None, packet),
                None => {
                    let listeners = match (tag, self.interests.get(&group)) {
                        (Some(tag), Some(index)) => {
                            let mut wanted = std::mem::take(&mut self.wanted);
                            index.wanted(&tag, &mut wanted);
                            self.stats.filtered += (index.len() - wanted.len()) as u64;
                            Some(wanted)
                        }
                        _ => None,
                    };
                    let (listeners, filtered) = match listeners {
                        Some(wanted) => (wanted, true),
                        None => match self.listeners.remove(&group) {
                            Some(list) => (list, false),
                            None => continue,
                        },
                    };
                    let mut fanout = self.batch_multicast.then(|| Fanout {
                        from: sender,
                        payload: Arc::clone(&payload),
                        tag,
                        base: self.sequence + 1,
                        copies: Vec::with_capacity(listeners.len()),
                        next: 0,
                    });
                    for &receiver in &listeners {
                        if receiver != sender && self.slots[receiver as usize].node.is_some() {
                            self.downlink(receiver, sender, at, &payload, fanout.as_mut(), packet);
                        }
                    }
                    if filtered {
                        self.wanted = listeners;
                    } else {
                        self.listeners.insert(group, listeners);
                    }
                    let Some(mut fanout) = fanout else {
                        continue;
                    };
                    fanout.copies.shrink_to_fit();
                    if !fanout.copies.is_empty() {
                        fanout.copies.sort_unstable_by_key(|c| (c.at, c.offset));
                        self.in_flight += fanout.copies.len();
                        let key = fanout.head().unwrap_or((u64::MAX, u64::MAX));
                        self.arrivals.push(Flight::Many(key, Box::new(fanout)));
                    }
                }
            }
        }
    }

    /// Crosses `receiver`'s downlink at `at` and schedules the resulting copies, each with the
    /// next sequence number: into `fanout` (a multicast's batch) those that keep its shared
    /// bytes, into the heap alone the others (a unicast, a copy corrupted on this link).
    fn downlink(
        &mut self,
        receiver: u32,
        sender: u32,
        at: u64,
        payload: &Arc<[u8]>,
        mut fanout: Option<&mut Fanout>,
        packet: Option<u64>,
    ) {
        let index = receiver as usize;
        let config = &self.links[self.slots[index].downlink.config as usize];
        let fate = self.slots[index].downlink.traverse(
            config,
            at,
            payload.len(),
            self.config.seed,
            (receiver, Direction::Down),
            packet,
        );
        let Some(copies) = self.apply(fate, at, Arc::clone(payload)) else {
            return;
        };
        for (at, copy) in copies.into_iter().flatten() {
            self.sequence += 1;
            if let Some(fanout) = fanout.as_deref_mut() {
                let offset = u32::try_from(self.sequence - fanout.base);
                if let (true, Ok(offset)) = (Arc::ptr_eq(&copy, &fanout.payload), offset) {
                    fanout.copies.push(FanoutCopy {
                        at,
                        offset,
                        to: receiver,
                    });
                    continue;
                }
            }
            self.in_flight += 1;
            self.arrivals.push(Flight::One(Arrival {
                at,
                sequence: self.sequence,
                to: receiver,
                from: sender,
                payload: copy,
                tag: None,
            }));
        }
    }

    /// Turns a link's verdict on `payload` (entering at `at`) into the copies leaving it, with
    /// their exit times; `None` when it was dropped. Counts what happened.
    fn apply(&mut self, fate: Fate, at: u64, payload: Arc<[u8]>) -> Option<[LinkExit; 2]> {
        match fate {
            Fate::Outage => {
                self.stats.dropped_outage += 1;
                None
            }
            Fate::Lost => {
                self.stats.dropped_loss += 1;
                None
            }
            Fate::Passed {
                delay,
                duplicate,
                flip,
                reordered,
            } => {
                let payload = match flip {
                    Some(bit) => {
                        self.stats.corrupted += 1;
                        let mut bytes = payload.to_vec();
                        if let Some(byte) = bytes.get_mut(bit / 8) {
                            *byte ^= 1 << (bit % 8);
                        }
                        Arc::from(bytes)
                    }
                    None => payload,
                };
                if reordered {
                    self.stats.reordered += 1;
                }
                let exit = |d: u64| at.saturating_add(d).min(MAX_HORIZON);
                let second = duplicate.map(|d| {
                    self.stats.duplicated += 1;
                    (exit(d), Arc::clone(&payload))
                });
                Some([Some((exit(delay), payload)), second])
            }
        }
    }
}

impl<N> fmt::Debug for Network<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Network")
            .field("seed", &self.config.seed)
            .field("now_ns", &self.now)
            .field("nodes", &self.slots.len())
            .field("present", &self.present)
            .field("in_flight", &self.in_flight)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Nanoseconds from `start` to `t` (0 if before), capped to the horizon.
fn offset_from(start: Instant, t: Instant) -> u64 {
    nanos(t.saturating_duration_since(start)).min(MAX_HORIZON)
}
