//! A relay's side of the rekey transport, sans-IO: [`RelaySession`] (RFC 4046 5.5 and
//! Figure 3: hierarchical distribution and local repair).
//!
//! A relay is registered with the GCKS like a member: it holds a leaf, so it can check (and
//! produce) the group's datagram MACs and it verifies everything. It receives the rekey
//! messages of an upstream group (the GCKS's or another relay's: relays stack) and re-sends
//! each one into its downstream group with its own pacing, proactive repair and heartbeats,
//! answers its downstream members' NACKs from the blocks it holds, and serves resync for its
//! history ([`crate::resync::ResyncSource`]).
//!
//! # What is forwarded
//!
//! Only what passed the full verifier pipeline: the datagram MAC and the sequence window, the
//! manifest's signature, and the authentication of **every** chunk (a member checks only its
//! own). Chunks that arrive as source symbols are checked before they enter the decoder;
//! chunks a decode reconstructs are checked after it, and a failure drops the block's repair
//! symbols and asks again (an insider's forged repair). Repair symbols from upstream are never
//! forwarded: they cannot be checked before a decode.
//!
//! By default the relay forwards **cut-through** ([`RelayConfig::cut_through`]): the verified
//! manifest and each verified source symbol (a whole chunk, authenticated on its own) go
//! downstream the moment they arrive, so a member behind the relay gets its chunk about as
//! soon as the relay does; and the source symbols a block's decode reconstructs go the moment
//! that block decodes and its chunks pass authentication, not when the whole message is held.
//! Forwards take their tokens from the downstream side's token bucket, so the segment sees one
//! pacing. Once the relay holds the message whole (every block decoded, every chunk
//! authenticated), its downstream side adopts it ([`SenderSession::adopt_message`]): the
//! proactive repair (sized by the downstream side's own policy from the loss its segment
//! reports) and a last manifest go out, then heartbeats and repair as for any message.
//! Downstream NACKs for the message in progress are MAC-checked and held until then. With
//! cut-through off, the relay stores and forwards: the whole message goes downstream only once
//! complete, and its members wait for the relay's repair rounds on every block (measured in
//! the simulator, 2,000 members behind 20 relays at 5% loss on both tiers: time to key p50
//! 205 ms store-and-forward vs 19.5 ms cut-through, 12.8 ms direct).
//!
//! The downstream datagrams are MAC'd with the same key as upstream (the key of message `s`
//! derives from the group key of `s - 1`, which the relay holds as a member), and RaptorQ
//! repair symbols are a pure function of the block, so a relay's repair symbol with ESI n is
//! the GCKS's symbol with ESI n.
//!
//! Upstream, the relay is one receiver: it NACKs the blocks it lacks like a member does (with
//! the same backoff and suppression), so the GCKS's repair grows with the loss on the upstream
//! tier, not with the members behind the relay. Downstream NACKs never travel upstream: a
//! message the relay forwarded is a message it holds whole.
//!
//! An insider can forge repair symbols under a valid MAC: a relay counts the decodes that
//! fail authentication per block against [`ReceiverConfig::decode_failure_limit`], so that
//! one forged symbol in each of a few blocks does not send it, and its whole segment, to
//! resync.
//!
//! A message the relay itself could only get by resync (its own chunk, over TCP or HTTP) is
//! applied to its keys but cannot be forwarded ([`RelayEvent::NotForwarded`]); its
//! downstream members see the next message's datagrams, which they cannot check, ask for the
//! group's state and resync from the next endpoint in their list (the GCKS).
//!
//! # Call order
//!
//! As [`crate::session::ReceiverSession`] and [`crate::session::SenderSession`]: feed
//! [`RelaySession::handle_upstream`] (datagrams of the upstream group and unicast from
//! upstream), [`RelaySession::handle_downstream`] (NACKs and probe replies of downstream
//! members) and [`RelaySession::handle_timeout`]; then drain
//! [`RelaySession::poll_transmit`] (each transmit says which tier's socket it leaves by),
//! [`RelaySession::poll_event`], and re-read [`RelaySession::poll_timeout`].

mod early_repair;
pub mod members;
pub mod uplink;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use crate::auth::datagram::DatagramCounters;
use crate::auth::message::MessageCounters;
use crate::endpoint::resync_policy::ResyncEvent;
use crate::lkh::{MemberKeys, RegistrationBundle};
use crate::relay::uplink::{UnicastFanout, UnicastRelays, UplinkCounters};
use crate::resync::{Lookup, ResyncSource};
use crate::session::receiver::{ResyncError, Scope, StateVerdict};
use crate::session::sender::{QueueError, SenderEvent};
use crate::session::{
    ConfigError, Destination, PreparedMessage, ReceiverConfig, ReceiverCounters, ReceiverEvent,
    ReceiverSession, SenderConfig, SenderCounters, SenderSession,
};

