//! The invariant checker: the rules every reachable state obeys, run after
//! every apply in debug builds, on every restored snapshot, and by tests.

use std::collections::BTreeMap;

use aigrid_api::{AllocId, DesiredState, NodeId};

use super::*;

impl ClusterState {
    /// Checks the rules every reachable state obeys. Run after every apply in debug
    /// builds, on every restored snapshot, and by tests after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        let t = &self.tables;
        if t.format != SNAPSHOT_FORMAT {
            return Err(format!(
                "snapshot format {} is not {SNAPSHOT_FORMAT}",
                t.format
            ));
        }
        if t.eval_limit == 0 || t.evaluations.len() > t.eval_limit {
            return Err(format!(
                "{} evaluations kept with a limit of {}",
                t.evaluations.len(),
                t.eval_limit
            ));
        }
        t.models.check_invariants()?;
        t.access.check()?;
        t.chain.check()?;
        for circle in t.chain.governed_names() {
            let members = self.governance(circle).map(|g| g.governance.members);
            let roles: Vec<_> = members
                .unwrap_or_default()
                .into_iter()
                .map(|m| (m.identity, Some(m.role)))
                .collect();
            if roles
                .iter()
                .any(|(id, role)| self.role_in(id, circle) != *role)
                || self.circle(circle).map_or(0, |c| c.members.len()) != roles.len()
            {
                return Err(format!(
                    "governed circle `{circle}`: roles differ from its members"
                ));
            }
        }

        let mut names = super::Hashed::default();
        for (id, job) in &t.jobs {
            if id != &job.id {
                return Err(format!("job keyed `{id}` has id `{}`", job.id));
            }
            if job.version == 0 {
                return Err(format!("job `{id}` has version 0"));
            }
            if let Some(other) = names.insert(job.spec.name.clone(), id.clone()) {
                return Err(format!(
                    "live jobs `{other}` and `{id}` share the name `{}`",
                    job.spec.name
                ));
            }
        }
        if names != self.job_names {
            return Err("the job name index disagrees with the jobs".to_owned());
        }
        if t.model_job_names() != self.model_jobs {
            return Err("the model-server job index disagrees with the jobs".to_owned());
        }
        if t.deployed_job_ids() != self.deployed_jobs {
            return Err("the deployed job index disagrees with the jobs".to_owned());
        }

        for (id, node) in &t.nodes {
            if id != &node.id {
                return Err(format!("node keyed `{id}` has id `{}`", node.id));
            }
            if node.usage.is_some() {
                return Err(format!("node `{id}` stores its usage"));
            }
        }

        let mut gpu_holders: BTreeMap<(&NodeId, &str), &AllocId> = BTreeMap::new();
        let mut port_holders: BTreeMap<(&NodeId, u16), &AllocId> = BTreeMap::new();
        for (id, alloc) in &t.allocations {
            if id != &alloc.id {
                return Err(format!("allocation keyed `{id}` has id `{}`", alloc.id));
            }
            let Some(node) = t.nodes.get(&alloc.node_id) else {
                return Err(format!(
                    "allocation `{id}` is on unknown node `{}`",
                    alloc.node_id
                ));
            };
            if alloc.desired == DesiredState::Run && !t.jobs.contains_key(&alloc.job_id) {
                return Err(format!(
                    "allocation `{id}` should run but job `{}` does not exist",
                    alloc.job_id
                ));
            }
            if alloc.desired == DesiredState::Stop && alloc.state.is_terminal() {
                return Err(format!(
                    "allocation `{id}` is stopped and finished but was kept"
                ));
            }
            if let (Some(port), false) = (alloc.port, alloc.state.is_terminal()) {
                if let Some(other) = port_holders.insert((&alloc.node_id, port), id) {
                    return Err(format!(
                        "allocations `{other}` and `{id}` on node `{}` share port {port}",
                        alloc.node_id
                    ));
                }
            }
            if !alloc.is_live() {
                continue;
            }
            for gpu in &alloc.gpus {
                let Some(device) = node.resources.gpus.iter().find(|g| &g.uuid == gpu) else {
                    return Err(format!(
                        "allocation `{id}` holds GPU `{gpu}` that node `{}` lacks",
                        node.id
                    ));
                };
                if !device.healthy {
                    return Err(format!("allocation `{id}` holds unhealthy GPU `{gpu}`"));
                }
                if slice_of(alloc).is_some() {
                    continue;
                }
                if let Some(other) = gpu_holders.insert((&alloc.node_id, gpu), id) {
                    return Err(format!(
                        "allocations `{other}` and `{id}` both hold GPU `{gpu}`"
                    ));
                }
            }
        }

        let index = AllocIndex::from_allocations(t.allocations.values());
        if index != self.index {
            return Err("the allocation index disagrees with the allocations".to_owned());
        }
        for (node_id, held) in &index.held {
            let node = &t.nodes[node_id];
            for (uuid, gpu) in &held.gpus {
                let memory = node
                    .resources
                    .gpus
                    .iter()
                    .find(|g| &g.uuid == uuid)
                    .map_or(0, |g| g.memory_mib.get());
                if gpu.whole.is_some() && gpu.slices > 0 {
                    return Err(format!("GPU `{uuid}` is held whole and sliced at once"));
                }
                if gpu.sliced > memory {
                    return Err(format!(
                        "GPU `{uuid}` has {} MiB sliced out of {memory}",
                        gpu.sliced
                    ));
                }
            }
        }

        if self.eval_order.len() != t.evaluations.len() {
            return Err("the evaluation order index disagrees with the evaluations".to_owned());
        }
        for (seq, id) in &self.eval_order {
            match t.evaluations.get(id) {
                Some(record) if record.seq == *seq && &record.eval.id == id => {}
                _ => return Err(format!("evaluation order entry {seq} -> `{id}` is stale")),
            }
            if *seq >= t.next_eval_seq {
                return Err(format!(
                    "evaluation `{id}` has sequence {seq} from the future"
                ));
            }
        }
        let indexed: usize = self.eval_status.values().map(BTreeSet::len).sum();
        if indexed != t.evaluations.len() {
            return Err("the evaluation status index disagrees with the evaluations".to_owned());
        }
        for (status, seqs) in &self.eval_status {
            for seq in seqs {
                let record = self
                    .eval_order
                    .get(seq)
                    .and_then(|id| t.evaluations.get(id));
                if record.is_none_or(|r| r.eval.status != *status) {
                    return Err(format!(
                        "the evaluation status index lists sequence {seq} as {status}"
                    ));
                }
            }
        }
        Ok(())
    }
}
