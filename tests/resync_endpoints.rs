//! Resync over real sockets: members that missed rekeys recover from the GCKS's TCP and HTTP
//! endpoints and verify what they fetch like multicast traffic; past the history window they
//! are told to re-register; tampered resync data is rejected; hostile clients (thousands of
//! idle connections, oversized and malformed requests, clients over their rate limit) get
//! their status codes and do not keep a legitimate member from resyncing.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rekeycast::gcks::{Gcks, GcksConfig};
use rekeycast::io::resync_client::Endpoint;
use rekeycast::lkh::RegistrationBundle;
use rekeycast::member::{Member, MemberConfig};
use rekeycast::session::ReceiverEvent;
use rekeycast::wire::frame::FrameRepr;
use rekeycast_testkit::engine::wait_sent;
use rekeycast_testkit::wait;

/// A multicast group and port for test `salt` of this process.
fn group(salt: u8) -> SocketAddr {
    rekeycast_testkit::addr::multicast_group(80, salt)
}

fn start_gcks(group: SocketAddr, history: usize) -> Gcks {
    let mut config = GcksConfig::loopback(group);
    config.batch_interval = Duration::from_secs(3600);
    config.sender.history = history;
    config.sender.repair_window = history.min(config.sender.repair_window);
    config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    Gcks::start(config, SigningKey::from_bytes(&[9; 32])).unwrap()
}

/// Admits `count` members in one batch and returns their bundles (message 1 carries them).
fn admit(gcks: &Gcks, first: u64, count: u64) -> Vec<RegistrationBundle> {
    let ids: Vec<u64> = (first..first + count).collect();
    rekeycast_testkit::engine::admit(gcks, &ids)
}

/// Rekeys `count` times (refreshes with no membership change) and waits for each to be sent.
fn rekeys(gcks: &Gcks, count: u64) -> u64 {
    let mut seq = gcks.stats().unwrap().seq;
    for _ in 0..count {
        gcks.rekey_now().unwrap();
        seq += 1;
        wait_sent(gcks, seq);
    }
    seq
}

fn late_member(
    gcks: &Gcks,
    group: SocketAddr,
    bundle: &RegistrationBundle,
    endpoint: Endpoint,
) -> Member {
    let mut config = MemberConfig::loopback(group, gcks.local_addr());
    config.resync_endpoints = vec![endpoint];
    config.resync_max_delay = Duration::from_millis(50);
    config.receiver.state_check_interval = Duration::from_millis(100);
    Member::start(bundle, config).unwrap()
}

/// Waits for the member to reach `seq` (or an event the test cares about); returns its events.
fn wait_member(member: &Member, seq: u64, stop_on_reregister: bool) -> Vec<ReceiverEvent> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = Vec::new();
    while Instant::now() < deadline {
        while let Ok(event) = member.events().try_recv() {
            events.push(event);
        }
        if stop_on_reregister && events.contains(&ReceiverEvent::MustReregister) {
            return events;
        }
        if member.stats().unwrap().next_seq > seq {
            return events;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "member stuck at {} (wanted {seq}), events {events:?}",
        member.stats().unwrap().next_seq
    );
}

fn offline_member_resyncs(salt: u8, http: bool) {
    let group = group(salt);
    let gcks = start_gcks(group, 64);
    let bundles = admit(&gcks, 1, 4);
    wait_sent(&gcks, 1);
    // The member of the first bundle is offline for five more rekeys.
    let latest = rekeys(&gcks, 5);
    let (tcp, http_addr) = gcks.resync_addrs();
    let endpoint = if http {
        Endpoint::Http(http_addr.unwrap())
    } else {
        Endpoint::Tcp(tcp.unwrap())
    };
    let member = late_member(&gcks, group, &bundles[0], endpoint);
    // Its first traffic (a heartbeat or the next rekey) is of a message it cannot check.
    gcks.rekey_now().unwrap();
    let events = wait_member(&member, latest + 1, false);
    let stats = member.stats().unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ReceiverEvent::OutOfSync { from_seq: 1 })),
        "{events:?}"
    );
    assert!(stats.receiver.applied_from_resync >= latest, "{stats:?}");
    assert_eq!(stats.messages.signature_failures, 0);
    assert_eq!(
        stats.group_key_version,
        Some(gcks.stats().unwrap().group_key_version)
    );
    member.shutdown().unwrap();
    gcks.shutdown().unwrap();
}

