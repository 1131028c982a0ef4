//! The body of a NACK datagram: a receiver asks for repair of one source block.
//!
//! The header's sequence number names the rekey message (and so the MAC key); the body names
//! the block, how many more symbols the receiver needs to decode it, the repair round, and the
//! receiver (its leaf id). A NACK may echo the sender's latest GRTT probe (flag bit 0, `ECHO`):
//! the probe's timestamp and how long the receiver held it, so the sender can measure the
//! round-trip time (RFC 5740 5.5.2's GRTT collection). Without the flag both echo fields are
//! zero.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |    object     |      SBN      |     round     | reserved (0)  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |      symbols needed           |   receiver id (32 bits) ...   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   ... receiver id             |  echoed probe timestamp, us   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+                               +
//! |                         (64 bits)                             |
//! +                               +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                               |   hold time, us (32 bits) ... |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |   ... hold time               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Symbols needed is at least 1: a receiver that needs nothing does not NACK.
//!
//! # Chunk requests
//!
//! With header flag bit 1 (`UNICAST_CHUNK`) the NACK asks for something else: the receiver's
//! own chunk, by unicast ([`crate::wire::chunk_repair`]), not more multicast repair symbols.
//! The body is the same (object is always the chunks, SBN the block holding the receiver's
//! chunk, need what it still lacks of that block, the receiver id the member the chunk is
//! for); it parses as [`crate::wire::BodyRepr::ChunkRequest`]. Such a NACK is never
//! suppressed by other receivers' NACKs or the sender's advertisements (each member needs its
//! own chunk), so a sender rate-limits chunk requests per source instead.

use super::datagram::check_flags;
use super::{be, check_len, check_room, Error, ObjectKind, Result};

/// Flag bit: the NACK echoes a GRTT probe.
pub const FLAG_ECHO: u8 = 0x01;
/// Flag bit: the NACK asks for the receiver's own chunk by unicast (a chunk request; see the
/// module docs). [`NackRepr`] itself does not take it: the datagram parser strips it and
/// yields [`crate::wire::BodyRepr::ChunkRequest`].
pub const FLAG_UNICAST_CHUNK: u8 = 0x02;

mod field {
    use core::ops::Range;
    pub const OBJECT: usize = 0;
    pub const SBN: usize = 1;
    pub const ROUND: usize = 2;
    pub const RESERVED: usize = 3;
    pub const NEED: Range<usize> = 4..6;
    pub const RECEIVER: Range<usize> = 6..10;
    pub const ECHO_TIMESTAMP: Range<usize> = 10..18;
    pub const ECHO_HOLD: Range<usize> = 18..22;
}

/// A GRTT probe echo: the sender's probe timestamp and how long the receiver held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeEcho {
    /// The probe timestamp from the sender's heartbeat, in microseconds of the sender's clock.
    pub timestamp_us: u64,
    /// Time between receiving the probe and sending this echo, in microseconds.
    pub hold_us: u32,
}

/// A view of a NACK body.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer after checking its exact length, object kind and reserved byte.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let data = buffer.as_ref();
        check_len(NackRepr::BUFFER_LEN, data.len())?;
        if data.len() > NackRepr::BUFFER_LEN {
            return Err(Error::TrailingBytes(data.len() - NackRepr::BUFFER_LEN));
        }
        ObjectKind::try_from(data[field::OBJECT])?;
        if data[field::RESERVED] != 0 {
            return Err(Error::ReservedNotZero);
        }
        Ok(Self { buffer })
    }

    /// The FEC object the NACK is about.
    pub fn object(&self) -> ObjectKind {
        ObjectKind::try_from(self.buffer.as_ref()[field::OBJECT]).unwrap_or(ObjectKind::Manifest)
    }
    /// The source block number.
    pub fn sbn(&self) -> u8 {
        self.buffer.as_ref()[field::SBN]
    }
    /// The repair round this NACK belongs to.
    pub fn round(&self) -> u8 {
        self.buffer.as_ref()[field::ROUND]
    }
    /// Symbols the receiver still needs to decode the block.
    pub fn need(&self) -> u16 {
        be::u16(&self.buffer.as_ref()[field::NEED])
    }
    /// The receiver's id (its leaf id).
    pub fn receiver_id(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::RECEIVER])
    }
    /// The echoed probe timestamp field.
    pub fn echo_timestamp_us(&self) -> u64 {
        be::u64(&self.buffer.as_ref()[field::ECHO_TIMESTAMP])
    }
    /// The echoed hold time field.
    pub fn echo_hold_us(&self) -> u32 {
        be::u32(&self.buffer.as_ref()[field::ECHO_HOLD])
    }
}

