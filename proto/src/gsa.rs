//! Group security associations (RFC 4046 section 6): the Rekey SA that protects rekey messages
//! and the Data SA that protects the group's traffic.
//!
//! This module owns the parameters a member needs to take part in rekeying ([`RekeySa`], RFC
//! 4046 6.2.1), the traffic key each rekey hands out ([`DataSa`], RFC 4046 6.3), and the
//! derivation of the datagram MAC key of each message ([`datagram_mac_key`]). It does no I/O
//! and keeps no state beyond its values.
//!
//! # The datagram MAC key and its insider limit
//!
//! The MAC key of message `s` is derived with `blake3::derive_key` from the group key that
//! message `s - 1` produced (and the group id and `s`). So a member can check, and compute,
//! the MAC of message `s` as soon as it holds the group key of `s - 1`, before it has decrypted
//! anything of message `s`. The price is the insider limit of any group MAC: a member ejected
//! in message `s` still holds the group key of `s - 1` and can therefore MAC datagrams of
//! message `s` (though not decrypt its new keys); it can MAC nothing of message `s + 1` or
//! later, whose MAC keys come from group keys it never learns. Forgeries by insiders are caught
//! by the signature and chunk authentication that follow the MAC, not by the MAC.

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::auth::mac::MacKey;
use crate::lkh::topology::Degree;
use crate::lkh::wrap::{
    associated_data, nonce, open_key, seal_key, Domain, RekeyContext, WrapError, NO_NODE,
    SEALED_LEN,
};
use crate::lkh::Key;

/// The context string of the datagram MAC key derivation (BLAKE3 `derive_key`).
pub const MAC_KEY_CONTEXT: &str = "rekeycast 2026 datagram MAC key of message s from group key s-1";

/// The key-wrapping algorithm of a Rekey SA, by its id in the manifest (RFC 4046 6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
#[non_exhaustive]
pub enum WrapAlgorithm {
    /// AES-256-GCM (RustCrypto `aes-gcm`), 12-byte nonce, 16-byte tag. Id 1.
    #[default]
    Aes256Gcm,
    /// AES-256 key wrap with padding (RFC 5649, RustCrypto `aes-kw`), as G-IKEv2's
    /// `KW_5649_256` (RFC 9838), with an 8-byte context tag beside it (see
    /// [`crate::lkh::wrap`]). Id 2.
    Aes256Kwp,
}

/// A wrap algorithm id this implementation does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown key-wrapping algorithm id {0}")]
pub struct UnknownAlgorithm(pub u8);

impl WrapAlgorithm {
    /// The algorithm's id on the wire.
    pub const fn id(self) -> u8 {
        match self {
            Self::Aes256Gcm => 1,
            Self::Aes256Kwp => 2,
        }
    }

    /// The algorithm with id `id`.
    pub const fn from_id(id: u8) -> Result<Self, UnknownAlgorithm> {
        match id {
            1 => Ok(Self::Aes256Gcm),
            2 => Ok(Self::Aes256Kwp),
            other => Err(UnknownAlgorithm(other)),
        }
    }
}

impl TryFrom<u8> for WrapAlgorithm {
    type Error = UnknownAlgorithm;
    fn try_from(value: u8) -> Result<Self, UnknownAlgorithm> {
        Self::from_id(value)
    }
}

impl From<WrapAlgorithm> for u8 {
    fn from(value: WrapAlgorithm) -> u8 {
        value.id()
    }
}

/// The Rekey SA (RFC 4046 6.2.1): what a member must know, besides its keys, to receive and
/// check rekey messages. Carried to a member in its registration bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RekeySa {
    /// The group id (in every datagram's header).
    pub group_id: u32,
    /// The SPI of the Rekey SA (in every datagram's header).
    pub spi: u32,
    /// How keys are wrapped.
    pub wrap_algorithm: WrapAlgorithm,
    /// The degree of the key tree (members compute their path from it).
    pub degree: Degree,
    /// The GCKS's Ed25519 public key, which signs every rekey message.
    #[serde(with = "verifying_key_bytes")]
    pub gcks_public_key: VerifyingKey,
    /// The lifetime of each Data SA, in seconds from the message that carries it.
    pub data_sa_lifetime_secs: u32,
}

