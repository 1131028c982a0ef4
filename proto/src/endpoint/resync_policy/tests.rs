//! The resync policy against a scripted target: endpoint order, fallback, backoff, spreading,
//! the state-check backoff under a flood, streamed verification, deferred requests.

// Test helpers unwrap: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use rand::SeedableRng;

use super::*;
use crate::endpoint::ResyncProtocol;

/// A target that takes items whose manifest is `b"seq N"` for its next message (and chunk
/// `b"good"`), and state answers `b"latest N"`.
#[derive(Debug, Default)]
struct Fake {
    next_seq: u64,
    reregister: bool,
    applied: Vec<u64>,
    beyond: bool,
}

fn parse_seq(bytes: &[u8], prefix: &str) -> Option<u64> {
    std::str::from_utf8(bytes)
        .ok()?
        .strip_prefix(prefix)?
        .parse()
        .ok()
}

impl ResyncTarget for Fake {
    fn group_id(&self) -> u32 {
        7
    }
    fn next_seq(&self) -> u64 {
        self.next_seq
    }
    fn order_key(&self) -> u32 {
        3
    }
    fn must_reregister(&self) -> bool {
        self.reregister
    }
    fn apply_item(
        &mut self,
        _: Instant,
        manifest: &[u8],
        chunk: &[u8],
    ) -> Result<u64, ResyncError> {
        if self.reregister {
            return Err(ResyncError::Reregistering);
        }
        let seq = parse_seq(manifest, "seq ").ok_or(ResyncError::MalformedManifest)?;
        if seq != self.next_seq {
            return Err(ResyncError::WrongMessage {
                expected: self.next_seq,
                got: seq,
            });
        }
        if chunk != b"good" {
            return Err(ResyncError::NotMyChunk);
        }
        self.applied.push(seq);
        self.next_seq += 1;
        Ok(seq)
    }
    fn apply_state(&mut self, _: Instant, manifest: &[u8]) -> Result<StateVerdict, ResyncError> {
        let latest = parse_seq(manifest, "latest ").ok_or(ResyncError::MalformedManifest)?;
        if latest < self.next_seq {
            Ok(StateVerdict::UpToDate)
        } else {
            Ok(StateVerdict::Behind {
                from_seq: self.next_seq,
            })
        }
    }
    fn beyond_history(&mut self, _: Instant) {
        self.beyond = true;
        self.reregister = true;
    }
}

fn tcp(port: u16) -> ResyncEndpoint {
    ResyncEndpoint {
        protocol: ResyncProtocol::Tcp,
        addr: SocketAddr::from(([198, 18, 0, 1], port)),
    }
}

const RELAY_A: u16 = 1;
const RELAY_B: u16 = 2;
const GCKS: u16 = 9;

fn config() -> ResyncConfig {
    ResyncConfig {
        relays: vec![tcp(RELAY_A), tcp(RELAY_B)],
        gcks: vec![tcp(GCKS)],
        ..ResyncConfig::default()
    }
}

fn policy(config: ResyncConfig, seed: u64) -> ResyncPolicy {
    ResyncPolicy::new(config, ChaCha8Rng::seed_from_u64(seed))
}

fn item(seq: u64, chunk: &[u8]) -> Fetched {
    Fetched::Item {
        manifest: format!("seq {seq}").into_bytes(),
        chunk: chunk.to_vec(),
    }
}

fn out_of_sync(from_seq: u64) -> ReceiverEvent {
    ReceiverEvent::OutOfSync { from_seq }
}

/// Any instant will do as the origin: time goes on only as the test advances it.
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

/// Runs the policy's timers until it sends a fetch (or `limit` passes); returns it and the
/// time it went out.
fn next_fetch(
    policy: &mut ResyncPolicy,
    target: &mut Fake,
    now: &mut Instant,
    limit: Duration,
) -> Option<FetchRequest> {
    let end = *now + limit;
    loop {
        if let Some(fetch) = policy.poll_fetch() {
            return Some(fetch);
        }
        let at = policy.poll_timeout()?;
        if at > end {
            return None;
        }
        *now = (*now).max(at);
        policy.handle_timeout(*now, target);
    }
}

