//! IGMP snooping's parser: IGMPv1/v2 membership reports, IGMPv2 leaves and IGMPv3 reports with
//! their group records (RFC 2236, RFC 3376), read out of whole Ethernet frames.
//!
//! The parser is total: any bytes give a [`Message`] or an [`Error`], never a panic. It owns
//! no state; what a message means for the switch's group table is [`Message::memberships`].

use std::net::Ipv4Addr;

/// An IGMP message the switch understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A membership query (0x11); the switch floods it and learns nothing from it.
    Query {
        /// The queried group, 0.0.0.0 for a general query.
        group: Ipv4Addr,
    },
    /// An IGMPv1 (0x12) or IGMPv2 (0x16) membership report: the sender joined `group`.
    Report {
        /// The joined group.
        group: Ipv4Addr,
    },
    /// An IGMPv2 leave (0x17): the sender left `group`.
    Leave {
        /// The left group.
        group: Ipv4Addr,
    },
    /// An IGMPv3 membership report (0x22) and its group records.
    V3Report {
        /// The records, in order.
        records: Vec<GroupRecord>,
    },
    /// Another IGMP type, carried through untouched.
    Other {
        /// Its type byte.
        kind: u8,
    },
}

/// One group record of an IGMPv3 report (RFC 3376 section 4.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupRecord {
    /// The record type: 1 MODE_IS_INCLUDE, 2 MODE_IS_EXCLUDE, 3 CHANGE_TO_INCLUDE_MODE,
    /// 4 CHANGE_TO_EXCLUDE_MODE, 5 ALLOW_NEW_SOURCES, 6 BLOCK_OLD_SOURCES.
    pub kind: u8,
    /// The multicast address the record is about.
    pub group: Ipv4Addr,
    /// How many sources the record lists.
    pub sources: u16,
}

/// A change of one port's membership that a message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// The sending host wants the group's traffic.
    Join(Ipv4Addr),
    /// The sending host no longer wants it.
    Leave(Ipv4Addr),
}

/// Why bytes are not an IGMP message the switch can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The frame is not IPv4 carrying IGMP (protocol 2).
    #[error("not an IGMP frame")]
    NotIgmp,
    /// The frame is shorter than its headers or lengths say.
    #[error("truncated: {needed} bytes needed, {available} available")]
    Truncated {
        /// The bytes the headers need.
        needed: usize,
        /// The bytes there are.
        available: usize,
    },
    /// The IPv4 header is inconsistent (version, header length, total length, fragment).
    #[error("malformed IPv4 header")]
    MalformedIpv4,
    /// The IGMP checksum does not verify.
    #[error("IGMP checksum mismatch")]
    Checksum,
}

impl Message {
    /// The membership changes this message asks for, in order; queries and unknown types ask
    /// for none, nor do records about addresses outside 224.0.0.0/4.
    ///
    /// For IGMPv3 records (RFC 3376 section 4.2.12): EXCLUDE-mode records (2, 4) join, since
    /// the host wants all sources but those listed; INCLUDE-mode records and ALLOW_NEW_SOURCES
    /// (1, 3, 5) join when they list sources; INCLUDE-mode records (1, 3) that list none leave
    /// (an empty INCLUDE set is no membership); BLOCK_OLD_SOURCES (6) changes nothing, since the switch forwards
    /// per group and not per source. Unknown record types are ignored (section 4.2.12).
    pub fn memberships(&self) -> Vec<Membership> {
        let mut changes = Vec::new();
        match self {
            Message::Report { group } => changes.push(Membership::Join(*group)),
            Message::Leave { group } => changes.push(Membership::Leave(*group)),
            Message::V3Report { records } => {
                for record in records {
                    let change = match (record.kind, record.sources) {
                        (2 | 4, _) => Membership::Join(record.group),
                        (1 | 3, 0) => Membership::Leave(record.group),
                        (1 | 3 | 5, _) if record.sources > 0 => Membership::Join(record.group),
                        _ => continue,
                    };
                    changes.push(change);
                }
            }
            Message::Query { .. } | Message::Other { .. } => {}
        }
        changes.retain(|change| match change {
            Membership::Join(group) | Membership::Leave(group) => group.is_multicast(),
        });
        changes
    }
}

