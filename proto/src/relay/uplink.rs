//! Unicast uplinks, sans-IO: a sender's group datagrams copied by unicast UDP to relays that
//! cannot hear its multicast ([`UnicastRelays`], [`UnicastFanout`]).
//!
//! Most wide-area networks do not route multicast, and that is where a relay is needed first
//! (RFC 4046 5.5 and Figure 3: the hierarchy, here over a network without multicast routing).
//! A sender (the GCKS, or a relay for the relays behind it) with registered unicast relays
//! sends each datagram it would multicast (manifests, source and proactive repair symbols,
//! repair, heartbeats and repair advertisements) to each of them too, and, when nothing on its
//! own segment listens to its group, to them only ([`UnicastRelays::unicast_only`]). The relays
//! NACK by unicast as they always do, so repair travels the same path: the sender's aggregator
//! answers the NACKs of its unicast relays like any receiver's, and the repair goes to them by
//! the same copies. Downstream, each relay multicasts into its own segment as before.
//!
//! # Pacing and batching
//!
//! The copies keep the sender's pacing: a datagram is copied when the sender's token bucket
//! lets it go, so each uplink sees the sender's rate. The datagrams the sender releases
//! together (its burst, or what one driver turn drains) are gathered, up to
//! [`MAX_GATHERED`], and sent relay by relay, so the driver's consecutive transmits to one
//! address become one UDP GSO send where the socket supports it.
//!
//! The copies are byte for byte the sender's datagrams (MAC'd under the group's key): a relay
//! checks them as it would the multicast ones, and nothing here needs a key.

use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::session::{ConfigError, Destination, Transmit};

/// Datagrams gathered before they are copied relay by relay, at most (the driver's GSO batch).
pub const MAX_GATHERED: usize = 32;

/// Unicast relays registered with a sender, most often from a configuration file's table
/// (serde: both fields may be left out; a key that is not a field is an error).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnicastRelays {
    /// The relays' upstream unicast addresses (where each relay takes its upstream traffic
    /// and sends its NACKs from); empty: none.
    pub relays: Vec<SocketAddr>,
    /// Whether the sender sends to the unicast relays only, not to its multicast group (a
    /// sender with nobody on its own segment). Needs at least one relay.
    pub unicast_only: bool,
}

impl UnicastRelays {
    /// Checks the list: no unspecified address or port 0, no address twice, and at least one
    /// relay when [`Self::unicast_only`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |reason| ConfigError::Invalid {
            field: "relays",
            reason,
        };
        if self.unicast_only && self.relays.is_empty() {
            return Err(invalid(
                "must name at least one relay when unicast_only is set",
            ));
        }
        for (i, relay) in self.relays.iter().enumerate() {
            if relay.ip().is_unspecified() || relay.port() == 0 || relay.ip().is_multicast() {
                return Err(invalid(
                    "each must be a unicast address with a port (not unspecified, not 0)",
                ));
            }
            if self.relays[..i].contains(relay) {
                return Err(invalid("must not name a relay twice"));
            }
        }
        Ok(())
    }

    /// Whether any relay is registered.
    pub fn is_empty(&self) -> bool {
        self.relays.is_empty()
    }
}

/// What a [`UnicastFanout`] sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UplinkCounters {
    /// Datagrams copied to unicast relays (one per relay per datagram).
    pub datagrams: u64,
    /// Their bytes (UDP payload).
    pub bytes: u64,
    /// Group datagrams copied (each went to every relay).
    pub group_datagrams: u64,
}

/// Copies a sender's group datagrams to its unicast relays. See the [module docs](self).
///
/// Wrap the sender's `poll_transmit` in [`UnicastFanout::poll_transmit`]: it passes the
/// sender's datagrams through (its group datagrams too, unless unicast only) and interleaves
/// the copies.
#[derive(Debug, Clone, Default)]
pub struct UnicastFanout {
    relays: Vec<SocketAddr>,
    unicast_only: bool,
    /// Group datagrams not yet copied to every relay.
    gathered: VecDeque<Vec<u8>>,
    /// Copying: the relay being sent to and the next gathered datagram for it.
    cursor: Option<(usize, usize)>,
    counters: UplinkCounters,
}

