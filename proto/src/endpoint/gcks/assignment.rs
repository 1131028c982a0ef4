//! The GCKS's assignment of members to relays: which relay a joining member's registration
//! bundle lists first, and the signed directives that move members when a relay dies or joins.
//!
//! [`RelayAssignment`] knows the relays (their contacts, numbered by
//! [`RelayContact::id`]), which of them are live, and how many members it assigned to each. A
//! joiner's directory ([`RelayAssignment::assign`]) lists the live relay with the fewest
//! members first, then the other live relays after it in number order (wrapping), then the
//! GCKS's own contact: the order its failover follows, so the members of one relay spread over
//! the others in turn rather than all falling on the next one... and the GCKS last.
//!
//! When a relay dies ([`RelayAssignment::relay_down`]) its members are spread over the live
//! relays by member id (one move per live relay: "from the dead relay, ids `r` modulo `k`, to
//! live relay `r`"); when a relay joins or comes back ([`RelayAssignment::relay_up`]) it takes
//! a share of every relay's members ("from anywhere, ids 0 modulo `k`, to it"). Members learn
//! either from the [`RelayDirective`] the GCKS signs
//! ([`super::GcksEndpoint::relay_directive`]); joiners from their bundles, which list live
//! relays only. The counts are of assignments, not of the members a relay serves at the moment
//! (a member that failed over by itself is not reported to the GCKS).

use crate::endpoint::directive::{DirectiveMove, RelayDirective, RelayRef};
use crate::lkh::{RelayContact, RelayDirectory};

/// The GCKS's view of its relays. See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct RelayAssignment {
    relays: Vec<AssignedRelay>,
    gcks: Option<RelayContact>,
    issued: u64,
}

#[derive(Debug, Clone)]
struct AssignedRelay {
    contact: RelayContact,
    live: bool,
    members: u64,
}

impl RelayAssignment {
    /// An assignment over `relays` (all live, none with a member) with the GCKS's own contact
    /// `gcks` as every member's last resort.
    pub fn new(relays: Vec<RelayContact>, gcks: Option<RelayContact>) -> Self {
        let mut relays: Vec<AssignedRelay> = relays
            .into_iter()
            .map(|contact| AssignedRelay {
                contact,
                live: true,
                members: 0,
            })
            .collect();
        relays.sort_by_key(|r| r.contact.id);
        relays.dedup_by_key(|r| r.contact.id);
        Self {
            relays,
            gcks,
            issued: 0,
        }
    }

    /// The members assigned to each relay, by relay number, and whether it is live.
    pub fn loads(&self) -> Vec<(u16, bool, u64)> {
        self.relays
            .iter()
            .map(|r| (r.contact.id, r.live, r.members))
            .collect()
    }

    /// The directory of a joining member: the least-loaded live relay (which it is counted
    /// at), the other live relays after it, the GCKS's contact.
    pub fn assign(&mut self) -> RelayDirectory {
        let live: Vec<usize> = (0..self.relays.len())
            .filter(|&i| self.relays[i].live)
            .collect();
        let first = live
            .iter()
            .position(|&i| {
                live.iter()
                    .all(|&j| self.relays[i].members <= self.relays[j].members)
            })
            .unwrap_or(0);
        if let Some(&chosen) = live.get(first) {
            self.relays[chosen].members += 1;
        }
        let relays = (0..live.len())
            .map(|k| self.relays[live[(first + k) % live.len()]].contact.clone())
            .collect();
        RelayDirectory {
            relays,
            gcks: self.gcks.clone(),
        }
    }

    /// Relay `id` died: the directive spreading its members over the live relays (to the GCKS
    /// if none is left). `None` when `id` is unknown or already down.
    pub fn relay_down(&mut self, id: u16) -> Option<RelayDirective> {
        let index = self.index(id)?;
        if !self.relays[index].live {
            return None;
        }
        self.relays[index].live = false;
        let orphans = std::mem::take(&mut self.relays[index].members);
        let live: Vec<usize> = (0..self.relays.len())
            .filter(|&i| self.relays[i].live)
            .collect();
        let moves = if live.is_empty() {
            vec![DirectiveMove {
                from: Some(RelayRef::Relay(id)),
                modulus: 1,
                residue: 0,
                to: RelayRef::Gcks,
            }]
        } else {
            let share = live.len() as u64;
            // At most u16::MAX relays by their numbers.
            let modulus = u16::try_from(live.len()).unwrap_or(u16::MAX);
            live.iter()
                .enumerate()
                .map(|(residue, &i)| {
                    self.relays[i].members += orphans / share;
                    DirectiveMove {
                        from: Some(RelayRef::Relay(id)),
                        modulus,
                        residue: u16::try_from(residue).unwrap_or(0),
                        to: RelayRef::Relay(self.relays[i].contact.id),
                    }
                })
                .collect()
        };
        Some(self.directive(moves))
    }

