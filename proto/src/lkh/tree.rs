//! The GCKS's key tree and batch rekeying by the marking algorithm.
//!
//! # Layout
//!
//! Nodes live in flat arrays indexed by [`NodeId`] (the complete d-ary numbering of
//! [`super::topology`]): a 32-byte key stored inline, a `u32` version, a one-byte kind and the
//! member id of a leaf. With the member-id-to-leaf hash map this is about 100 bytes per member
//! at d = 4 (the `lkh` benchmark measures it), where a map of boxed nodes would cost several
//! times that.
//!
//! Invariants: the root is always an internal node (its key is the group key, even with no
//! member); a non-null node's parent is internal; a non-root internal node has a non-null
//! child (otherwise it is pruned to null); a null node holds a zeroed key.
//!
//! # Versions
//!
//! A key's version is the tree's batch counter at the batch that made it. A node gets at most
//! one key per batch and a leaf key that moves down when its leaf is split keeps its version,
//! so `(node, version)` names one key over the tree's whole life: that is what members match
//! wraps by, and what makes the AEAD nonces unique (see [`super::wrap`]).

use std::collections::{BinaryHeap, HashMap};

use rand::rngs::OsRng;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::topology::{Degree, NodeId, ROOT};
use super::wrap::{RekeyContext, Wrap};
use super::Key;
use crate::auth::mac::MacKey;
use crate::gsa::{datagram_mac_key, DataSa, DataSaTiming, RekeySa, WrappedDataSa};

/// A member, as the embedding product names it. Opaque to rekeycast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MemberId(pub u64);

/// What can go wrong when changing the key tree. The tree is unchanged after any error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LkhError {
    /// A leave names a member that is not in the group.
    #[error("member {0:?} is not in the group")]
    UnknownMember(MemberId),
    /// A join names a member that is already in the group (and is not leaving in the batch).
    #[error("member {0:?} is already in the group")]
    AlreadyMember(MemberId),
    /// A member appears twice among the joins or twice among the leaves.
    #[error("member {0:?} appears twice in the batch")]
    Duplicate(MemberId),
    /// The batch would take the tree past its deepest level.
    #[error("the tree cannot hold {0} members")]
    TreeFull(u64),
    /// The batch counter (key versions) or the sequence number would overflow.
    #[error("key versions or sequence numbers exhausted")]
    Exhausted,
    /// `join` asked for a member the latest batch did not admit.
    #[error("member {0:?} was not admitted by the latest batch")]
    NotJustJoined(MemberId),
    /// The operating system's random number generator failed.
    #[error("the OS random number generator failed")]
    Rng,
}

/// The source of key material: a ChaCha20 stream reseeded from the OS CSPRNG at every batch,
/// or, for tests and the simulator only, a fixed seed.
pub struct KeyRng {
    rng: ChaCha20Rng,
    reseed_from_os: bool,
}

impl KeyRng {
    /// Key material from the OS CSPRNG (`getrandom`), through a ChaCha20 stream reseeded from
    /// the OS at every batch (one system call per batch instead of one per key).
    pub fn from_os() -> Result<Self, LkhError> {
        Ok(Self {
            rng: os_seeded()?,
            reseed_from_os: true,
        })
    }

    /// **For tests and simulation only**: a deterministic stream from `seed`. Keys made this
    /// way are as predictable as the seed; a GCKS must use [`KeyRng::from_os`].
    pub fn seeded_for_simulation(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
            reseed_from_os: false,
        }
    }

    fn reseed(&mut self) -> Result<(), LkhError> {
        if self.reseed_from_os {
            self.rng = os_seeded()?;
        }
        Ok(())
    }

    fn fill(&mut self, out: &mut [u8; 32]) {
        self.rng.fill_bytes(out);
    }

    fn key(&mut self) -> Key {
        let mut key = Key::from_bytes([0; 32]);
        self.rng.fill_bytes(key.as_mut_bytes());
        key
    }
}

impl Clone for KeyRng {
    /// A copy of the stream's state: for a tree's fork ([`KeyTree::fork`]), which reseeds from
    /// the OS before its first key when the original does.
    fn clone(&self) -> Self {
        Self {
            rng: self.rng.clone(),
            reseed_from_os: self.reseed_from_os,
        }
    }
}

impl core::fmt::Debug for KeyRng {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeyRng")
            .field("reseed_from_os", &self.reseed_from_os)
            .finish_non_exhaustive()
    }
}

