//! Multi-unicast members (RFC 4046 5.1, 5.2: rekey messages "are sent via multicast or
//! multi-unicast"): delivery of each message to members that take no multicast, with
//! acknowledgements, retransmission on a backoff, and a bounded number of tries.
//!
//! A sender (the GCKS, or a relay for its subtree) that serves a mix of multicast and unicast
//! members multicasts each message as usual and, beside it, keeps a [`UnicastMembers`]: per
//! unicast member its address, the next message it wants, the tries of the current delivery
//! and when to retransmit it. For each message, each unicast member gets one delivery
//! datagram ([`crate::wire::delivery`]: the signed manifest and its own chunk, sealed with the
//! message's MAC key; in two halves when the caller's datagrams are capped below its size)
//! and acknowledges it ([`crate::wire::ack`]); an unacknowledged delivery
//! is sent again after a timeout that grows by a factor per try, with jitter, and after
//! [`UnicastConfig::max_tries`] the sender gives up on that message for that member
//! ([`UnicastEvent::GaveUp`]): the member learns it is behind from the next delivery or from
//! its silence timer and resyncs as any member does, and the sender resumes with the newest
//! message. What the unicast members cost is counted ([`UnicastCounters`]).
//!
//! The member's side is [`UnicastReceiver`], which sits beside the member's
//! [`ReceiverSession`]: it checks a delivery's MAC with the key the session holds for that
//! message, applies it through the session's resync path (the manifest's signature and the
//! chunk's authenticator are checked there), and answers with an acknowledgement sealed with
//! the MAC key of the next message, which proves it holds the new group key. Before its first
//! message it sends the same acknowledgement (for its bundle's first message, under the
//! bundle's MAC key) to tell its sender where it is, a few times until a delivery arrives.
//!
//! The acknowledgement is meant to serve more than unicast members: a sample of multicast
//! members can send the same datagram to assure the GCKS of delivery, and a relay can
//! aggregate its sample's acknowledgements (the body's count) before passing them upstream.
//! This module handles the unicast members' acknowledgements only.
//!
//! Neither side owns a socket or a clock: time is an argument, datagrams are polled.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::auth::mac::MacKey;
use crate::session::receiver::ReceiverSession;
use crate::session::sender::SenderSession;
use crate::session::{seal_into, Destination, Transmit};
use crate::wire::{self, AckRepr, BodyRepr, DatagramRepr, DatagramType, DeliveryRepr, Packet};

/// How a sender delivers to its unicast members.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnicastConfig {
    /// The wait for an acknowledgement after the first try (about two round trips).
    pub initial_timeout: Duration,
    /// The factor the wait grows by after each try.
    pub backoff: u32,
    /// The longest wait between two tries.
    pub max_timeout: Duration,
    /// Tries of one message to one member before the sender gives up on it.
    pub max_tries: u32,
    /// Each wait is lengthened by a random fraction of itself up to this (0 to 1), so that
    /// the retransmissions of members lost together do not leave together.
    pub jitter: f64,
    /// The seed of the jitter's random numbers (runs reproduce).
    pub seed: u64,
}

impl Default for UnicastConfig {
    fn default() -> Self {
        Self {
            initial_timeout: Duration::from_millis(200),
            backoff: 2,
            max_timeout: Duration::from_secs(2),
            max_tries: 6,
            jitter: 0.25,
            seed: 0x0075_6e69_6361_7374,
        }
    }
}

/// What the unicast members cost a sender, and what came of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnicastCounters {
    /// Delivery datagrams sent, first tries and retransmissions.
    pub deliveries_sent: u64,
    /// Of those, retransmissions.
    pub retransmissions: u64,
    /// Bytes of the delivery datagrams sent.
    pub bytes_sent: u64,
    /// Acknowledgements taken (MAC valid, newer than the member's last).
    pub acks_accepted: u64,
    /// Acknowledgements refused: malformed, of another group, for a message whose key the
    /// sender does not hold, with a MAC that does not check, or from an unknown receiver.
    pub acks_rejected: u64,
    /// Acknowledgements that named nothing new (duplicates and replays).
    pub acks_stale: u64,
    /// Messages acknowledged (a member's acknowledgement of several counts each).
    pub messages_acknowledged: u64,
    /// Messages given up on (one per member and message).
    pub gave_up: u64,
}

