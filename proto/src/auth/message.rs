//! The last stages of the verifier pipeline: the manifest's signature, once per sequence
//! number, then the member's own chunk.
//!
//! [`MessageVerifier`] is fed objects that came out of MAC-checked datagrams (FEC-decoded or
//! taken straight from a source symbol) and returns [`Verified`] manifests and chunks. It
//! bounds what an insider can make it do (DESIGN.md, security rules): a valid manifest is
//! checked once per sequence number and then cached, and failed signature checks per sequence
//! number are capped, so a current member sending valid-MAC garbage cannot make others verify
//! signatures without bound. Every check made and failed is counted.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, VerifyingKey};

use super::{merkle, verify_manifest, AuthError, Verified};
use crate::session::chunk::{
    self, Authenticator, ChunkError, ChunkHeader, GroupPosition, SignedChunk,
};
use crate::session::manifest::{Manifest, ManifestError, SignedManifest, SIGNATURE_LEN};

/// Default cap on failed signature checks per sequence number.
pub const DEFAULT_SIGNATURE_FAILURE_CAP: u32 = 4;
/// How many sequence numbers' state (verified manifest, failure count) is kept.
pub const TRACKED_MESSAGES: usize = 8;

/// A member's chunk whose authenticity has been checked against a verified manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The chunk's header.
    pub header: ChunkHeader,
    /// The chunk's payload (the wrapped keys the message layout put there).
    pub payload: Vec<u8>,
}

/// Why a manifest or chunk was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageReject {
    /// The manifest's bytes do not parse.
    #[error("malformed manifest: {0}")]
    MalformedManifest(ManifestError),
    /// The manifest names another group, SA or sequence number than the datagram it came in.
    #[error("manifest does not match its datagram")]
    ManifestMismatch,
    /// The manifest's epoch is older than one already accepted.
    #[error("manifest from an older epoch")]
    OldEpoch,
    /// A signature check failed.
    #[error("bad signature")]
    BadSignature,
    /// Too many signature checks failed for this sequence number: no more are made.
    #[error("signature failure cap reached for sequence number {0}")]
    FailureCapReached(u64),
    /// The chunk's bytes do not parse.
    #[error("malformed chunk: {0}")]
    MalformedChunk(ChunkError),
    /// The chunk names another message or an index beyond the manifest's chunk count.
    #[error("chunk does not belong to its manifest")]
    ChunkMismatch,
    /// The chunk's Merkle path does not lead to the manifest's root, or (signature groups) has
    /// another length than the chunk's place in its group gives.
    #[error("bad Merkle path")]
    BadMerklePath,
}

/// Counts of signature and chunk checks, made and failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageCounters {
    /// Ed25519 verifications performed (manifests and chunk signatures).
    pub signature_checks: u64,
    /// Of those, how many failed.
    pub signature_failures: u64,
    /// Manifests verified (one per sequence number).
    pub manifests_verified: u64,
    /// Manifests answered from the cache, with no signature check.
    pub manifests_cached: u64,
    /// Manifests rejected before any signature check (malformed, mismatched, old epoch).
    pub manifests_rejected_unchecked: u64,
    /// Objects refused because the failure cap of their sequence number was reached.
    pub over_failure_cap: u64,
    /// Chunks verified.
    pub chunks_verified: u64,
    /// Chunks rejected (malformed, mismatched, bad path or signature).
    pub chunks_rejected: u64,
}

/// Whether the per-sequence failure cap applies to a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cap {
    /// Multicast traffic: the cap applies.
    Enforced,
    /// Fetched by the member itself from a resync endpoint: it does not.
    Exempt,
}

#[derive(Debug, Default)]
struct MessageState {
    manifest: Option<Verified<Manifest>>,
    /// The signed bytes the cached manifest was verified from.
    manifest_bytes: Vec<u8>,
    signature_failures: u32,
}

/// Verifies manifests and chunks for one group under the GCKS's public key.
#[derive(Debug)]
pub struct MessageVerifier {
    gcks_key: VerifyingKey,
    group_id: u32,
    spi: u32,
    epoch: u32,
    failure_cap: u32,
    messages: BTreeMap<u64, MessageState>,
    counters: MessageCounters,
}

