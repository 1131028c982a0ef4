//! [`Relay`]: one relay a product embeds (and the `rekey-relay` binary runs), a thin handle
//! over the generic [`Driver`] running a [`RelayEndpoint`].
//!
//! The endpoint decides (what to forward, store and save, when and from whom the relay resyncs
//! its own keys); the driver carries out over real sockets: the upstream group's receiver
//! socket ([`Port::Listen`]), a unicast socket for the relay's NACKs and probe replies
//! upstream ([`Port::Feedback`]), the downstream group's sender socket, whose unicast address
//! is its members' feedback address ([`Port::Serve`], rate limited per source address), the
//! TCP and HTTP resync endpoints serving the relay's history (with `/metrics` and
//! `/healthz`), the fetch threads of the relay's own resyncs, and, with a state directory
//! ([`RelayEngineConfig::state_dir`]), the storage thread that applies the endpoint's store
//! operations to a [`RelayStore`]. [`Relay::resume`] brings a relay back from its state
//! directory, serving its stored history at once.
//!
//! ```no_run
//! use std::net::SocketAddr;
//!
//! use rekeycast::io::socket::MulticastConfig;
//! use rekeycast::lkh::RegistrationBundle;
//! use rekeycast::{Relay, RelayEngineConfig};
//! use rekeycast_proto::endpoint::{ResyncEndpoint, ResyncProtocol};
//!
//! # fn run(bundle: RegistrationBundle) -> Result<(), rekeycast::RelayEngineError> {
//! let gcks_feedback: SocketAddr = "192.0.2.1:4700".parse().unwrap();
//! let mut config = RelayEngineConfig::new(
//!     MulticastConfig::new("239.1.1.1:4600".parse().unwrap()),
//!     gcks_feedback,
//!     MulticastConfig::new("239.1.2.1:4600".parse().unwrap()),
//! );
//! config.resync.gcks = vec![ResyncEndpoint {
//!     protocol: ResyncProtocol::Tcp,
//!     addr: "192.0.2.1:4800".parse().unwrap(),
//! }];
//! config.resync_tcp = Some("0.0.0.0:4800".parse().unwrap());
//! config.state_dir = Some("/var/lib/rekey-relay".into());
//! let relay = Relay::start(&bundle, config)?;
//! println!("members send their feedback to {}", relay.feedback_addr());
//! for event in relay.events().iter().take(10) {
//!     println!("{event:?}");
//! }
//! relay.shutdown()
//! # }
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crossbeam_channel::Receiver;
use rekeycast_nack::AggregatorStats;
use rekeycast_proto::endpoint::relay::{
    RelayCommand, RelayEndpoint, RelayEndpointConfig, RelayEndpointStats, RelayStoreOp,
};
use rekeycast_proto::endpoint::resync_policy::{ResyncConfig, ResyncCounters};
use rekeycast_proto::endpoint::{Port, Storage, StoreError, StoreErrorKind};

use super::driver::{
    bounded_events, Driver, DriverConfig, DriverError, DriverHandle, DriverStats, FeedbackLimit,
    LoopLag, ReceiveFilter, SenderPort, DEFAULT_EVENT_CAPACITY,
};
use crate::auth::datagram::DatagramCounters;
use crate::auth::message::MessageCounters;
use crate::config::{
    check_bind, check_feedback_limit, check_listeners, check_multicast, check_receiver,
    check_sender, InvalidConfig,
};
use crate::io::resync_server::EndpointCounters;
use crate::io::socket::MulticastConfig;
use crate::lkh::RegistrationBundle;
use crate::relay::{RelayConfig, RelayCounters, RelayError, RelayEvent};
use crate::resync::limits::Limits;
use crate::resync::relay_store::{RelayStore, RelayStoreError};
use crate::session::sender::SenderCounters;
use crate::session::ReceiverCounters;

