//! The GCKS's Ed25519 signing key on disk, and secret files written with mode 0600.
//!
//! This module owns the key file in the state directory (`gcks-signing-key.pem`, PKCS#8 PEM):
//! loading it, refusing it when its mode lets the group or others read it or when it does not
//! parse, and generating it on first start. It also writes any other secret file (the admin
//! `join` command's registration bundles) the same way: to a fresh temporary file in the same
//! directory created with mode 0600, synced, then moved into place and the directory synced, so
//! a secret is never world-readable, not even for a moment, and a crash leaves either the old
//! file or the new one.
//!
//! # Signing-key rollover
//!
//! A rollover (the endpoint's `rollover` module) keeps the next key in a second file,
//! `gcks-signing-key.next.pem`, written (mode 0600, synced) by [`write_next_key`] before the
//! GCKS announces the key, and moved over the current key's file by [`promote_next`] once the
//! first message signed with it is stored: then the old key is gone from the disk. Both steps
//! are write-ahead: at every crash point, the key files and the stored state (whose key tree
//! names the key that signed its latest message) say together which key signs next, and
//! [`resolve_keys`] finds it at start:
//!
//! - only the current file, naming the stored key: no rollover;
//! - a next file, the stored key the current one: a rollover announced (the GCKS resumes it)
//!   or not yet announced (the endpoint says which; an unannounced next key is dropped with
//!   [`discard_next`], and the operator rolls again);
//! - a next file naming the stored key: the rollover took effect and the crash came before the
//!   files were swapped: the next file is promoted now;
//! - no file naming the stored key: [`KeyFileError::StateKeyMismatch`], nothing is changed.
//!
//! It must not log or print key material: [`SigningKey`]'s `Debug` shows only the public key,
//! the file's bytes are held in [`Zeroizing`] buffers, and the key itself is zeroized on drop
//! (ed25519-dalek's `zeroize` feature). It never regenerates a key over a file that exists.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

/// The name of the GCKS's signing key file in the state directory.
pub const SIGNING_KEY_FILE: &str = "gcks-signing-key.pem";

/// The name of the next signing key's file during a rollover, in the state directory.
pub const NEXT_SIGNING_KEY_FILE: &str = "gcks-signing-key.next.pem";

/// The largest key file read, in bytes: a PKCS#8 PEM Ed25519 key is about 120 bytes, so
/// anything much larger is not one (and is not read into memory whole).
pub const MAX_KEY_FILE_LEN: usize = 16 * 1024;

/// Where the key returned by [`load_or_generate`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// It was read from the existing key file.
    Loaded,
    /// There was no key file: a new key was generated and written (mode 0600).
    Generated,
}

/// Why a key file or secret file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// A file system operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done ("reading", "creating", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The key file's mode lets its group or others access it: it is refused, since the key
    /// may have leaked, and the operator must decide (`chmod 600` it, or replace the key).
    #[error(
        "{path} has mode {mode:04o}, which lets group or others access the signing key; \
         refusing it (chmod 600 it if the key has not leaked)"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path is not a regular file.
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The key file is larger than [`MAX_KEY_FILE_LEN`].
    #[error("{path} is larger than {max} bytes: not a PKCS#8 Ed25519 key")]
    TooLarge {
        /// The key file.
        path: PathBuf,
        /// The limit.
        max: usize,
    },
    /// The key file does not hold a PKCS#8 PEM Ed25519 private key. It is left as it is:
    /// nothing is ever generated over an existing file.
    #[error("{path} is not a PKCS#8 PEM Ed25519 private key: {reason}")]
    Parse {
        /// The key file.
        path: PathBuf,
        /// What the decoder said (never any of the file's contents).
        reason: String,
    },
    /// A generated key could not be encoded as PKCS#8 PEM.
    #[error("encoding the signing key as PKCS#8 PEM: {reason}")]
    Encode {
        /// What the encoder said.
        reason: String,
    },
    /// The path has no parent directory or no file name to write a temporary file beside.
    #[error("{path} names no file in a directory")]
    InvalidPath {
        /// The path.
        path: PathBuf,
    },
    /// The key file is missing but its state directory holds a GCKS's state (a key tree or
    /// messages) signed with the key: no key is generated, since members accept only the
    /// key of their bundles and a new key would split the group.
    #[error(
        "signing key file {path} is missing, but {state_dir} holds a GCKS state signed with \
         it: refusing to generate a new key (restore the key file, or move the state away to \
         start a new group)"
    )]
    MissingKey {
        /// The missing key file.
        path: PathBuf,
        /// The state directory.
        state_dir: PathBuf,
    },
    /// Neither the current nor the next key file holds the key that signed the stored state.
    #[error(
        "the state in {state_dir} was signed with GCKS key {stored}, which neither {current} \
         nor the next key file holds: restore the right key file"
    )]
    StateKeyMismatch {
        /// The state directory.
        state_dir: PathBuf,
        /// The current key file.
        current: PathBuf,
        /// The stored state's key, hex.
        stored: String,
    },
    /// A next key file exists: a rollover is under way (or was never finished).
    #[error(
        "{path} exists: a signing-key rollover is under way; wait for it to take effect \
         (or restart the GCKS, which finishes or drops it)"
    )]
    RolloverPending {
        /// The next key file.
        path: PathBuf,
    },
    /// Whether the state directory holds a state could not be found out.
    #[error("inspecting the state in {state_dir}")]
    State {
        /// The state directory.
        state_dir: PathBuf,
        /// What failed.
        #[source]
        source: crate::resync::store::StoreError,
    },
}

