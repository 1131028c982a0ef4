//! rekeycast-fec: RaptorQ (RFC 6330) source blocks, repair symbols on demand, safe decoding.
//!
//! A rekey message's chunks are an FEC object of K equal-size source symbols (each chunk padded
//! to the symbol size T). This crate splits the object into source blocks of at most B symbols
//! the way RFC 6330 section 4.4.1.2 does, describes that split in a compact object transmission
//! information ([`ObjectInfo`], carried in the signed manifest), builds and caches one RaptorQ
//! encoder per block so that the NACK path can ask for fresh repair symbols again and again
//! ([`ObjectEncoder`], [`BlockEncoder`]), and decodes blocks from any mix of source and repair
//! symbols within configured memory [`Limits`] ([`ObjectDecoder`], [`BlockDecoder`]).
//!
//! It owns no socket, no clock and no thread, and it does not parse datagrams (that is
//! `rekeycast::wire`) or authenticate what it decodes (that is `rekeycast::auth`).
//!
//! # Safety against the `raptorq` crate's panics
//!
//! `raptorq` asserts on inconsistent input rather than returning errors (an ESI of 24 bits or
//! more, a symbol of the wrong size, a block whose length is not a multiple of the symbol size,
//! more than 56,403 symbols in a block, a symbol size of zero, a packet of another block). Every
//! public function here checks those conditions first and returns a typed [`Error`]; nothing
//! reachable from the network can panic or allocate beyond the [`Limits`].
//!
//! # Typical use
//!
//! ```
//! use rekeycast_fec::{Limits, ObjectDecoder, ObjectEncoder, ObjectInfo, Progress};
//!
//! // Sender: 5 chunks of 16 bytes, blocks of at most 4 symbols (so 2 blocks of 3 and 2).
//! let info = ObjectInfo::new(5, 16, 4)?;
//! let data: Vec<u8> = (0..5 * 16).map(|i| i as u8).collect();
//! let encoder = ObjectEncoder::new(info, data.clone())?;
//! let manifest_bytes = info.to_bytes();
//!
//! // Receiver: learns the parameters from the (verified) manifest.
//! let info = ObjectInfo::parse(&manifest_bytes)?;
//! let mut decoder = ObjectDecoder::new(info, Limits::default())?;
//! // Block 0 lost its source symbol 1: a member holding chunk 0 has it at once.
//! let progress = decoder.push(0, 0, encoder.source_symbol(0, 0)?)?;
//! assert_eq!(progress, Progress::Pending { needed: 2 });
//! assert_eq!(decoder.source_symbol_at(0), Some(&data[..16]));
//! let progress = decoder.push(0, 2, encoder.source_symbol(0, 2)?)?;
//! assert_eq!(progress, Progress::Pending { needed: 1 });
//! // Repair symbols (ESI 3 on) stand in for it; one usually suffices, rarely two or three.
//! let mut esi = 3;
//! while !decoder.is_block_decoded(0) {
//!     let repair = encoder.block(0)?.repair_symbol(esi)?;
//!     let progress = decoder.push(0, esi, &repair)?;
//!     assert!(matches!(progress, Progress::Decoded | Progress::Pending { needed: 1 }));
//!     esi += 1;
//! }
//! assert_eq!(decoder.block(0), Some(&data[..48]));
//! # Ok::<(), rekeycast_fec::Error>(())
//! ```
#![forbid(unsafe_code)]

mod decoder;
mod encoder;
pub mod fuzz_support;
mod info;

pub use decoder::{BlockDecoder, Limits, ObjectDecoder, Progress};
pub use encoder::{BlockEncoder, EncodingPlans, ObjectEncoder, RepairSymbols};
pub use info::{BlockPartition, ObjectInfo, SymbolId};

/// The FEC Encoding ID of RaptorQ (RFC 6330 section 3.1), the first byte of an [`ObjectInfo`].
pub const FEC_ENCODING_ID: u8 = 6;

/// The most source symbols one block may hold: K'max of RFC 6330 section 5.1.2.
pub const MAX_BLOCK_SYMBOLS: u32 = 56_403;

/// The most source blocks an object may have (the SBN is 8 bits; RFC 6330 3.3.3's Z field too).
pub const MAX_SOURCE_BLOCKS: u32 = 255;

/// The largest encoding symbol id (the ESI is 24 bits, RFC 6330 section 3.2).
pub const MAX_ESI: u32 = (1 << 24) - 1;

/// The most source symbols an object may hold (its count is a 24-bit field of [`ObjectInfo`]).
pub const MAX_SOURCE_SYMBOLS: u32 = (1 << 24) - 1;

