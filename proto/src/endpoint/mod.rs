//! The endpoint contract: what a GCKS, a member and a relay decide, fed and polled by a driver.
//!
//! An endpoint owns the orchestration around its sessions (when to close a batch, what to
//! persist before sending, when to resync and from whom) and no socket, clock, thread or file.
//! A driver (the engine crate's `Driver`, the simulator, a product's own runtime, the C ABI)
//! calls the `handle_*` methods as things happen and drains each `poll_*` method until it
//! returns `None`:
//!
//! - datagrams arrive on a [`Port`] and leave as a [`Transmit`] on one;
//! - CPU-heavy work (building and signing a batch) is a [`Job`] the driver runs where it likes
//!   (a worker thread, or inline) and hands back with [`Endpoint::handle_job_result`];
//! - durable state is written through [`Endpoint::poll_store`]: the driver applies each
//!   operation to its storage and acknowledges it with [`Endpoint::handle_stored`]; an endpoint
//!   releases what depended on an operation (the message to send, the answer to a command) only
//!   after its acknowledgement, so "acknowledged means durable" holds in one place;
//! - a resync is a [`FetchRequest`] to one resync endpoint; the driver streams what it gets
//!   back, item by item, with [`Endpoint::handle_fetched`], and the endpoint verifies and
//!   applies each as it comes and decides whether to go on elsewhere;
//! - [`Endpoint::poll_timeout`] is the earliest instant at which
//!   [`Endpoint::handle_timeout`] must be called, kept in a [`TimerTable`].
//!
//! The GCKS's endpoint is [`gcks::GcksEndpoint`].
//!
//! Time is always an argument: the same endpoint runs in real time under the engine's driver
//! and in virtual time under the simulator.

pub mod directive;
pub mod failover;
pub mod gcks;
pub mod member;
pub mod relay;
pub mod resync_policy;
mod timer;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use timer::TimerTable;

use crate::resync::ResyncSource;

/// The socket a datagram arrived on or leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Port {
    /// The socket this endpoint serves a group from: a GCKS's (or a relay's downstream) socket,
    /// which sends to the group it serves and receives its members' feedback.
    Serve,
    /// The socket bound to the group this endpoint listens to (a member's or a relay's
    /// upstream group). Receive only.
    Listen,
    /// The unicast socket towards the sender of the listened group (NACKs, probe replies,
    /// unicast repair): a member's or a relay's upstream feedback socket.
    Feedback,
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    /// The port's multicast group: the group a [`Port::Serve`] socket serves, or for
    /// [`Port::Feedback`] the listened group (NACKs in the multicast feedback mode).
    Group,
    /// One address.
    Unicast(SocketAddr),
}

/// A datagram an endpoint wants sent: the first `len` bytes of the buffer handed to
/// [`Endpoint::poll_transmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    /// The socket it leaves by.
    pub port: Port,
    /// Where it goes.
    pub destination: Destination,
    /// Its length in bytes.
    pub len: usize,
}

/// CPU-heavy work an endpoint hands out: pure computation, no I/O, runnable on any thread.
pub trait Job: Send + 'static {
    /// What the job gives back, to [`Endpoint::handle_job_result`].
    type Output: Send + 'static;
    /// Does the work.
    fn run(self) -> Self::Output;
}

/// The job of an endpoint that hands out none (a member): it has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoJob {}

impl Job for NoJob {
    type Output = NoJob;
    fn run(self) -> NoJob {
        match self {}
    }
}

/// Identifies one store operation, so its acknowledgement finds what waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreId(pub u64);

/// Why a store operation failed: nothing of it is durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct StoreError {
    /// The class of failure.
    pub kind: StoreErrorKind,
    /// What the storage said.
    pub detail: String,
}

/// The class of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The device is full or over quota: worth retrying later.
    NoSpace,
    /// Any other I/O failure.
    Io,
    /// What is stored does not fit what the endpoint holds (a corrupt or foreign file).
    Inconsistent,
}

/// Applies an endpoint's store operations durably: what the driver implements over its files
/// (and the simulator over memory).
pub trait Storage<Op> {
    /// Applies `op`; `Ok` means it is durable (synced).
    fn apply(&mut self, op: &Op) -> Result<(), StoreError>;
}

/// Identifies one fetch, so what streams back finds the fetch it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FetchId(pub u64);

/// The protocol of a resync endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResyncProtocol {
    /// Length-prefixed frames over TCP.
    Tcp,
    /// HTTP/1.1.
    Http,
}

/// One resync endpoint a fetch may go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResyncEndpoint {
    /// How to speak to it.
    pub protocol: ResyncProtocol,
    /// Where it is.
    pub addr: SocketAddr,
}

/// What a fetch asks one resync endpoint for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchWhat {
    /// The latest signed manifest (a state check).
    State,
    /// The manifest and own chunk of every message from `from_seq` on.
    Items {
        /// The first message wanted.
        from_seq: u64,
        /// The order key of the asker's leaf.
        leaf: u32,
    },
}

/// A fetch the driver performs: one connection to one endpoint, bounded in time and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchRequest {
    /// Echoed in every [`Endpoint::handle_fetched`] call of this fetch.
    pub id: FetchId,
    /// The group asked about.
    pub group_id: u32,
    /// Where to fetch from.
    pub endpoint: ResyncEndpoint,
    /// What to fetch.
    pub what: FetchWhat,
    /// The whole fetch (connect, request, every item) ends by then; what did not arrive by
    /// then is [`Fetched::Failed`].
    pub deadline: Instant,
    /// At most this many bytes are read in all; beyond, the fetch fails.
    pub max_bytes: usize,
}

