//! Replay and insider attacks on the feedback loop: heartbeats (sender to members) and NACKs
//! and probe replies (members to sender).
//!
//! A heartbeat is accepted per sender instance: a restarted sender (a new instance) is heard
//! at once, and an insider's heartbeat with a huge probe timestamp neither silences the genuine
//! sender nor stretches the members' NACK backoff beyond bounds. Feedback is accepted once:
//! a replayed NACK makes no repair, a replayed probe reply gives no round-trip sample, and a
//! forged echo moves the sender's GRTT by at most a factor of two.
//!
//! Every test runs a real [`SenderSession`] and real members' [`ReceiverSession`]s over a
//! hand-written, lossless, zero-delay loop ([`Net`]) in virtual time, with deterministic
//! seeds; the attacker's datagrams are injected between them.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rekeycast::auth::mac::MacKey;
use rekeycast::lkh::{KeyTree, MemberId, RegistrationBundle};
use rekeycast::session::layout::{build_message, BuiltMessage, MessageParams};
use rekeycast::session::sender::{PreparedMessage, SenderEvent};
use rekeycast::session::{
    ReceiverConfig, ReceiverEvent, ReceiverSession, SenderConfig, SenderSession,
};
use rekeycast::wire::{BodyRepr, DatagramRepr, HeartbeatRepr, ObjectKind};
use rekeycast_testkit::forge::Sa;
use rekeycast_testkit::keys::KeyServer;

const GROUP: u32 = 0x2E91_A7E5;
const SPI: u32 = 11;
const SA: Sa = Sa {
    group_id: GROUP,
    spi: SPI,
};
/// The drivers' buffer: every datagram of the sessions fits it.
const DATAGRAM: usize = 1500;

fn sender_addr() -> SocketAddr {
    SocketAddr::from(([198, 18, 1, 1], 4500))
}

fn member_addr(index: usize) -> SocketAddr {
    SocketAddr::from(([198, 18, 1, 10 + index as u8], 4500))
}

fn attacker_addr() -> SocketAddr {
    SocketAddr::from(([198, 18, 1, 99], 4500))
}

/// The GCKS's key tree and signing key, with a few other members (a small group: every
/// member answers every probe request).
struct Group {
    tree: KeyTree,
    gcks: SigningKey,
    next_id: u64,
}

/// One built rekey message with the MAC key its datagrams are sealed with.
#[derive(Clone)]
struct Message {
    seq: u64,
    built: BuiltMessage,
    mac_key: MacKey,
}

impl Message {
    fn prepared(&self) -> PreparedMessage {
        PreparedMessage::new(self.built.clone(), self.mac_key.clone()).unwrap()
    }
}

impl Group {
    fn new(seed: u64) -> Self {
        let KeyServer { tree, gcks } = KeyServer::new(SA, seed as u8, seed, 0..1);
        Self {
            tree,
            gcks,
            next_id: 1,
        }
    }

    /// Admits a new member: its message and its registration bundle.
    fn admit(&mut self) -> (Message, RegistrationBundle) {
        let me = MemberId(self.next_id);
        self.next_id += 1;
        let batch = self.tree.apply_batch(&[me], &[]).unwrap();
        let params = MessageParams {
            spi: SPI,
            signing_threads: 1,
            ..MessageParams::default()
        };
        let built =
            build_message(&batch, &self.tree.leaves_in_order(), &self.gcks, &params).unwrap();
        let message = Message {
            seq: batch.context.seq,
            built,
            mac_key: batch.mac_key.clone(),
        };
        let bundle = self.tree.join(me).unwrap();
        assert_eq!(bundle.first_seq, message.seq);
        (message, bundle)
    }
}

/// Emits `body` for `seq` and seals it with `key`, as an insider holding the key can.
fn seal(seq: u64, body: BodyRepr<'_>, key: &MacKey) -> Vec<u8> {
    SA.seal(seq, body, key)
}