/// Configuration of a [`Relay`]. [`RelayEngineConfig::new`] gives production defaults.
///
/// It deserializes from a configuration file's table (serde): every field may be left out (its
/// default, [`RelayEngineConfig::default`]), durations are whole milliseconds in fields named
/// `*_ms`, the nested configurations are tables (`upstream`, `downstream`, `session`,
/// `resync`, `resync_limits`, `feedback_limit`), and a key that is not a field is an error.
/// Check what was read with [`RelayEngineConfig::validate`]: the upstream feedback address
/// (`session.upstream.feedback_addr`) has no usable default.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayEngineConfig {
    /// The upstream group (the GCKS's, or the upstream relay's) and the interface to join it
    /// on (not joined with [`Self::upstream_unicast`]).
    pub upstream: MulticastConfig,
    /// The unicast address the relay sends its NACKs and probe replies upstream from (port 0:
    /// any), and with [`Self::upstream_unicast`] where it takes the upstream traffic. The
    /// upstream sender's address is [`RelayConfig::upstream`]'s `feedback_addr`.
    pub upstream_bind: SocketAddr,
    /// Take the upstream sender's traffic over unicast UDP instead of its multicast group (a
    /// wide-area uplink without multicast routing): the relay joins no upstream group, and the
    /// upstream sender (the GCKS's `unicast_relays`, or an upstream relay's
    /// `session.unicast_relays`) must list this relay's `upstream_bind` address, which then
    /// needs a fixed port. NACKs and repair travel the same unicast path
    /// ([`crate::relay::uplink`]). Downstream, the relay multicasts as always.
    pub upstream_unicast: bool,
    /// The downstream group (the relay's own), its interface, TTL and loopback.
    pub downstream: MulticastConfig,
    /// The unicast address the relay sends downstream from and takes its members' NACKs and
    /// probe replies on: its members' feedback address (port 0: any, see
    /// [`Relay::feedback_addr`]).
    pub downstream_bind: SocketAddr,
    /// The relay session: upstream receiver, downstream sender, group size, cut-through.
    pub session: RelayConfig,
    /// How the relay resyncs its own keys when it falls behind: the upstream relay's resync
    /// endpoints ([`ResyncConfig::relays`]) then the GCKS's ([`ResyncConfig::gcks`]), fetch
    /// deadlines, rounds, spreading. No endpoint: it cannot resync, and what it misses it
    /// misses.
    pub resync: ResyncConfig,
    /// Where the relay's TCP resync endpoint listens; `None`: no endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_tcp: Option<SocketAddr>,
    /// Where the relay's HTTP resync endpoint listens (also `/metrics` and `/healthz`);
    /// `None`: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_http: Option<SocketAddr>,
    /// The resync endpoints' limits: connection caps, rate limits, timeouts, request sizes.
    pub resync_limits: Limits,
    /// What one downstream host may send the relay's feedback socket, per source address;
    /// beyond it datagrams are dropped unread and counted
    /// ([`RelayStats::downstream_rate_limited`]). `None`: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_limit: Option<FeedbackLimit>,
    /// The state directory: the relay's keys and the messages it forwarded, written durably
    /// as they come ([`crate::resync::relay_store`]). `None`: nothing is saved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Events held for a product that does not read them, at most; beyond, they are dropped
    /// and counted ([`RelayStats::events_dropped`]).
    pub event_capacity: usize,
}

impl RelayEngineConfig {
    /// A relay between `upstream` (whose sender takes NACKs at `upstream_feedback`) and
    /// `downstream`, its sockets bound to any address, with production defaults: no resync
    /// endpoint of its own, no upstream resync endpoint, no state directory.
    pub fn new(
        upstream: MulticastConfig,
        upstream_feedback: SocketAddr,
        downstream: MulticastConfig,
    ) -> Self {
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        Self {
            upstream,
            upstream_bind: any,
            upstream_unicast: false,
            downstream,
            downstream_bind: any,
            session: RelayConfig::new(upstream_feedback),
            resync: ResyncConfig::default(),
            resync_tcp: None,
            resync_http: None,
            resync_limits: Limits::default(),
            feedback_limit: Some(FeedbackLimit::default()),
            state_dir: None,
            event_capacity: DEFAULT_EVENT_CAPACITY,
        }
    }

    /// [`RelayEngineConfig::new`] on the loopback interface between the groups `upstream`
    /// and `downstream`, with loopback delivery on: for tests and demos on one host.
    pub fn loopback(
        upstream: SocketAddr,
        upstream_feedback: SocketAddr,
        downstream: SocketAddr,
    ) -> Self {
        let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        Self {
            upstream_bind: localhost,
            downstream_bind: localhost,
            ..Self::new(
                MulticastConfig::loopback_v4(upstream),
                upstream_feedback,
                MulticastConfig::loopback_v4(downstream),
            )
        }
    }

