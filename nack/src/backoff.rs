//! The NACK backoff distribution and the analytic expectation of NACKs per loss event.
//!
//! RFC 5401 and RFC 5740 5.5: a receiver that needs repair waits a random time `t` in
//! `[0, T]`, `T = K * GRTT`, drawn from a truncated exponential distribution with parameter
//! `lambda = ln(G) + 1`:
//!
//! ```text
//! x uniform in (0, 1);   t = (T / lambda) * ln(1 + x * (e^lambda - 1))
//! ```
//!
//! Most receivers draw a late time and a few an early one, so the first NACK (or the sender's
//! advertisement echoing it) reaches the others before their timers fire.

use std::time::Duration;

/// The truncated exponential parameter `lambda = ln(G) + 1` for a group of `group_size`
/// receivers (a group size of 0 counts as 1).
pub fn lambda(group_size: u32) -> f64 {
    f64::from(group_size.max(1)).ln() + 1.0
}

/// The backoff, as a fraction of the window in `[0, 1]`, for a uniform draw `unit` in
/// `[0, 1)` (values outside are clamped).
pub fn fraction(unit: f64, group_size: u32) -> f64 {
    let x = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let lambda = lambda(group_size);
    ((x * lambda.exp_m1()).ln_1p() / lambda).clamp(0.0, 1.0)
}

/// The backoff time within `window` (`K * GRTT`) for a uniform draw `unit` in `[0, 1)`.
pub fn truncated_exponential(unit: f64, window: Duration, group_size: u32) -> Duration {
    window.mul_f64(fraction(unit, group_size))
}

/// The cumulative distribution function of the backoff fraction: `P(t / T <= s)`.
pub fn cdf(s: f64, group_size: u32) -> f64 {
    if s <= 0.0 {
        return 0.0;
    }
    if s >= 1.0 {
        return 1.0;
    }
    let lambda = lambda(group_size);
    (lambda * s).exp_m1() / lambda.exp_m1()
}

/// The expected number of NACKs sent for one loss event that all `group_size` receivers share,
/// in the standard model of timer-based suppression (Nonnenmacher and Biersack, "Scalable
/// feedback for large groups", 1999): every receiver draws a backoff; the first timer fires at
/// `t1`; every receiver whose timer fires before `t1 + D` sends too, everyone else is
/// suppressed. `delay_fraction` is `D / T`.
///
/// Computed by numeric integration (midpoint rule, 20,000 steps) of
/// `E[N] = G * integral_0^1 f(s) * (1 - F(s - delay_fraction))^(G - 1) ds`: receiver `i`
/// sends exactly when no other receiver fired more than `D` before it. With `D / T = 1/8`
/// (`K = 4`, feedback delay GRTT / 2) it gives 1.71 at G = 10, 3.31 at G = 1000 and 4.02 at
/// G = 4096, the figures NORM's simulations report.
pub fn expected_nacks(group_size: u32, delay_fraction: f64) -> f64 {
    expected_nacks_among(group_size, group_size, delay_fraction)
}

/// [`expected_nacks`] when only `participants` of the `group_size` receivers share the loss
/// event (for instance the few that proactive repair did not cover), all drawing their backoff
/// with the group's parameter `ln(group_size) + 1`.
pub fn expected_nacks_among(participants: u32, group_size: u32, delay_fraction: f64) -> f64 {
    const STEPS: u32 = 20_000;
    if participants == 0 {
        return 0.0;
    }
    let n = f64::from(participants);
    let lambda = lambda(group_size);
    let denominator = lambda.exp_m1();
    let delta = if delay_fraction.is_finite() {
        delay_fraction.max(0.0)
    } else {
        0.0
    };
    let step = 1.0 / f64::from(STEPS);
    let mut total = 0.0;
    for i in 0..STEPS {
        let s = (f64::from(i) + 0.5) * step;
        let density = lambda * (lambda * s).exp() / denominator;
        let earlier = cdf(s - delta, group_size);
        let none_earlier = if earlier >= 1.0 {
            0.0
        } else {
            ((n - 1.0) * (-earlier).ln_1p()).exp()
        };
        total += density * none_earlier * step;
    }
    n * total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_spans_the_window() {
        assert_eq!(fraction(0.0, 1000), 0.0);
        assert!((fraction(1.0, 1000) - 1.0).abs() < 1e-12);
        // Most of the mass is late: the median draw is past 80% of the window at G = 1000.
        assert!(fraction(0.5, 1000) > 0.8);
        assert!(fraction(f64::NAN, 10) == 0.0);
    }

    #[test]
    fn cdf_inverts_fraction() {
        for &g in &[1u32, 10, 1000, 10_000] {
            for i in 0..=10 {
                let x = f64::from(i) / 10.0;
                assert!((cdf(fraction(x, g), g) - x).abs() < 1e-9, "g {g} x {x}");
            }
        }
    }

    #[test]
    fn expected_nacks_matches_the_reference_points() {
        // ALGORITHMS.md: about 1.7 at G = 10, 3.3 at G = 1000, 4 at G = 4096 with K = 4.
        let delta = 1.0 / 8.0;
        assert!((expected_nacks(10, delta) - 1.71).abs() < 0.02);
        assert!((expected_nacks(1000, delta) - 3.31).abs() < 0.02);
        assert!((expected_nacks(4096, delta) - 4.02).abs() < 0.02);
        // No delay: exactly one NACK.
        assert!((expected_nacks(1000, 0.0) - 1.0).abs() < 0.01);
        // Fewer participants with the group's parameter: fewer NACKs, one for one receiver.
        assert!(expected_nacks_among(50, 1000, delta) < expected_nacks(1000, delta));
        assert!((expected_nacks_among(1, 1000, 0.5) - 1.0).abs() < 1e-3);
        assert_eq!(expected_nacks_among(0, 1000, 0.5), 0.0);
    }
}
