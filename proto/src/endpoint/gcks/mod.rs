//! The GCKS endpoint, sans-IO: [`GcksEndpoint`], the key server side of one group as a
//! driver runs it.
//!
//! It owns everything a key server decides between and around its rekey messages: the
//! [`SenderSession`] that sends them and answers NACKs, the committed key tree (and the spare
//! tree the next batch's fork reuses), the pending-membership table and batch schedule
//! ([`membership`]), the retry of failed batches with a doubling backoff, the poison that
//! stops it for good, the admission delay that lets joiners join the multicast group before
//! the message carrying their keys goes out, the set of members registered as relays, the
//! answers of resync endpoints and the figures of [`GcksEndpoint::stats`]. It owns no socket,
//! clock, thread, file or RNG: time is passed in, the wall-clock time stamped on each message
//! comes from a [`WallClock`] anchor, and the key tree's RNG and the sender instance id are
//! given to its constructors.
//!
//! # Membership commands and their answers
//!
//! A join or a leave carries a ticket `T` (the driver's way to find who asked); its answer is
//! an event ([`GcksEvent::JoinAnswered`], [`GcksEvent::LeaveAnswered`]) carrying the ticket
//! back, exactly once. A join is answered by its registration bundle once the batch admitting
//! the member is committed, or by an error. A leave that revokes a member is recorded durably
//! first ([`GcksStoreOp::RecordLeave`]) and answered once the driver acknowledges the record;
//! commands that come meanwhile wait for it, so the last command for a member still wins.
//! [`GcksCommand::Changes`] submits several changes under one ticket, each answered with its
//! index.
//!
//! # A batch is a transaction
//!
//! When a batch is due the endpoint hands out a [`BatchJob`] ([`Endpoint::poll_job`]): fork
//! the tree, apply the changes, build, sign and encode the message. Its output comes back by
//! [`Endpoint::handle_job_result`]; a durable endpoint then asks the driver to store it
//! ([`GcksStoreOp::CommitBatch`]: the message and the tree snapshot) and, once that is
//! acknowledged, takes the fork as its committed tree and releases the batch in the leave
//! journal ([`GcksStoreOp::Release`]); only after that acknowledgement do the joiners get their
//! bundles and does the message wait out the admission delay and go to the sender. The answers
//! of a big batch go out [`ANSWER_SLICE`] per turn of the driver (the next slice is due at
//! once), and its [`GcksEvent::Rekeyed`] and the admission delay follow the last one. A failed
//! build or store leaves the tree, the sequence number and the stored state as they were, and
//! the same batch (same changes, same sequence number) is offered again after a backoff
//! ([`GcksEvent::BatchFailed`]). A job that panicked, a release that failed or a committed
//! message the sender refuses poisons the endpoint ([`GcksEvent::Poisoned`]): every waiting
//! join is answered [`JoinError::Poisoned`], every later command is refused, and the stored
//! state is intact for a restart.
//!
//! # Restart
//!
//! [`GcksEndpoint::restore`] resumes from what the driver loaded ([`RestoredGcks`]: the
//! committed tree, the history window of stored messages, the leave journal's replay): the
//! history goes back to the sender (the last message is sent again: it may never have gone
//! out), journaled leaves and the joiners of a batch committed but never released are removed
//! in the first batch.

pub mod assignment;
mod batch;
pub mod lifetime;
pub mod membership;
pub mod rollover;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use zeroize::Zeroizing;

pub use batch::{BatchJob, BatchOutput, BuildSteps};
use lifetime::{LifetimeClock, LifetimeConfig, LifetimeError, LifetimePassed};
use membership::{Membership, Schedule};

use super::{
    Destination, Endpoint, FetchId, FetchRequest, Fetched, Port, StoreError, StoreErrorKind,
    StoreId, TimerTable, Transmit,
};
use crate::gsa::{RekeySa, WrapAlgorithm};
use crate::lkh::{Degree, KeyRng, KeyTree, LkhError, MemberId, RegistrationBundle};
use crate::resync::ResyncSource;
use crate::session::layout::MessageParams;
use crate::session::sender::{
    PreparedMessage, QueueError, ResyncLookup, SealedBlocks, SenderCounters, SenderEvent,
};
use crate::session::{ConfigError, SenderConfig, SenderSession, StoredMessage};

/// How a [`GcksEndpoint`] keys, builds, schedules and persists.
#[derive(Debug, Clone)]
pub struct GcksEndpointConfig {
    /// The group id (in every datagram's header).
    pub group_id: u32,
    /// The SPI of the Rekey SA.
    pub spi: u32,
    /// The key tree's degree (4 is the usual optimum).
    pub degree: Degree,
    /// How keys are wrapped.
    pub wrap_algorithm: WrapAlgorithm,
    /// Lifetime of each Data SA, seconds (its hard lifetime).
    pub data_sa_lifetime_secs: u32,
    /// Soft lifetimes (when the GCKS refreshes with no membership change), the group and
    /// signing keys' lifetimes, and the takeover delays each new Data SA carries. See
    /// [`lifetime`].
    pub lifetimes: LifetimeConfig,
    /// The sender session's configuration.
    pub sender: SenderConfig,
    /// How messages are built (the SPI and the timestamp are set by the endpoint).
    pub message: MessageParams,
    /// When batches are due and how failed ones are retried.
    pub schedule: Schedule,
    /// Time between handing a batch's joiners their bundles and queueing the batch's message,
    /// so that they can join the multicast group first (the message carries their path keys).
    pub admission_delay: Duration,
    /// Whether the driver persists ([`GcksStoreOp`]): a leave is recorded and a batch stored
    /// before either is acknowledged. Without it, no store operation is issued and nothing
    /// survives a restart.
    pub durable: bool,
}

impl GcksEndpointConfig {
    /// The Rekey SA of this configuration, signed by `public_key`'s owner.
    pub fn rekey_sa(&self, public_key: ed25519_dalek::VerifyingKey) -> RekeySa {
        RekeySa {
            group_id: self.group_id,
            spi: self.spi,
            wrap_algorithm: self.wrap_algorithm,
            degree: self.degree,
            gcks_public_key: public_key,
            data_sa_lifetime_secs: self.data_sa_lifetime_secs,
        }
    }
}

/// The wall clock at one instant: the endpoint stamps each message with
/// `unix_micros + (now - at)`, so it reads no clock itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    /// Microseconds since the Unix epoch at `at`.
    pub unix_micros: u64,
    /// The instant the reading was taken.
    pub at: Instant,
}

impl WallClock {
    /// Microseconds since the Unix epoch at `now` (no earlier than the anchor).
    pub fn unix_micros_at(&self, now: Instant) -> u64 {
        self.unix_micros
            .saturating_add(micros(now.saturating_duration_since(self.at)))
    }
}

/// One membership change of a [`GcksCommand::Changes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Admit the member.
    Join(MemberId),
    /// Admit the member as a relay.
    JoinRelay(MemberId),
    /// Remove the member (or cancel its pending join).
    Leave(MemberId),
}

/// What the owner of a [`GcksEndpoint`] asks of it; `T` is a ticket its answer carries back.
#[derive(Debug, Clone)]
pub enum GcksCommand<T> {
    /// Admit `member` in the next batch (as a relay if `relay`): answered by
    /// [`GcksEvent::JoinAnswered`].
    Join {
        /// The member.
        member: MemberId,
        /// Whether it registers as a relay ([`GcksEndpointStats::relays`]).
        relay: bool,
        /// Comes back with the answer.
        ticket: T,
    },
    /// Remove `member` in the next batch, or cancel its pending join: answered by
    /// [`GcksEvent::LeaveAnswered`].
    Leave {
        /// The member.
        member: MemberId,
        /// Comes back with the answer.
        ticket: T,
    },
    /// Several changes in order, as if each were its own command: change `i` is answered
    /// with `part: Some(i)` and a clone of `ticket`.
    Changes {
        /// The changes.
        changes: Vec<Change>,
        /// Comes back with each answer.
        ticket: T,
    },
    /// Apply the pending changes now (or refresh the group key if there are none); a failed
    /// batch waiting for its retry is retried now.
    RekeyNow,
    /// Stop: every waiting join is answered [`JoinError::Stopped`], later commands are
    /// refused, and [`Endpoint::is_stopped`] turns true.
    Stop,
}

