//! The leader's scheduling loop: it takes pending evaluations, plans each job against
//! the applied state with [`crate::planner`], and commits the result through Raft as
//! allocations plus the evaluation's verdict.
//!
//! Only the leader plans. Each plan reads a linearizable view, so it sees every earlier
//! commit, and the state machine checks every allocation again when the plan commits:
//! a plan made on a stale view is refused, never applied half-checked. Evaluations
//! that could not place everything are `blocked`; they are planned again whenever
//! the cluster's capacity changes (a node appears or changes, an allocation ends).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aigrid_api::{
    AllocId, AllocState, Allocation, DesiredState, EvalStatus, Evaluation, Job, Timestamp,
};
use aigrid_consensus::{RaftError, RaftNode};
use tokio::sync::watch;

use crate::planner::{plan, GroupDemand, PlanRequest, PlanSnapshot};
use crate::state::{ClusterState, Command, EvaluationUpdate, StateError};

/// Evaluations planned and committed together.
const BATCH: usize = 256;

/// What one pass needs from the state, read in one linearizable read.
struct Work {
    pending: Vec<Evaluation>,
    blocked: Vec<Evaluation>,
    capacity: CapacityMark,
}

/// Changes whenever capacity may have been freed or added.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct CapacityMark {
    nodes: Vec<(String, String, usize)>,
    live_allocations: usize,
}

fn capacity_mark(state: &ClusterState) -> CapacityMark {
    let nodes = state.nodes();
    CapacityMark {
        nodes: nodes
            .iter()
            .map(|n| {
                let healthy = n.resources.gpus.iter().filter(|g| g.healthy).count();
                (n.id.to_string(), n.status.to_string(), healthy)
            })
            .collect(),
        live_allocations: state.counts().allocations_live,
    }
}

