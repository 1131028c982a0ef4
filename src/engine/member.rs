//! The embedding API for a member: [`Member`], one group member's rekey receiver, a thin
//! handle over the [`Driver`] running a [`MemberEndpoint`].
//!
//! Started from the registration bundle the product's registration protocol delivered, it
//! joins the multicast group, runs the verifier pipeline, repairs what it lost with NACKs and
//! hands the product its key events ([`ReceiverEvent`]: new group key, new Data SA, out of
//! sync, state check needed, keys that cannot open the member's own chunk, must re-register,
//! whose reason [`MemberStats::must_reregister`] keeps). With resync endpoints configured it
//! resyncs by itself, under the one resync policy
//! ([`rekeycast_proto::endpoint::resync_policy`]); without, the product resyncs it
//! ([`Member::resync`], [`Member::state_answer`]). With [`MemberConfig::state_file`] set it
//! saves its keys after every applied message, before the product hears of it, and
//! [`Member::resume`] brings it back from them after a restart, without registering again.
//! Products with their own runtime can drive the [`MemberEndpoint`] themselves instead.
//!
//! ```
//! use std::time::Duration;
//! use rekeycast::gcks::{Gcks, GcksConfig};
//! use rekeycast::lkh::MemberId;
//! use rekeycast::member::{Member, MemberConfig};
//! use rekeycast::session::ReceiverEvent;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let group = "239.1.2.4:7401".parse()?;
//! let gcks = Gcks::start(
//!     GcksConfig::loopback(group),
//!     ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
//! )?;
//! let bundle = gcks.join(MemberId(7))?.recv_timeout(Duration::from_secs(10))??;
//! let member = Member::start(&bundle, MemberConfig::loopback(group, gcks.local_addr()))?;
//! while let Ok(event) = member.events().recv_timeout(Duration::from_secs(10)) {
//!     if let ReceiverEvent::NewDataSa { seq, data_sa } = event {
//!         println!("message {seq}: traffic key SPI {:#x}", data_sa.spi);
//!         break;
//!     }
//! }
//! member.shutdown()?;
//! # Ok(()) }
//! ```

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast_proto::endpoint::failover::{FailoverConfig, FailoverCounters};
use rekeycast_proto::endpoint::member::traffic::KeyLifeConfig;
use rekeycast_proto::endpoint::member::{
    MemberCommand, MemberEndpoint, MemberEndpointConfig, MemberFigures, MemberStoreOp,
};
use rekeycast_proto::endpoint::resync_policy::{ResyncConfig, ResyncCounters};
use rekeycast_proto::endpoint::{
    Port, ResyncEndpoint, ResyncProtocol, Storage, StoreError, StoreErrorKind,
};

use super::driver::{
    bounded_events, Driver, DriverConfig, DriverError, DriverHandle, DriverStats, LoopLag,
    ReceiveFilter, SenderPort, DEFAULT_EVENT_CAPACITY,
};
use crate::auth::datagram::DatagramCounters;
use crate::auth::message::MessageCounters;
use crate::config::{check_bind, check_multicast, check_receiver, InvalidConfig};
use crate::io::resync_client::Endpoint;
use crate::io::socket::MulticastConfig;
use crate::lkh::{MemberStateError, RegistrationBundle};
use crate::persist::MemberKeyFile;
use crate::session::receiver::{ResyncError, StateVerdict};
use crate::session::{
    ConfigError, ReceiverConfig, ReceiverCounters, ReceiverEvent, ReregisterReason,
};

