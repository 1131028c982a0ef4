//! The sender under a flood of NACKs (DESIGN.md, security rules): NACKs are MAC'd, and the
//! sender never sends more repair for a block per round than `max(need)` within a configured
//! cap, whatever the number of NACKs, so repair bandwidth is bounded and unauthenticated
//! traffic buys nothing. The repair policy (`rekeycast_nack`'s distribution of needs) may send
//! less than `max(need)`: a round covers most NACKers, the rest ask again or by unicast.
//!
//! Each test drives a real [`SenderSession`] with a simulated clock and deterministic seeds,
//! feeds it NACK datagrams built and sealed as a receiver (or an attacker) would, and reads the
//! outcome from the session's own counters and from the datagrams it emits.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast::auth::mac::MacKey;
use rekeycast::lkh::{KeyTree, MemberId};
use rekeycast::session::layout::{build_message, MessageParams};
use rekeycast::session::sender::{PreparedMessage, SenderEvent};
use rekeycast::session::{SenderConfig, SenderCounters, SenderSession};
use rekeycast::wire::{BodyRepr, DatagramRepr, NackRepr, ObjectKind, Packet};
use rekeycast_testkit::forge::Sa;
use rekeycast_testkit::keys::KeyServer;

const GROUP: u32 = 0x0F10_0D00;
const SPI: u32 = 9;
const SA: Sa = Sa {
    group_id: GROUP,
    spi: SPI,
};
/// The driver's buffer: every datagram of the session fits it.
const DATAGRAM: usize = 1500;
/// NACKs per wave.
const WAVE: u32 = 10_000;
/// The largest need in a wave (needs cycle through `1..=MAX_NEED`).
const MAX_NEED: u16 = 5;

fn receiver_addr() -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 9], 4500))
}

/// A key tree of a few hundred members, and the GCKS's signing key.
struct Group {
    tree: KeyTree,
    gcks: SigningKey,
    round: u64,
}

/// A message ready to queue, with its sequence number and MAC key.
struct Message {
    seq: u64,
    prepared: PreparedMessage,
    mac_key: MacKey,
    /// Source symbols of block 0.
    block0_len: u32,
}

impl Group {
    fn new(seed: u64) -> Self {
        let KeyServer { tree, gcks } = KeyServer::new(SA, seed as u8, seed, 0..1000);
        Self {
            tree,
            gcks,
            round: 0,
        }
    }

    /// The next message: a tenth of the members leave and as many join (several blocks).
    fn message(&mut self) -> Message {
        self.round += 1;
        let round = self.round;
        let joining: Vec<MemberId> = (0..100).map(|i| MemberId(round * 1_000_000 + i)).collect();
        let leaving: Vec<MemberId> = (0..1000)
            .skip(round as usize)
            .step_by(10)
            .map(MemberId)
            .collect();
        let batch = self.tree.apply_batch(&joining, &leaving).unwrap();
        let params = MessageParams {
            spi: SPI,
            max_block_symbols: 16,
            signing_threads: 1,
            ..MessageParams::default()
        };
        let built =
            build_message(&batch, &self.tree.leaves_in_order(), &self.gcks, &params).unwrap();
        let block0_len = built.fec_info.partition().block_len(0).unwrap();
        Message {
            seq: batch.context.seq,
            prepared: PreparedMessage::new(built, batch.mac_key.clone()).unwrap(),
            mac_key: batch.mac_key.clone(),
            block0_len,
        }
    }
}

/// A NACK datagram for block `sbn` of message `seq`, sealed with `key`.
fn nack(seq: u64, sbn: u8, round: u8, need: u16, receiver_id: u32, key: &MacKey) -> Vec<u8> {
    let repr = DatagramRepr {
        group_id: GROUP,
        spi: SPI,
        seq,
        body: BodyRepr::Nack(NackRepr {
            object: ObjectKind::Chunks,
            sbn,
            round,
            need,
            receiver_id,
            echo: None,
        }),
        mac: [0; 16],
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut buf).unwrap();
    key.seal(&mut Packet::new_checked(&mut buf[..]).unwrap());
    buf
}

/// A wave of `WAVE` NACKs for block 0 of `seq`, round `round`, needs cycling through
/// `1..=MAX_NEED`, from distinct receiver ids, all sealed with `key(i)`.
fn wave(seq: u64, round: u8, mut key: impl FnMut(u32) -> MacKey) -> Vec<Vec<u8>> {
    (0..WAVE)
        .map(|i| {
            let need = 1 + (i % u32::from(MAX_NEED)) as u16;
            nack(seq, 0, round, need, i, &key(i))
        })
        .collect()
}

