//! Any sans-IO [`Endpoint`] as a simulator [`Node`]: the engine's driver, in virtual time.
//!
//! [`EndpointNode`] does for one endpoint what the engine's `Driver` does with sockets,
//! threads and files, in the same order (stores, jobs, fetches, transmits, events after every
//! input):
//!
//! - datagrams arrive on the [`Port`] that [`PortMap`] gives their source (a relay's upstream
//!   sender's on [`Port::Listen`], the rest on the endpoint's default port), and transmits
//!   leave as the simulator's [`Destination`]s (a unicast to the node's multicast group
//!   address, a NACK in the multicast feedback mode, goes to its group);
//! - jobs run inline, at the instant they are handed out (the simulated CPU is infinitely
//!   fast);
//! - store operations are applied at once to a [`Storage`] the harness gives (in memory:
//!   [`MemGcksStorage`], [`MemMemberStorage`]) and acknowledged with their result;
//! - fetches go to the harness ([`FetchHook`]), which answers them from the serving node's
//!   [`Endpoint::resync_source`] ([`answer_fetch`]) and puts the answer's items into this
//!   node's inbox with their arrival times ([`EndpointNode::deliver_fetched`]); each item is
//!   handed to [`Endpoint::handle_fetched`] at its time, and nothing more of a fetch the
//!   endpoint cancelled is delivered;
//! - events go to the harness ([`EventHook`]).
//!
//! What it must not do: decide anything an endpoint decides (when to resync and from whom,
//! what to persist, when to send), read a clock, or draw randomness.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use rekeycast_proto::endpoint::gcks::{GcksStoreOp, RestoredGcks};
use rekeycast_proto::endpoint::member::MemberStoreOp;
use rekeycast_proto::endpoint::{
    Destination as EndpointDestination, Endpoint, FetchFailure, FetchId, FetchRequest, FetchWhat,
    Fetched, Job, Port, Storage, StoreError, StoreErrorKind,
};
use rekeycast_proto::lkh::{snapshot, KeyRng, KeyTree, MemberId, MemberKeys};
use rekeycast_proto::resync::connection::StreamStart;
use rekeycast_proto::resync::{Lookup, ResyncSource};
use rekeycast_proto::session::StoredMessage;

use super::{Destination, Interest, Node, Transmit};

/// Bytes a resync answer costs beyond its payloads, per frame (the TCP codec's frame header
/// and sequence fields), counted against a fetch's byte cap.
pub const FRAME_OVERHEAD: usize = 16;

/// Called with each event an endpoint emits, at the instant it is emitted.
pub type EventHook<E> = Box<dyn FnMut(Instant, <E as Endpoint>::Event)>;

/// Called with each fetch an endpoint asks for, at the instant it asks.
pub type FetchHook = Box<dyn FnMut(Instant, FetchRequest)>;

/// How the datagrams of one node map onto the endpoint's ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    /// The port datagrams arrive on, unless they come from `upstream`.
    pub default: Port,
    /// The sender of the group the endpoint listens to, if it has one besides what it serves
    /// (a relay's GCKS): its datagrams arrive on [`Port::Listen`].
    pub upstream: Option<SocketAddr>,
    /// The address the endpoint knows its listened multicast group by: a unicast to it is a
    /// datagram to the node's group.
    pub group: Option<SocketAddr>,
}

impl PortMap {
    /// Every datagram on `port`, no upstream, no group address.
    pub fn on(port: Port) -> Self {
        Self {
            default: port,
            upstream: None,
            group: None,
        }
    }

    /// The port a datagram from `from` arrives on.
    pub fn port_of(&self, from: SocketAddr) -> Port {
        if self.upstream == Some(from) {
            Port::Listen
        } else {
            self.default
        }
    }
}

/// What an [`EndpointNode`] did, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointNodeCounters {
    /// Jobs run.
    pub jobs: u64,
    /// Store operations applied.
    pub stores_applied: u64,
    /// Store operations the storage refused.
    pub stores_failed: u64,
    /// Fetches the endpoint asked for.
    pub fetches: u64,
    /// Fetches it cancelled before their end.
    pub fetches_cancelled: u64,
    /// Items (manifest and chunk pairs) handed to the endpoint.
    pub items_delivered: u64,
    /// Of those, items from an endpoint the harness marked hostile.
    pub hostile_items: u64,
    /// Of those, items after which the endpoint had advanced (applied keys from them).
    pub hostile_items_applied: u64,
    /// Fetches that ended in [`Fetched::Failed`].
    pub fetches_failed: u64,
}