/// The sender and its members, joined by a lossless zero-delay network the test controls.
struct Net {
    now: Instant,
    sender: SenderSession,
    members: Vec<ReceiverSession>,
    sender_events: Vec<SenderEvent>,
    member_events: Vec<Vec<ReceiverEvent>>,
    /// Every datagram the sender multicast, in order, with the time it left.
    sent: Vec<(Instant, Vec<u8>)>,
    /// Every datagram a member sent to the sender, with the member's index.
    feedback: Vec<(usize, Vec<u8>)>,
    /// `(member, seq)`: the member loses every chunk symbol of `seq` until the message's
    /// initial transmission is over (it must NACK).
    lose: Option<(usize, u64)>,
}

impl Net {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            now,
            sender: SenderSession::new(SenderConfig::default(), GROUP, SPI, now).unwrap(),
            members: Vec::new(),
            sender_events: Vec::new(),
            member_events: Vec::new(),
            sent: Vec::new(),
            feedback: Vec::new(),
            lose: None,
        }
    }

    fn add_member(&mut self, bundle: &RegistrationBundle, seed: u64) -> usize {
        let mut config = ReceiverConfig::new(sender_addr());
        config.scheduler.seed = seed;
        self.members
            .push(ReceiverSession::new(bundle, config).unwrap());
        self.member_events.push(Vec::new());
        self.members.len() - 1
    }

    fn queue(&mut self, message: &Message) {
        self.sender
            .queue_message(self.now, message.prepared())
            .unwrap();
    }

    /// Whether the sender finished the initial transmission of `seq`.
    fn initial_done(&self, seq: u64) -> bool {
        self.sender_events
            .contains(&SenderEvent::InitialTransmissionDone { seq })
    }

    /// Whether member `index` dropped `repr` on the way.
    fn lost(&self, index: usize, repr: &DatagramRepr<'_>) -> bool {
        let Some((member, seq)) = self.lose else {
            return false;
        };
        member == index
            && repr.seq == seq
            && !self.initial_done(seq)
            && matches!(&repr.body, BodyRepr::Symbol(s) if s.object == ObjectKind::Chunks)
    }

    /// Hands `bytes` to every member, as a multicast datagram from `from`.
    fn send_to_members(&mut self, from: SocketAddr, bytes: &[u8]) {
        for member in &mut self.members {
            member.handle_datagram(self.now, from, bytes);
        }
        self.pump();
    }

    /// Hands `bytes` to the sender from `from`.
    fn send_to_sender(&mut self, from: SocketAddr, bytes: &[u8]) {
        self.sender.handle_datagram(self.now, from, bytes);
        self.pump();
    }

    /// Drains every session's outputs at the current time.
    fn pump(&mut self) {
        let mut buf = vec![0u8; DATAGRAM];
        loop {
            let mut progressed = false;
            while let Some(transmit) = self.sender.poll_transmit(self.now, &mut buf) {
                progressed = true;
                let bytes = buf[..transmit.len].to_vec();
                self.sender_events
                    .extend(std::iter::from_fn(|| self.sender.poll_event()));
                let repr = DatagramRepr::parse(&bytes).unwrap();
                for index in 0..self.members.len() {
                    if !self.lost(index, &repr) {
                        self.members[index].handle_datagram(self.now, sender_addr(), &bytes);
                    }
                }
                self.sent.push((self.now, bytes));
            }
            self.sender_events
                .extend(std::iter::from_fn(|| self.sender.poll_event()));
            for index in 0..self.members.len() {
                while let Some(transmit) = self.members[index].poll_transmit(self.now, &mut buf) {
                    progressed = true;
                    let bytes = buf[..transmit.len].to_vec();
                    self.sender
                        .handle_datagram(self.now, member_addr(index), &bytes);
                    self.feedback.push((index, bytes));
                }
                let events = &mut self.member_events[index];
                events.extend(std::iter::from_fn(|| self.members[index].poll_event()));
            }
            if !progressed {
                break;
            }
        }
    }

    /// Runs until `stop` holds (true) or `limit` of virtual time passes (false).
    fn run(&mut self, limit: Duration, stop: impl Fn(&Self) -> bool) -> bool {
        let end = self.now + limit;
        for _ in 0..1_000_000 {
            self.pump();
            if stop(self) {
                return true;
            }
            let next = std::iter::once(self.sender.poll_timeout())
                .chain(self.members.iter().map(|m| m.poll_timeout()))
                .flatten()
                .min();
            match next {
                Some(next) if next <= end => self.now = self.now.max(next),
                _ => {
                    self.now = end;
                    return false;
                }
            }
            if self.sender.poll_timeout().is_some_and(|at| at <= self.now) {
                self.sender.handle_timeout(self.now);
            }
            for member in &mut self.members {
                if member.poll_timeout().is_some_and(|at| at <= self.now) {
                    member.handle_timeout(self.now);
                }
            }
        }
        panic!("the sessions spun without time passing");
    }

    fn applied(&self, index: usize, seq: u64) -> bool {
        self.member_events[index]
            .iter()
            .any(|e| matches!(e, ReceiverEvent::GroupKeyUpdated { seq: s, .. } if *s == seq))
    }

    /// Queues `message` and runs until every member applied it; returns the virtual time it
    /// took, or `None` past `limit`.
    fn deliver(&mut self, message: &Message, limit: Duration) -> Option<Duration> {
        let start = self.now;
        self.queue(message);
        let seq = message.seq;
        let members = self.members.len();
        self.run(limit, |net| (0..members).all(|i| net.applied(i, seq)))
            .then(|| self.now - start)
    }

    /// The heartbeats the sender multicast since datagram number `from`: `(seq, body)`.
    fn heartbeats_since(&self, from: usize) -> Vec<(u64, HeartbeatRepr)> {
        self.sent[from..]
            .iter()
            .filter_map(|(_, bytes)| {
                let repr = DatagramRepr::parse(bytes).unwrap();
                match repr.body {
                    BodyRepr::Heartbeat(heartbeat) => Some((repr.seq, heartbeat)),
                    _ => None,
                }
            })
            .collect()
    }

    /// The probe timestamps member `index` echoed (NACKs and probe replies) since feedback
    /// datagram number `from`.
    fn echoes_since(&self, from: usize, index: usize) -> Vec<u64> {
        self.feedback[from..]
            .iter()
            .filter(|(member, _)| *member == index)
            .filter_map(
                |(_, bytes)| match DatagramRepr::parse(bytes).unwrap().body {
                    BodyRepr::ProbeReply(reply) => Some(reply.echo.timestamp_us),
                    BodyRepr::Nack(nack) => nack.echo.map(|e| e.timestamp_us),
                    _ => None,
                },
            )
            .collect()
    }

    /// Feedback datagrams of member `index` since number `from` that `keep` selects.
    fn feedback_since(
        &self,
        from: usize,
        index: usize,
        keep: impl Fn(&BodyRepr<'_>) -> bool,
    ) -> Vec<Vec<u8>> {
        self.feedback[from..]
            .iter()
            .filter(|(member, bytes)| {
                *member == index && keep(&DatagramRepr::parse(bytes).unwrap().body)
            })
            .map(|(_, bytes)| bytes.clone())
            .collect()
    }
}

