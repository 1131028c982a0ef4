//! A batch as a [`Job`]: the CPU work of one rekey (fork the committed key tree, apply the
//! joins and leaves, build, sign and encode the message, encode what is stored), with no clock,
//! file or socket. The [`GcksEndpoint`](super::GcksEndpoint) hands it out and commits its
//! output only after the driver stored it.
//!
//! Between batches the endpoint also hands out a fork job: it copies the committed tree into
//! the spare ahead of time (a copy of every key: the largest step of a small batch in a large
//! group), so that the next batch starts from a ready fork.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use zeroize::Zeroizing;

use super::BatchFailure;
use crate::endpoint::Job;
use crate::lkh::{KeyTree, LkhError, MemberId, RegistrationBundle};
use crate::session::layout::{build_message, MessageParams};
use crate::session::sender::{BlockSealer, PreparedMessage, QueueError, SealedBlocks};
use crate::session::StoredMessage;

/// One batch to build: run it on any thread and hand its [`BatchOutput`] back to
/// [`Endpoint::handle_job_result`](crate::endpoint::Endpoint::handle_job_result).
pub struct BatchJob {
    pub(super) committed: Arc<KeyTree>,
    pub(super) spare: Option<KeyTree>,
    /// Whether `spare` already is a fork of `committed` (made ahead by a fork job): the batch
    /// then skips the copy of the whole tree.
    pub(super) spare_ready: bool,
    /// A fork job: only copy `committed` into the spare, ahead of the next batch, so that the
    /// copy of a large tree is off the path from a batch's close to its first datagram.
    pub(super) fork_only: bool,
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
            .field("spare_ready", &self.spare_ready)
            .field("fork_only", &self.fork_only)
            .finish_non_exhaustive()
    }
}

/// What a [`BatchJob`] gives back: the built batch, or why it failed (nothing of it is
/// committed either way until the endpoint takes it); for a fork job, the fork.
pub struct BatchOutput(pub(super) Outcome);

/// What a job did.
// One a job, moved once through the driver's channel: boxing the larger variant saves nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Outcome {
    /// A batch job: the built batch, or why it failed.
    Batch(Result<Built, Failed>),
    /// A fork job: the committed tree it was given, forked (the next batch's spare).
    Forked(KeyTree),
    /// A pipelined batch job's later blocks, sealed after its built batch went back.
    Sealed(Result<SealedBlocks, (u64, QueueError)>),
}

impl std::fmt::Debug for BatchOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let batch = match &self.0 {
            Outcome::Batch(batch) => batch,
            Outcome::Forked(tree) => {
                return f
                    .debug_struct("BatchOutput")
                    .field("forked", &tree.seq())
                    .finish_non_exhaustive()
            }
            Outcome::Sealed(sealed) => {
                return f
                    .debug_struct("BatchOutput")
                    .field(
                        "sealed",
                        &sealed
                            .as_ref()
                            .map(|s| (s.seq(), s.is_last()))
                            .map_err(|e| e.0),
                    )
                    .finish_non_exhaustive()
            }
        };
        match batch {
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
    /// How long its steps took.
    pub(super) steps: BuildSteps,
}

/// How long each step of a built batch took on its worker, wall clock: what the time from a
/// batch's close to its first datagram is made of. Diagnostics only: nothing the endpoint
/// decides depends on them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildSteps {
    /// Forking the committed key tree (a copy of it into the spare).
    pub fork: Duration,
    /// Applying the joins and leaves to the fork (new keys, the wraps).
    pub apply: Duration,
    /// The joiners' registration bundles.
    pub bundles: Duration,
    /// The leaves in order (what the layout walks).
    pub leaves: Duration,
    /// Building the message: layout, chunk encoding, chunk authentication, signed manifest.
    pub message: Duration,
    /// The FEC object encoder over the chunks (copies them into one buffer).
    pub prepare: Duration,
    /// Sealing the initial transmission's datagrams and the proactive repair (each block's
    /// RaptorQ encoder is built here): of its first blocks only when the job is pipelined
    /// ([`Job::run_partial`]), the others being sealed after the batch went back.
    pub seal: Duration,
    /// Encoding what a durable endpoint stores (tree snapshot, message parts).
    pub store_encode: Duration,
    /// Dropping what the job no longer needs before it hands its output back.
    pub drop: Duration,
}

impl BuildSteps {
    /// The sum of the steps.
    pub fn total(&self) -> Duration {
        self.fork
            + self.apply
            + self.bundles
            + self.leaves
            + self.message
            + self.prepare
            + self.seal
            + self.store_encode
            + self.drop
    }
}

/// A failed batch: why, and the fork to reuse as the next spare.
pub(super) struct Failed {
    pub(super) reason: BatchFailure,
    pub(super) detail: String,
    pub(super) spare: Option<KeyTree>,
}

/// Blocks sealed per partial output of a pipelined batch job, per sealing thread: the first
/// datagrams wait for one round of them.
const BLOCKS_PER_PARTIAL: u32 = 2;

impl Job for BatchJob {
    type Output = BatchOutput;

    fn run(self) -> BatchOutput {
        self.run_with(None)
    }

    /// Pipelined: the built batch goes back with its manifest and first blocks sealed, then
    /// the later blocks' datagrams a few blocks at a time, the last of them as the returned
    /// output. The endpoint ends in the same state, with the same datagrams, as after
    /// [`Job::run`].
    fn run_partial(self, partial: &mut dyn FnMut(BatchOutput)) -> BatchOutput {
        self.run_with(Some(partial))
    }
}

