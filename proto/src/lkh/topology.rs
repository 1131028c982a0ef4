//! Node numbering of the key tree: a complete d-ary numbering, the same for the GCKS and every
//! member.
//!
//! The root is node 0 and the children of node `i` are `d*i + 1 ..= d*i + d`, so a node's
//! parent, depth and children follow from its id and the degree alone: a wrap names nodes by id
//! and a member needs no other description of the tree's shape. Leaves need not all be at the
//! same depth (the tree grows by splitting leaves), so numeric id order is breadth-first order;
//! [`Degree::order_key`] gives the left-to-right order.

use serde::{Deserialize, Serialize};

/// A node of the key tree, by its number in the complete d-ary numbering (root 0).
pub type NodeId = u32;

/// The root node: its key is the group key.
pub const ROOT: NodeId = 0;

/// The degree (number of children per internal node) of a key tree: 2 to 16, 4 by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Degree(u8);

/// A degree outside 2..=16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("tree degree {0} outside {min}..={max}", min = Degree::MIN, max = Degree::MAX)]
pub struct InvalidDegree(pub u8);

impl Degree {
    /// The smallest degree allowed.
    pub const MIN: u8 = 2;
    /// The largest degree allowed.
    pub const MAX: u8 = 16;
    /// The usual optimum of batch rekeying (Li, Yang, Gouda, Lam 2001).
    pub const DEFAULT: Degree = Degree(4);

    /// A degree, if it is in 2..=16.
    pub const fn new(degree: u8) -> Result<Self, InvalidDegree> {
        if degree < Self::MIN || degree > Self::MAX {
            Err(InvalidDegree(degree))
        } else {
            Ok(Self(degree))
        }
    }

    /// The degree as a number.
    pub const fn get(self) -> u8 {
        self.0
    }

    fn d(self) -> u64 {
        u64::from(self.0)
    }

    /// The parent of `node`, or `None` for the root.
    pub fn parent(self, node: NodeId) -> Option<NodeId> {
        if node == ROOT {
            None
        } else {
            // (node - 1) / d < node, so it fits a NodeId.
            Some(((u64::from(node) - 1) / self.d()) as NodeId)
        }
    }

    /// The `index`-th child of `node` (index in `0..d`), or `None` when its id would pass
    /// [`Degree::max_node`].
    pub fn child(self, node: NodeId, index: u8) -> Option<NodeId> {
        let child = self.d() * u64::from(node) + 1 + u64::from(index);
        (index < self.0 && child <= u64::from(self.max_node())).then_some(child as NodeId)
    }

    /// The first child of `node`: where a leaf's key moves when the leaf is split.
    pub fn first_child(self, node: NodeId) -> Option<NodeId> {
        self.child(node, 0)
    }

    /// The position of `node` among its siblings (`0..d`); 0 for the root.
    pub fn child_index(self, node: NodeId) -> u8 {
        if node == ROOT {
            0
        } else {
            // The remainder is below d <= 16.
            ((u64::from(node) - 1) % self.d()) as u8
        }
    }

    /// The depth of `node` (the root has depth 0).
    pub fn depth(self, node: NodeId) -> u32 {
        let mut depth = 0;
        let mut level_start = 0u64;
        let mut level_len = 1u64;
        while u64::from(node) >= level_start + level_len {
            level_start += level_len;
            level_len *= self.d();
            depth += 1;
        }
        depth
    }

    /// The first node id of level `depth`: `(d^depth - 1) / (d - 1)`.
    pub fn level_start(self, depth: u32) -> u64 {
        (self.d().pow(depth) - 1) / (self.d() - 1)
    }

    /// The deepest level whose every node id is below `u32::MAX` (which stays a sentinel):
    /// the tree never grows deeper.
    pub fn max_depth(self) -> u32 {
        MAX_DEPTH[self.0 as usize]
    }

    /// The largest node id the tree may use: the last node of [`Degree::max_depth`].
    pub fn max_node(self) -> NodeId {
        MAX_NODE[self.0 as usize]
    }

