//! Defragmentation: room for a job's instances that fit nowhere because free
//! capacity is scattered (four free GPUs on each of two nodes, an instance that
//! wants eight on one), made by migrating live allocations to other nodes instead
//! of evicting them. Pure like the planner: the same snapshot, request, priority,
//! budgets and specs always give the same answer.
//!
//! Instances are placed one at a time, in request order, each seeing the
//! migrations and placements before it. One that fits somewhere as things stand
//! goes where [`crate::planner::plan`] would put it. Otherwise every node passing
//! the group's status and constraint checks is a possible target:
//!
//! 1. **Who may move.** Live allocations of other jobs whose group is movable,
//!    whose job's priority is at most the requester's, whose spec the caller
//!    provides, and whose group's disruption budget is not spent (moves made
//!    earlier in the same call count against it).
//! 2. **The fewest moves.** Within each group's budget the largest allocations are
//!    taken; then each is given back, smallest first, higher priorities first
//!    among equals, while the instance still fits without it.
//! 3. **Somewhere to go.** The moves are placed, largest first, by the planner's
//!    ordinary rules for their own group (constraints, spread, GPUs), never back
//!    on the target. If one fits nowhere, the target is asked again without it.
//!
//! The target needing the fewest moves wins, then the one moving the lowest
//! priority, then the earliest node id. A gang is placed whole, with its moves, or
//! neither happens.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use aigrid_api::{AllocId, JobId, NodeId, TaskGroup};

use crate::planner::{
    place_one_by_one, Draft, GroupPlanner, LiveAlloc, Placement, PlanRequest, PlanSnapshot,
    UnplacedGroup,
};

/// What defragmentation would do: stop each migrated allocation, start its
/// replacement, and commit the placements, in one change. It answers for the
/// whole request, as a [`crate::planner::Plan`] does, and replaces the plan's
/// answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Defrag {
    /// Live allocations to move, in the order they were chosen.
    pub migrations: Vec<Migration>,
    /// Instances of the request placed, in placement order.
    pub placements: Vec<Placement>,
    /// Groups with instances left unplaced even so, and why as things are after
    /// the migrations.
    pub unplaced: Vec<UnplacedGroup>,
}

/// One live allocation moved to another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The allocation to stop.
    pub alloc_id: AllocId,
    /// Its job.
    pub job_id: JobId,
    /// The node it leaves.
    pub from: NodeId,
    /// Its replacement: the same group and index on another node, reserving what
    /// the group's spec, as the caller gave it, asks for.
    pub to: Placement,
}

/// Places `request` for a job of `priority` on `snapshot`, migrating movable
/// allocations where an instance fits nowhere as things are. `budget(job, group)`
/// says how many more instances of that group may be disrupted now; `groups(job,
/// group)` gives the spec a moved instance is placed by (`None`: never moved). See
/// the module documentation for the rules. `None` when moving places nothing that
/// [`crate::planner::plan`] could not place as well.
pub fn plan_defrag<'g>(
    snapshot: &PlanSnapshot,
    request: &PlanRequest,
    priority: u32,
    budget: impl Fn(&JobId, &str) -> u32,
    groups: impl Fn(&JobId, &str) -> Option<&'g TaskGroup>,
) -> Option<Defrag> {
    let mut movers = Movers {
        job_id: &request.job_id,
        priority,
        budget: &budget,
        groups: &groups,
        planners: HashMap::new(),
        fits_now: HashMap::new(),
    };
    let mut progress = Progress {
        draft: Draft::new(snapshot),
        spent: HashMap::new(),
        out: Defrag::default(),
    };
    let unplaced = place_one_by_one(
        snapshot,
        request,
        &mut progress,
        |progress, group, index| place(progress, &mut movers, group, index),
    );
    let mut out = progress.out;
    out.unplaced = unplaced;
    (!out.migrations.is_empty()).then_some(out)
}