/// Fails with [`KeyFileError::MissingKey`] when the signing key file is missing but the
/// state directory holds a GCKS state, before anything reads that state: an operator who
/// deleted the key beside a kept (or damaged) state hears about the key, and no new key is
/// generated over it.
pub fn require_key_beside_state(state_dir: &Path) -> Result<(), KeyFileError> {
    if key_file_present(state_dir)? {
        return Ok(());
    }
    let holds_state =
        crate::resync::store::holds_state(state_dir).map_err(|source| KeyFileError::State {
            state_dir: state_dir.to_path_buf(),
            source,
        })?;
    if holds_state {
        return Err(KeyFileError::MissingKey {
            path: state_dir.join(SIGNING_KEY_FILE),
            state_dir: state_dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Whether the signing key file of `state_dir` exists (as anything: a non-file is refused
/// when it is loaded).
fn key_file_present(state_dir: &Path) -> Result<bool, KeyFileError> {
    let path = state_dir.join(SIGNING_KEY_FILE);
    match fs::symlink_metadata(&path) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(KeyFileError::Io {
            action: "inspecting",
            path,
            source,
        }),
    }
}

/// Loads the GCKS's signing key from `state_dir/gcks-signing-key.pem` if that file exists,
/// else generates one with the OS random number generator and writes it there with mode 0600
/// (creating `state_dir`, mode 0700, if it is missing).
///
/// A key is generated only for a directory that holds no GCKS state: a missing key file
/// beside a key tree or messages ([`crate::resync::store::holds_state`]) is
/// [`KeyFileError::MissingKey`].
///
/// An existing file is never replaced: one that does not parse, or whose mode lets group or
/// others access it, is an error. If two processes start at once on an empty state directory,
/// one key is written and both return it.
pub fn load_or_generate(state_dir: &Path) -> Result<(SigningKey, KeyOrigin), KeyFileError> {
    let path = state_dir.join(SIGNING_KEY_FILE);
    if key_file_present(state_dir)? {
        return load(&path).map(|key| (key, KeyOrigin::Loaded));
    }
    require_key_beside_state(state_dir)?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|source| KeyFileError::Io {
            action: "creating the state directory",
            path: state_dir.to_path_buf(),
            source,
        })?;
    // Drawn with `try_fill_bytes`, so that a failing OS generator is an error, not a panic.
    let mut secret = Zeroizing::new([0u8; ed25519_dalek::SECRET_KEY_LENGTH]);
    OsRng
        .try_fill_bytes(secret.as_mut())
        .map_err(|error| KeyFileError::Io {
            action: "generating a key for",
            path: path.clone(),
            source: io::Error::other(error.to_string()),
        })?;
    let key = SigningKey::from_bytes(&secret);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|error| KeyFileError::Encode {
            reason: error.to_string(),
        })?;
    match write_secret(&path, pem.as_bytes(), Publish::NoClobber) {
        Ok(()) => Ok((key, KeyOrigin::Generated)),
        // Another process wrote its key first: use that one, so that both agree.
        Err(KeyFileError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
            load(&path).map(|key| (key, KeyOrigin::Loaded))
        }
        Err(error) => Err(error),
    }
}

/// Loads a signing key from the PKCS#8 PEM file at `path`, which must be a regular file no
/// larger than [`MAX_KEY_FILE_LEN`] whose mode gives the group and others no access.
pub fn load(path: &Path) -> Result<SigningKey, KeyFileError> {
    let io_error = |action, source| KeyFileError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|source| io_error("opening", source))?;
    // The checks are made on the opened file, so the file checked is the file read.
    let metadata = file
        .metadata()
        .map_err(|source| io_error("inspecting", source))?;
    if !metadata.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    // Room for one byte more than allowed, so that the buffer never grows (and leaves no
    // unzeroized copy behind) and an oversized file shows as such.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE_LEN + 1));
    file.take(MAX_KEY_FILE_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| io_error("reading", source))?;
    if bytes.len() > MAX_KEY_FILE_LEN {
        return Err(KeyFileError::TooLarge {
            path: path.to_path_buf(),
            max: MAX_KEY_FILE_LEN,
        });
    }
    let parse_error = |reason: String| KeyFileError::Parse {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::str::from_utf8(&bytes).map_err(|_| parse_error("not UTF-8 text".into()))?;
    SigningKey::from_pkcs8_pem(pem).map_err(|error| parse_error(error.to_string()))
}

/// The keys a GCKS starts with, from [`resolve_keys`].
#[derive(Debug)]
pub struct ResolvedKeys {
    /// The key that signs next (the stored state's, or a new group's).
    pub current: SigningKey,
    /// A next key kept for a rollover the stored messages may announce: the GCKS resumes it,
    /// or (never announced) the driver drops it with [`discard_next`].
    pub next: Option<SigningKey>,
    /// Whether a next key file was promoted to the current one (the rollover had taken effect
    /// before a crash).
    pub promoted: bool,
}

/// Generates the next signing key and writes it to `state_dir/gcks-signing-key.next.pem`
/// (mode 0600, synced) before a rollover announces it. A next file already there is
/// [`KeyFileError::RolloverPending`]: never overwritten.
pub fn write_next_key(state_dir: &Path) -> Result<SigningKey, KeyFileError> {
    let path = state_dir.join(NEXT_SIGNING_KEY_FILE);
    let mut secret = Zeroizing::new([0u8; ed25519_dalek::SECRET_KEY_LENGTH]);
    OsRng
        .try_fill_bytes(secret.as_mut())
        .map_err(|error| KeyFileError::Io {
            action: "generating a key for",
            path: path.clone(),
            source: io::Error::other(error.to_string()),
        })?;
    let key = SigningKey::from_bytes(&secret);
    write_key(&path, &key)?;
    Ok(key)
}

/// Writes `key` to `path` (a next key file), refusing to replace a file there.
fn write_key(path: &Path, key: &SigningKey) -> Result<(), KeyFileError> {
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|error| KeyFileError::Encode {
            reason: error.to_string(),
        })?;
    match write_secret(path, pem.as_bytes(), Publish::NoClobber) {
        Err(KeyFileError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
            Err(KeyFileError::RolloverPending {
                path: path.to_path_buf(),
            })
        }
        other => other,
    }
}

/// The next key of a rollover, if its file exists.
pub fn load_next(state_dir: &Path) -> Result<Option<SigningKey>, KeyFileError> {
    let path = state_dir.join(NEXT_SIGNING_KEY_FILE);
    match fs::symlink_metadata(&path) {
        Ok(_) => load(&path).map(Some),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyFileError::Io {
            action: "inspecting",
            path,
            source,
        }),
    }
}

