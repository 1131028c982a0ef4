//! `sim`: whole rekey scenarios in the seeded simulator of `rekeycast::sim::rekey` (one GCKS
//! and thousands of members over a virtual network, so time-to-key does not depend on the
//! machine; wall time and memory do).
//!
//! For 1,000, 10,000 and 100,000 members at 1%, 5% and 20% independent loss and a bursty
//! Gilbert-Elliott setting (5% mean loss, mean burst 10) on every member link, 1% churn per
//! rekey: time to key (p50 / p99 / max, in path RTTs and in ms; hdrhistogram), wire bytes
//! per source byte (multicast and unicast chunk repair alike), NACKs per lost block (mean per
//! repair order, one block-round somebody lost, and the median over block-rounds as the GCKS
//! counted them) and per message, unicast chunk repairs per message (as a percentage of the
//! members), NACK-driven and proactive repair symbols per message, the share of
//! member-messages completed without TCP/HTTP resync, converged members, peak resident
//! memory per member and wall time. The goal lines and the JSON's `goals` are computed from
//! the same rows. A second table splits the wire bytes beyond the source symbols into
//! proactive, NACK-driven repair and control datagrams (manifests, heartbeats, advertisements).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rekeycast::sim::rekey::{self, ScenarioConfig, ScenarioReport};
use rekeycast::sim::Loss;
use serde_json::{json, Value};

/// Fraction of the members that leave (and as many join) in each rekey.
const CHURN: f64 = 0.01;

/// The repair goals, by loss setting: `(loss name, wire per source at most, time to key p99
/// in GRTT at most)`; `None` where the setting has no such goal.
const GOALS_BY_LOSS: [(&str, Option<f64>, Option<f64>); 4] = [
    ("iid 1%", None, None),
    ("iid 5%", Some(1.2), Some(4.0)),
    ("iid 20%", Some(1.5), Some(6.0)),
    ("GE 5% b10", Some(1.5), None),
];
/// The median of NACKs per lost block (block-round) at most, at every size and loss.
const GOAL_NACKS_PER_LOST_BLOCK_MEDIAN: f64 = 3.0;
/// Member-messages completed without TCP/HTTP resync, percent, at least, everywhere.
const GOAL_WITHOUT_RESYNC_PCT: f64 = 99.9;
/// Unicast chunk repairs per message, percent of the members, at most, at iid 5%.
const GOAL_UNICAST_PCT_AT_5: f64 = 1.0;

/// Options of the `sim` area.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Also run 100,000 members (one rekey, every loss setting): over an hour per row on two
    /// cores, so left out of the default full run.
    #[arg(long)]
    huge: bool,
    /// Internal: run one scenario `MEMBERS:REKEYS:LOSS_INDEX` in this process and print its
    /// row as JSON (the parent runs each scenario in a fresh process so that peak RSS is the
    /// scenario's own).
    #[arg(long, hide = true)]
    child: Option<String>,
    /// Run the scale cells instead (see `scale`): 100,000 members admitted by a multicast
    /// first message, and 1,000,000 members behind 1,000 relays; wall time and peak RSS.
    #[arg(long)]
    scale: bool,
    /// With `--scale`: run the cells at this many members instead (relays at one per 1,000).
    #[arg(long)]
    scale_members: Option<usize>,
    /// With `--scale`: run only this cell (`first` or `relays`).
    #[arg(long)]
    scale_cell: Option<String>,
    /// Internal: run scale cell `NAME:MEMBERS` in this process and print its row as JSON.
    #[arg(long, hide = true)]
    scale_child: Option<String>,
}

mod scale;

/// The loss settings, by index (the child process gets the index).
const LOSSES: [(&str, Loss); 4] = [
    ("iid 1%", Loss::Bernoulli { p: 0.01 }),
    ("iid 5%", Loss::Bernoulli { p: 0.05 }),
    ("iid 20%", Loss::Bernoulli { p: 0.20 }),
    ("GE 5% b10", Loss::BURSTY_5_PERCENT),
];

