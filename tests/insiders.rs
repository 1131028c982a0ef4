//! Insiders and outsiders against a member's [`ReceiverSession`] (DESIGN.md, security rules):
//! a group MAC cannot stop a current member from forging symbols, so a decoded block that
//! fails authentication drops its repair symbols and asks again, and after a few failures the
//! member resyncs over unicast; failed signature checks per sequence number are capped; and
//! nothing an outsider sends (no valid MAC) ever reaches a signature check.
//!
//! Every test runs a real [`SenderSession`] and one member's [`ReceiverSession`] over a tiny
//! hand-written, lossless, zero-delay loop ([`Net`]) with a simulated clock, deterministic
//! seeds, and the insider's datagrams injected between them. Properties are read from the
//! sessions' own counters and events.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::auth::mac::MacKey;
use rekeycast::lkh::{Degree, KeyTree, MemberId, RegistrationBundle};
use rekeycast::session::chunk::SignedChunk;
use rekeycast::session::layout::{build_message, BuiltMessage, MessageParams};
use rekeycast::session::manifest::{ChunkAuth, SignedManifest};
use rekeycast::session::sender::{PreparedMessage, SenderEvent};
use rekeycast::session::{
    ReceiverConfig, ReceiverEvent, ReceiverSession, SenderConfig, SenderSession,
};
use rekeycast::wire::{BodyRepr, DatagramRepr, HeartbeatRepr, NackRepr, ObjectKind};
use rekeycast_testkit::forge::{self, Sa};
use rekeycast_testkit::keys::KeyServer;

const GROUP: u32 = 0x1A51_DE25;
const SPI: u32 = 5;
const SA: Sa = Sa {
    group_id: GROUP,
    spi: SPI,
};
const SYMBOL_SIZE: u16 = 1200;
/// The drivers' buffer: every datagram of the sessions fits it.
const DATAGRAM: usize = 1500;
/// Signature checks per message with per-chunk signatures: the manifest and the own chunk.
const CHECKS_PER_MESSAGE: u64 = 2;

fn sender_addr() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 1], 4500))
}

fn member_addr() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 2], 4500))
}

fn insider_addr() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 3], 4500))
}

/// The GCKS's key tree and signing key.
struct Group {
    tree: KeyTree,
    gcks: SigningKey,
    chunk_auth: ChunkAuth,
    others: u64,
    next_id: u64,
}

/// One built rekey message with the MAC key its datagrams are sealed with.
struct Message {
    seq: u64,
    built: BuiltMessage,
    mac_key: MacKey,
}

impl Group {
    /// A group of `others` members (admitted by a first message nobody here receives).
    fn new(seed: u64, others: u64, chunk_auth: ChunkAuth) -> Self {
        let KeyServer { tree, gcks } = KeyServer::new(SA, seed as u8, seed, 0..others);
        Self {
            tree,
            gcks,
            chunk_auth,
            others,
            next_id: 1_000_000,
        }
    }

    /// Applies a batch and builds its message.
    fn rekey(&mut self, joins: &[MemberId], leaves: &[MemberId]) -> Message {
        let batch = self.tree.apply_batch(joins, leaves).unwrap();
        let params = MessageParams {
            spi: SPI,
            symbol_size: SYMBOL_SIZE,
            chunk_auth: self.chunk_auth,
            // Several blocks of a few symbols: the member's block has neighbours to decode with.
            max_block_symbols: 8,
            signing_threads: 1,
            ..MessageParams::default()
        };
        let built =
            build_message(&batch, &self.tree.leaves_in_order(), &self.gcks, &params).unwrap();
        Message {
            seq: batch.context.seq,
            built,
            mac_key: batch.mac_key.clone(),
        }
    }

    /// Admits a new member while a tenth of the others leave (a message of many chunks and
    /// several FEC blocks): its message and its registration bundle.
    fn admit(&mut self) -> (Message, RegistrationBundle) {
        let me = MemberId(self.next_id);
        self.next_id += 1;
        let leaving: Vec<MemberId> = (0..self.others).step_by(10).map(MemberId).collect();
        let message = self.rekey(&[me], &leaving);
        let bundle = self.tree.join(me).unwrap();
        assert_eq!(bundle.first_seq, message.seq);
        (message, bundle)
    }

