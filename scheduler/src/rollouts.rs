//! The leader's rollout watcher: judges the instances of every rollout under way
//! and reports progress deadlines that passed, and the fleet rollouts' nodes that
//! went past their timeout. What the verdicts imply is decided
//! by the state as the commands apply ([`crate::state::deployments`]).
//!
//! An instance is healthy once it has run, and for a model server answered the
//! gateway's `/ready` probes, for its policy's `min_healthy_time` without a
//! restart; a canary under `checks` also needs the gateway's measurements of it
//! to stay within the limits for the window. It is unhealthy when it fails, is
//! lost, restarts, breaks a check with enough requests to judge, or is not healthy
//! within `healthy_deadline` of its placement (or of the rollout's start, for an
//! instance the new version kept). How long an instance has been up is this
//! leader's own observation: a new leader watches afresh, which only delays a
//! verdict.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::{AllocId, AllocState, EvalId, Timestamp};
use aigrid_consensus::RaftNode;

use crate::clock::SharedClock;
use crate::gateway::Gateway;
use crate::state::{ClusterState, Command, Verdict, WatchedInstance};

/// How often the watcher looks.
const TICK: Duration = Duration::from_millis(250);

/// Runs until `stop` changes; only the leader judges.
pub async fn watch(
    raft: RaftNode<ClusterState>,
    gateway: Arc<Gateway>,
    clock: SharedClock,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut up_since: HashMap<AllocId, Timestamp> = HashMap::new();
    loop {
        let status = raft.status();
        if status.leader == Some(status.id) {
            let now = clock.now();
            for command in judge(&raft, &gateway, &mut up_since, now) {
                if let Err(e) = raft.propose(&command).await {
                    tracing::debug!(error = %e, "judging a rollout");
                }
            }
        } else {
            up_since.clear();
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The commands one look at the rollouts under way calls for.
fn judge(
    raft: &RaftNode<ClusterState>,
    gateway: &Gateway,
    up_since: &mut HashMap<AllocId, Timestamp>,
    now: Timestamp,
) -> Vec<Command> {
    let watched = raft.read_local(ClusterState::watched_deployments);
    let mut seen = HashSet::new();
    let mut commands = Vec::new();
    for rollout in watched {
        let mut verdicts = Vec::new();
        for instance in &rollout.instances {
            seen.insert(instance.id.clone());
            if let Some(verdict) = verdict(instance, gateway, up_since, now) {
                up_since.remove(&instance.id);
                verdicts.push(verdict);
            }
        }
        let new_eval = || crate::new_id(EvalId::new);
        if !verdicts.is_empty() {
            commands.push(Command::JudgeAllocations {
                job_id: rollout.job_id.clone(),
                version: rollout.version,
                verdicts,
                eval_id: new_eval(),
                at: now,
            });
        } else if rollout.state == aigrid_api::DeploymentState::Running
            && rollout.progress_deadline_at.is_some_and(|d| d <= now)
        {
            commands.push(Command::DeploymentDeadline {
                job_id: rollout.job_id.clone(),
                version: rollout.version,
                eval_id: new_eval(),
                at: now,
            });
        }
    }
    up_since.retain(|id, _| seen.contains(id));
    // Fleet rollouts with nodes past their timeout.
    for id in raft.read_local(|s| s.rollouts_timing_out(now)) {
        commands.push(Command::RolloutTimeouts { id, at: now });
    }
    commands
}

/// The verdict on one instance now, if there is one yet.
fn verdict(
    instance: &WatchedInstance,
    gateway: &Gateway,
    up_since: &mut HashMap<AllocId, Timestamp>,
    now: Timestamp,
) -> Option<Verdict> {
    let unhealthy = |reason: String| {
        Some(Verdict {
            id: instance.id.clone(),
            healthy: false,
            reason: Some(reason),
        })
    };
    if instance.state.is_terminal() {
        let why = instance.reason.as_deref().unwrap_or("no reason reported");
        return unhealthy(format!("{} ({why})", instance.state));
    }
    if instance.restarts > 0 {
        return unhealthy(format!("restarted {} times", instance.restarts));
    }
    let policy = &instance.policy;
    let checks = policy.checks.as_ref().filter(|_| instance.canary);
    if let (Some(checks), Some(endpoint)) = (checks, instance.endpoint.as_deref()) {
        let stats = gateway.replica_stats(endpoint, checks.window.duration());
        if stats.requests >= checks.min_requests {
            if let Some(max) = checks.max_error_ratio {
                if stats.error_ratio() > max.get() {
                    return unhealthy(format!(
                        "{} of {} requests failed over {}, more than the {} allowed",
                        stats.failed,
                        stats.requests,
                        checks.window,
                        max.get()
                    ));
                }
            }
            if let (Some(max), Some(p99)) = (checks.max_p99, stats.p99) {
                if p99 > max.duration() {
                    return unhealthy(format!(
                        "p99 time to first byte {}ms over {}, above the {} allowed",
                        p99.as_millis(),
                        checks.window,
                        max
                    ));
                }
            }
        }
    }
    let ready = instance.state == AllocState::Running
        && (!instance.listens
            || instance
                .endpoint
                .as_deref()
                .is_some_and(|e| gateway.is_ready(e)));
    let waited = |since: Timestamp| now.as_millis().saturating_sub(since.as_millis());
    if ready {
        let since = *up_since.entry(instance.id.clone()).or_insert(now);
        let needed = checks.map_or(policy.min_healthy_time, |c| {
            c.window.max(policy.min_healthy_time)
        });
        if waited(since) >= needed.as_millis() {
            return Some(Verdict {
                id: instance.id.clone(),
                healthy: true,
                reason: None,
            });
        }
    } else {
        up_since.remove(&instance.id);
    }
    if waited(instance.since) > policy.healthy_deadline.as_millis() {
        let what = match (instance.state, instance.listens) {
            (AllocState::Running, true) => "running but not answering ready",
            (AllocState::Running, false) => "running",
            _ => "not running",
        };
        return unhealthy(format!(
            "not healthy within {} of its start ({what})",
            policy.healthy_deadline
        ));
    }
    None
}