impl RekeySa {
    /// The context the wraps of message `seq` are bound to.
    pub fn context(&self, seq: u64) -> RekeyContext {
        RekeyContext {
            algorithm: self.wrap_algorithm,
            group_id: self.group_id,
            seq,
        }
    }
}

/// A traffic protection key (TEK), zeroized on drop.
pub type Tek = Key;

/// A Data SA (RFC 4046 6.3): the traffic key the group uses after a rekey, with its SPI and
/// lifetime. Every rekey message makes a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSa {
    /// The SPI that names this SA in the group's traffic.
    pub spi: u32,
    /// Lifetime in seconds from the rekey message that carries it.
    pub lifetime_secs: u32,
    /// The traffic key.
    pub tek: Tek,
}

/// Bytes of an encoded [`WrappedDataSa`].
pub const WRAPPED_DATA_SA_LEN: usize = 12 + SEALED_LEN;

/// A Data SA as a rekey message carries it: SPI and lifetime in the clear (and bound to the
/// ciphertext), the TEK encrypted under the new group key.
///
/// Layout, [`WRAPPED_DATA_SA_LEN`] = 60 bytes, big-endian: SPI (4), lifetime in seconds (4),
/// the version of the group key it is encrypted under (4), sealed TEK (32 + 16-byte tag).
/// The nonce is `u32::MAX || group key version || SPI` (the group key encrypts nothing else,
/// and has one version per message); the associated data binds the algorithm, group id,
/// sequence number, SPI, lifetime and group key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedDataSa {
    /// The SPI of the Data SA.
    pub spi: u32,
    /// Its lifetime in seconds.
    pub lifetime_secs: u32,
    /// The version of the group key (root key) the TEK is encrypted under.
    pub group_key_version: u32,
    /// The encrypted TEK and its tag.
    pub sealed: [u8; SEALED_LEN],
}

impl WrappedDataSa {
    /// Encrypts `data_sa` under `group_key` (at `group_key_version`) for message `ctx`.
    pub fn seal(
        ctx: &RekeyContext,
        data_sa: &DataSa,
        group_key: &Key,
        group_key_version: u32,
    ) -> Self {
        let mut wrapped = Self {
            spi: data_sa.spi,
            lifetime_secs: data_sa.lifetime_secs,
            group_key_version,
            sealed: [0; SEALED_LEN],
        };
        wrapped.sealed = seal_key(
            ctx.algorithm,
            group_key,
            wrapped.nonce(),
            &wrapped.associated_data(ctx),
            &data_sa.tek,
        );
        wrapped
    }

    /// Decrypts the TEK with the group key of version `group_key_version`.
    pub fn open(&self, ctx: &RekeyContext, group_key: &Key) -> Result<DataSa, WrapError> {
        let tek = open_key(
            ctx.algorithm,
            group_key,
            self.nonce(),
            &self.associated_data(ctx),
            &self.sealed,
        )?;
        Ok(DataSa {
            spi: self.spi,
            lifetime_secs: self.lifetime_secs,
            tek,
        })
    }

    /// The 60-byte encoding.
    pub fn to_bytes(&self) -> [u8; WRAPPED_DATA_SA_LEN] {
        let mut bytes = [0u8; WRAPPED_DATA_SA_LEN];
        bytes[0..4].copy_from_slice(&self.spi.to_be_bytes());
        bytes[4..8].copy_from_slice(&self.lifetime_secs.to_be_bytes());
        bytes[8..12].copy_from_slice(&self.group_key_version.to_be_bytes());
        bytes[12..].copy_from_slice(&self.sealed);
        bytes
    }

    /// Parses exactly [`WRAPPED_DATA_SA_LEN`] bytes; any other length is an error.
    pub fn parse(bytes: &[u8]) -> Result<Self, WrapError> {
        let bytes: &[u8; WRAPPED_DATA_SA_LEN] = bytes
            .try_into()
            .map_err(|_| WrapError::Length(bytes.len()))?;
        let u32_at = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut sealed = [0u8; SEALED_LEN];
        sealed.copy_from_slice(&bytes[12..]);
        Ok(Self {
            spi: u32_at(0),
            lifetime_secs: u32_at(4),
            group_key_version: u32_at(8),
            sealed,
        })
    }

    fn nonce(&self) -> [u8; 12] {
        nonce(NO_NODE, self.group_key_version, self.spi)
    }

