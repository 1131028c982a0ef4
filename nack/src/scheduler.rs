//! The receiver side: when to NACK which block, and when to give up.
//!
//! [`NackScheduler`] keeps one state machine per incomplete block:
//!
//! ```text
//!  Idle --expected complete, need > 0--> Backoff --timer fires--> NACK sent --> Waiting
//!                                          |                                     |
//!                heard NACK / advertisement with count >= need (suppressed) --> Waiting
//!  Waiting --repair round ended (or timed out), need > 0--> Backoff of the next round
//!  any --need 0 (decoded)--> Done;   R rounds failed --> OutOfSync (the resync takes over)
//! ```
//!
//! Of the R rounds of a chunk block, the first [`SchedulerConfig::multicast_rounds`] ask for
//! multicast repair; the later ones ask for the receiver's own chunk by unicast
//! ([`Nack::unicast_chunk`]): by then the few members still missing their chunk are better
//! served one datagram each than by another round for the whole group (limited unicast
//! recovery). A chunk request is never suppressed (each member needs its own chunk) and is
//! sent after a short random delay (up to one GRTT) that spreads the requests of a burst.
//!
//! A multicast NACK whose timer fires while the sender is answering the same round with
//! fewer symbols than this receiver needs is held back once, for one GRTT: another member
//! needing more has most likely NACKed already, and the sender's top-up advertisement, which
//! suppresses this one, is about a round trip away.
//!
//! The backoff is drawn from the truncated exponential distribution over `[0, K * GRTT]` with
//! parameter `ln(G) + 1` (RFC 5740 5.5.2; the group size is exact here, since the GCKS knows
//! and advertises it). The scheduler does not own a socket: the embedding layer routes each
//! [`Nack`] to the sender (unicast mode, the default) or to the group (multicast mode).
//!
//! It must not decide anything about keys or decoding: it is told how many symbols a block
//! still needs and when all symbols sent so far should have arrived.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{backoff, duration_us, BlockKey, ConfigError, FeedbackMode, ProbeEcho};

/// Configuration of a [`NackScheduler`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// This receiver's id (its leaf id), carried in its NACKs.
    pub receiver_id: u32,
    /// Group size until a heartbeat advertises one.
    pub group_size: u32,
    /// Backoff factor K until a heartbeat advertises one: the backoff window is `K * GRTT`.
    pub backoff_factor: u8,
    /// GRTT until a heartbeat advertises one.
    #[serde(rename = "grtt_ms", with = "crate::duration_ms")]
    pub grtt: Duration,
    /// R: NACK rounds for a block without success before [`Event::OutOfSync`]. The default,
    /// 6, is two multicast rounds and then four chunk requests: a request and its answer
    /// both cross a lossy link, so at 20% loss each fails with probability 0.36, and four
    /// leave 1.7% of the few members that got that far to a resync (two would leave 13%).
    pub max_rounds: u8,
    /// Of those, the rounds that ask for multicast repair of a chunk block; the later ones ask
    /// for the receiver's own chunk by unicast ([`Nack::unicast_chunk`]). At least
    /// `max_rounds` means never by unicast. Manifest blocks always ask for multicast repair.
    pub multicast_rounds: u8,
    /// How long, in GRTTs, to wait for the repair of a round after sending (or being
    /// suppressed from sending) its NACK before the round counts as failed. Arriving repair
    /// symbols extend the wait.
    pub repair_wait_grtt: f64,
    /// Where NACKs go; copied into every [`Nack`].
    pub feedback: FeedbackMode,
    /// Expected number of probe replies across the whole group per heartbeat that asks for
    /// them; each receiver with nothing to NACK replies with probability
    /// `min(1, this / group size)`.
    pub probe_replies_per_probe: f64,
    /// Seed of the scheduler's random number generator.
    pub seed: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            receiver_id: 0,
            group_size: 1,
            backoff_factor: 4,
            grtt: Duration::from_millis(100),
            max_rounds: 6,
            multicast_rounds: 2,
            repair_wait_grtt: 3.0,
            feedback: FeedbackMode::Unicast,
            probe_replies_per_probe: 4.0,
            seed: 0,
        }
    }
}

impl SchedulerConfig {
    /// Checks the ranges of every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backoff_factor == 0 {
            return Err(invalid("backoff_factor", "must be at least 1"));
        }
        if self.max_rounds == 0 {
            return Err(invalid("max_rounds", "must be at least 1"));
        }
        if !(self.repair_wait_grtt.is_finite() && self.repair_wait_grtt > 0.0) {
            return Err(invalid("repair_wait_grtt", "must be positive and finite"));
        }
        if !(self.probe_replies_per_probe.is_finite() && self.probe_replies_per_probe >= 0.0) {
            return Err(invalid(
                "probe_replies_per_probe",
                "must be >= 0 and finite",
            ));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: &'static str) -> ConfigError {
    ConfigError::Invalid { field, reason }
}

