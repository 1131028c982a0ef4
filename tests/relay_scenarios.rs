//! Relay scenarios over the simulated network (`rekeycast::sim::rekey` with relays): a GCKS,
//! a tier of relays registered like members, and members behind each relay, with loss on both
//! tiers. Each test asserts its outcome from the sessions' own counters and prints the figures
//! it is about.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rekeycast::sim::rekey::{run, ScenarioConfig, ScenarioReport};
use rekeycast::sim::{LinkConfig, Loss};

/// A scenario of `relays` relays with `per_relay` members each, `rekeys` rekeys at 1% churn,
/// `upstream` loss on the relays' downlinks and `downstream` loss on the members'.
fn scenario(
    seed: u64,
    relays: usize,
    per_relay: usize,
    rekeys: usize,
    upstream: Loss,
    downstream: Loss,
) -> ScenarioConfig {
    let mut config = ScenarioConfig::new(seed, relays * per_relay, rekeys, 0.01, downstream);
    config.relays = relays;
    config.relay_downlink = LinkConfig {
        jitter: Duration::from_millis(1),
        ..LinkConfig::lossy(upstream, Duration::from_millis(5))
    };
    config
}

/// Asserts that every member and every relay ends with the GCKS's group key, every message
/// went through every relay, and nothing failed a signature; prints the figures.
fn assert_converged(name: &str, report: &ScenarioReport) {
    let relays = &report.relays;
    eprintln!(
        "{name}: {} messages, members {}/{} converged, relays {}/{} converged, \
         forwarded {} (not forwarded {}), member-messages {} (resync {}), time to key p50 {} us \
         p99 {} us; GCKS: {} source, {} proactive, {} repair symbols, {} NACKs received; \
         relays: {} NACKs upstream, {} repair symbols downstream for {} NACKs",
        report.messages,
        report.converged,
        report.final_members,
        relays.converged,
        relays.relays,
        relays.forwarded,
        relays.not_forwarded,
        report.member_messages,
        report.applied_from_resync,
        report.time_to_key_quantile_us(0.5),
        report.time_to_key_quantile_us(0.99),
        report.sender.source_symbols_sent,
        report.sender.proactive_symbols_sent,
        report.sender.repair_symbols_sent,
        report.sender.nacks_received,
        relays.upstream_nacks,
        relays.downstream.repair_symbols_sent,
        relays.downstream.nacks_received,
    );
    assert_eq!(
        report.converged, report.final_members,
        "{name}: every member ends with the current group key"
    );
    assert_eq!(
        relays.converged, relays.relays,
        "{name}: every relay ends with the current group key"
    );
    assert_eq!(
        report.receivers.messages_applied, report.member_messages,
        "{name}: every member applied every message it needed"
    );
    assert_eq!(report.must_reregister, 0, "{name}: nobody re-registers");
    assert_eq!(
        report.signature_failures, 0,
        "{name}: honest traffic fails no signature"
    );
    assert_eq!(relays.bad_chunks, 0, "{name}: honest chunks all verify");
}

/// Upstream repair symbols per source symbol the GCKS sent.
fn upstream_repair_ratio(report: &ScenarioReport) -> f64 {
    report.sender.repair_symbols_sent as f64 / report.sender.source_symbols_sent.max(1) as f64
}

#[test]
fn ten_relays_of_a_hundred_members_converge_with_loss_on_both_tiers() {
    let config = scenario(
        11,
        10,
        100,
        10,
        Loss::Bernoulli { p: 0.05 },
        Loss::Bernoulli { p: 0.05 },
    );
    let report = run(&config).unwrap();
    assert_eq!(report.messages, 11);
    assert_converged("10x100, 5%/5%", &report);
    // The first message admits the relays themselves: they get it whole from the GCKS and
    // forward it; every later one too.
    assert_eq!(
        report.relays.forwarded + report.relays.not_forwarded,
        10 * 11,
        "every relay applied every message"
    );
    assert!(
        report.relays.not_forwarded <= 1,
        "relays forward what they receive ({} not forwarded)",
        report.relays.not_forwarded
    );
    // Members NACK their relay, never the GCKS: the GCKS hears only the relays.
    assert!(
        report.sender.nacks_received <= report.relays.upstream_nacks,
        "the GCKS's NACKs ({}) come from relays ({} sent)",
        report.sender.nacks_received,
        report.relays.upstream_nacks
    );
    assert!(
        report.relays.downstream.nacks_received > 0,
        "members behind relays NACK their relay"
    );
}