impl UnicastFanout {
    /// A fanout to `relays` (checked with [`UnicastRelays::validate`]).
    pub fn new(relays: UnicastRelays) -> Result<Self, ConfigError> {
        relays.validate()?;
        Ok(Self {
            relays: relays.relays,
            unicast_only: relays.unicast_only,
            ..Self::default()
        })
    }

    /// Replaces the registered relays (the copies already gathered go to the new list).
    pub fn set_relays(&mut self, relays: UnicastRelays) -> Result<(), ConfigError> {
        relays.validate()?;
        self.relays = relays.relays;
        self.unicast_only = relays.unicast_only;
        self.cursor = None;
        if self.relays.is_empty() {
            self.gathered.clear();
        }
        Ok(())
    }

    /// The registered relays.
    pub fn relays(&self) -> &[SocketAddr] {
        &self.relays
    }

    /// What was copied so far.
    pub fn counters(&self) -> &UplinkCounters {
        &self.counters
    }

    /// Whether copies wait to be sent.
    pub fn has_pending(&self) -> bool {
        !self.gathered.is_empty()
    }

    /// The next datagram to send, written into `buf`: a pending copy for a unicast relay, or
    /// what `inner` (the sender's `poll_transmit` into the same buffer) gives, its group
    /// datagrams gathered for the relays on the way.
    pub fn poll_transmit(
        &mut self,
        buf: &mut [u8],
        mut inner: impl FnMut(&mut [u8]) -> Option<Transmit>,
    ) -> Option<Transmit> {
        if self.relays.is_empty() {
            return inner(buf);
        }
        loop {
            if let Some(transmit) = self.next_copy(buf) {
                return Some(transmit);
            }
            let Some(transmit) = inner(buf) else {
                // The sender is done for now: copy what was gathered.
                if self.gathered.is_empty() {
                    return None;
                }
                self.cursor = Some((0, 0));
                continue;
            };
            if transmit.destination != Destination::Group {
                return Some(transmit);
            }
            let Some(datagram) = buf.get(..transmit.len) else {
                return Some(transmit);
            };
            self.gathered.push_back(datagram.to_vec());
            self.counters.group_datagrams += 1;
            if self.gathered.len() >= MAX_GATHERED {
                self.cursor = Some((0, 0));
            }
            if !self.unicast_only {
                return Some(transmit);
            }
        }
    }

