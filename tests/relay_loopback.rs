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

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::auth::mac::MacKey;
use rekeycast::gcks::{Gcks, GcksConfig, GcksEvent, ResyncAnswer};
use rekeycast::io::resync_client::{fetch_items, Endpoint};
use rekeycast::lkh::{MemberId, RegistrationBundle};
use rekeycast::member::{group_loss_filter, Member, MemberConfig};
use rekeycast::relay::{Relay, RelayEngineConfig, RelayStats};
use rekeycast::session::ReceiverEvent;
use rekeycast::sim::Loss;
use rekeycast::wire::{BodyRepr, DatagramRepr, NackRepr, ObjectKind, Packet, SymbolRepr};

/// The group id and SPI of [`GcksConfig::loopback`].
const GROUP_ID: u32 = 1;
const SPI: u32 = 1;
/// The member id the relay registers with (members get small ids).
const RELAY_ID: u64 = 1_000_000;

/// The upstream (`tier` 0) or downstream (`tier` 1) group and port of test `salt` in this
/// process, away from other tests' groups.
fn group(salt: u8, tier: u8) -> SocketAddr {
    let pid = std::process::id();
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(239, 83 + tier, salt, pid as u8),
        46_000 + (pid % 8_000) as u16 + 2 * u16::from(salt) + u16::from(tier),
    ))
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
    let replies: Vec<_> = ids
        .iter()
        .map(|&i| {
            if i == RELAY_ID {
                gcks.join_relay(MemberId(i)).unwrap()
            } else {
                gcks.join(MemberId(i)).unwrap()
            }
        })
        .collect();
    gcks.rekey_now().unwrap();
    replies
        .into_iter()
        .map(|r| r.recv_timeout(Duration::from_secs(30)).unwrap().unwrap())
        .collect()
}

/// Waits until the GCKS sent message `seq` (its initial transmission is on the wire).
fn wait_sent(gcks: &Gcks, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(GcksEvent::Sent { seq: sent }) =
            gcks.events().recv_timeout(Duration::from_millis(100))
        {
            if sent >= seq {
                return;
            }
        }
    }
    panic!("message {seq} was not sent");
}

