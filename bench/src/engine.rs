//! `engine`: the mio engine on real loopback sockets.
//!
//! 1. Send rate on one core: a [`Gcks`] whose token bucket does not limit (send rate 1e9
//!    datagrams/s, burst 100,000) sends the message that admits N members in one batch
//!    (N = 2^18; quick: 2^16), timed from its `Queued` event to its `Sent` event, with the
//!    datagram count from the sender's counters. Next to it, in the same run, as many 1,247-byte
//!    datagrams (the default symbol datagram) sent to the same group from a socket set up the
//!    same way ([`MulticastSocket::sender`]): one `send_to` per datagram (the bare loop), and
//!    [`MulticastSocket::send_batch`] (UDP GSO where the kernel has it) as a second reference.
//!    One receiver socket is joined to the group throughout and drained only between runs, so
//!    that the kernel delivers (and, once its buffer is full, drops) every datagram as it would
//!    for a member; without one, loopback drops a GSO send whole, unsegmented. The runs
//!    alternate (engine, bare, GSO; three times, five in full) and the best of each counts,
//!    which tames the noise of a shared machine; the load average is printed. Beside the wall
//!    clock, the sending thread's own CPU time over the same window (the scheduler's runtime
//!    from `/proc/self/task/<tid>/schedstat`, up to a scheduler tick stale at each end) gives
//!    datagrams per CPU-second, which a thread that waits for a core does not distort.
//! 2. Time to key on loopback: [`demo::run`] with 200 and 1,000 members (a thread and a socket
//!    each), 10 rekeys (quick: 3) with 5% churn, at 0% and 5% simulated iid loss: p50, p90,
//!    p99 and max over every member and rekey, and whether every member ended current.
//! 3. Event-loop lag while a big batch is built: a GCKS with 256 members sending a heartbeat
//!    every millisecond takes 2^20 joins (quick: 2^16) and builds them in one batch on its
//!    worker pool (FEC blocks of up to 1,024 symbols: the message is about 200,000 chunks, more
//!    than the 255 blocks of the default 256 allow). The loop's lag histogram (cumulative since
//!    start) is read after 1 s of heartbeats alone, after the joins were taken in, and after the
//!    `Rekeyed` event; the batch's build time comes from that event. Twice: with the default
//!    pool (a worker and a signing thread per core) and with one of each, which leaves the loop
//!    a core of its own on two.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use rekeycast::demo::{self, DemoConfig};
use rekeycast::gcks::{Gcks, GcksConfig, GcksEvent, GcksStats, LagSummary};
use rekeycast::io::socket::{MulticastConfig, MulticastSocket};
use rekeycast::lkh::MemberId;
use rekeycast::sim::Loss;
use serde_json::{json, Value};

use crate::machine::{format_load, load_average, ms};

/// The largest FEC block of the big batch's message in part 3, in symbols.
const BIG_BATCH_BLOCK_SYMBOLS: u32 = 1024;

/// The default symbol datagram: 1,200 bytes of symbol and 47 of header, fields and MAC.
const DATAGRAM_SIZE: usize = 1247;

/// Options of the `engine` area.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Run only these parts (default: all), for profiling one of them.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
}

/// The parts of the `engine` area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// 1. Send rate next to a bare socket.
    SendRate,
    /// 2. Time to key on loopback.
    TimeToKey,
    /// 3. Event-loop lag while a big batch is built.
    LoopLag,
}

/// Runs the benchmark and prints its tables and JSON line.
pub fn run(quick: bool, args: &Args) -> anyhow::Result<()> {
    let wanted = |part| args.only.is_empty() || args.only.contains(&part);
    let load_before = load_average();
    println!(
        "engine: load average {} (2 cores shared with other work)",
        format_load(&load_before)
    );
    let send = wanted(Part::SendRate)
        .then(|| send_rate(quick))
        .transpose()?;
    let time_to_key = wanted(Part::TimeToKey)
        .then(|| time_to_key(quick))
        .transpose()?;
    let lag = wanted(Part::LoopLag).then(|| loop_lag(quick)).transpose()?;
    let load_after = load_average();
    println!("load average at the end: {}", format_load(&load_after));
    println!(
        "{}",
        json!({
            "bench": "engine",
            "quick": quick,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "send_rate": send,
            "time_to_key": time_to_key,
            "loop_lag": lag,
        })
    );
    Ok(())
}