/// Configuration of a [`RelaySession`].
///
/// It deserializes from a configuration file's table (serde): every field may be left out (its
/// default, [`RelayConfig::default`]: the [`RelayConfig::new`] values with no upstream feedback
/// address, which a deployment must set), both sides are tables (`upstream`, a
/// [`ReceiverConfig`]; `downstream`, a [`SenderConfig`]), and a key that is not a field is an
/// error. Check what was read with [`RelayConfig::validate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// The upstream side: where the relay's NACKs go (the GCKS's or the upstream relay's
    /// address), NACK timing, decoder limits, silence timeout.
    pub upstream: ReceiverConfig,
    /// The downstream side: datagram size, pacing, manifest repeats, history window (what the
    /// relay's resync endpoints serve), heartbeats, repair aggregation, proactive repair.
    pub downstream: SenderConfig,
    /// The group size the downstream heartbeats advertise (the receivers' NACK backoff
    /// scales with it): the number of members behind this relay, if known. `None` advertises
    /// the whole group's size, from the manifests: correct but slower repair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downstream_group_size: Option<u32>,
    /// Cut-through forwarding: each verified source symbol (a whole chunk, authenticated on
    /// its own) and the verified manifest go downstream the moment they arrive, and the
    /// message is adopted by the downstream side once it is whole (the rest of its source
    /// symbols, proactive repair, repair, heartbeats). Off: store and forward, the whole
    /// message is sent downstream only once it is complete (a member behind the relay then
    /// waits for the relay's own repair rounds on every block, not just its own).
    pub cut_through: bool,
    /// Relays behind this one that take its downstream traffic over unicast UDP (they cannot
    /// hear its group): every downstream datagram goes to each of them too, or only to them
    /// ([`UnicastRelays::unicast_only`]); see [`uplink`]. Empty: none.
    pub unicast_relays: UnicastRelays,
}

impl Default for RelayConfig {
    /// [`RelayConfig::new`] with the unspecified upstream feedback address `0.0.0.0:0`: set
    /// `upstream.feedback_addr` before use.
    fn default() -> Self {
        Self {
            upstream: ReceiverConfig::default(),
            ..Self::new(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)))
        }
    }
}

impl RelayConfig {
    /// A configuration with sane defaults whose NACKs go to `upstream_feedback`.
    pub fn new(upstream_feedback: SocketAddr) -> Self {
        Self {
            upstream: ReceiverConfig::new(upstream_feedback),
            downstream: SenderConfig::default(),
            downstream_group_size: None,
            cut_through: true,
            unicast_relays: UnicastRelays::default(),
        }
    }

    /// Checks both sides' ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.upstream.validate()?;
        self.downstream.validate()?;
        if self.downstream_group_size == Some(0) {
            return Err(ConfigError::Invalid {
                field: "downstream_group_size",
                reason: "must be at least 1",
            });
        }
        self.unicast_relays.validate()?;
        Ok(())
    }
}

/// Which of the relay's two sides a datagram leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Towards the GCKS (or the upstream relay): the relay's NACKs and probe replies, always
    /// unicast in the default feedback mode.
    Upstream,
    /// Into the relay's own group: symbols, manifests, heartbeats, repair.
    Downstream,
}

/// A datagram the relay wants sent: the first `len` bytes of the buffer handed to
/// [`RelaySession::poll_transmit`], out of the socket of `tier`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct RelayTransmit {
    /// Which side's socket.
    pub tier: Tier,
    /// Where it goes ([`Destination::Group`] is that tier's group).
    pub destination: Destination,
    /// Its length in bytes.
    pub len: usize,
}

/// What the relay tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayEvent {
    /// Message `seq`, whole and verified, was queued downstream: store it now
    /// ([`RelaySession::message`]) so that a restarted relay serves it at once.
    Forwarded {
        /// The message.
        seq: u64,
        /// Its chunks (source symbols).
        chunks: usize,
    },
    /// The relay got message `seq` by resync only (its own chunk): its keys moved on, but
    /// the message is not forwarded and its resync endpoints cannot serve it.
    NotForwarded {
        /// The message.
        seq: u64,
    },
    /// A verified message could not be queued downstream (its symbols do not fit the
    /// downstream datagram size, or it does not follow the last one queued).
    ForwardFailed {
        /// The message.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// What the upstream side said: resync and state-check requests, key updates, the order
    /// to register again. The driver handles them as a member's driver does.
    Upstream(ReceiverEvent),
    /// What the downstream side said (initial transmissions done, messages retired).
    Downstream(SenderEvent),
    /// How the relay's own resync with its upstream endpoints went: raised by the relay
    /// endpoint's resync policy ([`crate::endpoint::relay::RelayEndpoint`]), never by the
    /// session itself.
    Resync(ResyncEvent),
}

