//! rekeycast-fec: RaptorQ (RFC 6330) source blocks, repair symbols on demand, safe decoding.
//!
//! This crate is being built (issue 5); it has no public items yet.
#![forbid(unsafe_code)]
