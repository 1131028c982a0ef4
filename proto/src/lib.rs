//! rekeycast-proto: the sans-IO core of rekeycast.
//!
//! Every state machine here is fed datagrams, requests and timeouts with the time as an
//! argument and is asked what to send and when to be called again: it owns no socket, no
//! clock, no thread and no file. The engine crate (`rekeycast`) drives it over real sockets and
//! threads; the simulator drives the same code in virtual time. The crate depends on no I/O
//! crate, and `clippy.toml` bans the std calls that read clocks, spawn threads or touch files.
//!
//! Modules:
//!
//! - [`wire`]: the datagram and TCP frame formats, parsed and emitted.
//! - [`auth`]: authentication of rekey traffic: datagram MAC, Merkle tree, manifest and chunk
//!   signatures, the verifier pipeline's stages.
//! - [`lkh`]: the LKH key tree with batch rekeying, and a member's key state (encoded to and
//!   decoded from bytes; the engine writes them to files).
//! - [`gsa`]: the Rekey SA and Data SA, and the datagram MAC key of each message.
//! - [`session`]: rekey messages (manifest, chunks, layout) and the sans-IO sender and
//!   receiver sessions.
//! - [`relay`]: the relay session: a member upstream, a sender downstream.
//! - [`resync`]: the resync protocol handlers (TCP frames and HTTP requests) over a source of
//!   stored messages, with their limits.
//! - [`fuzz_support`]: the round-trip checks the fuzz targets and the corpus test run.
#![forbid(unsafe_code)]

pub mod auth;
pub mod endpoint;
pub mod fuzz_support;
pub mod gsa;
pub mod lkh;
pub mod relay;
pub mod resync;
pub mod session;
#[cfg(test)]
mod test_support;
pub mod wire;
