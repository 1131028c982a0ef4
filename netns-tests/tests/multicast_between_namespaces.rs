//! The first netns test: one multicast datagram from one namespace to another over a veth
//! pair, received through a socket2 multicast socket.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rekeycast_netns_tests::{clean_leftovers, link, may_run, name_prefix, ChildGuard, Namespace};

#[test]
fn multicast_datagram_crosses_a_veth_pair() {
    if !may_run("multicast_datagram_crosses_a_veth_pair") {
        return;
    }
    clean_leftovers().expect("cleaning leftovers");
    let prefix = name_prefix();
    // Guards drop in reverse order: the receiver process first, then the namespaces.
    let sender = Namespace::create(&format!("{prefix}s")).expect("sender namespace");
    let receiver = Namespace::create(&format!("{prefix}r")).expect("receiver namespace");
    link(&sender, "198.18.0.1/24", &receiver, "198.18.0.2/24", "v").expect("veth pair");

    let binary = env!("CARGO_BIN_EXE_rekeycast-netns");
    let child = receiver
        .command(binary)
        .args(["probe-recv", "--group", "239.1.2.3", "--port", "45001"])
        .args(["--iface", "198.18.0.2", "--timeout-ms", "5000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the receiver");
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines.next().expect("receiver output").expect("readable");
    assert_eq!(ready, "ready", "receiver did not get ready");

    // IGMP joins need no time on a veth pair, but resend a few times within a bounded window
    // in case the first datagram races the join.
    let payload = "rekeycast-netns-probe";
    let send_status = sender
        .command(binary)
        .args(["probe-send", "--group", "239.1.2.3", "--port", "45001"])
        .args(["--iface", "198.18.0.1", "--payload", payload])
        .status()
        .expect("running the sender");
    assert!(send_status.success(), "sender failed: {send_status}");

    let started = Instant::now();
    let received = lines
        .next()
        .expect("a line from the receiver")
        .expect("readable");
    assert!(started.elapsed() < Duration::from_secs(6));
    let expected: String = payload.bytes().map(|b| format!("{b:02x}")).collect();
    assert_eq!(received, format!("received {expected}"));
    let status = child.0.wait().expect("receiver exit");
    assert!(status.success(), "receiver exited with {status}");
}
