//! The runner's figures: time to key from the members' status files and the rekeys' trigger
//! times, the per-group table, and the switch's and the GCKS's totals.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::processes::MemberStatus;
use crate::switch::Counters;

/// Latency percentiles, in microseconds, by nearest rank over the exact samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of `samples` (any order).
    pub fn of(samples: &[u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |p: f64| {
            let index = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[index]
        };
        Self {
            count: sorted.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted[sorted.len() - 1],
        }
    }
}

/// The time to key of every message in `triggers` (sequence number to the trigger's time,
/// microseconds since the Unix epoch) that `status` lists as applied: applied minus trigger.
pub fn time_to_key_us(triggers: &BTreeMap<u64, u64>, status: &MemberStatus) -> Vec<u64> {
    status
        .applied
        .iter()
        .filter_map(|&(seq, at)| {
            let triggered = triggers.get(&seq)?;
            Some(at.saturating_sub(*triggered))
        })
        .collect()
}

/// One member's final figures, as the table needs them.
#[derive(Debug, Clone)]
pub struct MemberRow {
    /// The member's id.
    pub id: u64,
    /// Its report group.
    pub group: String,
    /// Its last status, if it wrote one.
    pub status: Option<MemberStatus>,
    /// Messages it should have applied (from its first to the last one while it was a member).
    pub expected: u64,
    /// Its time-to-key samples, microseconds.
    pub time_to_key_us: Vec<u64>,
}

/// One row of the table: a group of members.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupRow {
    /// The group's name.
    pub group: String,
    /// Members in it.
    pub members: usize,
    /// Messages applied, all members together.
    pub applied: u64,
    /// Messages they should have applied.
    pub expected: u64,
    /// Time to key over all their samples.
    pub time_to_key: Percentiles,
    /// NACKs sent.
    pub nacks: u64,
    /// Resync exchanges started.
    pub resyncs: u64,
    /// Messages applied through resync.
    pub applied_by_resync: u64,
    /// State checks.
    pub state_checks: u64,
    /// Signature checks.
    pub signature_checks: u64,
    /// Failed signature checks.
    pub signature_failures: u64,
    /// Datagrams rejected before use.
    pub rejected: u64,
    /// Of those, with a bad MAC.
    pub bad_mac: u64,
}

/// Groups the members' rows, in the order their groups first appear, and adds a total row.
pub fn group_rows(members: &[MemberRow]) -> Vec<GroupRow> {
    let mut order: Vec<String> = Vec::new();
    for member in members {
        if !order.contains(&member.group) {
            order.push(member.group.clone());
        }
    }
    let mut rows: Vec<GroupRow> = order
        .iter()
        .map(|group| row(group, members.iter().filter(|m| &m.group == group)))
        .collect();
    if rows.len() > 1 {
        rows.push(row("total", members.iter()));
    }
    rows
}

fn row<'a>(name: &str, members: impl Iterator<Item = &'a MemberRow>) -> GroupRow {
    let mut row = GroupRow {
        group: name.into(),
        ..GroupRow::default()
    };
    let mut samples = Vec::new();
    for member in members {
        row.members += 1;
        row.expected += member.expected;
        samples.extend_from_slice(&member.time_to_key_us);
        if let Some(status) = &member.status {
            row.applied += status.messages_applied;
            row.nacks += status.nacks_sent;
            row.resyncs += status.resyncs_started;
            row.applied_by_resync += status.applied_from_resync;
            row.state_checks += status.state_checks;
            row.signature_checks += status.signature_checks;
            row.signature_failures += status.signature_failures;
            row.rejected += status.datagrams_rejected;
            row.bad_mac += status.bad_mac;
        }
    }
    row.time_to_key = Percentiles::of(&samples);
    row
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// The members' table.
pub fn render_groups(rows: &[GroupRow]) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{:<16} {:>7} {:>13} {:>9} {:>9} {:>9} {:>7} {:>8} {:>9} {:>9} {:>10} {:>8} {:>9} {:>9}",
        "group",
        "members",
        "applied",
        "ttk p50",
        "ttk p99",
        "ttk max",
        "NACKs",
        "resyncs",
        "by resync",
        "state chk",
        "sig checks",
        "sig fail",
        "rejected",
        "bad MAC"
    );
    for row in rows {
        let _ = writeln!(
            text,
            "{:<16} {:>7} {:>13} {:>9} {:>9} {:>9} {:>7} {:>8} {:>9} {:>9} {:>10} {:>8} {:>9} {:>9}",
            row.group,
            row.members,
            format!("{}/{}", row.applied, row.expected),
            ms(row.time_to_key.p50),
            ms(row.time_to_key.p99),
            ms(row.time_to_key.max),
            row.nacks,
            row.resyncs,
            row.applied_by_resync,
            row.state_checks,
            row.signature_checks,
            row.signature_failures,
            row.rejected,
            row.bad_mac
        );
    }
    let _ = writeln!(
        text,
        "(time to key in ms, from the admin `rekey` request to the member's applied key)"
    );
    text
}

