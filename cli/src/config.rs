//! The configuration files of `rekeycast server`, `rekeycast member` and `rekey-relay`: TOML,
//! validated on load.
//!
//! This module owns the file formats ([`ServerConfig`], [`MemberConfig`], [`RelayConfig`] and
//! their sections),
//! their defaults, their validation, and their conversion into the sans-IO sessions'
//! configurations ([`ServerConfig::sender_config`], [`ServerConfig::message_params`],
//! [`MemberConfig::receiver_config`]). It opens no socket and starts nothing: the drivers in
//! `io/` and the CLI do that with what it returns.
//!
//! Every option has a default, so an empty file is a valid configuration; every key that is
//! not an option is an error naming it (a misspelt option must not silently fall back to its
//! default). Errors name the option by its dotted path and show the bad value:
//! `sender.send_rate = -5: must be positive and finite`. TOML syntax errors keep the line and
//! column the parser reported. The annotated examples `rekeycast.example.toml`,
//! `rekeycast-member.example.toml` and `rekey-relay.example.toml` at the repository root show
//! every option with its default and unit; a test parses them, so they stay in step with this
//! module.
//!
//! Relative paths are taken relative to the working directory of the process.
//!
//! This module's [`ConfigError`] is about configuration files; the sessions' own range checks
//! have their own [`rekeycast::session::ConfigError`], which is mapped onto this one (with the
//! option's dotted path) when a converted configuration fails them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rekeycast_nack::{AggregatorConfig, GrttConfig, ProactiveConfig};
use rekeycast_proto::endpoint::{ResyncEndpoint, ResyncProtocol};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use rekeycast::lkh::Degree;
use rekeycast::session::layout::MessageParams;
use rekeycast::session::{ReceiverConfig, SenderConfig};
use rekeycast::wire;

/// The longest path of a Unix domain socket, in bytes (`sun_path` is 108 bytes on Linux,
/// including the terminating NUL).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;

/// Bytes a symbol datagram adds to its symbol: the datagram header and MAC plus the symbol
/// fields. `sender.symbol_size` plus this must fit `group.datagram_size`.
pub const SYMBOL_DATAGRAM_OVERHEAD: usize = wire::datagram::OVERHEAD + wire::symbol::FIXED_LEN;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, has a key that is not an option, or has a value of the
    /// wrong type. The message is the TOML parser's, with the line and column and the
    /// offending line quoted.
    #[error("{message}")]
    Syntax {
        /// The parser's message.
        message: String,
        /// The line of the error, counted from 1, where the parser gave a position.
        line: Option<usize>,
        /// The column of the error, in characters counted from 1, where the parser gave a
        /// position.
        column: Option<usize>,
    },
    /// An option has a value outside its valid range.
    #[error("{option} = {value}: {reason}")]
    Invalid {
        /// The option's dotted path, such as `sender.send_rate`.
        option: &'static str,
        /// The bad value, as TOML would write it.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The configuration of `rekeycast server`: one GCKS serving one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The group: its ids, multicast address and key tree (`[group]`).
    pub group: GroupConfig,
    /// The unicast address the GCKS receives NACKs and probe replies on; every member's
    /// `feedback` option names it (or the member's relay). Default `"0.0.0.0:7401"`. Its port
    /// must not be 0.
    pub feedback_listen: SocketAddr,
    /// How rekey messages are sent (`[sender]`).
    pub sender: SenderSection,
    /// How membership changes are batched into rekeys (`[batch]`).
    pub batch: BatchSection,
    /// The directory of the GCKS's durable state: its signing key (`gcks-signing-key.pem`,
    /// created with mode 0600 on first start), key tree, sequence number and message history.
    /// Created with mode 0700 if missing. Default `"rekeycast-state"`. Must not be empty.
    pub state_dir: PathBuf,
    /// The Unix socket of the admin interface (`rekeycast admin ...`: join, leave, rekey now,
    /// status). Default `"rekeycast-state/admin.sock"`. At most 107 bytes long.
    pub admin_socket: PathBuf,
    /// The resync endpoints (`[resync]`).
    pub resync: ResyncSection,
    /// Logging (`[log]`).
    pub log: LogSection,
}

/// The configuration of `rekeycast member`: one member of one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemberConfig {
    /// The group: its ids, multicast address and socket options (`[group]`). `degree` is not
    /// used by a member.
    pub group: GroupConfig,
    /// Where the member sends NACKs and probe replies: the GCKS's `feedback_listen` address
    /// (or its relay's). Default `"127.0.0.1:7401"`. Must be a unicast address with a port.
    pub feedback: SocketAddr,
    /// The registration bundle written by `rekeycast admin join` (mode 0600): the member's
    /// keys. Default `"member.bundle"`. Must not be empty.
    pub bundle: PathBuf,
    /// Where the member saves its keys and last sequence number after every applied message
    /// (mode 0600, written durably). When the file exists at start, the member resumes from it
    /// instead of the bundle, without registering again, and resyncs what it missed while down
    /// from `resync_endpoints`. Default: none (nothing saved; a restarted member starts from
    /// its bundle). Must not be empty when set.
    pub state_file: Option<PathBuf>,
    /// Where to resync from when out of sync, tried in order: `"tcp://HOST:PORT"` or
    /// `"http://HOST:PORT[/PATH]"`. Default empty (no resync: an out-of-sync member must
    /// re-register).
    pub resync_endpoints: Vec<String>,
    /// NACK rounds for a block without success before the member counts itself out of sync
    /// (R). Default 4. At least 1.
    pub nack_max_rounds: u8,
    /// The shortest time between two state-check requests, in milliseconds. Default 1000.
    /// Must not be 0.
    pub state_check_interval_ms: u64,
    /// Seed of the NACK backoff's random number generator. Default: none, a fresh random seed
    /// at each start; set it only for reproducible test runs.
    pub seed: Option<u64>,
    /// Logging (`[log]`).
    pub log: LogSection,
}

/// The group's identity, multicast address and socket options (`[group]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupConfig {
    /// The group id carried in every datagram. Default 1.
    pub group_id: u32,
    /// The SPI of the Rekey SA (RFC 4046 6.2). Default 1.
    pub spi: u32,
    /// The group's multicast address and port. Default `"239.255.77.1:7400"`. Must be a
    /// multicast address (IPv4 224.0.0.0/4 or IPv6 ff00::/8) with a port.
    pub multicast: SocketAddr,
    /// The interface to send and join on: for an IPv4 group, the interface's IPv4 address
    /// (`"0.0.0.0"` lets the kernel choose); for an IPv6 group, the interface index
    /// (`"0"` lets the kernel choose). Default `"127.0.0.1"`.
    pub interface: String,
    /// The multicast TTL (IPv4) or hop limit (IPv6). Default 1 (the local network only).
    /// At most 255.
    pub ttl: u32,
    /// Whether multicast sent from this host is looped back to its own sockets (members on
    /// the same host as the GCKS need it). Default true.
    pub loopback: bool,
    /// The largest datagram sent or accepted: UDP payload bytes. Default 1472 (an IPv4
    /// 1,500-byte MTU; 1232 fits the IPv6 minimum MTU). From 256 to 65507.
    pub datagram_size: usize,
    /// The key tree's degree d (LKH). Default 4, the usual optimum. From 2 to 16. Used by the
    /// GCKS only.
    pub degree: u8,
}

/// How the GCKS sends rekey messages (`[sender]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SenderSection {
    /// The pace of initial transmissions (manifests, source and proactive repair symbols), in
    /// datagrams per second. Default 20000. Positive and finite.
    pub send_rate: f64,
    /// The largest burst of initial transmissions, in datagrams (the token bucket's depth).
    /// Default 32. At least 1.
    pub burst: u32,
    /// How many times each manifest is sent in a message's initial transmission. Default 3.
    /// At least 1.
    pub manifest_repeats: u8,
    /// Messages kept for resync (the history window H), in messages. Default 64. At least 1.
    pub history: usize,
    /// The newest messages that still get multicast repair, in messages; older ones in the
    /// history are served by resync only. Default 8. From 1 to `history`.
    pub repair_window: usize,
    /// The first heartbeat interval after a message, in milliseconds (raised to two GRTTs if
    /// shorter). Default 50. Must not be 0.
    pub heartbeat_min_ms: u64,
    /// The longest heartbeat interval, in milliseconds: intervals double after each message up
    /// to it. Default 30000. At least `heartbeat_min_ms`.
    pub heartbeat_max_ms: u64,
    /// The NACK backoff factor K advertised to members: their backoff window is `K * GRTT`.
    /// Default 4. At least 1.
    pub backoff_factor: u8,
    /// The group round-trip time assumed before any measurement, in milliseconds. Default
    /// 100. From 1 to 10000.
    pub grtt_initial_ms: u64,
    /// The target fraction of members that still need to NACK a block after its proactive
    /// repair symbols; the proactive repair rate follows it. Default 0.05. Between 0 and 1
    /// (exclusive).
    pub proactive_target_fraction: f64,
    /// The pace of NACK-driven repair, in repair symbols per second, all blocks together.
    /// Default 10000. Positive and finite.
    pub repair_rate: f64,
    /// The most repair symbols sent per block per NACK round, whatever the NACKs ask.
    /// Default 64. At least 1.
    pub max_repair_per_round: u16,
    /// The FEC symbol size, in bytes: every chunk (one member's keys) is padded to it. Default
    /// 1200. At least 1; plus 47 bytes of datagram overhead, at most `group.datagram_size`.
    pub symbol_size: u16,
    /// Threads that sign chunks when a message is built. Default 0: as many as the machine
    /// has cores.
    pub signing_threads: usize,
}

