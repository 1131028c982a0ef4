//! `resync-attacks`: a legitimate member's resync latency while hostile clients attack the
//! GCKS's resync endpoints on loopback, with the GCKS's default endpoint limits.
//!
//! For each attack (none, idle-connection flood, slowloris, pipelining flood, half-close
//! flood, malformed-request flood) a fresh GCKS is started (2 members admitted in message 1,
//! then 10 refreshes), so that its event-loop lag figures (kept over the GCKS's lifetime) are
//! those of that attack and its short setup. The attack runs on its own thread from attacker
//! addresses 127.1.0.0/16 (loopback: every 127.0.0.0/8 address is the local host), and, once it
//! has run for a second, the member fetches every message with [`fetch_items_from`] from its
//! own address 127.0.0.250, alternating HTTP (one request of the batched route) and TCP (one
//! resync frame), one attempt each with a 10 s deadline, for 10 s (quick: 3 s). Reported per
//! attack: the member's resync latency p50/p99/max (hdrhistogram, successful resyncs) and its
//! failures, this process's VmRSS (the GCKS runs in it; the attacker threads hold only their
//! sockets) before the attack, at its peak and 2 s after it stopped, the GCKS's loop lag
//! p50/p99/max, and the endpoints' counters.
//!
//! The attacks, each bounded by a stop flag and a round cap:
//! - idle: 2,000 connections per endpoint from 200 sources per endpoint (10 each) that never
//!   send a byte, reopened as the endpoint closes them;
//! - slowloris: 1,200 connections per endpoint from 200 sources per endpoint, each starting a
//!   request and
//!   dripping a byte of it every 200 ms, reopened when closed;
//! - pipelining: 1,000 connections from 50 sources writing pipelined `/healthz`, `/metrics`
//!   and TCP state requests without reading, reopened when closed;
//! - half-close: connections from 100 sources that send a resync request (HTTP or TCP), shut
//!   their side and never read (the last 1,000 kept open);
//! - malformed: connections from 100 sources, each sending one malformed HTTP request (bad
//!   request line, no or two `Host`, oversized head, a body) or TCP frame (bad length, unknown
//!   type, an answer frame, a truncated frame) and closing.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use rekeycast::gcks::{Gcks, GcksConfig, GcksEvent};
use rekeycast::io::resync_client::{fetch_items_from, Endpoint};
use rekeycast::lkh::MemberId;
use rekeycast::wire::frame::FrameRepr;
use serde_json::{json, Value};

use rekeycast_testkit::hostile::{attacker, frame, raise_nofile};

use crate::machine::{format_load, load_average};

/// A non-blocking connection to `to` from `from`.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = rekeycast_testkit::hostile::connect_from(from, to)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// The member's source address.
const MEMBER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 250);
/// Refreshes after message 1: a resync fetches 11 messages.
const REFRESHES: u64 = 10;
/// The deadline of one resync, connect included.
const RESYNC_DEADLINE: Duration = Duration::from_secs(10);

/// The attacks measured, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    None,
    Idle,
    Slowloris,
    Pipelining,
    HalfClose,
    Malformed,
}

impl Attack {
    const ALL: [Self; 6] = [
        Self::None,
        Self::Idle,
        Self::Slowloris,
        Self::Pipelining,
        Self::HalfClose,
        Self::Malformed,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Idle => "idle flood",
            Self::Slowloris => "slowloris",
            Self::Pipelining => "pipelining",
            Self::HalfClose => "half-close",
            Self::Malformed => "malformed",
        }
    }
}