/// What a [`GcksEndpoint`] tells its owner.
#[derive(Debug, Clone)]
#[non_exhaustive]
// A bundle is the large variant; events are a few per batch, so boxing it buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum GcksEvent<T> {
    /// A signing-key rollover took effect: message `from_seq`, the first signed with the new
    /// key, is committed (stored, for a durable endpoint). The driver may now make the new
    /// key's file the current one and delete the old key's ([`rollover`]).
    SigningKeyRolled {
        /// The first message signed with the new key.
        from_seq: u64,
        /// The new key's id.
        key_id: crate::session::manifest::KeyId,
    },
    /// The answer to a join: the member's registration bundle once the batch admitting it is
    /// committed and released, or why not.
    JoinAnswered {
        /// The command's ticket.
        ticket: T,
        /// The change's index in a [`GcksCommand::Changes`]; `None` for a
        /// [`GcksCommand::Join`].
        part: Option<usize>,
        /// The answer.
        result: Result<RegistrationBundle, JoinError>,
    },
    /// The answer to a leave (with a durable endpoint, a revocation is answered once it is
    /// recorded).
    LeaveAnswered {
        /// The command's ticket.
        ticket: T,
        /// The change's index in a [`GcksCommand::Changes`]; `None` for a
        /// [`GcksCommand::Leave`].
        part: Option<usize>,
        /// The answer.
        result: Result<LeaveOutcome, LeaveError>,
    },
    /// A batch was committed and its message waits out the admission delay.
    Rekeyed {
        /// The message's sequence number.
        seq: u64,
        /// Members admitted by it.
        joined: usize,
        /// Members removed by it.
        left: usize,
        /// Group size after it.
        members: usize,
        /// Chunks (source symbols) of its message.
        chunks: usize,
        /// Time from handing this attempt of the batch out to its commit (build, sign, encode,
        /// store).
        build_time: Duration,
    },
    /// Message `seq` went to the sender: its transmission starts now.
    Queued {
        /// The message.
        seq: u64,
    },
    /// The initial transmission of message `seq` is on the wire.
    Sent {
        /// The message.
        seq: u64,
    },
    /// A batch failed before anything of it was committed: the key tree, the sequence number
    /// and the stored state are as they were, and a batch with membership changes is tried
    /// again (same changes, same sequence number) after `retry_in` or at the next
    /// [`GcksCommand::RekeyNow`]. A batch without changes (a refresh of the group key) is not
    /// retried (`retry_in` is `None`): the next rekey takes the same sequence number.
    BatchFailed {
        /// The sequence number the batch's message gets when it succeeds.
        seq: u64,
        /// Attempts of this batch so far.
        attempt: u32,
        /// What went wrong.
        reason: BatchFailure,
        /// The error's text, for the operator's log.
        detail: String,
        /// When the batch is tried again; `None`: not retried (it had no changes).
        retry_in: Option<Duration>,
    },
    /// The endpoint cannot go on: every waiting join was answered [`JoinError::Poisoned`],
    /// every later command is refused with the same reason, and it stops. The stored state is
    /// intact: an endpoint restored from it resumes.
    Poisoned {
        /// Why.
        reason: PoisonReason,
    },
    /// The latest Data SA or group key reached its soft lifetime with no rekey since: the
    /// GCKS asked for a refresh (an empty batch, see [`lifetime`]), whose message follows as
    /// usual ([`GcksEvent::Rekeyed`]).
    Refreshing,
    /// A key reached a lifetime: a hard lifetime means no rekey replaced it in time (the
    /// refresh keeps failing: the operator must look), the signing key's soft lifetime means
    /// it is time to roll it over.
    LifetimePassed(LifetimePassed),
}

impl<T> GcksEvent<T> {
    /// Splits the answers off the other events: an event that carries no ticket (every one
    /// but [`GcksEvent::JoinAnswered`] and [`GcksEvent::LeaveAnswered`]) comes back as `Ok`
    /// under any ticket type `U`, an answer comes back unchanged as `Err`.
    ///
    /// An owner that routes the answers itself hands the rest on as `GcksEvent<U>` with an
    /// uninhabited `U` ([`std::convert::Infallible`]): events that can never be answers.
    // An answer comes back as it came (the large variant, like the event itself).
    #[allow(clippy::result_large_err)]
    pub fn without_ticket<U>(self) -> Result<GcksEvent<U>, Self> {
        Ok(match self {
            answer @ (Self::JoinAnswered { .. } | Self::LeaveAnswered { .. }) => {
                return Err(answer)
            }
            Self::Rekeyed {
                seq,
                joined,
                left,
                members,
                chunks,
                build_time,
            } => GcksEvent::Rekeyed {
                seq,
                joined,
                left,
                members,
                chunks,
                build_time,
            },
            Self::Queued { seq } => GcksEvent::Queued { seq },
            Self::Sent { seq } => GcksEvent::Sent { seq },
            Self::BatchFailed {
                seq,
                attempt,
                reason,
                detail,
                retry_in,
            } => GcksEvent::BatchFailed {
                seq,
                attempt,
                reason,
                detail,
                retry_in,
            },
            Self::Poisoned { reason } => GcksEvent::Poisoned { reason },
            Self::SigningKeyRolled { from_seq, key_id } => {
                GcksEvent::SigningKeyRolled { from_seq, key_id }
            }
            Self::Refreshing => GcksEvent::Refreshing,
            Self::LifetimePassed(passed) => GcksEvent::LifetimePassed(passed),
        })
    }
}

/// An operation a durable [`GcksEndpoint`] needs applied to its storage, in the order given.
#[derive(Debug)]
pub enum GcksStoreOp {
    /// Append a leave of the member to the leave journal (it is acknowledged once this is).
    RecordLeave(MemberId),
    /// Store message `seq` and the key tree that made it, the message first and the tree last
    /// (the tree's write is the commit point).
    CommitBatch {
        /// The message's sequence number (the tree's).
        seq: u64,
        /// The tree's snapshot body ([`KeyTree::snapshot_body`]).
        tree: Zeroizing<Vec<u8>>,
        /// The message's stored parts.
        message: StoredMessage,
    },
    /// Batch `seq` is committed and every leave recorded before `mark` leaves were recorded
    /// by this endpoint is applied: the journal releases them. `mark` counts the
    /// [`GcksStoreOp::RecordLeave`] operations this endpoint had acknowledged when the batch
    /// was first handed out (leaves replayed at restart are below every mark).
    Release {
        /// The batch's sequence number.
        seq: u64,
        /// Leaves recorded since the endpoint started that the batch applied.
        mark: u64,
    },
}

/// Why a batch failed (it is retried; nothing of it was committed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchFailure {
    /// The key tree refused the batch (full, or its counters exhausted, or no randomness).
    #[error("key tree: {0}")]
    Tree(LkhError),
    /// Laying out, signing or encoding the message failed.
    #[error("building the message")]
    Build,
    /// The message's FEC encoders could not be built.
    #[error("encoding the message")]
    Encode,
    /// The key tree's snapshot could not be encoded.
    #[error("encoding the key tree snapshot")]
    Snapshot,
    /// The storage refused the batch (a full or read-only disk, an inconsistent state).
    #[error("storing the batch: {0:?}")]
    Store(StoreErrorKind),
}

/// Why the endpoint stopped for good ([`GcksEvent::Poisoned`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoisonReason {
    /// A batch's job panicked on a worker thread.
    #[error("a batch job panicked on a worker")]
    WorkerPanicked,
    /// The worker pool is gone: no batch can be built.
    #[error("the worker pool is shut down")]
    WorkersGone,
    /// A committed batch's leaves could not be released in the leave journal.
    #[error("the leave journal could not be written: {0:?}")]
    Journal(StoreErrorKind),
    /// A committed message was refused by the sender session.
    #[error("a committed message could not be queued for sending")]
    QueueRefused,
}

/// What an acknowledged leave did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaveOutcome {
    /// The member is removed in the next batch; `durable`: the leave is in the leave journal,
    /// so it is applied even if the GCKS crashes first (false for an endpoint that is not
    /// durable).
    Revoked {
        /// Whether the leave survives a crash.
        durable: bool,
    },
    /// The member had a join waiting for its batch: the join is cancelled (its caller gets
    /// [`JoinError::Cancelled`], no bundle is issued). A member that had left and asked to
    /// join again in the same batch stays removed.
    JoinCancelled,
    /// A leave of the member was already waiting for its batch.
    AlreadyLeaving,
}