/// How membership changes are batched into rekeys (`[batch]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSection {
    /// How long joins and leaves accumulate before they are rekeyed together, in
    /// milliseconds. Default 1000. Must not be 0.
    pub interval_ms: u64,
    /// A batch with this many joins is rekeyed at once, before its interval ends. Default
    /// 4096. At least 1.
    pub max_joins: usize,
    /// A batch with this many leaves is rekeyed at once, before its interval ends. Default
    /// 4096. At least 1.
    pub max_leaves: usize,
}

/// The GCKS's resync endpoints (`[resync]`). Members that fell out of sync fetch the signed
/// manifests and their chunks of the messages they missed from them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResyncSection {
    /// The TCP resync endpoint's listen address. Default: none (no TCP endpoint).
    pub tcp_listen: Option<SocketAddr>,
    /// The HTTP resync endpoint's listen address. Default: none (no HTTP endpoint).
    pub http_listen: Option<SocketAddr>,
}

/// Logging (`[log]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// The `tracing` filter directives, in the syntax of `RUST_LOG`, such as `"info"` or
    /// `"rekeycast=debug,warn"`. Default `"info"`.
    pub filter: String,
}

/// The interface a multicast socket sends and joins on, from [`GroupConfig::interface`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MulticastInterface {
    /// An IPv4 group: the interface's address (`0.0.0.0` for the kernel's choice).
    V4(Ipv4Addr),
    /// An IPv6 group: the interface index (0 for the kernel's choice).
    V6(u32),
}

impl ServerConfig {
    /// Reads, parses and validates the server configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load(path)
    }

    /// Parses and validates a server configuration.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every option's range (the sender's through the session configuration it
    /// converts to).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.group.validate()?;
        check_port("feedback_listen", self.feedback_listen)?;
        self.sender
            .validate(self.group.datagram_size, "group.datagram_size")?;
        self.batch.validate()?;
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid(
                "state_dir",
                quoted(self.state_dir.display()),
                "must not be empty",
            ));
        }
        check_socket_path("admin_socket", &self.admin_socket)?;
        self.resync.validate()
    }

    /// The sender session's configuration.
    pub fn sender_config(&self) -> SenderConfig {
        self.sender.sender_config(self.group.datagram_size)
    }

    /// How the GCKS builds its messages: the SPI, symbol size and signing threads from this
    /// configuration, the rest at their defaults (set `epoch` and `timestamp_us` from the
    /// Rekey SA and the clock).
    pub fn message_params(&self) -> MessageParams {
        MessageParams {
            spi: self.group.spi,
            symbol_size: self.sender.symbol_size,
            signing_threads: self.sender.signing_threads,
            ..MessageParams::default()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            group: GroupConfig::default(),
            feedback_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT + 1),
            sender: SenderSection::default(),
            batch: BatchSection::default(),
            state_dir: PathBuf::from("rekeycast-state"),
            admin_socket: PathBuf::from("rekeycast-state/admin.sock"),
            resync: ResyncSection::default(),
            log: LogSection::default(),
        }
    }
}

impl MemberConfig {
    /// Reads, parses and validates the member configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load(path)
    }

    /// Parses and validates a member configuration.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every option's range, and the session configuration it converts to.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.group.validate()?;
        check_port("feedback", self.feedback)?;
        if self.feedback.ip().is_unspecified() || self.feedback.ip().is_multicast() {
            return Err(invalid(
                "feedback",
                quoted(self.feedback),
                "must be the unicast address of the GCKS or relay",
            ));
        }
        if self.bundle.as_os_str().is_empty() {
            return Err(invalid(
                "bundle",
                quoted(self.bundle.display()),
                "must not be empty",
            ));
        }
        if let Some(state_file) = &self.state_file {
            if state_file.as_os_str().is_empty() {
                return Err(invalid(
                    "state_file",
                    quoted(state_file.display()),
                    "must not be empty",
                ));
            }
        }
        for endpoint in &self.resync_endpoints {
            check_resync_endpoint(endpoint)?;
        }
        self.receiver_config_seeded(0).validate().map_err(|error| {
            receiver_option(
                error,
                "",
                self.nack_max_rounds,
                self.state_check_interval_ms,
                None,
            )
        })
    }

    /// The receiver session's configuration. Its NACK scheduler's seed is `seed`, or a fresh
    /// random one when `seed` is not set (so two calls may differ in it).
    pub fn receiver_config(&self) -> ReceiverConfig {
        self.receiver_config_seeded(self.seed.unwrap_or_else(rand::random))
    }

    fn receiver_config_seeded(&self, seed: u64) -> ReceiverConfig {
        let mut config = ReceiverConfig::new(self.feedback);
        config.scheduler.max_rounds = self.nack_max_rounds;
        config.scheduler.seed = seed;
        config.state_check_interval = Duration::from_millis(self.state_check_interval_ms);
        config
    }
}

impl Default for MemberConfig {
    fn default() -> Self {
        let feedback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT + 1);
        let receiver = ReceiverConfig::new(feedback);
        Self {
            group: GroupConfig::default(),
            feedback,
            bundle: PathBuf::from("member.bundle"),
            state_file: None,
            resync_endpoints: Vec::new(),
            nack_max_rounds: receiver.scheduler.max_rounds,
            state_check_interval_ms: millis(receiver.state_check_interval),
            seed: None,
            log: LogSection::default(),
        }
    }
}

impl GroupConfig {
    /// Checks every option's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.multicast.ip().is_multicast() {
            return Err(invalid(
                "group.multicast",
                quoted(self.multicast),
                "not a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8)",
            ));
        }
        check_port("group.multicast", self.multicast)?;
        self.multicast_interface()?;
        if self.ttl > 255 {
            return Err(invalid("group.ttl", self.ttl, "must be at most 255"));
        }
        if !(wire::MIN_DATAGRAM_SIZE..=wire::MAX_DATAGRAM_SIZE).contains(&self.datagram_size) {
            return Err(invalid(
                "group.datagram_size",
                self.datagram_size,
                format!(
                    "must be within {}..={} bytes",
                    wire::MIN_DATAGRAM_SIZE,
                    wire::MAX_DATAGRAM_SIZE
                ),
            ));
        }
        self.tree_degree()?;
        Ok(())
    }

    /// The interface to send and join on: an IPv4 address for an IPv4 group, an interface
    /// index for an IPv6 group.
    pub fn multicast_interface(&self) -> Result<MulticastInterface, ConfigError> {
        let text = self.interface.trim();
        match self.multicast {
            SocketAddr::V4(_) => text.parse().map(MulticastInterface::V4).map_err(|_| {
                invalid(
                    "group.interface",
                    quoted(&self.interface),
                    "must be an IPv4 address (the interface's) for an IPv4 group",
                )
            }),
            SocketAddr::V6(_) => text.parse().map(MulticastInterface::V6).map_err(|_| {
                invalid(
                    "group.interface",
                    quoted(&self.interface),
                    "must be an interface index (a number, 0 for any) for an IPv6 group",
                )
            }),
        }
    }

    /// The key tree's degree.
    pub fn tree_degree(&self) -> Result<Degree, ConfigError> {
        Degree::new(self.degree)
            .map_err(|error| invalid("group.degree", self.degree, error.to_string()))
    }
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            group_id: 1,
            spi: 1,
            multicast: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 77, 1)), DEFAULT_PORT),
            interface: "127.0.0.1".to_string(),
            ttl: 1,
            loopback: true,
            datagram_size: wire::DEFAULT_DATAGRAM_SIZE,
            degree: Degree::DEFAULT.get(),
        }
    }
}

impl SenderSection {
    /// The section that sets `sender` and `message` (their other fields are not options of the
    /// section). [`SenderSection::default`] is this of the library's defaults.
    pub fn from_library(sender: &SenderConfig, message: &MessageParams) -> Self {
        Self {
            send_rate: sender.send_rate,
            burst: sender.burst,
            manifest_repeats: sender.manifest_repeats,
            history: sender.history,
            repair_window: sender.repair_window,
            heartbeat_min_ms: millis(sender.heartbeat_min),
            heartbeat_max_ms: millis(sender.heartbeat_max),
            backoff_factor: sender.backoff_factor,
            grtt_initial_ms: millis(sender.grtt.initial),
            proactive_target_fraction: sender.proactive.target_fraction,
            repair_rate: sender.aggregator.repair_rate,
            max_repair_per_round: sender.aggregator.max_repair_per_round,
            symbol_size: message.symbol_size,
            signing_threads: message.signing_threads,
        }
    }

