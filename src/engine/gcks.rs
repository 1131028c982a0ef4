//! [`Gcks`]: the key server side of one group, a thin handle over the [`Driver`] running a
//! [`GcksEndpoint`].
//!
//! The product keeps registration and authorization (RFC 4046 section 4); rekeycast keeps the
//! key tree, batches membership changes, builds, signs and sends each rekey message, answers
//! NACKs with repair, and serves what resync needs from its history. Every decision is the
//! sans-IO [`GcksEndpoint`]'s (see its documentation for batches as transactions, the
//! admission delay, retries and poison); this module only wires it to the driver: it opens
//! the state directory ([`GcksStorage`]) and resumes from it, draws the key tree's RNG and the
//! sender instance id, anchors the wall clock, routes each join and leave answer to its
//! caller (never dropped: every waiting caller has its own channel) and hands the other events
//! to the product over a bounded channel.
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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ed25519_dalek::SigningKey;
use rekeycast_proto::endpoint::gcks::membership::Schedule;
pub use rekeycast_proto::endpoint::gcks::rollover::{RolloverError, RolloverMode};
use rekeycast_proto::endpoint::gcks::{
    Change, GcksCommand, GcksEndpoint, GcksEndpointConfig, GcksEvent as EndpointEvent,
    GcksSetupError, GcksStoreOp, JoinError, LeaveError, LeaveOutcome, PoisonReason, ResyncAnswer,
    WallClock,
};
use rekeycast_proto::endpoint::{Port, Storage, StoreError};

use super::driver::{
    bounded_events, ChannelSink, Delivery, Driver, DriverConfig, DriverError, DriverHandle,
    DriverStats, EventSink, SenderPort, DEFAULT_EVENT_CAPACITY,
};
use crate::gcks::{GcksConfig, GcksStats};
use crate::keyfile::{KeyFileError, KeyOrigin};
use crate::lkh::{KeyRng, LkhError, MemberId, RegistrationBundle};
use crate::resync::store::{GcksStorage, LostMessage, OpenError};

/// What the GCKS reports to the product: the endpoint's [`EndpointEvent`] with an uninhabited
/// ticket, since the answers to joins and leaves go to their callers instead
/// ([`EndpointEvent::JoinAnswered`] and [`EndpointEvent::LeaveAnswered`] never arrive here).
pub type GcksEvent = EndpointEvent<Infallible>;

