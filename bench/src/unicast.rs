//! The multi-unicast cell of `relay --unicast`: a GCKS serving multicast members and unicast
//! members side by side, in the seeded simulator of `rekeycast::sim` (star network, 5%
//! independent loss on every member's uplink and downlink, 10 ms one way).
//!
//! The GCKS multicasts each rekey message to the multicast members (FEC, NACK repair, as
//! always) and delivers it to each unicast member in one datagram (its manifest and its own
//! chunk), retransmitted on a backoff until acknowledged; it gives up after a bounded number
//! of tries and the member then resyncs (counted; here the resync is a direct fetch of the
//! manifest and chunk from the GCKS's history, as a TCP resync would return them). The group
//! is admitted in one first message (not measured), then `rekeys` rekeys, each removing 1%
//! of the multicast members, are measured: whether every member is current after each, and
//! what the unicast members cost: delivery datagrams (and bytes) per unicast member per
//! rekey, retransmissions, acknowledgements, give-ups, and time to key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rekeycast::auth::mac::MacKey;
use rekeycast::gsa::{RekeySa, WrapAlgorithm};
use rekeycast::lkh::{Degree, KeyRng, KeyTree, MemberId, RekeyBatch};
use rekeycast::session::layout::{build_message, MessageParams};
use rekeycast::session::receiver::{ReceiverConfig, ReceiverEvent, ReceiverSession};
use rekeycast::session::sender::{PreparedMessage, SenderConfig, SenderSession};
use rekeycast::session::unicast::{
    DeliveryOutcome, SenderSource, UnicastConfig, UnicastCounters, UnicastEvent, UnicastMembers,
    UnicastReceiver,
};
use rekeycast::sim::{LinkConfig, Loss, Network, Node, NodeId, Transmit};
use rekeycast::wire::{DatagramType, Packet};

const GROUP: u32 = 0x5543;
const SPI: u32 = 7;
/// The multicast group the GCKS sends into; unicast members listen to another one.
const MULTICAST: u32 = 0;
const NO_MULTICAST: u32 = 9;

/// One scenario.
#[derive(Debug, Clone, Copy)]
pub struct MixParams {
    /// Multicast members.
    pub multicast: usize,
    /// Unicast members.
    pub unicast: usize,
    /// Rekeys measured.
    pub rekeys: usize,
    /// Independent loss on every member link, both directions.
    pub loss: f64,
    /// The network's seed.
    pub seed: u64,
}

/// What a scenario measured (over the measured rekeys only).
#[derive(Debug, Clone, Default)]
pub struct MixReport {
    /// Rekeys after which every multicast member was current.
    pub multicast_all_current: usize,
    /// Rekeys after which every unicast member was current.
    pub unicast_all_current: usize,
    /// Rekeys measured.
    pub rekeys: usize,
    /// The GCKS's unicast counters over the measured rekeys.
    pub counters: UnicastCounters,
    /// Acknowledgements the unicast members sent over the measured rekeys.
    pub acks_sent: u64,
    /// Unicast members that resynced after the GCKS gave up on them.
    pub resyncs: u64,
    /// Members (either kind) still behind when a rekey's time was up (5 s), resynced then;
    /// the admission message's are not counted.
    pub late_resyncs: u64,
    /// Time from a rekey's queueing to each unicast member holding its key, sorted.
    pub unicast_time_to_key: Vec<Duration>,
    /// The same for the multicast members, sorted.
    pub multicast_time_to_key: Vec<Duration>,
    /// Datagrams the GCKS multicast over the measured rekeys.
    pub multicast_datagrams: u64,
    /// The largest delivery datagram, bytes.
    pub largest_delivery: usize,
}

impl MixReport {
    /// Delivery datagrams per unicast member per rekey.
    pub fn datagrams_per_member_rekey(&self, unicast: usize) -> f64 {
        self.counters.deliveries_sent as f64 / (unicast.max(1) * self.rekeys.max(1)) as f64
    }
}

struct GcksNode {
    tree: KeyTree,
    signing_key: SigningKey,
    sender: SenderSession,
    unicast: UnicastMembers,
    next_mac_key: MacKey,
    largest_delivery: usize,
}

