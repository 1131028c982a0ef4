//! The network-namespace harness: test hosts in their own namespaces, joined by veth pairs,
//! exchanging real kernel multicast.
//!
//! Everything the harness creates carries a name prefix unique to this harness and to the
//! creating process ([`name_prefix`]), is removed by a `Drop` guard also when a test fails or
//! panics, and leftovers of a crashed run (a prefix whose process is gone) are removed by
//! [`clean_leftovers`] before anything new is made. Test hosts use addresses from
//! 198.18.0.0/15 and multicast groups from 239.0.0.0/8, inside their own namespaces only.

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// The prefix of every namespace and interface the harness creates.
pub const PREFIX: &str = "rkc";

/// What can go wrong while building or running a topology.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A command could not be started.
    #[error("could not run {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command exited with a failure.
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on standard error.
        stderr: String,
    },
    /// A name would be longer than the kernel's interface name limit of 15 bytes.
    #[error("name {0:?} is longer than 15 bytes")]
    NameTooLong(String),
}

/// Whether the netns tests can run here, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Root and `ip` are present.
    Available,
    /// They are not; the string says what is missing.
    Unavailable(String),
}

/// Checks for root and for the `ip` command of iproute2.
pub fn capability() -> Capability {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(str::to_owned))
        });
    if uid.as_deref() != Some("0") {
        return Capability::Unavailable("not running as root (effective uid is not 0)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(output) if output.status.success() => Capability::Available,
        Ok(_) => Capability::Unavailable("`ip -V` failed".into()),
        Err(error) => Capability::Unavailable(format!("`ip` (iproute2) not found: {error}")),
    }
}

/// Decides what a netns test does when it cannot run: returns `true` when it may run, prints
/// a loud SKIPPED line and returns `false` when it may not, and panics instead when
/// `REKEYCAST_REQUIRE_NETNS=1` (CI), where not being able to run is a failure.
pub fn may_run(test: &str) -> bool {
    match capability() {
        Capability::Available => true,
        Capability::Unavailable(why) => {
            if std::env::var("REKEYCAST_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("netns test {test} cannot run ({why}) and REKEYCAST_REQUIRE_NETNS=1");
            }
            eprintln!();
            eprintln!("**************************************************************");
            eprintln!("*** SKIPPED netns test {test}: {why}");
            eprintln!("*** run the tests as root with iproute2 installed to run it");
            eprintln!("**************************************************************");
            false
        }
    }
}

/// The name prefix of the current process: [`PREFIX`] followed by the process id.
pub fn name_prefix() -> String {
    format!("{PREFIX}{}", std::process::id())
}

/// Runs a command to completion and turns a failure into an [`Error`].
pub fn run(program: &str, args: &[&str]) -> Result<Output, Error> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Removes namespaces left by harness processes that no longer run (a crashed or killed test
/// run). Namespaces of live processes, this one included, are left alone, so tests running in
/// parallel do not remove each other's hosts.
pub fn clean_leftovers() -> Result<(), Error> {
    let listing = run("ip", &["netns", "list"])?;
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if pid.is_empty() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // A leftover: its veth ends go with it.
        let _ = run("ip", &["netns", "del", name]);
    }
    Ok(())
}

/// A network namespace, deleted when dropped (with every interface inside it).
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates a namespace called `name` and brings its loopback up.
    pub fn create(name: &str) -> Result<Self, Error> {
        if name.len() > 15 {
            return Err(Error::NameTooLong(name.into()));
        }
        run("ip", &["netns", "add", name])?;
        let namespace = Self { name: name.into() };
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output, Error> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs `program` inside the namespace (through `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program)
            .stdin(Stdio::null());
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "del", &self.name]) {
            eprintln!(
                "netns harness: could not delete namespace {}: {error}",
                self.name
            );
        }
    }
}

/// Links two namespaces with a veth pair and gives each end an address (`a.b.c.d/len`).
///
/// The pair lives as long as the namespaces: deleting a namespace deletes its end, and with it
/// the pair.
pub fn link(
    a: &Namespace,
    a_addr: &str,
    b: &Namespace,
    b_addr: &str,
    suffix: &str,
) -> Result<(), Error> {
    let a_if = format!("{}{suffix}a", name_prefix());
    let b_if = format!("{}{suffix}b", name_prefix());
    for name in [&a_if, &b_if] {
        if name.len() > 15 {
            return Err(Error::NameTooLong(name.clone()));
        }
    }
    run(
        "ip",
        &[
            "link",
            "add",
            &a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "netns",
            b.name(),
        ],
    )?;
    for (namespace, interface, address) in [(a, &a_if, a_addr), (b, &b_if, b_addr)] {
        namespace.ip(&["addr", "add", address, "dev", interface])?;
        namespace.ip(&["link", "set", interface, "up"])?;
    }
    Ok(())
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub mod impair;
pub mod probe;
pub mod runner;
pub mod scenario;
pub mod switch;
pub mod topology;
