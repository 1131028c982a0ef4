//! The configuration files of `rekeycast server`, `rekeycast member` and `rekey-relay`: TOML,
//! validated on load.
//!
//! Each file holds one section that is the library's own configuration, read as it is
//! (`[gcks]`: [`rekeycast::GcksConfig`]; `[member]`: [`rekeycast::MemberConfig`]; `[relay]`:
//! [`rekeycast::RelayEngineConfig`]), with the library's defaults, ranges and `validate()`, and
//! the few options only the programs have: file paths (the registration bundle, the admin
//! socket) and logging. This module restates none of the library's defaults or ranges.
//!
//! Every option has a default, so an empty file is a valid configuration where the library's
//! defaults are (a member and a relay must name their feedback address); every key that is not
//! an option is an error naming it (a misspelt option must not silently fall back to its
//! default). Validation errors name the option by its dotted path and the rule it breaks:
//! `gcks.sender.send_rate: must be positive and finite`. TOML syntax errors keep the line and
//! column the parser reported. The annotated examples `rekeycast.example.toml`,
//! `rekeycast-member.example.toml` and `rekey-relay.example.toml` at the repository root show
//! the options; a test parses them, so they stay in step with the library.
//!
//! Relative paths are taken relative to the working directory of the process.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use rekeycast::{GcksConfig, InvalidConfig, RelayEngineConfig};

/// The longest path of a Unix domain socket, in bytes (`sun_path` is 108 bytes on Linux,
/// including the terminating NUL).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;

/// The server's state directory when `gcks.state_dir` is not set.
pub const DEFAULT_SERVER_STATE_DIR: &str = "rekeycast-state";

/// The relay's state directory when `relay.state_dir` is not set.
pub const DEFAULT_RELAY_STATE_DIR: &str = "rekey-relay-state";

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
    /// An option breaks a rule of its range; its path names it from the file's root
    /// (`gcks.sender.send_rate`).
    #[error(transparent)]
    Invalid(#[from] InvalidConfig),
}

/// The configuration of `rekeycast server`: one GCKS serving one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The Unix socket of the admin interface (`rekeycast admin ...`: join, leave, rekey now,
    /// status). Default `"rekeycast-state/admin.sock"`. At most 107 bytes long.
    pub admin_socket: PathBuf,
    /// Logging (`[log]`).
    pub log: LogSection,
    /// The GCKS (`[gcks]`, the library's [`GcksConfig`]). Its `state_dir` (default
    /// `"rekeycast-state"` here) also holds the signing key, `gcks-signing-key.pem`, created
    /// with mode 0600 on first start.
    pub gcks: GcksConfig,
}

/// The configuration of `rekeycast member`: one member of one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemberConfig {
    /// The registration bundle written by `rekeycast admin join` (mode 0600): the member's
    /// keys. Default `"member.bundle"`. Must not be empty.
    pub bundle: PathBuf,
    /// Logging (`[log]`).
    pub log: LogSection,
    /// The member (`[member]`, the library's [`rekeycast::MemberConfig`]). Its NACK
    /// scheduler's seed `receiver.scheduler.seed`, when 0 (the default), is drawn at start:
    /// from `seed` when set, else at random, so that members spread their NACKs differently.
    pub member: rekeycast::MemberConfig,
}

/// The configuration of `rekey-relay`: one relay of one group, between an upstream group (the
/// GCKS's, or an upstream relay's) and its own downstream group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// The relay's registration bundle, written by `rekeycast admin join` (mode 0600): the
    /// relay holds a leaf like a member. Read only when the state directory holds no saved
    /// keys. Default `"relay.bundle"`. Must not be empty.
    pub bundle: PathBuf,
    /// Logging (`[log]`).
    pub log: LogSection,
    /// The relay (`[relay]`, the library's [`RelayEngineConfig`]). Its `state_dir` defaults
    /// to `"rekey-relay-state"` here; its upstream NACK scheduler's seed
    /// `session.upstream.scheduler.seed`, when 0 (the default), is drawn at random at start.
    pub relay: RelayEngineConfig,
}