impl GcksNode {
    fn queue(&mut self, now: Instant, batch: &RekeyBatch) -> anyhow::Result<u64> {
        let params = MessageParams {
            spi: SPI,
            ..MessageParams::default()
        };
        let built = build_message(
            batch,
            &self.tree.leaves_in_order(),
            &self.signing_key,
            &params,
        )?;
        let prepared = PreparedMessage::new(built, batch.mac_key.clone())?;
        let seq = prepared.seq();
        self.sender.queue_message(now, prepared)?;
        self.next_mac_key = self.tree.next_mac_key();
        self.unicast.message_ready(seq);
        Ok(seq)
    }
}

struct UnicastNode {
    session: ReceiverSession,
    receiver: UnicastReceiver,
    applied: Vec<(u64, Instant)>,
}

enum MixNode {
    Gcks(Box<GcksNode>),
    Multicast(Box<(ReceiverSession, Vec<(u64, Instant)>)>),
    Unicast(Box<UnicastNode>),
}

fn drain_keys(session: &mut ReceiverSession, now: Instant, applied: &mut Vec<(u64, Instant)>) {
    while let Some(event) = session.poll_event() {
        if let ReceiverEvent::GroupKeyUpdated { .. } = event {
            applied.push((session.next_seq() - 1, now));
        }
    }
}