/// A NACK to send: maps 1:1 to the wire's `NackRepr` (with the block's sequence number in the
/// datagram header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nack {
    /// The block to repair.
    pub block: BlockKey,
    /// The repair round this NACK asks for (1 for the first round after the initial
    /// transmission).
    pub round: u8,
    /// Symbols this receiver still needs (at least 1).
    pub need: u16,
    /// The receiver's id.
    pub receiver_id: u32,
    /// The latest GRTT probe with its hold time, if a probe was heard.
    pub echo: Option<ProbeEcho>,
    /// Where to send it.
    pub destination: FeedbackMode,
    /// Whether it asks for the receiver's own chunk by unicast instead of multicast repair
    /// (always sent to the sender, never suppressed).
    pub unicast_chunk: bool,
}

/// Something the embedding layer must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// A block of message `seq` stayed incomplete for `max_rounds` NACK rounds: the receiver
    /// is out of sync for that message and must resync. Emitted once per message; the
    /// scheduler stops NACKing for every block of it.
    OutOfSync {
        /// The message.
        seq: u64,
        /// The block that ran out of rounds.
        block: BlockKey,
    },
}

/// The feedback fields of a heartbeat (the wire's `HeartbeatRepr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeartbeatInfo {
    /// The advertised GRTT.
    pub grtt: Duration,
    /// The exact group size.
    pub group_size: u32,
    /// The backoff factor K (0 is treated as 1).
    pub backoff_factor: u8,
    /// The GRTT probe timestamp, microseconds of the sender's clock.
    pub probe_timestamp_us: u64,
    /// Whether receivers with nothing to NACK are asked for probe replies.
    pub probe_reply_requested: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Tracked (something was heard) but not yet expected complete.
    Idle,
    /// A NACK for `round` fires at `at` unless suppressed first.
    Backoff { at: Instant, round: u8 },
    /// The NACK of `round` was sent or suppressed; repair is awaited until `until`.
    Waiting { round: u8, until: Instant },
    /// Decoded.
    Done,
    /// Ran out of rounds, or another block of the message did.
    OutOfSync,
}

#[derive(Debug, Clone)]
struct BlockState {
    /// Symbols still needed; `None` until the embedding says.
    need: Option<u16>,
    phase: Phase,
    /// NACK rounds entered so far (0 before the first).
    rounds: u8,
    /// The highest repair round known to have been answered (0: the initial transmission).
    answered: u8,
    /// The highest round heard in a NACK or advertisement, and the largest need heard in it.
    heard: Option<(u8, u16)>,
    /// The last round whose NACK was held back one GRTT for a raised count (0: none).
    deferred: u8,
}

impl BlockState {
    fn new() -> Self {
        Self {
            need: None,
            phase: Phase::Idle,
            rounds: 0,
            answered: 0,
            heard: None,
            deferred: 0,
        }
    }

    /// Whether a NACK for `round` asking for `need` is covered by what was heard; returns the
    /// round to wait for.
    fn suppressed(&self, round: u8, need: u16) -> Option<u8> {
        match self.heard {
            Some((heard_round, heard_need)) if heard_round >= round && heard_need >= need => {
                Some(heard_round)
            }
            _ => None,
        }
    }
}

/// The receiver-side NACK state machine for all blocks a receiver is waiting for.
///
/// Method kinds and call order (as in quinn-proto's `Connection`):
///
/// 1. Inputs: [`handle_heartbeat`](Self::handle_heartbeat) for every heartbeat;
///    [`handle_expected_complete`](Self::handle_expected_complete) when all symbols sent so
///    far for a block (the initial transmission, or a repair round) should have arrived;
///    [`handle_need`](Self::handle_need) / [`handle_decoded`](Self::handle_decoded) as
///    symbols arrive; [`handle_nack_heard`](Self::handle_nack_heard) and
///    [`handle_repair_advertisement`](Self::handle_repair_advertisement) for suppression;
///    [`handle_timeout`](Self::handle_timeout) when the deadline of
///    [`poll_timeout`](Self::poll_timeout) passes.
/// 2. After any input, drain [`poll_nack`](Self::poll_nack),
///    [`poll_probe_reply`](Self::poll_probe_reply) and [`poll_event`](Self::poll_event), then
///    re-read [`poll_timeout`](Self::poll_timeout).
#[derive(Debug)]
pub struct NackScheduler {
    config: SchedulerConfig,
    rng: ChaCha8Rng,
    group_size: u32,
    backoff_factor: u8,
    grtt: Duration,
    blocks: BTreeMap<BlockKey, BlockState>,
    out_of_sync: BTreeSet<u64>,
    probe: Option<(u64, Instant)>,
    probe_reply_at: Option<Instant>,
    nacks: VecDeque<Nack>,
    probe_replies: VecDeque<ProbeEcho>,
    events: VecDeque<Event>,
}

