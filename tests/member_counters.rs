//! A member's datagram counters on loopback: every datagram it receives is counted once,
//! accepted or rejected (dropped by the receive filter, dropped before the MAC check, or
//! refused by the datagram checks), under a known mix of real traffic, forged, short,
//! wrong-group, stale and "ahead" datagrams; and the state checks that "ahead" traffic
//! triggers are not counted as resyncs.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rekeycast::gcks::{Gcks, GcksConfig};
use rekeycast::io::resync_client::Endpoint;
use rekeycast::member::{group_loss_filter, Member, MemberConfig, MemberStats};
use rekeycast::wire::{BodyRepr, ObjectKind, SymbolRepr};
use rekeycast_testkit::engine::{admit, rekey, wait_applied};
use rekeycast_testkit::forge::Sa;
use rekeycast_testkit::wait;

fn group(salt: u8) -> SocketAddr {
    rekeycast_testkit::addr::multicast_group(85, salt)
}

/// The identity an operator reads off the status: every datagram received is accepted or
/// rejected, once.
fn assert_identity(stats: &MemberStats) {
    assert_eq!(
        stats.datagrams_received,
        stats.datagrams_accepted + stats.datagrams_rejected,
        "{stats:#?}"
    );
    assert_eq!(
        stats.datagrams_rejected,
        stats.simulated_drops + stats.dropped_before_mac + stats.datagrams.rejected(),
        "{stats:#?}"
    );
    assert_eq!(stats.datagrams_accepted, stats.datagrams.accepted);
}

#[test]
fn every_datagram_received_is_accepted_or_rejected_once() {
    let group = group(0);
    let mut config = GcksConfig::loopback(group);
    config.batch_interval = Duration::from_secs(3600);
    config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[21; 32])).unwrap();
    let bundle = admit(&gcks, &[1, 2]).swap_remove(0);
    let mut member_config = MemberConfig::loopback(group, gcks.local_addr());
    member_config.resync_endpoints = vec![Endpoint::Tcp(gcks.resync_addrs().0.unwrap())];
    member_config.resync_max_delay = Duration::from_millis(20);
    // Every fifth datagram of the group is lost on the way.
    let mut count = 0u64;
    let member = Member::builder(member_config)
        .receive_filter(group_loss_filter(move || {
            count += 1;
            count % 5 == 0
        }))
        .start(&bundle)
        .unwrap();
    let members = [(1, member)];
    let seq = rekey(&gcks);
    wait_applied(&members, seq, wait::PATIENCE);
    let member = &members[0].1;
    let before = member.stats().unwrap();
    assert_identity(&before);

    // The mix: forged under a key nobody holds, too short, another group, a message already
    // applied, and one of a later message (which triggers a state check, not a resync).
    let sa = Sa {
        group_id: bundle.rekey_sa.group_id,
        spi: bundle.rekey_sa.spi,
    };
    let other = Sa {
        group_id: sa.group_id ^ 0x5555,
        spi: sa.spi,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let data = [0xAB; 100];
    let symbol = |esi| {
        BodyRepr::Symbol(SymbolRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            esi,
            data: &data,
        })
    };
    let next = before.next_seq;
    let mut mix = Vec::new();
    for esi in 0..40 {
        mix.push(sa.wrongly_keyed(&mut rng, next, symbol(esi)));
        mix.push(vec![0x01, 0x02, 0x03]);
        mix.push(other.wrongly_keyed(&mut rng, next, symbol(esi)));
        mix.push(sa.wrongly_keyed(&mut rng, next - 1, symbol(esi)));
    }
    // Sent more than once: the loss filter may take one.
    for esi in 0..3 {
        mix.push(sa.wrongly_keyed(&mut rng, next + 1, symbol(esi)));
    }
    let socket = rekeycast_testkit::addr::multicast_sender();
    for datagram in &mix {
        socket.send_to(datagram, group).unwrap();
    }
    let sent = mix.len() as u64;
    let after = wait::until(
        wait::PATIENCE,
        "the member received the mix and checked the state",
        || {
            let stats = member.stats().unwrap();
            (stats.datagrams_received >= before.datagrams_received + sent
                && stats.state_checks_started > before.state_checks_started)
                .then_some(stats)
        },
        || format!("{:#?}", member.stats().unwrap()),
    );
    assert_identity(&after);
    let grew = |f: fn(&MemberStats) -> u64| f(&after) - f(&before);
    // Each kind was seen (the loss filter takes one in five of them).
    assert!(grew(|s| s.datagrams.bad_mac) > 0, "{after:#?}");
    assert!(grew(|s| s.datagrams.malformed_header) > 0, "{after:#?}");
    assert!(grew(|s| s.datagrams.wrong_group) > 0, "{after:#?}");
    assert!(grew(|s| s.datagrams.ahead) > 0, "{after:#?}");
    assert!(grew(|s| s.dropped_before_mac) > 0, "{after:#?}");
    assert!(grew(|s| s.simulated_drops) > 0, "{after:#?}");
    assert!(grew(|s| s.datagrams_rejected) >= sent * 4 / 5, "{after:#?}");
    // The datagram checks alone miss what was dropped before them.
    assert!(
        after.datagrams.accepted + after.datagrams.rejected() < after.datagrams_received,
        "{after:#?}"
    );
    // The forged "ahead" datagram made the member check the group's state: a state check, no
    // resync.
    assert_eq!(after.resyncs_started, before.resyncs_started, "{after:#?}");
    let [(_, member)] = members;
    member.shutdown().unwrap();
}
