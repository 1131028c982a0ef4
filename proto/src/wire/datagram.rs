//! The common datagram frame: header, body and MAC trailer (see the diagram in [`crate::wire`]).
//!
//! [`Packet`] is the view a receiver builds first: `new_checked` checks the length, magic and
//! version, after which the header fields, the body and the MAC trailer can be read without a
//! panic, and the MAC can be checked over [`Packet::authenticated`] before the body is parsed.
//! [`DatagramRepr`] parses and emits a whole datagram.

use super::nack::FLAG_UNICAST_CHUNK;
use super::{
    be, check_len, check_room, AckRepr, ChunkRepairRepr, DeliveryRepr, Error, HeartbeatRepr,
    NackRepr, ObjectKind, ProbeReplyRepr, Result, SymbolRepr,
};

/// The magic number that starts every rekeycast datagram ("RK").
pub const MAGIC: u16 = 0x524B;
/// The wire version this implementation speaks.
pub const VERSION: u8 = 1;
/// Length of the common header in bytes.
pub const HEADER_LEN: usize = field::SEQ.end;
/// Length of the MAC trailer in bytes (a truncated BLAKE3 keyed hash).
pub const MAC_LEN: usize = 16;
/// Bytes of every datagram that are not body: header and MAC trailer.
pub const OVERHEAD: usize = HEADER_LEN + MAC_LEN;

mod field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..2;
    pub const VERSION: usize = 2;
    pub const TYPE: usize = 3;
    pub const FLAGS: usize = 4;
    pub const RESERVED: Range<usize> = 5..8;
    pub const GROUP: Range<usize> = 8..12;
    pub const SPI: Range<usize> = 12..16;
    pub const SEQ: Range<usize> = 16..24;
}

/// The type of a datagram, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DatagramType {
    /// A FEC symbol of a rekey message ([`crate::wire::symbol`]).
    Symbol = 1,
    /// A NACK asking for repair ([`crate::wire::nack`]).
    Nack = 2,
    /// A sender heartbeat or repair advertisement ([`crate::wire::heartbeat`]).
    Heartbeat = 3,
    /// A receiver's reply to a GRTT probe ([`crate::wire::probe`]).
    ProbeReply = 4,
    /// One member's chunk delivered by unicast ([`crate::wire::chunk_repair`]).
    ChunkRepair = 5,
    /// A message's manifest and one member's chunk, by unicast ([`crate::wire::delivery`]).
    Delivery = 6,
    /// A receiver's acknowledgement ([`crate::wire::ack`]).
    Ack = 7,
}

impl TryFrom<u8> for DatagramType {
    type Error = Error;
    fn try_from(value: u8) -> Result<Self> {
        match value {
            1 => Ok(Self::Symbol),
            2 => Ok(Self::Nack),
            3 => Ok(Self::Heartbeat),
            4 => Ok(Self::ProbeReply),
            5 => Ok(Self::ChunkRepair),
            6 => Ok(Self::Delivery),
            7 => Ok(Self::Ack),
            other => Err(Error::UnknownType(other)),
        }
    }
}

/// A read-only or read-write view of a whole datagram.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without any check. Accessors may panic on a short buffer: use
    /// [`Packet::new_checked`] for anything that came from the network.
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking that it holds a header and a MAC trailer, that the magic
    /// number and version are right, that the type is known and that the reserved bytes are
    /// zero. No accessor panics afterwards.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check()?;
        Ok(packet)
    }

    fn check(&self) -> Result<()> {
        let data = self.buffer.as_ref();
        check_len(OVERHEAD, data.len())?;
        let magic = be::u16(&data[field::MAGIC]);
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        if data[field::VERSION] != VERSION {
            return Err(Error::UnsupportedVersion(data[field::VERSION]));
        }
        DatagramType::try_from(data[field::TYPE])?;
        if data[field::RESERVED].iter().any(|&b| b != 0) {
            return Err(Error::ReservedNotZero);
        }
        Ok(())
    }

    /// The datagram type. Only valid after `new_checked`; a raw type byte that is not known
    /// reads as [`DatagramType::Symbol`] on an unchecked view.
    pub fn datagram_type(&self) -> DatagramType {
        DatagramType::try_from(self.buffer.as_ref()[field::TYPE]).unwrap_or(DatagramType::Symbol)
    }

    /// The type-specific flag bits.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The group id.
    pub fn group_id(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::GROUP])
    }

    /// The SPI of the Rekey SA.
    pub fn spi(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::SPI])
    }

    /// The sequence number of the rekey message this datagram belongs to.
    pub fn seq(&self) -> u64 {
        be::u64(&self.buffer.as_ref()[field::SEQ])
    }

    /// The body: the bytes between the header and the MAC trailer.
    pub fn body(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[HEADER_LEN..data.len() - MAC_LEN]
    }

    /// The bytes the MAC covers: header and body.
    pub fn authenticated(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[..data.len() - MAC_LEN]
    }

    /// The MAC trailer.
    pub fn mac(&self) -> [u8; MAC_LEN] {
        let data = self.buffer.as_ref();
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&data[data.len() - MAC_LEN..]);
        mac
    }

    /// Consumes the view and returns the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes the MAC trailer (computed by the caller over [`Packet::authenticated`]).
    pub fn set_mac(&mut self, mac: &[u8; MAC_LEN]) {
        let data = self.buffer.as_mut();
        let len = data.len();
        data[len - MAC_LEN..].copy_from_slice(mac);
    }
}