impl NackScheduler {
    /// A scheduler with no blocks; fails on an invalid configuration.
    pub fn new(config: SchedulerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            group_size: config.group_size,
            backoff_factor: config.backoff_factor,
            grtt: config.grtt,
            config,
            blocks: BTreeMap::new(),
            out_of_sync: BTreeSet::new(),
            probe: None,
            probe_reply_at: None,
            nacks: VecDeque::new(),
            probe_replies: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The current backoff window, `K * GRTT`.
    pub fn backoff_window(&self) -> Duration {
        self.grtt.saturating_mul(u32::from(self.backoff_factor))
    }

    /// NACK rounds entered so far for `block` (0 before its first), if it is tracked.
    pub fn rounds(&self, block: &BlockKey) -> Option<u8> {
        self.blocks.get(block).map(|state| state.rounds)
    }

    /// Whether a NACK for `block` is currently scheduled.
    pub fn is_backing_off(&self, block: &BlockKey) -> bool {
        matches!(
            self.blocks.get(block).map(|state| state.phase),
            Some(Phase::Backoff { .. })
        )
    }

    /// Number of tracked blocks.
    pub fn tracked_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// A heartbeat arrived: adopt its GRTT, group size and backoff factor, remember its probe
    /// for echoing, and maybe schedule a probe reply.
    pub fn handle_heartbeat(&mut self, now: Instant, heartbeat: &HeartbeatInfo) {
        self.grtt = heartbeat.grtt;
        self.group_size = heartbeat.group_size.max(1);
        self.backoff_factor = heartbeat.backoff_factor.max(1);
        self.probe = Some((heartbeat.probe_timestamp_us, now));
        self.probe_reply_at = None;
        if heartbeat.probe_reply_requested && !self.any_backoff() {
            let probability =
                (self.config.probe_replies_per_probe / f64::from(self.group_size)).min(1.0);
            if self.rng.gen_bool(probability) {
                let delay = self.backoff_window().mul_f64(self.rng.gen::<f64>());
                self.probe_reply_at = Some(now + delay);
            }
        }
    }

    /// All symbols sent so far for `block` up to repair round `round_ended` (0: the initial
    /// transmission) should have arrived, and the block still needs `need` symbols. Starts
    /// the block's first NACK round, or ends a round that repair did not complete.
    pub fn handle_expected_complete(
        &mut self,
        now: Instant,
        block: BlockKey,
        round_ended: u8,
        need: u16,
    ) {
        if self.out_of_sync.contains(&block.seq) {
            return;
        }
        let state = self.blocks.entry(block).or_insert_with(BlockState::new);
        state.answered = state.answered.max(round_ended);
        state.need = Some(need);
        if need == 0 {
            state.phase = Phase::Done;
            return;
        }
        match state.phase {
            Phase::Idle => self.start_round(now, block),
            Phase::Waiting { round, .. } if round_ended >= round => self.start_round(now, block),
            Phase::Backoff { .. } | Phase::Waiting { .. } | Phase::Done | Phase::OutOfSync => {}
        }
    }

    /// The block now needs `need` symbols (0: decoded). Progress extends the wait for repair.
    pub fn handle_need(&mut self, now: Instant, block: BlockKey, need: u16) {
        let wait = self.repair_wait();
        let Some(state) = self.blocks.get_mut(&block) else {
            return;
        };
        let progress = state.need.map_or(true, |old| need < old);
        state.need = Some(need);
        if need == 0 {
            if state.phase != Phase::OutOfSync {
                state.phase = Phase::Done;
            }
            return;
        }
        if let Phase::Waiting { round, .. } = state.phase {
            if progress {
                state.phase = Phase::Waiting {
                    round,
                    until: now + wait,
                };
            }
        }
    }

    /// The block decoded: cancel its NACK.
    pub fn handle_decoded(&mut self, now: Instant, block: BlockKey) {
        self.handle_need(now, block, 0);
    }

    /// Another receiver's NACK for `block` in `round` asking for `need` was heard (multicast
    /// feedback mode).
    pub fn handle_nack_heard(&mut self, now: Instant, block: BlockKey, round: u8, need: u16) {
        self.hear(now, block, round, need);
    }

    /// The sender advertised that it will send `count` repair symbols for `block` in `round`
    /// (an immediate advertisement, or a heartbeat's repair entry).
    pub fn handle_repair_advertisement(
        &mut self,
        now: Instant,
        block: BlockKey,
        round: u8,
        count: u16,
    ) {
        if let Some(state) = self.blocks.get_mut(&block) {
            // The sender aggregates round `round`, so every earlier round was answered.
            state.answered = state.answered.max(round.saturating_sub(1));
        }
        self.hear(now, block, round, count);
    }

    /// Drops all state of messages before `seq`.
    pub fn retire_before(&mut self, seq: u64) {
        self.blocks.retain(|block, _| block.seq >= seq);
        self.out_of_sync.retain(|&s| s >= seq);
    }

    /// Fires due NACK timers and ends rounds whose repair did not come in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<BlockKey> = self
            .blocks
            .iter()
            .filter(|(_, state)| match state.phase {
                Phase::Backoff { at, .. } => at <= now,
                Phase::Waiting { until, .. } => until <= now,
                Phase::Idle | Phase::Done | Phase::OutOfSync => false,
            })
            .map(|(block, _)| *block)
            .collect();
        for block in due {
            self.fire(now, block);
        }
        if let Some(at) = self.probe_reply_at {
            if at <= now {
                self.probe_reply_at = None;
                if let Some(echo) = self.echo(now) {
                    self.probe_replies.push_back(echo);
                }
            }
        }
    }