/// Configuration of a [`Member`]. [`MemberConfig::new`] holds production defaults;
/// [`MemberConfig::loopback`] is for tests and demos on one host.
///
/// It deserializes from a configuration file's table (serde): every field may be left out (its
/// default, [`MemberConfig::default`]), durations are whole milliseconds in fields named
/// `*_ms`, resync endpoints are written `"tcp://HOST:PORT"` or `"http://HOST:PORT"` (host
/// names are resolved when read), the nested configurations are tables (`multicast`,
/// `receiver`), and a key that is not a field is an error. Check what was read with
/// [`MemberConfig::validate`]: the receiver's `feedback_addr` has no usable default.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemberConfig {
    /// The group the member expects to be in: a registration bundle (or saved keys) of
    /// another group is refused ([`MemberError::GroupMismatch`]). `None` (the default): the
    /// bundle's group, unchecked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<u32>,
    /// The multicast group, interface and loopback of the rekey traffic.
    pub multicast: MulticastConfig,
    /// The unicast address the member sends NACKs and probe replies from, and connects to
    /// resync endpoints from when it is a specific one (port 0: any).
    pub bind: SocketAddr,
    /// The receiver session's configuration; its `feedback_addr` is the GCKS's (or relay's)
    /// address, its scheduler's `group_size` the group size the resync policy assumes.
    pub receiver: ReceiverConfig,
    /// Relay resync endpoints, tried first, in order. A relay's "beyond the history" answer
    /// is not believed while a GCKS endpoint is configured.
    #[serde(with = "crate::config::endpoint_list")]
    pub resync_relays: Vec<Endpoint>,
    /// The GCKS's resync endpoints, tried after the relays, in order. With no endpoint at all
    /// (the default) the member raises [`ReceiverEvent::OutOfSync`] and
    /// [`ReceiverEvent::StateCheckNeeded`] and the product resyncs it ([`Member::resync`],
    /// [`Member::state_answer`]).
    #[serde(with = "crate::config::endpoint_list")]
    pub resync_endpoints: Vec<Endpoint>,
    /// The deadline of one whole fetch from one endpoint (connect, request, every item).
    #[serde(rename = "resync_timeout_ms", with = "rekeycast_nack::duration_ms")]
    pub resync_timeout: Duration,
    /// The longest random wait before a resync or state check, against out-of-sync
    /// implosion: each member waits a uniform delay in
    /// `[0, min(this, group size / resync_capacity))`.
    #[serde(rename = "resync_max_delay_ms", with = "rekeycast_nack::duration_ms")]
    pub resync_max_delay: Duration,
    /// Resyncs and state checks per second the endpoints can serve for the whole group, to
    /// scale that wait (and the backoff of state checks raised by unverifiable traffic) with
    /// the group size.
    pub resync_capacity: f64,
    /// Rounds over the endpoint list before a resync gives up (with jittered exponential
    /// backoff).
    pub resync_attempts: u32,
    /// Where the member saves its keys and last sequence number after every applied message
    /// (durably, mode 0600, before the message's events reach the product), so that after a
    /// restart [`Member::resume`] continues from them without registering again. `None` (the
    /// default): nothing is saved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    /// The seed of the member's random delays; `None` (the default): drawn from the OS, so
    /// the members of a group spread differently.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Events kept for the product at most; beyond, new ones are dropped and counted.
    pub event_capacity: usize,
    /// Relay failover (a table; see [`FailoverConfig`]): when the member gives up on its
    /// relay and how moves are spaced. The relays it moves between are its registration
    /// bundle's directory. A move changes the group it listens to (it leaves the old relay's
    /// group and joins the new one's, on the interface and with the socket settings of
    /// `multicast`), where its NACKs go and whose resync endpoints it asks first. With a
    /// directory, its first contact's group and feedback address replace `multicast.group`
    /// and `receiver.feedback_addr` from the start.
    pub failover: FailoverConfig,
    /// The Data SAs' soft lifetime (past it with no newer SA the member checks the group's
    /// state) and the window its re-registration is spread over (a table; see
    /// [`KeyLifeConfig`]).
    pub key_life: KeyLifeConfig,
}