impl BatchJob {
    fn run_with(self, mut partial: Option<&mut dyn FnMut(BatchOutput)>) -> BatchOutput {
        let Self {
            committed,
            spare,
            spare_ready,
            fork_only,
            joins,
            leaves,
            signing_key,
            params,
            durable,
            proactive,
        } = self;
        let mut steps = BuildSteps::default();
        let started = stopwatch();
        // The batch is built on a fork: the committed tree stays as it is until the endpoint
        // takes the fork, after the message is built and stored.
        let mut tree = match spare {
            // Forked ahead by a fork job, from this same committed tree (which does not change
            // until a batch commits): the same state a fork now would give.
            Some(spare) if spare_ready && !fork_only => spare,
            Some(mut spare) => {
                committed.fork_into(&mut spare);
                spare
            }
            None => committed.fork(),
        };
        // The endpoint's tree is unique again: once this batch commits, the tree it replaces
        // becomes the next batch's spare.
        drop(committed);
        steps.fork = started.elapsed();
        if fork_only {
            return BatchOutput(Outcome::Forked(tree));
        }
        // The tree names the key that signs its batch (a signing-key rollover changes it), so
        // the bundles it issues and the state stored with it name that key.
        tree.set_gcks_public_key(signing_key.verifying_key());
        match build(
            &mut tree,
            &joins,
            &leaves,
            &signing_key,
            &params,
            durable,
            proactive.as_ref(),
            &mut steps,
            partial.is_some(),
        ) {
            Ok((message, bundles, stored, Some(mut sealer))) => {
                let seq = message.seq();
                let built = BatchOutput(Outcome::Batch(Ok(Built {
                    tree,
                    message,
                    bundles,
                    stored,
                    steps,
                })));
                if let Some(partial) = partial.as_mut() {
                    partial(built);
                }
                let per_partial = BLOCKS_PER_PARTIAL
                    * u32::try_from(params.resolved_signing_threads()).unwrap_or(1);
                loop {
                    match sealer.seal_next(per_partial) {
                        Ok(sealed) if sealer.is_done() => {
                            return BatchOutput(Outcome::Sealed(Ok(sealed)))
                        }
                        Ok(sealed) => {
                            if let Some(partial) = partial.as_mut() {
                                partial(BatchOutput(Outcome::Sealed(Ok(sealed))));
                            }
                        }
                        Err(error) => return BatchOutput(Outcome::Sealed(Err((seq, error)))),
                    }
                }
            }
            Ok((message, bundles, stored, None)) => BatchOutput(Outcome::Batch(Ok(Built {
                tree,
                message,
                bundles,
                stored,
                steps,
            }))),
            Err((reason, detail)) => BatchOutput(Outcome::Batch(Err(Failed {
                reason,
                detail,
                spare: Some(tree),
            }))),
        }
    }
}

type BuildResult = (
    PreparedMessage,
    Bundles,
    Option<(Zeroizing<Vec<u8>>, StoredMessage)>,
    Option<BlockSealer>,
);

/// The wall clock, for [`BuildSteps`] only: a job runs on a worker outside the endpoint's
/// state machine, and nothing the endpoint decides depends on these times (a simulation, which
/// runs jobs in virtual time, just reports them).
#[allow(clippy::disallowed_methods)]
fn stopwatch() -> Instant {
    Instant::now()
}

/// Applies the batch to `tree` (a fork) and builds, signs and encodes its message, and for a
/// durable endpoint encodes the tree snapshot and the message's stored parts.
#[allow(clippy::too_many_arguments)] // the job's parts, taken apart once in `run_with`
fn build(
    tree: &mut KeyTree,
    joins: &[MemberId],
    leaves: &[MemberId],
    key: &SigningKey,
    params: &MessageParams,
    durable: bool,
    proactive: Option<&rekeycast_nack::ProactiveRepair>,
    steps: &mut BuildSteps,
    pipelined: bool,
) -> Result<BuildResult, (BatchFailure, String)> {
    let mut at = stopwatch();
    let mut lap = || {
        let now = stopwatch();
        let lap = now - at;
        at = now;
        lap
    };
    let batch = tree
        .apply_batch(joins, leaves)
        .map_err(|e| (BatchFailure::Tree(e), e.to_string()))?;
    steps.apply = lap();
    let bundles = joins
        .iter()
        .map(|member| (*member, tree.join(*member).map(Box::new)))
        .collect();
    steps.bundles = lap();
    let leaves_in_order = tree.leaves_in_order();
    steps.leaves = lap();
    let built = build_message(&batch, &leaves_in_order, key, params)
        .map_err(|e| (BatchFailure::Build, e.to_string()))?;
    steps.message = lap();
    let encode = |e: crate::session::sender::QueueError| (BatchFailure::Encode, e.to_string());
    let mut prepared = PreparedMessage::new(built, batch.mac_key.clone()).map_err(encode)?;
    steps.prepare = lap();
    // The initial transmission sealed here, off the event loop (the MAC is most of a
    // datagram's cost on the loop), with every block's repair encoder built on the way.
    // Pipelined, only the first round of blocks now: the rest is sealed after the batch went
    // back, while its first datagrams are on the wire.
    let threads = params.resolved_signing_threads();
    // One block on this thread (no thread to start): the first datagrams wait for no more.
    let head_blocks = if pipelined { 1 } else { u32::MAX };
    let sealer = prepared
        .seal_head(proactive, threads, head_blocks)
        .map_err(encode)?;
    steps.seal = lap();
    let stored = if durable {
        let snapshot = tree
            .snapshot_body()
            .map_err(|e| (BatchFailure::Snapshot, e.to_string()))?;
        Some((snapshot, StoredMessage::from_prepared(&prepared)))
    } else {
        None
    };
    steps.store_encode = lap();
    drop((batch, leaves_in_order));
    steps.drop = lap();
    Ok((prepared, bundles, stored, sealer))
}
