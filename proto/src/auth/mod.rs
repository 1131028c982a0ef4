//! Authentication of rekey traffic: what a member may trust, in which order (RFC 4046 5.2).
//!
//! The verifier pipeline: length and header checks, the datagram MAC, the replay window, the
//! manifest's signature once per message, the member's own chunk. Its outputs are [`Verified`]
//! values, which only this module can construct (rustls style): code that applies keys takes a
//! `Verified<_>`, so unverified bytes cannot reach it.
//!
//! Its stages:
//!
//! - [`datagram`]: header checks, then the MAC, then the sequence window, with a counter for
//!   every rejection reason.
//! - [`heartbeat`]: per sender instance replay windows for heartbeats, and bounds on the
//!   GRTT, group size and backoff factor a heartbeat may set.
//! - [`message`]: the manifest's signature once per sequence number, then a chunk's Merkle
//!   path, its own signature, or its path in its signature group and the group's signature,
//!   with failed signature checks capped per sequence number.
//! - [`mac`]: the 16-byte BLAKE3 datagram MAC, checked before anything else.
//! - [`merkle`]: a BLAKE3 Merkle tree over a message's chunks (authenticated by the manifest's
//!   signature) or over a signature group of chunks (authenticated by the group's signature).
//! - [`verify_manifest`]: the manifest's Ed25519 signature.

use ed25519_dalek::{Signature, VerifyingKey};

use crate::session::manifest::{signed_message, Manifest, SignedManifest};

pub mod datagram;
pub mod heartbeat;
pub mod mac;
pub mod merkle;
pub mod message;

/// A value whose authenticity has been checked. Only `auth` constructs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    /// The verified value.
    pub fn get(&self) -> &T {
        &self.0
    }

    /// Consumes the wrapper. What comes out is no longer marked as verified.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> core::ops::Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Why an authentication check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The signature does not verify under the GCKS's key.
    #[error("bad signature")]
    BadSignature,
}

/// Checks a manifest's Ed25519 signature under the GCKS's public key (strict verification:
/// no malleable or small-order signatures).
pub fn verify_manifest(
    gcks_key: &VerifyingKey,
    signed: SignedManifest<'_>,
) -> Result<Verified<Manifest>, AuthError> {
    let signature = Signature::from_bytes(&signed.signature);
    gcks_key
        .verify_strict(&signed_message(signed.signed), &signature)
        .map_err(|_| AuthError::BadSignature)?;
    Ok(Verified(signed.manifest))
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::session::manifest::ChunkAuth;

    fn signed_bytes(key: &SigningKey) -> Vec<u8> {
        Manifest {
            wrap_algorithm: 1,
            chunk_auth: ChunkAuth::MerklePath,
            group_id: 1,
            spi: 1,
            seq: 10,
            epoch: 0,
            group_size: 100,
            chunk_count: 3,
            timestamp_us: 0,
            chunk_root: [1; 16],
            fec_info: vec![9; 12],
            block_first_keys: vec![0],
        }
        .sign(key)
        .unwrap()
    }

    #[test]
    fn a_good_signature_verifies() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let bytes = signed_bytes(&key);
        let verified =
            verify_manifest(&key.verifying_key(), SignedManifest::parse(&bytes).unwrap()).unwrap();
        assert_eq!(verified.seq, 10);
    }

    #[test]
    fn every_bit_flip_and_a_wrong_key_fail() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let bytes = signed_bytes(&key);
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            if let Ok(parsed) = SignedManifest::parse(&flipped) {
                assert_eq!(
                    verify_manifest(&key.verifying_key(), parsed),
                    Err(AuthError::BadSignature),
                    "bit {bit}"
                );
            }
        }
        let other = SigningKey::from_bytes(&[4; 32]).verifying_key();
        assert_eq!(
            verify_manifest(&other, SignedManifest::parse(&bytes).unwrap()),
            Err(AuthError::BadSignature)
        );
    }
}
