//! The object transmission information and the partition of an object into source blocks.
//!
//! This module owns the parameters a receiver needs before it can decode anything (RFC 6330
//! section 3.3's OTI, reduced to what a rekey object uses) and the arithmetic that maps a source
//! symbol's index to its block and ESI. It touches no symbol data.
//!
//! # Byte layout (7 bytes, big-endian)
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | FEC enc. id 6 |       source symbols K (24 bits)              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     symbol size T (16 bits)   | source blocks Z |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! - FEC encoding id: 6, RaptorQ (RFC 6330 section 3.1); anything else is another scheme.
//! - K: the object's source symbols (its chunk count), 1 or more.
//! - T: the symbol size in bytes, 1 or more (every symbol of the object has exactly T bytes).
//! - Z: the number of source blocks, 1 to 255, at most K, and such that no block exceeds
//!   K'max = 56,403 symbols.
//!
//! RFC 6330's OTI also carries the transfer length F, the number of sub-blocks N and the symbol
//! alignment Al. A rekey object is whole symbols (F = K * T: chunks are padded to T by the
//! message layer, which has its own lengths), and its symbols fit one datagram, so it is never
//! sub-blocked (N = 1) and alignment plays no part (Al = 1): none of the three is sent, so no
//! receiver has to reject inconsistent values of them.
//!
//! Every byte string parses to a value or a typed [`Error`]; a value emits back to the same 7
//! bytes, so the encoding is canonical.

use crate::{
    Error, Result, FEC_ENCODING_ID, MAX_BLOCK_SYMBOLS, MAX_ESI, MAX_SOURCE_BLOCKS,
    MAX_SOURCE_SYMBOLS,
};

mod field {
    use core::ops::Range;
    pub const ENCODING_ID: usize = 0;
    pub const SOURCE_SYMBOLS: Range<usize> = 1..4;
    pub const SYMBOL_SIZE: Range<usize> = 4..6;
    pub const SOURCE_BLOCKS: usize = 6;
    pub const END: usize = 7;
}

/// The object transmission information of a rekey FEC object: how many source symbols, of what
/// size, in how many blocks. Always valid: every constructor checks the ranges above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectInfo {
    source_symbols: u32,
    symbol_size: u16,
    source_blocks: u8,
}

impl ObjectInfo {
    /// Length of the encoded object transmission information.
    pub const LEN: usize = field::END;

    /// Parameters for `source_symbols` symbols of `symbol_size` bytes split into blocks of at
    /// most `max_block_symbols` (B) symbols: Z = ceil(K / B) blocks, sized by RFC 6330's
    /// Partition[K, Z] so that they differ by at most one symbol. B must be 1 to
    /// [`MAX_BLOCK_SYMBOLS`]; [`crate::DEFAULT_MAX_BLOCK_SYMBOLS`] is the measured default.
    pub fn new(source_symbols: u32, symbol_size: u16, max_block_symbols: u32) -> Result<Self> {
        if max_block_symbols == 0 || max_block_symbols > MAX_BLOCK_SYMBOLS {
            return Err(Error::InvalidParameter("max block symbols"));
        }
        if source_symbols == 0 || source_symbols > MAX_SOURCE_SYMBOLS {
            return Err(Error::InvalidParameter("source symbols"));
        }
        let blocks = source_symbols.div_ceil(max_block_symbols);
        if blocks > MAX_SOURCE_BLOCKS {
            return Err(Error::TooManyBlocks { blocks });
        }
        // `blocks` <= 255 was checked just above.
        let blocks = u8::try_from(blocks).map_err(|_| Error::TooManyBlocks { blocks })?;
        Self::from_parts(source_symbols, symbol_size, blocks)
    }

    /// Parameters given as K, T and Z directly, checked against the ranges of the layout.
    pub fn from_parts(source_symbols: u32, symbol_size: u16, source_blocks: u8) -> Result<Self> {
        if source_symbols == 0 || source_symbols > MAX_SOURCE_SYMBOLS {
            return Err(Error::InvalidParameter("source symbols"));
        }
        if symbol_size == 0 {
            return Err(Error::InvalidParameter("symbol size"));
        }
        if source_blocks == 0 {
            return Err(Error::InvalidParameter("source blocks"));
        }
        if u32::from(source_blocks) > source_symbols {
            return Err(Error::InvalidParameter(
                "more source blocks than source symbols",
            ));
        }
        if source_symbols.div_ceil(u32::from(source_blocks)) > MAX_BLOCK_SYMBOLS {
            return Err(Error::InvalidParameter("block larger than K'max"));
        }
        Ok(Self {
            source_symbols,
            symbol_size,
            source_blocks,
        })
    }