fn relay_config(gcks: &Gcks, up: SocketAddr, down: SocketAddr) -> RelayEngineConfig {
    let mut config = RelayEngineConfig::loopback(up, gcks.local_addr(), down);
    config.upstream_resync = vec![Endpoint::Tcp(gcks.resync_addrs().0.unwrap())];
    config.resync_max_delay = Duration::from_millis(100);
    config.resync_timeout = Duration::from_secs(2);
    config.resync_tcp = Some(localhost());
    config.resync_http = Some(localhost());
    // Heartbeats well inside the members' silence timeout, so only a dead relay is silent.
    config.session.downstream.heartbeat_max = Duration::from_millis(500);
    config.session.upstream.state_check_interval = Duration::from_millis(200);
    config.session.upstream.scheduler.seed = 5;
    config
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
    let started = Instant::now();
    while started.elapsed() < limit {
        if members
            .iter()
            .all(|(_, m)| m.stats().unwrap().next_seq > seq)
        {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let behind: Vec<(u64, u64)> = members
        .iter()
        .map(|(id, m)| (*id, m.stats().unwrap().next_seq))
        .filter(|(_, next)| *next <= seq)
        .collect();
    panic!("members (id, next seq) still behind message {seq}: {behind:?}");
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
    relay_config: RelayEngineConfig,
    count: u64,
    loss: Option<f64>,
) -> (Relay, Vec<(u64, Member)>) {
    let mut ids = vec![RELAY_ID];
    ids.extend(1..=count);
    let mut bundles = admit(gcks, &ids).into_iter();
    let relay = Relay::start(&bundles.next().unwrap(), relay_config).unwrap();
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
    config.simulated_loss = Some((Loss::Bernoulli { p: 0.05 }, 77));
    config.session.downstream_group_size = Some(16);
    let (relay, mut members) = relay_and_members(&gcks, down, config, 14, Some(0.05));
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
    let (relay, members) = relay_and_members(&gcks, down, config, 12, None);
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

/// The body of an HTTP GET's answer, with its status.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).unwrap();
    // Bodies may be binary (manifests): the head is ASCII, the body is shown lossily.
    let answer = String::from_utf8_lossy(&bytes);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    (status, body)
}

/// The value of the Prometheus sample `name` in `text`.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
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
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    socket.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    socket.set_multicast_loop_v4(true).unwrap();
    socket.bind(&localhost().into()).unwrap();
    socket.into()
}

/// A datagram of the group's SA for message `seq`, sealed under a key nobody holds.
fn forged(rng: &mut ChaCha8Rng, seq: u64, body: BodyRepr<'_>) -> Vec<u8> {
    let repr = DatagramRepr {
        group_id: GROUP_ID,
        spi: SPI,
        seq,
        body,
        mac: [0; 16],
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut buf).unwrap();
    MacKey::from_bytes(rng.gen()).seal(&mut Packet::new_checked(&mut buf[..]).unwrap());
    buf
}

#[test]
fn forged_upstream_datagrams_are_counted_and_never_forwarded() {
    let (up, down) = (group(4, 0), group(4, 1));
    let gcks = start_gcks(up);
    let config = relay_config(&gcks, up, down);
    let (relay, members) = relay_and_members(&gcks, down, config, 3, None);
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
    for _ in 0..100 {
        let receiver_id = rng.gen();
        let nack = forged(
            &mut rng,
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
        socket.send_to(&nack, relay.feedback_addr()).unwrap();
    }
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
    config.downstream_datagrams_per_second = 10.0;
    config.downstream_burst = 20;
    let bundle = admit(&gcks, &[RELAY_ID]).pop().unwrap();
    let relay = Relay::start(&bundle, config).unwrap();
    wait_sent(&gcks, 1);
    wait_relay(&relay, 1);
    let socket = sender();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let flood = 500;
    for _ in 0..flood {
        let receiver_id = rng.gen();
        let nack = forged(
            &mut rng,
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
        socket.send_to(&nack, relay.feedback_addr()).unwrap();
    }
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

/// The `rekey-relay` binary as an operator runs it, between `rekeycast server` and
/// `rekeycast member` processes: it forwards, serves `/metrics` and `/healthz`, stops cleanly
/// on SIGTERM and resumes from its state directory without its bundle.
#[test]
fn rekey_relay_binary_forwards_reports_metrics_stops_on_sigterm_and_resumes() {
    use std::io::BufRead;
    use std::process::{Child, Command, Stdio};

    const REKEYCAST: &str = env!("CARGO_BIN_EXE_rekeycast");
    const RELAY: &str = env!("CARGO_BIN_EXE_rekey-relay");

    /// Children killed on drop, so a failing test leaves no process behind.
    struct Processes(Vec<Child>);
    impl Drop for Processes {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    fn admin(socket: &Path, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["admin", "--socket", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        let output = Command::new(REKEYCAST).args(&all).output().unwrap();
        assert!(output.status.success(), "admin {args:?}: {output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }
    /// Waits for `child` to exit, at most 30 s.
    fn wait_exit(child: &mut Child, what: &str, logs: &dyn Fn() -> String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "{what} exited with {status}\n{}", logs());
                return;
            }
            assert!(Instant::now() < deadline, "{what} did not exit\n{}", logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// Starts the relay and returns its ready line.
    fn start_relay(config: &Path, log: &Path, processes: &mut Processes) -> String {
        let mut child = Command::new(RELAY)
            .args(["--config", config.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        processes.0.push(child);
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("rekey-relay ready "),
            "{line:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        line
    }

    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    // Fixed ports (the configuration files name them), below the ephemeral range.
    let port = |k: u32| 20_000 + (pid % 2_000) * 5 + k;
    let (up, down) = (group(6, 0), group(6, 1));
    let feedback = format!("127.0.0.1:{}", port(0));
    let gcks_resync = format!("127.0.0.1:{}", port(1));
    let relay_feedback = format!("127.0.0.1:{}", port(2));
    let relay_tcp = format!("127.0.0.1:{}", port(3));
    let relay_http: SocketAddr = format!("127.0.0.1:{}", port(4)).parse().unwrap();
    let socket = dir.path().join("admin.sock");
    let server_config = dir.path().join("server.toml");
    std::fs::write(
        &server_config,
        format!(
            "feedback_listen = \"{feedback}\"\nstate_dir = \"{}\"\nadmin_socket = \"{}\"\n\
             [group]\nmulticast = \"{up}\"\n[batch]\ninterval_ms = 200\n\
             [sender]\nheartbeat_max_ms = 500\n[resync]\ntcp_listen = \"{gcks_resync}\"\n",
            dir.path().join("gcks").display(),
            socket.display()
        ),
    )
    .unwrap();
    let relay_bundle = dir.path().join("relay.bundle");
    let relay_config = dir.path().join("relay.toml");
    std::fs::write(
        &relay_config,
        format!(
            "bundle = \"{}\"\nstate_dir = \"{}\"\n\
             [upstream]\nmulticast = \"{up}\"\nfeedback = \"{feedback}\"\n\
             resync_endpoints = [\"tcp://{gcks_resync}\"]\n\
             [downstream]\nmulticast = \"{down}\"\nfeedback_listen = \"{relay_feedback}\"\n\
             [sender]\nheartbeat_max_ms = 500\n\
             [resync]\ntcp_listen = \"{relay_tcp}\"\nhttp_listen = \"{relay_http}\"\n",
            relay_bundle.display(),
            dir.path().join("relay-state").display()
        ),
    )
    .unwrap();
    let member_bundle = dir.path().join("member.bundle");
    let member_config = dir.path().join("member.toml");
    std::fs::write(
        &member_config,
        format!(
            "feedback = \"{relay_feedback}\"\nbundle = \"{}\"\n\
             resync_endpoints = [\"tcp://{relay_tcp}\", \"tcp://{gcks_resync}\"]\n\
             state_check_interval_ms = 100\n[group]\nmulticast = \"{down}\"\n",
            member_bundle.display()
        ),
    )
    .unwrap();
    let (server_log, relay_log, member_log) = (
        dir.path().join("server.log"),
        dir.path().join("relay.log"),
        dir.path().join("member.log"),
    );
    let logs = || {
        [&server_log, &relay_log, &member_log]
            .iter()
            .map(|p| {
                format!(
                    "{}:\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut processes = Processes(Vec::new());
    processes.0.push(
        Command::new(REKEYCAST)
            .args(["server", "--config", server_config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&server_log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no admin socket\n{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The relay and a member in one batch (message 1).
    let relay_join = {
        let (socket, bundle) = (socket.clone(), relay_bundle.clone());
        std::thread::spawn(move || {
            admin(
                &socket,
                &[
                    "join",
                    "--relay",
                    "--member",
                    "1000",
                    "--bundle",
                    bundle.to_str().unwrap(),
                ],
            )
        })
    };
    let joined = admin(
        &socket,
        &[
            "join",
            "--member",
            "1",
            "--bundle",
            member_bundle.to_str().unwrap(),
        ],
    );
    let relay_joined = relay_join.join().unwrap();
    assert_eq!(relay_joined["relay"], true, "{relay_joined}");
    assert_eq!(joined["ok"], true, "{joined}");
    let ready = start_relay(&relay_config, &relay_log, &mut processes);
    assert!(
        ready.contains(&format!("feedback={relay_feedback}")),
        "{ready}"
    );
    processes.0.push(
        Command::new(REKEYCAST)
            .args([
                "member",
                "--config",
                member_config.to_str().unwrap(),
                "--exit-after-seq",
                "3",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&member_log).unwrap()))
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        assert_eq!(admin(&socket, &["rekey"])["ok"], true);
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_exit(&mut processes.0[2], "the member", &logs);
    let status = admin(&socket, &["status"]);
    assert_eq!(status["relays"], 1, "{status}");
    let (code, body) = http_get(relay_http, "/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    // /metrics is renewed at most once a second.
    std::thread::sleep(Duration::from_millis(1_100));
    let (code, text) = http_get(relay_http, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metric(&text, "rekeycast_relay_forwarded_total") >= 2,
        "{text}\n{}",
        logs()
    );
    assert_eq!(
        metric(&text, "rekeycast_relay_latest_held_seq"),
        3,
        "{text}"
    );

    // SIGTERM: a clean stop, status 0.
    let relay_pid = processes.0[1].id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &relay_pid])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_exit(&mut processes.0[1], "the relay", &logs);
    assert!(logs().contains("stopped"), "{}", logs());

    // Back without its bundle: it resumes from its state and serves message 3 at once.
    std::fs::remove_file(&relay_bundle).unwrap();
    start_relay(&relay_config, &relay_log, &mut processes);
    let (code, _) = http_get(
        relay_http,
        &format!("/v1/groups/{GROUP_ID}/rekeys/3/manifest"),
    );
    assert_eq!(code, 200, "{}", logs());
    assert!(
        std::fs::read_to_string(&relay_log)
            .unwrap()
            .contains("relay resumed from its saved keys"),
        "{}",
        logs()
    );
    let relay_pid = processes.0[3].id().to_string();
    Command::new("kill")
        .args(["-TERM", &relay_pid])
        .status()
        .unwrap();
    wait_exit(&mut processes.0[3], "the resumed relay", &logs);
}

#[test]
fn rekey_relay_binary_refuses_a_bad_configuration_naming_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "[downstream]\nmulticast = \"239.255.77.1:7400\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rekey-relay"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "downstream.multicast = \"239.255.77.1:7400\": must differ from upstream.multicast"
        ),
        "{stderr}"
    );
    // No bundle and no saved state: an error naming the bundle.
    std::fs::write(
        &config,
        format!(
            "bundle = \"{}\"\nstate_dir = \"{}\"\n",
            dir.path().join("missing.bundle").display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rekey-relay"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("registration bundle"), "{stderr}");
}
