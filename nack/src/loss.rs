//! Per-packet loss models, seeded: independent (Bernoulli) loss and Gilbert-Elliott bursts.
//!
//! This module is the one loss model of the workspace: [`crate::sim`] draws its links' losses
//! from it, and so do the network simulator of the `rekeycast` crate (`rekeycast::sim`, which
//! re-exports it) and the impairment switch of the netns harness, so a loss setting means the
//! same thing in all three. It lives here, in the lowest crate they all depend on, because the
//! library's simulator and the demo need it at run time.
//!
//! [`Loss`] holds the knobs as ALGORITHMS.md ("Loss models") defines them; [`LossModel`] is a
//! process that draws from them, keeping the Gilbert-Elliott state. Randomness comes from an
//! RNG the caller holds (one per link and direction), so runs reproduce. A probability of 0 or
//! 1 draws nothing ([`chance`]), so a knob left at zero costs nothing and does not shift the
//! draws of the others.
//!
//! What it must not do: read a clock, hold an RNG of its own, or panic on any knob value
//! (invalid knobs are refused by [`Loss::validate`] with a [`LossError`]).

use rand::Rng;

/// The knobs of a per-packet loss model.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Loss {
    /// Nothing is lost.
    #[default]
    None,
    /// Independent (Bernoulli, iid) loss: each packet is lost with probability `p`.
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

/// Why a [`Loss`] setting is refused.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LossError {
    /// A probability knob is NaN, infinite or outside [0, 1].
    #[error("{knob} = {value} is not a probability (finite, 0 to 1)")]
    NotAProbability {
        /// The knob (`p`, `p_gb`, `p_bg`, `loss_good` or `loss_bad`).
        knob: &'static str,
        /// Its value.
        value: f64,
    },
    /// A mean loss for [`Loss::bursty`] outside [0, 1).
    #[error("mean loss {0} must be at least 0 and below 1")]
    MeanLoss(f64),
    /// A mean burst length for [`Loss::bursty`] that is not finite or below one packet.
    #[error("mean burst {0} must be a finite number of packets, at least 1")]
    MeanBurst(f64),
    /// A mean loss that bursts of this mean length cannot reach: Good runs would have to be
    /// shorter than one packet (`mean_loss <= mean_burst / (1 + mean_burst)`).
    #[error(
        "mean loss {mean_loss} is unreachable with bursts of mean {mean_burst} packets \
         (at most {limit:.4}: good runs cannot be shorter than one packet)",
        limit = mean_burst / (1.0 + mean_burst)
    )]
    Unreachable {
        /// The mean loss asked for.
        mean_loss: f64,
        /// The mean burst length asked for.
        mean_burst: f64,
    },
}

impl Loss {
    /// The bursty setting of ALGORITHMS.md: 5% mean loss in bursts of 10 packets on average
    /// (`p_bg = 0.1`, `p_gb = 0.05 * 0.1 / 0.95`).
    pub const BURSTY_5_PERCENT: Self = Self::GilbertElliott {
        p_gb: 0.05 * 0.1 / 0.95,
        p_bg: 0.1,
        loss_good: 0.0,
        loss_bad: 1.0,
    };

    /// Gilbert-Elliott loss with every packet lost in Bad and none in Good, set by its mean
    /// loss and mean burst length (in packets): `p_bg = 1 / mean_burst` and, from the Bad
    /// state's stationary probability `p_gb / (p_gb + p_bg) = mean_loss`,
    /// `p_gb = mean_loss * p_bg / (1 - mean_loss)`. A mean loss of 0 gives [`Loss::None`].
    pub fn bursty(mean_loss: f64, mean_burst: f64) -> Result<Self, LossError> {
        if !(0.0..1.0).contains(&mean_loss) {
            return Err(LossError::MeanLoss(mean_loss));
        }
        if !(mean_burst >= 1.0 && mean_burst.is_finite()) {
            return Err(LossError::MeanBurst(mean_burst));
        }
        if mean_loss > mean_burst / (1.0 + mean_burst) {
            return Err(LossError::Unreachable {
                mean_loss,
                mean_burst,
            });
        }
        if mean_loss == 0.0 {
            return Ok(Self::None);
        }
        let p_bg = 1.0 / mean_burst;
        // At the limit the rounding may land a hair above 1: the check above stands for it.
        let p_gb = (mean_loss * p_bg / (1.0 - mean_loss)).min(1.0);
        Ok(Self::GilbertElliott {
            p_gb,
            p_bg,
            loss_good: 0.0,
            loss_bad: 1.0,
        })
    }