/// Makes the next key the current one: renames its file over the current key's (the old key
/// is gone from the disk) and syncs the directory. Call it once the first message signed with
/// the next key is stored.
pub fn promote_next(state_dir: &Path) -> Result<(), KeyFileError> {
    let next = state_dir.join(NEXT_SIGNING_KEY_FILE);
    let current = state_dir.join(SIGNING_KEY_FILE);
    fs::rename(&next, &current).map_err(|source| KeyFileError::Io {
        action: "promoting the next signing key over",
        path: current,
        source,
    })?;
    sync_dir(state_dir)
}

/// Deletes the next key's file (a rollover that was never announced) and syncs the directory.
pub fn discard_next(state_dir: &Path) -> Result<(), KeyFileError> {
    let next = state_dir.join(NEXT_SIGNING_KEY_FILE);
    match fs::remove_file(&next) {
        Ok(()) => sync_dir(state_dir),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(KeyFileError::Io {
            action: "removing",
            path: next,
            source,
        }),
    }
}

/// The keys a GCKS on `state_dir` starts with, given the key that signed its stored state
/// (`None` for a directory with no state): see the module docs for each case. A next file
/// that names the stored key is promoted here.
pub fn resolve_keys(
    state_dir: &Path,
    stored: Option<&ed25519_dalek::VerifyingKey>,
) -> Result<ResolvedKeys, KeyFileError> {
    let (current, _) = load_or_generate(state_dir)?;
    let next = load_next(state_dir)?;
    let Some(stored) = stored else {
        if next.is_some() {
            // No state yet: nothing was announced, nothing can need the next key.
            discard_next(state_dir)?;
        }
        return Ok(ResolvedKeys {
            current,
            next: None,
            promoted: false,
        });
    };
    if current.verifying_key() == *stored {
        return Ok(ResolvedKeys {
            current,
            next,
            promoted: false,
        });
    }
    match next {
        Some(next) if next.verifying_key() == *stored => {
            promote_next(state_dir)?;
            Ok(ResolvedKeys {
                current: next,
                next: None,
                promoted: true,
            })
        }
        _ => Err(KeyFileError::StateKeyMismatch {
            state_dir: state_dir.to_path_buf(),
            current: state_dir.join(SIGNING_KEY_FILE),
            stored: stored
                .as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        }),
    }
}

