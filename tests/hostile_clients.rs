//! Hostile clients against the GCKS's resync endpoints over real loopback sockets, many source
//! addresses (127.0.0.0/8 is all loopback): idle connections, slowloris, pipelining floods,
//! half-closes, malformed frames and requests. Each test runs the attack, and during it a
//! legitimate member's resync from its own address must succeed, in one attempt, within the
//! test's deadline. Every loop is bounded.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rekeycast::gcks::{Gcks, GcksConfig};
use rekeycast::io::resync_client::{fetch_items_from, Endpoint};
use rekeycast::resync::limits::Limits;
use rekeycast::wire::frame::FrameRepr;
use rekeycast_testkit::engine::wait_sent;
use rekeycast_testkit::hostile::{attacker, connect_from, frame, raise_nofile};

/// The legitimate member's source address (no attacker uses it).
const MEMBER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 250);
/// How long the legitimate resync may take, connect included, whatever the attack.
const RESYNC_DEADLINE: Duration = Duration::from_secs(10);

struct Server {
    gcks: Gcks,
    tcp: SocketAddr,
    http: SocketAddr,
    group_id: u32,
    latest: u64,
}

fn start(salt: u8, limits: Limits) -> Server {
    let group = rekeycast_testkit::addr::multicast_group(86, salt);
    let mut config = GcksConfig::loopback(group);
    config.batch_interval = Duration::from_secs(3600);
    config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_limits = limits;
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[40 + salt; 32])).unwrap();
    let bundles = rekeycast_testkit::engine::admit(&gcks, &[1, 2]);
    wait_sent(&gcks, 1);
    let mut latest = 1;
    for _ in 0..3 {
        gcks.rekey_now().unwrap();
        latest += 1;
        wait_sent(&gcks, latest);
    }
    let (tcp, http) = gcks.resync_addrs();
    Server {
        group_id: bundles[0].rekey_sa.group_id,
        gcks,
        tcp: tcp.unwrap(),
        http: http.unwrap(),
        latest,
    }
}

impl Server {
    /// The legitimate member's resync of every message, in one attempt from its own address:
    /// it must get them all within [`RESYNC_DEADLINE`].
    fn assert_member_resyncs(&self, endpoint: Endpoint, during: &str) {
        let started = Instant::now();
        let fetched = fetch_items_from(
            Some(IpAddr::V4(MEMBER)),
            endpoint,
            self.group_id,
            1,
            0,
            RESYNC_DEADLINE,
        );
        let took = started.elapsed();
        match fetched {
            Ok(fetched) => assert_eq!(
                fetched.items.len() as u64,
                self.latest,
                "{endpoint} during {during}: {fetched:?}"
            ),
            Err(error) => panic!(
                "{endpoint} during {during}: the member's resync failed after {took:?}: {error} \
                 ({:?})",
                self.gcks.stats().unwrap().resync
            ),
        }
        eprintln!(
            "{endpoint} during {during}: resync in {took:?}; endpoints {:?}",
            self.gcks.stats().unwrap().resync
        );
        assert!(took <= RESYNC_DEADLINE + Duration::from_secs(1), "{took:?}");
    }

    fn both(&self) -> [Endpoint; 2] {
        [Endpoint::Http(self.http), Endpoint::Tcp(self.tcp)]
    }
}

/// `per_source` connections to `to` from each of attacker addresses `sources` (the ones that
/// connect; the rest are counted out).
fn open_many(sources: std::ops::Range<usize>, per_source: usize, to: SocketAddr) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(sources.len() * per_source);
    for n in sources {
        for _ in 0..per_source {
            if let Ok(stream) = connect_from(attacker(n), to) {
                streams.push(stream);
            }
        }
    }
    streams
}

/// Runs `attack` on a thread until `stop` is set (it must check `stop` in every loop).
fn spawn_attack(
    attack: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    (stop, std::thread::spawn(move || attack(flag)))
}