fn os_seeded() -> Result<ChaCha20Rng, LkhError> {
    let mut seed = [0u8; 32];
    OsRng.try_fill_bytes(&mut seed).map_err(|_| LkhError::Rng)?;
    let rng = ChaCha20Rng::from_seed(seed);
    seed.zeroize();
    Ok(rng)
}

/// The kind of a node slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Null = 0,
    Internal = 1,
    Leaf = 2,
}

impl Kind {
    pub(crate) fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Null),
            1 => Some(Self::Internal),
            2 => Some(Self::Leaf),
            _ => None,
        }
    }
}

/// The key tree of a group: a d-ary tree with a leaf per member, each node a 256-bit key with
/// a version, rekeyed in batches.
///
/// Use: [`KeyTree::new`]; then for each batch [`KeyTree::apply_batch`], persist with
/// the engine's `persist::save_tree`, hand each joiner its [`KeyTree::join`] bundle, and send the message built
/// from the returned [`RekeyBatch`].
pub struct KeyTree {
    pub(crate) sa: RekeySa,
    pub(crate) keys: Vec<[u8; 32]>,
    pub(crate) versions: Vec<u32>,
    pub(crate) kinds: Vec<Kind>,
    pub(crate) members: Vec<MemberId>,
    pub(crate) leaf_of: HashMap<MemberId, NodeId>,
    /// The version given to the keys of the latest batch (0: the initial group key only).
    pub(crate) generation: u32,
    /// The sequence number of the latest rekey message (0 before the first).
    pub(crate) seq: u64,
    /// The MAC key of message `seq`.
    pub(crate) mac_key: MacKey,
    /// The SPI the next Data SA gets.
    pub(crate) next_spi: u32,
    /// The takeover delays each new Data SA carries (configuration, not persisted).
    pub(crate) data_sa_timing: DataSaTiming,
    /// The Data SA of the latest message (`None` before the first).
    pub(crate) data_sa: Option<DataSa>,
    pub(crate) rng: KeyRng,
    /// Threads that seal a batch's wraps (0: the available parallelism).
    pub(crate) wrap_threads: usize,
}

/// The outcome of one batch: everything the rekey message `seq` must carry, and the figures
/// the manifest needs.
#[derive(Debug)]
pub struct RekeyBatch {
    /// The message's context (algorithm, group id, sequence number).
    pub context: RekeyContext,
    /// The tree's degree.
    pub degree: Degree,
    /// The version of the new group key.
    pub group_key_version: u32,
    /// Every wrapped key of the batch, sorted by `child` (each child appears at most once).
    pub wraps: Vec<Wrap>,
    /// The new Data SA, encrypted under the new group key.
    pub wrapped_data_sa: WrappedDataSa,
    /// The new Data SA in the clear, for the GCKS's own use. Never send it.
    pub data_sa: DataSa,
    /// The datagram MAC key of this message (derived from the previous group key).
    pub mac_key: MacKey,
    /// Members in the group after the batch.
    pub group_size: u64,
    /// The members admitted by this batch and their leaves.
    pub joined: Vec<(MemberId, NodeId)>,
}

/// What the product's registration protocol must carry to a joining member (over its own
/// authenticated, confidential channel). The member's path keys reach it in message
/// `first_seq`, which the bundle's MAC key lets it check: it never receives a key that
/// protected earlier traffic.
#[derive(Debug, Clone)]
pub struct RegistrationBundle {
    /// The member.
    pub member: MemberId,
    /// Its leaf.
    pub leaf: NodeId,
    /// The version of its leaf key.
    pub leaf_version: u32,
    /// Its individual (leaf) key.
    pub leaf_key: Key,
    /// The group parameters (Rekey SA), with the GCKS's public key.
    pub rekey_sa: RekeySa,
    /// The sequence number of the rekey message that carries its path keys.
    pub first_seq: u64,
    /// The datagram MAC key of message `first_seq`.
    pub mac_key: MacKey,
    /// Where the member receives its rekeys from and fails over to (empty from the tree: the
    /// GCKS fills it in from its relay assignment).
    pub directory: super::bundle::RelayDirectory,
    /// Whether the member is registered as unicast (RFC 4046 5.1, multi-unicast): it takes no
    /// multicast, and its first contact delivers each message to it by unicast
    /// ([`crate::session::unicast`]). False from the tree: the GCKS sets it at registration.
    pub unicast: bool,
}

impl KeyTree {
    /// An empty tree for the group `sa` describes, keyed from the OS CSPRNG.
    pub fn new(sa: RekeySa) -> Result<Self, LkhError> {
        Ok(Self::with_rng(sa, KeyRng::from_os()?))
    }

