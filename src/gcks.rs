//! The embedding API for a GCKS product: [`Gcks`], the key server side of one group, running
//! its event loop on its own thread.
//!
//! The product keeps registration and authorization (RFC 4046 section 4); rekeycast keeps the
//! key tree, batches membership changes, builds, signs and sends each rekey message, answers
//! NACKs with repair, and serves what resync needs from its history. Commands go in over a
//! channel that wakes the loop ([`Gcks::join`], [`Gcks::leave`], [`Gcks::rekey_now`]); events
//! come out over another ([`Gcks::events`]). Building a batch (the key tree, the layout, the
//! signatures, the FEC encoder) runs on worker threads, so the loop keeps sending and
//! repairing meanwhile.
//!
//! Membership commands are ordered: the last command for a member wins ([`membership`]); a
//! leave is journaled before it is acknowledged and a join is acknowledged by its bundle once
//! its batch is durable (see [`Gcks::join`] and [`Gcks::leave`]). A batch is a transaction:
//! it commits the key tree, the sequence number and the state directory only when its message
//! is built and stored, and a failed batch is retried with the same changes
//! ([`GcksEvent::BatchFailed`]); what cannot be recovered poisons the engine
//! ([`GcksEvent::Poisoned`]). Products with their own runtime can drive
//! [`crate::session::SenderSession`] themselves instead.
//!
//! ```
//! use std::time::Duration;
//! use rekeycast::gcks::{Gcks, GcksConfig};
//! use rekeycast::lkh::MemberId;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let signing_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
//! let config = GcksConfig::loopback("239.1.2.3:7400".parse()?);
//! let gcks = Gcks::start(config, signing_key)?;
//! // Registration: the bundle arrives once the batch that admits the member is built.
//! let bundle = gcks.join(MemberId(1))?.recv_timeout(Duration::from_secs(10))??;
//! println!("member 1 starts at message {}", bundle.first_seq);
//! gcks.shutdown()?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use ed25519_dalek::SigningKey;

use crate::gsa::WrapAlgorithm;
use crate::io::handle::LoopHandle;
use crate::io::socket::MulticastConfig;
use crate::lkh::{Degree, LkhError, MemberId, RegistrationBundle};
use crate::resync::journal::JournalError;
use crate::session::layout::MessageParams;
use crate::session::sender::SenderCounters;
use crate::session::SenderConfig;

pub mod membership;

/// Configuration of a [`Gcks`].
#[derive(Debug, Clone)]
pub struct GcksConfig {
    /// The group id (in every datagram's header).
    pub group_id: u32,
    /// The SPI of the Rekey SA.
    pub spi: u32,
    /// The key tree's degree (4 is the usual optimum).
    pub degree: Degree,
    /// How keys are wrapped.
    pub wrap_algorithm: WrapAlgorithm,
    /// Lifetime of each Data SA, seconds.
    pub data_sa_lifetime_secs: u32,
    /// The multicast group, interface, TTL and loopback of the rekey traffic.
    pub multicast: MulticastConfig,
    /// The unicast address the GCKS sends from and takes NACKs on (port 0: any).
    pub bind: SocketAddr,
    /// The sender session's configuration.
    pub sender: SenderConfig,
    /// How messages are built (SPI, epoch and timestamp are set by the GCKS).
    pub message: MessageParams,
    /// Time between rekeys while membership changes are pending.
    pub batch_interval: Duration,
    /// Pending joins and leaves that trigger a rekey before the interval ends.
    pub max_batch: usize,
    /// Time between handing a batch's joiners their registration bundles and sending the
    /// batch's message, so that they can join the multicast group first (they need that
    /// message: it carries their path keys).
    pub admission_delay: Duration,
    /// Worker threads for building batches (0: one per core).
    pub workers: usize,
    /// The state directory: the key tree and the history of signed messages are written and
    /// fsynced there before each message is sent, and a GCKS started on it resumes the same
    /// group and sequence (re-sending the last message, which may not have gone out), so no
    /// member has to re-register; acknowledged leaves are journaled there
    /// ([`crate::resync::journal`]) and replayed on start. `None` (the default): nothing is
    /// persisted, and a leave does not survive a crash.
    pub state_dir: Option<std::path::PathBuf>,
    /// Where the TCP resync endpoint listens (length-prefixed frames); `None`: no endpoint.
    pub resync_tcp: Option<SocketAddr>,
    /// Where the HTTP resync endpoint listens (also `/metrics` and `/healthz`); `None`: none.
    pub resync_http: Option<SocketAddr>,
    /// The endpoints' limits: connection caps, rate limits, timeouts, request sizes.
    pub resync_limits: crate::resync::limits::Limits,
    /// Seed of the key tree's randomness for simulations and demos; `None` (the default) uses
    /// the operating system's RNG, as a real deployment must.
    pub key_seed: Option<u64>,
}

