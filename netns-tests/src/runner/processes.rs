//! The scenario's processes: the real `rekeycast server`, `rekey-relay` and `rekeycast member`
//! binaries inside their hosts' namespaces, their generated configurations, the server's admin
//! socket (JSON lines), the members' status files and the server's `/metrics`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::RunError;
use crate::topology::Host;
use crate::ChildGuard;

/// The GCKS's multicast group in every scenario (each scenario has its own namespaces).
pub const GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 77, 0, 1), 7400);
/// The GCKS's feedback (NACK) port.
pub const FEEDBACK_PORT: u16 = 7401;
/// The GCKS's TCP resync port.
pub const TCP_RESYNC_PORT: u16 = 7402;
/// The GCKS's HTTP resync (and `/metrics`) port.
pub const HTTP_RESYNC_PORT: u16 = 7403;
/// A relay's feedback port (its members' NACKs).
pub const RELAY_FEEDBACK_PORT: u16 = 7411;
/// A relay's TCP resync port.
pub const RELAY_TCP_PORT: u16 = 7412;
/// A relay's upstream port on a unicast uplink (where the GCKS sends it the rekeys).
pub const RELAY_UPLINK_PORT: u16 = 7414;
/// A relay's HTTP resync port.
pub const RELAY_HTTP_PORT: u16 = 7413;
/// The group id and SPI of every scenario.
pub const GROUP_ID: u32 = 1;
/// The SPI of the Rekey SA.
pub const SPI: u32 = 1;

/// Relay `relay`'s downstream group.
pub fn relay_group(relay: u32) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(239, 77, relay as u8, 1), 7400)
}

/// The GCKS's multicast group in every IPv6 scenario (`ff15::`: transient, site-local scope).
pub const GROUP6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xff15, 0, 0, 0, 0, 0, 0x77, 1), 7400, 0, 0);

/// Relay `relay`'s downstream group in an IPv6 scenario.
pub fn relay_group6(relay: u32) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::new(0xff15, 0, 0, 0, 0, 0, 0x77, 1 + relay as u16 * 0x100),
        7400,
        0,
        0,
    )
}

/// The GCKS's group for the family of `address`.
pub fn group_for(address: IpAddr) -> SocketAddr {
    match address {
        IpAddr::V4(_) => SocketAddr::V4(GROUP),
        IpAddr::V6(_) => SocketAddr::V6(GROUP6),
    }
}

/// Relay `relay`'s downstream group for the family of `address`.
pub fn relay_group_for(relay: u32, address: IpAddr) -> SocketAddr {
    match address {
        IpAddr::V4(_) => SocketAddr::V4(relay_group(relay)),
        IpAddr::V6(_) => SocketAddr::V6(relay_group6(relay)),
    }
}

