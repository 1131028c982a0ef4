//! Impairments of the userspace switch: their TOML configuration and a sans-IO, seeded engine
//! that decides the fate of each frame.
//!
//! This module owns the switch's configuration types ([`SwitchConfig`], [`PortConfig`],
//! [`Impairment`] and its parts) and the per-port, per-direction decision of what happens to a
//! frame: dropped (and why), or delivered at one or two times, possibly corrupted. It has no
//! sockets, threads or clock: time is always an argument, counted from the switch's start, and
//! every random draw comes from a ChaCha8 generator seeded from `(seed, port index,
//! direction)`, so the same inputs give the same fates.
//!
//! A scenario file names impairments like this (every field optional, absent means none):
//!
//! ```toml
//! seed = 7
//! counters_path = "/tmp/counters.json"
//!
//! [[port]]
//! name = "h1"
//! ifname = "rkc123p1b"
//! ingress = { loss = { model = "iid", p = 0.2 } }
//!
//! [[port]]
//! name = "h2"
//! ifname = "rkc123p2b"
//!
//! [port.egress]
//! loss = { model = "gilbert_elliott", average = 0.05, mean_burst = 4.0 }
//! delay_ms = 20
//! jitter_ms = 5
//! reorder = { p = 0.01, extra_delay_ms = 10 }
//! duplicate = { p = 0.01 }
//! corrupt = { p = 0.001 }
//! rate = { bits_per_second = 10_000_000, burst_bytes = 30_000 }
//! outages = [{ from_ms = 5_000, to_ms = 7_000 }]
//! ```
//!
//! Ingress is the direction from the host into the switch (frames the host sends), egress the
//! direction from the switch to the host (frames the host receives). A frame crossing the
//! switch from port A to port B goes through A's ingress impairments, then B's egress
//! impairments.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rekeycast_nack::loss::{Loss as ModelLoss, LossError, LossModel};
use serde::{Deserialize, Serialize};

use crate::switch::forwarding::MAX_PORTS;

/// The configuration of one switch process (`rekeycast-netns switch --config FILE.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// The seed of every random draw of the switch; each port and direction derives its own
    /// generator from it, so runs with the same seed and the same traffic see the same fates.
    #[serde(default)]
    pub seed: u64,
    /// Where the switch writes its counters as one JSON object, every 500 ms and on exit
    /// (written to a temporary file beside it, then renamed). None: only on the `counters`
    /// command.
    #[serde(default)]
    pub counters_path: Option<PathBuf>,
    /// The most frames waiting in the delay queue at once; frames beyond it are dropped and
    /// counted as `dropped_queue_full` (the queue is also bounded in bytes, by
    /// [`crate::switch::MAX_QUEUED_BYTES`]). Defaults to
    /// [`SwitchConfig::DEFAULT_QUEUE_CAPACITY`].
    #[serde(default = "SwitchConfig::default_queue_capacity")]
    pub queue_capacity: usize,
    /// The switch's ports, in order; a port's index in this list chooses its random streams
    /// (see [`Impairer::new`]), its name keys its counters. Written `[[port]]` in TOML.
    #[serde(rename = "port", default)]
    pub ports: Vec<PortConfig>,
}

impl SwitchConfig {
    /// The default of [`SwitchConfig::queue_capacity`]: 65,536 frames (about 100 MB of
    /// full-size frames).
    pub const DEFAULT_QUEUE_CAPACITY: usize = 65_536;

    fn default_queue_capacity() -> usize {
        Self::DEFAULT_QUEUE_CAPACITY
    }

    /// Parses a configuration from TOML text and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Toml {
            message: error.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|error| match error {
            ConfigError::Toml { message } => ConfigError::Toml {
                message: format!("{}: {message}", path.display()),
            },
            other => other,
        })
    }

    /// The configuration as TOML text (what a scenario runner writes for the switch).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|error| ConfigError::Toml {
            message: error.to_string(),
        })
    }

    /// Checks every port: at least one and at most [`MAX_PORTS`], unique names and interfaces, interface names of at
    /// most 15 bytes, a non-zero queue capacity, and valid impairments.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ports.is_empty() {
            return Err(ConfigError::NoPorts);
        }
        if self.ports.len() > MAX_PORTS {
            return Err(ConfigError::Invalid {
                field: "port".into(),
                reason: format!("{} ports, at most {MAX_PORTS}", self.ports.len()),
            });
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::Invalid {
                field: "queue_capacity".into(),
                reason: "must be at least 1".into(),
            });
        }
        for (index, port) in self.ports.iter().enumerate() {
            if port.ifname.is_empty() || port.ifname.len() > 15 {
                return Err(ConfigError::Invalid {
                    field: format!("port[{index}].ifname"),
                    reason: format!("{:?} must be 1 to 15 bytes", port.ifname),
                });
            }
            for other in &self.ports[..index] {
                if other.name == port.name {
                    return Err(ConfigError::Invalid {
                        field: format!("port[{index}].name"),
                        reason: format!("{:?} is used by another port", port.name),
                    });
                }
                if other.ifname == port.ifname {
                    return Err(ConfigError::Invalid {
                        field: format!("port[{index}].ifname"),
                        reason: format!("{:?} is used by another port", port.ifname),
                    });
                }
            }
            port.ingress.validate(&format!("port[{index}].ingress"))?;
            port.egress.validate(&format!("port[{index}].egress"))?;
        }
        Ok(())
    }
}