impl GcksConfig {
    /// A configuration for the multicast group `group` on the loopback interface, with
    /// loopback delivery on: for tests and demos on one host.
    pub fn loopback(group: SocketAddr) -> Self {
        let multicast = MulticastConfig::loopback_v4(group);
        Self {
            group_id: 1,
            spi: 1,
            degree: Degree::DEFAULT,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            data_sa_lifetime_secs: 3600,
            multicast,
            bind: SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            sender: SenderConfig::default(),
            message: MessageParams::default(),
            batch_interval: Duration::from_secs(1),
            max_batch: 10_000,
            admission_delay: Duration::from_millis(100),
            workers: 0,
            state_dir: None,
            resync_tcp: None,
            resync_http: None,
            resync_limits: crate::resync::limits::Limits::default(),
            key_seed: None,
        }
    }
}

/// What the GCKS reports to the product.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GcksEvent {
    /// A batch was applied and its message queued for sending.
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
        /// Time the workers took to apply, lay out, sign and encode it.
        build_time: Duration,
    },
    /// Message `seq` went to the sender (after the admission delay when it admits members):
    /// its transmission starts now.
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
    /// and the state directory are as they were, and a batch with membership changes is tried
    /// again (same changes, same sequence number) after `retry_in` or at the next
    /// [`Gcks::rekey_now`]. A batch without changes (a refresh of the group key) is not
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
    /// The engine cannot go on: every pending join has failed with
    /// [`JoinError::Poisoned`], every later command fails with the same reason, and the loop
    /// has stopped. The committed state (tree, sequence, state directory) is intact: a GCKS
    /// started again on the state directory resumes from it.
    Poisoned {
        /// Why.
        reason: PoisonReason,
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
    /// The state directory could not be written (a full or read-only disk).
    #[error("writing the state directory: {0}")]
    StateWrite(std::io::ErrorKind),
    /// The state could not be encoded or was refused for another reason.
    #[error("storing the state")]
    State,
}

/// Why the engine stopped for good ([`GcksEvent::Poisoned`]).
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
    #[error("the leave journal could not be written: {0}")]
    Journal(JournalError),
    /// A committed message was refused by the sender session.
    #[error("a committed message could not be queued for sending")]
    QueueRefused,
}

/// What an acknowledged leave did ([`Gcks::leave`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaveOutcome {
    /// The member is removed in the next batch; `durable`: the leave is in the state
    /// directory's journal, so it is applied even if the GCKS crashes first (false without a
    /// state directory).
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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaveError {
    /// The member is not in the group and has no join waiting.
    #[error("member {0:?} is not in the group")]
    UnknownMember(MemberId),
    /// The leave could not be written to the journal: it is not acknowledged and nothing
    /// changed.
    #[error("leave not recorded: {0}")]
    NotDurable(JournalError),
    /// The engine is poisoned.
    #[error("engine poisoned: {0}")]
    Poisoned(PoisonReason),
    /// The engine is gone.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A snapshot of the GCKS's figures.
#[derive(Debug, Clone, Default)]
pub struct GcksStats {
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
    /// Event-loop lag (how late the loop woke for its deadlines), microseconds.
    pub loop_lag_us: LagSummary,
    /// Datagrams sent through the socket, and of those how many by GSO batches.
    pub datagrams_sent: u64,
    /// Send calls that would have blocked (the datagram waited for the socket).
    pub send_blocked: u64,
    /// The resync endpoints' counters.
    pub resync: crate::io::resync_server::EndpointCounters,
    /// Of the members, those registered as relays ([`Gcks::join_relay`]).
    pub relays: usize,
}

/// Percentiles of the event loop's lag, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LagSummary {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
    /// Samples.
    pub count: u64,
}