/// Why a leave was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaveError {
    /// The member is not in the group and has no join waiting.
    #[error("member {0:?} is not in the group")]
    UnknownMember(MemberId),
    /// The leave could not be recorded durably: it is not acknowledged and nothing changed.
    #[error("leave not recorded: {0}")]
    NotDurable(StoreError),
    /// The endpoint is poisoned.
    #[error("engine poisoned: {0}")]
    Poisoned(PoisonReason),
    /// The endpoint was stopped.
    #[error("engine stopped")]
    Stopped,
}

/// A change in the GCKS's relays ([`GcksEndpoint::relay_directive`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayChange {
    /// The relay with this number died.
    Down(u16),
    /// This relay joined or came back.
    Up(crate::lkh::RelayContact),
}

/// Why a join did not produce a registration bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The member is in the group (or joins in the batch being built): a member re-keys its
    /// leaf by leaving and joining again (both may wait for the same batch).
    #[error("member {0:?} is already in the group")]
    AlreadyMember(MemberId),
    /// A join of the member is already waiting for its batch.
    #[error("member {0:?} is already joining")]
    AlreadyJoining(MemberId),
    /// A leave of the member came before the batch: no bundle is issued.
    #[error("the join was cancelled by a later leave")]
    Cancelled,
    /// The endpoint is poisoned ([`GcksEvent::Poisoned`]).
    #[error("engine poisoned: {0}")]
    Poisoned(PoisonReason),
    /// The endpoint was stopped before the join's batch committed.
    #[error("engine stopped")]
    Stopped,
    /// The key tree did not produce the member's bundle.
    #[error(transparent)]
    Lkh(#[from] LkhError),
}

/// What a resync endpoint gets for one missed message ([`GcksEndpoint::resync_item`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncAnswer {
    /// The signed manifest and the asking member's chunk.
    Item {
        /// The signed manifest.
        manifest: Vec<u8>,
        /// The member's chunk (a whole source symbol).
        chunk: Vec<u8>,
    },
    /// The message left the history window: the member must re-register.
    BeyondHistory,
    /// The message was not sent yet (the member is up to date).
    NotSent,
    /// No chunk serves that leaf.
    NoChunk,
    /// The message is inside the history window but not held (lost from the state directory
    /// before a restart, [`RestoredGcks::not_held`]): another endpoint may hold it.
    NotHeld,
}

/// The endpoint's figures ([`GcksEndpoint::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcksEndpointStats {
    /// The sender session's counters.
    pub sender: SenderCounters,
    /// Repair orders made.
    pub repair_orders: u64,
    /// Members in the committed key tree (a batch being built does not count until it
    /// commits).
    pub members: usize,
    /// The latest message's sequence number.
    pub seq: u64,
    /// The version of the current group key.
    pub group_key_version: u32,
    /// Joins and leaves not committed yet: waiting for a batch, or in the batch being built or
    /// retried.
    pub pending: usize,
    /// Of the members, those registered as relays.
    pub relays: usize,
    /// Messages inside the history window that are not held (lost from the state directory
    /// before a restart, [`RestoredGcks::not_held`]).
    pub history_not_held: usize,
    /// What went to the unicast relays ([`GcksEndpoint::set_unicast_relays`]).
    pub uplinks: crate::relay::uplink::UplinkCounters,
    /// How long the steps of the last batch built took on its worker (wall clock).
    pub last_build_steps: Option<BuildSteps>,
    /// Refreshes asked because a key reached its soft lifetime ([`GcksEvent::Refreshing`]).
    pub refreshes: u64,
}

/// Why a [`GcksEndpoint`] could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GcksSetupError {
    /// The sender session's configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The restored key tree belongs to another group, SA or signing key.
    #[error("the restored state belongs to another group, SA or signing key")]
    ForeignState,
    /// The restored key tree's messages are signed by another key than the one given: the
    /// group's members only accept the key in their bundles, so the state cannot go on under
    /// this key (the right key is missing or was replaced).
    #[error(
        "the restored state was signed by key {stored}, not by the signing key given ({given}): \
         start with the key that signed it"
    )]
    ForeignKey {
        /// The public key of the restored state (hex).
        stored: String,
        /// The public key given (hex).
        given: String,
    },
    /// The lifetimes are inconsistent.
    #[error(transparent)]
    Lifetime(#[from] LifetimeError),
    /// A restored message cannot be put back in the sender's history.
    #[error("restored message {seq}")]
    Message {
        /// The message.
        seq: u64,
        /// What is wrong with it.
        source: QueueError,
    },
}

/// What a restarted durable GCKS resumes from, as its driver loaded it.
#[derive(Debug)]
pub struct RestoredGcks {
    /// The key tree as of the last committed message.
    pub tree: KeyTree,
    /// The committed messages still in the history window, ascending; the last one is the
    /// tree's sequence number.
    pub messages: Vec<StoredMessage>,
    /// Sequence numbers of messages inside the history window, older than the last, that the
    /// storage lost (missing or corrupt files): resync answers "not held" for them.
    pub not_held: Vec<u64>,
    /// Members whose leaves were acknowledged and not released by a committed batch, from
    /// the leave journal.
    pub journal_leaves: Vec<MemberId>,
    /// Whether the latest committed batch was never released: its joiners never got their
    /// bundles.
    pub unreleased_batch: bool,
}

/// The key server side of one group, sans-IO (see the [module docs](self)); `T` is the ticket
/// of a membership command.
///
/// Call order (as for every [`Endpoint`]): after any `handle_*` call or command, drain
/// [`Endpoint::poll_store`], [`Endpoint::poll_job`], [`Endpoint::poll_transmit`] and
/// [`Endpoint::poll_event`], then re-read [`Endpoint::poll_timeout`].
pub struct GcksEndpoint<T> {
    config: GcksEndpointConfig,
    /// The members' relays, when the GCKS assigns them ([`Self::set_relay_assignment`]).
    relay_assignment: Option<assignment::RelayAssignment>,
    signing_key: Arc<SigningKey>,
    /// A signing-key rollover under way.
    rollover: Option<rollover::Rollover>,
    clock: WallClock,
    session: SenderSession,
    /// The committed key tree; a batch job builds on a fork of it.
    tree: Arc<KeyTree>,
    /// The tree committed before it (or a failed batch's fork), whose allocations the next
    /// fork reuses ([`KeyTree::fork_into`]: about a third of a fresh copy's time at 2^20
    /// members, for a second tree's memory).
    spare: Option<KeyTree>,
    /// Whether `spare` is a fork of the committed tree (a fork job made it), ready for the
    /// next batch.
    spare_ready: bool,
    /// Whether a fork job is out (handed to the driver, its output not back yet).
    fork_out: bool,
    /// Whether fork jobs are handed out (not after one panicked: each batch forks itself).
    fork_ahead: bool,
    /// The message whose later blocks a pipelined batch job is still sealing
    /// ([`Job::run_partial`](crate::endpoint::Job::run_partial)).
    sealing: Option<u64>,
    membership: Membership<Waiter<T>>,
    /// Leaves recorded durably since the endpoint started ([`GcksStoreOp::Release`]).
    leaves_recorded: u64,
    /// `leaves_recorded` when the batch out was first handed out.
    batch_mark: u64,
    /// The job of the batch out, until the driver takes it, and when the batch started.
    job: Option<BatchJob>,
    batch_started: Option<Instant>,
    /// How long the steps of the last built batch took on its worker.
    last_build_steps: Option<BuildSteps>,
    /// Commands that wait for a leave's record to be acknowledged, in order.
    deferred: VecDeque<Op<T>>,
    /// Whether a leave's record is out (commands and batches wait for it).
    leave_in_flight: bool,
    store_ops: VecDeque<(StoreId, GcksStoreOp)>,
    next_store_id: u64,
    awaiting: BTreeMap<StoreId, Awaiting<T>>,
    /// A built batch whose [`GcksStoreOp::CommitBatch`] is out.
    committing: Option<batch::Built>,
    /// A committed batch whose [`GcksStoreOp::Release`] is out.
    releasing: Option<Releasing<T>>,
    /// Released batches whose joiners are being answered, [`ANSWER_SLICE`] a turn, in order;
    /// and the time of the last slice (the next is due then).
    answering: VecDeque<Answering<T>>,
    answer_at: Option<Instant>,
    /// Messages whose joiners have their bundles, waiting out the admission delay.
    held: VecDeque<(Instant, PreparedMessage)>,
    /// Members registered as relays.
    relays: HashSet<MemberId>,
    /// The relays that take the rekeys over unicast uplinks, and the copies for them.
    uplinks: crate::relay::uplink::UnicastFanout,
    /// The members registered as unicast, each message delivered to each by unicast.
    unicast: crate::session::unicast::UnicastMembers,
    /// Members whose join is to be answered with a unicast bundle ([`Self::mark_unicast`]).
    unicast_joins: HashSet<MemberId>,
    /// The registered unicast members' receiver ids (leaf order keys).
    unicast_keys: HashMap<MemberId, u32>,
    events: VecDeque<GcksEvent<T>>,
    timers: TimerTable<TIMERS>,
    stopped: bool,
    /// When keys were issued, and so when the next refresh is due.
    lifetimes: LifetimeClock,
    refreshes: u64,
}