/// The unspecified address with any port, of the family of `address`: the bind address of a
/// socket that must match its group's family (an IPv6 group needs an IPv6 bind; the
/// binaries' default is IPv4).
pub fn any_of(address: IpAddr) -> SocketAddr {
    match address {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// The environment variable whose value, when set, is the members' log filter (`tracing`
/// directives such as `rekeycast=debug`), for looking into a scenario's member logs.
pub const MEMBER_LOG_ENV: &str = "REKEYCAST_NETNS_MEMBER_LOG";

/// The longest interval between two heartbeats of the GCKS and of the relays.
pub const HEARTBEAT_MAX: Duration = Duration::from_millis(250);

/// How long an admin request may take (a join waits for its batch).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(90);

/// The server process and what it needs to be restarted.
#[derive(Debug)]
pub struct Server {
    child: Option<ChildGuard>,
    host_namespace: String,
    address: IpAddr,
    binary: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// How many times the server was started.
    pub starts: u32,
    connection: Option<AdminConnection>,
}

impl Server {
    /// Writes the server's configuration into `dir` and starts it in `host`'s namespace.
    pub fn start(binary: &Path, host: &Host, dir: &Path) -> Result<Self, RunError> {
        Self::start_with_uplinks(
            binary,
            host,
            dir,
            rekeycast::relay::uplink::UnicastRelays::default(),
        )
    }

    /// [`Server::start`] with relays on unicast uplinks: the GCKS sends its rekeys to
    /// `unicast_relays` by unicast too (or only).
    pub fn start_with_uplinks(
        binary: &Path,
        host: &Host,
        dir: &Path,
        unicast_relays: rekeycast::relay::uplink::UnicastRelays,
    ) -> Result<Self, RunError> {
        Self::start_with_relays(binary, host, dir, unicast_relays, Default::default())
    }

    /// [`Server::start_with_uplinks`] with a relay directory: the GCKS's registration bundles
    /// list `relay_directory`'s relays (least-loaded first), where members fail over.
    pub fn start_with_relays(
        binary: &Path,
        host: &Host,
        dir: &Path,
        unicast_relays: rekeycast::relay::uplink::UnicastRelays,
        relay_directory: rekeycast::relay::directory::RelayDirectoryConfig,
    ) -> Result<Self, RunError> {
        let mut config =
            rekeycast_cli::config::ServerConfig::from_toml_str("").map_err(|error| {
                RunError::Config {
                    what: "the server's defaults".into(),
                    message: error.to_string(),
                }
            })?;
        let address = host.ip();
        let gcks = &mut config.gcks;
        gcks.bind = SocketAddr::from((address, FEEDBACK_PORT));
        gcks.state_dir = Some(dir.join("state"));
        gcks.multicast.group = group_for(address);
        gcks.multicast.interface = host.multicast_interface();
        gcks.multicast.loopback = false;
        gcks.group_id = GROUP_ID;
        gcks.spi = SPI;
        // Rekeys come from the runner (`rekey`), not from the batch timer.
        gcks.batch_interval = Duration::from_secs(3600);
        gcks.sender.grtt.initial = Duration::from_millis(20);
        // Heartbeats at least every HEARTBEAT_MAX: a member that lost all of a message learns of
        // it within that (and, under burst loss stepped per frame, the loss state moves on).
        gcks.sender.heartbeat_max = HEARTBEAT_MAX;
        gcks.resync_tcp = Some(SocketAddr::from((address, TCP_RESYNC_PORT)));
        gcks.resync_http = Some(SocketAddr::from((address, HTTP_RESYNC_PORT)));
        gcks.unicast_relays = unicast_relays;
        gcks.relay_directory = relay_directory;
        config.admin_socket = dir.join("admin.sock");
        let path = dir.join("server.toml");
        write_toml(&path, &config)?;
        let mut server = Self {
            child: None,
            host_namespace: host.namespace.name().into(),
            address,
            binary: binary.to_owned(),
            config: path,
            log: dir.join("server.log"),
            admin_socket: config.admin_socket,
            starts: 0,
            connection: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), RunError> {
        let log = append(&self.log)?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.host_namespace])
            .arg(&self.binary)
            .arg("server")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|source| RunError::Spawn {
                what: format!("rekeycast server ({})", self.binary.display()),
                source,
            })?;
        self.child = Some(ChildGuard(child));
        self.starts += 1;
        self.wait_ready()
    }

    /// Waits until the admin socket answers `status`.
    fn wait_ready(&mut self) -> Result<(), RunError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.0.try_wait() {
                    return Err(RunError::Exited {
                        what: "rekeycast server".into(),
                        status,
                        log: self.log.clone(),
                    });
                }
            }
            if let Ok(answer) = self.admin(&json!({"op": "status"})) {
                if answer["ok"] == true {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(RunError::Timeout {
                    what: format!(
                        "the server's admin socket {} to answer (log: {})",
                        self.admin_socket.display(),
                        self.log.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill(&mut self) -> Result<(), RunError> {
        if let Some(mut guard) = self.child.take() {
            guard.0.kill().map_err(|source| RunError::Spawn {
                what: "kill -9 of the server".into(),
                source,
            })?;
            let _ = guard.0.wait();
        }
        Ok(())
    }

    /// Starts the server again from its state directory and waits until it answers.
    pub fn restart(&mut self) -> Result<(), RunError> {
        self.kill()?;
        self.spawn()
    }

    /// Whether the server process exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.0.try_wait().ok().flatten())
    }

    /// Sends one admin request and returns the answer, over a connection kept open between
    /// requests (the server accepts new connections by polling, which would add up to its poll
    /// interval to each `rekey`'s time to key); a broken connection (a restarted server) is
    /// opened again once.
    pub fn admin(&mut self, request: &Value) -> Result<Value, RunError> {
        if let Some(connection) = self.connection.as_mut() {
            if let Ok(answer) = connection.call(request) {
                return Ok(answer);
            }
        }
        self.connection = None;
        let mut connection = AdminConnection::open(&self.admin_socket)?;
        let answer = connection.call(request)?;
        self.connection = Some(connection);
        Ok(answer)
    }

    /// `status`, checked for `ok`.
    pub fn status(&mut self) -> Result<Value, RunError> {
        let answer = self.admin(&json!({"op": "status"}))?;
        if answer["ok"] != true {
            return Err(RunError::Admin {
                request: "status".into(),
                answer: answer.to_string(),
            });
        }
        Ok(answer)
    }

    /// The latest sequence number the server reports.
    pub fn seq(&mut self) -> Result<u64, RunError> {
        let status = self.status()?;
        status["seq"].as_u64().ok_or_else(|| RunError::Admin {
            request: "status".into(),
            answer: status.to_string(),
        })
    }

    /// `rekey`, checked for `ok`.
    pub fn rekey(&mut self) -> Result<(), RunError> {
        let answer = self.admin(&json!({"op": "rekey"}))?;
        if answer["ok"] != true {
            return Err(RunError::Admin {
                request: "rekey".into(),
                answer: answer.to_string(),
            });
        }
        Ok(())
    }

    /// `leave`, checked for `ok`.
    pub fn leave(&mut self, member: u64) -> Result<(), RunError> {
        let answer = self.admin(&json!({"op": "leave", "member": member}))?;
        if answer["ok"] != true {
            return Err(RunError::Admin {
                request: format!("leave {member}"),
                answer: answer.to_string(),
            });
        }
        Ok(())
    }

    /// The server's `/metrics` from its HTTP resync endpoint, fetched from inside its
    /// namespace: metric name (with labels) to value.
    pub fn metrics(&self) -> Result<BTreeMap<String, f64>, RunError> {
        let text = http_get_in_namespace(
            &self.host_namespace,
            SocketAddr::from((self.address, HTTP_RESYNC_PORT)),
            "/metrics",
        )?;
        Ok(parse_prometheus(&text))
    }

    /// The server's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// One connection to an admin socket: JSON request lines out, one answer line back each.
#[derive(Debug)]
struct AdminConnection {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl AdminConnection {
    fn open(socket: &Path) -> Result<Self, RunError> {
        let error = |message: String| RunError::Admin {
            request: "(connect)".into(),
            answer: message,
        };
        let stream = UnixStream::connect(socket)
            .map_err(|e| error(format!("connecting to {}: {e}", socket.display())))?;
        stream
            .set_read_timeout(Some(ADMIN_TIMEOUT))
            .map_err(|e| error(e.to_string()))?;
        let reader = stream.try_clone().map_err(|e| error(e.to_string()))?;
        Ok(Self {
            writer: stream,
            reader: BufReader::new(reader),
        })
    }

    fn call(&mut self, request: &Value) -> Result<Value, RunError> {
        let admin_error = |message: String| RunError::Admin {
            request: request.to_string(),
            answer: message,
        };
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|error| admin_error(format!("sending: {error}")))?;
        let mut answer = String::new();
        let read = self
            .reader
            .read_line(&mut answer)
            .map_err(|error| admin_error(format!("reading the answer: {error}")))?;
        if read == 0 {
            return Err(admin_error("the server closed the connection".into()));
        }
        serde_json::from_str(&answer).map_err(|error| admin_error(format!("{answer:?}: {error}")))
    }
}

/// Sends one JSON request line to an admin socket on a connection of its own and reads the
/// one-line answer.
pub fn admin_call(socket: &Path, request: &Value) -> Result<Value, RunError> {
    AdminConnection::open(socket)?.call(request)
}

/// Admits `member` (a relay when `relay`) through the admin socket (waits for its batch) and
/// returns the first sequence number of its bundle, written to `bundle`.
pub fn join(socket: &Path, member: u64, bundle: &Path, relay: bool) -> Result<u64, RunError> {
    let answer = admin_call(
        socket,
        &json!({"op": "join", "member": member, "bundle_path": bundle, "relay": relay}),
    )?;
    match (answer["ok"].as_bool(), answer["first_seq"].as_u64()) {
        (Some(true), Some(first_seq)) => Ok(first_seq),
        _ => Err(RunError::Admin {
            request: format!("join {member}"),
            answer: answer.to_string(),
        }),
    }
}

/// Where a member listens and whom it asks: the GCKS directly, or a relay first.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The group it joins.
    pub group: SocketAddr,
    /// Where its NACKs go.
    pub feedback: SocketAddr,
    /// Its relay's resync endpoints, tried first, in order.
    pub resync_relays: Vec<String>,
    /// The GCKS's resync endpoints, tried after the relays', in order.
    pub resync_endpoints: Vec<String>,
}

/// What a member process is started with.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    /// The member's id.
    pub id: u64,
    /// The report group it belongs to.
    pub group: String,
    /// The sequence number of the message that admitted it.
    pub first_seq: u64,
    /// Where it listens and whom it asks.
    pub upstream: Upstream,
    /// Its `--silence-timeout-ms`.
    pub silence_timeout: Duration,
    /// The scenario's seed (the member's NACK backoff seed is derived from it and its id).
    pub seed: u64,
    /// Its failover idle silence (a `failover` topology); `None`: the default.
    pub failover_idle_silence: Option<Duration>,
}

/// One member process and its files.
#[derive(Debug)]
pub struct MemberProcess {
    /// The member's id.
    pub id: u64,
    /// Its host's name.
    pub host: String,
    /// The report group it belongs to.
    pub group: String,
    /// The sequence number of the message that admitted it.
    pub first_seq: u64,
    /// Its status file.
    pub status_path: PathBuf,
    /// Its log.
    pub log: PathBuf,
    child: Option<ChildGuard>,
    /// How the process ended, once it did.
    pub exit: Option<ExitStatus>,
    /// Whether it left the group (its process was stopped on purpose).
    pub left: bool,
}

/// The exit status of `rekeycast member` when it must register again.
pub const EXIT_MUST_REREGISTER: i32 = 3;

/// A member's status file, as `rekeycast member --status-file` writes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MemberStatus {
    /// The last applied message.
    pub last_seq: u64,
    /// Messages applied.
    pub messages_applied: u64,
    /// Of those, through resync.
    pub applied_from_resync: u64,
    /// NACKs sent.
    pub nacks_sent: u64,
    /// State checks requested.
    pub state_checks: u64,
    /// Resync exchanges started.
    pub resyncs_started: u64,
    /// Resync exchanges that failed on every endpoint.
    pub resyncs_failed: u64,
    /// Ed25519 verifications.
    pub signature_checks: u64,
    /// Of those, failed.
    pub signature_failures: u64,
    /// Manifests verified.
    pub manifests_verified: u64,
    /// Chunks verified.
    pub chunks_verified: u64,
    /// Datagrams received.
    pub datagrams_received: u64,
    /// Datagrams rejected (header, MAC, window).
    pub datagrams_rejected: u64,
    /// Of those, for a bad MAC.
    pub bad_mac: u64,
    /// Whether the member was told to register again.
    pub must_reregister: bool,
    /// The relay it receives from (failover's current contact); `None`: the GCKS, or no
    /// directory.
    pub relay: Option<u16>,
    /// Moves between relays.
    pub failover_moves: u64,
    /// Moves of its group socket to another relay's group.
    pub listen_moves: u64,
    /// `[seq, unix_us]` of the newest applied messages.
    pub applied: Vec<(u64, u64)>,
}

impl MemberProcess {
    /// Writes the member's configuration and starts `rekeycast member` in `host`'s namespace,
    /// with its files in `dir`.
    pub fn start(
        binary: &Path,
        host: &Host,
        dir: &Path,
        spec: &MemberSpec,
    ) -> Result<Self, RunError> {
        let id = spec.id;
        let upstream = &spec.upstream;
        let mut config = rekeycast_cli::config::MemberConfig::default();
        let member = &mut config.member;
        member.group_id = Some(GROUP_ID);
        member.multicast.group = upstream.group;
        member.multicast.interface = host.multicast_interface();
        // The binaries' default bind is IPv4; an IPv6 group needs an IPv6 one.
        member.bind = any_of(host.ip());
        member.multicast.loopback = false;
        member.receiver.feedback_addr = upstream.feedback;
        member.resync_relays = endpoints(&upstream.resync_relays)?;
        member.resync_endpoints = endpoints(&upstream.resync_endpoints)?;
        member.receiver.state_check_interval = Duration::from_millis(200);
        member.seed = Some(spec.seed ^ id);
        if let Some(silence) = spec.failover_idle_silence {
            member.failover.idle_silence = silence;
            member.failover.nack_silence = silence / 2;
            member.failover.backoff_initial = silence / 5;
        }
        config.bundle = dir.join(format!("member-{id}.bundle"));
        if let Ok(filter) = std::env::var(MEMBER_LOG_ENV) {
            config.log.filter = filter;
        }
        let path = dir.join(format!("member-{id}.toml"));
        write_toml(&path, &config)?;
        let status_path = dir.join(format!("member-{id}.status.json"));
        let log = dir.join(format!("member-{id}.log"));
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", host.namespace.name()])
            .arg(binary)
            .arg("member")
            .arg("--config")
            .arg(&path)
            .arg("--state")
            .arg(dir.join(format!("member-{id}.state")))
            .arg("--status-file")
            .arg(&status_path)
            .arg("--silence-timeout-ms")
            .arg(spec.silence_timeout.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(append(&log)?))
            .spawn()
            .map_err(|source| RunError::Spawn {
                what: format!("rekeycast member {id}"),
                source,
            })?;
        Ok(Self {
            id,
            host: host.name.clone(),
            group: spec.group.clone(),
            first_seq: spec.first_seq,
            status_path,
            log,
            child: Some(ChildGuard(child)),
            exit: None,
            left: false,
        })
    }

    /// The member's bundle path in `dir` (where `join` writes it).
    pub fn bundle_path(dir: &Path, id: u64) -> PathBuf {
        dir.join(format!("member-{id}.bundle"))
    }

    /// Reads the status file; `None` while the member has not written one.
    pub fn status(&self) -> Option<MemberStatus> {
        let bytes = std::fs::read(&self.status_path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Notes whether the process exited; returns its exit status if it did.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.0.try_wait() {
                    self.exit = Some(status);
                }
            }
        }
        self.exit
    }

    /// Whether it is still running (and has not left).
    pub fn running(&mut self) -> bool {
        !self.left && self.poll_exit().is_none()
    }

    /// Stops the process (it left the group).
    pub fn stop(&mut self) {
        self.left = true;
        self.child = None;
    }
}