impl GcksStats {
    /// The figures in the Prometheus text exposition format (served at `/metrics`).
    pub fn prometheus_text(&self) -> String {
        let s = &self.sender;
        let counters: [(&str, &str, u64); 22] = [
            (
                "rekeycast_manifests_sent_total",
                "Manifest datagrams sent.",
                s.manifests_sent,
            ),
            (
                "rekeycast_source_symbols_sent_total",
                "Source symbols sent.",
                s.source_symbols_sent,
            ),
            (
                "rekeycast_proactive_symbols_sent_total",
                "Proactive repair symbols sent.",
                s.proactive_symbols_sent,
            ),
            (
                "rekeycast_repair_symbols_sent_total",
                "Repair symbols sent for NACKs.",
                s.repair_symbols_sent,
            ),
            (
                "rekeycast_heartbeats_sent_total",
                "Heartbeats sent.",
                s.heartbeats_sent,
            ),
            (
                "rekeycast_advertisements_sent_total",
                "Repair advertisements sent.",
                s.advertisements_sent,
            ),
            (
                "rekeycast_bytes_sent_total",
                "Bytes of every datagram sent.",
                s.bytes_sent,
            ),
            (
                "rekeycast_source_bytes_sent_total",
                "Bytes of source symbols sent.",
                s.source_bytes_sent,
            ),
            (
                "rekeycast_nacks_received_total",
                "NACKs that passed the MAC check.",
                s.nacks_received,
            ),
            (
                "rekeycast_feedback_replayed_total",
                "NACKs and probe replies dropped as replays of ones already taken.",
                s.replayed_feedback,
            ),
            (
                "rekeycast_feedback_stale_total",
                "NACKs and probe replies dropped for echoing no probe this sender sent lately.",
                s.stale_feedback,
            ),
            (
                "rekeycast_repair_orders_total",
                "Repair orders made.",
                self.repair_orders,
            ),
            (
                "rekeycast_datagrams_rejected_total",
                "Datagrams dropped before use.",
                s.rejected,
            ),
            (
                "rekeycast_datagrams_socket_sent_total",
                "Datagrams handed to the socket.",
                self.datagrams_sent,
            ),
            (
                "rekeycast_send_blocked_total",
                "Sends that would have blocked.",
                self.send_blocked,
            ),
            (
                "rekeycast_resync_connections_accepted_total",
                "Resync connections accepted.",
                self.resync.accepted,
            ),
            (
                "rekeycast_resync_connections_refused_total",
                "Resync connections refused (caps).",
                self.resync.refused_overloaded,
            ),
            (
                "rekeycast_resync_rate_limited_total",
                "Resync requests refused by the per-source rate limit.",
                self.resync.rate_limited,
            ),
            (
                "rekeycast_resync_requests_total",
                "Resync requests answered or refused.",
                self.resync.requests,
            ),
            (
                "rekeycast_resync_messages_served_total",
                "Messages served by resync (a manifest and a chunk each).",
                self.resync.messages_served,
            ),
            (
                "rekeycast_resync_connections_closed_total",
                "Resync connections closed.",
                self.resync.closed,
            ),
            (
                "rekeycast_loop_lag_samples_total",
                "Event loop lag samples.",
                self.loop_lag_us.count,
            ),
        ];
        let gauges: [(&str, &str, u64); 9] = [
            (
                "rekeycast_members",
                "Members in the committed key tree.",
                self.members as u64,
            ),
            (
                "rekeycast_relays",
                "Members registered as relays.",
                self.relays as u64,
            ),
            ("rekeycast_seq", "Latest message sequence number.", self.seq),
            (
                "rekeycast_group_key_version",
                "Current group key version.",
                u64::from(self.group_key_version),
            ),
            (
                "rekeycast_pending_changes",
                "Joins and leaves waiting for a batch.",
                self.pending as u64,
            ),
            (
                "rekeycast_resync_connections_open",
                "Resync connections open.",
                self.resync.open,
            ),
            (
                "rekeycast_loop_lag_p50_microseconds",
                "Event loop lag, median.",
                self.loop_lag_us.p50,
            ),
            (
                "rekeycast_loop_lag_p99_microseconds",
                "Event loop lag, 99th percentile.",
                self.loop_lag_us.p99,
            ),
            (
                "rekeycast_loop_lag_max_microseconds",
                "Event loop lag, maximum.",
                self.loop_lag_us.max,
            ),
        ];
        let mut text = String::new();
        for (kind, list) in [("counter", &counters[..]), ("gauge", &gauges[..])] {
            for (name, help, value) in list {
                text.push_str(&format!(
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
                ));
            }
        }
        text
    }
}

