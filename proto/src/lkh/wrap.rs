//! Wrapped keys: one key of the tree encrypted under one of its children's keys, and its
//! fixed-size byte encoding.
//!
//! # Byte layout
//!
//! A [`Wrap`] is [`WRAP_LEN`] = 64 bytes, big-endian, with no length or type field (a chunk
//! holds a count of wraps and then the wraps back to back):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 node: the node whose new key is wrapped       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 version: that key's version                   |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 child: the node whose key wraps it            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 child version: the version of that key        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +          sealed key: 32 bytes of ciphertext, then             +
//! |          the 16-byte AEAD tag (48 bytes)                      |
//! +                              ...                              +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The child is normally `d*node + 1 ..= d*node + d` (the parser does not know the degree;
//! [`crate::lkh::MemberKeys::apply`] checks it).
//!
//! # Nonces and associated data
//!
//! The AEAD nonce is not sent: it is `node || version || child` (12 bytes, big-endian). A key
//! identity `(node, version)` names exactly one key the GCKS generated (versions are the
//! tree's batch counter, and a node gets at most one key per batch), and that key is wrapped
//! at most once under each child, in the batch that made it. So the triple never repeats over
//! the tree's life, and in particular never under one wrapping key: a child key that wraps
//! several successive versions of its parent uses a new `version` each time, and a leaf key
//! that moves down when its leaf is split wraps under a new `child` id. The one other
//! encryption, the Data SA under the group key, uses node `u32::MAX`, which no node has. This
//! holds across restarts as long as the GCKS persists the tree before it sends a message (see
//! the engine's `persist::save_tree`): a batch computed again after a crash was never sent.
//!
//! The associated data binds the algorithm id, the group id, the message's sequence number and
//! all four ids and versions, so a wrap cannot be replayed in another message or group or
//! moved to another place in the tree.
//!
//! # The two algorithms
//!
//! The Rekey SA's [`WrapAlgorithm`] (named in every manifest) picks how the 48 sealed bytes
//! are made:
//!
//! - [`WrapAlgorithm::Aes256Gcm`]: AES-256-GCM with the nonce and associated data above: 32
//!   bytes of ciphertext and the 16-byte tag.
//! - [`WrapAlgorithm::Aes256Kwp`]: the AES key wrap with padding of RFC 5649 (G-IKEv2's
//!   `KW_5649_256`, RFC 9838) under the child's key: the 40 bytes that RFC 5649 makes of a
//!   32-byte key, exactly what a G-IKEv2 KD payload's wrapped key holds; then an 8-byte context
//!   tag, a BLAKE3 keyed hash of the associated data and those 40 bytes under a key derived
//!   from the child's key ([`KWP_TAG_CONTEXT`]). RFC 5649 has no associated data: its own
//!   integrity check (the alternative IV) says the key was wrapped under this key, the tag says
//!   it was wrapped for this message and this place in the tree. The member checks the tag
//!   first, then unwraps. Key wrap is deterministic and needs no nonce.
//!
//! [`Wrap::key_id`] and [`Wrap::kwk_id`] give the wrap's key ids in the form of RFC 9838's
//! wrapped-key format (the 32-bit Key ID of the wrapped key and the KWK ID of the key that
//! wraps it), so a product speaking G-IKEv2 can map each [`Wrap`] onto a wrapped key of its KD
//! payload: KWK ID, then the 40 bytes of [`Wrap::rfc5649_bytes`].

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use aes_kw::KekAes256;
use zeroize::Zeroize;

use super::topology::NodeId;
use super::Key;
use crate::gsa::WrapAlgorithm;

/// Bytes of an encoded [`Wrap`].
pub const WRAP_LEN: usize = 64;
/// Bytes of a sealed key: 32 bytes of ciphertext and a 16-byte tag.
pub const SEALED_LEN: usize = 48;
/// The node id no node has, used in the nonce of the Data SA's encryption.
pub(crate) const NO_NODE: u32 = u32::MAX;
/// Bytes RFC 5649 makes of a 32-byte key: the key and the 8-byte alternative IV.
pub const RFC5649_LEN: usize = 40;
/// Bytes of the context tag that follows an RFC 5649 wrap.
pub const KWP_TAG_LEN: usize = SEALED_LEN - RFC5649_LEN;
/// The context of the derivation of the context tag's key from the wrapping key (BLAKE3
/// `derive_key`).
pub const KWP_TAG_CONTEXT: &str = "rekeycast 2026 RFC 5649 wrap context tag";

