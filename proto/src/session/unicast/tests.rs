//! A GCKS delivering to unicast members over no network: acknowledgements, forged and replayed
//! acknowledgements, retransmission on a backoff, giving up and the member's resync.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use super::*;
use crate::lkh::{MemberId, RegistrationBundle};
use crate::session::receiver::{ReceiverConfig, ReceiverSession};
use crate::session::sender::SenderConfig;
use crate::test_support::{sealed, test_addr, TestGcks};

const GROUP: u32 = 41;
const SPI: u32 = 42;

#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

struct Setup {
    gcks: TestGcks,
    unicast: UnicastMembers,
    members: Vec<(ReceiverSession, UnicastReceiver, SocketAddr)>,
    now: Instant,
}

const SERVER: u16 = 7000;

fn server() -> SocketAddr {
    test_addr(1, SERVER)
}

/// A GCKS of 20 members whose first message is queued; members 1..=`unicast` are unicast
/// members, registered without an address (their announcements give it).
fn setup(unicast: u64, config: UnicastConfig) -> Setup {
    let now = origin();
    let (mut gcks, first) = TestGcks::new(GROUP, SPI, (9, 4), 20, SenderConfig::default(), now);
    let bundles: Vec<RegistrationBundle> = (1..=unicast)
        .map(|m| gcks.tree.join(MemberId(m)).unwrap())
        .collect();
    gcks.queue(now, &first);
    let mut members = Vec::new();
    let mut delivery = UnicastMembers::new(config, GROUP, SPI);
    for (i, bundle) in bundles.iter().enumerate() {
        let session = ReceiverSession::new(bundle, ReceiverConfig::new(server())).unwrap();
        delivery.register(session.order_key(), None, bundle.first_seq);
        let receiver = UnicastReceiver::new(now, server(), Duration::from_millis(500));
        members.push((session, receiver, test_addr(100 + i as u8, 9000)));
    }
    delivery.message_ready(gcks.sender.latest_seq().unwrap());
    Setup {
        gcks,
        unicast: delivery,
        members,
        now,
    }
}

impl Setup {
    /// Hands the GCKS one acknowledgement from `from`.
    fn ack(&mut self, from: SocketAddr, bytes: &[u8]) -> bool {
        let source = SenderSource {
            sender: &self.gcks.sender,
            next_mac_key: None,
        };
        self.unicast.handle_ack(from, bytes, &source)
    }

    /// Every acknowledgement the members owe, as (member index, bytes).
    fn member_acks(&mut self) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 2048];
        for (i, (session, receiver, _)) in self.members.iter_mut().enumerate() {
            while let Some(t) = receiver.poll_transmit(self.now, session, &mut buf) {
                assert_eq!(t.destination, Destination::Unicast(server()));
                out.push((i, buf[..t.len].to_vec()));
            }
        }
        out
    }

    fn deliver_acks(&mut self, acks: &[(usize, Vec<u8>)]) -> usize {
        let next_key = self.gcks.tree.next_mac_key();
        let source = SenderSource {
            sender: &self.gcks.sender,
            next_mac_key: Some(&next_key),
        };
        let mut taken = 0;
        for (i, bytes) in acks {
            let from = self.members[*i].2;
            taken += usize::from(self.unicast.handle_ack(from, bytes, &source));
        }
        taken
    }

    /// Every delivery datagram due now, as (destination, bytes).
    fn deliveries(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        let source = SenderSource {
            sender: &self.gcks.sender,
            next_mac_key: None,
        };
        while let Some(t) = self.unicast.poll_transmit(self.now, &mut buf, &source) {
            let Destination::Unicast(to) = t.destination else {
                panic!("a delivery goes by unicast");
            };
            out.push((to, buf[..t.len].to_vec()));
        }
        out
    }

    fn hand_to_members(&mut self, deliveries: &[(SocketAddr, Vec<u8>)]) -> Vec<DeliveryOutcome> {
        let mut outcomes = Vec::new();
        for (to, bytes) in deliveries {
            let (session, receiver, _) = self
                .members
                .iter_mut()
                .find(|(_, _, addr)| addr == to)
                .unwrap();
            outcomes.push(receiver.handle_datagram(self.now, session, server(), bytes));
        }
        outcomes
    }
}

