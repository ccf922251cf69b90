//! Fleet rollouts: a registered model sent to the nodes chosen by attributes, in
//! waves. A wave's nodes are asked (in their assignments) to stage and activate
//! the model; each answers in a heartbeat with its attestation, checked here
//! against its node key and the rollout's digest. The next wave starts when every
//! node of the last one is done; failed and timed-out nodes count against the
//! abort threshold, which stops the rollout (the wave's unfinished nodes and every
//! later wave are skipped).

use aigrid_api::rollout::attestation_message;
use aigrid_api::{
    CreateRollout, FleetRollout, ModelAssignment, ModelReport, NodeId, NodeStage, NodeStageState,
    NodeStatus, RolloutState, Timestamp, ValidationError, Wave,
};

use super::*;

/// Rollouts kept; the oldest finished ones are forgotten first.
pub const ROLLOUTS_KEPT: usize = 256;

fn finished(state: NodeStageState) -> bool {
    matches!(
        state,
        NodeStageState::Active | NodeStageState::Failed | NodeStageState::TimedOut
    )
}

impl ClusterState {
    /// Starts a fleet rollout: its nodes (ready or draining, not revoked, with
    /// every `select` attribute) in id order, cut into waves; the first wave is
    /// asked to stage at once. An id used before answers that rollout (a replay).
    pub(super) fn create_rollout(
        &mut self,
        id: String,
        request: CreateRollout,
        at: Timestamp,
    ) -> CommandOutput {
        if let Some(existing) = self.tables.rollouts.get(&id) {
            return Ok(Applied::RolloutChanged(existing.clone()));
        }
        request.validate()?;
        let model = self
            .tables
            .models
            .summary(&request.model)
            .ok_or_else(|| StateError::not_found(ObjectKind::Model, &request.model))?;
        let nodes: Vec<NodeId> = self
            .tables
            .nodes
            .values()
            .filter(|n| !n.revoked && n.status != NodeStatus::Down)
            .filter(|n| {
                request
                    .select
                    .iter()
                    .all(|(k, v)| n.attributes.get(k) == Some(v))
            })
            .map(|n| n.id.clone())
            .collect();
        if nodes.is_empty() {
            return Err(StateError::Invalid(ValidationError::new(
                "select",
                "no live node has every attribute asked for",
            )));
        }
        if nodes.len() > aigrid_api::rollout::MAX_ROLLOUT_NODES {
            return Err(StateError::Invalid(ValidationError::new(
                "select",
                format!(
                    "{} nodes match; a rollout reaches at most {}",
                    nodes.len(),
                    aigrid_api::rollout::MAX_ROLLOUT_NODES
                ),
            )));
        }
        let mut waves = Vec::new();
        let mut rest = nodes.into_iter();
        for (index, size) in request.waves.cut(rest.len()).into_iter().enumerate() {
            waves.push(Wave {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                nodes: rest
                    .by_ref()
                    .take(size)
                    .map(|node| NodeStage {
                        node,
                        state: NodeStageState::Waiting,
                        started_at: None,
                        finished_at: None,
                        attested: None,
                        signature: None,
                        reason: None,
                    })
                    .collect(),
            });
        }
        let rollout = FleetRollout {
            id: id.clone(),
            model: model.digest,
            name: model.name,
            select: request.select,
            waves_asked: request.waves,
            abort_after: request.abort_after,
            node_timeout: request.node_timeout,
            state: RolloutState::Running,
            description: "wave 1 staging".to_owned(),
            waves,
            created_at: at,
            updated_at: at,
        };
        self.tables.rollouts.insert(id.clone(), rollout);
        self.forget_old_rollouts();
        self.start_wave(&id, 0, at);
        Ok(Applied::RolloutChanged(self.tables.rollouts[&id].clone()))
    }

