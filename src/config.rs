//! What the engines' configurations share: [`InvalidConfig`], the one error of their
//! `validate()` methods ([`crate::GcksConfig::validate`], [`crate::MemberConfig::validate`],
//! [`crate::RelayEngineConfig::validate`]), naming the field by its path in a configuration
//! file (`sender.heartbeat_min_ms`) and the rule it breaks.
//!
//! The configurations themselves deserialize from configuration files' tables (serde): every
//! field may be left out (its production default), durations are whole milliseconds in fields
//! named `*_ms`, nested configurations are tables, and a key that is not a field is an error.
//! Reading files is the embedding program's business (the `rekeycast-cli` crate's for the
//! binaries); this module opens nothing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::engine::driver::FeedbackLimit;
use crate::io::socket::{Interface, MulticastConfig};

/// A configuration field out of its valid range: which one, by its path in a configuration
/// file (`sender.send_rate`, `receiver.scheduler.max_rounds`, `resync_limits.idle_timeout_ms`),
/// and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
#[non_exhaustive]
pub struct InvalidConfig {
    /// The field's dotted path, as a configuration file writes it.
    pub field: String,
    /// The rule it breaks.
    pub rule: &'static str,
}

impl InvalidConfig {
    /// The field `field` (a path relative to the configuration checked) breaks `rule`.
    pub fn new(field: impl Into<String>, rule: &'static str) -> Self {
        Self {
            field: field.into(),
            rule,
        }
    }

    /// The same error for a configuration nested under `section` (`"gcks"`, `"member"`): the
    /// path gains it as a prefix.
    #[must_use]
    pub fn within(self, section: &str) -> Self {
        Self {
            field: join(section, &self.field),
            rule: self.rule,
        }
    }

    /// A sans-IO configuration's error ([`crate::session::ConfigError`]) for the configuration
    /// at `prefix` (empty: at the root).
    pub(crate) fn session(prefix: &str, error: crate::session::ConfigError) -> Self {
        let (field, rule) = match error {
            crate::session::ConfigError::Invalid { field, reason } => (field, reason),
            crate::session::ConfigError::Nack(rekeycast_nack::ConfigError::Invalid {
                field,
                reason,
            }) => (field, reason),
            // A kind of error added later: the configuration as a whole.
            _ => return Self::new(prefix, "is invalid"),
        };
        Self::new(join(prefix, file_key(field)), rule)
    }

    /// The resync limits' error for the limits at `prefix`.
    pub(crate) fn limits(prefix: &str, error: crate::resync::limits::LimitsError) -> Self {
        match error {
            crate::resync::limits::LimitsError::Invalid { field, reason, .. } => {
                Self::new(join(prefix, file_key(field)), reason)
            }
            _ => Self::new(prefix, "is invalid"),
        }
    }
}

/// Checks a sender session's configuration at `prefix` (its nested tables first, so that the
/// path names them), and that its datagrams can hold the configured FEC symbols of
/// `symbol_size` bytes when given.
pub(crate) fn check_sender(
    prefix: &str,
    sender: &crate::session::SenderConfig,
) -> Result<(), InvalidConfig> {
    let nested = |name: &str| join(prefix, name);
    sender
        .grtt
        .validate()
        .map_err(|error| InvalidConfig::session(&nested("grtt"), error.into()))?;
    sender
        .aggregator
        .validate()
        .map_err(|error| InvalidConfig::session(&nested("aggregator"), error.into()))?;
    sender
        .proactive
        .validate()
        .map_err(|error| InvalidConfig::session(&nested("proactive"), error.into()))?;
    sender
        .validate()
        .map_err(|error| InvalidConfig::session(prefix, error))
}