    /// Checks every field's range, naming the first field that breaks a rule: both groups'
    /// multicast settings (and distinct groups: the relay must not hear its own forwards),
    /// bind addresses of their groups' address families, the session's upstream receiver
    /// (with a feedback address that can be sent to) and downstream sender, a non-zero
    /// downstream group size when set, the resync policy, distinct resync listen addresses,
    /// the resync limits, the feedback limit, a non-empty state directory when set and a
    /// non-zero event capacity.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        check_multicast("downstream", &self.downstream)?;
        if self.upstream_unicast {
            if self.upstream_bind.port() == 0 {
                return Err(InvalidConfig::new(
                    "upstream_bind",
                    "must have a fixed port with upstream_unicast (the upstream sender lists \
                     this address)",
                ));
            }
            check_bind(
                "upstream_bind",
                self.upstream_bind,
                self.session.upstream.feedback_addr,
            )
            .map_err(|_| {
                InvalidConfig::new(
                    "upstream_bind",
                    "must be of session.upstream.feedback_addr's address family with \
                     upstream_unicast",
                )
            })?;
        } else {
            check_multicast("upstream", &self.upstream)?;
            if self.downstream.group == self.upstream.group {
                return Err(InvalidConfig::new(
                    "downstream.group",
                    "must differ from upstream.group (the relay would hear its own forwards)",
                ));
            }
            check_bind("upstream_bind", self.upstream_bind, self.upstream.group)?;
        }
        check_bind(
            "downstream_bind",
            self.downstream_bind,
            self.downstream.group,
        )?;
        check_receiver("session.upstream", &self.session.upstream)?;
        check_sender("session.downstream", &self.session.downstream)?;
        crate::config::check_unicast_relays(
            "session.unicast_relays",
            &self.session.unicast_relays,
            self.downstream_bind,
        )?;
        if self.session.downstream_group_size == Some(0) {
            return Err(InvalidConfig::new(
                "session.downstream_group_size",
                "must be at least 1",
            ));
        }
        self.resync
            .validate()
            .map_err(|error| InvalidConfig::session("resync", error))?;
        check_listeners(self.resync_tcp, self.resync_http, "resync_http")?;
        self.resync_limits
            .validate()
            .map_err(|error| InvalidConfig::limits("resync_limits", error))?;
        check_feedback_limit("feedback_limit", self.feedback_limit.as_ref())?;
        if self
            .state_dir
            .as_ref()
            .is_some_and(|dir| dir.as_os_str().is_empty())
        {
            return Err(InvalidConfig::new(
                "state_dir",
                "must not be empty when set",
            ));
        }
        if self.event_capacity == 0 {
            return Err(InvalidConfig::new("event_capacity", "must be at least 1"));
        }
        Ok(())
    }

    fn endpoint_config(&self) -> RelayEndpointConfig {
        RelayEndpointConfig {
            session: self.session.clone(),
            resync: self.resync.clone(),
            persistent: self.state_dir.is_some(),
        }
    }

    fn driver_config(&self) -> DriverConfig {
        let mut config = DriverConfig::new("rekey-relay");
        // A unicast uplink joins no group: the upstream traffic comes to the feedback socket.
        config.listen = (!self.upstream_unicast).then(|| self.upstream.clone());
        // The feedback socket's multicast settings matter only to the multicast feedback mode
        // (NACKs to the upstream group); a unicast uplink has no upstream group, and its
        // socket takes the family of its bind address.
        let feedback_multicast = if !self.upstream_unicast
            || self.upstream.group.is_ipv4() == self.upstream_bind.is_ipv4()
        {
            self.upstream.clone()
        } else {
            MulticastConfig::new(match self.upstream_bind {
                SocketAddr::V4(_) => crate::gcks::DEFAULT_GROUP,
                SocketAddr::V6(_) => UNICAST_UPLINK_V6_PLACEHOLDER,
            })
        };
        config.feedback = Some(SenderPort {
            multicast: feedback_multicast,
            bind: self.upstream_bind,
        });
        config.serve = Some(SenderPort {
            multicast: self.downstream.clone(),
            bind: self.downstream_bind,
        });
        config.resync_tcp = self.resync_tcp;
        config.resync_http = self.resync_http;
        config.resync_limits = self.resync_limits.clone();
        config.feedback_limit = self.feedback_limit;
        config.max_datagram_size = config
            .max_datagram_size
            .max(self.session.downstream.datagram_size);
        config
    }
}

/// The group an IPv6 unicast uplink's feedback socket is set up with when the configured
/// upstream group is IPv4: never sent to (a unicast uplink has no upstream group).
const UNICAST_UPLINK_V6_PLACEHOLDER: SocketAddr = SocketAddr::V6(std::net::SocketAddrV6::new(
    std::net::Ipv6Addr::new(0xff15, 0, 0, 0, 0, 0, 0x7e1a, 1),
    7400,
    0,
    0,
));

/// The downstream group of [`RelayEngineConfig::default`]: an administratively scoped IPv4
/// group (RFC 2365) beside [`crate::gcks::DEFAULT_GROUP`].
pub const DEFAULT_DOWNSTREAM_GROUP: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    Ipv4Addr::new(239, 255, 78, 1),
    7400,
));

/// The port [`RelayEngineConfig::default`] takes its members' feedback on.
pub const DEFAULT_DOWNSTREAM_FEEDBACK_PORT: u16 = 7411;

