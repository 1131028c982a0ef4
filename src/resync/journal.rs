//! The GCKS's leave journal: each leave (a revocation) is appended and fsynced here before it is
//! acknowledged, and replayed when the GCKS starts, so an acknowledged leave survives a crash
//! that comes before the batch applying it is durable.
//!
//! It also says whether the latest committed batch was released: the GCKS appends a release
//! after a batch is durable and before it hands that batch's joiners their bundles. A batch
//! committed without its release (a crash in between) admitted members who never got a bundle:
//! the GCKS that starts on that state removes them in its first batch, so the key tree holds no
//! leaf whose keys nobody was given.
//!
//! # File format
//!
//! ```text
//! STATE_DIR/leaves.journal   "RKLVJ001" | record*      (mode 0600)
//! record (25 bytes)          kind (1) | id (8, BE) | value (8, BE) | BLAKE3(kind|id|value)[..8]
//! ```
//!
//! - kind 1, a leave: `value` is the member id; `id` numbers the leaves, increasing.
//! - kind 2, a release: the batch whose message has sequence number `id` is durable and every
//!   leave numbered below `value` is applied by it or an earlier batch.
//!
//! Records are only appended (each append fsynced), and the file is rewritten (temporary
//! file, fsync, rename, fsync of the directory) with only the unreleased leaves and the latest
//! release when it is opened and when it has grown.
//!
//! The parser is total. A crash can leave the last record torn: a short tail, or a last record
//! that fails its checksum; it is ignored (that append was never acknowledged). A bad record
//! anywhere else, a bad magic, ids that do not increase or an unknown kind are corruption,
//! reported as [`JournalError::Corrupt`] and never silently dropped: a lost leave is a member
//! that keeps receiving keys.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::lkh::MemberId;

const MAGIC: &[u8; 8] = b"RKLVJ001";
const JOURNAL_FILE: &str = "leaves.journal";
/// The length of one record.
pub const RECORD_LEN: usize = 25;
const KIND_LEAVE: u8 = 1;
const KIND_RELEASE: u8 = 2;
/// Records after which a release rewrites the file with only the unreleased leaves.
const COMPACT_AFTER: u64 = 4096;

/// Why the journal cannot be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Reading or writing failed.
    #[error("leave journal: {action}: {kind}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The error's kind.
        kind: std::io::ErrorKind,
    },
    /// The journal is corrupt before its last record.
    #[error("leave journal corrupt at byte {offset}: {reason}")]
    Corrupt {
        /// Where.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
}

/// One parsed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A leave, acknowledged once appended.
    Leave {
        /// The record's number.
        id: u64,
        /// The member.
        member: MemberId,
    },
    /// Batch `seq` is durable; every leave numbered below `through` is applied.
    Release {
        /// The batch's sequence number.
        seq: u64,
        /// The first leave number not released.
        through: u64,
    },
}

/// What [`parse`] found: the records, and whether a torn tail was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The intact records, in order.
    pub records: Vec<Record>,
    /// Bytes of a torn last record that were ignored.
    pub torn_tail: usize,
}

/// The leave journal of one state directory.
#[derive(Debug)]
pub struct LeaveJournal {
    path: PathBuf,
    file: File,
    /// The number the next leave gets.
    next_id: u64,
    /// Leaves not released yet: (number, member).
    unreleased: Vec<(u64, MemberId)>,
    /// The latest release: (batch sequence number, first leave number not released).
    released: (u64, u64),
    /// Records in the file.
    records: u64,
    /// Records after which a release compacts the file.
    compact_after: u64,
    /// The length of the file's intact records: an append that failed part way (a full
    /// device) is cut back to it, so the next append does not land after a torn record.
    len: u64,
    /// Whether a failed append could not be cut back yet: the next append tries first.
    torn: bool,
}

/// What a journal holds when the GCKS starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Members whose leaves were acknowledged and not released, in the order they came.
    pub leaves: Vec<MemberId>,
    /// Whether the latest committed batch was never released: its joiners never got their
    /// bundles.
    pub unreleased_batch: bool,
}