/// Checks the unicast relays at `prefix` ([`crate::relay::uplink::UnicastRelays`]): the
/// list's own rules, and addresses of the family of `bind` (the socket they are sent from).
pub(crate) fn check_unicast_relays(
    prefix: &str,
    relays: &crate::relay::uplink::UnicastRelays,
    bind: SocketAddr,
) -> Result<(), InvalidConfig> {
    relays
        .validate()
        .map_err(|error| InvalidConfig::session(prefix, error))?;
    if relays
        .relays
        .iter()
        .any(|relay| relay.is_ipv4() != bind.is_ipv4())
    {
        return Err(InvalidConfig::new(
            join(prefix, "relays"),
            "must be of the sending socket's address family (its bind address)",
        ));
    }
    Ok(())
}

/// Checks a receiver session's configuration at `prefix`: its scheduler's table, its own
/// fields, and a feedback address that can be sent to (a unicast address with a port).
pub(crate) fn check_receiver(
    prefix: &str,
    receiver: &crate::session::ReceiverConfig,
) -> Result<(), InvalidConfig> {
    receiver
        .scheduler
        .validate()
        .map_err(|error| InvalidConfig::session(&join(prefix, "scheduler"), error.into()))?;
    receiver
        .validate()
        .map_err(|error| InvalidConfig::session(prefix, error))?;
    let feedback = receiver.feedback_addr;
    if feedback.port() == 0 || feedback.ip().is_unspecified() || feedback.ip().is_multicast() {
        return Err(InvalidConfig::new(
            join(prefix, "feedback_addr"),
            "must be the sender's (or relay's) unicast address, with a port",
        ));
    }
    Ok(())
}

/// Checks multicast socket settings at `prefix`: a multicast group with a port, an interface
/// and a source of the group's address family, a TTL of at most 255.
pub(crate) fn check_multicast(
    prefix: &str,
    multicast: &MulticastConfig,
) -> Result<(), InvalidConfig> {
    let group = multicast.group;
    if !group.ip().is_multicast() {
        return Err(InvalidConfig::new(
            join(prefix, "group"),
            "must be a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8)",
        ));
    }
    if group.port() == 0 {
        return Err(InvalidConfig::new(
            join(prefix, "group"),
            "the port must not be 0",
        ));
    }
    let family_ok = match multicast.interface {
        Interface::V4(_) => group.is_ipv4(),
        Interface::V6(_) => group.is_ipv6(),
        _ => true,
    };
    if !family_ok {
        return Err(InvalidConfig::new(
            join(prefix, "interface"),
            "must be of the group's address family (an IPv4 address for an IPv4 group, an \
             interface index for an IPv6 group)",
        ));
    }
    if multicast
        .source
        .is_some_and(|source| source.is_ipv4() != group.is_ipv4())
    {
        return Err(InvalidConfig::new(
            join(prefix, "source"),
            "must be of the group's address family",
        ));
    }
    if multicast.ttl > 255 {
        return Err(InvalidConfig::new(
            join(prefix, "ttl"),
            "must be at most 255",
        ));
    }
    Ok(())
}

/// Checks that `bind` is of the address family of `group` (a socket bound to one cannot send
/// to the other).
pub(crate) fn check_bind(
    field: &str,
    bind: SocketAddr,
    group: SocketAddr,
) -> Result<(), InvalidConfig> {
    if bind.is_ipv4() == group.is_ipv4() {
        Ok(())
    } else {
        Err(InvalidConfig::new(
            field,
            "must be of the multicast group's address family (its default in configuration \
             files is IPv4, 0.0.0.0: an IPv6 group needs an IPv6 address here, such as [::] \
             with the port wanted)",
        ))
    }
}

/// Checks that two listen addresses, when both set, differ.
pub(crate) fn check_listeners(
    tcp: Option<SocketAddr>,
    http: Option<SocketAddr>,
    http_field: &str,
) -> Result<(), InvalidConfig> {
    match (tcp, http) {
        (Some(tcp), Some(http)) if tcp == http && tcp.port() != 0 => Err(InvalidConfig::new(
            http_field,
            "must differ from the TCP resync endpoint's address",
        )),
        _ => Ok(()),
    }
}

