//! The body of a heartbeat datagram: the sender's state and its repair advertisements.
//!
//! The header's sequence number is the latest rekey message the sender has sent (so a member
//! that holds an older key learns it is behind). A heartbeat carries the sender's instance id
//! (chosen at random each time a sender process starts, so a member keeps one replay window
//! per sender instance and a restarted sender is not taken for a replay of the old one), a
//! GRTT probe timestamp (microseconds of that instance's clock),
//! the advertised GRTT and exact group size (the inputs of every receiver's NACK backoff),
//! the oldest sequence number the sender still holds for repair and resync, the NACK backoff
//! factor K, and a list of blocks being repaired with the number of repair symbols ordered for
//! each. Flag bit 0 (`ADVERTISEMENT`) marks an immediate repair advertisement sent in answer to
//! a unicast NACK, which suppresses the other receivers' NACKs for the same block (RFC 5740
//! 5.5.2's NACK suppression, moved to the sender so it also works on source-specific
//! multicast). Flag bit 1 (`PROBE_REPLY_REQUESTED`) asks receivers that have no NACK to send
//! for a (randomly suppressed) probe reply.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                  sender instance id (32 bits)                 |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                probe timestamp, us (64 bits)                  |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     GRTT, us (32 bits)                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     group size (32 bits)                      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |             oldest sequence number held (64 bits)             |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | backoff factor|  entry count  |  entries (14 bytes each) ...  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//!
//! entry:
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                  sequence number (64 bits)                    |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |    object     |      SBN      |     round     | reserved (0)  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  repair symbols ordered       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The entry count is at most [`MAX_ENTRIES`], so a heartbeat always fits the IPv6-safe
//! datagram size, and the body's length must match it exactly.

use super::datagram::check_flags;
use super::{be, check_len, check_room, Error, ObjectKind, Result};

/// Flag bit: an immediate repair advertisement.
pub const FLAG_ADVERTISEMENT: u8 = 0x01;
/// Flag bit: receivers are asked for probe replies.
pub const FLAG_PROBE_REPLY_REQUESTED: u8 = 0x02;
/// The largest number of repair entries in one heartbeat.
pub const MAX_ENTRIES: usize = 64;
/// Length of the fixed part of the body.
pub const FIXED_LEN: usize = field::ENTRIES_START;
/// Length of one repair entry.
pub const ENTRY_LEN: usize = entry_field::COUNT.end;

mod field {
    use core::ops::Range;
    pub const INSTANCE: Range<usize> = 0..4;
    pub const PROBE_TIMESTAMP: Range<usize> = 4..12;
    pub const GRTT: Range<usize> = 12..16;
    pub const GROUP_SIZE: Range<usize> = 16..20;
    pub const OLDEST_SEQ: Range<usize> = 20..28;
    pub const BACKOFF_FACTOR: usize = 28;
    pub const ENTRY_COUNT: usize = 29;
    pub const ENTRIES_START: usize = 30;
}

mod entry_field {
    use core::ops::Range;
    pub const SEQ: Range<usize> = 0..8;
    pub const OBJECT: usize = 8;
    pub const SBN: usize = 9;
    pub const ROUND: usize = 10;
    pub const RESERVED: usize = 11;
    pub const COUNT: Range<usize> = 12..14;
}

/// One block being repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RepairEntry {
    /// The rekey message.
    pub seq: u64,
    /// The FEC object.
    pub object: ObjectKind,
    /// The source block number.
    pub sbn: u8,
    /// The repair round the symbols answer.
    pub round: u8,
    /// Repair symbols ordered for the block in this round.
    pub count: u16,
}

