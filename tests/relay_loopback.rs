//! The relay on real sockets: a GCKS, a [`Relay`] and members as real engines in
//! this process, over loopback multicast (the upstream and downstream groups on their own
//! addresses and ports, `IP_MULTICAST_IF` 127.0.0.1), each with its own sockets and threads.
//!
//! - members behind a relay stay current through rekeys with churn under simulated loss on
//!   both tiers, and the relay forwards every message;
//! - the relay killed mid-rekey: its members notice the silence, their state check and resync
//!   fall through the dead relay's endpoint to the GCKS's, and they converge;
//! - the relay restarted from its state directory serves its stored messages at once, answers
//!   "not held" for the messages it got by resync only while its members fall through to the
//!   GCKS for them, and serves `/metrics` and `/healthz`;
//! - forged and wrongly keyed upstream datagrams are counted and nothing is forwarded for them;
//!   downstream NACKs with a bad MAC cause no repair.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::engine::driver::{FeedbackLimit, ReceiveFilter};
use rekeycast::gcks::{Gcks, GcksConfig, ResyncAnswer};
use rekeycast::io::resync_client::{fetch_items, Endpoint};
use rekeycast::lkh::{MemberId, RegistrationBundle};
use rekeycast::member::{group_loss_filter, Member, MemberConfig};
use rekeycast::relay::{Relay, RelayBuilder, RelayEngineConfig, RelayStats};
use rekeycast::session::ReceiverEvent;
use rekeycast::sim::Loss;
use rekeycast::sim::LossModel;
use rekeycast::wire::{BodyRepr, NackRepr, ObjectKind, SymbolRepr};
use rekeycast_proto::endpoint::{Port, ResyncEndpoint, ResyncProtocol};
use rekeycast_testkit::addr;
use rekeycast_testkit::engine::{self, wait_sent};
use rekeycast_testkit::forge::Sa;
use rekeycast_testkit::http::{get as http_get, metric};

/// The group id and SPI of [`GcksConfig::loopback`].
const GROUP_ID: u32 = 1;
const SPI: u32 = 1;
/// The member id the relay registers with (members get small ids).
const RELAY_ID: u64 = 1_000_000;

/// The upstream (`tier` 0) or downstream (`tier` 1) group and port of test `salt` in this
/// process, away from other tests' groups.
fn group(salt: u8, tier: u8) -> SocketAddr {
    rekeycast_testkit::addr::multicast_group(83 + tier, 2 * salt + tier)
}

fn localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn start_gcks(group: SocketAddr) -> Gcks {
    start_gcks_pacing(group, GcksConfig::loopback(group).sender.send_rate)
}

/// A GCKS whose initial transmissions go out at `send_rate` datagrams per second, one at a
/// time.
fn start_gcks_pacing(group: SocketAddr, send_rate: f64) -> Gcks {
    let mut config = GcksConfig::loopback(group);
    config.sender.send_rate = send_rate;
    config.sender.burst = 1;
    config.batch_interval = Duration::from_secs(3600);
    config.sender.heartbeat_max = Duration::from_millis(500);
    config.resync_tcp = Some(localhost());
    Gcks::start(config, SigningKey::from_bytes(&[21; 32])).unwrap()
}

/// Admits `ids` in one batch; returns their bundles in order once the batch is built (its
/// message goes out after the admission delay).
fn admit(gcks: &Gcks, ids: &[u64]) -> Vec<RegistrationBundle> {
    engine::admit_with(gcks, ids, |id| id == RELAY_ID)
}

fn relay_config(gcks: &Gcks, up: SocketAddr, down: SocketAddr) -> RelayEngineConfig {
    let mut config = RelayEngineConfig::loopback(up, gcks.local_addr(), down);
    config.resync.gcks = vec![ResyncEndpoint {
        protocol: ResyncProtocol::Tcp,
        addr: gcks.resync_addrs().0.unwrap(),
    }];
    config.resync.max_spread = Duration::from_millis(100);
    config.resync.fetch_timeout = Duration::from_secs(2);
    config.resync_tcp = Some(localhost());
    config.resync_http = Some(localhost());
    // Heartbeats well inside the members' silence timeout, so only a dead relay is silent.
    config.session.downstream.heartbeat_max = Duration::from_millis(500);
    config.session.upstream.state_check_interval = Duration::from_millis(200);
    config.session.upstream.scheduler.seed = 5;
    config
}

