//! Scenario files: what `rekeycast-netns run SCENARIO.toml` builds, does and expects.
//!
//! A scenario names its topology (members of the GCKS, relays and their members, an attacker),
//! the impairments of each tier's switch ports (the switch's own [`Impairment`] type), the rekey
//! schedule with its joins and leaves, the faults to inject, an optional forged flood, and the
//! expected outcome. This module only parses and validates; [`crate::runner`] runs them.
//!
//! ```toml
//! name = "loss_iid_20"
//! seed = 7
//!
//! [topology]
//! members = 20
//!
//! [impairments.members.egress]
//! loss = { model = "iid", p = 0.05 }
//!
//! [schedule]
//! rekeys = 10
//! interval_ms = 600
//!
//! [expect]
//! every_rekey_applied = true
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::impair::Impairment;

/// One scenario, as written in its TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name, used in the report and in the work directory's name.
    pub name: String,
    /// What the scenario shows, printed before it runs.
    #[serde(default)]
    pub description: String,
    /// The seed of the switch's impairments and of the members' NACK backoff.
    #[serde(default)]
    pub seed: u64,
    /// The hosts.
    pub topology: TopologySpec,
    /// The impairments of each tier's switch ports.
    #[serde(default)]
    pub impairments: Impairments,
    /// The rekeys, their pace and the membership changes between them.
    pub schedule: Schedule,
    /// The faults, written `[[fault]]`.
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
    /// A flood of forged datagrams from the attacker host (`[flood]`; needs
    /// `topology.attacker`).
    #[serde(default)]
    pub flood: Option<Flood>,
    /// What must hold at the end; the runner exits non-zero when something does not.
    #[serde(default)]
    pub expect: Expect,
}

/// The hosts of a scenario. Every host has its own namespace and its own switch port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// Members registered with the GCKS and listening to its group directly (hosts `m1`,
    /// `m2`, ...; member ids 1, 2, ...).
    #[serde(default)]
    pub members: u32,
    /// Relays (hosts `r1`, `r2`, ...), each carrying the GCKS's group into a group of its own.
    #[serde(default)]
    pub relays: u32,
    /// Members behind each relay (hosts `r1m1`, ...; member ids from 1001 for relay 1, 2001 for
    /// relay 2, ...), registered with the GCKS, listening to their relay's group.
    #[serde(default)]
    pub members_per_relay: u32,
    /// Whether there is an attacker host (`atk`) on the switch.
    #[serde(default)]
    pub attacker: bool,
    /// Whether the relays take the GCKS's rekeys over unicast UDP (the GCKS lists them as
    /// unicast relays, each relay joins no upstream group) instead of its multicast group.
    /// Without direct members the GCKS then multicasts nothing. Downstream the relays multicast
    /// as always.
    #[serde(default)]
    pub unicast_uplinks: bool,
    /// What joins the hosts' links in the switch namespace.
    #[serde(default)]
    pub fabric: Fabric,
    /// Whether the scenario runs over IPv6: every host gets a unique-local address, the GCKS
    /// and the relays multicast to `ff15::` groups, and every unicast path (feedback, unicast
    /// uplinks, TCP and HTTP resync, `/metrics`) uses the IPv6 addresses. Needs
    /// `fabric = "bridge"` (the impairment switch forwards IPv4 only) and no flood.
    #[serde(default)]
    pub ipv6: bool,
    /// Whether the GCKS is configured with the relays' directory (`[gcks.relay_directory]`):
    /// each relay member's registration bundle lists its least-loaded relay first and the
    /// others after it, the member listens to the relay its bundle lists first (its report
    /// group is that relay's, whatever its host's name) and fails over to the next one when
    /// its relay goes silent (a silence of [`FAILOVER_IDLE_SILENCE_MS`]). Needs 2 relays or
    /// more.
    #[serde(default)]
    pub failover: bool,
}

/// The members' failover idle silence in a `failover` topology, milliseconds: four times the
/// relays' longest heartbeat interval (250 ms), so only a dead relay is that silent.
pub const FAILOVER_IDLE_SILENCE_MS: u64 = 1_000;

