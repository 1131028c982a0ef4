//! The encoding of a [`RegistrationBundle`]: the bytes a GCKS hands a joining member (the CLI
//! writes them to a bundle file) and the member decodes.
//!
//! The encoding is a JSON object: the bundle's fields, the two keys in hex, a `format` tag that
//! names the version and, from version 2 on, a `check`: the BLAKE3 hash (in derive-key mode,
//! [`CHECK_CONTEXT`], or [`CHECK_CONTEXT_V3`]) of the decoded fields, so that bytes damaged on
//! disk or by hand (one hex digit of a key is enough to leave a member unable to open anything)
//! are refused when they are decoded, naming the cause. It stands in for the registration
//! protocol of a real GCKS product (RFC 4046 section 4), which carries the same fields over its
//! own authenticated, confidential channel.
//!
//! Versions:
//!
//! - **3** ([`FORMAT_V3`]) adds the bundle's [`RelayDirectory`]: the ordered relays the member
//!   may receive its rekeys from and the GCKS's own contact, the list a member fails over along
//!   (see [`crate::endpoint::failover`]). The `check` covers it. A bundle is written as version 3
//!   only when its directory is not empty, so a GCKS without relays keeps writing bundles that
//!   members of the previous version read; a previous version's member refuses a version 3
//!   bundle with its typed "unknown format" error rather than ignoring the relays.
//! - **2** ([`FORMAT_V2`]): no directory (decoded with an empty one).
//! - **1** ([`FORMAT_V1`]): no `check` and no directory, still decoded.
//!
//! [`RegistrationBundle::decode`] is total: any input gives a bundle or a [`BundleError`],
//! never a panic. Secrets are zeroized: the encoded bytes come in a [`Zeroizing`] buffer, the
//! intermediate hex strings are wiped when dropped, and a bundle's keys ([`Key`], [`MacKey`])
//! zeroize themselves on drop. This module does no I/O; reading and writing files is the
//! caller's.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use std::net::SocketAddr;

use super::tree::{MemberId, RegistrationBundle};
use super::Key;
use crate::auth::mac::MacKey;
use crate::endpoint::ResyncEndpoint;
use crate::gsa::RekeySa;

/// The `format` tag of version 3 (with a `check` and a relay directory), written when the
/// bundle's directory is not empty.
pub const FORMAT_V3: &str = "rekeycast-registration-bundle-v3";

/// The BLAKE3 derive-key context of a version 3 `check`.
pub const CHECK_CONTEXT_V3: &str = "rekeycast registration bundle file v3 check";

/// The most relays a directory lists.
pub const MAX_DIRECTORY_RELAYS: usize = 64;

/// The most resync endpoints one contact of a directory lists.
pub const MAX_CONTACT_RESYNC: usize = 8;

/// Where a member can receive its rekeys from: a relay (which multicasts into its own segment)
/// or the GCKS itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelayContact {
    /// The relay's number at the GCKS (what a relay directive names it by; 0 for the GCKS's
    /// own contact).
    pub id: u16,
    /// The multicast group the contact sends its rekeys into: the member listens there.
    pub group: SocketAddr,
    /// Where the member sends its NACKs and probe replies.
    pub feedback: SocketAddr,
    /// The contact's resync endpoints, in order.
    pub resync: Vec<ResyncEndpoint>,
}

/// What registration tells a member about where to receive its rekeys: an ordered list of
/// relays (the first is the one the GCKS assigned it; the others are where it fails over to, in
/// order) and the GCKS's own contact, the last resort. Empty: the member was configured by
/// hand and does not fail over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RelayDirectory {
    /// The relays, most preferred first.
    pub relays: Vec<RelayContact>,
    /// The GCKS's contact, if the member may receive from it directly.
    pub gcks: Option<RelayContact>,
}

impl RelayDirectory {
    /// Whether the directory lists nothing.
    pub fn is_empty(&self) -> bool {
        self.relays.is_empty() && self.gcks.is_none()
    }