impl MemberConfig {
    /// A member of multicast group `group` on the system's default interface, sending its
    /// feedback to `feedback` (the GCKS's or its relay's feedback address), with production
    /// defaults.
    pub fn new(group: SocketAddr, feedback: SocketAddr) -> Self {
        let bind = match group {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let resync = ResyncConfig::default();
        Self {
            group_id: None,
            multicast: MulticastConfig::new(group),
            bind,
            receiver: ReceiverConfig::new(feedback),
            resync_relays: Vec::new(),
            resync_endpoints: Vec::new(),
            resync_timeout: resync.fetch_timeout,
            resync_max_delay: resync.max_spread,
            resync_capacity: resync.capacity,
            resync_attempts: resync.rounds,
            state_file: None,
            seed: None,
            event_capacity: DEFAULT_EVENT_CAPACITY,
            failover: FailoverConfig::default(),
            key_life: KeyLifeConfig::default(),
        }
    }

    /// A member of multicast group `group` on the loopback interface, sending its feedback to
    /// `feedback` (the GCKS's [`crate::gcks::Gcks::local_addr`]).
    pub fn loopback(group: SocketAddr, feedback: SocketAddr) -> Self {
        Self {
            multicast: MulticastConfig::loopback_v4(group),
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ..Self::new(group, feedback)
        }
    }

    /// Checks every field's range, naming the first field that breaks a rule: the multicast
    /// settings, a `bind` of the group's address family, the receiver session's configuration
    /// with a feedback address that can be sent to, a non-zero resync deadline, attempts and
    /// event capacity, a positive, finite resync capacity, and a non-empty state file when
    /// set.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        check_multicast("multicast", &self.multicast)?;
        check_bind("bind", self.bind, self.multicast.group)?;
        check_receiver("receiver", &self.receiver)?;
        self.failover
            .validate()
            .map_err(|error| InvalidConfig::session("failover", error))?;
        if self.key_life.validate().is_err() {
            return Err(InvalidConfig::new(
                "key_life.soft_lifetime_percent",
                "must be between 1 and 99",
            ));
        }
        if self.resync_timeout.is_zero() {
            return Err(InvalidConfig::new("resync_timeout_ms", "must not be 0"));
        }
        if !(self.resync_capacity.is_finite() && self.resync_capacity > 0.0) {
            return Err(InvalidConfig::new(
                "resync_capacity",
                "must be positive and finite",
            ));
        }
        if self.resync_attempts == 0 {
            return Err(InvalidConfig::new("resync_attempts", "must be at least 1"));
        }
        if self
            .state_file
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(InvalidConfig::new(
                "state_file",
                "must not be empty when set",
            ));
        }
        if self.event_capacity == 0 {
            return Err(InvalidConfig::new("event_capacity", "must be at least 1"));
        }
        Ok(())
    }

    /// The resync policy's configuration these settings make.
    pub fn resync_config(&self) -> ResyncConfig {
        ResyncConfig {
            relays: self.resync_relays.iter().map(resync_endpoint).collect(),
            gcks: self.resync_endpoints.iter().map(resync_endpoint).collect(),
            fetch_timeout: self.resync_timeout,
            rounds: self.resync_attempts.max(1),
            group_size: self.receiver.scheduler.group_size,
            capacity: self.resync_capacity,
            max_spread: self.resync_max_delay,
            ..ResyncConfig::default()
        }
    }
}

impl Default for MemberConfig {
    /// [`MemberConfig::new`] for [`crate::gcks::DEFAULT_GROUP`] with no feedback address
    /// (`0.0.0.0:0`): set `receiver.feedback_addr` to the GCKS's (or relay's) before use.
    fn default() -> Self {
        Self::new(
            crate::gcks::DEFAULT_GROUP,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        )
    }
}

fn resync_endpoint(endpoint: &Endpoint) -> ResyncEndpoint {
    match *endpoint {
        Endpoint::Tcp(addr) => ResyncEndpoint {
            protocol: ResyncProtocol::Tcp,
            addr,
        },
        Endpoint::Http(addr) => ResyncEndpoint {
            protocol: ResyncProtocol::Http,
            addr,
        },
    }
}

/// Why a member could not start, or its loop is gone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemberError {
    /// The receiver configuration or the registration bundle is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The saved keys cannot be read, or are corrupt ([`Member::resume`]).
    #[error("member keys at {path}")]
    State {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: MemberStateError,
    },
    /// The driver could not start (a socket, a thread), or its loop is gone.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The registration bundle (or the saved keys) is of another group than the configured
    /// [`MemberConfig::group_id`].
    #[error("the configured group_id {configured} is not the group of the member's keys ({keys})")]
    GroupMismatch {
        /// The configuration's group.
        configured: u32,
        /// The group of the bundle or saved keys.
        keys: u32,
    },
}

