//! The admin interface of `rekeycast server` and its client, `rekeycast admin`.
//!
//! The protocol is one JSON request per line on the server's Unix socket (`admin_socket`,
//! mode 0600), answered by one JSON response per line:
//!
//! - `{"op":"join","member":42,"bundle_path":"/abs/path"}`: admits member 42 in the next
//!   batch, waits for its registration bundle and writes it to `bundle_path` with mode 0600;
//!   answers `{"ok":true,"op":"join","member":42,"relay":false,"first_seq":N,
//!   "bundle_path":...}`. With `"relay":true` the member is registered as a relay
//!   (`rekey-relay`), which the GCKS counts (`status`: `relays`).
//! - `{"op":"leave","member":42}`: removes member 42 in the next batch; the leave is in the
//!   state directory's journal (fsynced) before the answer, so it is applied even if the
//!   server crashes first (`"outcome":"revoked","durable":true`). A leave of a member whose
//!   join waits for its batch cancels the join (`"outcome":"join_cancelled"`; the join's
//!   request fails). A leave of a member neither in the group nor joining fails.
//! - `{"op":"rekey"}`: applies the pending changes now (or refreshes the group key).
//! - `{"op":"status"}`: the GCKS's figures.
//! - `{"op":"roll_key","compromised":false,"announcements":3}`: replaces the GCKS's signing
//!   key. The next key is written beside the current one (mode 0600) first; it is announced,
//!   under the current key, in the next `announcements` messages, and signs every message from
//!   the one after them, whose sequence number is answered: `{"ok":true,"op":"roll_key",
//!   "compromised":false,"from_seq":N}`. With `"compromised":true` nothing is announced (the
//!   old key may be an attacker's): the next message is signed with the new key and every
//!   member is told to re-register. Needs a server with a `state_dir`; refused while another
//!   rollover is under way.
//!
//! Failures answer `{"ok":false,"error":"..."}`. A relative `bundle_path` is taken relative to
//! the server's working directory; the client sends absolute paths.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// One admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Admit a member and write its registration bundle.
    Join {
        /// The member's id.
        member: u64,
        /// Where to write the bundle.
        bundle_path: PathBuf,
        /// Whether the member is a relay (`rekey-relay`): the GCKS counts it as one.
        #[serde(default)]
        relay: bool,
    },
    /// Remove a member.
    Leave {
        /// The member's id.
        member: u64,
    },
    /// Rekey now.
    Rekey,
    /// The GCKS's figures.
    Status,
    /// Replace the GCKS's signing key.
    #[serde(rename = "roll_key")]
    RollKey {
        /// The current key may be compromised: announce nothing, every member re-registers.
        #[serde(default)]
        compromised: bool,
        /// Messages that announce the next key under the current one (planned rollover).
        #[serde(default = "default_announcements")]
        announcements: u32,
    },
}

/// The planned rollover's announcing messages when the request names none.
fn default_announcements() -> u32 {
    3
}

/// The flags of `rekeycast admin`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The server's admin socket (its configuration's `admin_socket`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// What to ask.
    #[command(subcommand)]
    pub op: AdminOp,
}

/// The admin operations.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminOp {
    /// Admit a member in the next batch and write its registration bundle (mode 0600).
    Join {
        /// The member's id.
        #[arg(long, value_name = "N")]
        member: u64,
        /// Where to write the bundle (`rekeycast member --bundle FILE` reads it).
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// Register the member as a relay (`rekey-relay --bundle FILE` reads its bundle).
        #[arg(long)]
        relay: bool,
    },
    /// Remove a member in the next batch.
    Leave {
        /// The member's id.
        #[arg(long, value_name = "N")]
        member: u64,
    },
    /// Apply the pending joins and leaves now (or refresh the group key if there are none).
    Rekey,
    /// Print the GCKS's figures.
    Status,
    /// Replace the GCKS's signing key: the new key is announced under the current one in the
    /// next messages, then signs every message (needs a server with a `state_dir`).
    RollKey {
        /// The current key may be compromised: nothing is announced under it, and every
        /// member is told to re-register (its registration hands it the new key).
        #[arg(long)]
        compromised: bool,
        /// How many messages announce the next key before it signs (planned rollover).
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        announcements: u32,
    },
}

/// Runs `rekeycast admin`: sends one request, prints the response; exits 1 if it failed.
pub fn run(args: &AdminArgs) -> anyhow::Result<ExitCode> {
    let request = match &args.op {
        AdminOp::Join {
            member,
            bundle,
            relay,
        } => {
            let bundle_path = if bundle.is_absolute() {
                bundle.clone()
            } else {
                std::env::current_dir()
                    .context("finding the working directory")?
                    .join(bundle)
            };
            Request::Join {
                member: *member,
                bundle_path,
                relay: *relay,
            }
        }
        AdminOp::Leave { member } => Request::Leave { member: *member },
        AdminOp::Rekey => Request::Rekey,
        AdminOp::Status => Request::Status,
        AdminOp::RollKey {
            compromised,
            announcements,
        } => Request::RollKey {
            compromised: *compromised,
            announcements: *announcements,
        },
    };
    let response = call(&args.socket, &request)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&response).context("printing the response")?
    );
    if response.get("ok") == Some(&serde_json::Value::Bool(true)) {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

/// Sends `request` to the admin socket at `socket` and returns the response.
pub fn call(socket: &std::path::Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the admin socket {}", socket.display()))?;
    let mut line = serde_json::to_string(request).context("encoding the request")?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .context("sending the request")?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .context("reading the response")?;
    if answer.trim().is_empty() {
        bail!("the server closed the connection without answering");
    }
    serde_json::from_str(&answer).context("the response is not JSON")
}
