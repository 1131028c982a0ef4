//! The `rekey-relay` binary: carries a group's rekeys into another network segment and repairs
//! locally (RFC 4046 5.5, Figure 3).
//!
//! `rekey-relay --config FILE [--bundle FILE]` runs one relay ([`rekeycast::relay::Relay`])
//! from a configuration file ([`RelayConfig`], annotated example `rekey-relay.example.toml`).
//! It resumes from the keys and messages saved in its state directory when there are any (no
//! new registration; its resync endpoints serve the stored messages at once), else it starts
//! from the registration bundle `rekeycast admin join` wrote for it. Logs go to standard error
//! (`tracing`, filtered by `RUST_LOG` or `log.filter`); once the sockets are bound, one line
//! `rekey-relay ready ...` on standard output gives the bound addresses. The HTTP resync
//! endpoint serves `/metrics` (Prometheus text) and `/healthz`.
//!
//! Exit status: 0 after SIGTERM or SIGINT (the keys are saved first), 1 on an error (a
//! registration bundle that fails its integrity check among them), 3 when the relay must
//! register again because the messages it lacks left the GCKS's history, 4 when its keys
//! cannot open its own authenticated chunk (its bundle or saved keys are not the GCKS's, or
//! it was removed): it must register again too.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use crossbeam_channel::RecvTimeoutError;
use rekeycast::relay::{Relay, RelayEvent};
use rekeycast::resync::relay_store::KEYS_FILE;
use rekeycast::session::ReceiverEvent;
use rekeycast_cli::config::RelayConfig;
use rekeycast_cli::{bundle, logging, shutdown};
use tracing::{error, info, warn};

/// The exit status when the relay must register again because the messages it lacks left the
/// GCKS's history.
const EXIT_MUST_REREGISTER: u8 = 3;

/// The exit status when the relay's keys cannot open its own authenticated chunk.
const EXIT_KEYS_CANNOT_OPEN: u8 = 4;

/// rekey-relay: hierarchical rekey distribution with authenticated local repair.
#[derive(Debug, Parser)]
#[command(name = "rekey-relay", version, about, long_about = None)]
struct Cli {
    /// The relay's TOML configuration file (see `rekey-relay.example.toml`).
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// The relay's registration bundle (instead of the configuration's `bundle`); read only
    /// when the state directory holds no saved keys.
    #[arg(long, value_name = "FILE")]
    bundle: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("rekey-relay: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let config = RelayConfig::load(&cli.config)
        .with_context(|| format!("configuration {}", cli.config.display()))?;
    logging::init(&config.log.filter)?;
    let shutdown = shutdown::ShutdownFlag::install()?;
    let engine_config = config.engine_config();
    let state_dir = config.state_dir();
    let relay = if state_dir.join(KEYS_FILE).exists() {
        let relay = Relay::resume(&state_dir, engine_config).with_context(|| {
            format!("resuming from the state directory {}", state_dir.display())
        })?;
        let stats = relay.stats().context("relay engine")?;
        info!(
            state_dir = %state_dir.display(),
            next_seq = stats.next_seq,
            held = ?stats.held,
            "relay resumed from its saved keys and history"
        );
        relay
    } else {
        let path = cli.bundle.clone().unwrap_or_else(|| config.bundle.clone());
        let bundle = bundle::read(&path).context("registration bundle")?;
        let relay = Relay::start(&bundle, engine_config).context("starting the relay")?;
        info!(
            member = bundle.member.0,
            first_seq = bundle.first_seq,
            bundle = %path.display(),
            "relay started from its registration bundle"
        );
        relay
    };
    let (tcp, http) = relay.resync_addrs();
    let show =
        |addr: Option<std::net::SocketAddr>| addr.map_or("none".to_string(), |a| a.to_string());
    info!(
        upstream = %config.relay.upstream.group,
        downstream = %config.relay.downstream.group,
        feedback = %relay.feedback_addr(),
        resync_tcp = %show(tcp),
        resync_http = %show(http),
        "relay running"
    );
    println!(
        "rekey-relay ready upstream={} downstream={} feedback={} upstream_from={} resync_tcp={} \
         resync_http={}",
        config.relay.upstream.group,
        config.relay.downstream.group,
        relay.feedback_addr(),
        relay.upstream_addr(),
        show(tcp),
        show(http)
    );
    loop {
        if shutdown.is_set() {
            info!("shutting down");
            relay.shutdown().context("stopping the relay")?;
            info!("stopped");
            return Ok(ExitCode::SUCCESS);
        }
        let event = match relay.events().recv_timeout(Duration::from_millis(200)) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                relay.shutdown().context("the relay engine stopped")?;
                bail!("the relay engine stopped");
            }
        };
        match event {
            RelayEvent::Forwarded { seq, chunks } => info!(seq, chunks, "message forwarded"),
            RelayEvent::NotForwarded { seq } => warn!(
                seq,
                "message got by resync only: not forwarded (members resync it from the GCKS)"
            ),
            RelayEvent::ForwardFailed { seq, reason } => {
                error!(seq, reason, "verified message could not be forwarded");
            }
            RelayEvent::Upstream(ReceiverEvent::GroupKeyUpdated { seq, version }) => {
                info!(seq, version, "relay keys updated");
            }
            RelayEvent::Upstream(ReceiverEvent::OutOfSync { from_seq }) => {
                warn!(from_seq, "relay out of sync: resyncing from upstream");
            }
            RelayEvent::Upstream(ReceiverEvent::StateCheckNeeded { claimed_seq }) => {
                info!(claimed_seq, "relay asks upstream for the group's state");
            }
            RelayEvent::Upstream(ReceiverEvent::KeysCannotOpen { seq, error }) => {
                error!(
                    seq,
                    error = %rekeycast::report::Chain(&error),
                    "this relay's keys cannot open its own authenticated chunk of message {seq}: \
                     its registration bundle (or saved keys) is corrupt or not the GCKS's, or it \
                     was removed from the group; it must register again (clear the state \
                     directory and join it anew)"
                );
                let _ = relay.shutdown();
                return Ok(ExitCode::from(EXIT_KEYS_CANNOT_OPEN));
            }
            RelayEvent::Upstream(ReceiverEvent::MustReregister) => {
                error!(
                    "this relay must register again (clear the state directory and join it \
                     anew)"
                );
                let _ = relay.shutdown();
                return Ok(ExitCode::from(EXIT_MUST_REREGISTER));
            }
            _ => {}
        }
    }
}
