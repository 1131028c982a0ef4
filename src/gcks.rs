//! The GCKS's embedding API: [`Gcks`] (the key server side of one group, a thin handle over
//! the engine's driver running the sans-IO GCKS endpoint, see [`crate::engine::gcks`]), its
//! configuration [`GcksConfig`], its figures [`GcksStats`], and the answer and error types of
//! the endpoint ([`rekeycast_proto::endpoint::gcks`]) re-exported under one path.
//!
//! Membership commands are ordered: the last command for a member wins ([`membership`]); a
//! leave is journaled before it is acknowledged and a join is acknowledged by its bundle once
//! its batch is durable (see [`Gcks::join`] and [`Gcks::leave`]). A batch is a transaction:
//! it commits the key tree, the sequence number and the state directory only when its message
//! is built and stored, and a failed batch is retried with the same changes
//! ([`GcksEvent::BatchFailed`]); what cannot be recovered poisons the engine
//! ([`GcksEvent::Poisoned`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use rekeycast_proto::endpoint::gcks::membership;
pub use rekeycast_proto::endpoint::gcks::{
    BatchFailure, BuildSteps, Change, JoinError, LeaveError, LeaveOutcome, PoisonReason,
    ResyncAnswer,
};

use crate::config::{
    check_bind, check_feedback_limit, check_listeners, check_multicast, check_sender,
    check_unicast_relays, InvalidConfig,
};
pub use crate::engine::driver::FeedbackLimit;
pub use crate::engine::gcks::{
    ChangeAnswer, ChangesTicket, Gcks, GcksBuilder, GcksError, GcksEvent,
};
use crate::gsa::WrapAlgorithm;
use crate::io::socket::MulticastConfig;
use crate::lkh::Degree;
use crate::resync::journal::JournalError;
use crate::resync::limits::Limits;
use crate::session::layout::MessageParams;
use crate::session::sender::SenderCounters;
use crate::session::SenderConfig;