impl<T> std::fmt::Debug for GcksEndpoint<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcksEndpoint")
            .field("group_id", &self.config.group_id)
            .field("seq", &self.tree.seq())
            .field("members", &self.tree.member_count())
            .field("pending", &self.membership.pending_changes())
            .field("poisoned", &self.membership.poisoned())
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

/// Who waits for a membership answer.
#[derive(Debug)]
struct Waiter<T> {
    ticket: T,
    part: Option<usize>,
}

/// One membership command, as the endpoint processes it.
#[derive(Debug)]
enum Op<T> {
    Join {
        member: MemberId,
        relay: bool,
        waiter: Waiter<T>,
    },
    Leave {
        member: MemberId,
        waiter: Waiter<T>,
    },
    Rekey,
}

/// What waits for a store operation's acknowledgement.
#[derive(Debug)]
enum Awaiting<T> {
    Leave {
        member: MemberId,
        waiter: Waiter<T>,
        outcome: LeaveOutcome,
    },
    Commit,
    Release,
}

/// A committed batch waiting for its release before its joiners get their bundles.
struct Releasing<T> {
    committed: membership::Committed<Waiter<T>>,
    bundles: batch::Bundles,
    message: PreparedMessage,
    members: usize,
    build_time: Duration,
}

/// A released batch whose joiners are answered slice by slice: the joiners left, their
/// bundles in the order the job built them, and what follows the last answer.
struct Answering<T> {
    joins: std::vec::IntoIter<membership::Joiner<Waiter<T>>>,
    bundles: std::iter::Peekable<std::vec::IntoIter<batch::Answer>>,
    /// The bundles left once one came out of step with the joins (none does from a job).
    out_of_step: Option<HashMap<MemberId, batch::BundleResult>>,
    message: PreparedMessage,
    joined: usize,
    left: usize,
    members: usize,
    build_time: Duration,
}

impl<T> Answering<T> {
    /// The bundle built for `member`.
    fn bundle(&mut self, member: MemberId) -> batch::BundleResult {
        if self.out_of_step.is_none() {
            if let Some((_, bundle)) = self.bundles.next_if(|(next, _)| *next == member) {
                return bundle;
            }
        }
        self.out_of_step
            .get_or_insert_with(|| self.bundles.by_ref().collect())
            .remove(&member)
            .unwrap_or(Err(LkhError::NotJustJoined(member)))
    }
}

/// Join answers a released batch hands out at most per call of a `handle_*` method: a
/// bigger batch's answers follow in slices, each due at once ([`Endpoint::poll_timeout`]),
/// so that a driver's turn never carries the answers of a whole 2^20-join batch. Its message
/// waits for its last answer before the admission delay starts.
pub const ANSWER_SLICE: usize = 256;

/// The endpoint's timers.
const TIMER_SESSION: usize = 0;
const TIMER_BATCH: usize = 1;
const TIMER_ADMISSION: usize = 2;
const TIMER_ANSWERS: usize = 3;
const TIMER_UNICAST: usize = 4;
const TIMER_LIFETIME: usize = 5;
const TIMERS: usize = 6;

impl<T: Clone> GcksEndpoint<T> {
    /// A GCKS with an empty key tree keyed by `rng` (the operating system's RNG in a
    /// deployment), signing with `signing_key`; `instance` is the sender instance id (drawn
    /// at random by the driver), `clock` anchors the timestamps of its messages.
    pub fn new(
        config: GcksEndpointConfig,
        signing_key: SigningKey,
        rng: KeyRng,
        instance: u32,
        clock: WallClock,
        now: Instant,
    ) -> Result<Self, GcksSetupError> {
        config.lifetimes.validate(config.data_sa_lifetime_secs)?;
        let tree = KeyTree::with_rng(config.rekey_sa(signing_key.verifying_key()), rng);
        let session = SenderSession::with_instance(
            config.sender.clone(),
            config.group_id,
            config.spi,
            instance,
            now,
        )?;
        let mut endpoint = Self::assemble(config, signing_key, clock, session, tree, now);
        endpoint.refresh_timers();
        Ok(endpoint)
    }

    /// A GCKS resuming from the state its driver loaded: the history goes back to the sender
    /// (the last message queued to be sent again: the GCKS may have died before sending it;
    /// members that have it drop it unchecked), and the journaled leaves of members still in
    /// the tree and the joiners of a batch committed and never released (they got no bundle)
    /// are removed in the first batch.
    pub fn restore(
        config: GcksEndpointConfig,
        signing_key: SigningKey,
        restored: RestoredGcks,
        instance: u32,
        clock: WallClock,
        now: Instant,
    ) -> Result<Self, GcksSetupError> {
        let RestoredGcks {
            tree,
            messages,
            not_held,
            journal_leaves,
            unreleased_batch,
        } = restored;
        config.lifetimes.validate(config.data_sa_lifetime_secs)?;
        let sa = config.rekey_sa(signing_key.verifying_key());
        let tree_sa = tree.rekey_sa();
        if tree_sa.group_id != sa.group_id || tree_sa.spi != sa.spi {
            return Err(GcksSetupError::ForeignState);
        }
        if tree_sa.gcks_public_key != sa.gcks_public_key {
            let hex = |key: &ed25519_dalek::VerifyingKey| {
                key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
            };
            return Err(GcksSetupError::ForeignKey {
                stored: hex(&tree_sa.gcks_public_key),
                given: hex(&sa.gcks_public_key),
            });
        }
        let mut session = SenderSession::with_instance(
            config.sender.clone(),
            config.group_id,
            config.spi,
            instance,
            now,
        )?;
        let count = messages.len();
        // Lost messages go back in order among the held ones; the last message is held.
        let latest = messages.last().map_or(0, |m| m.seq);
        let mut lost = not_held.into_iter().filter(|&seq| seq < latest).peekable();
        for (index, stored) in messages.iter().enumerate() {
            let seq = stored.seq;
            while let Some(lost_seq) = lost.next_if(|&lost_seq| lost_seq < seq) {
                session
                    .restore_not_held(lost_seq)
                    .map_err(|source| GcksSetupError::Message {
                        seq: lost_seq,
                        source,
                    })?;
            }
            let message = stored
                .to_prepared()
                .map_err(|source| GcksSetupError::Message { seq, source })?;
            let outcome = if index + 1 == count {
                session.queue_message(now, message)
            } else {
                session.restore_message(now, message)
            };
            outcome.map_err(|source| GcksSetupError::Message { seq, source })?;
        }
        let mut leaving: Vec<MemberId> = journal_leaves
            .into_iter()
            .filter(|member| tree.leaf_of(*member).is_some())
            .collect();
        if unreleased_batch {
            leaving.extend(tree.admitted_by_latest_batch());
        }
        leaving.sort_unstable();
        leaving.dedup();
        let mut endpoint = Self::assemble(config, signing_key, clock, session, tree, now);
        endpoint.membership.restore_leaves(leaving);
        endpoint.refresh_timers();
        Ok(endpoint)
    }