/// Why the GCKS engine could not start, or a call to it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GcksError {
    /// The driver could not start (a socket, a listener, a thread) or is gone.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The endpoint could not be set up (an invalid configuration, a restored state of
    /// another group or key).
    #[error(transparent)]
    Setup(#[from] GcksSetupError),
    /// The state directory or its leave journal is corrupt or cannot be read.
    #[error(transparent)]
    State(#[from] OpenError),
    /// The key tree's RNG could not be seeded from the operating system.
    #[error("key tree RNG")]
    Rng(#[source] LkhError),
    /// The signing key file of the state directory could not be loaded or created
    /// ([`GcksBuilder::start_with_key_file`]), or is missing beside a stored state.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// [`GcksBuilder::start_with_key_file`] needs a state directory to hold the key file.
    #[error("no state directory configured to hold the signing key file")]
    NoStateDir,
    /// A signing-key rollover needs a GCKS started from its key files
    /// ([`GcksBuilder::start_with_key_file`]).
    #[error(
        "this GCKS was given its signing key, not started from its state directory's key file: \
         a signing-key rollover needs the key file (to write the next key beside it)"
    )]
    NoKeyFile,
    /// The endpoint refused the rollover.
    #[error("signing-key rollover refused: {0}")]
    Rollover(#[from] RolloverError),
    /// A leave was refused.
    #[error(transparent)]
    Leave(#[from] LeaveError),
    /// The engine is poisoned ([`GcksEvent::Poisoned`]) and has stopped.
    #[error("engine poisoned: {0}")]
    Poisoned(PoisonReason),
}

/// The answer to one change of [`Gcks::apply`].
#[derive(Debug, Clone)]
// A bundle is the large variant; answers are one per change, so boxing it buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum ChangeAnswer {
    /// A join's: the member's registration bundle, or why not.
    Join(Result<RegistrationBundle, JoinError>),
    /// A leave's.
    Leave(Result<LeaveOutcome, LeaveError>),
}

/// The answers of one [`Gcks::apply`] call, as they come.
#[derive(Debug)]
pub struct ChangesTicket {
    count: usize,
    answers: Receiver<(usize, ChangeAnswer)>,
}

impl ChangesTicket {
    /// Waits up to `timeout` for every answer; they come back in the order of the changes.
    /// `None` if some did not come in time (or the engine went away first).
    pub fn wait(&self, timeout: Duration) -> Option<Vec<ChangeAnswer>> {
        let deadline = Instant::now() + timeout;
        let mut answers: Vec<Option<ChangeAnswer>> = vec![None; self.count];
        let mut missing = self.count;
        while missing > 0 {
            let (index, answer) = self.answers.recv_deadline(deadline).ok()?;
            if let Some(slot) = answers.get_mut(index) {
                if slot.replace(answer).is_none() {
                    missing -= 1;
                }
            }
        }
        answers.into_iter().collect()
    }

    /// How many changes it answers.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it answers no change.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The answers of one [`Gcks::join_many`] call: each joiner's registration bundle, or why
/// not, in the order of the call's members.
#[derive(Debug)]
pub struct JoinsTicket {
    answers: Receiver<(usize, ChangeAnswer)>,
    /// The answers so far, by the member's position in the call.
    received: Vec<Option<Result<RegistrationBundle, JoinError>>>,
    missing: usize,
}

/// Why [`JoinsTicket::wait`] returned without every answer. The answers that came are kept:
/// a later `wait` goes on from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinsWaitError {
    /// The deadline passed first.
    #[error("{answered} of {count} joins answered before the deadline")]
    TimedOut {
        /// Joins answered so far.
        answered: usize,
        /// Joins in the call.
        count: usize,
    },
    /// The engine went away before answering them all.
    #[error("the engine stopped with {answered} of {count} joins answered")]
    Gone {
        /// Joins answered so far.
        answered: usize,
        /// Joins in the call.
        count: usize,
    },
}

impl JoinsTicket {
    /// Waits up to `timeout` for the answers still missing, and returns them all in the order
    /// of the call's members. On error the answers that came are kept for the next call.
    pub fn wait(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<Result<RegistrationBundle, JoinError>>, JoinsWaitError> {
        let deadline = Instant::now() + timeout;
        while self.missing > 0 {
            let error = |gone: bool, ticket: &Self| {
                let count = ticket.received.len();
                let answered = count - ticket.missing;
                if gone {
                    JoinsWaitError::Gone { answered, count }
                } else {
                    JoinsWaitError::TimedOut { answered, count }
                }
            };
            let (index, answer) = match self.answers.recv_deadline(deadline) {
                Ok(received) => received,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(error(false, self))
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(error(true, self))
                }
            };
            // Only joins were sent: a leave's answer cannot come.
            let ChangeAnswer::Join(result) = answer else {
                continue;
            };
            if let Some(slot) = self.received.get_mut(index) {
                if slot.replace(result).is_none() {
                    self.missing -= 1;
                }
            }
        }
        Ok(std::mem::take(&mut self.received)
            .into_iter()
            .flatten()
            .collect())
    }

    /// How many joins it answers.
    pub fn len(&self) -> usize {
        self.received.len()
    }

    /// Whether it answers no join.
    pub fn is_empty(&self) -> bool {
        self.received.is_empty()
    }

    /// How many answers have not come yet (as of the last [`Self::wait`]).
    pub fn missing(&self) -> usize {
        self.missing
    }
}

/// Where an answer goes: the waiting caller's channel.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    Join(Sender<Result<RegistrationBundle, JoinError>>),
    Leave(Sender<Result<LeaveOutcome, LeaveError>>),
    Changes(Sender<(usize, ChangeAnswer)>),
}

type Endpoint = GcksEndpoint<Reply>;

/// The key server side of one group, its driver's loop on its own thread.
#[derive(Debug)]
pub struct Gcks {
    driver: DriverHandle<Endpoint>,
    events: Receiver<GcksEvent>,
    public_key: ed25519_dalek::VerifyingKey,
    poisoned: Arc<OnceLock<PoisonReason>>,
    lost: Vec<LostMessage>,
    /// The state directory whose key files hold the signing key, when the GCKS was started
    /// from them ([`GcksBuilder::start_with_key_file`]): rollovers write the next key there.
    key_dir: Option<std::path::PathBuf>,
}

/// Where a GCKS's signing key comes from.
// Built once per start and consumed at once: boxing the key buys nothing.
#[allow(clippy::large_enum_variant)]
enum KeySource {
    /// Given by the product.
    Given(SigningKey),
    /// The key files of the state directory ([`crate::keyfile::resolve_keys`]).
    Files,
}

impl Gcks {
    /// Sets up the sockets and starts the loop, resuming from the state directory if it holds
    /// a state (the same group and sequence, the history, the journaled leaves). `signing_key`
    /// signs every message (load it from the key file of the state directory in a
    /// deployment).
    pub fn start(config: GcksConfig, signing_key: SigningKey) -> Result<Self, GcksError> {
        Self::start_from(config, KeySource::Given(signing_key))
    }

    /// Starts the GCKS with the signing key of its state directory's key files (the
    /// configuration's `state_dir`, required), matched to the stored state
    /// ([`crate::keyfile::resolve_keys`]): generated into a new directory, loaded, or, after a
    /// crash during a signing-key rollover, the key the stored state names (a rollover the
    /// stored messages announce is resumed). Such a GCKS can roll its key
    /// ([`Self::roll_signing_key`]).
    pub fn start_with_key_files(config: GcksConfig) -> Result<Self, GcksError> {
        Self::start_from(config, KeySource::Files)
    }

