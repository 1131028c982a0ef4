//! `rekeycast member`: one member from a configuration file ([`MemberConfig`]) and the
//! registration bundle `rekeycast admin join` wrote, or, after a restart, from the keys it
//! saved in its state file (`--state` or `state_file`). Logs its key events (sequence numbers,
//! versions and SPIs, never key bytes) and runs until Ctrl-C or SIGTERM, or with
//! `--exit-after-seq N` until it applied message N (exit 0). Exit status: 1 on an error
//! (a registration bundle that fails its integrity check among them), 3 when the messages it
//! lacks left the group's history ([`EXIT_MUST_REREGISTER`]), 4 when its keys cannot open its
//! own authenticated chunk ([`EXIT_KEYS_CANNOT_OPEN`]: its bundle or saved keys are not the
//! GCKS's, or it was removed); in both last cases it must register again.
//!
//! With `--status-file FILE` it also writes its figures there as one JSON object ([`status_json`]):
//! after every applied message, every half second while idle, and on exit, each time to a
//! temporary file renamed over the last, so a reader never sees half a file. The netns harness
//! judges its scenarios from these files.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::MemberConfig;
use anyhow::{bail, Context};
use crossbeam_channel::RecvTimeoutError;
use rekeycast::member::{Member, MemberStats};
use rekeycast::session::{ReceiverEvent, ReregisterReason};
use serde_json::{json, Value};
use tracing::{error, info, warn};

use super::shutdown::ShutdownFlag;

/// The exit status when the member must re-register because the messages it lacks left the
/// group's history.
pub const EXIT_MUST_REREGISTER: u8 = 3;

/// The exit status when the member's keys cannot open its own authenticated chunk
/// ([`ReceiverEvent::KeysCannotOpen`]): it must re-register with a good bundle.
pub const EXIT_KEYS_CANNOT_OPEN: u8 = 4;

/// The flags of `rekeycast member`.
#[derive(Debug, Clone, clap::Args)]
pub struct MemberArgs {
    /// The member's configuration file (TOML; see `rekeycast-member.example.toml`).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The registration bundle (instead of the configuration's `bundle`).
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// Where to save the member's keys after every applied message (instead of the
    /// configuration's `state_file`); when the file exists, resume from it instead of the
    /// bundle, without registering again.
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Exit with status 0 once message SEQ (or a later one) is applied: for scripted tests.
    #[arg(long, value_name = "SEQ")]
    pub exit_after_seq: Option<u64>,
    /// Write the member's figures to FILE as JSON after every applied message, every half
    /// second and on exit (for test harnesses).
    #[arg(long, value_name = "FILE")]
    pub status_file: Option<PathBuf>,
    /// After this long without a datagram that passes the MAC check, ask a resync endpoint
    /// for the group's state (a member behind a relay that died hears nothing). Default 120000.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub silence_timeout_ms: Option<u64>,
}

/// How often `--status-file` is rewritten when no message was applied meanwhile.
pub const STATUS_INTERVAL: Duration = Duration::from_millis(500);

/// The most applied messages `--status-file` lists (the newest).
pub const STATUS_APPLIED_KEPT: usize = 1024;