/// A multicast group on 239.78.0.0/16 and a port, both derived from the process id, with
/// `offset` added to the port so that the runs of one process do not meet.
fn group(offset: u16) -> SocketAddr {
    let pid = std::process::id();
    let port = 21_000 + (pid % 20_000) as u16 + offset;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(239, 78, (pid >> 8) as u8, pid as u8),
        port,
    ))
}

fn lag_json(lag: &LagSummary) -> Value {
    json!({"p50_us": lag.p50, "p90_us": lag.p90, "p99_us": lag.p99, "max_us": lag.max,
           "samples": lag.count})
}

/// Waits for the first event `pick` accepts; a failed batch or the timeout is an error.
fn wait_for<T>(
    gcks: &Gcks,
    what: &str,
    timeout: Duration,
    mut pick: impl FnMut(&GcksEvent) -> Option<T>,
) -> anyhow::Result<(T, Instant)> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match gcks.events().recv_timeout(left) {
            Ok(GcksEvent::BatchFailed { reason, detail, .. }) => {
                bail!("batch failed while waiting for {what}: {reason} ({detail})")
            }
            Ok(GcksEvent::Poisoned { reason }) => {
                bail!("GCKS poisoned while waiting for {what}: {reason}")
            }
            Ok(event) => {
                if let Some(value) = pick(&event) {
                    return Ok((value, Instant::now()));
                }
            }
            Err(_) => bail!("timed out after {timeout:?} waiting for {what}"),
        }
    }
}

/// Joins members `first..first + count`, keeping the channels their bundles arrive on (a
/// product would hand them out).
macro_rules! join_all {
    ($gcks:expr, $first:expr, $count:expr) => {{
        let mut bundles = Vec::with_capacity($count as usize);
        for id in $first..$first + $count {
            bundles.push($gcks.join(MemberId(id))?);
        }
        bundles
    }};
}

// ---------------------------------------------------------------------------------------------
// 1. Send rate
// ---------------------------------------------------------------------------------------------

/// One timed run of a sender.
#[derive(Debug, Clone, Copy)]
struct SendRun {
    datagrams: u64,
    secs: f64,
    /// The sending thread's CPU time over the window, seconds (0 if unknown).
    cpu_secs: f64,
    /// Sends that found the socket's buffer full.
    blocked: u64,
}

impl SendRun {
    fn rate(&self) -> f64 {
        self.datagrams as f64 / self.secs
    }

    fn cpu_rate(&self) -> f64 {
        if self.cpu_secs > 0.0 {
            self.datagrams as f64 / self.cpu_secs
        } else {
            0.0
        }
    }
}