    /// Some churn among the others: a tenth of them leave, as many join.
    fn churn(&mut self, round: u64) -> Message {
        let joining: Vec<MemberId> = (0..self.others / 10)
            .map(|i| MemberId(2_000_000 + round * self.others + i))
            .collect();
        let leaving: Vec<MemberId> = (0..self.others)
            .skip(1 + round as usize)
            .step_by(10)
            .map(MemberId)
            .collect();
        self.rekey(&joining, &leaving)
    }
}

/// Where the member's chunk sits in a message: its block, its ESI, the block's length.
#[derive(Debug, Clone, Copy)]
struct Own {
    sbn: u8,
    esi: u32,
    block_len: u32,
}

impl Own {
    fn of(built: &BuiltMessage, order_key: u32) -> Self {
        let manifest = SignedManifest::parse(&built.manifest).unwrap().manifest;
        let sbn = manifest.block_of(order_key).unwrap();
        let index = built
            .chunks
            .iter()
            .position(|chunk| {
                SignedChunk::parse(chunk, manifest.chunk_auth)
                    .unwrap()
                    .header
                    .serves(order_key)
            })
            .unwrap();
        let partition = built.fec_info.partition();
        let id = partition.locate(index as u32).unwrap();
        assert_eq!(
            id.sbn, sbn,
            "the manifest names the block of the member's chunk"
        );
        let own = Self {
            sbn,
            esi: id.esi,
            block_len: partition.block_len(sbn).unwrap(),
        };
        assert!(
            own.block_len >= 2,
            "the member's block needs neighbours: {own:?}"
        );
        own
    }

    /// Whether `repr` is a chunk symbol of the member's block: its own source symbol or a
    /// repair symbol.
    fn lost(&self, seq: u64, repr: &DatagramRepr<'_>) -> bool {
        match &repr.body {
            BodyRepr::Symbol(symbol) => {
                repr.seq == seq
                    && symbol.object == ObjectKind::Chunks
                    && symbol.sbn == self.sbn
                    && (symbol.esi == self.esi || symbol.esi >= self.block_len)
            }
            _ => false,
        }
    }
}

/// Emits `body` for `seq` and seals it with `key`.
fn seal(seq: u64, body: BodyRepr<'_>, key: &MacKey) -> Vec<u8> {
    SA.seal(seq, body, key)
}

fn symbol(seq: u64, object: ObjectKind, sbn: u8, esi: u32, data: &[u8], key: &MacKey) -> Vec<u8> {
    SA.seal_symbol(seq, object, sbn, esi, data, key)
}

/// An insider's forged repair symbol for the member's block: random bytes of the right length
/// under the real MAC key.
fn forged_repair(rng: &mut ChaCha8Rng, message: &Message, own: Own, esi: u32) -> Vec<u8> {
    let data: Vec<u8> = (0..SYMBOL_SIZE).map(|_| rng.gen()).collect();
    symbol(
        message.seq,
        ObjectKind::Chunks,
        own.sbn,
        esi,
        &data,
        &message.mac_key,
    )
}

