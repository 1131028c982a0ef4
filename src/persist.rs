//! Files written durably: a key tree's snapshot and a member's keys, and the one routine that
//! writes any state file (a temporary file, fsync, rename, fsync of the directory), so a crash
//! leaves the old file or the new one, never a mix.
//!
//! The sans-IO crate encodes and checks the bytes ([`KeyTree::snapshot_body`],
//! [`KeyTree::from_snapshot_bytes`], [`MemberKeys::state_body`],
//! [`MemberKeys::from_state_bytes`]); this module owns the files. Every state file is a magic
//! number, the BLAKE3 hash of the body, then the body.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use rekeycast_proto::endpoint::member::MemberStoreOp;
use rekeycast_proto::endpoint::{Storage, StoreError, StoreErrorKind};
use zeroize::Zeroize;

use crate::lkh::SnapshotError;
use crate::lkh::{member_state, snapshot, KeyRng, KeyTree, MemberKeys, MemberStateError};

/// The endpoint contract's form of a storage failure: [`StoreErrorKind::NoSpace`] when an I/O
/// error in `error`'s chain says the device is full or over quota, else
/// [`StoreErrorKind::Io`]; the detail is the whole chain.
pub fn store_error(error: &(dyn std::error::Error + 'static)) -> StoreError {
    let mut kind = StoreErrorKind::Io;
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            let full = [nix::errno::Errno::ENOSPC, nix::errno::Errno::EDQUOT]
                .iter()
                .any(|errno| io.raw_os_error() == Some(*errno as i32));
            if full {
                kind = StoreErrorKind::NoSpace;
            }
        }
        source = cause.source();
    }
    StoreError {
        kind,
        detail: crate::report::Chain(error).to_string(),
    }
}

/// Writes `magic`, the BLAKE3 hash of `body` and `body` to `path` durably: a temporary file
/// (mode 0600) beside it, fsync, rename, fsync of the directory. A crash leaves the old file
/// or the new one, never a mix.
///
/// The temporary file is created afresh (a leftover of an earlier attempt is removed first,
/// and a symbolic link in its place is never followed), and it is removed again when the write
/// fails: a full device or a directory in the way leaves no half-written file behind.
pub fn write_durably(path: &Path, magic: &[u8], body: &[u8]) -> std::io::Result<()> {
    let hash = blake3::hash(body);
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    let mut file = create_temporary(tmp)?;
    let written = file
        .write_all(magic)
        .and_then(|()| file.write_all(hash.as_bytes()))
        .and_then(|()| file.write_all(body))
        .and_then(|()| file.sync_all());
    drop(file);
    if let Err(error) = written.and_then(|()| fs::rename(tmp, path)) {
        // Best effort: the write already failed, and a leftover is replaced by the next one.
        let _ = fs::remove_file(tmp);
        return Err(error);
    }
    sync_parent(path)
}

/// Creates the temporary file `tmp` for a durable write, mode 0600: any file left there by an
/// interrupted write is removed first, and the new one is created exclusively without
/// following a symbolic link, so a link planted at that name cannot redirect a secret
/// elsewhere.
pub(crate) fn create_temporary(tmp: &Path) -> std::io::Result<File> {
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
        options.custom_flags(nix::libc::O_NOFOLLOW);
    }
    options.open(tmp)
}

/// Syncs the directory holding `path`, so that a rename into it survives a crash.
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Writes the tree to `path` durably. Call it after [`KeyTree::apply_batch`] and before
/// sending the message.
pub fn save_tree(tree: &KeyTree, path: &Path) -> Result<(), SnapshotError> {
    let body = tree.snapshot_body()?;
    write_durably(path, snapshot::MAGIC, &body).map_err(SnapshotError::Io)
}

/// Loads a tree saved by [`save_tree`], keyed from the OS CSPRNG from now on.
pub fn load_tree(path: &Path) -> Result<KeyTree, SnapshotError> {
    load_tree_with_rng(path, KeyRng::from_os()?)
}

