//! The registration bundle file that `admin join` writes (mode 0600, through
//! [`rekeycast::keyfile::write_bundle`]) and `member --bundle` reads.
//!
//! [`RegistrationBundle`] has no serde derive (its keys are zeroized types that deliberately
//! do not serialize), so the file is this module's own JSON object: the bundle's fields, the
//! two keys in hex, a `format` tag and, from format v2 on, a `check`: the BLAKE3 hash (in
//! derive-key mode, [`CHECK_CONTEXT`]) of the decoded fields, so that a file damaged on disk
//! or by hand (one hex digit of a key is enough to leave a member unable to open anything)
//! is refused when it is read, naming the cause. v1 files, which have no `check`, are still
//! read; every file written is v2. It stands in for the registration protocol of a real
//! GCKS product (RFC 4046 section 4), which carries the same fields over its own
//! authenticated, confidential channel.

use std::path::Path;

use anyhow::{bail, Context};
use rekeycast::auth::mac::MacKey;
use rekeycast::gsa::RekeySa;
use rekeycast::lkh::tree::{MemberId, RegistrationBundle};
use rekeycast::lkh::Key;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The `format` tag of the bundle files written: v2, with a `check`.
pub const FORMAT: &str = "rekeycast-registration-bundle-v2";

/// The `format` tag of v1 bundle files (no `check`), still read.
pub const FORMAT_V1: &str = "rekeycast-registration-bundle-v1";

/// The BLAKE3 derive-key context of a v2 file's `check`.
pub const CHECK_CONTEXT: &str = "rekeycast registration bundle file v2 check";

/// The largest bundle file read, in bytes (a bundle is under 1 KiB).
const MAX_BUNDLE_FILE_LEN: u64 = 64 * 1024;

/// The file's JSON object.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct BundleFile {
    format: String,
    member: u64,
    leaf: u32,
    leaf_version: u32,
    leaf_key: String,
    #[zeroize(skip)]
    rekey_sa: RekeySa,
    first_seq: u64,
    mac_key: String,
    /// Hex of [`check`] over the decoded fields (v2 on; absent in v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    check: Option<String>,
}

/// Encodes `bundle` as the bytes of a bundle file (JSON; secret: write it with mode 0600).
pub fn to_bytes(bundle: &RegistrationBundle) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let file = BundleFile {
        format: FORMAT.to_string(),
        member: bundle.member.0,
        leaf: bundle.leaf,
        leaf_version: bundle.leaf_version,
        leaf_key: hex(bundle.leaf_key.as_bytes()),
        rekey_sa: bundle.rekey_sa,
        first_seq: bundle.first_seq,
        mac_key: hex(bundle.mac_key.as_bytes()),
        check: Some(hex(&check(bundle)?)),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).context("encoding the bundle")?;
    bytes.push(b'\n');
    Ok(Zeroizing::new(bytes))
}

/// Decodes the bytes of a bundle file: v2 (its `check` must match the decoded fields) or
/// v1 (no `check`).
pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<RegistrationBundle> {
    let file: BundleFile = serde_json::from_slice(bytes).context("not a bundle file")?;
    let checked = match file.format.as_str() {
        FORMAT => true,
        FORMAT_V1 => false,
        other => bail!("format {other:?}: expected {FORMAT:?} or {FORMAT_V1:?}"),
    };
    let bundle = RegistrationBundle {
        member: MemberId(file.member),
        leaf: file.leaf,
        leaf_version: file.leaf_version,
        leaf_key: Key::from_bytes(unhex32(&file.leaf_key).context("leaf_key")?),
        rekey_sa: file.rekey_sa,
        first_seq: file.first_seq,
        mac_key: MacKey::from_bytes(unhex32(&file.mac_key).context("mac_key")?),
    };
    if checked {
        let Some(stored) = file.check.as_deref() else {
            bail!("{FORMAT} file without its \"check\" field");
        };
        let stored = unhex32(stored).context("check")?;
        if !constant_time_eq::constant_time_eq_32(&stored, &check(&bundle)?) {
            bail!(
                "integrity check failed: the bundle's contents do not match its BLAKE3 \
                 \"check\" (the file is corrupt or was edited); get a new bundle from \
                 `rekeycast admin join`"
            );
        }
    }
    Ok(bundle)
}

/// The `check` of a v2 file: BLAKE3 in derive-key mode ([`CHECK_CONTEXT`]) over every field
/// of the bundle, each in a fixed-length or length-prefixed encoding, so that it covers the
/// contents whatever the JSON's spacing or key order.
fn check(bundle: &RegistrationBundle) -> anyhow::Result<[u8; 32]> {
    let rekey_sa = Zeroizing::new(
        serde_json::to_vec(&bundle.rekey_sa).context("encoding the Rekey SA for the check")?,
    );
    let mut hasher = blake3::Hasher::new_derive_key(CHECK_CONTEXT);
    hasher.update(&bundle.member.0.to_be_bytes());
    hasher.update(&bundle.leaf.to_be_bytes());
    hasher.update(&bundle.leaf_version.to_be_bytes());
    hasher.update(bundle.leaf_key.as_bytes());
    hasher.update(&(rekey_sa.len() as u64).to_be_bytes());
    hasher.update(&rekey_sa);
    hasher.update(&bundle.first_seq.to_be_bytes());
    hasher.update(bundle.mac_key.as_bytes());
    Ok(*hasher.finalize().as_bytes())
}

