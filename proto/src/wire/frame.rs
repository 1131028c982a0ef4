//! The framing of the TCP resync stream: length-prefixed request and response frames.
//!
//! A member that fell out of sync (RFC 4046 5.4) connects to a resync endpoint and sends a
//! request frame; the endpoint answers with a stream of response frames: for each missed
//! sequence number its signed manifest and the member's chunk, then an end frame, or an error
//! frame with a typed code. What is served is already signed and encrypted, so the stream
//! itself carries no MAC.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          length L of type + body (32 bits, 1..=65,536)        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  frame type   |  body (L - 1 bytes) ...                       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! | type | frame            | body                                                     |
//! |------|------------------|----------------------------------------------------------|
//! | 0x01 | resync request   | group u32, from seq u64, leaf u32                        |
//! | 0x02 | state request    | group u32                                                |
//! | 0x81 | manifest         | seq u64, signed manifest (1 or more bytes)               |
//! | 0x82 | chunk            | seq u64, leaf u32, chunk (1 or more bytes)               |
//! | 0x83 | state            | latest seq u64, oldest seq u64, latest signed manifest   |
//! | 0x84 | end              | last seq served u64                                      |
//! | 0xFF | error            | code u16, context seq u64 (e.g. the oldest seq held)     |
//!
//! A request frame's body has a fixed length; a longer one is an error (trailing bytes).

use super::{be, check_len, check_room, Error, Result};

/// The largest value of the length prefix.
pub const MAX_FRAME_LEN: u32 = 65_536;
/// Length of the length prefix.
pub const PREFIX_LEN: usize = 4;

const TYPE_RESYNC_REQUEST: u8 = 0x01;
const TYPE_STATE_REQUEST: u8 = 0x02;
const TYPE_MANIFEST: u8 = 0x81;
const TYPE_CHUNK: u8 = 0x82;
const TYPE_STATE: u8 = 0x83;
const TYPE_END: u8 = 0x84;
const TYPE_ERROR: u8 = 0xFF;

/// Why a resync endpoint refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request could not be parsed.
    Malformed,
    /// The endpoint does not serve this group.
    UnknownGroup,
    /// No such leaf in the requested message.
    UnknownLeaf,
    /// The requested sequence number is older than the history window: re-register.
    BeyondHistory,
    /// The requested sequence number has not been sent yet.
    NotYetSent,
    /// The client is over its rate limit; retry later.
    RateLimited,
    /// The endpoint is overloaded; try another endpoint.
    Overloaded,
    /// The request is larger than the endpoint accepts.
    TooLarge,
    /// The endpoint does not hold this message (a relay's history has a hole or starts
    /// later): ask the next endpoint. Unlike `BeyondHistory`, no reason to re-register.
    NotHeld,
    /// A code this implementation does not know (kept so parsing stays total).
    Unassigned(u16),
}

impl ErrorCode {
    /// The code's value on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::Malformed => 1,
            Self::UnknownGroup => 2,
            Self::UnknownLeaf => 3,
            Self::BeyondHistory => 4,
            Self::NotYetSent => 5,
            Self::RateLimited => 6,
            Self::Overloaded => 7,
            Self::TooLarge => 8,
            Self::NotHeld => 9,
            Self::Unassigned(code) => code,
        }
    }

    /// The code for a wire value.
    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => Self::Malformed,
            2 => Self::UnknownGroup,
            3 => Self::UnknownLeaf,
            4 => Self::BeyondHistory,
            5 => Self::NotYetSent,
            6 => Self::RateLimited,
            7 => Self::Overloaded,
            8 => Self::TooLarge,
            9 => Self::NotHeld,
            other => Self::Unassigned(other),
        }
    }
}