/// What a [`UnicastMembers`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnicastEvent {
    /// Receiver `receiver_id` acknowledged every message before `next_seq`.
    Acknowledged {
        /// The member's receiver id (its leaf order key).
        receiver_id: u32,
        /// The next message it wants.
        next_seq: u64,
    },
    /// The sender gave up delivering message `seq` to receiver `receiver_id` (tries spent, or
    /// the message left the history): the member must resync.
    GaveUp {
        /// The member's receiver id.
        receiver_id: u32,
        /// The message given up on.
        seq: u64,
    },
}

/// Where a [`UnicastMembers`] finds the messages it delivers and the keys of the
/// acknowledgements it checks.
pub trait DeliverySource {
    /// The signed manifest of message `seq` and the chunk serving order key `receiver_id`.
    fn item(&self, seq: u64, receiver_id: u32) -> Option<(&[u8], &[u8])>;
    /// The datagram MAC key of message `seq`, if held (a sender holds the keys of the
    /// messages in its history and, at the GCKS, the next message's).
    fn mac_key(&self, seq: u64) -> Option<MacKey>;
}

/// A [`SenderSession`]'s history as a [`DeliverySource`], with the next message's MAC key
/// when the caller knows it (the GCKS does: [`crate::lkh::KeyTree::next_mac_key`]).
#[derive(Debug, Clone, Copy)]
pub struct SenderSource<'a> {
    /// The session whose history is delivered.
    pub sender: &'a SenderSession,
    /// The MAC key of the message after the newest in the history, if known.
    pub next_mac_key: Option<&'a MacKey>,
}

impl DeliverySource for SenderSource<'_> {
    fn item(&self, seq: u64, receiver_id: u32) -> Option<(&[u8], &[u8])> {
        let item = self.sender.resync_item(seq, receiver_id).ok()?;
        Some((item.manifest, item.chunk))
    }

    fn mac_key(&self, seq: u64) -> Option<MacKey> {
        if let Some(message) = self.sender.message(seq) {
            return Some(MacKey::from_bytes(message.parts().1));
        }
        let next = self.sender.latest_seq().map_or(seq, |latest| latest + 1);
        self.next_mac_key.filter(|_| seq == next).cloned()
    }
}

#[derive(Debug, Clone)]
struct Member {
    addr: Option<SocketAddr>,
    /// The next message the member wants (it acknowledged every one before).
    wants: u64,
    /// The highest acknowledgement taken, against replays.
    acked: Option<u64>,
    /// Tries of the delivery of `wants` so far.
    tries: u32,
    /// When to try again (or give up), while a delivery is outstanding.
    deadline: Option<Instant>,
    /// Whether a try is queued for the next `poll_transmit`.
    queued: bool,
}

/// A sender's unicast members: delivery, acknowledgement, retransmission, giving up.
///
/// Inputs: [`Self::register`], [`Self::unregister`], [`Self::message_ready`] when a message
/// enters the history, [`Self::handle_ack`] for a datagram of type
/// [`DatagramType::Ack`], [`Self::handle_timeout`]. Outputs: [`Self::poll_transmit`] (with the
/// [`DeliverySource`] to build from), [`Self::poll_timeout`], [`Self::poll_event`].
#[derive(Debug)]
pub struct UnicastMembers {
    config: UnicastConfig,
    group_id: u32,
    spi: u32,
    members: HashMap<u32, Member>,
    /// Outstanding deliveries by deadline.
    deadlines: BTreeSet<(Instant, u32)>,
    /// Members with a try to send now, in order.
    queue: VecDeque<u32>,
    /// Second halves of split deliveries to send next: (member, message).
    halves: VecDeque<(u32, u64)>,
    latest: Option<u64>,
    events: VecDeque<UnicastEvent>,
    counters: UnicastCounters,
    rng: u64,
}

impl UnicastMembers {
    /// A sender of group `group_id` (Rekey SA `spi`) with no unicast member yet.
    pub fn new(config: UnicastConfig, group_id: u32, spi: u32) -> Self {
        Self {
            config,
            group_id,
            spi,
            members: HashMap::new(),
            deadlines: BTreeSet::new(),
            queue: VecDeque::new(),
            halves: VecDeque::new(),
            latest: None,
            events: VecDeque::new(),
            counters: UnicastCounters::default(),
            rng: config.seed,
        }
    }

