//! The GCKS endpoint driven by hand in virtual time over a storage in memory: the order of
//! commits against store acknowledgements, retries, poison, the admission delay, leaves that
//! wait for their record, and a restart from what was stored.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;

use super::rollover::{RolloverError, RolloverMode};
use super::*;
use crate::endpoint::{Endpoint, Job, Storage};
use crate::lkh::snapshot;

/// A storage in memory: what a state directory and a leave journal would hold, with faults
/// injected per kind of operation.
#[derive(Default)]
struct MemStorage {
    /// The committed tree's snapshot file (magic, hash, body).
    tree: Option<Vec<u8>>,
    messages: Vec<StoredMessage>,
    /// Leaves recorded (in order), and the number released by the latest release.
    leaves: Vec<MemberId>,
    released_through: usize,
    /// The latest released batch.
    released_seq: u64,
    /// Base of the endpoint's marks (leaves recorded before it started).
    base: usize,
    fail_commits: u32,
    fail_releases: u32,
    fail_records: u32,
    applied: Vec<&'static str>,
}

impl Storage<GcksStoreOp> for MemStorage {
    fn apply(&mut self, op: &GcksStoreOp) -> Result<(), StoreError> {
        let no_space = || StoreError {
            kind: StoreErrorKind::NoSpace,
            detail: "injected".into(),
        };
        match op {
            GcksStoreOp::RecordLeave(member) => {
                self.applied.push("record");
                if self.fail_records > 0 {
                    self.fail_records -= 1;
                    return Err(no_space());
                }
                self.leaves.push(*member);
            }
            GcksStoreOp::CommitBatch { tree, message, .. } => {
                self.applied.push("commit");
                if self.fail_commits > 0 {
                    self.fail_commits -= 1;
                    return Err(no_space());
                }
                let mut file = snapshot::MAGIC.to_vec();
                file.extend_from_slice(blake3::hash(tree).as_bytes());
                file.extend_from_slice(tree);
                self.tree = Some(file);
                self.messages.push(message.clone());
            }
            GcksStoreOp::Release { seq, mark } => {
                self.applied.push("release");
                if self.fail_releases > 0 {
                    self.fail_releases -= 1;
                    return Err(no_space());
                }
                self.released_seq = *seq;
                self.released_through = self.base + usize::try_from(*mark).unwrap();
            }
        }
        Ok(())
    }
}

impl MemStorage {
    /// What a restarted driver loads.
    fn restored(&self, seed: u64) -> RestoredGcks {
        let tree = KeyTree::from_snapshot_bytes(
            self.tree.as_ref().expect("a committed tree"),
            KeyRng::seeded_for_simulation(seed),
        )
        .unwrap();
        let unreleased_batch = self.released_seq < tree.seq();
        RestoredGcks {
            messages: self
                .messages
                .iter()
                .filter(|m| m.seq <= tree.seq())
                .cloned()
                .collect(),
            tree,
            not_held: Vec::new(),
            journal_leaves: self.leaves[self.released_through..].to_vec(),
            unreleased_batch,
        }
    }
}