/// Runs the benchmark and prints its tables and JSON line.
pub fn run(quick: bool, args: &Args) -> anyhow::Result<()> {
    if let Some(spec) = &args.child {
        return run_child(spec);
    }
    if let Some(spec) = &args.scale_child {
        return scale::run_child(spec);
    }
    if args.scale {
        return scale::run(args.scale_members, args.scale_cell.as_deref());
    }
    // (members, rekeys): rekeys chosen so that the full run stays within about 15 minutes on
    // two cores. Cost grows with members x datagrams: every member handles every multicast
    // datagram, and the first message, which admits all members, is the largest (10,000
    // members: about 40 s for the first message, then about 7 s per rekey).
    let mut sizes: Vec<(usize, usize)> = if quick {
        vec![(1_000, 10), (10_000, 2)]
    } else {
        vec![(1_000, 100), (10_000, 20)]
    };
    if args.huge {
        // Bootstrapped in sync (see BOOTSTRAP_FROM): the rekeys are measured, not the
        // admitting message.
        sizes.push((100_000, 1));
    }
    let sample = ScenarioConfig::new(0, 1, 0, CHURN, Loss::None);
    println!(
        "sim: rekey scenarios, churn {}% per rekey, rekey every {:?}, settle {:?}; member links \
         {:?} one-way +{:?} jitter, loss on member up- and downlinks alike; symbol size {} B; \
         tree degree {}; resync RTT {:?}; times in path RTTs (GRTT) and ms; the first message \
         (admitting every member) counts as a message",
        CHURN * 100.0,
        sample.rekey_interval,
        sample.settle,
        sample.member_downlink.delay,
        sample.member_downlink.jitter,
        sample.message.symbol_size,
        sample.degree,
        sample.resync_rtt,
    );
    let exe = std::env::current_exe();
    let in_process = exe.is_err();
    println!(
        "memory per member: {}{}",
        MemoryProbe::detect().describe(),
        if in_process {
            " (IN-PROCESS fallback: later runs reuse the allocator's pages and understate)"
        } else {
            " (each scenario in a fresh process)"
        }
    );
    println!();
    print_header();
    let mut rows = Vec::new();
    for &(members, rekeys) in &sizes {
        for (index, &(name, _)) in LOSSES.iter().enumerate() {
            eprintln!(
                "sim: {members} members, {name}, {rekeys} rekeys ... [{}]",
                clock()
            );
            let row = match &exe {
                Ok(exe) => spawn_child(exe, members, rekeys, index).unwrap_or_else(|error| {
                    json!({
                        "members": members,
                        "loss": name,
                        "rekeys": rekeys,
                        "error": format!("{error:#}"),
                    })
                }),
                Err(_) => measure(members, rekeys, index).json(),
            };
            match row.get("wall_s").and_then(Value::as_f64) {
                Some(wall) => eprintln!("sim:   done in {wall:.1} s"),
                None => eprintln!("sim:   failed: {}", text(&row, "error")),
            }
            print_row(&row);
            rows.push(row);
        }
    }
    if !args.huge && !quick {
        println!(
            "{:>7} {:<9} {:>6} | skipped by default (minutes per row, bootstrapped in sync): \
             --huge runs it",
            100_000, "all", "-"
        );
    }
    println!();
    println!(
        "wire bytes beyond the source symbols, per source byte (proactive and repair datagrams \
         sized as the source ones; control = everything else: manifests, heartbeats, \
         advertisements):"
    );
    print_overhead_header();
    for row in &rows {
        print_overhead_row(row);
    }
    println!();
    let goals: Vec<Value> = rows.iter().flat_map(goal_checks).collect();
    for goal in &goals {
        println!(
            "goal at {} members, {}: {} {} {}: {} ({})",
            goal["members"],
            text(goal, "loss"),
            text(goal, "metric"),
            text(goal, "bound"),
            goal["limit"],
            goal["value"],
            if goal["met"].as_bool() == Some(true) {
                "met"
            } else {
                "NOT met"
            },
        );
    }
    let json = json!({
        "bench": "sim",
        "quick": quick,
        "churn": CHURN,
        "one_process_per_scenario": !in_process,
        "rows": rows,
        "goals": goals,
        "goals_met": goals.iter().all(|g| g["met"].as_bool() == Some(true)),
    });
    println!("{json}");
    Ok(())
}