    fn assemble(
        config: GcksEndpointConfig,
        signing_key: SigningKey,
        clock: WallClock,
        session: SenderSession,
        mut tree: KeyTree,
        now: Instant,
    ) -> Self {
        let unicast = crate::session::unicast::UnicastMembers::new(
            crate::session::unicast::UnicastConfig::default(),
            config.group_id,
            config.spi,
        );
        tree.set_data_sa_timing(config.lifetimes.timing);
        let lifetimes = LifetimeClock::new(
            config.lifetimes,
            config.data_sa_lifetime_secs,
            now,
            tree.seq() > 0,
        );
        Self {
            lifetimes,
            refreshes: 0,
            membership: Membership::new(config.schedule, now),
            config,
            relay_assignment: None,
            signing_key: Arc::new(signing_key),
            rollover: None,
            clock,
            session,
            tree: Arc::new(tree),
            spare: None,
            spare_ready: false,
            fork_out: false,
            fork_ahead: true,
            sealing: None,
            leaves_recorded: 0,
            batch_mark: 0,
            job: None,
            batch_started: None,
            last_build_steps: None,
            deferred: VecDeque::new(),
            leave_in_flight: false,
            store_ops: VecDeque::new(),
            next_store_id: 0,
            awaiting: BTreeMap::new(),
            committing: None,
            releasing: None,
            answering: VecDeque::new(),
            answer_at: None,
            held: VecDeque::new(),
            relays: HashSet::new(),
            uplinks: crate::relay::uplink::UnicastFanout::default(),
            unicast,
            unicast_joins: HashSet::new(),
            unicast_keys: HashMap::new(),
            events: VecDeque::new(),
            timers: TimerTable::new(),
            stopped: false,
        }
    }

    /// Marks `member`, whose join is about to be (or was) commanded, as a unicast member: its
    /// join is answered with a bundle that has [`RegistrationBundle::unicast`] set, and it is
    /// registered ([`Self::register_unicast`]) then, to be found at the address its first
    /// acknowledgement comes from. Its leave forgets it.
    pub fn mark_unicast(&mut self, member: MemberId) {
        self.unicast_joins.insert(member);
    }

    /// Registers a unicast member (RFC 4046 5.1, multi-unicast) from its bundle (which has
    /// [`RegistrationBundle::unicast`] set): from its bundle's first message on, each message
    /// is delivered to it by unicast, at `addr` or, if `None`, where its first
    /// acknowledgement comes from. See [`crate::session::unicast`].
    pub fn register_unicast(&mut self, bundle: &RegistrationBundle, addr: Option<SocketAddr>) {
        let order_key = bundle.rekey_sa.degree.order_key(bundle.leaf);
        self.unicast.register(order_key, addr, bundle.first_seq);
        self.unicast_keys.insert(bundle.member, order_key);
        if let Some(seq) = self.session.latest_seq() {
            self.unicast.message_ready(seq);
        }
        self.refresh_timers();
    }

    /// Forgets a unicast member registered with [`Self::register_unicast`] (it left).
    pub fn unregister_unicast(&mut self, bundle: &RegistrationBundle) {
        let order_key = bundle.rekey_sa.degree.order_key(bundle.leaf);
        self.unicast.unregister(order_key);
        self.unicast_keys.remove(&bundle.member);
        self.refresh_timers();
    }

    /// How unicast members are delivered to (replacing the default).
    pub fn set_unicast_config(&mut self, config: crate::session::unicast::UnicastConfig) {
        self.unicast = crate::session::unicast::UnicastMembers::new(
            config,
            self.config.group_id,
            self.config.spi,
        );
    }

    /// What the unicast members cost and what came of it.
    pub fn unicast_counters(&self) -> &crate::session::unicast::UnicastCounters {
        self.unicast.counters()
    }

    /// Registers the relays that take the rekeys over unicast UDP instead of multicast
    /// (replacing those registered before): every datagram the GCKS multicasts (symbols,
    /// manifests, repair, heartbeats) goes to each of them too, or only to them
    /// ([`UnicastRelays::unicast_only`](crate::relay::uplink::UnicastRelays::unicast_only)),
    /// paced as the multicast and gathered per relay for GSO; their NACKs are answered like
    /// any receiver's, by the same copies. See [`crate::relay::uplink`].
    pub fn set_unicast_relays(
        &mut self,
        relays: crate::relay::uplink::UnicastRelays,
    ) -> Result<(), ConfigError> {
        self.uplinks.set_relays(relays)
    }

    /// The configuration.
    pub fn config(&self) -> &GcksEndpointConfig {
        &self.config
    }

    /// The committed key tree.
    pub fn tree(&self) -> &KeyTree {
        &self.tree
    }

    /// The sender session (its history is what the resync endpoints serve).
    pub fn session(&self) -> &SenderSession {
        &self.session
    }

    /// Why the endpoint is poisoned, if it is.
    pub fn poisoned(&self) -> Option<PoisonReason> {
        self.membership.poisoned()
    }

    /// The endpoint's figures.
    pub fn stats(&self) -> GcksEndpointStats {
        GcksEndpointStats {
            sender: *self.session.counters(),
            repair_orders: self.session.repair_stats().orders,
            members: self.tree.member_count(),
            seq: self.session.latest_seq().unwrap_or(0),
            group_key_version: self.tree.group_key().0,
            pending: self.membership.pending_changes(),
            relays: self.relays.len(),
            history_not_held: self.session.not_held().count(),
            uplinks: *self.uplinks.counters(),
            last_build_steps: self.last_build_steps,
            refreshes: self.refreshes,
        }
    }

    /// The signed manifest of message `seq` and the chunk of the member whose leaf has order
    /// key `order_key`: what a resync endpoint serves.
    pub fn resync_item(&self, seq: u64, order_key: u32) -> ResyncAnswer {
        match self.session.resync_item(seq, order_key) {
            Ok(item) => ResyncAnswer::Item {
                manifest: item.manifest.to_vec(),
                chunk: item.chunk.to_vec(),
            },
            Err(ResyncLookup::BeyondHistory { .. }) => ResyncAnswer::BeyondHistory,
            Err(ResyncLookup::NotSent) => ResyncAnswer::NotSent,
            Err(ResyncLookup::NotHeld) => ResyncAnswer::NotHeld,
            Err(_) => ResyncAnswer::NoChunk,
        }
    }

    /// The latest signed manifest: a resync endpoint's state answer.
    pub fn latest_manifest(&self) -> Option<Vec<u8>> {
        self.session.latest_manifest().map(|(_, m)| m.to_vec())
    }

    // ---- commands ----

    fn process(&mut self, now: Instant, op: Op<T>) {
        if self.leave_in_flight {
            self.deferred.push_back(op);
            return;
        }
        match op {
            Op::Join {
                member,
                relay,
                waiter,
            } => self.join(member, relay, waiter),
            Op::Leave { member, waiter } => self.leave(member, waiter),
            Op::Rekey => self.membership.request_rekey(now),
        }
    }

    fn join(&mut self, member: MemberId, relay: bool, waiter: Waiter<T>) {
        if self.stopped {
            self.answer_join(waiter, Err(JoinError::Stopped));
            return;
        }
        let in_tree = self.tree.leaf_of(member).is_some();
        if let Err((waiter, error)) = self.membership.join(member, relay, waiter, in_tree) {
            self.answer_join(waiter, Err(error));
        }
    }

    fn leave(&mut self, member: MemberId, waiter: Waiter<T>) {
        self.unicast_joins.remove(&member);
        if let Some(order_key) = self.unicast_keys.remove(&member) {
            self.unicast.unregister(order_key);
        }
        if self.stopped {
            self.answer_leave(waiter, Err(LeaveError::Stopped));
            return;
        }
        let in_tree = self.tree.leaf_of(member).is_some();
        let durable = self.config.durable;
        let mut recorded = false;
        let result = self.membership.leave(member, in_tree, |_| {
            recorded = true;
            Ok(durable)
        });
        match result {
            Ok(left) => {
                if let Some(cancelled) = left.cancelled {
                    self.answer_join(cancelled, Err(JoinError::Cancelled));
                }
                if recorded && durable {
                    // Durable before it is acknowledged: the answer waits for the record, and
                    // so does every later command (the last command for a member wins).
                    let id = self.push_store(GcksStoreOp::RecordLeave(member));
                    self.awaiting.insert(
                        id,
                        Awaiting::Leave {
                            member,
                            waiter,
                            outcome: left.outcome,
                        },
                    );
                    self.leave_in_flight = true;
                } else {
                    self.answer_leave(waiter, Ok(left.outcome));
                }
            }
            Err(error) => self.answer_leave(waiter, Err(error)),
        }
    }