#[test]
fn upstream_repair_follows_upstream_loss_not_the_members_behind_the_relays() {
    let loss = Loss::Bernoulli { p: 0.05 };
    let small = run(&scenario(21, 10, 10, 8, loss, loss)).unwrap();
    assert_converged("10x10, 5%/5%", &small);
    let large = run(&scenario(21, 10, 100, 8, loss, loss)).unwrap();
    assert_converged("10x100, 5%/5%", &large);
    let clean = run(&scenario(21, 10, 100, 8, Loss::None, loss)).unwrap();
    assert_converged("10x100, 0%/5%", &clean);
    let heavy = run(&scenario(21, 10, 100, 8, Loss::Bernoulli { p: 0.2 }, loss)).unwrap();
    assert_converged("10x100, 20%/5%", &heavy);
    let (small_ratio, large_ratio, clean_ratio, heavy_ratio) = (
        upstream_repair_ratio(&small),
        upstream_repair_ratio(&large),
        upstream_repair_ratio(&clean),
        upstream_repair_ratio(&heavy),
    );
    eprintln!(
        "GCKS repair symbols per source symbol: 10 relays x 10 members {small_ratio:.3}, \
         x 100 members {large_ratio:.3} (5% upstream); upstream loss 0% {clean_ratio:.3}, \
         5% {large_ratio:.3}, 20% {heavy_ratio:.3}"
    );
    assert_eq!(
        clean.sender.repair_symbols_sent, 0,
        "no upstream loss, no upstream repair, whatever the loss behind the relays"
    );
    assert!(
        large_ratio <= small_ratio * 1.5 + 0.05,
        "ten times the members behind the relays: upstream repair {large_ratio:.3} vs \
         {small_ratio:.3} per source symbol"
    );
    assert!(
        heavy_ratio > large_ratio,
        "upstream repair grows with upstream loss: {heavy_ratio:.3} at 20% vs {large_ratio:.3} \
         at 5%"
    );
}

#[test]
fn members_of_a_dead_relay_notice_the_silence_and_resync_from_the_gcks() {
    let mut config = scenario(
        31,
        4,
        50,
        6,
        Loss::Bernoulli { p: 0.02 },
        Loss::Bernoulli { p: 0.02 },
    );
    // Heartbeats at least every second; silence after three.
    config.sender.heartbeat_max = Duration::from_secs(1);
    config.receiver.silence_timeout = Duration::from_secs(3);
    // Relay 1 dies right before the third rekey.
    config.kill_relay = Some((1, 3));
    let report = run(&config).unwrap();
    eprintln!(
        "dead relay: {}/{} members converged, {} state checks ({} after a silence), {} \
         member-messages applied by resync, relays left {}",
        report.converged,
        report.final_members,
        report.state_checks,
        report.receivers.silences,
        report.applied_from_resync,
        report.relays.relays,
    );
    assert_eq!(report.relays.relays, 3);
    assert_eq!(
        report.converged, report.final_members,
        "the dead relay's members converge too"
    );
    assert!(
        report.receivers.silences >= 40,
        "the dead relay's ~50 members noticed the silence ({})",
        report.receivers.silences
    );
    // The messages from the third rekey on, for the dead relay's members, came by resync.
    assert!(
        report.applied_from_resync >= 4 * 40,
        "resync from the GCKS carried them ({})",
        report.applied_from_resync
    );
    assert_eq!(report.must_reregister, 0);
}

