//! The body of a symbol datagram: one FEC encoding symbol of a rekey message.
//!
//! A rekey message is two FEC objects: the signed manifest and the chunks (the user-oriented
//! key packets). Each encoding symbol names its object, its source block (SBN) and its
//! encoding symbol id (ESI) as in RFC 6330's FEC Payload ID (8-bit SBN, 24-bit ESI), and the
//! symbol's length, so that a datagram cut short anywhere fails to parse instead of yielding a
//! shorter symbol. The header flags of a symbol datagram are all zero.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |    object     |      SBN      |   symbol length T (16 bits)   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 ESI (24 bits)                 | symbol data   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+               +
//! |                    ... (exactly T >= 1 bytes)                 |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! object: 0 = manifest, 1 = chunks. The body must end right after the T bytes of symbol data;
//! the FEC layer checks T against the object's transmission information.

use super::{be, check_len, check_room, Error, Result};

/// Length of the fixed part of the symbol body.
pub const FIXED_LEN: usize = field::DATA_START;

/// The largest ESI the 24-bit field holds.
pub const MAX_ESI: u32 = (1 << 24) - 1;

mod field {
    use core::ops::Range;
    pub const OBJECT: usize = 0;
    pub const SBN: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const ESI: Range<usize> = 4..7;
    pub const DATA_START: usize = 7;
}

/// Which FEC object of a rekey message a symbol belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ObjectKind {
    /// The signed manifest.
    Manifest = 0,
    /// The chunks (user-oriented key packets).
    Chunks = 1,
}

impl TryFrom<u8> for ObjectKind {
    type Error = Error;
    fn try_from(value: u8) -> Result<Self> {
        match value {
            0 => Ok(Self::Manifest),
            1 => Ok(Self::Chunks),
            other => Err(Error::UnknownObject(other)),
        }
    }
}

/// A view of a symbol body.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checks.
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking its object kind and that its length is exactly the fixed
    /// part plus the declared symbol length (at least 1); no accessor panics afterwards.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let data = buffer.as_ref();
        check_len(FIXED_LEN, data.len())?;
        ObjectKind::try_from(data[field::OBJECT])?;
        let symbol_len = usize::from(be::u16(&data[field::LENGTH]));
        if symbol_len == 0 {
            return Err(Error::InvalidField("symbol length"));
        }
        check_len(FIXED_LEN + symbol_len, data.len())?;
        if data.len() > FIXED_LEN + symbol_len {
            return Err(Error::TrailingBytes(data.len() - FIXED_LEN - symbol_len));
        }
        Ok(Self { buffer })
    }

    /// The object kind (manifest on an unchecked view with an unknown byte).
    pub fn object(&self) -> ObjectKind {
        ObjectKind::try_from(self.buffer.as_ref()[field::OBJECT]).unwrap_or(ObjectKind::Manifest)
    }

    /// The source block number.
    pub fn sbn(&self) -> u8 {
        self.buffer.as_ref()[field::SBN]
    }

    /// The encoding symbol id.
    pub fn esi(&self) -> u32 {
        be::u24(&self.buffer.as_ref()[field::ESI])
    }

    /// The symbol data.
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[field::DATA_START..]
    }
}

/// A parsed symbol body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolRepr<'a> {
    /// The FEC object.
    pub object: ObjectKind,
    /// The source block number.
    pub sbn: u8,
    /// The encoding symbol id (24 bits).
    pub esi: u32,
    /// The symbol data (never empty).
    pub data: &'a [u8],
}