    /// The sender session's configuration for datagrams of `datagram_size` bytes: the
    /// section's options, the rest at the library's defaults.
    pub fn sender_config(&self, datagram_size: usize) -> SenderConfig {
        let defaults = SenderConfig::default();
        SenderConfig {
            datagram_size,
            send_rate: self.send_rate,
            burst: self.burst,
            manifest_repeats: self.manifest_repeats,
            history: self.history,
            repair_window: self.repair_window,
            heartbeat_min: Duration::from_millis(self.heartbeat_min_ms),
            heartbeat_max: Duration::from_millis(self.heartbeat_max_ms),
            backoff_factor: self.backoff_factor,
            grtt: GrttConfig {
                initial: Duration::from_millis(self.grtt_initial_ms),
                ..defaults.grtt
            },
            aggregator: AggregatorConfig {
                repair_rate: self.repair_rate,
                max_repair_per_round: self.max_repair_per_round,
                ..defaults.aggregator
            },
            proactive: ProactiveConfig {
                target_fraction: self.proactive_target_fraction,
                ..defaults.proactive
            },
        }
    }

    /// Checks every option through the session configuration it converts to (the library's
    /// ranges, named here by their options), and that symbol datagrams fit datagrams of
    /// `datagram_size` bytes (the option `datagram_option`).
    pub fn validate(
        &self,
        datagram_size: usize,
        datagram_option: &'static str,
    ) -> Result<(), ConfigError> {
        self.sender_config(datagram_size)
            .validate()
            .map_err(|error| self.name_option(error, datagram_size, datagram_option))?;
        at_least_one("sender.symbol_size", u64::from(self.symbol_size))?;
        if usize::from(self.symbol_size) + SYMBOL_DATAGRAM_OVERHEAD > datagram_size {
            return Err(invalid(
                "sender.symbol_size",
                self.symbol_size,
                format!(
                    "symbol datagrams ({} bytes with {SYMBOL_DATAGRAM_OVERHEAD} of overhead) \
                     must fit {datagram_option} ({datagram_size})",
                    usize::from(self.symbol_size) + SYMBOL_DATAGRAM_OVERHEAD,
                ),
            ));
        }
        Ok(())
    }

    /// Names the option behind a failed check of the converted sender configuration.
    fn name_option(
        &self,
        error: rekeycast::session::ConfigError,
        datagram_size: usize,
        datagram_option: &'static str,
    ) -> ConfigError {
        let (field, reason) = match error {
            rekeycast::session::ConfigError::Invalid { field, reason } => (field, reason),
            rekeycast::session::ConfigError::Nack(rekeycast_nack::ConfigError::Invalid {
                field,
                reason,
            }) => (field, reason),
            other => return invalid("sender", "(derived)", other.to_string()),
        };
        let (option, value) = match field {
            "datagram_size" => (datagram_option, datagram_size.to_string()),
            "send_rate" => ("sender.send_rate", self.send_rate.to_string()),
            "burst" => ("sender.burst", self.burst.to_string()),
            "manifest_repeats" => ("sender.manifest_repeats", self.manifest_repeats.to_string()),
            "history" => ("sender.history", self.history.to_string()),
            "repair_window" => ("sender.repair_window", self.repair_window.to_string()),
            "heartbeat_min" => ("sender.heartbeat_min_ms", self.heartbeat_min_ms.to_string()),
            "heartbeat_max" => ("sender.heartbeat_max_ms", self.heartbeat_max_ms.to_string()),
            "backoff_factor" => ("sender.backoff_factor", self.backoff_factor.to_string()),
            "repair_rate" => ("sender.repair_rate", self.repair_rate.to_string()),
            "max_repair_per_round" => (
                "sender.max_repair_per_round",
                self.max_repair_per_round.to_string(),
            ),
            "target_fraction" => (
                "sender.proactive_target_fraction",
                self.proactive_target_fraction.to_string(),
            ),
            "initial" => ("sender.grtt_initial_ms", self.grtt_initial_ms.to_string()),
            other => return invalid("sender", format!("(derived {other})"), reason),
        };
        let reason = reason
            .replace(
                "exceed heartbeat_max",
                &format!("exceed sender.heartbeat_max_ms ({})", self.heartbeat_max_ms),
            )
            .replace(
                "exceed history",
                &format!("exceed sender.history ({})", self.history),
            )
            .replace(
                "min..=max",
                &format!("1..={} ms", millis(GrttConfig::default().max)),
            );
        invalid(option, value, reason)
    }
}

impl Default for SenderSection {
    fn default() -> Self {
        Self::from_library(&SenderConfig::default(), &MessageParams::default())
    }
}

impl BatchSection {
    /// Checks every option's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        non_zero_interval("batch.interval_ms", self.interval_ms)?;
        at_least_one("batch.max_joins", self.max_joins as u64)?;
        at_least_one("batch.max_leaves", self.max_leaves as u64)?;
        Ok(())
    }

    /// The batch interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

impl Default for BatchSection {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            max_joins: 4096,
            max_leaves: 4096,
        }
    }
}

impl ResyncSection {
    /// Checks the listen addresses: real ports, and not the same for both endpoints.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(addr) = self.tcp_listen {
            check_port("resync.tcp_listen", addr)?;
        }
        if let Some(addr) = self.http_listen {
            check_port("resync.http_listen", addr)?;
            if self.tcp_listen == Some(addr) {
                return Err(invalid(
                    "resync.http_listen",
                    quoted(addr),
                    "must differ from resync.tcp_listen",
                ));
            }
        }
        Ok(())
    }
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            filter: "info".to_string(),
        }
    }
}

/// The configuration of `rekey-relay`: one relay of one group, between an upstream group (the
/// GCKS's, or an upstream relay's) and its own downstream group. The annotated
/// example is `rekey-relay.example.toml` at the repository root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// The relay's registration bundle, written by `rekeycast admin join` (mode 0600): the
    /// relay holds a leaf like a member. Read only when `state_dir` holds no saved keys.
    /// Default `"relay.bundle"`. Must not be empty.
    pub bundle: PathBuf,
    /// The relay's state directory (mode 0700): its keys, saved after every applied message,
    /// and the messages it forwarded, each stored as it is forwarded (files mode 0600). A relay
    /// started on a directory that holds saved keys resumes from them, without registering
    /// again, and its resync endpoints serve the stored messages at once. Default
    /// `"rekey-relay-state"`. Must not be empty.
    pub state_dir: PathBuf,
    /// Where the relay receives rekeys from and sends its own NACKs to (`[upstream]`).
    pub upstream: UpstreamSection,
    /// The relay's own group, where it forwards (`[downstream]`).
    pub downstream: DownstreamSection,
    /// How the relay sends downstream (`[sender]`): pacing, manifest repeats, history window,
    /// heartbeats, repair. The same options as the server's `[sender]`; `symbol_size` and
    /// `signing_threads` are not used (the relay forwards the GCKS's symbols as they are).
    pub sender: SenderSection,
    /// The relay's resync endpoints and their limits (`[resync]`).
    pub resync: RelayResyncSection,
    /// Logging (`[log]`).
    pub log: LogSection,
}

/// The relay's upstream side (`[upstream]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// The upstream group's multicast address and port: the GCKS's `group.multicast`, or the
    /// upstream relay's `downstream.multicast`. Default `"239.255.77.1:7400"`.
    pub multicast: SocketAddr,
    /// The interface to join the upstream group on (and send NACKs through): an IPv4 address
    /// for an IPv4 group (`"0.0.0.0"`: the kernel's choice), an interface index for an IPv6
    /// group. Default `"127.0.0.1"`.
    pub interface: String,
    /// Where the relay's NACKs and probe replies go: the GCKS's `feedback_listen`, or the
    /// upstream relay's `downstream.feedback_listen`. Default `"127.0.0.1:7401"`. A unicast
    /// address with a port.
    pub feedback: SocketAddr,
    /// The unicast address the relay sends upstream from. Default `"0.0.0.0:0"` (any address
    /// and port).
    pub bind: SocketAddr,
    /// Where the relay resyncs its own keys when it falls behind, tried in order:
    /// `"tcp://HOST:PORT"` or `"http://HOST:PORT"` (the GCKS's endpoints; behind another relay,
    /// that relay's, then the GCKS's). Default empty (no resync: a relay that falls behind
    /// stays behind).
    pub resync_endpoints: Vec<String>,
    /// NACK rounds for a block without success before the relay counts itself out of sync.
    /// Default 4. At least 1.
    pub nack_max_rounds: u8,
    /// The shortest time between two state-check requests, in milliseconds. Default 1000.
    /// Must not be 0.
    pub state_check_interval_ms: u64,
    /// How long without any upstream datagram that passes the MAC check before the relay asks
    /// for the group's state, in milliseconds. Keep it above the upstream sender's
    /// `heartbeat_max_ms`. Default 120000. Must not be 0.
    pub silence_timeout_ms: u64,
    /// Bound on each connect, read and write of the relay's own resync, in milliseconds.
    /// Default 5000. Must not be 0.
    pub resync_timeout_ms: u64,
    /// The longest random wait before the relay's own resync, in milliseconds. Default 500.
    pub resync_max_delay_ms: u64,
    /// Rounds over `resync_endpoints` before the relay's resync gives up. Default 5. At
    /// least 1.
    pub resync_attempts: u32,
    /// Seed of the NACK backoff's random number generator. Default: none (random at each
    /// start); set it only for reproducible test runs.
    pub seed: Option<u64>,
}

