//! Relay failover on real sockets: a GCKS configured with a relay directory, two [`Relay`]s
//! and members as real engines in this process, over loopback multicast (each relay into its
//! own group).
//!
//! - the GCKS's bundles list the relays (least-loaded first), so the members spread over both;
//! - a relay killed: its members move to the other relay within the failover's bounds, leave
//!   the dead relay's group and join the live one's, and from then on take their rekeys by
//!   multicast from it (not by resync); the live relay counts their contacts (their state
//!   checks reach it) and its members by address in `/metrics`.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rekeycast::gcks::{Gcks, GcksConfig};
use rekeycast::io::resync_client::Endpoint;
use rekeycast::lkh::RegistrationBundle;
use rekeycast::member::{Member, MemberConfig};
use rekeycast::relay::directory::{RelayContactConfig, RelayDirectoryConfig};
use rekeycast::relay::{Relay, RelayEngineConfig};
use rekeycast_proto::endpoint::{ResyncEndpoint, ResyncProtocol};
use rekeycast_testkit::addr::{multicast_group, port};
use rekeycast_testkit::engine::{self, wait_sent};
use rekeycast_testkit::http::{get as http_get, metric};

/// The member ids the relays register with (members get small ids).
const RELAY_IDS: [u64; 2] = [1_000_001, 1_000_002];

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Relay `n`'s (1 or 2) downstream group, feedback address and TCP resync address: fixed
/// before the GCKS starts, so that its directory can name them.
fn relay_addrs(n: u8) -> (SocketAddr, SocketAddr, SocketAddr) {
    (
        multicast_group(95, n),
        localhost(port(10 + n)),
        localhost(port(20 + n)),
    )
}

fn start_gcks(up: SocketAddr) -> Gcks {
    let mut config = GcksConfig::loopback(up);
    config.batch_interval = Duration::from_secs(3600);
    config.sender.heartbeat_max = Duration::from_millis(250);
    config.resync_tcp = Some(localhost(0));
    config.relay_directory = RelayDirectoryConfig {
        relays: (1..=2)
            .map(|n| {
                let (group, feedback, tcp) = relay_addrs(n);
                RelayContactConfig {
                    id: u16::from(n),
                    group,
                    feedback,
                    resync: vec![Endpoint::Tcp(tcp)],
                }
            })
            .collect(),
        gcks: None,
    };
    Gcks::start(config, SigningKey::from_bytes(&[23; 32])).unwrap()
}

fn start_relay(gcks: &Gcks, up: SocketAddr, n: u8, bundle: &RegistrationBundle) -> Relay {
    let (down, feedback, tcp) = relay_addrs(n);
    let mut config = RelayEngineConfig::loopback(up, gcks.local_addr(), down);
    config.downstream_bind = feedback;
    config.resync_tcp = Some(tcp);
    config.resync_http = Some(localhost(0));
    config.resync.gcks = vec![ResyncEndpoint {
        protocol: ResyncProtocol::Tcp,
        addr: gcks.resync_addrs().0.unwrap(),
    }];
    config.resync.max_spread = Duration::from_millis(100);
    // Heartbeats well inside the members' idle silence, so only a dead relay is silent.
    config.session.downstream.heartbeat_max = Duration::from_millis(250);
    config.session.upstream.state_check_interval = Duration::from_millis(200);
    config.session.upstream.scheduler.seed = u64::from(n);
    Relay::start(bundle, config).unwrap()
}

/// A member started from its bundle: the bundle's directory decides its relay; its own
/// configuration names the GCKS only as a fallback. Members with an odd `seed` are configured
/// with a group nobody sends to: they listen to their relay's from the start all the same.
fn start_member(gcks: &Gcks, bundle: &RegistrationBundle, seed: u64) -> Member {
    let first = &bundle.directory.relays[0];
    let group = if seed % 2 == 1 {
        multicast_group(95, 5)
    } else {
        first.group
    };
    let mut config = MemberConfig::loopback(group, first.feedback);
    config.resync_endpoints = vec![Endpoint::Tcp(gcks.resync_addrs().0.unwrap())];
    config.resync_max_delay = Duration::from_millis(100);
    config.resync_timeout = Duration::from_secs(2);
    config.receiver.state_check_interval = Duration::from_millis(200);
    config.receiver.silence_timeout = Duration::from_secs(5);
    config.failover.idle_silence = Duration::from_millis(1_000);
    config.failover.nack_silence = Duration::from_millis(500);
    config.failover.backoff_initial = Duration::from_millis(200);
    config.seed = Some(seed);
    config.receiver.scheduler.seed = seed;
    Member::start(bundle, config).unwrap()
}