/// A group whose first joiner (member 0) holds the first message, heard over `net`.
fn joined(seed: u64) -> (Group, Net, Message) {
    let mut group = Group::new(seed);
    let mut net = Net::new();
    let (first, bundle) = group.admit();
    net.add_member(&bundle, seed);
    let took = net.deliver(&first, Duration::from_secs(30));
    assert!(took.is_some(), "the first member got its key");
    (group, net, first)
}

/// Whether member 0 heard (and echoed) a heartbeat the sender sent since datagram `sent_from`:
/// it echoes the probe timestamp of the latest heartbeat it accepted.
fn echoed_a_heartbeat_since(net: &Net, sent_from: usize, feedback_from: usize) -> bool {
    let probes: Vec<u64> = net
        .heartbeats_since(sent_from)
        .iter()
        .map(|(_, h)| h.probe_timestamp_us)
        .collect();
    net.echoes_since(feedback_from, 0)
        .iter()
        .any(|ts| probes.contains(ts))
}

/// A GCKS restarted after an hour (its probe clock starts again at zero, as a new session):
/// its first heartbeats are accepted by the member at once, not rejected as replays until the
/// new process has been up longer than the old one.
#[test]
fn a_restarted_sender_is_heard_at_once() {
    let (_group, mut net, first) = joined(41);
    net.run(Duration::from_secs(3600), |_| false);
    let (sent_from, feedback_from) = (net.sent.len(), net.feedback.len());
    // The restart: a new session, the history restored from the store.
    let mut restarted = SenderSession::new(SenderConfig::default(), GROUP, SPI, net.now).unwrap();
    restarted
        .restore_message(net.now, first.prepared())
        .unwrap();
    net.sender = restarted;
    net.run(Duration::from_secs(60), |_| false);
    assert!(
        !net.heartbeats_since(sent_from).is_empty(),
        "the restarted sender heartbeats"
    );
    assert!(
        echoed_a_heartbeat_since(&net, sent_from, feedback_from),
        "the member never accepted a heartbeat of the restarted sender"
    );
    let counters = net.members[0].heartbeat_counters();
    assert_eq!(counters.instances_started, 2, "{counters:?}");
    assert_eq!(counters.rejected(), 0, "{counters:?}");
}

