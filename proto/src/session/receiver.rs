//! One member's side of the rekey transport, sans-IO: [`ReceiverSession`].
//!
//! The session runs the verifier pipeline in its fixed order (DESIGN.md, security rules):
//! header checks, then the datagram MAC and the sequence window
//! ([`crate::auth::datagram::DatagramVerifier`]), then the manifest's signature once per
//! message, then the member's own chunk ([`crate::auth::message::MessageVerifier`]), and only
//! then the key state ([`crate::lkh::MemberKeys::apply`], which takes nothing but a
//! [`crate::auth::Verified`] chunk). Around it: FEC decoding of the one source block that holds
//! the member's chunk (the signed manifest names the block), NACK scheduling
//! ([`rekeycast_nack::NackScheduler`]), and the key events the embedding product acts on.
//!
//! What it drops before the MAC, at the cost of a header read: symbols of messages it has
//! finished, and symbols of blocks other than its own once the manifest told it which block
//! that is. Dropping is always safe: it changes no state.
//!
//! Messages are applied in sequence order: the MAC key of message `s + 1` comes from the group
//! key of message `s`, so a member can check the datagrams of one message at a time, and the
//! per-message state is one message's worth: its verified manifest, one block decoder (at most
//! the block's symbols plus [`rekeycast_fec::Limits::max_extra_symbols_per_block`]), and a
//! bounded buffer of symbols that came before the manifest.
//!
//! A relay ([`crate::relay`]) runs the same session over whole messages instead: a decoder
//! for every block, every chunk authenticated and checked to sit at its own position (source
//! symbols before they enter the decoder, reconstructed ones after each decode), the verified
//! pieces handed out for cut-through forwarding and the whole message kept once complete.
//!
//! # Out of sync (DESIGN.md step 8)
//!
//! A member learns it is behind from: its NACK rounds running out for a message
//! ([`ReceiverEvent::OutOfSync`]); a decoded block that failed authentication too many times
//! (an insider's forged repair symbols, RFC 4046 5.2); or datagrams of its group with a higher
//! sequence number whose MAC it cannot check. The last signal is forgeable, so it only raises a
//! rate-limited [`ReceiverEvent::StateCheckNeeded`]; the driver asks a resync endpoint for the
//! latest signed manifest and hands it to [`ReceiverSession::handle_state_answer`], which
//! trusts the signature, not the datagram. Resync itself goes through
//! [`ReceiverSession::handle_resync`]: the same verifier, the same key state.
//!
//! # Call order (as quinn-proto's `Connection`)
//!
//! 1. Inputs: [`ReceiverSession::handle_datagram`] for every datagram received on the group
//!    (and unicast) sockets; [`ReceiverSession::handle_timeout`] when the deadline of
//!    [`ReceiverSession::poll_timeout`] passes; [`ReceiverSession::handle_state_answer`],
//!    [`ReceiverSession::handle_resync`] and [`ReceiverSession::handle_beyond_history`] with
//!    what a resync endpoint answered.
//! 2. Outputs, after any input: [`ReceiverSession::poll_transmit`] until `None` (NACKs and
//!    probe replies), [`ReceiverSession::poll_event`] until `None`, then re-read
//!    [`ReceiverSession::poll_timeout`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rekeycast_fec::{BlockDecoder, Limits, ObjectInfo, Progress};
use rekeycast_nack::{
    BlockKey, Event as NackEvent, FeedbackMode, HeartbeatInfo, Nack, NackScheduler, ObjectId,
    ProbeEcho, SchedulerConfig,
};

use super::chunk::SignedChunk;
use super::manifest::{Manifest, SignedManifest};
use super::{seal_into, ConfigError, Destination, Transmit};
use crate::auth::datagram::{DatagramCounters, DatagramVerifier, Reject};
use crate::auth::heartbeat::{HeartbeatCounters, HeartbeatGuard};
use crate::auth::message::{MessageCounters, MessageReject, MessageVerifier};
use crate::auth::Verified;
use crate::gsa::DataSa;
use crate::lkh::member::VersionedKey;
use crate::lkh::{Degree, MemberError, MemberKeys, RegistrationBundle};
use crate::wire::{self, BodyRepr, DatagramRepr, DatagramType, NackRepr, ObjectKind, Packet};

/// Configuration of a [`ReceiverSession`].
///
/// It deserializes from a configuration file's table (serde): every field may be left out (its
/// default, [`ReceiverConfig::default`]: the [`ReceiverConfig::new`] values with no feedback
/// address, which a deployment must set), durations are whole milliseconds in fields named
/// `*_ms`, the scheduler is a table (`scheduler`), and a key that is not a field is an error.
/// The FEC decoder's bounds (`limits`) are not read from files. Check what was read with
/// [`ReceiverConfig::validate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Where NACKs and probe replies go in the unicast feedback mode: the sender's (or the
    /// member's relay's) address.
    pub feedback_addr: SocketAddr,
    /// The NACK scheduler's configuration. Its `receiver_id` is set from the member id, its
    /// `group_size`, `grtt` and `backoff_factor` are the values to use until the first
    /// heartbeat (the registration should carry them), its `feedback` the NACK mode.
    pub scheduler: SchedulerConfig,
    /// Bounds on what the FEC decoder accepts and keeps.
    #[serde(skip)]
    pub limits: Limits,
    /// Symbols of the current message kept while its manifest has not arrived.
    pub max_buffered_symbols: usize,
    /// Decoded blocks whose chunk fails authentication before the member gives up on a
    /// message and asks for resync (an insider is forging repair symbols). A relay, which
    /// decodes every block of a message, counts the failures of each block on its own.
    pub decode_failure_limit: u32,
    /// Failed signature checks per sequence number before no more are made.
    pub signature_failure_cap: u32,
    /// The shortest time between two state-check requests, and how long a message must have
    /// been quiet before traffic of a later one raises one.
    #[serde(
        rename = "state_check_interval_ms",
        with = "rekeycast_nack::duration_ms"
    )]
    pub state_check_interval: Duration,
    /// How long after the last datagram of a message, in GRTTs, the member takes its initial
    /// transmission to be over when no heartbeat said so.
    pub idle_grtt: f64,
    /// How long without any datagram that passes the MAC check (the sender heartbeats at
    /// least every `heartbeat_max`, 30 s by default) before the member asks a resync endpoint
    /// for the group's state ([`ReceiverEvent::StateCheckNeeded`] with its own next sequence
    /// number): how a member behind a relay that died, or cut off from the group, learns it
    /// is behind; a member that is behind and still has not caught up (its resync failed) is
    /// told again ([`ReceiverEvent::OutOfSync`]). Counted from [`ReceiverSession::start`] or
    /// the first datagram the member hears. Keep it above the sender's (or relay's) `heartbeat_max`, or members of a quiet
    /// group ask for state between heartbeats.
    #[serde(rename = "silence_timeout_ms", with = "rekeycast_nack::duration_ms")]
    pub silence_timeout: Duration,
}

impl Default for ReceiverConfig {
    /// [`ReceiverConfig::new`] with the unspecified feedback address `0.0.0.0:0`: set
    /// `feedback_addr` before use.
    fn default() -> Self {
        Self::new(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)))
    }
}

impl ReceiverConfig {
    /// A configuration with sane defaults that sends its feedback to `feedback_addr`.
    pub fn new(feedback_addr: SocketAddr) -> Self {
        Self {
            feedback_addr,
            scheduler: SchedulerConfig::default(),
            limits: Limits::default(),
            max_buffered_symbols: 256,
            decode_failure_limit: 3,
            signature_failure_cap: crate::auth::message::DEFAULT_SIGNATURE_FAILURE_CAP,
            state_check_interval: Duration::from_secs(1),
            idle_grtt: 4.0,
            silence_timeout: Duration::from_secs(120),
        }
    }

    /// Checks the ranges of every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| Err(ConfigError::Invalid { field, reason });
        if self.decode_failure_limit == 0 {
            return invalid("decode_failure_limit", "must be at least 1");
        }
        if self.signature_failure_cap == 0 {
            return invalid("signature_failure_cap", "must be at least 1");
        }
        if !(self.idle_grtt.is_finite() && self.idle_grtt > 0.0) {
            return invalid("idle_grtt", "must be positive and finite");
        }
        if self.silence_timeout.is_zero() {
            return invalid("silence_timeout", "must not be 0");
        }
        if self.state_check_interval.is_zero() {
            return invalid("state_check_interval", "must not be 0");
        }
        self.scheduler.validate()?;
        Ok(())
    }
}