fn config(durable: bool) -> GcksEndpointConfig {
    GcksEndpointConfig {
        group_id: 7,
        spi: 3,
        degree: Degree::DEFAULT,
        wrap_algorithm: WrapAlgorithm::Aes256Gcm,
        data_sa_lifetime_secs: 60,
        lifetimes: Default::default(),
        sender: SenderConfig::default(),
        message: MessageParams {
            signing_threads: 1,
            ..MessageParams::default()
        },
        schedule: Schedule::new(Duration::from_secs(3600), 10_000),
        admission_delay: Duration::ZERO,
        durable,
    }
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

/// A test harness: the endpoint, virtual time, the storage and every event seen.
struct Harness {
    endpoint: GcksEndpoint<u32>,
    now: Instant,
    storage: MemStorage,
    events: Vec<GcksEvent<u32>>,
    /// Jobs handed out and not run yet (when `run_jobs` is off).
    jobs: VecDeque<BatchJob>,
    /// Store operations handed out and not applied yet (when `apply_stores` is off).
    stores: VecDeque<(StoreId, GcksStoreOp)>,
    run_jobs: bool,
    apply_stores: bool,
    /// Datagrams sent while advancing time.
    sent: usize,
    /// Every datagram sent, in order.
    wire: Vec<Vec<u8>>,
    /// Whether fork jobs panic instead of running (the endpoint then stops handing them out).
    drop_forks: bool,
    /// The batch jobs run: whether each started from a fork made ahead.
    batches_run: Vec<bool>,
}

impl Harness {
    fn new(config: GcksEndpointConfig) -> Self {
        #[allow(clippy::disallowed_methods)] // the start of virtual time
        let now = Instant::now();
        let clock = WallClock {
            unix_micros: 1_700_000_000_000_000,
            at: now,
        };
        let endpoint = GcksEndpoint::new(
            config,
            key(),
            KeyRng::seeded_for_simulation(1),
            42,
            clock,
            now,
        )
        .unwrap();
        Self::around(endpoint, now, MemStorage::default())
    }

    fn around(endpoint: GcksEndpoint<u32>, now: Instant, storage: MemStorage) -> Self {
        Self {
            endpoint,
            now,
            storage,
            events: Vec::new(),
            jobs: VecDeque::new(),
            stores: VecDeque::new(),
            run_jobs: true,
            apply_stores: true,
            sent: 0,
            wire: Vec::new(),
            drop_forks: false,
            batches_run: Vec::new(),
        }
    }

    /// Drains every poll method, running jobs and applying store operations as configured.
    fn settle(&mut self) {
        loop {
            let mut progress = false;
            while let Some(op) = self.endpoint.poll_store() {
                self.stores.push_back(op);
                progress = true;
            }
            while let Some(job) = self.endpoint.poll_job() {
                self.jobs.push_back(job);
                progress = true;
            }
            while let Some(event) = self.endpoint.poll_event() {
                self.events.push(event);
                progress = true;
            }
            if self.apply_stores {
                if let Some((id, op)) = self.stores.pop_front() {
                    let result = self.storage.apply(&op);
                    self.endpoint.handle_stored(self.now, id, result);
                    progress = true;
                }
            }
            if self.run_jobs {
                if let Some(job) = self.jobs.pop_front() {
                    if job.fork_only && self.drop_forks {
                        self.endpoint.handle_job_panicked(self.now);
                        continue;
                    }
                    if !job.fork_only {
                        self.batches_run.push(job.spare_ready);
                    }
                    let output = job.run();
                    self.endpoint.handle_job_result(self.now, output);
                    progress = true;
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn command(&mut self, command: GcksCommand<u32>) {
        self.endpoint.handle_command(self.now, command);
        self.settle();
    }

    fn join(&mut self, member: u64, ticket: u32) {
        self.command(GcksCommand::Join {
            member: MemberId(member),
            relay: false,
            ticket,
        });
    }

    fn leave(&mut self, member: u64, ticket: u32) {
        self.command(GcksCommand::Leave {
            member: MemberId(member),
            ticket,
        });
    }

    fn rekey(&mut self) {
        self.command(GcksCommand::RekeyNow);
    }

    /// Advances virtual time to `at`, firing the endpoint's timeouts on the way.
    fn advance_to(&mut self, at: Instant) {
        while let Some(deadline) = self.endpoint.poll_timeout().filter(|d| *d <= at) {
            self.now = self.now.max(deadline);
            self.endpoint.handle_timeout(self.now);
            self.settle();
            // As a driver does: what the session has to send goes (pacing and heartbeats
            // deadlines move only as it sends).
            self.sent += self.transmit();
        }
        self.now = self.now.max(at);
    }

    fn advance(&mut self, by: Duration) {
        self.advance_to(self.now + by);
    }

    /// Sends whatever the endpoint has now; returns how many datagrams.
    fn transmit(&mut self) -> usize {
        let mut buf = vec![0u8; 65_536];
        let mut count = 0;
        while let Some(transmit) = self.endpoint.poll_transmit(self.now, &mut buf) {
            assert_eq!(transmit.port, Port::Serve);
            self.wire.push(buf[..transmit.len].to_vec());
            count += 1;
        }
        self.settle();
        count
    }

    /// The join answers seen, by ticket.
    fn join_answers(&self) -> Vec<(u32, Result<u64, JoinError>)> {
        self.events
            .iter()
            .filter_map(|event| match event {
                GcksEvent::JoinAnswered { ticket, result, .. } => Some((
                    *ticket,
                    result.as_ref().map(|b| b.first_seq).map_err(Clone::clone),
                )),
                _ => None,
            })
            .collect()
    }

    fn leave_answers(&self) -> Vec<(u32, Result<LeaveOutcome, LeaveError>)> {
        self.events
            .iter()
            .filter_map(|event| match event {
                GcksEvent::LeaveAnswered { ticket, result, .. } => Some((*ticket, result.clone())),
                _ => None,
            })
            .collect()
    }

    fn rekeyed(&self) -> Vec<(u64, usize, usize, usize)> {
        self.events
            .iter()
            .filter_map(|event| match event {
                GcksEvent::Rekeyed {
                    seq,
                    joined,
                    left,
                    members,
                    ..
                } => Some((*seq, *joined, *left, *members)),
                _ => None,
            })
            .collect()
    }

    fn failures(&self) -> Vec<(u64, u32, BatchFailure, Option<Duration>)> {
        self.events
            .iter()
            .filter_map(|event| match event {
                GcksEvent::BatchFailed {
                    seq,
                    attempt,
                    reason,
                    retry_in,
                    ..
                } => Some((*seq, *attempt, *reason, *retry_in)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_batch_commits_only_after_its_store_and_release_are_acknowledged() {
    let mut h = Harness::new(config(true));
    h.apply_stores = false;
    h.join(1, 10);
    h.rekey();
    // Built, handed to the storage, not acknowledged: nothing committed, nothing answered.
    assert_eq!(h.stores.len(), 1);
    assert!(matches!(
        h.stores[0].1,
        GcksStoreOp::CommitBatch { seq: 1, .. }
    ));
    assert_eq!(h.endpoint.tree().seq(), 0);
    assert_eq!(h.endpoint.stats().members, 0);
    assert!(h.join_answers().is_empty());
    assert_eq!(
        h.transmit(),
        0,
        "nothing is sent before the batch is stored"
    );
    // The commit is acknowledged: the tree advances, the release goes out, no bundle yet.
    let (id, op) = h.stores.pop_front().unwrap();
    let result = h.storage.apply(&op);
    h.endpoint.handle_stored(h.now, id, result);
    h.settle();
    assert_eq!(h.endpoint.tree().seq(), 1);
    assert!(matches!(
        h.stores.front(),
        Some((_, GcksStoreOp::Release { seq: 1, mark: 0 }))
    ));
    assert!(h.join_answers().is_empty(), "no bundle before the release");
    assert_eq!(h.transmit(), 0, "nothing is sent before the release");
    // Released: the bundle, then the message.
    h.apply_stores = true;
    h.settle();
    assert_eq!(h.join_answers(), vec![(10, Ok(1))]);
    assert_eq!(h.rekeyed(), vec![(1, 1, 0, 1)]);
    assert!(h.transmit() > 0);
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, GcksEvent::Queued { seq: 1 })));
    assert_eq!(h.storage.applied, vec!["commit", "release"]);
}

#[test]
fn a_failed_store_leaves_the_state_untouched_and_the_same_batch_is_retried_after_a_backoff() {
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.rekey();
    h.join(2, 2);
    h.storage.fail_commits = 2;
    h.rekey();
    assert_eq!(
        h.failures(),
        vec![(
            2,
            1,
            BatchFailure::Store(StoreErrorKind::NoSpace),
            Some(Duration::from_millis(100))
        )]
    );
    let stats = h.endpoint.stats();
    assert_eq!((stats.members, stats.seq, stats.pending), (1, 1, 1));
    assert_eq!(h.storage.messages.len(), 1);
    // Not before the backoff.
    h.advance(Duration::from_millis(99));
    assert_eq!(h.failures().len(), 1);
    h.advance(Duration::from_millis(1));
    assert_eq!(h.failures().len(), 2);
    assert_eq!(
        h.failures()[1],
        (
            2,
            2,
            BatchFailure::Store(StoreErrorKind::NoSpace),
            Some(Duration::from_millis(200))
        )
    );
    h.advance(Duration::from_millis(200));
    assert_eq!(h.rekeyed().last(), Some(&(2, 1, 0, 2)));
    assert_eq!(h.join_answers(), vec![(1, Ok(1)), (2, Ok(2))]);
    assert_eq!(h.endpoint.stats().pending, 0);
}

#[test]
fn a_panicked_job_poisons_and_answers_every_waiting_join() {
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.rekey();
    h.run_jobs = false;
    h.join(2, 2);
    h.rekey();
    assert_eq!(h.jobs.len(), 1);
    h.join(3, 3);
    h.jobs.clear();
    h.endpoint.handle_job_panicked(h.now);
    h.settle();
    let mut answers = h.join_answers();
    answers.sort_by_key(|(ticket, _)| *ticket);
    assert_eq!(
        answers,
        vec![
            (1, Ok(1)),
            (2, Err(JoinError::Poisoned(PoisonReason::WorkerPanicked))),
            (3, Err(JoinError::Poisoned(PoisonReason::WorkerPanicked))),
        ]
    );
    assert!(h.events.iter().any(|e| matches!(
        e,
        GcksEvent::Poisoned {
            reason: PoisonReason::WorkerPanicked
        }
    )));
    h.join(4, 4);
    h.leave(1, 5);
    assert_eq!(
        h.join_answers().last(),
        Some(&(4, Err(JoinError::Poisoned(PoisonReason::WorkerPanicked))))
    );
    assert_eq!(
        h.leave_answers(),
        vec![(5, Err(LeaveError::Poisoned(PoisonReason::WorkerPanicked)))]
    );
    assert!(h.endpoint.is_stopped());
    // The stored state is the committed one.
    assert_eq!(h.storage.messages.len(), 1);
}

#[test]
fn a_failed_release_poisons_and_the_joiners_get_no_bundle() {
    let mut h = Harness::new(config(true));
    h.join(5, 5);
    h.rekey();
    h.join(1, 1);
    h.storage.fail_releases = 1;
    h.rekey();
    assert_eq!(
        h.join_answers()[1..],
        [(
            1,
            Err(JoinError::Poisoned(PoisonReason::Journal(
                StoreErrorKind::NoSpace
            )))
        )]
    );
    assert_eq!(
        h.transmit(),
        0,
        "the message of an unreleased batch is not sent"
    );
    // A restart removes the joiner that never got its bundle.
    let restored = h.storage.restored(2);
    assert!(restored.unreleased_batch);
    let mut h = restart(h, restored);
    h.rekey();
    // (A batch that would leave the group empty cannot be laid out: member 5 stays.)
    assert_eq!(h.rekeyed(), vec![(3, 0, 1, 1)], "{:?}", h.events);
}

#[test]
fn the_admission_delay_holds_the_message_after_the_bundles() {
    let mut config = config(false);
    config.admission_delay = Duration::from_millis(50);
    let mut h = Harness::new(config);
    h.join(1, 1);
    h.join(2, 2);
    h.rekey();
    assert_eq!(h.join_answers(), vec![(1, Ok(1)), (2, Ok(1))]);
    assert_eq!(h.transmit(), 0, "held for the admission delay");
    let started = h.now;
    assert_eq!(
        h.endpoint.poll_timeout(),
        Some(started + Duration::from_millis(50))
    );
    h.advance(Duration::from_millis(49));
    assert_eq!(h.sent + h.transmit(), 0);
    h.advance(Duration::from_millis(1));
    assert!(h.sent + h.transmit() > 0);
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, GcksEvent::Queued { seq: 1 })));
    // A batch without joiners is not held.
    h.leave(1, 3);
    h.rekey();
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, GcksEvent::Queued { seq: 2 })));
}

#[test]
fn a_leave_is_answered_once_recorded_and_later_commands_wait_for_it() {
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.rekey();
    h.apply_stores = false;
    h.leave(1, 2);
    assert!(matches!(
        h.stores.front(),
        Some((_, GcksStoreOp::RecordLeave(MemberId(1))))
    ));
    assert!(h.leave_answers().is_empty());
    // A rejoin and a rekey wait for the record: no batch takes a leave not yet durable.
    h.join(1, 3);
    h.rekey();
    assert_eq!(h.jobs.len() + h.stores.len(), 1);
    h.apply_stores = true;
    h.settle();
    assert_eq!(
        h.leave_answers(),
        vec![(2, Ok(LeaveOutcome::Revoked { durable: true }))]
    );
    // The rekey ran after the record: member 1 revoked and admitted again, with a new leaf.
    assert_eq!(h.rekeyed().last(), Some(&(2, 1, 1, 1)));
    assert_eq!(h.join_answers(), vec![(1, Ok(1)), (3, Ok(2))]);
    assert!(matches!(
        h.storage.applied.as_slice(),
        ["commit", "release", "record", "commit", "release"]
    ));
}

#[test]
fn a_leave_that_cannot_be_recorded_is_refused_and_changes_nothing() {
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.rekey();
    h.storage.fail_records = 1;
    h.leave(1, 2);
    assert!(matches!(
        h.leave_answers().as_slice(),
        [(2, Err(LeaveError::NotDurable(_)))]
    ));
    assert_eq!(h.endpoint.stats().pending, 0);
    h.rekey();
    assert_eq!(h.rekeyed().last(), Some(&(2, 0, 0, 1)), "member 1 stays");
}

#[test]
fn changes_under_one_ticket_are_answered_part_by_part() {
    let mut h = Harness::new(config(true));
    h.join(5, 1);
    h.rekey();
    h.command(GcksCommand::Changes {
        changes: vec![
            Change::Join(MemberId(1)),
            Change::JoinRelay(MemberId(2)),
            Change::Leave(MemberId(5)),
            Change::Join(MemberId(1)),
        ],
        ticket: 9,
    });
    h.rekey();
    let parts: Vec<(Option<usize>, bool)> = h
        .events
        .iter()
        .filter_map(|event| match event {
            GcksEvent::JoinAnswered {
                ticket: 9,
                part,
                result,
            } => Some((*part, result.is_ok())),
            GcksEvent::LeaveAnswered {
                ticket: 9,
                part,
                result,
            } => Some((*part, result.is_ok())),
            _ => None,
        })
        .collect();
    let mut sorted = parts.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        vec![
            (Some(0), true),
            (Some(1), true),
            (Some(2), true),
            (Some(3), false)
        ]
    );
    assert_eq!(h.endpoint.stats().relays, 1);
    assert_eq!(h.rekeyed().last(), Some(&(2, 2, 1, 2)));
}