/// A parsed NACK body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NackRepr {
    /// The FEC object the NACK is about.
    pub object: ObjectKind,
    /// The source block number.
    pub sbn: u8,
    /// The repair round.
    pub round: u8,
    /// Symbols still needed (at least 1).
    pub need: u16,
    /// The receiver's id.
    pub receiver_id: u32,
    /// The GRTT probe echo, if the receiver had a probe to echo.
    pub echo: Option<ProbeEcho>,
}

impl NackRepr {
    /// Bytes the body takes.
    pub const BUFFER_LEN: usize = field::ECHO_HOLD.end;

    /// Parses a NACK body; `flags` are the header's flags.
    pub fn parse(flags: u8, bytes: &[u8]) -> Result<Self> {
        check_flags(flags, FLAG_ECHO)?;
        let packet = Packet::new_checked(bytes)?;
        if packet.need() == 0 {
            return Err(Error::InvalidField("need"));
        }
        let echo = if flags & FLAG_ECHO != 0 {
            Some(ProbeEcho {
                timestamp_us: packet.echo_timestamp_us(),
                hold_us: packet.echo_hold_us(),
            })
        } else {
            if packet.echo_timestamp_us() != 0 || packet.echo_hold_us() != 0 {
                return Err(Error::InvalidField("echo without ECHO flag"));
            }
            None
        };
        Ok(Self {
            object: packet.object(),
            sbn: packet.sbn(),
            round: packet.round(),
            need: packet.need(),
            receiver_id: packet.receiver_id(),
            echo,
        })
    }

    /// The header flags this NACK needs.
    pub fn flags(&self) -> u8 {
        if self.echo.is_some() {
            FLAG_ECHO
        } else {
            0
        }
    }

