//! Saving and loading the key tree, so that a restarted GCKS continues with the same keys and
//! sequence numbers and no member has to re-register (DESIGN.md, persistence).
//!
//! # File format
//!
//! ```text
//! magic "RKLKHSN1" (8 bytes) | BLAKE3 hash of the body (32 bytes) | body (postcard)
//! ```
//!
//! The body is the tree's state in `postcard` (a compact serde format). The hash catches
//! corruption; a body that hashes right is still checked against every invariant of the tree
//! before it is accepted, so a file from a buggy or hostile writer cannot build an
//! inconsistent tree. The file holds every key of the group in the clear: it is created with
//! mode 0600, and protecting it is the operator's job.
//!
//! Saving writes a temporary file beside the target, fsyncs it, renames it over the target and
//! fsyncs the directory, so a crash leaves the old snapshot or the new one, never a mix.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::topology::{NodeId, ROOT};
use super::tree::{KeyRng, KeyTree, Kind, LkhError, MemberId};
use super::Key;
use crate::auth::mac::MacKey;
use crate::gsa::{DataSa, DataSaTiming, RekeySa};

/// The first bytes of a snapshot file.
pub const MAGIC: &[u8; 8] = b"RKLKHSN1";

/// Why a snapshot could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot I/O")]
    Io(#[from] std::io::Error),
    /// The file does not start with the snapshot magic number.
    #[error("not a key tree snapshot (bad magic)")]
    BadMagic,
    /// The body's hash does not match: the file is corrupt.
    #[error("snapshot checksum mismatch: the file is corrupt")]
    Checksum,
    /// The body does not decode.
    #[error("snapshot body does not decode")]
    Decode(#[from] postcard::Error),
    /// The body decodes to a state that breaks an invariant of the tree.
    #[error("inconsistent snapshot: {0}")]
    Inconsistent(&'static str),
    /// No key source for the loaded tree.
    #[error(transparent)]
    Lkh(#[from] LkhError),
}

#[derive(Serialize)]
struct BodyRef<'a> {
    sa: &'a RekeySa,
    keys: &'a [[u8; 32]],
    versions: &'a [u32],
    kinds: Vec<u8>,
    members: &'a [MemberId],
    generation: u32,
    seq: u64,
    mac_key: [u8; 32],
    next_spi: u32,
    data_sa: Option<(u32, u32, [u8; 32])>,
}

#[derive(Deserialize)]
struct Body {
    sa: RekeySa,
    keys: Vec<[u8; 32]>,
    versions: Vec<u32>,
    kinds: Vec<u8>,
    members: Vec<MemberId>,
    generation: u32,
    seq: u64,
    mac_key: [u8; 32],
    next_spi: u32,
    data_sa: Option<(u32, u32, [u8; 32])>,
}

impl Drop for Body {
    fn drop(&mut self) {
        self.keys.zeroize();
        self.mac_key.zeroize();
        if let Some((_, _, tek)) = &mut self.data_sa {
            tek.zeroize();
        }
    }
}

impl KeyTree {
    /// The snapshot body: the tree encoded (keys included, so it zeroizes itself when
    /// dropped). A snapshot file is [`MAGIC`], the BLAKE3 hash of this body, then the body
    /// (the engine's `persist::save_tree` writes it durably); [`KeyTree::from_snapshot_bytes`]
    /// reads the whole file back.
    pub fn snapshot_body(&self) -> Result<Zeroizing<Vec<u8>>, SnapshotError> {
        let body = postcard::to_allocvec(&BodyRef {
            sa: &self.sa,
            keys: &self.keys,
            versions: &self.versions,
            kinds: self.kinds.iter().map(|&kind| kind as u8).collect(),
            members: &self.members,
            generation: self.generation,
            seq: self.seq,
            mac_key: *self.mac_key.as_bytes(),
            next_spi: self.next_spi,
            data_sa: self
                .data_sa
                .as_ref()
                .map(|sa| (sa.spi, sa.lifetime_secs, *sa.tek.as_bytes())),
        })?;
        Ok(Zeroizing::new(body))
    }

    /// Decodes and checks a snapshot's bytes.
    pub fn from_snapshot_bytes(bytes: &[u8], rng: KeyRng) -> Result<Self, SnapshotError> {
        if bytes.len() < MAGIC.len() + 32 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let (hash, body) = bytes[MAGIC.len()..].split_at(32);
        if !constant_time_eq::constant_time_eq(blake3::hash(body).as_bytes(), hash) {
            return Err(SnapshotError::Checksum);
        }
        let mut body: Body = postcard::from_bytes(body)?;
        let inconsistent = SnapshotError::Inconsistent;
        let len = body.kinds.len();
        if len == 0
            || body.keys.len() != len
            || body.versions.len() != len
            || body.members.len() != len
        {
            return Err(inconsistent("array lengths"));
        }
        let degree = body.sa.degree;
        if len - 1 > degree.max_node() as usize {
            return Err(inconsistent("more nodes than the degree allows"));
        }
        let mut kinds = Vec::with_capacity(len);
        for &kind in &body.kinds {
            kinds.push(Kind::from_u8(kind).ok_or(inconsistent("node kind"))?);
        }
        if kinds[0] != Kind::Internal {
            return Err(inconsistent("root is not internal"));
        }
        let mut leaf_of = HashMap::new();
        let mut live_children = vec![0u8; len];
        for (i, &kind) in kinds.iter().enumerate() {
            let node = i as NodeId;
            if kind == Kind::Null {
                if body.keys[i] != [0; 32] {
                    return Err(inconsistent("null node with a key"));
                }
                continue;
            }
            if body.versions[i] > body.generation {
                return Err(inconsistent("version after the batch counter"));
            }
            if let Some(parent) = degree.parent(node) {
                if kinds[parent as usize] != Kind::Internal {
                    return Err(inconsistent("live node under a non-internal node"));
                }
                live_children[parent as usize] += 1;
            }
            if kind == Kind::Leaf && leaf_of.insert(body.members[i], node).is_some() {
                return Err(inconsistent("member at two leaves"));
            }
        }
        for (i, &kind) in kinds.iter().enumerate() {
            if kind == Kind::Internal && i != ROOT as usize && live_children[i] == 0 {
                return Err(inconsistent("internal node without children"));
            }
        }
        if kinds.last() == Some(&Kind::Null) {
            return Err(inconsistent("trailing null node"));
        }
        if body.versions[0] != body.generation {
            return Err(inconsistent("group key not of the latest batch"));
        }
        // The snapshot keeps no takeover delays (they are configuration: the GCKS sets them
        // again); the next SPI is the tree's own.
        let data_sa = body.data_sa.map(|(spi, lifetime_secs, tek)| DataSa {
            spi,
            lifetime_secs,
            timing: DataSaTiming::default(),
            next_spi: body.next_spi,
            tek: Key::from_bytes(tek),
        });
        if (body.generation == 0) != data_sa.is_none() {
            return Err(inconsistent("Data SA and batch counter disagree"));
        }
        Ok(KeyTree {
            sa: body.sa,
            keys: core::mem::take(&mut body.keys),
            versions: core::mem::take(&mut body.versions),
            kinds,
            members: core::mem::take(&mut body.members),
            leaf_of,
            generation: body.generation,
            seq: body.seq,
            mac_key: MacKey::from_bytes(body.mac_key),
            next_spi: body.next_spi,
            data_sa_timing: DataSaTiming::default(),
            data_sa,
            rng,
            wrap_threads: 0,
        })
    }
}