/// A restarted endpoint over what `h`'s storage holds.
fn restart(h: Harness, restored: RestoredGcks) -> Harness {
    let now = h.now + Duration::from_secs(1);
    let clock = WallClock {
        unix_micros: 1_800_000_000_000_000,
        at: now,
    };
    let mut storage = h.storage;
    storage.base = storage.leaves.len();
    let endpoint = GcksEndpoint::restore(config(true), key(), restored, 43, clock, now).unwrap();
    Harness::around(endpoint, now, storage)
}

#[test]
fn a_restored_endpoint_resumes_the_sequence_and_applies_the_journaled_leaves() {
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.join(2, 2);
    h.rekey();
    h.join(3, 3);
    h.rekey();
    // Acknowledged, never applied: the process dies here.
    h.leave(2, 4);
    assert_eq!(
        h.leave_answers(),
        vec![(4, Ok(LeaveOutcome::Revoked { durable: true }))]
    );
    let restored = h.storage.restored(5);
    assert_eq!(restored.tree.seq(), 2);
    assert!(!restored.unreleased_batch);
    let mut h = restart(h, restored);
    let stats = h.endpoint.stats();
    assert_eq!((stats.seq, stats.members, stats.pending), (2, 3, 1));
    assert_eq!(h.endpoint.session().instance(), 43);
    // The last message goes out again; the history serves resync.
    assert!(h.transmit() > 0);
    assert!(matches!(
        h.endpoint.resync_item(1, 0),
        ResyncAnswer::Item { .. } | ResyncAnswer::NoChunk
    ));
    assert_eq!(h.endpoint.resync_item(3, 0), ResyncAnswer::NotSent);
    h.rekey();
    assert_eq!(h.rekeyed(), vec![(3, 0, 1, 2)]);
    assert!(h.endpoint.tree().leaf_of(MemberId(2)).is_none());
    // The release covers the replayed leave: a second restart replays nothing.
    let restored = h.storage.restored(6);
    assert!(restored.journal_leaves.is_empty());
    assert!(!restored.unreleased_batch);
}

