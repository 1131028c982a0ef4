//! A member under a flood of forged traffic: random bytes, real datagrams with bits flipped,
//! datagrams of the right group sealed with a wrong key, and replays, fed between real rekey
//! messages. The verifier pipeline must drop all of it before any signature check, and every
//! real message must still be applied.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::auth::datagram::DatagramVerifier;
use rekeycast::auth::mac::MacKey;
use rekeycast::auth::message::MessageVerifier;
use rekeycast::lkh::{Degree, KeyTree, MemberId, MemberKeys, RekeyBatch};
use rekeycast::session::chunk::SignedChunk;
use rekeycast::session::layout::{build_message, MessageParams};
use rekeycast::session::manifest::ChunkAuth;
use rekeycast::wire::{BodyRepr, ObjectKind};
use rekeycast_testkit::forge::{self, Sa};
use rekeycast_testkit::keys::KeyServer;

const GROUP: u32 = 0x00C0_FFEE;
const SPI: u32 = 3;
const SA: Sa = Sa {
    group_id: GROUP,
    spi: SPI,
};
const SYMBOL_SIZE: u16 = 1200;

/// The member side of the verifier pipeline, composed from the public pieces: datagram MAC and
/// window, then the manifest's signature, then the member's own chunk, then its keys.
struct Member {
    datagrams: DatagramVerifier,
    messages: MessageVerifier,
    keys: MemberKeys,
    order_key: u32,
    degree: Degree,
    applied: Vec<u64>,
}

impl Member {
    fn handle(&mut self, bytes: &[u8]) {
        let Ok(datagram) = self.datagrams.check(bytes) else {
            return;
        };
        let seq = datagram.seq();
        let BodyRepr::Symbol(symbol) = datagram.body() else {
            return;
        };
        match symbol.object {
            ObjectKind::Manifest => {
                let _ = self.messages.verify_manifest(seq, symbol.data);
            }
            ObjectKind::Chunks => {
                let Some(manifest) = self.messages.manifest(seq).cloned() else {
                    return;
                };
                // Other members' chunks are not verified: only the header is read to find ours.
                let Ok(unverified) = SignedChunk::parse(symbol.data, manifest.chunk_auth) else {
                    return;
                };
                if !unverified.header.serves(self.order_key) || self.applied.contains(&seq) {
                    return;
                }
                let Ok(chunk) = self.messages.verify_chunk(&manifest, symbol.data) else {
                    return;
                };
                let order_key = self.degree.order_key(self.keys.leaf());
                if let Ok(rekeyed) = self.keys.apply(&chunk) {
                    self.order_key = order_key;
                    self.datagrams.add_key(seq + 1, rekeyed.next_mac_key);
                    self.applied.push(seq);
                }
            }
        }
    }
}

/// The datagrams of one message: its manifest symbol, then every chunk's source symbol, each
/// sealed with the message's MAC key.
fn datagrams(tree: &KeyTree, batch: &RekeyBatch, gcks: &SigningKey) -> Vec<Vec<u8>> {
    let params = MessageParams {
        spi: SPI,
        symbol_size: SYMBOL_SIZE,
        chunk_auth: ChunkAuth::MerklePath,
        max_block_symbols: 32,
        ..MessageParams::default()
    };
    let message = build_message(batch, &tree.leaves_in_order(), gcks, &params).unwrap();
    let partition = message.fec_info.partition();
    let seq = batch.context.seq;
    let mut out = vec![seal(
        seq,
        ObjectKind::Manifest,
        0,
        0,
        &message.manifest,
        &batch.mac_key,
    )];
    for (index, chunk) in message.chunks.iter().enumerate() {
        let id = partition.locate(index as u32).unwrap();
        out.push(seal(
            seq,
            ObjectKind::Chunks,
            id.sbn,
            id.esi,
            chunk,
            &batch.mac_key,
        ));
    }
    out
}

fn seal(seq: u64, object: ObjectKind, sbn: u8, esi: u32, data: &[u8], key: &MacKey) -> Vec<u8> {
    SA.seal_symbol(seq, object, sbn, esi, data, key)
}