    /// Processes the commands that waited for a leave's record, until another record is out.
    fn run_deferred(&mut self, now: Instant) {
        while !self.leave_in_flight {
            let Some(op) = self.deferred.pop_front() else {
                return;
            };
            self.process(now, op);
        }
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        for waiter in self.membership.take_tickets() {
            self.answer_join(waiter, Err(JoinError::Stopped));
        }
        if let Some(releasing) = self.releasing.take() {
            for joiner in releasing.committed.joins {
                self.answer_join(joiner.ticket, Err(JoinError::Stopped));
            }
        }
        self.flush_answers();
        for op in std::mem::take(&mut self.deferred) {
            self.refuse(op, None);
        }
        self.job = None;
    }

    /// Answers a command that can no longer be carried out: poisoned (`Some`) or stopped.
    fn refuse(&mut self, op: Op<T>, poison: Option<PoisonReason>) {
        match op {
            Op::Join { waiter, .. } => self.answer_join(
                waiter,
                Err(poison.map_or(JoinError::Stopped, JoinError::Poisoned)),
            ),
            Op::Leave { waiter, .. } => self.answer_leave(
                waiter,
                Err(poison.map_or(LeaveError::Stopped, LeaveError::Poisoned)),
            ),
            Op::Rekey => {}
        }
    }

    /// The endpoint cannot go on: fails every waiting join and deferred command, and says why.
    fn poison(&mut self, reason: PoisonReason) {
        if self.membership.poisoned().is_some() {
            return;
        }
        for waiter in self.membership.poison(reason) {
            self.answer_join(waiter, Err(JoinError::Poisoned(reason)));
        }
        if let Some(releasing) = self.releasing.take() {
            for joiner in releasing.committed.joins {
                self.answer_join(joiner.ticket, Err(JoinError::Poisoned(reason)));
            }
        }
        self.flush_answers();
        for op in std::mem::take(&mut self.deferred) {
            self.refuse(op, Some(reason));
        }
        self.job = None;
        self.committing = None;
        self.events.push_back(GcksEvent::Poisoned { reason });
    }

    /// Makes the GCKS assign members to relays: every member's registration bundle it answers
    /// from now on lists the member's relays ([`assignment::RelayAssignment::assign`]); a
    /// relay's does not.
    pub fn set_relay_assignment(&mut self, assignment: assignment::RelayAssignment) {
        self.relay_assignment = Some(assignment);
    }

    /// The relay assignment, if set.
    pub fn relay_assignment(&self) -> Option<&assignment::RelayAssignment> {
        self.relay_assignment.as_ref()
    }

    /// Relay `id` died (`up` false) or joined or came back (`up` true, with its contact): the
    /// signed [`RelayDirective`](crate::endpoint::directive::RelayDirective) moving members,
    /// for the product to hand its members. `None` without an assignment or when nothing
    /// changes.
    pub fn relay_directive(
        &mut self,
        change: RelayChange,
    ) -> Option<Result<Vec<u8>, crate::endpoint::directive::DirectiveError>> {
        let assignment = self.relay_assignment.as_mut()?;
        let mut directive = match change {
            RelayChange::Down(id) => assignment.relay_down(id)?,
            RelayChange::Up(contact) => assignment.relay_up(contact)?,
        };
        directive.group_id = self.config.group_id;
        Some(directive.sign(&self.signing_key))
    }

    fn answer_join(&mut self, waiter: Waiter<T>, result: Result<RegistrationBundle, JoinError>) {
        let unicast = (
            &mut self.unicast_joins,
            &mut self.unicast,
            &mut self.unicast_keys,
        );
        let result = result.map(|bundle| unicast_bundle(unicast, bundle));
        self.events.push_back(GcksEvent::JoinAnswered {
            ticket: waiter.ticket,
            part: waiter.part,
            result,
        });
    }

    fn answer_leave(&mut self, waiter: Waiter<T>, result: Result<LeaveOutcome, LeaveError>) {
        self.events.push_back(GcksEvent::LeaveAnswered {
            ticket: waiter.ticket,
            part: waiter.part,
            result,
        });
    }

    fn push_store(&mut self, op: GcksStoreOp) -> StoreId {
        let id = StoreId(self.next_store_id);
        self.next_store_id += 1;
        self.store_ops.push_back((id, op));
        id
    }

    // ---- batches ----

    /// Hands out the batch due, if one is (and no leave's record is out: a batch must not take
    /// a leave that is not durable yet).
    fn maybe_start_batch(&mut self, now: Instant) {
        // A fork job out will have the spare ready sooner than a fork of the batch's own: the
        // batch waits for it (its output, or its panic, comes back).
        if self.stopped
            || self.leave_in_flight
            || self.fork_out && self.job.is_none()
            || self.job.as_ref().is_some_and(|job| !job.fork_only)
        {
            return;
        }
        let Some(order) = self.membership.poll_batch(now) else {
            return;
        };
        // A fork job the driver has not taken yet: the batch forks itself.
        if let Some(fork) = self.job.take() {
            self.spare = fork.spare;
            self.spare_ready = false;
            self.fork_out = false;
        }
        if order.attempt == 1 {
            self.batch_mark = self.leaves_recorded;
        }
        self.batch_started = Some(now);
        let (signing_key, key_rollover) = self.rollover_for_batch(self.tree.seq() + 1);
        let params = MessageParams {
            spi: self.config.spi,
            timestamp_us: self.clock.unix_micros_at(now),
            key_rollover,
            ..self.config.message
        };
        self.job = Some(BatchJob {
            committed: Arc::clone(&self.tree),
            spare: self.spare.take(),
            spare_ready: std::mem::take(&mut self.spare_ready),
            fork_only: false,
            joins: order.joins,
            leaves: order.leaves,
            signing_key,
            params,
            durable: self.config.durable,
            proactive: Some(self.session.proactive_repair().clone()),
        });
    }

    /// Hands out a fork job (the committed tree copied into the spare ahead of the next
    /// batch), unless the spare is ready, a job is waiting for the driver or one is out.
    fn maybe_fork_ahead(&mut self) {
        if self.stopped
            || self.sealing.is_some()
            || !self.fork_ahead
            || self.spare_ready
            || self.fork_out
            || self.job.is_some()
            || self.membership.is_building()
            || self.membership.poisoned().is_some()
        {
            return;
        }
        self.fork_out = true;
        self.job = Some(BatchJob {
            committed: Arc::clone(&self.tree),
            spare: self.spare.take(),
            spare_ready: false,
            fork_only: true,
            joins: Vec::new(),
            leaves: Vec::new(),
            signing_key: Arc::clone(&self.signing_key),
            params: self.config.message,
            durable: false,
            proactive: None,
        });
    }

    /// A fork job's output: the spare, ready if the committed tree has not moved since.
    fn forked(&mut self, tree: KeyTree) {
        self.fork_out = false;
        if self.spare.is_some() {
            return;
        }
        self.spare_ready = tree.seq() == self.tree.seq();
        self.spare = Some(tree);
    }

    /// Hands the sealed datagrams of a pipelined message's later blocks to the message,
    /// wherever it is on its way to the sender session.
    fn add_sealed(&mut self, sealed: SealedBlocks) {
        let seq = sealed.seq();
        if sealed.is_last() && self.sealing == Some(seq) {
            self.sealing = None;
        }
        let message = self
            .committing
            .as_mut()
            .map(|built| &mut built.message)
            .into_iter()
            .chain(self.releasing.as_mut().map(|r| &mut r.message))
            .chain(self.answering.iter_mut().map(|a| &mut a.message))
            .chain(self.held.iter_mut().map(|(_, message)| message))
            .find(|message| message.seq() == seq);
        match message {
            Some(message) => message.add_sealed(sealed),
            None => {
                self.session.add_sealed(sealed);
            }
        }
    }