impl Node for MixNode {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        match self {
            Self::Gcks(gcks) => {
                let is_ack = Packet::new_checked(bytes)
                    .is_ok_and(|p| p.datagram_type() == DatagramType::Ack);
                if is_ack {
                    let source = SenderSource {
                        sender: &gcks.sender,
                        next_mac_key: Some(&gcks.next_mac_key),
                    };
                    gcks.unicast.handle_ack(from, bytes, &source);
                } else {
                    gcks.sender.handle_datagram(now, from, bytes);
                }
            }
            Self::Multicast(member) => {
                member.0.handle_datagram(now, from, bytes);
                drain_keys(&mut member.0, now, &mut member.1);
            }
            Self::Unicast(node) => {
                let outcome = node
                    .receiver
                    .handle_datagram(now, &mut node.session, from, bytes);
                if outcome == DeliveryOutcome::NotDelivery {
                    node.session.handle_datagram(now, from, bytes);
                }
                drain_keys(&mut node.session, now, &mut node.applied);
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Self::Gcks(gcks) => {
                gcks.sender.handle_timeout(now);
                gcks.unicast.handle_timeout(now);
            }
            Self::Multicast(member) => {
                member.0.handle_timeout(now);
                drain_keys(&mut member.0, now, &mut member.1);
            }
            Self::Unicast(node) => {
                node.session.handle_timeout(now);
                node.receiver.handle_timeout(now);
                drain_keys(&mut node.session, now, &mut node.applied);
            }
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        match self {
            Self::Gcks(gcks) => {
                if let Some(t) = gcks.sender.poll_transmit(now, buf) {
                    return Some(t);
                }
                let source = SenderSource {
                    sender: &gcks.sender,
                    next_mac_key: Some(&gcks.next_mac_key),
                };
                let t = gcks.unicast.poll_transmit(now, buf, &source)?;
                gcks.largest_delivery = gcks.largest_delivery.max(t.len);
                Some(t)
            }
            Self::Multicast(member) => member.0.poll_transmit(now, buf),
            // A unicast member sends acknowledgements only: its session has no multicast
            // traffic to NACK, and its state checks go to the resync endpoint.
            Self::Unicast(node) => node.receiver.poll_transmit(now, &node.session, buf),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Gcks(gcks) => [gcks.sender.poll_timeout(), gcks.unicast.poll_timeout()]
                .into_iter()
                .flatten()
                .min(),
            Self::Multicast(member) => member.0.poll_timeout(),
            Self::Unicast(node) => [node.session.poll_timeout(), node.receiver.poll_timeout()]
                .into_iter()
                .flatten()
                .min(),
        }
    }
}

fn gcks(net: &mut Network<MixNode>) -> &mut GcksNode {
    match net.node_mut(NodeId::from_index(0).expect("node 0")) {
        Some(MixNode::Gcks(gcks)) => gcks,
        _ => unreachable!("node 0 is the GCKS"),
    }
}

/// Runs one scenario.
pub fn run_mix(params: MixParams) -> anyhow::Result<MixReport> {
    let total = params.multicast + params.unicast;
    anyhow::ensure!(total >= 1 && params.rekeys >= 1, "empty scenario");
    let mut net: Network<MixNode> = Network::new(params.seed);
    let now = net.start();
    let signing_key = SigningKey::from_bytes(&[0x42; 32]);
    let sa = RekeySa {
        group_id: GROUP,
        spi: SPI,
        wrap_algorithm: WrapAlgorithm::Aes256Gcm,
        degree: Degree::new(4)?,
        gcks_public_key: signing_key.verifying_key(),
        data_sa_lifetime_secs: 3600,
    };
    let mut tree = KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(params.seed));
    let joins: Vec<MemberId> = (1..=total as u64).map(MemberId).collect();
    let first = tree.apply_batch(&joins, &[])?;
    let bundles = joins
        .iter()
        .map(|&m| tree.join(m))
        .collect::<Result<Vec<_>, _>>()?;
    let next_mac_key = tree.next_mac_key();
    let node = GcksNode {
        tree,
        signing_key,
        sender: SenderSession::new(SenderConfig::default(), GROUP, SPI, now)?,
        unicast: UnicastMembers::new(
            UnicastConfig {
                seed: params.seed,
                ..UnicastConfig::default()
            },
            GROUP,
            SPI,
        ),
        next_mac_key,
        largest_delivery: 0,
    };
    let ideal = LinkConfig::ideal();
    let lossy = LinkConfig::lossy(
        Loss::Bernoulli { p: params.loss },
        Duration::from_millis(10),
    );
    let gcks_id = net.add_node(MixNode::Gcks(Box::new(node)), ideal.clone(), ideal)?;
    let gcks_addr = net.addr(gcks_id);
    let mut ids = Vec::with_capacity(total);
    for (i, bundle) in bundles.iter().enumerate() {
        let mut session = ReceiverSession::new(bundle, ReceiverConfig::new(gcks_addr))?;
        session.start(now);
        let unicast = i >= params.multicast;
        let node = if unicast {
            let receiver = UnicastReceiver::new(now, gcks_addr, Duration::from_millis(500));
            MixNode::Unicast(Box::new(UnicastNode {
                session,
                receiver,
                applied: Vec::new(),
            }))
        } else {
            MixNode::Multicast(Box::new((session, Vec::new())))
        };
        let id = net.add_node(node, lossy.clone(), lossy.clone())?;
        if unicast {
            net.set_groups(id, MULTICAST, NO_MULTICAST)?;
            let addr = net.addr(id);
            let order_key = match net.node(id) {
                Some(MixNode::Unicast(node)) => node.session.order_key(),
                _ => unreachable!("just added"),
            };
            gcks(&mut net)
                .unicast
                .register(order_key, Some(addr), bundle.first_seq);
        }
        ids.push(id);
    }
    let first_seq = gcks(&mut net).queue(now, &first)?;
    net.touch(gcks_id)?;
    for &id in &ids {
        net.touch(id)?;
    }
    let mut present: Vec<usize> = (0..total).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(params.seed);
    let mut report = MixReport {
        rekeys: params.rekeys,
        ..MixReport::default()
    };
    // The admission message, then the measured rekeys.
    settle(&mut net, &ids, &present, first_seq, &mut report)?;
    let before = *gcks(&mut net).unicast.counters();
    let acks_before = acks_sent(&net, &ids);
    let multicast_before = net.node_stats(gcks_id).map_or(0, |s| s.datagrams_sent);
    let resyncs_before = report.resyncs;
    report.late_resyncs = 0;
    for _ in 0..params.rekeys {
        let mut multicast_present: Vec<usize> = present
            .iter()
            .copied()
            .filter(|&i| i < params.multicast)
            .collect();
        multicast_present.shuffle(&mut rng);
        let leaving: HashSet<usize> = multicast_present
            .iter()
            .copied()
            .take(params.multicast / 100)
            .collect();
        for &i in &leaving {
            net.remove_node(ids[i])?;
        }
        present.retain(|i| !leaving.contains(i));
        let leaves: Vec<MemberId> = leaving.iter().map(|&i| MemberId(i as u64 + 1)).collect();
        let at = net.now();
        let node = gcks(&mut net);
        let batch = node.tree.apply_batch(&[], &leaves)?;
        let seq = node.queue(at, &batch)?;
        net.touch(gcks_id)?;
        let (multicast_ok, unicast_ok) =
            settle_report(&mut net, &ids, &present, seq, at, params, &mut report)?;
        report.multicast_all_current += usize::from(multicast_ok);
        report.unicast_all_current += usize::from(unicast_ok);
    }
    let after = *gcks(&mut net).unicast.counters();
    report.counters = UnicastCounters {
        deliveries_sent: after.deliveries_sent - before.deliveries_sent,
        retransmissions: after.retransmissions - before.retransmissions,
        bytes_sent: after.bytes_sent - before.bytes_sent,
        acks_accepted: after.acks_accepted - before.acks_accepted,
        acks_rejected: after.acks_rejected - before.acks_rejected,
        acks_stale: after.acks_stale - before.acks_stale,
        messages_acknowledged: after.messages_acknowledged - before.messages_acknowledged,
        gave_up: after.gave_up - before.gave_up,
    };
    report.acks_sent = acks_sent(&net, &ids) - acks_before;
    report.resyncs -= resyncs_before;
    report.multicast_datagrams = net.node_stats(gcks_id).map_or(0, |s| s.datagrams_sent)
        - multicast_before
        - report.counters.deliveries_sent;
    report.largest_delivery = gcks(&mut net).largest_delivery;
    report.unicast_time_to_key.sort();
    report.multicast_time_to_key.sort();
    Ok(report)
}

