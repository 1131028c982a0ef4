//! Batches of the real engine over its state directory and loopback multicast: a batch is a
//! transaction (a failed state write commits nothing and its retry keeps the sequence whole,
//! and a member applies both messages), and the figures, read from another thread, report the
//! committed group while batches are built on the workers.
//!
//! The order of membership commands (a leave cancels a pending join, a leave of a stranger is
//! refused) is the endpoint's alone and is tested in virtual time against `GcksEndpoint`.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rekeycast::gcks::{Gcks, GcksConfig, GcksEvent};
use rekeycast::lkh::MemberId;
use rekeycast::member::{Member, MemberConfig};

/// A multicast group and feedback address of this test process; `salt` keeps the tests of
/// one run apart.
fn addresses(salt: u8) -> (SocketAddr, SocketAddr) {
    let pid = std::process::id();
    let group = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(239, 81, salt, pid as u8),
        20_000 + (pid % 10_000) as u16 + u16::from(salt) * 7,
    ));
    let bind = SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        30_000 + (pid % 10_000) as u16 + u16::from(salt) * 7,
    ));
    (group, bind)
}

fn config(salt: u8, state: Option<&Path>) -> GcksConfig {
    let (group, bind) = addresses(salt);
    let mut config = GcksConfig::loopback(group);
    config.bind = bind;
    config.state_dir = state.map(Path::to_path_buf);
    // Batches only when told to.
    config.batch_interval = Duration::from_secs(3600);
    config.admission_delay = Duration::from_millis(20);
    config
}

/// The next `Rekeyed` event (failing the test on a timeout), with the failures seen before it.
fn next_rekeyed(gcks: &Gcks) -> (GcksEvent, usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = 0;
    while Instant::now() < deadline {
        match gcks.events().recv_timeout(Duration::from_millis(100)) {
            Ok(event @ GcksEvent::Rekeyed { .. }) => return (event, failures),
            Ok(GcksEvent::BatchFailed { .. }) => failures += 1,
            _ => {}
        }
    }
    panic!("no batch was applied within 30 s");
}

/// Waits until `member` has applied message `seq`.
fn wait_applied(member: &Member, seq: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if member.stats().unwrap().next_seq > seq {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_failed_state_write_commits_nothing_and_the_retry_keeps_the_sequence() {
    let state = tempfile::tempdir().unwrap();
    let config = config(3, Some(state.path()));
    let (group, _) = addresses(3);
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[4; 32])).unwrap();
    let reply = gcks.join(MemberId(1)).unwrap();
    gcks.rekey_now().unwrap();
    let bundle = reply
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap();
    let member = Member::start(&bundle, MemberConfig::loopback(group, gcks.local_addr())).unwrap();
    let (first, _) = next_rekeyed(&gcks);
    assert!(
        matches!(first, GcksEvent::Rekeyed { seq: 1, .. }),
        "{first:?}"
    );
    assert!(wait_applied(&member, 1), "the member applies message 1");

    // The key tree's snapshot cannot be written: its temporary file's name is a directory.
    let blocker = state.path().join("tree.snapshot.tmp");
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    gcks.rekey_now().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match gcks.events().recv_timeout(Duration::from_millis(100)) {
            Ok(GcksEvent::BatchFailed { .. }) => break,
            Ok(GcksEvent::Rekeyed { seq, .. }) => panic!("message {seq} built without its state"),
            _ => assert!(Instant::now() < deadline, "the batch did not fail"),
        }
    }
    let stats = gcks.stats().unwrap();
    assert_eq!((stats.seq, stats.members), (1, 1), "nothing committed");

    // The disk is back: the batch goes out as message 2, and the member applies it.
    std::fs::remove_dir_all(&blocker).unwrap();
    gcks.rekey_now().unwrap();
    let (event, _) = next_rekeyed(&gcks);
    let GcksEvent::Rekeyed { seq, members, .. } = event else {
        unreachable!()
    };
    assert_eq!(
        (seq, members),
        (2, 1),
        "the retried batch is message 2: no hole"
    );
    assert!(wait_applied(&member, 2), "the member applies message 2");
    member.shutdown().unwrap();
    gcks.shutdown().unwrap();
}

#[test]
fn the_member_count_never_reads_zero_while_batches_are_built() {
    let gcks = Arc::new(Gcks::start(config(4, None), SigningKey::from_bytes(&[5; 32])).unwrap());
    let replies: Vec<_> = (0..400).map(|i| gcks.join(MemberId(i)).unwrap()).collect();
    gcks.rekey_now().unwrap();
    for reply in replies {
        reply
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
    }
    // Rekeys at a high rate on one thread, figures read on this one.
    let stop = Arc::new(AtomicBool::new(false));
    let rekeyer = {
        let (gcks, stop) = (Arc::clone(&gcks), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                gcks.rekey_now().unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut readings = Vec::new();
    for _ in 0..300 {
        readings.push(gcks.stats().unwrap().members);
        std::thread::sleep(Duration::from_millis(3));
    }
    stop.store(true, Ordering::Relaxed);
    rekeyer.join().unwrap();
    let seq = gcks.stats().unwrap().seq;
    let wrong = readings.iter().filter(|&&m| m != 400).count();
    assert_eq!(
        wrong,
        0,
        "{wrong} of {} readings were not 400 (rekeyed up to message {seq})",
        readings.len()
    );
    assert!(seq > 10, "batches were built meanwhile (message {seq})");
    Arc::try_unwrap(gcks).unwrap().shutdown().unwrap();
}