impl Default for RelayEngineConfig {
    /// [`RelayEngineConfig::new`] from [`crate::gcks::DEFAULT_GROUP`] to
    /// [`DEFAULT_DOWNSTREAM_GROUP`] on the kernel's default interfaces, taking its members'
    /// feedback on port [`DEFAULT_DOWNSTREAM_FEEDBACK_PORT`], with no upstream feedback address
    /// (`0.0.0.0:0`): set `session.upstream.feedback_addr` to the GCKS's (or upstream relay's)
    /// before use.
    fn default() -> Self {
        Self {
            downstream_bind: SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                DEFAULT_DOWNSTREAM_FEEDBACK_PORT,
            )),
            ..Self::new(
                MulticastConfig::new(crate::gcks::DEFAULT_GROUP),
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                MulticastConfig::new(DEFAULT_DOWNSTREAM_GROUP),
            )
        }
    }
}

/// A snapshot of a relay's figures: its endpoint's and its driver's.
#[derive(Debug, Clone, Default)]
pub struct RelayStats {
    /// What the relay forwarded.
    pub relay: RelayCounters,
    /// The upstream side's counters (messages applied, NACKs sent, bad chunks).
    pub upstream: ReceiverCounters,
    /// The upstream datagram verifier's counters (header, MAC and window rejections).
    pub upstream_datagrams: DatagramCounters,
    /// The upstream message verifier's counters (signature checks made and failed).
    pub upstream_messages: MessageCounters,
    /// The downstream side's counters (what it sent, NACKs received, rejected datagrams).
    pub downstream: SenderCounters,
    /// The downstream repair aggregator's counters.
    pub downstream_repair: AggregatorStats,
    /// The next message the relay needs from upstream.
    pub next_seq: u64,
    /// The newest and oldest messages the relay's history holds (what its endpoints serve).
    pub held: Option<(u64, u64)>,
    /// Whether the relay was told to register again (it cannot forward any more).
    pub must_reregister: bool,
    /// The relay's own resyncs and state checks with the upstream endpoints.
    pub own_resync: ResyncCounters,
    /// The relay's resync endpoints' counters (what it served its members).
    pub resync: EndpointCounters,
    /// Forwarded messages that could not be stored (the relay goes on, and its endpoints
    /// serve them from memory until it restarts).
    pub store_failures: u64,
    /// Saves of the relay's keys that failed (the file keeps the last state saved).
    pub key_save_failures: u64,
    /// Datagrams received on the upstream sockets (group and unicast).
    pub upstream_received: u64,
    /// Received datagrams dropped by a receive filter (simulated loss in tests and demos).
    pub simulated_drops: u64,
    /// Datagrams received from downstream hosts (NACKs, probe replies, anything else).
    pub downstream_received: u64,
    /// Of those, dropped unread because their source was over its rate limit.
    pub downstream_rate_limited: u64,
    /// Datagrams that could not be sent (socket errors, or a backlog was full).
    pub send_failures: u64,
    /// Events not delivered because the product did not read them (the queue was full).
    pub events_dropped: u64,
    /// Event-loop lag, microseconds, since the start.
    pub loop_lag_us: LoopLag,
    /// Event-loop lag, microseconds, over the last 10 to 20 seconds.
    pub loop_lag_recent_us: LoopLag,
    /// What went to the unicast relays behind this one (`session.unicast_relays`).
    pub uplinks: crate::relay::uplink::UplinkCounters,
    /// The distinct member addresses that reached the relay (a MAC-checked NACK or probe
    /// reply, a resync request) within the last 10 minutes: the members it serves that needed
    /// it, counted by the relay itself ([`crate::relay::members::MemberTally`]).
    pub members: u64,
    /// The member tally's counters (contacts by feedback and by resync, arrivals).
    pub member_tally: crate::relay::members::MemberTallyCounters,
}

impl RelayStats {
    fn of(endpoint: &RelayEndpointStats, driver: &DriverStats) -> Self {
        Self {
            relay: endpoint.relay,
            upstream: endpoint.upstream,
            upstream_datagrams: endpoint.upstream_datagrams,
            upstream_messages: endpoint.upstream_messages,
            downstream: endpoint.downstream,
            downstream_repair: endpoint.downstream_repair,
            next_seq: endpoint.next_seq,
            held: endpoint.held,
            must_reregister: endpoint.must_reregister,
            own_resync: endpoint.resync,
            resync: driver.resync,
            store_failures: endpoint.store_failures,
            key_save_failures: endpoint.key_save_failures,
            upstream_received: driver.received.listen + driver.received.feedback,
            simulated_drops: driver.filtered,
            downstream_received: driver.received.serve,
            downstream_rate_limited: driver.feedback_rate_limited,
            send_failures: driver.send_failed + driver.backlog_dropped + driver.unroutable,
            events_dropped: driver.events_dropped,
            loop_lag_us: driver.lag,
            loop_lag_recent_us: driver.recent_lag,
            uplinks: endpoint.uplinks,
            members: endpoint.members,
            member_tally: endpoint.member_tally,
        }
    }
}