    /// The counters.
    pub fn counters(&self) -> &UnicastCounters {
        &self.counters
    }

    /// Unicast members registered.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no unicast member is registered.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The next message receiver `receiver_id` wants, if it is registered.
    pub fn wants(&self, receiver_id: u32) -> Option<u64> {
        self.members.get(&receiver_id).map(|m| m.wants)
    }

    /// Registers a unicast member by its receiver id (leaf order key): its address if known
    /// (else its first acknowledgement tells it) and the first message it wants (its
    /// bundle's first sequence number). Registering again replaces the entry.
    pub fn register(&mut self, receiver_id: u32, addr: Option<SocketAddr>, wants: u64) {
        self.unregister(receiver_id);
        self.members.insert(
            receiver_id,
            Member {
                addr,
                wants,
                acked: None,
                tries: 0,
                deadline: None,
                queued: false,
            },
        );
        self.start_if_ready(receiver_id);
    }

    /// Forgets a unicast member (it left, or moved to another sender).
    pub fn unregister(&mut self, receiver_id: u32) {
        if let Some(member) = self.members.remove(&receiver_id) {
            if let Some(at) = member.deadline {
                self.deadlines.remove(&(at, receiver_id));
            }
        }
        self.queue.retain(|&r| r != receiver_id);
    }

    /// Message `seq` entered the history: members that want it and are not busy with an
    /// older one get it now; members the sender gave up on resume with it.
    pub fn message_ready(&mut self, seq: u64) {
        self.latest = Some(self.latest.map_or(seq, |latest| latest.max(seq)));
        let ids: Vec<u32> = self.members.keys().copied().collect();
        for receiver_id in ids {
            self.start_if_ready(receiver_id);
        }
    }

    /// A datagram of type [`DatagramType::Ack`] from `from`. Checked in order: framing, group,
    /// the MAC under the key of the message it names, the receiver, and that it names a
    /// message after the member's last acknowledgement (replays and duplicates are stale).
    /// Returns whether it was taken.
    pub fn handle_ack(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
        source: &impl DeliverySource,
    ) -> bool {
        match self.check_ack(bytes, source) {
            Ok((next_seq, receiver_id)) => self.take_ack(from, receiver_id, next_seq),
            Err(()) => {
                self.counters.acks_rejected += 1;
                false
            }
        }
    }

    fn check_ack(&self, bytes: &[u8], source: &impl DeliverySource) -> Result<(u64, u32), ()> {
        let packet = Packet::new_checked(bytes).map_err(drop)?;
        if packet.datagram_type() != DatagramType::Ack
            || packet.group_id() != self.group_id
            || packet.spi() != self.spi
        {
            return Err(());
        }
        let key = source.mac_key(packet.seq()).ok_or(())?;
        if !key.check(&packet) {
            return Err(());
        }
        match DatagramRepr::parse(bytes).map_err(drop)?.body {
            BodyRepr::Ack(ack) if ack.count == 1 => Ok((packet.seq(), ack.receiver_id)),
            _ => Err(()),
        }
    }

    fn take_ack(&mut self, from: SocketAddr, receiver_id: u32, next_seq: u64) -> bool {
        let Some(member) = self.members.get_mut(&receiver_id) else {
            self.counters.acks_rejected += 1;
            return false;
        };
        if member.acked.is_some_and(|acked| next_seq <= acked) || next_seq < member.wants {
            self.counters.acks_stale += 1;
            return false;
        }
        self.counters.acks_accepted += 1;
        member.acked = Some(next_seq);
        member.addr = Some(from);
        if next_seq > member.wants {
            self.counters.messages_acknowledged += next_seq - member.wants;
            member.wants = next_seq;
            member.tries = 0;
            if let Some(at) = member.deadline.take() {
                self.deadlines.remove(&(at, receiver_id));
            }
            member.queued = false;
            self.queue.retain(|&r| r != receiver_id);
        }
        self.events.push_back(UnicastEvent::Acknowledged {
            receiver_id,
            next_seq,
        });
        self.start_if_ready(receiver_id);
        true
    }