    /// The next copy while copying, written into `buf`; `None` when not copying (or done).
    fn next_copy(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        let (relay, index) = self.cursor?;
        let (relay, index) = if index >= self.gathered.len() {
            (relay + 1, 0)
        } else {
            (relay, index)
        };
        let Some(&to) = self.relays.get(relay) else {
            self.cursor = None;
            self.gathered.clear();
            return None;
        };
        let datagram = self.gathered.get(index)?;
        let room = buf.get_mut(..datagram.len())?;
        room.copy_from_slice(datagram);
        self.cursor = Some((relay, index + 1));
        self.counters.datagrams += 1;
        self.counters.bytes += datagram.len() as u64;
        Some(Transmit {
            destination: Destination::Unicast(to),
            len: datagram.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, last], 7000))
    }

    /// A sender that multicasts `group` one-byte datagrams (their bytes 0, 1, ...) and then
    /// one unicast datagram.
    fn sender(group: usize) -> impl FnMut(&mut [u8]) -> Option<Transmit> {
        let mut sent = 0;
        move |buf: &mut [u8]| {
            sent += 1;
            if sent <= group {
                buf[0] = (sent - 1) as u8;
                Some(Transmit {
                    destination: Destination::Group,
                    len: 1,
                })
            } else if sent == group + 1 {
                buf[0] = 0xEE;
                Some(Transmit {
                    destination: Destination::Unicast(relay(99)),
                    len: 1,
                })
            } else {
                None
            }
        }
    }

    fn drain(fanout: &mut UnicastFanout, group: usize) -> Vec<(Destination, u8)> {
        let mut inner = sender(group);
        let mut buf = [0u8; 16];
        std::iter::from_fn(|| {
            let transmit = fanout.poll_transmit(&mut buf, &mut inner)?;
            Some((transmit.destination, buf[0]))
        })
        .collect()
    }

    #[test]
    fn every_group_datagram_goes_to_every_relay_in_runs_per_relay() {
        let mut fanout = UnicastFanout::new(UnicastRelays {
            relays: vec![relay(1), relay(2)],
            unicast_only: false,
        })
        .unwrap();
        let sent = drain(&mut fanout, 3);
        let group = Destination::Group;
        let (a, b) = (
            Destination::Unicast(relay(1)),
            Destination::Unicast(relay(2)),
        );
        assert_eq!(
            sent,
            vec![
                (group, 0),
                (group, 1),
                (group, 2),
                (Destination::Unicast(relay(99)), 0xEE),
                (a, 0),
                (a, 1),
                (a, 2),
                (b, 0),
                (b, 1),
                (b, 2),
            ]
        );
        assert_eq!(
            *fanout.counters(),
            UplinkCounters {
                datagrams: 6,
                bytes: 6,
                group_datagrams: 3
            }
        );
        assert!(!fanout.has_pending());
    }

    #[test]
    fn unicast_only_sends_nothing_to_the_group() {
        let mut fanout = UnicastFanout::new(UnicastRelays {
            relays: vec![relay(1)],
            unicast_only: true,
        })
        .unwrap();
        let sent = drain(&mut fanout, 2);
        assert!(sent.iter().all(|(to, _)| *to != Destination::Group));
        assert_eq!(
            sent.iter()
                .filter(|(to, _)| *to == Destination::Unicast(relay(1)))
                .count(),
            2
        );
    }

    #[test]
    fn a_long_burst_is_copied_in_batches_of_at_most_max_gathered() {
        let mut fanout = UnicastFanout::new(UnicastRelays {
            relays: vec![relay(1)],
            unicast_only: false,
        })
        .unwrap();
        let sent = drain(&mut fanout, MAX_GATHERED + 5);
        // The first batch's copies come right after its last group datagram.
        let first_copy = sent
            .iter()
            .position(|(to, _)| *to == Destination::Unicast(relay(1)))
            .unwrap();
        assert_eq!(first_copy, MAX_GATHERED);
        assert_eq!(fanout.counters().datagrams, (MAX_GATHERED + 5) as u64);
    }

    #[test]
    fn no_relay_passes_everything_through() {
        let mut fanout = UnicastFanout::default();
        assert_eq!(drain(&mut fanout, 2).len(), 3);
        assert_eq!(fanout.counters().datagrams, 0);
    }

    #[test]
    fn invalid_lists_are_refused() {
        let refused = |relays: Vec<SocketAddr>, unicast_only| {
            UnicastRelays {
                relays,
                unicast_only,
            }
            .validate()
            .is_err()
        };
        assert!(refused(vec![], true));
        assert!(refused(vec![relay(1), relay(1)], false));
        assert!(refused(vec![SocketAddr::from(([0, 0, 0, 0], 7000))], false));
        assert!(refused(vec![SocketAddr::from(([198, 18, 0, 1], 0))], false));
        assert!(refused(
            vec![SocketAddr::from(([239, 1, 1, 1], 7000))],
            false
        ));
        assert!(!refused(vec![relay(1), relay(2)], true));
        assert!(!refused(vec![], false));
    }
}