/// Configuration of a [`Gcks`].
///
/// It deserializes from a configuration file's table (serde): every field may be left out (its
/// default, [`GcksConfig::default`]), durations are whole milliseconds in fields named `*_ms`,
/// the nested configurations are tables (`multicast`, `sender`, `message`, `resync_limits`,
/// `feedback_limit`), and a key that is not a field is an error. Check what was read with
/// [`GcksConfig::validate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcksConfig {
    /// The group id (in every datagram's header).
    pub group_id: u32,
    /// The SPI of the Rekey SA.
    pub spi: u32,
    /// The key tree's degree (4 is the usual optimum).
    pub degree: Degree,
    /// How keys are wrapped, by the algorithm's id: 1 for AES-256-GCM (the default), 2 for
    /// the RFC 5649 AES key wrap with padding (G-IKEv2's `KW_5649_256`). Every manifest names
    /// it, and members refuse messages under another than their bundle's.
    pub wrap_algorithm: WrapAlgorithm,
    /// Lifetime of each Data SA, seconds (its hard lifetime).
    pub data_sa_lifetime_secs: u32,
    /// Soft lifetimes (a refresh, an empty-batch rekey, when the latest Data SA or group key
    /// reaches one with no rekey since), the group and signing keys' lifetimes, and the
    /// activation and deactivation delays of new Data SAs (a table; see
    /// [`LifetimeConfig`](rekeycast_proto::endpoint::gcks::lifetime::LifetimeConfig)). The
    /// default refreshes nothing on time and switches Data SAs at once.
    pub lifetimes: rekeycast_proto::endpoint::gcks::lifetime::LifetimeConfig,
    /// The multicast group, interface, TTL and loopback of the rekey traffic.
    pub multicast: MulticastConfig,
    /// The unicast address the GCKS sends from and takes NACKs on (port 0: any).
    pub bind: SocketAddr,
    /// The sender session's configuration.
    pub sender: SenderConfig,
    /// How messages are built (SPI, epoch and timestamp are set by the GCKS).
    pub message: MessageParams,
    /// Time between rekeys while membership changes are pending.
    #[serde(rename = "batch_interval_ms", with = "rekeycast_nack::duration_ms")]
    pub batch_interval: Duration,
    /// Pending joins and leaves that trigger a rekey before the interval ends.
    pub max_batch: usize,
    /// Time between handing a batch's joiners their registration bundles and sending the
    /// batch's message, so that they can join the multicast group first (they need that
    /// message: it carries their path keys).
    #[serde(rename = "admission_delay_ms", with = "rekeycast_nack::duration_ms")]
    pub admission_delay: Duration,
    /// Worker threads for building batches (0: one per core).
    pub workers: usize,
    /// The state directory: the key tree and the history of signed messages are written and
    /// fsynced there before each message is sent, and a GCKS started on it resumes the same
    /// group and sequence (re-sending the last message, which may not have gone out), so no
    /// member has to re-register; acknowledged leaves are journaled there
    /// ([`crate::resync::journal`]) and replayed on start. `None` (the default): nothing is
    /// persisted, and a leave does not survive a crash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Where the TCP resync endpoint listens (length-prefixed frames); `None`: no endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_tcp: Option<SocketAddr>,
    /// Where the HTTP resync endpoint listens (also `/metrics` and `/healthz`); `None`: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_http: Option<SocketAddr>,
    /// The endpoints' limits: connection caps, per-source connection and request limits,
    /// timeouts, request and output sizes (the same [`Limits`] a relay's endpoints take).
    pub resync_limits: Limits,
    /// Seed of the key tree's randomness for simulations and demos; `None` (the default) uses
    /// the operating system's RNG, as a real deployment must.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_seed: Option<u64>,
    /// The per-source limit on the feedback (NACKs, probe replies) the GCKS takes; `None`: no
    /// limit. Default [`FeedbackLimit::default`]; [`GcksConfig::loopback`] has none (every
    /// member of a one-host test shares one source address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_limit: Option<FeedbackLimit>,
    /// Relays that take the rekeys over unicast UDP instead of multicast (a wide-area network
    /// without multicast routing): their upstream addresses (each relay's `upstream_bind`,
    /// with `upstream_unicast` set), and whether the GCKS multicasts at all. Every datagram
    /// the GCKS multicasts also goes to each of them, paced and gathered per relay for GSO;
    /// their NACKs are answered by the same path ([`crate::relay::uplink`]). A table
    /// (`[gcks.unicast_relays]`: `relays = ["192.0.2.7:7402"]`, `unicast_only = false`).
    pub unicast_relays: crate::relay::uplink::UnicastRelays,
    /// The relays members are assigned to, and the GCKS's own contact, as registration
    /// bundles list them (a table, `[gcks.relay_directory]`; see
    /// [`crate::relay::directory::RelayDirectoryConfig`]). Not empty, each joining member's
    /// bundle lists its least-loaded relay first, the other relays after it and the GCKS's
    /// contact last: where it fails over to. Empty (the default): bundles list no relay.
    #[serde(skip_serializing_if = "crate::relay::directory::RelayDirectoryConfig::is_empty")]
    pub relay_directory: crate::relay::directory::RelayDirectoryConfig,
}

/// The multicast group of [`GcksConfig::default`] (and of the configuration files' examples):
/// an administratively scoped IPv4 group (RFC 2365).
pub const DEFAULT_GROUP: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    Ipv4Addr::new(239, 255, 77, 1),
    7400,
));

/// The port [`GcksConfig::default`] takes NACKs and probe replies on: members' feedback
/// address is the GCKS's host at this port.
pub const DEFAULT_FEEDBACK_PORT: u16 = 7401;

impl Default for GcksConfig {
    /// [`GcksConfig::new`] for [`DEFAULT_GROUP`] on the kernel's default interface, taking
    /// feedback on port [`DEFAULT_FEEDBACK_PORT`] of any local address.
    fn default() -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_FEEDBACK_PORT)),
            ..Self::new(MulticastConfig::new(DEFAULT_GROUP))
        }
    }
}

impl GcksConfig {
    /// A configuration with the production defaults for the multicast settings `multicast`:
    /// sending from any local address, batches every second or every 10,000 changes, an
    /// admission delay of 100 ms, one worker per core, the operating system's RNG, a
    /// per-source feedback limit, nothing persisted and no resync endpoint (set
    /// [`Self::state_dir`] and the resync addresses for a deployment).
    pub fn new(multicast: MulticastConfig) -> Self {
        let bind = match multicast.group {
            SocketAddr::V4(_) => SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
        };
        Self {
            bind,
            feedback_limit: Some(FeedbackLimit::default()),
            ..Self::loopback(multicast.group)
        }
        .with_multicast(multicast)
    }