    /// Retransmissions and give-ups due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, receiver_id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let max_tries = self.config.max_tries;
            let Some(member) = self.members.get_mut(&receiver_id) else {
                continue;
            };
            member.deadline = None;
            if member.tries >= max_tries {
                let seq = member.wants;
                self.give_up(receiver_id, seq);
            } else if !member.queued {
                member.queued = true;
                self.queue.push_back(receiver_id);
            }
        }
    }

    /// The next delivery datagram to send, built from `source` into `buf`. A delivery larger
    /// than `buf` goes in two halves (manifest, then chunk), on this call and the next.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        source: &impl DeliverySource,
    ) -> Option<Transmit> {
        while let Some((receiver_id, seq)) = self.halves.pop_front() {
            let Some(addr) = self
                .members
                .get(&receiver_id)
                .filter(|m| m.wants == seq && m.deadline.is_some())
                .and_then(|m| m.addr)
            else {
                continue;
            };
            let Some((key, (_, chunk))) = source.mac_key(seq).zip(source.item(seq, receiver_id))
            else {
                continue;
            };
            if let Some(len) = self.seal_delivery(seq, receiver_id, (&[], chunk), &key, buf) {
                self.counters.deliveries_sent += 1;
                self.counters.bytes_sent += len as u64;
                return Some(Transmit {
                    destination: Destination::Unicast(addr),
                    len,
                });
            }
        }
        while let Some(receiver_id) = self.queue.pop_front() {
            let Some(member) = self.members.get_mut(&receiver_id) else {
                continue;
            };
            member.queued = false;
            let (Some(addr), seq) = (member.addr, member.wants) else {
                continue;
            };
            let built = source.mac_key(seq).zip(source.item(seq, receiver_id));
            let Some((key, (manifest, chunk))) = built else {
                // Out of the history (or never held): the member must resync.
                self.give_up(receiver_id, seq);
                continue;
            };
            let whole =
                wire::datagram::OVERHEAD + wire::delivery::FIXED_LEN + manifest.len() + chunk.len();
            let split = whole > buf.len();
            let part = if split {
                (manifest, &[][..])
            } else {
                (manifest, chunk)
            };
            let Some(len) = self.seal_delivery(seq, receiver_id, part, &key, buf) else {
                self.give_up(receiver_id, seq);
                continue;
            };
            if split {
                self.halves.push_back((receiver_id, seq));
            }
            let wait = self.wait(member_tries(&self.members, receiver_id));
            let Some(member) = self.members.get_mut(&receiver_id) else {
                continue;
            };
            if member.tries > 0 {
                self.counters.retransmissions += 1;
            }
            member.tries += 1;
            let at = now + wait;
            member.deadline = Some(at);
            self.deadlines.insert((at, receiver_id));
            self.counters.deliveries_sent += 1;
            self.counters.bytes_sent += len as u64;
            return Some(Transmit {
                destination: Destination::Unicast(addr),
                len,
            });
        }
        None
    }

    fn seal_delivery(
        &self,
        seq: u64,
        receiver_id: u32,
        (manifest, chunk): (&[u8], &[u8]),
        key: &MacKey,
        buf: &mut [u8],
    ) -> Option<usize> {
        let repr = DatagramRepr {
            group_id: self.group_id,
            spi: self.spi,
            seq,
            body: BodyRepr::Delivery(DeliveryRepr {
                receiver_id,
                manifest,
                chunk,
            }),
            mac: [0; wire::datagram::MAC_LEN],
        };
        seal_into(&repr, key, buf)
    }

    /// The next deadline, if any (a retransmission or a give-up).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(at, _)| at)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<UnicastEvent> {
        self.events.pop_front()
    }

    /// Queues the delivery of the member's wanted message if the history has it and none is
    /// outstanding.
    fn start_if_ready(&mut self, receiver_id: u32) {
        let Some(latest) = self.latest else {
            return;
        };
        let Some(member) = self.members.get_mut(&receiver_id) else {
            return;
        };
        if member.addr.is_none() || member.deadline.is_some() || member.queued {
            return;
        }
        if member.wants > latest {
            return;
        }
        member.queued = true;
        self.queue.push_back(receiver_id);
    }

    fn give_up(&mut self, receiver_id: u32, seq: u64) {
        self.counters.gave_up += 1;
        self.events
            .push_back(UnicastEvent::GaveUp { receiver_id, seq });
        let latest = self.latest;
        if let Some(member) = self.members.get_mut(&receiver_id) {
            if let Some(at) = member.deadline.take() {
                self.deadlines.remove(&(at, receiver_id));
            }
            member.tries = 0;
            // The member resyncs what it lacks; the sender resumes after the newest message
            // (it is delivered as soon as one newer than `seq` exists).
            member.wants = latest.map_or(seq + 1, |latest| latest.max(seq) + 1);
        }
        self.start_if_ready(receiver_id);
    }

    /// The wait after try number `tries + 1`: backoff, cap, jitter.
    fn wait(&mut self, tries: u32) -> Duration {
        let factor = self.config.backoff.max(1).saturating_pow(tries.min(16));
        let base = self
            .config
            .initial_timeout
            .saturating_mul(factor)
            .min(self.config.max_timeout);
        let jitter = self.config.jitter.clamp(0.0, 1.0) * self.next_unit();
        base.mul_f64(1.0 + jitter)
    }

    /// A uniform number in [0, 1) (splitmix64).
    fn next_unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn member_tries(members: &HashMap<u32, Member>, receiver_id: u32) -> u32 {
    members.get(&receiver_id).map_or(0, |m| m.tries)
}

