//! Proactive repair: how many repair symbols to send with a block before anyone asks.
//!
//! The Keystone / UKA idea (Zhang, Lam, Lee, Yang 2003): per block of `k` source symbols the
//! sender adds `ceil(rho * k)` proactive repair symbols, and adapts rho after each message so
//! that only a target fraction of receivers needs to NACK. Keystone counts the NACKing
//! receivers directly; with NACK suppression the sender sees only a few NACKs, so this helper
//! infers the loss rate from what it does see:
//!
//! - the largest need of a block's first repair round: among G receivers that each lost
//!   `X ~ Binomial(k + h, p)` of `k + h` symbols, the largest need is `max(X) - h`; the
//!   estimate is the `p` for which the observed value is the median of that maximum;
//! - no NACK at all: Keystone's rule for a round with fewer NACKs than the target, a step
//!   down (the estimate shrinks by `smoothing / 2`);
//! - or, when the number of receivers that needed repair is known (no suppression, or
//!   counted elsewhere), the `p` for which `P(X > h)` equals the observed fraction.
//!
//! The estimates are smoothed (an exponentially weighted average over recent blocks).
//!
//! # The model of needs
//!
//! A rekey member needs one chunk: one source symbol of one block. It needs repair only if
//! that symbol was lost (probability `p`) and the block cannot be decoded without it, that is
//! if it lost at least `h` of the other `k + h - 1` symbols. So the fraction of a block's
//! members that NACK is
//!
//! ```text
//!     f(k, h, p) = p * P(Binomial(k + h - 1, p) >= h)
//! ```
//!
//! and their need (symbols beyond what they hold) is `1 + L - h` with `L` the symbols lost of
//! the other `k + h - 1`, conditioned on `L >= h`. The helper returns the smallest `h` with
//! `f(k, h, p) <= target` within `[min_rho * k, max_rho * k]` ([`Self::proactive_symbols`]):
//! proactive repair for a target fraction of NACKing members, not for the worst one.
//!
//! [`ProactiveRepair::repair_bounds`] sizes the multicast repair of a block from the same
//! distribution: the floor is the need that covers nine in ten of the NACKing members (the
//! sender orders at least that much, so its advertisement suppresses most of them), the
//! ceiling the repair after which the expected number of members of the block still missing
//! their chunk is at most a residual (about one member, or a small fraction of a large
//! block's). Members beyond it get their chunk by unicast (limited unicast recovery, Zhang,
//! Lam, Lee and Yang, IEEE/ACM ToN 2003): a handful of unicast datagrams instead of the
//! worst receiver's need multicast to the whole group.
//!
//! The binomial model assumes independent loss; under bursty loss it errs towards more
//! repair, since bursts widen the spread of per-receiver loss.

use crate::ConfigError;

/// Configuration of a [`ProactiveRepair`] helper.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProactiveConfig {
    /// The target fraction of a block's members that still need to NACK it (their own chunk
    /// lost and the block not decodable; see the module docs).
    pub target_fraction: f64,
    /// The loss rate assumed before any statistics.
    pub initial_loss: f64,
    /// Weight of each new block's estimate in the moving average, in `(0, 1]`.
    pub smoothing: f64,
    /// The smallest rho (proactive symbols per source symbol).
    pub min_rho: f64,
    /// The largest rho.
    pub max_rho: f64,
}

impl Default for ProactiveConfig {
    fn default() -> Self {
        Self {
            target_fraction: 0.005,
            initial_loss: 0.01,
            smoothing: 0.3,
            min_rho: 0.0,
            max_rho: 1.0,
        }
    }
}