/// What a relay process is started with.
#[derive(Debug, Clone, Copy)]
pub struct RelaySpec {
    /// The relay's number (from 1).
    pub number: u32,
    /// Its member id at the GCKS.
    pub id: u64,
    /// Members behind it (advertised as its group size).
    pub members: u32,
    /// The scenario's seed.
    pub seed: u64,
    /// Whether it takes the GCKS's rekeys over a unicast uplink (at [`RELAY_UPLINK_PORT`]).
    pub unicast_uplink: bool,
}

/// A relay process.
#[derive(Debug)]
pub struct RelayProcess {
    /// The relay's number (from 1).
    pub number: u32,
    /// Its member id at the GCKS.
    pub id: u64,
    /// Its log.
    pub log: PathBuf,
    child: Option<ChildGuard>,
    /// Whether it was killed on purpose (and not restarted).
    pub killed: bool,
    namespace: String,
    address: IpAddr,
    binary: PathBuf,
    config: PathBuf,
}

impl RelayProcess {
    /// Writes the relay's configuration and starts `rekey-relay` in `host`'s namespace, with
    /// its files in `dir`, upstream of it the GCKS at `gcks`.
    pub fn start(
        binary: &Path,
        host: &Host,
        gcks: IpAddr,
        dir: &Path,
        spec: &RelaySpec,
    ) -> Result<Self, RunError> {
        let RelaySpec {
            number,
            id,
            members,
            seed,
            unicast_uplink,
        } = *spec;
        let mut config = rekeycast_cli::config::RelayConfig::default();
        let address = host.ip();
        config.bundle = MemberProcess::bundle_path(dir, id);
        let relay = &mut config.relay;
        relay.state_dir = Some(dir.join(format!("relay-{number}-state")));
        relay.upstream.group = group_for(address);
        relay.upstream.interface = host.multicast_interface();
        // The binaries' default bind is IPv4; an IPv6 group needs an IPv6 one.
        relay.upstream_bind = any_of(address);
        relay.session.upstream.feedback_addr = SocketAddr::from((gcks, FEEDBACK_PORT));
        let gcks_resync = format!("tcp://{}", SocketAddr::from((gcks, TCP_RESYNC_PORT)));
        relay.resync.gcks = vec![gcks_resync.parse().map_err(|_| RunError::Config {
            what: "the GCKS's resync endpoint".into(),
            message: gcks_resync.clone(),
        })?];
        relay.session.upstream.state_check_interval = Duration::from_millis(200);
        relay.session.upstream.silence_timeout = Duration::from_secs(5);
        relay.session.upstream.scheduler.seed = (seed ^ id).max(1);
        relay.downstream.group = relay_group_for(number, address);
        relay.downstream.interface = host.multicast_interface();
        relay.downstream.loopback = false;
        relay.downstream_bind = SocketAddr::from((address, RELAY_FEEDBACK_PORT));
        relay.session.downstream_group_size = Some(members.max(1));
        relay.session.downstream.grtt.initial = Duration::from_millis(20);
        relay.session.downstream.heartbeat_max = HEARTBEAT_MAX;
        relay.resync_tcp = Some(SocketAddr::from((address, RELAY_TCP_PORT)));
        relay.resync_http = Some(SocketAddr::from((address, RELAY_HTTP_PORT)));
        if unicast_uplink {
            relay.upstream_unicast = true;
            relay.upstream_bind = SocketAddr::from((address, RELAY_UPLINK_PORT));
        }
        let path = dir.join(format!("relay-{number}.toml"));
        write_toml(&path, &config)?;
        let mut relay = Self {
            number,
            id,
            log: dir.join(format!("relay-{number}.log")),
            child: None,
            killed: false,
            namespace: host.namespace.name().into(),
            address,
            binary: binary.to_owned(),
            config: path,
        };
        relay.spawn()?;
        Ok(relay)
    }