impl<'a> SymbolRepr<'a> {
    /// Parses a symbol body.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let packet = Packet::new_checked(bytes)?;
        Ok(Self {
            object: packet.object(),
            sbn: packet.sbn(),
            esi: packet.esi(),
            data: &bytes[field::DATA_START..],
        })
    }

    /// Bytes the body takes.
    pub fn buffer_len(&self) -> usize {
        FIXED_LEN + self.data.len()
    }

    /// Writes the body into exactly `buf` (whose length must be [`Self::buffer_len`]).
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        if self.esi > MAX_ESI {
            return Err(Error::InvalidField("esi"));
        }
        let symbol_len =
            u16::try_from(self.data.len()).map_err(|_| Error::InvalidField("symbol length"))?;
        if symbol_len == 0 {
            return Err(Error::InvalidField("symbol length"));
        }
        check_room(self.buffer_len(), buf.len())?;
        buf[field::OBJECT] = self.object as u8;
        buf[field::SBN] = self.sbn;
        be::put_u16(&mut buf[field::LENGTH], symbol_len);
        be::put_u24(&mut buf[field::ESI], self.esi);
        buf[field::DATA_START..self.buffer_len()].copy_from_slice(self.data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::test_support::assert_every_truncation_fails;
    use crate::wire::{BodyRepr, DatagramRepr};

    const BYTES: [u8; 11] = [0x00, 0xFF, 0x00, 0x04, 0xFF, 0xFF, 0xFE, 1, 2, 3, 4];

    #[test]
    fn test_parse() {
        let repr = SymbolRepr::parse(&BYTES).unwrap();
        assert_eq!(
            repr,
            SymbolRepr {
                object: ObjectKind::Manifest,
                sbn: 255,
                esi: 0xFF_FFFE,
                data: &[1, 2, 3, 4],
            }
        );
    }

    #[test]
    fn test_emit() {
        let repr = SymbolRepr::parse(&BYTES).unwrap();
        let mut buf = [0u8; 11];
        repr.emit(&mut buf).unwrap();
        assert_eq!(buf, BYTES);
    }

    #[test]
    fn truncation_at_every_length_fails() {
        assert_every_truncation_fails(&BYTES, |b| SymbolRepr::parse(b).map(drop));
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(
            SymbolRepr::parse(&[2, 0, 0, 1, 0, 0, 0, 1]),
            Err(Error::UnknownObject(2))
        );
        assert_eq!(
            SymbolRepr::parse(&[1, 0, 0, 0, 0, 0, 0]),
            Err(Error::InvalidField("symbol length"))
        );
        let mut trailing = BYTES.to_vec();
        trailing.push(9);
        assert_eq!(SymbolRepr::parse(&trailing), Err(Error::TrailingBytes(1)));
        let too_big = SymbolRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            esi: MAX_ESI + 1,
            data: &[1],
        };
        assert_eq!(too_big.emit(&mut [0u8; 8]), Err(Error::InvalidField("esi")));
        let empty = SymbolRepr {
            object: ObjectKind::Chunks,
            sbn: 0,
            esi: 0,
            data: &[],
        };
        assert!(empty.emit(&mut [0u8; 7]).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(object in 0u8..2, sbn: u8, esi in 0..=MAX_ESI,
                      data in proptest::collection::vec(any::<u8>(), 1..1400),
                      group: u32, spi: u32, seq: u64, mac: [u8; 16]) {
            let repr = DatagramRepr {
                group_id: group,
                spi,
                seq,
                body: BodyRepr::Symbol(SymbolRepr {
                    object: ObjectKind::try_from(object).unwrap(),
                    sbn,
                    esi,
                    data: &data,
                }),
                mac,
            };
            let mut buf = vec![0u8; repr.buffer_len()];
            let len = repr.emit(&mut buf).unwrap();
            prop_assert_eq!(len, buf.len());
            prop_assert_eq!(DatagramRepr::parse(&buf).unwrap(), repr);
        }

        #[test]
        fn decode_then_encode_returns_input(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(repr) = SymbolRepr::parse(&bytes) {
                let mut buf = vec![0u8; repr.buffer_len()];
                repr.emit(&mut buf).unwrap();
                prop_assert_eq!(buf, bytes);
            }
        }
    }
}
