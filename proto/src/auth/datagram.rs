//! The first stages of the verifier pipeline: length and header checks, the datagram MAC, and
//! the sequence window (DESIGN.md, security rules; RFC 4046 5.2). Heartbeats' replay windows,
//! which need the time, follow in [`super::heartbeat`].
//!
//! [`DatagramVerifier`] holds the MAC keys of the few sequence numbers a member (or relay) can
//! currently check, and turns bytes off the network into an [`Authenticated`] datagram or a
//! counted [`Reject`]. The order is fixed: the header is checked before the MAC key is looked
//! up, the MAC before the body is parsed, and nothing downstream (signatures, FEC decoding,
//! key state) ever sees a datagram that failed here. Counters prove it: every rejection reason
//! has one.
//!
//! The sequence window follows from the keys: a datagram is checkable only for a sequence
//! number whose MAC key the verifier holds. An older one is stale. A newer one is either far
//! in the future (rejected outright) or a sign that this member missed a message and lacks the
//! key (DESIGN.md step 8); that signal is forgeable, so the verifier only counts it and reports
//! the claimed sequence number for a rate-limited state check.

use std::collections::VecDeque;

use super::mac::MacKey;
use crate::wire::{self, BodyRepr, DatagramRepr, Packet};

/// How many MAC keys a verifier keeps (the newest ones): the current message, the next one,
/// and a little slack for messages that overlap in flight.
pub const MAX_KEYS: usize = 4;

/// How far beyond its newest key a sequence number may be before it is rejected as far-future
/// rather than reported as a sign that the member is behind.
pub const DEFAULT_FUTURE_WINDOW: u64 = 1 << 16;

/// A datagram that passed the header checks, the MAC and the replay window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated<'a> {
    repr: DatagramRepr<'a>,
}

impl<'a> Authenticated<'a> {
    /// The parsed datagram.
    pub fn repr(&self) -> &DatagramRepr<'a> {
        &self.repr
    }

    /// The sequence number it belongs to.
    pub fn seq(&self) -> u64 {
        self.repr.seq
    }

    /// Its body.
    pub fn body(&self) -> &BodyRepr<'a> {
        &self.repr.body
    }
}

/// Why a datagram was dropped, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reject {
    /// Too short, wrong magic or version, unknown type, reserved bits set.
    #[error("malformed header: {0}")]
    MalformedHeader(wire::Error),
    /// Another group's datagram.
    #[error("wrong group {0}")]
    WrongGroup(u32),
    /// Another Rekey SA's datagram.
    #[error("wrong SPI {0:#x}")]
    WrongSpi(u32),
    /// A sequence number older than every key held.
    #[error("stale sequence number {0}")]
    Stale(u64),
    /// A sequence number newer than every key held, within the future window: this member may
    /// have missed a message (a forgeable signal; see the module docs).
    #[error("no MAC key yet for sequence number {0}")]
    Ahead(u64),
    /// A sequence number beyond the future window.
    #[error("far-future sequence number {0}")]
    FarFuture(u64),
    /// The MAC does not match.
    #[error("bad MAC")]
    BadMac,
    /// The MAC matched but the body is malformed (only an insider can produce this).
    #[error("malformed body: {0}")]
    MalformedBody(wire::Error),
    /// A heartbeat that passed the MAC but not the replay windows of
    /// [`super::heartbeat::HeartbeatGuard`] (replayed, ahead of its sender's clock, or a new
    /// sender instance naming old traffic). The guard needs the time, so the session that runs
    /// it reports the rejection here ([`DatagramVerifier::record_heartbeat_rejected`]).
    #[error("replayed heartbeat")]
    Replayed,
}

