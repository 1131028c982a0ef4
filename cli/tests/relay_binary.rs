//! The `rekey-relay` binary as an operator runs it: between `rekeycast server` and
//! `rekeycast member` processes it forwards, serves `/metrics` and `/healthz`, stops cleanly on
//! SIGTERM and resumes from its state directory; a bad configuration is refused with the
//! option named.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use rekeycast_testkit::http::{get as http_get, metric};

/// The group id of a configuration file that does not set one.
const GROUP_ID: u32 = 1;

/// The upstream (`tier` 0) or downstream (`tier` 1) group and port of test `salt` in this
/// process, away from other tests' groups.
fn group(salt: u8, tier: u8) -> SocketAddr {
    let pid = std::process::id();
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(239, 83 + tier, salt, pid as u8),
        46_000 + (pid % 8_000) as u16 + 2 * u16::from(salt) + u16::from(tier),
    ))
}

/// The `rekey-relay` binary as an operator runs it, between `rekeycast server` and
/// `rekeycast member` processes: it forwards, serves `/metrics` and `/healthz`, stops cleanly
/// on SIGTERM and resumes from its state directory without its bundle.
#[test]
fn rekey_relay_binary_forwards_reports_metrics_stops_on_sigterm_and_resumes() {
    use std::io::BufRead;
    use std::process::{Child, Command, Stdio};

    const REKEYCAST: &str = env!("CARGO_BIN_EXE_rekeycast");
    const RELAY: &str = env!("CARGO_BIN_EXE_rekey-relay");

    /// Children killed on drop, so a failing test leaves no process behind.
    struct Processes(Vec<Child>);
    impl Drop for Processes {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    fn admin(socket: &Path, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["admin", "--socket", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        let output = Command::new(REKEYCAST).args(&all).output().unwrap();
        assert!(output.status.success(), "admin {args:?}: {output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }
    /// Waits for `child` to exit, at most 30 s.
    fn wait_exit(child: &mut Child, what: &str, logs: &dyn Fn() -> String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "{what} exited with {status}\n{}", logs());
                return;
            }
            assert!(Instant::now() < deadline, "{what} did not exit\n{}", logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// Starts the relay and returns its ready line.
    fn start_relay(config: &Path, log: &Path, processes: &mut Processes) -> String {
        let mut child = Command::new(RELAY)
            .args(["--config", config.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        processes.0.push(child);
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("rekey-relay ready "),
            "{line:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        line
    }

    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    // Fixed ports (the configuration files name them), below the ephemeral range.
    let port = |k: u32| 20_000 + (pid % 2_000) * 5 + k;
    let (up, down) = (group(6, 0), group(6, 1));
    let feedback = format!("127.0.0.1:{}", port(0));
    let gcks_resync = format!("127.0.0.1:{}", port(1));
    let relay_feedback = format!("127.0.0.1:{}", port(2));
    let relay_tcp = format!("127.0.0.1:{}", port(3));
    let relay_http: SocketAddr = format!("127.0.0.1:{}", port(4)).parse().unwrap();
    let socket = dir.path().join("admin.sock");
    let server_config = dir.path().join("server.toml");
    std::fs::write(
        &server_config,
        format!(
            "admin_socket = \"{}\"\n\
             [gcks]\nbind = \"{feedback}\"\nstate_dir = \"{}\"\nbatch_interval_ms = 200\n\
             resync_tcp = \"{gcks_resync}\"\n\
             [gcks.multicast]\ngroup = \"{up}\"\ninterface = \"127.0.0.1\"\nloopback = true\n\
             [gcks.sender]\nheartbeat_max_ms = 500\n",
            socket.display(),
            dir.path().join("gcks").display()
        ),
    )
    .unwrap();
    let relay_bundle = dir.path().join("relay.bundle");
    let relay_config = dir.path().join("relay.toml");
    std::fs::write(
        &relay_config,
        format!(
            "bundle = \"{}\"\n\
             [relay]\nstate_dir = \"{}\"\ndownstream_bind = \"{relay_feedback}\"\n\
             resync_tcp = \"{relay_tcp}\"\nresync_http = \"{relay_http}\"\n\
             [relay.upstream]\ngroup = \"{up}\"\ninterface = \"127.0.0.1\"\n\
             [relay.downstream]\ngroup = \"{down}\"\ninterface = \"127.0.0.1\"\nloopback = true\n\
             [relay.session.upstream]\nfeedback_addr = \"{feedback}\"\n\
             [relay.session.downstream]\nheartbeat_max_ms = 500\n\
             [relay.resync]\ngcks = [\"tcp://{gcks_resync}\"]\n",
            relay_bundle.display(),
            dir.path().join("relay-state").display()
        ),
    )
    .unwrap();
    let member_bundle = dir.path().join("member.bundle");
    let member_config = dir.path().join("member.toml");
    std::fs::write(
        &member_config,
        format!(
            "bundle = \"{}\"\n[member]\nresync_relays = [\"tcp://{relay_tcp}\"]\n\
             resync_endpoints = [\"tcp://{gcks_resync}\"]\n\
             [member.multicast]\ngroup = \"{down}\"\ninterface = \"127.0.0.1\"\n\
             [member.receiver]\nfeedback_addr = \"{relay_feedback}\"\nstate_check_interval_ms = 100\n",
            member_bundle.display()
        ),
    )
    .unwrap();
    let (server_log, relay_log, member_log) = (
        dir.path().join("server.log"),
        dir.path().join("relay.log"),
        dir.path().join("member.log"),
    );
    let logs = || {
        [&server_log, &relay_log, &member_log]
            .iter()
            .map(|p| {
                format!(
                    "{}:\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut processes = Processes(Vec::new());
    processes.0.push(
        Command::new(REKEYCAST)
            .args(["server", "--config", server_config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&server_log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no admin socket\n{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The relay and a member in one batch (message 1).
    let relay_join = {
        let (socket, bundle) = (socket.clone(), relay_bundle.clone());
        std::thread::spawn(move || {
            admin(
                &socket,
                &[
                    "join",
                    "--relay",
                    "--member",
                    "1000",
                    "--bundle",
                    bundle.to_str().unwrap(),
                ],
            )
        })
    };
    let joined = admin(
        &socket,
        &[
            "join",
            "--member",
            "1",
            "--bundle",
            member_bundle.to_str().unwrap(),
        ],
    );
    let relay_joined = relay_join.join().unwrap();
    assert_eq!(relay_joined["relay"], true, "{relay_joined}");
    assert_eq!(joined["ok"], true, "{joined}");
    let ready = start_relay(&relay_config, &relay_log, &mut processes);
    assert!(
        ready.contains(&format!("feedback={relay_feedback}")),
        "{ready}"
    );
    processes.0.push(
        Command::new(REKEYCAST)
            .args([
                "member",
                "--config",
                member_config.to_str().unwrap(),
                "--exit-after-seq",
                "3",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&member_log).unwrap()))
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        assert_eq!(admin(&socket, &["rekey"])["ok"], true);
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_exit(&mut processes.0[2], "the member", &logs);
    let status = admin(&socket, &["status"]);
    assert_eq!(status["relays"], 1, "{status}");
    let (code, body) = http_get(relay_http, "/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    // /metrics is renewed at most once a second.
    std::thread::sleep(Duration::from_millis(1_100));
    let (code, text) = http_get(relay_http, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metric(&text, "rekeycast_relay_forwarded_total") >= 2,
        "{text}\n{}",
        logs()
    );
    assert_eq!(
        metric(&text, "rekeycast_relay_latest_held_seq"),
        3,
        "{text}"
    );

    // SIGTERM: a clean stop, status 0.
    let relay_pid = processes.0[1].id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &relay_pid])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_exit(&mut processes.0[1], "the relay", &logs);
    assert!(logs().contains("stopped"), "{}", logs());

    // Back without its bundle: it resumes from its state and serves message 3 at once.
    std::fs::remove_file(&relay_bundle).unwrap();
    start_relay(&relay_config, &relay_log, &mut processes);
    let (code, _) = http_get(
        relay_http,
        &format!("/v1/groups/{GROUP_ID}/rekeys/3/manifest"),
    );
    assert_eq!(code, 200, "{}", logs());
    assert!(
        std::fs::read_to_string(&relay_log)
            .unwrap()
            .contains("relay resumed from its saved keys"),
        "{}",
        logs()
    );
    let relay_pid = processes.0[3].id().to_string();
    Command::new("kill")
        .args(["-TERM", &relay_pid])
        .status()
        .unwrap();
    wait_exit(&mut processes.0[3], "the resumed relay", &logs);
}

#[test]
fn rekey_relay_binary_refuses_a_bad_configuration_naming_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[relay.downstream]\ngroup = \"239.255.77.1:7400\"\n\
         [relay.session.upstream]\nfeedback_addr = \"127.0.0.1:7401\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rekey-relay"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("relay.downstream.group: must differ from upstream.group"),
        "{stderr}"
    );
    // No bundle and no saved state: an error naming the bundle.
    std::fs::write(
        &config,
        format!(
            "bundle = \"{}\"\n[relay]\nstate_dir = \"{}\"\n\
             [relay.session.upstream]\nfeedback_addr = \"127.0.0.1:7401\"\n",
            dir.path().join("missing.bundle").display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rekey-relay"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("registration bundle"), "{stderr}");
}