/// A snapshot of a member's figures.
#[derive(Debug, Clone, Default)]
pub struct MemberStats {
    /// The session's counters.
    pub receiver: ReceiverCounters,
    /// Header, MAC and window rejections.
    pub datagrams: DatagramCounters,
    /// Signature checks made and failed.
    pub messages: MessageCounters,
    /// The next message the member needs.
    pub next_seq: u64,
    /// The order key of the member's leaf (what it asks a resync endpoint for its chunk with).
    pub order_key: u32,
    /// The version of the member's group key, once it has one.
    pub group_key_version: Option<u32>,
    /// Datagrams the receive filter dropped (simulated loss).
    pub simulated_drops: u64,
    /// Datagrams received from the sockets: each is counted once more, in
    /// [`MemberStats::datagrams_accepted`] or in [`MemberStats::datagrams_rejected`].
    pub datagrams_received: u64,
    /// Datagrams whose header, window and MAC checks passed.
    pub datagrams_accepted: u64,
    /// Datagrams received and not accepted: dropped by the receive filter
    /// ([`MemberStats::simulated_drops`]), dropped before the MAC check
    /// ([`MemberStats::dropped_before_mac`]), or rejected by the datagram checks
    /// ([`MemberStats::datagrams`]: too short, another group or SA, outside the window, a bad
    /// MAC, ...).
    pub datagrams_rejected: u64,
    /// Datagrams dropped before their header and MAC were checked: of a message already
    /// applied, of another block than the member's, or while the member stops or must
    /// register again.
    pub dropped_before_mac: u64,
    /// Event-loop lag, microseconds, since the start.
    pub loop_lag_us: LoopLag,
    /// Event-loop lag, microseconds, over the last 10 to 20 seconds.
    pub loop_lag_recent_us: LoopLag,
    /// Resyncs (of missed messages) started with the endpoints.
    pub resyncs_started: u64,
    /// Resyncs that gave up after their last round over every endpoint.
    pub resyncs_failed: u64,
    /// State checks started with the endpoints (counted apart from resyncs).
    pub state_checks_started: u64,
    /// The resync policy's figures (fetches, items applied and rejected, requests coalesced).
    pub resync: ResyncCounters,
    /// Events dropped because the product did not read them.
    pub events_dropped: u64,
    /// Saves of the member's keys to [`MemberConfig::state_file`] that failed (the member goes
    /// on; the file keeps the last state saved).
    pub state_save_failures: u64,
    /// Why the member must register again, once it must ([`ReceiverEvent::MustReregister`]):
    /// its messages left the history, or its keys cannot open its own chunk
    /// ([`ReceiverEvent::KeysCannotOpen`]). It then takes no traffic and starts no resync.
    pub must_reregister: Option<ReregisterReason>,
    /// The relay (its number in the directory) the member receives from now; `None`: the
    /// GCKS, or no directory.
    pub relay: Option<u16>,
    /// Failover's figures: moves between contacts, and why.
    pub failover: FailoverCounters,
    /// Times the member's group socket moved to another contact's group.
    pub listen_moves: u64,
}

impl MemberStats {
    fn of(figures: MemberFigures, driver: &DriverStats) -> Self {
        Self {
            receiver: figures.receiver,
            datagrams: figures.datagrams,
            messages: figures.messages,
            next_seq: figures.next_seq,
            order_key: figures.order_key,
            group_key_version: figures.group_key_version,
            simulated_drops: driver.filtered,
            datagrams_received: driver.received.listen + driver.received.feedback,
            datagrams_accepted: figures.datagrams.accepted,
            datagrams_rejected: driver.filtered
                + figures.dropped_before_mac
                + figures.datagrams.rejected(),
            dropped_before_mac: figures.dropped_before_mac,
            loop_lag_us: driver.lag,
            loop_lag_recent_us: driver.recent_lag,
            resyncs_started: figures.resync.resyncs_started,
            resyncs_failed: figures.resync.resyncs_failed,
            state_checks_started: figures.resync.state_checks_started,
            resync: figures.resync,
            events_dropped: driver.events_dropped,
            state_save_failures: figures.state_save_failures,
            must_reregister: figures.must_reregister,
            relay: figures.relay,
            failover: figures.failover,
            listen_moves: driver.listen_moves,
        }
    }
}