/// The CPU time a thread of this process has run, nanoseconds (the first field of its
/// schedstat). `None` for the calling thread.
pub(crate) fn thread_cpu_ns(tid: Option<&str>) -> Option<u64> {
    let path = match tid {
        Some(tid) => format!("/proc/self/task/{tid}/schedstat"),
        None => "/proc/thread-self/schedstat".into(),
    };
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The thread id of the thread of this process named exactly `name`.
pub(crate) fn thread_named(name: &str) -> Option<String> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .filter_map(Result::ok)
        .find(|entry| {
            std::fs::read_to_string(entry.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end_matches('\n') == name)
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
}

fn cpu_secs(start: Option<u64>, end: Option<u64>) -> f64 {
    match (start, end) {
        (Some(start), Some(end)) => end.saturating_sub(start) as f64 / 1e9,
        _ => 0.0,
    }
}

/// The engine's run: the message that admits `members` in one batch.
#[derive(Debug, Clone, Copy)]
struct EngineRun {
    send: SendRun,
    /// Of the datagrams: manifests and proactive repair symbols.
    manifests: u64,
    proactive: u64,
    bytes: u64,
    chunks: usize,
    build: Duration,
}

fn engine_run(members: u64, group: SocketAddr) -> anyhow::Result<EngineRun> {
    let mut config = GcksConfig::loopback(group);
    config.sender.send_rate = 1e9;
    config.sender.burst = 100_000;
    config.batch_interval = Duration::from_secs(3600);
    config.max_batch = usize::MAX;
    config.admission_delay = Duration::ZERO;
    config.key_seed = Some(0x5EED);
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[7; 32]))?;
    let bundles = join_all!(gcks, 1, members);
    let before = gcks.stats()?;
    gcks.rekey_now()?;
    let ((seq, chunks, build), _) =
        wait_for(&gcks, "Rekeyed", Duration::from_secs(300), |e| match e {
            GcksEvent::Rekeyed {
                seq,
                chunks,
                build_time,
                ..
            } => Some((*seq, *chunks, *build_time)),
            _ => None,
        })?;
    // The loop's thread ("rekeycast-gcks"; its workers' names are longer), named by now.
    let loop_thread = thread_named("rekeycast-gcks");
    let (_, queued) = wait_for(&gcks, "Queued", Duration::from_secs(60), |e| {
        matches!(e, GcksEvent::Queued { seq: s } if *s == seq).then_some(())
    })?;
    let cpu_start = thread_cpu_ns(loop_thread.as_deref());
    let (_, sent) = wait_for(&gcks, "Sent", Duration::from_secs(300), |e| {
        matches!(e, GcksEvent::Sent { seq: s } if *s == seq).then_some(())
    })?;
    let cpu_end = thread_cpu_ns(loop_thread.as_deref());
    let after = gcks.stats()?;
    drop(bundles);
    gcks.shutdown()?;
    let message = |s: &GcksStats| {
        s.sender.manifests_sent + s.sender.source_symbols_sent + s.sender.proactive_symbols_sent
    };
    let datagrams = message(&after) - message(&before);
    // Heartbeats follow the message at once; their bytes are left out as near enough (one or
    // two small datagrams against thousands).
    let bytes = after.sender.bytes_sent - before.sender.bytes_sent;
    Ok(EngineRun {
        manifests: after.sender.manifests_sent - before.sender.manifests_sent,
        proactive: after.sender.proactive_symbols_sent - before.sender.proactive_symbols_sent,
        send: SendRun {
            datagrams,
            secs: (sent - queued).as_secs_f64(),
            cpu_secs: if loop_thread.is_some() {
                cpu_secs(cpu_start, cpu_end)
            } else {
                0.0
            },
            blocked: after.send_blocked - before.send_blocked,
        },
        bytes,
        chunks,
        build,
    })
}

/// Receives and discards whatever the receiver holds.
fn drain(receiver: &MulticastSocket) -> u64 {
    let mut buf = vec![0u8; 65_536];
    let mut count = 0;
    while receiver.recv_from(&mut buf).is_ok() {
        count += 1;
    }
    count
}

fn bare_socket(group: SocketAddr) -> anyhow::Result<MulticastSocket> {
    let (socket, _report) = MulticastSocket::sender(
        &MulticastConfig::loopback_v4(group),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    )?;
    Ok(socket)
}

/// One `send_to` per datagram, retrying when the buffer is full.
fn bare_plain(group: SocketAddr, count: u64, datagram: &[u8]) -> anyhow::Result<SendRun> {
    let socket = bare_socket(group)?;
    let mut blocked = 0;
    let mut sent = 0;
    let cpu_start = thread_cpu_ns(None);
    let start = Instant::now();
    while sent < count {
        match socket.send_to(datagram, group) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                blocked += 1;
                std::thread::yield_now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("bare send_to"),
        }
    }
    Ok(SendRun {
        datagrams: count,
        secs: start.elapsed().as_secs_f64(),
        cpu_secs: cpu_secs(cpu_start, thread_cpu_ns(None)),
        blocked,
    })
}

/// [`MulticastSocket::send_batch`] over the same datagrams, 64 at a time.
fn bare_gso(group: SocketAddr, count: u64, datagram: &[u8]) -> anyhow::Result<(SendRun, bool)> {
    let socket = bare_socket(group)?;
    let gso = socket.gso_enabled();
    let segments: Vec<&[u8]> = vec![datagram; 64];
    let mut blocked = 0;
    let mut sent = 0u64;
    let cpu_start = thread_cpu_ns(None);
    let start = Instant::now();
    while sent < count {
        let take = (count - sent).min(64) as usize;
        match socket.send_batch(group, &segments[..take]) {
            Ok(n) => sent += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                blocked += 1;
                std::thread::yield_now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("bare send_batch"),
        }
    }
    Ok((
        SendRun {
            datagrams: count,
            secs: start.elapsed().as_secs_f64(),
            cpu_secs: cpu_secs(cpu_start, thread_cpu_ns(None)),
            blocked,
        },
        socket.gso_enabled() && gso,
    ))
}