/// Why a relay could not start, or why a call on it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayEngineError {
    /// The sockets, listeners or loop could not be set up, or the loop has ended.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The relay session refused its configuration or stored history.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// The state directory is corrupt or cannot be used.
    #[error(transparent)]
    Store(#[from] RelayStoreError),
    /// [`Relay::resume`] on a state directory without saved keys: start from a registration
    /// bundle instead.
    #[error("state directory {0} holds no saved relay keys: start from a registration bundle")]
    NothingToResume(PathBuf),
    /// [`Relay::start`] on a state directory that holds a relay's state: resume from it, or
    /// clear it for a new registration.
    #[error(
        "state directory {0} already holds a relay's keys: resume from it, or clear it for a \
         new registration"
    )]
    StateExists(PathBuf),
}

/// How a [`Relay`] starts: its configuration and what tests and demos add to its driver.
/// [`Relay::start`] and [`Relay::resume`] are this builder with nothing added.
pub struct RelayBuilder {
    config: RelayEngineConfig,
    filter: Option<ReceiveFilter>,
}

impl std::fmt::Debug for RelayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("config", &self.config)
            .field("filter", &self.filter.is_some())
            .finish()
    }
}

impl RelayBuilder {
    /// Passes every received datagram through `filter` first (`false` drops it, counted in
    /// [`RelayStats::simulated_drops`]): how tests and demos inject loss.
    pub fn receive_filter(mut self, filter: ReceiveFilter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Starts a relay registered with `bundle` (like a member; the GCKS knows it as a relay),
    /// with nothing forwarded yet. A configured state directory must not hold a relay's
    /// state already ([`RelayEngineError::StateExists`]: resume instead).
    pub fn start(self, bundle: &RegistrationBundle) -> Result<Relay, RelayEngineError> {
        let store = match &self.config.state_dir {
            Some(dir) => {
                let (store, restored) =
                    RelayStore::open(dir, self.config.session.downstream.history)?;
                if restored.is_some() {
                    return Err(RelayEngineError::StateExists(dir.clone()));
                }
                Some(store)
            }
            None => None,
        };
        let endpoint = RelayEndpoint::new(bundle, self.config.endpoint_config(), Instant::now())?;
        self.spawn(endpoint, store)
    }

    /// Brings a relay back after its own restart from `state_dir` (which becomes the
    /// configuration's state directory): its saved keys and the messages it stored, which
    /// its resync endpoints serve at once. Messages it missed while down come by resync from
    /// [`RelayEngineConfig::resync`]'s endpoints (it cannot forward those: its members get
    /// them from the next endpoint in their lists).
    pub fn resume(mut self, state_dir: &Path) -> Result<Relay, RelayEngineError> {
        self.config.state_dir = Some(state_dir.to_path_buf());
        let (store, restored) =
            RelayStore::open(state_dir, self.config.session.downstream.history)?;
        let restored =
            restored.ok_or_else(|| RelayEngineError::NothingToResume(state_dir.to_path_buf()))?;
        for lost in &restored.lost {
            tracing::warn!(
                seq = lost.seq,
                file = %lost.path.display(),
                problem = %lost.problem,
                "history message lost from the relay's state directory: a gap resync answers \
                 \"not held\" for"
            );
        }
        let endpoint = RelayEndpoint::resume(
            restored.keys,
            restored.messages,
            self.config.endpoint_config(),
            Instant::now(),
        )?;
        self.spawn(endpoint, Some(store))
    }

    fn spawn(
        self,
        endpoint: RelayEndpoint,
        store: Option<RelayStore>,
    ) -> Result<Relay, RelayEngineError> {
        let (sink, events) = bounded_events(self.config.event_capacity.max(1));
        let storage = RelayStorage(store);
        let mut driver = Driver::new(endpoint, self.config.driver_config(), storage, sink).metrics(
            Box::new(|endpoint: &RelayEndpoint, driver: &DriverStats| {
                RelayStats::of(&endpoint.stats(), driver).prometheus_text()
            }),
        );
        if let Some(filter) = self.filter {
            driver = driver.receive_filter(filter);
        }
        let driver = driver.spawn()?;
        Ok(Relay { driver, events })
    }
}

/// The relay's storage: its state directory, or none (then the endpoint stores nothing).
struct RelayStorage(Option<RelayStore>);

impl Storage<RelayStoreOp> for RelayStorage {
    fn apply(&mut self, op: &RelayStoreOp) -> Result<(), StoreError> {
        match &mut self.0 {
            Some(store) => store.apply(op),
            // The endpoint is not persistent without a state directory: nothing comes here.
            None => Err(StoreError {
                kind: StoreErrorKind::Inconsistent,
                detail: "no state directory".into(),
            }),
        }
    }
}

/// One relay, its loop running on its own thread. See the [module docs](self).
#[derive(Debug)]
pub struct Relay {
    driver: DriverHandle<RelayEndpoint>,
    events: Receiver<RelayEvent>,
}

impl Relay {
    /// A builder over `config`, for what tests and demos add (a receive filter).
    pub fn builder(config: RelayEngineConfig) -> RelayBuilder {
        RelayBuilder {
            config,
            filter: None,
        }
    }