/// Why a relay cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A stored message could not be put back into the history.
    #[error("stored message {seq}")]
    History {
        /// The message.
        seq: u64,
        /// Why.
        source: QueueError,
    },
    /// A stored message is newer than the keys the relay resumes with.
    #[error("stored message {seq} is newer than the saved keys (message {keys_seq})")]
    HistoryAhead {
        /// The message.
        seq: u64,
        /// The last message the keys applied.
        keys_seq: u64,
    },
}

/// Counts of what the relay forwarded; each side's own counters are
/// [`RelaySession::upstream_counters`] and [`RelaySession::downstream_counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Messages forwarded downstream.
    pub forwarded: u64,
    /// Chunks of those messages (each one authenticated before forwarding).
    pub chunks_forwarded: u64,
    /// Messages applied by resync only, not forwarded.
    pub not_forwarded: u64,
    /// Verified messages the downstream side refused.
    pub forward_failures: u64,
    /// Datagrams the relay sent upstream (NACKs and probe replies).
    pub upstream_sent: u64,
    /// Datagrams the relay sent downstream (cut-through forwards included).
    pub downstream_sent: u64,
    /// Of those, verified manifests and source symbols forwarded cut-through (those a block
    /// decode reconstructed included, sent as the block decodes).
    pub cut_through_sent: u64,
    /// Times a cut-through forward waited for the downstream token bucket.
    pub cut_through_paced: u64,
    /// Downstream NACKs for the message being received (MAC-checked), held until the relay
    /// holds it whole and then handed to the downstream side.
    pub early_nacks_held: u64,
    /// Such NACKs dropped because the holding buffer was full.
    pub early_nacks_dropped: u64,
    /// Downstream NACKs for a block of the message being received that the relay answered
    /// with its own repair symbols once it held that block whole, not holding them until
    /// the whole message is.
    pub early_nacks_answered: u64,
    /// Repair symbols the relay encoded from a whole block of the message being received
    /// and sent downstream (through the downstream token bucket).
    pub early_repair_sent: u64,
}

/// Downstream NACKs held for the message in progress, at most.
const MAX_EARLY_NACKS: usize = 4_096;

/// A downstream NACK for the message in progress, held until the relay holds it whole.
#[derive(Debug)]
struct HeldNack {
    seq: u64,
    from: SocketAddr,
    bytes: Vec<u8>,
    /// Source symbols of its block that a decode had reconstructed and the relay had
    /// forwarded when it came: those forwarded after it answer it in part.
    recovered_before: u32,
    /// Source symbols of its block the relay had taken for forwarding (received or
    /// reconstructed) when it came.
    forwarded_before: u32,
}

/// One relay. See the [module docs](self).
#[derive(Debug)]
pub struct RelaySession {
    upstream: ReceiverSession,
    downstream: SenderSession,
    cut_through: bool,
    /// Downstream NACKs of the message in progress, with what had been forwarded of their
    /// block by then.
    early_nacks: Vec<HeldNack>,
    /// Verified pieces of the message in progress taken from the upstream side, waiting for
    /// the downstream token bucket.
    forwards: VecDeque<crate::session::receiver::Forward>,
    /// The message in progress and, per block, how many source symbols its decode
    /// reconstructed and the relay forwarded.
    recovered: (u64, Vec<u32>),
    /// The newest manifest the relay verified and applied, with its sequence number: also
    /// one it got by resync only (its state answer).
    latest_verified: Option<(u64, Vec<u8>)>,
    events: VecDeque<RelayEvent>,
    counters: RelayCounters,
    /// Which side `poll_transmit` asks first: alternates so neither starves the other.
    upstream_first: bool,
    /// The source symbols of the message in progress and the repair the relay sends for
    /// its whole blocks before the message is whole.
    early_repair: early_repair::EarlyRepair,
    /// The downstream copies for the unicast relays behind this one.
    uplinks: UnicastFanout,
    /// The members that reached the relay (MAC-checked feedback, resync requests).
    members: members::MemberTally,
}