/// What the member tells the embedding product.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReceiverEvent {
    /// Message `seq` was applied: the group key is now version `version`
    /// ([`ReceiverSession::group_key`] has it).
    GroupKeyUpdated {
        /// The message.
        seq: u64,
        /// The new group key's version.
        version: u32,
    },
    /// Message `seq` brought a new Data SA (the traffic key).
    NewDataSa {
        /// The message.
        seq: u64,
        /// The Data SA.
        data_sa: DataSa,
    },
    /// The member cannot complete message `from_seq` over multicast: resync from it on
    /// (fetch the signed manifest and the member's chunk of each message from `from_seq` to
    /// the latest, in order, and hand them to [`ReceiverSession::handle_resync`]).
    OutOfSync {
        /// The first message the member lacks.
        from_seq: u64,
    },
    /// Traffic of a later message than the member can check arrived, or nothing was heard
    /// for [`ReceiverConfig::silence_timeout`]: ask a resync endpoint for its state (the
    /// latest signed manifest) and hand the answer to
    /// [`ReceiverSession::handle_state_answer`]. The claim is unauthenticated.
    StateCheckNeeded {
        /// The sequence number the traffic claimed (the member's own next one after a
        /// silence).
        claimed_seq: u64,
    },
    /// The member's own chunk of message `seq`, the next message it needs, passed
    /// authentication (the GCKS signed it) and is addressed to the member's leaf, yet the
    /// member's keys do not open it: they are not the keys the GCKS holds for that leaf (a
    /// corrupted or wrong registration bundle or saved key state, or the member was removed
    /// from the group). Resync cannot help (it would serve the same chunk), so the session
    /// takes no more traffic or resync items and [`ReceiverEvent::MustReregister`] follows.
    KeysCannotOpen {
        /// The message whose chunk the keys cannot open.
        seq: u64,
        /// What failed when the chunk was applied.
        error: MemberError,
    },
    /// The member must register again (why: [`ReceiverSession::reregister_reason`]): the
    /// messages it lacks left the history window, its keys cannot open its own chunk
    /// ([`ReceiverEvent::KeysCannotOpen`], raised just before), or the next message it needs
    /// is signed with a GCKS key no message it received announced.
    MustReregister,
    /// Send under the Data SA named `spi` from now on (its activation delay passed; a
    /// member's first Data SA activates at once). Raised by the member endpoint.
    DataSaActivated {
        /// The SA's SPI.
        spi: u32,
    },
    /// Drop the Data SA named `spi`: its successor's deactivation delay passed, so no sender
    /// uses it any more. Raised by the member endpoint.
    DataSaRetired {
        /// The SA's SPI.
        spi: u32,
    },
    /// The newest Data SA reached its soft lifetime and no replacement came: the member
    /// checks the group's state (a refresh may have been missed). Raised by the member
    /// endpoint.
    DataSaSoftLifetime {
        /// The SA's SPI.
        spi: u32,
    },
    /// The newest Data SA reached its hard lifetime with no replacement: it must not be used
    /// any more. Raised by the member endpoint.
    DataSaExpired {
        /// The SA's SPI.
        spi: u32,
    },
    /// Register again now: the jittered moment after [`ReceiverEvent::MustReregister`]
    /// (drawn over the member endpoint's re-registration window) came. Raised by the member
    /// endpoint.
    ReregisterNow,
}

/// Why a member must register again ([`ReceiverEvent::MustReregister`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReregisterReason {
    /// A resync endpoint said the messages the member lacks left its history window.
    BeyondHistory,
    /// The member's keys cannot open its own authenticated chunk of message `seq`
    /// ([`ReceiverEvent::KeysCannotOpen`]).
    KeysCannotOpen {
        /// The message whose chunk the keys cannot open.
        seq: u64,
        /// What failed when the chunk was applied.
        error: MemberError,
    },
    /// The next message the member needs (`seq`, fetched by resync after every earlier one
    /// was applied) is signed with a GCKS key the member does not trust: the GCKS rolled its
    /// signing key and the member missed every message that announced the new key (or the
    /// rollover was a compromised-key rollover, whose announcement the GCKS no longer
    /// serves). The member never trusts a key it was not told of under a key it trusts, so
    /// only registration can give it the new one.
    UnknownSigningKey {
        /// The message signed with the unknown key.
        seq: u64,
        /// The id of the key that message names.
        key_id: crate::session::manifest::KeyId,
    },
}

impl std::fmt::Display for ReregisterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BeyondHistory => f.write_str("the messages it lacks left the group's history"),
            Self::KeysCannotOpen { seq, error } => write!(
                f,
                "its keys cannot open its own authenticated chunk of message {seq} ({error}): \
                 its registration bundle or saved keys are corrupt or not the GCKS's, or it was \
                 removed from the group"
            ),
            Self::UnknownSigningKey { seq, key_id } => write!(
                f,
                "message {seq}, the next it needs, is signed with GCKS key {key_id}, which no \
                 message it received announced: it missed the GCKS's signing-key rollover"
            ),
        }
    }
}

/// Counts of what the session did, beyond the verifier's own counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverCounters {
    /// Datagrams of messages already applied, dropped before the MAC check.
    pub dropped_finished: u64,
    /// Symbols of other blocks than the member's, dropped (before the MAC check once the
    /// manifest named the member's block, after it for symbols buffered before that).
    pub dropped_other_block: u64,
    /// Symbols kept while the manifest was missing.
    pub buffered: u64,
    /// Symbols dropped because that buffer was full.
    pub buffer_full: u64,
    /// Symbols pushed into the block decoder.
    pub symbols_pushed: u64,
    /// Symbols the decoder refused (limits).
    pub decoder_refused: u64,
    /// Messages applied, by any path.
    pub messages_applied: u64,
    /// Of those, from the member's own source symbol.
    pub applied_from_source: u64,
    /// Of those, from a decoded block.
    pub applied_from_decode: u64,
    /// Of those, through resync.
    pub applied_from_resync: u64,
    /// Decoded blocks whose chunk failed authentication.
    pub decode_failures: u64,
    /// Source symbols that claimed to be the member's chunk and failed authentication.
    pub bad_own_chunks: u64,
    /// Verified chunks the key state refused (none expected from an honest GCKS).
    pub apply_failures: u64,
    /// NACKs sent.
    pub nacks_sent: u64,
    /// Probe replies sent.
    pub probe_replies_sent: u64,
    /// State checks requested.
    pub state_checks: u64,
    /// Out-of-sync events raised.
    pub out_of_sync: u64,
    /// Of the state checks, those raised by a silence ([`ReceiverConfig::silence_timeout`]).
    pub silences: u64,
    /// Chunks of other members that failed authentication (a relay verifies every chunk).
    pub bad_chunks: u64,
    /// Transmits skipped because the driver's buffer was too small.
    pub buffer_too_small: u64,
    /// Unicast chunk repairs addressed to this member that passed the MAC check (their chunk
    /// is then checked as a source symbol is).
    pub chunk_repairs_received: u64,
    /// Chunk requests (NACKs asking for the member's own chunk by unicast) sent.
    pub chunk_requests_sent: u64,
}

/// What a state answer told the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateVerdict {
    /// The member has every message up to the answer's latest one (or is receiving it).
    UpToDate,
    /// The member lacks messages: [`ReceiverEvent::OutOfSync`] was raised.
    Behind {
        /// The first message it lacks.
        from_seq: u64,
    },
}

/// Why a state answer or resync item was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResyncError {
    /// The manifest does not parse.
    #[error("malformed manifest")]
    MalformedManifest,
    /// The item is for another message than the next one the member needs.
    #[error("item for message {got}, expected {expected}")]
    WrongMessage {
        /// The message the member needs next.
        expected: u64,
        /// The message the item is for.
        got: u64,
    },
    /// The manifest or chunk failed verification.
    #[error(transparent)]
    Rejected(#[from] crate::auth::message::MessageReject),
    /// The chunk does not serve this member.
    #[error("chunk does not serve this member")]
    NotMyChunk,
    /// The verified chunk did not apply to the member's keys.
    #[error(transparent)]
    Apply(#[from] crate::lkh::MemberError),
    /// The member must register again; it takes no more items.
    #[error("member must re-register")]
    Reregistering,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Receiving,
    /// An out-of-sync event was raised for this message; multicast is still taken.
    Behind(u64),
    MustReregister,
}

/// A datagram the member owes the network.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Nack(Nack),
    ProbeReply { seq: u64, echo: ProbeEcho },
}