    /// Parses exactly [`Self::LEN`] bytes (fewer or more is an error).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < Self::LEN {
            return Err(Error::InfoTruncated(bytes.len()));
        }
        if bytes.len() > Self::LEN {
            return Err(Error::InfoTrailingBytes(bytes.len() - Self::LEN));
        }
        if bytes[field::ENCODING_ID] != FEC_ENCODING_ID {
            return Err(Error::UnknownEncoding(bytes[field::ENCODING_ID]));
        }
        let k = &bytes[field::SOURCE_SYMBOLS];
        let source_symbols = u32::from_be_bytes([0, k[0], k[1], k[2]]);
        let t = &bytes[field::SYMBOL_SIZE];
        let symbol_size = u16::from_be_bytes([t[0], t[1]]);
        Self::from_parts(source_symbols, symbol_size, bytes[field::SOURCE_BLOCKS])
    }

    /// Writes the [`Self::LEN`] bytes into the start of `buf`; an error if `buf` is shorter.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        let Some(out) = buf.get_mut(..Self::LEN) else {
            return Err(Error::InfoTruncated(buf.len()));
        };
        out.copy_from_slice(&self.to_bytes());
        Ok(())
    }

    /// The encoded bytes.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let k = self.source_symbols.to_be_bytes();
        let t = self.symbol_size.to_be_bytes();
        [
            FEC_ENCODING_ID,
            k[1],
            k[2],
            k[3],
            t[0],
            t[1],
            self.source_blocks,
        ]
    }

    /// K: the object's source symbols.
    pub fn source_symbols(&self) -> u32 {
        self.source_symbols
    }

    /// T: the symbol size in bytes.
    pub fn symbol_size(&self) -> u16 {
        self.symbol_size
    }

    /// Z: the number of source blocks.
    pub fn source_blocks(&self) -> u8 {
        self.source_blocks
    }

    /// The object's length in bytes: K * T.
    pub fn transfer_length(&self) -> u64 {
        u64::from(self.source_symbols) * u64::from(self.symbol_size)
    }

    /// Which block and ESI hold each source symbol.
    pub fn partition(&self) -> BlockPartition {
        BlockPartition::new(self.source_symbols, self.source_blocks)
    }
}

/// Where a symbol sits: its source block number and encoding symbol id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SymbolId {
    /// The source block number.
    pub sbn: u8,
    /// The encoding symbol id within the block (24 bits).
    pub esi: u32,
}

/// The split of K source symbols into Z blocks, RFC 6330 section 4.4.1.2:
/// (KL, KS, ZL, ZS) = Partition[K, Z]; the first ZL blocks hold KL = ceil(K / Z) symbols and the
/// other ZS hold KS = floor(K / Z). Source symbol i of the object is ESI i - start(b) of the
/// block b that covers it, so ESI 0..K_b-1 of a block are its chunks in order (systematic code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockPartition {
    source_symbols: u32,
    blocks: u32,
    large_len: u32,
    small_len: u32,
    large_blocks: u32,
}

impl BlockPartition {
    fn new(source_symbols: u32, blocks: u8) -> Self {
        let blocks = u32::from(blocks);
        // ObjectInfo guarantees 1 <= blocks <= source_symbols, so small_len >= 1.
        let large_len = source_symbols.div_ceil(blocks);
        let small_len = source_symbols / blocks;
        let large_blocks = source_symbols - small_len * blocks;
        Self {
            source_symbols,
            blocks,
            large_len,
            small_len,
            large_blocks,
        }
    }

    /// Z: the number of blocks.
    pub fn block_count(&self) -> u32 {
        self.blocks
    }

    /// K: source symbols of the whole object.
    pub fn source_symbols(&self) -> u32 {
        self.source_symbols
    }

    /// KL: source symbols of the largest block.
    pub fn max_block_len(&self) -> u32 {
        self.large_len
    }

    /// Source symbols of block `sbn`.
    pub fn block_len(&self, sbn: u8) -> Result<u32> {
        let b = self.check_sbn(sbn)?;
        Ok(if b < self.large_blocks {
            self.large_len
        } else {
            self.small_len
        })
    }

    /// Index (within the object) of block `sbn`'s first source symbol.
    pub fn block_start(&self, sbn: u8) -> Result<u32> {
        let b = self.check_sbn(sbn)?;
        Ok(if b < self.large_blocks {
            b * self.large_len
        } else {
            self.large_blocks * self.large_len + (b - self.large_blocks) * self.small_len
        })
    }

