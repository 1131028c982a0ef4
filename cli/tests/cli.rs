//! The `rekeycast` binary as a user runs it: `demo` with a report, `sim`, `server` with a bad
//! configuration, and `server`, `admin` and `member` as separate processes on loopback
//! multicast.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rekeycast_testkit::addr::{multicast_group, port};
use rekeycast_testkit::process::{
    log_file, wait_exit, wait_for_file, wait_for_log, MemberFile, Processes, ServerFile,
};

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
fn demo_admit_sends_the_first_message_of_the_bigger_group_to_the_running_members() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let output = rekeycast(&[
        "demo",
        "--members",
        "5",
        "--admit",
        "64",
        "--rekeys",
        "0",
        "--report",
        report.to_str().unwrap(),
    ]);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert!(
        stdout.contains("admits 64 members; 5 of them run"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["all_current"], serde_json::Value::Bool(true));
    assert_eq!(summary["members_admitted"], 64);
    assert_eq!(summary["members_final"], 5);
    let first = &summary["per_rekey"][0];
    assert_eq!(first["time_to_key_ms"]["samples"], 5);
    // Five members alone fit one chunk; 64 leaves do not.
    assert!(first["chunks"].as_u64().unwrap() > 1, "{first}");
    let output = rekeycast(&["demo", "--members", "5", "--admit", "4"]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("--admit"));
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
    std::fs::write(&config, "[gcks.sender]\nsend_rate = -5.0\n").unwrap();
    let output = rekeycast(&["server", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("gcks.sender.send_rate: must be positive and finite"),
        "{stderr}"
    );
    // The GCKS's resync limits are options of the file too, checked by the library.
    std::fs::write(&config, "[gcks.resync_limits]\nmax_connections = 0\n").unwrap();
    let output = rekeycast(&["server", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("gcks.resync_limits.max_connections: at least 1"),
        "{stderr}"
    );

    std::fs::write(&config, "[gcks.sender]\nsend_rat = 5.0\n").unwrap();
    let output = rekeycast(&["server", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("send_rat"));
}

/// The files of a server and one member on loopback, for process test `test` (its own
/// multicast group, and its own loopback address 127.0.0.`test + 1`, so the process tests can
/// run at once), written into `dir`; `batch_interval_ms` 0 leaves the batch interval at its
/// default.
struct Files {
    socket: PathBuf,
    server: ServerFile,
    server_config: PathBuf,
    bundle: PathBuf,
    member_config: PathBuf,
}

impl Files {
    fn new(dir: &Path, test: u8, batch_interval_ms: u64) -> Self {
        let host = format!("127.0.0.{}", test + 1);
        let group = multicast_group(85, test).to_string();
        let feedback = format!("{host}:{}", port(2 * test));
        let resync = format!("{host}:{}", port(2 * test + 1));
        let socket = dir.join("admin.sock");
        let server = ServerFile {
            feedback: feedback.clone(),
            state_dir: dir.join("state"),
            admin_socket: socket.clone(),
            multicast: group.clone(),
            batch_interval_ms: (batch_interval_ms > 0).then_some(batch_interval_ms),
            sender: vec![("grtt.initial_ms", 10)],
            resync_tcp: resync.clone(),
        };
        let server_config = dir.join("server.toml");
        server.write(&server_config);
        let bundle = dir.join("member-1.bundle");
        let member_config = dir.join("member.toml");
        MemberFile {
            feedback,
            bundle: bundle.clone(),
            resync_endpoints: vec![format!("tcp://{resync}")],
            state_check_interval_ms: 100,
            multicast: group,
        }
        .write(&member_config);
        Self {
            socket,
            server,
            server_config,
            bundle,
            member_config,
        }
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

/// A member process on `config` and `state` that exits once it applied message `target`,
/// logging to `log`.
fn member_until(config: &Path, state: &Path, target: &str, log: &Path) -> Child {
    Command::new(BIN)
        .args([
            "member",
            "--config",
            config.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--exit-after-seq",
            target,
        ])
        .stdout(Stdio::null())
        .stderr(log_file(log))
        .spawn()
        .unwrap()
}

#[test]
fn server_admin_member_processes_deliver_a_rekey() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path(), 0, 200);
    let Files {
        socket,
        server_config,
        bundle,
        member_config,
        ..
    } = files;

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
    processes.0.push(member_until(
        &member_config,
        &member_state,
        &target,
        &member_log,
    ));
    // Once the member runs (its sockets bound, the group joined), rekey: it needs that message.
    wait_for_log(&member_log, "member running", Duration::from_secs(20));
    let rekeyed = admin(&socket, &["rekey"]);
    assert_eq!(rekeyed["ok"], true, "{rekeyed}");

    let Some(status) = wait_exit(&mut processes.0[1], Duration::from_secs(30)) else {
        panic!("the member did not reach message {target}\n{}", logs());
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
    processes.0.push(member_until(
        &member_config,
        &member_state,
        &target,
        &member_log,
    ));
    wait_for_log(
        &member_log,
        "member resumed from its saved keys",
        Duration::from_secs(20),
    );
    let rekeyed = admin(&socket, &["rekey"]);
    assert_eq!(rekeyed["ok"], true, "{rekeyed}");
    let Some(status) = wait_exit(&mut processes.0[2], Duration::from_secs(30)) else {
        panic!(
            "the resumed member did not reach message {target}\n{}",
            logs()
        );
    };
    assert!(
        status.success(),
        "resumed member exited with {status}\n{}",
        logs()
    );
    assert!(logs().contains("resumed from its saved keys"), "{}", logs());
}

/// `bundle` (a bundle file's JSON) with one hex digit of its leaf key changed.
fn flip_leaf_key_digit(bundle: &mut serde_json::Value) {
    let key = bundle["leaf_key"].as_str().unwrap().to_string();
    let flipped = if key.starts_with('0') { "1" } else { "0" };
    bundle["leaf_key"] = format!("{flipped}{}", &key[1..]).into();
}

/// A member started from a bundle whose leaf key has one hex digit flipped. Written as a v1
/// file (no integrity check), the member runs, finds that its keys cannot open its own
/// authenticated chunk, and exits 4 naming that cause, instead of resyncing for ever. Written
/// as a v2 file (the format `admin join` writes), it is refused at start by the file's
/// integrity check: exit 1, naming it.
#[test]
fn member_with_a_corrupt_bundle_exits_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    // Apart from the other process tests: another multicast group, and 127.0.0.2.
    let Files {
        socket,
        server_config,
        bundle,
        member_config,
        ..
    } = Files::new(dir.path(), 1, 100);
    let server_log = dir.path().join("server.log");
    let member_log = dir.path().join("member.log");
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
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
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();

    // A v1 file: nothing checks it, so the member runs with the wrong leaf key.
    let mut v1 = written.clone();
    v1.as_object_mut().unwrap().remove("check");
    v1["format"] = "rekeycast-registration-bundle-v1".into();
    flip_leaf_key_digit(&mut v1);
    std::fs::write(&bundle, serde_json::to_vec_pretty(&v1).unwrap()).unwrap();
    processes.0.push(
        Command::new(BIN)
            .args(["member", "--config", member_config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log_file(&member_log))
            .spawn()
            .unwrap(),
    );
    // Rekeys keep coming until the member exits: it hears the next message (or learns of it
    // and resyncs) and must then stop within that message.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let rekeyed = admin(&socket, &["rekey"]);
        assert_eq!(rekeyed["ok"], true, "{rekeyed}");
        // The next rekey when the member has not exited within 300 ms of this one.
        if let Some(status) = wait_exit(&mut processes.0[1], Duration::from_millis(300)) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the member with a wrong leaf key did not exit\nmember log:\n{}\nserver log:\n{}",
            read(&member_log),
            read(&server_log)
        );
    };
    let log = read(&member_log);
    assert_eq!(status.code(), Some(4), "{status}\n{log}");
    assert!(
        log.contains("cannot open its own authenticated chunk"),
        "{log}"
    );
    // It may have learnt of the message by a resync, but it did not resync again.
    assert!(log.matches("out of sync").count() <= 1, "{log}");

    // The v2 file as written, with the same digit flipped: refused at start.
    let mut v2 = written;
    flip_leaf_key_digit(&mut v2);
    std::fs::write(&bundle, serde_json::to_vec_pretty(&v2).unwrap()).unwrap();
    let mut member = Command::new(BIN)
        .args(["member", "--config", member_config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut member, Duration::from_secs(20));
    if status.is_none() {
        let _ = member.kill();
    }
    let output = member.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    assert!(stderr.contains("integrity check failed"), "{stderr}");
    assert!(stderr.contains("member-1.bundle"), "{stderr}");
}

#[test]
fn server_on_a_taken_resync_port_names_the_address_and_the_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let resync = taken.local_addr().unwrap();
    let mut files = Files::new(dir.path(), 2, 0);
    files.server.batch_interval_ms = None;
    files.server.sender.clear();
    files.server.resync_tcp = resync.to_string();
    files.server.write(&files.server_config);
    let server_config = files.server_config;
    let server_log = dir.path().join("server.log");
    let mut processes = Processes(vec![Command::new(BIN)
        .args(["server", "--config", server_config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log_file(&server_log))
        .spawn()
        .unwrap()]);
    let status = wait_exit(&mut processes.0[0], Duration::from_secs(20));
    let stderr = std::fs::read_to_string(&server_log).unwrap();
    assert!(
        status.is_some_and(|status| !status.success()),
        "{status:?}\n{stderr}"
    );
    assert!(stderr.contains(&resync.to_string()), "{stderr}");
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
    drop(taken);
}

#[test]
fn server_with_its_key_file_deleted_beside_a_kept_state_refuses_to_make_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path(), 3, 0);
    // A kept state (a key tree snapshot) whose signing key file was deleted.
    let state = &files.server.state_dir;
    std::fs::create_dir_all(state).unwrap();
    std::fs::write(state.join("tree.snapshot"), b"RKTREE01").unwrap();
    let key = state.join("gcks-signing-key.pem");
    let output = rekeycast(&["server", "--config", files.server_config.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(&key.display().to_string()), "{stderr}");
    assert!(stderr.contains("is missing"), "{stderr}");
    assert!(!key.exists(), "no key was generated");
}
