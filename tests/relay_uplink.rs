//! Relays on unicast uplinks, on real sockets: a GCKS that multicasts nothing sends its rekeys
//! to its registered relays by unicast UDP, each relay multicasts them into its own group
//! (loopback), and a relay behind a relay takes them by unicast from the first.
//!
//! - three relays on unicast uplinks with loss on each uplink and on every member's link: the
//!   members stay current through rekeys with churn, the relays' NACKs are answered over the
//!   same unicast path, and nothing reaches the GCKS's multicast group;
//! - a relay behind a relay, both on unicast uplinks: the members of the second are current.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::engine::driver::ReceiveFilter;
use rekeycast::gcks::{Gcks, GcksConfig};
use rekeycast::io::resync_client::Endpoint;
use rekeycast::lkh::{MemberId, RegistrationBundle};
use rekeycast::member::{group_loss_filter, Member, MemberConfig};
use rekeycast::relay::uplink::UnicastRelays;
use rekeycast::relay::{Relay, RelayEngineConfig, RelayStats};
use rekeycast::sim::{Loss, LossModel};
use rekeycast_proto::endpoint::{Port, ResyncEndpoint, ResyncProtocol};
use rekeycast_testkit::engine::{self, wait_sent};

/// Member ids of relays start here (members get small ids).
const RELAY_ID: u64 = 1_000_000;

/// Group `salt` of this test binary in this process.
fn group(salt: u8) -> SocketAddr {
    rekeycast_testkit::addr::multicast_group(93, salt)
}

/// A fixed loopback port of this process, away from the groups' ports.
fn fixed(slot: u8) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        rekeycast_testkit::addr::port(16 + slot),
    ))
}

fn localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A GCKS that sends only to `relays`, by unicast.
fn start_gcks(group: SocketAddr, relays: Vec<SocketAddr>) -> Gcks {
    let mut config = GcksConfig::loopback(group);
    config.batch_interval = Duration::from_secs(3600);
    config.sender.heartbeat_max = Duration::from_millis(500);
    config.resync_tcp = Some(localhost());
    config.unicast_relays = UnicastRelays {
        relays,
        unicast_only: true,
    };
    config.validate().unwrap();
    Gcks::start(config, SigningKey::from_bytes(&[23; 32])).unwrap()
}

/// A relay on a unicast uplink at `uplink`, whose upstream sender takes NACKs at `upstream`,
/// multicasting into `down`.
fn relay_config(
    gcks: &Gcks,
    upstream: SocketAddr,
    uplink: SocketAddr,
    down: SocketAddr,
) -> RelayEngineConfig {
    // The upstream group is not joined on a unicast uplink: any group will do.
    let mut config = RelayEngineConfig::loopback(group(31), upstream, down);
    config.upstream_unicast = true;
    config.upstream_bind = uplink;
    config.resync.gcks = vec![ResyncEndpoint {
        protocol: ResyncProtocol::Tcp,
        addr: gcks.resync_addrs().0.unwrap(),
    }];
    config.resync.max_spread = Duration::from_millis(100);
    config.resync_tcp = Some(localhost());
    config.session.downstream.heartbeat_max = Duration::from_millis(500);
    config.session.upstream.scheduler.seed = u64::from(uplink.port());
    config
}

/// Drops each datagram the relay gets on its unicast uplink with probability `p` (seeded).
fn uplink_loss(p: f64, seed: u64) -> ReceiveFilter {
    let mut model = LossModel::new(Loss::Bernoulli { p }).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Box::new(move |port, _, _| port != Port::Feedback || !model.lose(&mut rng))
}

/// A member on `down` behind `relay`, losing 5% of its group's datagrams.
fn start_member(
    bundle: &RegistrationBundle,
    down: SocketAddr,
    relay: &Relay,
    gcks: &Gcks,
    id: u64,
) -> Member {
    let mut config = MemberConfig::loopback(down, relay.feedback_addr());
    config.resync_relays = vec![Endpoint::Tcp(relay.resync_addrs().0.unwrap())];
    config.resync_endpoints = vec![Endpoint::Tcp(gcks.resync_addrs().0.unwrap())];
    config.resync_max_delay = Duration::from_millis(200);
    config.receiver.state_check_interval = Duration::from_millis(200);
    config.receiver.scheduler.seed = id;
    config.seed = Some(id);
    let mut rng = ChaCha8Rng::seed_from_u64(id);
    Member::builder(config)
        .receive_filter(group_loss_filter(move || rng.gen_bool(0.05)))
        .start(bundle)
        .unwrap()
}

