//! Rekey messages and the protocol sessions that carry them.
//!
//! This module owns the layout of a rekey message (its signed manifest and its chunks) and,
//! later, the sans-IO sender and receiver sessions (issue 8). It owns no socket, clock or
//! thread. Present so far:
//!
//! - [`manifest`]: the signed manifest of a rekey message.
//! - [`chunk`]: the chunk container (header, payload, Merkle path or signature, padding).
//! - [`layout`]: user-oriented key assignment: a batch's wraps packed into chunks, one chunk
//!   per member, and the GCKS's whole message build (layout, authentication, signing).

pub mod chunk;
pub mod layout;
pub mod manifest;