    /// The next deadline, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let blocks = self
            .blocks
            .values()
            .filter_map(|state| match state.phase {
                Phase::Backoff { at, .. } => Some(at),
                Phase::Waiting { until, .. } => Some(until),
                Phase::Idle | Phase::Done | Phase::OutOfSync => None,
            })
            .min();
        match (blocks, self.probe_reply_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next NACK to send.
    #[must_use]
    pub fn poll_nack(&mut self) -> Option<Nack> {
        self.nacks.pop_front()
    }

    /// The next probe reply to send (to the sender).
    #[must_use]
    pub fn poll_probe_reply(&mut self) -> Option<ProbeEcho> {
        self.probe_replies.pop_front()
    }

    /// The next event for the embedding layer.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn any_backoff(&self) -> bool {
        self.blocks
            .values()
            .any(|state| matches!(state.phase, Phase::Backoff { .. }))
    }

    fn repair_wait(&self) -> Duration {
        self.grtt.mul_f64(self.config.repair_wait_grtt)
    }

    fn echo(&self, now: Instant) -> Option<ProbeEcho> {
        self.probe.map(|(timestamp_us, received)| ProbeEcho {
            timestamp_us,
            hold_us: u32::try_from(duration_us(now.saturating_duration_since(received)))
                .unwrap_or(u32::MAX),
        })
    }

    /// Enters the next NACK round of `block`, or gives up after `max_rounds`.
    fn start_round(&mut self, now: Instant, block: BlockKey) {
        let wait = self.repair_wait();
        let window = self.backoff_window();
        let group_size = self.group_size;
        let max_rounds = self.config.max_rounds;
        let unit: f64 = self.rng.gen();
        let Some(state) = self.blocks.get_mut(&block) else {
            return;
        };
        let need = state.need.unwrap_or(0);
        if need == 0 {
            state.phase = Phase::Done;
            return;
        }
        if state.rounds >= max_rounds {
            self.mark_out_of_sync(block);
            return;
        }
        state.rounds += 1;
        let round = state.answered.saturating_add(1);
        if block.object == crate::ObjectId::Chunks && state.rounds > self.config.multicast_rounds {
            state.phase = Phase::Backoff {
                at: now + self.grtt.mul_f64(unit),
                round,
            };
            return;
        }
        state.phase = match state.suppressed(round, need) {
            Some(heard_round) => Phase::Waiting {
                round: heard_round,
                until: now + wait,
            },
            None => Phase::Backoff {
                at: now + backoff::truncated_exponential(unit, window, group_size),
                round,
            },
        };
    }