    /// The block and ESI of source symbol `index` of the object.
    pub fn locate(&self, index: u32) -> Result<SymbolId> {
        if index >= self.source_symbols {
            return Err(Error::IndexOutOfRange {
                index,
                symbols: self.source_symbols,
            });
        }
        let large_total = self.large_blocks * self.large_len;
        let (block, esi) = if index < large_total {
            (index / self.large_len, index % self.large_len)
        } else {
            let rest = index - large_total;
            (
                self.large_blocks + rest / self.small_len,
                rest % self.small_len,
            )
        };
        // block < blocks <= 255 because index < source_symbols.
        let sbn = u8::try_from(block).map_err(|_| Error::IndexOutOfRange {
            index,
            symbols: self.source_symbols,
        })?;
        Ok(SymbolId { sbn, esi })
    }

    /// The object index of source symbol `esi` of block `sbn`.
    pub fn index_of(&self, id: SymbolId) -> Result<u32> {
        let len = self.block_len(id.sbn)?;
        if id.esi >= len {
            return Err(Error::EsiOutOfRange {
                esi: u64::from(id.esi),
            });
        }
        Ok(self.block_start(id.sbn)? + id.esi)
    }

    fn check_sbn(&self, sbn: u8) -> Result<u32> {
        let b = u32::from(sbn);
        if b >= self.blocks {
            return Err(Error::SbnOutOfRange {
                sbn,
                blocks: self.blocks,
            });
        }
        Ok(b)
    }
}

