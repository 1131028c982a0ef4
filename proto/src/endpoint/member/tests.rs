//! The member endpoint over a real receiver session and real signed messages: keys durable
//! before events, a fetch with a tampered item, a forged "ahead" flood.

// Test helpers unwrap: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rand::SeedableRng;

use super::*;
use crate::endpoint::resync_policy::ResyncConfig;
use crate::endpoint::{FetchWhat, ResyncEndpoint, ResyncProtocol, StoreErrorKind};
use crate::lkh::MemberId;
use crate::session::sender::SenderConfig;
use crate::test_support::{sealed, test_addr, TestGcks};
use crate::wire::{BodyRepr, ObjectKind, SymbolRepr};

const GROUP_ID: u32 = 0x00AB_CDEF;
const SPI: u32 = 4;

fn addr(last: u8, port: u16) -> SocketAddr {
    test_addr(last, port)
}

fn tcp(last: u8) -> ResyncEndpoint {
    ResyncEndpoint {
        protocol: ResyncProtocol::Tcp,
        addr: addr(last, 9000),
    }
}

/// A GCKS's key tree and sender (serving resync items), and the bundle of member 2.
struct Gcks {
    gcks: TestGcks,
    /// The first message's MAC key (any key will do to seal forged traffic).
    first_mac_key: crate::auth::mac::MacKey,
}

impl Gcks {
    fn new(now: Instant) -> (Self, RegistrationBundle) {
        let (mut gcks, first) =
            TestGcks::new(GROUP_ID, SPI, (5, 11), 20, SenderConfig::default(), now);
        let bundle = gcks.tree.join(MemberId(2)).unwrap();
        gcks.queue(now, &first);
        let gcks = Self {
            gcks,
            first_mac_key: first.mac_key.clone(),
        };
        (gcks, bundle)
    }

    /// The next message: member `leaving` leaves.
    fn rekey(&mut self, now: Instant, leaving: u64) {
        self.gcks.rekey(now, &[], &[leaving]);
    }

    /// The resync item of message `seq` for the leaf with `order_key`.
    fn item(&self, seq: u64, order_key: u32) -> (Vec<u8>, Vec<u8>) {
        let item = self.gcks.sender.resync_item(seq, order_key).unwrap();
        (item.manifest.to_vec(), item.chunk.to_vec())
    }

    fn fetched(&self, seq: u64, order_key: u32) -> Fetched {
        let (manifest, chunk) = self.item(seq, order_key);
        Fetched::Item { manifest, chunk }
    }

    /// A datagram of the group claiming message `seq`, which the member cannot check.
    fn forged_ahead(&self, seq: u64) -> Vec<u8> {
        let body = BodyRepr::Symbol(SymbolRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            esi: 0,
            data: &[0x5A; 64],
        });
        sealed((GROUP_ID, SPI), seq, body, &self.first_mac_key)
    }
}

/// Any instant will do as the origin: time goes on only as the test advances it.
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

fn member(bundle: &RegistrationBundle, now: Instant, persist: bool) -> MemberEndpoint {
    let mut config = MemberEndpointConfig::new(addr(200, 7400), addr(1, 7401));
    config.resync = ResyncConfig {
        relays: vec![tcp(2)],
        gcks: vec![tcp(1)],
        ..ResyncConfig::default()
    };
    config.persist_keys = persist;
    MemberEndpoint::new(bundle, config, ChaCha8Rng::seed_from_u64(3), now).unwrap()
}

fn events(member: &mut MemberEndpoint) -> Vec<ReceiverEvent> {
    std::iter::from_fn(|| member.poll_event()).collect()
}

/// Runs the member's timers until it asks for a fetch, within `limit`.
fn next_fetch(member: &mut MemberEndpoint, now: &mut Instant, limit: Duration) -> FetchRequest {
    let end = *now + limit;
    loop {
        if let Some(fetch) = member.poll_fetch() {
            return fetch;
        }
        let at = member.poll_timeout().unwrap();
        assert!(at <= end, "no fetch within {limit:?}");
        *now = (*now).max(at);
        member.handle_timeout(*now);
    }
}

