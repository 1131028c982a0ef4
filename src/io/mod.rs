//! Real I/O: the only module with sockets and threads, and the only one that sees
//! `std::io::Error`.
//!
//! Everything else in the crate is sans-IO and is driven from here: the UDP multicast sockets
//! ([`socket`]), the worker pool for CPU-heavy work ([`workers`]), and the resync client and
//! server. Every engine (GCKS, member, relay) runs on the generic driver of [`crate::engine`].

pub mod resync_client;
pub mod resync_server;
pub mod socket;
pub mod workers;