#[test]
fn member_offline_for_five_rekeys_resyncs_over_tcp() {
    offline_member_resyncs(1, false);
}

#[test]
fn member_offline_for_five_rekeys_resyncs_over_http() {
    offline_member_resyncs(2, true);
}

#[test]
fn member_offline_past_the_history_window_must_reregister() {
    let group = group(3);
    let gcks = start_gcks(group, 3);
    let bundles = admit(&gcks, 1, 2);
    wait_sent(&gcks, 1);
    rekeys(&gcks, 6);
    let (tcp, http) = gcks.resync_addrs();
    // Asked directly, both endpoints say so (HTTP: the batched route's oldest held is after
    // the first message wanted).
    for endpoint in [Endpoint::Tcp(tcp.unwrap()), Endpoint::Http(http.unwrap())] {
        let group_id = bundles[0].rekey_sa.group_id;
        let fetched = rekeycast::io::resync_client::fetch_items(
            endpoint,
            group_id,
            1,
            0,
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(
            fetched.beyond_history && fetched.items.is_empty(),
            "{endpoint}: {fetched:?}"
        );
    }
    let member = late_member(&gcks, group, &bundles[0], Endpoint::Tcp(tcp.unwrap()));
    gcks.rekey_now().unwrap();
    let events = wait_member(&member, u64::MAX - 1, true);
    assert!(
        events.contains(&ReceiverEvent::MustReregister),
        "{events:?}"
    );
    assert_eq!(member.stats().unwrap().receiver.applied_from_resync, 0);
    member.shutdown().unwrap();
    gcks.shutdown().unwrap();
}

/// A resync endpoint that relays the real GCKS's TCP stream with one bit of every chunk
/// flipped: the member verifies what it fetched, refuses it, and applies nothing.
#[test]
fn tampered_resync_data_is_rejected() {
    let group = group(4);
    let gcks = start_gcks(group, 64);
    let bundles = admit(&gcks, 1, 2);
    wait_sent(&gcks, 1);
    rekeys(&gcks, 2);
    let (real, _) = gcks.resync_addrs();
    let real = real.unwrap();
    let fake = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let fake_addr = fake.local_addr().unwrap();
    let relay = std::thread::spawn(move || {
        // Serves connections until none comes for 3 s; each exchange is bounded by timeouts.
        fake.set_nonblocking(true).unwrap();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(3) {
            let Ok((mut client, _)) = fake.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            quiet_since = Instant::now();
            client.set_nonblocking(false).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut upstream = TcpStream::connect(real).unwrap();
            upstream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut request = [0u8; 64];
            let Ok(n) = client.read(&mut request) else {
                continue;
            };
            upstream.write_all(&request[..n]).unwrap();
            // Relay frame by frame until the stream's End or Error frame, flipping one bit in
            // the body of every chunk frame (type 0x82, after its 12-byte seq and leaf).
            let mut pending = Vec::new();
            let mut buf = [0u8; 4096];
            'stream: while let Ok(read) = upstream.read(&mut buf) {
                if read == 0 {
                    break;
                }
                pending.extend_from_slice(&buf[..read]);
                while let Ok(Some(len)) = FrameRepr::peek_len(&pending) {
                    if pending.len() < len {
                        break;
                    }
                    let mut frame: Vec<u8> = pending.drain(..len).collect();
                    let kind = frame[4];
                    if kind == 0x82 && len > 4 + 1 + 12 + 40 {
                        frame[4 + 1 + 12 + 30] ^= 0x10;
                    }
                    if client.write_all(&frame).is_err() {
                        break 'stream;
                    }
                    if kind == 0x84 || kind == 0xFF {
                        break 'stream;
                    }
                }
            }
        }
    });
    let member = late_member(&gcks, group, &bundles[0], Endpoint::Tcp(fake_addr));
    gcks.rekey_now().unwrap();
    // Until the member's resync through the corrupting endpoint is over (every round failed,
    // or it started another): it got nothing it could verify.
    let stats = wait::until(
        Duration::from_secs(30),
        "the resync through the corrupting endpoint to end",
        || {
            let stats = member.stats().unwrap();
            (stats.resync.resyncs_failed >= 1 || stats.resyncs_started >= 2).then_some(stats)
        },
        || format!("{:?}", member.stats().unwrap()),
    );
    assert!(stats.resync.fetches > 0, "{stats:?}");
    assert!(stats.resyncs_started > 0, "{stats:?}");
    assert_eq!(stats.receiver.applied_from_resync, 0, "{stats:?}");
    assert_eq!(stats.group_key_version, None);
    member.shutdown().unwrap();
    gcks.shutdown().unwrap();
    let _ = relay.join();
}

