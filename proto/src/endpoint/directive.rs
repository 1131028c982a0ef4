//! A relay directive: the GCKS's signed order moving members between relays (after a relay
//! died, or when one joins and takes a share of the load).
//!
//! Members know their relays from their registration bundle's directory, by index. A directive
//! names ranges of leaf order keys (the order the rekey message's chunks follow, so a range is
//! a contiguous run of chunks) and, for each, the directory index of the relay its members go
//! to, or the GCKS itself. It is signed with the GCKS's Ed25519 key, which every member holds
//! in its Rekey SA, and carries an issue number that only grows, so a member applies only a
//! directive newer than the last it applied and nobody but the GCKS can move members (a relay
//! is an insider of the group, not of the GCKS).
//!
//! How it reaches a member is the product's: it is a small, self-authenticating blob the
//! product hands the member endpoint ([`super::member::MemberCommand::Directive`]), as it hands
//! it resync answers it fetched itself. The reference drivers carry it in the same channels as
//! a registration (the bundle of a member admitted after the directive lists its relays already
//! in the new order).
//!
//! Encoding (big-endian): `b"RKRD"`, version `1` (one byte), group id (u32), issue number
//! (u64), the number of moves (u16, at most [`MAX_MOVES`]), each move as first and last order
//! key (u32 each, inclusive) and target (u16: a relay's directory index, or [`TO_GCKS`]), then
//! the 64-byte Ed25519 signature over [`SIGNING_CONTEXT`] followed by every byte before it.
//! [`RelayDirective::verify`] is total: any input gives a directive or a [`DirectiveError`].

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// The magic number a directive starts with.
pub const MAGIC: &[u8; 4] = b"RKRD";

/// The version this module encodes and decodes.
pub const VERSION: u8 = 1;

/// The most moves one directive carries.
pub const MAX_MOVES: usize = 4096;

/// The target that means "the GCKS itself".
pub const TO_GCKS: u16 = u16::MAX;

/// What the signature covers before the directive's bytes.
pub const SIGNING_CONTEXT: &[u8] = b"rekeycast relay directive v1";

const HEADER_LEN: usize = 4 + 1 + 4 + 8 + 2;
const MOVE_LEN: usize = 4 + 4 + 2;
const SIGNATURE_LEN: usize = 64;

/// One range of members and where they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectiveMove {
    /// The first order key of the range.
    pub first_order_key: u32,
    /// The last order key of the range (inclusive).
    pub last_order_key: u32,
    /// The relay's index in the members' directory; `None`: the GCKS's contact.
    pub relay: Option<u16>,
}

/// A GCKS's order moving members between relays. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayDirective {
    /// The group.
    pub group_id: u32,
    /// The issue number: a member applies only a directive newer than the last it applied.
    pub issued: u64,
    /// The moves; a member takes the first whose range holds its order key.
    pub moves: Vec<DirectiveMove>,
}

/// Why bytes are not a directive a member applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectiveError {
    /// Shorter than its header, its moves and its signature say, or longer.
    #[error("a relay directive of {len} bytes: not the length its header gives")]
    Length {
        /// The length.
        len: usize,
    },
    /// Not the magic number.
    #[error("not a relay directive")]
    BadMagic,
    /// A version this code does not know.
    #[error("relay directive version {0}: expected {VERSION}")]
    UnsupportedVersion(u8),
    /// More than [`MAX_MOVES`] moves (also refused when signing).
    #[error("relay directive of {0} moves: at most {MAX_MOVES}")]
    TooManyMoves(usize),
    /// A range whose first order key is above its last.
    #[error("relay directive range {first}..={last} is empty")]
    EmptyRange {
        /// The first order key.
        first: u32,
        /// The last.
        last: u32,
    },
    /// Of another group.
    #[error("relay directive of group {found:#x}")]
    WrongGroup {
        /// The group it names.
        found: u32,
    },
    /// The signature is not the GCKS's over these bytes.
    #[error("relay directive signature does not verify")]
    BadSignature,
    /// Not newer than the last directive the member applied.
    #[error("relay directive {issued} is not newer than the last one applied")]
    Stale {
        /// Its issue number.
        issued: u64,
    },
}

impl RelayDirective {
    /// The target of the member with `order_key`: `Some(Some(i))` relay `i`, `Some(None)` the
    /// GCKS, `None` no move for it.
    pub fn target_of(&self, order_key: u32) -> Option<Option<usize>> {
        self.moves
            .iter()
            .find(|m| (m.first_order_key..=m.last_order_key).contains(&order_key))
            .map(|m| m.relay.map(usize::from))
    }

