//! Unicast chunk repair on the sending side: which chunk requests a sender answers.
//!
//! A chunk request ([`crate::wire::BodyRepr::ChunkRequest`]) asks for one datagram sent to
//! the requester's own address, so unlike multicast repair it is not shared by the group and
//! is never suppressed by other members: each request that is answered costs the sender one
//! datagram of its own. [`ChunkRepairLimiter`] bounds that cost per source address with a
//! token bucket (a MAC-checked request can still come from an insider flooding the sender)
//! and answers a member at most once per message and round trip, so that a member whose
//! answer is on its way does not get it twice. What it keeps is bounded: at most
//! [`MAX_SOURCES`] buckets and [`MAX_ANSWERED`] recent answers.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Source addresses whose buckets are kept at most; when full, idle (refilled) buckets are
/// dropped, and a new source is refused if none is idle.
pub const MAX_SOURCES: usize = 65_536;
/// Recent answers remembered at most (for the once-per-round-trip rule).
pub const MAX_ANSWERED: usize = 65_536;

/// Why a chunk request was not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source's token bucket is empty.
    RateLimited,
    /// The same member's chunk of the same message was sent less than a round trip ago.
    AnsweredRecently,
    /// Every bucket is in use and none is idle.
    TooManySources,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-source token buckets and recent answers for unicast chunk repair.
#[derive(Debug)]
pub struct ChunkRepairLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<SocketAddr, Bucket>,
    /// `(seq, receiver id)` answered, with when, oldest first.
    answered: VecDeque<(u64, u32, Instant)>,
}

impl ChunkRepairLimiter {
    /// A limiter answering `rate` requests per second per source, `burst` back to back.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
            answered: VecDeque::new(),
        }
    }

    /// Whether to answer a request from `from` for the chunk of receiver `receiver_id` in
    /// message `seq`, given the current round-trip estimate `grtt`; takes a token when it
    /// says yes.
    pub fn admit(
        &mut self,
        now: Instant,
        from: SocketAddr,
        seq: u64,
        receiver_id: u32,
        grtt: Duration,
    ) -> Result<(), Refusal> {
        while self
            .answered
            .front()
            .is_some_and(|&(_, _, at)| now.saturating_duration_since(at) >= grtt)
        {
            self.answered.pop_front();
        }
        if self
            .answered
            .iter()
            .any(|&(s, r, _)| s == seq && r == receiver_id)
        {
            return Err(Refusal::AnsweredRecently);
        }
        if !self.buckets.contains_key(&from) && self.buckets.len() >= MAX_SOURCES {
            let (rate, burst) = (self.rate, self.burst);
            self.buckets
                .retain(|_, bucket| refilled(bucket, now, rate, burst) < burst);
            if self.buckets.len() >= MAX_SOURCES {
                return Err(Refusal::TooManySources);
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self.buckets.entry(from).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens = refilled(bucket, now, rate, burst);
        bucket.at = bucket.at.max(now);
        if bucket.tokens < 1.0 {
            return Err(Refusal::RateLimited);
        }
        bucket.tokens -= 1.0;
        if self.answered.len() >= MAX_ANSWERED {
            self.answered.pop_front();
        }
        self.answered.push_back((seq, receiver_id, now));
        Ok(())
    }
}

fn refilled(bucket: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    (bucket.tokens + elapsed * rate).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any instant will do: time goes on only as the test advances it.
    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let now = origin();
        let grtt = Duration::from_millis(1);
        let mut limiter = ChunkRepairLimiter::new(10.0, 2);
        assert_eq!(limiter.admit(now, addr(1), 1, 1, grtt), Ok(()));
        assert_eq!(limiter.admit(now, addr(1), 1, 2, grtt), Ok(()));
        assert_eq!(
            limiter.admit(now, addr(1), 1, 3, grtt),
            Err(Refusal::RateLimited)
        );
        // Another source has its own bucket.
        assert_eq!(limiter.admit(now, addr(2), 1, 3, grtt), Ok(()));
        // A tenth of a second refills one token.
        let later = now + Duration::from_millis(100);
        assert_eq!(limiter.admit(later, addr(1), 1, 3, grtt), Ok(()));
        assert_eq!(
            limiter.admit(later, addr(1), 1, 4, grtt),
            Err(Refusal::RateLimited)
        );
    }

    #[test]
    fn a_member_is_answered_once_per_round_trip() {
        let now = origin();
        let grtt = Duration::from_millis(10);
        let mut limiter = ChunkRepairLimiter::new(1000.0, 8);
        assert_eq!(limiter.admit(now, addr(1), 5, 7, grtt), Ok(()));
        assert_eq!(
            limiter.admit(now + Duration::from_millis(5), addr(1), 5, 7, grtt),
            Err(Refusal::AnsweredRecently)
        );
        // Another message, or the same one a round trip later, is answered.
        assert_eq!(limiter.admit(now, addr(1), 6, 7, grtt), Ok(()));
        assert_eq!(
            limiter.admit(now + Duration::from_millis(10), addr(1), 5, 7, grtt),
            Ok(())
        );
    }
}