    /// Checks the directory's bounds: at most [`MAX_DIRECTORY_RELAYS`] relays and
    /// [`MAX_CONTACT_RESYNC`] resync endpoints per contact.
    pub fn validate(&self) -> Result<(), BundleError> {
        if self.relays.len() > MAX_DIRECTORY_RELAYS {
            return Err(BundleError::DirectoryTooLarge {
                relays: self.relays.len(),
            });
        }
        for contact in self.relays.iter().chain(&self.gcks) {
            if contact.resync.len() > MAX_CONTACT_RESYNC {
                return Err(BundleError::DirectoryTooLarge {
                    relays: self.relays.len(),
                });
            }
        }
        Ok(())
    }
}

/// A [`RelayContact`] as encoded: addresses and resync endpoints in their text forms.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct EncodedContact {
    #[serde(default)]
    id: u16,
    group: SocketAddr,
    feedback: SocketAddr,
    #[serde(default)]
    resync: Vec<String>,
}

/// A [`RelayDirectory`] as encoded.
#[derive(Serialize, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct EncodedDirectory {
    #[serde(default)]
    relays: Vec<EncodedContact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gcks: Option<EncodedContact>,
}

impl EncodedDirectory {
    fn from_directory(directory: &RelayDirectory) -> Self {
        let contact = |c: &RelayContact| EncodedContact {
            id: c.id,
            group: c.group,
            feedback: c.feedback,
            resync: c.resync.iter().map(ToString::to_string).collect(),
        };
        Self {
            relays: directory.relays.iter().map(contact).collect(),
            gcks: directory.gcks.as_ref().map(contact),
        }
    }

    fn into_directory(self) -> Result<RelayDirectory, BundleError> {
        if self.relays.len() > MAX_DIRECTORY_RELAYS {
            return Err(BundleError::DirectoryTooLarge {
                relays: self.relays.len(),
            });
        }
        let relays = self.relays.len();
        let contact = |c: EncodedContact| -> Result<RelayContact, BundleError> {
            if c.resync.len() > MAX_CONTACT_RESYNC {
                return Err(BundleError::DirectoryTooLarge { relays });
            }
            let resync = c
                .resync
                .iter()
                .map(|text| {
                    text.parse()
                        .map_err(|_| BundleError::BadResyncEndpoint { text: text.clone() })
                })
                .collect::<Result<_, _>>()?;
            Ok(RelayContact {
                id: c.id,
                group: c.group,
                feedback: c.feedback,
                resync,
            })
        };
        Ok(RelayDirectory {
            relays: self
                .relays
                .into_iter()
                .map(contact)
                .collect::<Result<_, _>>()?,
            gcks: self.gcks.map(contact).transpose()?,
        })
    }
}

/// The `format` tag of version 2 (with a `check`), the version [`RegistrationBundle::encode`]
/// writes.
pub const FORMAT_V2: &str = "rekeycast-registration-bundle-v2";

/// The `format` tag of version 1 (no `check`), still decoded.
pub const FORMAT_V1: &str = "rekeycast-registration-bundle-v1";

/// The BLAKE3 derive-key context of a version 2 `check`.
pub const CHECK_CONTEXT: &str = "rekeycast registration bundle file v2 check";

/// The longest encoding decoded, in bytes (a bundle's is under 1 KiB).
pub const MAX_ENCODED_LEN: usize = 64 * 1024;