/// A parsed heartbeat body.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeartbeatRepr {
    /// Whether this is an immediate repair advertisement.
    pub advertisement: bool,
    /// Whether receivers are asked for probe replies.
    pub probe_reply_requested: bool,
    /// The sender instance: chosen at random when a sender (GCKS or relay) starts.
    pub instance: u32,
    /// The GRTT probe timestamp, microseconds of the sender instance's clock.
    pub probe_timestamp_us: u64,
    /// The advertised group round-trip time, microseconds.
    pub grtt_us: u32,
    /// The exact group size.
    pub group_size: u32,
    /// The oldest sequence number the sender still holds.
    pub oldest_seq: u64,
    /// The NACK backoff factor K (backoff window is K * GRTT), at least 1.
    pub backoff_factor: u8,
    /// Blocks being repaired, at most [`MAX_ENTRIES`].
    pub entries: Vec<RepairEntry>,
}

/// A view of a heartbeat body.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer after checking that its length matches its entry count exactly.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let data = buffer.as_ref();
        check_len(FIXED_LEN, data.len())?;
        let count = usize::from(data[field::ENTRY_COUNT]);
        if count > MAX_ENTRIES {
            return Err(Error::TooManyEntries {
                count,
                max: MAX_ENTRIES,
            });
        }
        let len = FIXED_LEN + count * ENTRY_LEN;
        check_len(len, data.len())?;
        if data.len() > len {
            return Err(Error::TrailingBytes(data.len() - len));
        }
        Ok(Self { buffer })
    }

    /// The sender instance id.
    pub fn instance(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::INSTANCE])
    }
    /// The probe timestamp.
    pub fn probe_timestamp_us(&self) -> u64 {
        be::u64(&self.buffer.as_ref()[field::PROBE_TIMESTAMP])
    }
    /// The advertised GRTT.
    pub fn grtt_us(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::GRTT])
    }
    /// The group size.
    pub fn group_size(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::GROUP_SIZE])
    }
    /// The oldest sequence number held.
    pub fn oldest_seq(&self) -> u64 {
        be::u64(&self.buffer.as_ref()[field::OLDEST_SEQ])
    }
    /// The backoff factor.
    pub fn backoff_factor(&self) -> u8 {
        self.buffer.as_ref()[field::BACKOFF_FACTOR]
    }
    /// The number of repair entries.
    pub fn entry_count(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::ENTRY_COUNT])
    }
    /// The bytes of entry `index` (which must be below [`Packet::entry_count`]).
    fn entry_bytes(&self, index: usize) -> &[u8] {
        let start = FIXED_LEN + index * ENTRY_LEN;
        &self.buffer.as_ref()[start..start + ENTRY_LEN]
    }
}

impl HeartbeatRepr {
    /// Parses a heartbeat body; `flags` are the header's flags.
    pub fn parse(flags: u8, bytes: &[u8]) -> Result<Self> {
        check_flags(flags, FLAG_ADVERTISEMENT | FLAG_PROBE_REPLY_REQUESTED)?;
        let packet = Packet::new_checked(bytes)?;
        if packet.backoff_factor() == 0 {
            return Err(Error::InvalidField("backoff factor"));
        }
        let mut entries = Vec::with_capacity(packet.entry_count());
        for index in 0..packet.entry_count() {
            let bytes = packet.entry_bytes(index);
            if bytes[entry_field::RESERVED] != 0 {
                return Err(Error::ReservedNotZero);
            }
            entries.push(RepairEntry {
                seq: be::u64(&bytes[entry_field::SEQ]),
                object: ObjectKind::try_from(bytes[entry_field::OBJECT])?,
                sbn: bytes[entry_field::SBN],
                round: bytes[entry_field::ROUND],
                count: be::u16(&bytes[entry_field::COUNT]),
            });
        }
        Ok(Self {
            advertisement: flags & FLAG_ADVERTISEMENT != 0,
            probe_reply_requested: flags & FLAG_PROBE_REPLY_REQUESTED != 0,
            instance: packet.instance(),
            probe_timestamp_us: packet.probe_timestamp_us(),
            grtt_us: packet.grtt_us(),
            group_size: packet.group_size(),
            oldest_seq: packet.oldest_seq(),
            backoff_factor: packet.backoff_factor(),
            entries,
        })
    }

