//! The embedding API for a relay: [`Relay`], one relay's event loop on its own thread, over
//! real sockets (what the `rekey-relay` binary runs).
//!
//! It drives a [`RelaySession`] (the sans-IO relay session of `rekeycast-proto`) with a mio loop
//! (`crate::io::relay_loop`): the upstream group's receiver socket and a unicast socket for
//! the relay's NACKs upstream; the downstream group's sender socket, whose unicast address is
//! its members' feedback address (their NACKs and probe replies come in there, rate limited
//! per source address); the TCP and HTTP resync endpoints serving the relay's history (with
//! `/metrics` and `/healthz`). When the relay itself falls behind it resyncs its own chunk
//! from [`RelayEngineConfig::upstream_resync`] as a member does. With a state directory
//! ([`RelayEngineConfig::state_dir`]) it stores each message it forwards and saves its keys
//! after each applied message ([`crate::resync::relay_store`]), and [`Relay::resume`] brings
//! it back from them, serving its stored history at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::Receiver;
use rekeycast_nack::AggregatorStats;

use super::{RelayConfig, RelayCounters, RelayError, RelayEvent, RelaySession};
use crate::auth::datagram::DatagramCounters;
use crate::auth::message::MessageCounters;
use crate::gcks::{EngineError, LagSummary};
use crate::io::handle::LoopHandle;
use crate::io::relay_loop::RelayCommand;
use crate::io::resync_client::Endpoint;
use crate::io::resync_server::EndpointCounters;
use crate::io::socket::MulticastConfig;
use crate::lkh::RegistrationBundle;
use crate::resync::limits::Limits;
use crate::resync::relay_store::{RelayStore, RelayStoreError};
use crate::session::sender::SenderCounters;
use crate::session::ReceiverCounters;
use crate::sim::Loss;

/// Configuration of a [`Relay`].
#[derive(Debug, Clone)]
pub struct RelayEngineConfig {
    /// The upstream group (the GCKS's, or the upstream relay's) and the interface to join it
    /// on.
    pub upstream: MulticastConfig,
    /// The unicast address the relay sends its NACKs and probe replies upstream from (port 0:
    /// any). The upstream sender's address is [`RelayConfig::upstream`]'s `feedback_addr`.
    pub upstream_bind: SocketAddr,
    /// The downstream group (the relay's own), its interface, TTL and loopback.
    pub downstream: MulticastConfig,
    /// The unicast address the relay sends downstream from and takes its members' NACKs and
    /// probe replies on: its members' feedback address (port 0: any, see
    /// [`Relay::feedback_addr`]).
    pub downstream_bind: SocketAddr,
    /// The relay session: upstream receiver, downstream sender, group size, cut-through.
    pub session: RelayConfig,
    /// Where the relay resyncs its own keys when it falls behind, tried in order (the GCKS's
    /// endpoints, or the upstream relay's then the GCKS's). Empty: it cannot resync, and
    /// what it misses it misses.
    pub upstream_resync: Vec<Endpoint>,
    /// Bound on each connect, read and write of the relay's own resync exchanges.
    pub resync_timeout: Duration,
    /// The longest random wait before the relay's own resync (uniform in `[0, this)`).
    pub resync_max_delay: Duration,
    /// Rounds over the upstream endpoint list before a resync gives up.
    pub resync_attempts: u32,
    /// Where the relay's TCP resync endpoint listens; `None`: no endpoint.
    pub resync_tcp: Option<SocketAddr>,
    /// Where the relay's HTTP resync endpoint listens (also `/metrics` and `/healthz`);
    /// `None`: none.
    pub resync_http: Option<SocketAddr>,
    /// The resync endpoints' limits: connection caps, rate limits, timeouts, request sizes.
    pub resync_limits: Limits,
    /// What one downstream host may send the relay's feedback socket: datagrams per second,
    /// sustained, per source address. Beyond it datagrams are dropped unread and counted
    /// ([`RelayStats::downstream_rate_limited`]).
    pub downstream_datagrams_per_second: f64,
    /// The burst of datagrams one downstream source address may send.
    pub downstream_burst: u32,
    /// The state directory: the relay's keys and the messages it forwarded, written durably
    /// as they come ([`crate::resync::relay_store`]). `None`: nothing is saved.
    pub state_dir: Option<PathBuf>,
    /// Loss applied to received upstream group datagrams, with its seed: for tests and demos
    /// on a loopback network. `None` (the default) in a deployment.
    pub simulated_loss: Option<(Loss, u64)>,
}