    /// Starts the process and waits for its ready line.
    fn spawn(&mut self) -> Result<(), RunError> {
        let number = self.number;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.namespace])
            .arg(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(append(&self.log)?))
            .spawn()
            .map_err(|source| RunError::Spawn {
                what: format!("rekey-relay {number} ({})", self.binary.display()),
                source,
            })?;
        // The relay prints one `rekey-relay ready ...` line once its sockets are bound.
        let stdout = child.stdout.take();
        let guard = ChildGuard(child);
        let mut line = String::new();
        if let Some(stdout) = stdout {
            let (sender, receiver) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                let _ = sender.send(first);
                // Keep draining so the relay never blocks on a full pipe.
                let mut sink = Vec::new();
                let _ = reader.read_to_end(&mut sink);
            });
            line = receiver
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_default();
        }
        if !line.starts_with("rekey-relay ready") {
            return Err(RunError::Timeout {
                what: format!(
                    "rekey-relay {number} to print its ready line (got {:?}; log: {})",
                    line.trim(),
                    self.log.display()
                ),
            });
        }
        self.child = Some(guard);
        self.killed = false;
        Ok(())
    }

    /// Starts a killed relay again: it resumes from its state directory (its saved keys and
    /// stored messages), without registering again.
    pub fn restart(&mut self) -> Result<(), RunError> {
        self.kill();
        self.spawn()
    }

    /// The relay as the GCKS's relay directory lists it.
    pub fn contact(&self) -> rekeycast::relay::directory::RelayContactConfig {
        relay_contact(self.number, self.address)
    }

    /// The endpoints and group of this relay's members.
    pub fn upstream_for_members(&self, gcks: IpAddr) -> Upstream {
        Upstream {
            group: relay_group_for(self.number, self.address),
            feedback: SocketAddr::from((self.address, RELAY_FEEDBACK_PORT)),
            resync_relays: vec![format!(
                "tcp://{}",
                SocketAddr::from((self.address, RELAY_TCP_PORT))
            )],
            resync_endpoints: vec![
                format!("tcp://{}", SocketAddr::from((gcks, TCP_RESYNC_PORT))),
                format!("http://{}", SocketAddr::from((gcks, HTTP_RESYNC_PORT))),
            ],
        }
    }

    /// Kills the relay with SIGKILL.
    pub fn kill(&mut self) {
        self.killed = true;
        if let Some(mut guard) = self.child.take() {
            let _ = guard.0.kill();
            let _ = guard.0.wait();
        }
    }

    /// Whether the relay exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.0.try_wait().ok().flatten())
    }

    /// The relay's `/metrics`, unless it was killed.
    pub fn metrics(&self) -> Option<BTreeMap<String, f64>> {
        if self.killed {
            return None;
        }
        http_get_in_namespace(
            &self.namespace,
            SocketAddr::from((self.address, RELAY_HTTP_PORT)),
            "/metrics",
        )
        .ok()
        .map(|text| parse_prometheus(&text))
    }
}

