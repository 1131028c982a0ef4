//! A seeded discrete-event simulator of NACK-based repair: one sender, many receivers.
//!
//! The sender multicasts rekey messages of a few FEC blocks of `source_symbols` symbols each,
//! plus proactive repair symbols (fixed, or chosen by [`ProactiveRepair`]), and answers NACKs
//! with a [`RepairAggregator`]. Each receiver runs a [`NackScheduler`] and needs every symbol
//! count of every block (the worst case: any `source_symbols` received symbols decode a
//! block, as an ideal code would; RaptorQ's rare extra symbol is not modelled). Each receiver
//! has its own one-way delay (uniform in a range, no reordering), its own loss model on data
//! (symbols, advertisements, heard NACKs) and on feedback (its NACKs), independent or
//! Gilbert-Elliott. Virtual time jumps from event to event (a binary heap); there are no
//! per-symbol events: a multicast symbol is drawn against every receiver's link when sent and
//! its arrival is queued on the receiver, which is only woken for decoding, its timers,
//! feedback it hears, and the end of each repair round.
//!
//! Simplifications, each a choice of this model and not of the protocol: the sender knows the
//! true GRTT (twice the largest one-way delay) and advertises it; heartbeats and the marker
//! that tells a receiver a round's repair burst ended (in the real engine, a heartbeat's
//! repair entry) are not lost; in multicast mode a NACK lost on its sender's uplink reaches
//! nobody, and one that got through reaches each receiver unless its downlink drops it.
//!
//! Metrics, per block: NACK datagrams *sent* by receivers (all rounds), the number that
//! reached the sender, repair symbols sent, rounds (repair orders), and the worst receiver's
//! need: the largest, over receivers, number of repair symbols of the block sent up to and
//! including the one that completed that receiver. That is what a sender streaming repair
//! until the last receiver decoded would have had to send, so `repair_sent / worst_need` is at
//! least 1 and measures the cost of answering in rounds. Completion time runs from the end of
//! the block's initial transmission to the last receiver decoding it.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::loss::{Loss, LossModel};
use crate::{
    AggregatorConfig, BlockKey, BlockNackStats, ConfigError, Event, FeedbackMode, GrttConfig,
    GrttEstimator, HeartbeatInfo, IncomingNack, NackScheduler, ObjectId, ProactiveConfig,
    ProactiveRepair, ProbeEcho, RepairAggregator, SchedulerConfig,
};

/// How the simulated sender picks its proactive repair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProactiveMode {
    /// This many proactive repair symbols per block.
    Fixed(u16),
    /// Chosen per message by a [`ProactiveRepair`] helper fed with the previous messages'
    /// first-round NACK statistics.
    Adaptive(ProactiveConfig),
}

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Number of receivers, G.
    pub receivers: u32,
    /// Rekey messages, sent one after the other (the next starts when the previous one is
    /// decoded or given up by every receiver).
    pub messages: u32,
    /// FEC blocks per message.
    pub blocks_per_message: u8,
    /// Source symbols per block (k); a receiver needs this many symbols of a block.
    pub source_symbols: u16,
    /// Proactive repair per block.
    pub proactive: ProactiveMode,
    /// Loss on every receiver's downlink (symbols, advertisements, heard NACKs).
    pub data_loss: Loss,
    /// Loss on every receiver's uplink (its NACKs).
    pub feedback_loss: Loss,
    /// Smallest one-way delay between the sender and a receiver.
    pub min_delay: Duration,
    /// Largest one-way delay; the GRTT is twice this.
    pub max_delay: Duration,
    /// Where NACKs go.
    pub feedback: FeedbackMode,
    /// Backoff factor K.
    pub backoff_factor: u8,
    /// R: NACK rounds before a receiver gives up.
    pub max_rounds: u8,
    /// The sender's cap on repair symbols per block per round.
    pub repair_cap: u16,
    /// The sender's hold-off, in GRTTs.
    pub hold_off_grtt: f64,
    /// The receivers' repair wait, in GRTTs.
    pub repair_wait_grtt: f64,
    /// Symbols per second the sender sends (initial transmission, and repair pacing).
    pub symbol_rate: f64,
    /// If set, data and feedback are lost only while a receiver is in one of its first this
    /// many attempts at a block (attempt 0 is the initial transmission, attempt r its r-th
    /// NACK round), and are lossless afterwards. For convergence tests.
    pub lossy_attempts: Option<u8>,
    /// If set, a receiver loses at most this many symbols of a block per attempt.
    pub max_losses_per_attempt: Option<u16>,
    /// Seed of every random choice of the run.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            receivers: 100,
            messages: 1,
            blocks_per_message: 4,
            source_symbols: 32,
            proactive: ProactiveMode::Fixed(0),
            data_loss: Loss::Bernoulli { p: 0.1 },
            feedback_loss: Loss::Bernoulli { p: 0.1 },
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(25),
            feedback: FeedbackMode::Unicast,
            backoff_factor: 4,
            max_rounds: 8,
            repair_cap: 64,
            hold_off_grtt: 5.0,
            repair_wait_grtt: 7.0,
            symbol_rate: 20_000.0,
            lossy_attempts: None,
            max_losses_per_attempt: None,
            seed: 1,
        }
    }
}