/// One port of the switch: an interface in the switch's namespace (the switch's end of a veth
/// pair whose other end is in a host's namespace) and its impairments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// The port's name in commands (`outage NAME 2000`) and counters, usually the host's.
    pub name: String,
    /// The interface the port opens, in the switch's namespace.
    pub ifname: String,
    /// Impairments of frames from the host into the switch.
    #[serde(default)]
    pub ingress: Impairment,
    /// Impairments of frames from the switch to the host.
    #[serde(default)]
    pub egress: Impairment,
}

/// The impairments of one direction of one port. The default impairs nothing.
///
/// They apply in this order: an outage drops the frame; then the rate limit (the frame's bytes
/// must fit the token bucket); then loss; then corruption and duplication are decided; then
/// the delivery time: delay plus jitter, plus the reordering delay for the frames chosen to be
/// reordered. A duplicate gets its own jitter, so it may arrive before or after the original.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Impairment {
    /// How frames are lost.
    pub loss: Loss,
    /// The base one-way delay added to every frame, in milliseconds.
    pub delay_ms: u64,
    /// Jitter: each frame's delay is drawn uniformly from `delay_ms - jitter_ms ..= delay_ms +
    /// jitter_ms` milliseconds (at microsecond granularity), clamped at zero. Jitter larger
    /// than the spacing of frames reorders them too.
    pub jitter_ms: u64,
    /// Deliberate reordering: frames held back so later ones overtake them.
    pub reorder: Option<Reorder>,
    /// Duplication: frames delivered twice.
    pub duplicate: Option<Duplicate>,
    /// Corruption: one bit of a UDP payload flipped, checksums made valid again.
    pub corrupt: Option<Corrupt>,
    /// A token-bucket rate limit; frames beyond it are dropped.
    pub rate: Option<Rate>,
    /// Windows during which the direction is blackholed, in milliseconds since the switch
    /// started. Like every impairment, they spare the control plane (ARP, IGMP): a host's
    /// group membership and address survive an outage, only its data is lost.
    pub outages: Vec<Outage>,
}