fn acks_sent(net: &Network<MixNode>, ids: &[NodeId]) -> u64 {
    ids.iter()
        .filter_map(|&id| match net.node(id) {
            Some(MixNode::Unicast(node)) => Some(node.receiver.counters().acks_sent),
            _ => None,
        })
        .sum()
}

/// Runs a rekey to its end and records each present member's time to key.
fn settle_report(
    net: &mut Network<MixNode>,
    ids: &[NodeId],
    present: &[usize],
    seq: u64,
    start: Instant,
    params: MixParams,
    report: &mut MixReport,
) -> anyhow::Result<(bool, bool)> {
    let late = settle(net, ids, present, seq, report)?;
    let (mut multicast_ok, mut unicast_ok) = (late.0 == 0, late.1 == 0);
    for &i in present {
        match net.node(ids[i]) {
            Some(MixNode::Multicast(member)) => {
                let at = member.1.iter().find(|(s, _)| *s == seq).map(|(_, at)| *at);
                multicast_ok &= member.0.next_seq() > seq;
                if let Some(at) = at {
                    report.multicast_time_to_key.push(at - start);
                }
            }
            Some(MixNode::Unicast(node)) => {
                let at = node
                    .applied
                    .iter()
                    .find(|(s, _)| *s == seq)
                    .map(|(_, at)| *at);
                unicast_ok &= node.session.next_seq() > seq;
                if let Some(at) = at {
                    report.unicast_time_to_key.push(at - start);
                }
            }
            _ => {}
        }
    }
    let _ = params;
    Ok((multicast_ok, unicast_ok))
}

/// Runs the network until every present member holds message `seq` (or `SETTLE_LIMIT`
/// passes), resyncing the unicast members the GCKS gave up on; then resyncs the members still
/// behind. Returns how many multicast and unicast members were still behind.
fn settle(
    net: &mut Network<MixNode>,
    ids: &[NodeId],
    present: &[usize],
    seq: u64,
    report: &mut MixReport,
) -> anyhow::Result<(usize, usize)> {
    let limit = net.now() + SETTLE_LIMIT;
    let step = Duration::from_millis(50);
    let mut pending: Vec<usize> = present.to_vec();
    while net.now() < limit {
        let next = net.now() + step;
        net.run_until(next);
        report.resyncs += resync_given_up(net, ids)?;
        pending.retain(|&i| match net.node(ids[i]) {
            Some(MixNode::Multicast(member)) => member.0.next_seq() <= seq,
            Some(MixNode::Unicast(node)) => node.session.next_seq() <= seq,
            _ => false,
        });
        if pending.is_empty() {
            break;
        }
    }
    // Let acknowledgements and the last repairs land before the next rekey.
    let quiet = net.now() + Duration::from_millis(100);
    net.run_until(quiet);
    report.resyncs += resync_given_up(net, ids)?;
    // Members still behind resync from the GCKS's history, as a TCP resync would serve them.
    let mut late = (0, 0);
    for &i in &pending {
        let unicast = matches!(net.node(ids[i]), Some(MixNode::Unicast(_)));
        if resync_member(net, ids[i])? {
            report.late_resyncs += 1;
            if unicast {
                late.1 += 1;
            } else {
                late.0 += 1;
            }
        }
    }
    Ok(late)
}