    fn batch_output(&mut self, now: Instant, output: BatchOutput) {
        let output = match output.0 {
            batch::Outcome::Forked(tree) => return self.forked(tree),
            batch::Outcome::Sealed(Ok(sealed)) => return self.add_sealed(sealed),
            batch::Outcome::Sealed(Err((seq, _))) => {
                // The message's initial transmission would wait for those blocks forever.
                if self.sealing == Some(seq) {
                    self.sealing = None;
                    self.poison(PoisonReason::QueueRefused);
                }
                return;
            }
            batch::Outcome::Batch(output) => output,
        };
        if self.membership.poisoned().is_some() || self.stopped || !self.membership.is_building() {
            return;
        }
        match output {
            Err(failed) => {
                if self.spare.is_none() {
                    self.spare = failed.spare;
                    self.spare_ready = false;
                }
                self.batch_failed(now, failed.reason, failed.detail);
            }
            Ok(mut built) => {
                self.last_build_steps = Some(built.steps);
                if built.message.is_sealing() {
                    self.sealing = Some(built.message.seq());
                }
                match built.stored.take() {
                    Some((tree, message)) => {
                        let seq = message.seq;
                        let id = self.push_store(GcksStoreOp::CommitBatch { seq, tree, message });
                        self.awaiting.insert(id, Awaiting::Commit);
                        self.committing = Some(built);
                    }
                    None => self.commit(now, built),
                }
            }
        }
    }

    fn batch_failed(&mut self, now: Instant, reason: BatchFailure, detail: String) {
        let attempt = self.membership.attempts();
        let retry_in = self.membership.batch_failed(now);
        self.events.push_back(GcksEvent::BatchFailed {
            seq: self.tree.seq() + 1,
            attempt,
            reason,
            detail,
            retry_in,
        });
    }

    /// Takes a built (and, for a durable endpoint, stored) batch: its tree becomes the
    /// committed one; then its release, then its joiners' bundles.
    fn commit(&mut self, now: Instant, built: batch::Built) {
        self.lifetimes.rekeyed(now);
        let members = built.tree.member_count();
        let replaced = std::mem::replace(&mut self.tree, Arc::new(built.tree));
        self.spare = Arc::try_unwrap(replaced).ok();
        self.spare_ready = false;
        let build_time = self
            .batch_started
            .take()
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        let Some(committed) = self.membership.batch_committed() else {
            return;
        };
        self.rollover_committed(now);
        let releasing = Releasing {
            committed,
            bundles: built.bundles,
            message: built.message,
            members,
            build_time,
        };
        // The batch is durable: it is released in the journal before any bundle of it is
        // handed out. A crash in between replays its leaves and removes its joiners, who got no
        // bundle (a member re-admitted in this batch: its last acknowledged command is the
        // leave).
        let changed =
            !releasing.committed.joins.is_empty() || !releasing.committed.leaves.is_empty();
        if self.config.durable && changed {
            let id = self.push_store(GcksStoreOp::Release {
                seq: self.tree.seq(),
                mark: self.batch_mark,
            });
            self.awaiting.insert(id, Awaiting::Release);
            self.releasing = Some(releasing);
        } else {
            self.release(now, releasing);
        }
    }

    /// Hands a released batch's joiners their bundles, [`ANSWER_SLICE`] at a time, then holds
    /// its message for the admission delay.
    fn release(&mut self, now: Instant, releasing: Releasing<T>) {
        let Releasing {
            committed,
            bundles,
            message,
            members,
            build_time,
        } = releasing;
        for member in &committed.leaves {
            self.relays.remove(member);
        }
        // The job built the bundles in the order of the batch's joins: they are taken in
        // step, a slice a turn (a 2^20-join batch's answers are too many for one turn of the
        // loop), and only what is out of step is indexed.
        self.answering.push_back(Answering {
            joined: committed.joins.len(),
            left: committed.leaves.len(),
            joins: committed.joins.into_iter(),
            bundles: bundles.into_iter().peekable(),
            out_of_step: None,
            message,
            members,
            build_time,
        });
        self.answer_slice(now, ANSWER_SLICE);
    }

    /// Hands out up to `budget` join answers of the released batches, in order; a batch whose
    /// last joiner is answered says it is rekeyed and its message is held for the admission
    /// delay (from `now`).
    fn answer_slice(&mut self, now: Instant, mut budget: usize) {
        while let Some(answering) = self.answering.front_mut() {
            while budget > 0 {
                let Some(joiner) = answering.joins.next() else {
                    break;
                };
                budget -= 1;
                let mut bundle = answering.bundle(joiner.member);
                if bundle.is_ok() && joiner.relay {
                    self.relays.insert(joiner.member);
                }
                // A member (not a relay) is given its relays.
                if let (Ok(bundle), Some(assignment), false) =
                    (&mut bundle, &mut self.relay_assignment, joiner.relay)
                {
                    bundle.directory = assignment.assign();
                }
                let unicast = (
                    &mut self.unicast_joins,
                    &mut self.unicast,
                    &mut self.unicast_keys,
                );
                let result = bundle
                    .map(|bundle| unicast_bundle(unicast, *bundle))
                    .map_err(JoinError::Lkh);
                self.events.push_back(GcksEvent::JoinAnswered {
                    ticket: joiner.ticket.ticket,
                    part: joiner.ticket.part,
                    result,
                });
            }
            if !answering.joins.as_slice().is_empty() {
                // The rest in the next turn.
                self.answer_at = Some(now);
                return;
            }
            let Some(done) = self.answering.pop_front() else {
                break;
            };
            let seq = done.message.seq();
            let chunks = done.message.chunk_count();
            let delay = if done.joined == 0 {
                Duration::ZERO
            } else {
                self.config.admission_delay
            };
            self.held.push_back((now + delay, done.message));
            self.events.push_back(GcksEvent::Rekeyed {
                seq,
                joined: done.joined,
                left: done.left,
                members: done.members,
                chunks,
                build_time: done.build_time,
            });
        }
        self.answer_at = None;
        self.release_held(now);
    }

    /// Hands out every answer still to come at once (the endpoint stops or is poisoned: its
    /// messages will not be sent, its committed joiners still get their bundles).
    fn flush_answers(&mut self) {
        if let Some(at) = self.answer_at {
            self.answer_slice(at, usize::MAX);
        }
    }

    /// Queues the held messages whose admission delay is over, in order.
    fn release_held(&mut self, now: Instant) {
        if self.stopped {
            return;
        }
        while self.held.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, message)) = self.held.pop_front() else {
                return;
            };
            if self.membership.poisoned().is_some() {
                continue;
            }
            let seq = message.seq();
            match self.session.queue_message(now, message) {
                Ok(()) => {
                    self.unicast.message_ready(seq);
                    self.events.push_back(GcksEvent::Queued { seq })
                }
                // Committed, yet the session refuses it: members would wait for it forever.
                Err(_) => self.poison(PoisonReason::QueueRefused),
            }
        }
    }

    fn stored(&mut self, now: Instant, id: StoreId, result: Result<(), StoreError>) {
        let Some(awaiting) = self.awaiting.remove(&id) else {
            return;
        };
        match awaiting {
            Awaiting::Leave {
                member,
                waiter,
                outcome,
            } => {
                self.leave_in_flight = false;
                match result {
                    Ok(()) => {
                        self.leaves_recorded += 1;
                        self.answer_leave(waiter, Ok(outcome));
                    }
                    Err(error) => {
                        self.membership.revert_leave(member);
                        self.answer_leave(waiter, Err(LeaveError::NotDurable(error)));
                    }
                }
                self.run_deferred(now);
            }
            Awaiting::Commit => {
                let Some(built) = self.committing.take() else {
                    return;
                };
                match result {
                    Ok(()) => self.commit(now, built),
                    Err(error) => {
                        if self.spare.is_none() {
                            self.spare_ready = false;
                            self.spare = Some(built.tree);
                        }
                        let detail = format!("state not written, nothing committed: {error}");
                        self.batch_failed(now, BatchFailure::Store(error.kind), detail);
                    }
                }
            }
            Awaiting::Release => {
                let Some(releasing) = self.releasing.take() else {
                    return;
                };
                match result {
                    Ok(()) => self.release(now, releasing),
                    Err(error) => {
                        self.releasing = Some(releasing);
                        self.poison(PoisonReason::Journal(error.kind));
                    }
                }
            }
        }
    }

    /// A lifetime deadline passed: asks for a refresh (RFC 4046 section 3, requirement 3) and
    /// reports the lifetimes that passed.
    fn lifetime_due(&mut self, now: Instant) {
        let (refresh, passed) = self.lifetimes.poll(now);
        if refresh && !self.stopped && self.membership.poisoned().is_none() {
            self.refreshes += 1;
            self.membership.request_rekey(now);
            self.events.push_back(GcksEvent::Refreshing);
        }
        for passed in passed {
            self.events.push_back(GcksEvent::LifetimePassed(passed));
        }
    }

    /// Re-reads every deadline into the timer table.
    fn refresh_timers(&mut self) {
        let stopped = self.stopped || self.membership.poisoned().is_some();
        match self.session.poll_timeout() {
            Some(at) if !self.stopped => self.timers.set(TIMER_SESSION, at),
            _ => self.timers.stop(TIMER_SESSION),
        }
        match self.membership.poll_timeout() {
            Some(at) if !stopped && !self.leave_in_flight && self.job.is_none() => {
                self.timers.set(TIMER_BATCH, at);
            }
            _ => self.timers.stop(TIMER_BATCH),
        }
        match self.held.front() {
            Some((at, _)) if !stopped => self.timers.set(TIMER_ADMISSION, *at),
            _ => self.timers.stop(TIMER_ADMISSION),
        }
        match self.answer_at {
            Some(at) => self.timers.set(TIMER_ANSWERS, at),
            None => self.timers.stop(TIMER_ANSWERS),
        }
        match self.unicast.poll_timeout() {
            Some(at) if !stopped => self.timers.set(TIMER_UNICAST, at),
            _ => self.timers.stop(TIMER_UNICAST),
        }
        match self.lifetimes.next_deadline() {
            Some(at) if !stopped => self.timers.set(TIMER_LIFETIME, at),
            _ => self.timers.stop(TIMER_LIFETIME),
        }
    }

    /// What every `handle_*` call ends with: start a due batch, re-read the deadlines.
    fn after_input(&mut self, now: Instant) {
        self.maybe_start_batch(now);
        self.maybe_fork_ahead();
        self.refresh_timers();
    }
}

