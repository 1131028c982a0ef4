//! The embedding API for a member: [`Member`], one group member's rekey receiver running its
//! event loop on its own thread.
//!
//! Started from the registration bundle the product's registration protocol delivered, it
//! joins the multicast group, runs the verifier pipeline, repairs what it lost with NACKs and
//! hands the product its key events ([`ReceiverEvent`]: new group key, new Data SA, out of
//! sync, state check needed, must re-register). Resync transport is the product's or the
//! resync client's ([`Member::resync`] takes what an endpoint served and verifies it like
//! multicast traffic). Products with their own runtime can drive
//! [`crate::session::ReceiverSession`] themselves instead.
//!
//! ```no_run
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
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::auth::datagram::DatagramCounters;
use crate::auth::message::MessageCounters;
use crate::gcks::{EngineError, LagSummary};
use crate::io::socket::MulticastConfig;
use crate::lkh::RegistrationBundle;
use crate::session::receiver::{ResyncError, StateVerdict};
use crate::session::{ReceiverConfig, ReceiverCounters, ReceiverEvent};
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
}

pub(crate) enum MemberCommand {
    Stats(Sender<MemberStats>),
    Resync(Vec<(Vec<u8>, Vec<u8>)>, Sender<Result<u64, ResyncError>>),
    StateAnswer(Vec<u8>, Sender<Result<StateVerdict, ResyncError>>),
    BeyondHistory,
    Shutdown,
}

/// One member's rekey receiver, its loop running on its own thread.
#[derive(Debug)]
pub struct Member {
    commands: Sender<MemberCommand>,
    waker: Arc<mio::Waker>,
    events: Receiver<ReceiverEvent>,
    thread: Option<JoinHandle<Result<(), EngineError>>>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for MemberCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stats(_) => "Stats",
            Self::Resync(..) => "Resync",
            Self::StateAnswer(..) => "StateAnswer",
            Self::BeyondHistory => "BeyondHistory",
            Self::Shutdown => "Shutdown",
        })
    }
}

impl Member {
    /// Joins the group and starts the loop.
    pub fn start(bundle: &RegistrationBundle, config: MemberConfig) -> Result<Self, EngineError> {
        let started = crate::io::member_loop::spawn(bundle, config)?;
        Ok(Self {
            commands: started.commands,
            waker: started.waker,
            events: started.events,
            thread: Some(started.thread),
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
        let (reply, stats) = crossbeam_channel::bounded(1);
        self.send(MemberCommand::Stats(reply))?;
        stats
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| EngineError::Gone)
    }

    /// Resync items, in sequence order from the member's next message: each a signed manifest
    /// and the member's chunk, as a resync endpoint served them. They are verified like
    /// multicast traffic. Returns the last sequence number applied, or the first refusal.
    pub fn resync(
        &self,
        items: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Result<u64, ResyncError>, EngineError> {
        let (reply, outcome) = crossbeam_channel::bounded(1);
        self.send(MemberCommand::Resync(items, reply))?;
        outcome
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| EngineError::Gone)
    }

    /// A resync endpoint's state answer (its latest signed manifest), after
    /// [`ReceiverEvent::StateCheckNeeded`].
    pub fn state_answer(
        &self,
        manifest: Vec<u8>,
    ) -> Result<Result<StateVerdict, ResyncError>, EngineError> {
        let (reply, outcome) = crossbeam_channel::bounded(1);
        self.send(MemberCommand::StateAnswer(manifest, reply))?;
        outcome
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| EngineError::Gone)
    }

    /// A resync endpoint said the member's messages left its history: it must re-register.
    pub fn beyond_history(&self) -> Result<(), EngineError> {
        self.send(MemberCommand::BeyondHistory)
    }

    /// Leaves the group and waits for the loop's thread.
    pub fn shutdown(mut self) -> Result<(), EngineError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), EngineError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let _ = self.commands.send(MemberCommand::Shutdown);
        let _ = self.waker.wake();
        thread.join().map_err(|_| EngineError::Panicked)?
    }

    fn send(&self, command: MemberCommand) -> Result<(), EngineError> {
        self.commands.send(command).map_err(|_| EngineError::Gone)?;
        self.waker.wake().map_err(EngineError::Io)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
