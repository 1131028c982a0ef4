//! The demo: a GCKS and N members in one process on loopback multicast, each member with its
//! own socket and thread, running rekeys with churn under loss simulated at receive. Used by
//! `rekeycast demo` and by the loopback integration tests.
//!
//! Members that fall out of sync are resynced from the GCKS's history in process (what the
//! TCP and HTTP resync endpoints serve over the network); state checks are answered the same
//! way.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::gcks::{
    EngineError, Gcks, GcksConfig, GcksError, GcksEvent, GcksStats, JoinError, LeaveError,
    ResyncAnswer,
};
use crate::lkh::MemberId;
use crate::member::{group_loss_filter, Member, MemberConfig, MemberError, MemberStats};
use crate::session::ReceiverEvent;
use crate::sim::Loss;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Members at the start (running, each with its own socket and thread).
    pub members: usize,
    /// Members the first message admits, at least [`Self::members`]: those beyond the
    /// running ones hold a leaf and never start, so the first message is that of a bigger
    /// group (512 admitted: a 55-chunk message) while only `members` receive it. The running
    /// members' leaves are spread evenly among the admitted ones.
    pub admitted: usize,
    /// Rekeys after the one that admits the first members.
    pub rekeys: usize,
    /// Fraction of the members replaced in each rekey (as many leave as join).
    pub churn: f64,
    /// Loss simulated at each member's receive.
    pub loss: Loss,
    /// The multicast group (on 127.0.0.1).
    pub group: SocketAddr,
    /// Seed of the churn and of the simulated loss.
    pub seed: u64,
    /// How long to wait for every member to have a rekey's key before giving up on it.
    pub rekey_timeout: Duration,
}

impl DemoConfig {
    /// The defaults of `rekeycast demo`: 200 members (every admitted member runs: `admitted`
    /// 0 counts as `members`), 20 rekeys, 5% churn, 5% iid loss, a group in 239.0.0.0/8 and a
    /// port derived from the process id.
    pub fn new() -> Self {
        let pid = std::process::id();
        let port = 20_000 + (pid % 20_000) as u16;
        Self {
            members: 200,
            admitted: 0,
            rekeys: 20,
            churn: 0.05,
            loss: Loss::Bernoulli { p: 0.05 },
            group: SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(239, 77, (pid >> 8) as u8, pid as u8),
                port,
            )),
            seed: 1,
            rekey_timeout: Duration::from_secs(20),
        }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// One rekey's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct RekeyFigures {
    /// The message's sequence number.
    pub seq: u64,
    /// Members after it.
    pub members: usize,
    /// Chunks of its message.
    pub chunks: usize,
    /// Time from the rekey command to each member's new key, microseconds, sorted.
    pub time_to_key_us: Vec<u64>,
    /// Members that did not have the key within the timeout.
    pub missing: usize,
}

/// Progress of a demo run, reported after each rekey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Rekeys done (the first, admitting message included).
    pub done: usize,
    /// Rekeys in all.
    pub total: usize,
}