    /// A key that sorts nodes left to right: the rank of the node's leftmost descendant at
    /// [`Degree::max_depth`]. Leaves of a tree cover disjoint ranges, so sorting leaves by this
    /// key lists them in the order a depth-first walk meets them, whatever their depths. Fits
    /// a `u32` (there are fewer than 2^32 nodes at the deepest level).
    pub fn order_key(self, node: NodeId) -> u32 {
        let depth = self.depth(node);
        let rank = u64::from(node) - self.level_start(depth);
        // rank * d^(max - depth) < d^max <= the node count of the deepest level < 2^32.
        (rank * self.d().pow(self.max_depth() - depth)) as u32
    }

    /// The nodes from `node` up to the root, `node` first.
    pub fn path(self, node: NodeId) -> impl Iterator<Item = NodeId> {
        core::iter::successors(Some(node), move |&n| self.parent(n))
    }
}

/// `(d^depth - 1) / (d - 1)`, the first id of level `depth`, in a const context.
const fn level_start_of(d: u64, depth: u32) -> u64 {
    (d.pow(depth) - 1) / (d - 1)
}

const fn max_depth_of(d: u64) -> u32 {
    let mut depth = 0;
    while level_start_of(d, depth + 2) <= u32::MAX as u64 {
        depth += 1;
    }
    depth
}

/// [`Degree::max_depth`] by degree (computed at compile time: `child` is on the hot path).
const MAX_DEPTH: [u32; 17] = {
    let mut table = [0u32; 17];
    let mut d = 2;
    while d <= 16 {
        table[d] = max_depth_of(d as u64);
        d += 1;
    }
    table
};

/// [`Degree::max_node`] by degree: the last node of the deepest level, below `u32::MAX` by the
/// definition of that level.
const MAX_NODE: [u32; 17] = {
    let mut table = [0u32; 17];
    let mut d = 2;
    while d <= 16 {
        table[d] = (level_start_of(d as u64, MAX_DEPTH[d] + 1) - 1) as u32;
        d += 1;
    }
    table
};

impl Default for Degree {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u8> for Degree {
    type Error = InvalidDegree;
    fn try_from(value: u8) -> Result<Self, InvalidDegree> {
        Self::new(value)
    }
}

impl From<Degree> for u8 {
    fn from(value: Degree) -> u8 {
        value.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_child_depth_agree() {
        for d in Degree::MIN..=Degree::MAX {
            let degree = Degree::new(d).unwrap();
            for node in 0..2000u32 {
                for index in 0..d {
                    let child = degree.child(node, index).unwrap();
                    assert_eq!(degree.parent(child), Some(node));
                    assert_eq!(degree.child_index(child), index);
                    assert_eq!(degree.depth(child), degree.depth(node) + 1);
                }
            }
            assert_eq!(degree.parent(ROOT), None);
        }
    }

    #[test]
    fn degree_bounds() {
        assert_eq!(Degree::new(1), Err(InvalidDegree(1)));
        assert_eq!(Degree::new(17), Err(InvalidDegree(17)));
        assert_eq!(Degree::default().get(), 4);
    }

    #[test]
    fn max_node_fits_and_its_children_do_not() {
        for d in Degree::MIN..=Degree::MAX {
            let degree = Degree::new(d).unwrap();
            let max = degree.max_node();
            assert!(max < u32::MAX);
            assert_eq!(degree.depth(max), degree.max_depth());
            assert_eq!(degree.child(max, 0), None);
            assert!(degree.level_start(degree.max_depth() + 2) > u64::from(u32::MAX));
            // The order key of the last node is the last rank of the deepest level.
            let last_rank = u64::from(max) - degree.level_start(degree.max_depth());
            assert_eq!(u64::from(degree.order_key(max)), last_rank);
        }
        assert_eq!(Degree::new(4).unwrap().max_depth(), 15);
        assert_eq!(Degree::new(2).unwrap().max_depth(), 31);
    }

    #[test]
    fn order_key_is_left_to_right() {
        // d = 2: leaves 3, 4 (under 1) and 2 (a shallower leaf to their right).
        let degree = Degree::new(2).unwrap();
        assert!(degree.order_key(3) < degree.order_key(4));
        assert!(degree.order_key(4) < degree.order_key(2));
        assert_eq!(degree.order_key(1), degree.order_key(3));
    }
}