/// Relay `number` at `address` as the GCKS's relay directory lists it (numbered as in the
/// scenario): its group, feedback port and TCP resync endpoint.
pub fn relay_contact(
    number: u32,
    address: IpAddr,
) -> rekeycast::relay::directory::RelayContactConfig {
    rekeycast::relay::directory::RelayContactConfig {
        id: u16::try_from(number).unwrap_or(u16::MAX),
        group: relay_group_for(number, address),
        feedback: SocketAddr::from((address, RELAY_FEEDBACK_PORT)),
        resync: vec![rekeycast::io::resync_client::Endpoint::Tcp(
            SocketAddr::from((address, RELAY_TCP_PORT)),
        )],
    }
}

/// The resync endpoints of their texts (`tcp://ADDR:PORT`).
fn endpoints(texts: &[String]) -> Result<Vec<rekeycast::io::resync_client::Endpoint>, RunError> {
    texts
        .iter()
        .map(|text| {
            text.parse().map_err(|_| RunError::Config {
                what: "a resync endpoint".into(),
                message: text.clone(),
            })
        })
        .collect()
}

fn write_toml<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), RunError> {
    let text = toml::to_string(value).map_err(|error| RunError::Config {
        what: path.display().to_string(),
        message: error.to_string(),
    })?;
    std::fs::write(path, text).map_err(|source| RunError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

fn append(path: &Path) -> Result<File, RunError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| RunError::Io {
            what: format!("opening the log {}", path.display()),
            source,
        })
}