/// What joins the hosts in the switch namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fabric {
    /// The userspace impairment switch (`rekeycast-netns switch`): impairments and outages.
    #[default]
    Switch,
    /// A kernel bridge: no impairments and no outages (a scenario that asks for either is
    /// refused), for checking a topology without the switch.
    Bridge,
}

/// The impairments of each tier's ports. Each applies to every port of its tier; `ingress` is
/// host to switch, `egress` switch to host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Impairments {
    /// The GCKS's port.
    pub gcks: TierImpairment,
    /// The relays' ports: `egress` impairs what reaches the relays (the upstream tier).
    pub relays: TierImpairment,
    /// The ports of the GCKS's own members.
    pub members: TierImpairment,
    /// The ports of the members behind relays: `egress` impairs what reaches them (the
    /// downstream tier).
    pub relay_members: TierImpairment,
    /// The attacker's port.
    pub attacker: TierImpairment,
}

/// The two directions of a tier's ports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierImpairment {
    /// From the host into the switch.
    pub ingress: Impairment,
    /// From the switch to the host.
    pub egress: Impairment,
}

/// The rekeys: how many, how often, and the joins and leaves before some of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Rekeys after the bootstrap (the batch that admits the first members), at least 1.
    pub rekeys: u32,
    /// The time from one rekey's trigger to the next one's, in milliseconds (a rekey whose
    /// members take longer delays the next).
    pub interval_ms: u64,
    /// How long the runner waits for the members to hold a rekey's key before it counts the
    /// missing ones and goes on, in milliseconds.
    #[serde(default = "Schedule::default_converge_timeout_ms")]
    pub converge_timeout_ms: u64,
    /// How long the runner waits at the end for every member (those under faults included) to
    /// hold the last key, in milliseconds.
    #[serde(default = "Schedule::default_settle_timeout_ms")]
    pub settle_timeout_ms: u64,
    /// Membership changes, written `[[schedule.churn]]`.
    #[serde(default)]
    pub churn: Vec<Churn>,
}

impl Schedule {
    fn default_converge_timeout_ms() -> u64 {
        10_000
    }

    fn default_settle_timeout_ms() -> u64 {
        30_000
    }
}

/// Joins and leaves applied by the rekey `at_rekey` (numbered from 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// The rekey that applies them.
    pub at_rekey: u32,
    /// New members of the GCKS (new hosts, created with the topology and started when they
    /// are admitted).
    #[serde(default)]
    pub joins: u32,
    /// Members of the GCKS that leave: the highest-numbered ones still present. Their
    /// processes stop once the rekey is applied by the others.
    #[serde(default)]
    pub leaves: u32,
}

/// A fault, written `[[fault]]` with its `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// The GCKS process is killed with SIGKILL just before rekey `at_rekey` is triggered,
    /// and restarted from its state directory after `down_ms`.
    KillGcks {
        /// The rekey it precedes.
        at_rekey: u32,
        /// How long it stays down, in milliseconds.
        down_ms: u64,
    },
    /// Relay `relay` (numbered from 1) is killed with SIGKILL just before rekey `at_rekey`.
    /// Without `down_ms` it stays down: its members must resync from the GCKS. With it, it is
    /// restarted that much later from its state directory, before the rekey.
    KillRelay {
        /// The relay.
        relay: u32,
        /// The rekey it precedes.
        at_rekey: u32,
        /// How long it stays down, in milliseconds; none: for good.
        #[serde(default)]
        down_ms: Option<u64>,
    },
    /// Member `member`'s switch port (both directions) is blackholed from just before rekey
    /// `at_rekey` for `intervals` rekey intervals.
    Blackhole {
        /// The member's id.
        member: u64,
        /// The first rekey it misses.
        at_rekey: u32,
        /// How many rekey intervals the outage lasts.
        intervals: u32,
    },
}