/// Runs the benchmark and prints its table and JSON line.
pub fn run(quick: bool) -> anyhow::Result<()> {
    let load_before = load_average();
    let nofile = raise_nofile(20_000);
    println!(
        "resync-attacks: load average {} (2 cores shared with other work), open-file limit {nofile}",
        format_load(&load_before)
    );
    let measure = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let mut rows = Vec::new();
    println!(
        "{:<12} {:>8} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "attack",
        "resyncs",
        "p50 ms",
        "p99 ms",
        "max ms",
        "failed",
        "RSS0 MiB",
        "RSSpk MiB",
        "RSS1 MiB",
        "lag p50us",
        "lag p99us",
        "lag max"
    );
    for (n, attack) in Attack::ALL.into_iter().enumerate() {
        let row = measure_attack(attack, n as u8, measure)?;
        println!(
            "{:<12} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>9} {:>9}",
            attack.name(),
            row["resyncs"],
            row["latency_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
            row["latency_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
            row["latency_ms"]["max"].as_f64().unwrap_or(f64::NAN),
            row["failed"],
            row["rss_mib"]["before"].as_f64().unwrap_or(f64::NAN),
            row["rss_mib"]["peak"].as_f64().unwrap_or(f64::NAN),
            row["rss_mib"]["after"].as_f64().unwrap_or(f64::NAN),
            row["loop_lag_us"]["p50"],
            row["loop_lag_us"]["p99"],
            row["loop_lag_us"]["max"],
        );
        println!("             endpoints: {}", row["endpoints"]);
        rows.push(row);
    }
    let load_after = load_average();
    println!("load average at the end: {}", format_load(&load_after));
    println!(
        "{}",
        json!({
            "bench": "resync-attacks",
            "quick": quick,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "measure_s": measure.as_secs(),
            "attacks": rows,
        })
    );
    Ok(())
}

fn measure_attack(attack: Attack, salt: u8, measure: Duration) -> anyhow::Result<Value> {
    let server = Server::start(salt)?;
    let rss_before = rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (stop, http, tcp, group_id) =
            (Arc::clone(&stop), server.http, server.tcp, server.group_id);
        std::thread::spawn(move || run_attack(attack, &stop, http, tcp, group_id))
    };
    // Let the attack ramp up.
    std::thread::sleep(Duration::from_secs(1));
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut failed = 0u64;
    let mut failures = Vec::new();
    let mut rss_peak = rss_kib();
    let end = Instant::now() + measure;
    let mut http = true;
    while Instant::now() < end {
        let endpoint = if http {
            Endpoint::Http(server.http)
        } else {
            Endpoint::Tcp(server.tcp)
        };
        http = !http;
        let started = Instant::now();
        let fetched = fetch_items_from(
            Some(IpAddr::V4(MEMBER)),
            endpoint,
            server.group_id,
            1,
            0,
            RESYNC_DEADLINE,
        );
        let took = started.elapsed();
        match fetched {
            Ok(fetched) if fetched.items.len() as u64 == server.latest => {
                latency.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1))?;
            }
            Ok(fetched) => {
                failed += 1;
                failures.push(format!("{endpoint}: {} items", fetched.items.len()));
            }
            Err(error) => {
                failed += 1;
                failures.push(format!("{endpoint}: {error}"));
            }
        }
        rss_peak = rss_peak.max(rss_kib());
        // A member resyncs now and then, not in a tight loop.
        std::thread::sleep(Duration::from_millis(10));
    }
    let endpoints = server.gcks.stats()?.resync;
    stop.store(true, Ordering::Relaxed);
    let _ = thread.join();
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_kib();
    let lag = server.gcks.stats()?.loop_lag_us;
    server.gcks.shutdown()?;
    failures.truncate(5);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let ms = |us: u64| us as f64 / 1e3;
    Ok(json!({
        "attack": attack.name(),
        "resyncs": latency.len(),
        "failed": failed,
        "first_failures": failures,
        "latency_ms": if latency.is_empty() { json!(null) } else { json!({
            "p50": ms(latency.value_at_quantile(0.5)),
            "p99": ms(latency.value_at_quantile(0.99)),
            "max": ms(latency.max()),
        })},
        "rss_mib": {"before": mib(rss_before), "peak": mib(rss_peak), "after": mib(rss_after)},
        "loop_lag_us": {"p50": lag.p50, "p99": lag.p99, "max": lag.max, "samples": lag.count},
        "endpoints": format!("{endpoints:?}"),
    }))
}

/// This process's resident set size, KiB (0 where /proc cannot be read).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

struct Server {
    gcks: Gcks,
    group_id: u32,
    latest: u64,
    tcp: SocketAddr,
    http: SocketAddr,
}

impl Server {
    fn start(salt: u8) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let group = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(239, 78, salt, pid as u8),
            23_000 + (pid % 20_000) as u16 + u16::from(salt),
        ));
        let mut config = GcksConfig::loopback(group);
        config.batch_interval = Duration::from_secs(3600);
        config.admission_delay = Duration::ZERO;
        config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let group_id = config.group_id;
        let gcks = Gcks::start(config, SigningKey::from_bytes(&[12; 32]))?;
        let replies = [gcks.join(MemberId(1))?, gcks.join(MemberId(2))?];
        gcks.rekey_now()?;
        for reply in replies {
            reply.recv_timeout(Duration::from_secs(60))??;
        }
        wait_sent(&gcks, 1)?;
        for seq in 2..=REFRESHES + 1 {
            gcks.rekey_now()?;
            wait_sent(&gcks, seq)?;
        }
        let latest = gcks.stats()?.seq;
        let (tcp, http) = gcks.resync_addrs();
        Ok(Self {
            gcks,
            group_id,
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
            Ok(GcksEvent::Poisoned { reason }) => bail!("GCKS poisoned: {reason}"),
            _ => {}
        }
    }
    bail!("message {seq} was not sent within 60 s")
}

