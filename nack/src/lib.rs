//! rekeycast-nack: sans-IO NACK scheduling, suppression, repair aggregation and GRTT.
//!
//! This crate decides when a receiver asks for repair and how much the sender sends. It owns
//! no socket, no clock and no thread (quinn-proto style): every input takes the current time
//! as an argument, every output is polled, and every random choice comes from a
//! [`rand_chacha::ChaCha8Rng`] seeded from the configuration, so a run reproduces exactly.
//!
//! - [`NackScheduler`] (receiver side): one randomized, truncated-exponential NACK backoff
//!   timer per incomplete block, suppressed by NACKs or repair advertisements heard for the
//!   same block asking for at least as much, re-armed per round, [`Event::OutOfSync`] after
//!   the configured number of rounds (RFC 5740 5.5.2, RFC 5401).
//! - [`RepairAggregator`] (sender side): NACKs collected per block over a hold-off window, one
//!   repair order of fresh ESIs per block and round between a floor and a ceiling (see the
//!   policy below), top-ups, token-bucket pacing, immediate repair advertisements for the
//!   unicast feedback mode.
//! - [`GrttEstimator`]: probe timestamps, echoes, a decaying maximum within bounds.
//! - [`ProactiveRepair`]: the number of proactive repair symbols per block from a loss rate
//!   learnt from NACK statistics (the Keystone / UKA idea), for a target fraction of
//!   NACKing receivers.
//! - [`backoff`]: the backoff distribution and the analytic expectation of NACKs per loss.
//! - [`duration_ms`]: serde's form of a configuration's durations, whole milliseconds.
//! - [`loss`]: the workspace's one per-packet loss model (independent and Gilbert-Elliott,
//!   seeded), shared by [`sim`], the network simulator of `rekeycast` and the netns switch.
//! - [`sim`]: a seeded discrete-event simulator of one sender and many receivers, used by the
//!   tests and by `rekeycast-bench nack`.
//!
//! # The repair policy
//!
//! A rekey member needs one chunk of each message (user-oriented key assignment), so what
//! matters is how many members end up without their chunk, not how many symbols the worst
//! receiver lacks. The policy follows Keystone (Zhang, Lam, Lee and Yang, "Protocol design
//! for scalable and reliable group rekeying", IEEE/ACM ToN 2003) and their limited unicast
//! recovery:
//!
//! 1. **Proactive FEC from the distribution of needs.** Per block of `k` chunks the sender
//!    adds `h` repair symbols, the fewest for which the expected fraction of the block's
//!    members that must NACK, `f = p * P(Binomial(k + h - 1, p) >= h)` (own chunk lost and
//!    the block not decodable), is within a target ([`ProactiveConfig::target_fraction`]).
//!    The loss rate `p` is learnt by likelihood from each block's first round (whether any
//!    member NACKed it, and the need of the NACK that opened the round, a fair draw of a
//!    NACKing member's need; see [`proactive`]), so `h` adapts to loss, block size and
//!    message size without tuning; the group size enters through the number of members
//!    each block serves, `R`: a block none of whose `R` members NACKed is evidence of a low
//!    rate in proportion to `R`.
//! 2. **One or two multicast rounds, sized from the distribution.** The first NACK of a round
//!    is answered at once (no hold-off): the order is at least the need that covers nine in
//!    ten NACKing members (so the advertisement suppresses them) and at most the repair after
//!    which the expected number of the block's members still missing their chunk is a small
//!    residual ([`ProactiveRepair::repair_bounds`]) — not the worst receiver's need. NACKs
//!    of the round sent before the advertisement reached their senders join the order (a
//!    top-up within that ceiling) during the receivers' backoff window instead of opening a
//!    new round. On the receiver side, a member whose timer fires while the round's
//!    advertised count is below its need waits one GRTT for a raised count before NACKing
//!    (a NACK from another member needing more is answered by a top-up advertisement within
//!    about a round trip), so the NACKs of those needing more than the first order are
//!    about one per GRTT of the backoff window, not one per member: flat in group size.
//! 3. **Then unicast.** After [`SchedulerConfig::multicast_rounds`] rounds a member still
//!    missing its chunk asks for it alone ([`Nack::unicast_chunk`]): one MAC-sealed datagram
//!    from the sender (or its relay) to that member, never suppressed, rate-limited per
//!    source at the sender. By the model above these are a handful per message, so unicast
//!    costs little and the tail does not wait for more multicast rounds; a member gets
//!    several requests ([`SchedulerConfig::max_rounds`]), since each crosses a lossy link
//!    twice. TCP/HTTP resync is left for members that missed whole messages.
//! 4. **Few GRTTs.** The GRTT estimate converges in a few round trips after start and after a
//!    rise ([`GrttConfig::converging_intervals`]), within the insiders' bounds, so backoff
//!    windows and waits fit the real round trip.
//!
//! The types here map 1:1 to the wire formats of the `rekeycast` crate (which depends on this
//! one, not the other way round): [`Nack`] to `wire::nack::NackRepr`, [`ProbeEcho`] to
//! `wire::nack::ProbeEcho`, [`Advertisement`] and [`RepairOrder`] to a heartbeat's
//! `RepairEntry`, [`HeartbeatInfo`] to the fields of `wire::heartbeat::HeartbeatRepr` that
//! feedback uses.
#![forbid(unsafe_code)]

