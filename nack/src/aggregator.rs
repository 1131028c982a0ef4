//! The sender side: how much repair to send for which block, and when.
//!
//! [`RepairAggregator`] collects NACKs per block over a hold-off window that opens with the
//! first NACK of a round, then orders fresh repair symbols (ESIs never sent before) for the
//! round's largest need, within the block's bounds ([`RepairAggregator::set_block_bounds`]:
//! at least a floor that covers the typical receiver, so that the advertisement suppresses
//! most of the others, and at most a ceiling sized from the distribution of needs rather than
//! the worst receiver, or the need of the NACK that opened the round if larger: it may be the
//! only member in need) and at most [`AggregatorConfig::max_repair_per_round`], and paces
//! them with a token bucket. Any number of NACKs in one window costs at most one order.
//!
//! With a zero hold-off the first NACK of a round is answered at once; NACKs of the same round
//! that arrive within the top-up window after the order ([`RepairAggregator::set_top_up_window`],
//! the receivers' backoff window) join it, and one needing more than was ordered gets a top-up
//! of the difference (still within the ceiling) instead of a new round. A NACK for a round
//! already answered, after that window, is folded into the next round (RFC 4046 5.5's bound on
//! repair traffic: unauthenticated or duplicate NACKs buy nothing beyond the cap).
//!
//! In the unicast feedback mode it also emits an [`Advertisement`] whenever the round's
//! largest need grows, which the embedding multicasts at once so that other receivers needing
//! no more than that suppress their NACKs.
//!
//! It does not encode symbols: a [`RepairSymbol`] names the ESI the FEC layer must produce.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::{BlockKey, ConfigError};

/// The largest ESI (RFC 6330's 24-bit encoding symbol id).
pub const MAX_ESI: u32 = (1 << 24) - 1;

/// Token counts this close to one count as a whole token (floating-point rounding).
const TOKEN_EPSILON: f64 = 1e-9;

/// Configuration of a [`RepairAggregator`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregatorConfig {
    /// How long NACKs of a round are collected after the first one arrives (of the order of
    /// `K * GRTT`, so that it covers the receivers' backoff window).
    #[serde(rename = "hold_off_ms", with = "crate::duration_ms")]
    pub hold_off: Duration,
    /// The most repair symbols ordered per block per round, whatever the NACKs ask.
    pub max_repair_per_round: u16,
    /// The token bucket's rate: repair symbols per second, all blocks together.
    pub repair_rate: f64,
    /// The token bucket's depth: the largest burst of repair symbols.
    pub bucket_depth: u32,
    /// Whether to emit immediate repair advertisements (the unicast feedback mode).
    pub advertise: bool,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            hold_off: Duration::from_millis(400),
            max_repair_per_round: 64,
            repair_rate: 10_000.0,
            bucket_depth: 16,
            advertise: true,
        }
    }
}

impl AggregatorConfig {
    /// Checks the ranges of every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| ConfigError::Invalid { field, reason };
        if self.max_repair_per_round == 0 {
            return Err(invalid("max_repair_per_round", "must be at least 1"));
        }
        if !(self.repair_rate.is_finite() && self.repair_rate > 0.0) {
            return Err(invalid("repair_rate", "must be positive and finite"));
        }
        if self.bucket_depth == 0 {
            return Err(invalid("bucket_depth", "must be at least 1"));
        }
        Ok(())
    }
}

/// A NACK as the sender received it (the wire's `NackRepr` without the echo, which goes to
/// the [`crate::GrttEstimator`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IncomingNack {
    /// The block to repair.
    pub block: BlockKey,
    /// The round the receiver asks about.
    pub round: u8,
    /// Symbols the receiver still needs.
    pub need: u16,
}

/// What the aggregator did with a NACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NackDisposition {
    /// It opened the hold-off window of a round.
    Opened,
    /// It joined the open window of its round.
    Aggregated,
    /// Its round was already answered; it was folded into the next round.
    Folded,
    /// The block is not registered (or retired), the need is 0, or the block ran out of
    /// rounds or ESIs: ignored.
    Ignored,
}