impl SimConfig {
    /// The true (and advertised) GRTT: twice the largest one-way delay.
    pub fn grtt(&self) -> Duration {
        self.max_delay * 2
    }

    /// The mean feedback delay `D` of the suppression model in this setting: a NACK's trip to
    /// the sender plus the advertisement's trip to another receiver (or the multicast NACK's
    /// trip to another receiver), `d_i + d_j`, averaged.
    pub fn mean_feedback_delay(&self) -> Duration {
        self.min_delay + self.max_delay
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| ConfigError::Invalid { field, reason };
        if self.receivers == 0 {
            return Err(invalid("receivers", "must be at least 1"));
        }
        if self.blocks_per_message == 0 || self.source_symbols == 0 {
            return Err(invalid(
                "blocks_per_message",
                "blocks and symbols must be >= 1",
            ));
        }
        if self.min_delay > self.max_delay || self.max_delay.is_zero() {
            return Err(invalid(
                "min_delay",
                "need 0 <= min_delay <= max_delay, max_delay > 0",
            ));
        }
        if !(self.symbol_rate.is_finite() && self.symbol_rate > 0.0) {
            return Err(invalid("symbol_rate", "must be positive and finite"));
        }
        if !(self.hold_off_grtt.is_finite() && self.hold_off_grtt >= 0.0) {
            return Err(invalid("hold_off_grtt", "must be >= 0 and finite"));
        }
        self.data_loss
            .validate()
            .map_err(|_| invalid_loss("data_loss"))?;
        self.feedback_loss
            .validate()
            .map_err(|_| invalid_loss("feedback_loss"))
    }
}

/// The error of a loss setting with a knob that is not a probability.
fn invalid_loss(field: &'static str) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: "probabilities must be finite and in [0, 1]",
    }
}

/// What happened to one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockOutcome {
    /// The message (0-based).
    pub message: u32,
    /// The block number.
    pub sbn: u8,
    /// Proactive repair symbols sent with the block.
    pub proactive: u16,
    /// Receivers that could not decode the block from its initial transmission.
    pub needy_receivers: u32,
    /// NACK datagrams sent for the block by all receivers, all rounds.
    pub nacks_sent: u32,
    /// NACK datagrams that reached the sender.
    pub nacks_at_sender: u32,
    /// Repair orders (rounds) the sender made for the block.
    pub rounds: u8,
    /// Reactive repair symbols sent for the block.
    pub repair_sent: u32,
    /// The worst receiver's need (see the module documentation); 0 if nobody needed repair.
    pub worst_need: u32,
    /// The largest need any receiver had after the initial transmission.
    pub worst_initial_need: u16,
    /// The first repair round's largest need as the sender saw it.
    pub first_round_max_need: u16,
    /// From the end of the initial transmission to the last receiver decoding; `None` if a
    /// receiver never decoded the block.
    pub completion: Option<Duration>,
}

impl BlockOutcome {
    /// Whether some receiver needed repair.
    pub fn lost(&self) -> bool {
        self.needy_receivers > 0
    }

    /// `repair_sent / worst_need`, if repair was needed.
    pub fn repair_ratio(&self) -> Option<f64> {
        (self.worst_need > 0).then(|| f64::from(self.repair_sent) / f64::from(self.worst_need))
    }
}

