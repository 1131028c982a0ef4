//! A relay's durable state: its own keys (as a member's, [`crate::persist::save_member_keys`]) and the history
//! of messages it forwarded, so that a restarted relay resumes without registering again and
//! its resync endpoints serve its history at once (DESIGN.md, persistence).
//!
//! # Layout
//!
//! ```text
//! STATE_DIR/relay.keys               the relay's keys and last sequence number (mode 0600)
//! STATE_DIR/messages/SEQ.msg         one forwarded message each, the GCKS's message file
//!                                    format (see [`super::store`]), mode 0600
//! ```
//!
//! The relay endpoint asks for each message to be stored the moment the relay forwards it
//! ([`RelayStoreOp::Message`], [`RelayStore::store_message`]) and for the keys to be saved
//! after the messages it applied ([`RelayStoreOp::Keys`], [`RelayStore::save_keys`]); the
//! driver applies both through this store's [`Storage`] implementation, each durably (temporary file, fsync, rename, fsync of the
//! directory). On open, message files newer than the saved keys (the relay died between the
//! two writes) are discarded: the relay resumes at its keys and gets the rest by resync, and a
//! missing message is a gap its endpoints answer "not held" for, never a wrong answer; so is a
//! message file that is corrupt or cannot be read ([`RestoredRelay::lost`] reports it). Files
//! older than the history window are removed as newer ones arrive.
//!
//! This module owns no socket and no clock; it only reads and writes files.

use std::fs;
use std::path::{Path, PathBuf};

use rekeycast_proto::endpoint::relay::RelayStoreOp;
use rekeycast_proto::endpoint::{Storage, StoreError as OpError};

use super::store::{
    create_private_dir, list_message_seqs, message_file_name, read_message_file,
    write_message_file, LostMessage, MessageProblem, StoreError, StoredMessage,
};
use crate::lkh::{MemberKeys, MemberStateError};
use crate::session::sender::PreparedMessage;

/// The name of the relay's key file in its state directory.
pub const KEYS_FILE: &str = "relay.keys";
const MESSAGES_DIR: &str = "messages";

/// The state directory of one relay.
#[derive(Debug)]
pub struct RelayStore {
    dir: PathBuf,
    history: usize,
}

/// What a restarted relay resumes from.
#[derive(Debug)]
pub struct RestoredRelay {
    /// The relay's keys as of the last message it applied.
    pub keys: MemberKeys,
    /// The stored messages still in the history window and not newer than the keys,
    /// ascending (gaps where the relay got a message by resync only).
    pub messages: Vec<PreparedMessage>,
    /// Message files discarded because they are newer than the saved keys.
    pub discarded: Vec<u64>,
    /// Message files of the window that are corrupt or cannot be read, ascending: gaps like
    /// a message got by resync only (answered "not held"), left on disk for the operator.
    pub lost: Vec<LostMessage>,
}

/// Why a relay's state directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayStoreError {
    /// A message file or the directory could not be read or written, or a message file is
    /// corrupt.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key file could not be read or written, or is corrupt.
    #[error("relay keys {path}")]
    Keys {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        source: MemberStateError,
    },
    /// A stored message does not rebuild into a sendable message.
    #[error("stored message {seq}: {reason}")]
    Message {
        /// The message.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// Messages are stored but no keys: the state is partial.
    #[error("state directory {0} holds messages but no relay keys: partial state")]
    MissingKeys(PathBuf),
}