    /// Forgets the oldest finished rollouts beyond [`ROLLOUTS_KEPT`].
    fn forget_old_rollouts(&mut self) {
        while self.tables.rollouts.len() > ROLLOUTS_KEPT {
            let oldest = self
                .tables
                .rollouts
                .values()
                .filter(|r| r.state != RolloutState::Running)
                .min_by_key(|r| (r.updated_at, r.id.clone()))
                .map(|r| r.id.clone());
            match oldest {
                Some(id) => {
                    self.tables.rollouts.remove(&id);
                }
                None => return,
            }
        }
    }

    fn start_wave(&mut self, id: &str, wave: usize, at: Timestamp) {
        let Some(rollout) = self.tables.rollouts.get_mut(id) else {
            return;
        };
        let mut started = Vec::new();
        if let Some(w) = rollout.waves.get_mut(wave) {
            for stage in &mut w.nodes {
                stage.state = NodeStageState::Staging;
                stage.started_at = Some(at);
                started.push(stage.node.clone());
            }
        }
        rollout.description = format!("wave {} of {} staging", wave + 1, rollout.waves.len());
        rollout.updated_at = at;
        for node in started {
            self.touch_node(&node);
        }
    }

    /// What `node` reports of the models it was asked to stage: an attestation is
    /// checked against the node's key and the rollout's digest; a node that
    /// attests another digest, or signs wrongly, has failed.
    pub(super) fn report_models(
        &mut self,
        node_id: &NodeId,
        reports: Vec<ModelReport>,
        at: Timestamp,
    ) -> CommandOutput {
        let key = self
            .tables
            .nodes
            .get(node_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Node, node_id))?
            .public_key;
        let mut moved = Vec::new();
        for report in reports {
            let Some(rollout) = self.tables.rollouts.get_mut(&report.rollout) else {
                continue;
            };
            if rollout.state != RolloutState::Running {
                continue;
            }
            let model = rollout.model.clone();
            let Some(stage) = rollout
                .waves
                .iter_mut()
                .flat_map(|w| w.nodes.iter_mut())
                .find(|s| s.node == *node_id && s.state == NodeStageState::Staging)
            else {
                continue;
            };
            let outcome = match report.state {
                NodeStageState::Active => {
                    let message = attestation_message(&report.rollout, node_id, &report.digest);
                    let signed = report
                        .signature
                        .as_deref()
                        .and_then(|s| hex::decode(s).ok())
                        .is_some_and(|sig| key.is_some_and(|k| k.verify_bytes(&message, &sig)));
                    if !signed {
                        Err(
                            "its attestation's signature does not verify with its node key"
                                .to_owned(),
                        )
                    } else if report.digest != model {
                        Err(format!(
                            "it attests model {}, not the rollout's {}",
                            report.digest, model
                        ))
                    } else {
                        Ok(())
                    }
                }
                NodeStageState::Failed => Err(report
                    .reason
                    .clone()
                    .unwrap_or_else(|| "staging failed".to_owned())),
                _ => continue,
            };
            stage.finished_at = Some(at);
            stage.attested =
                (report.state == NodeStageState::Active).then(|| report.digest.clone());
            stage.signature = report.signature.clone();
            match outcome {
                Ok(()) => stage.state = NodeStageState::Active,
                Err(reason) => {
                    stage.state = NodeStageState::Failed;
                    stage.reason = Some(reason);
                }
            }
            moved.push(report.rollout.clone());
        }
        for id in &moved {
            self.advance_rollout(id, at);
        }
        Ok(Applied::RolloutsMoved { count: moved.len() })
    }

    /// The leader's report that `at` is past some node's timeout in rollout `id`:
    /// every staging node started before `at - node_timeout` has timed out.
    pub(super) fn rollout_timeouts(&mut self, id: &str, at: Timestamp) -> CommandOutput {
        let Some(rollout) = self.tables.rollouts.get_mut(id) else {
            return Err(StateError::not_found(ObjectKind::Rollout, id));
        };
        if rollout.state != RolloutState::Running {
            return Ok(Applied::RolloutChanged(rollout.clone()));
        }
        let timeout = rollout.node_timeout;
        for stage in rollout.waves.iter_mut().flat_map(|w| w.nodes.iter_mut()) {
            let due = stage.started_at.is_some_and(|s| {
                s.as_millis().saturating_add(timeout.as_millis()) <= at.as_millis()
            });
            if stage.state == NodeStageState::Staging && due {
                stage.state = NodeStageState::TimedOut;
                stage.finished_at = Some(at);
                stage.reason = Some(format!("not active within {timeout}"));
            }
        }
        self.advance_rollout(id, at);
        Ok(Applied::RolloutChanged(self.tables.rollouts[id].clone()))
    }

    /// Aborts a rollout past its threshold; otherwise starts the next wave once
    /// the current one is done, or ends it once the last one is.
    fn advance_rollout(&mut self, id: &str, at: Timestamp) {
        let Some(rollout) = self.tables.rollouts.get_mut(id) else {
            return;
        };
        if rollout.state != RolloutState::Running {
            return;
        }
        let total: usize = rollout.waves.iter().map(|w| w.nodes.len()).sum();
        let bad = rollout.count(NodeStageState::Failed) + rollout.count(NodeStageState::TimedOut);
        let limit = rollout.abort_after.map_or(1, |a| a.limit(total));
        rollout.updated_at = at;
        if bad >= limit {
            let mut skipped = Vec::new();
            for stage in rollout.waves.iter_mut().flat_map(|w| w.nodes.iter_mut()) {
                if matches!(
                    stage.state,
                    NodeStageState::Waiting | NodeStageState::Staging
                ) {
                    if stage.state == NodeStageState::Staging {
                        skipped.push(stage.node.clone());
                    }
                    stage.state = NodeStageState::Skipped;
                }
            }
            rollout.state = RolloutState::Aborted;
            rollout.description = format!(
                "{bad} nodes failed or timed out, reaching the threshold of {limit}; \
                 no further node is started"
            );
            for node in skipped {
                self.touch_node(&node);
            }
            return;
        }
        let current = rollout
            .waves
            .iter()
            .rposition(|w| w.nodes.iter().any(|s| s.state != NodeStageState::Waiting));
        let Some(current) = current else {
            return;
        };
        if !rollout.waves[current]
            .nodes
            .iter()
            .all(|s| finished(s.state))
        {
            return;
        }
        if current + 1 < rollout.waves.len() {
            self.start_wave(id, current + 1, at);
        } else {
            rollout.state = RolloutState::Succeeded;
            rollout.description = format!(
                "{} of {total} nodes attest the model",
                rollout.count(NodeStageState::Active)
            );
        }
    }

    /// Fleet rollouts kept by state, and the nodes of the running ones by stage.
    pub fn rollout_counts(
        &self,
    ) -> (
        std::collections::BTreeMap<RolloutState, usize>,
        std::collections::BTreeMap<NodeStageState, usize>,
    ) {
        let mut rollouts = std::collections::BTreeMap::new();
        let mut nodes = std::collections::BTreeMap::new();
        for r in self.tables.rollouts.values() {
            *rollouts.entry(r.state).or_default() += 1;
            if r.state == RolloutState::Running {
                for stage in r.waves.iter().flat_map(|w| &w.nodes) {
                    *nodes.entry(stage.state).or_default() += 1;
                }
            }
        }
        (rollouts, nodes)
    }

    /// A fleet rollout, by id.
    pub fn rollout(&self, id: &str) -> Option<FleetRollout> {
        self.tables.rollouts.get(id).cloned()
    }

    /// Every fleet rollout kept, newest first.
    pub fn rollouts(&self) -> Vec<FleetRollout> {
        let mut all: Vec<FleetRollout> = self.tables.rollouts.values().cloned().collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        all
    }

    /// The running rollouts with a staging node started at or before `before`.
    pub fn rollouts_timing_out(&self, now: Timestamp) -> Vec<String> {
        self.tables
            .rollouts
            .values()
            .filter(|r| r.state == RolloutState::Running)
            .filter(|r| {
                r.waves.iter().flat_map(|w| &w.nodes).any(|s| {
                    s.state == NodeStageState::Staging
                        && s.started_at.is_some_and(|t| {
                            t.as_millis().saturating_add(r.node_timeout.as_millis())
                                <= now.as_millis()
                        })
                })
            })
            .map(|r| r.id.clone())
            .collect()
    }

    /// The models `node` must stage now: one per running rollout that asks it,
    /// each with peers to fetch it from: nodes that attest it, with a data port,
    /// their own site's first, at most [`aigrid_api::rollout::MAX_MODEL_PEERS`].
    pub(super) fn model_assignments(&self, node: &NodeId) -> Vec<ModelAssignment> {
        let site = |n: &NodeId| {
            self.tables
                .nodes
                .get(n)
                .and_then(|n| n.attributes.get("site"))
        };
        let mine = site(node);
        self.tables
            .rollouts
            .values()
            .filter(|r| r.state == RolloutState::Running)
            .filter(|r| {
                r.waves
                    .iter()
                    .flat_map(|w| &w.nodes)
                    .any(|s| s.node == *node && s.state == NodeStageState::Staging)
            })
            .map(|r| {
                let staging: Vec<&NodeId> = r
                    .waves
                    .iter()
                    .flat_map(|w| &w.nodes)
                    .filter(|s| s.state == NodeStageState::Staging)
                    .map(|s| &s.node)
                    .collect();
                let peers: Vec<aigrid_api::ModelPeer> = r
                    .waves
                    .iter()
                    .flat_map(|w| &w.nodes)
                    .filter(|s| {
                        matches!(s.state, NodeStageState::Active | NodeStageState::Staging)
                            && s.node != *node
                    })
                    .filter_map(|s| {
                        let peer = self.tables.nodes.get(&s.node)?;
                        if peer.revoked || peer.status == NodeStatus::Down {
                            return None;
                        }
                        let scheme = if peer.data_tls { "https" } else { "http" };
                        let url = match (peer.address?, peer.data_port?) {
                            (std::net::IpAddr::V6(a), port) => {
                                format!("{scheme}://[{a}]:{port}")
                            }
                            (a, port) => format!("{scheme}://{a}:{port}"),
                        };
                        Some(aigrid_api::ModelPeer {
                            node: s.node.clone(),
                            url,
                            same_site: mine.is_some() && site(&s.node) == mine,
                            whole: s.state == NodeStageState::Active,
                        })
                    })
                    .collect();
                let peers = aigrid_api::rollout::choose_peers(peers, |p| {
                    let rank = aigrid_api::rollout::peer_rank(
                        r.id.as_str(),
                        node.as_str(),
                        p.node.as_str(),
                    );
                    (p.same_site, p.whole, rank)
                });
                // The nodes staging it share the chunks no peer holds yet, each
                // fetching its own part from the store.
                let origin_share =
                    staging
                        .iter()
                        .position(|n| *n == node)
                        .map(|index| aigrid_api::OriginShare {
                            index: u32::try_from(index).unwrap_or(u32::MAX),
                            of: u32::try_from(staging.len()).unwrap_or(u32::MAX),
                        });
                ModelAssignment {
                    rollout: r.id.clone(),
                    digest: r.model.clone(),
                    name: r.name.clone(),
                    peers,
                    origin_share,
                }
            })
            .collect()
    }

    /// The reports in `reports` that would change a rollout: for a node staging in
    /// a running rollout.
    pub fn model_reports_news(&self, node: &NodeId, reports: &[ModelReport]) -> Vec<ModelReport> {
        reports
            .iter()
            .filter(|m| {
                self.tables.rollouts.get(&m.rollout).is_some_and(|r| {
                    r.state == RolloutState::Running
                        && r.waves
                            .iter()
                            .flat_map(|w| &w.nodes)
                            .any(|s| s.node == *node && s.state == NodeStageState::Staging)
                })
            })
            .cloned()
            .collect()
    }
}