/// Writes `bytes` to `path` as a secret file, mode 0600, atomically: to a fresh temporary file
/// in the same directory (created with mode 0600, so never readable by others at any moment),
/// synced, renamed over `path`, and the directory synced. An existing file at `path` is
/// replaced. The admin `join` command writes registration bundles with it; it suits any
/// secret file.
pub fn write_bundle(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    write_secret(path, bytes, Publish::Replace)
}

/// How the temporary file takes the final name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// `rename`: replaces any file there.
    Replace,
    /// `link` then unlink the temporary name: fails with `AlreadyExists` if a file is there,
    /// so a key that appeared meanwhile (another process, an operator) is never overwritten.
    NoClobber,
}

/// Tries for a temporary name that nobody holds, before giving up.
const TEMP_NAME_ATTEMPTS: u32 = 16;

/// Makes every temporary name of this process distinct, with the process id and random bits
/// making them distinct across processes.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_secret(path: &Path, bytes: &[u8], publish: Publish) -> Result<(), KeyFileError> {
    let invalid_path = || KeyFileError::InvalidPath {
        path: path.to_path_buf(),
    };
    let file_name = path.file_name().ok_or_else(invalid_path)?;
    let dir = match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => return Err(invalid_path()),
    };
    let (temp_path, mut file) = create_temp(dir, &file_name.to_string_lossy())?;
    let temp = TempGuard(Some(temp_path));
    let temp_path = temp.path();
    let io_error = |action, source| KeyFileError::Io {
        action,
        path: temp_path.to_path_buf(),
        source,
    };
    // The umask can only have removed bits; set exactly 0600 so the file is readable and
    // writable by its owner whatever the umask.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(|source| io_error("setting the mode of", source))?;
    file.write_all(bytes)
        .map_err(|source| io_error("writing", source))?;
    file.sync_all()
        .map_err(|source| io_error("syncing", source))?;
    drop(file);
    let publish_error = |source| KeyFileError::Io {
        action: "publishing",
        path: path.to_path_buf(),
        source,
    };
    match publish {
        Publish::Replace => {
            fs::rename(temp_path, path).map_err(publish_error)?;
            temp.disarm();
        }
        Publish::NoClobber => {
            fs::hard_link(temp_path, path).map_err(publish_error)?;
            // The guard removes the temporary name; the file lives on under `path`.
            drop(temp);
        }
    }
    sync_dir(dir)
}