/// A key of the tree, encrypted under one of its children's keys.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Wrap {
    /// The node whose new key this wrap carries.
    pub node: NodeId,
    /// The version of that key.
    pub version: u32,
    /// The child whose key encrypts it.
    pub child: NodeId,
    /// The version of the child's key that encrypts it.
    pub child_version: u32,
    /// The encrypted key and its AEAD tag.
    pub sealed: [u8; SEALED_LEN],
}

/// What identifies the message a wrap belongs to: bound into every wrap's associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RekeyContext {
    /// The key-wrapping algorithm of the Rekey SA.
    pub algorithm: WrapAlgorithm,
    /// The group id.
    pub group_id: u32,
    /// The rekey message's sequence number.
    pub seq: u64,
}

/// What can be wrong with a wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WrapError {
    /// The encoding is not exactly [`WRAP_LEN`] bytes.
    #[error("a wrap is {WRAP_LEN} bytes, not {0}")]
    Length(usize),
    /// The tag does not verify: the key, the context or the bytes are not the ones it was
    /// sealed with.
    #[error("wrapped key fails authentication")]
    Authentication,
}

impl Wrap {
    /// Encrypts `key` (the new key of `node` at `version`) under `under` (the key of `child`
    /// at `child_version`) for the message `ctx`.
    pub fn seal(
        ctx: &RekeyContext,
        node: NodeId,
        version: u32,
        child: NodeId,
        child_version: u32,
        key: &Key,
        under: &Key,
    ) -> Self {
        let mut wrap = Self {
            node,
            version,
            child,
            child_version,
            sealed: [0; SEALED_LEN],
        };
        let aad = wrap.associated_data(ctx);
        wrap.sealed = seal_key(ctx.algorithm, under, wrap.nonce(), &aad, key);
        wrap
    }

    /// Decrypts the wrapped key with `under`, the key of `(child, child_version)`.
    pub fn open(&self, ctx: &RekeyContext, under: &Key) -> Result<Key, WrapError> {
        let aad = self.associated_data(ctx);
        open_key(ctx.algorithm, under, self.nonce(), &aad, &self.sealed)
    }

    /// The 64-byte encoding (see the module's byte layout).
    pub fn to_bytes(&self) -> [u8; WRAP_LEN] {
        let mut bytes = [0u8; WRAP_LEN];
        self.emit(&mut bytes);
        bytes
    }

    /// Writes the encoding into exactly [`WRAP_LEN`] bytes.
    pub fn emit(&self, out: &mut [u8; WRAP_LEN]) {
        out[0..4].copy_from_slice(&self.node.to_be_bytes());
        out[4..8].copy_from_slice(&self.version.to_be_bytes());
        out[8..12].copy_from_slice(&self.child.to_be_bytes());
        out[12..16].copy_from_slice(&self.child_version.to_be_bytes());
        out[16..].copy_from_slice(&self.sealed);
    }

    /// Parses exactly [`WRAP_LEN`] bytes. Total: every 64-byte string is a wrap (whether it
    /// authenticates is [`Wrap::open`]'s question); any other length is an error.
    pub fn parse(bytes: &[u8]) -> Result<Self, WrapError> {
        let bytes: &[u8; WRAP_LEN] = bytes
            .try_into()
            .map_err(|_| WrapError::Length(bytes.len()))?;
        let u32_at = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut sealed = [0u8; SEALED_LEN];
        sealed.copy_from_slice(&bytes[16..]);
        Ok(Self {
            node: u32_at(0),
            version: u32_at(4),
            child: u32_at(8),
            child_version: u32_at(12),
            sealed,
        })
    }

    /// The RFC 9838 Key ID of the wrapped key: the id of its node in the tree (its version
    /// is the message's; see [`Wrap::version`]).
    pub fn key_id(&self) -> u32 {
        self.node
    }

    /// The RFC 9838 KWK ID: the id of the key that wraps this one (the child's node).
    pub fn kwk_id(&self) -> u32 {
        self.child
    }

