//! `nack`: NACK suppression and repair aggregation at scale, in the seeded simulator of
//! `rekeycast_nack::sim` (virtual time, so the figures do not depend on the machine).
//!
//! For G in {10, 100, 1000, 10000} receivers and 1%, 10%, 30% independent loss and a bursty
//! Gilbert-Elliott setting (5% mean loss, mean burst 10), on data and on feedback alike: NACKs
//! sent per lost block (all rounds) and per loss event (one block, one round), next to the
//! analytic expectation for truncated exponential backoff (numeric integration of the
//! standard model, `rekeycast_nack::backoff::expected_nacks_among`: for the whole group, and
//! for the receivers that actually needed repair); reactive repair symbols per block relative
//! to the worst receiver's need; rounds; completion time in GRTTs. Percentiles come from
//! hdrhistogram. A second table compares timer settings, proactive repair and feedback modes
//! at G = 1000, 10% loss.

use std::time::Duration;

use hdrhistogram::Histogram;
use rekeycast_nack::backoff;
use rekeycast_nack::loss::Loss;
use rekeycast_nack::sim::{self, ProactiveMode, SimConfig, SimReport};
use rekeycast_nack::{FeedbackMode, ProactiveConfig};
use serde_json::{json, Value};

/// Messages at the start of a run left out of the statistics while proactive repair adapts.
const WARM_UP: u32 = 4;