/// The state of the message the member is receiving (the next one it needs).
#[derive(Debug)]
struct Incoming {
    seq: u64,
    manifest: Option<Verified<Manifest>>,
    /// The blocks being decoded, once the manifest is verified: the one holding the member's
    /// chunk, or every block of the message for a relay ([`Scope::WholeMessage`]).
    blocks: Vec<BlockState>,
    /// The signed manifest as received (kept for [`Scope::WholeMessage`] only).
    manifest_bytes: Vec<u8>,
    /// The member's own chunk, verified, while the rest of the message completes
    /// ([`Scope::WholeMessage`] only).
    own: Option<Verified<crate::auth::message::Chunk>>,
    /// Some verified piece could not be queued for forwarding ([`MAX_FORWARD`]).
    forward_incomplete: bool,
    /// MAC-checked chunk symbols that came before the manifest: (sbn, esi, data).
    buffered: Vec<(u8, u32, Vec<u8>)>,
    last_activity: Instant,
    /// Whether the initial transmission is known (or taken) to be over.
    expected_complete: bool,
    decode_failures: u32,
}

/// The symbol datagrams a member's session drops unread ([`ReceiverSession::drop_filter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropFilter {
    /// The Rekey SA's group id: symbols of other groups are not dropped by this filter.
    pub group_id: u32,
    /// The Rekey SA's SPI: symbols of other SAs are not dropped by this filter.
    pub spi: u32,
    /// Symbols of messages below this one are dropped (finished).
    pub next_seq: u64,
    /// Chunk symbols of message `next_seq` in another block than this one are dropped
    /// (manifest symbols never are); `None`: no chunk symbol of it is dropped.
    pub own_block: Option<u8>,
}

impl DropFilter {
    /// Whether the session drops a symbol datagram of this group, SPI and sequence number,
    /// of the chunk block `sbn` (`None`: a manifest symbol).
    pub fn drops(&self, group_id: u32, spi: u32, seq: u64, sbn: Option<u8>) -> bool {
        if group_id != self.group_id || spi != self.spi {
            return false;
        }
        if seq != self.next_seq {
            return seq < self.next_seq;
        }
        matches!((self.own_block, sbn), (Some(own), Some(sbn)) if own != sbn)
    }
}

/// One block of the current message and what is known of it.
#[derive(Debug)]
struct BlockState {
    sbn: u8,
    /// The message-wide index of the block's first source symbol (chunk index of ESI 0).
    first_index: u32,
    decoder: BlockDecoder,
    /// Source ESIs that arrived as source symbols and passed authentication
    /// ([`Scope::WholeMessage`] only); reconstructed ones are checked after each decode.
    verified: Vec<bool>,
    /// Decoded and every chunk authenticated ([`Scope::WholeMessage`] only).
    complete: bool,
    /// Decodes of this block that failed authentication: a relay counts them per block, so
    /// that an insider forging repair in a few blocks once each cannot push it (and with it
    /// the whole segment behind it) to resync ([`Scope::WholeMessage`] only).
    decode_failures: u32,
}

impl BlockState {
    fn new(sbn: u8, decoder: BlockDecoder) -> Self {
        Self {
            sbn,
            first_index: 0,
            decoder,
            verified: Vec::new(),
            complete: false,
            decode_failures: 0,
        }
    }
}

/// What a session decodes of each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// A member: the block holding its own chunk; other blocks are dropped before the MAC.
    OwnBlock,
    /// A relay: every block, every chunk authenticated, the whole message kept for
    /// [`ReceiverSession::take_completed`].
    WholeMessage,
}

/// A message a [`Scope::WholeMessage`] session received whole and verified: its signed
/// manifest and every source symbol, each chunk authenticated, and the key its datagrams are
/// MAC'd with.
#[derive(Debug)]
pub(crate) struct CompletedMessage {
    pub(crate) seq: u64,
    pub(crate) mac_key: crate::auth::mac::MacKey,
    pub(crate) manifest: Vec<u8>,
    pub(crate) symbols: Vec<u8>,
    /// `[sbn][esi]`: the source symbols queued for [`ReceiverSession::take_forward`], those
    /// that arrived and those a block decode reconstructed (none if any piece could not be
    /// queued).
    pub(crate) arrived: Vec<Vec<bool>>,
}

/// A verified piece of the current message, ready to be forwarded as is
/// ([`Scope::WholeMessage`]): the manifest once its signature passed, or a source symbol
/// (a whole chunk) once its authentication passed.
#[derive(Debug)]
pub(crate) struct Forward {
    pub(crate) seq: u64,
    /// The message's datagram MAC key.
    pub(crate) mac_key: crate::auth::mac::MacKey,
    pub(crate) object: ObjectKind,
    pub(crate) sbn: u8,
    pub(crate) esi: u32,
    pub(crate) data: Vec<u8>,
    /// Reconstructed by a block decode (and authenticated after it), not received.
    pub(crate) recovered: bool,
}

/// Verified pieces kept for [`ReceiverSession::take_forward`] at most (a driver takes them
/// after every input, so this is only a bound).
const MAX_FORWARD: usize = 65_536;

/// One member's rekey transport. See the [module docs](self) for the call order.
#[derive(Debug)]
pub struct ReceiverSession {
    config: ReceiverConfig,
    keys: MemberKeys,
    degree: Degree,
    datagrams: DatagramVerifier,
    /// Replay windows per sender instance, and bounds on what heartbeats set.
    heartbeats: HeartbeatGuard,
    messages: MessageVerifier,
    scheduler: NackScheduler,
    next_seq: u64,
    current: Option<Incoming>,
    phase: Phase,
    grtt: Duration,
    /// The sequence number of the last heartbeat: probe replies are sealed with its key.
    probe_seq: u64,
    last_state_check: Option<Instant>,
    pending: VecDeque<Pending>,
    events: VecDeque<ReceiverEvent>,
    counters: ReceiverCounters,
    scope: Scope,
    completed: Option<CompletedMessage>,
    forward: VecDeque<Forward>,
    /// When a datagram last passed the MAC check (from the first input on).
    last_heard: Option<Instant>,
    /// Why the member must register again, once it must.
    reregister: Option<ReregisterReason>,
}

impl ReceiverSession {
    /// The session of a member that registered with `bundle`; fails on an invalid
    /// configuration, and on a bundle no GCKS can have issued (no message 0 exists; a leaf is
    /// never the root, nor beyond the deepest level of the tree).
    pub fn new(
        bundle: &RegistrationBundle,
        mut config: ReceiverConfig,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        check_bundle(bundle)?;
        // Member ids are u64; NACKs carry 32 bits, enough to tell receivers apart in traces.
        config.scheduler.receiver_id = bundle.member.0 as u32;
        let scheduler = NackScheduler::new(config.scheduler.clone())?;
        let sa = bundle.rekey_sa;
        let mut datagrams = DatagramVerifier::new(sa.group_id, sa.spi);
        datagrams.add_key(bundle.first_seq, bundle.mac_key.clone());
        let mut messages = MessageVerifier::new(sa.gcks_public_key, sa.group_id, sa.spi, 0);
        messages.expect_identity(sa.wrap_algorithm, sa.degree);
        messages.set_failure_cap(config.signature_failure_cap);
        Ok(Self {
            grtt: config.scheduler.grtt,
            keys: MemberKeys::from_bundle(bundle),
            degree: sa.degree,
            datagrams,
            heartbeats: HeartbeatGuard::new(),
            messages,
            scheduler,
            next_seq: bundle.first_seq,
            probe_seq: bundle.first_seq,
            current: None,
            phase: Phase::Receiving,
            last_state_check: None,
            pending: VecDeque::new(),
            events: VecDeque::new(),
            counters: ReceiverCounters::default(),
            scope: Scope::OwnBlock,
            completed: None,
            forward: VecDeque::new(),
            last_heard: None,
            reregister: None,
            config,
        })
    }