/// An outsider's datagram: no valid MAC for anything the member holds.
fn outsider(rng: &mut ChaCha8Rng, real: &[Vec<u8>], message: &Message) -> Vec<u8> {
    match rng.gen_range(0..5) {
        // Random bytes of a random length.
        0 => forge::random_bytes(rng, DATAGRAM),
        // A real datagram with one to eight bits flipped.
        1 => {
            let real = &real[rng.gen_range(0..real.len())];
            forge::flip_bits(rng, real)
        }
        // The real signed manifest, or the member's real chunk, under a made-up key: a
        // signature check would pass if the MAC did not stop it first.
        2 => {
            let key = MacKey::from_bytes(rng.gen());
            if rng.gen() {
                symbol(
                    message.seq,
                    ObjectKind::Manifest,
                    0,
                    0,
                    &message.built.manifest,
                    &key,
                )
            } else {
                let index = rng.gen_range(0..message.built.chunks.len());
                let id = message
                    .built
                    .fec_info
                    .partition()
                    .locate(index as u32)
                    .unwrap();
                symbol(
                    message.seq,
                    ObjectKind::Chunks,
                    id.sbn,
                    id.esi,
                    &message.built.chunks[index],
                    &key,
                )
            }
        }
        // A heartbeat or NACK of the current or next message under a made-up key.
        3 => {
            let key = MacKey::from_bytes(rng.gen());
            let seq = message.seq + rng.gen_range(0..=1);
            let body = if rng.gen() {
                BodyRepr::Heartbeat(HeartbeatRepr {
                    advertisement: rng.gen(),
                    probe_reply_requested: rng.gen(),
                    instance: 7,
                    probe_timestamp_us: rng.gen(),
                    grtt_us: rng.gen_range(1..1_000_000),
                    group_size: rng.gen_range(1..100_000),
                    oldest_seq: 1,
                    backoff_factor: rng.gen_range(1..8),
                    entries: Vec::new(),
                })
            } else {
                BodyRepr::Nack(NackRepr {
                    object: ObjectKind::Chunks,
                    sbn: 0,
                    round: 1,
                    need: rng.gen_range(1..10),
                    receiver_id: rng.gen(),
                    echo: None,
                })
            };
            seal(seq, body, &key)
        }
        // A plausible symbol of random bytes under a made-up key.
        _ => {
            let key = MacKey::from_bytes(rng.gen());
            let data: Vec<u8> = (0..SYMBOL_SIZE).map(|_| rng.gen()).collect();
            let object = if rng.gen() {
                ObjectKind::Manifest
            } else {
                ObjectKind::Chunks
            };
            symbol(message.seq, object, 0, rng.gen_range(0..64), &data, &key)
        }
    }
}