    /// The RFC 5649 wrap in the sealed bytes, as a G-IKEv2 wrapped key holds it, when the
    /// Rekey SA's algorithm is [`WrapAlgorithm::Aes256Kwp`] (for AES-256-GCM these bytes mean
    /// nothing to RFC 5649).
    pub fn rfc5649_bytes(&self) -> &[u8; RFC5649_LEN] {
        // SEALED_LEN (48) > RFC5649_LEN (40): the conversion of the prefix cannot fail.
        self.sealed
            .first_chunk::<RFC5649_LEN>()
            .unwrap_or(&[0; RFC5649_LEN])
    }

    fn nonce(&self) -> [u8; 12] {
        nonce(self.node, self.version, self.child)
    }

    fn associated_data(&self, ctx: &RekeyContext) -> [u8; AAD_LEN] {
        associated_data(
            ctx,
            Domain::Wrap,
            [self.node, self.version, self.child, self.child_version],
        )
    }
}

impl core::fmt::Debug for Wrap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Wrap")
            .field("node", &self.node)
            .field("version", &self.version)
            .field("child", &self.child)
            .field("child_version", &self.child_version)
            .finish_non_exhaustive()
    }
}

/// Length of the associated data: domain, algorithm, group id, sequence, four u32 fields.
pub(crate) const AAD_LEN: usize = 1 + 1 + 4 + 8 + 16;

/// What an encryption protects: separates the associated data of wraps from the Data SA's.
#[derive(Clone, Copy)]
#[repr(u8)]
pub(crate) enum Domain {
    Wrap = 1,
    DataSa = 2,
}

pub(crate) fn nonce(a: u32, b: u32, c: u32) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[0..4].copy_from_slice(&a.to_be_bytes());
    nonce[4..8].copy_from_slice(&b.to_be_bytes());
    nonce[8..12].copy_from_slice(&c.to_be_bytes());
    nonce
}

pub(crate) fn associated_data(
    ctx: &RekeyContext,
    domain: Domain,
    fields: [u32; 4],
) -> [u8; AAD_LEN] {
    let mut aad = [0u8; AAD_LEN];
    aad[0] = domain as u8;
    aad[1] = ctx.algorithm.id();
    aad[2..6].copy_from_slice(&ctx.group_id.to_be_bytes());
    aad[6..14].copy_from_slice(&ctx.seq.to_be_bytes());
    for (i, field) in fields.iter().enumerate() {
        aad[14 + 4 * i..18 + 4 * i].copy_from_slice(&field.to_be_bytes());
    }
    aad
}

/// Encrypts a 32-byte key under `under` with the Rekey SA's algorithm.
pub(crate) fn seal_key(
    algorithm: WrapAlgorithm,
    under: &Key,
    nonce: [u8; 12],
    aad: &[u8],
    key: &Key,
) -> [u8; SEALED_LEN] {
    match algorithm {
        WrapAlgorithm::Aes256Gcm => {
            let cipher = Aes256Gcm::new(under.as_bytes().into());
            let mut sealed = [0u8; SEALED_LEN];
            sealed[..32].copy_from_slice(key.as_bytes());
            // AES-GCM fails only for plaintexts longer than about 64 GiB; 32 bytes never do.
            #[allow(clippy::expect_used)]
            let tag = cipher
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut sealed[..32])
                .expect("a 32-byte plaintext is within AES-GCM's length limit");
            sealed[32..].copy_from_slice(&tag);
            sealed
        }
        WrapAlgorithm::Aes256Kwp => {
            let _ = nonce; // Key wrap needs none: it is deterministic.
            let kek = KekAes256::new(under.as_bytes().into());
            let mut sealed = [0u8; SEALED_LEN];
            // RFC 5649 of 32 bytes is exactly RFC5649_LEN bytes, so this cannot fail.
            #[allow(clippy::expect_used)]
            kek.wrap_with_padding(key.as_bytes(), &mut sealed[..RFC5649_LEN])
                .expect("RFC 5649 wraps a 32-byte key into 40 bytes");
            let tag = kwp_tag(under, aad, &sealed[..RFC5649_LEN]);
            sealed[RFC5649_LEN..].copy_from_slice(&tag);
            sealed
        }
    }
}

/// The context tag of an RFC 5649 wrap: binds the associated data to the wrapped bytes under
/// a key only the holders of the wrapping key have.
fn kwp_tag(under: &Key, aad: &[u8], wrapped: &[u8]) -> [u8; KWP_TAG_LEN] {
    let mut tag_key = blake3::derive_key(KWP_TAG_CONTEXT, under.as_bytes());
    let mut hasher = blake3::Hasher::new_keyed(&tag_key);
    tag_key.zeroize();
    hasher.update(aad);
    hasher.update(wrapped);
    let digest = hasher.finalize();
    let mut tag = [0u8; KWP_TAG_LEN];
    tag.copy_from_slice(&digest.as_bytes()[..KWP_TAG_LEN]);
    tag
}