/// Waits until the relay applied message `seq`.
fn wait_relay(relay: &Relay, seq: u64) -> RelayStats {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = relay.stats().unwrap();
        if stats.next_seq > seq {
            return stats;
        }
        assert!(Instant::now() < deadline, "relay stuck: {stats:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A socket joined to `group` on loopback: what the GCKS multicasts would reach it.
fn group_listener(group: SocketAddr) -> UdpSocket {
    let SocketAddr::V4(v4) = group else {
        unreachable!("loopback groups are IPv4")
    };
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, group.port())).into())
        .unwrap();
    socket
        .join_multicast_v4(v4.ip(), &Ipv4Addr::LOCALHOST)
        .unwrap();
    socket.set_nonblocking(true).unwrap();
    socket.into()
}

#[test]
fn relays_on_unicast_uplinks_keep_their_members_current_and_the_gcks_multicasts_nothing() {
    let up = group(0);
    let listener = group_listener(up);
    let uplinks: Vec<SocketAddr> = (0..3).map(fixed).collect();
    let gcks = start_gcks(up, uplinks.clone());
    let per_relay = 3u64;
    let mut ids = Vec::new();
    for r in 0..3u64 {
        ids.push(RELAY_ID + r);
        ids.extend((1..=per_relay).map(|m| r * 100 + m));
    }
    let bundles = engine::admit_with(&gcks, &ids, |id| id >= RELAY_ID);
    let mut bundles = ids.iter().copied().zip(bundles);
    let mut relays = Vec::new();
    let mut members: Vec<(u64, Member)> = Vec::new();
    for (r, &uplink) in uplinks.iter().enumerate() {
        let down = group(1 + r as u8);
        let (_, bundle) = bundles.next().unwrap();
        let relay = Relay::builder(relay_config(&gcks, gcks.local_addr(), uplink, down))
            .receive_filter(uplink_loss(0.05, 40 + r as u64))
            .start(&bundle)
            .unwrap();
        for _ in 0..per_relay {
            let (id, bundle) = bundles.next().unwrap();
            members.push((id, start_member(&bundle, down, &relay, &gcks, id)));
        }
        relays.push((down, relay));
    }
    wait_sent(&gcks, 1);
    engine::wait_applied(&members, 1, Duration::from_secs(20));
    // Rekeys with churn: a member of each relay leaves and one joins, in one batch.
    for round in 0..4 {
        let seq = gcks.stats().unwrap().seq + 1;
        for r in 0..relays.len() {
            let index = members
                .iter()
                .position(|(id, _)| *id / 100 == r as u64)
                .unwrap();
            let (id, member) = members.swap_remove(index);
            gcks.leave(MemberId(id)).unwrap();
            member.shutdown().unwrap();
        }
        let joiners: Vec<u64> = (0..relays.len() as u64)
            .map(|r| r * 100 + 50 + round)
            .collect();
        for (bundle, id) in engine::admit(&gcks, &joiners).into_iter().zip(joiners) {
            let (down, relay) = &relays[(id / 100) as usize];
            members.push((id, start_member(&bundle, *down, relay, &gcks, id)));
        }
        wait_sent(&gcks, seq);
        engine::wait_applied(&members, seq, Duration::from_secs(20));
    }
    let gcks_stats = gcks.stats().unwrap();
    let last = gcks_stats.seq;
    let version = gcks_stats.group_key_version;
    for (id, member) in &members {
        let stats = member.stats().unwrap();
        assert_eq!(stats.group_key_version, Some(version), "member {id}");
    }
    let mut upstream_nacks = 0;
    let mut drops = 0;
    for (_, relay) in &relays {
        let stats = wait_relay(relay, last);
        assert_eq!(stats.relay.forwarded, last, "{stats:?}");
        assert_eq!(stats.relay.not_forwarded, 0, "{stats:?}");
        upstream_nacks += stats.upstream.nacks_sent;
        drops += stats.simulated_drops;
    }
    assert!(drops > 0, "the uplinks lost datagrams");
    let uplink = gcks_stats.uplinks;
    let ratio =
        uplink.bytes as f64 / (relays.len() as f64 * gcks_stats.sender.source_bytes_sent as f64);
    eprintln!(
        "{last} messages over 3 unicast uplinks at 5% loss: {} datagrams, {} bytes to the \
         relays ({} group datagrams each), {} source bytes a message set: {ratio:.3} x relays x \
         source bytes; relays' upstream NACKs {upstream_nacks}, GCKS repair symbols {}",
        uplink.datagrams,
        uplink.bytes,
        uplink.group_datagrams,
        gcks_stats.sender.source_bytes_sent,
        gcks_stats.sender.repair_symbols_sent,
    );
    assert_eq!(uplink.datagrams, 3 * uplink.group_datagrams);
    assert!(
        gcks_stats.sender.repair_symbols_sent > 0 || upstream_nacks == 0,
        "the relays' NACKs were answered over the uplinks"
    );
    // Nothing reached the GCKS's group: it multicasts nothing with unicast only. The GCKS
    // sent every datagram above before this read, and loopback multicast is delivered as it
    // is sent.
    let mut buf = [0u8; 2048];
    let heard = listener.recv_from(&mut buf);
    assert!(
        heard
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the GCKS multicast: {heard:?}"
    );
    for (_, member) in members {
        member.shutdown().unwrap();
    }
    for (_, relay) in relays {
        relay.shutdown().unwrap();
    }
    gcks.shutdown().unwrap();
}

