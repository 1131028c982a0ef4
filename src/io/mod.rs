//! Real I/O: the only module with sockets and threads, and the only one that sees
//! `std::io::Error`.
//!
//! Everything else in the crate is sans-IO and is driven from here: the UDP multicast sockets
//! ([`socket`]), the worker pool for CPU-heavy work ([`workers`]), the resync client and
//! server, and the mio event loops of the GCKS ([`crate::gcks::Gcks`]) and of a relay
//! ([`crate::relay::Relay`]), which own the sockets and drive the sans-IO sessions over them.
//! A member runs on the generic driver ([`crate::engine::member::Member`]).

pub(crate) mod fetch_job;
pub(crate) mod gcks_loop;
pub(crate) mod handle;
pub(crate) mod relay_loop;
pub mod resync_client;
pub mod resync_server;
pub mod socket;
pub mod workers;
