//! Ctrl-C and SIGTERM as a flag that the long-running subcommands (`server`, `member`) poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;

/// Set once Ctrl-C (SIGINT), SIGTERM or SIGHUP arrived.
#[derive(Debug, Clone)]
pub struct ShutdownFlag(Arc<AtomicBool>);

impl ShutdownFlag {
    /// Installs the process's signal handler (once per process) and returns its flag.
    pub fn install() -> anyhow::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = Arc::clone(&flag);
        ctrlc::set_handler(move || handler_flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C / SIGTERM handler")?;
        Ok(Self(flag))
    }

    /// Whether a shutdown was asked for.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
