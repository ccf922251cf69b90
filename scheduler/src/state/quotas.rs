//! Circles' quotas: set by admins, read by the planner's fair share
//! ([`crate::planner::fair`]) and shown as a circle's usage.

use std::collections::BTreeMap;

use aigrid_api::{CircleUsage, Quota, Timestamp};

use super::{Applied, ClusterState, CommandOutput, ObjectKind, StateError};
use crate::planner::fair::Fairness;

impl ClusterState {
    /// Sets `circle`'s quota, or removes it (`None`), and asks the planner to look
    /// again at blocked work: a quota raised or gone may let it in.
    pub(super) fn set_quota(
        &mut self,
        circle: &str,
        quota: Option<Quota>,
        _at: Timestamp,
    ) -> CommandOutput {
        aigrid_api::spec::check_name("circle", circle)?;
        if let Some(q) = &quota {
            q.validate()?;
        }
        match quota {
            Some(q) => {
                self.tables.quotas.insert(circle.to_owned(), q);
            }
            None => {
                self.tables
                    .quotas
                    .remove(circle)
                    .ok_or_else(|| StateError::not_found(ObjectKind::Quota, circle))?;
            }
        }
        self.capacity_epoch += 1;
        Ok(Applied::QuotaSet {
            circle: circle.to_owned(),
        })
    }

    /// Whether the cluster knows `circle`: it has members, governance, a quota or
    /// jobs.
    pub fn circle_known(&self, circle: &str) -> bool {
        self.circle(circle).is_some()
            || self.governing(circle).is_some()
            || self.tables.quotas.contains_key(circle)
            || self.circle_jobs(circle).next().is_some()
    }

    /// Every circle's quota.
    pub fn quotas(&self) -> &BTreeMap<String, Quota> {
        &self.tables.quotas
    }

    /// Quotas, nodes and every live allocation counted by circle, borrowed work
    /// found: what a scheduling pass and a circle's usage start from.
    pub fn fairness(&self) -> Fairness {
        let mut fair = Fairness::new(self.tables.quotas.clone(), self.tables.nodes.values());
        for alloc in self.tables.allocations.values().filter(|a| a.is_live()) {
            let (circle, priority) = self
                .tables
                .jobs
                .get(&alloc.job_id)
                .map(|j| (j.spec.circle.clone().unwrap_or_default(), j.spec.priority))
                .unwrap_or_default();
            fair.hold(alloc, &circle, priority);
        }
        fair.find_borrowed();
        fair
    }

    /// What `circle` is guaranteed, holds, borrows, its dominant share, and how
    /// many of its instances wait.
    pub fn circle_usage(&self, circle: &str) -> CircleUsage {
        let fair = self.fairness();
        let quota = self.tables.quotas.get(circle).cloned();
        let keys: Vec<&String> = quota.iter().flat_map(|q| q.gpus.keys()).collect();
        let pending = self
            .circle_jobs(circle)
            .flat_map(|j| j.unplaced.iter().map(|u| u.count))
            .sum();
        CircleUsage {
            circle: circle.to_owned(),
            used: fair.used(circle).to_held(&keys),
            borrowed: fair.borrowed_by(circle).to_held(&keys),
            share: fair.share(circle),
            quota,
            pending,
        }
    }
}
