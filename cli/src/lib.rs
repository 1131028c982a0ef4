//! The rekeycast command line: the subcommands of `rekeycast` (`demo`, `server`, `member`,
//! `admin`, `sim`), one module each, and what they share with `rekey-relay`: the configuration
//! files ([`config`]), registration bundle files ([`bundle`]), logging and shutdown on a signal.
//!
//! The engine library `rekeycast` knows nothing of files, flags or the admin socket: this crate
//! turns them into the library's configurations and runs its engines. The binaries
//! `rekeycast` and `rekey-relay` are thin `main`s over it.

#![forbid(unsafe_code)]

pub mod admin;
pub mod bundle;
pub mod chart;
pub mod config;
pub mod demo;
pub mod logging;
pub mod loss;
pub mod member;
pub mod server;
pub mod shutdown;
pub mod sim;

/// Microseconds as milliseconds, for display and reports.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}