#[test]
fn announced_members_get_their_message_and_acknowledge_it() {
    let mut s = setup(3, UnicastConfig::default());
    let first_seq = s.members[0].0.next_seq();
    // Without an address nothing is sent; the announcements tell the GCKS where they are.
    assert!(s.deliveries().is_empty());
    let announcements = s.member_acks();
    assert_eq!(announcements.len(), 3);
    assert_eq!(s.deliver_acks(&announcements), 3);
    let deliveries = s.deliveries();
    assert_eq!(deliveries.len(), 3);
    let outcomes = s.hand_to_members(&deliveries);
    assert!(outcomes
        .iter()
        .all(|o| *o == DeliveryOutcome::Applied { seq: first_seq }));
    for (session, _, _) in &s.members {
        assert_eq!(session.next_seq(), first_seq + 1);
        assert!(session.group_key().is_some());
    }
    let acks = s.member_acks();
    assert_eq!(s.deliver_acks(&acks), 3);
    let counters = *s.unicast.counters();
    assert_eq!(counters.deliveries_sent, 3);
    assert_eq!(counters.retransmissions, 0);
    assert_eq!(counters.messages_acknowledged, 3);
    assert_eq!(s.unicast.poll_timeout(), None, "nothing outstanding");
    for (session, _, _) in &s.members {
        assert_eq!(s.unicast.wants(session.order_key()), Some(first_seq + 1));
    }

    // The next rekey goes out to them at once, one datagram each.
    s.now += Duration::from_millis(50);
    s.gcks.rekey(s.now, &[], &[20]);
    s.unicast.message_ready(first_seq + 1);
    let deliveries = s.deliveries();
    assert_eq!(deliveries.len(), 3);
    let outcomes = s.hand_to_members(&deliveries);
    assert!(outcomes
        .iter()
        .all(|o| *o == DeliveryOutcome::Applied { seq: first_seq + 1 }));
    let acks = s.member_acks();
    assert_eq!(s.deliver_acks(&acks), 3);
    assert_eq!(s.unicast.counters().deliveries_sent, 6);
    let second: u64 = deliveries.iter().map(|(_, b)| b.len() as u64).sum();
    assert!(s.unicast.counters().bytes_sent > second);
}

#[test]
fn forged_and_replayed_acks_are_refused() {
    let mut s = setup(2, UnicastConfig::default());
    let announcements = s.member_acks();
    let first_seq = s.members[0].0.next_seq();
    let order_key = s.members[0].0.order_key();

    // Sealed with a key nobody in the group holds.
    let wrong = MacKey::from_bytes([7; 32]);
    let forged = sealed(
        (GROUP, SPI),
        first_seq,
        BodyRepr::Ack(AckRepr::own(order_key)),
        &wrong,
    );
    let source_counts = |s: &Setup| *s.unicast.counters();
    let from = s.members[0].2;
    assert!(!s.ack(from, &forged));
    // One bit flipped in a genuine acknowledgement.
    let mut flipped = announcements[0].1.clone();
    flipped[26] ^= 0x01;
    assert!(!s.ack(from, &flipped));
    // Of another group.
    let other_group = sealed(
        (GROUP + 1, SPI),
        first_seq,
        BodyRepr::Ack(AckRepr::own(order_key)),
        s.members[0].0.mac_key(first_seq).unwrap(),
    );
    assert!(!s.ack(from, &other_group));
    // For a message after the next one: nobody holds its key, not even the GCKS.
    let ahead = sealed(
        (GROUP, SPI),
        first_seq + 5,
        BodyRepr::Ack(AckRepr::own(order_key)),
        &wrong,
    );
    assert!(!s.ack(from, &ahead));
    assert_eq!(source_counts(&s).acks_rejected, 4);
    assert_eq!(source_counts(&s).acks_accepted, 0);
    assert!(s.deliveries().is_empty(), "no address was learnt");

    // The genuine one is taken, once: replayed from another address it is stale and does
    // not move the member.
    assert_eq!(s.deliver_acks(&announcements[..1]), 1);
    let attacker = test_addr(66, 6666);
    let replayed = announcements[0].1.clone();
    assert!(!s.ack(attacker, &replayed));
    assert_eq!(s.unicast.counters().acks_stale, 1);
    let deliveries = s.deliveries();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].0, s.members[0].2);

    // After the member applied and acknowledged the message, a replay of its
    // acknowledgement of it is stale too.
    s.hand_to_members(&deliveries);
    let acks = s.member_acks();
    let acks: Vec<_> = acks.into_iter().filter(|(i, _)| *i == 0).collect();
    assert_eq!(s.deliver_acks(&acks), 1);
    assert_eq!(s.deliver_acks(&acks), 0);
    assert_eq!(s.unicast.counters().acks_stale, 2);
}