    fn fire(&mut self, now: Instant, block: BlockKey) {
        let wait = self.repair_wait();
        let grtt = self.grtt;
        let echo = self.echo(now);
        let Some(state) = self.blocks.get_mut(&block) else {
            return;
        };
        match state.phase {
            Phase::Backoff { round, .. } => {
                let round = round.max(state.answered.saturating_add(1));
                let need = state.need.unwrap_or(0);
                let unicast_chunk = block.object == crate::ObjectId::Chunks
                    && state.rounds > self.config.multicast_rounds;
                if unicast_chunk {
                    state.phase = Phase::Waiting {
                        round,
                        until: now + wait,
                    };
                    self.nacks.push_back(Nack {
                        block,
                        round,
                        need,
                        receiver_id: self.config.receiver_id,
                        echo,
                        destination: FeedbackMode::Unicast,
                        unicast_chunk: true,
                    });
                    return;
                }
                if let Some(heard_round) = state.suppressed(round, need) {
                    state.phase = Phase::Waiting {
                        round: heard_round,
                        until: now + wait,
                    };
                    return;
                }
                if state.deferred != round
                    && state
                        .heard
                        .is_some_and(|(heard_round, _)| heard_round == round)
                {
                    // The round is being answered, with less than this receiver needs. A
                    // NACK from another member needing more is likely on its way and will
                    // raise the count (a top-up) within about a round trip: wait one GRTT
                    // for it instead of adding another NACK to the same request. This keeps
                    // the NACKs of receivers needing more than the advertised count to about
                    // one per GRTT of the backoff window, whatever the group size.
                    state.deferred = round;
                    state.phase = Phase::Backoff {
                        at: now + grtt,
                        round,
                    };
                    return;
                }
                state.phase = Phase::Waiting {
                    round,
                    until: now + wait,
                };
                self.nacks.push_back(Nack {
                    block,
                    round,
                    need,
                    receiver_id: self.config.receiver_id,
                    echo,
                    destination: self.config.feedback,
                    unicast_chunk: false,
                });
                if echo.is_some() {
                    // The NACK carries the echo, so a separate probe reply is redundant.
                    self.probe_reply_at = None;
                }
            }
            Phase::Waiting { round, .. } => {
                // The repair wait of `round` is over. If the sender was heard answering it (an
                // advertisement or another receiver's NACK for it), whatever answered it has
                // arrived, so the round is answered: without this the advertisement would
                // suppress this receiver's NACK for the next round too, and it would run out of
                // rounds without asking again. Unheard, the round is asked for again.
                if state
                    .heard
                    .is_some_and(|(heard_round, _)| heard_round >= round)
                {
                    state.answered = state.answered.max(round);
                }
                self.start_round(now, block);
            }
            Phase::Idle | Phase::Done | Phase::OutOfSync => {}
        }
    }

    fn hear(&mut self, now: Instant, block: BlockKey, round: u8, need: u16) {
        if need == 0 || self.out_of_sync.contains(&block.seq) {
            return;
        }
        let wait = self.repair_wait();
        let state = self.blocks.entry(block).or_insert_with(BlockState::new);
        state.heard = match state.heard {
            Some((r, n)) if r > round => Some((r, n)),
            Some((r, n)) if r == round => Some((r, n.max(need))),
            _ => Some((round, need)),
        };
        let own_need = state.need.unwrap_or(0);
        let unicast_round =
            block.object == crate::ObjectId::Chunks && state.rounds > self.config.multicast_rounds;
        match state.phase {
            Phase::Backoff { .. } if unicast_round => {}
            Phase::Backoff { round: own, .. } => {
                if let Some(heard_round) = state.suppressed(own, own_need) {
                    state.phase = Phase::Waiting {
                        round: heard_round,
                        until: now + wait,
                    };
                }
            }
            Phase::Waiting { round: own, .. } if round > own && need >= own_need => {
                // The sender moved on to a later round that covers this receiver.
                state.phase = Phase::Waiting {
                    round,
                    until: now + wait,
                };
            }
            Phase::Idle | Phase::Waiting { .. } | Phase::Done | Phase::OutOfSync => {}
        }
    }

