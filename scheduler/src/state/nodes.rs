//! Nodes: registration (keys and join tokens), heartbeats and liveness, status
//! changes and drains, revocation, and the views agents and operators read.

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::{
    Allocation, AllocationReport, Assignment, DrainSpec, EvalTrigger, GpuHealth, Heartbeat,
    LogTail, MemoryMib, MilliCpu, Node, NodeAssignments, NodeId, NodePublicKey, NodeRegistration,
    NodeStatus, NodeUsage, Timestamp, ValidationError,
};

use super::*;

impl ClusterState {
    /// The node with this id, with what its allocations hold.
    pub fn node(&self, id: &NodeId) -> Option<Node> {
        self.tables.nodes.get(id).map(|n| self.node_view(n))
    }

    /// A node's status, without building its view; `None` for an unknown node.
    pub fn node_status(&self, id: &NodeId) -> Option<NodeStatus> {
        self.tables.nodes.get(id).map(|n| n.status)
    }

    /// A node's key and whether it was revoked; `None` for an unknown node.
    pub fn node_key(&self, id: &NodeId) -> Option<(Option<NodePublicKey>, bool)> {
        self.tables.nodes.get(id).map(|n| (n.public_key, n.revoked))
    }

    /// What `node`'s agent must run: every allocation on it that is not finished
    /// (wanted, or asked to stop and not yet confirmed stopped), each with its task
    /// when it is of the job's current version.
    pub fn assignments(&self, node_id: &NodeId) -> Option<NodeAssignments> {
        self.tables.nodes.get(node_id)?;
        let allocations = self
            .index
            .by_node
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tables.allocations.get(id))
            .filter(|a| assigned(a).0)
            .map(|a| Assignment {
                allocation: a.clone(),
                task: self
                    .tables
                    .jobs
                    .get(&a.job_id)
                    .filter(|j| j.version == a.job_version)
                    .and_then(|j| j.spec.group(&a.group))
                    .map(|g| g.task.clone()),
            })
            .collect();
        Some(NodeAssignments {
            index: self.node_assignment_index(node_id),
            allocations,
            models: self.model_assignments(node_id),
        })
    }

    /// The log index of the last change to `node`'s assignments.
    pub fn node_assignment_index(&self, node_id: &NodeId) -> u64 {
        self.tables.node_index.get(node_id).copied().unwrap_or(0)
    }

    /// What of `hb` would change the state: GPU health that differs from what is
    /// recorded, reports that say something new about allocations on the node, and
    /// whether the node is down (a heartbeat brings it back). `None` when the
    /// heartbeat only says the node is alive, so it need not be committed.
    pub fn heartbeat_changes(&self, node_id: &NodeId, hb: &Heartbeat) -> Option<Heartbeat> {
        let node = self.tables.nodes.get(node_id)?;
        let gpus: Vec<GpuHealth> = hb
            .gpus
            .iter()
            .filter(|h| {
                node.resources.gpus.iter().any(|g| {
                    g.uuid == h.uuid
                        && (g.healthy != h.healthy || (!h.healthy && g.health_reason != h.reason))
                })
            })
            .cloned()
            .collect();
        // An endpoint that is not where the servers reach the allocation is
        // dropped here, so it neither reaches the log nor counts as news.
        let allocations: Vec<AllocationReport> = hb
            .allocations
            .iter()
            .cloned()
            .map(|r| self.kept_report(r))
            .filter(|r| {
                self.tables.allocations.get(&r.id).is_some_and(|a| {
                    &a.node_id == node_id && !a.state.is_terminal() && r.differs_from(a)
                })
            })
            .collect();
        let down = node.status == NodeStatus::Down;
        let models = self.model_reports_news(node_id, &hb.models);
        if gpus.is_empty()
            && allocations.is_empty()
            && hb.logs.is_empty()
            && models.is_empty()
            && !down
        {
            return None;
        }
        Some(Heartbeat {
            gpus,
            allocations,
            telemetry: None,
            logs: hb.logs.clone(),
            models,
        })
    }

    /// Every node, ordered by id, with what its allocations hold.
    pub fn nodes(&self) -> Vec<Node> {
        self.tables
            .nodes
            .values()
            .map(|n| self.node_view(n))
            .collect()
    }

    fn node_view(&self, node: &Node) -> Node {
        let held = self.index.held.get(&node.id);
        let gpus = &node.resources.gpus;
        let used = held.map_or(0, |h| {
            gpus.iter().filter(|g| h.gpus.contains_key(&g.uuid)).count()
        });
        let free = gpus
            .iter()
            .filter(|g| g.healthy && !held.is_some_and(|h| h.gpus.contains_key(&g.uuid)))
            .count();
        let mut view = node.clone();
        view.usage = Some(NodeUsage {
            cpu_millis: MilliCpu::new(held.map_or(0, |h| h.cpu)),
            memory_mib: MemoryMib::new(held.map_or(0, |h| h.memory)),
            gpus_used: u32::try_from(used).unwrap_or(u32::MAX),
            gpus_free: u32::try_from(free).unwrap_or(u32::MAX),
            allocations: held.map_or(0, |h| h.allocations),
        });
        view
    }

    /// Nodes that are not down and were last heard from before `deadline`.
    pub fn silent_nodes(&self, deadline: Timestamp) -> Vec<NodeId> {
        self.tables
            .nodes
            .values()
            .filter(|n| n.status != NodeStatus::Down && n.last_seen < deadline)
            .map(|n| n.id.clone())
            .collect()
    }

    /// Draining nodes with their drain and the allocations still on them.
    pub fn drains(&self) -> Vec<(NodeId, DrainSpec, Vec<Allocation>)> {
        self.tables
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Draining)
            .map(|n| {
                (
                    n.id.clone(),
                    n.drain.unwrap_or_default(),
                    self.node_allocations(&n.id),
                )
            })
            .collect()
    }

    /// Checks that a registration may apply: a known node keeps its key; a new
    /// node, or one whose key was revoked, presents a valid join token and a new key.
    pub fn check_registration(
        &self,
        reg: &NodeRegistration,
        token: Option<&TokenUse>,
        at: Timestamp,
    ) -> Result<Option<String>, StateError> {
        reg.validate()?;
        let unauthorized = |m: String| Err(StateError::Unauthorized(m));
        if let Some(node) = self.tables.nodes.get(&reg.id) {
            if node.revoked {
                if reg.public_key.is_none() || reg.public_key == node.public_key {
                    return unauthorized(format!(
                        "the key of node `{}` was revoked; join again with a new key and a join token",
                        reg.id
                    ));
                }
            } else if node.public_key.is_some() {
                if reg.public_key != node.public_key {
                    return unauthorized(format!(
                        "node `{}` is registered with another key",
                        reg.id
                    ));
                }
                return Ok(None);
            }
        }
        let Some(token) = token else {
            if reg.public_key.is_none() {
                // A node without a key is one the operator registers by hand;
                // only the server itself proposes that.
                return Ok(None);
            }
            return unauthorized("a new node must present a join token".to_owned());
        };
        let Some(record) = self.tables.join_tokens.get(&token.id) else {
            return unauthorized(format!("unknown join token `{}`", token.id));
        };
        if record.secret_hash != token.secret_hash {
            return unauthorized(format!("join token `{}` does not match", token.id));
        }
        if at >= record.info.expires_at {
            return unauthorized(format!("join token `{}` has expired", token.id));
        }
        if record
            .info
            .max_uses
            .is_some_and(|max| record.info.uses >= max)
        {
            return unauthorized(format!("join token `{}` is used up", token.id));
        }
        Ok(Some(token.id.clone()))
    }

    pub(super) fn register_node(
        &mut self,
        index: u64,
        reg: NodeRegistration,
        token: Option<TokenUse>,
        address: Option<std::net::IpAddr>,
        at: Timestamp,
    ) -> CommandOutput {
        if let Some(used) = self.check_registration(&reg, token.as_ref(), at)? {
            if let Some(record) = self.tables.join_tokens.get_mut(&used) {
                record.info.uses += 1;
            }
        }
        let id = reg.id.clone();
        self.capacity_epoch += 1;
        self.touch_node(&id);
        let created = match self.tables.nodes.get_mut(&id) {
            Some(node) => {
                node.name = reg.name;
                node.attributes = reg.attributes;
                node.resources = reg.resources;
                node.ports = reg.ports.unwrap_or_default();
                node.data_port = reg.data_port;
                node.data_tls = reg.data_tls;
                if address.is_some() {
                    node.address = address;
                }
                if reg.public_key.is_some() {
                    node.public_key = reg.public_key;
                }
                node.protections = reg.protections;
                node.offer = reg.offer;
                node.revoked = false;
                if node.status == NodeStatus::Down {
                    node.status = Self::back_up(node);
                }
                node.last_seen = node.last_seen.max(at);
                false
            }
            None => {
                self.tables.nodes.insert(
                    id.clone(),
                    Node {
                        id: id.clone(),
                        name: reg.name,
                        attributes: reg.attributes,
                        resources: reg.resources,
                        status: NodeStatus::Ready,
                        registered_at: at,
                        last_seen: at,
                        drain: None,
                        usage: None,
                        public_key: reg.public_key,
                        revoked: false,
                        address,
                        ports: reg.ports.unwrap_or_default(),
                        data_port: reg.data_port,
                        data_tls: reg.data_tls,
                        telemetry: None,
                        protections: reg.protections,
                        offer: reg.offer,
                    },
                );
                true
            }
        };
        let usable: BTreeSet<String> = self.tables.nodes[&id]
            .resources
            .gpus
            .iter()
            .filter(|g| g.healthy)
            .map(|g| g.uuid.clone())
            .collect();
        let displaced =
            self.lose_allocations(&id, at, |a| a.gpus.iter().any(|g| !usable.contains(g)));
        let eval_ids = self.node_update_evals(index, displaced, EvalTrigger::NodeUpdate, at);
        Ok(Applied::NodeRegistered {
            id,
            created,
            eval_ids,
        })
    }

    /// Checks a heartbeat as [`Command::NodeHeartbeat`] will: the node exists, the
    /// GPUs are its own, the allocations reported are on it. The API calls it
    /// first so a bad heartbeat is refused without a log entry.
    pub fn check_heartbeat(
        &self,
        node_id: &NodeId,
        gpus: &[GpuHealth],
        reports: &[AllocationReport],
    ) -> Result<(), StateError> {
        let node = self
            .tables
            .nodes
            .get(node_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Node, node_id))?;
        for (i, health) in gpus.iter().enumerate() {
            if !node.resources.gpus.iter().any(|g| g.uuid == health.uuid) {
                return Err(ValidationError::new(
                    format!("gpus[{i}].uuid"),
                    format!("node `{node_id}` has no GPU `{}`", health.uuid),
                )
                .into());
            }
        }
        self.check_reports(node_id, reports)
    }

    /// The status a node returns to when it is heard from after being down.
    fn back_up(node: &Node) -> NodeStatus {
        if node.drain.is_some() {
            NodeStatus::Draining
        } else {
            NodeStatus::Ready
        }
    }

    pub(super) fn heartbeat(
        &mut self,
        index: u64,
        node_id: NodeId,
        gpus: Vec<GpuHealth>,
        reports: Vec<AllocationReport>,
        logs: Vec<LogTail>,
        at: Timestamp,
    ) -> CommandOutput {
        self.check_heartbeat(&node_id, &gpus, &reports)?;
        if self.tables.nodes[&node_id].revoked {
            return Err(StateError::Unauthorized(format!(
                "the key of node `{node_id}` was revoked"
            )));
        }
        for tail in logs {
            if self
                .tables
                .allocations
                .get(&tail.id)
                .is_some_and(|a| a.node_id == node_id)
            {
                self.tables.logs.insert(
                    tail.id,
                    LogRecord {
                        stdout: tail.stdout,
                        stderr: tail.stderr,
                        updated_at: at,
                    },
                );
            }
        }

        let node = self.tables.nodes.get_mut(&node_id).expect("checked above");
        node.last_seen = node.last_seen.max(at);
        let mut changed = node.status == NodeStatus::Down;
        if changed {
            node.status = Self::back_up(node);
        }
        let mut failing = BTreeSet::new();
        for health in gpus {
            let device = node
                .resources
                .gpus
                .iter_mut()
                .find(|g| g.uuid == health.uuid)
                .expect("checked above");
            if !health.healthy && device.healthy {
                failing.insert(health.uuid.clone());
            }
            changed |= device.healthy != health.healthy;
            device.healthy = health.healthy;
            device.health_reason = if health.healthy { None } else { health.reason };
        }
        let status = node.status;
        if changed {
            self.capacity_epoch += 1;
        }
        let mut displaced =
            self.lose_allocations(&node_id, at, |a| a.gpus.iter().any(|g| failing.contains(g)));
        let (_, failed, rolling) = self.apply_reports(reports, at);
        let mut eval_ids = self.node_update_evals(
            index,
            std::mem::take(&mut displaced),
            EvalTrigger::NodeUpdate,
            at,
        );
        eval_ids.extend(self.node_update_evals(index, failed, EvalTrigger::AllocFailed, at));
        eval_ids.extend(self.node_update_evals(index, rolling, EvalTrigger::JobUpdate, at));
        Ok(Applied::NodeUpdated {
            id: node_id,
            status,
            eval_ids,
        })
    }

    pub(super) fn nodes_seen(&mut self, nodes: Vec<NodeId>, at: Timestamp) -> Applied {
        let mut updated = 0;
        for id in nodes {
            if let Some(node) = self.tables.nodes.get_mut(&id) {
                if node.status != NodeStatus::Down && !node.revoked && node.last_seen < at {
                    node.last_seen = at;
                    updated += 1;
                }
            }
        }
        Applied::NodesSeen { updated }
    }

    pub(super) fn revoke_node(
        &mut self,
        index: u64,
        node_id: NodeId,
        at: Timestamp,
    ) -> CommandOutput {
        let node = self
            .tables
            .nodes
            .get_mut(&node_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Node, &node_id))?;
        node.revoked = true;
        let was = node.status;
        node.status = NodeStatus::Down;
        if was != NodeStatus::Down {
            self.capacity_epoch += 1;
        }
        let displaced = self.lose_allocations(&node_id, at, |_| true);
        let eval_ids = self.node_update_evals(index, displaced, EvalTrigger::NodeUpdate, at);
        Ok(Applied::NodeUpdated {
            id: node_id,
            status: NodeStatus::Down,
            eval_ids,
        })
    }

    pub(super) fn set_node_status(
        &mut self,
        index: u64,
        node_id: NodeId,
        status: NodeStatus,
        drain: Option<DrainSpec>,
        at: Timestamp,
    ) -> CommandOutput {
        if let Some(drain) = &drain {
            drain.validate()?;
        }
        let node = self
            .tables
            .nodes
            .get_mut(&node_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Node, &node_id))?;
        match status {
            NodeStatus::Ready => node.drain = None,
            NodeStatus::Draining => node.drain = Some(drain.unwrap_or_default()),
            NodeStatus::Down => {}
        }
        if node.status == status {
            return Ok(Applied::NodeUpdated {
                id: node_id,
                status,
                eval_ids: Vec::new(),
            });
        }
        node.status = status;
        self.capacity_epoch += 1;
        // A draining node's allocations are migrated by the leader at the drain's
        // pace, not all at once, so only a node going down displaces anything here.
        let displaced = match status {
            NodeStatus::Down => self.lose_allocations(&node_id, at, |_| true),
            NodeStatus::Ready | NodeStatus::Draining => BTreeMap::new(),
        };
        let eval_ids = self.node_update_evals(index, displaced, EvalTrigger::NodeUpdate, at);
        Ok(Applied::NodeUpdated {
            id: node_id,
            status,
            eval_ids,
        })
    }
}
