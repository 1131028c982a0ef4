//! The body of a unicast chunk repair datagram: one member's own chunk, delivered by unicast.
//!
//! A rekey member needs exactly one chunk of a message (user-oriented key assignment). When
//! the multicast repair rounds leave a few members without theirs, the cheapest repair for
//! the group is to send each of them its chunk alone, one datagram each, to its own address
//! (limited unicast recovery; Zhang, Lam, Lee and Yang, "Protocol design for scalable and
//! reliable group rekeying", IEEE/ACM ToN 2003). Whoever holds the message may send it: the
//! GCKS, a relay for its subtree, or a sender serving a member that receives by unicast only.
//!
//! The datagram is sealed with the message's datagram MAC key like every other datagram, and
//! its header's sequence number names the message. The body is the chunk exactly as it is
//! the source symbol `(SBN, ESI)` of the message's chunk object: the chunk container with its
//! own authenticator (Merkle path to the signed manifest's root, or its Ed25519 signature)
//! and its zero padding, so the member verifies it exactly as it would a source symbol that
//! came by multicast, against the message's verified manifest. The receiver id names the
//! member the chunk is for (the 32-bit id NACKs carry), so a member can drop what is not
//! addressed to it before any chunk check. The header flags are all zero.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |      SBN      |                 ESI (24 bits)                 |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    receiver id (32 bits)                      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     chunk length T (16 bits)  |  chunk (exactly T >= 1 bytes) |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+                               +
//! |                              ...                              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! A member asks for it with a NACK carrying [`crate::wire::nack::FLAG_UNICAST_CHUNK`].

use super::symbol::MAX_ESI;
use super::{be, check_len, check_room, Error, Result};

/// Length of the fixed part of the body.
pub const FIXED_LEN: usize = field::DATA_START;

mod field {
    use core::ops::Range;
    pub const SBN: usize = 0;
    pub const ESI: Range<usize> = 1..4;
    pub const RECEIVER: Range<usize> = 4..8;
    pub const LENGTH: Range<usize> = 8..10;
    pub const DATA_START: usize = 10;
}

/// A view of a chunk repair body.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer after checking that its length is exactly the fixed part plus the
    /// declared chunk length (at least 1); no accessor panics afterwards.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let data = buffer.as_ref();
        check_len(FIXED_LEN, data.len())?;
        let chunk_len = usize::from(be::u16(&data[field::LENGTH]));
        if chunk_len == 0 {
            return Err(Error::InvalidField("chunk length"));
        }
        check_len(FIXED_LEN + chunk_len, data.len())?;
        if data.len() > FIXED_LEN + chunk_len {
            return Err(Error::TrailingBytes(data.len() - FIXED_LEN - chunk_len));
        }
        Ok(Self { buffer })
    }

    /// The source block number of the chunk's symbol.
    pub fn sbn(&self) -> u8 {
        self.buffer.as_ref()[field::SBN]
    }

    /// The encoding symbol id of the chunk's symbol (a source ESI).
    pub fn esi(&self) -> u32 {
        be::u24(&self.buffer.as_ref()[field::ESI])
    }

    /// The id of the member the chunk is for.
    pub fn receiver_id(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::RECEIVER])
    }

    /// The chunk's bytes (the whole source symbol).
    pub fn chunk(&self) -> &[u8] {
        &self.buffer.as_ref()[field::DATA_START..]
    }
}

/// A parsed chunk repair body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRepairRepr<'a> {
    /// The source block number of the chunk's symbol.
    pub sbn: u8,
    /// The encoding symbol id of the chunk's symbol (24 bits).
    pub esi: u32,
    /// The id of the member the chunk is for.
    pub receiver_id: u32,
    /// The chunk: the whole source symbol, authenticator and padding included (never empty).
    pub chunk: &'a [u8],
}