impl ProactiveConfig {
    /// Checks the ranges of every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| ConfigError::Invalid { field, reason };
        if !(self.target_fraction > 0.0 && self.target_fraction < 1.0) {
            return Err(invalid("target_fraction", "must be in (0, 1)"));
        }
        if !(0.0..1.0).contains(&self.initial_loss) {
            return Err(invalid("initial_loss", "must be in [0, 1)"));
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err(invalid("smoothing", "must be in (0, 1]"));
        }
        if !(self.min_rho >= 0.0 && self.min_rho <= self.max_rho && self.max_rho.is_finite()) {
            return Err(invalid(
                "min_rho",
                "must satisfy 0 <= min_rho <= max_rho < inf",
            ));
        }
        Ok(())
    }
}

/// What the sender saw of one block's first repair round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockNackStats {
    /// Source symbols of the block (k).
    pub source_symbols: u16,
    /// Proactive repair symbols sent with it (h).
    pub proactive_symbols: u16,
    /// The group size (G).
    pub group_size: u32,
    /// The largest need in the first repair round's NACKs, 0 if nobody NACKed.
    pub max_need: u16,
    /// How many receivers needed repair, when known (for instance without suppression).
    pub needing_receivers: Option<u32>,
}

/// The proactive repair helper.
///
/// Call order: [`proactive_symbols`](Self::proactive_symbols) before sending a block;
/// [`record`](Self::record) once the block's first repair round closed.
#[derive(Debug, Clone)]
pub struct ProactiveRepair {
    config: ProactiveConfig,
    loss: f64,
}

impl ProactiveRepair {
    /// A helper starting from the configured initial loss rate.
    pub fn new(config: ProactiveConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            loss: config.initial_loss,
            config,
        })
    }

    /// The smoothed loss-rate estimate.
    pub fn loss_estimate(&self) -> f64 {
        self.loss
    }

    /// Folds one block's statistics into the loss estimate.
    pub fn record(&mut self, stats: &BlockNackStats) {
        let n = u32::from(stats.source_symbols) + u32::from(stats.proactive_symbols);
        if n == 0 || stats.group_size == 0 {
            return;
        }
        let h = u32::from(stats.proactive_symbols);
        let g = f64::from(stats.group_size);
        let a = self.config.smoothing;
        let estimate = match stats.needing_receivers {
            Some(needing) => {
                let fraction = (f64::from(needing.min(stats.group_size)) / g).clamp(0.0, 1.0);
                solve_loss(|p| 1.0 - binomial_cdf(h, n, p) - fraction)
            }
            None if stats.max_need == 0 => {
                // Nobody NACKed: a censored observation that says little about p (the more
                // proactive repair, the less), so do as Keystone does when the first round drew
                // fewer NACKs than the target: lower the estimate by a step.
                self.loss * (1.0 - a / 2.0)
            }
            None => {
                // Median of max over G of X: P(max X <= h + m - 1) = 1/2.
                let level = 0.5f64.powf(1.0 / g);
                let threshold = h + u32::from(stats.max_need) - 1;
                solve_loss(|p| level - binomial_cdf(threshold, n, p))
            }
        };
        self.loss = ((1.0 - a) * self.loss + a * estimate).clamp(0.0, 0.999);
    }

    /// The number of proactive repair symbols to send with a block of `source_symbols`: the
    /// smallest `h` for which the expected fraction of the block's members that NACK,
    /// [`nack_fraction`], is within the target.
    pub fn proactive_symbols(&self, source_symbols: u16) -> u16 {
        let k = u32::from(source_symbols);
        if k == 0 {
            return 0;
        }
        let min = (self.config.min_rho * f64::from(k)).ceil() as u32;
        let max = ((self.config.max_rho * f64::from(k)).ceil() as u32).max(min);
        let mut h = min;
        while h < max && nack_fraction(k, h, self.loss) > self.config.target_fraction {
            h += 1;
        }
        u16::try_from(h).unwrap_or(u16::MAX)
    }

    /// The floor and ceiling of one multicast repair round of a block of `source_symbols`
    /// sent with `proactive_symbols`, whose chunks serve `receivers` members (see the module
    /// docs): the floor covers nine in ten of the NACKing members' needs; after the ceiling
    /// the expected number of the block's members still missing their chunk is at most
    /// `max(0.5, residual_fraction * receivers)`. Both at least 1 and at most `cap`.
    pub fn repair_bounds(
        &self,
        source_symbols: u16,
        proactive_symbols: u16,
        receivers: u32,
        residual_fraction: f64,
        cap: u16,
    ) -> (u16, u16) {
        let k = u32::from(source_symbols);
        let h = u32::from(proactive_symbols);
        let p = self.loss.max(1e-4);
        let cap = u32::from(cap.max(1));
        if k == 0 {
            return (1, 1);
        }
        let others = k + h - 1;
        let needing = 1.0 - binomial_cdf(h.saturating_sub(1), others, p);
        let mut floor = 1;
        if needing > 0.0 {
            while floor < cap && (1.0 - binomial_cdf(h + floor - 1, others, p)) / needing > 0.1 {
                floor += 1;
            }
        }
        let allowed = (residual_fraction * f64::from(receivers)).max(0.5);
        let mut ceiling = floor;
        while ceiling < cap && f64::from(receivers) * nack_fraction(k, h + ceiling, p) > allowed {
            ceiling += 1;
        }
        let as_u16 = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        (as_u16(floor), as_u16(ceiling))
    }

    /// The current rho for blocks of `source_symbols`.
    pub fn rho(&self, source_symbols: u16) -> f64 {
        if source_symbols == 0 {
            return 0.0;
        }
        f64::from(self.proactive_symbols(source_symbols)) / f64::from(source_symbols)
    }
}