pub mod aggregator;
pub mod backoff;
pub mod duration_ms;
pub mod grtt;
pub mod loss;
pub mod proactive;
pub mod scheduler;
pub mod sim;

pub use aggregator::{
    Advertisement, AggregatorConfig, AggregatorStats, IncomingNack, NackDisposition,
    RepairAggregator, RepairOrder, RepairSymbol,
};
pub use grtt::{GrttConfig, GrttEstimator};
pub use proactive::{nack_fraction, BlockNackStats, ProactiveConfig, ProactiveRepair};
pub use scheduler::{Event, HeartbeatInfo, Nack, NackScheduler, SchedulerConfig};

/// Which FEC object of a rekey message a block belongs to (the wire's `ObjectKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectId {
    /// The signed manifest (wire value 0).
    Manifest,
    /// The chunks, the user-oriented key packets (wire value 1).
    Chunks,
}

impl ObjectId {
    /// The wire value of the object kind.
    pub const fn to_u8(self) -> u8 {
        match self {
            Self::Manifest => 0,
            Self::Chunks => 1,
        }
    }

    /// The object kind of a wire value, if it names one.
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Manifest),
            1 => Some(Self::Chunks),
            _ => None,
        }
    }
}

/// One FEC source block of one rekey message: the unit NACKs and repair are about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// The rekey message's sequence number.
    pub seq: u64,
    /// The FEC object within the message.
    pub object: ObjectId,
    /// The source block number (RFC 6330 SBN).
    pub sbn: u8,
}

/// A GRTT probe echo: the sender's probe timestamp and how long the receiver held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeEcho {
    /// The probe timestamp from the sender's heartbeat, microseconds of the sender's clock.
    pub timestamp_us: u64,
    /// Time between receiving the probe and sending the echo, microseconds.
    pub hold_us: u32,
}

/// Where receivers send their NACKs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FeedbackMode {
    /// NACKs go unicast to the sender (or relay), which at once multicasts a repair
    /// advertisement that suppresses the others. Works on source-specific multicast and on
    /// any network, hence the default.
    #[default]
    Unicast,
    /// NACKs are multicast to the group, so receivers hear and suppress each other (RFC 5740's
    /// any-source multicast mode).
    Multicast,
}

/// A configuration value this crate cannot work with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field is out of its valid range.
    #[error("invalid configuration: {field} {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Converts a duration to whole microseconds, saturating at `u64::MAX`.
pub(crate) fn duration_us(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