    /// An empty tree keyed from `rng`: with [`KeyRng::seeded_for_simulation`], for tests and
    /// simulation only.
    pub fn with_rng(sa: RekeySa, mut rng: KeyRng) -> Self {
        let mut root = [0u8; 32];
        rng.fill(&mut root);
        // There is no message 0: this key is never handed out (`join` needs a batch first).
        let mac_key = datagram_mac_key(&Key::from_bytes(root), sa.group_id, 0);
        Self {
            sa,
            keys: vec![root],
            versions: vec![0],
            kinds: vec![Kind::Internal],
            members: vec![MemberId(0)],
            leaf_of: HashMap::new(),
            generation: 0,
            seq: 0,
            mac_key,
            next_spi: 1,
            data_sa_timing: DataSaTiming::default(),
            data_sa: None,
            rng,
            wrap_threads: 0,
        }
    }

    /// Sets the takeover delays ([`DataSaTiming`]) every later Data SA carries. A
    /// configuration value: it is not part of the tree's snapshot, so the GCKS sets it again
    /// after a restore.
    pub fn set_data_sa_timing(&mut self, timing: DataSaTiming) {
        self.data_sa_timing = timing;
    }

    /// The takeover delays later Data SAs carry.
    pub fn data_sa_timing(&self) -> DataSaTiming {
        self.data_sa_timing
    }

    /// A copy of the tree to build a batch on: the GCKS applies a batch to a fork and keeps
    /// the fork only once the batch's message is built and stored, so a failed batch leaves
    /// the committed tree as it was. A full copy of the node arrays and the member map; the
    /// `lkh` benchmark measures it (`fork_ms_p50`, and `fork_into_ms_p50` for
    /// [`Self::fork_into`], which the GCKS uses once it has a spare tree).
    pub fn fork(&self) -> Self {
        Self {
            sa: self.sa,
            keys: self.keys.clone(),
            versions: self.versions.clone(),
            kinds: self.kinds.clone(),
            members: self.members.clone(),
            leaf_of: self.leaf_of.clone(),
            generation: self.generation,
            seq: self.seq,
            mac_key: self.mac_key.clone(),
            next_spi: self.next_spi,
            data_sa_timing: self.data_sa_timing,
            data_sa: self.data_sa.clone(),
            rng: self.rng.clone(),
            wrap_threads: self.wrap_threads,
        }
    }

    /// [`Self::fork`] into `spare` (the previous committed tree, say), reusing its allocations:
    /// no allocation and no page faults when the sizes fit, which makes the copy several times
    /// cheaper for a large tree. Every key `spare` held is overwritten or zeroized.
    pub fn fork_into(&self, spare: &mut KeyTree) {
        let len = self.keys.len();
        if spare.keys.capacity() < len {
            // Too small: zeroized before it is freed, as in `ensure_len`.
            spare.keys.zeroize();
            spare.keys = Vec::with_capacity(self.keys.capacity());
        }
        if spare.keys.len() > len {
            spare.keys[len..].iter_mut().for_each(Zeroize::zeroize);
            spare.keys.truncate(len);
        }
        let common = spare.keys.len();
        spare.keys.copy_from_slice(&self.keys[..common]);
        spare.keys.extend_from_slice(&self.keys[common..]);
        spare.versions.clone_from(&self.versions);
        spare.kinds.clone_from(&self.kinds);
        spare.members.clone_from(&self.members);
        spare.leaf_of.clone_from(&self.leaf_of);
        spare.sa = self.sa;
        spare.generation = self.generation;
        spare.seq = self.seq;
        spare.mac_key = self.mac_key.clone();
        spare.next_spi = self.next_spi;
        spare.data_sa_timing = self.data_sa_timing;
        spare.data_sa = self.data_sa.clone();
        spare.rng = self.rng.clone();
        spare.wrap_threads = self.wrap_threads;
    }

    /// The Rekey SA.
    pub fn rekey_sa(&self) -> &RekeySa {
        &self.sa
    }

    /// Names `key` as the GCKS signing key in the Rekey SA (a signing-key rollover): bundles
    /// issued from now on carry it.
    pub(crate) fn set_gcks_public_key(&mut self, key: ed25519_dalek::VerifyingKey) {
        self.sa.gcks_public_key = key;
    }

    /// The tree's degree.
    pub fn degree(&self) -> Degree {
        self.sa.degree
    }

    /// Members in the group.
    pub fn member_count(&self) -> usize {
        self.leaf_of.len()
    }

    /// The sequence number of the latest rekey message (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The current group key and its version.
    pub fn group_key(&self) -> (u32, Key) {
        (self.versions[0], Key::from_bytes(self.keys[0]))
    }

