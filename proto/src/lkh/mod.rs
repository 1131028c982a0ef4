//! The logical key hierarchy (LKH) of the GCKS and the member's key state (RFC 4046 sections 5
//! and 6.2; Wong, Gouda, Lam 1998; Li, Yang, Gouda, Lam 2001).
//!
//! This module owns the key tree ([`KeyTree`]), its batch rekeying by the marking algorithm
//! ([`KeyTree::apply_batch`], which turns a batch of joins and leaves into the smallest set of
//! [`Wrap`]s), the registration bundle a joining member receives ([`KeyTree::join`]), the
//! tree's snapshot encoding ([`KeyTree::snapshot_body`], [`KeyTree::from_snapshot_bytes`])
//! and the member side that applies wraps ([`MemberKeys::apply`]), with its own state encoding.
//! It is pure state: no sockets, no clock, no threads, no files (the engine writes the
//! snapshots). It does not lay wraps out in chunks, sign or MAC anything (that is `session` and
//! `auth`).
//!
//! - [`topology`]: the complete d-ary node numbering shared by the GCKS and members.
//! - [`wrap`]: a wrapped key, its 64-byte encoding, its nonce and associated data.
//! - [`tree`]: the GCKS's key tree and batch rekeying.
//! - [`member`]: a member's path keys.
//! - [`snapshot`]: saving and loading the tree.
//! - [`member_state`]: saving and loading a member's keys, to resume after its restart.
//! - [`bundle`]: the versioned encoding of a registration bundle.
//!
//! # Access control
//!
//! Every key on the path of a changed leaf is replaced in the batch that changes it, so a
//! departed member's keys open nothing sent after its departure (forward access control), and a
//! joiner receives only keys made in the message that admits it, so its keys open nothing sent
//! before (backward access control). The property tests of this module check both, for single
//! members and coalitions, over random sequences of batches.

use zeroize::{Zeroize, ZeroizeOnDrop};

pub mod bundle;
pub mod member;
pub mod member_state;
pub mod snapshot;
pub mod topology;
pub mod tree;
pub mod wrap;

#[cfg(test)]
mod tests;

pub use bundle::{BundleError, RelayContact, RelayDirectory};
pub use member::{MemberError, MemberKeys, Rekeyed};
pub use member_state::MemberStateError;
pub use snapshot::SnapshotError;
pub use topology::{Degree, NodeId, ROOT};
pub use tree::{KeyRng, KeyTree, LkhError, MemberId, RegistrationBundle, RekeyBatch};
pub use wrap::{RekeyContext, Wrap, WrapError, WRAP_LEN};

/// A 256-bit secret key: a node key of the tree, the group key (the root's key), a member's
/// leaf key or a TEK. Zeroized on drop; never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; 32]);

impl Key {
    /// Wraps 32 bytes of key material.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8; 32] {
        &mut self.0
    }
}

impl core::fmt::Debug for Key {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Key material is never printed.
        f.write_str("Key(..)")
    }
}
