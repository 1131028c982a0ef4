//! A GCKS's key material without the engine, for tests that drive the sans-IO sessions: a
//! signing key, a Rekey SA and a key tree, all from fixed seeds.

use ed25519_dalek::SigningKey;
use rekeycast::gsa::{RekeySa, WrapAlgorithm};
use rekeycast::lkh::{Degree, KeyRng, KeyTree, MemberId};

use crate::forge::Sa;

/// The key tree and signing key of a test GCKS.
pub struct KeyServer {
    /// The key tree (degree 4, AES-256-GCM wrapping, a one-hour Data SA lifetime).
    pub tree: KeyTree,
    /// The GCKS's signing key: 32 bytes of `signing_seed`.
    pub gcks: SigningKey,
}

impl KeyServer {
    /// A key server for `sa` whose tree draws its keys from `tree_seed` and holds `members`,
    /// admitted by a first batch (message 1) when there are any.
    ///
    /// # Panics
    /// When that first batch fails (duplicate member ids).
    pub fn new(
        sa: Sa,
        signing_seed: u8,
        tree_seed: u64,
        members: impl IntoIterator<Item = u64>,
    ) -> Self {
        let gcks = SigningKey::from_bytes(&[signing_seed; 32]);
        let rekey_sa = RekeySa {
            group_id: sa.group_id,
            spi: sa.spi,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::new(4).unwrap(),
            gcks_public_key: gcks.verifying_key(),
            data_sa_lifetime_secs: 3600,
        };
        let mut tree = KeyTree::with_rng(rekey_sa, KeyRng::seeded_for_simulation(tree_seed));
        let members: Vec<MemberId> = members.into_iter().map(MemberId).collect();
        if !members.is_empty() {
            tree.apply_batch(&members, &[]).unwrap();
        }
        Self { tree, gcks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seeds_same_keys() {
        let sa = Sa {
            group_id: 3,
            spi: 4,
        };
        let a = KeyServer::new(sa, 1, 2, 0..10);
        let b = KeyServer::new(sa, 1, 2, 0..10);
        assert_eq!(a.tree.seq(), 1);
        assert_eq!(
            a.tree.group_key().1.as_bytes(),
            b.tree.group_key().1.as_bytes()
        );
        assert_eq!(a.gcks.to_bytes(), b.gcks.to_bytes());
        assert_eq!(KeyServer::new(sa, 1, 2, []).tree.seq(), 0);
    }
}