    /// The Data SA of the latest message.
    pub fn data_sa(&self) -> Option<&DataSa> {
        self.data_sa.as_ref()
    }

    /// The MAC key of the next message (derived from the current group key).
    pub fn next_mac_key(&self) -> MacKey {
        datagram_mac_key(
            &Key::from_bytes(self.keys[0]),
            self.sa.group_id,
            self.seq + 1,
        )
    }

    /// The leaf of `member`.
    pub fn leaf_of(&self, member: MemberId) -> Option<NodeId> {
        self.leaf_of.get(&member).copied()
    }

    /// The member at `leaf`, if `leaf` is a leaf.
    pub fn member_at(&self, leaf: NodeId) -> Option<MemberId> {
        let i = leaf as usize;
        (self.kinds.get(i) == Some(&Kind::Leaf)).then(|| self.members[i])
    }

    /// The current key and version of `node`, if it is not null. For the GCKS's resync and
    /// tests; never send it.
    pub fn node_key(&self, node: NodeId) -> Option<(u32, Key)> {
        let i = node as usize;
        match self.kinds.get(i) {
            Some(Kind::Internal | Kind::Leaf) => {
                Some((self.versions[i], Key::from_bytes(self.keys[i])))
            }
            _ => None,
        }
    }

    /// The members' leaves, left to right (a depth-first walk): the order user-oriented key
    /// assignment fills chunks in. Leaves sort the same way by [`Degree::order_key`].
    pub fn leaves_in_order(&self) -> Vec<NodeId> {
        let degree = self.sa.degree;
        let mut leaves = Vec::with_capacity(self.leaf_of.len());
        let mut stack = vec![ROOT];
        while let Some(node) = stack.pop() {
            match self.kind(node) {
                Kind::Leaf => leaves.push(node),
                Kind::Internal => {
                    for index in (0..degree.get()).rev() {
                        if let Some(child) = degree.child(node, index) {
                            if self.kind(child) != Kind::Null {
                                stack.push(child);
                            }
                        }
                    }
                }
                Kind::Null => {}
            }
        }
        leaves
    }

    /// Heap bytes the tree holds (capacity of its arrays and an estimate of its hash map's
    /// table: hashbrown stores one control byte and one entry per bucket).
    pub fn heap_bytes(&self) -> usize {
        // hashbrown keeps its load at most 7/8 in a power-of-two bucket count, and reports
        // capacity() = 7/8 of its buckets; it adds a 16-byte group of control bytes.
        let buckets = (self.leaf_of.capacity() * 8)
            .div_ceil(7)
            .next_power_of_two();
        self.keys.capacity() * 32
            + self.versions.capacity() * 4
            + self.kinds.capacity()
            + self.members.capacity() * 8
            + buckets * (core::mem::size_of::<(MemberId, NodeId)>() + 1)
            + 16
    }

    /// The registration bundle of `member`, which the latest batch admitted: its leaf and leaf
    /// key, the Rekey SA, the sequence number of that batch's message (which carries its path
    /// keys) and that message's MAC key. Only valid until the next batch: a member admitted
    /// earlier has missed its path keys and must resync.
    pub fn join(&self, member: MemberId) -> Result<RegistrationBundle, LkhError> {
        let leaf = self
            .leaf_of(member)
            .ok_or(LkhError::NotJustJoined(member))?;
        let i = leaf as usize;
        // Leaf keys are made only for joiners, and a moved leaf keeps its version, so a leaf of
        // the latest generation was admitted by the latest batch.
        if self.generation == 0 || self.versions[i] != self.generation {
            return Err(LkhError::NotJustJoined(member));
        }
        Ok(RegistrationBundle {
            member,
            leaf,
            leaf_version: self.versions[i],
            leaf_key: Key::from_bytes(self.keys[i]),
            rekey_sa: self.sa,
            first_seq: self.seq,
            mac_key: self.mac_key.clone(),
            directory: super::bundle::RelayDirectory::default(),
            unicast: false,
        })
    }

    /// The members the latest batch admitted (those [`Self::join`] gives a bundle for), in no
    /// particular order. A walk over every member: for a restart, not for every batch.
    pub fn admitted_by_latest_batch(&self) -> Vec<MemberId> {
        if self.generation == 0 {
            return Vec::new();
        }
        self.leaf_of
            .iter()
            .filter(|(_, &leaf)| self.versions[leaf as usize] == self.generation)
            .map(|(member, _)| *member)
            .collect()
    }