/// 2,000 connections per endpoint from 200 source addresses per endpoint (10 each, under the
/// per-source cap of 16) that never send a byte, with the default limits: the member's resync over either
/// endpoint still succeeds at once, the flood is held to the silent budget, and the silent
/// connections are closed by the silent timeout, not the idle timeout.
#[test]
fn an_idle_connection_flood_from_200_sources_does_not_lock_members_out() {
    let limit = raise_nofile(16_000);
    let server = start(1, Limits::default());
    let per_source = if limit >= 10_000 { 10 } else { 4 };
    if per_source < 10 {
        eprintln!("NOTE: open-file limit {limit}: {per_source} connections per source, not 10");
    }
    // 200 sources per endpoint (the per-source cap counts both endpoints).
    let mut idle = open_many(0..200, per_source, server.http);
    idle.extend(open_many(200..400, per_source, server.tcp));
    assert!(
        idle.len() >= 200 * per_source * 2 * 9 / 10,
        "{}",
        idle.len()
    );
    for endpoint in server.both() {
        server.assert_member_resyncs(endpoint, "an idle-connection flood");
    }
    let during = server.gcks.stats().unwrap().resync;
    let silent_budget = 2 * Limits::default().max_silent_connections as u64;
    assert!(during.evicted > 0, "{during:?}");
    assert!(
        during.open <= silent_budget + 4,
        "the silent connections held are within the silent budgets: {during:?}"
    );
    // The silent connections left are closed by the silent timeout (2 s), long before the idle
    // timeout (30 s): every sampled one ends by the deadline.
    let deadline = Instant::now() + Limits::default().silent_timeout + Duration::from_secs(5);
    let mut ended = 0;
    for stream in idle.iter_mut().rev().take(32) {
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => ended += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => ended += 1,
            other => panic!("a silent connection was answered or kept: {other:?}"),
        }
    }
    assert_eq!(ended, 32);
    let after = server.gcks.stats().unwrap().resync;
    assert!(after.silent_timeouts > 0, "{after:?}");
    assert_eq!(after.idle_timeouts, 0, "{after:?}");
    drop(idle);
    server.gcks.shutdown().unwrap();
}