impl Impairment {
    /// Whether this impairs nothing at all (frames pass at once, untouched).
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// Checks every probability is within 0 to 1, the Gilbert-Elliott parameters are
    /// reachable, the rate is positive and every outage ends after it starts. `field` names
    /// this impairment in errors.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let invalid = |name: &str, reason: String| ConfigError::Invalid {
            field: format!("{field}.{name}"),
            reason,
        };
        let probability = |name: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(invalid(name, format!("{p} is not a probability (0 to 1)")))
            }
        };
        self.loss.to_model().map_err(|error| {
            let knob = match error {
                LossError::MeanLoss(_) | LossError::Unreachable { .. } => "loss.average",
                LossError::MeanBurst(_) => "loss.mean_burst",
                _ => "loss.p",
            };
            invalid(knob, error.to_string())
        })?;
        if let Some(reorder) = &self.reorder {
            probability("reorder.p", reorder.p)?;
        }
        if let Some(duplicate) = &self.duplicate {
            probability("duplicate.p", duplicate.p)?;
        }
        if let Some(corrupt) = &self.corrupt {
            probability("corrupt.p", corrupt.p)?;
        }
        if let Some(rate) = &self.rate {
            if rate.bits_per_second == 0 {
                return Err(invalid("rate.bits_per_second", "must be above 0".into()));
            }
            if rate.burst_bytes == 0 {
                return Err(invalid("rate.burst_bytes", "must be above 0".into()));
            }
        }
        for (index, outage) in self.outages.iter().enumerate() {
            if outage.to_ms <= outage.from_ms {
                return Err(invalid(
                    &format!("outages[{index}]"),
                    format!(
                        "ends ({} ms) before or when it starts ({} ms)",
                        outage.to_ms, outage.from_ms
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A loss model, written as a table tagged by `model`: `{ model = "none" }`, `{ model = "iid",
/// p = 0.1 }` or `{ model = "gilbert_elliott", average = 0.05, mean_burst = 4.0 }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum Loss {
    /// No loss.
    #[default]
    None,
    /// Each frame is lost independently with probability `p`.
    Iid {
        /// The loss probability, 0 to 1.
        p: f64,
    },
    /// Bursty loss: Gilbert-Elliott with every frame lost in the bad state and none in the
    /// good state, stepped once per frame ([`ModelLoss::bursty`]: a burst lasts `mean_burst`
    /// frames on average, and `average` must not exceed `mean_burst / (1 + mean_burst)`).
    GilbertElliott {
        /// The long-run fraction of frames lost, at least 0 and below 1.
        average: f64,
        /// The mean length of a run of lost frames, at least 1.
        mean_burst: f64,
    },
}

impl Loss {
    /// The workspace's loss model this setting describes (the model the simulators use), or
    /// why it is refused.
    pub fn to_model(self) -> Result<ModelLoss, LossError> {
        let model = match self {
            Self::None => ModelLoss::None,
            Self::Iid { p } => ModelLoss::Bernoulli { p },
            Self::GilbertElliott {
                average,
                mean_burst,
            } => ModelLoss::bursty(average, mean_burst)?,
        };
        model.validate()?;
        Ok(model)
    }
}

/// Reordering: each frame is, with probability `p`, held `extra_delay_ms` longer than its delay,
/// so the frames behind it overtake it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reorder {
    /// The probability that a frame is held back, 0 to 1.
    pub p: f64,
    /// How much longer it is held, in milliseconds.
    pub extra_delay_ms: u64,
}

/// Duplication: each frame is, with probability `p`, delivered twice.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Duplicate {
    /// The probability that a frame is duplicated, 0 to 1.
    pub p: f64,
}

/// Corruption: each UDP-over-IPv4 frame is, with probability `p`, delivered with one random
/// bit of its UDP payload flipped and its UDP checksum recomputed, so the receiving
/// application sees the corrupted bytes instead of the kernel discarding them. Other frames
/// (ARP, non-UDP, IPv4 fragments, empty payloads) are never corrupted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Corrupt {
    /// The probability that a UDP frame is corrupted, 0 to 1.
    pub p: f64,
}

/// A token-bucket rate limit on the frames' bytes (Ethernet header included, no preamble or
/// FCS): the bucket holds at most `burst_bytes` and fills at `bits_per_second / 8` bytes per
/// second; a frame passes when the bucket holds at least its length, which is then taken out,
/// and is dropped otherwise. `burst_bytes` below a frame's length drops every such frame.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// The sustained rate, in bits per second, above 0.
    pub bits_per_second: u64,
    /// The bucket's capacity in bytes, above 0 (and at least a full frame, 1,514, to let
    /// full frames through).
    pub burst_bytes: u64,
}

/// A window `[from_ms, to_ms)` of milliseconds since the switch started during which every
/// frame of the direction is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// When the outage starts.
    pub from_ms: u64,
    /// When it ends (exclusive), after `from_ms`.
    pub to_ms: u64,
}

/// The direction of a port that an impairment applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Frames from the host into the switch.
    Ingress,
    /// Frames from the switch to the host.
    Egress,
}

/// Why a switch configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("could not read switch config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not valid TOML for a [`SwitchConfig`].
    #[error("switch config is not valid: {message}")]
    Toml {
        /// The parser's message, with the file's name when read from a file.
        message: String,
    },
    /// The configuration has no port.
    #[error("switch config has no [[port]]")]
    NoPorts,
    /// A field holds a value out of its range.
    #[error("switch config field {field}: {reason}")]
    Invalid {
        /// The field, as a path (`port[1].egress.loss.p`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// What happens to one frame in one direction of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Fate {
    /// The frame is dropped.
    Dropped(DropReason),
    /// The frame goes on.
    Delivered(Delivery),
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The direction was in an outage (configured or commanded).
    Outage,
    /// The frame did not fit the rate limit's token bucket.
    Rate,
    /// The loss model lost it.
    Loss,
}

/// How a frame that is not dropped goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// When it is delivered, since the switch started (the `now` given when nothing delays it).
    pub at: Duration,
    /// When a duplicate of it is delivered too, if it is duplicated.
    pub duplicate_at: Option<Duration>,
    /// Set when the frame is to be corrupted: the random selector of the bit to flip, for
    /// [`corrupt_udp_payload`]. Both copies of a duplicated frame carry the corruption.
    pub corrupt: Option<u64>,
    /// Whether the frame was held back to be reordered.
    pub reordered: bool,
}

/// The impairment engine of one direction of one port: feed it every frame in order with
/// [`Impairer::fate`]; it keeps the loss model's state, the token bucket and the random
/// generator, so the fates depend only on the configuration, the seed, the port index, the
/// direction and the sequence of `(now, length)` it is given.
#[derive(Debug, Clone)]
pub struct Impairer {
    config: Impairment,
    rng: ChaCha8Rng,
    /// The loss process (its Gilbert-Elliott state included).
    loss: LossModel,
    /// Bytes in the token bucket, and when it was last filled.
    tokens: f64,
    refilled_at: Duration,
    /// Outages commanded at run time (`outage PORT MS`), on top of the configured ones.
    commanded_outages: Vec<(Duration, Duration)>,
}

impl Impairer {
    /// An engine for `config`, with its random generator seeded from `seed` and a stream
    /// chosen by `(port_index, direction)`, so every port and direction draws independently.
    pub fn new(
        config: &Impairment,
        seed: u64,
        port_index: usize,
        direction: Direction,
    ) -> Result<Self, ConfigError> {
        config.validate(&format!("port[{port_index}].{direction:?}"))?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let direction_bit = match direction {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        };
        rng.set_stream(((port_index as u64) << 1) | direction_bit);
        // Valid by the check above. The first state is drawn from the stationary distribution,
        // so short runs are not biased towards good.
        let loss = config
            .loss
            .to_model()
            .and_then(|model| LossModel::stationary(model, &mut rng))
            .map_err(|error| ConfigError::Invalid {
                field: format!("port[{port_index}].{direction:?}.loss"),
                reason: error.to_string(),
            })?;
        Ok(Self {
            config: config.clone(),
            rng,
            loss,
            tokens: config.rate.map_or(0.0, |rate| rate.burst_bytes as f64),
            refilled_at: Duration::ZERO,
            commanded_outages: Vec::new(),
        })
    }

    /// Blackholes this direction during `[from, to)` (times since the switch started), on top
    /// of the configured outages. Outages that ended before `from` are forgotten, so repeated
    /// commands do not grow memory.
    pub fn add_outage(&mut self, from: Duration, to: Duration) {
        self.commanded_outages.retain(|&(_, end)| end > from);
        self.commanded_outages.push((from, to));
    }

    /// Whether this direction is blackholed at `now`.
    pub fn in_outage(&self, now: Duration) -> bool {
        let now_ms = now.as_millis();
        self.config
            .outages
            .iter()
            .any(|outage| u128::from(outage.from_ms) <= now_ms && now_ms < u128::from(outage.to_ms))
            || self
                .commanded_outages
                .iter()
                .any(|&(from, to)| from <= now && now < to)
    }

    /// Decides the fate of a frame of `length` bytes arriving at `now` (since the switch
    /// started). Call it for every frame of this direction, in order of arrival.
    pub fn fate(&mut self, now: Duration, length: usize) -> Fate {
        if self.in_outage(now) {
            return Fate::Dropped(DropReason::Outage);
        }
        if let Some(rate) = self.config.rate {
            let elapsed = now.saturating_sub(self.refilled_at).as_secs_f64();
            self.refilled_at = self.refilled_at.max(now);
            let capacity = rate.burst_bytes as f64;
            self.tokens = (self.tokens + elapsed * rate.bits_per_second as f64 / 8.0).min(capacity);
            let needed = length as f64;
            if self.tokens < needed {
                return Fate::Dropped(DropReason::Rate);
            }
            self.tokens -= needed;
        }
        let lost = self.loss.lose(&mut self.rng);
        if lost {
            return Fate::Dropped(DropReason::Loss);
        }
        let corrupt = match self.config.corrupt {
            Some(corrupt) if self.rng.gen::<f64>() < corrupt.p => Some(self.rng.gen::<u64>()),
            _ => None,
        };
        let duplicated =
            matches!(self.config.duplicate, Some(duplicate) if self.rng.gen::<f64>() < duplicate.p);
        let reordered =
            matches!(self.config.reorder, Some(reorder) if self.rng.gen::<f64>() < reorder.p);
        let mut at = now + self.delay();
        if reordered {
            if let Some(reorder) = self.config.reorder {
                at += Duration::from_millis(reorder.extra_delay_ms);
            }
        }
        let duplicate_at = duplicated.then(|| now + self.delay());
        Fate::Delivered(Delivery {
            at,
            duplicate_at,
            corrupt,
            reordered,
        })
    }

    /// One draw of the delay: `delay_ms` plus uniform jitter of up to `jitter_ms` either way,
    /// at microsecond granularity, never below zero.
    fn delay(&mut self) -> Duration {
        let base = i128::from(self.config.delay_ms) * 1000;
        let jitter = i128::from(self.config.jitter_ms) * 1000;
        let micros = if jitter == 0 {
            base
        } else {
            base + self.rng.gen_range(-jitter..=jitter)
        };
        Duration::from_micros(u64::try_from(micros.max(0)).unwrap_or(u64::MAX))
    }
}

/// Why [`corrupt_udp_payload`] left a frame alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotCorruptible {
    /// Shorter than an Ethernet header, or not IPv4 (EtherType other than 0x0800).
    #[error("not an IPv4 frame")]
    NotIpv4,
    /// The IPv4 header is truncated or inconsistent (version, header length, total length).
    #[error("malformed IPv4 header")]
    MalformedIpv4,
    /// Not UDP.
    #[error("not UDP")]
    NotUdp,
    /// An IPv4 fragment: the UDP checksum covers bytes this frame does not hold.
    #[error("IPv4 fragment")]
    Fragment,
    /// The UDP header is truncated or its length inconsistent.
    #[error("malformed UDP header")]
    MalformedUdp,
    /// The UDP payload is empty: no bit to flip.
    #[error("empty UDP payload")]
    EmptyPayload,
}

/// Flips one bit of the UDP payload of an Ethernet + IPv4 + UDP frame, chosen by `selector`
/// (modulo the payload's bit count), then recomputes the UDP checksum (left zero when the
/// sender sent none) and the IPv4 header checksum, so the receiver's kernel accepts the frame
/// and the application sees the corrupted bytes. Returns the index of the flipped bit within
/// the payload. Any bytes are accepted: frames that are not whole, unfragmented UDP over IPv4
/// are left untouched with the reason.
pub fn corrupt_udp_payload(frame: &mut [u8], selector: u64) -> Result<usize, NotCorruptible> {
    const ETHERNET: usize = 14;
    if frame.len() < ETHERNET || frame[12..14] != [0x08, 0x00] {
        return Err(NotCorruptible::NotIpv4);
    }
    let ip = &frame[ETHERNET..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Err(NotCorruptible::MalformedIpv4);
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if header_len < 20 || total_len < header_len || total_len > ip.len() {
        return Err(NotCorruptible::MalformedIpv4);
    }
    if ip[9] != 17 {
        return Err(NotCorruptible::NotUdp);
    }
    let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
    if flags_offset & 0x3fff != 0 {
        return Err(NotCorruptible::Fragment);
    }
    let udp_start = ETHERNET + header_len;
    let ip_end = ETHERNET + total_len;
    if ip_end - udp_start < 8 {
        return Err(NotCorruptible::MalformedUdp);
    }
    let udp_len = usize::from(u16::from_be_bytes([
        frame[udp_start + 4],
        frame[udp_start + 5],
    ]));
    if udp_len < 8 || udp_start + udp_len > ip_end {
        return Err(NotCorruptible::MalformedUdp);
    }
    let payload_len = udp_len - 8;
    if payload_len == 0 {
        return Err(NotCorruptible::EmptyPayload);
    }
    // The modulo keeps the index below payload_len * 8, which fits usize (a frame's length).
    let bit = (selector % (payload_len as u64 * 8)) as usize;
    frame[udp_start + 8 + bit / 8] ^= 0x80 >> (bit % 8);

    let had_checksum = frame[udp_start + 6..udp_start + 8] != [0, 0];
    if had_checksum {
        frame[udp_start + 6] = 0;
        frame[udp_start + 7] = 0;
        let checksum = udp_checksum(
            &frame[ETHERNET + 12..ETHERNET + 20],
            &frame[udp_start..udp_start + udp_len],
        );
        frame[udp_start + 6..udp_start + 8].copy_from_slice(&checksum.to_be_bytes());
    }
    frame[ETHERNET + 10] = 0;
    frame[ETHERNET + 11] = 0;
    let header_checksum = !ones_complement_sum(0, &frame[ETHERNET..ETHERNET + header_len]);
    frame[ETHERNET + 10..ETHERNET + 12].copy_from_slice(&header_checksum.to_be_bytes());
    Ok(bit)
}

/// The UDP checksum of `segment` (header with a zero checksum field, then payload) between
/// the IPv4 addresses `addresses` (source then destination, 8 bytes); a result of zero is sent
/// as 0xffff (RFC 768).
pub fn udp_checksum(addresses: &[u8], segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 4];
    pseudo[1] = 17;
    let length = u16::try_from(segment.len()).unwrap_or(u16::MAX);
    pseudo[2..4].copy_from_slice(&length.to_be_bytes());
    let sum = ones_complement_sum(ones_complement_sum(0, addresses), &pseudo);
    match !ones_complement_sum(sum, segment) {
        0 => 0xffff,
        checksum => checksum,
    }
}

/// The 16-bit one's complement sum of `bytes` (odd lengths padded with a zero byte) added to
/// `initial`, folded.
fn ones_complement_sum(initial: u16, bytes: &[u8]) -> u16 {
    let mut sum = u64::from(initial);
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop above folded the sum into 16 bits.
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_example_parses() {
        let text = r#"
            seed = 7
            counters_path = "/tmp/counters.json"

            [[port]]
            name = "h1"
            ifname = "rkc123p1b"
            ingress = { loss = { model = "iid", p = 0.2 } }

            [[port]]
            name = "h2"
            ifname = "rkc123p2b"

            [port.egress]
            loss = { model = "gilbert_elliott", average = 0.05, mean_burst = 4.0 }
            delay_ms = 20
            jitter_ms = 5
            reorder = { p = 0.01, extra_delay_ms = 10 }
            duplicate = { p = 0.01 }
            corrupt = { p = 0.001 }
            rate = { bits_per_second = 10_000_000, burst_bytes = 30_000 }
            outages = [{ from_ms = 5_000, to_ms = 7_000 }]
        "#;
        let config = SwitchConfig::from_toml(text).expect("valid");
        assert_eq!(config.seed, 7);
        assert_eq!(config.ports.len(), 2);
        assert_eq!(config.ports[0].ingress.loss, Loss::Iid { p: 0.2 });
        assert!(config.ports[0].egress.is_none());
        assert!(config.ports[1].ingress.is_none());
        let egress = &config.ports[1].egress;
        assert_eq!(
            egress.loss,
            Loss::GilbertElliott {
                average: 0.05,
                mean_burst: 4.0
            }
        );
        assert_eq!(egress.delay_ms, 20);
        assert_eq!(
            egress.outages,
            vec![Outage {
                from_ms: 5000,
                to_ms: 7000
            }]
        );
        let again = SwitchConfig::from_toml(&config.to_toml().expect("serializes")).expect("valid");
        assert_eq!(again, config);
    }

    #[test]
    fn invalid_configs_are_refused_with_the_field() {
        let cases = [
            ("", "no [[port]]"),
            (
                "[[port]]\nname='a'\nifname='x'\ningress={loss={model='iid',p=1.5}}",
                "port[0].ingress.loss.p",
            ),
            (
                "[[port]]\nname='a'\nifname='x'\negress={loss={model='gilbert_elliott',\
                 average=0.9,mean_burst=2.0}}",
                "port[0].egress.loss.average",
            ),
            (
                "[[port]]\nname='a'\nifname='x'\negress={outages=[{from_ms=5,to_ms=5}]}",
                "port[0].egress.outages[0]",
            ),
            (
                "[[port]]\nname='a'\nifname='x'\n[[port]]\nname='a'\nifname='y'",
                "port[1].name",
            ),
            (
                "[[port]]\nname='a'\nifname='0123456789abcdef'",
                "port[0].ifname",
            ),
            ("[[port]]\nname='a'\nifname='x'\nbogus=1", "bogus"),
            (
                "[[port]]\nname='a'\nifname='x'\ningress={loss={model='iid',p=0.1,q=2}}",
                "q",
            ),
            (
                "[[port]]\nname='a'\nifname='x'\ningress={loss={model='iid'}}",
                "missing field `p`",
            ),
            (
                "[[port]]\nname='a'\nifname='x'\ningress={loss={model='bursty'}}",
                "bursty",
            ),
            (
                "[[port]]\nname='a'\nifname='x'\ningress={rate={bits_per_second=0,burst_bytes=1}}",
                "port[0].ingress.rate.bits_per_second",
            ),
        ];
        for (text, expected) in cases {
            let error = SwitchConfig::from_toml(text).expect_err(text).to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn engine(config: Impairment) -> Impairer {
        Impairer::new(&config, 42, 0, Direction::Ingress).expect("valid impairment")
    }

    /// Feeds `count` frames of 1,000 bytes, one per millisecond.
    fn fates(impairer: &mut Impairer, count: u32) -> Vec<Fate> {
        (0..count).map(|i| impairer.fate(MS * i, 1000)).collect()
    }

    fn delivered(fate: &Fate) -> Option<Delivery> {
        match fate {
            Fate::Delivered(delivery) => Some(*delivery),
            Fate::Dropped(_) => None,
        }
    }

    #[test]
    fn no_impairment_delivers_everything_at_once() {
        let mut impairer = engine(Impairment::default());
        for (i, fate) in fates(&mut impairer, 1000).iter().enumerate() {
            let expected = Delivery {
                at: MS * i as u32,
                duplicate_at: None,
                corrupt: None,
                reordered: false,
            };
            assert_eq!(*fate, Fate::Delivered(expected));
        }
    }

    /// The switch loses exactly the frames the workspace's loss model loses when drawing from
    /// the same stream (the model's rates and bursts are checked in `rekeycast_nack::loss`).
    #[test]
    fn losses_are_the_shared_models_draws() {
        let cases = [
            (Loss::Iid { p: 0.2 }, ModelLoss::Bernoulli { p: 0.2 }),
            (
                Loss::GilbertElliott {
                    average: 0.05,
                    mean_burst: 10.0,
                },
                ModelLoss::BURSTY_5_PERCENT,
            ),
        ];
        for (loss, model) in cases {
            assert_eq!(loss.to_model(), Ok(model));
            let mut impairer = engine(Impairment {
                loss,
                ..Impairment::default()
            });
            let lost: Vec<bool> = fates(&mut impairer, 20_000)
                .iter()
                .map(|fate| *fate == Fate::Dropped(DropReason::Loss))
                .collect();
            // `engine` seeds 42, port 0, ingress: stream 0.
            let mut rng = ChaCha8Rng::seed_from_u64(42);
            rng.set_stream(0);
            let mut reference = LossModel::stationary(model, &mut rng).expect("valid");
            let expected: Vec<bool> = (0..20_000).map(|_| reference.lose(&mut rng)).collect();
            assert_eq!(lost, expected, "{loss:?}");
            assert!(lost.iter().any(|l| *l) && !lost.iter().all(|l| *l));
        }
    }

    #[test]
    fn delay_and_jitter_stay_within_bounds_and_spread() {
        let mut impairer = engine(Impairment {
            delay_ms: 20,
            jitter_ms: 5,
            ..Impairment::default()
        });
        let all = fates(&mut impairer, 10_000);
        let delays: Vec<Duration> = all
            .iter()
            .enumerate()
            .map(|(i, fate)| delivered(fate).expect("no loss").at - MS * i as u32)
            .collect();
        let min = delays.iter().min().copied().expect("frames");
        let max = delays.iter().max().copied().expect("frames");
        assert!(min >= MS * 15 && max <= MS * 25, "{min:?} .. {max:?}");
        assert!(min < MS * 16 && max > MS * 24, "{min:?} .. {max:?}");
        let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
        assert!(mean > MS * 19 && mean < MS * 21, "{mean:?}");

        // Jitter larger than the delay is clamped at zero, never negative.
        let mut impairer = engine(Impairment {
            delay_ms: 1,
            jitter_ms: 5,
            ..Impairment::default()
        });
        for (i, fate) in fates(&mut impairer, 1000).iter().enumerate() {
            let at = delivered(fate).expect("no loss").at;
            assert!(at >= MS * i as u32 && at <= MS * (i as u32 + 6));
        }
    }

    #[test]
    fn reordering_reorders() {
        let mut impairer = engine(Impairment {
            reorder: Some(Reorder {
                p: 0.1,
                extra_delay_ms: 5,
            }),
            ..Impairment::default()
        });
        let all: Vec<Delivery> = fates(&mut impairer, 10_000)
            .iter()
            .map(|fate| delivered(fate).expect("no loss"))
            .collect();
        let held = all.iter().filter(|delivery| delivery.reordered).count();
        assert!((800..1200).contains(&held), "{held} held back");
        for (i, delivery) in all.iter().enumerate() {
            let expected = MS * i as u32
                + if delivery.reordered {
                    MS * 5
                } else {
                    Duration::ZERO
                };
            assert_eq!(delivery.at, expected);
        }
        // Sorting by delivery time (ties keep sending order) puts frames out of sending order.
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by_key(|&i| all[i].at);
        let overtaken = order.windows(2).filter(|pair| pair[0] > pair[1]).count();
        assert!(overtaken > 700, "{overtaken} frames overtaken");
    }

    #[test]
    fn duplication_duplicates_at_its_rate() {
        let mut impairer = engine(Impairment {
            duplicate: Some(Duplicate { p: 0.1 }),
            delay_ms: 3,
            ..Impairment::default()
        });
        let all = fates(&mut impairer, 10_000);
        let duplicates: Vec<Duration> = all
            .iter()
            .enumerate()
            .filter_map(|(i, fate)| {
                let delivery = delivered(fate).expect("no loss");
                delivery.duplicate_at.map(|at| at - MS * i as u32)
            })
            .collect();
        assert!(
            (850..1150).contains(&duplicates.len()),
            "{}",
            duplicates.len()
        );
        assert!(duplicates.iter().all(|&delay| delay == MS * 3));
    }

    fn udp_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 20 + 8 + payload.len()];
        frame[0..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip_len = (20 + 8 + payload.len()) as u16;
        let ip = &mut frame[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 1;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
        ip[16..20].copy_from_slice(&[239, 1, 2, 3]);
        let header_checksum = !ones_complement_sum(0, &frame[14..34]);
        frame[24..26].copy_from_slice(&header_checksum.to_be_bytes());
        let udp_len = (8 + payload.len()) as u16;
        frame[34..36].copy_from_slice(&40000u16.to_be_bytes());
        frame[36..38].copy_from_slice(&45001u16.to_be_bytes());
        frame[38..40].copy_from_slice(&udp_len.to_be_bytes());
        frame[42..].copy_from_slice(payload);
        let checksum = udp_checksum(&frame[26..34], &frame[34..]);
        frame[40..42].copy_from_slice(&checksum.to_be_bytes());
        frame
    }

    /// Whether the IPv4 header and UDP checksums of `frame` verify as a receiver checks them.
    fn checksums_verify(frame: &[u8]) -> bool {
        let header_ok = ones_complement_sum(0, &frame[14..34]) == 0xffff;
        let mut pseudo = frame[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&((frame.len() - 34) as u16).to_be_bytes());
        let udp_ok = ones_complement_sum(ones_complement_sum(0, &pseudo), &frame[34..]) == 0xffff;
        header_ok && udp_ok
    }

    fn differing_bits(a: &[u8], b: &[u8]) -> u32 {
        a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
    }

    #[test]
    fn corruption_flips_exactly_one_payload_bit_and_checksums_verify() {
        let original = udp_frame(b"rekeycast corruption test payload");
        assert!(checksums_verify(&original));
        let mut seen_bits = std::collections::HashSet::new();
        for selector in (0..2000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
            let mut frame = original.clone();
            let bit = corrupt_udp_payload(&mut frame, selector).expect("UDP frame");
            assert!(bit < 33 * 8);
            seen_bits.insert(bit);
            // One payload bit, and the UDP checksum field, changed; nothing else.
            assert_eq!(differing_bits(&frame[42..], &original[42..]), 1);
            assert_eq!(frame[..40], original[..40]);
            assert!(checksums_verify(&frame), "selector {selector}");
        }
        assert!(seen_bits.len() > 200, "bits spread: {}", seen_bits.len());
    }

    #[test]
    fn corruption_keeps_a_zero_udp_checksum_zero() {
        let mut frame = udp_frame(b"no checksum");
        frame[40] = 0;
        frame[41] = 0;
        let original = frame.clone();
        corrupt_udp_payload(&mut frame, 3).expect("UDP frame");
        assert_eq!(frame[40..42], [0, 0]);
        assert_eq!(differing_bits(&frame, &original), 1);
    }

    #[test]
    fn corruption_leaves_other_frames_alone_and_never_panics() {
        let original = udp_frame(b"payload");
        let mut arp = original.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut tcp = original.clone();
        tcp[23] = 6;
        let mut fragment = original.clone();
        fragment[20] = 0x20; // more fragments
        let empty = udp_frame(b"");
        for (frame, reason) in [
            (arp, NotCorruptible::NotIpv4),
            (tcp, NotCorruptible::NotUdp),
            (fragment, NotCorruptible::Fragment),
            (empty, NotCorruptible::EmptyPayload),
        ] {
            let mut copy = frame.clone();
            assert_eq!(corrupt_udp_payload(&mut copy, 7), Err(reason));
            assert_eq!(copy, frame);
        }
        // Truncated at every length, and every single-byte value at every position.
        for len in 0..original.len() {
            let mut copy = original[..len].to_vec();
            assert!(corrupt_udp_payload(&mut copy, 7).is_err(), "length {len}");
        }
        for position in 0..original.len() {
            for value in 0..=255u8 {
                let mut copy = original.clone();
                copy[position] = value;
                let _ = corrupt_udp_payload(&mut copy, u64::from(value));
            }
        }
    }

    #[test]
    fn rate_limit_passes_the_rate_plus_the_burst() {
        // 1 Mbit/s with a 3,000-byte bucket, offered 1,000-byte frames at 8 Mbit/s for 10 s.
        let mut impairer = engine(Impairment {
            rate: Some(Rate {
                bits_per_second: 1_000_000,
                burst_bytes: 3000,
            }),
            ..Impairment::default()
        });
        let all = fates(&mut impairer, 10_000);
        let passed = all.iter().filter(|fate| delivered(fate).is_some()).count();
        let dropped = all
            .iter()
            .filter(|fate| **fate == Fate::Dropped(DropReason::Rate))
            .count();
        assert_eq!(passed + dropped, 10_000);
        // 10 s at 125,000 bytes/s is 1,250 frames, plus the 3 the full bucket holds.
        assert!((1245..=1254).contains(&passed), "{passed} passed");
        // The first three pass at once, the fourth not.
        assert!(all[..3].iter().all(|fate| delivered(fate).is_some()));
        assert_eq!(all[3], Fate::Dropped(DropReason::Rate));
        // Idle time refills the bucket up to its capacity only.
        let mut impairer = engine(Impairment {
            rate: Some(Rate {
                bits_per_second: 1_000_000,
                burst_bytes: 3000,
            }),
            ..Impairment::default()
        });
        let later = Duration::from_secs(100);
        let burst: Vec<Fate> = (0..5).map(|_| impairer.fate(later, 1000)).collect();
        assert_eq!(
            burst
                .iter()
                .filter(|fate| delivered(fate).is_some())
                .count(),
            3
        );
    }

    #[test]
    fn outages_blackhole_their_windows() {
        let mut impairer = engine(Impairment {
            outages: vec![Outage {
                from_ms: 100,
                to_ms: 200,
            }],
            ..Impairment::default()
        });
        impairer.add_outage(MS * 500, MS * 550);
        let all = fates(&mut impairer, 1000);
        for (i, fate) in all.iter().enumerate() {
            let blackholed = (100..200).contains(&i) || (500..550).contains(&i);
            if blackholed {
                assert_eq!(*fate, Fate::Dropped(DropReason::Outage), "ms {i}");
            } else {
                assert!(delivered(fate).is_some(), "ms {i}");
            }
        }
        // Ended commanded outages are forgotten when new ones come.
        for i in 0..1000u32 {
            impairer.add_outage(MS * (2000 + 10 * i), MS * (2005 + 10 * i));
        }
        assert!(impairer.commanded_outages.len() <= 2);
    }

    #[test]
    fn same_seed_same_fates_other_port_or_direction_other_fates() {
        let config = Impairment {
            loss: Loss::GilbertElliott {
                average: 0.1,
                mean_burst: 3.0,
            },
            delay_ms: 10,
            jitter_ms: 4,
            reorder: Some(Reorder {
                p: 0.05,
                extra_delay_ms: 7,
            }),
            duplicate: Some(Duplicate { p: 0.05 }),
            corrupt: Some(Corrupt { p: 0.05 }),
            rate: Some(Rate {
                bits_per_second: 5_000_000,
                burst_bytes: 20_000,
            }),
            outages: vec![Outage {
                from_ms: 300,
                to_ms: 400,
            }],
        };
        let run = |seed, port, direction| {
            let mut impairer =
                Impairer::new(&config, seed, port, direction).expect("valid impairment");
            fates(&mut impairer, 5000)
        };
        let reference = run(9, 1, Direction::Egress);
        assert_eq!(run(9, 1, Direction::Egress), reference);
        assert_ne!(run(10, 1, Direction::Egress), reference);
        assert_ne!(run(9, 2, Direction::Egress), reference);
        assert_ne!(run(9, 1, Direction::Ingress), reference);
    }
}