/// Checks a per-source feedback limit at `prefix`.
pub(crate) fn check_feedback_limit(
    prefix: &str,
    limit: Option<&crate::engine::driver::FeedbackLimit>,
) -> Result<(), InvalidConfig> {
    let Some(limit) = limit else {
        return Ok(());
    };
    if !(limit.datagrams_per_second.is_finite() && limit.datagrams_per_second > 0.0) {
        return Err(InvalidConfig::new(
            join(prefix, "datagrams_per_second"),
            "must be positive and finite",
        ));
    }
    if limit.burst == 0 {
        return Err(InvalidConfig::new(
            join(prefix, "burst"),
            "must be at least 1",
        ));
    }
    Ok(())
}

/// Serde's form of [`MulticastConfig`]: a table whose `group` must be given; the other fields
/// default as in [`MulticastConfig::new`]; `interface` is written as for [`Interface`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MulticastForm {
    group: SocketAddr,
    #[serde(default)]
    interface: Interface,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<IpAddr>,
    #[serde(default = "multicast_defaults::ttl")]
    ttl: u32,
    #[serde(default)]
    loopback: bool,
    #[serde(default = "multicast_defaults::yes")]
    reuse_address: bool,
    #[serde(default = "multicast_defaults::yes")]
    reuse_port: bool,
    #[serde(default = "multicast_defaults::recv_buffer_bytes")]
    recv_buffer_bytes: usize,
    #[serde(default = "multicast_defaults::send_buffer_bytes")]
    send_buffer_bytes: usize,
    #[serde(default = "multicast_defaults::yes")]
    use_gso: bool,
}

mod multicast_defaults {
    pub(super) fn ttl() -> u32 {
        crate::io::socket::DEFAULT_TTL
    }
    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn recv_buffer_bytes() -> usize {
        crate::io::socket::DEFAULT_RECV_BUFFER_BYTES
    }
    pub(super) fn send_buffer_bytes() -> usize {
        crate::io::socket::DEFAULT_SEND_BUFFER_BYTES
    }
}

/// A configuration file's table of multicast socket settings: `group` (required), the others
/// as in [`MulticastConfig::new`]; a key that is not a field is an error.
impl Serialize for MulticastConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        MulticastForm {
            group: self.group,
            interface: self.interface,
            source: self.source,
            ttl: self.ttl,
            loopback: self.loopback,
            reuse_address: self.reuse_address,
            reuse_port: self.reuse_port,
            recv_buffer_bytes: self.recv_buffer_bytes,
            send_buffer_bytes: self.send_buffer_bytes,
            use_gso: self.use_gso,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for MulticastConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let form = MulticastForm::deserialize(deserializer)?;
        Ok(Self {
            interface: form.interface,
            source: form.source,
            ttl: form.ttl,
            loopback: form.loopback,
            reuse_address: form.reuse_address,
            reuse_port: form.reuse_port,
            recv_buffer_bytes: form.recv_buffer_bytes,
            send_buffer_bytes: form.send_buffer_bytes,
            use_gso: form.use_gso,
            ..Self::new(form.group)
        })
    }
}

/// An interface as a configuration file writes it: `"default"` (the kernel's choice; also
/// `"0.0.0.0"` and `"0"`), an IPv4 interface's address (`"127.0.0.1"`), or an IPv6
/// interface's index (`"3"`).
impl Serialize for Interface {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Interface::V4(address) => serializer.collect_str(address),
            Interface::V6(index) => serializer.collect_str(index),
            _ => serializer.serialize_str("default"),
        }
    }
}

impl<'de> Deserialize<'de> for Interface {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let text = text.trim();
        if text == "default" {
            return Ok(Interface::Default);
        }
        if let Ok(address) = text.parse::<Ipv4Addr>() {
            return Ok(if address.is_unspecified() {
                Interface::Default
            } else {
                Interface::V4(address)
            });
        }
        match text.parse::<u32>() {
            Ok(0) => Ok(Interface::Default),
            Ok(index) => Ok(Interface::V6(index)),
            Err(_) => Err(serde::de::Error::custom(format!(
                "interface {text:?}: not \"default\", an IPv4 address or an IPv6 interface index"
            ))),
        }
    }
}

