//! A batch as a [`Job`]: the CPU work of one rekey (fork the committed key tree, apply the
//! joins and leaves, build, sign and encode the message, encode what is stored), with no clock,
//! file or socket. The [`GcksEndpoint`](super::GcksEndpoint) hands it out and commits its
//! output only after the driver stored it.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use zeroize::Zeroizing;

use super::BatchFailure;
use crate::endpoint::Job;
use crate::lkh::{KeyTree, LkhError, MemberId, RegistrationBundle};
use crate::session::layout::{build_message, MessageParams};
use crate::session::sender::PreparedMessage;
use crate::session::StoredMessage;

/// One batch to build: run it on any thread and hand its [`BatchOutput`] back to
/// [`Endpoint::handle_job_result`](crate::endpoint::Endpoint::handle_job_result).
pub struct BatchJob {
    pub(super) committed: Arc<KeyTree>,
    pub(super) spare: Option<KeyTree>,
    pub(super) joins: Vec<MemberId>,
    pub(super) leaves: Vec<MemberId>,
    pub(super) signing_key: Arc<SigningKey>,
    pub(super) params: MessageParams,
    /// Whether to encode what the driver stores (the tree snapshot, the message's parts).
    pub(super) durable: bool,
    /// The sender's proactive repair estimator when the batch closed: how many repair symbols
    /// per block to seal in advance with the rest of the initial transmission.
    pub(super) proactive: Option<rekeycast_nack::ProactiveRepair>,
}

impl std::fmt::Debug for BatchJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchJob")
            .field("seq", &(self.committed.seq() + 1))
            .field("joins", &self.joins.len())
            .field("leaves", &self.leaves.len())
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

/// What a [`BatchJob`] gives back: the built batch, or why it failed (nothing of it is
/// committed either way until the endpoint takes it).
pub struct BatchOutput(pub(super) Result<Built, Failed>);

impl std::fmt::Debug for BatchOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ok(built) => f
                .debug_struct("BatchOutput")
                .field("seq", &built.message.seq())
                .finish_non_exhaustive(),
            Err(failed) => f
                .debug_struct("BatchOutput")
                .field("failure", &failed.reason)
                .finish_non_exhaustive(),
        }
    }
}

/// A joiner's bundle, boxed: a 2^20-join batch's bundles are then 2^20 small allocations,
/// freed one by one as their answers go, and a list of pointers, not hundreds of MB in one
/// buffer that the loop would free at once.
pub(super) type BundleResult = Result<Box<RegistrationBundle>, LkhError>;

/// One joiner's bundle, with the member.
pub(super) type Answer = (MemberId, BundleResult);

/// The bundles of a batch's joiners, in the order of its joins.
pub(super) type Bundles = Vec<Answer>;

/// A built batch, not committed: the advanced fork of the tree, its message, the joiners'
/// bundles and, for a durable endpoint, what the driver stores.
pub(super) struct Built {
    pub(super) tree: KeyTree,
    pub(super) message: PreparedMessage,
    pub(super) bundles: Bundles,
    pub(super) stored: Option<(Zeroizing<Vec<u8>>, StoredMessage)>,
}

/// A failed batch: why, and the fork to reuse as the next spare.
pub(super) struct Failed {
    pub(super) reason: BatchFailure,
    pub(super) detail: String,
    pub(super) spare: Option<KeyTree>,
}

impl Job for BatchJob {
    type Output = BatchOutput;

    fn run(self) -> BatchOutput {
        let Self {
            committed,
            spare,
            joins,
            leaves,
            signing_key,
            params,
            durable,
            proactive,
        } = self;
        // The batch is built on a fork: the committed tree stays as it is until the endpoint
        // takes the fork, after the message is built and stored.
        let mut tree = match spare {
            Some(mut spare) => {
                committed.fork_into(&mut spare);
                spare
            }
            None => committed.fork(),
        };
        // The endpoint's tree is unique again: once this batch commits, the tree it replaces
        // becomes the next batch's spare.
        drop(committed);
        match build(
            &mut tree,
            &joins,
            &leaves,
            &signing_key,
            &params,
            durable,
            proactive.as_ref(),
        ) {
            Ok((message, bundles, stored)) => BatchOutput(Ok(Built {
                tree,
                message,
                bundles,
                stored,
            })),
            Err((reason, detail)) => BatchOutput(Err(Failed {
                reason,
                detail,
                spare: Some(tree),
            })),
        }
    }
}

type BuildResult = (
    PreparedMessage,
    Bundles,
    Option<(Zeroizing<Vec<u8>>, StoredMessage)>,
);

/// Applies the batch to `tree` (a fork) and builds, signs and encodes its message, and for a
/// durable endpoint encodes the tree snapshot and the message's stored parts.
fn build(
    tree: &mut KeyTree,
    joins: &[MemberId],
    leaves: &[MemberId],
    key: &SigningKey,
    params: &MessageParams,
    durable: bool,
    proactive: Option<&rekeycast_nack::ProactiveRepair>,
) -> Result<BuildResult, (BatchFailure, String)> {
    let batch = tree
        .apply_batch(joins, leaves)
        .map_err(|e| (BatchFailure::Tree(e), e.to_string()))?;
    let bundles = joins
        .iter()
        .map(|member| (*member, tree.join(*member).map(Box::new)))
        .collect();
    let built = build_message(&batch, &tree.leaves_in_order(), key, params)
        .map_err(|e| (BatchFailure::Build, e.to_string()))?;
    let encode = |e: crate::session::sender::QueueError| (BatchFailure::Encode, e.to_string());
    let mut prepared = PreparedMessage::new(built, batch.mac_key.clone()).map_err(encode)?;
    // The initial transmission sealed here, off the event loop (the MAC is most of a
    // datagram's cost on the loop), with every block's repair encoder built on the way.
    prepared
        .seal_initial(proactive, params.resolved_signing_threads())
        .map_err(encode)?;
    let stored = if durable {
        let snapshot = tree
            .snapshot_body()
            .map_err(|e| (BatchFailure::Snapshot, e.to_string()))?;
        Some((snapshot, StoredMessage::from_prepared(&prepared)))
    } else {
        None
    };
    Ok((prepared, bundles, stored))
}
