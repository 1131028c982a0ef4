//! `relay`: what a tier of relays saves the GCKS, in the seeded simulator of
//! `rekeycast::sim::rekey`: the GCKS's repair symbols (and NACKs received) per rekey for N
//! members behind R relays against the same N members all directly on the GCKS, side by side
//! in one run, at the same loss (5% independent on every member link and, with relays, on
//! every relay's downlink too: loss on both tiers).
//!
//! The group starts in sync from 100,000 members on ([`ScenarioConfig::bootstrap_initial`],
//! blocks of 64 symbols, as in `sim --huge`), then `--rekeys` rekeys at 1% churn are measured.
//!
//! `--failover` runs the relay-failover cell instead: one relay killed 10 ms into a rekey's
//! message, its members with relay directories (they fail over to the next relay) against the
//! same run without (they resync from the GCKS), over `--seeds` seeds: the killed relay's
//! members' longest wait for a message from the kill on, their fetches to the GCKS, where they
//! end up, each seed and the median.

use std::time::{Duration, Instant};

use rekeycast::sim::rekey::{self, ScenarioConfig, ScenarioReport};
use rekeycast::sim::{LinkConfig, Loss};
use serde_json::{json, Value};

/// Options of the `relay` area.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Members (behind the relays, or all on the GCKS).
    #[arg(long, default_value_t = 100_000)]
    members: usize,
    /// Relays (each gets members / relays of the members).
    #[arg(long, default_value_t = 100)]
    relays: usize,
    /// Rekeys measured (after the message that admits everybody).
    #[arg(long, default_value_t = 1)]
    rekeys: usize,
    /// Also run the relays in store-and-forward mode (no cut-through), a third row.
    #[arg(long)]
    store_and_forward: bool,
    /// Run the relay-failover cell (a relay killed mid-message) instead.
    #[arg(long)]
    failover: bool,
    /// Seeds of the failover cell.
    #[arg(long, default_value_t = 5)]
    seeds: u64,
}

const CHURN: f64 = 0.01;
const LOSS: Loss = Loss::Bernoulli { p: 0.05 };
/// Groups at least this large start in sync, as in the `sim` bench.
const BOOTSTRAP_FROM: usize = 100_000;

