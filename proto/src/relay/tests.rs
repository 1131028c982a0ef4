//! The relay session against a real sender session and real messages, with no network in
//! between: what it forwards, what it refuses, what its repair looks like.

// Test helpers unwrap: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::lkh::MemberId;
use crate::session::StoredMessage;
use crate::test_support::{sealed, test_addr, TestGcks};
use crate::wire::{self, BodyRepr, DatagramRepr, NackRepr, ObjectKind};

const GROUP: u32 = 0x5E1A_0001;
const SPI: u32 = 9;

fn addr(last: u8) -> SocketAddr {
    test_addr(last, 7000)
}

/// A GCKS (key tree, signing key, sender session) and one relay registered with it.
struct Harness {
    gcks: TestGcks,
    relay: RelaySession,
    now: Instant,
    /// Every symbol datagram the GCKS sent: (seq, object, sbn, esi) -> data.
    gcks_symbols: HashMap<(u64, u8, u8, u32), Vec<u8>>,
    /// Every datagram the relay sent downstream.
    downstream: Vec<Vec<u8>>,
    /// The first batch, when the harness was asked not to queue it.
    first: Option<crate::lkh::RekeyBatch>,
}

/// The GCKS with `members` members and the relay, the first message (admitting them all)
/// queued but not yet delivered.
fn harness(members: u64) -> Harness {
    harness_with(members, |_| {})
}

/// [`harness`] whose first message has blocks of at most `max_block_symbols` chunks.
fn harness_in_blocks(members: u64, max_block_symbols: u32) -> Harness {
    harness_in_blocks_with(members, max_block_symbols, |_| {})
}

/// [`harness_in_blocks`] with the relay's configuration changed by `configure` first.
fn harness_in_blocks_with(
    members: u64,
    max_block_symbols: u32,
    configure: impl FnOnce(&mut RelayConfig),
) -> Harness {
    let mut h = harness_with_queue(members, |_| {}, configure, false);
    let params = crate::session::layout::MessageParams {
        spi: SPI,
        max_block_symbols,
        ..crate::session::layout::MessageParams::default()
    };
    let batch = h.first.take().unwrap();
    let built = crate::session::layout::build_message(
        &batch,
        &h.gcks.tree.leaves_in_order(),
        &h.gcks.signing_key,
        &params,
    )
    .unwrap();
    let prepared = PreparedMessage::new(built, batch.mac_key.clone()).unwrap();
    h.gcks.sender.queue_message(h.now, prepared).unwrap();
    h
}

/// [`harness`] with the relay's registration bundle changed by `alter` first.
fn harness_with(members: u64, alter: impl FnOnce(&mut crate::lkh::RegistrationBundle)) -> Harness {
    harness_with_queue(members, alter, |_| {}, true)
}

/// [`harness_with`], the first message queued at the GCKS or kept in [`Harness::first`].
fn harness_with_queue(
    members: u64,
    alter: impl FnOnce(&mut crate::lkh::RegistrationBundle),
    configure: impl FnOnce(&mut RelayConfig),
    queue: bool,
) -> Harness {
    // Any instant will do as the origin: the time goes on only as the code advances it.
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let config = SenderConfig {
        heartbeat_min: Duration::from_millis(20),
        ..SenderConfig::default()
    };
    let (mut gcks, batch) = TestGcks::new(GROUP, SPI, (7, 3), members + 1, config, now);
    let mut relay_bundle = gcks.tree.join(MemberId(1)).unwrap();
    alter(&mut relay_bundle);
    let mut relay_config = RelayConfig::new(addr(1));
    relay_config.downstream.heartbeat_min = Duration::from_millis(20);
    configure(&mut relay_config);
    let relay = RelaySession::new(&relay_bundle, relay_config, now).unwrap();
    let first = if queue {
        gcks.queue(now, &batch);
        None
    } else {
        Some(batch)
    };
    Harness {
        gcks,
        relay,
        now,
        gcks_symbols: HashMap::new(),
        downstream: Vec::new(),
        first,
    }
}

/// What becomes of one of the GCKS's datagrams on its way to the relay.
enum Fate {
    /// It arrives as sent.
    Pass,
    /// It is lost.
    Drop,
    /// These bytes arrive instead.
    Send(Vec<u8>),
}

impl Harness {
    fn queue(&mut self, batch: &crate::lkh::RekeyBatch) {
        self.gcks.queue(self.now, batch);
    }

    /// Runs both sessions for `duration` of virtual time: the GCKS's datagrams go through
    /// `upstream` (which may drop or change them) to the relay, the relay's upstream
    /// datagrams back to the GCKS, its downstream ones are recorded.
    fn run(&mut self, duration: Duration, mut upstream: impl FnMut(&[u8]) -> Option<Vec<u8>>) {
        let end = self.now + duration;
        let mut buf = vec![0u8; 65_536];
        for _ in 0..1_000_000 {
            let mut busy = false;
            while let Some(transmit) = self.gcks.sender.poll_transmit(self.now, &mut buf) {
                busy = true;
                let bytes = buf[..transmit.len].to_vec();
                if let Ok(repr) = DatagramRepr::parse(&bytes) {
                    if let BodyRepr::Symbol(symbol) = &repr.body {
                        let key = (repr.seq, symbol.object as u8, symbol.sbn, symbol.esi);
                        self.gcks_symbols.insert(key, symbol.data.to_vec());
                    }
                }
                if let Some(bytes) = upstream(&bytes) {
                    self.relay.handle_upstream(self.now, addr(1), &bytes);
                }
            }
            while let Some(transmit) = self.relay.poll_transmit(self.now, &mut buf) {
                busy = true;
                let bytes = buf[..transmit.len].to_vec();
                match transmit.tier {
                    Tier::Upstream => self.gcks.sender.handle_datagram(self.now, addr(2), &bytes),
                    Tier::Downstream => self.downstream.push(bytes),
                }
            }
            if busy {
                continue;
            }
            if !self
                .gcks
                .wait_for_timers(&mut self.now, end, &mut self.relay)
            {
                return;
            }
        }
        panic!("the sessions did not go quiet");
    }

