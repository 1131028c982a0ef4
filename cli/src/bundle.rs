//! Registration bundle files: what `admin join` writes (mode 0600, through
//! [`rekeycast::keyfile::write_bundle`]) and `member --bundle` and `rekey-relay` read.
//!
//! The bytes are the library's encoding ([`RegistrationBundle::encode`], versioned, with an
//! integrity check); this module owns the file: it refuses a file that is not a regular file,
//! that is larger than a bundle can be, or whose mode lets the group or others read or write it
//! (a bundle holds the member's leaf key, as secret as the GCKS's key file, which is refused
//! the same way).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use rekeycast::lkh::bundle::MAX_ENCODED_LEN;
use rekeycast::lkh::RegistrationBundle;
use zeroize::Zeroizing;

/// Encodes `bundle` as the bytes of a bundle file (secret: write it with mode 0600).
pub fn to_bytes(bundle: &RegistrationBundle) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    bundle.encode().context("encoding the bundle")
}

/// Reads a bundle file, refusing one that the group or others may access.
pub fn read(path: &Path) -> anyhow::Result<RegistrationBundle> {
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    // The checks are made on the opened file, so the file checked is the file read.
    let metadata = file
        .metadata()
        .with_context(|| format!("inspecting {}", path.display()))?;
    if !metadata.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!(
            "{}: mode {mode:04o} lets the group or others access the member's keys; \
             make it 0600 (chmod 600) or get a new bundle",
            path.display()
        );
    }
    // Room for one byte more than allowed, so that the buffer never grows (and leaves no
    // unzeroized copy behind) and an oversized file shows as such.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_ENCODED_LEN + 1));
    file.take(MAX_ENCODED_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() > MAX_ENCODED_LEN {
        bail!("{}: too large for a bundle file", path.display());
    }
    RegistrationBundle::decode(&bytes).with_context(|| format!("{}", path.display()))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::fs::{self, Permissions};

    use rekeycast::lkh::MemberId;
    use rekeycast_testkit::forge::Sa;
    use rekeycast_testkit::keys::KeyServer;

    use super::*;

    /// Member 1's bundle.
    fn bundle() -> RegistrationBundle {
        let sa = Sa {
            group_id: 7,
            spi: 4,
        };
        let server = KeyServer::new(sa, 3, 5, [1]);
        server.tree.join(MemberId(1)).expect("bundle")
    }

    #[test]
    fn a_bundle_file_readable_by_others_is_refused_and_a_private_one_is_read() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("member.bundle");
        rekeycast::keyfile::write_bundle(&path, &to_bytes(&bundle()).expect("encodes"))
            .expect("written");
        let read_back = read(&path).expect("a 0600 file is read");
        assert_eq!(read_back.member, MemberId(1));
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, Permissions::from_mode(mode)).expect("chmod");
            let error = format!("{:#}", read(&path).expect_err("refused"));
            assert!(error.contains(&format!("mode {mode:04o}")), "{error}");
        }
        fs::set_permissions(&path, Permissions::from_mode(0o400)).expect("chmod");
        read(&path).expect("a 0400 file is read");
    }

    #[test]
    fn a_corrupt_or_oversized_bundle_file_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("member.bundle");
        rekeycast::keyfile::write_bundle(&path, b"{}").expect("written");
        let error = format!("{:#}", read(&path).expect_err("refused"));
        assert!(error.contains("member.bundle"), "{error}");
        assert!(error.contains("not a registration bundle"), "{error}");
        rekeycast::keyfile::write_bundle(&path, &vec![b' '; MAX_ENCODED_LEN + 1]).expect("written");
        let error = format!("{:#}", read(&path).expect_err("refused"));
        assert!(error.contains("too large"), "{error}");
        let error = format!("{:#}", read(dir.path()).expect_err("refused"));
        assert!(error.contains("not a regular file"), "{error}");
    }
}
