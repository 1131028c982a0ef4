//! The body of a probe reply datagram: a receiver echoes a GRTT probe without a NACK.
//!
//! A receiver that has nothing to NACK answers a heartbeat that requests probe replies, rarely
//! and with random suppression, so the sender keeps measuring the group round-trip time. The
//! header flags are all zero.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    receiver id (32 bits)                      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |              echoed probe timestamp, us (64 bits)             |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    hold time, us (32 bits)                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use super::nack::ProbeEcho;
use super::{be, check_len, check_room, Error, Result};

mod field {
    use core::ops::Range;
    pub const RECEIVER: Range<usize> = 0..4;
    pub const TIMESTAMP: Range<usize> = 4..12;
    pub const HOLD: Range<usize> = 12..16;
}

/// A parsed probe reply body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeReplyRepr {
    /// The receiver's id.
    pub receiver_id: u32,
    /// The echoed probe.
    pub echo: ProbeEcho,
}

impl ProbeReplyRepr {
    /// Bytes the body takes.
    pub const BUFFER_LEN: usize = field::HOLD.end;

    /// Parses a probe reply body.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        check_len(Self::BUFFER_LEN, bytes.len())?;
        if bytes.len() > Self::BUFFER_LEN {
            return Err(Error::TrailingBytes(bytes.len() - Self::BUFFER_LEN));
        }
        Ok(Self {
            receiver_id: be::u32(&bytes[field::RECEIVER]),
            echo: ProbeEcho {
                timestamp_us: be::u64(&bytes[field::TIMESTAMP]),
                hold_us: be::u32(&bytes[field::HOLD]),
            },
        })
    }

    /// Writes the body into the first [`Self::BUFFER_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        check_room(Self::BUFFER_LEN, buf.len())?;
        be::put_u32(&mut buf[field::RECEIVER], self.receiver_id);
        be::put_u64(&mut buf[field::TIMESTAMP], self.echo.timestamp_us);
        be::put_u32(&mut buf[field::HOLD], self.echo.hold_us);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::test_support::assert_every_truncation_fails;
    use crate::wire::{BodyRepr, DatagramRepr};

    const BYTES: [u8; 16] = [
        0x00, 0x00, 0x00, 0x2A, // receiver 42
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, // timestamp 4096
        0x00, 0x00, 0x00, 0x64, // hold 100
    ];

    fn repr() -> ProbeReplyRepr {
        ProbeReplyRepr {
            receiver_id: 42,
            echo: ProbeEcho {
                timestamp_us: 4096,
                hold_us: 100,
            },
        }
    }

    #[test]
    fn test_parse() {
        assert_eq!(ProbeReplyRepr::parse(&BYTES), Ok(repr()));
    }

    #[test]
    fn test_emit() {
        let mut buf = [0u8; 16];
        repr().emit(&mut buf).unwrap();
        assert_eq!(buf, BYTES);
    }

    #[test]
    fn truncation_at_every_length_fails() {
        assert_every_truncation_fails(&BYTES, |b| ProbeReplyRepr::parse(b).map(drop));
        let mut trailing = BYTES.to_vec();
        trailing.push(1);
        assert_eq!(
            ProbeReplyRepr::parse(&trailing),
            Err(Error::TrailingBytes(1))
        );
    }

    #[test]
    fn flags_are_rejected_in_a_datagram() {
        let datagram = DatagramRepr {
            group_id: 1,
            spi: 1,
            seq: 1,
            body: BodyRepr::ProbeReply(repr()),
            mac: [0; 16],
        };
        let mut buf = vec![0u8; datagram.buffer_len()];
        datagram.emit(&mut buf).unwrap();
        buf[4] = 1;
        assert_eq!(DatagramRepr::parse(&buf), Err(Error::UndefinedFlags(1)));
    }

    proptest! {
        #[test]
        fn round_trip(receiver_id: u32, timestamp_us: u64, hold_us: u32, seq: u64, mac: [u8; 16]) {
            let reply = ProbeReplyRepr { receiver_id, echo: ProbeEcho { timestamp_us, hold_us } };
            let repr = DatagramRepr { group_id: 5, spi: 6, seq, body: BodyRepr::ProbeReply(reply), mac };
            let mut buf = vec![0u8; repr.buffer_len()];
            repr.emit(&mut buf).unwrap();
            prop_assert_eq!(DatagramRepr::parse(&buf).unwrap(), repr);
        }

        #[test]
        fn decode_then_encode_returns_input(bytes in proptest::collection::vec(any::<u8>(), 16)) {
            let repr = ProbeReplyRepr::parse(&bytes).unwrap();
            let mut buf = [0u8; 16];
            repr.emit(&mut buf).unwrap();
            prop_assert_eq!(&buf[..], &bytes[..]);
        }
    }
}
