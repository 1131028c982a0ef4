//! The real engine over loopback multicast: a GCKS and 50 members in this process, each member
//! with its own socket and thread, 20 rekeys with churn under 5% loss simulated at receive,
//! while a forger sends garbage and wrongly keyed datagrams to the group from a raw socket.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::demo::{run, DemoConfig};
use rekeycast::sim::Loss;
use rekeycast::wire::{BodyRepr, ObjectKind, SymbolRepr};
use rekeycast_testkit::forge::{self, Sa};

/// The demo's group and SA.
const DEMO_SA: Sa = Sa {
    group_id: 1,
    spi: 1,
};

/// A group and port of this test process, away from other tests' groups.
fn group(salt: u8) -> SocketAddr {
    rekeycast_testkit::addr::multicast_group(78, salt)
}

/// Sends forged datagrams to `group` until `stop`: random bytes, and datagrams of the demo's
/// group and SA (group 1, SPI 1) with plausible symbols sealed under keys the forger made up.
fn forger(group: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let socket = rekeycast_testkit::addr::multicast_sender();
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    // Bounded in count and time: at most 200,000 datagrams, and it stops with the run.
    for i in 0..200_000u64 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let datagram = if i % 2 == 0 {
            forge::random_bytes(&mut rng, 1_300)
        } else {
            let data: Vec<u8> = (0..rng.gen_range(1..1_200)).map(|_| rng.gen()).collect();
            let symbol = SymbolRepr {
                object: if rng.gen() {
                    ObjectKind::Manifest
                } else {
                    ObjectKind::Chunks
                },
                sbn: 0,
                esi: rng.gen_range(0..50),
                data: &data,
            };
            let seq = rng.gen_range(1..30);
            DEMO_SA.wrongly_keyed(&mut rng, seq, BodyRepr::Symbol(symbol))
        };
        if socket.send_to(&datagram, group).is_ok() {
            sent.fetch_add(1, Ordering::Relaxed);
        }
        // About 2,000 forged datagrams a second.
        std::thread::sleep(Duration::from_micros(500));
    }
}

#[test]
fn fifty_members_twenty_rekeys_five_percent_loss_all_current_and_forgeries_cost_no_signature() {
    let config = DemoConfig {
        members: 50,
        rekeys: 20,
        churn: 0.1,
        loss: Loss::Bernoulli { p: 0.05 },
        group: group(1),
        seed: 7,
        ..DemoConfig::new()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let forged = Arc::new(AtomicU64::new(0));
    let forger_thread = {
        let (stop, forged) = (Arc::clone(&stop), Arc::clone(&forged));
        std::thread::spawn(move || forger(config.group, stop, forged))
    };
    let report = run(&config, |_| {});
    stop.store(true, Ordering::Relaxed);
    forger_thread.join().unwrap();
    let report = report.unwrap();
    let forged = forged.load(Ordering::Relaxed);
    eprintln!(
        "{} rekeys, forged {forged}, rejected {}, signature checks {}, resyncs {}, p99 {} us",
        report.rekeys.len(),
        report.rejected(),
        report.signature_checks(),
        report.resyncs,
        report.time_to_key.value_at_quantile(0.99)
    );
    assert!(report.all_current, "every member holds the current key");
    assert!(
        report.rekeys.iter().all(|r| r.missing == 0),
        "{:?}",
        report.rekeys
    );
    assert!(forged > 100, "the forger sent traffic");
    assert!(report.rejected() > 0, "forgeries were counted");
    // Every signature check is the manifest or the own chunk of a message a member applied:
    // forgeries caused none.
    let applied: u64 = report
        .members
        .iter()
        .map(|m| m.receiver.messages_applied)
        .sum();
    assert!(report.signature_checks() <= 2 * applied);
    assert!(report
        .members
        .iter()
        .all(|m| m.messages.signature_failures == 0));
}
