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
pub(crate) fn check_multicast(prefix: &str, multicast: &MulticastConfig) -> Result<(), InvalidConfig> {
    let group = multicast.group;
    if !group.ip().is_multicast() {
        return Err(InvalidConfig::new(
            join(prefix, "group"),
            "must be a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8)",
        ));
    }
    if group.port() == 0 {
        return Err(InvalidConfig::new(join(prefix, "group"), "the port must not be 0"));
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
    if multicast.source.is_some_and(|source| source.is_ipv4() != group.is_ipv4()) {
        return Err(InvalidConfig::new(
            join(prefix, "source"),
            "must be of the group's address family",
        ));
    }
    if multicast.ttl > 255 {
        return Err(InvalidConfig::new(join(prefix, "ttl"), "must be at most 255"));
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
            "must be of the multicast group's address family",
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
        return Err(InvalidConfig::new(join(prefix, "burst"), "must be at least 1"));
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
    use super::*;

    #[test]
    fn paths_name_nested_fields_by_their_file_keys() {
        let mut sender = crate::session::SenderConfig::default();
        sender.heartbeat_min = std::time::Duration::ZERO;
        let error = check_sender("sender", &sender).unwrap_err();
        assert_eq!(error.field, "sender.heartbeat_min_ms");
        assert_eq!(error.to_string(), "sender.heartbeat_min_ms: must not be 0");
        let mut sender = crate::session::SenderConfig::default();
        sender.grtt.initial = std::time::Duration::ZERO;
        let error = check_sender("sender", &sender).unwrap_err();
        assert_eq!(error.field, "sender.grtt.initial_ms");
        assert_eq!(error.within("gcks").field, "gcks.sender.grtt.initial_ms");
    }
}
