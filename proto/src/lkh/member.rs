//! A member's key state: its path keys and their versions, and how a rekey message updates
//! them.
//!
//! [`MemberKeys::apply`] takes the wraps of one rekey message (all of them, or only those of
//! the member's chunk) and walks its path bottom-up: for each key it holds, it looks for the
//! wrap made under exactly that key (`child`, `child_version`), decrypts the parent's new key
//! from it, and goes on with the parent. Wraps under keys it does not hold are ignored; a wrap
//! under a key it holds that fails authentication is an error. The state changes only when the
//! whole message applied, so after any error the member is as it was.
//!
//! When the GCKS split the member's leaf (the tree grew), the message holds a wrap of the old
//! leaf node's new key under the member's unchanged key at the leaf's first child: the member
//! sees it, moves its leaf down and goes on from there.

use super::topology::NodeId;
use super::tree::{MemberId, RegistrationBundle};
use super::wrap::{Wrap, WrapError};
use super::Key;
use crate::auth::mac::MacKey;
use crate::auth::message::Chunk;
use crate::auth::Verified;
use crate::gsa::{datagram_mac_key, DataSa, RekeySa, WrappedDataSa};

/// Why a rekey message could not be applied. The member's state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemberError {
    /// The message is not newer than the last one applied.
    #[error("message {seq} is not after the last one applied ({last})")]
    Stale {
        /// The message's sequence number.
        seq: u64,
        /// The last sequence number applied.
        last: u64,
    },
    /// The wraps do not lead from this member's keys to a new group key: the member was
    /// removed from the group, or the wraps of its path are missing.
    #[error("no new group key reachable from this member's keys")]
    GroupKeyNotFound,
    /// A wrap under one of this member's keys failed authentication.
    #[error("wrap of node {node} under node {child}")]
    Wrap {
        /// The wrapped node.
        node: NodeId,
        /// The wrapping child.
        child: NodeId,
        /// What failed.
        source: WrapError,
    },
    /// The verified chunk's payload does not hold wraps and a Data SA (only the GCKS, which
    /// signed it, could have made such a chunk).
    #[error("malformed chunk payload")]
    MalformedChunk,
    /// A wrap under one of this member's keys names a node that is not its parent, or an
    /// older version than the member holds.
    #[error("malformed wrap of node {node} under node {child}")]
    Malformed {
        /// The wrapped node.
        node: NodeId,
        /// The wrapping child.
        child: NodeId,
    },
    /// The Data SA is not encrypted under the new group key, or fails authentication.
    #[error("Data SA does not open under the new group key")]
    DataSa,
}

/// A key a member holds, with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedKey {
    /// The key's version.
    pub version: u32,
    /// The key.
    pub key: Key,
}

/// What a member learns from a rekey message it applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rekeyed {
    /// The message's sequence number.
    pub seq: u64,
    /// The new group key's version.
    pub group_key_version: u32,
    /// The new group key.
    pub group_key: Key,
    /// The new Data SA.
    pub data_sa: DataSa,
    /// The datagram MAC key of message `seq + 1`, derived from the new group key.
    pub next_mac_key: MacKey,
}

/// A member's path keys: its leaf key and every key it knows on the way to the root.
#[derive(Debug, Clone)]
pub struct MemberKeys {
    pub(super) member: MemberId,
    pub(super) sa: RekeySa,
    pub(super) leaf: NodeId,
    /// `path[k]` is the key of the k-th node from the leaf up (`path[0]` the leaf key, the
    /// last the group key); `None` while unknown (a joiner before its first message).
    pub(super) path: Vec<Option<VersionedKey>>,
    pub(super) last_seq: u64,
    /// The Data SA of message `last_seq`, once a message was applied.
    pub(super) data_sa: Option<DataSa>,
}

impl MemberKeys {
    /// The state of a new member from its registration bundle: its leaf key only, until
    /// message `bundle.first_seq` brings its path.
    pub fn from_bundle(bundle: &RegistrationBundle) -> Self {
        let nodes = bundle.rekey_sa.degree.path(bundle.leaf).count();
        let mut path = vec![None; nodes];
        path[0] = Some(VersionedKey {
            version: bundle.leaf_version,
            key: bundle.leaf_key.clone(),
        });
        Self {
            member: bundle.member,
            sa: bundle.rekey_sa,
            leaf: bundle.leaf,
            path,
            last_seq: bundle.first_seq.saturating_sub(1),
            data_sa: None,
        }
    }

    /// The member.
    pub fn member(&self) -> MemberId {
        self.member
    }

    /// The member's leaf (it moves down when the GCKS splits it).
    pub fn leaf(&self) -> NodeId {
        self.leaf
    }

    /// The Rekey SA.
    pub fn rekey_sa(&self) -> &RekeySa {
        &self.sa
    }

    /// Records the GCKS signing key in force after a signing-key rollover the member verified,
    /// so that keys saved from now on resume under it.
    pub(crate) fn set_gcks_public_key(&mut self, key: ed25519_dalek::VerifyingKey) {
        self.sa.gcks_public_key = key;
    }

    /// The last sequence number applied.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The group key, once known.
    pub fn group_key(&self) -> Option<&VersionedKey> {
        self.path.last().and_then(Option::as_ref)
    }

    /// The Data SA (traffic key) of message [`Self::last_seq`], once a message was applied.
    pub fn data_sa(&self) -> Option<&DataSa> {
        self.data_sa.as_ref()
    }