impl LagSummary {
    /// The percentiles of a histogram of microseconds.
    pub(crate) fn from_histogram(histogram: Option<&hdrhistogram::Histogram<u64>>) -> Self {
        histogram.map_or_else(Self::default, |h| Self {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            count: h.len(),
        })
    }
}

/// What a resync endpoint needs from the GCKS for one missed message.
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
    /// The engine is poisoned ([`GcksEvent::Poisoned`]).
    #[error("engine poisoned: {0}")]
    Poisoned(PoisonReason),
    /// The key tree did not produce the member's bundle.
    #[error(transparent)]
    Lkh(#[from] LkhError),
}

/// Why the engine could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A socket could not be set up.
    #[error(transparent)]
    Socket(#[from] crate::io::socket::SocketError),
    /// An I/O error of the event loop.
    #[error("event loop")]
    Io(#[from] std::io::Error),
    /// A session configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::session::ConfigError),
    /// The state directory is corrupt or cannot be written.
    #[error(transparent)]
    State(#[from] crate::resync::store::StoreError),
    /// The restored state does not fit the configuration or the signing key.
    #[error("restored state: {0}")]
    Restore(String),
    /// A member's saved keys are corrupt or cannot be read ([`crate::member::Member::resume`]).
    #[error(transparent)]
    MemberState(#[from] crate::lkh::MemberStateError),
    /// The engine's thread is gone (it stopped or panicked).
    #[error("engine thread is gone")]
    Gone,
    /// The engine's thread panicked.
    #[error("engine thread panicked")]
    Panicked,
    /// The engine is poisoned ([`GcksEvent::Poisoned`]) and has stopped.
    #[error("engine poisoned: {0}")]
    Poisoned(PoisonReason),
    /// The state directory's leave journal is corrupt or cannot be written.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

pub(crate) enum Command {
    Join(MemberId, Sender<Result<RegistrationBundle, JoinError>>),
    JoinRelay(MemberId, Sender<Result<RegistrationBundle, JoinError>>),
    Leave(MemberId, Sender<Result<LeaveOutcome, LeaveError>>),
    RekeyNow,
    Stats(Sender<GcksStats>),
    Resync {
        seq: u64,
        order_key: u32,
        reply: Sender<ResyncAnswer>,
    },
    LatestManifest(Sender<Option<Vec<u8>>>),
    Shutdown,
}

/// The key server side of one group, its loop running on its own thread.
#[derive(Debug)]
pub struct Gcks {
    handle: LoopHandle<Command>,
    events: Receiver<GcksEvent>,
    local_addr: SocketAddr,
    resync_addrs: (Option<SocketAddr>, Option<SocketAddr>),
    public_key: ed25519_dalek::VerifyingKey,
    poisoned: Arc<OnceLock<PoisonReason>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Join(..) => "Join",
            Self::JoinRelay(..) => "JoinRelay",
            Self::Leave(..) => "Leave",
            Self::RekeyNow => "RekeyNow",
            Self::Stats(_) => "Stats",
            Self::Resync { .. } => "Resync",
            Self::LatestManifest(_) => "LatestManifest",
            Self::Shutdown => "Shutdown",
        })
    }
}

impl Gcks {
    /// Sets up the sockets and starts the loop. `signing_key` signs every message (load it
    /// from the key file of the state directory in a deployment).
    pub fn start(config: GcksConfig, signing_key: SigningKey) -> Result<Self, EngineError> {
        Self::start_with_hooks(
            config,
            signing_key,
            crate::io::gcks_loop::BatchHooks::default(),
        )
    }

    /// [`Self::start`] with faults injected in the batch path (tests).
    pub(crate) fn start_with_hooks(
        config: GcksConfig,
        signing_key: SigningKey,
        hooks: crate::io::gcks_loop::BatchHooks,
    ) -> Result<Self, EngineError> {
        let public_key = signing_key.verifying_key();
        let poisoned = Arc::new(OnceLock::new());
        let started =
            crate::io::gcks_loop::spawn(config, signing_key, hooks, Arc::clone(&poisoned))?;
        Ok(Self {
            handle: LoopHandle::new(started.commands, started.waker, started.thread, || {
                Command::Shutdown
            }),
            events: started.events,
            local_addr: started.local_addr,
            resync_addrs: started.resync_addrs,
            public_key,
            poisoned,
        })
    }

    /// Why the engine is poisoned, if it is ([`GcksEvent::Poisoned`]).
    pub fn poisoned(&self) -> Option<PoisonReason> {
        self.poisoned.get().copied()
    }

    /// The engine's error for a command that found the loop gone: the poison, if that is why.
    fn gone(&self, error: EngineError) -> EngineError {
        match (self.poisoned(), error) {
            (Some(reason), EngineError::Gone) => EngineError::Poisoned(reason),
            (_, error) => error,
        }
    }

    fn send(&self, command: Command) -> Result<(), EngineError> {
        if let Some(reason) = self.poisoned() {
            return Err(EngineError::Poisoned(reason));
        }
        self.handle.send(command).map_err(|e| self.gone(e))
    }

    /// The unicast address members send NACKs to (their feedback address).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The resync endpoints' bound addresses (TCP, HTTP), where configured.
    pub fn resync_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        self.resync_addrs
    }

    /// The GCKS's public key (in every registration bundle's Rekey SA).
    pub fn public_key(&self) -> ed25519_dalek::VerifyingKey {
        self.public_key
    }

    /// Admits `member` in the next batch. The registration bundle arrives on the returned
    /// channel once the batch that admits the member is committed (its message built and, with
    /// a state directory, written and fsynced with the key tree) and released in the leave
    /// journal; it comes before the message is sent (see [`GcksConfig::admission_delay`]).
    ///
    /// Durability: a join is acknowledged only by its bundle, so it needs no journal. A crash
    /// before the commit loses the join (never acknowledged; its caller's channel closes); a
    /// crash after the commit and before the release leaves the member in the stored tree
    /// without a bundle, and the GCKS that starts on the state directory removes it in its
    /// first batch. So after a restart the key tree holds no member whose join was not
    /// acknowledged.
    ///
    /// The last command for a member wins: a [`Self::leave`] before the batch cancels the join
    /// ([`JoinError::Cancelled`]); a join of a member in the group is
    /// [`JoinError::AlreadyMember`] (to give a member a new leaf, leave and join again); a
    /// second join while one waits is [`JoinError::AlreadyJoining`].
    pub fn join(
        &self,
        member: MemberId,
    ) -> Result<Receiver<Result<RegistrationBundle, JoinError>>, EngineError> {
        let (reply, bundle) = crossbeam_channel::bounded(1);
        self.send(Command::Join(member, reply))?;
        Ok(bundle)
    }

    /// Admits `member` in the next batch as a relay: a relay holds a leaf like any member (it
    /// checks and produces the group's MACs and verifies everything), and the GCKS counts it
    /// as a relay ([`GcksStats::relays`]) until it leaves. Otherwise as [`Self::join`].
    pub fn join_relay(
        &self,
        member: MemberId,
    ) -> Result<Receiver<Result<RegistrationBundle, JoinError>>, EngineError> {
        let (reply, bundle) = crossbeam_channel::bounded(1);
        self.send(Command::JoinRelay(member, reply))?;
        Ok(bundle)
    }

    /// Removes `member` in the next batch, or cancels its join if the join still waits for
    /// its batch ([`LeaveOutcome::JoinCancelled`]). A leave of a member that is neither in
    /// the group nor joining is [`LeaveError::UnknownMember`].
    ///
    /// Durability: with a state directory, a revocation is appended to the directory's leave
    /// journal and fsynced before this returns [`LeaveOutcome::Revoked`] with `durable: true`;
    /// a GCKS that crashes before the batch applying it is durable replays the journal when it
    /// starts and applies the leave in its first batch. So an acknowledged leave is never
    /// lost, and the member opens no message built after the batch that was being built when
    /// the leave came (that one batch may still carry its keys).
    pub fn leave(&self, member: MemberId) -> Result<LeaveOutcome, LeaveError> {
        if let Some(reason) = self.poisoned() {
            return Err(LeaveError::Poisoned(reason));
        }
        match self
            .handle
            .request(|reply| Command::Leave(member, reply))
            .map_err(|e| self.gone(e))
        {
            Ok(answer) => answer,
            Err(EngineError::Poisoned(reason)) => Err(LeaveError::Poisoned(reason)),
            Err(error) => Err(LeaveError::Engine(error)),
        }
    }

    /// Applies the pending changes now (or refreshes the group key if there are none); a
    /// failed batch waiting for its retry is retried now.
    pub fn rekey_now(&self) -> Result<(), EngineError> {
        self.send(Command::RekeyNow)
    }

    /// The GCKS's figures.
    pub fn stats(&self) -> Result<GcksStats, EngineError> {
        self.handle
            .request(Command::Stats)
            .map_err(|e| self.gone(e))
    }

    /// The signed manifest of message `seq` and the chunk of the member whose leaf has order
    /// key `order_key`: what a resync endpoint serves.
    pub fn resync_item(&self, seq: u64, order_key: u32) -> Result<ResyncAnswer, EngineError> {
        self.handle.request(|reply| Command::Resync {
            seq,
            order_key,
            reply,
        })
    }

    /// The latest signed manifest: a resync endpoint's state answer.
    pub fn latest_manifest(&self) -> Result<Option<Vec<u8>>, EngineError> {
        self.handle.request(Command::LatestManifest)
    }

    /// The GCKS's events.
    pub fn events(&self) -> &Receiver<GcksEvent> {
        &self.events
    }

    /// Stops the loop and waits for its thread.
    pub fn shutdown(mut self) -> Result<(), EngineError> {
        self.handle.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the metric `name` in a Prometheus text.
    fn metric(text: &str, name: &str) -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn metrics_report_dropped_feedback_and_resync_requests() {
        let mut stats = GcksStats::default();
        stats.sender.replayed_feedback = 3;
        stats.sender.stale_feedback = 5;
        stats.resync.requests = 7;
        stats.resync.messages_served = 11;
        stats.resync.rate_limited = 13;
        stats.members = 17;
        let text = stats.prometheus_text();
        for (name, value) in [
            ("rekeycast_feedback_replayed_total", 3),
            ("rekeycast_feedback_stale_total", 5),
            ("rekeycast_resync_requests_total", 7),
            ("rekeycast_resync_messages_served_total", 11),
            ("rekeycast_resync_rate_limited_total", 13),
            ("rekeycast_members", 17),
        ] {
            assert_eq!(metric(&text, name), Some(value), "{name} in:\n{text}");
        }
    }
}
