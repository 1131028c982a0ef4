//! The binaries as separate processes: children killed on drop, waiting (with a deadline) for
//! a file to appear or a child to exit, and the configuration files of `rekeycast server` and
//! `rekeycast member`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use crate::wait;

/// Kills and reaps the processes it holds when dropped, however the test ends.
#[derive(Debug, Default)]
pub struct Processes(pub Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A new file at `path` (truncated) for a child's output.
pub fn log_file(path: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(path).unwrap())
}

/// A file's text, or nothing when it cannot be read (for failure messages).
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until `path` exists, at most `limit`.
///
/// # Panics
/// At the deadline, naming the path.
pub fn wait_for_file(path: &Path, limit: Duration) {
    wait::until(
        limit,
        &format!("{} to appear", path.display()),
        || path.exists().then_some(()),
        String::new,
    );
}

/// Waits until the log at `path` contains `needle`, at most `limit`: a process's own word that
/// it reached a state (bound its sockets, joined its group), instead of a guessed sleep.
///
/// # Panics
/// At the deadline, with the log.
pub fn wait_for_log(path: &Path, needle: &str, limit: Duration) {
    wait::until(
        limit,
        &format!("{needle:?} in {}", path.display()),
        || read_log(path).contains(needle).then_some(()),
        || format!("log:\n{}", read_log(path)),
    );
}

/// Waits until `child` exits, at most `limit`: its status, or `None` if it still runs.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    wait::poll_until(limit, || child.try_wait().unwrap())
}

/// The configuration file of `rekeycast server` on loopback.
#[derive(Debug, Clone)]
pub struct ServerFile {
    /// `gcks.bind`: the feedback address.
    pub feedback: String,
    /// `gcks.state_dir`.
    pub state_dir: PathBuf,
    /// `admin_socket`.
    pub admin_socket: PathBuf,
    /// `gcks.multicast.group` (joined on the loopback interface, multicast loopback on).
    pub multicast: String,
    /// `gcks.batch_interval_ms`, if set.
    pub batch_interval_ms: Option<u64>,
    /// `[gcks.sender]` settings (`name = integer`; dotted names reach nested tables, as
    /// `grtt.initial_ms`).
    pub sender: Vec<(&'static str, u64)>,
    /// `gcks.resync_tcp`.
    pub resync_tcp: String,
}

impl ServerFile {
    /// The file's TOML text.
    pub fn to_toml(&self) -> String {
        let mut text = format!(
            "admin_socket = \"{}\"\n[gcks]\nbind = \"{}\"\nstate_dir = \"{}\"\n\
             resync_tcp = \"{}\"\n",
            self.admin_socket.display(),
            self.feedback,
            self.state_dir.display(),
            self.resync_tcp,
        );
        if let Some(interval) = self.batch_interval_ms {
            let _ = writeln!(text, "batch_interval_ms = {interval}");
        }
        let _ = writeln!(
            text,
            "[gcks.multicast]\ngroup = \"{}\"\ninterface = \"127.0.0.1\"\nloopback = true",
            self.multicast
        );
        if !self.sender.is_empty() {
            text.push_str("[gcks.sender]\n");
            for (name, value) in &self.sender {
                let _ = writeln!(text, "{name} = {value}");
            }
        }
        text
    }

    /// Writes the file at `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_toml()).unwrap();
    }
}

/// The configuration file of `rekeycast member` on loopback.
#[derive(Debug, Clone)]
pub struct MemberFile {
    /// `member.receiver.feedback_addr`: where the member's NACKs go.
    pub feedback: String,
    /// `bundle`: its registration bundle file.
    pub bundle: PathBuf,
    /// `member.resync_endpoints`, in order (`tcp://ADDR`).
    pub resync_endpoints: Vec<String>,
    /// `member.receiver.state_check_interval_ms`.
    pub state_check_interval_ms: u64,
    /// `member.multicast.group` (joined on the loopback interface).
    pub multicast: String,
}

impl MemberFile {
    /// The file's TOML text.
    pub fn to_toml(&self) -> String {
        let endpoints: Vec<String> = self
            .resync_endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!(
            "bundle = \"{}\"\n[member]\nresync_endpoints = [{}]\n\
             [member.multicast]\ngroup = \"{}\"\ninterface = \"127.0.0.1\"\n\
             [member.receiver]\nfeedback_addr = \"{}\"\nstate_check_interval_ms = {}\n",
            self.bundle.display(),
            endpoints.join(", "),
            self.multicast,
            self.feedback,
            self.state_check_interval_ms,
        )
    }

    /// Writes the file at `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_toml()).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_and_member_files_name_every_setting() {
        let server = ServerFile {
            feedback: "127.0.0.1:1".into(),
            state_dir: "/s".into(),
            admin_socket: "/a.sock".into(),
            multicast: "239.1.2.3:4".into(),
            batch_interval_ms: Some(200),
            sender: vec![("grtt.initial_ms", 10)],
            resync_tcp: "127.0.0.1:2".into(),
        };
        assert_eq!(
            server.to_toml(),
            "admin_socket = \"/a.sock\"\n[gcks]\nbind = \"127.0.0.1:1\"\nstate_dir = \"/s\"\n\
             resync_tcp = \"127.0.0.1:2\"\nbatch_interval_ms = 200\n\
             [gcks.multicast]\ngroup = \"239.1.2.3:4\"\ninterface = \"127.0.0.1\"\n\
             loopback = true\n[gcks.sender]\ngrtt.initial_ms = 10\n"
        );
        let member = MemberFile {
            feedback: "127.0.0.1:1".into(),
            bundle: "/b".into(),
            resync_endpoints: vec!["tcp://127.0.0.1:2".into(), "tcp://127.0.0.1:3".into()],
            state_check_interval_ms: 100,
            multicast: "239.1.2.3:4".into(),
        };
        assert_eq!(
            member.to_toml(),
            "bundle = \"/b\"\n[member]\n\
             resync_endpoints = [\"tcp://127.0.0.1:2\", \"tcp://127.0.0.1:3\"]\n\
             [member.multicast]\ngroup = \"239.1.2.3:4\"\ninterface = \"127.0.0.1\"\n\
             [member.receiver]\nfeedback_addr = \"127.0.0.1:1\"\nstate_check_interval_ms = 100\n"
        );
    }
}