/// The fields of the common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeaderRepr {
    /// The datagram type.
    pub datagram_type: DatagramType,
    /// Type-specific flags; the body's `Repr` decides which bits are defined.
    pub flags: u8,
    /// The group id.
    pub group_id: u32,
    /// The SPI of the Rekey SA.
    pub spi: u32,
    /// The sequence number of the rekey message this datagram belongs to.
    pub seq: u64,
}

impl HeaderRepr {
    /// Reads the header of a checked packet.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Self {
        Self {
            datagram_type: packet.datagram_type(),
            flags: packet.flags(),
            group_id: packet.group_id(),
            spi: packet.spi(),
            seq: packet.seq(),
        }
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        check_room(HEADER_LEN, buf.len())?;
        be::put_u16(&mut buf[field::MAGIC], MAGIC);
        buf[field::VERSION] = VERSION;
        buf[field::TYPE] = self.datagram_type as u8;
        buf[field::FLAGS] = self.flags;
        buf[field::RESERVED].fill(0);
        be::put_u32(&mut buf[field::GROUP], self.group_id);
        be::put_u32(&mut buf[field::SPI], self.spi);
        be::put_u64(&mut buf[field::SEQ], self.seq);
        Ok(())
    }
}

/// The body of a datagram, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRepr<'a> {
    /// A FEC symbol.
    Symbol(SymbolRepr<'a>),
    /// A NACK.
    Nack(NackRepr),
    /// A heartbeat or repair advertisement.
    Heartbeat(HeartbeatRepr),
    /// A GRTT probe reply.
    ProbeReply(ProbeReplyRepr),
    /// One member's chunk delivered by unicast.
    ChunkRepair(ChunkRepairRepr<'a>),
    /// A NACK that asks for the receiver's own chunk by unicast (a NACK datagram with
    /// [`crate::wire::nack::FLAG_UNICAST_CHUNK`]; its object is always the chunks).
    ChunkRequest(NackRepr),
    /// A message's manifest and one member's chunk, by unicast.
    Delivery(DeliveryRepr<'a>),
    /// A receiver's acknowledgement.
    Ack(AckRepr),
}

impl BodyRepr<'_> {
    /// The datagram type that carries this body.
    pub fn datagram_type(&self) -> DatagramType {
        match self {
            Self::Symbol(_) => DatagramType::Symbol,
            Self::Nack(_) | Self::ChunkRequest(_) => DatagramType::Nack,
            Self::Heartbeat(_) => DatagramType::Heartbeat,
            Self::ProbeReply(_) => DatagramType::ProbeReply,
            Self::ChunkRepair(_) => DatagramType::ChunkRepair,
            Self::Delivery(_) => DatagramType::Delivery,
            Self::Ack(_) => DatagramType::Ack,
        }
    }

    /// The flag bits this body puts in the header.
    pub fn flags(&self) -> u8 {
        match self {
            Self::Symbol(_)
            | Self::ProbeReply(_)
            | Self::ChunkRepair(_)
            | Self::Delivery(_)
            | Self::Ack(_) => 0,
            Self::Nack(nack) => nack.flags(),
            Self::ChunkRequest(nack) => nack.flags() | FLAG_UNICAST_CHUNK,
            Self::Heartbeat(heartbeat) => heartbeat.flags(),
        }
    }

    /// Bytes the body takes on the wire.
    pub fn buffer_len(&self) -> usize {
        match self {
            Self::Symbol(symbol) => symbol.buffer_len(),
            Self::Nack(_) | Self::ChunkRequest(_) => NackRepr::BUFFER_LEN,
            Self::Heartbeat(heartbeat) => heartbeat.buffer_len(),
            Self::ProbeReply(_) => ProbeReplyRepr::BUFFER_LEN,
            Self::ChunkRepair(repair) => repair.buffer_len(),
            Self::Delivery(delivery) => delivery.buffer_len(),
            Self::Ack(_) => AckRepr::BUFFER_LEN,
        }
    }
}

/// A whole datagram: header fields, body and MAC trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatagramRepr<'a> {
    /// The group id.
    pub group_id: u32,
    /// The SPI of the Rekey SA.
    pub spi: u32,
    /// The sequence number of the rekey message this datagram belongs to.
    pub seq: u64,
    /// The body; it also decides the type and flags of the header.
    pub body: BodyRepr<'a>,
    /// The MAC trailer as received, or as it will be written by `emit`.
    pub mac: [u8; MAC_LEN],
}