/// A repair or other symbol the sender emitted: (seq, sbn, esi) of a chunk symbol.
type SymbolId = (u64, u8, u32);

/// The sender and its simulated clock.
struct Driver {
    now: Instant,
    sender: SenderSession,
    events: Vec<SenderEvent>,
    /// Chunk symbols emitted, in order.
    symbols: Vec<SymbolId>,
}

impl Driver {
    fn new(config: SenderConfig) -> Self {
        let now = Instant::now();
        Self {
            now,
            sender: SenderSession::new(config, GROUP, SPI, now).unwrap(),
            events: Vec::new(),
            symbols: Vec::new(),
        }
    }

    /// Drains the sender's transmits and events at the current time.
    fn drain(&mut self) {
        let mut buf = vec![0u8; DATAGRAM];
        while let Some(transmit) = self.sender.poll_transmit(self.now, &mut buf) {
            let repr = DatagramRepr::parse(&buf[..transmit.len]).unwrap();
            if let BodyRepr::Symbol(symbol) = &repr.body {
                if symbol.object == ObjectKind::Chunks {
                    self.symbols.push((repr.seq, symbol.sbn, symbol.esi));
                }
            }
        }
        self.events
            .extend(std::iter::from_fn(|| self.sender.poll_event()));
    }

    /// Runs timeouts and transmits for `duration` of simulated time, or until `stop` holds.
    fn run(&mut self, duration: Duration, stop: impl Fn(&Self) -> bool) -> bool {
        let end = self.now + duration;
        for _ in 0..1_000_000 {
            self.drain();
            if stop(self) {
                return true;
            }
            match self.sender.poll_timeout() {
                Some(at) if at <= end => {
                    self.now = self.now.max(at);
                    self.sender.handle_timeout(self.now);
                }
                _ => {
                    self.now = end;
                    return false;
                }
            }
        }
        panic!("the sender spun without time passing");
    }

    /// Queues `message` and runs its initial transmission to the end.
    fn send(&mut self, message: Message) {
        let seq = message.seq;
        self.sender
            .queue_message(self.now, message.prepared)
            .unwrap();
        let done = self.run(Duration::from_secs(10), |d| {
            d.events
                .contains(&SenderEvent::InitialTransmissionDone { seq })
        });
        assert!(done, "the initial transmission of {seq} did not finish");
    }

    /// Feeds `datagrams` all at once, then runs well past the aggregation hold-off.
    fn flood(&mut self, datagrams: &[Vec<u8>]) {
        for datagram in datagrams {
            self.sender
                .handle_datagram(self.now, receiver_addr(), datagram);
        }
        let settle = self.sender.config().aggregator.hold_off * 4 + Duration::from_secs(2);
        self.run(settle, |_| false);
    }

    /// Repair symbols (ESIs past the source and proactive ones) of block `sbn` of `seq` emitted
    /// since symbol number `from`.
    fn repair_since(&self, from: usize, seq: u64, sbn: u8, first_repair: u32) -> BTreeSet<u32> {
        self.symbols[from..]
            .iter()
            .filter(|&&(s, b, esi)| s == seq && b == sbn && esi >= first_repair)
            .map(|&(_, _, esi)| esi)
            .collect()
    }
}

fn delta(after: &SenderCounters, before: &SenderCounters) -> SenderCounters {
    SenderCounters {
        manifests_sent: after.manifests_sent - before.manifests_sent,
        source_symbols_sent: after.source_symbols_sent - before.source_symbols_sent,
        proactive_symbols_sent: after.proactive_symbols_sent - before.proactive_symbols_sent,
        repair_symbols_sent: after.repair_symbols_sent - before.repair_symbols_sent,
        heartbeats_sent: after.heartbeats_sent - before.heartbeats_sent,
        advertisements_sent: after.advertisements_sent - before.advertisements_sent,
        bytes_sent: after.bytes_sent - before.bytes_sent,
        source_bytes_sent: after.source_bytes_sent - before.source_bytes_sent,
        nacks_received: after.nacks_received - before.nacks_received,
        probe_replies_received: after.probe_replies_received - before.probe_replies_received,
        replayed_feedback: after.replayed_feedback - before.replayed_feedback,
        stale_feedback: after.stale_feedback - before.stale_feedback,
        repair_orders: after.repair_orders - before.repair_orders,
        rejected: after.rejected - before.rejected,
        ignored: after.ignored - before.ignored,
        buffer_too_small: after.buffer_too_small - before.buffer_too_small,
        fec_errors: after.fec_errors - before.fec_errors,
    }
}

