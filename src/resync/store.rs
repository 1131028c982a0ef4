//! The GCKS's durable state: the key tree and the history window of signed messages in a state
//! directory, written and fsynced before a message is sent, so that a restarted GCKS continues
//! the same sequence, serves resync for its history, and no member has to re-register
//! (DESIGN.md, persistence).
//!
//! # Layout and order of writes
//!
//! ```text
//! STATE_DIR/tree.snapshot            the key tree (lkh snapshot format, mode 0600)
//! STATE_DIR/messages/SEQ.msg         one signed message each (SEQ zero-padded to 20 digits)
//! STATE_DIR/leaves.journal           acknowledged leaves not yet applied (see super::journal)
//! ```
//!
//! A message file is `"RKMSG001" | BLAKE3(body) | body`, the body in postcard: sequence
//! number, MAC key, signed manifest, the chunks (the FEC source symbols). [`StateStore::commit`]
//! writes the message first, then the tree snapshot, each durably (temporary file, fsync,
//! rename, fsync of the directory). So after a crash:
//!
//! - the tree's sequence number S is the last committed message; a message file beyond S was
//!   written but never committed (the tree did not follow): it is discarded on open, and it was
//!   never sent, since sending starts after the commit;
//! - a tree at S without message S, a file that fails its hash, a message that does not parse:
//!   corrupt state, reported as an error and never silently reset.
//!
//! The files hold keys (the tree holds every key of the group; a message file its MAC key):
//! they are created with mode 0600 in a directory of mode 0700.
//!
//! [`GcksStorage`] puts this directory and its leave journal ([`super::journal`]) behind the
//! endpoint contract's [`Storage`] trait: it applies a [`GcksEndpoint`]'s store operations,
//! and [`GcksStorage::open`] loads what a restarted endpoint resumes from.
//!
//! [`GcksEndpoint`]: rekeycast_proto::endpoint::gcks::GcksEndpoint

use std::fs;
use std::path::{Path, PathBuf};

use rekeycast_proto::endpoint::gcks::{GcksStoreOp, RestoredGcks};
use rekeycast_proto::endpoint::{Storage, StoreError as OpError, StoreErrorKind};

use super::journal::{JournalError, LeaveJournal};
use crate::lkh::{KeyRng, KeyTree, SnapshotError};
pub use crate::session::StoredMessage;

const MESSAGE_MAGIC: &[u8; 8] = b"RKMSG001";
const TREE_FILE: &str = "tree.snapshot";
const MESSAGES_DIR: &str = "messages";

/// The state directory of one GCKS.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    history: usize,
}

/// What a restarted GCKS resumes from.
#[derive(Debug)]
pub struct RestoredState {
    /// The key tree as of the last committed message.
    pub tree: KeyTree,
    /// The committed messages still in the history window, ascending; the last one is the
    /// tree's sequence number.
    pub messages: Vec<StoredMessage>,
    /// Sequence numbers of message files written but never committed (discarded).
    pub discarded: Vec<u64>,
}

/// What is wrong with a state directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing failed.
    #[error("state {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The key tree snapshot is missing, corrupt or inconsistent.
    #[error("key tree snapshot {path}")]
    Tree {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong.
        source: SnapshotError,
    },
    /// A message file is corrupt.
    #[error("message file {path}: {reason}")]
    CorruptMessage {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Messages exist but no key tree: the state is partial.
    #[error("state directory {0} holds messages but no key tree snapshot: partial state")]
    MissingTree(PathBuf),
    /// The tree is at a sequence number whose message is missing.
    #[error("key tree is at message {0}, whose file is missing: partial state")]
    MissingMessage(u64),
}

