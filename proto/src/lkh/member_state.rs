//! Saving and loading a member's keys, so that a member that restarts resumes from its keys
//! and last sequence number instead of registering again (DESIGN.md, persistence).
//!
//! # File format
//!
//! ```text
//! magic "RKMEMBR2" (8 bytes) | BLAKE3 hash of the body (32 bytes) | body (postcard)
//! ```
//!
//! The body holds the member id, the Rekey SA, the leaf, the path keys with their versions,
//! the last sequence number applied and the Data SA of that message (SPI, lifetime, takeover
//! delays, next SPI, TEK). Files of the first format (magic "RKMEMBR1", [`MAGIC_V1`]: a Data SA
//! without delays or next SPI) are still read; they are written in the current one. The datagram MAC key of
//! the next message is not stored: it is derived from the group key on load
//! ([`MemberKeys::next_mac_key`]). The hash catches corruption; a body that hashes right is
//! still checked (path length, versions, sequence number) before it is accepted. A corrupt or
//! truncated file is an error, never a fresh state.
//!
//! The file holds the member's keys in the clear: it is created with mode 0600, and
//! protecting it is the operator's job. Saving is durable (temporary file, fsync, rename,
//! fsync of the directory), so a crash leaves the old state or the new one.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::member::{MemberKeys, VersionedKey};
use super::topology::NodeId;
use super::tree::MemberId;
use super::Key;
use crate::gsa::{DataSa, DataSaTiming, RekeySa};

/// The first bytes of a member state file (the current format).
pub const MAGIC: &[u8; 8] = b"RKMEMBR2";

/// The first bytes of a member state file of the first format, still read.
pub const MAGIC_V1: &[u8; 8] = b"RKMEMBR1";