/// Runs the benchmark and prints its tables and JSON line.
pub fn run(quick: bool) -> anyhow::Result<()> {
    let groups: &[u32] = if quick {
        &[10, 100, 1000]
    } else {
        &[10, 100, 1000, 10_000]
    };
    let messages = if quick { 14 } else { 54 };
    let losses = [
        ("iid 1%", Loss::Bernoulli { p: 0.01 }),
        ("iid 10%", Loss::Bernoulli { p: 0.10 }),
        ("iid 30%", Loss::Bernoulli { p: 0.30 }),
        ("GE 5% b10", Loss::BURSTY_5_PERCENT),
    ];
    let base = default_config(messages);
    println!(
        "nack: {} messages per row ({} warm-up left out) of {} blocks x {} source symbols; \
         one-way delay {:?}..{:?}, GRTT {:?}; unicast NACKs + repair advertisements; K = {}; \
         hold-off {} GRTT; proactive repair adaptive (target {}% of receivers NACKing); loss \
         on data and feedback alike",
        messages,
        WARM_UP,
        base.blocks_per_message,
        base.source_symbols,
        base.min_delay,
        base.max_delay,
        base.grtt(),
        base.backoff_factor,
        base.hold_off_grtt,
        target_fraction() * 100.0,
    );
    print_header();
    let mut rows = Vec::new();
    for &g in groups {
        for (name, loss) in losses {
            let config = SimConfig {
                receivers: g,
                data_loss: loss,
                feedback_loss: loss,
                seed: u64::from(g) * 31 + name.len() as u64,
                ..base.clone()
            };
            let row = measure(&format!("G={g} {name}"), &config)?;
            print_row(&row);
            rows.push(row);
        }
    }
    println!();
    println!("variants at G = 1000, iid 10% loss:");
    print_header();
    let mut variants = Vec::new();
    let g1000 = SimConfig {
        receivers: 1000,
        data_loss: Loss::Bernoulli { p: 0.1 },
        feedback_loss: Loss::Bernoulli { p: 0.1 },
        seed: 1000,
        ..base.clone()
    };
    let variant_configs = [
        (
            "NORM K=4 no proactive",
            SimConfig {
                backoff_factor: 4,
                hold_off_grtt: 5.0,
                repair_wait_grtt: 7.0,
                proactive: ProactiveMode::Fixed(0),
                ..g1000.clone()
            },
        ),
        (
            "K=8 no proactive",
            SimConfig {
                proactive: ProactiveMode::Fixed(0),
                ..g1000.clone()
            },
        ),
        (
            "K=4 adaptive",
            SimConfig {
                backoff_factor: 4,
                hold_off_grtt: 5.0,
                repair_wait_grtt: 7.0,
                ..g1000.clone()
            },
        ),
        ("K=8 adaptive (default)", g1000.clone()),
        (
            "K=8 adaptive multicast",
            SimConfig {
                feedback: FeedbackMode::Multicast,
                ..g1000.clone()
            },
        ),
    ];
    for (name, config) in variant_configs {
        let row = measure(name, &config)?;
        print_row(&row);
        variants.push(row);
    }
    let goal = rows
        .iter()
        .find(|row| row.name == "G=1000 iid 10%")
        .map(|row| {
            json!({
                "nacks_per_lost_block_p50": row.nacks_block.p50,
                "nacks_per_lost_block_p99": row.nacks_block.p99,
                "repair_ratio_p50": row.repair_ratio.p50,
                "repair_ratio_p99": row.repair_ratio.p99,
                "met": row.nacks_block.p50 <= 4.0
                    && row.nacks_block.p99 <= 10.0
                    && row.repair_ratio.p99 <= 1.1,
            })
        });
    if let Some(goal) = &goal {
        println!();
        println!(
            "goal at G = 1000, 10% loss (median <= 4, p99 <= 10 NACKs per lost block, repair \
             <= 1.1x the worst receiver's need): {}",
            if goal["met"].as_bool().unwrap_or(false) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    let json = json!({
        "bench": "nack",
        "quick": quick,
        "messages": messages,
        "warm_up": WARM_UP,
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "variants_g1000_10pct": variants.iter().map(Row::json).collect::<Vec<_>>(),
        "goal_g1000_10pct": goal,
    });
    println!("{json}");
    Ok(())
}

fn target_fraction() -> f64 {
    0.01
}

fn default_config(messages: u32) -> SimConfig {
    SimConfig {
        messages,
        blocks_per_message: 4,
        source_symbols: 32,
        proactive: ProactiveMode::Adaptive(ProactiveConfig {
            target_fraction: target_fraction(),
            ..ProactiveConfig::default()
        }),
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(25),
        feedback: FeedbackMode::Unicast,
        backoff_factor: 8,
        max_rounds: 8,
        repair_cap: 64,
        hold_off_grtt: 9.0,
        repair_wait_grtt: 11.0,
        symbol_rate: 20_000.0,
        ..SimConfig::default()
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    /// From values scaled by `scale` into integers.
    fn of(values: &[f64], scale: f64) -> anyhow::Result<Self> {
        let mut histogram = Histogram::<u64>::new(3)?;
        for &value in values {
            histogram.record((value * scale).round().max(0.0) as u64)?;
        }
        if histogram.is_empty() {
            return Ok(Self {
                p50: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
            });
        }
        Ok(Self {
            p50: histogram.value_at_quantile(0.5) as f64 / scale,
            p99: histogram.value_at_quantile(0.99) as f64 / scale,
            max: histogram.max() as f64 / scale,
        })
    }

    fn json(&self) -> Value {
        json!({"p50": finite(self.p50), "p99": finite(self.p99), "max": finite(self.max)})
    }
}

fn finite(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

#[derive(Debug, Clone)]
struct Row {
    name: String,
    lost_blocks: usize,
    proactive: Percentiles,
    needy: Percentiles,
    nacks_block: Percentiles,
    nacks_event: Percentiles,
    analytic_group: f64,
    analytic_needy: f64,
    repair_ratio: Percentiles,
    repair_over_initial: Percentiles,
    rounds: Percentiles,
    completion: Percentiles,
    out_of_sync: u32,
    wall: Duration,
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "lost_blocks": self.lost_blocks,
            "proactive_symbols": self.proactive.json(),
            "needy_receivers": self.needy.json(),
            "nacks_per_lost_block": self.nacks_block.json(),
            "nacks_per_loss_event": self.nacks_event.json(),
            "analytic_nacks_whole_group": finite(self.analytic_group),
            "analytic_nacks_needy": finite(self.analytic_needy),
            "repair_over_worst_need": self.repair_ratio.json(),
            "repair_over_worst_initial_need": self.repair_over_initial.json(),
            "rounds": self.rounds.json(),
            "completion_grtt": self.completion.json(),
            "out_of_sync": self.out_of_sync,
            "wall_ms": self.wall.as_secs_f64() * 1e3,
        })
    }
}

fn measure(name: &str, config: &SimConfig) -> anyhow::Result<Row> {
    let start = std::time::Instant::now();
    let report: SimReport = sim::run(config)?;
    let wall = start.elapsed();
    let blocks: Vec<_> = report
        .blocks
        .iter()
        .filter(|b| b.message >= WARM_UP)
        .collect();
    let lost: Vec<_> = blocks.iter().filter(|b| b.lost()).collect();
    let grtt = report.grtt.as_secs_f64();
    let proactive: Vec<f64> = blocks.iter().map(|b| f64::from(b.proactive)).collect();
    let needy: Vec<f64> = lost.iter().map(|b| f64::from(b.needy_receivers)).collect();
    let nacks_block: Vec<f64> = lost.iter().map(|b| f64::from(b.nacks_sent)).collect();
    let nacks_event: Vec<f64> = report
        .nacks_per_round
        .iter()
        .filter(|r| r.message >= WARM_UP)
        .map(|r| f64::from(r.nacks))
        .collect();
    let ratios: Vec<f64> = lost.iter().filter_map(|b| b.repair_ratio()).collect();
    let over_initial: Vec<f64> = lost
        .iter()
        .filter(|b| b.worst_initial_need > 0)
        .map(|b| f64::from(b.repair_sent) / f64::from(b.worst_initial_need))
        .collect();
    let rounds: Vec<f64> = lost.iter().map(|b| f64::from(b.rounds)).collect();
    let completion: Vec<f64> = lost
        .iter()
        .filter_map(|b| b.completion)
        .map(|c| c.as_secs_f64() / grtt)
        .collect();
    let delta =
        config.mean_feedback_delay().as_secs_f64() / (grtt * f64::from(config.backoff_factor));
    let needy_p = Percentiles::of(&needy, 1.0)?;
    let analytic_needy = if needy_p.p50.is_finite() {
        backoff::expected_nacks_among(needy_p.p50 as u32, config.receivers, delta)
    } else {
        f64::NAN
    };
    Ok(Row {
        name: name.to_string(),
        lost_blocks: lost.len(),
        proactive: Percentiles::of(&proactive, 1.0)?,
        needy: needy_p,
        nacks_block: Percentiles::of(&nacks_block, 1.0)?,
        nacks_event: Percentiles::of(&nacks_event, 1.0)?,
        analytic_group: backoff::expected_nacks(config.receivers, delta),
        analytic_needy,
        repair_ratio: Percentiles::of(&ratios, 1000.0)?,
        repair_over_initial: Percentiles::of(&over_initial, 1000.0)?,
        rounds: Percentiles::of(&rounds, 1.0)?,
        completion: Percentiles::of(&completion, 100.0)?,
        out_of_sync: report.out_of_sync,
        wall,
    })
}

fn print_header() {
    println!(
        "{:<24} {:>5} {:>4} {:>6} | {:>11} {:>11} {:>13} | {:>11} {:>8} | {:>7} {:>6} | {:>11} {:>4}",
        "setting",
        "lost",
        "h",
        "needy",
        "NACK/blk",
        "NACK/event",
        "analytic G|n",
        "repair/worst",
        "/initial",
        "rounds",
        "max",
        "done GRTT",
        "oos",
    );
    println!(
        "{:<24} {:>5} {:>4} {:>6} | {:>11} {:>11} {:>13} | {:>11} {:>8} | {:>7} {:>6} | {:>11} {:>4}",
        "", "blocks", "p50", "p50", "p50/p99", "p50/p99", "E[N]", "p50/p99", "p50", "p50", "", "p50/p99", "",
    );
}

fn print_row(row: &Row) {
    println!(
        "{:<24} {:>5} {:>4} {:>6} | {:>11} {:>11} {:>13} | {:>11} {:>8.2} | {:>7} {:>6} | {:>11} {:>4}",
        row.name,
        row.lost_blocks,
        row.proactive.p50,
        row.needy.p50,
        format!("{}/{}", row.nacks_block.p50, row.nacks_block.p99),
        format!("{}/{}", row.nacks_event.p50, row.nacks_event.p99),
        format!("{:.2}|{:.2}", row.analytic_group, row.analytic_needy),
        format!("{:.2}/{:.2}", row.repair_ratio.p50, row.repair_ratio.p99),
        row.repair_over_initial.p50,
        row.rounds.p50,
        row.rounds.max,
        format!("{:.1}/{:.1}", row.completion.p50, row.completion.p99),
        row.out_of_sync,
    );
}