/// How long a rekey may take before the members still behind resync.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Brings a member behind up to date from the GCKS's history; returns whether it was behind.
fn resync_member(net: &mut Network<MixNode>, id: NodeId) -> anyhow::Result<bool> {
    let mut behind = false;
    let now = net.now();
    loop {
        let (next, order_key) = match net.node(id) {
            Some(MixNode::Multicast(m)) => (m.0.next_seq(), m.0.order_key()),
            Some(MixNode::Unicast(n)) => (n.session.next_seq(), n.session.order_key()),
            _ => return Ok(behind),
        };
        let item = gcks(net)
            .sender
            .resync_item(next, order_key)
            .ok()
            .map(|item| (item.manifest.to_vec(), item.chunk.to_vec()));
        let Some((manifest, chunk)) = item else {
            break;
        };
        behind = true;
        match net.node_mut(id) {
            Some(MixNode::Multicast(m)) => {
                m.0.handle_resync(now, &manifest, &chunk)?;
                drain_keys(&mut m.0, now, &mut m.1);
            }
            Some(MixNode::Unicast(n)) => {
                n.session.handle_resync(now, &manifest, &chunk)?;
                drain_keys(&mut n.session, now, &mut n.applied);
                n.receiver.handle_resynced();
            }
            _ => break,
        }
    }
    net.touch(id)?;
    Ok(behind)
}

/// The unicast members the GCKS gave up on fetch what they lack from its history (what a TCP
/// resync returns) and tell it. Returns how many resynced.
fn resync_given_up(net: &mut Network<MixNode>, ids: &[NodeId]) -> anyhow::Result<u64> {
    let mut given_up = Vec::new();
    {
        let node = gcks(net);
        while let Some(event) = node.unicast.poll_event() {
            if let UnicastEvent::GaveUp { receiver_id, .. } = event {
                given_up.push(receiver_id);
            }
        }
    }
    let mut resynced = 0;
    for receiver_id in given_up {
        let Some(&id) = ids.iter().find(|&&id| {
            matches!(net.node(id), Some(MixNode::Unicast(n)) if n.session.order_key() == receiver_id)
        }) else {
            continue;
        };
        resync_member(net, id)?;
        resynced += 1;
    }
    Ok(resynced)
}