/// GETs `path` from `address` inside the network namespace `namespace`, from a thread that
/// enters it (`setns`) and ends with the request; other threads stay where they are.
pub fn http_get_in_namespace(
    namespace: &str,
    address: SocketAddr,
    path: &str,
) -> Result<String, RunError> {
    let namespace_file = PathBuf::from("/run/netns").join(namespace);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    let what = format!("GET http://{address}{path} in {namespace}");
    let thread_what = what.clone();
    let handle = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || -> Result<String, String> {
            let file = File::open(&namespace_file)
                .map_err(|error| format!("opening {}: {error}", namespace_file.display()))?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|error| format!("entering the namespace: {error}"))?;
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
                .map_err(|error| format!("connecting: {error}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|error| error.to_string())?;
            stream
                .write_all(request.as_bytes())
                .map_err(|error| format!("sending: {error}"))?;
            let mut response = Vec::new();
            stream
                .take(16 << 20)
                .read_to_end(&mut response)
                .map_err(|error| format!("reading: {error}"))?;
            let text = String::from_utf8_lossy(&response).into_owned();
            let (head, body) = text
                .split_once("\r\n\r\n")
                .ok_or_else(|| format!("no end of headers in {} bytes", response.len()))?;
            let status_line = head.lines().next().unwrap_or_default();
            if !status_line.contains(" 200 ") {
                return Err(format!("answered {status_line:?}"));
            }
            Ok(body.to_owned())
        })
        .map_err(|source| RunError::Spawn {
            what: thread_what,
            source,
        })?;
    match handle.join() {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(message)) => Err(RunError::Http { what, message }),
        Err(_) => Err(RunError::Http {
            what,
            message: "the fetching thread panicked".into(),
        }),
    }
}