    /// The session of a member that comes back after its own restart, from the keys it
    /// saved (the engine's `persist::save_member_keys` of [`Self::keys`] after each applied message, loaded with
    /// the engine's `persist::load_member_keys`): its next message is `keys.last_seq() + 1`, whose datagram MAC
    /// key is derived from the saved group key. Messages it missed while down come by resync
    /// (the first datagram of a later message raises [`ReceiverEvent::StateCheckNeeded`]).
    /// The Data SA in force is announced again as the first event
    /// ([`ReceiverEvent::NewDataSa`] of message `last_seq`), for a product that restarted too.
    ///
    /// Fails on an invalid configuration, and for keys that never applied a message (saved
    /// right after registration): they cannot derive the next MAC key, so such a member
    /// should simply keep its registration bundle and start again with [`Self::new`].
    pub fn resume(keys: MemberKeys, mut config: ReceiverConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let Some(mac_key) = keys.next_mac_key() else {
            return Err(ConfigError::Invalid {
                field: "keys",
                reason: "have applied no message yet: start from the registration bundle",
            });
        };
        config.scheduler.receiver_id = keys.member().0 as u32;
        let scheduler = NackScheduler::new(config.scheduler.clone())?;
        let sa = *keys.rekey_sa();
        let next_seq = keys.last_seq() + 1;
        let mut datagrams = DatagramVerifier::new(sa.group_id, sa.spi);
        datagrams.add_key(next_seq, mac_key);
        let mut messages = MessageVerifier::new(sa.gcks_public_key, sa.group_id, sa.spi, 0);
        messages.expect_identity(sa.wrap_algorithm, sa.degree);
        messages.set_failure_cap(config.signature_failure_cap);
        let mut events = VecDeque::new();
        if let Some(data_sa) = keys.data_sa() {
            events.push_back(ReceiverEvent::NewDataSa {
                seq: keys.last_seq(),
                data_sa: data_sa.clone(),
            });
        }
        Ok(Self {
            grtt: config.scheduler.grtt,
            keys,
            degree: sa.degree,
            datagrams,
            heartbeats: HeartbeatGuard::new(),
            messages,
            scheduler,
            next_seq,
            probe_seq: next_seq,
            current: None,
            phase: Phase::Receiving,
            last_state_check: None,
            pending: VecDeque::new(),
            events,
            counters: ReceiverCounters::default(),
            scope: Scope::OwnBlock,
            completed: None,
            forward: VecDeque::new(),
            last_heard: None,
            reregister: None,
            config,
        })
    }

    /// The next message the member needs.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The member's current group key, once its first message is applied.
    pub fn group_key(&self) -> Option<&VersionedKey> {
        self.keys.group_key()
    }

    /// The member's key state.
    pub fn keys(&self) -> &MemberKeys {
        &self.keys
    }

    /// The order key of the member's leaf: what it asks a resync endpoint for its chunk with.
    pub fn order_key(&self) -> u32 {
        self.degree.order_key(self.keys.leaf())
    }

    /// Whether the member was told to register again.
    pub fn must_reregister(&self) -> bool {
        self.phase == Phase::MustReregister
    }

    /// Why the member must register again, once it must.
    pub fn reregister_reason(&self) -> Option<ReregisterReason> {
        self.reregister
    }

    /// The GCKS signing key the member trusts now: its registration's, or the last key a
    /// verified rollover put in force.
    pub fn gcks_signing_key(&self) -> &ed25519_dalek::VerifyingKey {
        self.messages.signing_key()
    }

    /// The session's counters.
    pub fn counters(&self) -> &ReceiverCounters {
        &self.counters
    }

    /// The datagram verifier's counters (header, MAC and window rejections).
    pub fn datagram_counters(&self) -> &DatagramCounters {
        self.datagrams.counters()
    }

    /// The heartbeat guard's counters (heartbeats taken, replays and forgeries rejected).
    pub fn heartbeat_counters(&self) -> &HeartbeatCounters {
        self.heartbeats.counters()
    }

    /// The message verifier's counters (signature checks made and failed).
    pub fn message_counters(&self) -> &MessageCounters {
        self.messages.counters()
    }

    /// Blocks the NACK scheduler tracks (a bound on the member's feedback state).
    pub fn tracked_blocks(&self) -> usize {
        self.scheduler.tracked_blocks()
    }

    /// Arms the silence timer ([`ReceiverConfig::silence_timeout`]) from `now`: a driver calls
    /// it once when it starts, so that a member that never hears anything (its relay died
    /// before it registered) asks for the group's state too. Without it the timer starts with
    /// the first datagram heard. Later calls change nothing.
    pub fn start(&mut self, now: Instant) {
        self.last_heard.get_or_insert(now);
    }

    /// What the session would drop before the MAC at the cost of a header read, for a
    /// driver or simulator that can skip such datagrams without handing them over: the
    /// symbol datagrams of the Rekey SA ([`DropFilter::group_id`], [`DropFilter::spi`]) with a
    /// sequence number below [`DropFilter::next_seq`], and, for that message, chunk symbols of
    /// blocks other than [`DropFilter::own_block`] once the verified manifest named it.
    /// Skipping them changes nothing but the drop counters. `None` when the session must see
    /// every datagram: before it first heard anything or was started (the first datagram
    /// arms its silence timer), once it must re-register, or for a relay (it keeps whole
    /// messages).
    pub fn drop_filter(&self) -> Option<DropFilter> {
        if self.last_heard.is_none()
            || self.phase == Phase::MustReregister
            || self.scope != Scope::OwnBlock
        {
            return None;
        }
        let sa = self.keys.rekey_sa();
        Some(DropFilter {
            group_id: sa.group_id,
            spi: sa.spi,
            next_seq: self.next_seq,
            own_block: self
                .current
                .as_ref()
                .and_then(|c| c.blocks.first())
                .map(|b| b.sbn),
        })
    }

    /// Makes the session decode and verify whole messages (a relay): call before any input.
    pub(crate) fn set_scope(&mut self, scope: Scope) {
        self.scope = scope;
    }

    /// The message just completed whole ([`Scope::WholeMessage`]), once, right after its
    /// [`ReceiverEvent::GroupKeyUpdated`]. A message applied through resync is not whole.
    pub(crate) fn take_completed(&mut self) -> Option<CompletedMessage> {
        self.completed.take()
    }

    /// The next verified piece of the current message to forward ([`Scope::WholeMessage`]).
    pub(crate) fn take_forward(&mut self) -> Option<Forward> {
        self.forward.pop_front()
    }

    /// The datagram MAC key of message `seq`, if the session holds it.
    pub(crate) fn mac_key(&self, seq: u64) -> Option<&crate::auth::mac::MacKey> {
        self.datagrams.key(seq)
    }

    fn push_forward(
        &mut self,
        seq: u64,
        object: ObjectKind,
        (sbn, esi): (u8, u32),
        data: &[u8],
        recovered: bool,
    ) {
        if self.scope != Scope::WholeMessage {
            return;
        }
        if self.forward.len() >= MAX_FORWARD {
            // The driver is not taking them: the message will be sent whole once complete.
            if let Some(incoming) = self.current.as_mut().filter(|c| c.seq == seq) {
                incoming.forward_incomplete = true;
            }
            return;
        }
        let Some(mac_key) = self.datagrams.key(seq).cloned() else {
            return;
        };
        self.forward.push_back(Forward {
            seq,
            mac_key,
            object,
            sbn,
            esi,
            data: data.to_vec(),
            recovered,
        });
    }