#[test]
fn a_restore_refuses_state_of_another_signing_key() {
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.rekey();
    let restored = h.storage.restored(2);
    let clock = WallClock {
        unix_micros: 0,
        at: h.now,
    };
    let other = SigningKey::from_bytes(&[1; 32]);
    let error =
        GcksEndpoint::<u32>::restore(config(true), other, restored, 1, clock, h.now).unwrap_err();
    // Named as what it is: the key, with both public keys, not "another group or SA".
    assert!(
        matches!(&error, GcksSetupError::ForeignKey { stored, given } if stored != given),
        "{error}"
    );
    assert!(error.to_string().contains("signing key given"), "{error}");
}

#[test]
fn messages_lost_from_storage_are_answered_not_held() {
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.rekey();
    for _ in 0..4 {
        h.rekey();
    }
    let mut restored = h.storage.restored(2);
    assert_eq!(restored.tree.seq(), 5);
    // Messages 1 (the oldest) and 3 were lost from the state directory.
    restored.messages.retain(|m| m.seq != 1 && m.seq != 3);
    restored.not_held = vec![1, 3];
    let h = restart(h, restored);
    assert_eq!(h.endpoint.stats().history_not_held, 2);
    for lost in [1, 3] {
        assert_eq!(h.endpoint.resync_item(lost, 0), ResyncAnswer::NotHeld);
        let source: &dyn crate::resync::ResyncSource = h.endpoint.session();
        assert_eq!(source.manifest(lost), crate::resync::Lookup::NotFound);
    }
    assert!(matches!(
        h.endpoint.resync_item(2, 0),
        ResyncAnswer::Item { .. } | ResyncAnswer::NoChunk
    ));
    let source: &dyn crate::resync::ResyncSource = h.endpoint.session();
    // The window still starts at the lost oldest message: "not held", not "beyond history".
    assert_eq!(source.oldest(), Some(1));
    assert_eq!(h.endpoint.resync_item(6, 0), ResyncAnswer::NotSent);
}

#[test]
fn messages_are_stamped_from_the_wall_clock_anchor() {
    let mut h = Harness::new(config(true));
    h.advance(Duration::from_millis(1500));
    h.join(1, 1);
    h.rekey();
    let manifest = h.endpoint.latest_manifest().unwrap();
    let parsed = crate::session::manifest::SignedManifest::parse(&manifest)
        .unwrap()
        .manifest;
    assert_eq!(parsed.timestamp_us, 1_700_000_000_000_000 + 1_500_000);
}

