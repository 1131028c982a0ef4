//! A GCKS that persists its state survives restarts: stopped after sending, and killed between
//! writing its state and sending, it resumes the same group and sequence from its state
//! directory, and its members continue without re-registering.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rekeycast::gcks::{Gcks, GcksConfig};
use rekeycast::lkh::{KeyRng, MemberId};
use rekeycast::member::{Member, MemberConfig};
use rekeycast::resync::store::{StateStore, StoredMessage};
use rekeycast::session::layout::{build_message, MessageParams};
use rekeycast::session::sender::PreparedMessage;
use rekeycast_testkit::engine::wait_sent;
use rekeycast_testkit::wait;

fn addresses() -> (SocketAddr, SocketAddr) {
    let pid = std::process::id();
    let group = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(239, 79, (pid >> 8) as u8, pid as u8),
        40_000 + (pid % 10_000) as u16,
    ));
    let gcks = SocketAddr::from((Ipv4Addr::LOCALHOST, 50_000 + (pid % 10_000) as u16));
    (group, gcks)
}

fn config(group: SocketAddr, bind: SocketAddr, state: &Path) -> GcksConfig {
    let mut config = GcksConfig::loopback(group);
    config.bind = bind;
    config.state_dir = Some(state.to_path_buf());
    config.batch_interval = Duration::from_secs(3600);
    config
}

/// Waits until every member has applied message `seq`.
fn wait_current(members: &[Member], seq: u64) {
    wait::until(
        wait::PATIENCE,
        &format!("every member at message {seq}"),
        || {
            members
                .iter()
                .all(|m| m.stats().unwrap().next_seq > seq)
                .then_some(())
        },
        || {
            let next: Vec<u64> = members
                .iter()
                .map(|m| m.stats().unwrap().next_seq)
                .collect();
            format!("next_seq {next:?}")
        },
    );
}

#[test]
fn restarted_gcks_continues_the_sequence_and_members_do_not_reregister() {
    let state = tempfile::tempdir().unwrap();
    let (group, bind) = addresses();
    let signing_key = SigningKey::from_bytes(&[42; 32]);

    // First life: admit 10 members (message 1), remove one (message 2), stop after sending.
    let gcks = Gcks::start(config(group, bind, state.path()), signing_key.clone()).unwrap();
    let replies: Vec<_> = (1..=10).map(|i| gcks.join(MemberId(i)).unwrap()).collect();
    gcks.rekey_now().unwrap();
    let mut members = Vec::new();
    for reply in replies {
        let bundle = reply
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        members.push(Member::start(&bundle, MemberConfig::loopback(group, bind)).unwrap());
    }
    wait_sent(&gcks, 1);
    wait_current(&members, 1);
    gcks.leave(MemberId(10)).unwrap();
    gcks.rekey_now().unwrap();
    wait_sent(&gcks, 2);
    members.pop();
    wait_current(&members, 2);
    gcks.shutdown().unwrap();

    // Second life: it resumes at message 2 (sending it again, which members drop unchecked)
    // and its next rekey is message 3, which every member applies.
    let gcks = Gcks::start(config(group, bind, state.path()), signing_key.clone()).unwrap();
    assert_eq!(gcks.stats().unwrap().seq, 2);
    gcks.rekey_now().unwrap();
    wait_sent(&gcks, 3);
    wait_current(&members, 3);
    gcks.shutdown().unwrap();

    // Killed between writing its state and sending: the batch of message 4 is committed to the
    // state directory (as the GCKS's worker does) and never sent.
    {
        let (store, restored) =
            StateStore::open(state.path(), 64, KeyRng::seeded_for_simulation(4)).unwrap();
        let mut tree = restored.unwrap().tree;
        let batch = tree.apply_batch(&[], &[MemberId(9)]).unwrap();
        let params = MessageParams::default();
        let built = build_message(&batch, &tree.leaves_in_order(), &signing_key, &params).unwrap();
        let prepared = PreparedMessage::new(built, batch.mac_key.clone()).unwrap();
        store
            .commit(&tree, &StoredMessage::from_prepared(&prepared))
            .unwrap();
    }
    members.pop();

    // Third life: it finds message 4 committed, sends it, and members apply it.
    let gcks = Gcks::start(config(group, bind, state.path()), signing_key).unwrap();
    assert_eq!(gcks.stats().unwrap().seq, 4);
    wait_sent(&gcks, 4);
    wait_current(&members, 4);
    for member in &members {
        let stats = member.stats().unwrap();
        assert_eq!(stats.receiver.applied_from_resync, 0);
        assert_eq!(stats.messages.signature_failures, 0);
    }
    gcks.shutdown().unwrap();
}

#[test]
fn a_state_directory_of_another_key_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let (group, bind) = addresses();
    let group = SocketAddr::new(group.ip(), group.port() + 1);
    let bind = SocketAddr::new(bind.ip(), bind.port() + 1);
    let gcks = Gcks::start(
        config(group, bind, state.path()),
        SigningKey::from_bytes(&[1; 32]),
    )
    .unwrap();
    let reply = gcks.join(MemberId(1)).unwrap();
    gcks.rekey_now().unwrap();
    reply
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap();
    wait_sent(&gcks, 1);
    gcks.shutdown().unwrap();
    let error = Gcks::start(
        config(group, bind, state.path()),
        SigningKey::from_bytes(&[2; 32]),
    )
    .unwrap_err();
    assert!(error.to_string().contains("signing key"), "{error}");
}