    /// Checks that every probability is finite and in [0, 1].
    pub fn validate(&self) -> Result<(), LossError> {
        let check = |knob: &'static str, value: f64| {
            if is_probability(value) {
                Ok(())
            } else {
                Err(LossError::NotAProbability { knob, value })
            }
        };
        match *self {
            Self::None => Ok(()),
            Self::Bernoulli { p } => check("p", p),
            Self::GilbertElliott {
                p_gb,
                p_bg,
                loss_good,
                loss_bad,
            } => {
                check("p_gb", p_gb)?;
                check("p_bg", p_bg)?;
                check("loss_good", loss_good)?;
                check("loss_bad", loss_bad)
            }
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
    pub fn stationary_bad(&self) -> f64 {
        match *self {
            Self::GilbertElliott { p_gb, p_bg, .. } if p_gb + p_bg > 0.0 => p_gb / (p_gb + p_bg),
            _ => 0.0,
        }
    }

    /// Decides the fate of one packet, true when it is lost, with the Gilbert-Elliott state
    /// kept by the caller in `bad` (moved first, then the loss drawn in the new state). For
    /// callers that keep many links' states compactly; [`LossModel`] keeps it for the others.
    /// The knobs are assumed validated (an invalid one is clamped, never a panic).
    pub fn lose<R: Rng + ?Sized>(&self, bad: &mut bool, rng: &mut R) -> bool {
        match *self {
            Self::None => false,
            Self::Bernoulli { p } => chance(rng, p),
            Self::GilbertElliott {
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
    pub fn new(loss: Loss) -> Result<Self, LossError> {
        loss.validate()?;
        Ok(Self { loss, bad: false })
    }

    /// A process whose first state is drawn from the stationary distribution (one draw from
    /// `rng` for Gilbert-Elliott, none otherwise), so that a short run is not biased towards
    /// Good. Simulated links start this way.
    pub fn stationary<R: Rng + ?Sized>(loss: Loss, rng: &mut R) -> Result<Self, LossError> {
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
        self.loss.lose(&mut self.bad, rng)
    }
}

/// True with probability `p`. Draws nothing when `p` is 0 or below, or 1 or above, so a knob
/// left at zero costs nothing and a certain event consumes no randomness; NaN is never true.
pub fn chance<R: Rng + ?Sized>(rng: &mut R, p: f64) -> bool {
    if p.is_nan() || p <= 0.0 {
        false
    } else if p >= 1.0 {
        true
    } else {
        rng.gen::<f64>() < p
    }
}

/// Whether `p` is a probability: finite and in [0, 1] (NaN fails both comparisons).
pub fn is_probability(p: f64) -> bool {
    (0.0..=1.0).contains(&p)
}

/// The mean loss and the mean burst length (losses per run of consecutive losses) of a loss
/// pattern, `true` for a lost packet; `(0, 0)` when nothing was lost. What the statistical
/// checks of a loss model measure.
pub fn loss_and_bursts(lost: &[bool]) -> (f64, f64) {
    let losses = lost.iter().filter(|l| **l).count();
    let bursts = lost
        .iter()
        .enumerate()
        .filter(|(i, l)| **l && (*i == 0 || !lost[i - 1]))
        .count();
    if lost.is_empty() || bursts == 0 {
        return (0.0, 0.0);
    }
    (
        losses as f64 / lost.len() as f64,
        losses as f64 / bursts as f64,
    )
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// `count` fates of a process started from the stationary distribution.
    fn pattern(loss: Loss, seed: u64, count: usize) -> Vec<bool> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut model = LossModel::stationary(loss, &mut rng).expect("valid loss");
        (0..count).map(|_| model.lose(&mut rng)).collect()
    }

    #[test]
    fn bernoulli_loss_rate_is_within_five_standard_deviations() {
        let count = 100_000;
        for p in [0.01, 0.2, 0.5] {
            let (measured, _) = loss_and_bursts(&pattern(Loss::Bernoulli { p }, 3, count));
            let tolerance = 5.0 * (p * (1.0 - p) / count as f64).sqrt();
            assert!(
                (measured - p).abs() < tolerance,
                "p {p}: measured {measured}"
            );
        }
    }

    /// ALGORITHMS.md: for mean loss 5% and mean burst 10, `p_bg = 0.1` and `p_gb = 0.00526`.
    #[test]
    fn gilbert_elliott_matches_the_numbers_of_algorithms_md() {
        let Loss::GilbertElliott { p_gb, p_bg, .. } = Loss::BURSTY_5_PERCENT else {
            panic!("not Gilbert-Elliott");
        };
        assert!((p_bg - 0.1).abs() < 1e-12);
        assert!((p_gb - 0.00526).abs() < 1e-5);
        assert!((Loss::BURSTY_5_PERCENT.mean_loss() - 0.05).abs() < 1e-9);
        assert_eq!(Loss::bursty(0.05, 10.0), Ok(Loss::BURSTY_5_PERCENT));

        // One million packets: mean loss and mean burst length as the formulas say.
        let (loss, burst) = loss_and_bursts(&pattern(Loss::BURSTY_5_PERCENT, 5, 1_000_000));
        assert!((loss - 0.05).abs() < 0.007, "loss {loss}");
        assert!((burst - 10.0).abs() < 1.5, "burst {burst}");
    }

    #[test]
    fn bursty_settings_reach_their_mean_loss_and_burst_length() {
        for (mean_loss, mean_burst) in [(0.05, 4.0), (0.2, 10.0), (0.1, 1.0), (0.5, 2.0)] {
            let loss = Loss::bursty(mean_loss, mean_burst).expect("reachable");
            assert!((loss.mean_loss() - mean_loss).abs() < 1e-12);
            let lost = pattern(loss, 7, 400_000);
            let (measured, burst) = loss_and_bursts(&lost);
            assert!(
                (measured - mean_loss).abs() < 0.1 * mean_loss,
                "{mean_loss}:{mean_burst}: measured loss {measured}"
            );
            assert!(
                (burst - mean_burst).abs() < 0.1 * mean_burst,
                "{mean_loss}:{mean_burst}: measured burst {burst}"
            );
            if mean_burst == 1.0 {
                // Bad lasts exactly one packet: no two losses in a row.
                assert!(lost.windows(2).all(|w| !(w[0] && w[1])));
            }
        }
    }

    #[test]
    fn bursty_follows_the_formulas_and_refuses_the_unreachable() {
        let Ok(Loss::GilbertElliott { p_gb, p_bg, .. }) = Loss::bursty(0.2, 4.0) else {
            panic!("not Gilbert-Elliott");
        };
        assert!((p_bg - 0.25).abs() < 1e-12);
        assert!((p_gb - 0.0625).abs() < 1e-12);
        assert_eq!(Loss::bursty(0.0, 3.0), Ok(Loss::None));
        // The limit mean_loss = mean_burst / (1 + mean_burst): Good lasts one packet.
        let Ok(Loss::GilbertElliott { p_gb, .. }) = Loss::bursty(0.8, 4.0) else {
            panic!("not Gilbert-Elliott");
        };
        assert!((p_gb - 1.0).abs() < 1e-12);
        assert!(matches!(
            Loss::bursty(0.9, 2.0),
            Err(LossError::Unreachable { .. })
        ));
        assert_eq!(Loss::bursty(1.0, 2.0), Err(LossError::MeanLoss(1.0)));
        assert!(matches!(
            Loss::bursty(f64::NAN, 2.0),
            Err(LossError::MeanLoss(_))
        ));
        assert_eq!(Loss::bursty(0.1, 0.5), Err(LossError::MeanBurst(0.5)));
        assert!(matches!(
            Loss::bursty(0.1, f64::INFINITY),
            Err(LossError::MeanBurst(_))
        ));
    }

    #[test]
    fn invalid_knobs_are_refused_naming_the_knob() {
        let cases = [
            (Loss::Bernoulli { p: 1.5 }, "p"),
            (Loss::Bernoulli { p: -0.1 }, "p"),
            (Loss::Bernoulli { p: f64::NAN }, "p"),
            (
                Loss::GilbertElliott {
                    p_gb: 0.1,
                    p_bg: f64::INFINITY,
                    loss_good: 0.0,
                    loss_bad: 1.0,
                },
                "p_bg",
            ),
            (
                Loss::GilbertElliott {
                    p_gb: 0.1,
                    p_bg: 0.1,
                    loss_good: 0.0,
                    loss_bad: 2.0,
                },
                "loss_bad",
            ),
        ];
        for (loss, name) in cases {
            match LossModel::new(loss) {
                Err(LossError::NotAProbability { knob, .. }) => assert_eq!(knob, name),
                other => panic!("{loss:?}: {other:?}"),
            }
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            assert!(LossModel::stationary(loss, &mut rng).is_err());
            // Unvalidated knobs still draw without panicking.
            let mut bad = false;
            let _ = loss.lose(&mut bad, &mut rng);
        }
    }

    #[test]
    fn certain_and_impossible_knobs_draw_nothing() {
        assert_eq!(Loss::default(), Loss::None);
        assert_eq!(Loss::None.mean_loss(), 0.0);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut reference = rng.clone();
        let mut never = LossModel::new(Loss::None).expect("valid");
        assert!((0..1000).all(|_| !never.lose(&mut rng)));
        let mut always = LossModel::new(Loss::Bernoulli { p: 1.0 }).expect("valid");
        assert!((0..1000).all(|_| always.lose(&mut rng)));
        let mut zero = LossModel::new(Loss::Bernoulli { p: 0.0 }).expect("valid");
        assert!((0..1000).all(|_| !zero.lose(&mut rng)));
        assert_eq!(
            rng.gen::<u64>(),
            reference.gen::<u64>(),
            "nothing was drawn"
        );

        // Always Bad once entered, never left: every packet after the first transition is lost.
        let mut sticky = LossModel::new(Loss::GilbertElliott {
            p_gb: 1.0,
            p_bg: 0.0,
            loss_good: 0.0,
            loss_bad: 1.0,
        })
        .expect("valid");
        assert!(!sticky.is_bad());
        assert!(sticky.lose(&mut rng));
        assert!(sticky.is_bad());
        assert!((0..100).all(|_| sticky.lose(&mut rng)));
    }

    #[test]
    fn same_seed_same_pattern() {
        let a = pattern(Loss::BURSTY_5_PERCENT, 11, 10_000);
        assert_eq!(a, pattern(Loss::BURSTY_5_PERCENT, 11, 10_000));
        assert_ne!(a, pattern(Loss::BURSTY_5_PERCENT, 12, 10_000));
    }

    #[test]
    fn loss_and_bursts_of_small_patterns() {
        assert_eq!(loss_and_bursts(&[]), (0.0, 0.0));
        assert_eq!(loss_and_bursts(&[false, false]), (0.0, 0.0));
        assert_eq!(
            loss_and_bursts(&[true, true, false, true, false, false]),
            (0.5, 1.5)
        );
    }
}