/// The goals that apply to one row, each with the row's value and whether it is met: computed
/// from the row itself, so the JSON cannot disagree with the table.
fn goal_checks(row: &Value) -> Vec<Value> {
    let loss = text(row, "loss");
    let members = row.get("members").cloned().unwrap_or(Value::Null);
    let mut checks = Vec::new();
    let mut check = |metric: &str, value: f64, bound: &str, limit: f64| {
        let met = value.is_finite()
            && match bound {
                "<=" => value <= limit,
                _ => value >= limit,
            };
        checks.push(json!({
            "members": members,
            "loss": loss,
            "metric": metric,
            "value": finite(value),
            "bound": bound,
            "limit": limit,
            "met": met,
        }));
    };
    if row.get("error").is_some() {
        check("scenario ran", f64::NAN, ">=", 1.0);
        return checks;
    }
    check(
        "nacks_per_lost_block_median",
        num(row, "nacks_per_lost_block_median"),
        "<=",
        GOAL_NACKS_PER_LOST_BLOCK_MEDIAN,
    );
    check(
        "without_resync_pct",
        num(row, "without_resync_pct"),
        ">=",
        GOAL_WITHOUT_RESYNC_PCT,
    );
    if let Some(&(_, wire, ttk)) = GOALS_BY_LOSS.iter().find(|(name, _, _)| *name == loss) {
        if let Some(limit) = wire {
            check("wire_per_source", num(row, "wire_per_source"), "<=", limit);
        }
        if let Some(limit) = ttk {
            check(
                "time_to_key_p99_grtt",
                pct(row, "time_to_key_grtt", "p99"),
                "<=",
                limit,
            );
        }
    }
    if loss == "iid 5%" {
        check(
            "unicast_chunk_repairs_pct_of_members_per_message",
            num(row, "unicast_repairs_pct_of_members"),
            "<=",
            GOAL_UNICAST_PCT_AT_5,
        );
    }
    checks
}

/// The median of a histogram whose element `i` counts the samples of value `i`.
fn histogram_median(histogram: &[u64]) -> f64 {
    histogram_quantile(histogram, 0.5)
}

/// Quantile `q` of a histogram whose element `i` counts the samples of value `i`.
fn histogram_quantile(histogram: &[u64], q: f64) -> f64 {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return f64::NAN;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (value, &count) in histogram.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return value as f64;
        }
    }
    f64::NAN
}

/// In the child: runs one scenario and prints its row.
fn run_child(spec: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [members, rekeys, index] = parts.as_slice() else {
        anyhow::bail!("--child wants MEMBERS:REKEYS:LOSS_INDEX, got {spec:?}");
    };
    let index: usize = index.parse()?;
    anyhow::ensure!(index < LOSSES.len(), "no loss setting {index}");
    let row = measure(members.parse()?, rekeys.parse()?, index);
    println!("{}", row.json());
    Ok(())
}

/// Runs one scenario in a fresh process of this binary and reads its row.
fn spawn_child(
    exe: &std::path::Path,
    members: usize,
    rekeys: usize,
    index: usize,
) -> anyhow::Result<Value> {
    let output = std::process::Command::new(exe)
        .args(["sim", "--child", &format!("{members}:{rekeys}:{index}")])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "scenario process failed: {}",
        output.status
    );
    let stdout = String::from_utf8(output.stdout)?;
    let line = stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow::anyhow!("scenario process printed nothing"))?;
    Ok(serde_json::from_str(line)?)
}

/// A number of a row (NaN when absent or null).
fn num(row: &Value, key: &str) -> f64 {
    row.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// A percentile of a row's distribution (NaN when absent or null).
fn pct(row: &Value, key: &str, quantile: &str) -> f64 {
    row.get(key)
        .and_then(|d| d.get(quantile))
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}

/// A string of a row.
fn text<'a>(row: &'a Value, key: &str) -> &'a str {
    row.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The UTC time of day, for progress lines.
pub(crate) fn clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        day / 3600,
        (day % 3600) / 60,
        day % 60
    )
}

/// How resident memory per member is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemoryProbe {
    /// Peak RSS (VmHWM), reset before each run through `/proc/self/clear_refs`.
    PeakReset,
    /// VmRSS after the run minus before it: misses the peak (the scenario is dropped by then
    /// unless the allocator keeps its pages).
    RssDelta,
    /// Nothing readable.
    None,
}