impl RelaySession {
    /// The relay registered with `bundle` (like a member), with nothing forwarded yet.
    pub fn new(
        bundle: &RegistrationBundle,
        config: RelayConfig,
        now: Instant,
    ) -> Result<Self, RelayError> {
        config.validate()?;
        let sa = bundle.rekey_sa;
        let mut upstream = ReceiverSession::new(bundle, config.upstream)?;
        upstream.set_scope(Scope::WholeMessage);
        let mut downstream = SenderSession::new(config.downstream, sa.group_id, sa.spi, now)?;
        downstream.set_advertised_group_size(config.downstream_group_size);
        let uplinks = UnicastFanout::new(config.unicast_relays)?;
        Ok(Self::assemble(
            upstream,
            downstream,
            config.cut_through,
            uplinks,
        ))
    }

    /// A relay back after its own restart: its saved keys (the engine's `persist::save_member_keys` after each
    /// message) and the history it stored ([`RelayEvent::Forwarded`]), ascending, which its
    /// resync endpoints serve at once (they are not multicast again). Messages it missed
    /// while down come by resync, as for a member ([`ReceiverSession::resume`]).
    pub fn resume(
        keys: MemberKeys,
        history: Vec<PreparedMessage>,
        config: RelayConfig,
        now: Instant,
    ) -> Result<Self, RelayError> {
        config.validate()?;
        let sa = *keys.rekey_sa();
        let keys_seq = keys.last_seq();
        let mut upstream = ReceiverSession::resume(keys, config.upstream)?;
        upstream.set_scope(Scope::WholeMessage);
        let mut downstream = SenderSession::new(config.downstream, sa.group_id, sa.spi, now)?;
        downstream.set_advertised_group_size(config.downstream_group_size);
        for message in history {
            let seq = message.seq();
            if seq > keys_seq {
                return Err(RelayError::HistoryAhead { seq, keys_seq });
            }
            downstream
                .restore_message(now, message)
                .map_err(|source| RelayError::History { seq, source })?;
        }
        let uplinks = UnicastFanout::new(config.unicast_relays)?;
        let mut relay = Self::assemble(upstream, downstream, config.cut_through, uplinks);
        relay.pump(now);
        Ok(relay)
    }

    fn assemble(
        upstream: ReceiverSession,
        downstream: SenderSession,
        cut_through: bool,
        uplinks: UnicastFanout,
    ) -> Self {
        Self {
            upstream,
            downstream,
            cut_through,
            early_nacks: Vec::new(),
            forwards: VecDeque::new(),
            recovered: (0, Vec::new()),
            latest_verified: None,
            events: VecDeque::new(),
            counters: RelayCounters::default(),
            upstream_first: true,
            early_repair: early_repair::EarlyRepair::default(),
            uplinks,
            members: members::MemberTally::default(),
        }
    }

    /// Arms the upstream side's silence timer from `now` (see [`ReceiverSession::start`]):
    /// call once when the driver starts.
    pub fn start(&mut self, now: Instant) {
        self.upstream.start(now);
    }

    /// A datagram arrived on the upstream side (the upstream group, or unicast from the
    /// upstream sender).
    pub fn handle_upstream(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.upstream.handle_datagram(now, from, bytes);
        self.pump(now);
    }

    /// A datagram arrived on the downstream side: a member's NACK or probe reply (MAC-checked
    /// under the key of its sequence number; anything else is counted and dropped).
    pub fn handle_downstream(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if self.feedback_passes_mac(bytes) {
            self.members
                .heard(now, from.ip(), members::Contact::Feedback);
        }
        if let Some(seq) = self.early_nack(bytes) {
            self.take_forwards();
            let block = nack_block(bytes);
            if let Some((sbn, need)) = block.zip(nack_need(bytes)) {
                if self.early_repair.is_whole(seq, sbn) {
                    // Nothing more of this block is coming but what is queued to forward.
                    let queued = self
                        .forwards
                        .iter()
                        .filter(|f| f.seq == seq && f.object == crate::wire::ObjectKind::Chunks)
                        .filter(|f| f.sbn == sbn)
                        .count();
                    let need = u32::from(need).saturating_sub(queued as u32);
                    self.answer_early(seq, sbn, need);
                    return;
                }
            }
            if self.early_nacks.len() < MAX_EARLY_NACKS {
                self.counters.early_nacks_held += 1;
                let recovered_before = self.recovered_in(seq, block);
                let forwarded_before = block.map_or(0, |sbn| self.early_repair.forwarded(seq, sbn));
                self.early_nacks.push(HeldNack {
                    seq,
                    from,
                    bytes: bytes.to_vec(),
                    recovered_before,
                    forwarded_before,
                });
            } else {
                self.counters.early_nacks_dropped += 1;
            }
            return;
        }
        self.downstream.handle_datagram(now, from, bytes);
        self.pump(now);
    }