/// Runs `rekeycast member`.
pub fn run(args: &MemberArgs) -> anyhow::Result<ExitCode> {
    let config = MemberConfig::load(&args.config)
        .with_context(|| format!("configuration {}", args.config.display()))?;
    super::logging::init(&config.log.filter)?;
    let shutdown = ShutdownFlag::install()?;
    let mut engine_config = config.engine_config();
    let state_file = args
        .state
        .clone()
        .or_else(|| engine_config.state_file.clone());
    if let Some(ms) = args.silence_timeout_ms {
        engine_config.receiver.silence_timeout = Duration::from_millis(ms);
    }
    engine_config.state_file = state_file.clone();
    let mut status = args.status_file.clone().map(StatusFile::new);
    let member = match state_file.filter(|path| path.exists()) {
        Some(path) => {
            let member = Member::resume(&path, engine_config)
                .with_context(|| format!("resuming from the member state {}", path.display()))?;
            let next_seq = member.stats().context("member engine")?.next_seq;
            info!(
                state = %path.display(),
                next_seq,
                group = %config.member.multicast.group,
                feedback = %config.member.receiver.feedback_addr,
                "member resumed from its saved keys"
            );
            member
        }
        None => {
            let bundle_path = args.bundle.clone().unwrap_or_else(|| config.bundle.clone());
            let bundle = super::bundle::read(&bundle_path).context("registration bundle")?;
            let member =
                Member::start(&bundle, engine_config).context("starting the member engine")?;
            if let Some(status) = &mut status {
                status.member = Some(bundle.member.0);
            }
            info!(
                member = bundle.member.0,
                first_seq = bundle.first_seq,
                group = %config.member.multicast.group,
                feedback = %config.member.receiver.feedback_addr,
                "member running"
            );
            member
        }
    };
    loop {
        if shutdown.is_set() {
            info!("shutting down");
            write_status(&mut status, &member, false);
            member.shutdown().context("stopping the member engine")?;
            return Ok(ExitCode::SUCCESS);
        }
        let event = match member.events().recv_timeout(Duration::from_millis(200)) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                if status.as_ref().is_some_and(StatusFile::is_due) {
                    write_status(&mut status, &member, false);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                member.shutdown().context("the member engine stopped")?;
                bail!("the member engine stopped");
            }
        };
        match event {
            ReceiverEvent::GroupKeyUpdated { seq, version } => {
                info!(seq, version, "group key updated");
                if let Some(status) = &mut status {
                    status.record_applied(seq, SystemTime::now());
                }
                write_status(&mut status, &member, false);
                if let Some(last) = args.exit_after_seq.filter(|last| seq >= *last) {
                    info!(seq, "applied message {last} (--exit-after-seq): exiting");
                    member.shutdown().context("stopping the member engine")?;
                    return Ok(ExitCode::SUCCESS);
                }
            }
            ReceiverEvent::NewDataSa { seq, data_sa } => info!(
                seq,
                spi = format_args!("{:#010x}", data_sa.spi),
                lifetime_secs = data_sa.lifetime_secs,
                "new Data SA (traffic key)"
            ),
            ReceiverEvent::OutOfSync { from_seq } => warn!(
                from_seq,
                "out of sync from message {from_seq}: resyncing from the configured endpoints"
            ),
            ReceiverEvent::StateCheckNeeded { claimed_seq } => info!(
                claimed_seq,
                "traffic of a later message than this member can check: asking a resync endpoint \
                 for the latest state"
            ),
            ReceiverEvent::KeysCannotOpen { seq, error } => {
                error!(
                    seq,
                    error = %rekeycast::report::Chain(&error),
                    "this member's keys cannot open its own authenticated chunk of message {seq}: \
                     its registration bundle (or saved keys) is corrupt or not the GCKS's, or it \
                     was removed from the group; it must register again"
                );
                write_status(&mut status, &member, true);
                let _ = member.shutdown();
                return Ok(ExitCode::from(EXIT_KEYS_CANNOT_OPEN));
            }
            ReceiverEvent::MustReregister => {
                let reason = member.stats().ok().and_then(|stats| stats.must_reregister);
                error!(
                    reason = reason.map(|r| r.to_string()),
                    "this member must register again"
                );
                write_status(&mut status, &member, true);
                let _ = member.shutdown();
                let code = match reason {
                    Some(ReregisterReason::KeysCannotOpen { .. }) => EXIT_KEYS_CANNOT_OPEN,
                    _ => EXIT_MUST_REREGISTER,
                };
                return Ok(ExitCode::from(code));
            }
            _ => info!("other key event"),
        }
    }
}

