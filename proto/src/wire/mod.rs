//! Wire formats: every byte string that crosses the network, and nothing else.
//!
//! This module owns the framing of rekeycast's UDP datagrams and of the TCP resync stream. It
//! parses and emits; it does not compute or check MACs (that is `auth`), decode FEC (that is
//! `rekeycast-fec`) or interpret what a symbol carries (that is `session`). Every parser is
//! total: any byte string gives a value or a typed [`Error`], trailing bytes included, and no
//! accessor of a view built with `new_checked` panics.
//!
//! The style is smoltcp's: each format is a `Packet<T: AsRef<[u8]>>` view over a buffer, with a
//! private `field` module of byte ranges and `new_checked` for untrusted input, plus a `Repr`
//! with `parse` and `emit`. All integers are big-endian.
//!
//! # The datagram
//!
//! Every UDP datagram is a common header, a body whose layout depends on the type, and a
//! 16-byte MAC trailer (a keyed BLAKE3 tag over header and body, RFC 4046 5.2: the datagram
//! MAC lets a member drop outsiders' traffic before any signature check).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |        magic 0x524B ("RK")    |  version = 1  |     type      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |     flags     |              reserved (zero)                  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                           group id                            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     SPI of the Rekey SA                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                   sequence number (64 bits)                   +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 body (layout given by type) ...               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                  MAC trailer (16 bytes, BLAKE3)               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The sequence number names the rekey message the datagram belongs to (for a heartbeat or a
//! NACK, the message whose MAC key protects it). The flags are type specific: a bit a type does
//! not define must be zero.
//!
//! | type | body                                  | module        |
//! |------|---------------------------------------|---------------|
//! | 1    | FEC symbol of a rekey message         | [`symbol`]    |
//! | 2    | NACK                                  | [`nack`]      |
//! | 3    | heartbeat / repair advertisement      | [`heartbeat`] |
//! | 4    | GRTT probe reply                      | [`probe`]     |
//! | 5    | one member's chunk, by unicast        | [`chunk_repair`] |
//! | 6    | manifest and own chunk, by unicast    | [`delivery`]  |
//! | 7    | acknowledgement                       | [`ack`]       |
//!
//! The TCP resync stream has its own length-prefixed framing, in [`frame`].
//!
//! # Sizes
//!
//! [`DEFAULT_DATAGRAM_SIZE`] (1,472 bytes) is the UDP payload that fits an IPv4 1,500-byte MTU;
//! [`IPV6_SAFE_DATAGRAM_SIZE`] (1,232 bytes) fits the IPv6 minimum MTU of 1,280 bytes.

pub mod ack;
pub mod chunk_repair;
pub mod datagram;
pub mod delivery;
pub mod frame;
pub mod heartbeat;
pub mod nack;
pub mod probe;
pub mod symbol;

pub use ack::AckRepr;
pub use chunk_repair::ChunkRepairRepr;
pub use datagram::{BodyRepr, DatagramRepr, DatagramType, HeaderRepr, Packet};
pub use delivery::DeliveryRepr;
pub use frame::{ErrorCode, FrameRepr};
pub use heartbeat::{HeartbeatRepr, RepairEntry};
pub use nack::NackRepr;
pub use probe::ProbeReplyRepr;
pub use symbol::{ObjectKind, SymbolRepr};

/// The datagram size (UDP payload bytes) that fits an IPv4 path with a 1,500-byte MTU
/// (1,500 - 20 bytes of IPv4 header - 8 bytes of UDP header).
pub const DEFAULT_DATAGRAM_SIZE: usize = 1472;

/// The datagram size that is safe on any IPv6 path: the IPv6 minimum MTU of 1,280 bytes less
/// 40 bytes of IPv6 header and 8 bytes of UDP header.
pub const IPV6_SAFE_DATAGRAM_SIZE: usize = 1232;

/// The largest datagram rekeycast emits or accepts (the largest UDP payload over IPv4).
pub const MAX_DATAGRAM_SIZE: usize = 65_507;