/// A connection that sends nothing is closed by the silent timeout counted from the accept;
/// one that started a request and stalls is closed by the header timeout counted from the
/// accept (HTTP: 408), not by the idle timeout.
#[test]
fn the_first_byte_and_the_first_request_have_deadlines_from_the_accept() {
    let limits = Limits {
        silent_timeout: Duration::from_millis(300),
        header_timeout: Duration::from_millis(900),
        idle_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = start(2, limits);
    let read_all = |stream: &mut TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        let started = Instant::now();
        let result = stream.read_to_end(&mut answer);
        (result.map(|_| answer), started.elapsed())
    };
    for to in [server.http, server.tcp] {
        let mut silent = connect_from(attacker(1), to).unwrap();
        let (answer, took) = read_all(&mut silent);
        assert_eq!(answer.unwrap(), b"", "closed without a word");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    let mut started = connect_from(attacker(2), server.http).unwrap();
    started.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let (answer, _) = read_all(&mut started);
    let answer = String::from_utf8(answer.unwrap()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let stats = server.gcks.stats().unwrap().resync;
    assert_eq!(stats.silent_timeouts, 2, "{stats:?}");
    assert_eq!(stats.header_timeouts, 1, "{stats:?}");
    assert_eq!(stats.idle_timeouts, 0, "{stats:?}");
    server.gcks.shutdown().unwrap();
}

/// Slowloris: 1,200 connections per endpoint from 200 sources (12 each), each starting a
/// request and dripping a byte of it every 200 ms (never completing it), reconnecting when the
/// endpoint closes it. The endpoints are kept full of them, so new clients evict the stalest;
/// the member's resync succeeds.
#[test]
fn slowloris_does_not_lock_members_out() {
    raise_nofile(16_000);
    let server = start(3, Limits::default());
    let (http, tcp) = (server.http, server.tcp);
    let (stop, attack) = spawn_attack(move |stop| {
        let start = |i: usize| {
            let is_http = i % 2 == 0;
            let to = if is_http { http } else { tcp };
            let mut stream = connect_from(attacker(i % 200), to).ok()?;
            let head: &[u8] = if is_http {
                b"GET /healthz HTTP/1.1\r\n"
            } else {
                // The length prefix of a 256-byte frame.
                &[0x00, 0x00, 0x01, 0x00]
            };
            stream.set_nonblocking(true).ok()?;
            stream.write_all(head).ok()?;
            Some((stream, is_http))
        };
        let mut slots: Vec<Option<(TcpStream, bool)>> = (0..2_400).map(|_| None).collect();
        // Rounds of 200 ms, for at most 60 s.
        for _ in 0..300 {
            for (i, slot) in slots.iter_mut().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let dripped = match slot {
                    Some((stream, is_http)) => stream
                        .write(if *is_http { b"X" } else { b"\0" })
                        .is_ok_and(|n| n == 1),
                    None => false,
                };
                if !dripped {
                    *slot = start(i);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    // Let the attack fill the endpoints first.
    let full = Instant::now() + Duration::from_secs(30);
    while server.gcks.stats().unwrap().resync.open < 2_000 && Instant::now() < full {
        std::thread::sleep(Duration::from_millis(20));
    }
    let filled = server.gcks.stats().unwrap().resync;
    for endpoint in server.both() {
        server.assert_member_resyncs(endpoint, "slowloris");
    }
    stop.store(true, Ordering::Relaxed);
    attack.join().unwrap();
    assert!(
        filled.open >= 2_000,
        "the attack filled the endpoints: {filled:?}"
    );
    server.gcks.shutdown().unwrap();
}

/// Pipelining floods: 50 sources, each with 10 connections that write pipelined requests
/// (HTTP `/healthz` and `/metrics`, TCP state requests) as fast as the endpoint takes them and
/// never read; they reconnect when closed. The member's resync succeeds.
#[test]
fn a_pipelining_flood_does_not_lock_members_out() {
    raise_nofile(16_000);
    let server = start(4, Limits::default());
    let (http, tcp, group_id) = (server.http, server.tcp, server.group_id);
    let (stop, attack) = spawn_attack(move |stop| {
        let http_batch = [
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20),
        ]
        .concat();
        let tcp_batch = frame(&FrameRepr::StateRequest { group_id }).repeat(200);
        let mut streams: Vec<Option<(TcpStream, bool)>> = (0..1_000).map(|_| None).collect();
        // At most 60 s of rounds.
        let end = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            for (i, slot) in streams.iter_mut().enumerate() {
                let is_http = i % 2 == 0;
                if slot.is_none() {
                    let to = if is_http { http } else { tcp };
                    *slot = connect_from(attacker(i / 20), to).ok().map(|s| {
                        let _ = s.set_nonblocking(true);
                        (s, is_http)
                    });
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
    });
    let busy = Instant::now() + Duration::from_secs(20);
    while server.gcks.stats().unwrap().resync.requests < 5_000 && Instant::now() < busy {
        std::thread::sleep(Duration::from_millis(20));
    }
    for endpoint in server.both() {
        server.assert_member_resyncs(endpoint, "a pipelining flood");
    }
    stop.store(true, Ordering::Relaxed);
    attack.join().unwrap();
    let stats = server.gcks.stats().unwrap().resync;
    assert!(stats.rate_limited > 0, "{stats:?}");
    server.gcks.shutdown().unwrap();
}

/// Half-close floods: clients from 100 sources send a resync request (HTTP and TCP) and shut
/// their side at once, never reading. The member's resync succeeds, and a half-closing client
/// that does read gets its whole answer.
#[test]
fn a_half_close_flood_does_not_lock_members_out() {
    raise_nofile(16_000);
    let server = start(5, Limits::default());
    let (http, tcp, group_id) = (server.http, server.tcp, server.group_id);
    let http_request = b"GET /v1/groups/GROUP/resync?from=1&leaf=0 HTTP/1.1\r\nHost: x\r\n\r\n";
    let http_request = String::from_utf8_lossy(http_request)
        .replace("GROUP", &group_id.to_string())
        .into_bytes();
    let tcp_request = frame(&FrameRepr::ResyncRequest {
        group_id,
        from_seq: 1,
        leaf: 0,
    });
    let (http_req, tcp_req) = (http_request.clone(), tcp_request.clone());
    let (stop, attack) = spawn_attack(move |stop| {
        let mut held = std::collections::VecDeque::new();
        for round in 0..20_000 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let (to, request) = if round % 2 == 0 {
                (http, &http_req)
            } else {
                (tcp, &tcp_req)
            };
            if let Ok(mut stream) = connect_from(attacker(round % 100), to) {
                let _ = stream.write_all(request);
                let _ = stream.shutdown(std::net::Shutdown::Write);
                held.push_back(stream);
                // Keep the last 1,000 open (unread), under the per-source caps.
                if held.len() > 1_000 {
                    held.pop_front();
                }
            }
        }
    });
    let busy = Instant::now() + Duration::from_secs(20);
    while server.gcks.stats().unwrap().resync.accepted < 2_000 && Instant::now() < busy {
        std::thread::sleep(Duration::from_millis(20));
    }
    for endpoint in server.both() {
        server.assert_member_resyncs(endpoint, "a half-close flood");
    }
    // A half-closing client that reads gets its whole answer.
    let mut stream = connect_from(MEMBER, http).unwrap();
    stream.write_all(&http_request).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    stream.set_read_timeout(Some(RESYNC_DEADLINE)).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with(b"0\r\n\r\n"), "the chunked body is whole");
    stop.store(true, Ordering::Relaxed);
    attack.join().unwrap();
    server.gcks.shutdown().unwrap();
}

fn http_exchange(from: Ipv4Addr, to: SocketAddr, request: &[u8]) -> String {
    let mut stream = connect_from(from, to).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// An HTTP/1.1 request without `Host`, or any with two, is answered 400 and closed (RFC 9112,
/// 3.2); one `Host` (or none in HTTP/1.0) is served.
#[test]
fn a_request_without_host_or_with_two_is_400() {
    let server = start(6, Limits::default());
    let exchange = |request: &[u8]| http_exchange(MEMBER, server.http, request);
    for request in [
        b"GET /healthz HTTP/1.1\r\n\r\n".as_slice(),
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nhost: b\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    ] {
        let answer = exchange(request);
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{}: {answer}",
            String::from_utf8_lossy(request)
        );
    }
    for request in [
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".as_slice(),
        b"GET /healthz HTTP/1.0\r\n\r\n",
    ] {
        let answer = exchange(request);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let stats = server.gcks.stats().unwrap().resync;
    assert_eq!(stats.rejected, 4, "{stats:?}");
    server.gcks.shutdown().unwrap();
}

/// Malformed input from 100 sources, repeated: HTTP garbage, bad request lines, missing and
/// doubled `Host`, oversized heads, bodies; TCP frames with bad lengths, unknown types,
/// truncated bodies and answers sent as requests. Each is rejected and closed; the member's
/// resync succeeds meanwhile.
#[test]
fn a_malformed_request_flood_does_not_lock_members_out() {
    raise_nofile(16_000);
    let server = start(7, Limits::default());
    let (http, tcp, group_id) = (server.http, server.tcp, server.group_id);
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
        b"\r\n\r\n\r\n".to_vec(),
    ];
    let tcp_bad: Vec<Vec<u8>> = vec![
        vec![0xff; 64],
        vec![0x00, 0x00, 0x00, 0x01, 0x7f],
        [vec![0x00, 0x10, 0x00, 0x00], vec![0; 100]].concat(),
        frame(&FrameRepr::End { last_seq: 3 }),
        frame(&FrameRepr::StateRequest { group_id })[..3].to_vec(),
    ];
    let (stop, attack) = spawn_attack(move |stop| {
        for round in 0..50_000 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let (to, bad) = if round % 2 == 0 {
                (http, &http_bad[(round / 2) % http_bad.len()])
            } else {
                (tcp, &tcp_bad[(round / 2) % tcp_bad.len()])
            };
            if let Ok(mut stream) = connect_from(attacker(round % 100), to) {
                let _ = stream.write_all(bad);
                // Dropped at once: the endpoint answers (or not) into a closed socket.
            }
        }
    });
    let busy = Instant::now() + Duration::from_secs(20);
    while server.gcks.stats().unwrap().resync.rejected < 1_000 && Instant::now() < busy {
        std::thread::sleep(Duration::from_millis(20));
    }
    for endpoint in server.both() {
        server.assert_member_resyncs(endpoint, "a malformed-request flood");
    }
    stop.store(true, Ordering::Relaxed);
    attack.join().unwrap();
    let stats = server.gcks.stats().unwrap().resync;
    assert!(stats.rejected > 0, "{stats:?}");
    server.gcks.shutdown().unwrap();
}

/// A member's resync counts as one request however many connections the endpoint saw, and
/// pipelined requests on one connection count one each.
#[test]
fn the_counters_count_requests_and_resyncs_not_connections() {
    let server = start(8, Limits::default());
    let before = server.gcks.stats().unwrap().resync;
    let mut stream = connect_from(MEMBER, server.http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let resync = format!(
        "GET /v1/groups/{}/resync?from=1&leaf=0 HTTP/1.1\r\nHost: x\r\n\r\n",
        server.group_id
    );
    let request = [
        resync.as_bytes().repeat(3),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
    ]
    .concat();
    stream.write_all(&request).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let after = server.gcks.stats().unwrap().resync;
    assert_eq!(after.accepted - before.accepted, 1, "{after:?}");
    assert_eq!(after.requests - before.requests, 4, "{after:?}");
    assert_eq!(after.streams_completed - before.streams_completed, 3);
    assert_eq!(
        after.messages_served - before.messages_served,
        3 * server.latest
    );
    server.gcks.shutdown().unwrap();
}