/// Counts of what the verifier accepted and rejected, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatagramCounters {
    /// Datagrams that passed.
    pub accepted: u64,
    /// [`Reject::MalformedHeader`].
    pub malformed_header: u64,
    /// [`Reject::WrongGroup`].
    pub wrong_group: u64,
    /// [`Reject::WrongSpi`].
    pub wrong_spi: u64,
    /// [`Reject::Stale`].
    pub stale: u64,
    /// [`Reject::Ahead`].
    pub ahead: u64,
    /// [`Reject::FarFuture`].
    pub far_future: u64,
    /// [`Reject::BadMac`].
    pub bad_mac: u64,
    /// [`Reject::MalformedBody`].
    pub malformed_body: u64,
    /// [`Reject::Replayed`].
    pub replayed: u64,
}

impl DatagramCounters {
    /// Every rejection, whatever the reason.
    pub fn rejected(&self) -> u64 {
        self.malformed_header
            + self.wrong_group
            + self.wrong_spi
            + self.stale
            + self.ahead
            + self.far_future
            + self.bad_mac
            + self.malformed_body
            + self.replayed
    }

    fn count(&mut self, reject: Reject) {
        let counter = match reject {
            Reject::MalformedHeader(_) => &mut self.malformed_header,
            Reject::WrongGroup(_) => &mut self.wrong_group,
            Reject::WrongSpi(_) => &mut self.wrong_spi,
            Reject::Stale(_) => &mut self.stale,
            Reject::Ahead(_) => &mut self.ahead,
            Reject::FarFuture(_) => &mut self.far_future,
            Reject::BadMac => &mut self.bad_mac,
            Reject::MalformedBody(_) => &mut self.malformed_body,
            Reject::Replayed => &mut self.replayed,
        };
        *counter += 1;
    }
}

/// The header, MAC and window stages of the verifier pipeline for one group.
#[derive(Debug)]
pub struct DatagramVerifier {
    group_id: u32,
    spi: u32,
    /// `(seq, key)`, ascending by seq, at most [`MAX_KEYS`].
    keys: VecDeque<(u64, MacKey)>,
    future_window: u64,
    counters: DatagramCounters,
}

impl DatagramVerifier {
    /// A verifier for a group and Rekey SA that holds no key yet.
    pub fn new(group_id: u32, spi: u32) -> Self {
        Self {
            group_id,
            spi,
            keys: VecDeque::with_capacity(MAX_KEYS),
            future_window: DEFAULT_FUTURE_WINDOW,
            counters: DatagramCounters::default(),
        }
    }

    /// Sets how far past the newest key a sequence number is still reported as
    /// [`Reject::Ahead`] rather than [`Reject::FarFuture`].
    pub fn set_future_window(&mut self, window: u64) {
        self.future_window = window;
    }

    /// Adds the MAC key of message `seq`. Keys older than the newest [`MAX_KEYS`] are dropped,
    /// so the verifier never goes back: once a key is gone its sequence number is stale. A key
    /// for a sequence number already held replaces it.
    pub fn add_key(&mut self, seq: u64, key: MacKey) {
        match self.keys.binary_search_by_key(&seq, |(s, _)| *s) {
            Ok(index) => self.keys[index].1 = key,
            Err(index) => self.keys.insert(index, (seq, key)),
        }
        while self.keys.len() > MAX_KEYS {
            self.keys.pop_front();
        }
    }

    /// Drops the keys of messages older than `seq`.
    pub fn forget_before(&mut self, seq: u64) {
        while self.keys.front().is_some_and(|(s, _)| *s < seq) {
            self.keys.pop_front();
        }
    }