/// The smallest datagram size a configuration may choose: room for the header, the largest
/// fixed body, the MAC and a useful symbol.
pub const MIN_DATAGRAM_SIZE: usize = 256;

/// Everything that can be wrong with a byte string handed to a parser of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The buffer ends before the format says it should.
    #[error("truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the format needs.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// Bytes remain after a complete value.
    #[error("{0} trailing bytes after a complete value")]
    TrailingBytes(usize),
    /// The datagram does not start with rekeycast's magic number.
    #[error("bad magic number {0:#06x}")]
    BadMagic(u16),
    /// A version this implementation does not speak.
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// A datagram type this implementation does not know.
    #[error("unknown datagram type {0}")]
    UnknownType(u8),
    /// A flag bit that the type does not define is set.
    #[error("undefined flag bits {0:#04x} set")]
    UndefinedFlags(u8),
    /// A reserved field is not zero.
    #[error("reserved field is not zero")]
    ReservedNotZero,
    /// An object kind this implementation does not know.
    #[error("unknown object kind {0}")]
    UnknownObject(u8),
    /// A field holds a value its format forbids (named in the message).
    #[error("invalid value in field {0}")]
    InvalidField(&'static str),
    /// A list holds more entries than its format allows.
    #[error("{count} entries, at most {max} allowed")]
    TooManyEntries {
        /// Entries present or asked for.
        count: usize,
        /// The format's maximum.
        max: usize,
    },
    /// A TCP frame's declared length is outside the allowed range.
    #[error("frame length {0} outside 1..={max}", max = frame::MAX_FRAME_LEN)]
    FrameLength(u32),
    /// A TCP frame type this implementation does not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// The buffer handed to `emit` is too small.
    #[error("output buffer too small: need {needed} bytes, have {available}")]
    BufferTooSmall {
        /// Bytes the value needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
}

/// The result type of this module.
pub type Result<T> = core::result::Result<T, Error>;

/// Returns `Ok(())` when `available >= needed`, else [`Error::Truncated`].
pub(crate) fn check_len(needed: usize, available: usize) -> Result<()> {
    if available < needed {
        Err(Error::Truncated { needed, available })
    } else {
        Ok(())
    }
}

/// Returns `Ok(())` when `buf` can hold `needed` bytes, else [`Error::BufferTooSmall`].
pub(crate) fn check_room(needed: usize, available: usize) -> Result<()> {
    if available < needed {
        Err(Error::BufferTooSmall { needed, available })
    } else {
        Ok(())
    }
}

/// Big-endian field access over byte slices whose length the caller has checked.
///
/// Each function takes a slice of exactly the field's size (the `field` ranges of each view
/// guarantee it after `new_checked`); the conversions cannot fail for such slices.
pub(crate) mod be {
    pub(crate) fn u16(b: &[u8]) -> u16 {
        u16::from_be_bytes([b[0], b[1]])
    }
    pub(crate) fn u24(b: &[u8]) -> u32 {
        u32::from_be_bytes([0, b[0], b[1], b[2]])
    }
    pub(crate) fn u32(b: &[u8]) -> u32 {
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
    pub(crate) fn u64(b: &[u8]) -> u64 {
        u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    pub(crate) fn put_u16(b: &mut [u8], v: u16) {
        b.copy_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn put_u24(b: &mut [u8], v: u32) {
        b.copy_from_slice(&v.to_be_bytes()[1..]);
    }
    pub(crate) fn put_u32(b: &mut [u8], v: u32) {
        b.copy_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn put_u64(b: &mut [u8], v: u64) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers shared by the tests of every wire format.

    /// Asserts that every strict prefix of `bytes` is rejected by `parse`.
    /// `parse` returns whether it accepted its input (`Ok` with the value discarded).
    pub(crate) fn assert_every_truncation_fails<E: core::fmt::Debug>(
        bytes: &[u8],
        parse: impl Fn(&[u8]) -> Result<(), E>,
    ) {
        for len in 0..bytes.len() {
            let result = parse(&bytes[..len]);
            assert!(result.is_err(), "prefix of {len} bytes parsed");
        }
    }
}