    /// A datagram arrived from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let _ = from;
        self.last_heard.get_or_insert(now);
        if self.phase == Phase::MustReregister || self.drop_before_mac(bytes) {
            return;
        }
        let datagram = match self.datagrams.check(bytes) {
            Ok(datagram) => datagram,
            Err(Reject::Ahead(seq)) => {
                self.lagging(now, seq);
                return;
            }
            Err(_) => return,
        };
        let seq = datagram.seq();
        // A heartbeat counts as heard only once its replay window takes it (see
        // handle_heartbeat): replayed heartbeats must not keep the silence timer quiet.
        if !matches!(datagram.body(), BodyRepr::Heartbeat(_)) {
            self.last_heard = Some(now);
        }
        match datagram.body() {
            BodyRepr::Symbol(symbol) if seq == self.next_seq => match symbol.object {
                ObjectKind::Manifest => self.handle_manifest(now, seq, symbol.data),
                ObjectKind::Chunks => {
                    self.handle_chunk_symbol(now, seq, symbol.sbn, symbol.esi, symbol.data)
                }
            },
            BodyRepr::Symbol(_) => self.counters.dropped_finished += 1,
            BodyRepr::Heartbeat(heartbeat) => {
                let heartbeat = heartbeat.clone();
                self.handle_heartbeat(now, seq, &heartbeat);
            }
            BodyRepr::Nack(nack) if seq == self.next_seq => {
                if let Some(object) = ObjectId::from_u8(nack.object as u8) {
                    let block = BlockKey {
                        seq,
                        object,
                        sbn: nack.sbn,
                    };
                    self.scheduler
                        .handle_nack_heard(now, block, nack.round, nack.need);
                }
            }
            BodyRepr::ChunkRepair(repair) if seq == self.next_seq => {
                // Addressed by the leaf's order key: another member's chunk is not ours to
                // check (a relay serving multi-unicast members sends each its own).
                if repair.receiver_id == self.order_key() {
                    self.counters.chunk_repairs_received += 1;
                    let (sbn, esi) = (repair.sbn, repair.esi);
                    let chunk = repair.chunk.to_vec();
                    self.handle_chunk_symbol(now, seq, sbn, esi, &chunk);
                }
            }
            BodyRepr::ChunkRepair(_) => self.counters.dropped_finished += 1,
            BodyRepr::Nack(_)
            | BodyRepr::ChunkRequest(_)
            | BodyRepr::ProbeReply(_)
            | BodyRepr::Delivery(_)
            | BodyRepr::Ack(_) => {}
        }
        self.pump(now);
    }

    /// Time passed: NACK timers fire, rounds end, a quiet message's initial transmission is
    /// taken to be over.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.idle_deadline() {
            if deadline <= now {
                self.expect_complete(now);
            }
        }
        if self
            .silence_deadline()
            .is_some_and(|deadline| deadline <= now)
        {
            self.last_heard = Some(now);
            match self.phase {
                Phase::Receiving => {
                    self.last_state_check = Some(now);
                    self.counters.state_checks += 1;
                    self.counters.silences += 1;
                    self.events.push_back(ReceiverEvent::StateCheckNeeded {
                        claimed_seq: self.next_seq,
                    });
                }
                // A resync that failed (or whose request the driver dropped): ask again.
                Phase::Behind(from_seq) => {
                    self.counters.silences += 1;
                    self.counters.out_of_sync += 1;
                    self.events.push_back(ReceiverEvent::OutOfSync { from_seq });
                }
                Phase::MustReregister => {}
            }
        }
        self.scheduler.handle_timeout(now);
        self.pump(now);
    }

    /// The next NACK or probe reply, written into `buf` (at least 128 bytes).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let _ = now;
        while let Some(pending) = self.pending.pop_front() {
            let (seq, body, destination) = match pending {
                Pending::Nack(nack) => {
                    let Some(object) = wire_object(nack.block.object) else {
                        continue;
                    };
                    let repr = NackRepr {
                        object,
                        sbn: nack.block.sbn,
                        round: nack.round,
                        need: nack.need,
                        receiver_id: nack.receiver_id,
                        echo: nack.echo.map(|e| wire::nack::ProbeEcho {
                            timestamp_us: e.timestamp_us,
                            hold_us: e.hold_us,
                        }),
                    };
                    let body = if nack.unicast_chunk && object == ObjectKind::Chunks {
                        // A chunk request names the leaf by its order key: the chunk that
                        // serves it is what the sender looks up.
                        BodyRepr::ChunkRequest(NackRepr {
                            receiver_id: self.order_key(),
                            ..repr
                        })
                    } else {
                        BodyRepr::Nack(repr)
                    };
                    let destination = match nack.destination {
                        _ if nack.unicast_chunk => Destination::Unicast(self.config.feedback_addr),
                        FeedbackMode::Unicast => Destination::Unicast(self.config.feedback_addr),
                        FeedbackMode::Multicast => Destination::Group,
                    };
                    (nack.block.seq, body, destination)
                }
                Pending::ProbeReply { seq, echo } => {
                    let body = BodyRepr::ProbeReply(wire::ProbeReplyRepr {
                        receiver_id: self.config.scheduler.receiver_id,
                        echo: wire::nack::ProbeEcho {
                            timestamp_us: echo.timestamp_us,
                            hold_us: echo.hold_us,
                        },
                    });
                    (seq, body, Destination::Unicast(self.config.feedback_addr))
                }
            };
            let Some(key) = self.datagrams.key(seq).cloned() else {
                continue;
            };
            let repr = DatagramRepr {
                group_id: self.keys.rekey_sa().group_id,
                spi: self.keys.rekey_sa().spi,
                seq,
                body,
                mac: [0; wire::datagram::MAC_LEN],
            };
            let Some(len) = seal_into(&repr, &key, buf) else {
                self.counters.buffer_too_small += 1;
                continue;
            };
            match pending {
                Pending::Nack(nack) if nack.unicast_chunk => self.counters.chunk_requests_sent += 1,
                Pending::Nack(_) => self.counters.nacks_sent += 1,
                Pending::ProbeReply { .. } => self.counters.probe_replies_sent += 1,
            }
            return Some(Transmit { destination, len });
        }
        None
    }

    /// The next deadline, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.scheduler.poll_timeout(),
            self.idle_deadline(),
            self.silence_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next event for the embedding product.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// A resync endpoint's state answer: its latest signed manifest. The signature (checked
    /// here, within the per-message failure cap) says which message is the latest; if the
    /// member lacks one it is not receiving right now, [`ReceiverEvent::OutOfSync`] is raised.
    pub fn handle_state_answer(
        &mut self,
        now: Instant,
        manifest: &[u8],
    ) -> Result<StateVerdict, ResyncError> {
        if self.phase == Phase::MustReregister {
            return Err(ResyncError::Reregistering);
        }
        let seq = SignedManifest::parse(manifest)
            .map_err(|_| ResyncError::MalformedManifest)?
            .manifest
            .seq;
        if seq < self.next_seq {
            return Ok(StateVerdict::UpToDate);
        }
        match self.messages.verify_manifest_fetched(seq, manifest) {
            Ok(_) => {}
            // A later message under a key this member was not told of: it missed a rollover
            // (or the answer is forged). Fetching its messages in order settles which.
            Err(MessageReject::UnknownSigningKey(_)) => {
                self.out_of_sync();
                return Ok(StateVerdict::Behind {
                    from_seq: self.next_seq,
                });
            }
            Err(error) => return Err(error.into()),
        }
        let receiving = seq == self.next_seq
            && self.current.as_ref().is_some_and(|c| {
                now.saturating_duration_since(c.last_activity) < self.config.state_check_interval
            });
        if receiving {
            return Ok(StateVerdict::UpToDate);
        }
        self.out_of_sync();
        Ok(StateVerdict::Behind {
            from_seq: self.next_seq,
        })
    }

    /// One resync item: the signed manifest of message [`Self::next_seq`] and the member's
    /// chunk of it (a whole source symbol). Verified like multicast traffic and applied.
    /// Returns the sequence number applied.
    pub fn handle_resync(
        &mut self,
        now: Instant,
        manifest: &[u8],
        chunk: &[u8],
    ) -> Result<u64, ResyncError> {
        if self.phase == Phase::MustReregister {
            return Err(ResyncError::Reregistering);
        }
        let seq = SignedManifest::parse(manifest)
            .map_err(|_| ResyncError::MalformedManifest)?
            .manifest
            .seq;
        if seq != self.next_seq {
            return Err(ResyncError::WrongMessage {
                expected: self.next_seq,
                got: seq,
            });
        }
        let manifest = match self.messages.verify_manifest_fetched(seq, manifest) {
            Ok(manifest) => manifest.clone(),
            // Every message before `seq` is applied, so none this member lacks can announce
            // the key: it missed the rollover, and only registration can give it the key.
            Err(MessageReject::UnknownSigningKey(key_id)) => {
                self.stop_for_reregistration(ReregisterReason::UnknownSigningKey { seq, key_id });
                return Err(MessageReject::UnknownSigningKey(key_id).into());
            }
            Err(error) => return Err(error.into()),
        };
        let unverified = SignedChunk::parse(chunk, manifest.chunk_auth).map_err(|e| {
            ResyncError::Rejected(crate::auth::message::MessageReject::MalformedChunk(e))
        })?;
        if !unverified.header.serves(self.order_key()) {
            return Err(ResyncError::NotMyChunk);
        }
        let chunk = self.messages.verify_chunk_fetched(&manifest, chunk)?;
        self.apply(now, &chunk, Applied::Resync)?;
        Ok(seq)
    }

    /// A resync endpoint said the messages the member lacks left its history window.
    pub fn handle_beyond_history(&mut self, now: Instant) {
        let _ = now;
        self.stop_for_reregistration(ReregisterReason::BeyondHistory);
    }

    /// The member must register again: it drops the message in progress and what it owes
    /// the network, arms no timer, and takes no more traffic or resync items.
    fn stop_for_reregistration(&mut self, reason: ReregisterReason) {
        if self.phase == Phase::MustReregister {
            return;
        }
        self.phase = Phase::MustReregister;
        self.reregister = Some(reason);
        self.current = None;
        self.pending.clear();
        self.scheduler.retire_before(u64::MAX);
        self.events.push_back(ReceiverEvent::MustReregister);
    }

    /// Cheap drops before the MAC: symbols of finished messages and of other blocks.
    fn drop_before_mac(&mut self, bytes: &[u8]) -> bool {
        let Ok(packet) = Packet::new_checked(bytes) else {
            return false;
        };
        if packet.datagram_type() != DatagramType::Symbol {
            return false;
        }
        let sa = self.keys.rekey_sa();
        if packet.group_id() != sa.group_id || packet.spi() != sa.spi {
            return false;
        }
        if packet.seq() < self.next_seq {
            self.counters.dropped_finished += 1;
            return true;
        }
        if packet.seq() > self.next_seq || self.scope != Scope::OwnBlock {
            return false;
        }
        let Some(my_block) = self
            .current
            .as_ref()
            .and_then(|c| c.blocks.first())
            .map(|b| b.sbn)
        else {
            return false;
        };
        let Ok(symbol) = wire::symbol::Packet::new_checked(packet.body()) else {
            return false;
        };
        if symbol.object() == ObjectKind::Chunks && symbol.sbn() != my_block {
            self.counters.dropped_other_block += 1;
            return true;
        }
        false
    }

    fn incoming(&mut self, now: Instant, seq: u64) -> &mut Incoming {
        if self.current.as_ref().map(|c| c.seq) != Some(seq) {
            self.current = Some(Incoming {
                seq,
                manifest: None,
                blocks: Vec::new(),
                manifest_bytes: Vec::new(),
                own: None,
                forward_incomplete: false,
                buffered: Vec::new(),
                last_activity: now,
                expected_complete: false,
                decode_failures: 0,
            });
        }
        // Just set to Some with this seq above when it was not.
        let current = self.current.as_mut();
        #[allow(clippy::unwrap_used)]
        current.unwrap()
    }

    /// The block decoders a verified manifest calls for: the member's own block, or every
    /// block for a relay. `None` when the member cannot use the manifest's FEC parameters
    /// (beyond its limits, or no block for its leaf).
    fn blocks_for(&self, manifest: &Manifest) -> Option<Vec<BlockState>> {
        let info = ObjectInfo::parse(&manifest.fec_info).ok()?;
        let own = manifest.block_of(self.order_key())?;
        let partition = info.partition();
        let sbns: Vec<u8> = match self.scope {
            Scope::OwnBlock => vec![own],
            // block_count() <= 255 (the SBN is 8 bits).
            Scope::WholeMessage => (0..partition.block_count()).map(|b| b as u8).collect(),
        };
        sbns.into_iter()
            .map(|sbn| {
                let len = partition.block_len(sbn).ok()?;
                let decoder =
                    BlockDecoder::new(sbn, len, info.symbol_size(), &self.config.limits).ok()?;
                let mut state = BlockState::new(sbn, decoder);
                state.first_index = partition.block_start(sbn).ok()?;
                if self.scope == Scope::WholeMessage {
                    state.verified = vec![false; len as usize];
                }
                Some(state)
            })
            .collect()
    }

    fn handle_manifest(&mut self, now: Instant, seq: u64, bytes: &[u8]) {
        let incoming = self.incoming(now, seq);
        incoming.last_activity = now;
        if incoming.manifest.is_some() {
            return;
        }
        let manifest = match self.messages.verify_manifest(seq, bytes) {
            Ok(manifest) => manifest.clone(),
            // Multicast under a key this member was not told of: an out-of-sync signal only
            // (an insider can forge it), settled by fetching the missed messages in order.
            Err(MessageReject::UnknownSigningKey(_)) if seq >= self.next_seq => {
                self.out_of_sync();
                return;
            }
            Err(_) => {
                self.capped_out(seq);
                return;
            }
        };
        self.scheduler.handle_decoded(
            now,
            BlockKey {
                seq,
                object: ObjectId::Manifest,
                sbn: 0,
            },
        );
        let Some(blocks) = self.blocks_for(&manifest) else {
            // A signed manifest whose FEC parameters this member cannot use: only resync can
            // serve it.
            self.current = None;
            self.out_of_sync();
            return;
        };
        let whole = self.scope == Scope::WholeMessage;
        self.push_forward(seq, ObjectKind::Manifest, (0, 0), bytes, false);
        let incoming = self.incoming(now, seq);
        let buffered = std::mem::take(&mut incoming.buffered);
        let expected_complete = incoming.expected_complete;
        incoming.manifest = Some(manifest);
        incoming.blocks = blocks;
        if whole {
            incoming.manifest_bytes = bytes.to_vec();
        }
        for (sbn, esi, data) in buffered {
            if self.current.as_ref().map(|c| c.seq) != Some(seq) {
                return;
            }
            self.push_symbol(now, seq, sbn, esi, &data);
        }
        if expected_complete {
            self.report_need(now, true);
        }
    }

    fn handle_chunk_symbol(&mut self, now: Instant, seq: u64, sbn: u8, esi: u32, data: &[u8]) {
        let max_buffered = self.config.max_buffered_symbols;
        let incoming = self.incoming(now, seq);
        incoming.last_activity = now;
        if incoming.manifest.is_none() {
            if incoming.buffered.len() < max_buffered {
                incoming.buffered.push((sbn, esi, data.to_vec()));
                self.counters.buffered += 1;
            } else {
                self.counters.buffer_full += 1;
            }
            return;
        }
        self.push_symbol(now, seq, sbn, esi, data);
    }

    /// A MAC-checked symbol of the current message, whose manifest is verified.
    fn push_symbol(&mut self, now: Instant, seq: u64, sbn: u8, esi: u32, data: &[u8]) {
        let order_key = self.order_key();
        let Some(incoming) = self.current.as_mut() else {
            return;
        };
        let Some(manifest) = incoming.manifest.as_ref() else {
            return;
        };
        let Some(index) = incoming.blocks.iter().position(|b| b.sbn == sbn) else {
            self.counters.dropped_other_block += 1;
            return;
        };
        let state = &mut incoming.blocks[index];
        let block = BlockKey {
            seq,
            object: ObjectId::Chunks,
            sbn,
        };
        if esi < state.decoder.block_len() {
            match self.scope {
                Scope::OwnBlock => {
                    // A source symbol is a whole chunk: the member's own is checked at once.
                    let serves_me =
                        SignedChunk::parse(data, manifest.chunk_auth).is_ok_and(|chunk| {
                            chunk.header.seq == seq && chunk.header.serves(order_key)
                        });
                    if serves_me {
                        let manifest = manifest.clone();
                        match self.messages.verify_chunk(&manifest, data) {
                            Ok(chunk) => {
                                let _ = self.apply(now, &chunk, Applied::Source);
                            }
                            Err(_) => {
                                self.counters.bad_own_chunks += 1;
                                self.capped_out(seq);
                            }
                        }
                        return;
                    }
                }
                Scope::WholeMessage => {
                    // Every chunk is checked before it goes into the decoder: a forged source
                    // symbol never reaches a decode, let alone a downstream group.
                    let slot = esi as usize;
                    if state.complete || state.verified.get(slot).copied().unwrap_or(true) {
                        return;
                    }
                    let expected_index = state.first_index.checked_add(esi);
                    match self
                        .messages
                        .verify_chunk(manifest, data)
                        .ok()
                        .filter(|chunk| Some(chunk.header.index) == expected_index)
                        .ok_or(())
                    {
                        Ok(chunk) => {
                            state.verified[slot] = true;
                            if chunk.header.serves(order_key) {
                                incoming.own = Some(chunk);
                            }
                            self.push_forward(seq, ObjectKind::Chunks, (sbn, esi), data, false);
                        }
                        Err(_) => {
                            self.counters.bad_chunks += 1;
                            self.capped_out(seq);
                            return;
                        }
                    }
                }
            }
        }
        let Some(state) = self
            .current
            .as_mut()
            .and_then(|incoming| incoming.blocks.get_mut(index))
        else {
            return;
        };
        let progress = match state.decoder.push(esi, data) {
            Ok(progress) => progress,
            Err(_) => {
                self.counters.decoder_refused += 1;
                return;
            }
        };
        self.counters.symbols_pushed += 1;
        match progress {
            Progress::Decoded => match self.scope {
                Scope::OwnBlock => self.decoded(now, seq),
                Scope::WholeMessage => self.decoded_whole(now, seq, index),
            },
            Progress::Pending { needed } => {
                let needed = u16::try_from(needed).unwrap_or(u16::MAX);
                self.scheduler.handle_need(now, block, needed);
            }
            Progress::Duplicate | Progress::AlreadyDecoded => {}
        }
    }

    /// The member's block decoded: find its chunk among the block's source symbols and verify
    /// it; a failure means forged symbols went into the decode.
    fn decoded(&mut self, now: Instant, seq: u64) {
        let order_key = self.order_key();
        let Some(incoming) = self.current.as_mut() else {
            return;
        };
        let (Some(manifest), Some(state)) = (incoming.manifest.clone(), incoming.blocks.first())
        else {
            return;
        };
        let decoder = &state.decoder;
        let found = (0..decoder.block_len()).find_map(|esi| {
            let data = decoder.source_symbol(esi)?;
            let chunk = SignedChunk::parse(data, manifest.chunk_auth).ok()?;
            chunk.header.serves(order_key).then(|| data.to_vec())
        });
        let verified = found.and_then(|data| self.messages.verify_chunk(&manifest, &data).ok());
        match verified {
            Some(chunk) => {
                let _ = self.apply(now, &chunk, Applied::Decode);
            }
            None => self.decode_failed(now, seq, 0),
        }
    }

    /// Block `index` of a whole message decoded: authenticate every chunk the decode
    /// reconstructed; when every block is complete, the message is.
    fn decoded_whole(&mut self, now: Instant, seq: u64, index: usize) {
        let order_key = self.order_key();
        let Some(incoming) = self.current.as_mut() else {
            return;
        };
        let Some(manifest) = incoming.manifest.as_ref() else {
            return;
        };
        let Some(state) = incoming.blocks.get_mut(index) else {
            return;
        };
        let mut failed = false;
        // The source symbols this decode reconstructed, once authenticated: forwarded at once
        // (block-level cut-through), not when the whole message is held.
        let mut recovered: Vec<(u32, Vec<u8>)> = Vec::new();
        for esi in 0..state.decoder.block_len() {
            let slot = esi as usize;
            if state.verified.get(slot).copied().unwrap_or(true) {
                continue;
            }
            let Some(data) = state.decoder.source_symbol(esi) else {
                failed = true;
                break;
            };
            // Not marked verified: a later decode (after a failure) reconstructs it again
            // and it is checked again.
            let expected_index = state.first_index.checked_add(esi);
            match self
                .messages
                .verify_chunk(manifest, data)
                .ok()
                .filter(|chunk| Some(chunk.header.index) == expected_index)
            {
                Some(chunk) => {
                    if chunk.header.serves(order_key) {
                        incoming.own = Some(chunk);
                    }
                    recovered.push((esi, data.to_vec()));
                }
                None => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.decode_failed(now, seq, index);
            return;
        }
        state.complete = true;
        let sbn = state.sbn;
        for &(esi, _) in &recovered {
            // Authenticated above; marked so that the message's adoption does not send them
            // again (`CompletedMessage::arrived`).
            if let Some(slot) = state.verified.get_mut(esi as usize) {
                *slot = true;
            }
        }
        for (esi, data) in recovered {
            self.push_forward(seq, ObjectKind::Chunks, (sbn, esi), &data, true);
        }
        let Some(incoming) = self.current.as_mut() else {
            return;
        };
        if incoming.blocks.iter().all(|b| b.complete) {
            self.complete_whole(now, seq);
        }
    }

    /// Every block of a whole message is decoded and authenticated: apply the relay's own
    /// chunk and keep the message for [`Self::take_completed`].
    fn complete_whole(&mut self, now: Instant, seq: u64) {
        let Some(mac_key) = self.datagrams.key(seq).cloned() else {
            return;
        };
        let Some(incoming) = self.current.as_mut() else {
            return;
        };
        let Some(own) = incoming.own.take() else {
            // A signed manifest placed this leaf in the message, but no chunk of it serves
            // the leaf: only resync can tell.
            self.out_of_sync();
            return;
        };
        let mut symbols = Vec::new();
        for state in &incoming.blocks {
            match state.decoder.block() {
                Some(block) => symbols.extend_from_slice(block),
                None => return,
            }
        }
        let forward_incomplete = incoming.forward_incomplete;
        let arrived = incoming
            .blocks
            .iter()
            .map(|state| {
                if forward_incomplete {
                    vec![false; state.verified.len()]
                } else {
                    state.verified.clone()
                }
            })
            .collect();
        let manifest = std::mem::take(&mut incoming.manifest_bytes);
        if self.apply(now, &own, Applied::Decode).is_ok() {
            self.completed = Some(CompletedMessage {
                seq,
                mac_key,
                manifest,
                symbols,
                arrived,
            });
        }
    }

    /// Decoded block `index` failed authentication: forged repair symbols went into it. Drop
    /// them and ask again; after [`ReceiverConfig::decode_failure_limit`] failures, resync.
    fn decode_failed(&mut self, now: Instant, seq: u64, index: usize) {
        self.counters.decode_failures += 1;
        let limit = self.config.decode_failure_limit;
        let Some(incoming) = self.current.as_mut() else {
            return;
        };
        incoming.decode_failures += 1;
        let mut failures = incoming.decode_failures;
        let expected_complete = incoming.expected_complete;
        let per_block = self.scope == Scope::WholeMessage;
        if let Some(state) = incoming.blocks.get_mut(index) {
            state.decode_failures += 1;
            if per_block {
                // A relay decodes every block: the limit applies to each block, not to the
                // message, or one insider forging a symbol in a few blocks would send the
                // relay and every member behind it to resync.
                failures = state.decode_failures;
            }
            state.decoder.discard_repair_symbols();
            let needed = u16::try_from(state.decoder.needed()).unwrap_or(u16::MAX);
            let block = BlockKey {
                seq,
                object: ObjectId::Chunks,
                sbn: state.sbn,
            };
            self.scheduler.handle_need(now, block, needed);
            if expected_complete {
                self.scheduler
                    .handle_expected_complete(now, block, u8::MAX, needed);
            }
        }
        if failures >= limit {
            self.out_of_sync();
        }
    }

    fn apply(
        &mut self,
        now: Instant,
        chunk: &Verified<crate::auth::message::Chunk>,
        path: Applied,
    ) -> Result<(), crate::lkh::MemberError> {
        let seq = chunk.header.seq;
        let rekeyed = match self.keys.apply(chunk) {
            Ok(rekeyed) => rekeyed,
            Err(error) => {
                self.counters.apply_failures += 1;
                // Every caller hands over a chunk that passed authentication; when it is
                // addressed to this member's leaf and is of the next message, the keys are at
                // fault, and resyncing would only fetch the same chunk again.
                let own_next = seq == self.next_seq && chunk.header.serves(self.order_key());
                if own_next && !matches!(error, MemberError::Stale { .. }) {
                    self.events
                        .push_back(ReceiverEvent::KeysCannotOpen { seq, error });
                    self.stop_for_reregistration(ReregisterReason::KeysCannotOpen { seq, error });
                } else if path != Applied::Resync {
                    self.out_of_sync();
                }
                return Err(error);
            }
        };
        let _ = now;
        // A rollover in force from this message on: saved keys resume under the new key.
        self.keys.set_gcks_public_key(*self.messages.signing_key());
        self.datagrams.add_key(seq + 1, rekeyed.next_mac_key);
        self.next_seq = seq + 1;
        self.current = None;
        self.scheduler.retire_before(self.next_seq);
        self.pending.retain(|p| match p {
            Pending::Nack(nack) => nack.block.seq > seq,
            Pending::ProbeReply { .. } => true,
        });
        if self.phase != Phase::MustReregister {
            self.phase = Phase::Receiving;
        }
        self.counters.messages_applied += 1;
        match path {
            Applied::Source => self.counters.applied_from_source += 1,
            Applied::Decode => self.counters.applied_from_decode += 1,
            Applied::Resync => self.counters.applied_from_resync += 1,
        }
        self.events.push_back(ReceiverEvent::GroupKeyUpdated {
            seq,
            version: rekeyed.group_key_version,
        });
        self.events.push_back(ReceiverEvent::NewDataSa {
            seq,
            data_sa: rekeyed.data_sa,
        });
        Ok(())
    }

    fn handle_heartbeat(&mut self, now: Instant, seq: u64, heartbeat: &wire::HeartbeatRepr) {
        if let Some(manifest) = self.current.as_ref().and_then(|c| c.manifest.as_ref()) {
            self.heartbeats
                .note_verified_group_size(manifest.group_size);
        }
        // The newest message verified: the last one applied.
        let newest_verified = self.next_seq.saturating_sub(1);
        let values = match self.heartbeats.check(now, seq, heartbeat, newest_verified) {
            Ok(values) => values,
            Err(_) => {
                self.datagrams.record_heartbeat_rejected();
                return;
            }
        };
        self.last_heard = Some(now);
        self.grtt = values.grtt;
        let info = HeartbeatInfo {
            grtt: self.grtt,
            group_size: values.group_size,
            backoff_factor: values.backoff_factor,
            probe_timestamp_us: heartbeat.probe_timestamp_us,
            probe_reply_requested: heartbeat.probe_reply_requested,
        };
        self.scheduler.handle_heartbeat(now, &info);
        // A probe reply is sealed with the key of the heartbeat that asked for it.
        self.probe_seq = seq;
        for entry in &heartbeat.entries {
            if entry.seq == self.next_seq {
                let object = match entry.object {
                    ObjectKind::Manifest => ObjectId::Manifest,
                    ObjectKind::Chunks => ObjectId::Chunks,
                };
                let block = BlockKey {
                    seq: entry.seq,
                    object,
                    sbn: entry.sbn,
                };
                self.scheduler
                    .handle_repair_advertisement(now, block, entry.round, entry.count);
            }
        }
        // A periodic heartbeat of the message the member needs: its initial transmission is
        // over (the sender sends one right after it), so whatever is missing is lost.
        if !heartbeat.advertisement && seq == self.next_seq && self.phase == Phase::Receiving {
            self.incoming(now, seq);
            self.expect_complete(now);
        }
    }

    fn expect_complete(&mut self, now: Instant) {
        let Some(incoming) = self.current.as_mut() else {
            return;
        };
        if incoming.expected_complete {
            return;
        }
        incoming.expected_complete = true;
        self.report_need(now, false);
    }

    /// Tells the scheduler what the current message still needs after its initial
    /// transmission: the manifest, or symbols of the member's block.
    fn report_need(&mut self, now: Instant, manifest_just_arrived: bool) {
        let Some(incoming) = self.current.as_ref() else {
            return;
        };
        let seq = incoming.seq;
        if incoming.manifest.is_none() {
            let block = BlockKey {
                seq,
                object: ObjectId::Manifest,
                sbn: 0,
            };
            self.scheduler.handle_expected_complete(now, block, 0, 1);
            return;
        }
        let _ = manifest_just_arrived;
        for state in &incoming.blocks {
            if state.decoder.is_decoded() {
                continue;
            }
            let block = BlockKey {
                seq,
                object: ObjectId::Chunks,
                sbn: state.sbn,
            };
            let needed = u16::try_from(state.decoder.needed()).unwrap_or(u16::MAX);
            self.scheduler
                .handle_expected_complete(now, block, 0, needed);
        }
    }

    fn silence_deadline(&self) -> Option<Instant> {
        if self.phase == Phase::MustReregister {
            return None;
        }
        Some(self.last_heard? + self.config.silence_timeout)
    }

    fn idle_deadline(&self) -> Option<Instant> {
        let incoming = self.current.as_ref()?;
        if incoming.expected_complete || self.phase != Phase::Receiving {
            return None;
        }
        let idle = self
            .grtt
            .mul_f64(self.config.idle_grtt)
            .max(Duration::from_millis(1));
        Some(incoming.last_activity + idle)
    }

    /// Traffic of message `seq` that the member cannot check: it may have missed a message.
    fn lagging(&mut self, now: Instant, seq: u64) {
        if seq <= self.next_seq || self.phase != Phase::Receiving {
            return;
        }
        let interval = self.config.state_check_interval;
        if self
            .last_state_check
            .is_some_and(|at| now.saturating_duration_since(at) < interval)
        {
            return;
        }
        // While the current message is in progress, the next one overlapping it is expected.
        if self
            .current
            .as_ref()
            .is_some_and(|c| now.saturating_duration_since(c.last_activity) < interval)
        {
            return;
        }
        self.last_state_check = Some(now);
        self.counters.state_checks += 1;
        self.events
            .push_back(ReceiverEvent::StateCheckNeeded { claimed_seq: seq });
    }

    /// An insider's bad signatures reached the cap for `seq`: multicast can no longer deliver
    /// that message to this member, so it asks for resync at once instead of NACKing on.
    fn capped_out(&mut self, seq: u64) {
        if seq == self.next_seq && self.messages.is_capped(seq) {
            self.out_of_sync();
        }
    }

    fn out_of_sync(&mut self) {
        if self.phase == Phase::Behind(self.next_seq) || self.phase == Phase::MustReregister {
            return;
        }
        self.phase = Phase::Behind(self.next_seq);
        self.counters.out_of_sync += 1;
        self.pending.retain(|p| !matches!(p, Pending::Nack(_)));
        self.events.push_back(ReceiverEvent::OutOfSync {
            from_seq: self.next_seq,
        });
    }

    /// Moves the scheduler's outputs into the session's queues.
    fn pump(&mut self, now: Instant) {
        let _ = now;
        while let Some(nack) = self.scheduler.poll_nack() {
            if self.phase == Phase::Receiving && nack.block.seq == self.next_seq {
                self.pending.push_back(Pending::Nack(nack));
            }
        }
        while let Some(echo) = self.scheduler.poll_probe_reply() {
            self.pending.push_back(Pending::ProbeReply {
                seq: self.probe_seq,
                echo,
            });
        }
        while let Some(event) = self.scheduler.poll_event() {
            match event {
                NackEvent::OutOfSync { seq, .. } if seq == self.next_seq => self.out_of_sync(),
                _ => {}
            }
        }
    }
}

/// Refuses a registration bundle no GCKS can have issued.
fn check_bundle(bundle: &RegistrationBundle) -> Result<(), ConfigError> {
    let invalid = |field, reason| Err(ConfigError::Invalid { field, reason });
    if bundle.first_seq == 0 {
        return invalid(
            "bundle.first_seq",
            "is 0: rekey messages are numbered from 1",
        );
    }
    if bundle.leaf == crate::lkh::topology::ROOT {
        return invalid("bundle.leaf", "is the root: a member's leaf is below it");
    }
    if bundle.leaf > bundle.rekey_sa.degree.max_node() {
        return invalid(
            "bundle.leaf",
            "is beyond the deepest level of a key tree of the bundle's degree",
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Source,
    Decode,
    Resync,
}

fn wire_object(object: ObjectId) -> Option<ObjectKind> {
    match object {
        ObjectId::Manifest => Some(ObjectKind::Manifest),
        ObjectId::Chunks => Some(ObjectKind::Chunks),
    }
}