#[test]
fn relays_are_asked_before_the_gcks_and_each_goes_on_from_the_next_missing_message() {
    let mut now = origin();
    let mut target = Fake {
        next_seq: 10,
        ..Fake::default()
    };
    let mut policy = policy(config(), 1);
    policy.handle_event(now, &out_of_sync(10), &target);
    let first = next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(20)).unwrap();
    assert_eq!(first.endpoint, tcp(RELAY_A));
    assert_eq!(
        first.what,
        FetchWhat::Items {
            from_seq: 10,
            leaf: 3
        }
    );
    assert_eq!(first.group_id, 7);
    assert_eq!(first.deadline, now + Duration::from_secs(10));
    assert_eq!(first.max_bytes, 16 << 20);
    // The first relay serves 10 and 11, then has a hole.
    policy.handle_fetched(now, first.id, item(10, b"good"), &mut target);
    policy.handle_fetched(now, first.id, item(11, b"good"), &mut target);
    policy.handle_fetched(now, first.id, Fetched::NotHeld, &mut target);
    let second = policy.poll_fetch().unwrap();
    assert_eq!(second.endpoint, tcp(RELAY_B));
    assert_eq!(
        second.what,
        FetchWhat::Items {
            from_seq: 12,
            leaf: 3
        }
    );
    // The second relay is behind: an empty answer.
    policy.handle_fetched(now, second.id, Fetched::End, &mut target);
    let third = policy.poll_fetch().unwrap();
    assert_eq!(third.endpoint, tcp(GCKS));
    assert_eq!(
        third.what,
        FetchWhat::Items {
            from_seq: 12,
            leaf: 3
        }
    );
    policy.handle_fetched(now, third.id, item(12, b"good"), &mut target);
    policy.handle_fetched(now, third.id, Fetched::End, &mut target);
    assert_eq!(target.applied, vec![10, 11, 12]);
    assert!(!policy.is_busy(), "served through to the GCKS's latest");
    assert_eq!(policy.poll_fetch(), None);
    let counters = policy.counters();
    assert_eq!(counters.resyncs_started, 1);
    assert_eq!(counters.fetches, 3);
    assert_eq!(counters.items_applied, 3);
    assert_eq!(counters.resyncs_failed, 0);
    // Items of a fetch that is over change nothing.
    policy.handle_fetched(now, first.id, item(13, b"good"), &mut target);
    assert_eq!(target.applied, vec![10, 11, 12]);
}

#[test]
fn a_fetch_that_streams_a_bad_item_then_good_ones_is_dropped_and_the_next_endpoint_asked() {
    let mut now = origin();
    let mut target = Fake {
        next_seq: 5,
        ..Fake::default()
    };
    let mut policy = policy(config(), 2);
    policy.handle_event(now, &out_of_sync(5), &target);
    let relay = next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(20)).unwrap();
    policy.handle_fetched(now, relay.id, item(5, b"good"), &mut target);
    // A forged chunk: the relay is dropped at once, its fetch cancelled.
    policy.handle_fetched(now, relay.id, item(6, b"forged"), &mut target);
    assert_eq!(policy.poll_cancel(), Some(relay.id));
    assert_eq!(policy.counters().items_rejected, 1);
    let next = policy.poll_fetch().unwrap();
    assert_eq!(next.endpoint, tcp(RELAY_B));
    assert_eq!(
        next.what,
        FetchWhat::Items {
            from_seq: 6,
            leaf: 3
        }
    );
    // What the dropped relay still streams (good items) is ignored.
    policy.handle_fetched(now, relay.id, item(6, b"good"), &mut target);
    policy.handle_fetched(now, relay.id, item(7, b"good"), &mut target);
    assert_eq!(target.applied, vec![5]);
    policy.handle_fetched(now, next.id, item(6, b"good"), &mut target);
    policy.handle_fetched(now, next.id, item(7, b"good"), &mut target);
    policy.handle_fetched(now, next.id, Fetched::End, &mut target);
    assert_eq!(target.applied, vec![5, 6, 7]);
    assert!(!policy.is_busy());
    assert!(std::iter::from_fn(|| policy.poll_event()).any(
        |e| matches!(e, ResyncEvent::ItemRejected { endpoint, .. } if endpoint == tcp(RELAY_A))
    ));
}