/// Creates a new file in `dir` with mode 0600 and a name no other writer holds.
fn create_temp(dir: &Path, base: &str) -> Result<(PathBuf, File), KeyFileError> {
    let mut last_error = None;
    for _ in 0..TEMP_NAME_ATTEMPTS {
        let name = format!(
            ".{base}.tmp.{}.{}.{:016x}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed),
            random_bits(),
        );
        let temp_path = dir.join(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp_path)
        {
            Ok(file) => return Ok((temp_path, file)),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => last_error = Some(error),
            Err(source) => {
                return Err(KeyFileError::Io {
                    action: "creating",
                    path: temp_path,
                    source,
                })
            }
        }
    }
    Err(KeyFileError::Io {
        action: "creating a temporary file in",
        path: dir.to_path_buf(),
        source: last_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)),
    })
}

/// 64 bits that differ between processes and calls, without a call that can fail or panic
/// (std's per-map hash keys are seeded from the OS). They only make a temporary name hard to
/// guess; `create_new` is what makes it exclusive.
fn random_bits() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(TEMP_COUNTER.load(Ordering::Relaxed));
    hasher.finish()
}

/// Syncs a directory, so that a rename or link in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), KeyFileError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| KeyFileError::Io {
            action: "syncing the directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// Removes the temporary file when dropped, unless it was renamed into place.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // Best effort: the file holds a secret but has mode 0600; a leftover is harmless
            // and carries a name no writer reuses.
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;
    use std::sync::{Arc, Barrier};

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn leftover_temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".tmp."))
            .collect()
    }

    #[test]
    fn generate_then_load_gives_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let (generated, origin) = load_or_generate(dir.path()).unwrap();
        assert_eq!(origin, KeyOrigin::Generated);
        let (loaded, origin) = load_or_generate(dir.path()).unwrap();
        assert_eq!(origin, KeyOrigin::Loaded);
        assert_eq!(loaded.verifying_key(), generated.verifying_key());
        let explicit = load(&dir.path().join(SIGNING_KEY_FILE)).unwrap();
        assert_eq!(explicit.to_bytes(), generated.to_bytes());
        assert!(leftover_temp_files(dir.path()).is_empty());
    }

    #[test]
    fn a_missing_key_beside_a_stored_state_is_not_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = load_or_generate(dir.path()).unwrap();
        // A key tree (any snapshot file counts) written with that key; then the key is lost.
        let messages = dir.path().join("messages");
        fs::create_dir(&messages).unwrap();
        fs::write(messages.join(format!("{:020}.msg", 1)), b"RKMSG001").unwrap();
        let path = dir.path().join(SIGNING_KEY_FILE);
        fs::remove_file(&path).unwrap();
        let error = load_or_generate(dir.path()).unwrap_err();
        assert!(matches!(error, KeyFileError::MissingKey { .. }), "{error}");
        let text = error.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("missing"), "{text}");
        assert!(!path.exists(), "no key generated");
        fs::write(dir.path().join("tree.snapshot"), b"").unwrap();
        fs::remove_dir_all(&messages).unwrap();
        assert!(matches!(
            load_or_generate(dir.path()),
            Err(KeyFileError::MissingKey { .. })
        ));
        // Put back, it loads.
        write_bundle(&path, key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        let (loaded, origin) = load_or_generate(dir.path()).unwrap();
        assert_eq!(origin, KeyOrigin::Loaded);
        assert_eq!(loaded.verifying_key(), key.verifying_key());
    }

    #[test]
    fn generated_key_file_has_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        load_or_generate(dir.path()).unwrap();
        assert_eq!(mode(&dir.path().join(SIGNING_KEY_FILE)), 0o600);
    }

    #[test]
    fn missing_state_dir_is_created_with_mode_0700() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state").join("gcks");
        let (_, origin) = load_or_generate(&state_dir).unwrap();
        assert_eq!(origin, KeyOrigin::Generated);
        assert_eq!(mode(&state_dir), 0o700);
        assert_eq!(mode(&state_dir.join(SIGNING_KEY_FILE)), 0o600);
    }

    #[test]
    fn group_or_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = load_or_generate(dir.path()).unwrap();
        let path = dir.path().join(SIGNING_KEY_FILE);
        let before = fs::read(&path).unwrap();
        for bad in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let error = load_or_generate(dir.path()).unwrap_err();
            assert!(
                matches!(error, KeyFileError::Permissions { mode, .. } if mode == bad),
                "{error}"
            );
            assert!(error.to_string().contains(&format!("{bad:04o}")), "{error}");
            assert!(matches!(load(&path), Err(KeyFileError::Permissions { .. })));
        }
        // Refused, not replaced.
        assert_eq!(fs::read(&path).unwrap(), before);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load(&path).unwrap().verifying_key(), key.verifying_key());
    }

    #[test]
    fn corrupt_key_file_is_an_error_not_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SIGNING_KEY_FILE);
        for contents in [
            &b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n"[..],
            b"",
            b"\xff\xfe garbage",
        ] {
            write_bundle(&path, contents).unwrap();
            let error = load_or_generate(dir.path()).unwrap_err();
            assert!(matches!(error, KeyFileError::Parse { .. }), "{error}");
            assert_eq!(fs::read(&path).unwrap(), contents);
        }
    }

    #[test]
    fn truncated_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _) = load_or_generate(dir.path()).unwrap();
        let path = dir.path().join(SIGNING_KEY_FILE);
        let pem = fs::read(&path).unwrap();
        write_bundle(&path, &pem[..pem.len() / 2]).unwrap();
        assert!(matches!(
            load_or_generate(dir.path()),
            Err(KeyFileError::Parse { .. })
        ));
    }

    #[test]
    fn oversized_and_non_regular_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.pem");
        write_bundle(&path, &vec![b'A'; MAX_KEY_FILE_LEN + 1]).unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::TooLarge { .. })));
        let sub = dir.path().join("sub");
        DirBuilder::new().mode(0o700).create(&sub).unwrap();
        assert!(matches!(load(&sub), Err(KeyFileError::NotAFile { .. })));
        assert!(matches!(
            load(&dir.path().join("missing.pem")),
            Err(KeyFileError::Io { ref source, .. }) if source.kind() == io::ErrorKind::NotFound
        ));
    }

    #[test]
    fn error_messages_hold_no_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = load_or_generate(dir.path()).unwrap();
        let path = dir.path().join(SIGNING_KEY_FILE);
        let pem = fs::read_to_string(&path).unwrap();
        let debug = format!("{key:?}");
        let secret_hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!debug.contains(&secret_hex));
        assert!(!debug.contains(&format!("{:?}", key.to_bytes())));
        // A corrupted copy of the real key: the error names the file and the reason only.
        let body_line = pem.lines().nth(1).unwrap().to_string();
        write_bundle(&path, pem.replace("PRIVATE KEY", "PRIVATE KEX").as_bytes()).unwrap();
        let error = load(&path).unwrap_err();
        assert!(!error.to_string().contains(&body_line), "{error}");
        assert!(!format!("{error:?}").contains(&body_line), "{error:?}");
    }

    #[test]
    fn write_bundle_is_0600_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("member-7.bundle");
        write_bundle(&path, b"first").unwrap();
        assert_eq!(mode(&path), 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_bundle(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(mode(&path), 0o600);
        assert!(leftover_temp_files(dir.path()).is_empty());
    }

    #[test]
    fn write_bundle_into_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("member.bundle");
        assert!(matches!(
            write_bundle(&path, b"x"),
            Err(KeyFileError::Io { .. })
        ));
        assert!(matches!(
            write_bundle(Path::new("/"), b"x"),
            Err(KeyFileError::InvalidPath { .. })
        ));
    }

    #[test]
    fn concurrent_writers_use_distinct_temp_files() {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let dir = Arc::clone(&dir);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    for round in 0..20 {
                        let contents = format!("writer {i} round {round}");
                        // Every writer to one shared name and to a name of its own.
                        write_bundle(&dir.path().join("shared.bundle"), contents.as_bytes())
                            .unwrap();
                        let own = dir.path().join(format!("member-{i}.bundle"));
                        write_bundle(&own, contents.as_bytes()).unwrap();
                        assert_eq!(fs::read_to_string(&own).unwrap(), contents);
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        let shared = fs::read_to_string(dir.path().join("shared.bundle")).unwrap();
        assert!(shared.ends_with("round 19"), "{shared}");
        assert!(leftover_temp_files(dir.path()).is_empty());
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_key() {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let threads = 6;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let dir = Arc::clone(&dir);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let (key, origin) = load_or_generate(dir.path()).unwrap();
                    (key.verifying_key().to_bytes(), origin)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let keys: HashSet<_> = results.iter().map(|(key, _)| *key).collect();
        assert_eq!(keys.len(), 1, "every starter returns the key on disk");
        assert!(results.iter().any(|(_, o)| *o == KeyOrigin::Generated));
        let on_disk = load(&dir.path().join(SIGNING_KEY_FILE)).unwrap();
        assert!(keys.contains(&on_disk.verifying_key().to_bytes()));
        assert!(leftover_temp_files(dir.path()).is_empty());
    }

    /// The crash points of a rollover, each followed by a start: the key files and the state
    /// resolve to the key that signs next, and the files end as that says.
    #[test]
    fn rollover_crash_points_resolve_to_the_key_the_state_names() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (old, _) = load_or_generate(&state).unwrap();
        let old_public = old.verifying_key();
        // No rollover: the current key.
        let keys = resolve_keys(&state, Some(&old_public)).unwrap();
        assert_eq!(keys.current.to_bytes(), old.to_bytes());
        assert!(keys.next.is_none() && !keys.promoted);
        // Crash after the next key was written, before (or after) its announcement was
        // stored: the state still names the old key; the next key comes back for the GCKS to
        // resume (or drop) the rollover.
        let next = write_next_key(&state).unwrap();
        assert_eq!(mode(&state.join(NEXT_SIGNING_KEY_FILE)), 0o600);
        assert!(matches!(
            write_next_key(&state),
            Err(KeyFileError::RolloverPending { .. })
        ));
        let keys = resolve_keys(&state, Some(&old_public)).unwrap();
        assert_eq!(keys.current.to_bytes(), old.to_bytes());
        assert_eq!(keys.next.unwrap().to_bytes(), next.to_bytes());
        // Crash after the first message under the next key was stored, before the files
        // were swapped: the next key is promoted, the old one is gone.
        let keys = resolve_keys(&state, Some(&next.verifying_key())).unwrap();
        assert!(keys.promoted);
        assert_eq!(keys.current.to_bytes(), next.to_bytes());
        assert!(!state.join(NEXT_SIGNING_KEY_FILE).exists());
        assert_eq!(
            load(&state.join(SIGNING_KEY_FILE)).unwrap().to_bytes(),
            next.to_bytes()
        );
        assert_eq!(mode(&state.join(SIGNING_KEY_FILE)), 0o600);
        // After the swap (a normal start): the new key, no next file.
        let keys = resolve_keys(&state, Some(&next.verifying_key())).unwrap();
        assert_eq!(keys.current.to_bytes(), next.to_bytes());
        assert!(keys.next.is_none() && !keys.promoted);
        // A state signed by neither: refused, files untouched.
        let error = resolve_keys(&state, Some(&old_public)).unwrap_err();
        assert!(
            matches!(error, KeyFileError::StateKeyMismatch { .. }),
            "{error}"
        );
        assert_eq!(
            load(&state.join(SIGNING_KEY_FILE)).unwrap().to_bytes(),
            next.to_bytes()
        );
        // An unannounced next key is dropped on request, and a second drop is harmless.
        write_next_key(&state).unwrap();
        discard_next(&state).unwrap();
        discard_next(&state).unwrap();
        assert!(load_next(&state).unwrap().is_none());
        assert!(leftover_temp_files(&state).is_empty());
    }

    /// A next key file with no stored state (a rollover cannot have been announced) is dropped.
    #[test]
    fn a_next_key_without_state_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (first, _) = load_or_generate(&state).unwrap();
        write_next_key(&state).unwrap();
        let keys = resolve_keys(&state, None).unwrap();
        assert_eq!(keys.current.to_bytes(), first.to_bytes());
        assert!(keys.next.is_none());
        assert!(!state.join(NEXT_SIGNING_KEY_FILE).exists());
    }
}