    /// Relay `id` joined or came back (added with `contact` if it is new): the directive
    /// moving a share of every relay's members to it (one in `live relays`). `None` when it is
    /// already live.
    pub fn relay_up(&mut self, contact: RelayContact) -> Option<RelayDirective> {
        let id = contact.id;
        let index = match self.index(id) {
            Some(index) if self.relays[index].live => return None,
            Some(index) => {
                self.relays[index].live = true;
                self.relays[index].contact = contact;
                index
            }
            None => {
                let at = self.relays.partition_point(|r| r.contact.id < id);
                self.relays.insert(
                    at,
                    AssignedRelay {
                        contact,
                        live: true,
                        members: 0,
                    },
                );
                at
            }
        };
        let live = self.relays.iter().filter(|r| r.live).count() as u64;
        let mut taken = 0;
        for relay in self.relays.iter_mut().filter(|r| r.live) {
            let share = relay.members / live;
            relay.members -= share;
            taken += share;
        }
        self.relays[index].members += taken;
        let modulus = u16::try_from(live).unwrap_or(u16::MAX);
        Some(self.directive(vec![DirectiveMove {
            from: None,
            modulus,
            residue: 0,
            to: RelayRef::Relay(id),
        }]))
    }

    fn index(&self, id: u16) -> Option<usize> {
        self.relays.iter().position(|r| r.contact.id == id)
    }

    fn directive(&mut self, moves: Vec<DirectiveMove>) -> RelayDirective {
        self.issued += 1;
        RelayDirective {
            // The GCKS endpoint fills in its group.
            group_id: 0,
            issued: self.issued,
            moves,
        }
    }

    /// Directives issued so far: the next one's issue number is above it. A GCKS that
    /// restarts sets it from its wall clock ([`Self::set_issued`]) so numbers keep growing.
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// Sets the last issue number (see [`Self::issued`]).
    pub fn set_issued(&mut self, issued: u64) {
        self.issued = self.issued.max(issued);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn contact(id: u16) -> RelayContact {
        RelayContact {
            id,
            group: SocketAddr::from(([239, 0, 0, id as u8], 5000)),
            feedback: SocketAddr::from(([10, 0, 0, id as u8], 5001)),
            resync: Vec::new(),
        }
    }

    fn ids(directory: &RelayDirectory) -> Vec<u16> {
        directory.relays.iter().map(|c| c.id).collect()
    }

    #[test]
    fn joiners_are_spread_least_loaded_first_and_a_dead_relays_members_over_the_others() {
        let mut assignment =
            RelayAssignment::new(vec![contact(1), contact(2), contact(3)], Some(contact(0)));
        let firsts: Vec<u16> = (0..6).map(|_| ids(&assignment.assign())[0]).collect();
        assert_eq!(firsts, vec![1, 2, 3, 1, 2, 3]);
        let directory = assignment.assign();
        assert_eq!(ids(&directory), vec![1, 2, 3]);
        assert_eq!(directory.gcks, Some(contact(0)));
        assert_eq!(ids(&assignment.assign()), vec![2, 3, 1]);
        let down = assignment.relay_down(2).expect("directive");
        assert_eq!(down.issued, 1);
        assert_eq!(
            down.target_of(RelayRef::Relay(2), 10),
            Some(RelayRef::Relay(1))
        );
        assert_eq!(
            down.target_of(RelayRef::Relay(2), 11),
            Some(RelayRef::Relay(3))
        );
        assert_eq!(down.target_of(RelayRef::Relay(1), 11), None);
        assert!(assignment.relay_down(2).is_none(), "already down");
        // Joiners are no longer sent there.
        assert!((0..4).all(|_| !ids(&assignment.assign()).contains(&2)));
        // It comes back: a share of everybody's members moves to it.
        let up = assignment.relay_up(contact(2)).expect("directive");
        assert_eq!(up.issued, 2);
        assert_eq!(
            up.target_of(RelayRef::Relay(3), 9),
            Some(RelayRef::Relay(2))
        );
        assert_eq!(up.target_of(RelayRef::Relay(3), 10), None);
        let loads = assignment.loads();
        assert!(loads.iter().all(|&(_, live, _)| live));
        assert!(loads[1].2 > 0, "{loads:?}");
        // The last relay dying sends its members to the GCKS.
        let mut lone = RelayAssignment::new(vec![contact(5)], None);
        let down = lone.relay_down(5).expect("directive");
        assert_eq!(down.target_of(RelayRef::Relay(5), 1), Some(RelayRef::Gcks));
    }
}
