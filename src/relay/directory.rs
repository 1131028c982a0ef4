//! The relay list a GCKS hands its members: [`RelayDirectoryConfig`], the configuration-file
//! form of the relays (and the GCKS's own contact) that registration bundles list, in the order
//! a member fails over between them.
//!
//! A GCKS configured with one ([`crate::gcks::GcksConfig::relay_directory`]) assigns each
//! joining member to its least-loaded relay and writes the member's directory into its
//! registration bundle (see [`rekeycast_proto::endpoint::gcks::assignment`]); a member started
//! from that bundle listens to its first relay's group and moves to the next one when that
//! relay goes silent (see [`rekeycast_proto::endpoint::failover`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::InvalidConfig;
use crate::io::resync_client::Endpoint;
use crate::lkh::bundle::{MAX_CONTACT_RESYNC, MAX_DIRECTORY_RELAYS};
use crate::lkh::{RelayContact, RelayDirectory};
use rekeycast_proto::endpoint::{ResyncEndpoint, ResyncProtocol};

/// One contact of a [`RelayDirectoryConfig`]: a relay, or the GCKS itself.
///
/// In a configuration file a table: `id = 1`, `group = "239.255.77.2:7400"`,
/// `feedback = "192.0.2.7:7403"`, `resync = ["tcp://192.0.2.7:7404"]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayContactConfig {
    /// The relay's number (what the GCKS's relay directives name it by; distinct, not 0). The
    /// GCKS's own contact's is ignored (it is 0).
    #[serde(default)]
    pub id: u16,
    /// The multicast group the contact sends its rekeys into (its downstream group).
    pub group: SocketAddr,
    /// Where members send it their NACKs and probe replies (its downstream bind).
    pub feedback: SocketAddr,
    /// Its resync endpoints, in order (`"tcp://HOST:PORT"`, `"http://HOST:PORT"`).
    #[serde(default, with = "crate::config::endpoint_list")]
    pub resync: Vec<Endpoint>,
}

impl RelayContactConfig {
    /// The contact as a registration bundle carries it, numbered `id`.
    fn contact(&self, id: u16) -> RelayContact {
        RelayContact {
            id,
            group: self.group,
            feedback: self.feedback,
            resync: self.resync.iter().map(resync_endpoint).collect(),
        }
    }
}

/// The relays a GCKS assigns its members to, and its own contact as their last resort. Empty
/// (the default): bundles list no relay and members never fail over.
///
/// In a configuration file the table `[gcks.relay_directory]` with `[[gcks.relay_directory.relays]]`
/// entries and an optional `[gcks.relay_directory.gcks]` contact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayDirectoryConfig {
    /// The relays, in number order of no importance (the GCKS orders each member's list).
    pub relays: Vec<RelayContactConfig>,
    /// The GCKS's own contact (its group, feedback address and resync endpoints as members
    /// reach them), listed after the relays; `None`: members fail over between relays only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gcks: Option<RelayContactConfig>,
}

impl RelayDirectoryConfig {
    /// Whether it lists nothing.
    pub fn is_empty(&self) -> bool {
        self.relays.is_empty() && self.gcks.is_none()
    }

    /// The relays' contacts and the GCKS's, as bundles carry them.
    pub fn contacts(&self) -> (Vec<RelayContact>, Option<RelayContact>) {
        let relays = self.relays.iter().map(|r| r.contact(r.id)).collect();
        let gcks = self.gcks.as_ref().map(|g| g.contact(0));
        (relays, gcks)
    }

