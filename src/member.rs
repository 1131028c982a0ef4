//! The embedding API for a member: [`Member`], one group member's rekey receiver running its
//! event loop on its own thread.
//!
//! Started from the registration bundle the product's registration protocol delivered, it
//! joins the multicast group, runs the verifier pipeline, repairs what it lost with NACKs and
//! hands the product its key events ([`ReceiverEvent`]: new group key, new Data SA, out of
//! sync, state check needed, keys that cannot open the member's own chunk, must re-register,
//! whose reason [`MemberStats::must_reregister`] keeps). Resync transport is the product's or the
//! resync client's ([`Member::resync`] takes what an endpoint served and verifies it like
//! multicast traffic). With [`MemberConfig::state_file`] set it saves its keys after every
//! applied message, and [`Member::resume`] brings it back from them after a restart, without
//! registering again. Products with their own runtime can drive
//! [`crate::session::ReceiverSession`] themselves instead.
//!
//! ```
//! use std::time::Duration;
//! use rekeycast::gcks::{Gcks, GcksConfig};
//! use rekeycast::lkh::MemberId;
//! use rekeycast::member::{Member, MemberConfig};
//! use rekeycast::session::ReceiverEvent;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let group = "239.1.2.4:7401".parse()?;
//! let gcks = Gcks::start(
//!     GcksConfig::loopback(group),
//!     ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
//! )?;
//! let bundle = gcks.join(MemberId(7))?.recv_timeout(Duration::from_secs(10))??;
//! let member = Member::start(&bundle, MemberConfig::loopback(group, gcks.local_addr()))?;
//! while let Ok(event) = member.events().recv_timeout(Duration::from_secs(10)) {
//!     if let ReceiverEvent::NewDataSa { seq, data_sa } = event {
//!         println!("message {seq}: traffic key SPI {:#x}", data_sa.spi);
//!         break;
//!     }
//! }
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::auth::datagram::DatagramCounters;
use crate::auth::message::MessageCounters;
use crate::gcks::{EngineError, LagSummary};
use crate::io::handle::LoopHandle;
use crate::io::socket::MulticastConfig;
use crate::lkh::RegistrationBundle;
use crate::session::receiver::{ResyncError, StateVerdict};
use crate::session::{
    ReceiverConfig, ReceiverCounters, ReceiverEvent, ReceiverSession, ReregisterReason,
};
use crate::sim::Loss;

/// Configuration of a [`Member`].
#[derive(Debug, Clone)]
pub struct MemberConfig {
    /// The multicast group, interface and loopback of the rekey traffic.
    pub multicast: MulticastConfig,
    /// The unicast address the member sends NACKs and probe replies from (port 0: any).
    pub bind: SocketAddr,
    /// The receiver session's configuration; its `feedback_addr` is the GCKS's (or relay's)
    /// address.
    pub receiver: ReceiverConfig,
    /// Loss applied to received group datagrams, with its seed: for demos and tests on a
    /// loopback network that loses nothing. `None` (the default) in a deployment.
    pub simulated_loss: Option<(Loss, u64)>,
    /// Resync endpoints, tried in order (a relay first, then the GCKS). Empty (the default):
    /// the member raises [`ReceiverEvent::OutOfSync`] and [`ReceiverEvent::StateCheckNeeded`]
    /// and the product resyncs it ([`Member::resync`], [`Member::state_answer`]).
    pub resync_endpoints: Vec<crate::io::resync_client::Endpoint>,
    /// Bound on each connect, read and write of a resync exchange.
    pub resync_timeout: Duration,
    /// The longest random wait before a resync, against out-of-sync implosion: each member
    /// waits a uniform delay in `[0, min(this, group size / resync_capacity))`.
    pub resync_max_delay: Duration,
    /// Resyncs per second the endpoints can serve, to scale that wait with the group size.
    pub resync_capacity: f64,
    /// Rounds over the endpoint list before a resync gives up (with exponential backoff).
    pub resync_attempts: u32,
    /// Where the member saves its keys and last sequence number after every applied message
    /// (durably, mode 0600, before the message's events reach the product), so that after a
    /// restart [`Member::resume`] continues from them without registering again. `None` (the
    /// default): nothing is saved.
    pub state_file: Option<PathBuf>,
}

impl MemberConfig {
    /// A member of multicast group `group` on the loopback interface, sending its feedback to
    /// `feedback` (the GCKS's [`crate::gcks::Gcks::local_addr`]).
    pub fn loopback(group: SocketAddr, feedback: SocketAddr) -> Self {
        let multicast = MulticastConfig::loopback_v4(group);
        Self {
            multicast,
            bind: SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            receiver: ReceiverConfig::new(feedback),
            simulated_loss: None,
            resync_endpoints: Vec::new(),
            resync_timeout: Duration::from_secs(5),
            resync_max_delay: Duration::from_secs(10),
            resync_capacity: 1_000.0,
            resync_attempts: 5,
            state_file: None,
        }
    }
}