    /// A request from `peer` reached the relay's resync endpoints at `now`: counted among the
    /// members that reached it ([`RelaySession::members`]).
    pub fn resync_request(&mut self, now: Instant, peer: std::net::IpAddr) {
        self.members.heard(now, peer, members::Contact::Resync);
    }

    /// The distinct member addresses that reached the relay within the tally's window before
    /// `now` (see [`members::MemberTally`]).
    pub fn members(&self, now: Instant) -> u64 {
        self.members.count(now)
    }

    /// The member tally's counters.
    pub fn member_counters(&self) -> members::MemberTallyCounters {
        self.members.counters()
    }

    /// Whether `bytes` is a datagram of the group and SA whose MAC passes under the key of
    /// its sequence number (one the relay knows): feedback from a member, not from anyone.
    fn feedback_passes_mac(&self, bytes: &[u8]) -> bool {
        let Ok(packet) = crate::wire::Packet::new_checked(bytes) else {
            return false;
        };
        let sa = self.upstream.keys().rekey_sa();
        if packet.group_id() != sa.group_id || packet.spi() != sa.spi {
            return false;
        }
        self.upstream
            .mac_key(packet.seq())
            .is_some_and(|key| key.check(&packet))
    }

    /// The sequence number of a NACK for the message the relay is receiving and forwarding
    /// cut-through (not yet adopted downstream), if `bytes` is one and passes its MAC.
    fn early_nack(&self, bytes: &[u8]) -> Option<u64> {
        if !self.cut_through {
            return None;
        }
        let packet = crate::wire::Packet::new_checked(bytes).ok()?;
        let seq = packet.seq();
        if packet.datagram_type() != crate::wire::DatagramType::Nack
            || seq != self.upstream.next_seq()
            || self.downstream.message(seq).is_some()
        {
            return None;
        }
        let sa = self.upstream.keys().rekey_sa();
        if packet.group_id() != sa.group_id || packet.spi() != sa.spi {
            return None;
        }
        let key = self.upstream.mac_key(seq)?;
        key.check(&packet).then_some(seq)
    }

