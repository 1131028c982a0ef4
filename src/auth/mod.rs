//! Authentication of rekey traffic: what a member may trust, in which order (RFC 4046 5.2).
//!
//! The verifier pipeline (length and header checks, the datagram MAC, the replay window, the
//! manifest's signature once per message, the member's own chunk) is being built here (issue 7).
//! Present so far:
//!
//! - [`mac`]: the 16-byte BLAKE3 datagram MAC, checked before anything else.
//! - [`merkle`]: a BLAKE3 Merkle tree over a message's chunks, one of the two ways a chunk can
//!   authenticate itself under the manifest's single signature.

pub mod mac;
pub mod merkle;
