//! `rekeycast demo`: a GCKS and N members in this process on loopback multicast, each member
//! with its own socket and thread, running rekeys with churn under loss simulated at each
//! member's receive ([`rekeycast::demo::run`]). Prints a summary; `--report DIR` also writes
//! `summary.json` and `time-to-key.svg`.

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rekeycast::demo::{DemoConfig, DemoReport, RekeyFigures};
use rekeycast::sim::rekey::quantile;
use serde::Serialize;

use super::loss::LossArgs;
use super::ms;

/// The flags of `rekeycast demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Members at the start (each with its own socket and thread).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub members: usize,
    /// Members the first message admits, of which only `--members` run (the others hold a
    /// leaf and never start): the first message of a bigger group. `--admit 512 --members
    /// 50 --rekeys 0 --loss 0.05` is the first message of a group admitting 512 members (55
    /// chunks) received by 50. Default: `--members`.
    #[arg(long, value_name = "N")]
    pub admit: Option<usize>,
    /// Rekeys after the first message (which admits the members).
    #[arg(long, value_name = "R", default_value_t = 20)]
    pub rekeys: usize,
    /// Fraction of the members replaced in each rekey (as many leave as join), 0 to 1.
    #[arg(long, value_name = "F", default_value_t = 0.05)]
    pub churn: f64,
    /// The simulated loss.
    #[command(flatten)]
    pub loss: LossArgs,
    /// Seed of the churn and of the simulated loss.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write `summary.json` and `time-to-key.svg` to this directory (created if
    /// missing).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

/// How long the demo waits for every member to have a rekey's key before the next rekey,
/// seconds.
pub const REKEY_TIMEOUT_S: u64 = 20;

/// Time-to-key percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
    /// Members' key updates measured.
    pub samples: u64,
}

/// One rekey in `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RekeySummary {
    /// The message's sequence number.
    pub seq: u64,
    /// Members after it.
    pub members: usize,
    /// Chunks (source symbols) of its message.
    pub chunks: usize,
    /// Members that did not have its key within the timeout.
    pub missing: usize,
    /// Time to key, milliseconds.
    pub time_to_key_ms: Percentiles,
}

/// The sender's figures in `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SenderSummary {
    /// Datagrams sent through the GCKS's socket.
    pub datagrams_sent: u64,
    /// Bytes of every datagram sent.
    pub bytes_sent: u64,
    /// Bytes of the source symbols sent (each message's own size, once).
    pub source_bytes_sent: u64,
    /// `bytes_sent / source_bytes_sent`.
    pub wire_per_source: f64,
    /// Source symbols sent.
    pub source_symbols: u64,
    /// Proactive repair symbols sent.
    pub proactive_symbols: u64,
    /// Repair symbols sent in answer to NACKs.
    pub repair_symbols: u64,
    /// Manifest datagrams sent.
    pub manifests: u64,
    /// Heartbeats sent.
    pub heartbeats: u64,
    /// Immediate repair advertisements sent.
    pub advertisements: u64,
    /// NACKs received (that passed the MAC check).
    pub nacks_received: u64,
    /// Repair orders made.
    pub repair_orders: u64,
    /// Datagrams the GCKS rejected.
    pub rejected: u64,
    /// Event-loop lag percentiles, microseconds: p50, p90, p99, max.
    pub loop_lag_us: [u64; 4],
}

/// Everything `rekeycast demo` reports: printed, and written as `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Members at the start (running).
    pub members_initial: usize,
    /// Members the first message admitted (running or not).
    pub members_admitted: usize,
    /// Members at the end.
    pub members_final: usize,
    /// Rekeys after the first message.
    pub rekeys: usize,
    /// Messages sent (the first, admitting one included).
    pub messages: usize,
    /// Churn per rekey.
    pub churn: f64,
    /// The simulated loss, in words.
    pub loss: String,
    /// The seed.
    pub seed: u64,
    /// Wall time of the run, seconds.
    pub elapsed_s: f64,
    /// Time to key over every rekey and member, milliseconds (from hdrhistogram).
    pub time_to_key_ms: Percentiles,
    /// Per rekey.
    pub per_rekey: Vec<RekeySummary>,
    /// The GCKS's sending.
    pub sender: SenderSummary,
    /// Resync exchanges served (from the GCKS's history, in process).
    pub resyncs: u64,
    /// State checks answered.
    pub state_checks: u64,
    /// Datagrams the final members rejected before any signature check.
    pub rejected_before_signature_check: u64,
    /// Signature checks the final members made.
    pub signature_checks: u64,
    /// Group datagrams dropped by the simulated loss at the final members.
    pub simulated_drops: u64,
    /// Key updates members did not have within the timeout, over every rekey.
    pub missing: usize,
    /// The latest message's sequence number.
    pub seq: u64,
    /// The current group key's version.
    pub group_key_version: u32,
    /// Whether every final member holds the current group key.
    pub all_current: bool,
}