/// Why bytes are not a registration bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Longer than [`MAX_ENCODED_LEN`].
    #[error("{len} bytes: longer than a registration bundle can be ({MAX_ENCODED_LEN})")]
    TooLarge {
        /// The length.
        len: usize,
    },
    /// Not JSON, or not an object with the bundle's fields and types.
    #[error("not a registration bundle")]
    Malformed(#[source] serde_json::Error),
    /// A `format` tag of no known version.
    #[error("format {found:?}: expected {FORMAT_V3:?}, {FORMAT_V2:?} or {FORMAT_V1:?}")]
    UnknownFormat {
        /// The tag found.
        found: String,
    },
    /// A key or the check is not 64 hex digits.
    #[error("{field}: {reason}")]
    BadHex {
        /// The field: `leaf_key`, `mac_key` or `check`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A version 2 encoding without its `check`.
    #[error("{FORMAT_V2} bundle without its \"check\" field")]
    MissingCheck,
    /// The `check` does not match the decoded fields: the bytes are corrupt or were edited.
    #[error(
        "integrity check failed: the bundle's contents do not match its BLAKE3 \"check\" \
         (the file is corrupt or was edited); get a new bundle from the GCKS"
    )]
    CheckMismatch,
    /// The Rekey SA could not be encoded (for the check, or in the output).
    #[error("encoding the Rekey SA")]
    Encode(#[source] serde_json::Error),
    /// The relay directory lists more than [`MAX_DIRECTORY_RELAYS`] relays, or a contact more
    /// than [`MAX_CONTACT_RESYNC`] resync endpoints.
    #[error("relay directory of {relays} relays: beyond its bounds")]
    DirectoryTooLarge {
        /// The relays it lists.
        relays: usize,
    },
    /// A resync endpoint of the relay directory is not `"tcp://ADDR:PORT"` or
    /// `"http://ADDR:PORT"`.
    #[error("relay directory: resync endpoint {text:?} is not \"tcp://ADDR:PORT\" or \"http://ADDR:PORT\"")]
    BadResyncEndpoint {
        /// The text.
        text: String,
    },
    /// A version 2 or 1 encoding with a relay directory (which only version 3 has).
    #[error("a relay directory in a bundle older than {FORMAT_V3}")]
    UnexpectedDirectory,
}

/// The JSON object. The hex strings of the keys are wiped on drop.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct Encoded {
    format: String,
    member: u64,
    leaf: u32,
    leaf_version: u32,
    leaf_key: String,
    #[zeroize(skip)]
    rekey_sa: RekeySa,
    first_seq: u64,
    mac_key: String,
    /// The relay directory (version 3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[zeroize(skip)]
    directory: Option<EncodedDirectory>,
    /// Hex of [`check`] over the decoded fields (version 2 on; absent in version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    check: Option<String>,
}

impl RegistrationBundle {
    /// Encodes the bundle, version 3 ([`FORMAT_V3`]) when its relay directory is not empty and
    /// version 2 ([`FORMAT_V2`]) otherwise, with its `check`: pretty JSON ending in a newline.
    /// The bytes are secret (they hold the member's leaf key): keep them from others (a file of
    /// mode 0600).
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>, BundleError> {
        self.directory.validate()?;
        let v3 = !self.directory.is_empty();
        let encoded = Encoded {
            format: if v3 { FORMAT_V3 } else { FORMAT_V2 }.to_string(),
            directory: v3.then(|| EncodedDirectory::from_directory(&self.directory)),
            member: self.member.0,
            leaf: self.leaf,
            leaf_version: self.leaf_version,
            leaf_key: hex(self.leaf_key.as_bytes()),
            rekey_sa: self.rekey_sa,
            first_seq: self.first_seq,
            mac_key: hex(self.mac_key.as_bytes()),
            check: Some(hex(&check(self)?)),
        };
        let mut bytes =
            Zeroizing::new(serde_json::to_vec_pretty(&encoded).map_err(BundleError::Encode)?);
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Decodes an encoded bundle: version 3 or 2 (its `check` must match the decoded fields) or
    /// version 1 (no `check`). Unknown fields are refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > MAX_ENCODED_LEN {
            return Err(BundleError::TooLarge { len: bytes.len() });
        }
        let encoded: Encoded = serde_json::from_slice(bytes).map_err(BundleError::Malformed)?;
        let (checked, v3) = match encoded.format.as_str() {
            FORMAT_V3 => (true, true),
            FORMAT_V2 => (true, false),
            FORMAT_V1 => (false, false),
            other => {
                return Err(BundleError::UnknownFormat {
                    found: other.to_string(),
                })
            }
        };
        let bundle = RegistrationBundle {
            member: MemberId(encoded.member),
            leaf: encoded.leaf,
            leaf_version: encoded.leaf_version,
            leaf_key: Key::from_bytes(unhex32("leaf_key", &encoded.leaf_key)?),
            rekey_sa: encoded.rekey_sa,
            first_seq: encoded.first_seq,
            mac_key: MacKey::from_bytes(unhex32("mac_key", &encoded.mac_key)?),
            directory: match (v3, encoded.directory.clone()) {
                (true, directory) => directory.unwrap_or_default().into_directory()?,
                (false, None) => RelayDirectory::default(),
                (false, Some(_)) => return Err(BundleError::UnexpectedDirectory),
            },
        };
        if checked {
            let Some(stored) = encoded.check.as_deref() else {
                return Err(BundleError::MissingCheck);
            };
            let stored = unhex32("check", stored)?;
            if !constant_time_eq::constant_time_eq_32(&stored, &check(&bundle)?) {
                return Err(BundleError::CheckMismatch);
            }
        }
        Ok(bundle)
    }
}