/// 10,000 authentic NACKs for one block in one round (needs 1 to 5, from 10,000 receiver
/// ids), fed all at once after the message's initial transmission, make exactly one repair
/// order of between 1 and `max(need)` = 5 fresh repair symbols (within the aggregator's cap),
/// with every NACK counted; a second wave of 10,000 for round 2 makes exactly one more order
/// of new symbols, continuing where the first left off. The immediate advertisements are
/// bounded by the distinct needs, not the NACKs.
#[test]
fn ten_thousand_duplicate_nacks_make_one_repair_order_per_block_per_round() {
    let mut group = Group::new(11);
    let message = group.message();
    let (seq, key) = (message.seq, message.mac_key.clone());
    let block0_len = message.block0_len;
    let mut driver = Driver::new(SenderConfig::default());
    let cap = driver.sender.config().aggregator.max_repair_per_round;
    assert!(MAX_NEED <= cap);
    driver.send(message);
    assert_eq!(driver.sender.counters().repair_orders, 0);
    // The first ESI no initial transmission used: source plus proactive symbols of block 0.
    let initial_block0 = driver
        .symbols
        .iter()
        .filter(|&&(s, b, _)| s == seq && b == 0)
        .count() as u32;
    assert!(initial_block0 >= block0_len);

    let mut first = initial_block0;
    for round in 1..=2u8 {
        let before = *driver.sender.counters();
        let from = driver.symbols.len();
        driver.flood(&wave(seq, round, |_| key.clone()));
        let d = delta(driver.sender.counters(), &before);
        assert_eq!(d.nacks_received, u64::from(WAVE), "round {round}");
        assert_eq!(d.rejected, 0, "round {round}");
        assert_eq!(
            d.repair_orders, 1,
            "round {round}: one order per block per round"
        );
        let sent = d.repair_symbols_sent;
        assert!(
            (1..=u64::from(MAX_NEED.min(cap))).contains(&sent),
            "round {round}: {sent} repair symbols, at most max(need)"
        );
        assert!(
            d.advertisements_sent <= u64::from(MAX_NEED),
            "round {round}: {} advertisements",
            d.advertisements_sent
        );
        // The repair is fresh symbols of block 0, never sent before.
        let repair = driver.repair_since(from, seq, 0, initial_block0);
        let count = u32::try_from(sent).unwrap();
        assert_eq!(
            repair,
            (first..first + count).collect(),
            "round {round}: fresh symbols after the ones sent before"
        );
        first += count;
        assert_eq!(
            driver.symbols.len() - from,
            usize::try_from(sent).unwrap(),
            "round {round}: no other symbol was sent"
        );
    }
    assert_eq!(driver.sender.counters().repair_orders, 2);
    assert_eq!(driver.sender.repair_stats().orders, 2);
    assert_eq!(driver.sender.counters().fec_errors, 0);
}

/// A flood asking for far more than the cap (needs up to 1,000) gets one order of at most
/// `AggregatorConfig::max_repair_per_round` repair symbols per round, exactly the cap when the
/// policy would send more: the cap bounds repair bandwidth whatever the NACKs claim.
#[test]
fn a_nack_flood_asking_beyond_the_cap_gets_the_cap() {
    // One flood of a given message: its NACKs ask for up to 1,000 repair symbols.
    let flood = |config: SenderConfig| {
        let mut group = Group::new(14);
        let message = group.message();
        let (seq, key) = (message.seq, message.mac_key.clone());
        let mut driver = Driver::new(config);
        driver.send(message);
        let before = *driver.sender.counters();
        let nacks: Vec<Vec<u8>> = (0..WAVE)
            .map(|i| nack(seq, 0, 1, 1 + (i % 1_000) as u16, i, &key))
            .collect();
        driver.flood(&nacks);
        delta(driver.sender.counters(), &before)
    };
    // Without a binding cap, what the policy sends for this flood.
    let uncapped = flood(SenderConfig::default()).repair_symbols_sent;
    assert!(uncapped >= 2, "the flood asks for repair: {uncapped}");
    // A cap below that binds.
    let cap = u16::try_from(uncapped - 1).unwrap();
    let mut config = SenderConfig::default();
    config.aggregator.max_repair_per_round = cap;
    let d = flood(config);
    assert_eq!(d.nacks_received, u64::from(WAVE));
    assert_eq!(d.repair_orders, 1);
    assert_eq!(d.repair_symbols_sent, u64::from(cap));
    assert!(
        d.advertisements_sent <= u64::from(cap),
        "{}",
        d.advertisements_sent
    );
}