/// What happens to a datagram of the sender on its way to the member.
type Path<'a> = &'a mut dyn FnMut(&DatagramRepr<'_>) -> bool;

/// Outsider noise fed to the member after every datagram of the sender.
struct Noise {
    rng: ChaCha8Rng,
    per_datagram: usize,
    /// Real datagrams seen so far (what bit flips start from).
    real: Vec<Vec<u8>>,
    fed: u64,
}

/// The GCKS and one member, joined by a lossless zero-delay network the test controls.
struct Net {
    now: Instant,
    sender: SenderSession,
    member: ReceiverSession,
    sender_events: Vec<SenderEvent>,
    member_events: Vec<ReceiverEvent>,
    noise: Option<(Noise, Message)>,
}

impl Net {
    fn new(bundle: &RegistrationBundle, group_size: usize, seed: u64) -> Self {
        let now = Instant::now();
        let sender = SenderSession::new(SenderConfig::default(), GROUP, SPI, now).unwrap();
        let mut config = ReceiverConfig::new(sender_addr());
        config.scheduler.group_size = u32::try_from(group_size).unwrap();
        config.scheduler.seed = seed;
        let member = ReceiverSession::new(bundle, config).unwrap();
        Self {
            now,
            sender,
            member,
            sender_events: Vec::new(),
            member_events: Vec::new(),
            noise: None,
        }
    }

    fn queue(&mut self, message: &Message) {
        let prepared = PreparedMessage::new(message.built.clone(), message.mac_key.clone());
        self.sender
            .queue_message(self.now, prepared.unwrap())
            .unwrap();
    }

    /// Hands an insider's datagram to the member and collects what follows.
    fn inject(&mut self, bytes: &[u8]) {
        self.member.handle_datagram(self.now, insider_addr(), bytes);
        self.pump(&mut |_| true);
    }

    /// Drains both sessions' outputs at the current time: the sender's datagrams go to the
    /// member if `path` lets them, the member's (NACKs, probe replies) to the sender.
    fn pump(&mut self, path: Path<'_>) {
        let mut buf = vec![0u8; DATAGRAM];
        loop {
            let mut progressed = false;
            while let Some(transmit) = self.sender.poll_transmit(self.now, &mut buf) {
                progressed = true;
                let bytes = &buf[..transmit.len];
                let repr = DatagramRepr::parse(bytes).unwrap();
                if path(&repr) {
                    self.member.handle_datagram(self.now, sender_addr(), bytes);
                }
                if let Some((noise, message)) = self.noise.as_mut() {
                    noise.real.push(bytes.to_vec());
                    for _ in 0..noise.per_datagram {
                        let forged = outsider(&mut noise.rng, &noise.real, message);
                        self.member
                            .handle_datagram(self.now, insider_addr(), &forged);
                        noise.fed += 1;
                    }
                }
            }
            self.sender_events
                .extend(std::iter::from_fn(|| self.sender.poll_event()));
            while let Some(transmit) = self.member.poll_transmit(self.now, &mut buf) {
                progressed = true;
                self.sender
                    .handle_datagram(self.now, member_addr(), &buf[..transmit.len]);
            }
            self.member_events
                .extend(std::iter::from_fn(|| self.member.poll_event()));
            if !progressed {
                break;
            }
        }
    }

    /// Runs until `stop` holds (true) or `limit` of simulated time passes (false).
    fn run(&mut self, limit: Duration, path: Path<'_>, stop: impl Fn(&Self) -> bool) -> bool {
        let end = self.now + limit;
        for _ in 0..1_000_000 {
            self.pump(path);
            if stop(self) {
                return true;
            }
            let next = [self.sender.poll_timeout(), self.member.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(next) if next <= end => self.now = self.now.max(next),
                _ => {
                    self.now = end;
                    return false;
                }
            }
            if self.sender.poll_timeout().is_some_and(|at| at <= self.now) {
                self.sender.handle_timeout(self.now);
            }
            if self.member.poll_timeout().is_some_and(|at| at <= self.now) {
                self.member.handle_timeout(self.now);
            }
        }
        panic!("the sessions spun without time passing");
    }

    /// Runs the initial transmission of `seq` to its end through `path`.
    fn initial_transmission(&mut self, seq: u64, path: Path<'_>) {
        let done = self.run(Duration::from_secs(10), path, |net| {
            net.sender_events
                .contains(&SenderEvent::InitialTransmissionDone { seq })
        });
        assert!(done, "the initial transmission of {seq} did not finish");
    }

    fn applied(&self, seq: u64) -> bool {
        self.member_events
            .iter()
            .any(|e| matches!(e, ReceiverEvent::GroupKeyUpdated { seq: s, .. } if *s == seq))
    }

    fn out_of_sync(&self) -> Vec<u64> {
        self.member_events
            .iter()
            .filter_map(|e| match e {
                ReceiverEvent::OutOfSync { from_seq } => Some(*from_seq),
                _ => None,
            })
            .collect()
    }

    /// Fetches the member's resync item of `seq` from the sender's history and hands it over.
    fn resync(&mut self, seq: u64) -> Result<u64, rekeycast::session::receiver::ResyncError> {
        let item = self
            .sender
            .resync_item(seq, self.member.order_key())
            .unwrap();
        let (manifest, chunk) = (item.manifest.to_vec(), item.chunk.to_vec());
        let result = self.member.handle_resync(self.now, &manifest, &chunk);
        self.pump(&mut |_| true);
        result
    }
}

/// Whether the member holds the GCKS's current group key.
fn holds_group_key(net: &Net, group: &Group) -> bool {
    let (version, key) = group.tree.group_key();
    net.member
        .group_key()
        .is_some_and(|k| k.version == version && k.key.as_bytes() == key.as_bytes())
}

/// A member whose own source symbol (and every repair symbol of its block) was lost takes an
/// insider's forged repair symbol (random bytes, the real MAC key) into its decode: the block
/// "decodes" to garbage, its chunk fails authentication, and the session counts a decode
/// failure, drops the block's repair symbols and asks again. The sender's real repair, sent
/// in answer to the member's NACK, then decodes the block and the message is applied from the
/// decode, with no out-of-sync and no signature check spent on the garbage.
#[test]
fn forged_repair_symbols_are_discarded_and_the_member_recovers() {
    let mut group = Group::new(31, 2000, ChunkAuth::Signature);
    let (message, bundle) = group.admit();
    let seq = message.seq;
    let mut net = Net::new(&bundle, group.tree.member_count(), 31);
    let own = Own::of(&message.built, net.member.order_key());
    net.queue(&message);

    // The initial transmission, without the member's own chunk or any repair of its block.
    net.initial_transmission(seq, &mut |repr| !own.lost(seq, repr));
    assert!(!net.applied(seq));
    assert_eq!(net.member.counters().decode_failures, 0);
    assert_eq!(net.member.message_counters().signature_checks, 1);
    let nacks_before = net.member.counters().nacks_sent;

    // The insider's forged repair symbol completes the block with garbage.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    net.inject(&forged_repair(
        &mut rng,
        &message,
        own,
        own.block_len + 1000,
    ));
    assert_eq!(
        net.member.counters().decode_failures,
        1,
        "the forged decode was caught"
    );
    assert!(!net.applied(seq));
    assert!(net.out_of_sync().is_empty());
    // The garbage is not a chunk: no signature check was spent on it.
    assert_eq!(net.member.message_counters().signature_checks, 1);

    // The member asks again; the sender's real repair completes the block.
    let applied = net.run(Duration::from_secs(30), &mut |_| true, |net| {
        net.applied(seq)
    });
    assert!(
        applied,
        "the member did not recover: {:?}",
        net.member.counters()
    );
    let counters = *net.member.counters();
    assert_eq!(counters.applied_from_decode, 1);
    assert_eq!(counters.messages_applied, 1);
    assert_eq!(counters.decode_failures, 1);
    assert_eq!(counters.out_of_sync, 0);
    assert!(counters.nacks_sent > nacks_before, "the member asked again");
    assert!(net.sender.counters().repair_orders >= 1);
    assert!(net.sender.counters().repair_symbols_sent >= 1);
    assert_eq!(
        net.member.message_counters().signature_checks,
        CHECKS_PER_MESSAGE
    );
    assert!(holds_group_key(&net, &group));
}