/// The block size B (source symbols per block at most) a sender uses unless configured
/// otherwise, chosen from the `fec` benchmark (T = 1,200 B, one core):
///
/// - Encoding costs about the same per symbol for any B from 64 up (building every block
///   encoder of a 4,096-chunk object takes about 5 ms whether B is 64, 256 or 1,024), so the
///   sender does not care.
/// - A member that lost its chunk must receive B symbols and decode its block: about 0.15 ms
///   at B = 64, 0.7 ms at 256 and 3 to 4 ms at 1,024 (decoding grows faster than B), and B
///   datagrams of download. One repair symbol on demand also costs more in a larger block.
/// - Larger blocks need less proactive repair for the same decode probability: at 5%
///   independent loss, 99.9% of members decode their block with 17% repair at B = 64, 10.5%
///   at 256 and 7.7% at 1,024 (binomial tail), and fewer blocks mean fewer NACK rounds.
///
/// 256 takes most of the repair saving of large blocks while keeping a member's decode under
/// a millisecond and its download on loss at about 300 KB. Messages of up to 256 chunks are one
/// block.
pub const DEFAULT_MAX_BLOCK_SYMBOLS: u32 = 256;

/// What can go wrong in this crate. Every rejected input maps to one variant; nothing panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The object transmission information ends early.
    #[error("object transmission information truncated: {0} of {len} bytes", len = ObjectInfo::LEN)]
    InfoTruncated(usize),
    /// Bytes follow the object transmission information.
    #[error("{0} trailing bytes after the object transmission information")]
    InfoTrailingBytes(usize),
    /// The object transmission information names another FEC scheme.
    #[error("unknown FEC encoding id {0}")]
    UnknownEncoding(u8),
    /// A parameter of the object transmission information is out of its range.
    #[error("invalid FEC parameter: {0}")]
    InvalidParameter(&'static str),
    /// The object would need more than [`MAX_SOURCE_BLOCKS`] blocks of the given size.
    #[error("{blocks} source blocks needed, at most {max} allowed", max = MAX_SOURCE_BLOCKS)]
    TooManyBlocks {
        /// Blocks the object would need.
        blocks: u32,
    },
    /// The object has more source symbols than the limit allows.
    #[error("object of {symbols} source symbols exceeds the limit of {limit}")]
    ObjectTooLarge {
        /// Source symbols of the object.
        symbols: u32,
        /// The configured limit.
        limit: u32,
    },
    /// A block has more source symbols than the limit allows.
    #[error("block of {symbols} source symbols exceeds the limit of {limit}")]
    BlockTooLarge {
        /// Source symbols of the largest block.
        symbols: u32,
        /// The configured limit.
        limit: u32,
    },
    /// The symbol size exceeds the limit.
    #[error("symbol size {size} exceeds the limit of {limit}")]
    SymbolTooLarge {
        /// The object's symbol size.
        size: u16,
        /// The configured limit.
        limit: u16,
    },
    /// A block already keeps as many symbols as the limit allows and is still not decoded.
    #[error("block {sbn} already keeps {limit} symbols")]
    TooManySymbols {
        /// The block.
        sbn: u8,
        /// The most symbols it may keep.
        limit: u32,
    },
    /// Decoding a new block would exceed the limit on blocks being decoded at once.
    #[error("more than {limit} blocks being decoded at once")]
    TooManyBlocksInFlight {
        /// The configured limit.
        limit: u32,
    },
    /// The source block number names no block of the object.
    #[error("source block {sbn} out of range: the object has {blocks} blocks")]
    SbnOutOfRange {
        /// The source block number.
        sbn: u8,
        /// Blocks of the object.
        blocks: u32,
    },
    /// The encoding symbol id is out of range (above [`MAX_ESI`], or not a source symbol of the
    /// block where one was asked for).
    #[error("encoding symbol id {esi} out of range")]
    EsiOutOfRange {
        /// The encoding symbol id (the first one past the range when a range overflows).
        esi: u64,
    },
    /// A repair symbol was asked for with the ESI of a source symbol.
    #[error("ESI {esi} is a source symbol of a block of {block_len}: repair ESIs start there")]
    NotRepairEsi {
        /// The encoding symbol id.
        esi: u32,
        /// Source symbols of the block.
        block_len: u32,
    },
    /// A source symbol index past the object's last symbol.
    #[error("source symbol {index} out of range: the object has {symbols}")]
    IndexOutOfRange {
        /// The index.
        index: u32,
        /// Source symbols of the object.
        symbols: u32,
    },
    /// A symbol's length differs from the object's symbol size.
    #[error("symbol of {actual} bytes, the symbol size is {expected}")]
    SymbolLength {
        /// The symbol size.
        expected: u16,
        /// The symbol's length.
        actual: usize,
    },
    /// Source data whose length does not match the parameters.
    #[error("source data of {actual} bytes, expected {expected}")]
    SourceLength {
        /// Bytes the parameters call for.
        expected: u64,
        /// Bytes given.
        actual: u64,
    },
}

/// A result with this crate's [`Error`].
pub type Result<T> = core::result::Result<T, Error>;