    fn with_multicast(mut self, multicast: MulticastConfig) -> Self {
        self.multicast = multicast;
        self
    }

    /// A configuration for the multicast group `group` on the loopback interface, with
    /// loopback delivery on and no per-source feedback limit: for tests and demos on one host.
    pub fn loopback(group: SocketAddr) -> Self {
        let multicast = MulticastConfig::loopback_v4(group);
        Self {
            group_id: 1,
            spi: 1,
            degree: Degree::DEFAULT,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            data_sa_lifetime_secs: 3600,
            lifetimes: Default::default(),
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
            resync_limits: Limits::default(),
            key_seed: None,
            feedback_limit: None,
            unicast_relays: crate::relay::uplink::UnicastRelays::default(),
            relay_directory: crate::relay::directory::RelayDirectoryConfig::default(),
        }
    }
}

impl GcksConfig {
    /// Checks every field's range, naming the first field that breaks a rule: the multicast
    /// settings, a `bind` of the group's address family, the sender session's configuration,
    /// FEC symbols whose datagrams fit `sender.datagram_size`, a non-zero batch interval,
    /// batch size and Data SA lifetime, a non-empty state directory when set, distinct resync
    /// listen addresses, the resync limits, the feedback limit, and unicast relays with
    /// distinct unicast addresses of `bind`'s family (at least one when unicast only), and a
    /// relay directory within a bundle's bounds.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        check_multicast("multicast", &self.multicast)?;
        check_bind("bind", self.bind, self.multicast.group)?;
        check_sender("sender", &self.sender)?;
        if self.message.symbol_size == 0 {
            return Err(InvalidConfig::new(
                "message.symbol_size",
                "must be at least 1",
            ));
        }
        if usize::from(self.message.symbol_size) + SYMBOL_DATAGRAM_OVERHEAD
            > self.sender.datagram_size
        {
            return Err(InvalidConfig::new(
                "message.symbol_size",
                "its datagrams (47 bytes more) must fit sender.datagram_size",
            ));
        }
        if self.message.max_block_symbols > rekeycast_fec::MAX_BLOCK_SYMBOLS {
            return Err(InvalidConfig::new(
                "message.max_block_symbols",
                "must be 0 (chosen from the chunk count) or within 1..=56403",
            ));
        }
        if self.batch_interval.is_zero() {
            return Err(InvalidConfig::new("batch_interval_ms", "must not be 0"));
        }
        if self.max_batch == 0 {
            return Err(InvalidConfig::new("max_batch", "must be at least 1"));
        }
        if self.data_sa_lifetime_secs == 0 {
            return Err(InvalidConfig::new(
                "data_sa_lifetime_secs",
                "must be at least 1",
            ));
        }
        if let Err(error) = self.lifetimes.validate(self.data_sa_lifetime_secs) {
            let (field, rule) = error.field_and_rule();
            return Err(InvalidConfig::new(field, rule).within("lifetimes"));
        }
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
        check_listeners(self.resync_tcp, self.resync_http, "resync_http")?;
        self.resync_limits
            .validate()
            .map_err(|error| InvalidConfig::limits("resync_limits", error))?;
        check_feedback_limit("feedback_limit", self.feedback_limit.as_ref())?;
        check_unicast_relays("unicast_relays", &self.unicast_relays, self.bind)?;
        self.relay_directory.validate("relay_directory")
    }
}

/// Bytes a symbol datagram adds to its FEC symbol: the datagram header and MAC and the symbol
/// fields.
const SYMBOL_DATAGRAM_OVERHEAD: usize =
    crate::wire::datagram::OVERHEAD + crate::wire::symbol::FIXED_LEN;

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
    /// Event-loop lag (how late the loop woke for its deadlines), microseconds, since the
    /// start.
    pub loop_lag_us: LagSummary,
    /// Event-loop lag over the last 10 to 20 seconds: what an incident looks like now, not
    /// averaged into the whole life of the process.
    pub loop_lag_recent_us: LagSummary,
    /// Datagrams sent through the socket, and of those how many by GSO batches.
    pub datagrams_sent: u64,
    /// Send calls that would have blocked (the datagram waited for the socket).
    pub send_blocked: u64,
    /// The resync endpoints' counters.
    pub resync: crate::io::resync_server::EndpointCounters,
    /// Of the members, those registered as relays ([`Gcks::join_relay`]).
    pub relays: usize,
    /// Messages inside the history window that the GCKS does not hold: their files were
    /// missing or corrupt when it started ([`crate::Gcks::lost_history`]); resync answers
    /// "not held" for them.
    pub history_not_held: usize,
    /// What the GCKS sent its unicast relays ([`GcksConfig::unicast_relays`]): datagrams
    /// and bytes (each group datagram once per relay).
    pub uplinks: crate::relay::uplink::UplinkCounters,
    /// How long the steps of the last batch built took on its worker (wall clock).
    pub last_build_steps: Option<BuildSteps>,
}