/// One frame of the resync stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameRepr<'a> {
    /// Member -> endpoint: send every missed message from `from_seq` on, for `leaf`.
    ResyncRequest {
        /// The group.
        group_id: u32,
        /// The first sequence number the member lacks.
        from_seq: u64,
        /// The member's leaf id.
        leaf: u32,
    },
    /// Member -> endpoint: send the latest signed manifest.
    StateRequest {
        /// The group.
        group_id: u32,
    },
    /// Endpoint -> member: the signed manifest of `seq`.
    Manifest {
        /// The sequence number.
        seq: u64,
        /// The signed manifest's bytes.
        manifest: &'a [u8],
    },
    /// Endpoint -> member: the chunk of `seq` that serves `leaf`.
    Chunk {
        /// The sequence number.
        seq: u64,
        /// The leaf the chunk serves.
        leaf: u32,
        /// The chunk's bytes.
        chunk: &'a [u8],
    },
    /// Endpoint -> member: the latest state.
    State {
        /// The latest sequence number sent.
        latest_seq: u64,
        /// The oldest sequence number still held.
        oldest_seq: u64,
        /// The latest signed manifest.
        manifest: &'a [u8],
    },
    /// Endpoint -> member: the resync stream is complete.
    End {
        /// The last sequence number served.
        last_seq: u64,
    },
    /// Endpoint -> member: the request is refused.
    Error {
        /// Why.
        code: ErrorCode,
        /// A sequence number that explains the refusal (the oldest held for
        /// [`ErrorCode::BeyondHistory`], the latest for [`ErrorCode::NotYetSent`]), or 0.
        context_seq: u64,
    },
}

impl<'a> FrameRepr<'a> {
    /// Reads the length prefix at the start of `bytes` and returns the whole frame's length
    /// (prefix included), or `None` while fewer than [`PREFIX_LEN`] bytes are present. A length
    /// outside `1..=MAX_FRAME_LEN` is an error, so a reader never buffers more than
    /// `PREFIX_LEN + MAX_FRAME_LEN` bytes for one frame.
    pub fn peek_len(bytes: &[u8]) -> Result<Option<usize>> {
        if bytes.len() < PREFIX_LEN {
            return Ok(None);
        }
        let len = be::u32(&bytes[..PREFIX_LEN]);
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(Error::FrameLength(len));
        }
        // A u32 no larger than MAX_FRAME_LEN fits usize on every supported target.
        Ok(Some(PREFIX_LEN + len as usize))
    }

    /// Parses exactly one whole frame, length prefix included.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let total = Self::peek_len(bytes)?.ok_or(Error::Truncated {
            needed: PREFIX_LEN,
            available: bytes.len(),
        })?;
        check_len(total, bytes.len())?;
        if bytes.len() > total {
            return Err(Error::TrailingBytes(bytes.len() - total));
        }
        let frame_type = bytes[PREFIX_LEN];
        let body = &bytes[PREFIX_LEN + 1..];
        match frame_type {
            TYPE_RESYNC_REQUEST => {
                exact(body, 16)?;
                Ok(Self::ResyncRequest {
                    group_id: be::u32(&body[0..4]),
                    from_seq: be::u64(&body[4..12]),
                    leaf: be::u32(&body[12..16]),
                })
            }
            TYPE_STATE_REQUEST => {
                exact(body, 4)?;
                Ok(Self::StateRequest {
                    group_id: be::u32(&body[0..4]),
                })
            }
            TYPE_MANIFEST => {
                check_len(9, body.len())?;
                Ok(Self::Manifest {
                    seq: be::u64(&body[0..8]),
                    manifest: &body[8..],
                })
            }
            TYPE_CHUNK => {
                check_len(13, body.len())?;
                Ok(Self::Chunk {
                    seq: be::u64(&body[0..8]),
                    leaf: be::u32(&body[8..12]),
                    chunk: &body[12..],
                })
            }
            TYPE_STATE => {
                check_len(17, body.len())?;
                Ok(Self::State {
                    latest_seq: be::u64(&body[0..8]),
                    oldest_seq: be::u64(&body[8..16]),
                    manifest: &body[16..],
                })
            }
            TYPE_END => {
                exact(body, 8)?;
                Ok(Self::End {
                    last_seq: be::u64(&body[0..8]),
                })
            }
            TYPE_ERROR => {
                exact(body, 10)?;
                Ok(Self::Error {
                    code: ErrorCode::from_u16(be::u16(&body[0..2])),
                    context_seq: be::u64(&body[2..10]),
                })
            }
            other => Err(Error::UnknownFrameType(other)),
        }
    }

    fn frame_type(&self) -> u8 {
        match self {
            Self::ResyncRequest { .. } => TYPE_RESYNC_REQUEST,
            Self::StateRequest { .. } => TYPE_STATE_REQUEST,
            Self::Manifest { .. } => TYPE_MANIFEST,
            Self::Chunk { .. } => TYPE_CHUNK,
            Self::State { .. } => TYPE_STATE,
            Self::End { .. } => TYPE_END,
            Self::Error { .. } => TYPE_ERROR,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Self::ResyncRequest { .. } => 16,
            Self::StateRequest { .. } => 4,
            Self::Manifest { manifest, .. } => 8 + manifest.len(),
            Self::Chunk { chunk, .. } => 12 + chunk.len(),
            Self::State { manifest, .. } => 16 + manifest.len(),
            Self::End { .. } => 8,
            Self::Error { .. } => 10,
        }
    }

    /// Bytes the whole frame takes, prefix included.
    pub fn buffer_len(&self) -> usize {
        PREFIX_LEN + 1 + self.body_len()
    }

    /// Writes the whole frame into the start of `buf` and returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let total = self.buffer_len();
        let declared = total - PREFIX_LEN;
        if declared > MAX_FRAME_LEN as usize {
            return Err(Error::FrameLength(
                u32::try_from(declared).unwrap_or(u32::MAX),
            ));
        }
        match self {
            Self::Manifest { manifest: b, .. }
            | Self::Chunk { chunk: b, .. }
            | Self::State { manifest: b, .. }
                if b.is_empty() =>
            {
                return Err(Error::InvalidField("empty payload"));
            }
            _ => {}
        }
        check_room(total, buf.len())?;
        // `declared` is at most MAX_FRAME_LEN, checked above.
        be::put_u32(&mut buf[..PREFIX_LEN], declared as u32);
        buf[PREFIX_LEN] = self.frame_type();
        let body = &mut buf[PREFIX_LEN + 1..total];
        match *self {
            Self::ResyncRequest {
                group_id,
                from_seq,
                leaf,
            } => {
                be::put_u32(&mut body[0..4], group_id);
                be::put_u64(&mut body[4..12], from_seq);
                be::put_u32(&mut body[12..16], leaf);
            }
            Self::StateRequest { group_id } => be::put_u32(&mut body[0..4], group_id),
            Self::Manifest { seq, manifest } => {
                be::put_u64(&mut body[0..8], seq);
                body[8..].copy_from_slice(manifest);
            }
            Self::Chunk { seq, leaf, chunk } => {
                be::put_u64(&mut body[0..8], seq);
                be::put_u32(&mut body[8..12], leaf);
                body[12..].copy_from_slice(chunk);
            }
            Self::State {
                latest_seq,
                oldest_seq,
                manifest,
            } => {
                be::put_u64(&mut body[0..8], latest_seq);
                be::put_u64(&mut body[8..16], oldest_seq);
                body[16..].copy_from_slice(manifest);
            }
            Self::End { last_seq } => be::put_u64(&mut body[0..8], last_seq),
            Self::Error { code, context_seq } => {
                be::put_u16(&mut body[0..2], code.to_u16());
                be::put_u64(&mut body[2..10], context_seq);
            }
        }
        Ok(total)
    }
}