/// Whether an Ethernet frame carries IGMP (EtherType IPv4, protocol 2), without parsing it.
pub fn is_igmp_frame(frame: &[u8]) -> bool {
    frame.len() >= 14 + 20 && frame[12..14] == [0x08, 0x00] && frame[14 + 9] == 2
}

/// Parses the IGMP message of an Ethernet frame (no VLAN tag).
pub fn parse_frame(frame: &[u8]) -> Result<Message, Error> {
    const ETHERNET: usize = 14;
    need(frame, ETHERNET)?;
    if frame[12..14] != [0x08, 0x00] {
        return Err(Error::NotIgmp);
    }
    let ip = &frame[ETHERNET..];
    need(ip, 20)?;
    if ip[0] >> 4 != 4 {
        return Err(Error::MalformedIpv4);
    }
    if ip[9] != 2 {
        return Err(Error::NotIgmp);
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if header_len < 20 || total_len < header_len {
        return Err(Error::MalformedIpv4);
    }
    need(ip, total_len)?;
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(Error::MalformedIpv4);
    }
    parse(&ip[header_len..total_len])
}

/// Parses an IGMP message (the IPv4 payload), checksum included.
pub fn parse(bytes: &[u8]) -> Result<Message, Error> {
    need(bytes, 8)?;
    if checksum(bytes) != 0xffff {
        return Err(Error::Checksum);
    }
    let group = |at: usize| Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]);
    match bytes[0] {
        0x11 => Ok(Message::Query { group: group(4) }),
        0x12 | 0x16 => Ok(Message::Report { group: group(4) }),
        0x17 => Ok(Message::Leave { group: group(4) }),
        0x22 => {
            let count = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
            let mut records = Vec::new();
            let mut at = 8;
            for _ in 0..count {
                need(bytes, at + 8)?;
                let kind = bytes[at];
                let aux_words = usize::from(bytes[at + 1]);
                let sources = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]);
                let record_group = group(at + 4);
                let end = at + 8 + usize::from(sources) * 4 + aux_words * 4;
                need(bytes, end)?;
                records.push(GroupRecord {
                    kind,
                    group: record_group,
                    sources,
                });
                at = end;
            }
            Ok(Message::V3Report { records })
        }
        kind => Ok(Message::Other { kind }),
    }
}

fn need(bytes: &[u8], needed: usize) -> Result<(), Error> {
    if bytes.len() < needed {
        Err(Error::Truncated {
            needed,
            available: bytes.len(),
        })
    } else {
        Ok(())
    }
}