    fn start_from(config: GcksConfig, keys: KeySource) -> Result<Self, GcksError> {
        let rng = || match config.key_seed {
            Some(seed) => Ok(KeyRng::seeded_for_simulation(seed)),
            None => KeyRng::from_os().map_err(GcksError::Rng),
        };
        let endpoint_config = GcksEndpointConfig {
            group_id: config.group_id,
            spi: config.spi,
            degree: config.degree,
            wrap_algorithm: config.wrap_algorithm,
            data_sa_lifetime_secs: config.data_sa_lifetime_secs,
            lifetimes: config.lifetimes,
            sender: config.sender.clone(),
            message: config.message,
            schedule: Schedule::new(config.batch_interval, config.max_batch),
            admission_delay: config.admission_delay,
            durable: config.state_dir.is_some(),
        };
        let now = Instant::now();
        let clock = WallClock {
            unix_micros: unix_micros(),
            at: now,
        };
        let instance: u32 = rand::random();
        let mut lost: Vec<LostMessage> = Vec::new();
        let key_dir = match keys {
            KeySource::Files => Some(config.state_dir.clone().ok_or(GcksError::NoStateDir)?),
            KeySource::Given(_) => None,
        };
        let mut given = match keys {
            KeySource::Given(key) => Some(key),
            KeySource::Files => None,
        };
        let mut public_key = given.as_ref().map(SigningKey::verifying_key);
        let (endpoint, storage) = match &config.state_dir {
            None => {
                // A GCKS without a state directory is always given its key.
                let signing_key = given.take().ok_or(GcksError::NoStateDir)?;
                (
                    GcksEndpoint::new(endpoint_config, signing_key, rng()?, instance, clock, now)?,
                    GcksStore::Memory,
                )
            }
            Some(dir) => {
                if given.is_none() {
                    // Before the state is read: a missing key beside a state is the error to
                    // report, whatever the state holds.
                    crate::keyfile::require_key_beside_state(dir)?;
                }
                let (storage, restored) = GcksStorage::open(dir, config.sender.history, rng()?)?;
                lost = storage.lost().to_vec();
                // The stored tree names the key that signed its latest message: the key files
                // are matched to it (a rollover's crash points, see `keyfile`).
                let (signing_key, next) = match given.take() {
                    Some(key) => (key, None),
                    None => {
                        let stored = restored
                            .as_ref()
                            .map(|restored| restored.tree.rekey_sa().gcks_public_key);
                        let resolved = crate::keyfile::resolve_keys(dir, stored.as_ref())?;
                        if resolved.promoted {
                            tracing::warn!(
                                "signing-key rollover had taken effect before the last stop: \
                                 the next key file is now the current one"
                            );
                        }
                        (resolved.current, resolved.next)
                    }
                };
                public_key = Some(signing_key.verifying_key());
                let mut endpoint = match restored {
                    Some(restored) => GcksEndpoint::restore(
                        endpoint_config,
                        signing_key,
                        restored,
                        instance,
                        clock,
                        now,
                    )?,
                    None => GcksEndpoint::new(
                        endpoint_config,
                        signing_key,
                        rng()?,
                        instance,
                        clock,
                        now,
                    )?,
                };
                if let Some(next) = next {
                    match endpoint.resume_rollover(now, next) {
                        Ok(from_seq) => tracing::warn!(
                            from_seq,
                            "resuming the signing-key rollover the stored messages announce"
                        ),
                        Err(_) => {
                            // Never announced: no member can know the key; the operator rolls
                            // again.
                            tracing::warn!(
                                "dropping a next signing key no stored message announces (the \
                                 GCKS stopped before the rollover started)"
                            );
                            crate::keyfile::discard_next(dir)?;
                        }
                    }
                }
                (endpoint, GcksStore::Dir(storage))
            }
        };
        let mut endpoint = endpoint;
        endpoint
            .set_unicast_relays(config.unicast_relays.clone())
            .map_err(GcksSetupError::Config)?;
        if !config.relay_directory.is_empty() {
            let (relays, gcks) = config.relay_directory.contacts();
            endpoint.set_relay_assignment(
                rekeycast_proto::endpoint::gcks::assignment::RelayAssignment::new(relays, gcks),
            );
        }
        let mut driver_config = DriverConfig::new("rekeycast-gcks");
        driver_config.serve = Some(SenderPort {
            multicast: config.multicast.clone(),
            bind: config.bind,
        });
        driver_config.resync_tcp = config.resync_tcp;
        driver_config.resync_http = config.resync_http;
        driver_config.resync_limits = config.resync_limits.clone();
        driver_config.feedback_limit = config.feedback_limit;
        driver_config.workers = config.workers;
        driver_config.max_datagram_size = config.sender.datagram_size;
        let (events_sink, events) = bounded_events(DEFAULT_EVENT_CAPACITY);
        for lost in &lost {
            tracing::warn!(
                seq = lost.seq,
                file = %lost.path.display(),
                problem = %lost.problem,
                "history message lost from the state directory: started without it, resync \
                 answers \"not held\" for it"
            );
        }
        let poisoned = Arc::new(OnceLock::new());
        let sink = GcksSink {
            events: events_sink,
            poisoned: Arc::clone(&poisoned),
            key_dir: key_dir.clone(),
        };
        // Set in both branches above (a given key, or the key files resolved).
        let public_key = public_key.ok_or(GcksError::NoStateDir)?;
        let driver = Driver::new(endpoint, driver_config, storage, sink)
            .metrics(Box::new(|endpoint: &Endpoint, stats: &DriverStats| {
                gcks_stats(endpoint, stats).prometheus_text()
            }))
            .spawn()?;
        Ok(Self {
            driver,
            events,
            public_key,
            poisoned,
            lost,
            key_dir,
        })
    }