#[cfg(test)]
mod session_tests {
    //! A sender answering chunk requests and a member taking the answer, over no network.

    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, Instant};

    use crate::lkh::MemberId;
    use crate::session::receiver::{ReceiverConfig, ReceiverEvent, ReceiverSession};
    use crate::session::sender::{SenderConfig, SenderEvent};
    use crate::session::{seal_into, Destination};
    use crate::test_support::{sealed, test_addr, TestGcks};
    use crate::wire::{BodyRepr, ChunkRepairRepr, DatagramRepr, NackRepr, ObjectKind};

    const GROUP: u32 = 31;
    const SPI: u32 = 32;

    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }

    /// A GCKS whose first message (20 members) is sent in full, a member of it, that
    /// message's datagrams, and its MAC key.
    fn setup() -> (
        TestGcks,
        ReceiverSession,
        Vec<Vec<u8>>,
        crate::auth::mac::MacKey,
        Instant,
    ) {
        let mut now = origin();
        let (mut gcks, first) = TestGcks::new(GROUP, SPI, (9, 4), 20, SenderConfig::default(), now);
        let bundle = gcks.tree.join(MemberId(3)).unwrap();
        gcks.queue(now, &first);
        let member =
            ReceiverSession::new(&bundle, ReceiverConfig::new(test_addr(1, 7000))).unwrap();
        let mut sent = Vec::new();
        let mut buf = vec![0u8; 2048];
        let mut done = false;
        while !done {
            while let Some(transmit) = gcks.sender.poll_transmit(now, &mut buf) {
                sent.push(buf[..transmit.len].to_vec());
            }
            while let Some(event) = gcks.sender.poll_event() {
                done |= matches!(event, SenderEvent::InitialTransmissionDone { .. });
            }
            now += Duration::from_millis(1);
        }
        (gcks, member, sent, first.mac_key.clone(), now)
    }

    fn is_manifest(bytes: &[u8]) -> bool {
        matches!(
            DatagramRepr::parse(bytes).unwrap().body,
            BodyRepr::Symbol(symbol) if symbol.object == ObjectKind::Manifest
        )
    }

    fn request(seq: u64, order_key: u32, key: &crate::auth::mac::MacKey) -> Vec<u8> {
        let nack = NackRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            round: 2,
            need: 1,
            receiver_id: order_key,
            echo: None,
        };
        sealed((GROUP, SPI), seq, BodyRepr::ChunkRequest(nack), key)
    }

    fn applied(member: &mut ReceiverSession) -> bool {
        std::iter::from_fn(|| member.poll_event())
            .any(|event| matches!(event, ReceiverEvent::GroupKeyUpdated { .. }))
    }

    /// The first round-1 NACK of a block tells the sender about the loss rate at once (its
    /// need is a fair draw of a NACKing member's), and the message's blocks are repaired for
    /// the rate it shows. The estimate used to move only once the message's first round was
    /// surely over, so the first message of a group at high loss was repaired, round after
    /// round, for the 1% assumed.
    #[test]
    fn a_first_round_nack_moves_the_loss_estimate_at_once() {
        let (mut gcks, member, _sent, key, now) = setup();
        let seq = member.next_seq();
        let before = gcks.sender.loss_estimate();
        let nack = NackRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            round: 1,
            need: 3,
            receiver_id: member.order_key(),
            echo: None,
        };
        let bytes = sealed((GROUP, SPI), seq, BodyRepr::Nack(nack), &key);
        gcks.sender
            .handle_datagram(now, test_addr(50, 7100), &bytes);
        let after = gcks.sender.loss_estimate();
        assert!(after > 2.0 * before, "estimate {before} -> {after}");
        // A later NACK of the same round and block is not a fair draw: it changes nothing.
        let nack = NackRepr { need: 9, ..nack };
        let bytes = sealed((GROUP, SPI), seq, BodyRepr::Nack(nack), &key);
        gcks.sender
            .handle_datagram(now, test_addr(51, 7100), &bytes);
        assert_eq!(gcks.sender.loss_estimate(), after);
    }

    #[test]
    fn a_member_that_lost_every_chunk_symbol_applies_its_unicast_chunk() {
        let (mut gcks, mut member, sent, key, now) = setup();
        let seq = member.next_seq();
        for bytes in sent.iter().filter(|b| is_manifest(b)) {
            member.handle_datagram(now, test_addr(1, 7000), bytes);
        }
        assert!(!applied(&mut member), "no chunk symbol was delivered");

        let requester = test_addr(50, 7100);
        gcks.sender
            .handle_datagram(now, requester, &request(seq, member.order_key(), &key));
        let mut buf = vec![0u8; 2048];
        let transmit = gcks.sender.poll_transmit(now, &mut buf).unwrap();
        assert_eq!(transmit.destination, Destination::Unicast(requester));
        let answer = buf[..transmit.len].to_vec();
        let repair = match DatagramRepr::parse(&answer).unwrap().body {
            BodyRepr::ChunkRepair(repair) => repair,
            other => panic!("not a chunk repair: {other:?}"),
        };
        assert_eq!(repair.receiver_id, member.order_key());
        let counters = *gcks.sender.chunk_repair_counters();
        assert_eq!(counters.requests_received, 1);
        assert_eq!(counters.repairs_sent, 1);
        assert_eq!(counters.bytes_sent, answer.len() as u64);

        // The same chunk addressed to another leaf is not this member's to take.
        let other = ChunkRepairRepr {
            receiver_id: member.order_key() + 1,
            ..repair
        };
        let misaddressed = sealed((GROUP, SPI), seq, BodyRepr::ChunkRepair(other), &key);
        member.handle_datagram(now, test_addr(1, 7000), &misaddressed);
        assert!(!applied(&mut member));
        assert_eq!(member.counters().chunk_repairs_received, 0);

        // A chunk altered by an insider (valid MAC) fails the chunk's own authentication.
        let mut forged_chunk = repair.chunk.to_vec();
        forged_chunk[30] ^= 0x01;
        let forged = sealed(
            (GROUP, SPI),
            seq,
            BodyRepr::ChunkRepair(ChunkRepairRepr {
                chunk: &forged_chunk,
                ..repair
            }),
            &key,
        );
        member.handle_datagram(now, test_addr(1, 7000), &forged);
        assert!(!applied(&mut member));
        assert_eq!(member.counters().bad_own_chunks, 1);

        member.handle_datagram(now, test_addr(1, 7000), &answer);
        assert!(applied(&mut member), "the unicast chunk applies");
        assert_eq!(member.counters().chunk_repairs_received, 2);
        assert_eq!(member.next_seq(), seq + 1);
    }

    #[test]
    fn chunk_requests_are_limited_per_source_and_answered_once_per_round_trip() {
        let (mut gcks, member, _sent, key, now) = setup();
        let seq = member.next_seq();
        let mut buf = vec![0u8; 2048];
        let flooder = test_addr(60, 7100);
        let burst = SenderConfig::default().chunk_repair_burst;
        // One source asking for many leaves' chunks gets its burst, then nothing.
        for order_key in 0..u32::from(burst as u16) + 10 {
            gcks.sender
                .handle_datagram(now, flooder, &request(seq, order_key + 64, &key));
        }
        let answered = std::iter::from_fn(|| gcks.sender.poll_transmit(now, &mut buf))
            .filter(|t| t.destination == Destination::Unicast(flooder))
            .count();
        let counters = *gcks.sender.chunk_repair_counters();
        assert!(answered as u32 <= burst, "{answered} answers");
        assert!(
            counters.rate_limited + counters.no_chunk >= 10,
            "{counters:?}"
        );

        // A member asking twice within a round trip gets one answer; a replayed request
        // none.
        let member_addr = test_addr(61, 7100);
        let bytes = request(seq, member.order_key(), &key);
        gcks.sender.handle_datagram(now, member_addr, &bytes);
        gcks.sender.handle_datagram(now, member_addr, &bytes);
        let again = {
            let nack = NackRepr {
                object: ObjectKind::Chunks,
                sbn: 0,
                round: 3,
                need: 1,
                receiver_id: member.order_key(),
                echo: None,
            };
            let repr = DatagramRepr {
                group_id: GROUP,
                spi: SPI,
                seq,
                body: BodyRepr::ChunkRequest(nack),
                mac: [0; 16],
            };
            let mut out = vec![0u8; 256];
            let len = seal_into(&repr, &key, &mut out).unwrap();
            out.truncate(len);
            out
        };
        gcks.sender.handle_datagram(now, member_addr, &again);
        let answered = std::iter::from_fn(|| gcks.sender.poll_transmit(now, &mut buf))
            .filter(|t| t.destination == Destination::Unicast(member_addr))
            .count();
        assert_eq!(answered, 1);
        assert!(gcks.sender.chunk_repair_counters().answered_recently >= 1);
    }
}