#[test]
fn relays_started_in_sync_with_a_bootstrapped_group_forward_only_the_rekeys() {
    // The relays come in after the admitting message went out to nobody and take their own
    // chunk of it from the GCKS's history, as the bootstrapped members do: they forward the
    // rekeys, not the admitting message, and every member ends current without resync.
    let mut config = scenario(41, 4, 50, 2, Loss::None, Loss::Bernoulli { p: 0.05 });
    config.bootstrap_initial = true;
    config.bootstrap_relays = true;
    let report = run(&config).unwrap();
    let relays = &report.relays;
    eprintln!(
        "bootstrapped relays: members {}/{}, relays {}/{}, forwarded {}, not forwarded {}, \
         bootstrapped {}, resync {}",
        report.converged,
        report.final_members,
        relays.converged,
        relays.relays,
        relays.forwarded,
        relays.not_forwarded,
        report.bootstrapped,
        report.applied_from_resync,
    );
    assert_eq!(report.bootstrapped, 200);
    assert_eq!(relays.converged, 4);
    assert_eq!(report.converged, report.final_members);
    // Each relay forwarded the two rekeys and nothing of the admitting message.
    assert_eq!(relays.forwarded, 4 * 2);
    assert_eq!(report.applied_from_resync, 0);
}

/// A relay killed 8 ms into rekey 3's message (it has forwarded part of it; the members have
/// not all got their chunks), with 4 relays of 50 members each at 2% loss.
fn killed_mid_message(seed: u64, failover: bool) -> ScenarioConfig {
    let mut config = scenario(
        seed,
        4,
        50,
        4,
        Loss::Bernoulli { p: 0.02 },
        Loss::Bernoulli { p: 0.02 },
    );
    config.sender.heartbeat_max = Duration::from_secs(1);
    config.receiver.silence_timeout = Duration::from_secs(3);
    config.kill_relay = Some((1, 3));
    config.kill_relay_after = Some(Duration::from_millis(8));
    config.member_failover = failover;
    // Relays heartbeat at least every second: two seconds of silence is a dead relay.
    config.failover.idle_silence = Duration::from_secs(2);
    config
}

#[test]
fn members_of_a_relay_killed_mid_message_fail_over_to_another_relay_within_3_s() {
    let report = run(&killed_mid_message(41, true)).unwrap();
    let f = &report.failover;
    eprintln!(
        "failover: {} members on the killed relay, current {:?} after the kill, moves {:?}, \
         members per relay {:?} (+{} on the GCKS), member fetches to the GCKS {} (of the \
         killed relay's members {}), to relays {}",
        f.killed_relay_members,
        f.kill_to_current,
        f.moves,
        f.members_per_relay,
        f.members_on_gcks,
        f.member_fetches_to_gcks,
        f.killed_members_fetches_to_gcks,
        f.member_fetches_to_relays,
    );
    assert_converged("failover", &report);
    assert!(f.killed_relay_members >= 40, "{}", f.killed_relay_members);
    let took = f
        .kill_to_current
        .expect("the killed relay's members got current");
    assert!(
        took <= Duration::from_secs(3),
        "current {took:?} after the kill"
    );
    // Counted at their new relays: nobody is left on the dead relay, nobody on the GCKS.
    assert_eq!(f.members_per_relay[1], 0, "{:?}", f.members_per_relay);
    assert_eq!(f.members_on_gcks, 0);
    assert!(
        f.moves.nack_moves + f.moves.silence_moves + f.moves.unreachable_moves >= 40,
        "{:?}",
        f.moves
    );
    // Not through the GCKS's resync (without failover: about two fetches a member, 100).
    // A stray one is allowed: a member current on its new relay that is told of a message
    // not built yet asks every relay, then the GCKS (seed 41: one, at 8.7 s).
    assert!(
        f.killed_members_fetches_to_gcks <= 2,
        "{}",
        f.killed_members_fetches_to_gcks
    );
    assert_eq!(report.must_reregister, 0);
}

#[test]
fn without_failover_the_killed_relays_members_resync_from_the_gcks() {
    // The same run as the failover test, members without a relay directory (the behaviour
    // before failover): they resync from the GCKS and stay counted on the dead relay.
    let report = run(&killed_mid_message(41, false)).unwrap();
    let f = &report.failover;
    eprintln!(
        "no failover: current {:?} after the kill, fetches to the GCKS from the killed \
         relay's members {}",
        f.kill_to_current, f.killed_members_fetches_to_gcks
    );
    assert!(f.killed_members_fetches_to_gcks >= 40);
    assert!(f.members_per_relay[1] > 0, "still placed on the dead relay");
}