    /// The messages of the history window that were lost from the state directory (their
    /// files missing or corrupt) when this GCKS started: it started without them, and resync
    /// answers "not held" for them (TCP `NotHeld`, HTTP 421), so members ask their next
    /// endpoint. Each is also logged at start; [`GcksStats::history_not_held`] counts those
    /// still in the window.
    pub fn lost_history(&self) -> &[LostMessage] {
        &self.lost
    }

    /// Why the engine is poisoned, if it is ([`GcksEvent::Poisoned`]).
    pub fn poisoned(&self) -> Option<PoisonReason> {
        self.poisoned.get().copied()
    }

    /// The engine's error for a call that found the loop gone: the poison, if that is why.
    fn gone(&self, error: DriverError) -> GcksError {
        match (self.poisoned(), error) {
            (Some(reason), DriverError::Gone) => GcksError::Poisoned(reason),
            (_, error) => GcksError::Driver(error),
        }
    }

    fn command(&self, command: GcksCommand<Reply>) -> Result<(), GcksError> {
        if let Some(reason) = self.poisoned() {
            return Err(GcksError::Poisoned(reason));
        }
        self.driver.command(command).map_err(|e| self.gone(e))
    }

    /// The unicast address members send NACKs to (their feedback address).
    pub fn local_addr(&self) -> SocketAddr {
        // Invariant: the driver was configured with a serving port, so it has its address.
        self.driver
            .local_addr(Port::Serve)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The resync endpoints' bound addresses (TCP, HTTP), where configured.
    pub fn resync_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        self.driver.resync_addrs()
    }

    /// The GCKS's public key at start (in every registration bundle's Rekey SA until a
    /// signing-key rollover, [`Self::roll_signing_key`], takes effect).
    pub fn public_key(&self) -> ed25519_dalek::VerifyingKey {
        self.public_key
    }

