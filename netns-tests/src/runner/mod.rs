//! The scenario runner behind `rekeycast-netns run SCENARIO.toml`.
//!
//! It builds the scenario's [`Topology`], starts the real `rekeycast server` in the GCKS's
//! namespace, registers the first members (and relays) through the server's admin socket in one
//! batch, starts `rekey-relay` and `rekeycast member` processes in their namespaces, then
//! triggers each rekey with the admin `rekey` request, applying the scheduled joins, leaves,
//! faults and flood first. After each rekey it waits (bounded) for the members to hold the new
//! key, read from their `--status-file`s, and prints a progress line. At the end it waits for
//! every member to converge, reads the members' status files, the server's `/metrics` and the
//! switch's counters, prints the table and checks the scenario's expectations: a [`RunReport`]
//! with its failures. Every wait is bounded in time; every process and namespace is removed by
//! a guard, also on error or panic.

pub mod flood;
pub mod processes;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::scenario::{Fabric, Fault, Scenario};
use crate::switch::Counters;
use crate::topology::{FabricPlan, HostPlan, Topology, TopologyError};
use crate::{clean_leftovers, ChildGuard};
use flood::FloodReport;
use processes::{MemberProcess, MemberSpec, RelayProcess, RelaySpec, Server, Upstream};
use report::{GroupRow, MemberRow, Percentiles};

/// What went wrong running a scenario (as opposed to a scenario whose expectations failed,
/// which is a [`RunReport`] with failures).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The topology could not be built or commanded.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A harness command failed.
    #[error(transparent)]
    Harness(#[from] crate::Error),
    /// A file or directory operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A process could not be started or signalled.
    #[error("{what}: {source}")]
    Spawn {
        /// The process.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A process exited when it should have been running.
    #[error("{what} exited with {status} (log: {})", log.display())]
    Exited {
        /// The process.
        what: String,
        /// How it ended.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
    },
    /// A configuration could not be made.
    #[error("configuration {what}: {message}")]
    Config {
        /// Which.
        what: String,
        /// Why.
        message: String,
    },
    /// The admin socket refused or failed a request.
    #[error("admin request {request}: {answer}")]
    Admin {
        /// The request.
        request: String,
        /// The answer, or why there was none.
        answer: String,
    },
    /// An HTTP GET failed.
    #[error("{what}: {message}")]
    Http {
        /// The request.
        what: String,
        /// Why.
        message: String,
    },
    /// Something did not happen in time.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What.
        what: String,
    },
    /// The run was interrupted ([`interrupt`]).
    #[error("interrupted")]
    Interrupted,
    /// A binary the scenario needs is missing.
    #[error("{what} not found at {} ({hint})", path.display())]
    MissingBinary {
        /// Which binary.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
}

/// How to run a scenario: where the binaries are, and where to work.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The `rekeycast` binary.
    pub rekeycast: PathBuf,
    /// The `rekey-relay` binary (needed by scenarios with relays).
    pub relay: PathBuf,
    /// The `rekeycast-netns` binary (runs the switch and the flood in their namespaces).
    pub harness: PathBuf,
    /// One lowercase letter that keeps this run's names apart from others of this process.
    pub tag: String,
    /// The work directory (configurations, state, logs, status files); a fresh one under the
    /// system's temporary directory when `None`.
    pub work_dir: Option<PathBuf>,
    /// Keep the work directory even when the scenario passes (it is always kept when it
    /// fails).
    pub keep: bool,
}

impl RunOptions {
    /// Options with the binaries next to the harness binary `harness` (as cargo lays out a
    /// target directory), tag `x`, a fresh work directory.
    pub fn beside(harness: &Path) -> Self {
        let dir = harness.parent().unwrap_or_else(|| Path::new("."));
        Self {
            rekeycast: dir.join("rekeycast"),
            relay: dir.join("rekey-relay"),
            harness: harness.to_owned(),
            tag: "x".into(),
            work_dir: None,
            keep: false,
        }
    }
}

/// One rekey's progress, as printed.
#[derive(Debug, Clone, PartialEq)]
pub struct RekeyLine {
    /// The rekey's number (from 1).
    pub rekey: u32,
    /// Its message's sequence number.
    pub seq: u64,
    /// Members judged at this rekey (not under a fault).
    pub judged: usize,
    /// Of them, those holding the key when the runner went on.
    pub current: usize,
    /// How long they took, all of them, in milliseconds (or the timeout).
    pub converged_ms: u64,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The scenario's name.
    pub name: String,
    /// How long the run took, setup and teardown included.
    pub elapsed: Duration,
    /// Each rekey's progress.
    pub rekeys: Vec<RekeyLine>,
    /// The table's rows.
    pub groups: Vec<GroupRow>,
    /// Time to key over every member and rekey.
    pub time_to_key: Percentiles,
    /// The flood's own report, when there was one.
    pub flood: Option<FloodReport>,
    /// The switch's counters at the end (none with a kernel bridge).
    pub switch: Option<Counters>,
    /// The final table and totals, as printed.
    pub table: String,
    /// The expectations that failed; empty when the scenario passed.
    pub failures: Vec<String>,
    /// The work directory (removed when the scenario passed, unless kept).
    pub work_dir: PathBuf,
}

impl RunReport {
    /// Whether every expectation held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The member id of relay `relay` at the GCKS.
pub fn relay_member_id(relay: u32) -> u64 {
    900_000 + u64::from(relay)
}

/// Set by [`interrupt`]: the run stops at its next wait and tears everything down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks a run in progress to stop (from a Ctrl-C or SIGTERM handler): it returns
/// [`RunError::Interrupted`] from its next wait, after its guards removed every process and
/// namespace.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<(), RunError> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(RunError::Interrupted)
    } else {
        Ok(())
    }
}

/// Sleeps `duration` in short steps, returning early with an error when interrupted.
fn sleep(duration: Duration) -> Result<(), RunError> {
    let until = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(POLL));
    }
}

/// Whether `id` is a relay's member id ([`relay_member_id`]).
fn is_relay_id(id: u64) -> bool {
    id > 900_000 && id <= 900_000 + 9
}