impl MemoryProbe {
    fn detect() -> Self {
        if read_status_kib("VmRSS").is_none() {
            Self::None
        } else if reset_peak() && read_status_kib("VmHWM").is_some() {
            Self::PeakReset
        } else {
            Self::RssDelta
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::PeakReset => "peak_rss_minus_baseline",
            Self::RssDelta => "rss_delta_misses_peak",
            Self::None => "unavailable",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::PeakReset => {
                "(peak RSS during the run - RSS before it) / initial members, KiB (VmHWM reset \
                 through /proc/self/clear_refs before each run)"
            }
            Self::RssDelta => {
                "FALLBACK: (VmRSS after the run - VmRSS before it) / initial members, KiB; \
                 /proc/self/clear_refs could not reset the peak, so this misses the peak and \
                 understates memory"
            }
            Self::None => "unavailable (no /proc/self/status)",
        }
    }

    /// Before a run: the baseline, KiB.
    fn start(self) -> Option<u64> {
        match self {
            Self::PeakReset => {
                if !reset_peak() {
                    return None;
                }
                read_status_kib("VmRSS")
            }
            Self::RssDelta => read_status_kib("VmRSS"),
            Self::None => None,
        }
    }

    /// After a run: the peak (or the current RSS), KiB.
    fn end(self) -> Option<u64> {
        match self {
            Self::PeakReset => read_status_kib("VmHWM"),
            Self::RssDelta => read_status_kib("VmRSS"),
            Self::None => None,
        }
    }
}

/// Resets the peak RSS (VmHWM) to the current RSS; false when the kernel refuses.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `kB` field of `/proc/self/status`.
fn read_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[derive(Debug, Clone, Copy)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    /// Of microsecond samples, in microseconds.
    fn of_us(values: &[u64]) -> anyhow::Result<Self> {
        let mut histogram = Histogram::<u64>::new(3)?;
        for &value in values {
            histogram.record(value)?;
        }
        if histogram.is_empty() {
            return Ok(Self {
                p50: f64::NAN,
                p90: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
            });
        }
        Ok(Self {
            p50: histogram.value_at_quantile(0.5) as f64,
            p90: histogram.value_at_quantile(0.9) as f64,
            p99: histogram.value_at_quantile(0.99) as f64,
            max: histogram.max() as f64,
        })
    }

    fn scaled(&self, divisor: f64) -> Self {
        Self {
            p50: self.p50 / divisor,
            p90: self.p90 / divisor,
            p99: self.p99 / divisor,
            max: self.max / divisor,
        }
    }

    fn json(&self) -> Value {
        json!({
            "p50": finite(self.p50),
            "p90": finite(self.p90),
            "p99": finite(self.p99),
            "max": finite(self.max),
        })
    }
}

