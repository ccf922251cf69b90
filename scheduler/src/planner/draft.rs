//! A plan in progress that can let allocations go as well as place instances,
//! shared by preemption and defragmentation.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

use aigrid_api::{AllocId, JobId};

use super::*;

/// A plan in progress over a snapshot, for planners that do more than place:
/// what is taken now, which live allocations were let go (evicted, or moved
/// away), and per job and group the instances added and let go, so that spread
/// counts follow both. Preemption and defragmentation try a change on a clone
/// and keep or drop it whole; the snapshot itself is never touched, and a clone
/// copies only the nodes the draft changed.
#[derive(Debug, Clone)]
pub(crate) struct Draft<'s> {
    pub(super) snapshot: &'s PlanSnapshot,
    pub(super) taken: Taken<'s>,
    pub(super) let_go: HashSet<AllocId>,
    /// Per job and group: a node and +1 for an instance added there, -1 for one
    /// let go.
    pub(super) changes: HashMap<(JobId, String), Vec<(usize, i64)>>,
}

impl<'s> Draft<'s> {
    pub(crate) fn new(snapshot: &'s PlanSnapshot) -> Self {
        Self {
            snapshot,
            taken: Taken::new(&snapshot.usage, 0),
            let_go: HashSet::new(),
            changes: HashMap::new(),
        }
    }

    pub(crate) fn snapshot(&self) -> &'s PlanSnapshot {
        self.snapshot
    }

    /// The live allocations on node `n` not let go yet, by id.
    pub(crate) fn live_on(&self, n: usize) -> impl Iterator<Item = &'s LiveAlloc> + '_ {
        self.snapshot.held[n]
            .iter()
            .filter(|a| !self.let_go.contains(&a.id))
    }

    /// Lets a live allocation on node `n` go: what it holds is free from now on.
    pub(crate) fn let_go(&mut self, n: usize, alloc: &LiveAlloc) {
        if self.let_go.insert(alloc.id.clone()) {
            self.taken.node_mut(n).let_go(alloc);
            self.changes
                .entry((alloc.job_id.clone(), alloc.group.clone()))
                .or_default()
                .push((n, -1));
        }
    }

    /// Where an instance of `group` of job `job_id` goes as things stand, by the
    /// planner's ranking, never on node `exclude`; with the GPUs it would get.
    pub(crate) fn best(
        &self,
        group: &GroupPlanner<'_>,
        job_id: &JobId,
        exclude: Option<usize>,
    ) -> Option<(usize, Vec<usize>)> {
        let changes = self
            .changes
            .get(&(job_id.clone(), group.group.name.clone()))
            .map_or(&[][..], Vec::as_slice);
        let counts = group.spread_counts(self.snapshot, job_id, changes);
        group.best(self.snapshot, &self.taken, &counts, exclude)
    }

    /// What is taken on node `n` were `let_go` let go, as a one-node usage.
    pub(super) fn without(&self, n: usize, let_go: &[&LiveAlloc]) -> Usage {
        let mut used = Usage::copy_of(self.taken.node(n));
        for alloc in let_go {
            used.node_mut(0).let_go(alloc);
        }
        used
    }

    /// The GPUs an instance of `group` would get on node `n` were `let_go` let
    /// go, if it would fit then.
    pub(crate) fn fits_without(
        &self,
        group: &GroupPlanner<'_>,
        n: usize,
        let_go: &[&LiveAlloc],
    ) -> Option<Vec<usize>> {
        group.fit(self.snapshot, n, self.without(n, let_go).node(0))
    }

    /// Whether an instance of `group` fits on some node as things stand.
    pub(crate) fn fits_somewhere(&self, group: &GroupPlanner<'_>) -> bool {
        group
            .candidates()
            .any(|n| group.check(self.snapshot, n, self.taken.node(n)).is_ok())
    }

    /// How many more suitable whole GPUs an instance of `group` needs on node
    /// `n` than are free there: a floor on what making room there must free. 0
    /// for work without GPUs or with a slice.
    pub(crate) fn gpus_missing(&self, group: &GroupPlanner<'_>, n: usize) -> usize {
        let Some(gpus) = group.need.gpus.as_ref().filter(|g| g.slice.is_none()) else {
            return 0;
        };
        let suits = &group.suits[self.snapshot.shape(n).layout];
        let free = common(self.taken.node(n).free(), suits);
        gpus.count.saturating_sub(free)
    }

    /// Of `let_go`, the ones an instance of `group` needs gone to fit on node
    /// `n`: each is given back in turn while the instance still fits without it,
    /// the smallest first (by [`PlanSnapshot::share`]), then the higher priority,
    /// then the later id, so that what stays let go is few, small and of low
    /// priority, and none of it superfluous. `None` when even letting all of
    /// `let_go` go makes no room.
    pub(crate) fn make_room(
        &self,
        group: &GroupPlanner<'_>,
        n: usize,
        mut let_go: Vec<&'s LiveAlloc>,
    ) -> Option<Vec<&'s LiveAlloc>> {
        let mut used = self.without(n, &let_go);
        group.check(self.snapshot, n, used.node(0)).ok()?;
        let_go.sort_by_cached_key(|a| {
            let a: &'s LiveAlloc = a;
            (
                self.snapshot.share(n, a),
                Reverse(a.info.priority),
                Reverse(&a.id),
            )
        });
        let mut needed = Vec::new();
        for alloc in let_go {
            used.node_mut(0).hold(alloc);
            if group.check(self.snapshot, n, used.node(0)).is_err() {
                used.node_mut(0).let_go(alloc);
                needed.push(alloc);
            }
        }
        Some(needed)
    }

    /// Places instance `index` of `group` of job `job_id` on node `n`, with the
    /// GPUs at positions `gpus` (as [`Draft::best`] or [`Draft::fits_without`]
    /// gave them).
    pub(crate) fn place(
        &mut self,
        group: &GroupPlanner<'_>,
        job_id: &JobId,
        index: u32,
        n: usize,
        gpus: &[usize],
    ) -> Placement {
        group.take(self.snapshot, n, &mut self.taken, gpus);
        self.changes
            .entry((job_id.clone(), group.group.name.clone()))
            .or_default()
            .push((n, 1));
        group.placement(self.snapshot, n, index, gpus)
    }
}