impl RelayStore {
    /// Opens (creating with mode 0700 if needed) the state directory `dir`, keeping up to
    /// `history` messages. Returns the state to resume from, `None` for a directory without
    /// saved keys and messages (a relay that starts from its registration bundle).
    pub fn open(
        dir: &Path,
        history: usize,
    ) -> Result<(Self, Option<RestoredRelay>), RelayStoreError> {
        create_private_dir(dir)?;
        create_private_dir(&dir.join(MESSAGES_DIR))?;
        let store = Self {
            dir: dir.to_path_buf(),
            history: history.max(1),
        };
        let mut seqs = list_message_seqs(&store.messages_dir())?;
        seqs.sort_unstable();
        let keys_path = store.keys_path();
        if !keys_path.exists() {
            if seqs.is_empty() {
                return Ok((store, None));
            }
            return Err(RelayStoreError::MissingKeys(dir.to_path_buf()));
        }
        let keys = crate::persist::load_member_keys(&keys_path).map_err(|source| {
            RelayStoreError::Keys {
                path: keys_path.clone(),
                source,
            }
        })?;
        let last = keys.last_seq();
        let mut messages = Vec::new();
        let mut discarded = Vec::new();
        let mut lost = Vec::new();
        for seq in seqs {
            if seq > last {
                store.remove(seq)?;
                discarded.push(seq);
            } else if seq + store.history as u64 > last {
                // The relay's history only serves resync and may have gaps: a file that cannot
                // be used is one more gap, reported, not a relay that cannot start.
                let path = store.message_path(seq);
                let stored = match read_message_file(&path, seq) {
                    Ok(stored) => stored,
                    Err(StoreError::CorruptMessage { reason, .. }) => {
                        lost.push(LostMessage {
                            seq,
                            path,
                            problem: reason,
                        });
                        continue;
                    }
                    Err(StoreError::Io { source, .. }) => {
                        lost.push(LostMessage {
                            seq,
                            path,
                            problem: MessageProblem::Unreadable(source.kind()),
                        });
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                };
                match stored.to_prepared() {
                    Ok(prepared) => messages.push(prepared),
                    Err(_) => lost.push(LostMessage {
                        seq,
                        path,
                        problem: MessageProblem::Body,
                    }),
                }
            } else {
                store.remove(seq)?;
            }
        }
        Ok((
            store,
            Some(RestoredRelay {
                keys,
                messages,
                discarded,
                lost,
            }),
        ))
    }

    /// Saves the relay's keys (after every applied message), durably, mode 0600.
    pub fn save_keys(&self, keys: &MemberKeys) -> Result<(), RelayStoreError> {
        let path = self.keys_path();
        crate::persist::save_member_keys(keys, &path)
            .map_err(|source| RelayStoreError::Keys { path, source })
    }

    /// Stores a forwarded message durably (mode 0600) and removes the files that left the
    /// history window.
    pub fn store_message(&self, stored: &StoredMessage) -> Result<(), RelayStoreError> {
        write_message_file(&self.message_path(stored.seq), stored)?;
        for seq in list_message_seqs(&self.messages_dir())? {
            if seq + (self.history as u64) <= stored.seq {
                self.remove(seq)?;
            }
        }
        Ok(())
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sequence numbers of the stored messages, ascending.
    pub fn stored_seqs(&self) -> Result<Vec<u64>, RelayStoreError> {
        let mut seqs = list_message_seqs(&self.messages_dir())?;
        seqs.sort_unstable();
        Ok(seqs)
    }

    fn keys_path(&self) -> PathBuf {
        self.dir.join(KEYS_FILE)
    }

    fn messages_dir(&self) -> PathBuf {
        self.dir.join(MESSAGES_DIR)
    }

    fn message_path(&self, seq: u64) -> PathBuf {
        self.messages_dir().join(message_file_name(seq))
    }

    fn remove(&self, seq: u64) -> Result<(), RelayStoreError> {
        let path = self.message_path(seq);
        fs::remove_file(&path).map_err(|source| {
            RelayStoreError::Store(StoreError::Io {
                action: "remove",
                path,
                source,
            })
        })
    }
}

/// The relay endpoint's store operations, applied to the state directory.
impl Storage<RelayStoreOp> for RelayStore {
    fn apply(&mut self, op: &RelayStoreOp) -> Result<(), OpError> {
        let result = match op {
            RelayStoreOp::Message(message) => self.store_message(message),
            RelayStoreOp::Keys(keys) => self.save_keys(keys),
        };
        result.map_err(|error| crate::persist::store_error(&error))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;
    use std::time::Instant;

    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::gsa::{RekeySa, WrapAlgorithm};
    use crate::lkh::{Degree, KeyRng, KeyTree, MemberId};
    use crate::session::layout::{build_message, MessageParams};
    use crate::session::{ReceiverConfig, ReceiverSession, SenderConfig, SenderSession};

    /// Messages 1..=`count` of a group (message 1 admits member 1, each next one a new
    /// member), and member 1's receiver with all of them applied by resync.
    fn messages(count: u64) -> (Vec<PreparedMessage>, ReceiverSession) {
        let key = SigningKey::from_bytes(&[3; 32]);
        let sa = RekeySa {
            group_id: 4,
            spi: 1,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::DEFAULT,
            gcks_public_key: key.verifying_key(),
            data_sa_lifetime_secs: 60,
        };
        let mut tree = KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(8));
        let now = Instant::now();
        let mut sender = SenderSession::new(SenderConfig::default(), 4, 1, now).unwrap();
        let mut bundle = None;
        let mut prepared = Vec::new();
        for seq in 1..=count {
            let batch = tree.apply_batch(&[MemberId(seq)], &[]).unwrap();
            if seq == 1 {
                bundle = Some(tree.join(MemberId(1)).unwrap());
            }
            let built = build_message(
                &batch,
                &tree.leaves_in_order(),
                &key,
                &MessageParams::default(),
            )
            .unwrap();
            let message = PreparedMessage::new(built, batch.mac_key.clone()).unwrap();
            prepared.push(
                StoredMessage::from_prepared(&message)
                    .to_prepared()
                    .unwrap(),
            );
            sender.restore_message(now, message).unwrap();
        }
        let feedback = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut receiver =
            ReceiverSession::new(&bundle.unwrap(), ReceiverConfig::new(feedback)).unwrap();
        for seq in 1..=count {
            let item = sender.resync_item(seq, receiver.order_key()).unwrap();
            let (manifest, chunk) = (item.manifest.to_vec(), item.chunk.to_vec());
            receiver.handle_resync(now, &manifest, &chunk).unwrap();
        }
        (prepared, receiver)
    }

    fn seqs(messages: &[PreparedMessage]) -> Vec<u64> {
        messages.iter().map(PreparedMessage::seq).collect()
    }

    #[test]
    fn stored_history_and_keys_come_back_with_gaps_and_window() {
        let dir = tempfile::tempdir().unwrap();
        let (messages, receiver) = messages(6);
        let (store, restored) = RelayStore::open(dir.path(), 4).unwrap();
        assert!(restored.is_none());
        // Message 4 came by resync only: never stored.
        for message in messages.iter().filter(|m| m.seq() != 4) {
            store
                .store_message(&StoredMessage::from_prepared(message))
                .unwrap();
        }
        store.save_keys(receiver.keys()).unwrap();
        // The window of 4 keeps 3..=6.
        assert_eq!(store.stored_seqs().unwrap(), vec![3, 5, 6]);
        let (_, restored) = RelayStore::open(dir.path(), 4).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.keys.last_seq(), 6);
        assert_eq!(seqs(&restored.messages), vec![3, 5, 6]);
        assert!(restored.discarded.is_empty());
        assert_eq!(
            StoredMessage::from_prepared(&restored.messages[2]),
            StoredMessage::from_prepared(&messages[5])
        );
    }

    #[test]
    fn a_corrupt_or_unusable_history_file_is_a_reported_gap() {
        let dir = tempfile::tempdir().unwrap();
        let (messages, receiver) = messages(4);
        let (store, _) = RelayStore::open(dir.path(), 8).unwrap();
        for message in &messages {
            store
                .store_message(&StoredMessage::from_prepared(message))
                .unwrap();
        }
        store.save_keys(receiver.keys()).unwrap();
        let path = store.message_path(2);
        let mut bytes = fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        fs::write(&path, &bytes).unwrap();
        fs::remove_file(store.message_path(3)).unwrap();
        fs::create_dir(store.message_path(3)).unwrap();
        let (_, restored) = RelayStore::open(dir.path(), 8).unwrap();
        let restored = restored.unwrap();
        assert_eq!(seqs(&restored.messages), vec![1, 4]);
        let lost: Vec<_> = restored.lost.iter().map(|l| (l.seq, l.problem)).collect();
        assert_eq!(
            lost,
            vec![(2, MessageProblem::Checksum), (3, MessageProblem::NotAFile)]
        );
    }

    #[test]
    fn messages_newer_than_the_keys_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (messages, receiver) = messages(3);
        let (store, _) = RelayStore::open(dir.path(), 8).unwrap();
        store.save_keys(receiver.keys()).unwrap();
        // A relay that died after storing message 4 and before saving the keys that applied it.
        let (later, _) = self::messages(4);
        for message in &messages {
            store
                .store_message(&StoredMessage::from_prepared(message))
                .unwrap();
        }
        store
            .store_message(&StoredMessage::from_prepared(&later[3]))
            .unwrap();
        let (store, restored) = RelayStore::open(dir.path(), 8).unwrap();
        let restored = restored.unwrap();
        assert_eq!(seqs(&restored.messages), vec![1, 2, 3]);
        assert_eq!(restored.discarded, vec![4]);
        assert_eq!(store.stored_seqs().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn partial_or_corrupt_state_is_an_error_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("relay");
        let (messages, receiver) = messages(1);
        let (store, _) = RelayStore::open(&state, 8).unwrap();
        store
            .store_message(&StoredMessage::from_prepared(&messages[0]))
            .unwrap();
        // Messages without keys.
        let error = RelayStore::open(&state, 8).unwrap_err();
        assert!(matches!(error, RelayStoreError::MissingKeys(_)), "{error}");
        store.save_keys(receiver.keys()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(KEYS_FILE)), 0o600);
        assert_eq!(mode(&store.message_path(1)), 0o600);
        // A flipped byte in the keys.
        let path = state.join(KEYS_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let error = RelayStore::open(&state, 8).unwrap_err();
        assert!(matches!(error, RelayStoreError::Keys { .. }), "{error}");
    }

    #[test]
    fn store_operations_are_applied_durably_and_their_failures_classified() {
        let dir = tempfile::tempdir().unwrap();
        let (messages, receiver) = messages(2);
        let (mut store, _) = RelayStore::open(dir.path(), 8).unwrap();
        for message in &messages {
            let op = RelayStoreOp::Message(StoredMessage::from_prepared(message));
            store.apply(&op).unwrap();
        }
        let keys = Box::new(receiver.keys().clone());
        store.apply(&RelayStoreOp::Keys(keys.clone())).unwrap();
        let (_, restored) = RelayStore::open(dir.path(), 8).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.keys.last_seq(), 2);
        assert_eq!(seqs(&restored.messages), vec![1, 2]);
        // The messages directory gone: an I/O failure, named with its path.
        fs::remove_dir_all(dir.path().join(MESSAGES_DIR)).unwrap();
        let op = RelayStoreOp::Message(StoredMessage::from_prepared(&messages[0]));
        let error = store.apply(&op).unwrap_err();
        assert_eq!(error.kind, rekeycast_proto::endpoint::StoreErrorKind::Io);
        assert!(error.detail.contains("messages"), "{}", error.detail);
        // A full device anywhere in the chain is worth retrying later.
        let full = RelayStoreError::Store(StoreError::Io {
            action: "write",
            path: dir.path().join("x"),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32),
        });
        let error = crate::persist::store_error(&full);
        assert_eq!(
            error.kind,
            rekeycast_proto::endpoint::StoreErrorKind::NoSpace
        );
    }
}