/// How long a member hears nothing before it asks for the group's state.
const MEMBER_SILENCE_TIMEOUT: Duration = Duration::from_millis(2_000);

/// How often the runner reads the status files while it waits.
const POLL: Duration = Duration::from_millis(20);

/// Runs `scenario`; prints progress lines and the final table on standard output.
pub fn run(scenario: &Scenario, options: &RunOptions) -> Result<RunReport, RunError> {
    let started = Instant::now();
    check_binary(
        "rekeycast",
        &options.rekeycast,
        "cargo build --bin rekeycast",
    )?;
    if scenario.topology.relays > 0 {
        check_binary(
            "rekey-relay",
            &options.relay,
            "cargo build --bin rekey-relay",
        )?;
    }
    let work_dir = match &options.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!(
            "rekeycast-netns-{}-{}{}",
            scenario.name,
            std::process::id(),
            options.tag
        )),
    };
    std::fs::create_dir_all(&work_dir).map_err(|source| RunError::Io {
        what: format!("creating the work directory {}", work_dir.display()),
        source,
    })?;
    println!(
        "scenario {}: {} (work directory {})",
        scenario.name,
        scenario.description.trim(),
        work_dir.display()
    );
    crate::topology::kill_leftover_processes()?;
    clean_leftovers()?;
    let mut run = Run::new(scenario, options, &work_dir)?;
    let outcome = run.execute();
    let mut report = run.finish(outcome, started)?;
    drop(run);
    report.elapsed = started.elapsed();
    if report.passed() && !options.keep {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    Ok(report)
}

fn check_binary(what: &'static str, path: &Path, hint: &'static str) -> Result<(), RunError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(RunError::MissingBinary {
            what,
            path: path.to_owned(),
            hint,
        })
    }
}

/// Microseconds since the Unix epoch: the clock the members' status files use (one clock for
/// every namespace of the machine).
fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64)
}

/// A running flood process and where its report comes from.
#[derive(Debug)]
struct FloodProcess {
    child: ChildGuard,
    output: PathBuf,
    deadline: Instant,
}

/// The state of one run. Fields drop in order: processes first, the topology last.
struct Run<'a> {
    scenario: &'a Scenario,
    options: &'a RunOptions,
    work_dir: PathBuf,
    flood: Option<FloodProcess>,
    members: Vec<MemberProcess>,
    relays: Vec<RelayProcess>,
    server: Server,
    /// The latest message the runner triggered.
    seq: u64,
    /// Message sequence number to the trigger's time (Unix microseconds), bootstrap excluded.
    triggers: BTreeMap<u64, u64>,
    /// Per member id, the rekeys (inclusive range) it is not judged at.
    excused: BTreeMap<u64, (u32, u32)>,
    /// Members whose fault must show as a resync.
    faulted: BTreeSet<u64>,
    /// The next id for a joining member of the GCKS.
    next_direct_id: u64,
    rekeys: Vec<RekeyLine>,
    failures: Vec<String>,
    samples: Vec<u64>,
    topology: Topology,
    /// Relays killed for good in a `failover` topology, each with its members, the first
    /// message triggered after the kill and the messages the GCKS had served by resync.
    failovers: Vec<FailoverKill>,
}

/// A relay killed for good in a `failover` topology: what its members are judged against.
#[derive(Debug, Clone)]
struct FailoverKill {
    relay: u32,
    members: Vec<u64>,
    first_seq: u64,
    gcks_resync_messages: u64,
}

impl<'a> Run<'a> {
    fn new(
        scenario: &'a Scenario,
        options: &'a RunOptions,
        work_dir: &Path,
    ) -> Result<Self, RunError> {
        let plans = host_plans(scenario);
        let fabric = match scenario.topology.fabric {
            Fabric::Switch => FabricPlan::Switch {
                binary: options.harness.clone(),
                seed: scenario.seed,
            },
            Fabric::Bridge => FabricPlan::Bridge,
        };
        let setup = Instant::now();
        let topology = if scenario.topology.ipv6 {
            Topology::build_with_ipv6(&options.tag, &plans, &fabric, work_dir)?
        } else {
            Topology::build(&options.tag, &plans, &fabric, work_dir)?
        };
        println!(
            "topology: {} {}hosts on a {} in {} ms",
            plans.len(),
            if scenario.topology.ipv6 { "IPv6 " } else { "" },
            if topology.has_switch() {
                "userspace impairment switch"
            } else {
                "kernel bridge"
            },
            setup.elapsed().as_millis()
        );
        let uplinks = if scenario.topology.unicast_uplinks {
            let relays = (1..=scenario.topology.relays)
                .map(|relay| {
                    let host = topology.host(&format!("r{relay}"))?;
                    Ok(SocketAddr::from((host.ip(), processes::RELAY_UPLINK_PORT)))
                })
                .collect::<Result<Vec<_>, RunError>>()?;
            rekeycast::relay::uplink::UnicastRelays {
                unicast_only: scenario.topology.members == 0 && !relays.is_empty(),
                relays,
            }
        } else {
            rekeycast::relay::uplink::UnicastRelays::default()
        };
        let relay_directory = if scenario.topology.failover {
            let relays = (1..=scenario.topology.relays)
                .map(|relay| {
                    let host = topology.host(&format!("r{relay}"))?;
                    Ok(processes::relay_contact(relay, host.ip()))
                })
                .collect::<Result<Vec<_>, RunError>>()?;
            rekeycast::relay::directory::RelayDirectoryConfig { relays, gcks: None }
        } else {
            Default::default()
        };
        let server = Server::start_with_relays(
            &options.rekeycast,
            topology.host("gcks")?,
            work_dir,
            uplinks,
            relay_directory,
        )?;
        Ok(Self {
            scenario,
            options,
            work_dir: work_dir.to_owned(),
            flood: None,
            members: Vec::new(),
            relays: Vec::new(),
            server,
            seq: 0,
            triggers: BTreeMap::new(),
            excused: BTreeMap::new(),
            faulted: BTreeSet::new(),
            next_direct_id: u64::from(scenario.topology.members) + 1,
            rekeys: Vec::new(),
            failures: Vec::new(),
            samples: Vec::new(),
            topology,
            failovers: Vec::new(),
        })
    }