impl LeaveJournal {
    /// Opens (creating if needed) the journal of the state directory `dir`, whose committed
    /// key tree is at message `committed_seq`, and returns what it holds. A journal without a
    /// release (new, or from before journals) counts `committed_seq` as released. The file is
    /// rewritten with just the unreleased leaves and the latest release (which also drops a
    /// torn tail).
    pub fn open(dir: &Path, committed_seq: u64) -> Result<(Self, Replay), JournalError> {
        let path = dir.join(JOURNAL_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error("read", &e)),
        };
        let parsed = if bytes.is_empty() {
            Parsed {
                records: Vec::new(),
                torn_tail: 0,
            }
        } else {
            parse(&bytes)?
        };
        let mut released: Option<(u64, u64)> = None;
        let mut leaves = Vec::new();
        let mut next_id = 0u64;
        for record in &parsed.records {
            match *record {
                Record::Leave { id, member } => {
                    leaves.push((id, member));
                    next_id = id + 1;
                }
                Record::Release { seq, through } => {
                    let (latest, below) = released.unwrap_or((0, 0));
                    released = Some((latest.max(seq), below.max(through)));
                }
            }
        }
        let released = released.unwrap_or((committed_seq, 0));
        leaves.retain(|(id, _)| *id >= released.1);
        let replay = Replay {
            leaves: leaves.iter().map(|(_, member)| *member).collect(),
            unreleased_batch: released.0 < committed_seq,
        };
        let file = rewrite(&path, &leaves, released)?;
        let len = journal_len(leaves.len());
        Ok((
            Self {
                path,
                file,
                next_id,
                records: leaves.len() as u64 + 1,
                unreleased: leaves,
                released,
                compact_after: COMPACT_AFTER,
                len,
                torn: false,
            },
            replay,
        ))
    }

    /// Appends a leave of `member` and syncs it: once this returns, the leave survives a
    /// crash.
    pub fn record_leave(&mut self, member: MemberId) -> Result<(), JournalError> {
        let id = self.next_id;
        self.append(&encode(KIND_LEAVE, id, member.0))?;
        self.next_id += 1;
        self.unreleased.push((id, member));
        Ok(())
    }

    /// The number the next leave gets: a batch that takes every pending leave now covers the
    /// leaves below it.
    pub fn mark(&self) -> u64 {
        self.next_id
    }

    /// Records that batch `seq` is durable and every leave numbered below `mark` is applied.
    /// Call it before the batch's joiners get their bundles. When the file has grown, it is
    /// rewritten with just the unreleased leaves and this release.
    pub fn release(&mut self, seq: u64, mark: u64) -> Result<(), JournalError> {
        self.append(&encode(KIND_RELEASE, seq, mark))?;
        self.released = (seq, mark);
        self.unreleased.retain(|(id, _)| *id >= mark);
        if self.records > self.compact_after {
            self.file = rewrite(&self.path, &self.unreleased, self.released)?;
            self.records = self.unreleased.len() as u64 + 1;
            self.len = journal_len(self.unreleased.len());
        }
        Ok(())
    }

    /// Leaves acknowledged and not released.
    pub fn unreleased(&self) -> usize {
        self.unreleased.len()
    }

    fn append(&mut self, record: &[u8; RECORD_LEN]) -> Result<(), JournalError> {
        self.append_with(record, |file, bytes| file.write_all(bytes))
    }

    /// Appends `record` with `write` (the file's `write_all`; a test injects a failing one).
    /// A write or sync that fails may have left part of the record in the file: it is cut
    /// back to the intact records, now or before the next append, since a record after a
    /// torn one would make the journal unreadable (only the last record may be torn).
    fn append_with(
        &mut self,
        record: &[u8; RECORD_LEN],
        write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), JournalError> {
        if self.torn {
            self.cut_back()?;
        }
        let written = write(&mut self.file, record)
            .map_err(|e| io_error("append", &e))
            .and_then(|()| self.file.sync_data().map_err(|e| io_error("sync", &e)));
        if let Err(error) = written {
            self.torn = true;
            // Best effort now; the next append tries again and fails if it still cannot.
            let _ = self.cut_back();
            return Err(error);
        }
        self.len += RECORD_LEN as u64;
        self.records += 1;
        Ok(())
    }

    /// Cuts the file back to its intact records after a failed append.
    fn cut_back(&mut self) -> Result<(), JournalError> {
        self.file
            .set_len(self.len)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_error("cut back a failed append", &e))?;
        self.torn = false;
        Ok(())
    }
}