/// The NACKs of one loss event: one block, one NACK round number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundNacks {
    /// The message (0-based).
    pub message: u32,
    /// The block number.
    pub sbn: u8,
    /// The round number the NACKs carried.
    pub round: u8,
    /// NACK datagrams sent.
    pub nacks: u32,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Per block.
    pub blocks: Vec<BlockOutcome>,
    /// NACKs sent per loss event: per block and per NACK round number that at least one NACK
    /// carried.
    pub nacks_per_round: Vec<RoundNacks>,
    /// Receiver-message pairs that ended out of sync.
    pub out_of_sync: u32,
    /// Receiver-block pairs neither decoded nor given up when the run ended (0 unless the
    /// model stalled: a bug).
    pub stalled: u32,
    /// The largest number of NACK rounds any receiver entered for any block.
    pub max_receiver_rounds: u8,
    /// The GRTT the sender advertised.
    pub grtt: Duration,
    /// The sender's GRTT estimate at the end, from echoes in NACKs and probe replies.
    pub grtt_estimate: Duration,
    /// Events processed.
    pub events: u64,
    /// A hash of the trace: every NACK, advertisement, repair symbol and decode with its time.
    pub trace_hash: u64,
}

/// Runs a simulation.
pub fn run(config: &SimConfig) -> Result<SimReport, ConfigError> {
    config.validate()?;
    let mut sim = Sim::new(config)?;
    sim.run();
    Ok(sim.report())
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    StartMessage,
    Heartbeat {
        rx: u32,
    },
    SendInitial {
        message: u32,
        block: u8,
        index: u16,
    },
    SenderWake,
    RxTimer {
        rx: u32,
    },
    Decode {
        message: u32,
        rx: u32,
        block: u8,
    },
    ExpectedComplete {
        message: u32,
        rx: u32,
        block: u8,
        round: u8,
    },
    NackAtSender {
        message: u32,
        block: u8,
        round: u8,
        need: u16,
        echo: Option<ProbeEcho>,
    },
    NackHeard {
        message: u32,
        rx: u32,
        block: u8,
        round: u8,
        need: u16,
    },
    AdvertisementHeard {
        message: u32,
        rx: u32,
        block: u8,
        round: u8,
        count: u16,
    },
    ProbeReply {
        echo: ProbeEcho,
    },
}

