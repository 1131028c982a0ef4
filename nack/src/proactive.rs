//! Proactive repair: how many repair symbols to send with a block before anyone asks.
//!
//! The Keystone / UKA idea (Zhang, Lam, Lee, Yang 2003): per block of `k` source symbols the
//! sender adds `h` proactive repair symbols, and adapts them so that only a target fraction of
//! the block's members needs to NACK. Keystone counts the NACKing receivers directly; with NACK
//! suppression the sender sees only a few NACKs, so this helper infers the loss rate from what
//! it does see, by likelihood over the recent blocks:
//!
//! - whether a block drew any NACK in its first repair round: with `R` members served by the
//!   block, none NACKs with probability `(1 - f)^R` (`f` below);
//! - the need of the NACK that opened the round: the first NACKer is the one whose random
//!   backoff ran out first, which has nothing to do with its need, so that need is a fair
//!   draw from the need of a NACKing member (below). Later NACKs are not: suppression lets
//!   through only those needing more than was advertised;
//! - or, when the number of receivers that needed repair is known (no suppression, or
//!   counted elsewhere), that count, binomial in the group.
//!
//! Each block adds its log-likelihood, a function of `p` evaluated on a fixed log-spaced grid
//! of loss rates, to a running sum in which older blocks fade (each new block multiplies the
//! sum by `1 - smoothing / 4`, a memory of about `4 / smoothing` blocks). The estimate is the
//! posterior median of that sum under a log-uniform prior on the grid: with few or
//! uninformative blocks (no NACK where heavy proactive repair made one unlikely anyway) it
//! stays where the evidence leaves it instead of running to an end of the range, and with
//! many it is the maximum-likelihood loss rate. Unlike an estimate from the largest need of a
//! round (which suppression and early repair bias low), this one does not fall behind at high
//! loss: a block at 20% loss answered by its first NACKer's need of 4 is evidence of 20%, not
//! of the 2% a few quiet blocks would drag a moving average to.
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
//! `f(k, h, p) <= target` within `[min_rho * k, max_rho * k]`
//! ([`ProactiveRepair::proactive_symbols`]): proactive repair for a target fraction of
//! NACKing members, not for the worst one. Loss rate, block size (through `k`) and message
//! size (through the number of blocks and `k`) enter through the model; the group size
//! through `R`, the members each block serves.
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
//! The binomial model assumes independent loss. Under bursty loss a NACKing member's need is
//! larger than independent loss at the same mean would give (it lost a burst), so the
//! estimate reads high and the proactive repair errs towards more; the quiet blocks, which
//! bursts make more frequent at the same mean, pull it back.

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
    /// The members the block serves (R): those whose own chunk is in it.
    pub group_size: u32,
    /// The need of the NACK that opened the block's first repair round, 0 if nobody NACKed.
    pub first_need: u16,
    /// How many receivers needed repair, when known (for instance without suppression).
    pub needing_receivers: Option<u32>,
}

/// Loss rates the likelihood is evaluated at: log-spaced from [`GRID_MIN`] to [`GRID_MAX`].
const GRID_POINTS: usize = 128;
/// The smallest loss rate the estimator considers.
const GRID_MIN: f64 = 1e-3;
/// The largest loss rate the estimator considers.
const GRID_MAX: f64 = 0.7;

fn grid_loss(index: usize) -> f64 {
    let t = index as f64 / (GRID_POINTS - 1) as f64;
    GRID_MIN * (GRID_MAX / GRID_MIN).powf(t)
}

/// The proactive repair helper.
///
/// Call order: [`proactive_symbols`](Self::proactive_symbols) before sending a block;
/// [`record`](Self::record) once the block's first repair round closed.
#[derive(Debug, Clone)]
pub struct ProactiveRepair {
    config: ProactiveConfig,
    loss: f64,
    /// The faded sum of the recorded blocks' log-likelihoods at each grid loss rate; empty
    /// until the first block.
    log_likelihood: Vec<f64>,
}