/// An immediate repair advertisement: the sender will send at least `count` repair symbols
/// for `block` in `round` (a heartbeat `RepairEntry` with the advertisement flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Advertisement {
    /// The block.
    pub block: BlockKey,
    /// The round being aggregated.
    pub round: u8,
    /// The largest need heard so far in the round, capped.
    pub count: u16,
}

/// The repair ordered for one block in one round (a heartbeat `RepairEntry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RepairOrder {
    /// The block.
    pub block: BlockKey,
    /// The round answered.
    pub round: u8,
    /// The first ESI of the order; the order is `first_esi..first_esi + count`.
    pub first_esi: u32,
    /// Repair symbols ordered.
    pub count: u16,
    /// The largest need the round's NACKs asked for, before the cap.
    pub max_need: u16,
    /// NACKs aggregated into the round.
    pub nacks: u32,
    /// Whether this is a top-up of the round's earlier order (a NACK that needed more
    /// arrived within the top-up window) rather than the round's own order.
    pub top_up: bool,
}

/// One repair symbol to encode and multicast now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RepairSymbol {
    /// The block.
    pub block: BlockKey,
    /// The round it answers.
    pub round: u8,
    /// Its ESI, never sent before for this block.
    pub esi: u32,
    /// Whether it is the last symbol of its order.
    pub last_of_order: bool,
}

/// Counters of an aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AggregatorStats {
    /// NACKs received for registered blocks.
    pub nacks: u64,
    /// NACKs folded into a later round.
    pub folded: u64,
    /// NACKs ignored.
    pub ignored: u64,
    /// Repair orders made.
    pub orders: u64,
    /// Repair symbols ordered.
    pub symbols_ordered: u64,
    /// Advertisements emitted.
    pub advertisements: u64,
    /// NACKs that joined a round answered within the top-up window.
    pub joined: u64,
    /// Top-up orders made for them.
    pub top_ups: u64,
}