/// A [`ReceiveFilter`] that drops a datagram of the group ([`Port::Listen`]) when `lose`
/// says so and passes everything else: simulated loss for demos and tests on a loopback
/// network that loses nothing.
pub fn group_loss_filter(mut lose: impl FnMut() -> bool + Send + 'static) -> ReceiveFilter {
    Box::new(move |port, _, _| port != Port::Listen || !lose())
}

/// Starts a [`Member`] with what [`MemberConfig`] does not hold: a receive filter.
pub struct MemberBuilder {
    config: MemberConfig,
    filter: Option<ReceiveFilter>,
}

impl std::fmt::Debug for MemberBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberBuilder")
            .field("config", &self.config)
            .field("filter", &self.filter.is_some())
            .finish()
    }
}

impl MemberBuilder {
    /// Passes every received datagram through `filter` first ([`group_loss_filter`]).
    pub fn receive_filter(mut self, filter: ReceiveFilter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Joins the group as the member `bundle` registered, and starts the loop.
    pub fn start(self, bundle: &RegistrationBundle) -> Result<Member, MemberError> {
        check_group(&self.config, bundle.rekey_sa.group_id)?;
        let (endpoint_config, rng) = endpoint_parts(&self.config);
        let endpoint = MemberEndpoint::new(bundle, endpoint_config, rng, Instant::now())?;
        Member::spawn(endpoint, self.config, self.filter)
    }

    /// Comes back after the member's own restart from the keys saved in `state`; see
    /// [`Member::resume`].
    pub fn resume(self, state: &Path) -> Result<Member, MemberError> {
        let keys =
            crate::persist::load_member_keys(state).map_err(|source| MemberError::State {
                path: state.to_path_buf(),
                source,
            })?;
        check_group(&self.config, keys.rekey_sa().group_id)?;
        let (endpoint_config, rng) = endpoint_parts(&self.config);
        let endpoint = MemberEndpoint::resume(keys, endpoint_config, rng, Instant::now())?;
        Member::spawn(endpoint, self.config, self.filter)
    }
}

/// Refuses keys of another group than the configured one.
fn check_group(config: &MemberConfig, keys: u32) -> Result<(), MemberError> {
    match config.group_id {
        Some(configured) if configured != keys => {
            Err(MemberError::GroupMismatch { configured, keys })
        }
        _ => Ok(()),
    }
}

fn endpoint_parts(config: &MemberConfig) -> (MemberEndpointConfig, ChaCha8Rng) {
    let seed = config.seed.unwrap_or_else(|| rand::rngs::OsRng.next_u64());
    let endpoint = MemberEndpointConfig {
        group: config.multicast.group,
        receiver: config.receiver.clone(),
        resync: config.resync_config(),
        persist_keys: config.state_file.is_some(),
        directory: Default::default(),
        failover: config.failover.clone(),
        key_life: config.key_life,
    };
    (endpoint, ChaCha8Rng::seed_from_u64(seed))
}

/// Where a member's store operations go: its key file, or nowhere when none is configured
/// (the endpoint then asks for no save).
enum KeyStorage {
    File(MemberKeyFile),
    None,
}

impl Storage<MemberStoreOp> for KeyStorage {
    fn apply(&mut self, op: &MemberStoreOp) -> Result<(), StoreError> {
        match self {
            Self::File(file) => file.apply(op),
            Self::None => Err(StoreError {
                kind: StoreErrorKind::Io,
                detail: "no state file configured".into(),
            }),
        }
    }
}

/// One member's rekey receiver, its loop running on its own thread.
#[derive(Debug)]
pub struct Member {
    driver: DriverHandle<MemberEndpoint>,
    events: Receiver<ReceiverEvent>,
    local_addr: SocketAddr,
}

impl Member {
    /// A builder for a member with `config` (and a receive filter).
    pub fn builder(config: MemberConfig) -> MemberBuilder {
        MemberBuilder {
            config,
            filter: None,
        }
    }