impl RelayEngineConfig {
    /// A relay on the loopback interface between `upstream` (whose sender takes NACKs at
    /// `upstream_feedback`) and `downstream`, with loopback delivery on: for tests and demos
    /// on one host.
    pub fn loopback(
        upstream: SocketAddr,
        upstream_feedback: SocketAddr,
        downstream: SocketAddr,
    ) -> Self {
        let localhost = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        Self {
            upstream: MulticastConfig::loopback_v4(upstream),
            upstream_bind: localhost,
            downstream: MulticastConfig::loopback_v4(downstream),
            downstream_bind: localhost,
            session: RelayConfig::new(upstream_feedback),
            upstream_resync: Vec::new(),
            resync_timeout: Duration::from_secs(5),
            resync_max_delay: Duration::from_millis(500),
            resync_attempts: 5,
            resync_tcp: None,
            resync_http: None,
            resync_limits: Limits::default(),
            downstream_datagrams_per_second: 2_000.0,
            downstream_burst: 4_000,
            state_dir: None,
            simulated_loss: None,
        }
    }
}

/// A snapshot of a relay's figures.
#[derive(Debug, Clone, Default)]
pub struct RelayStats {
    /// What the relay forwarded.
    pub relay: RelayCounters,
    /// The upstream side's counters (messages applied, NACKs sent, bad chunks).
    pub upstream: ReceiverCounters,
    /// The upstream datagram verifier's counters (header, MAC and window rejections).
    pub upstream_datagrams: DatagramCounters,
    /// The upstream message verifier's counters (signature checks made and failed).
    pub upstream_messages: MessageCounters,
    /// The downstream side's counters (what it sent, NACKs received, rejected datagrams).
    pub downstream: SenderCounters,
    /// The downstream repair aggregator's counters.
    pub downstream_repair: AggregatorStats,
    /// The next message the relay needs from upstream.
    pub next_seq: u64,
    /// The newest and oldest messages the relay's history holds (what its endpoints serve).
    pub held: Option<(u64, u64)>,
    /// Whether the relay was told to register again (it cannot forward any more).
    pub must_reregister: bool,
    /// The resync endpoints' counters.
    pub resync: EndpointCounters,
    /// The relay's own resync exchanges started with the upstream endpoints.
    pub resyncs_started: u64,
    /// Of those, the ones that failed on every endpoint.
    pub resyncs_failed: u64,
    /// Forwarded messages that could not be stored (logged; the relay goes on, and its
    /// endpoints serve them from memory until it restarts).
    pub store_failures: u64,
    /// Saves of the relay's keys that failed (the file keeps the last state saved).
    pub key_save_failures: u64,
    /// Datagrams received on the upstream sockets (group and unicast).
    pub upstream_received: u64,
    /// Upstream group datagrams dropped by the simulated loss.
    pub simulated_drops: u64,
    /// Datagrams received from downstream hosts (NACKs, probe replies, anything else).
    pub downstream_received: u64,
    /// Of those, dropped unread because their source was over its rate limit.
    pub downstream_rate_limited: u64,
    /// Datagrams that could not be sent (socket errors, or the backlog was full).
    pub send_failures: u64,
    /// Events not delivered because the product did not read them (the queue was full).
    pub events_dropped: u64,
    /// Event-loop lag, microseconds.
    pub loop_lag_us: LagSummary,
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayEngineError {
    /// The sockets, listeners or loop could not be set up.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The relay session refused its configuration or stored history.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// The state directory is corrupt or cannot be used.
    #[error(transparent)]
    Store(#[from] RelayStoreError),
    /// [`Relay::resume`] on a state directory without saved keys: start from a registration
    /// bundle instead.
    #[error("state directory {0} holds no saved relay keys: start from a registration bundle")]
    NothingToResume(PathBuf),
    /// [`Relay::start`] on a state directory that holds a relay's state: resume from it, or
    /// clear it for a new registration.
    #[error(
        "state directory {0} already holds a relay's keys: resume from it, or clear it for a \
         new registration"
    )]
    StateExists(PathBuf),
}

