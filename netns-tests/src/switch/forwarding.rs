//! The switch's forwarding decisions, sans-IO: where a frame goes (MAC learning, flooding,
//! IGMP snooping) and which received frames are the switch's own transmissions coming back.
//!
//! It owns the learned addresses, the group table and the record of recent transmissions; it
//! does no I/O and reads no clock (times are arguments, since the switch started).

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hasher};
use std::net::Ipv4Addr;
use std::time::Duration;

use super::igmp::{self, Membership};

/// The most ports a switch can have (a [`PortSet`] is a 64-bit mask).
pub const MAX_PORTS: usize = 64;

/// The most source addresses learned; beyond it, new addresses are not learned and frames to
/// them are flooded, so a flood of forged sources cannot grow memory.
pub const MAX_LEARNED_ADDRESSES: usize = 4096;

/// The most multicast groups tracked; joins of further groups are ignored (and counted by the
/// caller through [`Forwarder::snoop`]'s result).
pub const MAX_GROUPS: usize = 4096;

/// How long a transmitted frame is remembered to recognize it if it comes back.
pub const ECHO_WINDOW: Duration = Duration::from_secs(1);

/// The most transmissions remembered per port within [`ECHO_WINDOW`].
pub const ECHO_CAPACITY: usize = 16_384;

/// A set of port indices below [`MAX_PORTS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PortSet(u64);

impl PortSet {
    /// The empty set.
    pub const EMPTY: Self = Self(0);

    /// Ports `0..count` (all of them when `count` is [`MAX_PORTS`] or more).
    pub fn first(count: usize) -> Self {
        if count >= MAX_PORTS {
            Self(u64::MAX)
        } else {
            Self((1u64 << count) - 1)
        }
    }

    /// Whether `port` is in the set.
    pub fn contains(self, port: usize) -> bool {
        port < MAX_PORTS && self.0 & (1 << port) != 0
    }

    /// The set with `port` added (unchanged when `port` is out of range).
    #[must_use]
    pub fn with(self, port: usize) -> Self {
        if port < MAX_PORTS {
            Self(self.0 | (1 << port))
        } else {
            self
        }
    }

    /// The set without `port`.
    #[must_use]
    pub fn without(self, port: usize) -> Self {
        if port < MAX_PORTS {
            Self(self.0 & !(1 << port))
        } else {
            self
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The ports in the set, in increasing order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..MAX_PORTS).filter(move |&port| self.contains(port))
    }
}

/// What kind of traffic a frame is, for the impairments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameClass {
    /// ARP or IGMP: the control plane, forwarded without impairment. A lost IGMP join would
    /// silence a host for the whole run (there is no querier to make it report again), and a
    /// lost ARP exchange would stall unicast for seconds for reasons no scenario means to test;
    /// impairing the data plane alone keeps scenarios about the protocol under test.
    Control,
    /// Everything else: impaired.
    Data,
}

/// Classifies a frame: ARP (EtherType 0x0806) and IGMP over IPv4 are [`FrameClass::Control`].
pub fn classify(frame: &[u8]) -> FrameClass {
    if frame.len() >= 14 && frame[12..14] == [0x08, 0x06] || igmp::is_igmp_frame(frame) {
        FrameClass::Control
    } else {
        FrameClass::Data
    }
}

/// The result of snooping a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snooped {
    /// Not IGMP (ARP).
    NotIgmp,
    /// IGMP, with the membership changes applied to the group table and how many joins were
    /// ignored because the table was full.
    Applied {
        /// The changes the message asked for.
        changes: Vec<Membership>,
        /// Joins ignored for lack of room.
        ignored: usize,
    },
    /// IGMP that did not parse; nothing was learned from it.
    Malformed(igmp::Error),
}

