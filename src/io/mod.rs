//! Real I/O: the only module with sockets and threads, and the only one that sees
//! `std::io::Error`.
//!
//! Everything else in the crate is sans-IO and is driven from here. So far this module holds
//! the UDP multicast sockets ([`socket`]); the event loop that drives the sessions over them
//! comes next.

pub mod socket;