    /// Applies a batch of joins and leaves by the marking algorithm of batch rekeying (Li,
    /// Yang, Gouda, Lam 2001), and returns the wraps of rekey message `seq() + 1`:
    ///
    /// 1. Leaving members' leaves are given to joining members first (new leaf keys).
    /// 2. Departed leaves no join takes become null, and internal nodes left with only null
    ///    children are pruned (null, no key).
    /// 3. Joins beyond the departures fill null slots (null children of internal nodes),
    ///    shallowest first, then split the shallowest leaves: the leaf becomes an internal
    ///    node, its member moves to the first child (same key and version) and up to `d - 1`
    ///    joins take the other children.
    /// 4. Every internal node with a changed leaf below it, and the root in every batch (an
    ///    empty batch refreshes the group key), gets a new key; each new key is wrapped under
    ///    each non-null child's key (the child's new key if it has one).
    ///
    /// A new Data SA is made and wrapped under the new group key (RFC 4046 6.3). Persist the
    /// tree (the engine's `persist::save_tree`) before sending the message. On error the tree is unchanged.
    pub fn apply_batch(
        &mut self,
        joins: &[MemberId],
        leaves: &[MemberId],
    ) -> Result<RekeyBatch, LkhError> {
        // Validate everything before changing anything. Sorted copies find duplicates without
        // hashing every id (a build from scratch joins a million members in one batch).
        let mut leaving = leaves.to_vec();
        leaving.sort_unstable();
        if let Some(pair) = leaving.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(LkhError::Duplicate(pair[0]));
        }
        if let Some(&member) = leaving.iter().find(|m| !self.leaf_of.contains_key(m)) {
            return Err(LkhError::UnknownMember(member));
        }
        let mut joining = joins.to_vec();
        joining.sort_unstable();
        if let Some(pair) = joining.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(LkhError::Duplicate(pair[0]));
        }
        if let Some(&member) = joining
            .iter()
            .find(|m| self.leaf_of.contains_key(m) && leaving.binary_search(m).is_err())
        {
            return Err(LkhError::AlreadyMember(member));
        }
        drop((leaving, joining));
        let final_count = (self.leaf_of.len() - leaves.len()) as u64 + joins.len() as u64;
        let degree = self.sa.degree;
        // With no free slot left and every leaf at the deepest level the tree is full, so a
        // count within d^max_depth never needs a split below the deepest level.
        let capacity = u64::from(degree.get()).pow(degree.max_depth());
        if final_count > capacity {
            return Err(LkhError::TreeFull(final_count));
        }
        let generation = self.generation.checked_add(1).ok_or(LkhError::Exhausted)?;
        let seq = self.seq.checked_add(1).ok_or(LkhError::Exhausted)?;
        self.rng.reseed()?;

        let ctx = self.sa.context(seq);
        let mac_key = datagram_mac_key(&Key::from_bytes(self.keys[0]), self.sa.group_id, seq);
        self.generation = generation;
        self.seq = seq;

        // Leaves whose subtree changed: the marking starts from them.
        let mut changed: Vec<NodeId> = Vec::with_capacity(joins.len() + leaves.len());
        let mut departed: Vec<NodeId> = leaves
            .iter()
            .filter_map(|member| self.leaf_of.remove(member))
            .collect();
        departed.sort_unstable();
        let mut joins_left = joins.iter();

        // 1. Joins take departed leaves.
        let mut departed_iter = departed.into_iter();
        for slot in departed_iter.by_ref() {
            match joins_left.next() {
                Some(&member) => {
                    self.place_joiner(slot, member);
                    changed.push(slot);
                }
                None => {
                    // 2. The rest become null and prune upwards.
                    self.set_null(slot);
                    changed.push(slot);
                    let mut node = slot;
                    while let Some(parent) = degree.parent(node) {
                        if parent == ROOT || self.has_live_child(parent) {
                            break;
                        }
                        self.set_null(parent);
                        node = parent;
                    }
                }
            }
        }

        // 3. Remaining joins fill null slots, then split the shallowest leaves.
        let remaining = joins_left.as_slice();
        if !remaining.is_empty() {
            self.leaf_of.reserve(remaining.len());
            self.grow(remaining, &mut changed);
        }
        self.truncate_nulls();
        self.compact();

        // 4. Mark, make keys, wrap.
        let marked = self.mark(&changed);
        for &node in &marked {
            let i = node as usize;
            self.rng.fill(&mut self.keys[i]);
            self.versions[i] = generation;
        }
        let wraps = self.seal_wraps(&marked, &ctx);

        let data_sa = DataSa {
            spi: self.next_spi,
            lifetime_secs: self.sa.data_sa_lifetime_secs,
            timing: self.data_sa_timing,
            next_spi: next_spi_after(self.next_spi),
            tek: self.rng.key(),
        };
        self.next_spi = next_spi_after(self.next_spi);
        let group_key = Key::from_bytes(self.keys[0]);
        let wrapped_data_sa = WrappedDataSa::seal(&ctx, &data_sa, &group_key, generation);
        self.data_sa = Some(data_sa.clone());
        self.mac_key = mac_key.clone();
        // Every join was placed (the batch was validated), in the order of `joins`.
        let joined = joins
            .iter()
            .filter_map(|&member| Some((member, self.leaf_of(member)?)))
            .collect();
        Ok(RekeyBatch {
            context: ctx,
            degree,
            group_key_version: generation,
            wraps,
            wrapped_data_sa,
            data_sa,
            mac_key,
            group_size: self.leaf_of.len() as u64,
            joined,
        })
    }

    pub(crate) fn kind(&self, node: NodeId) -> Kind {
        self.kinds.get(node as usize).copied().unwrap_or(Kind::Null)
    }

    /// Wraps each marked node's new key under each of its non-null children's keys, sorted by
    /// child. Disjoint slices of the marked nodes are independent: a large batch seals them on
    /// [`Self::wrap_threads`] threads, each a contiguous slice, and joins the results in order,
    /// so the wraps are the same whatever the thread count.
    fn seal_wraps(&self, marked: &[NodeId], ctx: &RekeyContext) -> Vec<Wrap> {
        let sealer = WrapSealer {
            keys: &self.keys,
            versions: &self.versions,
            kinds: &self.kinds,
            degree: self.sa.degree,
            generation: self.generation,
            ctx,
        };
        let expected = marked.len() * usize::from(self.sa.degree.get());
        let threads = self
            .resolved_wrap_threads()
            .min(expected / MIN_WRAPS_PER_THREAD)
            .max(1);
        if threads == 1 {
            return sealer.seal(marked);
        }
        let per_thread = marked.len().div_ceil(threads);
        let mut slices = marked.chunks(per_thread);
        let first = slices.next().unwrap_or_default();
        std::thread::scope(|scope| {
            let sealer = &sealer;
            let others: Vec<_> = slices
                .map(|slice| scope.spawn(move || sealer.seal(slice)))
                .collect();
            let mut wraps = sealer.seal(first);
            wraps.reserve(expected.saturating_sub(wraps.len()));
            for handle in others {
                match handle.join() {
                    Ok(sealed) => wraps.extend(sealed),
                    // Sealing does not panic; if it ever did, the panic goes on to the caller
                    // as it would have on one thread.
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            wraps
        })
    }

    /// Threads that seal a batch's wraps (0: the available parallelism, the default). A batch
    /// with fewer than 4,096 wraps a thread seals on fewer threads. The wraps are the same
    /// bytes whatever the count.
    pub fn wrap_threads(&self) -> usize {
        self.wrap_threads
    }

    /// Sets [`Self::wrap_threads`].
    pub fn set_wrap_threads(&mut self, threads: usize) {
        self.wrap_threads = threads;
    }

    fn resolved_wrap_threads(&self) -> usize {
        match self.wrap_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            threads => threads,
        }
    }

    fn has_live_child(&self, node: NodeId) -> bool {
        let degree = self.sa.degree;
        (0..degree.get())
            .filter_map(|index| degree.child(node, index))
            .any(|child| self.kind(child) != Kind::Null)
    }

    fn place_joiner(&mut self, slot: NodeId, member: MemberId) {
        self.ensure_len(slot as usize + 1);
        let i = slot as usize;
        self.rng.fill(&mut self.keys[i]);
        self.versions[i] = self.generation;
        self.kinds[i] = Kind::Leaf;
        self.members[i] = member;
        self.leaf_of.insert(member, slot);
    }

    fn set_null(&mut self, node: NodeId) {
        let i = node as usize;
        self.keys[i].zeroize();
        self.kinds[i] = Kind::Null;
        self.members[i] = MemberId(0);
    }

    /// Moves the leaf at `from` to its first child `to`, keeping key and version.
    fn move_leaf(&mut self, from: NodeId, to: NodeId) {
        self.ensure_len(to as usize + 1);
        let (f, t) = (from as usize, to as usize);
        self.keys[t] = self.keys[f];
        self.keys[f].zeroize();
        self.versions[t] = self.versions[f];
        self.kinds[t] = Kind::Leaf;
        self.members[t] = self.members[f];
        self.leaf_of.insert(self.members[f], to);
        self.kinds[f] = Kind::Internal;
        self.members[f] = MemberId(0);
    }

    /// Places joins beyond the departures: null slots first (shallowest, then leftmost by
    /// id), then splits of the shallowest leaves.
    fn grow(&mut self, joins: &[MemberId], changed: &mut Vec<NodeId>) {
        let degree = self.sa.degree;
        let mut free: Vec<(u32, NodeId)> = Vec::new();
        for node in 0..self.kinds.len() as NodeId {
            if self.kinds[node as usize] != Kind::Internal {
                continue;
            }
            // Most internal nodes are full: compute a depth only for those with a free child.
            let mut depth = None;
            for index in 0..degree.get() {
                if let Some(child) = degree.child(node, index) {
                    if self.kind(child) == Kind::Null {
                        let depth = *depth.get_or_insert_with(|| degree.depth(node) + 1);
                        free.push((depth, child));
                    }
                }
            }
        }
        free.sort_unstable();
        let mut joins = joins.iter().copied();
        for &(_, slot) in &free {
            let Some(member) = joins.next() else {
                return;
            };
            self.place_joiner(slot, member);
            changed.push(slot);
        }
        let mut joins = joins.peekable();
        if joins.peek().is_none() {
            return;
        }
        // Shallowest leaves first, leftmost (smallest id) among equals.
        let mut heap: BinaryHeap<core::cmp::Reverse<(u32, NodeId)>> = self
            .kinds
            .iter()
            .enumerate()
            .filter(|(_, kind)| **kind == Kind::Leaf)
            .map(|(i, _)| core::cmp::Reverse((degree.depth(i as NodeId), i as NodeId)))
            .collect();
        while joins.peek().is_some() {
            // The capacity check of apply_batch guarantees a leaf to split above the deepest
            // level while joins remain, so the heap cannot run dry here.
            let Some(core::cmp::Reverse((depth, leaf))) = heap.pop() else {
                return;
            };
            let Some(first) = degree.first_child(leaf) else {
                return;
            };
            self.move_leaf(leaf, first);
            changed.push(first);
            heap.push(core::cmp::Reverse((depth + 1, first)));
            for index in 1..degree.get() {
                let Some(member) = joins.next() else {
                    break;
                };
                let Some(slot) = degree.child(leaf, index) else {
                    break;
                };
                self.place_joiner(slot, member);
                changed.push(slot);
                heap.push(core::cmp::Reverse((depth + 1, slot)));
            }
        }
    }

    /// Marks the internal ancestors of every changed node, and the root; returns them in
    /// ascending order. A walk stops at an ancestor already marked, so marking costs one step
    /// per marked node. Small batches keep the marks in a hash set (a batch must not cost time
    /// in proportion to the tree); large ones in a bitset over all nodes.
    fn mark(&self, changed: &[NodeId]) -> Vec<NodeId> {
        let degree = self.sa.degree;
        let walk = |mark: &mut dyn FnMut(NodeId) -> bool| {
            mark(ROOT);
            for &leaf in changed {
                let mut node = leaf;
                while let Some(parent) = degree.parent(node) {
                    // A pruned (null) ancestor needs no key; its live ancestors above do.
                    if self.kind(parent) == Kind::Internal && !mark(parent) {
                        break;
                    }
                    node = parent;
                }
            }
        };
        if changed.len().saturating_mul(64) < self.kinds.len() {
            let mut set = std::collections::HashSet::with_capacity(changed.len() * 4 + 1);
            walk(&mut |node| set.insert(node));
            let mut marked: Vec<NodeId> = set.into_iter().collect();
            marked.sort_unstable();
            return marked;
        }
        let mut bits = vec![0u64; self.kinds.len().div_ceil(64)];
        walk(&mut |node| {
            let (word, bit) = (node as usize / 64, node % 64);
            let fresh = bits[word] & (1 << bit) == 0;
            bits[word] |= 1 << bit;
            fresh
        });
        let mut marked = Vec::new();
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let bit = word.trailing_zeros();
                marked.push((w * 64) as NodeId + bit);
                word &= word - 1;
            }
        }
        marked
    }

    /// Grows every array to at least `len` slots. Key storage is moved by hand so that the old
    /// buffer is zeroized before it is freed (a plain `Vec` growth would free it as it is).
    fn ensure_len(&mut self, len: usize) {
        if self.kinds.len() >= len {
            return;
        }
        if len > self.keys.capacity() {
            let mut grown = Vec::with_capacity(len.max(self.keys.capacity() * 2));
            grown.extend_from_slice(&self.keys);
            self.keys.zeroize();
            self.keys = grown;
        }
        self.keys.resize(len, [0; 32]);
        self.versions.resize(len, 0);
        self.kinds.resize(len, Kind::Null);
        self.members.resize(len, MemberId(0));
    }

    /// Gives back array capacity far beyond the length (after a large growth, whose doubling
    /// can leave half the capacity unused): the resident bytes per member stay near the
    /// arrays' real size. Keys are moved by hand so the old buffer is zeroized.
    fn compact(&mut self) {
        let len = self.kinds.len();
        let keep = len + len / 8 + 64;
        let too_large = |capacity: usize| capacity > len + len / 4 + 64;
        if too_large(self.keys.capacity()) {
            let mut shrunk = Vec::with_capacity(keep);
            shrunk.extend_from_slice(&self.keys);
            self.keys.zeroize();
            self.keys = shrunk;
        }
        if too_large(self.versions.capacity()) {
            self.versions.shrink_to(keep);
        }
        if too_large(self.kinds.capacity()) {
            self.kinds.shrink_to(keep);
        }
        if too_large(self.members.capacity()) {
            self.members.shrink_to(keep);
        }
    }

    /// Drops trailing null slots (the tree shrinks). Their keys are already zero. Forgetting
    /// their versions is safe: every new key takes the current batch counter, larger than any
    /// version used before, whatever the slot held.
    fn truncate_nulls(&mut self) {
        let mut len = self.kinds.len();
        while len > 1 && self.kinds[len - 1] == Kind::Null {
            len -= 1;
        }
        self.keys.truncate(len);
        self.versions.truncate(len);
        self.kinds.truncate(len);
        self.members.truncate(len);
    }
}