/// What a demo run did.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Per rekey.
    pub rekeys: Vec<RekeyFigures>,
    /// Time to key over all rekeys, microseconds.
    pub time_to_key: Histogram<u64>,
    /// The GCKS's figures at the end.
    pub gcks: GcksStats,
    /// The final members' figures, summed where they are counts.
    pub members: Vec<MemberStats>,
    /// Resync exchanges served, and messages applied by them.
    pub resyncs: u64,
    /// State checks answered.
    pub state_checks: u64,
    /// Whether every final member holds the GCKS's current group key.
    pub all_current: bool,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl DemoReport {
    /// Datagrams every final member rejected before any signature check, summed.
    pub fn rejected(&self) -> u64 {
        self.members.iter().map(|m| m.datagrams.rejected()).sum()
    }

    /// Signature checks every final member made, summed.
    pub fn signature_checks(&self) -> u64 {
        self.members
            .iter()
            .map(|m| m.messages.signature_checks)
            .sum()
    }
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The GCKS engine failed.
    #[error(transparent)]
    Gcks(#[from] GcksError),
    /// A member engine failed.
    #[error(transparent)]
    Member(#[from] MemberError),
    /// The simulated loss settings are invalid.
    #[error("simulated loss")]
    Loss(#[from] rekeycast_nack::loss::LossError),
    /// A member was not admitted.
    #[error("join failed")]
    Join(#[from] JoinError),
    /// A member could not be removed.
    #[error("leave failed")]
    Leave(#[from] LeaveError),
    /// The GCKS stopped answering.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The GCKS reported a failed batch.
    #[error("batch failed: {0}")]
    Batch(String),
}

struct Running {
    member: Member,
    id: MemberId,
}

/// Runs the demo, calling `progress` after each rekey.
pub fn run(
    config: &DemoConfig,
    mut progress: impl FnMut(Progress),
) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let signing_key = SigningKey::from_bytes(&rng.gen());
    let mut gcks_config = GcksConfig::loopback(config.group);
    gcks_config.batch_interval = Duration::from_secs(3600);
    gcks_config.sender.grtt.initial = Duration::from_millis(10);
    // Joiners start their sockets after they get their bundles, before the message goes out.
    gcks_config.admission_delay =
        Duration::from_millis(200).max(Duration::from_millis(3) * config.members as u32);
    let gcks = Gcks::start(gcks_config, signing_key)?;
    let mut members: Vec<Running> = Vec::new();
    let mut next_id = 0u64;
    let mut time_to_key = Histogram::<u64>::new(3).map_err(|_| DemoError::Timeout("histogram"))?;
    let mut figures = Vec::new();
    let mut resyncs = 0;
    let mut state_checks = 0;
    let total = config.rekeys + 1;
    for round in 0..total {
        let (joining, leaving) = if round == 0 {
            (config.admitted.max(config.members), Vec::new())
        } else {
            let count = ((members.len() as f64) * config.churn).round() as usize;
            let count = count.min(members.len().saturating_sub(1));
            let mut picks = sample(&mut rng, members.len(), count).into_vec();
            picks.sort_unstable_by(|a, b| b.cmp(a));
            let leaving: Vec<Running> = picks.into_iter().map(|i| members.swap_remove(i)).collect();
            (count, leaving)
        };
        for running in &leaving {
            gcks.leave(running.id)?;
        }
        let mut pending = Vec::new();
        for _ in 0..joining {
            next_id += 1;
            let id = MemberId(next_id);
            pending.push((id, gcks.join(id)?));
        }
        let rekey_started = Instant::now();
        gcks.rekey_now()?;
        for running in leaving {
            let _ = running.member.shutdown();
        }
        // Of the first message's admitted members, `members` run, spread evenly over them;
        // the others hold their leaves and never start.
        let admitted = pending.len();
        let running_count = if round == 0 {
            config.members.min(admitted)
        } else {
            admitted
        };
        let chosen: HashSet<usize> = (0..running_count)
            .map(|k| k * admitted / running_count.max(1))
            .collect();
        let pending: Vec<_> = pending
            .into_iter()
            .enumerate()
            .filter(|(index, _)| chosen.contains(index))
            .map(|(_, joiner)| joiner)
            .collect();
        for (id, bundle) in pending {
            let bundle = bundle
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| DemoError::Timeout("a registration bundle"))??;
            let mut member_config = MemberConfig::loopback(config.group, gcks.local_addr());
            member_config.receiver.scheduler.grtt = Duration::from_millis(10);
            let mut loss = crate::sim::LossModel::new(config.loss)?;
            let mut loss_rng = ChaCha8Rng::seed_from_u64(rng.gen());
            members.push(Running {
                member: Member::builder(member_config)
                    .receive_filter(group_loss_filter(move || loss.lose(&mut loss_rng)))
                    .start(&bundle)?,
                id,
            });
        }
        let (seq, chunks) = wait_rekeyed(&gcks)?;
        // Time to key counts from the moment the message goes to the sender (after the
        // admission delay that lets joiners open their sockets).
        let rekey_started = wait_queued(&gcks, seq)?.max(rekey_started);
        let mut times = Vec::new();
        let mut have: HashMap<usize, ()> = HashMap::new();
        let deadline = Instant::now() + config.rekey_timeout;
        while have.len() < members.len() && Instant::now() < deadline {
            let mut idle = true;
            for (index, running) in members.iter().enumerate() {
                while let Ok(event) = running.member.events().try_recv() {
                    idle = false;
                    match event {
                        ReceiverEvent::GroupKeyUpdated { seq: got, .. } if got == seq => {
                            have.insert(index, ());
                            let us = micros(rekey_started.elapsed());
                            times.push(us);
                            let _ = time_to_key.record(us);
                        }
                        ReceiverEvent::OutOfSync { .. } => {
                            resyncs += 1;
                            resync(&gcks, &running.member)?;
                        }
                        ReceiverEvent::StateCheckNeeded { .. } => {
                            state_checks += 1;
                            if let Some(manifest) = gcks.latest_manifest()? {
                                let _ = running.member.state_answer(manifest)?;
                            }
                        }
                        _ => {}
                    }
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        times.sort_unstable();
        figures.push(RekeyFigures {
            seq,
            members: members.len(),
            chunks,
            missing: members.len() - have.len(),
            time_to_key_us: times,
        });
        progress(Progress {
            done: round + 1,
            total,
        });
    }
    let gcks_stats = gcks.stats()?;
    let mut member_stats = Vec::new();
    for running in &members {
        member_stats.push(running.member.stats()?);
    }
    let all_current = member_stats.iter().all(|m| {
        m.next_seq == gcks_stats.seq + 1
            && m.group_key_version == Some(gcks_stats.group_key_version)
    });
    for running in members {
        let _ = running.member.shutdown();
    }
    gcks.shutdown()?;
    Ok(DemoReport {
        rekeys: figures,
        time_to_key,
        gcks: gcks_stats,
        members: member_stats,
        resyncs,
        state_checks,
        all_current,
        elapsed: started.elapsed(),
    })
}

/// Waits for the GCKS to report the batch's message; returns its sequence number and chunks.
fn wait_rekeyed(gcks: &Gcks) -> Result<(u64, usize), DemoError> {
    loop {
        match gcks.events().recv_timeout(Duration::from_secs(60)) {
            Ok(GcksEvent::Rekeyed { seq, chunks, .. }) => return Ok((seq, chunks)),
            Ok(GcksEvent::BatchFailed { detail, .. }) => return Err(DemoError::Batch(detail)),
            Ok(GcksEvent::Poisoned { reason }) => {
                return Err(DemoError::Engine(EngineError::Poisoned(reason)))
            }
            Ok(_) => {}
            Err(_) => return Err(DemoError::Timeout("the GCKS's rekey")),
        }
    }
}

/// Waits for the GCKS to start sending message `seq`; returns when it saw that.
fn wait_queued(gcks: &Gcks, seq: u64) -> Result<Instant, DemoError> {
    loop {
        match gcks.events().recv_timeout(Duration::from_secs(60)) {
            Ok(GcksEvent::Queued { seq: queued }) if queued == seq => return Ok(Instant::now()),
            Ok(GcksEvent::BatchFailed { detail, .. }) => return Err(DemoError::Batch(detail)),
            Ok(GcksEvent::Poisoned { reason }) => {
                return Err(DemoError::Engine(EngineError::Poisoned(reason)))
            }
            Ok(_) => {}
            Err(_) => return Err(DemoError::Timeout("the GCKS's message")),
        }
    }
}

/// Fetches every message the member lacks from the GCKS's history and hands them over.
fn resync(gcks: &Gcks, member: &Member) -> Result<(), DemoError> {
    for _ in 0..1_000 {
        let stats = member.stats()?;
        match gcks.resync_item(stats.next_seq, stats.order_key)? {
            ResyncAnswer::Item { manifest, chunk } => {
                if member.resync(vec![(manifest, chunk)])?.is_err() {
                    return Ok(());
                }
            }
            ResyncAnswer::BeyondHistory => {
                member.beyond_history()?;
                return Ok(());
            }
            ResyncAnswer::NotSent | ResyncAnswer::NoChunk | ResyncAnswer::NotHeld => return Ok(()),
        }
    }
    Ok(())
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