impl<'a> DatagramRepr<'a> {
    /// Parses a whole datagram. The MAC is framed, not checked: check it over
    /// [`Packet::authenticated`] before trusting anything parsed here.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let packet = Packet::new_checked(bytes)?;
        let header = HeaderRepr::parse(&packet);
        let body_bytes = &bytes[super::datagram::HEADER_LEN..bytes.len() - MAC_LEN];
        let body = match header.datagram_type {
            DatagramType::Symbol => {
                check_flags(header.flags, 0)?;
                BodyRepr::Symbol(SymbolRepr::parse(body_bytes)?)
            }
            DatagramType::Nack if header.flags & FLAG_UNICAST_CHUNK != 0 => {
                let nack = NackRepr::parse(header.flags & !FLAG_UNICAST_CHUNK, body_bytes)?;
                if nack.object != ObjectKind::Chunks {
                    return Err(Error::InvalidField("object of a chunk request"));
                }
                BodyRepr::ChunkRequest(nack)
            }
            DatagramType::Nack => BodyRepr::Nack(NackRepr::parse(header.flags, body_bytes)?),
            DatagramType::Heartbeat => {
                BodyRepr::Heartbeat(HeartbeatRepr::parse(header.flags, body_bytes)?)
            }
            DatagramType::ProbeReply => {
                check_flags(header.flags, 0)?;
                BodyRepr::ProbeReply(ProbeReplyRepr::parse(body_bytes)?)
            }
            DatagramType::ChunkRepair => {
                check_flags(header.flags, 0)?;
                BodyRepr::ChunkRepair(ChunkRepairRepr::parse(body_bytes)?)
            }
            DatagramType::Delivery => {
                check_flags(header.flags, 0)?;
                BodyRepr::Delivery(DeliveryRepr::parse(body_bytes)?)
            }
            DatagramType::Ack => {
                check_flags(header.flags, 0)?;
                BodyRepr::Ack(AckRepr::parse(body_bytes)?)
            }
        };
        Ok(Self {
            group_id: header.group_id,
            spi: header.spi,
            seq: header.seq,
            body,
            mac: packet.mac(),
        })
    }

    /// Bytes the datagram takes on the wire.
    pub fn buffer_len(&self) -> usize {
        OVERHEAD + self.body.buffer_len()
    }

    /// The header this datagram emits.
    pub fn header(&self) -> HeaderRepr {
        HeaderRepr {
            datagram_type: self.body.datagram_type(),
            flags: self.body.flags(),
            group_id: self.group_id,
            spi: self.spi,
            seq: self.seq,
        }
    }

    /// Writes the datagram, MAC trailer included, into the start of `buf` and returns its
    /// length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        check_room(len, buf.len())?;
        self.header().emit(buf)?;
        let body = &mut buf[HEADER_LEN..len - MAC_LEN];
        match &self.body {
            BodyRepr::Symbol(symbol) => symbol.emit(body)?,
            BodyRepr::Nack(nack) => nack.emit(body)?,
            BodyRepr::ChunkRequest(nack) => {
                if nack.object != ObjectKind::Chunks {
                    return Err(Error::InvalidField("object of a chunk request"));
                }
                nack.emit(body)?
            }
            BodyRepr::Heartbeat(heartbeat) => heartbeat.emit(body)?,
            BodyRepr::ProbeReply(reply) => reply.emit(body)?,
            BodyRepr::ChunkRepair(repair) => repair.emit(body)?,
            BodyRepr::Delivery(delivery) => delivery.emit(body)?,
            BodyRepr::Ack(ack) => ack.emit(body)?,
        }
        buf[len - MAC_LEN..len].copy_from_slice(&self.mac);
        Ok(len)
    }
}