#[test]
fn keys_are_saved_before_the_events_of_the_message_that_made_them() {
    let now = origin();
    let (gcks, bundle) = Gcks::new(now);
    let mut member = member(&bundle, now, true);
    let order_key = member.session().order_key();
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    member.handle_command(
        now,
        MemberCommand::Resync {
            items: vec![gcks.item(1, order_key)],
            reply: Box::new(move |outcome| reply_tx.send(outcome).unwrap()),
        },
    );
    assert_eq!(reply_rx.try_recv().unwrap(), Ok(1));
    assert_eq!(
        events(&mut member),
        Vec::new(),
        "held until the keys are durable"
    );
    let (id, MemberStoreOp::SaveKeys { last_seq, body }) = member.poll_store().unwrap();
    assert_eq!(last_seq, 1);
    // The body is a member state file's, which reads back as the member's keys.
    let mut file = crate::lkh::member_state::MAGIC.to_vec();
    file.extend_from_slice(blake3::hash(&body).as_bytes());
    file.extend_from_slice(&body);
    let keys = MemberKeys::from_state_bytes(&file).unwrap();
    assert_eq!(keys.last_seq(), 1);
    assert_eq!(keys.member(), MemberId(2));
    member.handle_stored(now, id, Ok(()));
    let released = events(&mut member);
    assert!(
        matches!(
            released[..],
            [
                ReceiverEvent::GroupKeyUpdated { seq: 1, .. },
                ReceiverEvent::NewDataSa { seq: 1, .. },
                // The member's first Data SA is sent under at once.
                ReceiverEvent::DataSaActivated { .. }
            ]
        ),
        "{released:?}"
    );
    assert_eq!(member.poll_store().map(|(id, _)| id), None, "saved once");
    assert_eq!(member.figures().state_save_failures, 0);
}

#[test]
fn a_failed_save_is_counted_and_the_events_are_released() {
    let now = origin();
    let (gcks, bundle) = Gcks::new(now);
    let mut member = member(&bundle, now, true);
    let item = gcks.item(1, member.session().order_key());
    assert_eq!(member.apply_resync(now, &[item]), Ok(1));
    let (id, _) = member.poll_store().unwrap();
    let error = StoreError {
        kind: StoreErrorKind::NoSpace,
        detail: "full".into(),
    };
    member.handle_stored(now, id, Err(error));
    assert_eq!(member.figures().state_save_failures, 1);
    // Key update, new Data SA, its activation.
    assert_eq!(events(&mut member).len(), 3);
    // Stopping with nothing new to save stops at once.
    member.handle_command(now, MemberCommand::Stop);
    assert!(member.is_stopped());
}

#[test]
fn a_state_check_finds_the_member_behind_and_a_tampered_item_moves_the_resync_to_the_gcks() {
    let mut now = origin();
    let (mut gcks, bundle) = Gcks::new(now);
    gcks.rekey(now, 7);
    gcks.rekey(now, 8);
    let mut member = member(&bundle, now, false);
    let order_key = member.session().order_key();
    // Traffic of message 3, which the member cannot check: a state check, to the relay first.
    member.handle_datagram(now, Port::Listen, addr(1, 7400), &gcks.forged_ahead(3));
    let check = next_fetch(&mut member, &mut now, Duration::from_secs(5));
    assert_eq!(check.what, FetchWhat::State);
    assert_eq!(check.endpoint, tcp(2));
    let latest = gcks.item(3, order_key).0;
    member.handle_fetched(now, check.id, Fetched::State(latest));
    member.handle_fetched(now, check.id, Fetched::End);
    // Behind: a resync from message 1, to the relay first.
    let resync = next_fetch(&mut member, &mut now, Duration::from_secs(5));
    assert_eq!(resync.endpoint, tcp(2));
    assert_eq!(
        resync.what,
        FetchWhat::Items {
            from_seq: 1,
            leaf: order_key
        }
    );
    member.handle_fetched(now, resync.id, gcks.fetched(1, order_key));
    // The relay tampers with message 2's chunk, then streams good items.
    let (manifest, mut chunk) = gcks.item(2, order_key);
    let last = chunk.len() - 1;
    chunk[last] ^= 1;
    member.handle_fetched(now, resync.id, Fetched::Item { manifest, chunk });
    assert_eq!(member.poll_cancel_fetch(), Some(resync.id));
    member.handle_fetched(now, resync.id, gcks.fetched(2, order_key));
    member.handle_fetched(now, resync.id, gcks.fetched(3, order_key));
    assert_eq!(
        member.session().next_seq(),
        2,
        "nothing more from the dropped relay"
    );
    let from_gcks = member.poll_fetch().unwrap();
    assert_eq!(from_gcks.endpoint, tcp(1));
    assert_eq!(
        from_gcks.what,
        FetchWhat::Items {
            from_seq: 2,
            leaf: order_key
        }
    );
    member.handle_fetched(now, from_gcks.id, gcks.fetched(2, order_key));
    member.handle_fetched(now, from_gcks.id, gcks.fetched(3, order_key));
    member.handle_fetched(now, from_gcks.id, Fetched::End);
    assert_eq!(member.session().next_seq(), 4);
    let figures = member.figures();
    assert_eq!(figures.resync.items_applied, 3);
    assert_eq!(figures.resync.items_rejected, 1);
    assert_eq!(figures.resync.state_checks_started, 1);
    assert_eq!(figures.resync.resyncs_started, 1);
    assert_eq!(figures.receiver.applied_from_resync, 3);
    let applied: Vec<u64> = events(&mut member)
        .into_iter()
        .filter_map(|e| match e {
            ReceiverEvent::GroupKeyUpdated { seq, .. } => Some(seq),
            _ => None,
        })
        .collect();
    assert_eq!(applied, vec![1, 2, 3]);
}