/// The forwarding state of a switch with a fixed number of ports.
#[derive(Debug)]
pub struct Forwarder {
    ports: usize,
    /// Source address -> the port it was last seen on.
    learned: HashMap<[u8; 6], usize>,
    /// Group -> the ports whose hosts joined it.
    groups: HashMap<Ipv4Addr, PortSet>,
    /// Per port: recent transmissions, to recognize them if they come back.
    echoes: Vec<EchoFilter>,
    /// The addresses of the switch's own interfaces.
    local: Vec<[u8; 6]>,
}

/// Refused: more ports than [`MAX_PORTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} ports, at most {MAX_PORTS} supported")]
pub struct TooManyPorts(pub usize);

impl Forwarder {
    /// A forwarder for `ports` ports, nothing learned.
    pub fn new(ports: usize) -> Result<Self, TooManyPorts> {
        if ports > MAX_PORTS {
            return Err(TooManyPorts(ports));
        }
        Ok(Self {
            ports,
            learned: HashMap::new(),
            groups: HashMap::new(),
            echoes: (0..ports).map(|_| EchoFilter::default()).collect(),
            local: Vec::new(),
        })
    }

    /// Records the addresses of the switch's own interfaces (its ends of the veth pairs).
    pub fn set_local_addresses(&mut self, addresses: Vec<[u8; 6]>) {
        self.local = addresses;
    }

    /// Whether a received frame was sent by the switch namespace's own kernel out of one of
    /// the switch's interfaces (its source is one of their addresses): a packet socket sees
    /// those outgoing frames too (IPv6 router solicitations and MLD reports when IPv6 is on in
    /// the switch's namespace), and they come from no host, so they are not forwarded.
    pub fn is_from_switch_namespace(&self, frame: &[u8]) -> bool {
        frame.len() >= 12 && self.local.iter().any(|address| frame[6..12] == address[..])
    }

    /// Learns the source address of a frame received on `port` (unicast sources only; a
    /// source seen on another port before moves to this one).
    pub fn learn(&mut self, port: usize, frame: &[u8]) {
        if port >= self.ports || frame.len() < 14 {
            return;
        }
        let mut source = [0u8; 6];
        source.copy_from_slice(&frame[6..12]);
        if source[0] & 1 != 0 {
            return;
        }
        if self.learned.len() < MAX_LEARNED_ADDRESSES || self.learned.contains_key(&source) {
            self.learned.insert(source, port);
        }
    }

    /// Applies the IGMP message of a frame received on `port` to the group table.
    pub fn snoop(&mut self, port: usize, frame: &[u8]) -> Snooped {
        if !igmp::is_igmp_frame(frame) || port >= self.ports {
            return Snooped::NotIgmp;
        }
        let message = match igmp::parse_frame(frame) {
            Ok(message) => message,
            Err(error) => return Snooped::Malformed(error),
        };
        let changes = message.memberships();
        let mut ignored = 0;
        for change in &changes {
            match *change {
                Membership::Join(group) => {
                    if let Some(members) = self.groups.get_mut(&group) {
                        *members = members.with(port);
                    } else if self.groups.len() < MAX_GROUPS {
                        self.groups.insert(group, PortSet::EMPTY.with(port));
                    } else {
                        ignored += 1;
                    }
                }
                Membership::Leave(group) => {
                    if let Some(members) = self.groups.get_mut(&group) {
                        *members = members.without(port);
                        if members.is_empty() {
                            self.groups.remove(&group);
                        }
                    }
                }
            }
        }
        Snooped::Applied { changes, ignored }
    }

    /// The ports whose hosts joined `group`.
    pub fn members(&self, group: Ipv4Addr) -> PortSet {
        self.groups.get(&group).copied().unwrap_or_default()
    }

