//! Signing-key rollover in the simulator, through the endpoints the engine runs: a planned
//! rollover that crosses a GCKS restart, and a compromised-key rollover that no member learns
//! from the network (each is told to re-register, none trusts the new key on its own).

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rekeycast::sim::rekey::{
    run, GcksRestart, RolloverMode, ScenarioConfig, ScenarioReport, SigningKeyRoll,
};
use rekeycast::sim::Loss;

fn summary(name: &str, report: &ScenarioReport) {
    eprintln!(
        "{name}: {} messages asked (latest seq {}), {}/{} converged, {} on the GCKS's key, \
         {} must re-register ({} for an unknown key), resync {} fetches, {} items applied, \
         restarts {}, reused seqs {}, signature failures {}",
        report.messages,
        report.gcks.latest_seq,
        report.converged,
        report.final_members,
        report.gcks.members_on_signing_key,
        report.must_reregister,
        report.gcks.reregister_unknown_key,
        report.resync.fetches,
        report.resync.items_applied,
        report.gcks.restarts,
        report.gcks.reused_seqs,
        report.signature_failures,
    );
}

/// 150 members, four rekeys at 2% churn and 5% loss, a durable GCKS, members that save their
/// keys. After rekey 2 the GCKS rolls its key (announced in two messages under the old key,
/// the third under the new one, all asked for by the GCKS itself), and crashes 200 ms later,
/// to be restored 300 ms after that from what it stored, under the key its stored tree names.
/// Every member ends on the latest message under the new key, none re-registers, and the
/// two rekeys after the rollover (joiners registered with the new key) go through.
#[test]
fn signing_key_rollover_across_a_gcks_restart() {
    let mut config = ScenarioConfig::new(61, 150, 4, 0.02, Loss::Bernoulli { p: 0.05 });
    config.durable = true;
    config.persist_member_keys = true;
    config.roll_signing_key = Some(SigningKeyRoll {
        rekey: 2,
        mode: RolloverMode::Planned { announcements: 2 },
    });
    config.restart_gcks = Some(GcksRestart {
        rekey: 2,
        after: Duration::from_millis(200),
        down: Duration::from_millis(300),
    });
    config.settle = Duration::from_secs(600);
    let report = run(&config).unwrap();
    summary("rollover across a restart", &report);
    assert_eq!(report.gcks.restarts, 1, "the GCKS was restored once");
    assert_eq!(
        report.gcks.latest_seq,
        report.messages + 3,
        "two announcing messages and the first under the new key, beside the rekeys asked"
    );
    assert_eq!(
        report.gcks.reused_seqs, 0,
        "no sequence number committed twice"
    );
    assert_eq!(report.converged, report.final_members);
    assert_eq!(report.receivers.messages_applied, report.member_messages);
    assert_eq!(report.must_reregister, 0, "nobody re-registers");
    assert_eq!(
        report.gcks.members_on_signing_key, report.final_members,
        "every member trusts the GCKS's new key"
    );
    assert_ne!(report.gcks.signing_key, [0; 32]);
    assert_eq!(report.gcks.stale_saved_keys, 0);
    assert!(!report.gcks.poisoned);
}

/// A compromised-key rollover after the last rekey: the next message is signed with a key no
/// member was told of. Each member takes the first datagrams under it as a sign it is behind,
/// fetches the message it needs next, finds it signed with the unknown key, and is told to
/// re-register for that reason; none ends trusting the new key, none applies the message.
#[test]
fn members_that_missed_the_rollover_are_told_to_reregister_and_never_trust_the_new_key() {
    let mut config = ScenarioConfig::new(62, 120, 2, 0.02, Loss::Bernoulli { p: 0.02 });
    config.durable = true;
    config.roll_signing_key = Some(SigningKeyRoll {
        rekey: 2,
        mode: RolloverMode::Compromised,
    });
    config.settle = Duration::from_secs(120);
    let report = run(&config).unwrap();
    summary("compromised rollover", &report);
    assert_eq!(report.gcks.latest_seq, report.messages + 1);
    assert_eq!(
        report.gcks.members_on_signing_key, 0,
        "no member trusts the new key from the network"
    );
    assert_eq!(
        report.must_reregister as usize, report.final_members,
        "every member is told to re-register"
    );
    assert_eq!(
        report.gcks.reregister_unknown_key as usize, report.final_members,
        "for the unknown signing key"
    );
    assert_eq!(
        report.converged, 0,
        "nobody derives the group key of the new message"
    );
    assert_eq!(
        report.signature_failures, 0,
        "the unknown key costs no signature check"
    );
}