    /// The datagram MAC key of message `last_seq + 1`, the next one the member needs,
    /// derived from the group key; `None` before the first message is applied (the
    /// registration bundle carries that key).
    pub fn next_mac_key(&self) -> Option<MacKey> {
        let group = self.group_key()?;
        let next = self.last_seq.checked_add(1)?;
        Some(datagram_mac_key(&group.key, self.sa.group_id, next))
    }

    /// The keys the member holds, from its leaf up: `(node, version, key)`.
    pub fn path_keys(&self) -> impl Iterator<Item = (NodeId, &VersionedKey)> + '_ {
        self.sa
            .degree
            .path(self.leaf)
            .zip(self.path.iter())
            .filter_map(|(node, key)| key.as_ref().map(|key| (node, key)))
    }

    /// Applies the member's chunk of a rekey message, which only the verifier pipeline
    /// ([`crate::auth::message::MessageVerifier::verify_chunk`]) can hand out, so unverified
    /// bytes cannot reach the key state. Returns the new group key, Data SA and next MAC key;
    /// the state is unchanged on error.
    pub fn apply(&mut self, chunk: &Verified<Chunk>) -> Result<Rekeyed, MemberError> {
        let (wraps, data_sa) =
            crate::session::layout::read_payload(chunk).map_err(|_| MemberError::MalformedChunk)?;
        self.apply_wraps(chunk.header.seq, &wraps, &data_sa)
    }

    /// Applies rekey message `seq`: `wraps` are its wraps (all of them, or those of the
    /// member's chunk: see [`super::RekeyBatch::wraps_for_leaf`]), `data_sa` its Data SA.
    /// Returns the new group key, Data SA and next MAC key. The state is unchanged on error.
    ///
    /// Cost: one pass over `wraps` per level of the path, so hand it a chunk's wraps (tens),
    /// not a whole large message. Crate-internal: the public entry is [`MemberKeys::apply`],
    /// which takes only a chunk the verifier pipeline has checked.
    pub(crate) fn apply_wraps(
        &mut self,
        seq: u64,
        wraps: &[Wrap],
        data_sa: &WrappedDataSa,
    ) -> Result<Rekeyed, MemberError> {
        if seq <= self.last_seq {
            return Err(MemberError::Stale {
                seq,
                last: self.last_seq,
            });
        }
        let ctx = self.sa.context(seq);
        let degree = self.sa.degree;
        let mut leaf = self.leaf;
        let mut path = self.path.clone();

        // Splits: my key, same version, under a node of my leaf's first-child chain (one
        // batch may split the same leaf more than once when the tree grows a lot).
        if let Some(Some(mine)) = path.first() {
            let version = mine.version;
            let chain: Vec<NodeId> =
                core::iter::successors(degree.first_child(leaf), |&n| degree.first_child(n))
                    .collect();
            let moved_to = wraps
                .iter()
                .filter(|w| w.child_version == version && degree.parent(w.child) == Some(w.node))
                .filter_map(|w| chain.iter().position(|&n| n == w.child))
                .max();
            if let Some(steps) = moved_to {
                // The old leaf and the nodes between it and the new leaf are now internal
                // nodes of my path whose keys come from this message.
                let mut moved = Vec::with_capacity(path.len() + steps + 1);
                moved.push(path[0].clone());
                moved.extend(core::iter::repeat(None).take(steps + 1));
                moved.extend(path.drain(1..));
                path = moved;
                leaf = chain[steps];
            }
        }

        // Bottom-up along the path.
        let nodes: Vec<NodeId> = degree.path(leaf).collect();
        let mut root_updated = false;
        for k in 0..nodes.len() - 1 {
            let Some(held) = &path[k] else {
                continue;
            };
            let (child, version) = (nodes[k], held.version);
            let Some(wrap) = wraps
                .iter()
                .find(|w| w.child == child && w.child_version == version)
            else {
                continue;
            };
            let parent = nodes[k + 1];
            let malformed = MemberError::Malformed {
                node: wrap.node,
                child,
            };
            if wrap.node != parent {
                return Err(malformed);
            }
            if matches!(&path[k + 1], Some(old) if old.version >= wrap.version) {
                return Err(malformed);
            }
            let key = wrap
                .open(&ctx, &held.key)
                .map_err(|source| MemberError::Wrap {
                    node: wrap.node,
                    child,
                    source,
                })?;
            path[k + 1] = Some(VersionedKey {
                version: wrap.version,
                key,
            });
            root_updated = k + 1 == nodes.len() - 1;
        }
        if !root_updated {
            return Err(MemberError::GroupKeyNotFound);
        }
        let Some(Some(group)) = path.last() else {
            return Err(MemberError::GroupKeyNotFound);
        };
        if data_sa.group_key_version != group.version {
            return Err(MemberError::DataSa);
        }
        let opened = data_sa
            .open(&ctx, &group.key)
            .map_err(|_| MemberError::DataSa)?;
        let rekeyed = Rekeyed {
            seq,
            group_key_version: group.version,
            group_key: group.key.clone(),
            data_sa: opened.clone(),
            next_mac_key: datagram_mac_key(&group.key, self.sa.group_id, seq + 1),
        };
        self.leaf = leaf;
        self.path = path;
        self.last_seq = seq;
        self.data_sa = Some(opened);
        Ok(rekeyed)
    }
}