#[test]
fn stop_answers_waiting_joins_and_refuses_later_commands() {
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.command(GcksCommand::Stop);
    assert_eq!(h.join_answers(), vec![(1, Err(JoinError::Stopped))]);
    h.leave(1, 2);
    assert_eq!(h.leave_answers(), vec![(2, Err(LeaveError::Stopped))]);
    assert!(h.endpoint.is_stopped());
}

#[test]
fn a_leave_after_a_join_in_the_same_batch_cancels_the_join() {
    let mut config = config(false);
    config.admission_delay = Duration::from_millis(20);
    let mut h = Harness::new(config);
    h.join(1, 1);
    h.join(7, 2);
    h.leave(7, 3);
    assert_eq!(
        h.leave_answers(),
        vec![(3, Ok(LeaveOutcome::JoinCancelled))]
    );
    h.rekey();
    h.advance(Duration::from_millis(20));
    assert_eq!(
        h.join_answers(),
        vec![(2, Err(JoinError::Cancelled)), (1, Ok(1))],
        "no bundle for a join a later leave cancelled"
    );
    assert_eq!(h.rekeyed(), vec![(1, 1, 0, 1)]);
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, GcksEvent::Queued { seq: 1 })));
    assert_eq!(h.endpoint.stats().members, 1);
}

#[test]
fn a_leave_of_a_member_never_admitted_is_refused() {
    let mut h = Harness::new(config(false));
    h.join(1, 1);
    h.rekey();
    h.leave(99, 2);
    assert_eq!(
        h.leave_answers(),
        vec![(2, Err(LeaveError::UnknownMember(MemberId(99))))]
    );
    assert_eq!(h.endpoint.stats().pending, 0);
    h.rekey();
    assert_eq!(h.rekeyed().last(), Some(&(2, 0, 0, 1)), "member 1 stays");
}

/// Joins members `1..=count` (ticket = member) and builds them in one batch.
fn big_batch(count: u64) -> Harness {
    let mut h = Harness::new(config(true));
    for member in 1..=count {
        h.join(member, member as u32);
    }
    h.rekey();
    h
}

/// Where the first event `matches` is in `events`.
fn position(events: &[GcksEvent<u32>], matches: impl Fn(&GcksEvent<u32>) -> bool) -> usize {
    events.iter().position(matches).unwrap_or(usize::MAX)
}

#[test]
fn a_big_batch_is_answered_a_slice_per_turn_before_its_message_goes() {
    let count = 2 * ANSWER_SLICE as u64 + 3;
    let mut h = big_batch(count);
    // The release hands out one slice; the next is due at once.
    assert_eq!(h.join_answers().len(), ANSWER_SLICE);
    assert!(h.rekeyed().is_empty());
    assert_eq!(h.endpoint.poll_timeout(), Some(h.now));
    let mut slices = 1;
    while h.join_answers().len() < count as usize {
        assert_eq!(h.transmit(), 0, "the message waits for its last answer");
        assert!(h.rekeyed().is_empty());
        let before = h.join_answers().len();
        h.endpoint.handle_timeout(h.now);
        h.settle();
        let given = h.join_answers().len() - before;
        assert!(
            given > 0 && given <= ANSWER_SLICE,
            "{given} answers in one turn"
        );
        slices += 1;
    }
    assert_eq!(slices, 3);
    let expected: Vec<(u32, Result<u64, JoinError>)> =
        (1..=count).map(|member| (member as u32, Ok(1))).collect();
    assert_eq!(h.join_answers(), expected, "every joiner, in order, once");
    assert_eq!(h.rekeyed(), vec![(1, count as usize, 0, count as usize)]);
    let last_answer = h
        .events
        .iter()
        .rposition(|e| matches!(e, GcksEvent::JoinAnswered { .. }))
        .unwrap();
    let rekeyed = position(&h.events, |e| matches!(e, GcksEvent::Rekeyed { .. }));
    let queued = position(&h.events, |e| matches!(e, GcksEvent::Queued { seq: 1 }));
    assert!(
        last_answer < rekeyed && rekeyed < queued,
        "{last_answer} {rekeyed} {queued}"
    );
    assert!(h.transmit() > 0);
    assert_eq!(h.endpoint.poll_timeout().map(|at| at > h.now), Some(true));
}

#[test]
fn a_stop_while_a_big_batch_is_answered_hands_out_the_rest_at_once() {
    let count = ANSWER_SLICE as u64 + 1;
    let mut h = big_batch(count);
    assert_eq!(h.join_answers().len(), ANSWER_SLICE);
    h.command(GcksCommand::Stop);
    let expected: Vec<(u32, Result<u64, JoinError>)> =
        (1..=count).map(|member| (member as u32, Ok(1))).collect();
    assert_eq!(h.join_answers(), expected);
    assert_eq!(h.rekeyed().len(), 1);
    assert!(!h
        .events
        .iter()
        .any(|e| matches!(e, GcksEvent::Queued { .. })));
    assert_eq!(h.transmit(), 0);
}

#[test]
fn without_ticket_passes_events_on_and_keeps_answers() {
    use std::convert::Infallible;
    let events: Vec<GcksEvent<u32>> = vec![
        GcksEvent::Queued { seq: 4 },
        GcksEvent::Sent { seq: 4 },
        GcksEvent::Poisoned {
            reason: PoisonReason::WorkersGone,
        },
    ];
    for event in events {
        let text = format!("{event:?}");
        let passed: GcksEvent<Infallible> = event.without_ticket().unwrap();
        assert_eq!(format!("{passed:?}"), text);
    }
    let answer: GcksEvent<u32> = GcksEvent::LeaveAnswered {
        ticket: 9,
        part: Some(1),
        result: Ok(LeaveOutcome::AlreadyLeaving),
    };
    let Err(GcksEvent::LeaveAnswered {
        ticket: 9,
        part: Some(1),
        result: Ok(LeaveOutcome::AlreadyLeaving),
    }) = answer.without_ticket::<Infallible>()
    else {
        panic!("an answer passed as an event");
    };
}