/// Who may move, fixed for one call, and where their groups' instances can go.
struct Movers<'r, 'g, 's> {
    job_id: &'r JobId,
    priority: u32,
    budget: &'r dyn Fn(&JobId, &str) -> u32,
    groups: &'r dyn Fn(&JobId, &str) -> Option<&'g TaskGroup>,
    /// Per job and group: its planner, built once (`None`: no spec, never moved).
    planners: HashMap<(&'s JobId, &'s str), Option<GroupPlanner<'g>>>,
    /// Per job and group, for the instance being placed: whether an instance of
    /// it fits anywhere as things stand. One that does not can move nowhere
    /// whatever the target, since a move never returns to the node it leaves
    /// and clearing a target only takes room elsewhere; knowing it up front
    /// spares trying every target on a full cluster.
    fits_now: HashMap<(&'s JobId, &'s str), bool>,
}

impl<'g, 's> Movers<'_, 'g, 's> {
    /// The planner of `alloc`'s group, if the caller gave its spec.
    fn planner(
        &mut self,
        snapshot: &PlanSnapshot,
        alloc: &'s LiveAlloc,
    ) -> Option<&GroupPlanner<'g>> {
        let groups = self.groups;
        self.planners
            .entry((&alloc.job_id, alloc.group.as_str()))
            .or_insert_with(|| {
                groups(&alloc.job_id, &alloc.group).map(|spec| GroupPlanner::new(snapshot, spec))
            })
            .as_ref()
    }

    /// Whether `alloc` may be moved for the requester, budgets aside.
    fn may_move(&mut self, draft: &Draft<'s>, alloc: &'s LiveAlloc) -> bool {
        if !alloc.info.movable
            || alloc.info.priority > self.priority
            || &alloc.job_id == self.job_id
        {
            return false;
        }
        let key = (&alloc.job_id, alloc.group.as_str());
        if let Some(&fits) = self.fits_now.get(&key) {
            return fits;
        }
        let fits = self
            .planner(draft.snapshot(), alloc)
            .is_some_and(|mover| draft.fits_somewhere(mover));
        self.fits_now.insert(key, fits);
        fits
    }
}

/// Where one call stands: what is taken, budgets spent, what it will answer.
/// Cloned to try a target's moves and kept only if they all land.
#[derive(Clone)]
struct Progress<'s> {
    draft: Draft<'s>,
    /// Moves made per job and group.
    spent: HashMap<(JobId, String), u32>,
    out: Defrag,
}

impl<'s> AsRef<Draft<'s>> for Progress<'s> {
    fn as_ref(&self) -> &Draft<'s> {
        &self.draft
    }
}

/// Ranks a target: how many moves, highest priority moved, node position.
type Cost = (usize, u32, usize);

/// Places one instance, migrating what it must. False when no target can be
/// cleared.
fn place<'s>(
    progress: &mut Progress<'s>,
    movers: &mut Movers<'_, '_, 's>,
    group: &GroupPlanner<'_>,
    index: u32,
) -> bool {
    let job_id = movers.job_id;
    if let Some((n, gpus)) = progress.draft.best(group, job_id, None) {
        let placement = progress.draft.place(group, job_id, index, n, &gpus);
        progress.out.placements.push(placement);
        return true;
    }
    movers.fits_now.clear();
    // Targets cheapest first. Each starts at a floor on its cost that is cheap to
    // know; its moves are worked out only when it comes up, and it goes back in at
    // their real cost, so most targets of a large cluster are never worked out. A
    // target whose moves do not all land elsewhere is asked again without the one
    // that did not.
    let mut stuck: HashMap<usize, HashSet<AllocId>> = HashMap::new();
    let mut moves: HashMap<usize, Vec<&'s LiveAlloc>> = HashMap::new();
    let mut queue: BinaryHeap<Reverse<(Cost, bool)>> = BinaryHeap::new();
    for n in group.candidates() {
        if let Some(floor) = floor(progress, movers, group, n) {
            queue.push(Reverse((floor, false)));
        }
    }
    let none = HashSet::new();
    while let Some(Reverse(((.., n), worked_out))) = queue.pop() {
        if !worked_out {
            if let Some((cost, chosen)) = clear(progress, movers, group, n, &none) {
                queue.push(Reverse((cost, true)));
                moves.insert(n, chosen);
            }
            continue;
        }
        let Some(chosen) = moves.remove(&n) else {
            continue;
        };
        match migrate(progress, movers, group, index, n, &chosen) {
            Ok(next) => {
                *progress = next;
                return true;
            }
            Err(id) => {
                let stuck = stuck.entry(n).or_default();
                stuck.insert(id);
                if let Some((cost, chosen)) = clear(progress, movers, group, n, stuck) {
                    queue.push(Reverse((cost, true)));
                    moves.insert(n, chosen);
                }
            }
        }
    }
    false
}