/// Whether the endpoint closed `stream` (a read says so; unread answers are dropped).
fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Runs `attack` until `stop` is set, or for at most 120 s.
fn run_attack(attack: Attack, stop: &AtomicBool, http: SocketAddr, tcp: SocketAddr, group: u32) {
    let end = Instant::now() + Duration::from_secs(120);
    let go = || !stop.load(Ordering::Relaxed) && Instant::now() < end;
    match attack {
        Attack::None => {}
        Attack::Idle | Attack::Slowloris => {
            let slowloris = attack == Attack::Slowloris;
            let per_endpoint = if slowloris { 1_200 } else { 2_000 };
            let open = |i: usize| {
                let is_http = i % 2 == 0;
                // 10 (idle) or 6 (slowloris) connections per source and endpoint, HTTP's from
                // sources 0..200 and TCP's from 200..400 (the per-source cap is shared).
                let source = (i / 2) % 200 + if is_http { 0 } else { 200 };
                let to = if is_http { http } else { tcp };
                let mut stream = connect_from(attacker(source), to).ok()?;
                if slowloris {
                    let head: &[u8] = if is_http {
                        b"GET /healthz HTTP/1.1\r\n"
                    } else {
                        &[0x00, 0x00, 0x01, 0x00]
                    };
                    stream.write_all(head).ok()?;
                }
                Some((stream, is_http))
            };
            let mut slots: Vec<Option<(TcpStream, bool)>> =
                (0..2 * per_endpoint).map(|_| None).collect();
            while go() {
                for (i, slot) in slots.iter_mut().enumerate() {
                    if !go() {
                        return;
                    }
                    let alive = match slot {
                        Some((stream, is_http)) if slowloris => stream
                            .write(if *is_http { b"X" } else { b"\0" })
                            .is_ok_and(|n| n == 1),
                        Some((stream, _)) => !closed(stream),
                        None => false,
                    };
                    if !alive {
                        *slot = open(i);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Attack::Pipelining => {
            let http_batch = [
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100),
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20),
            ]
            .concat();
            let tcp_batch = frame(&FrameRepr::StateRequest { group_id: group }).repeat(200);
            let mut slots: Vec<Option<(TcpStream, bool)>> = (0..1_000).map(|_| None).collect();
            while go() {
                for (i, slot) in slots.iter_mut().enumerate() {
                    let is_http = i % 2 == 0;
                    if slot.is_none() {
                        let to = if is_http { http } else { tcp };
                        *slot = connect_from(attacker(i / 20), to)
                            .ok()
                            .map(|s| (s, is_http));
                    }
                    let Some((stream, is_http)) = slot else {
                        continue;
                    };
                    let batch = if *is_http { &http_batch } else { &tcp_batch };
                    match stream.write(batch) {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => *slot = None,
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Attack::HalfClose => {
            let http_request =
                format!("GET /v1/groups/{group}/resync?from=1&leaf=0 HTTP/1.1\r\nHost: x\r\n\r\n")
                    .into_bytes();
            let tcp_request = frame(&FrameRepr::ResyncRequest {
                group_id: group,
                from_seq: 1,
                leaf: 0,
            });
            let mut held = std::collections::VecDeque::new();
            let mut round = 0usize;
            while go() {
                let (to, request) = if round % 2 == 0 {
                    (http, &http_request)
                } else {
                    (tcp, &tcp_request)
                };
                if let Ok(mut stream) = connect_from(attacker(round % 100), to) {
                    let _ = stream.write(request);
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    held.push_back(stream);
                    if held.len() > 1_000 {
                        held.pop_front();
                    }
                }
                round += 1;
            }
        }
        Attack::Malformed => {
            let http_bad: Vec<Vec<u8>> = vec![
                b"GARBAGE\x01\x02 / HTTP/9\r\n\r\n".to_vec(),
                b"GET /healthz HTTP/1.1\r\n\r\n".to_vec(),
                b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
                b"GET /v1/groups/x/resync?from=-1 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                format!(
                    "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
                    "a".repeat(9_000)
                )
                .into_bytes(),
                b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            ];
            let tcp_bad: Vec<Vec<u8>> = vec![
                vec![0xff; 64],
                vec![0x00, 0x00, 0x00, 0x01, 0x7f],
                frame(&FrameRepr::End { last_seq: 3 }),
                frame(&FrameRepr::StateRequest { group_id: group })[..3].to_vec(),
            ];
            let mut round = 0usize;
            while go() {
                let (to, bad) = if round % 2 == 0 {
                    (http, &http_bad[(round / 2) % http_bad.len()])
                } else {
                    (tcp, &tcp_bad[(round / 2) % tcp_bad.len()])
                };
                if let Ok(mut stream) = connect_from(attacker(round % 100), to) {
                    let _ = stream.write(bad);
                }
                round += 1;
            }
        }
    }
}