/// The `check` of version 2 (an empty directory) or 3: BLAKE3 in derive-key mode
/// ([`CHECK_CONTEXT`], [`CHECK_CONTEXT_V3`]) over every field of the bundle, each in a
/// fixed-length or length-prefixed encoding, so that it covers the contents whatever the JSON's
/// spacing or key order.
fn check(bundle: &RegistrationBundle) -> Result<[u8; 32], BundleError> {
    let rekey_sa =
        Zeroizing::new(serde_json::to_vec(&bundle.rekey_sa).map_err(BundleError::Encode)?);
    let v3 = !bundle.directory.is_empty();
    let mut hasher =
        blake3::Hasher::new_derive_key(if v3 { CHECK_CONTEXT_V3 } else { CHECK_CONTEXT });
    if v3 {
        // The directory in its canonical (compact, fixed field order) JSON, length-prefixed.
        let directory = serde_json::to_vec(&EncodedDirectory::from_directory(&bundle.directory))
            .map_err(BundleError::Encode)?;
        hasher.update(&(directory.len() as u64).to_be_bytes());
        hasher.update(&directory);
    }
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

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// 32 bytes from 64 hex digits (either case).
fn unhex32(field: &'static str, text: &str) -> Result<[u8; 32], BundleError> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return Err(BundleError::BadHex {
            field,
            reason: format!("expected 64 hex digits, found {}", digits.len()),
        });
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let high = hex_digit(field, pair[0])?;
        let low = hex_digit(field, pair[1])?;
        *byte = high << 4 | low;
    }
    Ok(out)
}