/// Serde's form of [`FeedbackLimit`]: a table, each field defaulting as in
/// [`FeedbackLimit::default`].
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FeedbackLimitForm {
    datagrams_per_second: f64,
    burst: u32,
}

impl Default for FeedbackLimitForm {
    fn default() -> Self {
        let limit = FeedbackLimit::default();
        Self {
            datagrams_per_second: limit.datagrams_per_second,
            burst: limit.burst,
        }
    }
}

/// A configuration file's table `{ datagrams_per_second, burst }`.
impl Serialize for FeedbackLimit {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        FeedbackLimitForm {
            datagrams_per_second: self.datagrams_per_second,
            burst: self.burst,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for FeedbackLimit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let form = FeedbackLimitForm::deserialize(deserializer)?;
        Ok(Self {
            datagrams_per_second: form.datagrams_per_second,
            burst: form.burst,
        })
    }
}

/// Serde's form of a list of the member's resync endpoints: their text forms
/// (`"tcp://HOST:PORT"`, `"http://HOST:PORT"`; host names are resolved when read).
pub(crate) mod endpoint_list {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::io::resync_client::Endpoint;

    pub(crate) fn serialize<S: Serializer>(
        endpoints: &[Endpoint],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let texts: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
        texts.serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Endpoint>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| {
                text.parse().map_err(|_| {
                    serde::de::Error::custom(format!(
                        "resync endpoint {text:?}: not \"tcp://HOST:PORT\" or \"http://HOST:PORT\""
                    ))
                })
            })
            .collect()
    }
}