#[test]
fn a_forged_ahead_flood_costs_each_member_a_few_state_checks_a_minute_not_one_a_second() {
    let start = origin();
    let mut now = start;
    let (gcks, bundle) = Gcks::new(now);
    let mut member = member(&bundle, now, false);
    let order_key = member.session().order_key();
    assert_eq!(member.apply_resync(now, &[gcks.item(1, order_key)]), Ok(1));
    let latest = gcks.item(1, order_key).0;
    let forged = gcks.forged_ahead(5);
    let mut checks = 0;
    let end = start + Duration::from_secs(60);
    while now < end {
        // A forged datagram every 10 ms.
        member.handle_datagram(now, Port::Listen, addr(66, 7400), &forged);
        while let Some(fetch) = member.poll_fetch() {
            assert_eq!(fetch.what, FetchWhat::State);
            assert_eq!(fetch.endpoint, tcp(2), "the relay is asked, not the GCKS");
            checks += 1;
            member.handle_fetched(now, fetch.id, Fetched::State(latest.clone()));
            member.handle_fetched(now, fetch.id, Fetched::End);
        }
        now += Duration::from_millis(10);
        if member.poll_timeout().is_some_and(|at| at <= now) {
            member.handle_timeout(now);
        }
        while member.poll_event().is_some() {}
    }
    let raised = member.figures().receiver.state_checks;
    // The session asks once a second (its own limit); the policy sends a handful.
    assert!(raised >= 55, "the session raised {raised}");
    assert!(
        (3..=7).contains(&checks),
        "{checks} state checks in a minute"
    );
    assert_eq!(member.session().next_seq(), 2, "the flood changed nothing");
}

/// A directory of two relays (hosts 2 and 3) and the GCKS (host 1), each with its own group.
fn directory() -> RelayDirectory {
    let contact = |last: u8| crate::lkh::RelayContact {
        id: u16::from(last),
        group: addr(200 + last, 7400),
        feedback: addr(last, 7401),
        resync: vec![tcp(last)],
    };
    RelayDirectory {
        relays: vec![contact(2), contact(3)],
        gcks: Some(contact(1)),
    }
}

/// The first datagram the GCKS's sender sends of its next message (its manifest).
fn first_datagram(gcks: &mut Gcks, now: Instant) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let transmit = gcks.gcks.sender.poll_transmit(now, &mut buf).unwrap();
    buf[..transmit.len].to_vec()
}