#[test]
fn an_unacknowledged_delivery_is_sent_again_on_a_growing_backoff() {
    let config = UnicastConfig {
        initial_timeout: Duration::from_millis(100),
        backoff: 2,
        max_timeout: Duration::from_millis(350),
        max_tries: 5,
        jitter: 0.25,
        seed: 3,
    };
    let mut s = setup(1, config);
    let announcements = s.member_acks();
    s.deliver_acks(&announcements);
    let start = s.now;
    let mut sent_at = Vec::new();
    // Every delivery is lost.
    loop {
        let sent = s.deliveries();
        if !sent.is_empty() {
            sent_at.push(s.now);
        }
        match s.unicast.poll_timeout() {
            Some(at) => {
                s.now = at;
                s.unicast.handle_timeout(s.now);
            }
            None => break,
        }
    }
    assert_eq!(sent_at.len(), 5, "five tries");
    let waits: Vec<Duration> = sent_at
        .windows(2)
        .map(|w| w[1] - w[0])
        .chain([s.now - sent_at[4]])
        .collect();
    let bases = [100, 200, 350, 350, 350];
    for (wait, base) in waits.iter().zip(bases) {
        let base = Duration::from_millis(base);
        assert!(
            *wait >= base && *wait <= base.mul_f64(1.25),
            "{waits:?} against {bases:?}"
        );
    }
    assert!(s.now - start < Duration::from_secs(2));
    assert_eq!(s.unicast.counters().retransmissions, 4);
}

#[test]
fn a_lost_ack_gets_the_delivery_again_and_the_member_acknowledges_again() {
    let mut s = setup(1, UnicastConfig::default());
    let announcements = s.member_acks();
    s.deliver_acks(&announcements);
    let first = s.deliveries();
    assert_eq!(
        s.hand_to_members(&first),
        [DeliveryOutcome::Applied {
            seq: s.members[0].0.next_seq() - 1
        }]
    );
    let _lost = s.member_acks();
    s.now = s.unicast.poll_timeout().unwrap();
    s.unicast.handle_timeout(s.now);
    let again = s.deliveries();
    assert_eq!(again.len(), 1);
    assert_eq!(s.hand_to_members(&again), [DeliveryOutcome::Duplicate]);
    let acks = s.member_acks();
    assert_eq!(s.deliver_acks(&acks), 1);
    assert_eq!(s.unicast.poll_timeout(), None);
    assert_eq!(s.members[0].1.counters().duplicates, 1);
}

