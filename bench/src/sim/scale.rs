//! The scale cells of `sim --scale`: what the simulator itself carries, in wall time and
//! memory, rather than what the protocol achieves.
//!
//! - `first`: 100,000 members at 5% iid loss admitted by a multicast first message (not
//!   bootstrapped: every member receives the admitting message's datagrams), then one rekey
//!   at 1% churn;
//! - `relays`: 1,000,000 members behind 1,000 relays (1,000 each; relays and members start
//!   in sync, see `ScenarioConfig::bootstrap_relays`), one rekey at 1% churn, 5% iid loss on
//!   member links.
//!
//! Each cell runs in a fresh process (so that its peak RSS is its own), prints a progress
//! line to stderr every 50,000 members admitted, every second of virtual time and every 15
//! seconds of wall time (wall time, CPU time, RSS, datagrams delivered and skipped), then
//! its row: wall and CPU time (the
//! scenario thread's, which on a shared machine says more than the wall time), peak RSS
//! (VmHWM), peak RSS per member, datagrams delivered and CPU nanoseconds per delivery
//! (everything, the bootstrap included, over the deliveries), the copies the network skipped
//! (see below), and the scenario's own figures. `--scale-members N` runs the cells at N
//! members (relays at one per 1,000), to measure on a busy machine and extrapolate.
//!
//! Deliveries are filtered ([`Deliveries::Filtered`]): a member is not handed the symbols
//! its session would drop unread at the cost of a header read (chunk symbols of other
//! blocks than its own once the manifest named it, symbols of finished messages), as its
//! socket would read and drop them; they are counted as skipped, not delivered. Nothing
//! else is modelled away: every member verifies its own manifest signature and its own
//! chunk (the member signature checks are printed), and the outcomes are those of an
//! unfiltered run with the same draws (`tests/sim_filtered.rs`).

use std::sync::OnceLock;
use std::time::Instant;

use rekeycast::sim::rekey::{self, Deliveries, Progress, ScenarioConfig};
use rekeycast::sim::Loss;
use serde_json::{json, Value};

use super::{clock, read_status_kib, Percentiles, CHURN};

/// The cells, by name: (name, default members).
const CELLS: [(&str, usize); 2] = [("first", 100_000), ("relays", 1_000_000)];

/// Members behind each relay in the `relays` cell.
const MEMBERS_PER_RELAY: usize = 1_000;

/// When the child started, for its progress lines.
static STARTED: OnceLock<Instant> = OnceLock::new();

/// The scenario of cell `name` at `members` members.
fn config(name: &str, members: usize) -> anyhow::Result<ScenarioConfig> {
    let loss = Loss::Bernoulli { p: 0.05 };
    let seed = 0x5CA1E + members as u64;
    let mut config = ScenarioConfig::new(seed, members, 1, CHURN, loss);
    // The block size is the layout's own choice from the chunk count (64-symbol blocks,
    // set by hand, cannot hold the first message of 100,000 members in 255 blocks).
    config.progress = Some(progress);
    // Members are not handed the symbols their sessions drop unread (other blocks than
    // their own once the manifest named it): what their sockets would read and drop at the
    // cost of a header read. Every member still verifies its own manifest and chunk.
    config.deliveries = Deliveries::Filtered;
    match name {
        "first" => {}
        "relays" => {
            config.relays = members.div_ceil(MEMBERS_PER_RELAY).max(1);
            config.bootstrap_initial = true;
            config.bootstrap_relays = true;
        }
        _ => anyhow::bail!("no scale cell {name:?} (first, relays)"),
    }
    Ok(config)
}

/// CPU time of this thread (the scenario's), nanoseconds, from `/proc/thread-self/schedstat`:
/// on a shared machine the wall time says more about the others than about the simulator.
fn cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Wall seconds (since the start) of the last progress line.
static LAST_LINE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Seconds of wall time between progress lines inside one second of virtual time.
const TICK_LINE_SECS: u64 = 15;

/// The progress line of a long run: at each phase step and second of virtual time, and
/// every [`TICK_LINE_SECS`] of wall time in between.
fn progress(p: &Progress) {
    use std::sync::atomic::Ordering;
    let wall = STARTED.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
    let last = LAST_LINE.load(Ordering::Relaxed);
    if p.phase == "tick" && (wall as u64) < last + TICK_LINE_SECS {
        return;
    }
    LAST_LINE.store(wall as u64, Ordering::Relaxed);
    let cpu = cpu_ns().map_or(0.0, |ns| ns as f64 / 1e9);
    let rss = read_status_kib("VmRSS").unwrap_or(0) as f64 / (1024.0 * 1024.0);
    eprintln!(
        "sim scale: [{} wall {wall:.0} s, CPU {cpu:.0} s, RSS {rss:.2} GiB] {}, virtual {:.1} s, \
         {} messages, {} members added, {} delivered, {} skipped, {} in flight",
        clock(),
        p.phase,
        p.virtual_time.as_secs_f64(),
        p.messages,
        p.members_added,
        p.delivered,
        p.filtered,
        p.in_flight,
    );
}