/// Runs the two scenarios and prints the table and the JSON line.
pub fn run(quick: bool, args: &Args) -> anyhow::Result<()> {
    if args.failover {
        return run_failover(quick, args);
    }
    let (members, relays, rekeys) = if quick {
        (2_000, 20, 1)
    } else {
        (args.members, args.relays, args.rekeys)
    };
    anyhow::ensure!(
        members >= 1 && relays >= 1,
        "--members and --relays must be >= 1"
    );
    println!(
        "relay: {members} members directly on the GCKS vs behind {relays} relays ({} each), \
         {rekeys} rekey(s) at {}% churn, 5% iid loss on every member link and every relay \
         downlink{}",
        members.div_ceil(relays),
        CHURN * 100.0,
        if members >= BOOTSTRAP_FROM {
            "; the group starts in sync (bootstrapped), 64-symbol blocks"
        } else {
            ""
        }
    );
    let mut rows = Vec::new();
    let mut runs = vec![(0, true), (relays, true)];
    if args.store_and_forward || quick {
        runs.push((relays, false));
    }
    for (tier, cut_through) in runs {
        eprintln!(
            "relay: {members} members, {tier} relays{} ... [{}]",
            if cut_through || tier == 0 {
                ""
            } else {
                ", store and forward"
            },
            crate::sim::clock()
        );
        let start = Instant::now();
        let mut config = config(members, tier, rekeys);
        config.relay_cut_through = cut_through;
        let report = rekey::run(&config)?;
        let wall = start.elapsed();
        eprintln!("relay:   done in {:.1} s", wall.as_secs_f64());
        let mut row = row(tier, rekeys, &report, wall);
        row["cut_through"] = json!(tier > 0 && cut_through);
        rows.push(row);
    }
    println!();
    println!(
        "{:>7} {:>7} | {:>10} {:>10} {:>10} {:>10} | {:>12} {:>12} | {:>11} {:>7}",
        "relays",
        "members",
        "GCKS src",
        "GCKS rep",
        "GCKS NACK",
        "rep/rekey",
        "relay rep",
        "relay NACK",
        "converged",
        "wall s"
    );
    for row in &rows {
        let n = |key: &str| row[key].as_u64().unwrap_or(0);
        let mode = match (n("relays"), row["cut_through"].as_bool()) {
            (0, _) => "direct",
            (_, Some(true)) => "cut-through",
            _ => "store and forward",
        };
        let f = |key: &str| row[key].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>7} {:>7} | {:>10} {:>10} {:>10} {:>10.1} | {:>12} {:>12} | {:>11} {:>7.1}",
            n("relays"),
            n("members"),
            n("gcks_source_symbols"),
            n("gcks_repair_symbols"),
            n("gcks_nacks_received"),
            f("gcks_repair_per_rekey"),
            n("relays_repair_symbols"),
            n("relays_nacks_received"),
            format!("{}/{}", n("converged"), n("final_members")),
            f("wall_s"),
        );
        println!(
            "{:>17} {mode}: time to key p50 {:.1} ms, p99 {:.1} ms; GCKS {} proactive symbols, \
             {} bytes",
            "",
            f("time_to_key_p50_us") / 1000.0,
            f("time_to_key_p99_us") / 1000.0,
            n("gcks_proactive_symbols"),
            n("gcks_bytes"),
        );
    }
    let direct = rows[0]["gcks_repair_per_rekey"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let relayed = rows[1]["gcks_repair_per_rekey"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let ratio = relayed / direct;
    println!();
    println!(
        "GCKS repair symbols per rekey: {relayed:.1} behind {relays} relays vs {direct:.1} direct: \
         ratio {ratio:.4} (relayed / direct)"
    );
    let json = json!({
        "bench": "relay",
        "quick": quick,
        "members": members,
        "relays": relays,
        "rekeys": rekeys,
        "loss": "iid 5% on both tiers",
        "rows": rows,
        "gcks_repair_ratio_relayed_over_direct": if ratio.is_finite() { json!(ratio) } else { Value::Null },
    });
    println!("{json}");
    Ok(())
}

fn config(members: usize, relays: usize, rekeys: usize) -> ScenarioConfig {
    let seed = members as u64 * 7 + 5;
    let mut config = ScenarioConfig::new(seed, members, rekeys, CHURN, LOSS);
    config.relays = relays;
    config.relay_downlink = LinkConfig {
        jitter: Duration::from_millis(1),
        ..LinkConfig::lossy(LOSS, Duration::from_millis(5))
    };
    config.bootstrap_initial = members >= BOOTSTRAP_FROM;
    if config.bootstrap_initial {
        config.message.max_block_symbols = 64;
    }
    config
}

fn row(relays: usize, rekeys: usize, report: &ScenarioReport, wall: Duration) -> Value {
    let measured = if report.bootstrapped > 0 {
        rekeys.max(1)
    } else {
        rekeys + 1
    };
    json!({
        "relays": relays,
        "members": report.final_members,
        "messages_measured": measured,
        "gcks_source_symbols": report.sender.source_symbols_sent,
        "gcks_proactive_symbols": report.sender.proactive_symbols_sent,
        "gcks_repair_symbols": report.sender.repair_symbols_sent,
        "gcks_repair_per_rekey": report.sender.repair_symbols_sent as f64 / measured as f64,
        "gcks_nacks_received": report.sender.nacks_received,
        "gcks_bytes": report.sender.bytes_sent,
        "relays_repair_symbols": report.relays.downstream.repair_symbols_sent,
        "relays_nacks_received": report.relays.downstream.nacks_received,
        "relays_forwarded": report.relays.forwarded,
        "relays_not_forwarded": report.relays.not_forwarded,
        "relays_converged": report.relays.converged,
        "converged": report.converged,
        "final_members": report.final_members,
        "resync_applied": report.applied_from_resync,
        "time_to_key_p50_us": report.time_to_key_quantile_us(0.5),
        "time_to_key_p99_us": report.time_to_key_quantile_us(0.99),
        "wall_s": wall.as_secs_f64(),
    })
}

/// The relay-failover cell: see the [module docs](self).
fn run_failover(quick: bool, args: &Args) -> anyhow::Result<()> {
    let (members, relays) = if quick { (2_000, 20) } else { (10_000, 100) };
    anyhow::ensure!(args.seeds >= 1, "--seeds must be >= 1");
    println!(
        "relay failover: {members} members behind {relays} relays, 5% iid loss on both tiers, \
         heartbeats at least every 1 s; relay 1 killed 10 ms into rekey 2's message; {} seeds",
        args.seeds
    );
    let mut rows = Vec::new();
    for failover in [true, false] {
        for seed in 1..=args.seeds {
            eprintln!(
                "relay failover: seed {seed}, failover {failover} ... [{}]",
                crate::sim::clock()
            );
            let mut config = config(members, relays, 3);
            config.seed = seed * 1_000 + 7;
            config.sender.heartbeat_max = Duration::from_secs(1);
            config.receiver.silence_timeout = Duration::from_secs(3);
            config.failover.idle_silence = Duration::from_secs(2);
            config.kill_relay = Some((1, 2));
            config.kill_relay_after = Some(Duration::from_millis(10));
            config.member_failover = failover;
            let start = Instant::now();
            let report = rekey::run(&config)?;
            let f = &report.failover;
            rows.push(json!({
                "failover": failover,
                "seed": config.seed,
                "killed_relay_members": f.killed_relay_members,
                "kill_to_current_ms": f.kill_to_current.map(|d| d.as_secs_f64() * 1e3),
                "killed_members_fetches_to_gcks": f.killed_members_fetches_to_gcks,
                "left_on_dead_relay": f.members_per_relay.get(1).copied().unwrap_or(0),
                "on_gcks": f.members_on_gcks,
                "moves": f.moves.nack_moves + f.moves.silence_moves + f.moves.unreachable_moves,
                "converged": report.converged,
                "final_members": report.final_members,
                "wall_s": start.elapsed().as_secs_f64(),
            }));
        }
    }
    println!();
    println!(
        "{:>9} {:>6} | {:>7} {:>16} {:>12} {:>9} {:>7} {:>6} | {:>11}",
        "failover",
        "seed",
        "killed",
        "current after ms",
        "GCKS fetches",
        "left dead",
        "on GCKS",
        "moves",
        "converged"
    );
    for row in &rows {
        let n = |key: &str| row[key].as_u64().unwrap_or(0);
        println!(
            "{:>9} {:>6} | {:>7} {:>16} {:>12} {:>9} {:>7} {:>6} | {:>11}",
            row["failover"],
            n("seed"),
            n("killed_relay_members"),
            row["kill_to_current_ms"]
                .as_f64()
                .map_or("never".to_string(), |ms| format!("{ms:.0}")),
            n("killed_members_fetches_to_gcks"),
            n("left_on_dead_relay"),
            n("on_gcks"),
            n("moves"),
            format!("{}/{}", n("converged"), n("final_members")),
        );
    }
    let median = |failover: bool, key: &str| -> Value {
        let mut values: Vec<f64> = rows
            .iter()
            .filter(|r| r["failover"] == json!(failover))
            .map(|r| r[key].as_f64().unwrap_or(f64::INFINITY))
            .collect();
        values.sort_by(f64::total_cmp);
        values
            .get(values.len() / 2)
            .copied()
            .filter(|v| v.is_finite())
            .map_or(Value::Null, |v| json!(v))
    };
    let summary = json!({
        "failover_kill_to_current_ms_median": median(true, "kill_to_current_ms"),
        "failover_gcks_fetches_median": median(true, "killed_members_fetches_to_gcks"),
        "no_failover_kill_to_current_ms_median": median(false, "kill_to_current_ms"),
        "no_failover_gcks_fetches_median": median(false, "killed_members_fetches_to_gcks"),
    });
    println!();
    println!("medians: {summary}");
    println!(
        "{}",
        json!({
            "bench": "relay-failover",
            "quick": quick,
            "members": members,
            "relays": relays,
            "seeds": args.seeds,
            "rows": rows,
            "medians": summary,
        })
    );
    Ok(())
}