/// Decrypts a sealed 32-byte key; the plaintext is released only if the tag verifies.
pub(crate) fn open_key(
    algorithm: WrapAlgorithm,
    under: &Key,
    nonce: [u8; 12],
    aad: &[u8],
    sealed: &[u8; SEALED_LEN],
) -> Result<Key, WrapError> {
    match algorithm {
        WrapAlgorithm::Aes256Gcm => {
            let cipher = Aes256Gcm::new(under.as_bytes().into());
            let mut plain = Key::from_bytes(
                sealed[..32]
                    .try_into()
                    .map_err(|_| WrapError::Length(sealed.len()))?,
            );
            cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(&nonce),
                    aad,
                    plain.as_mut_bytes(),
                    Tag::from_slice(&sealed[32..]),
                )
                .map_err(|_| WrapError::Authentication)?;
            Ok(plain)
        }
        WrapAlgorithm::Aes256Kwp => {
            let _ = nonce;
            let (wrapped, tag) = sealed.split_at(RFC5649_LEN);
            if !constant_time_eq(&kwp_tag(under, aad, wrapped), tag) {
                return Err(WrapError::Authentication);
            }
            let kek = KekAes256::new(under.as_bytes().into());
            // The key zeroizes itself on drop, whatever the unwrap left in it.
            let mut plain = Key::from_bytes([0; 32]);
            let unwrapped_len = kek
                .unwrap_with_padding(wrapped, plain.as_mut_bytes())
                .map_err(|_| WrapError::Authentication)?
                .len();
            // A wrap of fewer bytes (the padding said so) is not a key of the tree.
            if unwrapped_len != 32 {
                return Err(WrapError::Authentication);
            }
            Ok(plain)
        }
    }
}