impl ProactiveRepair {
    /// A helper starting from the configured initial loss rate.
    pub fn new(config: ProactiveConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            loss: config.initial_loss,
            config,
            log_likelihood: Vec::new(),
        })
    }

    /// The loss-rate estimate.
    pub fn loss_estimate(&self) -> f64 {
        self.loss
    }

    /// Folds one block's statistics into the loss estimate.
    pub fn record(&mut self, stats: &BlockNackStats) {
        let k = u32::from(stats.source_symbols);
        if k == 0 || stats.group_size == 0 {
            return;
        }
        let h = u32::from(stats.proactive_symbols);
        if self.log_likelihood.is_empty() {
            self.log_likelihood = vec![0.0; GRID_POINTS];
        }
        let fade = 1.0 - self.config.smoothing / 4.0;
        for (index, sum) in self.log_likelihood.iter_mut().enumerate() {
            *sum = *sum * fade + block_log_likelihood(stats, k, h, grid_loss(index));
        }
        // Posterior median under a log-uniform prior (uniform over the grid's indices).
        let peak = self
            .log_likelihood
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        if !peak.is_finite() {
            return;
        }
        let weights: Vec<f64> = self
            .log_likelihood
            .iter()
            .map(|&l| (l - peak).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut cumulative = 0.0;
        for (index, weight) in weights.iter().enumerate() {
            let before = cumulative;
            cumulative += weight;
            if cumulative >= total / 2.0 {
                // Interpolate within the cell (in log p) for a smooth estimate.
                let within = if *weight > 0.0 {
                    ((total / 2.0 - before) / weight).clamp(0.0, 1.0)
                } else {
                    0.5
                };
                let t = (index as f64 - 0.5 + within) / (GRID_POINTS - 1) as f64;
                self.loss = (GRID_MIN * (GRID_MAX / GRID_MIN).powf(t.max(0.0))).clamp(0.0, 0.999);
                return;
            }
        }
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

/// The log-likelihood at loss rate `p` of what the sender saw of one block's first round
/// (see the module docs).
fn block_log_likelihood(stats: &BlockNackStats, k: u32, h: u32, p: f64) -> f64 {
    const TINY: f64 = 1e-300;
    if let Some(needing) = stats.needing_receivers {
        // Whole-block needs: each of the group needs repair when it lost more than `h` of
        // the `k + h` symbols.
        let q = (1.0 - binomial_cdf(h, k + h, p)).clamp(TINY, 1.0 - 1e-15);
        let n = f64::from(needing.min(stats.group_size));
        let g = f64::from(stats.group_size);
        return n * q.ln() + (g - n) * (1.0 - q).ln();
    }
    let f = nack_fraction(k, h, p).clamp(0.0, 1.0 - 1e-15);
    let r = f64::from(stats.group_size);
    let quiet = r * (-f).ln_1p();
    if stats.first_need == 0 {
        return quiet;
    }
    let any = (-quiet.exp_m1()).max(TINY).ln();
    // The NACKer lost its own chunk and `L = h - 1 + need` of the other `k + h - 1` symbols,
    // given `L >= h` (the block did not decode); a need beyond `k` is read as `k`.
    let others = k + h - 1;
    let lost = (h + u32::from(stats.first_need) - 1).min(others);
    let pmf = binomial_pmf(lost, others, p);
    let tail = if h == 0 {
        1.0
    } else {
        1.0 - binomial_cdf(h - 1, others, p)
    };
    any + (pmf.max(TINY) / tail.max(TINY)).min(1.0).ln()
}

/// `P(Binomial(n, p) = x)`.
pub fn binomial_pmf(x: u32, n: u32, p: f64) -> f64 {
    if x > n {
        return 0.0;
    }
    if p <= 0.0 {
        return if x == 0 { 1.0 } else { 0.0 };
    }
    if p >= 1.0 {
        return if x == n { 1.0 } else { 0.0 };
    }
    let ln_choose = ln_gamma(f64::from(n) + 1.0)
        - ln_gamma(f64::from(x) + 1.0)
        - ln_gamma(f64::from(n - x) + 1.0);
    (ln_choose + f64::from(x) * p.ln() + f64::from(n - x) * (-p).ln_1p()).exp()
}

/// `ln(Gamma(x))` for `x > 0` (Lanczos, g = 7, nine terms; relative error below 1e-13).
fn ln_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = COEFFICIENTS[0];
    let t = x + 7.5;
    for (i, c) in COEFFICIENTS.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
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

    /// One block of `k` chunks (+ `h` proactive) to `r` members at independent loss `p`, as
    /// the sender sees it through suppression: whether anybody NACKed, and the need of one
    /// NACKer drawn at random (the first backoff to run out). Returns the stats and the
    /// fraction of members that needed repair.
    fn observed_block(
        rng: &mut ChaCha8Rng,
        k: u16,
        h: u16,
        r: u32,
        p: f64,
    ) -> (BlockNackStats, f64) {
        let n = u32::from(k) + u32::from(h);
        let mut needs = Vec::new();
        for _ in 0..r {
            let own_lost = rng.gen_bool(p);
            let others = binomial(rng, n - 1, p);
            if own_lost && others >= u32::from(h) {
                needs.push(1 + others - u32::from(h));
            }
        }
        let first_need = if needs.is_empty() {
            0
        } else {
            needs[rng.gen_range(0..needs.len())].min(u32::from(k))
        };
        (
            BlockNackStats {
                source_symbols: k,
                proactive_symbols: h,
                group_size: r,
                first_need: u16::try_from(first_need).unwrap(),
                needing_receivers: None,
            },
            needs.len() as f64 / f64::from(r),
        )
    }

    #[test]
    fn learns_high_loss_from_first_needs_and_meets_the_target() {
        // 20% independent loss, blocks of 16 chunks each serving 200 members, starting from
        // the 1% assumed; the sender sees what suppression lets through.
        for (p, seed) in [(0.2, 7), (0.05, 8), (0.01, 9)] {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut helper = ProactiveRepair::new(ProactiveConfig::default()).unwrap();
            let mut fractions = Vec::new();
            for _ in 0..60 {
                let h = helper.proactive_symbols(16);
                let (stats, fraction) = observed_block(&mut rng, 16, h, 200, p);
                fractions.push(fraction);
                helper.record(&stats);
            }
            let estimate = helper.loss_estimate();
            assert!(
                (p * 0.6..p * 1.6).contains(&estimate),
                "p {p}: estimate {estimate}"
            );
            let late = fractions[30..].iter().sum::<f64>() / 30.0;
            assert!(
                late < 0.015,
                "p {p}: fraction of members needing repair {late}"
            );
        }
    }

    #[test]
    fn ln_gamma_and_pmf_known_values() {
        assert!((ln_gamma(1.0)).abs() < 1e-12);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        assert!((ln_gamma(101.0) - 363.739_375_555_563_5).abs() < 1e-9);
        assert!((binomial_pmf(2, 4, 0.5) - 0.375).abs() < 1e-12);
        let total: f64 = (0..=40).map(|x| binomial_pmf(x, 40, 0.2)).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert_eq!(binomial_pmf(5, 4, 0.5), 0.0);
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
            first_need: 9,
            needing_receivers: Some(6_500),
        });
        let expected = 1.0 - 0.35f64.powf(1.0 / 32.0);
        let estimate = helper.loss_estimate();
        assert!(
            (estimate / expected - 1.0).abs() < 0.03,
            "{estimate} {expected}"
        );
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