impl Fault {
    /// The rekey the fault happens before.
    pub fn at_rekey(&self) -> u32 {
        match self {
            Self::KillGcks { at_rekey, .. }
            | Self::KillRelay { at_rekey, .. }
            | Self::Blackhole { at_rekey, .. } => *at_rekey,
        }
    }
}

/// A flood of forged datagrams from the attacker host into the GCKS's group, started just
/// before rekey `from_rekey` and bounded in count and in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flood {
    /// The rekey it starts before.
    pub from_rekey: u32,
    /// The most datagrams it sends.
    pub max_datagrams: u64,
    /// The longest it runs, in milliseconds.
    pub max_ms: u64,
    /// The fraction of datagrams that are random bytes; the others are well-formed symbol
    /// datagrams of the group (right group id, SPI and sequence numbers around the current
    /// one) with random MACs.
    #[serde(default = "Flood::default_random_fraction")]
    pub random_fraction: f64,
    /// Datagram payload size, in bytes.
    #[serde(default = "Flood::default_size")]
    pub size: usize,
    /// How many rekeys from `from_rekey` on are not judged by `expect.every_rekey_applied`
    /// (the flood's own window); they must still be applied by the end.
    #[serde(default)]
    pub unjudged_rekeys: u32,
}

impl Flood {
    fn default_random_fraction() -> f64 {
        0.2
    }

    fn default_size() -> usize {
        1247
    }
}

/// What must hold. Each check that fails is listed and makes the runner exit with status 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Expect {
    /// Every member not under a fault holds each rekey's key within
    /// `schedule.converge_timeout_ms` of its trigger.
    pub every_rekey_applied: bool,
    /// At the end, every member (those under faults included) holds the last key.
    pub all_current_at_end: bool,
    /// No member is told to register again (exit status 3 of `rekeycast member`).
    pub no_reregistration: bool,
    /// Every member under a blackhole or behind a killed relay resynced at least once (TCP or
    /// HTTP).
    pub faulted_members_resync: bool,
    /// Every member's signature checks are exactly what its applied messages need (a
    /// manifest and a chunk each, none failed): forged traffic cost no signature check.
    pub signature_checks_match_applied: bool,
    /// After a GCKS restart the sequence continues: the restarted server reports the sequence
    /// number it had before the kill, and the next rekey is the one after it.
    pub sequence_continues: bool,
    /// The flood sent at least this many datagrams (so the test shows a real flood).
    pub min_flood_datagrams: Option<u64>,
    /// The members rejected at least this many datagrams in total.
    pub min_rejected_datagrams: Option<u64>,
    /// An upper bound on the 99th percentile of time to key over all members and rekeys,
    /// in milliseconds.
    pub max_time_to_key_p99_ms: Option<u64>,
    /// With a `failover` topology: every member of a relay killed for good ends on another
    /// relay, holds each message triggered after the kill within this many milliseconds of
    /// its trigger, and none of them resyncs from the GCKS (the GCKS serves no message by
    /// resync from the kill on: what a member lacks comes from its new relay).
    pub failover_within_ms: Option<u64>,
}

impl Default for Expect {
    fn default() -> Self {
        Self {
            every_rekey_applied: true,
            all_current_at_end: true,
            no_reregistration: true,
            faulted_members_resync: false,
            signature_checks_match_applied: false,
            sequence_continues: false,
            min_flood_datagrams: None,
            min_rejected_datagrams: None,
            max_time_to_key_p99_ms: None,
            failover_within_ms: None,
        }
    }
}