/// An insider (a current member, holding the group's MAC key) resends the sender's latest
/// heartbeat with the largest probe timestamp: the member goes on accepting the genuine
/// sender's heartbeats.
#[test]
fn an_insider_heartbeat_with_a_huge_timestamp_does_not_silence_genuine_ones() {
    let (_group, mut net, first) = joined(42);
    net.run(Duration::from_secs(5), |_| false);
    let (seq, mut forged) = net.heartbeats_since(0).pop().unwrap();
    forged.probe_timestamp_us = u64::MAX - 1;
    forged.advertisement = false;
    let bytes = seal(seq, BodyRepr::Heartbeat(forged), &first.mac_key);
    net.send_to_members(attacker_addr(), &bytes);
    let (sent_from, feedback_from) = (net.sent.len(), net.feedback.len());
    net.run(Duration::from_secs(120), |_| false);
    assert!(
        echoed_a_heartbeat_since(&net, sent_from, feedback_from),
        "the member rejected every genuine heartbeat after the insider's"
    );
    let counters = net.members[0].heartbeat_counters();
    assert_eq!(counters.ahead_of_clock, 1, "{counters:?}");
    assert_eq!(counters.replayed, 0, "{counters:?}");
}

/// An insider's heartbeat claiming the largest GRTT, backoff factor and group size (and the
/// largest timestamp) does not stall the member's NACK repair: the member, which lost every
/// chunk symbol of the next message, still gets its key within a bound of virtual time.
#[test]
fn an_insider_heartbeat_cannot_stall_nack_repair() {
    let (mut group, mut net, first) = joined(43);
    net.run(Duration::from_secs(5), |_| false);
    let (seq, mut forged) = net.heartbeats_since(0).pop().unwrap();
    forged.probe_timestamp_us = u64::MAX - 1;
    forged.grtt_us = u32::MAX;
    forged.backoff_factor = u8::MAX;
    forged.group_size = u32::MAX;
    forged.probe_reply_requested = false;
    forged.advertisement = false;
    let bytes = seal(seq, BodyRepr::Heartbeat(forged.clone()), &first.mac_key);
    net.send_to_members(attacker_addr(), &bytes);
    // The same claims as a sender instance of its own: taken, with its values bounded.
    forged.instance = forged.instance.wrapping_add(1);
    let bytes = seal(seq, BodyRepr::Heartbeat(forged), &first.mac_key);
    net.send_to_members(attacker_addr(), &bytes);
    let counters = *net.members[0].heartbeat_counters();
    assert_eq!(counters.ahead_of_clock, 1, "{counters:?}");
    assert_eq!(counters.values_bounded, 1, "{counters:?}");
    let (second, bundle) = group.admit();
    net.lose = Some((0, second.seq));
    net.add_member(&bundle, 7);
    let took = net.deliver(&second, Duration::from_secs(600));
    println!("insider heartbeat: the member got its key after {took:?} (virtual)");
    let took = took.expect("the member never got its key");
    assert!(
        took < Duration::from_secs(10),
        "NACK repair took {took:?} of virtual time"
    );
}