/// Drops each upstream group datagram with probability `p` (seeded): simulated loss on the
/// relay's upstream tier.
fn upstream_loss(p: f64, seed: u64) -> ReceiveFilter {
    let mut model = LossModel::new(Loss::Bernoulli { p }).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Box::new(move |port, _, _| port != Port::Listen || !model.lose(&mut rng))
}

/// A member behind `relay`: its feedback goes to the relay, it resyncs from the relay, then
/// the GCKS, and a silence of 2 s makes it ask for the group's state.
fn member_config(down: SocketAddr, relay: &Relay, gcks: &Gcks, seed: u64) -> MemberConfig {
    let mut config = MemberConfig::loopback(down, relay.feedback_addr());
    config.resync_relays = vec![Endpoint::Tcp(relay.resync_addrs().0.unwrap())];
    config.resync_endpoints = vec![Endpoint::Tcp(gcks.resync_addrs().0.unwrap())];
    config.resync_max_delay = Duration::from_millis(200);
    config.resync_timeout = Duration::from_secs(2);
    config.resync_attempts = 3;
    config.receiver.state_check_interval = Duration::from_millis(200);
    config.receiver.silence_timeout = Duration::from_secs(2);
    config.receiver.scheduler.seed = seed;
    config.seed = Some(seed);
    config
}

/// Starts a member with `config`, losing each group datagram with probability `loss` (seeded
/// by `seed`).
fn start_member(
    bundle: &RegistrationBundle,
    config: MemberConfig,
    loss: Option<f64>,
    seed: u64,
) -> Member {
    let mut builder = Member::builder(config);
    if let Some(p) = loss {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        builder = builder.receive_filter(group_loss_filter(move || rng.gen_bool(p)));
    }
    builder.start(bundle).unwrap()
}