    /// Replaces the GCKS's signing key (the endpoint's `rollover` module says how members
    /// learn it): a new key is generated and written to the state directory's next key file
    /// (`keyfile::write_next_key`, synced) before anything is announced; it becomes the key
    /// file once the first message signed with it is stored. Returns the first sequence
    /// number the new key signs. Needs a GCKS started from its key files
    /// ([`GcksBuilder::start_with_key_file`]), so that a restart finds the key the state
    /// names. [`RolloverMode::Compromised`] sends every member to re-registration.
    pub fn roll_signing_key(&self, mode: RolloverMode) -> Result<u64, GcksError> {
        let dir = self.key_dir.as_ref().ok_or(GcksError::NoKeyFile)?;
        if let Some(reason) = self.poisoned() {
            return Err(GcksError::Poisoned(reason));
        }
        let next = crate::keyfile::write_next_key(dir)?;
        let answer = self
            .driver
            .inspect(move |endpoint, _| endpoint.roll_signing_key(Instant::now(), next, mode))
            .map_err(|e| self.gone(e))?;
        match answer {
            Ok(from_seq) => Ok(from_seq),
            Err(error) => {
                // Refused before anything was announced: the next key is of no use.
                crate::keyfile::discard_next(dir)?;
                Err(GcksError::Rollover(error))
            }
        }
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
    /// first batch.
    ///
    /// The last command for a member wins: a [`Self::leave`] before the batch cancels the join
    /// ([`JoinError::Cancelled`]); a join of a member in the group is
    /// [`JoinError::AlreadyMember`]; a second join while one waits is
    /// [`JoinError::AlreadyJoining`].
    pub fn join(
        &self,
        member: MemberId,
    ) -> Result<Receiver<Result<RegistrationBundle, JoinError>>, GcksError> {
        self.join_as(member, false)
    }

    /// Admits `member` in the next batch as a relay: it holds a leaf like any member, and the
    /// GCKS counts it as a relay ([`GcksStats::relays`]) until it leaves. Otherwise as
    /// [`Self::join`].
    pub fn join_relay(
        &self,
        member: MemberId,
    ) -> Result<Receiver<Result<RegistrationBundle, JoinError>>, GcksError> {
        self.join_as(member, true)
    }

    /// Admits `member` in the next batch as a unicast member (RFC 4046 5.1, multi-unicast):
    /// its bundle has [`RegistrationBundle::unicast`] set, and the GCKS delivers each message
    /// to it by unicast (manifest and own chunk in one datagram, retransmitted until
    /// acknowledged; see [`rekeycast_proto::session::unicast`]) at the address its first
    /// acknowledgement comes from. Otherwise as [`Self::join`].
    pub fn join_unicast(
        &self,
        member: MemberId,
    ) -> Result<Receiver<Result<RegistrationBundle, JoinError>>, GcksError> {
        self.driver
            .inspect(move |endpoint, _| endpoint.mark_unicast(member))
            .map_err(|e| self.gone(e))?;
        self.join_as(member, false)
    }

    /// What the unicast members cost the GCKS (deliveries, retransmissions, bytes,
    /// acknowledgements, give-ups).
    pub fn unicast_stats(
        &self,
    ) -> Result<rekeycast_proto::session::unicast::UnicastCounters, GcksError> {
        self.driver
            .inspect(|endpoint, _| *endpoint.unicast_counters())
            .map_err(|e| self.gone(e))
    }

    fn join_as(
        &self,
        member: MemberId,
        relay: bool,
    ) -> Result<Receiver<Result<RegistrationBundle, JoinError>>, GcksError> {
        let (reply, bundle) = crossbeam_channel::bounded(1);
        self.command(GcksCommand::Join {
            member,
            relay,
            ticket: Reply::Join(reply),
        })?;
        Ok(bundle)
    }

    /// Removes `member` in the next batch, or cancels its join if the join still waits for
    /// its batch ([`LeaveOutcome::JoinCancelled`]). A leave of a member that is neither in
    /// the group nor joining is refused ([`LeaveError::UnknownMember`]).
    ///
    /// Durability: with a state directory, a revocation is appended to the directory's leave
    /// journal and fsynced before this returns [`LeaveOutcome::Revoked`] with `durable: true`;
    /// a GCKS that crashes before the batch applying it is durable replays the journal when it
    /// starts and applies the leave in its first batch.
    pub fn leave(&self, member: MemberId) -> Result<LeaveOutcome, GcksError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.command(GcksCommand::Leave {
            member,
            ticket: Reply::Leave(reply),
        })?;
        match answer.recv() {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(LeaveError::Poisoned(reason))) => Err(GcksError::Poisoned(reason)),
            Ok(Err(error)) => Err(GcksError::Leave(error)),
            Err(_) => Err(self.gone(DriverError::Gone)),
        }
    }

    /// Submits several membership changes at once, in order, as if each were its own
    /// [`Self::join`], [`Self::join_relay`] or [`Self::leave`]; the returned ticket collects
    /// their answers.
    pub fn apply(&self, changes: Vec<Change>) -> Result<ChangesTicket, GcksError> {
        let count = changes.len();
        let (reply, answers) = crossbeam_channel::bounded(count.max(1));
        self.command(GcksCommand::Changes {
            changes,
            ticket: Reply::Changes(reply),
        })?;
        Ok(ChangesTicket { count, answers })
    }

    /// Admits `members` in the next batch, as one [`Self::join`] each would (the same answers,
    /// the same rules), but in one command: the loop takes them all from one message, where
    /// joins one by one cost a channel round trip and a wake-up each. For bulk registration
    /// (a group's first batch of a million members). A batch holds at most
    /// [`GcksConfig::max_batch`] changes: more joins than that go in the batches after it.
    ///
    /// The returned [`JoinsTicket`] collects the answers in the order of `members`; they
    /// wait in an unbounded channel, so collect them (the bundles hold the joiners' keys).
    pub fn join_many(&self, members: Vec<MemberId>) -> Result<JoinsTicket, GcksError> {
        let count = members.len();
        let (reply, answers) = crossbeam_channel::unbounded();
        let changes = members.into_iter().map(Change::Join).collect();
        self.command(GcksCommand::Changes {
            changes,
            ticket: Reply::Changes(reply),
        })?;
        let mut received = Vec::with_capacity(count);
        received.resize_with(count, || None);
        Ok(JoinsTicket {
            answers,
            received,
            missing: count,
        })
    }

    /// Applies the pending changes now (or refreshes the group key if there are none); a
    /// failed batch waiting for its retry is retried now.
    pub fn rekey_now(&self) -> Result<(), GcksError> {
        self.command(GcksCommand::RekeyNow)
    }

    /// The GCKS's figures.
    pub fn stats(&self) -> Result<GcksStats, GcksError> {
        self.driver
            .inspect(|endpoint, stats| gcks_stats(endpoint, stats))
            .map_err(|e| self.gone(e))
    }

    /// The signed manifest of message `seq` and the chunk of the member whose leaf has order
    /// key `order_key`: what a resync endpoint serves.
    pub fn resync_item(&self, seq: u64, order_key: u32) -> Result<ResyncAnswer, GcksError> {
        self.driver
            .inspect(move |endpoint, _| endpoint.resync_item(seq, order_key))
            .map_err(|e| self.gone(e))
    }

    /// The latest signed manifest: a resync endpoint's state answer.
    pub fn latest_manifest(&self) -> Result<Option<Vec<u8>>, GcksError> {
        self.driver
            .inspect(|endpoint, _| endpoint.latest_manifest())
            .map_err(|e| self.gone(e))
    }

    /// The GCKS's events.
    pub fn events(&self) -> &Receiver<GcksEvent> {
        &self.events
    }

    /// Stops the engine: joins still waiting are answered [`JoinError::Stopped`], what the
    /// sender has queued goes out, and the loop's thread is joined.
    pub fn shutdown(mut self) -> Result<(), GcksError> {
        let _ = self.driver.command(GcksCommand::Stop);
        let result = self.driver.stop();
        match (self.poisoned(), result) {
            (Some(reason), _) => Err(GcksError::Poisoned(reason)),
            (None, result) => result.map_err(GcksError::Driver),
        }
    }
}