/// Loads a tree with another key source ([`KeyRng::seeded_for_simulation`] for tests and
/// simulation only).
pub fn load_tree_with_rng(path: &Path, rng: KeyRng) -> Result<KeyTree, SnapshotError> {
    let mut bytes = fs::read(path)?;
    let result = KeyTree::from_snapshot_bytes(&bytes, rng);
    bytes.zeroize();
    result
}

/// Writes the member's keys and last sequence number to `path` durably (mode 0600). Call it
/// after every applied message; [`load_member_keys`] reads it back.
pub fn save_member_keys(keys: &MemberKeys, path: &Path) -> Result<(), MemberStateError> {
    let body = keys.state_body()?;
    write_durably(path, member_state::MAGIC, &body).map_err(MemberStateError::Io)
}

/// A member's key file as the [`Storage`] of a member endpoint: each
/// [`MemberStoreOp::SaveKeys`] replaces the file durably (as [`save_member_keys`] does), and
/// [`load_member_keys`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberKeyFile {
    path: std::path::PathBuf,
}

impl MemberKeyFile {
    /// The key file at `path`.
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Storage<MemberStoreOp> for MemberKeyFile {
    fn apply(&mut self, op: &MemberStoreOp) -> Result<(), StoreError> {
        match op {
            MemberStoreOp::SaveKeys { body, .. } => {
                write_durably(&self.path, member_state::MAGIC, body).map_err(|error| {
                    let kind = match error.raw_os_error() {
                        Some(code) if code == 28 || code == 122 => StoreErrorKind::NoSpace,
                        _ => StoreErrorKind::Io,
                    };
                    StoreError {
                        kind,
                        detail: format!("{}: {error}", self.path.display()),
                    }
                })
            }
            // Operations a later version adds: not this storage's to apply.
            _ => Err(StoreError {
                kind: StoreErrorKind::Inconsistent,
                detail: "unknown member store operation".into(),
            }),
        }
    }
}

/// Loads keys saved by [`save_member_keys`]. A missing file is an I/O error; a corrupt,
/// truncated or inconsistent one is an error of its own kind.
pub fn load_member_keys(path: &Path) -> Result<MemberKeys, MemberStateError> {
    let mut bytes = fs::read(path)?;
    let result = MemberKeys::from_state_bytes(&bytes);
    bytes.zeroize();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gsa::{RekeySa, WrapAlgorithm};
    use crate::lkh::{Degree, MemberId};

    fn sa() -> RekeySa {
        RekeySa {
            group_id: 9,
            spi: 0x1234,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::DEFAULT,
            gcks_public_key: ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key(),
            data_sa_lifetime_secs: 3600,
        }
    }

    /// A tree with members 0..6 admitted, and member 0's keys from its bundle.
    fn tree_and_member() -> (KeyTree, MemberKeys) {
        let mut tree = KeyTree::with_rng(sa(), KeyRng::seeded_for_simulation(3));
        let joins: Vec<MemberId> = (0..6).map(MemberId).collect();
        tree.apply_batch(&joins, &[]).unwrap();
        let keys = MemberKeys::from_bundle(&tree.join(MemberId(0)).unwrap());
        (tree, keys)
    }

    #[test]
    fn a_saved_tree_loads_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tree.snapshot");
        let (tree, _) = tree_and_member();
        save_tree(&tree, &path).unwrap();
        let mut loaded = load_tree(&path).unwrap();
        assert_eq!(loaded.seq(), tree.seq());
        assert_eq!(loaded.group_key(), tree.group_key());
        assert_eq!(loaded.next_mac_key(), tree.next_mac_key());
        assert_eq!(loaded.leaves_in_order(), tree.leaves_in_order());
        let next = loaded.apply_batch(&[], &[MemberId(1)]).unwrap();
        assert_eq!(next.context.seq, tree.seq() + 1);
    }