/// One relay, its loop running on its own thread.
#[derive(Debug)]
pub struct Relay {
    handle: LoopHandle<RelayCommand>,
    events: Receiver<RelayEvent>,
    upstream_addr: SocketAddr,
    feedback_addr: SocketAddr,
    resync_addrs: (Option<SocketAddr>, Option<SocketAddr>),
}

impl Relay {
    /// Starts a relay registered with `bundle` (like a member; the GCKS knows it as a relay),
    /// with nothing forwarded yet. A configured state directory must not hold a relay's
    /// state already ([`RelayEngineError::StateExists`]: use [`Relay::resume`]).
    pub fn start(
        bundle: &RegistrationBundle,
        config: RelayEngineConfig,
    ) -> Result<Self, RelayEngineError> {
        let store = match &config.state_dir {
            Some(dir) => {
                let (store, restored) = RelayStore::open(dir, config.session.downstream.history)?;
                if restored.is_some() {
                    return Err(RelayEngineError::StateExists(dir.clone()));
                }
                Some(store)
            }
            None => None,
        };
        let now = std::time::Instant::now();
        let session = RelaySession::new(bundle, config.session.clone(), now)?;
        Self::spawn(session, store, config)
    }

    /// Comes back after the relay's own restart from `state_dir` (which becomes the
    /// configuration's state directory): its saved keys and the messages it stored, which
    /// its resync endpoints serve at once. Messages it missed while down come by resync from
    /// [`RelayEngineConfig::upstream_resync`] (it cannot forward those: its members get them
    /// from the next endpoint in their lists).
    pub fn resume(
        state_dir: &Path,
        mut config: RelayEngineConfig,
    ) -> Result<Self, RelayEngineError> {
        config.state_dir = Some(state_dir.to_path_buf());
        let (store, restored) = RelayStore::open(state_dir, config.session.downstream.history)?;
        let restored =
            restored.ok_or_else(|| RelayEngineError::NothingToResume(state_dir.to_path_buf()))?;
        let now = std::time::Instant::now();
        let session = RelaySession::resume(
            restored.keys,
            restored.messages,
            config.session.clone(),
            now,
        )?;
        Self::spawn(session, Some(store), config)
    }

    fn spawn(
        session: RelaySession,
        store: Option<RelayStore>,
        config: RelayEngineConfig,
    ) -> Result<Self, RelayEngineError> {
        let started = crate::io::relay_loop::spawn(session, store, config)?;
        Ok(Self {
            handle: LoopHandle::new(started.commands, started.waker, started.thread, || {
                RelayCommand::Shutdown
            }),
            events: started.events,
            upstream_addr: started.upstream_addr,
            feedback_addr: started.feedback_addr,
            resync_addrs: started.resync_addrs,
        })
    }

    /// The relay's events: forwarded messages, key updates, its own resync needs. The queue
    /// is bounded; events the product does not read are dropped and counted
    /// ([`RelayStats::events_dropped`]).
    pub fn events(&self) -> &Receiver<RelayEvent> {
        &self.events
    }

    /// The unicast address the relay's NACKs go upstream from.
    pub fn upstream_addr(&self) -> SocketAddr {
        self.upstream_addr
    }

    /// The address the relay's members send their NACKs and probe replies to (their
    /// feedback address).
    pub fn feedback_addr(&self) -> SocketAddr {
        self.feedback_addr
    }