#[test]
fn an_endpoint_streaming_more_items_than_the_cap_is_dropped() {
    let mut now = origin();
    let mut target = Fake {
        next_seq: 1,
        ..Fake::default()
    };
    let mut config = config();
    config.max_fetch_items = 3;
    let mut policy = policy(config, 3);
    policy.handle_event(now, &out_of_sync(1), &target);
    let relay = next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(20)).unwrap();
    for seq in 1..=4 {
        policy.handle_fetched(now, relay.id, item(seq, b"good"), &mut target);
    }
    assert_eq!(target.applied, vec![1, 2, 3]);
    assert_eq!(policy.poll_cancel(), Some(relay.id));
    let next = policy.poll_fetch().unwrap();
    assert_eq!(
        next.what,
        FetchWhat::Items {
            from_seq: 4,
            leaf: 3
        }
    );
}

#[test]
fn failed_rounds_back_off_exponentially_up_to_the_cap_and_then_give_up() {
    let mut now = origin();
    let mut target = Fake::default();
    let mut config = config();
    config.rounds = 8;
    config.backoff_initial = Duration::from_millis(200);
    config.backoff_max = Duration::from_secs(2);
    let mut policy = policy(config, 4);
    policy.handle_event(now, &out_of_sync(0), &target);
    let mut gaps = Vec::new();
    let mut last_round_end = None;
    for round in 0..8 {
        for expected in [RELAY_A, RELAY_B, GCKS] {
            let fetch =
                next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(60)).unwrap();
            assert_eq!(fetch.endpoint, tcp(expected), "round {round}");
            if expected == RELAY_A {
                if let Some(end) = last_round_end {
                    gaps.push(now - end);
                }
            }
            let reason = FetchFailure::Connection;
            policy.handle_fetched(now, fetch.id, Fetched::Failed { reason }, &mut target);
        }
        last_round_end = Some(now);
    }
    assert!(!policy.is_busy(), "gave up after the last round");
    assert_eq!(policy.counters().resyncs_failed, 1);
    assert_eq!(policy.counters().fetch_failures, 24);
    // Round r waits a jittered 200 ms * 2^(r-1) (in [half, whole)), capped at 2 s.
    assert_eq!(gaps.len(), 7);
    for (i, gap) in gaps.iter().enumerate() {
        let base = Duration::from_millis(200 * (1 << i)).min(Duration::from_secs(2));
        assert!(
            *gap >= base / 2 && *gap <= base,
            "round {}: {gap:?} for {base:?}",
            i + 1
        );
    }
    assert!(gaps[3] > gaps[0] * 2, "grows: {gaps:?}");
    assert!(gaps[6] <= Duration::from_secs(2), "capped: {gaps:?}");
}

#[test]
fn a_round_where_every_endpoint_answered_empty_ends_without_retrying() {
    let mut now = origin();
    let mut target = Fake::default();
    let mut policy = policy(config(), 5);
    policy.handle_event(now, &out_of_sync(0), &target);
    for _ in 0..3 {
        let fetch =
            next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(60)).unwrap();
        policy.handle_fetched(now, fetch.id, Fetched::End, &mut target);
    }
    assert!(!policy.is_busy());
    assert_eq!(policy.counters().fetches, 3);
    assert_eq!(policy.counters().resyncs_failed, 0);
}

#[test]
fn beyond_history_from_the_gcks_makes_the_member_reregister_but_not_from_a_relay() {
    let mut now = origin();
    let mut target = Fake::default();
    let mut policy = policy(config(), 6);
    policy.handle_event(now, &out_of_sync(0), &target);
    let relay = next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(20)).unwrap();
    policy.handle_fetched(now, relay.id, Fetched::BeyondHistory, &mut target);
    assert!(
        !target.beyond,
        "a relay is not believed while the GCKS can be asked"
    );
    let relay_b = policy.poll_fetch().unwrap();
    policy.handle_fetched(now, relay_b.id, Fetched::NotHeld, &mut target);
    let gcks = policy.poll_fetch().unwrap();
    assert_eq!(gcks.endpoint, tcp(GCKS));
    policy.handle_fetched(now, gcks.id, Fetched::BeyondHistory, &mut target);
    assert!(target.beyond);
    assert!(!policy.is_busy());
    // A target that must register again fetches nothing more.
    policy.handle_event(now, &out_of_sync(0), &target);
    assert!(!policy.is_busy());
}