    fn gcks_address(&self) -> Result<std::net::IpAddr, RunError> {
        Ok(self.topology.host("gcks")?.ip())
    }

    fn direct_upstream(&self, id: u64) -> Result<Upstream, RunError> {
        let gcks = self.gcks_address()?;
        let tcp = format!(
            "tcp://{}",
            SocketAddr::from((gcks, processes::TCP_RESYNC_PORT))
        );
        let http = format!(
            "http://{}",
            SocketAddr::from((gcks, processes::HTTP_RESYNC_PORT))
        );
        // Odd members ask the TCP endpoint first, even ones HTTP: both get exercised.
        let resync_endpoints = if id % 2 == 1 {
            vec![tcp, http]
        } else {
            vec![http, tcp]
        };
        Ok(Upstream {
            group: processes::group_for(gcks),
            feedback: SocketAddr::from((gcks, processes::FEEDBACK_PORT)),
            resync_relays: Vec::new(),
            resync_endpoints,
        })
    }

    fn execute(&mut self) -> Result<(), RunError> {
        self.bootstrap()?;
        for rekey in 1..=self.scenario.schedule.rekeys {
            self.rekey(rekey)?;
        }
        self.settle()
    }

    /// Registers the first members and relays in one batch and starts them.
    fn bootstrap(&mut self) -> Result<(), RunError> {
        let topology = &self.scenario.topology;
        let mut ids: Vec<u64> = (1..=topology.relays).map(relay_member_id).collect();
        ids.extend(1..=u64::from(topology.members));
        for relay in 1..=topology.relays {
            ids.extend(self.scenario.relay_member_ids(relay));
        }
        let began = Instant::now();
        let (_, admitted) = self.join_batch(&ids, 0)?;
        let first_seq = admitted.values().copied().max().unwrap_or(0);
        self.seq = first_seq;
        self.wait_server_seq(first_seq)?;
        if topology.relays > 0 {
            let counted = self.server.status()?["relays"].as_u64().unwrap_or(0);
            if counted != u64::from(topology.relays) {
                self.failures.push(format!(
                    "the GCKS counts {counted} relays after registering {}",
                    topology.relays
                ));
            }
        }
        let gcks = self.gcks_address()?;
        for relay in 1..=topology.relays {
            let id = relay_member_id(relay);
            let host = self.topology.host(&format!("r{relay}"))?;
            self.relays.push(RelayProcess::start(
                &self.options.relay,
                host,
                gcks,
                &self.work_dir,
                &RelaySpec {
                    number: relay,
                    id,
                    members: topology.members_per_relay,
                    seed: self.scenario.seed,
                    unicast_uplink: topology.unicast_uplinks,
                },
            )?);
        }
        for id in 1..=u64::from(topology.members) {
            let upstream = self.direct_upstream(id)?;
            self.start_member(id, &format!("m{id}"), "gcks", admitted[&id], &upstream)?;
        }
        for relay in 1..=topology.relays {
            for id in self.scenario.relay_member_ids(relay) {
                // With a relay directory the member's relay is the one its bundle lists
                // first (the GCKS's choice), not the one its host is named after.
                let assigned = if topology.failover {
                    self.bundle_relay(id)?
                } else {
                    relay
                };
                let upstream = self.relays[assigned as usize - 1].upstream_for_members(gcks);
                let host = format!("r{relay}m{}", id - u64::from(relay) * 1000);
                let group = format!("relay{assigned}");
                self.start_member(id, &host, &group, admitted[&id], &upstream)?;
            }
        }
        let timeout = Duration::from_millis(self.scenario.schedule.settle_timeout_ms);
        let all: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        let missing = self.wait_current(&all, first_seq, timeout)?;
        println!(
            "bootstrap: message {first_seq} admitted {} members and {} relays; {}/{} members hold \
             it after {} ms",
            self.members.len(),
            self.relays.len(),
            all.len() - missing.len(),
            all.len(),
            began.elapsed().as_millis()
        );
        if !missing.is_empty() {
            self.failures.push(format!(
                "bootstrap: members {missing:?} did not get their first key (message {first_seq}) \
                 within {} ms",
                timeout.as_millis()
            ));
        }
        Ok(())
    }

    /// The relay member `id`'s registration bundle lists first.
    fn bundle_relay(&self, id: u64) -> Result<u32, RunError> {
        let path = MemberProcess::bundle_path(&self.work_dir, id);
        let bundle = rekeycast_cli::bundle::read(&path).map_err(|error| RunError::Config {
            what: format!("member {id}'s bundle {}", path.display()),
            message: format!("{error:#}"),
        })?;
        match bundle.directory.relays.first() {
            Some(contact)
                if (1..=self.scenario.topology.relays).contains(&u32::from(contact.id)) =>
            {
                Ok(u32::from(contact.id))
            }
            _ => Err(RunError::Config {
                what: format!("member {id}'s bundle {}", path.display()),
                message: format!(
                    "lists no relay of the scenario first: {:?}",
                    bundle.directory
                ),
            }),
        }
    }

    fn start_member(
        &mut self,
        id: u64,
        host: &str,
        group: &str,
        first_seq: u64,
        upstream: &Upstream,
    ) -> Result<(), RunError> {
        let host = self.topology.host(host)?;
        let spec = MemberSpec {
            id,
            group: group.into(),
            first_seq,
            upstream: upstream.clone(),
            silence_timeout: MEMBER_SILENCE_TIMEOUT,
            seed: self.scenario.seed,
            failover_idle_silence: self
                .scenario
                .topology
                .failover
                .then(|| Duration::from_millis(crate::scenario::FAILOVER_IDLE_SILENCE_MS)),
        };
        let member = MemberProcess::start(&self.options.rekeycast, host, &self.work_dir, &spec)?;
        self.members.push(member);
        Ok(())
    }