#[test]
fn a_member_whose_relay_dies_mid_message_moves_to_the_next_relay_and_resyncs_there() {
    let start = origin();
    let mut now = start;
    let (mut gcks, mut bundle) = Gcks::new(now);
    bundle.directory = directory();
    // The configuration names the GCKS only: the bundle's directory replaces it.
    let config = MemberEndpointConfig::new(addr(200, 7400), addr(1, 7401));
    let mut member =
        MemberEndpoint::new(&bundle, config, ChaCha8Rng::seed_from_u64(3), now).unwrap();
    let order_key = member.session().order_key();
    let first = member.poll_attachment().unwrap();
    assert_eq!(
        (first.relay, first.contact.group),
        (Some(0), addr(202, 7400))
    );
    assert_eq!(member.poll_attachment(), None);
    // Relay 0 sends the message's first datagram and dies.
    let manifest = first_datagram(&mut gcks, now);
    member.handle_datagram(now, Port::Listen, addr(2, 7401), &manifest);
    let mut buf = vec![0u8; 2048];
    let mut nacks_to = Vec::new();
    let mut moved_at = None;
    let mut fetch = None;
    while now < start + Duration::from_secs(10) && fetch.is_none() {
        while let Some(transmit) = member.poll_transmit(now, &mut buf) {
            if let Destination::Unicast(to) = transmit.destination {
                nacks_to.push(to);
            }
        }
        if let Some(attachment) = member.poll_attachment() {
            moved_at = Some(now);
            assert_eq!(attachment.relay, Some(1));
            assert_eq!(attachment.reason, Some(MoveReason::NackUnanswered));
            assert_eq!(attachment.contact.group, addr(203, 7400));
        }
        fetch = member.poll_fetch();
        if fetch.is_none() {
            now = member.poll_timeout().unwrap().max(now);
            member.handle_timeout(now);
        }
    }
    assert!(!nacks_to.is_empty(), "the member NACKed");
    assert!(
        nacks_to.iter().all(|&to| to == addr(2, 7401)),
        "to its relay: {nacks_to:?}"
    );
    let moved_at = moved_at.expect("moved");
    assert!(
        moved_at - start <= Duration::from_secs(3),
        "{:?}",
        moved_at - start
    );
    // Its state check goes to the new relay, and so does the resync that follows.
    let check = fetch.unwrap();
    assert_eq!((check.what, check.endpoint), (FetchWhat::State, tcp(3)));
    member.handle_fetched(now, check.id, Fetched::State(gcks.item(1, order_key).0));
    member.handle_fetched(now, check.id, Fetched::End);
    let resync = next_fetch(&mut member, &mut now, Duration::from_secs(5));
    assert_eq!(resync.endpoint, tcp(3));
    member.handle_fetched(now, resync.id, gcks.fetched(1, order_key));
    member.handle_fetched(now, resync.id, Fetched::End);
    assert_eq!(member.session().next_seq(), 2);
    assert!(
        now - start <= Duration::from_secs(3),
        "current at {:?}",
        now - start
    );
    let figures = member.figures();
    assert_eq!(figures.relay, Some(3), "counted at its new relay");
    assert_eq!(figures.failover.nack_moves, 1);
    // The dead relay is not asked again: the new relay first, then the GCKS.
    assert_eq!(member.policy().config().relays, vec![tcp(3)]);
    assert_eq!(member.policy().config().gcks, vec![tcp(1)]);
}

#[test]
fn a_signed_directive_moves_the_member_and_a_forged_or_stale_one_does_not() {
    use crate::endpoint::directive::{DirectiveMove, RelayDirective, RelayRef};
    let now = origin();
    let (gcks, mut bundle) = Gcks::new(now);
    bundle.directory = directory();
    let config = MemberEndpointConfig::new(addr(200, 7400), addr(1, 7401));
    let mut member =
        MemberEndpoint::new(&bundle, config, ChaCha8Rng::seed_from_u64(3), now).unwrap();
    member.poll_attachment();
    // Relay 2 (the first) is gone: its members to relay 3.
    let directive = |issued, from, to| RelayDirective {
        group_id: GROUP_ID,
        issued,
        moves: vec![DirectiveMove {
            from: Some(RelayRef::Relay(from)),
            modulus: 1,
            residue: 0,
            to: RelayRef::Relay(to),
        }],
    };
    let forged = directive(1, 2, 3)
        .sign(&ed25519_dalek::SigningKey::from_bytes(&[9; 32]))
        .unwrap();
    assert_eq!(
        member.apply_directive(now, &forged),
        Err(DirectiveError::BadSignature)
    );
    assert_eq!(member.poll_attachment(), None);
    let signed = directive(2, 2, 3).sign(&gcks.gcks.signing_key).unwrap();
    assert_eq!(member.apply_directive(now, &signed), Ok(true));
    let attachment = member.poll_attachment().unwrap();
    assert_eq!(
        (attachment.relay, attachment.reason),
        (Some(1), Some(MoveReason::Ordered))
    );
    assert_eq!(member.figures().failover.ordered_moves, 1);
    // Replayed: refused.
    let back = directive(2, 3, 2).sign(&gcks.gcks.signing_key).unwrap();
    assert_eq!(
        member.apply_directive(now, &back),
        Err(DirectiveError::Stale { issued: 2 })
    );
    assert_eq!(member.figures().relay, Some(3));
    // A newer one that does not take the member (it is on relay 3 now) changes nothing.
    let other = directive(3, 2, 3).sign(&gcks.gcks.signing_key).unwrap();
    assert_eq!(member.apply_directive(now, &other), Ok(false));
}

