//! Per-packet loss models: the knobs ([`Loss`]) and a stateful process that draws from them
//! ([`LossModel`]), usable on their own (the netns harness's impairment switch takes the same
//! knobs) or inside a simulated link.

use rand::Rng;

use super::SimError;

/// The knobs of a per-packet loss model, as ALGORITHMS.md ("Loss models") defines them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Loss {
    /// Nothing is lost.
    #[default]
    None,
    /// Independent (Bernoulli) loss: each packet is lost with probability `p`.
    Bernoulli {
        /// Loss probability per packet, in [0, 1].
        p: f64,
    },
    /// Gilbert-Elliott: two states, Good and Bad. For each packet the state first moves
    /// (Good -> Bad with probability `p_gb`, Bad -> Good with `p_bg`), then the packet is lost
    /// with `loss_good` in Good and `loss_bad` in Bad. With `loss_good = 0` and `loss_bad = 1`
    /// the mean loss is `p_gb / (p_gb + p_bg)` and the mean burst length `1 / p_bg`.
    GilbertElliott {
        /// Good -> Bad transition probability per packet, in [0, 1].
        p_gb: f64,
        /// Bad -> Good transition probability per packet, in [0, 1].
        p_bg: f64,
        /// Loss probability in Good (often 0), in [0, 1].
        loss_good: f64,
        /// Loss probability in Bad (often 1), in [0, 1].
        loss_bad: f64,
    },
}

impl Loss {
    /// The bursty setting of ALGORITHMS.md: 5% mean loss in bursts of 10 packets on average.
    pub const BURSTY_5_PERCENT: Self = Self::GilbertElliott {
        p_gb: 0.05 * 0.1 / 0.95,
        p_bg: 0.1,
        loss_good: 0.0,
        loss_bad: 1.0,
    };

    /// Checks that every probability is finite and in [0, 1].
    pub fn validate(&self) -> Result<(), SimError> {
        let ok = match *self {
            Self::None => true,
            Self::Bernoulli { p } => is_probability(p),
            Self::GilbertElliott {
                p_gb,
                p_bg,
                loss_good,
                loss_bad,
            } => [p_gb, p_bg, loss_good, loss_bad]
                .into_iter()
                .all(is_probability),
        };
        if ok {
            Ok(())
        } else {
            Err(SimError::InvalidConfig {
                field: "loss",
                reason: "probabilities must be finite and in [0, 1]",
            })
        }
    }

    /// The long-run fraction of packets lost.
    pub fn mean_loss(&self) -> f64 {
        match *self {
            Self::None => 0.0,
            Self::Bernoulli { p } => p,
            Self::GilbertElliott {
                loss_good,
                loss_bad,
                ..
            } => {
                let bad = self.stationary_bad();
                (1.0 - bad) * loss_good + bad * loss_bad
            }
        }
    }

    /// The long-run probability of the Bad state (0 for the models without one).
    pub(super) fn stationary_bad(&self) -> f64 {
        match *self {
            Self::GilbertElliott { p_gb, p_bg, .. } if p_gb + p_bg > 0.0 => p_gb / (p_gb + p_bg),
            _ => 0.0,
        }
    }
}

/// A loss process: validated [`Loss`] knobs plus the Gilbert-Elliott state, drawing from an RNG
/// the caller holds (so one RNG per link, per direction, keeps runs reproducible).
#[derive(Debug, Clone, PartialEq)]
pub struct LossModel {
    loss: Loss,
    bad: bool,
}

impl LossModel {
    /// A process starting in the Good state.
    pub fn new(loss: Loss) -> Result<Self, SimError> {
        loss.validate()?;
        Ok(Self { loss, bad: false })
    }

    /// A process whose first state is drawn from the stationary distribution (one draw from
    /// `rng` for Gilbert-Elliott, none otherwise), so that a short run is not biased towards
    /// Good. The simulator's links start this way.
    pub fn stationary<R: Rng + ?Sized>(loss: Loss, rng: &mut R) -> Result<Self, SimError> {
        loss.validate()?;
        let bad = match loss {
            Loss::GilbertElliott { .. } => chance(rng, loss.stationary_bad()),
            Loss::None | Loss::Bernoulli { .. } => false,
        };
        Ok(Self { loss, bad })
    }

    /// The knobs.
    pub fn loss(&self) -> Loss {
        self.loss
    }

    /// Whether a Gilbert-Elliott process is in the Bad state (always false for the others).
    pub fn is_bad(&self) -> bool {
        self.bad
    }

    /// Decides the fate of one packet: true when it is lost. Moves the Gilbert-Elliott state
    /// first, as ALGORITHMS.md defines it.
    pub fn lose<R: Rng + ?Sized>(&mut self, rng: &mut R) -> bool {
        lose(&self.loss, &mut self.bad, rng)
    }
}

/// One packet's fate under `loss` with Gilbert-Elliott state `bad`; shared by [`LossModel`]
/// and the simulator's links, which keep the state in a more compact form.
pub(super) fn lose<R: Rng + ?Sized>(loss: &Loss, bad: &mut bool, rng: &mut R) -> bool {
    match *loss {
        Loss::None => false,
        Loss::Bernoulli { p } => chance(rng, p),
        Loss::GilbertElliott {
            p_gb,
            p_bg,
            loss_good,
            loss_bad,
        } => {
            *bad = if *bad {
                !chance(rng, p_bg)
            } else {
                chance(rng, p_gb)
            };
            chance(rng, if *bad { loss_bad } else { loss_good })
        }
    }
}

/// True with probability `p` (assumed validated). Draws nothing when `p` is 0 or 1, so a knob
/// left at zero costs nothing and a certain event consumes no randomness.
pub(super) fn chance<R: Rng + ?Sized>(rng: &mut R, p: f64) -> bool {
    if p <= 0.0 {
        false
    } else if p >= 1.0 {
        true
    } else {
        rng.gen::<f64>() < p
    }
}

/// Finite and in [0, 1] (NaN fails both comparisons).
pub(super) fn is_probability(p: f64) -> bool {
    (0.0..=1.0).contains(&p)
}
