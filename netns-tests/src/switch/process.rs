//! Driving a running switch from a test or a scenario runner: start `rekeycast-netns switch`
//! inside a namespace, wait for `ready`, send commands and read their one-line replies, stop
//! it. The process is killed and reaped if the handle is dropped without stopping it.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::Counters;
use crate::Namespace;

/// How long a reply (or `ready`) may take before it is an error.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong driving a switch process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The process could not be started.
    #[error("could not start the switch: {0}")]
    Spawn(std::io::Error),
    /// Its first line was not `ready` (or it exited first).
    #[error("the switch did not get ready (first line: {0:?})")]
    NotReady(Option<String>),
    /// No reply within [`REPLY_TIMEOUT`].
    #[error("no reply from the switch to {command:?} within {REPLY_TIMEOUT:?}")]
    Timeout {
        /// The command.
        command: String,
    },
    /// The process closed its standard output (it exited).
    #[error("the switch exited (waiting for the reply to {command:?})")]
    Exited {
        /// The command.
        command: String,
    },
    /// Writing a command failed.
    #[error("could not write to the switch: {0}")]
    Write(std::io::Error),
    /// Waiting for or signalling the process failed.
    #[error("could not wait for or signal the switch: {0}")]
    Wait(std::io::Error),
    /// The switch did not exit within [`REPLY_TIMEOUT`] of being told to.
    #[error("the switch did not exit within {REPLY_TIMEOUT:?}")]
    DidNotExit,
    /// The reply to `counters` was not a [`Counters`].
    #[error("the switch's counters do not parse ({source}): {line}")]
    Counters {
        /// The reply.
        line: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The switch refused a command.
    #[error("the switch refused {command:?}: {reply}")]
    Refused {
        /// The command.
        command: String,
        /// Its reply.
        reply: String,
    },
}

/// A running switch process.
#[derive(Debug)]
pub struct SwitchProcess {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl SwitchProcess {
    /// Starts `binary switch --config CONFIG` inside `namespace` and waits for `ready`. Its
    /// standard error is inherited.
    pub fn start(
        namespace: &Namespace,
        binary: impl AsRef<OsStr>,
        config: &Path,
    ) -> Result<Self, ProcessError> {
        let mut command = namespace.command(binary);
        command.args(["switch", "--config"]).arg(config);
        Self::spawn(command)
    }

    /// Spawns a prepared switch command (standard input and output are piped here) and waits
    /// for `ready`.
    pub fn spawn(mut command: Command) -> Result<Self, ProcessError> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(ProcessError::Spawn)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (sender, lines) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut process = Self {
            child: Some(child),
            stdin,
            lines,
        };
        match process.lines.recv_timeout(REPLY_TIMEOUT) {
            Ok(line) if line == "ready" => Ok(process),
            Ok(line) => Err(ProcessError::NotReady(Some(line))),
            Err(_) => {
                process.kill();
                Err(ProcessError::NotReady(None))
            }
        }
    }

    /// The process id (`ip netns exec` execs the switch, so it is the switch's).
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends one command line and returns the reply line.
    pub fn command(&mut self, line: &str) -> Result<String, ProcessError> {
        let stdin = self.stdin.as_mut().ok_or_else(|| ProcessError::Exited {
            command: line.to_owned(),
        })?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(ProcessError::Write)?;
        match self.lines.recv_timeout(REPLY_TIMEOUT) {
            Ok(reply) => Ok(reply),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ProcessError::Timeout {
                command: line.to_owned(),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ProcessError::Exited {
                command: line.to_owned(),
            }),
        }
    }

    /// The switch's counters now.
    pub fn counters(&mut self) -> Result<Counters, ProcessError> {
        let line = self.command("counters")?;
        serde_json::from_str(&line).map_err(|source| ProcessError::Counters { line, source })
    }

    /// Blackholes both directions of `port` from now for `duration`.
    pub fn outage(&mut self, port: &str, duration: Duration) -> Result<(), ProcessError> {
        let command = format!("outage {port} {}", duration.as_millis());
        let reply = self.command(&command)?;
        if reply.starts_with("ok outage ") {
            Ok(())
        } else {
            Err(ProcessError::Refused { command, reply })
        }
    }

    /// Tells the switch to quit and waits for it to exit.
    pub fn quit(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(stdin) = self.stdin.as_mut() {
            writeln!(stdin, "quit")
                .and_then(|()| stdin.flush())
                .map_err(ProcessError::Write)?;
        }
        self.wait_exit()
    }

    /// Sends SIGTERM (through `kill`) and waits for the switch to exit.
    pub fn terminate(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(pid) = self.id() {
            let status = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .map_err(ProcessError::Wait)?;
            if !status.success() {
                return Err(ProcessError::Wait(std::io::Error::other(format!(
                    "kill -TERM {pid}: {status}"
                ))));
            }
        }
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> Result<ExitStatus, ProcessError> {
        let Some(child) = self.child.as_mut() else {
            return Err(ProcessError::DidNotExit);
        };
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().map_err(ProcessError::Wait)? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::DidNotExit);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SwitchProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
