//! `rekeycast server`: one GCKS from a configuration file ([`ServerConfig`]), with the admin
//! interface of [`super::admin`] on a Unix socket. Runs until Ctrl-C or SIGTERM.

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::config::ServerConfig;
use anyhow::{bail, Context};
use rekeycast::engine::gcks::RolloverMode;
use rekeycast::gcks::{Gcks, GcksError, GcksEvent, GcksStats, LeaveOutcome};
use rekeycast::keyfile::{self, KeyOrigin};
use rekeycast::lkh::MemberId;
use serde_json::{json, Value};
use tracing::{error, info, warn};

use super::admin::Request;
use super::bundle;
use super::shutdown::ShutdownFlag;

/// The flags of `rekeycast server`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// The server's configuration file (TOML; see `rekeycast.example.toml`).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Runs `rekeycast server`.
pub fn run(args: &ServerArgs) -> anyhow::Result<ExitCode> {
    let config = ServerConfig::load(&args.config)
        .with_context(|| format!("configuration {}", args.config.display()))?;
    super::logging::init(&config.log.filter)?;
    let shutdown = ShutdownFlag::install()?;
    let state_dir = config.state_dir();
    let key_path = state_dir.join(keyfile::SIGNING_KEY_FILE);
    let (gcks, origin) = if config.gcks.state_dir.is_some() {
        // A durable GCKS takes its key from the key files, matched to its stored state (a
        // signing-key rollover interrupted by a crash is finished or resumed), and can roll it.
        let origin = match std::fs::symlink_metadata(&key_path) {
            Ok(_) => KeyOrigin::Loaded,
            Err(_) => KeyOrigin::Generated,
        };
        let gcks = Gcks::start_with_key_files(config.gcks.clone())
            .with_context(|| format!("starting the GCKS engine on {}", state_dir.display()))?;
        (gcks, origin)
    } else {
        let (signing_key, origin) = keyfile::load_or_generate(&state_dir)
            .with_context(|| format!("signing key in {}", state_dir.display()))?;
        let gcks =
            Gcks::start(config.gcks.clone(), signing_key).context("starting the GCKS engine")?;
        (gcks, origin)
    };
    let public_key = bundle::hex(gcks.public_key().as_bytes());
    // The public key on standard output too, for the operator to hand to members' products
    // out of band (the private key is never printed).
    println!(
        "GCKS public key (Ed25519): {public_key} ({} {})",
        match origin {
            KeyOrigin::Generated => "generated into",
            KeyOrigin::Loaded => "loaded from",
        },
        key_path.display()
    );
    match origin {
        KeyOrigin::Generated => info!(
            public_key = %public_key,
            file = %key_path.display(),
            "generated a new GCKS signing key (mode 0600)"
        ),
        KeyOrigin::Loaded => info!(
            public_key = %public_key,
            file = %key_path.display(),
            "loaded the GCKS signing key"
        ),
    }
    let batch_interval = config.gcks.batch_interval;
    let gcks = Arc::new(gcks);
    info!(
        group = %config.gcks.multicast.group,
        feedback = %gcks.local_addr(),
        admin_socket = %config.admin_socket.display(),
        "GCKS running"
    );
    let events = gcks.events().clone();
    let logger = thread::Builder::new()
        .name("gcks-events".into())
        .spawn(move || {
            for event in events.iter() {
                log_event(&event);
            }
        })
        .context("starting the event logger")?;
    let (tcp, http) = gcks.resync_addrs();
    if tcp.is_some() || http.is_some() {
        info!(tcp = ?tcp, http = ?http, "resync endpoints listening");
    }
    let listener = bind_admin(&config.admin_socket)?;
    let mut exit = ExitCode::SUCCESS;
    while !shutdown.is_set() {
        if let Some(reason) = gcks.poisoned() {
            // The engine stopped for good (the event logger said why): so does the server.
            error!(%reason, "the GCKS engine is poisoned; exiting");
            exit = ExitCode::FAILURE;
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let gcks = Arc::clone(&gcks);
                let spawned = thread::Builder::new()
                    .name("admin".into())
                    .spawn(move || serve_admin(stream, &gcks, batch_interval));
                if let Err(error) = spawned {
                    warn!(error = %rekeycast::report::Chain(&error), "could not start an admin connection's thread");
                }
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(error) => {
                warn!(error = %rekeycast::report::Chain(&error), "admin socket accept failed");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    info!("shutting down");
    if let Err(error) = fs::remove_file(&config.admin_socket) {
        warn!(error = %rekeycast::report::Chain(&error), "removing the admin socket");
    }
    match Arc::try_unwrap(gcks) {
        Ok(gcks) => match gcks.shutdown() {
            Ok(()) => {}
            Err(GcksError::Poisoned(_)) => exit = ExitCode::FAILURE,
            Err(error) => return Err(error).context("stopping the GCKS engine"),
        },
        // An admin connection still holds it (a join waiting for its batch): the engine stops
        // when that thread lets go, or with the process.
        Err(_) => warn!("an admin request is still in progress; exiting without waiting"),
    }
    if logger.is_finished() {
        let _ = logger.join();
    }
    info!("stopped");
    Ok(exit)
}

/// The GCKS's figures as JSON (the admin `status` answer).
pub fn stats_json(stats: &GcksStats) -> Value {
    let s = &stats.sender;
    let lag = stats.loop_lag_us;
    let recent = stats.loop_lag_recent_us;
    json!({
        "members": stats.members,
        "relays": stats.relays,
        "seq": stats.seq,
        "group_key_version": stats.group_key_version,
        "pending": stats.pending,
        "datagrams_sent": stats.datagrams_sent,
        "send_blocked": stats.send_blocked,
        "repair_orders": stats.repair_orders,
        "loop_lag_us": {"p50": lag.p50, "p90": lag.p90, "p99": lag.p99, "max": lag.max,
                        "samples": lag.count},
        "loop_lag_recent_us": {"p50": recent.p50, "p90": recent.p90, "p99": recent.p99,
                               "max": recent.max, "samples": recent.count},
        "sender": {
            "manifests_sent": s.manifests_sent,
            "source_symbols_sent": s.source_symbols_sent,
            "proactive_symbols_sent": s.proactive_symbols_sent,
            "repair_symbols_sent": s.repair_symbols_sent,
            "heartbeats_sent": s.heartbeats_sent,
            "advertisements_sent": s.advertisements_sent,
            "bytes_sent": s.bytes_sent,
            "source_bytes_sent": s.source_bytes_sent,
            "nacks_received": s.nacks_received,
            "probe_replies_received": s.probe_replies_received,
            "replayed_feedback": s.replayed_feedback,
            "stale_feedback": s.stale_feedback,
            "repair_orders": s.repair_orders,
            "rejected": s.rejected,
            "ignored": s.ignored,
            "buffer_too_small": s.buffer_too_small,
            "fec_errors": s.fec_errors,
        },
    })
}

fn log_event(event: &GcksEvent) {
    match event {
        GcksEvent::Rekeyed {
            seq,
            joined,
            left,
            members,
            chunks,
            build_time,
        } => info!(
            seq,
            joined,
            left,
            members,
            chunks,
            build_ms = build_time.as_secs_f64() * 1000.0,
            "rekey message built"
        ),
        GcksEvent::Queued { seq } => info!(seq, "sending message"),
        GcksEvent::Sent { seq } => info!(seq, "initial transmission sent"),
        GcksEvent::BatchFailed {
            seq,
            attempt,
            reason,
            detail,
            retry_in,
        } => warn!(
            seq,
            attempt,
            %reason,
            detail,
            retry_in_ms = retry_in.map(|d| d.as_millis() as u64),
            "batch failed, nothing committed"
        ),
        GcksEvent::Poisoned { reason } => error!(%reason, "GCKS engine poisoned; stopped"),
        other => info!(?other, "event"),
    }
}

/// Binds the admin socket with mode 0600, replacing a stale socket file (one no server
/// answers on); refuses to replace anything else.
fn bind_admin(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(metadata) = fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            bail!(
                "admin_socket {}: exists and is not a socket; not replacing it",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            bail!(
                "admin_socket {}: another server is answering on it",
                path.display()
            );
        }
        fs::remove_file(path)
            .with_context(|| format!("removing the stale admin socket {}", path.display()))?;
        info!(path = %path.display(), "removed a stale admin socket");
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("admin_socket {}: binding", path.display()))?;
    // Connecting needs write permission on the socket file: 0600 keeps it to this user (the
    // state directory, mode 0700, closes the moment between bind and chmod as well).
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("admin_socket {}: setting mode 0600", path.display()))?;
    listener
        .set_nonblocking(true)
        .context("admin socket: nonblocking")?;
    Ok(listener)
}

/// Answers one admin connection's requests, a line each, until it closes.
fn serve_admin(stream: UnixStream, gcks: &Gcks, batch_interval: Duration) {
    if let Err(error) = stream.set_nonblocking(false) {
        warn!(error = %rekeycast::report::Chain(&error), "admin connection");
        return;
    }
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(error) => {
            warn!(error = %rekeycast::report::Chain(&error), "admin connection");
            return;
        }
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => answer(request, gcks, batch_interval),
            Err(error) => json!({"ok": false, "error": format!("bad request: {error}")}),
        };
        let mut text = response.to_string();
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

fn answer(request: Request, gcks: &Gcks, batch_interval: Duration) -> Value {
    let outcome = match request {
        Request::Join {
            member,
            bundle_path,
            relay,
        } => join(gcks, member, relay, &bundle_path, batch_interval),
        Request::Leave { member } => gcks
            .leave(MemberId(member))
            .map(|outcome| {
                info!(member, ?outcome, "admin: leave");
                match outcome {
                    LeaveOutcome::Revoked { durable } => json!({
                        "ok": true, "op": "leave", "member": member, "outcome": "revoked",
                        "durable": durable,
                        "note": "journaled; removed in the next batch, also after a crash"}),
                    LeaveOutcome::JoinCancelled => json!({
                        "ok": true, "op": "leave", "member": member,
                        "outcome": "join_cancelled",
                        "note": "its pending join is cancelled; no bundle is issued"}),
                    _ => json!({
                        "ok": true, "op": "leave", "member": member,
                        "outcome": "already_leaving",
                        "note": "a leave of this member is already pending"}),
                }
            })
            .map_err(anyhow::Error::from),
        Request::Rekey => gcks
            .rekey_now()
            .map(|()| {
                info!("admin: rekey now");
                json!({"ok": true, "op": "rekey"})
            })
            .map_err(anyhow::Error::from),
        Request::RollKey {
            compromised,
            announcements,
        } => {
            let mode = if compromised {
                RolloverMode::Compromised
            } else {
                RolloverMode::Planned { announcements }
            };
            gcks.roll_signing_key(mode)
                .map(|from_seq| {
                    warn!(compromised, from_seq, "admin: signing-key rollover started");
                    json!({
                        "ok": true,
                        "op": "roll_key",
                        "compromised": compromised,
                        "from_seq": from_seq,
                    })
                })
                .map_err(anyhow::Error::from)
        }
        Request::Status => gcks
            .stats()
            .map(|stats| {
                let mut value = stats_json(&stats);
                value["ok"] = json!(true);
                value["op"] = json!("status");
                value
            })
            .map_err(anyhow::Error::from),
    };
    outcome.unwrap_or_else(|error| json!({"ok": false, "error": format!("{error:#}")}))
}

fn join(
    gcks: &Gcks,
    member: u64,
    relay: bool,
    path: &Path,
    batch_interval: Duration,
) -> anyhow::Result<Value> {
    info!(member, relay, bundle = %path.display(), "admin: join");
    let pending = if relay {
        gcks.join_relay(MemberId(member))?
    } else {
        gcks.join(MemberId(member))?
    };
    // The bundle comes once the batch is built: at most a batch interval plus the build.
    let bundle = pending
        .recv_timeout(batch_interval + Duration::from_secs(60))
        .context("timed out waiting for the batch that admits the member")?
        .context("the GCKS refused the join")?;
    let bytes = bundle::to_bytes(&bundle)?;
    keyfile::write_bundle(path, &bytes)
        .with_context(|| format!("writing the bundle to {}", path.display()))?;
    info!(member, first_seq = bundle.first_seq, bundle = %path.display(), "bundle written");
    Ok(
        json!({"ok": true, "op": "join", "member": member, "relay": relay,
              "first_seq": bundle.first_seq, "bundle_path": path}),
    )
}