/// The cell: each seed's row, the median, and the JSON line.
pub fn run(
    quick: bool,
    multicast: usize,
    unicast: usize,
    rekeys: usize,
    seeds: u64,
) -> anyhow::Result<()> {
    let (multicast, unicast, rekeys, seeds) = if quick {
        (1_000, 100, 2, 1)
    } else {
        (multicast, unicast, rekeys.max(1), seeds.max(1))
    };
    println!(
        "relay --unicast: {unicast} unicast members beside {multicast} multicast members on one \
         GCKS, {rekeys} measured rekey(s) at 1% churn of the multicast members, 5% iid loss on \
         every member link (both directions), 10 ms one way"
    );
    println!(
        "{:>5} | {:>9} {:>9} {:>5} | {:>9} {:>7} {:>7} {:>6} {:>7} | {:>8} {:>9} | {:>10} {:>10} | {:>7}",
        "seed",
        "mcast ok",
        "ucast ok",
        "late",
        "dgram/m/r",
        "retx",
        "acks",
        "gaveup",
        "resyncs",
        "max dgram",
        "bytes/m/r",
        "u p99 ms",
        "m p99 ms",
        "wall s"
    );
    let mut rows = Vec::new();
    for seed in 1..=seeds {
        let start = Instant::now();
        let report = run_mix(MixParams {
            multicast,
            unicast,
            rekeys,
            loss: 0.05,
            seed,
        })?;
        let wall = start.elapsed().as_secs_f64();
        let per = report.datagrams_per_member_rekey(unicast);
        let bytes_per = report.counters.bytes_sent as f64 / (unicast * rekeys).max(1) as f64;
        let p = |v: &[Duration], q: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            v[i].as_secs_f64() * 1000.0
        };
        println!(
            "{:>5} | {:>9} {:>9} {:>5} | {:>9.3} {:>7} {:>7} {:>6} {:>7} | {:>8} {:>9.0} | {:>10.1} {:>10.1} | {:>7.1}",
            seed,
            format!("{}/{}", report.multicast_all_current, rekeys),
            format!("{}/{}", report.unicast_all_current, rekeys),
            report.late_resyncs,
            per,
            report.counters.retransmissions,
            report.acks_sent,
            report.counters.gave_up,
            report.resyncs,
            report.largest_delivery,
            bytes_per,
            p(&report.unicast_time_to_key, 0.99),
            p(&report.multicast_time_to_key, 0.99),
            wall,
        );
        rows.push(serde_json::json!({
            "seed": seed,
            "multicast_all_current": report.multicast_all_current,
            "unicast_all_current": report.unicast_all_current,
            "rekeys": rekeys,
            "unicast_datagrams_per_member_rekey": per,
            "unicast_deliveries": report.counters.deliveries_sent,
            "unicast_retransmissions": report.counters.retransmissions,
            "unicast_bytes_per_member_rekey": bytes_per,
            "unicast_acks_sent": report.acks_sent,
            "unicast_acks_accepted": report.counters.acks_accepted,
            "unicast_gave_up": report.counters.gave_up,
            "unicast_resyncs": report.resyncs,
            "late_resyncs": report.late_resyncs,
            "largest_delivery_bytes": report.largest_delivery,
            "multicast_datagrams": report.multicast_datagrams,
            "unicast_time_to_key_p50_ms": p(&report.unicast_time_to_key, 0.5),
            "unicast_time_to_key_p99_ms": p(&report.unicast_time_to_key, 0.99),
            "multicast_time_to_key_p50_ms": p(&report.multicast_time_to_key, 0.5),
            "multicast_time_to_key_p99_ms": p(&report.multicast_time_to_key, 0.99),
            "wall_s": wall,
        }));
    }
    let mut per: Vec<f64> = rows
        .iter()
        .map(|r| {
            r["unicast_datagrams_per_member_rekey"]
                .as_f64()
                .unwrap_or(f64::NAN)
        })
        .collect();
    per.sort_by(f64::total_cmp);
    let median = per[per.len() / 2];
    let all_current = rows.iter().all(|r| {
        r["multicast_all_current"] == r["rekeys"] && r["unicast_all_current"] == r["rekeys"]
    });
    println!(
        "median unicast datagrams per unicast member per rekey: {median:.3} (goal <= 1.3); \
         every member current after every rekey in every seed: {all_current}"
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "relay_unicast",
            "multicast_members": multicast,
            "unicast_members": unicast,
            "median_unicast_datagrams_per_member_rekey": median,
            "all_current": all_current,
            "seeds": rows,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small mix at 5% loss: every member current after every rekey, and the unicast
    /// members cost little more than one datagram each per rekey.
    #[test]
    fn multicast_and_unicast_members_at_loss_all_become_current() {
        let params = MixParams {
            multicast: 300,
            unicast: 60,
            rekeys: 3,
            loss: 0.05,
            seed: 11,
        };
        let report = run_mix(params).unwrap();
        assert_eq!(report.multicast_all_current, 3, "{report:?}");
        assert_eq!(report.unicast_all_current, 3, "{report:?}");
        assert_eq!(report.unicast_time_to_key.len(), 3 * 60);
        let per = report.datagrams_per_member_rekey(60);
        assert!((1.0..1.5).contains(&per), "{per}");
        assert!(report.counters.messages_acknowledged >= 3 * 60 - report.resyncs);
    }
}