fn finite(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

/// One scenario: its setting and what it measured, or why it failed.
#[derive(Debug)]
struct Row {
    members: usize,
    loss: &'static str,
    rekeys: usize,
    seed: u64,
    memory_method: &'static str,
    outcome: anyhow::Result<Figures>,
}

#[derive(Debug)]
struct Figures {
    messages: u64,
    path_rtt: Duration,
    grtt_estimate: Duration,
    key_samples: usize,
    ttk_ms: Percentiles,
    ttk_grtt: Percentiles,
    wire_per_source: f64,
    bytes_sent: u64,
    source_bytes_sent: u64,
    repair_orders: u64,
    nacks_sent: u64,
    nacks_received: u64,
    nacks_per_lost_block: f64,
    nacks_per_lost_block_median: f64,
    nacks_per_lost_block_p90: f64,
    nacks_per_message: f64,
    unicast_repairs: u64,
    unicast_repairs_per_message: f64,
    unicast_repairs_pct_of_members: f64,
    source_symbols_per_message: f64,
    repair_per_message: f64,
    proactive_per_message: f64,
    manifests_per_message: f64,
    heartbeats_per_message: f64,
    advertisements_per_message: f64,
    /// Estimated from the source symbols' datagrams, per source byte.
    proactive_share: f64,
    repair_share: f64,
    control_share: f64,
    without_resync_pct: f64,
    member_messages: u64,
    applied_from_resync: u64,
    out_of_sync: usize,
    must_reregister: u64,
    converged: usize,
    final_members: usize,
    memory_kib_per_member: Option<f64>,
    wall: Duration,
}

impl Row {
    fn json(&self) -> Value {
        let mut value = json!({
            "members": self.members,
            "loss": self.loss,
            "rekeys": self.rekeys,
            "seed": self.seed,
            "memory_method": self.memory_method,
        });
        let figures = match &self.outcome {
            Ok(f) => json!({
                "messages": f.messages,
                "path_rtt_ms": f.path_rtt.as_secs_f64() * 1e3,
                "grtt_estimate_ms": f.grtt_estimate.as_secs_f64() * 1e3,
                "key_updates": f.key_samples,
                "time_to_key_ms": f.ttk_ms.json(),
                "time_to_key_grtt": f.ttk_grtt.json(),
                "wire_per_source": finite(f.wire_per_source),
                "bytes_sent": f.bytes_sent,
                "source_bytes_sent": f.source_bytes_sent,
                "repair_orders": f.repair_orders,
                "nacks_sent": f.nacks_sent,
                "nacks_received": f.nacks_received,
                "nacks_per_lost_block": finite(f.nacks_per_lost_block),
                "nacks_per_lost_block_median": finite(f.nacks_per_lost_block_median),
                "nacks_per_lost_block_p90": finite(f.nacks_per_lost_block_p90),
                "unicast_repairs": f.unicast_repairs,
                "unicast_repairs_per_message": finite(f.unicast_repairs_per_message),
                "unicast_repairs_pct_of_members": finite(f.unicast_repairs_pct_of_members),
                "nacks_per_message": finite(f.nacks_per_message),
                "source_symbols_per_message": finite(f.source_symbols_per_message),
                "repair_symbols_per_message": finite(f.repair_per_message),
                "proactive_symbols_per_message": finite(f.proactive_per_message),
                "manifests_per_message": finite(f.manifests_per_message),
                "heartbeats_per_message": finite(f.heartbeats_per_message),
                "advertisements_per_message": finite(f.advertisements_per_message),
                "overhead_proactive_per_source": finite(f.proactive_share),
                "overhead_repair_per_source": finite(f.repair_share),
                "overhead_control_per_source": finite(f.control_share),
                "without_resync_pct": finite(f.without_resync_pct),
                "member_messages": f.member_messages,
                "applied_from_resync": f.applied_from_resync,
                "out_of_sync_events": f.out_of_sync,
                "must_reregister": f.must_reregister,
                "converged": f.converged,
                "final_members": f.final_members,
                "memory_kib_per_member": f.memory_kib_per_member.map_or(Value::Null, finite),
                "wall_s": f.wall.as_secs_f64(),
            }),
            Err(error) => json!({ "error": format!("{error:#}") }),
        };
        if let (Value::Object(value), Value::Object(figures)) = (&mut value, figures) {
            value.extend(figures);
        }
        value
    }
}

/// Groups at least this large start in sync ([`ScenarioConfig::bootstrap_initial`]).
const BOOTSTRAP_FROM: usize = 100_000;

/// Runs one scenario: `members` initial members, `rekeys` rekeys, loss setting `index`.
fn measure(members: usize, rekeys: usize, index: usize) -> Row {
    let (loss_name, loss) = LOSSES[index.min(LOSSES.len() - 1)];
    let seed = members as u64 * 31 + index as u64;
    let mut config = ScenarioConfig::new(seed, members, rekeys, CHURN, loss);
    // Multicasting the message that admits 100,000 members (tens of thousands of chunks) to
    // every simulated member costs billions of deliveries: such a group starts in sync.
    config.bootstrap_initial = members >= BOOTSTRAP_FROM;
    if config.bootstrap_initial {
        // Blocks of 64 symbols: a member holds its block's symbols until its own chunk
        // arrives, and 100,000 simulated members holding half of a 256-symbol block each
        // would need some 15 GB at once.
        config.message.max_block_symbols = 64;
    }
    let probe = MemoryProbe::detect();
    let baseline = probe.start();
    let start = Instant::now();
    let result = rekey::run(&config);
    let wall = start.elapsed();
    let end = probe.end();
    let memory_kib_per_member = match (baseline, end) {
        (Some(baseline), Some(end)) => Some(end.saturating_sub(baseline) as f64 / members as f64),
        _ => None,
    };
    let outcome = result
        .map_err(anyhow::Error::from)
        .and_then(|report| figures(&report, members, wall, memory_kib_per_member));
    Row {
        members,
        loss: loss_name,
        rekeys,
        seed,
        memory_method: probe.name(),
        outcome,
    }
}

fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        f64::NAN
    } else {
        numerator as f64 / denominator as f64
    }
}