/// One item waiting in a node's inbox.
#[derive(Debug)]
struct Delivery {
    fetch: FetchId,
    item: Fetched,
    hostile: bool,
}

/// An [`Endpoint`] as a simulator [`Node`]. See the [module docs](self).
pub struct EndpointNode<E: Endpoint> {
    endpoint: E,
    storage: Box<dyn Storage<E::StoreOp>>,
    ports: PortMap,
    on_event: EventHook<E>,
    on_fetch: FetchHook,
    /// How far the endpoint has got (a member's next sequence number), to tell whether an
    /// item applied.
    progress: Option<fn(&E) -> u64>,
    /// Which datagrams the endpoint drops unread ([`Node::interest`]); `None`: none.
    interest: Option<fn(&E) -> Interest>,
    /// Fetch answers waiting for their arrival time, by (time, arrival order).
    inbox: BTreeMap<(Instant, u64), Delivery>,
    next_order: u64,
    cancelled: BTreeSet<FetchId>,
    counters: EndpointNodeCounters,
}

impl<E: Endpoint> fmt::Debug for EndpointNode<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointNode")
            .field("ports", &self.ports)
            .field("inbox", &self.inbox.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl<E: Endpoint> EndpointNode<E> {
    /// Wraps `endpoint`, applying its store operations to `storage` and handing its events and
    /// fetches to the hooks.
    pub fn new(
        endpoint: E,
        storage: Box<dyn Storage<E::StoreOp>>,
        ports: PortMap,
        on_event: EventHook<E>,
        on_fetch: FetchHook,
    ) -> Self {
        Self {
            endpoint,
            storage,
            ports,
            on_event,
            on_fetch,
            progress: None,
            interest: None,
            inbox: BTreeMap::new(),
            next_order: 0,
            cancelled: BTreeSet::new(),
            counters: EndpointNodeCounters::default(),
        }
    }

    /// Measures the endpoint's progress with `progress` (non-decreasing; it grows when the
    /// endpoint applies an item), so that items from hostile endpoints that applied are
    /// counted ([`EndpointNodeCounters::hostile_items_applied`]).
    pub fn with_progress(mut self, progress: fn(&E) -> u64) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Reads which datagrams the endpoint would drop unread with `interest` (see
    /// [`Node::interest`]): it must name only datagrams whose handling changes nothing in the
    /// endpoint but its drop counters.
    pub fn with_interest(mut self, interest: fn(&E) -> Interest) -> Self {
        self.interest = Some(interest);
        self
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &E {
        &self.endpoint
    }

    /// The endpoint, to call it from outside (then drain it with [`Self::pump`], and touch
    /// the node in its network).
    pub fn endpoint_mut(&mut self) -> &mut E {
        &mut self.endpoint
    }

    /// What the node did.
    pub fn counters(&self) -> &EndpointNodeCounters {
        &self.counters
    }

    /// Hands the endpoint a command, then drains it.
    pub fn command(&mut self, now: Instant, command: E::Command) {
        self.endpoint.handle_command(now, command);
        self.pump(now);
    }

    /// Puts `item`, an answer of fetch `fetch`, into the inbox: it is handed to the endpoint
    /// at `at` (not before the node's next interaction at or after it). `hostile`: it comes
    /// from an endpoint the harness made misbehave (counted).
    pub fn deliver_fetched(&mut self, at: Instant, fetch: FetchId, item: Fetched, hostile: bool) {
        if self.cancelled.contains(&fetch) {
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.inbox.insert(
            (at, order),
            Delivery {
                fetch,
                item,
                hostile,
            },
        );
    }

    /// Drains the endpoint after an input, as the driver does: store operations (applied and
    /// acknowledged at once) and jobs (run inline) until none is left, then cancelled fetches,
    /// new fetches and events to the hooks.
    pub fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some((id, op)) = self.endpoint.poll_store() {
                let result = self.storage.apply(&op);
                match result {
                    Ok(()) => self.counters.stores_applied += 1,
                    Err(_) => self.counters.stores_failed += 1,
                }
                self.endpoint.handle_stored(now, id, result);
                progressed = true;
            }
            while let Some(job) = self.endpoint.poll_job() {
                self.counters.jobs += 1;
                let output = job.run();
                self.endpoint.handle_job_result(now, output);
                progressed = true;
            }
            while let Some(id) = self.endpoint.poll_cancel_fetch() {
                self.cancel(id);
            }
            while let Some(request) = self.endpoint.poll_fetch() {
                self.counters.fetches += 1;
                (self.on_fetch)(now, request);
            }
            while let Some(event) = self.endpoint.poll_event() {
                (self.on_event)(now, event);
            }
            if !progressed {
                return;
            }
        }
    }

    /// Drops what is still to come of fetch `id`: the driver closes its connection.
    fn cancel(&mut self, id: FetchId) {
        self.counters.fetches_cancelled += 1;
        self.cancelled.insert(id);
        self.inbox.retain(|_, delivery| delivery.fetch != id);
    }

    /// Hands the endpoint every inbox item due at `now`, in arrival order.
    fn deliver_due(&mut self, now: Instant) {
        while let Some(entry) = self.inbox.first_entry() {
            if entry.key().0 > now {
                return;
            }
            let delivery = entry.remove();
            if self.cancelled.contains(&delivery.fetch) {
                continue;
            }
            let is_item = matches!(delivery.item, Fetched::Item { .. });
            if is_item {
                self.counters.items_delivered += 1;
            }
            if matches!(delivery.item, Fetched::Failed { .. }) {
                self.counters.fetches_failed += 1;
            }
            let hostile_item = is_item && delivery.hostile;
            let before = self.progress.map(|progress| progress(&self.endpoint));
            self.endpoint
                .handle_fetched(now, delivery.fetch, delivery.item);
            if hostile_item {
                self.counters.hostile_items += 1;
                let after = self.progress.map(|progress| progress(&self.endpoint));
                if after > before {
                    self.counters.hostile_items_applied += 1;
                }
            }
            self.pump(now);
        }
    }
}

impl<E: Endpoint> Node for EndpointNode<E> {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let port = self.ports.port_of(from);
        self.endpoint.handle_datagram(now, port, from, bytes);
        self.pump(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.deliver_due(now);
        // As the driver: the endpoint is called only once its own deadline came.
        if self.endpoint.poll_timeout().is_some_and(|at| at <= now) {
            self.endpoint.handle_timeout(now);
            self.pump(now);
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let transmit = self.endpoint.poll_transmit(now, buf)?;
        let destination = match transmit.destination {
            EndpointDestination::Group => Destination::Group,
            EndpointDestination::Unicast(addr) if self.ports.group == Some(addr) => {
                Destination::Group
            }
            EndpointDestination::Unicast(addr) => Destination::Unicast(addr),
        };
        Some(Transmit {
            destination,
            len: transmit.len,
        })
    }

    fn interest(&self) -> Interest {
        self.interest
            .map_or(Interest::All, |interest| interest(&self.endpoint))
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let inbox = self.inbox.keys().next().map(|(at, _)| *at);
        match (self.endpoint.poll_timeout(), inbox) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The answer a resync endpoint serving `source` gives `request`, item by item and ending
/// with exactly one terminal item, as the engine's resync server and fetch client together
/// deliver it: a state answer, or every held message from the one asked for to the latest
/// (then [`Fetched::End`]), or where the stream stops ([`Fetched::BeyondHistory`],
/// [`Fetched::NotHeld`] at a hole, [`Fetched::Failed`] for another group or an unknown leaf).
/// Items past the request's byte cap are replaced by [`Fetched::Failed`] with
/// [`FetchFailure::TooLarge`]. `None`: the node serves no history (refused).
pub fn answer_fetch(source: Option<&dyn ResyncSource>, request: &FetchRequest) -> Vec<Fetched> {
    let refused = || Fetched::Failed {
        reason: FetchFailure::Refused,
    };
    let Some(source) = source else {
        return vec![refused()];
    };
    if source.group_id() != request.group_id {
        return vec![refused()];
    }
    let mut out = Vec::new();
    let mut budget = request.max_bytes;
    let mut take = |bytes: usize| match budget.checked_sub(bytes) {
        Some(rest) => {
            budget = rest;
            true
        }
        None => false,
    };
    let too_large = Fetched::Failed {
        reason: FetchFailure::TooLarge,
    };
    match request.what {
        FetchWhat::State => {
            if let Some((_, manifest)) = source.latest() {
                if !take(manifest.len() + FRAME_OVERHEAD) {
                    return vec![too_large];
                }
                out.push(Fetched::State(manifest.to_vec()));
            }
            out.push(Fetched::End);
        }
        FetchWhat::Items { from_seq, leaf } => {
            let stream = match StreamStart::check(source, request.group_id, from_seq, leaf) {
                StreamStart::UnknownGroup => return vec![refused()],
                StreamStart::NotYetSent { .. } => return vec![Fetched::End],
                StreamStart::BeyondHistory { .. } => return vec![Fetched::BeyondHistory],
                StreamStart::Stream(stream) => stream,
            };
            for seq in stream.next_seq..=stream.last_seq {
                let terminal = match (source.manifest(seq), source.chunk(seq, stream.leaf)) {
                    (Lookup::Found(manifest), Lookup::Found(chunk)) => {
                        if !take(manifest.len() + chunk.len() + 2 * FRAME_OVERHEAD) {
                            out.push(too_large);
                            return out;
                        }
                        out.push(Fetched::Item {
                            manifest: manifest.to_vec(),
                            chunk: chunk.to_vec(),
                        });
                        continue;
                    }
                    (Lookup::BeyondHistory { .. }, _) | (_, Lookup::BeyondHistory { .. }) => {
                        Fetched::BeyondHistory
                    }
                    (Lookup::NotYetSent { .. }, _) | (_, Lookup::NotYetSent { .. }) => Fetched::End,
                    // An unknown leaf: the client takes the refusal as a failure.
                    (Lookup::Found(_), Lookup::NotFound) => refused(),
                    (Lookup::NotFound, _) => Fetched::NotHeld,
                };
                out.push(terminal);
                return out;
            }
            out.push(Fetched::End);
        }
    }
    out
}

/// A GCKS's durable state in memory: what its state directory and leave journal would hold.
/// [`Self::restored`] is what a restarted driver loads from it.
#[derive(Debug, Default, Clone)]
pub struct MemGcksStorage {
    /// The committed tree's snapshot file (magic, hash, body).
    tree: Option<Vec<u8>>,
    /// The committed messages, oldest first, at most `history` of them.
    messages: Vec<StoredMessage>,
    /// How many messages are kept (the sender's history window).
    history: usize,
    /// Leaves recorded, in order, and how many of them the latest release covers.
    leaves: Vec<MemberId>,
    released_through: usize,
    /// The latest released batch.
    released_seq: u64,
    /// Leaves recorded before the current endpoint started (its marks count from there).
    base: usize,
    /// The highest sequence number committed so far, over every endpoint that used the
    /// storage.
    last_committed: u64,
    /// Commits whose sequence number was not above every one committed before: a sequence
    /// number reused.
    reused_seqs: u64,
}

impl MemGcksStorage {
    /// An empty storage keeping the latest `history` messages.
    pub fn new(history: usize) -> Self {
        Self {
            history: history.max(1),
            ..Self::default()
        }
    }

    /// What a restarted driver loads, `None` before the first commit; the restored tree
    /// draws from `rng`. The endpoint restored from it counts its leave marks from here.
    pub fn restored(&mut self, rng: KeyRng) -> Option<RestoredGcks> {
        let tree = KeyTree::from_snapshot_bytes(self.tree.as_ref()?, rng).ok()?;
        self.base = self.leaves.len();
        let unreleased_batch = self.released_seq < tree.seq();
        Some(RestoredGcks {
            messages: self
                .messages
                .iter()
                .filter(|m| m.seq <= tree.seq())
                .cloned()
                .collect(),
            tree,
            // Memory loses nothing it was given.
            not_held: Vec::new(),
            journal_leaves: self.leaves[self.released_through.min(self.leaves.len())..].to_vec(),
            unreleased_batch,
        })
    }

    /// The highest sequence number committed.
    pub fn last_committed(&self) -> u64 {
        self.last_committed
    }

    /// Commits that reused a sequence number already committed (0 for a correct GCKS).
    pub fn reused_seqs(&self) -> u64 {
        self.reused_seqs
    }
}

/// A storage shared between the endpoint that writes it and the harness that reads it (to
/// restore a restarted endpoint from it, or to check what was saved).
#[derive(Debug, Default)]
pub struct SharedStorage<S>(pub Rc<RefCell<S>>);

impl<S> Clone for SharedStorage<S> {
    fn clone(&self) -> Self {
        Self(Rc::clone(&self.0))
    }
}

impl<Op, S: Storage<Op>> Storage<Op> for SharedStorage<S> {
    fn apply(&mut self, op: &Op) -> Result<(), StoreError> {
        self.0.borrow_mut().apply(op)
    }
}

impl Storage<GcksStoreOp> for MemGcksStorage {
    fn apply(&mut self, op: &GcksStoreOp) -> Result<(), StoreError> {
        match op {
            GcksStoreOp::RecordLeave(member) => self.leaves.push(*member),
            GcksStoreOp::CommitBatch { seq, tree, message } => {
                if *seq <= self.last_committed {
                    self.reused_seqs += 1;
                }
                self.last_committed = self.last_committed.max(*seq);
                let mut file = snapshot::MAGIC.to_vec();
                file.extend_from_slice(blake3::hash(tree).as_bytes());
                file.extend_from_slice(tree);
                self.tree = Some(file);
                self.messages.retain(|m| m.seq < *seq);
                self.messages.push(message.clone());
                let excess = self.messages.len().saturating_sub(self.history);
                self.messages.drain(..excess);
            }
            GcksStoreOp::Release { seq, mark } => {
                let mark = usize::try_from(*mark).map_err(|_| StoreError {
                    kind: StoreErrorKind::Inconsistent,
                    detail: "release mark beyond the journal".into(),
                })?;
                self.released_seq = *seq;
                self.released_through = (self.base + mark).min(self.leaves.len());
            }
        }
        Ok(())
    }
}

/// A member's key file in memory.
#[derive(Debug, Default, Clone)]
pub struct MemMemberStorage {
    /// The saved state body and the last message it applied.
    saved: Option<(u64, Vec<u8>)>,
    /// Saves applied.
    pub saves: u64,
}

impl MemMemberStorage {
    /// The last message the saved keys applied.
    pub fn saved_seq(&self) -> Option<u64> {
        self.saved.as_ref().map(|(seq, _)| *seq)
    }

    /// The saved keys, read back as a restarting member would.
    pub fn load(&self) -> Option<MemberKeys> {
        let (_, body) = self.saved.as_ref()?;
        let mut file = rekeycast_proto::lkh::member_state::MAGIC.to_vec();
        file.extend_from_slice(blake3::hash(body).as_bytes());
        file.extend_from_slice(body);
        MemberKeys::from_state_bytes(&file).ok()
    }
}

impl Storage<MemberStoreOp> for MemMemberStorage {
    fn apply(&mut self, op: &MemberStoreOp) -> Result<(), StoreError> {
        match op {
            MemberStoreOp::SaveKeys { last_seq, body } => {
                self.saved = Some((*last_seq, body.to_vec()));
                self.saves += 1;
            }
            // A kind of operation added later is not durable here.
            #[allow(unreachable_patterns)]
            _ => {
                return Err(StoreError {
                    kind: StoreErrorKind::Io,
                    detail: "operation not stored by the simulator".into(),
                })
            }
        }
        Ok(())
    }
}

/// A storage that keeps nothing and acknowledges everything (an endpoint whose persistence is
/// off issues no operation; a relay's history is served from memory).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoStorage;

impl<Op> Storage<Op> for NoStorage {
    fn apply(&mut self, _op: &Op) -> Result<(), StoreError> {
        Ok(())
    }
}