    #[test]
    fn saved_member_keys_load_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("member.state");
        let (_, keys) = tree_and_member();
        save_member_keys(&keys, &path).unwrap();
        let loaded = load_member_keys(&path).unwrap();
        assert_eq!(loaded.member(), keys.member());
        assert_eq!(loaded.leaf(), keys.leaf());
        assert_eq!(loaded.rekey_sa(), keys.rekey_sa());
        assert_eq!(loaded.last_seq(), keys.last_seq());
    }

    #[cfg(unix)]
    #[test]
    fn state_files_are_private_and_leave_no_temporary() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (tree, keys) = tree_and_member();
        let member = dir.path().join("member.state");
        let snapshot = dir.path().join("tree.snapshot");
        save_member_keys(&keys, &member).unwrap();
        save_tree(&tree, &snapshot).unwrap();
        for file in [&member, &snapshot] {
            let mode = fs::metadata(file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
        assert!(!dir.path().join("member.state.tmp").exists());
        assert!(!dir.path().join("tree.snapshot.tmp").exists());
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let (tree, _) = tree_and_member();
        // A directory where the snapshot should be: the rename fails.
        let snapshot = dir.path().join("tree.snapshot");
        fs::create_dir(&snapshot).unwrap();
        fs::write(snapshot.join("keep"), b"x").unwrap();
        assert!(matches!(
            save_tree(&tree, &snapshot),
            Err(SnapshotError::Io(_))
        ));
        assert!(
            !dir.path().join("tree.snapshot.tmp").exists(),
            "a half-done write is removed"
        );
        // The leftover of an interrupted write is replaced, not appended to.
        let path = dir.path().join("member.state");
        fs::write(dir.path().join("member.state.tmp"), vec![7u8; 4096]).unwrap();
        let (_, keys) = tree_and_member();
        save_member_keys(&keys, &path).unwrap();
        assert_eq!(load_member_keys(&path).unwrap().member(), keys.member());
        assert!(!dir.path().join("member.state.tmp").exists());
    }

    #[cfg(unix)]
    #[test]
    fn a_link_planted_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"untouched").unwrap();
        let snapshot = dir.path().join("tree.snapshot");
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("tree.snapshot.tmp")).unwrap();
        let (tree, _) = tree_and_member();
        save_tree(&tree, &snapshot).unwrap();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"untouched");
        assert_eq!(load_tree(&snapshot).unwrap().seq(), tree.seq());
        assert!(!fs::symlink_metadata(&snapshot)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_key_file_storage_writes_what_load_member_keys_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("member.state");
        let (_, keys) = tree_and_member();
        let mut storage = MemberKeyFile::new(&path);
        let op = MemberStoreOp::SaveKeys {
            last_seq: keys.last_seq(),
            body: keys.state_body().unwrap(),
        };
        storage.apply(&op).unwrap();
        let loaded = load_member_keys(&path).unwrap();
        assert_eq!(loaded.member(), keys.member());
        assert_eq!(loaded.last_seq(), keys.last_seq());
        // A missing directory: an I/O error naming the path.
        let missing = dir.path().join("missing").join("member.state");
        let mut bad = MemberKeyFile::new(&missing);
        let error = bad.apply(&op).unwrap_err();
        assert_eq!(error.kind, StoreErrorKind::Io);
        assert!(
            error.detail.contains(&missing.display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn missing_and_truncated_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_member_keys(&dir.path().join("missing")),
            Err(MemberStateError::Io(_))
        ));
        assert!(matches!(
            load_tree(&dir.path().join("missing")),
            Err(SnapshotError::Io(_))
        ));
        let (tree, keys) = tree_and_member();
        let member = dir.path().join("member.state");
        save_member_keys(&keys, &member).unwrap();
        let bytes = fs::read(&member).unwrap();
        fs::write(&member, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            load_member_keys(&member),
            Err(MemberStateError::Checksum)
        ));
        let snapshot = dir.path().join("tree.snapshot");
        save_tree(&tree, &snapshot).unwrap();
        let bytes = fs::read(&snapshot).unwrap();
        fs::write(&snapshot, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(load_tree(&snapshot), Err(SnapshotError::Checksum)));
    }
}