#[test]
fn the_spread_grows_with_the_group_size_up_to_its_bound() {
    let draws = |group_size: u32| -> Vec<Duration> {
        let mut config = config();
        config.group_size = group_size;
        let mut policy = policy(config, 7);
        let now = origin();
        let mut target = Fake::default();
        (0..200)
            .map(|_| {
                policy.handle_event(now, &out_of_sync(0), &target);
                let at = policy.poll_timeout().unwrap();
                // End the task: every endpoint answers empty.
                let mut t = at;
                while let Some(fetch) = next_fetch(&mut policy, &mut target, &mut t, Duration::ZERO)
                {
                    policy.handle_fetched(t, fetch.id, Fetched::End, &mut target);
                }
                at - now
            })
            .collect()
    };
    let max = |d: &[Duration]| d.iter().max().copied().unwrap();
    let small = draws(10);
    let medium = draws(1_000);
    let large = draws(1_000_000);
    // Capacity 1,000/s: 10 members spread over 10 ms, 1,000 over 1 s, a million over the
    // 10 s bound.
    assert!(max(&small) < Duration::from_millis(10), "{:?}", max(&small));
    assert!(max(&medium) < Duration::from_secs(1));
    assert!(
        max(&medium) > Duration::from_millis(900),
        "{:?}",
        max(&medium)
    );
    assert!(max(&large) < Duration::from_secs(10));
    assert!(max(&large) > Duration::from_secs(9), "{:?}", max(&large));
    let mean = |d: &[Duration]| d.iter().sum::<Duration>() / d.len() as u32;
    assert!(mean(&small) < mean(&medium) && mean(&medium) < mean(&large));
    let policy = policy(config(), 8);
    assert_eq!(policy.spread_window(), Duration::from_millis(1));
}

/// A flood of forged "ahead" datagrams raises a state check request every second (the
/// session's own rate limit) for a minute; every check finds the member up to date. The
/// policy lets a bounded number through, spaced by a growing backoff.
fn checks_under_a_forged_flood(group_size: u32, seconds: u64, seed: u64) -> Vec<Instant> {
    let start = origin();
    let mut now = start;
    let mut target = Fake {
        next_seq: 40,
        ..Fake::default()
    };
    let mut config = config();
    config.group_size = group_size;
    let mut policy = policy(config, seed);
    let mut sent = Vec::new();
    let end = start + Duration::from_secs(seconds);
    let mut next_forged = start;
    while now < end {
        if now >= next_forged {
            let forged = ReceiverEvent::StateCheckNeeded { claimed_seq: 1_000 };
            policy.handle_event(now, &forged, &target);
            next_forged = now + Duration::from_secs(1);
        }
        while let Some(fetch) = policy.poll_fetch() {
            assert_eq!(fetch.what, FetchWhat::State);
            assert_eq!(fetch.endpoint, tcp(RELAY_A), "a relay is asked first");
            sent.push(now);
            // The relay answers with the true latest message: nothing new.
            policy.handle_fetched(
                now,
                fetch.id,
                Fetched::State(b"latest 39".to_vec()),
                &mut target,
            );
        }
        now = [Some(next_forged), policy.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap()
            .max(now);
        policy.handle_timeout(now, &mut target);
    }
    sent
}

#[test]
fn a_forged_ahead_flood_yields_a_bounded_number_of_state_checks_per_member_per_minute() {
    for seed in 0..20 {
        let small = checks_under_a_forged_flood(100, 60, seed);
        // Backoff 2 s doubling to 60 s (jittered to [half, whole)): at most 7 in the first
        // minute instead of 60.
        assert!(
            (3..=7).contains(&small.len()),
            "seed {seed}: {} checks",
            small.len()
        );
        let gaps: Vec<Duration> = small.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0] / 2), "{gaps:?}");
    }
    // Over ten minutes the spacing reaches its cap: about one check a minute.
    let long = checks_under_a_forged_flood(100, 600, 1);
    // (At most 7 in the first minute, then gaps of at least 30 s.)
    assert!(long.len() <= 25, "{} checks in 10 minutes", long.len());
    // A large group backs off further: a million members and endpoints serving 1,000 checks
    // a second space each member's checks by up to 1,000 s, so the endpoints' load stays
    // bounded whatever the group size.
    let large = checks_under_a_forged_flood(1_000_000, 3_600, 1);
    let small_hour = checks_under_a_forged_flood(100, 3_600, 1);
    assert!(
        large.len() < small_hour.len(),
        "{} vs {}",
        large.len(),
        small_hour.len()
    );
    let last_gap = large.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(last_gap >= Duration::from_secs(500), "{last_gap:?}");
}