/// Checks an ESI fits the 24-bit field.
pub(crate) fn check_esi(esi: u32) -> Result<()> {
    if esi > MAX_ESI {
        return Err(Error::EsiOutOfRange {
            esi: u64::from(esi),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const BYTES: [u8; 7] = [6, 0x00, 0x01, 0x2C, 0x04, 0xB0, 0x02];

    #[test]
    fn test_parse() {
        let info = ObjectInfo::parse(&BYTES).unwrap();
        assert_eq!(info.source_symbols(), 300);
        assert_eq!(info.symbol_size(), 1200);
        assert_eq!(info.source_blocks(), 2);
        assert_eq!(info.transfer_length(), 360_000);
        assert_eq!(info, ObjectInfo::new(300, 1200, 256).unwrap());
    }

    #[test]
    fn test_emit() {
        let info = ObjectInfo::from_parts(300, 1200, 2).unwrap();
        assert_eq!(info.to_bytes(), BYTES);
        let mut buf = [0u8; 7];
        info.emit(&mut buf).unwrap();
        assert_eq!(buf, BYTES);
        assert_eq!(info.emit(&mut [0u8; 6]), Err(Error::InfoTruncated(6)));
    }

    #[test]
    fn largest_values_parse() {
        // K = 255 * 56,403 = 14,382,765 = 0xDB76AD: 255 blocks of exactly K'max.
        let bytes = [6, 0xDB, 0x76, 0xAD, 0xFF, 0xFF, 0xFF];
        let info = ObjectInfo::parse(&bytes).unwrap();
        assert_eq!(info.source_symbols(), 255 * MAX_BLOCK_SYMBOLS);
        assert_eq!(info.symbol_size(), u16::MAX);
        assert_eq!(info.source_blocks(), 255);
        assert_eq!(info.partition().max_block_len(), MAX_BLOCK_SYMBOLS);
        assert_eq!(info.to_bytes(), bytes);
        // One more symbol makes a block one past K'max.
        assert_eq!(
            ObjectInfo::parse(&[6, 0xDB, 0x76, 0xAE, 0xFF, 0xFF, 0xFF]),
            Err(Error::InvalidParameter("block larger than K'max"))
        );
    }

    #[test]
    fn truncation_at_every_length_fails() {
        for len in 0..BYTES.len() {
            assert_eq!(
                ObjectInfo::parse(&BYTES[..len]),
                Err(Error::InfoTruncated(len))
            );
        }
        let mut long = BYTES.to_vec();
        long.push(0);
        assert_eq!(ObjectInfo::parse(&long), Err(Error::InfoTrailingBytes(1)));
    }

    #[test]
    fn every_out_of_range_parameter_is_rejected() {
        let cases: [([u8; 7], Error); 7] = [
            ([5, 0, 0, 1, 0, 1, 1], Error::UnknownEncoding(5)),
            (
                [6, 0, 0, 0, 0, 1, 1],
                Error::InvalidParameter("source symbols"),
            ),
            (
                [6, 0, 0, 1, 0, 0, 1],
                Error::InvalidParameter("symbol size"),
            ),
            (
                [6, 0, 0, 1, 0, 1, 0],
                Error::InvalidParameter("source blocks"),
            ),
            (
                [6, 0, 0, 1, 0, 1, 2],
                Error::InvalidParameter("more source blocks than source symbols"),
            ),
            // K = 56,404 in one block: one past K'max.
            (
                [6, 0, 0xDC, 0x54, 0, 1, 1],
                Error::InvalidParameter("block larger than K'max"),
            ),
            // K = 2^24 - 1 in 255 blocks: 65,794 per block.
            (
                [6, 0xFF, 0xFF, 0xFF, 0, 1, 255],
                Error::InvalidParameter("block larger than K'max"),
            ),
        ];
        for (bytes, error) in cases {
            assert_eq!(ObjectInfo::parse(&bytes), Err(error), "{bytes:?}");
        }
        // The largest block that is allowed.
        assert!(ObjectInfo::parse(&[6, 0, 0xDC, 0x53, 0, 1, 1]).is_ok());
        assert_eq!(
            ObjectInfo::new(10, 16, 0),
            Err(Error::InvalidParameter("max block symbols"))
        );
        assert_eq!(
            ObjectInfo::new(10, 16, MAX_BLOCK_SYMBOLS + 1),
            Err(Error::InvalidParameter("max block symbols"))
        );
        assert_eq!(
            ObjectInfo::new(0, 16, 10),
            Err(Error::InvalidParameter("source symbols"))
        );
        assert_eq!(
            ObjectInfo::new(MAX_SOURCE_SYMBOLS + 1, 16, MAX_BLOCK_SYMBOLS),
            Err(Error::InvalidParameter("source symbols"))
        );
        assert_eq!(
            ObjectInfo::new(256 * 4, 16, 4),
            Err(Error::TooManyBlocks { blocks: 256 })
        );
        assert!(ObjectInfo::new(255 * 4, 16, 4).is_ok());
        assert_eq!(
            ObjectInfo::new(10, 0, 4),
            Err(Error::InvalidParameter("symbol size"))
        );
    }

    #[test]
    fn partition_matches_rfc6330_example() {
        // K = 10, Z = 3: KL = 4, KS = 3, ZL = 1: blocks of 4, 3, 3.
        let p = ObjectInfo::from_parts(10, 8, 3).unwrap().partition();
        assert_eq!(
            (0..3).map(|b| p.block_len(b).unwrap()).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        assert_eq!(
            (0..3)
                .map(|b| p.block_start(b).unwrap())
                .collect::<Vec<_>>(),
            [0, 4, 7]
        );
        assert_eq!(p.locate(3).unwrap(), SymbolId { sbn: 0, esi: 3 });
        assert_eq!(p.locate(4).unwrap(), SymbolId { sbn: 1, esi: 0 });
        assert_eq!(p.locate(9).unwrap(), SymbolId { sbn: 2, esi: 2 });
        assert_eq!(
            p.locate(10),
            Err(Error::IndexOutOfRange {
                index: 10,
                symbols: 10
            })
        );
        assert_eq!(
            p.block_len(3),
            Err(Error::SbnOutOfRange { sbn: 3, blocks: 3 })
        );
        assert_eq!(
            p.index_of(SymbolId { sbn: 1, esi: 3 }),
            Err(Error::EsiOutOfRange { esi: 3 })
        );
    }

    proptest! {
        #[test]
        fn round_trip(k in 1u32..=MAX_SOURCE_SYMBOLS, t in 1u16..=u16::MAX,
                      b in 1u32..=MAX_BLOCK_SYMBOLS) {
            match ObjectInfo::new(k, t, b) {
                Ok(info) => {
                    let bytes = info.to_bytes();
                    prop_assert_eq!(ObjectInfo::parse(&bytes), Ok(info));
                    let p = info.partition();
                    prop_assert!(p.max_block_len() <= b);
                    prop_assert_eq!(p.block_count(), k.div_ceil(b));
                }
                Err(error) => prop_assert_eq!(error, Error::TooManyBlocks { blocks: k.div_ceil(b) }),
            }
        }

        #[test]
        fn any_bytes_parse_or_fail_and_values_reemit(bytes in proptest::collection::vec(any::<u8>(), 0..10)) {
            if let Ok(info) = ObjectInfo::parse(&bytes) {
                prop_assert_eq!(&info.to_bytes()[..], &bytes[..]);
            }
        }

        #[test]
        fn partition_covers_every_symbol_once(k in 1u32..3000, z in 1u8..=255) {
            prop_assume!(u32::from(z) <= k);
            let p = ObjectInfo::from_parts(k, 4, z).unwrap().partition();
            let total: u32 = (0..z).map(|b| p.block_len(b).unwrap()).sum();
            prop_assert_eq!(total, k);
            for index in [0, k / 3, k / 2, k - 1] {
                let id = p.locate(index).unwrap();
                prop_assert_eq!(p.index_of(id).unwrap(), index);
            }
            let lens: Vec<u32> = (0..z).map(|b| p.block_len(b).unwrap()).collect();
            prop_assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
        }
    }
}
