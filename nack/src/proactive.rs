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
//! The estimates are smoothed (an exponentially weighted average over recent blocks) and the
//! helper returns the smallest `h` with `P(Binomial(k + h, p) > h) <= target`, within
//! `[min_rho * k, max_rho * k]`. The binomial model assumes independent loss; under bursty
//! loss it errs towards more repair, since bursts widen the spread of per-receiver loss.

use crate::ConfigError;

/// Configuration of a [`ProactiveRepair`] helper.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProactiveConfig {
    /// The target fraction of receivers that still need to NACK a block.
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
            target_fraction: 0.05,
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

    /// The number of proactive repair symbols to send with a block of `source_symbols`.
    pub fn proactive_symbols(&self, source_symbols: u16) -> u16 {
        let k = u32::from(source_symbols);
        if k == 0 {
            return 0;
        }
        let min = (self.config.min_rho * f64::from(k)).ceil() as u32;
        let max = ((self.config.max_rho * f64::from(k)).ceil() as u32).max(min);
        let mut h = min;
        while h < max && 1.0 - binomial_cdf(h, k + h, self.loss) > self.config.target_fraction {
            h += 1;
        }
        u16::try_from(h).unwrap_or(u16::MAX)
    }

    /// The current rho for blocks of `source_symbols`.
    pub fn rho(&self, source_symbols: u16) -> f64 {
        if source_symbols == 0 {
            return 0.0;
        }
        f64::from(self.proactive_symbols(source_symbols)) / f64::from(source_symbols)
    }
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
            let needing = losses.iter().filter(|&&x| x > u32::from(h)).count();
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
        assert!(late < 0.12, "fraction of receivers needing repair {late}");
        assert!(
            needing_fraction[0] > 0.5,
            "the first block, with 1% assumed, is under-protected"
        );
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