    /// The signed encoding.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, DirectiveError> {
        if self.moves.len() > MAX_MOVES {
            return Err(DirectiveError::TooManyMoves(self.moves.len()));
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.moves.len() * MOVE_LEN + SIGNATURE_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.group_id.to_be_bytes());
        out.extend_from_slice(&self.issued.to_be_bytes());
        // At most MAX_MOVES (checked above), which fits a u16.
        out.extend_from_slice(&(self.moves.len() as u16).to_be_bytes());
        for m in &self.moves {
            if m.first_order_key > m.last_order_key {
                return Err(DirectiveError::EmptyRange {
                    first: m.first_order_key,
                    last: m.last_order_key,
                });
            }
            out.extend_from_slice(&m.first_order_key.to_be_bytes());
            out.extend_from_slice(&m.last_order_key.to_be_bytes());
            out.extend_from_slice(&m.relay.unwrap_or(TO_GCKS).to_be_bytes());
        }
        let signature = key.sign(&signed_bytes(&out));
        out.extend_from_slice(&signature.to_bytes());
        Ok(out)
    }

    /// Decodes and verifies `bytes`: a directive of `group_id` signed by `gcks`.
    pub fn verify(
        bytes: &[u8],
        group_id: u32,
        gcks: &VerifyingKey,
    ) -> Result<Self, DirectiveError> {
        let length = || DirectiveError::Length { len: bytes.len() };
        if bytes.len() < HEADER_LEN + SIGNATURE_LEN {
            return Err(length());
        }
        if &bytes[..4] != MAGIC {
            return Err(DirectiveError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(DirectiveError::UnsupportedVersion(bytes[4]));
        }
        let u32_at = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let found = u32_at(5);
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&bytes[9..17]);
        let issued = u64::from_be_bytes(issued);
        let count = usize::from(u16::from_be_bytes([bytes[17], bytes[18]]));
        if count > MAX_MOVES {
            return Err(DirectiveError::TooManyMoves(count));
        }
        let body_len = HEADER_LEN + count * MOVE_LEN;
        if bytes.len() != body_len + SIGNATURE_LEN {
            return Err(length());
        }
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&bytes[body_len..]);
        gcks.verify_strict(
            &signed_bytes(&bytes[..body_len]),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| DirectiveError::BadSignature)?;
        if found != group_id {
            return Err(DirectiveError::WrongGroup { found });
        }
        let moves = (0..count)
            .map(|i| {
                let at = HEADER_LEN + i * MOVE_LEN;
                let target = u16::from_be_bytes([bytes[at + 8], bytes[at + 9]]);
                let m = DirectiveMove {
                    first_order_key: u32_at(at),
                    last_order_key: u32_at(at + 4),
                    relay: (target != TO_GCKS).then_some(target),
                };
                if m.first_order_key > m.last_order_key {
                    return Err(DirectiveError::EmptyRange {
                        first: m.first_order_key,
                        last: m.last_order_key,
                    });
                }
                Ok(m)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            group_id: found,
            issued,
            moves,
        })
    }
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut signed = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    signed.extend_from_slice(SIGNING_CONTEXT);
    signed.extend_from_slice(body);
    signed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directive() -> RelayDirective {
        RelayDirective {
            group_id: 7,
            issued: 3,
            moves: vec![
                DirectiveMove {
                    first_order_key: 0,
                    last_order_key: 9,
                    relay: Some(2),
                },
                DirectiveMove {
                    first_order_key: 10,
                    last_order_key: 10,
                    relay: None,
                },
            ],
        }
    }

    #[test]
    fn a_signed_directive_verifies_and_names_each_members_target() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let bytes = directive().sign(&key).expect("signs");
        // Literal header: magic, version, group, issue number, two moves.
        assert_eq!(
            &bytes[..HEADER_LEN],
            &[b'R', b'K', b'R', b'D', 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 3, 0, 2]
        );
        let decoded = RelayDirective::verify(&bytes, 7, &key.verifying_key()).expect("verifies");
        assert_eq!(decoded, directive());
        assert_eq!(decoded.target_of(4), Some(Some(2)));
        assert_eq!(decoded.target_of(10), Some(None));
        assert_eq!(decoded.target_of(11), None);
        assert_eq!(
            RelayDirective::verify(&bytes, 8, &key.verifying_key()),
            Err(DirectiveError::WrongGroup { found: 7 })
        );
        let other = SigningKey::from_bytes(&[5; 32]);
        assert_eq!(
            RelayDirective::verify(&bytes, 7, &other.verifying_key()),
            Err(DirectiveError::BadSignature)
        );
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused_without_panicking() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let public = key.verifying_key();
        let bytes = directive().sign(&key).expect("signs");
        for len in 0..bytes.len() {
            assert!(
                RelayDirective::verify(&bytes[..len], 7, &public).is_err(),
                "{len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(RelayDirective::verify(&longer, 7, &public).is_err());
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[at] ^= 1 << bit;
                assert!(
                    RelayDirective::verify(&flipped, 7, &public).is_err(),
                    "{at} {bit}"
                );
            }
        }
        let mut many = directive();
        many.moves = vec![many.moves[0]; MAX_MOVES + 1];
        assert_eq!(
            many.sign(&key),
            Err(DirectiveError::TooManyMoves(MAX_MOVES + 1))
        );
    }
}