impl MessageVerifier {
    /// A verifier for a group's messages, starting at `epoch`.
    pub fn new(gcks_key: VerifyingKey, group_id: u32, spi: u32, epoch: u32) -> Self {
        Self {
            gcks_key,
            group_id,
            spi,
            epoch,
            failure_cap: DEFAULT_SIGNATURE_FAILURE_CAP,
            messages: BTreeMap::new(),
            counters: MessageCounters::default(),
        }
    }

    /// Sets the cap on failed signature checks per sequence number.
    pub fn set_failure_cap(&mut self, cap: u32) {
        self.failure_cap = cap;
    }

    /// The counters so far.
    pub fn counters(&self) -> &MessageCounters {
        &self.counters
    }

    /// The verified manifest of `seq`, if one was accepted and is still tracked.
    pub fn manifest(&self, seq: u64) -> Option<&Verified<Manifest>> {
        self.messages
            .get(&seq)
            .and_then(|state| state.manifest.as_ref())
    }

    /// Verifies the manifest bytes that arrived in a datagram of sequence number `seq`. A
    /// manifest already verified for `seq` is answered from the cache with no signature check.
    pub fn verify_manifest(
        &mut self,
        seq: u64,
        bytes: &[u8],
    ) -> Result<&Verified<Manifest>, MessageReject> {
        self.verify_manifest_inner(seq, bytes, Cap::Enforced)
    }

    /// [`Self::verify_manifest`] for a manifest the member fetched itself from a resync
    /// endpoint it chose: the per-sequence failure cap, which bounds what multicast insiders
    /// can make a member verify, does not apply (the member makes one request per item, so it
    /// bounds that work itself), or an insider's garbage would lock it out of the message for
    /// good. Checks and failures are still counted.
    pub fn verify_manifest_fetched(
        &mut self,
        seq: u64,
        bytes: &[u8],
    ) -> Result<&Verified<Manifest>, MessageReject> {
        self.verify_manifest_inner(seq, bytes, Cap::Exempt)
    }

    /// Whether failed signature checks for `seq` reached the cap: multicast can no longer
    /// deliver that message to this member, only a fetch can.
    pub fn is_capped(&self, seq: u64) -> bool {
        self.over_cap(seq)
    }

    fn verify_manifest_inner(
        &mut self,
        seq: u64,
        bytes: &[u8],
        cap: Cap,
    ) -> Result<&Verified<Manifest>, MessageReject> {
        let cached = self
            .messages
            .get(&seq)
            .is_some_and(|s| s.manifest.is_some() && s.manifest_bytes == bytes);
        if cached {
            self.counters.manifests_cached += 1;
        } else {
            self.check_new_manifest(seq, bytes, cap)?;
        }
        self.manifest(seq).ok_or(MessageReject::ManifestMismatch)
    }

    fn check_new_manifest(
        &mut self,
        seq: u64,
        bytes: &[u8],
        cap: Cap,
    ) -> Result<(), MessageReject> {
        if cap == Cap::Enforced && self.over_cap(seq) {
            self.counters.over_failure_cap += 1;
            return Err(MessageReject::FailureCapReached(seq));
        }
        let signed = match SignedManifest::parse(bytes) {
            Ok(signed) => signed,
            Err(error) => {
                self.counters.manifests_rejected_unchecked += 1;
                return Err(MessageReject::MalformedManifest(error));
            }
        };
        let manifest = &signed.manifest;
        if manifest.group_id != self.group_id || manifest.spi != self.spi || manifest.seq != seq {
            self.counters.manifests_rejected_unchecked += 1;
            return Err(MessageReject::ManifestMismatch);
        }
        if manifest.epoch < self.epoch {
            self.counters.manifests_rejected_unchecked += 1;
            return Err(MessageReject::OldEpoch);
        }
        self.counters.signature_checks += 1;
        match verify_manifest(&self.gcks_key, signed) {
            Ok(verified) => {
                self.counters.manifests_verified += 1;
                self.epoch = self.epoch.max(verified.epoch);
                let state = self.state(seq);
                state.manifest = Some(verified);
                state.manifest_bytes = bytes.to_vec();
                Ok(())
            }
            Err(AuthError::BadSignature) => {
                self.record_signature_failure(seq);
                Err(MessageReject::BadSignature)
            }
        }
    }