/// The floor of the engine's send path: [`MulticastSocket::send_batch`] (UDP GSO where the
/// kernel has it) over `count` distinct datagrams of the engine's size laid out back to back in
/// one buffer (as the engine's datagrams are distinct bytes in memory), `BATCH` at a time as
/// the engine's driver batches them, retrying when the buffer is full. Nothing else: no
/// sealing, no copying, no event loop.
fn bare_gso_distinct(group: SocketAddr, datagrams: &[u8]) -> anyhow::Result<SendRun> {
    const BATCH: usize = 64;
    let socket = bare_socket(group)?;
    let all: Vec<&[u8]> = datagrams.chunks_exact(DATAGRAM_SIZE).collect();
    let count = all.len();
    let mut blocked = 0;
    let mut sent = 0usize;
    let cpu_start = thread_cpu_ns(None);
    let start = Instant::now();
    while sent < count {
        let take = (count - sent).min(BATCH);
        match socket.send_batch(group, &all[sent..sent + take]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                blocked += 1;
                std::thread::yield_now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("bare send_batch over distinct datagrams"),
        }
    }
    Ok(SendRun {
        datagrams: count as u64,
        secs: start.elapsed().as_secs_f64(),
        cpu_secs: cpu_secs(cpu_start, thread_cpu_ns(None)),
        blocked,
    })
}

/// The run with the highest `metric`.
fn best(runs: &[SendRun], metric: fn(&SendRun) -> f64) -> SendRun {
    runs.iter()
        .copied()
        .max_by(|a, b| metric(a).total_cmp(&metric(b)))
        .unwrap_or(SendRun {
            datagrams: 0,
            secs: 1.0,
            cpu_secs: 0.0,
            blocked: 0,
        })
}