fn hex_digit(field: &'static str, digit: u8) -> Result<u8, BundleError> {
    match digit {
        b'0'..=b'9' => Ok(digit - b'0'),
        b'a'..=b'f' => Ok(digit - b'a' + 10),
        b'A'..=b'F' => Ok(digit - b'A' + 10),
        _ => Err(BundleError::BadHex {
            field,
            reason: format!("not a hex digit: {:?}", char::from(digit)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gsa::WrapAlgorithm;
    use crate::lkh::{Degree, KeyRng, KeyTree};

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

    fn refused(bytes: &[u8]) -> BundleError {
        match RegistrationBundle::decode(bytes) {
            Ok(_) => panic!("accepted"),
            Err(error) => error,
        }
    }

    fn text(bundle: &RegistrationBundle) -> String {
        String::from_utf8(bundle.encode().expect("encodes").to_vec()).expect("UTF-8")
    }

    fn same(a: &RegistrationBundle, b: &RegistrationBundle) -> bool {
        a.member == b.member
            && a.leaf == b.leaf
            && a.leaf_version == b.leaf_version
            && a.leaf_key.as_bytes() == b.leaf_key.as_bytes()
            && a.rekey_sa == b.rekey_sa
            && a.first_seq == b.first_seq
            && a.mac_key.as_bytes() == b.mac_key.as_bytes()
            && a.directory == b.directory
    }

    fn contact(n: u8) -> RelayContact {
        RelayContact {
            id: u16::from(n),
            group: SocketAddr::from(([239, 1, 1, n], 5000)),
            feedback: SocketAddr::from(([10, 0, 0, n], 5001)),
            resync: vec!["tcp://10.0.0.1:7000".parse().expect("endpoint")],
        }
    }

    fn bundle_with_relays() -> RegistrationBundle {
        let mut bundle = bundle();
        bundle.directory = RelayDirectory {
            relays: vec![contact(2), contact(3)],
            gcks: Some(contact(1)),
        };
        bundle
    }

    #[test]
    fn a_bundle_with_relays_is_v3_and_its_directory_round_trips_under_the_check() {
        let original = bundle_with_relays();
        let text = text(&original);
        assert!(text.contains(FORMAT_V3), "{text}");
        let decoded = RegistrationBundle::decode(text.as_bytes()).expect("decodes");
        assert!(same(&decoded, &original));
        assert_eq!(decoded.directory.relays.len(), 2);
        // The check covers the directory: another relay port is refused.
        let moved = text.replacen("10.0.0.2:5001", "10.0.0.2:5002", 1);
        assert_ne!(moved, text);
        assert!(matches!(
            refused(moved.as_bytes()),
            BundleError::CheckMismatch
        ));
        // Without relays the bundle stays version 2, which the previous members read.
        assert!(super::tests::text(&bundle()).contains(FORMAT_V2));
    }

    #[test]
    fn a_directory_in_an_old_version_or_beyond_its_bounds_is_a_typed_error() {
        let text = text(&bundle_with_relays());
        let as_v2 = text.replace(FORMAT_V3, FORMAT_V2);
        assert!(matches!(
            refused(as_v2.as_bytes()),
            BundleError::UnexpectedDirectory
        ));
        let bad_endpoint = text.replace("tcp://10.0.0.1:7000", "udp://10.0.0.1:7000");
        assert!(matches!(
            refused(bad_endpoint.as_bytes()),
            BundleError::BadResyncEndpoint { .. }
        ));
        let mut many = bundle_with_relays();
        many.directory.relays = vec![contact(9); MAX_DIRECTORY_RELAYS + 1];
        assert!(matches!(
            many.encode(),
            Err(BundleError::DirectoryTooLarge { .. })
        ));
        let mut value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let relay = value["directory"]["relays"][0].clone();
        value["directory"]["relays"] = vec![relay; MAX_DIRECTORY_RELAYS + 1].into();
        assert!(matches!(
            refused(&serde_json::to_vec(&value).expect("JSON")),
            BundleError::DirectoryTooLarge { .. }
        ));
        // Every truncation of a version 3 encoding is refused without a panic.
        for len in 0..text.len() - 1 {
            assert!(RegistrationBundle::decode(&text.as_bytes()[..len]).is_err());
        }
    }

    /// `text` with one hex digit of the leaf key changed.
    fn flip_leaf_key_digit(text: &str) -> String {
        let key = hex(bundle().leaf_key.as_bytes());
        let at = text.find(&key).expect("leaf key in the encoding");
        let digit = text.as_bytes()[at];
        let flipped = if digit == b'0' { '1' } else { '0' };
        let mut out = text.to_string();
        out.replace_range(at..at + 1, &flipped.to_string());
        out
    }

    /// A version 2 encoding made before the encoding moved into this crate (by the CLI's
    /// bundle module): files written then must still decode to the same bundle.
    fn v2_literal() -> String {
        let bundle = bundle();
        let sa = serde_json::to_string(&bundle.rekey_sa).expect("JSON");
        format!(
            "{{\"format\":\"{FORMAT_V2}\",\"member\":2,\"leaf\":{},\"leaf_version\":{},\
             \"leaf_key\":\"{}\",\"rekey_sa\":{sa},\"first_seq\":{},\"mac_key\":\"{}\",\
             \"check\":\"{}\"}}",
            bundle.leaf,
            bundle.leaf_version,
            hex(bundle.leaf_key.as_bytes()),
            bundle.first_seq,
            hex(bundle.mac_key.as_bytes()),
            hex(&check(&bundle).expect("check")),
        )
    }

    #[test]
    fn an_encoding_is_v2_with_a_check_and_decodes_back() {
        let original = bundle();
        let text = text(&original);
        assert!(text.contains(FORMAT_V2), "{text}");
        assert!(text.contains("\"check\""), "{text}");
        assert!(text.ends_with("}\n"), "{text}");
        let decoded = RegistrationBundle::decode(text.as_bytes()).expect("decodes");
        assert!(same(&decoded, &original));
        // The check covers the contents, not the spacing or the key order.
        let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let compact = serde_json::to_vec(&value).expect("JSON");
        assert!(same(
            &RegistrationBundle::decode(&compact).expect("compact"),
            &original
        ));
        assert!(same(
            &RegistrationBundle::decode(v2_literal().as_bytes()).expect("literal"),
            &original
        ));
    }

    #[test]
    fn a_flipped_digit_fails_the_integrity_check() {
        let corrupt = flip_leaf_key_digit(&text(&bundle()));
        assert!(matches!(
            refused(corrupt.as_bytes()),
            BundleError::CheckMismatch
        ));
        // Every field is covered: a changed sequence number is refused too.
        let text = text(&bundle());
        let other_seq = text.replace("\"first_seq\": 1", "\"first_seq\": 2");
        assert_ne!(other_seq, text);
        assert!(matches!(
            refused(other_seq.as_bytes()),
            BundleError::CheckMismatch
        ));
        let mut value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        value.as_object_mut().expect("object").remove("check");
        let no_check = serde_json::to_vec(&value).expect("JSON");
        assert!(matches!(refused(&no_check), BundleError::MissingCheck));
    }

    #[test]
    fn a_v1_encoding_without_a_check_still_decodes_and_unknown_versions_do_not() {
        let original = bundle();
        let mut value: serde_json::Value = serde_json::from_str(&text(&original)).expect("JSON");
        let object = value.as_object_mut().expect("object");
        object.remove("check");
        object.insert("format".into(), FORMAT_V1.into());
        let v1 = serde_json::to_vec(&value).expect("JSON");
        assert!(same(
            &RegistrationBundle::decode(&v1).expect("v1 decodes"),
            &original
        ));
        value["format"] = "rekeycast-registration-bundle-v9".into();
        let error = refused(&serde_json::to_vec(&value).expect("JSON"));
        assert!(
            matches!(&error, BundleError::UnknownFormat { found } if found.ends_with("v9")),
            "{error}"
        );
    }

    #[test]
    fn bad_keys_unknown_fields_and_oversized_input_are_typed_errors() {
        let text = text(&bundle());
        let key = hex(bundle().leaf_key.as_bytes());
        let short = text.replace(&key, &key[..62]);
        assert!(matches!(
            refused(short.as_bytes()),
            BundleError::BadHex {
                field: "leaf_key",
                ..
            }
        ));
        let not_hex = text.replace(&key, &format!("zz{}", &key[2..]));
        assert!(matches!(
            refused(not_hex.as_bytes()),
            BundleError::BadHex {
                field: "leaf_key",
                ..
            }
        ));
        let extra = text.replacen('{', "{\"extra\": 1,", 1);
        assert!(matches!(
            refused(extra.as_bytes()),
            BundleError::Malformed(_)
        ));
        let huge = vec![b' '; MAX_ENCODED_LEN + 1];
        assert!(matches!(
            refused(&huge),
            BundleError::TooLarge { len } if len == MAX_ENCODED_LEN + 1
        ));
    }

    #[test]
    fn every_truncation_and_single_bit_flip_is_refused_without_panicking() {
        let text = text(&bundle());
        let bytes = text.as_bytes();
        for len in 0..bytes.len() {
            // The trailing newline (and only it) may go.
            if bytes[len..].iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            assert!(RegistrationBundle::decode(&bytes[..len]).is_err(), "{len}");
        }
        let original = bundle();
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.to_vec();
                flipped[at] ^= 1 << bit;
                // A flip that leaves the same contents (JSON whitespace, the case of a hex
                // digit) may decode, but only to the same bundle.
                if let Ok(decoded) = RegistrationBundle::decode(&flipped) {
                    assert!(same(&decoded, &original), "byte {at} bit {bit}");
                }
            }
        }
    }
}