impl<'a> ChunkRepairRepr<'a> {
    /// Parses a chunk repair body.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let packet = Packet::new_checked(bytes)?;
        Ok(Self {
            sbn: packet.sbn(),
            esi: packet.esi(),
            receiver_id: packet.receiver_id(),
            chunk: &bytes[field::DATA_START..],
        })
    }

    /// Bytes the body takes.
    pub fn buffer_len(&self) -> usize {
        FIXED_LEN + self.chunk.len()
    }

    /// Writes the body into the first [`Self::buffer_len`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        if self.esi > MAX_ESI {
            return Err(Error::InvalidField("esi"));
        }
        let chunk_len =
            u16::try_from(self.chunk.len()).map_err(|_| Error::InvalidField("chunk length"))?;
        if chunk_len == 0 {
            return Err(Error::InvalidField("chunk length"));
        }
        check_room(self.buffer_len(), buf.len())?;
        buf[field::SBN] = self.sbn;
        be::put_u24(&mut buf[field::ESI], self.esi);
        be::put_u32(&mut buf[field::RECEIVER], self.receiver_id);
        be::put_u16(&mut buf[field::LENGTH], chunk_len);
        buf[field::DATA_START..self.buffer_len()].copy_from_slice(self.chunk);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::test_support::assert_every_truncation_fails;
    use crate::wire::{BodyRepr, DatagramRepr};

    const BYTES: [u8; 14] = [
        0x02, 0x00, 0x01, 0x05, // SBN 2, ESI 0x105
        0x00, 0x01, 0x00, 0x00, // receiver 65536
        0x00, 0x04, // length 4
        9, 8, 7, 6, // chunk
    ];

    fn repr() -> ChunkRepairRepr<'static> {
        ChunkRepairRepr {
            sbn: 2,
            esi: 0x105,
            receiver_id: 65_536,
            chunk: &[9, 8, 7, 6],
        }
    }

    #[test]
    fn test_parse() {
        assert_eq!(ChunkRepairRepr::parse(&BYTES), Ok(repr()));
        let packet = Packet::new_checked(&BYTES[..]).unwrap();
        assert_eq!(packet.sbn(), 2);
        assert_eq!(packet.esi(), 0x105);
        assert_eq!(packet.receiver_id(), 65_536);
        assert_eq!(packet.chunk(), &[9, 8, 7, 6]);
    }

    #[test]
    fn test_emit() {
        let mut buf = [0u8; 14];
        repr().emit(&mut buf).unwrap();
        assert_eq!(buf, BYTES);
    }

    #[test]
    fn truncation_at_every_length_fails() {
        assert_every_truncation_fails(&BYTES, |b| ChunkRepairRepr::parse(b).map(drop));
    }

    #[test]
    fn rejects_bad_values() {
        let mut trailing = BYTES.to_vec();
        trailing.push(0);
        assert_eq!(
            ChunkRepairRepr::parse(&trailing),
            Err(Error::TrailingBytes(1))
        );
        let mut empty = BYTES[..10].to_vec();
        empty[9] = 0;
        assert_eq!(
            ChunkRepairRepr::parse(&empty),
            Err(Error::InvalidField("chunk length"))
        );
        let too_big = ChunkRepairRepr {
            esi: MAX_ESI + 1,
            ..repr()
        };
        assert_eq!(
            too_big.emit(&mut [0u8; 14]),
            Err(Error::InvalidField("esi"))
        );
        let no_chunk = ChunkRepairRepr {
            chunk: &[],
            ..repr()
        };
        assert!(no_chunk.emit(&mut [0u8; 14]).is_err());
        assert!(repr().emit(&mut [0u8; 13]).is_err());
    }

    #[test]
    fn header_flags_must_be_zero() {
        let body = repr();
        let datagram = DatagramRepr {
            group_id: 1,
            spi: 2,
            seq: 3,
            body: BodyRepr::ChunkRepair(body),
            mac: [0; 16],
        };
        let mut buf = vec![0u8; datagram.buffer_len()];
        datagram.emit(&mut buf).unwrap();
        assert_eq!(buf[3], 5, "datagram type 5");
        assert_eq!(DatagramRepr::parse(&buf).unwrap(), datagram);
        buf[4] = 0x01;
        assert_eq!(DatagramRepr::parse(&buf), Err(Error::UndefinedFlags(0x01)));
    }

    proptest! {
        #[test]
        fn round_trip(sbn: u8, esi in 0..=MAX_ESI, receiver_id: u32,
                      chunk in proptest::collection::vec(any::<u8>(), 1..1400),
                      seq: u64, mac: [u8; 16]) {
            let repr = DatagramRepr {
                group_id: 1,
                spi: 2,
                seq,
                body: BodyRepr::ChunkRepair(ChunkRepairRepr { sbn, esi, receiver_id, chunk: &chunk }),
                mac,
            };
            let mut buf = vec![0u8; repr.buffer_len()];
            let len = repr.emit(&mut buf).unwrap();
            prop_assert_eq!(len, buf.len());
            prop_assert_eq!(DatagramRepr::parse(&buf).unwrap(), repr);
        }

        #[test]
        fn decode_then_encode_returns_input(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(repr) = ChunkRepairRepr::parse(&bytes) {
                let mut buf = vec![0u8; repr.buffer_len()];
                repr.emit(&mut buf).unwrap();
                prop_assert_eq!(buf, bytes);
            }
        }
    }
}