#[test]
fn with_a_relay_assignment_bundles_list_the_relays_and_a_dead_relay_yields_a_signed_directive() {
    use crate::endpoint::directive::{RelayDirective, RelayRef};
    use crate::endpoint::gcks::assignment::RelayAssignment;
    use crate::lkh::RelayContact;
    let contact = |id: u16| RelayContact {
        id,
        group: SocketAddr::from(([239, 0, 0, id as u8], 5000)),
        feedback: SocketAddr::from(([10, 0, 0, id as u8], 5001)),
        resync: Vec::new(),
    };
    let mut h = Harness::new(config(false));
    assert!(h.endpoint.relay_directive(RelayChange::Down(1)).is_none());
    h.endpoint.set_relay_assignment(RelayAssignment::new(
        vec![contact(1), contact(2)],
        Some(contact(0)),
    ));
    h.join(1, 1);
    h.join(2, 2);
    h.rekey();
    let firsts: Vec<u16> = h
        .events
        .iter()
        .filter_map(|e| match e {
            GcksEvent::JoinAnswered {
                result: Ok(bundle), ..
            } => Some(bundle.directory.relays[0].id),
            _ => None,
        })
        .collect();
    assert_eq!(firsts, vec![1, 2], "one member on each relay");
    let bytes = h
        .endpoint
        .relay_directive(RelayChange::Down(1))
        .unwrap()
        .unwrap();
    let directive =
        RelayDirective::verify(&bytes, config(false).group_id, &key().verifying_key()).unwrap();
    assert_eq!(
        directive.target_of(RelayRef::Relay(1), 1),
        Some(RelayRef::Relay(2))
    );
}

/// Exchanges datagrams between the GCKS and one member endpoint at `member_addr` until
/// neither has anything to send: the member's go to the GCKS's serving socket, the GCKS's
/// unicast ones for the member go to the member's feedback socket, and multicast goes
/// nowhere (the member takes none). Returns the datagrams the GCKS sent the member.
fn exchange_unicast(
    h: &mut Harness,
    member: &mut crate::endpoint::member::MemberEndpoint,
    member_addr: SocketAddr,
) -> usize {
    let gcks_addr = SocketAddr::from(([198, 18, 0, 1], 7000));
    let mut buf = vec![0u8; 65_536];
    let mut to_member = 0;
    loop {
        let mut progress = false;
        while let Some(t) = member.poll_transmit(h.now, &mut buf) {
            assert_eq!(t.destination, Destination::Unicast(gcks_addr));
            h.endpoint
                .handle_datagram(h.now, Port::Serve, member_addr, &buf[..t.len]);
            progress = true;
        }
        h.settle();
        while let Some(t) = h.endpoint.poll_transmit(h.now, &mut buf) {
            if t.destination == Destination::Unicast(member_addr) {
                to_member += 1;
                let bytes = buf[..t.len].to_vec();
                member.handle_datagram(h.now, Port::Feedback, gcks_addr, &bytes);
                progress = true;
            }
        }
        h.settle();
        if !progress {
            return to_member;
        }
    }
}