/// Builds a [`Gcks`] from production defaults ([`GcksConfig::new`]): set what differs, then
/// [`GcksBuilder::start`].
///
/// ```no_run
/// use std::time::Duration;
/// use rekeycast::engine::gcks::GcksBuilder;
/// use rekeycast::io::socket::MulticastConfig;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let signing_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
/// let gcks = GcksBuilder::new(MulticastConfig::loopback_v4("239.1.2.4:7400".parse()?))
///     .state_dir("/var/lib/rekeycast")
///     .resync_tcp("0.0.0.0:7401".parse()?)
///     .batch_interval(Duration::from_millis(500))
///     .start(signing_key)?;
/// # gcks.shutdown()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct GcksBuilder {
    config: GcksConfig,
}

impl GcksBuilder {
    /// A builder for a GCKS sending with the multicast settings `multicast`, with the
    /// production defaults of [`GcksConfig::new`].
    pub fn new(multicast: crate::io::socket::MulticastConfig) -> Self {
        Self {
            config: GcksConfig::new(multicast),
        }
    }

    /// The group id and the SPI of its Rekey SA (default 1 and 1).
    pub fn group(mut self, group_id: u32, spi: u32) -> Self {
        self.config.group_id = group_id;
        self.config.spi = spi;
        self
    }

    /// The local address to send from and take feedback on.
    pub fn bind(mut self, bind: SocketAddr) -> Self {
        self.config.bind = bind;
        self
    }

    /// The state directory (persisted, resumed from on start).
    pub fn state_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.config.state_dir = Some(dir.into());
        self
    }

    /// Serves resync over TCP at `addr`.
    pub fn resync_tcp(mut self, addr: SocketAddr) -> Self {
        self.config.resync_tcp = Some(addr);
        self
    }

    /// Serves resync over HTTP (and `/metrics`) at `addr`.
    pub fn resync_http(mut self, addr: SocketAddr) -> Self {
        self.config.resync_http = Some(addr);
        self
    }

    /// The time between batches while changes are pending.
    pub fn batch_interval(mut self, interval: Duration) -> Self {
        self.config.batch_interval = interval;
        self
    }

    /// The pending changes that make a batch due before the interval ends.
    pub fn max_batch(mut self, changes: usize) -> Self {
        self.config.max_batch = changes;
        self
    }

    /// The admission delay ([`GcksConfig::admission_delay`]).
    pub fn admission_delay(mut self, delay: Duration) -> Self {
        self.config.admission_delay = delay;
        self
    }

    /// Worker threads for batches (0: one per core).
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }

    /// Any other setting, on the configuration itself.
    pub fn configure(mut self, configure: impl FnOnce(&mut GcksConfig)) -> Self {
        configure(&mut self.config);
        self
    }

    /// The configuration built so far.
    pub fn config(&self) -> &GcksConfig {
        &self.config
    }

    /// Starts the GCKS ([`Gcks::start`]).
    pub fn start(self, signing_key: SigningKey) -> Result<Gcks, GcksError> {
        Gcks::start(self.config, signing_key)
    }

    /// Starts the GCKS with the signing key of its state directory's key file
    /// ([`Gcks::start_with_key_files`]): loaded if the file exists, generated and written
    /// (mode 0600) into a directory that holds no state yet, matched to the stored state after
    /// a signing-key rollover. A key file missing beside a stored state is an error naming the
    /// file ([`KeyFileError::MissingKey`]), never replaced by a new key. Returns where the key
    /// came from.
    pub fn start_with_key_file(self) -> Result<(Gcks, KeyOrigin), GcksError> {
        let dir = self
            .config
            .state_dir
            .as_ref()
            .ok_or(GcksError::NoStateDir)?;
        // Whether a key existed before: the start resolves the key files against the state.
        let origin = if dir.join(crate::keyfile::SIGNING_KEY_FILE).exists() {
            KeyOrigin::Loaded
        } else {
            KeyOrigin::Generated
        };
        Ok((Gcks::start_from(self.config, KeySource::Files)?, origin))
    }
}

/// The GCKS's storage: its state directory, or none (nothing is persisted; the endpoint then
/// issues no store operation).
enum GcksStore {
    Memory,
    Dir(GcksStorage),
}

impl Storage<GcksStoreOp> for GcksStore {
    fn apply(&mut self, op: &GcksStoreOp) -> Result<(), StoreError> {
        match self {
            Self::Memory => Ok(()),
            Self::Dir(storage) => storage.apply(op),
        }
    }
}

/// Routes the endpoint's answers to their callers and the rest to the product's channel.
struct GcksSink {
    events: ChannelSink<GcksEvent>,
    poisoned: Arc<OnceLock<PoisonReason>>,
    /// Where the key files are, for a GCKS started from them.
    key_dir: Option<std::path::PathBuf>,
}