/// An insider that keeps forging: after every failed decode the member drops the repair
/// symbols and the insider completes the block with garbage again. After exactly
/// `ReceiverConfig::decode_failure_limit` failures the member raises
/// `OutOfSync { from_seq: seq }` (and not before), and the resync item the sender's history
/// serves (its signed manifest and the member's chunk) is applied.
#[test]
fn repeated_insider_forgery_sends_the_member_to_resync() {
    let mut group = Group::new(32, 2000, ChunkAuth::Signature);
    let (message, bundle) = group.admit();
    let seq = message.seq;
    let limit = ReceiverConfig::new(sender_addr()).decode_failure_limit;
    let mut net = Net::new(&bundle, group.tree.member_count(), 32);
    let own = Own::of(&message.built, net.member.order_key());
    net.queue(&message);
    net.initial_transmission(seq, &mut |repr| !own.lost(seq, repr));

    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for failure in 1..=u64::from(limit) {
        assert!(net.out_of_sync().is_empty(), "out of sync before {failure}");
        let esi = own.block_len + 1000 + failure as u32;
        net.inject(&forged_repair(&mut rng, &message, own, esi));
        assert_eq!(net.member.counters().decode_failures, failure);
    }
    assert_eq!(net.out_of_sync(), vec![seq]);
    assert_eq!(net.member.counters().out_of_sync, 1);
    assert!(!net.applied(seq));
    assert_eq!(net.member.message_counters().signature_checks, 1);

    assert_eq!(net.resync(seq), Ok(seq));
    assert!(net.applied(seq));
    let counters = *net.member.counters();
    assert_eq!(counters.applied_from_resync, 1);
    assert_eq!(counters.messages_applied, 1);
    assert_eq!(net.member.next_seq(), seq + 1);
    assert!(holds_group_key(&net, &group));
}

/// An insider's signed objects with a valid MAC and a bad signature, for the member's current
/// sequence number.
struct Garbage;

impl Garbage {
    /// The real manifest with a bit of its signature (its last 64 bytes) flipped.
    fn manifest(message: &Message, i: usize) -> Vec<u8> {
        let mut manifest = message.built.manifest.clone();
        let len = manifest.len();
        manifest[len - 1 - i % 64] ^= 1 << (i % 8);
        symbol(
            message.seq,
            ObjectKind::Manifest,
            0,
            0,
            &manifest,
            &message.mac_key,
        )
    }