    /// Writes the body into the first [`Self::BUFFER_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        if self.need == 0 {
            return Err(Error::InvalidField("need"));
        }
        check_room(Self::BUFFER_LEN, buf.len())?;
        buf[field::OBJECT] = self.object as u8;
        buf[field::SBN] = self.sbn;
        buf[field::ROUND] = self.round;
        buf[field::RESERVED] = 0;
        be::put_u16(&mut buf[field::NEED], self.need);
        be::put_u32(&mut buf[field::RECEIVER], self.receiver_id);
        let echo = self.echo.unwrap_or(ProbeEcho {
            timestamp_us: 0,
            hold_us: 0,
        });
        be::put_u64(&mut buf[field::ECHO_TIMESTAMP], echo.timestamp_us);
        be::put_u32(&mut buf[field::ECHO_HOLD], echo.hold_us);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::test_support::assert_every_truncation_fails;
    use crate::wire::{BodyRepr, DatagramRepr};

    const BYTES: [u8; 22] = [
        0x01, 0x02, 0x03, 0x00, // object chunks, SBN 2, round 3, reserved
        0x00, 0x05, // need 5
        0x00, 0x01, 0x00, 0x00, // receiver 65536
        0x00, 0x00, 0x00, 0x00, 0x00, 0x0F, 0x42, 0x40, // echo timestamp 1,000,000 us
        0x00, 0x00, 0x03, 0xE8, // hold 1,000 us
    ];

    fn repr() -> NackRepr {
        NackRepr {
            object: ObjectKind::Chunks,
            sbn: 2,
            round: 3,
            need: 5,
            receiver_id: 65_536,
            echo: Some(ProbeEcho {
                timestamp_us: 1_000_000,
                hold_us: 1_000,
            }),
        }
    }

    #[test]
    fn test_parse() {
        assert_eq!(NackRepr::parse(FLAG_ECHO, &BYTES), Ok(repr()));
    }

    #[test]
    fn test_emit() {
        let mut buf = [0u8; 22];
        repr().emit(&mut buf).unwrap();
        assert_eq!(buf, BYTES);
        assert_eq!(repr().flags(), FLAG_ECHO);
    }

    #[test]
    fn truncation_at_every_length_fails() {
        assert_every_truncation_fails(&BYTES, |b| NackRepr::parse(FLAG_ECHO, b).map(drop));
    }

    #[test]
    fn rejects_bad_values() {
        let mut trailing = BYTES.to_vec();
        trailing.push(0);
        assert_eq!(
            NackRepr::parse(FLAG_ECHO, &trailing),
            Err(Error::TrailingBytes(1))
        );
        assert_eq!(
            NackRepr::parse(FLAG_ECHO | 0x02, &BYTES),
            Err(Error::UndefinedFlags(0x02))
        );
        assert!(
            NackRepr::parse(0, &BYTES).is_err(),
            "echo fields without flag"
        );
        let mut zero_need = BYTES;
        zero_need[4] = 0;
        zero_need[5] = 0;
        assert_eq!(
            NackRepr::parse(FLAG_ECHO, &zero_need),
            Err(Error::InvalidField("need"))
        );
        let mut reserved = BYTES;
        reserved[3] = 1;
        assert_eq!(
            NackRepr::parse(FLAG_ECHO, &reserved),
            Err(Error::ReservedNotZero)
        );
    }

    #[test]
    fn chunk_request_is_a_flagged_nack_of_the_chunks() {
        let datagram = DatagramRepr {
            group_id: 1,
            spi: 2,
            seq: 3,
            body: BodyRepr::ChunkRequest(repr()),
            mac: [0; 16],
        };
        let mut buf = vec![0u8; datagram.buffer_len()];
        datagram.emit(&mut buf).unwrap();
        assert_eq!(buf[3], 2, "a NACK datagram");
        assert_eq!(buf[4], FLAG_ECHO | FLAG_UNICAST_CHUNK);
        assert_eq!(&buf[24..46], &BYTES[..]);
        assert_eq!(DatagramRepr::parse(&buf).unwrap(), datagram);
        // The same body without the flag is an ordinary NACK.
        buf[4] = FLAG_ECHO;
        assert_eq!(
            DatagramRepr::parse(&buf).unwrap().body,
            BodyRepr::Nack(repr())
        );
        // A chunk request for the manifest object is refused both ways.
        buf[4] = FLAG_ECHO | FLAG_UNICAST_CHUNK;
        buf[24] = 0;
        assert_eq!(
            DatagramRepr::parse(&buf),
            Err(Error::InvalidField("object of a chunk request"))
        );
        let manifest = DatagramRepr {
            body: BodyRepr::ChunkRequest(NackRepr {
                object: ObjectKind::Manifest,
                ..repr()
            }),
            ..datagram
        };
        assert!(manifest.emit(&mut buf).is_err());
        // Undefined flags are still refused.
        buf[4] = FLAG_UNICAST_CHUNK | 0x04;
        buf[24] = 1;
        assert_eq!(DatagramRepr::parse(&buf), Err(Error::UndefinedFlags(0x04)));
    }

    fn arb_nack() -> impl Strategy<Value = NackRepr> {
        (
            0u8..2,
            any::<u8>(),
            any::<u8>(),
            1u16..,
            any::<u32>(),
            proptest::option::of((any::<u64>(), any::<u32>())),
        )
            .prop_map(|(object, sbn, round, need, receiver_id, echo)| NackRepr {
                object: ObjectKind::try_from(object).unwrap(),
                sbn,
                round,
                need,
                receiver_id,
                echo: echo.map(|(timestamp_us, hold_us)| ProbeEcho {
                    timestamp_us,
                    hold_us,
                }),
            })
    }

    proptest! {
        #[test]
        fn round_trip(nack in arb_nack(), seq: u64, mac: [u8; 16]) {
            let repr = DatagramRepr { group_id: 1, spi: 2, seq, body: BodyRepr::Nack(nack), mac };
            let mut buf = vec![0u8; repr.buffer_len()];
            repr.emit(&mut buf).unwrap();
            prop_assert_eq!(DatagramRepr::parse(&buf).unwrap(), repr.clone());
            let request = NackRepr { object: ObjectKind::Chunks, ..nack };
            let repr = DatagramRepr { body: BodyRepr::ChunkRequest(request), ..repr };
            repr.emit(&mut buf).unwrap();
            prop_assert_eq!(DatagramRepr::parse(&buf).unwrap(), repr);
        }

        #[test]
        fn decode_then_encode_returns_input(flags in 0u8..2,
                                            bytes in proptest::collection::vec(any::<u8>(), 22)) {
            if let Ok(repr) = NackRepr::parse(flags, &bytes) {
                let mut buf = [0u8; 22];
                repr.emit(&mut buf).unwrap();
                prop_assert_eq!(&buf[..], &bytes[..]);
                prop_assert_eq!(repr.flags(), flags);
            }
        }
    }
}