/// Advances virtual time by `by` as [`Harness::advance`] does, but exchanging datagrams with
/// the member ([`exchange_unicast`]) instead of discarding them. Returns the datagrams the
/// GCKS sent the member.
fn advance_unicast(
    h: &mut Harness,
    member: &mut crate::endpoint::member::MemberEndpoint,
    member_addr: SocketAddr,
    by: Duration,
) -> usize {
    let at = h.now + by;
    let mut to_member = exchange_unicast(h, member, member_addr);
    loop {
        let next = [h.endpoint.poll_timeout(), member.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .filter(|d| *d <= at);
        let Some(deadline) = next else {
            break;
        };
        h.now = h.now.max(deadline);
        if h.endpoint.poll_timeout().is_some_and(|d| d <= h.now) {
            h.endpoint.handle_timeout(h.now);
        }
        if member.poll_timeout().is_some_and(|d| d <= h.now) {
            member.handle_timeout(h.now);
        }
        h.settle();
        while member.poll_fetch().is_some() {}
        while member.poll_event().is_some() {}
        to_member += exchange_unicast(h, member, member_addr);
    }
    h.now = h.now.max(at);
    to_member
}

#[test]
fn a_unicast_member_gets_each_message_by_unicast_and_acknowledges_it() {
    use rand::SeedableRng;

    let mut h = Harness::new(config(false));
    h.endpoint.mark_unicast(MemberId(2));
    h.join(1, 1);
    h.join(2, 2);
    h.rekey();
    h.advance(Duration::from_millis(10));
    let bundles: Vec<RegistrationBundle> = h
        .events
        .iter()
        .filter_map(|event| match event {
            GcksEvent::JoinAnswered {
                result: Ok(bundle), ..
            } => Some(bundle.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(bundles.len(), 2);
    let unicast = bundles.iter().find(|b| b.member == MemberId(2)).unwrap();
    assert!(unicast.unicast);
    assert!(
        !bundles
            .iter()
            .find(|b| b.member == MemberId(1))
            .unwrap()
            .unicast
    );

    let gcks_addr = SocketAddr::from(([198, 18, 0, 1], 7000));
    let member_addr = SocketAddr::from(([198, 18, 0, 2], 9000));
    let mut member = crate::endpoint::member::MemberEndpoint::new(
        unicast,
        crate::endpoint::member::MemberEndpointConfig::new(
            SocketAddr::from(([239, 1, 1, 1], 5000)),
            gcks_addr,
        ),
        rand_chacha::ChaCha8Rng::seed_from_u64(5),
        h.now,
    )
    .unwrap();
    // Its announcement tells the GCKS where it is; the first message follows, one datagram.
    let step = Duration::from_millis(10);
    assert_eq!(advance_unicast(&mut h, &mut member, member_addr, step), 1);
    assert_eq!(member.session().next_seq(), unicast.first_seq + 1);
    assert!(member.session().group_key().is_some());

    // The next rekey (member 1 leaves) reaches it the same way.
    h.leave(1, 3);
    h.rekey();
    assert_eq!(advance_unicast(&mut h, &mut member, member_addr, step), 1);
    assert_eq!(member.session().next_seq(), unicast.first_seq + 2);
    let counters = *h.endpoint.unicast_counters();
    assert_eq!(counters.deliveries_sent, 2);
    assert_eq!(counters.retransmissions, 0);
    assert_eq!(counters.messages_acknowledged, 2);
    assert_eq!(member.unicast_counters().unwrap().applied, 2);

    // Once it leaves, it is sent nothing more.
    h.leave(2, 4);
    h.rekey();
    let long = Duration::from_secs(30);
    assert_eq!(advance_unicast(&mut h, &mut member, member_addr, long), 0);
    assert_eq!(h.endpoint.unicast_counters().deliveries_sent, 2);
}

fn next_key() -> SigningKey {
    SigningKey::from_bytes(&[10; 32])
}

/// The signing key id and announcement of each stored message's manifest, by sequence number.
fn stored_signers(
    storage: &MemStorage,
) -> Vec<(u64, crate::session::manifest::KeyId, Option<u64>)> {
    storage
        .messages
        .iter()
        .map(|m| {
            let manifest = crate::session::manifest::SignedManifest::parse(&m.manifest)
                .unwrap()
                .manifest;
            (
                m.seq,
                manifest.signing_key_id,
                manifest.key_rollover.map(|r| r.from_seq),
            )
        })
        .collect()
}

fn rolled(events: &[GcksEvent<u32>]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|event| match event {
            GcksEvent::SigningKeyRolled { from_seq, .. } => Some(*from_seq),
            _ => None,
        })
        .collect()
}

#[test]
fn a_planned_rollover_announces_under_the_old_key_then_signs_with_the_next() {
    use crate::session::manifest::KeyId;
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.rekey();
    let now = h.now;
    let from_seq = h
        .endpoint
        .roll_signing_key(now, next_key(), RolloverMode::Planned { announcements: 2 })
        .unwrap();
    h.settle();
    assert_eq!(from_seq, 4);
    let old = KeyId::of(&key().verifying_key());
    let new = KeyId::of(&next_key().verifying_key());
    // Messages 2 and 3 (refreshes the endpoint asked for itself) announce; 4 is the first
    // under the next key, and the stored tree names it.
    assert_eq!(
        stored_signers(&h.storage),
        vec![
            (1, old, None),
            (2, old, Some(4)),
            (3, old, Some(4)),
            (4, new, None)
        ]
    );
    assert_eq!(rolled(&h.events), vec![4]);
    assert_eq!(h.endpoint.signing_key_id(), new);
    assert_eq!(h.endpoint.rollover_from_seq(), None);
    assert_eq!(
        h.endpoint.tree().rekey_sa().gcks_public_key,
        next_key().verifying_key()
    );
    // A joiner now registers with the next key.
    h.join(2, 2);
    h.rekey();
    assert_eq!(stored_signers(&h.storage).last(), Some(&(5, new, None)));
    let restored = h.storage.restored(3);
    assert_eq!(
        restored.tree.rekey_sa().gcks_public_key,
        next_key().verifying_key()
    );
    // A second rollover while none is under way is fine; two at once are not.
    let now = h.now;
    h.apply_stores = false;
    let third = SigningKey::from_bytes(&[11; 32]);
    assert!(h
        .endpoint
        .roll_signing_key(now, third.clone(), RolloverMode::DEFAULT_PLANNED)
        .is_ok());
    assert!(matches!(
        h.endpoint
            .roll_signing_key(now, third, RolloverMode::DEFAULT_PLANNED),
        Err(RolloverError::InProgress { .. })
    ));
}

#[test]
fn rollover_refuses_the_same_key_and_no_announcement() {
    let mut h = Harness::new(config(true));
    let now = h.now;
    assert_eq!(
        h.endpoint
            .roll_signing_key(now, key(), RolloverMode::DEFAULT_PLANNED),
        Err(RolloverError::SameKey)
    );
    assert_eq!(
        h.endpoint
            .roll_signing_key(now, next_key(), RolloverMode::Planned { announcements: 0 }),
        Err(RolloverError::NoAnnouncement)
    );
    h.command(GcksCommand::Stop);
    assert_eq!(
        h.endpoint
            .roll_signing_key(h.now, next_key(), RolloverMode::DEFAULT_PLANNED),
        Err(RolloverError::Stopped)
    );
}

/// A crash after an announcing message was stored: the restarted endpoint (still under the
/// old key, which the stored tree names) finds the announcement in its history and resumes
/// the rollover with the next key the driver kept; a crash after the first message under the
/// next key was stored restarts under the next key only.
#[test]
fn a_rollover_resumes_across_a_restart_at_each_crash_point() {
    use crate::session::manifest::KeyId;
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.rekey();
    // Stores are held: the announcing message 2 is committed, then the process dies.
    let now = h.now;
    h.apply_stores = false;
    h.endpoint
        .roll_signing_key(now, next_key(), RolloverMode::Planned { announcements: 2 })
        .unwrap();
    h.settle();
    let (id, op) = h.stores.pop_front().unwrap();
    let result = h.storage.apply(&op);
    assert!(result.is_ok());
    let _ = id; // never acknowledged: the process died
    let restored = h.storage.restored(7);
    assert_eq!(restored.tree.seq(), 2);
    assert_eq!(
        restored.tree.rekey_sa().gcks_public_key,
        key().verifying_key()
    );
    let mut h = restart(h, restored);
    let announced = h.endpoint.announced_rollover().unwrap();
    assert_eq!(
        (announced.next_key, announced.from_seq),
        (next_key().verifying_key(), 4)
    );
    // Only the announced key resumes it.
    let now = h.now;
    assert_eq!(
        h.endpoint
            .resume_rollover(now, SigningKey::from_bytes(&[12; 32])),
        Err(RolloverError::NotAnnounced)
    );
    assert_eq!(h.endpoint.resume_rollover(now, next_key()), Ok(4));
    h.settle();
    let old = KeyId::of(&key().verifying_key());
    let new = KeyId::of(&next_key().verifying_key());
    assert_eq!(
        stored_signers(&h.storage)[1..],
        [(2, old, Some(4)), (3, old, Some(4)), (4, new, None)]
    );
    assert_eq!(rolled(&h.events), vec![4]);
    // Crash after message 4: the stored tree names the next key; the old key is refused.
    let restored = h.storage.restored(8);
    let clock = WallClock {
        unix_micros: 0,
        at: h.now,
    };
    assert!(matches!(
        GcksEndpoint::<u32>::restore(config(true), key(), restored, 1, clock, h.now),
        Err(GcksSetupError::ForeignKey { .. })
    ));
    let restored = h.storage.restored(8);
    let endpoint =
        GcksEndpoint::<u32>::restore(config(true), next_key(), restored, 1, clock, h.now).unwrap();
    assert_eq!(endpoint.announced_rollover(), None);
    assert_eq!(endpoint.signing_key_id(), new);
}

/// A compromised-key rollover announces nothing: the next message is already under the new
/// key.
#[test]
fn a_compromised_key_rollover_signs_the_next_message_with_the_new_key_unannounced() {
    use crate::session::manifest::KeyId;
    let mut h = Harness::new(config(true));
    h.join(1, 1);
    h.rekey();
    let now = h.now;
    assert_eq!(
        h.endpoint
            .roll_signing_key(now, next_key(), RolloverMode::Compromised),
        Ok(2)
    );
    h.settle();
    assert_eq!(
        stored_signers(&h.storage),
        vec![
            (1, KeyId::of(&key().verifying_key()), None),
            (2, KeyId::of(&next_key().verifying_key()), None)
        ]
    );
    assert_eq!(rolled(&h.events), vec![2]);
}

#[test]
fn a_batch_from_a_tree_forked_ahead_sends_what_a_batch_that_forks_itself_sends() {
    let run = |drop_forks: bool| {
        let mut h = Harness::new(config(false));
        h.drop_forks = drop_forks;
        for member in 1..=40 {
            h.join(member, member as u32);
        }
        h.rekey();
        h.advance(Duration::from_secs(2));
        for member in 1..=6 {
            h.leave(member, 100 + member as u32);
        }
        for member in 41..=52 {
            h.join(member, member as u32);
        }
        h.rekey();
        h.advance(Duration::from_secs(2));
        h.rekey();
        h.advance(Duration::from_secs(2));
        assert_eq!(h.rekeyed().len(), 3);
        (h.wire, h.batches_run)
    };
    let (ahead, ahead_batches) = run(false);
    let (itself, itself_batches) = run(true);
    // Every batch starts from the fork made ahead (at the start, then after each commit) only
    // when fork jobs run.
    assert_eq!(ahead_batches, vec![true, true, true]);
    assert_eq!(itself_batches, vec![false, false, false]);
    assert!(ahead.len() > 20, "{} datagrams", ahead.len());
    assert_eq!(ahead, itself);
}

/// The symbol datagrams (manifests and chunks) of message `seq` among `wire`, in order.
fn symbols_of(wire: &[Vec<u8>], seq: u64) -> Vec<Vec<u8>> {
    use crate::wire::{DatagramType, Packet};
    wire.iter()
        .filter(|bytes| {
            Packet::new_checked(bytes.as_slice()).is_ok_and(|packet| {
                packet.seq() == seq && packet.datagram_type() == DatagramType::Symbol
            })
        })
        .cloned()
        .collect()
}

#[test]
fn a_pipelined_batch_sends_its_first_blocks_before_its_last_blocks_are_sealed() {
    let mut config = config(false);
    // Small blocks: the message of 300 fresh members is many blocks.
    config.message.max_block_symbols = 2;
    config.message.signing_threads = 1;
    let joins = |h: &mut Harness| {
        for member in 1..=300 {
            h.join(member, member as u32);
        }
    };
    // The reference: the job run whole.
    let mut whole = Harness::new(config.clone());
    joins(&mut whole);
    whole.rekey();
    whole.advance(Duration::from_secs(5));
    let reference = symbols_of(&whole.wire, 1);
    // Pipelined: the job's outputs handed over one at a time.
    let mut h = Harness::new(config);
    joins(&mut h);
    h.run_jobs = false;
    h.rekey();
    let job = h.jobs.pop_front().expect("the batch job");
    assert!(!job.fork_only);
    let mut outputs = Vec::new();
    let last = job.run_partial(&mut |output| outputs.push(output));
    outputs.push(last);
    assert!(
        outputs.len() >= 3,
        "the job gave {} outputs: not pipelined",
        outputs.len()
    );
    let mut outputs = outputs.into_iter();
    h.run_jobs = true;
    h.endpoint
        .handle_job_result(h.now, outputs.next().expect("the built batch"));
    h.settle();
    h.advance(Duration::from_secs(1));
    // The manifest and the first block went out; the rest waits for its blocks.
    let early = symbols_of(&h.wire, 1);
    assert!(
        early.len() >= 2,
        "{} datagrams before the rest",
        early.len()
    );
    assert!(early.len() < reference.len());
    assert_eq!(early, reference[..early.len()]);
    assert!(h.endpoint.poll_timeout().map_or(true, |at| at > h.now));
    let mut sent = early.len();
    for output in outputs {
        h.endpoint.handle_job_result(h.now, output);
        h.settle();
        h.advance(Duration::from_millis(500));
        let now_sent = symbols_of(&h.wire, 1).len();
        assert!(now_sent > sent, "each part sends more");
        sent = now_sent;
    }
    h.advance(Duration::from_secs(5));
    // The same datagrams as the job run whole, in the same order.
    assert_eq!(symbols_of(&h.wire, 1), reference);
}