/// What a fetch delivers, one call per item as it streams in; every fetch ends with exactly one
/// of the terminal values ([`Fetched::End`], [`Fetched::BeyondHistory`], [`Fetched::NotHeld`],
/// [`Fetched::Failed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The latest signed manifest (answer to [`FetchWhat::State`]).
    State(Vec<u8>),
    /// One message's signed manifest and the asker's chunk of it, in sequence order.
    Item {
        /// The signed manifest.
        manifest: Vec<u8>,
        /// The chunk that serves the asker's leaf.
        chunk: Vec<u8>,
    },
    /// The endpoint served everything it holds up to its latest message (for a state
    /// check: it has sent nothing yet).
    End,
    /// The messages wanted left the group's history: the asker must re-register.
    BeyondHistory,
    /// The endpoint does not hold the next message wanted (a relay behind, or with a gap).
    NotHeld,
    /// The fetch failed (connection, deadline, size cap, malformed answer): `reason` says how.
    Failed {
        /// What went wrong, for logs and counters.
        reason: FetchFailure,
    },
}

/// Why a fetch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FetchFailure {
    /// The connection could not be made or broke.
    Connection,
    /// The deadline passed.
    Deadline,
    /// The answer exceeded the size cap.
    TooLarge,
    /// The answer was malformed or for another group.
    Malformed,
    /// The endpoint refused (busy, rate-limited, not serving).
    Refused,
}

/// A sans-IO endpoint: a GCKS, a member or a relay.
pub trait Endpoint {
    /// What its owner asks of it (join, leave, rekey now, stop, ...).
    type Command;
    /// What it tells its owner.
    type Event;
    /// Work it hands out.
    type Job: Job;
    /// Operations it needs made durable.
    type StoreOp;

    /// A datagram arrived on `port` from `from`.
    fn handle_datagram(&mut self, now: Instant, port: Port, from: SocketAddr, bytes: &[u8]);
    /// Its owner asks something.
    fn handle_command(&mut self, now: Instant, command: Self::Command);
    /// A job it handed out finished.
    fn handle_job_result(&mut self, now: Instant, result: <Self::Job as Job>::Output);
    /// A job it handed out panicked on its worker: its output is lost. An endpoint that cannot
    /// go on without it stops (a GCKS poisons itself and answers every waiting command).
    fn handle_job_panicked(&mut self, now: Instant);
    /// A store operation it handed out was applied (`Ok`: durably) or failed.
    fn handle_stored(&mut self, now: Instant, id: StoreId, result: Result<(), StoreError>);
    /// An item of a fetch it asked for streamed in.
    fn handle_fetched(&mut self, now: Instant, id: FetchId, item: Fetched);
    /// The time returned by [`Endpoint::poll_timeout`] was reached.
    fn handle_timeout(&mut self, now: Instant);

    /// The next datagram to send, written to `buf`.
    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit>;
    /// The next job to run.
    fn poll_job(&mut self) -> Option<Self::Job>;
    /// The next operation to make durable, in order: the driver applies them in the order
    /// given.
    fn poll_store(&mut self) -> Option<(StoreId, Self::StoreOp)>;
    /// The next fetch to perform.
    fn poll_fetch(&mut self) -> Option<FetchRequest>;
    /// The next fetch to abandon before its end (its endpoint misbehaved and was dropped): the
    /// driver closes its connection and reports nothing more of it. What a driver still
    /// delivers of a cancelled fetch is ignored, so a driver may also let it run out.
    fn poll_cancel_fetch(&mut self) -> Option<FetchId> {
        None
    }
    /// The next event for its owner.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// When [`Endpoint::handle_timeout`] must next be called.
    fn poll_timeout(&self) -> Option<Instant>;

    /// The next multicast group to listen to instead of the one [`Port::Listen`] is on (a
    /// member that failed over to another relay): the driver joins it on a new socket and
    /// leaves the old group, and [`Port::Feedback`]'s [`Destination::Group`] follows. A group
    /// equal to the one listened to changes nothing.
    fn poll_listen(&mut self) -> Option<SocketAddr> {
        None
    }
    /// A request from `peer` was admitted by its resync server (a relay counts the members
    /// that reach it). Nothing by default.
    fn handle_resync_request(&mut self, now: Instant, peer: std::net::IpAddr) {
        let _ = (now, peer);
    }
    /// What its resync server serves (a GCKS's or a relay's history), if it serves one.
    fn resync_source(&self) -> Option<&dyn ResyncSource> {
        None
    }
    /// Whether it has stopped (asked to, or unable to go on): the driver ends its loop once
    /// every poll method is drained.
    fn is_stopped(&self) -> bool;
}

/// A delay spread over `[base, base + spread)` by `unit`, a uniform draw in `[0, 1)`: the
/// randomized start of a resync or state check, so a group that lost the same message does not
/// contact its endpoints in one instant.
pub fn spread(base: Duration, spread: Duration, unit: f64) -> Duration {
    base + spread.mul_f64(unit.clamp(0.0, 1.0))
}