impl EventSink<EndpointEvent<Reply>> for GcksSink {
    fn deliver(&mut self, event: EndpointEvent<Reply>) -> Delivery {
        // A caller's channel has room for its answer (one per join or leave, one per change of
        // a batch call); one that is gone no longer waits.
        let event = match event.without_ticket() {
            Ok(event) => event,
            Err(EndpointEvent::JoinAnswered {
                ticket,
                part,
                result,
            }) => {
                match ticket {
                    Reply::Join(reply) => drop(reply.try_send(result)),
                    Reply::Changes(reply) => {
                        drop(reply.try_send((part.unwrap_or(0), ChangeAnswer::Join(result))))
                    }
                    Reply::Leave(_) => {}
                }
                return Delivery::Delivered;
            }
            Err(EndpointEvent::LeaveAnswered {
                ticket,
                part,
                result,
            }) => {
                match ticket {
                    Reply::Leave(reply) => drop(reply.try_send(result)),
                    Reply::Changes(reply) => {
                        drop(reply.try_send((part.unwrap_or(0), ChangeAnswer::Leave(result))))
                    }
                    Reply::Join(_) => {}
                }
                return Delivery::Delivered;
            }
            Err(_) => return Delivery::Delivered,
        };
        if let GcksEvent::Poisoned { reason } = &event {
            let _ = self.poisoned.set(*reason);
        }
        if let (GcksEvent::SigningKeyRolled { from_seq, .. }, Some(dir)) = (&event, &self.key_dir) {
            // The first message under the new key is stored: the key files follow. A failure
            // leaves both files, which the next start resolves from the stored state.
            if let Err(error) = crate::keyfile::promote_next(dir) {
                tracing::error!(%error, from_seq, "promoting the next signing key file");
            }
        }
        self.events.deliver(event)
    }
}

