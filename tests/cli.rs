//! The `rekeycast` binary as a user runs it: `demo` with a report, `sim`, `server` with a bad
//! configuration, and `server`, `admin` and `member` as separate processes on loopback
//! multicast.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rekeycast");

fn rekeycast(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn demo_report_writes_summary_json_and_svg_chart() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let output = rekeycast(&[
        "demo",
        "--members",
        "20",
        "--rekeys",
        "3",
        "--report",
        report.to_str().unwrap(),
    ]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert!(stdout.contains("SIMULATED"), "{stdout}");
    assert!(
        stdout.contains("OK: every member (20) holds the current group key"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["all_current"], serde_json::Value::Bool(true));
    assert_eq!(summary["messages"], 4);
    assert_eq!(summary["per_rekey"].as_array().unwrap().len(), 4);
    assert!(summary["time_to_key_ms"]["p99"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(report.join("time-to-key.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.contains("p99"));
}

#[test]
fn demo_rejects_bad_loss_flags() {
    let output = rekeycast(&["demo", "--burst-loss", "0.05"]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("MEAN_LOSS:MEAN_BURST"));
    let output = rekeycast(&["demo", "--loss", "1.5"]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("--loss 1.5"));
}

#[test]
fn sim_small_group_converges() {
    let output = rekeycast(&["sim", "--members", "50", "--rekeys", "3"]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert!(stdout.contains("converged:     50/50"), "{stdout}");
    assert!(stdout.contains("path RTTs"), "{stdout}");
}

#[test]
fn server_bad_config_exits_naming_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[sender]\nsend_rate = -5.0\n").unwrap();
    let output = rekeycast(&["server", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("sender.send_rate"), "{stderr}");

    std::fs::write(&config, "[sender]\nsend_rat = 5.0\n").unwrap();
    let output = rekeycast(&["server", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("send_rat"));
}

/// Kills and reaps the processes it holds when the test ends, however it ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn log_file(path: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(path).unwrap())
}

fn wait_for_file(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn admin(socket: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["admin", "--socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    let output = rekeycast(&all);
    assert!(
        output.status.success(),
        "admin {args:?}: {}\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn server_admin_member_processes_deliver_a_rekey() {
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let group = format!(
        "239.80.{}.{}:{}",
        (pid >> 8) as u8,
        pid as u8,
        41_000 + pid % 10_000
    );
    let feedback = format!("127.0.0.1:{}", 51_000 + pid % 10_000);
    let resync = format!("127.0.0.1:{}", 55_000 + pid % 10_000);
    let state: PathBuf = dir.path().join("state");
    let socket = dir.path().join("admin.sock");
    let server_config = dir.path().join("server.toml");
    std::fs::write(
        &server_config,
        format!(
            "feedback_listen = \"{feedback}\"\nstate_dir = \"{}\"\nadmin_socket = \"{}\"\n\
             [group]\nmulticast = \"{group}\"\n[batch]\ninterval_ms = 200\n\
             [sender]\ngrtt_initial_ms = 10\n[resync]\ntcp_listen = \"{resync}\"\n",
            state.display(),
            socket.display()
        ),
    )
    .unwrap();
    let bundle = dir.path().join("member-1.bundle");
    let member_config = dir.path().join("member.toml");
    std::fs::write(
        &member_config,
        format!(
            "feedback = \"{feedback}\"\nbundle = \"{}\"\n\
             resync_endpoints = [\"tcp://{resync}\"]\nstate_check_interval_ms = 100\n\
             [group]\nmulticast = \"{group}\"\n",
            bundle.display()
        ),
    )
    .unwrap();

    let server_log = dir.path().join("server.log");
    let member_log = dir.path().join("member.log");
    let logs = || {
        format!(
            "server log:\n{}\nmember log:\n{}",
            std::fs::read_to_string(&server_log).unwrap_or_default(),
            std::fs::read_to_string(&member_log).unwrap_or_default()
        )
    };
    let mut processes = Processes(Vec::new());
    processes.0.push(
        Command::new(BIN)
            .args(["server", "--config", server_config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log_file(&server_log))
            .spawn()
            .unwrap(),
    );
    wait_for_file(&socket, Duration::from_secs(20));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "admin socket mode {mode:o}");

    let joined = admin(
        &socket,
        &[
            "join",
            "--member",
            "1",
            "--bundle",
            bundle.to_str().unwrap(),
        ],
    );
    assert_eq!(joined["ok"], true, "{joined}");
    let first_seq = joined["first_seq"].as_u64().unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&bundle).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "bundle mode {mode:o}");

    let member_state = dir.path().join("member.state");
    let target = (first_seq + 1).to_string();
    processes.0.push(
        Command::new(BIN)
            .args([
                "member",
                "--config",
                member_config.to_str().unwrap(),
                "--state",
                member_state.to_str().unwrap(),
                "--exit-after-seq",
                &target,
            ])
            .stdout(Stdio::null())
            .stderr(log_file(&member_log))
            .spawn()
            .unwrap(),
    );
    // Give the member time to join the group, then rekey until it has the next message.
    std::thread::sleep(Duration::from_millis(500));
    let rekeyed = admin(&socket, &["rekey"]);
    assert_eq!(rekeyed["ok"], true, "{rekeyed}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = processes.0[1].try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the member did not reach message {target}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "member exited with {status}\n{}", logs());
    let status = admin(&socket, &["status"]);
    assert_eq!(status["members"], 1, "{status}");
    assert!(status["seq"].as_u64().unwrap() > first_seq, "{status}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&member_state).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "member state mode {mode:o}");

    // The member restarts from its saved keys, without its bundle, and applies the next
    // message (resyncing any it missed while down).
    std::fs::remove_file(&bundle).unwrap();
    let target = (status["seq"].as_u64().unwrap() + 1).to_string();
    processes.0.push(
        Command::new(BIN)
            .args([
                "member",
                "--config",
                member_config.to_str().unwrap(),
                "--state",
                member_state.to_str().unwrap(),
                "--exit-after-seq",
                &target,
            ])
            .stdout(Stdio::null())
            .stderr(log_file(&member_log))
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let rekeyed = admin(&socket, &["rekey"]);
    assert_eq!(rekeyed["ok"], true, "{rekeyed}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = processes.0[2].try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed member did not reach message {target}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "resumed member exited with {status}\n{}",
        logs()
    );
    assert!(logs().contains("resumed from its saved keys"), "{}", logs());
}
