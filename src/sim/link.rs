//! One direction of a node's connection to the switch: its configuration ([`LinkConfig`]) and
//! the per-link state the network keeps (loss state, lazily created RNG).

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use rekeycast_nack::loss::{chance, is_probability};

use super::{Loss, SimError};

/// The longest `delay`, `jitter` or `reorder_delay` a [`LinkConfig`] accepts: one day, so that
/// virtual times never come near overflowing.
pub const MAX_LINK_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The impairments of one link (a node's uplink to the switch, or its downlink from it).
///
/// For each packet entering the link, in this order: an outage drops it; the loss model may
/// drop it; its delay is `delay` plus a uniform draw in [0, `jitter`] (reordering emerges when
/// the jitter exceeds the spacing of packets), plus `reorder_delay` with probability
/// `reorder_probability`; with `corrupt_probability` one uniformly chosen bit of this copy is
/// flipped (the copy is made here, other receivers of a multicast keep theirs); with
/// `duplicate_probability` a second, identical copy follows with its own jitter draw. A knob at
/// zero draws no randomness. The default is an ideal link: no loss, no delay.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinkConfig {
    /// The per-packet loss model.
    pub loss: Loss,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly in [0, jitter] for each copy.
    pub jitter: Duration,
    /// Probability that a packet is held back by `reorder_delay` more, in [0, 1].
    pub reorder_probability: f64,
    /// The extra delay of a packet chosen for reordering.
    pub reorder_delay: Duration,
    /// Probability that a second copy of a packet is delivered, in [0, 1].
    pub duplicate_probability: f64,
    /// Probability that one bit of a packet is flipped, in [0, 1].
    pub corrupt_probability: f64,
    /// Windows `(start, end)`, offsets from the simulation start, during which the link drops
    /// every packet that enters it: `start <= t < end`.
    pub outages: Vec<(Duration, Duration)>,
}

impl LinkConfig {
    /// An ideal link: no loss, no delay, no impairment.
    pub fn ideal() -> Self {
        Self::default()
    }

    /// A link with this loss model and fixed delay, and no other impairment.
    pub fn lossy(loss: Loss, delay: Duration) -> Self {
        Self {
            loss,
            delay,
            ..Self::default()
        }
    }

    /// Checks every probability (finite, in [0, 1]), every delay (at most [`MAX_LINK_DELAY`])
    /// and every outage (`start <= end`).
    pub fn validate(&self) -> Result<(), SimError> {
        self.loss.validate()?;
        let probabilities = [
            ("reorder_probability", self.reorder_probability),
            ("duplicate_probability", self.duplicate_probability),
            ("corrupt_probability", self.corrupt_probability),
        ];
        for (field, p) in probabilities {
            if !is_probability(p) {
                return Err(SimError::InvalidConfig {
                    field,
                    reason: "must be finite and in [0, 1]",
                });
            }
        }
        let delays = [
            ("delay", self.delay),
            ("jitter", self.jitter),
            ("reorder_delay", self.reorder_delay),
        ];
        for (field, d) in delays {
            if d > MAX_LINK_DELAY {
                return Err(SimError::InvalidConfig {
                    field,
                    reason: "must be at most one day",
                });
            }
        }
        if self.outages.iter().any(|(start, end)| start > end) {
            return Err(SimError::InvalidConfig {
                field: "outages",
                reason: "each window must have start <= end",
            });
        }
        Ok(())
    }

    /// Whether a packet entering at `offset` (nanoseconds since the start) falls in an outage.
    fn in_outage(&self, offset: u64) -> bool {
        self.outages
            .iter()
            .any(|&(start, end)| nanos(start) <= offset && offset < nanos(end))
    }
}

/// Which way a link carries packets; part of the RNG stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// Node -> switch.
    Up = 0,
    /// Switch -> node.
    Down = 1,
}

/// What a link did with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// Dropped during an outage.
    Outage,
    /// Dropped by the loss model.
    Lost,
    /// Passed, possibly twice.
    Passed {
        /// Delay of the first copy, in nanoseconds.
        delay: u64,
        /// Delay of the duplicate, when there is one.
        duplicate: Option<u64>,
        /// The bit to flip in this copy (and its duplicate), when corrupted.
        flip: Option<usize>,
        /// Whether the explicit reorder delay was added.
        reordered: bool,
    },
}