/// Compares two short tags without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RekeyContext {
        RekeyContext {
            algorithm: WrapAlgorithm::Aes256Gcm,
            group_id: 7,
            seq: 42,
        }
    }

    fn wrap() -> (Wrap, Key, Key) {
        let key = Key::from_bytes([0x11; 32]);
        let under = Key::from_bytes([0x22; 32]);
        (Wrap::seal(&ctx(), 1, 9, 6, 3, &key, &under), key, under)
    }

    #[test]
    fn seal_open_round_trip() {
        let (wrap, key, under) = wrap();
        assert_eq!(wrap.open(&ctx(), &under).unwrap(), key);
    }

    #[test]
    fn test_emit_and_parse_layout() {
        let (wrap, _, _) = wrap();
        let bytes = wrap.to_bytes();
        assert_eq!(
            &bytes[..16],
            &[0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 6, 0, 0, 0, 3]
        );
        assert_eq!(&bytes[16..], &wrap.sealed);
        assert_eq!(Wrap::parse(&bytes).unwrap(), wrap);
    }

    #[test]
    fn parse_rejects_every_other_length() {
        let (wrap, _, _) = wrap();
        let mut long = wrap.to_bytes().to_vec();
        long.push(0);
        for len in 0..=WRAP_LEN + 1 {
            let result = Wrap::parse(&long[..len]);
            if len == WRAP_LEN {
                assert!(result.is_ok());
            } else {
                assert_eq!(result, Err(WrapError::Length(len)));
            }
        }
    }

    #[test]
    fn every_bit_flip_fails_authentication() {
        let (wrap, _, under) = wrap();
        let bytes = wrap.to_bytes();
        for bit in 0..WRAP_LEN * 8 {
            let mut flipped = bytes;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let parsed = Wrap::parse(&flipped).unwrap();
            assert_eq!(
                parsed.open(&ctx(), &under),
                Err(WrapError::Authentication),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn another_context_or_key_fails() {
        let (wrap, _, under) = wrap();
        let other_seq = RekeyContext { seq: 43, ..ctx() };
        let other_group = RekeyContext {
            group_id: 8,
            ..ctx()
        };
        assert_eq!(
            wrap.open(&other_seq, &under),
            Err(WrapError::Authentication)
        );
        assert_eq!(
            wrap.open(&other_group, &under),
            Err(WrapError::Authentication)
        );
        assert_eq!(
            wrap.open(&ctx(), &Key::from_bytes([0x23; 32])),
            Err(WrapError::Authentication)
        );
    }

    fn kwp_ctx() -> RekeyContext {
        RekeyContext {
            algorithm: WrapAlgorithm::Aes256Kwp,
            ..ctx()
        }
    }

    #[test]
    fn kwp_round_trip_and_rfc5649_interop() {
        let key = Key::from_bytes([0x11; 32]);
        let under = Key::from_bytes([0x22; 32]);
        let wrap = Wrap::seal(&kwp_ctx(), 1, 9, 6, 3, &key, &under);
        assert_eq!(wrap.open(&kwp_ctx(), &under).unwrap(), key);
        assert_eq!((wrap.key_id(), wrap.kwk_id()), (1, 6));
        // The first 40 bytes are a plain RFC 5649 wrap of the key: what a G-IKEv2 peer
        // unwraps with the KWK alone.
        let kek = KekAes256::new(under.as_bytes().into());
        let mut out = [0u8; 32];
        let unwrapped = kek
            .unwrap_with_padding(wrap.rfc5649_bytes(), &mut out)
            .unwrap();
        assert_eq!(unwrapped, key.as_bytes());
        // RFC 5649's alternative IV: A65959A6 and the 32-bit length 32 come back out.
        let mut expected = [0u8; RFC5649_LEN];
        kek.wrap_with_padding(key.as_bytes(), &mut expected)
            .unwrap();
        assert_eq!(wrap.rfc5649_bytes(), &expected);
        // Deterministic: the same key under the same key wraps the same.
        let again = Wrap::seal(&kwp_ctx(), 1, 9, 6, 3, &key, &under);
        assert_eq!(again, wrap);
    }

    #[test]
    fn kwp_bit_flips_other_context_and_other_algorithm_fail() {
        let key = Key::from_bytes([0x11; 32]);
        let under = Key::from_bytes([0x22; 32]);
        let wrap = Wrap::seal(&kwp_ctx(), 1, 9, 6, 3, &key, &under);
        let bytes = wrap.to_bytes();
        for bit in 0..WRAP_LEN * 8 {
            let mut flipped = bytes;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let parsed = Wrap::parse(&flipped).unwrap();
            assert_eq!(
                parsed.open(&kwp_ctx(), &under),
                Err(WrapError::Authentication),
                "bit {bit}"
            );
        }
        let other_seq = RekeyContext {
            seq: 43,
            ..kwp_ctx()
        };
        assert_eq!(
            wrap.open(&other_seq, &under),
            Err(WrapError::Authentication)
        );
        assert_eq!(
            wrap.open(&kwp_ctx(), &Key::from_bytes([0x23; 32])),
            Err(WrapError::Authentication)
        );
        // A wrap made under one algorithm opens under neither the other nor a relabelled
        // context.
        assert_eq!(wrap.open(&ctx(), &under), Err(WrapError::Authentication));
        let gcm = Wrap::seal(&ctx(), 1, 9, 6, 3, &key, &under);
        assert_eq!(gcm.open(&kwp_ctx(), &under), Err(WrapError::Authentication));
    }

    /// A wrap whose RFC 5649 length says fewer than 32 bytes is refused even with a good tag:
    /// only whole keys come out.
    #[test]
    fn kwp_short_plaintext_is_refused() {
        let under = Key::from_bytes([0x22; 32]);
        let kek = KekAes256::new(under.as_bytes().into());
        let mut sealed = [0u8; SEALED_LEN];
        kek.wrap_with_padding(&[7u8; 25], &mut sealed[..RFC5649_LEN])
            .unwrap();
        let mut wrap = Wrap::parse(&[0u8; WRAP_LEN]).unwrap();
        wrap.node = 1;
        wrap.version = 9;
        wrap.child = 6;
        wrap.child_version = 3;
        let aad = wrap.associated_data(&kwp_ctx());
        let tag = kwp_tag(&under, &aad, &sealed[..RFC5649_LEN]);
        sealed[RFC5649_LEN..].copy_from_slice(&tag);
        wrap.sealed = sealed;
        assert_eq!(
            wrap.open(&kwp_ctx(), &under),
            Err(WrapError::Authentication)
        );
    }
}