    /// Starts a relay registered with `bundle`: see [`RelayBuilder::start`].
    pub fn start(
        bundle: &RegistrationBundle,
        config: RelayEngineConfig,
    ) -> Result<Self, RelayEngineError> {
        Self::builder(config).start(bundle)
    }

    /// Brings a relay back from `state_dir`: see [`RelayBuilder::resume`].
    pub fn resume(state_dir: &Path, config: RelayEngineConfig) -> Result<Self, RelayEngineError> {
        Self::builder(config).resume(state_dir)
    }

    /// The relay's events: forwarded messages, key updates, its own resyncs. Each comes once
    /// what it reports is stored. The queue is bounded; events the product does not read are
    /// dropped and counted ([`RelayStats::events_dropped`]).
    pub fn events(&self) -> &Receiver<RelayEvent> {
        &self.events
    }

    /// The unicast address the relay's NACKs go upstream from.
    pub fn upstream_addr(&self) -> SocketAddr {
        // The driver opened the feedback port (the configuration names it), so it has an
        // address; the unspecified address stands for one it could not read.
        self.driver
            .local_addr(Port::Feedback)
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    }

    /// The address the relay's members send their NACKs and probe replies to (their
    /// feedback address).
    pub fn feedback_addr(&self) -> SocketAddr {
        self.driver
            .local_addr(Port::Serve)
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    }

    /// The resync endpoints' bound addresses (TCP, HTTP), where configured.
    pub fn resync_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        self.driver.resync_addrs()
    }

    /// The relay's figures.
    pub fn stats(&self) -> Result<RelayStats, RelayEngineError> {
        Ok(self
            .driver
            .inspect(|endpoint: &mut RelayEndpoint, driver| {
                RelayStats::of(&endpoint.stats(), driver)
            })?)
    }

    /// Saves the keys (if they moved since the last save), closes the sockets and waits for
    /// the loop's thread.
    pub fn shutdown(mut self) -> Result<(), RelayEngineError> {
        // The endpoint stops once its last save is durable, which ends the loop; a loop that
        // has already ended says how when joined.
        if self.driver.command(RelayCommand::Shutdown).is_err() {
            return Ok(self.driver.join()?);
        }
        Ok(self.driver.join()?)
    }

    /// Stops the loop at once, as a crash would: nothing more is stored or saved, and the
    /// sockets close. For fault drills and tests of what members do when their relay dies.
    pub fn abort(mut self) -> Result<(), RelayEngineError> {
        Ok(self.driver.abort()?)
    }
}