/// The same flood sealed with made-up MAC keys (an outsider, one key per NACK): every NACK is
/// counted as rejected, none as received, and no repair order, repair symbol or advertisement
/// follows.
#[test]
fn ten_thousand_nacks_under_forged_mac_keys_make_no_repair_order() {
    let mut group = Group::new(12);
    let message = group.message();
    let seq = message.seq;
    let mut driver = Driver::new(SenderConfig::default());
    driver.send(message);
    let before = *driver.sender.counters();
    let from = driver.symbols.len();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for round in 1..=2u8 {
        driver.flood(&wave(seq, round, |_| MacKey::from_bytes(rng.gen())));
    }
    let d = delta(driver.sender.counters(), &before);
    assert_eq!(d.rejected, 2 * u64::from(WAVE));
    assert_eq!(d.nacks_received, 0);
    assert_eq!(d.repair_orders, 0);
    assert_eq!(d.repair_symbols_sent, 0);
    assert_eq!(d.advertisements_sent, 0);
    assert_eq!(driver.symbols.len(), from, "no symbol was sent");
    assert_eq!(driver.sender.repair_stats().nacks, 0);
}

/// NACKs for sequence numbers never queued (past the latest, far ahead, zero), sealed with the
/// latest message's real MAC key as an insider could, and for a message retired from the
/// history window, sealed with its own real key, are rejected at the MAC step; NACKs for a
/// message still in the history but outside the repair window are authentic but make no
/// order. None of them makes a repair order or a repair symbol; a NACK of the newest message
/// then does (the setup works).
#[test]
fn nacks_of_unknown_or_retired_messages_are_dropped() {
    let mut group = Group::new(13);
    let config = SenderConfig {
        history: 2,
        repair_window: 1,
        ..SenderConfig::default()
    };
    let mut driver = Driver::new(config);
    let mut messages = Vec::new();
    for _ in 0..3 {
        let message = group.message();
        messages.push((message.seq, message.mac_key.clone()));
        driver.send(message);
    }
    let [(retired, retired_key), (old, old_key), (latest, latest_key)] =
        <[_; 3]>::try_from(messages).ok().unwrap();
    assert!(driver
        .events
        .contains(&SenderEvent::Retired { seq: retired }));
    assert_eq!(driver.sender.oldest_seq(), Some(old));
    assert_eq!(driver.sender.latest_seq(), Some(latest));

    let before = *driver.sender.counters();
    let from = driver.symbols.len();
    let mut rejected = 0;
    for seq in [latest + 1, latest + 1_000, 0, u64::MAX] {
        driver.flood(&wave(seq, 1, |_| latest_key.clone()));
        rejected += u64::from(WAVE);
    }
    driver.flood(&wave(retired, 1, |_| retired_key.clone()));
    rejected += u64::from(WAVE);
    driver.flood(&wave(old, 1, |_| old_key.clone()));
    let d = delta(driver.sender.counters(), &before);
    assert_eq!(d.rejected, rejected);
    assert_eq!(
        d.nacks_received,
        u64::from(WAVE),
        "the old message's NACKs are authentic"
    );
    assert_eq!(d.repair_orders, 0);
    assert_eq!(d.repair_symbols_sent, 0);
    assert_eq!(d.advertisements_sent, 0);
    assert_eq!(driver.symbols.len(), from, "no symbol was sent");

    // The newest message is repaired: one order, at most max(need) symbols.
    driver.flood(&wave(latest, 1, |_| latest_key.clone()));
    let d = delta(driver.sender.counters(), &before);
    assert_eq!(d.repair_orders, 1);
    assert!((1..=u64::from(MAX_NEED)).contains(&d.repair_symbols_sent));
    assert!(driver.symbols[from..]
        .iter()
        .all(|&(s, b, _)| s == latest && b == 0));
}
