//! `resync`: the GCKS's resync endpoints on loopback.
//!
//! One GCKS (64 members admitted in message 1, then 100 refreshes: 101 messages, history 128)
//! serves both parts. Its endpoint limits are raised for the bench: per-source rate and burst
//! 10^9, 1,024 connections per source (defaults 200/s, 400, 16), so that one load generator on
//! one address measures the server rather than its rate limiter. The endpoints run on the GCKS
//! event loop's one thread.
//!
//! 1. HTTP requests/s and latency: `wrk -t1 -c32 -d10s --latency` (quick: 3 s) against
//!    `GET /v1/groups/{group}/rekeys/{latest}/chunks/0`, next to nginx (one worker, access log
//!    off) serving a static file holding the same bytes as that chunk's body, in the same run,
//!    alternating, best of 3 by requests/s. Both close a keep-alive connection after 10,000
//!    requests (ours by default; nginx's `keepalive_requests` is set to match). Without wrk or
//!    nginx, a load generator of this file (32 threads, one keep-alive connection each, GET in a
//!    loop, latency into hdrhistogram) runs instead, and the table says which generator ran.
//! 2. Resync of 100 missed messages: a member admitted at message 1 fetches messages 1..=101
//!    with [`fetch_items`] over TCP (one resync request frame) and over HTTP (one request of the
//!    batched route `/v1/groups/{group}/resync`) (alternating; best, p50 and max), the bytes of
//!    the manifests and chunks it got, and the bytes on the wire both ways (counted once by a
//!    relay in front of the endpoint, outside the timed runs). The items are then verified and
//!    applied by a [`ReceiverSession`] of that member, timed apart from the fetch, which must
//!    end at the GCKS's group key.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use rekeycast::gcks::{Gcks, GcksConfig, GcksEvent};
use rekeycast::io::resync_client::{fetch_items, fetch_state, Endpoint, Fetched};
use rekeycast::lkh::{MemberId, RegistrationBundle};
use rekeycast::session::{ReceiverConfig, ReceiverSession};
use serde_json::{json, Value};

use crate::engine::{thread_cpu_ns, thread_named};
use crate::machine::{format_load, load_average, ms};

/// Members admitted in message 1.
const MEMBERS: u64 = 64;
/// Refreshes after message 1: the member admitted at message 1 misses 101 messages.
const REFRESHES: u64 = 100;
/// The sender's history window.
const HISTORY: usize = 128;
/// wrk's connections.
const CONNECTIONS: usize = 32;
/// The per-connection request cap of both servers.
const KEEPALIVE_REQUESTS: u32 = 10_000;

/// Runs the benchmark and prints its tables and JSON line.
pub fn run(quick: bool) -> anyhow::Result<()> {
    let load_before = load_average();
    println!(
        "resync: load average {} (2 cores shared with other work)",
        format_load(&load_before)
    );
    let setup = Setup::start()?;
    let http = http_load(quick, &setup)?;
    let missed = missed_messages(quick, &setup)?;
    let load_after = load_average();
    println!("load average at the end: {}", format_load(&load_after));
    let Setup { gcks, .. } = setup;
    gcks.shutdown()?;
    println!(
        "{}",
        json!({
            "bench": "resync",
            "quick": quick,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "limits": {"requests_per_second_per_source": 1e9, "burst_per_source": 1_000_000_000u32,
                       "max_connections_per_source": 1024,
                       "max_requests_per_connection": KEEPALIVE_REQUESTS},
            "http_load": http,
            "missed_messages": missed,
        })
    );
    Ok(())
}

/// A multicast group on 239.79.0.0/16 and a port, both from the process id.
fn group() -> SocketAddr {
    let pid = std::process::id();
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(239, 79, (pid >> 8) as u8, pid as u8),
        23_000 + (pid % 20_000) as u16,
    ))
}

