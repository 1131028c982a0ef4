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
//! - a tree at S without message S, or a message S that fails its hash or does not parse:
//!   corrupt state, reported as an error and never silently reset;
//! - an older message of the history window that is missing, fails its hash, does not parse or
//!   cannot be read is only needed for resync: the directory still opens, the message is
//!   reported lost ([`RestoredState::lost`]) and a restarted GCKS answers "not held" for it
//!   (a member then asks its next endpoint). A lost message file is left as it is for the
//!   operator to inspect; it is removed when the window moves past it.
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
    /// Messages of the history window, older than the last, whose files are missing or cannot
    /// be used, ascending: resync cannot serve them from this directory.
    pub lost: Vec<LostMessage>,
}

/// A message of the history window that a state directory does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message {seq} ({path}): {problem}")]
pub struct LostMessage {
    /// Its sequence number.
    pub seq: u64,
    /// Its file.
    pub path: PathBuf,
    /// What is wrong with the file.
    pub problem: MessageProblem,
}

/// What is wrong with a message file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageProblem {
    /// The file is missing.
    #[error("file missing")]
    Missing,
    /// Something other than a regular file (a directory, a device) is in its place.
    #[error("not a regular file")]
    NotAFile,
    /// The file cannot be read.
    #[error("cannot be read ({0})")]
    Unreadable(std::io::ErrorKind),
    /// The file is shorter than its header or does not start with the magic number.
    #[error("bad magic or truncated")]
    Truncated,
    /// The body does not match its checksum.
    #[error("checksum mismatch")]
    Checksum,
    /// The body does not parse.
    #[error("body does not parse")]
    Body,
    /// The body is of another sequence number than the file's name.
    #[error("sequence number does not match the file name")]
    WrongSeq,
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
        reason: MessageProblem,
    },
    /// A message could not be encoded for its file.
    #[error("message {seq} cannot be encoded")]
    Encode {
        /// The message.
        seq: u64,
    },
    /// Messages exist but no key tree: the state is partial.
    #[error("state directory {0} holds messages but no key tree snapshot: partial state")]
    MissingTree(PathBuf),
    /// The tree is at a sequence number whose message is missing.
    #[error("key tree is at message {0}, whose file is missing: partial state")]
    MissingMessage(u64),
    /// Something other than a directory is where a state directory should be.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
}