/// Logging (`[log]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// The `tracing` filter directives, in the syntax of `RUST_LOG`, such as `"info"` or
    /// `"rekeycast=debug,warn"`. Default `"info"`.
    pub filter: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            filter: "info".to_string(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        let gcks = GcksConfig {
            state_dir: Some(PathBuf::from(DEFAULT_SERVER_STATE_DIR)),
            ..GcksConfig::default()
        };
        Self {
            admin_socket: PathBuf::from(DEFAULT_SERVER_STATE_DIR).join("admin.sock"),
            log: LogSection::default(),
            gcks,
        }
    }
}

impl Default for MemberConfig {
    fn default() -> Self {
        Self {
            bundle: PathBuf::from("member.bundle"),
            log: LogSection::default(),
            member: rekeycast::MemberConfig::default(),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        let relay = RelayEngineConfig {
            state_dir: Some(PathBuf::from(DEFAULT_RELAY_STATE_DIR)),
            ..RelayEngineConfig::default()
        };
        Self {
            bundle: PathBuf::from("relay.bundle"),
            log: LogSection::default(),
            relay,
        }
    }
}

impl ServerConfig {
    /// Reads, parses and validates the server configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml_str(&read(path)?)
    }

    /// Parses and validates a server configuration.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = parse(text)?;
        if config.gcks.state_dir.is_none() {
            config.gcks.state_dir = Some(PathBuf::from(DEFAULT_SERVER_STATE_DIR));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the admin socket's path and the GCKS's configuration.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        check_socket_path("admin_socket", &self.admin_socket)?;
        self.gcks.validate().map_err(|error| error.within("gcks"))
    }

    /// The state directory: the key tree, the message history and the signing key.
    pub fn state_dir(&self) -> PathBuf {
        self.gcks
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SERVER_STATE_DIR))
    }
}

impl MemberConfig {
    /// Reads, parses and validates the member configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml_str(&read(path)?)
    }

    /// Parses and validates a member configuration.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the bundle's path and the member's configuration.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.bundle.as_os_str().is_empty() {
            return Err(InvalidConfig::new("bundle", "must not be empty"));
        }
        self.member
            .validate()
            .map_err(|error| error.within("member"))
    }

    /// The member engine's configuration: the `[member]` section, its NACK scheduler seeded
    /// (see [`MemberConfig::member`]).
    pub fn engine_config(&self) -> rekeycast::MemberConfig {
        let mut member = self.member.clone();
        let scheduler = &mut member.receiver.scheduler;
        if scheduler.seed == 0 {
            scheduler.seed = self.member.seed.unwrap_or_else(rand::random);
        }
        member
    }
}