    /// Checks it, naming the first field (under `prefix`) that breaks a rule: at most
    /// [`MAX_DIRECTORY_RELAYS`] relays with distinct non-zero numbers, multicast groups, and
    /// at most [`MAX_CONTACT_RESYNC`] resync endpoints per contact.
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidConfig> {
        let field = |name: &str| format!("{prefix}.{name}");
        if self.relays.len() > MAX_DIRECTORY_RELAYS {
            return Err(InvalidConfig::new(
                field("relays"),
                "lists more relays than a registration bundle carries (64)",
            ));
        }
        let mut ids = std::collections::BTreeSet::new();
        for (index, relay) in self.relays.iter().enumerate() {
            if relay.id == 0 {
                return Err(InvalidConfig::new(
                    field(&format!("relays[{index}].id")),
                    "must not be 0 (the GCKS's own number)",
                ));
            }
            if !ids.insert(relay.id) {
                return Err(InvalidConfig::new(
                    field(&format!("relays[{index}].id")),
                    "numbers another relay too",
                ));
            }
        }
        let contacts = self
            .relays
            .iter()
            .enumerate()
            .map(|(index, contact)| (format!("relays[{index}]"), contact))
            .chain(
                self.gcks
                    .iter()
                    .map(|contact| ("gcks".to_string(), contact)),
            );
        for (name, contact) in contacts {
            if !contact.group.ip().is_multicast() {
                return Err(InvalidConfig::new(
                    field(&format!("{name}.group")),
                    "must be a multicast address",
                ));
            }
            if contact.resync.len() > MAX_CONTACT_RESYNC {
                return Err(InvalidConfig::new(
                    field(&format!("{name}.resync")),
                    "lists more resync endpoints than a registration bundle carries",
                ));
            }
        }
        Ok(())
    }

    /// The directory a bundle would carry with every relay in number order: for checks.
    pub fn directory(&self) -> RelayDirectory {
        let (relays, gcks) = self.contacts();
        RelayDirectory { relays, gcks }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(id: u16) -> RelayContactConfig {
        RelayContactConfig {
            id,
            group: format!("239.1.1.{id}:7400").parse().unwrap(),
            feedback: format!("192.0.2.{id}:7403").parse().unwrap(),
            resync: vec![format!("tcp://192.0.2.{id}:7404").parse().unwrap()],
        }
    }

    #[test]
    fn a_directory_reads_from_a_table_and_becomes_bundle_contacts() {
        let text = r#"{
            "relays": [{
                "id": 2,
                "group": "239.1.1.2:7400",
                "feedback": "192.0.2.2:7403",
                "resync": ["tcp://192.0.2.2:7404", "http://192.0.2.2:7405"]
            }],
            "gcks": {"group": "239.1.1.9:7400", "feedback": "192.0.2.9:7401"}
        }"#;
        let config: RelayDirectoryConfig = serde_json::from_str(text).expect("parses");
        config.validate("relay_directory").expect("valid");
        let (relays, gcks) = config.contacts();
        assert_eq!(relays.len(), 1);
        assert_eq!(relays[0].id, 2);
        assert_eq!(relays[0].resync.len(), 2);
        assert_eq!(relays[0].resync[1].protocol, ResyncProtocol::Http);
        assert_eq!(gcks.map(|g| g.id), Some(0));
        let back: RelayDirectoryConfig =
            serde_json::from_str(&serde_json::to_string(&config).expect("writes")).expect("reads");
        assert_eq!(back, config);
    }

    #[test]
    fn invalid_directories_name_the_field() {
        let cases = [
            (
                RelayDirectoryConfig {
                    relays: vec![relay(1), relay(1)],
                    gcks: None,
                },
                "relay_directory.relays[1].id",
            ),
            (
                RelayDirectoryConfig {
                    relays: vec![relay(0)],
                    gcks: None,
                },
                "relay_directory.relays[0].id",
            ),
            (
                RelayDirectoryConfig {
                    relays: vec![RelayContactConfig {
                        group: "192.0.2.1:7400".parse().unwrap(),
                        ..relay(1)
                    }],
                    gcks: None,
                },
                "relay_directory.relays[0].group",
            ),
        ];
        for (config, field) in cases {
            let error = config.validate("relay_directory").expect_err(field);
            assert_eq!(error.field, field);
        }
    }
}