fn figures(
    report: &ScenarioReport,
    members: usize,
    wall: Duration,
    memory_kib_per_member: Option<f64>,
) -> anyhow::Result<Figures> {
    let ttk_us = Percentiles::of_us(&report.time_to_key_us)?;
    let rtt_us = report.path_rtt.as_secs_f64() * 1e6;
    let s = &report.sender;
    let messages = report.messages;
    // Every symbol datagram is one padded symbol plus the same header, so the source ones
    // give the size of the proactive and repair ones.
    let symbol_datagram = ratio(s.source_bytes_sent, s.source_symbols_sent);
    let source = s.source_bytes_sent as f64;
    let proactive_bytes = s.proactive_symbols_sent as f64 * symbol_datagram;
    let repair_bytes = s.repair_symbols_sent as f64 * symbol_datagram;
    let control_bytes = s.bytes_sent as f64 - source - proactive_bytes - repair_bytes;
    Ok(Figures {
        messages,
        path_rtt: report.path_rtt,
        grtt_estimate: report.grtt_estimate,
        key_samples: report.time_to_key_us.len(),
        ttk_ms: ttk_us.scaled(1e3),
        ttk_grtt: ttk_us.scaled(rtt_us),
        wire_per_source: report.wire_per_source(),
        bytes_sent: s.bytes_sent,
        source_bytes_sent: s.source_bytes_sent,
        repair_orders: report.repair_orders,
        nacks_sent: report.nacks_sent,
        nacks_received: s.nacks_received,
        nacks_per_lost_block: ratio(report.nacks_sent, report.repair_orders),
        nacks_per_lost_block_median: histogram_median(&report.nacks_per_lost_block),
        nacks_per_lost_block_p90: histogram_quantile(&report.nacks_per_lost_block, 0.9),
        unicast_repairs: report.chunk_repairs_sent,
        unicast_repairs_per_message: ratio(report.chunk_repairs_sent, messages),
        unicast_repairs_pct_of_members: 100.0 * ratio(report.chunk_repairs_sent, messages)
            / members as f64,
        nacks_per_message: ratio(report.nacks_sent, messages),
        source_symbols_per_message: ratio(s.source_symbols_sent, messages),
        repair_per_message: ratio(s.repair_symbols_sent, messages),
        proactive_per_message: ratio(s.proactive_symbols_sent, messages),
        manifests_per_message: ratio(s.manifests_sent, messages),
        heartbeats_per_message: ratio(s.heartbeats_sent, messages),
        advertisements_per_message: ratio(s.advertisements_sent, messages),
        proactive_share: proactive_bytes / source,
        repair_share: repair_bytes / source,
        control_share: control_bytes / source,
        without_resync_pct: report.without_resync() * 100.0,
        member_messages: report.member_messages,
        applied_from_resync: report.applied_from_resync,
        out_of_sync: report.out_of_sync.len(),
        must_reregister: report.must_reregister,
        converged: report.converged,
        final_members: report.final_members,
        memory_kib_per_member,
        wall,
    })
}