/// A probe reply captured on the wire and replayed a minute later (and once a second after
/// that) gives the sender no round-trip sample: its GRTT stays near the true value (zero
/// here, so the configured initial value at most), and a late joiner that lost its chunk
/// gets its key after a NACK round, not after a 40 s backoff.
#[test]
fn replayed_probe_replies_keep_the_grtt_and_a_late_joiner_gets_its_key_quickly() {
    let (mut group, mut net, _first) = joined(44);
    net.run(Duration::from_secs(5), |_| false);
    let replies = net.feedback_since(0, 0, |b| matches!(b, BodyRepr::ProbeReply(_)));
    let captured = replies
        .first()
        .expect("the member sent a probe reply")
        .clone();
    let before = net.sender.grtt();
    net.run(Duration::from_secs(60), |_| false);
    for _ in 0..5 {
        net.send_to_sender(attacker_addr(), &captured);
        net.run(Duration::from_secs(1), |_| false);
    }
    let after = net.sender.grtt();
    println!("replayed probe replies: GRTT {before:?} before, {after:?} after");
    assert_eq!(net.sender.counters().replayed_feedback, 5);
    assert!(
        after <= Duration::from_millis(100).max(before),
        "the replays raised the GRTT from {before:?} to {after:?}"
    );
    let (second, bundle) = group.admit();
    let joiner = net.add_member(&bundle, 9);
    net.lose = Some((joiner, second.seq));
    let took = net.deliver(&second, Duration::from_secs(600));
    println!("replayed probe replies: the late joiner got its key after {took:?} (virtual)");
    let took = took.expect("the late joiner never got its key");
    assert!(
        took < Duration::from_secs(5),
        "the late joiner took {took:?} of virtual time"
    );
}

/// NACKs captured on the wire and replayed after their repair was sent make no further repair.
#[test]
fn replayed_nacks_trigger_no_repair() {
    let (mut group, mut net, _first) = joined(45);
    let (second, bundle) = group.admit();
    let feedback_from = net.feedback.len();
    net.lose = Some((0, second.seq));
    net.add_member(&bundle, 3);
    assert!(net.deliver(&second, Duration::from_secs(60)).is_some());
    let nacks = net.feedback_since(feedback_from, 0, |b| matches!(b, BodyRepr::Nack(_)));
    assert!(!nacks.is_empty(), "the member NACKed");
    net.run(Duration::from_secs(2), |_| false);
    let repaired = net.sender.counters().repair_symbols_sent;
    assert!(repaired > 0, "the NACKs were repaired");
    for round in 0..3 {
        for nack in &nacks {
            net.send_to_sender(attacker_addr(), nack);
        }
        net.run(Duration::from_secs(2 + round), |_| false);
    }
    assert_eq!(
        net.sender.counters().repair_symbols_sent,
        repaired,
        "replayed NACKs made repair"
    );
    assert!(
        net.sender.counters().replayed_feedback >= 3 * nacks.len() as u64,
        "{:?}",
        net.sender.counters()
    );
}

/// An insider forges a probe reply echoing a real probe of a minute ago with no hold time: a
/// 60 s round-trip sample. The sender's GRTT at most doubles.
#[test]
fn one_forged_echo_moves_the_grtt_by_at_most_the_bound() {
    let (_group, mut net, first) = joined(46);
    net.run(Duration::from_secs(5), |_| false);
    let old_probe = net.heartbeats_since(0).pop().unwrap().1.probe_timestamp_us;
    net.run(Duration::from_secs(60), |_| false);
    let before = net.sender.grtt();
    let reply = rekeycast::wire::ProbeReplyRepr {
        receiver_id: 0xBAD,
        echo: rekeycast::wire::nack::ProbeEcho {
            timestamp_us: old_probe,
            hold_us: 0,
        },
    };
    let bytes = seal(first.seq, BodyRepr::ProbeReply(reply), &first.mac_key);
    net.send_to_sender(attacker_addr(), &bytes);
    let after = net.sender.grtt();
    println!("forged echo: GRTT {before:?} before, {after:?} after");
    assert!(
        after <= before * 2,
        "one forged echo moved the GRTT from {before:?} to {after:?}"
    );
}