    /// Sends a join for each of `ids` (each on its own connection: a join's answer waits for
    /// its batch), waits until the server holds them all (and `leaves` pending leaves), then
    /// triggers the batch. Returns the trigger's time and each member's first sequence number.
    fn join_batch(
        &mut self,
        ids: &[u64],
        leaves: usize,
    ) -> Result<(u64, BTreeMap<u64, u64>), RunError> {
        let socket = self.server.admin_socket.clone();
        let handles: Vec<(u64, std::thread::JoinHandle<Result<u64, RunError>>)> = ids
            .iter()
            .map(|&id| {
                let socket = socket.clone();
                let bundle = MemberProcess::bundle_path(&self.work_dir, id);
                let handle = std::thread::Builder::new()
                    .name(format!("join-{id}"))
                    .spawn(move || processes::join(&socket, id, &bundle, is_relay_id(id)))
                    .map_err(|source| RunError::Spawn {
                        what: format!("the thread joining member {id}"),
                        source,
                    })?;
                Ok((id, handle))
            })
            .collect::<Result<_, RunError>>()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pending = self.server.status()?["pending"].as_u64().unwrap_or(0);
            if pending as usize >= ids.len() + leaves {
                break;
            }
            if Instant::now() >= deadline {
                return Err(RunError::Timeout {
                    what: format!(
                        "the server to hold {} pending joins and leaves (it holds {pending})",
                        ids.len() + leaves
                    ),
                });
            }
            sleep(POLL)?;
        }
        let triggered = unix_us();
        self.server.rekey()?;
        let mut admitted = BTreeMap::new();
        for (id, handle) in handles {
            let first_seq = handle.join().map_err(|_| RunError::Admin {
                request: format!("join {id}"),
                answer: "the joining thread panicked".into(),
            })??;
            admitted.insert(id, first_seq);
        }
        Ok((triggered, admitted))
    }

    /// Waits until each of `ids` holds message `seq` or later, at most `timeout`; returns
    /// those that do not (a member that exited never will).
    fn wait_current(
        &mut self,
        ids: &[u64],
        seq: u64,
        timeout: Duration,
    ) -> Result<Vec<u64>, RunError> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing: Vec<u64> = self
                .members
                .iter_mut()
                .filter(|member| ids.contains(&member.id))
                .filter(|member| member.status().map_or(true, |status| status.last_seq < seq))
                .map(|member| member.id)
                .collect();
            let exited = self
                .members
                .iter_mut()
                .filter(|member| missing.contains(&member.id))
                .all(|member| member.poll_exit().is_some());
            if missing.is_empty() || exited || Instant::now() >= deadline {
                return Ok(missing);
            }
            sleep(POLL)?;
        }
    }

    /// Waits (bounded) until the server reports message `seq` as its latest: built, its
    /// joiners' bundles written, and handed to the sender.
    fn wait_server_seq(&mut self, seq: u64) -> Result<(), RunError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let latest = self.server.seq()?;
            if latest == seq {
                return Ok(());
            }
            if latest > seq {
                return Err(RunError::Admin {
                    request: "status".into(),
                    answer: format!("the server is at message {latest}; the runner made {seq}"),
                });
            }
            if Instant::now() >= deadline {
                return Err(RunError::Timeout {
                    what: format!("the server to send message {seq} (it is at {latest})"),
                });
            }
            sleep(POLL)?;
        }
    }

    fn is_excused(&self, id: u64, rekey: u32) -> bool {
        let flooded = self.scenario.flood.as_ref().is_some_and(|flood| {
            rekey >= flood.from_rekey && rekey - flood.from_rekey < flood.unjudged_rekeys
        });
        flooded
            || self
                .excused
                .get(&id)
                .is_some_and(|&(from, to)| (from..=to).contains(&rekey))
    }

    fn rekey(&mut self, rekey: u32) -> Result<(), RunError> {
        let schedule = &self.scenario.schedule;
        let interval = Duration::from_millis(schedule.interval_ms);
        let began = Instant::now();
        for fault in self
            .scenario
            .faults
            .iter()
            .filter(|f| f.at_rekey() == rekey)
        {
            self.inject(fault, rekey)?;
        }
        if let Some(flood) = self
            .scenario
            .flood
            .as_ref()
            .filter(|flood| flood.from_rekey == rekey)
        {
            self.start_flood(flood)?;
        }
        let churn = schedule
            .churn
            .iter()
            .find(|churn| churn.at_rekey == rekey)
            .cloned();
        let seq_before = self.seq;
        let mut leaving = Vec::new();
        let mut joining = Vec::new();
        if let Some(churn) = &churn {
            let mut present: Vec<u64> = self
                .members
                .iter()
                .filter(|m| m.group == "gcks" && !m.left)
                .map(|m| m.id)
                .collect();
            present.sort_unstable();
            for _ in 0..churn.leaves {
                if let Some(id) = present.pop() {
                    self.server.leave(id)?;
                    leaving.push(id);
                }
            }
            for _ in 0..churn.joins {
                joining.push(self.next_direct_id);
                self.next_direct_id += 1;
            }
        }
        let triggered = if joining.is_empty() {
            let triggered = unix_us();
            self.server.rekey()?;
            triggered
        } else {
            let (triggered, admitted) = self.join_batch(&joining, leaving.len())?;
            for id in &joining {
                let upstream = self.direct_upstream(*id)?;
                self.start_member(*id, &format!("m{id}"), "gcks", admitted[id], &upstream)?;
            }
            triggered
        };
        let seq = seq_before + 1;
        self.seq = seq;
        self.triggers.insert(seq, triggered);
        self.wait_server_seq(seq)?;
        // A member that left cannot open the message that removes it: stop it now (if it
        // saw that message first, it says its keys cannot open it, and must register again).
        for member in self.members.iter_mut().filter(|m| leaving.contains(&m.id)) {
            member.stop();
        }
        let judged: Vec<u64> = self
            .members
            .iter()
            .filter(|m| !m.left && !self.is_excused(m.id, rekey))
            .map(|m| m.id)
            .collect();
        let wait_began = Instant::now();
        let missing = self.wait_current(
            &judged,
            seq,
            Duration::from_millis(schedule.converge_timeout_ms),
        )?;
        let converged_ms = wait_began.elapsed().as_millis() as u64;
        self.note_exits();
        // Time to key of this rekey, for the progress line.
        for member in &self.members {
            if let Some(status) = member.status() {
                if let Some(&(_, at)) = status.applied.iter().find(|(s, _)| *s == seq) {
                    self.samples.push(at.saturating_sub(triggered));
                }
            }
        }
        let so_far = Percentiles::of(&self.samples);
        let resyncs: u64 = self
            .members
            .iter()
            .filter_map(|m| m.status())
            .map(|s| s.resyncs_started)
            .sum();
        let excused = self.members.iter().filter(|m| !m.left).count() - judged.len();
        println!(
            "rekey {rekey:>3} seq {seq:>4}: {}/{} members current{} in {converged_ms} ms; time to \
             key so far p50 {:.1} ms max {:.1} ms; resyncs {resyncs}{}",
            judged.len() - missing.len(),
            judged.len(),
            if excused > 0 {
                format!(" ({excused} under a fault not counted)")
            } else {
                String::new()
            },
            so_far.p50 as f64 / 1000.0,
            so_far.max as f64 / 1000.0,
            if leaving.is_empty() && joining.is_empty() {
                String::new()
            } else {
                format!("; joined {joining:?}, left {leaving:?}")
            }
        );
        if !missing.is_empty() && self.scenario.expect.every_rekey_applied {
            self.failures.push(format!(
                "rekey {rekey} (message {seq}): members {missing:?} did not hold the key within \
                 {} ms",
                schedule.converge_timeout_ms
            ));
        }
        self.rekeys.push(RekeyLine {
            rekey,
            seq,
            judged: judged.len(),
            current: judged.len() - missing.len(),
            converged_ms,
        });
        if let Some(status) = self.server.exited() {
            return Err(RunError::Exited {
                what: "rekeycast server".into(),
                status,
                log: self.server.log().to_owned(),
            });
        }
        let elapsed = began.elapsed();
        if elapsed < interval {
            sleep(interval - elapsed)?;
        }
        Ok(())
    }

    fn inject(&mut self, fault: &Fault, rekey: u32) -> Result<(), RunError> {
        match fault {
            Fault::KillGcks { down_ms, .. } => {
                self.wait_server_seq(self.seq)?;
                let before = self.server.seq()?;
                self.server.kill()?;
                let killed = Instant::now();
                sleep(Duration::from_millis(*down_ms))?;
                self.server.restart()?;
                let after = self.server.seq()?;
                println!(
                    "fault: GCKS killed (SIGKILL) at message {before}, restarted after {} ms at \
                     message {after}",
                    killed.elapsed().as_millis()
                );
                if after != before && self.scenario.expect.sequence_continues {
                    self.failures.push(format!(
                        "GCKS restart before rekey {rekey}: it was at message {before} and came \
                         back at {after}"
                    ));
                }
            }
            Fault::KillRelay { relay, down_ms, .. } if self.scenario.topology.failover => {
                let gcks_resync_messages = self.gcks_resync_messages()?;
                let index = *relay as usize - 1;
                self.relays[index].kill();
                let group = format!("relay{relay}");
                let ids: Vec<u64> = self
                    .members
                    .iter()
                    .filter(|m| m.group == group && !m.left)
                    .map(|m| m.id)
                    .collect();
                if let Some(down_ms) = down_ms {
                    sleep(Duration::from_millis(*down_ms))?;
                    self.relays[index].restart()?;
                    println!(
                        "fault: relay {relay} killed (SIGKILL) and restarted from its state \
                         directory after {down_ms} ms"
                    );
                } else {
                    for id in &ids {
                        self.faulted.insert(*id);
                        if self.scenario.expect.failover_within_ms.is_none() {
                            self.excused.insert(*id, (rekey, u32::MAX));
                        }
                    }
                    self.failovers.push(FailoverKill {
                        relay: *relay,
                        members: ids.clone(),
                        first_seq: self.seq + 1,
                        gcks_resync_messages,
                    });
                    println!(
                        "fault: relay {relay} killed (SIGKILL) for good; its {} members {ids:?} \
                         must fail over to another relay",
                        ids.len()
                    );
                }
            }
            Fault::KillRelay { relay, down_ms, .. } => {
                let index = *relay as usize - 1;
                self.relays[index].kill();
                let ids = self.scenario.relay_member_ids(*relay);
                if let Some(down_ms) = down_ms {
                    sleep(Duration::from_millis(*down_ms))?;
                    self.relays[index].restart()?;
                    println!(
                        "fault: relay {relay} killed (SIGKILL) and restarted from its state \
                         directory after {down_ms} ms"
                    );
                } else {
                    for id in &ids {
                        self.excused.insert(*id, (rekey, u32::MAX));
                        self.faulted.insert(*id);
                    }
                    println!(
                        "fault: relay {relay} killed (SIGKILL); its {} members must resync from \
                         the GCKS",
                        ids.len()
                    );
                }
            }
            Fault::Blackhole {
                member, intervals, ..
            } => {
                let duration = Duration::from_millis(
                    self.scenario.schedule.interval_ms * u64::from(*intervals),
                );
                self.topology.outage(&format!("m{member}"), duration)?;
                self.excused.insert(*member, (rekey, rekey + intervals));
                self.faulted.insert(*member);
                for m in self.members.iter_mut().filter(|m| m.id == *member) {
                    m.group = "blackholed".into();
                }
                println!(
                    "fault: member {member}'s port blackholed for {} ms ({intervals} rekey \
                     intervals)",
                    duration.as_millis()
                );
            }
        }
        Ok(())
    }

    /// The messages the GCKS served by resync (its `/metrics`; a scrape of `/metrics` itself
    /// is a request, not a message served).
    fn gcks_resync_messages(&self) -> Result<u64, RunError> {
        let metrics = self.server.metrics()?;
        Ok(metrics
            .get("rekeycast_resync_messages_served_total")
            .copied()
            .unwrap_or(0.0) as u64)
    }

    /// Judges the members of the relays killed for good in a `failover` topology: each on
    /// another relay, each message after the kill held within `within` of its trigger, and
    /// the GCKS served no message by resync since. Prints the figures.
    fn judge_failovers(&mut self, within: Option<Duration>) -> Result<(), RunError> {
        let requests_now = self.gcks_resync_messages()?;
        for kill in self.failovers.clone() {
            let mut worst_ms: Vec<(u64, f64)> = Vec::new();
            let mut relays_now = BTreeMap::new();
            let mut moves = 0;
            let mut listen_moves = 0;
            let mut from_resync = 0;
            for member in self.members.iter().filter(|m| kill.members.contains(&m.id)) {
                let Some(status) = member.status() else {
                    self.failures
                        .push(format!("member {} wrote no status file", member.id));
                    continue;
                };
                *relays_now.entry(status.relay).or_insert(0u32) += 1;
                moves += status.failover_moves;
                listen_moves += status.listen_moves;
                from_resync += status.applied_from_resync;
                if status.relay.is_none() || status.relay == u16::try_from(kill.relay).ok() {
                    self.failures.push(format!(
                        "member {} of killed relay {} is on {:?}, not on another relay",
                        member.id, kill.relay, status.relay
                    ));
                }
                let mut worst = 0.0f64;
                for (&seq, &triggered) in self.triggers.range(kill.first_seq..) {
                    match status.applied.iter().find(|(s, _)| *s == seq) {
                        Some(&(_, at)) => {
                            let ms = at.saturating_sub(triggered) as f64 / 1000.0;
                            worst = worst.max(ms);
                            if within.is_some_and(|limit| ms > limit.as_secs_f64() * 1000.0) {
                                self.failures.push(format!(
                                    "member {} of killed relay {} held message {seq} {ms:.0} ms \
                                     after its trigger",
                                    member.id, kill.relay
                                ));
                            }
                        }
                        None => self.failures.push(format!(
                            "member {} of killed relay {} never held message {seq}",
                            member.id, kill.relay
                        )),
                    }
                }
                worst_ms.push((member.id, worst));
            }
            let served = requests_now.saturating_sub(kill.gcks_resync_messages);
            if within.is_some() && served > 0 {
                self.failures.push(format!(
                    "the GCKS served {served} messages by resync after relay {} was killed",
                    kill.relay
                ));
            }
            // Each relay they moved to counts them among the members that reached it (their
            // state check there, their NACKs).
            for (&relay, &moved) in &relays_now {
                let Some(number) = relay.map(u32::from) else {
                    continue;
                };
                let counted = self
                    .relays
                    .iter()
                    .find(|r| r.number == number)
                    .and_then(RelayProcess::metrics)
                    .and_then(|m| m.get("rekeycast_relay_members").copied())
                    .unwrap_or(0.0) as u64;
                println!(
                    "failover: relay {number} counts {counted} members; {moved} of them moved \
                     to it"
                );
                if within.is_some() && counted < u64::from(moved) {
                    self.failures.push(format!(
                        "relay {number} counts {counted} members, {moved} moved to it"
                    ));
                }
            }
            let slowest = worst_ms.iter().map(|(_, ms)| *ms).fold(0.0, f64::max);
            println!(
                "failover: relay {} killed before message {}; its {} members now on relays \
                 {relays_now:?} after {moves} moves ({listen_moves} group changes); slowest \
                 time to key of a message after the kill {slowest:.0} ms (per member: \
                 {worst_ms:?}); messages they applied by resync {from_resync}; messages the GCKS \
                 served by resync since the kill {served}",
                kill.relay,
                kill.first_seq,
                kill.members.len()
            );
        }
        Ok(())
    }

    fn start_flood(&mut self, flood: &crate::scenario::Flood) -> Result<(), RunError> {
        let attacker = self.topology.host("atk")?;
        let seq = self.server.seq()?;
        let output = self.work_dir.join("flood.json");
        let log = std::fs::File::create(self.work_dir.join("flood.log")).map_err(|source| {
            RunError::Io {
                what: "creating flood.log".into(),
                source,
            }
        })?;
        let stdout = std::fs::File::create(&output).map_err(|source| RunError::Io {
            what: format!("creating {}", output.display()),
            source,
        })?;
        let child = attacker
            .namespace
            .command(&self.options.harness)
            .arg("flood")
            .args(["--to", &processes::GROUP.to_string()])
            .args(["--iface", &attacker.address.to_string()])
            .args(["--group-id", &processes::GROUP_ID.to_string()])
            .args(["--spi", &processes::SPI.to_string()])
            .args(["--seq-from", &seq.to_string()])
            .args([
                "--seq-to",
                &(seq + u64::from(self.scenario.schedule.rekeys) + 1).to_string(),
            ])
            .args(["--max-datagrams", &flood.max_datagrams.to_string()])
            .args(["--max-ms", &flood.max_ms.to_string()])
            .args(["--random-fraction", &flood.random_fraction.to_string()])
            .args(["--size", &flood.size.to_string()])
            .args(["--seed", &self.scenario.seed.to_string()])
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|source| RunError::Spawn {
                what: "rekeycast-netns flood".into(),
                source,
            })?;
        println!(
            "flood: attacker {} floods {} with forged datagrams (at most {} datagrams, {} ms)",
            attacker.address,
            processes::GROUP,
            flood.max_datagrams,
            flood.max_ms
        );
        self.flood = Some(FloodProcess {
            child: ChildGuard(child),
            output,
            deadline: Instant::now()
                + Duration::from_millis(flood.max_ms)
                + Duration::from_secs(10),
        });
        Ok(())
    }

    /// Notes members that exited: a member told to register again exits with status 3.
    fn note_exits(&mut self) {
        for member in self.members.iter_mut().filter(|m| !m.left) {
            if member.exit.is_none() {
                if let Some(status) = member.poll_exit() {
                    println!(
                        "member {} exited with {status} (log {})",
                        member.id,
                        member.log.display()
                    );
                }
            }
        }
    }

    /// Waits for every member still running to hold the last key.
    fn settle(&mut self) -> Result<(), RunError> {
        let last = self.seq;
        let ids: Vec<u64> = self
            .members
            .iter()
            .filter(|m| !m.left)
            .map(|m| m.id)
            .collect();
        let began = Instant::now();
        let missing = self.wait_current(
            &ids,
            last,
            Duration::from_millis(self.scenario.schedule.settle_timeout_ms),
        )?;
        println!(
            "settle: {}/{} members hold message {last} after {} ms",
            ids.len() - missing.len(),
            ids.len(),
            began.elapsed().as_millis()
        );
        if !missing.is_empty() && self.scenario.expect.all_current_at_end {
            self.failures.push(format!(
                "at the end: members {missing:?} do not hold the last key (message {last}) after \
                 {} ms",
                self.scenario.schedule.settle_timeout_ms
            ));
        }
        Ok(())
    }

    fn finish(
        &mut self,
        outcome: Result<(), RunError>,
        started: Instant,
    ) -> Result<RunReport, RunError> {
        outcome?;
        // The status files' counters are rewritten every 500 ms: let the last ones land.
        sleep(Duration::from_millis(700))?;
        self.note_exits();
        let flood = self.finish_flood()?;
        let last = self.server.seq()?;
        if last != self.seq {
            self.failures.push(format!(
                "the server is at message {last}, the runner triggered up to {}",
                self.seq
            ));
        }
        let expect = self.scenario.expect.clone();
        if !self.failovers.is_empty() {
            self.judge_failovers(expect.failover_within_ms.map(Duration::from_millis))?;
        }
        let mut rows = Vec::new();
        let killed_relays: BTreeSet<u32> = self
            .relays
            .iter()
            .filter(|r| r.killed)
            .map(|r| r.number)
            .collect();
        for member in &mut self.members {
            let status = member.status();
            let exit = member.poll_exit();
            let last_held = status.as_ref().map_or(0, |s| s.last_seq);
            let end = if member.left { last_held } else { last };
            let expected = (end + 1).saturating_sub(member.first_seq);
            let mut group = member.group.clone();
            if let Some(relay) = group
                .strip_prefix("relay")
                .and_then(|r| r.parse::<u32>().ok())
            {
                if killed_relays.contains(&relay) {
                    group = format!("relay{relay}-killed");
                }
            }
            if let Some(status) = &status {
                // A member that left may see the message that removes it before it is
                // stopped: that its keys cannot open it is right, not a reregistration.
                if expect.no_reregistration && status.must_reregister && !member.left {
                    self.failures
                        .push(format!("member {} was told to register again", member.id));
                }
                if expect.signature_checks_match_applied
                    && (status.signature_failures != 0
                        || status.signature_checks != 2 * status.messages_applied)
                {
                    self.failures.push(format!(
                        "member {}: {} signature checks ({} failed) for {} applied messages \
                         (2 each expected)",
                        member.id,
                        status.signature_checks,
                        status.signature_failures,
                        status.messages_applied
                    ));
                }
                if expect.faulted_members_resync
                    && self.faulted.contains(&member.id)
                    && status.resyncs_started == 0
                {
                    self.failures.push(format!(
                        "member {} was under a fault but never resynced",
                        member.id
                    ));
                }
            } else {
                self.failures
                    .push(format!("member {} wrote no status file", member.id));
            }
            if !member.left {
                if let Some(status) = exit {
                    let reregister = status.code() == Some(processes::EXIT_MUST_REREGISTER);
                    if !reregister || expect.no_reregistration {
                        self.failures.push(format!(
                            "member {} exited with {status}{} (log {})",
                            member.id,
                            if reregister {
                                " (must re-register)"
                            } else {
                                ""
                            },
                            member.log.display()
                        ));
                    }
                }
            }
            let time_to_key_us = status
                .as_ref()
                .map(|s| report::time_to_key_us(&self.triggers, s))
                .unwrap_or_default();
            rows.push(MemberRow {
                id: member.id,
                group,
                status,
                expected,
                time_to_key_us,
            });
        }
        let groups = report::group_rows(&rows);
        let all: Vec<u64> = rows
            .iter()
            .flat_map(|row| row.time_to_key_us.iter().copied())
            .collect();
        let time_to_key = Percentiles::of(&all);
        let mut table = report::render_groups(&groups);
        match self.server.metrics() {
            Ok(metrics) => {
                table.push_str(&report::render_gcks(&metrics));
                let members_metric = metrics.get("rekeycast_seq").copied().unwrap_or(0.0) as u64;
                if members_metric != last {
                    self.failures.push(format!(
                        "the server's /metrics says message {members_metric}, its admin status \
                         {last}"
                    ));
                }
            }
            Err(error) => self
                .failures
                .push(format!("reading the server's /metrics: {error}")),
        }
        for relay in &self.relays {
            if let Some(metrics) = relay.metrics() {
                let get = |name: &str| metrics.get(name).copied().unwrap_or(0.0) as u64;
                table.push_str(&format!(
                    "relay {} /metrics: forwarded {}, applied {}, downstream NACKs {}, \
                     upstream NACKs {}, signature checks {}, members counted {} (contacts {})\n",
                    relay.number,
                    get("rekeycast_relay_forwarded_total"),
                    get("rekeycast_relay_messages_applied_total"),
                    get("rekeycast_relay_downstream_nacks_received_total"),
                    get("rekeycast_relay_upstream_nacks_sent_total"),
                    get("rekeycast_relay_signature_checks_total"),
                    get("rekeycast_relay_members"),
                    get("rekeycast_relay_member_contacts_total"),
                ));
            } else if relay.killed {
                table.push_str(&format!("relay {}: killed\n", relay.number));
            }
        }
        for relay in &mut self.relays {
            if !relay.killed {
                if let Some(status) = relay.exited() {
                    self.failures.push(format!(
                        "relay {} exited with {status} (log {})",
                        relay.number,
                        relay.log.display()
                    ));
                }
            }
        }
        let switch = self.topology.counters()?;
        if let Some(counters) = &switch {
            let tier_of = |port: &str| tier_of_host(port).to_string();
            table.push_str(&report::render_switch(counters, tier_of));
        }
        if let Some(flood) = &flood {
            table.push_str(&format!(
                "flood: {} datagrams sent ({} forged MACs, {} random) in {} ms, {:.0}/s, {} \
                 refused by the socket\n",
                flood.sent,
                flood.forged_mac,
                flood.random,
                flood.elapsed_ms,
                flood.rate_per_second,
                flood.send_errors
            ));
        }
        if let Some(min) = expect.min_flood_datagrams {
            let sent = flood.as_ref().map_or(0, |f| f.sent);
            if sent < min {
                self.failures.push(format!(
                    "the flood sent {sent} datagrams, fewer than the {min} expected"
                ));
            }
        }
        if let Some(min) = expect.min_rejected_datagrams {
            let rejected: u64 = groups
                .iter()
                .filter(|g| g.group != "total")
                .map(|g| g.rejected)
                .sum();
            if rejected < min {
                self.failures.push(format!(
                    "the members rejected {rejected} datagrams, fewer than the {min} expected"
                ));
            }
        }
        if let Some(bound) = expect.max_time_to_key_p99_ms {
            if time_to_key.p99 > bound * 1000 {
                self.failures.push(format!(
                    "time to key p99 {:.1} ms is above {bound} ms",
                    time_to_key.p99 as f64 / 1000.0
                ));
            }
        }
        if expect.sequence_continues {
            let rekeys = u64::from(self.scenario.schedule.rekeys);
            let first = self.triggers.keys().next().copied().unwrap_or(0);
            if last != first + rekeys - 1 {
                self.failures.push(format!(
                    "the sequence did not continue: {rekeys} rekeys from message {first} ended at \
                     {last}"
                ));
            }
        }
        println!("{table}");
        println!(
            "scenario {}: {} in {:.1} s; time to key p50 {:.1} ms p99 {:.1} ms max {:.1} ms over {} \
             samples",
            self.scenario.name,
            if self.failures.is_empty() { "PASSED" } else { "FAILED" },
            started.elapsed().as_secs_f64(),
            time_to_key.p50 as f64 / 1000.0,
            time_to_key.p99 as f64 / 1000.0,
            time_to_key.max as f64 / 1000.0,
            time_to_key.count
        );
        for failure in &self.failures {
            println!("  FAILED: {failure}");
        }
        Ok(RunReport {
            name: self.scenario.name.clone(),
            elapsed: started.elapsed(),
            rekeys: self.rekeys.clone(),
            groups,
            time_to_key,
            flood,
            switch,
            table,
            failures: self.failures.clone(),
            work_dir: self.work_dir.clone(),
        })
    }

    fn finish_flood(&mut self) -> Result<Option<FloodReport>, RunError> {
        let Some(mut flood) = self.flood.take() else {
            return Ok(None);
        };
        loop {
            match flood.child.0.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => {
                    self.failures.push(format!(
                        "the flood exited with {status} (see flood.log in the work directory)"
                    ));
                    return Ok(None);
                }
                Ok(None) if Instant::now() < flood.deadline => sleep(Duration::from_millis(50))?,
                Ok(None) | Err(_) => {
                    self.failures
                        .push("the flood did not end within its bound".into());
                    return Ok(None);
                }
            }
        }
        let text = std::fs::read_to_string(&flood.output).map_err(|source| RunError::Io {
            what: format!("reading {}", flood.output.display()),
            source,
        })?;
        match serde_json::from_str(text.trim()) {
            Ok(report) => Ok(Some(report)),
            Err(error) => {
                self.failures.push(format!(
                    "the flood's report {text:?} did not parse: {error}"
                ));
                Ok(None)
            }
        }
    }
}