#[test]
fn a_state_check_that_finds_the_member_behind_resets_the_backoff() {
    let mut now = origin();
    let mut target = Fake {
        next_seq: 40,
        ..Fake::default()
    };
    let mut policy = policy(config(), 9);
    let ahead = ReceiverEvent::StateCheckNeeded { claimed_seq: 41 };
    // Three forged checks grow the spacing.
    for _ in 0..3 {
        policy.handle_event(now, &ahead, &target);
        let fetch =
            next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(60)).unwrap();
        policy.handle_fetched(
            now,
            fetch.id,
            Fetched::State(b"latest 39".to_vec()),
            &mut target,
        );
    }
    let before = now;
    policy.handle_event(now, &ahead, &target);
    let fetch = next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(60)).unwrap();
    assert!(
        now - before >= Duration::from_secs(4),
        "backed off: {:?}",
        now - before
    );
    // This time the claim is true.
    policy.handle_fetched(
        now,
        fetch.id,
        Fetched::State(b"latest 45".to_vec()),
        &mut target,
    );
    let before = now;
    policy.handle_event(now, &ahead, &target);
    next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(60)).unwrap();
    assert!(
        now - before < Duration::from_millis(10),
        "reset: {:?}",
        now - before
    );
}

#[test]
fn a_request_made_while_fetching_is_kept_and_started_afterwards_from_where_the_target_stands() {
    let mut now = origin();
    let mut target = Fake {
        next_seq: 4,
        ..Fake::default()
    };
    let mut policy = policy(config(), 10);
    let check = ReceiverEvent::StateCheckNeeded { claimed_seq: 4 };
    policy.handle_event(now, &check, &target);
    let state = next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(20)).unwrap();
    assert_eq!(state.what, FetchWhat::State);
    // While the check runs: another check is absorbed, an out-of-sync request is kept, and a
    // later check does not replace it.
    policy.handle_event(now, &check, &target);
    policy.handle_event(now, &out_of_sync(4), &target);
    policy.handle_event(now, &check, &target);
    assert_eq!(policy.poll_fetch(), None, "one fetch at a time");
    // Meanwhile multicast delivered message 4.
    target.next_seq = 6;
    policy.handle_fetched(
        now,
        state.id,
        Fetched::State(b"latest 3".to_vec()),
        &mut target,
    );
    let resync = next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(20)).unwrap();
    assert_eq!(
        resync.what,
        FetchWhat::Items {
            from_seq: 6,
            leaf: 3
        }
    );
    policy.handle_fetched(now, resync.id, Fetched::End, &mut target);
    // Every endpoint answered empty: the resync ends, and the kept state check was superseded.
    for _ in 0..2 {
        let fetch = policy.poll_fetch().unwrap();
        policy.handle_fetched(now, fetch.id, Fetched::End, &mut target);
    }
    assert!(!policy.is_busy());
    assert_eq!(
        next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(60)),
        None
    );
    assert_eq!(policy.counters().requests_coalesced, 2);
}

#[test]
fn a_fetch_the_driver_never_ends_fails_past_its_deadline() {
    let mut now = origin();
    let mut target = Fake::default();
    let mut policy = policy(config(), 11);
    policy.handle_event(now, &out_of_sync(0), &target);
    let relay = next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(20)).unwrap();
    let next = next_fetch(&mut policy, &mut target, &mut now, Duration::from_secs(20)).unwrap();
    assert_eq!(next.endpoint, tcp(RELAY_B));
    assert!(now >= relay.deadline);
    assert_eq!(policy.poll_cancel(), Some(relay.id));
}

#[test]
fn without_endpoints_nothing_is_fetched() {
    let now = origin();
    let target = Fake::default();
    let mut policy = policy(ResyncConfig::default(), 12);
    policy.handle_event(now, &out_of_sync(0), &target);
    assert!(!policy.is_busy());
    assert_eq!(policy.poll_timeout(), None);
}