impl StateStore {
    /// Opens (creating with mode 0700 if needed) the state directory `dir`, keeping up to
    /// `history` messages. Returns the state to resume from, `None` for a fresh directory.
    /// `rng` keys the restored tree from now on (the OS CSPRNG in a deployment).
    pub fn open(
        dir: &Path,
        history: usize,
        rng: KeyRng,
    ) -> Result<(Self, Option<RestoredState>), StoreError> {
        let messages_dir = dir.join(MESSAGES_DIR);
        create_private_dir(dir)?;
        create_private_dir(&messages_dir)?;
        let store = Self {
            dir: dir.to_path_buf(),
            history: history.max(1),
        };
        let mut seqs = store.message_seqs()?;
        seqs.sort_unstable();
        let tree_path = dir.join(TREE_FILE);
        if !tree_path.exists() {
            if seqs.is_empty() {
                return Ok((store, None));
            }
            return Err(StoreError::MissingTree(dir.to_path_buf()));
        }
        let tree = crate::persist::load_tree_with_rng(&tree_path, rng).map_err(|source| {
            StoreError::Tree {
                path: tree_path.clone(),
                source,
            }
        })?;
        let committed = tree.seq();
        let mut discarded = Vec::new();
        let mut messages = Vec::new();
        for seq in seqs {
            if seq > committed {
                // Written, never committed, never sent.
                let path = store.message_path(seq);
                fs::remove_file(&path).map_err(|source| StoreError::Io {
                    action: "remove",
                    path,
                    source,
                })?;
                discarded.push(seq);
            } else if seq + store.history as u64 > committed {
                messages.push(store.read_message(seq)?);
            }
        }
        if committed > 0 && messages.last().map(|m| m.seq) != Some(committed) {
            return Err(StoreError::MissingMessage(committed));
        }
        Ok((
            store,
            Some(RestoredState {
                tree,
                messages,
                discarded,
            }),
        ))
    }

    /// Commits a new message and the tree that made it: the message file, then the tree
    /// snapshot, each durably; the commit point is the snapshot's rename. Call it before the
    /// message is sent. On error the directory's committed state is the one before (a message
    /// file without its tree is discarded on open, or overwritten by the next commit of that
    /// sequence number). Message files older than the history window are then removed, at the
    /// best: one that cannot be removed now is removed by a later commit.
    pub fn commit(&self, tree: &KeyTree, message: &StoredMessage) -> Result<(), StoreError> {
        write_message_file(&self.message_path(message.seq), message)?;
        let tree_path = self.dir.join(TREE_FILE);
        crate::persist::save_tree(tree, &tree_path).map_err(|source| StoreError::Tree {
            path: tree_path,
            source,
        })?;
        // Committed: a failure to prune must not report the commit as failed.
        let _ = self.prune(message.seq);
        Ok(())
    }