#[test]
fn regression_a_fetch_running_when_the_member_moves_passes_to_the_new_relay_not_the_gcks() {
    let start = origin();
    let mut now = start;
    let (gcks, mut bundle) = Gcks::new(now);
    bundle.directory = directory();
    let mut config = MemberEndpointConfig::new(addr(200, 7400), addr(1, 7401));
    config.failover.idle_silence = Duration::from_secs(2);
    let mut member =
        MemberEndpoint::new(&bundle, config, ChaCha8Rng::seed_from_u64(3), now).unwrap();
    let order_key = member.session().order_key();
    member.poll_attachment();
    // Behind: a resync to relay 2 runs (and hangs) when the member moves to relay 3.
    member.handle_datagram(now, Port::Listen, addr(2, 7401), &gcks.forged_ahead(3));
    let check = next_fetch(&mut member, &mut now, Duration::from_secs(5));
    assert_eq!(check.endpoint, tcp(2));
    while member.poll_attachment().is_none() {
        now = member.poll_timeout().unwrap().max(now);
        member.handle_timeout(now);
        assert!(now - start < Duration::from_secs(10), "no move");
    }
    // The hung fetch fails: the next endpoint is the new relay, not the GCKS.
    member.handle_fetched(
        now,
        check.id,
        Fetched::Failed {
            reason: crate::endpoint::FetchFailure::Connection,
        },
    );
    let next = next_fetch(&mut member, &mut now, Duration::from_secs(5));
    assert_eq!(next.endpoint, tcp(3));
    let _ = order_key;
}

#[test]
fn traffic_naming_a_later_spi_buys_a_rate_limited_state_check_and_no_key() {
    use super::traffic::SpiSeen;
    let mut now = origin();
    let (gcks, bundle) = Gcks::new(now);
    let mut member = member(&bundle, now, false);
    let item = gcks.item(1, member.session().order_key());
    assert_eq!(member.apply_resync(now, &[item]), Ok(1));
    let _ = events(&mut member);
    let spi = member.traffic_keys().sending().unwrap().spi;
    let next = member.traffic_keys().sending().unwrap().next_spi;
    assert_eq!(next, spi + 1, "the next SPI is announced");
    assert_eq!(member.handle_traffic_spi(now, spi), SpiSeen::Installed);
    assert_eq!(member.handle_traffic_spi(now, spi - 1), SpiSeen::Unknown);
    assert!(events(&mut member).is_empty());
    let checks = member.policy().counters().state_checks_started;
    // A flood of forged traffic under the next SPI: one state check per interval.
    for _ in 0..1000 {
        assert_eq!(member.handle_traffic_spi(now, next), SpiSeen::Later);
    }
    assert_eq!(
        events(&mut member),
        vec![ReceiverEvent::StateCheckNeeded { claimed_seq: 2 }]
    );
    // The policy asks after its spreading delay: one state fetch, nothing else.
    let fetch = next_fetch(&mut member, &mut now, Duration::from_secs(60));
    assert_eq!(fetch.what, FetchWhat::State);
    assert_eq!(member.policy().counters().state_checks_started, checks + 1);
    now += TRAFFIC_STATE_CHECK_INTERVAL;
    assert_eq!(member.handle_traffic_spi(now, next + 5), SpiSeen::Later);
    assert_eq!(events(&mut member).len(), 1);
    let figures = member.figures();
    assert_eq!(figures.later_spis_seen, 1001);
    assert_eq!(figures.later_spi_state_checks, 2);
    // No key changed: still at message 1, sending under the same SA.
    assert_eq!(figures.next_seq, 2);
    assert_eq!(member.traffic_keys().sending().unwrap().spi, spi);
    let signatures = figures.messages.signature_checks;
    now += TRAFFIC_STATE_CHECK_INTERVAL;
    member.handle_traffic_spi(now, next);
    assert_eq!(member.figures().messages.signature_checks, signatures);
}