/// Raises the soft limit of open files towards `wanted`; returns what it could get.
fn raise_nofile(wanted: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let target = wanted.min(hard);
    if target > soft && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        return target;
    }
    soft
}

/// Thousands of idle connections from one source against both endpoints: the endpoints keep
/// at most their per-source cap, refuse the rest at once, close the idle ones by their
/// timeouts, and a member resyncing from another source address meanwhile succeeds.
#[test]
fn ten_thousand_idle_connections_are_capped_and_timed_out_and_resync_still_works() {
    let group = group(5);
    let mut config = GcksConfig::loopback(group);
    config.batch_interval = Duration::from_secs(3600);
    config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_limits.header_timeout = Duration::from_millis(500);
    config.resync_limits.idle_timeout = Duration::from_secs(1);
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[10; 32])).unwrap();
    let bundles = admit(&gcks, 1, 2);
    wait_sent(&gcks, 1);
    let latest = rekeys(&gcks, 3);
    let (tcp, http) = gcks.resync_addrs();
    let (tcp, http) = (tcp.unwrap(), http.unwrap());

    let limit = raise_nofile(12_000);
    let wanted = 10_000usize.min(limit.saturating_sub(200) as usize);
    if wanted < 10_000 {
        eprintln!("NOTE: open-file limit {limit}: opening {wanted} idle connections, not 10,000");
    }
    let mut idle = Vec::with_capacity(wanted);
    for i in 0..wanted {
        let target = if i % 2 == 0 { tcp } else { http };
        if let Ok(stream) = TcpStream::connect(target) {
            idle.push(stream);
        }
    }
    assert!(
        idle.len() >= wanted * 9 / 10,
        "{} of {wanted} connected",
        idle.len()
    );

    // A member resyncing from another loopback source address, during the attack.
    let endpoint = Endpoint::Http(http);
    let mut member_config = MemberConfig::loopback(group, gcks.local_addr());
    member_config.bind = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), 0));
    member_config.resync_endpoints = vec![endpoint];
    member_config.resync_max_delay = Duration::from_millis(50);
    member_config.receiver.state_check_interval = Duration::from_millis(100);
    let member = Member::start(&bundles[0], member_config).unwrap();
    gcks.rekey_now().unwrap();
    let during = gcks.stats().unwrap().resync;
    assert!(
        during.open <= 2 * 16 + 8,
        "open connections bounded by the per-source caps: {during:?}"
    );
    assert!(during.refused_overloaded > 0, "{during:?}");

    // The idle ones left are closed by the endpoints' timeouts: each read ends when its
    // connection closes, all of them by the deadline.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut closed_by_server = 0;
    for stream in idle.iter_mut().take(64) {
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 512];
        match stream.read(&mut buf) {
            // Closed, or answered (503 / 408 / an Overloaded frame) and then closed.
            Ok(_) => closed_by_server += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed_by_server += 1,
            Err(_) => {}
        }
    }
    assert_eq!(
        closed_by_server, 64,
        "every sampled idle connection was ended by the endpoint"
    );
    let after = gcks.stats().unwrap().resync;
    eprintln!("resync endpoints during {during:?} after {after:?}");

    let events = wait_member(&member, latest, false);
    let stats = member.stats().unwrap();
    assert!(
        stats.receiver.applied_from_resync > 0,
        "{stats:?} {events:?}"
    );
    drop(idle);
    member.shutdown().unwrap();
    gcks.shutdown().unwrap();
}

fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        // A request that asks the endpoint to close is read to its end (a long body such as
        // /metrics takes several reads).
        let read_to_end = request.ends_with(b"keep\r\n\r\n")
            || request.windows(17).any(|w| w == b"Connection: close");
        if response.windows(4).any(|w| w == b"\r\n\r\n") && !read_to_end {
            break;
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn oversized_malformed_and_rate_limited_requests_get_their_status_codes() {
    let group = group(6);
    let mut config = GcksConfig::loopback(group);
    config.batch_interval = Duration::from_secs(3600);
    config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_limits.requests_per_second_per_source = 1.0;
    config.resync_limits.burst_per_source = 20;
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[11; 32])).unwrap();
    admit(&gcks, 1, 2);
    wait_sent(&gcks, 1);
    let (_, http) = gcks.resync_addrs();
    let http = http.unwrap();
    let ok = http_exchange(
        http,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let oversized = http_exchange(http, huge.as_bytes());
    assert!(oversized.starts_with("HTTP/1.1 431"), "{oversized}");
    let malformed = http_exchange(http, b"GARBAGE\x01\x02 / HTTP/9\r\n\r\n");
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    let post = http_exchange(
        http,
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let gone = http_exchange(
        http,
        b"GET /v1/groups/999/state HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(gone.starts_with("HTTP/1.1 404"), "{gone}");
    let metrics = http_exchange(
        http,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(metrics.contains("rekeycast_seq"), "{metrics}");
    // The burst of 20 is spent by now or soon: some requests of the next 40 are refused.
    let mut limited = 0;
    for _ in 0..40 {
        let answer = http_exchange(
            http,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if answer.starts_with("HTTP/1.1 429") {
            limited += 1;
        }
    }
    assert!(limited > 0, "a client over its rate limit gets 429");
    assert!(gcks.stats().unwrap().resync.rate_limited > 0);
    gcks.shutdown().unwrap();
}

/// The member's fetch over HTTP is one request (the batched route), and it returns what the
/// TCP fetch returns, which the member's session verifies and applies.
#[test]
fn an_http_resync_fetch_is_one_request_with_the_tcp_fetch_items() {
    use rekeycast::io::resync_client::fetch_items;
    use rekeycast::session::{ReceiverConfig, ReceiverSession};

    let group = group(7);
    let gcks = start_gcks(group, 64);
    let bundles = admit(&gcks, 1, 2);
    wait_sent(&gcks, 1);
    let latest = rekeys(&gcks, 20);
    let (tcp, http) = gcks.resync_addrs();
    let (tcp, http) = (tcp.unwrap(), http.unwrap());
    let bundle = &bundles[0];
    let config = || ReceiverConfig::new(gcks.local_addr());
    let leaf = ReceiverSession::new(bundle, config()).unwrap().order_key();
    let group_id = bundle.rekey_sa.group_id;
    let timeout = Duration::from_secs(10);

    let before = gcks.stats().unwrap().resync;
    let over_http = fetch_items(Endpoint::Http(http), group_id, 1, leaf, timeout).unwrap();
    let after = gcks.stats().unwrap().resync;
    assert_eq!(over_http.items.len() as u64, latest);
    assert!(!over_http.beyond_history && !over_http.not_held);
    assert_eq!(after.requests - before.requests, 1, "{before:?} {after:?}");
    assert_eq!(after.messages_served - before.messages_served, latest);

    let over_tcp = fetch_items(Endpoint::Tcp(tcp), group_id, 1, leaf, timeout).unwrap();
    assert_eq!(over_tcp, over_http);
    let mut session = ReceiverSession::new(bundle, config()).unwrap();
    for (manifest, chunk) in &over_http.items {
        session
            .handle_resync(Instant::now(), manifest, chunk)
            .unwrap();
    }
    assert_eq!(session.next_seq(), latest + 1);

    // Up to date: nothing to fetch, still one request.
    let before = gcks.stats().unwrap().resync;
    let nothing = fetch_items(Endpoint::Http(http), group_id, latest + 1, leaf, timeout).unwrap();
    assert!(nothing.items.is_empty() && !nothing.beyond_history);
    assert_eq!(gcks.stats().unwrap().resync.requests - before.requests, 1);
    gcks.shutdown().unwrap();
}

/// A request followed at once by the client's half-close is answered: the endpoint writes what
/// is queued, a whole resync stream included, before it closes.
#[test]
fn a_request_followed_by_a_half_close_is_answered() {
    let group = group(8);
    let gcks = start_gcks(group, 64);
    let group_id = admit(&gcks, 1, 2)[0].rekey_sa.group_id;
    wait_sent(&gcks, 1);
    let latest = rekeys(&gcks, 3);
    let (tcp, http) = gcks.resync_addrs();
    let (tcp, http) = (tcp.unwrap(), http.unwrap());
    let exchange = |addr: SocketAddr, request: &[u8]| {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer
    };
    // Each time: the request and the half-close usually reach the endpoint in one wake-up.
    let mut answered = 0;
    for _ in 0..20 {
        let answer = exchange(http, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        answered += usize::from(answer.starts_with(b"HTTP/1.1 200"));
    }
    assert_eq!(answered, 20, "HTTP requests answered before the half-close");
    let mut request = vec![0u8; 32];
    let len = FrameRepr::ResyncRequest {
        group_id,
        from_seq: 1,
        leaf: 0,
    }
    .emit(&mut request)
    .unwrap();
    let mut answered = 0;
    for _ in 0..20 {
        let mut state = [0u8; 16];
        let len = FrameRepr::StateRequest { group_id }
            .emit(&mut state)
            .unwrap();
        let answer = exchange(tcp, &state[..len]);
        answered += usize::from(matches!(
            FrameRepr::peek_len(&answer),
            Ok(Some(len)) if len == answer.len()
        ));
    }
    assert_eq!(
        answered, 20,
        "TCP state requests answered before the half-close"
    );
    let answer = exchange(tcp, &request[..len]);
    let mut frames = Vec::new();
    let mut rest = answer.as_slice();
    while let Ok(Some(len)) = FrameRepr::peek_len(rest) {
        if len > rest.len() {
            break;
        }
        frames.push(FrameRepr::parse(&rest[..len]).unwrap().buffer_len());
        rest = &rest[len..];
        if frames.len() as u64 == 2 * latest + 1 {
            break;
        }
    }
    assert_eq!(
        frames.len() as u64,
        2 * latest + 1,
        "{} bytes",
        answer.len()
    );
    gcks.shutdown().unwrap();
}

/// Requests pipelined in one read are each charged to the source's rate limit.
#[test]
fn pipelined_requests_are_each_charged_to_the_rate_limit() {
    let group = group(9);
    let mut config = GcksConfig::loopback(group);
    config.batch_interval = Duration::from_secs(3600);
    config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_limits.requests_per_second_per_source = 1.0;
    config.resync_limits.burst_per_source = 20;
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[12; 32])).unwrap();
    let (_, http) = gcks.resync_addrs();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
    let mut stream = TcpStream::connect(http.unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let ok = text.matches("HTTP/1.1 200").count();
    let limited = text.matches("HTTP/1.1 429").count();
    assert!((1..=21).contains(&ok), "{ok} answered 200");
    assert_eq!(limited, 1, "{text}");
    assert_eq!(gcks.stats().unwrap().resync.rate_limited, 1);
    gcks.shutdown().unwrap();
}

/// An HTTP endpoint without the batched route (an older relay: 404 without
/// `X-Rekeycast-Latest-Seq`) is still fetched from, two requests per message.
#[test]
fn an_http_endpoint_without_the_batched_route_is_fetched_per_message() {
    use rekeycast::io::resync_client::fetch_items;

    let group = group(10);
    let gcks = start_gcks(group, 64);
    let bundles = admit(&gcks, 1, 2);
    wait_sent(&gcks, 1);
    let latest = rekeys(&gcks, 4);
    let (tcp, _) = gcks.resync_addrs();
    let group_id = bundles[0].rekey_sa.group_id;
    let timeout = Duration::from_secs(5);
    let held = fetch_items(Endpoint::Tcp(tcp.unwrap()), group_id, 1, 0, timeout).unwrap();
    assert_eq!(held.items.len() as u64, latest);

    // The older endpoint: per-message routes only, from what the GCKS holds.
    let old = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let old_addr = old.local_addr().unwrap();
    let items = held.items.clone();
    let server = std::thread::spawn(move || {
        let mut requests = Vec::new();
        // The batched request, then one keep-alive connection for the per-message ones.
        for _ in 0..2 {
            let (mut client, _) = old.accept().unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut pending = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                    continue;
                };
                let head: Vec<u8> = pending.drain(..end + 4).collect();
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap()
                    .to_string();
                let path = line.split(' ').nth(1).unwrap().to_string();
                requests.push(path.clone());
                let parts: Vec<&str> = path.split('/').collect();
                let body = match parts.as_slice() {
                    ["", "v1", "groups", _, "rekeys", seq, "manifest"] => seq
                        .parse::<usize>()
                        .ok()
                        .and_then(|seq| items.get(seq - 1))
                        .map(|item| item.0.clone()),
                    ["", "v1", "groups", _, "rekeys", seq, "chunks", _] => seq
                        .parse::<usize>()
                        .ok()
                        .and_then(|seq| items.get(seq - 1))
                        .map(|item| item.1.clone()),
                    _ => None,
                };
                let response = match body {
                    Some(body) => {
                        let mut r =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                                .into_bytes();
                        r.extend_from_slice(&body);
                        r
                    }
                    None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                };
                if client.write_all(&response).is_err() {
                    break;
                }
                if path.contains("/resync") {
                    break;
                }
            }
        }
        requests
    });
    let fetched = fetch_items(Endpoint::Http(old_addr), group_id, 1, 0, timeout).unwrap();
    assert_eq!(fetched, held);
    let requests = server.join().unwrap();
    assert!(
        requests[0].contains("/resync?from=1&leaf=0"),
        "{requests:?}"
    );
    // Then a manifest and a chunk per message, and the manifest after the latest.
    assert_eq!(requests.len() as u64, 1 + 2 * latest + 1, "{requests:?}");
    gcks.shutdown().unwrap();
}

/// Counts the whole responses at the start of `bytes` (each with a `Content-Length`).
fn count_http_responses(mut bytes: &[u8]) -> usize {
    let mut count = 0;
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        let Some(length) = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse::<usize>().ok())
        else {
            return count;
        };
        if bytes.len() < end + 4 + length {
            return count;
        }
        bytes = &bytes[end + 4 + length..];
        count += 1;
    }
    count
}

