//! The leader's autoscaler: every look, for each group with a `scaling` block, sums
//! what its replicas report of their load (requests in flight, tokens and requests
//! per second: every server's gateway probes every replica, so the leader's own
//! gateway knows the load whichever server relayed it), adds the requests waiting
//! at its gateway, and commits the count the windows agree on as a
//! [`Command::ScaleGroup`] with its reason ([`decide`]'s rules). The state applies
//! a decision only if the count is still the one it was made on.
//!
//! A count above what the circle's `scale_limit` allows without its quorum (where
//! `job.scale` is guarded) is reached in two steps: the leader scales to the limit
//! at once and proposes the rest to the circle's quorum (once; not again while
//! that proposal is open), as `autoscaler`.
//!
//! What it remembers (each group's recent recommendations, when it last saw a
//! request) is its own: a new leader watches afresh and acts only once it has
//! watched a whole window, which delays a decision and never makes a wrong one.

pub mod decide;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::{EvalId, IdentityId, JobId};
use aigrid_consensus::RaftNode;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::clock::SharedClock;
use crate::gateway::Gateway;
use crate::state::{ClusterState, Command, ScaledGroup};
use decide::{Decision, Observation, Tracker};

/// Who proposes the scales a circle's quorum must approve. Not a key's id (those
/// are 32 hex characters), so no person can be taken for it.
pub const PROPOSER: &str = "autoscaler";

/// The autoscaler's Prometheus series, exported by the leader.
#[derive(Clone)]
pub struct AutoscalerMetrics {
    replicas: IntGaugeVec,
    recommended: IntGaugeVec,
    in_flight: GaugeVec,
    tokens: GaugeVec,
    decisions: IntCounterVec,
}

impl AutoscalerMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let labels = &["job", "group"];
        let replicas = IntGaugeVec::new(
            Opts::new(
                "aigrid_autoscaler_replicas",
                "A scaled group's count, as the leader last saw it",
            ),
            labels,
        )?;
        let recommended = IntGaugeVec::new(
            Opts::new(
                "aigrid_autoscaler_recommended_replicas",
                "Replicas a scaled group's load wants at its targets, at the leader's last look",
            ),
            labels,
        )?;
        let in_flight = GaugeVec::new(
            Opts::new(
                "aigrid_autoscaler_requests_in_flight",
                "Requests a scaled group's replicas serve, summed, plus those held at the leader",
            ),
            labels,
        )?;
        let tokens = GaugeVec::new(
            Opts::new(
                "aigrid_autoscaler_tokens_per_second",
                "Tokens per second a scaled group's replicas generate, summed",
            ),
            labels,
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "aigrid_autoscaler_decisions_total",
                "Count changes the leader committed or proposed, by direction \
                 (up, down, zero, proposed)",
            ),
            &["job", "group", "direction"],
        )?;
        registry.register(Box::new(replicas.clone()))?;
        registry.register(Box::new(recommended.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(decisions.clone()))?;
        Ok(AutoscalerMetrics {
            replicas,
            recommended,
            in_flight,
            tokens,
            decisions,
        })
    }

    fn reset(&self) {
        self.replicas.reset();
        self.recommended.reset();
        self.in_flight.reset();
        self.tokens.reset();
    }
}

/// What `gateway` knows of `group`'s load now.
fn observe(gateway: &Gateway, group: &ScaledGroup) -> Observation {
    let mut seen = Observation {
        held: gateway.held(&group.digest),
        ..Observation::default()
    };
    for load in group
        .endpoints
        .iter()
        .filter_map(|e| gateway.replica_load(e))
    {
        seen.in_flight += load.in_flight as f64;
        seen.tokens_per_second += load.tokens_per_second;
        seen.requests_per_second += load.requests_per_second;
    }
    seen.in_flight += seen.held as f64;
    seen
}