/// A snapshot of a member's figures.
#[derive(Debug, Clone, Default)]
pub struct MemberStats {
    /// The session's counters.
    pub receiver: ReceiverCounters,
    /// Header, MAC and window rejections.
    pub datagrams: DatagramCounters,
    /// Signature checks made and failed.
    pub messages: MessageCounters,
    /// The next message the member needs.
    pub next_seq: u64,
    /// The order key of the member's leaf (what it asks a resync endpoint for its chunk with).
    pub order_key: u32,
    /// The version of the member's group key, once it has one.
    pub group_key_version: Option<u32>,
    /// Group datagrams dropped by the simulated loss.
    pub simulated_drops: u64,
    /// Datagrams received from the sockets.
    pub datagrams_received: u64,
    /// Event-loop lag, microseconds.
    pub loop_lag_us: LagSummary,
    /// Resync exchanges started with the endpoints, and of those that failed on every one.
    pub resyncs_started: u64,
    /// Resync exchanges that failed on every endpoint.
    pub resyncs_failed: u64,
    /// Saves of the member's keys to [`MemberConfig::state_file`] that failed (the loop goes
    /// on; the file keeps the last state saved).
    pub state_save_failures: u64,
    /// Why the member must register again, once it must ([`ReceiverEvent::MustReregister`]):
    /// its messages left the history, or its keys cannot open its own chunk
    /// ([`ReceiverEvent::KeysCannotOpen`]). It then takes no traffic and starts no resync.
    pub must_reregister: Option<ReregisterReason>,
}

pub(crate) enum MemberCommand {
    Stats(Sender<MemberStats>),
    Resync(Vec<(Vec<u8>, Vec<u8>)>, Sender<Result<u64, ResyncError>>),
    StateAnswer(Vec<u8>, Sender<Result<StateVerdict, ResyncError>>),
    BeyondHistory,
    /// A resync thread's outcome.
    Fetched(crate::io::resync_client::Fetched),
    /// A state-check thread's answer.
    StateFetched(Vec<u8>),
    /// A resync or state-check thread gave up.
    FetchFailed,
    Shutdown,
}

/// One member's rekey receiver, its loop running on its own thread.
#[derive(Debug)]
pub struct Member {
    handle: LoopHandle<MemberCommand>,
    events: Receiver<ReceiverEvent>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for MemberCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stats(_) => "Stats",
            Self::Resync(..) => "Resync",
            Self::StateAnswer(..) => "StateAnswer",
            Self::BeyondHistory => "BeyondHistory",
            Self::Fetched(_) => "Fetched",
            Self::StateFetched(_) => "StateFetched",
            Self::FetchFailed => "FetchFailed",
            Self::Shutdown => "Shutdown",
        })
    }
}

impl Member {
    /// Joins the group and starts the loop.
    pub fn start(bundle: &RegistrationBundle, config: MemberConfig) -> Result<Self, EngineError> {
        let session = ReceiverSession::new(bundle, config.receiver.clone())?;
        Self::spawn(session, config)
    }

    /// Comes back after the member's own restart: loads the keys and last sequence number
    /// saved in `state` (see [`MemberConfig::state_file`], normally the same path), joins the
    /// group and starts the loop, without registering again. Messages missed while down come
    /// by resync from [`MemberConfig::resync_endpoints`] (or the product's, after
    /// [`ReceiverEvent::StateCheckNeeded`]). The first event re-announces the Data SA in
    /// force ([`ReceiverEvent::NewDataSa`] of the last message applied).
    ///
    /// A corrupt or truncated file is an error ([`EngineError::MemberState`]), never a fresh
    /// start; so are keys saved before any message was applied (such a member keeps its
    /// registration bundle and uses [`Member::start`]).
    pub fn resume(state: &Path, config: MemberConfig) -> Result<Self, EngineError> {
        let keys = crate::persist::load_member_keys(state)?;
        let session = ReceiverSession::resume(keys, config.receiver.clone())?;
        Self::spawn(session, config)
    }

    fn spawn(session: ReceiverSession, config: MemberConfig) -> Result<Self, EngineError> {
        let started = crate::io::member_loop::spawn(session, config)?;
        Ok(Self {
            handle: LoopHandle::new(started.commands, started.waker, started.thread, || {
                MemberCommand::Shutdown
            }),
            events: started.events,
            local_addr: started.local_addr,
        })
    }

    /// The member's key events.
    pub fn events(&self) -> &Receiver<ReceiverEvent> {
        &self.events
    }

    /// The unicast address the member's feedback comes from.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The member's figures.
    pub fn stats(&self) -> Result<MemberStats, EngineError> {
        self.handle.request(MemberCommand::Stats)
    }

    /// Resync items, in sequence order from the member's next message: each a signed manifest
    /// and the member's chunk, as a resync endpoint served them. They are verified like
    /// multicast traffic. Returns the last sequence number applied, or the first refusal.
    pub fn resync(
        &self,
        items: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Result<u64, ResyncError>, EngineError> {
        self.handle
            .request(|reply| MemberCommand::Resync(items, reply))
    }

    /// A resync endpoint's state answer (its latest signed manifest), after
    /// [`ReceiverEvent::StateCheckNeeded`].
    pub fn state_answer(
        &self,
        manifest: Vec<u8>,
    ) -> Result<Result<StateVerdict, ResyncError>, EngineError> {
        self.handle
            .request(|reply| MemberCommand::StateAnswer(manifest, reply))
    }

    /// A resync endpoint said the member's messages left its history: it must re-register.
    pub fn beyond_history(&self) -> Result<(), EngineError> {
        self.handle.send(MemberCommand::BeyondHistory)
    }

    /// Leaves the group and waits for the loop's thread.
    pub fn shutdown(mut self) -> Result<(), EngineError> {
        self.handle.stop()
    }
}