    /// The sequence numbers whose MAC keys are held, ascending.
    pub fn key_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.keys.iter().map(|(seq, _)| *seq)
    }

    /// The MAC key of `seq`, for sealing this member's own NACKs and probe replies.
    pub fn key(&self, seq: u64) -> Option<&MacKey> {
        self.keys
            .binary_search_by_key(&seq, |(s, _)| *s)
            .ok()
            .map(|index| &self.keys[index].1)
    }

    /// The counters so far.
    pub fn counters(&self) -> &DatagramCounters {
        &self.counters
    }

    /// Moves a datagram this verifier accepted to [`Reject::Replayed`]: a heartbeat the
    /// session's [`super::heartbeat::HeartbeatGuard`] rejected.
    pub fn record_heartbeat_rejected(&mut self) {
        self.counters.accepted = self.counters.accepted.saturating_sub(1);
        self.counters.replayed += 1;
    }

    /// Runs the header, MAC and sequence window stages over one datagram. Heartbeats are not
    /// checked for replay here: that needs the time, and is
    /// [`super::heartbeat::HeartbeatGuard`]'s job.
    pub fn check<'a>(&mut self, bytes: &'a [u8]) -> Result<Authenticated<'a>, Reject> {
        let outcome = self.check_uncounted(bytes);
        match &outcome {
            Ok(_) => self.counters.accepted += 1,
            Err(reject) => self.counters.count(*reject),
        }
        outcome
    }

    fn check_uncounted<'a>(&mut self, bytes: &'a [u8]) -> Result<Authenticated<'a>, Reject> {
        let packet = Packet::new_checked(bytes).map_err(Reject::MalformedHeader)?;
        if packet.group_id() != self.group_id {
            return Err(Reject::WrongGroup(packet.group_id()));
        }
        if packet.spi() != self.spi {
            return Err(Reject::WrongSpi(packet.spi()));
        }
        let seq = packet.seq();
        let key = match self.keys.binary_search_by_key(&seq, |(s, _)| *s) {
            Ok(index) => &self.keys[index].1,
            Err(0) => return Err(Reject::Stale(seq)),
            Err(_) => {
                // Newer than every key held (Err(len)), or a gap between held keys, which only
                // a message the member skipped can leave: either way it cannot be checked.
                let newest = self.keys.back().map_or(0, |(s, _)| *s);
                if seq > newest && seq - newest > self.future_window {
                    return Err(Reject::FarFuture(seq));
                }
                return Err(Reject::Ahead(seq));
            }
        };
        if !key.check(&packet) {
            return Err(Reject::BadMac);
        }
        let repr = DatagramRepr::parse(bytes).map_err(Reject::MalformedBody)?;
        Ok(Authenticated { repr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{HeartbeatRepr, ObjectKind, SymbolRepr};

    const GROUP: u32 = 77;
    const SPI: u32 = 5;

    fn key(seq: u64) -> MacKey {
        MacKey::from_bytes([seq as u8; 32])
    }

    fn sealed(seq: u64, body: BodyRepr<'_>, key: &MacKey) -> Vec<u8> {
        crate::test_support::sealed((GROUP, SPI), seq, body, key)
    }

    fn symbol(seq: u64) -> Vec<u8> {
        let body = BodyRepr::Symbol(SymbolRepr {
            object: ObjectKind::Chunks,
            sbn: 1,
            esi: 2,
            data: b"0123456789",
        });
        sealed(seq, body, &key(seq))
    }

    fn heartbeat(seq: u64, probe: u64) -> Vec<u8> {
        let body = BodyRepr::Heartbeat(HeartbeatRepr {
            advertisement: false,
            probe_reply_requested: false,
            instance: 7,
            probe_timestamp_us: probe,
            grtt_us: 1000,
            group_size: 10,
            oldest_seq: 1,
            backoff_factor: 4,
            entries: vec![],
        });
        sealed(seq, body, &key(seq))
    }

    fn verifier() -> DatagramVerifier {
        let mut verifier = DatagramVerifier::new(GROUP, SPI);
        verifier.add_key(10, key(10));
        verifier.add_key(11, key(11));
        verifier
    }

    #[test]
    fn accepts_sealed_datagrams_of_held_keys() {
        let mut verifier = verifier();
        assert_eq!(verifier.check(&symbol(10)).unwrap().seq(), 10);
        assert_eq!(verifier.check(&symbol(11)).unwrap().seq(), 11);
        assert_eq!(verifier.counters().accepted, 2);
        assert_eq!(verifier.counters().rejected(), 0);
    }

    #[test]
    fn window_rejections_are_counted() {
        let mut verifier = verifier();
        assert_eq!(verifier.check(&symbol(9)), Err(Reject::Stale(9)));
        assert_eq!(verifier.check(&symbol(12)), Err(Reject::Ahead(12)));
        let far = 11 + DEFAULT_FUTURE_WINDOW + 1;
        assert_eq!(verifier.check(&symbol(far)), Err(Reject::FarFuture(far)));
        let counters = verifier.counters();
        assert_eq!(
            (counters.stale, counters.ahead, counters.far_future),
            (1, 1, 1)
        );
    }

    #[test]
    fn every_single_bit_flip_is_rejected_before_any_body_is_parsed() {
        let mut verifier = verifier();
        let good = symbol(10);
        for bit in 0..good.len() * 8 {
            let mut flipped = good.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let outcome = verifier.check(&flipped);
            assert!(
                matches!(
                    outcome,
                    Err(Reject::MalformedHeader(_)
                        | Reject::WrongGroup(_)
                        | Reject::WrongSpi(_)
                        | Reject::Stale(_)
                        | Reject::Ahead(_)
                        | Reject::FarFuture(_)
                        | Reject::BadMac)
                ),
                "bit {bit}: {outcome:?}"
            );
        }
        assert_eq!(verifier.counters().accepted, 0);
        assert_eq!(verifier.counters().malformed_body, 0);
        assert_eq!(verifier.counters().rejected(), good.len() as u64 * 8);
    }

    #[test]
    fn another_groups_or_sas_traffic_is_rejected() {
        let mut other_group = DatagramVerifier::new(GROUP + 1, SPI);
        other_group.add_key(10, key(10));
        assert_eq!(
            other_group.check(&symbol(10)),
            Err(Reject::WrongGroup(GROUP))
        );
        let mut other_spi = DatagramVerifier::new(GROUP, SPI + 1);
        other_spi.add_key(10, key(10));
        assert_eq!(other_spi.check(&symbol(10)), Err(Reject::WrongSpi(SPI)));
    }

    #[test]
    fn the_wrong_key_fails_the_mac() {
        let mut verifier = verifier();
        let forged = sealed(
            10,
            BodyRepr::Symbol(SymbolRepr {
                object: ObjectKind::Chunks,
                sbn: 0,
                esi: 0,
                data: b"x",
            }),
            &key(99),
        );
        assert_eq!(verifier.check(&forged), Err(Reject::BadMac));
    }

    /// Heartbeats' replay windows need the time and belong to the session's heartbeat guard:
    /// the verifier passes any authentic heartbeat (a sender restarted with its probe clock at
    /// zero included), and counts the guard's rejections as replays.
    #[test]
    fn heartbeats_pass_and_the_guard_counts_its_rejections_here() {
        let mut verifier = verifier();
        let first = heartbeat(11, 1_000);
        assert!(verifier.check(&first).is_ok());
        assert!(verifier.check(&heartbeat(11, 0)).is_ok());
        verifier.record_heartbeat_rejected();
        assert_eq!(verifier.counters().accepted, 1);
        assert_eq!(verifier.counters().replayed, 1);
        assert_eq!(verifier.counters().rejected(), 1);
    }

    #[test]
    fn keys_only_move_forward() {
        let mut verifier = DatagramVerifier::new(GROUP, SPI);
        for seq in 1..=10 {
            verifier.add_key(seq, key(seq));
        }
        assert_eq!(verifier.key_seqs().collect::<Vec<_>>(), vec![7, 8, 9, 10]);
        assert_eq!(verifier.check(&symbol(6)), Err(Reject::Stale(6)));
        verifier.forget_before(9);
        assert_eq!(verifier.key_seqs().collect::<Vec<_>>(), vec![9, 10]);
        assert!(verifier.key(8).is_none());
        assert!(verifier.key(9).is_some());
    }
}