/// Runs `rekeycast demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    if args.members == 0 {
        bail!("--members 0: the demo needs at least one member");
    }
    if args.admit.is_some_and(|admit| admit < args.members) {
        bail!("--admit must be at least --members ({})", args.members);
    }
    if !(0.0..=1.0).contains(&args.churn) {
        bail!("--churn {}: must be between 0 and 1", args.churn);
    }
    let loss = args.loss.model()?;
    if let Some(dir) = &args.report {
        fs::create_dir_all(dir)
            .with_context(|| format!("--report {}: creating the directory", dir.display()))?;
    }
    let config = DemoConfig {
        rekey_timeout: Duration::from_secs(REKEY_TIMEOUT_S),
        members: args.members,
        admitted: args.admit.unwrap_or(args.members),
        rekeys: args.rekeys,
        churn: args.churn,
        loss,
        seed: args.seed,
        ..DemoConfig::new()
    };
    println!(
        "rekeycast demo: a GCKS and {} members on loopback multicast ({}), {} rekeys with {:.0}% \
         churn, seed {}",
        config.members,
        config.group,
        config.rekeys,
        config.churn * 100.0,
        config.seed
    );
    if config.admitted > config.members {
        println!(
            "the first message admits {} members; {} of them run (the others hold a leaf and \
             never start)",
            config.admitted, config.members
        );
    }
    println!(
        "loss: {}, SIMULATED at each member's receive (loopback multicast loses nothing)",
        args.loss.describe()
    );
    let total = config.rekeys as u64 + 1;
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} messages {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    let outcome = rekeycast::demo::run(&config, |progress| {
        bar.set_length(progress.total as u64);
        bar.set_position(progress.done as u64);
    });
    bar.finish_and_clear();
    let report = outcome.context("the demo failed")?;
    let summary = summarize(args, &report);
    print_summary(&summary);
    if let Some(dir) = &args.report {
        let json = dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary).context("encoding summary.json")?;
        fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
        let svg = dir.join("time-to-key.svg");
        super::chart::time_to_key_svg(&svg, &report.rekeys)
            .with_context(|| format!("writing {}", svg.display()))?;
        println!("report: {} and {}", json.display(), svg.display());
    }
    Ok(if summary.all_current {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The figures of a run.
pub fn summarize(args: &DemoArgs, report: &DemoReport) -> Summary {
    let histogram = &report.time_to_key;
    let time_to_key_ms = Percentiles {
        p50: ms(histogram.value_at_quantile(0.5)),
        p90: ms(histogram.value_at_quantile(0.9)),
        p99: ms(histogram.value_at_quantile(0.99)),
        max: ms(histogram.max()),
        samples: histogram.len(),
    };
    let sender = &report.gcks.sender;
    let lag = report.gcks.loop_lag_us;
    Summary {
        members_initial: args.members,
        members_admitted: args.admit.unwrap_or(args.members).max(args.members),
        members_final: report.members.len(),
        rekeys: args.rekeys,
        messages: report.rekeys.len(),
        churn: args.churn,
        loss: args.loss.describe(),
        seed: args.seed,
        elapsed_s: report.elapsed.as_secs_f64(),
        time_to_key_ms,
        per_rekey: report.rekeys.iter().map(rekey_summary).collect(),
        sender: SenderSummary {
            datagrams_sent: report.gcks.datagrams_sent,
            bytes_sent: sender.bytes_sent,
            source_bytes_sent: sender.source_bytes_sent,
            wire_per_source: sender.bytes_sent as f64 / sender.source_bytes_sent.max(1) as f64,
            source_symbols: sender.source_symbols_sent,
            proactive_symbols: sender.proactive_symbols_sent,
            repair_symbols: sender.repair_symbols_sent,
            manifests: sender.manifests_sent,
            heartbeats: sender.heartbeats_sent,
            advertisements: sender.advertisements_sent,
            nacks_received: sender.nacks_received,
            repair_orders: report.gcks.repair_orders,
            rejected: sender.rejected,
            loop_lag_us: [lag.p50, lag.p90, lag.p99, lag.max],
        },
        resyncs: report.resyncs,
        state_checks: report.state_checks,
        rejected_before_signature_check: report.rejected(),
        signature_checks: report.signature_checks(),
        simulated_drops: report.members.iter().map(|m| m.simulated_drops).sum(),
        missing: report.rekeys.iter().map(|r| r.missing).sum(),
        seq: report.gcks.seq,
        group_key_version: report.gcks.group_key_version,
        all_current: report.all_current,
    }
}

/// One rekey's figures.
pub fn rekey_summary(figures: &RekeyFigures) -> RekeySummary {
    let times = &figures.time_to_key_us;
    RekeySummary {
        seq: figures.seq,
        members: figures.members,
        chunks: figures.chunks,
        missing: figures.missing,
        time_to_key_ms: Percentiles {
            p50: ms(quantile(times, 0.5)),
            p90: ms(quantile(times, 0.9)),
            p99: ms(quantile(times, 0.99)),
            max: ms(times.last().copied().unwrap_or(0)),
            samples: times.len() as u64,
        },
    }
}

fn print_summary(s: &Summary) {
    let t = &s.time_to_key_ms;
    let w = &s.sender;
    println!(
        "done in {:.1} s: {} messages ({} rekeys after the one admitting the first {} members), \
         {} members at the end",
        s.elapsed_s, s.messages, s.rekeys, s.members_initial, s.members_final
    );
    println!(
        "time to key:      p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} key \
         updates)",
        t.p50, t.p90, t.p99, t.max, t.samples
    );
    if let Some(first) = s.per_rekey.first() {
        let f = &first.time_to_key_ms;
        println!(
            "first message:    {} chunks admitting {} members ({} running): time to key p50 \
             {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            first.chunks, s.members_admitted, s.members_initial, f.p50, f.p99, f.max
        );
    }
    if s.missing > 0 {
        println!(
            "                  {} key updates not within the {} s wait of their rekey (those \
             members caught up later, by repair or resync, and are not in the percentiles)",
            s.missing, REKEY_TIMEOUT_S
        );
    }
    println!(
        "sent:             {} datagrams, {} bytes for {} source bytes ({:.2}x)",
        w.datagrams_sent, w.bytes_sent, w.source_bytes_sent, w.wire_per_source
    );
    println!(
        "                  {} source symbols, {} proactive repair, {} manifests, {} heartbeats, \
         {} advertisements",
        w.source_symbols, w.proactive_symbols, w.manifests, w.heartbeats, w.advertisements
    );
    println!(
        "repair:           {} NACKs received, {} repair orders, {} repair symbols",
        w.nacks_received, w.repair_orders, w.repair_symbols
    );
    println!(
        "resync:           {} resyncs, {} state checks",
        s.resyncs, s.state_checks
    );
    println!(
        "members:          {} datagrams dropped by the simulated loss, {} rejected before any \
         signature check, {} signature checks",
        s.simulated_drops, s.rejected_before_signature_check, s.signature_checks
    );
    println!(
        "GCKS event loop:  lag p50 {} us, p99 {} us, max {} us",
        w.loop_lag_us[0], w.loop_lag_us[2], w.loop_lag_us[3]
    );
    if s.all_current {
        println!(
            "OK: every member ({}) holds the current group key (version {}, message {})",
            s.members_final, s.group_key_version, s.seq
        );
    } else {
        println!(
            "FAILED: not every member holds the current group key (version {}, message {}); {} \
             key updates missing",
            s.group_key_version, s.seq, s.missing
        );
    }
}
