//! Scenarios through the endpoints the engine runs (`rekeycast::sim::rekey` drives
//! `GcksEndpoint`, `RelayEndpoint` and `MemberEndpoint` in virtual time): a GCKS that crashes
//! mid-message and is restored from its storage, and a relay whose resync endpoint is hostile.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rekeycast::sim::rekey::{run, GcksRestart, Hostility, ScenarioConfig, ScenarioReport};
use rekeycast::sim::{LinkConfig, Loss};

/// Every member ends on the GCKS's latest message and keys, having applied every message it
/// needed, without re-registering.
fn assert_members_current(name: &str, report: &ScenarioReport) {
    eprintln!(
        "{name}: {} messages (latest seq {}), {}/{} converged, member-messages {} (resync {}), \
         resync: {} fetches, {} failed, {} items applied, {} rejected; items from the \
         hostile endpoint {} (applied {}); GCKS restarts {}, committed {}, reused seqs {}",
        report.messages,
        report.gcks.latest_seq,
        report.converged,
        report.final_members,
        report.member_messages,
        report.applied_from_resync,
        report.resync.fetches,
        report.resync.fetch_failures,
        report.resync.items_applied,
        report.resync.items_rejected,
        report.member_nodes.hostile_items,
        report.member_nodes.hostile_items_applied,
        report.gcks.restarts,
        report.gcks.committed_seq,
        report.gcks.reused_seqs,
    );
    assert_eq!(
        report.converged, report.final_members,
        "{name}: every member ends with the GCKS's group key"
    );
    assert_eq!(
        report.receivers.messages_applied, report.member_messages,
        "{name}: every member applied every message it needed"
    );
    assert_eq!(report.must_reregister, 0, "{name}: nobody re-registers");
    assert_eq!(
        report.gcks.latest_seq, report.messages,
        "{name}: one sequence number per message asked for, the latest one last"
    );
    assert_eq!(report.gcks.join_failures, 0, "{name}: every join answered");
    assert!(
        !report.gcks.poisoned,
        "{name}: the GCKS never poisoned itself"
    );
}

/// 200 members, six rekeys at 2% churn and 5% loss, a durable GCKS and members that save
/// their keys; the GCKS crashes `after` the third rekey was asked for and comes back 300 ms
/// later, restored from what it stored.
fn restart_scenario(seed: u64, after: Duration) -> ScenarioReport {
    let mut config = ScenarioConfig::new(seed, 200, 6, 0.02, Loss::Bernoulli { p: 0.05 });
    config.durable = true;
    config.persist_member_keys = true;
    config.restart_gcks = Some(GcksRestart {
        rekey: 3,
        after,
        down: Duration::from_millis(300),
    });
    config.settle = Duration::from_secs(600);
    run(&config).unwrap()
}

fn assert_restart_survived(name: &str, report: &ScenarioReport) {
    assert_members_current(name, report);
    assert_eq!(
        report.gcks.restarts, 1,
        "{name}: the GCKS was restored once"
    );
    assert_eq!(
        report.gcks.reused_seqs, 0,
        "{name}: no sequence number was committed twice"
    );
    assert_eq!(
        report.gcks.committed_seq, report.gcks.latest_seq,
        "{name}: the latest message is the latest one stored"
    );
    assert_eq!(
        report.gcks.stale_saved_keys, 0,
        "{name}: every member's saved keys are those of the latest message"
    );
    assert_eq!(
        report.signature_failures, 0,
        "{name}: the restored GCKS's traffic verifies"
    );
}

/// The GCKS dies at the instant its message is committed and queued, before a datagram of it
/// left: the restored endpoint sends it again (under a new sender instance), and the members
/// take it and every later message.
#[test]
fn gcks_restored_before_its_committed_message_was_sent_members_end_on_the_latest_keys() {
    let report = restart_scenario(41, Duration::ZERO);
    assert_eq!(
        report.gcks.crashed_after_sent,
        Some(false),
        "the GCKS crashed before the message's initial transmission ended"
    );
    assert_restart_survived("crash before sending", &report);
}