    /// The ports a frame received on `in_port` goes out of (never `in_port` itself):
    /// broadcast and non-IPv4 multicast are flooded; IPv4 multicast goes to the ports that
    /// joined its group, except link-local groups (224.0.0.0/24), which are flooded; IGMP is
    /// flooded; unicast goes to the port its destination was learned on, and is flooded while
    /// unknown. Frames shorter than an Ethernet header go nowhere.
    pub fn destinations(&self, in_port: usize, frame: &[u8]) -> PortSet {
        if frame.len() < 14 {
            return PortSet::EMPTY;
        }
        let flood = PortSet::first(self.ports).without(in_port);
        let destination = &frame[0..6];
        if destination[0] & 1 == 0 {
            return match self.learned.get(destination) {
                Some(&port) => PortSet::EMPTY.with(port).without(in_port),
                None => flood,
            };
        }
        let ipv4_multicast = destination[..3] == [0x01, 0x00, 0x5e]
            && frame[12..14] == [0x08, 0x00]
            && frame.len() >= 34
            && !igmp::is_igmp_frame(frame);
        if !ipv4_multicast {
            return flood;
        }
        let group = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
        if group.octets()[..3] == [224, 0, 0] || !group.is_multicast() {
            return flood;
        }
        self.members(group).without(in_port)
    }

    /// Remembers that `frame` is being transmitted on `port` at `now`.
    pub fn record_transmission(&mut self, port: usize, frame: &[u8], now: Duration) {
        if let Some(filter) = self.echoes.get_mut(port) {
            filter.record(fingerprint(frame), now);
        }
    }

    /// Whether `frame`, received on `port` at `now`, is one the switch transmitted on that
    /// port within [`ECHO_WINDOW`]; a match is consumed, so each transmission is recognized at
    /// most once.
    pub fn is_own_transmission(&mut self, port: usize, frame: &[u8], now: Duration) -> bool {
        match self.echoes.get_mut(port) {
            Some(filter) if !filter.outstanding.is_empty() => {
                filter.consume(fingerprint(frame), now)
            }
            _ => false,
        }
    }
}

/// Recent transmissions of one port: fingerprint -> (transmissions not yet seen coming back,
/// time of the latest), and the same in time order for expiry.
#[derive(Debug, Default)]
struct EchoFilter {
    outstanding: HashMap<u64, (u32, Duration)>,
    by_time: VecDeque<(Duration, u64)>,
}

impl EchoFilter {
    fn record(&mut self, fingerprint: u64, now: Duration) {
        self.expire(now);
        if self.by_time.len() >= ECHO_CAPACITY {
            if let Some((at, oldest)) = self.by_time.pop_front() {
                self.forget(oldest, at);
            }
        }
        let entry = self.outstanding.entry(fingerprint).or_insert((0, now));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        self.by_time.push_back((now, fingerprint));
    }

    fn consume(&mut self, fingerprint: u64, now: Duration) -> bool {
        self.expire(now);
        match self.outstanding.get_mut(&fingerprint) {
            Some(entry) if entry.0 > 0 => {
                entry.0 -= 1;
                true
            }
            _ => false,
        }
    }

    fn expire(&mut self, now: Duration) {
        while let Some(&(at, fingerprint)) = self.by_time.front() {
            if now.saturating_sub(at) < ECHO_WINDOW {
                break;
            }
            self.by_time.pop_front();
            self.forget(fingerprint, at);
        }
    }

    /// Drops the entry of `fingerprint` when its latest transmission was at `at` (a later
    /// transmission of the same bytes keeps it alive until that one expires).
    fn forget(&mut self, fingerprint: u64, at: Duration) {
        if self
            .outstanding
            .get(&fingerprint)
            .is_some_and(|&(_, latest)| latest <= at)
        {
            self.outstanding.remove(&fingerprint);
        }
    }
}