#[derive(Debug, Clone)]
struct SenderBlock {
    next_esi: u32,
    answered: u8,
    pending: Option<Pending>,
    /// The smallest and largest order per round (`None`: 1 and the cap).
    bounds: Option<(u16, u16)>,
    /// The last order: its round, count so far, and when it was made.
    last: Option<(u8, u16, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    round: u8,
    /// The need of the NACK that opened the round.
    first_need: u16,
    max_need: u16,
    advertised: u16,
    deadline: Instant,
    nacks: u32,
}

/// The sender-side repair state machine for all blocks the sender can still repair.
///
/// Method kinds and call order:
///
/// 1. Commands: [`register_block`](Self::register_block) after a block's initial
///    transmission (source plus proactive repair symbols); [`retire_before`](Self::retire_before)
///    when messages leave the repair window.
/// 2. Inputs: [`handle_nack`](Self::handle_nack) for every authenticated NACK;
///    [`handle_timeout`](Self::handle_timeout) when the deadline of
///    [`poll_timeout`](Self::poll_timeout) passes.
/// 3. Outputs, after any input: [`poll_advertisement`](Self::poll_advertisement) (multicast
///    at once), [`poll_order`](Self::poll_order) (heartbeat repair entries), then
///    [`poll_repair`](Self::poll_repair) until it returns `None`; then re-read
///    [`poll_timeout`](Self::poll_timeout), which includes the next pacing token.
#[derive(Debug)]
pub struct RepairAggregator {
    config: AggregatorConfig,
    blocks: BTreeMap<BlockKey, SenderBlock>,
    queue: VecDeque<RepairSymbol>,
    tokens: f64,
    refilled_at: Option<Instant>,
    advertisements: VecDeque<Advertisement>,
    orders: VecDeque<RepairOrder>,
    stats: AggregatorStats,
    top_up_window: Duration,
}

impl RepairAggregator {
    /// An aggregator with no blocks; fails on an invalid configuration.
    pub fn new(config: AggregatorConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            tokens: f64::from(config.bucket_depth),
            config,
            blocks: BTreeMap::new(),
            queue: VecDeque::new(),
            refilled_at: None,
            advertisements: VecDeque::new(),
            orders: VecDeque::new(),
            stats: AggregatorStats::default(),
            top_up_window: Duration::ZERO,
        })
    }

    /// Sets how long after an order NACKs of its round still join it (a top-up when they need
    /// more) instead of opening the next round: the receivers' backoff window, so that NACKs
    /// sent before the advertisement reached their senders do not make a second round.
    pub fn set_top_up_window(&mut self, window: Duration) {
        self.top_up_window = window;
    }

    /// Bounds every order of `block`: at least `floor` symbols (covering the typical
    /// receiver's need, so that the advertisement suppresses most others) and at most
    /// `ceiling` (sized from the distribution of needs; receivers needing more are left to
    /// the next round or to unicast chunk repair), both within the per-round cap.
    pub fn set_block_bounds(&mut self, block: BlockKey, floor: u16, ceiling: u16) {
        if let Some(state) = self.blocks.get_mut(&block) {
            let ceiling = ceiling.max(1);
            state.bounds = Some((floor.clamp(1, ceiling), ceiling));
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AggregatorConfig {
        &self.config
    }

    /// Changes the hold-off (for instance when the GRTT estimate moves); open windows keep
    /// their deadline.
    pub fn set_hold_off(&mut self, hold_off: Duration) {
        self.config.hold_off = hold_off;
    }

    /// The counters.
    pub fn stats(&self) -> AggregatorStats {
        self.stats
    }

    /// Makes `block` repairable; `first_repair_esi` is the first ESI not sent yet (the source
    /// symbols plus the proactive repair symbols already sent). Re-registering a block keeps
    /// its state but never moves its next ESI backwards.
    pub fn register_block(&mut self, block: BlockKey, first_repair_esi: u32) {
        let entry = self.blocks.entry(block).or_insert(SenderBlock {
            next_esi: first_repair_esi,
            answered: 0,
            pending: None,
            bounds: None,
            last: None,
        });
        entry.next_esi = entry.next_esi.max(first_repair_esi);
    }

    /// Forgets every block of messages before `seq`, with their queued repair.
    pub fn retire_before(&mut self, seq: u64) {
        self.blocks.retain(|block, _| block.seq >= seq);
        self.queue.retain(|symbol| symbol.block.seq >= seq);
    }

    /// The next unused ESI of `block`, if registered.
    pub fn next_esi(&self, block: &BlockKey) -> Option<u32> {
        self.blocks.get(block).map(|state| state.next_esi)
    }

    /// A NACK arrived.
    pub fn handle_nack(&mut self, now: Instant, nack: &IncomingNack) -> NackDisposition {
        let cap = self.config.max_repair_per_round;
        let hold_off = self.config.hold_off;
        let Some(state) = self.blocks.get_mut(&nack.block) else {
            self.stats.ignored += 1;
            return NackDisposition::Ignored;
        };
        if nack.need == 0 || state.answered == u8::MAX {
            self.stats.ignored += 1;
            return NackDisposition::Ignored;
        }
        self.stats.nacks += 1;
        let (floor, ceiling) = state.bounds.unwrap_or((1, cap));
        let ceiling = ceiling.min(cap);
        if state.pending.is_none() && nack.round <= state.answered {
            if let Some((round, count, at)) = state.last {
                if now.saturating_duration_since(at) < self.top_up_window {
                    // The round was answered a moment ago: this NACK left before the
                    // advertisement reached its sender. It joins the order.
                    let wanted = nack.need.min(ceiling.max(count));
                    if wanted > count {
                        let extra = wanted - count;
                        let room = (MAX_ESI + 1).saturating_sub(state.next_esi);
                        let extra = extra.min(u16::try_from(room).unwrap_or(u16::MAX));
                        if extra > 0 {
                            let first_esi = state.next_esi;
                            state.next_esi = first_esi.saturating_add(u32::from(extra));
                            state.last = Some((round, count + extra, at));
                            for i in 0..extra {
                                self.queue.push_back(RepairSymbol {
                                    block: nack.block,
                                    round,
                                    esi: first_esi + u32::from(i),
                                    last_of_order: i + 1 == extra,
                                });
                            }
                            self.orders.push_back(RepairOrder {
                                block: nack.block,
                                round,
                                first_esi,
                                count: extra,
                                max_need: nack.need,
                                nacks: 1,
                                top_up: true,
                            });
                            self.stats.symbols_ordered += u64::from(extra);
                            self.stats.top_ups += 1;
                            if self.config.advertise {
                                self.advertisements.push_back(Advertisement {
                                    block: nack.block,
                                    round,
                                    count: count + extra,
                                });
                                self.stats.advertisements += 1;
                            }
                        }
                    }
                    self.stats.joined += 1;
                    return NackDisposition::Aggregated;
                }
            }
        }
        let need = nack.need.clamp(floor, ceiling.max(floor));
        let opening = state.pending.is_none();
        let need = if opening {
            need.max(nack.need.min(cap))
        } else {
            need
        };
        let folded = nack.round <= state.answered;
        let disposition = match state.pending.as_mut() {
            Some(pending) => {
                pending.max_need = pending.max_need.max(nack.need);
                pending.nacks += 1;
                if self.config.advertise && need > pending.advertised {
                    pending.advertised = need;
                    self.advertisements.push_back(Advertisement {
                        block: nack.block,
                        round: pending.round,
                        count: need,
                    });
                    self.stats.advertisements += 1;
                }
                NackDisposition::Aggregated
            }
            None => {
                let round = state.answered + 1;
                state.pending = Some(Pending {
                    round,
                    first_need: nack.need,
                    max_need: nack.need,
                    advertised: if self.config.advertise { need } else { 0 },
                    deadline: now + hold_off,
                    nacks: 1,
                });
                if self.config.advertise {
                    self.advertisements.push_back(Advertisement {
                        block: nack.block,
                        round,
                        count: need,
                    });
                    self.stats.advertisements += 1;
                }
                NackDisposition::Opened
            }
        };
        if hold_off.is_zero() {
            self.close_due(now);
        }
        if folded {
            self.stats.folded += 1;
            return NackDisposition::Folded;
        }
        disposition
    }

    /// Closes the hold-off windows that are due and queues their repair.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.refill(now);
        self.close_due(now);
    }

    fn close_due(&mut self, now: Instant) {
        let cap = self.config.max_repair_per_round;
        for (block, state) in self.blocks.iter_mut() {
            let Some(pending) = state.pending else {
                continue;
            };
            if pending.deadline > now {
                continue;
            }
            state.pending = None;
            state.answered = pending.round;
            let (floor, ceiling) = state.bounds.unwrap_or((1, cap));
            let ceiling = ceiling.min(cap);
            let room = (MAX_ESI + 1).saturating_sub(state.next_esi);
            // The NACK that opened the round is served in full (it may be the only member
            // in need); larger needs of the same window only up to the ceiling.
            let ceiling = ceiling.max(pending.first_need.min(cap));
            let count = pending
                .max_need
                .clamp(floor.min(ceiling), ceiling)
                .min(u16::try_from(room).unwrap_or(u16::MAX));
            if count == 0 {
                continue;
            }
            let first_esi = state.next_esi;
            state.next_esi = first_esi.saturating_add(u32::from(count));
            state.last = Some((pending.round, count, now));
            for i in 0..count {
                self.queue.push_back(RepairSymbol {
                    block: *block,
                    round: pending.round,
                    esi: first_esi + u32::from(i),
                    last_of_order: i + 1 == count,
                });
            }
            self.orders.push_back(RepairOrder {
                block: *block,
                round: pending.round,
                first_esi,
                count,
                max_need: pending.max_need,
                nacks: pending.nacks,
                top_up: false,
            });
            self.stats.orders += 1;
            self.stats.symbols_ordered += u64::from(count);
        }
    }

    /// The next deadline: a hold-off window closing, or the next pacing token when repair is
    /// queued.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let windows = self
            .blocks
            .values()
            .filter_map(|state| state.pending.map(|pending| pending.deadline))
            .min();
        let token = if self.queue.is_empty() || self.tokens >= 1.0 - TOKEN_EPSILON {
            self.refilled_at.filter(|_| !self.queue.is_empty())
        } else {
            // Rounded up by a nanosecond: at a deadline truncated to whole nanoseconds the
            // bucket could hold a hair less than one token, and a driver would spin on it.
            self.refilled_at.map(|at| {
                at + Duration::from_secs_f64((1.0 - self.tokens) / self.config.repair_rate)
                    + Duration::from_nanos(1)
            })
        };
        match (windows, token) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next immediate repair advertisement to multicast.
    #[must_use]
    pub fn poll_advertisement(&mut self) -> Option<Advertisement> {
        self.advertisements.pop_front()
    }

    /// The next repair order (for the heartbeat's repair entries).
    #[must_use]
    pub fn poll_order(&mut self) -> Option<RepairOrder> {
        self.orders.pop_front()
    }

    /// The next repair symbol to send now, if one is queued and the token bucket allows.
    #[must_use]
    pub fn poll_repair(&mut self, now: Instant) -> Option<RepairSymbol> {
        self.refill(now);
        if self.queue.is_empty() || self.tokens < 1.0 - TOKEN_EPSILON {
            return None;
        }
        self.tokens = (self.tokens - 1.0).max(0.0);
        self.queue.pop_front()
    }

    /// Repair symbols queued and not yet sent.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    fn refill(&mut self, now: Instant) {
        let depth = f64::from(self.config.bucket_depth);
        if let Some(at) = self.refilled_at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.config.repair_rate).min(depth);
        }
        if self.refilled_at.map_or(true, |at| now > at) {
            self.refilled_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ObjectId;

    fn block(sbn: u8) -> BlockKey {
        BlockKey {
            seq: 1,
            object: ObjectId::Chunks,
            sbn,
        }
    }

    fn aggregator(cap: u16) -> RepairAggregator {
        RepairAggregator::new(AggregatorConfig {
            hold_off: Duration::from_millis(100),
            max_repair_per_round: cap,
            repair_rate: 1000.0,
            bucket_depth: 4,
            advertise: true,
        })
        .unwrap()
    }

    fn nack(sbn: u8, round: u8, need: u16) -> IncomingNack {
        IncomingNack {
            block: block(sbn),
            round,
            need,
        }
    }

    fn drain(a: &mut RepairAggregator, until: Instant) -> Vec<(Instant, RepairSymbol)> {
        let mut out = Vec::new();
        while let Some(at) = a.poll_timeout().filter(|&at| at <= until) {
            a.handle_timeout(at);
            while let Some(symbol) = a.poll_repair(at) {
                out.push((at, symbol));
            }
        }
        out
    }

    #[test]
    fn many_nacks_one_order_of_max_need_with_fresh_esis() {
        let t0 = Instant::now();
        let mut a = aggregator(64);
        a.register_block(block(0), 40);
        assert_eq!(a.handle_nack(t0, &nack(0, 1, 3)), NackDisposition::Opened);
        for need in [1, 5, 2, 5, 4] {
            assert_eq!(
                a.handle_nack(t0, &nack(0, 1, need)),
                NackDisposition::Aggregated
            );
        }
        // Advertisements only when the largest need grows: 3, then 5.
        let ads: Vec<u16> = std::iter::from_fn(|| a.poll_advertisement())
            .map(|ad| ad.count)
            .collect();
        assert_eq!(ads, vec![3, 5]);
        let symbols = drain(&mut a, t0 + Duration::from_secs(1));
        let esis: Vec<u32> = symbols.iter().map(|(_, s)| s.esi).collect();
        assert_eq!(esis, vec![40, 41, 42, 43, 44]);
        assert!(symbols[4].1.last_of_order);
        let order = a.poll_order().unwrap();
        assert_eq!((order.round, order.count, order.nacks), (1, 5, 6));
        assert_eq!(a.poll_order(), None);
        // Paced: 4 at once (bucket depth), the fifth a millisecond later.
        assert_eq!(symbols[3].0, t0 + Duration::from_millis(100));
        assert!(symbols[4].0 >= t0 + Duration::from_millis(101));
        assert!(symbols[4].0 <= t0 + Duration::from_millis(101) + Duration::from_micros(1));
        assert_eq!(a.next_esi(&block(0)), Some(45));
    }

    #[test]
    fn late_nacks_fold_into_the_next_round_and_cap_holds() {
        let t0 = Instant::now();
        let mut a = aggregator(8);
        a.register_block(block(0), 10);
        let _ = a.handle_nack(t0, &nack(0, 1, 20));
        let first = drain(&mut a, t0 + Duration::from_secs(1));
        assert_eq!(first.len(), 8);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(a.handle_nack(t1, &nack(0, 1, 2)), NackDisposition::Folded);
        let second = drain(&mut a, t1 + Duration::from_secs(1));
        assert_eq!(second.len(), 2);
        assert!(second.iter().all(|(_, s)| s.round == 2 && s.esi >= 18));
        assert_eq!(a.stats().folded, 1);
    }

    #[test]
    fn unknown_retired_and_empty_nacks_are_ignored() {
        let t0 = Instant::now();
        let mut a = aggregator(8);
        assert_eq!(a.handle_nack(t0, &nack(0, 1, 2)), NackDisposition::Ignored);
        a.register_block(block(0), 10);
        assert_eq!(a.handle_nack(t0, &nack(0, 1, 0)), NackDisposition::Ignored);
        let _ = a.handle_nack(t0, &nack(0, 1, 2));
        a.retire_before(2);
        assert!(drain(&mut a, t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(a.stats().ignored, 2);
    }

    /// Regression: found by the bench (G = 1000, bursty loss, message 24): at the pacing
    /// deadline the bucket held 0.99999... tokens, `poll_repair` returned nothing and
    /// `poll_timeout` returned the same instant forever.
    #[test]
    fn pacing_deadline_always_makes_progress() {
        for (rate, offset_ns) in [(20_000.0, 973_466_491u64), (3.0, 1), (7_777.7, 123_456_789)] {
            let t0 = Instant::now() + Duration::from_nanos(offset_ns);
            let mut a = RepairAggregator::new(AggregatorConfig {
                hold_off: Duration::from_nanos(offset_ns % 1_000_003),
                max_repair_per_round: 64,
                repair_rate: rate,
                bucket_depth: 1,
                advertise: false,
            })
            .unwrap();
            a.register_block(block(0), 0);
            let _ = a.handle_nack(t0, &nack(0, 1, 64));
            let mut sent = 0;
            let mut now = t0;
            for _ in 0..1000 {
                let Some(at) = a.poll_timeout() else { break };
                now = now.max(at);
                a.handle_timeout(now);
                let before = sent;
                while a.poll_repair(now).is_some() {
                    sent += 1;
                }
                let next = a.poll_timeout();
                assert!(
                    sent > before || next.map_or(true, |n| n > now),
                    "spin at {now:?}"
                );
            }
            assert_eq!(sent, 64);
        }
    }

    #[test]
    fn esi_space_is_never_exceeded() {
        let t0 = Instant::now();
        let mut a = aggregator(64);
        a.register_block(block(0), MAX_ESI - 2);
        let _ = a.handle_nack(t0, &nack(0, 1, 10));
        let symbols = drain(&mut a, t0 + Duration::from_secs(1));
        assert_eq!(symbols.len(), 3);
        assert_eq!(symbols[2].1.esi, MAX_ESI);
        let t1 = t0 + Duration::from_secs(2);
        let _ = a.handle_nack(t1, &nack(0, 2, 10));
        assert!(drain(&mut a, t1 + Duration::from_secs(1)).is_empty());
    }
}