    /// The header flags of this heartbeat.
    pub fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.advertisement {
            flags |= FLAG_ADVERTISEMENT;
        }
        if self.probe_reply_requested {
            flags |= FLAG_PROBE_REPLY_REQUESTED;
        }
        flags
    }

    /// Bytes the body takes.
    pub fn buffer_len(&self) -> usize {
        FIXED_LEN + self.entries.len() * ENTRY_LEN
    }

    /// Writes the body into the first [`Self::buffer_len`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(Error::TooManyEntries {
                count: self.entries.len(),
                max: MAX_ENTRIES,
            });
        }
        if self.backoff_factor == 0 {
            return Err(Error::InvalidField("backoff factor"));
        }
        check_room(self.buffer_len(), buf.len())?;
        be::put_u32(&mut buf[field::INSTANCE], self.instance);
        be::put_u64(&mut buf[field::PROBE_TIMESTAMP], self.probe_timestamp_us);
        be::put_u32(&mut buf[field::GRTT], self.grtt_us);
        be::put_u32(&mut buf[field::GROUP_SIZE], self.group_size);
        be::put_u64(&mut buf[field::OLDEST_SEQ], self.oldest_seq);
        buf[field::BACKOFF_FACTOR] = self.backoff_factor;
        // The entry count fits a byte: MAX_ENTRIES < 256, checked above.
        buf[field::ENTRY_COUNT] = self.entries.len() as u8;
        for (index, entry) in self.entries.iter().enumerate() {
            let start = FIXED_LEN + index * ENTRY_LEN;
            let bytes = &mut buf[start..start + ENTRY_LEN];
            be::put_u64(&mut bytes[entry_field::SEQ], entry.seq);
            bytes[entry_field::OBJECT] = entry.object as u8;
            bytes[entry_field::SBN] = entry.sbn;
            bytes[entry_field::ROUND] = entry.round;
            bytes[entry_field::RESERVED] = 0;
            be::put_u16(&mut bytes[entry_field::COUNT], entry.count);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::test_support::assert_every_truncation_fails;
    use crate::wire::{BodyRepr, DatagramRepr, IPV6_SAFE_DATAGRAM_SIZE};

    const BYTES: [u8; 44] = [
        0xC0, 0xFF, 0xEE, 0x01, // instance 0xC0FFEE01
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, // probe timestamp 256
        0x00, 0x00, 0x27, 0x10, // GRTT 10,000 us
        0x00, 0x00, 0x03, 0xE8, // group size 1,000
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09, // oldest seq 9
        0x04, 0x01, // K = 4, one entry
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, // entry seq 12
        0x01, 0x07, 0x02, 0x00, // chunks, SBN 7, round 2, reserved
        0x00, 0x03, // count 3
    ];

    fn repr() -> HeartbeatRepr {
        HeartbeatRepr {
            advertisement: true,
            probe_reply_requested: false,
            instance: 0xC0FF_EE01,
            probe_timestamp_us: 256,
            grtt_us: 10_000,
            group_size: 1_000,
            oldest_seq: 9,
            backoff_factor: 4,
            entries: vec![RepairEntry {
                seq: 12,
                object: ObjectKind::Chunks,
                sbn: 7,
                round: 2,
                count: 3,
            }],
        }
    }

    #[test]
    fn test_parse() {
        assert_eq!(HeartbeatRepr::parse(FLAG_ADVERTISEMENT, &BYTES), Ok(repr()));
    }

    #[test]
    fn test_emit() {
        let mut buf = [0u8; 44];
        repr().emit(&mut buf).unwrap();
        assert_eq!(buf, BYTES);
        assert_eq!(repr().flags(), FLAG_ADVERTISEMENT);
    }

    #[test]
    fn truncation_at_every_length_fails() {
        assert_every_truncation_fails(&BYTES, |b| {
            HeartbeatRepr::parse(FLAG_ADVERTISEMENT, b).map(drop)
        });
    }

    #[test]
    fn rejects_bad_values() {
        let mut trailing = BYTES.to_vec();
        trailing.push(0);
        assert_eq!(
            HeartbeatRepr::parse(0, &trailing),
            Err(Error::TrailingBytes(1))
        );
        let mut too_many = BYTES;
        too_many[29] = 65;
        assert_eq!(
            HeartbeatRepr::parse(0, &too_many),
            Err(Error::TooManyEntries { count: 65, max: 64 })
        );
        let mut zero_k = BYTES;
        zero_k[28] = 0;
        assert!(HeartbeatRepr::parse(0, &zero_k).is_err());
        let mut bad_object = BYTES;
        bad_object[38] = 9;
        assert_eq!(
            HeartbeatRepr::parse(0, &bad_object),
            Err(Error::UnknownObject(9))
        );
        let mut reserved = BYTES;
        reserved[41] = 1;
        assert_eq!(
            HeartbeatRepr::parse(0, &reserved),
            Err(Error::ReservedNotZero)
        );
        assert_eq!(
            HeartbeatRepr::parse(0x04, &BYTES),
            Err(Error::UndefinedFlags(0x04))
        );
    }

    #[test]
    fn a_full_heartbeat_fits_the_ipv6_safe_size() {
        let mut full = repr();
        full.entries = vec![full.entries[0]; MAX_ENTRIES];
        let datagram = DatagramRepr {
            group_id: 1,
            spi: 1,
            seq: 1,
            body: BodyRepr::Heartbeat(full),
            mac: [0; 16],
        };
        assert!(datagram.buffer_len() <= IPV6_SAFE_DATAGRAM_SIZE);
    }

    fn arb_heartbeat() -> impl Strategy<Value = HeartbeatRepr> {
        let entry = (any::<u64>(), 0u8..2, any::<u8>(), any::<u8>(), any::<u16>()).prop_map(
            |(seq, object, sbn, round, count)| RepairEntry {
                seq,
                object: ObjectKind::try_from(object).unwrap(),
                sbn,
                round,
                count,
            },
        );
        (
            any::<(bool, bool, u64, u32, u32, u64)>(),
            (1u8.., any::<u32>()),
            proptest::collection::vec(entry, 0..=MAX_ENTRIES),
        )
            .prop_map(
                |((adv, probe, ts, grtt, size, oldest), (k, instance), entries)| HeartbeatRepr {
                    advertisement: adv,
                    probe_reply_requested: probe,
                    instance,
                    probe_timestamp_us: ts,
                    grtt_us: grtt,
                    group_size: size,
                    oldest_seq: oldest,
                    backoff_factor: k,
                    entries,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(heartbeat in arb_heartbeat(), seq: u64, mac: [u8; 16]) {
            let repr = DatagramRepr {
                group_id: 3, spi: 4, seq, body: BodyRepr::Heartbeat(heartbeat), mac,
            };
            let mut buf = vec![0u8; repr.buffer_len()];
            repr.emit(&mut buf).unwrap();
            prop_assert_eq!(DatagramRepr::parse(&buf).unwrap(), repr);
        }

        #[test]
        fn decode_then_encode_returns_input(flags in 0u8..4, count in 0u8..4,
                                            rest in proptest::collection::vec(any::<u8>(), 0..60)) {
            let mut bytes = BYTES[..29].to_vec();
            bytes.push(count);
            bytes.extend_from_slice(&rest);
            if let Ok(repr) = HeartbeatRepr::parse(flags, &bytes) {
                let mut buf = vec![0u8; repr.buffer_len()];
                repr.emit(&mut buf).unwrap();
                prop_assert_eq!(buf, bytes);
                prop_assert_eq!(repr.flags(), flags);
            }
        }
    }
}