/// The expected fraction of a block's members that need repair: own chunk lost (`p`) and at
/// least `h` of the other `k + h - 1` symbols lost too (`k` source and `h` repair symbols
/// sent, independent loss `p`).
pub fn nack_fraction(k: u32, h: u32, p: f64) -> f64 {
    if k == 0 {
        return 0.0;
    }
    if h == 0 {
        return p;
    }
    p * (1.0 - binomial_cdf(h - 1, k + h - 1, p))
}

/// `P(Binomial(n, p) <= x)`, computed in log space so that large `n` does not underflow.
pub fn binomial_cdf(x: u32, n: u32, p: f64) -> f64 {
    if x >= n || p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let log_q = (-p).ln_1p();
    let log_ratio = p.ln() - log_q;
    let mut log_pmf = f64::from(n) * log_q;
    let mut total = log_pmf.exp();
    for k in 0..x {
        log_pmf += (f64::from(n - k) / f64::from(k + 1)).ln() + log_ratio;
        total += log_pmf.exp();
    }
    total.min(1.0)
}

/// The root in `p` of an increasing function on `[0, 1)`, by bisection; 0 or the upper end
/// when there is none inside.
fn solve_loss(f: impl Fn(f64) -> f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 0.999f64);
    if f(lo) >= 0.0 {
        return lo;
    }
    if f(hi) <= 0.0 {
        return hi;
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if f(mid) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn binomial(rng: &mut ChaCha8Rng, n: u32, p: f64) -> u32 {
        (0..n).filter(|_| rng.gen_bool(p)).count() as u32
    }

    #[test]
    fn binomial_cdf_known_values() {
        assert!((binomial_cdf(0, 10, 0.1) - 0.9f64.powi(10)).abs() < 1e-12);
        assert!((binomial_cdf(1, 2, 0.5) - 0.75).abs() < 1e-12);
        assert_eq!(binomial_cdf(5, 5, 0.3), 1.0);
        assert!(binomial_cdf(10, 5000, 0.3) < 1e-100);
    }

    #[test]
    fn learns_the_loss_rate_from_max_needs_and_meets_the_target() {
        // Simulated receivers with 10% independent loss, k = 32, G = 1000; the helper sees only
        // the largest need per block, as with suppressed NACKs.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut helper = ProactiveRepair::new(ProactiveConfig::default()).unwrap();
        let (k, g, p) = (32u16, 1000u32, 0.1);
        let mut needing_fraction = Vec::new();
        for _ in 0..40 {
            let h = helper.proactive_symbols(k);
            let n = u32::from(k) + u32::from(h);
            let losses: Vec<u32> = (0..g).map(|_| binomial(&mut rng, n, p)).collect();
            let max_need = losses.iter().map(|&x| x.saturating_sub(u32::from(h))).max();
            // A member NACKs when its own chunk is among its losses (x of n) and the block
            // does not decode.
            let needing = losses
                .iter()
                .filter(|&&x| x > u32::from(h) && rng.gen_bool(f64::from(x) / f64::from(n)))
                .count();
            needing_fraction.push(needing as f64 / f64::from(g));
            helper.record(&BlockNackStats {
                source_symbols: k,
                proactive_symbols: h,
                group_size: g,
                max_need: u16::try_from(max_need.unwrap_or(0)).unwrap(),
                needing_receivers: None,
            });
        }
        let estimate = helper.loss_estimate();
        assert!((0.07..0.14).contains(&estimate), "estimate {estimate}");
        let late: f64 = needing_fraction[20..].iter().sum::<f64>() / 20.0;
        assert!(late < 0.08, "fraction of members needing repair {late}");
        assert!(
            needing_fraction[0] > 0.05,
            "the first block, with 1% assumed, is under-protected: {}",
            needing_fraction[0]
        );
    }

    #[test]
    fn repair_bounds_cover_the_typical_need_and_leave_a_residual() {
        let helper = ProactiveRepair::new(ProactiveConfig {
            initial_loss: 0.05,
            ..ProactiveConfig::default()
        })
        .unwrap();
        let h = helper.proactive_symbols(64);
        assert!(nack_fraction(64, u32::from(h), 0.05) <= 0.05);
        let (floor, ceiling) = helper.repair_bounds(64, h, 1_000, 0.002, 64);
        assert!(floor >= 1 && floor <= ceiling, "{floor} {ceiling}");
        // After the ceiling at most ~2 of 1,000 members still miss their chunk...
        assert!(1_000.0 * nack_fraction(64, u32::from(h + ceiling), 0.05) <= 2.0);
        // ...and the ceiling is far below the worst of 1,000 receivers' need.
        assert!(ceiling < 10, "ceiling {ceiling}");
        // Larger blocks of members want a larger ceiling, never a smaller one.
        let (_, big) = helper.repair_bounds(64, h, 100_000, 0.0, 64);
        assert!(big >= ceiling);
    }

    #[test]
    fn exact_fraction_and_monotone_choice() {
        let mut helper = ProactiveRepair::new(ProactiveConfig {
            smoothing: 1.0,
            ..ProactiveConfig::default()
        })
        .unwrap();
        // 65% of receivers needing repair with k = 32 and h = 0 means p close to 1 - 0.35^(1/32).
        helper.record(&BlockNackStats {
            source_symbols: 32,
            proactive_symbols: 0,
            group_size: 10_000,
            max_need: 9,
            needing_receivers: Some(6_500),
        });
        let expected = 1.0 - 0.35f64.powf(1.0 / 32.0);
        assert!((helper.loss_estimate() - expected).abs() < 1e-6);
        let mut last = 0;
        for loss in [0.0, 0.01, 0.05, 0.1, 0.3] {
            let h = ProactiveRepair::new(ProactiveConfig {
                initial_loss: loss,
                ..ProactiveConfig::default()
            })
            .unwrap()
            .proactive_symbols(64);
            assert!(h >= last, "monotone in loss");
            last = h;
        }
        assert_eq!(
            ProactiveRepair::new(ProactiveConfig {
                initial_loss: 0.0,
                ..ProactiveConfig::default()
            })
            .unwrap()
            .proactive_symbols(64),
            0
        );
    }
}