    /// The member's real chunk with a bit of its payload flipped: it still claims the
    /// member's leaf, its signature no longer matches.
    fn own_chunk(message: &Message, own: Own, i: usize) -> Vec<u8> {
        let index = message
            .built
            .fec_info
            .partition()
            .block_start(own.sbn)
            .unwrap()
            + own.esi;
        let mut chunk = message.built.chunks[index as usize].clone();
        let payload = rekeycast::session::chunk::HEADER_LEN;
        chunk[payload + i % 16] ^= 1 << (i % 8);
        symbol(
            message.seq,
            ObjectKind::Chunks,
            own.sbn,
            own.esi,
            &chunk,
            &message.mac_key,
        )
    }
}

/// 1,000 manifests with a valid MAC and a bad signature for the member's current sequence
/// number cost exactly `signature_failure_cap` signature checks; so do 1,000 copies of the
/// member's own chunk (per-chunk signatures) with a bad signature after the real manifest
/// (one more check, for that manifest).
///
/// The documented multicast behaviour once the cap is reached: no more signature checks are
/// made for that sequence number, the real manifest (or chunk) included; the member cannot
/// complete the message over multicast (`over_failure_cap` counts the real objects refused).
/// Whether it then converges by resync is
/// `a_member_capped_by_bad_manifests_converges_by_resync` and
/// `a_member_capped_by_bad_own_chunks_converges_by_resync`.
#[test]
fn valid_mac_garbage_costs_bounded_signature_checks() {
    let cap = u64::from(ReceiverConfig::new(sender_addr()).signature_failure_cap);

    // Bad manifests before the real one.
    let mut group = Group::new(33, 2000, ChunkAuth::Signature);
    let (message, bundle) = group.admit();
    let seq = message.seq;
    let mut net = Net::new(&bundle, group.tree.member_count(), 33);
    for i in 0..1_000 {
        net.inject(&Garbage::manifest(&message, i));
    }
    let counters = *net.member.message_counters();
    assert_eq!(counters.signature_checks, cap);
    assert_eq!(counters.signature_failures, cap);
    assert_eq!(counters.over_failure_cap, 1_000 - cap);
    // The real traffic: no more checks for this sequence number, the real manifest refused.
    net.queue(&message);
    net.initial_transmission(seq, &mut |_| true);
    let counters = *net.member.message_counters();
    assert_eq!(counters.signature_checks, cap);
    assert_eq!(counters.manifests_verified, 0);
    // Every manifest repeat of the initial transmission was refused unchecked.
    let repeats = u64::from(net.sender.config().manifest_repeats);
    assert!(counters.over_failure_cap >= 1_000 - cap + repeats);
    assert!(!net.applied(seq));

    // Bad own chunks after the real manifest.
    let mut group = Group::new(34, 2000, ChunkAuth::Signature);
    let (message, bundle) = group.admit();
    let seq = message.seq;
    let mut net = Net::new(&bundle, group.tree.member_count(), 34);
    let own = Own::of(&message.built, net.member.order_key());
    net.inject(&symbol(
        seq,
        ObjectKind::Manifest,
        0,
        0,
        &message.built.manifest,
        &message.mac_key,
    ));
    assert_eq!(net.member.message_counters().signature_checks, 1);
    for i in 0..1_000 {
        net.inject(&Garbage::own_chunk(&message, own, i));
    }
    let counters = *net.member.message_counters();
    assert_eq!(counters.signature_checks, 1 + cap);
    assert_eq!(counters.signature_failures, cap);
    assert_eq!(counters.over_failure_cap, 1_000 - cap);
    assert_eq!(net.member.counters().bad_own_chunks, 1_000);
    // The real traffic: the real own chunk is refused unchecked.
    net.queue(&message);
    net.initial_transmission(seq, &mut |_| true);
    let counters = *net.member.message_counters();
    assert_eq!(counters.signature_checks, 1 + cap);
    assert!(counters.over_failure_cap > 1_000 - cap);
    assert!(!net.applied(seq));
}

