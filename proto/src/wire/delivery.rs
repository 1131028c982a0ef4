//! The body of a unicast delivery: one message's signed manifest and one member's chunk.
//!
//! A member registered as unicast (RFC 4046 5.1: multi-unicast) takes no multicast traffic:
//! its sender (the GCKS or its relay) sends it, for each rekey message, everything it needs
//! of that message in one datagram, retransmitted until the member acknowledges it
//! ([`crate::wire::ack`]). That is the message's signed manifest and the chunk that serves the
//! member's leaf (the whole source symbol, authenticator and padding included), which the
//! member verifies and applies exactly as a resync item, against the GCKS's signature.
//!
//! The datagram is sealed with the message's datagram MAC key and its header's sequence
//! number names the message. The receiver id names the member (its leaf order key), so a
//! member drops what is not addressed to it before any signature check. Manifest and chunk
//! together are a little larger than a multicast symbol: on a 1,500-byte MTU path the
//! datagram is sent as two IP fragments, which costs one datagram of the sender's and saves
//! a second round of acknowledgement. A sender whose datagrams are capped below that size
//! sends the two halves as two deliveries, one with an empty chunk and one with an empty
//! manifest; a delivery with neither is malformed. The header flags are all zero.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    receiver id (32 bits)                      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   manifest length M (16 bits) |  signed manifest (M bytes)     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+                               +
//! |                              ...                              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     chunk length T (16 bits)  |  chunk (exactly T bytes)       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+                               +
//! |                              ...                              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use super::{be, check_len, check_room, Error, Result};

/// Bytes of the body that are not manifest or chunk.
pub const FIXED_LEN: usize = 8;

/// A parsed unicast delivery body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryRepr<'a> {
    /// The id of the member the delivery is for (its leaf order key).
    pub receiver_id: u32,
    /// The message's signed manifest (empty in the second half of a split delivery).
    pub manifest: &'a [u8],
    /// The member's chunk: the whole source symbol (empty in the first half of a split
    /// delivery; never both empty).
    pub chunk: &'a [u8],
}