/// The folded one's complement sum of `bytes`; 0xffff when an Internet checksum over them
/// verifies.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // Folded into 16 bits by the loop above.
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets the IGMP checksum of `message` (bytes 2..4).
    fn with_checksum(mut message: Vec<u8>) -> Vec<u8> {
        message[2] = 0;
        message[3] = 0;
        let sum = !checksum(&message);
        message[2..4].copy_from_slice(&sum.to_be_bytes());
        message
    }

    /// Wraps an IGMP message in Ethernet and IPv4 (with the Router Alert option, as Linux
    /// sends it).
    fn frame(igmp: &[u8]) -> Vec<u8> {
        let mut frame = vec![
            0x01, 0x00, 0x5e, 0x00, 0x00, 0x16, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00,
        ];
        let total = (24 + igmp.len()) as u16;
        let mut ip = vec![0x46, 0xc0, 0, 0, 0, 0, 0x40, 0x00, 1, 2, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[198, 18, 0, 2, 224, 0, 0, 22, 0x94, 0x04, 0, 0]);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(igmp);
        frame
    }

    /// An IGMPv3 report as Linux sends it when a socket joins 239.1.2.3: one
    /// CHANGE_TO_EXCLUDE_MODE record with no sources.
    fn v3_join() -> Vec<u8> {
        with_checksum(vec![
            0x22, 0, 0, 0, 0, 0, 0, 1, // type, reserved, checksum, reserved, 1 record
            4, 0, 0, 0, 239, 1, 2, 3, // CHANGE_TO_EXCLUDE, no aux, no sources, group
        ])
    }

    #[test]
    fn v2_report_and_leave() {
        let report = with_checksum(vec![0x16, 0, 0, 0, 239, 1, 2, 3]);
        let message = parse_frame(&frame(&report)).expect("valid");
        let group = Ipv4Addr::new(239, 1, 2, 3);
        assert_eq!(message, Message::Report { group });
        assert_eq!(message.memberships(), vec![Membership::Join(group)]);
        let leave = with_checksum(vec![0x17, 0, 0, 0, 239, 1, 2, 3]);
        let message = parse_frame(&frame(&leave)).expect("valid");
        assert_eq!(message.memberships(), vec![Membership::Leave(group)]);
        let query = with_checksum(vec![0x11, 100, 0, 0, 0, 0, 0, 0]);
        let message = parse_frame(&frame(&query)).expect("valid");
        assert!(message.memberships().is_empty());
    }

    #[test]
    fn v3_report_records() {
        let message = parse_frame(&frame(&v3_join())).expect("valid");
        let group = Ipv4Addr::new(239, 1, 2, 3);
        assert_eq!(
            message,
            Message::V3Report {
                records: vec![GroupRecord {
                    kind: 4,
                    group,
                    sources: 0
                }]
            }
        );
        assert_eq!(message.memberships(), vec![Membership::Join(group)]);

        // Four records: leave (TO_IN, no sources), include with a source and one aux word,
        // block (no change), a unicast group (ignored).
        let report = with_checksum(vec![
            0x22, 0, 0, 0, 0, 0, 0, 4, //
            3, 0, 0, 0, 239, 1, 2, 3, //
            1, 1, 0, 1, 239, 4, 5, 6, 198, 18, 0, 1, 0xaa, 0xbb, 0xcc, 0xdd, //
            6, 0, 0, 1, 239, 7, 7, 7, 198, 18, 0, 1, //
            2, 0, 0, 0, 10, 0, 0, 1,
        ]);
        let message = parse(&report).expect("valid");
        assert_eq!(
            message.memberships(),
            vec![
                Membership::Leave(group),
                Membership::Join(Ipv4Addr::new(239, 4, 5, 6))
            ]
        );
    }

    #[test]
    fn truncation_at_every_length_is_an_error() {
        let whole = frame(&v3_join());
        for len in 0..whole.len() {
            assert!(parse_frame(&whole[..len]).is_err(), "length {len}");
        }
        // A record count larger than the records present.
        let mut lying = v3_join();
        lying[7] = 2;
        assert_eq!(
            parse(&with_checksum(lying)),
            Err(Error::Truncated {
                needed: 24,
                available: 16
            })
        );
    }

    #[test]
    fn single_bit_flips_fail_the_checksum() {
        let message = v3_join();
        for bit in 0..message.len() * 8 {
            let mut flipped = message.clone();
            flipped[bit / 8] ^= 0x80 >> (bit % 8);
            assert!(parse(&flipped).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn not_igmp_frames_are_refused() {
        let mut udp = frame(&v3_join());
        udp[14 + 9] = 17;
        assert!(!is_igmp_frame(&udp));
        assert_eq!(parse_frame(&udp), Err(Error::NotIgmp));
        let mut arp = frame(&v3_join());
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(parse_frame(&arp), Err(Error::NotIgmp));
        assert!(is_igmp_frame(&frame(&v3_join())));
    }

    #[test]
    fn any_bytes_parse_without_panicking() {
        // A deterministic spread of random frames and mutations of a valid one.
        let mut state: u64 = 0x1234_5678;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = frame(&v3_join());
        for _ in 0..20_000 {
            let len = (next() % 80) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if bytes.len() > 24 && next() % 2 == 0 {
                bytes[..24].copy_from_slice(&valid[..24]);
            }
            let _ = parse_frame(&bytes);
            let _ = parse(&bytes);
            let mut mutated = valid.clone();
            let at = (next() as usize) % mutated.len();
            mutated[at] = next() as u8;
            if let Ok(message) = parse_frame(&mutated) {
                let _ = message.memberships();
            }
        }
    }
}
