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
    /// `feedback_listen`.
    pub feedback: String,
    /// `state_dir`.
    pub state_dir: PathBuf,
    /// `admin_socket`.
    pub admin_socket: PathBuf,
    /// `group.multicast`.
    pub multicast: String,
    /// `batch.interval_ms`, if set.
    pub batch_interval_ms: Option<u64>,
    /// `[sender]` settings (`name = integer`).
    pub sender: Vec<(&'static str, u64)>,
    /// `resync.tcp_listen`.
    pub resync_tcp: String,
}

impl ServerFile {
    /// The file's TOML text.
    pub fn to_toml(&self) -> String {
        let mut text = format!(
            "feedback_listen = \"{}\"\nstate_dir = \"{}\"\nadmin_socket = \"{}\"\n\
             [group]\nmulticast = \"{}\"\n",
            self.feedback,
            self.state_dir.display(),
            self.admin_socket.display(),
            self.multicast
        );
        if let Some(interval) = self.batch_interval_ms {
            let _ = writeln!(text, "[batch]\ninterval_ms = {interval}");
        }
        if !self.sender.is_empty() {
            text.push_str("[sender]\n");
            for (name, value) in &self.sender {
                let _ = writeln!(text, "{name} = {value}");
            }
        }
        let _ = writeln!(text, "[resync]\ntcp_listen = \"{}\"", self.resync_tcp);
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
    /// `feedback`: where the member's NACKs go.
    pub feedback: String,
    /// `bundle`: its registration bundle file.
    pub bundle: PathBuf,
    /// `resync_endpoints`, in order (`tcp://ADDR`).
    pub resync_endpoints: Vec<String>,
    /// `state_check_interval_ms`.
    pub state_check_interval_ms: u64,
    /// `group.multicast`.
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
            "feedback = \"{}\"\nbundle = \"{}\"\nresync_endpoints = [{}]\n\
             state_check_interval_ms = {}\n[group]\nmulticast = \"{}\"\n",
            self.feedback,
            self.bundle.display(),
            endpoints.join(", "),
            self.state_check_interval_ms,
            self.multicast
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
            sender: vec![("grtt_initial_ms", 10)],
            resync_tcp: "127.0.0.1:2".into(),
        };
        assert_eq!(
            server.to_toml(),
            "feedback_listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\nadmin_socket = \"/a.sock\"\n\
             [group]\nmulticast = \"239.1.2.3:4\"\n[batch]\ninterval_ms = 200\n\
             [sender]\ngrtt_initial_ms = 10\n[resync]\ntcp_listen = \"127.0.0.1:2\"\n"
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
            "feedback = \"127.0.0.1:1\"\nbundle = \"/b\"\n\
             resync_endpoints = [\"tcp://127.0.0.1:2\", \"tcp://127.0.0.1:3\"]\n\
             state_check_interval_ms = 100\n[group]\nmulticast = \"239.1.2.3:4\"\n"
        );
    }
}