fn now() -> Timestamp {
    Timestamp::from_millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// Runs the loop until `shutdown` turns true. Followers idle; the leader plans.
pub async fn run(raft: RaftNode<ClusterState>, mut shutdown: watch::Receiver<bool>) {
    let mut planned_for: Option<CapacityMark> = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let status = raft.status();
        if status.leader != Some(status.id) {
            planned_for = None;
            continue;
        }
        let work = match raft
            .read(|s| Work {
                pending: s
                    .evaluations(EvalStatus::Pending)
                    .into_iter()
                    .take(4 * BATCH)
                    .collect(),
                blocked: s.evaluations(EvalStatus::Blocked),
                capacity: capacity_mark(s),
            })
            .await
        {
            Ok(work) => work,
            Err(e) => {
                tracing::debug!(error = %e, "scheduling pass skipped");
                continue;
            }
        };
        let mut evals = work.pending;
        if planned_for.as_ref() != Some(&work.capacity) {
            evals.extend(work.blocked);
        }
        planned_for = Some(work.capacity);
        for batch in evals.chunks(BATCH) {
            match process(&raft, batch).await {
                Ok(()) => {}
                // The state machine refused the batch's plan: plan its evaluations one
                // by one, so one bad plan cannot hold up the others.
                Err(WorkerError::State(_)) => {
                    for eval in batch {
                        if let Err(WorkerError::State(e)) =
                            process(&raft, std::slice::from_ref(eval)).await
                        {
                            refuse(&raft, eval, &e).await;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "planning a batch of evaluations failed");
                    break;
                }
            }
        }
    }
}

/// Marks an evaluation whose plan the state machine refused as blocked, with the
/// reason, so it is retried when capacity changes rather than on every pass.
async fn refuse(raft: &RaftNode<ClusterState>, eval: &Evaluation, error: &StateError) {
    tracing::warn!(eval = %eval.id, job = %eval.job_id, error = %error, "plan refused");
    let update = EvaluationUpdate {
        eval_id: eval.id.clone(),
        status: EvalStatus::Blocked,
        unplaced: vec![aigrid_api::Unplaced {
            group: String::new(),
            missing: 0,
            reason: format!("the plan was refused: {error}"),
        }],
    };
    let command = Command::UpdateEvaluations {
        updates: vec![update],
        at: now(),
    };
    if let Err(e) = raft.propose(&command).await {
        tracing::warn!(error = %e, "recording a refused plan failed");
    }
}

/// Why planning a batch of evaluations stopped.
#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error(transparent)]
    Raft(#[from] RaftError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Plans a batch of evaluations against one view of the cluster, each seeing the
/// placements of the ones before it, then commits all their allocations in one
/// command and their verdicts in another, so Raft latency and log space are paid
/// once per batch, not once per evaluation.
/// A batch refused by the state machine (the cluster changed meanwhile) leaves its
/// evaluations as they were, to be planned again on the next pass.
async fn process(raft: &RaftNode<ClusterState>, evals: &[Evaluation]) -> Result<(), WorkerError> {
    let job_ids: Vec<_> = evals.iter().map(|e| e.job_id.clone()).collect();
    let (jobs, nodes, allocations) = raft
        .read(|s| {
            let jobs: Vec<Option<Job>> = job_ids.iter().map(|id| s.job(id)).collect();
            (jobs, s.nodes(), s.allocations())
        })
        .await?;
    let mut current: BTreeMap<AllocId, Allocation> =
        allocations.into_iter().map(|a| (a.id.clone(), a)).collect();
    let mut snapshot = PlanSnapshot::new(nodes.iter(), current.values());
    let at = now();
    let mut changes = Vec::new();
    let mut verdicts = Vec::new();
    for (eval, job) in evals.iter().zip(jobs) {
        let (changed, unplaced) = match job {
            // A job planned earlier in this batch sees its own placements too: overlay
            // this batch's changes on the allocations the read returned.
            Some(mut job) => {
                for alloc in changes.iter().filter(|a: &&Allocation| a.job_id == job.id) {
                    match job.allocations.iter_mut().find(|a| a.id == alloc.id) {
                        Some(slot) => *slot = alloc.clone(),
                        None => job.allocations.push(alloc.clone()),
                    }
                }
                reconcile(&job, &snapshot, at)
            }
            // Deleted: its allocations were already asked to stop.
            None => (Vec::new(), Vec::new()),
        };
        if !changed.is_empty() {
            for alloc in &changed {
                current.insert(alloc.id.clone(), alloc.clone());
            }
            snapshot = PlanSnapshot::new(nodes.iter(), current.values());
            changes.extend(changed);
        }
        let status = if unplaced.is_empty() {
            EvalStatus::Complete
        } else {
            EvalStatus::Blocked
        };
        verdicts.push(EvaluationUpdate {
            eval_id: eval.id.clone(),
            status,
            unplaced,
        });
    }
    if !changes.is_empty() {
        raft.propose(&Command::UpsertAllocations {
            allocations: changes,
            at,
        })
        .await??;
    }
    raft.propose(&Command::UpdateEvaluations {
        updates: verdicts,
        at,
    })
    .await??;
    Ok(())
}

/// The allocations that bring `job` to its spec: new placements for instances that
/// have no live allocation, stops for instances the spec no longer has; and what
/// could not be placed.
fn reconcile(
    job: &Job,
    snapshot: &PlanSnapshot,
    at: Timestamp,
) -> (Vec<Allocation>, Vec<aigrid_api::Unplaced>) {
    let mut live: BTreeMap<(&str, u32), &Allocation> = BTreeMap::new();
    for alloc in job.allocations.iter().filter(|a| a.is_live()) {
        live.insert((alloc.group.as_str(), alloc.index), alloc);
    }
    let mut changes = Vec::new();
    for alloc in live.values() {
        let wanted = job
            .spec
            .group(&alloc.group)
            .is_some_and(|g| alloc.index < g.count);
        if !wanted {
            let mut stop = (*alloc).clone();
            stop.desired = DesiredState::Stop;
            stop.updated_at = at;
            changes.push(stop);
        }
    }
    let groups: Vec<GroupDemand> = job
        .spec
        .groups
        .iter()
        .map(|g| GroupDemand {
            group: g.clone(),
            indices: (0..g.count)
                .filter(|i| !live.contains_key(&(g.name.as_str(), *i)))
                .collect(),
        })
        .filter(|d| !d.indices.is_empty())
        .collect();
    if groups.is_empty() {
        return (changes, Vec::new());
    }
    let request = PlanRequest {
        job_id: job.id.clone(),
        groups,
    };
    let result = plan(snapshot, &request);
    for placement in result.placements {
        let resources = job
            .spec
            .group(&placement.group)
            .map(|g| g.resources.clone())
            .expect("placements name groups of the request");
        changes.push(Allocation {
            id: AllocId::new(uuid::Uuid::new_v4().to_string()),
            job_id: job.id.clone(),
            job_version: job.version,
            node_id: placement.node_id,
            group: placement.group,
            index: placement.index,
            resources,
            gpus: placement.gpus,
            state: AllocState::Pending,
            desired: DesiredState::Run,
            created_at: at,
            updated_at: at,
        });
    }
    let unplaced = result.unplaced.iter().map(|u| u.to_unplaced()).collect();
    (changes, unplaced)
}