/// What a member's [`UnicastReceiver`] made of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Not a delivery: hand the datagram to the session as usual.
    NotDelivery,
    /// The delivery of message `seq` was applied and will be acknowledged.
    Applied {
        /// The message applied.
        seq: u64,
    },
    /// A delivery already applied came again (the acknowledgement was lost): acknowledged
    /// again.
    Duplicate,
    /// A delivery of a later message than the member wants: handed to the session, which
    /// treats it as a sign it is behind.
    Ahead,
    /// The first half of a split delivery (the manifest), kept for the second.
    Half,
    /// Dropped: of another group or receiver, a MAC that does not check, a second half
    /// without its first, or a manifest or chunk the session refused.
    Dropped,
}

/// The largest manifest half a member keeps (a signed manifest is far smaller).
pub const MAX_MANIFEST_HALF: usize = 4096;

/// What a member's unicast side counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnicastReceiverCounters {
    /// Deliveries applied.
    pub applied: u64,
    /// Deliveries of a message already applied.
    pub duplicates: u64,
    /// Deliveries dropped.
    pub dropped: u64,
    /// Acknowledgements sent (announcements included).
    pub acks_sent: u64,
}

/// The member's side of multi-unicast: takes deliveries, acknowledges them.
#[derive(Debug)]
pub struct UnicastReceiver {
    server: SocketAddr,
    /// The last message applied by delivery and its MAC key, to recognise a duplicate.
    last: Option<(u64, MacKey)>,
    /// The first half of a split delivery of the wanted message: its manifest.
    half: Option<(u64, Vec<u8>)>,
    /// Whether an acknowledgement of the session's next sequence number is owed.
    ack_owed: bool,
    announce_interval: Duration,
    announcements_left: u32,
    announce_at: Option<Instant>,
    counters: UnicastReceiverCounters,
}

impl UnicastReceiver {
    /// Announcements a member sends before its first delivery, at most.
    pub const ANNOUNCEMENTS: u32 = 5;

    /// The unicast side of a member served by `server` (its relay or the GCKS), which it
    /// announces itself to from `now` on every `announce_interval` until a delivery arrives.
    pub fn new(now: Instant, server: SocketAddr, announce_interval: Duration) -> Self {
        Self {
            server,
            last: None,
            half: None,
            ack_owed: true,
            announce_interval,
            announcements_left: Self::ANNOUNCEMENTS,
            announce_at: Some(now),
            counters: UnicastReceiverCounters::default(),
        }
    }

    /// The counters.
    pub fn counters(&self) -> &UnicastReceiverCounters {
        &self.counters
    }

    /// The sender the member acknowledges to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Moves to another sender (failover); it is told at once where the member is.
    pub fn set_server(&mut self, server: SocketAddr) {
        self.server = server;
        self.ack_owed = true;
    }