/// Rejects flag bits outside `defined`.
pub(crate) fn check_flags(flags: u8, defined: u8) -> Result<()> {
    let undefined = flags & !defined;
    if undefined != 0 {
        Err(Error::UndefinedFlags(undefined))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_support::assert_every_truncation_fails;

    // A symbol datagram: group 7, SPI 0x01020304, seq 42, chunk object, SBN 3, ESI 0x000105,
    // payload "abc", MAC 0xA0..0xAF.
    const SYMBOL_BYTES: [u8; 50] = [
        0x52, 0x4B, 0x01, 0x01, 0x00, 0x00, 0x00,
        0x00, // magic, version, type, flags, reserved
        0x00, 0x00, 0x00, 0x07, // group
        0x01, 0x02, 0x03, 0x04, // SPI
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2A, // seq
        0x01, 0x03, 0x00, 0x03, 0x00, 0x01, 0x05, // object, SBN, length, ESI
        b'a', b'b', b'c', // symbol data
        0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE,
        0xAF,
    ];

    fn symbol_repr() -> DatagramRepr<'static> {
        DatagramRepr {
            group_id: 7,
            spi: 0x0102_0304,
            seq: 42,
            body: BodyRepr::Symbol(SymbolRepr {
                object: ObjectKind::Chunks,
                sbn: 3,
                esi: 0x105,
                data: b"abc",
            }),
            mac: [
                0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAC, 0xAD,
                0xAE, 0xAF,
            ],
        }
    }

    #[test]
    fn test_parse() {
        let repr = DatagramRepr::parse(&SYMBOL_BYTES).unwrap();
        assert_eq!(repr, symbol_repr());
        let packet = Packet::new_checked(&SYMBOL_BYTES[..]).unwrap();
        assert_eq!(packet.datagram_type(), DatagramType::Symbol);
        assert_eq!(packet.group_id(), 7);
        assert_eq!(packet.spi(), 0x0102_0304);
        assert_eq!(packet.seq(), 42);
        assert_eq!(packet.body(), &SYMBOL_BYTES[24..34]);
        assert_eq!(packet.authenticated(), &SYMBOL_BYTES[..34]);
        assert_eq!(packet.mac()[0], 0xA0);
    }

    #[test]
    fn test_emit() {
        let repr = symbol_repr();
        let mut buf = [0u8; 64];
        let len = repr.emit(&mut buf).unwrap();
        assert_eq!(&buf[..len], &SYMBOL_BYTES[..]);
    }

    #[test]
    fn emit_into_short_buffer_is_an_error() {
        let repr = symbol_repr();
        let mut buf = [0u8; 49];
        assert_eq!(
            repr.emit(&mut buf),
            Err(Error::BufferTooSmall {
                needed: 50,
                available: 49
            })
        );
    }

    #[test]
    fn truncation_at_every_length_fails() {
        assert_every_truncation_fails(&SYMBOL_BYTES, |b| DatagramRepr::parse(b).map(drop));
    }

    #[test]
    fn header_checks() {
        let mut bytes = SYMBOL_BYTES;
        bytes[0] = 0x53;
        assert_eq!(DatagramRepr::parse(&bytes), Err(Error::BadMagic(0x534B)));
        let mut bytes = SYMBOL_BYTES;
        bytes[2] = 2;
        assert_eq!(
            DatagramRepr::parse(&bytes),
            Err(Error::UnsupportedVersion(2))
        );
        let mut bytes = SYMBOL_BYTES;
        bytes[3] = 9;
        assert_eq!(DatagramRepr::parse(&bytes), Err(Error::UnknownType(9)));
        let mut bytes = SYMBOL_BYTES;
        bytes[4] = 0x80;
        assert_eq!(
            DatagramRepr::parse(&bytes),
            Err(Error::UndefinedFlags(0x80))
        );
        let mut bytes = SYMBOL_BYTES;
        bytes[6] = 1;
        assert_eq!(DatagramRepr::parse(&bytes), Err(Error::ReservedNotZero));
    }

    #[test]
    fn set_mac_writes_the_trailer() {
        let mut bytes = SYMBOL_BYTES;
        let mut packet = Packet::new_checked(&mut bytes[..]).unwrap();
        packet.set_mac(&[0x11; MAC_LEN]);
        assert_eq!(packet.mac(), [0x11; MAC_LEN]);
        assert_eq!(&bytes[..34], &SYMBOL_BYTES[..34]);
    }
}