/// The relay's downstream side (`[downstream]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamSection {
    /// The relay's own group: its multicast address and port, which its members join (their
    /// `group.multicast`). Default `"239.255.78.1:7400"`. Must differ from
    /// `upstream.multicast`.
    pub multicast: SocketAddr,
    /// The interface to send on: an IPv4 address for an IPv4 group (`"0.0.0.0"`: the
    /// kernel's choice), an interface index for an IPv6 group. Default `"127.0.0.1"`.
    pub interface: String,
    /// The multicast TTL (IPv4) or hop limit (IPv6). Default 1. At most 255.
    pub ttl: u32,
    /// Whether multicast sent from this host loops back to its own sockets (members on the
    /// relay's host need it). Default true.
    pub loopback: bool,
    /// The largest datagram sent, in bytes of UDP payload; the upstream group's symbols must
    /// fit it. Default 1472. From 256 to 65507.
    pub datagram_size: usize,
    /// The unicast address the relay sends from and takes its members' NACKs and probe
    /// replies on: its members' `feedback`. Default `"0.0.0.0:7411"`. The port must not be 0.
    pub feedback_listen: SocketAddr,
    /// The number of members behind this relay, advertised in its heartbeats (their NACK
    /// backoff scales with it). Default: none (the whole group's size, from the manifests:
    /// correct, but slower repair). At least 1 when set.
    pub group_size: Option<u32>,
    /// Cut-through forwarding: each verified manifest and source symbol goes downstream the
    /// moment it arrives. `false`: store and forward, each message once whole. Default true.
    pub cut_through: bool,
    /// What one downstream host may send the relay, in datagrams per second, sustained, per
    /// source address; beyond it datagrams are dropped unread and counted. Default 2000.
    /// Positive and finite.
    pub datagrams_per_second_per_source: f64,
    /// The burst of datagrams one downstream source address may send. Default 4000. At
    /// least 1.
    pub burst_per_source: u32,
}

/// The relay's resync endpoints (`[resync]`): its members fetch the messages they missed from
/// them before trying the GCKS's. The HTTP endpoint also serves `/metrics` and `/healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayResyncSection {
    /// The TCP resync endpoint's listen address. Default: none (no TCP endpoint).
    pub tcp_listen: Option<SocketAddr>,
    /// The HTTP resync endpoint's listen address (also `/metrics`, `/healthz`). Default: none.
    pub http_listen: Option<SocketAddr>,
    /// The most connections an endpoint holds at once. Default 1024. At least 1.
    pub max_connections: usize,
    /// The most connections one source address may hold at once. Default 16. At least 1.
    pub max_connections_per_source: usize,
    /// The sustained request rate allowed per source address, per second. Default 200.
    /// Positive and finite.
    pub requests_per_second_per_source: f64,
    /// The burst of requests allowed per source address. Default 400. At least 1.
    pub burst_per_source: u32,
    /// How long a started request may take to arrive whole, in milliseconds. Default 5000.
    /// Must not be 0.
    pub header_timeout_ms: u64,
    /// How long a connection may stay without traffic, in milliseconds. Default 30000. Must
    /// not be 0.
    pub idle_timeout_ms: u64,
    /// The largest request (HTTP request line and headers, or TCP request frame), in bytes.
    /// Default 8192. At least 256.
    pub max_request_bytes: usize,
    /// The most bytes of output a connection may have waiting before it is closed. Default
    /// 1048576. At least 4096.
    pub max_output_bytes: usize,
}

impl RelayConfig {
    /// Reads, parses and validates the relay configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load(path)
    }

    /// Parses and validates a relay configuration.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every option's range, and the session configuration it converts to.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (option, path) in [("bundle", &self.bundle), ("state_dir", &self.state_dir)] {
            if path.as_os_str().is_empty() {
                return Err(invalid(option, quoted(path.display()), "must not be empty"));
            }
        }
        self.upstream.validate()?;
        self.downstream.validate()?;
        if self.downstream.multicast == self.upstream.multicast {
            return Err(invalid(
                "downstream.multicast",
                quoted(self.downstream.multicast),
                "must differ from upstream.multicast (the relay would hear its own forwards)",
            ));
        }
        self.sender
            .validate(self.downstream.datagram_size, "downstream.datagram_size")?;
        self.resync.validate()?;
        let up = &self.upstream;
        self.session_config_seeded(0)
            .upstream
            .validate()
            .map_err(|error| {
                receiver_option(
                    error,
                    "upstream.",
                    up.nack_max_rounds,
                    up.state_check_interval_ms,
                    Some(up.silence_timeout_ms),
                )
            })?;
        if self.downstream.group_size == Some(0) {
            return Err(invalid("downstream.group_size", 0, "must be at least 1"));
        }
        Ok(())
    }

    /// The relay session's configuration. Its NACK scheduler's seed is `upstream.seed`, or a
    /// fresh random one when it is not set.
    pub fn session_config(&self) -> rekeycast::relay::RelayConfig {
        self.session_config_seeded(self.upstream.seed.unwrap_or_else(rand::random))
    }

    fn session_config_seeded(&self, seed: u64) -> rekeycast::relay::RelayConfig {
        let up = &self.upstream;
        let mut config = rekeycast::relay::RelayConfig::new(up.feedback);
        config.upstream.scheduler.max_rounds = up.nack_max_rounds;
        config.upstream.scheduler.seed = seed;
        config.upstream.state_check_interval = Duration::from_millis(up.state_check_interval_ms);
        config.upstream.silence_timeout = Duration::from_millis(up.silence_timeout_ms);
        config.downstream = self.sender.sender_config(self.downstream.datagram_size);
        config.downstream_group_size = self.downstream.group_size;
        config.cut_through = self.downstream.cut_through;
        config
    }

    /// The upstream resync endpoints, parsed.
    pub fn upstream_resync_endpoints(
        &self,
    ) -> Result<Vec<rekeycast::io::resync_client::Endpoint>, ConfigError> {
        self.upstream
            .resync_endpoints
            .iter()
            .map(|text| {
                text.parse()
                    .map_err(|error: rekeycast::io::resync_client::ClientError| {
                        invalid("upstream.resync_endpoints", quoted(text), error.to_string())
                    })
            })
            .collect()
    }

    /// The relay engine's configuration (sockets, session, endpoints, limits, state
    /// directory). Name resolution of the resync endpoints happens here.
    pub fn engine_config(&self) -> Result<rekeycast::relay::RelayEngineConfig, ConfigError> {
        let up = &self.upstream;
        let down = &self.downstream;
        let mut upstream = rekeycast::io::socket::MulticastConfig::new(up.multicast);
        upstream.interface = socket_interface(up.multicast, &up.interface, "upstream.interface")?;
        let mut downstream = rekeycast::io::socket::MulticastConfig::new(down.multicast);
        downstream.interface =
            socket_interface(down.multicast, &down.interface, "downstream.interface")?;
        downstream.ttl = down.ttl;
        downstream.loopback = down.loopback;
        let mut engine = rekeycast::relay::RelayEngineConfig::loopback(
            up.multicast,
            up.feedback,
            down.multicast,
        );
        engine.upstream = upstream;
        engine.upstream_bind = up.bind;
        engine.downstream = downstream;
        engine.downstream_bind = down.feedback_listen;
        engine.session = self.session_config();
        // One list, tried in order: the relay's resync policy asks its `gcks` endpoints in
        // the order given.
        engine.resync.gcks = self
            .upstream_resync_endpoints()?
            .into_iter()
            .map(|endpoint| match endpoint {
                rekeycast::io::resync_client::Endpoint::Tcp(addr) => ResyncEndpoint {
                    protocol: ResyncProtocol::Tcp,
                    addr,
                },
                rekeycast::io::resync_client::Endpoint::Http(addr) => ResyncEndpoint {
                    protocol: ResyncProtocol::Http,
                    addr,
                },
            })
            .collect();
        engine.resync.fetch_timeout = Duration::from_millis(up.resync_timeout_ms);
        engine.resync.max_spread = Duration::from_millis(up.resync_max_delay_ms);
        engine.resync.rounds = up.resync_attempts;
        engine.resync_tcp = self.resync.tcp_listen;
        engine.resync_http = self.resync.http_listen;
        engine.resync_limits = self.resync.limits();
        engine.feedback_limit = Some(rekeycast::engine::driver::FeedbackLimit {
            datagrams_per_second: down.datagrams_per_second_per_source,
            burst: down.burst_per_source,
        });
        engine.state_dir = Some(self.state_dir.clone());
        Ok(engine)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            bundle: PathBuf::from("relay.bundle"),
            state_dir: PathBuf::from("rekey-relay-state"),
            upstream: UpstreamSection::default(),
            downstream: DownstreamSection::default(),
            sender: SenderSection::default(),
            resync: RelayResyncSection::default(),
            log: LogSection::default(),
        }
    }
}