/// The GCKS with its history, and the bundle of a member admitted at message 1.
struct Setup {
    gcks: Gcks,
    group_id: u32,
    bundle: RegistrationBundle,
    latest: u64,
    tcp: SocketAddr,
    http: SocketAddr,
}

impl Setup {
    fn start() -> anyhow::Result<Self> {
        let mut config = GcksConfig::loopback(group());
        config.batch_interval = Duration::from_secs(3600);
        config.admission_delay = Duration::ZERO;
        config.sender.history = HISTORY;
        config.sender.repair_window = HISTORY.min(config.sender.repair_window);
        config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        config.resync_limits.requests_per_second_per_source = 1e9;
        config.resync_limits.burst_per_source = 1_000_000_000;
        config.resync_limits.max_connections_per_source = 1024;
        let group_id = config.group_id;
        let gcks = Gcks::start(config, SigningKey::from_bytes(&[11; 32]))?;
        eprintln!("resync: admitting {MEMBERS} members, then {REFRESHES} refreshes");
        let mut ticket = gcks.join_many((1..=MEMBERS).map(MemberId).collect())?;
        gcks.rekey_now()?;
        let mut bundles = ticket
            .wait(Duration::from_secs(60))?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let bundle = bundles.swap_remove(0);
        ensure!(bundle.first_seq == 1, "admitted at {}", bundle.first_seq);
        wait_sent(&gcks, 1)?;
        for seq in 2..=REFRESHES + 1 {
            gcks.rekey_now()?;
            wait_sent(&gcks, seq)?;
        }
        let latest = gcks.stats()?.seq;
        ensure!(latest == REFRESHES + 1, "latest message {latest}");
        let (tcp, http) = gcks.resync_addrs();
        Ok(Self {
            gcks,
            group_id,
            bundle,
            latest,
            tcp: tcp.context("no TCP resync endpoint")?,
            http: http.context("no HTTP resync endpoint")?,
        })
    }
}

fn wait_sent(gcks: &Gcks, seq: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match gcks.events().recv_timeout(Duration::from_millis(100)) {
            Ok(GcksEvent::Sent { seq: sent }) if sent >= seq => return Ok(()),
            Ok(GcksEvent::BatchFailed { reason, detail, .. }) => {
                bail!("batch failed before message {seq}: {reason} ({detail})")
            }
            Ok(GcksEvent::Poisoned { reason }) => {
                bail!("GCKS poisoned before message {seq}: {reason}")
            }
            _ => {}
        }
    }
    bail!("message {seq} was not sent within 60 s")
}

// ---------------------------------------------------------------------------------------------
// Small HTTP/1.1 client pieces
// ---------------------------------------------------------------------------------------------

/// The head of an HTTP response at the start of `buf`, once whole: its length, the status and
/// the Content-Length (0 if absent).
fn parse_head(buf: &[u8]) -> anyhow::Result<Option<(usize, u16, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .context("bad status line")?;
    let mut length = 0;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().context("bad Content-Length")?;
            }
        }
    }
    Ok(Some((end + 4, status, length)))
}

/// Reads one response off a keep-alive connection into `buf` (kept between calls); returns
/// the status and the body length.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<(u16, usize)> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some((head, status, length)) = parse_head(buf)? {
            while buf.len() < head + length {
                let n = stream.read(&mut chunk)?;
                ensure!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..head + length);
            return Ok((status, length));
        }
        ensure!(buf.len() < 1 << 20, "response head too large");
        let n = stream.read(&mut chunk)?;
        ensure!(n > 0, "connection closed mid-head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One GET on a new connection: the status and the body.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let (head, status, _) = parse_head(&raw)?.context("incomplete response")?;
    Ok((status, raw[head..].to_vec()))
}

// ---------------------------------------------------------------------------------------------
// 1. HTTP requests/s and latency
// ---------------------------------------------------------------------------------------------