/// Parses a journal's bytes (magic included). Total: any input gives records or an error.
pub fn parse(bytes: &[u8]) -> Result<Parsed, JournalError> {
    if bytes.len() < MAGIC.len() {
        // A crash while the file was first written: nothing was acknowledged yet.
        if MAGIC.starts_with(bytes) {
            return Ok(Parsed {
                records: Vec::new(),
                torn_tail: bytes.len(),
            });
        }
        return Err(JournalError::Corrupt {
            offset: 0,
            reason: "bad magic",
        });
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(JournalError::Corrupt {
            offset: 0,
            reason: "bad magic",
        });
    }
    let body = &bytes[MAGIC.len()..];
    let whole = body.len() / RECORD_LEN;
    let mut records = Vec::with_capacity(whole);
    let mut torn_tail = body.len() % RECORD_LEN;
    let mut next_leave = 0u64;
    for (index, raw) in body.chunks_exact(RECORD_LEN).enumerate() {
        let offset = (MAGIC.len() + index * RECORD_LEN) as u64;
        let last = index + 1 == whole && torn_tail == 0;
        let corrupt = |reason| JournalError::Corrupt { offset, reason };
        let (head, sum) = raw.split_at(RECORD_LEN - 8);
        if blake3::hash(head).as_bytes()[..8] != *sum {
            if last {
                // A torn last append: never acknowledged.
                torn_tail = RECORD_LEN;
                break;
            }
            return Err(corrupt("checksum mismatch"));
        }
        let id = u64::from_be_bytes(head[1..9].try_into().map_err(|_| corrupt("length"))?);
        let value = u64::from_be_bytes(head[9..17].try_into().map_err(|_| corrupt("length"))?);
        match head[0] {
            KIND_LEAVE => {
                if id < next_leave {
                    return Err(corrupt("leave numbers do not increase"));
                }
                next_leave = id.checked_add(1).ok_or(corrupt("leave number overflow"))?;
                records.push(Record::Leave {
                    id,
                    member: MemberId(value),
                });
            }
            KIND_RELEASE => records.push(Record::Release {
                seq: id,
                through: value,
            }),
            _ => return Err(corrupt("unknown record kind")),
        }
    }
    Ok(Parsed { records, torn_tail })
}

/// The length of a rewritten journal: the magic, the release and `leaves` leaves.
fn journal_len(leaves: usize) -> u64 {
    (MAGIC.len() + (leaves + 1) * RECORD_LEN) as u64
}

fn encode(kind: u8, id: u64, value: u64) -> [u8; RECORD_LEN] {
    let mut record = [0u8; RECORD_LEN];
    record[0] = kind;
    record[1..9].copy_from_slice(&id.to_be_bytes());
    record[9..17].copy_from_slice(&value.to_be_bytes());
    let sum = blake3::hash(&record[..17]);
    record[17..].copy_from_slice(&sum.as_bytes()[..8]);
    record
}

/// Writes the journal with just the latest release and `leaves` durably (temporary file,
/// fsync, rename, fsync of the directory) and opens it for appending.
fn rewrite(
    path: &Path,
    leaves: &[(u64, MemberId)],
    released: (u64, u64),
) -> Result<File, JournalError> {
    let mut bytes = Vec::with_capacity(MAGIC.len() + (leaves.len() + 1) * RECORD_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&encode(KIND_RELEASE, released.0, released.1));
    for (id, member) in leaves {
        bytes.extend_from_slice(&encode(KIND_LEAVE, *id, member.0));
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = crate::persist::create_temporary(&tmp).map_err(|e| io_error("create", &e))?;
    let written = file
        .write_all(&bytes)
        .map_err(|e| io_error("write", &e))
        .and_then(|()| file.sync_all().map_err(|e| io_error("sync", &e)));
    drop(file);
    if let Err(error) =
        written.and_then(|()| fs::rename(&tmp, path).map_err(|e| io_error("rename", &e)))
    {
        // Best effort: a full device or a directory in the way leaves no half-written file.
        let _ = fs::remove_file(&tmp);
        return Err(error);
    }
    crate::persist::sync_parent(path).map_err(|e| io_error("sync directory", &e))?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| io_error("open", &e))
}