/// Exhausts the signature failure cap of the member's current sequence number with
/// valid-MAC garbage (bad manifests before the real one, or bad copies of the member's own
/// chunk after it), runs the real traffic and its repair rounds until the member gives up on
/// the message, and resyncs it from the sender's history.
fn capped_member_converges_by_resync(seed: u64, bad_chunks: bool) {
    let cap = ReceiverConfig::new(sender_addr()).signature_failure_cap as usize;
    let mut group = Group::new(seed, 2000, ChunkAuth::Signature);
    let (message, bundle) = group.admit();
    let seq = message.seq;
    let mut net = Net::new(&bundle, group.tree.member_count(), seed);
    let own = Own::of(&message.built, net.member.order_key());
    if bad_chunks {
        net.inject(&symbol(
            seq,
            ObjectKind::Manifest,
            0,
            0,
            &message.built.manifest,
            &message.mac_key,
        ));
    }
    for i in 0..cap {
        if bad_chunks {
            net.inject(&Garbage::own_chunk(&message, own, i));
        } else {
            net.inject(&Garbage::manifest(&message, i));
        }
    }
    net.queue(&message);
    // Multicast, repair rounds included, until the member gives up on the message.
    let behind = net.run(Duration::from_secs(120), &mut |_| true, |net| {
        !net.out_of_sync().is_empty() || net.applied(seq)
    });
    assert!(behind, "neither out of sync nor applied");
    assert!(
        !net.applied(seq),
        "the capped message applied over multicast"
    );
    assert_eq!(net.out_of_sync(), vec![seq]);
    assert_eq!(net.resync(seq), Ok(seq), "the resync item was refused");
    assert!(net.applied(seq));
    assert_eq!(net.member.counters().applied_from_resync, 1);
    assert!(holds_group_key(&net, &group));
}

/// After an insider's manifests with a valid MAC and a bad signature exhausted the signature
/// failure cap of the member's current sequence number (as in
/// `valid_mac_garbage_costs_bounded_signature_checks`), multicast cannot complete the
/// message: the member raises `OutOfSync { from_seq: seq }` (it does), and must then converge
/// by resync from the sender's history (DESIGN.md: "after a few failures the member resyncs
/// over unicast").
#[test]
fn a_member_capped_by_bad_manifests_converges_by_resync() {
    capped_member_converges_by_resync(35, false);
}

/// The same with bad copies of the member's own chunk (per-chunk signatures) after the real
/// manifest: `OutOfSync` is raised (the real chunk, and any decode of the block, is refused
/// unchecked), and the member must converge by resync.
#[test]
fn a_member_capped_by_bad_own_chunks_converges_by_resync() {
    capped_member_converges_by_resync(37, true);
}

/// Random bytes, real datagrams with bits flipped, and datagrams of the right group sealed with
/// made-up keys (the real signed manifest and chunks among them), fed to the member after every
/// datagram of three real messages: every message is applied, and the signature checks are
/// exactly what the real traffic needs, `CHECKS_PER_MESSAGE` (manifest and own chunk, per-chunk
/// signatures) per message, none failed.
#[test]
fn outsider_datagrams_never_reach_signature_checks() {
    let mut group = Group::new(36, 2000, ChunkAuth::Signature);
    let (first, bundle) = group.admit();
    let mut net = Net::new(&bundle, group.tree.member_count(), 36);
    let mut noise = Noise {
        rng: ChaCha8Rng::seed_from_u64(2026),
        per_datagram: 50,
        real: Vec::new(),
        fed: 0,
    };
    let mut message = first;
    for round in 0..3u64 {
        let seq = message.seq;
        net.queue(&message);
        net.noise = Some((noise, message));
        let applied = net.run(Duration::from_secs(30), &mut |_| true, |net| {
            net.applied(seq)
        });
        let (fed, _message) = net.noise.take().unwrap();
        noise = fed;
        assert!(applied, "round {round}: message {seq} not applied");
        let counters = *net.member.message_counters();
        assert_eq!(
            counters.signature_checks,
            CHECKS_PER_MESSAGE * (round + 1),
            "round {round}: outsider traffic reached a signature check"
        );
        assert_eq!(counters.signature_failures, 0);
        assert!(holds_group_key(&net, &group));
        message = group.churn(round);
    }
    assert!(noise.fed > 1_000, "noise fed: {}", noise.fed);
    assert_eq!(net.member.counters().messages_applied, 3);
    assert_eq!(net.member.counters().applied_from_source, 3);
    // Not one outsider datagram passed the MAC: only the sender's can have.
    let datagrams = *net.member.datagram_counters();
    assert!(datagrams.accepted <= noise.real.len() as u64);
    assert!(
        datagrams.rejected() > noise.fed / 2,
        "most outsider datagrams die at the header or MAC: {} of {}",
        datagrams.rejected(),
        noise.fed
    );
}