/// nginx as a child process, killed and its directory removed on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    fn start(body: &[u8]) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("rekeycast-bench-nginx-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("chunk"), body)?;
        // A free port, released just before nginx binds it.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\nerror_log stderr;\npid {dir}/nginx.pid;\n\
                 events {{ }}\nhttp {{\n  access_log off;\n  \
                 keepalive_requests {KEEPALIVE_REQUESTS};\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    root {dir};\n    \
                 location / {{ }}\n  }}\n}}\n",
                dir = dir.display()
            ),
        )?;
        let child = Command::new("nginx")
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let mut nginx = Self { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = nginx.child.try_wait()? {
                bail!("nginx exited at start: {status}");
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, nginx.port)).is_ok() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "nginx did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (status, got) = get(nginx.addr(), "/chunk")?;
        ensure!(
            status == 200 && got == body,
            "nginx answered {status} with {} bytes",
            got.len()
        );
        Ok(nginx)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The CPU time nginx's workers (the master's children) have run, nanoseconds.
    fn workers_cpu_ns(&self) -> Option<u64> {
        let master = self.child.id();
        let mut total = None;
        for entry in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": the comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok());
            if ppid == Some(master) {
                let ns = std::fs::read_to_string(entry.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
                if let Some(ns) = ns {
                    *total.get_or_insert(0) += ns;
                }
            }
        }
        total
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master stops its worker and reaps it (a killed master
        // leaves its worker running, orphaned); SIGKILL only if it has not gone in 5 s.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One load run against one server.
#[derive(Debug, Clone, Copy, Default)]
struct LoadRun {
    requests: u64,
    per_s: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Responses other than 2xx/3xx and socket errors.
    errors: u64,
    /// The serving thread's CPU time over the run, seconds (the GCKS loop thread, nginx's
    /// worker; 0 if unknown).
    server_cpu_s: f64,
}

impl LoadRun {
    /// Requests per second of the serving thread's CPU time (0 if unknown).
    fn per_cpu_s(&self) -> f64 {
        if self.server_cpu_s > 0.0 {
            self.requests as f64 / self.server_cpu_s
        } else {
            0.0
        }
    }
}

fn have(program: &str) -> bool {
    Command::new("which")
        .arg(program)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A wrk duration (`1.23ms`, `850.00us`, `1.02s`, `2.00m`) in microseconds.
fn wrk_duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(value * scale)
}

fn parse_wrk(output: &str) -> anyhow::Result<LoadRun> {
    let mut run = LoadRun::default();
    let mut in_distribution = false;
    for line in output.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Latency", "Distribution", ..] => in_distribution = true,
            [pct, value] if in_distribution && pct.ends_with('%') => {
                let us = wrk_duration_us(value).context("wrk latency")?;
                match *pct {
                    "50%" => run.p50_us = us,
                    "90%" => run.p90_us = us,
                    "99%" => run.p99_us = us,
                    _ => {}
                }
            }
            ["Latency", _avg, _stdev, max, ..] => {
                run.max_us = wrk_duration_us(max).unwrap_or(0.0);
            }
            [count, "requests", "in", ..] => run.requests = count.parse()?,
            ["Requests/sec:", value] => run.per_s = value.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", count] => run.errors += count.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                run.errors += rest
                    .iter()
                    .filter_map(|f| f.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    ensure!(
        run.per_s > 0.0,
        "no Requests/sec in wrk's output:\n{output}"
    );
    Ok(run)
}

fn wrk_run(url: &str, secs: u64) -> anyhow::Result<LoadRun> {
    let output = Command::new("wrk")
        .args(["-t1", &format!("-c{CONNECTIONS}"), &format!("-d{secs}s")])
        .arg("--latency")
        .arg(url)
        .output()
        .context("running wrk")?;
    ensure!(
        output.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wrk(&String::from_utf8_lossy(&output.stdout))
}

/// The fallback generator: `CONNECTIONS` threads, one keep-alive connection each (reopened
/// when the server closes it), GET in a loop for `secs`.
fn own_run(addr: SocketAddr, path: &str, secs: u64) -> anyhow::Result<LoadRun> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let start = Instant::now();
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (stop, errors, request) = (stop.clone(), errors.clone(), request.clone());
            std::thread::spawn(move || -> anyhow::Result<Histogram<u64>> {
                let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let mut stream: Option<TcpStream> = None;
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let conn = match stream.as_mut() {
                        Some(conn) => conn,
                        None => {
                            let conn = TcpStream::connect(addr)?;
                            conn.set_nodelay(true)?;
                            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                            buf.clear();
                            stream.insert(conn)
                        }
                    };
                    let sent = Instant::now();
                    let answer = conn
                        .write_all(request.as_bytes())
                        .map_err(anyhow::Error::from)
                        .and_then(|()| read_response(conn, &mut buf));
                    match answer {
                        Ok((status, _)) => {
                            histogram.saturating_record(sent.elapsed().as_micros() as u64);
                            if !(200..400).contains(&status) {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Closed after its request cap, or an error: reconnect.
                        Err(_) => stream = None,
                    }
                }
                Ok(histogram)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for thread in threads {
        let histogram = thread
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        total.add(&histogram)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(LoadRun {
        requests: total.len(),
        per_s: total.len() as f64 / secs,
        p50_us: total.value_at_quantile(0.5) as f64,
        p90_us: total.value_at_quantile(0.9) as f64,
        p99_us: total.value_at_quantile(0.99) as f64,
        max_us: total.max() as f64,
        errors: errors.load(Ordering::Relaxed),
        server_cpu_s: 0.0,
    })
}

fn best(runs: &[LoadRun]) -> LoadRun {
    runs.iter()
        .copied()
        .max_by(|a, b| a.per_s.total_cmp(&b.per_s))
        .unwrap_or_default()
}

fn load_json(run: &LoadRun, runs: &[LoadRun]) -> Value {
    json!({
        "requests_per_s": run.per_s, "requests": run.requests,
        "p50_us": run.p50_us, "p90_us": run.p90_us, "p99_us": run.p99_us, "max_us": run.max_us,
        "errors": run.errors,
        "server_cpu_s": run.server_cpu_s, "requests_per_server_cpu_s": run.per_cpu_s(),
        "runs_requests_per_s": runs.iter().map(|r| r.per_s).collect::<Vec<_>>(),
    })
}

fn http_load(quick: bool, setup: &Setup) -> anyhow::Result<Value> {
    let secs = if quick { 3 } else { 10 };
    let rounds = 3;
    let path = format!(
        "/v1/groups/{}/rekeys/{}/chunks/0",
        setup.group_id, setup.latest
    );
    let (status, body) = get(setup.http, &path)?;
    ensure!(status == 200, "GET {path} answered {status}");
    let wrk = have("wrk");
    let nginx = have("nginx");
    // wrk only when nginx runs beside it, so that both are measured by the same generator.
    let use_wrk = wrk && nginx;
    let generator = if use_wrk {
        "wrk 1 thread"
    } else {
        "own (32 threads, keep-alive)"
    };
    println!();
    println!(
        "1. HTTP resync GET {path} ({} B body) on loopback, {CONNECTIONS} connections for {secs} s, \
         best of {rounds} alternating; load generator: {generator}",
        body.len()
    );
    if !(wrk && nginx) {
        println!(
            "   wrk {}, nginx {}: this bench's own load generator instead, against ours and nginx \
             if installed",
            if wrk { "found" } else { "MISSING" },
            if nginx { "found" } else { "MISSING" },
        );
    }
    println!(
        "   ours: the GCKS event loop's one thread (rate limit raised to 1e9/s, burst 1e9, 1,024 \
         connections per source); nginx: 1 worker, access log off, static file of the same bytes; \
         both close a connection after {KEEPALIVE_REQUESTS} requests"
    );
    let server = if nginx {
        Some(Nginx::start(&body)?)
    } else {
        None
    };
    let loop_thread = thread_named("rekeycast-gcks");
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..rounds {
        eprintln!("resync: load round {} of {rounds}: ours", round + 1);
        let cpu_start = loop_thread
            .as_deref()
            .and_then(|tid| thread_cpu_ns(Some(tid)));
        let mut run = if use_wrk {
            wrk_run(&format!("http://{}{path}", setup.http), secs)?
        } else {
            own_run(setup.http, &path, secs)?
        };
        let cpu_end = loop_thread
            .as_deref()
            .and_then(|tid| thread_cpu_ns(Some(tid)));
        if let (Some(start), Some(end)) = (cpu_start, cpu_end) {
            run.server_cpu_s = end.saturating_sub(start) as f64 / 1e9;
        }
        eprintln!("resync: ours {:.0} requests/s", run.per_s);
        ours.push(run);
        if let Some(server) = &server {
            eprintln!("resync: load round {} of {rounds}: nginx", round + 1);
            let cpu_start = server.workers_cpu_ns();
            let mut run = if use_wrk {
                wrk_run(&format!("http://{}/chunk", server.addr()), secs)?
            } else {
                own_run(server.addr(), "/chunk", secs)?
            };
            if let (Some(start), Some(end)) = (cpu_start, server.workers_cpu_ns()) {
                run.server_cpu_s = end.saturating_sub(start) as f64 / 1e9;
            }
            eprintln!("resync: nginx {:.0} requests/s", run.per_s);
            theirs.push(run);
        }
    }
    drop(server);
    let ours_best = best(&ours);
    let theirs_best = best(&theirs);
    println!(
        "{:<26} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} | {:>6} {:>9} | runs requests/s",
        "server",
        "requests/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "max us",
        "errors",
        "CPU-s",
        "req/CPU-s",
    );
    let row = |name: &str, run: &LoadRun, runs: &[LoadRun]| {
        println!(
            "{:<26} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>7} | {:>6.2} {:>9.0} | {}",
            name,
            run.per_s,
            run.p50_us,
            run.p90_us,
            run.p99_us,
            run.max_us,
            run.errors,
            run.server_cpu_s,
            run.per_cpu_s(),
            runs.iter()
                .map(|r| format!("{:.0}", r.per_s))
                .collect::<Vec<_>>()
                .join(" ")
        );
    };
    row("rekeycast (GCKS loop)", &ours_best, &ours);
    if theirs.is_empty() {
        println!("nginx: not installed, no comparison");
    } else {
        row("nginx (1 worker)", &theirs_best, &theirs);
    }
    let ratio = if theirs_best.per_s > 0.0 {
        ours_best.per_s / theirs_best.per_s
    } else {
        0.0
    };
    let cpu_ratio = if theirs_best.per_cpu_s() > 0.0 {
        ours_best.per_cpu_s() / theirs_best.per_cpu_s()
    } else {
        0.0
    };
    if !theirs.is_empty() {
        println!(
            "ratio ours / nginx: {ratio:.2} requests/s (goal >= 0.5), {cpu_ratio:.2} requests per \
             CPU-second of the serving thread (CPU-s: the thread's run time over the {secs} s)"
        );
    }
    Ok(json!({
        "generator": generator,
        "wrk": wrk,
        "nginx": nginx,
        "path": path,
        "body_bytes": body.len(),
        "connections": CONNECTIONS,
        "secs": secs,
        "ours": load_json(&ours_best, &ours),
        "nginx_run": (!theirs.is_empty()).then(|| load_json(&theirs_best, &theirs)),
        "ratio_to_nginx": (!theirs.is_empty()).then_some(ratio),
        "ratio_to_nginx_per_cpu_s": (!theirs.is_empty()).then_some(cpu_ratio),
    }))
}

// ---------------------------------------------------------------------------------------------
// 2. Resync of 100 missed messages
// ---------------------------------------------------------------------------------------------

/// The relay's thread, which yields the bytes (to the server, to the client).
type RelayCounts = std::thread::JoinHandle<anyhow::Result<(u64, u64)>>;

/// A relay in front of `upstream` that counts the bytes each way, for `connections`
/// connections; returns its address and a thread that yields (to server, to client).
fn counting_relay(
    upstream: SocketAddr,
    connections: usize,
) -> anyhow::Result<(SocketAddr, RelayCounts)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let handle = std::thread::spawn(move || {
        let (mut up, mut down) = (0, 0);
        for _ in 0..connections {
            let (client, _) = listener.accept()?;
            let server = TcpStream::connect(upstream)?;
            client.set_nodelay(true)?;
            server.set_nodelay(true)?;
            let (client2, server2) = (client.try_clone()?, server.try_clone()?);
            let to_server = std::thread::spawn(move || copy_count(client2, server2));
            down += copy_count(server, client)?;
            up += to_server
                .join()
                .map_err(|_| anyhow::anyhow!("relay thread panicked"))??;
        }
        Ok((up, down))
    });
    Ok((addr, handle))
}

/// Copies until end of stream (or reset), then shuts the writer down; returns the bytes.
fn copy_count(mut from: TcpStream, mut to: TcpStream) -> anyhow::Result<u64> {
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
    Ok(total)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn times_json(sorted: &[Duration]) -> Value {
    json!({
        "best_ms": ms(percentile(sorted, 0.0)),
        "p50_ms": ms(percentile(sorted, 0.5)),
        "max_ms": ms(percentile(sorted, 1.0)),
        "runs": sorted.len(),
    })
}

fn missed_messages(quick: bool, setup: &Setup) -> anyhow::Result<Value> {
    let rounds = if quick { 5 } else { 21 };
    let timeout = Duration::from_secs(10);
    let group_id = setup.group_id;
    let fresh_session = || {
        ReceiverSession::new(&setup.bundle, ReceiverConfig::new(setup.gcks.local_addr()))
            .map_err(|e| anyhow::anyhow!("receiver session: {e}"))
    };
    let leaf = fresh_session()?.order_key();
    let missed = setup.latest - setup.bundle.first_seq + 1;
    println!();
    println!(
        "2. resync of {missed} missed messages (group of {MEMBERS}, history {HISTORY}): a member \
         admitted at message 1 fetches 1..={} with fetch_items; {rounds} runs each, alternating",
        setup.latest
    );
    // The state answer, as a member would ask first (not part of the timed fetch).
    let state =
        fetch_state(Endpoint::Http(setup.http), group_id, timeout)?.context("no state answer")?;
    let endpoints = [
        ("TCP frames", Endpoint::Tcp(setup.tcp)),
        ("HTTP/1.1 batched", Endpoint::Http(setup.http)),
    ];
    let mut times = [Vec::new(), Vec::new()];
    let mut fetched: [Option<Fetched>; 2] = [None, None];
    for round in 0..rounds {
        if round % 5 == 0 {
            eprintln!("resync: fetch round {} of {rounds}", round + 1);
        }
        for (i, (_, endpoint)) in endpoints.iter().enumerate() {
            let start = Instant::now();
            let got = fetch_items(*endpoint, group_id, 1, leaf, timeout)?;
            times[i].push(start.elapsed());
            ensure!(!got.beyond_history, "{endpoint}: beyond history");
            ensure!(
                got.items.len() as u64 == missed,
                "{endpoint}: {} items, wanted {missed}",
                got.items.len()
            );
            fetched[i] = Some(got);
        }
    }
    // Wire bytes, through the counting relay (outside the timed runs).
    let mut wire = Vec::new();
    for (_, endpoint) in &endpoints {
        let (relay, counts) = match endpoint {
            Endpoint::Tcp(addr) => {
                let (relay, counts) = counting_relay(*addr, 1)?;
                (Endpoint::Tcp(relay), counts)
            }
            Endpoint::Http(addr) => {
                let (relay, counts) = counting_relay(*addr, 1)?;
                (Endpoint::Http(relay), counts)
            }
        };
        let got = fetch_items(relay, group_id, 1, leaf, timeout)?;
        ensure!(got.items.len() as u64 == missed, "relayed fetch incomplete");
        let (up, down) = counts
            .join()
            .map_err(|_| anyhow::anyhow!("relay panicked"))??;
        wire.push((up, down));
    }
    // Verify and apply, timed apart from the fetch.
    let items = fetched[1].take().context("no HTTP fetch")?;
    ensure!(
        fetched[0]
            .as_ref()
            .is_some_and(|tcp| tcp.items == items.items),
        "TCP and HTTP returned different items"
    );
    let expected_version = setup.gcks.stats()?.group_key_version;
    let mut verify_times = Vec::new();
    for _ in 0..rounds {
        let mut session = fresh_session()?;
        let start = Instant::now();
        for (manifest, chunk) in &items.items {
            session
                .handle_resync(Instant::now(), manifest, chunk)
                .map_err(|e| anyhow::anyhow!("resync item rejected: {e}"))?;
        }
        verify_times.push(start.elapsed());
        ensure!(
            session.next_seq() == setup.latest + 1,
            "session at {}",
            session.next_seq()
        );
        let version = session.group_key().map(|k| k.version);
        ensure!(
            version == Some(expected_version),
            "group key version {version:?}, GCKS at {expected_version}"
        );
    }
    for list in times.iter_mut().chain(std::iter::once(&mut verify_times)) {
        list.sort();
    }
    let manifest_bytes: usize = items.items.iter().map(|(m, _)| m.len()).sum();
    let chunk_bytes: usize = items.items.iter().map(|(_, c)| c.len()).sum();
    println!(
        "items: {missed} (manifest + chunk each): {manifest_bytes} B of manifests + {chunk_bytes} \
         B of chunks = {} B ({:.0} B per message); state answer {} B",
        manifest_bytes + chunk_bytes,
        (manifest_bytes + chunk_bytes) as f64 / missed as f64,
        state.len()
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} | {:>11} {:>11} {:>9} | {:>11}",
        "fetch",
        "best ms",
        "p50 ms",
        "max ms",
        "wire to srv",
        "wire to mbr",
        "overhead",
        "msgs/s p50"
    );
    let payload = (manifest_bytes + chunk_bytes) as f64;
    let mut fetch_json = Vec::new();
    for (i, (name, _)) in endpoints.iter().enumerate() {
        let (up, down) = wire[i];
        let p50 = percentile(&times[i], 0.5);
        println!(
            "{:<22} {:>8.2} {:>8.2} {:>8.2} | {:>9} B {:>9} B {:>8.1}% | {:>11.0}",
            name,
            ms(percentile(&times[i], 0.0)),
            ms(p50),
            ms(percentile(&times[i], 1.0)),
            up,
            down,
            (down as f64 / payload - 1.0) * 100.0,
            missed as f64 / p50.as_secs_f64()
        );
        fetch_json.push(json!({
            "endpoint": name,
            "time": times_json(&times[i]),
            "wire_bytes_to_server": up,
            "wire_bytes_to_member": down,
        }));
    }
    println!(
        "{:<22} {:>8.2} {:>8.2} {:>8.2} | ReceiverSession::handle_resync of the {missed} items, \
         ends at group key version {expected_version}",
        "verify + apply",
        ms(percentile(&verify_times, 0.0)),
        ms(percentile(&verify_times, 0.5)),
        ms(percentile(&verify_times, 1.0)),
    );
    Ok(json!({
        "members": MEMBERS,
        "history": HISTORY,
        "messages": missed,
        "items": items.items.len(),
        "manifest_bytes": manifest_bytes,
        "chunk_bytes": chunk_bytes,
        "state_bytes": state.len(),
        "fetch": fetch_json,
        "verify_apply": times_json(&verify_times),
    }))
}
