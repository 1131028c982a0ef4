//! A relay's own count of the members it serves: [`MemberTally`], the distinct addresses that
//! reached the relay (a MAC-checked NACK or probe reply on its downstream feedback port, a
//! request to its resync endpoints) within a window.
//!
//! The GCKS knows whom it assigned to a relay, not who is there: a member that failed over by
//! itself is not reported to it. The relay sees its members when they speak to it, so it counts
//! them itself. A member that loses nothing and never resyncs is silent and not counted, and
//! members behind one address (a NAT, one host) count once: the tally is a lower bound of the
//! members listening, and an exact count of those that needed the relay in the window.
//!
//! It is bounded: at most [`MemberTally::capacity`] addresses are held; a new one past the
//! bound evicts the one heard from longest ago. It owns no clock: time is an argument.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The window of [`MemberTally::default`]: 10 minutes.
pub const DEFAULT_MEMBER_WINDOW: Duration = Duration::from_secs(600);

/// The capacity of [`MemberTally::default`].
pub const DEFAULT_MEMBER_CAPACITY: usize = 65_536;

/// How a member reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contact {
    /// A datagram on the downstream feedback port whose MAC passed (a NACK, a probe reply).
    Feedback,
    /// A request to the relay's resync endpoints.
    Resync,
}

/// What [`MemberTally`] counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberTallyCounters {
    /// Addresses heard from the first time (or again after the window passed).
    pub arrivals: u64,
    /// Contacts by feedback datagram.
    pub feedback_contacts: u64,
    /// Contacts by resync request.
    pub resync_contacts: u64,
    /// Addresses evicted because the tally was full.
    pub evicted: u64,
}

/// The distinct addresses that reached a relay within a window. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct MemberTally {
    window: Duration,
    capacity: usize,
    seen: HashMap<IpAddr, Instant>,
    counters: MemberTallyCounters,
}

impl Default for MemberTally {
    fn default() -> Self {
        Self::new(DEFAULT_MEMBER_WINDOW, DEFAULT_MEMBER_CAPACITY)
    }
}

impl MemberTally {
    /// A tally of the addresses heard from within `window`, holding at most `capacity` (at
    /// least 1).
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            seen: HashMap::new(),
            counters: MemberTallyCounters::default(),
        }
    }

    /// The most addresses held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// `address` reached the relay at `now` by `contact`.
    pub fn heard(&mut self, now: Instant, address: IpAddr, contact: Contact) {
        match contact {
            Contact::Feedback => self.counters.feedback_contacts += 1,
            Contact::Resync => self.counters.resync_contacts += 1,
        }
        let fresh = !self.contains(now, address);
        if fresh {
            self.counters.arrivals += 1;
        }
        if !self.seen.contains_key(&address) && self.seen.len() >= self.capacity {
            self.expire(now);
            if self.seen.len() >= self.capacity {
                if let Some(oldest) = self.seen.iter().min_by_key(|(_, at)| **at).map(|(a, _)| *a) {
                    self.seen.remove(&oldest);
                    self.counters.evicted += 1;
                }
            }
        }
        self.seen.insert(address, now);
    }

    /// The distinct addresses heard from within the window before `now`.
    pub fn count(&self, now: Instant) -> u64 {
        self.seen
            .values()
            .filter(|&&at| now.saturating_duration_since(at) < self.window)
            .count() as u64
    }

    /// Whether `address` was heard from within the window before `now`.
    pub fn contains(&self, now: Instant, address: IpAddr) -> bool {
        self.seen
            .get(&address)
            .is_some_and(|&at| now.saturating_duration_since(at) < self.window)
    }

    /// The counters.
    pub fn counters(&self) -> MemberTallyCounters {
        self.counters
    }

    fn expire(&mut self, now: Instant) {
        let window = self.window;
        self.seen
            .retain(|_, at| now.saturating_duration_since(*at) < window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any instant will do as the origin: the time goes on only as the tests advance it.
    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn distinct_addresses_are_counted_once_each() {
        let now = origin();
        let mut tally = MemberTally::default();
        tally.heard(now, ip(1), Contact::Feedback);
        tally.heard(now, ip(1), Contact::Resync);
        tally.heard(now, ip(2), Contact::Resync);
        assert_eq!(tally.count(now), 2);
        let counters = tally.counters();
        assert_eq!(counters.arrivals, 2);
        assert_eq!(counters.feedback_contacts, 1);
        assert_eq!(counters.resync_contacts, 2);
    }

    #[test]
    fn addresses_silent_for_the_window_are_forgotten() {
        let start = origin();
        let window = Duration::from_secs(10);
        let mut tally = MemberTally::new(window, 16);
        tally.heard(start, ip(1), Contact::Feedback);
        tally.heard(start + Duration::from_secs(5), ip(2), Contact::Feedback);
        assert_eq!(tally.count(start + Duration::from_secs(9)), 2);
        assert_eq!(tally.count(start + Duration::from_secs(10)), 1);
        assert!(!tally.contains(start + Duration::from_secs(10), ip(1)));
        assert!(tally.contains(start + Duration::from_secs(10), ip(2)));
        // Back after the window: an arrival again.
        tally.heard(start + Duration::from_secs(11), ip(1), Contact::Resync);
        assert_eq!(tally.counters().arrivals, 3);
        assert_eq!(tally.count(start + Duration::from_secs(11)), 2);
    }

    #[test]
    fn a_full_tally_evicts_the_address_heard_from_longest_ago() {
        let start = origin();
        let mut tally = MemberTally::new(Duration::from_secs(60), 2);
        tally.heard(start, ip(1), Contact::Feedback);
        tally.heard(start + Duration::from_secs(1), ip(2), Contact::Feedback);
        tally.heard(start + Duration::from_secs(2), ip(3), Contact::Feedback);
        let now = start + Duration::from_secs(3);
        assert_eq!(tally.count(now), 2);
        assert!(!tally.contains(now, ip(1)));
        assert!(tally.contains(now, ip(3)));
        assert_eq!(tally.counters().evicted, 1);
    }
}