/// Why a member's state could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemberStateError {
    /// Reading or writing the file failed.
    #[error("member state I/O")]
    Io(#[from] std::io::Error),
    /// The file does not start with the member state magic number (or is shorter than its
    /// header).
    #[error("not a member state file (bad magic)")]
    BadMagic,
    /// The body's hash does not match: the file is corrupt.
    #[error("member state checksum mismatch: the file is corrupt")]
    Checksum,
    /// The body does not decode.
    #[error("member state body does not decode")]
    Decode(#[from] postcard::Error),
    /// The body decodes to a state that cannot be a member's.
    #[error("inconsistent member state: {0}")]
    Inconsistent(&'static str),
}

/// A Data SA in a state body: SPI, lifetime, activation delay, deactivation delay, next SPI,
/// TEK.
type StoredDataSa = (u32, u32, u32, u32, u32, [u8; 32]);

#[derive(Serialize, Deserialize)]
struct Body {
    member: MemberId,
    sa: RekeySa,
    leaf: NodeId,
    path: Vec<Option<(u32, [u8; 32])>>,
    last_seq: u64,
    data_sa: Option<StoredDataSa>,
}

/// The body of a [`MAGIC_V1`] file.
#[derive(Deserialize)]
struct BodyV1 {
    member: MemberId,
    sa: RekeySa,
    leaf: NodeId,
    path: Vec<Option<(u32, [u8; 32])>>,
    last_seq: u64,
    data_sa: Option<(u32, u32, [u8; 32])>,
}

impl BodyV1 {
    fn upgrade(mut self) -> Body {
        let data_sa = self
            .data_sa
            .map(|(spi, lifetime, tek)| (spi, lifetime, 0, 0, 0, tek));
        // The V1 body's own copy of the TEK is zeroized when it drops.
        Body {
            member: self.member,
            sa: self.sa,
            leaf: self.leaf,
            path: core::mem::take(&mut self.path),
            last_seq: self.last_seq,
            data_sa,
        }
    }
}

impl Drop for BodyV1 {
    fn drop(&mut self) {
        for (_, key) in self.path.iter_mut().flatten() {
            key.zeroize();
        }
        if let Some((_, _, tek)) = &mut self.data_sa {
            tek.zeroize();
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        for (_, key) in self.path.iter_mut().flatten() {
            key.zeroize();
        }
        if let Some((_, _, _, _, _, tek)) = &mut self.data_sa {
            tek.zeroize();
        }
    }
}

impl MemberKeys {
    /// The state body: the member's keys and last sequence number encoded (it zeroizes
    /// itself when dropped). A member state file is [`MAGIC`], the BLAKE3 hash of this body,
    /// then the body (the engine's `persist::save_member_keys` writes it durably, mode 0600,
    /// after every applied message); [`MemberKeys::from_state_bytes`] reads the whole file
    /// back.
    pub fn state_body(&self) -> Result<Zeroizing<Vec<u8>>, MemberStateError> {
        Ok(Zeroizing::new(postcard::to_allocvec(&self.to_body())?))
    }

    /// Decodes and checks the bytes of a member state file.
    pub fn from_state_bytes(bytes: &[u8]) -> Result<Self, MemberStateError> {
        if bytes.len() < MAGIC.len() + 32 {
            return Err(MemberStateError::BadMagic);
        }
        let magic = &bytes[..MAGIC.len()];
        if magic != MAGIC && magic != MAGIC_V1 {
            return Err(MemberStateError::BadMagic);
        }
        let (hash, body) = bytes[MAGIC.len()..].split_at(32);
        if !constant_time_eq::constant_time_eq(blake3::hash(body).as_bytes(), hash) {
            return Err(MemberStateError::Checksum);
        }
        let mut body: Body = if magic == MAGIC_V1 {
            postcard::from_bytes::<BodyV1>(body)?.upgrade()
        } else {
            postcard::from_bytes(body)?
        };
        let inconsistent = MemberStateError::Inconsistent;
        let degree = body.sa.degree;
        if body.leaf > degree.max_node() {
            return Err(inconsistent("leaf beyond the degree's largest node"));
        }
        if body.path.len() != degree.path(body.leaf).count() {
            return Err(inconsistent("path length does not match the leaf's depth"));
        }
        if !matches!(body.path.first(), Some(Some(_))) {
            return Err(inconsistent("no leaf key"));
        }
        let group_known = body.path.last().is_some_and(Option::is_some);
        if !group_known && body.path.iter().skip(1).any(Option::is_some) {
            return Err(inconsistent("path keys without a group key"));
        }
        let mut below = 0u32;
        for (version, _) in body.path.iter().flatten() {
            if *version < below {
                return Err(inconsistent("a key older than a key below it"));
            }
            below = *version;
        }
        if group_known != body.data_sa.is_some() {
            return Err(inconsistent("Data SA and group key disagree"));
        }
        if group_known && body.last_seq == 0 {
            return Err(inconsistent("group key before any message"));
        }
        if body.last_seq == u64::MAX {
            return Err(inconsistent("sequence number exhausted"));
        }
        let path = body
            .path
            .iter()
            .map(|entry| {
                entry.map(|(version, key)| VersionedKey {
                    version,
                    key: Key::from_bytes(key),
                })
            })
            .collect();
        let data_sa = body.data_sa.map(
            |(
                spi,
                lifetime_secs,
                activation_delay_secs,
                deactivation_delay_secs,
                next_spi,
                tek,
            )| {
                DataSa {
                    spi,
                    lifetime_secs,
                    timing: DataSaTiming {
                        activation_delay_secs,
                        deactivation_delay_secs,
                    },
                    next_spi,
                    tek: Key::from_bytes(tek),
                }
            },
        );
        if let Some((_, _, _, _, _, tek)) = &mut body.data_sa {
            tek.zeroize();
        }
        Ok(MemberKeys {
            member: body.member,
            sa: body.sa,
            leaf: body.leaf,
            path,
            last_seq: body.last_seq,
            data_sa,
        })
    }

    fn to_body(&self) -> Body {
        Body {
            member: self.member,
            sa: self.sa,
            leaf: self.leaf,
            path: self
                .path
                .iter()
                .map(|entry| entry.as_ref().map(|k| (k.version, *k.key.as_bytes())))
                .collect(),
            last_seq: self.last_seq,
            data_sa: self.data_sa.as_ref().map(|sa| {
                (
                    sa.spi,
                    sa.lifetime_secs,
                    sa.timing.activation_delay_secs,
                    sa.timing.deactivation_delay_secs,
                    sa.next_spi,
                    *sa.tek.as_bytes(),
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gsa::WrapAlgorithm;
    use crate::lkh::{Degree, KeyRng, KeyTree};

    fn sa() -> RekeySa {
        RekeySa {
            group_id: 9,
            spi: 0x1234,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::DEFAULT,
            gcks_public_key: ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key(),
            data_sa_lifetime_secs: 3600,
        }
    }

    /// Member 0's keys after its admitting batch (with five others) and `more` batches
    /// each removing one other member.
    fn member_after(more: u64) -> MemberKeys {
        let mut tree = KeyTree::with_rng(sa(), KeyRng::seeded_for_simulation(3));
        let joins: Vec<MemberId> = (0..6).map(MemberId).collect();
        let batch = tree.apply_batch(&joins, &[]).unwrap();
        let mut keys = MemberKeys::from_bundle(&tree.join(MemberId(0)).unwrap());
        keys.apply_wraps(batch.context.seq, &batch.wraps, &batch.wrapped_data_sa)
            .unwrap();
        for round in 0..more {
            let batch = tree.apply_batch(&[], &[MemberId(1 + round)]).unwrap();
            keys.apply_wraps(batch.context.seq, &batch.wraps, &batch.wrapped_data_sa)
                .unwrap();
        }
        keys
    }

    fn assert_same(a: &MemberKeys, b: &MemberKeys) {
        assert_eq!(a.member(), b.member());
        assert_eq!(a.rekey_sa(), b.rekey_sa());
        assert_eq!(a.leaf(), b.leaf());
        assert_eq!(a.last_seq(), b.last_seq());
        assert_eq!(a.path, b.path);
        assert_eq!(a.data_sa(), b.data_sa());
        assert_eq!(a.next_mac_key(), b.next_mac_key());
    }

    /// A member state file's bytes: the magic, the BLAKE3 hash of the body, the body (what
    /// the engine writes to disk).
    fn state_file(keys: &MemberKeys) -> Vec<u8> {
        let body = keys.state_body().unwrap();
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(blake3::hash(&body).as_bytes());
        file.extend_from_slice(&body);
        file
    }

    #[test]
    fn save_load_round_trip() {
        for more in [0, 2] {
            let keys = member_after(more);
            assert!(keys.group_key().is_some());
            let loaded = MemberKeys::from_state_bytes(&state_file(&keys)).unwrap();
            assert_same(&keys, &loaded);
            assert_eq!(loaded.last_seq(), 1 + more);
        }
    }

    #[test]
    fn loaded_keys_apply_the_next_message() {
        let mut tree = KeyTree::with_rng(sa(), KeyRng::seeded_for_simulation(5));
        let batch = tree.apply_batch(&[MemberId(0), MemberId(1)], &[]).unwrap();
        let mut keys = MemberKeys::from_bundle(&tree.join(MemberId(0)).unwrap());
        keys.apply_wraps(batch.context.seq, &batch.wraps, &batch.wrapped_data_sa)
            .unwrap();
        assert_eq!(keys.next_mac_key(), Some(tree.next_mac_key()));
        let mut loaded = MemberKeys::from_state_bytes(&state_file(&keys)).unwrap();
        let batch = tree.apply_batch(&[], &[MemberId(1)]).unwrap();
        assert_eq!(loaded.next_mac_key(), Some(batch.mac_key.clone()));
        let rekeyed = loaded
            .apply_wraps(batch.context.seq, &batch.wraps, &batch.wrapped_data_sa)
            .unwrap();
        assert_eq!(rekeyed.seq, keys.last_seq() + 1);
        assert_eq!(tree.group_key().0, rekeyed.group_key_version);
        assert_eq!(loaded.data_sa(), Some(&batch.data_sa));
    }

    #[test]
    fn a_registered_member_round_trips_too() {
        let mut tree = KeyTree::with_rng(sa(), KeyRng::seeded_for_simulation(4));
        tree.apply_batch(&[MemberId(0)], &[]).unwrap();
        let keys = MemberKeys::from_bundle(&tree.join(MemberId(0)).unwrap());
        let loaded = MemberKeys::from_state_bytes(&state_file(&keys)).unwrap();
        assert_same(&keys, &loaded);
        assert!(loaded.group_key().is_none() && loaded.next_mac_key().is_none());
    }

    #[test]
    fn first_format_files_are_still_read() {
        #[derive(Serialize)]
        struct V1<'a> {
            member: MemberId,
            sa: RekeySa,
            leaf: NodeId,
            path: &'a [Option<(u32, [u8; 32])>],
            last_seq: u64,
            data_sa: Option<(u32, u32, [u8; 32])>,
        }
        let keys = member_after(2);
        let current = keys.to_body();
        let data_sa = current
            .data_sa
            .map(|(spi, lifetime, _, _, _, tek)| (spi, lifetime, tek));
        let body = postcard::to_allocvec(&V1 {
            member: current.member,
            sa: current.sa,
            leaf: current.leaf,
            path: &current.path,
            last_seq: current.last_seq,
            data_sa,
        })
        .unwrap();
        let mut file = MAGIC_V1.to_vec();
        file.extend_from_slice(blake3::hash(&body).as_bytes());
        file.extend_from_slice(&body);
        let loaded = MemberKeys::from_state_bytes(&file).unwrap();
        let expected = keys.data_sa().unwrap();
        let got = loaded.data_sa().unwrap();
        assert_eq!(
            (got.spi, got.lifetime_secs),
            (expected.spi, expected.lifetime_secs)
        );
        assert_eq!(got.tek, expected.tek);
        assert_eq!(got.timing, DataSaTiming::default());
        assert_eq!(got.next_spi, 0);
        assert_eq!(loaded.last_seq(), keys.last_seq());
        // A current file keeps the delays and the next SPI.
        let round = MemberKeys::from_state_bytes(&state_file(&keys)).unwrap();
        assert_eq!(round.data_sa(), keys.data_sa());
    }

    #[test]
    fn corrupt_and_truncated_files_are_errors() {
        let bytes = state_file(&member_after(1));
        assert!(MemberKeys::from_state_bytes(&bytes).is_ok());
        for len in [0, 7, 8, 39] {
            assert!(matches!(
                MemberKeys::from_state_bytes(&bytes[..len]),
                Err(MemberStateError::BadMagic)
            ));
        }
        for len in [40, 41, bytes.len() / 2, bytes.len() - 1] {
            assert!(matches!(
                MemberKeys::from_state_bytes(&bytes[..len]),
                Err(MemberStateError::Checksum)
            ));
        }
        let mut magic = bytes.clone();
        magic[0] ^= 1;
        assert!(matches!(
            MemberKeys::from_state_bytes(&magic),
            Err(MemberStateError::BadMagic)
        ));
        for at in [8, 39, 40, bytes.len() - 1] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x40;
            assert!(matches!(
                MemberKeys::from_state_bytes(&flipped),
                Err(MemberStateError::Checksum)
            ));
        }
        // A snapshot of the key tree is not a member's state.
        let mut snapshot = bytes.clone();
        snapshot[..8].copy_from_slice(crate::lkh::snapshot::MAGIC);
        assert!(matches!(
            MemberKeys::from_state_bytes(&snapshot),
            Err(MemberStateError::BadMagic)
        ));
    }

    /// A body that hashes right but breaks an invariant is refused.
    #[test]
    fn inconsistent_bodies_are_refused() {
        let keys = member_after(1);
        let encode = |body: &Body| {
            let body = postcard::to_allocvec(body).unwrap();
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(blake3::hash(&body).as_bytes());
            bytes.extend_from_slice(&body);
            bytes
        };
        let refused = |edit: &dyn Fn(&mut Body)| {
            let mut body = keys.to_body();
            edit(&mut body);
            matches!(
                MemberKeys::from_state_bytes(&encode(&body)),
                Err(MemberStateError::Inconsistent(_))
            )
        };
        assert!(MemberKeys::from_state_bytes(&encode(&keys.to_body())).is_ok());
        assert!(refused(&|b| {
            b.path.pop();
        }));
        assert!(refused(&|b| b.path.push(Some((1, [0; 32])))));
        assert!(refused(&|b| b.path[0] = None));
        assert!(refused(&|b| b.leaf = u32::MAX));
        assert!(refused(&|b| {
            let last = b.path.len() - 1;
            b.path[last] = None;
        }));
        assert!(refused(&|b| {
            let last = b.path.len() - 1;
            if let Some((version, _)) = &mut b.path[last] {
                *version = 0;
            }
            if let Some((version, _)) = &mut b.path[0] {
                *version = 5;
            }
        }));
        assert!(refused(&|b| b.data_sa = None));
        assert!(refused(&|b| b.last_seq = 0));
        assert!(refused(&|b| b.last_seq = u64::MAX));
    }
}