#[test]
fn a_relay_behind_a_relay_takes_its_rekeys_over_a_unicast_uplink_too() {
    let up = group(8);
    let (down1, down2) = (group(9), group(10));
    let (uplink1, uplink2) = (fixed(8), fixed(9));
    let gcks = start_gcks(up, vec![uplink1]);
    let ids = [RELAY_ID, RELAY_ID + 1, 1, 2, 3];
    let bundles = engine::admit_with(&gcks, &ids, |id| id >= RELAY_ID);
    let mut first = relay_config(&gcks, gcks.local_addr(), uplink1, down1);
    first.session.unicast_relays = UnicastRelays {
        relays: vec![uplink2],
        unicast_only: false,
    };
    first.validate().unwrap();
    let relay1 = Relay::start(&bundles[0], first).unwrap();
    let second = relay_config(&gcks, relay1.feedback_addr(), uplink2, down2);
    let relay2 = Relay::builder(second)
        .receive_filter(uplink_loss(0.05, 9))
        .start(&bundles[1])
        .unwrap();
    let members: Vec<(u64, Member)> = bundles[2..]
        .iter()
        .zip(1..)
        .map(|(bundle, id)| (id, start_member(bundle, down2, &relay2, &gcks, id)))
        .collect();
    wait_sent(&gcks, 1);
    engine::wait_applied(&members, 1, Duration::from_secs(20));
    gcks.leave(MemberId(3)).unwrap();
    gcks.rekey_now().unwrap();
    wait_sent(&gcks, 2);
    engine::wait_applied(&members[..2], 2, Duration::from_secs(20));
    let stats1 = wait_relay(&relay1, 2);
    let stats2 = wait_relay(&relay2, 2);
    assert_eq!(stats2.relay.forwarded, 2, "{stats2:?}");
    assert!(stats1.uplinks.datagrams > 0, "{stats1:?}");
    assert_eq!(stats1.uplinks.datagrams, stats1.uplinks.group_datagrams);
    for (_, member) in members {
        member.shutdown().unwrap();
    }
    relay2.shutdown().unwrap();
    relay1.shutdown().unwrap();
    gcks.shutdown().unwrap();
}
