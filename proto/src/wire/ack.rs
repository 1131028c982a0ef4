//! The body of an acknowledgement: a receiver saying it holds every message before one.
//!
//! A member served by unicast (RFC 4046 5.1: multi-unicast) acknowledges each message it
//! applies, so that its sender (the GCKS or its relay) stops retransmitting it; before its
//! first message it sends the same datagram to say where it is and what it wants next. The
//! header's sequence number `n` is the next message the receiver wants, and the datagram is
//! sealed with the datagram MAC key of message `n`. That key is derived from the group key
//! message `n - 1` produced (or handed out in the registration bundle for a joiner's first
//! message), so a valid acknowledgement for `n` proves that its sender holds the group key of
//! message `n - 1`: a member ejected in `n - 1` cannot acknowledge it, and an outsider
//! cannot acknowledge anything. A replayed acknowledgement names a message its receiver has
//! already acknowledged, which the sender's per-receiver state refuses.
//!
//! The body is built to serve a wider delivery assurance as well: the same datagram from a
//! sample of multicast members, and from relays that aggregate their sample's acknowledgements
//! upstream, with `count` saying how many receivers it speaks for (1 for a member's own).
//! The header flags are all zero.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    receiver id (32 bits)                      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 count of receivers (32 bits, >= 1)            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The receiver id is the leaf order key the member's NACKs and chunk repairs carry.

use super::{be, check_len, check_room, Error, Result};

mod field {
    use core::ops::Range;
    pub const RECEIVER: Range<usize> = 0..4;
    pub const COUNT: Range<usize> = 4..8;
}

/// A view of an acknowledgement body.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer after checking that it is exactly one acknowledgement body with a
    /// non-zero count; no accessor panics afterwards.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let data = buffer.as_ref();
        check_len(AckRepr::BUFFER_LEN, data.len())?;
        if data.len() > AckRepr::BUFFER_LEN {
            return Err(Error::TrailingBytes(data.len() - AckRepr::BUFFER_LEN));
        }
        if be::u32(&data[field::COUNT]) == 0 {
            return Err(Error::InvalidField("ack count"));
        }
        Ok(Self { buffer })
    }

    /// The id of the receiver that acknowledges (its leaf order key).
    pub fn receiver_id(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::RECEIVER])
    }

    /// How many receivers the acknowledgement speaks for.
    pub fn count(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::COUNT])
    }
}

/// A parsed acknowledgement body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckRepr {
    /// The id of the receiver that acknowledges (its leaf order key).
    pub receiver_id: u32,
    /// How many receivers the acknowledgement speaks for (at least 1).
    pub count: u32,
}

impl AckRepr {
    /// Bytes the body takes.
    pub const BUFFER_LEN: usize = field::COUNT.end;

    /// A member's own acknowledgement.
    pub fn own(receiver_id: u32) -> Self {
        Self {
            receiver_id,
            count: 1,
        }
    }

    /// Parses an acknowledgement body.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let packet = Packet::new_checked(bytes)?;
        Ok(Self {
            receiver_id: packet.receiver_id(),
            count: packet.count(),
        })
    }

    /// Writes the body into the first [`Self::BUFFER_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        if self.count == 0 {
            return Err(Error::InvalidField("ack count"));
        }
        check_room(Self::BUFFER_LEN, buf.len())?;
        be::put_u32(&mut buf[field::RECEIVER], self.receiver_id);
        be::put_u32(&mut buf[field::COUNT], self.count);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::test_support::assert_every_truncation_fails;
    use crate::wire::{BodyRepr, DatagramRepr};

    const BYTES: [u8; 8] = [
        0x00, 0x01, 0x00, 0x02, // receiver 0x10002
        0x00, 0x00, 0x00, 0x01, // count 1
    ];

    #[test]
    fn test_parse() {
        assert_eq!(AckRepr::parse(&BYTES), Ok(AckRepr::own(0x1_0002)));
        let packet = Packet::new_checked(&BYTES[..]).unwrap();
        assert_eq!(packet.receiver_id(), 0x1_0002);
        assert_eq!(packet.count(), 1);
    }

    #[test]
    fn test_emit() {
        let mut buf = [0u8; 8];
        AckRepr::own(0x1_0002).emit(&mut buf).unwrap();
        assert_eq!(buf, BYTES);
    }

    #[test]
    fn truncation_at_every_length_fails() {
        assert_every_truncation_fails(&BYTES, |b| AckRepr::parse(b).map(drop));
    }

    #[test]
    fn rejects_bad_values() {
        let mut trailing = BYTES.to_vec();
        trailing.push(0);
        assert_eq!(AckRepr::parse(&trailing), Err(Error::TrailingBytes(1)));
        let mut zero = BYTES;
        zero[7] = 0;
        assert_eq!(AckRepr::parse(&zero), Err(Error::InvalidField("ack count")));
        let none = AckRepr {
            receiver_id: 1,
            count: 0,
        };
        assert!(none.emit(&mut [0u8; 8]).is_err());
        assert!(AckRepr::own(1).emit(&mut [0u8; 7]).is_err());
    }

    #[test]
    fn in_a_datagram_of_type_7_with_no_flags() {
        let datagram = DatagramRepr {
            group_id: 1,
            spi: 2,
            seq: 3,
            body: BodyRepr::Ack(AckRepr::own(9)),
            mac: [7; 16],
        };
        let mut buf = vec![0u8; datagram.buffer_len()];
        datagram.emit(&mut buf).unwrap();
        assert_eq!(buf[3], 7, "datagram type 7");
        assert_eq!(DatagramRepr::parse(&buf).unwrap(), datagram);
        buf[4] = 0x01;
        assert_eq!(DatagramRepr::parse(&buf), Err(Error::UndefinedFlags(0x01)));
    }

    proptest! {
        #[test]
        fn decode_then_encode_returns_input(bytes in proptest::collection::vec(any::<u8>(), 0..12)) {
            if let Ok(repr) = AckRepr::parse(&bytes) {
                let mut buf = vec![0u8; AckRepr::BUFFER_LEN];
                repr.emit(&mut buf).unwrap();
                prop_assert_eq!(buf, bytes);
            }
        }

        #[test]
        fn any_datagram_bytes_parse_or_fail_without_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..64)
        ) {
            let _ = DatagramRepr::parse(&bytes);
        }
    }
}