    fn associated_data(&self, ctx: &RekeyContext) -> [u8; crate::lkh::wrap::AAD_LEN] {
        associated_data(
            ctx,
            Domain::DataSa,
            [
                self.spi,
                self.lifetime_secs,
                self.group_key_version,
                NO_NODE,
            ],
        )
    }
}

/// The datagram MAC key of message `seq` of group `group_id`, derived from `previous_group_key`,
/// the group key that message `seq - 1` produced (for the first message, the tree's initial
/// group key). See the module documentation for what this key can and cannot stop.
pub fn datagram_mac_key(previous_group_key: &Key, group_id: u32, seq: u64) -> MacKey {
    let mut material = [0u8; 32 + 4 + 8];
    material[..32].copy_from_slice(previous_group_key.as_bytes());
    material[32..36].copy_from_slice(&group_id.to_be_bytes());
    material[36..].copy_from_slice(&seq.to_be_bytes());
    let key = MacKey::from_bytes(blake3::derive_key(MAC_KEY_CONTEXT, &material));
    zeroize::Zeroize::zeroize(&mut material);
    key
}

mod verifying_key_bytes {
    use ed25519_dalek::VerifyingKey;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(key: &VerifyingKey, s: S) -> Result<S::Ok, S::Error> {
        key.to_bytes().serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VerifyingKey, D::Error> {
        let bytes = <[u8; 32]>::deserialize(d)?;
        VerifyingKey::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RekeyContext {
        RekeyContext {
            algorithm: WrapAlgorithm::Aes256Gcm,
            group_id: 3,
            seq: 9,
        }
    }

    fn data_sa() -> DataSa {
        DataSa {
            spi: 77,
            lifetime_secs: 3600,
            tek: Key::from_bytes([5; 32]),
        }
    }

    #[test]
    fn data_sa_round_trip_and_layout() {
        let group_key = Key::from_bytes([1; 32]);
        let wrapped = WrappedDataSa::seal(&ctx(), &data_sa(), &group_key, 12);
        let bytes = wrapped.to_bytes();
        assert_eq!(&bytes[..12], &[0, 0, 0, 77, 0, 0, 0x0e, 0x10, 0, 0, 0, 12]);
        let parsed = WrappedDataSa::parse(&bytes).unwrap();
        assert_eq!(parsed, wrapped);
        assert_eq!(parsed.open(&ctx(), &group_key).unwrap(), data_sa());
        assert!(WrappedDataSa::parse(&bytes[..59]).is_err());
    }

    #[test]
    fn data_sa_bit_flips_and_wrong_context_fail() {
        let group_key = Key::from_bytes([1; 32]);
        let bytes = WrappedDataSa::seal(&ctx(), &data_sa(), &group_key, 12).to_bytes();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let parsed = WrappedDataSa::parse(&flipped).unwrap();
            assert!(parsed.open(&ctx(), &group_key).is_err(), "bit {bit}");
        }
        let parsed = WrappedDataSa::parse(&bytes).unwrap();
        let later = RekeyContext { seq: 10, ..ctx() };
        assert!(parsed.open(&later, &group_key).is_err());
    }

    #[test]
    fn mac_keys_differ_by_group_key_group_and_sequence() {
        let a = datagram_mac_key(&Key::from_bytes([1; 32]), 1, 5);
        assert_eq!(a, datagram_mac_key(&Key::from_bytes([1; 32]), 1, 5));
        assert_ne!(a, datagram_mac_key(&Key::from_bytes([2; 32]), 1, 5));
        assert_ne!(a, datagram_mac_key(&Key::from_bytes([1; 32]), 2, 5));
        assert_ne!(a, datagram_mac_key(&Key::from_bytes([1; 32]), 1, 6));
    }

    #[test]
    fn algorithm_ids() {
        assert_eq!(WrapAlgorithm::from_id(1), Ok(WrapAlgorithm::Aes256Gcm));
        assert_eq!(WrapAlgorithm::from_id(2), Ok(WrapAlgorithm::Aes256Kwp));
        assert_eq!(WrapAlgorithm::from_id(3), Err(UnknownAlgorithm(3)));
        assert_eq!(WrapAlgorithm::Aes256Gcm.id(), 1);
        assert_eq!(WrapAlgorithm::Aes256Kwp.id(), 2);
    }
}