    /// [`Harness::run`] with every symbol datagram of the GCKS handed to `rewrite` on the
    /// way to the relay (with its message's sequence number), which decides its [`Fate`];
    /// every other datagram passes.
    fn run_rewriting_symbols(
        &mut self,
        duration: Duration,
        mut rewrite: impl FnMut(u64, &wire::SymbolRepr<'_>) -> Fate,
    ) {
        self.run(duration, |bytes| {
            let repr = DatagramRepr::parse(bytes).ok()?;
            let fate = match &repr.body {
                BodyRepr::Symbol(symbol) => rewrite(repr.seq, symbol),
                _ => Fate::Pass,
            };
            match fate {
                Fate::Pass => Some(bytes.to_vec()),
                Fate::Drop => None,
                Fate::Send(bytes) => Some(bytes),
            }
        });
    }

    fn events(&mut self) -> Vec<RelayEvent> {
        std::iter::from_fn(|| self.relay.poll_event()).collect()
    }

    /// A datagram of message `seq` with `body`, sealed under `key`.
    fn sealed(seq: u64, body: BodyRepr<'_>, key: &crate::auth::mac::MacKey) -> Vec<u8> {
        sealed((GROUP, SPI), seq, body, key)
    }
}

/// `symbol`'s datagram of message `seq` with `data` in place of its own, sealed under `key`:
/// what an insider (who holds the group's MAC key) sends.
fn with_data(
    seq: u64,
    symbol: &wire::SymbolRepr<'_>,
    data: &[u8],
    key: &crate::auth::mac::MacKey,
) -> Vec<u8> {
    Harness::sealed(
        seq,
        BodyRepr::Symbol(wire::SymbolRepr { data, ..*symbol }),
        key,
    )
}

/// The downstream symbol datagrams: (seq, object, sbn, esi) -> data.
fn symbols(datagrams: &[Vec<u8>]) -> HashMap<(u64, u8, u8, u32), Vec<u8>> {
    datagrams
        .iter()
        .filter_map(|bytes| {
            let repr = DatagramRepr::parse(bytes).ok()?;
            match repr.body {
                BodyRepr::Symbol(symbol) => Some((
                    (repr.seq, symbol.object as u8, symbol.sbn, symbol.esi),
                    symbol.data.to_vec(),
                )),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn a_verified_message_is_forwarded_whole_and_its_repair_symbols_equal_the_gckss() {
    let mut h = harness(300);
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    let events = h.events();
    let chunks = h.relay.message(1).unwrap().chunk_count();
    assert!(chunks > 4, "a message of several chunks ({chunks})");
    assert!(events.contains(&RelayEvent::Forwarded { seq: 1, chunks }));
    assert_eq!(h.relay.counters().forwarded, 1);
    assert_eq!(
        h.relay.upstream_counters().bad_chunks,
        0,
        "honest chunks all verify"
    );
    // Every chunk was authenticated: one signature each, plus the manifest's.
    assert_eq!(
        h.relay.upstream_message_counters().chunks_verified,
        chunks as u64
    );
    let upstream = {
        let (seq, key, manifest, symbols) = h.gcks.sender.message(1).unwrap().parts();
        (seq, key, manifest.to_vec(), symbols.to_vec())
    };
    let (seq, key, manifest, data) = h.relay.message(1).unwrap().parts();
    assert_eq!(
        (seq, key, manifest, data),
        (upstream.0, upstream.1, &upstream.2[..], &upstream.3[..]),
        "the relay holds the GCKS's message byte for byte"
    );

    // Ask both for repair of block 0: a downstream member's NACK to the relay, the relay's
    // own to the GCKS, each sealed with message 1's key.
    let key = crate::auth::mac::MacKey::from_bytes(upstream.1);
    let nack = |need| {
        Harness::sealed(
            1,
            BodyRepr::Nack(NackRepr {
                object: ObjectKind::Chunks,
                sbn: 0,
                round: 1,
                need,
                receiver_id: 99,
                echo: None,
            }),
            &key,
        )
    };
    let sent_before = h.downstream.len();
    h.relay.handle_downstream(h.now, addr(3), &nack(6));
    h.gcks.sender.handle_datagram(h.now, addr(3), &nack(6));
    h.run(Duration::from_secs(1), |bytes| Some(bytes.to_vec()));
    let relay_symbols = symbols(&h.downstream);
    let repairs = symbols(&h.downstream[sent_before..])
        .into_keys()
        .filter(|&(seq, object, sbn, _)| seq == 1 && object == ObjectKind::Chunks as u8 && sbn == 0)
        .count();
    assert!(
        repairs >= 6,
        "the relay answered the NACK itself ({repairs})"
    );
    let mut compared = 0;
    for (id, data) in &relay_symbols {
        if let Some(gcks) = h.gcks_symbols.get(id) {
            assert_eq!(data, gcks, "symbol {id:?} differs between relay and GCKS");
            compared += 1;
        }
    }
    let manifest = crate::session::manifest::SignedManifest::parse(&upstream.2)
        .unwrap()
        .manifest;
    let info = rekeycast_fec::ObjectInfo::parse(&manifest.fec_info).unwrap();
    let k0 = info.partition().block_len(0).unwrap();
    let repair_compared = relay_symbols
        .keys()
        .filter(|&&(seq, object, sbn, esi)| {
            object == ObjectKind::Chunks as u8
                && sbn == 0
                && esi >= k0
                && h.gcks_symbols.contains_key(&(seq, object, sbn, esi))
        })
        .count();
    assert!(compared > chunks, "compared {compared} symbols");
    assert!(
        repair_compared >= 1,
        "at least one repair symbol (ESI beyond the source) was sent by both and compared"
    );
}

#[test]
fn tampered_and_forged_upstream_datagrams_are_never_forwarded() {
    let mut h = harness(300);
    let (_, key, manifest, _) = h.gcks.sender.message(1).unwrap().parts();
    let key = crate::auth::mac::MacKey::from_bytes(key);
    let manifest = crate::session::manifest::SignedManifest::parse(manifest)
        .unwrap()
        .manifest;
    let info = rekeycast_fec::ObjectInfo::parse(&manifest.fec_info).unwrap();
    let k0 = info.partition().block_len(0).unwrap();
    let mut tampered = 0;
    let mut forged = 0;
    // An insider (it holds the MAC key) changes one byte of source symbols 0 and 2 of block 0
    // and seals them again; an outsider sends the other even source symbols with a wrong MAC.
    // The genuine symbols never arrive: repair has to fill in.
    h.run_rewriting_symbols(Duration::from_secs(3), |seq, symbol| {
        if symbol.object == ObjectKind::Chunks
            && symbol.sbn == 0
            && symbol.esi < k0
            && symbol.esi % 2 == 0
        {
            let mut data = symbol.data.to_vec();
            let last = data.len() - 1;
            data[last] ^= 0x40;
            let body = BodyRepr::Symbol(wire::SymbolRepr {
                data: &data,
                ..*symbol
            });
            if symbol.esi < 4 {
                tampered += 1;
                return Fate::Send(Harness::sealed(seq, body, &key));
            }
            forged += 1;
            let mut bytes = Harness::sealed(seq, body, &key);
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            return Fate::Send(bytes);
        }
        Fate::Pass
    });
    assert!(tampered > 0 && forged > 0);
    let counters = h.relay.upstream_counters();
    assert!(
        counters.bad_chunks >= 1,
        "tampered chunks fail authentication ({})",
        counters.bad_chunks
    );
    assert!(
        h.relay.upstream_datagram_counters().rejected() >= forged,
        "forged datagrams fail the MAC"
    );
    // Repair filled in for what was refused, and what was forwarded is the GCKS's message,
    // byte for byte.
    assert_eq!(
        h.relay.counters().forwarded,
        1,
        "the message completed by repair"
    );
    assert_eq!(
        h.relay.message(1).unwrap().parts(),
        h.gcks.sender.message(1).unwrap().parts()
    );
    let downstream = symbols(&h.downstream);
    for (id, data) in &downstream {
        assert_eq!(
            Some(data),
            h.gcks_symbols.get(id),
            "a forwarded symbol {id:?} is not the GCKS's"
        );
    }
}

#[test]
fn downstream_nacks_with_a_bad_mac_cause_no_repair() {
    let mut h = harness(100);
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    assert_eq!(h.relay.counters().forwarded, 1);
    let key = crate::auth::mac::MacKey::from_bytes(h.relay.message(1).unwrap().parts().1);
    let wrong = crate::auth::mac::MacKey::from_bytes([0x55; 32]);
    let nack = |key: &crate::auth::mac::MacKey| {
        Harness::sealed(
            1,
            BodyRepr::Nack(NackRepr {
                object: ObjectKind::Chunks,
                sbn: 0,
                round: 1,
                need: 20,
                receiver_id: 5,
                echo: None,
            }),
            key,
        )
    };
    let repair_before = h.relay.downstream_counters().repair_symbols_sent;
    for _ in 0..1_000 {
        h.relay.handle_downstream(h.now, addr(4), &nack(&wrong));
    }
    h.run(Duration::from_secs(1), |bytes| Some(bytes.to_vec()));
    assert_eq!(h.relay.downstream_counters().rejected, 1_000);
    assert_eq!(h.relay.downstream_counters().nacks_received, 0);
    assert_eq!(
        h.relay.downstream_counters().repair_symbols_sent,
        repair_before,
        "no repair for NACKs with a bad MAC"
    );
    // The same NACK with the right key is answered: the test above can fail.
    h.relay.handle_downstream(h.now, addr(4), &nack(&key));
    h.run(Duration::from_secs(1), |bytes| Some(bytes.to_vec()));
    assert!(h.relay.downstream_counters().repair_symbols_sent >= repair_before + 20);
}

#[test]
fn the_relay_forwards_the_next_messages_with_the_keys_it_got() {
    let mut h = harness(50);
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    for round in 0..3u64 {
        let leave = MemberId(10 + round);
        let join = MemberId(1_000 + round);
        let batch = h.gcks.tree.apply_batch(&[join], &[leave]).unwrap();
        h.queue(&batch);
        h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    }
    assert_eq!(h.relay.counters().forwarded, 4);
    assert_eq!(h.relay.next_seq(), 5);
    let (version, key) = h.gcks.tree.group_key();
    let relay_key = h.relay.keys().group_key().unwrap();
    assert_eq!(relay_key.version, version);
    assert_eq!(relay_key.key.as_bytes(), key.as_bytes());
    for seq in 1..=4 {
        assert_eq!(
            h.relay.message(seq).unwrap().parts(),
            h.gcks.sender.message(seq).unwrap().parts()
        );
    }
}

#[test]
fn a_resumed_relay_serves_its_stored_history_at_once() {
    let mut h = harness(100);
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    let stored = StoredMessage::from_prepared(h.relay.message(1).unwrap());
    let keys = h.relay.keys().clone();
    let leaf = h.relay.order_key();
    let config = RelayConfig::new(addr(1));
    let resumed = RelaySession::resume(
        keys.clone(),
        vec![stored.to_prepared().unwrap()],
        config.clone(),
        h.now,
    )
    .unwrap();
    assert_eq!(resumed.next_seq(), 2);
    assert_eq!(ResyncSource::latest(&resumed).map(|(seq, _)| seq), Some(1));
    assert!(matches!(resumed.chunk(1, leaf), Lookup::Found(_)));
    assert_eq!(
        resumed.manifest(1),
        Lookup::Found(h.gcks.sender.message(1).unwrap().parts().2)
    );
    // A relay never sends a member to re-register: what it lacks, the GCKS may hold.
    assert_eq!(resumed.manifest(0), Lookup::NotFound);
    // History newer than the keys is refused: message 2, which the relay never received.
    let batch = h.gcks.tree.apply_batch(&[MemberId(5_000)], &[]).unwrap();
    h.queue(&batch);
    let newer = StoredMessage::from_prepared(h.gcks.sender.message(2).unwrap());
    let error = RelaySession::resume(
        keys,
        vec![stored.to_prepared().unwrap(), newer.to_prepared().unwrap()],
        config,
        h.now,
    );
    assert!(matches!(
        error,
        Err(RelayError::HistoryAhead {
            seq: 2,
            keys_seq: 1
        })
    ));
}

#[test]
fn forged_repair_symbols_from_an_insider_poison_no_forwarded_message() {
    let mut h = harness(300);
    let (_, key, manifest, _) = h.gcks.sender.message(1).unwrap().parts();
    let key = crate::auth::mac::MacKey::from_bytes(key);
    let manifest = crate::session::manifest::SignedManifest::parse(manifest)
        .unwrap()
        .manifest;
    let info = rekeycast_fec::ObjectInfo::parse(&manifest.fec_info).unwrap();
    let k0 = info.partition().block_len(0).unwrap();
    let mut poisoned = 0;
    // Source symbols 0..3 of block 0 are lost, so the block must decode from repair; the
    // first repair symbols of block 0 carry an insider's garbage under a valid MAC.
    h.run_rewriting_symbols(Duration::from_secs(4), |seq, symbol| {
        if symbol.object == ObjectKind::Chunks && symbol.sbn == 0 {
            if symbol.esi < 4 {
                return Fate::Drop;
            }
            if symbol.esi >= k0 && poisoned < 4 {
                poisoned += 1;
                let garbage = vec![0xA5; symbol.data.len()];
                return Fate::Send(with_data(seq, symbol, &garbage, &key));
            }
        }
        Fate::Pass
    });
    assert!(poisoned > 0);
    assert!(
        h.relay.upstream_counters().decode_failures >= 1,
        "the poisoned decode failed authentication"
    );
    assert_eq!(
        h.relay.counters().forwarded,
        1,
        "genuine repair completed it"
    );
    assert_eq!(
        h.relay.message(1).unwrap().parts(),
        h.gcks.sender.message(1).unwrap().parts()
    );
}

#[test]
fn cut_through_forwards_verified_source_symbols_before_the_message_is_whole() {
    let mut h = harness(300);
    // Source symbols 0..3 of block 0 are lost upstream the first time: the relay cannot hold
    // the message whole before a repair round.
    let mut dropped = 0;
    let mut filter = |bytes: &[u8]| {
        let repr = DatagramRepr::parse(bytes).ok()?;
        if let BodyRepr::Symbol(symbol) = &repr.body {
            if symbol.object == ObjectKind::Chunks && symbol.sbn == 0 && symbol.esi < 4 {
                dropped += 1;
                return None;
            }
        }
        Some(bytes.to_vec())
    };
    // Long enough for the initial transmission, too short for a repair round.
    h.run(Duration::from_millis(3), &mut filter);
    assert_eq!(h.relay.counters().forwarded, 0, "not whole yet");
    let early = symbols(&h.downstream);
    assert!(
        h.relay.counters().cut_through_sent as usize >= early.len() && early.len() > 10,
        "verified source symbols went downstream at once ({} forwarded)",
        early.len()
    );
    assert!(
        early.contains_key(&(1, ObjectKind::Manifest as u8, 0, 0)),
        "the verified manifest went first"
    );
    for (id, data) in &early {
        assert_eq!(Some(data), h.gcks_symbols.get(id), "{id:?} is the GCKS's");
        assert!(
            !(id.1 == ObjectKind::Chunks as u8 && id.2 == 0 && id.3 < 4),
            "a symbol the relay never received was forwarded: {id:?}"
        );
    }
    h.run(Duration::from_secs(2), &mut filter);
    assert_eq!(dropped, 4);
    assert_eq!(
        h.relay.counters().forwarded,
        1,
        "whole after the repair round"
    );
    let all = symbols(&h.downstream);
    let source = h.relay.message(1).unwrap().parts().3.to_vec();
    for esi in 0..4u32 {
        let sent = all
            .get(&(1, ObjectKind::Chunks as u8, 0, esi))
            .unwrap_or_else(|| {
                panic!("source symbol {esi} of block 0, recovered by the relay, was not sent")
            });
        let t = sent.len();
        assert_eq!(
            &source[esi as usize * t..(esi as usize + 1) * t],
            &sent[..],
            "the recovered source symbol {esi} went out as the GCKS made it"
        );
    }
}

#[test]
fn relays_stack_a_relay_behind_a_relay_forwards_the_same_message() {
    let mut h = harness(200);
    // A second relay, registered like the first (member 2), whose upstream is the first
    // relay's downstream group.
    let bundle = h.gcks.tree.join(MemberId(2)).unwrap();
    let mut second = RelaySession::new(&bundle, RelayConfig::new(addr(2)), h.now).unwrap();
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    assert_eq!(h.relay.counters().forwarded, 1);
    let mut buf = vec![0u8; 65_536];
    for bytes in &h.downstream {
        second.handle_upstream(h.now, addr(2), bytes);
        while let Some(transmit) = second.poll_transmit(h.now, &mut buf) {
            if transmit.tier == Tier::Upstream {
                h.relay
                    .handle_downstream(h.now, addr(5), &buf[..transmit.len]);
            }
        }
    }
    assert_eq!(
        second.counters().forwarded,
        1,
        "the second relay holds it whole"
    );
    assert_eq!(
        second.message(1).unwrap().parts(),
        h.gcks.sender.message(1).unwrap().parts()
    );
    assert_eq!(second.upstream_counters().bad_chunks, 0);
}

#[test]
fn a_message_got_by_resync_only_leaves_a_gap_the_relay_reports_as_not_held() {
    let mut h = harness(60);
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    // Message 2 never reaches the relay by multicast; it takes its own chunk by resync.
    let batch = h
        .gcks
        .tree
        .apply_batch(&[MemberId(700)], &[MemberId(30)])
        .unwrap();
    h.queue(&batch);
    h.run(Duration::from_secs(2), |bytes| {
        let seq = DatagramRepr::parse(bytes).ok()?.seq;
        (seq != 2).then(|| bytes.to_vec())
    });
    let item = h.gcks.sender.resync_item(2, h.relay.order_key()).unwrap();
    let (manifest, chunk) = (item.manifest.to_vec(), item.chunk.to_vec());
    assert_eq!(h.relay.handle_resync(h.now, &manifest, &chunk), Ok(2));
    assert!(h.events().contains(&RelayEvent::NotForwarded { seq: 2 }));
    // The state answer is the newest verified manifest, though the relay does not hold 2.
    assert_eq!(ResyncSource::latest(&h.relay), Some((2, &manifest[..])));
    assert_eq!(h.relay.manifest(2), Lookup::NotFound);
    assert_eq!(h.relay.manifest(3), Lookup::NotYetSent { latest: 2 });
    assert_eq!(h.relay.oldest(), None);

    // Message 3 comes whole and is forwarded behind the gap.
    let batch = h
        .gcks
        .tree
        .apply_batch(&[MemberId(701)], &[MemberId(31)])
        .unwrap();
    h.queue(&batch);
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    assert!(h
        .events()
        .iter()
        .any(|e| matches!(e, RelayEvent::Forwarded { seq: 3, .. })));
    assert_eq!(ResyncSource::latest(&h.relay).map(|(seq, _)| seq), Some(3));
    assert!(matches!(h.relay.manifest(3), Lookup::Found(_)));
    assert!(matches!(h.relay.manifest(1), Lookup::Found(_)));
    assert_eq!(h.relay.manifest(2), Lookup::NotFound);
    assert_eq!(h.relay.chunk(2, 0), Lookup::NotFound);
    // Behind the gap, message 3's NACKs pass their MAC and are answered.
    let key = crate::auth::mac::MacKey::from_bytes(h.relay.message(3).unwrap().parts().1);
    let nack = Harness::sealed(
        3,
        BodyRepr::Nack(NackRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            round: 1,
            need: 3,
            receiver_id: 8,
            echo: None,
        }),
        &key,
    );
    let repair = h.relay.downstream_counters().repair_symbols_sent;
    h.relay.handle_downstream(h.now, addr(6), &nack);
    h.run(Duration::from_secs(1), |bytes| Some(bytes.to_vec()));
    assert_eq!(h.relay.downstream_counters().rejected, 0);
    assert!(h.relay.downstream_counters().repair_symbols_sent >= repair + 3);
}

/// Message 1's key, FEC info and source symbols as the GCKS holds them.
fn gcks_parts(h: &Harness) -> (crate::auth::mac::MacKey, rekeycast_fec::ObjectInfo, Vec<u8>) {
    let (_, key, manifest, symbols) = h.gcks.sender.message(1).unwrap().parts();
    let key = crate::auth::mac::MacKey::from_bytes(key);
    let manifest = crate::session::manifest::SignedManifest::parse(manifest)
        .unwrap()
        .manifest;
    let info = rekeycast_fec::ObjectInfo::parse(&manifest.fec_info).unwrap();
    (key, info, symbols.to_vec())
}

/// Asserts that everything the relay forwarded and stored is the GCKS's, byte for byte.
fn assert_only_the_gckss(h: &Harness) {
    for (id, data) in &symbols(&h.downstream) {
        if let Some(gcks) = h.gcks_symbols.get(id) {
            assert_eq!(data, gcks, "a forwarded symbol {id:?} is not the GCKS's");
        }
    }
    if let Some(message) = h.relay.message(1) {
        assert_eq!(
            message.parts(),
            h.gcks.sender.message(1).unwrap().parts(),
            "the stored message differs"
        );
    }
}

#[test]
fn an_authentic_chunk_replayed_at_another_esi_is_not_forwarded() {
    // Found in review: a chunk verifies on its own, so its position must be checked too.
    let mut h = harness(300);
    let (key, info, source) = gcks_parts(&h);
    let t = usize::from(info.symbol_size());
    let chunk1 = source[t..2 * t].to_vec();
    let mut replaced = 0;
    // An insider (it holds the group MAC key) races the GCKS: source symbol 0 of block 0
    // carries the genuine, signed chunk 1 instead.
    h.run_rewriting_symbols(Duration::from_secs(3), |seq, symbol| {
        if symbol.object == ObjectKind::Chunks && symbol.sbn == 0 && symbol.esi == 0 {
            replaced += 1;
            return Fate::Send(with_data(seq, symbol, &chunk1, &key));
        }
        Fate::Pass
    });
    assert!(replaced > 0);
    assert!(h.relay.upstream_counters().bad_chunks >= 1);
    assert_only_the_gckss(&h);
}

#[test]
fn forged_repair_reconstructing_a_misplaced_authentic_chunk_is_not_forwarded() {
    // Found in review: repair encoded from a block with a genuine chunk at the wrong place
    // decodes to chunks that all verify; only their positions give it away.
    let mut h = harness(300);
    let (key, info, source) = gcks_parts(&h);
    let t = usize::from(info.symbol_size());
    let mut forged = source.clone();
    forged.copy_within(3 * t..4 * t, 2 * t);
    let encoder = rekeycast_fec::ObjectEncoder::new(info, forged).unwrap();
    let k0 = info.partition().block_len(0).unwrap();
    let mut poisoned = 0;
    h.run_rewriting_symbols(Duration::from_secs(4), |seq, symbol| {
        if symbol.object == ObjectKind::Chunks && symbol.sbn == 0 {
            if symbol.esi == 2 {
                return Fate::Drop;
            }
            if symbol.esi >= k0 {
                poisoned += 1;
                let data = encoder
                    .repair_symbols(0, symbol.esi, 1)
                    .unwrap()
                    .next()
                    .unwrap();
                return Fate::Send(with_data(seq, symbol, &data, &key));
            }
        }
        Fate::Pass
    });
    assert!(poisoned > 0);
    assert!(h.relay.upstream_counters().decode_failures >= 1);
    assert_only_the_gckss(&h);
}

#[test]
fn a_manifest_verified_by_a_state_answer_does_not_let_other_bytes_through() {
    // Found in review: the verifier's manifest cache answered for any bytes of that seq.
    let mut h = harness(100);
    let (key, _, _) = gcks_parts(&h);
    let manifest = h.gcks.sender.message(1).unwrap().parts().2.to_vec();
    // A state check verifies and caches message 1's manifest.
    let _ = h.relay.handle_state_answer(h.now, &manifest).unwrap();
    // Then an insider's manifest datagrams for message 1: its signature broken.
    let mut tampered = manifest.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    h.run_rewriting_symbols(Duration::from_secs(2), |seq, symbol| {
        if symbol.object == ObjectKind::Manifest {
            return Fate::Send(with_data(seq, symbol, &tampered, &key));
        }
        Fate::Pass
    });
    let forwarded = symbols(&h.downstream);
    assert_ne!(
        forwarded.get(&(1, ObjectKind::Manifest as u8, 0, 0)),
        Some(&tampered),
        "a manifest with a bad signature was forwarded"
    );
    assert!(h
        .relay
        .message(1)
        .is_none_or(|m| m.parts().2 != &tampered[..]));
}

#[test]
fn a_behind_session_whose_resync_failed_is_prompted_again_after_a_silence() {
    // Found in review: OutOfSync was raised once per message; a failed (or dropped) resync
    // left the session behind for good.
    let mut h = harness(10);
    let manifest = h.gcks.sender.message(1).unwrap().parts().2.to_vec();
    let t0 = h.now;
    h.relay.start(t0);
    let verdict = h.relay.handle_state_answer(t0, &manifest).unwrap();
    assert!(matches!(verdict, StateVerdict::Behind { from_seq: 1 }));
    assert!(h
        .events()
        .iter()
        .any(|e| matches!(e, RelayEvent::Upstream(ReceiverEvent::OutOfSync { .. }))));
    // The resync fails; nothing arrives for a silence timeout: asked again, each time.
    let silence = ReceiverConfig::new(addr(1)).silence_timeout;
    for i in 1..=3u32 {
        h.relay
            .handle_timeout(t0 + (silence + Duration::from_secs(1)) * i);
        assert!(h.events().iter().any(|e| matches!(
            e,
            RelayEvent::Upstream(ReceiverEvent::OutOfSync { from_seq: 1 })
        )));
    }
}

#[test]
fn a_resumed_relay_heartbeats_in_a_quiet_group() {
    // Found in review: a restored history sent no heartbeat until the next message, so every
    // member behind a restarted relay fell silent and asked for state.
    let mut h = harness(20);
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    let stored = StoredMessage::from_prepared(h.relay.message(1).unwrap());
    let mut resumed = RelaySession::resume(
        h.relay.keys().clone(),
        vec![stored.to_prepared().unwrap()],
        RelayConfig::new(addr(1)),
        h.now,
    )
    .unwrap();
    resumed.start(h.now);
    let mut buf = vec![0u8; 65_536];
    let mut now = h.now;
    let end = h.now + Duration::from_secs(300);
    while let Some(at) = resumed.poll_timeout() {
        if at > end {
            break;
        }
        now = now.max(at);
        resumed.handle_timeout(now);
        while resumed.poll_transmit(now, &mut buf).is_some() {}
        while resumed.poll_event().is_some() {}
    }
    let heartbeats = resumed.downstream_counters().heartbeats_sent;
    // Intervals double up to heartbeat_max (30 s): at least 300 / 30 of them.
    assert!(heartbeats >= 10, "{heartbeats} heartbeats in 300 s");
}

/// Block 0 symbols beyond the source that the relay sent downstream, and its repair symbols,
/// when it lacked source symbols 0..3 of block 0 and (with `held_need`) a member behind it
/// NACKed block 0 for `held_need` symbols while the message was in progress.
fn repair_after_adoption(held_need: Option<u16>) -> (usize, u64) {
    let mut h = harness(300);
    let mut filter = |bytes: &[u8]| {
        let repr = DatagramRepr::parse(bytes).ok()?;
        if let BodyRepr::Symbol(symbol) = &repr.body {
            if symbol.object == ObjectKind::Chunks && symbol.sbn == 0 && symbol.esi < 4 {
                return None;
            }
        }
        Some(bytes.to_vec())
    };
    h.run(Duration::from_millis(3), &mut filter);
    assert_eq!(h.relay.counters().forwarded, 0);
    let (key, info, _) = gcks_parts(&h);
    let k0 = info.partition().block_len(0).unwrap();
    if let Some(need) = held_need {
        let nack = Harness::sealed(
            1,
            BodyRepr::Nack(NackRepr {
                object: ObjectKind::Chunks,
                sbn: 0,
                round: 1,
                need,
                receiver_id: 77,
                echo: None,
            }),
            &key,
        );
        h.relay.handle_downstream(h.now, addr(9), &nack);
        assert_eq!(h.relay.counters().early_nacks_held, 1);
    }
    h.run(Duration::from_secs(2), &mut filter);
    assert_eq!(h.relay.counters().forwarded, 1);
    let beyond_source = symbols(&h.downstream)
        .keys()
        .filter(|&&(seq, object, sbn, esi)| {
            seq == 1 && object == ObjectKind::Chunks as u8 && sbn == 0 && esi >= k0
        })
        .count();
    (
        beyond_source,
        h.relay.downstream_counters().repair_symbols_sent + h.relay.counters().early_repair_sent,
    )
}

#[test]
fn a_held_nack_asks_only_for_what_the_adoption_does_not_send() {
    // Found in review: a member that lacks the 4 source symbols the relay lacked too gets
    // them from the adoption; its held NACK must not add 4 repair symbols on top.
    let (beyond_without, repair_without) = repair_after_adoption(None);
    let (beyond_covered, repair_covered) = repair_after_adoption(Some(4));
    assert_eq!(
        (beyond_covered, repair_covered),
        (beyond_without, repair_without),
        "a NACK the adoption covers costs nothing"
    );
    // Asking for more than the adoption sends gets the rest as repair (the relay's own, from
    // block 0 once it decoded it, before the message was whole): at least the 3 missing, and
    // no more than the repair policy's margin on a lone NACK beyond them.
    let (_, repair_more) = repair_after_adoption(Some(7));
    assert!(
        (repair_without + 3..=repair_without + 3 + 2).contains(&repair_more),
        "{repair_more} repair symbols for 3 beyond the adoption ({repair_without} without)"
    );
}

/// A member behind the relay, fed the relay's downstream datagrams as they are sent, with the
/// probe timestamps it echoes back (in NACKs and probe replies).
struct Downstream {
    member: ReceiverSession,
    fed: usize,
    echoes: Vec<u64>,
}

impl Downstream {
    /// Runs the harness for `duration` in steps of 100 ms, handing the member what the relay
    /// sent in each step at its end.
    fn run(&mut self, h: &mut Harness, duration: Duration) {
        let mut buf = vec![0u8; 65_536];
        let step = Duration::from_millis(100);
        let end = h.now + duration;
        while h.now < end {
            h.run(step, |bytes| Some(bytes.to_vec()));
            for bytes in &h.downstream[self.fed..] {
                self.member.handle_datagram(h.now, addr(1), bytes);
            }
            self.fed = h.downstream.len();
            if self.member.poll_timeout().is_some_and(|at| at <= h.now) {
                self.member.handle_timeout(h.now);
            }
            while let Some(transmit) = self.member.poll_transmit(h.now, &mut buf) {
                let repr = DatagramRepr::parse(&buf[..transmit.len]).unwrap();
                match repr.body {
                    BodyRepr::ProbeReply(reply) => self.echoes.push(reply.echo.timestamp_us),
                    BodyRepr::Nack(nack) => self.echoes.extend(nack.echo.map(|e| e.timestamp_us)),
                    _ => {}
                }
            }
            while self.member.poll_event().is_some() {}
        }
    }
}

/// The probe timestamps of the heartbeats among `datagrams`.
fn probe_timestamps(datagrams: &[Vec<u8>]) -> Vec<u64> {
    datagrams
        .iter()
        .filter_map(|bytes| match DatagramRepr::parse(bytes).ok()?.body {
            BodyRepr::Heartbeat(heartbeat) => Some(heartbeat.probe_timestamp_us),
            _ => None,
        })
        .collect()
}

/// A relay restarted after an hour (a new downstream sender, its probe clock at zero again):
/// the members behind it take its heartbeats at once, rather than rejecting them as replays
/// until the new relay has been up longer than the old one.
#[test]
fn a_restarted_relay_is_heard_at_once_by_the_members_behind_it() {
    let mut h = harness(2);
    let bundle = h.gcks.tree.join(MemberId(2)).unwrap();
    let member = ReceiverSession::new(&bundle, ReceiverConfig::new(addr(1))).unwrap();
    let mut downstream = Downstream {
        member,
        fed: 0,
        echoes: Vec::new(),
    };
    downstream.run(&mut h, Duration::from_secs(3600));
    assert_eq!(
        downstream.member.next_seq(),
        2,
        "the member applied message 1"
    );
    let stored = StoredMessage::from_prepared(h.relay.message(1).unwrap());
    let mut restarted = RelaySession::resume(
        h.relay.keys().clone(),
        vec![stored.to_prepared().unwrap()],
        RelayConfig::new(addr(1)),
        h.now,
    )
    .unwrap();
    restarted.start(h.now);
    h.relay = restarted;
    h.downstream.clear();
    downstream.fed = 0;
    downstream.echoes.clear();
    downstream.run(&mut h, Duration::from_secs(120));
    let probes = probe_timestamps(&h.downstream);
    assert!(!probes.is_empty(), "the restarted relay heartbeats");
    assert!(
        downstream.echoes.iter().any(|ts| probes.contains(ts)),
        "the member never took a heartbeat of the restarted relay (echoed {:?}, sent {probes:?})",
        downstream.echoes
    );
}

/// A relay whose registration bundle has one hex digit of its leaf key flipped verifies the
/// whole first message (every chunk is the GCKS's) but cannot open its own chunk: it says so
/// within that message and must register again, instead of resyncing the same chunk over and
/// over; nothing it cannot key is forwarded, and later messages change nothing.
#[test]
fn a_relay_whose_keys_cannot_open_its_own_chunk_says_so_and_stops() {
    let mut h = harness_with(100, |bundle| {
        let mut key = *bundle.leaf_key.as_bytes();
        key[31] ^= 0x10;
        bundle.leaf_key = crate::lkh::Key::from_bytes(key);
    });
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    let events = h.events();
    assert!(
        h.relay.must_reregister(),
        "the relay did not stop: events {events:?}, counters {:?}",
        h.relay.upstream_counters()
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, RelayEvent::Upstream(ReceiverEvent::OutOfSync { .. }))),
        "{events:?}"
    );
    assert_eq!(h.relay.counters().forwarded, 0);
    assert!(
        events.iter().any(|e| matches!(
            e,
            RelayEvent::Upstream(ReceiverEvent::KeysCannotOpen { seq: 1, .. })
        )),
        "{events:?}"
    );
    assert!(
        matches!(
            h.relay.reregister_reason(),
            Some(crate::session::ReregisterReason::KeysCannotOpen { seq: 1, .. })
        ),
        "{:?}",
        h.relay.reregister_reason()
    );
    let batch = h
        .gcks
        .tree
        .apply_batch(&[MemberId(5_000)], &[MemberId(7)])
        .unwrap();
    h.queue(&batch);
    h.run(Duration::from_secs(30), |bytes| Some(bytes.to_vec()));
    assert_eq!(h.events(), Vec::new());
    assert_eq!(h.relay.counters().forwarded, 0);
}

#[test]
fn one_forged_decode_in_each_of_several_blocks_does_not_send_the_relay_to_resync() {
    // An insider forges the first repair symbol of each of the first three blocks once. A
    // member counts decode failures per message (it decodes one block); a relay decodes every
    // block, so it counts them per block: three blocks failing once each must not reach the
    // limit of three and push the relay, and its whole segment, to resync.
    let mut h = harness_in_blocks(300, 8);
    let (key, info, _) = gcks_parts(&h);
    let partition = info.partition();
    assert!(
        partition.block_count() >= 3,
        "the message has several blocks"
    );
    assert_eq!(RelayConfig::new(addr(1)).upstream.decode_failure_limit, 3);
    let mut poisoned = [false; 3];
    h.run_rewriting_symbols(Duration::from_secs(6), |seq, symbol| {
        let sbn = usize::from(symbol.sbn);
        if seq != 1 || symbol.object != ObjectKind::Chunks || sbn >= poisoned.len() {
            return Fate::Pass;
        }
        let k = partition.block_len(symbol.sbn).unwrap();
        if symbol.esi < 2 {
            // The block must decode from repair.
            return Fate::Drop;
        }
        if symbol.esi >= k && !poisoned[sbn] {
            poisoned[sbn] = true;
            let garbage = vec![0x5A; symbol.data.len()];
            return Fate::Send(with_data(seq, symbol, &garbage, &key));
        }
        Fate::Pass
    });
    assert_eq!(poisoned, [true; 3]);
    assert_eq!(
        h.relay.upstream_counters().decode_failures,
        3,
        "each poisoned block failed its decode once"
    );
    let events = h.events();
    assert!(
        !events
            .iter()
            .any(|event| matches!(event, RelayEvent::Upstream(ReceiverEvent::OutOfSync { .. }))),
        "the relay did not give up on the message: {events:?}"
    );
    assert_eq!(
        h.relay.counters().forwarded,
        1,
        "genuine repair completed it"
    );
    assert_only_the_gckss(&h);
}

#[test]
fn a_block_decoded_from_repair_is_forwarded_before_the_message_is_whole() {
    // Block 0 loses a source symbol and decodes from the proactive repair; block 1 loses one
    // and its proactive repair, and waits for a NACK round. Block 0's recovered symbols go downstream as soon as it
    // decodes (block-level cut-through), not when the whole message is held.
    let mut h = harness_in_blocks(300, 8);
    let (_, info, source) = gcks_parts(&h);
    let partition = info.partition();
    assert!(
        partition.block_count() >= 2,
        "the message has several blocks"
    );
    let k1 = partition.block_len(1).unwrap();
    let mut filter = |bytes: &[u8]| {
        let repr = DatagramRepr::parse(bytes).ok()?;
        if let BodyRepr::Symbol(symbol) = &repr.body {
            if symbol.object == ObjectKind::Chunks && symbol.sbn <= 1 && symbol.esi == 0 {
                return None;
            }
            // Block 1's proactive repair is lost too: it needs a repair round.
            if symbol.object == ObjectKind::Chunks && symbol.sbn == 1 && symbol.esi >= k1 {
                return None;
            }
        }
        Some(bytes.to_vec())
    };
    // Long enough for the initial transmission, too short for a repair round.
    h.run(Duration::from_millis(3), &mut filter);
    assert_eq!(h.relay.counters().forwarded, 0, "not whole yet");
    let early = symbols(&h.downstream);
    let t = usize::from(info.symbol_size());
    let sent = early
        .get(&(1, ObjectKind::Chunks as u8, 0, 0))
        .expect("block 0's recovered symbol was forwarded when block 0 decoded");
    assert_eq!(&source[..t], &sent[..]);
    assert!(
        !early.contains_key(&(1, ObjectKind::Chunks as u8, 1, 0)),
        "block 1 cannot have decoded"
    );
}

#[test]
fn cut_through_forwards_are_paced_by_the_downstream_token_bucket() {
    // The relay's downstream group gets at most a burst of 4 datagrams and then 1,000 a
    // second, forwards included: a relay whose upstream is faster than its downstream must
    // not burst its whole message into its segment.
    let mut h = harness_with_queue(
        300,
        |_| {},
        |config| {
            config.downstream.burst = 4;
            config.downstream.send_rate = 1_000.0;
        },
        true,
    );
    h.run(Duration::from_millis(10), |bytes| Some(bytes.to_vec()));
    let sent = h.relay.counters().downstream_sent;
    assert!(
        sent <= 4 + 10 + 1,
        "{sent} datagrams downstream in 10 ms at 1,000/s after a burst of 4"
    );
    assert!(h.relay.counters().cut_through_paced > 0);
    // Given time, everything goes.
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    assert_eq!(h.relay.counters().forwarded, 1);
    assert_only_the_gckss(&h);
}

#[test]
fn the_relay_counts_the_members_that_reach_it_and_not_forged_feedback() {
    let mut h = harness(100);
    h.run(Duration::from_secs(2), |bytes| Some(bytes.to_vec()));
    assert_eq!(h.relay.members(h.now), 0);
    let key = crate::auth::mac::MacKey::from_bytes(h.relay.message(1).unwrap().parts().1);
    let wrong = crate::auth::mac::MacKey::from_bytes([0x55; 32]);
    let nack = |key: &crate::auth::mac::MacKey| {
        Harness::sealed(
            1,
            BodyRepr::Nack(NackRepr {
                object: ObjectKind::Chunks,
                sbn: 0,
                round: 1,
                need: 1,
                receiver_id: 5,
                echo: None,
            }),
            key,
        )
    };
    // Forged feedback from many addresses counts nobody.
    for last in 10..60 {
        h.relay.handle_downstream(h.now, addr(last), &nack(&wrong));
    }
    assert_eq!(h.relay.members(h.now), 0);
    // Two members NACK (one twice), a third asks the resync endpoint: three members.
    h.relay.handle_downstream(h.now, addr(4), &nack(&key));
    h.relay.handle_downstream(h.now, addr(4), &nack(&key));
    h.relay.handle_downstream(h.now, addr(5), &nack(&key));
    h.relay.resync_request(h.now, addr(6).ip());
    assert_eq!(h.relay.members(h.now), 3);
    let counters = h.relay.member_counters();
    assert_eq!(counters.feedback_contacts, 3);
    assert_eq!(counters.resync_contacts, 1);
    // Ten minutes later without a word from them, they are no longer counted.
    let later = h.now + crate::relay::members::DEFAULT_MEMBER_WINDOW;
    assert_eq!(h.relay.members(later), 0);
}

/// Drops every symbol of block 1 on its way to the relay: the message is never whole.
fn without_block_1(bytes: &[u8]) -> Option<Vec<u8>> {
    let repr = DatagramRepr::parse(bytes).ok()?;
    if let BodyRepr::Symbol(symbol) = &repr.body {
        if symbol.object == ObjectKind::Chunks && symbol.sbn == 1 {
            return None;
        }
    }
    Some(bytes.to_vec())
}

/// A downstream member's NACK of message 1, block 0, for `need` symbols.
fn block_0_nack(h: &Harness, need: u16) -> Vec<u8> {
    let (key, _, _) = gcks_parts(h);
    Harness::sealed(
        1,
        BodyRepr::Nack(NackRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            round: 1,
            need,
            receiver_id: 77,
            echo: None,
        }),
        &key,
    )
}

/// The symbols of message 1, block 0, beyond its source symbols, that the relay sent
/// downstream: (ESI, data).
fn block_0_repair(h: &Harness, k0: u32) -> Vec<(u32, Vec<u8>)> {
    let mut repair: Vec<(u32, Vec<u8>)> = symbols(&h.downstream)
        .into_iter()
        .filter(|&((seq, object, sbn, esi), _)| {
            seq == 1 && object == ObjectKind::Chunks as u8 && sbn == 0 && esi >= k0
        })
        .map(|((_, _, _, esi), data)| (esi, data))
        .collect();
    repair.sort();
    repair
}

#[test]
fn a_nack_for_a_whole_block_is_answered_before_the_message_is_whole() {
    // Block 0 arrives whole, block 1 never does: a member's NACK for block 0 is answered at
    // once with repair symbols the relay encodes from block 0, which decode block 0.
    let mut h = harness_in_blocks(300, 8);
    let (_, info, source) = gcks_parts(&h);
    let k0 = info.partition().block_len(0).unwrap();
    h.run(Duration::from_millis(20), without_block_1);
    assert!(block_0_repair(&h, k0).is_empty(), "no repair asked yet");
    let nack = block_0_nack(&h, 3);
    h.relay.handle_downstream(h.now, addr(9), &nack);
    h.run(Duration::from_millis(20), without_block_1);
    assert_eq!(h.relay.counters().forwarded, 0, "the message is not whole");
    let repair = block_0_repair(&h, k0);
    assert_eq!(
        repair.len(),
        3,
        "the NACK for the whole block 0 was answered before the message was whole"
    );
    assert!(repair
        .iter()
        .all(|&(esi, _)| esi >= early_repair::FIRST_ESI));
    assert_eq!(h.relay.counters().early_repair_sent, 3);
    assert_eq!(h.relay.counters().early_nacks_answered, 1);
    assert_eq!(h.relay.counters().early_nacks_held, 0);
    // They are block 0's RaptorQ repair symbols: with 3 source symbols lost, they decode it.
    let t = info.symbol_size();
    let mut decoder =
        rekeycast_fec::BlockDecoder::new(0, k0, t, &rekeycast_fec::Limits::default()).unwrap();
    let mut decoded = false;
    for esi in 3..k0 {
        let at = esi as usize * usize::from(t);
        let _ = decoder.push(esi, &source[at..at + usize::from(t)]).unwrap();
    }
    for (esi, data) in &repair {
        decoded |= decoder.push(*esi, data).unwrap() == rekeycast_fec::Progress::Decoded;
    }
    assert!(decoded);
    assert_eq!(
        decoder.block().unwrap(),
        &source[..k0 as usize * usize::from(t)]
    );
    // After the adoption, the downstream side's own repair never reuses those ESIs.
    h.run(Duration::from_secs(5), |bytes| Some(bytes.to_vec()));
    assert_eq!(h.relay.counters().forwarded, 1);
    let nack = block_0_nack(&h, 5);
    h.relay.handle_downstream(h.now, addr(9), &nack);
    h.run(Duration::from_secs(5), |bytes| Some(bytes.to_vec()));
    let after = block_0_repair(&h, k0);
    assert!(after.len() >= 3 + 5, "{} symbols", after.len());
    let mut esis: Vec<u32> = after.iter().map(|&(esi, _)| esi).collect();
    esis.dedup();
    assert_eq!(esis.len(), after.len(), "an ESI was sent twice");
}

#[test]
fn a_nack_held_until_its_block_is_whole_is_answered_then_less_what_came_since() {
    // Block 0 lacks source symbols 0 and 1 at the relay until a repair round; a NACK for 5
    // that came before is answered once block 0 decodes, less the 2 recovered forwards.
    let mut h = harness_in_blocks(300, 8);
    let (_, info, _) = gcks_parts(&h);
    let k0 = info.partition().block_len(0).unwrap();
    let mut lost = |bytes: &[u8]| {
        let repr = DatagramRepr::parse(bytes).ok()?;
        if let BodyRepr::Symbol(symbol) = &repr.body {
            if symbol.object == ObjectKind::Chunks && symbol.sbn <= 1 {
                return None;
            }
        }
        Some(bytes.to_vec())
    };
    h.run(Duration::from_millis(3), &mut lost);
    let nack = block_0_nack(&h, 5);
    h.relay.handle_downstream(h.now, addr(9), &nack);
    assert_eq!(h.relay.counters().early_nacks_held, 1);
    h.run(Duration::from_secs(5), without_block_1);
    assert_eq!(h.relay.counters().forwarded, 0, "the message is not whole");
    // All k0 source symbols of block 0 were forwarded after the NACK came: nothing is left
    // to ask for beyond them when k0 >= 5.
    assert!(k0 >= 5);
    assert_eq!(h.relay.counters().early_repair_sent, 0);
    let nack = block_0_nack(&h, 2);
    h.relay.handle_downstream(h.now, addr(9), &nack);
    h.run(Duration::from_millis(20), without_block_1);
    assert_eq!(h.relay.counters().early_repair_sent, 2);
}

#[test]
fn a_member_behind_the_relay_decodes_its_block_from_the_relays_early_repair() {
    // The member hears none of block 0's source symbols from the relay; the relay never holds
    // the message whole (block 1 is lost upstream). The member applies the message from the
    // relay's own repair symbols of block 0 (ESIs far above the source), sent for its NACK.
    let mut h = harness_in_blocks(300, 8);
    let (_, info, _) = gcks_parts(&h);
    let k0 = info.partition().block_len(0).unwrap();
    let manifest = {
        let (_, _, manifest, _) = h.gcks.sender.message(1).unwrap().parts();
        crate::session::manifest::SignedManifest::parse(manifest)
            .unwrap()
            .manifest
    };
    let mut member = (2..300)
        .map(|id| {
            let bundle = h.gcks.tree.join(MemberId(id)).unwrap();
            ReceiverSession::new(&bundle, ReceiverConfig::new(addr(1))).unwrap()
        })
        .find(|member| manifest.block_of(member.order_key()) == Some(0))
        .expect("a member in block 0");
    let mut buf = vec![0u8; 65_536];
    let mut fed = 0;
    let end = h.now + Duration::from_secs(30);
    while h.now < end && member.next_seq() == 1 {
        h.run(Duration::from_millis(10), without_block_1);
        for bytes in &h.downstream[fed..] {
            let source_of_block_0 = DatagramRepr::parse(bytes).is_ok_and(|repr| {
                matches!(repr.body, BodyRepr::Symbol(symbol)
                    if symbol.object == ObjectKind::Chunks && symbol.sbn == 0 && symbol.esi < k0)
            });
            if !source_of_block_0 {
                member.handle_datagram(h.now, addr(1), bytes);
            }
        }
        fed = h.downstream.len();
        if member.poll_timeout().is_some_and(|at| at <= h.now) {
            member.handle_timeout(h.now);
        }
        while let Some(transmit) = member.poll_transmit(h.now, &mut buf) {
            h.relay
                .handle_downstream(h.now, addr(9), &buf[..transmit.len]);
        }
        while member.poll_event().is_some() {}
    }
    assert_eq!(member.next_seq(), 2, "the member applied message 1");
    assert_eq!(
        h.relay.counters().forwarded,
        0,
        "the relay never held it whole"
    );
    assert!(h.relay.counters().early_repair_sent >= u64::from(k0));
}

#[test]
fn early_repair_is_paced_by_the_downstream_token_bucket() {
    let mut h = harness_in_blocks_with(300, 8, |config| {
        config.downstream.burst = 4;
        config.downstream.send_rate = 1_000.0;
    });
    h.run(Duration::from_secs(1), without_block_1);
    let before = h.relay.counters().downstream_sent;
    let nack = block_0_nack(&h, 40);
    h.relay.handle_downstream(h.now, addr(9), &nack);
    h.run(Duration::from_millis(10), without_block_1);
    let sent = h.relay.counters().early_repair_sent;
    assert!(
        sent <= 4 + 10 + 1,
        "{sent} early repair symbols in 10 ms at 1,000/s after a burst of 4"
    );
    assert!(h.relay.counters().downstream_sent - before <= 4 + 10 + 1);
    h.run(Duration::from_secs(1), without_block_1);
    assert_eq!(h.relay.counters().early_repair_sent, 40);
    assert_eq!(h.relay.counters().forwarded, 0);
}