fn io_error(action: &'static str, error: &std::io::Error) -> JournalError {
    JournalError::Io {
        action,
        kind: error.kind(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_survive_reopen_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, replay) = LeaveJournal::open(dir.path(), 4).unwrap();
        assert_eq!(
            replay,
            Replay {
                leaves: vec![],
                unreleased_batch: false
            }
        );
        journal.record_leave(MemberId(5)).unwrap();
        let mark = journal.mark();
        journal.record_leave(MemberId(9)).unwrap();
        drop(journal);
        let (mut journal, replay) = LeaveJournal::open(dir.path(), 4).unwrap();
        assert_eq!(replay.leaves, vec![MemberId(5), MemberId(9)]);
        assert!(!replay.unreleased_batch);
        // Numbers go on after a reopen: the mark of the first leave still means it alone.
        journal.release(5, mark).unwrap();
        drop(journal);
        let (mut journal, replay) = LeaveJournal::open(dir.path(), 5).unwrap();
        assert_eq!(replay.leaves, vec![MemberId(9)]);
        assert!(!replay.unreleased_batch);
        journal.release(6, journal.mark()).unwrap();
        assert_eq!(journal.unreleased(), 0);
        drop(journal);
        // Batch 7 committed, never released: its joiners never got their bundles.
        let (_, replay) = LeaveJournal::open(dir.path(), 7).unwrap();
        assert_eq!(
            replay,
            Replay {
                leaves: vec![],
                unreleased_batch: true
            }
        );
        assert_eq!(
            fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len(),
            (MAGIC.len() + RECORD_LEN) as u64,
            "rewritten with the latest release alone"
        );
    }

    #[test]
    fn a_long_journal_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = LeaveJournal::open(dir.path(), 0).unwrap();
        journal.compact_after = 16;
        for seq in 1..=40 {
            journal.record_leave(MemberId(seq)).unwrap();
            journal.release(seq, journal.mark()).unwrap();
        }
        journal.record_leave(MemberId(77)).unwrap();
        let len = fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len();
        assert!(len <= (MAGIC.len() + 18 * RECORD_LEN) as u64, "{len} bytes");
        drop(journal);
        let (_, replay) = LeaveJournal::open(dir.path(), 40).unwrap();
        assert_eq!(replay.leaves, vec![MemberId(77)]);
        assert!(!replay.unreleased_batch);
    }

    #[test]
    fn a_torn_last_record_is_ignored_and_earlier_corruption_is_an_error() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&encode(KIND_LEAVE, 0, 7));
        bytes.extend_from_slice(&encode(KIND_LEAVE, 1, 8));
        let whole = parse(&bytes).unwrap();
        assert_eq!(whole.records.len(), 2);
        // Torn at every length inside the last record: the first leave stays.
        for cut in 1..RECORD_LEN {
            let parsed = parse(&bytes[..bytes.len() - cut]).unwrap();
            assert_eq!(
                parsed.records,
                vec![Record::Leave {
                    id: 0,
                    member: MemberId(7)
                }]
            );
            assert_eq!(parsed.torn_tail, RECORD_LEN - cut);
        }
        // A last record whose bytes never reached the disk (zeros): torn, ignored.
        let mut zeroed = bytes.clone();
        let len = zeroed.len();
        zeroed[len - RECORD_LEN..].fill(0);
        assert_eq!(parse(&zeroed).unwrap().records.len(), 1);
        // Every single-bit flip in the first record is corruption, never a silent drop.
        for bit in 0..RECORD_LEN * 8 {
            let mut flipped = bytes.clone();
            flipped[MAGIC.len() + bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(parse(&flipped), Err(JournalError::Corrupt { .. })),
                "bit {bit}"
            );
        }
        assert!(matches!(
            parse(b"RKLVJ00X"),
            Err(JournalError::Corrupt { offset: 0, .. })
        ));
        assert_eq!(parse(b"RKL").unwrap().records, vec![]);
    }

    #[test]
    fn an_append_that_fails_part_way_does_not_corrupt_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = LeaveJournal::open(dir.path(), 3).unwrap();
        journal.record_leave(MemberId(5)).unwrap();
        // A full device: ten bytes of the record reach the file, then the write fails. The
        // leave is not acknowledged.
        let full = journal.append_with(&encode(KIND_LEAVE, 1, 6), |file, bytes| {
            file.write_all(&bytes[..10])?;
            Err(std::io::Error::from_raw_os_error(28))
        });
        assert!(
            matches!(full, Err(JournalError::Io { kind, .. }) if kind == std::io::ErrorKind::StorageFull),
            "{full:?}"
        );
        // Space again: later leaves are acknowledged and the journal still reads.
        journal.record_leave(MemberId(7)).unwrap();
        journal.record_leave(MemberId(8)).unwrap();
        drop(journal);
        let (_, replay) = LeaveJournal::open(dir.path(), 3).unwrap();
        assert_eq!(replay.leaves, vec![MemberId(5), MemberId(7), MemberId(8)]);
    }

    #[test]
    fn a_directory_in_place_of_the_journal_is_an_error_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(JOURNAL_FILE)).unwrap();
        assert!(matches!(
            LeaveJournal::open(dir.path(), 0),
            Err(JournalError::Io { .. })
        ));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(JOURNAL_FILE)]);
    }

    #[test]
    fn decreasing_numbers_and_unknown_kinds_are_corruption() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&encode(KIND_LEAVE, 4, 7));
        bytes.extend_from_slice(&encode(KIND_LEAVE, 2, 8));
        assert!(matches!(parse(&bytes), Err(JournalError::Corrupt { .. })));
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&encode(9, 0, 7));
        assert!(matches!(parse(&bytes), Err(JournalError::Corrupt { .. })));
    }
}
