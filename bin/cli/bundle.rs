//! The registration bundle file that `admin join` writes (mode 0600, through
//! [`rekeycast::keyfile::write_bundle`]) and `member --bundle` reads.
//!
//! [`RegistrationBundle`] has no serde derive (its keys are zeroized types that deliberately
//! do not serialize), so the file is this module's own JSON object: the bundle's fields, the
//! two keys in hex, and a `format` tag. It stands in for the registration protocol of a real
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

/// The `format` tag of a bundle file.
pub const FORMAT: &str = "rekeycast-registration-bundle-v1";

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
    };
    let mut bytes = serde_json::to_vec_pretty(&file).context("encoding the bundle")?;
    bytes.push(b'\n');
    Ok(Zeroizing::new(bytes))
}

/// Decodes the bytes of a bundle file.
pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<RegistrationBundle> {
    let file: BundleFile = serde_json::from_slice(bytes).context("not a bundle file")?;
    if file.format != FORMAT {
        bail!("format {:?}: expected {FORMAT:?}", file.format);
    }
    Ok(RegistrationBundle {
        member: MemberId(file.member),
        leaf: file.leaf,
        leaf_version: file.leaf_version,
        leaf_key: Key::from_bytes(unhex32(&file.leaf_key).context("leaf_key")?),
        rekey_sa: file.rekey_sa,
        first_seq: file.first_seq,
        mac_key: MacKey::from_bytes(unhex32(&file.mac_key).context("mac_key")?),
    })
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
