//! The loss flags shared by `demo` and `sim`: independent loss (`--loss P`) or bursty
//! Gilbert-Elliott loss (`--burst-loss MEAN_LOSS:MEAN_BURST`).

use std::str::FromStr;

use anyhow::bail;
use rekeycast::sim::Loss;

/// The loss flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LossArgs {
    /// Independent (iid) loss: the probability that each datagram is lost, from 0 up to (not
    /// including) 1.
    #[arg(long, value_name = "P", default_value_t = 0.05)]
    pub loss: f64,
    /// Bursty loss instead (Gilbert-Elliott): MEAN_LOSS (0 up to 1) in bursts of MEAN_BURST
    /// datagrams on average (at least 1), such as `0.05:10`.
    #[arg(long, value_name = "MEAN_LOSS:MEAN_BURST", conflicts_with = "loss")]
    pub burst_loss: Option<BurstLoss>,
}

/// The values of `--burst-loss`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurstLoss {
    /// The mean loss, from 0 up to (not including) 1.
    pub mean_loss: f64,
    /// The mean burst length, in datagrams, at least 1.
    pub mean_burst: f64,
}

impl FromStr for BurstLoss {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (loss, burst) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}`: expected MEAN_LOSS:MEAN_BURST, such as 0.05:10"))?;
        let mean_loss: f64 = loss
            .trim()
            .parse()
            .map_err(|_| format!("`{loss}`: MEAN_LOSS must be a number"))?;
        let mean_burst: f64 = burst
            .trim()
            .parse()
            .map_err(|_| format!("`{burst}`: MEAN_BURST must be a number"))?;
        if !(0.0..1.0).contains(&mean_loss) {
            return Err(format!(
                "MEAN_LOSS {mean_loss} must be at least 0 and below 1"
            ));
        }
        if !(mean_burst >= 1.0 && mean_burst.is_finite()) {
            return Err(format!(
                "MEAN_BURST {mean_burst} must be at least 1 datagram"
            ));
        }
        Ok(Self {
            mean_loss,
            mean_burst,
        })
    }
}

impl LossArgs {
    /// The loss model the flags describe.
    pub fn model(&self) -> anyhow::Result<Loss> {
        if let Some(burst) = self.burst_loss {
            // Gilbert-Elliott with loss only in Bad: the mean burst is 1 / p_bg and the mean
            // loss p_gb / (p_gb + p_bg), so p_gb = loss * p_bg / (1 - loss).
            let p_bg = 1.0 / burst.mean_burst;
            let p_gb = burst.mean_loss * p_bg / (1.0 - burst.mean_loss);
            if p_gb > 1.0 {
                bail!(
                    "--burst-loss {}:{}: bursts that short cannot make that much loss \
                     (lengthen the bursts)",
                    burst.mean_loss,
                    burst.mean_burst
                );
            }
            return Ok(Loss::GilbertElliott {
                p_gb,
                p_bg,
                loss_good: 0.0,
                loss_bad: 1.0,
            });
        }
        if !(0.0..1.0).contains(&self.loss) {
            bail!("--loss {}: must be at least 0 and below 1", self.loss);
        }
        Ok(if self.loss == 0.0 {
            Loss::None
        } else {
            Loss::Bernoulli { p: self.loss }
        })
    }

    /// The loss in words, for banners and reports.
    pub fn describe(&self) -> String {
        match self.burst_loss {
            Some(burst) => format!(
                "{:.1}% in bursts of {} datagrams on average (Gilbert-Elliott)",
                burst.mean_loss * 100.0,
                burst.mean_burst
            ),
            None => format!("{:.1}% independent (iid)", self.loss * 100.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_loss_parses_and_maps_to_gilbert_elliott() {
        let burst: BurstLoss = "0.05:10".parse().unwrap();
        let args = LossArgs {
            loss: 0.05,
            burst_loss: Some(burst),
        };
        let Loss::GilbertElliott { p_gb, p_bg, .. } = args.model().unwrap() else {
            panic!("not Gilbert-Elliott");
        };
        assert!((p_bg - 0.1).abs() < 1e-12);
        assert!((p_gb / (p_gb + p_bg) - 0.05).abs() < 1e-12);
        assert!("0.05".parse::<BurstLoss>().is_err());
        assert!("1.0:10".parse::<BurstLoss>().is_err());
        assert!("0.05:0.5".parse::<BurstLoss>().is_err());
    }
}