/// Percentiles of the event loop's lag, microseconds (the driver's [`crate::engine::LoopLag`]).
pub type LagSummary = crate::engine::LoopLag;

impl GcksStats {
    /// The figures in the Prometheus text exposition format (served at `/metrics`).
    pub fn prometheus_text(&self) -> String {
        let s = &self.sender;
        let counters: [(&str, &str, u64); 26] = [
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
                "Resync requests answered (rate-limited and malformed ones are counted apart).",
                self.resync.requests,
            ),
            (
                "rekeycast_resync_messages_served_total",
                "Messages served by resync (a manifest and a chunk each).",
                self.resync.messages_served,
            ),
            (
                "rekeycast_resync_served_total",
                "Resyncs served in full (streams sent to their end).",
                self.resync.streams_completed,
            ),
            (
                "rekeycast_resync_evicted_total",
                "Resync connections closed to make room (waiting on their client).",
                self.resync.evicted,
            ),
            (
                "rekeycast_resync_timeouts_total",
                "Resync connections closed by the silent, header or idle timeout.",
                self.resync.silent_timeouts
                    + self.resync.header_timeouts
                    + self.resync.idle_timeouts,
            ),
            (
                "rekeycast_resync_rejected_total",
                "Resync requests rejected as malformed or too large.",
                self.resync.rejected,
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
        let gauges: [(&str, &str, u64); 13] = [
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
            (
                "rekeycast_loop_lag_recent_p50_microseconds",
                "Event loop lag over the last 10 to 20 seconds, median.",
                self.loop_lag_recent_us.p50,
            ),
            (
                "rekeycast_loop_lag_recent_p99_microseconds",
                "Event loop lag over the last 10 to 20 seconds, 99th percentile.",
                self.loop_lag_recent_us.p99,
            ),
            (
                "rekeycast_loop_lag_recent_max_microseconds",
                "Event loop lag over the last 10 to 20 seconds, maximum.",
                self.loop_lag_recent_us.max,
            ),
            (
                "rekeycast_history_not_held",
                "Messages inside the history window not held (lost from the state directory).",
                self.history_not_held as u64,
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
        stats.resync.streams_completed = 19;
        stats.resync.evicted = 23;
        stats.members = 17;
        let text = stats.prometheus_text();
        for (name, value) in [
            ("rekeycast_feedback_replayed_total", 3),
            ("rekeycast_feedback_stale_total", 5),
            ("rekeycast_resync_requests_total", 7),
            ("rekeycast_resync_messages_served_total", 11),
            ("rekeycast_resync_rate_limited_total", 13),
            ("rekeycast_resync_served_total", 19),
            ("rekeycast_resync_evicted_total", 23),
            ("rekeycast_members", 17),
        ] {
            assert_eq!(metric(&text, name), Some(value), "{name} in:\n{text}");
        }
    }

    #[test]
    fn metrics_report_the_recent_loop_lag_apart_from_the_lifetime_figures() {
        let mut stats = GcksStats::default();
        stats.loop_lag_us.p99 = 900;
        stats.loop_lag_us.max = 480_000;
        stats.loop_lag_recent_us.p50 = 40;
        stats.loop_lag_recent_us.p99 = 70;
        stats.loop_lag_recent_us.max = 95;
        let text = stats.prometheus_text();
        for (name, value) in [
            ("rekeycast_loop_lag_p99_microseconds", 900),
            ("rekeycast_loop_lag_max_microseconds", 480_000),
            ("rekeycast_loop_lag_recent_p50_microseconds", 40),
            ("rekeycast_loop_lag_recent_p99_microseconds", 70),
            ("rekeycast_loop_lag_recent_max_microseconds", 95),
        ] {
            assert_eq!(metric(&text, name), Some(value), "{name} in:\n{text}");
        }
    }
}
