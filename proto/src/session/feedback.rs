//! Replay protection of the feedback a sender takes: NACKs and probe replies, sans-IO.
//!
//! Feedback is MAC'd with the group's key of a message still in the history window, so without
//! more a datagram captured on the wire stays valid for as long as the window holds its
//! message: a replayed NACK would open a new repair round each time, and a replayed probe echo
//! would give a round-trip sample as old as the replay (RFC 4046 5.2 asks for replay
//! protection of rekey traffic). [`FeedbackGuard`] closes both:
//!
//! - it remembers the probe timestamps the sender actually put in its last
//!   [`RECENT_PROBES`] heartbeats: an echo of any other timestamp (older than what the sender
//!   still remembers, from before a restart, from the future, or made up) is stale, and the
//!   datagram carrying it is dropped;
//! - it remembers a digest of the last [`REMEMBERED_FEEDBACK`] feedback datagrams it accepted:
//!   the same bytes again are a replay and are dropped (a genuine receiver's NACKs differ in
//!   their round, need or echo hold time, so it never repeats itself byte for byte);
//! - a probe echo gives one round-trip sample per receiver id and probe timestamp.
//!
//! Together: a replayed datagram is dropped while its digest is remembered, and stale once its
//! probe is forgotten. Only a NACK carrying no echo (a receiver that heard no heartbeat yet)
//! relies on the digests alone. An insider holding the MAC key can still forge fresh feedback
//! with any echo; bounding its effect is the GRTT estimator's job
//! ([`rekeycast_nack::GrttEstimator`]: a rise at most doubles the estimate per probe interval)
//! and the repair aggregator's (a cap per block and round).
//!
//! The guard owns no clock, socket or MAC check: [`super::sender::SenderSession`] runs it after
//! the MAC.

use std::collections::{HashSet, VecDeque};

/// How many of the sender's latest probe timestamps an echo may name.
pub const RECENT_PROBES: usize = 1024;

/// How many accepted feedback datagrams (digests) are remembered against replay.
pub const REMEMBERED_FEEDBACK: usize = 32_768;

/// What to do with one authentic feedback datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen before: act on it. `sample` tells whether its echo (if any) may give a
    /// round-trip sample (the first echo of that probe by that receiver).
    Fresh {
        /// Whether the echo may be used as a GRTT sample.
        sample: bool,
    },
    /// The same bytes were accepted before: drop.
    Replayed,
    /// It echoes a probe the sender did not send or no longer remembers: drop.
    Stale,
}

/// Replay protection of a sender's feedback. See the [module docs](self).
#[derive(Debug, Default)]
pub struct FeedbackGuard {
    /// Probe timestamps sent, ascending (a sender's probe clock never goes back).
    probes: VecDeque<u64>,
    /// Digests of the accepted feedback, with their order for eviction.
    seen: HashSet<u128>,
    seen_order: VecDeque<u128>,
    /// `(receiver id, probe timestamp)` pairs that gave a sample, with their order.
    sampled: HashSet<(u32, u64)>,
    sampled_order: VecDeque<(u32, u64)>,
}

impl FeedbackGuard {
    /// A guard that remembers nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sender put `timestamp_us` in a heartbeat.
    pub fn probe_sent(&mut self, timestamp_us: u64) {
        if self.probes.back().is_some_and(|&last| last >= timestamp_us) {
            // The sender's timestamps strictly increase; keep the list sorted regardless.
            return;
        }
        self.probes.push_back(timestamp_us);
        while self.probes.len() > RECENT_PROBES {
            self.probes.pop_front();
        }
    }

    /// Whether `timestamp_us` is one of the remembered probes.
    pub fn is_recent_probe(&self, timestamp_us: u64) -> bool {
        self.probes.binary_search(&timestamp_us).is_ok()
    }