fn fingerprint(frame: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(frame);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const H2: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const H3: [u8; 6] = [2, 0, 0, 0, 0, 3];

    fn ethernet(destination: [u8; 6], source: [u8; 6], ether_type: u16, rest: &[u8]) -> Vec<u8> {
        let mut frame = destination.to_vec();
        frame.extend_from_slice(&source);
        frame.extend_from_slice(&ether_type.to_be_bytes());
        frame.extend_from_slice(rest);
        frame
    }

    /// An IPv4 UDP frame to `group` (no valid checksums: forwarding does not look).
    fn multicast(source: [u8; 6], group: [u8; 4]) -> Vec<u8> {
        let mac = [0x01, 0x00, 0x5e, group[1] & 0x7f, group[2], group[3]];
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 1, 17, 0, 0, 198, 18, 0, 1];
        ip.extend_from_slice(&group);
        ip.extend_from_slice(&[0; 8]);
        ethernet(mac, source, 0x0800, &ip)
    }

    /// An IGMPv2 report (type 0x16) or leave (0x17) for `group`, checksum set.
    fn igmp(source: [u8; 6], kind: u8, group: [u8; 4]) -> Vec<u8> {
        let mut message = vec![kind, 0, 0, 0];
        message.extend_from_slice(&group);
        let sum = message
            .chunks(2)
            .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
            .sum::<u32>();
        let folded = !(((sum & 0xffff) + (sum >> 16)) as u16);
        message[2..4].copy_from_slice(&folded.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 1, 2, 0, 0, 198, 18, 0, 2];
        ip.extend_from_slice(&group);
        ip.extend_from_slice(&message);
        ethernet([0x01, 0x00, 0x5e, 0, 0, 0x16], source, 0x0800, &ip)
    }

    fn set(ports: &[usize]) -> PortSet {
        ports
            .iter()
            .fold(PortSet::EMPTY, |set, &port| set.with(port))
    }

    #[test]
    fn unicast_is_flooded_until_learned_then_switched() {
        let mut forwarder = Forwarder::new(3).expect("3 ports");
        let to_h2 = ethernet(H2, H1, 0x0800, &[0; 20]);
        assert_eq!(forwarder.destinations(0, &to_h2), set(&[1, 2]));
        forwarder.learn(1, &ethernet(H1, H2, 0x0800, &[0; 20]));
        assert_eq!(forwarder.destinations(0, &to_h2), set(&[1]));
        // Never back out of the port it came in on.
        assert_eq!(forwarder.destinations(1, &to_h2), PortSet::EMPTY);
        // A moved address follows.
        forwarder.learn(2, &ethernet(H1, H2, 0x0800, &[0; 20]));
        assert_eq!(forwarder.destinations(0, &to_h2), set(&[2]));
        // Broadcast floods; multicast sources are not learned.
        let broadcast = ethernet([0xff; 6], H3, 0x0806, &[0; 28]);
        assert_eq!(forwarder.destinations(2, &broadcast), set(&[0, 1]));
        forwarder.learn(0, &ethernet(H2, [0x01, 0, 0x5e, 0, 0, 1], 0x0800, &[]));
        assert_eq!(forwarder.learned.len(), 1);
        // Too short to have a destination.
        assert_eq!(forwarder.destinations(0, &[0xff; 13]), PortSet::EMPTY);
    }

    #[test]
    fn multicast_goes_to_joined_ports_only() {
        let mut forwarder = Forwarder::new(3).expect("3 ports");
        let group = [239, 1, 2, 3];
        let data = multicast(H1, group);
        assert_eq!(forwarder.destinations(0, &data), PortSet::EMPTY);
        let snooped = forwarder.snoop(1, &igmp(H2, 0x16, group));
        assert_eq!(
            snooped,
            Snooped::Applied {
                changes: vec![Membership::Join(Ipv4Addr::from(group))],
                ignored: 0
            }
        );
        assert_eq!(forwarder.destinations(0, &data), set(&[1]));
        forwarder.snoop(2, &igmp(H3, 0x16, group));
        assert_eq!(forwarder.destinations(0, &data), set(&[1, 2]));
        // The sender's own port is excluded even when it joined too.
        assert_eq!(forwarder.destinations(1, &data), set(&[2]));
        forwarder.snoop(1, &igmp(H2, 0x17, group));
        assert_eq!(forwarder.destinations(0, &data), set(&[2]));
        forwarder.snoop(2, &igmp(H3, 0x17, group));
        assert!(forwarder.groups.is_empty());
        // Link-local groups and IGMP itself are flooded.
        let link_local = multicast(H1, [224, 0, 0, 251]);
        assert_eq!(forwarder.destinations(0, &link_local), set(&[1, 2]));
        let report = igmp(H1, 0x16, group);
        assert_eq!(forwarder.destinations(0, &report), set(&[1, 2]));
        assert_eq!(classify(&report), FrameClass::Control);
        assert_eq!(classify(&data), FrameClass::Data);
        assert_eq!(
            classify(&ethernet([0xff; 6], H1, 0x0806, &[0; 28])),
            FrameClass::Control
        );
        // A corrupted report teaches nothing.
        let mut broken = igmp(H2, 0x16, group);
        broken[40] ^= 1;
        assert!(matches!(forwarder.snoop(1, &broken), Snooped::Malformed(_)));
        assert_eq!(forwarder.destinations(0, &data), PortSet::EMPTY);
    }

    #[test]
    fn the_group_table_is_bounded() {
        let mut forwarder = Forwarder::new(2).expect("2 ports");
        let mut ignored = 0;
        for i in 0..(MAX_GROUPS + 10) {
            let group = [239, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            if let Snooped::Applied { ignored: n, .. } = forwarder.snoop(0, &igmp(H1, 0x16, group))
            {
                ignored += n;
            }
        }
        assert_eq!(forwarder.groups.len(), MAX_GROUPS);
        assert_eq!(ignored, 10);
    }

    #[test]
    fn own_transmissions_are_recognized_once_and_expire() {
        let mut forwarder = Forwarder::new(2).expect("2 ports");
        let frame = multicast(H1, [239, 1, 2, 3]);
        let at = Duration::from_millis(10);
        forwarder.record_transmission(1, &frame, at);
        // Not on the other port, and not other bytes.
        assert!(!forwarder.is_own_transmission(0, &frame, at));
        assert!(!forwarder.is_own_transmission(1, &multicast(H2, [239, 1, 2, 3]), at));
        assert!(forwarder.is_own_transmission(1, &frame, at));
        assert!(!forwarder.is_own_transmission(1, &frame, at));
        // Sent twice, seen back twice.
        forwarder.record_transmission(1, &frame, at);
        forwarder.record_transmission(1, &frame, at + Duration::from_millis(1));
        assert!(forwarder.is_own_transmission(1, &frame, at));
        assert!(forwarder.is_own_transmission(1, &frame, at));
        // Expired after the window.
        forwarder.record_transmission(1, &frame, at);
        let late = at + ECHO_WINDOW + Duration::from_millis(5);
        assert!(!forwarder.is_own_transmission(1, &frame, late));
        // Bounded.
        for i in 0..(ECHO_CAPACITY as u32 + 100) {
            forwarder.record_transmission(0, &i.to_be_bytes(), late);
        }
        assert!(forwarder.echoes[0].by_time.len() <= ECHO_CAPACITY);
        assert!(forwarder.echoes[0].outstanding.len() <= ECHO_CAPACITY);
    }

    #[test]
    fn frames_from_the_switch_namespace_are_recognized() {
        let mut forwarder = Forwarder::new(2).expect("2 ports");
        let frame = ethernet([0x33, 0x33, 0, 0, 0, 2], H3, 0x86dd, &[0; 40]);
        assert!(!forwarder.is_from_switch_namespace(&frame));
        forwarder.set_local_addresses(vec![H1, H3]);
        assert!(forwarder.is_from_switch_namespace(&frame));
        assert!(!forwarder.is_from_switch_namespace(&ethernet(H1, H2, 0x0800, &[])));
        assert!(!forwarder.is_from_switch_namespace(&frame[..11]));
    }

    #[test]
    fn too_many_ports_are_refused() {
        assert_eq!(Forwarder::new(65).err(), Some(TooManyPorts(65)));
        assert_eq!(PortSet::first(64).iter().count(), 64);
        assert_eq!(PortSet::first(3).iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    }
}