    /// The resync endpoints' bound addresses (TCP, HTTP), where configured.
    pub fn resync_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        self.resync_addrs
    }

    /// The relay's figures.
    pub fn stats(&self) -> Result<RelayStats, EngineError> {
        self.handle.request(RelayCommand::Stats)
    }

    /// Saves the keys, closes the sockets and waits for the loop's thread.
    pub fn shutdown(mut self) -> Result<(), EngineError> {
        self.handle.stop()
    }

    /// Stops the loop at once, as a crash would: nothing more is stored or saved, and the
    /// sockets close. For fault drills and tests of what members do when their relay dies.
    pub fn abort(mut self) -> Result<(), EngineError> {
        self.handle.send(RelayCommand::Abort)?;
        self.handle.stop()
    }
}

impl RelayStats {
    /// The figures in the Prometheus text exposition format (served at `/metrics`).
    pub fn prometheus_text(&self) -> String {
        let r = &self.relay;
        let up = &self.upstream;
        let dg = &self.upstream_datagrams;
        let msg = &self.upstream_messages;
        let down = &self.downstream;
        let mut text = String::new();
        let counters: [(&str, &str, u64); 32] = [
            (
                "rekeycast_relay_forwarded_total",
                "Messages forwarded downstream.",
                r.forwarded,
            ),
            (
                "rekeycast_relay_chunks_forwarded_total",
                "Chunks of forwarded messages, each authenticated first.",
                r.chunks_forwarded,
            ),
            (
                "rekeycast_relay_not_forwarded_total",
                "Messages applied by resync only, not forwarded.",
                r.not_forwarded,
            ),
            (
                "rekeycast_relay_forward_failures_total",
                "Verified messages the downstream side refused.",
                r.forward_failures,
            ),
            (
                "rekeycast_relay_cut_through_sent_total",
                "Verified manifests and source symbols forwarded cut-through.",
                r.cut_through_sent,
            ),
            (
                "rekeycast_relay_upstream_sent_total",
                "Datagrams sent upstream (NACKs, probe replies).",
                r.upstream_sent,
            ),
            (
                "rekeycast_relay_downstream_sent_total",
                "Datagrams sent downstream.",
                r.downstream_sent,
            ),
            (
                "rekeycast_relay_upstream_received_total",
                "Datagrams received from upstream.",
                self.upstream_received,
            ),
            (
                "rekeycast_relay_upstream_accepted_total",
                "Upstream datagrams that passed header, MAC and window checks.",
                dg.accepted,
            ),
            (
                "rekeycast_relay_signature_checks_total",
                "Ed25519 verifications made on upstream messages.",
                msg.signature_checks,
            ),
            (
                "rekeycast_relay_signature_failures_total",
                "Ed25519 verifications that failed.",
                msg.signature_failures,
            ),
            (
                "rekeycast_relay_chunks_rejected_total",
                "Upstream chunks that failed authentication.",
                msg.chunks_rejected + up.bad_chunks,
            ),
            (
                "rekeycast_relay_messages_applied_total",
                "Messages the relay applied to its own keys.",
                up.messages_applied,
            ),
            (
                "rekeycast_relay_upstream_nacks_sent_total",
                "NACKs the relay sent upstream.",
                up.nacks_sent,
            ),
            (
                "rekeycast_relay_downstream_nacks_received_total",
                "Downstream NACKs that passed the MAC check.",
                down.nacks_received,
            ),
            (
                "rekeycast_relay_downstream_replayed_feedback_total",
                "Downstream NACKs and probe replies dropped as replays.",
                down.replayed_feedback,
            ),
            (
                "rekeycast_relay_downstream_stale_feedback_total",
                "Downstream NACKs and probe replies echoing a probe the relay did not send or no longer remembers.",
                down.stale_feedback,
            ),
            (
                "rekeycast_relay_downstream_rejected_total",
                "Downstream datagrams dropped before use (bad MAC, malformed, wrong group).",
                down.rejected,
            ),
            (
                "rekeycast_relay_downstream_rate_limited_total",
                "Downstream datagrams dropped by the per-source rate limit.",
                self.downstream_rate_limited,
            ),
            (
                "rekeycast_relay_repair_symbols_sent_total",
                "Repair symbols sent downstream for NACKs.",
                down.repair_symbols_sent,
            ),
            (
                "rekeycast_relay_proactive_symbols_sent_total",
                "Proactive repair symbols sent downstream.",
                down.proactive_symbols_sent,
            ),
            (
                "rekeycast_relay_heartbeats_sent_total",
                "Heartbeats sent downstream.",
                down.heartbeats_sent,
            ),
            (
                "rekeycast_relay_resync_connections_accepted_total",
                "Resync connections accepted (served).",
                self.resync.accepted,
            ),
            (
                "rekeycast_relay_resync_connections_refused_total",
                "Resync connections refused (caps).",
                self.resync.refused_overloaded,
            ),
            (
                "rekeycast_relay_resync_rate_limited_total",
                "Resync requests refused by the per-source rate limit.",
                self.resync.rate_limited,
            ),
            (
                "rekeycast_relay_resync_requests_total",
                "Resync requests answered or refused.",
                self.resync.requests,
            ),
            (
                "rekeycast_relay_resync_messages_served_total",
                "Messages served by resync (a manifest and a chunk each).",
                self.resync.messages_served,
            ),
            (
                "rekeycast_relay_own_resyncs_total",
                "Resyncs of the relay's own keys from upstream.",
                self.resyncs_started,
            ),
            (
                "rekeycast_relay_own_resync_failures_total",
                "Own resyncs that failed on every upstream endpoint.",
                self.resyncs_failed,
            ),
            (
                "rekeycast_relay_store_failures_total",
                "Forwarded messages that could not be stored.",
                self.store_failures,
            ),
            (
                "rekeycast_relay_key_save_failures_total",
                "Saves of the relay's keys that failed.",
                self.key_save_failures,
            ),
            (
                "rekeycast_relay_send_failures_total",
                "Datagrams that could not be sent.",
                self.send_failures,
            ),
        ];
        for (name, help, value) in counters {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        let name = "rekeycast_relay_upstream_rejected_total";
        text.push_str(&format!(
            "# HELP {name} Upstream datagrams rejected, by cause.\n# TYPE {name} counter\n"
        ));
        for (cause, value) in [
            ("malformed_header", dg.malformed_header),
            ("wrong_group", dg.wrong_group),
            ("wrong_spi", dg.wrong_spi),
            ("stale", dg.stale),
            ("ahead", dg.ahead),
            ("far_future", dg.far_future),
            ("bad_mac", dg.bad_mac),
            ("malformed_body", dg.malformed_body),
            ("replayed", dg.replayed),
        ] {
            text.push_str(&format!("{name}{{cause=\"{cause}\"}} {value}\n"));
        }
        let (latest, oldest) = self.held.unwrap_or((0, 0));
        let gauges: [(&str, &str, u64); 6] = [
            (
                "rekeycast_relay_next_seq",
                "The next message the relay needs from upstream.",
                self.next_seq,
            ),
            (
                "rekeycast_relay_latest_held_seq",
                "The newest message the relay's history holds (0: none).",
                latest,
            ),
            (
                "rekeycast_relay_oldest_held_seq",
                "The oldest message the relay's history holds (0: none).",
                oldest,
            ),
            (
                "rekeycast_relay_must_reregister",
                "1 when the relay was told to register again.",
                u64::from(self.must_reregister),
            ),
            (
                "rekeycast_relay_resync_connections_open",
                "Resync connections open.",
                self.resync.open,
            ),
            (
                "rekeycast_relay_loop_lag_p99_microseconds",
                "Event loop lag, 99th percentile.",
                self.loop_lag_us.p99,
            ),
        ];
        for (name, help, value) in gauges {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
        text
    }
}