impl<'a> DeliveryRepr<'a> {
    /// Parses a delivery body: both lengths are checked, and nothing may follow the chunk.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        check_len(6, bytes.len())?;
        let receiver_id = be::u32(&bytes[0..4]);
        let manifest_len = usize::from(be::u16(&bytes[4..6]));
        let chunk_at = 6 + manifest_len;
        check_len(chunk_at + 2, bytes.len())?;
        let manifest = &bytes[6..chunk_at];
        let chunk_len = usize::from(be::u16(&bytes[chunk_at..chunk_at + 2]));
        if manifest_len == 0 && chunk_len == 0 {
            return Err(Error::InvalidField("delivery length"));
        }
        let end = chunk_at + 2 + chunk_len;
        check_len(end, bytes.len())?;
        if bytes.len() > end {
            return Err(Error::TrailingBytes(bytes.len() - end));
        }
        Ok(Self {
            receiver_id,
            manifest,
            chunk: &bytes[chunk_at + 2..end],
        })
    }

    /// Bytes the body takes.
    pub fn buffer_len(&self) -> usize {
        FIXED_LEN + self.manifest.len() + self.chunk.len()
    }

    /// Writes the body into the first [`Self::buffer_len`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        let manifest_len = u16::try_from(self.manifest.len())
            .map_err(|_| Error::InvalidField("manifest length"))?;
        let chunk_len =
            u16::try_from(self.chunk.len()).map_err(|_| Error::InvalidField("chunk length"))?;
        if manifest_len == 0 && chunk_len == 0 {
            return Err(Error::InvalidField("delivery length"));
        }
        check_room(self.buffer_len(), buf.len())?;
        be::put_u32(&mut buf[0..4], self.receiver_id);
        be::put_u16(&mut buf[4..6], manifest_len);
        let chunk_at = 6 + self.manifest.len();
        buf[6..chunk_at].copy_from_slice(self.manifest);
        be::put_u16(&mut buf[chunk_at..chunk_at + 2], chunk_len);
        buf[chunk_at + 2..self.buffer_len()].copy_from_slice(self.chunk);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::test_support::assert_every_truncation_fails;
    use crate::wire::{BodyRepr, DatagramRepr};

    const BYTES: [u8; 13] = [
        0x00, 0x00, 0x01, 0x00, // receiver 256
        0x00, 0x02, 0xAA, 0xBB, // manifest of 2 bytes
        0x00, 0x03, 1, 2, 3, // chunk of 3 bytes
    ];

    fn repr() -> DeliveryRepr<'static> {
        DeliveryRepr {
            receiver_id: 256,
            manifest: &[0xAA, 0xBB],
            chunk: &[1, 2, 3],
        }
    }

    #[test]
    fn test_parse() {
        assert_eq!(DeliveryRepr::parse(&BYTES), Ok(repr()));
    }

    #[test]
    fn test_emit() {
        let mut buf = [0u8; 13];
        repr().emit(&mut buf).unwrap();
        assert_eq!(buf, BYTES);
    }

    #[test]
    fn truncation_at_every_length_fails() {
        assert_every_truncation_fails(&BYTES, |b| DeliveryRepr::parse(b).map(drop));
    }

    #[test]
    fn rejects_bad_values() {
        let mut trailing = BYTES.to_vec();
        trailing.push(0);
        assert_eq!(DeliveryRepr::parse(&trailing), Err(Error::TrailingBytes(1)));
        // Either half alone is a delivery; neither is not.
        let chunk_half = [0, 0, 0, 1, 0, 0, 0, 1, 9];
        assert_eq!(
            DeliveryRepr::parse(&chunk_half),
            Ok(DeliveryRepr {
                receiver_id: 1,
                manifest: &[],
                chunk: &[9]
            })
        );
        let manifest_half = [0, 0, 0, 1, 0, 1, 9, 0, 0];
        assert_eq!(
            DeliveryRepr::parse(&manifest_half),
            Ok(DeliveryRepr {
                receiver_id: 1,
                manifest: &[9],
                chunk: &[]
            })
        );
        let empty = [0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(
            DeliveryRepr::parse(&empty),
            Err(Error::InvalidField("delivery length"))
        );
        let nothing = DeliveryRepr {
            chunk: &[],
            manifest: &[],
            ..repr()
        };
        assert!(nothing.emit(&mut [0u8; 32]).is_err());
        assert!(repr().emit(&mut [0u8; 12]).is_err());
    }

    #[test]
    fn in_a_datagram_of_type_6_with_no_flags() {
        let datagram = DatagramRepr {
            group_id: 1,
            spi: 2,
            seq: 3,
            body: BodyRepr::Delivery(repr()),
            mac: [0; 16],
        };
        let mut buf = vec![0u8; datagram.buffer_len()];
        datagram.emit(&mut buf).unwrap();
        assert_eq!(buf[3], 6, "datagram type 6");
        assert_eq!(DatagramRepr::parse(&buf).unwrap(), datagram);
        buf[4] = 0x80;
        assert_eq!(DatagramRepr::parse(&buf), Err(Error::UndefinedFlags(0x80)));
    }

    proptest! {
        #[test]
        fn round_trip(receiver_id: u32,
                      manifest in proptest::collection::vec(any::<u8>(), 0..300),
                      chunk in proptest::collection::vec(any::<u8>(), 1..1400)) {
            let repr = DeliveryRepr { receiver_id, manifest: &manifest, chunk: &chunk };
            let mut buf = vec![0u8; repr.buffer_len()];
            repr.emit(&mut buf).unwrap();
            prop_assert_eq!(DeliveryRepr::parse(&buf).unwrap(), repr);
        }

        #[test]
        fn decode_then_encode_returns_input(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            if let Ok(repr) = DeliveryRepr::parse(&bytes) {
                let mut buf = vec![0u8; repr.buffer_len()];
                repr.emit(&mut buf).unwrap();
                prop_assert_eq!(buf, bytes);
            }
        }
    }
}