fn send_rate(quick: bool) -> anyhow::Result<Value> {
    let members: u64 = if quick { 1 << 16 } else { 1 << 18 };
    let rounds = if quick { 3 } else { 5 };
    let group = group(0);
    let (receiver, _) = MulticastSocket::receiver(&MulticastConfig::loopback_v4(group))?;
    println!();
    println!(
        "1. send rate on one core: the message admitting {members} members, send rate and burst \
         unlimited, next to a bare loop of as many {DATAGRAM_SIZE}-byte datagrams; best of \
         {rounds}, alternating"
    );
    let datagram: Vec<u8> = (0..DATAGRAM_SIZE)
        .map(|i| (i as u8).wrapping_mul(31))
        .collect();
    let mut plain = Vec::new();
    let mut gso_runs = Vec::new();
    let mut floor_runs = Vec::new();
    let mut engine = Vec::new();
    let mut gso_on = false;
    for round in 0..rounds {
        eprintln!("engine: send rate round {} of {rounds}: engine", round + 1);
        drain(&receiver);
        let run = engine_run(members, group)?;
        let count = run.send.datagrams;
        anyhow::ensure!(count > 0, "the engine sent no datagrams");
        eprintln!(
            "engine: round {}: engine {count} datagrams in {:.1} ms; bare loops",
            round + 1,
            run.send.secs * 1e3
        );
        engine.push(run);
        anyhow::ensure!(
            drain(&receiver) > 0,
            "the receiver got none of the engine's datagrams"
        );
        plain.push(bare_plain(group, count, &datagram)?);
        drain(&receiver);
        let (gso_run, on) = bare_gso(group, count, &datagram)?;
        gso_on = on;
        gso_runs.push(gso_run);
        drain(&receiver);
        let distinct: Vec<u8> = (0..count as usize * DATAGRAM_SIZE)
            .map(|i| (i as u8).wrapping_mul(31) ^ (i / DATAGRAM_SIZE) as u8)
            .collect();
        floor_runs.push(bare_gso_distinct(group, &distinct)?);
    }
    let engine_sends: Vec<SendRun> = engine.iter().map(|r| r.send).collect();
    let first = engine.first().context("no engine run")?;
    let sends = [
        ("engine (Gcks, Queued->Sent)", engine_sends),
        ("bare send_to loop", plain),
        (
            if gso_on {
                "bare send_batch (GSO)"
            } else {
                "bare send_batch (no GSO)"
            },
            gso_runs,
        ),
        ("floor: send_batch, distinct", floor_runs),
    ];
    let mean_size = first.bytes as f64 / first.send.datagrams as f64;
    println!(
        "message: {} chunks, {} datagrams ({} manifests, {} proactive repair; mean {:.0} B), \
         built in {:.0} ms (first run)",
        first.chunks,
        first.send.datagrams,
        first.manifests,
        first.proactive,
        mean_size,
        ms(first.build)
    );
    println!(
        "{:<28} {:>9} | {:>8} {:>11} {:>6} | {:>8} {:>12} | {:>7} | runs: datagrams/s (per CPU-s)",
        "sender", "datagrams", "wall ms", "datagrams/s", "MB/s", "CPU ms", "per CPU-s", "blocked",
    );
    let mut best_wall = Vec::new();
    let mut best_cpu = Vec::new();
    for (name, runs) in &sends {
        let wall = best(runs, SendRun::rate);
        let cpu = best(runs, SendRun::cpu_rate);
        println!(
            "{:<28} {:>9} | {:>8.1} {:>11.0} {:>6.0} | {:>8.1} {:>12.0} | {:>7} | {}",
            name,
            wall.datagrams,
            wall.secs * 1e3,
            wall.rate(),
            wall.rate() * DATAGRAM_SIZE as f64 / 1e6,
            cpu.cpu_secs * 1e3,
            cpu.cpu_rate(),
            wall.blocked,
            runs.iter()
                .map(|r| format!("{:.0}k ({:.0}k)", r.rate() / 1e3, r.cpu_rate() / 1e3))
                .collect::<Vec<_>>()
                .join(" ")
        );
        best_wall.push(wall);
        best_cpu.push(cpu);
    }
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let ratio_plain = div(best_wall[0].rate(), best_wall[1].rate());
    let ratio_gso = div(best_wall[0].rate(), best_wall[2].rate());
    let cpu_ratio_plain = div(best_cpu[0].cpu_rate(), best_cpu[1].cpu_rate());
    let cpu_ratio_gso = div(best_cpu[0].cpu_rate(), best_cpu[2].cpu_rate());
    let ratio_floor = div(best_wall[0].rate(), best_wall[3].rate());
    let cpu_ratio_floor = div(best_cpu[0].cpu_rate(), best_cpu[3].cpu_rate());
    println!(
        "ratio engine / bare send_to: {ratio_plain:.2} wall, {cpu_ratio_plain:.2} per CPU-s \
         (goal >= 0.8); engine / send_batch: {ratio_gso:.2} wall, {cpu_ratio_gso:.2} per CPU-s"
    );
    println!(
        "ratio engine / floor (send_batch over as many distinct datagrams): {ratio_floor:.2} \
         wall, {cpu_ratio_floor:.2} per CPU-s (goal >= 0.6)"
    );
    let runs_json = |runs: &[SendRun]| {
        runs.iter()
            .map(|r| json!({"per_s": r.rate(), "per_cpu_s": r.cpu_rate(), "blocked": r.blocked}))
            .collect::<Vec<_>>()
    };
    Ok(json!({
        "members": members,
        "chunks": first.chunks,
        "build_ms": ms(first.build),
        "datagrams": first.send.datagrams,
        "manifests": first.manifests,
        "proactive_symbols": first.proactive,
        "engine_mean_datagram_bytes": mean_size,
        "bare_datagram_bytes": DATAGRAM_SIZE,
        "engine_datagrams_per_s": best_wall[0].rate(),
        "bare_send_to_datagrams_per_s": best_wall[1].rate(),
        "bare_send_batch_datagrams_per_s": best_wall[2].rate(),
        "engine_datagrams_per_cpu_s": best_cpu[0].cpu_rate(),
        "bare_send_to_datagrams_per_cpu_s": best_cpu[1].cpu_rate(),
        "bare_send_batch_datagrams_per_cpu_s": best_cpu[2].cpu_rate(),
        "send_batch_gso": gso_on,
        "ratio_to_send_to": ratio_plain,
        "ratio_to_send_batch": ratio_gso,
        "cpu_ratio_to_send_to": cpu_ratio_plain,
        "cpu_ratio_to_send_batch": cpu_ratio_gso,
        "floor_send_batch_distinct_datagrams_per_s": best_wall[3].rate(),
        "floor_send_batch_distinct_datagrams_per_cpu_s": best_cpu[3].cpu_rate(),
        "ratio_to_floor": ratio_floor,
        "cpu_ratio_to_floor": cpu_ratio_floor,
        "floor_runs": runs_json(&sends[3].1),
        "engine_runs": runs_json(&sends[0].1),
        "send_to_runs": runs_json(&sends[1].1),
        "send_batch_runs": runs_json(&sends[2].1),
    }))
}