    /// Checks one authentic feedback datagram (`bytes`, whole) from `receiver_id`, echoing
    /// `echo_timestamp_us` if it carries an echo, and remembers it when fresh.
    pub fn check(
        &mut self,
        bytes: &[u8],
        receiver_id: u32,
        echo_timestamp_us: Option<u64>,
    ) -> Verdict {
        let digest = digest(bytes);
        if self.seen.contains(&digest) {
            return Verdict::Replayed;
        }
        if let Some(timestamp_us) = echo_timestamp_us {
            if !self.is_recent_probe(timestamp_us) {
                return Verdict::Stale;
            }
        }
        remember(&mut self.seen, &mut self.seen_order, digest);
        let sample = match echo_timestamp_us {
            Some(timestamp_us) => remember(
                &mut self.sampled,
                &mut self.sampled_order,
                (receiver_id, timestamp_us),
            ),
            None => false,
        };
        Verdict::Fresh { sample }
    }
}

/// Inserts `item` into a bounded set; returns whether it was new.
fn remember<T: Copy + Eq + std::hash::Hash>(
    set: &mut HashSet<T>,
    order: &mut VecDeque<T>,
    item: T,
) -> bool {
    if !set.insert(item) {
        return false;
    }
    order.push_back(item);
    while order.len() > REMEMBERED_FEEDBACK {
        if let Some(old) = order.pop_front() {
            set.remove(&old);
        }
    }
    true
}

/// A 128-bit digest of a datagram: collisions between distinct feedback are negligible.
fn digest(bytes: &[u8]) -> u128 {
    let hash = blake3::hash(bytes);
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash.as_bytes()[..16]);
    u128::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_are_accepted_once() {
        let mut guard = FeedbackGuard::new();
        guard.probe_sent(100);
        let nack = b"nack of receiver 7";
        assert_eq!(
            guard.check(nack, 7, Some(100)),
            Verdict::Fresh { sample: true }
        );
        assert_eq!(guard.check(nack, 7, Some(100)), Verdict::Replayed);
        // Without an echo, the digest alone.
        assert_eq!(
            guard.check(b"other", 8, None),
            Verdict::Fresh { sample: false }
        );
        assert_eq!(guard.check(b"other", 8, None), Verdict::Replayed);
    }

    #[test]
    fn an_echo_of_a_probe_not_sent_or_forgotten_is_stale() {
        let mut guard = FeedbackGuard::new();
        assert_eq!(guard.check(b"a", 1, Some(5)), Verdict::Stale);
        for timestamp in 1..=(RECENT_PROBES as u64 + 1) {
            guard.probe_sent(timestamp * 10);
        }
        // The first probe (10) is forgotten, the second (20) is not; 25 was never sent.
        assert_eq!(guard.check(b"b", 1, Some(10)), Verdict::Stale);
        assert_eq!(guard.check(b"c", 1, Some(25)), Verdict::Stale);
        assert_eq!(
            guard.check(b"d", 1, Some(20)),
            Verdict::Fresh { sample: true }
        );
        // A stale datagram was not remembered, nor is a going-back timestamp recorded.
        guard.probe_sent(15);
        assert!(!guard.is_recent_probe(15));
    }

    #[test]
    fn one_sample_per_receiver_and_probe() {
        let mut guard = FeedbackGuard::new();
        guard.probe_sent(100);
        assert_eq!(
            guard.check(b"nack 1", 7, Some(100)),
            Verdict::Fresh { sample: true }
        );
        // The same receiver echoing the same probe in another NACK: acted on, no sample.
        assert_eq!(
            guard.check(b"nack 2", 7, Some(100)),
            Verdict::Fresh { sample: false }
        );
        assert_eq!(
            guard.check(b"nack 3", 8, Some(100)),
            Verdict::Fresh { sample: true }
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut guard = FeedbackGuard::new();
        for i in 0..(REMEMBERED_FEEDBACK as u32 + 10) {
            guard.check(&i.to_be_bytes(), i, None);
        }
        assert_eq!(guard.seen.len(), REMEMBERED_FEEDBACK);
        assert_eq!(guard.seen_order.len(), REMEMBERED_FEEDBACK);
        // The oldest were evicted (and would be taken again); the newest are still known.
        assert_eq!(
            guard.check(&0u32.to_be_bytes(), 0, None),
            Verdict::Fresh { sample: false }
        );
        let newest = REMEMBERED_FEEDBACK as u32 + 9;
        assert_eq!(
            guard.check(&newest.to_be_bytes(), newest, None),
            Verdict::Replayed
        );
    }
}