    /// Joins the group as the member `bundle` registered, and starts the loop.
    pub fn start(bundle: &RegistrationBundle, config: MemberConfig) -> Result<Self, MemberError> {
        Self::builder(config).start(bundle)
    }

    /// Comes back after the member's own restart: loads the keys and last sequence number
    /// saved in `state` (see [`MemberConfig::state_file`], normally the same path), joins the
    /// group and starts the loop, without registering again. Messages missed while down come
    /// by resync from the configured endpoints (or the product's, after
    /// [`ReceiverEvent::StateCheckNeeded`]). The first event re-announces the Data SA in
    /// force ([`ReceiverEvent::NewDataSa`] of the last message applied).
    ///
    /// A corrupt or truncated file is an error ([`MemberError::State`]), never a fresh
    /// start; so are keys saved before any message was applied (such a member keeps its
    /// registration bundle and uses [`Member::start`]).
    pub fn resume(state: &Path, config: MemberConfig) -> Result<Self, MemberError> {
        Self::builder(config).resume(state)
    }

    fn spawn(
        endpoint: MemberEndpoint,
        config: MemberConfig,
        filter: Option<ReceiveFilter>,
    ) -> Result<Self, MemberError> {
        let mut driver_config = DriverConfig::new("rekeycast-member");
        driver_config.listen = Some(config.multicast.clone());
        driver_config.feedback = Some(SenderPort {
            multicast: config.multicast.clone(),
            bind: config.bind,
        });
        let storage = match &config.state_file {
            Some(path) => KeyStorage::File(MemberKeyFile::new(path)),
            None => KeyStorage::None,
        };
        let (sink, events) = bounded_events(config.event_capacity.max(1));
        let mut driver = Driver::new(endpoint, driver_config, storage, sink);
        if let Some(filter) = filter {
            driver = driver.receive_filter(filter);
        }
        let driver = driver.spawn()?;
        let local_addr = driver.local_addr(Port::Feedback).unwrap_or(config.bind);
        Ok(Self {
            driver,
            events,
            local_addr,
        })
    }

    /// The member's key events.
    pub fn events(&self) -> &Receiver<ReceiverEvent> {
        &self.events
    }

    /// The unicast address the member's feedback comes from.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The member's figures.
    pub fn stats(&self) -> Result<MemberStats, MemberError> {
        Ok(self
            .driver
            .inspect(|endpoint, stats| MemberStats::of(endpoint.figures(), stats))?)
    }

    /// Resync items, in sequence order from the member's next message: each a signed manifest
    /// and the member's chunk, as a resync endpoint served them. They are verified like
    /// multicast traffic. Returns the last sequence number applied, or the first refusal.
    pub fn resync(
        &self,
        items: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Result<u64, ResyncError>, MemberError> {
        Ok(self
            .driver
            .inspect(move |endpoint, _| endpoint.apply_resync(Instant::now(), &items))?)
    }

    /// A resync endpoint's state answer (its latest signed manifest), after
    /// [`ReceiverEvent::StateCheckNeeded`].
    pub fn state_answer(
        &self,
        manifest: Vec<u8>,
    ) -> Result<Result<StateVerdict, ResyncError>, MemberError> {
        Ok(self
            .driver
            .inspect(move |endpoint, _| endpoint.apply_state_answer(Instant::now(), &manifest))?)
    }

    /// A resync endpoint said the member's messages left its history: it must re-register.
    pub fn beyond_history(&self) -> Result<(), MemberError> {
        Ok(self.driver.command(MemberCommand::BeyondHistory)?)
    }

    /// Tells the member an estimate of the group's size, for its resync spreading and
    /// backoff.
    pub fn set_group_size(&self, size: u32) -> Result<(), MemberError> {
        Ok(self.driver.command(MemberCommand::GroupSize(size))?)
    }

    /// Leaves the group: saves the keys applied since the last save (when a state file is
    /// configured), then ends the loop and waits for its thread.
    pub fn shutdown(mut self) -> Result<(), MemberError> {
        if self.driver.command(MemberCommand::Stop).is_err() {
            // The loop has ended already: joining says how.
            return Ok(self.driver.join()?);
        }
        Ok(self.driver.join()?)
    }
}