/// A floor on what clearing node `n` costs: at least enough moves to free the
/// GPUs the instance lacks there, the largest movable allocation at a time, and
/// none of a priority below the lowest that may move. `None` when nothing there
/// may move.
fn floor<'s>(
    progress: &Progress<'s>,
    movers: &mut Movers<'_, '_, 's>,
    group: &GroupPlanner<'_>,
    n: usize,
) -> Option<Cost> {
    let draft = &progress.draft;
    let mut lowest: Option<u32> = None;
    let mut most = 0;
    for alloc in draft.live_on(n) {
        if movers.may_move(draft, alloc) {
            lowest = Some(lowest.map_or(alloc.info.priority, |l| l.min(alloc.info.priority)));
            most = most.max(alloc.gpu_count());
        }
    }
    let lowest = lowest?;
    let missing = draft.gpus_missing(group, n);
    let count = match (missing, most) {
        (0, _) => 1,
        (_, 0) => return None,
        _ => missing.div_ceil(most),
    };
    Some((count, lowest, n))
}

/// The fewest moves that make room for an instance on node `n`, leaving `stuck`
/// where they are, with their cost.
fn clear<'s>(
    progress: &Progress<'s>,
    movers: &mut Movers<'_, '_, 's>,
    group: &GroupPlanner<'_>,
    n: usize,
    stuck: &HashSet<AllocId>,
) -> Option<(Cost, Vec<&'s LiveAlloc>)> {
    let draft = &progress.draft;
    let snapshot = draft.snapshot();
    let mut movable: Vec<(u64, &'s LiveAlloc)> = draft
        .live_on(n)
        .filter(|a| !stuck.contains(&a.id) && movers.may_move(draft, a))
        .map(|a| (snapshot.share(n, a), a))
        .collect();
    if movable.is_empty() {
        return None;
    }
    // Per group, the largest first, as many as its budget has left.
    movable.sort_by(|(sa, a), (sb, b)| {
        (&a.job_id, &a.group, Reverse(sa), &a.id).cmp(&(&b.job_id, &b.group, Reverse(sb), &b.id))
    });
    let mut within: Vec<(u64, &'s LiveAlloc)> = Vec::new();
    for run in movable.chunk_by(|(_, a), (_, b)| a.job_id == b.job_id && a.group == b.group) {
        let first = run[0].1;
        let key = (first.job_id.clone(), first.group.clone());
        let spent = progress.spent.get(&key).copied().unwrap_or(0);
        let left = (movers.budget)(&first.job_id, &first.group).saturating_sub(spent);
        within.extend(run.iter().take(usize::try_from(left).unwrap_or(usize::MAX)));
    }
    let mut chosen = draft.make_room(group, n, within.into_iter().map(|(_, a)| a).collect())?;
    if chosen.is_empty() {
        return None;
    }
    // Largest first: they are the hardest to place elsewhere.
    chosen.sort_by(|a, b| {
        (Reverse(snapshot.share(n, a)), &a.id).cmp(&(Reverse(snapshot.share(n, b)), &b.id))
    });
    let highest = chosen.iter().map(|a| a.info.priority).max().unwrap_or(0);
    Some(((chosen.len(), highest, n), chosen))
}

/// Moves `chosen` off node `n` to wherever their own groups' rules put them and
/// places the instance on `n`: the progress after, or the first move that fit
/// nowhere.
fn migrate<'s>(
    progress: &Progress<'s>,
    movers: &mut Movers<'_, '_, 's>,
    group: &GroupPlanner<'_>,
    index: u32,
    n: usize,
    chosen: &[&'s LiveAlloc],
) -> Result<Progress<'s>, AllocId> {
    let mut next = progress.clone();
    let snapshot = next.draft.snapshot();
    let Some(gpus) = next.draft.fits_without(group, n, chosen) else {
        debug_assert!(false, "the moves were chosen to make room");
        return Err(chosen[0].id.clone());
    };
    for alloc in chosen {
        next.draft.let_go(n, alloc);
    }
    let placement = next.draft.place(group, movers.job_id, index, n, &gpus);
    for &alloc in chosen {
        let Some(mover) = movers.planner(snapshot, alloc) else {
            return Err(alloc.id.clone());
        };
        let Some((to, gpus)) = next.draft.best(mover, &alloc.job_id, Some(n)) else {
            return Err(alloc.id.clone());
        };
        let to = next
            .draft
            .place(mover, &alloc.job_id, alloc.index, to, &gpus);
        next.out.migrations.push(Migration {
            alloc_id: alloc.id.clone(),
            job_id: alloc.job_id.clone(),
            from: snapshot.node_id(n).clone(),
            to,
        });
        *next
            .spent
            .entry((alloc.job_id.clone(), alloc.group.clone()))
            .or_default() += 1;
    }
    next.out.placements.push(placement);
    Ok(next)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use aigrid_api::{Allocation, ConstraintOp, Node};
    use proptest::prelude::*;

    use super::*;
    use crate::planner::testkit::*;
    use crate::planner::{GroupDemand, Plan};

    /// Job `job` of `priority` with one group `g` of one-GPU instances, movable or
    /// not, `budget` of which may be disrupted.
    fn job(job: &str, priority: u32, movable: bool, budget: u32) -> Earlier {
        let mut g = group("g", 8, 1000, 1024, gpus(1, None, None));
        g.movable = movable;
        Earlier {
            job_id: JobId::new(job),
            priority,
            group: g,
            budget,
        }
    }

    /// Instances `first..first + count` of `job`, one GPU each, on GPUs
    /// `first..` of node `node`.
    fn ones(job: &str, node: &str, first: u32, count: u32) -> Vec<Allocation> {
        (first..first + count)
            .map(|i| {
                let gpu = format!("{node}-gpu{i}");
                holding(&format!("{job}-{node}{i}"), job, node, ("g", i), &[&gpu])
            })
            .collect()
    }

    fn defrag(
        nodes: &[Node],
        allocs: &[Allocation],
        jobs: &[Earlier],
        req: &PlanRequest,
        priority: u32,
    ) -> Option<Defrag> {
        let snap = PlanSnapshot::with_jobs(nodes, allocs, |j, _| Earlier::info(jobs, j));
        let find = |j: &JobId, g: &str| jobs.iter().find(|e| &e.job_id == j && e.group.name == g);
        plan_defrag(
            &snap,
            req,
            priority,
            |j, g| find(j, g).map_or(0, |e| e.budget),
            |j, g| find(j, g).map(|e| &e.group),
        )
    }

    fn eights(n: u32) -> PlanRequest {
        request(vec![group("big", n, 1000, 1024, gpus(8, None, None))])
    }

    fn moved(d: &Defrag) -> Vec<(&str, &str, &str)> {
        d.migrations
            .iter()
            .map(|m| (m.alloc_id.as_str(), m.from.as_str(), m.to.node_id.as_str()))
            .collect()
    }

    fn two_half_full_nodes() -> (Vec<Node>, Vec<Allocation>) {
        let nodes = vec![
            node("a", &[], 64000, 65536, &h100s(8)),
            node("b", &[], 64000, 65536, &h100s(8)),
        ];
        let allocs = [ones("x", "a", 0, 4), ones("y", "b", 0, 4)].concat();
        (nodes, allocs)
    }

    #[test]
    fn moves_the_fewest_allocations_to_fit_a_whole_node_instance() {
        let (nodes, allocs) = two_half_full_nodes();
        let jobs = [job("x", 10, true, 4), job("y", 10, true, 4)];
        let d = defrag(&nodes, &allocs, &jobs, &eights(1), 50).unwrap();
        // Four moves either way: the tie goes to the earlier node.
        assert_eq!(
            moved(&d),
            [
                ("x-a0", "a", "b"),
                ("x-a1", "a", "b"),
                ("x-a2", "a", "b"),
                ("x-a3", "a", "b")
            ]
        );
        assert!(d.migrations.iter().all(|m| m.to.group == "g"));
        let indices: Vec<u32> = d.migrations.iter().map(|m| m.to.index).collect();
        assert_eq!(indices, [0, 1, 2, 3]);
        assert_eq!(nodes_of(&d.placements), ["a"]);
        assert_eq!(d.placements[0].gpus.len(), 8);
        assert!(d.unplaced.is_empty());
        // Fewer moves win over the earlier node: two two-GPU instances on b.
        let mut y = job("y", 10, true, 4);
        y.group.resources.gpus = gpus(2, None, None);
        let pairs = [
            holding("y0", "y", "b", ("g", 0), &["b-gpu0", "b-gpu1"]),
            holding("y1", "y", "b", ("g", 1), &["b-gpu2", "b-gpu3"]),
        ];
        let allocs = [ones("x", "a", 0, 4), pairs.to_vec()].concat();
        let d = defrag(&nodes, &allocs, &[jobs[0].clone(), y], &eights(1), 50).unwrap();
        assert_eq!(moved(&d), [("y0", "b", "a"), ("y1", "b", "a")]);
        assert_eq!(nodes_of(&d.placements), ["b"]);
    }

    #[test]
    fn non_movable_work_stays_so_the_other_node_is_emptied() {
        let (nodes, allocs) = two_half_full_nodes();
        let jobs = [job("x", 10, false, 4), job("y", 10, true, 4)];
        let d = defrag(&nodes, &allocs, &jobs, &eights(1), 50).unwrap();
        assert!(moved(&d)
            .iter()
            .all(|(id, from, to)| id.starts_with('y') && (*from, *to) == ("b", "a")));
        assert_eq!(d.migrations.len(), 4);
        assert_eq!(nodes_of(&d.placements), ["b"]);
    }

    #[test]
    fn a_budget_smaller_than_the_moves_needed_moves_nothing() {
        let (nodes, allocs) = two_half_full_nodes();
        let jobs = [job("x", 10, true, 3), job("y", 10, true, 3)];
        assert_eq!(defrag(&nodes, &allocs, &jobs, &eights(1), 50), None);
    }

    #[test]
    fn only_work_of_lower_or_equal_priority_of_other_jobs_moves() {
        let (nodes, allocs) = two_half_full_nodes();
        let higher = [job("x", 60, true, 4), job("y", 60, true, 4)];
        assert_eq!(defrag(&nodes, &allocs, &higher, &eights(1), 50), None);
        let equal = [job("x", 50, true, 4), job("y", 60, true, 4)];
        let d = defrag(&nodes, &allocs, &equal, &eights(1), 50).unwrap();
        assert_eq!(nodes_of(&d.placements), ["a"]);
        // The job's own instances never move for it.
        let own: Vec<Allocation> = allocs
            .iter()
            .cloned()
            .map(|mut a| {
                a.job_id = JobId::new("job");
                a
            })
            .collect();
        let mine = [job("job", 10, true, 8)];
        assert_eq!(defrag(&nodes, &own, &mine, &eights(1), 50), None);
    }

    #[test]
    fn moves_obey_their_own_constraints_and_a_blocked_target_gives_way() {
        let nodes = [
            node("a", &[("pool", "x")], 64000, 65536, &h100s(8)),
            node("b", &[("pool", "y")], 64000, 65536, &h100s(8)),
        ];
        let allocs = [ones("x", "a", 0, 4), ones("y", "b", 0, 4)].concat();
        let mut x = job("x", 10, true, 4);
        x.group.constraints = vec![rule("pool", ConstraintOp::Eq, &["x"])];
        // x's instances can go nowhere but a, so b is cleared instead.
        let d = defrag(&nodes, &allocs, &[x, job("y", 10, true, 4)], &eights(1), 50).unwrap();
        assert!(moved(&d)
            .iter()
            .all(|(id, from, to)| id.starts_with('y') && (*from, *to) == ("b", "a")));
        assert_eq!(nodes_of(&d.placements), ["b"]);
    }

    #[test]
    fn several_instances_each_see_the_moves_before_them() {
        let nodes: Vec<Node> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| node(id, &[], 64000, 65536, &h100s(8)))
            .collect();
        let allocs = [
            ones("w", "a", 0, 4),
            ones("x", "b", 0, 4),
            ones("y", "c", 0, 4),
            ones("z", "d", 0, 4),
        ]
        .concat();
        let jobs = ["w", "x", "y", "z"].map(|j| job(j, 10, true, 4));
        let d = defrag(&nodes, &allocs, &jobs, &eights(2), 50).unwrap();
        assert_eq!(d.migrations.len(), 8);
        assert_eq!(nodes_of(&d.placements), ["a", "c"]);
        let targets: HashSet<&str> = d.migrations.iter().map(|m| m.to.node_id.as_str()).collect();
        assert_eq!(targets, HashSet::from(["b", "d"]));
    }

    #[test]
    fn a_gang_defragments_for_all_its_instances_or_for_none() {
        let nodes: Vec<Node> = ["a", "b", "c"]
            .iter()
            .map(|id| node(id, &[], 64000, 65536, &h100s(8)))
            .collect();
        let allocs = [
            ones("x", "a", 0, 4),
            ones("y", "b", 0, 4),
            ones("z", "c", 0, 4),
        ]
        .concat();
        let jobs = ["x", "y", "z"].map(|j| job(j, 10, true, 4));
        // Sixteen GPUs cannot be freed beside twelve used on 24.
        let mut req = eights(2);
        req.groups[0].group.gang = true;
        assert_eq!(defrag(&nodes, &allocs, &jobs, &req, 50), None);
        // With a plain group after it, only the plain group's moves remain.
        req.groups.push(GroupDemand {
            group: group("one", 1, 1000, 1024, gpus(8, None, None)),
            indices: vec![0],
        });
        let d = defrag(&nodes, &allocs, &jobs, &req, 50).unwrap();
        assert_eq!(d.migrations.len(), 4);
        assert_eq!(d.placements.len(), 1);
        assert_eq!(d.placements[0].group, "one");
        let gang = &d.unplaced[0];
        assert_eq!(
            (gang.group.as_str(), gang.missing, gang.gang_fitted),
            ("big", 2, Some(1))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn defrag_never_overcommits_moves_only_what_it_may_and_is_deterministic(
            (nodes, earlier, groups, priority) in arb_scattered()
        ) {
            let allocs = populate(&nodes, &earlier);
            let req = request(groups);
            let out = defrag(&nodes, &allocs, &earlier, &req, priority);
            let reversed: Vec<Node> = nodes.iter().rev().cloned().collect();
            let shuffled: Vec<Allocation> = allocs.iter().rev().cloned().collect();
            prop_assert_eq!(&out, &defrag(&reversed, &shuffled, &earlier, &req, priority));
            let Some(d) = out else { return Ok(()) };
            let mut seen = HashSet::new();
            let mut spent: HashMap<&JobId, u32> = HashMap::new();
            let mut checked = req.clone();
            let mut placements = d.placements.clone();
            for m in &d.migrations {
                prop_assert!(seen.insert(&m.alloc_id), "{} moved twice", m.alloc_id);
                let alloc = allocs.iter().find(|a| a.id == m.alloc_id).unwrap();
                let job = earlier.iter().find(|j| j.job_id == alloc.job_id).unwrap();
                prop_assert!(job.group.movable && job.priority <= priority);
                prop_assert_eq!(&m.job_id, &alloc.job_id);
                prop_assert_eq!(&m.from, &alloc.node_id);
                prop_assert!(m.to.node_id != m.from);
                prop_assert_eq!((&m.to.group, m.to.index), (&alloc.group, alloc.index));
                let spent = spent.entry(&alloc.job_id).or_default();
                *spent += 1;
                prop_assert!(*spent <= job.budget);
                // Moves are checked against their own group, like the placements.
                match checked.groups.iter_mut().find(|d| d.group.name == job.group.name) {
                    Some(d) => d.indices.push(alloc.index),
                    None => checked.groups.push(GroupDemand {
                        group: job.group.clone(),
                        indices: vec![alloc.index],
                    }),
                }
                placements.push(m.to.clone());
            }
            let placements = Plan { placements, unplaced: Vec::new() };
            check_plan(&nodes, &after(&allocs, &seen, []), &checked, &placements);
        }
    }
}