// ---------------------------------------------------------------------------------------------
// 2. Time to key
// ---------------------------------------------------------------------------------------------

/// The soft limit on open files, from /proc/self/limits.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn time_to_key(quick: bool) -> anyhow::Result<Vec<Value>> {
    let rekeys = if quick { 3 } else { 10 };
    println!();
    println!(
        "2. time to key on loopback (demo: a thread and a socket per member, {rekeys} rekeys \
         after the admitting one, 5% churn, loss simulated at receive), ms"
    );
    let limit = open_files_limit();
    println!(
        "open files soft limit: {}",
        limit.map_or("unknown".into(), |l| l.to_string())
    );
    println!(
        "{:>7} {:>5} | {:>8} {:>8} {:>8} {:>8} {:>7} | {:>7} {:>7} {:>7} {:>7} {:>8}",
        "members",
        "loss",
        "p50",
        "p90",
        "p99",
        "max",
        "samples",
        "missing",
        "resyncs",
        "NACKs",
        "current",
        "wall s"
    );
    let mut rows = Vec::new();
    let mut offset = 20;
    for members in [200usize, 1000] {
        // Each member holds a socket, an epoll instance and a waker; leave room for the rest.
        let needed = 3 * members as u64 + 256;
        if let Some(limit) = limit {
            if limit < needed {
                bail!(
                    "{members} members need about {needed} open files but the soft limit is \
                     {limit}: raise it (ulimit -n {needed})"
                );
            }
        }
        for loss in [0.0, 0.05] {
            offset += 1;
            let mut config = DemoConfig::new();
            config.members = members;
            config.rekeys = rekeys;
            config.loss = if loss > 0.0 {
                Loss::Bernoulli { p: loss }
            } else {
                Loss::None
            };
            config.group = group(offset);
            let report = demo::run(&config, |p| {
                eprintln!(
                    "engine: time to key, {members} members, {:.0}% loss: rekey {} of {}",
                    loss * 100.0,
                    p.done,
                    p.total
                );
            })
            .with_context(|| format!("demo with {members} members at {loss} loss"))?;
            let h = &report.time_to_key;
            let q = |quantile: f64| h.value_at_quantile(quantile) as f64 / 1e3;
            let missing: usize = report.rekeys.iter().map(|r| r.missing).sum();
            let nacks: u64 = report.gcks.sender.nacks_received;
            println!(
                "{:>7} {:>4.0}% | {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7} | {:>7} {:>7} {:>7} {:>7} \
                 {:>8.1}",
                members,
                loss * 100.0,
                q(0.5),
                q(0.9),
                q(0.99),
                h.max() as f64 / 1e3,
                h.len(),
                missing,
                report.resyncs,
                nacks,
                if report.all_current { "yes" } else { "NO" },
                report.elapsed.as_secs_f64()
            );
            rows.push(json!({
                "members": members,
                "loss": loss,
                "rekeys": rekeys,
                "p50_ms": q(0.5),
                "p90_ms": q(0.9),
                "p99_ms": q(0.99),
                "max_ms": h.max() as f64 / 1e3,
                "samples": h.len(),
                "missing": missing,
                "resyncs": report.resyncs,
                "nacks": nacks,
                "repair_symbols": report.gcks.sender.repair_symbols_sent,
                "all_current": report.all_current,
                "wall_s": report.elapsed.as_secs_f64(),
            }));
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// 3. Event-loop lag
// ---------------------------------------------------------------------------------------------

/// One configuration of the worker pool for part 3.
struct PoolSetup {
    label: &'static str,
    /// `GcksConfig::workers` (0: one per core).
    workers: usize,
    /// `MessageParams::signing_threads` (0: one per core).
    signing_threads: usize,
}

fn loop_lag(quick: bool) -> anyhow::Result<Value> {
    let log_n = if quick { 16 } else { 20 };
    let big: u64 = 1 << log_n;
    let small: u64 = 256;
    println!();
    println!(
        "3. event-loop lag while a batch of 2^{log_n} = {big} joins is built on the worker pool \
         ({small} members already, a heartbeat every ms); lag histogram cumulative since start, us"
    );
    let setups = [
        PoolSetup {
            label: "default pool (a worker and a signer per core)",
            workers: 0,
            signing_threads: 0,
        },
        PoolSetup {
            label: "1 worker, 1 signing thread",
            workers: 1,
            signing_threads: 1,
        },
    ];
    let mut rows = Vec::new();
    for (index, setup) in setups.iter().enumerate() {
        rows.push(lag_run(big, small, setup, index as u16)?);
    }
    Ok(json!({
        "batch_joins": big,
        "lag_p99_us": rows.first().and_then(|r| r["lag_after_batch"]["p99_us"].as_u64()),
        "pools": rows,
    }))
}

fn lag_run(big: u64, small: u64, setup: &PoolSetup, index: u16) -> anyhow::Result<Value> {
    println!();
    println!("{}:", setup.label);
    let mut config = GcksConfig::loopback(group(40 + index));
    config.sender.heartbeat_min = Duration::from_millis(1);
    config.sender.heartbeat_max = Duration::from_millis(1);
    config.sender.send_rate = 1e6;
    config.sender.burst = 1_000;
    config.batch_interval = Duration::from_secs(3600);
    config.max_batch = usize::MAX;
    config.admission_delay = Duration::ZERO;
    config.key_seed = Some(0x1A6);
    config.workers = setup.workers;
    config.message.signing_threads = setup.signing_threads;
    // The message admitting 2^20 members fresh is about 200,000 chunks: more than 255 blocks
    // of the default size.
    config.message.max_block_symbols = BIG_BATCH_BLOCK_SYMBOLS;
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[8; 32]))?;
    let first = join_all!(gcks, 1, small);
    gcks.rekey_now()?;
    let ((seq, _), _) = wait_for(&gcks, "Rekeyed", Duration::from_secs(60), |e| match e {
        GcksEvent::Rekeyed {
            seq, build_time, ..
        } => Some((*seq, *build_time)),
        _ => None,
    })?;
    wait_for(&gcks, "Sent", Duration::from_secs(60), |e| {
        matches!(e, GcksEvent::Sent { seq: s } if *s == seq).then_some(())
    })?;
    drop(first);
    eprintln!(
        "engine: loop lag, {}: {small} members in, heartbeats for 1 s",
        setup.label
    );
    std::thread::sleep(Duration::from_secs(1));
    let idle = gcks.stats()?;
    eprintln!("engine: loop lag: taking {big} joins");
    let intake_start = Instant::now();
    let bundles = join_all!(gcks, small + 1, big);
    // Commands are taken in order: this answer comes after every join is in the loop's list.
    let intake = gcks.stats()?;
    let intake_time = intake_start.elapsed();
    anyhow::ensure!(
        intake.pending as u64 == big,
        "{} joins pending, {big} expected",
        intake.pending
    );
    eprintln!(
        "engine: loop lag: joins taken in {:.0} ms; building the batch",
        ms(intake_time)
    );
    let batch_start = Instant::now();
    gcks.rekey_now()?;
    let ((big_seq, chunks, build), rekeyed_at) =
        wait_for(&gcks, "Rekeyed", Duration::from_secs(1200), |e| match e {
            GcksEvent::Rekeyed {
                seq,
                chunks,
                build_time,
                ..
            } => Some((*seq, *chunks, *build_time)),
            _ => None,
        })?;
    let batch = gcks.stats()?;
    let batch_wall = rekeyed_at - batch_start;
    let members = batch.members;
    let churn = first_datagram_after_churn(&gcks, group(40 + index), big_seq, small + 1, big)?;
    drop(bundles);
    gcks.shutdown()?;
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "after", "p50", "p90", "p99", "max", "samples", "elapsed"
    );
    let row = |name: &str, lag: &LagSummary, elapsed: Option<Duration>| {
        println!(
            "{:<34} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
            name,
            lag.p50,
            lag.p90,
            lag.p99,
            lag.max,
            lag.count,
            elapsed.map_or(String::from("1 s"), |e| format!("{:.0} ms", ms(e)))
        );
    };
    row("1 s of heartbeats (before)", &idle.loop_lag_us, None);
    row(
        &format!("taking {big} joins"),
        &intake.loop_lag_us,
        Some(intake_time),
    );
    row(
        "building the batch (to Rekeyed)",
        &batch.loop_lag_us,
        Some(batch_wall),
    );
    println!(
        "batch: {big} joins, {members} members after, {chunks} chunks, build time {:.0} ms on \
         the workers ({:.0} ms from rekey_now to the Rekeyed event)",
        ms(build),
        ms(batch_wall)
    );
    println!(
        "1% churn batch after it ({} leaves, {} joins, {} chunks): close to first datagram on \
         the wire {:.1} ms (Queued event at {:.1} ms; build time {:.1} ms on the workers)",
        churn.leaves,
        churn.joins,
        churn.chunks,
        ms(churn.to_first_datagram),
        ms(churn.to_queued),
        ms(churn.build)
    );
    Ok(json!({
        "churn_batch": {
            "leaves": churn.leaves, "joins": churn.joins, "chunks": churn.chunks,
            "close_to_first_datagram_ms": ms(churn.to_first_datagram),
            "close_to_queued_ms": ms(churn.to_queued), "build_ms": ms(churn.build),
        },
        "pool": setup.label,
        "workers": setup.workers,
        "signing_threads": setup.signing_threads,
        "members_after": members,
        "chunks": chunks,
        "build_ms": ms(build),
        "rekey_to_rekeyed_ms": ms(batch_wall),
        "intake_ms": ms(intake_time),
        "lag_before": lag_json(&idle.loop_lag_us),
        "lag_after_intake": lag_json(&intake.loop_lag_us),
        "lag_after_batch": lag_json(&batch.loop_lag_us),
    }))
}