/// `prefix.field`, or `field` at the root.
fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// The name a configuration file gives the field a library error names: durations are
/// written in whole milliseconds under the field's name with `_ms`.
fn file_key(field: &'static str) -> &'static str {
    match field {
        "heartbeat_min" => "heartbeat_min_ms",
        "heartbeat_max" => "heartbeat_max_ms",
        "initial" => "initial_ms",
        "min" => "min_ms",
        "max" => "max_ms",
        "probe_interval" => "probe_interval_ms",
        "hold_off" => "hold_off_ms",
        "grtt" => "grtt_ms",
        "state_check_interval" => "state_check_interval_ms",
        "silence_timeout" => "silence_timeout_ms",
        "header_timeout" => "header_timeout_ms",
        "idle_timeout" => "idle_timeout_ms",
        "fetch_timeout" => "fetch_timeout_ms",
        "backoff_initial" => "backoff_initial_ms",
        "backoff_max" => "backoff_max_ms",
        "max_spread" => "max_spread_ms",
        "state_check_backoff_initial" => "state_check_backoff_initial_ms",
        "state_check_backoff_max" => "state_check_backoff_max_ms",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use rekeycast_proto::endpoint::resync_policy::ResyncConfig;
    use rekeycast_proto::endpoint::{ResyncEndpoint, ResyncProtocol};

    use super::*;
    use crate::relay::RelayConfig;
    use crate::session::ReceiverConfig;
    use crate::{GcksConfig, MemberConfig, RelayEngineConfig};

    fn json<T: Serialize>(value: &T) -> String {
        serde_json::to_string(value).unwrap()
    }

    /// Serializes, reads back and serializes again: the same text.
    fn round_trip<T: Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
        let text = json(value);
        let again: T = serde_json::from_str(&text).unwrap();
        assert_eq!(json(&again), text);
        again
    }

    /// The error of reading `text` as a `T` names the unknown key `key`.
    fn refuses<T: serde::de::DeserializeOwned>(text: &str, key: &str) {
        let Err(error) = serde_json::from_str::<T>(text) else {
            panic!("{text} was accepted");
        };
        assert!(error.to_string().contains(&format!("`{key}`")), "{error}");
    }

    #[test]
    fn paths_name_nested_fields_by_their_file_keys() {
        let sender = crate::session::SenderConfig {
            heartbeat_min: Duration::ZERO,
            ..crate::session::SenderConfig::default()
        };
        let error = check_sender("sender", &sender).unwrap_err();
        assert_eq!(error.field, "sender.heartbeat_min_ms");
        assert_eq!(error.to_string(), "sender.heartbeat_min_ms: must not be 0");
        let mut sender = crate::session::SenderConfig::default();
        sender.grtt.initial = Duration::ZERO;
        let error = check_sender("sender", &sender).unwrap_err();
        assert_eq!(error.field, "sender.grtt.initial_ms");
        assert_eq!(error.within("gcks").field, "gcks.sender.grtt.initial_ms");
    }

    #[test]
    fn the_engine_configurations_round_trip_and_empty_tables_are_the_defaults() {
        let mut gcks = GcksConfig {
            resync_tcp: Some("127.0.0.1:7402".parse().unwrap()),
            ..GcksConfig::default()
        };
        gcks.resync_limits.max_connections = 9;
        gcks.state_dir = Some("/var/lib/gcks".into());
        gcks.multicast.interface = Interface::V4(Ipv4Addr::LOCALHOST);
        let again = round_trip(&gcks);
        assert_eq!(again.resync_limits.max_connections, 9);
        assert_eq!(again.multicast, gcks.multicast);
        assert_eq!(
            json(&serde_json::from_str::<GcksConfig>("{}").unwrap()),
            json(&GcksConfig::default())
        );

        let member = MemberConfig {
            group_id: Some(4),
            bind: "127.0.0.9:0".parse().unwrap(),
            resync_endpoints: vec![crate::io::resync_client::Endpoint::Tcp(
                "127.0.0.1:7402".parse().unwrap(),
            )],
            ..MemberConfig::default()
        };
        let again = round_trip(&member);
        assert_eq!(again.bind, member.bind);
        assert_eq!(again.resync_endpoints, member.resync_endpoints);
        assert_eq!(
            json(&serde_json::from_str::<MemberConfig>("{}").unwrap()),
            json(&MemberConfig::default())
        );

        let mut relay = RelayEngineConfig::default();
        relay.resync.relays = vec!["tcp://198.18.0.2:7412".parse().unwrap()];
        relay.resync.gcks = vec!["http://198.18.0.1:7403".parse().unwrap()];
        relay.session.downstream_group_size = Some(12);
        let again = round_trip(&relay);
        assert_eq!(again.resync, relay.resync);
        assert_eq!(again.session, relay.session);
        assert_eq!(
            json(&serde_json::from_str::<RelayEngineConfig>("{}").unwrap()),
            json(&RelayEngineConfig::default())
        );

        let receiver = ReceiverConfig::new("127.0.0.1:7401".parse().unwrap());
        assert_eq!(round_trip(&receiver), ReceiverConfig { ..receiver.clone() });
        assert_eq!(
            serde_json::from_str::<ReceiverConfig>("{}").unwrap(),
            ReceiverConfig::default()
        );
        let session = RelayConfig::new("127.0.0.1:7401".parse().unwrap());
        assert_eq!(round_trip(&session), session);
        assert_eq!(
            round_trip(&ResyncConfig::default()),
            ResyncConfig::default()
        );
    }

    #[test]
    fn durations_are_milliseconds_and_endpoints_text() {
        let gcks: GcksConfig =
            serde_json::from_str(r#"{"batch_interval_ms": 250, "admission_delay_ms": 7}"#).unwrap();
        assert_eq!(gcks.batch_interval, Duration::from_millis(250));
        assert_eq!(gcks.admission_delay, Duration::from_millis(7));
        let receiver: ReceiverConfig =
            serde_json::from_str(r#"{"silence_timeout_ms": 900, "scheduler": {"max_rounds": 2}}"#)
                .unwrap();
        assert_eq!(receiver.silence_timeout, Duration::from_millis(900));
        assert_eq!(receiver.scheduler.max_rounds, 2);
        let resync: ResyncConfig = serde_json::from_str(
            r#"{"relays": ["tcp://10.0.0.2:1"], "gcks": ["http://[::1]:80/"]}"#,
        )
        .unwrap();
        assert_eq!(
            resync.relays,
            vec![ResyncEndpoint {
                protocol: ResyncProtocol::Tcp,
                addr: "10.0.0.2:1".parse().unwrap()
            }]
        );
        assert_eq!(resync.gcks[0].addr, "[::1]:80".parse().unwrap());
        assert_eq!(resync.gcks[0].to_string(), "http://[::1]:80");
        for bad in [
            "udp://10.0.0.1:1",
            "tcp://host:1",
            "tcp://10.0.0.1:0",
            "10.0.0.1:1",
        ] {
            assert!(bad.parse::<ResyncEndpoint>().is_err(), "{bad}");
        }
        let multicast: MulticastConfig =
            serde_json::from_str(r#"{"group": "239.1.1.1:7400", "interface": "3"}"#).unwrap();
        assert_eq!(multicast.interface, Interface::V6(3));
        assert_eq!(multicast.ttl, crate::io::socket::DEFAULT_TTL);
        assert!(multicast.use_gso && multicast.reuse_port);
        // A multicast table must name its group.
        assert!(serde_json::from_str::<MulticastConfig>(r#"{"ttl": 2}"#).is_err());
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        refuses::<GcksConfig>(r#"{"max_batchh": 1}"#, "max_batchh");
        refuses::<GcksConfig>(
            r#"{"resync_limits": {"max_conections": 1}}"#,
            "max_conections",
        );
        refuses::<GcksConfig>(r#"{"message": {"spi": 3}}"#, "spi");
        refuses::<GcksConfig>(r#"{"feedback_limit": {"rate": 3}}"#, "rate");
        refuses::<GcksConfig>(
            r#"{"multicast": {"group": "239.1.1.1:1", "tll": 3}}"#,
            "tll",
        );
        refuses::<MemberConfig>(r#"{"receiver": {"feedback": "127.0.0.1:1"}}"#, "feedback");
        refuses::<MemberConfig>(r#"{"receiver": {"limits": {}}}"#, "limits");
        refuses::<RelayEngineConfig>(r#"{"resync": {"gks": []}}"#, "gks");
        refuses::<RelayEngineConfig>(r#"{"session": {"upstream": {"x": 1}}}"#, "x");
        refuses::<RelayConfig>(r#"{"cut_thru": true}"#, "cut_thru");
        refuses::<ResyncConfig>(r#"{"fetch_timeout": 1}"#, "fetch_timeout");
    }

    /// The field `validate` names for the configuration `text` (JSON) of a `T`.
    fn rule<T: serde::de::DeserializeOwned>(
        text: &str,
        validate: impl Fn(&T) -> Result<(), InvalidConfig>,
    ) -> String {
        let config: T = serde_json::from_str(text).unwrap();
        validate(&config).unwrap_err().field
    }

    #[test]
    fn each_gcks_rule_is_named() {
        GcksConfig::default().validate().unwrap();
        let check = |text: &str| rule::<GcksConfig>(text, GcksConfig::validate);
        for (text, field) in [
            (
                r#"{"multicast": {"group": "10.0.0.1:7400"}}"#,
                "multicast.group",
            ),
            (
                r#"{"multicast": {"group": "239.1.1.1:0"}}"#,
                "multicast.group",
            ),
            (
                r#"{"multicast": {"group": "[ff15::1]:7400", "interface": "127.0.0.1"}}"#,
                "multicast.interface",
            ),
            (
                r#"{"multicast": {"group": "239.1.1.1:7400", "ttl": 256}}"#,
                "multicast.ttl",
            ),
            (r#"{"bind": "[::1]:0"}"#, "bind"),
            (r#"{"sender": {"send_rate": 0.0}}"#, "sender.send_rate"),
            (
                r#"{"sender": {"aggregator": {"repair_rate": -1.0}}}"#,
                "sender.aggregator.repair_rate",
            ),
            (r#"{"message": {"symbol_size": 0}}"#, "message.symbol_size"),
            (
                r#"{"message": {"symbol_size": 1430}}"#,
                "message.symbol_size",
            ),
            (
                r#"{"message": {"max_block_symbols": 56404}}"#,
                "message.max_block_symbols",
            ),
            (r#"{"batch_interval_ms": 0}"#, "batch_interval_ms"),
            (r#"{"max_batch": 0}"#, "max_batch"),
            (r#"{"data_sa_lifetime_secs": 0}"#, "data_sa_lifetime_secs"),
            (
                r#"{"lifetimes": {"data_sa_soft_secs": 3600}}"#,
                "lifetimes.data_sa_soft_secs",
            ),
            (
                r#"{"lifetimes": {"data_sa_soft_secs": 0}}"#,
                "lifetimes.data_sa_soft_secs",
            ),
            (
                r#"{"lifetimes": {"group_key": {"soft_secs": 600, "hard_secs": 300}}}"#,
                "lifetimes.group_key",
            ),
            (
                r#"{"lifetimes": {"signing_key": {"soft_secs": 0, "hard_secs": 300}}}"#,
                "lifetimes.signing_key",
            ),
            (
                r#"{"lifetimes": {"timing": {"activation_delay_secs": 5, "deactivation_delay_secs": 2}}}"#,
                "lifetimes.timing.deactivation_delay_secs",
            ),
            (
                r#"{"lifetimes": {"data_sa_soft_secs": 60, "timing": {"activation_delay_secs": 60, "deactivation_delay_secs": 90}}}"#,
                "lifetimes.timing.activation_delay_secs",
            ),
            (
                r#"{"lifetimes": {"timing": {"activation_delay_secs": 5, "deactivation_delay_secs": 3600}}}"#,
                "lifetimes.timing.deactivation_delay_secs",
            ),
            (r#"{"state_dir": ""}"#, "state_dir"),
            (
                r#"{"resync_tcp": "127.0.0.1:9", "resync_http": "127.0.0.1:9"}"#,
                "resync_http",
            ),
            (
                r#"{"resync_limits": {"max_connections_per_source": 0}}"#,
                "resync_limits.max_connections_per_source",
            ),
            (
                r#"{"resync_limits": {"header_timeout_ms": 0}}"#,
                "resync_limits.header_timeout_ms",
            ),
            (
                r#"{"feedback_limit": {"burst": 0}}"#,
                "feedback_limit.burst",
            ),
        ] {
            assert_eq!(check(text), field, "{text}");
        }
    }

    #[test]
    fn each_member_rule_is_named() {
        let feedback = r#""receiver": {"feedback_addr": "127.0.0.1:7401""#;
        let check = |text: &str| rule::<MemberConfig>(text, MemberConfig::validate);
        assert_eq!(check("{}"), "receiver.feedback_addr");
        let ok: MemberConfig = serde_json::from_str(&format!("{{{feedback}}}}}")).unwrap();
        ok.validate().unwrap();
        for (text, field) in [
            (
                r#"{"receiver": {"feedback_addr": "127.0.0.1:0"}}"#.to_string(),
                "receiver.feedback_addr",
            ),
            (
                r#"{"receiver": {"feedback_addr": "239.1.1.1:1"}}"#.to_string(),
                "receiver.feedback_addr",
            ),
            (
                format!("{{{feedback}, \"decode_failure_limit\": 0}}}}"),
                "receiver.decode_failure_limit",
            ),
            (
                format!("{{{feedback}, \"scheduler\": {{\"max_rounds\": 0}}}}}}"),
                "receiver.scheduler.max_rounds",
            ),
            (format!("{{{feedback}}}, \"bind\": \"[::]:0\"}}"), "bind"),
            (
                format!("{{{feedback}}}, \"resync_timeout_ms\": 0}}"),
                "resync_timeout_ms",
            ),
            (
                format!("{{{feedback}}}, \"resync_capacity\": 0.0}}"),
                "resync_capacity",
            ),
            (
                format!("{{{feedback}}}, \"resync_attempts\": 0}}"),
                "resync_attempts",
            ),
            (
                format!("{{{feedback}}}, \"state_file\": \"\"}}"),
                "state_file",
            ),
            (
                format!("{{{feedback}}}, \"key_life\": {{\"soft_lifetime_percent\": 100}}}}"),
                "key_life.soft_lifetime_percent",
            ),
            (
                format!("{{{feedback}}}, \"event_capacity\": 0}}"),
                "event_capacity",
            ),
            (
                format!("{{{feedback}}}, \"multicast\": {{\"group\": \"10.1.1.1:1\"}}}}"),
                "multicast.group",
            ),
        ] {
            assert_eq!(check(&text), field, "{text}");
        }
    }

    #[test]
    fn each_relay_rule_is_named() {
        let upstream = r#""session": {"upstream": {"feedback_addr": "127.0.0.1:7401"}"#;
        let check = |text: &str| rule::<RelayEngineConfig>(text, RelayEngineConfig::validate);
        assert_eq!(check("{}"), "session.upstream.feedback_addr");
        let ok: RelayEngineConfig = serde_json::from_str(&format!("{{{upstream}}}}}")).unwrap();
        ok.validate().unwrap();
        for (text, field) in [
            (
                format!("{{{upstream}, \"downstream_group_size\": 0}}}}"),
                "session.downstream_group_size",
            ),
            (
                format!("{{{upstream}, \"downstream\": {{\"history\": 0}}}}}}"),
                "session.downstream.history",
            ),
            (
                format!(
                    "{{{upstream}, \"downstream\": {{\"grtt\": {{\"probe_interval_ms\": 0}}}}}}}}"
                ),
                "session.downstream.grtt.probe_interval_ms",
            ),
            (
                format!("{{{upstream}}}, \"downstream\": {{\"group\": \"239.255.77.1:7400\"}}}}"),
                "downstream.group",
            ),
            (
                format!("{{{upstream}}}, \"upstream\": {{\"group\": \"10.0.0.1:1\"}}}}"),
                "upstream.group",
            ),
            (
                format!("{{{upstream}}}, \"upstream_bind\": \"[::]:0\"}}"),
                "upstream_bind",
            ),
            (
                format!("{{{upstream}}}, \"downstream_bind\": \"[::]:0\"}}"),
                "downstream_bind",
            ),
            (
                format!("{{{upstream}}}, \"resync\": {{\"rounds\": 0}}}}"),
                "resync.rounds",
            ),
            (
                format!("{{{upstream}}}, \"resync\": {{\"capacity\": -1.0}}}}"),
                "resync.capacity",
            ),
            (
                format!("{{{upstream}}}, \"resync\": {{\"backoff_initial_ms\": 20000}}}}"),
                "resync.backoff_initial_ms",
            ),
            (
                format!("{{{upstream}}}, \"resync_limits\": {{\"max_output_bytes\": 1}}}}"),
                "resync_limits.max_output_bytes",
            ),
            (
                format!("{{{upstream}}}, \"feedback_limit\": {{\"datagrams_per_second\": 0.0}}}}"),
                "feedback_limit.datagrams_per_second",
            ),
            (
                format!("{{{upstream}}}, \"state_dir\": \"\"}}"),
                "state_dir",
            ),
            (
                format!("{{{upstream}}}, \"event_capacity\": 0}}"),
                "event_capacity",
            ),
        ] {
            assert_eq!(check(&text), field, "{text}");
        }
    }
}