impl<T: Clone> Endpoint for GcksEndpoint<T> {
    type Command = GcksCommand<T>;
    type Event = GcksEvent<T>;
    type Job = BatchJob;
    type StoreOp = GcksStoreOp;

    fn handle_datagram(&mut self, now: Instant, port: Port, from: SocketAddr, bytes: &[u8]) {
        // NACKs and probe replies come to the serving socket; nothing else is for a GCKS.
        if port == Port::Serve && !self.stopped {
            let is_ack = crate::wire::Packet::new_checked(bytes)
                .is_ok_and(|p| p.datagram_type() == crate::wire::DatagramType::Ack);
            if is_ack {
                // The committed tree's next key is the next message's only once the tree's
                // latest message is the session's (not while it waits out the admission delay).
                let next_mac_key = (self.session.latest_seq() == Some(self.tree.seq()))
                    .then(|| self.tree.next_mac_key());
                let source = crate::session::unicast::SenderSource {
                    sender: &self.session,
                    next_mac_key: next_mac_key.as_ref(),
                };
                self.unicast.handle_ack(from, bytes, &source);
                while self.unicast.poll_event().is_some() {}
            } else {
                self.session.handle_datagram(now, from, bytes);
            }
        }
        self.refresh_timers();
    }

    fn handle_command(&mut self, now: Instant, command: GcksCommand<T>) {
        match command {
            GcksCommand::Join {
                member,
                relay,
                ticket,
            } => self.process(
                now,
                Op::Join {
                    member,
                    relay,
                    waiter: Waiter { ticket, part: None },
                },
            ),
            GcksCommand::Leave { member, ticket } => self.process(
                now,
                Op::Leave {
                    member,
                    waiter: Waiter { ticket, part: None },
                },
            ),
            GcksCommand::Changes { changes, ticket } => {
                for (index, change) in changes.into_iter().enumerate() {
                    let waiter = Waiter {
                        ticket: ticket.clone(),
                        part: Some(index),
                    };
                    let op = match change {
                        Change::Join(member) => Op::Join {
                            member,
                            relay: false,
                            waiter,
                        },
                        Change::JoinRelay(member) => Op::Join {
                            member,
                            relay: true,
                            waiter,
                        },
                        Change::Leave(member) => Op::Leave { member, waiter },
                    };
                    self.process(now, op);
                }
            }
            GcksCommand::RekeyNow => self.process(now, Op::Rekey),
            GcksCommand::Stop => self.stop(),
        }
        self.after_input(now);
    }

    fn handle_job_result(&mut self, now: Instant, result: BatchOutput) {
        self.batch_output(now, result);
        self.after_input(now);
    }

    fn handle_job_panicked(&mut self, now: Instant) {
        // Only a fork job out: the committed tree is intact and the next batch forks itself.
        if self.fork_out && !self.membership.is_building() && self.sealing.is_none() {
            self.fork_out = false;
            self.fork_ahead = false;
            self.after_input(now);
            return;
        }
        // The job's state is unknown: the committed tree is intact, but what panicked may panic
        // again on every retry.
        if !self.stopped {
            self.poison(PoisonReason::WorkerPanicked);
        }
        self.after_input(now);
    }

    fn handle_stored(&mut self, now: Instant, id: StoreId, result: Result<(), StoreError>) {
        self.stored(now, id, result);
        self.after_input(now);
    }

    fn handle_fetched(&mut self, _now: Instant, _id: FetchId, _item: Fetched) {
        // A GCKS fetches nothing.
    }

    fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.expire_before(now) {
            match timer {
                TIMER_SESSION if self.session.poll_timeout().is_some_and(|at| at <= now) => {
                    self.session.handle_timeout(now);
                }
                TIMER_ADMISSION => self.release_held(now),
                TIMER_ANSWERS => self.answer_slice(now, ANSWER_SLICE),
                TIMER_UNICAST => {
                    self.unicast.handle_timeout(now);
                    // A member given up on resyncs by itself: nothing for the GCKS to do.
                    while self.unicast.poll_event().is_some() {}
                }
                TIMER_LIFETIME => self.lifetime_due(now),
                // TIMER_BATCH: `after_input` polls the schedule.
                _ => {}
            }
        }
        self.after_input(now);
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if self.is_stopped() {
            return None;
        }
        let session = &mut self.session;
        let transmit = self
            .uplinks
            .poll_transmit(buf, |buf| session.poll_transmit(now, buf));
        let transmit = match transmit {
            Some(transmit) => Some(transmit),
            None => {
                let source = crate::session::unicast::SenderSource {
                    sender: &self.session,
                    next_mac_key: None,
                };
                let delivery = self.unicast.poll_transmit(now, buf, &source);
                while self.unicast.poll_event().is_some() {}
                delivery
            }
        };
        // Sending moves the session's pacing and heartbeat deadlines.
        self.refresh_timers();
        let transmit = transmit?;
        Some(Transmit {
            port: Port::Serve,
            destination: match transmit.destination {
                crate::session::Destination::Group => Destination::Group,
                crate::session::Destination::Unicast(addr) => Destination::Unicast(addr),
            },
            len: transmit.len,
        })
    }

    fn poll_job(&mut self) -> Option<BatchJob> {
        self.job.take()
    }

    fn poll_store(&mut self) -> Option<(StoreId, GcksStoreOp)> {
        self.store_ops.pop_front()
    }

    fn poll_fetch(&mut self) -> Option<FetchRequest> {
        None
    }

    fn poll_event(&mut self) -> Option<GcksEvent<T>> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        while let Some(event) = self.session.poll_event() {
            if let SenderEvent::InitialTransmissionDone { seq } = event {
                return Some(GcksEvent::Sent { seq });
            }
        }
        None
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_timeout()
    }

    fn resync_source(&self) -> Option<&dyn ResyncSource> {
        Some(&self.session)
    }

    fn is_stopped(&self) -> bool {
        self.stopped || self.membership.poisoned().is_some()
    }
}

/// A joiner's bundle as answered: a member marked unicast ([`GcksEndpoint::mark_unicast`])
/// gets the flag and is registered with the unicast members.
fn unicast_bundle(
    (joins, members, keys): (
        &mut HashSet<MemberId>,
        &mut crate::session::unicast::UnicastMembers,
        &mut HashMap<MemberId, u32>,
    ),
    mut bundle: RegistrationBundle,
) -> RegistrationBundle {
    if joins.remove(&bundle.member) {
        bundle.unicast = true;
        let order_key = bundle.rekey_sa.degree.order_key(bundle.leaf);
        members.register(order_key, None, bundle.first_seq);
        keys.insert(bundle.member, order_key);
    }
    bundle
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
