//! rekeycast: a reliable multicast rekey transport engine.
//!
//! A group key server (the GCKS of RFC 4046) batches membership changes into LKH rekey
//! messages and delivers them to every member over UDP multicast, with RaptorQ FEC, NACKs with
//! randomized backoff suppression, a cheap BLAKE3 datagram MAC checked before the Ed25519
//! signature, and TCP/HTTP resync for members that fall out of sync.
//!
//! The protocol core is sans-IO and lives in the `rekeycast-proto` crate: every state machine
//! is fed datagrams and timeouts with the time as an argument, and owns no socket, clock or
//! thread. This crate re-exports its modules ([`wire`], [`auth`], [`lkh`], [`gsa`],
//! [`session`], the relay session in [`relay`], the resync handlers in [`resync`]) and adds
//! what does I/O: sockets, threads, files. See `DESIGN.md` in the project's shared documents for
//! the architecture; each module's documentation says what it owns.
//!
//! For a GCKS product: [`Gcks`] (the key server side of a group), [`Member`] (one member) and
//! [`Relay`] (a relay tier), exported here. Each is a thin handle over one generic driver
//! ([`engine::Driver`]: sockets, threads, timers, storage) running a sans-IO endpoint of
//! `rekeycast-proto` (`GcksEndpoint`, `MemberEndpoint`, `RelayEndpoint`), which products with
//! their own runtime, and the simulator, can drive themselves.
//!
//! Modules:
//!
//! - [`wire`]: the datagram and TCP frame formats, parsed and emitted.
//! - [`auth`]: authentication of rekey traffic: datagram MAC, Merkle tree, manifest and chunk
//!   signatures, the verifier pipeline's stages.
//! - [`lkh`]: the LKH key tree with batch rekeying, and a member's key state.
//! - [`gsa`]: the Rekey SA and Data SA, and the datagram MAC key of each message.
//! - [`session`]: rekey messages (manifest, chunks, layout) and the sans-IO sender and
//!   receiver sessions.
//! - [`sim`]: a deterministic, seeded network simulator driving sans-IO nodes in virtual time,
//!   and rekey scenarios over it ([`sim::rekey`]).
//! - [`io`]: real sockets and threads: multicast sockets, worker pool, event loops.
//! - [`gcks`], [`member`]: the embedding API.
//! - [`config`]: what the engines' configurations share: serde forms and [`InvalidConfig`],
//!   the error of their `validate()`.
//! - [`keyfile`]: the GCKS's key file, and secret files written with mode 0600. (Configuration
//!   files, the admin socket and bundle files belong to the `rekeycast-cli` crate.)
//! - [`resync`]: the resync protocol handlers (from the sans-IO crate) and the durable state of
//!   a GCKS and a relay (key tree and history of signed messages).
//! - [`persist`]: writing files durably; saving and loading a key tree and a member's keys.
//! - [`demo`]: a GCKS and many members in one process on loopback multicast.
#![forbid(unsafe_code)]

pub use rekeycast_proto::{auth, fuzz_support, gsa, lkh, session, wire};

pub use config::InvalidConfig;
pub use engine::gcks::{Gcks, GcksBuilder, GcksError, GcksEvent, JoinsTicket, JoinsWaitError};
pub use engine::member::{Member, MemberBuilder, MemberConfig, MemberError, MemberStats};
pub use engine::{Relay, RelayEngineConfig, RelayEngineError, RelayStats};
pub use gcks::{GcksConfig, GcksStats};

pub mod config;
pub mod demo;
pub mod engine;
pub mod gcks;
pub mod io;
pub mod keyfile;
pub mod member;
pub mod persist;
pub mod relay;
pub mod report;
pub mod resync;
pub mod sim;