impl UpstreamSection {
    /// Checks every option's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.multicast.ip().is_multicast() {
            return Err(invalid(
                "upstream.multicast",
                quoted(self.multicast),
                "not a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8)",
            ));
        }
        check_port("upstream.multicast", self.multicast)?;
        socket_interface(self.multicast, &self.interface, "upstream.interface")?;
        check_port("upstream.feedback", self.feedback)?;
        if self.feedback.ip().is_unspecified() || self.feedback.ip().is_multicast() {
            return Err(invalid(
                "upstream.feedback",
                quoted(self.feedback),
                "must be the unicast address of the GCKS or the upstream relay",
            ));
        }
        if self.bind.is_ipv4() != self.multicast.is_ipv4() {
            return Err(invalid(
                "upstream.bind",
                quoted(self.bind),
                "must be of the upstream group's address family",
            ));
        }
        for endpoint in &self.resync_endpoints {
            check_resync_endpoint(endpoint).map_err(|_| {
                invalid(
                    "upstream.resync_endpoints",
                    quoted(endpoint),
                    "must be \"tcp://HOST:PORT\" or \"http://HOST:PORT\"",
                )
            })?;
        }
        non_zero_interval("upstream.resync_timeout_ms", self.resync_timeout_ms)?;
        at_least_one("upstream.resync_attempts", u64::from(self.resync_attempts))?;
        Ok(())
    }
}

impl Default for UpstreamSection {
    fn default() -> Self {
        let feedback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT + 1);
        let receiver = ReceiverConfig::new(feedback);
        Self {
            multicast: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 77, 1)), DEFAULT_PORT),
            interface: "127.0.0.1".to_string(),
            feedback,
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            resync_endpoints: Vec::new(),
            nack_max_rounds: receiver.scheduler.max_rounds,
            state_check_interval_ms: millis(receiver.state_check_interval),
            silence_timeout_ms: millis(receiver.silence_timeout),
            resync_timeout_ms: 5000,
            resync_max_delay_ms: 500,
            resync_attempts: 5,
            seed: None,
        }
    }
}

impl DownstreamSection {
    /// Checks every option's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.multicast.ip().is_multicast() {
            return Err(invalid(
                "downstream.multicast",
                quoted(self.multicast),
                "not a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8)",
            ));
        }
        check_port("downstream.multicast", self.multicast)?;
        socket_interface(self.multicast, &self.interface, "downstream.interface")?;
        if self.ttl > 255 {
            return Err(invalid("downstream.ttl", self.ttl, "must be at most 255"));
        }
        if !(wire::MIN_DATAGRAM_SIZE..=wire::MAX_DATAGRAM_SIZE).contains(&self.datagram_size) {
            return Err(invalid(
                "downstream.datagram_size",
                self.datagram_size,
                format!(
                    "must be within {}..={} bytes",
                    wire::MIN_DATAGRAM_SIZE,
                    wire::MAX_DATAGRAM_SIZE
                ),
            ));
        }
        check_port("downstream.feedback_listen", self.feedback_listen)?;
        if self.feedback_listen.is_ipv4() != self.multicast.is_ipv4() {
            return Err(invalid(
                "downstream.feedback_listen",
                quoted(self.feedback_listen),
                "must be of the downstream group's address family",
            ));
        }
        check_rate(
            "downstream.datagrams_per_second_per_source",
            self.datagrams_per_second_per_source,
        )?;
        at_least_one(
            "downstream.burst_per_source",
            u64::from(self.burst_per_source),
        )?;
        Ok(())
    }
}

impl Default for DownstreamSection {
    fn default() -> Self {
        Self {
            multicast: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 78, 1)), DEFAULT_PORT),
            interface: "127.0.0.1".to_string(),
            ttl: 1,
            loopback: true,
            datagram_size: wire::DEFAULT_DATAGRAM_SIZE,
            feedback_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT + 11),
            group_size: None,
            cut_through: true,
            datagrams_per_second_per_source: 2000.0,
            burst_per_source: 4000,
        }
    }
}

impl RelayResyncSection {
    /// Checks the listen addresses and the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ResyncSection {
            tcp_listen: self.tcp_listen,
            http_listen: self.http_listen,
        }
        .validate()?;
        self.limits().validate().map_err(|error| {
            let (field, value) = match &error {
                rekeycast::resync::limits::LimitsError::Invalid { field, value, .. } => {
                    (*field, value.clone())
                }
                _ => ("", String::new()),
            };
            let option = match field {
                "max_connections" => "resync.max_connections",
                "max_connections_per_source" => "resync.max_connections_per_source",
                "requests_per_second_per_source" => "resync.requests_per_second_per_source",
                "burst_per_source" => "resync.burst_per_source",
                "header_timeout" => "resync.header_timeout_ms",
                "idle_timeout" => "resync.idle_timeout_ms",
                "max_request_bytes" => "resync.max_request_bytes",
                "max_output_bytes" => "resync.max_output_bytes",
                _ => "resync",
            };
            invalid(option, value, error.to_string())
        })
    }

    /// The endpoints' limits.
    pub fn limits(&self) -> rekeycast::resync::limits::Limits {
        rekeycast::resync::limits::Limits {
            max_request_bytes: self.max_request_bytes,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            requests_per_second_per_source: self.requests_per_second_per_source,
            burst_per_source: self.burst_per_source,
            max_output_bytes: self.max_output_bytes,
            ..rekeycast::resync::limits::Limits::default()
        }
    }
}

impl Default for RelayResyncSection {
    fn default() -> Self {
        let limits = rekeycast::resync::limits::Limits::default();
        Self {
            tcp_listen: None,
            http_listen: None,
            max_connections: limits.max_connections,
            max_connections_per_source: limits.max_connections_per_source,
            requests_per_second_per_source: limits.requests_per_second_per_source,
            burst_per_source: limits.burst_per_source,
            header_timeout_ms: millis(limits.header_timeout),
            idle_timeout_ms: millis(limits.idle_timeout),
            max_request_bytes: limits.max_request_bytes,
            max_output_bytes: limits.max_output_bytes,
        }
    }
}

/// Names the option behind a failed check of a converted receiver configuration: a member's
/// (`prefix` empty) or a relay's upstream side (`prefix` `"upstream."`, which also has
/// `silence_timeout_ms`).
fn receiver_option(
    error: rekeycast::session::ConfigError,
    prefix: &'static str,
    nack_max_rounds: u8,
    state_check_interval_ms: u64,
    silence_timeout_ms: Option<u64>,
) -> ConfigError {
    let (field, reason) = match error {
        rekeycast::session::ConfigError::Invalid { field, reason } => (field, reason),
        rekeycast::session::ConfigError::Nack(rekeycast_nack::ConfigError::Invalid {
            field,
            reason,
        }) => (field, reason),
        other => return invalid("receiver", "(derived)", other.to_string()),
    };
    let upstream = !prefix.is_empty();
    let (option, value) = match (field, upstream) {
        ("max_rounds", false) => ("nack_max_rounds", nack_max_rounds.to_string()),
        ("max_rounds", true) => ("upstream.nack_max_rounds", nack_max_rounds.to_string()),
        ("state_check_interval", false) => (
            "state_check_interval_ms",
            state_check_interval_ms.to_string(),
        ),
        ("state_check_interval", true) => (
            "upstream.state_check_interval_ms",
            state_check_interval_ms.to_string(),
        ),
        ("silence_timeout", true) => (
            "upstream.silence_timeout_ms",
            silence_timeout_ms.unwrap_or_default().to_string(),
        ),
        (other, _) => return invalid("receiver", format!("(derived {other})"), reason),
    };
    invalid(option, value, reason)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The socket interface of a group at `group` from the text of `option`.
fn socket_interface(
    group: SocketAddr,
    text: &str,
    option: &'static str,
) -> Result<rekeycast::io::socket::Interface, ConfigError> {
    use rekeycast::io::socket::Interface;
    let trimmed = text.trim();
    match group {
        SocketAddr::V4(_) => match trimmed.parse::<Ipv4Addr>() {
            Ok(address) if address.is_unspecified() => Ok(Interface::Default),
            Ok(address) => Ok(Interface::V4(address)),
            Err(_) => Err(invalid(
                option,
                quoted(text),
                "must be an IPv4 address (the interface's) for an IPv4 group",
            )),
        },
        SocketAddr::V6(_) => match trimmed.parse::<u32>() {
            Ok(0) => Ok(Interface::Default),
            Ok(index) => Ok(Interface::V6(index)),
            Err(_) => Err(invalid(
                option,
                quoted(text),
                "must be an interface index (a number, 0 for any) for an IPv6 group",
            )),
        },
    }
}

/// The default multicast port; the GCKS's feedback port is the next one.
const DEFAULT_PORT: u16 = 7400;

fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config: T = parse(&text)?;
    config.check()?;
    Ok(config)
}