/// The switch's counters summed per tier: `tier_of` names a port's tier.
pub fn render_switch(counters: &Counters, tier_of: impl Fn(&str) -> String) -> String {
    #[derive(Default)]
    struct Sum {
        ports: usize,
        in_frames: u64,
        in_dropped: u64,
        out_frames: u64,
        out_control: u64,
        out_loss: u64,
        out_outage: u64,
        out_other: u64,
        out_forwarded: u64,
        overflow: u64,
    }
    let mut tiers: BTreeMap<String, Sum> = BTreeMap::new();
    for (name, port) in &counters.ports {
        let sum = tiers.entry(tier_of(name)).or_default();
        sum.ports += 1;
        sum.in_frames += port.ingress.frames;
        sum.in_dropped += port.ingress.dropped_loss
            + port.ingress.dropped_outage
            + port.ingress.dropped_rate
            + port.ingress.dropped_queue_full;
        sum.out_frames += port.egress.frames;
        sum.out_control += port.egress.control;
        sum.out_loss += port.egress.dropped_loss;
        sum.out_outage += port.egress.dropped_outage;
        sum.out_other += port.egress.dropped_rate + port.egress.dropped_queue_full;
        sum.out_forwarded += port.egress.forwarded;
        sum.overflow += port.receive_overflow;
    }
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{:<16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7} {:>10} {:>10} {:>10} {:>9}",
        "switch tier",
        "ports",
        "in frames",
        "in drop",
        "out frames",
        "of control",
        "out loss",
        "loss %",
        "out outage",
        "out other",
        "out sent",
        "overflow"
    );
    for (tier, sum) in &tiers {
        let _ = writeln!(
            text,
            "{:<16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7.2} {:>10} {:>10} {:>10} {:>9}",
            tier,
            sum.ports,
            sum.in_frames,
            sum.in_dropped,
            sum.out_frames,
            sum.out_control,
            sum.out_loss,
            // Control frames (ARP, IGMP) are never impaired: the rate is over the others.
            100.0 * sum.out_loss as f64
                / sum.out_frames.saturating_sub(sum.out_control).max(1) as f64,
            sum.out_outage,
            sum.out_other,
            sum.out_forwarded,
            sum.overflow
        );
    }
    let _ = writeln!(text, "(switch uptime {} ms)", counters.uptime_ms);
    text
}

/// The GCKS's figures from its `/metrics`.
pub fn render_gcks(metrics: &BTreeMap<String, f64>) -> String {
    let get = |name: &str| metrics.get(name).copied().unwrap_or(0.0) as u64;
    format!(
        "gcks /metrics: seq {}, members {} (relays {}), manifests {}, source symbols {}, proactive repair {}, \
         NACK repair {}, NACKs received {}, heartbeats {}, bytes sent {} (source {}), resync \
         connections {} (refused {}, rate-limited reads {}), datagrams rejected {}\n",
        get("rekeycast_seq"),
        get("rekeycast_members"),
        get("rekeycast_relays"),
        get("rekeycast_manifests_sent_total"),
        get("rekeycast_source_symbols_sent_total"),
        get("rekeycast_proactive_symbols_sent_total"),
        get("rekeycast_repair_symbols_sent_total"),
        get("rekeycast_nacks_received_total"),
        get("rekeycast_heartbeats_sent_total"),
        get("rekeycast_bytes_sent_total"),
        get("rekeycast_source_bytes_sent_total"),
        get("rekeycast_resync_connections_accepted_total"),
        get("rekeycast_resync_connections_refused_total"),
        get("rekeycast_resync_rate_limited_total"),
        get("rekeycast_datagrams_rejected_total"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        let p = Percentiles::of(&samples);
        assert_eq!((p.count, p.p50, p.p99, p.max), (100, 50, 99, 100));
        assert_eq!(Percentiles::of(&[7]).p99, 7);
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
    }

    #[test]
    fn time_to_key_counts_only_triggered_messages() {
        let triggers = BTreeMap::from([(2, 1_000), (3, 5_000)]);
        let status = MemberStatus {
            applied: vec![(1, 500), (2, 1_700), (3, 9_000)],
            ..MemberStatus::default()
        };
        assert_eq!(time_to_key_us(&triggers, &status), vec![700, 4_000]);
    }

    #[test]
    fn switch_table_sums_tiers_and_rates_loss_over_impairable_frames() {
        let mut counters = Counters::default();
        for name in ["m1", "m2"] {
            let mut port = crate::switch::PortCounters::default();
            port.egress.frames = 120;
            port.egress.control = 20;
            port.egress.dropped_loss = 5;
            counters.ports.insert(name.into(), port);
        }
        counters
            .ports
            .insert("gcks".into(), crate::switch::PortCounters::default());
        let text = render_switch(&counters, |port| {
            if port == "gcks" { "gcks" } else { "members" }.to_string()
        });
        let members = text
            .lines()
            .find(|line| line.starts_with("members"))
            .expect("a members row");
        let fields: Vec<&str> = members.split_whitespace().collect();
        // tier, ports, in frames, in drop, out frames, of control, out loss, loss %
        assert_eq!(
            &fields[..8],
            ["members", "2", "0", "0", "240", "40", "10", "5.00"]
        );
        assert!(text.lines().any(|line| line.starts_with("gcks")));
    }

    #[test]
    fn rows_sum_per_group_and_in_total() {
        let member = |id, group: &str, applied, ttk: Vec<u64>| MemberRow {
            id,
            group: group.into(),
            status: Some(MemberStatus {
                messages_applied: applied,
                nacks_sent: 1,
                ..MemberStatus::default()
            }),
            expected: 5,
            time_to_key_us: ttk,
        };
        let rows = group_rows(&[
            member(1, "gcks", 5, vec![10, 20]),
            member(2, "relay1", 4, vec![30]),
            member(3, "gcks", 5, vec![40]),
        ]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].group, "gcks");
        assert_eq!(
            (rows[0].members, rows[0].applied, rows[0].expected),
            (2, 10, 10)
        );
        assert_eq!(rows[0].time_to_key.max, 40);
        assert_eq!(rows[2].group, "total");
        assert_eq!(
            (rows[2].applied, rows[2].expected, rows[2].nacks),
            (14, 15, 3)
        );
        assert!(render_groups(&rows).contains("14/15"));
    }
}