    /// Verifies a chunk of the message whose manifest is `manifest`.
    pub fn verify_chunk(
        &mut self,
        manifest: &Verified<Manifest>,
        bytes: &[u8],
    ) -> Result<Verified<Chunk>, MessageReject> {
        self.verify_chunk_inner(manifest, bytes, Cap::Enforced)
    }

    /// [`Self::verify_chunk`] for a chunk the member fetched itself from a resync endpoint:
    /// exempt from the failure cap, like [`Self::verify_manifest_fetched`].
    pub fn verify_chunk_fetched(
        &mut self,
        manifest: &Verified<Manifest>,
        bytes: &[u8],
    ) -> Result<Verified<Chunk>, MessageReject> {
        self.verify_chunk_inner(manifest, bytes, Cap::Exempt)
    }

    fn verify_chunk_inner(
        &mut self,
        manifest: &Verified<Manifest>,
        bytes: &[u8],
        cap: Cap,
    ) -> Result<Verified<Chunk>, MessageReject> {
        let outcome = self.check_chunk(manifest, bytes, cap);
        match &outcome {
            Ok(_) => self.counters.chunks_verified += 1,
            Err(_) => self.counters.chunks_rejected += 1,
        }
        outcome
    }

    fn check_chunk(
        &mut self,
        manifest: &Verified<Manifest>,
        bytes: &[u8],
        cap: Cap,
    ) -> Result<Verified<Chunk>, MessageReject> {
        let signed = SignedChunk::parse(bytes, manifest.chunk_auth)
            .map_err(MessageReject::MalformedChunk)?;
        if signed.header.seq != manifest.seq || signed.header.index >= manifest.chunk_count {
            return Err(MessageReject::ChunkMismatch);
        }
        match &signed.authenticator {
            Authenticator::MerklePath(path) => {
                // The chunk index is below chunk_count (a u32), checked above.
                let index = signed.header.index as usize;
                let count = manifest.chunk_count as usize;
                if !merkle::verify(
                    &manifest.chunk_root,
                    count,
                    index,
                    signed.authenticated,
                    path,
                ) {
                    return Err(MessageReject::BadMerklePath);
                }
            }
            Authenticator::Signature(signature) => {
                let message = chunk::signed_message(signed.authenticated);
                self.check_chunk_signature(manifest.seq, &message, signature, cap)?;
            }
            Authenticator::GroupSignature {
                log2_group,
                path,
                signature,
            } => {
                // The group's shape comes from the index and the verified chunk count; the
                // path must have exactly the length it gives, or no signature is checked.
                let group =
                    GroupPosition::of(signed.header.index, manifest.chunk_count, *log2_group)
                        .ok_or(MessageReject::ChunkMismatch)?;
                let root = merkle::root_from_path(
                    group.len as usize,
                    group.position as usize,
                    signed.authenticated,
                    path,
                )
                .ok_or(MessageReject::BadMerklePath)?;
                let message = chunk::group_signed_message(
                    manifest.seq,
                    *log2_group,
                    group.group,
                    group.len,
                    &root,
                );
                self.check_chunk_signature(manifest.seq, &message, signature, cap)?;
            }
        }
        Ok(Verified(Chunk {
            header: signed.header,
            payload: signed.payload.to_vec(),
        }))
    }

    /// One signature check over `message` for a chunk of `seq`, under the failure cap.
    fn check_chunk_signature(
        &mut self,
        seq: u64,
        message: &[u8],
        signature: &[u8; SIGNATURE_LEN],
        cap: Cap,
    ) -> Result<(), MessageReject> {
        if cap == Cap::Enforced && self.over_cap(seq) {
            self.counters.over_failure_cap += 1;
            return Err(MessageReject::FailureCapReached(seq));
        }
        self.counters.signature_checks += 1;
        let signature = Signature::from_bytes(signature);
        if self.gcks_key.verify_strict(message, &signature).is_err() {
            self.record_signature_failure(seq);
            return Err(MessageReject::BadSignature);
        }
        Ok(())
    }

