//! A member that comes back after its own restart resumes from its saved keys and last
//! sequence number (DESIGN.md, persistence): it does not register again, resyncs the
//! messages it missed while down, and continues by multicast when it missed none.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rekeycast::gcks::{Gcks, GcksConfig};
use rekeycast::io::resync_client::Endpoint;
use rekeycast::lkh::{MemberStateError, RegistrationBundle};
use rekeycast::member::{Member, MemberConfig, MemberError};
use rekeycast::session::ReceiverEvent;
use rekeycast_testkit::engine::wait_sent;

/// A multicast group and port for test `salt` of this process.
fn group(salt: u8) -> SocketAddr {
    rekeycast_testkit::addr::multicast_group(81, salt)
}

fn start_gcks(group: SocketAddr) -> Gcks {
    let mut config = GcksConfig::loopback(group);
    config.batch_interval = Duration::from_secs(3600);
    config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    Gcks::start(config, SigningKey::from_bytes(&[11; 32])).unwrap()
}

/// Admits members 1..=3 in one batch (message 1) and returns member 1's bundle.
fn admit(gcks: &Gcks) -> RegistrationBundle {
    rekeycast_testkit::engine::admit(gcks, &[1, 2, 3]).swap_remove(0)
}

/// Rekeys once (a refresh) and waits until it is sent; returns its sequence number.
fn rekey(gcks: &Gcks) -> u64 {
    rekeycast_testkit::engine::rekey(gcks)
}

/// Waits for the member to apply message `seq`; returns the events it raised meanwhile.
fn wait_member(member: &Member, seq: u64, events: &mut Vec<ReceiverEvent>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        while let Ok(event) = member.events().try_recv() {
            events.push(event);
        }
        if member.stats().unwrap().next_seq > seq {
            while let Ok(event) = member.events().try_recv() {
                events.push(event);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "member stuck at {} (wanted {seq}), events {events:?}",
        member.stats().unwrap().next_seq
    );
}

/// Admits members 1 to 3 and starts member 1 with `config`; returns it once it applied
/// message 1, with the events it raised.
fn start_member(gcks: &Gcks, config: MemberConfig) -> (Member, Vec<ReceiverEvent>) {
    let bundle = admit(gcks);
    let member = Member::start(&bundle, config).unwrap();
    wait_sent(gcks, 1);
    let mut events = Vec::new();
    wait_member(&member, 1, &mut events);
    (member, events)
}

fn member_config(gcks: &Gcks, group: SocketAddr, state: &Path, resync: bool) -> MemberConfig {
    let mut config = MemberConfig::loopback(group, gcks.local_addr());
    config.state_file = Some(state.to_path_buf());
    if resync {
        config.resync_endpoints = vec![Endpoint::Tcp(gcks.resync_addrs().0.unwrap())];
        config.resync_max_delay = Duration::from_millis(50);
        config.receiver.state_check_interval = Duration::from_millis(100);
    }
    config
}

fn assert_current(member: &Member, gcks: &Gcks) {
    let stats = member.stats().unwrap();
    assert_eq!(
        stats.group_key_version,
        Some(gcks.stats().unwrap().group_key_version),
        "{stats:?}"
    );
    assert_eq!(stats.state_save_failures, 0);
    assert_eq!(stats.messages.signature_failures, 0);
}

#[test]
fn restarted_member_resyncs_what_it_missed_and_does_not_reregister() {
    let group = group(1);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("member.state");
    let gcks = start_gcks(group);
    let (member, mut events) = start_member(&gcks, member_config(&gcks, group, &state, true));
    let second = rekey(&gcks);
    wait_member(&member, second, &mut events);
    assert_current(&member, &gcks);
    // Saved before the product heard of it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events.contains(&ReceiverEvent::GroupKeyUpdated {
        seq: second,
        version: member.stats().unwrap().group_key_version.unwrap(),
    }) {
        assert!(Instant::now() < deadline, "{events:?}");
        events.extend(member.events().recv_timeout(Duration::from_millis(100)));
    }
    assert_eq!(
        rekeycast::persist::load_member_keys(&state)
            .unwrap()
            .last_seq(),
        second
    );
    member.shutdown().unwrap();

    // Down for two rekeys.
    rekey(&gcks);
    let missed_last = rekey(&gcks);

    let member = Member::resume(&state, member_config(&gcks, group, &state, true)).unwrap();
    assert_eq!(member.stats().unwrap().next_seq, second + 1);
    let mut events = Vec::new();
    // The first event re-announces the Data SA in force.
    let first = member
        .events()
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(
        matches!(first, ReceiverEvent::NewDataSa { seq, .. } if seq == second),
        "{first:?}"
    );
    // The next rekey's traffic tells it that it is behind; it resyncs and goes on.
    let latest = rekey(&gcks);
    wait_member(&member, latest, &mut events);
    assert!(
        !events.contains(&ReceiverEvent::MustReregister),
        "{events:?}"
    );
    let stats = member.stats().unwrap();
    assert!(
        stats.receiver.applied_from_resync >= missed_last - second,
        "{stats:?}"
    );
    assert_current(&member, &gcks);
    member.shutdown().unwrap();
    assert_eq!(
        rekeycast::persist::load_member_keys(&state)
            .unwrap()
            .last_seq(),
        latest
    );
    gcks.shutdown().unwrap();
}

#[test]
fn member_resumed_without_missing_a_message_continues_by_multicast() {
    let group = group(2);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("member.state");
    let gcks = start_gcks(group);
    let (member, _) = start_member(&gcks, member_config(&gcks, group, &state, false));
    member.shutdown().unwrap();

    let member = Member::resume(&state, member_config(&gcks, group, &state, false)).unwrap();
    let mut events = Vec::new();
    for _ in 0..2 {
        let latest = rekey(&gcks);
        wait_member(&member, latest, &mut events);
    }
    let stats = member.stats().unwrap();
    assert_eq!(stats.receiver.applied_from_resync, 0, "{stats:?}");
    assert_eq!(stats.receiver.messages_applied, 2, "{stats:?}");
    assert_eq!(stats.resyncs_started, 0);
    assert!(
        !events.contains(&ReceiverEvent::MustReregister),
        "{events:?}"
    );
    assert_current(&member, &gcks);
    member.shutdown().unwrap();

    // A corrupt state file is an error, never a fresh start.
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    let resumed = Member::resume(&state, member_config(&gcks, group, &state, false));
    assert!(
        matches!(
            resumed,
            Err(MemberError::State {
                source: MemberStateError::Checksum,
                ..
            })
        ),
        "{resumed:?}"
    );
    gcks.shutdown().unwrap();
}

#[test]
fn failed_saves_are_counted_and_do_not_stop_the_member() {
    let group = group(3);
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist: every save fails.
    let state = dir.path().join("missing").join("member.state");
    let gcks = start_gcks(group);
    let (member, mut events) = start_member(&gcks, member_config(&gcks, group, &state, false));
    let latest = rekey(&gcks);
    wait_member(&member, latest, &mut events);
    // Saves run on the driver's storage thread: their failure is counted when it comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stats = member.stats().unwrap();
    while stats.state_save_failures == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        stats = member.stats().unwrap();
    }
    assert!(stats.state_save_failures >= 1, "{stats:?}");
    assert_eq!(
        stats.group_key_version,
        Some(gcks.stats().unwrap().group_key_version)
    );
    assert!(!state.exists());
    member.shutdown().unwrap();
    gcks.shutdown().unwrap();
}
