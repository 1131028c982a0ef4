//! rekeycast-nack: sans-IO NACK scheduling, suppression, repair aggregation and GRTT.
//!
//! This crate is being built (issue 6); it has no public items yet.
#![forbid(unsafe_code)]
