//! Filtered deliveries in the rekey scenarios (`Deliveries::Filtered`): a member is not handed
//! the symbols its session drops unread. A run filtered and the same run unfiltered (both with
//! per-packet draws) must end the same for every member: the same keys, the same paths to
//! them, the same NACKs and times, the same sender figures; only the deliveries differ.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rekeycast::sim::rekey::{run, Deliveries, ScenarioConfig, ScenarioReport};
use rekeycast::sim::{LinkConfig, Loss};

fn pair(mut config: ScenarioConfig) -> (ScenarioReport, ScenarioReport) {
    config.deliveries = Deliveries::PerPacket;
    let all = run(&config).unwrap();
    config.deliveries = Deliveries::Filtered;
    let filtered = run(&config).unwrap();
    (all, filtered)
}

fn assert_same_outcomes(name: &str, all: &ScenarioReport, filtered: &ScenarioReport) {
    eprintln!(
        "{name}: {} members, {} converged; delivered {} unfiltered, {} filtered ({} skipped); \
         applied from source/decode/resync {}/{}/{}; NACKs {}",
        all.final_members,
        all.converged,
        all.network.delivered,
        filtered.network.delivered,
        filtered.network.filtered,
        all.applied_from_source,
        all.applied_from_decode,
        all.applied_from_resync,
        all.nacks_sent,
    );
    assert_eq!(all.converged, all.final_members, "{name}: not converged");
    assert_eq!(all.member_outcomes.len(), all.final_members);
    assert_eq!(all.member_outcomes, filtered.member_outcomes, "{name}");
    assert_eq!(all.time_to_key_us, filtered.time_to_key_us, "{name}");
    assert_eq!(all.out_of_sync, filtered.out_of_sync, "{name}");
    assert_eq!(all.converged, filtered.converged);
    assert_eq!(all.applied_from_source, filtered.applied_from_source);
    assert_eq!(all.applied_from_decode, filtered.applied_from_decode);
    assert_eq!(all.applied_from_resync, filtered.applied_from_resync);
    assert_eq!(all.nacks_sent, filtered.nacks_sent);
    assert_eq!(all.signature_checks, filtered.signature_checks);
    assert_eq!(all.sender.bytes_sent, filtered.sender.bytes_sent);
    assert_eq!(
        all.sender.repair_symbols_sent,
        filtered.sender.repair_symbols_sent
    );
    assert_eq!(all.network.sent(), filtered.network.sent());
    assert_eq!(all.network.bytes_sent(), filtered.network.bytes_sent());
    assert_eq!(all.relays.forwarded, filtered.relays.forwarded);
    assert_eq!(all.relays.upstream_nacks, filtered.relays.upstream_nacks);
    assert_eq!(
        all.relays.downstream.bytes_sent,
        filtered.relays.downstream.bytes_sent
    );
    assert_eq!(all.network.filtered, 0);
    assert!(filtered.network.filtered > 0, "{name}: nothing filtered");
    assert!(filtered.network.delivered < all.network.delivered);
    // Each skipped copy was either delivered unfiltered or lost on its downlink.
    assert!(filtered.network.delivered + filtered.network.filtered >= all.network.delivered);
    let dropped =
        |r: &ScenarioReport| r.receivers.dropped_other_block + r.receivers.dropped_finished;
    assert!(
        dropped(filtered) < dropped(all),
        "{name}: the skipped copies are among those the members dropped unread"
    );
}

/// Small blocks, so that a message has several and a member takes one of them.
fn small_blocks(mut config: ScenarioConfig) -> ScenarioConfig {
    config.message.max_block_symbols = 4;
    config
}

#[test]
fn filtered_run_ends_as_unfiltered_for_every_member() {
    let config = small_blocks(ScenarioConfig::new(
        0xF17,
        300,
        3,
        0.05,
        Loss::Bernoulli { p: 0.1 },
    ));
    let (all, filtered) = pair(config);
    assert_same_outcomes("direct, 10% loss", &all, &filtered);
}

#[test]
fn filtered_run_behind_relays_ends_as_unfiltered_for_every_member() {
    let mut config = small_blocks(ScenarioConfig::new(
        0xF18,
        300,
        2,
        0.02,
        Loss::Bernoulli { p: 0.05 },
    ));
    config.relays = 3;
    config.relay_downlink = LinkConfig {
        jitter: Duration::from_millis(1),
        ..LinkConfig::lossy(Loss::Bernoulli { p: 0.02 }, Duration::from_millis(5))
    };
    let (all, filtered) = pair(config);
    assert_same_outcomes("3 relays", &all, &filtered);
}

#[test]
fn filtered_run_of_bootstrapped_members_behind_relays_ends_as_unfiltered() {
    let mut config = small_blocks(ScenarioConfig::new(
        0xF19,
        400,
        1,
        0.01,
        Loss::Bernoulli { p: 0.05 },
    ));
    config.relays = 4;
    config.bootstrap_initial = true;
    config.bootstrap_relays = true;
    let (all, filtered) = pair(config);
    assert_same_outcomes("bootstrapped behind 4 relays", &all, &filtered);
}