impl Drop for KeyTree {
    fn drop(&mut self) {
        self.keys.zeroize();
    }
}

impl core::fmt::Debug for KeyTree {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeyTree")
            .field("degree", &self.sa.degree)
            .field("members", &self.leaf_of.len())
            .field("nodes", &self.kinds.len())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// The fewest wraps a wrapping thread is given: a wrap costs about 0.35 us and starting a
/// thread tens of microseconds, so smaller shares would slow a small batch down.
pub(crate) const MIN_WRAPS_PER_THREAD: usize = 4096;

/// What sealing a batch's wraps reads of the tree (shared by the wrapping threads).
struct WrapSealer<'a> {
    keys: &'a [[u8; 32]],
    versions: &'a [u32],
    kinds: &'a [Kind],
    degree: Degree,
    generation: u32,
    ctx: &'a RekeyContext,
}

impl WrapSealer<'_> {
    /// The wraps of the marked nodes `marked` (ascending), sorted by child: children of a
    /// smaller node have smaller ids.
    fn seal(&self, marked: &[NodeId]) -> Vec<Wrap> {
        let mut wraps = Vec::with_capacity(marked.len() * usize::from(self.degree.get()));
        for &node in marked {
            let key = Key::from_bytes(self.keys[node as usize]);
            for index in 0..self.degree.get() {
                let Some(child) = self.degree.child(node, index) else {
                    break;
                };
                let c = child as usize;
                if !matches!(self.kinds.get(c), Some(Kind::Internal | Kind::Leaf)) {
                    continue;
                }
                let under = Key::from_bytes(self.keys[c]);
                wraps.push(Wrap::seal(
                    self.ctx,
                    node,
                    self.generation,
                    child,
                    self.versions[c],
                    &key,
                    &under,
                ));
            }
        }
        wraps
    }
}

impl RekeyBatch {
    /// Encryptions the batch cost: its wraps and the Data SA.
    pub fn encryptions(&self) -> usize {
        self.wraps.len() + 1
    }

    /// The wrap whose wrapping key is `child`'s, if the batch has one.
    pub fn wrap_under(&self, child: NodeId) -> Option<&Wrap> {
        self.wraps
            .binary_search_by_key(&child, |wrap| wrap.child)
            .ok()
            .map(|i| &self.wraps[i])
    }

    /// The wraps the member at `leaf` needs, bottom-up: for each node on its path below the
    /// root, the wrap under that node's key, where the batch has one. `O(depth * log wraps)`.
    pub fn wraps_for_leaf(&self, leaf: NodeId) -> impl Iterator<Item = &Wrap> + '_ {
        self.degree
            .path(leaf)
            .filter(|&node| node != ROOT)
            .filter_map(move |node| self.wrap_under(node))
    }
}

/// The SPI that follows `spi`: the next integer, wrapping to 1 (SPI 0 means "none").
pub(crate) fn next_spi_after(spi: u32) -> u32 {
    spi.checked_add(1).unwrap_or(1)
}