/// Whether the state directory `dir` holds a GCKS's state (a key tree snapshot or a message
/// file): a GCKS must then resume it with the key that signed it, never with a new one.
pub fn holds_state(dir: &Path) -> Result<bool, StoreError> {
    let tree = dir.join(TREE_FILE);
    match fs::symlink_metadata(&tree) {
        Ok(_) => return Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StoreError::Io {
                action: "inspect",
                path: tree,
                source,
            })
        }
    }
    let messages = dir.join(MESSAGES_DIR);
    match list_message_seqs(&messages) {
        Ok(seqs) => Ok(!seqs.is_empty()),
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(false)
        }
        Err(error) => Err(error),
    }
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
        let mut held = Vec::new();
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
                held.push(seq);
            }
        }
        let mut messages = Vec::new();
        let mut lost = Vec::new();
        if committed > 0 {
            // The last message is sent again at start and answers state requests: without it
            // the state is partial.
            if held.last() != Some(&committed) {
                return Err(StoreError::MissingMessage(committed));
            }
            let latest = store.read_message(committed)?;
            // The window runs from the oldest file in it: older ones were pruned (or the
            // window was larger). A message between that one and the last whose file is
            // missing or unusable is lost, not fatal: only resync needs it.
            let first = held.first().copied().unwrap_or(committed);
            let mut files = held.iter().copied().peekable();
            for seq in first..committed {
                let present = files.next_if_eq(&seq).is_some();
                let problem = if present {
                    match store.read_message(seq) {
                        Ok(message) => {
                            messages.push(message);
                            continue;
                        }
                        Err(StoreError::CorruptMessage { reason, .. }) => reason,
                        Err(StoreError::Io { source, .. }) => {
                            MessageProblem::Unreadable(source.kind())
                        }
                        Err(error) => return Err(error),
                    }
                } else {
                    MessageProblem::Missing
                };
                lost.push(LostMessage {
                    seq,
                    path: store.message_path(seq),
                    problem,
                });
            }
            messages.push(latest);
        }
        Ok((
            store,
            Some(RestoredState {
                tree,
                messages,
                discarded,
                lost,
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

    /// Removes the message files older than the window; one that cannot be removed (a
    /// directory in its place) does not keep the others: the first failure is returned after
    /// every file was tried.
    fn prune(&self, latest: u64) -> Result<(), StoreError> {
        let mut first_error = None;
        for seq in self.message_seqs()? {
            if seq + (self.history as u64) <= latest {
                let path = self.message_path(seq);
                if let Err(source) = fs::remove_file(&path) {
                    first_error.get_or_insert(StoreError::Io {
                        action: "remove",
                        path,
                        source,
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
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
    /// Messages of the window found lost on open.
    lost: Vec<LostMessage>,
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
        let lost = restored
            .as_ref()
            .map(|restored| restored.lost.clone())
            .unwrap_or_default();
        let restored = restored.map(|restored| RestoredGcks {
            tree: restored.tree,
            messages: restored.messages,
            not_held: restored.lost.iter().map(|lost| lost.seq).collect(),
            journal_leaves: replay.leaves,
            unreleased_batch: replay.unreleased_batch,
        });
        let leave_base = journal.mark();
        Ok((
            Self {
                store,
                journal,
                leave_base,
                lost,
            },
            restored,
        ))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    /// The messages of the history window found lost when the directory was opened
    /// ([`RestoredState::lost`]).
    pub fn lost(&self) -> &[LostMessage] {
        &self.lost
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
    let body =
        postcard::to_allocvec(message).map_err(|_| StoreError::Encode { seq: message.seq })?;
    crate::persist::write_durably(path, MESSAGE_MAGIC, &body).map_err(|source| StoreError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the message file at `path`, which must hold message `seq`: a regular file, magic,
/// checksum, body and sequence number checked.
pub(crate) fn read_message_file(path: &Path, seq: u64) -> Result<StoredMessage, StoreError> {
    let io_error = |source| StoreError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |reason| StoreError::CorruptMessage {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = fs::File::open(path).map_err(io_error)?;
    // Checked on the opened file, so the file checked is the file read.
    if !file.metadata().map_err(io_error)?.is_file() {
        return Err(corrupt(MessageProblem::NotAFile));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(io_error)?;
    let header = MESSAGE_MAGIC.len() + 32;
    if bytes.len() < header || &bytes[..MESSAGE_MAGIC.len()] != MESSAGE_MAGIC {
        return Err(corrupt(MessageProblem::Truncated));
    }
    let body = &bytes[header..];
    if blake3::hash(body).as_bytes()[..] != bytes[MESSAGE_MAGIC.len()..header] {
        return Err(corrupt(MessageProblem::Checksum));
    }
    let message: StoredMessage =
        postcard::from_bytes(body).map_err(|_| corrupt(MessageProblem::Body))?;
    if message.seq != seq {
        return Err(corrupt(MessageProblem::WrongSeq));
    }
    Ok(message)
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    // A file in the way would otherwise read as "File exists".
    if fs::metadata(dir).is_ok_and(|metadata| !metadata.is_dir()) {
        return Err(StoreError::NotADirectory(dir.to_path_buf()));
    }
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

    /// A store with messages 1..=`count` committed, and the messages.
    fn committed(dir: &Path, history: usize, count: u64) -> (StateStore, Vec<StoredMessage>) {
        let (mut tree, key) = tree();
        let (store, _) = StateStore::open(dir, history, KeyRng::seeded_for_simulation(1)).unwrap();
        let mut stored = Vec::new();
        for round in 0..count {
            let message = rekey(&mut tree, &key, &[MemberId(round)]);
            store.commit(&tree, &message).unwrap();
            stored.push(message);
        }
        (store, stored)
    }

    #[test]
    fn lost_older_messages_are_reported_and_the_rest_opens() {
        let dir = tempfile::tempdir().unwrap();
        let (store, stored) = committed(dir.path(), 8, 6);
        // Message 2: a flipped byte. Message 3: truncated. Message 4: deleted. Message 5: a
        // directory in its place.
        let flip = store.message_path(2);
        let mut bytes = fs::read(&flip).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&flip, &bytes).unwrap();
        let cut = store.message_path(3);
        let bytes = fs::read(&cut).unwrap();
        fs::write(&cut, &bytes[..20]).unwrap();
        fs::remove_file(store.message_path(4)).unwrap();
        fs::remove_file(store.message_path(5)).unwrap();
        fs::create_dir(store.message_path(5)).unwrap();
        let (_, restored) =
            StateStore::open(dir.path(), 8, KeyRng::seeded_for_simulation(2)).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.tree.seq(), 6);
        assert_eq!(
            restored.messages,
            vec![stored[0].clone(), stored[5].clone()]
        );
        let lost: Vec<_> = restored
            .lost
            .iter()
            .map(|lost| (lost.seq, lost.problem))
            .collect();
        assert_eq!(
            lost,
            vec![
                (2, MessageProblem::Checksum),
                (3, MessageProblem::Truncated),
                (4, MessageProblem::Missing),
                (5, MessageProblem::NotAFile),
            ]
        );
        assert_eq!(restored.lost[0].path, store.message_path(2));
        // Each is named in one line: its number, its file, what is wrong, and no cause twice.
        let text = restored.lost[2].to_string();
        assert!(
            text.contains("message 4") && text.contains("file missing"),
            "{text}"
        );
        // Left for the operator to inspect.
        assert!(store.message_path(2).exists());
        // Through the GCKS's storage: the endpoint is told which messages are not held.
        let (storage, restored) =
            GcksStorage::open(dir.path(), 8, KeyRng::seeded_for_simulation(3)).unwrap();
        assert_eq!(restored.unwrap().not_held, vec![2, 3, 4, 5]);
        assert_eq!(storage.lost().len(), 4);
    }

    #[test]
    fn messages_before_the_oldest_file_are_outside_the_window_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = committed(dir.path(), 3, 5);
        // The window was 3 (messages 3..=5); opened with a larger one, nothing is lost.
        let (_, restored) =
            StateStore::open(dir.path(), 8, KeyRng::seeded_for_simulation(2)).unwrap();
        let restored = restored.unwrap();
        assert!(restored.lost.is_empty(), "{:?}", restored.lost);
        assert_eq!(restored.messages.len(), 3);
        // The last message stays required: corrupt, the directory does not open.
        let path = store.message_path(5);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let error = StateStore::open(dir.path(), 8, KeyRng::seeded_for_simulation(2)).unwrap_err();
        assert!(
            matches!(
                error,
                StoreError::CorruptMessage {
                    reason: MessageProblem::Checksum,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_file_that_cannot_be_pruned_does_not_keep_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (_, stored) = committed(dir.path(), 32, 20);
        // A directory in place of the oldest message file: it cannot be removed as a file.
        let (store, restored) =
            StateStore::open(dir.path(), 2, KeyRng::seeded_for_simulation(2)).unwrap();
        fs::remove_file(store.message_path(1)).unwrap();
        fs::create_dir(store.message_path(1)).unwrap();
        let mut tree = restored.unwrap().tree;
        let key = SigningKey::from_bytes(&[5; 32]);
        let message = rekey(&mut tree, &key, &[MemberId(99)]);
        store.commit(&tree, &message).unwrap();
        // Every file the window left is pruned, whatever the order the directory lists them
        // in; the directory stays.
        let mut seqs = store.message_seqs().unwrap();
        seqs.sort_unstable();
        assert_eq!(seqs, vec![1, 20, 21]);
        assert!(store.message_path(1).is_dir());
        assert_eq!(stored.len(), 20);
    }

    #[test]
    fn a_file_in_place_of_a_state_directory_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _) = committed(dir.path(), 4, 1);
        let messages = dir.path().join(MESSAGES_DIR);
        fs::remove_dir_all(&messages).unwrap();
        fs::write(&messages, b"").unwrap();
        let error = StateStore::open(dir.path(), 4, KeyRng::seeded_for_simulation(2)).unwrap_err();
        assert!(
            matches!(&error, StoreError::NotADirectory(path) if *path == messages),
            "{error}"
        );
        assert!(error.to_string().ends_with("is not a directory"), "{error}");
    }

    #[test]
    fn holds_state_tells_a_new_directory_from_a_stored_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(!holds_state(&state).unwrap());
        let (store, _) = committed(&state, 4, 1);
        assert!(holds_state(&state).unwrap());
        // The tree alone, or the messages alone, is a state too.
        fs::remove_file(store.message_path(1)).unwrap();
        assert!(holds_state(&state).unwrap());
        let (_, _) = committed(&dir.path().join("other"), 4, 1);
        fs::remove_file(dir.path().join("other").join(TREE_FILE)).unwrap();
        assert!(holds_state(&dir.path().join("other")).unwrap());
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
