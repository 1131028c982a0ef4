//! `rekeycast member`: one member from a configuration file ([`MemberConfig`]) and the
//! registration bundle `rekeycast admin join` wrote, or, after a restart, from the keys it
//! saved in its state file (`--state` or `state_file`). Logs its key events (sequence numbers,
//! versions and SPIs, never key bytes) and runs until Ctrl-C or SIGTERM, or with
//! `--exit-after-seq N` until it applied message N (exit 0); it exits 3 when it must
//! re-register.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use crossbeam_channel::RecvTimeoutError;
use rekeycast::config::MemberConfig;
use rekeycast::member::{self, Member};
use rekeycast::session::ReceiverEvent;
use tracing::{error, info, warn};

use super::shutdown::ShutdownFlag;

/// The exit status when the member must re-register.
pub const EXIT_MUST_REREGISTER: u8 = 3;

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
}

/// Runs `rekeycast member`.
pub fn run(args: &MemberArgs) -> anyhow::Result<ExitCode> {
    let config = MemberConfig::load(&args.config)
        .with_context(|| format!("configuration {}", args.config.display()))?;
    super::logging::init(&config.log.filter)?;
    let shutdown = ShutdownFlag::install()?;
    let state_file = args.state.clone().or_else(|| config.state_file.clone());
    let mut engine_config = member::MemberConfig::loopback(config.group.multicast, config.feedback);
    engine_config.multicast = super::multicast_config(&config.group)?;
    engine_config.bind = match config.feedback {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    engine_config.receiver = config.receiver_config();
    engine_config.resync_endpoints = config
        .resync_endpoints
        .iter()
        .map(|endpoint| endpoint.parse())
        .collect::<Result<_, _>>()
        .context("resync_endpoints")?;
    engine_config.state_file = state_file.clone();
    let member = match state_file.filter(|path| path.exists()) {
        Some(path) => {
            let member = Member::resume(&path, engine_config)
                .with_context(|| format!("resuming from the member state {}", path.display()))?;
            let next_seq = member.stats().context("member engine")?.next_seq;
            info!(
                state = %path.display(),
                next_seq,
                group = %config.group.multicast,
                feedback = %config.feedback,
                "member resumed from its saved keys"
            );
            member
        }
        None => {
            let bundle_path = args.bundle.clone().unwrap_or_else(|| config.bundle.clone());
            let bundle = super::bundle::read(&bundle_path).context("registration bundle")?;
            let member =
                Member::start(&bundle, engine_config).context("starting the member engine")?;
            info!(
                member = bundle.member.0,
                first_seq = bundle.first_seq,
                group = %config.group.multicast,
                feedback = %config.feedback,
                "member running"
            );
            member
        }
    };
    loop {
        if shutdown.is_set() {
            info!("shutting down");
            member.shutdown().context("stopping the member engine")?;
            return Ok(ExitCode::SUCCESS);
        }
        let event = match member.events().recv_timeout(Duration::from_millis(200)) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                member.shutdown().context("the member engine stopped")?;
                bail!("the member engine stopped");
            }
        };
        match event {
            ReceiverEvent::GroupKeyUpdated { seq, version } => {
                info!(seq, version, "group key updated");
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
            ReceiverEvent::MustReregister => {
                error!("the messages this member lacks left the GCKS's history: it must register again");
                let _ = member.shutdown();
                return Ok(ExitCode::from(EXIT_MUST_REREGISTER));
            }
            _ => info!("other key event"),
        }
    }
}