/// Reads a bundle file.
pub fn read(path: &Path) -> anyhow::Result<RegistrationBundle> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if metadata.len() > MAX_BUNDLE_FILE_LEN {
        bail!("{}: too large for a bundle file", path.display());
    }
    let bytes =
        Zeroizing::new(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    from_bytes(&bytes).with_context(|| format!("{}", path.display()))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// 32 bytes from 64 hex digits.
fn unhex32(text: &str) -> anyhow::Result<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        bail!("expected 64 hex digits, found {}", digits.len());
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let high = hex_digit(pair[0])?;
        let low = hex_digit(pair[1])?;
        *byte = high << 4 | low;
    }
    Ok(out)
}

fn hex_digit(digit: u8) -> anyhow::Result<u8> {
    match digit {
        b'0'..=b'9' => Ok(digit - b'0'),
        b'a'..=b'f' => Ok(digit - b'a' + 10),
        b'A'..=b'F' => Ok(digit - b'A' + 10),
        _ => bail!("not a hex digit: {:?}", char::from(digit)),
    }
}

#[cfg(test)]
mod tests {
    use rekeycast::gsa::WrapAlgorithm;
    use rekeycast::lkh::{Degree, KeyRng, KeyTree};

    use super::*;

    fn bundle() -> RegistrationBundle {
        let gcks = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let sa = RekeySa {
            group_id: 0xB0_0D1E,
            spi: 4,
            wrap_algorithm: WrapAlgorithm::Aes256Gcm,
            degree: Degree::DEFAULT,
            gcks_public_key: gcks.verifying_key(),
            data_sa_lifetime_secs: 600,
        };
        let mut tree = KeyTree::with_rng(sa, KeyRng::seeded_for_simulation(5));
        tree.apply_batch(&[MemberId(1), MemberId(2)], &[])
            .expect("batch");
        tree.join(MemberId(2)).expect("bundle")
    }

    /// Why `from_bytes` refused `bytes` (the test fails if it did not).
    fn refused(bytes: &[u8]) -> String {
        match from_bytes(bytes) {
            Ok(_) => panic!("accepted"),
            Err(error) => format!("{error:#}"),
        }
    }

    fn text(bundle: &RegistrationBundle) -> String {
        String::from_utf8(to_bytes(bundle).expect("encodes").to_vec()).expect("UTF-8")
    }

    fn same(a: &RegistrationBundle, b: &RegistrationBundle) -> bool {
        a.member == b.member
            && a.leaf == b.leaf
            && a.leaf_version == b.leaf_version
            && a.leaf_key.as_bytes() == b.leaf_key.as_bytes()
            && a.rekey_sa == b.rekey_sa
            && a.first_seq == b.first_seq
            && a.mac_key.as_bytes() == b.mac_key.as_bytes()
    }

    /// `text` with one hex digit of the leaf key changed (as in the reported stall).
    fn flip_leaf_key_digit(text: &str) -> String {
        let key = hex(bundle().leaf_key.as_bytes());
        let at = text.find(&key).expect("leaf key in the file");
        let digit = text.as_bytes()[at];
        let flipped = if digit == b'0' { '1' } else { '0' };
        let mut out = text.to_string();
        out.replace_range(at..at + 1, &flipped.to_string());
        out
    }

    #[test]
    fn a_written_file_is_v2_with_a_check_and_reads_back() {
        let original = bundle();
        let text = text(&original);
        assert!(text.contains(FORMAT), "{text}");
        assert!(text.contains("\"check\""), "{text}");
        let read = from_bytes(text.as_bytes()).expect("reads back");
        assert!(same(&read, &original));
        // The check covers the contents, not the spacing.
        let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let compact = serde_json::to_vec(&value).expect("JSON");
        assert!(same(&from_bytes(&compact).expect("compact"), &original));
    }

    #[test]
    fn a_flipped_digit_in_a_v2_file_fails_its_integrity_check() {
        let corrupt = flip_leaf_key_digit(&text(&bundle()));
        let error = refused(corrupt.as_bytes());
        assert!(error.contains("integrity check failed"), "{error}");
        // Every field is covered: a changed member id or sequence number is refused too.
        let text = text(&bundle());
        let other_seq = text.replace("\"first_seq\": 1", "\"first_seq\": 2");
        assert_ne!(other_seq, text);
        assert!(from_bytes(other_seq.as_bytes()).is_err());
        let mut value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        value.as_object_mut().expect("object").remove("check");
        let no_check = serde_json::to_vec(&value).expect("JSON");
        let error = refused(&no_check);
        assert!(error.contains("without its \"check\""), "{error}");
    }

    #[test]
    fn a_v1_file_without_a_check_is_still_read() {
        let original = bundle();
        let mut value: serde_json::Value = serde_json::from_str(&text(&original)).expect("JSON");
        let object = value.as_object_mut().expect("object");
        object.remove("check");
        object.insert("format".into(), FORMAT_V1.into());
        let v1 = serde_json::to_vec(&value).expect("JSON");
        assert!(same(&from_bytes(&v1).expect("v1 reads"), &original));
        let mut value: serde_json::Value = serde_json::from_slice(&v1).expect("JSON");
        value["format"] = "rekeycast-registration-bundle-v9".into();
        let error = refused(&serde_json::to_vec(&value).expect("JSON"));
        assert!(error.contains("expected"), "{error}");
    }
}