#[test]
fn members_of_a_dead_relay_move_to_the_next_one_and_listen_to_its_group() {
    let up = multicast_group(95, 0);
    let gcks = start_gcks(up);
    let mut ids = RELAY_IDS.to_vec();
    ids.extend(1..=6);
    let bundles = engine::admit_with(&gcks, &ids, |id| RELAY_IDS.contains(&id));
    let relays: Vec<Relay> = (1..=2)
        .map(|n| start_relay(&gcks, up, n, &bundles[usize::from(n) - 1]))
        .collect();
    let members: Vec<(u64, Member)> = bundles[2..]
        .iter()
        .zip(1..)
        .map(|(bundle, id)| (id, start_member(&gcks, bundle, id)))
        .collect();
    // The GCKS spread its members over both relays, and listed the other relay second.
    let first_relay: Vec<u16> = bundles[2..]
        .iter()
        .map(|b| b.directory.relays[0].id)
        .collect();
    assert_eq!(first_relay.iter().filter(|&&r| r == 1).count(), 3);
    for bundle in &bundles[2..] {
        assert_eq!(bundle.directory.relays.len(), 2, "{:?}", bundle.directory);
    }
    wait_sent(&gcks, 1);
    engine::wait_applied(&members, 1, Duration::from_secs(20));
    let seq = engine::rekey(&gcks);
    engine::wait_applied(&members, seq, Duration::from_secs(20));
    for (id, member) in &members {
        let stats = member.stats().unwrap();
        assert_eq!(stats.listen_moves, id % 2, "member {id}: {stats:?}");
        // From the relay's multicast, by repair at worst: none by resync.
        assert_eq!(
            stats.receiver.applied_from_resync, 0,
            "member {id}: {stats:?}"
        );
        assert!(stats.relay.is_some(), "member {id}");
    }

    // Relay 1 dies between messages; its members hear no heartbeat and move to relay 2.
    let mut relays = relays.into_iter();
    relays.next().unwrap().abort().unwrap();
    let survivor = relays.next().unwrap();
    let orphans: Vec<u64> = members
        .iter()
        .zip(&first_relay)
        .filter(|(_, &relay)| relay == 1)
        .map(|((id, _), _)| *id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let moved = members
            .iter()
            .filter(|(id, _)| orphans.contains(id))
            .all(|(_, m)| m.stats().unwrap().relay == Some(2));
        if moved {
            break;
        }
        assert!(Instant::now() < deadline, "relay 1's members did not move");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed_at = Instant::now();
    let seq = engine::rekey(&gcks);
    engine::wait_applied(&members, seq, Duration::from_secs(20));
    let before: Vec<u64> = members
        .iter()
        .map(|(_, m)| m.stats().unwrap().receiver.applied_from_resync)
        .collect();
    // The next messages come by multicast from relay 2, in its group: no resync at all.
    for _ in 0..2 {
        let seq = engine::rekey(&gcks);
        engine::wait_applied(&members, seq, Duration::from_secs(20));
    }
    for ((id, member), before) in members.iter().zip(before) {
        let stats = member.stats().unwrap();
        assert_eq!(stats.relay, Some(2), "member {id}: {stats:?}");
        assert_eq!(
            stats.receiver.applied_from_resync, before,
            "member {id} took messages by resync after its move: {stats:?}"
        );
        let expected_moves = u64::from(orphans.contains(id));
        assert_eq!(
            stats.listen_moves,
            id % 2 + expected_moves,
            "member {id}: {stats:?}"
        );
        let moves = stats.failover.nack_moves
            + stats.failover.silence_moves
            + stats.failover.unreachable_moves;
        assert_eq!(moves, expected_moves, "member {id}: {stats:?}");
    }
    // The orphans' state checks reached relay 2: it counts them. Here every member has the
    // address 127.0.0.1, which the tally counts once; each one's contact is counted.
    let stats = survivor.stats().unwrap();
    assert!(
        stats.member_tally.resync_contacts >= orphans.len() as u64,
        "{} members moved to relay 2: {:?}",
        orphans.len(),
        stats.member_tally
    );
    assert_eq!(stats.members, 1, "{:?}", stats.member_tally);
    let http = survivor.resync_addrs().1.unwrap();
    // `/metrics` is rendered at most once a second: ask until it shows the contacts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = http_get(http, "/metrics");
        assert_eq!(status, 200);
        if metric(&text, "rekeycast_relay_member_contacts_total") >= orphans.len() as u64 {
            assert_eq!(metric(&text, "rekeycast_relay_members"), 1, "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "relay 1 killed: its {} members moved to relay 2 and applied 3 messages from it in \
         {:?}; relay 2 counts {} members ({:?})",
        orphans.len(),
        killed_at.elapsed(),
        stats.members,
        stats.member_tally
    );
    for (_, member) in members {
        member.shutdown().unwrap();
    }
    survivor.shutdown().unwrap();
    gcks.shutdown().unwrap();
}