/// A 1% churn batch's timing, from its close.
struct ChurnTiming {
    leaves: u64,
    joins: u64,
    chunks: usize,
    /// From `rekey_now` to the first symbol datagram of the batch's message at a receiver.
    to_first_datagram: Duration,
    /// From `rekey_now` to the message's `Queued` event.
    to_queued: Duration,
    build: Duration,
}

/// After the message `last_seq` (which admitted members `first..first + count`) is sent: half
/// a percent of those members leave and as many join (1% churn), the batch is closed
/// (`rekey_now`), and a receiver joined to `group` stamps the first symbol datagram of the new
/// message.
fn first_datagram_after_churn(
    gcks: &Gcks,
    group: SocketAddr,
    last_seq: u64,
    first: u64,
    count: u64,
) -> anyhow::Result<ChurnTiming> {
    use rekeycast::wire::{DatagramType, Packet};

    wait_for(gcks, "Sent", Duration::from_secs(600), |e| {
        matches!(e, GcksEvent::Sent { seq } if *seq == last_seq).then_some(())
    })?;
    let churn = (count / 200).max(1);
    for i in 0..churn {
        gcks.leave(MemberId(first + i * (count / churn)))?;
    }
    let bundles = join_all!(gcks, first + count, churn);
    let (receiver, _) = MulticastSocket::receiver(&MulticastConfig::loopback_v4(group))?;
    let target = last_seq + 1;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match receiver.recv_from(&mut buf) {
                    Ok((len, _)) => {
                        let is_target = Packet::new_checked(&buf[..len]).is_ok_and(|packet| {
                            packet.seq() == target && packet.datagram_type() == DatagramType::Symbol
                        });
                        if is_target {
                            return Some(Instant::now());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(20)),
                }
            }
            None
        })
    };
    let close = Instant::now();
    gcks.rekey_now()?;
    let ((chunks, build), _) = wait_for(gcks, "Rekeyed", Duration::from_secs(600), |e| match e {
        GcksEvent::Rekeyed {
            seq,
            chunks,
            build_time,
            ..
        } if *seq == target => Some((*chunks, *build_time)),
        _ => None,
    })?;
    let (_, queued) = wait_for(gcks, "Queued", Duration::from_secs(60), |e| {
        matches!(e, GcksEvent::Queued { seq } if *seq == target).then_some(())
    })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !watcher.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let arrived = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?
        .context("no datagram of the churn batch arrived")?;
    drop(bundles);
    Ok(ChurnTiming {
        leaves: churn,
        joins: churn,
        chunks,
        to_first_datagram: arrived - close,
        to_queued: queued - close,
        build,
    })
}