fn print_header() {
    println!(
        "{:>7} {:<9} {:>6} | {:>17} {:>13} | {:>6} | {:>6} {:>4} {:>7} | {:>7} | {:>8} {:>8} | {:>7} {:>13} | {:>7} {:>7}",
        "members",
        "loss",
        "rekeys",
        "time to key GRTT",
        "ttk ms",
        "wire/",
        "NACK/",
        "med",
        "NACK/",
        "ucast/",
        "repair/",
        "proact/",
        "no",
        "converged/",
        "KiB/",
        "wall",
    );
    println!(
        "{:>7} {:<9} {:>6} | {:>17} {:>13} | {:>6} | {:>6} {:>4} {:>7} | {:>7} | {:>8} {:>8} | {:>7} {:>13} | {:>7} {:>7}",
        "",
        "",
        "",
        "p50/p99/max",
        "p50/p99",
        "source",
        "lost",
        "lost",
        "msg",
        "memb%",
        "msg",
        "msg",
        "resync%",
        "final",
        "member",
        "s",
    );
}

fn print_row(row: &Value) {
    let members = num(row, "members");
    let loss = text(row, "loss");
    let rekeys = num(row, "rekeys");
    if let Some(error) = row.get("error").and_then(Value::as_str) {
        println!("{members:>7} {loss:<9} {rekeys:>6} | ERROR: {error}");
        return;
    }
    let memory = num(row, "memory_kib_per_member");
    println!(
        "{:>7} {:<9} {:>6} | {:>17} {:>13} | {:>6.3} | {:>6.2} {:>4.0} {:>7.1} | {:>7.3} | {:>8.1} {:>8.1} | {:>7.3} {:>13} | {:>7} {:>7.1}",
        members,
        loss,
        rekeys,
        format!(
            "{:.1}/{:.1}/{:.1}",
            pct(row, "time_to_key_grtt", "p50"),
            pct(row, "time_to_key_grtt", "p99"),
            pct(row, "time_to_key_grtt", "max"),
        ),
        format!(
            "{:.0}/{:.0}",
            pct(row, "time_to_key_ms", "p50"),
            pct(row, "time_to_key_ms", "p99"),
        ),
        num(row, "wire_per_source"),
        num(row, "nacks_per_lost_block"),
        num(row, "nacks_per_lost_block_median"),
        num(row, "nacks_per_message"),
        num(row, "unicast_repairs_pct_of_members"),
        num(row, "repair_symbols_per_message"),
        num(row, "proactive_symbols_per_message"),
        num(row, "without_resync_pct"),
        format!("{}/{}", num(row, "converged"), num(row, "final_members")),
        if memory.is_finite() {
            format!("{memory:.1}")
        } else {
            "n/a".to_string()
        },
        num(row, "wall_s"),
    );
}

fn print_overhead_header() {
    println!(
        "{:>7} {:<9} | {:>8} {:>7} {:>6} | {:>7} {:>7} {:>7} | {:>9} {:>9} {:>7} {:>7} | {:>7} {:>5}",
        "members",
        "loss",
        "src sym/",
        "manif/",
        "hb/",
        "adv/",
        "orders",
        "NACKs",
        "proactive",
        "repair",
        "control",
        "total",
        "GRTT",
        "oos",
    );
    println!(
        "{:>7} {:<9} | {:>8} {:>7} {:>6} | {:>7} {:>7} {:>7} | {:>9} {:>9} {:>7} {:>7} | {:>7} {:>5}",
        "", "", "msg", "msg", "msg", "msg", "", "", "/source", "/source", "/source", "/source",
        "est ms", "",
    );
}

fn print_overhead_row(row: &Value) {
    let members = num(row, "members");
    let loss = text(row, "loss");
    if row.get("error").is_some() {
        println!("{members:>7} {loss:<9} | (failed)");
        return;
    }
    println!(
        "{:>7} {:<9} | {:>8.1} {:>7.1} {:>6.1} | {:>7.1} {:>7} {:>7} | {:>9.3} {:>9.3} {:>7.3} {:>7.3} | {:>7.1} {:>5}",
        members,
        loss,
        num(row, "source_symbols_per_message"),
        num(row, "manifests_per_message"),
        num(row, "heartbeats_per_message"),
        num(row, "advertisements_per_message"),
        num(row, "repair_orders"),
        num(row, "nacks_sent"),
        num(row, "overhead_proactive_per_source"),
        num(row, "overhead_repair_per_source"),
        num(row, "overhead_control_per_source"),
        num(row, "wire_per_source") - 1.0,
        num(row, "grtt_estimate_ms"),
        num(row, "out_of_sync_events"),
    );
}