    /// Takes a datagram if it is a delivery for this member: MAC under the key `session`
    /// holds for its message, then the session's resync path (signature, chunk
    /// authentication, application).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        session: &mut ReceiverSession,
        from: SocketAddr,
        bytes: &[u8],
    ) -> DeliveryOutcome {
        let Ok(packet) = Packet::new_checked(bytes) else {
            return DeliveryOutcome::NotDelivery;
        };
        if packet.datagram_type() != DatagramType::Delivery {
            return DeliveryOutcome::NotDelivery;
        }
        let sa = session.keys().rekey_sa();
        let seq = packet.seq();
        let next = session.next_seq();
        if packet.group_id() != sa.group_id || packet.spi() != sa.spi {
            return self.dropped();
        }
        if seq > next {
            session.handle_datagram(now, from, bytes);
            return DeliveryOutcome::Ahead;
        }
        let key = if seq == next {
            session.mac_key(seq).cloned()
        } else {
            self.last
                .as_ref()
                .filter(|(last, _)| *last == seq)
                .map(|(_, key)| key.clone())
        };
        let Some(key) = key.filter(|key| key.check(&packet)) else {
            return self.dropped();
        };
        let Ok(BodyRepr::Delivery(delivery)) = DatagramRepr::parse(bytes).map(|d| d.body) else {
            return self.dropped();
        };
        if delivery.receiver_id != session.order_key() {
            return self.dropped();
        }
        self.announce_at = None;
        if seq < next {
            self.counters.duplicates += 1;
            self.ack_owed = true;
            return DeliveryOutcome::Duplicate;
        }
        let manifest = match (delivery.manifest.is_empty(), delivery.chunk.is_empty()) {
            (false, true) => {
                // The first half: kept (one, of the wanted message) until the chunk comes.
                if delivery.manifest.len() > MAX_MANIFEST_HALF {
                    return self.dropped();
                }
                self.half = Some((seq, delivery.manifest.to_vec()));
                return DeliveryOutcome::Half;
            }
            (true, _) => match self.half.take() {
                Some((half_seq, manifest)) if half_seq == seq => manifest,
                _ => return self.dropped(),
            },
            (false, false) => delivery.manifest.to_vec(),
        };
        match session.handle_resync(now, &manifest, delivery.chunk) {
            Ok(seq) => {
                self.counters.applied += 1;
                self.last = Some((seq, key));
                self.ack_owed = true;
                DeliveryOutcome::Applied { seq }
            }
            Err(_) => self.dropped(),
        }
    }

    /// The session applied messages some other way (a resync): the sender is told.
    pub fn handle_resynced(&mut self) {
        self.ack_owed = true;
    }

    /// Announcements due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.announce_at.is_some_and(|at| at <= now) {
            self.ack_owed = true;
        }
    }

    /// The next deadline (an announcement), if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.announce_at
    }

    /// The acknowledgement owed, if any: for the session's next message, sealed with that
    /// message's MAC key, to the sender.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        session: &ReceiverSession,
        buf: &mut [u8],
    ) -> Option<Transmit> {
        if !self.ack_owed {
            return None;
        }
        self.ack_owed = false;
        if self.announce_at.is_some_and(|at| at <= now) {
            self.announcements_left = self.announcements_left.saturating_sub(1);
            self.announce_at = (self.announcements_left > 0).then(|| now + self.announce_interval);
        }
        let seq = session.next_seq();
        let key = session.mac_key(seq)?;
        let sa = session.keys().rekey_sa();
        let repr = DatagramRepr {
            group_id: sa.group_id,
            spi: sa.spi,
            seq,
            body: BodyRepr::Ack(AckRepr::own(session.order_key())),
            mac: [0; wire::datagram::MAC_LEN],
        };
        let len = seal_into(&repr, key, buf)?;
        self.counters.acks_sent += 1;
        Some(Transmit {
            destination: Destination::Unicast(self.server),
            len,
        })
    }

    fn dropped(&mut self) -> DeliveryOutcome {
        self.counters.dropped += 1;
        DeliveryOutcome::Dropped
    }
}

#[cfg(test)]
mod tests;