/// The `--status-file` of a running member: where it goes and the applied messages it lists.
#[derive(Debug)]
struct StatusFile {
    path: PathBuf,
    member: Option<u64>,
    /// `(seq, microseconds since the Unix epoch)` of the newest applied messages.
    applied: VecDeque<(u64, u64)>,
    written: Option<Instant>,
}

impl StatusFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            member: None,
            applied: VecDeque::new(),
            written: None,
        }
    }

    fn record_applied(&mut self, seq: u64, at: SystemTime) {
        if self.applied.len() == STATUS_APPLIED_KEPT {
            self.applied.pop_front();
        }
        self.applied.push_back((seq, unix_micros(at)));
    }

    fn is_due(&self) -> bool {
        self.written
            .map_or(true, |written| written.elapsed() >= STATUS_INTERVAL)
    }

    fn write(&mut self, stats: &MemberStats, must_reregister: bool) -> std::io::Result<()> {
        let applied: Vec<(u64, u64)> = self.applied.iter().copied().collect();
        let value = status_json(self.member, stats, &applied, must_reregister);
        write_atomically(&self.path, value.to_string().as_bytes())?;
        self.written = Some(Instant::now());
        Ok(())
    }
}

/// Writes the status file if there is one; a failure is logged, and the member goes on.
fn write_status(status: &mut Option<StatusFile>, member: &Member, must_reregister: bool) {
    let Some(status) = status else { return };
    let outcome = member
        .stats()
        .map_err(|error| std::io::Error::other(error.to_string()))
        .and_then(|stats| status.write(&stats, must_reregister));
    if let Err(error) = outcome {
        warn!(error = %rekeycast::report::Chain(&error), file = %status.path.display(), "could not write the status file");
    }
}

/// The member's figures as `--status-file` writes them: the member's id (when started from a
/// bundle), its key state (`next_seq`, `last_seq`, `group_key_version`), what it applied and
/// how (`messages_applied`, `applied_from_*`), its feedback and recovery (`nacks_sent`,
/// `state_checks`, `out_of_sync`, `resyncs_started`, `resyncs_failed`), its authentication
/// work (`signature_checks`, `signature_failures`, `manifests_verified`, `chunks_verified`),
/// the datagrams it received and rejected (`bad_mac` among them), whether it must register
/// again and why (`reregister_reason`, null while it need not), its relay failover (`relay`:
/// the relay it receives from, null for the GCKS or without a directory; `failover_moves` and
/// each reason's moves; `listen_moves`: moves of its group socket), and `applied`: `[seq, unix_us]` of the newest applied messages, oldest first.
pub fn status_json(
    member: Option<u64>,
    stats: &MemberStats,
    applied: &[(u64, u64)],
    must_reregister: bool,
) -> Value {
    let r = &stats.receiver;
    let m = &stats.messages;
    let d = &stats.datagrams;
    let f = &stats.failover;
    json!({
        "member": member,
        "pid": std::process::id(),
        "written_unix_us": unix_micros(SystemTime::now()),
        "next_seq": stats.next_seq,
        "last_seq": stats.next_seq.saturating_sub(1),
        "group_key_version": stats.group_key_version,
        "messages_applied": r.messages_applied,
        "applied_from_source": r.applied_from_source,
        "applied_from_decode": r.applied_from_decode,
        "applied_from_resync": r.applied_from_resync,
        "decode_failures": r.decode_failures,
        "nacks_sent": r.nacks_sent,
        "state_checks": r.state_checks,
        "out_of_sync": r.out_of_sync,
        "silences": r.silences,
        "signature_checks": m.signature_checks,
        "signature_failures": m.signature_failures,
        "manifests_verified": m.manifests_verified,
        "manifests_cached": m.manifests_cached,
        "chunks_verified": m.chunks_verified,
        "chunks_rejected": m.chunks_rejected,
        "datagrams_received": stats.datagrams_received,
        "datagrams_accepted": stats.datagrams_accepted,
        "datagrams_rejected": stats.datagrams_rejected,
        "dropped_before_mac": stats.dropped_before_mac,
        "simulated_drops": stats.simulated_drops,
        "bad_mac": d.bad_mac,
        "resyncs_started": stats.resyncs_started,
        "state_checks_started": stats.state_checks_started,
        "resyncs_failed": stats.resyncs_failed,
        "state_save_failures": stats.state_save_failures,
        "relay": stats.relay,
        "failover_moves": f.nack_moves + f.silence_moves + f.ordered_moves + f.unreachable_moves,
        "nack_moves": f.nack_moves,
        "silence_moves": f.silence_moves,
        "unreachable_moves": f.unreachable_moves,
        "ordered_moves": f.ordered_moves,
        "listen_moves": stats.listen_moves,
        "must_reregister": must_reregister,
        "reregister_reason": stats.must_reregister.map(|reason| reason.to_string()),
        "applied": applied,
    })
}