/// A member whose registration bundle has one hex digit of its leaf key flipped: its own
/// chunk of its first message is the GCKS's (its signature verifies) and is addressed to its
/// leaf, but its keys cannot open it. Within that one message the member says so and must
/// register again; it raises no out-of-sync (a resync would only fetch the same chunk), takes
/// no later traffic, refuses resync items and owes the network nothing.
#[test]
fn a_member_whose_keys_cannot_open_its_own_chunk_says_so_within_one_message() {
    let mut group = Group::new(38, 2000, ChunkAuth::Signature);
    let (message, mut bundle) = group.admit();
    let seq = message.seq;
    let mut leaf_key = *bundle.leaf_key.as_bytes();
    leaf_key[0] ^= 0x01;
    bundle.leaf_key = rekeycast::lkh::Key::from_bytes(leaf_key);
    let mut net = Net::new(&bundle, group.tree.member_count(), 38);
    net.queue(&message);
    net.initial_transmission(seq, &mut |_| true);
    assert!(
        net.member.must_reregister(),
        "the member did not stop at its first message: events {:?}, counters {:?}",
        net.member_events,
        net.member.counters()
    );
    assert!(net.out_of_sync().is_empty(), "{:?}", net.member_events);
    let error = net
        .member_events
        .iter()
        .find_map(|e| match e {
            ReceiverEvent::KeysCannotOpen { seq: s, error } if *s == seq => Some(*error),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no KeysCannotOpen: {:?}", net.member_events));
    assert!(
        matches!(error, rekeycast::lkh::MemberError::Wrap { .. }),
        "{error}"
    );
    assert_eq!(
        net.member_events.last(),
        Some(&ReceiverEvent::MustReregister)
    );
    assert_eq!(
        net.member.reregister_reason(),
        Some(rekeycast::session::ReregisterReason::KeysCannotOpen { seq, error })
    );
    assert!(!net.applied(seq));
    assert_eq!(net.member.message_counters().signature_failures, 0);

    // Later messages change nothing: no event, no feedback, no timer.
    let events = net.member_events.len();
    let nacks = net.member.counters().nacks_sent;
    for round in 0..2 {
        let next = group.churn(round);
        net.queue(&next);
        net.initial_transmission(next.seq, &mut |_| true);
    }
    net.run(Duration::from_secs(300), &mut |_| true, |_| false);
    assert_eq!(net.member_events.len(), events, "{:?}", net.member_events);
    assert_eq!(net.member.counters().nacks_sent, nacks);
    assert_eq!(net.member.poll_timeout(), None);
    assert_eq!(
        net.resync(seq),
        Err(rekeycast::session::receiver::ResyncError::Reregistering)
    );
}

/// `ReceiverSession::new` refuses bundles no GCKS issues: message 0, the root as leaf, a leaf
/// beyond the deepest level of the tree.
#[test]
fn impossible_bundles_are_refused() {
    let mut group = Group::new(39, 10, ChunkAuth::Signature);
    let (_, bundle) = group.admit();
    let config = ReceiverConfig::new(sender_addr());
    assert!(ReceiverSession::new(&bundle, config.clone()).is_ok());
    let degree = bundle.rekey_sa.degree;
    type BreakIt = fn(&mut RegistrationBundle, Degree);
    let cases: [(&str, BreakIt); 3] = [
        ("first_seq", |b, _| b.first_seq = 0),
        ("leaf", |b, _| b.leaf = rekeycast::lkh::ROOT),
        ("leaf", |b, d| b.leaf = d.max_node() + 1),
    ];
    for (field, break_it) in cases {
        let mut bad = bundle.clone();
        break_it(&mut bad, degree);
        let error = ReceiverSession::new(&bad, config.clone())
            .err()
            .unwrap_or_else(|| panic!("bundle with a bad {field} accepted"));
        assert!(error.to_string().contains(field), "{error}");
    }
}