impl AsRef<Self> for Draft<'_> {
    fn as_ref(&self) -> &Self {
        self
    }
}

/// Places a request's instances one at a time with `place_one`, which sees and
/// changes `state` (a [`Draft`] and whatever else a planner keeps) and answers
/// whether the instance found a node. A group stops at its first instance that
/// does not; a gang then gets back the state it started from. Answers the groups
/// left short, explained against the state at the failure, as [`plan`] does.
pub(crate) fn place_one_by_one<'s, S: Clone + AsRef<Draft<'s>>>(
    snapshot: &'s PlanSnapshot,
    request: &PlanRequest,
    state: &mut S,
    mut place_one: impl FnMut(&mut S, &GroupPlanner<'_>, u32) -> bool,
) -> Vec<UnplacedGroup> {
    let mut unplaced = Vec::new();
    for demand in &request.groups {
        if demand.indices.is_empty() {
            continue;
        }
        let group = GroupPlanner::new(snapshot, &demand.group);
        let before = demand.group.gang.then(|| state.clone());
        let fitted = demand
            .indices
            .iter()
            .take_while(|&&index| place_one(state, &group, index))
            .count();
        if fitted == demand.indices.len() {
            continue;
        }
        let explanation = group.explain(snapshot, &state.as_ref().taken);
        let gang_fitted = before.map(|before| {
            *state = before;
            u32::try_from(fitted).unwrap_or(u32::MAX)
        });
        let missing = match gang_fitted {
            Some(_) => demand.indices.len(),
            None => demand.indices.len() - fitted,
        };
        unplaced.push(UnplacedGroup {
            group: demand.group.name.clone(),
            missing: u32::try_from(missing).unwrap_or(u32::MAX),
            gang_fitted,
            explanation,
        });
    }
    unplaced
}