/// Checks that a fixed-size body has exactly `len` bytes.
fn exact(body: &[u8], len: usize) -> Result<()> {
    check_len(len, body.len())?;
    if body.len() > len {
        return Err(Error::TrailingBytes(body.len() - len));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::test_support::assert_every_truncation_fails;

    const RESYNC_REQUEST: [u8; 21] = [
        0x00, 0x00, 0x00, 0x11, 0x01, // length 17, resync request
        0x00, 0x00, 0x00, 0x07, // group 7
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x64, // from seq 100
        0x00, 0x00, 0x01, 0x00, // leaf 256
    ];
    const CHUNK: [u8; 20] = [
        0x00, 0x00, 0x00, 0x10, 0x82, // length 16, chunk
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x65, // seq 101
        0x00, 0x00, 0x01, 0x00, // leaf 256
        0xDE, 0xAD, 0xBE, // chunk bytes (3)
    ];
    const ERROR: [u8; 15] = [
        0x00, 0x00, 0x00, 0x0B, 0xFF, // length 11, error
        0x00, 0x04, // beyond history
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x32, // oldest held 50
    ];

    fn literal_cases() -> Vec<(&'static [u8], FrameRepr<'static>)> {
        vec![
            (
                &RESYNC_REQUEST,
                FrameRepr::ResyncRequest {
                    group_id: 7,
                    from_seq: 100,
                    leaf: 256,
                },
            ),
            (
                &CHUNK,
                FrameRepr::Chunk {
                    seq: 101,
                    leaf: 256,
                    chunk: &[0xDE, 0xAD, 0xBE],
                },
            ),
            (
                &ERROR,
                FrameRepr::Error {
                    code: ErrorCode::BeyondHistory,
                    context_seq: 50,
                },
            ),
        ]
    }

    #[test]
    fn test_parse() {
        for (bytes, repr) in literal_cases() {
            assert_eq!(FrameRepr::parse(bytes), Ok(repr));
            assert_eq!(FrameRepr::peek_len(bytes), Ok(Some(bytes.len())));
        }
    }

    #[test]
    fn test_emit() {
        for (bytes, repr) in literal_cases() {
            let mut buf = vec![0u8; repr.buffer_len()];
            assert_eq!(repr.emit(&mut buf), Ok(bytes.len()));
            assert_eq!(buf, bytes);
        }
    }

    #[test]
    fn truncation_at_every_length_fails() {
        for (bytes, _) in literal_cases() {
            assert_every_truncation_fails(bytes, |b| FrameRepr::parse(b).map(drop));
        }
    }

    #[test]
    fn rejects_bad_frames() {
        assert_eq!(
            FrameRepr::peek_len(&[0, 0, 0, 0]),
            Err(Error::FrameLength(0))
        );
        assert_eq!(
            FrameRepr::peek_len(&[0, 1, 0, 1]),
            Err(Error::FrameLength(65_537))
        );
        assert_eq!(FrameRepr::peek_len(&[0, 0, 0]), Ok(None));
        assert_eq!(
            FrameRepr::parse(&[0, 0, 0, 1, 0x42]),
            Err(Error::UnknownFrameType(0x42))
        );
        let mut trailing = RESYNC_REQUEST.to_vec();
        trailing.push(0);
        assert_eq!(FrameRepr::parse(&trailing), Err(Error::TrailingBytes(1)));
        // A request whose length prefix claims one extra body byte.
        let mut long_body = RESYNC_REQUEST.to_vec();
        long_body[3] = 0x12;
        long_body.push(0);
        assert_eq!(FrameRepr::parse(&long_body), Err(Error::TrailingBytes(1)));
        // A manifest frame with no manifest bytes.
        assert!(FrameRepr::parse(&[0, 0, 0, 9, 0x81, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        let empty = FrameRepr::Manifest {
            seq: 1,
            manifest: &[],
        };
        assert!(empty.emit(&mut [0u8; 64]).is_err());
        let huge = vec![0u8; MAX_FRAME_LEN as usize];
        let too_big = FrameRepr::Manifest {
            seq: 1,
            manifest: &huge,
        };
        assert!(matches!(
            too_big.emit(&mut vec![0u8; huge.len() + 64]),
            Err(Error::FrameLength(_))
        ));
    }

    #[test]
    fn error_codes_round_trip() {
        for code in 0..=u16::MAX {
            assert_eq!(ErrorCode::from_u16(code).to_u16(), code);
        }
    }

    /// Builds a frame of kind `kind % 7` from arbitrary field values.
    fn frame_of_kind(kind: u8, a: u64, b: u64, c: u32, payload: &[u8]) -> FrameRepr<'_> {
        match kind % 7 {
            0 => FrameRepr::ResyncRequest {
                group_id: c,
                from_seq: a,
                leaf: b as u32,
            },
            1 => FrameRepr::StateRequest { group_id: c },
            2 => FrameRepr::Manifest {
                seq: a,
                manifest: payload,
            },
            3 => FrameRepr::Chunk {
                seq: a,
                leaf: c,
                chunk: payload,
            },
            4 => FrameRepr::State {
                latest_seq: a,
                oldest_seq: b,
                manifest: payload,
            },
            5 => FrameRepr::End { last_seq: a },
            _ => FrameRepr::Error {
                code: ErrorCode::from_u16(c as u16),
                context_seq: a,
            },
        }
    }

    proptest! {
        #[test]
        fn round_trip(kind in 0u8..7, a: u64, b: u64, c: u32,
                      payload in proptest::collection::vec(any::<u8>(), 1..2000)) {
            let frame = frame_of_kind(kind, a, b, c, &payload);
            let mut buf = vec![0u8; frame.buffer_len()];
            let len = frame.emit(&mut buf).unwrap();
            prop_assert_eq!(len, buf.len());
            prop_assert_eq!(FrameRepr::parse(&buf).unwrap(), frame);
        }

        #[test]
        fn decode_then_encode_returns_input(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(frame) = FrameRepr::parse(&bytes) {
                let mut buf = vec![0u8; frame.buffer_len()];
                frame.emit(&mut buf).unwrap();
                prop_assert_eq!(buf, bytes);
            }
        }
    }
}