/// Waits until every member applied message `seq`, at most `limit`; returns how long it took.
fn wait_members(members: &[(u64, Member)], seq: u64, limit: Duration) -> Duration {
    engine::wait_applied(members, seq, limit)
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

/// Every member holds the GCKS's current group key, checked no signature it should not
/// have, and was never told to register again.
fn assert_current(members: &[(u64, Member)], gcks: &Gcks) {
    let version = gcks.stats().unwrap().group_key_version;
    for (id, member) in members {
        let stats = member.stats().unwrap();
        assert_eq!(
            stats.group_key_version,
            Some(version),
            "member {id}: {stats:?}"
        );
        assert_eq!(stats.messages.signature_failures, 0, "member {id}");
        while let Ok(event) = member.events().try_recv() {
            assert_ne!(event, ReceiverEvent::MustReregister, "member {id}");
        }
    }
}

/// Admits the relay and `count` members (ids 1..=count) in message 1 and starts them all.
fn relay_and_members(
    gcks: &Gcks,
    down: SocketAddr,
    relay: RelayBuilder,
    count: u64,
    loss: Option<f64>,
) -> (Relay, Vec<(u64, Member)>) {
    let mut ids = vec![RELAY_ID];
    ids.extend(1..=count);
    let mut bundles = admit(gcks, &ids).into_iter();
    let relay = relay.start(&bundles.next().unwrap()).unwrap();
    let members = bundles
        .zip(1..)
        .map(|(bundle, id)| {
            let config = member_config(down, &relay, gcks, id);
            (id, start_member(&bundle, config, loss, id))
        })
        .collect();
    (relay, members)
}

fn shutdown(members: Vec<(u64, Member)>) {
    for (_, member) in members {
        member.shutdown().unwrap();
    }
}

#[test]
fn members_behind_a_relay_stay_current_through_churn_and_loss() {
    let (up, down) = (group(1, 0), group(1, 1));
    let gcks = start_gcks(up);
    let mut config = relay_config(&gcks, up, down);
    config.session.downstream_group_size = Some(16);
    let relay = Relay::builder(config).receive_filter(upstream_loss(0.05, 77));
    let (relay, mut members) = relay_and_members(&gcks, down, relay, 14, Some(0.05));
    wait_sent(&gcks, 1);
    wait_members(&members, 1, Duration::from_secs(20));
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut next_id = 100;
    let rounds = 6;
    let mut slowest = Duration::ZERO;
    for _ in 0..rounds {
        // Two leave, two join, in one batch.
        for _ in 0..2 {
            let (id, member) = members.swap_remove(rng.gen_range(0..members.len()));
            gcks.leave(MemberId(id)).unwrap();
            member.shutdown().unwrap();
        }
        let seq = gcks.stats().unwrap().seq + 1;
        let ids = [next_id, next_id + 1];
        next_id += 2;
        for (bundle, id) in admit(&gcks, &ids).into_iter().zip(ids) {
            let config = member_config(down, &relay, &gcks, id);
            members.push((id, start_member(&bundle, config, Some(0.05), id)));
        }
        wait_sent(&gcks, seq);
        slowest = slowest.max(wait_members(&members, seq, Duration::from_secs(20)));
    }
    assert_current(&members, &gcks);
    let gcks_stats = gcks.stats().unwrap();
    assert_eq!(gcks_stats.relays, 1, "the GCKS knows its relay");
    assert_eq!(gcks_stats.members, members.len() + 1);
    let last = gcks_stats.seq;
    let stats = wait_relay(&relay, last);
    let nacks: u64 = members
        .iter()
        .map(|(_, m)| m.stats().unwrap().receiver.nacks_sent)
        .sum();
    let resyncs: u64 = members
        .iter()
        .map(|(_, m)| m.stats().unwrap().resyncs_started)
        .sum();
    eprintln!(
        "{} messages, {} members now, slowest round {:?}: relay forwarded {} (not forwarded {}), \
         upstream NACKs {}, simulated upstream drops {}, downstream NACKs {}, downstream repair \
         symbols {}, member NACKs {nacks}, member resyncs {resyncs}, GCKS repair symbols {}",
        last,
        members.len(),
        slowest,
        stats.relay.forwarded,
        stats.relay.not_forwarded,
        stats.upstream.nacks_sent,
        stats.simulated_drops,
        stats.downstream.nacks_received,
        stats.downstream.repair_symbols_sent,
        gcks.stats().unwrap().sender.repair_symbols_sent,
    );
    // Every message came to the relay by multicast and went on downstream.
    assert_eq!(stats.relay.forwarded, last, "{stats:?}");
    assert_eq!(stats.relay.not_forwarded, 0, "{stats:?}");
    assert_eq!(stats.relay.forward_failures, 0);
    assert_eq!(stats.store_failures + stats.key_save_failures, 0);
    assert_eq!(stats.upstream_messages.signature_failures, 0);
    assert!(
        stats.simulated_drops > 0,
        "the relay's upstream lost datagrams"
    );
    // Downstream members NACKed the relay, not the GCKS: the GCKS heard only the relay.
    assert!(
        stats.downstream.nacks_received > 0 || nacks == 0,
        "{stats:?}"
    );
    shutdown(members);
    // The relay leaves: the GCKS no longer counts it.
    gcks.leave(MemberId(RELAY_ID)).unwrap();
    gcks.rekey_now().unwrap();
    wait_sent(&gcks, last + 1);
    assert_eq!(gcks.stats().unwrap().relays, 0);
    relay.shutdown().unwrap();
    gcks.shutdown().unwrap();
}

#[test]
fn relay_kill_members_resync_from_gcks() {
    let (up, down) = (group(2, 0), group(2, 1));
    // Slow pacing (a datagram every 50 ms), so that the relay can be killed with a message
    // half forwarded.
    let gcks = start_gcks_pacing(up, 20.0);
    let config = relay_config(&gcks, up, down);
    let (relay, members) = relay_and_members(&gcks, down, Relay::builder(config), 12, None);
    wait_sent(&gcks, 1);
    wait_members(&members, 1, Duration::from_secs(20));
    gcks.rekey_now().unwrap();
    wait_sent(&gcks, 2);
    wait_members(&members, 2, Duration::from_secs(20));
    let before: u64 = members
        .iter()
        .map(|(_, m)| m.stats().unwrap().resyncs_started)
        .sum();
    assert_eq!(before, 0, "no resync while the relay lives");

    // Killed in the middle of rekey 3: as soon as it forwarded the first of it (cut-through),
    // long before the rest arrives.
    let before = relay.stats().unwrap();
    gcks.rekey_now().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let at_kill = loop {
        let stats = relay.stats().unwrap();
        if stats.relay.cut_through_sent > before.relay.cut_through_sent {
            break stats;
        }
        assert!(
            Instant::now() < deadline,
            "the relay forwarded nothing: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let killed = Instant::now();
    relay.abort().unwrap();
    assert_eq!(
        at_kill.relay.forwarded, 2,
        "killed before message 3 was whole: {at_kill:?}"
    );
    wait_sent(&gcks, 3);
    let first = wait_members(&members, 3, Duration::from_secs(20));
    // Two more rekeys: nothing reaches the members by multicast any more.
    for seq in 4..=5 {
        gcks.rekey_now().unwrap();
        wait_sent(&gcks, seq);
    }
    let converged = wait_members(&members, 5, Duration::from_secs(30));
    let since_kill = killed.elapsed();
    assert_current(&members, &gcks);
    let stats: Vec<_> = members.iter().map(|(_, m)| m.stats().unwrap()).collect();
    let silences: u64 = stats.iter().map(|s| s.receiver.silences).sum();
    let resyncs: u64 = stats.iter().map(|s| s.resyncs_started).sum();
    let from_resync: u64 = stats.iter().map(|s| s.receiver.applied_from_resync).sum();
    eprintln!(
        "{} members: message 3 (half forwarded when the relay died) everywhere {first:?} after \
         the kill, message 5 {converged:?} after its send ({since_kill:?} after the kill); \
         silences {silences}, resyncs and state checks {resyncs}, messages applied from resync \
         {from_resync}",
        members.len()
    );
    for (s, (id, _)) in stats.iter().zip(&members) {
        assert!(
            s.receiver.silences >= 1,
            "member {id} noticed the silence: {s:?}"
        );
        assert!(s.receiver.applied_from_resync >= 3, "member {id}: {s:?}");
    }
    // The GCKS's endpoint served them.
    assert!(gcks.stats().unwrap().resync.accepted >= members.len() as u64);
    shutdown(members);
    gcks.shutdown().unwrap();
}

fn assert_serves(relay: &Relay, gcks: &Gcks, from: u64, to: u64, leaf: u32) {
    let (tcp, http) = relay.resync_addrs();
    for endpoint in [Endpoint::Tcp(tcp.unwrap()), Endpoint::Http(http.unwrap())] {
        let fetched = fetch_items(endpoint, GROUP_ID, from, leaf, Duration::from_secs(2)).unwrap();
        assert_eq!(fetched.items.len() as u64, to - from + 1, "{endpoint}");
        assert!(!fetched.beyond_history);
        for (seq, (manifest, chunk)) in (from..=to).zip(&fetched.items) {
            let ResyncAnswer::Item {
                manifest: expected_manifest,
                chunk: expected_chunk,
            } = gcks.resync_item(seq, leaf).unwrap()
            else {
                panic!("the GCKS lacks message {seq}");
            };
            assert_eq!(manifest, &expected_manifest, "{endpoint} message {seq}");
            assert_eq!(chunk, &expected_chunk, "{endpoint} message {seq}");
        }
    }
}

#[test]
fn restarted_relay_serves_its_store_at_once_and_gaps_fall_through_to_the_gcks() {
    let (up, down) = (group(3, 0), group(3, 1));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("relay-state");
    let member_state = |id: u64| dir.path().join(format!("member-{id}.state"));
    let gcks = start_gcks(up);
    let mut config = relay_config(&gcks, up, down);
    config.state_dir = Some(state.clone());
    let mut ids = vec![RELAY_ID];
    ids.extend(1..=6);
    let mut bundles = admit(&gcks, &ids).into_iter();
    let relay = Relay::start(&bundles.next().unwrap(), config.clone()).unwrap();
    let mut members: Vec<(u64, Member)> = bundles
        .zip(1..)
        .map(|(bundle, id)| {
            let mut member = member_config(down, &relay, &gcks, id);
            member.state_file = Some(member_state(id));
            (id, Member::start(&bundle, member).unwrap())
        })
        .collect();
    wait_sent(&gcks, 1);
    wait_members(&members, 1, Duration::from_secs(20));
    gcks.rekey_now().unwrap();
    wait_sent(&gcks, 2);
    wait_members(&members, 2, Duration::from_secs(20));
    // Members 1 to 3 stop at message 2, members 4 to 6 at message 3.
    shutdown(members.drain(..3).collect());
    gcks.rekey_now().unwrap();
    wait_sent(&gcks, 3);
    wait_members(&members, 3, Duration::from_secs(20));
    shutdown(members);
    wait_relay(&relay, 3);
    let leaf = Member::resume(&member_state(1), member_config(down, &relay, &gcks, 1))
        .map(|m| {
            let key = m.stats().unwrap().order_key;
            m.shutdown().unwrap();
            key
        })
        .unwrap();
    relay.shutdown().unwrap();
    assert_private(&state);

    // Back at once: the stored messages are served before any new one arrives.
    let restarted = Instant::now();
    let relay = Relay::resume(&state, config.clone()).unwrap();
    let resumed = relay.stats().unwrap();
    assert_eq!(resumed.next_seq, 4);
    assert_eq!(resumed.held, Some((3, 1)), "{resumed:?}");
    assert_serves(&relay, &gcks, 1, 3, leaf);
    let served_after = restarted.elapsed();
    assert_eq!(
        relay.stats().unwrap().relay.forwarded,
        0,
        "nothing new arrived meanwhile"
    );
    let (status, body) = http_get(relay.resync_addrs().1.unwrap(), "/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, text) = http_get(relay.resync_addrs().1.unwrap(), "/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "rekeycast_relay_latest_held_seq"), 3);
    assert_eq!(metric(&text, "rekeycast_relay_next_seq"), 4);
    assert!(text.contains("rekeycast_relay_upstream_rejected_total{cause=\"bad_mac\"}"));
    // Requests and messages served are exported, not only connections.
    metric(&text, "rekeycast_relay_resync_requests_total");
    metric(&text, "rekeycast_relay_resync_messages_served_total");
    relay.shutdown().unwrap();

    // Down for two rekeys: it gets them by resync only (not forwarded), so its history has a
    // gap; the next one it forwards.
    for seq in 4..=5 {
        gcks.rekey_now().unwrap();
        wait_sent(&gcks, seq);
    }
    let relay = Relay::resume(&state, config).unwrap();
    assert_serves(&relay, &gcks, 1, 3, leaf);
    // The GCKS's heartbeats of message 5 tell it that it is behind.
    let stats = wait_relay(&relay, 5);
    assert_eq!(stats.relay.not_forwarded, 2, "{stats:?}");
    gcks.rekey_now().unwrap();
    wait_sent(&gcks, 6);
    let stats = wait_relay(&relay, 6);
    assert_eq!(stats.relay.forwarded, 1, "{stats:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.stats().unwrap().held != Some((6, 1)) {
        assert!(Instant::now() < deadline, "{:?}", relay.stats().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Messages 4 and 5 are not held: after what it holds (3) TCP says NotHeld and HTTP 421.
    let (tcp, http) = relay.resync_addrs();
    for endpoint in [Endpoint::Tcp(tcp.unwrap()), Endpoint::Http(http.unwrap())] {
        let fetched = fetch_items(endpoint, GROUP_ID, 3, leaf, Duration::from_secs(2)).unwrap();
        assert_eq!(fetched.items.len(), 1, "{endpoint}");
        assert!(fetched.not_held && !fetched.beyond_history, "{endpoint}");
        // From the gap on, nothing: a refusal, never "beyond history".
        assert!(fetch_items(endpoint, GROUP_ID, 4, leaf, Duration::from_secs(2)).is_err());
        let fetched = fetch_items(endpoint, GROUP_ID, 6, leaf, Duration::from_secs(2)).unwrap();
        assert_eq!(fetched.items.len(), 1, "{endpoint}");
    }
    let relay_served = relay.stats().unwrap().resync.accepted;
    let gcks_served = gcks.stats().unwrap().resync.accepted;

    // The members come back: those at 2 get 3 from the relay and 4 to 6 from the GCKS, those
    // at 3 get 4 to 6 from the GCKS, through the relay's gap.
    let members: Vec<(u64, Member)> = (1..=6)
        .map(|id| {
            let mut member = member_config(down, &relay, &gcks, id);
            member.state_file = Some(member_state(id));
            (id, Member::resume(&member_state(id), member).unwrap())
        })
        .collect();
    let converged = wait_members(&members, 6, Duration::from_secs(20));
    assert_current(&members, &gcks);
    let relay_served = relay.stats().unwrap().resync.accepted - relay_served;
    let gcks_served = gcks.stats().unwrap().resync.accepted - gcks_served;
    eprintln!(
        "restarted relay served messages 1-3 {served_after:?} after its restart; 6 members \
         resumed behind its gap converged in {converged:?}: relay resync connections \
         {relay_served}, GCKS resync connections {gcks_served}"
    );
    assert!(relay_served >= 6, "every member asked the relay first");
    assert!(gcks_served >= 6, "and fell through to the GCKS for 4 and 5");
    for (id, member) in &members {
        let stats = member.stats().unwrap();
        let missed = if *id <= 3 { 4 } else { 3 };
        assert!(
            stats.receiver.applied_from_resync >= missed - 1,
            "member {id}: {stats:?}"
        );
    }
    shutdown(members);
    relay.shutdown().unwrap();
    gcks.shutdown().unwrap();
}

fn assert_private(state: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(state), 0o700);
    assert_eq!(mode(&state.join("relay.keys")), 0o600);
    let messages: Vec<_> = std::fs::read_dir(state.join("messages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(messages.len(), 3, "{messages:?}");
    for path in messages {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

/// A socket that sends to loopback multicast groups.
fn sender() -> UdpSocket {
    addr::multicast_sender()
}

/// A datagram of the group's SA for message `seq`, sealed under a key nobody holds.
fn forged(rng: &mut ChaCha8Rng, seq: u64, body: BodyRepr<'_>) -> Vec<u8> {
    Sa {
        group_id: GROUP_ID,
        spi: SPI,
    }
    .wrongly_keyed(rng, seq, body)
}

/// Sends `count` NACKs for message 1 under a wrong key, each of its own receiver id, to `to`.
fn send_forged_nacks(socket: &UdpSocket, rng: &mut ChaCha8Rng, to: SocketAddr, count: u64) {
    for _ in 0..count {
        let receiver_id = rng.gen();
        let nack = forged(
            rng,
            1,
            BodyRepr::Nack(NackRepr {
                object: ObjectKind::Chunks,
                sbn: 0,
                round: 1,
                need: 8,
                receiver_id,
                echo: None,
            }),
        );
        socket.send_to(&nack, to).unwrap();
    }
}

#[test]
fn forged_upstream_datagrams_are_counted_and_never_forwarded() {
    let (up, down) = (group(4, 0), group(4, 1));
    let gcks = start_gcks(up);
    let config = relay_config(&gcks, up, down);
    let (relay, members) = relay_and_members(&gcks, down, Relay::builder(config), 3, None);
    wait_sent(&gcks, 1);
    wait_members(&members, 1, Duration::from_secs(20));
    let before = wait_relay(&relay, 1);

    let socket = sender();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let forged_count = 300;
    for i in 0..forged_count {
        let data: Vec<u8> = (0..rng.gen_range(16..1_200)).map(|_| rng.gen()).collect();
        let esi = rng.gen_range(0..8);
        let datagram = match i % 3 {
            // Garbage.
            0 => (0..rng.gen_range(0..1_300)).map(|_| rng.gen()).collect(),
            // Plausible symbols of the next message and the current one, wrongly keyed.
            _ => forged(
                &mut rng,
                before.next_seq - (i % 2),
                BodyRepr::Symbol(SymbolRepr {
                    object: if i % 2 == 0 {
                        ObjectKind::Manifest
                    } else {
                        ObjectKind::Chunks
                    },
                    sbn: 0,
                    esi,
                    data: &data,
                }),
            ),
        };
        socket.send_to(&datagram, up).unwrap();
    }
    // Downstream NACKs for message 1 under a wrong key, to the relay's feedback address.
    send_forged_nacks(&socket, &mut rng, relay.feedback_addr(), 100);
    // Give the relay time to take them all in (and to repair, were it fooled).
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let stats = relay.stats().unwrap();
        if stats.upstream_received >= before.upstream_received + forged_count
            && stats.downstream.rejected >= before.downstream.rejected + 100
        {
            std::thread::sleep(Duration::from_millis(300));
            break relay.stats().unwrap();
        }
        assert!(Instant::now() < deadline, "{stats:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // A forgery is rejected before its MAC is even checked (garbage), at its MAC, or, for a
    // message the relay already holds whole, dropped unread.
    let rejected = after.upstream_datagrams.rejected() - before.upstream_datagrams.rejected()
        + after.upstream.dropped_finished
        - before.upstream.dropped_finished;
    eprintln!(
        "forged {forged_count} upstream: rejected {rejected} (bad MAC {}), signature checks {} -> \
         {}; 100 bad-MAC NACKs: downstream rejected {}, repair symbols {} -> {}",
        after.upstream_datagrams.bad_mac - before.upstream_datagrams.bad_mac,
        before.upstream_messages.signature_checks,
        after.upstream_messages.signature_checks,
        after.downstream.rejected - before.downstream.rejected,
        before.downstream.repair_symbols_sent,
        after.downstream.repair_symbols_sent,
    );
    assert!(rejected >= forged_count, "every forgery counted: {after:?}");
    assert!(after.upstream_datagrams.bad_mac - before.upstream_datagrams.bad_mac >= 100);
    assert_eq!(
        after.upstream_messages.signature_checks, before.upstream_messages.signature_checks,
        "no signature checked for a datagram that failed its MAC"
    );
    assert_eq!(after.relay.forwarded, before.relay.forwarded);
    assert_eq!(after.relay.cut_through_sent, before.relay.cut_through_sent);
    assert_eq!(
        after.downstream.source_symbols_sent,
        before.downstream.source_symbols_sent
    );
    assert_eq!(
        after.downstream.repair_symbols_sent, before.downstream.repair_symbols_sent,
        "bad-MAC NACKs cause no repair"
    );
    assert_eq!(
        after.downstream.nacks_received,
        before.downstream.nacks_received
    );
    // The relay still forwards the real thing.
    gcks.rekey_now().unwrap();
    wait_sent(&gcks, 2);
    wait_members(&members, 2, Duration::from_secs(20));
    assert_eq!(
        relay.stats().unwrap().relay.forwarded,
        before.relay.forwarded + 1
    );
    assert_current(&members, &gcks);
    shutdown(members);
    relay.shutdown().unwrap();
    gcks.shutdown().unwrap();
}

#[test]
fn a_downstream_flood_is_rate_limited_per_source() {
    let (up, down) = (group(5, 0), group(5, 1));
    let gcks = start_gcks(up);
    let mut config = relay_config(&gcks, up, down);
    config.feedback_limit = Some(FeedbackLimit {
        datagrams_per_second: 10.0,
        burst: 20,
    });
    let bundle = admit(&gcks, &[RELAY_ID]).pop().unwrap();
    let relay = Relay::start(&bundle, config).unwrap();
    wait_sent(&gcks, 1);
    wait_relay(&relay, 1);
    let socket = sender();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let flood = 500;
    send_forged_nacks(&socket, &mut rng, relay.feedback_addr(), flood);
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = relay.stats().unwrap();
        if stats.downstream_received >= flood {
            break stats;
        }
        assert!(Instant::now() < deadline, "{stats:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "{flood} datagrams from one source: {} rate limited, {} looked at (rejected)",
        stats.downstream_rate_limited, stats.downstream.rejected
    );
    // The burst and what the rate refilled meanwhile were looked at (and failed their MAC);
    // the rest cost one table lookup each.
    assert!(stats.downstream.rejected <= 20 + 10 * 10, "{stats:?}");
    assert!(
        stats.downstream_rate_limited + stats.downstream.rejected >= flood,
        "{stats:?}"
    );
    assert!(stats.downstream_rate_limited >= flood - 120, "{stats:?}");
    assert_eq!(stats.downstream.repair_symbols_sent, 0);
    relay.shutdown().unwrap();
    gcks.shutdown().unwrap();
}
