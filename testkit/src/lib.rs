//! rekeycast-testkit: what the integration tests, benches and netns scenarios of rekeycast
//! share, written once.
//!
//! A dev-only crate (`publish = false`, never a normal dependency of the library):
//!
//! - [`addr`]: multicast groups and ports derived from the process id, so test binaries and
//!   tests running at the same time on one host do not hear each other; loopback sockets.
//! - [`wait`]: waiting for a condition or an event with a deadline (never a fixed sleep).
//! - [`engine`]: admitting members through a running GCKS and waiting for a message to be sent
//!   or applied.
//! - [`forge`]: datagrams sealed as an insider (with a real MAC key) or an outsider (a made-up
//!   key) would, random bytes and bit flips.
//! - [`keys`]: a GCKS's key tree and signing key from fixed seeds, for the sans-IO tests.
//! - [`process`]: child processes killed on drop, waiting for files and exits, configuration
//!   files of the `rekeycast` and `rekey-relay` binaries.
//! - [`http`]: a bare HTTP GET and reading a Prometheus sample.
//! - [`hostile`]: hostile clients of the resync endpoints (many source addresses, raw frames,
//!   the open-file limit of a flood).
//! - [`loss`]: the workspace's loss model (re-exported from `rekeycast_nack::loss`).
//!
//! Helpers panic with a message naming what did not happen: a failure here is a test failure.
#![forbid(unsafe_code)]
// A test kit reports failures by panicking.
#![allow(clippy::unwrap_used)]

pub mod addr;
pub mod engine;
pub mod forge;
pub mod hostile;
pub mod http;
pub mod keys;
pub mod process;
pub mod wait;

/// The workspace's one loss model: independent and Gilbert-Elliott loss, seeded.
pub mod loss {
    pub use rekeycast_nack::loss::*;
}