/// Why a scenario file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("could not read scenario {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not a valid scenario.
    #[error("scenario {path} is not valid TOML for a scenario: {message}")]
    Toml {
        /// The file (empty for text).
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A field holds a value the runner cannot use.
    #[error("scenario {name}: {field}: {reason}")]
    Invalid {
        /// The scenario's name.
        name: String,
        /// The field, as a path.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// The most hosts a scenario may have (the interface names leave three digits for a host's
/// number).
pub const MAX_HOSTS: u32 = 999;

impl Scenario {
    /// Parses and validates a scenario from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let scenario: Self = toml::from_str(text).map_err(|error| ScenarioError::Toml {
            path: PathBuf::new(),
            message: error.to_string(),
        })?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|error| match error {
            ScenarioError::Toml { message, .. } => ScenarioError::Toml {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// The member ids of the GCKS's own members that ever exist: the initial ones and the
    /// joiners of every churn entry, in order.
    pub fn direct_member_ids(&self) -> Vec<u64> {
        let joins: u32 = self.schedule.churn.iter().map(|churn| churn.joins).sum();
        (1..=u64::from(self.topology.members + joins)).collect()
    }

    /// The member ids behind relay `relay` (numbered from 1).
    pub fn relay_member_ids(&self, relay: u32) -> Vec<u64> {
        let base = u64::from(relay) * 1000;
        (1..=u64::from(self.topology.members_per_relay))
            .map(|i| base + i)
            .collect()
    }

    /// Checks what serde cannot: counts, references between fields, and that a kernel
    /// bridge is not asked to impair.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let invalid = |field: &str, reason: String| ScenarioError::Invalid {
            name: self.name.clone(),
            field: field.into(),
            reason,
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "name",
                format!(
                    "{:?} must be non-empty ASCII letters, digits, '_' or '-'",
                    self.name
                ),
            ));
        }
        let topology = &self.topology;
        if topology.members == 0 && topology.relays * topology.members_per_relay == 0 {
            return Err(invalid("topology", "no member at all".into()));
        }
        if topology.relays > 9 || topology.members_per_relay > 999 {
            return Err(invalid(
                "topology",
                "at most 9 relays with at most 999 members each".into(),
            ));
        }
        let hosts = 1
            + self.direct_member_ids().len() as u32
            + topology.relays * (1 + topology.members_per_relay)
            + u32::from(topology.attacker);
        if hosts > MAX_HOSTS {
            return Err(invalid(
                "topology",
                format!("{hosts} hosts, at most {MAX_HOSTS}"),
            ));
        }
        if topology.failover && topology.relays < 2 {
            return Err(invalid(
                "topology.failover",
                "needs at least 2 relays to fail over between".into(),
            ));
        }
        if self.expect.failover_within_ms.is_some() && !topology.failover {
            return Err(invalid(
                "expect.failover_within_ms",
                "needs topology.failover".into(),
            ));
        }
        if self.schedule.rekeys == 0 {
            return Err(invalid("schedule.rekeys", "must be at least 1".into()));
        }
        if self.schedule.interval_ms == 0 || self.schedule.converge_timeout_ms == 0 {
            return Err(invalid(
                "schedule",
                "interval_ms and converge_timeout_ms must be above 0".into(),
            ));
        }
        let rekey_in_range = |field: &str, rekey: u32| {
            if (1..=self.schedule.rekeys).contains(&rekey) {
                Ok(())
            } else {
                Err(invalid(
                    field,
                    format!("rekey {rekey} is not within 1..={}", self.schedule.rekeys),
                ))
            }
        };
        let mut present = u64::from(topology.members);
        for (index, churn) in self.schedule.churn.iter().enumerate() {
            rekey_in_range(&format!("schedule.churn[{index}].at_rekey"), churn.at_rekey)?;
            if u64::from(churn.leaves) >= present + u64::from(churn.joins) {
                return Err(invalid(
                    &format!("schedule.churn[{index}].leaves"),
                    "would leave the GCKS without members".into(),
                ));
            }
            present = present + u64::from(churn.joins) - u64::from(churn.leaves);
        }
        let mut churn_rekeys: Vec<u32> = self.schedule.churn.iter().map(|c| c.at_rekey).collect();
        churn_rekeys.sort_unstable();
        if churn_rekeys.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(invalid(
                "schedule.churn",
                "two entries for the same rekey".into(),
            ));
        }
        let switch = self.topology.fabric == Fabric::Switch;
        for (index, fault) in self.faults.iter().enumerate() {
            let field = format!("fault[{index}]");
            rekey_in_range(&format!("{field}.at_rekey"), fault.at_rekey())?;
            match fault {
                Fault::KillGcks { at_rekey, .. } => {
                    if churn_rekeys.contains(at_rekey) {
                        return Err(invalid(
                            &field,
                            "a GCKS kill and churn at the same rekey would lose the pending \
                             joins"
                                .into(),
                        ));
                    }
                }
                Fault::KillRelay { relay, .. } => {
                    if *relay == 0 || *relay > topology.relays {
                        return Err(invalid(
                            &format!("{field}.relay"),
                            format!("relay {relay} is not within 1..={}", topology.relays),
                        ));
                    }
                }
                Fault::Blackhole {
                    member, intervals, ..
                } => {
                    if !switch {
                        return Err(invalid(
                            &field,
                            "blackholes need fabric = \"switch\"".into(),
                        ));
                    }
                    if *member == 0 || *member > u64::from(topology.members) {
                        return Err(invalid(
                            &format!("{field}.member"),
                            format!(
                                "member {member} is not one of the initial members 1..={}",
                                topology.members
                            ),
                        ));
                    }
                    if *intervals == 0 {
                        return Err(invalid(
                            &format!("{field}.intervals"),
                            "must be at least 1".into(),
                        ));
                    }
                }
            }
        }
        if topology.ipv6 && switch {
            return Err(invalid(
                "topology.ipv6",
                "needs fabric = \"bridge\" (the impairment switch forwards IPv4 only)".into(),
            ));
        }
        if let Some(flood) = &self.flood {
            if topology.ipv6 {
                return Err(invalid(
                    "flood",
                    "the flood sends IPv4 only; not with topology.ipv6".into(),
                ));
            }
            if !topology.attacker {
                return Err(invalid("flood", "needs topology.attacker = true".into()));
            }
            rekey_in_range("flood.from_rekey", flood.from_rekey)?;
            if flood.max_datagrams == 0 || flood.max_ms == 0 {
                return Err(invalid(
                    "flood",
                    "max_datagrams and max_ms must be above 0 (the flood is bounded)".into(),
                ));
            }
            if !(0.0..=1.0).contains(&flood.random_fraction) {
                return Err(invalid(
                    "flood.random_fraction",
                    format!("{} is not within 0 to 1", flood.random_fraction),
                ));
            }
            if !(64..=1472).contains(&flood.size) {
                return Err(invalid(
                    "flood.size",
                    format!("{} is not within 64 to 1472 bytes", flood.size),
                ));
            }
        }
        let tiers = [
            ("impairments.gcks", &self.impairments.gcks),
            ("impairments.relays", &self.impairments.relays),
            ("impairments.members", &self.impairments.members),
            ("impairments.relay_members", &self.impairments.relay_members),
            ("impairments.attacker", &self.impairments.attacker),
        ];
        for (field, tier) in tiers {
            for (direction, impairment) in [("ingress", &tier.ingress), ("egress", &tier.egress)] {
                let field = format!("{field}.{direction}");
                if !switch && !impairment.is_none() {
                    return Err(invalid(
                        &field,
                        "impairments need fabric = \"switch\" (a kernel bridge has none)".into(),
                    ));
                }
                impairment
                    .validate(&field)
                    .map_err(|error| invalid(&field, error.to_string()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::impair::Loss;

    const MINIMAL: &str = r#"
        name = "minimal"
        [topology]
        members = 3
        [schedule]
        rekeys = 2
        interval_ms = 500
    "#;

    #[test]
    fn minimal_scenario_takes_the_defaults() {
        let scenario = Scenario::from_toml(MINIMAL).expect("valid");
        assert_eq!(scenario.topology.fabric, Fabric::Switch);
        assert_eq!(scenario.schedule.converge_timeout_ms, 10_000);
        assert!(scenario.expect.every_rekey_applied);
        assert!(scenario.expect.no_reregistration);
        assert!(!scenario.expect.signature_checks_match_applied);
        assert_eq!(scenario.direct_member_ids(), vec![1, 2, 3]);
        assert!(scenario.faults.is_empty());
    }

    #[test]
    fn full_scenario_parses_tiers_faults_and_flood() {
        let text = r#"
            name = "full"
            seed = 9
            [topology]
            members = 4
            relays = 2
            members_per_relay = 3
            attacker = true
            [impairments.members.egress]
            loss = { model = "gilbert_elliott", average = 0.05, mean_burst = 10.0 }
            [impairments.relays.egress]
            loss = { model = "iid", p = 0.02 }
            [schedule]
            rekeys = 6
            interval_ms = 400
            [[schedule.churn]]
            at_rekey = 2
            joins = 2
            leaves = 1
            [[fault]]
            kind = "blackhole"
            member = 2
            at_rekey = 3
            intervals = 3
            [[fault]]
            kind = "kill_relay"
            relay = 1
            at_rekey = 4
            down_ms = 200
            [[fault]]
            kind = "kill_gcks"
            at_rekey = 5
            down_ms = 300
            [flood]
            from_rekey = 1
            max_datagrams = 1000
            max_ms = 2000
            [expect]
            signature_checks_match_applied = true
            min_flood_datagrams = 100
        "#;
        let scenario = Scenario::from_toml(text).expect("valid");
        assert_eq!(
            scenario.impairments.members.egress.loss,
            Loss::GilbertElliott {
                average: 0.05,
                mean_burst: 10.0
            }
        );
        assert_eq!(scenario.faults.len(), 3);
        assert_eq!(
            scenario.faults[1],
            Fault::KillRelay {
                relay: 1,
                at_rekey: 4,
                down_ms: Some(200)
            }
        );
        assert_eq!(
            scenario.faults[0],
            Fault::Blackhole {
                member: 2,
                at_rekey: 3,
                intervals: 3
            }
        );
        assert_eq!(scenario.direct_member_ids().len(), 6);
        assert_eq!(scenario.relay_member_ids(2), vec![2001, 2002, 2003]);
        assert_eq!(scenario.flood.as_ref().map(|f| f.size), Some(1247));
    }

    #[test]
    fn invalid_scenarios_name_the_field() {
        let cases = [
            (MINIMAL.replace("rekeys = 2", "rekeys = 0"), "schedule.rekeys"),
            (
                format!("{MINIMAL}\n[[fault]]\nkind = \"blackhole\"\nmember = 9\nat_rekey = 1\nintervals = 1\n"),
                "fault[0].member",
            ),
            (
                format!("{MINIMAL}\n[[fault]]\nkind = \"kill_gcks\"\nat_rekey = 3\ndown_ms = 1\n"),
                "fault[0].at_rekey",
            ),
            (
                format!("{MINIMAL}\n[flood]\nfrom_rekey = 1\nmax_datagrams = 5\nmax_ms = 5\n"),
                "flood",
            ),
            (
                MINIMAL.replace("members = 3", "members = 3\nfabric = \"bridge\"")
                    + "\n[impairments.members.egress]\nloss = { model = \"iid\", p = 0.1 }\n",
                "impairments.members.egress",
            ),
            (
                MINIMAL.replace("members = 3", "members = 3\nipv6 = true"),
                "topology.ipv6",
            ),
            (
                MINIMAL.to_string() + "\n[impairments.gcks.ingress]\nloss = { model = \"iid\", p = 2.0 }\n",
                "impairments.gcks.ingress",
            ),
        ];
        for (text, field) in cases {
            match Scenario::from_toml(&text) {
                Err(ScenarioError::Invalid { field: got, .. }) => {
                    assert!(got.starts_with(field), "{got} for {field}")
                }
                other => panic!("{field}: expected Invalid, got {other:?}"),
            }
        }
        assert!(matches!(
            Scenario::from_toml("name = \"x\"\nbogus = 1\n"),
            Err(ScenarioError::Toml { .. })
        ));
    }
}