/// The GCKS dies 30 ms after its message was asked for, while members still NACK lost
/// symbols of it: repair resumes from the restored endpoint (or resync fills in), and nothing
/// is sent under a sequence number used before.
#[test]
fn gcks_restored_while_its_message_is_being_repaired_members_end_on_the_latest_keys() {
    let report = restart_scenario(42, Duration::from_millis(30));
    eprintln!(
        "crash mid-repair: initial transmission done at the crash: {:?}, NACKs the GCKS heard: {}",
        report.gcks.crashed_after_sent, report.sender.nacks_received
    );
    assert!(report.gcks.crashed_after_sent.is_some());
    assert_restart_survived("crash mid-repair", &report);
}

/// Two relays of 50 members; relay 0's resync endpoint answers `how`. Twenty of relay 0's
/// members (the even initial indices 0..40) lose every datagram for three rekey intervals, so
/// they must resync: relay 0 first, then the GCKS. Resync fetches end after one second.
fn hostile_scenario(seed: u64, how: Hostility) -> ScenarioReport {
    let mut config = ScenarioConfig::new(seed, 100, 8, 0.0, Loss::None);
    config.relays = 2;
    config.hostile_relay = Some((0, how));
    config.resync_timeout = Duration::from_secs(1);
    let interval = config.rekey_interval;
    for index in (0..40).step_by(2) {
        let down = LinkConfig {
            outages: vec![(interval.mul_f64(2.5), interval.mul_f64(5.5))],
            ..config.member_downlink.clone()
        };
        config.downlink_overrides.push((index..index + 1, down));
    }
    config.settle = Duration::from_secs(300);
    run(&config).unwrap()
}

/// What every hostile scenario must show: members converge from the honest endpoint, and
/// the hostile one was asked (its members did resync through the policy).
fn assert_hostile_survived(name: &str, report: &ScenarioReport) {
    assert_members_current(name, report);
    assert!(
        report.applied_from_resync >= 20 * 3,
        "{name}: the cut-off members resynced their three missed messages ({})",
        report.applied_from_resync
    );
    assert!(
        report.resync.fetch_failures > 0,
        "{name}: the hostile endpoint's fetches failed and were dropped"
    );
}

#[test]
fn tampered_resync_items_are_rejected_and_members_finish_from_the_gcks() {
    let report = hostile_scenario(51, Hostility::Tamper);
    assert_hostile_survived("tampered", &report);
    assert!(
        report.member_nodes.hostile_items > 0 && report.resync.items_rejected > 0,
        "tampered items reached members and were rejected"
    );
    assert_eq!(
        report.member_nodes.hostile_items_applied, 0,
        "no key came from a tampered item"
    );
}

#[test]
fn garbage_resync_items_are_rejected_and_members_finish_from_the_gcks() {
    let report = hostile_scenario(52, Hostility::Garbage);
    assert_hostile_survived("garbage", &report);
    assert!(
        report.member_nodes.hostile_items > 0 && report.resync.items_rejected > 0,
        "garbage items reached members and were rejected"
    );
    assert_eq!(
        report.member_nodes.hostile_items_applied, 0,
        "no key came from garbage"
    );
}

#[test]
fn a_stalled_resync_endpoint_is_dropped_at_the_deadline_and_members_finish_from_the_gcks() {
    let report = hostile_scenario(53, Hostility::Stall);
    assert_hostile_survived("stalled", &report);
    assert_eq!(
        report.member_nodes.hostile_items, 0,
        "the stall served nothing"
    );
    assert!(
        report.member_nodes.fetches_failed > 0,
        "the stalled fetches failed at their deadline"
    );
}

/// A relay that drips honest items slower than the fetch deadline allows: what arrives in
/// time verifies and is applied (so the count of items applied from the hostile endpoint is
/// not zero by construction), the rest comes from the GCKS.
#[test]
fn a_dripping_resync_endpoint_is_cut_at_the_deadline_and_members_finish_from_the_gcks() {
    let report = hostile_scenario(54, Hostility::Drip(Duration::from_millis(400)));
    assert_hostile_survived("dripping", &report);
    assert!(
        report.member_nodes.hostile_items_applied > 0,
        "honest items delivered before the deadline were applied"
    );
    assert!(
        report.member_nodes.hostile_items < report.applied_from_resync,
        "the rest came from the GCKS ({} hostile items, {} applied by resync)",
        report.member_nodes.hostile_items,
        report.applied_from_resync
    );
}
