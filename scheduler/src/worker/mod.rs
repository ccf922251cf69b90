//! The leader's scheduling loop, in Nomad's shape: evaluations queued by priority,
//! one plan per job per pass against one consistent snapshot, and a single applier
//! (the state machine) that re-checks every job's plan against the latest state as
//! it commits.
//!
//! A pass has three steps:
//!
//! 1. [`collect`], under the state's read lock: the due evaluations grouped by job,
//!    highest priority first, the draining nodes, and a [`PlanSnapshot`] of the
//!    cluster. Nothing else happens under the lock, so the replica keeps applying.
//! 2. [`plan_pass`], with no lock: each job is reconciled against the snapshot (new
//!    placements, stops of instances the spec dropped); what does not fit is tried
//!    again with defragmentation, then preemption; drains migrate their allocations
//!    at their pace. Each job's changes are applied to the snapshot before the next
//!    job is planned, and every few hundred jobs a [`Command::ApplyPlan`] goes out.
//! 3. The commands are proposed while planning continues, several in flight, so
//!    Raft's commit latency does not bound placement throughput.
//!
//! Blocked evaluations are planned again whenever capacity may have changed. A node
//! silent for longer than the TTL is marked down (its instances are rescheduled
//! after the backoff the state machine sets on their evaluations); a new leader
//! first waits one TTL so nodes can reach it.
//!
//! | module | owns |
//! |---|---|
//! | [`collect`] | the pass's input, read under the state's lock |
//! | [`pass`] | one pass: jobs planned in turn, drains, plans batched into commands |
//! | `job` | one job brought to its spec: placements, updates, defragmentation, preemption |
//! | `drains` | allocations moved off draining nodes at their pace |

mod collect;
mod drains;
mod job;
mod pass;

use std::time::{Duration, Instant};

use aigrid_api::{NodeStatus, Timestamp};
use aigrid_consensus::RaftNode;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::clock::SharedClock;
use crate::metrics::WorkerMetrics;
use crate::state::{Applied, ClusterState, Command, CommandOutput};

pub use collect::{collect, JobInfo, JobWork, PassInput};
pub use pass::plan_pass;

/// Plan commands proposed and not yet committed at once.
const IN_FLIGHT: usize = 4;
/// Blocked evaluations are retried at least this often even if no capacity change
/// was seen.
const BLOCKED_RETRY: Duration = Duration::from_secs(30);

/// How the loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerConfig {
    /// How often the leader looks for work.
    pub interval: Duration,
    /// How long a node may stay silent before it is marked down.
    pub node_ttl: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            node_ttl: Duration::from_secs(30),
        }
    }
}

/// Commands that mark nodes silent since before `now - ttl` as down.
pub fn expire_nodes(state: &ClusterState, now: Timestamp, ttl: Duration) -> Vec<Command> {
    let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let deadline = Timestamp::from_millis(now.as_millis().saturating_sub(ttl));
    state
        .silent_nodes(deadline)
        .into_iter()
        .map(|node_id| Command::SetNodeStatus {
            node_id,
            status: NodeStatus::Down,
            at: now,
        })
        .collect()
}

/// Runs the loop until `shutdown` turns true. Followers idle; the leader plans.
pub async fn run(
    raft: RaftNode<ClusterState>,
    config: WorkerConfig,
    metrics: WorkerMetrics,
    clock: SharedClock,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut leader_since: Option<Instant> = None;
    let mut planned_epoch: Option<u64> = None;
    let mut blocked_retry = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(config.interval) => {}
        }
        let status = raft.status();
        if status.leader != Some(status.id) {
            leader_since = None;
            planned_epoch = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let at = clock.now();
        if since.elapsed() >= config.node_ttl {
            let expired = raft.read_local(|s| expire_nodes(s, at, config.node_ttl));
            for command in expired {
                match raft.propose(&command).await {
                    Ok(_) => metrics.nodes_expired.inc(),
                    Err(e) => tracing::warn!(error = %e, "marking a silent node down failed"),
                }
            }
        }
        let epoch = raft.read_local(ClusterState::capacity_epoch);
        let with_blocked = planned_epoch != Some(epoch) || blocked_retry.elapsed() >= BLOCKED_RETRY;
        if let Err(e) = pass(&raft, &metrics, at, with_blocked).await {
            tracing::warn!(error = %e, "scheduling pass failed");
            continue;
        }
        if with_blocked {
            planned_epoch = Some(epoch);
            blocked_retry = Instant::now();
        }
    }
}

/// One pass: collect under a linearizable read, plan on a blocking thread, and
/// propose each command as it comes, [`IN_FLIGHT`] at a time.
async fn pass(
    raft: &RaftNode<ClusterState>,
    metrics: &WorkerMetrics,
    at: Timestamp,
    with_blocked: bool,
) -> Result<(), aigrid_consensus::RaftError> {
    let started = Instant::now();
    let input = raft.read(|s| collect(s, at, with_blocked)).await?;
    if input.is_empty() {
        return Ok(());
    }
    metrics.passes.inc();
    let record = |done: Result<CommandOutput, aigrid_consensus::RaftError>| match done {
        Ok(Ok(Applied::PlanApplied {
            placed,
            stopped,
            preempted,
            migrated,
            refused,
            ..
        })) => {
            metrics.placed.inc_by(placed as u64);
            metrics.stopped.inc_by(stopped as u64);
            metrics.preempted.inc_by(preempted as u64);
            metrics.migrated.inc_by(migrated as u64);
            metrics.refused.inc_by(refused.len() as u64);
            for (job, reason) in refused {
                tracing::info!(%job, %reason, "a job plan was refused");
            }
            Ok(())
        }
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "a scheduling command was refused");
            Ok(())
        }
        Err(e) => Err(e),
    };
    let (tx, mut rx) = mpsc::channel::<Command>(IN_FLIGHT);
    let planner = tokio::task::spawn_blocking(move || {
        plan_pass(input, |command| {
            // The receiver only goes away when the pass is abandoned.
            let _ = tx.blocking_send(command);
        });
    });
    let mut in_flight = FuturesUnordered::new();
    let mut result = Ok(());
    loop {
        tokio::select! {
            command = rx.recv(), if in_flight.len() < IN_FLIGHT => {
                let Some(command) = command else { break };
                let raft = raft.clone();
                in_flight.push(async move { raft.propose(&command).await });
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(e) = record(done) {
                    result = Err(e);
                }
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        if let Err(e) = record(done) {
            result = Err(e);
        }
    }
    let _ = planner.await;
    metrics
        .pass_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}
