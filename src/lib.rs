//! rekeycast: a reliable multicast rekey transport engine.
//!
//! A group key server (the GCKS of RFC 4046) batches membership changes into LKH rekey
//! messages and delivers them to every member over UDP multicast, with RaptorQ FEC, NACKs with
//! randomized backoff suppression, a cheap BLAKE3 datagram MAC checked before the Ed25519
//! signature, and TCP/HTTP resync for members that fall out of sync.
//!
//! The protocol core is sans-IO: every state machine is fed datagrams and timeouts with the
//! time as an argument, and owns no socket, clock or thread. See `DESIGN.md` in the project's
//! shared documents for the architecture; each module's documentation says what it owns.
//!
//! Modules present so far:
//!
//! - [`wire`]: the datagram and TCP frame formats, parsed and emitted.
//! - [`auth`]: authentication of rekey traffic: datagram MAC, Merkle tree, manifest signature.
//! - [`session`]: rekey messages (so far their signed manifest).
//! - [`lkh`]: the LKH key tree with batch rekeying, and a member's key state.
//! - [`gsa`]: the Rekey SA and Data SA, and the datagram MAC key of each message.
//! - [`sim`]: a deterministic, seeded network simulator driving sans-IO nodes in virtual time.
//! - [`io`]: real sockets and threads (so far the UDP multicast sockets).
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod demo;
pub mod fuzz_support;
pub mod gcks;
pub mod gsa;
pub mod io;
pub mod keyfile;
pub mod lkh;
pub mod member;
pub mod session;
pub mod sim;
pub mod wire;
