//! Logging for `server` and `member`: `tracing` to standard error, filtered by `RUST_LOG` when
//! it is set, else by the configuration file's `log.filter`.

use std::io::IsTerminal;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `config_filter` is the configuration's `log.filter`.
pub fn init(config_filter: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .with_context(|| format!("RUST_LOG = {directives:?}: not a valid filter"))?,
        _ => EnvFilter::try_new(config_filter)
            .with_context(|| format!("log.filter = {config_filter:?}: not a valid filter"))?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and pipes get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|error| anyhow::anyhow!("installing the logger: {error}"))
}