#[test]
fn after_the_last_try_the_gcks_gives_up_and_the_member_resyncs() {
    let config = UnicastConfig {
        max_tries: 3,
        ..UnicastConfig::default()
    };
    let mut s = setup(1, config);
    let announcements = s.member_acks();
    s.deliver_acks(&announcements);
    let first_seq = s.members[0].0.next_seq();
    let mut tries = 0;
    loop {
        tries += s.deliveries().len();
        match s.unicast.poll_timeout() {
            Some(at) => {
                s.now = at;
                s.unicast.handle_timeout(s.now);
            }
            None => break,
        }
    }
    assert_eq!(tries, 3);
    let events: Vec<_> = std::iter::from_fn(|| s.unicast.poll_event()).collect();
    let order_key = s.members[0].0.order_key();
    assert!(events.contains(&UnicastEvent::GaveUp {
        receiver_id: order_key,
        seq: first_seq
    }));
    assert_eq!(s.unicast.counters().gave_up, 1);

    // A second message goes out; the member, still wanting the first, sees a later one and
    // learns it is behind.
    s.now += Duration::from_millis(10);
    s.gcks.rekey(s.now, &[], &[20]);
    s.unicast.message_ready(first_seq + 1);
    let later = s.deliveries();
    assert_eq!(later.len(), 1);
    assert_eq!(s.hand_to_members(&later), [DeliveryOutcome::Ahead]);

    // It resyncs as any member does, then tells the GCKS.
    for seq in [first_seq, first_seq + 1] {
        let item = s.gcks.sender.resync_item(seq, order_key).unwrap();
        let (manifest, chunk) = (item.manifest.to_vec(), item.chunk.to_vec());
        s.members[0]
            .0
            .handle_resync(s.now, &manifest, &chunk)
            .unwrap();
    }
    s.members[0].1.handle_resynced();
    let acks = s.member_acks();
    assert_eq!(s.deliver_acks(&acks), 1);
    assert_eq!(s.unicast.wants(order_key), Some(first_seq + 2));
    assert_eq!(s.unicast.poll_timeout(), None, "nothing outstanding");
}

#[test]
fn a_delivery_for_another_member_or_under_a_wrong_key_is_dropped() {
    let mut s = setup(2, UnicastConfig::default());
    let announcements = s.member_acks();
    s.deliver_acks(&announcements);
    let deliveries = s.deliveries();
    // Member 0's delivery handed to member 1.
    let to_zero = deliveries
        .iter()
        .find(|(to, _)| *to == s.members[0].2)
        .unwrap()
        .1
        .clone();
    let (session, receiver, _) = &mut s.members[1];
    assert_eq!(
        receiver.handle_datagram(s.now, session, server(), &to_zero),
        DeliveryOutcome::Dropped
    );
    let mut flipped = to_zero.clone();
    let at = flipped.len() - 30;
    flipped[at] ^= 0x40;
    let (session, receiver, _) = &mut s.members[0];
    assert_eq!(
        receiver.handle_datagram(s.now, session, server(), &flipped),
        DeliveryOutcome::Dropped
    );
    assert_eq!(
        receiver.handle_datagram(s.now, session, server(), &to_zero),
        DeliveryOutcome::Applied {
            seq: session.next_seq() - 1
        }
    );
}

#[test]
fn a_delivery_larger_than_the_datagram_cap_goes_in_two_halves() {
    let mut s = setup(1, UnicastConfig::default());
    let announcements = s.member_acks();
    s.deliver_acks(&announcements);
    let source = SenderSource {
        sender: &s.gcks.sender,
        next_mac_key: None,
    };
    // A cap one byte short of the whole delivery: manifest and chunk together do not fit.
    let seq = s.members[0].0.next_seq();
    let (manifest, chunk) = source.item(seq, s.members[0].0.order_key()).unwrap();
    let whole = crate::wire::datagram::OVERHEAD
        + crate::wire::delivery::FIXED_LEN
        + manifest.len()
        + chunk.len();
    let mut buf = vec![0u8; whole - 1];
    let mut halves = Vec::new();
    while let Some(t) = s.unicast.poll_transmit(s.now, &mut buf, &source) {
        halves.push((s.members[0].2, buf[..t.len].to_vec()));
    }
    assert_eq!(halves.len(), 2);
    assert_eq!(s.unicast.counters().deliveries_sent, 2);
    // The chunk half alone is not enough.
    let (session, receiver, _) = &mut s.members[0];
    assert_eq!(
        receiver.handle_datagram(s.now, session, server(), &halves[1].1),
        DeliveryOutcome::Dropped
    );
    let outcomes = s.hand_to_members(&halves);
    assert_eq!(outcomes[0], DeliveryOutcome::Half);
    assert!(matches!(outcomes[1], DeliveryOutcome::Applied { .. }));
    let acks = s.member_acks();
    assert_eq!(s.deliver_acks(&acks), 1);
    assert_eq!(s.unicast.poll_timeout(), None);
}