/// The GCKS's figures: the endpoint's and the driver's.
fn gcks_stats(endpoint: &Endpoint, driver: &DriverStats) -> GcksStats {
    let stats = endpoint.stats();
    GcksStats {
        sender: stats.sender,
        repair_orders: stats.repair_orders,
        members: stats.members,
        seq: stats.seq,
        group_key_version: stats.group_key_version,
        pending: stats.pending,
        loop_lag_us: driver.lag,
        loop_lag_recent_us: driver.recent_lag,
        datagrams_sent: driver.sent,
        send_blocked: driver.send_blocked,
        resync: driver.resync,
        relays: stats.relays,
        history_not_held: stats.history_not_held,
        uplinks: stats.uplinks,
        last_build_steps: stats.last_build_steps,
    }
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    fn config(salt: u8) -> GcksConfig {
        let pid = std::process::id();
        let group = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(239, 84, salt, pid as u8),
            25_000 + (pid % 10_000) as u16 + u16::from(salt),
        ));
        let mut config = GcksConfig::loopback(group);
        config.batch_interval = Duration::from_secs(3600);
        config.admission_delay = Duration::ZERO;
        config
    }

    #[test]
    fn a_batch_of_changes_is_answered_change_by_change() {
        let gcks = Gcks::start(config(1), SigningKey::from_bytes(&[8; 32])).unwrap();
        let first = gcks.join(MemberId(3)).unwrap();
        gcks.rekey_now().unwrap();
        first
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        let ticket = gcks
            .apply(vec![
                Change::Join(MemberId(1)),
                Change::JoinRelay(MemberId(2)),
                Change::Leave(MemberId(3)),
                Change::Join(MemberId(1)),
                Change::Leave(MemberId(9)),
            ])
            .unwrap();
        assert_eq!(ticket.len(), 5);
        gcks.rekey_now().unwrap();
        let answers = ticket.wait(Duration::from_secs(30)).expect("every answer");
        assert!(matches!(&answers[0], ChangeAnswer::Join(Ok(b)) if b.first_seq == 2));
        assert!(matches!(&answers[1], ChangeAnswer::Join(Ok(b)) if b.member == MemberId(2)));
        assert!(matches!(
            answers[2],
            ChangeAnswer::Leave(Ok(LeaveOutcome::Revoked { durable: false }))
        ));
        assert!(matches!(
            answers[3],
            ChangeAnswer::Join(Err(JoinError::AlreadyJoining(MemberId(1))))
        ));
        assert!(matches!(
            answers[4],
            ChangeAnswer::Leave(Err(LeaveError::UnknownMember(MemberId(9))))
        ));
        let stats = gcks.stats().unwrap();
        assert_eq!((stats.members, stats.relays, stats.seq), (2, 1, 2));
        assert!(matches!(
            gcks.leave(MemberId(9)),
            Err(GcksError::Leave(LeaveError::UnknownMember(MemberId(9))))
        ));
        gcks.shutdown().unwrap();
    }

    #[test]
    fn joins_in_one_call_are_answered_in_order() {
        let gcks = Gcks::start(config(3), SigningKey::from_bytes(&[8; 32])).unwrap();
        let first = gcks.join(MemberId(0)).unwrap();
        gcks.rekey_now().unwrap();
        first
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        // Member 0 is in the group, member 5 is asked twice.
        let mut members: Vec<MemberId> = (1..=1000).map(MemberId).collect();
        members.extend([MemberId(0), MemberId(5)]);
        let mut ticket = gcks.join_many(members).unwrap();
        assert_eq!((ticket.len(), ticket.is_empty()), (1002, false));
        // The bundles come only with the batch.
        match ticket.wait(Duration::from_millis(1)) {
            Err(JoinsWaitError::TimedOut { answered, count }) => {
                assert_eq!(count, 1002);
                assert!(answered <= 2, "{answered} answered");
                assert_eq!(answered + ticket.missing(), 1002);
            }
            other => panic!("{:?}", other.map(|answers| answers.len())),
        }
        gcks.rekey_now().unwrap();
        let answers = ticket.wait(Duration::from_secs(30)).expect("every answer");
        assert_eq!(answers.len(), 1002);
        for (index, answer) in answers[..1000].iter().enumerate() {
            let bundle = answer.as_ref().unwrap();
            assert_eq!(bundle.member, MemberId(index as u64 + 1));
            assert_eq!(bundle.first_seq, 2);
        }
        assert!(matches!(
            answers[1000],
            Err(JoinError::AlreadyMember(MemberId(0)))
        ));
        assert!(matches!(
            answers[1001],
            Err(JoinError::AlreadyJoining(MemberId(5)))
        ));
        assert_eq!(gcks.stats().unwrap().members, 1001);
        assert!(gcks.join_many(Vec::new()).unwrap().is_empty());
        let mut left = gcks.join_many(vec![MemberId(2000)]).unwrap();
        gcks.shutdown().unwrap();
        // Answered Stopped at shutdown, or the engine is gone: never a hang.
        match left.wait(Duration::from_secs(10)) {
            Ok(answers) => assert!(matches!(answers[0], Err(JoinError::Stopped))),
            Err(error) => assert!(matches!(error, JoinsWaitError::Gone { .. })),
        }
    }

    #[test]
    fn shutdown_answers_a_waiting_join() {
        let gcks = Gcks::start(config(2), SigningKey::from_bytes(&[8; 32])).unwrap();
        let waiting = gcks.join(MemberId(1)).unwrap();
        gcks.shutdown().unwrap();
        assert!(matches!(
            waiting.recv_timeout(Duration::from_secs(10)),
            Ok(Err(JoinError::Stopped))
        ));
    }

    #[test]
    fn the_builder_starts_from_production_defaults() {
        let multicast =
            crate::io::socket::MulticastConfig::loopback_v4("239.84.9.9:7400".parse().unwrap());
        let builder = GcksBuilder::new(multicast.clone());
        let config = builder.config();
        assert_eq!(config.key_seed, None, "the operating system's RNG");
        assert!(
            config.feedback_limit.is_some(),
            "feedback is rate-limited per source"
        );
        assert!(config.bind.ip().is_unspecified());
        assert_eq!(config.multicast, multicast);
        let loopback = GcksConfig::loopback(multicast.group);
        assert_eq!(loopback.feedback_limit, None);
        let built = GcksBuilder::new(multicast)
            .state_dir("/tmp/x")
            .batch_interval(Duration::from_millis(5))
            .configure(|c| c.key_seed = Some(3));
        assert_eq!(built.config().batch_interval, Duration::from_millis(5));
        assert_eq!(built.config().key_seed, Some(3));
        assert!(built.config().state_dir.is_some());
    }

    /// A rollover through the engine: the next key is written beside the current one, the
    /// rollover's messages are stored, the key files are swapped once the new key signs, and
    /// a restart on the state directory starts under the new key. A GCKS given its key
    /// cannot roll it.
    #[test]
    fn a_rollover_swaps_the_key_files_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(5);
        config.state_dir = Some(dir.path().join("state"));
        let gcks = Gcks::start_with_key_files(config.clone()).unwrap();
        let old = gcks.public_key();
        let joined = gcks.join(MemberId(1)).unwrap();
        gcks.rekey_now().unwrap();
        joined
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        let from_seq = gcks
            .roll_signing_key(RolloverMode::Planned { announcements: 1 })
            .unwrap();
        assert_eq!(from_seq, 3);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match gcks.events().recv_timeout(left) {
                Ok(GcksEvent::SigningKeyRolled { from_seq, .. }) => {
                    assert_eq!(from_seq, 3);
                    break;
                }
                Ok(_) => {}
                Err(error) => panic!("no rollover event: {error}"),
            }
        }
        gcks.shutdown().unwrap();
        let state = dir.path().join("state");
        assert!(crate::keyfile::load_next(&state).unwrap().is_none());
        let current = crate::keyfile::load(&state.join(crate::keyfile::SIGNING_KEY_FILE)).unwrap();
        assert_ne!(current.verifying_key(), old);
        let restarted = Gcks::start_with_key_files(config).unwrap();
        assert_eq!(restarted.public_key(), current.verifying_key());
        assert_eq!(restarted.stats().unwrap().seq, 3);
        restarted.shutdown().unwrap();
        let given = Gcks::start(self::config(6), SigningKey::from_bytes(&[8; 32])).unwrap();
        assert!(matches!(
            given.roll_signing_key(RolloverMode::DEFAULT_PLANNED),
            Err(GcksError::NoKeyFile)
        ));
        given.shutdown().unwrap();
    }
}
