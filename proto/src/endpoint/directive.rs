//! A relay directive: the GCKS's signed order moving members between relays (after a relay
//! died, or when one joins and takes a share of the load).
//!
//! Members know their relays from their registration bundle's directory, where each relay has
//! the number the GCKS gave it ([`crate::lkh::RelayContact::id`]). A directive is a list of
//! moves, each "the members now on relay `from` (or anywhere), those whose member id is
//! `residue` modulo `modulus`, go to relay `to` (or the GCKS)": all of a dead relay's members
//! in one move, or a share of every relay's for a relay that joined, without the GCKS listing
//! members. It is signed with the GCKS's Ed25519 key, which every member holds in its Rekey SA,
//! and carries an issue number that only grows, so a member applies only a directive newer than
//! the last it applied and nobody but the GCKS can move members (a relay is an insider of the
//! group, not of the GCKS).
//!
//! How it reaches a member is the product's: it is a small, self-authenticating blob the
//! product hands the member endpoint ([`super::member::MemberCommand::Directive`]), as it hands
//! it resync answers it fetched itself. The reference drivers carry it in the same channels as
//! a registration (the bundle of a member admitted after the directive lists its relays already
//! in the new order).
//!
//! Encoding (big-endian): `b"RKRD"`, version `1` (one byte), group id (u32), issue number
//! (u64), the number of moves (u16, at most [`MAX_MOVES`]), each move as `from` (u16: a relay's
//! number, [`WIRE_GCKS`] or [`WIRE_ANY`]), `modulus` (u16, at least 1), `residue` (u16, below
//! the modulus) and `to` (u16: a relay's number or [`WIRE_GCKS`]), then
//! the 64-byte Ed25519 signature over [`SIGNING_CONTEXT`] followed by every byte before it.
//! [`RelayDirective::verify`] is total: any input gives a directive or a [`DirectiveError`].

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// The magic number a directive starts with.
pub const MAGIC: &[u8; 4] = b"RKRD";

/// The version this module encodes and decodes.
pub const VERSION: u8 = 1;

/// The most moves one directive carries.
pub const MAX_MOVES: usize = 4096;

/// The relay number that stands for the GCKS's own contact on the wire.
pub const WIRE_GCKS: u16 = u16::MAX;

/// The `from` that stands for "wherever the member is" on the wire.
pub const WIRE_ANY: u16 = u16::MAX - 1;

/// What the signature covers before the directive's bytes.
pub const SIGNING_CONTEXT: &[u8] = b"rekeycast relay directive v1";

const HEADER_LEN: usize = 4 + 1 + 4 + 8 + 2;
const MOVE_LEN: usize = 2 + 2 + 2 + 2;
const SIGNATURE_LEN: usize = 64;

/// A relay by its number, or the GCKS's own contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayRef {
    /// The relay with this number ([`crate::lkh::RelayContact::id`]).
    Relay(u16),
    /// The GCKS's contact.
    Gcks,
}

/// Which members move, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectiveMove {
    /// Members on this contact; `None`: wherever they are.
    pub from: Option<RelayRef>,
    /// With `residue`: the members whose id is `residue` modulo `modulus` (1 and 0: all).
    pub modulus: u16,
    /// See `modulus`.
    pub residue: u16,
    /// Where they go.
    pub to: RelayRef,
}

impl DirectiveMove {
    /// Whether the move takes a member with `member_id` now on `current`.
    pub fn takes(&self, current: RelayRef, member_id: u64) -> bool {
        self.from.map_or(true, |from| from == current)
            && member_id % u64::from(self.modulus.max(1)) == u64::from(self.residue)
    }
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
    /// A move with a modulus of 0, a residue not below its modulus, or a `to` of "anywhere".
    #[error("relay directive move {index} is not well formed")]
    BadMove {
        /// The move's index.
        index: usize,
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
    /// Where the member with `member_id`, now on `current`, goes: the first move that takes
    /// it; `None`, no move for it.
    pub fn target_of(&self, current: RelayRef, member_id: u64) -> Option<RelayRef> {
        self.moves
            .iter()
            .find(|m| m.takes(current, member_id))
            .map(|m| m.to)
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
        for (index, m) in self.moves.iter().enumerate() {
            let wire = |r: RelayRef| match r {
                RelayRef::Relay(id) if id < WIRE_ANY => Ok(id),
                RelayRef::Relay(_) => Err(DirectiveError::BadMove { index }),
                RelayRef::Gcks => Ok(WIRE_GCKS),
            };
            if m.modulus == 0 || m.residue >= m.modulus {
                return Err(DirectiveError::BadMove { index });
            }
            let from = m.from.map_or(Ok(WIRE_ANY), wire)?;
            out.extend_from_slice(&from.to_be_bytes());
            out.extend_from_slice(&m.modulus.to_be_bytes());
            out.extend_from_slice(&m.residue.to_be_bytes());
            out.extend_from_slice(&wire(m.to)?.to_be_bytes());
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
            .map(|index| {
                let at = HEADER_LEN + index * MOVE_LEN;
                let u16_at = |k: usize| u16::from_be_bytes([bytes[at + k], bytes[at + k + 1]]);
                let relay = |wire: u16| match wire {
                    WIRE_GCKS => RelayRef::Gcks,
                    id => RelayRef::Relay(id),
                };
                let (from, modulus, residue, to) = (u16_at(0), u16_at(2), u16_at(4), u16_at(6));
                if modulus == 0 || residue >= modulus || to == WIRE_ANY {
                    return Err(DirectiveError::BadMove { index });
                }
                Ok(DirectiveMove {
                    from: (from != WIRE_ANY).then(|| relay(from)),
                    modulus,
                    residue,
                    to: relay(to),
                })
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
                // Relay 1 died: its members go to relay 2.
                DirectiveMove {
                    from: Some(RelayRef::Relay(1)),
                    modulus: 1,
                    residue: 0,
                    to: RelayRef::Relay(2),
                },
                // A third of everybody else's members to the GCKS.
                DirectiveMove {
                    from: None,
                    modulus: 3,
                    residue: 1,
                    to: RelayRef::Gcks,
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
        assert_eq!(
            decoded.target_of(RelayRef::Relay(1), 9),
            Some(RelayRef::Relay(2))
        );
        assert_eq!(
            decoded.target_of(RelayRef::Relay(0), 4),
            Some(RelayRef::Gcks)
        );
        assert_eq!(decoded.target_of(RelayRef::Relay(0), 5), None);
        let mut bad = directive();
        bad.moves[1].residue = 3;
        assert_eq!(bad.sign(&key), Err(DirectiveError::BadMove { index: 1 }));
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