    fn over_cap(&self, seq: u64) -> bool {
        self.messages
            .get(&seq)
            .is_some_and(|state| state.signature_failures >= self.failure_cap)
    }

    fn record_signature_failure(&mut self, seq: u64) {
        self.counters.signature_failures += 1;
        self.state(seq).signature_failures += 1;
    }

    /// The state of `seq`, created if needed; the oldest states beyond [`TRACKED_MESSAGES`]
    /// are forgotten (a forgotten sequence number is stale for the datagram verifier by then).
    fn state(&mut self, seq: u64) -> &mut MessageState {
        if !self.messages.contains_key(&seq) {
            while self.messages.len() >= TRACKED_MESSAGES {
                self.messages.pop_first();
            }
        }
        self.messages.entry(seq).or_default()
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::auth::merkle::MerkleTree;
    use crate::session::chunk::{authenticate_groups, encode_authenticated, finish, sign};
    use crate::session::manifest::ChunkAuth;

    const SYMBOL: usize = 256;
    /// Groups of 4 chunks in the tests' group-signature messages.
    const GROUP_LOG2: u8 = 2;

    struct Message {
        manifest: Vec<u8>,
        chunks: Vec<Vec<u8>>,
    }

    fn gcks() -> SigningKey {
        SigningKey::from_bytes(&[11; 32])
    }

    fn message(seq: u64, auth: ChunkAuth, chunk_count: u32) -> Message {
        let key = gcks();
        let authenticated: Vec<Vec<u8>> = (0..chunk_count)
            .map(|index| {
                let header = ChunkHeader {
                    seq,
                    index,
                    first_leaf: index * 10,
                    last_leaf: index * 10 + 9,
                };
                encode_authenticated(&header, format!("payload {index}").as_bytes()).unwrap()
            })
            .collect();
        let tree = MerkleTree::build(authenticated.iter().map(Vec::as_slice)).unwrap();
        let chunks = if auth == ChunkAuth::GroupSignature {
            authenticate_groups(
                authenticated.clone(),
                0,
                chunk_count,
                seq,
                GROUP_LOG2,
                &key,
                SYMBOL,
            )
            .unwrap()
        } else {
            authenticated
                .iter()
                .enumerate()
                .map(|(index, bytes)| {
                    let authenticator = match auth {
                        ChunkAuth::Signature => Authenticator::Signature(sign(&key, bytes)),
                        _ => Authenticator::MerklePath(tree.proof(index).unwrap()),
                    };
                    finish(bytes.clone(), &authenticator, SYMBOL).unwrap()
                })
                .collect()
        };
        let manifest = Manifest {
            wrap_algorithm: 1,
            chunk_auth: auth,
            group_id: 1,
            spi: 2,
            seq,
            epoch: 0,
            group_size: chunk_count * 10,
            chunk_count,
            timestamp_us: 0,
            chunk_root: match auth {
                ChunkAuth::MerklePath => tree.root(),
                _ => [0; 16],
            },
            fec_info: vec![1; 12],
            block_first_keys: vec![0],
        }
        .sign(&key)
        .unwrap();
        Message { manifest, chunks }
    }

    fn verifier() -> MessageVerifier {
        MessageVerifier::new(gcks().verifying_key(), 1, 2, 0)
    }

    #[test]
    fn merkle_message_costs_one_signature_check_whatever_the_chunks() {
        let message = message(5, ChunkAuth::MerklePath, 40);
        let mut verifier = verifier();
        for chunk in &message.chunks {
            let manifest = verifier
                .verify_manifest(5, &message.manifest)
                .unwrap()
                .clone();
            let verified = verifier.verify_chunk(&manifest, chunk).unwrap();
            assert_eq!(verified.header.seq, 5);
        }
        let counters = verifier.counters();
        assert_eq!(counters.signature_checks, 1);
        assert_eq!(counters.manifests_cached, 39);
        assert_eq!(counters.chunks_verified, 40);
    }

    #[test]
    fn signed_chunks_cost_one_check_each() {
        let message = message(5, ChunkAuth::Signature, 3);
        let mut verifier = verifier();
        let manifest = verifier
            .verify_manifest(5, &message.manifest)
            .unwrap()
            .clone();
        let chunk = verifier
            .verify_chunk(&manifest, &message.chunks[1])
            .unwrap();
        assert_eq!(chunk.header.index, 1);
        assert_eq!(verifier.counters().signature_checks, 2);
    }

    #[test]
    fn a_bad_manifest_signature_is_rejected_and_counted_once() {
        let message = message(5, ChunkAuth::MerklePath, 4);
        let mut bad = message.manifest.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let mut verifier = verifier();
        assert_eq!(
            verifier.verify_manifest(5, &bad).err(),
            Some(MessageReject::BadSignature)
        );
        assert_eq!(verifier.counters().signature_checks, 1);
        assert_eq!(verifier.counters().signature_failures, 1);
        assert!(verifier.manifest(5).is_none());
        // The good one still verifies afterwards.
        assert!(verifier.verify_manifest(5, &message.manifest).is_ok());
    }

    #[test]
    fn signature_failures_are_capped_per_sequence_number() {
        let message = message(5, ChunkAuth::MerklePath, 4);
        let mut verifier = verifier();
        for attempt in 0..100u8 {
            let mut bad = message.manifest.clone();
            let last = bad.len() - 1;
            bad[last] ^= attempt | 1;
            assert!(verifier.verify_manifest(5, &bad).is_err());
        }
        assert_eq!(
            verifier.counters().signature_checks,
            u64::from(DEFAULT_SIGNATURE_FAILURE_CAP)
        );
        assert_eq!(verifier.counters().over_failure_cap, 96);
        // Another sequence number has its own budget.
        let other = message_for(6);
        assert!(verifier.verify_manifest(6, &other).is_ok());
    }

    fn message_for(seq: u64) -> Vec<u8> {
        message(seq, ChunkAuth::MerklePath, 2).manifest
    }

    #[test]
    fn mismatched_manifests_cost_no_signature_check() {
        let message = message(5, ChunkAuth::MerklePath, 4);
        let mut verifier = verifier();
        assert_eq!(
            verifier.verify_manifest(6, &message.manifest).err(),
            Some(MessageReject::ManifestMismatch)
        );
        let mut other_group = MessageVerifier::new(gcks().verifying_key(), 9, 2, 0);
        assert!(other_group.verify_manifest(5, &message.manifest).is_err());
        assert_eq!(verifier.counters().signature_checks, 0);
        assert_eq!(other_group.counters().signature_checks, 0);
    }

    #[test]
    fn tampered_chunks_are_rejected() {
        let message = message(5, ChunkAuth::MerklePath, 8);
        let mut verifier = verifier();
        let manifest = verifier
            .verify_manifest(5, &message.manifest)
            .unwrap()
            .clone();
        for byte in 0..chunk::HEADER_LEN + 9 {
            let mut tampered = message.chunks[3].clone();
            tampered[byte] ^= 0x10;
            assert!(
                verifier.verify_chunk(&manifest, &tampered).is_err(),
                "byte {byte}"
            );
        }
        // A chunk of another message under this manifest.
        let other = self::message(6, ChunkAuth::MerklePath, 8);
        assert_eq!(
            verifier.verify_chunk(&manifest, &other.chunks[3]).err(),
            Some(MessageReject::ChunkMismatch)
        );
        assert_eq!(verifier.counters().chunks_verified, 0);
    }

    #[test]
    fn an_older_epoch_is_refused() {
        let message = message(5, ChunkAuth::MerklePath, 2);
        let mut verifier = MessageVerifier::new(gcks().verifying_key(), 1, 2, 1);
        assert_eq!(
            verifier.verify_manifest(5, &message.manifest).err(),
            Some(MessageReject::OldEpoch)
        );
        assert_eq!(verifier.counters().signature_checks, 0);
    }

    /// Parses `bytes` as a group-signed chunk and gives its parts.
    fn group_parts(bytes: &[u8]) -> (u8, Vec<crate::auth::merkle::Digest>, [u8; 64]) {
        match SignedChunk::parse(bytes, ChunkAuth::GroupSignature)
            .unwrap()
            .authenticator
        {
            Authenticator::GroupSignature {
                log2_group,
                path,
                signature,
            } => (log2_group, path, signature),
            other => panic!("not a group authenticator: {other:?}"),
        }
    }

    /// Rebuilds chunk `bytes` with another authenticator (its authenticated bytes kept).
    fn reauthenticated(bytes: &[u8], authenticator: &Authenticator) -> Vec<u8> {
        let parsed = SignedChunk::parse(bytes, ChunkAuth::GroupSignature).unwrap();
        finish(parsed.authenticated.to_vec(), authenticator, SYMBOL).unwrap()
    }

    #[test]
    fn every_group_signed_chunk_verifies_with_two_signature_checks() {
        // 11 chunks in groups of 4: two full groups and a short last one of 3.
        let message = message(5, ChunkAuth::GroupSignature, 11);
        for (index, chunk) in message.chunks.iter().enumerate() {
            let mut verifier = verifier();
            let manifest = verifier
                .verify_manifest(5, &message.manifest)
                .unwrap()
                .clone();
            let verified = verifier.verify_chunk(&manifest, chunk).unwrap();
            assert_eq!(verified.header.index as usize, index);
            assert_eq!(verifier.counters().signature_checks, 2);
        }
        // Chunks of one group share its signature; groups do not.
        let signature = |index: usize| group_parts(&message.chunks[index]).2;
        assert_eq!(signature(0), signature(3));
        assert_ne!(signature(3), signature(4));
        // The short last group's paths fit its 3 chunks.
        assert_eq!(group_parts(&message.chunks[10]).1.len(), 1);
        assert_eq!(group_parts(&message.chunks[8]).1.len(), 2);
    }

    #[test]
    fn group_attacks_get_typed_errors() {
        let message = message(5, ChunkAuth::GroupSignature, 11);
        let mut verifier = verifier();
        let manifest = verifier
            .verify_manifest(5, &message.manifest)
            .unwrap()
            .clone();
        let (log2_group, path1, signature) = group_parts(&message.chunks[1]);
        let (_, path2, _) = group_parts(&message.chunks[2]);

        // A valid signature with the path of another chunk of its group: the path leads to
        // another root, and the group's signature does not cover it.
        let swapped = reauthenticated(
            &message.chunks[1],
            &Authenticator::GroupSignature {
                log2_group,
                path: path2.clone(),
                signature,
            },
        );
        assert_eq!(
            verifier.verify_chunk(&manifest, &swapped).err(),
            Some(MessageReject::BadSignature)
        );
        // A truncated path: rejected before any signature check.
        let checks = verifier.counters().signature_checks;
        let truncated = reauthenticated(
            &message.chunks[1],
            &Authenticator::GroupSignature {
                log2_group,
                path: path1[..1].to_vec(),
                signature,
            },
        );
        assert_eq!(
            verifier.verify_chunk(&manifest, &truncated).err(),
            Some(MessageReject::BadMerklePath)
        );
        // A path hash changed.
        let mut flipped = path1.clone();
        flipped[0][3] ^= 1;
        let flipped = reauthenticated(
            &message.chunks[1],
            &Authenticator::GroupSignature {
                log2_group,
                path: flipped,
                signature,
            },
        );
        assert_eq!(
            verifier.verify_chunk(&manifest, &flipped).err(),
            Some(MessageReject::BadSignature)
        );
        // Another grouping claimed (groups of 2): the path has the length a group of 2 gives,
        // but the signature was made over groups of 4.
        let regrouped = reauthenticated(
            &message.chunks[1],
            &Authenticator::GroupSignature {
                log2_group: 1,
                path: path1[..1].to_vec(),
                signature,
            },
        );
        assert_eq!(
            verifier.verify_chunk(&manifest, &regrouped).err(),
            Some(MessageReject::BadSignature)
        );
        // The signature of another group.
        let (_, _, other_signature) = group_parts(&message.chunks[5]);
        let other_group = reauthenticated(
            &message.chunks[1],
            &Authenticator::GroupSignature {
                log2_group,
                path: path1.clone(),
                signature: other_signature,
            },
        );
        assert_eq!(
            verifier.verify_chunk(&manifest, &other_group).err(),
            Some(MessageReject::BadSignature)
        );
        assert_eq!(verifier.counters().signature_checks, checks + 3);

        // The chunk's index changed in its header: its leaf hashes differently.
        let mut wrong_index = message.chunks[1].clone();
        wrong_index[11] = 2;
        let mut budget = verifier_with_cap(100);
        let manifest = budget
            .verify_manifest(5, &message.manifest)
            .unwrap()
            .clone();
        assert_eq!(
            budget.verify_chunk(&manifest, &wrong_index).err(),
            Some(MessageReject::BadSignature)
        );
        // An index past the message's chunks costs no signature check.
        let mut past_end = message.chunks[1].clone();
        past_end[11] = 11;
        let checks = budget.counters().signature_checks;
        assert_eq!(
            budget.verify_chunk(&manifest, &past_end).err(),
            Some(MessageReject::ChunkMismatch)
        );
        // A path longer than the group allows does not parse.
        let mut long = message.chunks[1].clone();
        let parsed = SignedChunk::parse(&message.chunks[1], ChunkAuth::GroupSignature).unwrap();
        long[parsed.authenticated.len() + 1] = log2_group + 1;
        assert!(matches!(
            budget.verify_chunk(&manifest, &long).err(),
            Some(MessageReject::MalformedChunk(_))
        ));
        // A group size beyond the index's 32 bits does not parse.
        let mut huge = message.chunks[1].clone();
        huge[parsed.authenticated.len()] = 40;
        assert_eq!(
            budget.verify_chunk(&manifest, &huge).err(),
            Some(MessageReject::MalformedChunk(ChunkError::InvalidField(
                "group size"
            )))
        );
        assert_eq!(budget.counters().signature_checks, checks);
        assert_eq!(budget.counters().chunks_verified, 0);
    }

    #[test]
    fn group_signature_failures_count_toward_the_cap() {
        let message = message(5, ChunkAuth::GroupSignature, 8);
        let mut verifier = verifier();
        let manifest = verifier
            .verify_manifest(5, &message.manifest)
            .unwrap()
            .clone();
        let (log2_group, path, _) = group_parts(&message.chunks[0]);
        for attempt in 0..20u8 {
            let forged = reauthenticated(
                &message.chunks[0],
                &Authenticator::GroupSignature {
                    log2_group,
                    path: path.clone(),
                    signature: [attempt; 64],
                },
            );
            assert!(verifier.verify_chunk(&manifest, &forged).is_err());
        }
        // One manifest check, then the cap's worth of failed chunk checks.
        assert_eq!(
            verifier.counters().signature_checks,
            1 + u64::from(DEFAULT_SIGNATURE_FAILURE_CAP)
        );
    }

    #[test]
    fn a_group_signature_is_bound_to_its_message() {
        // The same chunk bytes cannot be moved to another sequence number: the header carries
        // the sequence number, and the group signature covers it too.
        let five = message(5, ChunkAuth::GroupSignature, 4);
        let six = message(6, ChunkAuth::GroupSignature, 4);
        let mut verifier = verifier();
        let manifest = verifier.verify_manifest(6, &six.manifest).unwrap().clone();
        assert_eq!(
            verifier.verify_chunk(&manifest, &five.chunks[0]).err(),
            Some(MessageReject::ChunkMismatch)
        );
        let (log2_group, path, _) = group_parts(&six.chunks[0]);
        let (_, _, signature_of_five) = group_parts(&five.chunks[0]);
        let moved = reauthenticated(
            &six.chunks[0],
            &Authenticator::GroupSignature {
                log2_group,
                path,
                signature: signature_of_five,
            },
        );
        assert_eq!(
            verifier.verify_chunk(&manifest, &moved).err(),
            Some(MessageReject::BadSignature)
        );
    }

    fn verifier_with_cap(cap: u32) -> MessageVerifier {
        let mut verifier = verifier();
        verifier.set_failure_cap(cap);
        verifier
    }
}