struct Item {
    at: Instant,
    order: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    // Reversed: the heap pops the earliest event, ties in insertion order.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

#[derive(Debug, Clone, Default)]
struct RxBlock {
    arrived: u32,
    future: VecDeque<Instant>,
    received: u32,
    finished: bool,
    decoded: bool,
    attempt: u8,
    attempt_losses: u16,
    completing_repair: u32,
}

struct Receiver {
    scheduler: NackScheduler,
    delay: Duration,
    data: LossModel,
    feedback: LossModel,
    timer: Option<Instant>,
    blocks: Vec<RxBlock>,
}

#[derive(Debug, Clone, Copy, Default)]
struct BlockTrack {
    initial_end: Option<Instant>,
    last_decode: Option<Instant>,
    needy: u32,
    worst_initial_need: u16,
    nacks_sent: u32,
    nacks_at_sender: u32,
    rounds: u8,
    repair_sent: u32,
    first_round_max_need: u16,
    undecoded: u32,
}

struct Sim<'a> {
    config: &'a SimConfig,
    rng: ChaCha8Rng,
    base: Instant,
    heap: BinaryHeap<Item>,
    order: u64,
    receivers: Vec<Receiver>,
    aggregator: RepairAggregator,
    estimator: GrttEstimator,
    helper: Option<ProactiveRepair>,
    sender_timer: Option<Instant>,
    message: u32,
    proactive: u16,
    blocks: Vec<BlockTrack>,
    outcomes: Vec<BlockOutcome>,
    rounds: BTreeMap<(u32, u8, u8), u32>,
    remaining: u64,
    out_of_sync: u32,
    max_receiver_rounds: u8,
    events: u64,
    hash: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl<'a> Sim<'a> {
    fn new(config: &'a SimConfig) -> Result<Self, ConfigError> {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let base = Instant::now();
        let grtt = config.grtt();
        let spread = config.max_delay - config.min_delay;
        let mut receivers = Vec::with_capacity(config.receivers as usize);
        for id in 0..config.receivers {
            let scheduler = NackScheduler::new(SchedulerConfig {
                receiver_id: id,
                group_size: config.receivers,
                backoff_factor: config.backoff_factor,
                grtt,
                max_rounds: config.max_rounds,
                // This simulator models multicast repair only.
                multicast_rounds: config.max_rounds,
                repair_wait_grtt: config.repair_wait_grtt,
                feedback: config.feedback,
                probe_replies_per_probe: 4.0,
                seed: rng.gen(),
            })?;
            let delay = config.min_delay + spread.mul_f64(rng.gen::<f64>());
            receivers.push(Receiver {
                scheduler,
                delay,
                data: LossModel::stationary(config.data_loss, &mut rng)
                    .map_err(|_| invalid_loss("data_loss"))?,
                feedback: LossModel::stationary(config.feedback_loss, &mut rng)
                    .map_err(|_| invalid_loss("feedback_loss"))?,
                timer: None,
                blocks: Vec::new(),
            });
        }
        let aggregator = RepairAggregator::new(AggregatorConfig {
            hold_off: grtt.mul_f64(config.hold_off_grtt),
            max_repair_per_round: config.repair_cap,
            repair_rate: config.symbol_rate,
            bucket_depth: 16,
            advertise: config.feedback == FeedbackMode::Unicast,
        })?;
        let estimator = GrttEstimator::new(
            GrttConfig {
                initial: Duration::from_millis(1),
                min: Duration::from_micros(100),
                max: Duration::from_secs(10),
                probe_interval: grtt * 20,
                converging_intervals: 0,
            },
            base,
        )?;
        let helper = match config.proactive {
            ProactiveMode::Fixed(_) => None,
            ProactiveMode::Adaptive(helper) => Some(ProactiveRepair::new(helper)?),
        };
        Ok(Self {
            config,
            rng,
            base,
            heap: BinaryHeap::new(),
            order: 0,
            receivers,
            aggregator,
            estimator,
            helper,
            sender_timer: None,
            message: 0,
            proactive: 0,
            blocks: Vec::new(),
            outcomes: Vec::new(),
            rounds: BTreeMap::new(),
            remaining: 0,
            out_of_sync: 0,
            max_receiver_rounds: 0,
            events: 0,
            hash: FNV_OFFSET,
        })
    }

    fn key(&self, block: u8) -> BlockKey {
        BlockKey {
            seq: u64::from(self.message) + 1,
            object: ObjectId::Chunks,
            sbn: block,
        }
    }

    fn push(&mut self, at: Instant, ev: Ev) {
        self.order += 1;
        self.heap.push(Item {
            at,
            order: self.order,
            ev,
        });
    }

    fn trace(&mut self, now: Instant, values: &[u64]) {
        let mut h = self.hash;
        let t = u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(0);
        for v in std::iter::once(t).chain(values.iter().copied()) {
            for byte in v.to_le_bytes() {
                h ^= u64::from(byte);
                h = h.wrapping_mul(FNV_PRIME);
            }
        }
        self.hash = h;
    }

    fn symbol_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.config.symbol_rate)
    }

    fn run(&mut self) {
        self.push(self.base, Ev::StartMessage);
        // A generous horizon: every message ends well within R rounds of a few GRTTs each.
        let horizon = self.base
            + self.config.grtt()
                * (u32::from(self.config.max_rounds) + 4)
                * 20
                * self.config.messages.max(1);
        while let Some(item) = self.heap.pop() {
            if item.at > horizon {
                break;
            }
            self.events += 1;
            self.handle(item.at, item.ev);
        }
        self.finish_message();
    }

    fn handle(&mut self, now: Instant, ev: Ev) {
        let message = match ev {
            Ev::SendInitial { message, .. }
            | Ev::Decode { message, .. }
            | Ev::ExpectedComplete { message, .. }
            | Ev::NackAtSender { message, .. }
            | Ev::NackHeard { message, .. }
            | Ev::AdvertisementHeard { message, .. } => Some(message),
            Ev::StartMessage
            | Ev::Heartbeat { .. }
            | Ev::SenderWake
            | Ev::RxTimer { .. }
            | Ev::ProbeReply { .. } => None,
        };
        if message.is_some_and(|m| m != self.message)
            || (message.is_some() && self.blocks.is_empty())
        {
            // Traffic of a message that every receiver has finished with.
            return;
        }
        match ev {
            Ev::StartMessage => self.start_message(now),
            Ev::Heartbeat { rx } => {
                let heartbeat = HeartbeatInfo {
                    grtt: self.config.grtt(),
                    group_size: self.config.receivers,
                    backoff_factor: self.config.backoff_factor,
                    probe_timestamp_us: self.estimator.probe_timestamp_us(
                        now.checked_sub(self.receivers[rx as usize].delay)
                            .unwrap_or(self.base),
                    ),
                    probe_reply_requested: true,
                };
                self.receivers[rx as usize]
                    .scheduler
                    .handle_heartbeat(now, &heartbeat);
                self.after_receiver(now, rx);
            }
            Ev::SendInitial { block, index, .. } => self.send_initial(now, block, index),
            Ev::SenderWake => {
                if self.sender_timer == Some(now) {
                    self.sender_timer = None;
                }
                self.service_sender(now);
            }
            Ev::RxTimer { rx } => {
                let r = &mut self.receivers[rx as usize];
                if r.timer != Some(now) {
                    return;
                }
                r.timer = None;
                for block in 0..self.config.blocks_per_message {
                    self.settle(now, rx, block);
                }
                self.receivers[rx as usize].scheduler.handle_timeout(now);
                self.after_receiver(now, rx);
            }
            Ev::Decode { rx, block, .. } => {
                let key = self.key(block);
                let r = &mut self.receivers[rx as usize];
                let b = &mut r.blocks[usize::from(block)];
                if b.finished {
                    return;
                }
                b.finished = true;
                b.decoded = true;
                r.scheduler.handle_decoded(now, key);
                self.remaining = self.remaining.saturating_sub(1);
                let track = &mut self.blocks[usize::from(block)];
                track.last_decode = Some(track.last_decode.map_or(now, |t| t.max(now)));
                self.trace(now, &[4, u64::from(rx), u64::from(block)]);
                self.after_receiver(now, rx);
            }
            Ev::ExpectedComplete {
                rx, block, round, ..
            } => {
                if self.receivers[rx as usize].blocks[usize::from(block)].finished {
                    return;
                }
                let need = self.settle(now, rx, block);
                let key = self.key(block);
                self.receivers[rx as usize]
                    .scheduler
                    .handle_expected_complete(now, key, round, need);
                self.after_receiver(now, rx);
            }
            Ev::NackAtSender {
                block,
                round,
                need,
                echo,
                ..
            } => {
                if let Some(echo) = echo {
                    self.estimator.handle_echo(now, echo);
                }
                self.blocks[usize::from(block)].nacks_at_sender += 1;
                let nack = IncomingNack {
                    block: self.key(block),
                    round,
                    need,
                };
                let _ = self.aggregator.handle_nack(now, &nack);
                while let Some(ad) = self.aggregator.poll_advertisement() {
                    self.trace(now, &[2, u64::from(ad.round), u64::from(ad.count)]);
                    for rx in 0..self.config.receivers {
                        let r = &mut self.receivers[rx as usize];
                        if r.blocks[usize::from(block)].finished || r.data.lose(&mut self.rng) {
                            continue;
                        }
                        let at = now + r.delay;
                        self.push(
                            at,
                            Ev::AdvertisementHeard {
                                message: self.message,
                                rx,
                                block,
                                round: ad.round,
                                count: ad.count,
                            },
                        );
                    }
                }
                self.service_sender(now);
            }
            Ev::NackHeard {
                rx,
                block,
                round,
                need,
                ..
            } => {
                if self.receivers[rx as usize].blocks[usize::from(block)].finished {
                    return;
                }
                self.settle(now, rx, block);
                let key = self.key(block);
                self.receivers[rx as usize]
                    .scheduler
                    .handle_nack_heard(now, key, round, need);
                self.after_receiver(now, rx);
            }
            Ev::AdvertisementHeard {
                rx,
                block,
                round,
                count,
                ..
            } => {
                if self.receivers[rx as usize].blocks[usize::from(block)].finished {
                    return;
                }
                self.settle(now, rx, block);
                let key = self.key(block);
                self.receivers[rx as usize]
                    .scheduler
                    .handle_repair_advertisement(now, key, round, count);
                self.after_receiver(now, rx);
            }
            Ev::ProbeReply { echo } => {
                self.estimator.handle_echo(now, echo);
            }
        }
    }

    fn start_message(&mut self, now: Instant) {
        let blocks = usize::from(self.config.blocks_per_message);
        self.proactive = match (&self.helper, self.config.proactive) {
            (Some(helper), _) => helper.proactive_symbols(self.config.source_symbols),
            (None, ProactiveMode::Fixed(h)) => h,
            (None, ProactiveMode::Adaptive(_)) => 0,
        };
        self.blocks = vec![BlockTrack::default(); blocks];
        self.remaining = u64::from(self.config.receivers) * blocks as u64;
        let seq = u64::from(self.message) + 1;
        self.aggregator.retire_before(seq);
        for rx in 0..self.config.receivers {
            let r = &mut self.receivers[rx as usize];
            r.scheduler.retire_before(seq);
            r.blocks = vec![RxBlock::default(); blocks];
            let at = now + r.delay;
            self.push(at, Ev::Heartbeat { rx });
        }
        let message = self.message;
        self.push(
            now,
            Ev::SendInitial {
                message,
                block: 0,
                index: 0,
            },
        );
    }

    fn send_initial(&mut self, now: Instant, block: u8, index: u16) {
        let total = self.config.source_symbols.saturating_add(self.proactive);
        self.deliver(now, block, 0, None);
        if index + 1 < total {
            let next = now + self.symbol_interval();
            self.push(
                next,
                Ev::SendInitial {
                    message: self.message,
                    block,
                    index: index + 1,
                },
            );
            return;
        }
        // The block's initial transmission is complete.
        let key = self.key(block);
        self.aggregator.register_block(key, u32::from(total));
        let k = u32::from(self.config.source_symbols);
        let epsilon = self.symbol_interval();
        let mut needy = 0;
        let mut worst = 0u16;
        for rx in 0..self.config.receivers {
            let r = &self.receivers[rx as usize];
            let b = &r.blocks[usize::from(block)];
            if b.received < k {
                needy += 1;
                worst = worst.max(u16::try_from(k - b.received).unwrap_or(u16::MAX));
            }
            if !b.finished {
                let at = now + r.delay + epsilon;
                self.push(
                    at,
                    Ev::ExpectedComplete {
                        message: self.message,
                        rx,
                        block,
                        round: 0,
                    },
                );
            }
        }
        let track = &mut self.blocks[usize::from(block)];
        track.initial_end = Some(now);
        track.needy = needy;
        track.worst_initial_need = worst;
        if block + 1 < self.config.blocks_per_message {
            let next = now + self.symbol_interval();
            self.push(
                next,
                Ev::SendInitial {
                    message: self.message,
                    block: block + 1,
                    index: 0,
                },
            );
        }
    }

    /// Multicasts one symbol of `block`: draws it against every receiver's downlink.
    fn deliver(&mut self, now: Instant, block: u8, round: u8, repair_index: Option<u32>) {
        let k = u32::from(self.config.source_symbols);
        let key = self.key(block);
        for rx in 0..self.config.receivers {
            let r = &mut self.receivers[rx as usize];
            let b = &mut r.blocks[usize::from(block)];
            if b.finished || b.received >= k {
                continue;
            }
            let attempt = r.scheduler.rounds(&key).unwrap_or(0);
            if attempt != b.attempt {
                b.attempt = attempt;
                b.attempt_losses = 0;
            }
            let lossy = self.config.lossy_attempts.map_or(true, |l| attempt < l)
                && self
                    .config
                    .max_losses_per_attempt
                    .map_or(true, |cap| b.attempt_losses < cap);
            if lossy && r.data.lose(&mut self.rng) {
                b.attempt_losses += 1;
                continue;
            }
            let at = now + r.delay;
            b.future.push_back(at);
            b.received += 1;
            if b.received == k {
                b.completing_repair = repair_index.unwrap_or(0);
                self.order += 1;
                self.heap.push(Item {
                    at,
                    order: self.order,
                    ev: Ev::Decode {
                        message: self.message,
                        rx,
                        block,
                    },
                });
            }
        }
        let _ = round;
    }

    /// Counts the arrivals of `block` at `rx` up to `now`; returns the need.
    fn settle(&mut self, now: Instant, rx: u32, block: u8) -> u16 {
        let k = u32::from(self.config.source_symbols);
        let key = self.key(block);
        let r = &mut self.receivers[rx as usize];
        let b = &mut r.blocks[usize::from(block)];
        let before = b.arrived;
        while b.future.front().is_some_and(|&at| at <= now) {
            b.future.pop_front();
            b.arrived += 1;
        }
        let need = u16::try_from(k.saturating_sub(b.arrived)).unwrap_or(u16::MAX);
        if b.arrived != before && !b.finished {
            r.scheduler.handle_need(now, key, need);
        }
        need
    }

    fn after_receiver(&mut self, now: Instant, rx: u32) {
        while let Some(nack) = self.receivers[rx as usize].scheduler.poll_nack() {
            let block = nack.block.sbn;
            let message = self.message;
            *self.rounds.entry((message, block, nack.round)).or_insert(0) += 1;
            self.blocks[usize::from(block)].nacks_sent += 1;
            self.trace(
                now,
                &[
                    1,
                    u64::from(rx),
                    u64::from(block),
                    u64::from(nack.round),
                    u64::from(nack.need),
                ],
            );
            let r = &mut self.receivers[rx as usize];
            let attempt = r.scheduler.rounds(&nack.block).unwrap_or(0);
            self.max_receiver_rounds = self.max_receiver_rounds.max(attempt);
            let lossy = self.config.lossy_attempts.map_or(true, |l| attempt < l);
            if lossy && r.feedback.lose(&mut self.rng) {
                continue;
            }
            let delay = r.delay;
            self.push(
                now + delay,
                Ev::NackAtSender {
                    message,
                    block,
                    round: nack.round,
                    need: nack.need,
                    echo: nack.echo,
                },
            );
            if self.config.feedback == FeedbackMode::Multicast {
                for other in 0..self.config.receivers {
                    if other == rx {
                        continue;
                    }
                    let o = &mut self.receivers[other as usize];
                    if o.blocks[usize::from(block)].finished || o.data.lose(&mut self.rng) {
                        continue;
                    }
                    let at = now + delay + o.delay;
                    self.push(
                        at,
                        Ev::NackHeard {
                            message,
                            rx: other,
                            block,
                            round: nack.round,
                            need: nack.need,
                        },
                    );
                }
            }
        }
        while let Some(echo) = self.receivers[rx as usize].scheduler.poll_probe_reply() {
            let at = now + self.receivers[rx as usize].delay;
            self.push(at, Ev::ProbeReply { echo });
        }
        while let Some(event) = self.receivers[rx as usize].scheduler.poll_event() {
            let Event::OutOfSync { .. } = event;
            self.out_of_sync += 1;
            let r = &mut self.receivers[rx as usize];
            for (index, b) in r.blocks.iter_mut().enumerate() {
                if !b.finished {
                    b.finished = true;
                    self.remaining = self.remaining.saturating_sub(1);
                    self.blocks[index].undecoded += 1;
                }
            }
        }
        let r = &mut self.receivers[rx as usize];
        let next = r.scheduler.poll_timeout();
        if next != r.timer {
            r.timer = next;
            if let Some(at) = next {
                self.push(at.max(now), Ev::RxTimer { rx });
                // A deadline in the past fires now; keep the stored time equal to the event's.
                self.receivers[rx as usize].timer = Some(at.max(now));
            }
        }
        self.maybe_next_message(now);
    }

    fn service_sender(&mut self, now: Instant) {
        self.aggregator.handle_timeout(now);
        let current = self.key(0).seq;
        while let Some(order) = self.aggregator.poll_order() {
            let Some(track) = self.blocks.get_mut(usize::from(order.block.sbn)) else {
                continue;
            };
            if order.block.seq != current {
                continue;
            }
            track.rounds = track.rounds.max(order.round);
            if order.round == 1 {
                track.first_round_max_need = order.max_need;
            }
        }
        let epsilon = self.symbol_interval();
        while let Some(symbol) = self.aggregator.poll_repair(now) {
            let block = symbol.block.sbn;
            if symbol.block.seq != current {
                continue;
            }
            let Some(track) = self.blocks.get_mut(usize::from(block)) else {
                continue;
            };
            track.repair_sent += 1;
            let index = track.repair_sent;
            self.trace(now, &[3, u64::from(block), u64::from(symbol.esi)]);
            self.deliver(now, block, symbol.round, Some(index));
            if symbol.last_of_order {
                for rx in 0..self.config.receivers {
                    let r = &self.receivers[rx as usize];
                    if r.blocks[usize::from(block)].finished {
                        continue;
                    }
                    let at = now + r.delay + epsilon;
                    self.push(
                        at,
                        Ev::ExpectedComplete {
                            message: self.message,
                            rx,
                            block,
                            round: symbol.round,
                        },
                    );
                }
            }
        }
        let next = self.aggregator.poll_timeout();
        if next != self.sender_timer {
            self.sender_timer = next.map(|at| at.max(now));
            if let Some(at) = self.sender_timer {
                self.push(at, Ev::SenderWake);
            }
        }
    }

    fn maybe_next_message(&mut self, now: Instant) {
        if self.remaining > 0 || self.blocks.is_empty() {
            return;
        }
        self.finish_message();
        // Every receiver is done with this message: its repair is moot.
        self.aggregator.retire_before(u64::from(self.message) + 2);
        self.message += 1;
        if self.message < self.config.messages {
            let at = now + self.config.grtt();
            self.push(at, Ev::StartMessage);
        }
    }

    /// Records the outcome of the current message's blocks (once).
    fn finish_message(&mut self) {
        if self.blocks.is_empty() {
            return;
        }
        let blocks = std::mem::take(&mut self.blocks);
        for (index, track) in blocks.iter().enumerate() {
            let sbn = u8::try_from(index).unwrap_or(u8::MAX);
            let worst_need = self
                .receivers
                .iter()
                .filter_map(|r| r.blocks.get(index))
                .filter(|b| b.decoded)
                .map(|b| b.completing_repair)
                .max()
                .unwrap_or(0);
            let stalled = self
                .receivers
                .iter()
                .filter_map(|r| r.blocks.get(index))
                .filter(|b| !b.finished)
                .count();
            let completion = match (track.initial_end, track.last_decode) {
                (Some(end), Some(last)) if track.undecoded == 0 && stalled == 0 => {
                    Some(last.saturating_duration_since(end))
                }
                (Some(_), None) if track.needy == 0 => Some(Duration::ZERO),
                _ => None,
            };
            self.outcomes.push(BlockOutcome {
                message: self.message,
                sbn,
                proactive: self.proactive,
                needy_receivers: track.needy,
                nacks_sent: track.nacks_sent,
                nacks_at_sender: track.nacks_at_sender,
                rounds: track.rounds,
                repair_sent: track.repair_sent,
                worst_need,
                worst_initial_need: track.worst_initial_need,
                first_round_max_need: track.first_round_max_need,
                completion,
            });
            if let Some(helper) = self.helper.as_mut() {
                helper.record(&BlockNackStats {
                    source_symbols: self.config.source_symbols,
                    proactive_symbols: self.proactive,
                    group_size: self.config.receivers,
                    first_need: track.first_round_max_need,
                    needing_receivers: None,
                });
            }
        }
    }

    fn report(&self) -> SimReport {
        let stalled = self
            .receivers
            .iter()
            .flat_map(|r| r.blocks.iter())
            .filter(|b| !b.finished)
            .count();
        SimReport {
            blocks: self.outcomes.clone(),
            nacks_per_round: self
                .rounds
                .iter()
                .map(|(&(message, sbn, round), &nacks)| RoundNacks {
                    message,
                    sbn,
                    round,
                    nacks,
                })
                .collect(),
            out_of_sync: self.out_of_sync,
            stalled: u32::try_from(stalled).unwrap_or(u32::MAX),
            max_receiver_rounds: self.max_receiver_rounds,
            grtt: self.config.grtt(),
            grtt_estimate: self.estimator.grtt(),
            events: self.events,
            trace_hash: self.hash,
        }
    }
}