/// One forged datagram, of one of four kinds.
fn forge(rng: &mut ChaCha8Rng, real: &[Vec<u8>], newest_seq: u64) -> Vec<u8> {
    match rng.gen_range(0..4) {
        // Random bytes of a random length.
        0 => forge::random_bytes(rng, 1500),
        // A real datagram with one to eight bits flipped.
        1 => {
            let real = &real[rng.gen_range(0..real.len())];
            forge::flip_bits(rng, real)
        }
        // The right group, SA and a current or next sequence number, a plausible manifest or
        // chunk symbol, sealed with a key the attacker made up.
        2 => {
            let key = MacKey::from_bytes(rng.gen());
            let seq = newest_seq + rng.gen_range(0..=1);
            let object = if rng.gen() {
                ObjectKind::Manifest
            } else {
                ObjectKind::Chunks
            };
            let data: Vec<u8> = (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect();
            seal(seq, object, 0, rng.gen_range(0..64), &data, &key)
        }
        // A replay of a real datagram, byte for byte.
        _ => real[rng.gen_range(0..real.len())].clone(),
    }
}

#[test]
fn forged_flood_costs_no_signature_checks() {
    let KeyServer { mut tree, gcks } = KeyServer::new(SA, 77, 1, 0..300);
    let me = MemberId(1_000_000);
    let batch = tree.apply_batch(&[me], &[]).unwrap();
    let bundle = tree.join(me).unwrap();
    let keys = MemberKeys::from_bundle(&bundle);
    let mut datagrams_verifier = DatagramVerifier::new(GROUP, SPI);
    datagrams_verifier.add_key(bundle.first_seq, bundle.mac_key.clone());
    let mut member = Member {
        datagrams: datagrams_verifier,
        messages: MessageVerifier::new(gcks.verifying_key(), GROUP, SPI, 0),
        order_key: tree.degree().order_key(keys.leaf()),
        degree: tree.degree(),
        keys,
        applied: Vec::new(),
    };

    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let mut real = datagrams(&tree, &batch, &gcks);
    let mut all_real = real.clone();
    let rounds = 10;
    let per_round = 100_000;
    for round in 0..rounds {
        for datagram in &real {
            member.handle(datagram);
        }
        let checks_before = member.messages.counters().signature_checks;
        let newest = tree.seq();
        for _ in 0..per_round {
            let forged = forge(&mut rng, &all_real, newest);
            member.handle(&forged);
        }
        assert_eq!(
            member.messages.counters().signature_checks,
            checks_before,
            "round {round}: the flood caused signature checks"
        );
        // The next real message: some churn among the others.
        let leaving = [MemberId(round as u64 * 7)];
        let joining = [MemberId(2_000_000 + round as u64)];
        let batch = tree.apply_batch(&joining, &leaving).unwrap();
        real = datagrams(&tree, &batch, &gcks);
        all_real.extend(real.iter().cloned());
    }
    for datagram in &real {
        member.handle(datagram);
    }

    // Every real message applied, in order, and the member holds the current key.
    let first = bundle.first_seq;
    let expected: Vec<u64> = (first..=tree.seq()).collect();
    assert_eq!(member.applied, expected);
    assert_eq!(
        member.keys.group_key().map(|k| k.key.as_bytes().to_vec()),
        Some(tree.group_key().1.as_bytes().to_vec())
    );
    // One signature check per real message, none for the 1,000,000 forged datagrams.
    let counters = *member.messages.counters();
    assert_eq!(counters.signature_checks, expected.len() as u64);
    assert_eq!(counters.signature_failures, 0);
    let rejected = member.datagrams.counters().rejected();
    assert!(
        rejected > (rounds * per_round / 2) as u64,
        "most forgeries die at the MAC: {rejected}"
    );
}

#[test]
fn every_single_bit_flip_of_every_datagram_is_rejected_before_the_signature_step() {
    let KeyServer { mut tree, gcks } = KeyServer::new(SA, 78, 9, 0..40);
    let me = MemberId(500);
    let batch = tree.apply_batch(&[me], &[]).unwrap();
    let bundle = tree.join(me).unwrap();
    let keys = MemberKeys::from_bundle(&bundle);
    let mut datagram_verifier = DatagramVerifier::new(GROUP, SPI);
    datagram_verifier.add_key(bundle.first_seq, bundle.mac_key.clone());
    let mut member = Member {
        datagrams: datagram_verifier,
        messages: MessageVerifier::new(gcks.verifying_key(), GROUP, SPI, 0),
        order_key: tree.degree().order_key(keys.leaf()),
        degree: tree.degree(),
        keys,
        applied: Vec::new(),
    };
    // Every datagram type of the message's sequence number: the manifest symbol, every chunk
    // symbol, a heartbeat, a NACK and a probe reply, each sealed with the message's MAC key.
    let mut real = datagrams(&tree, &batch, &gcks);
    let seq = batch.context.seq;
    let others = [
        BodyRepr::Heartbeat(rekeycast::wire::HeartbeatRepr {
            advertisement: true,
            probe_reply_requested: false,
            instance: 7,
            probe_timestamp_us: 1_000,
            grtt_us: 50_000,
            group_size: 41,
            oldest_seq: 1,
            backoff_factor: 8,
            entries: vec![rekeycast::wire::RepairEntry {
                seq,
                object: ObjectKind::Chunks,
                sbn: 0,
                round: 1,
                count: 2,
            }],
        }),
        BodyRepr::Nack(rekeycast::wire::NackRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            round: 1,
            need: 2,
            receiver_id: 7,
            echo: None,
        }),
        BodyRepr::ProbeReply(rekeycast::wire::ProbeReplyRepr {
            receiver_id: 7,
            echo: rekeycast::wire::nack::ProbeEcho {
                timestamp_us: 1_000,
                hold_us: 10,
            },
        }),
    ];
    for body in others {
        real.push(SA.seal(seq, body, &batch.mac_key));
    }

    let mut flips = 0u64;
    for datagram in &real {
        for bit in 0..datagram.len() * 8 {
            let mut flipped = datagram.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            member.handle(&flipped);
            flips += 1;
        }
    }
    let datagram_counters = *member.datagrams.counters();
    assert_eq!(datagram_counters.accepted, 0, "a flipped datagram passed");
    assert_eq!(datagram_counters.rejected(), flips);
    assert_eq!(member.messages.counters().signature_checks, 0);
    assert!(member.applied.is_empty());

    // The real datagrams still work afterwards: nothing the flips did changed the state.
    for datagram in &real {
        member.handle(datagram);
    }
    assert_eq!(member.applied, vec![seq]);
    assert_eq!(member.messages.counters().signature_checks, 1);
}