    fn mark_out_of_sync(&mut self, block: BlockKey) {
        for (key, state) in self.blocks.iter_mut() {
            if key.seq == block.seq {
                state.phase = Phase::OutOfSync;
            }
        }
        if self.out_of_sync.insert(block.seq) {
            self.events.push_back(Event::OutOfSync {
                seq: block.seq,
                block,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ObjectId;

    const GRTT: Duration = Duration::from_millis(100);

    fn block(sbn: u8) -> BlockKey {
        BlockKey {
            seq: 7,
            object: ObjectId::Chunks,
            sbn,
        }
    }

    fn scheduler(seed: u64, group_size: u32) -> NackScheduler {
        NackScheduler::new(SchedulerConfig {
            receiver_id: 42,
            group_size,
            backoff_factor: 4,
            grtt: GRTT,
            max_rounds: 3,
            // These tests are about multicast rounds and their timing.
            multicast_rounds: 3,
            repair_wait_grtt: 6.0,
            seed,
            ..SchedulerConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn after_the_multicast_rounds_a_member_asks_for_its_chunk_unsuppressed() {
        let config = SchedulerConfig {
            receiver_id: 9,
            group_size: 1000,
            grtt: GRTT,
            max_rounds: 4,
            multicast_rounds: 2,
            feedback: FeedbackMode::Multicast,
            seed: 5,
            ..SchedulerConfig::default()
        };
        let mut s = NackScheduler::new(config.clone()).unwrap();
        let t0 = Instant::now();
        s.handle_expected_complete(t0, block(0), 0, 3);
        let kinds: Vec<(bool, FeedbackMode)> = drive(&mut s, t0 + 100 * GRTT)
            .iter()
            .map(|(_, n)| (n.unicast_chunk, n.destination))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (false, FeedbackMode::Multicast),
                (false, FeedbackMode::Multicast),
                (true, FeedbackMode::Unicast),
                (true, FeedbackMode::Unicast),
            ]
        );
        assert!(matches!(s.poll_event(), Some(Event::OutOfSync { .. })));
        // A chunk request is not suppressed by what the receiver hears, and leaves within a
        // GRTT.
        let mut s = NackScheduler::new(SchedulerConfig {
            multicast_rounds: 0,
            ..config
        })
        .unwrap();
        s.handle_expected_complete(t0, block(0), 0, 3);
        s.handle_repair_advertisement(t0, block(0), 1, 10);
        s.handle_nack_heard(t0, block(0), 1, 10);
        let nacks = drive(&mut s, t0 + GRTT);
        assert_eq!(nacks.len(), 1);
        assert!(nacks[0].1.unicast_chunk);
        // A manifest block never asks by unicast.
        let manifest = BlockKey {
            object: crate::ObjectId::Manifest,
            ..block(0)
        };
        let mut m = NackScheduler::new(SchedulerConfig {
            multicast_rounds: 0,
            ..SchedulerConfig::default()
        })
        .unwrap();
        m.handle_expected_complete(t0, manifest, 0, 1);
        let nacks = drive(&mut m, t0 + 100 * GRTT);
        assert!(nacks.iter().all(|(_, n)| !n.unicast_chunk));
    }

    /// By default a member gets two multicast rounds and then four chunk requests before it
    /// gives up: a request and its answer each cross a lossy link, and with two requests 13%
    /// of the members that got that far at 20% loss resynced (0.25% of all member-messages
    /// in the 1,000-member bench row, against a goal of 0.1%).
    #[test]
    fn by_default_four_chunk_requests_before_out_of_sync() {
        let mut s = NackScheduler::new(SchedulerConfig {
            group_size: 1000,
            grtt: GRTT,
            seed: 11,
            ..SchedulerConfig::default()
        })
        .unwrap();
        let t0 = Instant::now();
        s.handle_expected_complete(t0, block(0), 0, 1);
        let nacks = drive(&mut s, t0 + 1000 * GRTT);
        let requests = nacks.iter().filter(|(_, n)| n.unicast_chunk).count();
        assert_eq!((nacks.len() - requests, requests), (2, 4), "{nacks:?}");
        assert!(matches!(s.poll_event(), Some(Event::OutOfSync { .. })));
    }

    /// Runs the scheduler's timers up to `until`, collecting NACKs.
    fn drive(s: &mut NackScheduler, until: Instant) -> Vec<(Instant, Nack)> {
        let mut out = Vec::new();
        while let Some(at) = s.poll_timeout().filter(|&at| at <= until) {
            s.handle_timeout(at);
            while let Some(nack) = s.poll_nack() {
                out.push((at, nack));
            }
        }
        out
    }

    /// Regression (found by the rekey scenario at 20% loss): a receiver suppressed in round 1
    /// by the sender's advertisement, whose repair did not complete it, must NACK in round 2
    /// rather than stay suppressed by the old advertisement until it runs out of rounds.
    #[test]
    fn an_answered_round_does_not_suppress_the_next() {
        let mut s = scheduler(3, 100);
        let t0 = Instant::now();
        s.handle_expected_complete(t0, block(0), 0, 1);
        // The sender advertises round 1 with 3 symbols before this receiver's timer fires.
        s.handle_repair_advertisement(t0, block(0), 1, 3);
        assert!(
            drive(&mut s, t0 + GRTT * 4).is_empty(),
            "suppressed in round 1"
        );
        // None of the repair arrived; once the wait is over the receiver asks for round 2.
        let nacks = drive(&mut s, t0 + GRTT * 15);
        assert!(
            nacks
                .iter()
                .any(|(_, nack)| nack.round == 2 && nack.need == 1),
            "{nacks:?}"
        );
        assert_eq!(
            s.poll_event(),
            None,
            "not out of sync after one failed round"
        );
    }

    #[test]
    fn nack_fires_within_the_window_with_need_and_echo() {
        let t0 = Instant::now();
        let mut s = scheduler(1, 1000);
        s.handle_heartbeat(
            t0,
            &HeartbeatInfo {
                grtt: GRTT,
                group_size: 1000,
                backoff_factor: 4,
                probe_timestamp_us: 5_000,
                probe_reply_requested: false,
            },
        );
        s.handle_expected_complete(t0, block(0), 0, 3);
        assert!(s.is_backing_off(&block(0)));
        let nacks = drive(&mut s, t0 + 4 * GRTT);
        assert_eq!(nacks.len(), 1);
        let (at, nack) = nacks[0];
        assert!(at <= t0 + 4 * GRTT);
        assert_eq!((nack.round, nack.need, nack.receiver_id), (1, 3, 42));
        assert_eq!(nack.destination, FeedbackMode::Unicast);
        let echo = nack.echo.unwrap();
        assert_eq!(echo.timestamp_us, 5_000);
        assert_eq!(u128::from(echo.hold_us), (at - t0).as_micros());
    }

    #[test]
    fn backoff_follows_the_truncated_exponential() {
        // Over many seeds the median fraction of the window matches the distribution's.
        let t0 = Instant::now();
        let mut fractions: Vec<f64> = (0..2000)
            .map(|seed| {
                let mut s = scheduler(seed, 1000);
                s.handle_expected_complete(t0, block(0), 0, 1);
                let at = s.poll_timeout().unwrap();
                (at - t0).as_secs_f64() / (4.0 * GRTT.as_secs_f64())
            })
            .collect();
        fractions.sort_by(f64::total_cmp);
        let median = fractions[1000];
        let expected = backoff::fraction(0.5, 1000);
        assert!((median - expected).abs() < 0.02, "{median} vs {expected}");
        assert!(fractions.iter().all(|&f| (0.0..=1.0).contains(&f)));
    }

    #[test]
    fn decoding_cancels_and_nothing_needed_means_no_nack() {
        let t0 = Instant::now();
        let mut s = scheduler(2, 10);
        s.handle_expected_complete(t0, block(0), 0, 0);
        s.handle_expected_complete(t0, block(1), 0, 2);
        s.handle_need(t0, block(1), 1);
        assert!(s.is_backing_off(&block(1)));
        s.handle_decoded(t0, block(1));
        assert!(drive(&mut s, t0 + 100 * GRTT).is_empty());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn suppressed_by_at_least_as_much_not_by_less() {
        let t0 = Instant::now();
        let mut s = scheduler(3, 100);
        s.handle_expected_complete(t0, block(0), 0, 4);
        s.handle_expected_complete(t0, block(1), 0, 4);
        s.handle_nack_heard(t0, block(0), 1, 3);
        s.handle_repair_advertisement(t0, block(1), 1, 4);
        assert!(s.is_backing_off(&block(0)));
        assert!(!s.is_backing_off(&block(1)));
        // The window, and the GRTT block 0 waits for a raised count.
        let nacks = drive(&mut s, t0 + 5 * GRTT);
        assert_eq!(nacks.len(), 1);
        assert_eq!(nacks[0].1.block, block(0));
        assert_eq!(nacks[0].1.need, 4);
    }

    /// A receiver needing more than the round's advertised count waits one GRTT for a raised
    /// count (another member's NACK, answered by a top-up) before adding its own NACK; it used
    /// to NACK as soon as its timer fired, so the NACKs of a round grew with the number of
    /// members needing more than the first order.
    #[test]
    fn needing_more_than_advertised_waits_a_grtt_for_a_raised_count() {
        let t0 = Instant::now();
        let mut s = scheduler(3, 1000);
        s.handle_expected_complete(t0, block(0), 0, 4);
        s.handle_repair_advertisement(t0, block(0), 1, 2);
        let fires = s.poll_timeout().unwrap();
        s.handle_timeout(fires);
        assert_eq!(s.poll_nack(), None, "held back a GRTT");
        assert!(s.is_backing_off(&block(0)));
        // The raised count arrives within that GRTT: no NACK at all.
        s.handle_repair_advertisement(fires + GRTT / 2, block(0), 1, 4);
        assert!(!s.is_backing_off(&block(0)));
        assert!(drive(&mut s, fires + 2 * GRTT).is_empty());
        // Without a raise it NACKs one GRTT later, once per round.
        let mut s = scheduler(3, 1000);
        s.handle_expected_complete(t0, block(0), 0, 4);
        s.handle_repair_advertisement(t0, block(0), 1, 2);
        let nacks = drive(&mut s, t0 + 6 * GRTT);
        assert_eq!(nacks.len(), 1, "{nacks:?}");
        assert_eq!((nacks[0].1.round, nacks[0].1.need), (1, 4));
        assert_eq!(nacks[0].0, fires + GRTT);
    }

    #[test]
    fn advertisement_heard_before_expected_complete_suppresses() {
        let t0 = Instant::now();
        let mut s = scheduler(4, 100);
        s.handle_repair_advertisement(t0, block(0), 1, 5);
        s.handle_expected_complete(t0 + GRTT, block(0), 0, 5);
        assert!(!s.is_backing_off(&block(0)));
        assert_eq!(s.rounds(&block(0)), Some(1));
    }

    #[test]
    fn rearms_per_round_then_out_of_sync_once_per_message() {
        let t0 = Instant::now();
        let mut s = scheduler(5, 10);
        s.handle_expected_complete(t0, block(0), 0, 2);
        s.handle_expected_complete(t0, block(1), 0, 2);
        let mut now = t0;
        let mut rounds = Vec::new();
        for round in 1..=3u8 {
            let nacks = drive(&mut s, now + 4 * GRTT);
            let own: Vec<_> = nacks.iter().filter(|(_, n)| n.block == block(0)).collect();
            assert_eq!(own.len(), 1, "round {round}");
            rounds.push(own[0].1.round);
            now += 5 * GRTT;
            // The repair of this round came and was not enough.
            s.handle_expected_complete(now, block(0), round, 1);
        }
        assert_eq!(rounds, vec![1, 2, 3]);
        assert_eq!(
            s.poll_event(),
            Some(Event::OutOfSync {
                seq: 7,
                block: block(0)
            })
        );
        // The other block of the same message stops too, without a second event.
        assert!(drive(&mut s, now + 100 * GRTT).is_empty());
        assert_eq!(s.poll_event(), None);
    }

    #[test]
    fn unanswered_round_times_out_and_stale_markers_are_ignored() {
        let t0 = Instant::now();
        let mut s = scheduler(6, 10);
        s.handle_expected_complete(t0, block(0), 0, 2);
        let first = drive(&mut s, t0 + 4 * GRTT);
        assert_eq!(first.len(), 1);
        // A marker for the initial transmission arriving late does not end round 1.
        s.handle_expected_complete(t0 + 5 * GRTT, block(0), 0, 2);
        assert_eq!(s.rounds(&block(0)), Some(1));
        // No repair at all: after the repair wait the next round starts, still round 1 on the
        // wire since the sender never answered it.
        let later = drive(&mut s, first[0].0 + 10 * GRTT);
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].1.round, 1);
        assert!(later[0].0 >= first[0].0 + 6 * GRTT);
        assert_eq!(s.rounds(&block(0)), Some(2));
    }

    #[test]
    fn same_seed_same_times() {
        let t0 = Instant::now();
        let times = |seed| {
            let mut s = scheduler(seed, 500);
            for sbn in 0..8 {
                s.handle_expected_complete(t0, block(sbn), 0, 1);
            }
            drive(&mut s, t0 + 10 * GRTT)
                .into_iter()
                .map(|(at, n)| (at - t0, n.block.sbn))
                .collect::<Vec<_>>()
        };
        assert_eq!(times(9), times(9));
        assert_ne!(times(9), times(10));
    }

    #[test]
    fn probe_replies_are_rare_and_echo_the_probe() {
        let t0 = Instant::now();
        let mut replies = 0;
        for seed in 0..1000 {
            let mut s = scheduler(seed, 1000);
            s.handle_heartbeat(
                t0,
                &HeartbeatInfo {
                    grtt: GRTT,
                    group_size: 1000,
                    backoff_factor: 4,
                    probe_timestamp_us: 77,
                    probe_reply_requested: true,
                },
            );
            if let Some(at) = s.poll_timeout() {
                s.handle_timeout(at);
                let echo = s.poll_probe_reply().unwrap();
                assert_eq!(echo.timestamp_us, 77);
                replies += 1;
            }
        }
        // Expected 4 of 1000 (probe_replies_per_probe = 4).
        assert!((1..=12).contains(&replies), "{replies}");
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for config in [
            SchedulerConfig {
                backoff_factor: 0,
                ..SchedulerConfig::default()
            },
            SchedulerConfig {
                max_rounds: 0,
                ..SchedulerConfig::default()
            },
            SchedulerConfig {
                repair_wait_grtt: f64::NAN,
                ..SchedulerConfig::default()
            },
        ] {
            assert!(NackScheduler::new(config).is_err());
        }
    }
}