fn unix_micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
    })
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_reports_the_counters_and_applied_messages() {
        let mut stats = MemberStats {
            next_seq: 8,
            group_key_version: Some(7),
            datagrams_received: 100,
            datagrams_accepted: 91,
            datagrams_rejected: 9,
            resyncs_started: 2,
            ..MemberStats::default()
        };
        stats.receiver.messages_applied = 7;
        stats.receiver.applied_from_resync = 3;
        stats.messages.signature_checks = 14;
        stats.datagrams.bad_mac = 5;
        stats.datagrams.malformed_header = 4;
        let value = status_json(Some(42), &stats, &[(6, 1_000), (7, 2_000)], false);
        assert_eq!(value["member"], 42);
        assert_eq!(value["last_seq"], 7);
        assert_eq!(value["next_seq"], 8);
        assert_eq!(value["group_key_version"], 7);
        assert_eq!(value["messages_applied"], 7);
        assert_eq!(value["applied_from_resync"], 3);
        assert_eq!(value["signature_checks"], 14);
        assert_eq!(value["bad_mac"], 5);
        assert_eq!(value["datagrams_rejected"], 9);
        assert_eq!(value["resyncs_started"], 2);
        assert_eq!(value["must_reregister"], false);
        assert_eq!(value["reregister_reason"], Value::Null);
        assert_eq!(value["applied"], json!([[6, 1_000], [7, 2_000]]));
    }

    #[derive(Debug, clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: MemberArgs,
    }

    #[test]
    fn harness_flags_parse_and_a_zero_silence_timeout_is_refused() {
        use clap::Parser;
        let parsed = Wrapper::try_parse_from([
            "member",
            "--config",
            "m.toml",
            "--status-file",
            "m.json",
            "--silence-timeout-ms",
            "2000",
        ])
        .expect("parses");
        assert_eq!(parsed.args.silence_timeout_ms, Some(2000));
        assert_eq!(parsed.args.status_file, Some(PathBuf::from("m.json")));
        let zero =
            Wrapper::try_parse_from(["member", "--config", "m.toml", "--silence-timeout-ms", "0"]);
        assert!(zero.is_err());
    }

    #[test]
    fn status_file_keeps_the_newest_applied_and_replaces_the_file_whole() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("member.status.json");
        let mut file = StatusFile::new(path.clone());
        assert!(file.is_due());
        let epoch = UNIX_EPOCH + Duration::from_secs(1);
        for seq in 0..(STATUS_APPLIED_KEPT as u64 + 5) {
            file.record_applied(seq, epoch);
        }
        assert_eq!(file.applied.len(), STATUS_APPLIED_KEPT);
        assert_eq!(file.applied.front(), Some(&(5, 1_000_000)));
        file.write(&MemberStats::default(), true).expect("write");
        assert!(!file.is_due());
        let written: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
        assert_eq!(written["must_reregister"], true);
        assert_eq!(
            written["applied"].as_array().map(Vec::len),
            Some(STATUS_APPLIED_KEPT)
        );
        assert!(!dir.path().join("member.status.json.tmp").exists());
    }
}