/// A client that pipelines many requests and reads its answers as it goes gets every answer:
/// the endpoint stops reading while its answers wait instead of cutting the client off.
#[test]
fn a_pipelining_client_that_reads_gets_every_answer() {
    let group = group(11);
    let mut config = GcksConfig::loopback(group);
    config.batch_interval = Duration::from_secs(3600);
    config.resync_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_http = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.resync_limits.requests_per_second_per_source = 1e6;
    config.resync_limits.burst_per_source = 1_000_000;
    let gcks = Gcks::start(config, SigningKey::from_bytes(&[13; 32])).unwrap();
    let group_id = admit(&gcks, 1, 2)[0].rekey_sa.group_id;
    wait_sent(&gcks, 1);
    let (tcp, http) = gcks.resync_addrs();
    let (tcp, http) = (tcp.unwrap(), http.unwrap());

    // Writes `request` on one thread while this one reads, until `done` says the answers are
    // all in (or the endpoint stops).
    let pipeline = |addr: SocketAddr, request: Vec<u8>, done: &dyn Fn(&[u8]) -> bool| {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let write = std::thread::spawn(move || writer.write_all(&request));
        let mut answers = Vec::new();
        let mut buf = [0u8; 65_536];
        while !done(&answers) {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answers.extend_from_slice(&buf[..n]),
            }
        }
        let _ = write.join();
        answers
    };

    let mut state = [0u8; 16];
    let len = FrameRepr::StateRequest { group_id }
        .emit(&mut state)
        .unwrap();
    let count_frames = |mut bytes: &[u8]| {
        let mut count = 0;
        while let Ok(Some(len)) = FrameRepr::peek_len(bytes) {
            if len > bytes.len() {
                break;
            }
            assert!(matches!(
                FrameRepr::parse(&bytes[..len]),
                Ok(FrameRepr::State { .. })
            ));
            bytes = &bytes[len..];
            count += 1;
        }
        count
    };
    let answers = pipeline(tcp, state[..len].repeat(10_000), &|answers| {
        count_frames(answers) == 10_000
    });
    assert_eq!(count_frames(&answers), 10_000, "{} bytes", answers.len());

    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
    let answers = pipeline(http, request, &|answers| {
        count_http_responses(answers) == 300
    });
    assert_eq!(
        count_http_responses(&answers),
        300,
        "{} bytes",
        answers.len()
    );
    let counters = gcks.stats().unwrap().resync;
    assert_eq!(counters.requests, 10_300, "{counters:?}");
    gcks.shutdown().unwrap();
}