impl RelayConfig {
    /// Reads, parses and validates the relay configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml_str(&read(path)?)
    }

    /// Parses and validates a relay configuration.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = parse(text)?;
        if config.relay.state_dir.is_none() {
            config.relay.state_dir = Some(PathBuf::from(DEFAULT_RELAY_STATE_DIR));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the bundle's path and the relay's configuration.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.bundle.as_os_str().is_empty() {
            return Err(InvalidConfig::new("bundle", "must not be empty"));
        }
        self.relay.validate().map_err(|error| error.within("relay"))
    }

    /// The state directory: the relay's keys and the messages it forwarded.
    pub fn state_dir(&self) -> PathBuf {
        self.relay
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RELAY_STATE_DIR))
    }

    /// The relay engine's configuration: the `[relay]` section, with its state directory and
    /// its upstream NACK scheduler seeded (see [`RelayConfig::relay`]).
    pub fn engine_config(&self) -> RelayEngineConfig {
        let mut relay = self.relay.clone();
        relay.state_dir = Some(self.state_dir());
        let scheduler = &mut relay.session.upstream.scheduler;
        if scheduler.seed == 0 {
            scheduler.seed = rand::random();
        }
        relay
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
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

fn check_socket_path(option: &'static str, path: &Path) -> Result<(), InvalidConfig> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(InvalidConfig::new(option, "must not be empty"));
    }
    if len > MAX_UNIX_SOCKET_PATH {
        return Err(InvalidConfig::new(
            option,
            "is too long: a Unix socket path holds at most 107 bytes",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use rekeycast_proto::endpoint::{ResyncEndpoint, ResyncProtocol};

    use super::*;

    const SERVER_EXAMPLE: &str = include_str!("../../rekeycast.example.toml");
    const MEMBER_EXAMPLE: &str = include_str!("../../rekeycast-member.example.toml");
    const RELAY_EXAMPLE: &str = include_str!("../../rekey-relay.example.toml");

    /// A minimal valid member file: the feedback address has no default.
    const MEMBER: &str = "[member.receiver]\nfeedback_addr = \"127.0.0.1:7401\"\n";
    /// A minimal valid relay file.
    const RELAY: &str = "[relay.session.upstream]\nfeedback_addr = \"127.0.0.1:7401\"\n";

    /// The validation error of `result`, checking that it names `field`.
    fn invalid<T: std::fmt::Debug>(result: Result<T, ConfigError>, field: &str) -> String {
        let error = result.unwrap_err();
        match &error {
            ConfigError::Invalid(invalid) => assert_eq!(invalid.field, field, "{error}"),
            other => panic!("expected an Invalid error, got {other}"),
        }
        let message = error.to_string();
        assert!(message.starts_with(&format!("{field}: ")), "{message}");
        message
    }

    #[test]
    fn example_files_parse_and_validate() {
        ServerConfig::from_toml_str(SERVER_EXAMPLE).unwrap();
        MemberConfig::from_toml_str(MEMBER_EXAMPLE).unwrap();
        RelayConfig::from_toml_str(RELAY_EXAMPLE).unwrap();
    }

    #[test]
    fn an_empty_server_file_is_the_library_default_with_a_state_directory() {
        let config = ServerConfig::from_toml_str("").unwrap();
        let defaults = GcksConfig::default();
        assert_eq!(config.gcks.sender, defaults.sender);
        assert_eq!(config.gcks.resync_limits, defaults.resync_limits);
        assert_eq!(config.gcks.multicast, defaults.multicast);
        assert_eq!(config.gcks.bind, defaults.bind);
        assert_eq!(config.state_dir(), PathBuf::from(DEFAULT_SERVER_STATE_DIR));
        // A [gcks] section without state_dir gets the same.
        let config = ServerConfig::from_toml_str("[gcks]\ngroup_id = 3\n").unwrap();
        assert_eq!(config.gcks.group_id, 3);
        assert_eq!(config.state_dir(), PathBuf::from(DEFAULT_SERVER_STATE_DIR));
    }

    #[test]
    fn files_round_trip_through_toml() {
        let mut server = ServerConfig::from_toml_str(SERVER_EXAMPLE).unwrap();
        server.gcks.resync_tcp = Some("0.0.0.0:7402".parse().unwrap());
        server.gcks.resync_limits.max_connections = 99;
        let text = toml::to_string(&server).unwrap();
        let again = ServerConfig::from_toml_str(&text).unwrap();
        assert_eq!(toml::to_string(&again).unwrap(), text);
        assert_eq!(again.gcks.resync_limits.max_connections, 99);

        let member = MemberConfig::from_toml_str(MEMBER_EXAMPLE).unwrap();
        let text = toml::to_string(&member).unwrap();
        let again = MemberConfig::from_toml_str(&text).unwrap();
        assert_eq!(toml::to_string(&again).unwrap(), text);

        let relay = RelayConfig::from_toml_str(RELAY_EXAMPLE).unwrap();
        let text = toml::to_string(&relay).unwrap();
        let again = RelayConfig::from_toml_str(&text).unwrap();
        assert_eq!(toml::to_string(&again).unwrap(), text);
    }

    #[test]
    fn a_server_file_lists_the_relays_its_bundles_carry() {
        let text = "[[gcks.relay_directory.relays]]\nid = 1\ngroup = \"239.255.77.2:7400\"\n\
                    feedback = \"192.0.2.7:7403\"\nresync = [\"tcp://192.0.2.7:7404\"]\n\
                    [[gcks.relay_directory.relays]]\nid = 2\ngroup = \"239.255.77.3:7400\"\n\
                    feedback = \"192.0.2.8:7403\"\n";
        let config = ServerConfig::from_toml_str(text).unwrap();
        let directory = config.gcks.relay_directory.directory();
        assert_eq!(directory.relays.len(), 2);
        assert_eq!(directory.relays[1].id, 2);
        assert_eq!(
            directory.relays[0].resync,
            vec![ResyncEndpoint {
                protocol: ResyncProtocol::Tcp,
                addr: "192.0.2.7:7404".parse().unwrap(),
            }]
        );
        let again = ServerConfig::from_toml_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(again.gcks.relay_directory, config.gcks.relay_directory);
        // Two relays of one number cannot both be named in directives.
        let twice = text.replace("id = 2", "id = 1");
        invalid(
            ServerConfig::from_toml_str(&twice),
            "gcks.relay_directory.relays[1].id",
        );
    }

    #[test]
    fn an_ipv6_group_without_bind_says_the_default_is_ipv4_and_what_to_set() {
        let member = MemberConfig::from_toml_str(
            "[member.multicast]\ngroup = \"[ff15::7]:7400\"\ninterface = \"2\"\n\
             [member.receiver]\nfeedback_addr = \"[fd00::1]:7401\"\n",
        );
        let relay = RelayConfig::from_toml_str(
            "[relay.upstream]\ngroup = \"[ff15::7]:7400\"\ninterface = \"2\"\n\
             [relay.downstream]\ngroup = \"[ff15::8]:7400\"\ninterface = \"2\"\n\
             [relay.session.upstream]\nfeedback_addr = \"[fd00::1]:7401\"\n",
        );
        for message in [
            invalid(member, "member.bind"),
            invalid(relay, "relay.upstream_bind"),
        ] {
            assert!(
                message.contains("IPv4") && message.contains("[::]"),
                "{message}"
            );
        }
    }

    #[test]
    fn options_reach_the_library_configurations() {
        let server = ServerConfig::from_toml_str(
            "[gcks]\ngroup_id = 9\nspi = 4\nbatch_interval_ms = 250\nmax_batch = 7\n\
             [gcks.multicast]\ngroup = \"[ff15::77]:7400\"\ninterface = \"3\"\n\
             [gcks.sender]\nsend_rate = 5000\nheartbeat_max_ms = 2000\n\
             [gcks.sender.grtt]\ninitial_ms = 30\n\
             [gcks.message]\nsymbol_size = 1100\nchunk_auth = \"merkle_path\"\n\
             [gcks.resync_limits]\nmax_connections = 12\nmax_connections_per_source = 3\n\
             idle_timeout_ms = 900\nmax_output_bytes = 65536\n",
        );
        // The default bind is IPv4: an IPv6 group needs an IPv6 one.
        invalid(server, "gcks.bind");
        let server = ServerConfig::from_toml_str(
            "[gcks]\ngroup_id = 9\nspi = 4\nbatch_interval_ms = 250\nmax_batch = 7\n\
             bind = \"[::]:7401\"\n\
             [gcks.multicast]\ngroup = \"[ff15::77]:7400\"\ninterface = \"3\"\n\
             [gcks.sender]\nsend_rate = 5000\nheartbeat_max_ms = 2000\n\
             [gcks.sender.grtt]\ninitial_ms = 30\n\
             [gcks.message]\nsymbol_size = 1100\nchunk_auth = \"merkle_path\"\n\
             [gcks.resync_limits]\nmax_connections = 12\nmax_connections_per_source = 3\n\
             idle_timeout_ms = 900\nmax_output_bytes = 65536\n",
        )
        .unwrap();
        let gcks = &server.gcks;
        assert_eq!((gcks.group_id, gcks.spi, gcks.max_batch), (9, 4, 7));
        assert_eq!(gcks.batch_interval, Duration::from_millis(250));
        assert_eq!(
            gcks.multicast.interface,
            rekeycast::io::socket::Interface::V6(3)
        );
        assert_eq!(gcks.sender.send_rate, 5000.0);
        assert_eq!(gcks.sender.heartbeat_max, Duration::from_secs(2));
        assert_eq!(gcks.sender.grtt.initial, Duration::from_millis(30));
        assert_eq!(gcks.message.symbol_size, 1100);
        assert_eq!(
            gcks.message.chunk_auth,
            rekeycast::session::manifest::ChunkAuth::MerklePath
        );
        let limits = &gcks.resync_limits;
        assert_eq!(limits.max_connections, 12);
        assert_eq!(limits.max_connections_per_source, 3);
        assert_eq!(limits.idle_timeout, Duration::from_millis(900));
        assert_eq!(limits.max_output_bytes, 65536);

        let member = MemberConfig::from_toml_str(
            "[member]\ngroup_id = 5\nbind = \"127.0.0.7:0\"\n\
             resync_endpoints = [\"tcp://127.0.0.1:9001\", \"http://[::1]:80\"]\n\
             [member.receiver]\nfeedback_addr = \"198.18.0.1:9000\"\n\
             state_check_interval_ms = 250\n\
             [member.receiver.scheduler]\nmax_rounds = 7\n",
        )
        .unwrap();
        let engine = member.engine_config();
        assert_eq!(engine.group_id, Some(5));
        assert_eq!(engine.bind, "127.0.0.7:0".parse().unwrap());
        assert_eq!(engine.resync_endpoints.len(), 2);
        assert_eq!(
            engine.receiver.feedback_addr,
            "198.18.0.1:9000".parse().unwrap()
        );
        assert_eq!(engine.receiver.scheduler.max_rounds, 7);
        assert_eq!(
            engine.receiver.state_check_interval,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn a_member_scheduler_seed_is_drawn_unless_given() {
        let member =
            MemberConfig::from_toml_str(&format!("[member]\nseed = 42\n{MEMBER}")).unwrap();
        assert_eq!(member.engine_config().receiver.scheduler.seed, 42);
        let member = MemberConfig::from_toml_str(&format!(
            "{MEMBER}[member.receiver.scheduler]\nseed = 7\n"
        ))
        .unwrap();
        assert_eq!(member.engine_config().receiver.scheduler.seed, 7);
        let member = MemberConfig::from_toml_str(MEMBER).unwrap();
        let seeds: Vec<u64> = (0..4)
            .map(|_| member.engine_config().receiver.scheduler.seed)
            .collect();
        assert!(seeds.iter().any(|&seed| seed != seeds[0]), "{seeds:?}");
    }

    #[test]
    fn relay_upstream_relays_and_gcks_endpoints_are_separate() {
        let relay = RelayConfig::from_toml_str(&format!(
            "{RELAY}[relay.resync]\nrelays = [\"tcp://198.18.0.2:7412\"]\n\
             gcks = [\"tcp://198.18.0.1:7402\", \"http://198.18.0.1:7403\"]\n\
             fetch_timeout_ms = 2000\nrounds = 3\n"
        ))
        .unwrap();
        let engine = relay.engine_config();
        assert_eq!(
            engine.resync.relays,
            vec![ResyncEndpoint {
                protocol: ResyncProtocol::Tcp,
                addr: "198.18.0.2:7412".parse().unwrap(),
            }]
        );
        assert_eq!(
            engine.resync.gcks,
            vec![
                ResyncEndpoint {
                    protocol: ResyncProtocol::Tcp,
                    addr: "198.18.0.1:7402".parse().unwrap(),
                },
                ResyncEndpoint {
                    protocol: ResyncProtocol::Http,
                    addr: "198.18.0.1:7403".parse().unwrap(),
                },
            ]
        );
        assert_eq!(engine.resync.fetch_timeout, Duration::from_secs(2));
        assert_eq!(engine.resync.rounds, 3);
        assert_eq!(
            engine.state_dir,
            Some(PathBuf::from(DEFAULT_RELAY_STATE_DIR))
        );
        assert_ne!(engine.session.upstream.scheduler.seed, 0);
    }

    #[test]
    fn syntax_error_keeps_line_and_column() {
        let error = ServerConfig::from_toml_str("[gcks]\ngroup_id = 1\nspi = = 3\n").unwrap_err();
        let ConfigError::Syntax { line, column, .. } = &error else {
            panic!("expected a syntax error, got {error}");
        };
        assert_eq!(*line, Some(3));
        assert!(column.is_some());
        assert!(error.to_string().contains("line 3"), "{error}");
    }

    #[test]
    fn unknown_options_are_errors_naming_them() {
        for (text, key) in [
            ("[gcks]\nmax_batchh = 3\n", "max_batchh"),
            ("[gcks.sender]\nsend_rat = 5.0\n", "send_rat"),
            (
                "[gcks.resync_limits]\nmax_conections = 3\n",
                "max_conections",
            ),
            (
                "[gcks.multicast]\ngroup = \"239.1.1.1:1\"\nttll = 3\n",
                "ttll",
            ),
            ("[group]\nmulticast = \"239.1.1.1:1\"\n", "group"),
            ("feedback_listen = \"0.0.0.0:7401\"\n", "feedback_listen"),
        ] {
            let error = ServerConfig::from_toml_str(text).unwrap_err();
            assert!(
                matches!(error, ConfigError::Syntax { .. }),
                "{text}: {error}"
            );
            assert!(error.to_string().contains(&format!("`{key}`")), "{error}");
        }
        let error = MemberConfig::from_toml_str("bundel = \"b\"\n").unwrap_err();
        assert!(error.to_string().contains("`bundel`"), "{error}");
        let error = MemberConfig::from_toml_str(&format!(
            "{MEMBER}[member.receiver.scheduler]\nrounds = 1\n"
        ))
        .unwrap_err();
        assert!(error.to_string().contains("`rounds`"), "{error}");
        let error = RelayConfig::from_toml_str("[relay.resync]\ngks = []\n").unwrap_err();
        assert!(error.to_string().contains("`gks`"), "{error}");
    }

    #[test]
    fn wrong_types_and_bad_endpoints_are_syntax_errors() {
        let error = ServerConfig::from_toml_str("[gcks.sender]\n\nburst = \"lots\"\n").unwrap_err();
        assert!(
            matches!(error, ConfigError::Syntax { line: Some(3), .. }),
            "{error}"
        );
        let error =
            RelayConfig::from_toml_str("[relay.resync]\ngcks = [\"ftp://x:1\"]\n").unwrap_err();
        assert!(error.to_string().contains("ftp://x:1"), "{error}");
        let error = MemberConfig::from_toml_str("[member]\nresync_endpoints = [\"udp://h:1\"]\n")
            .unwrap_err();
        assert!(error.to_string().contains("udp://h:1"), "{error}");
        let error = ServerConfig::from_toml_str(
            "[gcks.multicast]\ngroup = \"239.1.1.1:1\"\ninterface = \"eth0\"\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("eth0"), "{error}");
    }

    #[test]
    fn each_library_rule_is_named_by_its_path() {
        for (text, field) in [
            ("[gcks.sender]\nsend_rate = -5.0\n", "gcks.sender.send_rate"),
            (
                "[gcks.sender]\nheartbeat_min_ms = 0\n",
                "gcks.sender.heartbeat_min_ms",
            ),
            (
                "[gcks.sender]\nhistory = 4\nrepair_window = 5\n",
                "gcks.sender.repair_window",
            ),
            (
                "[gcks.sender.grtt]\ninitial_ms = 0\n",
                "gcks.sender.grtt.initial_ms",
            ),
            (
                "[gcks.message]\nsymbol_size = 1500\n",
                "gcks.message.symbol_size",
            ),
            ("[gcks]\nbatch_interval_ms = 0\n", "gcks.batch_interval_ms"),
            ("[gcks]\nmax_batch = 0\n", "gcks.max_batch"),
            ("[gcks]\nstate_dir = \"\"\n", "gcks.state_dir"),
            (
                "[gcks]\nresync_tcp = \"0.0.0.0:7402\"\nresync_http = \"0.0.0.0:7402\"\n",
                "gcks.resync_http",
            ),
            (
                "[gcks.resync_limits]\nmax_connections = 0\n",
                "gcks.resync_limits.max_connections",
            ),
            (
                "[gcks.resync_limits]\nidle_timeout_ms = 0\n",
                "gcks.resync_limits.idle_timeout_ms",
            ),
            (
                "[gcks.feedback_limit]\ndatagrams_per_second = 0.0\n",
                "gcks.feedback_limit.datagrams_per_second",
            ),
            (
                "[gcks.multicast]\ngroup = \"10.0.0.1:7400\"\n",
                "gcks.multicast.group",
            ),
            (
                "[gcks.unicast_relays]\nunicast_only = true\n",
                "gcks.unicast_relays.relays",
            ),
            (
                "[gcks.unicast_relays]\nrelays = [\"192.0.2.7:7402\", \"192.0.2.7:7402\"]\n",
                "gcks.unicast_relays.relays",
            ),
            (
                "[gcks.unicast_relays]\nrelays = [\"[2001:db8::7]:7402\"]\n",
                "gcks.unicast_relays.relays",
            ),
            (
                "[gcks.multicast]\ngroup = \"239.1.1.1:7400\"\nttl = 256\n",
                "gcks.multicast.ttl",
            ),
            ("admin_socket = \"\"\n", "admin_socket"),
        ] {
            invalid(ServerConfig::from_toml_str(text), field);
        }
        let long = format!("admin_socket = \"/run/{}/admin.sock\"\n", "x".repeat(120));
        invalid(ServerConfig::from_toml_str(&long), "admin_socket");

        invalid(
            MemberConfig::from_toml_str(""),
            "member.receiver.feedback_addr",
        );
        for (text, field) in [
            (
                "[member.receiver]\nfeedback_addr = \"239.1.1.1:7401\"\n",
                "member.receiver.feedback_addr",
            ),
            (
                "[member.receiver]\nfeedback_addr = \"127.0.0.1:7401\"\nstate_check_interval_ms = 0\n",
                "member.receiver.state_check_interval_ms",
            ),
            (
                "[member.receiver]\nfeedback_addr = \"127.0.0.1:7401\"\n\
                 [member.receiver.scheduler]\nmax_rounds = 0\n",
                "member.receiver.scheduler.max_rounds",
            ),
            (
                "[member]\nresync_attempts = 0\n[member.receiver]\nfeedback_addr = \"127.0.0.1:1\"\n",
                "member.resync_attempts",
            ),
            (
                "[member]\nbind = \"[::]:0\"\n[member.receiver]\nfeedback_addr = \"127.0.0.1:1\"\n",
                "member.bind",
            ),
            (
                "bundle = \"\"\n[member.receiver]\nfeedback_addr = \"127.0.0.1:1\"\n",
                "bundle",
            ),
        ] {
            invalid(MemberConfig::from_toml_str(text), field);
        }

        invalid(
            RelayConfig::from_toml_str(""),
            "relay.session.upstream.feedback_addr",
        );
        for (text, field) in [
            (
                "[relay.downstream]\ngroup = \"239.255.77.1:7400\"\n",
                "relay.downstream.group",
            ),
            (
                "[relay.session]\ndownstream_group_size = 0\n",
                "relay.session.downstream_group_size",
            ),
            (
                "[relay.session.downstream]\nhistory = 0\n",
                "relay.session.downstream.history",
            ),
            (
                "[relay.session.upstream]\nfeedback_addr = \"127.0.0.1:7401\"\n\
                 silence_timeout_ms = 0\n",
                "relay.session.upstream.silence_timeout_ms",
            ),
            ("[relay.resync]\nrounds = 0\n", "relay.resync.rounds"),
            (
                "[relay.resync]\nfetch_timeout_ms = 0\n",
                "relay.resync.fetch_timeout_ms",
            ),
            (
                "[relay.resync_limits]\nmax_connections = 0\n",
                "relay.resync_limits.max_connections",
            ),
            ("[relay]\nstate_dir = \"\"\n", "relay.state_dir"),
            ("[relay]\nupstream_unicast = true\n", "relay.upstream_bind"),
            (
                "[relay]\nupstream_unicast = true\nupstream_bind = \"[::]:7402\"\n",
                "relay.upstream_bind",
            ),
            (
                "[relay.session.unicast_relays]\nrelays = [\"0.0.0.0:7402\"]\n",
                "relay.session.unicast_relays.relays",
            ),
        ] {
            // The feedback address given, so that the rule named is the one tested.
            let text = if text.contains("feedback_addr") {
                text.to_string()
            } else {
                format!("{text}{RELAY}")
            };
            invalid(RelayConfig::from_toml_str(&text), field);
        }
    }

    #[test]
    fn load_reads_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "[gcks]\ngroup_id = 7\n").unwrap();
        assert_eq!(ServerConfig::load(&path).unwrap().gcks.group_id, 7);
        std::fs::write(&path, "[gcks.sender]\nsend_rate = -5\n").unwrap();
        let error = ServerConfig::load(&path).unwrap_err();
        assert_eq!(
            error.to_string(),
            "gcks.sender.send_rate: must be positive and finite"
        );
        let missing = dir.path().join("missing.toml");
        let error = MemberConfig::load(&missing).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }));
        assert!(error.to_string().contains("missing.toml"), "{error}");
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("a\nbc", 3), (2, 2));
        assert_eq!(line_column("é\né", 5), (2, 2));
        assert_eq!(line_column("é\né", 4), (2, 1));
        assert_eq!(line_column("ab", 99), (1, 3));
    }
}