/// The tier of a host, from its name.
pub fn tier_of_host(name: &str) -> &'static str {
    if name == "gcks" {
        "gcks"
    } else if name == "atk" {
        "attacker"
    } else if name.starts_with('r') && name.contains('m') {
        "relay_members"
    } else if name.starts_with('r') {
        "relays"
    } else {
        "members"
    }
}

/// The hosts of a scenario, with their tiers' impairments: `gcks`, the relays `r1`..., the
/// GCKS's members `m1`... (joiners included), the relays' members `r1m1`..., and `atk`.
pub fn host_plans(scenario: &Scenario) -> Vec<HostPlan> {
    let impairments = &scenario.impairments;
    let plan = |name: String, tier: &crate::scenario::TierImpairment| HostPlan {
        name,
        ingress: tier.ingress.clone(),
        egress: tier.egress.clone(),
    };
    let mut plans = vec![plan("gcks".into(), &impairments.gcks)];
    for relay in 1..=scenario.topology.relays {
        plans.push(plan(format!("r{relay}"), &impairments.relays));
    }
    for id in scenario.direct_member_ids() {
        plans.push(plan(format!("m{id}"), &impairments.members));
    }
    for relay in 1..=scenario.topology.relays {
        for member in 1..=scenario.topology.members_per_relay {
            plans.push(plan(
                format!("r{relay}m{member}"),
                &impairments.relay_members,
            ));
        }
    }
    if scenario.topology.attacker {
        plans.push(plan("atk".into(), &impairments.attacker));
    }
    plans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_plans_name_every_host_and_tier() {
        let scenario = Scenario::from_toml(
            r#"
            name = "plans"
            [topology]
            members = 2
            relays = 2
            members_per_relay = 2
            attacker = true
            [impairments.relay_members.egress]
            loss = { model = "iid", p = 0.1 }
            [schedule]
            rekeys = 2
            interval_ms = 100
            [[schedule.churn]]
            at_rekey = 1
            joins = 1
            "#,
        )
        .expect("valid");
        let plans = host_plans(&scenario);
        let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["gcks", "r1", "r2", "m1", "m2", "m3", "r1m1", "r1m2", "r2m1", "r2m2", "atk"]
        );
        let tiers: Vec<&str> = names.iter().map(|n| tier_of_host(n)).collect();
        assert_eq!(
            tiers,
            [
                "gcks",
                "relays",
                "relays",
                "members",
                "members",
                "members",
                "relay_members",
                "relay_members",
                "relay_members",
                "relay_members",
                "attacker"
            ]
        );
        assert!(!plans[6].egress.is_none());
        assert!(plans[3].egress.is_none());
    }

    #[test]
    fn relay_ids_are_told_apart_from_member_ids() {
        assert!(is_relay_id(relay_member_id(1)));
        assert!(is_relay_id(relay_member_id(9)));
        assert!(!is_relay_id(1001));
        assert!(!is_relay_id(9999));
        assert!(!is_relay_id(900_000));
    }

    #[test]
    fn missing_binaries_are_named() {
        let error = check_binary("rekeycast", Path::new("/nonexistent/rekeycast"), "build it")
            .expect_err("missing");
        assert!(error.to_string().contains("/nonexistent/rekeycast"));
    }
}