    /// Time passed, on both sides.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.upstream.handle_timeout(now);
        self.downstream.handle_timeout(now);
        self.pump(now);
    }

    /// The next datagram to send, written into `buf` (large enough for the downstream
    /// datagram size), with the side it leaves by.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<RelayTransmit> {
        let order = if self.upstream_first {
            [Tier::Upstream, Tier::Downstream]
        } else {
            [Tier::Downstream, Tier::Upstream]
        };
        for tier in order {
            let transmit = match tier {
                Tier::Upstream => self.upstream.poll_transmit(now, buf),
                Tier::Downstream => {
                    let mut uplinks = std::mem::take(&mut self.uplinks);
                    let transmit = uplinks.poll_transmit(buf, |buf| {
                        self.forward_next(now, buf)
                            .or_else(|| self.early_repair_next(now, buf))
                            .or_else(|| self.downstream.poll_transmit(now, buf))
                    });
                    self.uplinks = uplinks;
                    transmit
                }
            };
            if let Some(transmit) = transmit {
                match tier {
                    Tier::Upstream => self.counters.upstream_sent += 1,
                    Tier::Downstream => self.counters.downstream_sent += 1,
                }
                self.upstream_first = tier == Tier::Downstream;
                return Some(RelayTransmit {
                    tier,
                    destination: transmit.destination,
                    len: transmit.len,
                });
            }
        }
        None
    }

    /// The next verified piece of the message in progress, sealed into `buf` (cut-through),
    /// when the downstream token bucket has a token for it: forwards and the downstream
    /// side's own initial transmissions share one pacing.
    fn forward_next(&mut self, now: Instant, buf: &mut [u8]) -> Option<crate::session::Transmit> {
        self.take_forwards();
        while !self.forwards.is_empty() {
            if !self.downstream.take_send_token(now) {
                self.counters.cut_through_paced += 1;
                return None;
            }
            let forward = self.forwards.pop_front()?;
            let sa = *self.upstream.keys().rekey_sa();
            let repr = crate::wire::DatagramRepr {
                group_id: sa.group_id,
                spi: sa.spi,
                seq: forward.seq,
                body: crate::wire::BodyRepr::Symbol(crate::wire::SymbolRepr {
                    object: forward.object,
                    sbn: forward.sbn,
                    esi: forward.esi,
                    data: &forward.data,
                }),
                mac: [0; crate::wire::datagram::MAC_LEN],
            };
            if let Some(len) = crate::session::seal_into(&repr, &forward.mac_key, buf) {
                self.counters.cut_through_sent += 1;
                return Some(crate::session::Transmit {
                    destination: Destination::Group,
                    len,
                });
            }
        }
        None
    }

    /// The next early repair symbol ([`early_repair`]), sealed into `buf`, when the
    /// downstream token bucket has a token for it (after the cut-through forwards).
    fn early_repair_next(
        &mut self,
        now: Instant,
        buf: &mut [u8],
    ) -> Option<crate::session::Transmit> {
        if !self.early_repair.is_pending() || !self.forwards.is_empty() {
            return None;
        }
        if !self.downstream.take_send_token(now) {
            self.counters.cut_through_paced += 1;
            return None;
        }
        let sa = *self.upstream.keys().rekey_sa();
        let len = self.early_repair.next((sa.group_id, sa.spi), buf)?;
        self.counters.early_repair_sent = self.early_repair.sent;
        Some(crate::session::Transmit {
            destination: Destination::Group,
            len,
        })
    }

    /// A downstream member needs `need` more symbols of block `sbn` of message `seq`, which
    /// the relay holds whole: queues its own repair symbols for it.
    fn answer_early(&mut self, seq: u64, sbn: u8, need: u32) {
        self.counters.early_nacks_answered += 1;
        self.early_repair.request(seq, sbn, need);
    }

    /// Block `sbn` of message `seq` became whole at the relay: the held NACKs for it are
    /// answered now, less the source symbols of the block forwarded since each came.
    fn block_whole(&mut self, seq: u64, sbn: u8) {
        let forwarded = self.early_repair.forwarded(seq, sbn);
        let held = std::mem::take(&mut self.early_nacks);
        for nack in held {
            let block = nack_block(&nack.bytes);
            if nack.seq != seq || block != Some(sbn) {
                self.early_nacks.push(nack);
                continue;
            }
            let need = nack_need(&nack.bytes).map_or(0, u32::from);
            let since = forwarded.saturating_sub(nack.forwarded_before);
            self.answer_early(seq, sbn, need.saturating_sub(since));
        }
    }

    /// Moves the upstream side's verified pieces into the forwarding queue, counting the
    /// reconstructed ones per block (cut-through only: store and forward drops them).
    fn take_forwards(&mut self) {
        while let Some(forward) = self.upstream.take_forward() {
            if !self.cut_through {
                continue;
            }
            if let Some(sbn) = self.early_repair.take(&forward) {
                self.block_whole(forward.seq, sbn);
            }
            if forward.recovered {
                if self.recovered.0 != forward.seq {
                    self.recovered = (forward.seq, Vec::new());
                }
                let sbn = usize::from(forward.sbn);
                let counts = &mut self.recovered.1;
                if counts.len() <= sbn {
                    counts.resize(sbn + 1, 0);
                }
                counts[sbn] += 1;
            }
            self.forwards.push_back(forward);
        }
    }

    /// Source symbols of block `sbn` of message `seq` that a decode reconstructed and the
    /// relay took for forwarding.
    fn recovered_in(&self, seq: u64, sbn: Option<u8>) -> u32 {
        match sbn {
            Some(sbn) if self.recovered.0 == seq => {
                self.recovered.1.get(usize::from(sbn)).copied().unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// The next deadline of either side, and of the forwards waiting for a token.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let forwards = (!self.forwards.is_empty() || self.early_repair.is_pending())
            .then(|| self.downstream.send_token_at());
        [
            self.upstream.poll_timeout(),
            self.downstream.poll_timeout(),
            forwards,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// A resync endpoint's state answer for the relay itself (see
    /// [`ReceiverSession::handle_state_answer`]).
    pub fn handle_state_answer(
        &mut self,
        now: Instant,
        manifest: &[u8],
    ) -> Result<StateVerdict, ResyncError> {
        let verdict = self.upstream.handle_state_answer(now, manifest);
        self.pump(now);
        verdict
    }

    /// One resync item for the relay itself: the manifest of its next message and its own
    /// chunk (see [`ReceiverSession::handle_resync`]). The message is not forwarded.
    pub fn handle_resync(
        &mut self,
        now: Instant,
        manifest: &[u8],
        chunk: &[u8],
    ) -> Result<u64, ResyncError> {
        let applied = self.upstream.handle_resync(now, manifest, chunk);
        if let Ok(seq) = applied {
            self.latest_verified = Some((seq, manifest.to_vec()));
        }
        self.pump(now);
        applied
    }

    /// A resync endpoint said the messages the relay lacks left its history window: the relay
    /// must register again.
    pub fn handle_beyond_history(&mut self, now: Instant) {
        self.upstream.handle_beyond_history(now);
        self.pump(now);
    }

    /// Message `seq` if the relay's history holds it: what to store after
    /// [`RelayEvent::Forwarded`] ([`PreparedMessage::parts`]).
    pub fn message(&self, seq: u64) -> Option<&PreparedMessage> {
        self.downstream.message(seq)
    }

    /// The next message the relay needs from upstream.
    pub fn next_seq(&self) -> u64 {
        self.upstream.next_seq()
    }

    /// Whether the relay was told to register again.
    pub fn must_reregister(&self) -> bool {
        self.upstream.must_reregister()
    }

    /// Why the relay must register again, once it must (see
    /// [`ReceiverSession::reregister_reason`]).
    pub fn reregister_reason(&self) -> Option<crate::session::ReregisterReason> {
        self.upstream.reregister_reason()
    }

    /// The relay's key state (save it after each message to resume with it).
    pub fn keys(&self) -> &MemberKeys {
        self.upstream.keys()
    }

    /// The order key of the relay's leaf (what it asks a resync endpoint for its chunk with).
    pub fn order_key(&self) -> u32 {
        self.upstream.order_key()
    }

    /// The relay's own counters.
    pub fn counters(&self) -> &RelayCounters {
        &self.counters
    }

    /// The upstream side's counters (messages applied, NACKs sent, chunks that failed).
    pub fn upstream_counters(&self) -> &ReceiverCounters {
        self.upstream.counters()
    }

    /// The upstream datagram verifier's counters (header, MAC and window rejections).
    pub fn upstream_datagram_counters(&self) -> &DatagramCounters {
        self.upstream.datagram_counters()
    }

    /// The upstream message verifier's counters (signature checks made and failed).
    pub fn upstream_message_counters(&self) -> &MessageCounters {
        self.upstream.message_counters()
    }

    /// The downstream side's counters (what it sent, NACKs received, rejected datagrams).
    pub fn downstream_counters(&self) -> &SenderCounters {
        self.downstream.counters()
    }

    /// The downstream side's repair aggregator's counters.
    pub fn downstream_repair_stats(&self) -> rekeycast_nack::AggregatorStats {
        self.downstream.repair_stats()
    }

    /// What went to the unicast relays behind this one ([`RelayConfig::unicast_relays`]).
    pub fn uplink_counters(&self) -> &UplinkCounters {
        self.uplinks.counters()
    }

    /// The downstream side (its history, GRTT, loss estimate).
    pub fn downstream(&self) -> &SenderSession {
        &self.downstream
    }

    /// Moves both sides' events into the relay's, forwarding completed messages.
    fn pump(&mut self, now: Instant) {
        self.take_forwards();
        while let Some(event) = self.upstream.poll_event() {
            if let ReceiverEvent::GroupKeyUpdated { seq, .. } = event {
                self.events.push_back(RelayEvent::Upstream(event));
                self.forward(now, seq);
                continue;
            }
            self.events.push_back(RelayEvent::Upstream(event));
        }
        while let Some(event) = self.downstream.poll_event() {
            self.events.push_back(RelayEvent::Downstream(event));
        }
    }

    /// Message `seq` was applied upstream: queue it downstream if it came whole.
    fn forward(&mut self, now: Instant, seq: u64) {
        let Some(completed) = self.upstream.take_completed().filter(|c| c.seq == seq) else {
            self.early_nacks.retain(|held| held.seq > seq);
            self.counters.not_forwarded += 1;
            self.events.push_back(RelayEvent::NotForwarded { seq });
            return;
        };
        let arrived = completed.arrived;
        let mac_key = completed.mac_key.clone();
        let prepared =
            PreparedMessage::from_parts(completed.mac_key, completed.manifest, completed.symbols)
                .and_then(|message| {
                    let chunks = message.chunk_count();
                    if self.cut_through {
                        self.downstream.adopt_message(now, message, &arrived)?;
                    } else {
                        self.downstream.queue_message(now, message)?;
                    }
                    Ok(chunks)
                });
        // NACKs that came while the message was in progress: the downstream side holds it
        // now (or never will).
        let held = std::mem::take(&mut self.early_nacks);
        for nack in held {
            if nack.seq == seq {
                // The source symbols of its block forwarded since it came (reconstructed by
                // the block's decode) and those the adoption sends answer it in part: it
                // asks only for what is left beyond them.
                let since = self
                    .recovered_in(seq, nack_block(&nack.bytes))
                    .saturating_sub(nack.recovered_before);
                if let Some(bytes) = trim_held_nack(&nack.bytes, since, &arrived, &mac_key) {
                    self.downstream.handle_datagram(now, nack.from, &bytes);
                }
            } else if nack.seq > seq {
                self.early_nacks.push(nack);
            }
        }
        match prepared {
            Ok(chunks) => {
                self.counters.forwarded += 1;
                self.counters.chunks_forwarded += chunks as u64;
                self.events.push_back(RelayEvent::Forwarded { seq, chunks });
            }
            Err(error) => {
                self.counters.forward_failures += 1;
                self.events.push_back(RelayEvent::ForwardFailed {
                    seq,
                    reason: error.to_string(),
                });
            }
        }
    }
}

/// The block a chunk NACK asks about, if `bytes` is one.
fn nack_block(bytes: &[u8]) -> Option<u8> {
    use crate::wire::{BodyRepr, DatagramRepr, ObjectKind};
    match DatagramRepr::parse(bytes).ok()?.body {
        BodyRepr::Nack(nack) if nack.object == ObjectKind::Chunks => Some(nack.sbn),
        _ => None,
    }
}

/// The symbols a chunk NACK asks for, if `bytes` is one.
fn nack_need(bytes: &[u8]) -> Option<u16> {
    use crate::wire::{BodyRepr, DatagramRepr, ObjectKind};
    match DatagramRepr::parse(bytes).ok()?.body {
        BodyRepr::Nack(nack) if nack.object == ObjectKind::Chunks => Some(nack.need),
        _ => None,
    }
}

/// A NACK held while its message was in progress, less the source symbols of its block sent
/// after it came: `since` forwarded already, and those the adoption sends (not in `arrived`);
/// sealed again under `key`; `None` when nothing is left to ask for. Other datagrams come
/// back unchanged.
fn trim_held_nack(
    bytes: &[u8],
    since: u32,
    arrived: &[Vec<bool>],
    key: &crate::auth::mac::MacKey,
) -> Option<Vec<u8>> {
    use crate::wire::{BodyRepr, DatagramRepr, ObjectKind};
    let Ok(mut repr) = DatagramRepr::parse(bytes) else {
        return Some(bytes.to_vec());
    };
    let BodyRepr::Nack(nack) = &mut repr.body else {
        return Some(bytes.to_vec());
    };
    if nack.object != ObjectKind::Chunks {
        return Some(bytes.to_vec());
    }
    let sent = arrived
        .get(usize::from(nack.sbn))
        .map_or(0, |block| block.iter().filter(|&&a| !a).count())
        + since as usize;
    if sent == 0 {
        return Some(bytes.to_vec());
    }
    let left = usize::from(nack.need).saturating_sub(sent);
    nack.need = u16::try_from(left).ok().filter(|&need| need > 0)?;
    let mut buf = vec![0u8; repr.buffer_len()];
    let len = crate::session::seal_into(&repr, key, &mut buf)?;
    buf.truncate(len);
    Some(buf)
}

/// What a relay's resync endpoints serve: its history, which is not the group's. A message
/// older than the relay's window, from before it started, or that it got by resync only (a
/// gap) may still be in the GCKS's history, so for those the relay answers "not found" (the
/// endpoints say "not held") and the member asks the next endpoint in its list; the relay
/// never says "beyond history" (only the GCKS sends a member to register again), so it reports
/// no oldest sequence number. Its state answer is the newest manifest it verified, also one it
/// got by resync: a member behind it learns the true latest even while the relay has a gap.
impl ResyncSource for RelaySession {
    fn group_id(&self) -> u32 {
        self.downstream.group_id()
    }

    fn latest(&self) -> Option<(u64, &[u8])> {
        let held = self.downstream.latest();
        match (&self.latest_verified, held) {
            (Some((seq, manifest)), Some((held_seq, _))) if *seq > held_seq => {
                Some((*seq, manifest.as_slice()))
            }
            (Some((seq, manifest)), None) => Some((*seq, manifest.as_slice())),
            (_, held) => held,
        }
    }

    fn oldest(&self) -> Option<u64> {
        None
    }

    fn manifest(&self, seq: u64) -> Lookup<&[u8]> {
        self.held(seq, self.downstream.manifest(seq))
    }

    fn chunk(&self, seq: u64, leaf: u32) -> Lookup<&[u8]> {
        self.held(seq, self.downstream.chunk(seq, leaf))
    }
}

impl RelaySession {
    /// Turns the downstream history's answer into the relay's (see the `ResyncSource` impl).
    fn held<'a>(&self, seq: u64, lookup: Lookup<&'a [u8]>) -> Lookup<&'a [u8]> {
        let latest = ResyncSource::latest(self).map(|(latest, _)| latest);
        match lookup {
            Lookup::BeyondHistory { .. } => Lookup::NotFound,
            Lookup::NotYetSent { .. } if latest.is_some_and(|latest| seq <= latest) => {
                Lookup::NotFound
            }
            Lookup::NotYetSent { latest: held } => Lookup::NotYetSent {
                latest: latest.unwrap_or(held),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