/// The configurations [`load`] knows how to validate.
trait Validate {
    fn check(&self) -> Result<(), ConfigError>;
}

impl Validate for ServerConfig {
    fn check(&self) -> Result<(), ConfigError> {
        self.validate()
    }
}

impl Validate for MemberConfig {
    fn check(&self) -> Result<(), ConfigError> {
        self.validate()
    }
}

impl Validate for RelayConfig {
    fn check(&self) -> Result<(), ConfigError> {
        self.validate()
    }
}

fn parse<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|error| {
        let (line, column) = match error.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError::Syntax {
            message: error.to_string().trim_end().to_string(),
            line,
            column,
        }
    })
}

/// The 1-based line and character column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn invalid(
    option: &'static str,
    value: impl fmt::Display,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        option,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A string value as TOML writes it.
fn quoted(value: impl fmt::Display) -> String {
    format!("{:?}", value.to_string())
}

fn check_rate(option: &'static str, rate: f64) -> Result<(), ConfigError> {
    if rate.is_finite() && rate > 0.0 {
        Ok(())
    } else {
        Err(invalid(option, rate, "must be positive and finite"))
    }
}

fn at_least_one(option: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        Err(invalid(option, value, "must be at least 1"))
    } else {
        Ok(())
    }
}

fn non_zero_interval(option: &'static str, millis: u64) -> Result<(), ConfigError> {
    if millis == 0 {
        Err(invalid(option, millis, "must not be 0"))
    } else {
        Ok(())
    }
}

fn check_port(option: &'static str, addr: SocketAddr) -> Result<(), ConfigError> {
    if addr.port() == 0 {
        Err(invalid(option, quoted(addr), "the port must not be 0"))
    } else {
        Ok(())
    }
}

fn check_socket_path(option: &'static str, path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(invalid(option, quoted(path.display()), "must not be empty"));
    }
    if len > MAX_UNIX_SOCKET_PATH {
        return Err(invalid(
            option,
            quoted(path.display()),
            format!("is {len} bytes long; a Unix socket path holds at most {MAX_UNIX_SOCKET_PATH}"),
        ));
    }
    Ok(())
}