/// Runs the scale cells (each in a fresh process) and prints their rows and JSON line.
pub fn run(members: Option<usize>, cell: Option<&str>) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    println!(
        "sim scale cells: wall time, peak RSS (VmHWM) and deliveries of the simulator at \
         scale; 1% churn, 5% iid loss on member links, block size from the chunk count; members are not \
         handed the symbols they drop unread (other blocks: 'skipped'), every member still \
         verifies its own manifest and chunk ('sig checks')"
    );
    println!(
        "{:<7} {:>9} {:>6} | {:>8} {:>8} {:>9} {:>8} | {:>13} {:>14} {:>10} {:>8} | {:>11} {:>7} {:>10}",
        "cell",
        "members",
        "relays",
        "wall s",
        "CPU s",
        "peak GiB",
        "KiB/mbr",
        "delivered",
        "skipped",
        "sig checks",
        "CPU ns/d",
        "ttk p50/p99",
        "wire/",
        "converged"
    );
    let mut rows = Vec::new();
    for (name, default) in CELLS {
        if cell.is_some_and(|c| c != name) {
            continue;
        }
        let members = members.unwrap_or(default);
        eprintln!(
            "sim scale: cell {name}, {members} members ... [{}]",
            clock()
        );
        let row = spawn(&exe, name, members).unwrap_or_else(
            |error| json!({ "cell": name, "members": members, "error": format!("{error:#}") }),
        );
        print_row(&row);
        rows.push(row);
    }
    println!("{}", json!({ "bench": "sim-scale", "rows": rows }));
    Ok(())
}

fn spawn(exe: &std::path::Path, name: &str, members: usize) -> anyhow::Result<Value> {
    let output = std::process::Command::new(exe)
        .args(["sim", "--scale-child", &format!("{name}:{members}")])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "scale process failed: {}",
        output.status
    );
    let stdout = String::from_utf8(output.stdout)?;
    let line = stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow::anyhow!("scale process printed nothing"))?;
    Ok(serde_json::from_str(line)?)
}

/// In the child: runs cell `NAME:MEMBERS` and prints its row.
pub fn run_child(spec: &str) -> anyhow::Result<()> {
    let (name, members) = spec
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("--scale-child wants NAME:MEMBERS, got {spec:?}"))?;
    let members: usize = members.parse()?;
    let config = config(name, members)?;
    let baseline_kib = read_status_kib("VmRSS");
    let start = *STARTED.get_or_init(Instant::now);
    let cpu_start = cpu_ns();
    let report = rekey::run(&config)?;
    let wall = start.elapsed();
    let cpu_s = cpu_ns()
        .zip(cpu_start)
        .map(|(end, start)| end.saturating_sub(start) as f64 / 1e9);
    let peak_kib = read_status_kib("VmHWM");
    let delivered = report.network.delivered;
    let ttk = Percentiles::of_us(&report.time_to_key_us)?.scaled(1e3);
    let per_member = peak_kib.map(|peak| peak as f64 / members as f64);
    let row = json!({
        "cell": name,
        "members": members,
        "relays": config.relays,
        "rekeys": config.rekeys,
        "churn": CHURN,
        "loss": "iid 5%",
        "bootstrapped": report.bootstrapped,
        "wall_s": wall.as_secs_f64(),
        "baseline_rss_kib": baseline_kib,
        "peak_rss_kib": peak_kib,
        "peak_rss_kib_per_member": per_member,
        "delivered": delivered,
        "filtered": report.network.filtered,
        "member_signature_checks": report.signature_checks,
        "join_failures": report.gcks.join_failures,
        "batch_failures": report.gcks.batch_failures,
        "gcks_poisoned": report.gcks.poisoned,
        "member_counters": format!("{:?}", report.receivers),
        "sender_counters": format!("{:?}", report.sender),
        "relay_downstream_counters": format!("{:?}", report.relays.downstream),
        "bytes_delivered": report.network.bytes_delivered,
        "ns_per_delivery": wall.as_nanos() as f64 / delivered.max(1) as f64,
        "cpu_s": cpu_s,
        "cpu_ns_per_delivery": cpu_s.map(|cpu| cpu * 1e9 / delivered.max(1) as f64),
        "messages": report.messages,
        "time_to_key_ms": ttk.json(),
        "wire_per_source": report.wire_per_source(),
        "source_symbols_sent": report.sender.source_symbols_sent,
        "relay_forwarded": report.relays.forwarded,
        "without_resync_pct": report.without_resync() * 100.0,
        "converged": report.converged,
        "final_members": report.final_members,
        "relays_converged": report.relays.converged,
    });
    println!("{row}");
    Ok(())
}

fn print_row(row: &Value) {
    let num = |key: &str| row.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let name = row.get("cell").and_then(Value::as_str).unwrap_or("");
    if let Some(error) = row.get("error").and_then(Value::as_str) {
        println!("{name:<7} {:>9} | ERROR: {error}", num("members"));
        return;
    }
    let pct = |q: &str| {
        row.get("time_to_key_ms")
            .and_then(|d| d.get(q))
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    println!(
        "{:<7} {:>9} {:>6} | {:>8.1} {:>8.1} {:>9.2} {:>8.1} | {:>13} {:>14} {:>10} {:>8.0} | {:>11} {:>7.3} {:>10}",
        name,
        num("members"),
        num("relays"),
        num("wall_s"),
        num("cpu_s"),
        num("peak_rss_kib") / (1024.0 * 1024.0),
        num("peak_rss_kib_per_member"),
        num("delivered"),
        num("filtered"),
        num("member_signature_checks"),
        num("cpu_ns_per_delivery"),
        format!("{:.0}/{:.0}", pct("p50"), pct("p99")),
        num("wire_per_source"),
        format!("{}/{}", num("converged"), num("final_members")),
    );
}