impl RelayStats {
    /// The figures in the Prometheus text exposition format (served at `/metrics`).
    pub fn prometheus_text(&self) -> String {
        let r = &self.relay;
        let up = &self.upstream;
        let dg = &self.upstream_datagrams;
        let msg = &self.upstream_messages;
        let down = &self.downstream;
        let own = &self.own_resync;
        let mut text = String::new();
        let counters: [(&str, &str, u64); 40] = [
            (
                "rekeycast_relay_member_arrivals_total",
                "Member addresses that reached the relay for the first time in the tally's window.",
                self.member_tally.arrivals,
            ),
            (
                "rekeycast_relay_member_contacts_total",
                "Contacts of members with the relay (MAC-checked feedback and resync requests).",
                self.member_tally.feedback_contacts + self.member_tally.resync_contacts,
            ),
            (
                "rekeycast_relay_forwarded_total",
                "Messages forwarded downstream.",
                r.forwarded,
            ),
            (
                "rekeycast_relay_chunks_forwarded_total",
                "Chunks of forwarded messages, each authenticated first.",
                r.chunks_forwarded,
            ),
            (
                "rekeycast_relay_not_forwarded_total",
                "Messages applied by resync only, not forwarded.",
                r.not_forwarded,
            ),
            (
                "rekeycast_relay_forward_failures_total",
                "Verified messages the downstream side refused.",
                r.forward_failures,
            ),
            (
                "rekeycast_relay_cut_through_sent_total",
                "Verified manifests and source symbols forwarded cut-through.",
                r.cut_through_sent,
            ),
            (
                "rekeycast_relay_upstream_sent_total",
                "Datagrams sent upstream (NACKs, probe replies).",
                r.upstream_sent,
            ),
            (
                "rekeycast_relay_downstream_sent_total",
                "Datagrams sent downstream.",
                r.downstream_sent,
            ),
            (
                "rekeycast_relay_upstream_received_total",
                "Datagrams received from upstream.",
                self.upstream_received,
            ),
            (
                "rekeycast_relay_upstream_accepted_total",
                "Upstream datagrams that passed header, MAC and window checks.",
                dg.accepted,
            ),
            (
                "rekeycast_relay_signature_checks_total",
                "Ed25519 verifications made on upstream messages.",
                msg.signature_checks,
            ),
            (
                "rekeycast_relay_signature_failures_total",
                "Ed25519 verifications that failed.",
                msg.signature_failures,
            ),
            (
                "rekeycast_relay_chunks_rejected_total",
                "Upstream chunks that failed authentication.",
                msg.chunks_rejected + up.bad_chunks,
            ),
            (
                "rekeycast_relay_messages_applied_total",
                "Messages the relay applied to its own keys.",
                up.messages_applied,
            ),
            (
                "rekeycast_relay_upstream_nacks_sent_total",
                "NACKs the relay sent upstream.",
                up.nacks_sent,
            ),
            (
                "rekeycast_relay_downstream_nacks_received_total",
                "Downstream NACKs that passed the MAC check.",
                down.nacks_received,
            ),
            (
                "rekeycast_relay_downstream_replayed_feedback_total",
                "Downstream NACKs and probe replies dropped as replays.",
                down.replayed_feedback,
            ),
            (
                "rekeycast_relay_downstream_stale_feedback_total",
                "Downstream NACKs and probe replies echoing a probe the relay did not send or no longer remembers.",
                down.stale_feedback,
            ),
            (
                "rekeycast_relay_downstream_rejected_total",
                "Downstream datagrams dropped before use (bad MAC, malformed, wrong group).",
                down.rejected,
            ),
            (
                "rekeycast_relay_downstream_rate_limited_total",
                "Downstream datagrams dropped by the per-source rate limit.",
                self.downstream_rate_limited,
            ),
            (
                "rekeycast_relay_repair_symbols_sent_total",
                "Repair symbols sent downstream for NACKs.",
                down.repair_symbols_sent,
            ),
            (
                "rekeycast_relay_proactive_symbols_sent_total",
                "Proactive repair symbols sent downstream.",
                down.proactive_symbols_sent,
            ),
            (
                "rekeycast_relay_heartbeats_sent_total",
                "Heartbeats sent downstream.",
                down.heartbeats_sent,
            ),
            (
                "rekeycast_relay_resync_connections_accepted_total",
                "Resync connections accepted (each may carry many requests).",
                self.resync.accepted,
            ),
            (
                "rekeycast_relay_resync_connections_refused_total",
                "Resync connections refused (caps).",
                self.resync.refused_overloaded,
            ),
            (
                "rekeycast_relay_resync_rate_limited_total",
                "Resync requests refused by the per-source rate limit.",
                self.resync.rate_limited,
            ),
            (
                "rekeycast_relay_resync_requests_total",
                "Resync requests answered (rate-limited and malformed ones are counted apart).",
                self.resync.requests,
            ),
            (
                "rekeycast_relay_resync_messages_served_total",
                "Messages served by resync (a manifest and a chunk each).",
                self.resync.messages_served,
            ),
            (
                "rekeycast_relay_resync_served_total",
                "Resyncs served in full (streams sent to their end).",
                self.resync.streams_completed,
            ),
            (
                "rekeycast_relay_resync_evicted_total",
                "Resync connections closed to make room (waiting on their client).",
                self.resync.evicted,
            ),
            (
                "rekeycast_relay_resync_timeouts_total",
                "Resync connections closed by the silent, header or idle timeout.",
                self.resync.silent_timeouts + self.resync.header_timeouts + self.resync.idle_timeouts,
            ),
            (
                "rekeycast_relay_resync_rejected_total",
                "Resync requests rejected as malformed or too large.",
                self.resync.rejected,
            ),
            (
                "rekeycast_relay_own_resyncs_total",
                "Resyncs of the relay's own keys from upstream.",
                own.resyncs_started,
            ),
            (
                "rekeycast_relay_own_resync_failures_total",
                "Own resyncs that gave up on every upstream endpoint.",
                own.resyncs_failed,
            ),
            (
                "rekeycast_relay_own_state_checks_total",
                "State checks of the relay's own keys with upstream.",
                own.state_checks_started,
            ),
            (
                "rekeycast_relay_own_resync_items_rejected_total",
                "Upstream resync items and state answers that failed verification.",
                own.items_rejected,
            ),
            (
                "rekeycast_relay_store_failures_total",
                "Forwarded messages that could not be stored.",
                self.store_failures,
            ),
            (
                "rekeycast_relay_key_save_failures_total",
                "Saves of the relay's keys that failed.",
                self.key_save_failures,
            ),
            (
                "rekeycast_relay_send_failures_total",
                "Datagrams that could not be sent.",
                self.send_failures,
            ),
        ];
        for (name, help, value) in counters {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        let name = "rekeycast_relay_upstream_rejected_total";
        text.push_str(&format!(
            "# HELP {name} Upstream datagrams rejected, by cause.\n# TYPE {name} counter\n"
        ));
        for (cause, value) in [
            ("malformed_header", dg.malformed_header),
            ("wrong_group", dg.wrong_group),
            ("wrong_spi", dg.wrong_spi),
            ("stale", dg.stale),
            ("ahead", dg.ahead),
            ("far_future", dg.far_future),
            ("bad_mac", dg.bad_mac),
            ("malformed_body", dg.malformed_body),
            ("replayed", dg.replayed),
        ] {
            text.push_str(&format!("{name}{{cause=\"{cause}\"}} {value}\n"));
        }
        let (latest, oldest) = self.held.unwrap_or((0, 0));
        let gauges: [(&str, &str, u64); 9] = [
            (
                "rekeycast_relay_members",
                "Distinct member addresses that reached the relay (feedback, resync) in the last 10 minutes.",
                self.members,
            ),
            (
                "rekeycast_relay_next_seq",
                "The next message the relay needs from upstream.",
                self.next_seq,
            ),
            (
                "rekeycast_relay_latest_held_seq",
                "The newest message the relay's history holds (0: none).",
                latest,
            ),
            (
                "rekeycast_relay_oldest_held_seq",
                "The oldest message the relay's history holds (0: none).",
                oldest,
            ),
            (
                "rekeycast_relay_must_reregister",
                "1 when the relay was told to register again.",
                u64::from(self.must_reregister),
            ),
            (
                "rekeycast_relay_resync_connections_open",
                "Resync connections open.",
                self.resync.open,
            ),
            (
                "rekeycast_relay_loop_lag_p99_microseconds",
                "Event loop lag since the start, 99th percentile.",
                self.loop_lag_us.p99,
            ),
            (
                "rekeycast_relay_loop_lag_recent_p99_microseconds",
                "Event loop lag over the last 10 to 20 seconds, 99th percentile.",
                self.loop_lag_recent_us.p99,
            ),
            (
                "rekeycast_relay_loop_lag_recent_max_microseconds",
                "Event loop lag over the last 10 to 20 seconds, maximum.",
                self.loop_lag_recent_us.max,
            ),
        ];
        for (name, help, value) in gauges {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_type_and_names_are_unique() {
        let stats = RelayStats {
            next_seq: 7,
            held: Some((6, 2)),
            store_failures: 3,
            ..RelayStats::default()
        };
        let mut stats = stats;
        stats.loop_lag_us.p99 = 800;
        stats.loop_lag_recent_us.p99 = 60;
        let text = stats.prometheus_text();
        let mut names = std::collections::BTreeSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(names.insert(name.to_string()), "{name} twice");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no help"
            );
        }
        assert!(text.contains("\nrekeycast_relay_next_seq 7\n"));
        assert!(text.contains("\nrekeycast_relay_oldest_held_seq 2\n"));
        assert!(text.contains("\nrekeycast_relay_store_failures_total 3\n"));
        assert!(text.contains("\nrekeycast_relay_loop_lag_p99_microseconds 800\n"));
        assert!(text.contains("\nrekeycast_relay_loop_lag_recent_p99_microseconds 60\n"));
    }

    #[test]
    fn resync_figures_count_requests_and_resyncs_not_connections() {
        let mut stats = RelayStats::default();
        stats.resync.accepted = 1;
        stats.resync.requests = 40;
        stats.resync.streams_completed = 30;
        stats.resync.evicted = 5;
        let text = stats.prometheus_text();
        for line in [
            "rekeycast_relay_resync_connections_accepted_total 1",
            "rekeycast_relay_resync_requests_total 40",
            "rekeycast_relay_resync_served_total 30",
            "rekeycast_relay_resync_evicted_total 5",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line} in:\n{text}");
        }
        assert!(!text.contains("accepted (served)"), "{text}");
    }

    #[test]
    fn production_defaults_bind_any_address_and_store_nothing() {
        let feedback = SocketAddr::from(([192, 0, 2, 1], 4700));
        let config = RelayEngineConfig::new(
            MulticastConfig::new(SocketAddr::from(([239, 1, 1, 1], 4600))),
            feedback,
            MulticastConfig::new(SocketAddr::from(([239, 1, 2, 1], 4600))),
        );
        assert!(config.upstream_bind.ip().is_unspecified());
        assert!(config.state_dir.is_none() && !config.endpoint_config().persistent);
        assert_eq!(config.session.upstream.feedback_addr, feedback);
        let driver = config.driver_config();
        assert_eq!(driver.feedback_limit, Some(FeedbackLimit::default()));
        assert!(driver.max_datagram_size >= config.session.downstream.datagram_size);
    }
}