fn check_resync_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    let rest = endpoint
        .strip_prefix("tcp://")
        .or_else(|| endpoint.strip_prefix("http://"));
    let host_port = rest.map(|rest| rest.split('/').next().unwrap_or(rest));
    let valid = host_port.is_some_and(|host_port| {
        // HOST:PORT with a non-empty host and a port in 1..=65535 (IPv6 hosts in brackets).
        host_port.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        })
    });
    if valid {
        Ok(())
    } else {
        Err(invalid(
            "resync_endpoints",
            quoted(endpoint),
            "must be \"tcp://HOST:PORT\" or \"http://HOST:PORT[/PATH]\"",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SERVER_EXAMPLE: &str = include_str!("../../rekeycast.example.toml");
    const MEMBER_EXAMPLE: &str = include_str!("../../rekeycast-member.example.toml");
    const RELAY_EXAMPLE: &str = include_str!("../../rekey-relay.example.toml");

    /// Parses `text` as a server configuration and returns the validation error's message,
    /// checking that it names `option` and shows `value`.
    fn server_error(text: &str, option: &str, value: &str) -> String {
        let error = ServerConfig::from_toml_str(text).unwrap_err();
        match &error {
            ConfigError::Invalid {
                option: named,
                value: shown,
                ..
            } => {
                assert_eq!(*named, option, "{error}");
                assert_eq!(shown, value, "{error}");
            }
            other => panic!("expected an Invalid error, got {other}"),
        }
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("{option} = {value}: ")),
            "{message}"
        );
        message
    }

    fn member_error(text: &str, option: &str, value: &str) -> String {
        let error = MemberConfig::from_toml_str(text).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(&error, ConfigError::Invalid { option: named, value: shown, .. }
                if *named == option && shown == value),
            "{message}"
        );
        assert!(
            message.starts_with(&format!("{option} = {value}: ")),
            "{message}"
        );
        message
    }

    #[test]
    fn example_files_parse_and_validate() {
        let server = ServerConfig::from_toml_str(SERVER_EXAMPLE).unwrap();
        server.validate().unwrap();
        let member = MemberConfig::from_toml_str(MEMBER_EXAMPLE).unwrap();
        member.validate().unwrap();
        let relay = RelayConfig::from_toml_str(RELAY_EXAMPLE).unwrap();
        relay.validate().unwrap();
    }

    #[test]
    fn example_files_show_the_defaults() {
        // The examples set every option to its default, as their comments say.
        assert_eq!(
            ServerConfig::from_toml_str(SERVER_EXAMPLE).unwrap(),
            ServerConfig::default()
        );
        assert_eq!(
            MemberConfig::from_toml_str(MEMBER_EXAMPLE).unwrap(),
            MemberConfig::default()
        );
        assert_eq!(
            RelayConfig::from_toml_str(RELAY_EXAMPLE).unwrap(),
            RelayConfig::default()
        );
    }

    #[test]
    fn example_files_mention_every_option() {
        let server = toml::to_string(&ServerConfig {
            resync: ResyncSection {
                tcp_listen: Some("0.0.0.0:7402".parse().unwrap()),
                http_listen: Some("0.0.0.0:7403".parse().unwrap()),
            },
            ..ServerConfig::default()
        })
        .unwrap();
        let member = toml::to_string(&MemberConfig {
            seed: Some(1),
            state_file: Some(PathBuf::from("member.state")),
            ..MemberConfig::default()
        })
        .unwrap();
        let mut relay = RelayConfig::default();
        relay.upstream.seed = Some(1);
        relay.downstream.group_size = Some(10);
        relay.resync.tcp_listen = Some("0.0.0.0:7412".parse().unwrap());
        relay.resync.http_listen = Some("0.0.0.0:7413".parse().unwrap());
        let relay = toml::to_string(&relay).unwrap();
        for (serialized, example) in [
            (server, SERVER_EXAMPLE),
            (member, MEMBER_EXAMPLE),
            (relay, RELAY_EXAMPLE),
        ] {
            for line in serialized.lines() {
                let Some((key, _)) = line.split_once(" = ") else {
                    continue;
                };
                assert!(
                    example.lines().any(|l| {
                        let l = l.trim_start_matches('#').trim_start();
                        l.starts_with(&format!("{key} ="))
                    }),
                    "option {key} missing from an example file"
                );
            }
        }
    }

    #[test]
    fn empty_file_is_the_default_configuration() {
        assert_eq!(
            ServerConfig::from_toml_str("").unwrap(),
            ServerConfig::default()
        );
        assert_eq!(
            MemberConfig::from_toml_str("").unwrap(),
            MemberConfig::default()
        );
    }

    #[test]
    fn defaults_convert_to_the_sessions_defaults() {
        let server = ServerConfig::default();
        assert_eq!(server.sender_config(), SenderConfig::default());
        assert_eq!(server.message_params(), MessageParams::default());
        let member = MemberConfig {
            seed: Some(0),
            ..MemberConfig::default()
        };
        let expected = ReceiverConfig::new(member.feedback);
        let converted = member.receiver_config();
        assert_eq!(converted.scheduler, expected.scheduler);
        assert_eq!(
            converted.state_check_interval,
            expected.state_check_interval
        );
        assert_eq!(converted.feedback_addr, expected.feedback_addr);
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let server = ServerConfig::default();
        let text = toml::to_string(&server).unwrap();
        assert_eq!(ServerConfig::from_toml_str(&text).unwrap(), server);
        let member = MemberConfig::default();
        let text = toml::to_string(&member).unwrap();
        assert_eq!(MemberConfig::from_toml_str(&text).unwrap(), member);
    }

    #[test]
    fn options_reach_the_session_configs() {
        let server = ServerConfig::from_toml_str(
            r#"
            [group]
            spi = 9
            datagram_size = 1232
            [sender]
            send_rate = 5000
            burst = 8
            manifest_repeats = 2
            history = 16
            repair_window = 4
            heartbeat_min_ms = 20
            heartbeat_max_ms = 2000
            backoff_factor = 6
            grtt_initial_ms = 30
            proactive_target_fraction = 0.1
            repair_rate = 2500.5
            max_repair_per_round = 12
            symbol_size = 1185
            signing_threads = 2
            "#,
        )
        .unwrap();
        let sender = server.sender_config();
        assert_eq!(sender.datagram_size, 1232);
        assert_eq!(sender.send_rate, 5000.0);
        assert_eq!(sender.burst, 8);
        assert_eq!(sender.manifest_repeats, 2);
        assert_eq!(sender.history, 16);
        assert_eq!(sender.repair_window, 4);
        assert_eq!(sender.heartbeat_min, Duration::from_millis(20));
        assert_eq!(sender.heartbeat_max, Duration::from_secs(2));
        assert_eq!(sender.backoff_factor, 6);
        assert_eq!(sender.grtt.initial, Duration::from_millis(30));
        assert_eq!(sender.proactive.target_fraction, 0.1);
        assert_eq!(sender.aggregator.repair_rate, 2500.5);
        assert_eq!(sender.aggregator.max_repair_per_round, 12);
        let params = server.message_params();
        assert_eq!(params.spi, 9);
        assert_eq!(params.symbol_size, 1185);
        assert_eq!(params.signing_threads, 2);

        let member = MemberConfig::from_toml_str(
            r#"
            feedback = "198.18.0.1:9000"
            nack_max_rounds = 7
            state_check_interval_ms = 250
            seed = 42
            resync_endpoints = ["tcp://198.18.0.1:9001", "http://[2001:db8::1]:80/resync"]
            [group]
            multicast = "[ff15::77]:7400"
            interface = "3"
            "#,
        )
        .unwrap();
        let receiver = member.receiver_config();
        assert_eq!(receiver.feedback_addr, "198.18.0.1:9000".parse().unwrap());
        assert_eq!(receiver.scheduler.max_rounds, 7);
        assert_eq!(receiver.scheduler.seed, 42);
        assert_eq!(receiver.state_check_interval, Duration::from_millis(250));
        assert_eq!(
            member.group.multicast_interface().unwrap(),
            MulticastInterface::V6(3)
        );
    }

    #[test]
    fn syntax_error_keeps_line_and_column() {
        let error = ServerConfig::from_toml_str("[group]\ngroup_id = 1\nttl = = 3\n").unwrap_err();
        let ConfigError::Syntax { line, column, .. } = &error else {
            panic!("expected a syntax error, got {error}");
        };
        assert_eq!(*line, Some(3));
        assert!(column.is_some());
        assert!(error.to_string().contains("line 3"), "{error}");
    }

    #[test]
    fn wrong_type_is_an_error_with_its_line() {
        let error = ServerConfig::from_toml_str("[sender]\n\nburst = \"lots\"\n").unwrap_err();
        let ConfigError::Syntax { line, .. } = &error else {
            panic!("expected a syntax error, got {error}");
        };
        assert_eq!(*line, Some(3));
        let error = ServerConfig::from_toml_str("[sender]\nburst = -1\n").unwrap_err();
        assert!(
            matches!(error, ConfigError::Syntax { line: Some(2), .. }),
            "{error}"
        );
        let error =
            ServerConfig::from_toml_str("[group]\nmulticast = \"239.1.1.1\"\n").unwrap_err();
        assert!(
            matches!(error, ConfigError::Syntax { line: Some(2), .. }),
            "{error}"
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        for (text, key, line) in [
            ("[sender]\nsend_rat = 5\n", "send_rat", 2),
            ("stat_dir = \"x\"\n", "stat_dir", 1),
            ("[group]\nttl = 1\n[sendr]\nburst = 1\n", "sendr", 3),
            ("[log]\nlevel = \"debug\"\n", "level", 2),
            ("[resync]\ntcp = \"0.0.0.0:1\"\n", "tcp", 2),
        ] {
            let error = ServerConfig::from_toml_str(text).unwrap_err();
            let message = error.to_string();
            assert!(message.contains(&format!("`{key}`")), "{message}");
            assert!(
                matches!(error, ConfigError::Syntax { line: Some(l), .. } if l == line),
                "{message}"
            );
        }
        let error = MemberConfig::from_toml_str("bundel = \"b\"\n").unwrap_err();
        assert!(error.to_string().contains("`bundel`"), "{error}");
        // A server-only option in a member file.
        let error = MemberConfig::from_toml_str("state_dir = \"s\"\n").unwrap_err();
        assert!(error.to_string().contains("`state_dir`"), "{error}");
    }

    #[test]
    fn load_reads_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "[group]\ngroup_id = 7\n").unwrap();
        assert_eq!(ServerConfig::load(&path).unwrap().group.group_id, 7);
        std::fs::write(&path, "[sender]\nsend_rate = -5\n").unwrap();
        let error = ServerConfig::load(&path).unwrap_err();
        assert_eq!(
            error.to_string(),
            "sender.send_rate = -5: must be positive and finite"
        );
        let missing = dir.path().join("missing.toml");
        let error = MemberConfig::load(&missing).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }));
        assert!(error.to_string().contains("missing.toml"), "{error}");
    }

    #[test]
    fn group_multicast_must_be_multicast() {
        let message = server_error(
            "[group]\nmulticast = \"10.0.0.1:7400\"\n",
            "group.multicast",
            "\"10.0.0.1:7400\"",
        );
        assert!(message.contains("not a multicast address"), "{message}");
        member_error(
            "[group]\nmulticast = \"[2001:db8::1]:7400\"\ninterface = \"0\"\n",
            "group.multicast",
            "\"[2001:db8::1]:7400\"",
        );
        server_error(
            "[group]\nmulticast = \"239.1.2.3:0\"\n",
            "group.multicast",
            "\"239.1.2.3:0\"",
        );
    }

    #[test]
    fn group_interface_must_match_the_address_family() {
        server_error(
            "[group]\ninterface = \"eth0\"\n",
            "group.interface",
            "\"eth0\"",
        );
        let message = server_error(
            "[group]\nmulticast = \"[ff15::1]:7400\"\ninterface = \"127.0.0.1\"\n",
            "group.interface",
            "\"127.0.0.1\"",
        );
        assert!(message.contains("interface index"), "{message}");
        let config = ServerConfig::from_toml_str("[group]\ninterface = \"0.0.0.0\"\n").unwrap();
        assert_eq!(
            config.group.multicast_interface().unwrap(),
            MulticastInterface::V4(Ipv4Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn group_ttl_datagram_size_and_degree_ranges() {
        server_error("[group]\nttl = 256\n", "group.ttl", "256");
        let message = server_error(
            "[group]\ndatagram_size = 100\n",
            "group.datagram_size",
            "100",
        );
        assert!(message.contains("256..=65507"), "{message}");
        server_error(
            "[group]\ndatagram_size = 70000\n",
            "group.datagram_size",
            "70000",
        );
        server_error("[group]\ndegree = 1\n", "group.degree", "1");
        let message = server_error("[group]\ndegree = 17\n", "group.degree", "17");
        assert!(message.contains("2..=16"), "{message}");
        ServerConfig::from_toml_str("[group]\ndegree = 2\nttl = 255\n").unwrap();
    }

    #[test]
    fn sender_rates_must_be_positive_and_finite() {
        let message = server_error("[sender]\nsend_rate = -5\n", "sender.send_rate", "-5");
        assert_eq!(
            message,
            "sender.send_rate = -5: must be positive and finite"
        );
        server_error("[sender]\nsend_rate = 0\n", "sender.send_rate", "0");
        server_error("[sender]\nsend_rate = nan\n", "sender.send_rate", "NaN");
        server_error("[sender]\nsend_rate = inf\n", "sender.send_rate", "inf");
        server_error(
            "[sender]\nrepair_rate = -0.5\n",
            "sender.repair_rate",
            "-0.5",
        );
    }

    #[test]
    fn sender_counts_must_be_at_least_one() {
        for option in [
            "burst",
            "manifest_repeats",
            "history",
            "repair_window",
            "backoff_factor",
            "max_repair_per_round",
            "symbol_size",
        ] {
            let message = server_error(
                &format!("[sender]\n{option} = 0\n"),
                &format!("sender.{option}"),
                "0",
            );
            assert!(message.ends_with("must be at least 1"), "{message}");
        }
        server_error(
            "[sender]\nhistory = 4\nrepair_window = 5\n",
            "sender.repair_window",
            "5",
        );
    }

    #[test]
    fn sender_intervals_must_be_non_zero_and_ordered() {
        for option in ["heartbeat_min_ms", "heartbeat_max_ms", "grtt_initial_ms"] {
            let message = server_error(
                &format!("[sender]\n{option} = 0\n"),
                &format!("sender.{option}"),
                "0",
            );
            assert!(message.ends_with("must not be 0"), "{message}");
        }
        let message = server_error(
            "[sender]\nheartbeat_min_ms = 500\nheartbeat_max_ms = 100\n",
            "sender.heartbeat_min_ms",
            "500",
        );
        assert!(message.contains("heartbeat_max_ms (100)"), "{message}");
        server_error(
            "[sender]\ngrtt_initial_ms = 10001\n",
            "sender.grtt_initial_ms",
            "10001",
        );
    }

    #[test]
    fn sender_proactive_fraction_and_symbol_size() {
        for bad in ["0.0", "1.0", "-0.1", "1.5"] {
            let shown = bad.trim_end_matches(".0");
            server_error(
                &format!("[sender]\nproactive_target_fraction = {bad}\n"),
                "sender.proactive_target_fraction",
                shown,
            );
        }
        let message = server_error(
            "[group]\ndatagram_size = 1232\n[sender]\nsymbol_size = 1200\n",
            "sender.symbol_size",
            "1200",
        );
        assert!(message.contains("group.datagram_size (1232)"), "{message}");
        ServerConfig::from_toml_str(
            "[group]\ndatagram_size = 1232\n[sender]\nsymbol_size = 1185\n",
        )
        .unwrap();
    }

    #[test]
    fn batch_options_must_be_non_zero() {
        server_error("[batch]\ninterval_ms = 0\n", "batch.interval_ms", "0");
        server_error("[batch]\nmax_joins = 0\n", "batch.max_joins", "0");
        server_error("[batch]\nmax_leaves = 0\n", "batch.max_leaves", "0");
    }

    #[test]
    fn server_paths_and_addresses() {
        server_error("state_dir = \"\"\n", "state_dir", "\"\"");
        server_error("admin_socket = \"\"\n", "admin_socket", "\"\"");
        let long = format!("/run/{}/admin.sock", "x".repeat(120));
        let message = server_error(
            &format!("admin_socket = \"{long}\"\n"),
            "admin_socket",
            &format!("\"{long}\""),
        );
        assert!(message.contains("at most 107"), "{message}");
        server_error(
            "feedback_listen = \"0.0.0.0:0\"\n",
            "feedback_listen",
            "\"0.0.0.0:0\"",
        );
        server_error(
            "[resync]\ntcp_listen = \"0.0.0.0:0\"\n",
            "resync.tcp_listen",
            "\"0.0.0.0:0\"",
        );
        server_error(
            "[resync]\ntcp_listen = \"0.0.0.0:7402\"\nhttp_listen = \"0.0.0.0:7402\"\n",
            "resync.http_listen",
            "\"0.0.0.0:7402\"",
        );
        let config = ServerConfig::from_toml_str(
            "[resync]\ntcp_listen = \"0.0.0.0:7402\"\nhttp_listen = \"[::]:7403\"\n",
        )
        .unwrap();
        assert_eq!(
            config.resync.http_listen,
            Some("[::]:7403".parse().unwrap())
        );
    }

    #[test]
    fn member_options() {
        member_error(
            "feedback = \"0.0.0.0:7401\"\n",
            "feedback",
            "\"0.0.0.0:7401\"",
        );
        member_error(
            "feedback = \"239.1.1.1:7401\"\n",
            "feedback",
            "\"239.1.1.1:7401\"",
        );
        member_error(
            "feedback = \"127.0.0.1:0\"\n",
            "feedback",
            "\"127.0.0.1:0\"",
        );
        member_error("bundle = \"\"\n", "bundle", "\"\"");
        member_error("nack_max_rounds = 0\n", "nack_max_rounds", "0");
        member_error(
            "state_check_interval_ms = 0\n",
            "state_check_interval_ms",
            "0",
        );
        for bad in [
            "198.18.0.1:9001",
            "udp://h:1",
            "tcp://:1",
            "tcp://h",
            "http://h:0/x",
            "tcp://h:x",
        ] {
            let message = member_error(
                &format!("resync_endpoints = [\"tcp://ok:1\", \"{bad}\"]\n"),
                "resync_endpoints",
                &format!("\"{bad}\""),
            );
            assert!(message.contains("tcp://HOST:PORT"), "{message}");
        }
        member_error("[group]\ndegree = 0\n", "group.degree", "0");
    }

    #[test]
    fn session_errors_are_mapped_to_options() {
        let config = ServerConfig::default();
        let name = |error| {
            config
                .sender
                .name_option(error, 1472, "group.datagram_size")
        };
        let error = name(rekeycast::session::ConfigError::Invalid {
            field: "send_rate",
            reason: "must be positive and finite",
        });
        assert_eq!(
            error.to_string(),
            "sender.send_rate = 20000: must be positive and finite"
        );
        let error = name(rekeycast::session::ConfigError::Invalid {
            field: "datagram_size",
            reason: "must be within 256..=65507",
        });
        assert_eq!(
            error.to_string(),
            "group.datagram_size = 1472: must be within 256..=65507"
        );
        let error = name(rekeycast::session::ConfigError::Nack(
            rekeycast_nack::ConfigError::Invalid {
                field: "target_fraction",
                reason: "must be in (0, 1)",
            },
        ));
        assert!(
            error
                .to_string()
                .starts_with("sender.proactive_target_fraction = 0.05: "),
            "{error}"
        );
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("a\nbc", 3), (2, 2));
        assert_eq!(line_column("é\né", 5), (2, 2));
        assert_eq!(line_column("é\né", 4), (2, 1));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    fn relay_error(text: &str, option: &str, value: &str) -> String {
        let error = RelayConfig::from_toml_str(text).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(&error, ConfigError::Invalid { option: named, value: shown, .. }
                if *named == option && shown == value),
            "{message}"
        );
        message
    }

    #[test]
    fn relay_errors_name_the_option_and_value() {
        relay_error(
            "[downstream]\nmulticast = \"239.255.77.1:7400\"",
            "downstream.multicast",
            "\"239.255.77.1:7400\"",
        );
        relay_error(
            "[upstream]\nmulticast = \"10.0.0.1:7400\"",
            "upstream.multicast",
            "\"10.0.0.1:7400\"",
        );
        relay_error(
            "[upstream]\nfeedback = \"0.0.0.0:7401\"",
            "upstream.feedback",
            "\"0.0.0.0:7401\"",
        );
        relay_error(
            "[upstream]\nresync_endpoints = [\"ftp://x:1\"]",
            "upstream.resync_endpoints",
            "\"ftp://x:1\"",
        );
        relay_error(
            "[upstream]\nsilence_timeout_ms = 0",
            "upstream.silence_timeout_ms",
            "0",
        );
        relay_error("[downstream]\ngroup_size = 0", "downstream.group_size", "0");
        relay_error(
            "[downstream]\ndatagrams_per_second_per_source = -1.0",
            "downstream.datagrams_per_second_per_source",
            "-1",
        );
        relay_error(
            "[downstream]\nfeedback_listen = \"0.0.0.0:0\"",
            "downstream.feedback_listen",
            "\"0.0.0.0:0\"",
        );
        relay_error(
            "[resync]\nmax_connections = 0",
            "resync.max_connections",
            "0",
        );
        relay_error("[sender]\nhistory = 0", "sender.history", "0");
        relay_error("state_dir = \"\"", "state_dir", "\"\"");
        let error = RelayConfig::from_toml_str("[downstream]\nmulticas = \"x\"").unwrap_err();
        assert!(matches!(error, ConfigError::Syntax { .. }), "{error}");
    }

    #[test]
    fn relay_converts_to_the_engine_configuration() {
        let relay = RelayConfig::from_toml_str(
            "state_dir = \"/tmp/r\"\n\
             [upstream]\nfeedback = \"198.18.0.1:7401\"\nsilence_timeout_ms = 2000\n\
             resync_endpoints = [\"tcp://198.18.0.1:7402\"]\nseed = 3\n\
             [downstream]\ngroup_size = 50\ncut_through = false\n\
             datagrams_per_second_per_source = 10.0\n\
             [sender]\nhistory = 5\nrepair_window = 5\n\
             [resync]\ntcp_listen = \"0.0.0.0:7412\"\nmax_connections = 7\n",
        )
        .unwrap();
        let engine = relay.engine_config().unwrap();
        assert_eq!(
            engine.session.upstream.feedback_addr,
            "198.18.0.1:7401".parse().unwrap()
        );
        assert_eq!(
            engine.session.upstream.silence_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(engine.session.upstream.scheduler.seed, 3);
        assert_eq!(engine.session.downstream.history, 5);
        assert_eq!(engine.session.downstream_group_size, Some(50));
        assert!(!engine.session.cut_through);
        assert_eq!(
            engine.resync.gcks,
            vec![ResyncEndpoint {
                protocol: ResyncProtocol::Tcp,
                addr: "198.18.0.1:7402".parse().unwrap()
            }]
        );
        assert_eq!(engine.resync_tcp, Some("0.0.0.0:7412".parse().unwrap()));
        assert_eq!(engine.resync_limits.max_connections, 7);
        assert_eq!(
            engine
                .feedback_limit
                .map(|limit| limit.datagrams_per_second),
            Some(10.0)
        );
        assert_eq!(engine.state_dir, Some(PathBuf::from("/tmp/r")));
        assert_eq!(engine.downstream.group, relay.downstream.multicast);
        assert_eq!(engine.upstream.group, relay.upstream.multicast);
    }
}