/// Parses Prometheus text exposition into name (with labels) to value; comments and lines
/// that do not parse are skipped.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.trim().rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_parses_to_a_map() {
        let text = "# HELP rekeycast_seq Latest.\n# TYPE rekeycast_seq gauge\nrekeycast_seq 12\n\
                    rekeycast_nacks_received_total 3\nbroken\nx{a=\"b\"} 1.5\n";
        let map = parse_prometheus(text);
        assert_eq!(map.get("rekeycast_seq"), Some(&12.0));
        assert_eq!(map.get("rekeycast_nacks_received_total"), Some(&3.0));
        assert_eq!(map.get("x{a=\"b\"}"), Some(&1.5));
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn member_status_parses_what_the_member_writes() {
        let text = r#"{"member":3,"pid":1,"written_unix_us":5,"next_seq":6,"last_seq":5,
            "group_key_version":5,"messages_applied":5,"applied_from_source":4,
            "applied_from_decode":0,"applied_from_resync":1,"decode_failures":0,"nacks_sent":2,
            "state_checks":1,"out_of_sync":1,"silences":0,"signature_checks":10,
            "signature_failures":0,"manifests_verified":5,"manifests_cached":0,
            "chunks_verified":5,"chunks_rejected":0,"datagrams_received":40,
            "datagrams_accepted":30,"datagrams_rejected":10,"bad_mac":7,"resyncs_started":1,
            "resyncs_failed":0,"state_save_failures":0,"must_reregister":false,
            "applied":[[4,100],[5,200]]}"#;
        let status: MemberStatus = serde_json::from_str(text).expect("parses");
        assert_eq!(status.last_seq, 5);
        assert_eq!(status.bad_mac, 7);
        assert_eq!(status.applied, vec![(4, 100), (5, 200)]);
        assert_eq!(status.resyncs_started, 1);
    }
}