/// The state of one link inside the network: kept small, since a network of 100,000 nodes
/// holds 200,000 of them. The configuration lives in the network's table of distinct
/// configurations; the RNG is created on first need (its seed depends only on the network seed,
/// the node index and the direction, so creating it late changes no draw).
#[derive(Debug)]
pub(super) struct LinkState {
    /// Index in the network's table of configurations.
    pub(super) config: u32,
    /// Gilbert-Elliott state: `None` until the first packet draws it from the stationary
    /// distribution.
    bad: Option<bool>,
    /// Created on first need.
    rng: Option<Box<ChaCha8Rng>>,
}

impl LinkState {
    /// A link using configuration `config` of the network's table.
    pub(super) fn new(config: u32) -> Self {
        Self {
            config,
            bad: None,
            rng: None,
        }
    }

    /// Switches to another configuration; the loss state restarts from the stationary draw,
    /// the RNG stream continues.
    pub(super) fn reconfigure(&mut self, config: u32) {
        self.config = config;
        self.bad = None;
    }

    /// Decides the fate of a packet of `len` bytes entering the link at `offset`. With
    /// `packet`, the draws come from that packet's own generator ([`PacketRng`]) instead of
    /// the link's stream, so that they do not depend on which other packets crossed the link.
    pub(super) fn traverse(
        &mut self,
        config: &LinkConfig,
        offset: u64,
        len: usize,
        seed: u64,
        stream: (u32, Direction),
        packet: Option<u64>,
    ) -> Fate {
        if config.in_outage(offset) {
            return Fate::Outage;
        }
        if let Some(packet) = packet {
            let mut rng = PacketRng::new(seed, stream, packet);
            return self.draw(config, len, &mut rng);
        }
        let rng = self.rng.get_or_insert_with(|| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream((u64::from(stream.0) << 1) | stream.1 as u64);
            Box::new(rng)
        });
        let rng: &mut ChaCha8Rng = rng;
        let bad = &mut self.bad;
        draw_fate(bad, config, len, rng)
    }

    fn draw<R: Rng>(&mut self, config: &LinkConfig, len: usize, rng: &mut R) -> Fate {
        draw_fate(&mut self.bad, config, len, rng)
    }
}

/// The draws of one packet on one link, as [`LinkState::traverse`] makes them.
fn draw_fate<R: Rng>(
    state: &mut Option<bool>,
    config: &LinkConfig,
    len: usize,
    rng: &mut R,
) -> Fate {
    // For the models without states, the stationary draw is certain Good: no draw.
    let mut bad = match *state {
        Some(bad) => bad,
        None => chance(rng, config.loss.stationary_bad()),
    };
    let lost = config.loss.lose(&mut bad, rng);
    *state = Some(bad);
    if lost {
        return Fate::Lost;
    }
    let base = nanos(config.delay);
    let mut delay = base.saturating_add(draw_jitter(rng, config.jitter));
    let reordered = chance(rng, config.reorder_probability);
    if reordered {
        delay = delay.saturating_add(nanos(config.reorder_delay));
    }
    let flip = (len > 0 && chance(rng, config.corrupt_probability))
        .then(|| rng.gen_range(0..len.saturating_mul(8)));
    let duplicate = chance(rng, config.duplicate_probability)
        .then(|| base.saturating_add(draw_jitter(rng, config.jitter)));
    Fate::Passed {
        delay,
        duplicate,
        flip,
        reordered,
    }
}

/// The generator of one packet's draws on one link: SplitMix64 from a key mixed of the
/// network seed, the link (node index and direction) and the packet's number, so that a
/// packet's fate on a link depends on nothing else. Used when a network filters deliveries
/// (a receiver skips the packets it would drop, and the others must keep their fates).
pub(super) struct PacketRng {
    state: u64,
}

impl PacketRng {
    pub(super) fn new(seed: u64, stream: (u32, Direction), packet: u64) -> Self {
        let link = (u64::from(stream.0) << 1) | stream.1 as u64;
        let key = mix(mix(seed ^ mix(link)) ^ packet);
        Self { state: key }
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl rand::RngCore for PacketRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        rand_core_fill(self, dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        rand_core_fill(self, dest);
        Ok(())
    }
}

fn rand_core_fill(rng: &mut PacketRng, dest: &mut [u8]) {
    use rand::RngCore;
    for chunk in dest.chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Uniform in [0, jitter] nanoseconds; no draw when the jitter is zero.
fn draw_jitter<R: Rng>(rng: &mut R, jitter: Duration) -> u64 {
    let max = nanos(jitter);
    if max == 0 {
        0
    } else {
        rng.gen_range(0..=max)
    }
}

/// A duration in nanoseconds, saturating (validated delays are far below the limit).
pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