    /// [`Self::commit`] with the tree given as its snapshot body
    /// ([`KeyTree::snapshot_body`], encoded off the event loop by the batch's job).
    pub fn commit_snapshot(
        &self,
        snapshot_body: &[u8],
        message: &StoredMessage,
    ) -> Result<(), StoreError> {
        write_message_file(&self.message_path(message.seq), message)?;
        let tree_path = self.dir.join(TREE_FILE);
        crate::persist::write_durably(&tree_path, crate::lkh::snapshot::MAGIC, snapshot_body)
            .map_err(|source| StoreError::Tree {
                path: tree_path,
                source: SnapshotError::Io(source),
            })?;
        // Committed: a failure to prune must not report the commit as failed.
        let _ = self.prune(message.seq);
        Ok(())
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn prune(&self, latest: u64) -> Result<(), StoreError> {
        for seq in self.message_seqs()? {
            if seq + (self.history as u64) <= latest {
                let path = self.message_path(seq);
                fs::remove_file(&path).map_err(|source| StoreError::Io {
                    action: "remove",
                    path,
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn message_path(&self, seq: u64) -> PathBuf {
        self.dir.join(MESSAGES_DIR).join(message_file_name(seq))
    }

    fn message_seqs(&self) -> Result<Vec<u64>, StoreError> {
        list_message_seqs(&self.dir.join(MESSAGES_DIR))
    }

    fn read_message(&self, seq: u64) -> Result<StoredMessage, StoreError> {
        read_message_file(&self.message_path(seq), seq)
    }
}

/// A GCKS's state directory and leave journal as the [`Storage`] of its endpoint.
#[derive(Debug)]
pub struct GcksStorage {
    store: StateStore,
    journal: LeaveJournal,
    /// The journal's mark when the endpoint started: the endpoint counts its leaves from it.
    leave_base: u64,
}

/// Why a state directory could not be opened for a GCKS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The key tree or the messages.
    #[error(transparent)]
    State(#[from] StoreError),
    /// The leave journal.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl GcksStorage {
    /// Opens the state directory `dir` (see [`StateStore::open`]) and its leave journal, and
    /// returns what an endpoint resumes from ([`RestoredGcks`]; `None` for a fresh directory).
    pub fn open(
        dir: &Path,
        history: usize,
        rng: KeyRng,
    ) -> Result<(Self, Option<RestoredGcks>), OpenError> {
        let (store, restored) = StateStore::open(dir, history, rng)?;
        let committed = restored.as_ref().map_or(0, |r| r.tree.seq());
        let (journal, replay) = LeaveJournal::open(dir, committed)?;
        let restored = restored.map(|restored| RestoredGcks {
            tree: restored.tree,
            messages: restored.messages,
            journal_leaves: replay.leaves,
            unreleased_batch: replay.unreleased_batch,
        });
        let leave_base = journal.mark();
        Ok((
            Self {
                store,
                journal,
                leave_base,
            },
            restored,
        ))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }
}

impl Storage<GcksStoreOp> for GcksStorage {
    fn apply(&mut self, op: &GcksStoreOp) -> Result<(), OpError> {
        match op {
            GcksStoreOp::RecordLeave(member) => self
                .journal
                .record_leave(*member)
                .map_err(|e| journal_error(&e)),
            GcksStoreOp::CommitBatch { tree, message, .. } => self
                .store
                .commit_snapshot(tree, message)
                .map_err(|e| store_error(&e)),
            GcksStoreOp::Release { seq, mark } => self
                .journal
                .release(*seq, self.leave_base.saturating_add(*mark))
                .map_err(|e| journal_error(&e)),
        }
    }
}

/// The class of an I/O failure: a full device is worth retrying later.
fn io_kind(kind: std::io::ErrorKind) -> StoreErrorKind {
    match kind {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            StoreErrorKind::NoSpace
        }
        _ => StoreErrorKind::Io,
    }
}

fn store_error(error: &StoreError) -> OpError {
    let kind = match error {
        StoreError::Io { source, .. }
        | StoreError::Tree {
            source: SnapshotError::Io(source),
            ..
        } => io_kind(source.kind()),
        _ => StoreErrorKind::Inconsistent,
    };
    OpError {
        kind,
        detail: crate::report::Chain(error).to_string(),
    }
}

fn journal_error(error: &JournalError) -> OpError {
    let kind = match error {
        JournalError::Io { kind, .. } => io_kind(*kind),
        _ => StoreErrorKind::Inconsistent,
    };
    OpError {
        kind,
        detail: error.to_string(),
    }
}

/// The name of message `seq`'s file in a messages directory.
pub(crate) fn message_file_name(seq: u64) -> String {
    format!("{seq:020}.msg")
}

/// The sequence numbers of the message files in `dir`, in no particular order.
pub(crate) fn list_message_seqs(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let entries = fs::read_dir(dir).map_err(|source| StoreError::Io {
        action: "list",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut seqs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::Io {
            action: "list",
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        // Temporary files of an interrupted write ("*.msg.tmp") are left to be replaced.
        if let Some(seq) = name
            .strip_suffix(".msg")
            .and_then(|s| s.parse::<u64>().ok())
        {
            seqs.push(seq);
        }
    }
    Ok(seqs)
}

/// Writes `message` to `path` durably (mode 0600) in the message file format of the module
/// docs; the relay's store ([`super::relay_store`]) shares it.
pub(crate) fn write_message_file(path: &Path, message: &StoredMessage) -> Result<(), StoreError> {
    let body = postcard::to_allocvec(message).map_err(|e| StoreError::CorruptMessage {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::persist::write_durably(path, MESSAGE_MAGIC, &body).map_err(|source| StoreError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the message file at `path`, which must hold message `seq`: magic, checksum, body and
/// sequence number checked.
pub(crate) fn read_message_file(path: &Path, seq: u64) -> Result<StoredMessage, StoreError> {
    let bytes = fs::read(path).map_err(|source| StoreError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |reason: &str| StoreError::CorruptMessage {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let header = MESSAGE_MAGIC.len() + 32;
    if bytes.len() < header || &bytes[..MESSAGE_MAGIC.len()] != MESSAGE_MAGIC {
        return Err(corrupt("bad magic or truncated"));
    }
    let body = &bytes[header..];
    if blake3::hash(body).as_bytes()[..] != bytes[MESSAGE_MAGIC.len()..header] {
        return Err(corrupt("checksum mismatch"));
    }
    let message: StoredMessage = postcard::from_bytes(body).map_err(|e| corrupt(&e.to_string()))?;
    if message.seq != seq {
        return Err(corrupt("sequence number does not match the file name"));
    }
    Ok(message)
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| StoreError::Io {
        action: "create",
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::gsa::{RekeySa, WrapAlgorithm};
    use crate::lkh::{Degree, MemberId};
    use crate::session::layout::{build_message, MessageParams};

    fn tree() -> (KeyTree, SigningKey) {
        let key = SigningKey::from_bytes(&[5; 32]);
        let sa = RekeySa {
            group_id: 9,
            spi: 1,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::DEFAULT,
            gcks_public_key: key.verifying_key(),
            data_sa_lifetime_secs: 60,
        };
        (KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(3)), key)
    }

    fn rekey(tree: &mut KeyTree, key: &SigningKey, joins: &[MemberId]) -> StoredMessage {
        let batch = tree.apply_batch(joins, &[]).unwrap();
        let built = build_message(
            &batch,
            &tree.leaves_in_order(),
            key,
            &MessageParams::default(),
        )
        .unwrap();
        let prepared = crate::session::PreparedMessage::new(built, batch.mac_key.clone()).unwrap();
        StoredMessage::from_prepared(&prepared)
    }

    #[test]
    fn commit_then_open_resumes_tree_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let (mut tree, key) = tree();
        let (store, restored) =
            StateStore::open(dir.path(), 3, KeyRng::seeded_for_simulation(1)).unwrap();
        assert!(restored.is_none());
        let mut stored = Vec::new();
        for round in 0..5u64 {
            let message = rekey(&mut tree, &key, &[MemberId(round)]);
            store.commit(&tree, &message).unwrap();
            stored.push(message);
        }
        let (_, restored) =
            StateStore::open(dir.path(), 3, KeyRng::seeded_for_simulation(2)).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.tree.seq(), 5);
        assert_eq!(restored.tree.group_key().0, tree.group_key().0);
        assert_eq!(
            restored.messages,
            stored[2..].to_vec(),
            "the last three, in order"
        );
        assert!(restored.discarded.is_empty());
        let prepared = restored.messages[2].to_prepared().unwrap();
        assert_eq!(prepared.seq(), 5);
    }

    #[test]
    fn a_message_written_but_not_committed_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut tree, key) = tree();
        let (store, _) = StateStore::open(dir.path(), 8, KeyRng::seeded_for_simulation(1)).unwrap();
        let first = rekey(&mut tree, &key, &[MemberId(1)]);
        store.commit(&tree, &first).unwrap();
        // A crash after the message file of message 2 and before its tree snapshot.
        let committed_tree = crate::persist::load_tree_with_rng(
            &dir.path().join(TREE_FILE),
            KeyRng::seeded_for_simulation(9),
        )
        .unwrap();
        let second = rekey(&mut tree, &key, &[MemberId(2)]);
        let body = postcard::to_allocvec(&second).unwrap();
        crate::persist::write_durably(&store.message_path(2), MESSAGE_MAGIC, &body).unwrap();
        let (_, restored) =
            StateStore::open(dir.path(), 8, KeyRng::seeded_for_simulation(2)).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.tree.seq(), committed_tree.seq());
        assert_eq!(restored.discarded, vec![2]);
        assert_eq!(restored.messages, vec![first]);
        assert!(!store.message_path(2).exists());
    }

    #[test]
    fn corrupt_or_partial_state_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut tree, key) = tree();
        let (store, _) = StateStore::open(dir.path(), 8, KeyRng::seeded_for_simulation(1)).unwrap();
        let first = rekey(&mut tree, &key, &[MemberId(1)]);
        store.commit(&tree, &first).unwrap();
        // A flipped byte in the message file.
        let path = store.message_path(1);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let error = StateStore::open(dir.path(), 8, KeyRng::seeded_for_simulation(2)).unwrap_err();
        assert!(
            matches!(error, StoreError::CorruptMessage { .. }),
            "{error}"
        );
        // The message gone: the tree points at a message that is missing.
        fs::remove_file(&path).unwrap();
        let error = StateStore::open(dir.path(), 8, KeyRng::seeded_for_simulation(2)).unwrap_err();
        assert!(matches!(error, StoreError::MissingMessage(1)), "{error}");
        // Messages without a tree.
        store.commit(&tree, &first).unwrap();
        fs::remove_file(dir.path().join(TREE_FILE)).unwrap();
        let error = StateStore::open(dir.path(), 8, KeyRng::seeded_for_simulation(2)).unwrap_err();
        assert!(matches!(error, StoreError::MissingTree(_)), "{error}");
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (mut tree, key) = tree();
        let (store, _) = StateStore::open(&state, 8, KeyRng::seeded_for_simulation(1)).unwrap();
        let first = rekey(&mut tree, &key, &[MemberId(1)]);
        store.commit(&tree, &first).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(TREE_FILE)), 0o600);
        assert_eq!(mode(&store.message_path(1)), 0o600);
    }

    #[test]
    fn gcks_storage_applies_an_endpoints_operations_and_reopens_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut tree, key) = tree();
        let (mut storage, restored) =
            GcksStorage::open(dir.path(), 3, KeyRng::seeded_for_simulation(1)).unwrap();
        assert!(restored.is_none());
        let message = rekey(&mut tree, &key, &[MemberId(1), MemberId(2)]);
        let commit = GcksStoreOp::CommitBatch {
            seq: 1,
            tree: tree.snapshot_body().unwrap(),
            message: message.clone(),
        };
        storage.apply(&commit).unwrap();
        storage
            .apply(&GcksStoreOp::Release { seq: 1, mark: 0 })
            .unwrap();
        // Acknowledged, not applied by any batch: replayed.
        storage
            .apply(&GcksStoreOp::RecordLeave(MemberId(2)))
            .unwrap();
        drop(storage);
        let (mut storage, restored) =
            GcksStorage::open(dir.path(), 3, KeyRng::seeded_for_simulation(2)).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.tree.seq(), 1);
        assert_eq!(restored.messages, vec![message]);
        assert_eq!(restored.journal_leaves, vec![MemberId(2)]);
        assert!(!restored.unreleased_batch);
        // A batch of the restarted endpoint (its marks count from zero) releases the replayed
        // leave; a committed batch without its release is reported unreleased.
        let message = rekey(&mut tree, &key, &[MemberId(3)]);
        storage
            .apply(&GcksStoreOp::CommitBatch {
                seq: 2,
                tree: tree.snapshot_body().unwrap(),
                message,
            })
            .unwrap();
        storage
            .apply(&GcksStoreOp::Release { seq: 2, mark: 0 })
            .unwrap();
        let message = rekey(&mut tree, &key, &[MemberId(4)]);
        storage
            .apply(&GcksStoreOp::CommitBatch {
                seq: 3,
                tree: tree.snapshot_body().unwrap(),
                message,
            })
            .unwrap();
        drop(storage);
        let (_, restored) =
            GcksStorage::open(dir.path(), 3, KeyRng::seeded_for_simulation(3)).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.tree.seq(), 3);
        assert!(restored.journal_leaves.is_empty());
        assert!(restored.unreleased_batch);
    }
}
