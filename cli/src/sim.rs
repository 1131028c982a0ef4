//! `rekeycast sim`: the in-process simulator ([`rekeycast::sim::rekey::run`]) at scale, with
//! the loss flags of `demo`: sans-IO GCKS and members over a seeded link model in virtual time
//! (10 ms one-way delay and 2 ms of jitter on every member link), no sockets.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rekeycast::sim::rekey::ScenarioConfig;

use super::loss::LossArgs;
use super::ms;

/// The flags of `rekeycast sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Members at the start.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub members: usize,
    /// Rekeys after the first message (which admits the members).
    #[arg(long, value_name = "R", default_value_t = 20)]
    pub rekeys: usize,
    /// Fraction of the members replaced in each rekey (as many leave as join), 0 to 1.
    #[arg(long, value_name = "F", default_value_t = 0.05)]
    pub churn: f64,
    /// The simulated loss, on every member's downlink and uplink.
    #[command(flatten)]
    pub loss: LossArgs,
    /// Seed of everything random.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs `rekeycast sim`.
pub fn run(args: &SimArgs) -> anyhow::Result<ExitCode> {
    if args.members == 0 {
        bail!("--members 0: the simulation needs at least one member");
    }
    if !(0.0..=1.0).contains(&args.churn) {
        bail!("--churn {}: must be between 0 and 1", args.churn);
    }
    let loss = args.loss.model()?;
    let config = ScenarioConfig::new(args.seed, args.members, args.rekeys, args.churn, loss);
    println!(
        "rekeycast sim: {} members, {} rekeys with {:.0}% churn, loss {} on every member link, \
         seed {} (virtual time, no sockets)",
        args.members,
        args.rekeys,
        args.churn * 100.0,
        args.loss.describe(),
        args.seed
    );
    let spinner = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}") {
        spinner.set_style(style);
    }
    spinner.set_message("simulating...");
    spinner.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let outcome = rekeycast::sim::rekey::run(&config);
    let wall = started.elapsed();
    spinner.finish_and_clear();
    let report = outcome.context("the simulation failed")?;
    let rtt = report.path_rtt.as_micros().max(1) as f64;
    let p50 = report.time_to_key_quantile_us(0.5);
    let p99 = report.time_to_key_quantile_us(0.99);
    println!(
        "time to key:   p50 {:.1} ms ({:.2} path RTTs), p99 {:.1} ms ({:.2} path RTTs), path RTT \
         {:.1} ms",
        ms(p50),
        p50 as f64 / rtt,
        ms(p99),
        p99 as f64 / rtt,
        report.path_rtt.as_secs_f64() * 1000.0
    );
    println!(
        "wire/source:   {:.2}x ({} bytes sent for {} source bytes)",
        report.wire_per_source(),
        report.sender.bytes_sent,
        report.sender.source_bytes_sent
    );
    let nacks_per_order = report.sender.nacks_received as f64 / report.repair_orders.max(1) as f64;
    println!(
        "repair:        {} NACKs sent, {} received, {} repair orders ({:.2} NACKs per order), {} \
         repair symbols",
        report.nacks_sent,
        report.sender.nacks_received,
        report.repair_orders,
        nacks_per_order,
        report.sender.repair_symbols_sent
    );
    println!(
        "resync:        {:.3}% of member-messages ({} of {}), {} out-of-sync events, {} state \
         checks, {} told to re-register",
        (1.0 - report.without_resync()) * 100.0,
        report.applied_from_resync,
        report.member_messages,
        report.out_of_sync.len(),
        report.state_checks,
        report.must_reregister
    );
    println!(
        "converged:     {}/{} final members hold the current group key after {} messages",
        report.converged, report.final_members, report.messages
    );
    println!("wall time:     {:.2} s", wall.as_secs_f64());
    Ok(if report.converged == report.final_members {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