/// Looks every `every` until `stop` changes; only the leader decides.
pub async fn run(
    raft: RaftNode<ClusterState>,
    gateway: Arc<Gateway>,
    clock: SharedClock,
    metrics: AutoscalerMetrics,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut trackers: HashMap<(JobId, String), Tracker> = HashMap::new();
    loop {
        let status = raft.status();
        metrics.reset();
        if status.leader == Some(status.id) {
            let groups = raft.read_local(ClusterState::scaled_groups);
            trackers.retain(|(job, group), _| {
                groups.iter().any(|g| &g.job_id == job && &g.group == group)
            });
            let now = clock.now();
            for group in &groups {
                let seen = observe(&gateway, group);
                let labels = [group.job.as_str(), group.group.as_str()];
                let recommended = Tracker::recommend(&group.scaling, &seen);
                metrics
                    .replicas
                    .with_label_values(&labels)
                    .set(i64::from(group.count));
                metrics
                    .recommended
                    .with_label_values(&labels)
                    .set(i64::from(recommended));
                metrics
                    .in_flight
                    .with_label_values(&labels)
                    .set(seen.in_flight);
                metrics
                    .tokens
                    .with_label_values(&labels)
                    .set(seen.tokens_per_second);
                let tracker = trackers
                    .entry((group.job_id.clone(), group.group.clone()))
                    .or_insert_with(|| Tracker::new(now.as_millis()));
                let Some(decision) =
                    tracker.look(now.as_millis(), &group.scaling, group.count, &seen)
                else {
                    continue;
                };
                commit(&raft, &metrics, group, decision, now).await;
            }
        } else {
            trackers.clear();
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Commits `decision` for `group`: directly within what the circle allows without
/// its quorum, and the rest as a proposal.
async fn commit(
    raft: &RaftNode<ClusterState>,
    metrics: &AutoscalerMetrics,
    group: &ScaledGroup,
    decision: Decision,
    now: aigrid_api::Timestamp,
) {
    let scale = |from: Option<u32>, to: u32, reason: String| Command::ScaleGroup {
        job_id: group.job_id.clone(),
        group: group.group.clone(),
        from,
        to,
        reason,
        eval_id: crate::new_id(EvalId::new),
        at: now,
    };
    let direction = |to: u32| match to {
        0 => "zero",
        to if to > group.count => "up",
        _ => "down",
    };
    let labels = |direction| [group.job.as_str(), group.group.as_str(), direction];
    let (direct, beyond) = decide::within_room(group.count, decision.to, group.room);
    let beyond = beyond.filter(|_| !group.proposed).map(|to| {
        let reason = format!(
            "{} (above the circle's scale limit: its quorum decides)",
            decision.reason
        );
        scale(None, to, reason)
    });
    if direct != group.count {
        let command = scale(Some(group.count), direct, decision.reason.clone());
        match raft.propose(&command).await {
            Ok(Ok(_)) => {
                tracing::info!(job = %group.job, group = %group.group, from = group.count, to = direct, reason = %decision.reason, "scaled");
                metrics
                    .decisions
                    .with_label_values(&labels(direction(direct)))
                    .inc();
            }
            Ok(Err(e)) => tracing::warn!(job = %group.job, error = %e, "a scale was refused"),
            Err(e) => tracing::debug!(error = %e, "proposing a scale"),
        }
    }
    if let Some(command) = beyond {
        let proposal = Command::Propose {
            id: crate::new_id(|id| id),
            command: Box::new(command),
            by: IdentityId::new(PROPOSER),
            at: now,
        };
        match raft.propose(&proposal).await {
            Ok(Ok(_)) => {
                tracing::info!(job = %group.job, group = %group.group, to = decision.to, "proposed a scale above the circle's limit");
                metrics
                    .decisions
                    .with_label_values(&labels("proposed"))
                    .inc();
            }
            Ok(Err(e)) => {
                tracing::warn!(job = %group.job, error = %e, "a scale proposal was refused")
            }
            Err(e) => tracing::debug!(error = %e, "proposing a scale to the circle's quorum"),
        }
    }
}
